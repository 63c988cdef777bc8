/* main.c — the moe-ep program: dispatches to one subcommand per file (cli_*.c). */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *summary;
} commands[] = {
    {"check", cli_check, "run the fused path and the reference on generated inputs, compare every stage"},
    {"forward", cli_forward, "run one MoE block forward on a safetensors input"},
    {"backward", cli_backward, "run one MoE block backward (input and weight gradients)"},
    {"info", cli_info, "print the build's backends, GPUs, topology and each rank's placement"},
    {"compare", cli_compare, "compare one tensor of two safetensors files (e.g. against HuggingFace's)"},
    {"bench", cli_bench, "time the fused block over a sweep of token counts (nccl-tests style)"},
    {"serve", cli_serve, "serve MoE layers over a socket from an MPI job (run under mpirun)"},
    {"client", cli_client, "talk to a server: forward a file, --info, --stats, --shutdown, --load"},
    {"bench-serve", cli_bench_serve, "measure a server: req/s, p50/p99 latency vs load, overhead"},
    {"gen-input", cli_gen_input, "write random hidden_states [T,H] (tests, benchmarks)"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: moe-ep <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\n'moe-ep <command> --help' describes each command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("moe-ep %s\n", MOE_EP_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "moe-ep: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
