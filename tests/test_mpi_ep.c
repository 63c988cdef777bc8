/*
 * test_mpi_ep.c — expert parallelism against single-rank results (run by ctest under mpirun at
 * -np 1, 2 and 4).
 *
 * Every rank generates the SAME global inputs (counter-based RNG: x [Tg,H], dout [Tg,H]) and the
 * full weights, computes the single-rank answer for all Tg tokens itself, and compares its own
 * rows / its own expert slice with what moe_ep_forward / moe_ep_backward produced:
 *   - natural routing: the fused path on one rank (cpu_block_forward / cpu_block_backward);
 *   - forced routing: the independent double-precision reference (ref_forward / ref_backward
 *     with forced_ids), since the fused path cannot force routing;
 *   - virtual ranks: one process (MPI_COMM_SELF) playing V=4 ranks vs the plain fused path.
 * Counters are checked against counts computed here from the routing: tokens sent to a peer =
 * tokens with at least one expert owned by it (once, however many of its experts they use).
 * Tokens are split unevenly (Tg = 29 is not divisible by 2 or 4; one layout leaves the last
 * rank with no tokens). Outputs are poisoned with NaN before each call.
 * Every verdict is agreed over all ranks before cmocka sees it, so a failure on one rank fails
 * the test on all of them instead of leaving the others blocked in the next collective.
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

#include "block_state.h"
#include "config.h"
#include "cpu/cpu_fused.h"
#include "cpu_block_ref.h"
#include "cpu/reference.h"
#include "dtype.h"
#include "ep/ep.h"
#include "rng.h"
#include "weights.h"


/* ------------------------------------------------------------------ set-up ---- */

static moe_config make_cfg(moe_arch arch, int E, int k)
{
    moe_config c;
    moe_error err;
    moe_config_preset(arch == MOE_ARCH_QWEN3 ? "tiny-qwen3" : "tiny-llama4", &c, &err);
    c.num_experts = E;
    c.top_k = k;
    return c;
}

typedef enum split_kind {
    SPLIT_EVEN = 0, /* Tg/N each, the first Tg%N one more */
    SPLIT_SKEW = 1, /* rank r gets ~ (r+1) shares, the last rank none (N > 1) */
} split_kind;

typedef struct setup {
    moe_config cfg;
    moe_dtype dt;
    size_t dsz;
    int Tg, T, off; /* global tokens; mine and where they start */
    int *cnt, *offs;
    void *xg, *doutg;   /* [Tg,H] in dt */
    double *xd, *doutd; /* the same values widened */
    moe_weights wl;     /* my slice */
    moe_weights wf;     /* all experts */
} setup;

static void split_tokens(int Tg, int N, split_kind k, int *cnt)
{
    if (k == SPLIT_EVEN || N == 1) {
        for (int r = 0; r < N; r++) cnt[r] = Tg / N + (r < Tg % N ? 1 : 0);
        return;
    }
    int shares = 0;
    for (int r = 0; r < N - 1; r++) shares += r + 1;
    int given = 0;
    for (int r = 0; r < N - 1; r++) {
        cnt[r] = Tg * (r + 1) / shares;
        given += cnt[r];
    }
    cnt[0] += Tg - given;
    cnt[N - 1] = 0;
}

static void fill_global(moe_dtype dt, const char *name, int n, void *buf, double *dbl)
{
    uint64_t s = moe_rng_stream(g_seed, name);
    for (int i = 0; i < n; i++) {
        moe_store_elem(dt, buf, (size_t)i, moe_rng_normal(s, (uint64_t)i));
        dbl[i] = moe_load_elem(dt, buf, (size_t)i);
    }
}

