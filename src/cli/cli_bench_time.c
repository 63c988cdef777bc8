/* cli_bench_time.c — `moe-ep bench`'s measurements (cli_bench_time.h). Failures are recorded
 * in the calling thread's error record, so the caller prints moe_last_error(). */
#include "cli_bench_time.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "cpu/cpu_fused.h"
#include "layer/layer.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda/cuda_baselines.h"
#endif

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median_of(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static moe_status fail(moe_status st, const char *fmt, const char *what)
{
    return moe_fail(moe_thread_error(), st, fmt, what);
}

#ifdef MOE_HAVE_CUDA
#define BT_CUDA(call, what)                                                                   \
    do {                                                                                      \
        cudaError_t bt_e_ = (call);                                                           \
        if (bt_e_ != cudaSuccess) {                                                           \
            cudaGetLastError();                                                               \
            return moe_fail(moe_thread_error(), MOE_ERR_CUDA, "%s: %s", (what),              \
                            cudaGetErrorString(bt_e_));                                       \
        }                                                                                     \
    } while (0)
#endif

/* ------------------------------------------------------------------ inputs ---- */

static moe_status buf(bool device, size_t bytes, void **p)
{
    *p = NULL;
#ifdef MOE_HAVE_CUDA
    if (device) {
        BT_CUDA(cudaMalloc(p, bytes + 16), "bench buffers");
        return MOE_OK;
    }
#endif
    (void)device;
    *p = malloc(bytes + 16);
    return *p ? MOE_OK : fail(MOE_ERR_NOMEM, "%s: out of memory", "bench buffers");
}

static void unbuf(bool device, void *p)
{
#ifdef MOE_HAVE_CUDA
    if (device) {
        cudaFree(p);
        return;
    }
#endif
    (void)device;
    free(p);
}

static moe_status put(bool device, void *dst, const void *src, size_t bytes)
{
#ifdef MOE_HAVE_CUDA
    if (device) {
        BT_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "bench inputs to the device");
        return MOE_OK;
    }
#endif
    (void)device;
    memcpy(dst, src, bytes);
    return MOE_OK;
}

moe_status bench_inputs_make(moe_layer *L, int rotate, int max_T, void *const *hosts,
                             const void *dout_host, bench_inputs *in)
{
    memset(in, 0, sizeof *in);
    moe_layer_info info = MOE_LAYER_INFO_INIT;
    MOE_TRY(moe_layer_info_get(L, &info));
    in->device = info.backend == MOE_BACKEND_CUDA;
    in->rotate = rotate;
    in->max_T = max_T;
    const size_t es = moe_dtype_size(info.dtype), xb = (size_t)max_T * info.hidden * es;
    in->xs = calloc((size_t)rotate, sizeof *in->xs);
    if (!in->xs) return fail(MOE_ERR_NOMEM, "%s: out of memory", "bench inputs");
    for (int i = 0; i < rotate; i++) {
        MOE_TRY(buf(in->device, xb, &in->xs[i]));
        MOE_TRY(put(in->device, in->xs[i], hosts[i], xb));
    }
    MOE_TRY(buf(in->device, xb, &in->dout));
    MOE_TRY(put(in->device, in->dout, dout_host, xb));
    MOE_TRY(buf(in->device, xb, &in->out));
    MOE_TRY(buf(in->device, xb, &in->dx));
    const size_t H = (size_t)info.hidden, I = (size_t)info.inter, El = (size_t)info.num_local_experts;
    const size_t Is = (size_t)info.shared_inter;
    MOE_TRY(buf(in->device, (size_t)info.num_experts * H * es, &in->g.router));
    MOE_TRY(buf(in->device, El * 2 * I * H * es, &in->g.w13));
    MOE_TRY(buf(in->device, El * H * I * es, &in->g.w2));
    if (Is > 0) {
        MOE_TRY(buf(in->device, Is * H * es, &in->g.shared_gate));
        MOE_TRY(buf(in->device, Is * H * es, &in->g.shared_up));
        MOE_TRY(buf(in->device, H * Is * es, &in->g.shared_down));
    }
    return MOE_OK;
}

void bench_inputs_free(moe_layer *L, bench_inputs *in)
{
    (void)L;
    for (int i = 0; in->xs && i < in->rotate; i++) unbuf(in->device, in->xs[i]);
    free(in->xs);
    void *p[] = {in->dout, in->out, in->dx, in->g.router, in->g.w13, in->g.w2,
                 in->g.shared_gate, in->g.shared_up, in->g.shared_down};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) unbuf(in->device, p[i]);
    memset(in, 0, sizeof *in);
}

