/* hash.c — 64-bit FNV-1a (see hash.h). */
#include "hash.h"

#define FNV1A_PRIME 1099511628211ull

uint64_t moe_fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= FNV1A_PRIME;
    }
    return h;
}

uint64_t moe_fnv1a_str(uint64_t h, const char *s)
{
    for (; s && *s; s++) {
        h ^= (unsigned char)*s;
        h *= FNV1A_PRIME;
    }
    return h;
}
