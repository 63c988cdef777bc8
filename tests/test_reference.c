/* test_reference.c — the HF-order reference (src/cpu/reference.c) against independent checks:
 *  - central finite differences (rd = fp64) of every gradient, Qwen3 with and without
 *    norm_topk_prob, Llama-4 with k = 1 and k = 2 (with a shared expert), routing asserted
 *    unchanged by every perturbation;
 *  - hand-checkable routing (ties -> lower id, k = E, renormalisation), an expert with no
 *    tokens (exactly zero dW), Llama-4's score applied to the expert INPUT;
 *  - a naive per-token re-implementation written here (bf16 rounding points and the ascending
 *    expert order of the sum), bf16 representability, expert/route stage functions against the
 *    block, expert-parallel slices summing to the whole, thread-count independence (bitwise),
 *    per-token batch independence (bitwise), NULL gradient entries, argument errors;
 *  - one full-size Qwen3-30B-A3B forward + backward at T = 64, timed (about 1.5 s on 2 cores;
 *    MOE_TEST_SKIP_FULL=1 skips it).
 * Weights are built here (moe_tensor_alloc + moe_rng), not through weights.c. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "cpu/reference.h"
#include "dtype.h"
#include "rng.h"

/* ---------------------------------------------------------------------------------------- */
/* Building configs, weights and inputs                                                     */

static moe_config mk_cfg(moe_arch arch, int H, int I, int E, int k, bool norm, int Is)
{
    moe_config c;
    memset(&c, 0, sizeof c);
    c.arch = arch;
    snprintf(c.name, sizeof c.name, "%s", arch == MOE_ARCH_QWEN3 ? "test-qwen3" : "test-llama4");
    c.hidden = H;
    c.inter = I;
    c.num_experts = E;
    c.top_k = k;
    c.norm_topk_prob = norm;
    c.shared_inter = Is;
    c.dtype = MOE_DTYPE_F64;
    return c;
}

/* Fill n elements of t (element i of the GLOBAL tensor is gidx0 + i) from stream `name`. */
static void fill(moe_tensor *t, uint64_t seed, const char *name, size_t gidx0, double scale)
{
    uint64_t st = moe_rng_stream(seed, name);
    size_t n = moe_tensor_numel(t);
    for (size_t i = 0; i < n; i++)
        moe_store_elem(t->dtype, t->data, i, scale * moe_rng_normal(st, gidx0 + i));
}

/* Weights of experts [begin, begin+count) of the global random block; scales chosen so logits
 * spread (router x3) and activations stay O(1). */
static void mk_weights(const moe_config *c, int begin, int count, moe_dtype dt, uint64_t seed,
                       moe_weights *w)
{
    memset(w, 0, sizeof *w);
    w->cfg = *c;
    w->dtype = dt;
    w->expert_begin = begin;
    w->expert_count = count;
    int H = c->hidden, I = c->inter, E = c->num_experts, Is = c->shared_inter;
    assert_int_equal(MOE_OK, moe_tensor_alloc2(&w->router, dt, E, H, NULL));
    fill(&w->router, seed, "router", 0, 3.0 / sqrt(H));
    assert_int_equal(MOE_OK, moe_tensor_alloc3(&w->w13, dt, count, 2 * I, H, NULL));
    fill(&w->w13, seed, "w13", (size_t)begin * 2 * I * H, 1.0 / sqrt(H));
    assert_int_equal(MOE_OK, moe_tensor_alloc3(&w->w2, dt, count, H, I, NULL));
    fill(&w->w2, seed, "w2", (size_t)begin * H * I, 1.0 / sqrt(I));
    if (c->arch == MOE_ARCH_LLAMA4 && Is > 0) {
        assert_int_equal(MOE_OK, moe_tensor_alloc2(&w->shared_gate, dt, Is, H, NULL));
        assert_int_equal(MOE_OK, moe_tensor_alloc2(&w->shared_up, dt, Is, H, NULL));
        assert_int_equal(MOE_OK, moe_tensor_alloc2(&w->shared_down, dt, H, Is, NULL));
        fill(&w->shared_gate, seed, "shared_gate", 0, 1.0 / sqrt(H));
        fill(&w->shared_up, seed, "shared_up", 0, 1.0 / sqrt(H));
        fill(&w->shared_down, seed, "shared_down", 0, 1.0 / sqrt(Is));
    }
}

static void free_weights(moe_weights *w)
{
    moe_tensor_free(&w->router);
    moe_tensor_free(&w->w13);
    moe_tensor_free(&w->w2);
    moe_tensor_free(&w->shared_gate);
    moe_tensor_free(&w->shared_up);
    moe_tensor_free(&w->shared_down);
}

static double *dalloc(size_t n)
{
    double *p = malloc((n ? n : 1) * sizeof(double));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = NAN; /* poison */
    return p;
}

static double *normals(uint64_t seed, const char *name, size_t n, double scale)
{
    double *p = dalloc(n);
    uint64_t st = moe_rng_stream(seed, name);
    for (size_t i = 0; i < n; i++) p[i] = scale * moe_rng_normal(st, i);
    return p;
}

/* Values rounded to dt (for inputs of a rounded run). */
static void round_all(moe_dtype dt, double *p, size_t n)
{
    for (size_t i = 0; i < n; i++) p[i] = moe_round_to(dt, p[i]);
}

static double sigm(double v) { return 1.0 / (1.0 + exp(-v)); }
static double silu_t(double g) { return g * sigm(g); }

/* Forward outputs, allocated and poisoned. */
typedef struct fwd_bufs {
    double *logits, *topk_w, *out;
    int32_t *ids;
    moe_ref_fwd f;
} fwd_bufs;

static void fwd_alloc(fwd_bufs *b, const moe_config *c, int T)
{
    b->logits = dalloc((size_t)T * c->num_experts);
    b->topk_w = dalloc((size_t)T * c->top_k);
    b->out = dalloc((size_t)T * c->hidden);
    b->ids = malloc(((size_t)T * c->top_k + 1) * sizeof(int32_t));
    assert_non_null(b->ids);
    for (int i = 0; i < T * c->top_k; i++) b->ids[i] = -7;
    b->f = (moe_ref_fwd){b->logits, b->ids, b->topk_w, b->out, NULL};
}

static void fwd_free(fwd_bufs *b)
{
    free(b->logits); free(b->topk_w); free(b->out); free(b->ids);
}

static void run_fwd(const moe_weights *w, moe_dtype rd, int T, const double *x, fwd_bufs *b)
{
    moe_error err = {0};
    moe_status st = ref_forward(w, rd, T, x, &b->f, &err);
    if (st != MOE_OK) fprintf(stderr, "ref_forward: %s\n", err.msg);
    assert_int_equal(MOE_OK, st);
}

/* Gradients of every tensor, allocated and poisoned. */
typedef struct grad_bufs {
    int El;
    moe_ref_grads g;
    double **w13, **w2;
} grad_bufs;

