/*
 * cpu_ep.h — the CPU twins of kernels/ep_pack.h: the expert-parallel dispatch plan, packing,
 * the deterministic combine reductions and the sync-free slot compaction, with the same
 * contracts (read them there) and the same layouts, so the EP driver runs the same steps on
 * either backend and the GPU tests can compare the kernels with these bit for bit.
 * Host memory; OpenMP-parallel where each output has one writer.
 */
#ifndef MOE_CPU_EP_H
#define MOE_CPU_EP_H

#include <stddef.h>
#include <stdint.h>

#include "../common.h"

/* Twin of moe_cuda_ep_plan (one rank's tokens): tdest/trow [T,D], tn [T], dcount [G]. */
moe_status cpu_ep_plan(int T, int k, const int32_t *ids, int E, const int32_t *vowner, int G,
                       int32_t *tdest, int32_t *tn, int32_t *trow, int32_t *dcount,
                       moe_error *err);
/* Twin of moe_cuda_ep_pack. */
void cpu_ep_pack(int T, int k, int G, const int32_t *vowner, const int32_t *vlocal,
                 size_t row_bytes, size_t w_bytes, const void *x, const void *dout,
                 const int32_t *ids, const void *w, const int32_t *tdest, const int32_t *tn,
                 const int32_t *trow, const int64_t *base, void *sx, void *sdout, int32_t *sids,
                 void *sw);
/* Twin of moe_cuda_ep_reduce. */
void cpu_ep_reduce(moe_dtype dt, int T, int H, int G, int k, const void *add, const void *add2,
                   const void *back, const int64_t *base, const int32_t *tdest,
                   const int32_t *tn, const int32_t *trow, void *out);
/* Twin of moe_cuda_ep_dweights. */
void cpu_ep_dweights(int T, int k, int G, const int32_t *vowner, const int32_t *ids,
                     const float *back_dw, const int64_t *base, const int32_t *tdest,
                     const int32_t *tn, const int32_t *trow, float *dw);
/* Twins of the sync-free slot kernels. status: [0] overflow flag, [1] most rows seen. */
void cpu_ep_slot_counts(int N, int V, const int32_t *dcount, int32_t *scnt);
void cpu_ep_compact(int N, int64_t slot_rows, const int32_t *rcnt, int k, size_t row_bytes,
                    size_t w_bytes, const void *sx, const int32_t *sids, const void *sw,
                    int64_t cap, void *cx, int32_t *cids, void *cw, int32_t *status);
void cpu_ep_compact_rows(int N, int64_t slot_rows, const int32_t *rcnt, size_t row_bytes,
                         const void *slots, int64_t cap, void *compact);
void cpu_ep_expand(int N, int64_t slot_rows, const int32_t *rcnt, size_t row_bytes,
                   const void *compact, int64_t cap, void *slots);

#endif /* MOE_CPU_EP_H */
