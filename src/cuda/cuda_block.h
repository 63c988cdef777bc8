/*
 * cuda_block.h — the MoE block on one GPU: weights resident on the device, the fused forward
 * (router GEMM -> routing -> sort -> grouped GEMM1 -> grouped GEMM2 -> sum over k, plus
 * Llama-4's shared expert on a second stream) and the full backward, as host orchestration of
 * the kernels in kernels/ (moe_kernels.h, moe_kernels_aux.h) and cuBLAS.
 * Built only with MOE_HAVE_CUDA. The CPU twin is cpu_block_forward / cpu_block_backward
 * (src/cpu/cpu_fused.h): same stages, same argument structs, same named intermediates.
 *
 * Streams. All work of a block is enqueued on its main stream (cuda_block_stream); Llama-4's
 * shared expert runs on a second stream forked from and joined back into the main stream with
 * events. No function here synchronises the host except those documented as synchronous
 * (create/destroy, alloc/free, upload/download/sync helpers), so cuda_block_forward and
 * cuda_block_backward can be captured into a CUDA graph. Inputs (x, dout) must be ready in
 * the main stream's order; outputs are ready once the main stream reaches the end of the call.
 * The block's grouped GEMMs share its scratch, including the wgmma tile scheduler's counters
 * (moe_kernel_tuning.sched_counters, allocated with the block): launches and graph replays of
 * one block must run one after the other (one stream), never at the same time; any number of
 * graphs may be captured, nothing is consumed per capture.
 *
 * Pointers. "device" pointers are cudaMalloc'd memory of the block's device. Tensors are in
 * the block's dtype (the weights' dtype: bf16, fp16 or fp32) unless stated.
 * Shapes: T tokens, H hidden, I expert width, E experts, El local experts (global ids
 * [expert_begin, expert_begin+El)), k top-k, Is shared expert width, flat index f = t*k + j.
 *
 * Determinism: every kernel uses fixed reduction orders and no floating-point atomics, the
 * sort is a scan-based stable counting sort, and cuBLAS runs with a fixed workspace per
 * handle, so the same inputs give bit-identical outputs run after run on one GPU.
 *
 * A block is used by one host thread at a time (it owns scratch buffers).
 */
#ifndef MOE_CUDA_BLOCK_H
#define MOE_CUDA_BLOCK_H

#include <stdbool.h>
#include <stddef.h>

#include <cuda_runtime.h>

#include "moe_kernels.h"
#include "moe_stages.h"
#include "weights.h"

typedef struct cuda_block cuda_block;

/* Create a block on the CURRENT CUDA device (cudaSetDevice first): upload w (canonical
 * layout, every tensor in w->dtype, experts [w->expert_begin, +w->expert_count)) once, create
 * the streams, events and cuBLAS handles, and allocate scratch for up to max_T tokens
 * (forward only, or forward + backward when `backward`). Synchronous.
 * Errors: MOE_ERR_INVALID_ARG (a tensor's shape/dtype does not match w->cfg, named),
 * MOE_ERR_UNSUPPORTED (dtype other than bf16/fp16/fp32), MOE_ERR_NOMEM, MOE_ERR_CUDA. */
moe_status cuda_block_create(const moe_weights *w, int max_T, bool backward, cuda_block **out,
                             moe_error *err);
/* Synchronise and free everything. NULL is fine. */
void cuda_block_destroy(cuda_block *b);

/* The main stream (owned by the block unless replaced by cuda_block_set_stream). */
cudaStream_t cuda_block_stream(const cuda_block *b);
/* Use the caller's stream as the main stream from now on (the caller keeps owning it). */
moe_status cuda_block_set_stream(cuda_block *b, cudaStream_t stream, moe_error *err);
/* The configuration, dtype and local expert range the block was created with. */
const moe_config *cuda_block_config(const cuda_block *b);
moe_dtype cuda_block_dtype(const cuda_block *b);
void cuda_block_experts(const cuda_block *b, int *expert_begin, int *expert_count);