static void grads_alloc(grad_bufs *b, const moe_weights *w, int T)
{
    const moe_config *c = &w->cfg;
    int H = c->hidden, I = c->inter, Is = c->shared_inter;
    b->El = w->expert_count;
    b->w13 = calloc((size_t)b->El + 1, sizeof(double *));
    b->w2 = calloc((size_t)b->El + 1, sizeof(double *));
    assert_non_null(b->w13);
    assert_non_null(b->w2);
    for (int e = 0; e < b->El; e++) {
        b->w13[e] = dalloc((size_t)2 * I * H);
        b->w2[e] = dalloc((size_t)H * I);
    }
    memset(&b->g, 0, sizeof b->g);
    b->g.dx = dalloc((size_t)T * H);
    b->g.d_router = dalloc((size_t)c->num_experts * H);
    b->g.d_w13 = b->w13;
    b->g.d_w2 = b->w2;
    if (c->arch == MOE_ARCH_LLAMA4 && Is > 0) {
        b->g.d_shared_gate = dalloc((size_t)Is * H);
        b->g.d_shared_up = dalloc((size_t)Is * H);
        b->g.d_shared_down = dalloc((size_t)H * Is);
    }
}

static void grads_free(grad_bufs *b)
{
    for (int e = 0; e < b->El; e++) { free(b->w13[e]); free(b->w2[e]); }
    free(b->w13); free(b->w2);
    free(b->g.dx); free(b->g.d_router);
    free(b->g.d_shared_gate); free(b->g.d_shared_up); free(b->g.d_shared_down);
}

static void run_bwd(const moe_weights *w, moe_dtype rd, int T, const double *x,
                    const double *dout, moe_ref_grads *g)
{
    moe_error err = {0};
    moe_status st = ref_backward(w, rd, T, x, dout, g, &err);
    if (st != MOE_OK) fprintf(stderr, "ref_backward: %s\n", err.msg);
    assert_int_equal(MOE_OK, st);
}

/* ---------------------------------------------------------------------------------------- */
/* Finite differences                                                                       */

typedef struct fd_ctx {
    const moe_weights *w;
    int T;
    const double *x, *dout;
    const int32_t *ids0; /* baseline routing: every perturbed run must select the same */
    fwd_bufs fb;
    double h;
} fd_ctx;

static double fd_loss(fd_ctx *c)
{
    run_fwd(c->w, MOE_DTYPE_F64, c->T, c->x, &c->fb);
    int Tk = c->T * c->w->cfg.top_k;
    for (int i = 0; i < Tk; i++)
        if (c->fb.ids[i] != c->ids0[i]) fail_msg("a perturbation changed the routing at slot %d", i);
    double L = 0;
    size_t n = (size_t)c->T * c->w->cfg.hidden;
    for (size_t i = 0; i < n; i++) L += c->fb.out[i] * c->dout[i];
    return L;
}

/* Central differences of the loss over the n doubles at p, compared with `analytic`:
 * ||analytic - fd|| <= tol ||fd|| + 1e-10 sqrt(n) (an all-zero fd must meet an analytic within
 * 1e-10). The second term is the differences' own rounding, about 1e-10 per element at h = 1e-5
 * (the loss carries ~1e-15 of rounding): without it an expert that a seed routes almost nothing
 * to, |fd| ~ 1e-5, failed on that noise alone (worst element 4e-11; 2 seeds in 30). */
static void fd_compare(fd_ctx *c, const char *what, double *p, size_t n, const double *analytic,
                       double tol)
{
    double num = 0, den = 0, worst = 0;
    size_t worst_i = 0;
    for (size_t i = 0; i < n; i++) {
        double orig = p[i];
        p[i] = orig + c->h;
        double lp = fd_loss(c);
        p[i] = orig - c->h;
        double lm = fd_loss(c);
        p[i] = orig;
        double fd = (lp - lm) / (2 * c->h);
        assert_false(isnan(analytic[i]));
        double d = analytic[i] - fd;
        num += d * d;
        den += fd * fd;
        if (fabs(d) > worst) { worst = fabs(d); worst_i = i; }
    }
    num = sqrt(num);
    den = sqrt(den);
    bool ok = den > 0 ? num <= tol * den + 1e-10 * sqrt((double)n) : num <= 1e-10;
    fprintf(stderr, "  fd %-14s n=%-5zu |fd|=%.3e rel err %.3e (worst abs %.2e at %zu) %s\n", what,
            n, den, den > 0 ? num / den : num, worst, worst_i, ok ? "ok" : "FAIL");
    assert_true(ok);
}

/* Smallest gap between consecutive values among the top k+1 of every token's logits (the
 * routing is monotone in the logits for both archs). */
static double routing_margin(const double *logits, int T, int E, int k)
{
    double margin = INFINITY;
    double *row = malloc((size_t)E * sizeof(double));
    assert_non_null(row);
    for (int t = 0; t < T; t++) {
        memcpy(row, logits + (size_t)t * E, (size_t)E * sizeof(double));
        /* partial selection sort, descending */
        int lim = MOE_MIN(k + 1, E);
        for (int i = 0; i < lim; i++) {
            int b = i;
            for (int j = i + 1; j < E; j++)
                if (row[j] > row[b]) b = j;
            double tmp = row[i]; row[i] = row[b]; row[b] = tmp;
            if (i > 0) margin = fmin(margin, row[i - 1] - row[i]);
        }
    }
    free(row);
    return margin;
}

/* Draw x until no token has a near tie in its routing (so FD steps cannot flip it). */
static double *draw_x_no_ties(const moe_weights *w, uint64_t seed, int T)
{
    const moe_config *c = &w->cfg;
    for (int attempt = 0; attempt < 1000; attempt++) {
        char name[32];
        snprintf(name, sizeof name, "x#%d", attempt);
        double *x = normals(seed, name, (size_t)T * c->hidden, 1.0);
        fwd_bufs fb;
        fwd_alloc(&fb, c, T);
        run_fwd(w, MOE_DTYPE_F64, T, x, &fb);
        double m = routing_margin(fb.logits, T, c->num_experts, c->top_k);
        fwd_free(&fb);
        if (m > 0.02) return x;
        free(x);
    }
    fail_msg("could not draw inputs without routing near-ties");
    return NULL;
}

