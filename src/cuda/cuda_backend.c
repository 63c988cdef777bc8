/* cuda_backend.c — the layer's operations on a CUDA GPU (layer.h's moe_layer_backend_ops),
 * part 1: the backend state (streams, events, cuBLAS handles, the grouped GEMMs' configuration
 * and autotuning), the weights placed on the device once, memory and stream plumbing, routing,
 * the experts' forward, the sum over k and the shared expert's forward. The backward
 * operations, the EP operations and the error query are in cuda_backend_bwd.c.
 *
 * Streams. Every operation runs on the call's main stream (L->stream: the caller's, or the
 * layer's own for host-memory calls); Llama-4's shared expert runs on the layer's side stream
 * between fork() (side waits for main) and join() (main waits for side). Nothing here waits for
 * the device except the documented synchronous operations (upload, download, sync), so a
 * forward on one rank (and the sync-free EP paths) can be captured into a CUDA graph.
 *
 * Determinism: the kernels use fixed reduction orders and no floating-point atomics, and cuBLAS
 * runs with a fixed workspace and no reduced-precision split-K, so the same inputs give the
 * same bits run after run on one GPU. */
#ifdef MOE_HAVE_CUDA

#include "cuda_backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autotune.h"
#include "kernel_config.h"

#define CUBLAS_WS_BYTES ((size_t)32 << 20) /* cuBLAS's recommended workspace on Hopper */

const char *cb_blas_str(cublasStatus_t s)
{
    const char *n = cublasGetStatusString(s);
    return n ? n : "unknown cuBLAS status";
}

static cudaDataType_t blas_type(moe_dtype dt)
{
    return dt == MOE_DTYPE_BF16 ? CUDA_R_16BF : dt == MOE_DTYPE_F16 ? CUDA_R_16F : CUDA_R_32F;
}

