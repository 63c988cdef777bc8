/* ep_plan.c — ownership (which rank owns which experts) and the dispatch plan (which token goes
 * to which rank, in which row), the counts exchange and the sync-free capacity checks. */
#include "ep_internal.h"

#include <stdlib.h>
#include <string.h>

moe_status moe_ep_expert_range(int num_experts, int nranks, int rank, int *begin, int *count,
                               moe_error *err)
{
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "expert range: rank %d of %d ranks", rank,
                        nranks);
    if (num_experts < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "expert range: %d experts", num_experts);
    if (nranks > num_experts)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "expert parallelism over %d ranks needs at least as many experts, but "
                        "the model has E=%d: use at most %d ranks",
                        nranks, num_experts, num_experts);
    if (num_experts % nranks != 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "E=%d experts cannot be split evenly over %d ranks: the number of ranks "
                        "(times --ep-virtual) must divide E",
                        num_experts, nranks);
    int per = num_experts / nranks;
    if (begin) *begin = rank * per;
    if (count) *count = per;
    return MOE_OK;
}

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

int64_t ep_round_send_rows(const ep_plan *p, int c, int v)
{
    int64_t s = 0;
    const int64_t *r = p->send_rows + ((int64_t)c * p->V + v) * p->nranks;
    for (int q = 0; q < p->nranks; q++) s += r[q];
    return s;
}

int64_t ep_round_recv_rows(const ep_plan *p, int c, int v)
{
    int64_t s = 0;
    const int64_t *r = p->recv_rows + ((int64_t)c * p->V + v) * p->nranks;
    for (int q = 0; q < p->nranks; q++) s += r[q];
    return s;
}

void ep_plan_free(ep_plan *p)
{
    if (!p) return;
    free(p->chunk_begin);
    free(p->dest_off);
    free(p->dest);
    free(p->row);
    free(p->send_rows);
    free(p->send_off);
    free(p->recv_rows);
    free(p->recv_off);
    memset(p, 0, sizeof *p);
}

moe_status ep_plan_build(ep_plan *p, int nranks, int rank, int V, int C, int E, int k, int T,
                         const int32_t *ids, moe_error *err)
{
    memset(p, 0, sizeof *p);
    if (nranks < 1 || V < 1 || C < 1 || k < 1 || T < 0 || E % (nranks * V) != 0)
        return moe_fail(err, MOE_ERR_INTERNAL, "plan: N=%d V=%d C=%d E=%d k=%d T=%d", nranks, V,
                        C, E, k, T);
    p->nranks = nranks;
    p->rank = rank;
    p->V = V;
    p->G = nranks * V;
    p->C = C;
    p->E = E;
    p->k = k;
    p->epv = E / p->G;
    p->T = T;
    int G = p->G;
    int maxd = k < G ? k : G; /* a token has at most min(k, G) distinct owners */
    size_t nround = (size_t)C * V * nranks;
    p->chunk_begin = moe_malloc(((size_t)C + 1) * sizeof(int32_t), "plan chunks", err);
    p->dest_off = moe_malloc(((size_t)T + 1) * sizeof(int32_t), "plan token offsets", err);
    p->dest = moe_malloc(((size_t)T * maxd + 1) * sizeof(int32_t), "plan destinations", err);
    p->row = moe_malloc(((size_t)T * maxd + 1) * sizeof(int64_t), "plan rows", err);
    p->send_rows = moe_calloc(nround, sizeof(int64_t), "plan send counts", err);
    p->send_off = moe_calloc(nround + 1, sizeof(int64_t), "plan send offsets", err);
    p->recv_rows = moe_calloc(nround, sizeof(int64_t), "plan receive counts", err);
    p->recv_off = moe_calloc(nround + 1, sizeof(int64_t), "plan receive offsets", err);
    if (!p->chunk_begin || !p->dest_off || !p->dest || !p->row || !p->send_rows ||
        !p->send_off || !p->recv_rows || !p->recv_off) {
        ep_plan_free(p);
        return MOE_ERR_NOMEM;
    }
    ep_split_even(T, C, p->chunk_begin);

    /* Pass 1: each token's distinct owners, ascending (k is small: insertion into a short
     * list), counted per (chunk, round, real destination). */
    int32_t nnz = 0;
    for (int c = 0; c < C; c++) {
        for (int t = p->chunk_begin[c]; t < p->chunk_begin[c + 1]; t++) {
            p->dest_off[t] = nnz;
            int32_t *d = p->dest + nnz;
            int nd = 0;
            for (int j = 0; j < k; j++) {
                int e = ids[(size_t)t * k + j];
                if (e < 0) continue;
                if (e >= E) {
                    ep_plan_free(p);
                    return moe_fail(err, MOE_ERR_INVALID_ARG,
                                    "plan: token %d slot %d has expert id %d, E=%d", t, j, e, E);
                }
                int o = e / p->epv, i = nd;
                bool dup = false;
                for (int a = 0; a < nd; a++)
                    if (d[a] == o) dup = true;
                if (dup) continue;
                while (i > 0 && d[i - 1] > o) {
                    d[i] = d[i - 1];
                    i--;
                }
                d[i] = o;
                nd++;
            }
            for (int a = 0; a < nd; a++) {
                int q = d[a] / V, v = d[a] % V;
                p->send_rows[((size_t)c * V + v) * nranks + q]++;
            }
            nnz += nd;
        }
    }
    p->dest_off[T] = nnz;

    /* Offsets in (c, v, q) order. */
    int64_t at = 0;
    for (size_t i = 0; i < nround; i++) {
        p->send_off[i] = at;
        at += p->send_rows[i];
    }
    p->send_off[nround] = at;
    p->send_total = at;

    /* Pass 2: rows, tokens ascending within each block. */
    int64_t *fill = moe_calloc(nround, sizeof(int64_t), "plan fill", err);
    if (!fill) {
        ep_plan_free(p);
        return MOE_ERR_NOMEM;
    }
    for (int c = 0; c < C; c++)
        for (int t = p->chunk_begin[c]; t < p->chunk_begin[c + 1]; t++)
            for (int32_t a = p->dest_off[t]; a < p->dest_off[t + 1]; a++) {
                int q = p->dest[a] / V, v = p->dest[a] % V;
                size_t i = ((size_t)c * V + v) * nranks + q;
                p->row[a] = p->send_off[i] + fill[i]++;
            }
    free(fill);
    return MOE_OK;
}

