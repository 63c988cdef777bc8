/*
 * test_cpu_fused_gemm.c — the CPU fused path's GEMM stages against the test's own loops in
 * double: the grouped GEMM with every flag combination (permute_x, permute_y, b_kn, scale_a,
 * scale_c, SiLU-and-mul, C_preact), empty experts, one expert taking every row, sizes that are
 * multiples of nothing and sizes that cross the tiles; the grouped weight gradient with its
 * permute / scale flags and exact zeros for empty experts; the plain GEMM; argument rejection;
 * and the inline element conversions against dtype.c, bit for bit.
 */
#include <omp.h>

#include "cpu_fused_testlib.h"
#include "cpu/cpu_fused.h"
#include "cpu/cpu_fused_internal.h"

/* ---- element conversions: the inline twins must equal dtype.c bit for bit ---- */

static void test_conversions_match_dtype_c(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float a = cf_bf16_to_f32((uint16_t)h), b = moe_bf16_to_f32((moe_bf16)h);
        assert_true(memcmp(&a, &b, 4) == 0);
        a = cf_f16_to_f32((uint16_t)h);
        b = moe_f16_to_f32((moe_f16)h);
        if (memcmp(&a, &b, 4) != 0) fail_msg("f16 0x%04x: %a vs %a", h, a, b);
    }
    /* Every float whose low 13 bits are one of a few patterns (ties, just below / above a
     * tie, zero), over all exponents and signs, plus random floats. */
    const uint32_t lows[] = {0, 1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x7fff, 0x8000, 0x8001};
    uint64_t s = tl_stream("conv", 1);
    for (uint64_t i = 0; i < (1u << 22); i++) {
        uint32_t u;
        if (i < (1u << 19)) {
            u = (uint32_t)(i >> 4) << 13 | lows[(i & 15) % 9];
            u ^= (uint32_t)(i & 8) << 28;
        } else {
            u = (uint32_t)moe_rng_u64(s, i);
        }
        float f;
        memcpy(&f, &u, 4);
        uint16_t x = cf_f32_to_bf16(f), y = moe_f32_to_bf16(f);
        if (x != y) fail_msg("bf16 of 0x%08x: 0x%04x vs 0x%04x", u, x, y);
        x = cf_f32_to_f16(f);
        y = moe_f32_to_f16(f);
        if (x != y) fail_msg("f16 of 0x%08x: 0x%04x vs 0x%04x", u, x, y);
    }
}

/* ---- grouped GEMM ---- */

typedef struct gshape {
    int E, begin, El; /* experts: ids in [0,E), local [begin, begin+El) */
    int N, K, T, k;
    int skew;         /* 0: random ids; 1: every row to local expert 0 (others empty) */
} gshape;

typedef struct gflags {
    bool px, py, bkn, sa, sc, silu, preact;
} gflags;

typedef struct groute {
    int flat, M;
    int32_t *ids, *offsets, *gather;
} groute;

static groute make_route(const gshape *s, uint64_t tag)
{
    groute r;
    r.flat = s->T * s->k;
    r.ids = tl_alloc((size_t)r.flat, sizeof(int32_t));
    r.offsets = tl_alloc((size_t)s->El + 1, sizeof(int32_t));
    r.gather = tl_alloc((size_t)r.flat, sizeof(int32_t));
    uint64_t st = tl_stream("ids", tag), draw = 0;
    for (int f = 0; f < r.flat; f++) {
        /* Leave experts begin+1 and E-1 empty (when El > 2) so empty groups are exercised. */
        int e;
        do e = (int)(moe_rng_u64(st, draw++) % (uint64_t)s->E);
        while (s->El > 2 && (e == s->begin + 1 || e == s->E - 1));
        r.ids[f] = s->skew ? s->begin : e;
    }
    r.M = tl_expert_order(r.ids, r.flat, s->begin, s->El, NULL, r.offsets, r.gather);
    return r;
}

static void free_route(groute *r)
{
    free(r->ids);
    free(r->offsets);
    free(r->gather);
}

