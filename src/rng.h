/*
 * rng.h — a counter-based generator: every value is a pure function of (seed, tensor name,
 * element index), so any rank can generate exactly its slice of the same global tensor, and
 * the result does not depend on threads or rank count.
 */
#ifndef MOE_RNG_H
#define MOE_RNG_H

#include <stddef.h>
#include <stdint.h>

/* A stream id for a tensor name (64-bit FNV-1a of the name mixed with the seed). */
uint64_t moe_rng_stream(uint64_t seed, const char *tensor_name);
/* Uniform in [0,1) and standard normal for element `index` of a stream. */
double moe_rng_uniform(uint64_t stream, uint64_t index);
double moe_rng_normal(uint64_t stream, uint64_t index);
/* A raw 64-bit value. */
uint64_t moe_rng_u64(uint64_t stream, uint64_t index);

#include "moe_ep.h"
/* dst[i] = round_to(dtype, scale * normal(stream(seed, name), offset + i)) for i < n: the
 * elements [offset, offset+n) of a global tensor, identical whichever rank makes them. */
void moe_fill_normal(moe_dtype dtype, void *dst, size_t n, uint64_t seed, const char *name,
                     uint64_t offset, double scale);

#endif /* MOE_RNG_H */
