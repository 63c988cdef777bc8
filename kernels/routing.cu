/*
 * routing.cu — the routing kernels of the MoE block: fused softmax/top-k/renormalise (Qwen3)
 * and top-k/sigmoid (Llama-4), the stable counting sort of routed rows by expert, and the
 * router backward. Declarations and contracts: kernels/moe_kernels_aux.h. CPU twins:
 * cpu_route_topk, cpu_sort_by_expert (src/cpu/cpu_fused.h). Tested against double loops in
 * tests/test_gpu_routing.c. The device pieces (one token's top-k, the sort's chunk histogram
 * and ranked scatter) live in routing_device.cuh, shared with routing_small.cu.
 *
 * Shapes: logits [T, E]; topk_ids, topk_w [T, k]; flat index f = t*k + j; El local experts.
 *
 * Launch configuration
 *  - route / router backward: one warp per token, 4 warps (128 threads) per block; the token's
 *    E scores live in shared memory (E*4 bytes per warp; E*8 for the backward), so any E and k
 *    work. Top-k is k rounds of a warp argmax under the total order (value desc, id asc): round
 *    j takes the best key strictly after round j-1's key, so no "taken" flags are needed and
 *    ties go to the lower id. For Qwen3-30B (E=128, k=8) that is 8 rounds of 4 loads + 5
 *    shuffles per lane — the kernel is bound by reading the logits (T*E*2 bytes).
 *  - sort: chunks of SORT_CHUNK flat entries per block. (1) per-chunk histograms with shared
 *    integer atomics (the counts do not depend on their order); (2) one block scans the
 *    [El][chunks] counts in expert-major order, giving each (expert, chunk) its first output
 *    row; (3) each chunk walks its entries in tiles of 256 in order; an entry's rank among the
 *    equal experts before it comes from __match_any_sync inside its warp plus the per-warp
 *    counts of earlier warps in the tile plus a running per-expert count — so equal experts
 *    keep ascending f (stable), and the output depends only on the ids.
 */
#include "moe_kernels_aux.h"
#include "routing_device.cuh"

#include <climits>

using namespace moe_aux;

#define SCAN_THREADS 1024

template <typename scalar_t>
__global__ void __launch_bounds__(ROUTE_WARPS * 32)
route_topk_kernel(int ntok, int E, int k, bool qwen, bool norm, const scalar_t *__restrict__ logits,
                  int32_t *__restrict__ ids, scalar_t *__restrict__ w, uint32_t *nonfinite)
{
    extern __shared__ float route_smem[];
    const int wpb = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long t = (long long)blockIdx.x * wpb + warp;
    if (t >= ntok) return; /* whole warp: t is warp-uniform */
    topk_token<scalar_t, false>(logits + t * E, E, k, qwen, norm, route_smem + (size_t)warp * E, lane,
                                ids + t * k, w + t * k, nonfinite);
}

template <typename scalar_t>
__global__ void __launch_bounds__(ROUTE_WARPS * 32)
router_bwd_kernel(int ntok, int E, int k, bool qwen, bool norm, const scalar_t *__restrict__ logits,
                  const int32_t *__restrict__ ids, const float *__restrict__ dw,
                  scalar_t *__restrict__ dlogits)
{
    extern __shared__ float route_smem[];
    const int wpb = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long t = (long long)blockIdx.x * wpb + warp;
    if (t >= ntok) return;
    float *v = route_smem + (size_t)warp * 2 * E;
    int *sel = (int *)(v + E); /* sel[e] = j+1 if e is choice j of this token, else 0 */
    for (int e = lane; e < E; e += 32) sel[e] = 0;
    load_scores(logits + t * E, E, qwen, v, lane); /* ends with __syncwarp */
    const int32_t *irow = ids + t * k;
    const float *drow = dw + t * k;
    for (int j = lane; j < k; j += 32) {
        const int id = irow[j];
        if (id >= 0 && id < E) sel[id] = j + 1;
    }
    __syncwarp();
    /* Per-token scalars, summed in j order by every lane (same order as the forward's S). */
    float S = 0.f, c = 0.f;
    if (qwen) {
        if (norm) {
            for (int j = 0; j < k; j++) {
                const int id = irow[j];
                if (id >= 0 && id < E) S += v[id];
            }
            for (int j = 0; j < k; j++) {
                const int id = irow[j];
                if (id >= 0 && id < E) c = __fadd_rn(c, __fmul_rn(drow[j], v[id] / S));
            }
        } else {
            for (int j = 0; j < k; j++) {
                const int id = irow[j];
                if (id >= 0 && id < E) c = __fadd_rn(c, __fmul_rn(v[id], drow[j]));
            }
        }
    }
    scalar_t *orow = dlogits + t * E;
    for (int e = lane; e < E; e += 32) {
        const int s = sel[e];
        float g = 0.f;
        if (qwen && !norm) {
            /* selected: p (dw - c); others: -p c (the twin's two expressions) */
            g = s ? v[e] * (drow[s - 1] - c) : -v[e] * c;
        } else if (qwen) {
            if (s) g = v[e] * ((drow[s - 1] - c) / S);
        } else if (s) {
            const float sg = 1.f / (1.f + expf(-v[e]));
            g = drow[s - 1] * sg * (1.f - sg);
        }
        orow[e] = from_f<scalar_t>(g);
    }
}

