/*
 * kernel_config.h — grouped-GEMM kernel configurations on the host (kernel_config.c): parsing,
 * validation, printing, the compiled list, and the resolution of a request into the compiled
 * configuration the launchers of kernels/moe_kernels.h take (they run only resolved ones).
 * Used by every caller of those launchers (src/cuda/kernel_launch.c resolves and launches in
 * one call), by the engine (--kernel-config), and by the autotuner to enumerate its candidates.
 * The struct itself (moe_kernel_config) is defined in kernels/moe_kernels.h.
 */
#ifndef MOE_CUDA_KERNEL_CONFIG_H
#define MOE_CUDA_KERNEL_CONFIG_H

#include <stddef.h>

#include "moe_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Parse "128x128x64,w8,s3" style strings; a reason in err when invalid. */
moe_status moe_kernel_config_parse(const char *text, moe_kernel_config *cfg, moe_error *err);
/* Whether cfg is runnable for this kernel/dtype (tile divisibility, shared memory, warps). */
moe_status moe_kernel_config_validate(const moe_kernel_config *cfg, moe_dtype dtype,
                                      moe_error *err);

/* The configurations compiled for dtype (bf16/fp16: tensor-core list; fp32: FFMA list), in a
 * fixed order. Returns the count (0 for a dtype with no kernels); *list points to static data. */
int moe_kernel_configs(moe_dtype dtype, const moe_kernel_config **list);
/* The fixed configuration the narrow (rows not 16-byte aligned) fallback runs
 * (moe_gg_narrow_config of moe_kernels.h). */
moe_kernel_config moe_kernel_config_narrow(void);
/* "128x128x32,w8,s3", with ",tma", ",c2" and the wgmma options (",staged"/",direct",
 * ",atma"/",acp") appended when set, into buf; "auto" for all zeros; returns buf. */
const char *moe_kernel_config_str(const moe_kernel_config *cfg, char *buf, size_t len);
/* Turn a request into one compiled configuration:
 *   req NULL or zero tile fields -> the default for dtype given avg_rows (rows per expert, a
 *                           hint); epilogue / a_load options given with it are kept where the
 *                           default is a wgmma configuration and dropped where it is not;
 *   some fields zero      -> the first listed configuration matching the non-zero fields;
 *   all fields set        -> that configuration, if compiled.
 * use_tma must match too: "128x256x64,w12,s4,tma" names a Hopper wgmma configuration (a
 * launcher that cannot run it falls back to moe_kernel_config_default_mma by itself). The
 * options are copied to the result; on a request without use_tma they are an error, and so
 * are values outside moe_gg_epilogue / moe_gg_a_load.
 * MOE_ERR_INVALID_ARG (listing the valid ones) when nothing matches, MOE_ERR_UNSUPPORTED for a
 * dtype without kernels. */
moe_status moe_kernel_config_resolve(const moe_kernel_config *req, moe_dtype dtype, int avg_rows,
                                     moe_kernel_config *out, moe_error *err);
/* The mma.sync (bf16/fp16) or FFMA (fp32) configuration the automatic choice falls back to: what
 * a ",tma" request runs where the wgmma kernel cannot (dW, unaligned rows, b_kn with N * 2 bytes
 * not a multiple of 16, not sm_90): moe_gg_default_mma_config of moe_kernels.h. */
moe_kernel_config moe_kernel_config_default_mma(moe_dtype dtype, int avg_rows);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CUDA_KERNEL_CONFIG_H */
