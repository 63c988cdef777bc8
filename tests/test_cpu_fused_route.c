/*
 * test_cpu_fused_route.c — the fused path's routing and row-wise stages against the test's own
 * loops: router logits; top-k for Qwen3 (norm on/off) and Llama-4 with exact ties (lower id
 * wins) and NaN rows; the histogram and the stable counting sort, with a slice of the experts;
 * the sum over k (bitwise equal to the documented order, identical for any thread count); the
 * SiLU-and-mul backward; the backward of the top-k weight multiply and of the input scaling;
 * and the router backward against central differences of the test's double routing.
 */
#include <omp.h>

#include "cpu_fused_testlib.h"
#include "cpu/cpu_fused.h"

static moe_config make_cfg(moe_arch arch, int E, int k, bool norm)
{
    moe_config c;
    memset(&c, 0, sizeof c);
    c.arch = arch;
    c.num_experts = E;
    c.top_k = k;
    c.norm_topk_prob = norm;
    c.hidden = 8;
    c.inter = 8;
    return c;
}

static void test_router_logits(void **state)
{
    (void)state;
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = tl_dtypes[d];
        int T = 19, H = 131, E = 9;
        void *x = tl_normal(dt, (size_t)T * H, "x", (uint64_t)d, 1);
        void *r = tl_normal(dt, (size_t)E * H, "router", (uint64_t)d, 0.1);
        void *l = tl_alloc((size_t)T * E, moe_dtype_size(dt));
        tl_poison(dt, l, (size_t)T * E);
        moe_error err = {0};
        assert_int_equal(cpu_router_logits(dt, T, H, E, x, r, l, &err), MOE_OK);
        double *ref = tl_alloc((size_t)T * E, sizeof(double)), *got = tl_alloc((size_t)T * E, sizeof(double));
        for (int t = 0; t < T; t++)
            for (int e = 0; e < E; e++) {
                double v = 0;
                for (int h = 0; h < H; h++)
                    v += tl_ld(dt, x, (size_t)t * H + h) * tl_ld(dt, r, (size_t)e * H + h);
                ref[t * E + e] = v;
                got[t * E + e] = tl_ld(dt, l, (size_t)t * E + e);
            }
        assert_true(tl_check_rounded("router logits", dt, got, ref, (size_t)T, (size_t)E));
        free(x); free(r); free(l); free(ref); free(got);
    }
}

/* Logits on a coarse grid (multiples of 1/4), so exact ties are everywhere. */
static void check_topk(const moe_config *c, moe_dtype dt, int T, const void *logits)
{
    int E = c->num_experts, k = c->top_k;
    int32_t *ids = tl_alloc((size_t)T * k, sizeof(int32_t));
    void *w = tl_alloc((size_t)T * k, moe_dtype_size(dt));
    memset(ids, 0xff, (size_t)T * k * sizeof(int32_t));
    tl_poison(dt, w, (size_t)T * k);
    moe_error err = {0};
    assert_int_equal(cpu_route_topk(c, dt, T, logits, ids, w, &err), MOE_OK);
    double *l = tl_alloc((size_t)E, sizeof(double)), *rw = tl_alloc((size_t)k, sizeof(double));
    int32_t *rid = tl_alloc((size_t)k, sizeof(int32_t));
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++) l[e] = tl_ld(dt, logits, (size_t)t * E + e);
        tl_route_row(c, l, rid, rw);
        for (int j = 0; j < k; j++) {
            if (ids[t * k + j] != rid[j])
                fail_msg("%s %s token %d choice %d: id %d, expected %d",
                         c->arch == MOE_ARCH_QWEN3 ? "qwen3" : "llama4", moe_dtype_name(dt), t,
                         j, ids[t * k + j], rid[j]);
            double got = tl_ld(dt, w, (size_t)t * k + j);
            /* fp32 softmax / sigmoid, rounded once to dt: within one ulp of the exact value. */
            if (fabs(got - rw[j]) > tl_ulp_tol(dt) * fabs(rw[j]) + 1e-30)
                fail_msg("token %d choice %d: weight %.9g, expected %.9g", t, j, got, rw[j]);
        }
    }
    free(ids); free(w); free(l); free(rw); free(rid);
}

