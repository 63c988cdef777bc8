/* engine.c — backend dispatch for one MoE block (see engine.h).
 *
 * CPU: the fused CPU twin (src/cpu/cpu_fused.h) on the caller's host buffers.
 * CUDA: src/cuda/cuda_block.h. Host inputs are uploaded, the block runs on the device, and
 * outputs are downloaded. The backward re-runs the device forward with its intermediates kept
 * (deterministic, so identical to the forward the caller saw) instead of uploading the host
 * state, and the block is re-created with backward scratch on the first backward call. */
#include "engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "block_state.h"
#include "cpu/cpu_fused.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda/cuda_baselines.h"
#include "cuda/cuda_block.h"
#include "cuda/kernel_config.h"
#include "moe_kernels.h"
#endif

const char *const moe_phase_names[MOE_PHASE_COUNT] = {"route", "permute", "gemm1",
                                                      "act",   "gemm2",   "combine"};

struct moe_engine {
    moe_backend backend;
    const moe_weights *w;
    moe_dtype dt;
    int max_T;
    char desc[400];
    moe_engine_options opts;
#ifdef MOE_HAVE_CUDA
    cuda_block *blk;
    bool blk_backward;
    void *d_x, *d_dout, *d_dx; /* [max_T, H] */
#endif
};

/* Median of v[0..n) (n >= 1), sorting v in place (insertion sort: n is a few dozen timings). */
static double median_of(double *v, int n)
{
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
            double x = v[j]; v[j] = v[j - 1]; v[j - 1] = x;
        }
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Running sums of the routed rows per local expert over input sets (moe_expert_usage). */
typedef struct usage_sums {
    long touched;    /* experts with rows, summed over the sets */
    long rows;       /* routed rows */
    long tile_slots; /* 128 x the 128-row tiles those rows need */
    double max_over_mean; /* summed over the sets with rows */
    int sets_with_rows;
} usage_sums;

#define USAGE_TILE_ROWS 128 /* the row tile of the default grouped GEMMs (docs/KERNELS.md) */

static void usage_add(usage_sums *u, const int32_t *counts, int El)
{
    long rows = 0, most = 0;
    for (int x = 0; x < El; x++) {
        const long r = counts[x] > 0 ? counts[x] : 0;
        u->touched += r > 0;
        rows += r;
        u->tile_slots += (r + USAGE_TILE_ROWS - 1) / USAGE_TILE_ROWS * USAGE_TILE_ROWS;
        if (r > most) most = r;
    }
    u->rows += rows;
    if (rows > 0) {
        u->max_over_mean += (double)most * El / rows;
        u->sets_with_rows++;
    }
}

static void usage_finish(const usage_sums *u, int n, moe_expert_usage *out)
{
    out->mean_touched = (double)u->touched / n;
    out->tile_fill = u->tile_slots > 0 ? (double)u->rows / (double)u->tile_slots : NAN;
    out->max_over_mean = u->sets_with_rows > 0 ? u->max_over_mean / u->sets_with_rows : NAN;
}

#ifdef MOE_HAVE_CUDA
#define ENG_CUDA(call, what)                                                                  \
    do {                                                                                      \
        cudaError_t eng_e_ = (call);                                                          \
        if (eng_e_ != cudaSuccess) {                                                          \
            s = moe_fail(err, MOE_ERR_CUDA, "%s: %s", (what), cudaGetErrorString(eng_e_));    \
            goto done;                                                                        \
        }                                                                                     \
    } while (0)

static const cuda_gemm_stage fwd_stages[] = {CUDA_GEMM_FWD1, CUDA_GEMM_FWD2};

/* (Re)create the device block: with backward scratch when asked. Applies the options. */
static moe_status cuda_engine_block(moe_engine *e, bool backward, moe_error *err)
{
    if (e->blk && (e->blk_backward || !backward)) return MOE_OK;
    if (e->blk) cuda_block_destroy(e->blk);
    e->blk = NULL;
    MOE_TRY(cuda_block_create(e->w, e->max_T, backward, &e->blk, err));
    e->blk_backward = backward;
    if (e->opts.kernel_config && *e->opts.kernel_config &&
        strcmp(e->opts.kernel_config, "auto") != 0) {
        moe_kernel_config cfg;
        MOE_TRY(moe_kernel_config_parse(e->opts.kernel_config, &cfg, err));
        MOE_TRY(moe_kernel_config_validate(&cfg, e->dt, err));
        for (int st = 0; st < CUDA_GEMM_NUM_STAGES; st++)
            cuda_block_set_gemm_config(e->blk, (cuda_gemm_stage)st, &cfg);
    }
    cuda_block_set_autotune(e->blk, e->opts.autotune, e->opts.autotune_cache);
    cuda_block_set_exact_hf_rounding(e->blk, e->opts.exact_hf_rounding);
    (void)fwd_stages;
    return MOE_OK;
}

