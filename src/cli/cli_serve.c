/* cli_serve.c — `moe-ep serve`: keep MoE layers resident across the ranks of an MPI job and
 * answer FORWARD requests on a socket (src/service/svc.h; protocol in docs/protocol.md). */
#include <errno.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


#include "cli.h"
#include "cli_opts.h"
#include "dtype.h"
#include "service/svc.h"

/* Before MPI_Init the rank is only known from the launcher's environment; used so that a
 * usage error is printed once, not once per rank. */
static bool launcher_rank0(void)
{
    const char *v = getenv("OMPI_COMM_WORLD_RANK");
    if (!v) v = getenv("PMI_RANK");
    if (!v) v = getenv("PMIX_RANK");
    return !v || strcmp(v, "0") == 0;
}

static bool opts_seen(const cli_opt *opts, const char *name)
{
    for (const cli_opt *o = opts; o->name; o++)
        if (strcmp(o->name, name) == 0) return o->seen;
    return false;
}

/* "3,5,7" -> layers. */
static bool parse_layers(const char *s, int **out, int *n)
{
    *out = NULL;
    *n = 0;
    int cap = 1;
    for (const char *p = s; *p; p++) cap += *p == ',';
    int *v = malloc((size_t)cap * sizeof *v);
    if (!v) return false;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (errno || end == p || x < 0 || x > INT_MAX || (*end && *end != ',')) {
            free(v);
            return false;
        }
        v[(*n)++] = (int)x;
        p = *end ? end + 1 : end;
        if (*end == ',' && !*p) { free(v); return false; }
    }
    if (*n == 0) { free(v); return false; }
    *out = v;
    return true;
}

static void on_ready(void *user, const char *bound, const char *placement)
{
    const moe_serve_options *o = user;
    int n = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    printf("moe-ep serve: serving %d layer(s) of %s on %s with %d rank(s), %s%s%s (pid %ld)\n",
           o->layers ? o->nlayers : 1, o->config, bound, n, placement,
           o->ready_file ? "; ready file " : "", o->ready_file ? o->ready_file : "", (long)getpid());
    fflush(stdout);
}

