/* ep_backward.c — the layer's backward (ep.h). The plain path: route (or the saved forward),
 * the experts' backward on x, the router's backward, dx = router dx + shared dx + the sum over
 * k. Expert parallel: the gradient of the combine is a dispatch (dout rows travel with x), the
 * receivers run the experts' backward on what arrived, and the gradient of the dispatch is a
 * combine (partial dx rows and fp32 d-weights travel back); the replicated weights' fp32
 * gradients are gathered from every rank and added in rank order. Sized per call, or
 * sync-free (NCCL with max_tokens_per_rank): then nothing waits for the host. */
#include <stdlib.h>
#include <string.h>

#include "ep_driver.h"

/* Where the gradients go, in the canonical layout: the caller's buffers where the layout is
 * canonical, else workspace (written to the caller afterwards by finish_grads). */
typedef struct grad_dst {
    void *router, *w13, *w2, *gu, *down; /* canonical: [E,H], [El,2I,H], [El,H,I], [2Is,H], [H,Is] */
} grad_dst;

static moe_status grad_targets(moe_layer *L, const moe_layer_grads *g, grad_dst *d,
                               moe_error *err)
{
    const size_t dsz = L->dsz, El = (size_t)L->map.El, H = (size_t)L->H, I = (size_t)L->I;
    const size_t Is = (size_t)L->Is;
    const bool kn = L->layout == MOE_LAYOUT_LLAMA4; /* experts stored [El,H,2I] / [El,I,H] */
    memset(d, 0, sizeof *d);
    d->router = g && g->router ? g->router : NULL;
    if (!d->router) MOE_TRY(drv_buf(L, WB_G_ROUTER, (size_t)L->E * H * dsz, &d->router, err));
    d->w13 = g && g->w13 && !kn ? g->w13 : NULL;
    if (!d->w13) MOE_TRY(drv_buf(L, WB_G_W13, El * 2 * I * H * dsz + 1, &d->w13, err));
    d->w2 = g && g->w2 && !kn ? g->w2 : NULL;
    if (!d->w2) MOE_TRY(drv_buf(L, WB_G_W2, El * H * I * dsz + 1, &d->w2, err));
    if (L->shared) {
        MOE_TRY(drv_buf(L, WB_G_SG, 2 * Is * H * dsz, &d->gu, err));
        d->down = g && g->shared_down ? g->shared_down : NULL;
        if (!d->down) MOE_TRY(drv_buf(L, WB_G_SD, H * Is * dsz, &d->down, err));
    }
    return MOE_OK;
}

/* The caller's layout: Llama-4's experts transposed back, the shared gate|up split. */
static moe_status finish_grads(moe_layer *L, const moe_layer_grads *g, const grad_dst *d,
                               moe_error *err)
{
    if (!g) return MOE_OK;
    const int El = L->map.El, H = L->H, I = L->I;
    const size_t half = (size_t)L->Is * H * L->dsz;
    if (L->layout == MOE_LAYOUT_LLAMA4 && El > 0) {
        if (g->w13) MOE_TRY(L->ops->transpose(L, El, 2 * I, H, d->w13, g->w13, err));
        if (g->w2) MOE_TRY(L->ops->transpose(L, El, H, I, d->w2, g->w2, err));
    }
    if (L->shared) {
        if (g->shared_gate) MOE_TRY(L->ops->copy(L, g->shared_gate, d->gu, half, err));
        if (g->shared_up) MOE_TRY(L->ops->copy(L, g->shared_up, (const char *)d->gu + half, half, err));
    }
    return MOE_OK;
}

/* ------------------------------------------------------------------ the plain path ---- */

