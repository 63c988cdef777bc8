/*
 * test_mpi_ep_errors.c — how expert parallelism fails, under mpirun -np 1, 2 and 4, through the
 * public API: every rank returns the SAME status and a message naming the cause (the rank that
 * found it says why; the others say "rank R failed: <why>"), nobody is left blocked in a
 * collective (ctest's timeout catches a hang), and the communicator and layers keep working
 * afterwards. Covered: bad or differing options at moe_ep_comm_create; N > E with default
 * slices; expert maps out of range or differing; layers whose fingerprints differ (dtype, a
 * config field, the weights); forced routing that cannot be parsed; bounds (T over
 * max_tokens_per_rank, rows over max_recv_tokens) in the forward and the backward; a rank in
 * another call or on another layer; bad arguments on one rank; a failed creation leaving the
 * communicator destroyable. Also the agreement helpers, the route parsers, and each rank reading
 * only its own experts from a checkpoint.
 *
 * Cases that need two ranks to disagree are skipped at -np 1 (and say so).
 */
#include <math.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mpi_test.h"
#include "test_util.h"

#include "config.h"
#include "dtype.h"
#include "ep/ep.h"
#include "ep_test.h"
#include "layer/expert_map.h"
#include "safetensors.h"
#include "weights.h"

/* `call` must return `want` on this rank with a message holding `needle`; the rank `culprit`
 * (-1: every rank finds it itself) names the cause, the others say it failed. Uses `ok`. */
#define EXPECT_FAIL(call, want, needle, culprit)                                               \
    do {                                                                                       \
        moe_status s_ = (call);                                                                \
        char m_[1100];                                                                         \
        snprintf(m_, sizeof m_, "%s", moe_last_error());                                       \
        fprintf(stderr, "rank %d: %s:%d: expected failure: %s: %s\n", g_rank, __FILE__,        \
                __LINE__, moe_strerror(s_), m_);                                               \
        char who_[32];                                                                         \
        snprintf(who_, sizeof who_, "rank %d failed", (culprit));                              \
        if (s_ != (want) || !strstr(m_, (needle)) ||                                           \
            ((culprit) >= 0 && g_rank != (culprit) && !strstr(m_, who_))) {                    \
            fprintf(stderr, "rank %d: %s:%d: %s -> %s, expected %s with '%s'%s%s\n", g_rank,   \
                    __FILE__, __LINE__, #call, moe_strerror(s_), moe_strerror(want), (needle), \
                    (culprit) >= 0 ? " and " : "", (culprit) >= 0 ? who_ : "");                \
            ok = false;                                                                        \
        }                                                                                      \
    } while (0)

static int last_rank(void) { return g_size - 1; }

static void skip_note(const char *what)
{
    if (g_size == 1 && g_rank == 0) fprintf(stderr, "(one rank: %s needs two; not run)\n", what);
}

static moe_ep_options mpi_opts(void)
{
    moe_ep_options o = MOE_EP_OPTIONS_INIT;
    o.transport = MOE_TRANSPORT_MPI;
    return o;
}

static bool finite_all(moe_dtype dt, const void *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(moe_load_elem(dt, p, i))) return false;
    return true;
}

/* ------------------------------------------------------------------ the communicator ---- */

