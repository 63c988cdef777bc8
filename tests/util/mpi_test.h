/*
 * mpi_test.h — what every test_mpi_*.c shares: the rank globals, a collective "did every rank
 * pass" (so all ranks take the same cmocka branch and nobody is left in a collective), check
 * macros that report the failing rank and keep going, and the start-up (core sharing between
 * oversubscribed ranks, one seed for all ranks). Header-only: it is included by exactly one
 * translation unit per test executable.
 */
#ifndef MOE_MPI_TEST_H
#define MOE_MPI_TEST_H

#include <mpi.h>
#include <omp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#include "moe_ep.h"
#include "test_util.h"

/* unused in some builds (a GPU test without CUDA only skips) */
static int g_rank, g_size __attribute__((unused));
static uint64_t g_seed __attribute__((unused));

/* true on every rank iff ok on every rank (collective) */
static inline bool all_true(bool ok)
{
    int v = ok ? 1 : 0, r = 0;
    MPI_Allreduce(&v, &r, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    return r != 0;
}

/* All three set the caller's `bool ok` to false and say which rank failed where. */
#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "rank %d: %s:%d: check failed: %s\n", g_rank, __FILE__, __LINE__,   \
                    #cond);                                                                    \
            ok = false;                                                                        \
        }                                                                                      \
    } while (0)
/* uses the caller's `moe_error err` */
#define CHECK_ST(call)                                                                         \
    do {                                                                                       \
        moe_status s_ = (call);                                                                \
        if (s_ != MOE_OK) {                                                                    \
            fprintf(stderr, "rank %d: %s:%d: %s -> %s: %s\n", g_rank, __FILE__, __LINE__,      \
                    #call, moe_strerror(s_), err.msg);                                          \
            ok = false;                                                                        \
        }                                                                                      \
    } while (0)

/* A public call that must succeed (the reason from moe_last_error()). */
#define CHECK_API(call)                                                                        \
    do {                                                                                       \
        moe_status s_ = (call);                                                                \
        if (s_ != MOE_OK) {                                                                    \
            fprintf(stderr, "rank %d: %s:%d: %s -> %s: %s\n", g_rank, __FILE__, __LINE__,      \
                    #call, moe_strerror(s_), moe_last_error());                                \
            ok = false;                                                                        \
        }                                                                                      \
    } while (0)

/* MPI_Init, the rank globals; then: ctest runs -np 4 on as few as 2 cores, and OpenMP threads
 * spinning beside MPI's polling would slow everything down by orders of magnitude, so the
 * node's cores are shared between its ranks; one seed for every rank (rank 0's, broadcast). */
static inline void mpi_test_init(int *argc, char ***argv)
{
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
}

static inline void mpi_test_share_cores_and_seed(void)
{
    MPI_Comm node;
    int local = 1;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    omp_set_num_threads(cores / local > 1 ? (int)(cores / local) : 1);
    uint64_t seed = g_rank == 0 ? moe_test_seed() : 0;
    MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    g_seed = seed;
}

#endif /* MOE_MPI_TEST_H */
