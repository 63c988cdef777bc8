/*
 * test_gpu_routing.c — the routing and elementwise CUDA kernels (kernels/routing.cu,
 * kernels/elementwise.cu) against double-precision loops written here:
 *   route_topk (Qwen3 softmax/top-k/renormalise, Llama-4 top-k/sigmoid; ties, all-equal rows,
 *   NaN rows, E from 5 to 20000, k from 1 to E, T = 1), the stable counting sort (empty experts,
 *   a local expert range, ids outside it, one expert taking everything, many chunks), the sum
 *   over k (bit-exact with the CPU twin's fp32 order; rows of skipped experts poisoned), SiLU-
 *   and-mul forward/backward (with the fused Qwen3 weight gradient and a device row count),
 *   router backward (every logit / only the selected ones), row dot products, argument checks;
 *   the one-launch route of small batches (logits against a double GEMM, everything else bit
 *   for bit against the per-stage kernels on the same logits, its counter back at zero); the
 *   count of tokens with non-finite router logits that both routes keep (nonfinite_count).
 * Outputs are poisoned (0xff bytes: NaN for bf16/fp16/fp32, -1 for int32) before each launch.
 * Skipped without a GPU (fails with MOE_REQUIRE_GPU=1). MOE_GPU_TEST_SMALL=1 leaves out the
 * largest cases (for compute-sanitizer runs).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "dtype.h"
#include "moe_kernels_aux.h"
#include "rng.h"

static const moe_dtype k_dtypes[] = {MOE_DTYPE_BF16, MOE_DTYPE_F16, MOE_DTYPE_F32};

static bool small_only(void)
{
    const char *s = getenv("MOE_GPU_TEST_SMALL");
    return s && strcmp(s, "1") == 0;
}

/* ---- device helpers ---- */

static void *dmalloc(size_t bytes)
{
    void *p = NULL;
    assert_int_equal(cudaSuccess, cudaMalloc(&p, bytes ? bytes : 16));
    assert_int_equal(cudaSuccess, cudaMemset(p, 0xff, bytes ? bytes : 16)); /* poison */
    return p;
}
static void *dcopy(const void *h, size_t bytes)
{
    void *p = dmalloc(bytes);
    assert_int_equal(cudaSuccess, cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice));
    return p;
}
static void dpoison(void *d, size_t bytes) { assert_int_equal(cudaSuccess, cudaMemset(d, 0xff, bytes)); }
static void d2h(void *h, const void *d, size_t bytes)
{
    assert_int_equal(cudaSuccess, cudaDeviceSynchronize());
    assert_int_equal(cudaSuccess, cudaGetLastError());
    assert_int_equal(cudaSuccess, cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}
static void *hmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 16);
    assert_non_null(p);
    memset(p, 0xff, bytes ? bytes : 16);
    return p;
}

#define OK(call)                                                                              \
    do {                                                                                      \
        moe_error e_ = {0};                                                                   \
        moe_status s_ = (call);                                                               \
        if (s_ != MOE_OK) fail_msg("%s -> %d: %s", #call, (int)s_, e_.msg);                  \
    } while (0)
/* The launchers take `err`: the macro above needs it named e_. */
#define ERR (&e_)

/* Relative rounding slack of a dtype for one value computed in fp32 and rounded: one ulp of
 * the dtype (fp32: a few ulps of fp32 arithmetic inside the kernel). */
static double ulp_tol(moe_dtype dt)
{
    return dt == MOE_DTYPE_BF16 ? 0x1p-7 : dt == MOE_DTYPE_F16 ? 0x1p-10 : 2e-6;
}
static bool close_rel(double a, double ref, double rel, double abs_floor)
{
    if (isnan(a) || isnan(ref)) return false;
    return fabs(a - ref) <= rel * fabs(ref) + abs_floor;
}

/* ---- routing ---- */

/* Reference top-k of one row: rank by value desc, id asc; NaN below every number. */
static bool ranks_before(double a, int ia, double b, int ib)
{
    if (isnan(a)) return isnan(b) && ia < ib;
    if (isnan(b)) return true;
    return a > b || (a == b && ia < ib);
}
static void ref_topk(const double *v, int E, int k, int32_t *ids)
{
    /* selection by repeated scan: simple and independent of the kernel's method */
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int q = 0; q < j; q++) taken |= ids[q] == e;
            if (taken) continue;
            if (best < 0 || ranks_before(v[e], e, v[best], best)) best = e;
        }
        ids[j] = best;
    }
}

static void ref_route(const moe_config *cfg, moe_dtype dt, int T, const void *logits,
                      int32_t *ids, double *w)
{
    const int E = cfg->num_experts, k = cfg->top_k;
    double *v = malloc(sizeof(double) * E);
    for (int t = 0; t < T; t++) {
        double mx = -INFINITY;
        for (int e = 0; e < E; e++) {
            v[e] = moe_load_elem(dt, logits, (size_t)t * E + e);
            if (v[e] > mx) mx = v[e];
        }
        ref_topk(v, E, k, ids + (size_t)t * k); /* softmax is monotone: same order as p */
        if (cfg->arch == MOE_ARCH_QWEN3) {
            double s = 0, ssel = 0;
            for (int e = 0; e < E; e++) s += exp(v[e] - mx);
            for (int j = 0; j < k; j++) ssel += exp(v[ids[(size_t)t * k + j]] - mx) / s;
            for (int j = 0; j < k; j++) {
                double p = exp(v[ids[(size_t)t * k + j]] - mx) / s;
                w[(size_t)t * k + j] = moe_round_to(dt, cfg->norm_topk_prob ? p / ssel : p);
            }
        } else {
            for (int j = 0; j < k; j++)
                w[(size_t)t * k + j] = moe_round_to(dt, 1.0 / (1.0 + exp(-v[ids[(size_t)t * k + j]])));
        }
    }
    free(v);
}

/* Logits with many exact ties: 60% of entries from a 5-value set, the rest normal; row 0 is
 * all zeros (every id ties: the answer is 0..k-1). */
static void fill_logits(moe_dtype dt, int T, int E, uint64_t stream, void *buf)
{
    static const double q[5] = {-1.0, -0.5, 0.0, 0.5, 1.0};
    for (size_t i = 0; i < (size_t)T * E; i++) {
        double u = moe_rng_uniform(stream, 2 * i);
        double v = u < 0.6 ? q[(int)(u / 0.6 * 5) % 5] : 1.5 * moe_rng_normal(stream, 2 * i + 1);
        if (i < (size_t)E) v = 0.0;
        moe_store_elem(dt, buf, i, v);
    }
}

