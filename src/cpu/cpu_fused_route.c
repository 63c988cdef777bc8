/*
 * cpu_fused_route.c — routing on the fused path: router logits, top-k (softmax/renormalise for
 * Qwen3, sigmoid for Llama-4), the histogram + stable counting sort that builds the expert
 * order, and the router's backward.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu_fused.h"
#include "cpu_fused_internal.h"

moe_status cpu_router_logits(moe_dtype dt, int T, int H, int E, const void *x,
                             const void *router, void *logits, moe_error *err)
{
    /* logits [T,E] = x [T,H] @ router[E,H]^T: a GEMM with B = router as [N=E, K=H]. */
    return cpu_gemm(dt, T, E, H, x, router, false, logits, false, err);
}

/* a ranks before b: larger value, on a tie the lower id; NaN below every number. */
static inline bool ranks_before(float a, int ia, float b, int ib)
{
    if (isnan(a)) return isnan(b) && ia < ib;
    if (isnan(b)) return true;
    return a > b || (a == b && ia < ib);
}

/* ids[0..k) = the k best of v[0..E) in rank order (insertion into a sorted list of k). */
static void topk_row(const float *v, int E, int k, int32_t *ids)
{
    int n = 0;
    for (int i = 0; i < E; i++) {
        if (n == k && !ranks_before(v[i], i, v[ids[n - 1]], ids[n - 1])) continue;
        int p = n < k ? n : k - 1; /* the slot freed at the end */
        while (p > 0 && ranks_before(v[i], i, v[ids[p - 1]], ids[p - 1])) {
            ids[p] = ids[p - 1];
            p--;
        }
        ids[p] = i;
        if (n < k) n++;
    }
}

/* p[0..E) = softmax of the logits row in fp32: max-shifted, exps summed in ascending id. */
static void softmax_row(moe_dtype dt, const void *logits, size_t row0, int E, float *p)
{
    float mx = -INFINITY;
    for (int i = 0; i < E; i++) {
        p[i] = cf_load(dt, logits, row0 + i);
        if (p[i] > mx) mx = p[i];
    }
    float sum = 0.0f;
    for (int i = 0; i < E; i++) {
        p[i] = expf(p[i] - mx);
        sum += p[i];
    }
    for (int i = 0; i < E; i++) p[i] /= sum;
}

static inline float sigmoid_f(float v) { return 1.0f / (1.0f + expf(-v)); }

static moe_status check_route_cfg(const char *who, const moe_config *cfg, moe_dtype dt, int T,
                                  moe_error *err)
{
    if (!cfg) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: cfg is NULL", who);
    MOE_TRY(cf_check_dtype(who, dt, err));
    if (cfg->num_experts < 1 || cfg->top_k < 1 || cfg->top_k > cfg->num_experts)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: top_k = %d with %d experts, expected "
                        "1 <= k <= E", who, cfg->top_k, cfg->num_experts);
    if (T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T = %d < 0", who, T);
    return MOE_OK;
}

moe_status cpu_route_topk(const moe_config *cfg, moe_dtype dt, int T, const void *logits,
                          int32_t *topk_ids, void *topk_w, moe_error *err)
{
    static const char who[] = "cpu_route_topk";
    MOE_TRY(check_route_cfg(who, cfg, dt, T, err));
    int E = cfg->num_experts, k = cfg->top_k;
    int failed = 0;
#pragma omp parallel if (cf_par((int64_t)T * E * 8))
    {
        float *v = cf_scratch((size_t)E);
        if (!v) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            if (!v) continue;
            size_t row = (size_t)t * E;
            int32_t *ids = topk_ids + (size_t)t * k;
            if (cfg->arch == MOE_ARCH_QWEN3) {
                softmax_row(dt, logits, row, E, v);
                topk_row(v, E, k, ids);
                float sum = 0.0f;
                for (int j = 0; j < k; j++) sum += v[ids[j]];
                for (int j = 0; j < k; j++) {
                    float wj = v[ids[j]];
                    if (cfg->norm_topk_prob) wj /= sum;
                    cf_store(dt, topk_w, (size_t)t * k + j, wj);
                }
            } else {
                for (int i = 0; i < E; i++) v[i] = cf_load(dt, logits, row + i);
                topk_row(v, E, k, ids);
                for (int j = 0; j < k; j++)
                    cf_store(dt, topk_w, (size_t)t * k + j, sigmoid_f(v[ids[j]]));
            }
        }
        cf_scratch_free(v);
    }
    if (failed)
        return moe_fail(err, MOE_ERR_NOMEM, "%s: cannot allocate %d floats of scratch", who, E);
    return MOE_OK;
}

