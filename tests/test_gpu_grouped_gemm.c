/*
 * test_gpu_grouped_gemm.c — the CUDA grouped GEMM kernels (forward / dX: moe_cuda_grouped_gemm,
 * dW: moe_cuda_grouped_gemm_dw) against a double-precision loop written here, on random data
 * from a fresh seed, for bf16, fp16 and fp32:
 *   - every flag combination (permute_x / permute_y / b_kn / scale_a / scale_c / SiLU-and-mul
 *     with and without C_preact; dW: permute_dy / permute_x / scale_dy / scale_x) on odd shapes:
 *     N=13, K=37 (rows not 16-byte multiples: the narrow path), partial tiles in every dimension,
 *     experts with no rows, one expert taking every row, fewer routed rows than max_rows;
 *   - every compiled configuration; a misaligned base pointer;
 *   - the Hopper wgmma/TMA kernel (",tma" configurations): every forward flag combination with
 *     B [N,K] and B [K,N] (b_kn) on partial / one-expert / empty-expert / long-K shapes and one
 *     with n_out = 100 (not a multiple of 8: the epilogue's 4-byte stores instead of its 16-byte
 *     ones; b_kn with N = 100 falls back to mma.sync), bf16 and fp16, the persistent grid capped
 *     to 1 and 3 CTAs (moe_kernel_tuning.max_ctas) with the dynamic and the static tile order, the real
 *     forward and dX GEMMs at T=1024 (sampled), determinism, and the unaligned-K fallback named
 *     in the report;
 *   - the tiny presets' shapes (H=37,I=23,E=7,k=3 and H=41,I=19,E=5,k=1) and the real ones at
 *     T=1024 (Qwen3-30B-A3B, Llama-4-Scout): all six GEMMs of forward + backward, checked on a
 *     sample of experts/rows (weights too large for a full double loop);
 *   - outputs poisoned with NaN first, rows nobody should write must stay poisoned;
 *   - determinism (two runs bitwise equal), argument rejections, and the autotuner's cache
 *     (second pick does no tuning, caller outputs untouched). Configuration strings:
 *     test_kernel_config.c (no GPU needed).
 * MOE_GG_TEST_SMALL=1 keeps only the small cases (for compute-sanitizer runs).
 * Without a GPU: skipped (77), or failed with MOE_REQUIRE_GPU=1.
 */
#include "test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cuda/autotune.h"
#include "cuda/kernel_config.h"
#include "cuda/kernel_launch.h"
#include "dtype.h"
#include "moe_kernels.h"
#include "rng.h"

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                    */

#define CK(call)                                                                           \
    do {                                                                                   \
        cudaError_t ck_e_ = (call);                                                        \
        if (ck_e_ != cudaSuccess) {                                                        \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                  \
                    cudaGetErrorString(ck_e_));                                            \
            fail();                                                                        \
        }                                                                                  \
    } while (0)

static bool small_only(void)
{
    const char *s = getenv("MOE_GG_TEST_SMALL");
    return s && *s && strcmp(s, "0") != 0;
}

/* How this file launches (moe_kernel_tuning, moe_kernels.h): the defaults with tile-scheduler
 * counters of its own, as the layer runs (every launch here is on stream 0, one after the
 * other; test_wgmma_two_streams brings counters for its second stream), changed by the tests
 * that need a cap, the static order, a timing knob or exact_hf_rounding, and put back by
 * tuning_reset (also each test's teardown, so a failed test leaves nothing behind). */
static moe_kernel_tuning g_tuning;
static int32_t *g_sched;

static void tuning_reset(void)
{
    if (!g_sched) {
        moe_error err;
        moe_error_clear(&err);
        if (moe_sched_counters_alloc(&g_sched, 0, &err) != MOE_OK) fail_msg("%s", err.msg);
    }
    memset(&g_tuning, 0, sizeof g_tuning);
    g_tuning.sched_counters = g_sched;
}

/* The launchers through the host's resolve-and-launch (req NULL or partial: the resolution the
 * layer does) with g_tuning. */
static moe_status gg_fwd(const moe_grouped_gemm_args *a, const moe_kernel_config *req, cudaStream_t s,
                         moe_kernel_report *rep, moe_error *err)
{
    if (!g_sched) tuning_reset();
    return moe_grouped_gemm_launch(a, req, &g_tuning, s, rep, err);
}
static moe_status gg_dw(const moe_grouped_gemm_dw_args *a, const moe_kernel_config *req, cudaStream_t s,
                        moe_kernel_report *rep, moe_error *err)
{
    if (!g_sched) tuning_reset();
    return moe_grouped_gemm_dw_launch(a, req, &g_tuning, s, rep, err);
}

static const moe_dtype k_dtypes[3] = {MOE_DTYPE_BF16, MOE_DTYPE_F16, MOE_DTYPE_F32};

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

static uint64_t g_ctr; /* distinct rng streams for every tensor of the run */
static uint64_t next_stream(const char *what)
{
    char name[96];
    snprintf(name, sizeof name, "gg-%s-%llu", what, (unsigned long long)g_ctr++);
    return moe_rng_stream(moe_test_seed(), name);
}

/* A pool of P random values per dtype (host bits, host doubles, device copy). A "pooled" tensor
 * has element i = pool[(i + salt) % P]: any size (the 2.7 GB Llama-4 expert weights) is filled
 * on the device by copies from the pool, and the reference reads the same values. P is prime,
 * so no row of a weight repeats another at the same offset. */
#define POOL_P 1048573u
typedef struct pool {
    bool ready;
    double *d;
    void *dev;
} pool;
static pool g_pool[3];

static int dt_index(moe_dtype dt) { return dt == MOE_DTYPE_BF16 ? 0 : dt == MOE_DTYPE_F16 ? 1 : 2; }

static pool *get_pool(moe_dtype dt)
{
    pool *p = &g_pool[dt_index(dt)];
    if (p->ready) return p;
    size_t es = moe_dtype_size(dt);
    void *bits = xmalloc(POOL_P * es);
    p->d = xmalloc(POOL_P * sizeof(double));
    uint64_t s = next_stream("pool");
    for (size_t i = 0; i < POOL_P; i++) {
        moe_store_elem(dt, bits, i, moe_rng_normal(s, i));
        p->d[i] = moe_load_elem(dt, bits, i);
    }
    CK(cudaMalloc(&p->dev, POOL_P * es));
    CK(cudaMemcpy(p->dev, bits, POOL_P * es, cudaMemcpyHostToDevice));
    free(bits);
    p->ready = true;
    return p;
}

/* A device tensor with its reference values: pooled (hd NULL) or explicit (hd[n]). */
typedef struct tt {
    moe_dtype dt;
    size_t n;
    void *dev;  /* what the kernel sees (may be offset into alloc) */
    void *alloc;
    double *hd;
    size_t salt;
} tt;

static void tt_pooled(tt *t, moe_dtype dt, size_t n, size_t offset_elems)
{
    memset(t, 0, sizeof *t);
    t->dt = dt;
    t->n = n;
    pool *p = get_pool(dt);
    size_t es = moe_dtype_size(dt);
    t->salt = moe_rng_u64(next_stream("salt"), 0) % POOL_P;
    CK(cudaMalloc(&t->alloc, (n + offset_elems) * es + 16));
    t->dev = (char *)t->alloc + offset_elems * es;
    for (size_t i = 0; i < n;) {
        size_t pi = (i + t->salt) % POOL_P, len = POOL_P - pi;
        if (len > n - i) len = n - i;
        CK(cudaMemcpy((char *)t->dev + i * es, (char *)p->dev + pi * es, len * es,
                      cudaMemcpyDeviceToDevice));
        i += len;
    }
}

/* Explicit values in [lo, hi) (row scales: positive, like routing weights). */
static void tt_uniform(tt *t, moe_dtype dt, size_t n, double lo, double hi)
{
    memset(t, 0, sizeof *t);
    t->dt = dt;
    t->n = n;
    size_t es = moe_dtype_size(dt);
    void *bits = xmalloc(n * es);
    t->hd = xmalloc(n * sizeof(double));
    uint64_t s = next_stream("uniform");
    for (size_t i = 0; i < n; i++) {
        moe_store_elem(dt, bits, i, lo + (hi - lo) * moe_rng_uniform(s, i));
        t->hd[i] = moe_load_elem(dt, bits, i);
    }
    CK(cudaMalloc(&t->alloc, n * es + 16));
    t->dev = t->alloc;
    CK(cudaMemcpy(t->dev, bits, n * es, cudaMemcpyHostToDevice));
    free(bits);
}

/* An output, poisoned: all-ones bits are NaN in bf16, fp16 and fp32. */
static void tt_out(tt *t, moe_dtype dt, size_t n)
{
    memset(t, 0, sizeof *t);
    t->dt = dt;
    t->n = n;
    CK(cudaMalloc(&t->alloc, n * moe_dtype_size(dt) + 16));
    t->dev = t->alloc;
    CK(cudaMemset(t->dev, 0xFF, n * moe_dtype_size(dt)));
}

static void tt_free(tt *t)
{
    if (t->alloc) cudaFree(t->alloc);
    free(t->hd);
    memset(t, 0, sizeof *t);
}

static double tt_at(const tt *t, size_t i)
{
    return t->hd ? t->hd[i] : get_pool(t->dt)->d[(i + t->salt) % POOL_P];
}

/* Elements [start, start+len) as doubles. */
static void tt_run(const tt *t, size_t start, size_t len, double *out)
{
    if (t->hd) {
        memcpy(out, t->hd + start, len * sizeof(double));
        return;
    }
    const double *d = get_pool(t->dt)->d;
    for (size_t i = 0; i < len;) {
        size_t pi = (start + i + t->salt) % POOL_P, l = POOL_P - pi;
        if (l > len - i) l = len - i;
        memcpy(out + i, d + pi, l * sizeof(double));
        i += l;
    }
}

/* Device elements [start, start+len) of an output as doubles. */
static void dev_read(const tt *t, size_t start, size_t len, double *out)
{
    size_t es = moe_dtype_size(t->dt);
    void *buf = xmalloc(len * es);
    CK(cudaMemcpy(buf, (const char *)t->dev + start * es, len * es, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < len; i++) out[i] = moe_load_elem(t->dt, buf, i);
    free(buf);
}

static double rnd(double v, moe_dtype dt) { return moe_round_to(dt, v); }

/* ------------------------------------------------------------------------------------------ */
/* routing                                                                                    */

enum { R_RANDOM, R_SKEWED, R_ONE, R_DROP };

typedef struct route {
    int T, k, E, max_rows, M;
    int32_t *offsets, *gather, *row_e;
    int32_t *d_offsets, *d_gather;
} route;

/* Token t picks k distinct experts: R_RANDOM from [0,E); R_SKEWED only experts e % 3 != 1 (so
 * some get no rows); R_ONE (k=1) all tokens to expert E/2; R_DROP from [0, 2E), keeping only
 * those < E (a rank's local experts: fewer rows than max_rows = T*k). Rows sorted by expert,
 * stable in the flat index t*k+j. */
static void make_route(route *rt, int T, int k, int E, int mode)
{
    memset(rt, 0, sizeof *rt);
    rt->T = T;
    rt->k = k;
    rt->E = E;
    rt->max_rows = T * k;
    int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)T * k);
    uint64_t s = next_stream("route");
    uint64_t ctr = 0;
    int range = mode == R_DROP ? 2 * E : E;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            int e;
            bool ok;
            do {
                if (mode == R_ONE) {
                    e = E / 2;
                } else {
                    e = (int)(moe_rng_u64(s, ctr++) % (uint64_t)range);
                }
                ok = !(mode == R_SKEWED && e % 3 == 1);
                for (int q = 0; q < j && ok; q++) ok = ids[t * k + q] != e;
            } while (!ok && mode != R_ONE);
            ids[t * k + j] = e;
        }
    rt->offsets = xmalloc(sizeof(int32_t) * (E + 1));
    memset(rt->offsets, 0, sizeof(int32_t) * (E + 1));
    for (int f = 0; f < T * k; f++)
        if (ids[f] < E) rt->offsets[ids[f] + 1]++;
    for (int e = 0; e < E; e++) rt->offsets[e + 1] += rt->offsets[e];
    rt->M = rt->offsets[E];
    rt->gather = xmalloc(sizeof(int32_t) * (rt->M + 1));
    rt->row_e = xmalloc(sizeof(int32_t) * (rt->M + 1));
    int32_t *fill = xmalloc(sizeof(int32_t) * E);
    memcpy(fill, rt->offsets, sizeof(int32_t) * E);
    for (int f = 0; f < T * k; f++)
        if (ids[f] < E) {
            int r = fill[ids[f]]++;
            rt->gather[r] = f;
            rt->row_e[r] = ids[f];
        }
    free(fill);
    free(ids);
    CK(cudaMalloc((void **)&rt->d_offsets, sizeof(int32_t) * (E + 1)));
    CK(cudaMemcpy(rt->d_offsets, rt->offsets, sizeof(int32_t) * (E + 1), cudaMemcpyHostToDevice));
    CK(cudaMalloc((void **)&rt->d_gather, sizeof(int32_t) * (rt->M + 1)));
    CK(cudaMemcpy(rt->d_gather, rt->gather, sizeof(int32_t) * (rt->M + 1), cudaMemcpyHostToDevice));
}

static void free_route(route *rt)
{
    cudaFree(rt->d_offsets);
    cudaFree(rt->d_gather);
    free(rt->offsets);
    free(rt->gather);
    free(rt->row_e);
    memset(rt, 0, sizeof *rt);
}

static int rows_of(const route *rt, int e) { return rt->offsets[e + 1] - rt->offsets[e]; }

/* Which experts to check: all (sample 0) or `sample` of them: the biggest, any empty one, and
 * random others. Returns the count written to out (size E). */
