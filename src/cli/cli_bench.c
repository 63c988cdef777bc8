/* cli_bench.c — `moe-ep bench`: an nccl-tests-style sweep over token counts of the fused MoE
 * block (forward, backward or both), one row per size: median time, TFLOP/s, GB/s, % of the
 * roofline, the per-phase breakdown, in-process baselines where the backend has them, and
 * #wrong from an optional correctness check of every size.
 *
 * Counting (docs/PERF.md says the same): FLOPs = 2*M*N*K per expert GEMM with M = T*k routed
 * rows, i.e. 6*M*H*I forward (gate/up and down); backward (dX + dW) = 2x forward. Routing and
 * the shared expert are timed but not counted, as in the anchors' "fused MLP" numbers. Bytes =
 * the expert weights actually touched (experts with at least one row) + x read + out written:
 * the least any implementation must move; the touched experts are counted from the real routing
 * of the rotated input sets (mean over the sets). Roofline time = max(FLOPs / peak FLOP/s,
 * bytes / peak bandwidth).
 *
 * Weight streaming (small T): %copy = (touched expert weight bytes / our time) / the copy
 * bandwidth measured once per run (device-to-device cudaMemcpyAsync on CUDA, threaded memcpy
 * on the CPU; copy GB/s counts read + write bytes, i.e. DRAM traffic).
 * --graph (CUDA, fwd): each size's forward (routing included) is also captured into a CUDA
 * graph per input set and replays are timed alone with events; the graph(ms) column is their
 * median, beside (not instead of) the eager time column.
 * %fill: the routed rows' share of the row slots of 128-row tiles (sum over the local experts of
 * ceil(rows_e / 128) tiles; all input sets' rows over all their slots): the padding that a grouped GEMM with
 * 128-row tiles computes or streams weights for, and a dense GEMM of the same M does not. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "block_state.h"
#include "check.h"
#include "cli.h"
#include "cli_opts.h"
#include "config.h"
#include "dtype.h"
#include "engine.h"
#include "rng.h"
#include "weights.h"

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* CSV / JSON numbers: NaN (not measured in this run) is an empty CSV field / JSON null, so a
 * plot skips it instead of reading 0. */
static void csv_num(FILE *f, const char *fmt, double v)
{
    fputc(',', f);
    if (!isnan(v)) fprintf(f, fmt, v);
}

static void json_num(FILE *f, const char *key, const char *fmt, double v)
{
    fprintf(f, ",\"%s\":", key);
    if (!isfinite(v)) fputs("null", f); /* JSON has no NaN or infinity */
    else fprintf(f, fmt, v);
}

/* A text field for CSV (quoted, quotes doubled) or JSON (quoted, quotes/backslashes escaped). */
static void put_quoted(FILE *f, const char *v, bool json)
{
    fputc('"', f);
    for (const char *c = v; *c; c++) {
        if (*c == '"') fputs(json ? "\\\"" : "\"\"", f);
        else if (*c == '\\' && json) fputs("\\\\", f);
        else if ((unsigned char)*c >= 0x20) fputc(*c, f);
    }
    fputc('"', f);
}

static void print_cell(double v, int width, const char *fmt)
{
    if (isnan(v)) printf(" %*s", width, "-");
    else printf(fmt, width, v);
}

