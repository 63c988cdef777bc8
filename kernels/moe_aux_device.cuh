/*
 * moe_aux_device.cuh — device helpers shared by kernels/routing.cu and kernels/elementwise.cu:
 * dtype load/store (fp32 in registers, round-to-nearest-even on store, as the CPU twin's
 * moe_round_to), deterministic warp/block reductions, argument-check and launch-check macros.
 * Private to those two files (not a public header).
 */
#ifndef MOE_AUX_DEVICE_CUH
#define MOE_AUX_DEVICE_CUH

#include "moe_kernels_aux.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moe_aux {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

/* Round an fp32 value to T and widen it again (a rounding point inside a kernel). */
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

/* VEC consecutive elements, loaded/stored as one aligned access (16 bytes for the VEC the
 * launchers pick). */
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) vec_t {
    T v[VEC];
};

/* Butterfly sums: every lane ends with the same value, and the order of the additions is
 * fixed by the lane numbering, so the result is deterministic. */
__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Block sum of one float per thread (blockDim.x a multiple of 32, at most 1024); the result
 * is returned to thread 0 only. Warp sums are added in warp order: deterministic. */
__device__ __forceinline__ float block_sum_to_thread0(float v, float *smem32)
{
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) smem32[warp] = v;
    __syncthreads();
    float s = 0.f;
    if (threadIdx.x == 0) {
        const int nw = blockDim.x >> 5;
        for (int w = 0; w < nw; w++) s += smem32[w];
    }
    return s;
}

} // namespace moe_aux

/* Dispatch on the activation dtype: the body sees `scalar_t`. */
#define MOE_AUX_DISPATCH(dt, ...)                                                             \
    switch (dt) {                                                                             \
    case MOE_DTYPE_BF16: { typedef __nv_bfloat16 scalar_t; __VA_ARGS__; } break;              \
    case MOE_DTYPE_F16: { typedef __half scalar_t; __VA_ARGS__; } break;                      \
    case MOE_DTYPE_F32: { typedef float scalar_t; __VA_ARGS__; } break;                       \
    default: break;                                                                           \
    }

static inline bool moe_aux_float_dtype(moe_dtype dt)
{
    return dt == MOE_DTYPE_BF16 || dt == MOE_DTYPE_F16 || dt == MOE_DTYPE_F32;
}

#define MOE_AUX_REQUIRE(cond, ...)                                                            \
    do {                                                                                      \
        if (!(cond)) return moe_fail(err, MOE_ERR_INVALID_ARG, __VA_ARGS__);                  \
    } while (0)

/* After a launch: a launch-configuration or sticky error becomes MOE_ERR_CUDA naming the
 * kernel. cudaGetLastError also clears a non-sticky error so it is not blamed on a later
 * call. */
#define MOE_AUX_CHECK_LAUNCH(name)                                                            \
    do {                                                                                      \
        cudaError_t moe_e_ = cudaGetLastError();                                              \
        if (moe_e_ != cudaSuccess)                                                            \
            return moe_fail(err, MOE_ERR_CUDA, "%s: launch failed: %s (%s:%d)", (name),       \
                            cudaGetErrorString(moe_e_), __FILE__, __LINE__);                  \
    } while (0)

#endif /* MOE_AUX_DEVICE_CUH */
