/*
 * layer_internal.h — what the layer module's files (layer.c, layer_weights.c, api.c) share.
 */
#ifndef MOE_LAYER_INTERNAL_H
#define MOE_LAYER_INTERNAL_H

#include "layer.h"

/* Canonical host weights of the local experts ids [El] from caller tensors in `lay` (copied,
 * converted to dt). */
moe_status layer_weights_from_tensors(const moe_config *cfg, moe_dtype dt,
                                      moe_weights_layout lay, const moe_named_tensor *t, int n,
                                      const int32_t *ids, int El, moe_weights *w,
                                      moe_error *err);
/* Pointers into caller tensors read in place (canonical or Qwen3 fused layout, local experts
 * contiguous, no shared expert). */
moe_status layer_weights_borrow(const moe_config *cfg, moe_dtype dt, moe_weights_layout lay,
                                const moe_named_tensor *t, int n, const int32_t *ids, int El,
                                moe_layer_weights *out, moe_error *err);

/* Validate a public handle: MOE_ERR_INVALID_ARG naming `fn` otherwise. */
moe_status layer_check(const moe_layer *L, const char *fn, moe_error *err);

#endif /* MOE_LAYER_INTERNAL_H */
