/*
 * routing_small.cu — the whole route of a small batch (decode: T <= MOE_ROUTE_SMALL_MAX_T) in
 * one launch: router logits, top-k with its weights, and the stable counting sort by expert,
 * where the per-stage path (routing.cu) takes five (the router GEMM through cuBLAS, top-k,
 * histogram, scan, scatter) whose launch gaps, not their work, are what a decode step waits
 * for. Contract: moe_kernels_aux.h, moe_cuda_route_small. Tested in tests/test_gpu_routing.c
 * against a double-precision router GEMM and, bit for bit, against routing.cu's kernels run
 * on the same logits.
 *
 * One kernel of 256 threads (8 warps) per block, grid (ceil(E / 8), ceil(T / 8)):
 *  1. Warp w of block (bx, by) computes expert e = 8 bx + w's logits for tokens 8 by ..
 *     8 by + 7: a dot product over H per token (lanes stride H, 16-byte loads where the rows
 *     allow, fp32 fused multiply-adds, warp butterfly sum), rounded to the activation dtype as
 *     the router GEMM's output is. The summation order differs from cuBLAS's, so a logit can
 *     differ from the per-stage path's in its last bit (both are fp32 sums of the same
 *     products, rounded once).
 *  2. Each block fences its logits and counts itself in on a device counter; the last block
 *     to do so (the classic threadfence-reduction pattern) runs the rest, reading the logits
 *     through L2 (__ldcg): the top-k of every token (one warp per token, routing_device.cuh's
 *     topk_token: the very code of routing.cu's top-k kernel), then the counting sort of the
 *     T*k flat entries as one chunk (routing_device.cuh's histogram and ranked scatter, a warp
 *     scan of the El counts in between), and puts the counter back to zero for the next launch
 *     (stream order; CUDA-graph replays are ordered too).
 */
#include "moe_kernels_aux.h"
#include "routing_device.cuh"

#include <climits>

using namespace moe_aux;

#define SMALL_WARPS (SORT_THREADS / 32) /* the ranked scatter needs SORT_THREADS threads */
#define SMALL_TOKENS 8                  /* tokens per block in the logits phase */
#define SMALL_SMEM_MAX (48 * 1024)      /* no opt-in: beyond it the per-stage path runs */

namespace {

/* sum over h < H of a[h] * b[h] in fp32, over the warp (every lane returns it). vec: both rows
 * start on 16 bytes and H is a multiple of the 16-byte element count. */
template <typename scalar_t>
__device__ __forceinline__ float dot_row(const scalar_t *a, const scalar_t *b, int H, int lane, bool vec)
{
    float acc = 0.f;
    if (vec) {
        constexpr int V = 16 / sizeof(scalar_t);
        typedef vec_t<scalar_t, V> vt;
        const vt *av = reinterpret_cast<const vt *>(a), *bv = reinterpret_cast<const vt *>(b);
        for (int i = lane; i < H / V; i += 32) {
            const vt x = av[i], y = bv[i];
#pragma unroll
            for (int u = 0; u < V; u++) acc = fmaf(to_f(x.v[u]), to_f(y.v[u]), acc);
        }
    } else {
        for (int h = lane; h < H; h += 32) acc = fmaf(to_f(a[h]), to_f(b[h]), acc);
    }
    return warp_sum(acc);
}

template <typename scalar_t>
__global__ void __launch_bounds__(SORT_THREADS)
route_small_kernel(int T, int E, int H, int k, bool qwen, bool norm, bool vec,
                   const scalar_t *__restrict__ x, const scalar_t *__restrict__ router,
                   scalar_t *logits, int32_t *ids, scalar_t *__restrict__ w, int begin, int El,
                   int32_t *__restrict__ counts, int32_t *__restrict__ offsets,
                   int32_t *__restrict__ gather, int *done, uint32_t *nonfinite)
{
    extern __shared__ float small_smem[];
    __shared__ bool s_last;
    __shared__ int s_kept;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    /* 1. logits of one expert for this block's tokens */
    const int e = blockIdx.x * SMALL_WARPS + warp;
    const int t0 = blockIdx.y * SMALL_TOKENS, t1 = min(T, t0 + SMALL_TOKENS);
    if (e < E) {
        const scalar_t *wrow = router + (size_t)e * H;
        for (int t = t0; t < t1; t++) {
            const float s = dot_row(x + (size_t)t * H, wrow, H, lane, vec);
            if (lane == 0) logits[(size_t)t * E + e] = from_f<scalar_t>(s);
        }
    }

    /* 2. the last block to finish goes on */
    __threadfence(); /* this thread's logits reach the device before the count-in */
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(done, 1) == (int)(gridDim.x * gridDim.y) - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence(); /* the other blocks' logits, seen through their count-ins, come first */

    for (int t = warp; t < T; t += SMALL_WARPS)
        topk_token<scalar_t, true>(logits + (size_t)t * E, E, k, qwen, norm, small_smem + (size_t)warp * E,
                                   lane, ids + (size_t)t * k, w + (size_t)t * k, nonfinite);
    __syncthreads(); /* every token's ids are visible to the block; the scores' memory is free */

    /* 3. the stable counting sort of the T*k flat entries, one chunk */
    const long long M = (long long)T * k;
    int *hist = reinterpret_cast<int *>(small_smem); /* [El] */
    int *run = hist + El;                            /* [El] */
    int *wcnt = run + El;                            /* [SORT_WARPS][El] */
    for (int i = threadIdx.x; i < El; i += blockDim.x) hist[i] = 0;
    for (int i = threadIdx.x; i < SORT_WARPS * El; i += blockDim.x) wcnt[i] = 0;
    __syncthreads();
    sort_hist_chunk(M, ids, begin, El, 0, hist);
    __syncthreads();
    if (warp == 0) { /* exclusive scan of the counts, 32 experts per step */
        int carry = 0;
        for (int b = 0; b < El; b += 32) {
            const int i = b + lane;
            const int c = i < El ? hist[i] : 0;
            int incl = c;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, incl, d);
                if (lane >= d) incl += y;
            }
            if (i < El) {
                run[i] = carry + incl - c;
                offsets[i] = carry + incl - c;
                counts[i] = c;
            }
            carry += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0) {
            offsets[El] = carry;
            s_kept = carry;
        }
    }
    __syncthreads();
    sort_scatter_chunk(M, ids, begin, El, 0, run, wcnt, &s_kept, gather);
    if (threadIdx.x == 0) *done = 0; /* ready for the next launch */
}