static void test_route_topk_ties(void **state)
{
    (void)state;
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = tl_dtypes[d];
        int T = 200, E = 13;
        void *logits = tl_alloc((size_t)T * E, moe_dtype_size(dt));
        uint64_t s = tl_stream("grid", (uint64_t)d);
        for (size_t i = 0; i < (size_t)T * E; i++)
            moe_store_elem(dt, logits, i, (double)((int)(moe_rng_u64(s, i) % 9) - 4) * 0.25);
        /* Token 0: all equal -> ids 0..k-1; token 1: descending id values equal in pairs. */
        for (int e = 0; e < E; e++) {
            moe_store_elem(dt, logits, (size_t)e, 0.5);
            moe_store_elem(dt, logits, (size_t)E + e, (double)((E - e) / 2));
        }
        for (int k = 1; k <= 4; k += 3) {
            moe_config q = make_cfg(MOE_ARCH_QWEN3, E, k, true);
            check_topk(&q, dt, T, logits);
            q.norm_topk_prob = false;
            check_topk(&q, dt, T, logits);
            moe_config l4 = make_cfg(MOE_ARCH_LLAMA4, E, k, false);
            check_topk(&l4, dt, T, logits);
        }
        /* Explicit: all ties pick the lowest ids, in order. */
        moe_config q = make_cfg(MOE_ARCH_QWEN3, E, 4, true);
        int32_t ids[4];
        void *w = tl_alloc(4, moe_dtype_size(dt));
        moe_error err = {0};
        assert_int_equal(cpu_route_topk(&q, dt, 1, logits, ids, w, &err), MOE_OK);
        for (int j = 0; j < 4; j++) assert_int_equal(ids[j], j);
        for (int j = 0; j < 4; j++) assert_true(tl_ld(dt, w, (size_t)j) == 0.25);
        free(w);
        free(logits);
    }
}

/* A NaN in a row must not break the selection: k distinct valid ids, NaN ranked last. */
static void test_route_topk_nan(void **state)
{
    (void)state;
    float l[6] = {0.5f, NAN, 2.0f, NAN, -1.0f, 0.5f};
    moe_config c = make_cfg(MOE_ARCH_LLAMA4, 6, 5, false);
    int32_t ids[5];
    float w[5];
    moe_error err = {0};
    assert_int_equal(cpu_route_topk(&c, MOE_DTYPE_F32, 1, l, ids, w, &err), MOE_OK);
    int want[5] = {2, 0, 5, 4, 1};
    for (int j = 0; j < 5; j++) assert_int_equal(ids[j], want[j]);
    moe_config bad = make_cfg(MOE_ARCH_QWEN3, 4, 5, true);
    assert_int_equal(cpu_route_topk(&bad, MOE_DTYPE_F32, 1, l, ids, w, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "top_k"));
}

static void test_sort_by_expert(void **state)
{
    (void)state;
    int T = 97, k = 3, E = 11, flat = T * k;
    int32_t *ids = tl_alloc((size_t)flat, sizeof(int32_t));
    uint64_t s = tl_stream("sort", 0);
    for (int f = 0; f < flat; f++) ids[f] = (int32_t)(moe_rng_u64(s, (uint64_t)f) % 10); /* 10 unused */
    const int begins[3] = {0, 3, 9}, counts[3] = {11, 4, 2};
    for (int c = 0; c < 3; c++) {
        int b = begins[c], El = counts[c];
        int32_t *cnt = tl_alloc((size_t)E, 4), *off = tl_alloc((size_t)E + 1, 4), *g = tl_alloc((size_t)flat, 4);
        int32_t *rc = tl_alloc((size_t)E, 4), *ro = tl_alloc((size_t)E + 1, 4), *rg = tl_alloc((size_t)flat, 4);
        memset(g, 0x5a, (size_t)flat * 4);
        int M = cpu_sort_by_expert(T, k, ids, b, El, cnt, off, g);
        int rM = tl_expert_order(ids, flat, b, El, rc, ro, rg);
        assert_int_equal(M, rM);
        for (int e = 0; e < El; e++) assert_int_equal(cnt[e], rc[e]);
        for (int e = 0; e <= El; e++) assert_int_equal(off[e], ro[e]);
        for (int r = 0; r < M; r++) assert_int_equal(g[r], rg[r]); /* stable: ascending f */
        for (int r = M; r < flat; r++) assert_int_equal(g[r], -1);  /* -1 past M */
        if (El == 2) assert_int_equal(cnt[1], 0);                  /* expert 10: empty */
        free(cnt); free(off); free(g); free(rc); free(ro); free(rg);
    }
    free(ids);
}

