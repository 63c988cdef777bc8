/*
 * ep_internal.h — what the EP modules share: the plan (who sends which token where, in which
 * row), the context, and the helpers of each file. Not installed; see ep.h for the API.
 *
 * Buffer layout (rows of H elements for x / dout / partial sums, k ids or k weights for meta):
 *   dispatch send buffer   rows ordered (chunk c, round v, destination rank q, local token)
 *   dispatch recv buffer   rows ordered (chunk c, round v, source rank p, source token)
 *   combine              = the same buffers, directions reversed: a token's partial sum comes
 *                          back into the row it was sent from.
 * Round v of chunk c is one all-to-all: every process sends to virtual rank q*V + v of each
 * real rank q, so the rows one virtual rank receives are contiguous and in global token order
 * (source rank, then token): the receiver's grouped GEMM sees tokens in the order a single rank
 * would, and its per-expert sums run in that order too.
 */
#ifndef MOE_EP_INTERNAL_H
#define MOE_EP_INTERNAL_H

#include "ep.h"
#include "ep_transport.h"

/* ---------------------------------------------------------------- plan (ep_plan.c) ---- */

typedef struct ep_plan {
    int nranks, rank, V, G, C; /* real ranks, virtual per process, all virtual, chunks */
    int E, k, epv;             /* experts, top-k, experts per virtual rank */
    int T;
    int32_t *chunk_begin; /* [C+1] local token ranges */
    /* Per local token its virtual destinations (ascending) and the send-buffer row of each:
     * dests of token t are dest[dest_off[t] .. dest_off[t+1]). */
    int32_t *dest_off; /* [T+1] */
    int32_t *dest;     /* [nnz] */
    int64_t *row;      /* [nnz] */
    /* Rows per (c, v, peer) at index (c*V + v)*N + peer, and absolute row offsets. */
    int64_t *send_rows, *send_off;
    int64_t *recv_rows, *recv_off;
    int64_t send_total, recv_total;
    int64_t recv_max_round; /* most rows of one (c, v) round: the receiver's scratch size */
} ep_plan;

/* Owner (virtual rank) of global expert e. */
static inline int ep_owner(const ep_plan *p, int e) { return e / p->epv; }
/* First row (absolute) and row count of round (c, v) on the send / receive side. */
static inline int64_t ep_round_send_base(const ep_plan *p, int c, int v)
{
    return p->send_off[((int64_t)c * p->V + v) * p->nranks];
}
static inline int64_t ep_round_recv_base(const ep_plan *p, int c, int v)
{
    return p->recv_off[((int64_t)c * p->V + v) * p->nranks];
}
int64_t ep_round_send_rows(const ep_plan *p, int c, int v);
int64_t ep_round_recv_rows(const ep_plan *p, int c, int v);

/* The local half: destinations of every token from its ids [T,k] (entries < 0 ignored),
 * send counts and rows. No communication. */
moe_status ep_plan_build(ep_plan *p, int nranks, int rank, int V, int C, int E, int k, int T,
                         const int32_t *ids, moe_error *err);
/* The counts exchange (one all-to-all of C*V integers per peer) and the receive layout. */
moe_status ep_plan_exchange(ep_plan *p, ep_transport *t, moe_error *err);
/* Sync-free bounds: T <= max_tokens (when > 0) and recv_total <= max_recv (when > 0); a clear
 * overflow error otherwise (never a truncation). */
moe_status ep_plan_check_capacity(const ep_plan *p, int64_t max_tokens, int64_t max_recv,
                                  moe_error *err);
void ep_plan_free(ep_plan *p);
/* Balanced contiguous split of T into C pieces: piece i is [b[i], b[i+1]). */
void ep_split_even(int T, int C, int32_t *b);

/* ---------------------------------------------------------------- workspace ---- */

typedef enum ep_buf_id {
    /* source side, T rows */
    EPB_LOGITS, EPB_IDS, EPB_W, EPB_SHARED_GU, EPB_SHARED_H, EPB_SHARED_OUT,
    /* dispatch / combine, S (send) or R (receive) rows */
    EPB_SEND_X, EPB_SEND_DOUT, EPB_SEND_IDS, EPB_SEND_W, EPB_BACK, EPB_BACK_DW,
    EPB_RECV_X, EPB_RECV_DOUT, EPB_RECV_IDS, EPB_RECV_W, EPB_PART, EPB_PART_DW,
    /* receiver scratch, Rmax*k rows */
    EPB_GATHER, EPB_COUNTS, EPB_OFFSETS, EPB_GU, EPB_ACT, EPB_ROWS, EPB_DGU, EPB_DACT, EPB_DA0,
    EPB_DTOP,
    EPB_COUNT_
} ep_buf_id;

