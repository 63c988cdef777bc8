/*
 * gpu_layer_test.h — what the single-process GPU layer tests (test_gpu_layer*.c) share:
 * check macros that name the failing call and moe_last_error(), device buffers through the
 * legacy stream (each helper synchronises the device, so the layers' non-blocking streams see
 * what was written and the host sees what they wrote), comparisons that name the tensor, the
 * worst row and the first differing element, and layers from a resolved config.
 * Header-only (static functions), included by exactly one translation unit per test, and only
 * in CUDA builds (MOE_HAVE_CUDA): a build without CUDA compiles the tests to a skip.
 */
#ifndef MOE_GPU_LAYER_TEST_H
#define MOE_GPU_LAYER_TEST_H

#ifdef MOE_HAVE_CUDA

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "test_util.h"

#include "block_state.h"
#include "config.h"
#include "cuda/cuda_backend.h" /* cuda_state: the kernel reports (rep[]) */
#include "dtype.h"
#include "layer/layer.h"
#include "rng.h"

#define GT_UNUSED __attribute__((unused))

/* A public call that must succeed: the call, its status and moe_last_error() on failure. */
#define API(call)                                                                             \
    do {                                                                                      \
        moe_status s_ = (call);                                                               \
        if (s_ != MOE_OK)                                                                     \
            fail_msg("%s:%d: %s -> %s: %s", __FILE__, __LINE__, #call, moe_strerror(s_),       \
                     moe_last_error());                                                       \
    } while (0)
/* An internal call taking a moe_error named `e_` (declared by the macro). */
#define INT(call_with_e)                                                                      \
    do {                                                                                      \
        moe_error e_;                                                                         \
        moe_error_clear(&e_);                                                                 \
        moe_status s_ = (call_with_e);                                                        \
        if (s_ != MOE_OK)                                                                     \
            fail_msg("%s:%d: %s -> %s: %s", __FILE__, __LINE__, #call_with_e,                  \
                     moe_strerror(s_), e_.msg);                                                \
    } while (0)
#define ERR (&e_)
#define CU(call)                                                                              \
    do {                                                                                      \
        cudaError_t c_ = (call);                                                              \
        if (c_ != cudaSuccess)                                                                \
            fail_msg("%s:%d: %s -> %s", __FILE__, __LINE__, #call, cudaGetErrorString(c_));   \
    } while (0)

/* ------------------------------------------------------------------ host memory ---- */

static GT_UNUSED void *gt_malloc(size_t n)
{
    void *p = malloc(n ? n : 16);
    if (!p) fail_msg("out of host memory (%zu bytes)", n);
    memset(p, 0xff, n ? n : 16); /* NaN in every float dtype, -1 in int32 */
    return p;
}

static GT_UNUSED double *gt_widen(moe_dtype dt, const void *p, size_t n)
{
    double *d = gt_malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) d[i] = moe_load_elem(dt, p, i);
    return d;
}

/* Rows idx[0..n) of a [*, row_bytes] buffer, contiguous. */
static GT_UNUSED void *gt_pick(const void *src, const int32_t *idx, size_t n, size_t row_bytes)
{
    char *p = gt_malloc(n * row_bytes);
    for (size_t i = 0; i < n; i++)
        memcpy(p + i * row_bytes, (const char *)src + (size_t)idx[i] * row_bytes, row_bytes);
    return p;
}

/* ------------------------------------------------------------------ device memory ---- */

static GT_UNUSED void *gt_dev(size_t n)
{
    void *d = NULL;
    CU(cudaMalloc(&d, n ? n : 16));
    return d;
}

/* The device's work done (the layers run on non-blocking streams the legacy stream does not
 * wait for); then the copy. */
static GT_UNUSED void gt_to_dev(void *d, const void *h, size_t n)
{
    CU(cudaDeviceSynchronize());
    if (n) CU(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    CU(cudaDeviceSynchronize());
}

static GT_UNUSED void *gt_dev_from(const void *h, size_t n)
{
    void *d = gt_dev(n);
    gt_to_dev(d, h, n);
    return d;
}

static GT_UNUSED void gt_from_dev(void *h, const void *d, size_t n)
{
    CU(cudaDeviceSynchronize());
    if (n) CU(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost));
}