static int expert_of_row(const groute *r, int El, int row)
{
    for (int e = 0; e < El; e++)
        if (row < r->offsets[e + 1]) return e;
    return -1;
}

/* The inputs of one shape, drawn once and shared by every flag combination: A has T*k rows
 * (enough for token order [T,K] and expert order [M,K]); B reads as [El,N,K] or [El,K,N]. */
typedef struct gdata {
    moe_dtype dt;
    groute rt;
    void *A, *B, *sa, *sc;
} gdata;

static gdata make_data(moe_dtype dt, const gshape *s, uint64_t tag)
{
    gdata d = {.dt = dt, .rt = make_route(s, tag)};
    d.A = tl_normal(dt, (size_t)d.rt.flat * s->K, "A", tag, 1.0);
    d.B = tl_normal(dt, (size_t)s->El * s->N * s->K, "B", tag, 1.0 / sqrt(s->K));
    d.sa = tl_uniform(dt, (size_t)d.rt.flat, "sa", tag, 0.1, 1.5);
    d.sc = tl_uniform(dt, (size_t)d.rt.flat, "sc", tag, 0.1, 1.5);
    return d;
}

static void free_data(gdata *d)
{
    free(d->A); free(d->B); free(d->sa); free(d->sc);
    free_route(&d->rt);
}

/* One grouped-GEMM case: run the fused stage, recompute in double, compare; with both
 * permutations (or C_preact without SiLU-and-mul), check the rejection instead. */
static void run_gemm_case(const gdata *d, const gshape *s, const gflags *f)
{
    moe_dtype dt = d->dt;
    const groute *rt = &d->rt;
    const void *A = d->A, *B = d->B, *sa = d->sa, *sc = d->sc;
    int N = s->N, K = s->K, I = N / 2;
    int nout = f->silu ? I : N;
    size_t crows = f->py ? (size_t)rt->flat : (size_t)rt->M;
    size_t es = moe_dtype_size(dt);
    void *C = tl_alloc(crows * nout, es);
    void *P = tl_alloc(crows * N, es);
    tl_poison(dt, C, crows * nout);
    tl_poison(dt, P, crows * N);

    moe_grouped_gemm_args a = {
        .dtype = dt, .num_experts = s->El, .expert_offsets = rt->offsets, .N = N, .K = K,
        .topk = s->k, .max_rows = rt->flat, .gather_idx = rt->gather, .A = A, .B = B,
        .b_kn = f->bkn, .C = C, .C_preact = f->preact ? P : NULL, .permute_x = f->px,
        .permute_y = f->py, .scale_a_rows = f->sa ? sa : NULL,
        .scale_c_rows = f->sc ? sc : NULL,
        .epilogue = f->silu ? MOE_EPI_SILU_MUL : MOE_EPI_NONE,
    };
    moe_error err = {0};
    moe_status st = cpu_grouped_gemm(&a, &err);
    if ((f->px && f->py) || (f->preact && !f->silu) || (f->silu && f->sc)) {
        assert_int_equal(st, MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(err.msg, f->px && f->py ? "permute_x and permute_y"
                                        : f->silu ? "scale_c_rows" : "C_preact"));
        for (size_t i = 0; i < crows * nout; i++) assert_true(tl_is_poison(dt, C, i));
        goto out;
    }
    if (st != MOE_OK) fail_msg("cpu_grouped_gemm: %s", err.msg);

    {
        double *got = tl_alloc((size_t)rt->M * nout + 1, sizeof(double));
        double *ref = tl_alloc((size_t)rt->M * nout + 1, sizeof(double));
        double *gotp = tl_alloc((size_t)rt->M * N + 1, sizeof(double));
        double *refp = tl_alloc((size_t)rt->M * N + 1, sizeof(double));
        double *arow = tl_alloc((size_t)K, sizeof(double));
        double *acc = tl_alloc((size_t)N, sizeof(double));
        bool *mapped = calloc(crows + 1, 1);
        for (int r = 0; r < rt->M; r++) {
            int e = expert_of_row(rt, s->El, r);
            int fl = rt->gather[r];
            size_t src = f->px ? (size_t)(fl / s->k) : (size_t)r;
            for (int kk = 0; kk < K; kk++) {
                arow[kk] = tl_ld(dt, A, src * K + kk);
                if (f->sa) arow[kk] = moe_round_to(dt, arow[kk] * tl_ld(dt, sa, (size_t)fl));
            }
            for (int n = 0; n < N; n++) {
                double v = 0;
                for (int kk = 0; kk < K; kk++) {
                    size_t bi = f->bkn ? ((size_t)e * K + kk) * N + n : ((size_t)e * N + n) * K + kk;
                    v += arow[kk] * tl_ld(dt, B, bi);
                }
                acc[n] = v;
            }
            double scv = f->sc ? tl_ld(dt, sc, (size_t)fl) : 1.0;
            size_t crow = f->py ? (size_t)fl : (size_t)r;
            mapped[crow] = true;
            for (int n = 0; n < nout; n++) {
                ref[(size_t)r * nout + n] = f->silu ? tl_silu(acc[n]) * acc[I + n] : acc[n] * scv;
                got[(size_t)r * nout + n] = tl_ld(dt, C, crow * nout + n);
            }
            for (int n = 0; n < N; n++) {
                refp[(size_t)r * N + n] = acc[n];
                gotp[(size_t)r * N + n] = tl_ld(dt, P, crow * N + n);
            }
        }
        char what[160];
        snprintf(what, sizeof what, "%s px%d py%d bkn%d sa%d sc%d silu%d pre%d N%d K%d M%d",
                 moe_dtype_name(dt), f->px, f->py, f->bkn, f->sa, f->sc, f->silu, f->preact, N,
                 K, rt->M);
        if (rt->M > 0)
            assert_true(tl_check_rounded(what, dt, got, ref, (size_t)rt->M, (size_t)nout));
        if (f->preact && rt->M > 0)
            assert_true(tl_check_rounded("  C_preact", dt, gotp, refp, (size_t)rt->M, (size_t)N));
        /* Rows nobody maps to stay untouched (still poison). */
        for (size_t cr = 0; cr < crows; cr++) {
            if (mapped[cr]) continue;
            for (int n = 0; n < nout; n++) assert_true(tl_is_poison(dt, C, cr * nout + n));
            if (f->preact)
                for (int n = 0; n < N; n++) assert_true(tl_is_poison(dt, P, cr * N + n));
        }
        free(got); free(ref); free(gotp); free(refp); free(arow); free(acc); free(mapped);
    }
out:
    free(C); free(P);
}