moe_status cb_gemm(moe_layer *L, bool side, moe_dtype cdt, int M, int N, int K, const void *A,
                   int lda, bool a_km, const void *B, int ldb, bool b_kn, void *C, int ldc,
                   const char *what, moe_error *err)
{
    if (M == 0 || N == 0) return MOE_OK;
    cuda_state *s = L->be;
    cublasHandle_t h = side ? s->h_side : s->h_main;
    if (!side) CB_BLAS(cublasSetStream(h, cb_main(L)), "cublasSetStream");
    if (K == 0) {
        /* an empty sum: cuBLAS leaves C alone, the product is zero */
        CB_CUDA(cudaMemsetAsync(C, 0, (size_t)M * ldc * moe_dtype_size(cdt),
                                side ? s->side : cb_main(L)), what);
        return MOE_OK;
    }
    const float alpha = 1.0f, beta = 0.0f;
    cudaDataType_t t = blas_type(L->dt);
    /* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T. */
    CB_BLAS(cublasGemmEx(h, b_kn ? CUBLAS_OP_N : CUBLAS_OP_T, a_km ? CUBLAS_OP_T : CUBLAS_OP_N, N,
                         M, K, &alpha, B, t, ldb, A, t, lda, &beta, C, blas_type(cdt), ldc,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            what);
    return MOE_OK;
}

static moe_status blas_handle(cublasHandle_t *h, void **ws, cudaStream_t st, moe_error *err)
{
    CB_BLAS(cublasCreate(h), "cublasCreate");
    CB_BLAS(cublasSetStream(*h, st), "cublasSetStream");
    /* No TF32 for fp32 (CUBLAS_COMPUTE_32F with the default math mode never uses it), and no
     * reduced-precision split-K reductions for bf16/fp16 outputs. */
    CB_BLAS(cublasSetMathMode(*h, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
                                                 CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
            "cublasSetMathMode");
    /* A fixed, user-provided workspace: deterministic algorithm choice across runs and no
     * allocation inside a captured graph. */
    CB_CUDA(cudaMalloc(ws, CUBLAS_WS_BYTES), "cuBLAS workspace");
    CB_BLAS(cublasSetWorkspace(*h, *ws, CUBLAS_WS_BYTES), "cublasSetWorkspace");
    return MOE_OK;
}

/* ------------------------------------------------------------------ the state ---- */

static moe_status dev_put(void **dst, const void *src, size_t bytes, const char *what,
                          moe_error *err)
{
    if (!*dst) CB_CUDA(cudaMalloc(dst, bytes ? bytes : 16), what);
    if (bytes) CB_CUDA(cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice), what);
    return MOE_OK;
}

static moe_status cb_place(moe_layer *L, moe_error *err)
{
    cuda_state *s = L->be;
    CB_CUDA(cudaSetDevice(L->device), "cudaSetDevice");
    const size_t es = L->dsz, H = (size_t)L->H, I = (size_t)L->I, El = (size_t)L->map.El;
    if (L->borrowed) {
        /* read in place: the caller's memory must be this GPU's */
        const void *p[3] = {L->w.router, L->w.w13, L->w.w2};
        for (int i = 0; i < 3; i++) {
            struct cudaPointerAttributes a;
            if (cudaPointerGetAttributes(&a, p[i]) != cudaSuccess ||
                (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) ||
                a.device != L->device) {
                cudaGetLastError();
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "weights: borrowed tensors of a CUDA layer must be device memory "
                                "of its GPU %d (%s is not)", L->device,
                                i == 0 ? "the router" : i == 1 ? "the gate/up experts"
                                                               : "the down experts");
            }
        }
        L->bytes_resident = 0;
        return MOE_OK;
    }
    MOE_TRY(dev_put(&s->router, L->host.router.data, (size_t)L->E * H * es, "router", err));
    MOE_TRY(dev_put(&s->w13, L->host.w13.data, El * 2 * I * H * es, "w13", err));
    MOE_TRY(dev_put(&s->w2, L->host.w2.data, El * H * I * es, "w2", err));
    L->bytes_resident = ((size_t)L->E * H + El * 3 * I * H) * es;
    if (L->shared) {
        /* gate rows then up rows: one GEMM for both */
        const size_t half = (size_t)L->Is * H * es;
        if (!s->shared_gu) CB_CUDA(cudaMalloc(&s->shared_gu, 2 * half), "shared gate|up");
        CB_CUDA(cudaMemcpy(s->shared_gu, L->host.shared_gate.data, half, cudaMemcpyHostToDevice),
                "shared_gate");
        CB_CUDA(cudaMemcpy((char *)s->shared_gu + half, L->host.shared_up.data, half,
                           cudaMemcpyHostToDevice), "shared_up");
        MOE_TRY(dev_put(&s->shared_down, L->host.shared_down.data, half, "shared_down", err));
        L->bytes_resident += 3 * half;
    }
    L->w.router = s->router;
    L->w.w13 = s->w13;
    L->w.w2 = s->w2;
    L->w.shared_gu = s->shared_gu;
    L->w.shared_down = s->shared_down;
    /* cudaMemcpy from pageable memory may return before its DMA reached the device, and it
     * runs on the legacy stream, which the layer's non-blocking streams do not wait for: the
     * next call's kernels could read old weights. Wait for the device here (creation and
     * reload only). */
    CB_CUDA(cudaDeviceSynchronize(), "placing the weights");
    return MOE_OK;
}

/* MOE_ROUTE_SMALL=1: batches of up to MOE_ROUTE_SMALL_MAX_T tokens route in one launch
 * (moe_cuda_route_small) instead of five; off by default: measured faster only at T <= 2
 * (docs/PERF.md, round 6). Read once, at layer creation (docs/ENV.md). */
static bool route_small_wanted(void)
{
    const char *v = getenv("MOE_ROUTE_SMALL");
    return v && strcmp(v, "1") == 0;
}