/* comm: the communicator the EP ctx will use (WORLD, or SELF for virtual ranks). */
static bool setup_make(setup *s, MPI_Comm comm, moe_config cfg, moe_dtype dt, int Tg,
                       split_kind sk, int V)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    memset(s, 0, sizeof s[0]);
    s->cfg = cfg;
    s->dt = dt;
    s->dsz = moe_dtype_size(dt);
    s->Tg = Tg;
    int N = 1, rank = 0;
    MPI_Comm_size(comm, &N);
    MPI_Comm_rank(comm, &rank);
    s->cnt = calloc((size_t)N, sizeof(int));
    s->offs = calloc((size_t)N + 1, sizeof(int));
    split_tokens(Tg, N, sk, s->cnt);
    for (int r = 0; r < N; r++) s->offs[r + 1] = s->offs[r] + s->cnt[r];
    s->T = s->cnt[rank];
    s->off = s->offs[rank];
    size_t n = (size_t)Tg * cfg.hidden;
    s->xg = malloc(n * s->dsz);
    s->doutg = malloc(n * s->dsz);
    s->xd = malloc(n * sizeof(double));
    s->doutd = malloc(n * sizeof(double));
    fill_global(dt, "test.ep.x", (int)n, s->xg, s->xd);
    fill_global(dt, "test.ep.dout", (int)n, s->doutg, s->doutd);
    CHECK_ST(moe_ep_weights_random(comm, &cfg, g_seed, V, dt, &s->wl, &err));
    CHECK_ST(moe_weights_random(&cfg, g_seed, 0, cfg.num_experts, dt, &s->wf, &err));
    return ok;
}

static void setup_free(setup *s)
{
    free(s->cnt);
    free(s->offs);
    free(s->xg);
    free(s->doutg);
    free(s->xd);
    free(s->doutd);
    moe_weights_free(&s->wl);
    moe_weights_free(&s->wf);
}

static void *poisoned(moe_dtype dt, size_t n)
{
    void *p = malloc((n ? n : 1) * moe_dtype_size(dt));
    for (size_t i = 0; i < n; i++) moe_store_elem(dt, p, i, NAN);
    return p;
}

static double *widen(moe_dtype dt, const void *p, size_t n)
{
    double *d = malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) d[i] = moe_load_elem(dt, p, i);
    return d;
}

/* a (dtype dt, rows x cols) vs ref (double). */
static bool close_dt(const char *what, moe_dtype dt, const void *a, const double *ref,
                     size_t rows, size_t cols, double tol)
{
    if (rows * cols == 0) return true;
    double *ad = widen(dt, a, rows * cols);
    char label[96];
    snprintf(label, sizeof label, "r%d %s", g_rank, what);
    bool ok = moe_test_close(label, ad, ref, rows, cols, tol);
    free(ad);
    return ok;
}

/* ------------------------------------------------------------------ counters ---- */

/* Expected token rows per real peer (and per virtual rank) from the global ids [Tg,k]:
 * a token goes once to each (virtual) rank owning at least one of its experts. */
static bool check_counters(const setup *s, const int32_t *ids_g, const moe_ep_stats *st, int N,
                           int rank, int V, bool backward, bool plain)
{
    bool ok = true;
    if (plain) {
        /* One rank, no virtual ranks, the router's routing: the fused path, nothing sent. */
        CHECK(st->tokens_sent[0] == 0 && st->tokens_recv[0] == 0 && st->bytes_sent[0] == 0);
        CHECK(st->tokens_local == (uint64_t)s->T);
        CHECK(st->expert_rows == (uint64_t)s->T * s->cfg.top_k);
        return ok;
    }
    int E = s->cfg.num_experts, k = s->cfg.top_k, G = N * V, epv = E / G;
    uint64_t *sent = calloc((size_t)N, sizeof(uint64_t)), *recv = calloc((size_t)N, sizeof(uint64_t));
    uint64_t *vsent = calloc((size_t)G, sizeof(uint64_t));
    int *src_rank = malloc((size_t)s->Tg * sizeof(int));
    for (int r = 0; r < N; r++)
        for (int t = s->offs[r]; t < s->offs[r + 1]; t++) src_rank[t] = r;
    for (int t = 0; t < s->Tg; t++) {
        for (int d = 0; d < G; d++) {
            bool has = false;
            for (int j = 0; j < k; j++) has |= ids_g[(size_t)t * k + j] / epv == d;
            if (!has) continue;
            if (src_rank[t] == rank) {
                sent[d / V]++;
                vsent[d]++;
            }
            if (d / V == rank) recv[src_rank[t]]++;
        }
    }
    size_t H = (size_t)s->cfg.hidden, dsz = s->dsz;
    size_t out_row = H * dsz + (size_t)k * (4 + dsz), back_row = H * dsz;
    if (backward) {
        out_row += H * dsz;
        back_row += (size_t)k * 4;
    }
    for (int q = 0; q < N; q++) {
        CHECK(st->tokens_sent[q] == sent[q]);
        CHECK(st->tokens_recv[q] == recv[q]);
        CHECK(st->bytes_sent[q] == sent[q] * out_row + recv[q] * back_row);
        CHECK(st->bytes_recv[q] == recv[q] * out_row + sent[q] * back_row);
        if (!ok)
            fprintf(stderr, "rank %d peer %d: sent %llu (expected %llu), received %llu (%llu)\n",
                    rank, q, (unsigned long long)st->tokens_sent[q], (unsigned long long)sent[q],
                    (unsigned long long)st->tokens_recv[q], (unsigned long long)recv[q]);
    }
    for (int d = 0; d < G; d++) CHECK(st->vtokens_sent[d] == vsent[d]);
    CHECK(st->tokens_local == (uint64_t)s->T);
    free(sent);
    free(recv);
    free(vsent);
    free(src_rank);
    return ok;
}

