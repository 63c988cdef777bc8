/* cli_bench.c — `moe-ep bench`: an nccl-tests-style sweep over token counts of the fused MoE
 * block (forward, backward or both), one row per size: median time, TFLOP/s, GB/s, % of the
 * roofline, the per-phase breakdown, in-process baselines where the backend has them, and
 * #wrong from an optional correctness check of every size.
 *
 * Counting (docs/PERF.md says the same): FLOPs = 2*M*N*K per expert GEMM with M = T*k routed
 * rows, i.e. 6*M*H*I forward (gate/up and down); backward (dX + dW) = 2x forward. Routing and
 * the shared expert are timed but not counted, as in the anchors' "fused MLP" numbers. Bytes =
 * the expert weights actually touched (experts with at least one row) + x read + out written:
 * the least any implementation must move. Roofline time = max(FLOPs / peak FLOP/s, bytes /
 * peak bandwidth). */
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

int cli_bench(int argc, char **argv)
{
    const char *model = "tiny-qwen3", *dtype_s = NULL, *backend_s = "auto", *mode_s = "fwd";
    const char *json_path = NULL, *csv_path = NULL, *peak_tf_s = NULL, *peak_bw_s = NULL;
    int tmin = 16, tmax = 256, factor = 2, warmup = 3, iters = 10, rotate = 0, threads = 0;
    uint64_t seed = 1;
    bool check = false;
    const char *kcfg = NULL, *tcache = NULL;
    bool autotune = false;
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
        {"rotate", OPT_INT, "N", "input sets rotated through so runs do not reuse a warm cache (default: enough for 64 MB)", .i = &rotate, .min = 0},
        {"json", OPT_STRING, "FILE", "also write the rows as JSON", .alias = 'J', .str = &json_path},
        {"csv", OPT_STRING, "FILE", "also write the rows as CSV", .str = &csv_path},
        {"peak-tflops", OPT_STRING, "X", "compute ceiling for the roofline (default: 791 on cuda, none on cpu)", .str = &peak_tf_s},
        {"peak-gbs", OPT_STRING, "X", "bandwidth ceiling in GB/s for the roofline (default: 3000 on cuda, none on cpu)", .str = &peak_bw_s},
        {"seed", OPT_U64, "S", "generator seed (default 1)", .u64 = &seed},
        {"threads", OPT_INT, "N", "CPU threads (default: all cores)", .i = &threads, .min = 0},
        {"kernel-config", OPT_STRING, "CFG", "CUDA: force every grouped GEMM to CFG (e.g. 128x128x64,w8,s3; default auto)", .str = &kcfg},
        {"autotune", OPT_FLAG, NULL, "CUDA: time the compiled GEMM configs on the real shapes and use the fastest (cached)", .flag = &autotune},
        {"autotune-cache", OPT_STRING, "PATH", "autotune cache file (default $MOE_AUTOTUNE_CACHE or ~/.cache/moe-ep/autotune.json)", .str = &tcache},
        {0},
    };
    const char *syn = "[--model M] [-b T] [-e T] [-f F] [-w N] [-n N] [--mode fwd|bwd|fwdbwd] [--check] [--json F] [--csv F]";
    const char *desc =
        "Times the fused MoE block over a sweep of token counts (T = min, min*f, ... <= max) and prints\n"
        "one row per size: median time, TFLOP/s (expert GEMMs: 6*T*k*H*I forward, twice that backward),\n"
        "GB/s (touched expert weights + input + output), % of the roofline, and the phase breakdown.";
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
    double peak_tf = backend == MOE_BACKEND_CUDA ? 791.0 : 0, peak_bw = backend == MOE_BACKEND_CUDA ? 3000.0 : 0;
    if (peak_tf_s) peak_tf = atof(peak_tf_s);
    if (peak_bw_s) peak_bw = atof(peak_bw_s);

    const int H = cfg.hidden, I = cfg.inter, E = cfg.num_experts, k = cfg.top_k;
    const size_t esz = moe_dtype_size(dt);
    moe_weights w = {0};
    moe_engine *eng = NULL;
    void **xs = NULL, *dout = NULL;
    double *times = NULL;
    FILE *jf = NULL, *cf = NULL;
    int status = 1, nx = 0;
    bool any_wrong = false;

    if (moe_weights_random(&cfg, seed, 0, E, dt, &w, &err) != MOE_OK) goto fail;
    if (moe_engine_create(backend, &w, dt, tmax, &eng, &err) != MOE_OK) goto fail;
    {
        moe_engine_options eo = {.kernel_config = kcfg, .autotune = autotune, .autotune_cache = tcache};
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

    printf("# moe-ep bench: %s (H=%d I=%d E=%d k=%d%s), %s, mode %s, backend %s\n", cfg.name, H,
           I, E, k, cfg.shared_inter ? ", shared expert" : "", moe_dtype_name(dt), mode_s,
           moe_engine_describe(eng));
    if (backend == MOE_BACKEND_CUDA && mode == MOE_BENCH_FWD)
        printf("# baselines (cuBLAS, same weights, GEMM pair only, rows pre-permuted): dense = M=T*k rows vs one\n"
               "# expert's weights (ceiling), loop = one GEMM pair per expert, grouped = cublasGemmGroupedBatchedEx;\n"
               "# 'x Y' = Y's time / ours (>1: we are faster). Our time is the whole layer, routing included.\n");
    printf("# warmup %d, iters %d (median), %d rotating input sets, seed %llu; FLOPs = %s x 6*T*k*H*I\n",
           warmup, iters, rotate, (unsigned long long)seed, mode == MOE_BENCH_FWD ? "1" : mode == MOE_BENCH_BWD ? "2" : "3");
    if (peak_tf > 0) printf("# roofline: %.0f TFLOP/s, %.0f GB/s\n", peak_tf, peak_bw);
    printf("%8s %8s %10s %10s %9s %7s", "T", "M", "time(ms)", "TFLOP/s", "GB/s", "%roof");
    for (int p = 0; p < MOE_PHASE_COUNT; p++) printf(" %8s", moe_phase_names[p]);
    bool baselines = backend == MOE_BACKEND_CUDA && mode == MOE_BENCH_FWD;
    if (baselines) printf(" %9s %9s %9s %7s %7s %7s", "dense", "loop", "grouped", "x dense", "x loop", "x grp");
    printf(" %7s\n", "#wrong");
    if (cf) {
        fprintf(cf, "model,dtype,mode,backend,T,M,time_ms,tflops,gbs,pct_roofline");
        for (int p = 0; p < MOE_PHASE_COUNT; p++) fprintf(cf, ",%s_ms", moe_phase_names[p]);
        fprintf(cf, ",wrong\n");
    }
    if (jf) fprintf(jf, "{\"model\":\"%s\",\"dtype\":\"%s\",\"mode\":\"%s\",\"backend\":\"%s\",\"rows\":[",
                    cfg.name, moe_dtype_name(dt), mode_s, moe_engine_describe(eng));

    bool first = true;
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
        long M = T * k;
        double mult = mode == MOE_BENCH_FWD ? 1 : mode == MOE_BENCH_BWD ? 2 : 3;
        double flops = mult * 6.0 * (double)M * H * I;
        /* experts touched: with M routed rows over E experts at least min(E, M) distinct ones
         * are needed; the exact count depends on routing, so count the expected value for
         * uniform routing: E * (1 - (1 - 1/E)^M). */
        double touched = E * (1.0 - pow(1.0 - 1.0 / E, (double)M));
        double bytes = touched * 3.0 * H * I * esz + 2.0 * T * H * esz;
        double tflops = flops / (ms * 1e-3) / 1e12, gbs = bytes / (ms * 1e-3) / 1e9;
        double roof_ms = 0;
        if (peak_tf > 0) roof_ms = fmax(flops / (peak_tf * 1e12), bytes / (peak_bw * 1e9)) * 1e3;
        char roof[16] = "-";
        if (roof_ms > 0) snprintf(roof, sizeof roof, "%.1f", 100.0 * roof_ms / ms);
        printf("%8ld %8ld %10.4f %10.3f %9.1f %7s", T, M, ms, tflops, gbs, roof);
        for (int p = 0; p < MOE_PHASE_COUNT; p++) {
            if (isnan(phases[p])) printf(" %8s", "-");
            else printf(" %8.4f", phases[p]);
        }
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
            printf(" %9.4f %9.4f %9.4f %7.3f %7.3f %7.3f", bd, bl, bg, bd / ms, bl / ms, bg / ms);
        }
        if (check) printf(" %7d\n", wrong);
        else printf(" %7s\n", "n/a");
        fflush(stdout);
        if (cf) {
            fprintf(cf, "%s,%s,%s,%s,%ld,%ld,%.6f,%.4f,%.2f,%s", cfg.name, moe_dtype_name(dt), mode_s,
                    backend == MOE_BACKEND_CUDA ? "cuda" : "cpu", T, M, ms, tflops, gbs, roof);
            for (int p = 0; p < MOE_PHASE_COUNT; p++) fprintf(cf, ",%.6f", phases[p]);
            fprintf(cf, ",%d\n", check ? wrong : -1);
        }
        if (jf) {
            fprintf(jf, "%s{\"T\":%ld,\"M\":%ld,\"time_ms\":%.6f,\"tflops\":%.4f,\"gbs\":%.2f,\"pct_roofline\":%s,\"wrong\":%d",
                    first ? "" : ",", T, M, ms, tflops, gbs, roof_ms > 0 ? roof : "null", check ? wrong : -1);
            for (int p = 0; p < MOE_PHASE_COUNT; p++) {
                if (isnan(phases[p])) fprintf(jf, ",\"%s_ms\":null", moe_phase_names[p]);
                else fprintf(jf, ",\"%s_ms\":%.6f", moe_phase_names[p], phases[p]);
            }
            fprintf(jf, "}");
        }
        first = false;
        if (T > tmax / factor) break; /* no overflow past tmax */
    }
    if (jf) fprintf(jf, "]}\n");
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