static moe_status cb_create(moe_layer *L, moe_error *err)
{
    cuda_state *s = moe_calloc(1, sizeof *s, "CUDA backend state", err);
    if (!s) return MOE_ERR_NOMEM;
    L->be = s;
    CB_CUDA(cudaSetDevice(L->device), "cudaSetDevice");
    CB_CUDA(cudaStreamCreateWithFlags(&s->own, cudaStreamNonBlocking), "cudaStreamCreate");
    CB_CUDA(cudaStreamCreateWithFlags(&s->side, cudaStreamNonBlocking), "cudaStreamCreate");
    L->host_stream = s->own;
    L->stream = s->own;
    CB_CUDA(cudaEventCreateWithFlags(&s->ev_fork, cudaEventDisableTiming), "cudaEventCreate");
    CB_CUDA(cudaEventCreateWithFlags(&s->ev_join, cudaEventDisableTiming), "cudaEventCreate");
    for (int i = 0; i < MOE_NUM_MARKS; i++)
        CB_CUDA(cudaEventCreate(&s->marks[i]), "cudaEventCreate");
    MOE_TRY(blas_handle(&s->h_main, &s->ws_main, s->own, err));
    MOE_TRY(blas_handle(&s->h_side, &s->ws_side, s->side, err));
    /* the device's records: [0] receive overflow flag, [1] most rows seen, [2] tokens with
     * non-finite router logits */
    CB_CUDA(cudaMalloc((void **)&s->d_status, 4 * sizeof(int32_t)), "status flags");
    CB_CUDA(cudaMemset(s->d_status, 0, 4 * sizeof(int32_t)), "status flags");
    CB_CUDA(cudaMalloc((void **)&s->route_counter, sizeof(int)), "route counter");
    CB_CUDA(cudaMemset(s->route_counter, 0, sizeof(int)), "route counter");
    s->route_small = route_small_wanted();
    /* the grouped GEMMs: this layer's scheduler counters (its GEMMs run one after the other on
     * its main stream), the exact-rounding choice, a forced configuration or autotuning */
    MOE_TRY(moe_sched_counters_alloc(&s->tuning.sched_counters, s->own, err));
    s->tuning.exact_hf_rounding = L->exact_hf;
    moe_kernel_tuning_apply_env(&s->tuning); /* -DMOE_DIAGNOSTICS=ON builds only */
    for (int g = 0; g < MOE_STATS_NUM_GEMMS; g++) s->tuned_rows[g] = -1;
    if (L->kernel_config[0] && strcmp(L->kernel_config, "auto") != 0) {
        moe_kernel_config c;
        MOE_TRY(moe_kernel_config_parse(L->kernel_config, &c, err));
        MOE_TRY(moe_kernel_config_validate(&c, L->dt, err));
        for (int g = 0; g < MOE_STATS_NUM_GEMMS; g++) s->cfg[g] = c;
        s->forced = true;
    }
    s->autotune = L->autotune;
    snprintf(s->autotune_cache, sizeof s->autotune_cache, "%s", L->autotune_cache);
    MOE_TRY(cb_place(L, err)); /* ends with a device-wide wait: the memsets above (legacy
                                  stream) are done too */
    CB_CUDA(cudaStreamSynchronize(s->own), "layer set-up");
    return MOE_OK;
}

static void cb_destroy(moe_layer *L)
{
    cuda_state *s = L->be;
    if (!s) return;
    int prev = -1;
    cudaGetDevice(&prev);
    cudaSetDevice(L->device);
    if (s->own) cudaStreamSynchronize(s->own);
    if (s->side) cudaStreamSynchronize(s->side);
    if (s->h_main) cublasDestroy(s->h_main);
    if (s->h_side) cublasDestroy(s->h_side);
    cudaEvent_t ev[2] = {s->ev_fork, s->ev_join};
    for (int i = 0; i < 2; i++)
        if (ev[i]) cudaEventDestroy(ev[i]);
    for (int i = 0; i < MOE_NUM_MARKS; i++)
        if (s->marks[i]) cudaEventDestroy(s->marks[i]);
    void *p[] = {s->ws_main, s->ws_side, s->d_status, s->route_counter, s->router, s->w13,
                 s->w2, s->shared_gu, s->shared_down};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        if (p[i]) cudaFree(p[i]);
    moe_sched_counters_free(s->tuning.sched_counters);
    if (s->own) cudaStreamDestroy(s->own);
    if (s->side) cudaStreamDestroy(s->side);
    cudaGetLastError();
    if (prev >= 0) cudaSetDevice(prev);
    free(s);
    L->be = NULL;
}