/* Opt in to more than the default 48 KB of dynamic shared memory when a launch needs it;
 * MOE_ERR_UNSUPPORTED beyond what the device allows. */
static moe_status smem_optin(const void *kernel, size_t smem, const char *name, moe_error *err)
{
    if (smem <= 48 * 1024) return MOE_OK;
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess)
        return moe_fail(err, MOE_ERR_CUDA, "%s: device query failed: %s", name, cudaGetErrorString(e));
    if (smem > (size_t)optin)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "%s: %zu bytes of shared memory exceed the device's %d",
                        name, smem, optin);
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess)
        return moe_fail(err, MOE_ERR_CUDA, "%s: cudaFuncSetAttribute: %s", name, cudaGetErrorString(e));
    return MOE_OK;
}

/* Pick warps per block and dynamic shared memory for a per-warp footprint of `per_warp`
 * bytes (one warp per token). */
static moe_status route_launch_shape(const void *kernel, size_t per_warp, const char *name,
                                     int *wpb, size_t *smem, moe_error *err)
{
    int w = ROUTE_WARPS;
    while (w > 1 && per_warp * (size_t)w > 48 * 1024) w--;
    *wpb = w;
    *smem = per_warp * (size_t)w;
    return smem_optin(kernel, *smem, name, err);
}

