/*
 * cli_bench_time.h — the measurements of `moe-ep bench` on top of the public API: the layer
 * timed eagerly (CUDA events around each call on the GPU, the wall clock on the CPU), its
 * phases (the layer's own timing markers, read from its stats), CUDA-graph replays of the
 * forward, what the routing hands the experts, the cuBLAS baselines, the device and the copy
 * bandwidth.
 */
#ifndef MOE_CLI_BENCH_TIME_H
#define MOE_CLI_BENCH_TIME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "moe_ep.h"

typedef enum { BENCH_FWD = 0, BENCH_BWD = 1, BENCH_FWDBWD = 2 } bench_mode;

/* Input sets on the layer's backend (device copies on CUDA), made once per run. */
typedef struct bench_inputs {
    int rotate, max_T;
    void **xs;      /* [rotate] x [max_T, H] */
    void *dout;     /* [max_T, H] */
    void *out, *dx; /* [max_T, H] */
    moe_layer_grads g; /* gradients of the layer's shapes */
    bool device;
} bench_inputs;

/* hosts: rotate host input sets [max_T*H]; dout_host [max_T*H]. */
moe_status bench_inputs_make(moe_layer *L, int rotate, int max_T, void *const *hosts,
                             const void *dout_host, bench_inputs *in);
void bench_inputs_free(moe_layer *L, bench_inputs *in);

/* iters timed repetitions after warmup (times_ms [iters]) and the phase medians of a separate
 * pass of forwards with the layer's timing on (phase_ms [MOE_STATS_NUM_PHASES], NaN where not
 * measured). */
moe_status bench_time_eager(moe_layer *L, bench_mode mode, int T, const bench_inputs *in,
                            int warmup, int iters, double *times_ms, double *phase_ms);
/* CUDA: one graph of the forward per input set, replays timed alone (times_ms [iters]). */
moe_status bench_time_graph(moe_layer *L, int T, const bench_inputs *in, int warmup, int iters,
                            double *times_ms);

/* What routing hands the grouped GEMMs over the host input sets (means over the sets). */
typedef struct bench_usage {
    double mean_touched; /* local experts with at least one routed row */
    double tile_fill;    /* routed rows / the row slots of the 128-row tiles they need */
    double max_over_mean;/* the busiest local expert's rows / the mean */
    int32_t *counts;     /* [E] rows per expert of the first set (for the baselines) */
} bench_usage;
moe_status bench_expert_usage(moe_layer *L, const moe_config *cfg, moe_dtype dt, int T,
                              void *const *hosts, int n, bench_usage *u);

/* CUDA: the cuBLAS baselines on the layer's own device weights (NaN elsewhere). */
moe_status bench_baselines(moe_layer *L, moe_dtype dt, const int32_t *counts, int warmup,
                           int iters, double *dense_ms, double *loop_ms, double *grouped_ms);

typedef struct bench_device {
    char name[256];
    int sm_count; /* CPU: threads */
    int sm_clock_max_mhz, sm_clock_now_mhz, sm_clock_nvml_max_mhz;
} bench_device;
void bench_device_info(const moe_layer *L, bench_device *d);
/* Copy bandwidth in GB/s = 2*bytes / median time (device-to-device on CUDA, threaded memcpy
 * on the CPU). */
moe_status bench_copy_bandwidth(const moe_layer *L, size_t bytes, int warmup, int iters,
                                double *gbs);

#endif /* MOE_CLI_BENCH_TIME_H */
