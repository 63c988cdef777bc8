/*
 * cpu_fused_testlib.h — helpers shared by the test_cpu_fused*.c tests (static, header only):
 * random tensors from the counter RNG, reading any dtype into doubles, bit-level equality,
 * and the tests' own naive routing and counting, written independently of src/cpu/.
 */
#ifndef CPU_FUSED_TESTLIB_H
#define CPU_FUSED_TESTLIB_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "config.h"
#include "dtype.h"
#include "rng.h"
#include "tensor.h"

static const moe_dtype tl_dtypes[3] = {MOE_DTYPE_BF16, MOE_DTYPE_F16, MOE_DTYPE_F32};

/* Fresh per-run seed mixed with a tag, so each tensor of each case has its own stream. */
static inline uint64_t tl_stream(const char *name, uint64_t tag)
{
    return moe_rng_stream(moe_test_seed() ^ (tag * 0x9e3779b97f4a7c15ull), name);
}

static inline void *tl_alloc(size_t n, size_t esz)
{
    void *p = malloc((n * esz) != 0 ? n * esz : 1);
    assert_non_null(p);
    return p;
}

/* n elements of dt: normal(0,1) * scale, rounded to dt. */
static inline void *tl_normal(moe_dtype dt, size_t n, const char *name, uint64_t tag,
                              double scale)
{
    void *p = tl_alloc(n, moe_dtype_size(dt));
    uint64_t s = tl_stream(name, tag);
    for (size_t i = 0; i < n; i++) moe_store_elem(dt, p, i, moe_rng_normal(s, i) * scale);
    return p;
}

/* n elements of dt uniform in [lo, hi), rounded to dt. */
static inline void *tl_uniform(moe_dtype dt, size_t n, const char *name, uint64_t tag,
                               double lo, double hi)
{
    void *p = tl_alloc(n, moe_dtype_size(dt));
    uint64_t s = tl_stream(name, tag);
    for (size_t i = 0; i < n; i++)
        moe_store_elem(dt, p, i, lo + (hi - lo) * moe_rng_uniform(s, i));
    return p;
}

static inline double tl_ld(moe_dtype dt, const void *p, size_t i) { return moe_load_elem(dt, p, i); }

/* NaN poison of n elements of dt. */
static inline void tl_poison(moe_dtype dt, void *p, size_t n)
{
    for (size_t i = 0; i < n; i++) moe_store_elem(dt, p, i, NAN);
}

static inline bool tl_is_poison(moe_dtype dt, const void *p, size_t i)
{
    return isnan(tl_ld(dt, p, i));
}

static inline bool tl_bits_equal(const void *a, const void *b, size_t nbytes)
{
    return memcmp(a, b, nbytes) == 0;
}

/* Relative tolerance for one rounding to dt (a few ulps), used for element-level checks. */
static inline double tl_ulp_tol(moe_dtype dt)
{
    return dt == MOE_DTYPE_BF16 ? 1.0 / 128 : dt == MOE_DTYPE_F16 ? 1.0 / 1024 : 1e-6;
}

/* A stage output got[n] (stored in dt) against the test's exact value ref[n] (double, not
 * rounded), as rows x cols. Passes when
 *   - moe_test_close(got, round(ref)) holds with half an ulp of dt (fp32: 1e-5), and
 *   - (bf16/fp16) at most max(3, 2%) of the elements differ from round(ref) at all: the fp32
 *     accumulation may flip an element sitting next to a rounding boundary by one ulp, but a
 *     rounding bug (rounding twice, or at the wrong point) changes far more of them.
 * ref is overwritten with round(ref). */
static inline bool tl_check_rounded(const char *what, moe_dtype dt, const double *got,
                                    double *ref, size_t rows, size_t cols)
{
    size_t n = rows * cols, diff = 0;
    for (size_t i = 0; i < n; i++) {
        ref[i] = moe_round_to(dt, ref[i]);
        if (got[i] != ref[i]) diff++;
    }
    double tol = dt == MOE_DTYPE_BF16 ? 2e-3 : dt == MOE_DTYPE_F16 ? 5e-4 : 1e-5;
    bool ok = moe_test_close(what, got, ref, rows, cols, tol);
    if (dt != MOE_DTYPE_F32) {
        size_t cap = n / 50 > 3 ? n / 50 : 3;
        if (diff > cap) {
            fprintf(stderr, "  %zu of %zu elements differ from the rounded exact value (max %zu)\n",
                    diff, n, cap);
            ok = false;
        }
    }
    return ok;
}

/* The test's own top-k of one row of values (larger first, equal values: lower id first),
 * a plain selection sort over all E. */
static inline void tl_topk(const double *v, int E, int k, int32_t *ids)
{
    bool *taken = calloc((size_t)E, 1);
    assert_non_null(taken);
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < E; i++) {
            if (taken[i]) continue;
            if (best < 0 || v[i] > v[best]) best = i; /* strict: an equal later id loses */
        }
        taken[best] = true;
        ids[j] = best;
    }
    free(taken);
}

/* The test's own routing of one logits row, in double: ids and the (unrounded) weights. */
static inline void tl_route_row(const moe_config *c, const double *l, int32_t *ids, double *w)
{
    int E = c->num_experts, k = c->top_k;
    double *p = calloc((size_t)E, sizeof *p);
    assert_non_null(p);
    if (c->arch == MOE_ARCH_QWEN3) {
        double mx = -INFINITY, s = 0;
        for (int i = 0; i < E; i++) mx = fmax(mx, l[i]);
        for (int i = 0; i < E; i++) s += (p[i] = exp(l[i] - mx));
        for (int i = 0; i < E; i++) p[i] /= s;
        tl_topk(l, E, k, ids); /* softmax is monotone: same order as the logits */
        double z = 0;
        for (int j = 0; j < k; j++) z += p[ids[j]];
        for (int j = 0; j < k; j++) w[j] = c->norm_topk_prob ? p[ids[j]] / z : p[ids[j]];
    } else {
        tl_topk(l, E, k, ids);
        for (int j = 0; j < k; j++) w[j] = 1.0 / (1.0 + exp(-l[ids[j]]));
    }
    free(p);
}

/* The test's own expert order: for each local expert ascending, its flat indices ascending. */
static inline int tl_expert_order(const int32_t *ids, int flat, int begin, int El,
                                  int32_t *counts, int32_t *offsets, int32_t *gather)
{
    int m = 0;
    offsets[0] = 0;
    for (int e = 0; e < El; e++) {
        int c = 0;
        for (int f = 0; f < flat; f++)
            if (ids[f] == begin + e) {
                gather[m++] = f;
                c++;
            }
        if (counts) counts[e] = c;
        offsets[e + 1] = m;
    }
    return m;
}

static inline double tl_silu(double g) { return g / (1.0 + exp(-g)); }

#endif /* CPU_FUSED_TESTLIB_H */