static int pick_experts(const route *rt, int sample, int *out)
{
    if (sample <= 0 || sample >= rt->E) {
        for (int e = 0; e < rt->E; e++) out[e] = e;
        return rt->E;
    }
    int n = 0, big = 0;
    for (int e = 1; e < rt->E; e++)
        if (rows_of(rt, e) > rows_of(rt, big)) big = e;
    out[n++] = big;
    for (int e = 0; e < rt->E && n < sample; e++)
        if (rows_of(rt, e) == 0) {
            out[n++] = e;
            break;
        }
    uint64_t s = next_stream("pick-e");
    for (uint64_t c = 0; n < sample && c < 1000; c++) {
        int e = (int)(moe_rng_u64(s, c) % (uint64_t)rt->E);
        bool dup = false;
        for (int q = 0; q < n; q++) dup |= out[q] == e;
        if (!dup) out[n++] = e;
    }
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* forward / dX                                                                               */

typedef struct fwd_case {
    const char *name;
    moe_dtype dt;
    const route *rt;
    int N, K;
    bool px, py, bkn, sa, sc, silu, pre;
    const moe_kernel_config *cfg; /* NULL: auto */
    int sample_experts;           /* 0: check every row; else this many experts ... */
    int sample_rows;              /* ... and up to this many rows of each */
    bool grad;                    /* tolerance of a gradient (dX GEMMs) */
    const char *expect_kernel;    /* substring the report must contain, or NULL */
    size_t a_offset;              /* elements: misalign A's base pointer */
    const moe_kernel_tuning *tuning; /* NULL: g_tuning */
    double max_mismatch;          /* > 0: at most this share of the checked C / C_preact outputs
                                     may differ from the reference's rounded values (HF's
                                     rounding points: exact_hf_rounding); printed */
    int want_fast;                /* 1: the report's fast_rounding must be 0, 2: must be 1; 0: any */
    int want_dyn;                 /* 1: the report's sched_dynamic must be 0, 2: must be 1; 0: any */
} fwd_case;

typedef struct fwd_bufs {
    tt A, B, sa, sc, C, P;
} fwd_bufs;

static void fwd_alloc(const fwd_case *c, fwd_bufs *b)
{
    const route *rt = c->rt;
    size_t a_rows = c->px ? (size_t)rt->T : (size_t)rt->max_rows;
    size_t n_out = c->silu ? (size_t)c->N / 2 : (size_t)c->N;
    memset(b, 0, sizeof *b);
    tt_pooled(&b->A, c->dt, a_rows * c->K, c->a_offset);
    tt_pooled(&b->B, c->dt, (size_t)rt->E * c->N * c->K, 0);
    if (c->sa) tt_uniform(&b->sa, c->dt, rt->max_rows, 0.05, 1.0);
    if (c->sc) tt_uniform(&b->sc, c->dt, rt->max_rows, 0.05, 1.0);
    tt_out(&b->C, c->dt, (size_t)rt->max_rows * n_out);
    if (c->pre) tt_out(&b->P, c->dt, (size_t)rt->max_rows * c->N);
}

static void fwd_free(fwd_bufs *b)
{
    tt_free(&b->A);
    tt_free(&b->B);
    tt_free(&b->sa);
    tt_free(&b->sc);
    tt_free(&b->C);
    tt_free(&b->P);
}

static moe_grouped_gemm_args fwd_args(const fwd_case *c, const fwd_bufs *b)
{
    moe_grouped_gemm_args a;
    memset(&a, 0, sizeof a);
    a.dtype = c->dt;
    a.num_experts = c->rt->E;
    a.expert_offsets = c->rt->d_offsets;
    a.N = c->N;
    a.K = c->K;
    a.max_rows = c->rt->max_rows;
    a.topk = c->rt->k;
    a.gather_idx = c->rt->d_gather;
    a.A = b->A.dev;
    a.B = b->B.dev;
    a.b_kn = c->bkn;
    a.C = b->C.dev;
    a.C_preact = c->pre ? b->P.dev : NULL;
    a.permute_x = c->px;
    a.permute_y = c->py;
    a.scale_a_rows = c->sa ? b->sa.dev : NULL;
    a.scale_c_rows = c->sc ? b->sc.dev : NULL;
    a.epilogue = c->silu ? MOE_EPI_SILU_MUL : MOE_EPI_NONE;
    return a;
}

/* The double loop for the given rows (all of one expert e): out [nr, n_out], pre [nr, N]. */
static void fwd_ref_rows(const fwd_case *c, const fwd_bufs *b, int e, const int *rows, int nr,
                         double *out, double *pre)
{
    const route *rt = c->rt;
    const int N = c->N, K = c->K;
    double *a = xmalloc(sizeof(double) * (size_t)nr * K);
    double *acc = xmalloc(sizeof(double) * (size_t)nr * N);
    double *brow = xmalloc(sizeof(double) * (size_t)(N > K ? N : K));
    memset(acc, 0, sizeof(double) * (size_t)nr * N);
    for (int i = 0; i < nr; i++) {
        int r = rows[i], g = rt->gather[r];
        int src = c->px ? g / rt->k : r;
        tt_run(&b->A, (size_t)src * K, K, a + (size_t)i * K);
        if (c->sa)
            for (int k = 0; k < K; k++)
                a[(size_t)i * K + k] = rnd(a[(size_t)i * K + k] * tt_at(&b->sa, g), c->dt);
    }
    if (!c->bkn) {
        for (int n = 0; n < N; n++) {
            tt_run(&b->B, ((size_t)e * N + n) * K, K, brow);
            for (int i = 0; i < nr; i++) {
                const double *ai = a + (size_t)i * K;
                double s = 0;
                for (int k = 0; k < K; k++) s += ai[k] * brow[k];
                acc[(size_t)i * N + n] = s;
            }
        }
    } else {
        for (int k = 0; k < K; k++) {
            tt_run(&b->B, ((size_t)e * K + k) * N, N, brow);
            for (int i = 0; i < nr; i++) {
                double av = a[(size_t)i * K + k];
                double *ac = acc + (size_t)i * N;
                for (int n = 0; n < N; n++) ac[n] += av * brow[n];
            }
        }
    }
    for (int i = 0; i < nr; i++) {
        const double *ac = acc + (size_t)i * N;
        int g = rt->gather[rows[i]];
        if (c->silu) {
            int I = N / 2;
            for (int j = 0; j < I; j++) {
                double gv = ac[j], uv = ac[I + j];
                out[(size_t)i * I + j] = rnd(gv / (1.0 + exp(-gv)) * uv, c->dt);
            }
            if (pre)
                for (int n = 0; n < N; n++) pre[(size_t)i * N + n] = rnd(ac[n], c->dt);
        } else {
            double s = c->sc ? tt_at(&b->sc, g) : 1.0;
            for (int n = 0; n < N; n++) out[(size_t)i * N + n] = rnd(ac[n] * s, c->dt);
        }
    }
    free(a);
    free(acc);
    free(brow);
}

/* Check the outputs of a finished launch. full: every row of C/C_preact is read back and rows
 * no routed row targets must still be NaN. Returns true when everything is within tolerance. */
/* Outputs that overflow the output dtype in the reference too (fp16 SiLU-and-mul of Llama-4's
 * K = 5120 GEMM1 reaches 65504 in the tails of a random draw) agree when the kernel wrote the
 * same infinity: zero both so the relative-error norm stays finite. A NaN (unwritten poison)
 * or an infinity on one side only still fails. Returns how many were matched. */
static size_t match_infinities(double *got, double *ref, size_t n)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (isinf(ref[i]) && got[i] == ref[i]) {
            got[i] = ref[i] = 0.0;
            m++;
        }
    return m;
}

/* How many of got[0..n) differ from ref (both rounded to the dtype: exact equality). */
static size_t count_mismatch(const double *got, const double *ref, size_t n)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++) m += got[i] != ref[i];
    return m;
}

static bool fwd_check(const fwd_case *c, const fwd_bufs *b)
{
    const route *rt = c->rt;
    const int N = c->N, n_out = c->silu ? N / 2 : N;
    const double tol = moe_test_tol(c->dt, c->grad);
    int *experts = xmalloc(sizeof(int) * rt->E);
    int ne = pick_experts(rt, c->sample_experts, experts);
    /* Gather the rows to check. */
    int cap = 0;
    for (int q = 0; q < ne; q++) cap += rows_of(rt, experts[q]);
    int *rows = xmalloc(sizeof(int) * (cap + 1));
    int *row_start = xmalloc(sizeof(int) * (ne + 1));
    int nrows = 0;
    uint64_t s = next_stream("pick-r");
    for (int q = 0; q < ne; q++) {
        int e = experts[q], lo = rt->offsets[e], n = rows_of(rt, e);
        row_start[q] = nrows;
        if (c->sample_experts <= 0 || n <= c->sample_rows) {
            for (int r = lo; r < lo + n; r++) rows[nrows++] = r;
        } else { /* first, last and random rows (ascending, distinct) */
            bool *take = xmalloc(sizeof(bool) * n);
            memset(take, 0, sizeof(bool) * n);
            take[0] = take[n - 1] = true;
            int have = 2;
            for (uint64_t t = 0; have < c->sample_rows && t < 10000; t++) {
                int i = (int)(moe_rng_u64(s, (uint64_t)q * 100000u + t) % (uint64_t)n);
                if (!take[i]) {
                    take[i] = true;
                    have++;
                }
            }
            for (int i = 0; i < n; i++)
                if (take[i]) rows[nrows++] = lo + i;
            free(take);
        }
    }
    row_start[ne] = nrows;

    double *got = xmalloc(sizeof(double) * ((size_t)nrows * n_out + 1));
    double *ref = xmalloc(sizeof(double) * ((size_t)nrows * n_out + 1));
    double *gotp = c->pre ? xmalloc(sizeof(double) * ((size_t)nrows * N + 1)) : NULL;
    double *refp = c->pre ? xmalloc(sizeof(double) * ((size_t)nrows * N + 1)) : NULL;
    for (int q = 0; q < ne; q++) {
        int nr = row_start[q + 1] - row_start[q];
        if (nr == 0) continue;
        int off = row_start[q];
        fwd_ref_rows(c, b, experts[q], rows + off, nr, ref + (size_t)off * n_out,
                     refp ? refp + (size_t)off * N : NULL);
        for (int i = 0; i < nr; i++) {
            int r = rows[off + i], dst = c->py ? rt->gather[r] : r;
            dev_read(&b->C, (size_t)dst * n_out, n_out, got + (size_t)(off + i) * n_out);
            if (c->pre) dev_read(&b->P, (size_t)dst * N, N, gotp + (size_t)(off + i) * N);
        }
    }
    char what[160];
    snprintf(what, sizeof what, "%s C", c->name);
    size_t ninf = match_infinities(got, ref, (size_t)nrows * n_out);
    if (c->pre) ninf += match_infinities(gotp, refp, (size_t)nrows * N);
    if (ninf) fprintf(stderr, "%s: %zu outputs overflow to the same infinity as the reference\n", c->name, ninf);
    size_t nnan = 0;
    for (size_t i = 0; i < (size_t)nrows * n_out; i++) nnan += isnan(got[i]) != 0;
    if (nnan) fprintf(stderr, "%s: %zu checked C outputs are NaN (never written?)\n", c->name, nnan);
    bool ok = moe_test_close(what, got, ref, nrows, n_out, tol);
    if (c->pre) {
        snprintf(what, sizeof what, "%s C_preact", c->name);
        ok = moe_test_close(what, gotp, refp, nrows, N, tol) && ok;
    }
    if (c->max_mismatch > 0) {
        const size_t nc = (size_t)nrows * n_out, np = c->pre ? (size_t)nrows * N : 0;
        const size_t mc = count_mismatch(got, ref, nc), mp = c->pre ? count_mismatch(gotp, refp, np) : 0;
        const double share = nc + np ? (double)(mc + mp) / (double)(nc + np) : 0.0;
        const bool mok = share <= c->max_mismatch;
        fprintf(stderr, "%s: %zu of %zu C and %zu of %zu C_preact outputs differ from the rounded "
                        "reference (%.3f%%, at most %.1f%%) %s\n",
                c->name, mc, nc, mp, np, 100 * share, 100 * c->max_mismatch, mok ? "ok" : "FAIL");
        ok = ok && mok;
    }
    /* Full check: rows that no routed row targets are untouched (still NaN). */
    if (c->sample_experts <= 0) {
        bool *target = xmalloc(sizeof(bool) * rt->max_rows);
        memset(target, 0, sizeof(bool) * rt->max_rows);
        for (int r = 0; r < rt->M; r++) target[c->py ? rt->gather[r] : r] = true;
        double *all = xmalloc(sizeof(double) * (size_t)rt->max_rows * n_out);
        dev_read(&b->C, 0, (size_t)rt->max_rows * n_out, all);
        int bad = 0;
        for (int r = 0; r < rt->max_rows; r++)
            if (!target[r])
                for (int j = 0; j < n_out; j++) bad += !isnan(all[(size_t)r * n_out + j]);
        if (bad) {
            fprintf(stderr, "%s: %d elements written in rows no routed row targets\n", c->name, bad);
            ok = false;
        }
        free(all);
        free(target);
    }
    free(got);
    free(ref);
    free(gotp);
    free(refp);
    free(rows);
    free(row_start);
    free(experts);
    return ok;
}

/* The report names the expected kind of kernel ("mma" means the aligned tensor-core one). */
static bool kernel_is(const moe_kernel_report *rep, const char *want, const char *name)
{
    if (!want) return true;
    bool ok = rep->kernel && strstr(rep->kernel, want) &&
              (strcmp(want, "mma") != 0 || !strstr(rep->kernel, "narrow"));
    if (!ok)
        fprintf(stderr, "%s: ran %s, expected a %s kernel\n", name, rep->kernel ? rep->kernel : "?",
                want);
    return ok;
}

/* Allocate, launch, check, free. */
static bool run_fwd_case(const fwd_case *c)
{
    fwd_bufs b;
    fwd_alloc(c, &b);
    moe_grouped_gemm_args a = fwd_args(c, &b);
    moe_kernel_report rep;
    memset(&rep, 0, sizeof rep);
    moe_error err;
    moe_error_clear(&err);
    moe_status st = c->tuning ? moe_grouped_gemm_launch(&a, c->cfg, c->tuning, 0, &rep, &err)
                              : gg_fwd(&a, c->cfg, 0, &rep, &err);
    if (st != MOE_OK) {
        fprintf(stderr, "%s: moe_cuda_grouped_gemm failed: %s\n", c->name, err.msg);
        fwd_free(&b);
        return false;
    }
    CK(cudaDeviceSynchronize());
    bool ok = kernel_is(&rep, c->expect_kernel, c->name);
    if (c->want_fast && rep.fast_rounding != (c->want_fast == 2)) {
        fprintf(stderr, "%s: report says fast_rounding %d, expected %d\n", c->name, rep.fast_rounding,
                c->want_fast == 2);
        ok = false;
    }
    if (c->want_dyn && rep.sched_dynamic != (c->want_dyn == 2)) {
        fprintf(stderr, "%s: report says sched_dynamic %d, expected %d\n", c->name, rep.sched_dynamic,
                c->want_dyn == 2);
        ok = false;
    }
    ok = fwd_check(c, &b) && ok;
    fwd_free(&b);
    return ok;
}

/* ------------------------------------------------------------------------------------------ */
/* dW                                                                                         */

typedef struct dw_case {
    const char *name;
    moe_dtype dt;
    const route *rt;
    int N, K;
    bool pdy, px, sdy, sx;
    const moe_kernel_config *cfg;
    int sample_experts; /* 0: all */
    int sample_n;       /* rows n of each dW_e checked when sampling */
    const char *expect_kernel;
} dw_case;

typedef struct dw_bufs {
    tt dY, X, sdy, sx, W;
} dw_bufs;

static void dw_alloc(const dw_case *c, dw_bufs *b)
{
    const route *rt = c->rt;
    memset(b, 0, sizeof *b);
    tt_pooled(&b->dY, c->dt, (size_t)(c->pdy ? rt->T : rt->max_rows) * c->N, 0);
    tt_pooled(&b->X, c->dt, (size_t)(c->px ? rt->T : rt->max_rows) * c->K, 0);
    if (c->sdy) tt_uniform(&b->sdy, c->dt, rt->max_rows, 0.05, 1.0);
    if (c->sx) tt_uniform(&b->sx, c->dt, rt->max_rows, 0.05, 1.0);
    tt_out(&b->W, c->dt, (size_t)rt->E * c->N * c->K);
}

static void dw_free(dw_bufs *b)
{
    tt_free(&b->dY);
    tt_free(&b->X);
    tt_free(&b->sdy);
    tt_free(&b->sx);
    tt_free(&b->W);
}

static moe_grouped_gemm_dw_args dw_args(const dw_case *c, const dw_bufs *b)
{
    moe_grouped_gemm_dw_args a;
    memset(&a, 0, sizeof a);
    a.dtype = c->dt;
    a.num_experts = c->rt->E;
    a.expert_offsets = c->rt->d_offsets;
    a.N = c->N;
    a.K = c->K;
    a.max_rows = c->rt->max_rows;
    a.topk = c->rt->k;
    a.gather_idx = c->rt->d_gather;
    a.dY = b->dY.dev;
    a.permute_dy = c->pdy;
    a.scale_dy_rows = c->sdy ? b->sdy.dev : NULL;
    a.X = b->X.dev;
    a.permute_x = c->px;
    a.scale_x_rows = c->sx ? b->sx.dev : NULL;
    a.dW = b->W.dev;
    return a;
}

