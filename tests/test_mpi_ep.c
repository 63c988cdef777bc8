/*
 * test_mpi_ep.c — expert parallelism through the public API (moe_ep.h) against the single-rank
 * layer, under mpirun -np 1, 2 and 4, with the router's own routing (forced routing is in
 * test_mpi_ep_route.c, failures in test_mpi_ep_errors.c).
 *
 * Each case (tests/util/ep_test.h): every rank generates the same global x, dout [Tg,H] and the
 * same weights; the reference is a layer without a communicator on all Tg tokens; the EP layer
 * runs forward and backward on this rank's rows. Asserted: forward out, router logits and dx
 * within the dtype's tolerance; every local expert's gradients BITWISE equal to the
 * reference's; the router and shared-expert gradients within tolerance and bitwise the same on
 * every rank; the counters (rows sent to / received from each peer = tokens with at least one
 * expert owned there, from the top-k of the returned logits; bytes; tokens; calls; the chunk
 * timeline); gradients of experts no token chose exactly zero. Outputs are NaN-poisoned before
 * every call. The presets have E = 7 (tiny-qwen3) and E = 5 (tiny-llama4): uneven slices at
 * 2 and 4 ranks. Token splits are uneven and the skewed one leaves the last rank with none.
 */
#include <math.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_test.h"
#include "test_util.h"

#include "block_state.h"
#include "cpu_block_ref.h"
#include "dtype.h"
#include "ep_test.h"
#include "weights.h"

static ept_bits g_bits;

static ept_case base_case(const char *config)
{
    ept_case c;
    memset(&c, 0, sizeof c);
    c.config = config;
    c.dt = MOE_NUM_DTYPES;
    c.seed = g_seed;
    c.Tg = 29; /* divisible by neither 2 nor 4 */
    return c;
}

static const char *const presets[2] = {"tiny-qwen3", "tiny-llama4"};

/* ------------------------------------------------------------------ the plain path itself ---- */

/* The single-rank layer every case compares with, against the stage chain of the fused path
 * kept in tests/util (cpu_block_forward / cpu_block_backward, which do not go through the
 * layer): a bug shared by the plain layer and the EP path cannot hide behind the comparison. */
