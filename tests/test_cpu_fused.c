/*
 * test_cpu_fused.c — the whole block on the CPU fused path (cpu_block_forward/backward):
 *  - forward, every named intermediate against the test's own double loops fed the stage's
 *    upstream output (routing exact, GEMM outputs within an ulp), and the end result against an
 *    independent double forward rounding at the same points; Qwen3 norm on/off, Llama-4 with a
 *    shared expert and k = 2, all three dtypes, and a slice of the experts;
 *  - backward against central differences (Richardson-extrapolated) of the fused forward in
 *    fp32 with a double loss, for every gradient (dx, router, w13, w2, shared expert);
 *  - backward in bf16/fp16 against the fp32 backward on the same inputs;
 *  - exact zeros for an expert no token picks; bitwise determinism across thread counts;
 *  - argument errors, T = 0, and the state's allocation and poisoning.
 */
#include <omp.h>

#include "cpu_fused_testlib.h"
#include "block_state.h"
#include "cpu/cpu_fused.h"
#include "cpu_block_ref.h"
#include "weights.h"

/* ---- set-up ---- */

static moe_config qwen_cfg(int H, int I, int E, int k, bool norm)
{
    moe_config c;
    memset(&c, 0, sizeof c);
    c.arch = MOE_ARCH_QWEN3;
    snprintf(c.name, sizeof c.name, "test-qwen3");
    c.hidden = H;
    c.inter = I;
    c.num_experts = E;
    c.top_k = k;
    c.norm_topk_prob = norm;
    c.dtype = MOE_DTYPE_F32;
    return c;
}

static moe_config llama_cfg(int H, int I, int E, int k, int Is)
{
    moe_config c = qwen_cfg(H, I, E, k, false);
    c.arch = MOE_ARCH_LLAMA4;
    snprintf(c.name, sizeof c.name, "test-llama4");
    c.shared_inter = Is;
    return c;
}

static bool has_shared(const moe_config *c)
{
    return c->arch == MOE_ARCH_LLAMA4 && c->shared_inter > 0;
}

/* Weights in canonical layout (weights.h), allocated here; fill = false leaves them zero. */
static void make_weights(const moe_config *c, moe_dtype dt, int begin, int El, bool fill,
                         uint64_t tag, double router_scale, moe_weights *w)
{
    memset(w, 0, sizeof *w);
    w->cfg = *c;
    w->dtype = dt;
    w->expert_begin = begin;
    w->expert_count = El;
    moe_error err = {0};
    int64_t H = c->hidden, I = c->inter, E = c->num_experts, Is = c->shared_inter;
    assert_int_equal(moe_tensor_alloc2(&w->router, dt, E, H, &err), MOE_OK);
    assert_int_equal(moe_tensor_alloc3(&w->w13, dt, El, 2 * I, H, &err), MOE_OK);
    assert_int_equal(moe_tensor_alloc3(&w->w2, dt, El, H, I, &err), MOE_OK);
    if (has_shared(c)) {
        assert_int_equal(moe_tensor_alloc2(&w->shared_gate, dt, Is, H, &err), MOE_OK);
        assert_int_equal(moe_tensor_alloc2(&w->shared_up, dt, Is, H, &err), MOE_OK);
        assert_int_equal(moe_tensor_alloc2(&w->shared_down, dt, H, Is, &err), MOE_OK);
    }
    moe_tensor *all[6] = {&w->router, &w->w13, &w->w2, &w->shared_gate, &w->shared_up,
                          &w->shared_down};
    for (int i = 0; i < 6; i++) {
        if (!all[i]->data) continue;
        if (!fill) {
            memset(all[i]->data, 0, all[i]->nbytes);
            continue;
        }
        double fan_in = (double)all[i]->shape[all[i]->ndim - 1];
        double sc = i == 0 ? router_scale / sqrt(fan_in) : 1.0 / sqrt(fan_in);
        /* Draw from the global tensor so an expert slice sees the same values. */
        uint64_t s = tl_stream(i == 0 ? "router" : i == 1 ? "w13" : i == 2 ? "w2" : "shared", tag * 8 + (uint64_t)i);
        size_t per = moe_tensor_numel(all[i]) / (i == 1 || i == 2 ? (size_t)El : 1);
        size_t off = (i == 1 || i == 2) ? (size_t)begin * per : 0;
        for (size_t j = 0; j < moe_tensor_numel(all[i]); j++)
            moe_store_elem(dt, all[i]->data, j, moe_rng_normal(s, off + j) * sc);
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

static void poison_weights(moe_weights *w)
{
    moe_tensor_poison(&w->router);
    moe_tensor_poison(&w->w13);
    moe_tensor_poison(&w->w2);
    if (w->shared_gate.data) {
        moe_tensor_poison(&w->shared_gate);
        moe_tensor_poison(&w->shared_up);
        moe_tensor_poison(&w->shared_down);
    }
}

static void alloc_state(const moe_config *c, moe_dtype dt, int T, moe_fwd_state *st)
{
    moe_error err = {0};
    if (moe_fwd_state_alloc(c, dt, T, true, st, &err) != MOE_OK) fail_msg("%s", err.msg);
    moe_fwd_state_poison(c, dt, st);
}

static double W(const moe_weights *w, const moe_tensor *t, size_t i)
{
    return tl_ld(w->dtype, t->data, i);
}

/* ---- forward ---- */

/* The test's double forward of one block, rounding where the fused path rounds (logits,
 * weights/scores, Llama-4's scaled input, the activation, GEMM2's output, the shared expert's
 * activation and output, the final sum), routed from the given logits (the fused path's own,
 * checked separately). Experts outside w's slice contribute nothing. */
static void naive_forward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                          const void *logits, double *out)
{
    const moe_config *c = &w->cfg;
    int H = c->hidden, I = c->inter, E = c->num_experts, k = c->top_k, Is = c->shared_inter;
    double *l = tl_alloc((size_t)E, 8), *wt = tl_alloc((size_t)k, 8), *xin = tl_alloc((size_t)H, 8);
    double *act = tl_alloc((size_t)(I > Is ? I : Is), 8), *acc = tl_alloc((size_t)H, 8);
    int32_t *ids = tl_alloc((size_t)k, 4);
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++) l[e] = tl_ld(dt, logits, (size_t)t * E + e);
        tl_route_row(c, l, ids, wt);
        for (int h = 0; h < H; h++) acc[h] = 0;
        if (has_shared(c)) {
            for (int i = 0; i < Is; i++) {
                double g = 0, u = 0;
                for (int h = 0; h < H; h++) {
                    double xv = tl_ld(dt, x, (size_t)t * H + h);
                    g += xv * W(w, &w->shared_gate, (size_t)i * H + h);
                    u += xv * W(w, &w->shared_up, (size_t)i * H + h);
                }
                act[i] = moe_round_to(dt, tl_silu(g) * u);
            }
            for (int h = 0; h < H; h++) {
                double y = 0;
                for (int i = 0; i < Is; i++) y += act[i] * W(w, &w->shared_down, (size_t)h * Is + i);
                acc[h] = moe_round_to(dt, y);
            }
        }
        for (int j = 0; j < k; j++) {
            int le = ids[j] - w->expert_begin;
            if (le < 0 || le >= w->expert_count) continue;
            double s = moe_round_to(dt, wt[j]);
            for (int h = 0; h < H; h++) {
                xin[h] = tl_ld(dt, x, (size_t)t * H + h);
                if (c->arch == MOE_ARCH_LLAMA4) xin[h] = moe_round_to(dt, xin[h] * s);
            }
            for (int i = 0; i < I; i++) {
                double g = 0, u = 0;
                for (int h = 0; h < H; h++) {
                    g += xin[h] * W(w, &w->w13, ((size_t)le * 2 * I + i) * H + h);
                    u += xin[h] * W(w, &w->w13, ((size_t)le * 2 * I + I + i) * H + h);
                }
                act[i] = moe_round_to(dt, tl_silu(g) * u);
            }
            for (int h = 0; h < H; h++) {
                double y = 0;
                for (int i = 0; i < I; i++) y += act[i] * W(w, &w->w2, ((size_t)le * H + h) * I + i);
                if (c->arch == MOE_ARCH_QWEN3) y *= s;
                acc[h] += moe_round_to(dt, y);
            }
        }
        for (int h = 0; h < H; h++) out[(size_t)t * H + h] = moe_round_to(dt, acc[h]);
    }
    free(l); free(wt); free(xin); free(act); free(acc); free(ids);
}

