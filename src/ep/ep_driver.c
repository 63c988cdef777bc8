/* ep_driver.c — the one driver of a layer (ep.h): the EP state, the start and end of every
 * call (agreement, counters, timing), the round transfers (with pinned-host staging where a
 * CUDA layer talks MPI), the steps the forward and the backward share (a sized call's plan and
 * counts exchange; a sync-free call's buffers, slot transfers, compaction and expansion), and
 * the forward's state saved for the backward. The forward (the plain path too) is in
 * ep_forward.c, the backward in ep_backward.c. */
#include <stdlib.h>
#include <string.h>

#include "ep.h"
#include "ep_driver.h"

/* ------------------------------------------------------------------ the EP state ---- */

moe_status ep_state_create(moe_layer *L, moe_ep_comm *comm, moe_error *err)
{
    ep_state *s = moe_calloc(1, sizeof *s, "EP state", err);
    if (!s) return MOE_ERR_NOMEM;
    L->ep = s;
    s->comm = comm;
    s->N = comm->nranks;
    s->V = comm->opts.virtual_ranks;
    s->G = s->N * s->V;
    s->C = comm->opts.chunks;
    s->D = L->k < s->G ? L->k : s->G;
    s->M = comm->opts.max_tokens_per_rank;
    s->abort_on_fatal = comm->opts.abort_on_fatal != 0;
    moe_status st = moe_ep_route_parse(comm->route_spec, L->E, L->k, &s->route, err);
    if (st == MOE_OK && s->route.mode == MOE_EP_ROUTE_ALL_TO_ONE &&
        (s->route.target < 0 || s->route.target >= s->G))
        st = moe_fail(err, MOE_ERR_INVALID_ARG,
                      "--route all-to-one:%d: target must be a (virtual) rank in [0, %d)",
                      s->route.target, s->G);
    s->forced = s->route.mode != MOE_EP_ROUTE_ROUTER;
    st = ep_agree(comm->comm, st, err);
    if (st != MOE_OK) return st;
    L->plain = s->N == 1 && s->V == 1 && !s->forced;
    if (!L->plain) MOE_TRY(ep_comm_pick_transport(comm, L, &s->tp, err));
    s->nccl = s->tp && strcmp(s->tp->name, "nccl") == 0;
    s->syncfree = !L->plain && s->nccl && s->M > 0 && L->backend == MOE_BACKEND_CUDA;
    if (s->syncfree && s->C > 1)
        return ep_agree(comm->comm,
                        moe_fail(err, MOE_ERR_UNSUPPORTED,
                                 "--chunks %d with --max-tokens-per-rank over NCCL: the "
                                 "sync-free forward runs as one chunk", s->C), err);
    if (s->M > 0) {
        int64_t worst = (int64_t)s->G * s->M;
        s->max_recv = comm->opts.max_recv_tokens > 0 ? comm->opts.max_recv_tokens : worst;
        if (s->max_recv > worst) s->max_recv = worst;
        s->Rc = s->max_recv < (int64_t)s->N * s->M ? s->max_recv : (int64_t)s->N * s->M;
    }
    s->nreqs = 2 * s->C * s->V;
    s->reqs = moe_calloc((size_t)s->nreqs, sizeof *s->reqs, "EP transfer records", err);
    s->h_dcount = moe_calloc((size_t)s->C * s->G + 1, sizeof(int32_t), "EP counts", err);
    st = s->reqs && s->h_dcount ? MOE_OK : MOE_ERR_NOMEM;
    if (st == MOE_OK && !L->plain) {
        /* the placement tables the plan and pack read */
        size_t tb = (size_t)L->E * sizeof(int32_t);
        st = moe_mem_alloc(L->backend, L->device, tb, "expert owners", (void **)&L->d_vowner, err);
        if (st == MOE_OK)
            st = moe_mem_alloc(L->backend, L->device, tb, "expert indices", (void **)&L->d_vlocal,
                               err);
        if (st == MOE_OK) st = L->ops->upload(L, L->d_vowner, L->map.vowner, tb, err);
        if (st == MOE_OK) st = L->ops->upload(L, L->d_vlocal, L->map.vlocal, tb, err);
    }
    if (st == MOE_OK && s->syncfree) {
        int64_t *base = moe_malloc((size_t)s->G * sizeof(int64_t), "slot bases", err);
        st = base ? MOE_OK : MOE_ERR_NOMEM;
        /* destination d = q*V + v sends into slot (v*N + q) */
        for (int d = 0; st == MOE_OK && d < s->G; d++)
            base[d] = ((int64_t)(d % s->V) * s->N + d / s->V) * s->M;
        if (st == MOE_OK)
            st = moe_mem_alloc(L->backend, L->device, (size_t)s->G * sizeof(int64_t),
                               "slot bases", (void **)&s->d_slotbase, err);
        if (st == MOE_OK)
            st = L->ops->upload(L, s->d_slotbase, base, (size_t)s->G * sizeof(int64_t), err);
        free(base);
    }
    return ep_agree(comm->comm, st, err);
}

