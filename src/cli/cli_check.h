/* cli_check.h — `moe-ep check`'s arguments, shared by the single-rank check (cli_check.c) and
 * the expert-parallel one (cli_check_ep.c). */
#ifndef MOE_CLI_CHECK_H
#define MOE_CLI_CHECK_H

#include <stdbool.h>
#include <stdint.h>

#include "cli_layer.h"

typedef struct cli_check_args {
    const char *model;
    int tokens, sample;
    uint64_t seed;
    bool backward;
} cli_check_args;

/* The expert-parallel layer over MPI_COMM_WORLD against the single-rank layer on the same
 * generated weights and inputs, per rank. Returns the exit code (all ranks agree). */
int cli_check_ep(const cli_check_args *c, const cli_layer_args *la);

#endif