static bool dw_check(const dw_case *c, const dw_bufs *b)
{
    const route *rt = c->rt;
    const int N = c->N, K = c->K;
    int *experts = xmalloc(sizeof(int) * rt->E);
    int ne = pick_experts(rt, c->sample_experts, experts);
    int per = (c->sample_experts > 0 && c->sample_n < N) ? c->sample_n : N;
    size_t nrow = (size_t)ne * per;
    double *got = xmalloc(sizeof(double) * nrow * K);
    double *ref = xmalloc(sizeof(double) * nrow * K);
    uint64_t s = next_stream("pick-n");
    size_t q = 0;
    for (int ie = 0; ie < ne; ie++) {
        int e = experts[ie], lo = rt->offsets[e], nr = rows_of(rt, e);
        /* X rows of the expert, scaled and rounded as the kernel's operand. */
        double *xr = xmalloc(sizeof(double) * ((size_t)nr * K + 1));
        for (int i = 0; i < nr; i++) {
            int r = lo + i, g = rt->gather[r], src = c->px ? g / rt->k : r;
            tt_run(&b->X, (size_t)src * K, K, xr + (size_t)i * K);
            if (c->sx)
                for (int k = 0; k < K; k++)
                    xr[(size_t)i * K + k] = rnd(xr[(size_t)i * K + k] * tt_at(&b->sx, g), c->dt);
        }
        for (int j = 0; j < per; j++, q++) {
            int n = per == N ? j
                  : j == 0 ? 0
                  : j == 1 ? N - 1
                           : (int)(moe_rng_u64(s, q) % (uint64_t)N);
            double *out = ref + q * K;
            memset(out, 0, sizeof(double) * K);
            for (int i = 0; i < nr; i++) {
                int r = lo + i, g = rt->gather[r], src = c->pdy ? g / rt->k : r;
                double dy = tt_at(&b->dY, (size_t)src * N + n);
                if (c->sdy) dy = rnd(dy * tt_at(&b->sdy, g), c->dt);
                const double *x = xr + (size_t)i * K;
                for (int k = 0; k < K; k++) out[k] += dy * x[k];
            }
            for (int k = 0; k < K; k++) out[k] = rnd(out[k], c->dt);
            dev_read(&b->W, ((size_t)e * N + n) * K, K, got + q * K);
        }
        free(xr);
    }
    bool ok = moe_test_close(c->name, got, ref, nrow, K, moe_test_tol(c->dt, true));
    free(got);
    free(ref);
    free(experts);
    return ok;
}

static bool run_dw_case(const dw_case *c)
{
    dw_bufs b;
    dw_alloc(c, &b);
    moe_grouped_gemm_dw_args a = dw_args(c, &b);
    moe_kernel_report rep;
    memset(&rep, 0, sizeof rep);
    moe_error err;
    moe_error_clear(&err);
    moe_status st = gg_dw(&a, c->cfg, 0, &rep, &err);
    if (st != MOE_OK) {
        fprintf(stderr, "%s: moe_cuda_grouped_gemm_dw failed: %s\n", c->name, err.msg);
        dw_free(&b);
        return false;
    }
    CK(cudaDeviceSynchronize());
    bool ok = kernel_is(&rep, c->expect_kernel, c->name);
    ok = dw_check(c, &b) && ok;
    dw_free(&b);
    return ok;
}

/* The dW case of flag set f (bit 0 permute_dy, 1 permute_x, 2 scale_dy, 3 scale_x) on an N x K
 * problem routed by rt. */
static dw_case dw_flag_case(moe_dtype dt, const route *rt, int N, int K, int f)
{
    dw_case c = {0};
    c.dt = dt;
    c.rt = rt;
    c.N = N;
    c.K = K;
    c.pdy = f & 1;
    c.px = (f >> 1) & 1;
    c.sdy = (f >> 2) & 1;
    c.sx = (f >> 3) & 1;
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* small shapes, every flag                                                                   */

typedef struct shape {
    const char *name;
    int T, k, E, mode;
    int N, K; /* N of non-SiLU GEMMs; SiLU uses 2*ceil(N/2)... see below */
    bool narrow;
} shape;

static const shape k_small[] = {
    /* rows not 16-byte multiples in bf16/fp16 (K=37, N=13): the narrow path; empty experts */
    {"odd", 29, 3, 5, R_SKEWED, 13, 37, true},
    /* partial tiles in M, N, K; fewer routed rows than max_rows; multi-tile experts */
    {"partial", 150, 2, 3, R_DROP, 200, 136, false},
    /* one expert takes every row */
    {"one-expert", 300, 1, 4, R_ONE, 72, 64, false},
};

static void test_fwd_flags(void **state)
{
    (void)state;
    int failures = 0, runs = 0;
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = k_dtypes[d];
        for (size_t si = 0; si < sizeof k_small / sizeof k_small[0]; si++) {
            const shape *sh = &k_small[si];
            route rt;
            make_route(&rt, sh->T, sh->k, sh->E, sh->mode);
            for (int perm = 0; perm < 3; perm++)
                for (int bkn = 0; bkn < 2; bkn++)
                    for (int sa = 0; sa < 2; sa++)
                        for (int epi = 0; epi < 4; epi++) {
                            bool silu = epi >= 2;
                            char name[160];
                            snprintf(name, sizeof name, "%s %s px%d py%d bkn%d sa%d %s",
                                     moe_dtype_name(dt), sh->name, perm == 1, perm == 2, bkn, sa,
                                     epi == 0   ? "plain"
                                     : epi == 1 ? "scale_c"
                                     : epi == 2 ? "silu"
                                                : "silu+preact");
                            fwd_case c = {0};
                            c.name = name;
                            c.dt = dt;
                            c.rt = &rt;
                            /* SiLU: N = 2I with I = the shape's N (odd I = 13 included) */
                            c.N = silu ? 2 * sh->N : sh->N;
                            c.K = sh->K;
                            c.px = perm == 1;
                            c.py = perm == 2;
                            c.bkn = bkn;
                            c.sa = sa;
                            c.sc = epi == 1;
                            c.silu = silu;
                            c.pre = epi == 3;
                            c.expect_kernel = dt == MOE_DTYPE_F32 ? "ffma"
                                              : sh->narrow        ? "narrow"
                                                                  : "mma";
                            runs++;
                            if (!run_fwd_case(&c)) failures++;
                        }
            free_route(&rt);
        }
    }
    fprintf(stderr, "forward/dX flag combinations: %d of %d failed\n", failures, runs);
    assert_int_equal(failures, 0);
}

static void test_dw_flags(void **state)
{
    (void)state;
    int failures = 0, runs = 0;
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = k_dtypes[d];
        for (size_t si = 0; si < sizeof k_small / sizeof k_small[0]; si++) {
            const shape *sh = &k_small[si];
            route rt;
            make_route(&rt, sh->T, sh->k, sh->E, sh->mode);
            for (int f = 0; f < 16; f++) {
                char name[160];
                dw_case c = dw_flag_case(dt, &rt, sh->N, sh->K, f);
                snprintf(name, sizeof name, "%s %s dW pdy%d px%d sdy%d sx%d", moe_dtype_name(dt),
                         sh->name, c.pdy, c.px, c.sdy, c.sx);
                c.name = name;
                c.expect_kernel = dt == MOE_DTYPE_F32 ? "ffma" : sh->narrow ? "narrow" : "mma";
                runs++;
                if (!run_dw_case(&c)) failures++;
            }
            free_route(&rt);
        }
    }
    fprintf(stderr, "dW flag combinations: %d of %d failed\n", failures, runs);
    assert_int_equal(failures, 0);
}

/* Every compiled configuration on the partial-tile shape, forward (two flag sets) and dW. */
static void test_all_configs(void **state)
{
    (void)state;
    int failures = 0, runs = 0;
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = k_dtypes[d];
        const moe_kernel_config *list;
        int n = moe_kernel_configs(dt, &list);
        assert_true(n > 0);
        route rt;
        make_route(&rt, 150, 2, 3, R_DROP);
        for (int i = 0; i < n; i++) {
            char cs[64], name[160];
            moe_kernel_config_str(&list[i], cs, sizeof cs);
            for (int v = 0; v < 2; v++) {
                fwd_case c = {0};
                snprintf(name, sizeof name, "%s cfg %s %s", moe_dtype_name(dt), cs,
                         v ? "px+sa+silu+preact" : "py+bkn+sc");
                c.name = name;
                c.dt = dt;
                c.rt = &rt;
                c.N = v ? 400 : 200;
                c.K = 136;
                c.px = v;
                c.sa = v;
                c.silu = v;
                c.pre = v;
                c.py = !v;
                c.bkn = !v;
                c.sc = !v;
                c.cfg = &list[i];
                runs++;
                if (!run_fwd_case(&c)) failures++;
            }
            dw_case w = {0};
            snprintf(name, sizeof name, "%s cfg %s dW pdy+sdy+px", moe_dtype_name(dt), cs);
            w.name = name;
            w.dt = dt;
            w.rt = &rt;
            w.N = 200;
            w.K = 136;
            w.pdy = w.sdy = w.px = true;
            w.cfg = &list[i];
            runs++;
            if (!run_dw_case(&w)) failures++;
        }
        free_route(&rt);
    }
    fprintf(stderr, "configurations: %d of %d failed\n", failures, runs);
    assert_int_equal(failures, 0);
}

/* 16-byte-multiple rows but a base pointer 2 bytes off: must take the narrow path, still right. */
static void test_misaligned_base(void **state)
{
    (void)state;
    route rt;
    make_route(&rt, 40, 2, 4, R_RANDOM);
    for (int d = 0; d < 2; d++) {
        fwd_case c = {0};
        c.name = d ? "fp16 misaligned A base" : "bf16 misaligned A base";
        c.dt = k_dtypes[d];
        c.rt = &rt;
        c.N = 48;
        c.K = 64;
        c.px = true;
        c.a_offset = 1;
        c.expect_kernel = "narrow";
        assert_true(run_fwd_case(&c));
    }
    free_route(&rt);
}

/* ------------------------------------------------------------------------------------------ */
/* a whole layer's six GEMMs at given model dims                                              */

typedef struct model_dims {
    const char *name;
    int H, I, E, k;
    bool llama; /* Llama-4 style scaling: input scaled (GEMM1), dx scaled; Qwen3: output scaled */
} model_dims;

static bool run_layer(const model_dims *m, int T, moe_dtype dt, int sample_experts,
                      int sample_rows)
{
    route rt;
    make_route(&rt, T, m->k, m->E, R_RANDOM);
    bool ok = true;
    char name[160];
    fwd_case c = {0};
    c.dt = dt;
    c.rt = &rt;
    c.sample_experts = sample_experts;
    c.sample_rows = sample_rows;

    /* GEMM1: x [T,H] (gathered) x w13 [E,2I,H]^T -> act [M,I], gemm1_out [M,2I] */
    snprintf(name, sizeof name, "%s %s T=%d GEMM1", moe_dtype_name(dt), m->name, T);
    c.name = name;
    c.N = 2 * m->I;
    c.K = m->H;
    c.px = true;
    c.sa = m->llama;
    c.silu = c.pre = true;
    ok = run_fwd_case(&c) && ok;

    /* GEMM2: act [M,I] x w2 [E,H,I]^T -> [T*k,H] scattered, Qwen3 weights in the epilogue */
    fwd_case c2 = {0};
    c2.dt = dt;
    c2.rt = &rt;
    c2.sample_experts = sample_experts;
    c2.sample_rows = sample_rows;
    snprintf(name, sizeof name, "%s %s T=%d GEMM2", moe_dtype_name(dt), m->name, T);
    c2.name = name;
    c2.N = m->H;
    c2.K = m->I;
    c2.py = true;
    c2.sc = !m->llama;
    ok = run_fwd_case(&c2) && ok;

    /* dX of GEMM2: dout [T,H] (gathered, Qwen3: times the weight) x w2 [E,H,I] -> dact [M,I] */
    fwd_case c3 = c2;
    snprintf(name, sizeof name, "%s %s T=%d dX GEMM2 (b_kn)", moe_dtype_name(dt), m->name, T);
    c3.name = name;
    c3.N = m->I;
    c3.K = m->H;
    c3.py = false;
    c3.sc = false;
    c3.px = true;
    c3.sa = !m->llama;
    c3.bkn = true;
    c3.grad = true;
    ok = run_fwd_case(&c3) && ok;

    /* dX of GEMM1: dgu [M,2I] x w13 [E,2I,H] -> dx rows [T*k,H] scattered (Llama-4: x score) */
    fwd_case c4 = c2;
    snprintf(name, sizeof name, "%s %s T=%d dX GEMM1 (b_kn)", moe_dtype_name(dt), m->name, T);
    c4.name = name;
    c4.N = m->H;
    c4.K = 2 * m->I;
    c4.py = true;
    c4.sc = m->llama;
    c4.bkn = true;
    c4.grad = true;
    ok = run_fwd_case(&c4) && ok;

    /* dW2 [E,H,I] = sum dY^T act: dY = dout gathered (Qwen3: times the weight) */
    dw_case w = {0};
    w.dt = dt;
    w.rt = &rt;
    w.sample_experts = sample_experts;
    w.sample_n = sample_rows;
    snprintf(name, sizeof name, "%s %s T=%d dW2", moe_dtype_name(dt), m->name, T);
    w.name = name;
    w.N = m->H;
    w.K = m->I;
    w.pdy = true;
    w.sdy = !m->llama;
    ok = run_dw_case(&w) && ok;

    /* dW13 [E,2I,H] = sum dgu^T x: x gathered (Llama-4: times the score) */
    dw_case w2 = w;
    snprintf(name, sizeof name, "%s %s T=%d dW13", moe_dtype_name(dt), m->name, T);
    w2.name = name;
    w2.N = 2 * m->I;
    w2.K = m->H;
    w2.pdy = false;
    w2.sdy = false;
    w2.px = true;
    w2.sx = m->llama;
    ok = run_dw_case(&w2) && ok;

    free_route(&rt);
    return ok;
}

static const model_dims k_tiny_qwen = {"tiny-qwen3 (H=37,I=23,E=7,k=3)", 37, 23, 7, 3, false};
static const model_dims k_tiny_llama = {"tiny-llama4 (H=41,I=19,E=5,k=1)", 41, 19, 5, 1, true};
static const model_dims k_qwen = {"Qwen3-30B-A3B", 2048, 768, 128, 8, false};
static const model_dims k_llama = {"Llama-4-Scout", 5120, 8192, 16, 1, true};

static void test_tiny_presets(void **state)
{
    (void)state;
    int failures = 0;
    for (int d = 0; d < 3; d++) {
        failures += !run_layer(&k_tiny_qwen, 64, k_dtypes[d], 0, 0);
        failures += !run_layer(&k_tiny_llama, 64, k_dtypes[d], 0, 0);
    }
    assert_int_equal(failures, 0);
}

static void test_real_qwen3(void **state)
{
    (void)state;
    if (small_only()) skip();
    int failures = 0;
    for (int d = 0; d < 3; d++) failures += !run_layer(&k_qwen, 1024, k_dtypes[d], 6, 8);
    assert_int_equal(failures, 0);
}

