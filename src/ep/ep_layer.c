/* ep_layer.c — the EP context and the forward/backward drivers around the local fused path:
 * route, plan, counts exchange, the chunked dispatch -> experts -> combine pipeline, and the
 * receiver's expert computation (forward and backward) on the CPU backend. */
#include "ep_internal.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "../cpu/cpu_fused.h"
#include "../dtype.h"

/* ------------------------------------------------------------------ workspace ---- */

static moe_status buf_need(ep_workspace *ws, ep_buf_id id, size_t bytes, bool fixed,
                           moe_error *err)
{
    if (bytes <= ws->cap[id] && ws->p[id]) return MOE_OK;
    if (fixed)
        return moe_fail(err, MOE_ERR_INTERNAL,
                        "EP buffer %d needs %zu bytes but was sized %zu in advance", (int)id,
                        bytes, ws->cap[id]);
    free(ws->p[id]);
    ws->p[id] = moe_malloc(bytes ? bytes : 1, "EP buffer", err);
    ws->cap[id] = ws->p[id] ? bytes : 0;
    return ws->p[id] ? MOE_OK : MOE_ERR_NOMEM;
}

moe_status ep_ws_reserve(ep_workspace *ws, const moe_ep_ctx *ctx, int64_t T, int64_t S,
                         int64_t R, int64_t Rmax, bool backward, moe_error *err)
{
    size_t d = ctx->dsz, H = (size_t)ctx->H, I = (size_t)ctx->I, k = (size_t)ctx->k;
    size_t E = (size_t)ctx->E, Is = (size_t)ctx->Is;
    size_t t = (size_t)T, s = (size_t)S, r = (size_t)R, rk = (size_t)Rmax * k;
    /* Forward buffers may be fixed (sync-free); backward's always grow as needed. */
    bool fx = ws->fixed && !backward;
    struct {
        ep_buf_id id;
        size_t bytes;
        bool bwd_only;
    } need[] = {
        /* source side: T tokens */
        {EPB_LOGITS, t * E * d, false},     {EPB_IDS, t * k * 4, false},
        {EPB_W, t * k * d, false},          {EPB_SHARED_GU, t * 2 * Is * d, false},
        {EPB_SHARED_H, t * Is * d, false},  {EPB_SHARED_OUT, t * H * d, false},
        /* dispatch out / combine back: S rows */
        {EPB_SEND_X, s * H * d, false},     {EPB_SEND_IDS, s * k * 4, false},
        {EPB_SEND_W, s * k * d, false},     {EPB_BACK, s * H * d, false},
        {EPB_SEND_DOUT, s * H * d, true},   {EPB_BACK_DW, s * k * 4, true},
        /* dispatch in / combine out: R rows */
        {EPB_RECV_X, r * H * d, false},     {EPB_RECV_IDS, r * k * 4, false},
        {EPB_RECV_W, r * k * d, false},     {EPB_PART, r * H * d, false},
        {EPB_RECV_DOUT, r * H * d, true},   {EPB_PART_DW, r * k * 4, true},
        /* the receiver's expert-order scratch: Rmax*k rows of one round */
        {EPB_GATHER, rk * 4, false},        {EPB_COUNTS, E * 4, false},
        {EPB_OFFSETS, (E + 1) * 4, false},  {EPB_ACT, rk * I * d, false},
        {EPB_ROWS, rk * H * d, false},      {EPB_GU, rk * 2 * I * d, true},
        {EPB_DGU, rk * 2 * I * d, true},    {EPB_DACT, rk * I * d, true},
        {EPB_DA0, rk * I * d, true},        {EPB_DTOP, rk * 4, true},
    };
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) {
        if (need[i].bwd_only && !backward) continue;
        MOE_TRY(buf_need(ws, need[i].id, need[i].bytes, fx, err));
    }
    return MOE_OK;
}

void ep_ws_free(ep_workspace *ws)
{
    for (int i = 0; i < EPB_COUNT_; i++) free(ws->p[i]);
    memset(ws, 0, sizeof *ws);
}

/* ------------------------------------------------------------------ errors ---- */

moe_status ep_fatal(moe_ep_ctx *ctx, moe_status st, moe_error *err)
{
    moe_warn("rank %d: fatal expert-parallel error (%s): %s", ctx->rank, moe_strerror(st),
             err && err->msg[0] ? err->msg : "(no message)");
    if (ctx->opts.abort_on_fatal) {
        /* The other ranks may be blocked in a collective waiting for this one: only ending
         * the job releases them. */
        MPI_Abort(ctx->comm, 1 + (int)st);
    }
    return st;
}

#define FATAL_TRY(call)                                                                   \
    do {                                                                                  \
        moe_status fst_ = (call);                                                         \
        if (fst_ != MOE_OK) return ep_fatal(ctx, fst_, err);                              \
    } while (0)

/* ------------------------------------------------------------------ context ---- */

static bool forced(const moe_ep_ctx *ctx) { return ctx->opts.route.mode != MOE_EP_ROUTE_ROUTER; }

static moe_status check_tensor(const moe_tensor *t, const char *name, moe_dtype dt, int ndim,
                               int64_t d0, int64_t d1, int64_t d2, moe_error *err)
{
    int64_t want[3] = {d0, d1, d2};
    bool ok = t->data && t->dtype == dt && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == want[i];
    if (ok) return MOE_OK;
    char a[64], b[64];
    moe_shape_str(ndim, want, a, sizeof a);
    moe_shape_str(t->ndim, t->shape, b, sizeof b);
    return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: expected %s %s, got %s %s%s", name,
                    moe_dtype_name(dt), a, moe_dtype_name(t->dtype) ? moe_dtype_name(t->dtype) : "?",
                    b, t->data ? "" : " (no data)");
}

/* The weights (or gradients) of one rank's slice have the shapes the config says. */
static moe_status check_slice(const moe_ep_ctx *ctx, const moe_weights *w, const char *what,
                              moe_error *err)
{
    char n[96];
    int El = ctx->E / ctx->nranks;
    moe_dtype dt = ctx->dt;
    snprintf(n, sizeof n, "%s router", what);
    MOE_TRY(check_tensor(&w->router, n, dt, 2, ctx->E, ctx->H, 0, err));
    snprintf(n, sizeof n, "%s w13", what);
    MOE_TRY(check_tensor(&w->w13, n, dt, 3, El, 2 * (int64_t)ctx->I, ctx->H, err));
    snprintf(n, sizeof n, "%s w2", what);
    MOE_TRY(check_tensor(&w->w2, n, dt, 3, El, ctx->H, ctx->I, err));
    if (ctx->Is > 0) {
        snprintf(n, sizeof n, "%s shared_gate", what);
        MOE_TRY(check_tensor(&w->shared_gate, n, dt, 2, ctx->Is, ctx->H, 0, err));
        snprintf(n, sizeof n, "%s shared_up", what);
        MOE_TRY(check_tensor(&w->shared_up, n, dt, 2, ctx->Is, ctx->H, 0, err));
        snprintf(n, sizeof n, "%s shared_down", what);
        MOE_TRY(check_tensor(&w->shared_down, n, dt, 2, ctx->H, ctx->Is, 0, err));
    }
    return MOE_OK;
}