/* ------------------------------------------------------------------ eager timing ---- */

/* One repetition: what the mode times, on input set x. */
static moe_status one_call(moe_layer *L, bench_mode mode, int T, const void *x,
                           const bench_inputs *in, void *stream, bool timed_part)
{
    if (mode != BENCH_BWD || !timed_part)
        MOE_TRY(moe_layer_forward_async(L, T, x, in->out, NULL, stream));
    if (mode != BENCH_FWD && (mode == BENCH_FWDBWD || timed_part))
        MOE_TRY(moe_layer_backward_async(L, T, x, in->dout, NULL, in->dx, &in->g, stream));
    return MOE_OK;
}

moe_status bench_time_eager(moe_layer *L, bench_mode mode, int T, const bench_inputs *in,
                            int warmup, int iters, double *times_ms, double *phase_ms)
{
    double *runs = calloc((size_t)iters * MOE_STATS_NUM_PHASES + 1, sizeof(double));
    if (!runs) return fail(MOE_ERR_NOMEM, "%s: out of memory", "bench phases");
    moe_status st = MOE_OK;
#ifdef MOE_HAVE_CUDA
    cudaStream_t s = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    if (in->device) {
        if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess ||
            cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess)
            st = fail(MOE_ERR_CUDA, "%s: cannot create a stream or events", "bench");
    }
#else
    void *s = NULL;
#endif
    /* the timed loop: no markers inside the layer, events (or the clock) around the call */
    if (st == MOE_OK) st = moe_layer_set_timing(L, 0);
    for (int i = 0; st == MOE_OK && i < warmup + iters; i++) {
        const void *x = in->xs[i % in->rotate];
        if (mode == BENCH_BWD) st = one_call(L, mode, T, x, in, s, false); /* untimed forward */
        if (st != MOE_OK) break;
        double ms = 0;
#ifdef MOE_HAVE_CUDA
        if (in->device) {
            cudaEventRecord(e0, s);
            st = one_call(L, mode, T, x, in, s, true);
            cudaEventRecord(e1, s);
            if (st == MOE_OK && cudaEventSynchronize(e1) != cudaSuccess)
                st = fail(MOE_ERR_CUDA, "%s: the layer's work failed", "bench");
            float f = 0;
            if (st == MOE_OK) cudaEventElapsedTime(&f, e0, e1);
            ms = f;
        } else
#endif
        {
            double t0 = moe_now();
            st = one_call(L, mode, T, x, in, s, true);
            ms = 1e3 * (moe_now() - t0);
        }
        if (i >= warmup) times_ms[i - warmup] = ms;
    }
    /* a separate pass of forwards with the layer's phase markers */
    for (int p = 0; p < MOE_STATS_NUM_PHASES; p++) phase_ms[p] = NAN;
    if (st == MOE_OK && phase_ms && mode == BENCH_FWD) {
        st = moe_layer_set_timing(L, 1);
        for (int i = 0; st == MOE_OK && i < iters; i++) {
            st = moe_layer_forward_async(L, T, in->xs[i % in->rotate], in->out, NULL, s);
            moe_layer_stats sts = MOE_LAYER_STATS_INIT;
            if (st == MOE_OK) st = moe_layer_stats_get(L, &sts);
            for (int p = 0; st == MOE_OK && p < MOE_STATS_NUM_PHASES; p++)
                runs[(size_t)p * iters + i] = sts.phase_ms[p];
        }
        moe_layer_set_timing(L, 0);
        for (int p = 0; st == MOE_OK && p < MOE_STATS_NUM_PHASES; p++) {
            double v = median_of(runs + (size_t)p * iters, iters);
            phase_ms[p] = v < 0 ? NAN : v;
        }
    }
#ifdef MOE_HAVE_CUDA
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (s) {
        cudaStreamSynchronize(s);
        cudaStreamDestroy(s);
    }
#endif
    free(runs);
    return st;
}

