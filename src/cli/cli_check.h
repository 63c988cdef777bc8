/* cli_check.h — `moe-ep check`'s arguments, shared by the single-rank check (cli_check.c) and
 * the expert-parallel one (cli_check_ep.c). */
#ifndef MOE_CLI_CHECK_H
#define MOE_CLI_CHECK_H

#include <stdbool.h>
#include <stdint.h>

#include "cli_layer.h"
#include "config.h"

typedef struct cli_check_args {
    const char *model;
    int tokens, sample;
    uint64_t seed;
    bool backward;
} cli_check_args;

/* An estimate from above of the host bytes a check of T tokens holds besides the weights and
 * their gradients: the inputs, the layer's outputs and intermediates, its scratch and the
 * reference's double-precision twins. */
double cli_check_token_bytes(const moe_config *cfg, moe_dtype dt, int64_t T, bool backward);

/* The expert-parallel layer over MPI_COMM_WORLD against the single-rank layer on the same
 * generated weights and inputs, per rank. Returns the exit code (all ranks agree). */
int cli_check_ep(const cli_check_args *c, const cli_layer_args *la);

#endif
