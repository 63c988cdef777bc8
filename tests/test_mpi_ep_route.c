/*
 * test_mpi_ep_route.c — expert parallelism with forced routing (moe_ep_options.route), under
 * mpirun -np 1, 2 and 4, through the public API.
 *
 * Forced routing makes the experts of every token known in advance (ep.h: a function of the
 * GLOBAL token index): the ids each mode must produce are computed here from its definition
 * (uniform, all-to-one:R with the placement computed by the test, file:PATH from a table written
 * here, experts:ID,...; skewed from moe_ep_route_ids, whose distribution test_skew_shape checks).
 * Each case (tests/util/ep_test.h) compares the EP layer with a layer over MPI_COMM_SELF forced
 * to the same ids (expert gradients bitwise, the rest within tolerance), checks the counters
 * against those ids (rows per peer = tokens with at least one expert owned there) and that the
 * gradients of experts no token chose are exactly zero; and it compares the outputs with the
 * independent double-precision reference (cpu/reference.h, forced to the same ids).
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
#include "cpu/reference.h"
#include "dtype.h"
#include "ep/ep.h"
#include "ep_test.h"
#include "layer/expert_map.h"
#include "rng.h"
#include "weights.h"

static ept_bits g_bits;

/* ------------------------------------------------------------------ expected ids ---- */

typedef enum { R_UNIFORM, R_SKEWED, R_ALL_TO_ONE, R_FILE, R_EXPERTS } route_kind;

typedef struct route {
    route_kind kind;
    int target;           /* all-to-one */
    const int32_t *table; /* file [rows,k], experts [1,k] */
    int rows;
    bool w_uniform;       /* ",w=uniform" */
} route;

/* The [Tg,k] ids route r gives global tokens 0..Tg-1 with E experts over N x V ranks. */
static int32_t *expected_ids(const route *r, int E, int k, int N, int V, const int32_t *map,
                             int Tg)
{
    int32_t *ids = malloc(((size_t)Tg + 1) * k * sizeof(int32_t));
    int32_t *owner = malloc((size_t)E * 4), *vowner = malloc((size_t)E * 4),
            *vlocal = malloc((size_t)E * 4);
    if (!ids || !owner || !vowner || !vlocal) abort();
    ept_placement(E, N, V, map, owner, vowner, vlocal);
    int32_t pick[64];
    int n = 0;
    if (r->kind == R_ALL_TO_ONE) /* the target's experts, then the next virtual ranks' */
        for (int step = 0; step < N * V && n < k; step++)
            for (int e = 0; e < E && n < k; e++)
                if (vowner[e] == (r->target + step) % (N * V)) pick[n++] = e;
    for (int g = 0; g < Tg; g++)
        for (int j = 0; j < k; j++) {
            int32_t *o = ids + (size_t)g * k + j;
            switch (r->kind) {
            case R_UNIFORM: *o = (int32_t)(((int64_t)g * k + j) % E); break;
            case R_ALL_TO_ONE: *o = pick[j]; break;
            case R_FILE: *o = r->table[(size_t)(g % r->rows) * k + j]; break;
            case R_EXPERTS: *o = r->table[j]; break;
            case R_SKEWED: *o = -1; break;
            }
        }
    if (r->kind == R_SKEWED) {
        /* the generator itself (its shape is test_skew_shape's) */
        moe_error err;
        moe_expert_map m;
        moe_ep_route er;
        bool ok = moe_ep_route_parse("skewed", E, k, &er, &err) == MOE_OK &&
                  moe_expert_map_build(E, N, V, 0, map, &m, &err) == MOE_OK;
        if (!ok || moe_ep_route_ids(&er, &m, k, 0, Tg, ids, &err) != MOE_OK) {
            fprintf(stderr, "rank %d: skewed ids: %s\n", g_rank, err.msg);
            abort();
        }
        moe_expert_map_free(&m);
    }
    free(owner);
    free(vowner);
    free(vlocal);
    return ids;
}

/* ------------------------------------------------------------------ the double reference ---- */

typedef struct dref_arg {
    const char *config;
    const int32_t *ids_g;
    int Tg;
    bool router_grad_zero; /* w=uniform: the router gets no gradient at all */
} dref_arg;

static double *widen(moe_dtype dt, const void *p, size_t n)
{
    double *d = malloc((n ? n : 1) * sizeof(double));
    if (!d) abort();
    for (size_t i = 0; i < n; i++) d[i] = moe_load_elem(dt, p, i);
    return d;
}