static moe_status backward_plain(moe_layer *L, int T, const void *x, const void *dout,
                                 const void *dlog_in, void *dx, const grad_dst *g,
                                 moe_error *err)
{
    const moe_layer_backend_ops *o = L->ops;
    const size_t dsz = L->dsz, tk = (size_t)T * L->k, H = (size_t)L->H;
    const int Tb = L->max_tokens > T ? (int)L->max_tokens : T;
    const size_t tb = (size_t)Tb, tkb = tb * L->k;
    if (T == 0) {
        /* no tokens: every gradient is zero (timed as a call of its own) */
        moe_layer_mark(L, MOE_MARK_START, false);
        MOE_TRY(o->zero(L, g->router, (size_t)L->E * H * dsz, err));
        MOE_TRY(o->zero(L, g->w13, (size_t)L->map.El * 2 * L->I * H * dsz, err));
        MOE_TRY(o->zero(L, g->w2, (size_t)L->map.El * H * L->I * dsz, err));
        if (L->shared) {
            MOE_TRY(o->zero(L, g->gu, 2 * (size_t)L->Is * H * dsz, err));
            MOE_TRY(o->zero(L, g->down, H * L->Is * dsz, err));
        }
        moe_layer_mark(L, MOE_MARK_END, false);
        return MOE_OK;
    }
    moe_layer_saved_bufs sv;
    const bool saved = drv_saved_match(L, x, T, &sv);
    void *logits, *w, *sgu, *sact, *dsact, *dsgu, *dxs, *dlog, *dxr, *dxsh = NULL;
    int32_t *ids;
    float *dtop;
    if (saved) {
        logits = sv.logits;
        ids = sv.ids;
        w = sv.w;
        sgu = sv.sgu;
        sact = sv.sact;
    } else {
        MOE_TRY(drv_buf(L, WB_LOGITS, tb * L->E * dsz, &logits, err));
        MOE_TRY(drv_buf(L, WB_IDS, tkb * 4, (void **)&ids, err));
        MOE_TRY(drv_buf(L, WB_W, tkb * dsz, &w, err));
        sgu = sact = NULL;
        if (L->shared) {
            MOE_TRY(drv_buf(L, WB_SGU, tb * 2 * L->Is * dsz, &sgu, err));
            MOE_TRY(drv_buf(L, WB_SACT, tb * L->Is * dsz, &sact, err));
        }
    }
    MOE_TRY(drv_buf(L, WB_ROWS, tkb * H * dsz, &dxs, err));
    MOE_TRY(drv_buf(L, WB_DTOP, tkb * sizeof(float), (void **)&dtop, err));
    MOE_TRY(drv_buf(L, WB_DLOGITS, tb * L->E * dsz, &dlog, err));
    MOE_TRY(drv_buf(L, WB_DXR, tb * H * dsz, &dxr, err));
    if (L->shared) {
        MOE_TRY(drv_buf(L, WB_DXS, tb * H * dsz, &dxsh, err));
        MOE_TRY(drv_buf(L, WB_DSACT, tb * L->Is * dsz, &dsact, err));
        MOE_TRY(drv_buf(L, WB_DSGU, tb * 2 * L->Is * dsz, &dsgu, err));
    }
    moe_layer_mark(L, MOE_MARK_START, false);
    if (L->shared) {
        /* the shared expert's backward on the side stream beside everything else */
        MOE_TRY(o->fork(L, err));
        if (!saved) MOE_TRY(o->shared_forward(L, T, x, sgu, sact, NULL, err));
        MOE_TRY(o->shared_backward(L, T, x, dout, sgu, sact, dsact, dsgu, dxsh, L->dt, g->gu,
                                   g->down, err));
    }
    if (!saved) MOE_TRY(o->route(L, T, x, logits, ids, w, NULL, NULL, NULL, err));
    moe_experts_bwd_args a = {
        .R = T, .first = 0, .count = L->E, .x = x, .dout = dout, .ids = ids, .w = w,
        .dW13 = g->w13, .dW2 = g->w2, .dxs = dxs, .dtop = dtop, .rows_cap = Tb,
    };
    if (saved) {
        a.offsets = sv.offsets;
        a.gather = sv.gather;
        a.gemm1_out = sv.gemm1_out;
        a.act = sv.act;
    }
    MOE_TRY(o->experts_backward(L, &a, err));
    MOE_TRY(o->router_backward(L, T, x, logits, ids, dtop, true, dlog_in, dlog, L->dt, g->router,
                               dxr, err));
    if (L->shared) MOE_TRY(o->join(L, err));
    /* dx = round(dx_router + dx_shared + sum_j (s_f) dxs_f) */
    if (dx) {
        moe_sumk_args s = {.T = T, .rows = dxs, .scale = L->llama ? w : NULL, .add = dxr,
                           .add2 = dxsh, .ids = ids, .filter_count = -1, .out = dx};
        MOE_TRY(o->sum_k(L, &s, err));
    }
    moe_layer_mark(L, MOE_MARK_END, false);
    L->ctr.tokens_computed += (uint64_t)T;
    (void)tk;
    return MOE_OK;
}

