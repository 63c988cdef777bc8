/*
 * cuda_block.c — host orchestration of the MoE block on one GPU (see cuda_block.h).
 *
 * forward (main stream s0; Llama-4's shared expert on s1):
 *   s0: [fork] router GEMM (cuBLAS) -> route_topk -> sort (hist, scan, scatter)
 *       -> grouped GEMM1 (permute_x, Llama-4 scale_a, SiLU-and-mul, optional C_preact)
 *       -> grouped GEMM2 (permute_y, Qwen3 scale_c) -> [join] -> sum over k (+ shared_out)
 *   s1: shared gate|up GEMM -> SiLU-and-mul -> shared down GEMM -> [join event]
 * backward (s0; the shared expert's backward on s1):
 *   s0: dA0 = dout W2 -> SiLU-mul backward (Qwen3: + dw, dact = w dA0) -> dW2 -> dXs = dgu W13
 *       -> dW13 -> [Llama-4 ds] -> router backward -> d_router, dx_router -> [join] -> dx sum
 *   s1: dsact = dout Wsd, dWsd = dout^T sact, dsgu = SiLU-mul backward, dWsg/dWsu = dsgu^T x,
 *       dx_shared = dsgu [Wsg; Wsu]
 * Nothing here waits for the device inside forward/backward: row counts stay on the device
 * (the grouped GEMMs are sized by max_rows = T*k and read expert_offsets themselves).
 */
#include "cuda_block.h"
#include "autotune.h"
#include "kernel_launch.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublas_v2.h>

#include "moe_kernels_aux.h"

#define CUBLAS_WS_BYTES ((size_t)32 << 20) /* cuBLAS's recommended workspace on Hopper */
#define MAX_ALLOCS 64

struct cuda_block {
    moe_config cfg;
    moe_dtype dt;
    int E, El, begin, H, I, k, Is;
    bool llama, shared, backward;
    int max_T;
    int device;

    /* weights (device) */
    void *router;      /* [E, H] */
    void *w13;         /* [El, 2I, H] */
    void *w2;          /* [El, H, I] */
    void *shared_gu;   /* [2Is, H]: gate rows then up rows (one GEMM for both) */
    void *shared_down; /* [H, Is] */

    cudaStream_t s0, s1;
    bool own_s0;
    cublasHandle_t h0, h1;
    void *blas_ws0, *blas_ws1;
    cudaEvent_t ev_fork, ev_join;
    /* optional phase markers (cuda_block_set_phase_events): CUDA_BLOCK_PHASE_EVENTS events
     * recorded on s0 at the forward's phase boundaries; NULL = none (the normal case) */
    cudaEvent_t *phase_ev;

    /* forward scratch (max_T) */
    void *logits, *topk_w, *act, *gemm2_out, *shared_out;
    int32_t *topk_ids, *counts, *offsets, *gather;
    void *sgu, *sact; /* shared expert [T,2Is] and [T,Is] */
    void *sort_scratch;
    size_t sort_scratch_bytes;
    int *route_counter; /* moe_cuda_route_small's count-in counter (zero between launches) */
    uint32_t *nonfinite; /* tokens whose router logits held a NaN / inf (the routing kernels add) */
    bool route_small;   /* the last route ran as moe_cuda_route_small */
    /* the forward whose shared-expert intermediates sgu/sact hold (backward reuses them) */
    const void *last_x;
    int last_T;

    /* backward scratch (max_T) */
    void *dA0, *dgu, *dxs, *dlogits, *dx_router, *dx_shared, *dsact, *dsgu;
    float *dtop;

    /* how the grouped GEMMs run: its sched_counters (the wgmma tile scheduler's) are the
     * block's own, shared by all its grouped GEMMs, which run one after the other on s0 */
    moe_kernel_tuning tuning;
    moe_kernel_config gemm_cfg[CUDA_GEMM_NUM_STAGES];
    moe_kernel_report gemm_report[CUDA_GEMM_NUM_STAGES];
    /* autotuning (cuda_block_set_autotune): stages whose config is not forced take the tuned
     * choice; the last choice per stage is memoised by max_rows so a repeated shape costs no
     * cache-file read */
    bool forced[CUDA_GEMM_NUM_STAGES];
    bool autotune;
    char autotune_cache[512];
    int tuned_rows[CUDA_GEMM_NUM_STAGES];
    moe_kernel_config tuned_cfg[CUDA_GEMM_NUM_STAGES];

    void *allocs[MAX_ALLOCS];
    int nallocs;
};

/* ---- error helpers ---- */

#define CUDA_TRY(call, what)                                                                  \
    do {                                                                                      \
        cudaError_t cb_e_ = (call);                                                           \
        if (cb_e_ != cudaSuccess)                                                             \
            return moe_fail(err, MOE_ERR_CUDA, "%s: %s (%s:%d)", (what),                      \
                            cudaGetErrorString(cb_e_), __FILE__, __LINE__);                   \
    } while (0)

static const char *blas_str(cublasStatus_t s)
{
    const char *n = cublasGetStatusString(s);
    return n ? n : "unknown cuBLAS status";
}

#define BLAS_TRY(call, what)                                                                  \
    do {                                                                                      \
        cublasStatus_t cb_s_ = (call);                                                        \
        if (cb_s_ != CUBLAS_STATUS_SUCCESS)                                                   \
            return moe_fail(err, MOE_ERR_CUDA, "%s: cuBLAS %s (%s:%d)", (what),               \
                            blas_str(cb_s_), __FILE__, __LINE__);                             \
    } while (0)

static size_t esz(const cuda_block *b) { return moe_dtype_size(b->dt); }

/* ---- device memory ---- */

moe_status cuda_dev_alloc(void **p, size_t bytes, const char *what, moe_error *err)
{
    *p = NULL;
    if (bytes == 0) bytes = 16; /* a valid, distinct pointer even for empty tensors */
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        *p = NULL;
        cudaGetLastError();
        return moe_fail(err, e == cudaErrorMemoryAllocation ? MOE_ERR_NOMEM : MOE_ERR_CUDA,
                        "cudaMalloc of %zu bytes for %s: %s", bytes, what, cudaGetErrorString(e));
    }
    return MOE_OK;
}

void cuda_dev_free(void *p)
{
    if (p) cudaFree(p);
}

/* Block-owned allocation, freed by cuda_block_destroy. */
static moe_status balloc(cuda_block *b, void **p, size_t bytes, const char *what, moe_error *err)
{
    if (b->nallocs == MAX_ALLOCS)
        return moe_fail(err, MOE_ERR_INTERNAL, "cuda_block: more than %d allocations", MAX_ALLOCS);
    MOE_TRY(cuda_dev_alloc(p, bytes, what, err));
    b->allocs[b->nallocs++] = *p;
    return MOE_OK;
}