static void test_reference_layer(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    for (int p = 0; p < 2; p++) {
        moe_layer *L = NULL;
        ept_shape s;
        CHECK(ept_layer_make(presets[p], MOE_NUM_DTYPES, g_seed, NULL, NULL, &L) == MOE_OK);
        if (!L || !ept_shape_of(L, &s)) {
            ok = false;
            continue;
        }
        moe_config cfg;
        CHECK_ST(moe_config_preset(presets[p], &cfg, &err));
        moe_weights w, g;
        CHECK_ST(moe_weights_random(&cfg, g_seed, 0, cfg.num_experts, s.dt, &w, &err));
        CHECK_ST(moe_weights_zeros_like(&w, s.dt, &g, &err));
        const int T = 23;
        const size_t H = (size_t)s.H;
        void *x = ept_global(s.dt, T * H, g_seed, "test.ep.x");
        void *dout = ept_global(s.dt, T * H, g_seed, "test.ep.dout");
        moe_fwd_state st;
        CHECK_ST(moe_fwd_state_alloc(&cfg, s.dt, T, true, &st, &err));
        CHECK_ST(cpu_block_forward(&w, s.dt, T, x, &st, &err));
        void *dx = malloc(T * H * s.dsz);
        CHECK_ST(cpu_block_backward(&w, s.dt, T, x, &st, dout, dx, &g, &err));
        ept_io io;
        ept_io_alloc(&s, T, &io);
        CHECK(ept_forward(L, &s, x, p == 1, &io) == MOE_OK);
        CHECK(ept_backward(L, &s, x, dout, NULL, p == 0, &io) == MOE_OK);
        const double tol = moe_test_tol(s.dt, false), gtol = moe_test_tol(s.dt, true);
        CHECK(ept_close("layer out vs chain", s.dt, io.out, st.out, T, H, tol, NULL));
        CHECK(ept_close("layer logits vs chain", s.dt, io.logits, st.router_logits, T, s.E, tol,
                       NULL));
        CHECK(ept_close("layer dx vs chain", s.dt, io.dx, dx, T, H, gtol, NULL));
        CHECK(ept_close("layer d router vs chain", s.dt, io.g_router, g.router.data, s.E, H, gtol,
                       NULL));
        CHECK(ept_close("layer d w13 vs chain", s.dt, io.g_w13, g.w13.data, s.E,
                       2 * (size_t)s.I * H, gtol, NULL));
        CHECK(ept_close("layer d w2 vs chain", s.dt, io.g_w2, g.w2.data, s.E, H * s.I, gtol, NULL));
        if (s.Is) {
            CHECK(ept_close("layer d shared gate", s.dt, io.g_sg, g.shared_gate.data, s.Is, H, gtol,
                           NULL));
            CHECK(ept_close("layer d shared up", s.dt, io.g_su, g.shared_up.data, s.Is, H, gtol,
                           NULL));
            CHECK(ept_close("layer d shared down", s.dt, io.g_sd, g.shared_down.data, H, s.Is,
                           gtol, NULL));
        }
        ept_io_free(&io);
        moe_fwd_state_free(&st);
        moe_weights_free(&w);
        moe_weights_free(&g);
        free(x);
        free(dout);
        free(dx);
        CHECK(moe_layer_destroy(L) == MOE_OK);
    }
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ the presets ---- */

/* E = 7 and E = 5 over any rank count: slices of 4/3, 2/2/2/1 and 3/2, 2/1/1/1 experts. Both
 * token splits, both call forms, fp32 and bf16. */
static void test_presets(void **state)
{
    (void)state;
    bool ok = true;
    for (int p = 0; p < 2; p++)
        for (int sk = 0; sk < 2; sk++) {
            ept_case c = base_case(presets[p]);
            c.skewed = sk;
            c.async = (p + sk) % 2;
            ok &= ept_case_run(&c, &g_bits);
        }
    for (int p = 0; p < 2; p++) {
        ept_case c = base_case(presets[p]);
        c.dt = MOE_DTYPE_BF16;
        c.skewed = p == 1;
        c.dlogits = true;
        ok &= ept_case_run(&c, &g_bits);
    }
    assert_true(all_true(ok));
}

/* Other shapes through config.json files: more experts than the presets, k = 1..3, with and
 * without norm_topk_prob, Llama-4 with k = 2, and d_router_logits in the backward. */
static void test_config_shapes(void **state)
{
    (void)state;
    bool ok = true;
    struct {
        bool llama;
        int E, k;
        bool norm;
        const char *dtype;
        int C;
    } cs[] = {
        {false, 12, 3, false, "bfloat16", 1},
        {false, 8, 2, true, "float32", 3},
        {true, 8, 2, false, "float32", 1},
        {true, 12, 1, false, "bfloat16", 3},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        char path[256];
        CHECK(ept_config_write(path, sizeof path, cs[i].llama, 33, 21, cs[i].E, cs[i].k,
                              cs[i].norm, cs[i].dtype));
        ept_case c = base_case(path);
        c.C = cs[i].C;
        c.skewed = i % 2;
        c.async = i >= 2;
        c.dlogits = i != 1;
        ok &= ept_case_run(&c, &g_bits);
        ept_config_remove(path);
    }
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ chunks ---- */

/* The forward cut in C chunks (transfers overlapping the experts): the same answers, and the
 * timeline of every chunk in order. C = 5 with 29 tokens over 4 ranks leaves chunks empty. */
static void test_chunks(void **state)
{
    (void)state;
    bool ok = true;
    for (int p = 0; p < 2; p++)
        for (int sk = 0; sk < 2; sk++) {
            ept_case c = base_case(presets[p]);
            c.C = p == 0 ? 3 : 5;
            c.skewed = sk;
            c.async = sk;
            ok &= ept_case_run(&c, &g_bits);
        }
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ expert maps ---- */

/* Owner tables whose ids are not contiguous: interleaved (e mod N) and reversed interleaving. */
static void test_map_interleaved(void **state)
{
    (void)state;
    bool ok = true;
    for (int p = 0; p < 2; p++)
        for (int rev = 0; rev < 2; rev++) {
            const int E = p == 0 ? 7 : 5;
            int32_t map[16];
            for (int e = 0; e < E; e++) map[e] = rev ? g_size - 1 - e % g_size : e % g_size;
            ept_case c = base_case(presets[p]);
            c.map = map;
            c.C = rev ? 3 : 1;
            c.skewed = p == rev;
            c.async = rev;
            ok &= ept_case_run(&c, &g_bits);
        }
    assert_true(all_true(ok));
}

/* A map leaving ranks without experts: the last rank owns none (it still routes and sends its
 * tokens, and computes nothing), and with 3 experts over 4 ranks (N > E, allowed with an
 * explicit map) two ranks own none. */
static void test_map_empty_ranks(void **state)
{
    (void)state;
    bool ok = true;
    if (g_size == 1 && g_rank == 0) fprintf(stderr, "(one rank: every map gives it all experts)\n");
    for (int p = 0; p < 2; p++) {
        const int E = p == 0 ? 7 : 5, owners = g_size > 1 ? g_size - 1 : 1;
        int32_t map[16];
        for (int e = 0; e < E; e++) map[e] = e % owners;
        ept_case c = base_case(presets[p]);
        c.map = map;
        c.skewed = p == 0;
        c.C = p == 0 ? 1 : 3;
        ok &= ept_case_run(&c, &g_bits);
    }
    char path[256];
    CHECK(ept_config_write(path, sizeof path, false, 33, 21, 3, 2, true, "float32"));
    int32_t map3[3] = {g_size - 1, 0, g_size - 1};
    ept_case c = base_case(path);
    c.map = map3;
    c.async = true;
    ok &= ept_case_run(&c, &g_bits);
    ept_config_remove(path);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ virtual ranks ---- */

/* Each process alone (MPI_COMM_SELF) acting as V = 2 and 4 ranks: everything goes through the
 * MPI transport to itself. A different token count per process, so the processes do not all
 * run the same case. E = 5 over 4 virtual ranks: parts of 2/1/1/1. */
static void test_virtual_self(void **state)
{
    (void)state;
    bool ok = true;
    for (int p = 0; p < 2; p++)
        for (int V = 2; V <= 4; V += 2) {
            ept_case c = base_case(presets[p]);
            c.self = true;
            c.V = V;
            c.Tg = 17 + 5 * g_rank;
            c.C = V == 4 ? 3 : 1;
            c.async = V == 2;
            if (p == 1 && V == 4) c.dt = MOE_DTYPE_BF16;
            ok &= ept_case_run(&c, &g_bits);
        }
    assert_true(all_true(ok));
}

/* Virtual ranks on top of the real ones: V = 2 and 4 over the world (E = 7 over 16 virtual
 * ranks leaves some of them without experts), and with an interleaved map. */
static void test_virtual_world(void **state)
{
    (void)state;
    bool ok = true;
    for (int p = 0; p < 2; p++)
        for (int V = 2; V <= 4; V += 2) {
            ept_case c = base_case(presets[p]);
            c.V = V;
            c.skewed = true;
            c.C = p == 0 ? 3 : 1;
            c.async = p == 1;
            ok &= ept_case_run(&c, &g_bits);
        }
    int32_t map[7];
    for (int e = 0; e < 7; e++) map[e] = (e + 1) % g_size;
    ept_case c = base_case(presets[0]);
    c.V = 2;
    c.map = map;
    c.C = 3;
    ok &= ept_case_run(&c, &g_bits);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ bounded buffers ---- */

/* max_tokens_per_rank with the MPI transport: buffers sized for the bound change nothing, at
 * exactly the largest T and well above it, chunked or not. */
static void test_max_tokens(void **state)
{
    (void)state;
    bool ok = true;
    for (int p = 0; p < 2; p++)
        for (int big = 0; big < 2; big++) {
            ept_case c = base_case(presets[p]);
            c.M = big ? 64 : -1;
            c.skewed = big == 0;
            c.C = p == 0 ? 3 : 1;
            c.async = big;
            ok &= ept_case_run(&c, &g_bits);
        }
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ no tokens ---- */

/* No rank has a token: the calls still meet, and every gradient is exactly zero. */
static void test_no_tokens_anywhere(void **state)
{
    (void)state;
    bool ok = true;
    for (int p = 0; p < 2; p++) {
        ept_case c = base_case(presets[p]);
        c.Tg = 0;
        c.C = 3;
        c.async = p;
        ok &= ept_case_run(&c, &g_bits);
    }
    /* and the replicated gradients too (ept_case_run checks the experts' ones) */
    moe_ep_comm *ec = NULL;
    moe_layer *L = NULL;
    ept_shape s;
    CHECK(ept_comm_make(MPI_COMM_WORLD, NULL, &ec) == MOE_OK);
    CHECK(ept_layer_make("tiny-llama4", MOE_NUM_DTYPES, g_seed, ec, NULL, &L) == MOE_OK);
    if (all_true(ok) && ept_shape_of(L, &s)) {
        ept_io io;
        ept_io_alloc(&s, 0, &io);
        CHECK(ept_backward(L, &s, io.dx, io.dx, NULL, false, &io) == MOE_OK);
        const void *g[4] = {io.g_router, io.g_sg, io.g_su, io.g_sd};
        const size_t n[4] = {(size_t)s.E * s.H, (size_t)s.Is * s.H, (size_t)s.Is * s.H,
                             (size_t)s.H * s.Is};
        for (int i = 0; i < 4; i++)
            for (size_t j = 0; j < n[i]; j++) CHECK(moe_load_elem(s.dt, g[i], j) == 0.0);
        ept_io_free(&io);
    }
    CHECK(moe_layer_destroy(L) == MOE_OK);
    CHECK(moe_ep_comm_destroy(ec) == MOE_OK);
    assert_true(all_true(ok));
}

/* A rank with no tokens may pass views without memory ([0,H] with data NULL), as a [T,H] view
 * with T = 0 needs none; the others' calls go on as usual. */
static void test_zero_tokens_null_views(void **state)
{
    (void)state;
    bool ok = true;
    moe_ep_comm *ec = NULL;
    moe_layer *L = NULL;
    ept_shape s;
    CHECK(ept_comm_make(MPI_COMM_WORLD, NULL, &ec) == MOE_OK);
    CHECK(ept_layer_make("tiny-qwen3", MOE_NUM_DTYPES, g_seed, ec, NULL, &L) == MOE_OK);
    if (all_true(ok) && ept_shape_of(L, &s)) {
        const int64_t T = g_rank == g_size - 1 ? 0 : 5;
        ept_io io;
        ept_io_alloc(&s, T, &io);
        void *x = ept_global(s.dt, (size_t)T * s.H, g_seed + (uint64_t)g_rank, "test.ep.x");
        moe_tensor_view xv = {s.dt, 2, {T, s.H}, T ? x : NULL};
        moe_tensor_view ov = {s.dt, 2, {T, s.H}, T ? io.out : NULL};
        moe_tensor_view lv = {s.dt, 2, {T, s.E}, T ? io.logits : NULL};
        moe_tensor_view dxv = {s.dt, 2, {T, s.H}, T ? io.dx : NULL};
        moe_status st = moe_layer_forward(L, &xv, &ov, &lv);
        if (st != MOE_OK) fprintf(stderr, "rank %d: forward: %s\n", g_rank, moe_last_error());
        CHECK(st == MOE_OK);
        moe_layer_grads g = {io.g_router, io.g_w13, io.g_w2, NULL, NULL, NULL};
        st = moe_layer_backward(L, &xv, &xv, NULL, &dxv, &g);
        if (st != MOE_OK) fprintf(stderr, "rank %d: backward: %s\n", g_rank, moe_last_error());
        CHECK(st == MOE_OK);
        bool finite = true;
        for (size_t i = 0; i < (size_t)T * s.H; i++) finite &= isfinite(moe_load_elem(s.dt, io.out, i));
        CHECK(finite);
        CHECK(ept_same_on_all(MPI_COMM_WORLD, "d router", io.g_router, (size_t)s.E * s.H * s.dsz));
        ept_io_free(&io);
        free(x);
    }
    CHECK(moe_layer_destroy(L) == MOE_OK);
    CHECK(moe_ep_comm_destroy(ec) == MOE_OK);
    assert_true(all_true(ok));
}

static int report(void **state)
{
    (void)state;
    ept_bits_report("test_mpi_ep", &g_bits);
    return 0;
}

int main(int argc, char **argv)
{
    mpi_test_init(&argc, &argv);
    mpi_test_share_cores_and_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_layer),   cmocka_unit_test(test_presets),
        cmocka_unit_test(test_config_shapes),     cmocka_unit_test(test_chunks),
        cmocka_unit_test(test_map_interleaved),   cmocka_unit_test(test_map_empty_ranks),
        cmocka_unit_test(test_virtual_self),      cmocka_unit_test(test_virtual_world),
        cmocka_unit_test(test_max_tokens),        cmocka_unit_test(test_no_tokens_anywhere),
        cmocka_unit_test(test_zero_tokens_null_views),
    };
    int rc = cmocka_run_group_tests(tests, NULL, report);
    MPI_Finalize();
    return rc;
}