static moe_status cuda_engine_create(moe_engine *e, moe_error *err)
{
    int n = 0;
    cudaError_t ce = cudaGetDeviceCount(&n);
    if (ce != cudaSuccess || n == 0)
        return moe_fail(err, MOE_ERR_NO_DEVICE, "the CUDA backend was requested but no GPU is usable (%s); use --backend cpu",
                        ce != cudaSuccess ? cudaGetErrorString(ce) : "0 devices");
    struct cudaDeviceProp prop;
    int dev = 0;
    cudaGetDevice(&dev);
    if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess)
        snprintf(e->desc, sizeof e->desc, "cuda: %s (device %d, sm_%d%d, %d SMs)", prop.name, dev,
                 prop.major, prop.minor, prop.multiProcessorCount);
    else
        snprintf(e->desc, sizeof e->desc, "cuda (device %d)", dev);
    size_t bytes = (size_t)(e->max_T > 0 ? e->max_T : 1) * e->w->cfg.hidden * moe_dtype_size(e->dt);
    MOE_TRY(cuda_dev_alloc(&e->d_x, bytes, "engine x", err));
    MOE_TRY(cuda_dev_alloc(&e->d_dout, bytes, "engine dout", err));
    MOE_TRY(cuda_dev_alloc(&e->d_dx, bytes, "engine dx", err));
    return MOE_OK;
}

static moe_status cuda_engine_forward(moe_engine *e, int T, const void *x, moe_fwd_state *st,
                                      moe_error *err)
{
    moe_status s = cuda_engine_block(e, false, err);
    if (s != MOE_OK) return s;
    moe_fwd_state dev;
    memset(&dev, 0, sizeof dev);
    bool keep = st->gemm1_out != NULL;
    if ((s = cuda_fwd_state_alloc(e->blk, T, keep, &dev, err)) != MOE_OK) return s;
    size_t bytes = (size_t)T * e->w->cfg.hidden * moe_dtype_size(e->dt);
    if ((s = cuda_block_upload(e->blk, e->d_x, x, bytes, err)) == MOE_OK &&
        (s = cuda_block_forward(e->blk, e->d_x, T, &dev, keep, err)) == MOE_OK &&
        (s = cuda_fwd_state_download(e->blk, &dev, st, err)) == MOE_OK)
        st->M = T > 0 ? st->expert_offsets[e->w->expert_count] : 0;
    cuda_fwd_state_free(&dev);
    return s;
}

static moe_status cuda_engine_backward(moe_engine *e, int T, const void *x, const void *dout,
                                       void *dx, moe_weights *grads, moe_error *err)
{
    moe_status s = cuda_engine_block(e, true, err);
    if (s != MOE_OK) return s;
    moe_fwd_state dev;
    memset(&dev, 0, sizeof dev);
    cuda_block_grads g;
    memset(&g, 0, sizeof g);
    if ((s = cuda_fwd_state_alloc(e->blk, T, true, &dev, err)) != MOE_OK) return s;
    size_t bytes = (size_t)T * e->w->cfg.hidden * moe_dtype_size(e->dt);
    if ((s = cuda_block_grads_alloc(e->blk, &g, err)) == MOE_OK &&
        (s = cuda_block_upload(e->blk, e->d_x, x, bytes, err)) == MOE_OK &&
        (s = cuda_block_upload(e->blk, e->d_dout, dout, bytes, err)) == MOE_OK &&
        (s = cuda_block_forward(e->blk, e->d_x, T, &dev, true, err)) == MOE_OK &&
        (s = cuda_block_backward(e->blk, e->d_x, T, &dev, e->d_dout, e->d_dx, &g, err)) == MOE_OK &&
        (s = cuda_block_download(e->blk, dx, e->d_dx, bytes, err)) == MOE_OK)
        s = cuda_block_grads_download(e->blk, &g, grads, err);
    cuda_block_grads_free(&g);
    cuda_fwd_state_free(&dev);
    return s;
}

/* Device-resident timing with CUDA events: inputs uploaded once (rotate sets), no transfers in
 * the timed region. The phases come from a separate pass with cuda_block's phase markers. */
