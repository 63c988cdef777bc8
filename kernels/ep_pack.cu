/*
 * ep_pack.cu — expert-parallel pack / unpack kernels (see ep_pack.h for the contracts and the
 * CPU twins in src/ep/).
 *
 * plan      one thread per token dedupes and sorts its owners (k small: a register list),
 *           then one block per virtual rank numbers the tokens going to it with a block-wide
 *           integer exclusive scan over token tiles (a pure function of the ids, no atomics).
 * pack      one block per (token, destination) copies the x (and dout) row with 16-byte
 *           accesses when the row and the pointers allow, and writes the k id / weight slots.
 * reduce    one thread per output element adds the partial rows in ascending rank order.
 * slots     sync-free mode: fixed-capacity receive slots are compacted into contiguous rows
 *           (and the partial rows expanded back), with the offsets computed on the device.
 */
#include "ep_pack.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define EP_THREADS 256
#define EP_SCAN_THREADS 1024

#define EP_REQUIRE(cond, ...)                                                                 \
    do {                                                                                      \
        if (!(cond)) return moe_fail(err, MOE_ERR_INVALID_ARG, __VA_ARGS__);                  \
    } while (0)
#define EP_CHECK_LAUNCH(name)                                                                 \
    do {                                                                                      \
        cudaError_t ep_e_ = cudaGetLastError();                                               \
        if (ep_e_ != cudaSuccess)                                                             \
            return moe_fail(err, MOE_ERR_CUDA, "%s: launch failed: %s (%s:%d)", (name),       \
                            cudaGetErrorString(ep_e_), __FILE__, __LINE__);                   \
    } while (0)