static void fd_gradcheck(const moe_config *c, int T)
{
    uint64_t seed = moe_test_seed();
    moe_weights w;
    mk_weights(c, 0, c->num_experts, MOE_DTYPE_F64, seed, &w);
    double *x = draw_x_no_ties(&w, seed, T);
    double *dout = normals(seed, "dout", (size_t)T * c->hidden, 1.0);

    grad_bufs gb;
    grads_alloc(&gb, &w, T);
    run_bwd(&w, MOE_DTYPE_F64, T, x, dout, &gb.g);

    fd_ctx fc = {.w = &w, .T = T, .x = x, .dout = dout, .h = 1e-5};
    fwd_alloc(&fc.fb, c, T);
    run_fwd(&w, MOE_DTYPE_F64, T, x, &fc.fb);
    int32_t *ids0 = malloc((size_t)T * c->top_k * sizeof(int32_t));
    assert_non_null(ids0);
    memcpy(ids0, fc.fb.ids, (size_t)T * c->top_k * sizeof(int32_t));
    fc.ids0 = ids0;

    int H = c->hidden, I = c->inter, E = c->num_experts, Is = c->shared_inter;
    const double tol = 1e-6;
    fd_compare(&fc, "dx", x, (size_t)T * H, gb.g.dx, tol);
    fd_compare(&fc, "d_router", w.router.data, (size_t)E * H, gb.g.d_router, tol);
    for (int e = 0; e < E; e++) {
        char n13[32], n2[32];
        snprintf(n13, sizeof n13, "d_w13[%d]", e);
        snprintf(n2, sizeof n2, "d_w2[%d]", e);
        fd_compare(&fc, n13, (double *)w.w13.data + (size_t)e * 2 * I * H, (size_t)2 * I * H,
                   gb.w13[e], tol);
        fd_compare(&fc, n2, (double *)w.w2.data + (size_t)e * H * I, (size_t)H * I, gb.w2[e],
                   tol);
    }
    if (c->arch == MOE_ARCH_LLAMA4 && Is > 0) {
        fd_compare(&fc, "d_shared_gate", w.shared_gate.data, (size_t)Is * H, gb.g.d_shared_gate, tol);
        fd_compare(&fc, "d_shared_up", w.shared_up.data, (size_t)Is * H, gb.g.d_shared_up, tol);
        fd_compare(&fc, "d_shared_down", w.shared_down.data, (size_t)H * Is, gb.g.d_shared_down, tol);
    }
    free(ids0);
    fwd_free(&fc.fb);
    grads_free(&gb);
    free(x);
    free(dout);
    free_weights(&w);
}

static void test_fd_qwen3_norm(void **state)
{
    (void)state;
    moe_config c = mk_cfg(MOE_ARCH_QWEN3, 7, 5, 6, 3, true, 0);
    fd_gradcheck(&c, 5);
}

static void test_fd_qwen3_no_norm(void **state)
{
    (void)state;
    moe_config c = mk_cfg(MOE_ARCH_QWEN3, 7, 5, 6, 3, false, 0);
    fd_gradcheck(&c, 5);
}

static void test_fd_llama4_k1(void **state)
{
    (void)state;
    moe_config c = mk_cfg(MOE_ARCH_LLAMA4, 7, 5, 4, 1, false, 6);
    fd_gradcheck(&c, 5);
}

static void test_fd_llama4_k2(void **state)
{
    (void)state;
    moe_config c = mk_cfg(MOE_ARCH_LLAMA4, 7, 5, 5, 2, false, 4);
    fd_gradcheck(&c, 5);
}

/* ---------------------------------------------------------------------------------------- */
/* Routing by hand                                                                          */

static void test_route_ties_lower_id(void **state)
{
    (void)state;
    moe_config q = mk_cfg(MOE_ARCH_QWEN3, 4, 4, 4, 2, true, 0);
    moe_config l = mk_cfg(MOE_ARCH_LLAMA4, 4, 4, 4, 2, false, 0);
    int32_t ids[4];
    double wts[4];
    const double eq[4] = {1, 3, 3, 3};
    const double all[4] = {0.5, 0.5, 0.5, 0.5};
    const double late[4] = {2, 2, 5, 2};

    ref_route_row(&q, MOE_DTYPE_BF16, eq, ids, wts);
    assert_int_equal(1, ids[0]);
    assert_int_equal(2, ids[1]);
    assert_true(wts[0] == 0.5 && wts[1] == 0.5); /* renormalised equal halves, exact in bf16 */
    ref_route_row(&q, MOE_DTYPE_F64, all, ids, wts);
    assert_int_equal(0, ids[0]);
    assert_int_equal(1, ids[1]);
    ref_route_row(&q, MOE_DTYPE_F64, late, ids, wts);
    assert_int_equal(2, ids[0]);
    assert_int_equal(0, ids[1]);

    ref_route_row(&l, MOE_DTYPE_F64, eq, ids, wts);
    assert_int_equal(1, ids[0]);
    assert_int_equal(2, ids[1]);
    assert_true(fabs(wts[0] - sigm(3.0)) < 1e-15);
    ref_route_row(&l, MOE_DTYPE_F32, all, ids, wts);
    assert_int_equal(0, ids[0]);
    assert_int_equal(1, ids[1]);
    assert_true(wts[0] == (double)(float)sigm(0.5));
    ref_route_row(&l, MOE_DTYPE_F64, late, ids, wts);
    assert_int_equal(2, ids[0]);
    assert_int_equal(0, ids[1]);

    /* Qwen3 ties on the fp32-rounded probabilities: logits closer than fp32 can tell apart
     * after the softmax tie in p, and the lower id wins even if its logit is smaller. */
    const double near[4] = {0.0, 1e-12, -5, -5};
    ref_route_row(&q, MOE_DTYPE_BF16, near, ids, wts);
    assert_int_equal(0, ids[0]);
    assert_int_equal(1, ids[1]);
    ref_route_row(&q, MOE_DTYPE_F64, near, ids, wts); /* unrounded: the larger logit wins */
    assert_int_equal(1, ids[0]);
    assert_int_equal(0, ids[1]);
}

/* p = softmax(l) computed here independently. */
static void softmax_ref(const double *l, int E, double *p)
{
    double m = -INFINITY, Z = 0;
    for (int e = 0; e < E; e++) m = fmax(m, l[e]);
    for (int e = 0; e < E; e++) Z += exp(l[e] - m);
    for (int e = 0; e < E; e++) p[e] = exp(l[e] - m) / Z;
}