int cpu_sort_by_expert(int T, int k, const int32_t *topk_ids, int expert_begin, int El,
                       int32_t *token_counts, int32_t *expert_offsets, int32_t *gather_idx)
{
    /* Counting sort: histogram, exclusive prefix sum, then a sequential scatter in ascending
     * flat index, so rows within an expert keep ascending f (stable). */
    int64_t flat = (int64_t)T * k;
    for (int e = 0; e < El; e++) token_counts[e] = 0;
    for (int64_t f = 0; f < flat; f++) {
        int64_t le = (int64_t)topk_ids[f] - expert_begin;
        if (le >= 0 && le < El) token_counts[le]++;
    }
    expert_offsets[0] = 0;
    for (int e = 0; e < El; e++) expert_offsets[e + 1] = expert_offsets[e] + token_counts[e];
    /* The scatter cursor of each expert starts at its offset; token_counts is rebuilt as the
     * cursor minus the offset, which ends equal to the count. */
    for (int e = 0; e < El; e++) token_counts[e] = 0;
    for (int64_t f = 0; f < flat; f++) {
        int64_t le = (int64_t)topk_ids[f] - expert_begin;
        if (le >= 0 && le < El) gather_idx[expert_offsets[le] + token_counts[le]++] = (int32_t)f;
    }
    /* Entries past M name no row (as the CUDA sort leaves them). */
    for (int64_t r = expert_offsets[El]; r < flat; r++) gather_idx[r] = -1;
    return expert_offsets[El];
}

moe_status cpu_route_backward(const moe_config *cfg, moe_dtype dt, int T, const void *logits,
                              const int32_t *topk_ids, const float *d_topk_w, void *dlogits,
                              moe_error *err)
{
    static const char who[] = "cpu_route_backward";
    MOE_TRY(check_route_cfg(who, cfg, dt, T, err));
    int E = cfg->num_experts, k = cfg->top_k;
    int failed = 0;
#pragma omp parallel if (cf_par((int64_t)T * E * 8))
    {
        float *buf = cf_scratch((size_t)2 * E);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            if (!buf) continue;
            float *p = buf, *dl = buf + E;
            size_t row = (size_t)t * E;
            const int32_t *ids = topk_ids + (size_t)t * k;
            const float *dw = d_topk_w + (size_t)t * k;
            for (int i = 0; i < E; i++) dl[i] = 0.0f;
            if (cfg->arch == MOE_ARCH_QWEN3) {
                softmax_row(dt, logits, row, E, p);
                if (cfg->norm_topk_prob) {
                    /* w_j = p_j / Z over the selected: dp_j = (dw_j - sum_i dw_i w_i) / Z.
                     * Through the softmax, sum_j p_j dp_j = 0 exactly, so dl_j = p_j dp_j
                     * and the unselected logits get none. */
                    float Z = 0.0f, c = 0.0f;
                    for (int j = 0; j < k; j++) Z += p[ids[j]];
                    for (int j = 0; j < k; j++) c += dw[j] * (p[ids[j]] / Z);
                    for (int j = 0; j < k; j++) dl[ids[j]] = p[ids[j]] * ((dw[j] - c) / Z);
                } else {
                    /* dp = dw on the selected, 0 elsewhere; dl_i = p_i (dp_i - sum p dp). */
                    float dot = 0.0f;
                    for (int j = 0; j < k; j++) dot += p[ids[j]] * dw[j];
                    for (int i = 0; i < E; i++) dl[i] = -p[i] * dot;
                    for (int j = 0; j < k; j++) dl[ids[j]] = p[ids[j]] * (dw[j] - dot);
                }
            } else {
                for (int j = 0; j < k; j++) {
                    float s = sigmoid_f(cf_load(dt, logits, row + ids[j]));
                    dl[ids[j]] = dw[j] * s * (1.0f - s);
                }
            }
            cf_store_span(dt, dlogits, row, E, dl);
        }
        cf_scratch_free(buf);
    }
    if (failed)
        return moe_fail(err, MOE_ERR_NOMEM, "%s: cannot allocate %d floats of scratch", who,
                        2 * E);
    return MOE_OK;
}
