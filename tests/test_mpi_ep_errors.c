/*
 * test_mpi_ep_errors.c — the EP layer's failure behaviour under mpirun -np 1, 2, 4: every rank
 * returns an error when any rank finds a bad argument (nobody is left blocked in a collective;
 * ctest's timeout would catch a hang), clear messages for impossible splits (E=7 over 2 or 4
 * ranks), sync-free overflow is an error and never a truncation, each rank reads only its own
 * experts from a checkpoint, and the routing-file / option parsers reject bad input.
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
#include "ep/ep_transport.h"
#include "rng.h"
#include "safetensors.h"
#include "weights.h"

/* A call that must fail with status `want` and a message containing `needle`. */
#define CHECK_FAILS(call, want, needle)                                                    \
    do {                                                                                   \
        moe_error_clear(&err);                                                             \
        moe_status s_ = (call);                                                            \
        fprintf(stderr, "rank %d: expected failure: %s\n", g_rank, err.msg);               \
        if (s_ != (want) || !strstr(err.msg, (needle))) {                                  \
            fprintf(stderr, "rank %d: %s:%d: %s -> %s '%s', expected %s with '%s'\n",      \
                    g_rank, __FILE__, __LINE__, #call, moe_strerror(s_), err.msg,          \
                    moe_strerror(want), (needle));                                         \
            ok = false;                                                                    \
        }                                                                                  \
    } while (0)

static moe_config make_cfg(moe_arch arch, int E, int k)
{
    moe_config c;
    moe_error err;
    moe_config_preset(arch == MOE_ARCH_QWEN3 ? "tiny-qwen3" : "tiny-llama4", &c, &err);
    c.num_experts = E;
    c.top_k = k;
    return c;
}

static void *rand_rows(moe_dtype dt, const char *name, int T, int H)
{
    size_t n = (size_t)T * H;
    void *p = malloc((n ? n : 1) * moe_dtype_size(dt));
    uint64_t s = moe_rng_stream(g_seed, name);
    for (size_t i = 0; i < n; i++) moe_store_elem(dt, p, i, moe_rng_normal(s, (uint64_t)(g_rank * 100000 + i)));
    return p;
}

static bool finite_all(moe_dtype dt, const void *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(moe_load_elem(dt, p, i))) return false;
    return true;
}

/* ------------------------------------------------------------------ splits ---- */

