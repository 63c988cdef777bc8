/*
 * ep.h — expert parallelism inside the library: the communicator behind moe_ep_comm, forced
 * routing, the counts plan, the transfers, and the one driver that runs a layer (plain or
 * expert-parallel, forward and backward, on either backend). Internal; the public side is
 * moe_ep.h. docs/EP.md has the long form:
 *
 *   route     every rank routes its own tokens (router + top-k, or a forced routing).
 *   plan      per token its distinct owners (virtual ranks, expert_map.h) and its row in the
 *             block going to each (backend op ep_plan: a pure function of the ids).
 *   counts    default mode: the per-destination counts come to the host and are exchanged
 *             (MPI_Alltoall), so every payload transfer has its exact size; with
 *             max_tokens_per_rank and NCCL ("sync-free") they stay on the device and whole
 *             slots of M rows travel with the counts beside them.
 *   dispatch  a token goes ONCE to each virtual rank owning one of its k experts, with k id
 *             slots (the expert's index within that virtual rank, -1 where it owns none of
 *             them) and k weights (0 there).
 *   compute   each virtual rank runs its slice of the local experts on what arrived and sums
 *             over its own slots: one partial row per received token.
 *   combine   the partial rows travel back into the rows they were sent from; the source adds
 *             them in ascending virtual-rank order after Llama-4's shared expert (computed
 *             locally on a side stream): deterministic, no float atomics.
 *   backward  the gradient of the combine is a dispatch (dout rows travel with x) and the
 *             gradient of the dispatch is a combine (partial dx rows and fp32 d-weights
 *             travel back); the replicated weights' gradients (router, shared expert) are
 *             fp32 partials gathered from every rank and added in rank order, identical on
 *             every rank.
 * With one rank, no virtual ranks and the router's own routing, forward and backward ARE the
 * plain fused path: route, the experts on x itself, sum over k — nothing copied or sent.
 *
 * Every EP call is collective over the layer's communicator (all ranks, same order; T may
 * differ, 0 included). Each call begins by agreeing on its kind and on the layer (a rank that
 * called something else fails on every rank, naming it), and an argument error found on any
 * rank makes every rank return it before data moves. A failure after data started moving is
 * fatal (MPI_Abort unless abort_on_fatal was turned off).
 */
#ifndef MOE_EP_INTERNAL_EP_H
#define MOE_EP_INTERNAL_EP_H

#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "../layer/layer.h"
#include "ep_transport.h"

/* ---------------------------------------------------------------- forced routing ---- */

/* Overrides the router's choice of expert ids so a skew is produced on purpose (tests,
 * benchmarks). The router still runs (its logits are an output). Ids are a function of the
 * GLOBAL token index g (ranks' batches concatenated in rank order), so the same tokens get
 * the same experts whatever the rank count:
 *   UNIFORM     e_j = (g*k + j) mod E                         (every expert equally loaded)
 *   SKEWED      k distinct experts drawn without replacement with P(e) ~ 1/(e+1)^2
 *               (counter-based: seed 0, stream "ep.route.skewed", index g*k+j): low ids hot
 *   ALL_TO_ONE  the first k experts of virtual rank `target` (spilling into the following
 *               virtual ranks' experts when it has fewer than k): the others receive nothing
 *   FILE        ids[g mod rows][j] from a table, checked in range and distinct per row
 * Weights: ROUTER = the router's own values at the forced ids (Qwen3: softmax(logits)[e_j],
 * renormalised over the k forced ids when norm_topk_prob; Llama-4: sigmoid(logits[e_j]));
 * UNIFORM = 1/k (the router then gets no gradient). */
typedef enum moe_ep_route_mode {
    MOE_EP_ROUTE_ROUTER = 0,
    MOE_EP_ROUTE_UNIFORM,
    MOE_EP_ROUTE_SKEWED,
    MOE_EP_ROUTE_ALL_TO_ONE,
    MOE_EP_ROUTE_FILE,
} moe_ep_route_mode;
typedef enum moe_ep_route_weights {
    MOE_EP_ROUTE_W_ROUTER = 0,
    MOE_EP_ROUTE_W_UNIFORM = 1,
} moe_ep_route_weights;
typedef struct moe_ep_route {
    moe_ep_route_mode mode;
    moe_ep_route_weights weights;
    int target;       /* ALL_TO_ONE: virtual rank */
    int32_t *ids;     /* FILE: [rows, k] global expert ids (owned: free()) */
    int64_t rows;
} moe_ep_route;

/* "router" | "uniform" | "skewed" | "all-to-one[:TARGET]" | "file:PATH", optionally
 * ",w=uniform" / ",w=router". NULL or "" = router. E and k validate a file. */
moe_status moe_ep_route_parse(const char *spec, int num_experts, int top_k, moe_ep_route *r,
                              moe_error *err);
void moe_ep_route_free(moe_ep_route *r);
/* A routing table: whitespace-separated integers, k per token ('#' starts a comment). */
moe_status moe_ep_route_load_file(const char *path, int num_experts, int top_k, int32_t **ids,
                                  int64_t *rows, moe_error *err);
/* The forced ids of tokens [g0, g0+T) (global indices), [T,k]; the map places ALL_TO_ONE. */
moe_status moe_ep_route_ids(const moe_ep_route *r, const moe_expert_map *map, int top_k,
                            int64_t g0, int T, int32_t *ids, moe_error *err);
/* Forced-routing weights [T,k] for ids (host). */
void ep_route_weights(const moe_config *cfg, moe_dtype dt, moe_ep_route_weights mode, int T,
                      const void *logits, const int32_t *ids, void *w);
/* "auto" | "mpi" | "nccl". */
bool moe_ep_transport_parse(const char *s, moe_transport *out);
const char *moe_ep_transport_name(moe_transport t);