static void test_real_llama4(void **state)
{
    (void)state;
    if (small_only()) skip();
    int failures = 0;
    for (int d = 0; d < 3; d++) failures += !run_layer(&k_llama, 1024, k_dtypes[d], 3, 3);
    assert_int_equal(failures, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* determinism                                                                                */

static bool dev_equal(const tt *a, const tt *b)
{
    size_t n = a->n * moe_dtype_size(a->dt);
    unsigned char *x = xmalloc(n), *y = xmalloc(n);
    CK(cudaMemcpy(x, a->dev, n, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(y, b->dev, n, cudaMemcpyDeviceToHost));
    bool eq = memcmp(x, y, n) == 0;
    free(x);
    free(y);
    return eq;
}

static void test_determinism(void **state)
{
    (void)state;
    const bool big = !small_only();
    route rt;
    if (big)
        make_route(&rt, 1024, 8, 128, R_RANDOM); /* Qwen3 routing at T=1024 */
    else
        make_route(&rt, 150, 2, 3, R_DROP);
    for (int d = 0; d < 3; d++) {
        moe_dtype dt = k_dtypes[d];
        fwd_case c = {0};
        c.name = "determinism";
        c.dt = dt;
        c.rt = &rt;
        c.N = big ? 1536 : 400;
        c.K = big ? 2048 : 136;
        c.px = c.silu = c.pre = true;
        fwd_bufs b;
        fwd_alloc(&c, &b);
        moe_grouped_gemm_args a = fwd_args(&c, &b);
        tt C2, P2;
        tt_out(&C2, dt, b.C.n);
        tt_out(&P2, dt, b.P.n);
        moe_error err;
        moe_error_clear(&err);
        assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_OK);
        a.C = C2.dev;
        a.C_preact = P2.dev;
        assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_OK);
        CK(cudaDeviceSynchronize());
        assert_true(dev_equal(&b.C, &C2));
        assert_true(dev_equal(&b.P, &P2));
        tt_free(&C2);
        tt_free(&P2);
        fwd_free(&b);

        dw_case w = {0};
        w.dt = dt;
        w.rt = &rt;
        w.N = big ? 1536 : 200;
        w.K = big ? 2048 : 136;
        w.px = w.pdy = w.sdy = true;
        dw_bufs db;
        dw_alloc(&w, &db);
        moe_grouped_gemm_dw_args wa = dw_args(&w, &db);
        tt W2;
        tt_out(&W2, dt, db.W.n);
        assert_int_equal(gg_dw(&wa, NULL, 0, NULL, &err), MOE_OK);
        wa.dW = W2.dev;
        assert_int_equal(gg_dw(&wa, NULL, 0, NULL, &err), MOE_OK);
        CK(cudaDeviceSynchronize());
        assert_true(dev_equal(&db.W, &W2));
        tt_free(&W2);
        dw_free(&db);
        fprintf(stderr, "%s: two runs bitwise equal (forward SiLU+preact, dW)\n", moe_dtype_name(dt));
    }
    free_route(&rt);
}

/* ------------------------------------------------------------------------------------------ */
/* argument checks, configuration strings                                                     */

static void test_rejections(void **state)
{
    (void)state;
    route rt;
    make_route(&rt, 16, 2, 3, R_RANDOM);
    fwd_case c = {0};
    c.dt = MOE_DTYPE_BF16;
    c.rt = &rt;
    c.N = 32;
    c.K = 32;
    fwd_bufs b;
    fwd_alloc(&c, &b);
    moe_grouped_gemm_args a0 = fwd_args(&c, &b), a;
    moe_error err;

    a = a0;
    a.permute_x = a.permute_y = true;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);
    fprintf(stderr, "rejected: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "permute_x and permute_y"));

    a = a0;
    a.epilogue = MOE_EPI_SILU_MUL;
    a.N = 31;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "even N"));

    a = a0;
    a.epilogue = MOE_EPI_SILU_MUL;
    a.scale_c_rows = b.A.dev;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);

    a = a0;
    a.C_preact = b.C.dev;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);

    a = a0;
    a.permute_x = true;
    a.gather_idx = NULL;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);

    a = a0;
    a.dtype = MOE_DTYPE_F64;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_ERR_UNSUPPORTED);

    a = a0;
    a.C = NULL;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);
    assert_int_equal(gg_fwd(NULL, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);

    moe_kernel_config bad = {96, 96, 32, 8, 3, 0, 0, 0, 0};
    a = a0;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, &bad, 0, NULL, &err), MOE_ERR_INVALID_ARG);
    fprintf(stderr, "rejected: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "valid:"));
    assert_non_null(strstr(err.msg, "128x128x32,w8,s3"));

    moe_grouped_gemm_dw_args w;
    memset(&w, 0, sizeof w);
    w.dtype = MOE_DTYPE_BF16;
    w.num_experts = 3;
    w.expert_offsets = rt.d_offsets;
    w.N = 32;
    w.K = 32;
    w.max_rows = rt.max_rows;
    w.topk = 2;
    w.dY = b.A.dev;
    w.X = b.A.dev;
    w.dW = b.C.dev;
    w.permute_x = true; /* gather_idx NULL */
    moe_error_clear(&err);
    assert_int_equal(gg_dw(&w, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);
    w.gather_idx = rt.d_gather;
    w.dW = NULL;
    moe_error_clear(&err);
    assert_int_equal(gg_dw(&w, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);

    /* the launchers themselves take only resolved configurations: NULL, "auto" (zeros), a
     * partial request, an unlisted one, an option without ",tma", and a bf16 configuration
     * for fp32 are rejected before anything runs (moe_kernel_config_resolve is the caller's) */
    w.dW = b.B.dev; /* [E, N, K] like B: a valid dW */
    moe_kernel_config zero = {0, 0, 0, 0, 0, 0, 0, 0, 0}, partial = {128, 128, 64, 0, 0, 0, 0, 0, 0};
    moe_kernel_config opt_no_tma = {128, 128, 64, 8, 3, 0, 0, MOE_GG_EPILOGUE_STAGED, 0};
    const moe_kernel_config *unresolved[5] = {NULL, &zero, &partial, &bad, &opt_no_tma};
    for (int i = 0; i < 5; i++) {
        a = a0;
        moe_error_clear(&err);
        assert_int_equal(moe_cuda_grouped_gemm(&a, unresolved[i], NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);
        fprintf(stderr, "rejected: %s\n", err.msg);
        assert_non_null(strstr(err.msg, "resolve"));
        moe_error_clear(&err);
        assert_int_equal(moe_cuda_grouped_gemm_dw(&w, unresolved[i], NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(err.msg, "resolve"));
    }
    {
        moe_kernel_config mma = {128, 128, 64, 8, 3, 0, 0, 0, 0};
        a = a0;
        a.dtype = MOE_DTYPE_F32;
        moe_error_clear(&err);
        assert_int_equal(moe_cuda_grouped_gemm(&a, &mma, NULL, 0, NULL, &err), MOE_ERR_INVALID_ARG);
        assert_true(moe_kernel_config_is_compiled(&mma, MOE_DTYPE_BF16));
        assert_false(moe_kernel_config_is_compiled(&mma, MOE_DTYPE_F32));
    }

    /* Nothing was launched by any rejected call: C is still all NaN. */
    CK(cudaDeviceSynchronize());
    double *all = xmalloc(sizeof(double) * b.C.n);
    dev_read(&b.C, 0, b.C.n, all);
    for (size_t i = 0; i < b.C.n; i++) assert_true(isnan(all[i]));
    free(all);
    fwd_free(&b);
    free_route(&rt);
}

/* ------------------------------------------------------------------------------------------ */
/* the Hopper wgmma/TMA kernel (",tma" configurations)                                        */

/* Whether this GPU runs the wgmma kernel (compute capability 9.0); elsewhere the ",tma"
 * configurations fall back to the mma.sync default and the report must say so. */
static bool gpu_is_hopper(void)
{
    int dev = 0, major = 0, minor = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    CK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    return major == 9 && minor == 0;
}

static int wg_configs(const moe_kernel_config **out)
{
    static moe_kernel_config wg[8];
    const moe_kernel_config *list;
    int n = moe_kernel_configs(MOE_DTYPE_BF16, &list), m = 0;
    for (int i = 0; i < n && m < 8; i++)
        if (list[i].use_tma) wg[m++] = list[i];
    *out = wg;
    return m;
}

/* The kernel a ",tma" request must run: the wgmma one on an sm_90 GPU, except b_kn with rows
 * of N elements that are not a multiple of 16 bytes (its tensor map's stride), or with SiLU an
 * up half whose first column N/2 is not on 16 bytes: mma.sync. */
static const char *wg_expected(bool hopper, bool bkn, bool silu, int N)
{
    const bool kn_ok = (N * 2) % 16 == 0 && (!silu || (N / 2 * 2) % 16 == 0);
    return hopper && (!bkn || kn_ok) ? "grouped_gemm_wgmma" : "grouped_gemm_mma";
}

static const shape k_wg_shapes[] = {
    /* partial tiles in M, N (SiLU I = 200: a partial second column tile), K = 136 (K tail of
     * 8 inside the second 64-wide step); fewer routed rows than max_rows */
    {"partial", 150, 2, 3, R_DROP, 200, 136, false},
    /* one expert takes every row (3 row tiles, the others none) */
    {"one-expert", 300, 1, 4, R_ONE, 72, 64, false},
    /* experts with no rows between others; K = 200 (tail 8) */
    {"skewed", 61, 3, 7, R_SKEWED, 104, 200, false},
    /* K = 1096: 18 k steps, so every stage ring wraps several times within a tile */
    {"long-K", 129, 2, 3, R_RANDOM, 136, 1096, false},
    /* n_out = 100 (SiLU I = 100): not a multiple of 8, so the epilogue's 4-byte pair stores
     * instead of the quad-transposed 16-byte ones; ~210 rows per expert (a 256-row tile whose
     * second warpgroup's last m64 block is partial) */
    {"odd-N", 420, 1, 2, R_RANDOM, 100, 72, false},
};

/* Every forward flag combination, B [N,K] and B [K,N] (b_kn, the backward dX GEMMs), through
 * every wgmma configuration, bf16 and fp16, on the shapes above (b_kn with N = 100 falls back to
 * mma.sync), the report naming the fast rounding paths where they ran (scale_a_rows, SiLU); with
 * the default configuration every combination with scale_a_rows or SiLU again under
 * exact_hf_rounding: the report names HF's rounding points (b_kn keeps scale_a on the
 * accumulators) and all but a few outputs (the fp32 summation order) equal the reference's
 * rounded values, which follow HF's rounding points; then an unaligned K with a ",tma" request
 * (the narrow fallback, named in the report). */
static void test_wgmma_flags(void **state)
{
    (void)state;
    const bool hopper = gpu_is_hopper();
    if (!hopper) fprintf(stderr, "not an sm_90 GPU: ,tma requests must fall back to mma.sync\n");
    const moe_kernel_config *wg;
    const int nwg = wg_configs(&wg);
    assert_true(nwg > 0);
    tuning_reset();
    moe_kernel_tuning exact = g_tuning;
    exact.exact_hf_rounding = true;
    int failures = 0, runs = 0;
    for (int d = 0; d < 2; d++) {
        moe_dtype dt = k_dtypes[d];
        for (size_t si = 0; si < sizeof k_wg_shapes / sizeof k_wg_shapes[0]; si++) {
            const shape *sh = &k_wg_shapes[si];
            route rt;
            make_route(&rt, sh->T, sh->k, sh->E, sh->mode);
            for (int ci = 0; ci < nwg; ci++) {
                char cs[64];
                moe_kernel_config_str(&wg[ci], cs, sizeof cs);
                for (int bkn = 0; bkn < 2; bkn++)
                for (int perm = 0; perm < 3; perm++)
                    for (int sa = 0; sa < 2; sa++)
                        for (int epi = 0; epi < 4; epi++) {
                            bool silu = epi >= 2;
                            char name[192];
                            snprintf(name, sizeof name, "%s %s %s bkn%d px%d py%d sa%d %s",
                                     moe_dtype_name(dt), cs, sh->name, bkn, perm == 1, perm == 2, sa,
                                     epi == 0   ? "plain"
                                     : epi == 1 ? "scale_c"
                                     : epi == 2 ? "silu"
                                                : "silu+preact");
                            fwd_case c = {0};
                            c.name = name;
                            c.dt = dt;
                            c.rt = &rt;
                            c.N = silu ? 2 * sh->N : sh->N;
                            c.K = sh->K;
                            c.px = perm == 1;
                            c.py = perm == 2;
                            c.sa = sa;
                            c.sc = epi == 1;
                            c.silu = silu;
                            c.pre = epi == 3;
                            c.bkn = bkn;
                            c.cfg = &wg[ci];
                            c.expect_kernel = wg_expected(hopper, c.bkn, c.silu, c.N);
                            const bool wgk = strstr(c.expect_kernel, "wgmma") != NULL;
                            c.want_fast = wgk && (c.sa || c.silu) ? 2 : 1;
                            runs++;
                            if (!run_fwd_case(&c)) failures++;
                            if (ci == 0 && (c.sa || c.silu)) {
                                fwd_case x = c;
                                char xname[224];
                                snprintf(xname, sizeof xname, "%s exact_hf_rounding", name);
                                x.name = xname;
                                x.tuning = &exact;
                                const bool acc_scale = wgk && c.sa && c.bkn;
                                x.want_fast = acc_scale ? 2 : 1;
                                x.max_mismatch = acc_scale ? 0 : 0.05;
                                runs++;
                                if (!run_fwd_case(&x)) failures++;
                            }
                        }
            }
            free_route(&rt);
        }
        /* unaligned rows (K = 37): the narrow mma.sync path */
        route rt;
        make_route(&rt, 29, 3, 5, R_SKEWED);
        fwd_case c = {0};
        c.name = d ? "fp16 tma request, K=37" : "bf16 tma request, K=37";
        c.dt = dt;
        c.rt = &rt;
        c.N = 26;
        c.K = 37;
        c.px = c.silu = c.pre = true;
        c.cfg = &wg[0];
        c.expect_kernel = "narrow";
        runs++;
        if (!run_fwd_case(&c)) failures++;
        free_route(&rt);
    }
    fprintf(stderr, "wgmma flag combinations: %d of %d failed\n", failures, runs);
    assert_int_equal(failures, 0);
}

/* The persistent grid capped to 1 and 3 CTAs (moe_kernel_tuning.max_ctas): one CTA walks every
 * tile of every expert, wrapping the stage ring and the mbarrier phases many times across tiles
 * (and, where the epilogue is staged, reusing the shared output tile while the bulk copies of
 * the tile before may still read it); each with the dynamic tile scheduler (counters given, as
 * the layer runs), the static order (no counters), the dynamic one with the epilogue from
 * registers everywhere (",direct") and staged wherever it fits at all (",staged": also 128x256
 * with 4 stages and SiLU, unpadded), and both orders with A by TMA where there is no permute_x
 * (",atma": warp 0 alone produces; the others ",acp"). The report says which order ran. */
static void test_wgmma_persistent(void **state)
{
    (void)state;
    const bool hopper = gpu_is_hopper();
    const moe_kernel_config *wg;
    const int nwg = wg_configs(&wg);
    int failures = 0, runs = 0;
    const char *caps[2] = {"1", "3"};
    static const struct {
        const char *name;
        bool static_order;
        int epilogue; /* moe_gg_epilogue option of the configuration */
        bool a_tma;
    } modes[6] = {
        {"dynamic", false, MOE_GG_EPILOGUE_AUTO, false},
        {"static", true, MOE_GG_EPILOGUE_AUTO, false},
        {"dynamic+direct-epilogue", false, MOE_GG_EPILOGUE_DIRECT, false},
        {"dynamic+staged-epilogue", false, MOE_GG_EPILOGUE_STAGED, false},
        {"dynamic+A-by-TMA", false, MOE_GG_EPILOGUE_AUTO, true},
        {"static+A-by-TMA", true, MOE_GG_EPILOGUE_AUTO, true},
    };
    for (int ci = 0; ci < nwg; ci++)
        for (int cap = 0; cap < 12; cap++) {
            const int mode = cap / 2;
            tuning_reset();
            g_tuning.max_ctas = cap % 2 ? 3 : 1;
            if (modes[mode].static_order) g_tuning.sched_counters = NULL;
            moe_kernel_config run_cfg = wg[ci];
            run_cfg.epilogue = modes[mode].epilogue;
            /* (A by TMA is the default where A needs no gather: ",acp" keeps cp.async covered) */
            run_cfg.a_load = modes[mode].a_tma ? MOE_GG_A_TMA : MOE_GG_A_CPASYNC;
            for (size_t si = 0; si < sizeof k_wg_shapes / sizeof k_wg_shapes[0]; si++) {
                const shape *sh = &k_wg_shapes[si];
                route rt;
                make_route(&rt, sh->T, sh->k, sh->E, sh->mode);
                /* v: 0 py+bkn+sc, 1 px+sa+silu+preact, 2 px+silu (inference's GEMM1: no
                 * C_preact, so the SiLU output is staged where it fits), 3 py+sc (GEMM2: A by
                 * TMA through the 2-D weight map, many tiles per CTA) */
                static const char *const vname[4] = {"py+bkn+sc", "px+sa+silu+preact", "px+silu", "py+sc"};
                for (int v = 0; v < 4; v++) {
                    char cs[64], name[192];
                    snprintf(name, sizeof name, "bf16 %s %s max_ctas=%s %s %s",
                             moe_kernel_config_str(&run_cfg, cs, sizeof cs), sh->name, caps[cap % 2],
                             modes[mode].name, vname[v]);
                    fwd_case c = {0};
                    c.name = name;
                    c.dt = MOE_DTYPE_BF16;
                    c.rt = &rt;
                    c.N = v == 1 || v == 2 ? 2 * sh->N : sh->N;
                    c.K = sh->K;
                    c.px = c.silu = v == 1 || v == 2;
                    c.sa = c.pre = v == 1;
                    c.py = c.sc = v == 0 || v == 3;
                    c.bkn = v == 0;
                    c.cfg = &run_cfg;
                    c.expect_kernel = wg_expected(hopper, c.bkn, c.silu, c.N);
                    /* the order that ran: dynamic with counters, in one-CTA launches (the
                     * ",c2" pairs take the static order; b_kn runs without clusters) */
                    const bool want_dyn = strstr(c.expect_kernel, "wgmma") && !modes[mode].static_order &&
                                          (wg[ci].cluster <= 1 || c.bkn);
                    c.want_dyn = want_dyn ? 2 : 1;
                    runs++;
                    if (!run_fwd_case(&c)) failures++;
                }
                free_route(&rt);
            }
        }
    tuning_reset();
    fprintf(stderr, "wgmma persistent (capped grid): %d of %d failed\n", failures, runs);
    assert_int_equal(failures, 0);
}

/* One launch of a with cfg, its report in rep, synchronised. */
static void launch_sync(const moe_grouped_gemm_args *a, const moe_kernel_config *cfg, moe_kernel_report *rep)
{
    moe_error err;
    moe_error_clear(&err);
    memset(rep, 0, sizeof *rep);
    assert_int_equal(gg_fwd(a, cfg, 0, rep, &err), MOE_OK);
    CK(cudaDeviceSynchronize());
}

/* Which launches stage their epilogue in shared memory (the configuration's ",staged" /
 * ",direct" or neither) and load A by TMA (",atma", or no A-load option), as the report says,
 * against the rules in
 * docs/KERNELS.md; and that those paths write exactly the bytes of the register epilogue and
 * the cp.async gather: the same inputs through every mode, outputs compared bitwise with the
 * direct / cp.async run, which itself is checked against the reference. Every wgmma
 * configuration, four problems: GEMM2 (py + scale_c), inference GEMM1 (px + SiLU, no
 * C_preact), training GEMM1 (+ C_preact: never staged), dX (b_kn + py). */
static void test_wgmma_epilogue_paths(void **state)
{
    (void)state;
    const bool hopper = gpu_is_hopper();
    const moe_kernel_config *wg;
    const int nwg = wg_configs(&wg);
    route rt;
    make_route(&rt, 300, 2, 3, R_DROP); /* ~100-200 rows per expert, fewer routed than max_rows */
    int failures = 0, runs = 0;
    for (int ci = 0; ci < nwg; ci++) {
        const moe_kernel_config *cfg = &wg[ci];
        char cs[64];
        moe_kernel_config_str(cfg, cs, sizeof cs);
        for (int v = 0; v < 4; v++) {
            static const char *const vname[4] = {"GEMM2 py+sc", "GEMM1 px+silu", "GEMM1 px+silu+preact",
                                                 "dX bkn+py"};
            fwd_case c = {0};
            char name[192];
            snprintf(name, sizeof name, "bf16 %s %s (direct, cp.async)", cs, vname[v]);
            c.name = name;
            c.dt = MOE_DTYPE_BF16;
            c.rt = &rt;
            c.silu = v == 1 || v == 2;
            c.px = c.silu;
            c.pre = v == 2;
            c.py = v == 0 || v == 3;
            c.sc = v == 0;
            c.bkn = v == 3;
            c.grad = c.bkn;
            c.N = c.silu ? 2 * 200 : 264; /* n_out 200 / 264: partial column tiles, 16-byte rows */
            c.K = 136;
            c.cfg = cfg;
            c.expect_kernel = wg_expected(hopper, c.bkn, c.silu, c.N);
            fwd_bufs b;
            fwd_alloc(&c, &b);
            moe_grouped_gemm_args a = fwd_args(&c, &b);
            moe_error err;
            moe_error_clear(&err);
            /* the reference run: register epilogue, A gathered by cp.async, named by the
             * configuration's options */
            moe_kernel_config ref_cfg = *cfg;
            ref_cfg.epilogue = MOE_GG_EPILOGUE_DIRECT;
            ref_cfg.a_load = MOE_GG_A_CPASYNC;
            moe_kernel_report rep;
            launch_sync(&a, &ref_cfg, &rep);
            runs++;
            bool ok = kernel_is(&rep, c.expect_kernel, name) && fwd_check(&c, &b);
            if (rep.staged_epilogue || rep.a_tma) {
                fprintf(stderr, "%s: direct/cp.async run reports staged %d, A by TMA %d\n", name,
                        rep.staged_epilogue, rep.a_tma);
                ok = false;
            }
            failures += !ok;
            tt C2;
            tt_out(&C2, c.dt, b.C.n);
            a.C = C2.dev;
            /* m 0-5: the options auto / staged / direct, with ",acp" then ",atma"; m 6: no
             * options at all (the defaults: the automatic epilogue, A by TMA), which must run as
             * m 3 */
            for (int m = 0; m < 7; m++) {
                static const int epi[3] = {MOE_GG_EPILOGUE_AUTO, MOE_GG_EPILOGUE_STAGED,
                                           MOE_GG_EPILOGUE_DIRECT};
                static const char *const mode[3] = {"auto", "staged", "direct"};
                const int em = m == 6 ? 0 : m % 3;
                const bool atma = m >= 3;
                moe_kernel_config run_cfg = *cfg;
                if (m < 6) {
                    run_cfg.epilogue = epi[em];
                    run_cfg.a_load = atma ? MOE_GG_A_TMA : MOE_GG_A_CPASYNC;
                } else {
                    run_cfg.epilogue = MOE_GG_EPILOGUE_AUTO;
                    run_cfg.a_load = MOE_GG_A_AUTO;
                }
                /* the rules: auto stages where the padded tile fits (128x256 s3; 128x128 s6
                 * with SiLU), staged also unpadded (all but 128x256 s4 without SiLU), never
                 * with C_preact; A by TMA without permute_x in one-CTA launches (b_kn has none) */
                const bool wgk = hopper && strstr(c.expect_kernel, "wgmma") != NULL;
                const bool s3 = cfg->tile_n == 256 && cfg->stages == 3;
                const bool n128 = cfg->tile_n == 128;
                bool want_staged = em == 0 ? s3 || (n128 && c.silu)
                                 : em == 1 ? !(cfg->tile_n == 256 && cfg->stages == 4 && !c.silu)
                                           : false;
                want_staged = want_staged && wgk && !c.pre;
                const bool want_atma = atma && wgk && !c.px && (cfg->cluster <= 1 || c.bkn);
                CK(cudaMemset(C2.dev, 0xff, b.C.n * moe_dtype_size(c.dt)));
                launch_sync(&a, &run_cfg, &rep);
                runs++;
                bool same = dev_equal(&b.C, &C2);
                /* the report's configuration names the paths that ran (wgmma only) */
                const bool rep_cfg_ok =
                    !wgk || (rep.config.epilogue == (want_staged ? MOE_GG_EPILOGUE_STAGED
                                                                 : MOE_GG_EPILOGUE_DIRECT) &&
                             rep.config.a_load == (want_atma ? MOE_GG_A_TMA : MOE_GG_A_CPASYNC));
                if (!same || rep.staged_epilogue != want_staged || rep.a_tma != want_atma ||
                    !rep_cfg_ok) {
                    char rs[64];
                    fprintf(stderr, "%s: epilogue %s%s A_TMA=%d: output %s, staged %d (want %d), "
                                    "A by TMA %d (want %d), report %s\n",
                            name, mode[em], m == 6 ? " (no options)" : "", atma,
                            same ? "identical" : "DIFFERS", rep.staged_epilogue, want_staged,
                            rep.a_tma, want_atma, moe_kernel_config_str(&rep.config, rs, sizeof rs));
                    failures++;
                }
            }
            tt_free(&C2);
            fwd_free(&b);
        }
    }
    free_route(&rt);
    fprintf(stderr, "wgmma epilogue / A paths: %d of %d failed\n", failures, runs);
    assert_int_equal(failures, 0);
}

/* The dW kernel's staged epilogue (",staged": the 3-stage kernel, outputs
 * through shared memory and bulk row copies) against the default 4-stage one on the same inputs:
 * the report says which ran, and dW is bitwise equal (one fixed summation order in both). The
 * partial and one-expert shapes, every flag set the kernel takes. Returns the failures. */
static int wgmma_dw_staged_bitwise(bool hopper, const moe_kernel_config *cfg)
{
    int failures = 0;
    for (size_t si = 0; si < 2; si++) {
        const shape *sh = &k_wg_shapes[si];
        route rt;
        make_route(&rt, sh->T, sh->k, sh->E, sh->mode);
        for (int f = 0; f < 12; f++) { /* (both scales, f >= 12, run mma.sync) */
            dw_case c = dw_flag_case(MOE_DTYPE_BF16, &rt, sh->N, sh->K, f);
            char name[160];
            c.cfg = cfg;
            snprintf(name, sizeof name, "bf16 %s wgmma dW pdy%d px%d sdy%d sx%d staged vs direct", sh->name,
                     c.pdy, c.px, c.sdy, c.sx);
            c.name = name;
            const bool fits = (c.N * 2) % 16 == 0 && (c.K * 2) % 16 == 0;
            const bool wgk = hopper && fits;
            dw_bufs b;
            dw_alloc(&c, &b);
            moe_grouped_gemm_dw_args a = dw_args(&c, &b);
            moe_error err;
            moe_error_clear(&err);
            moe_kernel_report r1, r2;
            memset(&r1, 0, sizeof r1);
            memset(&r2, 0, sizeof r2);
            /* ",direct": the 4-stage kernel; ",staged" asks for the staged kernel by itself */
            moe_kernel_config direct_cfg = *cfg, staged_cfg = *cfg;
            direct_cfg.epilogue = MOE_GG_EPILOGUE_DIRECT;
            staged_cfg.epilogue = MOE_GG_EPILOGUE_STAGED;
            assert_int_equal(gg_dw(&a, &direct_cfg, 0, &r1, &err), MOE_OK);
            tt W2;
            tt_out(&W2, c.dt, b.W.n);
            a.dW = W2.dev;
            assert_int_equal(gg_dw(&a, &staged_cfg, 0, &r2, &err), MOE_OK);
            CK(cudaDeviceSynchronize());
            const bool same = dev_equal(&b.W, &W2);
            if (!same || r1.staged_epilogue || r2.staged_epilogue != wgk ||
                (wgk && (r1.config.epilogue != MOE_GG_EPILOGUE_DIRECT || r1.config.stages != 4 ||
                         r2.config.epilogue != MOE_GG_EPILOGUE_STAGED || r2.config.stages != 3))) {
                fprintf(stderr, "%s: dW %s, staged %d then %d (want 0 then %d)\n", name,
                        same ? "identical" : "DIFFERS", r1.staged_epilogue, r2.staged_epilogue, wgk);
                failures++;
            }
            tt_free(&W2);
            dw_free(&b);
        }
        free_route(&rt);
    }
    fprintf(stderr, "wgmma dW staged vs direct: %d failed\n", failures);
    return failures;
}

/* The wgmma dW kernel (a ",tma" configuration): every flag combination (permute_dy x permute_x
 * x scale_dy x scale_x) on the wgmma shapes, bf16 and fp16, expecting grouped_gemm_dw_wgmma where
 * it applies (N and K rows of 16-byte multiples, at most one row scale) and the mma.sync dW
 * elsewhere; the one-expert shape runs 5 row stages in one tile (the 4-stage ring wraps); then
 * grids capped to 1 and 3 CTAs; then Qwen3-30B-A3B's dW13 / dW2 and Llama-4-Scout's at T=1024
 * (sampled) and two runs bitwise equal. */
static void test_wgmma_dw(void **state)
{
    (void)state;
    const bool hopper = gpu_is_hopper();
    const moe_kernel_config *wg;
    assert_true(wg_configs(&wg) > 0);
    int failures = 0, runs = 0;
    moe_kernel_config direct_cfg = wg[0];
    direct_cfg.epilogue = MOE_GG_EPILOGUE_DIRECT;
    for (int cap = 0; cap < 5; cap++) {
        /* 0-2: the default (staged epilogue, 3-stage kernel); 3, 4: the capped grids again with
         * the 4-stage kernel storing from registers (",direct") */
        const char *caps[5] = {"", "1", "3", "1", "3"};
        tuning_reset();
        g_tuning.max_ctas = cap ? atoi(caps[cap]) : 0;
        for (int d = 0; d < 2; d++) {
            if (cap && d) continue; /* capped grids: bf16 only */
            moe_dtype dt = k_dtypes[d];
            for (size_t si = 0; si < sizeof k_wg_shapes / sizeof k_wg_shapes[0]; si++) {
                const shape *sh = &k_wg_shapes[si];
                route rt;
                make_route(&rt, sh->T, sh->k, sh->E, sh->mode);
                for (int f = 0; f < 16; f++) {
                    if (cap && f != 5 && f != 10) continue; /* capped: pdy+sdy and px+sx */
                    char name[192];
                    dw_case c = dw_flag_case(dt, &rt, sh->N, sh->K, f);
                    c.cfg = cap >= 3 ? &direct_cfg : &wg[0];
                    snprintf(name, sizeof name, "%s %s wgmma dW pdy%d px%d sdy%d sx%d max_ctas=%s%s",
                             moe_dtype_name(dt), sh->name, c.pdy, c.px, c.sdy, c.sx,
                             cap ? caps[cap] : "-", cap >= 3 ? " direct" : "");
                    c.name = name;
                    const bool fits = (c.N * 2) % 16 == 0 && (c.K * 2) % 16 == 0 && !(c.sdy && c.sx);
                    c.expect_kernel = hopper && fits ? "grouped_gemm_dw_wgmma" : "grouped_gemm_dw_mma";
                    runs++;
                    if (!run_dw_case(&c)) failures++;
                }
                free_route(&rt);
            }
        }
    }
    tuning_reset();
    fprintf(stderr, "wgmma dW flag combinations: %d of %d failed\n", failures, runs);
    assert_int_equal(failures, 0);
    failures += wgmma_dw_staged_bitwise(hopper, &wg[0]);
    assert_int_equal(failures, 0);
    if (small_only()) return;

    const model_dims *models[2] = {&k_qwen, &k_llama};
    for (int mi = 0; mi < 2; mi++) {
        const model_dims *m = models[mi];
        route rt;
        make_route(&rt, 1024, m->k, m->E, R_RANDOM);
        char name[192];
        /* dW2 [E,H,I] = sum dY^T act: dY = dout gathered (Qwen3: times the weight) */
        dw_case w = {0};
        w.dt = MOE_DTYPE_BF16;
        w.rt = &rt;
        w.sample_experts = 3;
        w.sample_n = 4;
        w.cfg = &wg[0];
        w.expect_kernel = hopper ? "grouped_gemm_dw_wgmma" : "grouped_gemm_dw_mma";
        snprintf(name, sizeof name, "bf16 %s T=1024 wgmma dW2", m->name);
        w.name = name;
        w.N = m->H;
        w.K = m->I;
        w.pdy = true;
        w.sdy = !m->llama;
        failures += !run_dw_case(&w);
        /* dW13 [E,2I,H] = sum dgu^T x: x gathered (Llama-4: times the score) */
        dw_case w2 = w;
        snprintf(name, sizeof name, "bf16 %s T=1024 wgmma dW13", m->name);
        w2.name = name;
        w2.N = 2 * m->I;
        w2.K = m->H;
        w2.pdy = false;
        w2.sdy = false;
        w2.px = true;
        w2.sx = m->llama;
        failures += !run_dw_case(&w2);
        free_route(&rt);
    }
    assert_int_equal(failures, 0);

    /* determinism: Qwen3 dW13 twice, bitwise equal */
    route rt;
    make_route(&rt, 1024, 8, 128, R_RANDOM);
    dw_case c = {0};
    c.dt = MOE_DTYPE_BF16;
    c.rt = &rt;
    c.N = 1536;
    c.K = 2048;
    c.px = true;
    dw_bufs b;
    dw_alloc(&c, &b);
    moe_grouped_gemm_dw_args a = dw_args(&c, &b);
    tt W2;
    tt_out(&W2, c.dt, b.W.n);
    moe_error err;
    moe_error_clear(&err);
    assert_int_equal(gg_dw(&a, &wg[0], 0, NULL, &err), MOE_OK);
    a.dW = W2.dev;
    assert_int_equal(gg_dw(&a, &wg[0], 0, NULL, &err), MOE_OK);
    CK(cudaDeviceSynchronize());
    assert_true(dev_equal(&b.W, &W2));
    tt_free(&W2);
    dw_free(&b);
    free_route(&rt);
}

/* Launches on two streams at the same time, each with counters of its own (the rule of
 * moe_kernel_tuning.sched_counters: sharing them would make each launch skip the other's
 * tiles): two different problems queued alternately, 8 times each, on two non-blocking
 * streams, then both checked (sampled), the reports naming the dynamic scheduler; and the same
 * problem on cudaStreamPerThread without counters (the static tile order). */
static void test_wgmma_two_streams(void **state)
{
    (void)state;
    if (small_only()) skip();
    const bool hopper = gpu_is_hopper();
    const moe_kernel_config *wg;
    assert_true(wg_configs(&wg) > 0);
    route r1, r2;
    make_route(&r1, 2048, 8, 64, R_RANDOM);
    make_route(&r2, 1536, 4, 32, R_RANDOM);
    fwd_case c1 = {0}, c2 = {0};
    c1.name = "stream 1: px+silu+preact";
    c1.dt = c2.dt = MOE_DTYPE_BF16;
    c1.rt = &r1;
    c1.N = 1024;
    c1.K = 1024;
    c1.px = c1.silu = c1.pre = true;
    c2.name = "stream 2: py+bkn+sc";
    c2.rt = &r2;
    c2.N = 768;
    c2.K = 1536;
    c2.py = c2.sc = c2.bkn = true;
    c1.sample_experts = c2.sample_experts = 6;
    c1.sample_rows = c2.sample_rows = 8;
    c1.cfg = c2.cfg = &wg[0];
    fwd_bufs b1, b2;
    fwd_alloc(&c1, &b1);
    fwd_alloc(&c2, &b2);
    moe_grouped_gemm_args a1 = fwd_args(&c1, &b1), a2 = fwd_args(&c2, &b2);
    cudaStream_t s1, s2;
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    moe_kernel_report rep1, rep2, rep3;
    memset(&rep1, 0, sizeof rep1);
    memset(&rep2, 0, sizeof rep2);
    memset(&rep3, 0, sizeof rep3);
    moe_error err;
    moe_error_clear(&err);
    moe_kernel_tuning t1, t2, t3;
    memset(&t1, 0, sizeof t1);
    memset(&t2, 0, sizeof t2);
    memset(&t3, 0, sizeof t3); /* no counters: the static order */
    assert_int_equal(moe_sched_counters_alloc(&t1.sched_counters, s1, &err), MOE_OK);
    assert_int_equal(moe_sched_counters_alloc(&t2.sched_counters, s2, &err), MOE_OK);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(moe_grouped_gemm_launch(&a1, &wg[0], &t1, s1, &rep1, &err), MOE_OK);
        assert_int_equal(moe_grouped_gemm_launch(&a2, &wg[0], &t2, s2, &rep2, &err), MOE_OK);
    }
    CK(cudaDeviceSynchronize());
    const char *want = hopper ? "grouped_gemm_wgmma" : "grouped_gemm_mma";
    bool ok = kernel_is(&rep1, want, c1.name) && kernel_is(&rep2, want, c2.name);
    ok = rep1.sched_dynamic == hopper && rep2.sched_dynamic == hopper && ok;
    ok = fwd_check(&c1, &b1) && ok;
    ok = fwd_check(&c2, &b2) && ok;
    /* both pairs of counters are back at zero */
    int32_t cnt[2 * MOE_SCHED_COUNTERS];
    CK(cudaMemcpy(cnt, t1.sched_counters, MOE_SCHED_COUNTERS_BYTES, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(cnt + MOE_SCHED_COUNTERS, t2.sched_counters, MOE_SCHED_COUNTERS_BYTES, cudaMemcpyDeviceToHost));
    for (int i = 0; i < 2 * MOE_SCHED_COUNTERS; i++) {
        if (cnt[i] != 0) fprintf(stderr, "scheduler counter %d is %d after the launches, not 0\n", i, cnt[i]);
        ok = cnt[i] == 0 && ok;
    }
    /* cudaStreamPerThread without counters: the static order */
    CK(cudaMemset(b1.C.dev, 0xff, b1.C.n * 2)); /* NaN again, so an unwritten row fails */
    assert_int_equal(moe_grouped_gemm_launch(&a1, &wg[0], &t3, cudaStreamPerThread, &rep3, &err), MOE_OK);
    CK(cudaDeviceSynchronize());
    ok = rep3.sched_dynamic == 0 && ok;
    ok = fwd_check(&c1, &b1) && ok;
    moe_sched_counters_free(t1.sched_counters);
    moe_sched_counters_free(t2.sched_counters);
    CK(cudaStreamDestroy(s1));
    CK(cudaStreamDestroy(s2));
    fwd_free(&b1);
    fwd_free(&b2);
    free_route(&r1);
    free_route(&r2);
    assert_true(ok);
}

/* The real forward GEMMs at T=1024 through the wgmma kernels (sampled experts and rows): GEMM1
 * with and without C_preact, GEMM2, the two dX GEMMs; and two runs of Qwen3's GEMM1 bitwise
 * equal. */
static void run_wg_real(const model_dims *m, moe_dtype dt, const moe_kernel_config *cfg,
                        int sample_experts, int sample_rows, int *failures)
{
    route rt;
    make_route(&rt, 1024, m->k, m->E, R_RANDOM);
    char cs[64], name[192];
    moe_kernel_config_str(cfg, cs, sizeof cs);
    const char *want = gpu_is_hopper() ? "grouped_gemm_wgmma" : "grouped_gemm_mma";
    fwd_case c = {0};
    snprintf(name, sizeof name, "%s %s T=1024 GEMM1 %s", moe_dtype_name(dt), m->name, cs);
    c.name = name;
    c.dt = dt;
    c.rt = &rt;
    c.N = 2 * m->I;
    c.K = m->H;
    c.px = c.silu = c.pre = true;
    c.sa = m->llama;
    c.cfg = cfg;
    c.sample_experts = sample_experts;
    c.sample_rows = sample_rows;
    c.expect_kernel = want;
    *failures += !run_fwd_case(&c);
    /* inference's GEMM1 writes no C_preact (the staging configurations then stage it) */
    fwd_case c1 = c;
    char name1[192];
    snprintf(name1, sizeof name1, "%s %s T=1024 GEMM1 without C_preact %s", moe_dtype_name(dt), m->name, cs);
    c1.name = name1;
    c1.pre = false;
    *failures += !run_fwd_case(&c1);
    fwd_case c2 = {0};
    char name2[192];
    snprintf(name2, sizeof name2, "%s %s T=1024 GEMM2 %s", moe_dtype_name(dt), m->name, cs);
    c2.name = name2;
    c2.dt = dt;
    c2.rt = &rt;
    c2.N = m->H;
    c2.K = m->I;
    c2.py = true;
    c2.sc = !m->llama;
    c2.cfg = cfg;
    c2.sample_experts = sample_experts;
    c2.sample_rows = sample_rows;
    c2.expect_kernel = want;
    *failures += !run_fwd_case(&c2);
    /* the backward dX GEMMs (b_kn): dout x W2 -> [M, I] gathered, dgu x W13 -> [T*k, H] scattered */
    fwd_case c3 = c2;
    char name3[192];
    snprintf(name3, sizeof name3, "%s %s T=1024 dX GEMM2 (b_kn) %s", moe_dtype_name(dt), m->name, cs);
    c3.name = name3;
    c3.N = m->I;
    c3.K = m->H;
    c3.py = c3.sc = false;
    c3.px = true;
    c3.sa = !m->llama;
    c3.bkn = c3.grad = true;
    *failures += !run_fwd_case(&c3);
    fwd_case c4 = c2;
    char name4[192];
    snprintf(name4, sizeof name4, "%s %s T=1024 dX GEMM1 (b_kn) %s", moe_dtype_name(dt), m->name, cs);
    c4.name = name4;
    c4.N = m->H;
    c4.K = 2 * m->I;
    c4.py = true;
    c4.sc = m->llama;
    c4.bkn = c4.grad = true;
    *failures += !run_fwd_case(&c4);
    free_route(&rt);
}

static void test_wgmma_real(void **state)
{
    (void)state;
    if (small_only()) skip();
    const moe_kernel_config *wg;
    const int nwg = wg_configs(&wg);
    int failures = 0;
    for (int ci = 0; ci < nwg; ci++) run_wg_real(&k_qwen, MOE_DTYPE_BF16, &wg[ci], 6, 8, &failures);
    run_wg_real(&k_qwen, MOE_DTYPE_F16, &wg[0], 4, 6, &failures);
    run_wg_real(&k_llama, MOE_DTYPE_BF16, &wg[0], 3, 3, &failures);
    assert_int_equal(failures, 0);

    route rt;
    make_route(&rt, 1024, 8, 128, R_RANDOM);
    fwd_case c = {0};
    c.name = "wgmma determinism";
    c.dt = MOE_DTYPE_BF16;
    c.rt = &rt;
    c.N = 1536;
    c.K = 2048;
    c.px = c.silu = c.pre = true;
    fwd_bufs b;
    fwd_alloc(&c, &b);
    moe_grouped_gemm_args a = fwd_args(&c, &b);
    tt C2, P2;
    tt_out(&C2, c.dt, b.C.n);
    tt_out(&P2, c.dt, b.P.n);
    moe_error err;
    moe_error_clear(&err);
    assert_int_equal(gg_fwd(&a, &wg[0], 0, NULL, &err), MOE_OK);
    a.C = C2.dev;
    a.C_preact = P2.dev;
    assert_int_equal(gg_fwd(&a, &wg[0], 0, NULL, &err), MOE_OK);
    CK(cudaDeviceSynchronize());
    assert_true(dev_equal(&b.C, &C2));
    assert_true(dev_equal(&b.P, &P2));
    tt_free(&C2);
    tt_free(&P2);
    fwd_free(&b);
    free_route(&rt);
}

/* ------------------------------------------------------------------------------------------ */
/* autotune                                                                                   */

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = xmalloc((size_t)n + 1);
    size_t got = fread(s, 1, (size_t)n, f);
    s[got] = '\0';
    fclose(f);
    return s;
}

static void test_autotune(void **state)
{
    (void)state;
    char dir[] = "/tmp/moe-gg-autotune-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/sub/autotune.json", dir); /* parent created by the tuner */

    route rt;
    make_route(&rt, 150, 2, 3, R_DROP);
    fwd_case c = {0};
    c.name = "autotune";
    c.dt = MOE_DTYPE_BF16;
    c.rt = &rt;
    c.N = 400;
    c.K = 136;
    c.px = c.silu = c.pre = true;
    fwd_bufs b;
    fwd_alloc(&c, &b);
    moe_grouped_gemm_args a = fwd_args(&c, &b);
    moe_error err;
    moe_error_clear(&err);
    moe_kernel_config got, again;
    bool found = true;
    assert_int_equal(moe_autotune_lookup(path, &a, &got, &found, &err), MOE_OK);
    assert_false(found);
    assert_int_equal(moe_autotune_pick(path, &a, &g_tuning, 0, &got, &err), MOE_OK);
    assert_int_equal(moe_kernel_config_validate(&got, MOE_DTYPE_BF16, &err), MOE_OK);
    /* a wgmma pick names the paths it was timed with (the epilogue and A-load options are
     * candidates too), so the entry means the same kernel whatever the defaults later */
    if (got.use_tma && gpu_is_hopper()) {
        assert_int_not_equal(got.epilogue, MOE_GG_EPILOGUE_AUTO);
        assert_int_not_equal(got.a_load, MOE_GG_A_AUTO);
    }
    char *first = read_file(path);
    assert_non_null(first);
    char key[1024], cs[64];
    assert_int_equal(moe_autotune_key(&a, key, sizeof key, &err), MOE_OK);
    fprintf(stderr, "autotune: key %s -> %s\n", key, moe_kernel_config_str(&got, cs, sizeof cs));
    assert_non_null(strstr(first, "silu_mul"));
    assert_non_null(strstr(first, cs));
    /* tuning wrote only scratch buffers: the caller's outputs are still all NaN */
    double *all = xmalloc(sizeof(double) * b.C.n);
    dev_read(&b.C, 0, b.C.n, all);
    for (size_t i = 0; i < b.C.n; i++) assert_true(isnan(all[i]));
    free(all);
    /* second time: from the cache, no tuning, file unchanged */
    assert_int_equal(moe_autotune_lookup(path, &a, &again, &found, &err), MOE_OK);
    assert_true(found);
    assert_memory_equal(&again, &got, sizeof got);
    assert_int_equal(moe_autotune_pick(path, &a, &g_tuning, 0, &again, &err), MOE_OK);
    assert_memory_equal(&again, &got, sizeof got);
    char *second = read_file(path);
    assert_string_equal(first, second);
    /* a different problem (dW) adds an entry and keeps the first */
    dw_case w = {0};
    w.dt = MOE_DTYPE_BF16;
    w.rt = &rt;
    w.N = 200;
    w.K = 136;
    w.pdy = true;
    dw_bufs db;
    dw_alloc(&w, &db);
    moe_grouped_gemm_dw_args wa = dw_args(&w, &db);
    assert_int_equal(moe_autotune_pick_dw(path, &wa, &g_tuning, 0, &again, &err), MOE_OK);
    char *third = read_file(path);
    assert_non_null(strstr(third, "grouped_gemm_dw"));
    assert_int_equal(moe_autotune_lookup(path, &a, &again, &found, &err), MOE_OK);
    assert_true(found);
    /* tuned with exact_hf_rounding, this SiLU problem gets an entry of its own ("exact_hf" in
     * the key), and the default entry stays what it was */
    {
        moe_kernel_tuning ex = g_tuning;
        ex.exact_hf_rounding = true;
        moe_kernel_config px;
        assert_int_equal(moe_autotune_pick(path, &a, &ex, 0, &px, &err), MOE_OK);
        assert_int_equal(moe_kernel_config_validate(&px, MOE_DTYPE_BF16, &err), MOE_OK);
        char *fourth = read_file(path);
        assert_non_null(strstr(fourth, "exact_hf"));
        free(fourth);
        assert_int_equal(moe_autotune_lookup(path, &a, &again, &found, &err), MOE_OK);
        assert_true(found);
        assert_memory_equal(&again, &got, sizeof got);
    }
    /* the picked configuration runs and is right */
    c.cfg = &got;
    assert_true(run_fwd_case(&c));
    if (gpu_is_hopper()) {
        /* a GEMM2-like problem (no gather of A, no C_preact) takes every option: more paths
         * are timed than configurations are compiled, and the pick names its options */
        fwd_case g2 = {0};
        g2.name = "autotune GEMM2-like";
        g2.dt = MOE_DTYPE_BF16;
        g2.rt = &rt;
        g2.N = 264;
        g2.K = 136;
        g2.py = g2.sc = true;
        fwd_bufs b2;
        fwd_alloc(&g2, &b2);
        moe_grouped_gemm_args a2 = fwd_args(&g2, &b2);
        moe_kernel_config p2;
        assert_int_equal(moe_autotune_pick(path, &a2, &g_tuning, 0, &p2, &err), MOE_OK);
        char k2[1024];
        assert_int_equal(moe_autotune_key(&a2, k2, sizeof k2, &err), MOE_OK);
        char *text = read_file(path);
        cJSON *root = cJSON_Parse(text);
        cJSON *ent = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "entries"), k2);
        cJSON *cand = cJSON_GetObjectItemCaseSensitive(ent, "candidates");
        const moe_kernel_config *list;
        const int n_list = moe_kernel_configs(MOE_DTYPE_BF16, &list);
        assert_true(cJSON_IsNumber(cand));
        fprintf(stderr, "autotune GEMM2-like: %d paths timed, %d configurations compiled\n", cand->valueint,
                n_list);
        assert_true(cand->valueint > n_list);
        if (p2.use_tma) {
            assert_int_not_equal(p2.epilogue, MOE_GG_EPILOGUE_AUTO);
            assert_int_not_equal(p2.a_load, MOE_GG_A_AUTO);
        }
        cJSON_Delete(root);
        free(text);
        g2.cfg = &p2;
        assert_true(run_fwd_case(&g2));
        fwd_free(&b2);
    }
    /* a corrupt cache is ignored (warned), then rewritten */
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs("{not json", f);
    fclose(f);
    assert_int_equal(moe_autotune_lookup(path, &a, &again, &found, &err), MOE_OK);
    assert_false(found);
    setenv("MOE_AUTOTUNE_QUIET", "1", 1);
    assert_int_equal(moe_autotune_pick(path, &a, &g_tuning, 0, &again, &err), MOE_OK);
    unsetenv("MOE_AUTOTUNE_QUIET");
    assert_int_equal(moe_autotune_lookup(path, &a, &again, &found, &err), MOE_OK);
    assert_true(found);
    /* default path: $MOE_AUTOTUNE_CACHE */
    setenv("MOE_AUTOTUNE_CACHE", "/some/where.json", 1);
    char p2[512];
    assert_int_equal(moe_autotune_cache_path(NULL, p2, sizeof p2, &err), MOE_OK);
    assert_string_equal(p2, "/some/where.json");
    unsetenv("MOE_AUTOTUNE_CACHE");
    const char *home = getenv("HOME");
    char *old_home = home ? strdup(home) : NULL;
    setenv("HOME", "/home/x", 1);
    assert_int_equal(moe_autotune_cache_path("", p2, sizeof p2, &err), MOE_OK);
    assert_string_equal(p2, "/home/x/.cache/moe-ep/autotune.json");
    if (old_home) setenv("HOME", old_home, 1); else unsetenv("HOME");
    free(old_home);

    free(first);
    free(second);
    free(third);
    dw_free(&db);
    fwd_free(&b);
    free_route(&rt);
    remove(path);
    char sub[300];
    snprintf(sub, sizeof sub, "%s/sub", dir);
    rmdir(sub);
    rmdir(dir);
}