/* ------------------------------------------------------------------ the single-rank answers -- */

typedef struct answer {
    moe_fwd_state st; /* natural routing: the fused path's forward for all Tg tokens */
    bool have_st;
    double *out;      /* [Tg,H] */
    int32_t *ids;     /* [Tg,k] the routing used */
    double *dx;       /* [Tg,H] */
    double *d_router; /* [E,H] */
    double *d_w13;    /* [E,2I,H] */
    double *d_w2;     /* [E,H,I] */
    double *d_sg, *d_su, *d_sd;
} answer;

static void answer_free(answer *a)
{
    if (a->have_st) moe_fwd_state_free(&a->st);
    free(a->out);
    free(a->ids);
    free(a->dx);
    free(a->d_router);
    free(a->d_w13);
    free(a->d_w2);
    free(a->d_sg);
    free(a->d_su);
    free(a->d_sd);
    memset(a, 0, sizeof *a);
}

/* The fused path on one rank, all Tg tokens, all experts. */
static bool answer_fused(const setup *s, bool backward, answer *a)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    memset(a, 0, sizeof *a);
    const moe_config *c = &s->cfg;
    size_t Tg = (size_t)s->Tg, H = (size_t)c->hidden, k = (size_t)c->top_k;
    CHECK_ST(moe_fwd_state_alloc(c, s->dt, s->Tg, true, &a->st, &err));
    if (!ok) return false;
    a->have_st = true;
    CHECK_ST(cpu_block_forward(&s->wf, s->dt, s->Tg, s->xg, &a->st, &err));
    a->out = widen(s->dt, a->st.out, Tg * H);
    a->ids = malloc(Tg * k * sizeof(int32_t));
    memcpy(a->ids, a->st.topk_ids, Tg * k * sizeof(int32_t));
    if (!backward || !ok) return ok;
    moe_weights g;
    void *dx = poisoned(s->dt, Tg * H);
    CHECK_ST(moe_weights_zeros_like(&s->wf, s->dt, &g, &err));
    CHECK_ST(cpu_block_backward(&s->wf, s->dt, s->Tg, s->xg, &a->st, s->doutg, dx, &g, &err));
    a->dx = widen(s->dt, dx, Tg * H);
    a->d_router = widen(s->dt, g.router.data, moe_tensor_numel(&g.router));
    a->d_w13 = widen(s->dt, g.w13.data, moe_tensor_numel(&g.w13));
    a->d_w2 = widen(s->dt, g.w2.data, moe_tensor_numel(&g.w2));
    if (c->arch == MOE_ARCH_LLAMA4 && c->shared_inter > 0) {
        a->d_sg = widen(s->dt, g.shared_gate.data, moe_tensor_numel(&g.shared_gate));
        a->d_su = widen(s->dt, g.shared_up.data, moe_tensor_numel(&g.shared_up));
        a->d_sd = widen(s->dt, g.shared_down.data, moe_tensor_numel(&g.shared_down));
    }
    moe_weights_free(&g);
    free(dx);
    return ok;
}