/* Local validation of everything ctx creation is given. */
static moe_status ctx_check_local(moe_ep_ctx *ctx, const moe_weights *w, moe_error *err)
{
    if (!w) return moe_fail(err, MOE_ERR_INVALID_ARG, "EP context: weights is NULL");
    MOE_TRY(moe_config_validate(&w->cfg, err));
    const moe_ep_options *o = &ctx->opts;
    if (o->virtual_ranks < 1 || o->virtual_ranks > 4096)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "--ep-virtual %d: expected 1..4096",
                        o->virtual_ranks);
    if (o->chunks < 1 || o->chunks > 4096)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "--chunks %d: expected 1..4096", o->chunks);
    if (o->max_tokens_per_rank < 0 || o->max_recv_tokens < 0 ||
        (o->max_recv_tokens > 0 && o->max_tokens_per_rank == 0))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "max_tokens_per_rank=%lld, max_recv_tokens=%lld: both >= 0, and the "
                        "receive bound needs max_tokens_per_rank",
                        (long long)o->max_tokens_per_rank, (long long)o->max_recv_tokens);
    if (!moe_dtype_is_float(w->dtype) || w->dtype == MOE_DTYPE_F64 ||
        w->dtype == MOE_DTYPE_F8_E4M3)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "EP: activation dtype %s (bf16, fp16, fp32)",
                        moe_dtype_name(w->dtype) ? moe_dtype_name(w->dtype) : "?");
    const moe_config *c = &w->cfg;
    int G = ctx->nranks * o->virtual_ranks;
    if (o->virtual_ranks > 1) {
        /* The message speaks of all G virtual ranks: that is what must divide E. */
        moe_error sub;
        moe_error_clear(&sub);
        if (moe_ep_expert_range(c->num_experts, G, 0, NULL, NULL, &sub) != MOE_OK)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "%s (%d ranks x --ep-virtual %d = %d virtual ranks)", sub.msg,
                            ctx->nranks, o->virtual_ranks, G);
    }
    int b = 0, n = 0;
    MOE_TRY(moe_ep_expert_range(c->num_experts, ctx->nranks, ctx->rank, &b, &n, err));
    if (w->expert_begin != b || w->expert_count != n)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "rank %d of %d owns experts [%d, %d) but the weights hold [%d, %d)",
                        ctx->rank, ctx->nranks, b, b + n, w->expert_begin,
                        w->expert_begin + w->expert_count);
    MOE_TRY(check_slice(ctx, w, "weights", err));
    const moe_ep_route *r = &o->route;
    if ((int)r->mode < MOE_EP_ROUTE_ROUTER || r->mode > MOE_EP_ROUTE_FILE)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "routing mode %d", (int)r->mode);
    if (r->mode == MOE_EP_ROUTE_ALL_TO_ONE && (r->target < 0 || r->target >= G))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "--route all-to-one:%d: target must be a (virtual) rank in [0, %d)",
                        r->target, G);
    if (r->mode == MOE_EP_ROUTE_FILE) {
        if (!r->ids || r->rows < 1)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "--route file: empty table");
        size_t n_ids = (size_t)r->rows * (size_t)c->top_k;
        for (size_t i = 0; i < n_ids; i++)
            if (r->ids[i] < 0 || r->ids[i] >= c->num_experts)
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "--route file: row %zu has expert %d outside [0, %d)",
                                i / (size_t)c->top_k, r->ids[i], c->num_experts);
        ctx->route_ids = moe_malloc(n_ids * sizeof(int32_t), "routing table", err);
        if (!ctx->route_ids) return MOE_ERR_NOMEM;
        memcpy(ctx->route_ids, r->ids, n_ids * sizeof(int32_t));
        ctx->opts.route.ids = ctx->route_ids;
    }
    if (o->transport != MOE_EP_TRANSPORT_AUTO && o->transport != MOE_EP_TRANSPORT_MPI &&
        o->transport != MOE_EP_TRANSPORT_NCCL)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "transport %d", (int)o->transport);
    return MOE_OK;
}

/* Every rank must run with the same shape and options, or the collectives would not match. */
static moe_status ctx_check_same(moe_ep_ctx *ctx, moe_error *err)
{
    const moe_ep_options *o = &ctx->opts;
    int64_t v[10] = {ctx->E, ctx->H, ctx->I, ctx->k, ctx->Is, ctx->dt, o->virtual_ranks,
                     o->chunks, o->max_tokens_per_rank, (int64_t)o->route.mode * 4096 +
                                                        (int64_t)o->transport};
    static const char *names[10] = {"E", "H", "I", "top_k", "shared width", "dtype",
                                    "--ep-virtual", "--chunks", "max_tokens_per_rank",
                                    "routing mode / transport"};
    int64_t lo[10], hi[10];
    int rc = MPI_Allreduce(v, lo, 10, MPI_INT64_T, MPI_MIN, ctx->comm);
    if (rc == MPI_SUCCESS) rc = MPI_Allreduce(v, hi, 10, MPI_INT64_T, MPI_MAX, ctx->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, ctx->rank, "MPI_Allreduce (options)");
    for (int i = 0; i < 10; i++)
        if (lo[i] != hi[i])
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "ranks disagree on %s (from %lld to %lld): every rank must use the "
                            "same model and EP options",
                            names[i], (long long)lo[i], (long long)hi[i]);
    return MOE_OK;
}

void moe_ep_ctx_destroy(moe_ep_ctx *ctx)
{
    if (!ctx) return;
    if (ctx->tp) ctx->tp->destroy(ctx->tp);
    ep_ws_free(&ctx->ws);
    free(ctx->route_ids);
    free(ctx->shared_w13);
    moe_ep_stats_free(&ctx->total);
    moe_ep_stats_free(&ctx->call);
    if (ctx->comm != MPI_COMM_NULL) MPI_Comm_free(&ctx->comm);
    free(ctx);
}