/* ------------------------------------------------------------------------------------------ */
/* timing (MOE_GG_BENCH=1): GEMM1 + GEMM2 of a model at T = 256 ... 16384 tokens: every         */
/* configuration at 4096 (a subset elsewhere), mma.sync vs wgmma, the default, the autotuner's */
/* pick, and cuBLAS on one dense GEMM of the same FLOPs as a ceiling. MOE_GG_BENCH_T=4096: one */
/* T only.                                                                                    */

static float time_ms(moe_status (*run)(const void *, const moe_kernel_config *), const void *a,
                     const moe_kernel_config *cfg, int reps)
{
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 2; i++) assert_int_equal(run(a, cfg), MOE_OK);
    float t[32];
    if (reps > 32) reps = 32;
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(e0, 0));
        assert_int_equal(run(a, cfg), MOE_OK);
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&t[i], e0, e1));
    }
    for (int i = 1; i < reps; i++) /* insertion sort, then the median */
        for (int j = i; j > 0 && t[j] < t[j - 1]; j--) {
            float x = t[j];
            t[j] = t[j - 1];
            t[j - 1] = x;
        }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return t[reps / 2];
}

static moe_status run_gg(const void *a, const moe_kernel_config *cfg)
{
    moe_error err;
    moe_error_clear(&err);
    moe_status st = gg_fwd((const moe_grouped_gemm_args *)a, cfg, 0, NULL, &err);
    if (st != MOE_OK) fprintf(stderr, "bench: %s\n", err.msg);
    return st;
}

