/*
 * engine.h — runs the fused path of one MoE block on a backend (CPU twin or CUDA) behind one
 * interface, with host-memory inputs and outputs. The CLI, the correctness mode, the benchmark
 * and the service all go through it.
 */
#ifndef MOE_ENGINE_H
#define MOE_ENGINE_H

#include "moe_stages.h"
#include "weights.h"

typedef struct moe_engine moe_engine;

/* w stays owned by the caller and must outlive the engine (the CUDA backend uploads it once).
 * max_T bounds every later call's T. */
moe_status moe_engine_create(moe_backend backend, const moe_weights *w, moe_dtype dt, int max_T,
                             moe_engine **out, moe_error *err);
void moe_engine_destroy(moe_engine *e);

/* Options of the CUDA backend (ignored on the CPU, where a forced kernel config is an error). */
typedef struct moe_engine_options {
    const char *kernel_config;  /* "128x128x64,w8,s3": force every grouped GEMM to it; NULL/"auto" */
    bool autotune;              /* pick each GEMM's config by timing candidates (cached on disk) */
    const char *autotune_cache; /* NULL: $MOE_AUTOTUNE_CACHE or ~/.cache/moe-ep/autotune.json */
    bool exact_hf_rounding;     /* HF's rounding points in the Hopper kernels (x*score rounded
                                   before GEMM1, IEEE SiLU) instead of the faster defaults
                                   (docs/KERNELS.md); the CPU backend always rounds there */
} moe_engine_options;
/* Validates and applies the options (an invalid kernel config is rejected with the reason). */
moe_status moe_engine_configure(moe_engine *e, const moe_engine_options *opts, moe_error *err);
moe_backend moe_engine_backend(const moe_engine *e);
/* Which grouped-GEMM kernel and configuration each stage of the last run used ("" on the CPU). */
void moe_engine_kernel_summary(const moe_engine *e, char *buf, size_t len);
/* CUDA only: the cuBLAS baselines (src/cuda/cuda_baselines.h) on the engine's own device
 * weights for a batch whose routed rows per local expert are counts [El] (host). */
moe_status moe_engine_baselines(moe_engine *e, const int32_t *counts, int warmup, int iters,
                                double *dense_ms, double *loop_ms, double *grouped_ms,
                                moe_error *err);
const char *moe_engine_describe(const moe_engine *e); /* "cpu (2 threads)", "cuda: NVIDIA H100 ..." */

/* Forward on x [T,H] (host, dt). st: host buffers from moe_fwd_state_alloc; intermediates whose
 * pointer is NULL are not returned (the CUDA backend then skips writing them). */
moe_status moe_engine_forward(moe_engine *e, int T, const void *x, moe_fwd_state *st,
                              moe_error *err);
/* Backward after a forward of the same x whose st kept gemm1_out and act. Writes dx [T,H] and
 * grads (canonical layout, dt, as from moe_weights_zeros_like). */
moe_status moe_engine_backward(moe_engine *e, int T, const void *x, const moe_fwd_state *st,
                               const void *dout, void *dx, moe_weights *grads, moe_error *err);

/* Timing for the benchmark: `iters` timed repetitions (after `warmup`) of the given mode on
 * device-/host-resident copies of the inputs (no transfers inside the timed region), rotating
 * over `rotate` input sets so repeated runs do not measure a warm cache. Per repetition times in
 * ms into times_ms [iters]; per-phase medians into phase_ms [MOE_PHASE_COUNT] when non-NULL. */
/* Phases of the benchmark's breakdown. With SiLU-and-mul fused into GEMM1 the act phase is 0. */
typedef enum {
    MOE_PHASE_ROUTE = 0, /* router GEMM + top-k */
    MOE_PHASE_PERMUTE,   /* histogram, counting sort, offsets */
    MOE_PHASE_GEMM1,
    MOE_PHASE_ACT,
    MOE_PHASE_GEMM2,
    MOE_PHASE_COMBINE,   /* sum over k (+ shared expert) */
    MOE_PHASE_COUNT
} moe_phase;
extern const char *const moe_phase_names[MOE_PHASE_COUNT];

typedef enum { MOE_BENCH_FWD = 0, MOE_BENCH_BWD = 1, MOE_BENCH_FWDBWD = 2 } moe_bench_mode;
moe_status moe_engine_time(moe_engine *e, moe_bench_mode mode, int T, const void *const *xs,
                           const void *dout, int rotate, int warmup, int iters, double *times_ms,
                           double *phase_ms, moe_error *err);

/* ---- the benchmark's measurements beside the layer timing ---- */

/* Where the engine runs. CUDA: the device's name, SMs and SM clocks (peak from
 * cudaDevAttrClockRate; current and NVML maximum from NVML when the driver's library is
 * present, else 0). CPU: name "cpu", sm_count = threads, clocks 0. Never fails. */
typedef struct moe_device_info {
    char name[256];
    int sm_count;
    int sm_clock_max_mhz;  /* peak SM clock (cudaDevAttrClockRate), 0 unknown */
    int sm_clock_now_mhz;  /* current SM clock (NVML), 0 unknown */
    int sm_clock_nvml_max_mhz;
} moe_device_info;
void moe_engine_device_info(const moe_engine *e, moe_device_info *out);

/* Copy bandwidth in GB/s = 2*bytes / time (read + write traffic), median of `iters` timed
 * copies of `bytes` after `warmup`: CUDA: device-to-device cudaMemcpyAsync (events); CPU:
 * memcpy split over the OpenMP threads. Allocates 2*bytes for the duration of the call. */
moe_status moe_engine_copy_bandwidth(moe_engine *e, size_t bytes, int warmup, int iters,
                                     double *gbs, moe_error *err);

/* What routing hands the grouped GEMMs over n input sets (means over the sets; tile_fill
 * pools them: all their rows over all their row slots). */
typedef struct moe_expert_usage {
    double mean_touched; /* local experts with at least one routed row (the benchmark's weight
                            bytes are touched * 3*H*I*dtype size) */
    double tile_fill;    /* routed rows / (128 x the 128-row tiles they need, ceil(rows_e/128)
                            per expert): the share of a 128-row-tile grouped GEMM's row slots
                            that hold real rows (1 = no padding); NAN when no rows */
    double max_over_mean; /* the busiest local expert's rows / the mean over local experts */
} moe_expert_usage;

/* Routing only (router GEMM, top-k, histogram) of the n inputs xs [n][T,H] (host) on the
 * engine's backend, summarised as moe_expert_usage. */
moe_status moe_engine_expert_usage(moe_engine *e, int T, const void *const *xs, int n,
                                   moe_expert_usage *out, moe_error *err);

/* CUDA only: graph-replay latency of the whole forward layer (routing included). For each of
 * the `rotate` input sets one eager forward (which also runs any autotuning), then the forward
 * on that set captured into a CUDA graph; then warmup + iters replays cycling over the sets,
 * each timed alone with CUDA events around cudaGraphLaunch, times_ms [iters]. No host
 * synchronisation inside a replay. MOE_ERR_UNSUPPORTED on the CPU backend. */
moe_status moe_engine_graph_time(moe_engine *e, int T, const void *const *xs, int rotate,
                                 int warmup, int iters, double *times_ms, moe_error *err);

#endif