static GT_UNUSED void *gt_host_from(const void *d, size_t n)
{
    void *h = gt_malloc(n);
    gt_from_dev(h, d, n);
    return h;
}

/* All bits set: NaN in every float dtype, -1 in int32. */
static GT_UNUSED void gt_poison(void *d, size_t n)
{
    CU(cudaDeviceSynchronize());
    if (n) CU(cudaMemset(d, 0xff, n));
    CU(cudaDeviceSynchronize());
}

/* ------------------------------------------------------------------ comparisons ---- */

/* rows x cols of a and ref (both dt) within tol (test_util's rule: global relative error and
 * every row within 10x; it prints the worst row). */
static GT_UNUSED bool gt_close(const char *case_name, const char *what, moe_dtype dt,
                               const void *a, const void *ref, size_t rows, size_t cols,
                               double tol)
{
    if (rows == 0 || cols == 0) return true;
    double *da = gt_widen(dt, a, rows * cols), *dr = gt_widen(dt, ref, rows * cols);
    char name[224];
    snprintf(name, sizeof name, "%s: %s", case_name, what);
    bool ok = moe_test_close(name, da, dr, rows, cols, tol);
    free(da);
    free(dr);
    return ok;
}
#define gt_assert_close(cn, what, dt, a, ref, rows, cols, tol)                                \
    do {                                                                                      \
        if (!gt_close((cn), (what), (dt), (a), (ref), (rows), (cols), (tol)))                 \
            fail_msg("%s: %s differs beyond tolerance %.1e (see the line above)", (cn),       \
                     (what), (tol));                                                          \
    } while (0)

/* Elements (of es bytes) that differ bitwise; the first one's index in *first. */
static GT_UNUSED size_t gt_bitdiff(const void *a, const void *b, size_t n, size_t es,
                                   size_t *first)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp((const char *)a + i * es, (const char *)b + i * es, es) != 0) {
            if (!bad && first) *first = i;
            bad++;
        }
    return bad;
}

/* a and b (n elements of dt, or int32 with dt = MOE_DTYPE_I32) bitwise equal, else fail
 * naming the tensor, the count and the first differing element as (row, col) of `cols`. */
static GT_UNUSED void gt_assert_bitwise(const char *case_name, const char *what, moe_dtype dt,
                                        const void *a, const void *b, size_t n, size_t cols)
{
    size_t es = moe_dtype_size(dt), first = 0;
    size_t bad = gt_bitdiff(a, b, n, es, &first);
    if (!bad) return;
    if (!cols) cols = 1;
    if (dt == MOE_DTYPE_I32)
        fail_msg("%s: %s: %zu of %zu elements differ bitwise; first at row %zu col %zu: %d vs %d",
                 case_name, what, bad, n, first / cols, first % cols,
                 ((const int32_t *)a)[first], ((const int32_t *)b)[first]);
    fail_msg("%s: %s: %zu of %zu elements differ bitwise; first at row %zu col %zu: %.9g vs "
             "%.9g", case_name, what, bad, n, first / cols, first % cols,
             moe_load_elem(dt, a, first), moe_load_elem(dt, b, first));
}

/* Device buffers a and b (n elements of dt) bitwise equal; compared in pieces of at most 64 Mi
 * elements (a Llama-4-Scout expert gradient is 2.7 GB). */
static GT_UNUSED void gt_assert_dev_bitwise(const char *case_name, const char *what,
                                            moe_dtype dt, const void *da, const void *db,
                                            size_t n, size_t cols)
{
    const size_t es = moe_dtype_size(dt), piece = (size_t)64 << 20;
    if (!cols) cols = 1;
    for (size_t at = 0; at < n; at += piece) {
        size_t m = n - at < piece ? n - at : piece;
        void *a = gt_host_from((const char *)da + at * es, m * es);
        void *b = gt_host_from((const char *)db + at * es, m * es);
        size_t first = 0, bad = gt_bitdiff(a, b, m, es, &first);
        if (bad) {
            size_t i = at + first;
            double x = dt == MOE_DTYPE_I32 ? ((int32_t *)a)[first] : moe_load_elem(dt, a, first);
            double y = dt == MOE_DTYPE_I32 ? ((int32_t *)b)[first] : moe_load_elem(dt, b, first);
            fail_msg("%s: %s: %zu elements of [%zu, %zu) differ bitwise; first at row %zu col "
                     "%zu: %.9g vs %.9g", case_name, what, bad, at, at + m, i / cols, i % cols, x, y);
        }
        free(a);
        free(b);
    }
}

