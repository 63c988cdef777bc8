/*
 * cuda_backend.h — what the CUDA backend's two files (cuda_backend.c: state, plumbing,
 * forward; cuda_backend_bwd.c: backward, expert parallelism, errors) share. CUDA builds only.
 */
#ifndef MOE_CUDA_BACKEND_H
#define MOE_CUDA_BACKEND_H

#include <stdbool.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../ep/ep.h"
#include "../layer/layer.h"
#include "ep_pack.h"
#include "kernel_launch.h"
#include "layout_kernels.h"
#include "moe_kernels.h"
#include "moe_kernels_aux.h"

typedef struct cuda_state {
    cudaStream_t own;  /* the stream of host-memory calls */
    cudaStream_t side; /* Llama-4's shared expert */
    cublasHandle_t h_main, h_side;
    void *ws_main, *ws_side; /* cuBLAS workspaces */
    cudaEvent_t ev_fork, ev_join;
    cudaEvent_t marks[MOE_NUM_MARKS];
    bool marked[MOE_NUM_MARKS];
    /* the weights on the device (NULL when borrowed) */
    void *router, *w13, *w2, *shared_gu, *shared_down;
    /* the grouped GEMMs (index MOE_GEMM_*): how they run, what ran */
    moe_kernel_tuning tuning;
    bool forced, autotune;
    char autotune_cache[512];
    moe_kernel_config cfg[MOE_STATS_NUM_GEMMS], tuned[MOE_STATS_NUM_GEMMS];
    int tuned_rows[MOE_STATS_NUM_GEMMS];
    moe_kernel_report rep[MOE_STATS_NUM_GEMMS];
    /* the device's records (moe_layer_check_errors): [0] receive overflow flag, [1] most rows
     * seen, [2] tokens with non-finite router logits */
    int32_t *d_status;
    int *route_counter; /* moe_cuda_route_small's count-in counter */
    bool route_small;
} cuda_state;

#define CB_CUDA(call, what)                                                                   \
    do {                                                                                      \
        cudaError_t cb_e_ = (call);                                                           \
        if (cb_e_ != cudaSuccess) {                                                           \
            cudaGetLastError();                                                               \
            return moe_fail(err, MOE_ERR_CUDA, "%s: %s (%s:%d)", (what),                      \
                            cudaGetErrorString(cb_e_), __FILE__, __LINE__);                   \
        }                                                                                     \
    } while (0)

const char *cb_blas_str(cublasStatus_t s);
#define CB_BLAS(call, what)                                                                   \
    do {                                                                                      \
        cublasStatus_t cb_s_ = (call);                                                        \
        if (cb_s_ != CUBLAS_STATUS_SUCCESS)                                                   \
            return moe_fail(err, MOE_ERR_CUDA, "%s: cuBLAS %s (%s:%d)", (what),               \
                            cb_blas_str(cb_s_), __FILE__, __LINE__);                          \
    } while (0)

static inline cudaStream_t cb_main(const moe_layer *L) { return (cudaStream_t)L->stream; }
static inline cudaStream_t cb_side(const moe_layer *L)
{
    return ((const cuda_state *)L->be)->side;
}

/* Row-major C[M,N] = op(A) @ op(B), fp32 accumulation, C in dtype cdt (the layer's, or fp32
 * partials). a_km: A stored [K,M]; b_kn: B stored [K,N]. side: on the side stream. */
moe_status cb_gemm(moe_layer *L, bool side, moe_dtype cdt, int M, int N, int K, const void *A,
                   int lda, bool a_km, const void *B, int ldb, bool b_kn, void *C, int ldc,
                   const char *what, moe_error *err);
/* Grouped GEMM g (MOE_GEMM_*) with its configuration (forced / tuned / default). */
moe_status cb_run_gemm(moe_layer *L, int g, const moe_grouped_gemm_args *a, moe_error *err);
moe_status cb_run_gemm_dw(moe_layer *L, int g, const moe_grouped_gemm_dw_args *a,
                          moe_error *err);
/* The stable counting sort of R rows' k slots over experts [0, count). */
moe_status cb_sort(moe_layer *L, int R, int count, const int32_t *ids, int rows_cap,
                   int32_t *counts, int32_t *offs, int32_t *gather, moe_error *err);

/* cuda_backend_bwd.c */
moe_status cb_experts_backward(moe_layer *L, const moe_experts_bwd_args *a, moe_error *err);
moe_status cb_shared_backward(moe_layer *L, int T, const void *x, const void *dout,
                              const void *sgu, const void *sact, void *dsact, void *dsgu,
                              void *dx_shared, moe_dtype gdt, void *g_gu, void *g_down,
                              moe_error *err);
moe_status cb_router_backward(moe_layer *L, int T, const void *x, const void *logits,
                              const int32_t *ids, const float *dtop, bool through_topk,
                              const void *d_logits_in, void *dlogits, moe_dtype gdt,
                              void *g_router, void *dx_router, moe_error *err);
moe_status cb_transpose(moe_layer *L, int n, int r, int c, const void *src, void *dst,
                        moe_error *err);
moe_status cb_round_f32(moe_layer *L, size_t n, const float *src, void *dst, moe_error *err);
moe_status cb_sum_parts(moe_layer *L, int n_parts, size_t n, const float *parts, moe_dtype dt,
                        void *dst, moe_error *err);
moe_status cb_ep_plan(moe_layer *L, int T, const int32_t *ids, int32_t *tdest, int32_t *tn,
                      int32_t *trow, int32_t *dcount, moe_error *err);
moe_status cb_ep_pack(moe_layer *L, int T, const void *x, const void *dout, const int32_t *ids,
                      const void *w, const int32_t *tdest, const int32_t *tn,
                      const int32_t *trow, const int64_t *base, void *sx, void *sdout,
                      int32_t *sids, void *sw, moe_error *err);
moe_status cb_ep_reduce(moe_layer *L, int T, const void *add, const void *add2, const void *back,
                        const int64_t *base, const int32_t *tdest, const int32_t *tn,
                        const int32_t *trow, void *out, moe_error *err);
moe_status cb_ep_dweights(moe_layer *L, int T, const int32_t *ids, const float *back_dw,
                          const int64_t *base, const int32_t *tdest, const int32_t *tn,
                          const int32_t *trow, float *dw, moe_error *err);
moe_status cb_ep_slot_counts(moe_layer *L, const int32_t *dcount, int32_t *scnt,
                             moe_error *err);
moe_status cb_ep_compact(moe_layer *L, int64_t slot_rows, const int32_t *rcnt, const void *sx,
                         const int32_t *sids, const void *sw, const void *sdout, int64_t cap,
                         void *cx, int32_t *cids, void *cw, void *cdout, moe_error *err);
moe_status cb_ep_check_total(moe_layer *L, int n, const int32_t *rcnt, int64_t limit,
                             moe_error *err);
moe_status cb_ep_expand(moe_layer *L, int64_t slot_rows, const int32_t *rcnt, size_t row_bytes,
                        const void *compact, int64_t cap, void *slots, moe_error *err);
moe_status cb_check_errors(moe_layer *L, moe_error *err);
void cb_gemm_report(const moe_layer *L, int gemm, char *kernel, size_t klen, char *config,
                    size_t clen);

#endif /* MOE_CUDA_BACKEND_H */