moe_status moe_ep_ctx_create(MPI_Comm comm, const moe_weights *w, const moe_ep_options *opts,
                             moe_ep_ctx **out, moe_error *err)
{
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "EP context: out is NULL");
    *out = NULL;
    MPI_Comm dup = MPI_COMM_NULL;
    int rc = MPI_Comm_dup(comm, &dup);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, -1, "MPI_Comm_dup");
    /* Our collectives report errors instead of aborting inside MPI, so the message can say
     * which rank and why (and ep_fatal decides about aborting). */
    rc = MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
    moe_ep_ctx *ctx = calloc(1, sizeof *ctx);
    if (rc != MPI_SUCCESS || !ctx) {
        moe_status st = ctx ? ep_mpi_fail(err, rc, -1, "MPI_Comm_set_errhandler")
                            : moe_fail(err, MOE_ERR_NOMEM, "EP context");
        free(ctx);
        MPI_Comm_free(&dup);
        return st;
    }
    ctx->comm = dup;
    MPI_Comm_rank(dup, &ctx->rank);
    MPI_Comm_size(dup, &ctx->nranks);
    moe_ep_options defaults = MOE_EP_OPTIONS_INIT;
    ctx->opts = opts ? *opts : defaults;
    ctx->w = w;
    moe_status st = MOE_OK;
    if (w) {
        ctx->cfg = w->cfg;
        ctx->dt = w->dtype;
        ctx->dsz = moe_dtype_size(w->dtype);
        ctx->H = w->cfg.hidden;
        ctx->I = w->cfg.inter;
        ctx->E = w->cfg.num_experts;
        ctx->k = w->cfg.top_k;
        ctx->Is = w->cfg.arch == MOE_ARCH_LLAMA4 ? w->cfg.shared_inter : 0;
    }
    ctx->V = ctx->opts.virtual_ranks;
    ctx->C = ctx->opts.chunks;
    st = ctx_check_local(ctx, w, err);
    /* Agree before the options check: a rank with bad weights must not reach a collective the
     * others are not in. */
    st = ep_agree(ctx->comm, st, err);
    if (st == MOE_OK) st = ep_agree(ctx->comm, ctx_check_same(ctx, err), err);
    if (st != MOE_OK) {
        moe_ep_ctx_destroy(ctx);
        return st;
    }
    ctx->G = ctx->nranks * ctx->V;
    ctx->epv = ctx->E / ctx->G;
    ctx->plain = ctx->nranks == 1 && ctx->V == 1 && !forced(ctx);

    /* Transport: this context works on host memory, so "auto" is MPI; NCCL on request stages
     * the host buffers through this rank's GPU. */
    if (ctx->opts.transport == MOE_EP_TRANSPORT_NCCL) {
        st = ep_transport_nccl_create(ctx->comm, ctx->opts.device, true, &ctx->tp, err);
    } else {
        st = ep_transport_mpi_create(ctx->comm, &ctx->tp, err);
    }
    st = ep_agree(ctx->comm, st, err);

    if (st == MOE_OK) st = moe_ep_stats_init(&ctx->total, ctx->nranks, ctx->rank, ctx->V, err);
    if (st == MOE_OK) st = moe_ep_stats_init(&ctx->call, ctx->nranks, ctx->rank, ctx->V, err);
    if (st == MOE_OK) {
        ctx->call.timeline = moe_calloc((size_t)ctx->C, sizeof *ctx->call.timeline,
                                        "EP timeline", err);
        if (!ctx->call.timeline) st = MOE_ERR_NOMEM;
        else ctx->call.timeline_cap = ctx->C;
    }
    if (st == MOE_OK) {
        const char *tn = ctx->plain ? "none" : ctx->tp->name;
        snprintf(ctx->total.transport, sizeof ctx->total.transport, "%s", tn);
        snprintf(ctx->call.transport, sizeof ctx->call.transport, "%s", tn);
        ctx->total.weight_bytes_read = ctx->call.weight_bytes_read = w->bytes_read;
        ctx->total.weight_bytes_held = ctx->call.weight_bytes_held =
            (uint64_t)(w->w13.nbytes + w->w2.nbytes);
    }
    if (st == MOE_OK && ctx->Is > 0) {
        /* gate rows then up rows, like a routed expert's w13, so one grouped GEMM with the
         * SiLU-and-mul epilogue runs the shared expert's first half. */
        size_t half = (size_t)ctx->Is * ctx->H * ctx->dsz;
        ctx->shared_w13 = moe_malloc(2 * half, "shared expert gate|up", err);
        if (!ctx->shared_w13) st = MOE_ERR_NOMEM;
        else {
            memcpy(ctx->shared_w13, w->shared_gate.data, half);
            memcpy((char *)ctx->shared_w13 + half, w->shared_up.data, half);
        }
    }
    if (st == MOE_OK && ctx->opts.max_tokens_per_rank > 0 && !ctx->plain) {
        /* Sync-free: every forward buffer exists before the first call. */
        int64_t M = ctx->opts.max_tokens_per_rank;
        moe_ep_buffer_sizes bs;
        st = moe_ep_buffer_sizes_for(M, ctx->opts.max_recv_tokens, ctx->nranks, ctx->V,
                                     &ctx->cfg, ctx->dt, false, &bs, err);
        if (st == MOE_OK)
            st = ep_ws_reserve(&ctx->ws, ctx, M, bs.send_rows, bs.recv_rows, bs.recv_rows, false,
                               err);
        if (st == MOE_OK) {
            ctx->ws.fixed = true;
            ctx->opts.max_recv_tokens = bs.recv_rows;
        }
    }
    st = ep_agree(ctx->comm, st, err);
    if (st != MOE_OK) {
        moe_ep_ctx_destroy(ctx);
        return st;
    }
    *out = ctx;
    return MOE_OK;
}

const moe_ep_stats *moe_ep_ctx_stats(const moe_ep_ctx *ctx) { return &ctx->total; }
void moe_ep_ctx_reset_stats(moe_ep_ctx *ctx) { moe_ep_stats_reset(&ctx->total); }
int moe_ep_ctx_rank(const moe_ep_ctx *ctx) { return ctx->rank; }
int moe_ep_ctx_nranks(const moe_ep_ctx *ctx) { return ctx->nranks; }

/* ------------------------------------------------------------------ weights ---- */

static moe_status weights_range(MPI_Comm comm, const moe_config *cfg, int V, int *b, int *n,
                                moe_error *err)
{
    int rank = 0, N = 1;
    int rc = MPI_Comm_rank(comm, &rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm, &N);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, -1, "MPI_Comm_rank/size");
    if (!cfg) return moe_fail(err, MOE_ERR_INVALID_ARG, "EP weights: config is NULL");
    if (V < 1) return moe_fail(err, MOE_ERR_INVALID_ARG, "--ep-virtual %d", V);
    MOE_TRY(moe_ep_expert_range(cfg->num_experts, N * V, 0, NULL, NULL, err));
    return moe_ep_expert_range(cfg->num_experts, N, rank, b, n, err);
}

moe_status moe_ep_weights_load(MPI_Comm comm, const moe_config *cfg, const char *path, int layer,
                               int virtual_ranks, moe_dtype dtype, moe_weights *w, moe_error *err)
{
    int b = 0, n = 0;
    moe_status st = weights_range(comm, cfg, virtual_ranks, &b, &n, err);
    if (st == MOE_OK) st = moe_weights_load(cfg, path, layer, b, n, dtype, w, err);
    /* Agree so no rank goes on to build a context while another has no weights. */
    moe_status all = ep_agree(comm, st, err);
    if (all != MOE_OK && st == MOE_OK) moe_weights_free(w);
    return all;
}

moe_status moe_ep_weights_random(MPI_Comm comm, const moe_config *cfg, uint64_t seed,
                                 int virtual_ranks, moe_dtype dtype, moe_weights *w,
                                 moe_error *err)
{
    int b = 0, n = 0;
    moe_status st = weights_range(comm, cfg, virtual_ranks, &b, &n, err);
    if (st == MOE_OK) st = moe_weights_random(cfg, seed, b, n, dtype, w, err);
    moe_status all = ep_agree(comm, st, err);
    if (all != MOE_OK && st == MOE_OK) moe_weights_free(w);
    return all;
}

