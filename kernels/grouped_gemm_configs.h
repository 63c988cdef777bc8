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
 * Hopper wgmma path (bf16, fp16; forward and dX with B_e [N, K] or [K, N]; grouped_gemm_wgmma.cu,
 * and the dW kernel of grouped_gemm_dw_wgmma.cu with its own 128x256 tile), selected by the
 * ",tma" configurations, X(BM, BN, BK, WARPS, STAGES, CLUSTER):
 *   BM-row tiles: 128, 64 rows per consumer warpgroup (the kernel also takes 256, two m64
 *     wgmmas per k16, e.g. X(256, 128, 64, 12, 4, 1): measured 1.5-2x slower on an H100, not
 *     listed); BN 128 or 256 output columns; BK 64 (one 128-byte swizzle row);
 *   12 warps = one producer warpgroup (TMA for B, cp.async gather for A) + two consumer
 *     warpgroups (wgmma m64nBNk16, BM/128 * BN/2 <= 128 fp32 accumulators per thread);
 *   STAGES mbarrier stages;
 *   CLUSTER 1, or 2 for pairs of CTAs (",c2": two row tiles of one expert and column,
 *     multicasting the weight tile to both).
 * Where a configuration's stages leave room for the 128-row output tile in shared memory
 * (128x256 with 3 stages: 144 KB + 72 KB; 128x128 with 6 stages and SiLU's half-width rows) the
 * epilogue is staged there and stored with bulk copies while the next tile's MMAs run
 * (grouped_gemm_wgmma.cu, wg_out_pitch; the ",staged" / ",direct" options decide otherwise);
 * elsewhere it stores from registers. Problems the wgmma kernels cannot take (rows not on 16
 * bytes, fp32, not an sm_90 device) run the mma.sync default instead.
 * Plain C preprocessor: moe_kernels.h (moe_kernel_config_is_compiled, the fallbacks) and
 * src/cuda/kernel_config.c (the list) expand these lists too.
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
    X(128, 256, 64, 12, 3, 1)   \
    X(128, 128, 64, 12, 6, 1)   \
    X(128, 256, 64, 12, 4, 2)

#define MOE_GG_NARROW_CONFIG(X) X(64, 64, 32, 2, 2, 2)

#define MOE_GG_FFMA_CONFIGS(X) \
    X(64, 64)                  \
    X(128, 128)

#define MOE_GG_FFMA_BK 16
#define MOE_GG_FFMA_THREADS 256

#endif /* MOE_GROUPED_GEMM_CONFIGS_H */