/* Runs the fused forward and checks every intermediate. */
static void check_forward(const moe_config *c, moe_dtype dt, int T, int begin, int El,
                          uint64_t tag)
{
    int H = c->hidden, I = c->inter, E = c->num_experts, k = c->top_k;
    int flat = T * k;
    moe_weights w;
    make_weights(c, dt, begin, El, true, tag, 2.0, &w);
    void *x = tl_normal(dt, (size_t)T * H, "x", tag, 1.0);
    moe_fwd_state st;
    alloc_state(c, dt, T, &st);
    moe_error err = {0};
    if (cpu_block_forward(&w, dt, T, x, &st, &err) != MOE_OK) fail_msg("%s", err.msg);
    char what[128];
    const char *an = c->arch == MOE_ARCH_QWEN3 ? (c->norm_topk_prob ? "qwen3-norm" : "qwen3") : "llama4";
    const char *dn = moe_dtype_name(dt);

    /* logits */
    double *got = tl_alloc((size_t)flat * 2 * I + (size_t)T * (H + E) + (size_t)flat * H, 8);
    double *ref = tl_alloc((size_t)flat * 2 * I + (size_t)T * (H + E) + (size_t)flat * H, 8);
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            double v = 0;
            for (int h = 0; h < H; h++) v += tl_ld(dt, x, (size_t)t * H + h) * W(&w, &w.router, (size_t)e * H + h);
            ref[t * E + e] = v;
            got[t * E + e] = tl_ld(dt, st.router_logits, (size_t)t * E + e);
        }
    snprintf(what, sizeof what, "%s %s logits", an, dn);
    assert_true(tl_check_rounded(what, dt, got, ref, (size_t)T, (size_t)E));

    /* routing, from the fused logits: exact ids, weights within an ulp */
    double *l = tl_alloc((size_t)E, 8), *wt = tl_alloc((size_t)k, 8);
    int32_t *ids = tl_alloc((size_t)k, 4);
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++) l[e] = tl_ld(dt, st.router_logits, (size_t)t * E + e);
        tl_route_row(c, l, ids, wt);
        for (int j = 0; j < k; j++) {
            assert_int_equal(st.topk_ids[t * k + j], ids[j]);
            double gw = tl_ld(dt, st.topk_w, (size_t)t * k + j);
            assert_true(fabs(gw - wt[j]) <= tl_ulp_tol(dt) * fabs(wt[j]));
        }
    }
    /* counts, offsets, gather: exact */
    int32_t *rc = tl_alloc((size_t)El, 4), *ro = tl_alloc((size_t)El + 1, 4), *rg = tl_alloc((size_t)flat, 4);
    int M = tl_expert_order(st.topk_ids, flat, begin, El, rc, ro, rg);
    assert_int_equal(st.M, M);
    for (int e = 0; e < El; e++) assert_int_equal(st.token_counts[e], rc[e]);
    for (int e = 0; e <= El; e++) assert_int_equal(st.expert_offsets[e], ro[e]);
    for (int r = 0; r < M; r++) assert_int_equal(st.gather_idx[r], rg[r]);

    /* GEMM1 out and act, fed x and the fused weights/scores */
    double *gotp = got + (size_t)M * I, *refp = ref + (size_t)M * I;
    double *xin = tl_alloc((size_t)H, 8);
    for (int r = 0; r < M; r++) {
        int le = 0;
        while (r >= ro[le + 1]) le++;
        int f = rg[r], t = f / k;
        for (int h = 0; h < H; h++) {
            xin[h] = tl_ld(dt, x, (size_t)t * H + h);
            if (c->arch == MOE_ARCH_LLAMA4)
                xin[h] = moe_round_to(dt, xin[h] * tl_ld(dt, st.topk_w, (size_t)f));
        }
        for (int i = 0; i < I; i++) {
            double g = 0, u = 0;
            for (int h = 0; h < H; h++) {
                g += xin[h] * W(&w, &w.w13, ((size_t)le * 2 * I + i) * H + h);
                u += xin[h] * W(&w, &w.w13, ((size_t)le * 2 * I + I + i) * H + h);
            }
            ref[(size_t)r * I + i] = tl_silu(g) * u;
            got[(size_t)r * I + i] = tl_ld(dt, st.act, (size_t)r * I + i);
            refp[(size_t)r * 2 * I + i] = g;
            refp[(size_t)r * 2 * I + I + i] = u;
            gotp[(size_t)r * 2 * I + i] = tl_ld(dt, st.gemm1_out, (size_t)r * 2 * I + i);
            gotp[(size_t)r * 2 * I + I + i] = tl_ld(dt, st.gemm1_out, (size_t)r * 2 * I + I + i);
        }
    }
    snprintf(what, sizeof what, "%s %s act (M=%d)", an, dn, M);
    if (M) assert_true(tl_check_rounded(what, dt, got, ref, (size_t)M, (size_t)I));
    snprintf(what, sizeof what, "%s %s gemm1_out", an, dn);
    if (M) assert_true(tl_check_rounded(what, dt, gotp, refp, (size_t)M, (size_t)2 * I));

    /* GEMM2 out (flat order), fed the fused act; flat rows of other experts exactly zero */
    for (int f = 0; f < flat; f++)
        for (int h = 0; h < H; h++) {
            ref[(size_t)f * H + h] = 0;
            got[(size_t)f * H + h] = tl_ld(dt, st.gemm2_out, (size_t)f * H + h);
        }
    for (int r = 0; r < M; r++) {
        int le = 0;
        while (r >= ro[le + 1]) le++;
        int f = rg[r];
        for (int h = 0; h < H; h++) {
            double y = 0;
            for (int i = 0; i < I; i++)
                y += tl_ld(dt, st.act, (size_t)r * I + i) * W(&w, &w.w2, ((size_t)le * H + h) * I + i);
            if (c->arch == MOE_ARCH_QWEN3) y *= tl_ld(dt, st.topk_w, (size_t)f);
            ref[(size_t)f * H + h] = y;
        }
    }
    snprintf(what, sizeof what, "%s %s gemm2_out", an, dn);
    assert_true(tl_check_rounded(what, dt, got, ref, (size_t)flat, (size_t)H));

    /* the sum over k, fed the fused gemm2_out and shared_out */
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            double s = has_shared(c) ? tl_ld(dt, st.shared_out, (size_t)t * H + h) : 0;
            for (int j = 0; j < k; j++) s += tl_ld(dt, st.gemm2_out, ((size_t)t * k + j) * H + h);
            ref[(size_t)t * H + h] = s;
            got[(size_t)t * H + h] = tl_ld(dt, st.out, (size_t)t * H + h);
        }
    snprintf(what, sizeof what, "%s %s out (from stages)", an, dn);
    assert_true(tl_check_rounded(what, dt, got, ref, (size_t)T, (size_t)H));

    /* end to end against the independent double forward */
    naive_forward(&w, dt, T, x, st.router_logits, ref);
    snprintf(what, sizeof what, "%s %s out (end to end)", an, dn);
    assert_true(moe_test_close(what, got, ref, (size_t)T, (size_t)H, moe_test_tol(dt, false)));

    free(got); free(ref); free(l); free(wt); free(ids); free(rc); free(ro); free(rg); free(xin);
    free(x);
    moe_fwd_state_free(&st);
    free_weights(&w);
}

