/* cuda_baselines.h — the benchmark's in-process cuBLAS baselines on the same weights as the
 * fused path (issue "Hopper-speed kernels"): for the routed rows of one batch,
 *   dense:   one GEMM pair with M = T*k rows against a single expert's weights (the ceiling:
 *            same FLOPs, no experts, no gather),
 *   loop:    one cuBLAS GEMM pair per expert with its m_e rows (what HF's per-expert loop does),
 *   grouped: cublasGemmGroupedBatchedEx over the experts (host-known m_e).
 * GEMMs only: the baselines get their rows already permuted and contiguous and skip SiLU-mul,
 * the top-k weight and the sum over k, so they are a lower bound of what a real layer built on
 * them costs. Times: median of `iters` CUDA-event timings after `warmup`. */
#ifndef MOE_CUDA_BASELINES_H
#define MOE_CUDA_BASELINES_H

#include <stdint.h>

#include "common.h"

typedef struct moe_baseline_times {
    double dense_ms, loop_ms, grouped_ms;
} moe_baseline_times;

/* w13/w2: device weights [El,2I,H] / [El,H,I] in dt; counts: host [El] rows per expert. */
moe_status moe_cuda_baselines(moe_dtype dt, int El, int H, int I, const void *w13, const void *w2,
                              const int32_t *counts, int warmup, int iters,
                              moe_baseline_times *out, moe_error *err);

/* Device-to-device copy bandwidth of the current device: cudaMemcpyAsync of `bytes` between two
 * fresh buffers on a private stream, `iters` CUDA-event timings after `warmup`, median.
 * *gbs = 2*bytes / time / 1e9: DRAM traffic (read + write), the number a weight-streaming
 * kernel's read bandwidth is compared with (the "bandwidth a device-to-device copy
 * reaches"). Allocates 2*bytes of device memory for the duration of the call. */
moe_status moe_cuda_copy_bandwidth(size_t bytes, int warmup, int iters, double *gbs,
                                   moe_error *err);

/* SM clocks of CUDA device `dev` in MHz. max_mhz: cudaDevAttrClockRate (the peak); now_mhz:
 * the current SM clock from NVML (libnvidia-ml.so.1, opened at run time, never linked), 0 when
 * NVML is not available; nvml_max_mhz: NVML's maximum SM clock, 0 when unknown. */
void moe_cuda_sm_clocks(int dev, int *now_mhz, int *max_mhz, int *nvml_max_mhz);

#endif