/* every: all 128 combinations; else the 64 with scale_a == scale_c (keeps big cases fast). */
static void run_all_flags(moe_dtype dt, const gshape *s, uint64_t tag, bool every)
{
    gdata d = make_data(dt, s, tag);
    for (int m = 0; m < 128; m++) {
        if (!every && !(m & 8) != !(m & 16)) continue;
        gflags f = {m & 1, m & 2, m & 4, m & 8, m & 16, m & 32, m & 64};
        run_gemm_case(&d, s, &f);
    }
    free_data(&d);
}

/* Odd sizes (N = 13 or 26 with SiLU-and-mul, K = 29), a slice of the experts with empties. */
static void test_grouped_gemm_all_flags_small(void **state)
{
    (void)state;
    gshape s = {.E = 7, .begin = 1, .El = 5, .N = 26, .K = 29, .T = 9, .k = 3};
    for (int d = 0; d < 3; d++) run_all_flags(tl_dtypes[d], &s, 10 + (uint64_t)d, true);
    gshape s13 = {.E = 4, .begin = 0, .El = 4, .N = 13, .K = 29, .T = 5, .k = 2};
    gdata d = make_data(MOE_DTYPE_F32, &s13, 20);
    for (int m = 0; m < 32; m++) { /* N odd: no SiLU-and-mul */
        gflags f = {m & 1, m & 2, m & 4, m & 8, m & 16, false, false};
        run_gemm_case(&d, &s13, &f);
    }
    free_data(&d);
}

/* Sizes crossing every tile edge (K > the K chunk, N > the column block, > 32 rows in one
 * expert), and one expert taking every row while the others are empty. */