static moe_status upload_tensor(cuda_block *b, void **dst, const moe_tensor *t, const char *name,
                                moe_error *err)
{
    size_t bytes = moe_tensor_numel(t) * moe_dtype_size(t->dtype);
    MOE_TRY(balloc(b, dst, bytes, name, err));
    CUDA_TRY(cudaMemcpy(*dst, t->data, bytes, cudaMemcpyHostToDevice), name);
    return MOE_OK;
}

/* ---- validation ---- */

static moe_status check_tensor(const char *name, const moe_tensor *t, moe_dtype dt, int ndim,
                               int64_t d0, int64_t d1, int64_t d2, moe_error *err)
{
    int64_t want[3] = {d0, d1, d2};
    bool ok = t->data != NULL && t->dtype == dt && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == want[i];
    if (ok) return MOE_OK;
    char got[64], exp[64];
    const char *dn = moe_dtype_name(t->dtype);
    return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_create: tensor %s is %s %s%s, expected %s %s",
                    name, dn ? dn : "?", moe_shape_str(t->ndim, t->shape, got, sizeof got),
                    t->data ? "" : " (no data)", moe_dtype_name(dt),
                    moe_shape_str(ndim, want, exp, sizeof exp));
}

static moe_status check_weights(const moe_weights *w, moe_error *err)
{
    const moe_config *c = &w->cfg;
    if (w->dtype != MOE_DTYPE_BF16 && w->dtype != MOE_DTYPE_F16 && w->dtype != MOE_DTYPE_F32)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "cuda_block_create: dtype %s: the CUDA backend "
                        "computes in bf16, fp16 or fp32",
                        moe_dtype_name(w->dtype) ? moe_dtype_name(w->dtype) : "?");
    if (c->arch != MOE_ARCH_QWEN3 && c->arch != MOE_ARCH_LLAMA4)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "cuda_block_create: unknown arch %d", (int)c->arch);
    if (c->hidden < 1 || c->inter < 1 || c->num_experts < 1 || c->top_k < 1 ||
        c->top_k > c->num_experts || c->shared_inter < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_create: config H=%d I=%d E=%d k=%d "
                        "Is=%d out of range", c->hidden, c->inter, c->num_experts, c->top_k,
                        c->shared_inter);
    if (w->expert_begin < 0 || w->expert_count < 1 ||
        w->expert_begin + w->expert_count > c->num_experts)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_create: local experts [%d, %d) "
                        "outside [0, %d)", w->expert_begin, w->expert_begin + w->expert_count,
                        c->num_experts);
    int64_t E = c->num_experts, H = c->hidden, I = c->inter, Is = c->shared_inter,
            El = w->expert_count;
    MOE_TRY(check_tensor("router", &w->router, w->dtype, 2, E, H, 0, err));
    MOE_TRY(check_tensor("w13", &w->w13, w->dtype, 3, El, 2 * I, H, err));
    MOE_TRY(check_tensor("w2", &w->w2, w->dtype, 3, El, H, I, err));
    if (c->arch == MOE_ARCH_LLAMA4 && Is > 0) {
        MOE_TRY(check_tensor("shared_gate", &w->shared_gate, w->dtype, 2, Is, H, 0, err));
        MOE_TRY(check_tensor("shared_up", &w->shared_up, w->dtype, 2, Is, H, 0, err));
        MOE_TRY(check_tensor("shared_down", &w->shared_down, w->dtype, 2, H, Is, 0, err));
    }
    return MOE_OK;
}

/* ---- cuBLAS ---- */

static cudaDataType_t blas_type(moe_dtype dt)
{
    return dt == MOE_DTYPE_BF16 ? CUDA_R_16BF : dt == MOE_DTYPE_F16 ? CUDA_R_16F : CUDA_R_32F;
}

/* Row-major C[M,N] = op(A) @ op(B) (+ beta C), fp32 accumulation, C rounded to the dtype.
 *   A: a_km false: stored [M,K] (row stride lda >= K); true: stored [K,M] (lda >= M), A^T used.
 *   B: b_kn false: stored [N,K] (ldb >= K), B^T used; true: stored [K,N] (ldb >= N).
 * cuBLAS is column-major: a row-major [R,C] matrix is a column-major [C,R] one, so this is
 * C^T (N x M) = op(B)^T-view (N x K) * op(A)^T-view (K x M). */