moe_status bench_time_graph(moe_layer *L, int T, const bench_inputs *in, int warmup, int iters,
                            double *times_ms)
{
#ifdef MOE_HAVE_CUDA
    if (!in->device) return fail(MOE_ERR_UNSUPPORTED, "%s needs the CUDA backend", "--graph");
    const int R = in->rotate;
    cudaGraph_t *gs = calloc((size_t)R, sizeof *gs);
    cudaGraphExec_t *ges = calloc((size_t)R, sizeof *ges);
    cudaStream_t s = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    moe_status st = gs && ges ? MOE_OK : fail(MOE_ERR_NOMEM, "%s: out of memory", "graph bench");
    if (st == MOE_OK && (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess ||
                         cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess))
        st = fail(MOE_ERR_CUDA, "%s: cannot create a stream or events", "graph bench");
    if (st == MOE_OK) st = moe_layer_set_timing(L, 0);
    /* One graph per input set: a graph bakes in its input pointer, and replaying one graph on
     * one input would stream the same experts' weights every time. */
    for (int r = 0; st == MOE_OK && r < R; r++) {
        /* eager first: autotuning and buffer sizing synchronise, which capture forbids */
        st = moe_layer_forward_async(L, T, in->xs[r], in->out, NULL, s);
        if (st == MOE_OK && cudaStreamSynchronize(s) != cudaSuccess)
            st = fail(MOE_ERR_CUDA, "%s: eager forward failed", "graph bench");
        if (st != MOE_OK) break;
        if (cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
            st = fail(MOE_ERR_CUDA, "%s: cudaStreamBeginCapture failed", "graph bench");
            break;
        }
        moe_status fs = moe_layer_forward_async(L, T, in->xs[r], in->out, NULL, s);
        cudaError_t ce = cudaStreamEndCapture(s, &gs[r]); /* always end: leave the stream usable */
        if (fs != MOE_OK) {
            char why[1024];
            snprintf(why, sizeof why, "%s", moe_last_error());
            st = moe_fail(moe_thread_error(), fs, "forward under CUDA graph capture (T=%d): %s", T, why);
            break;
        }
        if (ce != cudaSuccess || cudaGraphInstantiate(&ges[r], gs[r], 0) != cudaSuccess ||
            cudaGraphUpload(ges[r], s) != cudaSuccess)
            st = fail(MOE_ERR_CUDA, "%s: capture, instantiate or upload failed", "graph bench");
    }
    for (int i = 0; st == MOE_OK && i < warmup + iters; i++) {
        cudaEventRecord(e0, s);
        cudaGraphLaunch(ges[i % R], s);
        cudaEventRecord(e1, s);
        if (cudaEventSynchronize(e1) != cudaSuccess) {
            st = fail(MOE_ERR_CUDA, "%s: a replay failed", "graph bench");
            break;
        }
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        if (i >= warmup) times_ms[i - warmup] = ms;
    }
    if (st == MOE_OK) st = moe_layer_check_errors(L);
    for (int r = 0; r < R; r++) {
        if (ges && ges[r]) cudaGraphExecDestroy(ges[r]);
        if (gs && gs[r]) cudaGraphDestroy(gs[r]);
    }
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (s) cudaStreamDestroy(s);
    free(gs);
    free(ges);
    return st;
#else
    (void)L; (void)T; (void)in; (void)warmup; (void)iters; (void)times_ms;
    return fail(MOE_ERR_UNSUPPORTED, "%s needs a CUDA build", "--graph");
#endif
}

/* ------------------------------------------------------------------ routing ---- */

#define USAGE_TILE_ROWS 128 /* the row tile of the default grouped GEMMs (docs/KERNELS.md) */

moe_status bench_expert_usage(moe_layer *L, const moe_config *cfg, moe_dtype dt, int T,
                              void *const *hosts, int n, bench_usage *u)
{
    memset(u, 0, sizeof *u);
    moe_layer_info info = MOE_LAYER_INFO_INIT;
    MOE_TRY(moe_layer_info_get(L, &info));
    const int E = cfg->num_experts, k = cfg->top_k, H = cfg->hidden;
    const size_t es = moe_dtype_size(dt);
    void *logits = malloc((size_t)T * E * es + 1), *out = malloc((size_t)T * H * es + 1);
    void *tw = malloc((size_t)T * k * es + 1);
    int32_t *ids = malloc(sizeof(int32_t) * ((size_t)T * k + 1));
    u->counts = calloc((size_t)E, sizeof(int32_t));
    int32_t *c = calloc((size_t)E, sizeof(int32_t));
    moe_status st = logits && out && tw && ids && u->counts && c ? MOE_OK
                  : fail(MOE_ERR_NOMEM, "%s: out of memory", "expert usage");
    long touched = 0, rows = 0, slots = 0, with_rows = 0;
    double mom = 0;
    moe_error e = {0};
    for (int i = 0; i < n && st == MOE_OK; i++) {
        /* the layer's own logits (the routing is a pure function of them) */
        moe_tensor_view vx = {dt, 2, {T, H}, hosts[i]}, vo = {dt, 2, {T, H}, out},
                        vl = {dt, 2, {T, E}, logits};
        if ((st = moe_layer_forward(L, &vx, &vo, &vl)) != MOE_OK) break;
        if ((st = cpu_route_topk(cfg, dt, T, logits, ids, tw, &e)) != MOE_OK) {
            moe_fail(moe_thread_error(), st, "%s", e.msg);
            break;
        }
        memset(c, 0, (size_t)E * sizeof *c);
        for (long f = 0; f < (long)T * k; f++) c[ids[f]]++;
        if (i == 0) memcpy(u->counts, c, (size_t)E * sizeof *c);
        long r = 0, most = 0;
        for (int l = 0; l < info.num_local_experts; l++) {
            long v = c[info.local_experts[l]];
            touched += v > 0;
            r += v;
            slots += (v + USAGE_TILE_ROWS - 1) / USAGE_TILE_ROWS * USAGE_TILE_ROWS;
            if (v > most) most = v;
        }
        rows += r;
        if (r > 0) {
            mom += (double)most * info.num_local_experts / r;
            with_rows++;
        }
    }
    u->mean_touched = n > 0 ? (double)touched / n : 0;
    u->tile_fill = slots > 0 ? (double)rows / (double)slots : NAN;
    u->max_over_mean = with_rows > 0 ? mom / with_rows : NAN;
    free(logits);
    free(out);
    free(tw);
    free(ids);
    free(c);
    return st;
}