static void test_grouped_gemm_tiles_and_skew(void **state)
{
    (void)state;
    gshape big = {.E = 6, .begin = 0, .El = 6, .N = 142, .K = 301, .T = 40, .k = 2};
    run_all_flags(MOE_DTYPE_BF16, &big, 30, false);
    gshape skew = {.E = 5, .begin = 0, .El = 5, .N = 134, .K = 270, .T = 23, .k = 3, .skew = 1};
    run_all_flags(MOE_DTYPE_F32, &skew, 31, false);
    gshape skew2 = {.E = 8, .begin = 3, .El = 2, .N = 10, .K = 9, .T = 4, .k = 2, .skew = 1};
    run_all_flags(MOE_DTYPE_F16, &skew2, 32, true);
}

static void test_grouped_gemm_rejects_bad_args(void **state)
{
    (void)state;
    moe_dtype dt = MOE_DTYPE_F32;
    int32_t off[4] = {0, 2, 2, 4};
    int32_t gather[4] = {0, 3, 1, 2};
    float A[4 * 3] = {0}, B[3 * 2 * 3] = {0}, C[4 * 2], P[4 * 2];
    moe_grouped_gemm_args good = {
        .dtype = dt, .num_experts = 3, .expert_offsets = off, .N = 2, .K = 3, .topk = 2,
        .max_rows = 4, .gather_idx = gather, .A = A, .B = B, .C = C,
        .epilogue = MOE_EPI_NONE,
    };
    moe_error err = {0};
    assert_int_equal(cpu_grouped_gemm(&good, &err), MOE_OK);

    struct { const char *expect; moe_grouped_gemm_args a; } bad[16];
    int n = 0;
    bad[n].expect = "permute_x and permute_y"; bad[n].a = good;
    bad[n].a.permute_x = bad[n].a.permute_y = true; n++;
    bad[n].expect = "gather_idx is NULL"; bad[n].a = good;
    bad[n].a.permute_x = true; bad[n].a.gather_idx = NULL; n++;
    bad[n].expect = "gather_idx is NULL"; bad[n].a = good;
    bad[n].a.scale_c_rows = C; bad[n].a.gather_idx = NULL; n++;
    bad[n].expect = "exceed max_rows"; bad[n].a = good; bad[n].a.max_rows = 3; n++;
    bad[n].expect = "topk"; bad[n].a = good; bad[n].a.permute_x = true; bad[n].a.topk = 0; n++;
    bad[n].expect = "scale_c_rows with the SiLU"; bad[n].a = good;
    bad[n].a.epilogue = MOE_EPI_SILU_MUL; bad[n].a.scale_c_rows = C; n++;
    bad[n].expect = "C_preact"; bad[n].a = good; bad[n].a.C_preact = P; n++;
    bad[n].expect = "N = 2I even"; bad[n].a = good;
    bad[n].a.epilogue = MOE_EPI_SILU_MUL; bad[n].a.N = 3; n++;
    bad[n].expect = "unknown epilogue"; bad[n].a = good; bad[n].a.epilogue = (moe_epilogue)7; n++;
    bad[n].expect = "dtype"; bad[n].a = good; bad[n].a.dtype = MOE_DTYPE_I32; n++;
    bad[n].expect = "expected >= 1"; bad[n].a = good; bad[n].a.K = 0; n++;
    bad[n].expect = "expert_offsets is NULL"; bad[n].a = good; bad[n].a.expert_offsets = NULL; n++;
    for (int i = 0; i < n; i++) {
        moe_error e2 = {0};
        for (int j = 0; j < 8; j++) C[j] = NAN;
        moe_status st = cpu_grouped_gemm(&bad[i].a, &e2);
        if (st == MOE_OK || !strstr(e2.msg, bad[i].expect))
            fail_msg("case %d: status %d message '%s', expected '%s'", i, st, e2.msg,
                     bad[i].expect);
        for (int j = 0; j < 8; j++) assert_true(isnan(C[j])); /* nothing written */
    }
    /* Offsets: negative start, unsorted; gather out of range; duplicates under permute_y. */
    int32_t neg[4] = {-1, 2, 2, 4}, uns[4] = {0, 3, 2, 4};
    int32_t g_oob[4] = {0, 4, 1, 2}, g_dup[4] = {0, 1, 1, 2};
    moe_grouped_gemm_args x = good;
    x.expert_offsets = neg;
    assert_int_equal(cpu_grouped_gemm(&x, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "expert_offsets[0]"));
    x.expert_offsets = uns;
    assert_int_equal(cpu_grouped_gemm(&x, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "not sorted"));
    x = good;
    x.permute_x = true;
    x.gather_idx = g_oob;
    assert_int_equal(cpu_grouped_gemm(&x, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "gather_idx[1] = 4"));
    x = good;
    x.permute_y = true;
    x.gather_idx = g_dup;
    assert_int_equal(cpu_grouped_gemm(&x, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "twice"));
    assert_int_equal(cpu_grouped_gemm(NULL, &err), MOE_ERR_INVALID_ARG);
}

