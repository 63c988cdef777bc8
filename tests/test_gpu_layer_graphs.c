/*
 * test_gpu_layer_graphs.c — the CUDA layer's forward and backward captured into CUDA graphs
 * (one rank: the plain path needs no host synchronisation).
 *   replay   tiny Qwen3 and Llama-4 (k=2 with the shared expert on the side stream) in bf16 and
 *            fp32, and a Llama-4 shape the Hopper wgmma kernels take: a layer created with
 *            timing on runs eagerly (phase times recorded), timing is turned off, then
 *            moe_layer_forward_async and moe_layer_backward_async are captured on the caller's
 *            stream; replayed on the inputs of the eager run and on new contents of the same
 *            buffers, out, router logits, dx and every gradient are bitwise the eager run's on
 *            those inputs; more replays give the same bits.
 *   many     the ">= 5000 graph captures": the same Llama-4 layer's forward (shared
 *            expert on the side stream, both grouped GEMMs on the wgmma kernels) captured,
 *            instantiated, launched and destroyed 5000 times; every 500th and the last output is
 *            bitwise the eager one, and the last capture still runs the dynamic tile scheduler
 *            (moe_kernel_report.sched_dynamic of GEMM1 and GEMM2, cuda_state.rep[]); the last
 *            graph replayed on new input equals the eager forward of it; the workspace did not
 *            grow.
 * Expected runtime on an H100: ~10 s (5000 captures at ~1 ms). Skipped (77) without a GPU.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#ifdef MOE_HAVE_CUDA
#include "gpu_layer_test.h"

typedef struct dev_io {
    void *x, *dout, *out, *lg, *dx;
    moe_layer_grads g;
    size_t gb[6];
} dev_io;

static void io_alloc(const moe_layer *L, int T, dev_io *d)
{
    const size_t es = L->dsz, H = L->H, I = L->I, E = L->E, Is = L->Is;
    memset(d, 0, sizeof *d);
    d->x = gt_dev((size_t)T * H * es);
    d->dout = gt_dev((size_t)T * H * es);
    d->out = gt_dev((size_t)T * H * es);
    d->lg = gt_dev((size_t)T * E * es);
    d->dx = gt_dev((size_t)T * H * es);
    const size_t b[6] = {E * H * es, E * 2 * I * H * es, E * H * I * es, Is * H * es, Is * H * es, H * Is * es};
    void **p[6] = {&d->g.router, &d->g.w13, &d->g.w2, &d->g.shared_gate, &d->g.shared_up, &d->g.shared_down};
    for (int i = 0; i < 6; i++) {
        d->gb[i] = b[i];
        if (b[i]) *p[i] = gt_dev(b[i]);
    }
}

static void io_free(dev_io *d)
{
    void *p[] = {d->x, d->dout, d->out, d->lg, d->dx, d->g.router, d->g.w13, d->g.w2,
                 d->g.shared_gate, d->g.shared_up, d->g.shared_down};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) cudaFree(p[i]);
}

/* Every output poisoned (all bits set), so an element a replay did not write fails. */
static void io_poison(const moe_layer *L, int T, dev_io *d)
{
    const size_t es = L->dsz, H = L->H, E = L->E;
    gt_poison(d->out, (size_t)T * H * es);
    gt_poison(d->lg, (size_t)T * E * es);
    gt_poison(d->dx, (size_t)T * H * es);
    void *p[6] = {d->g.router, d->g.w13, d->g.w2, d->g.shared_gate, d->g.shared_up, d->g.shared_down};
    for (int i = 0; i < 6; i++)
        if (p[i]) gt_poison(p[i], d->gb[i]);
}

/* Outputs of a and b bitwise equal. */
static void io_assert_equal(const char *cn, const char *what, const moe_layer *L, int T,
                            const dev_io *a, const dev_io *b, bool backward)
{
    const moe_dtype dt = L->dt;
    const size_t H = L->H, E = L->E;
    char w[192];
    snprintf(w, sizeof w, "%s: out", what);
    gt_assert_dev_bitwise(cn, w, dt, a->out, b->out, (size_t)T * H, H);
    snprintf(w, sizeof w, "%s: router logits", what);
    gt_assert_dev_bitwise(cn, w, dt, a->lg, b->lg, (size_t)T * E, E);
    if (!backward) return;
    snprintf(w, sizeof w, "%s: dx", what);
    gt_assert_dev_bitwise(cn, w, dt, a->dx, b->dx, (size_t)T * H, H);
    const void *pa[6] = {a->g.router, a->g.w13, a->g.w2, a->g.shared_gate, a->g.shared_up, a->g.shared_down};
    const void *pb[6] = {b->g.router, b->g.w13, b->g.w2, b->g.shared_gate, b->g.shared_up, b->g.shared_down};
    for (int i = 0; i < 6; i++) {
        if (!pa[i]) continue;
        snprintf(w, sizeof w, "%s: %s", what, moe_test_grad_names[i]);
        gt_assert_dev_bitwise(cn, w, dt, pa[i], pb[i], a->gb[i] / moe_dtype_size(dt), H);
    }
}