/* ------------------------------------------------------------------ memory and streams ---- */

static moe_status cb_enter(moe_layer *L, moe_error *err)
{
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != L->device)
        CB_CUDA(cudaSetDevice(L->device), "cudaSetDevice");
    return MOE_OK;
}

/* Wait for the main stream; with NCCL watch the communicator (a dead peer is an asynchronous
 * NCCL error, not a hang). */
static moe_status wait_main(moe_layer *L, moe_error *err)
{
    /* (the transport's sync takes NULL as "its own stream": the legacy stream is named) */
    if (L->ep && L->ep->tp && L->ep->nccl)
        return L->ep->tp->sync(L->ep->tp, L->stream ? L->stream : (void *)cudaStreamLegacy, err);
    CB_CUDA(cudaStreamSynchronize(cb_main(L)), "waiting for the layer's stream");
    return MOE_OK;
}

static moe_status cb_upload(moe_layer *L, void *dst, const void *src, size_t bytes,
                            moe_error *err)
{
    if (!bytes) return MOE_OK;
    CB_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cb_main(L)), "upload");
    return wait_main(L, err);
}

static moe_status cb_download(moe_layer *L, void *dst, const void *src, size_t bytes,
                              moe_error *err)
{
    if (!bytes) return MOE_OK;
    CB_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cb_main(L)), "download");
    return wait_main(L, err);
}

static moe_status cb_copy(moe_layer *L, void *dst, const void *src, size_t bytes, moe_error *err)
{
    if (!bytes || dst == src) return MOE_OK;
    CB_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cb_main(L)), "copy");
    return MOE_OK;
}

static moe_status cb_zero(moe_layer *L, void *p, size_t bytes, moe_error *err)
{
    if (!bytes) return MOE_OK;
    CB_CUDA(cudaMemsetAsync(p, 0, bytes, cb_main(L)), "zeroing a buffer");
    return MOE_OK;
}

static moe_status cb_sync(moe_layer *L, moe_error *err)
{
    cuda_state *s = L->be;
    CB_CUDA(cudaStreamSynchronize(s->side), "waiting for the shared-expert stream");
    MOE_TRY(wait_main(L, err));
    CB_CUDA(cudaGetLastError(), "an earlier launch");
    return MOE_OK;
}

static moe_status cb_fork(moe_layer *L, moe_error *err)
{
    cuda_state *s = L->be;
    CB_CUDA(cudaEventRecord(s->ev_fork, cb_main(L)), "fork event");
    CB_CUDA(cudaStreamWaitEvent(s->side, s->ev_fork, 0), "fork wait");
    return MOE_OK;
}

static moe_status cb_join(moe_layer *L, moe_error *err)
{
    cuda_state *s = L->be;
    CB_CUDA(cudaEventRecord(s->ev_join, s->side), "join event");
    CB_CUDA(cudaStreamWaitEvent(cb_main(L), s->ev_join, 0), "join wait");
    return MOE_OK;
}

static moe_status cb_mark(moe_layer *L, int marker, bool side, moe_error *err)
{
    cuda_state *s = L->be;
    if (marker < 0 || marker >= MOE_NUM_MARKS) return MOE_OK;
    CB_CUDA(cudaEventRecord(s->marks[marker], side ? s->side : cb_main(L)), "timing event");
    s->marked[marker] = true;
    return MOE_OK;
}

