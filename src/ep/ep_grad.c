/* ep_grad.c — the source-side pieces of EP backward that the fused path has no twin of: fp32
 * weight gradients of the replicated weights (router, shared expert) and their sum over ranks
 * in a fixed order. */
#include "ep_internal.h"

#include <stdlib.h>
#include <string.h>

#include "../dtype.h"

void ep_accum_tn(moe_dtype dt, int T, int N, int K, const void *A, const void *B, float *C)
{
    if (T <= 0) return;
    /* Widen B once ([T,K] floats), then each output row n accumulates over t ascending: the
     * order is fixed whatever the thread count. */
    float *Bf = malloc((size_t)T * K * sizeof(float));
    if (Bf) {
        for (size_t i = 0; i < (size_t)T * K; i++) Bf[i] = moe_load_elem_f(dt, B, i);
    }
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *c = C + (size_t)n * K;
        for (int t = 0; t < T; t++) {
            float a = moe_load_elem_f(dt, A, (size_t)t * N + n);
            if (a == 0) continue;
            if (Bf) {
                const float *b = Bf + (size_t)t * K;
                for (int kk = 0; kk < K; kk++) c[kk] += a * b[kk];
            } else {
                for (int kk = 0; kk < K; kk++)
                    c[kk] += a * moe_load_elem_f(dt, B, (size_t)t * K + kk);
            }
        }
    }
    free(Bf);
}

moe_status ep_allreduce_ordered(MPI_Comm comm, int rank, int nranks, float *buf, size_t n,
                                moe_error *err)
{
    if (nranks == 1 || n == 0) return MOE_OK;
    /* MPI_Allreduce's summation order is the library's choice; gathering every rank's piece
     * and adding them in rank order makes the result the same on every rank and every run.
     * Pieces bound the memory to nranks * piece floats. */
    size_t piece = ((size_t)1 << 22) / (size_t)nranks;
    if (piece < 1024) piece = 1024;
    if (piece > n) piece = n;
    float *all = moe_malloc(piece * (size_t)nranks * sizeof(float), "ordered all-reduce", err);
    if (!all) return MOE_ERR_NOMEM;
    moe_status st = MOE_OK;
    for (size_t at = 0; at < n && st == MOE_OK; at += piece) {
        size_t m = n - at < piece ? n - at : piece;
        int rc = MPI_Allgather(buf + at, (int)m, MPI_FLOAT, all, (int)m, MPI_FLOAT, comm);
        if (rc != MPI_SUCCESS) {
            st = ep_mpi_fail(err, rc, rank, "MPI_Allgather (gradient sum)");
            break;
        }
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < m; i++) {
            float s = 0;
            for (int r = 0; r < nranks; r++) s += all[(size_t)r * m + i];
            buf[at + i] = s;
        }
    }
    free(all);
    return st;
}
