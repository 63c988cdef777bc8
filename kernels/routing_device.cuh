/*
 * routing_device.cuh — the device pieces of routing shared by kernels/routing.cu (the
 * per-stage kernels: top-k, the three-kernel counting sort, router backward) and
 * kernels/routing_small.cu (the one-launch route of small batches), so both compute the
 * same top-k and the same stable sort: score loading and the total order of top-k, one
 * token's top-k, and the counting sort's per-chunk histogram and ranked scatter. The
 * algorithms are described in routing.cu's header. Private to those files.
 */
#ifndef MOE_ROUTING_DEVICE_CUH
#define MOE_ROUTING_DEVICE_CUH

#include "moe_aux_device.cuh"

#include <climits>

#define ROUTE_WARPS 4
#define SORT_CHUNK 2048
#define SORT_THREADS 256
#define SORT_WARPS (SORT_THREADS / 32)

namespace moe_aux {

/* Load one token's logits into v[E] (fp32) and, for Qwen3, turn them into softmax
 * probabilities p = exp(l - max) / sum, in the CPU twin's order: expf of the max-shifted
 * logits, summed sequentially in ascending id (one lane: E adds per token, cheap next to the
 * memory traffic), true division. Shared by the forward and the backward so both see
 * bit-identical p. CG: load through L2 only (__ldcg), for logits that other blocks of the
 * same launch wrote. nonfinite (NULL: not asked): set, the same on every lane, to whether a
 * logit of the row is NaN or infinite (the raw logits: softmax turns -inf into a finite 0).
 * Ends with __syncwarp. */
template <typename scalar_t, bool CG = false>
__device__ __forceinline__ void load_scores(const scalar_t *__restrict__ row, int E, bool qwen,
                                            float *v, int lane, bool *nonfinite = nullptr)
{
    float mx = -INFINITY;
    bool bad = false;
    for (int e = lane; e < E; e += 32) {
        const float l = to_f(CG ? __ldcg(row + e) : row[e]);
        v[e] = l;
        if (l > mx) mx = l;
        bad |= !isfinite(l);
    }
    if (nonfinite) *nonfinite = __any_sync(0xffffffffu, bad);
    if (qwen) {
        mx = warp_max(mx);
        for (int e = lane; e < E; e += 32) v[e] = expf(v[e] - mx);
        __syncwarp();
        float s = 0.f;
        if (lane == 0)
            for (int e = 0; e < E; e++) s += v[e];
        s = __shfl_sync(0xffffffffu, s, 0);
        for (int e = lane; e < E; e += 32) v[e] = v[e] / s;
    }
    __syncwarp();
}

/* a ranks before b: larger value first, on a tie the lower id; a NaN ranks below every
 * number (NaNs among themselves by id). A total order on (value, id) pairs. */
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib)
{
    if (a != a) return b != b && ia < ib;
    if (b != b) return true;
    return a > b || (a == b && ia < ib);
}

/* Top-k of one token (one warp): its logits row [E] through load_scores into v[E] (shared
 * memory), then k rounds of a warp argmax under ranks_before's total order, each taking the
 * best key strictly after the previous round's (no "taken" flags; ties to the lower id);
 * orow[k] the global ids in descending order, wrow[k] the weights (Qwen3: p, renormalised over
 * the k when norm; Llama-4: sigmoid of the logit), rounded to scalar_t. nonfinite_count (NULL:
 * not counted): +1 (an integer atomic: the count does not depend on the order) when a logit of
 * the row is NaN or infinite. */
