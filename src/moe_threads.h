/*
 * moe_threads.h — the CPU thread count the library uses when an option says 0
 * (docs/THREADS.md). Internal.
 *
 * The rule, in full:
 *   1. OMP_NUM_THREADS, when it holds a valid value (moe_threads_parse_env), wins: its first
 *      number.
 *   2. Else the share of this process's CPU binding: for every CPU c in this process's affinity
 *      mask (sched_getaffinity of the process, i.e. of its main thread: logical CPUs, as
 *      OpenMP counts them), n(c) = the processes of this node whose masks contain c, this
 *      process included; the result is floor(sum over c of 1/n(c)), at least 1. "This node" is
 *      the MPI_COMM_TYPE_SHARED part of the communicator of the first EP communicator this
 *      process creates (moe_ep_comm_create calls moe_threads_init_comm, collectively); until
 *      then, and without MPI, this process alone (the CPUs it is bound to).
 *      So 4 ranks sharing 8 CPUs use 2 each, 4 ranks bound to 2 CPUs each of 8 use 2 each,
 *      4 ranks on the same 2 CPUs use 1 each, and a rank bound to 0-7 beside 4 ranks bound to
 *      2 CPUs each uses 4 (each of those 4 uses 1). Processes with identical or disjoint masks
 *      get (their CPUs / the processes sharing them); with partly overlapping masks each CPU is
 *      split among the processes bound to it, so the node's counts add up to no more than the
 *      CPUs they are bound to (except where the floor of 1 lifts a share below one CPU).
 *
 * Collective: moe_threads_init_comm (over its communicator), moe_threads_compute and
 * moe_threads_binding (over MPI_COMM_WORLD, for tests) split the node and gather the masks
 * whatever OMP_NUM_THREADS says, so ranks with different environments never leave one another
 * waiting. moe_default_threads is local and thread-safe: it returns the cached value (computed
 * without MPI at its first call if no communicator has been made yet). OMP_NUM_THREADS is
 * read when the value is computed.
 */
#ifndef MOE_THREADS_H
#define MOE_THREADS_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

/* moe_default_threads (declared in moe_ep.h): the cached value of the rule above; never
 * fails, >= 1. */

/* Share this process's binding among the processes of comm on its node, and cache the result
 * for moe_default_threads (replacing a value computed without MPI). Collective over comm; a
 * no-op after the first call. */
void moe_threads_init_comm(MPI_Comm comm);

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
