/* ep_forward.c — the layer's forward (ep.h): the plain path with one rank, otherwise route ->
 * plan -> dispatch -> the local experts -> combine, sized per call (chunked when asked) or
 * sync-free (NCCL with max_tokens_per_rank: slots of M rows, counts on the device). */
#include <stdlib.h>
#include <string.h>

#include "ep_driver.h"

/* Virtual rank v's experts on R received rows (x, ids, w at row rb of the receive buffers)
 * into the partial rows (one per received token: the sum over the slots it owns). */
static moe_status experts_round(moe_layer *L, int v, int64_t R, const void *x,
                                const int32_t *ids, const void *w, void *part, moe_error *err)
{
    if (R == 0) return MOE_OK;
    const int d = L->map.rank * L->ep->V + v;
    const int first = L->map.vfirst[v], count = L->map.vcount[d];
    void *rows;
    MOE_TRY(drv_buf(L, WB_ROWS, (size_t)R * L->k * L->H * L->dsz, &rows, err));
    moe_experts_args a = {.R = (int)R, .first = first, .count = count, .x = x, .ids = ids,
                          .w = w, .rows = rows};
    MOE_TRY(L->ops->experts_forward(L, &a, err));
    moe_sumk_args s = {.T = (int)R, .rows = rows, .ids = ids, .filter_count = count, .out = part};
    return L->ops->sum_k(L, &s, err);
}