static moe_status cuda_engine_time(moe_engine *e, moe_bench_mode mode, int T,
                                   const void *const *xs, const void *dout, int rotate,
                                   int warmup, int iters, double *times_ms, double *phase_ms,
                                   moe_error *err)
{
    bool bwd = mode != MOE_BENCH_FWD;
    moe_status s = cuda_engine_block(e, bwd, err);
    if (s != MOE_OK) return s;
    moe_fwd_state dev;
    memset(&dev, 0, sizeof dev);
    cuda_block_grads g;
    memset(&g, 0, sizeof g);
    void **dxs = calloc((size_t)rotate, sizeof *dxs);
    cudaEvent_t ev0 = NULL, ev1 = NULL;
    cudaEvent_t pev[CUDA_BLOCK_PHASE_EVENTS] = {0};
    double *phase_runs = calloc((size_t)iters * MOE_PHASE_COUNT, sizeof(double));
    const size_t bytes = (size_t)T * e->w->cfg.hidden * moe_dtype_size(e->dt);
    cudaStream_t stream = cuda_block_stream(e->blk);
    if (!dxs || !phase_runs) { s = moe_fail(err, MOE_ERR_NOMEM, "bench buffers"); goto done; }
    if ((s = cuda_fwd_state_alloc(e->blk, T, bwd, &dev, err)) != MOE_OK) goto done;
    if (bwd && (s = cuda_block_grads_alloc(e->blk, &g, err)) != MOE_OK) goto done;
    for (int i = 0; i < rotate; i++) {
        if ((s = cuda_dev_alloc(&dxs[i], bytes, "bench input", err)) != MOE_OK) goto done;
        if ((s = cuda_block_upload(e->blk, dxs[i], xs[i], bytes, err)) != MOE_OK) goto done;
    }
    if (bwd && (s = cuda_block_upload(e->blk, e->d_dout, dout, bytes, err)) != MOE_OK) goto done;
    ENG_CUDA(cudaEventCreate(&ev0), "cudaEventCreate");
    ENG_CUDA(cudaEventCreate(&ev1), "cudaEventCreate");
    for (int i = 0; i < warmup + iters; i++) {
        const void *x = dxs[i % rotate];
        if (mode == MOE_BENCH_BWD &&
            (s = cuda_block_forward(e->blk, x, T, &dev, true, err)) != MOE_OK)
            goto done;
        ENG_CUDA(cudaEventRecord(ev0, stream), "cudaEventRecord");
        if (mode != MOE_BENCH_BWD &&
            (s = cuda_block_forward(e->blk, x, T, &dev, bwd, err)) != MOE_OK)
            goto done;
        if (bwd && (s = cuda_block_backward(e->blk, x, T, &dev, e->d_dout, e->d_dx, &g, err)) != MOE_OK)
            goto done;
        ENG_CUDA(cudaEventRecord(ev1, stream), "cudaEventRecord");
        ENG_CUDA(cudaEventSynchronize(ev1), "cudaEventSynchronize");
        float ms = 0;
        ENG_CUDA(cudaEventElapsedTime(&ms, ev0, ev1), "cudaEventElapsedTime");
        if (i >= warmup) times_ms[i - warmup] = ms;
    }
    if (phase_ms) {
        /* A separate pass of forwards with the block's phase markers (cuda_block.h); the
         * markers do not change what runs, but they are kept out of the timed loop above. */
        for (int p = 0; p < MOE_PHASE_COUNT; p++) phase_ms[p] = NAN;
        for (int j = 0; j < CUDA_BLOCK_PHASE_EVENTS; j++)
            ENG_CUDA(cudaEventCreate(&pev[j]), "cudaEventCreate");
        cuda_block_set_phase_events(e->blk, pev);
        for (int i = 0; i < iters && s == MOE_OK; i++) {
            s = cuda_block_forward(e->blk, dxs[i % rotate], T, &dev, false, err);
            if (s == MOE_OK) ENG_CUDA(cudaEventSynchronize(pev[CUDA_BLOCK_PHASE_EVENTS - 1]), "cudaEventSynchronize");
            for (int p = 0; s == MOE_OK && p < MOE_PHASE_COUNT; p++) {
                float ms = 0;
                ENG_CUDA(cudaEventElapsedTime(&ms, pev[p], pev[p + 1]), "cudaEventElapsedTime");
                phase_runs[(size_t)p * iters + i] = ms;
            }
        }
        cuda_block_set_phase_events(e->blk, NULL);
        if (s != MOE_OK) goto done;
        for (int p = 0; p < MOE_PHASE_COUNT; p++)
            phase_ms[p] = median_of(phase_runs + (size_t)p * iters, iters);
        /* SiLU-and-mul runs inside GEMM1's epilogue: no phase of its own to report; with a
         * backward timed, only the routing is a phase of what was timed */
        phase_ms[MOE_PHASE_ACT] = NAN;
        if (mode != MOE_BENCH_FWD)
            for (int p = MOE_PHASE_PERMUTE; p < MOE_PHASE_COUNT; p++) phase_ms[p] = NAN;
    }
done:
    if (e->blk) cuda_block_set_phase_events(e->blk, NULL);
    if (ev0) cudaEventDestroy(ev0);
    if (ev1) cudaEventDestroy(ev1);
    for (int j = 0; j < CUDA_BLOCK_PHASE_EVENTS; j++)
        if (pev[j]) cudaEventDestroy(pev[j]);
    for (int i = 0; dxs && i < rotate; i++) cuda_dev_free(dxs[i]);
    free(dxs);
    free(phase_runs);
    cuda_block_grads_free(&g);
    cuda_fwd_state_free(&dev);
    return s;
}

