/* TEMPORARY during bring-up: replaced by cli_check.c / cli_forward.c. */
#include <stdio.h>
#include "cli.h"
int cli_check(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "not built yet\n"); return 1; }
int cli_forward(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "not built yet\n"); return 1; }
int cli_backward(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "not built yet\n"); return 1; }