/* ------------------------------------------------------------------ replicated gradients ---- */

/* Pieces of the fp32 partials gathered at a time: bounds the gather buffer to N x this. */
#define GREP_PIECE ((size_t)16 << 20)

/* grep [n] fp32 (this rank's partials) -> every rank's in rank order -> summed and rounded
 * into rnd [n] (layer dtype). Identical on every rank. */
static moe_status replicated_sum(moe_layer *L, const float *grep, size_t n, void *rnd,
                                 moe_error *err)
{
    ep_state *s = L->ep;
    const int N = s->N;
    const bool stage = L->backend == MOE_BACKEND_CUDA && !s->nccl;
    const bool host = L->backend == MOE_BACKEND_CPU;
    const size_t piece = n < GREP_PIECE ? n : GREP_PIECE;
    void *all;
    MOE_TRY(drv_buf(L, WB_GREP_ALL, (size_t)N * piece * sizeof(float) + 4, &all, err));
    for (size_t at = 0; at < n; at += piece) {
        const size_t m = n - at < piece ? n - at : piece, bytes = m * sizeof(float);
        if (stage) {
            /* device partials through pinned host memory */
            void *hs, *ha;
            MOE_TRY(moe_ws_need(L->ws, WS_PIN, WB_GREP, bytes + 4, &hs, err));
            MOE_TRY(moe_ws_need(L->ws, WS_PIN, WB_GREP_ALL, (size_t)N * bytes + 4, &ha, err));
            MOE_TRY(L->ops->download(L, hs, grep + at, bytes, err));
            MOE_TRY(s->tp->allgather(s->tp, hs, ha, bytes, true, NULL, err));
            MOE_TRY(L->ops->upload(L, all, ha, (size_t)N * bytes, err));
        } else {
            MOE_TRY(s->tp->allgather(s->tp, grep + at, all, bytes, host, L->stream, err));
        }
        MOE_TRY(L->ops->sum_parts(L, N, m, all, L->dt, (char *)rnd + at * L->dsz, err));
    }
    return MOE_OK;
}

/* ------------------------------------------------------------------ expert parallel ---- */

/* Virtual rank v's experts' backward on R received rows: their weight gradients (slice of
 * g->w13 / g->w2), the partial dx rows (summed over the owned slots, Llama-4's score applied)
 * and the fp32 d-weights [R,k]. */
static moe_status experts_round_bwd(moe_layer *L, int v, int64_t R, int64_t rows_cap,
                                    const void *x, const void *dout, const int32_t *ids,
                                    const void *w, const grad_dst *g, void *part, float *part_dw,
                                    moe_error *err)
{
    const int d = L->map.rank * L->ep->V + v;
    const int first = L->map.vfirst[v], count = L->map.vcount[d];
    const size_t H = (size_t)L->H, I = (size_t)L->I, dsz = L->dsz;
    void *w13 = (char *)g->w13 + (size_t)first * 2 * I * H * dsz;
    void *w2 = (char *)g->w2 + (size_t)first * H * I * dsz;
    void *dxs;
    const int64_t rc = R > rows_cap ? R : rows_cap;
    MOE_TRY(drv_buf(L, WB_ROWS, (size_t)rc * L->k * H * dsz + 4, &dxs, err));
    moe_experts_bwd_args a = {.R = (int)R, .first = first, .count = count, .x = x, .dout = dout,
                              .ids = ids, .w = w, .dW13 = w13, .dW2 = w2, .dxs = dxs,
                              .dtop = part_dw, .rows_cap = (int)rows_cap};
    MOE_TRY(L->ops->experts_backward(L, &a, err));
    if (R == 0) return MOE_OK;
    moe_sumk_args s = {.T = (int)R, .rows = dxs, .scale = L->llama ? w : NULL, .ids = ids,
                       .filter_count = count, .out = part};
    return L->ops->sum_k(L, &s, err);
}

typedef struct bwd_src {
    void *logits, *w, *sgu, *sact, *dsact, *dsgu, *dxsh, *dlog, *dxr, *srcdw;
    int32_t *ids;
    float *grep;
    size_t n_rep, EH, IsH;
} bwd_src;