static moe_status blas_gemm(cublasHandle_t h, moe_dtype dt, int M, int N, int K, const void *A,
                            int lda, bool a_km, const void *B, int ldb, bool b_kn, void *C,
                            int ldc, float beta, const char *what, moe_error *err)
{
    if (M == 0 || N == 0) return MOE_OK;
    const float alpha = 1.0f;
    cudaDataType_t t = blas_type(dt);
    BLAS_TRY(cublasGemmEx(h, b_kn ? CUBLAS_OP_N : CUBLAS_OP_T, a_km ? CUBLAS_OP_T : CUBLAS_OP_N,
                          N, M, K, &alpha, B, t, ldb, A, t, lda, &beta, C, t, ldc,
                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
             what);
    return MOE_OK;
}

static moe_status blas_handle(cublasHandle_t *h, void **ws, cudaStream_t s, cuda_block *b,
                              moe_error *err)
{
    BLAS_TRY(cublasCreate(h), "cublasCreate");
    BLAS_TRY(cublasSetStream(*h, s), "cublasSetStream");
    /* No TF32 for fp32 (CUBLAS_COMPUTE_32F with the default math mode never uses it), and no
     * reduced-precision split-K reductions for bf16/fp16 outputs. */
    BLAS_TRY(cublasSetMathMode(*h, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
                                                  CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
             "cublasSetMathMode");
    /* A fixed, user-provided workspace: deterministic algorithm choice across runs and no
     * allocation inside a captured graph. */
    MOE_TRY(balloc(b, ws, CUBLAS_WS_BYTES, "cuBLAS workspace", err));
    BLAS_TRY(cublasSetWorkspace(*h, *ws, CUBLAS_WS_BYTES), "cublasSetWorkspace");
    return MOE_OK;
}

/* ---- create / destroy ---- */

static moe_status create_inner(cuda_block *b, const moe_weights *w, int max_T, bool backward,
                               moe_error *err)
{
    const moe_config *c = &w->cfg;
    b->cfg = *c;
    b->dt = w->dtype;
    b->E = c->num_experts;
    b->El = w->expert_count;
    b->begin = w->expert_begin;
    b->H = c->hidden;
    b->I = c->inter;
    b->k = c->top_k;
    b->llama = c->arch == MOE_ARCH_LLAMA4;
    b->shared = b->llama && c->shared_inter > 0;
    b->Is = b->shared ? c->shared_inter : 0;
    b->backward = backward;
    b->max_T = max_T;
    CUDA_TRY(cudaGetDevice(&b->device), "cudaGetDevice");

    MOE_TRY(upload_tensor(b, &b->router, &w->router, "router", err));
    MOE_TRY(upload_tensor(b, &b->w13, &w->w13, "w13", err));
    MOE_TRY(upload_tensor(b, &b->w2, &w->w2, "w2", err));
    const size_t es = esz(b);
    const size_t T = (size_t)max_T, H = b->H, I = b->I, E = b->E, k = b->k, Is = b->Is,
                 M = T * k;
    if (b->shared) {
        size_t half = Is * H * es;
        MOE_TRY(balloc(b, &b->shared_gu, 2 * half, "shared gate|up", err));
        CUDA_TRY(cudaMemcpy(b->shared_gu, w->shared_gate.data, half, cudaMemcpyHostToDevice),
                 "shared_gate");
        CUDA_TRY(cudaMemcpy((char *)b->shared_gu + half, w->shared_up.data, half,
                            cudaMemcpyHostToDevice), "shared_up");
        MOE_TRY(upload_tensor(b, &b->shared_down, &w->shared_down, "shared_down", err));
    }

    CUDA_TRY(cudaStreamCreateWithFlags(&b->s0, cudaStreamNonBlocking), "cudaStreamCreate");
    b->own_s0 = true;
    CUDA_TRY(cudaStreamCreateWithFlags(&b->s1, cudaStreamNonBlocking), "cudaStreamCreate");
    CUDA_TRY(cudaEventCreateWithFlags(&b->ev_fork, cudaEventDisableTiming), "cudaEventCreate");
    CUDA_TRY(cudaEventCreateWithFlags(&b->ev_join, cudaEventDisableTiming), "cudaEventCreate");
    MOE_TRY(blas_handle(&b->h0, &b->blas_ws0, b->s0, b, err));
    MOE_TRY(blas_handle(&b->h1, &b->blas_ws1, b->s1, b, err));

    /* forward scratch */
    MOE_TRY(balloc(b, &b->logits, T * E * es, "router logits", err));
    MOE_TRY(balloc(b, (void **)&b->topk_ids, M * 4, "topk ids", err));
    MOE_TRY(balloc(b, &b->topk_w, M * es, "topk weights", err));
    MOE_TRY(balloc(b, (void **)&b->counts, E * 4, "token counts", err));
    MOE_TRY(balloc(b, (void **)&b->offsets, (E + 1) * 4, "expert offsets", err));
    MOE_TRY(balloc(b, (void **)&b->gather, M * 4, "gather idx", err));
    MOE_TRY(balloc(b, &b->act, M * I * es, "act", err));
    MOE_TRY(balloc(b, &b->gemm2_out, M * H * es, "gemm2 out", err));
    b->sort_scratch_bytes = moe_cuda_sort_scratch_bytes(max_T, b->k, b->El);
    MOE_TRY(balloc(b, &b->sort_scratch, b->sort_scratch_bytes, "sort scratch", err));
    MOE_TRY(balloc(b, (void **)&b->route_counter, sizeof(int), "route counter", err));
    CUDA_TRY(cudaMemset(b->route_counter, 0, sizeof(int)), "zeroing the route counter");
    MOE_TRY(balloc(b, (void **)&b->nonfinite, sizeof *b->nonfinite, "non-finite logits count", err));
    CUDA_TRY(cudaMemsetAsync(b->nonfinite, 0, sizeof *b->nonfinite, b->s0),
             "zeroing the non-finite logits count");
    MOE_TRY(balloc(b, (void **)&b->tuning.sched_counters, MOE_SCHED_COUNTERS_BYTES,
                   "tile scheduler counters", err));
    CUDA_TRY(cudaMemsetAsync(b->tuning.sched_counters, 0, MOE_SCHED_COUNTERS_BYTES, b->s0),
             "zeroing the tile scheduler counters");
    moe_kernel_tuning_apply_env(&b->tuning); /* -DMOE_DIAGNOSTICS=ON builds only (docs/ENV.md) */
    if (b->shared) {
        MOE_TRY(balloc(b, &b->shared_out, T * H * es, "shared out", err));
        MOE_TRY(balloc(b, &b->sgu, T * 2 * Is * es, "shared gate|up out", err));
        MOE_TRY(balloc(b, &b->sact, T * Is * es, "shared act", err));
    }
    if (backward) {
        MOE_TRY(balloc(b, &b->dA0, M * I * es, "dA0", err));
        MOE_TRY(balloc(b, &b->dgu, M * 2 * I * es, "d gate|up", err));
        MOE_TRY(balloc(b, &b->dxs, M * H * es, "dXs", err));
        MOE_TRY(balloc(b, (void **)&b->dtop, M * sizeof(float), "d topk_w", err));
        MOE_TRY(balloc(b, &b->dlogits, T * E * es, "d logits", err));
        MOE_TRY(balloc(b, &b->dx_router, T * H * es, "dx router", err));
        if (b->shared) {
            MOE_TRY(balloc(b, &b->dx_shared, T * H * es, "dx shared", err));
            MOE_TRY(balloc(b, &b->dsact, T * Is * es, "shared d act", err));
            MOE_TRY(balloc(b, &b->dsgu, T * 2 * Is * es, "shared d gate|up", err));
        }
    }
    return MOE_OK;
}

moe_status cuda_block_create(const moe_weights *w, int max_T, bool backward, cuda_block **out,
                             moe_error *err)
{
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_create: out is NULL");
    *out = NULL;
    if (!w) return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_create: weights are NULL");
    if (max_T < 1 || (int64_t)max_T * w->cfg.top_k > INT32_MAX)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_create: max_T = %d: need 1 <= "
                        "max_T and max_T*k within int32", max_T);
    MOE_TRY(check_weights(w, err));
    cuda_block *b = moe_calloc(1, sizeof *b, "cuda_block", err);
    if (!b) return MOE_ERR_NOMEM;
    moe_status st = create_inner(b, w, max_T, backward, err);
    if (st != MOE_OK) {
        cuda_block_destroy(b);
        return st;
    }
    *out = b;
    return MOE_OK;
}

void cuda_block_destroy(cuda_block *b)
{
    if (!b) return;
    int prev = -1;
    cudaGetDevice(&prev);
    cudaSetDevice(b->device);
    if (b->s0) cudaStreamSynchronize(b->s0);
    if (b->s1) cudaStreamSynchronize(b->s1);
    if (b->h0) cublasDestroy(b->h0);
    if (b->h1) cublasDestroy(b->h1);
    if (b->ev_fork) cudaEventDestroy(b->ev_fork);
    if (b->ev_join) cudaEventDestroy(b->ev_join);
    if (b->s0 && b->own_s0) cudaStreamDestroy(b->s0);
    if (b->s1) cudaStreamDestroy(b->s1);
    for (int i = b->nallocs - 1; i >= 0; i--) cudaFree(b->allocs[i]);
    cudaGetLastError();
    if (prev >= 0) cudaSetDevice(prev);
    free(b);
}

cudaStream_t cuda_block_stream(const cuda_block *b) { return b->s0; }

moe_status cuda_block_set_stream(cuda_block *b, cudaStream_t stream, moe_error *err)
{
    if (!b) return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_set_stream: block is NULL");
    CUDA_TRY(cudaStreamSynchronize(b->s0), "cuda_block_set_stream: synchronising the old stream");
    if (b->own_s0) CUDA_TRY(cudaStreamDestroy(b->s0), "cudaStreamDestroy");
    b->s0 = stream;
    b->own_s0 = false;
    BLAS_TRY(cublasSetStream(b->h0, stream), "cublasSetStream");
    return MOE_OK;
}

const moe_config *cuda_block_config(const cuda_block *b) { return &b->cfg; }

bool cuda_block_route_was_small(const cuda_block *b) { return b && b->route_small; }
uint32_t *cuda_block_nonfinite_counter(const cuda_block *b) { return b ? b->nonfinite : NULL; }
moe_dtype cuda_block_dtype(const cuda_block *b) { return b->dt; }
void cuda_block_experts(const cuda_block *b, int *expert_begin, int *expert_count)
{
    if (expert_begin) *expert_begin = b->begin;
    if (expert_count) *expert_count = b->El;
}

void cuda_block_set_gemm_config(cuda_block *b, cuda_gemm_stage stage, const moe_kernel_config *cfg)
{
    if (!b || (int)stage < 0 || stage >= CUDA_GEMM_NUM_STAGES) return;
    if (cfg)
        b->gemm_cfg[stage] = *cfg;
    else
        memset(&b->gemm_cfg[stage], 0, sizeof b->gemm_cfg[stage]);
    b->forced[stage] = cfg != NULL;
}

void cuda_block_set_exact_hf_rounding(cuda_block *b, bool on)
{
    if (!b || b->tuning.exact_hf_rounding == on) return;
    b->tuning.exact_hf_rounding = on;
    for (int i = 0; i < CUDA_GEMM_NUM_STAGES; i++) b->tuned_rows[i] = -1; /* tuned picks differ */
}

void cuda_block_expert_weights(const cuda_block *b, const void **w13, const void **w2)
{
    *w13 = b->w13;
    *w2 = b->w2;
}

void cuda_block_set_autotune(cuda_block *b, bool on, const char *cache_path)
{
    if (!b) return;
    b->autotune = on;
    snprintf(b->autotune_cache, sizeof b->autotune_cache, "%s", cache_path ? cache_path : "");
    for (int i = 0; i < CUDA_GEMM_NUM_STAGES; i++) b->tuned_rows[i] = -1;
}

/* The configuration a stage runs with: forced, tuned (autotune on), or zeros = the default. */
static moe_status stage_config(cuda_block *b, cuda_gemm_stage stage,
                               const moe_grouped_gemm_args *a,
                               const moe_grouped_gemm_dw_args *dw, moe_error *err)
{
    if (b->forced[stage] || !b->autotune) return MOE_OK;
    int rows = a ? a->max_rows : dw->max_rows;
    if (b->tuned_rows[stage] == rows) {
        b->gemm_cfg[stage] = b->tuned_cfg[stage];
        return MOE_OK;
    }
    const char *cache = b->autotune_cache[0] ? b->autotune_cache : NULL;
    moe_kernel_config cfg;
    moe_status st = a ? moe_autotune_pick(cache, a, &b->tuning, b->s0, &cfg, err)
                      : moe_autotune_pick_dw(cache, dw, &b->tuning, b->s0, &cfg, err);
    if (st != MOE_OK) return st;
    b->tuned_cfg[stage] = b->gemm_cfg[stage] = cfg;
    b->tuned_rows[stage] = rows;
    return MOE_OK;
}

const moe_kernel_report *cuda_block_gemm_report(const cuda_block *b, cuda_gemm_stage stage)
{
    if (!b || (int)stage < 0 || stage >= CUDA_GEMM_NUM_STAGES) return NULL;
    return &b->gemm_report[stage];
}

/* ---- helpers ---- */

moe_status cuda_block_sync(cuda_block *b, moe_error *err)
{
    CUDA_TRY(cudaStreamSynchronize(b->s1), "cuda_block_sync (shared-expert stream)");
    CUDA_TRY(cudaStreamSynchronize(b->s0), "cuda_block_sync (main stream)");
    return MOE_OK;
}

moe_status cuda_block_upload(cuda_block *b, void *dst_dev, const void *src_host, size_t bytes,
                             moe_error *err)
{
    if (bytes == 0) return MOE_OK;
    CUDA_TRY(cudaMemcpyAsync(dst_dev, src_host, bytes, cudaMemcpyHostToDevice, b->s0),
             "cuda_block_upload");
    CUDA_TRY(cudaStreamSynchronize(b->s0), "cuda_block_upload");
    return MOE_OK;
}

moe_status cuda_block_download(cuda_block *b, void *dst_host, const void *src_dev, size_t bytes,
                               moe_error *err)
{
    if (bytes == 0) return MOE_OK;
    CUDA_TRY(cudaStreamSynchronize(b->s0), "cuda_block_download (waiting for the block)");
    CUDA_TRY(cudaMemcpyAsync(dst_host, src_dev, bytes, cudaMemcpyDeviceToHost, b->s0),
             "cuda_block_download");
    CUDA_TRY(cudaStreamSynchronize(b->s0), "cuda_block_download");
    return MOE_OK;
}

/* ---- forward state ---- */

moe_status cuda_fwd_state_alloc(const cuda_block *b, int T, bool for_backward, moe_fwd_state *st,
                                moe_error *err)
{
    if (!b || !st) return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_fwd_state_alloc: NULL argument");
    if (T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_fwd_state_alloc: T = %d < 0", T);
    memset(st, 0, sizeof *st);
    const size_t es = esz(b), t = (size_t)T, M = t * b->k;
    struct {
        void **p;
        size_t bytes;
        const char *what;
    } bufs[] = {
        {&st->router_logits, t * b->E * es, "router_logits"},
        {(void **)&st->topk_ids, M * 4, "topk_ids"},
        {&st->topk_w, M * es, "topk_w"},
        {(void **)&st->token_counts, (size_t)b->E * 4, "token_counts"},
        {(void **)&st->expert_offsets, (size_t)(b->E + 1) * 4, "expert_offsets"},
        {(void **)&st->gather_idx, M * 4, "gather_idx"},
        {&st->act, M * b->I * es, "act"},
        {&st->gemm2_out, M * b->H * es, "gemm2_out"},
        {&st->out, t * b->H * es, "out"},
        {for_backward ? &st->gemm1_out : NULL, M * 2 * b->I * es, "gemm1_out"},
        {b->shared ? &st->shared_out : NULL, t * b->H * es, "shared_out"},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        if (!bufs[i].p) continue;
        moe_status s = cuda_dev_alloc(bufs[i].p, bufs[i].bytes, bufs[i].what, err);
        if (s != MOE_OK) {
            cuda_fwd_state_free(st);
            return s;
        }
    }
    st->T = T;
    return MOE_OK;
}

void cuda_fwd_state_free(moe_fwd_state *st)
{
    if (!st) return;
    void *all[] = {st->router_logits, st->topk_ids, st->topk_w, st->token_counts,
                   st->expert_offsets, st->gather_idx, st->gemm1_out, st->act, st->gemm2_out,
                   st->shared_out, st->out};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) cuda_dev_free(all[i]);
    memset(st, 0, sizeof *st);
}

/* Copy the buffers non-NULL in both states, sized for T tokens, in direction `kind`. */
static moe_status state_copy(cuda_block *b, moe_fwd_state *dev, moe_fwd_state *host, int T,
                             enum cudaMemcpyKind kind, const char *who, moe_error *err)
{
    const size_t es = esz(b), t = (size_t)T, M = t * b->k;
    struct {
        void *h;
        void *d;
        size_t bytes;
    } c[] = {
        {host->router_logits, dev->router_logits, t * b->E * es},
        {host->topk_ids, dev->topk_ids, M * 4},
        {host->topk_w, dev->topk_w, M * es},
        {host->token_counts, dev->token_counts, (size_t)b->El * 4},
        {host->expert_offsets, dev->expert_offsets, (size_t)(b->El + 1) * 4},
        {host->gather_idx, dev->gather_idx, M * 4},
        {host->gemm1_out, dev->gemm1_out, M * 2 * b->I * es},
        {host->act, dev->act, M * b->I * es},
        {host->gemm2_out, dev->gemm2_out, M * b->H * es},
        {host->shared_out, dev->shared_out, t * b->H * es},
        {host->out, dev->out, t * b->H * es},
    };
    CUDA_TRY(cudaStreamSynchronize(b->s0), who);
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        if (!c[i].h || !c[i].d || c[i].bytes == 0) continue;
        if (kind == cudaMemcpyDeviceToHost)
            CUDA_TRY(cudaMemcpyAsync(c[i].h, c[i].d, c[i].bytes, kind, b->s0), who);
        else
            CUDA_TRY(cudaMemcpyAsync(c[i].d, c[i].h, c[i].bytes, kind, b->s0), who);
    }
    CUDA_TRY(cudaStreamSynchronize(b->s0), who);
    return MOE_OK;
}

