/*
 * cpu_fused.h — the CPU backend's fused path: the CPU twin of every CUDA kernel, stage by
 * stage, with fp32 accumulation and rounding to the activation dtype where the kernels round.
 * OpenMP-parallel over rows / experts / tiles; every output element is produced by one thread
 * in a fixed order, so results are bitwise identical for any thread count.
 * Shares NO code with the reference (src/cpu/reference.c).
 *
 * dtypes: activations and weights share one dtype dt in {bf16, fp16, fp32}. Stage outputs are
 * stored in dt (rounded once, from fp32) unless stated "float".
 */
#ifndef MOE_CPU_FUSED_H
#define MOE_CPU_FUSED_H

#include "../moe_stages.h"
#include "../weights.h"

/* logits [T,E] = round(x [T,H] @ router^T). Fails only on allocation. */
moe_status cpu_router_logits(moe_dtype dt, int T, int H, int E, const void *x,
                             const void *router, void *logits, moe_error *err);
/* Qwen3: softmax (fp32) -> top-k (ties: lower id) -> renormalise if cfg->norm_topk_prob ->
 * round to dt. Llama-4: top-k of the logits -> sigmoid (fp32) -> round to dt.
 * topk_ids/topk_w [T,k] in descending order of the selected value; a NaN ranks below every
 * number. Fails on a bad config (k outside [1,E]) or allocation. */
moe_status cpu_route_topk(const moe_config *cfg, moe_dtype dt, int T, const void *logits,
                          int32_t *topk_ids, void *topk_w, moe_error *err);
/* Histogram of ids in [expert_begin, expert_begin+El) (others ignored), a stable counting sort
 * of flat indices by expert, offsets [El+1]; gather_idx [T*k] entries [M, T*k) are set to -1.
 * Returns M = number of rows kept. */
int cpu_sort_by_expert(int T, int k, const int32_t *topk_ids, int expert_begin, int El,
                       int32_t *token_counts, int32_t *expert_offsets, int32_t *gather_idx);
/* See moe_grouped_gemm_args / moe_grouped_gemm_dw_args (moe_stages.h). The arguments are
 * validated (offsets, flags, gather indices) before anything is written. */
moe_status cpu_grouped_gemm(const moe_grouped_gemm_args *a, moe_error *err);
moe_status cpu_grouped_gemm_dw(const moe_grouped_gemm_dw_args *a, moe_error *err);
/* out[t] = round(sum_j rows[t*k+j] * (row_scale ? row_scale[t*k+j] : 1)) in fp32, j ascending;
 * add (optional, [T,N]) is added first (Llama-4's shared expert). Deterministic.
 * out may alias add (row by row, read before written). */
void cpu_sum_topk(moe_dtype dt, int T, int k, int N, const void *rows, const void *row_scale,
                  const void *add, void *out);
/* SiLU-and-mul backward: gu [M,2I] (gate|up, rounded GEMM1 output), dact [M,I] ->
 * dgu [M,2I] (rounded): dgate = dact*up*silu'(gate), dup = dact*silu(gate). */
void cpu_silu_mul_backward(moe_dtype dt, int M, int I, const void *gu, const void *dact,
                           void *dgu);
/* Qwen3's fused top-k weight multiply, backward. y_f = w_f * (act_r @ W2_e^T) with f =
 * gather_idx[r]; given dA0 [M,I] = dout[f/k] @ W2_e (expert order):
 *   dw[f] = dot(act_r, dA0_r) (float [T*k], fp32 accumulation; entries of flat indices not
 *           in gather_idx are left untouched), dact_r = round(w_f * dA0_r)  [M,I]. */
void cpu_topk_weight_backward(moe_dtype dt, int M, int I, const int32_t *gather_idx,
                              const void *act, const void *dA0, const void *topk_w, float *dw,
                              void *dact);
/* Llama-4's input scaling xs_f = round(x_t * s_f), backward to the score:
 * ds[f] = dot(dxs[f], x[f/k]) for f in [0,T*k) (float, fp32 accumulation). dxs [T*k,H] flat. */
void cpu_scale_input_backward(moe_dtype dt, int T, int k, int H, const void *x, const void *dxs,
                              float *ds);
/* Router backward: from the gradient of topk_w (float [T,k]) to dlogits [T,E] (rounded).
 * Qwen3: through the renormalisation (norm_topk_prob: only the selected logits get gradient)
 * and the fp32 softmax (without it every logit does). Llama-4: through the sigmoid of the
 * selected logits; the others get zero. Recomputes the fp32 probabilities from logits. */
moe_status cpu_route_backward(const moe_config *cfg, moe_dtype dt, int T, const void *logits,
                              const int32_t *topk_ids, const float *d_topk_w, void *dlogits,
                              moe_error *err);
/* Plain GEMM with fp32 accumulation: C[M,N] = round(A[M,K] @ (b_kn ? B[K,N] : B[N,K]^T)),
 * (accumulate: C = round(C + A @ op(B))). The router, router backward and shared expert use it.
 * Fails only on allocation. */
moe_status cpu_gemm(moe_dtype dt, int M, int N, int K, const void *A, const void *B, bool b_kn,
                    void *C, bool accumulate, moe_error *err);

#endif /* MOE_CPU_FUSED_H */