/* ------------------------------------------------------------------ local compute ---- */

static const char *w13_of(const moe_ep_ctx *ctx, int e0)
{
    return (const char *)ctx->w->w13.data +
           (size_t)(e0 - ctx->w->expert_begin) * 2 * ctx->I * ctx->H * ctx->dsz;
}
static const char *w2_of(const moe_ep_ctx *ctx, int e0)
{
    return (const char *)ctx->w->w2.data +
           (size_t)(e0 - ctx->w->expert_begin) * ctx->H * ctx->I * ctx->dsz;
}

/* Grouped-GEMM arguments over the slice's experts for R tokens with k slots. */
static moe_grouped_gemm_args gg(const moe_ep_ctx *ctx, int ne, int R)
{
    moe_grouped_gemm_args g;
    memset(&g, 0, sizeof g);
    g.dtype = ctx->dt;
    g.num_experts = ne;
    g.expert_offsets = ctx->ws.p[EPB_OFFSETS];
    g.topk = ctx->k;
    g.max_rows = R * ctx->k; /* gather_idx holds flat indices below R*k */
    g.gather_idx = ctx->ws.p[EPB_GATHER];
    g.epilogue = MOE_EPI_NONE;
    return g;
}
static moe_grouped_gemm_dw_args gdw(const moe_ep_ctx *ctx, int ne, int R)
{
    moe_grouped_gemm_dw_args g;
    memset(&g, 0, sizeof g);
    g.dtype = ctx->dt;
    g.num_experts = ne;
    g.expert_offsets = ctx->ws.p[EPB_OFFSETS];
    g.topk = ctx->k;
    g.max_rows = R * ctx->k; /* gather_idx holds flat indices below R*k */
    g.gather_idx = ctx->ws.p[EPB_GATHER];
    return g;
}

/* The experts [e0, e0+ne) on R tokens x [R,H] with k id slots each (ids outside the slice
 * ignored) and weights w [R,k]: partial[i] = round(add[i] + sum over slots j of the slot's
 * expert output), in slot order — the fused path's stages on what arrived. Qwen3: the weight
 * multiplies GEMM2's accumulator; Llama-4: the score scales the input of GEMM1. */
static moe_status experts_forward(moe_ep_ctx *ctx, int e0, int ne, int R, const void *x,
                                  const int32_t *ids, const void *w, const void *add,
                                  void *partial, moe_error *err)
{
    if (R == 0) return MOE_OK;
    ep_workspace *ws = &ctx->ws;
    int k = ctx->k, H = ctx->H, I = ctx->I;
    bool llama = ctx->cfg.arch == MOE_ARCH_LLAMA4;
    int M = cpu_sort_by_expert(R, k, ids, e0, ne, ws->p[EPB_COUNTS], ws->p[EPB_OFFSETS],
                               ws->p[EPB_GATHER]);
    ctx->call.tokens_computed += (uint64_t)R;
    ctx->call.expert_rows += (uint64_t)M;
    void *rows = ws->p[EPB_ROWS];
    /* Slots owned elsewhere are never written by GEMM2: they must read as zeros. */
    memset(rows, 0, (size_t)R * k * H * ctx->dsz);
    if (M > 0) {
        moe_grouped_gemm_args g1 = gg(ctx, ne, R);
        g1.N = 2 * I;
        g1.K = H;
        g1.A = x;
        g1.B = w13_of(ctx, e0);
        g1.C = ws->p[EPB_ACT];
        g1.permute_x = true;
        g1.scale_a_rows = llama ? w : NULL;
        g1.epilogue = MOE_EPI_SILU_MUL;
        MOE_TRY(cpu_grouped_gemm(&g1, err));
        moe_grouped_gemm_args g2 = gg(ctx, ne, R);
        g2.N = H;
        g2.K = I;
        g2.A = ws->p[EPB_ACT];
        g2.B = w2_of(ctx, e0);
        g2.C = rows;
        g2.permute_y = true;
        g2.scale_c_rows = llama ? NULL : w;
        MOE_TRY(cpu_grouped_gemm(&g2, err));
    }
    cpu_sum_topk(ctx->dt, R, k, H, rows, NULL, add, partial);
    return MOE_OK;
}

/* Backward of experts_forward for the loss sum(partial * dout), with the fused path's own
 * backward stages: the slice's weight gradients dW13 [ne,2I,H] and dW2 [ne,H,I] (overwritten;
 * exact zeros for experts with no rows), the partial input gradient dxp [R,H] (summed over the
 * slots, Llama-4's score applied) and the fp32 d-weights dwp [R,k] (0 for slots owned
 * elsewhere). */
static moe_status experts_backward(moe_ep_ctx *ctx, int e0, int ne, int R, const void *x,
                                   const void *dout, const int32_t *ids, const void *w,
                                   void *dW13, void *dW2, void *dxp, float *dwp, moe_error *err)
{
    ep_workspace *ws = &ctx->ws;
    moe_dtype dt = ctx->dt;
    size_t dsz = ctx->dsz;
    int k = ctx->k, H = ctx->H, I = ctx->I;
    bool llama = ctx->cfg.arch == MOE_ARCH_LLAMA4;
    size_t w13_bytes = (size_t)ne * 2 * I * H * dsz, w2_bytes = (size_t)ne * H * I * dsz;
    if (R == 0) {
        memset(dW13, 0, w13_bytes);
        memset(dW2, 0, w2_bytes);
        return MOE_OK;
    }
    int32_t *gather = ws->p[EPB_GATHER];
    int M = cpu_sort_by_expert(R, k, ids, e0, ne, ws->p[EPB_COUNTS], ws->p[EPB_OFFSETS], gather);
    ctx->call.tokens_computed += (uint64_t)R;
    ctx->call.expert_rows += (uint64_t)M;
    float *dtop = ws->p[EPB_DTOP];
    memset(dtop, 0, (size_t)R * k * sizeof(float));
    if (M == 0) {
        memset(dW13, 0, w13_bytes);
        memset(dW2, 0, w2_bytes);
        memset(dxp, 0, (size_t)R * H * dsz);
        memcpy(dwp, dtop, (size_t)R * k * sizeof(float));
        return MOE_OK;
    }
    void *gu = ws->p[EPB_GU], *act = ws->p[EPB_ACT], *rows = ws->p[EPB_ROWS];
    void *dA0 = ws->p[EPB_DA0], *dact = ws->p[EPB_DACT], *dgu = ws->p[EPB_DGU];

    /* Forward again, keeping GEMM1's output (the SiLU-and-mul backward needs it). */
    moe_grouped_gemm_args g = gg(ctx, ne, R);
    g.N = 2 * I;
    g.K = H;
    g.A = x;
    g.B = w13_of(ctx, e0);
    g.C = act;
    g.C_preact = gu;
    g.permute_x = true;
    g.scale_a_rows = llama ? w : NULL;
    g.epilogue = MOE_EPI_SILU_MUL;
    MOE_TRY(cpu_grouped_gemm(&g, err));

    /* dA0 [M,I] = dout[token of r] @ W2_e (W2_e [H,I] read as [K,N]). */
    g = gg(ctx, ne, R);
    g.N = I;
    g.K = H;
    g.A = dout;
    g.permute_x = true;
    g.B = w2_of(ctx, e0);
    g.b_kn = true;
    g.C = dA0;
    MOE_TRY(cpu_grouped_gemm(&g, err));
    /* Qwen3: the weight multiplied GEMM2's output: d w = <act, dA0>, d act = w dA0. */
    const void *dact_in = dA0;
    if (!llama) {
        cpu_topk_weight_backward(dt, M, I, gather, act, dA0, w, dtop, dact);
        dact_in = dact;
    }
    /* dW2_e [H,I] = sum_r (w dout)^T act_r. */
    moe_grouped_gemm_dw_args d = gdw(ctx, ne, R);
    d.N = H;
    d.K = I;
    d.dY = dout;
    d.permute_dy = true;
    d.scale_dy_rows = llama ? NULL : w;
    d.X = act;
    d.dW = dW2;
    MOE_TRY(cpu_grouped_gemm_dw(&d, err));

    cpu_silu_mul_backward(dt, M, I, gu, dact_in, dgu);

    /* d xs [R*k, H] flat = dgu @ W13_e (W13_e [2I,H] read as [K,N]); unowned slots stay 0. */
    memset(rows, 0, (size_t)R * k * H * dsz);
    g = gg(ctx, ne, R);
    g.N = H;
    g.K = 2 * I;
    g.A = dgu;
    g.B = w13_of(ctx, e0);
    g.b_kn = true;
    g.C = rows;
    g.permute_y = true;
    MOE_TRY(cpu_grouped_gemm(&g, err));

    /* dW13_e [2I,H] = sum_r dgu_r^T xs_r (Llama-4: the scaled, rounded x * s). */
    d = gdw(ctx, ne, R);
    d.N = 2 * I;
    d.K = H;
    d.dY = dgu;
    d.X = x;
    d.permute_x = true;
    d.scale_x_rows = llama ? w : NULL;
    d.dW = dW13;
    MOE_TRY(cpu_grouped_gemm_dw(&d, err));

    /* Llama-4: d score = <d xs, x> (zero rows give zero for slots owned elsewhere). */
    if (llama) cpu_scale_input_backward(dt, R, k, H, x, rows, dtop);
    memcpy(dwp, dtop, (size_t)R * k * sizeof(float));
    cpu_sum_topk(dt, R, k, H, rows, llama ? w : NULL, NULL, dxp);
    return MOE_OK;
}