moe_status cuda_fwd_state_download(cuda_block *b, const moe_fwd_state *dev, moe_fwd_state *host,
                                   moe_error *err)
{
    if (!b || !dev || !host)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_fwd_state_download: NULL argument");
    if (dev->T < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_fwd_state_download: T = %d", dev->T);
    MOE_TRY(state_copy(b, (moe_fwd_state *)dev, host, dev->T, cudaMemcpyDeviceToHost,
                       "cuda_fwd_state_download", err));
    host->T = dev->T;
    return MOE_OK;
}

moe_status cuda_fwd_state_upload(cuda_block *b, const moe_fwd_state *host, moe_fwd_state *dev,
                                 moe_error *err)
{
    if (!b || !dev || !host)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_fwd_state_upload: NULL argument");
    if (host->T < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_fwd_state_upload: T = %d", host->T);
    MOE_TRY(state_copy(b, dev, (moe_fwd_state *)host, host->T, cudaMemcpyHostToDevice,
                       "cuda_fwd_state_upload", err));
    dev->T = host->T;
    return MOE_OK;
}

/* ---- forward ---- */

static moe_status run_gemm(cuda_block *b, cuda_gemm_stage stage, const moe_grouped_gemm_args *a,
                           moe_error *err)
{
    moe_status st = stage_config(b, stage, a, NULL, err);
    if (st == MOE_OK)
        st = moe_grouped_gemm_launch(a, &b->gemm_cfg[stage], &b->tuning, b->s0,
                                     &b->gemm_report[stage], err);
    if (st != MOE_OK) moe_error_prefix(err, "cuda_block grouped GEMM stage %d", (int)stage);
    return st;
}

static moe_status run_gemm_dw(cuda_block *b, cuda_gemm_stage stage,
                              const moe_grouped_gemm_dw_args *a, moe_error *err)
{
    moe_status st = stage_config(b, stage, NULL, a, err);
    if (st == MOE_OK)
        st = moe_grouped_gemm_dw_launch(a, &b->gemm_cfg[stage], &b->tuning, b->s0,
                                        &b->gemm_report[stage], err);
    if (st != MOE_OK) moe_error_prefix(err, "cuda_block grouped dW stage %d", (int)stage);
    return st;
}

static moe_status check_call(const char *who, cuda_block *b, const void *x, int T, moe_error *err)
{
    if (!b) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: block is NULL", who);
    if (T < 0 || T > b->max_T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T = %d outside [0, max_T = %d] of the block",
                        who, T, b->max_T);
    if (T > 0 && !x) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: x is NULL", who);
    int cur = -1;
    CUDA_TRY(cudaGetDevice(&cur), who);
    if (cur != b->device) CUDA_TRY(cudaSetDevice(b->device), who);
    return MOE_OK;
}

/* Record phase boundary i of the forward on s0 when markers are set (bench's phase breakdown). */
static moe_status mark_phase(cuda_block *b, int i, moe_error *err)
{
    if (b->phase_ev) CUDA_TRY(cudaEventRecord(b->phase_ev[i], b->s0), "phase event");
    return MOE_OK;
}

void cuda_block_set_phase_events(cuda_block *b, cudaEvent_t *events)
{
    if (b) b->phase_ev = events;
}

/* MOE_ROUTE_SMALL=1: batches of up to MOE_ROUTE_SMALL_MAX_T tokens route in one launch
 * (moe_cuda_route_small) instead of five; off by default: measured faster only at T <= 2
 * (docs/PERF.md, round 6). */
static bool route_small_wanted(void)
{
    const char *v = getenv("MOE_ROUTE_SMALL");
    return v && strcmp(v, "1") == 0;
}

static moe_status route_into(cuda_block *b, const void *x, int T, void *logits, int32_t *ids,
                             void *w, int32_t *counts, int32_t *offsets, int32_t *gather,
                             moe_error *err)
{
    b->route_small = route_small_wanted() && moe_cuda_route_small_fits(&b->cfg, T, b->El);
    if (b->route_small) {
        MOE_TRY(moe_cuda_route_small(&b->cfg, b->dt, T, x, b->router, logits, ids, w, b->begin,
                                     b->El, counts, offsets, gather, b->route_counter, b->nonfinite,
                                     b->s0, err));
        MOE_TRY(mark_phase(b, 1, err)); /* routing and sorting are one launch: permute is empty */
        return mark_phase(b, 2, err);
    }
    /* logits [T,E] = x [T,H] @ router [E,H]^T, written in the activation dtype (rounded, as HF
     * rounds the router logits before top-k). */
    MOE_TRY(blas_gemm(b->h0, b->dt, T, b->E, b->H, x, b->H, false, b->router, b->H, false, logits,
                      b->E, 0.0f, "router GEMM", err));
    MOE_TRY(moe_cuda_route_topk(&b->cfg, b->dt, T, logits, ids, w, b->nonfinite, b->s0, err));
    MOE_TRY(mark_phase(b, 1, err));
    MOE_TRY(moe_cuda_sort_by_expert(T, b->k, ids, b->begin, b->El, counts, offsets, gather,
                                    b->sort_scratch, b->sort_scratch_bytes, b->s0, err));
    return mark_phase(b, 2, err);
}

moe_status cuda_block_route(cuda_block *b, const void *x, int T, moe_fwd_state *st,
                            moe_error *err)
{
    static const char who[] = "cuda_block_route";
    MOE_TRY(check_call(who, b, x, T, err));
    if (!st || !st->router_logits || !st->topk_ids || !st->topk_w || !st->token_counts ||
        !st->expert_offsets || !st->gather_idx)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state or one of its routing buffers "
                        "(router_logits, topk_ids, topk_w, token_counts, expert_offsets, "
                        "gather_idx) is NULL", who);
    if (T == 0) return MOE_OK;
    return route_into(b, x, T, st->router_logits, st->topk_ids, st->topk_w, st->token_counts,
                      st->expert_offsets, st->gather_idx, err);
}

/* Shared expert forward on s1: sgu [T,2Is] = x @ [Wsg;Wsu]^T, sact = silu(g)*u,
 * out [T,H] = sact @ Wsd^T (out NULL: stop after sact). */
static moe_status shared_forward(cuda_block *b, const void *x, int T, void *out, moe_error *err)
{
    const int H = b->H, Is = b->Is;
    MOE_TRY(blas_gemm(b->h1, b->dt, T, 2 * Is, H, x, H, false, b->shared_gu, H, false, b->sgu,
                      2 * Is, 0.0f, "shared gate|up GEMM", err));
    MOE_TRY(moe_cuda_silu_mul(b->dt, T, Is, b->sgu, b->sact, b->s1, err));
    if (out)
        MOE_TRY(blas_gemm(b->h1, b->dt, T, H, Is, b->sact, Is, false, b->shared_down, Is, false,
                          out, H, 0.0f, "shared down GEMM", err));
    return MOE_OK;
}

moe_status cuda_block_forward(cuda_block *b, const void *x, int T, moe_fwd_state *st,
                              bool want_intermediates, moe_error *err)
{
    static const char who[] = "cuda_block_forward";
    MOE_TRY(check_call(who, b, x, T, err));
    if (!st) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state is NULL", who);
    if (st->T != T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state is for T = %d, called with T = %d "
                        "(set st->T when reusing a larger state)", who, st->T, T);
    if (!st->out) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state buffer out is NULL", who);
    if (want_intermediates && !st->gemm1_out)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: want_intermediates needs st->gemm1_out "
                        "(allocate the state for backward)", who);
    if (T == 0) return MOE_OK;

    void *logits = st->router_logits ? st->router_logits : b->logits;
    int32_t *ids = st->topk_ids ? st->topk_ids : b->topk_ids;
    void *w = st->topk_w ? st->topk_w : b->topk_w;
    int32_t *counts = st->token_counts ? st->token_counts : b->counts;
    int32_t *offsets = st->expert_offsets ? st->expert_offsets : b->offsets;
    int32_t *gather = st->gather_idx ? st->gather_idx : b->gather;
    void *act = st->act ? st->act : b->act;
    void *y = st->gemm2_out ? st->gemm2_out : b->gemm2_out;
    void *shared_out = st->shared_out ? st->shared_out : b->shared_out;
    const int H = b->H, I = b->I, k = b->k;
    const size_t flat = (size_t)T * k;

    /* Fork: the shared expert needs only x, so it overlaps routing and the routed GEMMs. */
    if (b->shared) {
        CUDA_TRY(cudaEventRecord(b->ev_fork, b->s0), "fork event");
        CUDA_TRY(cudaStreamWaitEvent(b->s1, b->ev_fork, 0), "fork wait");
        MOE_TRY(shared_forward(b, x, T, shared_out, err));
        CUDA_TRY(cudaEventRecord(b->ev_join, b->s1), "join event");
    }
    b->last_x = NULL; /* sgu/sact now belong to this call */
    b->last_T = -1;

    MOE_TRY(mark_phase(b, 0, err));
    MOE_TRY(route_into(b, x, T, logits, ids, w, counts, offsets, gather, err));

    moe_grouped_gemm_args g1 = {
        .dtype = b->dt, .num_experts = b->El, .expert_offsets = offsets, .N = 2 * I, .K = H,
        .max_rows = (int)flat, .topk = k, .gather_idx = gather, .A = x, .B = b->w13,
        .b_kn = false, .C = act, .C_preact = want_intermediates ? st->gemm1_out : NULL,
        .permute_x = true, .scale_a_rows = b->llama ? w : NULL, .epilogue = MOE_EPI_SILU_MUL,
    };
    MOE_TRY(run_gemm(b, CUDA_GEMM_FWD1, &g1, err));
    MOE_TRY(mark_phase(b, 3, err)); /* SiLU-and-mul is GEMM1's epilogue: the act phase is empty */
    MOE_TRY(mark_phase(b, 4, err));
    /* Flat rows of experts held elsewhere are zero, as on the CPU (they are not summed either
     * way; the zeros keep gemm2_out comparable in the correctness mode). */
    if (b->El < b->E)
        CUDA_TRY(cudaMemsetAsync(y, 0, flat * H * esz(b), b->s0), "zeroing gemm2_out");
    moe_grouped_gemm_args g2 = {
        .dtype = b->dt, .num_experts = b->El, .expert_offsets = offsets, .N = H, .K = I,
        .max_rows = (int)flat, .topk = k, .gather_idx = gather, .A = act, .B = b->w2,
        .b_kn = false, .C = y, .permute_y = true, .scale_c_rows = b->llama ? NULL : w,
        .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(run_gemm(b, CUDA_GEMM_FWD2, &g2, err));
    MOE_TRY(mark_phase(b, 5, err));

    if (b->shared) CUDA_TRY(cudaStreamWaitEvent(b->s0, b->ev_join, 0), "join wait");
    MOE_TRY(moe_cuda_sum_topk(b->dt, T, k, H, y, NULL, b->shared ? shared_out : NULL, NULL, NULL,
                              0, 0, st->out, b->s0, err));
    MOE_TRY(mark_phase(b, 6, err));
    b->last_x = x;
    b->last_T = T;
    return MOE_OK;
}

/* ---- gradients ---- */

moe_status cuda_block_grads_alloc(const cuda_block *b, cuda_block_grads *g, moe_error *err)
{
    if (!b || !g) return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_grads_alloc: NULL argument");
    memset(g, 0, sizeof *g);
    const size_t es = esz(b), H = b->H, I = b->I, Is = b->Is;
    moe_status s;
    if ((s = cuda_dev_alloc(&g->router, (size_t)b->E * H * es, "d router", err)) != MOE_OK ||
        (s = cuda_dev_alloc(&g->w13, (size_t)b->El * 2 * I * H * es, "d w13", err)) != MOE_OK ||
        (s = cuda_dev_alloc(&g->w2, (size_t)b->El * H * I * es, "d w2", err)) != MOE_OK ||
        (b->shared &&
         ((s = cuda_dev_alloc(&g->shared_gate, Is * H * es, "d shared_gate", err)) != MOE_OK ||
          (s = cuda_dev_alloc(&g->shared_up, Is * H * es, "d shared_up", err)) != MOE_OK ||
          (s = cuda_dev_alloc(&g->shared_down, H * Is * es, "d shared_down", err)) != MOE_OK))) {
        cuda_block_grads_free(g);
        return s;
    }
    return MOE_OK;
}

void cuda_block_grads_free(cuda_block_grads *g)
{
    if (!g) return;
    cuda_dev_free(g->router);
    cuda_dev_free(g->w13);
    cuda_dev_free(g->w2);
    cuda_dev_free(g->shared_gate);
    cuda_dev_free(g->shared_up);
    cuda_dev_free(g->shared_down);
    memset(g, 0, sizeof *g);
}

static moe_status grad_copy(cuda_block *b, moe_tensor *t, const void *src, size_t bytes,
                            const char *name, moe_error *err)
{
    if (!t->data || t->dtype != b->dt || moe_tensor_numel(t) * moe_dtype_size(t->dtype) != bytes)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_grads_download: host tensor %s is "
                        "missing or not %zu bytes of %s", name, bytes, moe_dtype_name(b->dt));
    CUDA_TRY(cudaMemcpy(t->data, src, bytes, cudaMemcpyDeviceToHost), name);
    return MOE_OK;
}