/* Routing-only device state for T tokens: the buffers cuda_block_route needs (sizes of
 * block_state.h), nothing else; freed by cuda_fwd_state_free. */
static moe_status cuda_route_state_alloc(const moe_engine *e, int T, moe_fwd_state *st,
                                         moe_error *err)
{
    const moe_config *c = &e->w->cfg;
    const size_t es = moe_dtype_size(e->dt), E = (size_t)c->num_experts, tk = (size_t)T * c->top_k;
    void *p[6] = {0};
    const size_t n[6] = {(size_t)T * E * es, tk * 4, tk * es, E * 4, (E + 1) * 4, tk * 4};
    memset(st, 0, sizeof *st);
    for (int i = 0; i < 6; i++) {
        moe_status s = cuda_dev_alloc(&p[i], n[i] ? n[i] : 4, "routing state", err);
        if (s != MOE_OK) {
            for (int j = 0; j < i; j++) cuda_dev_free(p[j]);
            return s;
        }
    }
    st->T = T;
    st->router_logits = p[0];
    st->topk_ids = p[1];
    st->topk_w = p[2];
    st->token_counts = p[3];
    st->expert_offsets = p[4];
    st->gather_idx = p[5];
    return MOE_OK;
}

static moe_status cuda_engine_expert_usage(moe_engine *e, int T, const void *const *xs, int n,
                                           usage_sums *u, moe_error *err)
{
    moe_status s = cuda_engine_block(e, false, err);
    if (s != MOE_OK) return s;
    const int El = e->w->expert_count;
    const size_t bytes = (size_t)T * e->w->cfg.hidden * moe_dtype_size(e->dt);
    moe_fwd_state dev;
    int32_t *counts = malloc(sizeof(int32_t) * (size_t)(El > 0 ? El : 1));
    if (!counts) return moe_fail(err, MOE_ERR_NOMEM, "expert usage counts");
    if ((s = cuda_route_state_alloc(e, T, &dev, err)) != MOE_OK) {
        free(counts);
        return s;
    }
    for (int i = 0; i < n && s == MOE_OK; i++) {
        if ((s = cuda_block_upload(e->blk, e->d_x, xs[i], bytes, err)) != MOE_OK) break;
        if ((s = cuda_block_route(e->blk, e->d_x, T, &dev, err)) != MOE_OK) break;
        if ((s = cuda_block_download(e->blk, counts, dev.token_counts, sizeof(int32_t) * (size_t)El, err)) != MOE_OK)
            break;
        usage_add(u, counts, El);
    }
    cuda_fwd_state_free(&dev);
    free(counts);
    return s;
}

/* See moe_engine_graph_time. One graph per input set: a graph bakes in its input pointer, and
 * replaying one graph on one input would stream the same experts' weights every time (the
 * touched experts of T=1 fit in L2 for some models), which is not what decode sees. */
