/*
 * ep.h — expert parallelism: N MPI ranks, each owning a contiguous slice of the experts, run
 * one MoE block together on their own (data-parallel) batches of tokens.
 *
 * The scheme (docs/EP.md has the long form):
 *   plan      rank r owns experts [r*E/N, (r+1)*E/N). With V virtual ranks per process the
 *             experts are cut into G = N*V slices and virtual rank d = r*V + v owns slice d.
 *   route     every rank routes its own tokens (router + top-k, or a forced routing).
 *   dispatch  a token goes ONCE to each (virtual) rank owning at least one of its k experts,
 *             with k expert-id slots (ids it does not own there are -1) and the k weights
 *             (0 where not owned). Counts first (all-to-all of integers), then the payload.
 *   compute   the receiver runs the local fused path (sort by expert, grouped GEMM with
 *             permute_x and the SiLU-and-mul epilogue, grouped GEMM with permute_y) on what
 *             arrived and reduces over its own experts per token: one partial row per token.
 *   combine   partial rows travel back (the same counts, reversed) and the source adds them
 *             in ascending (virtual) rank order, after Llama-4's shared expert, which every
 *             rank computes for its own tokens: deterministic, no float atomics.
 *   backward  the gradient of combine is a dispatch (dout rows travel with x) and the gradient
 *             of dispatch is a combine (partial dx rows and d-weights travel back).
 * With N = 1 and V = 1 and no forced routing, forward and backward ARE the plain fused path
 * (cpu_block_forward / cpu_block_backward): no copies, no communication.
 *
 * Every call that communicates is collective over the context's communicator: all ranks call
 * it, in the same order, with the same options (T_local may differ, 0 included). An argument
 * error found on any rank makes EVERY rank return an error (the statuses are agreed with an
 * MPI_Allreduce before any data moves), so no rank is left blocked in a collective. Failures
 * after data started moving (an MPI error) are fatal: the message names the rank and the MPI
 * error string, and the job is ended with MPI_Abort unless options.abort_on_fatal is false.
 *
 * Memory: host memory, activation dtype = the weights' dtype (CPU backend). The NCCL transport
 * stages host buffers through the GPU (for testing NCCL from the CPU backend); a CUDA-backend
 * driver will hand it device buffers directly.
 */
#ifndef MOE_EP_H_INTERNAL
#define MOE_EP_H_INTERNAL

#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "../weights.h"

/* ---------------------------------------------------------------- plan (ownership) ---- */

/* The expert slice of `rank` out of `nranks`: [*begin, *begin + *count). MOE_ERR_INVALID_ARG
 * with a clear message when E % nranks != 0 or nranks > E. */
moe_status moe_ep_expert_range(int num_experts, int nranks, int rank, int *begin, int *count,
                               moe_error *err);

/* ---------------------------------------------------------------- options ---- */

typedef enum moe_ep_transport_kind {
    MOE_EP_TRANSPORT_AUTO = 0, /* NCCL for device buffers (CUDA backend), else MPI */
    MOE_EP_TRANSPORT_MPI = 1,  /* host buffers, MPI_Alltoall(v) / MPI_Ialltoallv */
    MOE_EP_TRANSPORT_NCCL = 2, /* device buffers, grouped ncclSend/ncclRecv (CUDA builds) */
} moe_ep_transport_kind;
/* "auto" | "mpi" | "nccl". */
bool moe_ep_transport_parse(const char *s, moe_ep_transport_kind *out);
const char *moe_ep_transport_name(moe_ep_transport_kind t);

/* Forced routing (tests, benchmarks): overrides the router's choice of expert ids so a skew
 * is produced on purpose. The router still runs (its logits are an output).
 * Ids are a function of the GLOBAL token index g (ranks' batches concatenated in rank order),
 * so the same tokens get the same experts whatever N is:
 *   UNIFORM     e_j = (g*k + j) mod E                       (every expert equally loaded)
 *   SKEWED      k distinct experts drawn without replacement with P(e) ~ 1/(e+1)^2
 *               (counter-based: seed 0, stream "ep.route.skewed", index g*k+j): low ids hot
 *   ALL_TO_ONE  e_j = (target*E/G + j) mod E: every token to the experts of virtual rank
 *               `target` (spilling into the next ranks when a rank has fewer than k experts);
 *               the other ranks receive nothing
 *   FILE        ids[g mod rows][j] from a table (moe_ep_route_load_file), checked in range and
 *               distinct per row
 * Weights (`weights`):
 *   ROUTER   the router's own values AT the forced ids: Qwen3 softmax(logits)[e_j] (fp32,
 *            renormalised over the k forced ids when norm_topk_prob), Llama-4
 *            sigmoid(logits[e_j]); rounded to the activation dtype. Backward flows into the
 *            router as for natural routing. With FILE ids equal to the router's own top-k this
 *            is exactly natural routing.
 *   UNIFORM  1/k for every slot (rounded); the router gets no gradient. */
