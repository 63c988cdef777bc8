/*
 * cpu_fused.h — the CPU backend's fused path: the CPU twin of every CUDA kernel, stage by
 * stage, with fp32 accumulation and rounding to the activation dtype where the kernels round.
 * OpenMP-parallel. Shares NO code with the reference (src/cpu/reference.c).
 */
#ifndef MOE_CPU_FUSED_H
#define MOE_CPU_FUSED_H

#include "../moe_stages.h"
#include "../weights.h"

/* logits [T,E] = round(x [T,H] @ router^T). */
void cpu_router_logits(moe_dtype dt, int T, int H, int E, const void *x, const void *router,
                       void *logits);
/* Qwen3: softmax (fp32) -> top-k (ties: lower id) -> renormalise if cfg->norm_topk_prob ->
 * round to dt. Llama-4: top-k of the logits -> sigmoid (fp32) -> round to dt. */
void cpu_route_topk(const moe_config *cfg, moe_dtype dt, int T, const void *logits,
                    int32_t *topk_ids, void *topk_w);
/* Histogram of ids in [expert_begin, expert_begin+El) (others ignored), a stable counting sort
 * of flat indices by expert, offsets [El+1]. Returns M = number of rows kept. */
int cpu_sort_by_expert(int T, int k, const int32_t *topk_ids, int expert_begin, int El,
                       int32_t *token_counts, int32_t *expert_offsets, int32_t *gather_idx);
moe_status cpu_grouped_gemm(const moe_grouped_gemm_args *a, moe_error *err);
moe_status cpu_grouped_gemm_dw(const moe_grouped_gemm_dw_args *a, moe_error *err);
/* out[t] = round(sum_j rows[t*k+j] * (row_scale ? row_scale[t*k+j] : 1)) in fp32, j ascending;
 * add (optional, [T,N]) is added first (Llama-4's shared expert). Deterministic. */
void cpu_sum_topk(moe_dtype dt, int T, int k, int N, const void *rows, const void *row_scale,
                  const void *add, void *out);
/* SiLU-and-mul backward: gu [M,2I] (gate|up, rounded GEMM1 output), dact [M,I] ->
 * dgu [M,2I] (rounded). */
void cpu_silu_mul_backward(moe_dtype dt, int M, int I, const void *gu, const void *dact,
                           void *dgu);
/* Plain GEMM with fp32 accumulation: C[M,N] = round(A[M,K] @ (b_kn ? B[K,N] : B[N,K]^T)),
 * (accumulate: C += ...). Used by the router, the shared expert and router backward. */
void cpu_gemm(moe_dtype dt, int M, int N, int K, const void *A, const void *B, bool b_kn,
              void *C, bool accumulate);

/* The whole block, forward, on the fused path. st's buffers are allocated by the caller
 * (moe_fwd_state_alloc in block.h); optional intermediates may be NULL. */
moe_status cpu_block_forward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                             moe_fwd_state *st, moe_error *err);
/* Backward from dout [T,H]: dx [T,H] and weight gradients (canonical layout, dt) into grads.
 * Needs st from the forward with gemm1_out and act kept. */
moe_status cpu_block_backward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                              const moe_fwd_state *st, const void *dout, void *dx,
                              moe_weights *grads, moe_error *err);

#endif /* MOE_CPU_FUSED_H */
