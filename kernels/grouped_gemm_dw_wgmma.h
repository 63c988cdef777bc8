/*
 * grouped_gemm_dw_wgmma.h — the Hopper wgmma weight-gradient kernel (grouped_gemm_dw_wgmma.cu), as
 * seen by grouped_gemm_dw.cu's launcher (moe_cuda_grouped_gemm_dw). C++ (CUDA) only, internal.
 */
#ifndef MOE_GROUPED_GEMM_DW_WGMMA_H
#define MOE_GROUPED_GEMM_DW_WGMMA_H

#include <cuda_runtime.h>

#include "moe_kernels.h"

/* Whether the wgmma dW kernel can run this already-validated problem here: bf16/fp16, dY, X and
 * dW 16-byte aligned, N * 2 and K * 2 bytes multiples of 16, at most one of the two row scales,
 * a compute-capability 9.0 device, the build holding the sm_90a kernel, and its shared memory
 * within the device's opt-in limit. Launches nothing. */
bool moe_gg_dw_wgmma_applicable(const moe_grouped_gemm_dw_args *a);

/* Launch it (after moe_gg_dw_wgmma_applicable said yes). epilogue: the configuration's
 * moe_gg_epilogue option (",staged" or auto, the default: the 3-stage kernel with the staged
 * epilogue, where its shared memory fits; ",direct": the 4-stage kernel storing from registers).
 * t: the caller's tuning (max_ctas; the diagnostics of a MOE_DIAGNOSTICS build).
 * *staged_epilogue (may be NULL): whether this launch ran the staged kernel. */
cudaError_t moe_gg_dw_wgmma_launch(const moe_grouped_gemm_dw_args *a, int epilogue,
                                   const moe_kernel_tuning &t, cudaStream_t stream,
                                   int *staged_epilogue);

/* "grouped_gemm_dw_wgmma_bf16" / "grouped_gemm_dw_wgmma_fp16" (moe_kernel_report.kernel). */
const char *moe_gg_dw_wgmma_kernel_name(moe_dtype dt);

#endif /* MOE_GROUPED_GEMM_DW_WGMMA_H */