static void test_forward_stages(void **state)
{
    (void)state;
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = tl_dtypes[d];
        moe_config q = qwen_cfg(40, 24, 8, 3, true);
        check_forward(&q, dt, 21, 0, 8, 1);
        q.norm_topk_prob = false;
        check_forward(&q, dt, 21, 0, 8, 2);
        check_forward(&q, dt, 21, 3, 4, 3); /* a slice of the experts */
        moe_config l4 = llama_cfg(36, 20, 6, 2, 28);
        check_forward(&l4, dt, 17, 0, 6, 4);
        l4.top_k = 1;
        check_forward(&l4, dt, 17, 2, 3, 5);
    }
    /* Sizes past the tiles: H > the K chunk, 2I > the column block, > 32 rows per expert. */
    moe_config big = qwen_cfg(300, 72, 4, 2, true);
    check_forward(&big, MOE_DTYPE_BF16, 70, 0, 4, 6);
}

/* ---- backward against finite differences (fp32) ---- */

typedef struct fd_ctx {
    moe_weights *w;
    int T;
    float *x;
    const double *dout;
    moe_fwd_state st;
    int32_t *ids0; /* routing of the unperturbed forward */
} fd_ctx;

/* L = sum(out * dout) in double; *same: the routing equals the unperturbed one. */
static double fd_loss(fd_ctx *c, bool *same)
{
    moe_error err = {0};
    if (cpu_block_forward(c->w, MOE_DTYPE_F32, c->T, c->x, &c->st, &err) != MOE_OK)
        fail_msg("%s", err.msg);
    size_t n = (size_t)c->T * c->w->cfg.hidden;
    const float *out = c->st.out;
    double L = 0;
    for (size_t i = 0; i < n; i++) L += (double)out[i] * c->dout[i];
    /* Same set of experts per token (their order within the top k does not matter to L). */
    int k = c->w->cfg.top_k;
    *same = true;
    for (int t = 0; t < c->T; t++)
        for (int j = 0; j < k; j++) {
            bool found = false;
            for (int i = 0; i < k; i++) found |= c->st.topk_ids[t * k + i] == c->ids0[t * k + j];
            *same &= found;
        }
    return L;
}

