/*
 * layout.cu — reshaping and ordered-reduction kernels (see layout_kernels.h).
 *
 * transpose  32x32 tiles through shared memory (padded against bank conflicts), one tile per
 *            block of 32x8 threads, batched over the matrices in grid z.
 * sum_parts  one thread per output element adds the parts in ascending order with __fadd_rn
 *            (no contraction) and rounds once: every rank that runs it on the same gathered
 *            parts gets the same bits.
 */
#include "layout_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int TILE = 32, ROWS = 8;

template <typename T>
__global__ void transpose_kernel(int r, int c, const T *__restrict__ src, T *__restrict__ dst)
{
    __shared__ T tile[TILE][TILE + 1];
    const long long mat = (long long)blockIdx.z * r * c;
    const int x0 = blockIdx.x * TILE, y0 = blockIdx.y * TILE;
    for (int j = threadIdx.y; j < TILE; j += ROWS) {
        const int y = y0 + j, x = x0 + threadIdx.x;
        if (y < r && x < c) tile[j][threadIdx.x] = src[mat + (long long)y * c + x];
    }
    __syncthreads();
    for (int j = threadIdx.y; j < TILE; j += ROWS) {
        const int y = x0 + j, x = y0 + threadIdx.x; /* dst is [c, r] */
        if (y < c && x < r) dst[mat + (long long)y * r + x] = tile[threadIdx.x][j];
    }
}

__device__ __forceinline__ void store(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, size_t i, float v)
{
    p[i] = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store(__half *p, size_t i, float v) { p[i] = __float2half_rn(v); }

template <typename T>
__global__ void sum_parts_kernel(int n_parts, size_t n, const float *__restrict__ parts,
                                 T *__restrict__ dst)
{
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float acc = 0.0f;
    for (int p = 0; p < n_parts; p++) acc = __fadd_rn(acc, parts[(size_t)p * n + i]);
    store(dst, i, acc);
}

} // namespace

extern "C" moe_status moe_cuda_transpose(int n, int r, int c, size_t elem_bytes, const void *src,
                                         void *dst, cudaStream_t stream, moe_error *err)
{
    if (n < 0 || r < 0 || c < 0 || (elem_bytes != 2 && elem_bytes != 4) || n > 65535)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_cuda_transpose: n=%d r=%d c=%d elem=%zu (n <= 65535, 2- or 4-byte "
                        "elements)", n, r, c, elem_bytes);
    if (n == 0 || r == 0 || c == 0) return MOE_OK;
    if (!src || !dst) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_cuda_transpose: NULL buffer");
    dim3 grid((unsigned)((c + TILE - 1) / TILE), (unsigned)((r + TILE - 1) / TILE), (unsigned)n);
    dim3 block(TILE, ROWS);
    if (elem_bytes == 2)
        transpose_kernel<uint16_t><<<grid, block, 0, stream>>>(r, c, (const uint16_t *)src,
                                                               (uint16_t *)dst);
    else
        transpose_kernel<uint32_t><<<grid, block, 0, stream>>>(r, c, (const uint32_t *)src,
                                                               (uint32_t *)dst);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return moe_fail(err, MOE_ERR_CUDA, "transpose_kernel: %s", cudaGetErrorString(e));
    return MOE_OK;
}

extern "C" moe_status moe_cuda_sum_parts(moe_dtype dt, int n_parts, size_t n, const float *parts,
                                         void *dst, cudaStream_t stream, moe_error *err)
{
    if (n_parts < 1 || (dt != MOE_DTYPE_BF16 && dt != MOE_DTYPE_F16 && dt != MOE_DTYPE_F32))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_cuda_sum_parts: %d parts, dtype %d",
                        n_parts, (int)dt);
    if (n == 0) return MOE_OK;
    if (!parts || !dst) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_cuda_sum_parts: NULL buffer");
    const unsigned blocks = (unsigned)((n + 255) / 256);
    switch (dt) {
    case MOE_DTYPE_BF16:
        sum_parts_kernel<<<blocks, 256, 0, stream>>>(n_parts, n, parts, (__nv_bfloat16 *)dst);
        break;
    case MOE_DTYPE_F16:
        sum_parts_kernel<<<blocks, 256, 0, stream>>>(n_parts, n, parts, (__half *)dst);
        break;
    default:
        sum_parts_kernel<<<blocks, 256, 0, stream>>>(n_parts, n, parts, (float *)dst);
        break;
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return moe_fail(err, MOE_ERR_CUDA, "sum_parts_kernel: %s", cudaGetErrorString(e));
    return MOE_OK;
}