typedef struct ep_workspace {
    void *p[EPB_COUNT_];
    size_t cap[EPB_COUNT_];
    bool fixed; /* sync-free: sized at creation, never grown */
} ep_workspace;

/* Make every buffer at least the size needed for T source tokens, S send rows, R receive
 * rows and Rmax rows in one round (backward adds its buffers). Fixed workspaces fail with an
 * overflow error instead of growing. */
moe_status ep_ws_reserve(ep_workspace *ws, const struct moe_ep_ctx *ctx, int64_t T, int64_t S,
                         int64_t R, int64_t Rmax, bool backward, moe_error *err);
void ep_ws_free(ep_workspace *ws);

/* ---------------------------------------------------------------- context ---- */

struct moe_ep_ctx {
    MPI_Comm comm; /* duplicate of the user's, MPI_ERRORS_RETURN */
    int rank, nranks, V, G, C, epv;
    const moe_weights *w;
    moe_config cfg;
    moe_dtype dt;
    size_t dsz;
    int H, I, E, k, Is;
    moe_ep_options opts;
    int32_t *route_ids; /* FILE routing: the ctx's own copy */
    ep_transport *tp;
    bool plain;        /* N = 1, V = 1: the plain fused path */
    void *shared_w13;  /* Llama-4: [2Is, H] shared gate rows then up rows (one grouped GEMM) */
    ep_workspace ws;
    moe_ep_stats total, call;
};

/* ---------------------------------------------------------------- dispatch / combine ---- */

/* Pack the rows of chunk c: x (and dout, optional) rows, k id slots (-1 where the destination
 * does not own the expert) and k weights (0 there). ids/w are [T,k]. */
void ep_dispatch_pack(const moe_ep_ctx *ctx, const ep_plan *p, int c, const void *x,
                      const void *dout, const int32_t *ids, const void *w);
/* Start round (c, v) of the dispatch (x, ids, w, and dout when backward). */
moe_status ep_dispatch_start(moe_ep_ctx *ctx, const ep_plan *p, int c, int v, bool backward,
                             ep_request *req, moe_error *err);
/* Start round (c, v) of the combine (partial rows, and the d-weights when backward). */
moe_status ep_combine_start(moe_ep_ctx *ctx, const ep_plan *p, int c, int v, bool backward,
                            ep_request *req, moe_error *err);
/* out[t] = round(add[t] + sum over t's destinations, ascending, of the returned partial rows)
 * for the tokens of chunk c, in fp32. add may be NULL. */
void ep_combine_reduce(const moe_ep_ctx *ctx, const ep_plan *p, int c, const void *add,
                       void *out);
/* Backward: dw[t,j] (fp32) = the d-weight of slot j returned by the rank owning ids[t,j]. */
void ep_combine_dweights(const moe_ep_ctx *ctx, const ep_plan *p, const int32_t *ids,
                         float *dw);
/* Backward: dx[t] = round(add[t] + the returned partial dx rows, fp32, ascending
 * destinations); add may be NULL or alias dx. */
void ep_combine_dx(const moe_ep_ctx *ctx, const ep_plan *p, const void *add, void *dx);
/* Counters of round (c, v) (both directions) into ctx->call. */
void ep_count_round(moe_ep_ctx *ctx, const ep_plan *p, int c, int v, bool backward);

/* ---------------------------------------------------------------- local compute (ep_layer.c) */

/* The ctx's fatal-error policy: log with the rank, MPI_Abort if asked, return st. */
moe_status ep_fatal(moe_ep_ctx *ctx, moe_status st, moe_error *err);

/* ---------------------------------------------------------------- gradients (ep_grad.c) ---- */

/* C[N,K] += A[T,N]^T B[T,K] in fp32 (t ascending: deterministic); A, B in dt. The fp32
 * partial of a replicated weight's gradient, before the sum over ranks. */
void ep_accum_tn(moe_dtype dt, int T, int N, int K, const void *A, const void *B, float *C);
/* Sum buf[n] over the communicator's ranks in ascending rank order, result on every rank. */
moe_status ep_allreduce_ordered(MPI_Comm comm, int rank, int nranks, float *buf, size_t n,
                                moe_error *err);
/* Forced-routing weights [T,k] for ids (see ep.h). */
void ep_route_weights(const moe_config *cfg, moe_dtype dt, moe_ep_route_weights mode, int T,
                      const void *logits, const int32_t *ids, void *w);

#endif /* MOE_EP_INTERNAL_H */
