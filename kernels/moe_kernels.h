/*
 * moe_kernels.h — extern "C" launchers of the CUDA kernels (the .cu files in kernels/). Host C code in
 * src/cuda/ calls these; every pointer in the argument structs is a DEVICE pointer.
 * Every launcher validates its arguments, launches on `stream` without synchronising, checks
 * cudaGetLastError() and returns a moe_status (reason in err).
 */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <cuda_runtime.h>

#include "moe_stages.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A grouped-GEMM kernel configuration: tile sizes, warps, pipeline stages, and whether the
 * TMA path is used (when implemented and the strides allow it). Zeros = "choose". */
typedef struct moe_kernel_config {
    int tile_m, tile_n, tile_k;
    int warps;
    int stages;
    int use_tma; /* 0 off, 1 on (falls back to the non-TMA path when rows are not 16-B aligned) */
    int cluster; /* wgmma only: 2 = CTA pairs sharing each weight tile (",c2"); 0 = none */
} moe_kernel_config;

/* Which kernel/path actually ran (reported by --stats / check mode). */
typedef struct moe_kernel_report {
    const char *kernel; /* e.g. "grouped_gemm_mma_bf16" */
    moe_kernel_config config;
    int used_tma;
    int staged_epilogue; /* wgmma: outputs went through shared memory and bulk copies */
    int a_tma;           /* wgmma: A rows came by TMA (MOE_WGMMA_A_TMA=1, no permute_x) */
} moe_kernel_report;

/* Parse "128x128x64,w8,s3,tma" style strings; a reason in err when invalid. */
moe_status moe_kernel_config_parse(const char *text, moe_kernel_config *cfg, moe_error *err);
/* Whether cfg is runnable for this kernel/dtype (tile divisibility, shared memory, warps). */
moe_status moe_kernel_config_validate(const moe_kernel_config *cfg, moe_dtype dtype,
                                      moe_error *err);

moe_status moe_cuda_grouped_gemm(const moe_grouped_gemm_args *a, const moe_kernel_config *cfg,
                                 cudaStream_t stream, moe_kernel_report *report, moe_error *err);
moe_status moe_cuda_grouped_gemm_dw(const moe_grouped_gemm_dw_args *a,
                                    const moe_kernel_config *cfg, cudaStream_t stream,
                                    moe_kernel_report *report, moe_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MOE_KERNELS_H */