int cli_serve(int argc, char **argv)
{
    const char *cmd = "serve";
    moe_serve_options o;
    moe_serve_options_default(&o);
    const char *layers_s = NULL, *backend_s = "cpu", *dtype_s = NULL, *ep_s = "auto";
    int threads = 0;
    bool remote_shutdown = false;
    uint64_t inflight = o.max_inflight_bytes;
    cli_opt opts[] = {
        {"listen", OPT_STRING, "unix:PATH|tcp:HOST:PORT", "where to accept connections (required; PORT 0 picks a free port, see --ready-file)", .str = &o.listen},
        {"config", OPT_STRING, "PRESET|config.json", "model preset or HF config.json (required)", .str = &o.config},
        {"weights", OPT_STRING, "W", "a .safetensors file or model.safetensors.index.json (required)", .str = &o.weights},
        {"layers", OPT_STRING, "L1,L2,..", "serve decoder layers model.layers.N of a full checkpoint (default: the file holds one block under its own names, served as layer 0)", .str = &layers_s},
        {"backend", OPT_STRING, "cpu|cuda|auto", "where every rank runs its share (default cpu)", .str = &backend_s},
        {"ep", OPT_STRING, "auto|on|off", "shard each layer's experts over the ranks (expert parallelism; auto: when the backend is cpu and there are at least as many experts as ranks; uneven slices are fine) or replicate them on every rank (default auto)", .str = &ep_s},
        {"dtype", OPT_STRING, "bf16|fp16|fp32", "activation dtype requests must use (default: the config's)", .str = &dtype_s},
        {"ready-file", OPT_STRING, "F", "written by rank 0 once serving: its pid, then the bound address; removed at exit", .str = &o.ready_file},
        {"max-batch-tokens", OPT_INT, "N", "rows per batch and per request (default 4096)", .i = &o.max_batch_tokens, .min = 1},
        {"max-wait-us", OPT_INT, "US", "how long the oldest queued request may wait for a batch to fill (default 500)", .i = &o.max_wait_us, .min = 0},
        {"max-connections", OPT_INT, "N", "open connections; more are refused with an error (default 64)", .i = &o.max_connections, .min = 1},
        {"max-inflight-bytes", OPT_U64, "B", "request + reply bytes admitted at once; more get a 'busy' error (default 268435456)", .u64 = &inflight},
        {"max-pending", OPT_INT, "N", "requests one connection may have waiting (default 64)", .i = &o.max_pending_per_conn, .min = 1},
        {"io-timeout-ms", OPT_INT, "MS", "a partial frame or an unread reply may stall this long before the connection is closed (default 10000)", .i = &o.io_timeout_ms, .min = 1},
        {"idle-poll-us", OPT_INT, "US", "ranks > 0 sleep up to this long between polls for work when idle (default 1000)", .i = &o.idle_poll_us, .min = 1},
        {"allow-remote-shutdown", OPT_FLAG, NULL, "honour SHUTDOWN requests (default: refused)", .flag = &remote_shutdown},
        {"threads", OPT_INT, "N", "CPU threads per rank (default: OMP_NUM_THREADS if set, else the cores this process is bound to divided by the ranks bound to the same cores)", .i = &threads, .min = 0},
        {0},
    };
    const char *syn = "--listen unix:PATH|tcp:HOST:PORT --config C --weights W [--layers L1,L2,..] "
                      "[--backend cpu|cuda] [--ready-file F] [options]";
    const char *desc =
        "Serves MoE layers from an MPI job (run it under mpirun): rank 0 accepts connections,\n"
        "batches FORWARD requests of one layer, spreads their rows over the ranks, runs the layer\n"
        "expert-parallel (--ep), gathers the outputs and replies (docs/protocol.md,\n"
        "docs/SERVICE.md). SIGTERM or SIGINT to rank 0's\n"
        "pid (the ready file's first line), or a SHUTDOWN request with --allow-remote-shutdown,\n"
        "finishes the requests in flight and exits 0 on every rank.";
    int prc = cli_parse(cmd, syn, desc, opts, argc, argv);
    if (prc) return prc == 1 ? 0 : 2;
    const char *req[] = {"listen", "config", "weights"};
    bool quiet = !launcher_rank0();
    for (size_t i = 0; i < sizeof req / sizeof req[0]; i++) {
        int rc = quiet ? (opts_seen(opts, req[i]) ? 0 : 2) : cli_require(cmd, opts, req[i]);
        if (rc) return rc;
    }
    int *layers = NULL;
    if (layers_s && !parse_layers(layers_s, &layers, &o.nlayers)) {
        if (!quiet) fprintf(stderr, "moe-ep serve: --layers expects non-negative integers separated by commas, got '%s'\n", layers_s);
        return 2;
    }
    o.layers = layers;
    if (!cli_parse_backend(backend_s, &o.backend)) {
        if (!quiet) fprintf(stderr, "moe-ep serve: --backend expects cpu, cuda or auto, got '%s'\n", backend_s);
        free(layers);
        return 2;
    }
    if (strcmp(ep_s, "auto") == 0) o.ep = MOE_SERVE_EP_AUTO;
    else if (strcmp(ep_s, "on") == 0) o.ep = MOE_SERVE_EP_ON;
    else if (strcmp(ep_s, "off") == 0) o.ep = MOE_SERVE_EP_OFF;
    else {
        if (!quiet) fprintf(stderr, "moe-ep serve: --ep expects auto, on or off, got '%s'\n", ep_s);
        free(layers);
        return 2;
    }
    if (dtype_s && (!moe_dtype_parse(dtype_s, &o.dtype) || o.dtype == MOE_DTYPE_F64)) {
        if (!quiet) fprintf(stderr, "moe-ep serve: --dtype expects bf16, fp16 or fp32, got '%s'\n", dtype_s);
        free(layers);
        return 2;
    }
    if (inflight == 0) {
        if (!quiet) fprintf(stderr, "moe-ep serve: --max-inflight-bytes must be positive\n");
        free(layers);
        return 2;
    }
    o.max_inflight_bytes = inflight;
    o.allow_remote_shutdown = remote_shutdown;
    o.on_ready = on_ready;
    o.user = &o;
    o.threads = threads; /* each layer runs with it (0: the library's default) */

    /* Only the main thread calls MPI; the I/O thread never does. */
    int provided = 0;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "moe-ep serve: MPI_Init_thread failed\n");
        free(layers);
        return 1;
    }
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    moe_log_set_rank(rank);
    if (provided < MPI_THREAD_FUNNELED)
        moe_warn("serve: the MPI library provides thread level %d < MPI_THREAD_FUNNELED; the "
                 "I/O thread makes no MPI calls, so serving goes on", provided);
    moe_error err = {0};
    moe_status st = moe_serve_run(MPI_COMM_WORLD, &o, &err);
    if (st != MOE_OK && rank == 0) fprintf(stderr, "moe-ep serve: %s\n", err.msg);
    if (st == MOE_OK && rank == 0) printf("moe-ep serve: drained; exiting\n");
    MPI_Finalize();
    free(layers);
    return st == MOE_OK ? 0 : 1;
}