/* The sum over k in the documented order, bit for bit: acc = add (or 0), then += row_j * s_j
 * for j = 0..k-1 in fp32, rounded once. */
static void test_sum_topk(void **state)
{
    (void)state;
    for (int d = 0; d < 3; d++)
        for (int v = 0; v < 4; v++) {
            moe_dtype dt = tl_dtypes[d];
            bool scale = v & 1, add = v & 2;
            int T = 64, k = 4, N = 600; /* large enough to run in parallel */
            size_t es = moe_dtype_size(dt);
            uint64_t tag = (uint64_t)(d * 4 + v);
            void *rows = tl_normal(dt, (size_t)T * k * N, "rows", tag, 1);
            void *sc = tl_uniform(dt, (size_t)T * k, "scale", tag, 0, 1);
            void *ad = tl_normal(dt, (size_t)T * N, "add", tag, 1);
            void *o1 = tl_alloc((size_t)T * N, es), *o2 = tl_alloc((size_t)T * N, es);
            tl_poison(dt, o1, (size_t)T * N);
            int saved = omp_get_max_threads();
            omp_set_num_threads(1);
            cpu_sum_topk(dt, T, k, N, rows, scale ? sc : NULL, add ? ad : NULL, o1);
            omp_set_num_threads(2);
            cpu_sum_topk(dt, T, k, N, rows, scale ? sc : NULL, add ? ad : NULL, o2);
            omp_set_num_threads(saved);
            assert_true(tl_bits_equal(o1, o2, (size_t)T * N * es));
            for (int t = 0; t < T; t++)
                for (int n = 0; n < N; n++) {
                    float acc = add ? (float)tl_ld(dt, ad, (size_t)t * N + n) : 0.0f;
                    for (int j = 0; j < k; j++) {
                        float x = (float)tl_ld(dt, rows, ((size_t)t * k + j) * N + n);
                        if (scale) x *= (float)tl_ld(dt, sc, (size_t)t * k + j);
                        acc += x;
                    }
                    double want = moe_round_to(dt, acc);
                    if (tl_ld(dt, o1, (size_t)t * N + n) != want)
                        fail_msg("%s scale%d add%d [%d,%d]: %.9g vs %.9g", moe_dtype_name(dt),
                                 scale, add, t, n, tl_ld(dt, o1, (size_t)t * N + n), want);
                }
            /* in place (out aliases add) gives the same */
            if (add) {
                cpu_sum_topk(dt, T, k, N, rows, scale ? sc : NULL, ad, ad);
                assert_true(tl_bits_equal(o1, ad, (size_t)T * N * es));
            }
            free(rows); free(sc); free(ad); free(o1); free(o2);
        }
}

static void test_silu_mul_backward(void **state)
{
    (void)state;
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = tl_dtypes[d];
        int M = 23, I = 37;
        void *gu = tl_normal(dt, (size_t)M * 2 * I, "gu", (uint64_t)d, 3);
        void *da = tl_normal(dt, (size_t)M * I, "dact", (uint64_t)d, 1);
        void *dgu = tl_alloc((size_t)M * 2 * I, moe_dtype_size(dt));
        tl_poison(dt, dgu, (size_t)M * 2 * I);
        cpu_silu_mul_backward(dt, M, I, gu, da, dgu);
        double *ref = tl_alloc((size_t)M * 2 * I, sizeof(double)), *got = tl_alloc((size_t)M * 2 * I, sizeof(double));
        for (int r = 0; r < M; r++)
            for (int i = 0; i < I; i++) {
                double g = tl_ld(dt, gu, (size_t)r * 2 * I + i), u = tl_ld(dt, gu, (size_t)r * 2 * I + I + i);
                double a = tl_ld(dt, da, (size_t)r * I + i);
                /* derivative of silu by central difference in double, independent of the
                 * closed form used by the code */
                double h = 1e-6;
                double ds = (tl_silu(g + h) - tl_silu(g - h)) / (2 * h);
                ref[(size_t)r * 2 * I + i] = a * u * ds;
                ref[(size_t)r * 2 * I + I + i] = a * tl_silu(g);
            }
        for (size_t i = 0; i < (size_t)M * 2 * I; i++) got[i] = tl_ld(dt, dgu, i);
        double tol = moe_test_tol(dt, true);
        assert_true(moe_test_close("silu-mul backward", got, ref, (size_t)M, (size_t)2 * I, tol));
        free(gu); free(da); free(dgu); free(ref); free(got);
    }
}

