/* cli_layer.c — the layer and EP options of the layer-running subcommands (cli_layer.h). */
#include "cli_layer.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dtype.h"
#include "ep/ep.h"

void cli_layer_args_init(cli_layer_args *a)
{
    memset(a, 0, sizeof *a);
    a->backend_s = "auto";
    a->virtual_ranks = 1;
    a->chunks = 1;
}

static int launcher_size(void)
{
    const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", NULL};
    for (int i = 0; vars[i]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return atoi(v);
    }
    return 1;
}

bool cli_ep_wanted(const cli_layer_args *a)
{
    return launcher_size() > 1 || a->virtual_ranks > 1 || a->chunks > 1 || a->transport ||
           a->route || a->max_tokens_per_rank > 0 || a->stats || a->expert_map;
}

static bool we_initialised;

void cli_mpi_begin(int *rank, int *size)
{
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        MPI_Init(NULL, NULL);
        we_initialised = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, rank);
    MPI_Comm_size(MPI_COMM_WORLD, size);
    if (*size > 1) moe_log_set_rank(*rank);
}

int cli_mpi_end(int rc)
{
    int fin = 0;
    MPI_Finalized(&fin);
    if (we_initialised && !fin) MPI_Finalize();
    we_initialised = false;
    return rc;
}

int cli_agree(int rc)
{
    int inited = 0, fin = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&fin);
    if (!inited || fin) return rc;
    int all = rc;
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return all;
}

int cli_layer_options(const char *cmd, const cli_layer_args *a, const moe_config *cfg,
                      moe_layer_options *lo, moe_dtype *dt)
{
    moe_layer_options def = MOE_LAYER_OPTIONS_INIT;
    *lo = def;
    *dt = cfg->dtype;
    if (a->dtype_s && (!moe_dtype_parse(a->dtype_s, dt) ||
                       (*dt != MOE_DTYPE_BF16 && *dt != MOE_DTYPE_F16 && *dt != MOE_DTYPE_F32))) {
        fprintf(stderr, "moe-ep %s: --dtype expects bf16, fp16 or fp32, got '%s'\n", cmd, a->dtype_s);
        return 2;
    }
    const char *b = a->backend_s ? a->backend_s : "auto";
    if (strcmp(b, "auto") == 0) lo->backend = MOE_BACKEND_AUTO;
    else if (strcmp(b, "cpu") == 0) lo->backend = MOE_BACKEND_CPU;
    else if (strcmp(b, "cuda") == 0 || strcmp(b, "gpu") == 0) {
        lo->backend = MOE_BACKEND_CUDA;
#ifndef MOE_HAVE_CUDA
        fprintf(stderr, "moe-ep %s: --backend cuda: this build has no CUDA backend (use --backend cpu)\n", cmd);
        return 2;
#else
        if (!cli_gpu_available()) {
            fprintf(stderr, "moe-ep %s: --backend cuda: no usable GPU on this node (use --backend cpu)\n", cmd);
            return 2;
        }
#endif
    } else {
        fprintf(stderr, "moe-ep %s: --backend expects cpu, cuda or auto, got '%s'\n", cmd, b);
        return 2;
    }
    lo->dtype = *dt;
    lo->threads = a->threads;
    lo->kernel_config = a->kernel_config;
    lo->autotune = a->autotune;
    lo->autotune_cache = a->autotune_cache;
    lo->exact_hf_rounding = a->exact_hf;
    return 0;
}

int cli_ep_open(const char *cmd, const cli_layer_args *a, int E, moe_ep_comm **comm,
                int32_t **owner)
{
    *comm = NULL;
    *owner = NULL;
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    moe_ep_options eo = MOE_EP_OPTIONS_INIT;
    int rc = 0;
    moe_error ae; /* this rank's reason, shared with the others by the agreement below */
    moe_error_clear(&ae);
    if (!moe_ep_transport_parse(a->transport ? a->transport : "auto", &eo.transport)) {
        moe_fail(&ae, MOE_ERR_INVALID_ARG, "--transport expects mpi, nccl or auto, got '%s'",
                 a->transport);
        if (rank == 0) fprintf(stderr, "moe-ep %s: %s\n", cmd, ae.msg);
        rc = 2;
    }
    eo.virtual_ranks = a->virtual_ranks;
    eo.chunks = a->chunks;
    eo.max_tokens_per_rank = a->max_tokens_per_rank;
    eo.route = a->route;
    if (!rc && a->expert_map) {
        if (moe_expert_map_load_file(a->expert_map, E, size, owner, &ae) != MOE_OK) {
            fprintf(stderr, "moe-ep %s: %s\n", cmd, ae.msg);
            rc = 2;
        }
    }
    /* what decides the collective calls that follow must be the same on every rank (an MPMD
     * launch may mix them): the command and --stats (its per-rank report is collective) */
    static const char *const cmds[] = {"forward", "backward", "check", "bench", NULL};
    int64_t f[2] = {0, a->stats};
    for (int i = 0; cmds[i]; i++)
        if (strcmp(cmd, cmds[i]) == 0) f[0] = i + 1;
    static const char *const names[2] = {"the command (1 forward, 2 backward, 3 check, 4 bench)",
                                         "--stats"};
    if (ep_agree_fields(MPI_COMM_WORLD, rc ? MOE_ERR_INVALID_ARG : MOE_OK, f, names, 2, &ae) !=
        MOE_OK) {
        if (!rc) fprintf(stderr, "moe-ep %s: %s\n", cmd, ae.msg);
        free(*owner);
        *owner = NULL;
        return 2;
    }
    moe_status st = moe_ep_comm_create((int32_t)MPI_Comm_c2f(MPI_COMM_WORLD), &eo, comm);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-ep %s: %s\n", cmd, moe_last_error());
        free(*owner);
        *owner = NULL;
        return st == MOE_ERR_INVALID_ARG ? 2 : 1; /* every rank got the same status */
    }
    return 0;
}