void ep_state_destroy(moe_layer *L)
{
    ep_state *s = L->ep;
    if (!s) return;
    for (int i = 0; i < s->nreqs && s->reqs; i++) ep_request_free(&s->reqs[i]);
    free(s->reqs);
    free(s->h_dcount);
    moe_ep_route_free(&s->route);
    moe_mem_free(L->backend, L->device, s->d_slotbase);
    moe_mem_free(L->backend, L->device, L->d_vowner);
    moe_mem_free(L->backend, L->device, L->d_vlocal);
    L->d_vowner = L->d_vlocal = NULL;
    free(s);
    L->ep = NULL;
}

/* ------------------------------------------------------------------ calls ---- */

moe_status drv_fatal(moe_layer *L, moe_status st, moe_error *err)
{
    int rank = L->map.rank;
    moe_warn("rank %d: fatal expert-parallel error (%s): %s", rank, moe_strerror(st),
             err && err->msg[0] ? err->msg : "(no message)");
    if (L->ep && L->ep->abort_on_fatal) {
        /* The other ranks may be blocked in a transfer waiting for this one: only ending the
         * job releases them. */
        MPI_Abort(L->ep->comm->comm, 1 + (int)st);
    }
    return st;
}

moe_status drv_call_begin(moe_layer *L, int kind, moe_status st, moe_error *err)
{
    moe_layer_counters *c = &L->ctr;
    c->last_call = 0;
    c->last_device_ms = -1;
    for (int i = 0; i < MOE_STATS_NUM_PHASES; i++) c->phase_ms[i] = -1;
    c->nchunks = 0;
    memset(c->timeline, 0, sizeof c->timeline);
    if (!L->ep || L->plain) return st;
    /* Every rank must be in the same call on the same layer: the kind and the layer's
     * fingerprint ride on the status agreement. */
    int64_t f[2] = {kind, (int64_t)(L->fingerprint >> 1)};
    static const char *const names[2] = {"the call (1 forward, 2 backward)",
                                         "the layer (its creation fingerprint)"};
    return ep_agree_fields(L->ep->comm->comm, st, f, names, 2, err);
}

moe_status drv_plain_bound(const moe_layer *L, int T, moe_error *err)
{
    if (!L->ep || L->ep->M <= 0) return MOE_OK;
    ep_plan p;
    memset(&p, 0, sizeof p);
    p.T = T;
    p.rank = L->map.rank;
    return ep_plan_check_capacity(&p, L->ep->M, 0, err);
}

void drv_call_end(moe_layer *L, int kind, int T, double t0)
{
    moe_layer_counters *c = &L->ctr;
    double dt = moe_now() - t0;
    if (kind == 1) c->calls_forward++;
    else c->calls_backward++;
    c->tokens_local += (uint64_t)T;
    c->seconds += dt;
    c->last_call = kind;
    c->last_tokens = T;
    c->last_seconds = dt;
    if (!L->timing) return;
    moe_error e;
    moe_error_clear(&e);
    if (L->ops->sync(L, &e) != MOE_OK) return;
    const moe_layer_backend_ops *o = L->ops;
    c->last_device_ms = o->mark_ms(L, MOE_MARK_START, MOE_MARK_END);
    if (kind != 1) return;
    c->phase_ms[MOE_PHASE_ROUTE] = o->mark_ms(L, MOE_MARK_START, MOE_MARK_ROUTED);
    c->phase_ms[MOE_PHASE_PERMUTE] = o->mark_ms(L, MOE_MARK_ROUTED, MOE_MARK_PERMUTED);
    c->phase_ms[MOE_PHASE_DISPATCH] =
        L->plain ? -1 : o->mark_ms(L, MOE_MARK_PERMUTED, MOE_MARK_DISPATCHED);
    c->phase_ms[MOE_PHASE_GEMM1] = o->mark_ms(L, MOE_MARK_DISPATCHED, MOE_MARK_GEMM1);
    c->phase_ms[MOE_PHASE_GEMM2] = o->mark_ms(L, MOE_MARK_GEMM1, MOE_MARK_GEMM2);
    c->phase_ms[MOE_PHASE_COMBINE] = o->mark_ms(L, MOE_MARK_GEMM2, MOE_MARK_END);
    if (L->shared) c->phase_ms[MOE_PHASE_SHARED] = o->mark_ms(L, MOE_MARK_SHARED0, MOE_MARK_SHARED1);
}