/* dL/dp[i] for every i by Richardson-extrapolated central differences (steps h and h/2);
 * NaN where any step changed the routing (the loss is not differentiable across a switch). */
static void fd_grad(fd_ctx *c, float *p, size_t n, double h, double *g, int *skipped)
{
    for (size_t i = 0; i < n; i++) {
        float keep = p[i];
        double d[2];
        bool ok = true;
        for (int s = 0; s < 2; s++) {
            double hs = s ? h / 2 : h;
            bool s1, s2;
            p[i] = (float)(keep + hs);
            double hp = (double)p[i] - keep; /* the step actually taken in fp32 */
            double lp = fd_loss(c, &s1);
            p[i] = (float)(keep - hs);
            double hm = keep - (double)p[i];
            double lm = fd_loss(c, &s2);
            d[s] = (lp - lm) / (hp + hm);
            ok &= s1 && s2;
        }
        p[i] = keep;
        g[i] = ok ? (4 * d[1] - d[0]) / 3 : NAN;
        if (!ok) (*skipped)++;
    }
}

/* Analytic gradient a against finite differences fd (NaN entries skipped): global relative
 * error within tol, and each row within 10 tol of its own norm or of the tensor's average row
 * norm, whichever is larger (a row whose exact gradient is zero comes out of the differences
 * as rounding noise, not as zero). */
static bool fd_close(const char *what, const double *a, const double *fd, size_t rows,
                     size_t cols, double tol)
{
    double num = 0, den = 0;
    size_t used = 0;
    for (size_t i = 0; i < rows * cols; i++) {
        if (isnan(fd[i])) continue;
        if (isnan(a[i])) return false;
        num += (a[i] - fd[i]) * (a[i] - fd[i]);
        den += fd[i] * fd[i];
        used++;
    }
    double g = sqrt(num / (den > 0 ? den : 1));
    double avg_row = sqrt(den / (double)rows);
    double worst = 0;
    size_t worst_row = 0;
    for (size_t r = 0; r < rows; r++) {
        double rn = 0, rd = 0;
        for (size_t j = 0; j < cols; j++) {
            size_t i = r * cols + j;
            if (isnan(fd[i])) continue;
            rn += (a[i] - fd[i]) * (a[i] - fd[i]);
            rd += fd[i] * fd[i];
        }
        double e = sqrt(rn) / fmax(sqrt(rd), avg_row > 0 ? avg_row : 1);
        if (e > worst) {
            worst = e;
            worst_row = r;
        }
    }
    bool ok = g <= tol && worst <= 10 * tol && used * 2 >= rows * cols;
    fprintf(stderr, "%-34s rel %.3e  worst row %zu: %.3e  checked %zu/%zu  %s\n", what, g,
            worst_row, worst, used, rows * cols, ok ? "ok" : "FAIL");
    return ok;
}

static void to_double(moe_dtype dt, const void *p, size_t n, double *out)
{
    for (size_t i = 0; i < n; i++) out[i] = tl_ld(dt, p, i);
}