static moe_status run_dw(const void *p, const moe_kernel_config *cfg)
{
    moe_error err;
    moe_error_clear(&err);
    moe_status st = gg_dw((const moe_grouped_gemm_dw_args *)p, cfg, 0, NULL, &err);
    if (st != MOE_OK) fprintf(stderr, "bench: %s\n", err.msg);
    return st;
}

/* time_ms of the grouped GEMM g with configuration c (NULL: the default) under the tuning t
 * (the wgmma kernels' timing knobs and diagnostics); g_tuning is put back afterwards. */
static float time_gg_tuned(const moe_kernel_tuning *t, const moe_grouped_gemm_args *g,
                           const moe_kernel_config *c)
{
    const moe_kernel_tuning saved = g_tuning;
    g_tuning = *t;
    float ms = time_ms(run_gg, g, c, 10);
    g_tuning = saved;
    return ms;
}

/* Variants of g_tuning for the bench: which = "fence", "narrow", "exact", "static", "l2none",
 * "l2first", and in a MOE_DIAGNOSTICS build "noepi", "nogather" (wrong results, timing only). */
static moe_kernel_tuning tuned(const char *which)
{
    moe_kernel_tuning t = g_tuning;
    if (!strcmp(which, "fence")) t.proxy_fence = true;
    if (!strcmp(which, "narrow")) t.narrow_stores = true;
    if (!strcmp(which, "exact")) t.exact_hf_rounding = true;
    if (!strcmp(which, "static")) t.sched_counters = NULL;
    if (!strcmp(which, "l2none")) t.l2_hints = MOE_L2_HINTS_NONE;
    if (!strcmp(which, "l2first")) t.l2_hints = MOE_L2_HINTS_EVICT_FIRST;
#ifdef MOE_DIAGNOSTICS
    if (!strcmp(which, "noepi")) t.diag_skip_epilogue = true;
    if (!strcmp(which, "nogather")) t.diag_no_gather = true;
#endif
    return t;
}

