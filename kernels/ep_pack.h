/*
 * ep_pack.h — extern "C" launchers of the expert-parallel pack / unpack kernels
 * (kernels/ep_pack.cu): the device-side dispatch plan, packing token rows for dispatch,
 * compacting and expanding fixed-capacity receive slots (sync-free mode), and the
 * deterministic combine reductions. Host C code in src/ep/ep_cuda*.c calls these.
 *
 * Every pointer is a DEVICE pointer. Every launcher validates its arguments
 * (MOE_ERR_INVALID_ARG naming the argument), launches on `stream` without synchronising the
 * host (CUDA-graph capturable), checks cudaGetLastError() and returns a moe_status.
 * No floating-point atomics anywhere: every output element is written by one thread in a
 * fixed order, so results are bitwise reproducible.
 *
 * Shapes: T local tokens, k top-k, G virtual ranks in all (N real ranks x V virtual per
 * process), D = min(k, G) (most destinations of one token), H hidden. The placement is two
 * device tables of the E experts (src/layer/expert_map.h): vowner[e] = the virtual rank that
 * owns expert e, vlocal[e] = its index among that virtual rank's experts.
 * The CPU twins are in src/cpu/cpu_ep.c, named at each launcher.
 */
#ifndef MOE_EP_PACK_H
#define MOE_EP_PACK_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "common.h"

/* Largest top-k the plan kernel handles (a token's owner list lives in registers). */
#define MOE_EP_PACK_MAX_K 64

/* Device plan (twin: cpu_ep_plan). From ids [T,k] (global expert ids; < 0 is "no expert"):
 *   tdest [T,D]  token t's distinct owners (virtual ranks), ascending, padded with -1;
 *   tn [T]       how many;
 *   trow [T,D]   the token's row among the rows going to that owner: the tokens sent to d
 *                are numbered 0, 1, ... in ascending token order (a block-wide integer scan,
 *                so the numbering is a pure function of ids);
 *   dcount [G]   rows going to each owner.
 * An id >= E sets bad[0] = 1 (bad may be NULL) and is ignored. T = 0 zeroes dcount. */
moe_status moe_cuda_ep_plan(int T, int k, const int32_t *ids, int E, const int32_t *vowner,
                            int G, int32_t *tdest, int32_t *tn, int32_t *trow, int32_t *dcount,
                            int32_t *bad, cudaStream_t stream, moe_error *err);

/* Pack (twin: cpu_ep_pack). For every token t and destination a < tn[t], d = tdest:
 * row r = dest_base[d] + trow[t,a] of the send buffers gets
 *   send_x[r] = x[t] (row_bytes bytes), send_dout[r] = dout[t] (both optional together),
 *   send_ids[r,j] = vlocal[ids[t,j]] if virtual rank d owns expert ids[t,j], else -1 (the
 *                   receiver sorts over its own experts 0, 1, ...),
 *   send_w[r,j] = w[t,j] (w_bytes each) where owned, else zero bits (+0 in every dtype). */
moe_status moe_cuda_ep_pack(int T, int k, int G, const int32_t *vowner, const int32_t *vlocal,
                            size_t row_bytes, size_t w_bytes,
                            const void *x, const void *dout, const int32_t *ids, const void *w,
                            const int32_t *tdest, const int32_t *tn, const int32_t *trow,
                            const int64_t *dest_base, void *send_x, void *send_dout,
                            int32_t *send_ids, void *send_w, cudaStream_t stream,
                            moe_error *err);

/* Combine (twin: cpu_ep_reduce). For t < T, h < H, in fp32:
 *   out[t,h] = round( (add ? add[t,h] : 0) (+ add2[t,h]) + sum over a < tn[t] ascending of
 *                     back[dest_base[tdest[t,a]] + trow[t,a], h] )
 * with separately rounded adds. tdest is ascending, so the partial rows are added in
 * ascending (virtual) rank order whatever order they arrived in. dt: bf16, fp16 or fp32. */
moe_status moe_cuda_ep_reduce(moe_dtype dt, int T, int H, int G, int k, const void *add,
                              const void *add2, const void *back, const int64_t *dest_base,
                              const int32_t *tdest, const int32_t *tn, const int32_t *trow,
                              void *out, cudaStream_t stream, moe_error *err);

/* Backward (twin: cpu_ep_dweights): dw[t,j] (fp32) = back_dw[r, j] where r is the row token
 * t was sent to on the owner vowner[ids[t,j]]; 0 for ids < 0. back_dw [rows, k] fp32. */
moe_status moe_cuda_ep_dweights(int T, int k, int G, const int32_t *vowner, const int32_t *ids,
                                const float *back_dw, const int64_t *dest_base,
                                const int32_t *tdest, const int32_t *tn, const int32_t *trow,
                                float *dw, cudaStream_t stream, moe_error *err);

/* ---- sync-free mode: fixed-capacity slots, counts on the device ---- */

/* Slot counts for the payload exchange: scnt[v*N + q] = dcount[q*V + v] (v < V, q < N). */
moe_status moe_cuda_ep_slot_counts(int N, int V, const int32_t *dcount, int32_t *scnt,
                                   cudaStream_t stream, moe_error *err);

/* Receive-side bound: total = sum of rcnt[0 .. n). If total > limit: status[0] = 1 and
 * status[1] = max(status[1], total) (integer atomics: the result is order-independent). */
moe_status moe_cuda_ep_check_total(int n, const int32_t *rcnt, int64_t limit, int32_t *status,
                                   cudaStream_t stream, moe_error *err);

/* Compact one round's N receive slots (slot p = rows [p*slot_rows, p*slot_rows + rcnt[p]))
 * into cap contiguous rows in (source, row) order: row off_p + i of cx/cids/cw, off_p = sum
 * of rcnt[p' < p]. Rows [total, cap) get ids -1 (ignored by the sort and the k-sum) and zero
 * weights. A row that would land at >= cap sets status[0] = 1 and status[1] >= total; it is
 * NOT copied (the caller reports the overflow; nothing is silently dropped). */
moe_status moe_cuda_ep_compact(int N, int64_t slot_rows, const int32_t *rcnt, int k,
                               size_t row_bytes, size_t w_bytes, const void *slot_x,
                               const int32_t *slot_ids, const void *slot_w, int64_t cap,
                               void *cx, int32_t *cids, void *cw, int32_t *status,
                               cudaStream_t stream, moe_error *err);

/* One more row buffer of the same slots (the backward's dout rows), compacted like
 * moe_cuda_ep_compact's x rows; rows [total, cap) are zero. */
moe_status moe_cuda_ep_compact_rows(int N, int64_t slot_rows, const int32_t *rcnt,
                                    size_t row_bytes, const void *slots, int64_t cap,
                                    void *compact, cudaStream_t stream, moe_error *err);

/* The reverse, for the partial rows going back: slot row p*slot_rows + i (i < rcnt[p]) =
 * compact row off_p + i (zero bits when that row was beyond cap). Rows past rcnt[p] are not
 * written (the source never reads them). */
moe_status moe_cuda_ep_expand(int N, int64_t slot_rows, const int32_t *rcnt, size_t row_bytes,
                              const void *compact, int64_t cap, void *slots,
                              cudaStream_t stream, moe_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_PACK_H */