/* Counters of a sized call: rows and bytes per peer from the plan. */
void drv_count(moe_layer *L, const ep_plan *p, bool backward)
{
    moe_layer_counters *c = &L->ctr;
    size_t xrow = (size_t)L->H * L->dsz;
    size_t out_row = xrow + (size_t)L->k * (sizeof(int32_t) + L->dsz); /* x, ids, w */
    size_t back_row = xrow;                                              /* partial */
    if (backward) {
        out_row += xrow;                              /* dout */
        back_row += (size_t)L->k * sizeof(float);     /* d-weights */
    }
    int nc = p->C < MOE_STATS_MAX_CHUNKS ? p->C : MOE_STATS_MAX_CHUNKS;
    c->nchunks = nc;
    for (int ch = 0; ch < p->C; ch++)
        for (int v = 0; v < p->V; v++) {
            size_t base = ((size_t)ch * p->V + v) * p->N;
            for (int q = 0; q < p->N; q++) {
                uint64_t sr = (uint64_t)p->send_rows[base + q], rr = (uint64_t)p->recv_rows[base + q];
                c->rows_sent += sr;
                c->rows_recv += rr;
                c->tokens_computed += rr;
                c->peer_rows_sent[q] += sr;
                c->peer_rows_recv[q] += rr;
                c->bytes_sent += sr * out_row + rr * back_row;
                c->bytes_recv += rr * out_row + sr * back_row;
                c->peer_bytes_sent[q] += sr * out_row + rr * back_row;
                c->peer_bytes_recv[q] += rr * out_row + sr * back_row;
                if (ch < nc) {
                    c->timeline[ch].rows_sent += (int64_t)sr;
                    c->timeline[ch].rows_recv += (int64_t)rr;
                }
            }
        }
    for (int ch = 0; ch < nc; ch++)
        c->timeline[ch].tokens = p->chunk_begin[ch + 1] - p->chunk_begin[ch];
}

moe_status drv_global_offset(moe_layer *L, int T, int64_t *g0, moe_error *err)
{
    int64_t mine = T, before = 0;
    int rc = MPI_Exscan(&mine, &before, 1, MPI_INT64_T, MPI_SUM, L->ep->comm->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, L->map.rank, "MPI_Exscan (token offsets)");
    *g0 = L->map.rank == 0 ? 0 : before;
    return MOE_OK;
}

moe_status drv_buf(moe_layer *L, int id, size_t bytes, void **p, moe_error *err)
{
    return moe_ws_need(L->ws, L->ws_set, id, bytes, p, err);
}

/* ------------------------------------------------------------------ routing ---- */