/* time_gg_tuned with tuned(which); NAN for the diagnostics in a default build (they exist only
 * with -DMOE_DIAGNOSTICS=ON). */
static float time_gg_with(const char *which, const moe_grouped_gemm_args *g, const moe_kernel_config *c)
{
#ifndef MOE_DIAGNOSTICS
    if (!strcmp(which, "noepi") || !strcmp(which, "nogather")) return NAN;
#endif
    const moe_kernel_tuning t = tuned(which);
    return time_gg_tuned(&t, g, c);
}

/* c with the wgmma options epilogue / a_load (a zero configuration: the default with them) */
static moe_kernel_config with_options(const moe_kernel_config *c, int epilogue, int a_load)
{
    moe_kernel_config r;
    if (c)
        r = *c;
    else
        memset(&r, 0, sizeof r);
    r.epilogue = epilogue;
    r.a_load = a_load;
    return r;
}

typedef struct dense_gemm {
    cublasHandle_t h;
    int M, N, K;
    const void *A, *B;
    void *C;
} dense_gemm;

static moe_status run_cublas(const void *p, const moe_kernel_config *cfg)
{
    (void)cfg;
    const dense_gemm *g = p;
    const float one = 1.f, zero = 0.f;
    /* row-major C[M,N] = A[M,K] B[N,K]^T  ==  column-major C^T = B^T(op T of [K,N]) A^T */
    cublasStatus_t st = cublasGemmEx(g->h, CUBLAS_OP_T, CUBLAS_OP_N, g->N, g->M, g->K, &one, g->B,
                                     CUDA_R_16BF, g->K, g->A, CUDA_R_16BF, g->K, &zero, g->C,
                                     CUDA_R_16BF, g->N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return st == CUBLAS_STATUS_SUCCESS ? MOE_OK : MOE_ERR_CUDA;
}

/* The configurations timed at every T (the full list runs at T=4096 only): the mma.sync
 * defaults and best, and every wgmma one. */
static bool bench_subset(const moe_kernel_config *c)
{
    if (c->use_tma) return true;
    return (c->tile_m == 128 && c->tile_n == 128 && c->tile_k == 64 && c->warps == 8) ||
           (c->tile_m == 128 && c->tile_n == 256 && c->tile_k == 64) ||
           (c->tile_m == 64 && c->tile_n == 128 && c->tile_k == 64);
}

static void bench_model(const model_dims *m, int T, bool full)
{
    const moe_dtype dt = MOE_DTYPE_BF16;
    route rt;
    make_route(&rt, T, m->k, m->E, R_RANDOM);
    const int M = rt.M, H = m->H, I = m->I;
    tt x, w13, w2, sc, act, pre, y;
    tt_pooled(&x, dt, (size_t)T * H, 0);
    tt_pooled(&w13, dt, (size_t)m->E * 2 * I * H, 0);
    tt_pooled(&w2, dt, (size_t)m->E * H * I, 0);
    tt_uniform(&sc, dt, (size_t)T * m->k, 0.05, 1.0);
    tt_out(&act, dt, (size_t)M * I);
    tt_out(&pre, dt, (size_t)M * 2 * I);
    tt_out(&y, dt, (size_t)T * m->k * H);

    moe_grouped_gemm_args g1, g2;
    memset(&g1, 0, sizeof g1);
    g1.dtype = dt;
    g1.num_experts = m->E;
    g1.expert_offsets = rt.d_offsets;
    g1.max_rows = rt.max_rows;
    g1.topk = m->k;
    g1.gather_idx = rt.d_gather;
    g2 = g1;
    g1.N = 2 * I;
    g1.K = H;
    g1.A = x.dev;
    g1.B = w13.dev;
    g1.C = act.dev;
    g1.C_preact = pre.dev;
    g1.permute_x = true;
    g1.scale_a_rows = m->llama ? sc.dev : NULL;
    g1.epilogue = MOE_EPI_SILU_MUL;
    g2.N = H;
    g2.K = I;
    g2.A = act.dev;
    g2.B = w2.dev;
    g2.C = y.dev;
    g2.permute_y = true;
    g2.scale_c_rows = m->llama ? NULL : sc.dev;

    const double f1 = 2.0 * M * (2.0 * I) * H, f2 = 2.0 * M * (double)H * I;
    fprintf(stderr, "BENCH %s T=%d bf16: M=%d  GEMM1 %dx%dx%d (%.1f GFLOP)  GEMM2 %dx%dx%d (%.1f GFLOP)\n",
            m->name, T, M, M, 2 * I, H, f1 * 1e-9, M, H, I, f2 * 1e-9);
    const moe_kernel_config *list;
    int n = moe_kernel_configs(dt, &list);
    float best1 = 1e30f, best2 = 1e30f, bestsum = 1e30f;
    int b1 = 0, b2 = 0, bs = 0;
    float old1 = 1e30f, old2 = 1e30f, new1 = 1e30f, new2 = 1e30f;
    for (int i = 0; i < n; i++) {
        char cs[64];
        if (!full && !bench_subset(&list[i])) continue;
        float t1 = time_ms(run_gg, &g1, &list[i], 10), t2 = time_ms(run_gg, &g2, &list[i], 10);
        if (list[i].use_tma) {
            if (t1 < new1) new1 = t1;
            if (t2 < new2) new2 = t2;
        } else {
            if (t1 < old1) old1 = t1;
            if (t2 < old2) old2 = t2;
        }
        fprintf(stderr, "BENCH   %-18s GEMM1 %8.3f ms %6.1f TF/s   GEMM2 %8.3f ms %6.1f TF/s   sum %8.3f ms\n",
                moe_kernel_config_str(&list[i], cs, sizeof cs), t1, f1 / t1 * 1e-9, t2,
                f2 / t2 * 1e-9, t1 + t2);
        if (list[i].use_tma)
            fprintf(stderr, "SUMMARY %-14s T=%-5d %-18s GEMM1 %7.3f GEMM2 %7.3f sum %7.3f ms\n",
                    m->name, T, cs, t1, t2, t1 + t2);
        if (t1 < best1) { best1 = t1; b1 = i; }
        if (t2 < best2) { best2 = t2; b2 = i; }
        if (t1 + t2 < bestsum) { bestsum = t1 + t2; bs = i; }
    }
    char c1[64], c2[64], c3[64];
    fprintf(stderr, "BENCH %s T=%d best: GEMM1 %s %.3f ms (%.1f TF/s), GEMM2 %s %.3f ms (%.1f TF/s); "
                    "GEMM1+GEMM2 %.3f ms = %.1f TF/s; best single config %s %.3f ms\n",
            m->name, T, moe_kernel_config_str(&list[b1], c1, sizeof c1), best1, f1 / best1 * 1e-9,
            moe_kernel_config_str(&list[b2], c2, sizeof c2), best2, f2 / best2 * 1e-9, best1 + best2,
            (f1 + f2) / (best1 + best2) * 1e-9, moe_kernel_config_str(&list[bs], c3, sizeof c3), bestsum);
    fprintf(stderr, "SUMMARY %-14s T=%-5d mma.sync best GEMM1 %7.3f GEMM2 %7.3f sum %7.3f ms | "
                    "wgmma best GEMM1 %7.3f GEMM2 %7.3f sum %7.3f ms (%.1f TF/s) | speedup %.2fx\n",
            m->name, T, old1, old2, old1 + old2, new1, new2, new1 + new2,
            (f1 + f2) / (new1 + new2) * 1e-9, (old1 + old2) / (new1 + new2));
    if (full) {
        /* diagnostics of the wgmma kernel (docs/KERNELS.md): the consumers' async-proxy fence
         * after every stage wait, and the share of the epilogue (stores skipped: timing only) */
        tt xperm; /* x already permuted into expert order [M, H]: would a permute pass pay off? */
        tt_pooled(&xperm, dt, (size_t)M * H, 0);
        for (int i = 0; i < n; i++) {
            if (!list[i].use_tma) continue;
            char cs[64];
            const moe_kernel_config *c = &list[i];
            float f1t = time_gg_with("fence", &g1, c);
            float f2t = time_gg_with("fence", &g2, c);
            float e1t = time_gg_with("noepi", &g1, c);
            float e2t = time_gg_with("noepi", &g2, c);
            float n1t = time_gg_with("nogather", &g1, c);
            float w1t = time_gg_with("narrow", &g1, &list[i]);
            float w2t = time_gg_with("narrow", &g2, &list[i]);
            /* exact_hf_rounding: IEEE SiLU, and Llama-4's scale_a rounded in shared memory */
            float x1t = time_gg_with("exact", &g1, c);
            /* inference writes no C_preact (the forward keeps it only for a backward) */
            void *pre_saved = g1.C_preact;
            g1.C_preact = NULL;
            float i1t = time_ms(run_gg, &g1, c, 10);
            float ie1t = time_gg_with("noepi", &g1, c);
            /* the epilogue from registers and staged wherever it fits (the default, auto,
             * stages where the padded output tile fits: 128x256 with 3 stages) */
            const moe_kernel_config c_direct = with_options(c, MOE_GG_EPILOGUE_DIRECT, c->a_load);
            const moe_kernel_config c_staged = with_options(c, MOE_GG_EPILOGUE_STAGED, c->a_load);
            const moe_kernel_config c_acp = with_options(c, c->epilogue, MOE_GG_A_CPASYNC);
            float id1t = time_ms(run_gg, &g1, &c_direct, 10);
            float is1t = time_ms(run_gg, &g1, &c_staged, 10);
            g1.C_preact = pre_saved;
            float id2t = time_ms(run_gg, &g2, &c_direct, 10);
            float is2t = time_ms(run_gg, &g2, &c_staged, 10);
            float ta2t = time_ms(run_gg, &g2, &c_acp, 10); /* GEMM2's A by cp.async */
            /* GEMM1 (inference: no C_preact) on x pre-permuted into expert order: A rows by
             * cp.async without the gather's scatter, and by TMA; against i1t (gathered) */
            moe_grouped_gemm_args g1p = g1;
            g1p.permute_x = false;
            g1p.A = xperm.dev;
            g1p.C_preact = NULL;
            float pp1t = time_ms(run_gg, &g1p, &c_acp, 10);
            float pt1t = time_ms(run_gg, &g1p, c, 10); /* A by TMA: the default */
            fprintf(stderr, "SUMMARY %-14s T=%-5d %s GEMM1 without C_preact: gathered x %7.3f | x "
                            "pre-permuted [M,H], cp.async %7.3f, by TMA %7.3f ms\n",
                    m->name, T, moe_kernel_config_str(c, cs, sizeof cs), i1t, pp1t, pt1t);
            float h1[2], h2[2];
            const char *hv[2] = {"l2none", "l2first"}; /* the default: evict_last + last evict_first */
            for (int v = 0; v < 2; v++) {
                h1[v] = time_gg_with(hv[v], &g1, c);
                h2[v] = time_gg_with(hv[v], &g2, c);
            }
            float o1t = time_gg_with("static", &g1, c);
            float o2t = time_gg_with("static", &g2, c);
            fprintf(stderr, "SUMMARY %-14s T=%-5d %s L2 hints off GEMM1 %7.3f GEMM2 %7.3f | "
                            "only evict_first GEMM1 %7.3f GEMM2 %7.3f ms\n",
                    m->name, T, moe_kernel_config_str(&list[i], cs, sizeof cs), h1[0], h2[0], h1[1],
                    h2[1]);
            float d1t = time_ms(run_gg, &g1, &list[i], 10), d2t = time_ms(run_gg, &g2, &list[i], 10);
            fprintf(stderr, "SUMMARY %-14s T=%-5d %s static tile order GEMM1 %7.3f GEMM2 %7.3f | "
                            "dynamic (default) GEMM1 %7.3f GEMM2 %7.3f ms\n",
                    m->name, T, moe_kernel_config_str(&list[i], cs, sizeof cs), o1t, o2t, d1t, d2t);
            fprintf(stderr, "SUMMARY %-14s T=%-5d %s again: default GEMM1 %7.3f GEMM2 %7.3f | "
                            "GEMM1 with exact HF rounding (IEEE SiLU%s) %7.3f | GEMM1 without "
                            "C_preact %7.3f, its mainloop alone %7.3f ms\n",
                    m->name, T, moe_kernel_config_str(&list[i], cs, sizeof cs), d1t, d2t,
                    g1.scale_a_rows ? ", scale_a rounded in shared memory" : "", x1t, i1t, ie1t);
            fprintf(stderr, "SUMMARY %-14s T=%-5d %s epilogue auto: GEMM1 without C_preact "
                            "%7.3f GEMM2 %7.3f | direct %7.3f %7.3f | staged %7.3f %7.3f | no "
                            "epilogue %7.3f %7.3f | GEMM2 with A by cp.async %7.3f ms\n",
                    m->name, T, moe_kernel_config_str(&list[i], cs, sizeof cs), i1t, d2t, id1t, id2t,
                    is1t, is2t, ie1t, e2t, ta2t);
            fprintf(stderr, "SUMMARY %-14s T=%-5d %s with proxy fence GEMM1 %7.3f GEMM2 %7.3f | "
                            "no epilogue GEMM1 %7.3f GEMM2 %7.3f | GEMM1 ungathered A %7.3f ms | "
                            "4-byte stores GEMM1 %7.3f GEMM2 %7.3f\n",
                    m->name, T, moe_kernel_config_str(&list[i], cs, sizeof cs), f1t, f2t, e1t, e2t,
                    n1t, w1t, w2t);
        }
        tt_free(&xperm);
    }
    {
        /* the automatic choice (what the engine runs without --kernel-config) */
        float d1 = time_ms(run_gg, &g1, NULL, 10), d2 = time_ms(run_gg, &g2, NULL, 10);
        fprintf(stderr, "SUMMARY %-14s T=%-5d default (auto) GEMM1 %7.3f GEMM2 %7.3f sum %7.3f ms\n",
                m->name, T, d1, d2, d1 + d2);
    }
    {
        /* the backward dX GEMMs (b_kn): dA0 = dout x W2 (gathered rows, [M, I]) and dXs = dgu x
         * W13 (scattered, [T*k, H]), the default (wgmma) against the mma.sync default */
        moe_grouped_gemm_args g3 = g1, g4 = g1;
        g3.N = I;
        g3.K = H;
        g3.A = x.dev; /* dout [T, H] */
        g3.B = w2.dev; /* [E][H][I] = [K][N] */
        g3.b_kn = true;
        g3.C = act.dev;
        g3.C_preact = NULL;
        g3.scale_a_rows = NULL;
        g3.epilogue = MOE_EPI_NONE;
        g4 = g3;
        g4.N = H;
        g4.K = 2 * I;
        g4.A = pre.dev; /* dgu [M, 2I] */
        g4.B = w13.dev; /* [E][2I][H] */
        g4.permute_x = false;
        g4.permute_y = true;
        g4.C = y.dev;
        const moe_kernel_config mma = moe_kernel_config_default_mma(dt, M / m->E);
        float w3 = time_ms(run_gg, &g3, NULL, 10), w4 = time_ms(run_gg, &g4, NULL, 10);
        float m3 = time_ms(run_gg, &g3, &mma, 10), m4 = time_ms(run_gg, &g4, &mma, 10);
        const moe_kernel_config acp = with_options(NULL, MOE_GG_EPILOGUE_AUTO, MOE_GG_A_CPASYNC);
        float a4 = time_ms(run_gg, &g4, &acp, 10); /* dgu by cp.async */
        fprintf(stderr, "SUMMARY %-14s T=%-5d dX (b_kn) default: GEMM2-dX %7.3f GEMM1-dX %7.3f sum %7.3f ms "
                        "(%.1f TF/s) | mma.sync default %7.3f %7.3f sum %7.3f ms | speedup %.2fx | "
                        "GEMM1-dX with A by cp.async %7.3f ms\n",
                m->name, T, w3, w4, w3 + w4, (f1 + f2) / (w3 + w4) * 1e-9, m3, m4, m3 + m4,
                (m3 + m4) / (w3 + w4), a4);
    }
    {
        /* the weight gradients: dW13 = dgu^T x (x gathered; Llama-4: times the score) and dW2 =
         * dout^T act (dout gathered; Qwen3: times the weight), the default (wgmma) against the
         * mma.sync default; written over the weight buffers (timing only) */
        moe_grouped_gemm_dw_args d13, d2;
        memset(&d13, 0, sizeof d13);
        d13.dtype = dt;
        d13.num_experts = m->E;
        d13.expert_offsets = rt.d_offsets;
        d13.max_rows = rt.max_rows;
        d13.topk = m->k;
        d13.gather_idx = rt.d_gather;
        d2 = d13;
        d13.N = 2 * I;
        d13.K = H;
        d13.dY = pre.dev;
        d13.X = x.dev;
        d13.permute_x = true;
        d13.scale_x_rows = m->llama ? sc.dev : NULL;
        d13.dW = w13.dev;
        d2.N = H;
        d2.K = I;
        d2.dY = x.dev; /* dout [T, H] */
        d2.permute_dy = true;
        d2.scale_dy_rows = m->llama ? NULL : sc.dev;
        d2.X = act.dev;
        d2.dW = w2.dev;
        const moe_kernel_config mma = moe_kernel_config_default_mma(dt, M / m->E);
        float w13t = time_ms(run_dw, &d13, NULL, 10), w2t = time_ms(run_dw, &d2, NULL, 10);
        float m13t = time_ms(run_dw, &d13, &mma, 10), m2t = time_ms(run_dw, &d2, &mma, 10);
        float e13t = NAN, e2t = NAN;
#ifdef MOE_DIAGNOSTICS
        {
            const moe_kernel_tuning saved = g_tuning;
            g_tuning.diag_skip_epilogue = true; /* the wgmma dW without its stores */
            e13t = time_ms(run_dw, &d13, NULL, 10);
            e2t = time_ms(run_dw, &d2, NULL, 10);
            g_tuning = saved;
        }
#endif
        /* the 4-stage dW storing from registers */
        const moe_kernel_config direct = with_options(NULL, MOE_GG_EPILOGUE_DIRECT, MOE_GG_A_AUTO);
        float s13t = time_ms(run_dw, &d13, &direct, 10), s2t = time_ms(run_dw, &d2, &direct, 10);
        fprintf(stderr, "SUMMARY %-14s T=%-5d dW default: dW13 %7.3f dW2 %7.3f sum %7.3f ms (%.1f TF/s) | "
                        "mma.sync default %7.3f %7.3f sum %7.3f ms | speedup %.2fx | without the "
                        "stores %7.3f %7.3f | direct epilogue (4 stages) %7.3f %7.3f ms\n",
                m->name, T, w13t, w2t, w13t + w2t, (f1 + f2) / (w13t + w2t) * 1e-9, m13t, m2t,
                m13t + m2t, (m13t + m2t) / (w13t + w2t), e13t, e2t, s13t, s2t);
    }
    if (full) { /* the autotuner on the same problems (fresh cache) */
        char path[128];
        snprintf(path, sizeof path, "/tmp/moe-gg-bench-%d.json", (int)getpid());
        remove(path);
        moe_kernel_config p1, p2;
        moe_error err;
        moe_error_clear(&err);
        assert_int_equal(moe_autotune_pick(path, &g1, &g_tuning, 0, &p1, &err), MOE_OK);
        assert_int_equal(moe_autotune_pick(path, &g2, &g_tuning, 0, &p2, &err), MOE_OK);
        float a1 = time_ms(run_gg, &g1, &p1, 10), a2 = time_ms(run_gg, &g2, &p2, 10);
        fprintf(stderr, "BENCH %s T=%d autotuned: GEMM1 %s %.3f ms, GEMM2 %s %.3f ms, sum %.3f ms = %.1f TF/s\n",
                m->name, T, moe_kernel_config_str(&p1, c1, sizeof c1), a1,
                moe_kernel_config_str(&p2, c2, sizeof c2), a2, a1 + a2, (f1 + f2) / (a1 + a2) * 1e-9);
        remove(path);
    }
    /* cuBLAS, one dense GEMM per shape (same FLOPs, no gather/scatter/experts): a ceiling */
    dense_gemm d;
    assert_int_equal(cublasCreate(&d.h), CUBLAS_STATUS_SUCCESS);
    tt da, dc;
    tt_pooled(&da, dt, (size_t)M * (H > I ? H : I), 0);
    tt_out(&dc, dt, (size_t)M * (2 * I > H ? 2 * I : H));
    d.M = M; d.N = 2 * I; d.K = H; d.A = da.dev; d.B = w13.dev; d.C = dc.dev;
    float c1ms = time_ms(run_cublas, &d, NULL, 10);
    d.N = H; d.K = I; d.B = w2.dev;
    float c2ms = time_ms(run_cublas, &d, NULL, 10);
    fprintf(stderr, "BENCH %s T=%d cuBLAS dense (one expert's weights, all rows): GEMM1-shape %.3f ms "
                    "(%.1f TF/s), GEMM2-shape %.3f ms (%.1f TF/s)\n",
            m->name, T, c1ms, f1 / c1ms * 1e-9, c2ms, f2 / c2ms * 1e-9);
    fprintf(stderr, "SUMMARY %-14s T=%-5d cuBLAS dense GEMM1 %7.3f GEMM2 %7.3f sum %7.3f ms\n", m->name,
            T, c1ms, c2ms, c1ms + c2ms);
    cublasDestroy(d.h);
    tt_free(&da);
    tt_free(&dc);
    tt_free(&x);
    tt_free(&w13);
    tt_free(&w2);
    tt_free(&sc);
    tt_free(&act);
    tt_free(&pre);
    tt_free(&y);
    free_route(&rt);
}

static void test_bench(void **state)
{
    (void)state;
    const char *b = getenv("MOE_GG_BENCH");
    if (!b || strcmp(b, "1") != 0) skip();
    const char *only = getenv("MOE_GG_BENCH_T"); /* e.g. "4096": one T only */
    const int Ts[4] = {256, 1024, 4096, 16384};
    for (int i = 0; i < 4; i++) {
        if (only && atoi(only) != Ts[i]) continue;
        bench_model(&k_qwen, Ts[i], Ts[i] == 4096);
        bench_model(&k_llama, Ts[i], Ts[i] == 4096);
    }
}

/* The tuning some tests change: put back after each of them even when it fails (a failed
 * assert leaves the test early), so no later test runs under it. */
static int reset_tuning(void **state)
{
    (void)state;
    tuning_reset();
    return 0;
}

int main(void)
{
    int gpu = moe_test_require_gpu();
    if (gpu) return gpu;
    moe_test_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rejections),
        cmocka_unit_test(test_fwd_flags),
        cmocka_unit_test(test_dw_flags),
        cmocka_unit_test(test_all_configs),
        cmocka_unit_test(test_misaligned_base),
        cmocka_unit_test(test_tiny_presets),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_autotune),
        cmocka_unit_test(test_real_qwen3),
        cmocka_unit_test(test_real_llama4),
        cmocka_unit_test(test_wgmma_flags),
        cmocka_unit_test_teardown(test_wgmma_persistent, reset_tuning),
        cmocka_unit_test_teardown(test_wgmma_epilogue_paths, reset_tuning),
        cmocka_unit_test(test_wgmma_real),
        cmocka_unit_test_teardown(test_wgmma_dw, reset_tuning),
        cmocka_unit_test(test_wgmma_two_streams),
    };
    const char *b = getenv("MOE_GG_BENCH");
    if (b && strcmp(b, "1") == 0) { /* timing only */
        const struct CMUnitTest bench[] = {cmocka_unit_test(test_bench)};
        return cmocka_run_group_tests(bench, NULL, NULL);
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else /* no CUDA in this build */

int main(void)
{
    return moe_test_require_gpu();
}

#endif