/* The grouped-GEMM launches of the block, for forcing a kernel configuration (autotuner,
 * --kernel-config) and reading back which kernel ran. */
typedef enum cuda_gemm_stage {
    CUDA_GEMM_FWD1 = 0, /* x -> act:       [M,H] x [H,2I], permute_x, SiLU-and-mul epilogue */
    CUDA_GEMM_FWD2,     /* act -> y:       [M,I] x [I,H], permute_y (Qwen3: weight in epilogue) */
    CUDA_GEMM_BWD_DA,   /* dout -> dA0:    [M,H] x [H,I] (W2 as [K,N]), permute_x */
    CUDA_GEMM_BWD_DX,   /* dgu -> dXs:     [M,2I] x [2I,H] (W13 as [K,N]), permute_y */
    CUDA_GEMM_DW2,      /* dW2_e [H,I] = (w dout)^T act */
    CUDA_GEMM_DW13,     /* dW13_e [2I,H] = dgu^T (s x) */
    CUDA_GEMM_NUM_STAGES
} cuda_gemm_stage;
/* cfg NULL (or all zeros) = let the launcher choose. */
void cuda_block_set_gemm_config(cuda_block *b, cuda_gemm_stage stage, const moe_kernel_config *cfg);
/* What the last launch of that stage reported (kernel NULL before the first launch). */
const moe_kernel_report *cuda_block_gemm_report(const cuda_block *b, cuda_gemm_stage stage);
/* Whether the block's last route (forward or cuda_block_route) ran as one launch
 * (moe_cuda_route_small: MOE_ROUTE_SMALL=1 and a batch it fits) rather than the router GEMM +
 * top-k + sort kernels. */
bool cuda_block_route_was_small(const cuda_block *b);
/* Device pointer to the block's count of tokens whose router logits held a NaN or an infinity
 * (one uint32 of device memory, zero at creation): every route of the block (forward,
 * cuda_block_route, either routing path) adds its tokens inside the top-k launch itself, with
 * no extra launch and no host read. Cumulative: the block never resets it; read it in the
 * block's stream order (e.g. cudaMemcpyAsync on cuda_block_stream, or after
 * cuda_block_sync) and zero it (cudaMemsetAsync on that stream) when convenient. */
uint32_t *cuda_block_nonfinite_counter(const cuda_block *b);
/* Autotuning: with on, every stage whose configuration was not forced runs the configuration
 * the autotuner picks for its real problem (src/cuda/autotune.h), persisted in cache_path
 * (NULL: $MOE_AUTOTUNE_CACHE or ~/.cache/moe-ep/autotune.json). Tuning synchronises the stream
 * the first time a shape is seen: run one eager forward/backward before capturing a graph. */
void cuda_block_set_autotune(cuda_block *b, bool on, const char *cache_path);
/* HF's exact rounding points in the Hopper grouped GEMMs (moe_kernel_tuning.exact_hf_rounding,
 * docs/KERNELS.md): Llama-4's x*score rounded to the dtype before GEMM1 and IEEE SiLU, instead
 * of the faster defaults (the score applied to GEMM1's fp32 accumulators, SiLU by
 * __expf/__fdividef). Off by default. The other kernels (mma.sync, FFMA, the CPU twin) always
 * round where HF does. Applies from the next launch; with autotuning on, such GEMMs are timed
 * and cached under their own keys. */
void cuda_block_set_exact_hf_rounding(cuda_block *b, bool on);
/* The device copies of the local experts' weights (canonical layout): w13 [El,2I,H], w2 [El,H,I]
 * (read-only; the benchmark's cuBLAS baselines run on the same bytes). */
void cuda_block_expert_weights(const cuda_block *b, const void **w13, const void **w2);

/* ---- forward state on the device ---- */

/* Allocate device buffers for every field of st, sized for T tokens (the sizes of
 * moe_fwd_state_alloc in block_state.h: router_logits [T,E], topk_ids/topk_w [T,k],
 * token_counts [E], expert_offsets [E+1], gather_idx [T*k], act [T*k,I], gemm2_out [T*k,H],
 * out [T,H]; gemm1_out [T*k,2I] only with for_backward; shared_out [T,H] only with a shared
 * expert). st->T = T. Synchronous. On failure nothing stays allocated. */
