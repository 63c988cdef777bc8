/* test_util.c — see test_util.h. */
#include "test_util.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

uint64_t moe_test_seed(void)
{
    static uint64_t seed;
    static bool have;
    if (have) return seed;
    const char *env = getenv("MOE_TEST_SEED");
    if (env && *env) {
        seed = strtoull(env, NULL, 0);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = ((uint64_t)ts.tv_sec * 1000003u) ^ (uint64_t)ts.tv_nsec;
    }
    have = true;
    fprintf(stderr, "test seed: %" PRIu64 " (replay with MOE_TEST_SEED=%" PRIu64 ")\n", seed, seed);
    return seed;
}

int moe_test_require_gpu(void)
{
    const char *req = getenv("MOE_REQUIRE_GPU");
    bool required = req && strcmp(req, "1") == 0;
#ifdef MOE_HAVE_CUDA
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaSuccess && n > 0) return 0;
    fprintf(stderr, "no usable GPU: %s\n", e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
#else
    fprintf(stderr, "no usable GPU: this build has no CUDA backend (MOE_ENABLE_CUDA=OFF or no toolkit)\n");
#endif
    if (required) {
        fprintf(stderr, "MOE_REQUIRE_GPU=1: a missing GPU is a failure\n");
        return 1;
    }
    fprintf(stderr, "SKIPPED: GPU test without a GPU\n");
    return MOE_TEST_SKIP;
}

const char *const moe_test_grad_names[6] = {"d router",      "d w13",       "d w2",
                                            "d shared_gate", "d shared_up", "d shared_down"};

void **moe_test_grad_slot(moe_layer_grads *g, int i)
{
    void **p[6] = {&g->router, &g->w13, &g->w2, &g->shared_gate, &g->shared_up, &g->shared_down};
    return p[i];
}

double moe_test_rel_err(const double *a, const double *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(ref[i])) return INFINITY;
        double d = a[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return sqrt(num / den);
}

bool moe_test_close(const char *what, const double *a, const double *ref, size_t rows,
                    size_t cols, double tol)
{
    double g = moe_test_rel_err(a, ref, rows * cols);
    double worst = 0;
    size_t worst_row = 0;
    for (size_t r = 0; r < rows; r++) {
        double e = moe_test_rel_err(a + r * cols, ref + r * cols, cols);
        if (e > worst || isnan(e)) { worst = e; worst_row = r; }
    }
    bool ok = g <= tol && worst <= 10 * tol;
    fprintf(stderr, "%-28s rel %.3e  worst row %zu: %.3e  tol %.1e  %s\n", what, g, worst_row,
            worst, tol, ok ? "ok" : "FAIL");
    return ok;
}

bool moe_test_close_kept(const char *what, double *a, double *ref, size_t rows, size_t cols,
                         const bool *skip, double tol)
{
    size_t kept = 0;
    for (size_t r = 0; r < rows; r++) {
        if (skip && skip[r]) continue;
        memmove(a + kept * cols, a + r * cols, cols * sizeof(double));
        memmove(ref + kept * cols, ref + r * cols, cols * sizeof(double));
        kept++;
    }
    return moe_test_close(what, a, ref, kept, cols, tol);
}

double moe_test_tol(moe_dtype dt, bool grad)
{
    switch (dt) {
    case MOE_DTYPE_BF16: return 1e-2;
    case MOE_DTYPE_F16: return 1e-3;
    case MOE_DTYPE_F32: return grad ? 1e-4 : 1e-5;
    default: return 1e-9;
    }
}

void moe_test_router_bwd_ref(bool llama, bool norm, int E, int k, const double *logits,
                             const int32_t *id, const double *dw, double *dl)
{
    for (int e = 0; e < E; e++) dl[e] = 0;
    if (llama) {
        for (int j = 0; j < k; j++) {
            double sg = 1.0 / (1.0 + exp(-logits[id[j]]));
            dl[id[j]] = dw[j] * sg * (1.0 - sg);
        }
        return;
    }
    double *p = malloc(sizeof(double) * (size_t)(E > 0 ? E : 1));
    if (!p) abort();
    double mx = -INFINITY, s = 0;
    for (int e = 0; e < E; e++) mx = fmax(mx, logits[e]);
    for (int e = 0; e < E; e++) s += (p[e] = exp(logits[e] - mx));
    for (int e = 0; e < E; e++) p[e] /= s;
    if (norm) {
        double S = 0, c = 0;
        for (int j = 0; j < k; j++) S += p[id[j]];
        for (int j = 0; j < k; j++) c += p[id[j]] / S * dw[j];
        for (int j = 0; j < k; j++) dl[id[j]] = p[id[j]] / S * (dw[j] - c);
    } else {
        double c = 0;
        for (int j = 0; j < k; j++) c += p[id[j]] * dw[j];
        for (int e = 0; e < E; e++) dl[e] = -p[e] * c;
        for (int j = 0; j < k; j++) dl[id[j]] = p[id[j]] * (dw[j] - c);
    }
    free(p);
}