static double cb_mark_ms(moe_layer *L, int from, int to)
{
    cuda_state *s = L->be;
    if (from < 0 || to < 0 || from >= MOE_NUM_MARKS || to >= MOE_NUM_MARKS) return -1;
    if (!s->marked[from] || !s->marked[to]) return -1;
    float ms = 0;
    if (cudaEventElapsedTime(&ms, s->marks[from], s->marks[to]) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return ms;
}

/* ------------------------------------------------------------------ grouped GEMMs ---- */

/* The configuration GEMM g runs with: forced, tuned (autotune on; memoised by max_rows), or
 * zeros = the default for the problem. */
static moe_status gemm_config(moe_layer *L, int g, const moe_grouped_gemm_args *a,
                              const moe_grouped_gemm_dw_args *dw, moe_error *err)
{
    cuda_state *s = L->be;
    if (s->forced || !s->autotune) return MOE_OK;
    int rows = a ? a->max_rows : dw->max_rows;
    if (s->tuned_rows[g] == rows) {
        s->cfg[g] = s->tuned[g];
        return MOE_OK;
    }
    const char *cache = s->autotune_cache[0] ? s->autotune_cache : NULL;
    moe_kernel_config c;
    MOE_TRY(a ? moe_autotune_pick(cache, a, &s->tuning, cb_main(L), &c, err)
              : moe_autotune_pick_dw(cache, dw, &s->tuning, cb_main(L), &c, err));
    s->tuned[g] = s->cfg[g] = c;
    s->tuned_rows[g] = rows;
    return MOE_OK;
}

moe_status cb_run_gemm(moe_layer *L, int g, const moe_grouped_gemm_args *a, moe_error *err)
{
    cuda_state *s = L->be;
    moe_status st = gemm_config(L, g, a, NULL, err);
    if (st == MOE_OK)
        st = moe_grouped_gemm_launch(a, &s->cfg[g], &s->tuning, cb_main(L), &s->rep[g], err);
    if (st != MOE_OK) moe_error_prefix(err, "grouped GEMM %d", g);
    return st;
}

moe_status cb_run_gemm_dw(moe_layer *L, int g, const moe_grouped_gemm_dw_args *a,
                          moe_error *err)
{
    cuda_state *s = L->be;
    moe_status st = gemm_config(L, g, NULL, a, err);
    if (st == MOE_OK)
        st = moe_grouped_gemm_dw_launch(a, &s->cfg[g], &s->tuning, cb_main(L), &s->rep[g], err);
    if (st != MOE_OK) moe_error_prefix(err, "grouped dW %d", g);
    return st;
}

moe_status cb_sort(moe_layer *L, int R, int count, const int32_t *ids, int rows_cap,
                   int32_t *counts, int32_t *offs, int32_t *gather, moe_error *err)
{
    const int rc = R > rows_cap ? R : rows_cap;
    const size_t bytes = moe_cuda_sort_scratch_bytes(rc > 0 ? rc : 1, L->k, count > 0 ? count : 1);
    void *scratch;
    MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_SORT, bytes, &scratch, err));
    return moe_cuda_sort_by_expert(R, L->k, ids, 0, count, counts, offs, gather, scratch, bytes,
                                   cb_main(L), err);
}

/* ------------------------------------------------------------------ forward ---- */

/* The routing kernels add the tokens whose router logits hold a NaN or an infinity to status
 * word 2 inside the top-k launch itself (no extra launch, no host read); cb_check_errors
 * reports and clears it. */
static uint32_t *cb_nonfinite(cuda_state *s) { return (uint32_t *)(s->d_status + 2); }

