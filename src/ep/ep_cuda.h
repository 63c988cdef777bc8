/*
 * ep_cuda.h — expert parallelism on the CUDA backend: the EP forward and backward of ep.h with
 * every tensor on the GPU. CUDA builds only (include it under #ifdef MOE_HAVE_CUDA).
 *
 * The scheme is ep.h's (docs/EP.md): rank r owns experts [r*E/N, (r+1)*E/N); with V virtual
 * ranks per process the experts are cut into G = N*V slices. Per call:
 *   route     router GEMM (cuBLAS, as cuda_block) + the fused top-k kernel on the device (or a
 *             forced routing, computed on the host: that synchronises);
 *   plan      kernels/ep_pack.cu numbers, per virtual destination, the tokens going there
 *             (device integer scans: a pure function of the ids);
 *   counts    default mode: the per-destination counts come to the host (one small copy and
 *             a stream synchronisation) and are exchanged with MPI_Alltoall, so every payload
 *             transfer has its exact size. Sync-free mode (below): they stay on the device;
 *   dispatch  token rows x [H], k expert-id slots (-1 where the destination does not own the
 *             expert) and k weights: NCCL (device buffers, grouped ncclSend/ncclRecv on the
 *             ctx's stream, one GPU per rank; to itself with N = 1) or MPI (host staging
 *             buffers, MPI_Ialltoallv, for several ranks sharing one GPU);
 *   compute   each virtual rank's rows: stable sort by its experts (ids outside its slice are
 *             ignored), grouped GEMM1 (permute_x, SiLU-and-mul epilogue; Llama-4's score
 *             scales the input), grouped GEMM2 (permute_y; Qwen3's weight in the epilogue),
 *             then the sum over the k slots it owns: one partial row per received token;
 *   combine   the partial rows travel back into the row each token was sent from and the
 *             source adds them in ascending virtual-rank order after Llama-4's shared expert
 *             (computed locally on a second stream while the dispatch runs). No float atomics:
 *             the result is bitwise reproducible and does not depend on arrival order.
 * N = 1, V = 1 and the router's own routing is the plain fused path: cuda_block_forward /
 * cuda_block_backward, nothing copied or sent.
 *
 * Sync-free mode: options.max_tokens_per_rank = M > 0 with the NCCL transport. Every buffer is
 * allocated at creation and the forward never waits for the device: each (source, virtual
 * destination) pair has a slot of M rows (a token goes at most once to a destination), whole
 * slots travel with the row count as a device integer beside them, and the receiver compacts
 * what arrived on the device and computes max(rows) = min(N*M, max_recv_tokens or N*M) rows
 * per virtual rank (the grouped GEMMs size their launch from that and read the real offsets
 * on the device). The forward can be captured into a CUDA graph and replayed (same T, same
 * pointers, new contents). A receive overflow (more rows than max_recv_tokens) cannot be seen
 * on the host without a synchronisation: it raises a device flag, and moe_ep_cuda_check()
 * (after the call or after a graph replay) reports it as an error; rows past the bound are
 * never silently dropped from a result that is reported as good. Forced routing synchronises
 * (it is a host-side feature) and is not capturable. With the MPI transport, M > 0 sizes the
 * buffers in advance but the host still takes part (MPI is host code); overflow is then
 * reported on every rank before any payload moves, as on the CPU backend.
 *
 * Pointers: x, out, dout, dx, logits, ids and the gradients are device pointers on the ctx's
 * device. Inputs must be ready in the order of the ctx's stream (moe_ep_cuda_stream); outputs
 * are ready when the stream reaches the end of the call. Every call is collective over the
 * ctx's communicator (all ranks, same order; T_local may differ, 0 included); an argument
 * error on any rank makes every rank return an error before data moves; a failure after data
 * started moving is fatal (MPI_Abort unless options.abort_on_fatal is false).
 *
 * Chunks (options.chunks = C > 1, default mode): the local batch is cut in C contiguous pieces,
 * all planned at once (one counts exchange); chunk i's experts run on the ctx's stream while
 * the dispatch of chunk i+1 and the combine of chunk i-1 are in flight (NCCL: grouped
 * send/recv on a second, communication stream, ordered by events; MPI: non-blocking
 * MPI_Ialltoallv posted from the host). The result equals C = 1's within the dtype's tolerance
 * (bitwise unless the grouped GEMM picks another kernel for a chunk's fewer rows), and is
 * bitwise reproducible. A chunked forward waits for the device at its end, to read the
 * per-chunk timeline (device events) into the stats. Chunks with sync-free mode are refused
 * (MOE_ERR_UNSUPPORTED at creation); the backward runs as one chunk.
 * Counters: per-peer rows and bytes are counted in the default mode; in sync-free mode the
 * counts stay on the device and only calls and local tokens are counted.
 */