/* a (dt) against the double reference ref, rows x cols */
static bool close_ref(const char *what, moe_dtype dt, const void *a, const double *ref,
                      size_t rows, size_t cols, double tol)
{
    if (rows * cols == 0) return true;
    double *ad = widen(dt, a, rows * cols);
    char label[96];
    snprintf(label, sizeof label, "r%d %s (double ref)", g_rank, what);
    bool ok = moe_test_close(label, ad, ref, rows, cols, tol);
    free(ad);
    return ok;
}

/* The EP layer's out, dx and gradients against ref_forward / ref_backward (doubles, HF's
 * rounding points) forced to the same ids, over all Tg tokens and all experts. */
static bool double_reference(void *argp, const moe_layer *L, const ept_shape *s,
                             const ept_io *io, int64_t off, const void *x, const void *dout)
{
    (void)L;
    const dref_arg *a = argp;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    if (a->router_grad_zero) {
        for (size_t i = 0; i < (size_t)s->E * s->H; i++)
            CHECK(moe_load_elem(s->dt, io->g_router, i) == 0.0);
        return ok;
    }
    moe_config cfg;
    moe_weights w;
    CHECK_ST(moe_config_resolve(a->config, &cfg, &err));
    CHECK_ST(moe_weights_random(&cfg, g_seed, 0, cfg.num_experts, s->dt, &w, &err));
    if (!ok) return false;
    const size_t Tg = (size_t)a->Tg, H = (size_t)s->H, E = (size_t)s->E, k = (size_t)s->k;
    const size_t I = (size_t)s->I, Is = (size_t)s->Is, T = (size_t)io->T;
    double *xd = widen(s->dt, x, Tg * H), *dd = widen(s->dt, dout, Tg * H);
    moe_ref_fwd f;
    memset(&f, 0, sizeof f);
    f.logits = malloc((Tg + 1) * E * sizeof(double));
    f.topk_ids = malloc((Tg + 1) * k * sizeof(int32_t));
    f.topk_w = malloc((Tg + 1) * k * sizeof(double));
    f.out = malloc((Tg + 1) * H * sizeof(double));
    f.forced_ids = a->ids_g;
    CHECK_ST(ref_forward(&w, s->dt, (int)Tg, xd, &f, &err));
    moe_ref_grads g;
    memset(&g, 0, sizeof g);
    g.dx = malloc((Tg + 1) * H * sizeof(double));
    g.d_router = malloc(E * H * sizeof(double));
    double *dw13 = malloc(E * 2 * I * H * sizeof(double)), *dw2 = malloc(E * H * I * sizeof(double));
    double *pw13[64] = {0}, *pw2[64] = {0};
    for (size_t e = 0; e < E; e++) {
        pw13[e] = dw13 + e * 2 * I * H;
        pw2[e] = dw2 + e * H * I;
    }
    g.d_w13 = pw13;
    g.d_w2 = pw2;
    if (Is) {
        g.d_shared_gate = malloc(Is * H * sizeof(double));
        g.d_shared_up = malloc(Is * H * sizeof(double));
        g.d_shared_down = malloc(H * Is * sizeof(double));
    }
    g.forced_ids = a->ids_g;
    CHECK_ST(ref_backward(&w, s->dt, (int)Tg, xd, dd, &g, &err));
    const double tol = moe_test_tol(s->dt, false), gtol = moe_test_tol(s->dt, true);
    if (ok) {
        CHECK(close_ref("out", s->dt, io->out, f.out + off * H, T, H, tol));
        CHECK(close_ref("dx", s->dt, io->dx, g.dx + off * H, T, H, gtol));
        CHECK(close_ref("d router", s->dt, io->g_router, g.d_router, E, H, gtol));
        for (int l = 0; l < s->El; l++) {
            const size_t e = (size_t)s->local[l];
            /* an expert without tokens has an all-zero reference: compared exactly */
            CHECK(close_ref("d w13", s->dt, (const char *)io->g_w13 + l * 2 * I * H * s->dsz,
                            pw13[e], 1, 2 * I * H, gtol));
            CHECK(close_ref("d w2", s->dt, (const char *)io->g_w2 + l * H * I * s->dsz, pw2[e],
                            1, H * I, gtol));
        }
        if (Is) {
            CHECK(close_ref("d shared gate", s->dt, io->g_sg, g.d_shared_gate, Is, H, gtol));
            CHECK(close_ref("d shared up", s->dt, io->g_su, g.d_shared_up, Is, H, gtol));
            CHECK(close_ref("d shared down", s->dt, io->g_sd, g.d_shared_down, H, Is, gtol));
        }
    }
    free(xd);
    free(dd);
    free(f.logits);
    free(f.topk_ids);
    free(f.topk_w);
    free(f.out);
    free(g.dx);
    free(g.d_router);
    free(dw13);
    free(dw2);
    free(g.d_shared_gate);
    free(g.d_shared_up);
    free(g.d_shared_down);
    moe_weights_free(&w);
    return ok;
}