/* ---- grouped weight gradient ---- */

static void run_dw_case(moe_dtype dt, const gshape *s, int m, uint64_t tag)
{
    bool pdy = m & 1, px = m & 2, sdy = m & 4, sx = m & 8;
    groute rt = make_route(s, tag);
    int N = s->N, K = s->K;
    size_t es = moe_dtype_size(dt);
    void *dY = tl_normal(dt, (pdy ? (size_t)s->T : (size_t)rt.M) * N, "dY", tag, 1.0);
    void *X = tl_normal(dt, (px ? (size_t)s->T : (size_t)rt.M) * K, "X", tag, 1.0);
    void *sd = tl_uniform(dt, (size_t)rt.flat, "sdy", tag, 0.1, 1.5);
    void *sxv = tl_uniform(dt, (size_t)rt.flat, "sx", tag, 0.1, 1.5);
    size_t nw = (size_t)s->El * N * K;
    void *dW = tl_alloc(nw, es);
    tl_poison(dt, dW, nw);
    moe_grouped_gemm_dw_args a = {
        .dtype = dt, .num_experts = s->El, .expert_offsets = rt.offsets, .N = N, .K = K,
        .topk = s->k, .max_rows = rt.flat, .gather_idx = rt.gather, .dY = dY,
        .permute_dy = pdy, .scale_dy_rows = sdy ? sd : NULL, .X = X, .permute_x = px,
        .scale_x_rows = sx ? sxv : NULL, .dW = dW,
    };
    moe_error err = {0};
    if (cpu_grouped_gemm_dw(&a, &err) != MOE_OK) fail_msg("cpu_grouped_gemm_dw: %s", err.msg);
    double *ref = calloc(nw + 1, sizeof(double)), *got = tl_alloc(nw + 1, sizeof(double));
    double *dyr = tl_alloc((size_t)N, sizeof(double)), *xr = tl_alloc((size_t)K, sizeof(double));
    for (int r = 0; r < rt.M; r++) {
        int e = expert_of_row(&rt, s->El, r), fl = rt.gather[r];
        size_t ys = pdy ? (size_t)(fl / s->k) : (size_t)r, xs = px ? (size_t)(fl / s->k) : (size_t)r;
        for (int n = 0; n < N; n++) {
            dyr[n] = tl_ld(dt, dY, ys * N + n);
            if (sdy) dyr[n] = moe_round_to(dt, dyr[n] * tl_ld(dt, sd, (size_t)fl));
        }
        for (int kk = 0; kk < K; kk++) {
            xr[kk] = tl_ld(dt, X, xs * K + kk);
            if (sx) xr[kk] = moe_round_to(dt, xr[kk] * tl_ld(dt, sxv, (size_t)fl));
        }
        for (int n = 0; n < N; n++)
            for (int kk = 0; kk < K; kk++) ref[((size_t)e * N + n) * K + kk] += dyr[n] * xr[kk];
    }
    for (size_t i = 0; i < nw; i++) got[i] = tl_ld(dt, dW, i);
    char what[128];
    snprintf(what, sizeof what, "dW %s pdy%d px%d sdy%d sx%d N%d K%d", moe_dtype_name(dt), pdy,
             px, sdy, sx, N, K);
    /* Rows (n) of empty experts have a zero reference and must be exactly zero: the helper
     * checks that, and here the bits too (no -0, no NaN). */
    assert_true(tl_check_rounded(what, dt, got, ref, (size_t)s->El * N, (size_t)K));
    for (int e = 0; e < s->El; e++) {
        if (rt.offsets[e + 1] > rt.offsets[e]) continue;
        const unsigned char *b = (const unsigned char *)dW + (size_t)e * N * K * es;
        for (size_t i = 0; i < (size_t)N * K * es; i++) assert_int_equal(b[i], 0);
    }
    free(ref); free(got); free(dyr); free(xr);
    free(dY); free(X); free(sd); free(sxv); free(dW);
    free_route(&rt);
}

