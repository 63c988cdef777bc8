/*
 * grouped_gemm_configs.h — the one list of grouped-GEMM kernel configurations that are compiled
 * (template instantiations in grouped_gemm.cu / grouped_gemm_dw.cu) and therefore the only ones
 * moe_kernel_config_validate accepts and the autotuner tries. Plain C preprocessor, included by
 * the CUDA files and by src/cuda/kernel_config.c, so the list cannot drift between them.
 *
 * Tensor-core path (bf16, fp16), X(BM, BN, BK, WARPS_M, WARPS_N, STAGES):
 *   BM x BN output tile per CTA (forward: rows x output columns; dW: N x K of dW_e), BK the
 *   reduction step per pipeline stage, WARPS_M x WARPS_N warps, STAGES cp.async stages.
 * The narrow (unaligned rows) fallback runs one fixed configuration, MOE_GG_NARROW_CONFIG.
 * fp32 runs the FFMA kernels, X(BM, BN): 256 threads, BK 16, one shared-memory stage.
 *
 * Hopper wgmma path (bf16, fp16 forward with B_e [N, K]; grouped_gemm_wgmma.cu), selected by
 * the ",tma" configurations, X(BM, BN, BK, WARPS, STAGES, CLUSTER): CLUSTER 1, or 2 for pairs
 * of CTAs (",c2": a cluster of two row tiles of one expert and column multicasting the weight
 * tile to both); BM-row tiles (128: 64 rows per
 * consumer warpgroup; the kernel also takes 256: 128 rows each, two m64 wgmmas per k16, e.g.
 * X(256, 128, 64, 12, 4), measured 1.5-2x slower on an H100 and so not listed), BK 64 (one 128-byte swizzle row), 12 warps = one producer warpgroup (TMA
 * for B, cp.async gather for A) + two consumer warpgroups (wgmma m64nBNk16), STAGES mbarrier
 * stages; BM/128 * BN/2 <= 128 fp32 accumulators per consumer thread. Problems it cannot take (b_kn,
 * unaligned rows, fp32, not an sm_90 device) run the mma.sync default instead.
 */
#ifndef MOE_GROUPED_GEMM_CONFIGS_H
#define MOE_GROUPED_GEMM_CONFIGS_H

#define MOE_GG_MMA_CONFIGS(X)    \
    X(128, 128, 32, 2, 4, 3)     \
    X(128, 128, 32, 2, 4, 4)     \
    X(128, 128, 64, 2, 4, 3)     \
    X(128, 128, 64, 2, 2, 3)     \
    X(128, 256, 32, 2, 4, 3)     \
    X(128, 256, 64, 2, 4, 3)     \
    X(256, 128, 64, 4, 2, 3)     \
    X(128, 64, 32, 2, 2, 4)      \
    X(64, 128, 32, 2, 2, 4)      \
    X(64, 128, 64, 2, 2, 3)      \
    X(64, 64, 32, 2, 2, 3)       \
    X(64, 64, 32, 2, 2, 2)

#define MOE_GG_WGMMA_CONFIGS(X) \
    X(128, 256, 64, 12, 4, 1)   \
    X(128, 128, 64, 12, 6, 1)   \
    X(128, 256, 64, 12, 4, 2)

#define MOE_GG_NARROW_CONFIG(X) X(64, 64, 32, 2, 2, 2)

#define MOE_GG_FFMA_CONFIGS(X) \
    X(64, 64)                  \
    X(128, 128)

#define MOE_GG_FFMA_BK 16
#define MOE_GG_FFMA_THREADS 256

#endif /* MOE_GROUPED_GEMM_CONFIGS_H */