static void check_route_case(moe_arch arch, bool norm, int E, int k, int T, moe_dtype dt, uint64_t seed)
{
    moe_config cfg = {.arch = arch, .num_experts = E, .top_k = k, .norm_topk_prob = norm,
                      .hidden = 1, .inter = 1};
    const size_t es = moe_dtype_size(dt), nl = (size_t)T * E, nk = (size_t)T * k;
    void *hl = hmalloc(nl * es);
    fill_logits(dt, T, E, moe_rng_stream(seed, "logits"), hl);
    int32_t *ref_ids = hmalloc(nk * 4), *ids = hmalloc(nk * 4);
    double *ref_w = hmalloc(nk * sizeof(double));
    void *w = hmalloc(nk * es);
    ref_route(&cfg, dt, T, hl, ref_ids, ref_w);
    void *dl = dcopy(hl, nl * es), *dids = dmalloc(nk * 4), *dw = dmalloc(nk * es);
    OK(moe_cuda_route_topk(&cfg, dt, T, dl, dids, dw, NULL, 0, ERR));
    d2h(ids, dids, nk * 4);
    d2h(w, dw, nk * es);
    size_t bad_ids = 0, bad_w = 0;
    for (size_t i = 0; i < nk; i++) {
        if (ids[i] != ref_ids[i]) {
            if (bad_ids++ < 5)
                fprintf(stderr, "  ids[t=%zu, j=%zu] = %d, expected %d\n", i / k, i % k, ids[i], ref_ids[i]);
        }
        double g = moe_load_elem(dt, w, i);
        /* fp32: the kernel's softmax sums E fp32 terms in sequence (relative error ~sqrt(E)
         * fp32 ulps); the other dtypes round that away but for one ulp at a boundary. */
        if (!close_rel(g, ref_w[i], dt == MOE_DTYPE_F32 ? 1e-5 : ulp_tol(dt), 1e-30)) {
            if (bad_w++ < 5)
                fprintf(stderr, "  w[t=%zu, j=%zu] = %.9g, expected %.9g\n", i / k, i % k, g, ref_w[i]);
        }
    }
    if (bad_ids || bad_w)
        fail_msg("route %s norm=%d E=%d k=%d T=%d %s: %zu wrong ids, %zu wrong weights",
                 arch == MOE_ARCH_QWEN3 ? "qwen3" : "llama4", norm, E, k, T, moe_dtype_name(dt),
                 bad_ids, bad_w);
    /* row 0 is all ties: ids 0..k-1 */
    for (int j = 0; j < k; j++) assert_int_equal(j, ids[j]);
    free(hl); free(ref_ids); free(ids); free(ref_w); free(w);
    cudaFree(dl); cudaFree(dids); cudaFree(dw);
}