static void test_grouped_dw_flags(void **state)
{
    (void)state;
    gshape s = {.E = 7, .begin = 1, .El = 5, .N = 13, .K = 29, .T = 9, .k = 3};
    gshape big = {.E = 6, .begin = 0, .El = 6, .N = 70, .K = 530, .T = 50, .k = 2};
    gshape skew = {.E = 5, .begin = 0, .El = 5, .N = 37, .K = 19, .T = 21, .k = 2, .skew = 1};
    for (int d = 0; d < 3; d++)
        for (int m = 0; m < 16; m++) run_dw_case(tl_dtypes[d], &s, m, 100 + (uint64_t)(d * 16 + m));
    for (int m = 0; m < 16; m++) run_dw_case(MOE_DTYPE_BF16, &big, m, 200 + (uint64_t)m);
    for (int m = 0; m < 16; m++) run_dw_case(MOE_DTYPE_F32, &skew, m, 300 + (uint64_t)m);
}

static void test_grouped_dw_rejects_bad_args(void **state)
{
    (void)state;
    int32_t off[3] = {0, 1, 2}, uns[3] = {0, 2, 1};
    float dY[2 * 2] = {0}, X[2 * 2] = {0}, dW[2 * 2 * 2];
    moe_grouped_gemm_dw_args a = {
        .dtype = MOE_DTYPE_F32, .num_experts = 2, .expert_offsets = off, .N = 2, .K = 2,
        .max_rows = 2, .topk = 1, .dY = dY, .X = X, .dW = dW,
    };
    moe_error err = {0};
    assert_int_equal(cpu_grouped_gemm_dw(&a, &err), MOE_OK);
    moe_grouped_gemm_dw_args b = a;
    b.permute_x = true;
    assert_int_equal(cpu_grouped_gemm_dw(&b, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "gather_idx is NULL"));
    b = a;
    b.expert_offsets = uns;
    assert_int_equal(cpu_grouped_gemm_dw(&b, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "not sorted"));
    b = a;
    b.dW = NULL;
    assert_int_equal(cpu_grouped_gemm_dw(&b, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "dW"));
}

/* ---- plain GEMM ---- */