moe_status cuda_fwd_state_alloc(const cuda_block *b, int T, bool for_backward, moe_fwd_state *st,
                                moe_error *err);
/* cudaFree every non-NULL buffer of st (allocated by cuda_fwd_state_alloc) and zero st. */
void cuda_fwd_state_free(moe_fwd_state *st);
/* Copy every buffer that is non-NULL in both `dev` and `host` from the device to the host, for
 * dev->T tokens (integers: token_counts [El], expert_offsets [El+1], gather_idx [T*k]; act and
 * gemm1_out: all T*k rows, of which the first M = expert_offsets[El] are meaningful).
 * host->T = dev->T. Synchronises the main stream first. Synchronous. */
moe_status cuda_fwd_state_download(cuda_block *b, const moe_fwd_state *dev, moe_fwd_state *host,
                                   moe_error *err);
/* The reverse: copy every buffer non-NULL in both from `host` to `dev`, for host->T tokens
 * (same sizes as the download), e.g. to feed a GPU stage the CPU's upstream values.
 * dev->T = host->T. Synchronous (waits for the main stream before and after). */
moe_status cuda_fwd_state_upload(cuda_block *b, const moe_fwd_state *host, moe_fwd_state *dev,
                                 moe_error *err);

/* ---- the block ---- */

/* Routing only: logits [T,E] = round(x @ router^T) (cuBLAS, fp32 compute, no TF32), the fused
 * top-k kernel (topk_ids, topk_w), then token_counts / expert_offsets / gather_idx by the stable
 * counting sort over the local experts. Uses st->router_logits, topk_ids, topk_w, token_counts,
 * expert_offsets, gather_idx (all required). x [T,H] device. Asynchronous. */
moe_status cuda_block_route(cuda_block *b, const void *x, int T, moe_fwd_state *st,
                            moe_error *err);

/* Phase markers for timing (the bench's breakdown): with events set (an array of
 * CUDA_BLOCK_PHASE_EVENTS timing events, borrowed until reset with NULL), cuda_block_forward
 * records them on its main stream at: 0 start, 1 after the router GEMM + top-k, 2 after the
 * counting sort / offsets, 3 after grouped GEMM1 (SiLU-and-mul is its epilogue), 4 = 3 (the
 * activation has no launch of its own), 5 after grouped GEMM2, 6 after the sum over k (which
 * waits for Llama-4's shared expert, run on a second stream from 0 on). Not for captured graphs. */
#define CUDA_BLOCK_PHASE_EVENTS 7
void cuda_block_set_phase_events(cuda_block *b, cudaEvent_t *events);

/* Forward of the block on x [T,H] (device), T <= max_T, st from cuda_fwd_state_alloc (or
 * device buffers of the same sizes) with st->T == T.
 * Writes every non-NULL buffer of st; a NULL buffer (except out, which is required) is
 * replaced by the block's scratch, so a timed path can pass only `out`. With
 * want_intermediates, st->gemm1_out must be non-NULL and receives GEMM1's rounded [M,2I]
 * output (backward needs it, with act, router_logits, topk_ids, topk_w, expert_offsets and
 * gather_idx — keep those in st); without, gemm1_out is not written even if non-NULL.
 * gemm2_out rows of experts outside the block's local range are zero (as on the CPU).
 * Asynchronous, no host synchronisation: CUDA-graph capturable.
 * Llama-4: the shared expert (cuBLAS GEMM [T,H]x[H,2Is], SiLU-and-mul kernel, cuBLAS GEMM
 * [T,Is]x[Is,H]) runs on the second stream while the routing and the routed GEMMs run on the
 * main stream; the sum over k waits for it on an event. */
moe_status cuda_block_forward(cuda_block *b, const void *x, int T, moe_fwd_state *st,
                              bool want_intermediates, moe_error *err);