double cli_host_free_bytes(void)
{
    long pages = sysconf(_SC_AVPHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    return pages > 0 && psz > 0 ? (double)pages * (double)psz : 0;
}

int cli_host_memory_check(const char *cmd, const char *opt, long long value, const char *what,
                          double need)
{
    double avail = cli_host_free_bytes();
    if (avail <= 0 || need <= avail) return 0;
    fprintf(stderr, "moe-ep %s: %s %lld: %s need about %.1f GiB but %.1f GiB is free on the "
            "host; lower %s\n", cmd, opt, value, what, need / (1 << 30), avail / (1 << 30), opt);
    return 2;
}

void cli_split(int T, int N, int r, int *Tr, int *off)
{
    int base = T / N, extra = T % N;
    *Tr = base + (r < extra);
    *off = r * base + (r < extra ? r : extra);
}

void cli_kernel_summary(const moe_layer *L, char *buf, size_t len)
{
    static const char *const names[MOE_STATS_NUM_GEMMS] = {"gemm1", "gemm2", "dA0", "dX",
                                                            "dW2", "dW13"};
    moe_layer_stats s = MOE_LAYER_STATS_INIT;
    buf[0] = '\0';
    if (moe_layer_stats_get(L, &s) != MOE_OK) return;
    size_t at = 0;
    for (int g = 0; g < MOE_STATS_NUM_GEMMS && at < len; g++) {
        if (!s.gemm_kernel[g][0]) continue;
        int n = snprintf(buf + at, len - at, "%s%s %s %s", at ? "; " : "", names[g],
                         s.gemm_kernel[g], s.gemm_config[g]);
        if (n < 0) break;
        at += (size_t)n;
    }
}

void cli_print_ep_stats(const moe_layer *L, int rank, int size)
{
    for (int r = 0; r < size; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        if (r != rank) continue;
        moe_layer_stats s = MOE_LAYER_STATS_INIT;
        uint64_t *arr = calloc(4 * (size_t)size, sizeof(uint64_t));
        if (arr) {
            s.peers = size;
            s.peer_rows_sent = arr;
            s.peer_rows_recv = arr + size;
            s.peer_bytes_sent = arr + 2 * size;
            s.peer_bytes_recv = arr + 3 * size;
        }
        moe_layer_info in = MOE_LAYER_INFO_INIT;
        if (moe_layer_stats_get(L, &s) == MOE_OK && moe_layer_info_get(L, &in) == MOE_OK) {
            printf("rank %d of %d (x%d virtual, transport %s): %d local experts, calls %llu "
                   "forward / %llu backward, %llu local tokens, %llu token rows computed, "
                   "%.3f s\n", rank, size, in.virtual_ranks, in.transport, in.num_local_experts,
                   (unsigned long long)s.calls_forward, (unsigned long long)s.calls_backward,
                   (unsigned long long)s.tokens_local, (unsigned long long)s.tokens_computed,
                   s.seconds);
            printf("  %-6s %14s %14s %16s %16s\n", "peer", "rows sent", "rows recv",
                   "bytes sent", "bytes recv");
            for (int q = 0; arr && q < size; q++)
                printf("  %-6d %14llu %14llu %16llu %16llu\n", q,
                       (unsigned long long)s.peer_rows_sent[q], (unsigned long long)s.peer_rows_recv[q],
                       (unsigned long long)s.peer_bytes_sent[q], (unsigned long long)s.peer_bytes_recv[q]);
            printf("  weight bytes read %llu, resident on the backend %llu\n",
                   (unsigned long long)s.weight_bytes_read, (unsigned long long)in.bytes_resident);
            if (s.nchunks > 0) {
                printf("  last call: %d chunk(s)\n", s.nchunks);
                printf("  %-5s %8s %10s %10s %12s %12s %12s %12s %12s %12s\n", "chunk", "tokens",
                       "rows sent", "rows recv", "disp post", "disp done", "comp begin",
                       "comp end", "comb post", "comb done");
                for (int c = 0; c < s.nchunks; c++) {
                    const moe_chunk_timeline *t = &s.timeline[c];
                    printf("  %-5d %8lld %10lld %10lld %10.3fms %10.3fms %10.3fms %10.3fms "
                           "%10.3fms %10.3fms\n", c, (long long)t->tokens, (long long)t->rows_sent,
                           (long long)t->rows_recv, t->dispatch_post * 1e3, t->dispatch_done * 1e3,
                           t->compute_begin * 1e3, t->compute_end * 1e3, t->combine_post * 1e3,
                           t->combine_done * 1e3);
                }
            }
            fflush(stdout);
        }
        free(arr);
    }
    MPI_Barrier(MPI_COMM_WORLD);
}

int cli_api_fail(const char *cmd, moe_status st)
{
    fprintf(stderr, "moe-ep %s: %s (%s)\n", cmd, moe_last_error(), moe_strerror(st));
    return st == MOE_ERR_INVALID_ARG ? 2 : 1;
}
