/* cli_ep.h — the expert-parallel side of the moe-ep subcommands: when the program runs under
 * mpirun with several ranks (or with an EP option), `forward` and `check` run the layer
 * expert-parallel through src/ep (rank 0 reads and spreads the tokens, each rank loads only its
 * experts, rank 0 writes the result). */
#ifndef MOE_CLI_EP_H
#define MOE_CLI_EP_H

#include <stdbool.h>
#include <stdint.h>

#include "cli_opts.h"

typedef struct cli_ep_args {
    const char *transport; /* mpi | nccl | auto */
    const char *route;     /* router | uniform | skewed | all-to-one[:R] | file:PATH */
    int virtual_ranks;
    int chunks;
    int max_tokens_per_rank;
    bool stats;
} cli_ep_args;

/* The EP option table entries (append to a subcommand's options; terminated by {0}). */
#define CLI_EP_OPTIONS(a)                                                                         \
    {"transport", OPT_STRING, "mpi|nccl|auto", "EP: transport between ranks (default auto: nccl with one GPU per rank on the cuda backend, else mpi)", .str = &(a).transport}, \
    {"ep-virtual", OPT_INT, "V", "EP: this process plans and dispatches as V ranks (default 1)", .i = &(a).virtual_ranks, .min = 1}, \
    {"chunks", OPT_INT, "C", "EP: pipeline the batch in C chunks to overlap transfers with compute (default 1)", .i = &(a).chunks, .min = 1}, \
    {"route", OPT_STRING, "MODE", "EP: forced routing for tests: uniform, skewed, all-to-one[:R], file:PATH (default router)", .str = &(a).route}, \
    {"max-tokens-per-rank", OPT_INT, "M", "EP: size buffers once for at most M tokens per rank (more is an error); on cuda over nccl also sync-free and graph-capturable, not with --chunks > 1", .i = &(a).max_tokens_per_rank, .min = 0}, \
    {"stats", OPT_FLAG, NULL, "EP: print per-peer token/byte counters and the chunk timeline", .flag = &(a).stats}

void cli_ep_args_init(cli_ep_args *a);
/* Whether this run is expert-parallel: launched by mpirun with >1 rank, or an EP option given. */
bool cli_ep_wanted(const cli_ep_args *a);
/* Options of the single-rank path that the expert-parallel one does not take (sample > 0,
 * a kernel configuration, autotuning, exact HF rounding): a message naming the first one
 * given, and 2; else 0. */
int cli_ep_reject_plain_only(const char *cmd, int sample, const char *kernel_config,
                             bool autotune, const char *autotune_cache, bool exact_hf_rounding);

/* `moe-ep forward` expert-parallel. Returns the exit code (all ranks agree). */
int cli_ep_forward(const char *config, const char *weights, int layer, const char *input,
                   const char *output, const char *dtype_s, const char *backend_s,
                   const cli_ep_args *ep);
/* `moe-ep check` expert-parallel: the EP forward (and backward) against the single-rank fused
 * path, per rank. */
int cli_ep_check(const char *model, int tokens, const char *dtype_s, const char *backend_s,
                 uint64_t seed, bool backward, const cli_ep_args *ep);

#endif
