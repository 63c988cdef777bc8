/*
 * cpu_block_ref.h — for tests: the whole block as one chain of the CPU stage functions
 * (tests/util/cpu_block_ref.c).
 */
#ifndef MOE_CPU_BLOCK_REF_H
#define MOE_CPU_BLOCK_REF_H

#include "cpu/cpu_fused.h"

/* The whole block, forward, on the fused path. st's buffers come from the caller
 * (moe_fwd_state_alloc in block_state.h) with st->T == T; every field is required except
 * gemm1_out (needed by backward) and shared_out (needed for Llama-4 with a shared expert).
 * w may hold a slice of the experts: only those are computed (rows of the others are zero in
 * gemm2_out, so out is this slice's partial sum, plus the shared expert). */
moe_status cpu_block_forward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                             moe_fwd_state *st, moe_error *err);
/* Backward of sum(out * dout) from dout [T,H]: dx [T,H] and weight gradients (canonical
 * layout, dt, shapes of w; every tensor of grads is overwritten, not accumulated) into grads.
 * Needs st from the forward with gemm1_out kept. With a slice of the experts in w, it is the
 * exact gradient of that slice's forward: dx and grads->router hold the slice's share (the
 * router backward is linear in the top-k weight gradients, so shares add up), plus the shared
 * expert's terms. */
moe_status cpu_block_backward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                              const moe_fwd_state *st, const void *dout, void *dx,
                              moe_weights *grads, moe_error *err);

#endif /* MOE_CPU_BLOCK_REF_H */