static moe_status cuda_engine_graph_time(moe_engine *e, int T, const void *const *xs, int rotate,
                                         int warmup, int iters, double *times_ms, moe_error *err)
{
    moe_status s = cuda_engine_block(e, false, err);
    if (s != MOE_OK) return s;
    moe_fwd_state dev;
    memset(&dev, 0, sizeof dev);
    void **dxs = calloc((size_t)rotate, sizeof *dxs);
    cudaGraph_t *gs = calloc((size_t)rotate, sizeof *gs);
    cudaGraphExec_t *ges = calloc((size_t)rotate, sizeof *ges);
    cudaEvent_t ev0 = NULL, ev1 = NULL;
    const size_t bytes = (size_t)T * e->w->cfg.hidden * moe_dtype_size(e->dt);
    cudaStream_t stream = cuda_block_stream(e->blk);
    if (!dxs || !gs || !ges) { s = moe_fail(err, MOE_ERR_NOMEM, "graph bench buffers"); goto done; }
    if ((s = cuda_fwd_state_alloc(e->blk, T, false, &dev, err)) != MOE_OK) goto done;
    for (int r = 0; r < rotate; r++) {
        if ((s = cuda_dev_alloc(&dxs[r], bytes, "graph bench input", err)) != MOE_OK) goto done;
        if ((s = cuda_block_upload(e->blk, dxs[r], xs[r], bytes, err)) != MOE_OK) goto done;
    }
    for (int r = 0; r < rotate; r++) {
        /* eager first: autotuning and lazy set-up synchronise, which capture forbids */
        if ((s = cuda_block_forward(e->blk, dxs[r], T, &dev, false, err)) != MOE_OK) goto done;
        if ((s = cuda_block_sync(e->blk, err)) != MOE_OK) goto done;
        ENG_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                 "cudaStreamBeginCapture");
        moe_status fs = cuda_block_forward(e->blk, dxs[r], T, &dev, false, err);
        cudaError_t ce = cudaStreamEndCapture(stream, &gs[r]); /* always end: leave the stream usable */
        if (fs != MOE_OK) {
            char why[sizeof err->msg];
            snprintf(why, sizeof why, "%s", err->msg);
            s = moe_fail(err, fs, "forward under CUDA graph capture (T=%d): %s", T, why);
            goto done;
        }
        ENG_CUDA(ce, "cudaStreamEndCapture");
        ENG_CUDA(cudaGraphInstantiate(&ges[r], gs[r], 0), "cudaGraphInstantiate");
        ENG_CUDA(cudaGraphUpload(ges[r], stream), "cudaGraphUpload");
    }
    ENG_CUDA(cudaEventCreate(&ev0), "cudaEventCreate");
    ENG_CUDA(cudaEventCreate(&ev1), "cudaEventCreate");
    for (int i = 0; i < warmup + iters; i++) {
        ENG_CUDA(cudaEventRecord(ev0, stream), "cudaEventRecord");
        ENG_CUDA(cudaGraphLaunch(ges[i % rotate], stream), "cudaGraphLaunch");
        ENG_CUDA(cudaEventRecord(ev1, stream), "cudaEventRecord");
        ENG_CUDA(cudaEventSynchronize(ev1), "cudaEventSynchronize (graph replay)");
        float ms = 0;
        ENG_CUDA(cudaEventElapsedTime(&ms, ev0, ev1), "cudaEventElapsedTime");
        if (i >= warmup) times_ms[i - warmup] = ms;
    }
done:
    if (ev0) cudaEventDestroy(ev0);
    if (ev1) cudaEventDestroy(ev1);
    for (int r = 0; r < rotate; r++) {
        if (ges && ges[r]) cudaGraphExecDestroy(ges[r]);
        if (gs && gs[r]) cudaGraphDestroy(gs[r]);
        if (dxs) cuda_dev_free(dxs[r]);
    }
    free(dxs);
    free(gs);
    free(ges);
    cuda_fwd_state_free(&dev);
    return s;
}
#endif /* MOE_HAVE_CUDA */

moe_status moe_engine_create(moe_backend backend, const moe_weights *w, moe_dtype dt, int max_T,
                             moe_engine **out, moe_error *err)
{
    *out = NULL;
    if (!w) return moe_fail(err, MOE_ERR_INVALID_ARG, "engine: weights are NULL");
    if (max_T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "engine: max_T %d < 0", max_T);
    if (dt != MOE_DTYPE_BF16 && dt != MOE_DTYPE_F16 && dt != MOE_DTYPE_F32)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "engine: dtype %s is not computed (bf16, fp16, fp32)",
                        moe_dtype_name(dt) ? moe_dtype_name(dt) : "?");
#ifndef MOE_HAVE_CUDA
    if (backend == MOE_BACKEND_CUDA)
        return moe_fail(err, MOE_ERR_NO_DEVICE,
                        "the CUDA backend was requested but this build has none (configured with "
                        "MOE_ENABLE_CUDA=OFF or without a CUDA toolkit); use --backend cpu");
#endif
    moe_engine *e = moe_calloc(1, sizeof *e, "engine", err);
    if (!e) return MOE_ERR_NOMEM;
    e->backend = backend;
    e->w = w;
    e->dt = dt;
    e->max_T = max_T;
    snprintf(e->desc, sizeof e->desc, "cpu (%d threads)", omp_get_max_threads());
#ifdef MOE_HAVE_CUDA
    if (backend == MOE_BACKEND_CUDA) {
        moe_status s = cuda_engine_create(e, err);
        if (s != MOE_OK) {
            moe_engine_destroy(e);
            return s;
        }
    }
