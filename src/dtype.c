/* dtype.c — bf16/fp16 conversions (see dtype.h for the contract). */
#include "dtype.h"

#include <math.h>
#include <string.h>

static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

moe_bf16 moe_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (moe_bf16)((u >> 16) | 0x0040u); /* quiet NaN */
    /* Round to nearest even: add 0x7fff plus the lowest kept bit; overflow carries into the
     * exponent, which is exactly how a value rounds up to the next binade or to Inf. */
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return (moe_bf16)(u >> 16);
}

float moe_bf16_to_f32(moe_bf16 h) { return bits_f32((uint32_t)h << 16); }

moe_bf16 moe_f64_to_bf16(double d)
{
    /* Double rounding through fp32 can differ from one rounding: round the double to a float
     * with round-to-odd on its 29 dropped bits, which makes the second rounding exact. */
    if (isnan(d)) return moe_f32_to_bf16((float)d);
    float f = (float)d;
    if (isinf(f) || (double)f == d) return moe_f32_to_bf16(f);
    uint32_t u = f32_bits(f);
    /* (float)d rounded to nearest; step back toward zero if it rounded away, then set the
     * sticky lowest bit (round-to-odd). */
    if (fabs((double)f) > fabs(d)) u -= 1u;
    u |= 1u;
    return moe_f32_to_bf16(bits_f32(u));
}

moe_f16 moe_f64_to_f16(double d)
{
    uint64_t u;
    memcpy(&u, &d, 8);
    uint16_t sign = (uint16_t)((u >> 48) & 0x8000u);
    double a = fabs(d);
    if (isnan(d)) return (moe_f16)(sign | 0x7e00u);
    if (a >= 65520.0) return (moe_f16)(sign | 0x7c00u); /* rounds to Inf (max 65504) */
    if (a < 0x1p-14) {
        /* subnormal range: units of 2^-24, round half to even */
        double q = a * 0x1p24;
        double r = nearbyint(q); /* default rounding mode: nearest-even */
        return (moe_f16)(sign | (uint16_t)r);
    }
    int e;
    double m = frexp(a, &e); /* a = m * 2^e, m in [0.5,1) */
    /* 11 significant bits: scale mantissa to [1024, 2048) */
    double q = nearbyint(m * 2048.0);
    if (q >= 2048.0) { q = 1024.0; e += 1; }
    int exp16 = e - 1 + 15;
    if (exp16 >= 31) return (moe_f16)(sign | 0x7c00u);
    return (moe_f16)(sign | (uint16_t)(exp16 << 10) | (uint16_t)((uint32_t)q - 1024u));
}

moe_f16 moe_f32_to_f16(float f) { return moe_f64_to_f16((double)f); }