/* The source side's buffers (T rows, or the bound M in sync-free mode). */
static moe_status src_bufs(moe_layer *L, int Tb, bwd_src *b, moe_error *err)
{
    const size_t t = (size_t)Tb, dsz = L->dsz, H = (size_t)L->H, E = (size_t)L->E;
    const size_t Is = (size_t)L->Is, k = (size_t)L->k;
    memset(b, 0, sizeof *b);
    b->EH = E * H;
    b->IsH = Is * H;
    b->n_rep = b->EH + 3 * b->IsH;
    MOE_TRY(drv_buf(L, WB_LOGITS, t * E * dsz + 4, &b->logits, err));
    MOE_TRY(drv_buf(L, WB_IDS, t * k * 4 + 4, (void **)&b->ids, err));
    MOE_TRY(drv_buf(L, WB_W, t * k * dsz + 4, &b->w, err));
    MOE_TRY(drv_buf(L, WB_SRC_DW, t * k * 4 + 4, &b->srcdw, err));
    MOE_TRY(drv_buf(L, WB_DLOGITS, t * E * dsz + 4, &b->dlog, err));
    MOE_TRY(drv_buf(L, WB_DXR, t * H * dsz + 4, &b->dxr, err));
    MOE_TRY(drv_buf(L, WB_GREP, b->n_rep * sizeof(float) + 4, (void **)&b->grep, err));
    if (L->shared) {
        MOE_TRY(drv_buf(L, WB_SGU, t * 2 * Is * dsz + 4, &b->sgu, err));
        MOE_TRY(drv_buf(L, WB_SACT, t * Is * dsz + 4, &b->sact, err));
        MOE_TRY(drv_buf(L, WB_DSACT, t * Is * dsz + 4, &b->dsact, err));
        MOE_TRY(drv_buf(L, WB_DSGU, t * 2 * Is * dsz + 4, &b->dsgu, err));
        MOE_TRY(drv_buf(L, WB_DXS, t * H * dsz + 4, &b->dxsh, err));
    }
    return MOE_OK;
}

/* Before the dispatch: zero the partials, the shared expert's backward (side stream), route. */
static moe_status src_begin(moe_layer *L, int T, const void *x, const void *dout, int64_t g0,
                            bwd_src *b, moe_error *err)
{
    const moe_layer_backend_ops *o = L->ops;
    MOE_TRY(o->zero(L, b->grep, b->n_rep * sizeof(float), err));
    if (L->shared && T > 0) {
        MOE_TRY(o->fork(L, err)); /* after the zeroing: the side stream writes its part */
        MOE_TRY(o->shared_forward(L, T, x, b->sgu, b->sact, NULL, err));
        MOE_TRY(o->shared_backward(L, T, x, dout, b->sgu, b->sact, b->dsact, b->dsgu, b->dxsh,
                                   MOE_DTYPE_F32, b->grep + b->EH, b->grep + b->EH + 2 * b->IsH,
                                   err));
    }
    return drv_route(L, T, x, g0, b->logits, b->ids, b->w, err);
}

/* After the combine: the router's backward from the returned d-weights and
 * dx = round(dlogits @ router + shared dx + the partial dx rows in ascending rank order). */
static moe_status src_end(moe_layer *L, int T, const void *x, const void *dlog_in, void *dx,
                          const bwd_src *b, const void *back, const void *back_dw,
                          const int64_t *base, const int32_t *tdest, const int32_t *tn,
                          const int32_t *trow, moe_error *err)
{
    const moe_layer_backend_ops *o = L->ops;
    if (T > 0) {
        const ep_state *s = L->ep;
        const bool through = !(s->forced && s->route.weights == MOE_EP_ROUTE_W_UNIFORM);
        MOE_TRY(o->ep_dweights(L, T, b->ids, back_dw, base, tdest, tn, trow, b->srcdw, err));
        MOE_TRY(o->router_backward(L, T, x, b->logits, b->ids, b->srcdw, through, dlog_in,
                                   b->dlog, MOE_DTYPE_F32, b->grep, b->dxr, err));
    }
    if (L->shared && T > 0) MOE_TRY(o->join(L, err));
    if (T > 0 && dx)
        MOE_TRY(o->ep_reduce(L, T, b->dxr, L->shared ? b->dxsh : NULL, back, base, tdest, tn,
                             trow, dx, err));
    return MOE_OK;
}