/* ---------------------------------------------------------------- the communicator ---- */

#define MOE_EP_COMM_MAGIC 0x4d4d4f43u /* "COMM" */

struct moe_ep_comm {
    uint32_t magic;
    MPI_Comm comm;      /* duplicate of the caller's, MPI_ERRORS_RETURN */
    int rank, nranks;
    int local_rank, local_size; /* on this node */
    moe_ep_options opts;
    char *route_spec;   /* owned copy of opts.route */
    int layers;         /* layers created on it */
    ep_transport *mpi;  /* host buffers (always) */
    ep_transport *nccl; /* device buffers; made by the first layer that needs it */
    int nccl_device;
};

/* The failure of an MPI call: "rank R: what: MPI error string", MOE_ERR_MPI. */
moe_status ep_mpi_fail(moe_error *err, int rc, int rank, const char *what);
/* Agree on a status across comm: every rank returns the lowest failing rank's status and
 * message ("rank R failed: ..." on the others); MOE_OK only when every rank passed MOE_OK. */
moe_status ep_agree(MPI_Comm comm, moe_status st, moe_error *err);
/* Agree on a status AND on n named integer fields in one allreduce: a field whose value
 * differs between ranks fails every rank with "ranks disagree on <name> (<lo> .. <hi>)". */
moe_status ep_agree_fields(MPI_Comm comm, moe_status st, const int64_t *fields,
                           const char *const *names, int n, moe_error *err);
/* The transport a layer uses (collective over the layer's ranks; creates the NCCL
 * communicator on first use). *tp NULL for the plain path. */
moe_status ep_comm_pick_transport(moe_ep_comm *c, moe_layer *L, ep_transport **tp,
                                  moe_error *err);

/* ---------------------------------------------------------------- counts plan ---- */

/* Rows of every (chunk c, round v, peer q) block, at index (c*V + v)*N + q, on the send side
 * (rows this rank sends to virtual rank q*V + v) and the receive side (rows rank q sends to
 * this rank's virtual rank v), with absolute row offsets in that order. Round v of chunk c is
 * one all-to-all: the rows one virtual rank receives are contiguous and in global token order
 * (source rank, then token), as a single rank would see them. */
typedef struct ep_plan {
    int N, rank, V, G, C, T;
    int32_t *chunk_begin; /* [C+1] local token ranges */
    int64_t *send_rows, *send_off, *recv_rows, *recv_off;
    int64_t send_total, recv_total, recv_max_round;
    int64_t *base;        /* [C*G] first send row of destination d in chunk c */
} ep_plan;

/* Balanced contiguous split of T into C pieces: piece i is [b[i], b[i+1]). */
void ep_split_even(int T, int C, int32_t *b);
/* The send side from the per-destination counts dcount [C*G] (host). */
moe_status ep_plan_from_counts(ep_plan *p, int N, int rank, int V, int C, int T,
                               const int32_t *chunk_begin, const int32_t *dcount,
                               moe_error *err);
/* The counts exchange (one MPI_Alltoall) and the receive layout. */
moe_status ep_plan_exchange(ep_plan *p, MPI_Comm comm, moe_error *err);
/* T <= max_tokens (when > 0) and recv_total <= max_recv (when > 0), else MOE_ERR_OVERFLOW. */
moe_status ep_plan_check_capacity(const ep_plan *p, int64_t max_tokens, int64_t max_recv,
                                  moe_error *err);
void ep_plan_free(ep_plan *p);
int64_t ep_round_rows(const ep_plan *p, int c, int v, bool recv);
int64_t ep_round_base(const ep_plan *p, int c, int v, bool recv);

/* ---------------------------------------------------------------- the driver ---- */

/* The EP side of a layer with a communicator (made at layer creation). */
typedef struct ep_state {
    moe_ep_comm *comm;
    ep_transport *tp;
    moe_ep_route route;
    bool forced, syncfree, nccl;
    int N, V, G, C, D; /* ranks, virtual per process, virtual in all, chunks, min(k, G) */
    int64_t M;         /* max_tokens_per_rank (0: sized per call) */
    int64_t max_recv;  /* receive bound (with M) */
    int64_t Rc;        /* sync-free: compact rows of one virtual rank per call */
    int64_t *d_slotbase; /* sync-free: [G] first send row of destination d's slot (backend) */
    int32_t *h_dcount;   /* host counts of the last plan [C*G] */
    ep_request *reqs;    /* transfer records (2*C*V), reused across calls */
    int nreqs;
    bool abort_on_fatal;
} ep_state;

/* Set up / tear down L->ep (collective: picks the transport, sizes sync-free buffers). */
moe_status ep_state_create(moe_layer *L, moe_ep_comm *comm, moe_error *err);
void ep_state_destroy(moe_layer *L);

/* Forward and backward of the layer on T tokens (backend memory, L->stream). The API checks
 * the arguments first; these agree on the call across ranks. See moe_ep.h. */
moe_status ep_forward(moe_layer *L, int T, const void *x, void *out, void *logits,
                      moe_error *err);
moe_status ep_backward(moe_layer *L, int T, const void *x, const void *dout,
                       const void *d_logits, void *dx, const moe_layer_grads *grads,
                       moe_error *err);

/* The plain path with every intermediate in st (backend memory; NULL fields: scratch), for
 * the forward and moe_layer_forward_stages. One rank only. keep: fill the saved state for a
 * following backward (save_for_backward). */
moe_status ep_plain_forward(moe_layer *L, int T, const void *x, moe_fwd_state *st, bool keep,
                            moe_error *err);

#endif /* MOE_EP_INTERNAL_EP_H */