/* Device weight gradients in canonical layout (block dtype). */
typedef struct cuda_block_grads {
    void *router;      /* [E, H] */
    void *w13;         /* [El, 2I, H] */
    void *w2;          /* [El, H, I] */
    void *shared_gate; /* [Is, H]  (Llama-4 with a shared expert; else NULL) */
    void *shared_up;   /* [Is, H] */
    void *shared_down; /* [H, Is] */
} cuda_block_grads;
moe_status cuda_block_grads_alloc(const cuda_block *b, cuda_block_grads *g, moe_error *err);
void cuda_block_grads_free(cuda_block_grads *g);
/* Copy g into host tensors of `host` (which must be allocated in canonical shapes and the
 * block's dtype: router, w13, w2, and the shared ones with a shared expert). Synchronous. */
moe_status cuda_block_grads_download(cuda_block *b, const cuda_block_grads *g, moe_weights *host,
                                     moe_error *err);

/* Backward of sum(out * dout): dx [T,H] and every weight gradient (overwritten, not
 * accumulated) from dout [T,H], x [T,H] (the forward's input) and st (the forward's state,
 * with gemm1_out kept: cuda_block_forward(..., want_intermediates = true)). All device.
 * Needs a block created with backward = true. Mirrors cpu_block_backward:
 *   dA0 = dout W2 (grouped, permute_x) -> [Qwen3: dw_f = act.dA0, dact = round(w dA0)] ->
 *   SiLU-and-mul backward -> dXs = dgu W13 (grouped, permute_y) -> dW2, dW13 (grouped dW) ->
 *   [Llama-4: ds_f = x_t.dXs_f] -> router backward (dlogits) -> d_router = dlogits^T x,
 *   dx = round(dlogits router + [shared expert dx] + sum_j (s_f) dXs_f).
 * Llama-4's shared-expert backward runs on the second stream beside all of that.
 * With a partial expert range, dx and d_router hold this block's share (ranks' shares add up:
 * the router backward is linear in the weight gradients).
 * Asynchronous, no host synchronisation. */
moe_status cuda_block_backward(cuda_block *b, const void *x, int T, const moe_fwd_state *st,
                               const void *dout, void *dx, const cuda_block_grads *grads,
                               moe_error *err);

/* The backward's intermediates (device pointers into the block's scratch, valid until the next
 * backward), for the correctness mode's stage-by-stage checks. NULL fields where the model has
 * no such stage. */
typedef struct cuda_bwd_state {
    void *dA0;       /* [M, I] expert order: dout[t] @ W2_e (before the Qwen3 weight) */
    void *dgu;       /* [M, 2I] expert order: SiLU-and-mul backward output */
    void *dxs;       /* [T*k, H] flat order: dgu_r @ W13_e (rows of non-local experts unwritten) */
    float *dtop;     /* [T*k] fp32: d topk_w (Qwen3 weight / Llama-4 score) */
    void *dlogits;   /* [T, E] */
    void *dx_router; /* [T, H] dlogits @ router */
    void *dx_shared; /* [T, H] Llama-4 shared expert's dx */
} cuda_bwd_state;
void cuda_block_bwd_state(const cuda_block *b, cuda_bwd_state *out);

/* ---- small synchronous helpers for the correctness mode and tests ---- */

moe_status cuda_dev_alloc(void **p, size_t bytes, const char *what, moe_error *err);
void cuda_dev_free(void *p);
/* Copies on the main stream, then wait for it. */
moe_status cuda_block_upload(cuda_block *b, void *dst_dev, const void *src_host, size_t bytes,
                             moe_error *err);
moe_status cuda_block_download(cuda_block *b, void *dst_host, const void *src_dev, size_t bytes,
                               moe_error *err);
/* Wait for everything enqueued on the block's streams; a failure of an earlier asynchronous
 * launch surfaces here as MOE_ERR_CUDA. */
moe_status cuda_block_sync(cuda_block *b, moe_error *err);

#endif /* MOE_CUDA_BLOCK_H */
