/*
 * engine.h — runs the fused path of one MoE block on a backend (CPU twin or CUDA) behind one
 * interface, with host-memory inputs and outputs. The CLI, the correctness mode, the benchmark
 * and the service all go through it.
 */
#ifndef MOE_ENGINE_H
#define MOE_ENGINE_H

#include "moe_stages.h"
#include "weights.h"

typedef struct moe_engine moe_engine;

/* w stays owned by the caller and must outlive the engine (the CUDA backend uploads it once).
 * max_T bounds every later call's T. */
moe_status moe_engine_create(moe_backend backend, const moe_weights *w, moe_dtype dt, int max_T,
                             moe_engine **out, moe_error *err);
void moe_engine_destroy(moe_engine *e);
const char *moe_engine_describe(const moe_engine *e); /* "cpu (2 threads)", "cuda: NVIDIA H100 ..." */

/* Forward on x [T,H] (host, dt). st: host buffers from moe_fwd_state_alloc; intermediates whose
 * pointer is NULL are not returned (the CUDA backend then skips writing them). */
moe_status moe_engine_forward(moe_engine *e, int T, const void *x, moe_fwd_state *st,
                              moe_error *err);
/* Backward after a forward of the same x whose st kept gemm1_out and act. Writes dx [T,H] and
 * grads (canonical layout, dt, as from moe_weights_zeros_like). */
moe_status moe_engine_backward(moe_engine *e, int T, const void *x, const moe_fwd_state *st,
                               const void *dout, void *dx, moe_weights *grads, moe_error *err);

#endif