template <typename scalar_t, bool CG>
__device__ __forceinline__ void topk_token(const scalar_t *__restrict__ row, int E, int k, bool qwen,
                                           bool norm, float *v, int lane, int32_t *__restrict__ orow,
                                           scalar_t *__restrict__ wrow, uint32_t *nonfinite_count)
{
    bool nonfinite = false;
    load_scores<scalar_t, CG>(row, E, qwen, v, lane, nonfinite_count ? &nonfinite : nullptr);
    if (nonfinite && lane == 0) atomicAdd(nonfinite_count, 1u);

    float prev_v = 0.f;
    int prev_id = -1; /* no previous round */
    float sel_sum = 0.f; /* sum of the selected raw scores in selection order (renorm) */
    for (int j = 0; j < k; j++) {
        /* The best key ranking after the previous round's: INT_MAX id = none yet. */
        float bv = 0.f;
        int bi = INT_MAX;
        for (int e = lane; e < E; e += 32) {
            const float x = v[e];
            if ((prev_id < 0 || ranks_before(prev_v, prev_id, x, e)) &&
                (bi == INT_MAX || ranks_before(x, e, bv, bi))) {
                bv = x;
                bi = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi != INT_MAX && (bi == INT_MAX || ranks_before(ov, oi, bv, bi))) {
                bv = ov;
                bi = oi;
            }
        }
        /* bi is always a valid id: the order is total and k <= E keys remain. */
        if (lane == 0) orow[j] = bi;
        prev_v = bv;
        prev_id = bi;
        sel_sum += bv;
    }
    __syncwarp(); /* orow written by lane 0 is read by all lanes below */
    for (int j = lane; j < k; j += 32) {
        const float x = v[orow[j]];
        float r;
        if (qwen)
            r = norm ? x / sel_sum : x;
        else
            r = 1.f / (1.f + expf(-x));
        wrow[j] = from_f<scalar_t>(r);
    }
}

/* ---- stable counting sort ----
 * (ids without __restrict__ here: routing_small.cu's kernel sorts the ids it wrote itself in
 * the same launch, which must not be read through the read-only data path.) */

__device__ __forceinline__ int local_expert(const int32_t *ids, long long f, int begin, int El)
{
    const long long x = (long long)ids[f] - begin;
    return (x >= 0 && x < El) ? (int)x : -1;
}

/* Adds the rows of each local expert among flat entries [base, base + SORT_CHUNK) (< M) to
 * hist[El] (shared, zeroed by the caller; integer atomics: the counts do not depend on their
 * order). */
__device__ __forceinline__ void sort_hist_chunk(long long M, const int32_t *ids, int begin, int El,
                                                long long base, int *hist)
{
    for (int i = threadIdx.x; i < SORT_CHUNK; i += blockDim.x) {
        const long long f = base + i;
        if (f >= M) break;
        const int e = local_expert(ids, f, begin, El);
        if (e >= 0) atomicAdd(&hist[e], 1);
    }
}

/* The ranked scatter of flat entries [base, base + SORT_CHUNK) (< M), by a block of
 * SORT_THREADS threads: run[El] (shared) holds each local expert's next free output row for
 * this chunk, wcnt[SORT_WARPS][El] (shared) zeros; both ready before the call (the caller's
 * __syncthreads). Each tile of SORT_THREADS entries is ranked by warp match + the counts of
 * the earlier warps + run, so equal experts keep ascending f. Then rows [*kept, M) of
 * gather_idx (M = T*k flat entries, *kept = rows of local experts, read only then) that fall in
 * this chunk get -1. */
__device__ __forceinline__ void sort_scatter_chunk(long long M, const int32_t *ids, int begin,
                                                   int El, long long base, int *run,
                                                   int *wcnt, const int *kept, int32_t *__restrict__ gather)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned lt_mask = (1u << lane) - 1u;
    for (int tile = 0; tile < SORT_CHUNK && base + tile < M; tile += SORT_THREADS) {
        const long long f = base + tile + threadIdx.x;
        const int e = f < M ? local_expert(ids, f, begin, El) : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(peers & lt_mask); /* equal experts in lower lanes */
        const bool leader = rank == 0;
        if (e >= 0 && leader) wcnt[warp * El + e] = __popc(peers);
        __syncthreads();
        if (e >= 0) {
            int pos = run[e] + rank;
            for (int w = 0; w < warp; w++) pos += wcnt[w * El + e];
            gather[pos] = (int32_t)f;
        }
        __syncthreads();
        if (e >= 0 && leader) {
            atomicAdd(&run[e], __popc(peers)); /* integer: the sum is order-independent */
            wcnt[warp * El + e] = 0;
        }
        __syncthreads();
    }
    /* Rows [M_kept, T*k) of gather_idx belong to nobody: mark them. */
    const int kept_rows = *kept;
    for (int i = threadIdx.x; i < SORT_CHUNK; i += blockDim.x) {
        const long long p = base + i;
        if (p < M && p >= kept_rows) gather[p] = -1;
    }
}

} // namespace moe_aux

#endif /* MOE_ROUTING_DEVICE_CUH */