size_t small_smem_bytes(int E, int El)
{
    const size_t scores = (size_t)SMALL_WARPS * E * sizeof(float);
    const size_t sort = (size_t)(2 + SORT_WARPS) * El * sizeof(int);
    return scores > sort ? scores : sort;
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

} // namespace

extern "C" bool moe_cuda_route_small_fits(const moe_config *cfg, int T, int El)
{
    if (!cfg || T < 1 || T > MOE_ROUTE_SMALL_MAX_T || El < 1) return false;
    const int E = cfg->num_experts, k = cfg->top_k;
    if (E < 1 || k < 1 || k > E || cfg->hidden < 1) return false;
    if ((long long)T * k > SORT_CHUNK) return false;
    return small_smem_bytes(E, El) <= SMALL_SMEM_MAX;
}

extern "C" moe_status moe_cuda_route_small(const moe_config *cfg, moe_dtype dt, int T, const void *x,
                                           const void *router, void *logits, int32_t *topk_ids,
                                           void *topk_w, int expert_begin, int El,
                                           int32_t *token_counts, int32_t *expert_offsets,
                                           int32_t *gather_idx, int *counter,
                                           uint32_t *nonfinite_count, cudaStream_t stream,
                                           moe_error *err)
{
    MOE_AUX_REQUIRE(cfg != NULL, "moe_cuda_route_small: cfg is NULL");
    MOE_AUX_REQUIRE(moe_aux_float_dtype(dt), "moe_cuda_route_small: dtype %d is not bf16/fp16/fp32",
                    (int)dt);
    MOE_AUX_REQUIRE(cfg->arch == MOE_ARCH_QWEN3 || cfg->arch == MOE_ARCH_LLAMA4,
                    "moe_cuda_route_small: unknown arch %d", (int)cfg->arch);
    MOE_AUX_REQUIRE(expert_begin >= 0, "moe_cuda_route_small: expert_begin = %d < 0", expert_begin);
    MOE_AUX_REQUIRE(moe_cuda_route_small_fits(cfg, T, El),
                    "moe_cuda_route_small: T = %d (1..%d, T*top_k <= %d), E = %d, top_k = %d, El = %d "
                    "does not fit the one-launch route; use moe_cuda_route_topk + "
                    "moe_cuda_sort_by_expert", T, MOE_ROUTE_SMALL_MAX_T, SORT_CHUNK,
                    cfg->num_experts, cfg->top_k, El);
    MOE_AUX_REQUIRE(x && router && logits && topk_ids && topk_w && token_counts && expert_offsets &&
                        gather_idx && counter,
                    "moe_cuda_route_small: every pointer must be a device pointer (one is NULL)");
    const int E = cfg->num_experts, k = cfg->top_k, H = cfg->hidden;
    const bool qwen = cfg->arch == MOE_ARCH_QWEN3, norm = qwen && cfg->norm_topk_prob;
    const size_t es = moe_dtype_size(dt);
    const bool vec = aligned16(x) && aligned16(router) && (H * es) % 16 == 0;
    const dim3 grid((unsigned)((E + SMALL_WARPS - 1) / SMALL_WARPS),
                    (unsigned)((T + SMALL_TOKENS - 1) / SMALL_TOKENS));
    const size_t smem = small_smem_bytes(E, El);
    MOE_AUX_DISPATCH(dt, {
        route_small_kernel<scalar_t><<<grid, SORT_THREADS, smem, stream>>>(
            T, E, H, k, qwen, norm, vec, (const scalar_t *)x, (const scalar_t *)router,
            (scalar_t *)logits, topk_ids, (scalar_t *)topk_w, expert_begin, El, token_counts,
            expert_offsets, gather_idx, counter, nonfinite_count);
    });
    MOE_AUX_CHECK_LAUNCH("route_small_kernel");
    return MOE_OK;
}