moe_status drv_route(moe_layer *L, int T, const void *x, int64_t g0, void *logits, int32_t *ids,
                     void *w, moe_error *err)
{
    if (T == 0) return MOE_OK;
    MOE_TRY(L->ops->route(L, T, x, logits, ids, w, NULL, NULL, NULL, err));
    if (!L->ep || !L->ep->forced) return MOE_OK;
    /* Forced routing is defined on the host (ep.h): ids from the global token index, the
     * weights from the logits at those ids. */
    const size_t tk = (size_t)T * L->k, lb = (size_t)T * L->E * L->dsz;
    void *hl = moe_malloc(lb, "forced routing logits", err);
    int32_t *hi = moe_malloc(tk * sizeof(int32_t), "forced routing ids", err);
    void *hw = moe_malloc(tk * L->dsz, "forced routing weights", err);
    moe_status st = hl && hi && hw ? MOE_OK : MOE_ERR_NOMEM;
    if (st == MOE_OK) st = L->ops->download(L, hl, logits, lb, err);
    if (st == MOE_OK) st = moe_ep_route_ids(&L->ep->route, &L->map, L->k, g0, T, hi, err);
    if (st == MOE_OK) {
        ep_route_weights(&L->cfg, L->dt, L->ep->route.weights, T, hl, hi, hw);
        st = L->ops->upload(L, ids, hi, tk * sizeof(int32_t), err);
    }
    if (st == MOE_OK) st = L->ops->upload(L, w, hw, tk * L->dsz, err);
    free(hl);
    free(hi);
    free(hw);
    return st;
}

/* ------------------------------------------------------------------ transfers ---- */

/* One round of a transfer in the plan's layout: forward (send rows -> receive rows) or back
 * (receive rows -> send rows). Per-peer counts relative to the round's first row. */
static void round_layout(const ep_plan *p, int c, int v, bool back, int64_t *L4)
{
    const int N = p->N;
    const size_t b = ((size_t)c * p->V + v) * N;
    const int64_t *sr = back ? p->recv_rows : p->send_rows, *so = back ? p->recv_off : p->send_off;
    const int64_t *rr = back ? p->send_rows : p->recv_rows, *ro = back ? p->send_off : p->recv_off;
    for (int q = 0; q < N; q++) {
        L4[q] = sr[b + q];
        L4[N + q] = so[b + q] - so[b];
        L4[2 * N + q] = rr[b + q];
        L4[3 * N + q] = ro[b + q] - ro[b];
    }
}

/* s_cap / r_cap: rows the pinned mirrors must hold on each side for the whole call (every
 * round of it), so a later round never reallocates a mirror an earlier round's transfer is
 * still reading or writing (MPI_Ialltoallv in flight), nor moves the rows drv_xfer_wait copies
 * back. */
static moe_status xfer_with(moe_layer *L, const drv_bufs *xb, const int64_t *lay, int64_t sbase,
                            int64_t rbase, int64_t stot, int64_t rtot, int64_t s_cap,
                            int64_t r_cap, bool overlap, ep_request *req, moe_error *err)
{
    ep_state *s = L->ep;
    const int N = s->N;
    ep_xfer x;
    memset(&x, 0, sizeof x);
    x.nbufs = xb->n;
    x.send_rows = lay;
    x.send_off = lay + N;
    x.recv_rows = lay + 2 * N;
    x.recv_off = lay + 3 * N;
    x.stream = L->stream;
    x.overlap = overlap;
    const bool stage = L->backend == MOE_BACKEND_CUDA && !s->nccl;
    x.host_mem = L->backend == MOE_BACKEND_CPU || stage;
    for (int b = 0; b < xb->n; b++) {
        const size_t rb = xb->row[b];
        x.row_bytes[b] = rb;
        x.what[b] = xb->what[b];
        const char *snd = (const char *)xb->send[b] + (size_t)sbase * rb;
        char *rcv = (char *)xb->recv[b] + (size_t)rbase * rb;
        if (stage) {
            /* device rows through pinned host mirrors (same layout) */
            void *ps, *pr;
            const int64_t sn = s_cap > sbase + stot ? s_cap : sbase + stot;
            const int64_t rn = r_cap > rbase + rtot ? r_cap : rbase + rtot;
            MOE_TRY(moe_ws_need(L->ws, WS_PIN, xb->pin_send[b], (size_t)sn * rb + 1, &ps, err));
            MOE_TRY(moe_ws_need(L->ws, WS_PIN, xb->pin_recv[b], (size_t)rn * rb + 1, &pr, err));
            if (stot) MOE_TRY(L->ops->copy(L, (char *)ps + (size_t)sbase * rb, snd,
                                           (size_t)stot * rb, err));
            snd = (char *)ps + (size_t)sbase * rb;
            rcv = (char *)pr + (size_t)rbase * rb;
        }
        x.send[b] = snd;
        x.recv[b] = rcv;
    }
    if (stage) MOE_TRY(L->ops->sync(L, err));
    return s->tp->start(s->tp, &x, req, err);
}

