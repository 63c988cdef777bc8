/*
 * cpu_fused_internal.h — private helpers of the cpu_fused_*.c files (not an API).
 *
 * Fast element conversions: bit-exact twins of dtype.c's moe_*_to_f32 / moe_f32_to_* (the
 * tests check every 16-bit input and a large sample of floats), written inline so the GEMM
 * prologues and epilogues vectorise instead of calling a function per element.
 * Row sources: how a GEMM reads row r of an operand (permuted through gather_idx or not,
 * scaled and rounded or not).
 */
#ifndef MOE_CPU_FUSED_INTERNAL_H
#define MOE_CPU_FUSED_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "../common.h"
#include "../dtype.h"

/* 8 fp32 lanes, held as two 4-lane halves (lanes 0-3, 4-7): the lane structure (and so the
 * summation order) is fixed by the source, and 16-byte vectors map onto SSE registers, where
 * 32-byte GCC vectors would be lowered through the stack. GCC/Clang vector extension. */
typedef float cf_v4 __attribute__((vector_size(16)));
typedef float cf_v4u __attribute__((vector_size(16), aligned(4), may_alias));
#define CF_LD4(p) (*(const cf_v4u *)(const void *)(p))
#define CF_ST4(p, v) (*(cf_v4u *)(void *)(p) = (v))
/* The 8 lanes (lo = 0-3, hi = 4-7) combined pairwise, a fixed order. */
static inline float cf_hsum8(cf_v4 lo, cf_v4 hi)
{
    return ((lo[0] + lo[1]) + (lo[2] + lo[3])) + ((hi[0] + hi[1]) + (hi[2] + hi[3]));
}

static inline float cf_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t cf_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float cf_bf16_to_f32(uint16_t h) { return cf_bits_f32((uint32_t)h << 16); }

static inline float cf_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
    /* Normal and subnormal halves alike: em << 13 is the float 2^-112 times the value. */
    float mag = cf_bits_f32(em << 13) * 0x1p112f;
    uint32_t bits = cf_f32_bits(mag);
    if (em >= 0x7c00u) bits = 0x7f800000u | ((em & 0x3ffu) << 13); /* Inf / NaN */
    return cf_bits_f32(bits | sign);
}

static inline uint16_t cf_f32_to_bf16(float f)
{
    uint32_t u = cf_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline uint16_t cf_f32_to_f16(float f)
{
    uint32_t u = cf_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to Inf */
    if (a >= 0x38800000u) {                                  /* normal half (>= 2^-14) */
        a += 0xfffu + ((a >> 13) & 1u);                      /* round to nearest even */
        return (uint16_t)(sign | ((a - 0x38000000u) >> 13));
    }
    /* Subnormal half: adding 0.5f leaves an ulp of 2^-24, the half subnormal unit, so the
     * FPU's own round-to-nearest-even does the rounding. */
    float t = cf_bits_f32(a) + 0.5f;
    return (uint16_t)(sign | (cf_f32_bits(t) - 0x3f000000u));
}

static inline float cf_load(moe_dtype dt, const void *base, size_t i)
{
    switch (dt) {
    case MOE_DTYPE_BF16: return cf_bf16_to_f32(((const uint16_t *)base)[i]);
    case MOE_DTYPE_F16: return cf_f16_to_f32(((const uint16_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}
static inline float cf_round(moe_dtype dt, float v)
{
    switch (dt) {
    case MOE_DTYPE_BF16: return cf_bf16_to_f32(cf_f32_to_bf16(v));
    case MOE_DTYPE_F16: return cf_f16_to_f32(cf_f32_to_f16(v));
    default: return v;
    }
}
static inline void cf_store(moe_dtype dt, void *base, size_t i, float v)
{
    switch (dt) {
    case MOE_DTYPE_BF16: ((uint16_t *)base)[i] = cf_f32_to_bf16(v); break;
    case MOE_DTYPE_F16: ((uint16_t *)base)[i] = cf_f32_to_f16(v); break;
    default: ((float *)base)[i] = v; break;
    }
}

/* Below this much work (multiply-adds or elements touched) a stage runs on the calling thread:
 * a parallel region costs more than it saves, and idle OpenMP workers spinning on a shared
 * machine slow everyone down. Results do not depend on it (each output has one fixed order). */
#define CF_PAR_MIN_WORK ((int64_t)1 << 17)
static inline bool cf_par(int64_t work) { return work >= CF_PAR_MIN_WORK; }

/* dst[0..n) = base[i0 .. i0+n) widened / src rounded into base[i0 ..). */
void cf_load_span(moe_dtype dt, const void *base, size_t i0, int n, float *dst);
void cf_store_span(moe_dtype dt, void *base, size_t i0, int n, const float *src);

/* How row r (expert order) of an operand is read. */
typedef struct cf_rows {
    moe_dtype dt;
    const void *base;
    int64_t ld;                /* elements per row */
    bool permute;              /* token order: row r reads base row gather[r] / topk */
    const void *scale;         /* [T*k] dt, optional: row scaled by scale[gather[r]], rounded */
    const int32_t *gather;
    int topk;
} cf_rows;

/* dst[0..n) = columns [c0, c0+n) of row r through permutation and scaling. */
void cf_load_row(const cf_rows *s, int64_t r, int64_t c0, int n, float *dst);

/* Shared argument checks. dt must be bf16/fp16/fp32. */
moe_status cf_check_dtype(const char *who, moe_dtype dt, moe_error *err);
/* offsets [E+1]: offsets[0] == 0, non-decreasing, offsets[E] <= max_rows; *M = offsets[E]. */
moe_status cf_check_offsets(const char *who, int E, const int32_t *offsets, int max_rows,
                            int64_t *M, moe_error *err);
/* gather [M]: every entry a flat index in [0, max_rows); with unique, no entry twice. */
moe_status cf_check_gather(const char *who, int64_t M, int max_rows, int topk,
                           const int32_t *gather, bool unique, moe_error *err);

/* Aligned per-thread scratch (64-byte aligned, n floats); NULL on failure. */
float *cf_scratch(size_t n);
void cf_scratch_free(float *p);

#endif /* MOE_CPU_FUSED_INTERNAL_H */