/* Sized mode: exact counts through the host, C >= 1 chunks pipelined. */
static moe_status forward_sized(moe_layer *L, int T, const void *x, const int32_t *ids,
                                const void *w, const void *shout, void *out, double t0,
                                moe_error *err)
{
    ep_state *s = L->ep;
    const moe_layer_backend_ops *o = L->ops;
    const int C = s->C, V = s->V, G = s->G, D = s->D, k = L->k;
    const size_t xrow = (size_t)L->H * L->dsz, idrow = (size_t)k * 4, wrow = (size_t)k * L->dsz;
    int32_t cb[4097];
    ep_split_even(T, C, cb);
    void *tdest, *tn, *trow, *dcount;
    moe_status st = MOE_OK;
    /* 1. the plan of every chunk on the backend */
    if (st == MOE_OK) st = drv_buf(L, WB_TDEST, (size_t)T * D * 4 + 4, &tdest, err);
    if (st == MOE_OK) st = drv_buf(L, WB_TN, (size_t)T * 4 + 4, &tn, err);
    if (st == MOE_OK) st = drv_buf(L, WB_TROW, (size_t)T * D * 4 + 4, &trow, err);
    if (st == MOE_OK) st = drv_buf(L, WB_DCOUNT, (size_t)C * G * 4, &dcount, err);
    for (int c = 0; c < C && st == MOE_OK; c++) {
        int a = cb[c];
        st = o->ep_plan(L, cb[c + 1] - a, ids + (size_t)a * k, (int32_t *)tdest + (size_t)a * D,
                        (int32_t *)tn + a, (int32_t *)trow + (size_t)a * D,
                        (int32_t *)dcount + (size_t)c * G, err);
    }
    /* 2. the counts to the host and exchanged, then every rank checks it can take what is
     * coming */
    ep_plan plan;
    st = drv_plan_sized(L, st, C, T, cb, dcount, &plan, err);
    if (st != MOE_OK) return st;
    st = ep_plan_check_capacity(&plan, s->M, s->M > 0 ? s->max_recv : 0, err);
    const size_t S = (size_t)plan.send_total, R = (size_t)plan.recv_total;
    void *base, *sx, *sids, *sw, *rx, *rids, *rw, *part, *back;
    if (st == MOE_OK) st = drv_buf(L, WB_BASE, (size_t)C * G * 8, &base, err);
    if (st == MOE_OK) st = drv_buf(L, WB_SEND_X, S * xrow, &sx, err);
    if (st == MOE_OK) st = drv_buf(L, WB_SEND_IDS, S * idrow, &sids, err);
    if (st == MOE_OK) st = drv_buf(L, WB_SEND_W, S * wrow, &sw, err);
    if (st == MOE_OK) st = drv_buf(L, WB_BACK, S * xrow, &back, err);
    if (st == MOE_OK) st = drv_buf(L, WB_RECV_X, R * xrow, &rx, err);
    if (st == MOE_OK) st = drv_buf(L, WB_RECV_IDS, R * idrow, &rids, err);
    if (st == MOE_OK) st = drv_buf(L, WB_RECV_W, R * wrow, &rw, err);
    if (st == MOE_OK) st = drv_buf(L, WB_PART, R * xrow, &part, err);
    if (st == MOE_OK) st = o->upload(L, base, plan.base, (size_t)C * G * 8, err);
    /* the buffers and the capacity check are agreed on before any payload moves */
    st = drv_plan_agree(L, st, &plan, err);
    if (st != MOE_OK) return st;
    /* 3. pack every chunk */
    for (int c = 0; c < C && st == MOE_OK; c++) {
        int a = cb[c];
        st = o->ep_pack(L, cb[c + 1] - a, (const char *)x + (size_t)a * xrow, NULL, ids + (size_t)a * k,
                        (const char *)w + (size_t)a * wrow, (int32_t *)tdest + (size_t)a * D,
                        (int32_t *)tn + a, (int32_t *)trow + (size_t)a * D,
                        (int64_t *)base + (size_t)c * G, sx, NULL, sids, sw, err);
    }
    moe_layer_mark(L, MOE_MARK_PERMUTED, false);
    drv_bufs disp = {.n = 3, .send = {sx, sids, sw}, .recv = {rx, rids, rw},
                     .row = {xrow, idrow, wrow},
                     .pin_send = {WB_SEND_X, WB_SEND_IDS, WB_SEND_W},
                     .pin_recv = {WB_RECV_X, WB_RECV_IDS, WB_RECV_W},
                     .what = {"dispatch x rows", "dispatch expert ids", "dispatch weights"}};
    drv_bufs comb = {.n = 1, .send = {back}, .recv = {part}, .row = {xrow},
                     .pin_send = {WB_BACK}, .pin_recv = {WB_PART},
                     .what = {"combine partial rows"}};
    /* combine goes the other way: from the receive layout (part) to the send layout (back) */
    drv_bufs combx = {.n = 1, .send = {part}, .recv = {back}, .row = {xrow},
                      .pin_send = {WB_PART}, .pin_recv = {WB_BACK},
                      .what = {"combine partial rows"}};
    (void)comb;
    ep_request *dreq = s->reqs, *creq = s->reqs + (size_t)C * V;
    const bool overlap = C > 1;
    moe_layer_counters *ctr = &L->ctr;
    /* 4. the pipeline: the dispatch of chunk c+1 is in flight while chunk c computes, and the
     * combine of chunk c travels while chunk c+1 computes */
#define TRY(call)                                                                             \
    do {                                                                                      \
        if ((st = (call)) != MOE_OK) goto fatal;                                              \
    } while (0)
    for (int v = 0; v < V; v++) TRY(drv_xfer_start(L, &plan, 0, v, false, &disp, overlap, &dreq[v], err));
    ctr->timeline[0].dispatch_post = moe_now() - t0;
    for (int c = 0; c < C; c++) {
        if (c + 1 < C) {
            for (int v = 0; v < V; v++)
                TRY(drv_xfer_start(L, &plan, c + 1, v, false, &disp, overlap,
                                   &dreq[(size_t)(c + 1) * V + v], err));
            if (c + 1 < MOE_STATS_MAX_CHUNKS) ctr->timeline[c + 1].dispatch_post = moe_now() - t0;
        }
        for (int v = 0; v < V; v++)
            TRY(drv_xfer_wait(L, &plan, c, v, false, &disp, &dreq[(size_t)c * V + v], err));
        if (c == 0) moe_layer_mark(L, MOE_MARK_DISPATCHED, false);
        if (c < MOE_STATS_MAX_CHUNKS)
            ctr->timeline[c].dispatch_done = ctr->timeline[c].compute_begin = moe_now() - t0;
        for (int v = 0; v < V; v++) {
            int64_t Rv = ep_round_rows(&plan, c, v, true), rb = ep_round_base(&plan, c, v, true);
            TRY(experts_round(L, v, Rv, (char *)rx + (size_t)rb * xrow,
                              (const int32_t *)((char *)rids + (size_t)rb * idrow),
                              (char *)rw + (size_t)rb * wrow, (char *)part + (size_t)rb * xrow,
                              err));
            TRY(drv_xfer_start(L, &plan, c, v, true, &combx, overlap, &creq[(size_t)c * V + v], err));
            /* give the next chunk's dispatch a chance to move (MPI progress) */
            if (c + 1 < C)
                for (int u = 0; u < V; u++)
                    TRY(s->tp->progress(s->tp, &dreq[(size_t)(c + 1) * V + u], err));
        }
        if (c < MOE_STATS_MAX_CHUNKS)
            ctr->timeline[c].compute_end = ctr->timeline[c].combine_post = moe_now() - t0;
    }
    for (int c = 0; c < C; c++) {
        for (int v = 0; v < V; v++)
            TRY(drv_xfer_wait(L, &plan, c, v, true, &combx, &creq[(size_t)c * V + v], err));
        if (c < MOE_STATS_MAX_CHUNKS) ctr->timeline[c].combine_done = moe_now() - t0;
    }
    moe_layer_mark(L, MOE_MARK_GEMM2, false);
    /* 5. the source adds the partial rows in ascending virtual-rank order, after the shared
     * expert's output */
    if (L->shared && T > 0) TRY(o->join(L, err));
    for (int c = 0; c < C; c++) {
        int a = cb[c];
        TRY(o->ep_reduce(L, cb[c + 1] - a, shout ? (const char *)shout + (size_t)a * xrow : NULL,
                         NULL, back, (int64_t *)base + (size_t)c * G,
                         (int32_t *)tdest + (size_t)a * D, (int32_t *)tn + a,
                         (int32_t *)trow + (size_t)a * D, (char *)out + (size_t)a * xrow, err));
    }
#undef TRY
    drv_count(L, &plan, false);
    ep_plan_free(&plan);
    return MOE_OK;
fatal:
    ep_plan_free(&plan);
    return drv_fatal(L, st, err);
}