static moe_status cb_route(moe_layer *L, int T, const void *x, void *logits, int32_t *ids,
                           void *w, int32_t *counts, int32_t *offsets, int32_t *gather,
                           moe_error *err)
{
    cuda_state *s = L->be;
    if (T == 0) return MOE_OK;
    L->ctr.route_one_launch = 0;
    if (s->route_small && moe_cuda_route_small_fits(&L->cfg, T, L->E)) {
        /* routing and sorting in one launch: the permute phase is empty. A caller that wants no
         * sort (the plain backward, the EP route) still routes this way, sorting into scratch:
         * this kernel's logits may differ from the router GEMM's in the last bit, so routing
         * the backward with the GEMM would not be the gradient of the forward that ran. */
        const bool sort = counts != NULL;
        if (!sort) {
            const size_t rows = (size_t)(T > L->max_tokens ? T : L->max_tokens);
            MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_COUNTS, ((size_t)L->E + 1) * 4,
                                (void **)&counts, err));
            MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_OFFS, ((size_t)L->E + 1) * 4,
                                (void **)&offsets, err));
            MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_GATHER, rows * L->k * 4, (void **)&gather,
                                err));
        }
        MOE_TRY(moe_cuda_route_small(&L->cfg, L->dt, T, x, L->w.router, logits, ids, w, 0, L->E,
                                     counts, offsets, gather, s->route_counter, cb_nonfinite(s),
                                     cb_main(L), err));
        L->ctr.route_one_launch = 1;
        moe_layer_mark(L, MOE_MARK_ROUTED, false);
        if (sort) moe_layer_mark(L, MOE_MARK_PERMUTED, false);
        return MOE_OK;
    }
    /* logits [T,E] = x [T,H] @ router [E,H]^T, written in the activation dtype (rounded, as HF
     * rounds the router logits before top-k) */
    MOE_TRY(cb_gemm(L, false, L->dt, T, L->E, L->H, x, L->H, false, L->w.router, L->H, false,
                    logits, L->E, "router GEMM", err));
    MOE_TRY(moe_cuda_route_topk(&L->cfg, L->dt, T, logits, ids, w, cb_nonfinite(s), cb_main(L),
                                err));
    moe_layer_mark(L, MOE_MARK_ROUTED, false);
    if (!counts) return MOE_OK;
    MOE_TRY(cb_sort(L, T, L->E, ids, (int)L->max_tokens, counts, offsets, gather, err));
    moe_layer_mark(L, MOE_MARK_PERMUTED, false);
    return MOE_OK;
}

static moe_status cb_experts_forward(moe_layer *L, const moe_experts_args *a, moe_error *err)
{
    const int R = a->R, count = a->count, k = L->k;
    const int rc = R > a->rows_cap ? R : a->rows_cap;
    const size_t rk = (size_t)R * k, rkc = (size_t)rc * k;
    if (a->zero_rows && rk)
        CB_CUDA(cudaMemsetAsync(a->rows, 0, rk * L->H * L->dsz, cb_main(L)), "zeroing flat rows");
    if (R == 0 || count == 0) return MOE_OK;
    int32_t *counts = a->counts, *offs = a->offsets, *gather = a->gather;
    void *act = a->act;
    if (!counts) MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_COUNTS, (size_t)(count + 1) * 4, (void **)&counts, err));
    if (!offs) MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_OFFS, (size_t)(count + 1) * 4, (void **)&offs, err));
    if (!gather) MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_GATHER, rkc * 4, (void **)&gather, err));
    if (!act) MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_ACT, rkc * L->I * L->dsz, &act, err));
    if (!a->presorted) {
        MOE_TRY(cb_sort(L, R, count, a->ids, rc, counts, offs, gather, err));
        moe_layer_mark(L, MOE_MARK_PERMUTED, false);
    }
    /* GEMM1: x rows gathered in the prologue (Llama-4: scaled by the score), SiLU-and-mul in
     * the epilogue (and GEMM1's rounded output when asked) */
    moe_grouped_gemm_args g1 = {
        .dtype = L->dt, .num_experts = count, .expert_offsets = offs, .N = 2 * L->I, .K = L->H,
        .max_rows = (int)rk, .topk = k, .gather_idx = gather, .A = a->x,
        .B = moe_layer_w13(L, a->first), .C = act, .C_preact = a->gemm1_out, .permute_x = true,
        .scale_a_rows = L->llama ? a->w : NULL, .epilogue = MOE_EPI_SILU_MUL,
    };
    MOE_TRY(cb_run_gemm(L, MOE_GEMM_FWD1, &g1, err));
    moe_layer_mark(L, MOE_MARK_GEMM1, false);
    /* GEMM2: rows stored at their flat index (Qwen3: times the weight) */
    moe_grouped_gemm_args g2 = {
        .dtype = L->dt, .num_experts = count, .expert_offsets = offs, .N = L->H, .K = L->I,
        .max_rows = (int)rk, .topk = k, .gather_idx = gather, .A = act,
        .B = moe_layer_w2(L, a->first), .C = a->rows, .permute_y = true,
        .scale_c_rows = L->llama ? NULL : a->w, .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(cb_run_gemm(L, MOE_GEMM_FWD2, &g2, err));
    moe_layer_mark(L, MOE_MARK_GEMM2, false);
    return MOE_OK;
}