#endif
    *out = e;
    return MOE_OK;
}

moe_status moe_engine_configure(moe_engine *e, const moe_engine_options *opts, moe_error *err)
{
    if (!e || !opts) return moe_fail(err, MOE_ERR_INVALID_ARG, "engine_configure: NULL argument");
    if (e->backend != MOE_BACKEND_CUDA) {
        if (opts->kernel_config && *opts->kernel_config && strcmp(opts->kernel_config, "auto") != 0)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "--kernel-config applies to the CUDA backend only (this run uses the CPU)");
        e->opts = *opts;
        return MOE_OK;
    }
    e->opts = *opts;
#ifdef MOE_HAVE_CUDA
    if (opts->kernel_config && *opts->kernel_config && strcmp(opts->kernel_config, "auto") != 0) {
        moe_kernel_config cfg; /* validate now, so a bad one fails before any work */
        MOE_TRY(moe_kernel_config_parse(opts->kernel_config, &cfg, err));
        MOE_TRY(moe_kernel_config_validate(&cfg, e->dt, err));
    }
    if (e->blk) { /* re-apply on the next call */
        cuda_block_destroy(e->blk);
        e->blk = NULL;
    }
#endif
    return MOE_OK;
}

void moe_engine_destroy(moe_engine *e)
{
    if (!e) return;
#ifdef MOE_HAVE_CUDA
    if (e->blk) cuda_block_destroy(e->blk);
    cuda_dev_free(e->d_x);
    cuda_dev_free(e->d_dout);
    cuda_dev_free(e->d_dx);
#endif
    free(e);
}

const char *moe_engine_describe(const moe_engine *e) { return e->desc; }

moe_backend moe_engine_backend(const moe_engine *e) { return e->backend; }

moe_status moe_engine_forward(moe_engine *e, int T, const void *x, moe_fwd_state *st,
                              moe_error *err)
{
    if (T < 0 || T > e->max_T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "forward: T=%d outside 0..%d", T, e->max_T);
#ifdef MOE_HAVE_CUDA
    if (e->backend == MOE_BACKEND_CUDA) return cuda_engine_forward(e, T, x, st, err);
#endif
    return cpu_block_forward(e->w, e->dt, T, x, st, err);
}

moe_status moe_engine_backward(moe_engine *e, int T, const void *x, const moe_fwd_state *st,
                               const void *dout, void *dx, moe_weights *grads, moe_error *err)
{
    if (T < 0 || T > e->max_T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "backward: T=%d outside 0..%d", T, e->max_T);
#ifdef MOE_HAVE_CUDA
    if (e->backend == MOE_BACKEND_CUDA) return cuda_engine_backward(e, T, x, dout, dx, grads, err);
#endif
    return cpu_block_backward(e->w, e->dt, T, x, st, dout, dx, grads, err);
}

moe_status moe_engine_time(moe_engine *e, moe_bench_mode mode, int T, const void *const *xs,
                           const void *dout, int rotate, int warmup, int iters, double *times_ms,
                           double *phase_ms, moe_error *err)
{
    if (T < 1 || T > e->max_T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "bench: T=%d outside 1..%d", T, e->max_T);
    if (rotate < 1 || warmup < 0 || iters < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "bench: rotate %d, warmup %d, iters %d", rotate,
                        warmup, iters);
#ifdef MOE_HAVE_CUDA
    if (e->backend == MOE_BACKEND_CUDA)
        return cuda_engine_time(e, mode, T, xs, dout, rotate, warmup, iters, times_ms, phase_ms, err);
#endif
    const moe_config *c = &e->w->cfg;
    moe_fwd_state st;
    moe_weights grads = {0};
    void *dx = NULL;
    moe_status s = moe_fwd_state_alloc(c, e->dt, T, mode != MOE_BENCH_FWD, &st, err);
    if (s != MOE_OK) return s;
    if (mode != MOE_BENCH_FWD) {
        dx = moe_malloc((size_t)T * c->hidden * moe_dtype_size(e->dt), "bench dx", err);
        if (!dx) { s = MOE_ERR_NOMEM; goto done; }
        if ((s = moe_weights_zeros_like(e->w, e->dt, &grads, err)) != MOE_OK) goto done;
    }
    for (int i = 0; i < warmup + iters; i++) {
        const void *x = xs[i % rotate];
        double t0 = moe_now();
        /* the backward-only mode times backward after an untimed forward of the same input */
        if ((s = cpu_block_forward(e->w, e->dt, T, x, &st, err)) != MOE_OK) goto done;
        if (mode == MOE_BENCH_BWD) t0 = moe_now();
        if (mode != MOE_BENCH_FWD &&
            (s = cpu_block_backward(e->w, e->dt, T, x, &st, dout, dx, &grads, err)) != MOE_OK)
            goto done;
        if (i >= warmup) times_ms[i - warmup] = 1e3 * (moe_now() - t0);
    }
    if (phase_ms)
        for (int p = 0; p < MOE_PHASE_COUNT; p++) phase_ms[p] = NAN; /* not split on the CPU */
done:
    moe_fwd_state_free(&st);
    moe_weights_free(&grads);
    free(dx);
    return s;
}