/* The replicated gradients: every rank's fp32 partials added in rank order, rounded. */
static moe_status src_replicated(moe_layer *L, const bwd_src *b, const grad_dst *g,
                                 moe_error *err)
{
    void *rnd;
    MOE_TRY(drv_buf(L, WB_GREP_RND, b->n_rep * L->dsz + 4, &rnd, err));
    MOE_TRY(replicated_sum(L, b->grep, b->n_rep, rnd, err));
    const size_t dsz = L->dsz;
    MOE_TRY(L->ops->copy(L, g->router, rnd, b->EH * dsz, err));
    if (L->shared) {
        MOE_TRY(L->ops->copy(L, g->gu, (char *)rnd + b->EH * dsz, 2 * b->IsH * dsz, err));
        MOE_TRY(L->ops->copy(L, g->down, (char *)rnd + (b->EH + 2 * b->IsH) * dsz, b->IsH * dsz, err));
    }
    return MOE_OK;
}

static moe_status backward_sized(moe_layer *L, int T, const void *x, const void *dout,
                                 const void *dlog_in, void *dx, const grad_dst *g, int64_t g0,
                                 moe_error *err)
{
    ep_state *s = L->ep;
    const moe_layer_backend_ops *o = L->ops;
    const int V = s->V, G = s->G, D = s->D, k = L->k;
    const size_t xrow = (size_t)L->H * L->dsz, idrow = (size_t)k * 4, wrow = (size_t)k * L->dsz;
    const size_t dwrow = (size_t)k * sizeof(float);
    bwd_src b;
    void *tdest = NULL, *tn = NULL, *trow = NULL, *dcount = NULL;
    moe_status st = src_bufs(L, T, &b, err);
    if (st == MOE_OK) st = drv_buf(L, WB_TDEST, (size_t)T * D * 4 + 4, &tdest, err);
    if (st == MOE_OK) st = drv_buf(L, WB_TN, (size_t)T * 4 + 4, &tn, err);
    if (st == MOE_OK) st = drv_buf(L, WB_TROW, (size_t)T * D * 4 + 4, &trow, err);
    if (st == MOE_OK) st = drv_buf(L, WB_DCOUNT, (size_t)G * 4, &dcount, err);
    moe_layer_mark(L, MOE_MARK_START, false);
    if (st == MOE_OK) st = src_begin(L, T, x, dout, g0, &b, err);
    if (st == MOE_OK) st = o->ep_plan(L, T, b.ids, tdest, tn, trow, dcount, err);
    ep_plan plan;
    st = drv_plan_sized(L, st, 1, T, NULL, dcount, &plan, err);
    if (st != MOE_OK) return st;
    /* the same bounds as the forward's: the same rows travel (the sync-free backward checks
     * max_recv on the device) */
    st = ep_plan_check_capacity(&plan, s->M, s->M > 0 ? s->max_recv : 0, err);
    const size_t S = (size_t)plan.send_total, R = (size_t)plan.recv_total;
    void *base, *sx, *sids, *sw, *sd, *back, *bdw, *rx, *rids, *rw, *rd, *part, *pdw;
    if (st == MOE_OK) st = drv_buf(L, WB_BASE, (size_t)G * 8, &base, err);
    if (st == MOE_OK) st = drv_buf(L, WB_SEND_X, S * xrow + 4, &sx, err);
    if (st == MOE_OK) st = drv_buf(L, WB_SEND_IDS, S * idrow + 4, &sids, err);
    if (st == MOE_OK) st = drv_buf(L, WB_SEND_W, S * wrow + 4, &sw, err);
    if (st == MOE_OK) st = drv_buf(L, WB_SEND_DOUT, S * xrow + 4, &sd, err);
    if (st == MOE_OK) st = drv_buf(L, WB_BACK, S * xrow + 4, &back, err);
    if (st == MOE_OK) st = drv_buf(L, WB_BACK_DW, S * dwrow + 4, &bdw, err);
    if (st == MOE_OK) st = drv_buf(L, WB_RECV_X, R * xrow + 4, &rx, err);
    if (st == MOE_OK) st = drv_buf(L, WB_RECV_IDS, R * idrow + 4, &rids, err);
    if (st == MOE_OK) st = drv_buf(L, WB_RECV_W, R * wrow + 4, &rw, err);
    if (st == MOE_OK) st = drv_buf(L, WB_RECV_DOUT, R * xrow + 4, &rd, err);
    if (st == MOE_OK) st = drv_buf(L, WB_PART, R * xrow + 4, &part, err);
    if (st == MOE_OK) st = drv_buf(L, WB_PART_DW, R * dwrow + 4, &pdw, err);
    if (st == MOE_OK) st = o->upload(L, base, plan.base, (size_t)G * 8, err);
    st = drv_plan_agree(L, st, &plan, err);
    if (st != MOE_OK) return st;
#define TRY(call)                                                                             \
    do {                                                                                      \
        if ((st = (call)) != MOE_OK) goto fatal;                                              \
    } while (0)
    /* the gradient of the combine: dout rows travel with x */
    TRY(o->ep_pack(L, T, x, dout, b.ids, b.w, tdest, tn, trow, base, sx, sd, sids, sw, err));
    drv_bufs disp = {.n = 4, .send = {sx, sids, sw, sd}, .recv = {rx, rids, rw, rd},
                     .row = {xrow, idrow, wrow, xrow},
                     .pin_send = {WB_SEND_X, WB_SEND_IDS, WB_SEND_W, WB_SEND_DOUT},
                     .pin_recv = {WB_RECV_X, WB_RECV_IDS, WB_RECV_W, WB_RECV_DOUT},
                     .what = {"dispatch x rows", "dispatch expert ids", "dispatch weights",
                              "dispatch dout rows"}};
    drv_bufs comb = {.n = 2, .send = {part, pdw}, .recv = {back, bdw}, .row = {xrow, dwrow},
                     .pin_send = {WB_PART, WB_PART_DW}, .pin_recv = {WB_BACK, WB_BACK_DW},
                     .what = {"combine dx rows", "combine d-weights"}};
    ep_request *dreq = s->reqs, *creq = s->reqs + V;
    for (int v = 0; v < V; v++) TRY(drv_xfer_start(L, &plan, 0, v, false, &disp, false, &dreq[v], err));
    for (int v = 0; v < V; v++) {
        TRY(drv_xfer_wait(L, &plan, 0, v, false, &disp, &dreq[v], err));
        int64_t Rv = ep_round_rows(&plan, 0, v, true), rb = ep_round_base(&plan, 0, v, true);
        TRY(experts_round_bwd(L, v, Rv, 0, (char *)rx + (size_t)rb * xrow,
                              (char *)rd + (size_t)rb * xrow,
                              (const int32_t *)((char *)rids + (size_t)rb * idrow),
                              (char *)rw + (size_t)rb * wrow, g, (char *)part + (size_t)rb * xrow,
                              (float *)pdw + (size_t)rb * k, err));
        TRY(drv_xfer_start(L, &plan, 0, v, true, &comb, false, &creq[v], err));
    }
    for (int v = 0; v < V; v++) TRY(drv_xfer_wait(L, &plan, 0, v, true, &comb, &creq[v], err));
    TRY(src_end(L, T, x, dlog_in, dx, &b, back, bdw, base, tdest, tn, trow, err));
#undef TRY
    drv_count(L, &plan, true);
    ep_plan_free(&plan);
    /* every rank reaches this point: a local failure is agreed on, not left hanging */
    st = ep_agree(s->comm->comm, st, err);
    if (st == MOE_OK) st = src_replicated(L, &b, g, err);
    if (st != MOE_OK) return drv_fatal(L, st, err);
    moe_layer_mark(L, MOE_MARK_END, false);
    return MOE_OK;
fatal:
    ep_plan_free(&plan);
    return drv_fatal(L, st, err);
}