static void test_comm_options(void **state)
{
    (void)state;
    bool ok = true;
    const int bad = last_rank();
    moe_ep_comm *const sentinel = (moe_ep_comm *)&ok, *c = sentinel; /* [out]: untouched on failure */
    moe_ep_options o = mpi_opts();
    o.virtual_ranks = g_rank == bad ? 0 : 1;
    EXPECT_FAIL(ept_comm_make(MPI_COMM_WORLD, &o, &c), MOE_ERR_INVALID_ARG, "virtual_ranks 0 (--ep-virtual)", bad);
    CHECK(c == sentinel);
    o = mpi_opts();
    o.chunks = g_rank == bad ? 0 : 2;
    EXPECT_FAIL(ept_comm_make(MPI_COMM_WORLD, &o, &c), MOE_ERR_INVALID_ARG, "chunks 0 (--chunks)", bad);
    o = mpi_opts();
    o.max_recv_tokens = 16; /* without max_tokens_per_rank */
    EXPECT_FAIL(ept_comm_make(MPI_COMM_WORLD, &o, &c), MOE_ERR_INVALID_ARG,
                "only together with max_tokens_per_rank (--max-tokens-per-rank)", -1);
    o = mpi_opts();
    o.size = 8; /* not from MOE_EP_OPTIONS_INIT */
    EXPECT_FAIL(ept_comm_make(MPI_COMM_WORLD, &o, &c), MOE_ERR_INVALID_ARG, "MOE_EP_OPTIONS_INIT",
                -1);
    CHECK(c == sentinel);
    /* valid options that differ between ranks */
    skip_note("options that differ between ranks");
    if (g_size > 1) {
        static const char *const field[5] = {"--chunks", "--ep-virtual", "--max-tokens-per-rank",
                                             "--route", "the transport"};
        for (int i = 0; i < 5; i++) {
            o = mpi_opts();
            const bool other = g_rank == 0;
            if (i == 0) o.chunks = other ? 3 : 1;
            if (i == 1) o.virtual_ranks = other ? 2 : 1;
            if (i == 2) o.max_tokens_per_rank = other ? 64 : 32;
            if (i == 3) o.route = other ? "uniform" : NULL;
            if (i == 4) o.transport = other ? MOE_TRANSPORT_AUTO : MOE_TRANSPORT_MPI;
            char needle[64];
            snprintf(needle, sizeof needle, "ranks disagree on %s", field[i]);
            EXPECT_FAIL(ept_comm_make(MPI_COMM_WORLD, &o, &c), MOE_ERR_INVALID_ARG, needle, -1);
            CHECK(c == sentinel);
        }
    }
    /* and good options still make one */
    o = mpi_opts();
    o.chunks = 2;
    c = NULL;
    CHECK_API(ept_comm_make(MPI_COMM_WORLD, &o, &c));
    int r = -1, n = -1;
    CHECK_API(moe_ep_comm_rank(c, &r, &n));
    CHECK(r == g_rank && n == g_size);
    CHECK_API(moe_ep_comm_destroy(c));
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ layer creation ---- */

/* Creation failures on every rank, the communicator intact (and destroyable) afterwards. */
static void test_layer_create_refusals(void **state)
{
    (void)state;
    bool ok = true;
    moe_ep_comm *c = NULL;
    moe_ep_options o = mpi_opts();
    CHECK_API(ept_comm_make(MPI_COMM_WORLD, &o, &c));
    moe_layer *L = (moe_layer *)&ok;
    /* more ranks than experts with the default slices (E = N - 1); at one rank E = 1 is fine */
    char path[256];
    CHECK(ept_config_write(path, sizeof path, true, 33, 21, g_size > 1 ? g_size - 1 : 1, 1,
                           false, "float32"));
    if (g_size > 1) {
        char needle[64];
        snprintf(needle, sizeof needle, "%d ranks but only %d experts", g_size, g_size - 1);
        EXPECT_FAIL(ept_layer_make(path, MOE_NUM_DTYPES, g_seed, c, NULL, &L), MOE_ERR_INVALID_ARG,
                    needle, -1);
        CHECK(L == (moe_layer *)&ok); /* [out]: untouched on failure */
        /* ... which an explicit map leaving a rank empty allows */
        int32_t map[4];
        for (int e = 0; e < g_size - 1; e++) map[e] = e;
        CHECK_API(ept_layer_make(path, MOE_NUM_DTYPES, g_seed, c, map, &L));
        CHECK_API(moe_layer_destroy(L));
    } else {
        CHECK_API(ept_layer_make(path, MOE_NUM_DTYPES, g_seed, c, NULL, &L));
        CHECK_API(moe_layer_destroy(L));
    }
    ept_config_remove(path);
    /* an owner out of range on the last rank only: its reason reaches everyone */
    int32_t map[7];
    for (int e = 0; e < 7; e++) map[e] = e % g_size;
    if (g_rank == last_rank()) map[6] = g_size;
    char needle[96];
    snprintf(needle, sizeof needle, "expert 6 is owned by rank %d, outside [0, %d)", g_size, g_size);
    L = (moe_layer *)&ok;
    EXPECT_FAIL(ept_layer_make("tiny-qwen3", MOE_NUM_DTYPES, g_seed, c, map, &L),
                MOE_ERR_INVALID_ARG, needle, last_rank());
    CHECK(L == (moe_layer *)&ok); /* [out]: untouched on failure */
    /* forced routing that cannot work (parsed at layer creation) */
    struct {
        const char *route;
        moe_status st;
        const char *needle;
    } routes[] = {
        {"sideways", MOE_ERR_INVALID_ARG, "--route sideways: expected router"},
        {"all-to-one:99", MOE_ERR_INVALID_ARG, "all-to-one:99: target must be"},
        {"experts:0,0,1", MOE_ERR_INVALID_ARG, "k=3 distinct ids"},
        {"experts:0,1,7", MOE_ERR_INVALID_ARG, "k=3 distinct ids"},
        {"file:/nonexistent/moe_route.txt", MOE_ERR_IO, "cannot open"},
    };
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
        moe_ep_comm *rc = NULL;
        o = mpi_opts();
        o.route = routes[i].route;
        CHECK_API(ept_comm_make(MPI_COMM_WORLD, &o, &rc));
        EXPECT_FAIL(ept_layer_make("tiny-qwen3", MOE_NUM_DTYPES, g_seed, rc, NULL, &L),
                    routes[i].st, routes[i].needle, -1);
        CHECK_API(moe_ep_comm_destroy(rc));
    }
    /* NCCL without a GPU (or without a CUDA build): refused everywhere; one rank alone with the
     * router's routing is the plain path and needs no transport */
    moe_ep_comm *nc = NULL;
    o = mpi_opts();
    o.transport = MOE_TRANSPORT_NCCL;
    CHECK_API(ept_comm_make(MPI_COMM_WORLD, &o, &nc));
    L = NULL;
    moe_status st = ept_layer_make("tiny-qwen3", MOE_NUM_DTYPES, g_seed, nc, NULL, &L);
    fprintf(stderr, "rank %d: a CPU layer over NCCL: %s %s\n", g_rank, moe_strerror(st),
            moe_last_error());
    if (g_size > 1) {
        CHECK(st == MOE_ERR_UNSUPPORTED && L == NULL);
    } else {
        CHECK(st == MOE_OK);
        CHECK_API(moe_layer_destroy(L));
    }
    CHECK_API(moe_ep_comm_destroy(nc));
    /* after all of that, the communicator still makes layers and is destroyable */
    L = NULL;
    CHECK_API(ept_layer_make("tiny-qwen3", MOE_NUM_DTYPES, g_seed, c, NULL, &L));
    CHECK_API(moe_layer_destroy(L));
    CHECK_API(moe_ep_comm_destroy(c));
    assert_true(all_true(ok));
}