moe_status drv_xfer_start(moe_layer *L, const ep_plan *p, int c, int v, bool back,
                          const drv_bufs *xb, bool overlap, ep_request *req, moe_error *err)
{
    int64_t small[4 * 64] = {0}, *lay = small;
    if (p->N > 64) {
        lay = moe_malloc(4 * (size_t)p->N * sizeof(int64_t), "transfer layout", err);
        if (!lay) return MOE_ERR_NOMEM;
    }
    round_layout(p, c, v, back, lay);
    int64_t sb = ep_round_base(p, c, v, back), rb = ep_round_base(p, c, v, !back);
    int64_t st_ = ep_round_rows(p, c, v, back), rt = ep_round_rows(p, c, v, !back);
    /* staged mirrors sized for every round of the call at its first round */
    const int64_t scap = back ? p->recv_total : p->send_total;
    const int64_t rcap = back ? p->send_total : p->recv_total;
    moe_status st = xfer_with(L, xb, lay, sb, rb, st_, rt, scap, rcap, overlap, req, err);
    if (lay != small) free(lay);
    return st;
}

moe_status drv_xfer_wait(moe_layer *L, const ep_plan *p, int c, int v, bool back,
                         const drv_bufs *xb, ep_request *req, moe_error *err)
{
    ep_state *s = L->ep;
    MOE_TRY(s->tp->wait(s->tp, req, err));
    const bool stage = L->backend == MOE_BACKEND_CUDA && !s->nccl;
    if (!stage) return MOE_OK;
    /* the received rows back onto the device */
    int64_t rb = ep_round_base(p, c, v, !back), rt = ep_round_rows(p, c, v, !back);
    for (int b = 0; b < xb->n && rt; b++) {
        const size_t row = xb->row[b];
        const char *pr = moe_ws_ptr(L->ws, WS_PIN, xb->pin_recv[b]);
        MOE_TRY(L->ops->copy(L, (char *)xb->recv[b] + (size_t)rb * row, pr + (size_t)rb * row,
                             (size_t)rt * row, err));
    }
    return MOE_OK;
}

/* Round v of a sync-free transfer: every peer's slot of rows_per_peer rows (slot (v*N + q) at
 * row (v*N + q) * rows_per_peer of every buffer), on the layer's stream. */
static moe_status xfer_slots(moe_layer *L, const drv_bufs *xb, int v, int64_t rows_per_peer,
                             bool back, ep_request *req, moe_error *err)
{
    ep_state *s = L->ep;
    const int N = s->N;
    int64_t small[4 * 64] = {0}, *lay = small;
    if (N > 64) {
        lay = moe_malloc(4 * (size_t)N * sizeof(int64_t), "slot layout", err);
        if (!lay) return MOE_ERR_NOMEM;
    }
    for (int q = 0; q < N; q++) {
        lay[q] = lay[2 * N + q] = rows_per_peer;
        lay[N + q] = lay[3 * N + q] = (int64_t)q * rows_per_peer;
    }
    (void)back;
    const int64_t base = (int64_t)v * N * rows_per_peer, tot = (int64_t)N * rows_per_peer;
    moe_status st = xfer_with(L, xb, lay, base, base, tot, tot, (int64_t)s->V * tot,
                              (int64_t)s->V * tot, false, req, err);
    if (lay != small) free(lay);
    return st;
}

/* ------------------------------------------------------------------ sized steps ---- */

moe_status drv_plan_sized(moe_layer *L, moe_status st, int C, int T, const int32_t *cb,
                          const void *dcount, ep_plan *plan, moe_error *err)
{
    ep_state *s = L->ep;
    memset(plan, 0, sizeof *plan);
    if (st == MOE_OK) st = L->ops->download(L, s->h_dcount, dcount, (size_t)C * s->G * 4, err);
    if (st == MOE_OK)
        st = ep_plan_from_counts(plan, s->N, L->map.rank, s->V, C, T, cb, s->h_dcount, err);
    st = drv_plan_agree(L, st, plan, err);
    if (st != MOE_OK) return st;
    st = ep_plan_exchange(plan, s->comm->comm, err);
    if (st != MOE_OK) {
        ep_plan_free(plan);
        return drv_fatal(L, st, err);
    }
    return MOE_OK;
}

