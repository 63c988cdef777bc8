/* ep_stats.c — EP counters (tokens and bytes per peer, weight bytes) and the per-chunk
 * timeline, with a printer. */
#include "ep.h"

#include <stdlib.h>
#include <string.h>

moe_status moe_ep_stats_init(moe_ep_stats *s, int nranks, int rank, int virtual_ranks,
                             moe_error *err)
{
    memset(s, 0, sizeof *s);
    if (nranks < 1 || virtual_ranks < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "stats: %d ranks, %d virtual", nranks,
                        virtual_ranks);
    s->nranks = nranks;
    s->rank = rank;
    s->virtual_ranks = virtual_ranks;
    /* One block: 4 per-peer arrays and the per-virtual-destination array. */
    size_t n = 4 * (size_t)nranks + (size_t)nranks * virtual_ranks;
    uint64_t *a = moe_calloc(n, sizeof(uint64_t), "EP counters", err);
    if (!a) return MOE_ERR_NOMEM;
    s->tokens_sent = a;
    s->tokens_recv = a + nranks;
    s->bytes_sent = a + 2 * (size_t)nranks;
    s->bytes_recv = a + 3 * (size_t)nranks;
    s->vtokens_sent = a + 4 * (size_t)nranks;
    return MOE_OK;
}

void moe_ep_stats_free(moe_ep_stats *s)
{
    if (!s) return;
    free(s->tokens_sent);
    free(s->timeline);
    memset(s, 0, sizeof *s);
}

void moe_ep_stats_reset(moe_ep_stats *s)
{
    size_t n = 4 * (size_t)s->nranks + (size_t)s->nranks * s->virtual_ranks;
    if (s->tokens_sent) memset(s->tokens_sent, 0, n * sizeof(uint64_t));
    s->tokens_local = s->tokens_computed = s->expert_rows = 0;
    s->calls_forward = s->calls_backward = 0;
    s->seconds = 0;
    s->nchunks = 0;
    /* weight bytes describe the loaded model, not a call: they stay. */
}

void moe_ep_stats_add(moe_ep_stats *dst, const moe_ep_stats *src)
{
    if (!dst || !src || dst == src) return;
    if (dst->nranks == src->nranks && dst->virtual_ranks == src->virtual_ranks &&
        dst->tokens_sent && src->tokens_sent) {
        size_t n = 4 * (size_t)dst->nranks + (size_t)dst->nranks * dst->virtual_ranks;
        for (size_t i = 0; i < n; i++) dst->tokens_sent[i] += src->tokens_sent[i];
    }
    dst->tokens_local += src->tokens_local;
    dst->tokens_computed += src->tokens_computed;
    dst->expert_rows += src->expert_rows;
    dst->calls_forward += src->calls_forward;
    dst->calls_backward += src->calls_backward;
    dst->seconds += src->seconds;
    dst->weight_bytes_read = src->weight_bytes_read;
    dst->weight_bytes_held = src->weight_bytes_held;
    memcpy(dst->transport, src->transport, sizeof dst->transport);
    /* The timeline is the last call's: copy it if there is room (grow when possible). */
    if (src->nchunks > 0) {
        if (dst->timeline_cap < src->nchunks) {
            moe_ep_chunk_times *t = realloc(dst->timeline, (size_t)src->nchunks * sizeof *t);
            if (t) {
                dst->timeline = t;
                dst->timeline_cap = src->nchunks;
            }
        }
        int n = src->nchunks < dst->timeline_cap ? src->nchunks : dst->timeline_cap;
        if (n > 0) memcpy(dst->timeline, src->timeline, (size_t)n * sizeof *src->timeline);
        dst->nchunks = n;
    }
}

void moe_ep_stats_print(FILE *f, const moe_ep_stats *s)
{
    if (!f || !s) return;
    fprintf(f, "ep stats: rank %d of %d (virtual %d per process), transport %s\n", s->rank,
            s->nranks, s->virtual_ranks, s->transport[0] ? s->transport : "none");
    fprintf(f, "  calls: %llu forward, %llu backward, %.6f s; local tokens %llu; received token "
               "rows computed %llu; (token, expert) pairs %llu\n",
            (unsigned long long)s->calls_forward, (unsigned long long)s->calls_backward,
            s->seconds, (unsigned long long)s->tokens_local,
            (unsigned long long)s->tokens_computed, (unsigned long long)s->expert_rows);
    fprintf(f, "  expert weights: %llu bytes read at load, %llu bytes held\n",
            (unsigned long long)s->weight_bytes_read, (unsigned long long)s->weight_bytes_held);
    if (s->tokens_sent) {
        fprintf(f, "  %6s %12s %12s %14s %14s\n", "peer", "tokens sent", "tokens recv",
                "bytes sent", "bytes recv");
        for (int q = 0; q < s->nranks; q++)
            fprintf(f, "  %6d %12llu %12llu %14llu %14llu\n", q,
                    (unsigned long long)s->tokens_sent[q], (unsigned long long)s->tokens_recv[q],
                    (unsigned long long)s->bytes_sent[q], (unsigned long long)s->bytes_recv[q]);
        if (s->virtual_ranks > 1) {
            fprintf(f, "  tokens sent per virtual rank:");
            for (int d = 0; d < s->nranks * s->virtual_ranks; d++)
                fprintf(f, " %d:%llu", d, (unsigned long long)s->vtokens_sent[d]);
            fprintf(f, "\n");
        }
    }
    if (s->nchunks > 0 && s->timeline) {
        fprintf(f, "  timeline of the last call (ms since its start):\n");
        fprintf(f, "  %5s %7s %8s %8s %9s %9s %9s %9s %9s %9s\n", "chunk", "tokens", "rows out",
                "rows in", "disp.post", "disp.done", "comp.beg", "comp.end", "comb.post",
                "comb.done");
        for (int c = 0; c < s->nchunks; c++) {
            const moe_ep_chunk_times *t = &s->timeline[c];
            fprintf(f, "  %5d %7lld %8lld %8lld %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f\n", c,
                    (long long)t->tokens, (long long)t->rows_sent, (long long)t->rows_recv,
                    1e3 * t->dispatch_post, 1e3 * t->dispatch_done, 1e3 * t->compute_begin,
                    1e3 * t->compute_end, 1e3 * t->combine_post, 1e3 * t->combine_done);
        }
    }
}