static moe_status cb_sum_k(moe_layer *L, const moe_sumk_args *a, moe_error *err)
{
    if (a->T == 0) return MOE_OK;
    const bool filter = a->filter_count >= 0;
    return moe_cuda_sum_topk(L->dt, a->T, L->k, L->H, a->rows, a->scale, a->add, a->add2,
                             filter ? a->ids : NULL, 0, filter ? a->filter_count : 0, a->out,
                             cb_main(L), err);
}

/* Shared expert forward on the side stream: sgu [T,2Is] = x @ [Wsg;Wsu]^T, sact = silu(g)*u,
 * out [T,H] = sact @ Wsd^T (out NULL: stop after sact). */
static moe_status cb_shared_forward(moe_layer *L, int T, const void *x, void *sgu, void *sact,
                                    void *out, moe_error *err)
{
    if (T == 0) return MOE_OK;
    cuda_state *s = L->be;
    const int H = L->H, Is = L->Is;
    MOE_TRY(cb_gemm(L, true, L->dt, T, 2 * Is, H, x, H, false, L->w.shared_gu, H, false, sgu,
                    2 * Is, "shared gate|up GEMM", err));
    MOE_TRY(moe_cuda_silu_mul(L->dt, T, Is, sgu, sact, s->side, err));
    if (out)
        MOE_TRY(cb_gemm(L, true, L->dt, T, H, Is, sact, Is, false, L->w.shared_down, Is, false,
                        out, H, "shared down GEMM", err));
    return MOE_OK;
}

const moe_layer_backend_ops moe_cuda_backend_ops = {
    .name = "cuda",
    .create = cb_create,
    .destroy = cb_destroy,
    .place = cb_place,
    .upload = cb_upload,
    .download = cb_download,
    .copy = cb_copy,
    .zero = cb_zero,
    .enter = cb_enter,
    .sync = cb_sync,
    .fork = cb_fork,
    .join = cb_join,
    .mark = cb_mark,
    .mark_ms = cb_mark_ms,
    .route = cb_route,
    .experts_forward = cb_experts_forward,
    .experts_backward = cb_experts_backward,
    .sum_k = cb_sum_k,
    .shared_forward = cb_shared_forward,
    .shared_backward = cb_shared_backward,
    .router_backward = cb_router_backward,
    .transpose = cb_transpose,
    .round_f32 = cb_round_f32,
    .ep_plan = cb_ep_plan,
    .ep_pack = cb_ep_pack,
    .ep_reduce = cb_ep_reduce,
    .ep_dweights = cb_ep_dweights,
    .ep_slot_counts = cb_ep_slot_counts,
    .ep_compact = cb_ep_compact,
    .ep_check_total = cb_ep_check_total,
    .ep_expand = cb_ep_expand,
    .sum_parts = cb_sum_parts,
    .check_errors = cb_check_errors,
    .gemm_report = cb_gemm_report,
};

#endif /* MOE_HAVE_CUDA */