static void test_plain_gemm(void **state)
{
    (void)state;
    const int Ms[2] = {5, 37}, Ns[2] = {3, 70}, Ks[2] = {11, 300};
    for (int d = 0; d < 3; d++)
        for (int c = 0; c < 2; c++)
            for (int bkn = 0; bkn < 2; bkn++)
                for (int accu = 0; accu < 2; accu++) {
                    moe_dtype dt = tl_dtypes[d];
                    int M = Ms[c], N = Ns[c], K = Ks[c];
                    uint64_t tag = 400 + (uint64_t)(d * 8 + c * 4 + bkn * 2 + accu);
                    void *A = tl_normal(dt, (size_t)M * K, "pA", tag, 1);
                    void *B = tl_normal(dt, (size_t)N * K, "pB", tag, 1);
                    void *C = tl_normal(dt, (size_t)M * N, "pC", tag, 1);
                    double *ref = tl_alloc((size_t)M * N, sizeof(double));
                    double *got = tl_alloc((size_t)M * N, sizeof(double));
                    for (int i = 0; i < M; i++)
                        for (int n = 0; n < N; n++) {
                            double v = accu ? tl_ld(dt, C, (size_t)i * N + n) : 0;
                            for (int kk = 0; kk < K; kk++)
                                v += tl_ld(dt, A, (size_t)i * K + kk) *
                                     tl_ld(dt, B, bkn ? (size_t)kk * N + n : (size_t)n * K + kk);
                            ref[(size_t)i * N + n] = v;
                        }
                    if (!accu) tl_poison(dt, C, (size_t)M * N);
                    moe_error err = {0};
                    assert_int_equal(cpu_gemm(dt, M, N, K, A, B, bkn, C, accu, &err), MOE_OK);
                    for (size_t i = 0; i < (size_t)M * N; i++) got[i] = tl_ld(dt, C, i);
                    char what[96];
                    snprintf(what, sizeof what, "gemm %s %dx%dx%d bkn%d acc%d",
                             moe_dtype_name(dt), M, N, K, bkn, accu);
                    assert_true(tl_check_rounded(what, dt, got, ref, (size_t)M, (size_t)N));
                    free(A); free(B); free(C); free(ref); free(got);
                }
}

/* The grouped GEMM gives the same bits for any thread count. */
static void test_gemm_thread_determinism(void **state)
{
    (void)state;
    gshape s = {.E = 6, .begin = 0, .El = 6, .N = 140, .K = 333, .T = 64, .k = 2};
    groute rt = make_route(&s, 500);
    moe_dtype dt = MOE_DTYPE_BF16;
    void *A = tl_normal(dt, (size_t)s.T * s.K, "dA", 500, 1);
    void *B = tl_normal(dt, (size_t)s.El * s.N * s.K, "dB", 500, 0.05);
    size_t nc = (size_t)rt.M * s.N / 2, nw = (size_t)s.El * s.N * s.K;
    void *C1 = tl_alloc(nc, 2), *C2 = tl_alloc(nc, 2), *W1 = tl_alloc(nw, 2), *W2 = tl_alloc(nw, 2);
    void *dY = tl_normal(dt, (size_t)rt.M * s.N, "dY", 500, 1);
    int saved = omp_get_max_threads();
    for (int rep = 0; rep < 2; rep++) {
        omp_set_num_threads(rep == 0 ? 1 : 3);
        moe_grouped_gemm_args a = {
            .dtype = dt, .num_experts = s.El, .expert_offsets = rt.offsets, .N = s.N,
            .K = s.K, .topk = s.k, .max_rows = rt.flat, .gather_idx = rt.gather, .A = A,
            .B = B, .C = rep ? C2 : C1, .permute_x = true, .epilogue = MOE_EPI_SILU_MUL,
        };
        moe_grouped_gemm_dw_args w = {
            .dtype = dt, .num_experts = s.El, .expert_offsets = rt.offsets, .N = s.N,
            .K = s.K, .topk = s.k, .max_rows = rt.flat, .gather_idx = rt.gather, .dY = dY,
            .X = A, .permute_x = true, .dW = rep ? W2 : W1,
        };
        moe_error err = {0};
        assert_int_equal(cpu_grouped_gemm(&a, &err), MOE_OK);
        assert_int_equal(cpu_grouped_gemm_dw(&w, &err), MOE_OK);
    }
    omp_set_num_threads(saved);
    assert_true(tl_bits_equal(C1, C2, nc * 2));
    assert_true(tl_bits_equal(W1, W2, nw * 2));
    free(A); free(B); free(C1); free(C2); free(W1); free(W2); free(dY);
    free_route(&rt);
}

int main(void)
{
    moe_test_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conversions_match_dtype_c),
        cmocka_unit_test(test_grouped_gemm_all_flags_small),
        cmocka_unit_test(test_grouped_gemm_tiles_and_skew),
        cmocka_unit_test(test_grouped_gemm_rejects_bad_args),
        cmocka_unit_test(test_grouped_dw_flags),
        cmocka_unit_test(test_grouped_dw_rejects_bad_args),
        cmocka_unit_test(test_plain_gemm),
        cmocka_unit_test(test_gemm_thread_determinism),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