/* The independent reference (double, rounding like HF) with the experts forced to ids. */
static bool answer_reference(const setup *s, const int32_t *ids, bool backward, answer *a)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    memset(a, 0, sizeof *a);
    const moe_config *c = &s->cfg;
    size_t Tg = (size_t)s->Tg, H = (size_t)c->hidden, k = (size_t)c->top_k,
           E = (size_t)c->num_experts, I = (size_t)c->inter, Is = (size_t)c->shared_inter;
    moe_ref_fwd f;
    memset(&f, 0, sizeof f);
    f.logits = malloc(Tg * E * sizeof(double));
    f.topk_ids = malloc(Tg * k * sizeof(int32_t));
    f.topk_w = malloc(Tg * k * sizeof(double));
    f.out = malloc(Tg * H * sizeof(double));
    f.forced_ids = ids;
    CHECK_ST(ref_forward(&s->wf, s->dt, s->Tg, s->xd, &f, &err));
    a->out = f.out;
    a->ids = f.topk_ids;
    for (size_t i = 0; i < Tg * k; i++) CHECK(f.topk_ids[i] == ids[i]);
    free(f.logits);
    free(f.topk_w);
    if (!backward || !ok) return ok;
    moe_ref_grads g;
    memset(&g, 0, sizeof g);
    a->dx = g.dx = malloc(Tg * H * sizeof(double));
    a->d_router = g.d_router = malloc(E * H * sizeof(double));
    a->d_w13 = malloc(E * 2 * I * H * sizeof(double));
    a->d_w2 = malloc(E * H * I * sizeof(double));
    g.d_w13 = malloc(E * sizeof(double *));
    g.d_w2 = malloc(E * sizeof(double *));
    for (size_t e = 0; e < E; e++) {
        g.d_w13[e] = a->d_w13 + e * 2 * I * H;
        g.d_w2[e] = a->d_w2 + e * H * I;
    }
    if (c->arch == MOE_ARCH_LLAMA4 && Is > 0) {
        a->d_sg = g.d_shared_gate = malloc(Is * H * sizeof(double));
        a->d_su = g.d_shared_up = malloc(Is * H * sizeof(double));
        a->d_sd = g.d_shared_down = malloc(H * Is * sizeof(double));
    }
    g.forced_ids = ids;
    CHECK_ST(ref_backward(&s->wf, s->dt, s->Tg, s->xd, s->doutd, &g, &err));
    free(g.d_w13);
    free(g.d_w2);
    return ok;
}

/* ------------------------------------------------------------------ one EP run ---- */

typedef struct run_opts {
    moe_ep_options ep;
    bool backward;
    bool counters;
    bool forced_reference; /* compare with the double reference (forced routing) */
    double tol_scale;      /* 1 = the dtype's tolerance */
} run_opts;

/* Gather every rank's [T,k] ids into [Tg,k] (ranks' batches in rank order). */
static void gather_ids(MPI_Comm comm, const setup *s, const int32_t *mine, int32_t *all)
{
    int N = 1;
    MPI_Comm_size(comm, &N);
    int k = s->cfg.top_k;
    int *rc = malloc((size_t)N * sizeof(int)), *rd = malloc((size_t)N * sizeof(int));
    for (int r = 0; r < N; r++) {
        rc[r] = s->cnt[r] * k;
        rd[r] = s->offs[r] * k;
    }
    MPI_Allgatherv(mine, s->T * k, MPI_INT32_T, all, rc, rd, MPI_INT32_T, comm);
    free(rc);
    free(rd);
}