moe_status bench_baselines(moe_layer *L, moe_dtype dt, const int32_t *counts, int warmup,
                           int iters, double *dense_ms, double *loop_ms, double *grouped_ms)
{
    *dense_ms = *loop_ms = *grouped_ms = NAN;
#ifdef MOE_HAVE_CUDA
    if (L->backend != MOE_BACKEND_CUDA)
        return fail(MOE_ERR_UNSUPPORTED, "%s need the CUDA backend", "the cuBLAS baselines");
    /* the layer's own device weights; rows per local expert from the routing */
    int32_t *lc = malloc(sizeof(int32_t) * ((size_t)L->map.El + 1));
    if (!lc) return fail(MOE_ERR_NOMEM, "%s: out of memory", "baselines");
    for (int l = 0; l < L->map.El; l++) lc[l] = counts[L->map.local_ids[l]];
    moe_baseline_times bt;
    cudaSetDevice(L->device);
    moe_status st = moe_cuda_baselines(dt, L->map.El, L->H, L->I, L->w.w13, L->w.w2, lc, warmup,
                                       iters, &bt, moe_thread_error());
    free(lc);
    if (st == MOE_OK) {
        *dense_ms = bt.dense_ms;
        *loop_ms = bt.loop_ms;
        *grouped_ms = bt.grouped_ms;
    }
    return st;
#else
    (void)L; (void)dt; (void)counts; (void)warmup; (void)iters;
    return fail(MOE_ERR_UNSUPPORTED, "%s need a CUDA build", "the cuBLAS baselines");
#endif
}

/* ------------------------------------------------------------------ the device ---- */

void bench_device_info(const moe_layer *L, bench_device *d)
{
    memset(d, 0, sizeof *d);
    moe_layer_info info = MOE_LAYER_INFO_INIT;
    moe_layer_info_get(L, &info);
    /* the CSV/JSON "device" column: "cpu" on the CPU (the thread count has its own header
     * line, "# cpu: N threads"), the GPU's name on CUDA */
    snprintf(d->name, sizeof d->name, "%s",
             info.backend == MOE_BACKEND_CPU ? "cpu" : info.device_name);
    d->sm_count = info.backend == MOE_BACKEND_CPU ? L->threads : 0;
#ifdef MOE_HAVE_CUDA
    if (info.backend == MOE_BACKEND_CUDA) {
        struct cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, info.device) == cudaSuccess) d->sm_count = p.multiProcessorCount;
        moe_cuda_sm_clocks(info.device, &d->sm_clock_now_mhz, &d->sm_clock_max_mhz,
                           &d->sm_clock_nvml_max_mhz);
    }
#endif
}

moe_status bench_copy_bandwidth(const moe_layer *L, size_t bytes, int warmup, int iters,
                                double *gbs)
{
    *gbs = 0;
#ifdef MOE_HAVE_CUDA
    if (L->backend == MOE_BACKEND_CUDA) {
        cudaSetDevice(L->device);
        return moe_cuda_copy_bandwidth(bytes, warmup, iters, gbs, moe_thread_error());
    }
#endif
    char *src = malloc(bytes), *dst = malloc(bytes);
    double *t = malloc(sizeof(double) * (size_t)iters);
    if (!src || !dst || !t) {
        free(src);
        free(dst);
        free(t);
        return fail(MOE_ERR_NOMEM, "%s: out of memory", "copy bandwidth");
    }
    omp_set_num_threads(L->threads);
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
