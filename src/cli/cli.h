/* cli.h — subcommands of the moe-ep program. Each takes argv starting at its own name and
 * returns the process exit code (0 ok, 1 failure, 2 bad usage). */
#ifndef MOE_CLI_H
#define MOE_CLI_H

#include "moe_ep_version.h"

/* The project version (CMakeLists.txt), as the library's headers say it. */
#define MOE_EP_VERSION MOE_EP_VERSION_STRING

int cli_check(int argc, char **argv);
int cli_forward(int argc, char **argv);
int cli_backward(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_serve(int argc, char **argv);       /* cli_serve.c */
int cli_client(int argc, char **argv);      /* cli_client.c */
int cli_bench_serve(int argc, char **argv); /* cli_client.c */
int cli_gen_input(int argc, char **argv);   /* cli_client.c */
int cli_compare(int argc, char **argv);
int cli_info(int argc, char **argv);

#include "tensor.h"
/* Read a [T,H] or [B,S,H] tensor `name` of a safetensors file, converted to dt: *out (malloc'ed),
 * *T rows, and shape_of carrying the original shape (data NULL). */
moe_status cli_read_rows(const char *path, const char *name, int H, moe_dtype dt, void **out,
                         int *T, moe_tensor *shape_of, moe_error *err);

#endif
