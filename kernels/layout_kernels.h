/*
 * layout_kernels.h — extern "C" launchers of kernels/layout.cu: the small reshaping and
 * reduction kernels around the layer's GEMMs (gradients in a caller's layout, the ordered sum
 * of every rank's fp32 partial gradients). Device pointers; launched on `stream` without
 * synchronising; MOE_ERR_INVALID_ARG for bad arguments, MOE_ERR_CUDA for a failed launch.
 * CPU twins: the CPU backend's transpose and sum_parts (src/cpu/cpu_backend.c).
 */
#ifndef MOE_LAYOUT_KERNELS_H
#define MOE_LAYOUT_KERNELS_H

#include <stddef.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "common.h"

/* dst [n, c, r] = src [n, r, c] transposed per matrix, elements of `elem_bytes` (2 or 4). */
moe_status moe_cuda_transpose(int n, int r, int c, size_t elem_bytes, const void *src, void *dst,
                              cudaStream_t stream, moe_error *err);

/* dst[i] = round_dt(sum over p < n_parts, ascending, of parts[p * n + i]) in fp32 (separately
 * rounded adds: the same bits as the twin's loop). dt: bf16, fp16 or fp32. */
moe_status moe_cuda_sum_parts(moe_dtype dt, int n_parts, size_t n, const float *parts, void *dst,
                              cudaStream_t stream, moe_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MOE_LAYOUT_KERNELS_H */
