/* ep_dispatch.c — packing a chunk's tokens into the dispatch send buffer and starting each
 * round's all-to-all (layout in ep_internal.h). */
#include "ep_internal.h"

#include <stdlib.h>
#include <string.h>

void ep_dispatch_pack(const moe_ep_ctx *ctx, const ep_plan *p, int c, const void *x,
                      const void *dout, const int32_t *ids, const void *w)
{
    const ep_workspace *ws = &ctx->ws;
    int H = ctx->H, k = ctx->k;
    size_t dsz = ctx->dsz, xrow = (size_t)H * dsz;
    char *sx = ws->p[EPB_SEND_X], *sd = ws->p[EPB_SEND_DOUT], *sw = ws->p[EPB_SEND_W];
    int32_t *sids = ws->p[EPB_SEND_IDS];
    int t0 = p->chunk_begin[c], t1 = p->chunk_begin[c + 1];
    /* Each (token, destination) writes its own row: no two iterations share memory. */
#pragma omp parallel for schedule(static)
    for (int t = t0; t < t1; t++) {
        for (int32_t a = p->dest_off[t]; a < p->dest_off[t + 1]; a++) {
            int64_t r = p->row[a];
            int d = p->dest[a];
            memcpy(sx + (size_t)r * xrow, (const char *)x + (size_t)t * xrow, xrow);
            if (dout) memcpy(sd + (size_t)r * xrow, (const char *)dout + (size_t)t * xrow, xrow);
            for (int j = 0; j < k; j++) {
                int e = ids[(size_t)t * k + j];
                bool mine = e >= 0 && ep_owner(p, e) == d;
                sids[(size_t)r * k + j] = mine ? e : -1;
                /* Zero bits are +0 in bf16, fp16 and fp32 alike. */
                if (mine)
                    memcpy(sw + ((size_t)r * k + j) * dsz, (const char *)w + ((size_t)t * k + j) * dsz,
                           dsz);
                else
                    memset(sw + ((size_t)r * k + j) * dsz, 0, dsz);
            }
        }
    }
}

/* Per-peer counts and offsets of round (c, v) relative to its first row. */
static void round_layout(const ep_plan *p, int c, int v, bool send_side, int64_t *rows,
                         int64_t *off)
{
    size_t base = ((size_t)c * p->V + v) * p->nranks;
    const int64_t *r = send_side ? p->send_rows : p->recv_rows;
    const int64_t *o = send_side ? p->send_off : p->recv_off;
    for (int q = 0; q < p->nranks; q++) {
        rows[q] = r[base + q];
        off[q] = o[base + q] - o[base];
    }
}

moe_status ep_dispatch_start(moe_ep_ctx *ctx, const ep_plan *p, int c, int v, bool backward,
                             ep_request *req, moe_error *err)
{
    int N = p->nranks;
    int64_t small[4 * 64];
    int64_t *lay = small;
    if (N > 64) {
        lay = moe_malloc(4 * (size_t)N * sizeof(int64_t), "dispatch layout", err);
        if (!lay) return MOE_ERR_NOMEM;
    }
    round_layout(p, c, v, true, lay, lay + N);
    round_layout(p, c, v, false, lay + 2 * N, lay + 3 * N);
    int64_t sb = ep_round_send_base(p, c, v), rb = ep_round_recv_base(p, c, v);
    const ep_workspace *ws = &ctx->ws;
    size_t xrow = (size_t)ctx->H * ctx->dsz;
    size_t idrow = (size_t)ctx->k * sizeof(int32_t), wrow = (size_t)ctx->k * ctx->dsz;
    ep_xfer x;
    memset(&x, 0, sizeof x);
    int b = 0;
    x.send[b] = (char *)ws->p[EPB_SEND_X] + sb * xrow;
    x.recv[b] = (char *)ws->p[EPB_RECV_X] + rb * xrow;
    x.row_bytes[b] = xrow;
    x.what[b++] = "dispatch x rows";
    x.send[b] = (char *)ws->p[EPB_SEND_IDS] + sb * idrow;
    x.recv[b] = (char *)ws->p[EPB_RECV_IDS] + rb * idrow;
    x.row_bytes[b] = idrow;
    x.what[b++] = "dispatch expert ids";
    x.send[b] = (char *)ws->p[EPB_SEND_W] + sb * wrow;
    x.recv[b] = (char *)ws->p[EPB_RECV_W] + rb * wrow;
    x.row_bytes[b] = wrow;
    x.what[b++] = "dispatch weights";
    if (backward) {
        x.send[b] = (char *)ws->p[EPB_SEND_DOUT] + sb * xrow;
        x.recv[b] = (char *)ws->p[EPB_RECV_DOUT] + rb * xrow;
        x.row_bytes[b] = xrow;
        x.what[b++] = "dispatch dout rows";
    }
    x.nbufs = b;
    x.send_rows = lay;
    x.send_off = lay + N;
    x.recv_rows = lay + 2 * N;
    x.recv_off = lay + 3 * N;
    moe_status st = ctx->tp->start(ctx->tp, &x, req, err);
    if (lay != small) free(lay);
    return st;
}

void ep_count_round(moe_ep_ctx *ctx, const ep_plan *p, int c, int v, bool backward)
{
    moe_ep_stats *s = &ctx->call;
    size_t xrow = (size_t)ctx->H * ctx->dsz;
    size_t out_row = xrow + (size_t)ctx->k * (sizeof(int32_t) + ctx->dsz); /* x, ids, w */
    size_t back_row = xrow;                                                /* partial */
    if (backward) {
        out_row += xrow;                      /* dout */
        back_row += (size_t)ctx->k * sizeof(float); /* d-weights (fp32) */
    }
    size_t base = ((size_t)c * p->V + v) * p->nranks;
    for (int q = 0; q < p->nranks; q++) {
        uint64_t sr = (uint64_t)p->send_rows[base + q], rr = (uint64_t)p->recv_rows[base + q];
        s->tokens_sent[q] += sr;
        s->tokens_recv[q] += rr;
        s->vtokens_sent[(size_t)q * p->V + v] += sr;
        /* Dispatch out and combine back, as seen from this rank. */
        s->bytes_sent[q] += sr * out_row + rr * back_row;
        s->bytes_recv[q] += rr * out_row + sr * back_row;
    }
}