moe_status ep_plan_exchange(ep_plan *p, ep_transport *t, moe_error *err)
{
    int N = p->nranks, CV = p->C * p->V;
    size_t n = (size_t)N * CV;
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
    moe_status st = t->alltoall_i64(t, snd, rcv, CV, err);
    if (st == MOE_OK) {
        for (int q = 0; q < N; q++)
            for (int cv = 0; cv < CV; cv++) {
                int64_t r = rcv[(size_t)q * CV + cv];
                if (r < 0) {
                    st = moe_fail(err, MOE_ERR_INTERNAL, "rank %d: rank %d announced %lld rows",
                                  p->rank, q, (long long)r);
                    break;
                }
                p->recv_rows[(size_t)cv * N + q] = r;
            }
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
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "rank %d: %d local tokens exceed max_tokens_per_rank=%lld (buffers are "
                        "sized for it in advance; raise it or send fewer tokens)",
                        p->rank, p->T, (long long)max_tokens);
    if (max_recv > 0 && p->recv_total > max_recv) {
        /* Name the heaviest sender so a skewed routing is easy to see. */
        int N = p->nranks, worst = 0;
        int64_t worst_rows = -1;
        for (int q = 0; q < N; q++) {
            int64_t s = 0;
            for (int cv = 0; cv < p->C * p->V; cv++) s += p->recv_rows[(size_t)cv * N + q];
            if (s > worst_rows) {
                worst_rows = s;
                worst = q;
            }
        }
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "rank %d: receive buffer overflow: %lld token rows would arrive but the "
                        "buffers hold %lld (max_recv_tokens; most from rank %d: %lld rows). "
                        "Nothing was truncated; raise the limit or rebalance the routing",
                        p->rank, (long long)p->recv_total, (long long)max_recv, worst,
                        (long long)worst_rows);
    }
    return MOE_OK;
}

moe_status moe_ep_buffer_sizes_for(int64_t max_tokens_per_rank, int64_t max_recv_tokens,
                                   int nranks, int virtual_ranks, const moe_config *cfg,
                                   moe_dtype dt, bool backward, moe_ep_buffer_sizes *out,
                                   moe_error *err)
{
    if (max_tokens_per_rank < 1 || nranks < 1 || virtual_ranks < 1 || !cfg || !out)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "buffer sizes: need max_tokens_per_rank >= 1 (got %lld), ranks >= 1",
                        (long long)max_tokens_per_rank);
    int G = nranks * virtual_ranks;
    int k = cfg->top_k;
    size_t dsz = moe_dtype_size(dt);
    out->send_rows = max_tokens_per_rank * (k < G ? k : G);
    out->recv_rows = max_recv_tokens > 0 ? max_recv_tokens : (int64_t)G * max_tokens_per_rank;
    /* A dispatched row: x [H] + k ids + k weights (+ dout [H]); a returned row: the partial
     * sum [H] (+ k fp32 d-weights). Both directions use the same buffers' rows. */
    size_t fwd_row = (size_t)cfg->hidden * dsz + (size_t)k * (sizeof(int32_t) + dsz);
    size_t back_row = (size_t)cfg->hidden * dsz;
    if (backward) {
        fwd_row += (size_t)cfg->hidden * dsz;
        back_row += (size_t)k * sizeof(float);
    }
    out->send_bytes = (size_t)out->send_rows * (fwd_row + back_row);
    out->recv_bytes = (size_t)out->recv_rows * (fwd_row + back_row);
    return MOE_OK;
}
