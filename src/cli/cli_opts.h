/*
 * cli_opts.h — declarative option parsing for the moe-ep subcommands: each subcommand lists its
 * options once (name, argument, help, default), and that one table drives parsing, --help and
 * the error messages ("moe-ep check: --tokens expects a positive integer, got 'x'").
 */
#ifndef MOE_CLI_OPTS_H
#define MOE_CLI_OPTS_H

#include <stdbool.h>
#include <stdint.h>

#include "moe_ep.h"

typedef enum { OPT_FLAG, OPT_STRING, OPT_INT, OPT_U64 } cli_opt_kind;

typedef struct cli_opt {
    const char *name;   /* without the leading "--" */
    cli_opt_kind kind;
    const char *metavar;/* "T", "PATH" */
    const char *help;   /* one line; say the default */
    char alias;         /* optional one-letter form "-x" (nccl-tests style), 0 = none */
    /* where the value goes */
    bool *flag;
    const char **str;
    int *i;
    uint64_t *u64;
    int min;            /* OPT_INT: smallest accepted value */
    bool seen;          /* set by the parser */
} cli_opt;

/* Parse argv (argv[0] = the subcommand's name). Returns 0 when parsed, 1 when --help was
 * printed (caller exits 0), 2 on a usage error (message already printed). */
int cli_parse(const char *cmd, const char *synopsis, const char *description, cli_opt *opts,
              int argc, char **argv);
/* Print "moe-ep CMD: missing required option --NAME" and return 2, if the option wasn't seen. */
int cli_require(const char *cmd, const cli_opt *opts, const char *name);
void cli_print_help(const char *cmd, const char *synopsis, const char *description,
                    const cli_opt *opts);

/* "cpu" | "cuda" | "auto" (auto = cuda when a GPU is usable in this build, else cpu). */
bool cli_parse_backend(const char *s, moe_backend *out);
/* Is a CUDA device usable by this build (false on a build without CUDA). */
bool cli_gpu_available(void);

#endif