typedef enum moe_ep_route_mode {
    MOE_EP_ROUTE_ROUTER = 0, /* no forcing: the router decides */
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
    int target;          /* ALL_TO_ONE: virtual rank in [0, N*V) */
    const int32_t *ids;  /* FILE: [rows, k] global expert ids, borrowed (the ctx copies it) */
    int64_t rows;
} moe_ep_route;
/* "router" | "uniform" | "skewed" | "all-to-one[:TARGET]" | "file:PATH" (loads PATH with
 * moe_ep_route_load_file; the caller frees r->ids with free()). An optional suffix
 * ",w=uniform" or ",w=router" picks the weights. E and k validate the file. */
moe_status moe_ep_route_parse(const char *spec, int num_experts, int top_k, moe_ep_route *r,
                              moe_error *err);
/* A routing table: whitespace-separated integers, k per token ('#' starts a comment).
 * *ids is malloc'ed [rows, k]. Ids out of [0,E) or repeated within a token are errors naming
 * the line. */
moe_status moe_ep_route_load_file(const char *path, int num_experts, int top_k, int32_t **ids,
                                  int64_t *rows, moe_error *err);
/* The forced ids of tokens [g0, g0+T) (global indices), [T, k]. G = virtual ranks in all. */
moe_status moe_ep_route_ids(const moe_ep_route *r, int num_experts, int top_k, int G, int64_t g0,
                            int T, int32_t *ids, moe_error *err);

typedef struct moe_ep_options {
    moe_ep_transport_kind transport;
    int virtual_ranks;           /* V >= 1: this process plans and dispatches as V ranks */
    int chunks;                  /* C >= 1: pipeline the batch in C chunks (forward) */
    int64_t max_tokens_per_rank; /* M: 0 = buffers sized per call; > 0: T_local <= M always,
                                    buffers allocated once at creation (sync-free sizing) */
    int64_t max_recv_tokens;     /* with M > 0: token rows one process may receive in one call
                                    (all chunks); 0 = the worst case N*V*M. More is an error,
                                    never a truncation. */
    moe_ep_route route;
    bool abort_on_fatal;         /* MPI_Abort on a failure after data started moving */
    int device;                  /* NCCL: CUDA device; -1 = the node-local rank's GPU */
} moe_ep_options;
#define MOE_EP_OPTIONS_INIT                                                                   \
    {                                                                                         \
        MOE_EP_TRANSPORT_AUTO, 1, 1, 0, 0, {MOE_EP_ROUTE_ROUTER, MOE_EP_ROUTE_W_ROUTER, 0, NULL, 0}, \
            true, -1                                                                          \
    }

/* ---------------------------------------------------------------- counters ---- */

/* One chunk's timeline (seconds since the start of the call). */
typedef struct moe_ep_chunk_times {
    int64_t tokens;            /* local tokens of this chunk */
    int64_t rows_sent, rows_recv;
    double dispatch_post, dispatch_done;
    double compute_begin, compute_end;
    double combine_post, combine_done;
} moe_ep_chunk_times;

typedef struct moe_ep_stats {
    int nranks, rank, virtual_ranks;
    char transport[16];
    /* per real peer (index = peer rank, self included): token rows dispatched and received,
     * payload bytes sent and received (dispatch + combine, every buffer) */
    uint64_t *tokens_sent, *tokens_recv;
    uint64_t *bytes_sent, *bytes_recv;
    uint64_t *vtokens_sent;    /* [nranks*V] token rows per virtual destination */
    uint64_t tokens_local;     /* tokens this rank brought (sum of T_local) */
    uint64_t tokens_computed;  /* received token rows run through the local experts */
    uint64_t expert_rows;      /* (token, local expert) pairs computed */
    uint64_t weight_bytes_read;/* expert weight bytes read from the checkpoint at load */
    uint64_t weight_bytes_held;/* bytes of the local expert tensors (w13 + w2) */
    uint64_t calls_forward, calls_backward;
    double seconds;            /* wall time inside forward/backward */
    int nchunks;               /* timeline of the LAST call */
    moe_ep_chunk_times *timeline;
    int timeline_cap;
} moe_ep_stats;

