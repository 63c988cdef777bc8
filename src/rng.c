/* rng.c — counter-based generator (see rng.h). Mixing is SplitMix64's finaliser applied to the
 * stream and counter; two rounds decorrelate neighbouring indices. */
#include "rng.h"

#include <math.h>

#include "hash.h"

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t moe_rng_stream(uint64_t seed, const char *tensor_name)
{
    const uint64_t h = moe_fnv1a_str(MOE_FNV1A_INIT, tensor_name);
    return mix64(h ^ mix64(seed + 0x9e3779b97f4a7c15ull));
}

uint64_t moe_rng_u64(uint64_t stream, uint64_t index)
{
    return mix64(mix64(stream + index * 0x9e3779b97f4a7c15ull) ^ stream);
}

double moe_rng_uniform(uint64_t stream, uint64_t index)
{
    return (double)(moe_rng_u64(stream, index) >> 11) * 0x1p-53;
}

double moe_rng_normal(uint64_t stream, uint64_t index)
{
    /* Box-Muller on the two 32-bit halves of one hash, in float: test data needs speed more than
     * far tails (|z| <= 6.7). u1 in (0,1] avoids log(0). */
    uint64_t r = moe_rng_u64(stream, index);
    float u1 = (float)((uint32_t)(r >> 40) + 1u) * 0x1p-24f;
    float u2 = (float)(uint32_t)(r & 0xffffffu) * 0x1p-24f;
    return (double)(sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2));
}

#include "dtype.h"

void moe_fill_normal(moe_dtype dtype, void *dst, size_t n, uint64_t seed, const char *name,
                     uint64_t offset, double scale)
{
    uint64_t s = moe_rng_stream(seed, name);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) moe_store_elem(dtype, dst, i, scale * moe_rng_normal(s, offset + i));
}