/* Sync-free mode (NCCL, max_tokens_per_rank): counts stay on the device; whole slots of M rows
 * travel with their counts, the receiver compacts, computes Rc rows per virtual rank and
 * expands back. No host synchronisation: capturable. */
static moe_status forward_syncfree(moe_layer *L, int T, const void *x, const int32_t *ids,
                                   const void *w, const void *shout, void *out, moe_error *err)
{
    ep_state *s = L->ep;
    const moe_layer_backend_ops *o = L->ops;
    const int V = s->V, G = s->G, k = L->k;
    const int64_t M = s->M;
    const size_t xrow = (size_t)L->H * L->dsz, idrow = (size_t)k * 4, wrow = (size_t)k * L->dsz;
    drv_slots b;
    MOE_TRY(drv_slots_get(L, &b, err));
    MOE_TRY(o->ep_plan(L, T, ids, b.tdest, b.tn, b.trow, b.dcount, err));
    MOE_TRY(o->ep_slot_counts(L, b.dcount, b.scnt, err));
    MOE_TRY(o->ep_pack(L, T, x, NULL, ids, w, b.tdest, b.tn, b.trow, s->d_slotbase, b.sx, NULL,
                       b.sids, b.sw, err));
    moe_layer_mark(L, MOE_MARK_PERMUTED, false);
    drv_bufs disp = {.n = 3, .send = {b.sx, b.sids, b.sw}, .recv = {b.rx, b.rids, b.rw},
                     .row = {xrow, idrow, wrow},
                     .what = {"dispatch x rows", "dispatch expert ids", "dispatch weights"}};
    MOE_TRY(drv_slots_dispatch(L, &b, &disp, err));
    moe_layer_mark(L, MOE_MARK_DISPATCHED, false);
    if (s->max_recv < (int64_t)G * M) MOE_TRY(o->ep_check_total(L, G, b.rcnt, s->max_recv, err));
    for (int v = 0; v < V; v++) {
        MOE_TRY(drv_slots_compact(L, &b, v, NULL, NULL, err));
        MOE_TRY(experts_round(L, v, s->Rc, b.cx, b.cids, b.cw, b.cpart, err));
        MOE_TRY(drv_slots_expand(L, &b, v, xrow, b.cpart, b.part, err));
    }
    drv_bufs comb = {.n = 1, .send = {b.part}, .recv = {b.back}, .row = {xrow},
                     .what = {"combine partial rows"}};
    MOE_TRY(drv_slots_combine(L, &comb, err));
    moe_layer_mark(L, MOE_MARK_GEMM2, false);
    if (L->shared && T > 0) MOE_TRY(o->join(L, err));
    L->ctr.nchunks = 1;
    L->ctr.timeline[0].tokens = T;
    return o->ep_reduce(L, T, shout, NULL, b.back, s->d_slotbase, b.tdest, b.tn, b.trow, out,
                        err);
}