namespace {

__device__ __forceinline__ float ld_f(const float *p, long long i) { return p[i]; }
__device__ __forceinline__ float ld_f(const __nv_bfloat16 *p, long long i)
{
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ float ld_f(const __half *p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ void st_f(float *p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st_f(__nv_bfloat16 *p, long long i, float v)
{
    p[i] = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void st_f(__half *p, long long i, float v) { p[i] = __float2half_rn(v); }

/* Copy n bytes with the widest access the alignment of both pointers and n allows; the
 * block's threads stride over the row. */
__device__ void copy_row(char *__restrict__ dst, const char *__restrict__ src, size_t n)
{
    const uintptr_t a = (uintptr_t)dst | (uintptr_t)src | (uintptr_t)n;
    if ((a & 15) == 0) {
        uint4 *d = (uint4 *)dst;
        const uint4 *s = (const uint4 *)src;
        for (size_t i = threadIdx.x; i < n / 16; i += blockDim.x) d[i] = s[i];
    } else if ((a & 3) == 0) {
        uint32_t *d = (uint32_t *)dst;
        const uint32_t *s = (const uint32_t *)src;
        for (size_t i = threadIdx.x; i < n / 4; i += blockDim.x) d[i] = s[i];
    } else if ((a & 1) == 0) {
        uint16_t *d = (uint16_t *)dst;
        const uint16_t *s = (const uint16_t *)src;
        for (size_t i = threadIdx.x; i < n / 2; i += blockDim.x) d[i] = s[i];
    } else {
        for (size_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}

__device__ void zero_bytes(char *dst, size_t n)
{
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = 0;
}

/* ---- plan ---- */

__global__ void ep_plan_tokens_kernel(int T, int k, const int32_t *__restrict__ ids, int E,
                                      const int32_t *__restrict__ vowner, int D,
                                      int32_t *__restrict__ tdest, int32_t *__restrict__ tn,
                                      int32_t *bad)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int d[MOE_EP_PACK_MAX_K];
    int nd = 0;
    for (int j = 0; j < k; j++) {
        const int e = ids[(long long)t * k + j];
        if (e < 0) continue;
        if (e >= E) {
            if (bad) atomicOr(bad, 1);
            continue;
        }
        const int o = vowner[e];
        bool dup = false;
        for (int a = 0; a < nd; a++) dup |= d[a] == o;
        if (dup) continue;
        int i = nd;
        while (i > 0 && d[i - 1] > o) { /* insertion keeps the list ascending */
            d[i] = d[i - 1];
            i--;
        }
        d[i] = o;
        nd++;
    }
    for (int a = 0; a < D; a++) tdest[(long long)t * D + a] = a < nd ? d[a] : -1;
    tn[t] = nd;
}

/* One block per virtual rank d: exclusive scan of "token goes to d" over the tokens, in tiles
 * of blockDim.x (a multiple of 32, <= 1024). */
__global__ void __launch_bounds__(EP_SCAN_THREADS)
ep_plan_rows_kernel(int T, int D, const int32_t *__restrict__ tdest,
                    const int32_t *__restrict__ tn, int32_t *__restrict__ trow,
                    int32_t *__restrict__ dcount)
{
    __shared__ int wsum[32];
    const int d = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int carry = 0;
    for (int base = 0; base < T; base += blockDim.x) {
        const int t = base + threadIdx.x;
        int hit = -1;
        if (t < T) {
            const int n = tn[t];
            for (int a = 0; a < n; a++)
                if (tdest[(long long)t * D + a] == d) {
                    hit = a;
                    break;
                }
        }
        const int flag = hit >= 0 ? 1 : 0;
        int incl = flag; /* inclusive warp scan */
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (lane == 31) wsum[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            int v = lane < nwarps ? wsum[lane] : 0;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, v, o);
                if (lane >= o) v += y;
            }
            if (lane < nwarps) wsum[lane] = v; /* inclusive prefix of warp totals */
        }
        __syncthreads();
        const int before = (warp > 0 ? wsum[warp - 1] : 0) + incl - flag;
        if (hit >= 0) trow[(long long)t * D + hit] = carry + before;
        carry += wsum[nwarps - 1];
        __syncthreads(); /* wsum is rewritten by the next tile */
    }
    if (threadIdx.x == 0) dcount[d] = carry;
}

/* ---- pack ---- */

__global__ void __launch_bounds__(EP_THREADS)
ep_pack_kernel(int D, int k, const int32_t *__restrict__ vowner,
               const int32_t *__restrict__ vlocal, size_t row_bytes, size_t w_bytes,
               const char *__restrict__ x, const char *__restrict__ dout,
               const int32_t *__restrict__ ids, const char *__restrict__ w,
               const int32_t *__restrict__ tdest, const int32_t *__restrict__ tn,
               const int32_t *__restrict__ trow, const int64_t *__restrict__ dest_base,
               char *__restrict__ sx, char *__restrict__ sdout, int32_t *__restrict__ sids,
               char *__restrict__ sw)
{
    const long long i = blockIdx.x;
    const long long t = i / D;
    const int a = (int)(i % D);
    if (a >= tn[t]) return;
    const int d = tdest[t * D + a];
    const long long r = dest_base[d] + trow[t * D + a];
    copy_row(sx + r * row_bytes, x + t * row_bytes, row_bytes);
    if (sdout) copy_row(sdout + r * row_bytes, dout + t * row_bytes, row_bytes);
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const int e = ids[t * k + j];
        const bool mine = e >= 0 && vowner[e] == d;
        sids[r * k + j] = mine ? vlocal[e] : -1;
        char *dst = sw + (r * k + j) * (long long)w_bytes;
        const char *src = w + (t * k + j) * (long long)w_bytes;
        for (size_t b = 0; b < w_bytes; b++) dst[b] = mine ? src[b] : 0;
    }
}

/* ---- combine ---- */

template <typename S>
__global__ void __launch_bounds__(EP_THREADS)
ep_reduce_kernel(long long n, int H, int D, const S *__restrict__ add, const S *__restrict__ add2,
                 const S *__restrict__ back, const int64_t *__restrict__ dest_base,
                 const int32_t *__restrict__ tdest, const int32_t *__restrict__ tn,
                 const int32_t *__restrict__ trow, S *__restrict__ out)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long t = i / H;
    const int h = (int)(i % H);
    float acc = add ? ld_f(add, i) : 0.0f;
    if (add2) acc = __fadd_rn(acc, ld_f(add2, i));
    const int m = tn[t];
    for (int a = 0; a < m; a++) {
        const long long r = dest_base[tdest[t * D + a]] + trow[t * D + a];
        acc = __fadd_rn(acc, ld_f(back, r * H + h));
    }
    st_f(out, i, acc);
}

__global__ void ep_dweights_kernel(long long n, int k, int D, const int32_t *__restrict__ vowner,
                                   const int32_t *__restrict__ ids,
                                   const float *__restrict__ back_dw,
                                   const int64_t *__restrict__ dest_base,
                                   const int32_t *__restrict__ tdest,
                                   const int32_t *__restrict__ tn,
                                   const int32_t *__restrict__ trow, float *__restrict__ dw)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long t = i / k;
    const int j = (int)(i % k);
    const int e = ids[i];
    float v = 0.0f;
    if (e >= 0) {
        const int d = vowner[e], m = tn[t];
        for (int a = 0; a < m; a++)
            if (tdest[t * D + a] == d) {
                v = back_dw[(dest_base[d] + trow[t * D + a]) * k + j];
                break;
            }
    }
    dw[i] = v;
}

/* ---- sync-free slots ---- */

__global__ void ep_slot_counts_kernel(int N, int V, const int32_t *__restrict__ dcount,
                                      int32_t *__restrict__ scnt)
{
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= N * V) return;
    const int q = d / V, v = d % V;
    scnt[v * N + q] = dcount[d];
}