/* A creation that fails in a rank's local steps (a config it cannot read, no weights source)
 * must not leave the layer counted on that rank's communicator. */
static void test_failed_create_releases_comm(void **state)
{
    (void)state;
    bool ok = true;
    moe_ep_comm *c = NULL;
    moe_ep_options o = mpi_opts();
    CHECK_API(ept_comm_make(MPI_COMM_WORLD, &o, &c));
    moe_layer *L = NULL;
    const char *cfg = g_rank == last_rank() ? "/nonexistent/config.json" : "tiny-qwen3";
    EXPECT_FAIL(ept_layer_make(cfg, MOE_NUM_DTYPES, g_seed, c, NULL, &L), MOE_ERR_INVALID_ARG,
                "neither a preset", last_rank());
    moe_layer_options lo = MOE_LAYER_OPTIONS_INIT;
    lo.backend = MOE_BACKEND_CPU;
    lo.comm = c;
    EXPECT_FAIL(moe_layer_create("tiny-qwen3", NULL, &lo, &L), MOE_ERR_INVALID_ARG,
                "weights source is NULL", -1);
    CHECK(L == NULL);
    CHECK_API(moe_ep_comm_destroy(c));
    assert_true(all_true(ok));
}

/* Every rank must hold the same model: a rank with another dtype, another config field,
 * other weights or another expert map fails every rank, naming what differs. */