moe_status cuda_block_grads_download(cuda_block *b, const cuda_block_grads *g, moe_weights *host,
                                     moe_error *err)
{
    if (!b || !g || !host)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "cuda_block_grads_download: NULL argument");
    CUDA_TRY(cudaStreamSynchronize(b->s0), "cuda_block_grads_download (waiting for the block)");
    const size_t es = esz(b), H = b->H, I = b->I, Is = b->Is;
    MOE_TRY(grad_copy(b, &host->router, g->router, (size_t)b->E * H * es, "router", err));
    MOE_TRY(grad_copy(b, &host->w13, g->w13, (size_t)b->El * 2 * I * H * es, "w13", err));
    MOE_TRY(grad_copy(b, &host->w2, g->w2, (size_t)b->El * H * I * es, "w2", err));
    if (b->shared) {
        MOE_TRY(grad_copy(b, &host->shared_gate, g->shared_gate, Is * H * es, "shared_gate", err));
        MOE_TRY(grad_copy(b, &host->shared_up, g->shared_up, Is * H * es, "shared_up", err));
        MOE_TRY(grad_copy(b, &host->shared_down, g->shared_down, H * Is * es, "shared_down", err));
    }
    return MOE_OK;
}

/* ---- backward ---- */

void cuda_block_bwd_state(const cuda_block *b, cuda_bwd_state *out)
{
    memset(out, 0, sizeof *out);
    if (!b || !b->backward) return;
    out->dA0 = b->dA0;
    out->dgu = b->dgu;
    out->dxs = b->dxs;
    out->dtop = b->dtop;
    out->dlogits = b->dlogits;
    out->dx_router = b->dx_router;
    out->dx_shared = b->dx_shared;
}

