/*
 * hash.h — 64-bit FNV-1a, the one byte hash of the library: the layer fingerprint every rank
 * agrees on, the expert map's and the replicated weights' hashes, the route spec's, and the
 * RNG's stream ids. Stable across builds and ranks (a pure function of the bytes), not
 * cryptographic.
 */
#ifndef MOE_HASH_H
#define MOE_HASH_H

#include <stddef.h>
#include <stdint.h>

/* The offset basis: the hash of no bytes, where every chain of moe_fnv1a calls starts. */
#define MOE_FNV1A_INIT 14695981039346656037ull

/* h extended by the n bytes at p. */
uint64_t moe_fnv1a(uint64_t h, const void *p, size_t n);
/* h extended by the bytes of the string s (up to its NUL; NULL adds nothing). */
uint64_t moe_fnv1a_str(uint64_t h, const char *s);

#endif /* MOE_HASH_H */