/* Llama-4's shared expert on this rank's own tokens, as the fused path runs it (one-group
 * GEMMs, gate|up stacked): gu [T,2Is] (rounded GEMM output), act [T,Is] and out [T,H]. */
static moe_status shared_forward(moe_ep_ctx *ctx, int T, const void *x, void *gu, void *act,
                                 void *out, moe_error *err)
{
    if (T == 0 || ctx->Is == 0) return MOE_OK;
    int32_t offs[2] = {0, T};
    moe_grouped_gemm_args g;
    memset(&g, 0, sizeof g);
    g.dtype = ctx->dt;
    g.num_experts = 1;
    g.expert_offsets = offs;
    g.N = 2 * ctx->Is;
    g.K = ctx->H;
    g.max_rows = T;
    g.topk = 1;
    g.A = x;
    g.B = ctx->shared_w13;
    g.C = act;
    g.C_preact = gu;
    g.epilogue = MOE_EPI_SILU_MUL;
    MOE_TRY(cpu_grouped_gemm(&g, err));
    memset(&g, 0, sizeof g);
    g.dtype = ctx->dt;
    g.num_experts = 1;
    g.expert_offsets = offs;
    g.N = ctx->H;
    g.K = ctx->Is;
    g.max_rows = T;
    g.topk = 1;
    g.A = act;
    g.B = ctx->w->shared_down.data;
    g.C = out;
    g.epilogue = MOE_EPI_NONE;
    return cpu_grouped_gemm(&g, err);
}

/* ------------------------------------------------------------------ routing ---- */

static moe_status route_tokens(moe_ep_ctx *ctx, int T, const void *x, int64_t g0, void *logits,
                               int32_t *ids, void *w, moe_error *err)
{
    if (T == 0) return MOE_OK;
    MOE_TRY(cpu_router_logits(ctx->dt, T, ctx->H, ctx->E, x, ctx->w->router.data, logits, err));
    if (!forced(ctx)) return cpu_route_topk(&ctx->cfg, ctx->dt, T, logits, ids, w, err);
    MOE_TRY(moe_ep_route_ids(&ctx->opts.route, ctx->E, ctx->k, ctx->G, g0, T, ids, err));
    ep_route_weights(&ctx->cfg, ctx->dt, ctx->opts.route.weights, T, logits, ids, w);
    return MOE_OK;
}

/* Global index of this rank's first token (ranks' batches concatenated in rank order). */
static moe_status global_offset(moe_ep_ctx *ctx, int T, int64_t *g0, moe_error *err)
{
    *g0 = 0;
    if (ctx->nranks == 1) return MOE_OK;
    int64_t t = T, r = 0;
    int rc = MPI_Exscan(&t, &r, 1, MPI_INT64_T, MPI_SUM, ctx->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, ctx->rank, "MPI_Exscan (token offset)");
    *g0 = ctx->rank == 0 ? 0 : r; /* MPI leaves rank 0's result undefined */
    return MOE_OK;
}

/* ------------------------------------------------------------------ the plain path ---- */

typedef struct fwd_bufs {
    moe_fwd_state st;
    void *own[12];
    int n;
} fwd_bufs;

static void *fb_alloc(fwd_bufs *b, size_t bytes, moe_error *err)
{
    void *p = moe_malloc(bytes, "fused path intermediate", err);
    if (p) b->own[b->n++] = p;
    return p;
}

static void fb_free(fwd_bufs *b)
{
    for (int i = 0; i < b->n; i++) free(b->own[i]);
    b->n = 0;
}

/* The fused path's state for T tokens; logits/ids/out are the caller's when given. */
static moe_status fb_make(moe_ep_ctx *ctx, int T, bool backward, void *out, void *logits,
                          int32_t *ids, fwd_bufs *b, moe_error *err)
{
    memset(b, 0, sizeof *b);
    size_t d = ctx->dsz, t = (size_t)T, k = (size_t)ctx->k, E = (size_t)ctx->E;
    size_t H = (size_t)ctx->H, I = (size_t)ctx->I;
    moe_fwd_state *s = &b->st;
    s->T = T;
    bool ok = true;
#define FB(field, bytes)                                                                  \
    do {                                                                                  \
        if (ok) {                                                                         \
            s->field = fb_alloc(b, (bytes), err);                                         \
            ok = s->field != NULL;                                                        \
        }                                                                                 \
    } while (0)
    if (logits) s->router_logits = logits;
    else FB(router_logits, t * E * d);
    if (ids) s->topk_ids = ids;
    else FB(topk_ids, t * k * 4);
    FB(topk_w, t * k * d);
    FB(token_counts, E * 4);
    FB(expert_offsets, (E + 1) * 4);
    FB(gather_idx, t * k * 4);
    if (backward) FB(gemm1_out, t * k * 2 * I * d);
    FB(act, t * k * I * d);
    FB(gemm2_out, t * k * H * d);
    if (ctx->Is > 0) FB(shared_out, t * H * d);
    if (out) s->out = out;
    else FB(out, t * H * d);
#undef FB
    if (!ok) {
        fb_free(b);
        return MOE_ERR_NOMEM;
    }
    return MOE_OK;
}