/* Shared expert backward on s1 (see the file comment). dx_shared [T,H] gets its dx term. */
static moe_status shared_backward(cuda_block *b, const void *x, int T, const void *dout,
                                  const cuda_block_grads *g, moe_error *err)
{
    const int H = b->H, Is = b->Is;
    if (b->last_x != x || b->last_T != T) { /* recompute the forward's gate|up and act */
        MOE_TRY(shared_forward(b, x, T, NULL, err));
        b->last_x = x;
        b->last_T = T;
    }
    /* dsact [T,Is] = dout [T,H] @ Wsd [H,Is] */
    MOE_TRY(blas_gemm(b->h1, b->dt, T, Is, H, dout, H, false, b->shared_down, Is, true, b->dsact,
                      Is, 0.0f, "shared d act GEMM", err));
    /* dWsd [H,Is] = dout^T [H,T] @ sact [T,Is] */
    MOE_TRY(blas_gemm(b->h1, b->dt, H, Is, T, dout, H, true, b->sact, Is, true, g->shared_down,
                      Is, 0.0f, "shared d down GEMM", err));
    MOE_TRY(moe_cuda_silu_mul_backward(b->dt, T, NULL, Is, b->sgu, b->dsact, NULL, NULL, NULL,
                                       NULL, b->dsgu, b->s1, err));
    /* dWsg [Is,H] = dsgu[:, :Is]^T @ x, dWsu = dsgu[:, Is:]^T @ x (row stride 2Is) */
    MOE_TRY(blas_gemm(b->h1, b->dt, Is, H, T, b->dsgu, 2 * Is, true, x, H, true, g->shared_gate,
                      H, 0.0f, "shared d gate GEMM", err));
    MOE_TRY(blas_gemm(b->h1, b->dt, Is, H, T, (const char *)b->dsgu + (size_t)Is * esz(b), 2 * Is,
                      true, x, H, true, g->shared_up, H, 0.0f, "shared d up GEMM", err));
    /* dx_shared [T,H] = dsgu [T,2Is] @ [Wsg; Wsu] [2Is,H] */
    MOE_TRY(blas_gemm(b->h1, b->dt, T, H, 2 * Is, b->dsgu, 2 * Is, false, b->shared_gu, H, true,
                      b->dx_shared, H, 0.0f, "shared dx GEMM", err));
    return MOE_OK;
}