/* Run forward (and backward) through EP on comm and compare with the single-rank answer. */
static bool run_ep(MPI_Comm comm, const setup *s, const run_opts *ro, const int32_t *forced_ids)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    int N = 1, rank = 0;
    MPI_Comm_size(comm, &N);
    MPI_Comm_rank(comm, &rank);
    const moe_config *c = &s->cfg;
    moe_dtype dt = s->dt;
    size_t T = (size_t)s->T, H = (size_t)c->hidden, k = (size_t)c->top_k, E = (size_t)c->num_experts;
    size_t El = E / (size_t)N, I = (size_t)c->inter, Is = (size_t)c->shared_inter;
    const char *xs = (const char *)s->xg + (size_t)s->off * H * s->dsz;
    const char *douts = (const char *)s->doutg + (size_t)s->off * H * s->dsz;
    int V = ro->ep.virtual_ranks;
    bool plain = N == 1 && V == 1 && ro->ep.route.mode == MOE_EP_ROUTE_ROUTER;

    moe_ep_ctx *ctx = NULL;
    CHECK_ST(moe_ep_ctx_create(comm, &s->wl, &ro->ep, &ctx, &err));
    if (!ok) return false;
    moe_ep_stats st;
    CHECK_ST(moe_ep_stats_init(&st, N, rank, V, &err));
    void *out = poisoned(dt, T * H);
    int32_t *ids = malloc((T * k + 1) * sizeof(int32_t));
    for (size_t i = 0; i < T * k; i++) ids[i] = -7;
    CHECK_ST(moe_ep_forward(ctx, s->T, xs, out, NULL, ids, &st, &err));

    /* The answer for every token, with the routing this run used. */
    int32_t *ids_g = malloc((size_t)s->Tg * k * sizeof(int32_t) + 4);
    gather_ids(comm, s, ids, ids_g);
    if (forced_ids)
        for (size_t i = 0; i < (size_t)s->Tg * k; i++) CHECK(ids_g[i] == forced_ids[i]);
    answer a;
    bool aok = ro->forced_reference ? answer_reference(s, ids_g, ro->backward, &a)
                                    : answer_fused(s, ro->backward, &a);
    CHECK(aok);
    double tol = moe_test_tol(dt, false) * ro->tol_scale, gtol = moe_test_tol(dt, true) * ro->tol_scale;
    if (aok) {
        if (!ro->forced_reference)
            for (size_t i = 0; i < (size_t)s->Tg * k; i++) CHECK(ids_g[i] == a.ids[i]);
        CHECK(close_dt("forward out", dt, out, a.out + (size_t)s->off * H, T, H, tol));
    }
    if (ro->counters) CHECK(check_counters(s, ids_g, &st, N, rank, V, false, plain));
    if (ro->ep.chunks > 1 && !plain) {
        CHECK(st.nchunks == ro->ep.chunks);
        for (int ci = 0; ci < st.nchunks && st.timeline; ci++) {
            const moe_ep_chunk_times *tc = &st.timeline[ci];
            CHECK(tc->dispatch_post <= tc->dispatch_done);
            CHECK(tc->dispatch_done <= tc->compute_begin);
            CHECK(tc->compute_begin <= tc->compute_end);
            CHECK(tc->combine_post <= tc->combine_done);
        }
    }

    if (ro->backward && aok) {
        moe_weights g;
        void *dx = poisoned(dt, T * H);
        CHECK_ST(moe_weights_zeros_like(&s->wl, dt, &g, &err));
        /* poison the gradients: every element must be written */
        moe_tensor *gt[] = {&g.router, &g.w13, &g.w2, &g.shared_gate, &g.shared_up, &g.shared_down};
        for (size_t i = 0; i < 6; i++)
            if (gt[i]->data) moe_tensor_poison(gt[i]);
        moe_ep_stats_reset(&st);
        CHECK_ST(moe_ep_backward(ctx, s->T, xs, douts, dx, &g, &st, &err));
        if (ok) {
            CHECK(close_dt("backward dx", dt, dx, a.dx + (size_t)s->off * H, T, H, gtol));
            size_t b = (size_t)s->wl.expert_begin;
            CHECK(close_dt("backward d w13", dt, g.w13.data, a.d_w13 + b * 2 * I * H, El,
                           2 * I * H, gtol));
            CHECK(close_dt("backward d w2", dt, g.w2.data, a.d_w2 + b * H * I, El, H * I, gtol));
            CHECK(close_dt("backward d router", dt, g.router.data, a.d_router, E, H, gtol));
            if (a.d_sg) {
                CHECK(close_dt("backward d shared gate", dt, g.shared_gate.data, a.d_sg, Is, H, gtol));
                CHECK(close_dt("backward d shared up", dt, g.shared_up.data, a.d_su, Is, H, gtol));
                CHECK(close_dt("backward d shared down", dt, g.shared_down.data, a.d_sd, H, Is, gtol));
            }
            if (ro->counters) CHECK(check_counters(s, ids_g, &st, N, rank, V, true, plain));
        }
        moe_weights_free(&g);
        free(dx);
    }
    if (aok) answer_free(&a);
    moe_ep_stats_free(&st);
    moe_ep_ctx_destroy(ctx);
    free(out);
    free(ids);
    free(ids_g);
    return ok;
}

static run_opts ro_default(void)
{
    run_opts r;
    memset(&r, 0, sizeof r);
    moe_ep_options d = MOE_EP_OPTIONS_INIT;
    r.ep = d;
    r.ep.transport = MOE_EP_TRANSPORT_MPI;
    r.backward = true;
    r.counters = true;
    r.tol_scale = 1.0;
    return r;
}

/* ------------------------------------------------------------------ tests ---- */