__global__ void ep_check_total_kernel(int n, const int32_t *__restrict__ rcnt, long long limit,
                                      int32_t *status)
{
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    long long total = 0;
    for (int i = 0; i < n; i++) total += rcnt[i];
    if (total > limit) {
        atomicOr(&status[0], 1);
        atomicMax(&status[1], (int)(total < 0x7fffffff ? total : 0x7fffffff));
    }
}

/* Offsets of the N slots (N is the number of real ranks: small) and the total, computed by
 * thread 0 into shared memory. */
__device__ void slot_offsets(int N, const int32_t *rcnt, long long slot, long long *off,
                             long long *total)
{
    if (threadIdx.x == 0) {
        long long p = slot, o = 0, s = 0;
        for (int q = 0; q < N; q++) {
            if (q == p) o = s;
            s += rcnt[q];
        }
        *off = o;
        *total = s;
    }
    __syncthreads();
}

__global__ void __launch_bounds__(EP_THREADS)
ep_compact_kernel(int N, long long slot_rows, const int32_t *__restrict__ rcnt, int k,
                  size_t row_bytes, size_t w_bytes, const char *__restrict__ sx,
                  const int32_t *__restrict__ sids, const char *__restrict__ sw, long long cap,
                  char *__restrict__ cx, int32_t *__restrict__ cids, char *__restrict__ cw,
                  int32_t *status)
{
    __shared__ long long s_off, s_total;
    const long long i = blockIdx.x;
    const long long p = i / slot_rows, r = i % slot_rows;
    slot_offsets(N, rcnt, p < N ? p : -1, &s_off, &s_total);
    if (p < N && r < rcnt[p]) {
        const long long dst = s_off + r;
        if (dst < cap) {
            copy_row(cx + dst * row_bytes, sx + i * row_bytes, row_bytes);
            copy_row((char *)(cids + dst * k), (const char *)(sids + i * k), (size_t)k * 4);
            copy_row(cw + dst * k * (long long)w_bytes, sw + i * k * (long long)w_bytes,
                     (size_t)k * w_bytes);
        } else if (threadIdx.x == 0) {
            atomicOr(&status[0], 1);
            atomicMax(&status[1], (int)(s_total < 0x7fffffff ? s_total : 0x7fffffff));
        }
    }
    /* Rows past what arrived belong to nobody: ids -1 so the sort and the k-sum skip them. */
    if (i < cap && i >= s_total) {
        for (int j = threadIdx.x; j < k; j += blockDim.x) cids[i * k + j] = -1;
        zero_bytes(cw + i * k * (long long)w_bytes, (size_t)k * w_bytes);
    }
}

/* One more row buffer of the same slots (the backward's dout rows): rows past what arrived
 * are zero. */
__global__ void __launch_bounds__(EP_THREADS)
ep_compact_rows_kernel(int N, long long slot_rows, const int32_t *__restrict__ rcnt,
                       size_t row_bytes, const char *__restrict__ src, long long cap,
                       char *__restrict__ dst)
{
    __shared__ long long s_off, s_total;
    const long long i = blockIdx.x;
    const long long p = i / slot_rows, r = i % slot_rows;
    slot_offsets(N, rcnt, p < N ? p : -1, &s_off, &s_total);
    if (p < N && r < rcnt[p] && s_off + r < cap)
        copy_row(dst + (s_off + r) * row_bytes, src + i * row_bytes, row_bytes);
    if (i < cap && i >= s_total) zero_bytes(dst + i * row_bytes, row_bytes);
}