/* begin, El: the slice of experts held (the gradient of that slice's forward). */
static void check_backward_fd(const moe_config *cfg, int T, uint64_t tag, int begin, int El)
{
    moe_dtype dt = MOE_DTYPE_F32;
    int H = cfg->hidden, E = cfg->num_experts;
    moe_weights w, g;
    /* Router scale: wide logit gaps (few routing switches under the FD steps) but, for
     * Llama-4, sigmoids away from saturation (a tiny router gradient drowns in FD noise). */
    make_weights(cfg, dt, begin, El, true, tag, cfg->arch == MOE_ARCH_LLAMA4 ? 1.5 : 3.0, &w);
    make_weights(cfg, dt, begin, El, false, tag, 0, &g);
    poison_weights(&g);
    fd_ctx c = {.w = &w, .T = T};
    c.x = tl_normal(dt, (size_t)T * H, "x", tag, 1.0);
    /* Redraw a token whose k-th and (k+1)-th logits are close: the FD steps would switch its
     * routing (such coordinates are skipped, but too many would leave little to check). */
    int k = cfg->top_k;
    double *lg = tl_alloc((size_t)E, 8);
    for (int t = 0; t < T && k < E; t++) {
        for (int attempt = 0; attempt < 100; attempt++) {
            for (int e = 0; e < E; e++) {
                lg[e] = 0;
                for (int h = 0; h < H; h++)
                    lg[e] += (double)c.x[t * H + h] * ((float *)w.router.data)[e * H + h];
            }
            int32_t ids[16];
            tl_topk(lg, E, k + 1, ids);
            if (lg[ids[k - 1]] - lg[ids[k]] > 0.3) break;
            uint64_t rs = tl_stream("x-redraw", tag * 100000 + (uint64_t)(t * 100 + attempt));
            for (int h = 0; h < H; h++) c.x[t * H + h] = (float)moe_rng_normal(rs, (uint64_t)h);
        }
    }
    free(lg);
    float *doutf = tl_normal(dt, (size_t)T * H, "dout", tag, 1.0);
    double *dout = tl_alloc((size_t)T * H, 8);
    to_double(dt, doutf, (size_t)T * H, dout);
    c.dout = dout;
    alloc_state(cfg, dt, T, &c.st);
    float *dx = tl_alloc((size_t)T * H, 4);
    tl_poison(dt, dx, (size_t)T * H);
    moe_error err = {0};
    assert_int_equal(cpu_block_forward(&w, dt, T, c.x, &c.st, &err), MOE_OK);
    c.ids0 = tl_alloc((size_t)T * cfg->top_k, 4);
    memcpy(c.ids0, c.st.topk_ids, (size_t)T * cfg->top_k * 4);
    if (cpu_block_backward(&w, dt, T, c.x, &c.st, doutf, dx, &g, &err) != MOE_OK)
        fail_msg("%s", err.msg);

    struct fd_target { const char *name; float *p; const void *grad; size_t rows, cols; } t[7] = {
        {"dx", c.x, dx, (size_t)T, (size_t)H},
        {"d router", w.router.data, g.router.data, (size_t)E, (size_t)H},
        {"d w13", w.w13.data, g.w13.data, (size_t)El * 2 * cfg->inter, (size_t)H},
        {"d w2", w.w2.data, g.w2.data, (size_t)El * H, (size_t)cfg->inter},
    };
    int nt = 4;
    if (has_shared(cfg)) {
        int Is = cfg->shared_inter;
        t[nt++] = (struct fd_target){"d shared_gate", w.shared_gate.data, g.shared_gate.data, (size_t)Is, (size_t)H};
        t[nt++] = (struct fd_target){"d shared_up", w.shared_up.data, g.shared_up.data, (size_t)Is, (size_t)H};
        t[nt++] = (struct fd_target){"d shared_down", w.shared_down.data, g.shared_down.data, (size_t)H, (size_t)Is};
    }
    const char *an0 = cfg->arch == MOE_ARCH_QWEN3 ? (cfg->norm_topk_prob ? "qwen3-norm" : "qwen3") : "llama4";
    char an[64];
    snprintf(an, sizeof an, "%s%s", an0, El < E ? " slice" : "");
    for (int i = 0; i < nt; i++) {
        size_t n = t[i].rows * t[i].cols;
        double *fd = tl_alloc(n, 8), *an_g = tl_alloc(n, 8);
        int skipped = 0;
        /* The slice's router gradient collects only the tokens routed into the slice: small
         * against the fp32 forward's rounding noise, which the differences divide by the step
         * (measured: error ~1/h, 4e-3 at h=1e-2, 2e-3 at 2e-2, 5e-4 at 5e-2 for one draw). The
         * logits tolerate the larger step (Richardson leaves O(h^4); steps that switch the
         * routing are skipped). */
        double h = t[i].p == w.router.data ? 5e-2 : 2e-2;
        fd_grad(&c, t[i].p, n, h, fd, &skipped);
        to_double(dt, t[i].grad, n, an_g);
        char what[96];
        snprintf(what, sizeof what, "%s FD %s", an, t[i].name);
        assert_true(fd_close(what, an_g, fd, t[i].rows, t[i].cols, 1e-3));
        free(fd);
        free(an_g);
    }
    free(c.x); free(doutf); free(dout); free(dx); free(c.ids0);
    moe_fwd_state_free(&c.st);
    free_weights(&w);
    free_weights(&g);
}

static void test_backward_fd_qwen3_norm(void **state)
{
    (void)state;
    moe_config c = qwen_cfg(12, 6, 6, 3, true);
    check_backward_fd(&c, 5, 11, 0, 6);
    check_backward_fd(&c, 5, 15, 2, 3); /* a slice of the experts */
}

static void test_backward_fd_qwen3_nonorm(void **state)
{
    (void)state;
    moe_config c = qwen_cfg(12, 6, 6, 3, false);
    check_backward_fd(&c, 5, 12, 0, 6);
    check_backward_fd(&c, 5, 16, 4, 2);
}

static void test_backward_fd_llama4(void **state)
{
    (void)state;
    moe_config c = llama_cfg(12, 6, 4, 2, 8);
    check_backward_fd(&c, 5, 13, 0, 4);
    check_backward_fd(&c, 5, 17, 1, 2);
    moe_config c1 = llama_cfg(10, 5, 3, 1, 6);
    check_backward_fd(&c1, 4, 14, 0, 3);
}

/* ---- backward in bf16 / fp16 against fp32 on the same inputs ---- */

typedef struct bwd_out {
    moe_weights g;
    void *dx;
    int32_t *ids;
} bwd_out;