int cli_bench(int argc, char **argv)
{
    const char *model = "tiny-qwen3", *dtype_s = NULL, *backend_s = "auto", *mode_s = "fwd";
    const char *json_path = NULL, *csv_path = NULL, *peak_tf_s = NULL, *peak_bw_s = NULL;
    int tmin = 16, tmax = 256, factor = 2, warmup = 3, iters = 10, rotate = 0, threads = 0;
    int copy_mib = -1; /* -1: the backend's default */
    uint64_t seed = 1;
    bool check = false, graph = false, routed_only = false;
    const char *kcfg = NULL, *tcache = NULL;
    bool autotune = false, exact_hf = false;
    cli_opt opts[] = {
        {"model", OPT_STRING, "PRESET|config.json", "model (default tiny-qwen3)", .str = &model},
        {"min-tokens", OPT_INT, "T", "smallest token count (default 16)", .alias = 'b', .i = &tmin, .min = 1},
        {"max-tokens", OPT_INT, "T", "largest token count (default 256)", .alias = 'e', .i = &tmax, .min = 1},
        {"step-factor", OPT_INT, "F", "multiply T by F between sizes (default 2)", .alias = 'f', .i = &factor, .min = 2},
        {"warmup", OPT_INT, "N", "untimed repetitions per size (default 3)", .alias = 'w', .i = &warmup, .min = 0},
        {"iters", OPT_INT, "N", "timed repetitions per size; the median is reported (default 10)", .alias = 'n', .i = &iters, .min = 1},
        {"mode", OPT_STRING, "fwd|bwd|fwdbwd", "what is timed (default fwd)", .str = &mode_s},
        {"dtype", OPT_STRING, "bf16|fp16|fp32", "dtype (default: the config's)", .str = &dtype_s},
        {"backend", OPT_STRING, "cpu|cuda|auto", "backend (default auto)", .str = &backend_s},
        {"check", OPT_FLAG, NULL, "verify every size against the reference first (#wrong column; exit 1 if any)", .alias = 'c', .flag = &check},
        {"graph", OPT_FLAG, NULL, "CUDA, --mode fwd: also time CUDA-graph replays of the whole forward, routing included (graph(ms) column; default off)", .flag = &graph},
        {"copy-mib", OPT_INT, "N", "size of the copy-bandwidth probe for %copy in MiB; 0 skips it (default 1024 on cuda, 256 on cpu)", .i = &copy_mib, .min = 0},
        {"rotate", OPT_INT, "N", "input sets rotated through so runs do not reuse a warm cache (default: enough for 128 MB at the smallest T, 2..16)", .i = &rotate, .min = 0},
        {"json", OPT_STRING, "FILE", "also write the rows as JSON", .alias = 'J', .str = &json_path},
        {"csv", OPT_STRING, "FILE", "also write the rows as CSV (launch/plot_bench.sh plots it)", .str = &csv_path},
        {"peak-tflops", OPT_STRING, "X", "compute ceiling for the roofline (default: 791 on cuda, none on cpu)", .str = &peak_tf_s},
        {"peak-gbs", OPT_STRING, "X", "bandwidth ceiling in GB/s for the roofline (default: the copy bandwidth measured at start on cuda, 3000 if not measured; none on cpu)", .str = &peak_bw_s},
        {"routed-only", OPT_FLAG, NULL, "leave Llama-4's shared expert out: time the routed experts alone (routing, both grouped GEMMs, combine), as the anchors' fused-MLP figures do (default off)", .flag = &routed_only},
        {"seed", OPT_U64, "S", "generator seed (default 1)", .u64 = &seed},
        {"threads", OPT_INT, "N", "CPU threads (default: all cores)", .i = &threads, .min = 0},
        {"kernel-config", OPT_STRING, "CFG", "CUDA: force every grouped GEMM to CFG (e.g. 128x128x64,w8,s3 or 128x256x64,w12,s3,tma,staged; syntax: docs/KERNELS.md; default auto)", .str = &kcfg},
        {"autotune", OPT_FLAG, NULL, "CUDA: time the compiled GEMM configs on the real shapes and use the fastest (cached)", .flag = &autotune},
        {"autotune-cache", OPT_STRING, "PATH", "autotune cache file (default $MOE_AUTOTUNE_CACHE or ~/.cache/moe-ep/autotune.json)", .str = &tcache},
        {"exact-hf-rounding", OPT_FLAG, NULL, "CUDA: round where HF does in the Hopper grouped GEMMs (x*score rounded before GEMM1, IEEE SiLU) instead of the faster defaults (docs/KERNELS.md); the CPU backend always does", .flag = &exact_hf},
        {0},
    };
    const char *syn = "[--model M] [-b T] [-e T] [-f F] [-w N] [-n N] [--mode fwd|bwd|fwdbwd] [--check] [--graph] [--json F] [--csv F]";
    const char *desc =
        "Times the fused MoE block over a sweep of token counts (T = min, min*f, ... <= max) and prints\n"
        "one row per size: median time (CUDA events on the GPU, eager launches), TFLOP/s (expert GEMMs:\n"
        "6*T*k*H*I forward, twice that backward), GB/s (touched expert weights + input + output), % of\n"
        "the roofline, %copy (fwd: touched expert weight bytes / time, as a share of the copy bandwidth\n"
        "measured once at start), the phase breakdown, and on CUDA (fwd) the cuBLAS baselines (dense\n"
        "ceiling, per-expert loop, grouped batched) with ratios. exp = experts touched; %fill = routed\n"
        "rows / the row slots of the 128-row tiles they need (padding a dense GEMM does not pay).\n"
        "--graph adds graph(ms): the median CUDA-graph replay of the whole forward (routing included,\n"
        "no host sync). The header names the GPU, its SM clocks, the copy bandwidth; the grouped-GEMM\n"
        "kernel configurations are printed as '# kernels' lines whenever they change between sizes.";
    int rc = cli_parse("bench", syn, desc, opts, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (tmin > tmax) {
        fprintf(stderr, "moe-ep bench: -b %d is larger than -e %d\n", tmin, tmax);
        return 2;
    }
    if (threads > 0) omp_set_num_threads(threads);
    moe_bench_mode mode;
    if (strcmp(mode_s, "fwd") == 0) mode = MOE_BENCH_FWD;
    else if (strcmp(mode_s, "bwd") == 0) mode = MOE_BENCH_BWD;
    else if (strcmp(mode_s, "fwdbwd") == 0) mode = MOE_BENCH_FWDBWD;
    else {
        fprintf(stderr, "moe-ep bench: --mode expects fwd, bwd or fwdbwd, got '%s'\n", mode_s);
        return 2;
    }
    moe_error err = {0};
    moe_config cfg;
    if (moe_config_resolve(model, &cfg, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep bench: --model: %s\n", err.msg);
        return 2;
    }
    moe_dtype dt = cfg.dtype;
    if (dtype_s && (!moe_dtype_parse(dtype_s, &dt) || dt == MOE_DTYPE_F64)) {
        fprintf(stderr, "moe-ep bench: --dtype expects bf16, fp16 or fp32, got '%s'\n", dtype_s);
        return 2;
    }
    moe_backend backend;
    if (!cli_parse_backend(backend_s, &backend)) {
        fprintf(stderr, "moe-ep bench: --backend expects cpu, cuda or auto, got '%s'\n", backend_s);
        return 2;
    }
    if (graph && backend != MOE_BACKEND_CUDA) {
        fprintf(stderr, "moe-ep bench: --graph times CUDA-graph replays and needs the CUDA backend; this run uses the CPU backend\n");
        return 2;
    }
    if (graph && mode != MOE_BENCH_FWD) {
        fprintf(stderr, "moe-ep bench: --graph times the forward layer only; use it with --mode fwd (got --mode %s)\n", mode_s);
        return 2;
    }
    double peak_tf = backend == MOE_BACKEND_CUDA ? 791.0 : 0, peak_bw = backend == MOE_BACKEND_CUDA ? 3000.0 : 0;
    if (peak_tf_s) peak_tf = atof(peak_tf_s);
    if (peak_bw_s) peak_bw = atof(peak_bw_s);
    if (copy_mib < 0) copy_mib = backend == MOE_BACKEND_CUDA ? 1024 : 256;

    const int H = cfg.hidden, I = cfg.inter, E = cfg.num_experts, k = cfg.top_k;
    const size_t esz = moe_dtype_size(dt);
    moe_weights w = {0};
    moe_engine *eng = NULL;
    void **xs = NULL, *dout = NULL;
    double *times = NULL;
    FILE *jf = NULL, *cf = NULL;
    int status = 1, nx = 0;
    bool any_wrong = false;
    const char *backend_name = backend == MOE_BACKEND_CUDA ? "cuda" : "cpu";

    if (moe_weights_random(&cfg, seed, 0, E, dt, &w, &err) != MOE_OK) goto fail;
    if (routed_only) { /* the engine (and --check's reference) run no shared expert then */
        cfg.shared_inter = 0;
        w.cfg.shared_inter = 0;
    }
    if (moe_engine_create(backend, &w, dt, tmax, &eng, &err) != MOE_OK) goto fail;
    {
        moe_engine_options eo = {.kernel_config = kcfg, .autotune = autotune, .autotune_cache = tcache,
                                 .exact_hf_rounding = exact_hf};
        if (moe_engine_configure(eng, &eo, &err) != MOE_OK) goto fail;
    }
    if (rotate <= 0) { /* enough sets that the smallest size's inputs exceed a 50 MB L2 twice */
        size_t one = (size_t)tmin * H * esz;
        rotate = (int)MOE_MIN(16, MOE_MAX(2, (128u << 20) / (one ? one : 1)));
    }
    xs = calloc((size_t)rotate, sizeof *xs);
    times = malloc(sizeof(double) * (size_t)iters);
    dout = moe_malloc((size_t)tmax * H * esz, "bench grad_output", &err);
    if (!xs || !times || !dout) { moe_fail(&err, MOE_ERR_NOMEM, "bench buffers"); goto fail; }
    for (nx = 0; nx < rotate; nx++) {
        xs[nx] = moe_malloc((size_t)tmax * H * esz, "bench input", &err);
        if (!xs[nx]) goto fail;
        char name[32];
        snprintf(name, sizeof name, "bench.x%d", nx);
        moe_fill_normal(dt, xs[nx], (size_t)tmax * H, seed, name, 0, 1.0);
    }
    moe_fill_normal(dt, dout, (size_t)tmax * H, seed, "bench.dout", 0, 1.0);
    if (json_path && !(jf = fopen(json_path, "w"))) { moe_fail(&err, MOE_ERR_IO, "cannot write %s", json_path); goto fail; }
    if (csv_path && !(cf = fopen(csv_path, "w"))) { moe_fail(&err, MOE_ERR_IO, "cannot write %s", csv_path); goto fail; }

    moe_device_info dev;
    moe_engine_device_info(eng, &dev);
    for (char *c = dev.name; *c; c++) /* the name goes into CSV fields and a plot title */
        if (*c == ',' || *c == '"' || *c == '\n') *c = ' ';
    double copy_gbs = NAN;
    if (copy_mib > 0) {
        double g = 0;
        if (moe_engine_copy_bandwidth(eng, (size_t)copy_mib << 20, MOE_MAX(1, warmup), MOE_MAX(5, iters), &g, &err) != MOE_OK)
            goto fail;
        if (g > 0) copy_gbs = g;
    }
    /* the roofline's bandwidth: what this GPU's copy reaches (an H100 ~3.0 TB/s, an H200 ~4.3) */
    const bool peak_bw_measured = !peak_bw_s && backend == MOE_BACKEND_CUDA && !isnan(copy_gbs);
    if (peak_bw_measured) peak_bw = copy_gbs;

    printf("# moe-ep bench: %s (H=%d I=%d E=%d k=%d%s), %s, mode %s, backend %s\n", cfg.name, H,
           I, E, k, cfg.shared_inter ? ", shared expert" : routed_only ? ", routed experts only" : "", moe_dtype_name(dt), mode_s,
           moe_engine_describe(eng));
    if (backend == MOE_BACKEND_CUDA) {
        char now[32] = "n/a (no NVML)", nmax[48] = "";
        if (dev.sm_clock_now_mhz > 0) snprintf(now, sizeof now, "%d MHz", dev.sm_clock_now_mhz);
        if (dev.sm_clock_nvml_max_mhz > 0) snprintf(nmax, sizeof nmax, ", NVML max %d MHz", dev.sm_clock_nvml_max_mhz);
        printf("# gpu: %s, %d SMs, SM clock now %s, max %d MHz (cudaDevAttrClockRate%s)\n", dev.name,
               dev.sm_count, now, dev.sm_clock_max_mhz, nmax);
    } else {
        printf("# cpu: %d threads\n", dev.sm_count);
    }
    if (!isnan(copy_gbs))
        printf("# copy bandwidth: %.1f GB/s (%s of %d MiB, (read+write bytes) / median time); %%copy = touched\n"
               "# expert weight bytes / our time / that bandwidth%s\n",
               copy_gbs, backend == MOE_BACKEND_CUDA ? "device-to-device cudaMemcpyAsync" : "threaded memcpy",
               copy_mib, mode == MOE_BENCH_FWD ? "" : " (fwd mode only)");
    else
        printf("# copy bandwidth: not measured (--copy-mib 0): no %%copy\n");
    if (backend == MOE_BACKEND_CUDA)
        printf("# kernels: grouped-GEMM configurations as launched (%s), printed below whenever they change\n",
               autotune ? "autotuned" : kcfg ? "forced by --kernel-config" : "default heuristics");
    else
        printf("# kernels: the CPU twin (OpenMP), no GPU kernel configurations\n");
    if (backend == MOE_BACKEND_CUDA && mode == MOE_BENCH_FWD)
        printf("# baselines (cuBLAS, same weights, GEMM pair only, rows pre-permuted): dense = M=T*k rows vs one\n"
               "# expert's weights (ceiling), loop = one GEMM pair per expert, grouped = cublasGemmGroupedBatchedEx;\n"
               "# 'x Y' = Y's time / ours (>1: we are faster). Our time is the whole layer, routing included.\n");
    if (backend == MOE_BACKEND_CUDA)
        printf("# phases (ms, medians of a separate pass with events between the launches): route = router GEMM\n"
               "# + top-k, permute = counting sort + offsets, gemm1 (SiLU-and-mul fused: act '-'), gemm2 (permute_y,\n"
               "# weights), combine = sum over k after joining the shared expert's stream%s\n",
               mode == MOE_BENCH_FWD ? "" : "; with a backward timed, only route");
    else
        printf("# phases: not split on the CPU backend (only the whole layer is timed)\n");
    if (graph)
        printf("# graph(ms): median replay of the forward captured in a CUDA graph (one graph per input set,\n"
               "# routing included, events around each cudaGraphLaunch); time(ms) stays the eager launches.\n");
    printf("# warmup %d, iters %d (median), %d rotating input sets, seed %llu; FLOPs = %s x 6*T*k*H*I\n",
           warmup, iters, rotate, (unsigned long long)seed, mode == MOE_BENCH_FWD ? "1" : mode == MOE_BENCH_BWD ? "2" : "3");
    if (peak_tf > 0)
        printf("# roofline: %.0f TFLOP/s, %.0f GB/s%s\n", peak_tf, peak_bw,
               peak_bw_measured ? " (the measured copy bandwidth)" : "");
    printf("%8s %8s %10s %10s %9s %7s %7s %6s %6s", "T", "M", "time(ms)", "TFLOP/s", "GB/s", "%roof", "%copy", "exp", "%fill");
    if (graph) printf(" %10s %7s", "graph(ms)", "%copy g");
    for (int p = 0; p < MOE_PHASE_COUNT; p++) printf(" %8s", moe_phase_names[p]);
    bool baselines = backend == MOE_BACKEND_CUDA && mode == MOE_BENCH_FWD;
    if (baselines) printf(" %9s %9s %9s %7s %7s %7s", "dense", "loop", "grouped", "x dense", "x loop", "x grp");
    printf(" %7s\n", "#wrong");
    if (cf) {
        fprintf(cf, "model,dtype,mode,backend,device,T,M,time_ms,tflops,gbs,pct_roofline,experts_touched,"
                    "weight_bytes,tile_fill,max_over_mean,copy_gbs,pct_copy,graph_ms,graph_tflops,graph_pct_copy");
        for (int p = 0; p < MOE_PHASE_COUNT; p++) fprintf(cf, ",%s_ms", moe_phase_names[p]);
        fprintf(cf, ",dense_ms,loop_ms,grouped_ms,dense_tflops,loop_tflops,grouped_tflops,x_dense,x_loop,x_grouped,wrong,kernels\n");
    }
    if (jf) {
        fprintf(jf, "{\"model\":\"%s\",\"dtype\":\"%s\",\"mode\":\"%s\",\"backend\":", cfg.name,
                moe_dtype_name(dt), mode_s);
        put_quoted(jf, moe_engine_describe(eng), true);
        fprintf(jf, ",\"device\":");
        put_quoted(jf, dev.name, true);
        fprintf(jf, ",\"sm_clock_now_mhz\":%d,\"sm_clock_max_mhz\":%d", dev.sm_clock_now_mhz, dev.sm_clock_max_mhz);
        json_num(jf, "copy_gbs", "%.2f", copy_gbs);
        fprintf(jf, ",\"copy_mib\":%d,\"graph\":%s,\"warmup\":%d,\"iters\":%d,\"rotate\":%d,\"rows\":[",
                copy_mib, graph ? "true" : "false", warmup, iters, rotate);
    }

    bool first = true;
    char prev_ks[1024] = "";
    for (long T = tmin; T <= tmax; T *= factor) {
        int wrong = 0;
        if (check) {
            moe_fwd_state st;
            if (moe_fwd_state_alloc(&cfg, dt, (int)T, true, &st, &err) != MOE_OK) goto fail;
            moe_fwd_state_poison(&cfg, dt, &st);
            moe_check_report rep;
            moe_check_report_init(&rep);
            moe_check_options co = {.sample = 16, .seed = seed + (uint64_t)T};
            moe_status s = moe_engine_forward(eng, (int)T, xs[0], &st, &err);
            if (s == MOE_OK) s = moe_check_forward(&w, dt, (int)T, xs[0], &st, &co, &rep, &err);
            moe_fwd_state_free(&st);
            if (s != MOE_OK) goto fail;
            for (int r = 0; r < rep.count; r++) wrong += !rep.rows[r].pass;
            if (wrong) {
                any_wrong = true;
                moe_check_print(&rep, stderr);
            }
        }
        double phases[MOE_PHASE_COUNT];
        if (moe_engine_time(eng, mode, (int)T, (const void *const *)xs, dout, rotate, warmup, iters,
                            times, phases, &err) != MOE_OK)
            goto fail;
        double ms = median(times, iters);
        double gms = NAN;
        if (graph) {
            if (moe_engine_graph_time(eng, (int)T, (const void *const *)xs, rotate, warmup, iters, times, &err) != MOE_OK)
                goto fail;
            gms = median(times, iters);
        }
        moe_expert_usage usage;
        if (moe_engine_expert_usage(eng, (int)T, (const void *const *)xs, rotate, &usage, &err) != MOE_OK)
            goto fail;
        const double touched = usage.mean_touched;
        long M = T * k;
        double mult = mode == MOE_BENCH_FWD ? 1 : mode == MOE_BENCH_BWD ? 2 : 3;
        double flops = mult * 6.0 * (double)M * H * I;
        double wbytes = touched * 3.0 * H * I * esz;
        double bytes = wbytes + 2.0 * T * H * esz;
        double tflops = flops / (ms * 1e-3) / 1e12, gbs = bytes / (ms * 1e-3) / 1e9;
        double roof = NAN;
        if (peak_tf > 0 && peak_bw > 0)
            roof = 100.0 * fmax(flops / (peak_tf * 1e12), bytes / (peak_bw * 1e9)) * 1e3 / ms;
        double pcopy = NAN, gpcopy = NAN, gtflops = NAN;
        if (mode == MOE_BENCH_FWD && !isnan(copy_gbs)) {
            pcopy = 100.0 * wbytes / (ms * 1e-3) / 1e9 / copy_gbs;
            if (graph) gpcopy = 100.0 * wbytes / (gms * 1e-3) / 1e9 / copy_gbs;
        }
        if (graph) gtflops = flops / (gms * 1e-3) / 1e12;
        double bd = NAN, bl = NAN, bg = NAN;
        if (baselines) {
            /* the routed rows per expert of this batch, for the per-expert and grouped baselines */
            moe_fwd_state st;
            if (moe_fwd_state_alloc(&cfg, dt, (int)T, false, &st, &err) != MOE_OK) goto fail;
            moe_status s = moe_engine_forward(eng, (int)T, xs[0], &st, &err);
            if (s == MOE_OK)
                s = moe_engine_baselines(eng, st.token_counts, warmup, iters, &bd, &bl, &bg, &err);
            moe_fwd_state_free(&st);
            if (s != MOE_OK) goto fail;
        }
        char ks[1024];
        moe_engine_kernel_summary(eng, ks, sizeof ks);
        if (ks[0] && strcmp(ks, prev_ks) != 0) {
            printf("# kernels from T=%ld: %s\n", T, ks);
            snprintf(prev_ks, sizeof prev_ks, "%s", ks);
        }
        printf("%8ld %8ld %10.4f %10.3f %9.1f", T, M, ms, tflops, gbs);
        print_cell(roof, 7, " %*.1f");
        print_cell(pcopy, 7, " %*.1f");
        printf(" %6.1f", touched);
        print_cell(100.0 * usage.tile_fill, 6, " %*.1f");
        if (graph) {
            print_cell(gms, 10, " %*.4f");
            print_cell(gpcopy, 7, " %*.1f");
        }
        for (int p = 0; p < MOE_PHASE_COUNT; p++) print_cell(phases[p], 8, " %*.4f");
        if (baselines) printf(" %9.4f %9.4f %9.4f %7.3f %7.3f %7.3f", bd, bl, bg, bd / ms, bl / ms, bg / ms);
        if (check) printf(" %7d\n", wrong);
        else printf(" %7s\n", "n/a");
        fflush(stdout);
        double btf[3] = {flops / (bd * 1e-3) / 1e12, flops / (bl * 1e-3) / 1e12, flops / (bg * 1e-3) / 1e12};
        if (cf) {
            fprintf(cf, "%s,%s,%s,%s,%s,%ld,%ld,%.6f,%.4f,%.2f", cfg.name, moe_dtype_name(dt), mode_s,
                    backend_name, dev.name, T, M, ms, tflops, gbs);
            csv_num(cf, "%.2f", roof);
            fprintf(cf, ",%.4f,%.0f", touched, wbytes);
            csv_num(cf, "%.4f", usage.tile_fill);
            csv_num(cf, "%.3f", usage.max_over_mean);
            csv_num(cf, "%.2f", copy_gbs);
            csv_num(cf, "%.2f", pcopy);
            csv_num(cf, "%.6f", gms);
            csv_num(cf, "%.4f", gtflops);
            csv_num(cf, "%.2f", gpcopy);
            for (int p = 0; p < MOE_PHASE_COUNT; p++) csv_num(cf, "%.6f", phases[p]);
            csv_num(cf, "%.6f", bd);
            csv_num(cf, "%.6f", bl);
            csv_num(cf, "%.6f", bg);
            for (int b = 0; b < 3; b++) csv_num(cf, "%.4f", btf[b]);
            csv_num(cf, "%.4f", bd / ms);
            csv_num(cf, "%.4f", bl / ms);
            csv_num(cf, "%.4f", bg / ms);
            fprintf(cf, ",%d,", check ? wrong : -1);
            put_quoted(cf, ks[0] ? ks : backend_name, false);
            fputc('\n', cf);
        }
        if (jf) {
            fprintf(jf, "%s{\"T\":%ld,\"M\":%ld,\"time_ms\":%.6f,\"tflops\":%.4f,\"gbs\":%.2f",
                    first ? "" : ",", T, M, ms, tflops, gbs);
            json_num(jf, "pct_roofline", "%.2f", roof);
            fprintf(jf, ",\"experts_touched\":%.4f,\"weight_bytes\":%.0f", touched, wbytes);
            json_num(jf, "tile_fill", "%.4f", usage.tile_fill);
            json_num(jf, "max_over_mean", "%.3f", usage.max_over_mean);
            json_num(jf, "pct_copy", "%.2f", pcopy);
            json_num(jf, "graph_ms", "%.6f", gms);
            json_num(jf, "graph_tflops", "%.4f", gtflops);
            json_num(jf, "graph_pct_copy", "%.2f", gpcopy);
            fprintf(jf, ",\"wrong\":%d", check ? wrong : -1);
            for (int p = 0; p < MOE_PHASE_COUNT; p++) {
                char key[32];
                snprintf(key, sizeof key, "%s_ms", moe_phase_names[p]);
                json_num(jf, key, "%.6f", phases[p]);
            }
            json_num(jf, "dense_ms", "%.6f", bd);
            json_num(jf, "loop_ms", "%.6f", bl);
            json_num(jf, "grouped_ms", "%.6f", bg);
            json_num(jf, "dense_tflops", "%.4f", btf[0]);
            json_num(jf, "loop_tflops", "%.4f", btf[1]);
            json_num(jf, "grouped_tflops", "%.4f", btf[2]);
            json_num(jf, "x_dense", "%.4f", bd / ms);
            json_num(jf, "x_loop", "%.4f", bl / ms);
            json_num(jf, "x_grouped", "%.4f", bg / ms);
            fprintf(jf, ",\"kernels\":");
            put_quoted(jf, ks[0] ? ks : backend_name, true);
            fprintf(jf, "}");
        }
        first = false;
        if (T > tmax / factor) break; /* no overflow past tmax */
    }
    if (jf) fprintf(jf, "]}\n");
    if (backend == MOE_BACKEND_CUDA) {
        moe_device_info after;
        moe_engine_device_info(eng, &after);
        if (after.sm_clock_now_mhz > 0) printf("# SM clock after the sweep: %d MHz\n", after.sm_clock_now_mhz);
    }
    printf("# %s\n", check ? (any_wrong ? "WRONG results: see the stage tables on stderr" : "all sizes verified against the reference (16 sampled tokens/rows per stage)") : "results not verified (add --check)");
    status = any_wrong ? 1 : 0;
    goto out;
fail:
    fprintf(stderr, "moe-ep bench: %s\n", err.msg);
    status = 1;
out:
    if (jf) fclose(jf);
    if (cf) fclose(cf);
    for (int i = 0; i < nx; i++) free(xs[i]);
    free(xs); free(dout); free(times);
    moe_engine_destroy(eng);
    moe_weights_free(&w);
    return status;
}