static void test_route_topk(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    struct { int E, k, T; } cases[] = {
        {128, 8, 513}, {16, 1, 1}, {16, 1, 300}, {7, 3, 37}, {5, 5, 3}, {257, 13, 65},
        {64, 64, 9}, {300, 2, 20}, {1, 1, 4}, {33, 32, 5},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (size_t d = 0; d < 3; d++) {
            check_route_case(MOE_ARCH_QWEN3, true, cases[c].E, cases[c].k, cases[c].T, k_dtypes[d], seed + c);
            check_route_case(MOE_ARCH_QWEN3, false, cases[c].E, cases[c].k, cases[c].T, k_dtypes[d], seed + c);
            check_route_case(MOE_ARCH_LLAMA4, false, cases[c].E, cases[c].k, cases[c].T, k_dtypes[d], seed + c);
        }
    /* E large enough that one token's scores need more than 48 KB of shared memory */
    if (!small_only()) {
        check_route_case(MOE_ARCH_QWEN3, true, 20000, 3, 2, MOE_DTYPE_F32, seed);
        check_route_case(MOE_ARCH_LLAMA4, false, 20000, 5, 2, MOE_DTYPE_BF16, seed);
    }
}

/* A NaN row: ids stay valid and distinct, NaNs rank last (lower id first among them). */
static void test_route_nan(void **state)
{
    (void)state;
    const int E = 6, k = 4, T = 1;
    moe_config cfg = {.arch = MOE_ARCH_LLAMA4, .num_experts = E, .top_k = k, .hidden = 1, .inter = 1};
    float h[6] = {NAN, 0.5f, NAN, -INFINITY, 2.0f, NAN};
    void *dl = dcopy(h, sizeof h), *dids = dmalloc(k * 4), *dw = dmalloc(k * 4);
    OK(moe_cuda_route_topk(&cfg, MOE_DTYPE_F32, T, dl, dids, dw, NULL, 0, ERR));
    int32_t ids[4];
    d2h(ids, dids, sizeof ids);
    int want[4] = {4, 1, 3, 0};
    for (int j = 0; j < k; j++) assert_int_equal(want[j], ids[j]);
    cudaFree(dl); cudaFree(dids); cudaFree(dw);
}

/* Non-finite router logits are counted inside the top-k launch (nonfinite_count): every token
 * whose row holds a NaN, +inf or -inf adds one, however many it holds, finite rows nothing; the
 * count accumulates over launches (never reset by the kernel); NULL counts nothing, and the
 * outputs do not depend on counting. Both architectures, every dtype. */
static void test_route_nonfinite(void **state)
{
    (void)state;
    const uint64_t seed = moe_test_seed();
    const int E = 37, k = 3, T = 200;
    uint32_t *dcount = NULL;
    assert_int_equal(cudaSuccess, cudaMalloc((void **)&dcount, sizeof *dcount));
    for (int a = 0; a < 2; a++)
        for (int d = 0; d < 3; d++) {
            const moe_dtype dt = k_dtypes[d];
            moe_config cfg = {.arch = a ? MOE_ARCH_LLAMA4 : MOE_ARCH_QWEN3, .num_experts = E, .top_k = k,
                              .norm_topk_prob = !a, .hidden = 1, .inter = 1};
            const size_t es = moe_dtype_size(dt), nl = (size_t)T * E, nk = (size_t)T * k;
            void *hl = hmalloc(nl * es);
            fill_logits(dt, T, E, moe_rng_stream(seed + (uint64_t)(3 * a + d), "nonfinite"), hl);
            uint32_t want = 0;
            for (int t = 0; t < T; t++) {
                bool bad = false;
                if (t % 7 == 3) { moe_store_elem(dt, hl, (size_t)t * E + t % E, NAN); bad = true; }
                if (t % 11 == 5) { moe_store_elem(dt, hl, (size_t)t * E + (t + 1) % E, INFINITY); bad = true; }
                if (t % 13 == 8) { moe_store_elem(dt, hl, (size_t)t * E + (t + 2) % E, -INFINITY); bad = true; }
                if (t % 17 == 0) { /* two NaNs in one row still count once */
                    moe_store_elem(dt, hl, (size_t)t * E, NAN);
                    moe_store_elem(dt, hl, (size_t)t * E + E - 1, NAN);
                    bad = true;
                }
                want += bad;
            }
            void *dl = dcopy(hl, nl * es), *dids = dmalloc(nk * 4), *dw = dmalloc(nk * es);
            void *dids2 = dmalloc(nk * 4), *dw2 = dmalloc(nk * es);
            assert_int_equal(cudaSuccess, cudaMemset(dcount, 0, sizeof *dcount));
            OK(moe_cuda_route_topk(&cfg, dt, T, dl, dids, dw, dcount, 0, ERR));
            uint32_t got = 0;
            d2h(&got, dcount, sizeof got);
            if (got != want)
                fail_msg("route %s %s: %u tokens counted non-finite, %u have a NaN or an infinity",
                         a ? "llama4" : "qwen3", moe_dtype_name(dt), got, want);
            OK(moe_cuda_route_topk(&cfg, dt, T, dl, dids, dw, dcount, 0, ERR)); /* accumulates */
            d2h(&got, dcount, sizeof got);
            assert_int_equal(2 * want, got);
            OK(moe_cuda_route_topk(&cfg, dt, T, dl, dids2, dw2, NULL, 0, ERR)); /* not counted */
            d2h(&got, dcount, sizeof got);
            assert_int_equal(2 * want, got);
            unsigned char *i1 = hmalloc(nk * 4), *i2 = hmalloc(nk * 4), *w1 = hmalloc(nk * es), *w2 = hmalloc(nk * es);
            d2h(i1, dids, nk * 4);
            d2h(i2, dids2, nk * 4);
            d2h(w1, dw, nk * es);
            d2h(w2, dw2, nk * es);
            assert_memory_equal(i1, i2, nk * 4);
            assert_memory_equal(w1, w2, nk * es);
            /* every id still a valid expert (NaNs rank last) */
            for (size_t i = 0; i < nk; i++) assert_true(((int32_t *)i1)[i] >= 0 && ((int32_t *)i1)[i] < E);
            fprintf(stderr, "route %s %s: %u of %d tokens with non-finite logits counted\n",
                    a ? "llama4" : "qwen3", moe_dtype_name(dt), want, T);
            free(hl); free(i1); free(i2); free(w1); free(w2);
            cudaFree(dl); cudaFree(dids); cudaFree(dw); cudaFree(dids2); cudaFree(dw2);
        }
    cudaFree(dcount);
}

/* ---- sort ---- */

static void check_sort_case(int T, int k, int begin, int El, int mode, uint64_t seed)
{
    /* mode 0: uniform ids over [0, begin+El+8) plus a few invalid ones; 1: only even experts
     * (empty odd experts); 2: everything on one expert. */
    const size_t M = (size_t)T * k;
    int32_t *ids = hmalloc(M * 4);
    uint64_t s = moe_rng_stream(seed, "ids");
    for (size_t f = 0; f < M; f++) {
        uint64_t r = moe_rng_u64(s, f);
        int id;
        if (mode == 0) {
            id = (int)(r % (uint64_t)(begin + El + 8));
            if (r % 97 == 0) id = -3;
            if (r % 89 == 0) id = 1 << 30;
        } else if (mode == 1) {
            id = begin + (int)((r % (uint64_t)((El + 1) / 2)) * 2);
        } else {
            id = begin + El / 2;
        }
        ids[f] = id;
    }
    int32_t *rc = hmalloc((size_t)El * 4), *ro = hmalloc((size_t)(El + 1) * 4), *rg = hmalloc(M * 4);
    for (int e = 0; e < El; e++) rc[e] = 0;
    for (size_t f = 0; f < M; f++) {
        long long x = (long long)ids[f] - begin;
        if (x >= 0 && x < El) rc[x]++;
    }
    ro[0] = 0;
    for (int e = 0; e < El; e++) ro[e + 1] = ro[e] + rc[e];
    int32_t *cur = hmalloc((size_t)El * 4);
    memcpy(cur, ro, (size_t)El * 4);
    for (size_t f = 0; f < M; f++) {
        long long x = (long long)ids[f] - begin;
        if (x >= 0 && x < El) rg[cur[x]++] = (int32_t)f;
    }
    const int kept = ro[El];

    void *dids = dcopy(ids, M * 4), *dc = dmalloc((size_t)El * 4), *doff = dmalloc((size_t)(El + 1) * 4),
         *dg = dmalloc(M * 4);
    size_t sb = moe_cuda_sort_scratch_bytes(T, k, El);
    void *scratch = dmalloc(sb);
    int32_t *c = hmalloc((size_t)El * 4), *o = hmalloc((size_t)(El + 1) * 4), *g = hmalloc(M * 4),
            *g2 = hmalloc(M * 4);
    for (int rep = 0; rep < 2; rep++) {
        dpoison(dc, (size_t)El * 4);
        dpoison(doff, (size_t)(El + 1) * 4);
        dpoison(dg, M * 4);
        OK(moe_cuda_sort_by_expert(T, k, dids, begin, El, dc, doff, dg, scratch, sb, 0, ERR));
        d2h(c, dc, (size_t)El * 4);
        d2h(o, doff, (size_t)(El + 1) * 4);
        d2h(rep ? g2 : g, dg, M * 4);
    }
    assert_memory_equal(rc, c, (size_t)El * 4);
    assert_memory_equal(ro, o, (size_t)(El + 1) * 4);
    for (int r = 0; r < kept; r++)
        if (g[r] != rg[r]) fail_msg("sort T=%d k=%d El=%d mode %d: gather[%d] = %d, expected %d", T, k, El, mode, r, g[r], rg[r]);
    for (size_t r = (size_t)kept; r < M; r++) assert_int_equal(-1, g[r]);
    assert_memory_equal(g, g2, M * 4); /* run to run */
    free(ids); free(rc); free(ro); free(rg); free(cur); free(c); free(o); free(g); free(g2);
    cudaFree(dids); cudaFree(dc); cudaFree(doff); cudaFree(dg); cudaFree(scratch);
}

static void test_sort(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    check_sort_case(4096, 8, 0, 128, 0, seed);
    check_sort_case(1, 1, 0, 16, 0, seed + 1);
    check_sort_case(1, 8, 0, 128, 1, seed + 2);
    check_sort_case(37, 3, 0, 7, 1, seed + 3);  /* empty experts */
    check_sort_case(500, 8, 32, 32, 0, seed + 4); /* local range, ids outside ignored */
    check_sort_case(3000, 2, 0, 16, 2, seed + 5); /* one expert takes every row */
    check_sort_case(100, 4, 0, 1000, 0, seed + 6); /* many experts */
    check_sort_case(2049, 1, 3, 5, 0, seed + 7);  /* chunk boundary */
    if (!small_only()) check_sort_case(20000, 8, 0, 128, 0, seed + 8); /* 79 chunks */
    /* T = 0: counts and offsets zero */
    void *dc = dmalloc(16 * 4), *doff = dmalloc(17 * 4);
    OK(moe_cuda_sort_by_expert(0, 8, NULL, 0, 16, dc, doff, NULL, NULL, 0, 0, ERR));
    int32_t o[17];
    d2h(o, doff, sizeof o);
    for (int e = 0; e < 17; e++) assert_int_equal(0, o[e]);
    cudaFree(dc); cudaFree(doff);
}

/* ---- sum over k ---- */

static void fill_normal(moe_dtype dt, size_t n, uint64_t stream, double scale, void *buf)
{
    for (size_t i = 0; i < n; i++) moe_store_elem(dt, buf, i, scale * moe_rng_normal(stream, i));
}

static void check_sum_case(moe_dtype dt, int T, int k, int N, bool scale, bool add, bool add2,
                           bool filter, uint64_t seed)
{
    const size_t es = moe_dtype_size(dt), M = (size_t)T * k;
    const int E = 8, begin = 2, El = 4;
    void *rows = hmalloc(M * N * es), *sc = hmalloc(M * es), *a = hmalloc((size_t)T * N * es),
         *a2 = hmalloc((size_t)T * N * es), *out = hmalloc((size_t)T * N * es),
         *out2 = hmalloc((size_t)T * N * es);
    int32_t *ids = hmalloc(M * 4);
    fill_normal(dt, M * N, moe_rng_stream(seed, "rows"), 1.0, rows);
    fill_normal(dt, M, moe_rng_stream(seed, "scale"), 0.5, sc);
    fill_normal(dt, (size_t)T * N, moe_rng_stream(seed, "add"), 2.0, a);
    fill_normal(dt, (size_t)T * N, moe_rng_stream(seed, "add2"), 2.0, a2);
    for (size_t f = 0; f < M; f++) {
        ids[f] = (int32_t)(moe_rng_u64(moe_rng_stream(seed, "ids"), f) % E);
        bool local = ids[f] >= begin && ids[f] < begin + El;
        if (filter && !local) /* a skipped row must not be read: poison it */
            for (int n = 0; n < N; n++) moe_store_elem(dt, rows, f * N + n, NAN);
    }
    void *drows = dcopy(rows, M * N * es), *dsc = dcopy(sc, M * es), *da = dcopy(a, (size_t)T * N * es),
         *da2 = dcopy(a2, (size_t)T * N * es), *dout = dmalloc((size_t)T * N * es), *dids = dcopy(ids, M * 4);
    for (int rep = 0; rep < 2; rep++) {
        dpoison(dout, (size_t)T * N * es);
        OK(moe_cuda_sum_topk(dt, T, k, N, drows, scale ? dsc : NULL, add ? da : NULL,
                             add2 ? da2 : NULL, filter ? dids : NULL, begin, El, dout, 0, ERR));
        d2h(rep ? out2 : out, dout, (size_t)T * N * es);
    }
    assert_memory_equal(out, out2, (size_t)T * N * es); /* deterministic */
    /* The CPU twin's loop in fp32: acc = add (+ add2), then += row*scale for j ascending. */
    size_t bad = 0;
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            size_t o = (size_t)t * N + n;
            float acc = add ? moe_load_elem_f(dt, a, o) : 0.0f;
            if (add2) acc += moe_load_elem_f(dt, a2, o);
            for (int j = 0; j < k; j++) {
                size_t f = (size_t)t * k + j;
                if (filter && !(ids[f] >= begin && ids[f] < begin + El)) continue;
                float v = moe_load_elem_f(dt, rows, f * N + n);
                if (scale) v *= moe_load_elem_f(dt, sc, f);
                acc += v;
            }
            double want = moe_round_to(dt, acc), got = moe_load_elem(dt, out, o);
            if (!(want == got) && bad++ < 5)
                fprintf(stderr, "  sum[%d,%d] = %.9g, expected %.9g\n", t, n, got, want);
        }
    if (bad)
        fail_msg("sum_topk %s T=%d k=%d N=%d scale=%d add=%d add2=%d filter=%d: %zu elements differ",
                 moe_dtype_name(dt), T, k, N, scale, add, add2, filter, bad);
    free(rows); free(sc); free(a); free(a2); free(out); free(out2); free(ids);
    cudaFree(drows); cudaFree(dsc); cudaFree(da); cudaFree(da2); cudaFree(dout); cudaFree(dids);
}

