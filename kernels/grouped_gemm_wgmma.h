/*
 * grouped_gemm_wgmma.h — the Hopper wgmma/TMA forward grouped GEMM (grouped_gemm_wgmma.cu), as
 * seen by grouped_gemm.cu's launcher (moe_cuda_grouped_gemm). C++ (CUDA) only, internal: the
 * public entry point stays moe_cuda_grouped_gemm in moe_kernels.h.
 */
#ifndef MOE_GROUPED_GEMM_WGMMA_H
#define MOE_GROUPED_GEMM_WGMMA_H

#include <cuda_runtime.h>

#include "moe_kernels.h"

/* Whether the wgmma kernel of configuration c (a ",tma" entry of MOE_GG_WGMMA_CONFIGS) can run
 * this already-validated problem here: bf16/fp16, A and B 16-byte aligned with K * 2 bytes a
 * multiple of 16, and B_e [N, K] with E*N < 2^31 or (b_kn) B_e [K, N] with N * 2 bytes (with
 * SiLU also N/2 * 2 bytes) a multiple of 16 (b_kn runs without clusters), a compute-capability
 * 9.0 device, the
 * build holding the sm_90a kernel, the driver providing cuTensorMapEncodeTiled, and the shared
 * memory (stages + (E+1) offsets) within the device's opt-in limit. Launches nothing. */
bool moe_gg_wgmma_applicable(const moe_grouped_gemm_args *a, const moe_kernel_config *c);

/* What a launch ran (moe_kernel_report's fields of the same names). */
struct moe_gg_wgmma_ran {
    int staged_epilogue; /* the outputs went through shared memory and bulk copies */
    int a_tma;           /* A came by TMA */
    int sched_dynamic;   /* tiles from t.sched_counters (one-CTA kernels with counters) */
    int fast_rounding;   /* scale_a_rows on the accumulators or the fast SiLU ran */
};

/* Launch it (after moe_gg_wgmma_applicable said yes, with max_rows > 0), with the caller's
 * tuning t (moe_kernel_tuning: exact_hf_rounding, sched_counters, max_ctas, the timing knobs,
 * the diagnostics of a MOE_DIAGNOSTICS build); *ran (may be NULL) says which paths ran. */
cudaError_t moe_gg_wgmma_launch(const moe_grouped_gemm_args *a, const moe_kernel_config *c,
                                const moe_kernel_tuning &t, cudaStream_t stream, moe_gg_wgmma_ran *ran);

/* "grouped_gemm_wgmma_bf16" / "grouped_gemm_wgmma_fp16" (moe_kernel_report.kernel). */
const char *moe_gg_wgmma_kernel_name(moe_dtype dt);

#endif /* MOE_GROUPED_GEMM_WGMMA_H */