extern "C" moe_status moe_cuda_route_topk(const moe_config *cfg, moe_dtype dt, int T,
                                          const void *logits, int32_t *topk_ids, void *topk_w,
                                          uint32_t *nonfinite_count, cudaStream_t stream,
                                          moe_error *err)
{
    MOE_AUX_REQUIRE(cfg != NULL, "moe_cuda_route_topk: cfg is NULL");
    MOE_AUX_REQUIRE(moe_aux_float_dtype(dt), "moe_cuda_route_topk: dtype %d is not bf16/fp16/fp32",
                    (int)dt);
    MOE_AUX_REQUIRE(cfg->arch == MOE_ARCH_QWEN3 || cfg->arch == MOE_ARCH_LLAMA4,
                    "moe_cuda_route_topk: unknown arch %d", (int)cfg->arch);
    const int E = cfg->num_experts, k = cfg->top_k;
    MOE_AUX_REQUIRE(E >= 1 && k >= 1 && k <= E,
                    "moe_cuda_route_topk: need 1 <= top_k (%d) <= num_experts (%d)", k, E);
    MOE_AUX_REQUIRE(T >= 0, "moe_cuda_route_topk: T = %d < 0", T);
    MOE_AUX_REQUIRE((long long)T * k <= INT_MAX, "moe_cuda_route_topk: T*k = %lld exceeds int32",
                    (long long)T * k);
    if (T == 0) return MOE_OK;
    MOE_AUX_REQUIRE(logits && topk_ids && topk_w,
                    "moe_cuda_route_topk: logits, topk_ids and topk_w must be device pointers "
                    "(got %p, %p, %p)", logits, (void *)topk_ids, topk_w);
    const bool qwen = cfg->arch == MOE_ARCH_QWEN3, norm = qwen && cfg->norm_topk_prob;
    moe_status st = MOE_OK;
    MOE_AUX_DISPATCH(dt, {
        int wpb;
        size_t smem;
        st = route_launch_shape((const void *)route_topk_kernel<scalar_t>, (size_t)E * sizeof(float),
                                "moe_cuda_route_topk", &wpb, &smem, err);
        if (st != MOE_OK) return st;
        const unsigned grid = (unsigned)((T + wpb - 1) / wpb);
        route_topk_kernel<scalar_t><<<grid, wpb * 32, smem, stream>>>(
            T, E, k, qwen, norm, (const scalar_t *)logits, topk_ids, (scalar_t *)topk_w, nonfinite_count);
    });
    MOE_AUX_CHECK_LAUNCH("route_topk_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_router_backward(const moe_config *cfg, moe_dtype dt, int T,
                                               const void *logits, const int32_t *topk_ids,
                                               const float *dw, void *dlogits,
                                               cudaStream_t stream, moe_error *err)
{
    MOE_AUX_REQUIRE(cfg != NULL, "moe_cuda_router_backward: cfg is NULL");
    MOE_AUX_REQUIRE(moe_aux_float_dtype(dt),
                    "moe_cuda_router_backward: dtype %d is not bf16/fp16/fp32", (int)dt);
    MOE_AUX_REQUIRE(cfg->arch == MOE_ARCH_QWEN3 || cfg->arch == MOE_ARCH_LLAMA4,
                    "moe_cuda_router_backward: unknown arch %d", (int)cfg->arch);
    const int E = cfg->num_experts, k = cfg->top_k;
    MOE_AUX_REQUIRE(E >= 1 && k >= 1 && k <= E,
                    "moe_cuda_router_backward: need 1 <= top_k (%d) <= num_experts (%d)", k, E);
    MOE_AUX_REQUIRE(T >= 0, "moe_cuda_router_backward: T = %d < 0", T);
    if (T == 0) return MOE_OK;
    MOE_AUX_REQUIRE(logits && topk_ids && dw && dlogits,
                    "moe_cuda_router_backward: logits, topk_ids, dw and dlogits must be device "
                    "pointers");
    const bool qwen = cfg->arch == MOE_ARCH_QWEN3, norm = qwen && cfg->norm_topk_prob;
    moe_status st = MOE_OK;
    MOE_AUX_DISPATCH(dt, {
        int wpb;
        size_t smem;
        st = route_launch_shape((const void *)router_bwd_kernel<scalar_t>, (size_t)E * 2 * sizeof(float),
                                "moe_cuda_router_backward", &wpb, &smem, err);
        if (st != MOE_OK) return st;
        const unsigned grid = (unsigned)((T + wpb - 1) / wpb);
        router_bwd_kernel<scalar_t><<<grid, wpb * 32, smem, stream>>>(
            T, E, k, qwen, norm, (const scalar_t *)logits, topk_ids, dw, (scalar_t *)dlogits);
    });
    MOE_AUX_CHECK_LAUNCH("router_bwd_kernel");
    return MOE_OK;
}

/* ---- stable counting sort ---- */

/* (1) chunk_counts[e * nb + b] = rows of local expert e in chunk b. */
__global__ void __launch_bounds__(SORT_THREADS)
sort_hist_kernel(long long M, const int32_t *__restrict__ ids, int begin, int El, int nb,
                 int32_t *__restrict__ chunk_counts)
{
    extern __shared__ int hist[];
    for (int e = threadIdx.x; e < El; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    sort_hist_chunk(M, ids, begin, El, (long long)blockIdx.x * SORT_CHUNK, hist);
    __syncthreads();
    for (int e = threadIdx.x; e < El; e += blockDim.x)
        chunk_counts[(size_t)e * nb + blockIdx.x] = hist[e];
}

/* (2) One block: exclusive scan of cc[El * nb] (expert-major) in place, then the per-expert
 * counts and offsets. */
__global__ void __launch_bounds__(SCAN_THREADS)
sort_scan_kernel(int El, int nb, int32_t *__restrict__ cc, int32_t *__restrict__ token_counts,
                 int32_t *__restrict__ offsets)
{
    __shared__ int part[SCAN_THREADS];
    __shared__ int total;
    const long long n = (long long)El * nb;
    const long long per = (n + blockDim.x - 1) / blockDim.x;
    const long long lo = MOE_MIN(n, (long long)threadIdx.x * per), hi = MOE_MIN(n, lo + per);
    int s = 0;
    for (long long i = lo; i < hi; i++) s += cc[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) { /* Hillis-Steele inclusive scan */
        const int add = (int)threadIdx.x >= o ? part[threadIdx.x - o] : 0;
        __syncthreads();
        part[threadIdx.x] += add;
        __syncthreads();
    }
    int run = part[threadIdx.x] - s;
    if (threadIdx.x == blockDim.x - 1) total = part[threadIdx.x];
    for (long long i = lo; i < hi; i++) {
        const int c = cc[i];
        cc[i] = run;
        run += c;
    }
    __syncthreads(); /* the scanned cc (global, written by this block) and total are visible */
    for (int e = threadIdx.x; e < El; e += blockDim.x) {
        const int first = cc[(size_t)e * nb];
        const int next = e + 1 < El ? cc[(size_t)(e + 1) * nb] : total;
        offsets[e] = first;
        token_counts[e] = next - first;
    }
    if (threadIdx.x == 0) offsets[El] = total;
}

/* (3) Ranked scatter of chunk b; bases[e * nb + b] is expert e's first row for this chunk. */
__global__ void __launch_bounds__(SORT_THREADS)
sort_scatter_kernel(long long M, const int32_t *__restrict__ ids, int begin, int El, int nb,
                    const int32_t *__restrict__ bases, const int32_t *__restrict__ offsets,
                    int32_t *__restrict__ gather)
{
    extern __shared__ int sm[];
    int *run = sm;        /* [El] next free row of each expert for this chunk */
    int *wcnt = sm + El;  /* [SORT_WARPS][El] entries of each expert per warp in this tile */
    for (int e = threadIdx.x; e < El; e += blockDim.x) run[e] = bases[(size_t)e * nb + blockIdx.x];
    for (int i = threadIdx.x; i < SORT_WARPS * El; i += blockDim.x) wcnt[i] = 0;
    __syncthreads();
    sort_scatter_chunk(M, ids, begin, El, (long long)blockIdx.x * SORT_CHUNK, run, wcnt, offsets + El,
                       gather);
}

static int sort_chunks(long long M) { return (int)((M + SORT_CHUNK - 1) / SORT_CHUNK); }

extern "C" size_t moe_cuda_sort_scratch_bytes(int T, int k, int El)
{
    if (T <= 0 || k <= 0 || El <= 0) return 0;
    return (size_t)El * (size_t)sort_chunks((long long)T * k) * sizeof(int32_t);
}

extern "C" moe_status moe_cuda_sort_by_expert(int T, int k, const int32_t *topk_ids,
                                              int expert_begin, int El, int32_t *token_counts,
                                              int32_t *expert_offsets, int32_t *gather_idx,
                                              void *scratch, size_t scratch_bytes,
                                              cudaStream_t stream, moe_error *err)
{
    MOE_AUX_REQUIRE(T >= 0 && k >= 1, "moe_cuda_sort_by_expert: need T >= 0 and k >= 1 (T=%d, k=%d)",
                    T, k);
    MOE_AUX_REQUIRE(El >= 1 && expert_begin >= 0,
                    "moe_cuda_sort_by_expert: need El >= 1 and expert_begin >= 0 (El=%d, begin=%d)",
                    El, expert_begin);
    const long long M = (long long)T * k;
    MOE_AUX_REQUIRE(M <= INT_MAX, "moe_cuda_sort_by_expert: T*k = %lld exceeds int32", M);
    MOE_AUX_REQUIRE(token_counts && expert_offsets,
                    "moe_cuda_sort_by_expert: token_counts and expert_offsets are required");
    if (M == 0) {
        cudaMemsetAsync(token_counts, 0, (size_t)El * sizeof(int32_t), stream);
        cudaMemsetAsync(expert_offsets, 0, (size_t)(El + 1) * sizeof(int32_t), stream);
        MOE_AUX_CHECK_LAUNCH("moe_cuda_sort_by_expert (T=0 memset)");
        return MOE_OK;
    }
    MOE_AUX_REQUIRE(topk_ids && gather_idx, "moe_cuda_sort_by_expert: topk_ids and gather_idx are required");
    const size_t need = moe_cuda_sort_scratch_bytes(T, k, El);
    MOE_AUX_REQUIRE(scratch && scratch_bytes >= need,
                    "moe_cuda_sort_by_expert: scratch of %zu bytes needed, got %zu at %p", need,
                    scratch_bytes, scratch);
    const int nb = sort_chunks(M);
    int32_t *cc = (int32_t *)scratch;
    const size_t smem_hist = (size_t)El * sizeof(int);
    const size_t smem_scat = (size_t)El * (1 + SORT_WARPS) * sizeof(int);
    MOE_TRY(smem_optin((const void *)sort_hist_kernel, smem_hist, "sort_hist_kernel", err));
    MOE_TRY(smem_optin((const void *)sort_scatter_kernel, smem_scat, "sort_scatter_kernel", err));
    sort_hist_kernel<<<nb, SORT_THREADS, smem_hist, stream>>>(M, topk_ids, expert_begin, El, nb, cc);
    MOE_AUX_CHECK_LAUNCH("sort_hist_kernel");
    sort_scan_kernel<<<1, SCAN_THREADS, 0, stream>>>(El, nb, cc, token_counts, expert_offsets);
    MOE_AUX_CHECK_LAUNCH("sort_scan_kernel");
    sort_scatter_kernel<<<nb, SORT_THREADS, smem_scat, stream>>>(M, topk_ids, expert_begin, El, nb, cc,
                                                                 expert_offsets, gather_idx);
    MOE_AUX_CHECK_LAUNCH("sort_scatter_kernel");
    return MOE_OK;
}
