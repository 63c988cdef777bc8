/*
 * moe_kernels.h — extern "C" launchers of the grouped-GEMM kernels (the .cu files in kernels/),
 * with the types they take: the kernel configuration, the tuning struct, the launch report.
 * Every pointer in the argument structs is a DEVICE pointer. Every launcher validates its
 * arguments, launches on `stream` without synchronising, checks cudaGetLastError() and returns
 * a moe_status (reason in err).
 *
 * A leaf: this header and everything under kernels/ include only the CUDA headers and the
 * project's data headers (common.h, moe_stages.h, config.h, grouped_gemm_configs.h); nothing
 * under kernels/ calls into src/cuda/ or reads the environment. A launcher runs exactly the
 * configuration it is given (resolved by the caller: src/cuda/kernel_config.h,
 * moe_kernel_config_resolve) with the tuning the caller filled in (src/cuda/kernel_launch.h
 * has the host helpers: resolve-and-launch, scheduler counters, the diagnostics build's
 * environment).
 */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stdbool.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include "grouped_gemm_configs.h"

/* The project's C headers have no extern "C" guards of their own: include them inside ours. */
#ifdef __cplusplus
extern "C" {
#endif

#include "moe_stages.h"

/* The wgmma kernels' run-time options of a configuration (moe_kernel_config.epilogue / .a_load);
 * AUTO = the built-in rule (docs/KERNELS.md). */
typedef enum moe_gg_epilogue {
    MOE_GG_EPILOGUE_AUTO = 0,
    MOE_GG_EPILOGUE_DIRECT = 1, /* ",direct": outputs stored from the registers */
    MOE_GG_EPILOGUE_STAGED = 2  /* ",staged": through shared memory and bulk copies */
} moe_gg_epilogue;
typedef enum moe_gg_a_load {
    MOE_GG_A_AUTO = 0,    /* A by TMA where A needs no gather (the default since round 6) */
    MOE_GG_A_CPASYNC = 1, /* ",acp": A rows by cp.async */
    MOE_GG_A_TMA = 2      /* ",atma": A by TMA where A needs no gather (no permute_x) */
} moe_gg_a_load;

/* A grouped-GEMM kernel configuration: tile sizes, warps, pipeline stages, and whether the
 * TMA path is used (when implemented and the strides allow it). Zeros = "choose" in a request
 * (moe_kernel_config_resolve); the launchers take only resolved ones: an entry of the compiled
 * list (grouped_gemm_configs.h) with its run-time options. */
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

/* How many int32 counters moe_kernel_tuning.sched_counters points to. */
#define MOE_SCHED_COUNTERS 2
#define MOE_SCHED_COUNTERS_BYTES (MOE_SCHED_COUNTERS * sizeof(int32_t))

/* moe_kernel_tuning.l2_hints: the L2 cache policy of the wgmma forward's weight-tile loads. */
typedef enum moe_l2_hints {
    MOE_L2_HINTS_DEFAULT = 0,    /* evict_last, the expert's last row tile evict_first */
    MOE_L2_HINTS_NONE = 1,       /* no policy (before round 3) */
    MOE_L2_HINTS_EVICT_FIRST = 2 /* only the last row tile's evict_first */
} moe_l2_hints;

/* How a launch runs, beside its configuration: filled by host code (src/cuda/: the block, the
 * EP context, the autotuner, tests), never from the environment by the kernels. NULL or all
 * zeros = the defaults (the fast paths, the static tile order, no cap). Fields that only the
 * wgmma kernels read are ignored by the others. */
typedef struct moe_kernel_tuning {
    /* HF's exact rounding points in the wgmma forward/dX kernel: scale_a_rows (Llama-4 GEMM1)
     * multiplies the A rows by the score and rounds them to the dtype in shared memory before
     * the MMA, as HF, the CPU twin and the mma.sync kernels do, instead of scaling the fp32
     * accumulators after it; SiLU uses IEEE expf and division instead of __expf / __fdividef.
     * Off (the default): the fast paths (docs/KERNELS.md, "exact_hf_rounding"). The other
     * kernels always round where HF does. */
    bool exact_hf_rounding;
    /* The wgmma forward/dX kernel's dynamic tile scheduler: MOE_SCHED_COUNTERS int32 of device
     * memory, zero before the first launch; every launch leaves them zero again, so launches
     * ordered one after the other (one stream, replays of CUDA graphs on one stream) may share
     * them. Two launches that may run at the same time must NOT share counters (each would
     * skip tiles the other took, and the pair could be left dirty). NULL: the static tile order
     * b, b + grid, ... (same results, measured up to 11% slower; docs/KERNELS.md round 4). */
    int32_t *sched_counters;
    /* Test hook: cap the persistent grid of the wgmma kernels (forward/dX and dW) at this many
     * CTAs, so one CTA walks many tiles and wraps its stage ring; 0 = no cap. */
    int max_ctas;
    /* Timing knobs of the wgmma forward/dX kernel (same results, kept for A/B; the defaults are
     * the measured best): moe_l2_hints of the B loads; B tiles prefetched into L2 this many k
     * steps ahead (0: off); an async-proxy fence per stage; the 4-byte pair epilogue instead of
     * the quad-transposed 16-byte stores. */
    int l2_hints;
    int prefetch;
    bool proxy_fence;
    bool narrow_stores;
#ifdef MOE_DIAGNOSTICS
    /* Diagnostics that compute WRONG results, to time where the time goes; they exist only in
     * a -DMOE_DIAGNOSTICS=ON build (the kernels' code paths are compiled out otherwise). */
    bool diag_skip_epilogue; /* wgmma forward/dX and dW: no output stores */
    bool diag_no_gather;     /* wgmma forward/dX: A row r/topk instead of gather_idx[r]/topk */
#endif
} moe_kernel_tuning;

/* Which kernel/path actually ran (reported by --stats / check mode). */
typedef struct moe_kernel_report {
    const char *kernel; /* e.g. "grouped_gemm_mma_bf16" */
    moe_kernel_config config;
    int used_tma;
    int staged_epilogue; /* wgmma: outputs went through shared memory and bulk copies */
    int a_tma;           /* wgmma: A rows came by TMA (the default without permute_x; ",acp" not) */
    int sched_dynamic;   /* wgmma forward/dX: tiles came from tuning->sched_counters (dynamic
                            scheduler); 0: the static order, or not a wgmma forward/dX launch */
    int fast_rounding;   /* 1: a fast path that rounds differently from HF ran (wgmma:
                            scale_a_rows on the fp32 accumulators, SiLU by __expf/__fdividef);
                            0: HF's rounding points (see moe_kernel_tuning.exact_hf_rounding) */
} moe_kernel_report;

/* Whether cfg is an entry of the compiled list for dtype (bf16/fp16: the mma.sync and the ",tma"
 * wgmma configurations; fp32: the FFMA ones), with run-time options only on ",tma" ones and in
 * range: what moe_kernel_config_resolve returns, and what the launchers accept. */
static inline bool moe_kernel_config_is_compiled(const moe_kernel_config *c, moe_dtype dtype)
{
    if (!c || c->epilogue < MOE_GG_EPILOGUE_AUTO || c->epilogue > MOE_GG_EPILOGUE_STAGED ||
        c->a_load < MOE_GG_A_AUTO || c->a_load > MOE_GG_A_TMA)
        return false;
    if (!c->use_tma && (c->epilogue || c->a_load || c->cluster > 1)) return false;
    const int cl = c->cluster > 1 ? c->cluster : 1;
    if (dtype == MOE_DTYPE_F32) {
#define MOE_KC_FFMA(bm, bn)                                                                       \
    if (!c->use_tma && c->tile_m == (bm) && c->tile_n == (bn) && c->tile_k == MOE_GG_FFMA_BK &&   \
        c->warps == MOE_GG_FFMA_THREADS / 32 && c->stages == 1)                                   \
        return true;
        MOE_GG_FFMA_CONFIGS(MOE_KC_FFMA)
#undef MOE_KC_FFMA
        return false;
    }
    if (dtype != MOE_DTYPE_BF16 && dtype != MOE_DTYPE_F16) return false;
#define MOE_KC_MMA(bm, bn, bk, wm, wn, st)                                                        \
    if (!c->use_tma && c->tile_m == (bm) && c->tile_n == (bn) && c->tile_k == (bk) &&            \
        c->warps == (wm) * (wn) && c->stages == (st))                                             \
        return true;
#define MOE_KC_WG(bm, bn, bk, w, st, ncl)                                                         \
    if (c->use_tma && c->tile_m == (bm) && c->tile_n == (bn) && c->tile_k == (bk) &&             \
        c->warps == (w) && c->stages == (st) && cl == (ncl))                                      \
        return true;
    MOE_GG_MMA_CONFIGS(MOE_KC_MMA)
    MOE_GG_WGMMA_CONFIGS(MOE_KC_WG)
#undef MOE_KC_MMA
#undef MOE_KC_WG
    return false;
}

/* The mma.sync (bf16/fp16) or FFMA (fp32) configuration a ",tma" configuration falls back to
 * where the wgmma kernels cannot run (dW without the wgmma dW kernel, unaligned rows, b_kn with
 * N * 2 bytes not a multiple of 16, not sm_90), and the automatic choice below 16 rows per
 * expert (src/cuda/kernel_config.c). Measured on an H100 (docs/KERNELS.md): 128x128x64 with 8
 * warps was the best single mma.sync configuration for Qwen3-30B-A3B's GEMM1+GEMM2 and within
 * 11% of the best for Llama-4-Scout's; with few rows per expert, 64-row tiles waste fewer
 * padded rows. */
static inline moe_kernel_config moe_gg_default_mma_config(moe_dtype dtype, int avg_rows)
{
    if (dtype == MOE_DTYPE_F32) {
        const int t = avg_rows >= 128 ? 128 : 64;
        moe_kernel_config c = {t, t, MOE_GG_FFMA_BK, MOE_GG_FFMA_THREADS / 32, 1, 0, 0, 0, 0};
        return c;
    }
    if (avg_rows >= 96) {
        moe_kernel_config c = {128, 128, 64, 8, 3, 0, 0, 0, 0};
        return c;
    }
    moe_kernel_config c = {64, 128, 64, 4, 3, 0, 0, 0, 0};
    return c;
}

/* The fixed configuration the narrow (rows not 16-byte aligned) fallback runs. */
static inline moe_kernel_config moe_gg_narrow_config(void)
{
#define MOE_KC_N(bm, bn, bk, wm, wn, st) {bm, bn, bk, (wm) * (wn), st, 0, 0, 0, 0}
    moe_kernel_config c = MOE_GG_NARROW_CONFIG(MOE_KC_N);
#undef MOE_KC_N
    return c;
}

/* The forward / backward-dX grouped GEMM (moe_stages.h, moe_grouped_gemm_args). cfg: a resolved
 * configuration (moe_kernel_config_is_compiled; MOE_ERR_INVALID_ARG otherwise, NULL included):
 * a ",tma" one runs the Hopper wgmma kernel where the problem and the GPU allow it and
 * moe_gg_default_mma_config otherwise; the report names what ran. tuning: NULL = defaults. */
moe_status moe_cuda_grouped_gemm(const moe_grouped_gemm_args *a, const moe_kernel_config *cfg,
                                 const moe_kernel_tuning *tuning, cudaStream_t stream,
                                 moe_kernel_report *report, moe_error *err);
/* The weight gradient (moe_grouped_gemm_dw_args), likewise: a ",tma" configuration runs the
 * wgmma dW kernel (its own 128x256 tile; ",direct" the 4-stage one) where it applies. The dW
 * kernels read tuning->max_ctas (and the diagnostics) only. */
moe_status moe_cuda_grouped_gemm_dw(const moe_grouped_gemm_dw_args *a,
                                    const moe_kernel_config *cfg, const moe_kernel_tuning *tuning,
                                    cudaStream_t stream, moe_kernel_report *report,
                                    moe_error *err);

#ifdef __cplusplus
}
#endif
#endif /* MOE_KERNELS_H */