void moe_engine_kernel_summary(const moe_engine *e, char *buf, size_t len)
{
    buf[0] = '\0';
#ifdef MOE_HAVE_CUDA
    static const char *const stage_names[CUDA_GEMM_NUM_STAGES] = {"gemm1", "gemm2", "bwd dA",
                                                                  "bwd dX", "dW2", "dW13"};
    if (e->backend != MOE_BACKEND_CUDA || !e->blk) return;
    size_t used = 0;
    for (int st = 0; st < CUDA_GEMM_NUM_STAGES && used < len; st++) {
        const moe_kernel_report *r = cuda_block_gemm_report(e->blk, (cuda_gemm_stage)st);
        if (!r || !r->kernel) continue;
        const moe_kernel_config *c = &r->config;
        used += (size_t)snprintf(buf + used, len - used, "%s%s: %s %dx%dx%d,w%d,s%d%s%s%s%s", used ? "; " : "",
                                 stage_names[st], r->kernel, c->tile_m, c->tile_n, c->tile_k,
                                 c->warps, c->stages, r->used_tma ? ",tma" : "",
                                 c->cluster > 1 ? ",c2" : "", r->staged_epilogue ? " (staged epilogue)" : "",
                                 r->a_tma ? " (A by TMA)" : "");
    }
    if (e->opts.exact_hf_rounding && used < len)
        snprintf(buf + used, len - used, "; exact HF rounding");
#else
    (void)e;
    (void)len;
#endif
}

moe_status moe_engine_baselines(moe_engine *e, const int32_t *counts, int warmup, int iters,
                                double *dense_ms, double *loop_ms, double *grouped_ms,
                                moe_error *err)
{
#ifdef MOE_HAVE_CUDA
    if (e->backend == MOE_BACKEND_CUDA) {
        MOE_TRY(cuda_engine_block(e, false, err));
        const void *w13, *w2;
        cuda_block_expert_weights(e->blk, &w13, &w2);
        moe_baseline_times bt;
        MOE_TRY(moe_cuda_baselines(e->dt, e->w->expert_count, e->w->cfg.hidden, e->w->cfg.inter,
                                   w13, w2, counts, warmup, iters, &bt, err));
        *dense_ms = bt.dense_ms;
        *loop_ms = bt.loop_ms;
        *grouped_ms = bt.grouped_ms;
        return MOE_OK;
    }
#endif
    (void)e; (void)counts; (void)warmup; (void)iters;
    *dense_ms = *loop_ms = *grouped_ms = NAN;
    return moe_fail(err, MOE_ERR_UNSUPPORTED, "the cuBLAS baselines need the CUDA backend");
}

void moe_engine_device_info(const moe_engine *e, moe_device_info *out)
{
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "cpu");
    out->sm_count = omp_get_max_threads();
#ifdef MOE_HAVE_CUDA
    if (e->backend == MOE_BACKEND_CUDA) {
        int dev = 0;
        struct cudaDeviceProp prop;
        cudaGetDevice(&dev);
        snprintf(out->name, sizeof out->name, "cuda device %d", dev);
        out->sm_count = 0;
        if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess) {
            snprintf(out->name, sizeof out->name, "%s", prop.name);
            out->sm_count = prop.multiProcessorCount;
        }
        moe_cuda_sm_clocks(dev, &out->sm_clock_now_mhz, &out->sm_clock_max_mhz,
                           &out->sm_clock_nvml_max_mhz);
    }
#else
    (void)e;
#endif
}