moe_status cuda_block_backward(cuda_block *b, const void *x, int T, const moe_fwd_state *st,
                               const void *dout, void *dx, const cuda_block_grads *grads,
                               moe_error *err)
{
    static const char who[] = "cuda_block_backward";
    MOE_TRY(check_call(who, b, x, T, err));
    if (!b->backward)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: the block was created without backward "
                        "scratch (cuda_block_create(..., backward = true))", who);
    if (!st) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state is NULL", who);
    if (st->T != T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state is for T = %d, called with T = %d",
                        who, st->T, T);
    const char *missing = !st->router_logits ? "router_logits" : !st->topk_ids ? "topk_ids"
                        : !st->topk_w ? "topk_w" : !st->expert_offsets ? "expert_offsets"
                        : !st->gather_idx ? "gather_idx" : !st->gemm1_out
                        ? "gemm1_out (run the forward with want_intermediates)" : !st->act ? "act"
                        : NULL;
    if (missing)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state buffer %s is NULL", who, missing);
    if (!grads || !grads->router || !grads->w13 || !grads->w2 ||
        (b->shared && (!grads->shared_gate || !grads->shared_up || !grads->shared_down)))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: grads or one of its tensors is NULL", who);
    const int H = b->H, I = b->I, E = b->E, k = b->k, El = b->El;
    const size_t es = esz(b), flat = (size_t)T * k;
    if (T == 0) {
        /* No tokens: every gradient is zero. */
        CUDA_TRY(cudaMemsetAsync(grads->router, 0, (size_t)E * H * es, b->s0), who);
        CUDA_TRY(cudaMemsetAsync(grads->w13, 0, (size_t)El * 2 * I * H * es, b->s0), who);
        CUDA_TRY(cudaMemsetAsync(grads->w2, 0, (size_t)El * H * I * es, b->s0), who);
        if (b->shared) {
            const size_t n = (size_t)b->Is * H * es;
            CUDA_TRY(cudaMemsetAsync(grads->shared_gate, 0, n, b->s0), who);
            CUDA_TRY(cudaMemsetAsync(grads->shared_up, 0, n, b->s0), who);
            CUDA_TRY(cudaMemsetAsync(grads->shared_down, 0, n, b->s0), who);
        }
        return MOE_OK;
    }
    if (!dout || !dx)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: %s is NULL", who, !dout ? "dout" : "dx");

    if (b->shared) {
        CUDA_TRY(cudaEventRecord(b->ev_fork, b->s0), "fork event");
        CUDA_TRY(cudaStreamWaitEvent(b->s1, b->ev_fork, 0), "fork wait");
        MOE_TRY(shared_backward(b, x, T, dout, grads, err));
        CUDA_TRY(cudaEventRecord(b->ev_join, b->s1), "join event");
    }

    const bool qwen = !b->llama;
    const int32_t *m_dev = st->expert_offsets + El; /* rows kept, on the device */
    /* Flat rows of other ranks' experts never get a weight gradient: zero, not stale. */
    CUDA_TRY(cudaMemsetAsync(b->dtop, 0, flat * sizeof(float), b->s0), "zeroing d topk_w");

    /* dA0 [M,I] = dout[token of r] @ W2_e ([H,I] read as [K,N]). */
    moe_grouped_gemm_args gA = {
        .dtype = b->dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = I, .K = H,
        .max_rows = (int)flat, .topk = k, .gather_idx = st->gather_idx, .A = dout, .B = b->w2,
        .b_kn = true, .C = b->dA0, .permute_x = true, .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(run_gemm(b, CUDA_GEMM_BWD_DA, &gA, err));
    /* SiLU-and-mul backward; Qwen3: dact = round(w dA0) and dw_f = act_r . dA0_r fused in. */
    MOE_TRY(moe_cuda_silu_mul_backward(b->dt, (int)flat, m_dev, I, st->gemm1_out, b->dA0,
                                       qwen ? st->topk_w : NULL, st->gather_idx, st->act,
                                       qwen ? b->dtop : NULL, b->dgu, b->s0, err));
    /* dW2_e [H,I] = sum_r (w_f dout_t)^T act_r */
    moe_grouped_gemm_dw_args dW2 = {
        .dtype = b->dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = H, .K = I,
        .max_rows = (int)flat, .topk = k, .gather_idx = st->gather_idx, .dY = dout,
        .permute_dy = true, .scale_dy_rows = qwen ? st->topk_w : NULL, .X = st->act,
        .dW = grads->w2,
    };
    MOE_TRY(run_gemm_dw(b, CUDA_GEMM_DW2, &dW2, err));
    /* dXs [T*k,H] flat = dgu_r @ W13_e ([2I,H] read as [K,N]), stored at gather[r]. */
    moe_grouped_gemm_args gX = {
        .dtype = b->dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = H,
        .K = 2 * I, .max_rows = (int)flat, .topk = k, .gather_idx = st->gather_idx, .A = b->dgu,
        .B = b->w13, .b_kn = true, .C = b->dxs, .permute_y = true, .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(run_gemm(b, CUDA_GEMM_BWD_DX, &gX, err));
    /* dW13_e [2I,H] = sum_r dgu_r^T xs_r (Llama-4: xs = round(x_t s_f)) */
    moe_grouped_gemm_dw_args dW13 = {
        .dtype = b->dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = 2 * I,
        .K = H, .max_rows = (int)flat, .topk = k, .gather_idx = st->gather_idx, .dY = b->dgu,
        .X = x, .permute_x = true, .scale_x_rows = b->llama ? st->topk_w : NULL,
        .dW = grads->w13,
    };
    MOE_TRY(run_gemm_dw(b, CUDA_GEMM_DW13, &dW13, err));
    /* The filter skips flat rows of experts held elsewhere (their dXs rows are unwritten). */
    const int32_t *filter = El < E ? st->topk_ids : NULL;
    if (b->llama) /* ds_f = x_t . dXs_f */
        MOE_TRY(moe_cuda_row_dot(b->dt, (int)flat, H, x, k, b->dxs, filter, b->begin, El, b->dtop,
                                 b->s0, err));
    MOE_TRY(moe_cuda_router_backward(&b->cfg, b->dt, T, st->router_logits, st->topk_ids, b->dtop,
                                     b->dlogits, b->s0, err));
    /* d_router [E,H] = dlogits^T [E,T] @ x [T,H]; dx_router [T,H] = dlogits [T,E] @ router [E,H] */
    MOE_TRY(blas_gemm(b->h0, b->dt, E, H, T, b->dlogits, E, true, x, H, true, grads->router, H,
                      0.0f, "d router GEMM", err));
    MOE_TRY(blas_gemm(b->h0, b->dt, T, H, E, b->dlogits, E, false, b->router, H, true,
                      b->dx_router, H, 0.0f, "dx router GEMM", err));
    if (b->shared) CUDA_TRY(cudaStreamWaitEvent(b->s0, b->ev_join, 0), "join wait");
    /* dx = round(dx_router + dx_shared + sum_j (s_f) dXs_f) */
    MOE_TRY(moe_cuda_sum_topk(b->dt, T, k, H, b->dxs, b->llama ? st->topk_w : NULL, b->dx_router,
                              b->shared ? b->dx_shared : NULL, filter, b->begin, El, dx, b->s0,
                              err));
    return MOE_OK;
}