#ifndef MOE_EP_CUDA_H
#define MOE_EP_CUDA_H

#include <cuda_runtime.h>

#include "../cuda/cuda_block.h"
#include "ep.h"

typedef struct moe_ep_cuda_ctx moe_ep_cuda_ctx;

/* Collective over comm. w: this rank's slice (host tensors, as for moe_ep_ctx_create),
 * uploaded once; borrowed only during the call. Transport: NCCL, MPI, or AUTO = NCCL when
 * every rank of every node has its own GPU, else MPI. Device: options.device, or the
 * node-local rank (NCCL) / node-local rank modulo the GPU count (MPI, GPUs may be shared).
 * NCCL with more ranks on a node than GPUs fails on every rank with a message pointing at
 * --transport mpi. */
moe_status moe_ep_cuda_ctx_create(MPI_Comm comm, const moe_weights *w, const moe_ep_options *opts,
                                  moe_ep_cuda_ctx **out, moe_error *err);
void moe_ep_cuda_ctx_destroy(moe_ep_cuda_ctx *ctx);

/* The stream every call runs on (owned by the ctx), the CUDA device, the transport in use
 * ("nccl", "mpi", or "none" for the plain path) and whether the ctx is in sync-free mode. */
cudaStream_t moe_ep_cuda_stream(const moe_ep_cuda_ctx *ctx);
int moe_ep_cuda_device(const moe_ep_cuda_ctx *ctx);
const char *moe_ep_cuda_transport(const moe_ep_cuda_ctx *ctx);
bool moe_ep_cuda_syncfree(const moe_ep_cuda_ctx *ctx);

/* Forward on this rank's T_local tokens x [T,H] -> out [T,H] (device, activation dtype).
 * router_logits [T,E] and topk_ids [T,k] (device) are optional outputs. stats as in
 * moe_ep_forward. Collective. In sync-free mode no host synchronisation happens inside (call
 * moe_ep_cuda_check afterwards to learn about a receive overflow). */
moe_status moe_ep_cuda_forward(moe_ep_cuda_ctx *ctx, int T_local, const void *x, void *out,
                               void *router_logits, int32_t *topk_ids, moe_ep_stats *stats,
                               moe_error *err);

/* Device gradients shaped like this rank's weights (router [E,H], w13 [El,2I,H], w2 [El,H,I],
 * Llama-4 shared ones): cuda_dev_alloc'ed, freed with cuda_block_grads_free. */
moe_status moe_ep_cuda_grads_alloc(const moe_ep_cuda_ctx *ctx, cuda_block_grads *g, moe_error *err);

/* Backward for the loss sum(out * dout): dx [T,H] and grads (device, overwritten): the local
 * experts' w13/w2 slices, and the router and shared expert summed over ALL ranks' tokens
 * (fp32 partials added in ascending rank order on the host, rounded once: identical on every
 * rank). Recomputes the forward pieces it needs. Synchronises (counts and the replicated
 * gradients go through the host). Collective. */
moe_status moe_ep_cuda_backward(moe_ep_cuda_ctx *ctx, int T_local, const void *x,
                                const void *dout, void *dx, const cuda_block_grads *grads,
                                moe_ep_stats *stats, moe_error *err);

/* Wait for the ctx's stream (watching NCCL for asynchronous errors) and report what the device
 * recorded: a sync-free receive overflow becomes MOE_ERR_INVALID_ARG naming the rank, the rows
 * that arrived and the bound (the flag is then cleared). Local (not collective). */
moe_status moe_ep_cuda_check(moe_ep_cuda_ctx *ctx, moe_error *err);

/* Counters, as moe_ep_ctx_stats / moe_ep_ctx_reset_stats. */
const moe_ep_stats *moe_ep_cuda_stats(const moe_ep_cuda_ctx *ctx);
void moe_ep_cuda_reset_stats(moe_ep_cuda_ctx *ctx);

#endif /* MOE_EP_CUDA_H */