float moe_f16_to_f32(moe_f16 h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

float moe_f8e4m3_to_f32(uint8_t v)
{
    int sign = v >> 7, exp = (v >> 3) & 0xf, man = v & 7;
    float r;
    if (exp == 0xf && man == 7) return NAN;
    if (exp == 0) r = ldexpf((float)man, -9);
    else r = ldexpf(1.0f + (float)man / 8.0f, exp - 7);
    return sign ? -r : r;
}

double moe_round_to(moe_dtype dtype, double v)
{
    switch (dtype) {
    case MOE_DTYPE_BF16: return moe_bf16_to_f32(moe_f64_to_bf16(v));
    case MOE_DTYPE_F16: return moe_f16_to_f32(moe_f64_to_f16(v));
    case MOE_DTYPE_F32: return (double)(float)v;
    default: return v;
    }
}

float moe_round_to_f(moe_dtype dtype, float v)
{
    switch (dtype) {
    case MOE_DTYPE_BF16: return moe_bf16_to_f32(moe_f32_to_bf16(v));
    case MOE_DTYPE_F16: return moe_f16_to_f32(moe_f32_to_f16(v));
    default: return v;
    }
}

double moe_load_elem(moe_dtype dtype, const void *base, size_t i)
{
    switch (dtype) {
    case MOE_DTYPE_BF16: return moe_bf16_to_f32(((const moe_bf16 *)base)[i]);
    case MOE_DTYPE_F16: return moe_f16_to_f32(((const moe_f16 *)base)[i]);
    case MOE_DTYPE_F32: return ((const float *)base)[i];
    case MOE_DTYPE_F64: return ((const double *)base)[i];
    case MOE_DTYPE_F8_E4M3: return moe_f8e4m3_to_f32(((const uint8_t *)base)[i]);
    case MOE_DTYPE_I32: return ((const int32_t *)base)[i];
    case MOE_DTYPE_I64: return (double)((const int64_t *)base)[i];
    default: return NAN;
    }
}

float moe_load_elem_f(moe_dtype dtype, const void *base, size_t i)
{
    switch (dtype) {
    case MOE_DTYPE_BF16: return moe_bf16_to_f32(((const moe_bf16 *)base)[i]);
    case MOE_DTYPE_F16: return moe_f16_to_f32(((const moe_f16 *)base)[i]);
    case MOE_DTYPE_F32: return ((const float *)base)[i];
    default: return (float)moe_load_elem(dtype, base, i);
    }
}

void moe_store_elem(moe_dtype dtype, void *base, size_t i, double v)
{
    switch (dtype) {
    case MOE_DTYPE_BF16: ((moe_bf16 *)base)[i] = moe_f64_to_bf16(v); break;
    case MOE_DTYPE_F16: ((moe_f16 *)base)[i] = moe_f64_to_f16(v); break;
    case MOE_DTYPE_F32: ((float *)base)[i] = (float)v; break;
    case MOE_DTYPE_F64: ((double *)base)[i] = v; break;
    case MOE_DTYPE_I32: ((int32_t *)base)[i] = (int32_t)v; break;
    case MOE_DTYPE_I64: ((int64_t *)base)[i] = (int64_t)v; break;
    default: break;
    }
}

void moe_store_elem_f(moe_dtype dtype, void *base, size_t i, float v)
{
    switch (dtype) {
    case MOE_DTYPE_BF16: ((moe_bf16 *)base)[i] = moe_f32_to_bf16(v); break;
    case MOE_DTYPE_F16: ((moe_f16 *)base)[i] = moe_f32_to_f16(v); break;
    case MOE_DTYPE_F32: ((float *)base)[i] = v; break;
    default: moe_store_elem(dtype, base, i, (double)v); break;
    }
}

static const char *const dtype_names[MOE_NUM_DTYPES] = {
    [MOE_DTYPE_BF16] = "bf16", [MOE_DTYPE_F16] = "fp16", [MOE_DTYPE_F32] = "fp32",
    [MOE_DTYPE_F64] = "fp64",  [MOE_DTYPE_F8_E4M3] = "fp8_e4m3",
    [MOE_DTYPE_I32] = "int32", [MOE_DTYPE_I64] = "int64",
};

const char *moe_dtype_name(moe_dtype dtype)
{
    if ((int)dtype < 0 || dtype >= MOE_NUM_DTYPES) return NULL;
    return dtype_names[dtype];
}

size_t moe_dtype_size(moe_dtype dtype)
{
    switch (dtype) {
    case MOE_DTYPE_BF16: case MOE_DTYPE_F16: return 2;
    case MOE_DTYPE_F32: case MOE_DTYPE_I32: return 4;
    case MOE_DTYPE_F64: case MOE_DTYPE_I64: return 8;
    case MOE_DTYPE_F8_E4M3: return 1;
    default: return 0;
    }
}

bool moe_dtype_parse(const char *s, moe_dtype *out)
{
    static const struct { const char *name; moe_dtype d; } names[] = {
        {"bf16", MOE_DTYPE_BF16}, {"bfloat16", MOE_DTYPE_BF16}, {"fp16", MOE_DTYPE_F16},
        {"f16", MOE_DTYPE_F16},   {"float16", MOE_DTYPE_F16},   {"half", MOE_DTYPE_F16},
        {"fp32", MOE_DTYPE_F32},  {"f32", MOE_DTYPE_F32},       {"float32", MOE_DTYPE_F32},
        {"float", MOE_DTYPE_F32}, {"fp64", MOE_DTYPE_F64},      {"float64", MOE_DTYPE_F64},
    };
    if (!s) return false;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(s, names[i].name) == 0) { *out = names[i].d; return true; }
    return false;
}

bool moe_dtype_is_float(moe_dtype d)
{
    return d == MOE_DTYPE_BF16 || d == MOE_DTYPE_F16 || d == MOE_DTYPE_F32 || d == MOE_DTYPE_F64 ||
           d == MOE_DTYPE_F8_E4M3;
}