__global__ void __launch_bounds__(EP_THREADS)
ep_expand_kernel(int N, long long slot_rows, const int32_t *__restrict__ rcnt, size_t row_bytes,
                 const char *__restrict__ compact, long long cap, char *__restrict__ slots)
{
    __shared__ long long s_off, s_total;
    const long long i = blockIdx.x;
    const long long p = i / slot_rows, r = i % slot_rows;
    slot_offsets(N, rcnt, p, &s_off, &s_total);
    if (r >= rcnt[p]) return;
    const long long src = s_off + r;
    if (src < cap)
        copy_row(slots + i * row_bytes, compact + src * row_bytes, row_bytes);
    else
        zero_bytes(slots + i * row_bytes, row_bytes);
}

unsigned blocks_for(long long n, int threads) { return (unsigned)((n + threads - 1) / threads); }

} // namespace

/* ---- launchers ---- */

extern "C" moe_status moe_cuda_ep_plan(int T, int k, const int32_t *ids, int E,
                                       const int32_t *vowner, int G, int32_t *tdest,
                                       int32_t *tn, int32_t *trow, int32_t *dcount,
                                       int32_t *bad, cudaStream_t stream, moe_error *err)
{
    EP_REQUIRE(T >= 0 && k >= 1 && k <= MOE_EP_PACK_MAX_K && G >= 1 && E >= 1 && vowner,
               "moe_cuda_ep_plan: need T >= 0, 1 <= k <= %d, G >= 1, E >= 1 and the owner "
               "table (T=%d k=%d G=%d E=%d)", MOE_EP_PACK_MAX_K, T, k, G, E);
    EP_REQUIRE(dcount, "moe_cuda_ep_plan: dcount is NULL");
    if (T == 0) {
        cudaMemsetAsync(dcount, 0, (size_t)G * sizeof(int32_t), stream);
        EP_CHECK_LAUNCH("moe_cuda_ep_plan (T=0 memset)");
        return MOE_OK;
    }
    EP_REQUIRE(ids && tdest && tn && trow, "moe_cuda_ep_plan: ids, tdest, tn and trow are required");
    const int D = k < G ? k : G;
    ep_plan_tokens_kernel<<<blocks_for(T, EP_THREADS), EP_THREADS, 0, stream>>>(
        T, k, ids, E, vowner, D, tdest, tn, bad);
    EP_CHECK_LAUNCH("ep_plan_tokens_kernel");
    const int threads = T >= EP_SCAN_THREADS ? EP_SCAN_THREADS : ((T + 31) / 32) * 32;
    ep_plan_rows_kernel<<<(unsigned)G, threads, 0, stream>>>(T, D, tdest, tn, trow, dcount);
    EP_CHECK_LAUNCH("ep_plan_rows_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_ep_pack(int T, int k, int G, const int32_t *vowner,
                                       const int32_t *vlocal, size_t row_bytes,
                                       size_t w_bytes, const void *x, const void *dout,
                                       const int32_t *ids, const void *w, const int32_t *tdest,
                                       const int32_t *tn, const int32_t *trow,
                                       const int64_t *dest_base, void *send_x, void *send_dout,
                                       int32_t *send_ids, void *send_w, cudaStream_t stream,
                                       moe_error *err)
{
    EP_REQUIRE(T >= 0 && k >= 1 && G >= 1 && vowner && vlocal && row_bytes > 0 && w_bytes > 0,
               "moe_cuda_ep_pack: need T >= 0, k, G >= 1, the owner tables and non-empty rows "
               "(T=%d k=%d G=%d row=%zu w=%zu)", T, k, G, row_bytes, w_bytes);
    EP_REQUIRE(!dout == !send_dout, "moe_cuda_ep_pack: dout and send_dout go together");
    if (T == 0) return MOE_OK;
    EP_REQUIRE(x && ids && w && tdest && tn && trow && dest_base && send_x && send_ids && send_w,
               "moe_cuda_ep_pack: a required pointer is NULL");
    const int D = k < G ? k : G;
    const long long n = (long long)T * D;
    EP_REQUIRE(n < 0x7fffffffLL, "moe_cuda_ep_pack: T*D = %lld rows exceed one grid", n);
    ep_pack_kernel<<<(unsigned)n, 128, 0, stream>>>(
        D, k, vowner, vlocal, row_bytes, w_bytes, (const char *)x, (const char *)dout, ids,
        (const char *)w, tdest, tn, trow, dest_base, (char *)send_x, (char *)send_dout, send_ids,
        (char *)send_w);
    EP_CHECK_LAUNCH("ep_pack_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_ep_reduce(moe_dtype dt, int T, int H, int G, int k,
                                         const void *add, const void *add2, const void *back,
                                         const int64_t *dest_base, const int32_t *tdest,
                                         const int32_t *tn, const int32_t *trow, void *out,
                                         cudaStream_t stream, moe_error *err)
{
    EP_REQUIRE(dt == MOE_DTYPE_BF16 || dt == MOE_DTYPE_F16 || dt == MOE_DTYPE_F32,
               "moe_cuda_ep_reduce: dtype %d is not bf16/fp16/fp32", (int)dt);
    EP_REQUIRE(T >= 0 && H >= 1 && G >= 1 && k >= 1,
               "moe_cuda_ep_reduce: need T >= 0, H, G, k >= 1 (T=%d H=%d G=%d k=%d)", T, H, G, k);
    if (T == 0) return MOE_OK;
    EP_REQUIRE(back && dest_base && tdest && tn && trow && out,
               "moe_cuda_ep_reduce: a required pointer is NULL");
    const int D = k < G ? k : G;
    const long long n = (long long)T * H;
    const unsigned g = blocks_for(n, EP_THREADS);
    switch (dt) {
    case MOE_DTYPE_BF16:
        ep_reduce_kernel<__nv_bfloat16><<<g, EP_THREADS, 0, stream>>>(
            n, H, D, (const __nv_bfloat16 *)add, (const __nv_bfloat16 *)add2,
            (const __nv_bfloat16 *)back, dest_base, tdest, tn, trow, (__nv_bfloat16 *)out);
        break;
    case MOE_DTYPE_F16:
        ep_reduce_kernel<__half><<<g, EP_THREADS, 0, stream>>>(
            n, H, D, (const __half *)add, (const __half *)add2, (const __half *)back, dest_base,
            tdest, tn, trow, (__half *)out);
        break;
    default:
        ep_reduce_kernel<float><<<g, EP_THREADS, 0, stream>>>(
            n, H, D, (const float *)add, (const float *)add2, (const float *)back, dest_base,
            tdest, tn, trow, (float *)out);
        break;
    }
    EP_CHECK_LAUNCH("ep_reduce_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_ep_dweights(int T, int k, int G, const int32_t *vowner,
                                           const int32_t *ids,
                                           const float *back_dw, const int64_t *dest_base,
                                           const int32_t *tdest, const int32_t *tn,
                                           const int32_t *trow, float *dw, cudaStream_t stream,
                                           moe_error *err)
{
    EP_REQUIRE(T >= 0 && k >= 1 && G >= 1 && vowner,
               "moe_cuda_ep_dweights: need T >= 0, k, G >= 1 and the owner table");
    if (T == 0) return MOE_OK;
    EP_REQUIRE(ids && back_dw && dest_base && tdest && tn && trow && dw,
               "moe_cuda_ep_dweights: a required pointer is NULL");
    const int D = k < G ? k : G;
    const long long n = (long long)T * k;
    ep_dweights_kernel<<<blocks_for(n, EP_THREADS), EP_THREADS, 0, stream>>>(
        n, k, D, vowner, ids, back_dw, dest_base, tdest, tn, trow, dw);
    EP_CHECK_LAUNCH("ep_dweights_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_ep_slot_counts(int N, int V, const int32_t *dcount,
                                              int32_t *scnt, cudaStream_t stream, moe_error *err)
{
    EP_REQUIRE(N >= 1 && V >= 1 && dcount && scnt,
               "moe_cuda_ep_slot_counts: need N, V >= 1 and both buffers");
    ep_slot_counts_kernel<<<blocks_for((long long)N * V, EP_THREADS), EP_THREADS, 0, stream>>>(
        N, V, dcount, scnt);
    EP_CHECK_LAUNCH("ep_slot_counts_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_ep_check_total(int n, const int32_t *rcnt, int64_t limit,
                                              int32_t *status, cudaStream_t stream,
                                              moe_error *err)
{
    EP_REQUIRE(n >= 1 && rcnt && status, "moe_cuda_ep_check_total: need n >= 1 and both buffers");
    ep_check_total_kernel<<<1, 32, 0, stream>>>(n, rcnt, (long long)limit, status);
    EP_CHECK_LAUNCH("ep_check_total_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_ep_compact(int N, int64_t slot_rows, const int32_t *rcnt, int k,
                                          size_t row_bytes, size_t w_bytes, const void *slot_x,
                                          const int32_t *slot_ids, const void *slot_w,
                                          int64_t cap, void *cx, int32_t *cids, void *cw,
                                          int32_t *status, cudaStream_t stream, moe_error *err)
{
    EP_REQUIRE(N >= 1 && slot_rows >= 1 && k >= 1 && cap >= 1 && row_bytes > 0 && w_bytes > 0,
               "moe_cuda_ep_compact: need N, slot_rows, k, cap >= 1 (N=%d slot_rows=%lld k=%d "
               "cap=%lld)", N, (long long)slot_rows, k, (long long)cap);
    EP_REQUIRE(rcnt && slot_x && slot_ids && slot_w && cx && cids && cw && status,
               "moe_cuda_ep_compact: a required pointer is NULL");
    const long long slots = (long long)N * slot_rows;
    const long long n = slots > cap ? slots : cap;
    EP_REQUIRE(n < 0x7fffffffLL, "moe_cuda_ep_compact: %lld rows exceed one grid", n);
    ep_compact_kernel<<<(unsigned)n, 128, 0, stream>>>(
        N, slot_rows, rcnt, k, row_bytes, w_bytes, (const char *)slot_x, slot_ids,
        (const char *)slot_w, cap, (char *)cx, cids, (char *)cw, status);
    EP_CHECK_LAUNCH("ep_compact_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_ep_compact_rows(int N, int64_t slot_rows, const int32_t *rcnt,
                                               size_t row_bytes, const void *slots, int64_t cap,
                                               void *compact, cudaStream_t stream,
                                               moe_error *err)
{
    EP_REQUIRE(N >= 1 && slot_rows >= 1 && cap >= 1 && row_bytes > 0 && rcnt && slots && compact,
               "moe_cuda_ep_compact_rows: need N, slot_rows, cap >= 1 and every buffer");
    const long long slots_n = (long long)N * slot_rows;
    const long long n = slots_n > cap ? slots_n : cap;
    EP_REQUIRE(n < 0x7fffffffLL, "moe_cuda_ep_compact_rows: %lld rows exceed one grid", n);
    ep_compact_rows_kernel<<<(unsigned)n, 128, 0, stream>>>(N, slot_rows, rcnt, row_bytes,
                                                            (const char *)slots, cap,
                                                            (char *)compact);
    EP_CHECK_LAUNCH("ep_compact_rows_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_ep_expand(int N, int64_t slot_rows, const int32_t *rcnt,
                                         size_t row_bytes, const void *compact, int64_t cap,
                                         void *slots, cudaStream_t stream, moe_error *err)
{
    EP_REQUIRE(N >= 1 && slot_rows >= 1 && cap >= 1 && row_bytes > 0 && rcnt && compact && slots,
               "moe_cuda_ep_expand: need N, slot_rows, cap >= 1 and every buffer");
    const long long n = (long long)N * slot_rows;
    EP_REQUIRE(n < 0x7fffffffLL, "moe_cuda_ep_expand: %lld rows exceed one grid", n);
    ep_expand_kernel<<<(unsigned)n, 128, 0, stream>>>(N, slot_rows, rcnt, row_bytes,
                                                      (const char *)compact, cap, (char *)slots);
    EP_CHECK_LAUNCH("ep_expand_kernel");
    return MOE_OK;
}