/* Natural routing, forward and backward, chunks 1 and 3, both token layouts. */
static void natural(moe_arch arch, int E, int k, moe_dtype dt)
{
    bool ok = true;
    moe_config cfg = make_cfg(arch, E, k);
    for (int sk = 0; sk < 2; sk++)
        for (int chunks = 1; chunks <= 3; chunks += 2) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_WORLD, cfg, dt, 29, (split_kind)sk, 1);
            run_opts ro = ro_default();
            ro.ep.chunks = chunks;
            if (g_rank == 0)
                fprintf(stderr, "-- %s E=%d k=%d %s split=%d chunks=%d on %d ranks\n", cfg.name, E,
                        k, moe_dtype_name(dt), sk, chunks, g_size);
            ok &= run_ep(MPI_COMM_WORLD, &s, &ro, NULL);
            setup_free(&s);
        }
    assert_true(all_true(ok));
}

static void test_qwen3_natural_fp32(void **state)
{
    (void)state;
    natural(MOE_ARCH_QWEN3, 12, 3, MOE_DTYPE_F32);
}
static void test_qwen3_natural_bf16(void **state)
{
    (void)state;
    natural(MOE_ARCH_QWEN3, 8, 3, MOE_DTYPE_BF16);
}
static void test_llama4_natural_fp32(void **state)
{
    (void)state;
    natural(MOE_ARCH_LLAMA4, 8, 2, MOE_DTYPE_F32);
    natural(MOE_ARCH_LLAMA4, 8, 1, MOE_DTYPE_F32);
}
static void test_llama4_natural_bf16(void **state)
{
    (void)state;
    natural(MOE_ARCH_LLAMA4, 12, 1, MOE_DTYPE_BF16);
}

/* The forced ids of global tokens, computed here from ep.h's definitions. */
static void expected_forced(const moe_ep_route *r, int E, int k, int G, int Tg, int32_t *ids)
{
    for (int g = 0; g < Tg; g++)
        for (int j = 0; j < k; j++) {
            int32_t e = -1;
            if (r->mode == MOE_EP_ROUTE_UNIFORM) e = (int32_t)(((int64_t)g * k + j) % E);
            else if (r->mode == MOE_EP_ROUTE_ALL_TO_ONE) e = (int32_t)((r->target * (E / G) + j) % E);
            else if (r->mode == MOE_EP_ROUTE_FILE) e = r->ids[(size_t)(g % r->rows) * k + j];
            ids[(size_t)g * k + j] = e;
        }
}

static void forced(moe_arch arch, int E, int k, moe_ep_route_mode mode, int chunks)
{
    bool ok = true;
    moe_config cfg = make_cfg(arch, E, k);
    moe_dtype dt = MOE_DTYPE_F32;
    setup s;
    ok &= setup_make(&s, MPI_COMM_WORLD, cfg, dt, 29,
                     mode == MOE_EP_ROUTE_ALL_TO_ONE ? SPLIT_SKEW : SPLIT_EVEN, 1);
    run_opts ro = ro_default();
    ro.ep.chunks = chunks;
    ro.ep.route.mode = mode;
    ro.forced_reference = true;
    int32_t table[5 * 4];
    if (mode == MOE_EP_ROUTE_ALL_TO_ONE) ro.ep.route.target = g_size - 1;
    if (mode == MOE_EP_ROUTE_FILE) {
        /* 5 rows (29 tokens wrap around it), k distinct ids per row, from the seed. */
        uint64_t st = moe_rng_stream(g_seed, "test.ep.table");
        for (int r = 0; r < 5; r++)
            for (int j = 0; j < k; j++) {
                int32_t e;
                bool dup;
                int tries = 0;
                do {
                    e = (int32_t)(moe_rng_u64(st, (uint64_t)(r * 64 + j * 8 + tries++)) % (uint64_t)E);
                    dup = false;
                    for (int a = 0; a < j; a++) dup |= table[r * k + a] == e;
                } while (dup);
                table[r * k + j] = e;
            }
        ro.ep.route.ids = table;
        ro.ep.route.rows = 5;
    }
    int32_t *want = NULL;
    if (mode != MOE_EP_ROUTE_SKEWED) {
        want = malloc((size_t)s.Tg * k * sizeof(int32_t));
        expected_forced(&ro.ep.route, E, k, g_size, s.Tg, want);
    }
    if (g_rank == 0)
        fprintf(stderr, "-- forced mode %d %s E=%d k=%d chunks=%d on %d ranks\n", (int)mode,
                cfg.name, E, k, chunks, g_size);
    ok &= run_ep(MPI_COMM_WORLD, &s, &ro, want);
    free(want);
    setup_free(&s);
    assert_true(all_true(ok));
}