/* Share of elements whose values differ (NaN counts as differing). */
static GT_UNUSED double gt_mismatch_share(moe_dtype dt, const void *a, const void *b, size_t n)
{
    if (!n) return 0;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double x = moe_load_elem(dt, a, i), y = moe_load_elem(dt, b, i);
        bad += !(x == y);
    }
    return (double)bad / (double)n;
}

/* ------------------------------------------------------------------ layers ---- */

static GT_UNUSED moe_config gt_cfg(moe_arch arch, int H, int I, int E, int k, int Is, bool norm)
{
    moe_config c;
    memset(&c, 0, sizeof c);
    c.arch = arch;
    snprintf(c.name, sizeof c.name, "%s-H%d-I%d-E%d-k%d%s", arch == MOE_ARCH_QWEN3 ? "qwen3" : "llama4",
             H, I, E, k, Is ? "-shared" : "");
    c.hidden = H;
    c.inter = I;
    c.num_experts = E;
    c.top_k = k;
    c.norm_topk_prob = arch == MOE_ARCH_QWEN3 && norm;
    c.shared_inter = arch == MOE_ARCH_LLAMA4 ? Is : 0;
    c.dtype = MOE_DTYPE_BF16;
    c.num_layers = 1;
    return c;
}

/* The old block test's tiny shapes: small, odd and pairwise different sizes. */
static GT_UNUSED moe_config gt_qwen_tiny(bool norm)
{
    return gt_cfg(MOE_ARCH_QWEN3, 37, 23, 7, 3, 0, norm);
}
static GT_UNUSED moe_config gt_llama_tiny(int k, int Is)
{
    return gt_cfg(MOE_ARCH_LLAMA4, 41, 19, 5, k, Is, false);
}

/* A layer of cfg on `backend` in dt with random weights of `seed` (the same seed gives the
 * same weights on every backend), options from base (NULL: defaults). */
static GT_UNUSED moe_layer *gt_layer(const moe_config *cfg, moe_backend backend, moe_dtype dt,
                                     uint64_t seed, const moe_layer_options *base)
{
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    if (base) o = *base;
    o.backend = backend;
    o.dtype = dt;
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_RANDOM;
    src.seed = seed;
    moe_layer *L = NULL;
    API(moe_layer_create_config(NULL, cfg, &src, &o, &L));
    return L;
}

/* The launch report of grouped GEMM g (MOE_GEMM_*) of a CUDA layer's last call. */
static GT_UNUSED const moe_kernel_report *gt_report(const moe_layer *L, int g)
{
    return &((const cuda_state *)L->be)->rep[g];
}

static GT_UNUSED void gt_print_reports(const char *case_name, const moe_layer *L)
{
    moe_layer_stats s = MOE_LAYER_STATS_INIT;
    if (moe_layer_stats_get(L, &s) != MOE_OK) return;
    static const char *const names[MOE_STATS_NUM_GEMMS] = {"gemm1", "gemm2", "dA0", "dX",
                                                            "dW2", "dW13"};
    fprintf(stderr, "    %s kernels:", case_name);
    for (int g = 0; g < MOE_STATS_NUM_GEMMS; g++)
        if (s.gemm_kernel[g][0])
            fprintf(stderr, " %s %s %s%s;", names[g], s.gemm_kernel[g], s.gemm_config[g],
                    gt_report(L, g)->sched_dynamic ? ",dyn" : "");
    fprintf(stderr, "\n");
}

/* Random host tensor [n] of dt from the counter-based generator (normal, sd). */
static GT_UNUSED void *gt_random(moe_dtype dt, size_t n, uint64_t seed, const char *name, double sd)
{
    void *p = gt_malloc(n * moe_dtype_size(dt));
    moe_fill_normal(dt, p, n, seed, name, 0, sd);
    return p;
}

#endif /* MOE_HAVE_CUDA */
#endif /* MOE_GPU_LAYER_TEST_H */
