/* cpu_fused_util.c — conversions of spans, row sources, argument checks and scratch shared by
 * the cpu_fused_*.c stages (see cpu_fused_internal.h). */
#include "cpu_fused_internal.h"

#include <stdlib.h>

void cf_load_span(moe_dtype dt, const void *base, size_t i0, int n, float *dst)
{
    /* One switch per span, so each loop is a plain vectorisable conversion. */
    switch (dt) {
    case MOE_DTYPE_BF16: {
        const uint16_t *s = (const uint16_t *)base + i0;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = cf_bf16_to_f32(s[i]);
        break;
    }
    case MOE_DTYPE_F16: {
        const uint16_t *s = (const uint16_t *)base + i0;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = cf_f16_to_f32(s[i]);
        break;
    }
    default:
        memcpy(dst, (const float *)base + i0, (size_t)n * sizeof(float));
        break;
    }
}

void cf_store_span(moe_dtype dt, void *base, size_t i0, int n, const float *src)
{
    switch (dt) {
    case MOE_DTYPE_BF16: {
        uint16_t *d = (uint16_t *)base + i0;
#pragma omp simd
        for (int i = 0; i < n; i++) d[i] = cf_f32_to_bf16(src[i]);
        break;
    }
    case MOE_DTYPE_F16: {
        uint16_t *d = (uint16_t *)base + i0;
#pragma omp simd
        for (int i = 0; i < n; i++) d[i] = cf_f32_to_f16(src[i]);
        break;
    }
    default:
        memcpy((float *)base + i0, src, (size_t)n * sizeof(float));
        break;
    }
}

void cf_load_row(const cf_rows *s, int64_t r, int64_t c0, int n, float *dst)
{
    int64_t src_row = s->permute ? s->gather[r] / s->topk : r;
    cf_load_span(s->dt, s->base, (size_t)(src_row * s->ld + c0), n, dst);
    if (s->scale) {
        /* The scaled row is rounded to dt before it is used, as HF's x * score in dt is. */
        float sc = cf_load(s->dt, s->scale, (size_t)s->gather[r]);
        for (int i = 0; i < n; i++) dst[i] = cf_round(s->dt, dst[i] * sc);
    }
}

moe_status cf_check_dtype(const char *who, moe_dtype dt, moe_error *err)
{
    if (dt == MOE_DTYPE_BF16 || dt == MOE_DTYPE_F16 || dt == MOE_DTYPE_F32) return MOE_OK;
    const char *name = moe_dtype_name(dt);
    return moe_fail(err, MOE_ERR_UNSUPPORTED, "%s: dtype %s: the CPU fused path computes in "
                    "bf16, fp16 or fp32", who, name ? name : "(invalid)");
}

moe_status cf_check_offsets(const char *who, int E, const int32_t *offsets, int max_rows,
                            int64_t *M, moe_error *err)
{
    if (E < 1) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: num_experts = %d, expected >= 1",
                               who, E);
    if (!offsets) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: expert_offsets is NULL", who);
    if (offsets[0] != 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: expert_offsets[0] = %d, expected 0", who,
                        offsets[0]);
    for (int e = 0; e < E; e++) {
        if (offsets[e + 1] < offsets[e])
            return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: expert_offsets not sorted: "
                            "offsets[%d] = %d < offsets[%d] = %d", who, e + 1, offsets[e + 1], e,
                            offsets[e]);
    }
    if (offsets[E] > max_rows)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: expert_offsets[%d] = %d rows exceed "
                        "max_rows = %d", who, E, offsets[E], max_rows);
    *M = offsets[E];
    return MOE_OK;
}

moe_status cf_check_gather(const char *who, int64_t M, int max_rows, int topk,
                           const int32_t *gather, bool unique, moe_error *err)
{
    if (!gather)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: gather_idx is NULL but a flag "
                        "(permute or row scale) needs it", who);
    if (topk < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: topk = %d, expected >= 1 with "
                        "gather_idx", who, topk);
    int64_t flat = max_rows;
    for (int64_t r = 0; r < M; r++) {
        if (gather[r] < 0 || gather[r] >= flat)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: gather_idx[%lld] = %d, expected a "
                            "flat index in [0, max_rows = %lld)", who, (long long)r, gather[r],
                            (long long)flat);
    }
    if (unique) {
        unsigned char *seen = calloc((size_t)flat, 1);
        if (!seen)
            return moe_fail(err, MOE_ERR_NOMEM, "%s: cannot allocate %lld bytes to check "
                            "gather_idx", who, (long long)flat);
        for (int64_t r = 0; r < M; r++) {
            if (seen[gather[r]]++) {
                free(seen);
                return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: gather_idx[%lld] = %d appears "
                                "twice: permute_y would store two rows into one", who,
                                (long long)r, gather[r]);
            }
        }
        free(seen);
    }
    return MOE_OK;
}

float *cf_scratch(size_t n)
{
    size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes ? bytes : 64);
}

void cf_scratch_free(float *p) { free(p); }