static void run_fwd_bwd(const moe_config *cfg, moe_dtype dt, int T, const moe_weights *w32,
                        const float *x32, const float *dout32, bwd_out *o)
{
    moe_weights w;
    make_weights(cfg, dt, 0, cfg->num_experts, false, 0, 0, &w);
    moe_error err = {0};
    moe_tensor *src[6] = {(moe_tensor *)&w32->router, (moe_tensor *)&w32->w13, (moe_tensor *)&w32->w2,
                          (moe_tensor *)&w32->shared_gate, (moe_tensor *)&w32->shared_up, (moe_tensor *)&w32->shared_down};
    moe_tensor *dst[6] = {&w.router, &w.w13, &w.w2, &w.shared_gate, &w.shared_up, &w.shared_down};
    for (int i = 0; i < 6; i++)
        if (src[i]->data) assert_int_equal(moe_tensor_convert(src[i], dst[i], &err), MOE_OK);
    size_t n = (size_t)T * cfg->hidden, es = moe_dtype_size(dt);
    void *x = tl_alloc(n, es), *dout = tl_alloc(n, es);
    for (size_t i = 0; i < n; i++) {
        moe_store_elem(dt, x, i, x32[i]);
        moe_store_elem(dt, dout, i, dout32[i]);
    }
    make_weights(cfg, dt, 0, cfg->num_experts, false, 0, 0, &o->g);
    poison_weights(&o->g);
    o->dx = tl_alloc(n, es);
    tl_poison(dt, o->dx, n);
    moe_fwd_state st;
    alloc_state(cfg, dt, T, &st);
    assert_int_equal(cpu_block_forward(&w, dt, T, x, &st, &err), MOE_OK);
    if (cpu_block_backward(&w, dt, T, x, &st, dout, o->dx, &o->g, &err) != MOE_OK)
        fail_msg("%s", err.msg);
    o->ids = tl_alloc((size_t)T * cfg->top_k, 4);
    memcpy(o->ids, st.topk_ids, (size_t)T * cfg->top_k * 4);
    moe_fwd_state_free(&st);
    free_weights(&w);
    free(x);
    free(dout);
}

static void free_bwd(bwd_out *o)
{
    free_weights(&o->g);
    free(o->dx);
    free(o->ids);
}

static void cmp_grad(const char *what, moe_dtype dt, const void *a, const void *ref32,
                     size_t rows, size_t cols, double tol)
{
    size_t n = rows * cols;
    double *x = tl_alloc(n, 8), *y = tl_alloc(n, 8);
    to_double(dt, a, n, x);
    to_double(MOE_DTYPE_F32, ref32, n, y);
    /* Rows are measured against the larger of their own norm and the average row norm: a
     * row made of one token's small, cancelling values loses more than its share to the
     * roundings of the low-precision run. */
    assert_true(fd_close(what, x, y, rows, cols, tol));
    free(x);
    free(y);
}

static void check_low_precision_backward(const moe_config *cfg, int T, uint64_t tag)
{
    int H = cfg->hidden, E = cfg->num_experts, I = cfg->inter, Is = cfg->shared_inter;
    for (int d = 0; d < 2; d++) {
        moe_dtype dt = tl_dtypes[d];
        /* Inputs representable in dt, so both runs start from the same values. */
        for (int attempt = 0; attempt < 8; attempt++) {
            uint64_t tg = tag * 16 + (uint64_t)attempt;
            moe_weights w32;
            make_weights(cfg, dt, 0, E, true, tg, 2.0, &w32); /* rounded to dt ... */
            moe_weights w;
            make_weights(cfg, MOE_DTYPE_F32, 0, E, false, 0, 0, &w); /* ... then widened */
            moe_error err = {0};
            moe_tensor *s[6] = {&w32.router, &w32.w13, &w32.w2, &w32.shared_gate, &w32.shared_up, &w32.shared_down};
            moe_tensor *t[6] = {&w.router, &w.w13, &w.w2, &w.shared_gate, &w.shared_up, &w.shared_down};
            for (int i = 0; i < 6; i++)
                if (s[i]->data) assert_int_equal(moe_tensor_convert(s[i], t[i], &err), MOE_OK);
            float *x = tl_alloc((size_t)T * H, 4), *dout = tl_alloc((size_t)T * H, 4);
            void *xd = tl_normal(dt, (size_t)T * H, "x", tg, 1.0), *dd = tl_normal(dt, (size_t)T * H, "dout", tg, 1.0);
            for (size_t i = 0; i < (size_t)T * H; i++) {
                x[i] = (float)tl_ld(dt, xd, i);
                dout[i] = (float)tl_ld(dt, dd, i);
            }
            bwd_out lo, hi;
            run_fwd_bwd(cfg, dt, T, &w, x, dout, &lo);
            run_fwd_bwd(cfg, MOE_DTYPE_F32, T, &w, x, dout, &hi);
            bool same = memcmp(lo.ids, hi.ids, (size_t)T * cfg->top_k * 4) == 0;
            if (same) {
                /* Several roundings to dt lie between the two; a wrong formula or a missing
                 * term is far outside this. */
                double tol = dt == MOE_DTYPE_BF16 ? 3e-2 : 4e-3;
                char what[64];
                const char *dn = moe_dtype_name(dt);
                snprintf(what, sizeof what, "%s dx vs fp32", dn);
                cmp_grad(what, dt, lo.dx, hi.dx, (size_t)T, (size_t)H, tol);
                snprintf(what, sizeof what, "%s d router vs fp32", dn);
                cmp_grad(what, dt, lo.g.router.data, hi.g.router.data, (size_t)E, (size_t)H, tol);
                snprintf(what, sizeof what, "%s d w13 vs fp32", dn);
                cmp_grad(what, dt, lo.g.w13.data, hi.g.w13.data, (size_t)E * 2 * I, (size_t)H, tol);
                snprintf(what, sizeof what, "%s d w2 vs fp32", dn);
                cmp_grad(what, dt, lo.g.w2.data, hi.g.w2.data, (size_t)E * H, (size_t)I, tol);
                if (has_shared(cfg)) {
                    snprintf(what, sizeof what, "%s d shared_up vs fp32", dn);
                    cmp_grad(what, dt, lo.g.shared_up.data, hi.g.shared_up.data, (size_t)Is, (size_t)H, tol);
                    snprintf(what, sizeof what, "%s d shared_down vs fp32", dn);
                    cmp_grad(what, dt, lo.g.shared_down.data, hi.g.shared_down.data, (size_t)H, (size_t)Is, tol);
                }
            }
            free_bwd(&lo);
            free_bwd(&hi);
            free_weights(&w32);
            free_weights(&w);
            free(x); free(dout); free(xd); free(dd);
            if (same) break;
            assert_true(attempt < 7); /* routing differed every time: suspicious */
        }
    }
}

