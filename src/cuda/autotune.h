/*
 * autotune.h — pick the fastest compiled grouped-GEMM configuration for a real problem, and
 * remember it across runs in a JSON cache.
 *
 * Key: GPU name + dtype + kernel ("grouped_gemm" / "grouped_gemm_dw") + shape (N, K, max_rows,
 * num_experts, topk) + flags (permutes, b_kn, scales, epilogue, preact). Value: the configuration
 * string ("128x128x32,w8,s3") and its median time.
 * Cache file: cache_path if not NULL/empty, else $MOE_AUTOTUNE_CACHE, else
 * $HOME/.cache/moe-ep/autotune.json (directories created). A missing file is an empty cache; an
 * unreadable or malformed one is reported with moe_warn and treated as empty (then rewritten).
 * Writes are atomic (temporary file + rename) and merge with what another process wrote since.
 *
 * Tuning runs each candidate on the caller's stream, on the caller's inputs, but writes only to
 * scratch outputs allocated here (C / C_preact / dW), so no output the caller relies on is
 * touched. It times each candidate with CUDA events (1 warm-up, 5 timed runs, median) and
 * synchronises the stream. Progress goes to stderr ("moe-ep autotune: ..."); set
 * MOE_AUTOTUNE_QUIET=1 to silence it. A problem that takes the narrow (unaligned) fallback has a
 * single kernel and is not timed.
 */
#ifndef MOE_CUDA_AUTOTUNE_H
#define MOE_CUDA_AUTOTUNE_H

#include <stdbool.h>
#include <stddef.h>

#include "moe_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The cache path that would be used for cache_path (see above) into buf. */
moe_status moe_autotune_cache_path(const char *cache_path, char *buf, size_t len, moe_error *err);

/* Look the problem up without tuning: *found tells whether the cache had a usable entry. */
moe_status moe_autotune_lookup(const char *cache_path, const moe_grouped_gemm_args *a,
                               moe_kernel_config *out, bool *found, moe_error *err);
moe_status moe_autotune_lookup_dw(const char *cache_path, const moe_grouped_gemm_dw_args *a,
                                  moe_kernel_config *out, bool *found, moe_error *err);

/* The cached choice, or tune now (and persist). The args must be launchable as given (device
 * pointers, expert_offsets ready on stream s). tuning: how the caller launches (NULL: the
 * defaults); the candidates run with it, except that the autotuner brings scheduler counters of
 * its own where the caller uses the dynamic tile scheduler (its launches must not share the
 * caller's). With exact_hf_rounding on, forward problems it changes (scale_a_rows, SiLU) have
 * entries of their own (flag "exact_hf" in the key); moe_autotune_lookup and moe_autotune_key
 * name the default entries. *out is a resolved configuration (moe_kernels.h). */
moe_status moe_autotune_pick(const char *cache_path, const moe_grouped_gemm_args *a,
                             const moe_kernel_tuning *tuning, cudaStream_t s,
                             moe_kernel_config *out, moe_error *err);
moe_status moe_autotune_pick_dw(const char *cache_path, const moe_grouped_gemm_dw_args *a,
                                const moe_kernel_tuning *tuning, cudaStream_t s,
                                moe_kernel_config *out, moe_error *err);

/* The cache key of a problem (for logs and tests) into buf. */
moe_status moe_autotune_key(const moe_grouped_gemm_args *a, char *buf, size_t len, moe_error *err);
moe_status moe_autotune_key_dw(const moe_grouped_gemm_dw_args *a, char *buf, size_t len,
                               moe_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CUDA_AUTOTUNE_H */
