/*
 * kernel_launch.h — the host side of the grouped-GEMM launches (kernel_launch.c): what the
 * launchers of kernels/moe_kernels.h need from their callers and no longer find for themselves.
 *   - resolve a request (NULL / zeros = the default for the problem) into the compiled
 *     configuration the launchers take, and launch, in one call;
 *   - the wgmma tile scheduler's counters (moe_kernel_tuning.sched_counters): device memory the
 *     caller owns. Rule: two launches that may run at the same time must not share counters;
 *     launches in one stream's order (and replays of graphs captured from them, on one stream)
 *     may. Each owner allocates its own: a cuda_block (its grouped GEMMs all run on its main
 *     stream), an EP context (its stream), the autotuner (per tuning run);
 *   - the diagnostics build's environment (MOE_WGMMA_*, docs/ENV.md): read only where the
 *     project was configured with -DMOE_DIAGNOSTICS=ON; a no-op otherwise.
 */
#ifndef MOE_CUDA_KERNEL_LAUNCH_H
#define MOE_CUDA_KERNEL_LAUNCH_H

#include <cuda_runtime.h>

#include "moe_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* moe_kernel_config_resolve(req, a->dtype, a->max_rows / a->num_experts) then
 * moe_cuda_grouped_gemm with the result (errors of the resolution are prefixed with the
 * launcher's name). req NULL or zeros: the default configuration for the problem. */
moe_status moe_grouped_gemm_launch(const moe_grouped_gemm_args *a, const moe_kernel_config *req,
                                   const moe_kernel_tuning *tuning, cudaStream_t stream,
                                   moe_kernel_report *report, moe_error *err);
moe_status moe_grouped_gemm_dw_launch(const moe_grouped_gemm_dw_args *a,
                                      const moe_kernel_config *req,
                                      const moe_kernel_tuning *tuning, cudaStream_t stream,
                                      moe_kernel_report *report, moe_error *err);

/* MOE_SCHED_COUNTERS zeroed int32 of device memory for moe_kernel_tuning.sched_counters, on
 * the current device; the zeros are written on `stream` (launches there see them). */
moe_status moe_sched_counters_alloc(int32_t **out, cudaStream_t stream, moe_error *err);
void moe_sched_counters_free(int32_t *p);

/* In a -DMOE_DIAGNOSTICS=ON build: apply the MOE_WGMMA_* diagnostics of the environment to t
 * (docs/ENV.md; MOE_WGMMA_STATIC_SCHED=1 clears t->sched_counters). In a default build: does
 * nothing and reads nothing. */
void moe_kernel_tuning_apply_env(moe_kernel_tuning *t);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CUDA_KERNEL_LAUNCH_H */
