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

/* The wgmma kernels' run-time options of a configuration (moe_kernel_config.epilogue / .a_load);
 * AUTO = the built-in rule, which the MOE_WGMMA_EPILOGUE / MOE_WGMMA_A_TMA diagnostics can
 * override (docs/KERNELS.md). */
typedef enum moe_gg_epilogue {
    MOE_GG_EPILOGUE_AUTO = 0,
    MOE_GG_EPILOGUE_DIRECT = 1, /* ",direct": outputs stored from the registers */
    MOE_GG_EPILOGUE_STAGED = 2  /* ",staged": through shared memory and bulk copies */
} moe_gg_epilogue;
typedef enum moe_gg_a_load {
    MOE_GG_A_AUTO = 0,
    MOE_GG_A_CPASYNC = 1, /* ",acp": A rows by cp.async */
    MOE_GG_A_TMA = 2      /* ",atma": A by TMA where A needs no gather (no permute_x) */
} moe_gg_a_load;

/* A grouped-GEMM kernel configuration: tile sizes, warps, pipeline stages, and whether the
 * TMA path is used (when implemented and the strides allow it). Zeros = "choose". */
typedef struct moe_kernel_config {
    int tile_m, tile_n, tile_k;
    int warps;
    int stages;
    int use_tma; /* 0 off, 1 on (falls back to the non-TMA path when rows are not 16-B aligned) */
    int cluster; /* wgmma only: 2 = CTA pairs sharing each weight tile (",c2"); 0 = none */
    int epilogue; /* wgmma only: moe_gg_epilogue (a request the problem cannot take runs the
                     other path; the report says which ran) */
    int a_load;   /* wgmma forward/dX only: moe_gg_a_load (likewise) */
} moe_kernel_config;

/* Which kernel/path actually ran (reported by --stats / check mode). */
typedef struct moe_kernel_report {
    const char *kernel; /* e.g. "grouped_gemm_mma_bf16" */
    moe_kernel_config config;
    int used_tma;
    int staged_epilogue; /* wgmma: outputs went through shared memory and bulk copies */
    int a_tma;           /* wgmma: A rows came by TMA (the default without permute_x; ",acp" not) */
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