/* ------------------------------------------------------------------ the plain path ---- */

/* Buffers of one plain forward: the caller's (st) where given, else the saved state or the
 * workspace. */
moe_status ep_plain_forward(moe_layer *L, int T, const void *x, moe_fwd_state *st,
                            bool keep, moe_error *err)
{
    const moe_layer_backend_ops *o = L->ops;
    const size_t tk = (size_t)T * L->k, dsz = L->dsz;
    void *logits = st->router_logits, *w = st->topk_w, *act = st->act, *rows = st->gemm2_out;
    void *shout = st->shared_out, *gu = st->gemm1_out, *sgu = NULL, *sact = NULL;
    int32_t *ids = st->topk_ids, *counts = st->token_counts, *offs = st->expert_offsets;
    int32_t *gather = st->gather_idx;
    moe_layer_saved_bufs sv;
    bool save = keep && drv_saved_bufs(L, T, &sv);
    if (save) {
        if (!logits) logits = sv.logits;
        if (!ids) ids = sv.ids;
        if (!w) w = sv.w;
        if (!offs) offs = sv.offsets;
        if (!gather) gather = sv.gather;
        if (!gu) gu = sv.gemm1_out;
        if (!act) act = sv.act;
        sgu = sv.sgu;
        sact = sv.sact;
    }
    if (!logits) MOE_TRY(drv_buf(L, WB_LOGITS, (size_t)T * L->E * dsz, &logits, err));
    if (!ids) MOE_TRY(drv_buf(L, WB_IDS, tk * 4, (void **)&ids, err));
    if (!w) MOE_TRY(drv_buf(L, WB_W, tk * dsz, &w, err));
    if (!counts) MOE_TRY(drv_buf(L, WB_COUNTS, ((size_t)L->E + 1) * 4, (void **)&counts, err));
    if (!offs) MOE_TRY(drv_buf(L, WB_OFFS, ((size_t)L->E + 1) * 4, (void **)&offs, err));
    if (!gather) MOE_TRY(drv_buf(L, WB_GATHER, tk * 4, (void **)&gather, err));
    if (!act) MOE_TRY(drv_buf(L, WB_ACT, tk * L->I * dsz, &act, err));
    if (!rows) MOE_TRY(drv_buf(L, WB_ROWS, tk * L->H * dsz, &rows, err));
    if (L->shared) {
        if (!shout) MOE_TRY(drv_buf(L, WB_SHOUT, (size_t)T * L->H * dsz, &shout, err));
        if (!sgu) MOE_TRY(drv_buf(L, WB_SGU, (size_t)T * 2 * L->Is * dsz, &sgu, err));
        if (!sact) MOE_TRY(drv_buf(L, WB_SACT, (size_t)T * L->Is * dsz, &sact, err));
    }
    moe_layer_mark(L, MOE_MARK_START, false);
    if (L->shared) {
        /* the shared expert needs only x: it overlaps routing and the routed GEMMs */
        MOE_TRY(o->fork(L, err));
        moe_layer_mark(L, MOE_MARK_SHARED0, true);
        MOE_TRY(o->shared_forward(L, T, x, sgu, sact, shout, err));
        moe_layer_mark(L, MOE_MARK_SHARED1, true);
    }
    MOE_TRY(o->route(L, T, x, logits, ids, w, counts, offs, gather, err));
    /* The backward reads the saved logits: when they went to the caller's buffer (router_logits
     * asked for), keep a copy, or the backward would read a stale saved buffer. */
    if (save && logits != sv.logits)
        MOE_TRY(o->copy(L, sv.logits, logits, (size_t)T * L->E * dsz, err));
    /* the plain route includes the sort; nothing is dispatched (drv_call_end reports -1) */
    moe_layer_mark(L, MOE_MARK_ROUTED, false);
    moe_layer_mark(L, MOE_MARK_PERMUTED, false);
    moe_layer_mark(L, MOE_MARK_DISPATCHED, false);
    moe_experts_args a = {
        .R = T, .first = 0, .count = L->E, .x = x, .ids = ids, .w = w, .rows = rows,
        .counts = counts, .offsets = offs, .gather = gather, .gemm1_out = gu, .act = act,
        .presorted = true, .zero_rows = false,
    };
    MOE_TRY(o->experts_forward(L, &a, err));
    if (L->shared) MOE_TRY(o->join(L, err));
    moe_sumk_args s = {.T = T, .rows = rows, .add = L->shared ? shout : NULL, .ids = ids,
                       .filter_count = -1, .out = st->out};
    MOE_TRY(o->sum_k(L, &s, err));
    moe_layer_mark(L, MOE_MARK_END, false);
    if (save) drv_saved_commit(L, x, T);
    return MOE_OK;
}