moe_status moe_engine_copy_bandwidth(moe_engine *e, size_t bytes, int warmup, int iters,
                                     double *gbs, moe_error *err)
{
    *gbs = 0;
    if (bytes == 0 || warmup < 0 || iters < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "copy bandwidth: bytes %zu, warmup %d, iters %d",
                        bytes, warmup, iters);
#ifdef MOE_HAVE_CUDA
    if (e->backend == MOE_BACKEND_CUDA) return moe_cuda_copy_bandwidth(bytes, warmup, iters, gbs, err);
#else
    (void)e;
#endif
    char *src = moe_malloc(bytes, "copy bandwidth source", err);
    char *dst = src ? moe_malloc(bytes, "copy bandwidth destination", err) : NULL;
    double *t = dst ? moe_malloc(sizeof(double) * (size_t)iters, "copy bandwidth times", err) : NULL;
    if (!t) {
        free(src);
        free(dst);
        return MOE_ERR_NOMEM;
    }
    /* each thread copies one contiguous share and first-touches the same share (NUMA) */
#pragma omp parallel
    {
        size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
        size_t share = (bytes + nt - 1) / nt, lo = MOE_MIN(bytes, id * share), hi = MOE_MIN(bytes, lo + share);
        memset(src + lo, 0x5a, hi - lo);
        memset(dst + lo, 0, hi - lo);
    }
    for (int it = 0; it < warmup + iters; it++) {
        double t0 = moe_now();
#pragma omp parallel
        {
            size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
            size_t share = (bytes + nt - 1) / nt, lo = MOE_MIN(bytes, id * share), hi = MOE_MIN(bytes, lo + share);
            memcpy(dst + lo, src + lo, hi - lo);
        }
        if (it >= warmup) t[it - warmup] = moe_now() - t0;
    }
    double med = median_of(t, iters);
    if (med > 0) *gbs = 2.0 * (double)bytes / med / 1e9;
    free(src);
    free(dst);
    free(t);
    return MOE_OK;
}

moe_status moe_engine_expert_usage(moe_engine *e, int T, const void *const *xs, int n,
                                   moe_expert_usage *out, moe_error *err)
{
    memset(out, 0, sizeof *out);
    if (T < 1 || T > e->max_T || n < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "expert usage: T=%d outside 1..%d or %d inputs", T,
                        e->max_T, n);
    usage_sums u = {0, 0, 0, 0, 0};
    moe_status s;
#ifdef MOE_HAVE_CUDA
    if (e->backend == MOE_BACKEND_CUDA) {
        s = cuda_engine_expert_usage(e, T, xs, n, &u, err);
        if (s == MOE_OK) usage_finish(&u, n, out);
        return s;
    }
#endif
    const moe_config *c = &e->w->cfg;
    const int E = c->num_experts, k = c->top_k, eb = e->w->expert_begin, El = e->w->expert_count;
    const size_t es = moe_dtype_size(e->dt);
    void *logits = moe_malloc((size_t)T * E * es, "expert usage logits", err);
    void *tw = logits ? moe_malloc((size_t)T * k * es, "expert usage weights", err) : NULL;
    int32_t *ids = tw ? moe_malloc(sizeof(int32_t) * (size_t)T * k, "expert usage ids", err) : NULL;
    int32_t *counts = ids ? moe_malloc(sizeof(int32_t) * (size_t)(El > 0 ? El : 1), "expert usage counts", err) : NULL;
    s = counts ? MOE_OK : MOE_ERR_NOMEM;
    for (int i = 0; i < n && s == MOE_OK; i++) {
        if ((s = cpu_router_logits(e->dt, T, c->hidden, E, xs[i], e->w->router.data, logits, err)) != MOE_OK ||
            (s = cpu_route_topk(c, e->dt, T, logits, ids, tw, err)) != MOE_OK)
            break;
        memset(counts, 0, sizeof(int32_t) * (size_t)(El > 0 ? El : 1));
        for (long f = 0; f < (long)T * k; f++)
            if (ids[f] >= eb && ids[f] < eb + El) counts[ids[f] - eb]++;
        usage_add(&u, counts, El);
    }
    if (s == MOE_OK) usage_finish(&u, n, out);
    free(logits);
    free(tw);
    free(ids);
    free(counts);
    return s;
}

moe_status moe_engine_graph_time(moe_engine *e, int T, const void *const *xs, int rotate,
                                 int warmup, int iters, double *times_ms, moe_error *err)
{
    if (T < 1 || T > e->max_T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "graph bench: T=%d outside 1..%d", T, e->max_T);
    if (rotate < 1 || warmup < 0 || iters < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "graph bench: rotate %d, warmup %d, iters %d",
                        rotate, warmup, iters);
#ifdef MOE_HAVE_CUDA
    if (e->backend == MOE_BACKEND_CUDA)
        return cuda_engine_graph_time(e, T, xs, rotate, warmup, iters, times_ms, err);
#endif
    (void)xs; (void)times_ms;
    return moe_fail(err, MOE_ERR_UNSUPPORTED,
                    "CUDA-graph replay needs the CUDA backend (this engine runs on the CPU)");
}