static void eager(moe_layer *L, int T, dev_io *d, cudaStream_t st)
{
    API(moe_layer_forward_async(L, T, d->x, d->out, d->lg, st));
    API(moe_layer_backward_async(L, T, d->x, d->dout, NULL, d->dx, &d->g, st));
    CU(cudaStreamSynchronize(st));
}

static uint64_t ws_bytes(const moe_layer *L)
{
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    API(moe_layer_info_get(L, &in));
    return in.workspace_bytes;
}

/* ------------------------------------------------------------------ replay ---- */

static void replay_case(const moe_config *c, moe_dtype dt, int T, uint64_t seed)
{
    const size_t es = moe_dtype_size(dt), H = c->hidden;
    char cn[128];
    snprintf(cn, sizeof cn, "%s %s T=%d graphs", c->name, moe_dtype_name(dt), T);
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    o.timing = 1;
    moe_layer *L = gt_layer(c, MOE_BACKEND_CUDA, dt, seed, &o);
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    void *hx[2], *hd[2];
    dev_io ref[2], gio;
    for (int i = 0; i < 2; i++) {
        hx[i] = gt_random(dt, (size_t)T * H, seed + (uint64_t)i, "test.x", 1.0);
        hd[i] = gt_random(dt, (size_t)T * H, seed + (uint64_t)i, "test.dout", 1.0);
        io_alloc(L, T, &ref[i]);
        gt_to_dev(ref[i].x, hx[i], (size_t)T * H * es);
        gt_to_dev(ref[i].dout, hd[i], (size_t)T * H * es);
        io_poison(L, T, &ref[i]);
    }
    /* eagerly, timing on: the phases were timed */
    eager(L, T, &ref[0], st);
    moe_layer_stats s = MOE_LAYER_STATS_INIT;
    API(moe_layer_stats_get(L, &s));
    API(moe_layer_forward_async(L, T, ref[0].x, ref[0].out, ref[0].lg, st));
    API(moe_layer_stats_get(L, &s));
    if (!(s.last_device_ms > 0) || s.last_call != 1 || !(s.phase_ms[MOE_PHASE_GEMM1] >= 0) ||
        !(s.phase_ms[MOE_PHASE_ROUTE] >= 0) || (L->shared && !(s.phase_ms[MOE_PHASE_SHARED] >= 0)))
        fail_msg("%s: timing on, the forward's device times: whole %.4f ms, route %.4f, GEMM1 "
                 "%.4f, shared %.4f", cn, s.last_device_ms, s.phase_ms[MOE_PHASE_ROUTE],
                 s.phase_ms[MOE_PHASE_GEMM1], s.phase_ms[MOE_PHASE_SHARED]);
    fprintf(stderr, "%s: eager forward %.4f ms on the device (route %.4f, permute %.4f, GEMM1 %.4f, "
            "GEMM2 %.4f, combine %.4f, shared %.4f)\n", cn, s.last_device_ms, s.phase_ms[0],
            s.phase_ms[1], s.phase_ms[3], s.phase_ms[4], s.phase_ms[5], s.phase_ms[6]);
    API(moe_layer_set_timing(L, 0));
    eager(L, T, &ref[1], st);
    CU(cudaStreamSynchronize(st));
    gt_print_reports(cn, L);
    const uint64_t w0 = ws_bytes(L);

    /* capture both calls on the graph's own buffers */
    io_alloc(L, T, &gio);
    cudaGraph_t gf = NULL, gb = NULL;
    cudaGraphExec_t ef = NULL, eb = NULL;
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    moe_status s1 = moe_layer_forward_async(L, T, gio.x, gio.out, gio.lg, st);
    CU(cudaStreamEndCapture(st, &gf));
    if (s1 != MOE_OK) fail_msg("%s: forward under capture: %s: %s", cn, moe_strerror(s1), moe_last_error());
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    moe_status s2 = moe_layer_backward_async(L, T, gio.x, gio.dout, NULL, gio.dx, &gio.g, st);
    CU(cudaStreamEndCapture(st, &gb));
    if (s2 != MOE_OK) fail_msg("%s: backward under capture: %s: %s", cn, moe_strerror(s2), moe_last_error());
    CU(cudaGraphInstantiate(&ef, gf, 0));
    CU(cudaGraphInstantiate(&eb, gb, 0));
    size_t nodes = 0;
    CU(cudaGraphGetNodes(gf, NULL, &nodes));
    for (int round = 0; round < 3; round++) {
        const int i = round == 0 ? 0 : 1; /* the eager inputs, then new contents, then again */
        gt_to_dev(gio.x, hx[i], (size_t)T * H * es);
        gt_to_dev(gio.dout, hd[i], (size_t)T * H * es);
        io_poison(L, T, &gio);
        CU(cudaGraphLaunch(ef, st));
        CU(cudaGraphLaunch(eb, st));
        if (round == 2)
            for (int rep = 0; rep < 3; rep++) {
                CU(cudaGraphLaunch(ef, st));
                CU(cudaGraphLaunch(eb, st));
            }
        CU(cudaStreamSynchronize(st));
        API(moe_layer_check_errors(L));
        char what[96];
        snprintf(what, sizeof what, "replay %d (input %d) vs eager", round, i);
        io_assert_equal(cn, what, L, T, &gio, &ref[i], true);
    }
    if (ws_bytes(L) != w0)
        fail_msg("%s: the workspace changed under capture/replay: %llu -> %llu bytes", cn,
                 (unsigned long long)w0, (unsigned long long)ws_bytes(L));
    fprintf(stderr, "%s: forward graph of %zu nodes, forward + backward replays bitwise = eager\n", cn, nodes);
    CU(cudaGraphExecDestroy(ef));
    CU(cudaGraphExecDestroy(eb));
    CU(cudaGraphDestroy(gf));
    CU(cudaGraphDestroy(gb));
    io_free(&gio);
    for (int i = 0; i < 2; i++) {
        io_free(&ref[i]);
        free(hx[i]);
        free(hd[i]);
    }
    API(moe_layer_destroy(L));
    CU(cudaStreamDestroy(st));
}

