/*
 * weights.h — one MoE block's weights in moe-ep's canonical host layout, loaded from a
 * checkpoint (any of the HF namings) or generated from the counter-based RNG.
 *
 * Canonical layout (every tensor in `dtype`, row-major):
 *   router      [E, H]          logits = x @ router^T
 *   w13         [El, 2I, H]     rows [0,I) = gate_proj, rows [I,2I) = up_proj (HF Qwen3 fused
 *                               layout; Llama-4's gate_up_proj [E,H,2I] is transposed at load)
 *   w2          [El, H, I]      down_proj (Llama-4's [E,I,H] is transposed at load)
 *   shared_gate [Is, H], shared_up [Is, H], shared_down [H, Is]   (Llama-4 only)
 * El = expert_count local experts, global ids expert_begin .. expert_begin+El-1.
 *
 * Random weights: element i of a global tensor named N is moe_rng_normal(stream(seed, N), i)
 * times a scale (1/sqrt(fan_in)), where the names are the canonical ones above ("router",
 * "w13", "w2", "shared_gate", ...) and i is the index in the GLOBAL canonical tensor, so a rank
 * generating experts [b, b+El) gets exactly that slice of the single-rank tensors.
 */
#ifndef MOE_WEIGHTS_H
#define MOE_WEIGHTS_H

#include <stdint.h>

#include "config.h"
#include "tensor.h"

/* How the source named/laid out the tensors, so gradients can be written under the names and
 * shapes the user loaded. */
typedef enum moe_weight_naming {
    MOE_NAMING_RANDOM = 0,        /* generated; gradients use the canonical names */
    MOE_NAMING_QWEN3_PER_EXPERT,  /* experts.{e}.{gate,up,down}_proj.weight, gate.weight */
    MOE_NAMING_QWEN3_FUSED,       /* experts.gate_up_proj [E,2I,H], experts.down_proj [E,H,I] */
    MOE_NAMING_LLAMA4,            /* router.weight, experts.gate_up_proj [E,H,2I], down_proj [E,I,H],
                                     shared_expert.{gate,up,down}_proj.weight */
} moe_weight_naming;

typedef struct moe_weights {
    moe_config cfg;
    moe_dtype dtype;
    int expert_begin, expert_count; /* local experts [begin, begin+count) when contiguous */
    int32_t *expert_ids; /* else their global ids, ascending [count] (owned; NULL when
                            contiguous): read them with moe_weights_expert_id */
    moe_tensor router;
    moe_tensor w13;
    moe_tensor w2;
    moe_tensor shared_gate, shared_up, shared_down;
    moe_weight_naming naming;
    char prefix[256];      /* e.g. "model.layers.3.mlp." ("" for a block's own names) */
    uint64_t bytes_read;   /* expert weight bytes read from the checkpoint (EP counter) */
} moe_weights;

/* Load a block. path: a .safetensors file, a model.safetensors.index.json, or a checkpoint
 * directory holding either (the index preferred). layer < 0: the
 * block's own state-dict names; layer >= 0: full checkpoint names under model.layers.N.mlp.,
 * model.layers.N.feed_forward. or language_model.model.layers.N.feed_forward.
 * Only experts [expert_begin, expert_begin+expert_count) are read. Tensors are converted to
 * dtype (MOE_NUM_DTYPES = cfg->dtype, here and in moe_weights_random). A missing or mis-shaped
 * tensor is an error naming it. bytes_read counts the routed experts' bytes only. */
moe_status moe_weights_load(const moe_config *cfg, const char *path, int layer, int expert_begin,
                            int expert_count, moe_dtype dtype, moe_weights *w, moe_error *err);
/* The same for a list of n ascending global expert ids (an expert map's local experts; need
 * not be contiguous; n may be 0). */
moe_status moe_weights_load_ids(const moe_config *cfg, const char *path, int layer,
                                const int32_t *ids, int n, moe_dtype dtype, moe_weights *w,
                                moe_error *err);
moe_status moe_weights_random_ids(const moe_config *cfg, uint64_t seed, const int32_t *ids,
                                  int n, moe_dtype dtype, moe_weights *w, moe_error *err);
/* The global id of local expert l. */
int moe_weights_expert_id(const moe_weights *w, int l);
/* Generate (see the header comment). */
moe_status moe_weights_random(const moe_config *cfg, uint64_t seed, int expert_begin,
                              int expert_count, moe_dtype dtype, moe_weights *w, moe_error *err);
/* Zero-filled canonical tensors for the experts ids [n] (ascending; NULL = [0, n)). */
moe_status moe_weights_zeros_ids(const moe_config *cfg, const int32_t *ids, int n, moe_dtype dtype,
                                 moe_weights *w, moe_error *err);
/* Zero-filled tensors of the same shapes (a gradient accumulator), in dtype. */
moe_status moe_weights_zeros_like(const moe_weights *like, moe_dtype dtype, moe_weights *w,
                                  moe_error *err);
void moe_weights_free(moe_weights *w);

/* Write gradients under the names the weights were loaded with ("grad." + name, in the loaded
 * shapes), plus grad.hidden_states = dx. grads has the canonical layout of `like`.
 * Per-expert names use global expert ids. A fused [E,...] tensor (Qwen3 fused, Llama-4) loaded
 * for a local slice is written as that slice only, [El,...], under the fused name. dx may be
 * NULL (no grad.hidden_states). Tensors are written in grads' dtype. */
moe_status moe_weights_write_grads(const moe_weights *like, const moe_weights *grads,
                                   const moe_tensor *dx, const char *path, moe_error *err);

#endif /* MOE_WEIGHTS_H */
