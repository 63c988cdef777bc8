/*
 * threads.h — the CPU thread count the library uses when an option says 0 (docs/THREADS.md).
 *
 * Internal header (quoted includes only: "threads.h"). Do not reach for C11's <threads.h>
 * in this tree: src/ is on the include path, so <threads.h> finds this file, not the C library's.
 *
 * The rule, in full:
 *   1. OMP_NUM_THREADS, when it holds a valid value (moe_threads_parse_env), wins: its first
 *      number.
 *   2. Else the share of this process's CPU binding: for every CPU c in this process's affinity
 *      mask (sched_getaffinity of the process, i.e. of its main thread: logical CPUs, as
 *      OpenMP counts them), n(c) = the processes of this node whose masks contain c, this
 *      process included; the result is floor(sum over c of 1/n(c)), at least 1. "This node" is
 *      MPI_COMM_TYPE_SHARED of MPI_COMM_WORLD when MPI is initialised and not finalised, else
 *      this process alone (then the result is simply the CPUs it is bound to).
 *      So 4 ranks sharing 8 CPUs use 2 each, 4 ranks bound to 2 CPUs each of 8 use 2 each,
 *      4 ranks on the same 2 CPUs use 1 each, and a rank bound to 0-7 beside 4 ranks bound to
 *      2 CPUs each uses 4 (each of those 4 uses 1). Processes with identical or disjoint masks
 *      get (their CPUs / the processes sharing them); with partly overlapping masks each CPU is
 *      split among the processes bound to it, so the node's counts add up to no more than the
 *      CPUs they are bound to (except where the floor of 1 lifts a share below one CPU).
 *
 * Collective: moe_threads_compute and moe_threads_binding are collective over MPI_COMM_WORLD
 * when MPI is initialised and not finalised (MPI_Comm_split_type, then an Allreduce and an
 * Allgather on the node), whatever OMP_NUM_THREADS says, so ranks with different environments
 * never leave one another waiting. Call them from the thread that makes MPI calls.
 * moe_default_threads computes once per process (pthread_once) and caches: its FIRST call is
 * collective in that way (every rank must make it, at the same point of its collective
 * sequence, e.g. at context or layer creation); later calls return the cached value, are local
 * and thread-safe. OMP_NUM_THREADS is read at that first call only.
 */
#ifndef MOE_THREADS_H
#define MOE_THREADS_H

#include <stddef.h>
#include <stdint.h>

/* The CPU thread count the library uses when an option says 0: OMP_NUM_THREADS when set, else
 * the cores this process is bound to divided by the processes of this node bound to the same
 * cores (so 4 ranks sharing 8 cores use 2 each), at least 1. Exactly: the rule above (each CPU
 * of the binding split evenly among the node's processes bound to it, the shares summed, floor,
 * at least 1). Computed at the first call, which is collective over MPI_COMM_WORLD when MPI is
 * initialised (see above), and cached for the life of the process; never fails, >= 1. */
int moe_default_threads(void);

/* The same computation, done afresh (OMP_NUM_THREADS read now, masks gathered now) and not
 * cached: for tests, and for callers that rebind the process. Collective like the first call. */
int moe_threads_compute(void);

/* Rule 2 alone (OMP_NUM_THREADS ignored), done afresh. Collective like moe_threads_compute. */
int moe_threads_binding(void);

/* Rule 2 as a pure function, on masks of mask_bytes bytes each (bit c%8 of byte c/8 set =
 * CPU c): mine is this process's mask, all holds nprocs masks back to back (the node's
 * processes, this one included). A CPU of mine that no mask of all contains counts as shared
 * by this process alone; an empty mine gives 1. Returns floor(sum 1/n(c)), at least 1; the
 * sum is taken in double with a 1e-6 allowance, so 6 CPUs each shared by 3 give exactly 2. */
int moe_threads_share(const uint8_t *mine, const uint8_t *all, int nprocs, size_t mask_bytes);

/* Parse an OMP_NUM_THREADS value: a comma-separated list of positive decimal integers
 * (whitespace around each allowed, nothing else), as OpenMP reads it; returns the first one,
 * or 0 when s is NULL, empty or not such a list (no sign, no empty element, no value above
 * INT_MAX). OpenMP ignores an invalid OMP_NUM_THREADS, and so does the rule above. */
int moe_threads_parse_env(const char *s);

#endif /* MOE_THREADS_H */