/* A Llama-4 shape whose grouped GEMMs the wgmma kernels take by default (bf16, rows of 16
 * bytes, T*k/E >= 16 rows per expert), with the shared expert. */
static moe_config wgmma_llama(void) { return gt_cfg(MOE_ARCH_LLAMA4, 256, 128, 8, 1, 128, false); }

static void test_graph_replay(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const moe_dtype dts[2] = {MOE_DTYPE_BF16, MOE_DTYPE_F32};
    for (int d = 0; d < 2; d++) {
        const moe_config q = gt_qwen_tiny(true), l = gt_llama_tiny(2, 27);
        replay_case(&q, dts[d], 40, seed + (uint64_t)d);
        replay_case(&l, dts[d], 33, seed + 10 + (uint64_t)d);
    }
    const moe_config w = wgmma_llama();
    replay_case(&w, MOE_DTYPE_BF16, 256, seed + 20);
}

/* ------------------------------------------------------------------ 5000 captures ---- */

static void test_graph_5000(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const moe_config c = wgmma_llama();
    const moe_dtype dt = MOE_DTYPE_BF16;
    const int T = 256, N = 5000;
    const size_t es = 2, H = c.hidden, E = c.num_experts;
    const char *cn = "5000 captures";
    moe_layer *L = gt_layer(&c, MOE_BACKEND_CUDA, dt, seed, NULL);
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    void *hx = gt_random(dt, (size_t)T * H, seed, "test.x", 1.0), *hx2 = gt_random(dt, (size_t)T * H, seed, "test.x2", 1.0);
    void *x = gt_dev_from(hx, (size_t)T * H * es), *out = gt_dev((size_t)T * H * es), *lg = gt_dev((size_t)T * E * es);
    void *x2 = gt_dev_from(hx2, (size_t)T * H * es), *out2 = gt_dev((size_t)T * H * es), *lg2 = gt_dev((size_t)T * E * es);
    /* eager: the reference outputs, and the kernels the capture will see */
    API(moe_layer_forward_async(L, T, x, out, lg, st));
    API(moe_layer_forward_async(L, T, x2, out2, lg2, st));
    CU(cudaStreamSynchronize(st));
    void *eo = gt_host_from(out, (size_t)T * H * es), *el = gt_host_from(lg, (size_t)T * E * es);
    void *eo2 = gt_host_from(out2, (size_t)T * H * es);
    gt_print_reports(cn, L);
    for (int g = MOE_GEMM_FWD1; g <= MOE_GEMM_FWD2; g++) {
        const moe_kernel_report *r = gt_report(L, g);
        if (!r->used_tma || !r->sched_dynamic)
            fail_msg("%s: eager GEMM%d ran %s (tma %d, dynamic scheduler %d): this test needs the "
                     "wgmma kernels with their tile scheduler", cn, g + 1, r->kernel ? r->kernel : "?",
                     r->used_tma, r->sched_dynamic);
    }
    const uint64_t w0 = ws_bytes(L);
    void *ho = gt_malloc((size_t)T * H * es), *hl = gt_malloc((size_t)T * E * es);
    const double t0 = moe_now();
    for (int i = 0; i < N; i++) {
        cudaGraph_t g = NULL;
        cudaGraphExec_t ge = NULL;
        CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        moe_status s = moe_layer_forward_async(L, T, x, out, lg, st);
        cudaError_t ce = cudaStreamEndCapture(st, &g);
        if (s != MOE_OK) fail_msg("%s: capture %d: forward: %s: %s", cn, i, moe_strerror(s), moe_last_error());
        if (ce != cudaSuccess) fail_msg("%s: capture %d: cudaStreamEndCapture: %s", cn, i, cudaGetErrorString(ce));
        ce = cudaGraphInstantiate(&ge, g, 0);
        if (ce != cudaSuccess) fail_msg("%s: capture %d: cudaGraphInstantiate: %s", cn, i, cudaGetErrorString(ce));
        const bool check = i % 500 == 499 || i == N - 1;
        if (check) {
            CU(cudaMemsetAsync(out, 0xff, (size_t)T * H * es, st));
            CU(cudaMemsetAsync(lg, 0xff, (size_t)T * E * es, st));
        }
        ce = cudaGraphLaunch(ge, st);
        if (ce != cudaSuccess) fail_msg("%s: capture %d: cudaGraphLaunch: %s", cn, i, cudaGetErrorString(ce));
        if (check) {
            CU(cudaStreamSynchronize(st));
            gt_from_dev(ho, out, (size_t)T * H * es);
            gt_from_dev(hl, lg, (size_t)T * E * es);
            char what[96];
            snprintf(what, sizeof what, "graph %d's out vs eager", i + 1);
            gt_assert_bitwise(cn, what, dt, ho, eo, (size_t)T * H, H);
            snprintf(what, sizeof what, "graph %d's router logits vs eager", i + 1);
            gt_assert_bitwise(cn, what, dt, hl, el, (size_t)T * E, E);
            for (int gi = MOE_GEMM_FWD1; gi <= MOE_GEMM_FWD2; gi++) {
                const moe_kernel_report *r = gt_report(L, gi);
                if (!r->used_tma || !r->sched_dynamic)
                    fail_msg("%s: capture %d: GEMM%d ran %s (tma %d) with the %s tile order", cn, i + 1,
                             gi + 1, r->kernel ? r->kernel : "?", r->used_tma,
                             r->sched_dynamic ? "dynamic" : "static");
            }
            API(moe_layer_check_errors(L));
        }
        if (i == N - 1) {
            /* the last graph on new contents of its input buffer */
            gt_to_dev(x, hx2, (size_t)T * H * es);
            CU(cudaMemsetAsync(out, 0xff, (size_t)T * H * es, st));
            CU(cudaGraphLaunch(ge, st));
            CU(cudaStreamSynchronize(st));
            gt_from_dev(ho, out, (size_t)T * H * es);
            gt_assert_bitwise(cn, "the last graph on new input vs eager", dt, ho, eo2, (size_t)T * H, H);
        }
        CU(cudaStreamSynchronize(st)); /* (destroying a launched graph is legal; waiting keeps
                                          the test about the captures, not about that) */
        CU(cudaGraphExecDestroy(ge));
        CU(cudaGraphDestroy(g));
    }
    CU(cudaStreamSynchronize(st));
    const double sec = moe_now() - t0;
    API(moe_layer_check_errors(L));
    if (ws_bytes(L) != w0)
        fail_msg("%s: the workspace grew from %llu to %llu bytes", cn, (unsigned long long)w0,
                 (unsigned long long)ws_bytes(L));
    fprintf(stderr, "%s: %d forward graphs captured, instantiated, launched and destroyed in %.2f s "
            "(%.3f ms each); outputs bitwise = eager, dynamic tile scheduler to the last\n", cn, N,
            sec, 1e3 * sec / N);
    void *p[] = {hx, hx2, eo, el, eo2, ho, hl};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
    void *dp[] = {x, out, lg, x2, out2, lg2};
    for (size_t i = 0; i < sizeof dp / sizeof dp[0]; i++) cudaFree(dp[i]);
    API(moe_layer_destroy(L));
    CU(cudaStreamDestroy(st));
}
#endif /* MOE_HAVE_CUDA */

MOE_TEST_GPU_MAIN(
    cmocka_unit_test(test_graph_replay),
    cmocka_unit_test(test_graph_5000))
