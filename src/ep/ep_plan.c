/* ep_plan.c — the counts side of the dispatch plan: rows per (chunk, round, peer) from the
 * per-destination counts the backend's ep_plan produced, the counts exchange, the receive
 * layout and the capacity checks (layout in ep.h). */
#include <stdlib.h>
#include <string.h>

#include "ep.h"

void ep_split_even(int T, int C, int32_t *b)
{
    /* The first T % C pieces get one token more; every piece may be empty when T < C. */
    int q = T / C, r = T % C, at = 0;
    for (int i = 0; i < C; i++) {
        b[i] = at;
        at += q + (i < r ? 1 : 0);
    }
    b[C] = T;
}

int64_t ep_round_rows(const ep_plan *p, int c, int v, bool recv)
{
    int64_t s = 0;
    const int64_t *r = (recv ? p->recv_rows : p->send_rows) + ((int64_t)c * p->V + v) * p->N;
    for (int q = 0; q < p->N; q++) s += r[q];
    return s;
}

int64_t ep_round_base(const ep_plan *p, int c, int v, bool recv)
{
    return (recv ? p->recv_off : p->send_off)[((int64_t)c * p->V + v) * p->N];
}

void ep_plan_free(ep_plan *p)
{
    if (!p) return;
    free(p->chunk_begin);
    free(p->send_rows);
    free(p->send_off);
    free(p->recv_rows);
    free(p->recv_off);
    free(p->base);
    memset(p, 0, sizeof *p);
}

moe_status ep_plan_from_counts(ep_plan *p, int N, int rank, int V, int C, int T,
                               const int32_t *chunk_begin, const int32_t *dcount,
                               moe_error *err)
{
    memset(p, 0, sizeof *p);
    p->N = N;
    p->rank = rank;
    p->V = V;
    p->G = N * V;
    p->C = C;
    p->T = T;
    const int G = p->G;
    const size_t n = (size_t)C * V * N;
    p->chunk_begin = moe_malloc(((size_t)C + 1) * sizeof(int32_t), "plan chunks", err);
    p->send_rows = moe_calloc(n, sizeof(int64_t), "plan send counts", err);
    p->send_off = moe_calloc(n + 1, sizeof(int64_t), "plan send offsets", err);
    p->recv_rows = moe_calloc(n, sizeof(int64_t), "plan receive counts", err);
    p->recv_off = moe_calloc(n + 1, sizeof(int64_t), "plan receive offsets", err);
    p->base = moe_calloc((size_t)C * G, sizeof(int64_t), "plan bases", err);
    if (!p->chunk_begin || !p->send_rows || !p->send_off || !p->recv_rows || !p->recv_off ||
        !p->base) {
        ep_plan_free(p);
        return MOE_ERR_NOMEM;
    }
    if (chunk_begin) memcpy(p->chunk_begin, chunk_begin, ((size_t)C + 1) * sizeof(int32_t));
    else ep_split_even(T, C, p->chunk_begin);
    /* destination d = q*V + v of chunk c is block (c*V + v)*N + q */
    for (int c = 0; c < C; c++)
        for (int d = 0; d < G; d++) {
            int32_t r = dcount[(size_t)c * G + d];
            if (r < 0) {
                ep_plan_free(p);
                return moe_fail(err, MOE_ERR_INTERNAL, "plan: %d rows to virtual rank %d", r, d);
            }
            p->send_rows[((size_t)c * V + d % V) * N + d / V] = r;
        }
    int64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        p->send_off[i] = at;
        at += p->send_rows[i];
    }
    p->send_off[n] = at;
    p->send_total = at;
    for (int c = 0; c < C; c++)
        for (int d = 0; d < G; d++)
            p->base[(size_t)c * G + d] = p->send_off[((size_t)c * V + d % V) * N + d / V];
    return MOE_OK;
}

moe_status ep_plan_exchange(ep_plan *p, MPI_Comm comm, moe_error *err)
{
    const int N = p->N, CV = p->C * p->V;
    const size_t n = (size_t)N * CV;
    int64_t *snd = moe_malloc(n * sizeof(int64_t), "counts exchange", err);
    int64_t *rcv = moe_malloc(n * sizeof(int64_t), "counts exchange", err);
    if (!snd || !rcv) {
        free(snd);
        free(rcv);
        return MOE_ERR_NOMEM;
    }
    /* Peer-major for the all-to-all: snd[q*CV + (c*V+v)]. */
    for (int q = 0; q < N; q++)
        for (int cv = 0; cv < CV; cv++) snd[(size_t)q * CV + cv] = p->send_rows[(size_t)cv * N + q];
    moe_status st = MOE_OK;
    int rc = MPI_Alltoall(snd, CV, MPI_INT64_T, rcv, CV, MPI_INT64_T, comm);
    if (rc != MPI_SUCCESS) st = ep_mpi_fail(err, rc, p->rank, "MPI_Alltoall (counts)");
    for (int q = 0; q < N && st == MOE_OK; q++)
        for (int cv = 0; cv < CV; cv++) {
            int64_t r = rcv[(size_t)q * CV + cv];
            if (r < 0) {
                st = moe_fail(err, MOE_ERR_INTERNAL, "rank %d: rank %d announced %lld rows",
                              p->rank, q, (long long)r);
                break;
            }
            p->recv_rows[(size_t)cv * N + q] = r;
        }
    free(snd);
    free(rcv);
    if (st != MOE_OK) return st;
    int64_t at = 0, mx = 0;
    for (int cv = 0; cv < CV; cv++) {
        int64_t round = 0;
        for (int q = 0; q < N; q++) {
            size_t i = (size_t)cv * N + q;
            p->recv_off[i] = at;
            at += p->recv_rows[i];
            round += p->recv_rows[i];
        }
        if (round > mx) mx = round;
    }
    p->recv_off[n] = at;
    p->recv_total = at;
    p->recv_max_round = mx;
    return MOE_OK;
}

moe_status ep_plan_check_capacity(const ep_plan *p, int64_t max_tokens, int64_t max_recv,
                                  moe_error *err)
{
    if (max_tokens > 0 && p->T > max_tokens)
        return moe_fail(err, MOE_ERR_OVERFLOW,
                        "rank %d: %d local tokens exceed --max-tokens-per-rank %lld (buffers "
                        "are sized for it in advance; raise it or send fewer tokens)",
                        p->rank, p->T, (long long)max_tokens);
    if (max_recv > 0 && p->recv_total > max_recv) {
        /* Name the heaviest sender so a skewed routing is easy to see. */
        int N = p->N, worst = 0;
        int64_t worst_rows = -1;
        for (int q = 0; q < N; q++) {
            int64_t s = 0;
            for (int cv = 0; cv < p->C * p->V; cv++) s += p->recv_rows[(size_t)cv * N + q];
            if (s > worst_rows) {
                worst_rows = s;
                worst = q;
            }
        }
        return moe_fail(err, MOE_ERR_OVERFLOW,
                        "rank %d: receive buffer overflow: %lld token rows would arrive but the "
                        "buffers hold %lld (max_recv_tokens; most from rank %d: %lld rows). "
                        "Nothing was truncated; raise the limit or rebalance the routing",
                        p->rank, (long long)p->recv_total, (long long)max_recv, worst,
                        (long long)worst_rows);
    }
    return MOE_OK;
}