/* ------------------------------------------------------------------ one forced case ---- */

typedef struct fcase {
    const char *config;
    int E, k;
    route r;
    const char *spec; /* the --route string the EP layer gets */
    int V, C;
    bool skewed_split, async;
    const int32_t *map;
} fcase;

static bool run_forced(const fcase *f)
{
    const int Tg = 29;
    int32_t *ids = expected_ids(&f->r, f->E, f->k, g_size, f->V ? f->V : 1, f->map, Tg);
    /* the reference over MPI_COMM_SELF: the same spec, except that all-to-one names a virtual
     * rank of this job's placement, so the reference gets the ids it must produce */
    char ref_spec[512];
    snprintf(ref_spec, sizeof ref_spec, "%s", f->spec);
    if (f->r.kind == R_ALL_TO_ONE) {
        int n = snprintf(ref_spec, sizeof ref_spec, "experts:");
        for (int j = 0; j < f->k; j++)
            n += snprintf(ref_spec + n, sizeof ref_spec - (size_t)n, "%s%d", j ? "," : "", ids[j]);
        if (f->r.w_uniform) snprintf(ref_spec + n, sizeof ref_spec - (size_t)n, ",w=uniform");
    }
    dref_arg da = {f->config, ids, Tg, f->r.w_uniform};
    ept_case c;
    memset(&c, 0, sizeof c);
    c.config = f->config;
    c.dt = MOE_NUM_DTYPES;
    c.seed = g_seed;
    c.Tg = Tg;
    c.skewed = f->skewed_split;
    c.V = f->V;
    c.C = f->C;
    c.map = f->map;
    c.async = f->async;
    c.route = f->spec;
    c.ref_route = ref_spec;
    c.ids_g = ids;
    c.check = double_reference;
    c.check_arg = &da;
    bool ok = ept_case_run(&c, &g_bits);
    free(ids);
    return ok;
}

static fcase qwen(void)
{
    fcase f;
    memset(&f, 0, sizeof f);
    f.config = "tiny-qwen3";
    f.E = 7;
    f.k = 3;
    return f;
}

static fcase llama(void)
{
    fcase f = qwen();
    f.config = "tiny-llama4";
    f.E = 5;
    f.k = 1;
    return f;
}

/* ------------------------------------------------------------------ the modes ---- */

static void test_uniform(void **state)
{
    (void)state;
    bool ok = true;
    fcase a = qwen(), b = llama(), c = qwen();
    a.r.kind = b.r.kind = c.r.kind = R_UNIFORM;
    a.spec = b.spec = c.spec = "uniform";
    b.C = 3;
    b.skewed_split = b.async = true;
    c.V = 2;
    c.C = 3;
    ok &= run_forced(&a);
    ok &= run_forced(&b);
    ok &= run_forced(&c);
    assert_true(all_true(ok));
}

static void test_skewed(void **state)
{
    (void)state;
    bool ok = true;
    fcase a = qwen(), b = llama();
    a.r.kind = b.r.kind = R_SKEWED;
    a.spec = b.spec = "skewed";
    a.C = 3;
    b.skewed_split = true;
    b.async = true;
    ok &= run_forced(&a);
    ok &= run_forced(&b);
    assert_true(all_true(ok));
}

/* Every token to one (virtual) rank: the others receive nothing and their experts' gradients
 * are zero. tiny-qwen3 (k = 3) to the last rank, which at 4 ranks owns 1 of the 7 experts: the
 * ids spill into rank 0's. Also the default target (0), and a virtual target. */