static void test_bad_splits(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    moe_config c7;
    CHECK_ST(moe_config_preset("tiny-qwen3", &c7, &err)); /* E = 7 */
    CHECK(c7.num_experts == 7);
    moe_weights w;
    memset(&w, 0, sizeof w);
    if (7 % g_size != 0) {
        /* The clear error, on every rank, before anything is allocated. */
        CHECK_FAILS(moe_ep_weights_random(MPI_COMM_WORLD, &c7, g_seed, 1, MOE_DTYPE_F32, &w, &err),
                    MOE_ERR_INVALID_ARG, "E=7");
        CHECK(strstr(err.msg, "divide") != NULL);
    } else {
        CHECK_ST(moe_ep_weights_random(MPI_COMM_WORLD, &c7, g_seed, 1, MOE_DTYPE_F32, &w, &err));
        moe_ep_ctx *ctx = NULL;
        CHECK_ST(moe_ep_ctx_create(MPI_COMM_WORLD, &w, NULL, &ctx, &err));
        moe_ep_ctx_destroy(ctx);
        /* V=2 virtual ranks would need E divisible by 2. */
        moe_ep_options o = MOE_EP_OPTIONS_INIT;
        o.virtual_ranks = 2;
        CHECK_FAILS(moe_ep_ctx_create(MPI_COMM_WORLD, &w, &o, &ctx, &err), MOE_ERR_INVALID_ARG,
                    "virtual");
        CHECK(ctx == NULL);
        moe_weights_free(&w);
    }
    /* More ranks than experts. */
    int b = -1, n = -1;
    CHECK_FAILS(moe_ep_expert_range(3, 4, 0, &b, &n, &err), MOE_ERR_INVALID_ARG, "at least");
    CHECK_FAILS(moe_ep_expert_range(12, 5, 0, &b, &n, &err), MOE_ERR_INVALID_ARG, "E=12");
    CHECK_ST(moe_ep_expert_range(12, 4, 3, &b, &n, &err));
    CHECK(b == 9 && n == 3);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ agreement ---- */

/* ep_agree: a failure on one rank reaches every rank with its reason; MPI errors are named. */
static void test_agree(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    int bad = g_size - 1;
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
    /* An MPI error code becomes "rank R: what failed: <MPI's own string>". */
    CHECK(ep_mpi_fail(&err, MPI_ERR_COUNT, g_rank, "MPI_Ialltoallv (test)") == MOE_ERR_MPI);
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(MPI_ERR_COUNT, s, &len);
    CHECK(strstr(err.msg, s) != NULL && strstr(err.msg, "MPI_Ialltoallv (test)") != NULL);
    assert_true(all_true(ok));
}

typedef struct fixture {
    moe_config cfg;
    moe_weights w;
    moe_ep_ctx *ctx;
} fixture;

static bool fixture_make(fixture *f, moe_arch arch, int E, int k, const moe_ep_options *o)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    memset(f, 0, sizeof *f);
    f->cfg = make_cfg(arch, E, k);
    CHECK_ST(moe_ep_weights_random(MPI_COMM_WORLD, &f->cfg, g_seed, o ? o->virtual_ranks : 1,
                                   MOE_DTYPE_F32, &f->w, &err));
    if (ok) CHECK_ST(moe_ep_ctx_create(MPI_COMM_WORLD, &f->w, o, &f->ctx, &err));
    return ok;
}

static void fixture_free(fixture *f)
{
    moe_ep_ctx_destroy(f->ctx);
    moe_weights_free(&f->w);
}

/* A bad argument on ONE rank makes every rank's call return an error (no rank hangs in the
 * next collective), and the context keeps working afterwards. */
static void test_bad_argument_one_rank(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    fixture f;
    moe_ep_options o = MOE_EP_OPTIONS_INIT;
    o.chunks = 2;
    ok &= fixture_make(&f, MOE_ARCH_QWEN3, 12, 3, &o);
    int H = f.cfg.hidden, T = 5, bad = g_size - 1;
    void *x = rand_rows(MOE_DTYPE_F32, "x", T, H);
    void *out = malloc((size_t)T * H * 4);
    char want[64];
    snprintf(want, sizeof want, "rank %d failed", bad);

    /* negative token count on the last rank */
    moe_error_clear(&err);
    moe_status st = moe_ep_forward(f.ctx, g_rank == bad ? -1 : T, x, out, NULL, NULL, NULL, &err);
    fprintf(stderr, "rank %d: %s\n", g_rank, err.msg);
    CHECK(st == MOE_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "T_local=-1") != NULL);
    if (g_rank != bad) CHECK(strstr(err.msg, want) != NULL);

    /* NULL input with tokens, on rank 0 */
    moe_error_clear(&err);
    st = moe_ep_forward(f.ctx, T, g_rank == 0 ? NULL : x, out, NULL, NULL, NULL, &err);
    CHECK(st == MOE_ERR_INVALID_ARG && strstr(err.msg, "x is NULL") != NULL);

    /* backward: gradients of the wrong shape on the last rank */
    moe_weights g;
    moe_error_clear(&err);
    CHECK_ST(moe_weights_zeros_like(&f.w, MOE_DTYPE_F32, &g, &err));
    if (g_rank == bad) g.w2.shape[1] += 1;
    void *dx = malloc((size_t)T * H * 4);
    moe_error_clear(&err);
    st = moe_ep_backward(f.ctx, T, x, x, dx, &g, NULL, &err);
    fprintf(stderr, "rank %d: %s\n", g_rank, err.msg);
    CHECK(st == MOE_ERR_INVALID_ARG && strstr(err.msg, "grads w2") != NULL);
    if (g_rank == bad) g.w2.shape[1] -= 1;

    /* ... and the same context still works for everyone */
    moe_error_clear(&err);
    CHECK_ST(moe_ep_forward(f.ctx, T, x, out, NULL, NULL, NULL, &err));
    CHECK(finite_all(MOE_DTYPE_F32, out, (size_t)T * H));
    CHECK_ST(moe_ep_backward(f.ctx, T, x, x, dx, &g, NULL, &err));
    CHECK(finite_all(MOE_DTYPE_F32, dx, (size_t)T * H));
    moe_weights_free(&g);
    free(dx);
    free(x);
    free(out);
    fixture_free(&f);
    assert_true(all_true(ok));
}