moe_status moe_ep_stats_init(moe_ep_stats *s, int nranks, int rank, int virtual_ranks,
                             moe_error *err);
void moe_ep_stats_free(moe_ep_stats *s);
void moe_ep_stats_reset(moe_ep_stats *s); /* zero the counters, keep the shape */
/* dst += src (counters; the timeline is copied). Shapes must match. */
void moe_ep_stats_add(moe_ep_stats *dst, const moe_ep_stats *src);
/* Human-readable: per-peer table, totals, weight bytes, the last call's timeline. */
void moe_ep_stats_print(FILE *f, const moe_ep_stats *s);

/* ---------------------------------------------------------------- context ---- */

typedef struct moe_ep_ctx moe_ep_ctx;

/* Collective over comm. w: this rank's slice (expert_begin/count must equal
 * moe_ep_expert_range(E, N, rank)) with the router and shared expert; borrowed, must outlive
 * the ctx. opts may be NULL (defaults). The communicator is duplicated (errors return, never
 * abort inside MPI). Every rank gets the same status; a rank's bad argument is reported as
 * "rank R: <reason>" on the others. */
moe_status moe_ep_ctx_create(MPI_Comm comm, const moe_weights *w, const moe_ep_options *opts,
                             moe_ep_ctx **out, moe_error *err);
void moe_ep_ctx_destroy(moe_ep_ctx *ctx);

/* Load / generate this rank's slice for an EP context over comm (collective; each rank reads
 * only its experts, plus the router and shared expert). virtual_ranks only checks that E is
 * divisible by N*V. */
moe_status moe_ep_weights_load(MPI_Comm comm, const moe_config *cfg, const char *path, int layer,
                               int virtual_ranks, moe_dtype dtype, moe_weights *w, moe_error *err);
moe_status moe_ep_weights_random(MPI_Comm comm, const moe_config *cfg, uint64_t seed,
                                 int virtual_ranks, moe_dtype dtype, moe_weights *w,
                                 moe_error *err);

/* Forward on this rank's T_local tokens. x [T,H], out [T,H] in the activation dtype;
 * router_logits [T,E] and topk_ids [T,k] (the ids used, forced or not) are optional outputs.
 * stats (optional, from moe_ep_stats_init with this ctx's shape) receives this call's counters
 * added; the ctx keeps its own running totals too (moe_ep_ctx_stats). Collective. */
moe_status moe_ep_forward(moe_ep_ctx *ctx, int T_local, const void *x, void *out,
                          void *router_logits, int32_t *topk_ids, moe_ep_stats *stats,
                          moe_error *err);
/* Backward for the loss sum(out * dout): dx [T,H], and gradients in grads (shaped like this
 * rank's weights, e.g. from moe_weights_zeros_like; overwritten): the local experts' w13/w2
 * slices, and the router and shared expert summed over ALL ranks' tokens (identical on every
 * rank; the sum runs in fp32 in ascending rank order). Recomputes the forward pieces it needs.
 * Runs as one chunk (options.chunks applies to forward). Collective. */
moe_status moe_ep_backward(moe_ep_ctx *ctx, int T_local, const void *x, const void *dout,
                           void *dx, moe_weights *grads, moe_ep_stats *stats, moe_error *err);

/* The running totals since creation (or the last reset). */
const moe_ep_stats *moe_ep_ctx_stats(const moe_ep_ctx *ctx);
void moe_ep_ctx_reset_stats(moe_ep_ctx *ctx);
int moe_ep_ctx_rank(const moe_ep_ctx *ctx);
int moe_ep_ctx_nranks(const moe_ep_ctx *ctx);

/* Sync-free sizing: the buffer rows for a given M (T_local bound), N, V, k: the dispatch send
 * rows (M * min(k, N*V)) and the receive rows (max_recv, or N*V*M when 0), and their bytes
 * for hidden H in dtype dt (forward: x + ids + weights; backward adds dout). */
typedef struct moe_ep_buffer_sizes {
    int64_t send_rows, recv_rows;
    size_t send_bytes, recv_bytes;
} moe_ep_buffer_sizes;
moe_status moe_ep_buffer_sizes_for(int64_t max_tokens_per_rank, int64_t max_recv_tokens,
                                   int nranks, int virtual_ranks, const moe_config *cfg,
                                   moe_dtype dt, bool backward, moe_ep_buffer_sizes *out,
                                   moe_error *err);

#endif /* MOE_EP_H_INTERNAL */