/* ------------------------------------------------------------------ drivers ---- */

static void call_begin(moe_ep_ctx *ctx)
{
    moe_ep_stats_reset(&ctx->call);
}

static void call_end(moe_ep_ctx *ctx, moe_ep_stats *user, double t0)
{
    ctx->call.seconds = moe_now() - t0;
    moe_ep_stats_add(&ctx->total, &ctx->call);
    if (user) moe_ep_stats_add(user, &ctx->call);
}

static moe_status check_call(const moe_ep_ctx *ctx, const char *fn, int T, const void *x,
                             const void *a, const char *aname, const void *b, const char *bname,
                             moe_error *err)
{
    if (T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T_local=%d is negative", fn, T);
    if (T > 0 && (!x || !a || (bname && !b)))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: %d tokens but %s is NULL", fn, T,
                        !x ? "x" : !a ? aname : bname);
    if ((int64_t)T * ctx->k > INT_MAX / 2)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T_local=%d: T*k too large", fn, T);
    if (ctx->opts.max_tokens_per_rank > 0 && T > ctx->opts.max_tokens_per_rank)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: %d local tokens exceed max_tokens_per_rank=%lld (buffers are sized "
                        "for it in advance)",
                        fn, T, (long long)ctx->opts.max_tokens_per_rank);
    return MOE_OK;
}

moe_status moe_ep_forward(moe_ep_ctx *ctx, int T, const void *x, void *out, void *router_logits,
                          int32_t *topk_ids, moe_ep_stats *stats, moe_error *err)
{
    if (!ctx) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_forward: ctx is NULL");
    double t0 = moe_now();
    call_begin(ctx);
    moe_status st = check_call(ctx, "moe_ep_forward", T, x, out, "out", NULL, NULL, err);
    if (!ctx->plain) st = ep_agree(ctx->comm, st, err);
    if (st != MOE_OK) return st;
    ctx->call.calls_forward = 1;
    ctx->call.tokens_local = (uint64_t)T;

    if (ctx->plain) {
        /* N = 1, V = 1, router's own routing: the fused path itself. */
        if (T > 0) {
            fwd_bufs b;
            MOE_TRY(fb_make(ctx, T, false, out, router_logits, topk_ids, &b, err));
            st = cpu_block_forward(ctx->w, ctx->dt, T, x, &b.st, err);
            ctx->call.expert_rows = (uint64_t)T * ctx->k;
            ctx->call.tokens_computed = (uint64_t)T;
            fb_free(&b);
        }
        call_end(ctx, stats, t0);
        return st;
    }

    /* 1. route locally and plan; everything that can fail locally fails before data moves. */
    int64_t g0 = 0;
    if (forced(ctx)) FATAL_TRY(global_offset(ctx, T, &g0, err));
    ep_plan plan;
    memset(&plan, 0, sizeof plan);
    st = ep_ws_reserve(&ctx->ws, ctx, T, 0, 0, 0, false, err);
    void *logits = router_logits ? router_logits : ctx->ws.p[EPB_LOGITS];
    int32_t *ids = topk_ids ? topk_ids : ctx->ws.p[EPB_IDS];
    void *w = ctx->ws.p[EPB_W];
    if (st == MOE_OK) st = route_tokens(ctx, T, x, g0, logits, ids, w, err);
    if (st == MOE_OK)
        st = ep_plan_build(&plan, ctx->nranks, ctx->rank, ctx->V, ctx->C, ctx->E, ctx->k, T, ids,
                           err);
    st = ep_agree(ctx->comm, st, err);
    if (st != MOE_OK) {
        ep_plan_free(&plan);
        return st;
    }
    /* 2. counts first; then every rank checks its buffers can take what is coming. */
    st = ep_plan_exchange(&plan, ctx->tp, err);
    if (st != MOE_OK) {
        ep_plan_free(&plan);
        return ep_fatal(ctx, st, err);
    }
    st = ep_plan_check_capacity(&plan, ctx->opts.max_tokens_per_rank, ctx->opts.max_recv_tokens,
                                err);
    if (st == MOE_OK)
        st = ep_ws_reserve(&ctx->ws, ctx, T, plan.send_total, plan.recv_total,
                           plan.recv_max_round, false, err);
    ep_request *reqs = NULL;
    if (st == MOE_OK) {
        reqs = moe_calloc(2 * (size_t)ctx->C * ctx->V, sizeof *reqs, "EP requests", err);
        if (!reqs) st = MOE_ERR_NOMEM;
    }
    st = ep_agree(ctx->comm, st, err);
    if (st != MOE_OK) {
        free(reqs);
        ep_plan_free(&plan);
        return st;
    }
    /* The source-side buffers were sized for the same T above, so growing the others did
     * not move them; take the pointers again all the same. */
    ids = topk_ids ? topk_ids : ctx->ws.p[EPB_IDS];
    w = ctx->ws.p[EPB_W];

    /* 3. the pipeline: dispatch of chunk c+1 is in flight while chunk c is computed, and the
     * combine of chunk c-1 completes after it. */
    int C = ctx->C, V = ctx->V;
    ep_request *disp = reqs, *comb = reqs + (size_t)C * V;
    moe_ep_chunk_times *tl = ctx->call.timeline;
    memset(tl, 0, (size_t)C * sizeof *tl);
    ctx->call.nchunks = C;
    const void *shared = ctx->Is > 0 ? ctx->ws.p[EPB_SHARED_OUT] : NULL;
    size_t xrow = (size_t)ctx->H * ctx->dsz, idrow = (size_t)ctx->k * 4,
           wrow = (size_t)ctx->k * ctx->dsz;
    ep_workspace *ws = &ctx->ws;
#define POST_DISPATCH(c)                                                                  \
    do {                                                                                  \
        ep_dispatch_pack(ctx, &plan, (c), x, NULL, ids, w);                               \
        for (int v_ = 0; v_ < V; v_++)                                                    \
            if ((st = ep_dispatch_start(ctx, &plan, (c), v_, false,                      \
                                        &disp[(size_t)(c) * V + v_], err)) != MOE_OK)     \
                goto fatal;                                                               \
        tl[(c)].dispatch_post = moe_now() - t0;                                           \
        tl[(c)].tokens = plan.chunk_begin[(c) + 1] - plan.chunk_begin[(c)];               \
    } while (0)
    POST_DISPATCH(0);
    /* Llama-4's shared expert needs only local tokens: it runs while chunk 0 travels. */
    if ((st = shared_forward(ctx, T, x, ws->p[EPB_SHARED_GU], ws->p[EPB_SHARED_H],
                             ws->p[EPB_SHARED_OUT], err)) != MOE_OK)
        goto fatal;
    for (int c = 0; c < C; c++) {
        if (c + 1 < C) POST_DISPATCH(c + 1);
        for (int v = 0; v < V; v++)
            if ((st = ctx->tp->wait(ctx->tp, &disp[(size_t)c * V + v], err)) != MOE_OK)
                goto fatal;
        tl[c].dispatch_done = tl[c].compute_begin = moe_now() - t0;
        for (int v = 0; v < V; v++) {
            int64_t R = ep_round_recv_rows(&plan, c, v), rb = ep_round_recv_base(&plan, c, v);
            int e0 = (ctx->rank * V + v) * ctx->epv;
            st = experts_forward(ctx, e0, ctx->epv, (int)R, (char *)ws->p[EPB_RECV_X] + rb * xrow,
                                 (const int32_t *)((char *)ws->p[EPB_RECV_IDS] + rb * idrow),
                                 (char *)ws->p[EPB_RECV_W] + rb * wrow, NULL,
                                 (char *)ws->p[EPB_PART] + rb * xrow, err);
            if (st != MOE_OK) goto fatal;
            if ((st = ep_combine_start(ctx, &plan, c, v, false, &comb[(size_t)c * V + v],
                                       err)) != MOE_OK)
                goto fatal;
            tl[c].rows_sent += ep_round_send_rows(&plan, c, v);
            tl[c].rows_recv += R;
            ep_count_round(ctx, &plan, c, v, false);
            /* Give the in-flight dispatch of the next chunk a chance to move. */
            if (c + 1 < C)
                for (int u = 0; u < V; u++)
                    if ((st = ctx->tp->progress(ctx->tp, &disp[(size_t)(c + 1) * V + u], err)) !=
                        MOE_OK)
                        goto fatal;
        }
        tl[c].compute_end = tl[c].combine_post = moe_now() - t0;
        if (c >= 1) {
            for (int v = 0; v < V; v++)
                if ((st = ctx->tp->wait(ctx->tp, &comb[(size_t)(c - 1) * V + v], err)) != MOE_OK)
                    goto fatal;
            tl[c - 1].combine_done = moe_now() - t0;
            ep_combine_reduce(ctx, &plan, c - 1, shared, out);
        }
    }
    for (int v = 0; v < V; v++)
        if ((st = ctx->tp->wait(ctx->tp, &comb[(size_t)(C - 1) * V + v], err)) != MOE_OK)
            goto fatal;
    tl[C - 1].combine_done = moe_now() - t0;
    ep_combine_reduce(ctx, &plan, C - 1, shared, out);
#undef POST_DISPATCH
    free(reqs);
    ep_plan_free(&plan);
    call_end(ctx, stats, t0);
    return MOE_OK;
fatal:
    /* Requests still in flight are abandoned with the job (or the caller destroys ctx). */
    free(reqs);
    ep_plan_free(&plan);
    return ep_fatal(ctx, st, err);
}

