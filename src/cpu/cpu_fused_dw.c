/*
 * cpu_fused_dw.c — the grouped weight-gradient GEMM: dW_e [N,K] = sum over expert e's rows r of
 * dY_r^T X_r, the CPU twin of the CUDA backward-dW kernel.
 *
 * Tiles are (expert, NBW rows of dW, KBW columns of dW); a tile walks its expert's rows in
 * ascending order in chunks of RC, converting dY and X rows (through permute / scale) to fp32,
 * and accumulates acc[n][k] += dY[r][n] * X[r][k] one row after the other: every element is
 * the sum over r in ascending order starting from +0, whatever the thread count. An expert
 * with no rows gets exact zeros.
 */
#include <stdlib.h>

#include "cpu_fused.h"
#include "cpu_fused_internal.h"

#define NBW 32  /* rows of dW per tile */
#define KBW 256 /* columns of dW per tile (multiple of 8) */
#define RC 8    /* expert rows converted per chunk */
#define WSW_FLOATS ((size_t)NBW * KBW + (size_t)RC * NBW + (size_t)RC * KBW)

typedef struct dw_job {
    const moe_grouped_gemm_dw_args *a;
    cf_rows dy, x;
} dw_job;

/* acc[n][0..kbp) += sum over rr < rc (in order) of dyb[rr][n] * xb[rr][0..kbp). */
static void micro_dw(int rc, int nbw, int kbp, const float *dyb, const float *xb, float *acc)
{
    int n = 0;
    for (; n + 4 <= nbw; n += 4) {
        float *c0 = acc + (size_t)n * KBW, *c1 = c0 + KBW, *c2 = c1 + KBW, *c3 = c2 + KBW;
        for (int k = 0; k < kbp; k += 4) {
            cf_v4 s0 = CF_LD4(c0 + k), s1 = CF_LD4(c1 + k), s2 = CF_LD4(c2 + k),
                  s3 = CF_LD4(c3 + k);
            for (int rr = 0; rr < rc; rr++) {
                cf_v4 xv = CF_LD4(xb + (size_t)rr * KBW + k);
                const float *d = dyb + (size_t)rr * NBW + n;
                s0 += d[0] * xv;
                s1 += d[1] * xv;
                s2 += d[2] * xv;
                s3 += d[3] * xv;
            }
            CF_ST4(c0 + k, s0);
            CF_ST4(c1 + k, s1);
            CF_ST4(c2 + k, s2);
            CF_ST4(c3 + k, s3);
        }
    }
    for (; n < nbw; n++) {
        float *c0 = acc + (size_t)n * KBW;
        for (int k = 0; k < kbp; k += 4) {
            cf_v4 s0 = CF_LD4(c0 + k);
            for (int rr = 0; rr < rc; rr++)
                s0 += dyb[(size_t)rr * NBW + n] * CF_LD4(xb + (size_t)rr * KBW + k);
            CF_ST4(c0 + k, s0);
        }
    }
}

static void run_tile_dw(const dw_job *g, int e, int n0, int k0, float *ws)
{
    const moe_grouped_gemm_dw_args *a = g->a;
    float *acc = ws;
    float *dyb = acc + (size_t)NBW * KBW;
    float *xb = dyb + (size_t)RC * NBW;
    int nbw = MOE_MIN(NBW, a->N - n0);
    int kb = MOE_MIN(KBW, a->K - k0);
    int kbp = (kb + 7) & ~7;
    memset(acc, 0, sizeof(float) * (size_t)NBW * KBW);
    int32_t r_end = a->expert_offsets[e + 1];
    for (int32_t r0 = a->expert_offsets[e]; r0 < r_end; r0 += RC) {
        int rc = MOE_MIN(RC, r_end - r0);
        for (int rr = 0; rr < rc; rr++) {
            cf_load_row(&g->dy, (int64_t)r0 + rr, n0, nbw, dyb + (size_t)rr * NBW);
            float *xd = xb + (size_t)rr * KBW;
            cf_load_row(&g->x, (int64_t)r0 + rr, k0, kb, xd);
            for (int kk = kb; kk < kbp; kk++) xd[kk] = 0.0f;
        }
        micro_dw(rc, nbw, kbp, dyb, xb, acc);
    }
    size_t base = (size_t)e * (size_t)a->N * (size_t)a->K;
    for (int n = 0; n < nbw; n++)
        cf_store_span(a->dtype, a->dW, base + (size_t)(n0 + n) * a->K + k0, kb,
                      acc + (size_t)n * KBW);
}

moe_status cpu_grouped_gemm_dw(const moe_grouped_gemm_dw_args *a, moe_error *err)
{
    static const char who[] = "cpu_grouped_gemm_dw";
    if (!a) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: args is NULL", who);
    MOE_TRY(cf_check_dtype(who, a->dtype, err));
    if (a->N < 1 || a->K < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: N = %d, K = %d, expected >= 1", who,
                        a->N, a->K);
    int64_t M;
    MOE_TRY(cf_check_offsets(who, a->num_experts, a->expert_offsets, a->max_rows, &M, err));
    if (!a->dY || !a->X || !a->dW)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: %s is NULL", who,
                        !a->dY ? "dY" : !a->X ? "X" : "dW");
    bool need_gather = a->permute_dy || a->permute_x || a->scale_dy_rows || a->scale_x_rows;
    if (need_gather)
        MOE_TRY(cf_check_gather(who, M, a->max_rows, a->topk, a->gather_idx, false, err));
    dw_job g = {
        .a = a,
        .dy = {a->dtype, a->dY, a->N, a->permute_dy, a->scale_dy_rows, a->gather_idx, a->topk},
        .x = {a->dtype, a->X, a->K, a->permute_x, a->scale_x_rows, a->gather_idx, a->topk},
    };
    int nnb = (a->N + NBW - 1) / NBW, nkb = (a->K + KBW - 1) / KBW;
    int64_t per_e = (int64_t)nnb * nkb;
    int64_t ntask = per_e * a->num_experts;
    int failed = 0;
    int64_t work = (M + a->num_experts) * (int64_t)a->N * a->K;
#pragma omp parallel if (ntask > 1 && cf_par(work))
    {
        float *ws = cf_scratch(WSW_FLOATS);
        if (!ws) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; t++) {
            if (!ws) continue;
            int e = (int)(t / per_e);
            int64_t rest = t % per_e;
            run_tile_dw(&g, e, (int)(rest / nkb) * NBW, (int)(rest % nkb) * KBW, ws);
        }
        cf_scratch_free(ws);
    }
    if (failed)
        return moe_fail(err, MOE_ERR_NOMEM, "%s: cannot allocate %zu bytes of per-thread "
                        "scratch", who, WSW_FLOATS * sizeof(float));
    return MOE_OK;
}
