/*
 * moe_kernels_aux.h — extern "C" launchers of the CUDA kernels around the grouped GEMMs:
 * routing (kernels/routing.cu) and the elementwise / reduction kernels of the block forward
 * and backward (kernels/elementwise.cu). The grouped GEMMs themselves are in moe_kernels.h.
 *
 * Every pointer argument is a DEVICE pointer unless it is a `const moe_config *` (host).
 * Every launcher validates its arguments (MOE_ERR_INVALID_ARG naming the argument), launches
 * on `stream` without synchronising the host (so the block forward is CUDA-graph capturable),
 * checks cudaGetLastError() and returns a moe_status with the reason in err.
 * Every kernel is deterministic: no floating-point atomics, fixed reduction orders; the same
 * inputs give bit-identical outputs run after run.
 *
 * Each launcher names its CPU twin in src/cpu/cpu_fused.h; where the CUDA launcher takes more
 * arguments than the twin (a filter on local experts, a second addend, a fused row scale) the
 * extra arguments set to NULL reproduce the twin exactly.
 *
 * Shapes: T tokens, k top-k, E experts (global), El local experts [expert_begin,
 * expert_begin+El), H hidden, I expert width, M routed rows in expert order, flat index
 * f = t*k + j.
 */
#ifndef MOE_KERNELS_AUX_H
#define MOE_KERNELS_AUX_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

/* The project's C headers have no extern "C" guards of their own: include them inside ours so
 * the .cu files (C++) link against the C definitions. Include this header FIRST in a .cu. */