/* Round every element of acc [n] into dst (dtype dt). */
static void store_rounded(moe_dtype dt, const float *acc, void *dst, size_t n)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) moe_store_elem_f(dt, dst, i, acc[i]);
}

static void zero_grads(moe_weights *g, bool shared)
{
    memset(g->router.data, 0, g->router.nbytes);
    memset(g->w13.data, 0, g->w13.nbytes);
    memset(g->w2.data, 0, g->w2.nbytes);
    if (shared) {
        memset(g->shared_gate.data, 0, g->shared_gate.nbytes);
        memset(g->shared_up.data, 0, g->shared_up.nbytes);
        memset(g->shared_down.data, 0, g->shared_down.nbytes);
    }
}

moe_status moe_ep_backward(moe_ep_ctx *ctx, int T, const void *x, const void *dout, void *dx,
                           moe_weights *grads, moe_ep_stats *stats, moe_error *err)
{
    if (!ctx) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_backward: ctx is NULL");
    double t0 = moe_now();
    call_begin(ctx);
    moe_status st = check_call(ctx, "moe_ep_backward", T, x, dout, "dout", dx, "dx", err);
    if (st == MOE_OK && !grads)
        st = moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_backward: grads is NULL");
    if (st == MOE_OK) st = check_slice(ctx, grads, "grads", err);
    if (!ctx->plain) st = ep_agree(ctx->comm, st, err);
    if (st != MOE_OK) return st;
    ctx->call.calls_backward = 1;
    ctx->call.tokens_local = (uint64_t)T;

    if (ctx->plain) {
        /* N = 1, V = 1, router's own routing: the fused path's forward and backward. */
        if (T == 0) {
            zero_grads(grads, ctx->Is > 0);
        } else {
            fwd_bufs b;
            MOE_TRY(fb_make(ctx, T, true, NULL, NULL, NULL, &b, err));
            st = cpu_block_forward(ctx->w, ctx->dt, T, x, &b.st, err);
            if (st == MOE_OK)
                st = cpu_block_backward(ctx->w, ctx->dt, T, x, &b.st, dout, dx, grads, err);
            ctx->call.expert_rows = (uint64_t)T * ctx->k;
            ctx->call.tokens_computed = (uint64_t)T;
            fb_free(&b);
        }
        call_end(ctx, stats, t0);
        return st;
    }

    moe_dtype dt = ctx->dt;
    int H = ctx->H, E = ctx->E, k = ctx->k, Is = ctx->Is, V = ctx->V;
    size_t t = (size_t)T, dsz = ctx->dsz;
    int64_t g0 = 0;
    if (forced(ctx)) FATAL_TRY(global_offset(ctx, T, &g0, err));
    ep_plan plan;
    memset(&plan, 0, sizeof plan);
    ep_request *reqs = NULL;
    /* d-weights [T,k] (fp32), d logits [T,E], the shared expert's d act [T,Is] and d gate|up
     * [T,2Is], and the replicated weights' fp32 gradients: router [E,H], shared gate|up
     * [2Is,H], shared down [H,Is]. */
    size_t n_rep = (size_t)E * H + 3 * (size_t)Is * H;
    float *dtop = moe_calloc(t * k + 1, sizeof(float), "d-weights", err);
    void *dlog = moe_calloc(t * E + 1, dsz, "d logits", err);
    float *grep = moe_calloc(n_rep, sizeof(float), "replicated gradients", err);
    void *sh_dact = Is ? moe_malloc(t * Is * dsz + 1, "shared d act", err) : NULL;
    void *sh_dgu = Is ? moe_malloc(t * 2 * Is * dsz + 1, "shared d gate|up", err) : NULL;
    st = (dtop && dlog && grep && (!Is || (sh_dact && sh_dgu))) ? MOE_OK : MOE_ERR_NOMEM;
    if (st == MOE_OK) st = ep_ws_reserve(&ctx->ws, ctx, T, 0, 0, 0, true, err);
    if (st == MOE_OK)
        st = route_tokens(ctx, T, x, g0, ctx->ws.p[EPB_LOGITS], ctx->ws.p[EPB_IDS],
                          ctx->ws.p[EPB_W], err);
    if (st == MOE_OK)
        st = ep_plan_build(&plan, ctx->nranks, ctx->rank, V, 1, E, k, T, ctx->ws.p[EPB_IDS], err);
    st = ep_agree(ctx->comm, st, err);
    if (st != MOE_OK) goto out;
    st = ep_plan_exchange(&plan, ctx->tp, err);
    if (st != MOE_OK) goto fatal;
    /* Backward buffers grow as needed (only forward is sized in advance). */
    st = ep_ws_reserve(&ctx->ws, ctx, T, plan.send_total, plan.recv_total, plan.recv_max_round,
                       true, err);
    if (st == MOE_OK) {
        reqs = moe_calloc(2 * (size_t)V, sizeof *reqs, "EP requests", err);
        if (!reqs) st = MOE_ERR_NOMEM;
    }
    st = ep_agree(ctx->comm, st, err);
    if (st != MOE_OK) goto out;
    {
        ep_workspace *ws = &ctx->ws;
        const void *logits = ws->p[EPB_LOGITS], *w = ws->p[EPB_W];
        const int32_t *ids = ws->p[EPB_IDS];
        size_t xrow = (size_t)H * dsz, idrow = (size_t)k * 4, wrow = (size_t)k * dsz;
        ep_request *disp = reqs, *comb = reqs + V;
        moe_ep_chunk_times *tl = ctx->call.timeline;
        memset(tl, 0, sizeof *tl);
        ctx->call.nchunks = 1;
        tl[0].tokens = T;

        /* The gradient of combine is a dispatch: dout rows travel with x. */
        ep_dispatch_pack(ctx, &plan, 0, x, dout, ids, w);
        for (int v = 0; v < V; v++)
            if ((st = ep_dispatch_start(ctx, &plan, 0, v, true, &disp[v], err)) != MOE_OK)
                goto fatal;
        tl[0].dispatch_post = moe_now() - t0;

        /* Meanwhile, Llama-4's shared expert on the local tokens: forward again, then d act =
         * dout @ down, the SiLU-and-mul backward, and fp32 partial weight gradients. */
        if (Is > 0 && T > 0) {
            void *gu = ws->p[EPB_SHARED_GU], *act = ws->p[EPB_SHARED_H];
            if ((st = shared_forward(ctx, T, x, gu, act, ws->p[EPB_SHARED_OUT], err)) != MOE_OK)
                goto fatal;
            st = cpu_gemm(dt, T, Is, H, dout, ctx->w->shared_down.data, true, sh_dact, false, err);
            if (st != MOE_OK) goto fatal;
            cpu_silu_mul_backward(dt, T, Is, gu, sh_dact, sh_dgu);
            float *g_gu = grep + (size_t)E * H, *g_down = g_gu + 2 * (size_t)Is * H;
            ep_accum_tn(dt, T, 2 * Is, H, sh_dgu, x, g_gu);
            ep_accum_tn(dt, T, H, Is, dout, act, g_down);
        }

        tl[0].compute_begin = moe_now() - t0;
        for (int v = 0; v < V; v++) {
            if ((st = ctx->tp->wait(ctx->tp, &disp[v], err)) != MOE_OK) goto fatal;
            if (v == 0) tl[0].dispatch_done = moe_now() - t0;
            int64_t R = ep_round_recv_rows(&plan, 0, v), rb = ep_round_recv_base(&plan, 0, v);
            int e0 = (ctx->rank * V + v) * ctx->epv;
            size_t off13 = (size_t)v * ctx->epv * 2 * ctx->I * H * dsz;
            size_t off2 = (size_t)v * ctx->epv * H * ctx->I * dsz;
            st = experts_backward(ctx, e0, ctx->epv, (int)R, (char *)ws->p[EPB_RECV_X] + rb * xrow,
                                  (char *)ws->p[EPB_RECV_DOUT] + rb * xrow,
                                  (const int32_t *)((char *)ws->p[EPB_RECV_IDS] + rb * idrow),
                                  (char *)ws->p[EPB_RECV_W] + rb * wrow,
                                  (char *)grads->w13.data + off13, (char *)grads->w2.data + off2,
                                  (char *)ws->p[EPB_PART] + rb * xrow,
                                  (float *)ws->p[EPB_PART_DW] + rb * k, err);
            if (st != MOE_OK) goto fatal;
            if ((st = ep_combine_start(ctx, &plan, 0, v, true, &comb[v], err)) != MOE_OK)
                goto fatal;
            tl[0].rows_sent += ep_round_send_rows(&plan, 0, v);
            tl[0].rows_recv += R;
            ep_count_round(ctx, &plan, 0, v, true);
        }
        tl[0].compute_end = tl[0].combine_post = moe_now() - t0;
        for (int v = 0; v < V; v++)
            if ((st = ctx->tp->wait(ctx->tp, &comb[v], err)) != MOE_OK) goto fatal;
        tl[0].combine_done = moe_now() - t0;

        /* The gradient of dispatch is a combine: d-weights from each slot's owner, then the
         * router's backward, then dx = dlogits @ router (+ shared) + partial dx rows, added in
         * ascending rank order — the fused path's order with the k-sum split by owner. */
        if (T > 0) {
            ep_combine_dweights(ctx, &plan, ids, dtop);
            bool router_grad =
                !(forced(ctx) && ctx->opts.route.weights == MOE_EP_ROUTE_W_UNIFORM);
            if (router_grad)
                st = cpu_route_backward(&ctx->cfg, dt, T, logits, ids, dtop, dlog, err);
            if (st == MOE_OK)
                st = cpu_gemm(dt, T, H, E, dlog, ctx->w->router.data, true, dx, false, err);
            if (st == MOE_OK && Is > 0)
                st = cpu_gemm(dt, T, H, 2 * Is, sh_dgu, ctx->shared_w13, true, dx, true, err);
            if (st == MOE_OK) {
                ep_combine_dx(ctx, &plan, dx, dx);
                if (router_grad) ep_accum_tn(dt, T, E, H, dlog, x, grep);
            }
        }
    }
    /* Every rank reaches this point: a local failure above is agreed on, not left hanging. */
    st = ep_agree(ctx->comm, st, err);
    if (st != MOE_OK) goto out;
    /* Router and shared expert are replicated: their gradients sum over every rank's tokens. */
    st = ep_allreduce_ordered(ctx->comm, ctx->rank, ctx->nranks, grep, n_rep, err);
    if (st != MOE_OK) goto fatal;
    store_rounded(dt, grep, grads->router.data, (size_t)E * H);
    if (Is > 0) {
        const float *g_gu = grep + (size_t)E * H;
        store_rounded(dt, g_gu, grads->shared_gate.data, (size_t)Is * H);
        store_rounded(dt, g_gu + (size_t)Is * H, grads->shared_up.data, (size_t)Is * H);
        store_rounded(dt, g_gu + 2 * (size_t)Is * H, grads->shared_down.data, (size_t)H * Is);
    }
    call_end(ctx, stats, t0);
out:
    free(reqs);
    ep_plan_free(&plan);
    free(dtop);
    free(dlog);
    free(grep);
    free(sh_dact);
    free(sh_dgu);
    return st;
fatal:
    free(reqs);
    reqs = NULL;
    st = ep_fatal(ctx, st, err);
    goto out;
}