static void test_weight_and_scale_backward(void **state)
{
    (void)state;
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = tl_dtypes[d];
        int T = 11, k = 3, flat = T * k, I = 29, H = 41;
        /* expert order: a permutation of the flat indices */
        int32_t *g = tl_alloc((size_t)flat, 4);
        for (int r = 0; r < flat; r++) g[r] = (r * 7) % flat;
        void *act = tl_normal(dt, (size_t)flat * I, "act", (uint64_t)d, 1);
        void *dA0 = tl_normal(dt, (size_t)flat * I, "dA0", (uint64_t)d, 1);
        void *w = tl_uniform(dt, (size_t)flat, "w", (uint64_t)d, 0, 1);
        float *dw = tl_alloc((size_t)flat, sizeof(float));
        void *dact = tl_alloc((size_t)flat * I, moe_dtype_size(dt));
        for (int f = 0; f < flat; f++) dw[f] = NAN;
        cpu_topk_weight_backward(dt, flat, I, g, act, dA0, w, dw, dact);
        double *rdw = tl_alloc((size_t)flat, 8), *gdw = tl_alloc((size_t)flat, 8);
        double *rda = tl_alloc((size_t)flat * I, 8), *gda = tl_alloc((size_t)flat * I, 8);
        for (int r = 0; r < flat; r++) {
            double s = 0;
            for (int i = 0; i < I; i++) {
                double a0 = tl_ld(dt, dA0, (size_t)r * I + i);
                s += tl_ld(dt, act, (size_t)r * I + i) * a0;
                rda[(size_t)r * I + i] = tl_ld(dt, w, (size_t)g[r]) * a0;
                gda[(size_t)r * I + i] = tl_ld(dt, dact, (size_t)r * I + i);
            }
            rdw[g[r]] = s;
            gdw[g[r]] = dw[g[r]];
        }
        assert_true(moe_test_close("d topk weight", gdw, rdw, 1, (size_t)flat, 1e-5));
        assert_true(tl_check_rounded("d act = w dA0", dt, gda, rda, (size_t)flat, (size_t)I));

        void *x = tl_normal(dt, (size_t)T * H, "x", (uint64_t)d, 1);
        void *dxs = tl_normal(dt, (size_t)flat * H, "dxs", (uint64_t)d, 1);
        float *ds = tl_alloc((size_t)flat, sizeof(float));
        cpu_scale_input_backward(dt, T, k, H, x, dxs, ds);
        double *rds = tl_alloc((size_t)flat, 8), *gds = tl_alloc((size_t)flat, 8);
        for (int f = 0; f < flat; f++) {
            double s = 0;
            for (int h = 0; h < H; h++)
                s += tl_ld(dt, dxs, (size_t)f * H + h) * tl_ld(dt, x, (size_t)(f / k) * H + h);
            rds[f] = s;
            gds[f] = ds[f];
        }
        assert_true(moe_test_close("d score", gds, rds, 1, (size_t)flat, 1e-5));
        free(g); free(act); free(dA0); free(w); free(dw); free(dact); free(rdw); free(gdw);
        free(rda); free(gda); free(x); free(dxs); free(ds); free(rds); free(gds);
    }
}

/* L(l) = sum_j dw_j * w_j(l) with the test's double routing (ids fixed by the unperturbed
 * logits; the step is far smaller than any gap between logits). */
static double route_loss(const moe_config *c, const double *l, const double *dw)
{
    int k = c->top_k;
    int32_t ids[16];
    double w[16];
    tl_route_row(c, l, ids, w);
    double s = 0;
    for (int j = 0; j < k; j++) s += dw[j] * w[j];
    return s;
}

