/* moe_threads.c — the default CPU thread count (see moe_threads.h for the rule). */
#include "moe_threads.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mpi.h>

static inline bool bit(const uint8_t *m, size_t c) { return (m[c / 8] >> (c % 8)) & 1u; }

int moe_threads_share(const uint8_t *mine, const uint8_t *all, int nprocs, size_t mask_bytes)
{
    if (!mine) return 1;
    double sum = 0.0;
    for (size_t i = 0; i < mask_bytes; i++) {
        if (!mine[i]) continue;
        for (size_t c = 8 * i; c < 8 * i + 8; c++) {
            if (!bit(mine, c)) continue;
            int n = 0;
            for (int p = 0; all && p < nprocs; p++) n += bit(all + (size_t)p * mask_bytes, c);
            sum += 1.0 / (n > 0 ? n : 1);
        }
    }
    double t = floor(sum + 1e-6);
    if (t < 1.0) return 1;
    if (t > (double)INT_MAX) return INT_MAX;
    return (int)t;
}

int moe_threads_parse_env(const char *s)
{
    if (!s) return 0;
    long first = 0;
    for (int k = 0;; k++) {
        while (*s == ' ' || *s == '\t' || *s == '\n') s++;
        if (*s < '0' || *s > '9') return 0; /* empty element, sign or garbage */
        long v = 0;
        while (*s >= '0' && *s <= '9') {
            v = v * 10 + (*s++ - '0');
            if (v > INT_MAX) return 0;
        }
        if (v < 1) return 0;
        if (k == 0) first = v;
        while (*s == ' ' || *s == '\t' || *s == '\n') s++;
        if (*s == '\0') return (int)first;
        if (*s++ != ',') return 0;
    }
}

/* This process's affinity mask as bytes (bit c%8 of byte c/8 = CPU c) in *nbytes bytes, or
 * NULL when out of memory. sched_getaffinity of the process id (its main thread); the kernel
 * refuses a buffer smaller than its CPU count, so the size doubles until it fits. When the
 * mask cannot be read at all, the process counts as bound to every online CPU. */
static uint8_t *my_mask(size_t *nbytes)
{
    for (int ncpu = CPU_SETSIZE; ncpu <= (1 << 22); ncpu *= 2) {
        size_t sz = CPU_ALLOC_SIZE(ncpu);
        cpu_set_t *set = CPU_ALLOC(ncpu);
        if (!set) return NULL;
        CPU_ZERO_S(sz, set);
        if (sched_getaffinity(getpid(), sz, set) == 0) {
            uint8_t *m = calloc(sz, 1);
            if (m) {
                for (int c = 0; c < ncpu; c++)
                    if (CPU_ISSET_S(c, sz, set)) m[c / 8] |= (uint8_t)(1u << (c % 8));
                *nbytes = sz;
            }
            CPU_FREE(set);
            return m;
        }
        int e = errno;
        CPU_FREE(set);
        if (e != EINVAL) break;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    size_t sz = ((size_t)n + 7) / 8;
    uint8_t *m = calloc(sz, 1);
    if (!m) return NULL;
    for (long c = 0; c < n; c++) m[c / 8] |= (uint8_t)(1u << (c % 8));
    *nbytes = sz;
    return m;
}

static bool mpi_on(void)
{
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    if (!init) return false;
    MPI_Finalized(&fin);
    return !fin;
}

/* The node's part: pad every mask to the node's largest size, gather them, share. Every step
 * is taken by every process of the node (an allocation failure anywhere is agreed on first,
 * then everyone falls back to its own mask alone). */
static int node_share(MPI_Comm comm, const uint8_t *mine, size_t nbytes)
{
    MPI_Comm node;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) !=
        MPI_SUCCESS)
        return moe_threads_share(mine, mine, 1, nbytes);
    int nprocs = 1, res = 0;
    MPI_Comm_size(node, &nprocs);
    long in[2] = {mine ? (long)nbytes : 0, mine ? 0 : 1}, out[2] = {0, 1};
    uint8_t *pad = NULL, *all = NULL;
    if (MPI_Allreduce(in, out, 2, MPI_LONG, MPI_MAX, node) == MPI_SUCCESS && out[0] > 0 &&
        out[0] <= INT_MAX) {
        size_t B = (size_t)out[0];
        pad = out[1] ? NULL : calloc(B, 1);
        all = out[1] ? NULL : malloc(B * (size_t)nprocs);
        int bad = !pad || !all, anybad = 1;
        if (MPI_Allreduce(&bad, &anybad, 1, MPI_INT, MPI_MAX, node) == MPI_SUCCESS && !anybad) {
            memcpy(pad, mine, nbytes);
            if (MPI_Allgather(pad, (int)B, MPI_BYTE, all, (int)B, MPI_BYTE, node) == MPI_SUCCESS)
                res = moe_threads_share(pad, all, nprocs, B);
        }
    }
    free(pad);
    free(all);
    MPI_Comm_free(&node);
    return res > 0 ? res : moe_threads_share(mine, mine, 1, nbytes);
}

static int binding_over(MPI_Comm comm)
{
    size_t nbytes = 0;
    uint8_t *mine = my_mask(&nbytes);
    int res = comm != MPI_COMM_NULL && mpi_on() ? node_share(comm, mine, nbytes)
                                                : moe_threads_share(mine, mine, 1, nbytes);
    free(mine);
    return res;
}

static int compute_over(MPI_Comm comm)
{
    int bound = binding_over(comm); /* first, so the collective never depends on the env */
    int env = moe_threads_parse_env(getenv("OMP_NUM_THREADS"));
    return env > 0 ? env : bound;
}

int moe_threads_binding(void) { return binding_over(MPI_COMM_WORLD); }
int moe_threads_compute(void) { return compute_over(MPI_COMM_WORLD); }

/* The per-process cache: 0 nothing yet, 1 this process's binding alone, 2 shared out over a
 * communicator's node (the answer the rule asks for; it replaces a level-1 value). */
static pthread_mutex_t default_mu = PTHREAD_MUTEX_INITIALIZER;
static int default_level = 0, default_threads = 1;

int moe_default_threads(void)
{
    pthread_mutex_lock(&default_mu);
    if (default_level == 0) {
        default_threads = compute_over(MPI_COMM_NULL);
        default_level = 1;
    }
    int t = default_threads;
    pthread_mutex_unlock(&default_mu);
    return t;
}

void moe_threads_init_comm(MPI_Comm comm)
{
    pthread_mutex_lock(&default_mu);
    int level = default_level;
    pthread_mutex_unlock(&default_mu);
    if (level >= 2) return;
    /* collective over comm (outside the lock: MPI may block) */
    int t = compute_over(comm);
    pthread_mutex_lock(&default_mu);
    if (default_level < 2) {
        default_threads = t;
        default_level = 2;
    }
    pthread_mutex_unlock(&default_mu);
}