static void test_all_to_one(void **state)
{
    (void)state;
    bool ok = true;
    char spec[3][64];
    fcase a = qwen(), b = llama(), c = qwen();
    a.r.kind = b.r.kind = c.r.kind = R_ALL_TO_ONE;
    a.r.target = g_size - 1;
    snprintf(spec[0], sizeof spec[0], "all-to-one:%d", a.r.target);
    a.spec = spec[0];
    a.C = 3;
    b.r.target = 0;
    b.spec = "all-to-one";
    b.skewed_split = b.async = true;
    c.V = 2;
    c.r.target = 2 * g_size - 1;
    snprintf(spec[2], sizeof spec[2], "all-to-one:%d", c.r.target);
    c.spec = spec[2];
    ok &= run_forced(&a);
    ok &= run_forced(&b);
    ok &= run_forced(&c);
    assert_true(all_true(ok));
}

/* A routing table (5 rows: the 29 tokens wrap around it) of random distinct ids per row,
 * written to a file every rank reads. */
static void test_file(void **state)
{
    (void)state;
    bool ok = true;
    for (int p = 0; p < 2; p++) {
        fcase f = p == 0 ? qwen() : llama();
        int32_t table[5 * 3];
        uint64_t st = moe_rng_stream(g_seed, "test.ep.table");
        for (int r = 0; r < 5; r++)
            for (int j = 0; j < f.k; j++) {
                bool dup;
                int tries = 0;
                do {
                    table[r * f.k + j] =
                        (int32_t)(moe_rng_u64(st, (uint64_t)(r * 64 + j * 8 + tries++)) % (uint64_t)f.E);
                    dup = false;
                    for (int a = 0; a < j; a++) dup |= table[r * f.k + a] == table[r * f.k + j];
                } while (dup);
            }
        /* one file, one spec string: the ranks must agree on the route */
        char path[64] = "/tmp/moe_ep_route_XXXXXX";
        int fd = g_rank == 0 ? mkstemp(path) : 0;
        CHECK(fd >= 0);
        FILE *fp = g_rank == 0 && fd >= 0 ? fdopen(fd, "w") : NULL;
        if (fp) {
            fprintf(fp, "# %s, k=%d\n", f.config, f.k);
            for (int r = 0; r < 5; r++) {
                for (int j = 0; j < f.k; j++) fprintf(fp, "%d ", table[r * f.k + j]);
                fprintf(fp, "  # row %d\n", r);
            }
            fclose(fp);
        }
        MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
        char spec[128];
        snprintf(spec, sizeof spec, "file:%s", path);
        f.r.kind = R_FILE;
        f.r.table = table;
        f.r.rows = 5;
        f.spec = spec;
        f.C = p == 0 ? 1 : 3;
        f.V = p == 1 ? 2 : 1;
        f.skewed_split = p == 1;
        ok &= run_forced(&f);
        MPI_Barrier(MPI_COMM_WORLD);
        if (g_rank == 0) unlink(path);
    }
    assert_true(all_true(ok));
}

/* The same experts for every token: the others get no token, so exactly zero gradients. */
static void test_experts_list(void **state)
{
    (void)state;
    bool ok = true;
    static const int32_t q[3] = {0, 2, 4}, l[1] = {3};
    fcase a = qwen(), b = llama();
    a.r.kind = b.r.kind = R_EXPERTS;
    a.r.table = q;
    a.spec = "experts:0,2,4";
    b.r.table = l;
    b.spec = "experts:3";
    b.C = 3;
    b.async = true;
    ok &= run_forced(&a);
    ok &= run_forced(&b);
    /* with an interleaved map: experts 0, 2, 4 on ranks 0, 2 mod N, 0 mod N */
    int32_t map[7];
    for (int e = 0; e < 7; e++) map[e] = e % g_size;
    a.map = map;
    a.skewed_split = true;
    ok &= run_forced(&a);
    assert_true(all_true(ok));
}

/* ",w=uniform": the weights are 1/k, not the router's, so the router gets no gradient at all
 * (exactly zero on every rank), while the experts' still match. */
static void test_uniform_weights(void **state)
{
    (void)state;
    bool ok = true;
    fcase a = qwen(), b = llama();
    a.r.kind = R_UNIFORM;
    a.r.w_uniform = true;
    a.spec = "uniform,w=uniform";
    b.r.kind = R_SKEWED;
    b.r.w_uniform = true;
    b.spec = "skewed,w=uniform";
    b.C = 3;
    ok &= run_forced(&a);
    ok &= run_forced(&b);
    assert_true(all_true(ok));
}

/* A token whose k experts are all on one rank goes to it ONCE: with 4 experts per rank and
 * every token on experts 0, 1, 2 (rank 0's), rank 0 receives every token exactly once and
 * computes them all, the others receive and compute nothing. */