static moe_status backward_syncfree(moe_layer *L, int T, const void *x, const void *dout,
                                    const void *dlog_in, void *dx, const grad_dst *g, int64_t g0,
                                    moe_error *err)
{
    ep_state *s = L->ep;
    const moe_layer_backend_ops *o = L->ops;
    const int V = s->V, G = s->G, k = L->k;
    const int64_t M = s->M, Rc = s->Rc;
    const size_t xrow = (size_t)L->H * L->dsz, idrow = (size_t)k * 4, wrow = (size_t)k * L->dsz;
    const size_t dwrow = (size_t)k * sizeof(float), slots = (size_t)G * M;
    bwd_src b;
    drv_slots q; /* what the forward moves too; the dout rows and d-weights besides */
    void *sd, *bdw, *rd, *pdw, *cd, *cpdw;
    MOE_TRY(src_bufs(L, (int)M, &b, err));
    MOE_TRY(drv_slots_get(L, &q, err));
    MOE_TRY(drv_buf(L, WB_SEND_DOUT, slots * xrow, &sd, err));
    MOE_TRY(drv_buf(L, WB_BACK_DW, slots * dwrow, &bdw, err));
    MOE_TRY(drv_buf(L, WB_RECV_DOUT, slots * xrow, &rd, err));
    MOE_TRY(drv_buf(L, WB_PART_DW, slots * dwrow, &pdw, err));
    MOE_TRY(drv_buf(L, WB_CDOUT, (size_t)Rc * xrow, &cd, err));
    MOE_TRY(drv_buf(L, WB_CPART_DW, (size_t)Rc * dwrow, &cpdw, err));
    moe_layer_mark(L, MOE_MARK_START, false);
    MOE_TRY(src_begin(L, T, x, dout, g0, &b, err));
    MOE_TRY(o->ep_plan(L, T, b.ids, q.tdest, q.tn, q.trow, q.dcount, err));
    MOE_TRY(o->ep_slot_counts(L, q.dcount, q.scnt, err));
    MOE_TRY(o->ep_pack(L, T, x, dout, b.ids, b.w, q.tdest, q.tn, q.trow, s->d_slotbase, q.sx, sd,
                       q.sids, q.sw, err));
    drv_bufs disp = {.n = 4, .send = {q.sx, q.sids, q.sw, sd}, .recv = {q.rx, q.rids, q.rw, rd},
                     .row = {xrow, idrow, wrow, xrow},
                     .what = {"dispatch x rows", "dispatch expert ids", "dispatch weights",
                              "dispatch dout rows"}};
    MOE_TRY(drv_slots_dispatch(L, &q, &disp, err));
    if (s->max_recv < (int64_t)G * M) MOE_TRY(o->ep_check_total(L, G, q.rcnt, s->max_recv, err));
    for (int v = 0; v < V; v++) {
        MOE_TRY(drv_slots_compact(L, &q, v, rd, cd, err));
        MOE_TRY(experts_round_bwd(L, v, Rc, Rc, q.cx, cd, q.cids, q.cw, g, q.cpart, cpdw, err));
        MOE_TRY(drv_slots_expand(L, &q, v, xrow, q.cpart, q.part, err));
        MOE_TRY(drv_slots_expand(L, &q, v, dwrow, cpdw, pdw, err));
    }
    drv_bufs comb = {.n = 2, .send = {q.part, pdw}, .recv = {q.back, bdw}, .row = {xrow, dwrow},
                     .what = {"combine dx rows", "combine d-weights"}};
    MOE_TRY(drv_slots_combine(L, &comb, err));
    MOE_TRY(src_end(L, T, x, dlog_in, dx, &b, q.back, bdw, s->d_slotbase, q.tdest, q.tn, q.trow,
                    err));
    MOE_TRY(src_replicated(L, &b, g, err));
    moe_layer_mark(L, MOE_MARK_END, false);
    return MOE_OK;
}