static void test_backward_low_precision(void **state)
{
    (void)state;
    moe_config q = qwen_cfg(64, 32, 8, 2, true);
    check_low_precision_backward(&q, 24, 21);
    q.norm_topk_prob = false;
    check_low_precision_backward(&q, 24, 22);
    moe_config l4 = llama_cfg(64, 32, 4, 1, 48);
    check_low_precision_backward(&l4, 24, 23);
}

/* ---- exact zeros, determinism ---- */

/* x > 0 and router row E-1 < 0: no token picks expert E-1; its gradients are exact zeros. */
static void test_unused_expert_exact_zero(void **state)
{
    (void)state;
    for (int a = 0; a < 3; a++) {
        moe_dtype dt = MOE_DTYPE_BF16;
        moe_config c = a == 2 ? llama_cfg(16, 8, 5, 2, 8) : qwen_cfg(16, 8, 5, 2, a == 0);
        int T = 9, H = c.hidden, E = c.num_experts, I = c.inter;
        moe_weights w, g;
        make_weights(&c, dt, 0, E, true, 30 + (uint64_t)a, 1.0, &w);
        for (int h = 0; h < H; h++) moe_store_elem(dt, w.router.data, (size_t)(E - 1) * H + h, -1.0);
        make_weights(&c, dt, 0, E, false, 0, 0, &g);
        poison_weights(&g);
        void *x = tl_uniform(dt, (size_t)T * H, "xpos", (uint64_t)a, 0.1, 1.0);
        void *dout = tl_normal(dt, (size_t)T * H, "dout", (uint64_t)a, 1.0);
        void *dx = tl_alloc((size_t)T * H, 2);
        moe_fwd_state st;
        alloc_state(&c, dt, T, &st);
        moe_error err = {0};
        assert_int_equal(cpu_block_forward(&w, dt, T, x, &st, &err), MOE_OK);
        assert_int_equal(st.token_counts[E - 1], 0);
        assert_int_equal(cpu_block_backward(&w, dt, T, x, &st, dout, dx, &g, &err), MOE_OK);
        const uint16_t *w13 = g.w13.data, *w2 = g.w2.data, *r = g.router.data;
        for (size_t i = 0; i < (size_t)2 * I * H; i++) assert_int_equal(w13[(size_t)(E - 1) * 2 * I * H + i], 0);
        for (size_t i = 0; i < (size_t)H * I; i++) assert_int_equal(w2[(size_t)(E - 1) * H * I + i], 0);
        /* The router row of an unpicked expert: zero with renormalisation and for Llama-4;
         * without renormalisation the softmax still gives it gradient. */
        bool any = false;
        for (int h = 0; h < H; h++) any |= (r[(size_t)(E - 1) * H + h] & 0x7fff) != 0;
        if (a == 1) assert_true(any);
        else
            for (int h = 0; h < H; h++) assert_int_equal(r[(size_t)(E - 1) * H + h], 0);
        free(x); free(dout); free(dx);
        moe_fwd_state_free(&st);
        free_weights(&w);
        free_weights(&g);
    }
}

static void test_determinism_threads(void **state)
{
    (void)state;
    int saved = omp_get_max_threads();
    for (int v = 0; v < 4; v++) {
        moe_dtype dt = v & 1 ? MOE_DTYPE_F32 : MOE_DTYPE_BF16;
        moe_config c = v & 2 ? llama_cfg(272, 100, 8, 2, 96) : qwen_cfg(272, 100, 8, 2, true);
        int T = 64, H = c.hidden, E = c.num_experts;
        size_t es = moe_dtype_size(dt);
        moe_weights w;
        make_weights(&c, dt, 0, E, true, 40 + (uint64_t)v, 2.0, &w);
        void *x = tl_normal(dt, (size_t)T * H, "x", 40 + (uint64_t)v, 1.0);
        void *dout = tl_normal(dt, (size_t)T * H, "dout", 40 + (uint64_t)v, 1.0);
        moe_weights g[3];
        void *dx[3];
        moe_fwd_state st[3];
        const int threads[3] = {1, 2, 3};
        for (int r = 0; r < 3; r++) {
            omp_set_num_threads(threads[r]);
            make_weights(&c, dt, 0, E, false, 0, 0, &g[r]);
            poison_weights(&g[r]);
            dx[r] = tl_alloc((size_t)T * H, es);
            alloc_state(&c, dt, T, &st[r]);
            moe_error err = {0};
            assert_int_equal(cpu_block_forward(&w, dt, T, x, &st[r], &err), MOE_OK);
            assert_int_equal(cpu_block_backward(&w, dt, T, x, &st[r], dout, dx[r], &g[r], &err), MOE_OK);
        }
        omp_set_num_threads(saved);
        int M = st[0].M, I = c.inter;
        for (int r = 1; r < 3; r++) {
            assert_true(tl_bits_equal(st[0].out, st[r].out, (size_t)T * H * es));
            assert_true(tl_bits_equal(st[0].router_logits, st[r].router_logits, (size_t)T * E * es));
            assert_true(tl_bits_equal(st[0].gather_idx, st[r].gather_idx, (size_t)M * 4));
            assert_true(tl_bits_equal(st[0].act, st[r].act, (size_t)M * I * es));
            assert_true(tl_bits_equal(st[0].gemm2_out, st[r].gemm2_out, (size_t)T * c.top_k * H * es));
            assert_true(tl_bits_equal(dx[0], dx[r], (size_t)T * H * es));
            assert_true(tl_bits_equal(g[0].router.data, g[r].router.data, g[0].router.nbytes));
            assert_true(tl_bits_equal(g[0].w13.data, g[r].w13.data, g[0].w13.nbytes));
            assert_true(tl_bits_equal(g[0].w2.data, g[r].w2.data, g[0].w2.nbytes));
            if (has_shared(&c))
                assert_true(tl_bits_equal(g[0].shared_gate.data, g[r].shared_gate.data, g[0].shared_gate.nbytes));
        }
        for (int r = 0; r < 3; r++) {
            free_weights(&g[r]);
            free(dx[r]);
            moe_fwd_state_free(&st[r]);
        }
        free_weights(&w);
        free(x);
        free(dout);
    }
}