moe_status drv_plan_agree(moe_layer *L, moe_status st, ep_plan *plan, moe_error *err)
{
    st = ep_agree(L->ep->comm->comm, st, err);
    if (st != MOE_OK) ep_plan_free(plan);
    return st;
}

/* ------------------------------------------------------------------ sync-free steps ---- */

moe_status drv_slots_get(moe_layer *L, drv_slots *b, moe_error *err)
{
    const ep_state *s = L->ep;
    const size_t M = (size_t)s->M, Rc = (size_t)s->Rc, G = (size_t)s->G, slots = G * M;
    const size_t xrow = (size_t)L->H * L->dsz, idrow = (size_t)L->k * 4;
    const size_t wrow = (size_t)L->k * L->dsz;
    MOE_TRY(drv_buf(L, WB_TDEST, M * s->D * 4, &b->tdest, err));
    MOE_TRY(drv_buf(L, WB_TN, M * 4, &b->tn, err));
    MOE_TRY(drv_buf(L, WB_TROW, M * s->D * 4, &b->trow, err));
    MOE_TRY(drv_buf(L, WB_DCOUNT, G * 4, &b->dcount, err));
    MOE_TRY(drv_buf(L, WB_SCNT, G * 4, &b->scnt, err));
    MOE_TRY(drv_buf(L, WB_RCNT, G * 4, &b->rcnt, err));
    MOE_TRY(drv_buf(L, WB_SEND_X, slots * xrow, &b->sx, err));
    MOE_TRY(drv_buf(L, WB_SEND_IDS, slots * idrow, &b->sids, err));
    MOE_TRY(drv_buf(L, WB_SEND_W, slots * wrow, &b->sw, err));
    MOE_TRY(drv_buf(L, WB_BACK, slots * xrow, &b->back, err));
    MOE_TRY(drv_buf(L, WB_RECV_X, slots * xrow, &b->rx, err));
    MOE_TRY(drv_buf(L, WB_RECV_IDS, slots * idrow, &b->rids, err));
    MOE_TRY(drv_buf(L, WB_RECV_W, slots * wrow, &b->rw, err));
    MOE_TRY(drv_buf(L, WB_PART, slots * xrow, &b->part, err));
    MOE_TRY(drv_buf(L, WB_CX, Rc * xrow, &b->cx, err));
    MOE_TRY(drv_buf(L, WB_CIDS, Rc * idrow, &b->cids, err));
    MOE_TRY(drv_buf(L, WB_CW, Rc * wrow, &b->cw, err));
    return drv_buf(L, WB_CPART, Rc * xrow, &b->cpart, err);
}

/* One round of a sync-free transfer, waited for before the next starts: the call is one chunk,
 * there is nothing to overlap it with. */
static moe_status slots_round(moe_layer *L, const drv_bufs *xb, int v, int64_t rows_per_peer,
                              bool back, moe_error *err)
{
    ep_state *s = L->ep;
    MOE_TRY(xfer_slots(L, xb, v, rows_per_peer, back, &s->reqs[0], err));
    return s->tp->wait(s->tp, &s->reqs[0], err);
}

moe_status drv_slots_dispatch(moe_layer *L, const drv_slots *b, const drv_bufs *rows,
                              moe_error *err)
{
    const ep_state *s = L->ep;
    drv_bufs cnt = {.n = 1, .send = {b->scnt}, .recv = {b->rcnt}, .row = {4},
                    .what = {"dispatch slot counts"}};
    for (int v = 0; v < s->V; v++) {
        MOE_TRY(slots_round(L, &cnt, v, 1, false, err));
        MOE_TRY(slots_round(L, rows, v, s->M, false, err));
    }
    return MOE_OK;
}

moe_status drv_slots_combine(moe_layer *L, const drv_bufs *rows, moe_error *err)
{
    for (int v = 0; v < L->ep->V; v++) MOE_TRY(slots_round(L, rows, v, L->ep->M, true, err));
    return MOE_OK;
}

