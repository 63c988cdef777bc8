/*
 * cli_layer.h — what the layer-running subcommands (forward, backward, check, bench) share:
 * the layer and expert-parallel options, turning them into the public API's option structs,
 * MPI around a run (under mpirun, or with an EP option, the layer runs expert-parallel over
 * MPI_COMM_WORLD), and the per-rank token slices.
 */
#ifndef MOE_CLI_LAYER_H
#define MOE_CLI_LAYER_H

#include <stdbool.h>
#include <stdint.h>

#include "cli_opts.h"
#include "config.h"
#include "moe_ep.h"

typedef struct cli_layer_args {
    const char *backend_s, *dtype_s, *kernel_config, *autotune_cache;
    bool autotune, exact_hf;
    int threads;
    /* expert parallel */
    const char *transport, *route, *expert_map;
    int virtual_ranks, chunks, max_tokens_per_rank;
    bool stats;
} cli_layer_args;

#define CLI_THREADS_HELP                                                                       \
    "CPU threads (default: OMP_NUM_THREADS if set, else the cores this process is bound to "   \
    "divided by the ranks bound to the same cores)"

/* Options every layer-running command takes. */
#define CLI_LAYER_OPTIONS(a)                                                                      \
    {"backend", OPT_STRING, "cpu|cuda|auto", "where the layer runs (default auto: cuda when a GPU is usable)", .str = &(a).backend_s}, \
    {"dtype", OPT_STRING, "bf16|fp16|fp32", "compute dtype (default: the config's dtype)", .str = &(a).dtype_s}, \
    {"threads", OPT_INT, "N", CLI_THREADS_HELP, .i = &(a).threads, .min = 0}, \
    {"kernel-config", OPT_STRING, "CFG", "CUDA: force every grouped GEMM to CFG (e.g. 128x128x64,w8,s3 or 128x256x64,w12,s3,tma,staged; syntax: docs/KERNELS.md; default auto)", .str = &(a).kernel_config}, \
    {"autotune", OPT_FLAG, NULL, "CUDA: time the compiled GEMM configs on the real shapes and use the fastest (cached)", .flag = &(a).autotune}, \
    {"autotune-cache", OPT_STRING, "PATH", "autotune cache file (default $MOE_AUTOTUNE_CACHE or ~/.cache/moe-ep/autotune.json)", .str = &(a).autotune_cache}, \
    {"exact-hf-rounding", OPT_FLAG, NULL, "CUDA: HF's exact rounding points (x*score rounded before GEMM1, IEEE SiLU) instead of the fast defaults (docs/KERNELS.md)", .flag = &(a).exact_hf}

/* The expert-parallel options (mpirun decides the rank count). */
#define CLI_EP_OPTIONS(a)                                                                         \
    {"transport", OPT_STRING, "mpi|nccl|auto", "EP: transport between ranks (default auto: nccl when every rank has its own GPU on the cuda backend, else mpi)", .str = &(a).transport}, \
    {"ep-virtual", OPT_INT, "V", "EP: each process plans and dispatches as V ranks, every piece through the transport (default 1)", .i = &(a).virtual_ranks, .min = 1}, \
    {"chunks", OPT_INT, "C", "EP: pipeline the forward's batch in C chunks to overlap transfers with compute (default 1)", .i = &(a).chunks, .min = 1}, \
    {"route", OPT_STRING, "MODE", "EP: forced routing for tests: uniform, skewed, all-to-one[:R], file:PATH, optionally ,w=uniform (default router)", .str = &(a).route}, \
    {"max-tokens-per-rank", OPT_INT, "M", "EP: size buffers once for at most M tokens per rank (more is an error); with nccl on cuda also sync-free and graph-capturable (default 0: sized per call)", .i = &(a).max_tokens_per_rank, .min = 0}, \
    {"expert-map", OPT_STRING, "FILE", "EP: place the experts as JSON {\"experts_per_rank\": [[ids], ...]} says (default: contiguous slices, the first E mod N ranks one more)", .str = &(a).expert_map}, \
    {"stats", OPT_FLAG, NULL, "EP: print per-peer token/byte counters and the chunk timeline", .flag = &(a).stats}

void cli_layer_args_init(cli_layer_args *a);
/* Whether this run is expert-parallel: launched by mpirun with > 1 rank, or an EP option. */
bool cli_ep_wanted(const cli_layer_args *a);

/* MPI for an expert-parallel run: initialise (if needed) and learn rank and size. */
void cli_mpi_begin(int *rank, int *size);
/* Finalise (if this program initialised it) and return rc. */
int cli_mpi_end(int rc);
/* Every rank's worst exit code (without MPI: rc). */
int cli_agree(int rc);

/* The API's layer options from the arguments (the config gives the default dtype). Prints a
 * usage message naming the option and returns 2 on a bad value; 0 otherwise. */
int cli_layer_options(const char *cmd, const cli_layer_args *a, const moe_config *cfg,
                      moe_layer_options *lo, moe_dtype *dt);
/* The EP communicator over MPI_COMM_WORLD from the arguments, and the expert map (owner per
 * expert, malloc'ed, NULL = default slices) for E experts. Collective; returns 0, or the exit
 * code after printing (every rank agrees). */
int cli_ep_open(const char *cmd, const cli_layer_args *a, int E, moe_ep_comm **comm,
                int32_t **owner);

/* Free host memory in bytes (0 when unknown). */
double cli_host_free_bytes(void);
/* Whether `need` bytes fit in the free host memory: 0, or prints "moe-ep CMD: OPT VALUE: WHAT
 * need(s) about X GiB but Y GiB is free on the host; lower OPT" and returns 2 (so a huge value
 * is refused before anything is allocated, never an OOM kill). Local (not collective). */
int cli_host_memory_check(const char *cmd, const char *opt, long long value, const char *what,
                          double need);

/* Rows [off, off + Tr) of T tokens on rank r of N: contiguous, the first T mod N one more. */
void cli_split(int T, int N, int r, int *Tr, int *off);
/* "gemm1 wgmma 128x256x64,...; gemm2 ..." from the layer's stats ("" on the CPU). */
void cli_kernel_summary(const moe_layer *L, char *buf, size_t len);
/* Each rank's EP counters, printed in rank order (collective). */
void cli_print_ep_stats(const moe_layer *L, int rank, int size);
/* Print "moe-ep CMD: <last error>" and return 1 (2 for an invalid argument). */
int cli_api_fail(const char *cmd, moe_status st);

#endif /* MOE_CLI_LAYER_H */