moe_status ep_backward(moe_layer *L, int T, const void *x, const void *dout,
                       const void *d_logits, void *dx, const moe_layer_grads *grads,
                       moe_error *err)
{
    const double t0 = moe_now();
    L->ws_set = WS_BWD;
    grad_dst g;
    moe_status st = grad_targets(L, grads, &g, err);
    st = drv_call_begin(L, 2, st, err);
    if (st != MOE_OK) return st;
    if (L->plain) {
        st = drv_plain_bound(L, T, err);
        if (st == MOE_OK) st = backward_plain(L, T, x, dout, d_logits, dx, &g, err);
    } else {
        ep_state *s = L->ep;
        int64_t g0 = 0;
        if (s->forced && (st = drv_global_offset(L, T, &g0, err)) != MOE_OK)
            return drv_fatal(L, st, err);
        st = s->syncfree ? backward_syncfree(L, T, x, dout, d_logits, dx, &g, g0, err)
                         : backward_sized(L, T, x, dout, d_logits, dx, &g, g0, err);
        if (st != MOE_OK && s->syncfree) return drv_fatal(L, st, err);
    }
    if (st == MOE_OK) st = finish_grads(L, grads, &g, err);
    if (st != MOE_OK) return st;
    drv_call_end(L, 2, T, t0);
    return MOE_OK;
}