static void test_fingerprint(void **state)
{
    (void)state;
    bool ok = true;
    skip_note("a fingerprint mismatch");
    if (g_size == 1) {
        assert_true(all_true(ok));
        return;
    }
    moe_ep_comm *c = NULL;
    moe_ep_options o = mpi_opts();
    CHECK_API(ept_comm_make(MPI_COMM_WORLD, &o, &c));
    const bool odd = g_rank == last_rank();
    moe_layer *L = (moe_layer *)&ok;
    EXPECT_FAIL(ept_layer_make("tiny-qwen3", odd ? MOE_DTYPE_BF16 : MOE_DTYPE_F32, g_seed, c,
                               NULL, &L), MOE_ERR_INVALID_ARG, "ranks disagree on the dtype", -1);
    CHECK(L == (moe_layer *)&ok); /* [out]: untouched on failure */
    /* tiny-qwen3 with norm_topk_prob false, written as a config.json on one rank */
    char path[256] = "tiny-qwen3";
    if (odd) CHECK(ept_config_write(path, sizeof path, false, 37, 23, 7, 3, false, "float32"));
    EXPECT_FAIL(ept_layer_make(path, MOE_NUM_DTYPES, g_seed, c, NULL, &L), MOE_ERR_INVALID_ARG,
                "ranks disagree on norm_topk_prob", -1);
    if (odd) ept_config_remove(path);
    EXPECT_FAIL(ept_layer_make("tiny-llama4", MOE_NUM_DTYPES, odd ? g_seed + 1 : g_seed, c, NULL,
                               &L),
                MOE_ERR_INVALID_ARG, "ranks disagree on the router and shared-expert weights", -1);
    int32_t map[7];
    for (int e = 0; e < 7; e++) map[e] = e % g_size;
    EXPECT_FAIL(ept_layer_make("tiny-qwen3", MOE_NUM_DTYPES, g_seed, c, odd ? map : NULL, &L),
                MOE_ERR_INVALID_ARG, "ranks disagree on the expert map", -1);
    CHECK(L == (moe_layer *)&ok);
    CHECK_API(moe_ep_comm_destroy(c));
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ calls ---- */

typedef struct fixture {
    moe_ep_comm *c;
    moe_layer *L;
    ept_shape s;
    void *x, *dout, *out, *dx;
    int T;
} fixture;

static bool fixture_make(fixture *f, const moe_ep_options *o, const char *config, uint64_t seed,
                         int Tmax)
{
    bool ok = true;
    memset(f, 0, sizeof *f);
    CHECK_API(ept_comm_make(MPI_COMM_WORLD, o, &f->c));
    if (f->c) CHECK_API(ept_layer_make(config, MOE_NUM_DTYPES, seed, f->c, NULL, &f->L));
    if (f->L) ok &= ept_shape_of(f->L, &f->s);
    if (!ok) return false;
    const size_t n = (size_t)Tmax * f->s.H;
    f->x = ept_global(f->s.dt, n, g_seed + (uint64_t)g_rank, "test.ep.err.x");
    f->dout = ept_global(f->s.dt, n, g_seed + (uint64_t)g_rank, "test.ep.err.dout");
    f->out = calloc(n + 1, f->s.dsz);
    f->dx = calloc(n + 1, f->s.dsz);
    return true;
}

static void fixture_free(fixture *f)
{
    bool ok = true;
    CHECK_API(moe_layer_destroy(f->L));
    CHECK_API(moe_ep_comm_destroy(f->c));
    free(f->x);
    free(f->dout);
    free(f->out);
    free(f->dx);
    (void)ok;
}

static moe_status fwd(fixture *f, int64_t T, const void *x)
{
    return moe_layer_forward_async(f->L, T, x, f->out, NULL, NULL);
}

static moe_status bwd(fixture *f, int64_t T, const void *x)
{
    return moe_layer_backward_async(f->L, T, x, f->dout, NULL, f->dx, NULL, NULL);
}

/* A working forward and backward on every rank (after a failure, the layer still works). */
static bool works(fixture *f, int T)
{
    bool ok = true;
    memset(f->out, 0xff, (size_t)T * f->s.H * f->s.dsz);
    memset(f->dx, 0xff, (size_t)T * f->s.H * f->s.dsz);
    CHECK_API(fwd(f, T, f->x));
    CHECK_API(bwd(f, T, f->x));
    CHECK(finite_all(f->s.dt, f->out, (size_t)T * f->s.H));
    CHECK(finite_all(f->s.dt, f->dx, (size_t)T * f->s.H));
    return ok;
}

/* A bad argument on one rank fails every rank's call before anything moves. */
static void test_bad_argument_one_rank(void **state)
{
    (void)state;
    bool ok = true;
    moe_ep_options o = mpi_opts();
    o.chunks = 2;
    fixture f;
    CHECK(fixture_make(&f, &o, "tiny-qwen3", g_seed, 9));
    if (!all_true(ok)) fail();
    const int T = 5, bad = last_rank();
    EXPECT_FAIL(fwd(&f, T, g_rank == 0 ? NULL : f.x), MOE_ERR_INVALID_ARG, "x is NULL", 0);
    EXPECT_FAIL(fwd(&f, g_rank == bad ? -1 : T, f.x), MOE_ERR_INVALID_ARG, "T = -1", bad);
    EXPECT_FAIL(moe_layer_forward_async(f.L, T, f.x, g_rank == bad ? NULL : f.out, NULL, NULL),
                MOE_ERR_INVALID_ARG, "out is NULL", bad);
    EXPECT_FAIL(moe_layer_forward_async(f.L, T, f.x, f.out, NULL, g_rank == 0 ? (void *)&ok : NULL),
                MOE_ERR_INVALID_ARG, "stream must be NULL", 0);
    EXPECT_FAIL(moe_layer_backward_async(f.L, T, g_rank == bad ? NULL : f.x, f.dout, NULL, f.dx,
                                         NULL, NULL), MOE_ERR_INVALID_ARG, "x is NULL", bad);
    EXPECT_FAIL(moe_layer_backward_async(f.L, T, f.x, g_rank == 0 ? NULL : f.dout, NULL, f.dx,
                                         NULL, NULL), MOE_ERR_INVALID_ARG, "dout is NULL", 0);
    /* host views: a dx of the wrong shape on one rank */
    moe_tensor_view xv = {f.s.dt, 2, {T, f.s.H}, f.x}, dv = {f.s.dt, 2, {T, f.s.H}, f.dout};
    moe_tensor_view dxv = {f.s.dt, 2, {g_rank == bad ? T + 1 : T, f.s.H}, f.dx};
    EXPECT_FAIL(moe_layer_backward(f.L, &xv, &dv, NULL, &dxv, NULL), MOE_ERR_INVALID_ARG,
                "dx must be", bad);
    /* ... and the same layer still works for everyone */
    ok &= works(&f, T);
    fixture_free(&f);
    assert_true(all_true(ok));
}

/* T over max_tokens_per_rank on one rank: MOE_ERR_OVERFLOW on every rank, forward and
 * backward (its buffers are sized for the bound: nothing is truncated). */
static void test_max_tokens_overflow(void **state)
{
    (void)state;
    bool ok = true;
    moe_ep_options o = mpi_opts();
    o.max_tokens_per_rank = 8;
    fixture f;
    CHECK(fixture_make(&f, &o, "tiny-llama4", g_seed, 9));
    if (!all_true(ok)) fail();
    const int bad = last_rank(), T = g_rank == bad ? 9 : 3;
    EXPECT_FAIL(fwd(&f, T, f.x), MOE_ERR_OVERFLOW, "exceed --max-tokens-per-rank 8", bad);
    EXPECT_FAIL(bwd(&f, T, f.x), MOE_ERR_OVERFLOW, "exceed --max-tokens-per-rank 8", bad);
    ok &= works(&f, 8);
    fixture_free(&f);
    assert_true(all_true(ok));
}

/* More rows arriving at a rank than max_recv_tokens: every token to rank 0 (all-to-one), 8 from
 * each rank and room for 7. MOE_ERR_OVERFLOW everywhere, naming the receiver, in the forward and
 * in the backward (the same rows travel); 1 token each fits. */
static void test_recv_overflow(void **state)
{
    (void)state;
    bool ok = true;
    moe_ep_options o = mpi_opts();
    o.max_tokens_per_rank = 8;
    o.max_recv_tokens = 7;
    o.route = "all-to-one"; /* k = 1: rank 0 alone receives */
    fixture f;
    CHECK(fixture_make(&f, &o, "tiny-llama4", g_seed, 9));
    if (!all_true(ok)) fail();
    EXPECT_FAIL(fwd(&f, 8, f.x), MOE_ERR_OVERFLOW, "receive buffer overflow", 0);
    EXPECT_FAIL(bwd(&f, 8, f.x), MOE_ERR_OVERFLOW, "receive buffer overflow", 0);
    ok &= works(&f, 1);
    fixture_free(&f);
    assert_true(all_true(ok));
}

/* Rank 0 in a forward while the others are in a backward: every rank fails, naming the call;
 * then everyone in the same call works again. */
static void test_call_mismatch(void **state)
{
    (void)state;
    bool ok = true;
    skip_note("a call mismatch");
    fixture f;
    moe_ep_options o = mpi_opts();
    CHECK(fixture_make(&f, &o, "tiny-qwen3", g_seed, 9));
    if (!all_true(ok)) fail();
    if (g_size > 1) {
        const int T = 4;
        moe_tensor_view xv = {f.s.dt, 2, {T, f.s.H}, f.x}, ov = {f.s.dt, 2, {T, f.s.H}, f.out};
        moe_tensor_view dv = {f.s.dt, 2, {T, f.s.H}, f.dout};
        EXPECT_FAIL(g_rank == 0 ? moe_layer_forward(f.L, &xv, &ov, NULL)
                                : moe_layer_backward(f.L, &xv, &dv, NULL, &ov, NULL),
                    MOE_ERR_INVALID_ARG, "ranks disagree on the call", -1);
        EXPECT_FAIL(g_rank == 0 ? bwd(&f, T, f.x) : fwd(&f, T, f.x), MOE_ERR_INVALID_ARG,
                    "ranks disagree on the call", -1);
    }
    ok &= works(&f, 4);
    moe_layer_stats st = MOE_LAYER_STATS_INIT;
    CHECK_API(moe_layer_stats_get(f.L, &st));
    CHECK(st.calls_forward == 1 && st.calls_backward == 1); /* the failed calls did not count */
    fixture_free(&f);
    assert_true(all_true(ok));
}

/* Two layers on one communicator (created collectively, different weights); rank 0 calls layer
 * A while the others call layer B: every rank fails, naming the layer. */
static void test_layer_mismatch(void **state)
{
    (void)state;
    bool ok = true;
    skip_note("a layer mismatch");
    fixture f;
    moe_ep_options o = mpi_opts();
    CHECK(fixture_make(&f, &o, "tiny-qwen3", g_seed, 9));
    moe_layer *B = NULL;
    if (f.c) CHECK_API(ept_layer_make("tiny-qwen3", MOE_NUM_DTYPES, g_seed + 7, f.c, NULL, &B));
    if (!all_true(ok)) fail();
    const int T = 4;
    if (g_size > 1) {
        moe_layer *mine = g_rank == 0 ? f.L : B;
        EXPECT_FAIL(moe_layer_forward_async(mine, T, f.x, f.out, NULL, NULL), MOE_ERR_INVALID_ARG,
                    "ranks disagree on the layer", -1);
        EXPECT_FAIL(moe_layer_backward_async(mine, T, f.x, f.dout, NULL, f.dx, NULL, NULL),
                    MOE_ERR_INVALID_ARG, "ranks disagree on the layer", -1);
    }
    /* both layers still work when everyone calls the same one */
    CHECK_API(moe_layer_forward_async(B, T, f.x, f.out, NULL, NULL));
    ok &= works(&f, T);
    CHECK_API(moe_layer_destroy(B));
    fixture_free(&f);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ agreement helpers ---- */

/* ep_agree: a failure on one rank reaches every rank with its reason; MPI errors are named. */
static void test_agree(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    const int bad = last_rank();
    moe_error_clear(&err);
    moe_status st = MOE_OK;
    if (g_rank == bad) st = moe_fail(&err, MOE_ERR_IO, "disk %d on fire", bad);
    st = ep_agree(MPI_COMM_WORLD, st, &err);
    CHECK(st == MOE_ERR_IO);
    CHECK(strstr(err.msg, "on fire") != NULL);
    if (g_rank != bad) {
        char want[64];
        snprintf(want, sizeof want, "rank %d failed", bad);
        CHECK(strstr(err.msg, want) != NULL);
    }
    moe_error_clear(&err);
    CHECK(ep_agree(MPI_COMM_WORLD, MOE_OK, &err) == MOE_OK);
    /* fields: equal passes, a difference is named with its range */
    const char *const names[2] = {"apples", "pears"};
    int64_t fl[2] = {3, g_rank == bad ? 5 : 4};
    st = ep_agree_fields(MPI_COMM_WORLD, MOE_OK, fl, names, 2, &err);
    if (g_size > 1) {
        CHECK(st == MOE_ERR_INVALID_ARG && strstr(err.msg, "ranks disagree on pears") != NULL);
        CHECK(strstr(err.msg, "from 4 to 5") != NULL);
    } else {
        CHECK(st == MOE_OK);
    }
    /* An MPI error code becomes "rank R: what failed: <MPI's own string>". */
    CHECK(ep_mpi_fail(&err, MPI_ERR_COUNT, g_rank, "MPI_Ialltoallv (test)") == MOE_ERR_MPI);
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(MPI_ERR_COUNT, s, &len);
    CHECK(strstr(err.msg, s) != NULL && strstr(err.msg, "MPI_Ialltoallv (test)") != NULL);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ weights from a file ---- */

/* Each rank reads only its experts (uneven slices) from a checkpoint rank 0 wrote, and computes
 * what the same weights generated in memory compute. */
static void test_reads_own_experts(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    moe_config cfg;
    CHECK_ST(moe_config_preset("tiny-qwen3", &cfg, &err));
    char path[256] = "";
    if (g_rank == 0) {
        snprintf(path, sizeof path, "/tmp/moe_ep_test_%d_%llu.safetensors", (int)getpid(),
                 (unsigned long long)g_seed);
        moe_weights full;
        CHECK_ST(moe_weights_random(&cfg, g_seed, 0, cfg.num_experts, MOE_DTYPE_F32, &full, &err));
        /* transformers 5's fused Qwen3 names: the canonical layout */
        moe_st_writer wr;
        moe_st_writer_init(&wr);
        CHECK_ST(moe_st_writer_add(&wr, "gate.weight", &full.router, &err));
        CHECK_ST(moe_st_writer_add(&wr, "experts.gate_up_proj", &full.w13, &err));
        CHECK_ST(moe_st_writer_add(&wr, "experts.down_proj", &full.w2, &err));
        CHECK_ST(moe_st_write(&wr, path, &err));
        moe_st_writer_free(&wr);
        moe_weights_free(&full);
    }
    MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (!all_true(ok)) fail();
    moe_ep_comm *c = NULL;
    moe_ep_options o = mpi_opts();
    CHECK_API(ept_comm_make(MPI_COMM_WORLD, &o, &c));
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_FILE;
    src.path = path;
    moe_layer_options lo = MOE_LAYER_OPTIONS_INIT;
    lo.backend = MOE_BACKEND_CPU;
    lo.threads = omp_get_max_threads();
    lo.comm = c;
    moe_layer *F = NULL, *R = NULL;
    CHECK_API(moe_layer_create("tiny-qwen3", &src, &lo, &F));
    CHECK_API(ept_layer_make("tiny-qwen3", MOE_NUM_DTYPES, g_seed, c, NULL, &R));
    ept_shape s;
    if (all_true(ok) && ept_shape_of(F, &s)) {
        const int El = 7 / g_size + (g_rank < 7 % g_size ? 1 : 0);
        const uint64_t per_expert = (uint64_t)3 * cfg.inter * cfg.hidden * 4;
        CHECK(s.El == El);
        moe_layer_stats st = MOE_LAYER_STATS_INIT;
        CHECK_API(moe_layer_stats_get(F, &st));
        CHECK(st.weight_bytes_read == (uint64_t)El * per_expert);
        const int T = 6;
        ept_io a, b;
        ept_io_alloc(&s, T, &a);
        ept_io_alloc(&s, T, &b);
        void *x = ept_global(s.dt, (size_t)T * s.H, g_seed + (uint64_t)g_rank, "test.ep.file.x");
        CHECK_API(ept_forward(F, &s, x, false, &a));
        CHECK_API(ept_forward(R, &s, x, true, &b));
        CHECK(ept_bitwise("out from the file", a.out, b.out, (size_t)T * s.H * s.dsz, s.dsz));
        CHECK_API(ept_backward(F, &s, x, x, NULL, true, &a));
        CHECK_API(ept_backward(R, &s, x, x, NULL, false, &b));
        CHECK(ept_bitwise("d w13 from the file", a.g_w13, b.g_w13,
                          (size_t)El * 2 * s.I * s.H * s.dsz, s.dsz));
        ept_io_free(&a);
        ept_io_free(&b);
        free(x);
    }
    CHECK_API(moe_layer_destroy(F));
    CHECK_API(moe_layer_destroy(R));
    CHECK_API(moe_ep_comm_destroy(c));
    MPI_Barrier(MPI_COMM_WORLD);
    if (g_rank == 0) unlink(path);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ parsers ---- */

static void test_route_parsers(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    moe_ep_route r;
    CHECK_ST(moe_ep_route_parse("skewed", 8, 2, &r, &err));
    CHECK(r.mode == MOE_EP_ROUTE_SKEWED && r.weights == MOE_EP_ROUTE_W_ROUTER);
    CHECK_ST(moe_ep_route_parse("all-to-one:3,w=uniform", 8, 2, &r, &err));
    CHECK(r.mode == MOE_EP_ROUTE_ALL_TO_ONE && r.target == 3 && r.weights == MOE_EP_ROUTE_W_UNIFORM);
    CHECK_ST(moe_ep_route_parse("experts:7,2", 8, 2, &r, &err));
    CHECK(r.mode == MOE_EP_ROUTE_FILE && r.rows == 1 && r.ids && r.ids[0] == 7 && r.ids[1] == 2);
    moe_ep_route_free(&r);
    struct {
        const char *spec, *needle;
    } bad[] = {
        {"sideways", "sideways"},         {"uniform,w=heavy", "heavy"},
        {"all-to-one:x", "bad target"},   {"experts:1", "k=2 distinct"},
        {"experts:1,1", "k=2 distinct"},  {"experts:1,2,3", "k=2 distinct"},
        {"experts:1,8", "k=2 distinct"},  {"experts:-1,2", "k=2 distinct"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        moe_error_clear(&err);
        CHECK(moe_ep_route_parse(bad[i].spec, 8, 2, &r, &err) == MOE_ERR_INVALID_ARG);
        if (!strstr(err.msg, bad[i].needle)) {
            fprintf(stderr, "rank %d: '%s': %s\n", g_rank, bad[i].spec, err.msg);
            ok = false;
        }
    }
    moe_transport tk;
    CHECK(moe_ep_transport_parse("nccl", &tk) && tk == MOE_TRANSPORT_NCCL);
    CHECK(!moe_ep_transport_parse("gloo", &tk));

    char path[256];
    snprintf(path, sizeof path, "/tmp/moe_ep_route_%d_%d.txt", (int)getpid(), g_rank);
    FILE *f = fopen(path, "w");
    fprintf(f, "# token ids, k=2\n0 1\n7 3  # trailing comment\n\n2 5\n");
    fclose(f);
    char spec[300];
    snprintf(spec, sizeof spec, "file:%s", path);
    CHECK_ST(moe_ep_route_parse(spec, 8, 2, &r, &err));
    CHECK(r.mode == MOE_EP_ROUTE_FILE && r.rows == 3);
    if (r.ids && r.rows == 3) {
        int32_t want[6] = {0, 1, 7, 3, 2, 5};
        CHECK(memcmp(r.ids, want, sizeof want) == 0);
        moe_expert_map m;
        CHECK_ST(moe_expert_map_build(8, 4, 1, 0, NULL, &m, &err));
        int32_t ids[4 * 2];
        CHECK_ST(moe_ep_route_ids(&r, &m, 2, 2, 4, ids, &err)); /* tokens 2..5 wrap */
        int32_t w2[8] = {2, 5, 0, 1, 7, 3, 2, 5};
        CHECK(memcmp(ids, w2, sizeof w2) == 0);
        moe_expert_map_free(&m);
    }
    moe_ep_route_free(&r);
    struct {
        const char *text;
        moe_status st;
        const char *needle;
    } files[] = {
        {"0 1\n3 3\n", MOE_ERR_FORMAT, "line 2"},
        {"0 9\n", MOE_ERR_FORMAT, "outside"},
        {"0 1 2\n", MOE_ERR_FORMAT, "multiple"},
        {"0 x\n", MOE_ERR_FORMAT, "not an integer"},
        {"# nothing\n", MOE_ERR_FORMAT, "multiple"},
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        f = fopen(path, "w");
        fputs(files[i].text, f);
        fclose(f);
        int32_t *ids = NULL;
        int64_t rows = 0;
        moe_error_clear(&err);
        CHECK(moe_ep_route_load_file(path, 8, 2, &ids, &rows, &err) == files[i].st);
        CHECK(ids == NULL && strstr(err.msg, files[i].needle) != NULL);
    }
    unlink(path);
    int32_t *ids = NULL;
    int64_t rows = 0;
    CHECK(moe_ep_route_load_file(path, 8, 2, &ids, &rows, &err) == MOE_ERR_IO);
    CHECK(strstr(err.msg, "cannot open") != NULL);
    assert_true(all_true(ok));
}

int main(int argc, char **argv)
{
    mpi_test_init(&argc, &argv);
    mpi_test_share_cores_and_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_comm_options),
        cmocka_unit_test(test_layer_create_refusals),
        cmocka_unit_test(test_failed_create_releases_comm),
        cmocka_unit_test(test_fingerprint),
        cmocka_unit_test(test_bad_argument_one_rank),
        cmocka_unit_test(test_max_tokens_overflow),
        cmocka_unit_test(test_recv_overflow),
        cmocka_unit_test(test_call_mismatch),
        cmocka_unit_test(test_layer_mismatch),
        cmocka_unit_test(test_agree),
        cmocka_unit_test(test_reads_own_experts),
        cmocka_unit_test(test_route_parsers),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