/* ---- errors, T = 0, state ---- */

static void test_errors_and_empty(void **state)
{
    (void)state;
    moe_dtype dt = MOE_DTYPE_F32;
    moe_config c = qwen_cfg(8, 4, 4, 2, true);
    moe_weights w, g;
    make_weights(&c, dt, 0, 4, true, 50, 1.0, &w);
    make_weights(&c, dt, 0, 4, false, 0, 0, &g);
    int T = 3;
    float x[3 * 8] = {0}, dout[3 * 8] = {0}, dx[3 * 8];
    moe_fwd_state st;
    moe_error err = {0};
    assert_int_equal(moe_fwd_state_alloc(&c, dt, T, false, &st, &err), MOE_OK);
    assert_null(st.gemm1_out);
    assert_int_equal(cpu_block_forward(&w, dt, T, x, &st, &err), MOE_OK);
    /* backward needs gemm1_out */
    assert_int_equal(cpu_block_backward(&w, dt, T, x, &st, dout, dx, &g, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "gemm1_out"));
    /* T mismatch */
    assert_int_equal(cpu_block_forward(&w, dt, T + 1, x, &st, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "T = 3"));
    /* activation dtype differs from the weights' */
    assert_int_equal(cpu_block_forward(&w, MOE_DTYPE_BF16, T, x, &st, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "weights are fp32"));
    /* missing state buffer */
    void *keep = st.act;
    st.act = NULL;
    assert_int_equal(cpu_block_forward(&w, dt, T, x, &st, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "act"));
    st.act = keep;
    /* a mis-shaped weight names the tensor */
    w.w2.shape[1] = 9;
    assert_int_equal(cpu_block_forward(&w, dt, T, x, &st, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "weights.w2"));
    w.w2.shape[1] = 8;
    moe_fwd_state_free(&st);
    assert_null(st.out);

    /* a slice of the experts needs gradients of the slice's shape */
    moe_weights ws;
    make_weights(&c, dt, 1, 2, true, 51, 1.0, &ws);
    assert_int_equal(moe_fwd_state_alloc(&c, dt, T, true, &st, &err), MOE_OK);
    assert_int_equal(cpu_block_forward(&ws, dt, T, x, &st, &err), MOE_OK);
    assert_int_equal(cpu_block_backward(&ws, dt, T, x, &st, dout, dx, &g, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "grads.w13"));
    /* grads of the wrong shape */
    g.w13.shape[0] = 3;
    assert_int_equal(cpu_block_forward(&w, dt, T, x, &st, &err), MOE_OK);
    assert_int_equal(cpu_block_backward(&w, dt, T, x, &st, dout, dx, &g, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "grads.w13"));
    g.w13.shape[0] = 4;
    moe_fwd_state_free(&st);

    /* T = 0: both directions succeed; gradients are zero */
    assert_int_equal(moe_fwd_state_alloc(&c, dt, 0, true, &st, &err), MOE_OK);
    assert_int_equal(cpu_block_forward(&w, dt, 0, NULL, &st, &err), MOE_OK);
    assert_int_equal(st.M, 0);
    poison_weights(&g);
    assert_int_equal(cpu_block_backward(&w, dt, 0, NULL, &st, NULL, NULL, &g, &err), MOE_OK);
    for (size_t i = 0; i < moe_tensor_numel(&g.w13); i++) assert_true(((float *)g.w13.data)[i] == 0.0f);
    moe_fwd_state_free(&st);

    /* state: bad arguments; poison fills NaN / -1 */
    assert_int_equal(moe_fwd_state_alloc(&c, dt, -1, true, &st, &err), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_fwd_state_alloc(&c, MOE_DTYPE_I32, 2, true, &st, &err), MOE_ERR_UNSUPPORTED);
    moe_config l4 = llama_cfg(8, 4, 4, 1, 6);
    assert_int_equal(moe_fwd_state_alloc(&l4, MOE_DTYPE_BF16, 2, true, &st, &err), MOE_OK);
    assert_non_null(st.shared_out);
    moe_fwd_state_poison(&l4, MOE_DTYPE_BF16, &st);
    assert_true(isnan(tl_ld(MOE_DTYPE_BF16, st.shared_out, 2 * 8 - 1)));
    assert_true(isnan(tl_ld(MOE_DTYPE_BF16, st.gemm1_out, 2 * 1 * 8 - 1)));
    assert_int_equal(st.gather_idx[1], -1);
    assert_int_equal(st.expert_offsets[4], -1);
    moe_fwd_state_free(&st);
    moe_fwd_state_free(&st); /* twice is safe */

    free_weights(&w);
    free_weights(&g);
    free_weights(&ws);
}

int main(void)
{
    moe_test_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_stages),
        cmocka_unit_test(test_backward_fd_qwen3_norm),
        cmocka_unit_test(test_backward_fd_qwen3_nonorm),
        cmocka_unit_test(test_backward_fd_llama4),
        cmocka_unit_test(test_backward_low_precision),
        cmocka_unit_test(test_unused_expert_exact_zero),
        cmocka_unit_test(test_determinism_threads),
        cmocka_unit_test(test_errors_and_empty),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