moe_status drv_slots_compact(moe_layer *L, const drv_slots *b, int v, const void *rdout,
                             void *cdout, moe_error *err)
{
    const ep_state *s = L->ep;
    const size_t s0 = (size_t)v * s->N * s->M, xrow = (size_t)L->H * L->dsz;
    const size_t idrow = (size_t)L->k * 4, wrow = (size_t)L->k * L->dsz;
    const int32_t *rc = (const int32_t *)b->rcnt + (size_t)v * s->N;
    return L->ops->ep_compact(L, s->M, rc, (char *)b->rx + s0 * xrow,
                              (const int32_t *)((char *)b->rids + s0 * idrow),
                              (char *)b->rw + s0 * wrow,
                              rdout ? (const char *)rdout + s0 * xrow : NULL, s->Rc, b->cx,
                              b->cids, b->cw, cdout, err);
}

moe_status drv_slots_expand(moe_layer *L, const drv_slots *b, int v, size_t row_bytes,
                            const void *compact, void *slots, moe_error *err)
{
    const ep_state *s = L->ep;
    const size_t s0 = (size_t)v * s->N * s->M;
    const int32_t *rc = (const int32_t *)b->rcnt + (size_t)v * s->N;
    return L->ops->ep_expand(L, s->M, rc, row_bytes, compact, s->Rc,
                             (char *)slots + s0 * row_bytes, err);
}

/* ------------------------------------------------------------------ saved forward state ---- */

struct moe_layer_saved {
    int cap;  /* tokens the buffers hold */
    moe_layer_saved_bufs b;
    bool valid;
    const void *x;
    int T;
    uint64_t call; /* L->calls of the forward that filled them */
};

void drv_saved_free(moe_layer *L)
{
    moe_layer_saved *s = L->saved;
    if (!s) return;
    void *all[] = {s->b.logits, s->b.w, s->b.gemm1_out, s->b.act, s->b.sgu, s->b.sact,
                   s->b.ids, s->b.offsets, s->b.gather};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_mem_free(L->backend, L->device, all[i]);
    free(s);
    L->saved = NULL;
}

bool drv_saved_bufs(moe_layer *L, int T, moe_layer_saved_bufs *b)
{
    if (!L->save_for_backward || !L->plain) return false;
    moe_layer_saved *s = L->saved;
    if (s && s->cap >= T) {
        s->valid = false; /* being overwritten */
        *b = s->b;
        return true;
    }
    drv_saved_free(L);
    moe_error e;
    moe_error_clear(&e);
    s = calloc(1, sizeof *s);
    if (!s) return false;
    L->saved = s;
    int cap = T > L->max_tokens ? T : (int)L->max_tokens;
    if (cap < 1) cap = 1;
    const size_t t = (size_t)cap, tk = t * L->k, d = L->dsz;
    struct {
        void **p;
        size_t bytes;
    } need[] = {
        {&s->b.logits, t * L->E * d}, {&s->b.w, tk * d}, {&s->b.gemm1_out, tk * 2 * L->I * d},
        {&s->b.act, tk * L->I * d}, {(void **)&s->b.ids, tk * 4},
        {(void **)&s->b.offsets, ((size_t)L->E + 1) * 4}, {(void **)&s->b.gather, tk * 4},
        {&s->b.sgu, L->shared ? t * 2 * L->Is * d : 0}, {&s->b.sact, L->shared ? t * L->Is * d : 0},
    };
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) {
        if (!need[i].bytes) continue;
        if (moe_mem_alloc(L->backend, L->device, need[i].bytes, "saved forward state", need[i].p,
                          &e) != MOE_OK) {
            /* no room to keep it: the backward recomputes instead */
            moe_warn("save_for_backward: %s; the backward will recompute", e.msg);
            drv_saved_free(L);
            return false;
        }
    }
    s->cap = cap;
    *b = s->b;
    return true;
}

void drv_saved_commit(moe_layer *L, const void *x, int T)
{
    moe_layer_saved *s = L->saved;
    if (!s) return;
    s->valid = true;
    s->x = x;
    s->T = T;
    s->call = L->calls;
}

void drv_saved_forget(moe_layer *L)
{
    if (L->saved) L->saved->valid = false;
}

bool drv_saved_match(moe_layer *L, const void *x, int T, moe_layer_saved_bufs *b)
{
    moe_layer_saved *s = L->saved;
    if (!s || !s->valid || s->x != x || s->T != T || s->call != L->calls) return false;
    *b = s->b;
    return true;
}