static void test_forced_uniform(void **state)
{
    (void)state;
    forced(MOE_ARCH_QWEN3, 12, 3, MOE_EP_ROUTE_UNIFORM, 1);
    forced(MOE_ARCH_LLAMA4, 8, 2, MOE_EP_ROUTE_UNIFORM, 3);
}
static void test_forced_skewed(void **state)
{
    (void)state;
    forced(MOE_ARCH_QWEN3, 12, 3, MOE_EP_ROUTE_SKEWED, 3);
    forced(MOE_ARCH_LLAMA4, 8, 2, MOE_EP_ROUTE_SKEWED, 1);
}
static void test_forced_all_to_one(void **state)
{
    (void)state;
    /* E=12, k=3 at 4 ranks: every expert of every token on the last rank; the others receive
     * nothing. E=8, k=3 at 4 ranks spills into the next rank (2 experts per rank). */
    forced(MOE_ARCH_QWEN3, 12, 3, MOE_EP_ROUTE_ALL_TO_ONE, 3);
    forced(MOE_ARCH_QWEN3, 8, 3, MOE_EP_ROUTE_ALL_TO_ONE, 1);
    forced(MOE_ARCH_LLAMA4, 8, 1, MOE_EP_ROUTE_ALL_TO_ONE, 1);
}
static void test_forced_file(void **state)
{
    (void)state;
    forced(MOE_ARCH_QWEN3, 12, 3, MOE_EP_ROUTE_FILE, 1);
    forced(MOE_ARCH_LLAMA4, 12, 2, MOE_EP_ROUTE_FILE, 3);
}

/* Skewed routing is skewed: the generator's ids (from the forward's topk_ids output) are in
 * range, distinct per token, and expert 0 is the most used. */
static void test_skew_shape(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    int E = 12, k = 3, T = 400;
    moe_ep_route r = {MOE_EP_ROUTE_SKEWED, MOE_EP_ROUTE_W_ROUTER, 0, NULL, 0};
    int32_t *ids = malloc((size_t)T * k * sizeof(int32_t));
    CHECK_ST(moe_ep_route_ids(&r, E, k, 4, 0, T, ids, &err));
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
    /* Same tokens, same ids, whatever the offset split. */
    int32_t *again = malloc((size_t)100 * k * sizeof(int32_t));
    CHECK_ST(moe_ep_route_ids(&r, E, k, 4, 150, 100, again, &err));
    CHECK(memcmp(again, ids + 150 * k, (size_t)100 * k * sizeof(int32_t)) == 0);
    free(again);
    free(ids);
    assert_true(all_true(ok));
}

/* Virtual ranks: each process alone (MPI_COMM_SELF) plays V=4 ranks, sends everything to
 * itself through MPI, and must match the plain fused path; counters per virtual rank. */
static void test_virtual_ranks(void **state)
{
    (void)state;
    bool ok = true;
    struct {
        moe_arch arch;
        int E, k, chunks;
        moe_dtype dt;
    } cases[] = {
        {MOE_ARCH_QWEN3, 12, 3, 1, MOE_DTYPE_F32},
        {MOE_ARCH_QWEN3, 8, 3, 3, MOE_DTYPE_BF16},
        {MOE_ARCH_LLAMA4, 8, 2, 3, MOE_DTYPE_F32},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_config cfg = make_cfg(cases[i].arch, cases[i].E, cases[i].k);
        setup s;
        /* a different token count per process, so the ranks do not all run the same case */
        ok &= setup_make(&s, MPI_COMM_SELF, cfg, cases[i].dt, 17 + 5 * g_rank, SPLIT_EVEN, 4);
        run_opts ro = ro_default();
        ro.ep.virtual_ranks = 4;
        ro.ep.chunks = cases[i].chunks;
        ok &= run_ep(MPI_COMM_SELF, &s, &ro, NULL);
        setup_free(&s);
    }
    assert_true(all_true(ok));
}