static void test_sum_topk(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    for (size_t d = 0; d < 3; d++) {
        moe_dtype dt = k_dtypes[d];
        check_sum_case(dt, 37, 3, 41, false, false, false, false, seed);  /* odd N: scalar path */
        check_sum_case(dt, 64, 8, 256, true, false, false, false, seed + 1); /* vector path */
        check_sum_case(dt, 33, 1, 40, false, true, false, false, seed + 2);
        check_sum_case(dt, 20, 2, 64, true, true, true, false, seed + 3);
        check_sum_case(dt, 29, 4, 24, true, true, false, true, seed + 4);  /* skipped experts */
        check_sum_case(dt, 1, 8, 2048, false, true, true, true, seed + 5);
    }
}

/* ---- SiLU-and-mul ---- */

static double silu(double g) { return g / (1.0 + exp(-g)); }

static void test_silu_mul(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    struct { int M, I; } cases[] = {{37, 23}, {64, 256}, {1, 8}, {5, 1}};
    for (size_t d = 0; d < 3; d++)
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            moe_dtype dt = k_dtypes[d];
            int M = cases[c].M, I = cases[c].I;
            size_t es = moe_dtype_size(dt);
            void *gu = hmalloc((size_t)M * 2 * I * es), *act = hmalloc((size_t)M * I * es);
            fill_normal(dt, (size_t)M * 2 * I, moe_rng_stream(seed + c, "gu"), 2.0, gu);
            void *dgu = dcopy(gu, (size_t)M * 2 * I * es), *dact = dmalloc((size_t)M * I * es);
            OK(moe_cuda_silu_mul(dt, M, I, dgu, dact, 0, ERR));
            d2h(act, dact, (size_t)M * I * es);
            for (int m = 0; m < M; m++)
                for (int i = 0; i < I; i++) {
                    double g = moe_load_elem(dt, gu, (size_t)m * 2 * I + i);
                    double u = moe_load_elem(dt, gu, (size_t)m * 2 * I + I + i);
                    double want = moe_round_to(dt, silu(g) * u);
                    double got = moe_load_elem(dt, act, (size_t)m * I + i);
                    if (!close_rel(got, want, ulp_tol(dt), 1e-30))
                        fail_msg("silu_mul %s M=%d I=%d [%d,%d]: %.9g, expected %.9g", moe_dtype_name(dt),
                                 M, I, m, i, got, want);
                }
            free(gu); free(act);
            cudaFree(dgu); cudaFree(dact);
        }
}

/* Twin case (no scale) and the fused Qwen3 case: rows r < M of max_rows (M on the device),
 * dact scaled by topk_w[gather[r]] and rounded, dw[gather[r]] = act_r . dact_r. */