moe_status ep_forward(moe_layer *L, int T, const void *x, void *out, void *logits,
                      moe_error *err)
{
    const double t0 = moe_now();
    L->ws_set = WS_FWD;
    moe_status st = drv_call_begin(L, 1, MOE_OK, err);
    if (st != MOE_OK) return st;
    L->calls++;
    if (L->plain) {
        MOE_TRY(drv_plain_bound(L, T, err));
        if (T > 0) {
            moe_fwd_state fs;
            memset(&fs, 0, sizeof fs);
            fs.T = T;
            fs.out = out;
            fs.router_logits = logits;
            st = ep_plain_forward(L, T, x, &fs, true, err);
            L->ctr.tokens_computed += (uint64_t)T;
        } else {
            /* no tokens: the call's time, not the previous call's (timing) */
            moe_layer_mark(L, MOE_MARK_START, false);
            moe_layer_mark(L, MOE_MARK_END, false);
        }
        drv_call_end(L, 1, T, t0);
        return st;
    }
    ep_state *s = L->ep;
    const size_t tk = (size_t)T * L->k, dsz = L->dsz;
    int64_t g0 = 0;
    if (s->forced && (st = drv_global_offset(L, T, &g0, err)) != MOE_OK) return drv_fatal(L, st, err);
    void *lg = logits, *w = NULL, *shout = NULL, *sgu = NULL, *sact = NULL;
    int32_t *ids = NULL;
    const int Tb = s->syncfree ? (int)s->M : T; /* sync-free buffers never change size */
    if (!lg) st = drv_buf(L, WB_LOGITS, (size_t)Tb * L->E * dsz + 1, &lg, err);
    if (st == MOE_OK) st = drv_buf(L, WB_IDS, (size_t)Tb * L->k * 4 + 4, (void **)&ids, err);
    if (st == MOE_OK) st = drv_buf(L, WB_W, (size_t)Tb * L->k * dsz + 4, &w, err);
    if (st == MOE_OK && L->shared) {
        st = drv_buf(L, WB_SHOUT, (size_t)Tb * L->H * dsz + 4, &shout, err);
        if (st == MOE_OK) st = drv_buf(L, WB_SGU, (size_t)Tb * 2 * L->Is * dsz + 4, &sgu, err);
        if (st == MOE_OK) st = drv_buf(L, WB_SACT, (size_t)Tb * L->Is * dsz + 4, &sact, err);
    }
    (void)tk;
    moe_layer_mark(L, MOE_MARK_START, false);
    /* Llama-4's shared expert needs only the local tokens: it runs on the side stream while
     * the routing, the dispatch and the experts run on the main one. */
    if (st == MOE_OK && L->shared && T > 0) {
        st = L->ops->fork(L, err);
        moe_layer_mark(L, MOE_MARK_SHARED0, true);
        if (st == MOE_OK) st = L->ops->shared_forward(L, T, x, sgu, sact, shout, err);
        moe_layer_mark(L, MOE_MARK_SHARED1, true);
    }
    if (st == MOE_OK) st = drv_route(L, T, x, g0, lg, ids, w, err);
    moe_layer_mark(L, MOE_MARK_ROUTED, false);
    if (s->syncfree) {
        if (st == MOE_OK) st = forward_syncfree(L, T, x, ids, w, shout, out, err);
        if (st != MOE_OK) return drv_fatal(L, st, err);
    } else {
        /* failures so far are local: forward_sized agrees on them before the exchange */
        if (st != MOE_OK) return ep_agree(s->comm->comm, st, err);
        st = forward_sized(L, T, x, ids, w, shout, out, t0, err);
        if (st != MOE_OK) return st;
    }
    moe_layer_mark(L, MOE_MARK_END, false);
    drv_call_end(L, 1, T, t0);
    return MOE_OK;
}
