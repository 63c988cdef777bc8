/*
 * dtype.h — scalar conversions between fp32/fp64 and bf16/fp16, round-to-nearest-even,
 * NaN-preserving (a NaN stays a quiet NaN, never turns into Inf), subnormals kept.
 * These are bit-exact twins of the CUDA intrinsics __float2bfloat16_rn / __float2half_rn.
 */
#ifndef MOE_DTYPE_H
#define MOE_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "moe_ep.h"

typedef uint16_t moe_bf16;
typedef uint16_t moe_f16;

moe_bf16 moe_f32_to_bf16(float f);
float moe_bf16_to_f32(moe_bf16 h);
moe_f16 moe_f32_to_f16(float f);
float moe_f16_to_f32(moe_f16 h);
/* fp64 -> fp16 rounds once (not via an fp32 double rounding). */
moe_f16 moe_f64_to_f16(double d);
moe_bf16 moe_f64_to_bf16(double d);
float moe_f8e4m3_to_f32(uint8_t v);

/* Round a value to what dtype can hold and return it widened again (the "rounding point"
 * helper of the reference). F64 returns v unchanged, F32 rounds to float. */
double moe_round_to(moe_dtype dtype, double v);
float moe_round_to_f(moe_dtype dtype, float v);

/* Element i of a buffer of floating dtype, widened (bf16/f16/f32/f64/f8). */
double moe_load_elem(moe_dtype dtype, const void *base, size_t i);
float moe_load_elem_f(moe_dtype dtype, const void *base, size_t i);
/* Store v into element i, rounding to dtype. */
void moe_store_elem(moe_dtype dtype, void *base, size_t i, double v);
void moe_store_elem_f(moe_dtype dtype, void *base, size_t i, float v);

/* Parse "bf16"/"bfloat16", "fp16"/"f16"/"float16", "fp32"/"f32"/"float32", "fp64".
 * Returns false for anything else. */
bool moe_dtype_parse(const char *s, moe_dtype *out);
bool moe_dtype_is_float(moe_dtype d);

#endif /* MOE_DTYPE_H */