static void check_route_backward(const moe_config *c, moe_dtype dt, uint64_t tag)
{
    int T = 17, E = c->num_experts, k = c->top_k;
    void *logits = tl_alloc((size_t)T * E, moe_dtype_size(dt));
    uint64_t s = tl_stream("rl", tag);
    /* Distinct values: a random permutation of a grid with gaps far above the FD step. */
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            int slot = (int)((e * 5 + moe_rng_u64(s, (uint64_t)t)) % (uint64_t)E);
            moe_store_elem(dt, logits, (size_t)t * E + e, -1.5 + 0.25 * slot + 0.07 * (t % 5));
        }
    int32_t *ids = tl_alloc((size_t)T * k, 4);
    void *w = tl_alloc((size_t)T * k, moe_dtype_size(dt));
    moe_error err = {0};
    assert_int_equal(cpu_route_topk(c, dt, T, logits, ids, w, &err), MOE_OK);
    float *dtop = tl_alloc((size_t)T * k, sizeof(float));
    for (int i = 0; i < T * k; i++) dtop[i] = (float)moe_round_to(dt, moe_rng_normal(s, 1000 + (uint64_t)i));
    void *dl = tl_alloc((size_t)T * E, moe_dtype_size(dt));
    tl_poison(dt, dl, (size_t)T * E);
    assert_int_equal(cpu_route_backward(c, dt, T, logits, ids, dtop, dl, &err), MOE_OK);
    double *got = tl_alloc((size_t)T * E, 8), *ref = tl_alloc((size_t)T * E, 8);
    double *l = tl_alloc((size_t)E, 8), dw[16] = {0};
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++) l[e] = tl_ld(dt, logits, (size_t)t * E + e);
        for (int j = 0; j < k; j++) dw[j] = dtop[t * k + j];
        for (int e = 0; e < E; e++) {
            double h = 1e-6, keep = l[e];
            l[e] = keep + h;
            double lp = route_loss(c, l, dw);
            l[e] = keep - h;
            double lm = route_loss(c, l, dw);
            l[e] = keep;
            ref[t * E + e] = (lp - lm) / (2 * h);
            got[t * E + e] = tl_ld(dt, dl, (size_t)t * E + e);
            bool selected = false;
            for (int j = 0; j < k; j++) selected |= ids[t * k + j] == e;
            /* Unselected logits: exactly zero for Qwen3 with norm and for Llama-4; with
             * Qwen3 without norm they carry the softmax's gradient. */
            if (!selected && (c->arch == MOE_ARCH_LLAMA4 || c->norm_topk_prob))
                assert_true(got[t * E + e] == 0.0);
            if (!selected && c->arch == MOE_ARCH_QWEN3 && !c->norm_topk_prob)
                assert_true(got[t * E + e] != 0.0);
        }
    }
    char what[64];
    snprintf(what, sizeof what, "dlogits %s %s norm%d", c->arch == MOE_ARCH_QWEN3 ? "qwen3" : "llama4",
             moe_dtype_name(dt), c->norm_topk_prob);
    assert_true(moe_test_close(what, got, ref, (size_t)T, (size_t)E, moe_test_tol(dt, true)));
    free(logits); free(ids); free(w); free(dtop); free(dl); free(got); free(ref); free(l);
}

static void test_route_backward(void **state)
{
    (void)state;
    for (int d = 0; d < 3; d++) {
        moe_config q = make_cfg(MOE_ARCH_QWEN3, 12, 4, true);
        check_route_backward(&q, tl_dtypes[d], 10 + (uint64_t)d);
        q.norm_topk_prob = false;
        check_route_backward(&q, tl_dtypes[d], 20 + (uint64_t)d);
        moe_config l4 = make_cfg(MOE_ARCH_LLAMA4, 7, 2, false);
        check_route_backward(&l4, tl_dtypes[d], 30 + (uint64_t)d);
        l4.top_k = 1;
        check_route_backward(&l4, tl_dtypes[d], 40 + (uint64_t)d);
    }
}

int main(void)
{
    moe_test_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_router_logits),
        cmocka_unit_test(test_route_topk_ties),
        cmocka_unit_test(test_route_topk_nan),
        cmocka_unit_test(test_sort_by_expert),
        cmocka_unit_test(test_sum_topk),
        cmocka_unit_test(test_silu_mul_backward),
        cmocka_unit_test(test_weight_and_scale_backward),
        cmocka_unit_test(test_route_backward),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