#ifdef __cplusplus
extern "C" {
#endif

#include "config.h"
#include "moe_stages.h"

/* ---- routing (kernels/routing.cu) ---- */

/* Twin of cpu_route_topk. logits [T, E] in dt (already rounded, as the router GEMM writes it).
 * Qwen3: p = softmax(logits) in fp32; top-k of p (ties: LOWER expert id first; output in
 * descending order); if cfg->norm_topk_prob, w = p / sum of the k selected (summed in
 * selection order); w rounded to dt.
 * Llama-4: top-k of the logits (same tie rule); w = sigmoid(selected logit) in fp32, rounded.
 * NaN logits sort below -inf (so every output id is a valid, distinct expert id).
 * Any E >= 1 and 1 <= k <= E (E*4 bytes of shared memory per token must fit in a block's
 * opt-in shared memory: E up to ~57000 on Hopper). topk_ids [T, k] global ids, topk_w [T, k].
 * nonfinite_count (optional, one uint32 of device memory; NULL: not counted): incremented
 * (integer atomics, so the total is order-independent) once for every token whose logits hold
 * a NaN or an infinity, inside the same launch; never reset here (the caller reads it
 * asynchronously and zeroes it when it wants). */
moe_status moe_cuda_route_topk(const moe_config *cfg, moe_dtype dt, int T, const void *logits,
                               int32_t *topk_ids, void *topk_w, uint32_t *nonfinite_count,
                               cudaStream_t stream, moe_error *err);

/* Scratch bytes moe_cuda_sort_by_expert needs for T*k flat entries and El local experts. */
size_t moe_cuda_sort_scratch_bytes(int T, int k, int El);

/* Twin of cpu_sort_by_expert. A STABLE counting sort of the flat indices f in [0, T*k) by
 * local expert e = topk_ids[f] - expert_begin (ids outside [0, El) are ignored):
 *   token_counts [El]      rows of each local expert;
 *   expert_offsets [El+1]  exclusive scan, expert_offsets[El] = M (rows kept);
 *   gather_idx [T*k]       row r of expert order came from flat index gather_idx[r]; within an
 *                          expert rows are in ascending f; entries [M, T*k) are set to -1.
 * Three kernels (per-chunk histogram, one-block scan, per-chunk ranked scatter); ranks inside
 * a chunk come from warp match + prefix counts, never from atomics whose order varies, so the
 * output is a pure function of topk_ids. M stays on the device (expert_offsets[El]).
 * scratch: moe_cuda_sort_scratch_bytes(T, k, El) bytes of device memory. */
moe_status moe_cuda_sort_by_expert(int T, int k, const int32_t *topk_ids, int expert_begin,
                                   int El, int32_t *token_counts, int32_t *expert_offsets,
                                   int32_t *gather_idx, void *scratch, size_t scratch_bytes,
                                   cudaStream_t stream, moe_error *err);

/* The whole route of a small batch in ONE launch (kernels/routing_small.cu): logits [T, E] =
 * x [T, H] @ router [E, H]^T (fp32 sums, rounded to dt as the router GEMM writes them; the
 * order of the sum differs from cuBLAS's, so a logit may differ from the per-stage path's in
 * its last bit), then exactly moe_cuda_route_topk's top-k and moe_cuda_sort_by_expert's sort of
 * those logits (same outputs, same contracts), H = cfg->hidden. For decode, where the
 * per-stage path's five launches cost more than their work. Applies where
 * moe_cuda_route_small_fits says so: 1 <= T <= MOE_ROUTE_SMALL_MAX_T, T * top_k <= 2048 (one
 * sort chunk), and the scores or sort arrays in 48 KB of shared memory (8 E floats or 10 El
 * ints); MOE_ERR_INVALID_ARG otherwise. counter: one int of device memory, zero before the
 * first launch; every launch leaves it zero again, so launches on one stream (or replays of one
 * CUDA graph) may reuse it, launches that may run at the same time may not.
 * nonfinite_count: as moe_cuda_route_topk's (the tokens whose computed logits are not finite). */
#define MOE_ROUTE_SMALL_MAX_T 32
bool moe_cuda_route_small_fits(const moe_config *cfg, int T, int El);
moe_status moe_cuda_route_small(const moe_config *cfg, moe_dtype dt, int T, const void *x,
                                const void *router, void *logits, int32_t *topk_ids, void *topk_w,
                                int expert_begin, int El, int32_t *token_counts,
                                int32_t *expert_offsets, int32_t *gather_idx, int *counter,
                                uint32_t *nonfinite_count, cudaStream_t stream, moe_error *err);

/* Router backward. Twin: the router part of cpu_block_backward.
 * logits [T, E] (dt, the forward's), topk_ids [T, k], dw [T*k] fp32: the gradient of the loss
 * with respect to each top-k weight (Qwen3) or score (Llama-4); rows of experts another rank
 * owns carry 0 (the result is linear in dw, so partial results of ranks add up).
 * dlogits [T, E] (dt):
 *   Qwen3, norm_topk_prob=false: dlogit_e = p_e (dp_e - sum_j p_{id_j} dw_j), dp_e = dw_j for
 *     e = id_j else 0 — every logit gets gradient;
 *   Qwen3, norm_topk_prob=true: with S = sum_j p_{id_j} and w_j = p_{id_j}/S (unrounded),
 *     dlogit_{id_j} = w_j (dw_j - sum_l w_l dw_l), others exactly 0;
 *   Llama-4: dlogit_{id_j} = dw_j * s_j (1 - s_j), s_j = sigmoid(logit) in fp32, others 0.
 * p is recomputed from the logits exactly as the forward computes it. */
moe_status moe_cuda_router_backward(const moe_config *cfg, moe_dtype dt, int T,
                                    const void *logits, const int32_t *topk_ids, const float *dw,
                                    void *dlogits, cudaStream_t stream, moe_error *err);

/* ---- elementwise and reductions (kernels/elementwise.cu) ---- */

/* Twin of cpu_sum_topk, extended. For t < T, n < N:
 *   out[t, n] = round( (add ? add[t,n] : 0) (+ add2[t,n]) + sum over j ascending of
 *                      rows[t*k+j, n] * (row_scale ? row_scale[t*k+j] : 1) )
 * in fp32 with separately rounded multiply and add (no FMA contraction), so it is bit-exact
 * with the CPU twin's loop. add2 (optional) is added right after add (the backward's third
 * term). topk_ids (optional, [T*k]): a row whose id is outside [expert_begin,
 * expert_begin+El) is skipped — it belongs to an expert this block does not own and its row
 * in `rows` was never written. With topk_ids NULL every row is summed (the twin). */
moe_status moe_cuda_sum_topk(moe_dtype dt, int T, int k, int N, const void *rows,
                             const void *row_scale, const void *add, const void *add2,
                             const int32_t *topk_ids, int expert_begin, int El, void *out,
                             cudaStream_t stream, moe_error *err);

/* SiLU-and-mul forward on a [M, 2I] buffer (gate | up, already rounded, e.g. cuBLAS output):
 * act [M, I] = round(silu(gate) * up) in fp32, silu(g) = g / (1 + exp(-g)).
 * (The grouped GEMM does this in its epilogue; this one serves Llama-4's shared expert.) */
moe_status moe_cuda_silu_mul(moe_dtype dt, int M, int I, const void *gu, void *act,
                             cudaStream_t stream, moe_error *err);

/* Twin of cpu_silu_mul_backward, extended; one block per row r < M:
 *   dact_r = dact[r]                                  (row_scale NULL: the twin)
 *          = round(dact[r] * row_scale[gather_idx[r]]) (Qwen3: the top-k weight, applied to
 *                                                       the gradient of the unweighted output)
 *   dgu[r] = round([ dact_r * up * s (1 + g (1 - s)) | dact_r * silu(g) ]), s = sigmoid(g),
 *            g, up from gu [M, 2I] (the rounded GEMM1 output).
 *   dw_out (optional, fp32 [T*k]): dw_out[gather_idx[r]] = dot(act[r], dact[r]) (unscaled
 *            dact; fp32, fixed order) — the gradient of the Qwen3 top-k weight, since
 *            dot(y_r, dout_t) = dot(act_r, dout_t @ W2_e).
 * Rows: m_dev (optional, device int32) holds the row count M (expert_offsets[El]); the launch
 * covers max_rows rows and rows >= *m_dev return at once. m_dev NULL: M = max_rows.
 * gather_idx is required with row_scale or dw_out; act is required with dw_out. */
moe_status moe_cuda_silu_mul_backward(moe_dtype dt, int max_rows, const int32_t *m_dev, int I,
                                      const void *gu, const void *dact, const void *row_scale,
                                      const int32_t *gather_idx, const void *act, float *dw_out,
                                      void *dgu, cudaStream_t stream, moe_error *err);

/* Row dot products (Llama-4's score gradient): for f < R,
 *   out[f] = dot(A[f / a_row_div, :], B[f, :]) over N, fp32, fixed order,
 * A [R / a_row_div, N] (x, token order), B [R, N] (dX of the scaled input, flat order).
 * topk_ids (optional, [R]): rows of experts outside [expert_begin, expert_begin+El) get 0
 * (their B row was never written). */
moe_status moe_cuda_row_dot(moe_dtype dt, int R, int N, const void *A, int a_row_div,
                            const void *B, const int32_t *topk_ids, int expert_begin, int El,
                            float *out, cudaStream_t stream, moe_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MOE_KERNELS_AUX_H */