/* Virtual ranks on top of real ones: every process plays 2 ranks (E=8 splits over 2, 4, 8). */
static void test_virtual_over_world(void **state)
{
    (void)state;
    bool ok = true;
    moe_config q = make_cfg(MOE_ARCH_QWEN3, 8, 3), l = make_cfg(MOE_ARCH_LLAMA4, 8, 2);
    moe_config *cfgs[2] = {&q, &l};
    for (int i = 0; i < 2; i++) {
        setup s;
        ok &= setup_make(&s, MPI_COMM_WORLD, *cfgs[i], MOE_DTYPE_F32, 29, SPLIT_SKEW, 2);
        run_opts ro = ro_default();
        ro.ep.virtual_ranks = 2;
        ro.ep.chunks = 3;
        ok &= run_ep(MPI_COMM_WORLD, &s, &ro, NULL);
        setup_free(&s);
    }
    assert_true(all_true(ok));
}

/* Sync-free sizing that is large enough changes nothing. */
static void test_sized_in_advance(void **state)
{
    (void)state;
    bool ok = true;
    moe_config cfg = make_cfg(MOE_ARCH_QWEN3, 12, 3);
    setup s;
    ok &= setup_make(&s, MPI_COMM_WORLD, cfg, MOE_DTYPE_F32, 29, SPLIT_SKEW, 1);
    run_opts ro = ro_default();
    ro.ep.max_tokens_per_rank = 29;
    ro.ep.chunks = 3;
    ok &= run_ep(MPI_COMM_WORLD, &s, &ro, NULL);
    setup_free(&s);
    assert_true(all_true(ok));
}

/* A token with all k experts on one rank is dispatched to it once. */
static void test_once_per_rank(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    /* E = 4*N experts; token ids {0,1,2} all on rank 0 (4 experts per rank). */
    int N = g_size, E = 4 * N, k = 3;
    moe_config cfg = make_cfg(MOE_ARCH_QWEN3, E, k);
    setup s;
    ok &= setup_make(&s, MPI_COMM_WORLD, cfg, MOE_DTYPE_F32, 6 * N, SPLIT_EVEN, 1);
    int32_t table[3] = {0, 1, 2};
    run_opts ro = ro_default();
    ro.ep.route.mode = MOE_EP_ROUTE_FILE;
    ro.ep.route.ids = table;
    ro.ep.route.rows = 1;
    moe_ep_ctx *ctx = NULL;
    CHECK_ST(moe_ep_ctx_create(MPI_COMM_WORLD, &s.wl, &ro.ep, &ctx, &err));
    if (ok) {
        size_t H = (size_t)cfg.hidden;
        void *out = poisoned(MOE_DTYPE_F32, (size_t)s.T * H);
        CHECK_ST(moe_ep_forward(ctx, s.T, (char *)s.xg + (size_t)s.off * H * 4, out, NULL, NULL,
                                NULL, &err));
        const moe_ep_stats *st = moe_ep_ctx_stats(ctx);
        CHECK(st->tokens_sent[0] == (uint64_t)s.T);
        CHECK(st->expert_rows == (g_rank == 0 ? (uint64_t)s.Tg * 3 : 0));
        CHECK(st->tokens_computed == (g_rank == 0 ? (uint64_t)s.Tg : 0));
        for (int q = 1; q < N; q++) CHECK(st->tokens_sent[q] == 0);
        if (g_rank == 0) {
            moe_ep_stats_print(stderr, st);
            for (int q = 0; q < N; q++) CHECK(st->tokens_recv[q] == (uint64_t)s.cnt[q]);
        }
        free(out);
    }
    moe_ep_ctx_destroy(ctx);
    setup_free(&s);
    assert_true(all_true(ok));
}

int main(int argc, char **argv)
{
    mpi_test_init(&argc, &argv);
    mpi_test_share_cores_and_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qwen3_natural_fp32),  cmocka_unit_test(test_qwen3_natural_bf16),
        cmocka_unit_test(test_llama4_natural_fp32), cmocka_unit_test(test_llama4_natural_bf16),
        cmocka_unit_test(test_forced_uniform),      cmocka_unit_test(test_forced_skewed),
        cmocka_unit_test(test_forced_all_to_one),   cmocka_unit_test(test_forced_file),
        cmocka_unit_test(test_skew_shape),          cmocka_unit_test(test_virtual_ranks),
        cmocka_unit_test(test_virtual_over_world),  cmocka_unit_test(test_sized_in_advance),
        cmocka_unit_test(test_once_per_rank),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
