/* ep_combine.c — returning the receivers' per-token partial sums to their source rank and
 * adding them there in a fixed order (ascending virtual rank), so the result does not depend
 * on arrival order or thread count. */
#include "ep_internal.h"

#include <stdlib.h>
#include <string.h>

#include "../dtype.h"

moe_status ep_combine_start(moe_ep_ctx *ctx, const ep_plan *p, int c, int v, bool backward,
                            ep_request *req, moe_error *err)
{
    int N = p->nranks;
    int64_t *lay = moe_malloc(4 * (size_t)N * sizeof(int64_t), "combine layout", err);
    if (!lay) return MOE_ERR_NOMEM;
    /* Reversed: what arrived in round (c, v) goes back where it came from. */
    size_t base = ((size_t)c * p->V + v) * N;
    for (int q = 0; q < N; q++) {
        lay[q] = p->recv_rows[base + q];
        lay[N + q] = p->recv_off[base + q] - p->recv_off[base];
        lay[2 * N + q] = p->send_rows[base + q];
        lay[3 * N + q] = p->send_off[base + q] - p->send_off[base];
    }
    int64_t rb = ep_round_recv_base(p, c, v), sb = ep_round_send_base(p, c, v);
    const ep_workspace *ws = &ctx->ws;
    /* d-weights travel as fp32: the router's backward takes them unrounded, as on one rank. */
    size_t xrow = (size_t)ctx->H * ctx->dsz, wrow = (size_t)ctx->k * sizeof(float);
    ep_xfer x;
    memset(&x, 0, sizeof x);
    x.nbufs = backward ? 2 : 1;
    x.send[0] = (char *)ws->p[EPB_PART] + rb * xrow;
    x.recv[0] = (char *)ws->p[EPB_BACK] + sb * xrow;
    x.row_bytes[0] = xrow;
    x.what[0] = backward ? "combine dx rows" : "combine partial rows";
    if (backward) {
        x.send[1] = (char *)ws->p[EPB_PART_DW] + rb * wrow;
        x.recv[1] = (char *)ws->p[EPB_BACK_DW] + sb * wrow;
        x.row_bytes[1] = wrow;
        x.what[1] = "combine d-weights";
    }
    x.send_rows = lay;
    x.send_off = lay + N;
    x.recv_rows = lay + 2 * N;
    x.recv_off = lay + 3 * N;
    moe_status st = ctx->tp->start(ctx->tp, &x, req, err);
    free(lay);
    return st;
}

void ep_combine_reduce(const moe_ep_ctx *ctx, const ep_plan *p, int c, const void *add,
                       void *out)
{
    moe_dtype dt = ctx->dt;
    int H = ctx->H;
    const void *back = ctx->ws.p[EPB_BACK];
    int t0 = p->chunk_begin[c], t1 = p->chunk_begin[c + 1];
#pragma omp parallel for schedule(static)
    for (int t = t0; t < t1; t++) {
        float acc[256];
        for (int h0 = 0; h0 < H; h0 += 256) {
            int hn = H - h0 < 256 ? H - h0 : 256;
            for (int h = 0; h < hn; h++)
                acc[h] = add ? moe_load_elem_f(dt, add, (size_t)t * H + h0 + h) : 0.0f;
            /* dest[] is ascending: the partial sums are added in virtual-rank order. */
            for (int32_t a = p->dest_off[t]; a < p->dest_off[t + 1]; a++) {
                size_t r = (size_t)p->row[a];
                for (int h = 0; h < hn; h++)
                    acc[h] += moe_load_elem_f(dt, back, r * H + h0 + h);
            }
            for (int h = 0; h < hn; h++) moe_store_elem_f(dt, out, (size_t)t * H + h0 + h, acc[h]);
        }
    }
}

void ep_combine_dweights(const moe_ep_ctx *ctx, const ep_plan *p, const int32_t *ids,
                         float *dw)
{
    int k = ctx->k;
    const float *bdw = ctx->ws.p[EPB_BACK_DW];
#pragma omp parallel for schedule(static)
    for (int t = 0; t < p->T; t++)
        for (int32_t a = p->dest_off[t]; a < p->dest_off[t + 1]; a++)
            for (int j = 0; j < k; j++) {
                int e = ids[(size_t)t * k + j];
                if (e >= 0 && ep_owner(p, e) == p->dest[a])
                    dw[(size_t)t * k + j] = bdw[(size_t)p->row[a] * k + j];
            }
}

void ep_combine_dx(const moe_ep_ctx *ctx, const ep_plan *p, const void *add, void *dx)
{
    moe_dtype dt = ctx->dt;
    int H = ctx->H;
    const void *back = ctx->ws.p[EPB_BACK];
#pragma omp parallel for schedule(static)
    for (int t = 0; t < p->T; t++)
        for (int h = 0; h < H; h++) {
            size_t o = (size_t)t * H + h;
            float acc = add ? moe_load_elem_f(dt, add, o) : 0.0f;
            for (int32_t a = p->dest_off[t]; a < p->dest_off[t + 1]; a++)
                acc += moe_load_elem_f(dt, back, (size_t)p->row[a] * H + h);
            moe_store_elem_f(dt, dx, o, acc);
        }
}
