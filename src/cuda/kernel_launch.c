/*
 * kernel_launch.c — see kernel_launch.h: resolve-and-launch for the grouped GEMMs, the tile
 * scheduler's counters, and (diagnostics builds only) the MOE_WGMMA_* environment.
 */
#include "kernel_launch.h"

#include <stdlib.h>
#include <string.h>

#include "kernel_config.h"

static int avg_rows_of(int max_rows, int num_experts)
{
    return num_experts > 0 && max_rows > 0 ? max_rows / num_experts : 0;
}

moe_status moe_grouped_gemm_launch(const moe_grouped_gemm_args *a, const moe_kernel_config *req,
                                   const moe_kernel_tuning *tuning, cudaStream_t stream,
                                   moe_kernel_report *report, moe_error *err)
{
    /* no arguments: the launcher's own message */
    if (!a) return moe_cuda_grouped_gemm(a, req, tuning, stream, report, err);
    moe_kernel_config c;
    const moe_status st =
        moe_kernel_config_resolve(req, a->dtype, avg_rows_of(a->max_rows, a->num_experts), &c, err);
    if (st != MOE_OK) {
        if (err) moe_error_prefix(err, "moe_cuda_grouped_gemm");
        return st;
    }
    return moe_cuda_grouped_gemm(a, &c, tuning, stream, report, err);
}

moe_status moe_grouped_gemm_dw_launch(const moe_grouped_gemm_dw_args *a,
                                      const moe_kernel_config *req,
                                      const moe_kernel_tuning *tuning, cudaStream_t stream,
                                      moe_kernel_report *report, moe_error *err)
{
    if (!a) return moe_cuda_grouped_gemm_dw(a, req, tuning, stream, report, err);
    moe_kernel_config c;
    const moe_status st =
        moe_kernel_config_resolve(req, a->dtype, avg_rows_of(a->max_rows, a->num_experts), &c, err);
    if (st != MOE_OK) {
        if (err) moe_error_prefix(err, "moe_cuda_grouped_gemm_dw");
        return st;
    }
    return moe_cuda_grouped_gemm_dw(a, &c, tuning, stream, report, err);
}

moe_status moe_sched_counters_alloc(int32_t **out, cudaStream_t stream, moe_error *err)
{
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_sched_counters_alloc: out is NULL");
    *out = NULL;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, MOE_SCHED_COUNTERS_BYTES);
    if (e == cudaSuccess) e = cudaMemsetAsync(p, 0, MOE_SCHED_COUNTERS_BYTES, stream);
    if (e != cudaSuccess) {
        if (p) cudaFree(p);
        cudaGetLastError();
        return moe_fail(err, e == cudaErrorMemoryAllocation ? MOE_ERR_NOMEM : MOE_ERR_CUDA,
                        "tile scheduler counters: %s", cudaGetErrorString(e));
    }
    *out = p;
    return MOE_OK;
}

void moe_sched_counters_free(int32_t *p)
{
    if (p) cudaFree(p);
}

#ifdef MOE_DIAGNOSTICS
/* "1" turns a switch on (anything else, or unset, leaves it off). */
static bool env_on(const char *name)
{
    const char *s = getenv(name);
    return s && strcmp(s, "1") == 0;
}

/* An integer setting: dflt when unset or empty, else atoi clamped into [lo, hi]. */
static int env_int(const char *name, int dflt, int lo, int hi)
{
    const char *s = getenv(name);
    if (!s || !*s) return dflt;
    const int v = atoi(s);
    return v < lo ? lo : v > hi ? hi : v;
}

void moe_kernel_tuning_apply_env(moe_kernel_tuning *t)
{
    if (!t) return;
    /* wrong results, timing only */
    t->diag_skip_epilogue = env_on("MOE_WGMMA_SKIP_EPILOGUE");
    t->diag_no_gather = env_on("MOE_WGMMA_NO_GATHER");
    /* same results, for A/B of the whole layer (tests and the GEMM bench set the fields) */
    if (env_on("MOE_WGMMA_STATIC_SCHED")) t->sched_counters = NULL;
    t->max_ctas = env_int("MOE_WGMMA_MAX_CTAS", t->max_ctas, 0, 1 << 30);
    /* MOE_WGMMA_L2_HINTS keeps the values it had before: 0 none, 1 default, 2 evict_first only */
    const int l2 = env_int("MOE_WGMMA_L2_HINTS", -1, 0, 2);
    if (l2 >= 0)
        t->l2_hints = l2 == 0 ? MOE_L2_HINTS_NONE : l2 == 2 ? MOE_L2_HINTS_EVICT_FIRST
                                                            : MOE_L2_HINTS_DEFAULT;
    t->prefetch = env_int("MOE_WGMMA_PREFETCH", t->prefetch, 0, 64);
    if (env_on("MOE_WGMMA_PROXY_FENCE")) t->proxy_fence = true;
    if (env_on("MOE_WGMMA_NARROW_STORES")) t->narrow_stores = true;
}
#else
void moe_kernel_tuning_apply_env(moe_kernel_tuning *t) { (void)t; }
#endif