/* Context creation: options that differ between ranks, or weights of the wrong slice, fail
 * everywhere. */
static void test_bad_context(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    moe_config cfg = make_cfg(MOE_ARCH_LLAMA4, 8, 2);
    moe_weights w, full;
    CHECK_ST(moe_ep_weights_random(MPI_COMM_WORLD, &cfg, g_seed, 1, MOE_DTYPE_F32, &w, &err));
    CHECK_ST(moe_weights_random(&cfg, g_seed, 0, 8, MOE_DTYPE_F32, &full, &err));
    moe_ep_ctx *ctx = NULL;
    moe_ep_options o = MOE_EP_OPTIONS_INIT;
    if (g_size > 1) {
        o.chunks = g_rank == 0 ? 2 : 1;
        CHECK_FAILS(moe_ep_ctx_create(MPI_COMM_WORLD, &w, &o, &ctx, &err), MOE_ERR_INVALID_ARG,
                    "disagree on --chunks");
        CHECK(ctx == NULL);
        o.chunks = 1;
        /* rank 0 hands in all experts instead of its slice */
        CHECK_FAILS(moe_ep_ctx_create(MPI_COMM_WORLD, g_rank == 0 ? &full : &w, &o, &ctx, &err),
                    MOE_ERR_INVALID_ARG, "owns experts");
        CHECK(ctx == NULL);
    }
    /* bad option values on one rank */
    o.chunks = g_rank == g_size - 1 ? 0 : 1;
    CHECK_FAILS(moe_ep_ctx_create(MPI_COMM_WORLD, &w, &o, &ctx, &err), MOE_ERR_INVALID_ARG,
                "--chunks 0");
    o.chunks = 1;
    o.route.mode = MOE_EP_ROUTE_ALL_TO_ONE;
    o.route.target = g_size; /* one past the last rank */
    CHECK_FAILS(moe_ep_ctx_create(MPI_COMM_WORLD, &w, &o, &ctx, &err), MOE_ERR_INVALID_ARG,
                "all-to-one");
    CHECK(ctx == NULL);
    /* NCCL: unsupported without CUDA or a GPU; where it can run, it must agree with MPI. */
    o = (moe_ep_options)MOE_EP_OPTIONS_INIT;
    o.transport = MOE_EP_TRANSPORT_NCCL;
    moe_error_clear(&err);
    moe_status st = moe_ep_ctx_create(MPI_COMM_WORLD, &w, &o, &ctx, &err);
    fprintf(stderr, "rank %d: NCCL transport: %s %s\n", g_rank, moe_strerror(st), err.msg);
    if (st == MOE_OK) {
        moe_ep_ctx *mctx = NULL;
        moe_ep_options m = MOE_EP_OPTIONS_INIT;
        m.transport = MOE_EP_TRANSPORT_MPI;
        m.chunks = 2;
        CHECK_ST(moe_ep_ctx_create(MPI_COMM_WORLD, &w, &m, &mctx, &err));
        int T = 7, H = cfg.hidden;
        void *x = rand_rows(MOE_DTYPE_F32, "x", T, H);
        void *a = calloc((size_t)T * H, 4), *b = calloc((size_t)T * H, 4);
        CHECK_ST(moe_ep_forward(ctx, T, x, a, NULL, NULL, NULL, &err));
        CHECK_ST(moe_ep_forward(mctx, T, x, b, NULL, NULL, NULL, &err));
        CHECK(memcmp(a, b, (size_t)T * H * 4) == 0);
        free(x);
        free(a);
        free(b);
        moe_ep_ctx_destroy(mctx);
        moe_ep_ctx_destroy(ctx);
    } else {
        CHECK(st == MOE_ERR_UNSUPPORTED || st == MOE_ERR_NO_DEVICE);
        CHECK(ctx == NULL);
    }
    moe_weights_free(&w);
    moe_weights_free(&full);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ sync-free sizing ---- */

static void test_overflow(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_ep_options o = MOE_EP_OPTIONS_INIT;
    o.max_tokens_per_rank = 8;
    o.max_recv_tokens = 10;
    o.route.mode = MOE_EP_ROUTE_ALL_TO_ONE; /* all to rank 0 */
    fixture f;
    ok &= fixture_make(&f, MOE_ARCH_QWEN3, 12, 3, &o);
    int H = f.cfg.hidden;
    void *x = rand_rows(MOE_DTYPE_F32, "x", 9, H);
    void *out = malloc((size_t)9 * H * 4);
    /* Rank 0 receives 6 tokens from every rank: more than 10 from 2 ranks on. */
    int T = 6;
    moe_error_clear(&err);
    moe_status st = moe_ep_forward(f.ctx, T, x, out, NULL, NULL, NULL, &err);
    fprintf(stderr, "rank %d: %s\n", g_rank, err.msg);
    if (g_size * T > 10) {
        CHECK(st == MOE_ERR_INVALID_ARG && strstr(err.msg, "overflow") != NULL);
        CHECK(strstr(err.msg, "rank 0") != NULL);
    } else {
        CHECK(st == MOE_OK);
    }
    /* A rank over max_tokens_per_rank. */
    CHECK_FAILS(moe_ep_forward(f.ctx, g_rank == 0 ? 9 : 1, x, out, NULL, NULL, NULL, &err),
                MOE_ERR_INVALID_ARG, "max_tokens_per_rank");
    /* Within bounds it runs (1 token each: at most 4 arrive). */
    moe_error_clear(&err);
    CHECK_ST(moe_ep_forward(f.ctx, 1, x, out, NULL, NULL, NULL, &err));
    CHECK(finite_all(MOE_DTYPE_F32, out, (size_t)H));
    fixture_free(&f);
    free(x);
    free(out);

    moe_ep_buffer_sizes bs;
    moe_error_clear(&err);
    moe_config cfg = make_cfg(MOE_ARCH_QWEN3, 12, 3);
    CHECK_ST(moe_ep_buffer_sizes_for(100, 0, 4, 1, &cfg, MOE_DTYPE_BF16, false, &bs, &err));
    CHECK(bs.send_rows == 300 && bs.recv_rows == 400);
    CHECK(bs.send_bytes == (size_t)300 * (2 * (37 + 37 + 3) + 4 * 3));
    CHECK_ST(moe_ep_buffer_sizes_for(100, 50, 2, 1, &cfg, MOE_DTYPE_BF16, false, &bs, &err));
    CHECK(bs.send_rows == 200 && bs.recv_rows == 50);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ weights read ---- */

/* Each rank reads only its experts from a checkpoint (rank 0 writes the full tensors). */
static void test_reads_own_experts(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    moe_config cfg = make_cfg(MOE_ARCH_QWEN3, 12, 3);
    char path[256] = "";
    if (g_rank == 0) {
        snprintf(path, sizeof path, "/tmp/moe_ep_test_%d_%llu.safetensors", (int)getpid(),
                 (unsigned long long)g_seed);
        moe_weights full;
        CHECK_ST(moe_weights_random(&cfg, g_seed, 0, 12, MOE_DTYPE_F32, &full, &err));
        /* transformers 5's fused Qwen3 names, canonical layout */
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
    moe_weights w, want;
    CHECK_ST(moe_ep_weights_load(MPI_COMM_WORLD, &cfg, path, -1, 1, MOE_DTYPE_F32, &w, &err));
    int El = 12 / g_size;
    uint64_t per_expert = (uint64_t)(2 * cfg.inter * cfg.hidden + cfg.hidden * cfg.inter) * 4;
    if (ok) {
        CHECK(w.expert_begin == g_rank * El && w.expert_count == El);
        CHECK(w.bytes_read == (uint64_t)El * per_expert);
        CHECK_ST(moe_weights_random(&cfg, g_seed, g_rank * El, El, MOE_DTYPE_F32, &want, &err));
        CHECK(memcmp(w.w13.data, want.w13.data, w.w13.nbytes) == 0);
        CHECK(memcmp(w.w2.data, want.w2.data, w.w2.nbytes) == 0);
        moe_ep_ctx *ctx = NULL;
        CHECK_ST(moe_ep_ctx_create(MPI_COMM_WORLD, &w, NULL, &ctx, &err));
        if (ctx) {
            const moe_ep_stats *st = moe_ep_ctx_stats(ctx);
            CHECK(st->weight_bytes_read == (uint64_t)El * per_expert);
            CHECK(st->weight_bytes_held == (uint64_t)El * per_expert);
        }
        moe_ep_ctx_destroy(ctx);
        moe_weights_free(&want);
        moe_weights_free(&w);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (g_rank == 0) unlink(path);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ parsers ---- */

static void test_parsers(void **state)
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
    CHECK_FAILS(moe_ep_route_parse("sideways", 8, 2, &r, &err), MOE_ERR_INVALID_ARG, "sideways");
    CHECK_FAILS(moe_ep_route_parse("uniform,w=heavy", 8, 2, &r, &err), MOE_ERR_INVALID_ARG, "heavy");
    moe_ep_transport_kind tk;
    CHECK(moe_ep_transport_parse("nccl", &tk) && tk == MOE_EP_TRANSPORT_NCCL);
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
    if (r.ids) {
        int32_t want[6] = {0, 1, 7, 3, 2, 5};
        CHECK(memcmp(r.ids, want, sizeof want) == 0);
        int32_t ids[4 * 2];
        CHECK_ST(moe_ep_route_ids(&r, 8, 2, 4, 2, 4, ids, &err)); /* tokens 2..5 wrap */
        int32_t w2[8] = {2, 5, 0, 1, 7, 3, 2, 5};
        CHECK(memcmp(ids, w2, sizeof w2) == 0);
        free((void *)r.ids);
    }
    f = fopen(path, "w");
    fprintf(f, "0 1\n3 3\n");
    fclose(f);
    int32_t *ids = NULL;
    int64_t rows = 0;
    CHECK_FAILS(moe_ep_route_load_file(path, 8, 2, &ids, &rows, &err), MOE_ERR_FORMAT, "line 2");
    f = fopen(path, "w");
    fprintf(f, "0 9\n");
    fclose(f);
    CHECK_FAILS(moe_ep_route_load_file(path, 8, 2, &ids, &rows, &err), MOE_ERR_FORMAT, "outside");
    f = fopen(path, "w");
    fprintf(f, "0 1 2\n");
    fclose(f);
    CHECK_FAILS(moe_ep_route_load_file(path, 8, 2, &ids, &rows, &err), MOE_ERR_FORMAT, "multiple");
    unlink(path);
    CHECK_FAILS(moe_ep_route_load_file(path, 8, 2, &ids, &rows, &err), MOE_ERR_IO, "cannot open");
    assert_true(all_true(ok));
}

int main(int argc, char **argv)
{
    mpi_test_init(&argc, &argv);
    mpi_test_share_cores_and_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_splits),
        cmocka_unit_test(test_agree),
        cmocka_unit_test(test_bad_argument_one_rank),
        cmocka_unit_test(test_bad_context),
        cmocka_unit_test(test_overflow),
        cmocka_unit_test(test_reads_own_experts),
        cmocka_unit_test(test_parsers),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