static void test_route_k_equals_E_and_renorm(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    enum { E = 16 };
    double l[E], p[E];
    uint64_t st = moe_rng_stream(seed, "route-logits");
    for (int round = 0; round < 20; round++) {
        for (int e = 0; e < E; e++) l[e] = 2.0 * moe_rng_normal(st, (uint64_t)round * E + e);
        softmax_ref(l, E, p);
        for (int k = 1; k <= E; k++) {
            for (int norm = 0; norm < 2; norm++) {
                moe_config q = mk_cfg(MOE_ARCH_QWEN3, 4, 4, E, k, norm, 0);
                int32_t ids[E];
                double w[E], w32[E];
                int32_t ids32[E];
                ref_route_row(&q, MOE_DTYPE_F64, l, ids, w);
                ref_route_row(&q, MOE_DTYPE_F32, l, ids32, w32);
                double sum = 0, psel = 0, sum32 = 0;
                bool seen[E] = {false};
                for (int j = 0; j < k; j++) {
                    assert_true(ids[j] >= 0 && ids[j] < E);
                    assert_false(seen[ids[j]]);
                    seen[ids[j]] = true;
                    assert_int_equal(ids[j], ids32[j]); /* no near ties in random draws */
                    if (j > 0) assert_true(l[ids[j - 1]] > l[ids[j]]); /* descending */
                    psel += p[ids[j]];
                    sum += w[j];
                    sum32 += w32[j];
                }
                /* every non-selected logit is below every selected one */
                for (int e = 0; e < E; e++)
                    if (!seen[e]) assert_true(l[e] < l[ids[k - 1]]);
                for (int j = 0; j < k; j++) {
                    double want = norm ? p[ids[j]] / psel : p[ids[j]];
                    assert_true(fabs(w[j] - want) <= 1e-14 * want);
                    assert_true(w32[j] == (double)(float)w32[j]);
                    assert_true(fabs(w32[j] - want) <= 2e-7 * want);
                }
                if (norm) {
                    assert_true(fabs(sum - 1.0) < 1e-14);
                    assert_true(fabs(sum32 - 1.0) < 1e-6);
                }
                if (k == E) assert_true(fabs(sum - 1.0) < 1e-14); /* all of the softmax */
            }
        }
        /* Llama-4 with k = E: every expert, descending logits, sigmoid scores */
        moe_config lc = mk_cfg(MOE_ARCH_LLAMA4, 4, 4, E, E, false, 0);
        int32_t ids[E];
        double s[E];
        ref_route_row(&lc, MOE_DTYPE_F64, l, ids, s);
        for (int j = 0; j < E; j++) {
            if (j > 0) assert_true(l[ids[j - 1]] > l[ids[j]]);
            assert_true(fabs(s[j] - sigm(l[ids[j]])) < 1e-15);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* An expert no token selects: exactly zero dW; with renormalisation its router row gets no  */
/* gradient either, without it the softmax gives every logit gradient.                       */

static void test_unrouted_expert_zero_grads(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const int T = 6, H = 8, I = 5, E = 6;
    for (int arch = 0; arch < 2; arch++) {
        for (int norm = 0; norm < 2; norm++) {
            if (arch == MOE_ARCH_LLAMA4 && norm) continue;
            moe_config c = mk_cfg(arch, H, I, E, 2, norm, arch == MOE_ARCH_LLAMA4 ? 3 : 0);
            moe_weights w;
            mk_weights(&c, 0, E, MOE_DTYPE_F64, seed, &w);
            /* x > 0 everywhere and router rows 4, 5 very negative: logits ~ -40, never top-2 */
            double *x = dalloc((size_t)T * H);
            uint64_t st = moe_rng_stream(seed, "xpos");
            for (int i = 0; i < T * H; i++) x[i] = 0.5 + moe_rng_uniform(st, i);
            double *r = w.router.data;
            for (int e = 4; e < 6; e++)
                for (int h = 0; h < H; h++) r[e * H + h] = -5.0;
            double *dout = normals(seed, "dout", (size_t)T * H, 1.0);
            fwd_bufs fb;
            fwd_alloc(&fb, &c, T);
            run_fwd(&w, MOE_DTYPE_F64, T, x, &fb);
            for (int i = 0; i < T * 2; i++) assert_true(fb.ids[i] < 4);
            grad_bufs gb;
            grads_alloc(&gb, &w, T);
            run_bwd(&w, MOE_DTYPE_F64, T, x, dout, &gb.g);
            for (int e = 0; e < E; e++) {
                bool used = false;
                for (int i = 0; i < T * 2; i++) used |= fb.ids[i] == e;
                double n13 = 0, n2 = 0;
                for (int i = 0; i < 2 * I * H; i++) {
                    assert_false(isnan(gb.w13[e][i]));
                    n13 += fabs(gb.w13[e][i]);
                }
                for (int i = 0; i < H * I; i++) {
                    assert_false(isnan(gb.w2[e][i]));
                    n2 += fabs(gb.w2[e][i]);
                }
                if (!used) {
                    assert_true(n13 == 0 && n2 == 0);
                } else {
                    assert_true(n13 > 0 && n2 > 0);
                }
                double nr = 0;
                for (int h = 0; h < H; h++) nr += fabs(gb.g.d_router[e * H + h]);
                /* the router row of an unselected expert: zero with renormalisation and on
                 * Llama-4 (top-k then sigmoid), non-zero through the full softmax otherwise */
                if (!used && (norm || arch == MOE_ARCH_LLAMA4)) assert_true(nr == 0);
                else assert_true(nr > 0);
            }
            grads_free(&gb);
            fwd_free(&fb);
            free(x);
            free(dout);
            free_weights(&w);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Llama-4 scales the expert INPUT by the score: check against both formulas by hand.       */

static void test_llama4_score_on_input(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    /* 32 tokens: with 4, about one seed in 30 drew only gate values deep in SiLU's linear
     * range, where the two formulas nearly agree, and the guard below failed on the draw */
    const int T = 32, H = 3, I = 2, E = 2;
    moe_config c = mk_cfg(MOE_ARCH_LLAMA4, H, I, E, 1, false, 0);
    moe_weights w;
    mk_weights(&c, 0, E, MOE_DTYPE_F64, seed, &w);
    /* Large weights so silu works in its nonlinear range and scaling the input differs
     * visibly from scaling the output. */
    double *w13 = w.w13.data, *w2 = w.w2.data, *wr = w.router.data;
    for (int i = 0; i < E * 2 * I * H; i++) w13[i] *= 4.0;
    double *x = normals(seed, "x", (size_t)T * H, 1.0);
    fwd_bufs fb;
    fwd_alloc(&fb, &c, T);
    run_fwd(&w, MOE_DTYPE_F64, T, x, &fb);
    double diff = 0, scale = 0;
    for (int t = 0; t < T; t++) {
        const double *xt = x + t * H;
        double l[2];
        for (int e = 0; e < E; e++) {
            l[e] = 0;
            for (int h = 0; h < H; h++) l[e] += xt[h] * wr[e * H + h];
            assert_true(fabs(fb.logits[t * E + e] - l[e]) < 1e-14);
        }
        int e = l[1] > l[0] ? 1 : 0;
        assert_int_equal(e, fb.ids[t]);
        double s = sigm(l[e]);
        assert_true(fabs(fb.topk_w[t] - s) < 1e-15);
        const double *Wg = w13 + e * 2 * I * H, *Wu = Wg + I * H, *Wd = w2 + e * H * I;
        double hin[2], hout[2];
        for (int i = 0; i < I; i++) {
            double g = 0, u = 0, g1 = 0, u1 = 0;
            for (int h = 0; h < H; h++) {
                g += Wg[i * H + h] * (s * xt[h]);
                u += Wu[i * H + h] * (s * xt[h]);
                g1 += Wg[i * H + h] * xt[h];
                u1 += Wu[i * H + h] * xt[h];
            }
            hin[i] = silu_t(g) * u;
            hout[i] = silu_t(g1) * u1;
        }
        for (int h = 0; h < H; h++) {
            double yin = 0, yout = 0;
            for (int i = 0; i < I; i++) {
                yin += Wd[h * I + i] * hin[i];
                yout += Wd[h * I + i] * hout[i];
            }
            yout *= s;
            assert_true(fabs(fb.out[t * H + h] - yin) <= 1e-13 * (1 + fabs(yin)));
            diff += (yin - yout) * (yin - yout);
            scale += yin * yin;
        }
    }
    /* the output-scaling formula is clearly different (so the check above means something) */
    fprintf(stderr, "  input vs output scaling differ by rel %.3e\n", sqrt(diff / scale));
    assert_true(sqrt(diff / scale) > 1e-2);
    fwd_free(&fb);
    free(x);
    free_weights(&w);
}

/* ---------------------------------------------------------------------------------------- */
/* A naive per-token re-implementation (written here, no shared code) with rounding to rd at */
/* HF's points, adding each token's experts in ascending id.                                 */

static double rdv(moe_dtype rd, double v) { return moe_round_to(rd, v); }

static void naive_mlp(moe_dtype rd, int H, int Iw, const double *xin, const moe_tensor *tg,
                      size_t og, const moe_tensor *tu, size_t ou, const moe_tensor *td, size_t od,
                      double *y)
{
    double *hh = dalloc((size_t)Iw);
    for (int i = 0; i < Iw; i++) {
        double g = 0, u = 0;
        for (int h = 0; h < H; h++) {
            g += moe_load_elem(tg->dtype, tg->data, og + (size_t)i * H + h) * xin[h];
            u += moe_load_elem(tu->dtype, tu->data, ou + (size_t)i * H + h) * xin[h];
        }
        g = rdv(rd, g);
        u = rdv(rd, u);
        hh[i] = rdv(rd, rdv(rd, silu_t(g)) * u);
    }
    for (int h = 0; h < H; h++) {
        double acc = 0;
        for (int i = 0; i < Iw; i++) acc += moe_load_elem(td->dtype, td->data, od + (size_t)h * Iw + i) * hh[i];
        y[h] = rdv(rd, acc);
    }
    free(hh);
}

static void naive_block(const moe_weights *w, moe_dtype rd, int T, const double *x, double *out,
                        double *logits)
{
    const moe_config *c = &w->cfg;
    int H = c->hidden, I = c->inter, E = c->num_experts, k = c->top_k;
    moe_dtype fr = rd == MOE_DTYPE_F64 ? MOE_DTYPE_F64 : MOE_DTYPE_F32;
    double *y = dalloc((size_t)H), *xs = dalloc((size_t)H), *p = dalloc((size_t)E);
    for (int t = 0; t < T; t++) {
        const double *xt = x + (size_t)t * H;
        double *l = logits + (size_t)t * E;
        for (int e = 0; e < E; e++) {
            double a = 0;
            for (int h = 0; h < H; h++) a += moe_load_elem(w->router.dtype, w->router.data, (size_t)e * H + h) * xt[h];
            l[e] = rdv(rd, a);
        }
        /* selection flags by repeated max with lower-id ties, on p (Qwen3) or l (Llama-4) */
        softmax_ref(l, E, p);
        for (int e = 0; e < E; e++) p[e] = rdv(fr, p[e]);
        const double *key = c->arch == MOE_ARCH_QWEN3 ? p : l;
        bool sel[256] = {false};
        double psum = 0;
        for (int j = 0; j < k; j++) {
            int b = -1;
            for (int e = 0; e < E; e++)
                if (!sel[e] && (b < 0 || key[e] > key[b])) b = e;
            sel[b] = true;
            psum += p[b];
        }
        psum = rdv(fr, psum);
        double *o = out + (size_t)t * H;
        for (int h = 0; h < H; h++) o[h] = 0;
        for (int e = 0; e < E; e++) { /* ascending expert id */
            if (!sel[e]) continue;
            size_t o13 = (size_t)e * 2 * I * H, o2 = (size_t)e * H * I;
            if (c->arch == MOE_ARCH_QWEN3) {
                double wt = c->norm_topk_prob ? rdv(fr, p[e] / psum) : p[e];
                wt = rdv(rd, wt);
                naive_mlp(rd, H, I, xt, &w->w13, o13, &w->w13, o13 + (size_t)I * H, &w->w2, o2, y);
                for (int h = 0; h < H; h++) o[h] = rdv(rd, o[h] + rdv(rd, y[h] * wt));
            } else {
                double s = rdv(rd, rdv(fr, sigm(l[e])));
                for (int h = 0; h < H; h++) xs[h] = rdv(rd, xt[h] * s);
                naive_mlp(rd, H, I, xs, &w->w13, o13, &w->w13, o13 + (size_t)I * H, &w->w2, o2, y);
                for (int h = 0; h < H; h++) o[h] = rdv(rd, o[h] + y[h]);
            }
        }
        if (c->arch == MOE_ARCH_LLAMA4 && c->shared_inter > 0) {
            naive_mlp(rd, H, c->shared_inter, xt, &w->shared_gate, 0, &w->shared_up, 0,
                      &w->shared_down, 0, y);
            for (int h = 0; h < H; h++) o[h] = rdv(rd, y[h] + o[h]);
        }
    }
    free(y); free(xs); free(p);
}

static bool bf16_exact(double v) { return moe_round_to(MOE_DTYPE_BF16, v) == v; }

static void naive_compare(const moe_config *c, moe_dtype wdt, moe_dtype rd, int T)
{
    uint64_t seed = moe_test_seed();
    moe_weights w;
    mk_weights(c, 0, c->num_experts, wdt, seed, &w);
    double *x = normals(seed, "x", (size_t)T * c->hidden, 1.0);
    round_all(rd, x, (size_t)T * c->hidden);
    fwd_bufs fb;
    fwd_alloc(&fb, c, T);
    run_fwd(&w, rd, T, x, &fb);
    double *nout = dalloc((size_t)T * c->hidden), *nlog = dalloc((size_t)T * c->num_experts);
    naive_block(&w, rd, T, x, nout, nlog);
    /* The reference sums dot products in another (fixed) order than the naive loops, so a
     * rounding can in principle land on the other side of a tie; with double sums that is
     * ~1e-13 per value, so everything must match exactly. */
    size_t n = (size_t)T * c->hidden, mism = 0;
    for (size_t i = 0; i < n; i++) mism += fb.out[i] != nout[i];
    for (size_t i = 0; i < (size_t)T * c->num_experts; i++) mism += fb.logits[i] != nlog[i];
    fprintf(stderr, "  %s %s: %zu mismatches vs naive\n", c->name, moe_dtype_name(rd), mism);
    assert_int_equal(0, mism);
    if (rd == MOE_DTYPE_BF16) {
        for (size_t i = 0; i < n; i++) assert_true(bf16_exact(fb.out[i]));
        for (size_t i = 0; i < (size_t)T * c->num_experts; i++) assert_true(bf16_exact(fb.logits[i]));
        for (size_t i = 0; i < (size_t)T * c->top_k; i++) assert_true(bf16_exact(fb.topk_w[i]));
    }
    free(nout); free(nlog);
    fwd_free(&fb);
    free(x);
    free_weights(&w);
}

static void test_naive_qwen3_bf16(void **state)
{
    (void)state;
    moe_config c = mk_cfg(MOE_ARCH_QWEN3, 24, 12, 8, 4, true, 0);
    naive_compare(&c, MOE_DTYPE_BF16, MOE_DTYPE_BF16, 19);
    c.norm_topk_prob = false;
    naive_compare(&c, MOE_DTYPE_BF16, MOE_DTYPE_BF16, 19);
    naive_compare(&c, MOE_DTYPE_F32, MOE_DTYPE_F16, 19);
}

static void test_naive_llama4_bf16(void **state)
{
    (void)state;
    moe_config c = mk_cfg(MOE_ARCH_LLAMA4, 24, 12, 6, 2, false, 10);
    naive_compare(&c, MOE_DTYPE_BF16, MOE_DTYPE_BF16, 19);
    c.top_k = 1;
    naive_compare(&c, MOE_DTYPE_BF16, MOE_DTYPE_BF16, 19);
    c.shared_inter = 0;
    naive_compare(&c, MOE_DTYPE_F32, MOE_DTYPE_F32, 19);
}

/* ---------------------------------------------------------------------------------------- */
/* Stage functions agree with the block.                                                     */

static void test_stage_functions_match_block(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const int T = 13, H = 40, I = 24, E = 5;
    for (int arch = 0; arch < 2; arch++) {
        /* k = 1 with renormalisation makes Qwen3's weight exactly 1, and Llama-4 without a
         * shared expert has out = y, so out must equal the expert row's y bitwise. */
        moe_config c = mk_cfg(arch, H, I, E, 1, true, 0);
        moe_weights w;
        mk_weights(&c, 0, E, MOE_DTYPE_BF16, seed, &w);
        double *x = normals(seed, "x", (size_t)T * H, 1.0);
        round_all(MOE_DTYPE_BF16, x, (size_t)T * H);
        fwd_bufs fb;
        fwd_alloc(&fb, &c, T);
        run_fwd(&w, MOE_DTYPE_BF16, T, x, &fb);
        double *y = dalloc(H), *g = dalloc(I), *u = dalloc(I), *act = dalloc(I), *xs = dalloc(H);
        for (int t = 0; t < T; t++) {
            int32_t id;
            double wt;
            ref_route_row(&c, MOE_DTYPE_BF16, fb.logits + t * E, &id, &wt);
            assert_int_equal(fb.ids[t], id);
            assert_true(wt == fb.topk_w[t]);
            for (int h = 0; h < H; h++)
                xs[h] = arch == MOE_ARCH_LLAMA4 ? moe_round_to(MOE_DTYPE_BF16, x[t * H + h] * wt)
                                                : x[t * H + h];
            ref_expert_row(&w, MOE_DTYPE_BF16, id, xs, g, u, act, y);
            for (int h = 0; h < H; h++) assert_true(y[h] == fb.out[t * H + h]);
            for (int i = 0; i < I; i++) {
                assert_true(bf16_exact(g[i]) && bf16_exact(u[i]) && bf16_exact(act[i]));
                double a = moe_round_to(MOE_DTYPE_BF16,
                                        moe_round_to(MOE_DTYPE_BF16, silu_t(g[i])) * u[i]);
                assert_true(a == act[i]);
            }
        }
        /* an expert outside the local slice: NaN, never silently zero */
        ref_expert_row(&w, MOE_DTYPE_BF16, E, xs, g, u, act, y);
        assert_true(isnan(y[0]) && isnan(act[0]));
        free(y); free(g); free(u); free(act); free(xs);
        fwd_free(&fb);
        free(x);
        free_weights(&w);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Expert-parallel slices: the block is linear in the routed experts' contributions once the */
/* routing is fixed, so (fp64) two halves sum to the whole; per-expert dW equal bitwise.     */

static void test_slices_sum_to_whole(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const int T = 9, H = 16, I = 8, E = 8;
    moe_config c = mk_cfg(MOE_ARCH_QWEN3, H, I, E, 3, true, 0);
    moe_weights full, lo, hi;
    mk_weights(&c, 0, E, MOE_DTYPE_F64, seed, &full);
    mk_weights(&c, 0, E / 2, MOE_DTYPE_F64, seed, &lo);
    mk_weights(&c, E / 2, E / 2, MOE_DTYPE_F64, seed, &hi);
    double *x = normals(seed, "x", (size_t)T * H, 1.0);
    double *dout = normals(seed, "dout", (size_t)T * H, 1.0);
    fwd_bufs ff, fl, fh;
    fwd_alloc(&ff, &c, T);
    fwd_alloc(&fl, &c, T);
    fwd_alloc(&fh, &c, T);
    run_fwd(&full, MOE_DTYPE_F64, T, x, &ff);
    run_fwd(&lo, MOE_DTYPE_F64, T, x, &fl);
    run_fwd(&hi, MOE_DTYPE_F64, T, x, &fh);
    grad_bufs gf, gl, gh;
    grads_alloc(&gf, &full, T);
    grads_alloc(&gl, &lo, T);
    grads_alloc(&gh, &hi, T);
    run_bwd(&full, MOE_DTYPE_F64, T, x, dout, &gf.g);
    run_bwd(&lo, MOE_DTYPE_F64, T, x, dout, &gl.g);
    run_bwd(&hi, MOE_DTYPE_F64, T, x, dout, &gh.g);
    double *sum = dalloc((size_t)T * H), *rsum = dalloc((size_t)E * H);
    for (int i = 0; i < T * H; i++) sum[i] = fl.out[i] + fh.out[i];
    moe_test_assert_close("slices out", sum, ff.out, T, H, 1e-12);
    for (int i = 0; i < T * H; i++) sum[i] = gl.g.dx[i] + gh.g.dx[i];
    /* dx holds the router's term once per slice, each with that slice's dw: still linear */
    moe_test_assert_close("slices dx", sum, gf.g.dx, T, H, 1e-12);
    for (int i = 0; i < E * H; i++) rsum[i] = gl.g.d_router[i] + gh.g.d_router[i];
    assert_true(moe_test_rel_err(rsum, gf.g.d_router, (size_t)E * H) < 1e-12);
    for (int e = 0; e < E / 2; e++) {
        assert_memory_equal(gl.w13[e], gf.w13[e], (size_t)2 * I * H * sizeof(double));
        assert_memory_equal(gh.w13[e], gf.w13[E / 2 + e], (size_t)2 * I * H * sizeof(double));
        assert_memory_equal(gl.w2[e], gf.w2[e], (size_t)H * I * sizeof(double));
        assert_memory_equal(gh.w2[e], gf.w2[E / 2 + e], (size_t)H * I * sizeof(double));
    }
    free(sum); free(rsum);
    grads_free(&gf); grads_free(&gl); grads_free(&gh);
    fwd_free(&ff); fwd_free(&fl); fwd_free(&fh);
    free(x); free(dout);
    free_weights(&full); free_weights(&lo); free_weights(&hi);
}

/* ---------------------------------------------------------------------------------------- */
/* NULL gradient entries are skipped and change nothing else.                                */

static void test_null_grad_entries(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const int T = 11, H = 20, I = 12, E = 6;
    for (int arch = 0; arch < 2; arch++) {
        moe_config c = mk_cfg(arch, H, I, E, 2, true, arch == MOE_ARCH_LLAMA4 ? 7 : 0);
        moe_weights w;
        mk_weights(&c, 0, E, MOE_DTYPE_BF16, seed, &w);
        double *x = normals(seed, "x", (size_t)T * H, 1.0);
        double *dout = normals(seed, "dout", (size_t)T * H, 1.0);
        grad_bufs all, some;
        grads_alloc(&all, &w, T);
        grads_alloc(&some, &w, T);
        run_bwd(&w, MOE_DTYPE_BF16, T, x, dout, &all.g);
        /* only expert 3's w13 and expert 1's w2; no router, no shared */
        double *keep13 = some.w13[3], *keep2 = some.w2[1];
        double *null13[6] = {0}, *null2[6] = {0};
        null13[3] = keep13;
        null2[1] = keep2;
        moe_ref_grads g = {.dx = some.g.dx, .d_w13 = null13, .d_w2 = null2};
        run_bwd(&w, MOE_DTYPE_BF16, T, x, dout, &g);
        assert_memory_equal(all.g.dx, some.g.dx, (size_t)T * H * sizeof(double));
        assert_memory_equal(all.w13[3], keep13, (size_t)2 * I * H * sizeof(double));
        assert_memory_equal(all.w2[1], keep2, (size_t)H * I * sizeof(double));
        /* untouched: still poisoned */
        assert_true(isnan(some.w13[0][0]) && isnan(some.g.d_router[0]));
        /* no dx at all, only the router */
        moe_ref_grads g2 = {.d_router = some.g.d_router};
        run_bwd(&w, MOE_DTYPE_BF16, T, x, dout, &g2);
        assert_memory_equal(all.g.d_router, some.g.d_router, (size_t)E * H * sizeof(double));
        /* nothing at all is fine too */
        moe_ref_grads none = {0};
        run_bwd(&w, MOE_DTYPE_BF16, T, x, dout, &none);
        grads_free(&all);
        grads_free(&some);
        free(x); free(dout);
        free_weights(&w);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Bitwise independent of the thread count.                                                  */

static void test_thread_count_bitwise(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const int T = 37, H = 300, I = 200, E = 8;
    int saved = omp_get_max_threads();
    for (int arch = 0; arch < 2; arch++) {
        moe_config c = mk_cfg(arch, H, I, E, 2, false, arch == MOE_ARCH_LLAMA4 ? 150 : 0);
        moe_weights w;
        mk_weights(&c, 0, E, MOE_DTYPE_BF16, seed, &w);
        double *x = normals(seed, "x", (size_t)T * H, 1.0);
        round_all(MOE_DTYPE_BF16, x, (size_t)T * H);
        double *dout = normals(seed, "dout", (size_t)T * H, 1.0);
        fwd_bufs f1, f3;
        grad_bufs g1, g3;
        fwd_alloc(&f1, &c, T);
        fwd_alloc(&f3, &c, T);
        grads_alloc(&g1, &w, T);
        grads_alloc(&g3, &w, T);
        omp_set_num_threads(1);
        run_fwd(&w, MOE_DTYPE_BF16, T, x, &f1);
        run_bwd(&w, MOE_DTYPE_BF16, T, x, dout, &g1.g);
        omp_set_num_threads(3); /* uneven split over row / column blocks */
        run_fwd(&w, MOE_DTYPE_BF16, T, x, &f3);
        run_bwd(&w, MOE_DTYPE_BF16, T, x, dout, &g3.g);
        omp_set_num_threads(saved);
        assert_memory_equal(f1.out, f3.out, (size_t)T * H * sizeof(double));
        assert_memory_equal(f1.logits, f3.logits, (size_t)T * E * sizeof(double));
        assert_memory_equal(g1.g.dx, g3.g.dx, (size_t)T * H * sizeof(double));
        assert_memory_equal(g1.g.d_router, g3.g.d_router, (size_t)E * H * sizeof(double));
        for (int e = 0; e < E; e++) {
            assert_memory_equal(g1.w13[e], g3.w13[e], (size_t)2 * I * H * sizeof(double));
            assert_memory_equal(g1.w2[e], g3.w2[e], (size_t)H * I * sizeof(double));
        }
        if (arch == MOE_ARCH_LLAMA4) {
            assert_memory_equal(g1.g.d_shared_gate, g3.g.d_shared_gate, (size_t)150 * H * sizeof(double));
            assert_memory_equal(g1.g.d_shared_down, g3.g.d_shared_down, (size_t)150 * H * sizeof(double));
        }
        fwd_free(&f1); fwd_free(&f3);
        grads_free(&g1); grads_free(&g3);
        free(x); free(dout);
        free_weights(&w);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Per-token results do not depend on the rest of the batch: out_t and dx_t of a token run     */
/* alone equal (bitwise) those of the same token inside a batch, whichever vector or edge path */
/* of the kernels it went through there.                                                       */

static void test_batch_independent_rows(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const int T = 11, H = 30, I = 13, E = 5; /* sizes not multiples of the kernel tiles */
    for (int run = 0; run < 4; run++) {
        int arch = run % 2;
        moe_dtype rd = run < 2 ? MOE_DTYPE_BF16 : MOE_DTYPE_F64; /* fp64: no rounding hides */
        moe_config c = mk_cfg(arch, H, I, E, 2, true, arch == MOE_ARCH_LLAMA4 ? 9 : 0);
        moe_weights w;
        mk_weights(&c, 0, E, rd, seed, &w);
        double *x = normals(seed, "x", (size_t)T * H, 1.0);
        round_all(rd, x, (size_t)T * H);
        double *dout = normals(seed, "dout", (size_t)T * H, 1.0);
        fwd_bufs fa, f1;
        fwd_alloc(&fa, &c, T);
        fwd_alloc(&f1, &c, 1);
        run_fwd(&w, rd, T, x, &fa);
        double *dxa = dalloc((size_t)T * H), *dx1 = dalloc((size_t)H);
        moe_ref_grads ga = {.dx = dxa}, g1 = {.dx = dx1};
        run_bwd(&w, rd, T, x, dout, &ga);
        for (int t = 0; t < T; t++) {
            run_fwd(&w, rd, 1, x + (size_t)t * H, &f1);
            run_bwd(&w, rd, 1, x + (size_t)t * H, dout + (size_t)t * H, &g1);
            assert_memory_equal(f1.out, fa.out + (size_t)t * H, (size_t)H * sizeof(double));
            assert_memory_equal(f1.logits, fa.logits + (size_t)t * E, (size_t)E * sizeof(double));
            assert_memory_equal(dx1, dxa + (size_t)t * H, (size_t)H * sizeof(double));
        }
        free(dxa); free(dx1);
        fwd_free(&fa); fwd_free(&f1);
        free(x); free(dout);
        free_weights(&w);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Argument errors                                                                          */

static void test_errors(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    moe_config c = mk_cfg(MOE_ARCH_LLAMA4, 8, 4, 4, 1, false, 3);
    moe_weights w;
    mk_weights(&c, 0, 4, MOE_DTYPE_F32, seed, &w);
    double x[16] = {0}, dout[16] = {0};
    fwd_bufs fb;
    fwd_alloc(&fb, &c, 2);
    moe_error err = {0};
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_forward(NULL, MOE_DTYPE_F32, 2, x, &fb.f, &err));
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_forward(&w, MOE_DTYPE_F32, -1, x, &fb.f, &err));
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_forward(&w, MOE_DTYPE_F32, 2, NULL, &fb.f, &err));
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_forward(&w, MOE_DTYPE_I32, 2, x, &fb.f, &err));
    assert_non_null(strstr(err.msg, "rounding"));
    moe_ref_grads g = {0};
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_backward(&w, MOE_DTYPE_F32, 2, x, NULL, &g, &err));
    assert_non_null(strstr(err.msg, "dout"));
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_backward(&w, MOE_DTYPE_F32, 2, x, dout, NULL, &err));

    /* mis-shaped tensors are named */
    w.w13.shape[1] = 7;
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_forward(&w, MOE_DTYPE_F32, 2, x, &fb.f, &err));
    assert_non_null(strstr(err.msg, "w13"));
    w.w13.shape[1] = 8;
    w.shared_down.shape[0] = 3;
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_forward(&w, MOE_DTYPE_F32, 2, x, &fb.f, &err));
    assert_non_null(strstr(err.msg, "shared_down"));
    w.shared_down.shape[0] = 8;
    w.cfg.top_k = 5;
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_forward(&w, MOE_DTYPE_F32, 2, x, &fb.f, &err));
    w.cfg.top_k = 1;
    w.expert_begin = 2; /* 2 + 4 > E */
    assert_int_equal(MOE_ERR_INVALID_ARG, ref_forward(&w, MOE_DTYPE_F32, 2, x, &fb.f, &err));
    assert_non_null(strstr(err.msg, "local experts"));
    w.expert_begin = 0;
    /* valid again; T = 0 is a valid empty batch */
    assert_int_equal(MOE_OK, ref_forward(&w, MOE_DTYPE_F32, 2, x, &fb.f, &err));
    assert_int_equal(MOE_OK, ref_forward(&w, MOE_DTYPE_F32, 0, NULL, &fb.f, &err));
    grad_bufs gb;
    grads_alloc(&gb, &w, 2);
    assert_int_equal(MOE_OK, ref_backward(&w, MOE_DTYPE_F32, 0, NULL, NULL, &gb.g, &err));
    for (int i = 0; i < 2 * 4 * 8; i++) assert_true(gb.w13[0][i] == 0); /* zeroed, no tokens */
    grads_free(&gb);
    fwd_free(&fb);
    free_weights(&w);
}

/* ---------------------------------------------------------------------------------------- */
/* Full-size Qwen3-30B-A3B forward + backward at T = 64 (bf16 weights and rounding); dW of  */
/* two sampled experts. Reports the time; skipped with MOE_TEST_SKIP_FULL=1.                */

static void test_full_size_qwen3_timing(void **state)
{
    (void)state;
    const char *skip = getenv("MOE_TEST_SKIP_FULL");
    if (skip && strcmp(skip, "1") == 0) skip();
    uint64_t seed = moe_test_seed();
    const int T = 64, H = 2048, I = 768, E = 128, k = 8;
    moe_config c = mk_cfg(MOE_ARCH_QWEN3, H, I, E, k, true, 0);
    moe_weights w;
    memset(&w, 0, sizeof w);
    w.cfg = c;
    w.dtype = MOE_DTYPE_BF16;
    w.expert_count = E;
    assert_int_equal(MOE_OK, moe_tensor_alloc2(&w.router, MOE_DTYPE_BF16, E, H, NULL));
    assert_int_equal(MOE_OK, moe_tensor_alloc3(&w.w13, MOE_DTYPE_BF16, E, 2 * I, H, NULL));
    assert_int_equal(MOE_OK, moe_tensor_alloc3(&w.w2, MOE_DTYPE_BF16, E, H, I, NULL));
    /* 600M weights: tile a random pool instead of drawing each one (speed). Its length is a
     * prime, so no two rows (experts, router rows) repeat each other. */
    enum { POOL = 65521 };
    moe_bf16 *pool = malloc(POOL * sizeof(moe_bf16));
    assert_non_null(pool);
    uint64_t st = moe_rng_stream(seed, "pool");
    for (int i = 0; i < POOL; i++)
        pool[i] = moe_f64_to_bf16(moe_rng_normal(st, i) / sqrt((double)H));
    moe_tensor *ts[3] = {&w.router, &w.w13, &w.w2};
    for (int q = 0; q < 3; q++) {
        size_t n = moe_tensor_numel(ts[q]);
        moe_bf16 *d = ts[q]->data;
        for (size_t i = 0; i < n; i += POOL)
            memcpy(d + i, pool, MOE_MIN((size_t)POOL, n - i) * sizeof(moe_bf16));
    }
    free(pool);
    double *x = normals(seed, "x", (size_t)T * H, 1.0);
    round_all(MOE_DTYPE_BF16, x, (size_t)T * H);
    double *dout = normals(seed, "dout", (size_t)T * H, 1.0);
    fwd_bufs fb;
    fwd_alloc(&fb, &c, T);
    double t0 = moe_now();
    run_fwd(&w, MOE_DTYPE_BF16, T, x, &fb);
    double t1 = moe_now();
    double *dx = dalloc((size_t)T * H), *dr = dalloc((size_t)E * H);
    double *d13[128] = {0}, *d2[128] = {0};
    int e0 = fb.ids[0], e1 = fb.ids[1];
    d13[e0] = dalloc((size_t)2 * I * H);
    d2[e1] = dalloc((size_t)H * I);
    moe_ref_grads g = {.dx = dx, .d_router = dr, .d_w13 = d13, .d_w2 = d2};
    run_bwd(&w, MOE_DTYPE_BF16, T, x, dout, &g);
    double t2 = moe_now();
    fprintf(stderr, "  full-size Qwen3 T=%d on %d threads: forward %.2f s, backward %.2f s\n", T,
            omp_get_max_threads(), t1 - t0, t2 - t1);
    for (size_t i = 0; i < (size_t)T * H; i++) assert_true(isfinite(fb.out[i]) && isfinite(dx[i]));
    for (size_t i = 0; i < (size_t)2 * I * H; i++) assert_true(isfinite(d13[e0][i]));
    free(d13[e0]); free(d2[e1]); free(dx); free(dr);
    fwd_free(&fb);
    free(x); free(dout);
    free_weights(&w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_ties_lower_id),
        cmocka_unit_test(test_route_k_equals_E_and_renorm),
        cmocka_unit_test(test_fd_qwen3_norm),
        cmocka_unit_test(test_fd_qwen3_no_norm),
        cmocka_unit_test(test_fd_llama4_k1),
        cmocka_unit_test(test_fd_llama4_k2),
        cmocka_unit_test(test_unrouted_expert_zero_grads),
        cmocka_unit_test(test_llama4_score_on_input),
        cmocka_unit_test(test_naive_qwen3_bf16),
        cmocka_unit_test(test_naive_llama4_bf16),
        cmocka_unit_test(test_stage_functions_match_block),
        cmocka_unit_test(test_slices_sum_to_whole),
        cmocka_unit_test(test_null_grad_entries),
        cmocka_unit_test(test_thread_count_bitwise),
        cmocka_unit_test(test_batch_independent_rows),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_full_size_qwen3_timing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