static void check_silu_bwd_case(moe_dtype dt, int max_rows, int M, int I, bool fused, uint64_t seed)
{
    const size_t es = moe_dtype_size(dt);
    const int T = max_rows; /* flat rows = max_rows, gather a permutation of them */
    void *gu = hmalloc((size_t)max_rows * 2 * I * es), *da = hmalloc((size_t)max_rows * I * es),
         *act = hmalloc((size_t)max_rows * I * es), *w = hmalloc((size_t)T * es),
         *out = hmalloc((size_t)max_rows * 2 * I * es);
    int32_t *gather = hmalloc((size_t)max_rows * 4);
    float *dw = hmalloc((size_t)T * 4);
    fill_normal(dt, (size_t)max_rows * 2 * I, moe_rng_stream(seed, "gu"), 2.0, gu);
    fill_normal(dt, (size_t)max_rows * I, moe_rng_stream(seed, "dact"), 1.0, da);
    fill_normal(dt, (size_t)max_rows * I, moe_rng_stream(seed, "act"), 1.0, act);
    for (int f = 0; f < T; f++) moe_store_elem(dt, w, f, moe_rng_uniform(moe_rng_stream(seed, "w"), f));
    for (int r = 0; r < max_rows; r++) gather[r] = r;
    for (int r = max_rows - 1; r > 0; r--) { /* shuffle */
        int q = (int)(moe_rng_u64(moe_rng_stream(seed, "perm"), r) % (uint64_t)(r + 1));
        int32_t tmp = gather[r]; gather[r] = gather[q]; gather[q] = tmp;
    }
    int32_t m32 = M;
    void *dgu = dcopy(gu, (size_t)max_rows * 2 * I * es), *dda = dcopy(da, (size_t)max_rows * I * es),
         *dact = dcopy(act, (size_t)max_rows * I * es), *dwt = dcopy(w, (size_t)T * es),
         *dg = dcopy(gather, (size_t)max_rows * 4), *dm = dcopy(&m32, 4),
         *dout = dmalloc((size_t)max_rows * 2 * I * es), *ddw = dmalloc((size_t)T * 4);
    OK(moe_cuda_silu_mul_backward(dt, max_rows, fused ? dm : NULL, I, dgu, dda, fused ? dwt : NULL,
                                  fused ? dg : NULL, fused ? dact : NULL, fused ? ddw : NULL, dout, 0, ERR));
    d2h(out, dout, (size_t)max_rows * 2 * I * es);
    d2h(dw, ddw, (size_t)T * 4);
    const int rows = fused ? M : max_rows;
    for (int r = 0; r < max_rows; r++) {
        double dot = 0, dot_abs = 0;
        for (int i = 0; i < I; i++) {
            size_t gi = (size_t)r * 2 * I + i, ui = gi + I, ai = (size_t)r * I + i;
            if (r >= rows) { /* untouched rows stay poisoned */
                assert_true(isnan(moe_load_elem(dt, out, gi)) && isnan(moe_load_elem(dt, out, ui)));
                continue;
            }
            double g = moe_load_elem(dt, gu, gi), u = moe_load_elem(dt, gu, ui);
            double d = moe_load_elem(dt, da, ai), a = moe_load_elem(dt, act, ai);
            dot += a * d;
            dot_abs += fabs(a * d);
            if (fused) d = moe_round_to(dt, d * moe_load_elem(dt, w, gather[r]));
            double s = 1.0 / (1.0 + exp(-g));
            double want_g = moe_round_to(dt, d * u * s * (1.0 + g * (1.0 - s)));
            double want_u = moe_round_to(dt, d * g * s);
            double got_g = moe_load_elem(dt, out, gi), got_u = moe_load_elem(dt, out, ui);
            /* fp32 evaluation: a few fp32 ulps of each factor, plus one ulp of the dtype at a
             * rounding boundary. 1 + g (1 - s) cancels near g = -1.28 (silu' = 0), so its fp32
             * error is absolute: ~1e-7 (1 + |g|) times |d u s|. */
            double rel = ulp_tol(dt) + 1e-6;
            double floor_g = 1e-6 * fabs(d * u * s) * (1.0 + fabs(g)) + 1e-30;
            if (!close_rel(got_g, want_g, rel, floor_g) || !close_rel(got_u, want_u, rel, 1e-30))
                fail_msg("silu_mul_backward %s fused=%d I=%d [%d,%d]: dg %.9g (want %.9g) du %.9g (want %.9g)",
                         moe_dtype_name(dt), fused, I, r, i, got_g, want_g, got_u, want_u);
        }
        if (fused && r < rows && !close_rel(dw[gather[r]], dot, 0, 1e-5 * dot_abs + 1e-30))
            fail_msg("silu_mul_backward dw[%d] = %.9g, expected %.9g", gather[r], dw[gather[r]], dot);
    }
    free(gu); free(da); free(act); free(w); free(out); free(gather); free(dw);
    cudaFree(dgu); cudaFree(dda); cudaFree(dact); cudaFree(dwt); cudaFree(dg); cudaFree(dm);
    cudaFree(dout); cudaFree(ddw);
}

static void test_silu_mul_backward(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    for (size_t d = 0; d < 3; d++) {
        check_silu_bwd_case(k_dtypes[d], 37, 37, 23, false, seed);
        check_silu_bwd_case(k_dtypes[d], 64, 64, 768, false, seed + 1);
        check_silu_bwd_case(k_dtypes[d], 50, 31, 19, true, seed + 2);
        check_silu_bwd_case(k_dtypes[d], 40, 40, 256, true, seed + 3);
        check_silu_bwd_case(k_dtypes[d], 9, 0, 16, true, seed + 4); /* M = 0 on the device */
    }
}

/* ---- router backward ---- */

static void check_router_bwd_case(moe_arch arch, bool norm, int E, int k, int T, moe_dtype dt, uint64_t seed)
{
    moe_config cfg = {.arch = arch, .num_experts = E, .top_k = k, .norm_topk_prob = norm,
                      .hidden = 1, .inter = 1};
    const size_t es = moe_dtype_size(dt), nl = (size_t)T * E, nk = (size_t)T * k;
    void *hl = hmalloc(nl * es), *out = hmalloc(nl * es);
    int32_t *ids = hmalloc(nk * 4);
    double *wref = hmalloc(nk * sizeof(double)), *ref = hmalloc(nl * sizeof(double)),
           *got = hmalloc(nl * sizeof(double)), *p = hmalloc((size_t)E * sizeof(double)),
           *dd = hmalloc((size_t)k * sizeof(double));
    float *dw = hmalloc(nk * 4);
    fill_logits(dt, T, E, moe_rng_stream(seed, "logits"), hl);
    ref_route(&cfg, dt, T, hl, ids, wref);
    for (size_t i = 0; i < nk; i++) dw[i] = (float)moe_rng_normal(moe_rng_stream(seed, "dw"), i);
    for (int t = 0; t < T; t++) {
        const int32_t *id = ids + (size_t)t * k;
        for (int j = 0; j < k; j++) dd[j] = dw[(size_t)t * k + j];
        for (int e = 0; e < E; e++) p[e] = moe_load_elem(dt, hl, (size_t)t * E + e);
        moe_test_router_bwd_ref(arch != MOE_ARCH_QWEN3, norm, E, k, p, id, dd, ref + (size_t)t * E);
    }
    void *dl = dcopy(hl, nl * es), *dids = dcopy(ids, nk * 4), *ddw = dcopy(dw, nk * 4),
         *dout = dmalloc(nl * es);
    OK(moe_cuda_router_backward(&cfg, dt, T, dl, dids, ddw, dout, 0, ERR));
    d2h(out, dout, nl * es);
    for (size_t i = 0; i < nl; i++) {
        got[i] = moe_load_elem(dt, out, i);
        /* gradient only where the math puts it: exact zeros elsewhere */
        if (ref[i] == 0.0 && got[i] != 0.0)
            fail_msg("router_backward: dlogits[%zu] = %g where the gradient is zero", i, got[i]);
    }
    char what[96];
    snprintf(what, sizeof what, "router bwd %s%s E=%d k=%d %s", arch == MOE_ARCH_QWEN3 ? "qwen3" : "llama4",
             norm ? " norm" : "", E, k, moe_dtype_name(dt));
    moe_test_assert_close(what, got, ref, (size_t)T, (size_t)E, moe_test_tol(dt, true));
    free(hl); free(out); free(ids); free(wref); free(ref); free(got); free(p); free(dd); free(dw);
    cudaFree(dl); cudaFree(dids); cudaFree(ddw); cudaFree(dout);
}