static bool once_check(void *arg, const moe_layer *L, const ept_shape *s, const ept_io *io,
                       int64_t off, const void *x, const void *dout)
{
    (void)io;
    (void)off;
    (void)x;
    (void)dout;
    (void)s;
    const int *cnt = arg;
    bool ok = true;
    uint64_t sent[4] = {0}, recv[4] = {0};
    moe_layer_stats st = MOE_LAYER_STATS_INIT;
    st.peers = g_size;
    st.peer_rows_sent = sent;
    st.peer_rows_recv = recv;
    CHECK(moe_layer_stats_get(L, &st) == MOE_OK);
    int Tg = 0;
    for (int r = 0; r < g_size; r++) Tg += cnt[r];
    CHECK(st.tokens_computed == (g_rank == 0 ? (uint64_t)Tg : 0));
    CHECK(sent[0] == (uint64_t)cnt[g_rank]);
    for (int q = 1; q < g_size; q++) CHECK(sent[q] == 0);
    for (int q = 0; q < g_size; q++) CHECK(recv[q] == (g_rank == 0 ? (uint64_t)cnt[q] : 0));
    return ok;
}

static void test_once_per_rank(void **state)
{
    (void)state;
    bool ok = true;
    char path[256];
    CHECK(ept_config_write(path, sizeof path, false, 33, 21, 4 * g_size, 3, true, "float32"));
    int cnt[4], off[5];
    ept_split(29, g_size, false, cnt, off);
    fcase f = qwen();
    f.config = path;
    f.E = 4 * g_size;
    static const int32_t ids[3] = {0, 1, 2};
    f.r.kind = R_EXPERTS;
    f.r.table = ids;
    f.spec = "experts:0,1,2";
    /* the case's own checks, then the explicit counts above on the same layer */
    const int Tg = 29;
    int32_t *want = expected_ids(&f.r, f.E, f.k, g_size, 1, NULL, Tg);
    ept_case c;
    memset(&c, 0, sizeof c);
    c.config = path;
    c.dt = MOE_NUM_DTYPES;
    c.seed = g_seed;
    c.Tg = Tg;
    c.route = f.spec;
    c.ref_route = f.spec;
    c.ids_g = want;
    c.check = once_check;
    c.check_arg = cnt;
    ok &= ept_case_run(&c, &g_bits);
    free(want);
    ept_config_remove(path);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ the generator ---- */

/* Skewed routing is skewed: ids in range, distinct per token, expert 0 the most used and far
 * more than the last; the same tokens get the same ids whatever offset they are asked at. */
static void test_skew_shape(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    const int E = 12, k = 3, T = 400;
    moe_ep_route r;
    moe_expert_map m;
    CHECK_ST(moe_ep_route_parse("skewed", E, k, &r, &err));
    CHECK_ST(moe_expert_map_build(E, 4, 1, 0, NULL, &m, &err));
    int32_t *ids = malloc((size_t)T * k * sizeof(int32_t));
    CHECK_ST(moe_ep_route_ids(&r, &m, k, 0, T, ids, &err));
    int count[12] = {0};
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            int e = ids[t * k + j];
            CHECK(e >= 0 && e < E);
            for (int a = 0; a < j; a++) CHECK(ids[t * k + a] != e);
            if (e >= 0 && e < E) count[e]++;
        }
    for (int e = 1; e < E; e++) CHECK(count[0] >= count[e]);
    CHECK(count[0] > 3 * count[E - 1]);
    int32_t *again = malloc((size_t)100 * k * sizeof(int32_t));
    CHECK_ST(moe_ep_route_ids(&r, &m, k, 150, 100, again, &err));
    CHECK(memcmp(again, ids + 150 * k, (size_t)100 * k * sizeof(int32_t)) == 0);
    free(again);
    free(ids);
    moe_expert_map_free(&m);
    assert_true(all_true(ok));
}

static int report(void **state)
{
    (void)state;
    ept_bits_report("test_mpi_ep_route", &g_bits);
    return 0;
}

int main(int argc, char **argv)
{
    mpi_test_init(&argc, &argv);
    mpi_test_share_cores_and_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uniform),        cmocka_unit_test(test_skewed),
        cmocka_unit_test(test_all_to_one),     cmocka_unit_test(test_file),
        cmocka_unit_test(test_experts_list),   cmocka_unit_test(test_uniform_weights),
        cmocka_unit_test(test_once_per_rank),  cmocka_unit_test(test_skew_shape),
    };
    int rc = cmocka_run_group_tests(tests, NULL, report);
    MPI_Finalize();
    return rc;
}