static void test_router_backward(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    struct { int E, k, T; } cases[] = {{128, 8, 257}, {16, 1, 64}, {7, 3, 40}, {257, 13, 17}, {5, 5, 3}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (size_t d = 0; d < 3; d++) {
            check_router_bwd_case(MOE_ARCH_QWEN3, true, cases[c].E, cases[c].k, cases[c].T, k_dtypes[d], seed + c);
            check_router_bwd_case(MOE_ARCH_QWEN3, false, cases[c].E, cases[c].k, cases[c].T, k_dtypes[d], seed + c);
            check_router_bwd_case(MOE_ARCH_LLAMA4, false, cases[c].E, cases[c].k, cases[c].T, k_dtypes[d], seed + c);
        }
}

/* ---- row dot ---- */

static void test_row_dot(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    struct { int T, k, N; bool filter; } cases[] = {{37, 3, 41, false}, {64, 1, 5120, false}, {20, 4, 64, true}};
    for (size_t d = 0; d < 3; d++)
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            moe_dtype dt = k_dtypes[d];
            int T = cases[c].T, k = cases[c].k, N = cases[c].N, R = T * k;
            size_t es = moe_dtype_size(dt);
            void *A = hmalloc((size_t)T * N * es), *B = hmalloc((size_t)R * N * es);
            int32_t *ids = hmalloc((size_t)R * 4);
            float *out = hmalloc((size_t)R * 4);
            fill_normal(dt, (size_t)T * N, moe_rng_stream(seed + c, "A"), 1.0, A);
            fill_normal(dt, (size_t)R * N, moe_rng_stream(seed + c, "B"), 1.0, B);
            for (int f = 0; f < R; f++) {
                ids[f] = (int32_t)(moe_rng_u64(moe_rng_stream(seed + c, "ids"), f) % 6);
                if (cases[c].filter && !(ids[f] >= 1 && ids[f] < 4))
                    for (int n = 0; n < N; n++) moe_store_elem(dt, B, (size_t)f * N + n, NAN);
            }
            void *dA = dcopy(A, (size_t)T * N * es), *dB = dcopy(B, (size_t)R * N * es),
                 *dids = dcopy(ids, (size_t)R * 4), *dout = dmalloc((size_t)R * 4);
            OK(moe_cuda_row_dot(dt, R, N, dA, k, dB, cases[c].filter ? dids : NULL, 1, 3, dout, 0, ERR));
            d2h(out, dout, (size_t)R * 4);
            for (int f = 0; f < R; f++) {
                if (cases[c].filter && !(ids[f] >= 1 && ids[f] < 4)) {
                    assert_true(out[f] == 0.0f);
                    continue;
                }
                double dot = 0, dabs = 0;
                for (int n = 0; n < N; n++) {
                    double v = moe_load_elem(dt, A, (size_t)(f / k) * N + n) * moe_load_elem(dt, B, (size_t)f * N + n);
                    dot += v;
                    dabs += fabs(v);
                }
                if (!close_rel(out[f], dot, 0, 1e-5 * dabs + 1e-30))
                    fail_msg("row_dot %s row %d: %.9g, expected %.9g", moe_dtype_name(dt), f, out[f], dot);
            }
            free(A); free(B); free(ids); free(out);
            cudaFree(dA); cudaFree(dB); cudaFree(dids); cudaFree(dout);
        }
}

/* ---- argument checks ---- */

/* ---- the one-launch route of small batches (moe_cuda_route_small) ---- */

/* The one-launch route counts tokens with non-finite logits as moe_cuda_route_topk does: x rows
 * holding a NaN or an infinity give such logits, the others none. */
static void test_route_small_nonfinite(void **state)
{
    (void)state;
    const uint64_t seed = moe_test_seed();
    const int E = 16, k = 2, H = 64, T = 9, El = 16;
    moe_config cfg = {.arch = MOE_ARCH_QWEN3, .num_experts = E, .top_k = k, .norm_topk_prob = true,
                      .hidden = H, .inter = 1};
    const moe_dtype dt = MOE_DTYPE_BF16;
    const size_t es = moe_dtype_size(dt), nx = (size_t)T * H, nw = (size_t)E * H, nk = (size_t)T * k;
    void *hx = hmalloc(nx * es), *hw = hmalloc(nw * es);
    fill_normal(dt, nx, moe_rng_stream(seed, "nf-x"), 1.0, hx);
    fill_normal(dt, nw, moe_rng_stream(seed, "nf-router"), 1.0 / sqrt((double)H), hw);
    moe_store_elem(dt, hx, 2 * (size_t)H + 5, NAN);      /* token 2 */
    moe_store_elem(dt, hx, 6 * (size_t)H + 0, INFINITY); /* token 6 */
    moe_store_elem(dt, hx, 7 * (size_t)H + 9, -INFINITY); /* token 7 */
    void *dx = dcopy(hx, nx * es), *drouter = dcopy(hw, nw * es);
    void *dl = dmalloc((size_t)T * E * es), *dw = dmalloc(nk * es), *dids = dmalloc(nk * 4);
    void *dc = dmalloc((size_t)El * 4), *doff = dmalloc((size_t)(El + 1) * 4), *dg = dmalloc(nk * 4);
    int *counter = NULL;
    uint32_t *dcount = NULL;
    assert_int_equal(cudaSuccess, cudaMalloc((void **)&counter, sizeof(int)));
    assert_int_equal(cudaSuccess, cudaMemset(counter, 0, sizeof(int)));
    assert_int_equal(cudaSuccess, cudaMalloc((void **)&dcount, sizeof *dcount));
    assert_int_equal(cudaSuccess, cudaMemset(dcount, 0, sizeof *dcount));
    OK(moe_cuda_route_small(&cfg, dt, T, dx, drouter, dl, dids, dw, 0, El, dc, doff, dg, counter, dcount, 0, ERR));
    uint32_t got = 0;
    d2h(&got, dcount, sizeof got);
    assert_int_equal(3, got);
    int32_t ids[2 * 9];
    d2h(ids, dids, sizeof ids);
    for (size_t i = 0; i < nk; i++) assert_true(ids[i] >= 0 && ids[i] < E);
    free(hx); free(hw);
    cudaFree(dx); cudaFree(drouter); cudaFree(dl); cudaFree(dw); cudaFree(dids); cudaFree(dc);
    cudaFree(doff); cudaFree(dg); cudaFree(counter); cudaFree(dcount);
}

/* x [T,H] and router [E,H] drawn normal (logits ~ N(0,1)); the router's last row copies its
 * first, so those two logits tie exactly in every token (the same sum in the same order). The
 * one launch against a double-precision router GEMM (each logit within one rounding of the
 * dtype: only the fp32 summation order differs), and bit for bit against routing.cu's top-k
 * and sort kernels run on its own logits; launched twice (its count-in counter must be back
 * at zero after each launch) and the second run identical. */
static void check_route_small_case(moe_arch arch, bool norm, int E, int k, int H, int T, int begin,
                                   int El, moe_dtype dt, uint64_t seed)
{
    moe_config cfg = {.arch = arch, .num_experts = E, .top_k = k, .norm_topk_prob = norm,
                      .hidden = H, .inter = 1};
    assert_true(moe_cuda_route_small_fits(&cfg, T, El));
    const size_t es = moe_dtype_size(dt), nx = (size_t)T * H, nw = (size_t)E * H;
    const size_t nl = (size_t)T * E, nk = (size_t)T * k;
    void *hx = hmalloc(nx * es), *hw = hmalloc(nw * es);
    fill_normal(dt, nx, moe_rng_stream(seed, "small-x"), 1.0, hx);
    fill_normal(dt, nw, moe_rng_stream(seed, "small-router"), 1.0 / sqrt((double)H), hw);
    if (E > 1) memcpy((char *)hw + (size_t)(E - 1) * H * es, hw, (size_t)H * es);
    void *dx = dcopy(hx, nx * es), *drouter = dcopy(hw, nw * es);
    void *dl = dmalloc(nl * es), *dw = dmalloc(nk * es), *dids = dmalloc(nk * 4);
    void *dc = dmalloc((size_t)El * 4), *doff = dmalloc((size_t)(El + 1) * 4), *dg = dmalloc(nk * 4);
    int *counter = NULL;
    assert_int_equal(cudaSuccess, cudaMalloc((void **)&counter, sizeof(int)));
    assert_int_equal(cudaSuccess, cudaMemset(counter, 0, sizeof(int)));
    /* the per-stage path's outputs on the same logits */
    void *dw2 = dmalloc(nk * es), *dids2 = dmalloc(nk * 4), *dc2 = dmalloc((size_t)El * 4);
    void *doff2 = dmalloc((size_t)(El + 1) * 4), *dg2 = dmalloc(nk * 4);
    const size_t sb = moe_cuda_sort_scratch_bytes(T, k, El);
    void *scratch = dmalloc(sb);

    unsigned char *first[5] = {NULL};
    const size_t bytes[5] = {nk * 4, nk * es, (size_t)El * 4, (size_t)(El + 1) * 4, nk * 4};
    void *const fused[5] = {dids, dw, dc, doff, dg}, *const staged[5] = {dids2, dw2, dc2, doff2, dg2};
    static const char *const what[5] = {"topk_ids", "topk_w", "token_counts", "expert_offsets", "gather_idx"};
    char where[160];
    snprintf(where, sizeof where, "route_small %s E=%d k=%d H=%d T=%d local [%d,+%d) %s",
             arch == MOE_ARCH_QWEN3 ? "qwen3" : "llama4", E, k, H, T, begin, El, moe_dtype_name(dt));
    for (int rep = 0; rep < 2; rep++) {
        dpoison(dl, nl * es);
        for (int i = 0; i < 5; i++) dpoison(fused[i], bytes[i]);
        OK(moe_cuda_route_small(&cfg, dt, T, dx, drouter, dl, dids, dw, begin, El, dc, doff, dg, counter, NULL,
                                0, ERR));
        int back = -1;
        d2h(&back, counter, sizeof back);
        if (back != 0) fail_msg("%s: count-in counter left at %d", where, back);
        if (rep == 0) {
            /* logits against the double-precision GEMM */
            unsigned char *hl = hmalloc(nl * es);
            d2h(hl, dl, nl * es);
            for (int t = 0; t < T; t++)
                for (int e = 0; e < E; e++) {
                    double ref = 0;
                    for (int h = 0; h < H; h++)
                        ref += moe_load_elem(dt, hx, (size_t)t * H + h) * moe_load_elem(dt, hw, (size_t)e * H + h);
                    const double got = moe_load_elem(dt, hl, (size_t)t * E + e);
                    if (!close_rel(got, moe_round_to(dt, ref), 1.01 * ulp_tol(dt), 1e-5))
                        fail_msg("%s: logit [%d,%d] = %.9g, double GEMM %.9g", where, t, e, got, ref);
                    if (e == E - 1 && E > 1 &&
                        got != moe_load_elem(dt, hl, (size_t)t * E)) /* the copied row: a tie */
                        fail_msg("%s: tied logits [%d,0] and [%d,%d] differ", where, t, t, e);
                }
            free(hl);
            /* the per-stage kernels on the same logits */
            for (int i = 0; i < 5; i++) dpoison(staged[i], bytes[i]);
            OK(moe_cuda_route_topk(&cfg, dt, T, dl, dids2, dw2, NULL, 0, ERR));
            OK(moe_cuda_sort_by_expert(T, k, dids2, begin, El, dc2, doff2, dg2, scratch, sb, 0, ERR));
        }
        for (int i = 0; i < 5; i++) {
            unsigned char *got = hmalloc(bytes[i]);
            d2h(got, fused[i], bytes[i]);
            if (rep == 0) {
                unsigned char *want = hmalloc(bytes[i]);
                d2h(want, staged[i], bytes[i]);
                if (memcmp(got, want, bytes[i]) != 0)
                    fail_msg("%s: %s differs from the per-stage kernels' on the same logits", where, what[i]);
                free(want);
                first[i] = got;
            } else {
                if (memcmp(got, first[i], bytes[i]) != 0) fail_msg("%s: %s differs run to run", where, what[i]);
                free(got);
            }
        }
    }
    for (int i = 0; i < 5; i++) free(first[i]);
    free(hx); free(hw);
    cudaFree(dx); cudaFree(drouter); cudaFree(dl); cudaFree(dw); cudaFree(dids); cudaFree(dc);
    cudaFree(doff); cudaFree(dg); cudaFree(counter); cudaFree(dw2); cudaFree(dids2); cudaFree(dc2);
    cudaFree(doff2); cudaFree(dg2); cudaFree(scratch);
}

static void test_route_small(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    /* Qwen3-30B-A3B's router (16-byte loads), decode sizes, the largest T, a local range */
    const int qt[4] = {1, 8, 9, 32};
    for (int i = 0; i < 4; i++)
        check_route_small_case(MOE_ARCH_QWEN3, true, 128, 8, 2048, qt[i], 0, 128, MOE_DTYPE_BF16, seed + i);
    check_route_small_case(MOE_ARCH_QWEN3, true, 128, 8, 2048, 9, 32, 64, MOE_DTYPE_BF16, seed + 4);
    check_route_small_case(MOE_ARCH_QWEN3, false, 128, 8, 2048, 3, 0, 128, MOE_DTYPE_F16, seed + 5);
    /* Llama-4-Scout's (E = 16: two blocks of experts; k = 1), bf16 and fp16 */
    check_route_small_case(MOE_ARCH_LLAMA4, false, 16, 1, 5120, 1, 0, 16, MOE_DTYPE_BF16, seed + 6);
    check_route_small_case(MOE_ARCH_LLAMA4, false, 16, 1, 5120, 17, 4, 8, MOE_DTYPE_F16, seed + 7);
    /* odd H (element loads), E < 8, every dtype; fp32 with 16-byte loads; k = E */
    for (int d = 0; d < 3; d++) {
        check_route_small_case(MOE_ARCH_QWEN3, true, 7, 3, 37, 5, 0, 7, k_dtypes[d], seed + 8 + d);
        check_route_small_case(MOE_ARCH_LLAMA4, false, 7, 3, 37, 1, 2, 3, k_dtypes[d], seed + 11 + d);
    }
    check_route_small_case(MOE_ARCH_QWEN3, true, 60, 4, 64, 32, 0, 60, MOE_DTYPE_F32, seed + 14);
    check_route_small_case(MOE_ARCH_QWEN3, false, 60, 60, 16, 32, 0, 60, MOE_DTYPE_BF16, seed + 15);
    /* what does not fit is refused with the reason, nothing launched */
    moe_config cfg = {.arch = MOE_ARCH_QWEN3, .num_experts = 128, .top_k = 8, .hidden = 64, .inter = 1};
    assert_false(moe_cuda_route_small_fits(&cfg, MOE_ROUTE_SMALL_MAX_T + 1, 128));
    assert_false(moe_cuda_route_small_fits(&cfg, 0, 128));
    cfg.top_k = 128;
    assert_false(moe_cuda_route_small_fits(&cfg, 32, 128)); /* T*k = 4096 > one sort chunk */
    cfg.top_k = 8;
    cfg.num_experts = 4096;
    assert_false(moe_cuda_route_small_fits(&cfg, 1, 64)); /* 8 x 4096 scores: 128 KB */
    cfg.num_experts = 128;
    void *d = dmalloc(1 << 20);
    moe_error e = {0};
    assert_int_equal(MOE_ERR_INVALID_ARG,
                     moe_cuda_route_small(&cfg, MOE_DTYPE_BF16, MOE_ROUTE_SMALL_MAX_T + 1, d, d, d, d, d, 0,
                                          128, d, d, d, d, NULL, 0, &e));
    assert_non_null(strstr(e.msg, "does not fit"));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_route_small(&cfg, MOE_DTYPE_BF16, 4, d, d, d, d, d, 0,
                                                               128, d, d, d, NULL, NULL, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_route_small(&cfg, MOE_DTYPE_I32, 4, d, d, d, d, d, 0,
                                                               128, d, d, d, d, NULL, 0, &e));
    assert_int_equal(cudaSuccess, cudaDeviceSynchronize());
    assert_int_equal(cudaSuccess, cudaGetLastError());
    cudaFree(d);
}

static void test_invalid_args(void **state)
{
    (void)state;
    moe_error e = {0};
    void *d = dmalloc(4096);
    moe_config cfg = {.arch = MOE_ARCH_QWEN3, .num_experts = 4, .top_k = 5, .hidden = 1, .inter = 1};
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_route_topk(&cfg, MOE_DTYPE_BF16, 3, d, d, d, NULL, 0, &e));
    assert_non_null(strstr(e.msg, "top_k"));
    cfg.top_k = 2;
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_route_topk(&cfg, MOE_DTYPE_I32, 3, d, d, d, NULL, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_route_topk(NULL, MOE_DTYPE_BF16, 3, d, d, d, NULL, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_route_topk(&cfg, MOE_DTYPE_BF16, 3, NULL, d, d, NULL, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG,
                     moe_cuda_sort_by_expert(8, 2, d, 0, 4, d, d, d, NULL, 0, 0, &e)); /* no scratch */
    assert_non_null(strstr(e.msg, "scratch"));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_sort_by_expert(8, 2, d, 0, 0, d, d, d, d, 4096, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG,
                     moe_cuda_sum_topk(MOE_DTYPE_F64, 2, 2, 8, d, NULL, NULL, NULL, NULL, 0, 0, d, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG,
                     moe_cuda_sum_topk(MOE_DTYPE_F32, 2, 0, 8, d, NULL, NULL, NULL, NULL, 0, 0, d, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_silu_mul_backward(MOE_DTYPE_F32, 4, NULL, 8, d, d, NULL,
                                                                     NULL, d, (float *)d, d, 0, &e));
    assert_non_null(strstr(e.msg, "gather_idx"));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_row_dot(MOE_DTYPE_F32, 4, 8, d, 0, d, NULL, 0, 0, (float *)d, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_cuda_silu_mul(MOE_DTYPE_BF16, 4, 0, d, d, 0, &e));
    assert_int_equal(MOE_ERR_INVALID_ARG,
                     moe_cuda_router_backward(&cfg, MOE_DTYPE_BF16, 3, d, d, NULL, d, 0, &e));
    /* nothing was launched with bad arguments, and no error is pending */
    assert_int_equal(cudaSuccess, cudaDeviceSynchronize());
    assert_int_equal(cudaSuccess, cudaGetLastError());
    cudaFree(d);
}
#endif /* MOE_HAVE_CUDA */

MOE_TEST_GPU_MAIN(
    cmocka_unit_test(test_route_topk),       cmocka_unit_test(test_route_nan),
    cmocka_unit_test(test_route_nonfinite),  cmocka_unit_test(test_sort),
    cmocka_unit_test(test_sum_topk),         cmocka_unit_test(test_silu_mul),
    cmocka_unit_test(test_silu_mul_backward), cmocka_unit_test(test_router_backward),
    cmocka_unit_test(test_row_dot),          cmocka_unit_test(test_route_small),
    cmocka_unit_test(test_route_small_nonfinite), cmocka_unit_test(test_invalid_args))
