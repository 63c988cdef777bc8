/* cli_ep.c — `moe-ep forward` and `moe-ep check` expert-parallel (see cli_ep.h).
 *
 * Tokens are spread in contiguous slices: rank r holds global tokens [off_r, off_r + T_r) with
 * T_r = T/N (+1 for the first T%N ranks), as if they arrived data-parallel after attention.
 * Every rank calls every collective in the same order; a failure on one rank is agreed on
 * (agree()) before the next collective so no rank is left waiting. */
#include "cli_ep.h"

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block_state.h"
#include "check.h"
#include "cli.h"
#include "config.h"
#include "cpu/cpu_fused.h"
#include "dtype.h"
#include "ep/ep.h"
#include "rng.h"
#include "safetensors.h"
#include "weights.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "ep/ep_cuda.h"
#endif

void cli_ep_args_init(cli_ep_args *a)
{
    memset(a, 0, sizeof *a);
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

bool cli_ep_wanted(const cli_ep_args *a)
{
    return launcher_size() > 1 || a->virtual_ranks > 1 || a->chunks > 1 || a->transport ||
           a->route || a->max_tokens_per_rank > 0 || a->stats;
}

int cli_ep_reject_plain_only(const char *cmd, int sample, const char *kernel_config,
                             bool autotune, const char *autotune_cache, bool exact_hf_rounding)
{
    const char *opt = sample > 0 ? "--sample" : kernel_config ? "--kernel-config"
                    : autotune ? "--autotune" : autotune_cache ? "--autotune-cache"
                    : exact_hf_rounding ? "--exact-hf-rounding" : NULL;
    if (!opt) return 0;
    fprintf(stderr, "moe-ep %s: %s applies to single-rank runs only; the expert-parallel %s "
                    "(mpirun with several ranks, or an EP option) does not take it\n", cmd, opt, cmd);
    return 2;
}

/* Every rank's worst exit code. */
static int agree(int rc)
{
    int all = rc;
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return all;
}

static void ep_init(int *rank, int *size)
{
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) MPI_Init(NULL, NULL);
    MPI_Comm_rank(MPI_COMM_WORLD, rank);
    MPI_Comm_size(MPI_COMM_WORLD, size);
    if (*size > 1) moe_log_set_rank(*rank);
}

static int ep_finish(int rc)
{
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Finalize();
    return rc;
}

static void split(int T, int N, int r, int *Tr, int *off)
{
    int base = T / N, extra = T % N;
    *Tr = base + (r < extra);
    *off = r * base + (r < extra ? r : extra);
}

/* Options from the command line. The backend: --backend cuda (or gpu) needs a CUDA build and
 * a usable GPU (a clear error naming the option otherwise); auto picks cuda when a GPU is
 * usable, as the plain path does. */
static int ep_options(const cli_ep_args *a, const moe_config *cfg, const char *backend_s,
                      bool *use_cuda, moe_ep_options *o, const char *cmd)
{
    memset(o, 0, sizeof *o);
    o->virtual_ranks = a->virtual_ranks;
    o->chunks = a->chunks;
    o->max_tokens_per_rank = a->max_tokens_per_rank;
    o->abort_on_fatal = true;
    o->device = -1;
    bool want_cuda = backend_s && (strcmp(backend_s, "cuda") == 0 || strcmp(backend_s, "gpu") == 0);
    bool auto_be = !backend_s || strcmp(backend_s, "auto") == 0;
    if (!want_cuda && !auto_be && strcmp(backend_s, "cpu") != 0) {
        fprintf(stderr, "moe-ep %s: --backend expects cpu, cuda or auto, got '%s'\n", cmd, backend_s);
        return 2;
    }
#ifndef MOE_HAVE_CUDA
    if (want_cuda) {
        fprintf(stderr, "moe-ep %s: --backend cuda: this build has no CUDA backend\n", cmd);
        return 2;
    }
#endif
    /* Every rank must take the same backend (the CPU and CUDA EP paths run different
     * collectives): a GPU is used only if every rank has one. */
    int gpu = (want_cuda || auto_be) && cli_gpu_available(), all_gpu = gpu;
    MPI_Allreduce(&gpu, &all_gpu, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (want_cuda && !all_gpu) {
        int rank = 0;
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        fprintf(stderr, "moe-ep %s: --backend cuda: no usable GPU %s (rank %d; use --backend cpu)\n",
                cmd, gpu ? "on another rank" : "on this node", rank);
        return 2;
    }
    *use_cuda = all_gpu != 0;
    if (!moe_ep_transport_parse(a->transport ? a->transport : "auto", &o->transport)) {
        fprintf(stderr, "moe-ep %s: --transport expects mpi, nccl or auto, got '%s'\n", cmd, a->transport);
        return 2;
    }
    moe_error err = {0};
    if (a->route && moe_ep_route_parse(a->route, cfg->num_experts, cfg->top_k, &o->route, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep %s: --route: %s\n", cmd, err.msg);
        return 2;
    }
    return 0;
}

static void print_stats_in_order(moe_ep_ctx *ctx, int rank, int size)
{
    for (int r = 0; r < size; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        if (r == rank) {
            moe_ep_stats_print(stdout, moe_ep_ctx_stats(ctx));
            fflush(stdout);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
}

#ifdef MOE_HAVE_CUDA
/* The EP forward on the CUDA backend: this rank's rows to the device, moe_ep_cuda_forward, the
 * overflow check, results back to the host. */
static int ep_forward_cuda(const moe_weights *w, const moe_ep_options *o, int Tr, const void *x,
                           void *out, void *logits, bool stats, int rank, int size, moe_error *err)
{
    moe_ep_cuda_ctx *c = NULL;
    void *dx = NULL, *dout = NULL, *dl = NULL;
    const size_t esz = moe_dtype_size(w->dtype), H = (size_t)w->cfg.hidden, E = (size_t)w->cfg.num_experts;
    int rc = 0;
    if (moe_ep_cuda_ctx_create(MPI_COMM_WORLD, w, o, &c, err) != MOE_OK) return 1;
    cudaError_t ce = cudaMalloc(&dx, (size_t)Tr * H * esz + 16);
    if (ce == cudaSuccess) ce = cudaMalloc(&dout, (size_t)Tr * H * esz + 16);
    if (ce == cudaSuccess) ce = cudaMalloc(&dl, (size_t)Tr * E * esz + 16);
    if (ce == cudaSuccess) ce = cudaMemcpy(dx, x, (size_t)Tr * H * esz, cudaMemcpyHostToDevice);
    if (ce != cudaSuccess) {
        moe_fail(err, MOE_ERR_CUDA, "EP forward buffers: %s", cudaGetErrorString(ce));
        rc = 1;
    }
    /* the forward is collective: nobody enters it unless every rank is ready */
    if (agree(rc) && !rc) {
        moe_fail(err, MOE_ERR_CUDA, "EP forward buffers failed on another rank");
        rc = 1;
    }
    if (!rc && (moe_ep_cuda_forward(c, Tr, dx, dout, dl, NULL, NULL, err) != MOE_OK ||
                moe_ep_cuda_check(c, err) != MOE_OK))
        rc = 1;
    if (!rc) {
        ce = cudaStreamSynchronize(moe_ep_cuda_stream(c));
        if (ce == cudaSuccess) ce = cudaMemcpy(out, dout, (size_t)Tr * H * esz, cudaMemcpyDeviceToHost);
        if (ce == cudaSuccess) ce = cudaMemcpy(logits, dl, (size_t)Tr * E * esz, cudaMemcpyDeviceToHost);
        if (ce != cudaSuccess) {
            moe_fail(err, MOE_ERR_CUDA, "EP forward results: %s", cudaGetErrorString(ce));
            rc = 1;
        }
    }
    if (stats && !agree(rc))
        for (int r = 0; r < size; r++) {
            MPI_Barrier(MPI_COMM_WORLD);
            if (r == rank) {
                moe_ep_stats_print(stdout, moe_ep_cuda_stats(c));
                fflush(stdout);
            }
        }
    cudaFree(dx);
    cudaFree(dout);
    cudaFree(dl);
    moe_ep_cuda_ctx_destroy(c);
    return rc;
}
#endif

int cli_ep_forward(const char *config, const char *weights, int layer, const char *input,
                   const char *output, const char *dtype_s, const char *backend_s,
                   const cli_ep_args *ep)
{
    int rank, size;
    ep_init(&rank, &size);
    moe_error err = {0};
    moe_config cfg;
    int rc = 0;
    if (moe_config_resolve(config, &cfg, &err) != MOE_OK) {
        if (rank == 0) fprintf(stderr, "moe-ep forward: --config: %s\n", err.msg);
        return ep_finish(2);
    }
    moe_dtype dt = cfg.dtype;
    if (dtype_s && (!moe_dtype_parse(dtype_s, &dt) || dt == MOE_DTYPE_F64)) {
        if (rank == 0) fprintf(stderr, "moe-ep forward: --dtype expects bf16, fp16 or fp32, got '%s'\n", dtype_s);
        return ep_finish(2);
    }
    moe_ep_options o;
    bool use_cuda = false;
    if ((rc = agree(ep_options(ep, &cfg, backend_s, &use_cuda, &o, "forward"))))
        return ep_finish(rc);
    const int H = cfg.hidden, E = cfg.num_experts;
    const size_t esz = moe_dtype_size(dt);
    void *x_all = NULL, *x = NULL, *out = NULL, *logits = NULL, *out_all = NULL, *logits_all = NULL;
    moe_tensor xshape;
    memset(&xshape, 0, sizeof xshape);
    moe_weights w = {0};
    moe_ep_ctx *ctx = NULL;
    int T = 0;
    /* rank 0 reads the input; everyone learns T and the input's shape */
    if (rank == 0 && cli_read_rows(input, "hidden_states", H, dt, &x_all, &T, &xshape, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep forward: %s\n", err.msg);
        rc = 1;
    }
    if ((rc = agree(rc))) goto out;
    int64_t meta[1 + MOE_MAX_DIMS + 1] = {T, xshape.ndim};
    for (int i = 0; i < MOE_MAX_DIMS; i++) meta[2 + i - 0] = xshape.shape[i];
    MPI_Bcast(meta, 2 + MOE_MAX_DIMS, MPI_INT64_T, 0, MPI_COMM_WORLD);
    T = (int)meta[0];
    xshape.ndim = (int)meta[1];
    for (int i = 0; i < MOE_MAX_DIMS; i++) xshape.shape[i] = meta[2 + i];

    int Tr, off;
    split(T, size, rank, &Tr, &off);
    int *cnt = calloc((size_t)size, sizeof(int)), *dis = calloc((size_t)size, sizeof(int));
    int *lcnt = calloc((size_t)size, sizeof(int)), *ldis = calloc((size_t)size, sizeof(int));
    x = malloc((size_t)Tr * H * esz + 1);
    out = malloc((size_t)Tr * H * esz + 1);
    logits = malloc((size_t)Tr * E * esz + 1);
    if (!cnt || !dis || !lcnt || !ldis || !x || !out || !logits) {
        fprintf(stderr, "moe-ep forward: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (int r = 0; r < size; r++) {
        int tr, o2;
        split(T, size, r, &tr, &o2);
        cnt[r] = tr * H * (int)esz;
        dis[r] = o2 * H * (int)esz;
        lcnt[r] = tr * E * (int)esz;
        ldis[r] = o2 * E * (int)esz;
    }
    MPI_Scatterv(x_all, cnt, dis, MPI_BYTE, x, cnt[rank], MPI_BYTE, 0, MPI_COMM_WORLD);

    if (moe_ep_weights_load(MPI_COMM_WORLD, &cfg, weights, layer, o.virtual_ranks, dt, &w, &err) != MOE_OK) {
        rc = 1;
    } else if (use_cuda) {
#ifdef MOE_HAVE_CUDA
        rc = ep_forward_cuda(&w, &o, Tr, x, out, logits, ep->stats, rank, size, &err);
#endif
    } else if (moe_ep_ctx_create(MPI_COMM_WORLD, &w, &o, &ctx, &err) != MOE_OK ||
               moe_ep_forward(ctx, Tr, x, out, logits, NULL, NULL, &err) != MOE_OK) {
        rc = 1;
    }
    if (rc) fprintf(stderr, "moe-ep forward: %s\n", err.msg);
    if ((rc = agree(rc))) goto out_free;
    if (rank == 0) {
        out_all = malloc((size_t)T * H * esz + 1);
        logits_all = malloc((size_t)T * E * esz + 1);
    }
    MPI_Gatherv(out, cnt[rank], MPI_BYTE, out_all, cnt, dis, MPI_BYTE, 0, MPI_COMM_WORLD);
    MPI_Gatherv(logits, lcnt[rank], MPI_BYTE, logits_all, lcnt, ldis, MPI_BYTE, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        moe_st_writer wr;
        moe_st_writer_init(&wr);
        moe_tensor ot = moe_tensor_view_of(dt, xshape.ndim, xshape.shape, out_all);
        int64_t ls[2] = {T, E};
        moe_tensor lt = moe_tensor_view_of(dt, 2, ls, logits_all);
        if (moe_st_writer_add(&wr, "output", &ot, &err) != MOE_OK ||
            moe_st_writer_add(&wr, "router_logits", &lt, &err) != MOE_OK ||
            moe_st_write(&wr, output, &err) != MOE_OK) {
            fprintf(stderr, "moe-ep forward: %s\n", err.msg);
            rc = 1;
        } else {
            printf("moe-ep forward: %d tokens over %d ranks (x%d virtual, %s backend, %s transport) -> %s\n", T,
                   size, o.virtual_ranks, use_cuda ? "cuda" : "cpu", moe_ep_transport_name(o.transport), output);
        }
        moe_st_writer_free(&wr);
    }
    if (ep->stats && ctx) print_stats_in_order(ctx, rank, size);
    rc = agree(rc);
out_free:
    free(cnt); free(dis); free(lcnt); free(ldis);
out:
    moe_ep_ctx_destroy(ctx);
    moe_weights_free(&w);
    free(x_all); free(x); free(out); free(logits); free(out_all); free(logits_all);
    if (o.route.ids) free((void *)o.route.ids);
    return ep_finish(rc);
}

/* The stage rule of check.h (global relative error <= tol, worst row <= 10*tol, a zero
 * reference row exactly zero, no NaN/Inf) on local rows [0, n) of `got` against rows
 * [off, off+n) of a global [*, cols] reference, both in dt and read in place (one
 * Llama-4-Scout expert-gradient tensor is 2.7 GB: it is never copied to doubles). Rows with
 * skip[i] set are left out (and not counted in "compared"). */
static void cmp_rows_skip(moe_check_report *rep, const char *stage, moe_dtype dt, const void *got,
                          const void *ref_all, int off, int n, int cols, double tol,
                          const bool *skip)
{
    if (rep->count >= MOE_CHECK_MAX_ROWS) { /* no room to report it: never a silent pass */
        rep->all_pass = false;
        return;
    }
    moe_check_row *row = &rep->rows[rep->count++];
    memset(row, 0, sizeof *row);
    int used = 0;
    for (int i = 0; i < n; i++) used += !(skip && skip[i]);
    snprintf(row->stage, sizeof row->stage, "%s", stage);
    snprintf(row->compared, sizeof row->compared, "%d rows x %d", used, cols);
    row->worst_row = -1;
    bool nan = false, zero_bad = false;
    double num = 0, den = 0;
    /* Per-row sums in parallel over rows (one parallel region per stage: a region per row
     * stalls when the cores are shared), each row summed in order; then the rows in order. */
    double *rn = malloc(2 * sizeof(double) * ((size_t)n + 1));
    unsigned char *rnan = calloc((size_t)n + 1, 1);
    if (!rn || !rnan) {
        free(rn);
        free(rnan);
        snprintf(row->note, sizeof row->note, "out of memory comparing");
        row->pass = false;
        rep->all_pass = false;
        return;
    }
    double *rd = rn + n;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        rn[i] = rd[i] = 0;
        if (skip && skip[i]) continue;
        const size_t g0 = (size_t)i * cols, r0 = ((size_t)off + i) * cols;
        double a_n = 0, a_d = 0;
        unsigned char bad = 0;
        for (size_t q = 0; q < (size_t)cols; q++) {
            double a = moe_load_elem(dt, got, g0 + q), b = moe_load_elem(dt, ref_all, r0 + q);
            if (isnan(a) || isnan(b) || isinf(a)) bad = 1;
            a_n += (a - b) * (a - b);
            a_d += b * b;
        }
        rn[i] = a_n;
        rd[i] = a_d;
        rnan[i] = bad;
    }
    for (int i = 0; i < n; i++) {
        if (skip && skip[i]) continue;
        num += rn[i];
        den += rd[i];
        double e = rd[i] == 0 ? (rn[i] == 0 ? 0 : INFINITY) : sqrt(rn[i] / rd[i]);
        if (rd[i] == 0 && rn[i] != 0) zero_bad = true;
        if (rnan[i]) nan = true;
        if (e > row->worst_err || row->worst_row < 0 || rnan[i]) {
            if (e > row->worst_err || row->worst_row < 0) row->worst_err = e;
            row->worst_row = i;
        }
    }
    free(rn);
    free(rnan);
    row->rel_err = den == 0 ? (num == 0 ? 0 : INFINITY) : sqrt(num / den);
    row->tol = tol;
    row->pass = !nan && !zero_bad && row->rel_err <= tol && row->worst_err <= 10 * tol;
    if (nan) snprintf(row->note, sizeof row->note, "NaN/Inf present (unwritten or overflow)");
    else if (zero_bad) snprintf(row->note, sizeof row->note, "a zero reference row is not zero");
    if (!row->pass) rep->all_pass = false;
}

static void cmp_rows(moe_check_report *rep, const char *stage, moe_dtype dt, const void *got,
                     const void *ref_all, int off, int n, int cols, double tol)
{
    cmp_rows_skip(rep, stage, dt, got, ref_all, off, n, cols, tol, NULL);
}

#ifdef MOE_HAVE_CUDA
/* ------------------------------------------------------------ the check on the CUDA backend */

/* What one CUDA EP context produced, on the host: out/dx [Tn,H], logits [Tn,E], ids [Tn,k],
 * and the gradients: router [E,H], experts [le0, le0+El) of the ctx's slice (w13, w2), and
 * Llama-4's shared expert. */
typedef struct cuda_result {
    void *out, *dx, *logits;
    int32_t *ids;
    void *g_router, *g_w13, *g_w2, *g_sg, *g_su, *g_sd;
    double t_fwd, t_bwd;
    double mem_gib; /* device memory in use (whole device) after the run */
} cuda_result;

static void cuda_result_free(cuda_result *r)
{
    void *p[] = {r->out, r->dx, r->logits, r->ids, r->g_router, r->g_w13, r->g_w2, r->g_sg, r->g_su, r->g_sd};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
    memset(r, 0, sizeof *r);
}

static int agree_on(MPI_Comm comm, int rc)
{
    int all = rc;
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MAX, comm);
    return all;
}

static int cu_fail(cudaError_t e, const char *what, moe_error *err)
{
    if (e == cudaSuccess) return 0;
    cudaGetLastError();
    moe_fail(err, MOE_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e));
    return 1;
}

/* Run ctx c (collective over comm) on Tn tokens: forward with logits and ids, the overflow
 * check, and with `backward` the backward; the outputs and gradients this function allocates
 * are poisoned (all bits set: NaN in every float dtype, id -1) first. El_ctx = experts
 * the ctx holds; gradients of its experts [le0, le0+El) come back. */
static int cuda_run(moe_ep_cuda_ctx *c, MPI_Comm comm, const moe_config *cfg, moe_dtype dt, int Tn,
                    const void *x, const void *dout, bool backward, int El_ctx, int le0, int El,
                    cuda_result *r, moe_error *err)
{
    const size_t esz = moe_dtype_size(dt), H = (size_t)cfg->hidden, E = (size_t)cfg->num_experts,
                 k = (size_t)cfg->top_k, I = (size_t)cfg->inter, Is = (size_t)cfg->shared_inter;
    const size_t xb = (size_t)Tn * H * esz, lb = (size_t)Tn * E * esz, ib = (size_t)Tn * k * 4;
    const size_t w13e = 2 * I * H * esz, w2e = H * I * esz;
    void *dx_in = NULL, *ddout = NULL, *dout_d = NULL, *dlog = NULL, *ddx = NULL;
    int32_t *dids = NULL;
    cuda_block_grads g;
    memset(&g, 0, sizeof g);
    memset(r, 0, sizeof *r);
    int rc = 0;
    cudaStream_t s = moe_ep_cuda_stream(c);
    rc = cu_fail(cudaSetDevice(moe_ep_cuda_device(c)), "cudaSetDevice", err);
    if (!rc) rc = cu_fail(cudaMalloc(&dx_in, xb + 16), "device x", err);
    if (!rc) rc = cu_fail(cudaMalloc(&dout_d, xb + 16), "device out", err);
    if (!rc) rc = cu_fail(cudaMalloc(&dlog, lb + 16), "device router logits", err);
    if (!rc) rc = cu_fail(cudaMalloc((void **)&dids, ib + 16), "device top-k ids", err);
    if (!rc) rc = cu_fail(cudaMemcpy(dx_in, x, xb, cudaMemcpyHostToDevice), "x to the device", err);
    if (!rc) rc = cu_fail(cudaMemset(dout_d, 0xff, xb + 16), "poisoning out", err);
    if (!rc) rc = cu_fail(cudaMemset(dlog, 0xff, lb + 16), "poisoning logits", err);
    if (!rc) rc = cu_fail(cudaMemset(dids, 0xff, ib + 16), "poisoning ids", err);
    if (!rc && backward) {
        rc = cu_fail(cudaMalloc(&ddout, xb + 16), "device dout", err);
        if (!rc) rc = cu_fail(cudaMalloc(&ddx, xb + 16), "device dx", err);
        if (!rc) rc = cu_fail(cudaMemcpy(ddout, dout, xb, cudaMemcpyHostToDevice), "dout to the device", err);
        if (!rc) rc = cu_fail(cudaMemset(ddx, 0xff, xb + 16), "poisoning dx", err);
        if (!rc && moe_ep_cuda_grads_alloc(c, &g, err) != MOE_OK) rc = 1;
        /* every element must be written: zeros for idle experts too */
        if (!rc) rc = cu_fail(cudaMemset(g.router, 0xff, E * H * esz), "poisoning grads", err);
        if (!rc) rc = cu_fail(cudaMemset(g.w13, 0xff, (size_t)El_ctx * w13e), "poisoning grads", err);
        if (!rc) rc = cu_fail(cudaMemset(g.w2, 0xff, (size_t)El_ctx * w2e), "poisoning grads", err);
        if (!rc && Is) {
            rc = cu_fail(cudaMemset(g.shared_gate, 0xff, Is * H * esz), "poisoning grads", err);
            if (!rc) rc = cu_fail(cudaMemset(g.shared_up, 0xff, Is * H * esz), "poisoning grads", err);
            if (!rc) rc = cu_fail(cudaMemset(g.shared_down, 0xff, Is * H * esz), "poisoning grads", err);
        }
    }
    if (!rc) rc = cu_fail(cudaDeviceSynchronize(), "set-up", err);
    if ((rc = agree_on(comm, rc))) goto out; /* before the collective calls */
    double t0 = moe_now();
    if (moe_ep_cuda_forward(c, Tn, dx_in, dout_d, dlog, dids, NULL, err) != MOE_OK) {
        rc = 1;
        goto out; /* agreed (or fatal) inside */
    }
    if (moe_ep_cuda_check(c, err) != MOE_OK) rc = 1; /* local: a sync-free overflow */
    r->t_fwd = moe_now() - t0;
    if ((rc = agree_on(comm, rc))) goto out;
    if (backward) {
        t0 = moe_now();
        if (moe_ep_cuda_backward(c, Tn, dx_in, ddout, ddx, &g, NULL, err) != MOE_OK) {
            rc = 1;
            goto out;
        }
        rc = cu_fail(cudaStreamSynchronize(s), "EP backward", err);
        r->t_bwd = moe_now() - t0;
    }
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) r->mem_gib = (double)(tot - fr) / (1u << 30);
    /* results to the host */
    r->out = malloc(xb + 16);
    r->logits = malloc(lb + 16);
    r->ids = malloc(ib + 16);
    if (!r->out || !r->logits || !r->ids) rc = rc ? rc : (moe_fail(err, MOE_ERR_NOMEM, "host results"), 1);
    if (!rc) rc = cu_fail(cudaMemcpy(r->out, dout_d, xb, cudaMemcpyDeviceToHost), "out to the host", err);
    if (!rc) rc = cu_fail(cudaMemcpy(r->logits, dlog, lb, cudaMemcpyDeviceToHost), "logits to the host", err);
    if (!rc) rc = cu_fail(cudaMemcpy(r->ids, dids, ib, cudaMemcpyDeviceToHost), "ids to the host", err);
    if (!rc && backward) {
        struct {
            void **dst;
            const void *src;
            size_t bytes;
        } dl[] = {
            {&r->dx, ddx, xb},
            {&r->g_router, g.router, E * H * esz},
            {&r->g_w13, (const char *)g.w13 + (size_t)le0 * w13e, (size_t)El * w13e},
            {&r->g_w2, (const char *)g.w2 + (size_t)le0 * w2e, (size_t)El * w2e},
            {&r->g_sg, g.shared_gate, Is * H * esz},
            {&r->g_su, g.shared_up, Is * H * esz},
            {&r->g_sd, g.shared_down, Is * H * esz},
        };
        for (size_t i = 0; i < sizeof dl / sizeof dl[0] && !rc; i++) {
            if (!dl[i].src) continue;
            *dl[i].dst = malloc(dl[i].bytes + 16);
            if (!*dl[i].dst) {
                moe_fail(err, MOE_ERR_NOMEM, "host gradients (%zu bytes)", dl[i].bytes);
                rc = 1;
            } else {
                rc = cu_fail(cudaMemcpy(*dl[i].dst, dl[i].src, dl[i].bytes, cudaMemcpyDeviceToHost),
                             "gradients to the host", err);
            }
        }
    }
out:
    cuda_block_grads_free(&g);
    cudaFree(dx_in);
    cudaFree(ddout);
    cudaFree(dout_d);
    cudaFree(dlog);
    cudaFree(ddx);
    cudaFree(dids);
    return rc;
}

/* Whether two top-k id sets (k each) hold the same experts. */
static bool same_set(const int32_t *a, const int32_t *b, int k)
{
    for (int i = 0; i < k; i++) {
        bool found = false;
        for (int j = 0; j < k && !found; j++) found = a[i] == b[j];
        if (!found) return false;
    }
    return true;
}

/* A token the EP routed to other experts than the reference is acceptable only as a near-tie:
 * every expert chosen by one side only must have a reference logit within the logits'
 * tolerance of every expert chosen by the other side only. */
static bool near_tie(moe_dtype dt, const void *ref_logits, size_t row, int E, const int32_t *a,
                     const int32_t *b, int k, double tol)
{
    for (int i = 0; i < k; i++) {
        bool in_b = false;
        for (int j = 0; j < k; j++) in_b |= a[i] == b[j];
        if (in_b) continue;
        for (int j = 0; j < k; j++) {
            bool in_a = false;
            for (int q = 0; q < k; q++) in_a |= b[j] == a[q];
            if (in_a) continue;
            double la = moe_load_elem(dt, ref_logits, row * E + (size_t)a[i]);
            double lb = moe_load_elem(dt, ref_logits, row * E + (size_t)b[j]);
            double scale = fmax(1.0, fmax(fabs(la), fabs(lb)));
            if (fabs(la - lb) > tol * scale) return false;
        }
    }
    return true;
}

/* `moe-ep check` on the CUDA backend: the EP forward (and backward) with moe_ep_cuda_* over
 * MPI_COMM_WORLD on this rank's tokens, then the single-rank fused path on the GPU (an N = 1,
 * V = 1 CUDA EP context over MPI_COMM_SELF: cuda_block's plain path with all experts, or the
 * forced routing through the host) on the whole batch, on this rank's GPU; stage by stage into
 * rep. The EP context is destroyed before the reference is built, so a rank holds at most its
 * slice or all experts on the device, never both. */
static int check_cuda(const moe_config *cfg, moe_dtype dt, const moe_ep_options *o, uint64_t seed,
                      int T, int Tr, int off, const void *x_all, const void *dout_all,
                      bool backward, bool stats, int rank, int size, moe_check_report *rep,
                      int *eb_out, int *El_out, char *info, size_t info_len, moe_error *err)
{
    const int H = cfg->hidden, E = cfg->num_experts, I = cfg->inter, k = cfg->top_k, Is = cfg->shared_inter;
    const size_t esz = moe_dtype_size(dt);
    moe_weights w = {0}, wf = {0};
    moe_ep_cuda_ctx *c = NULL, *one = NULL;
    cuda_result ep, ref;
    memset(&ep, 0, sizeof ep);
    memset(&ref, 0, sizeof ref);
    bool *skip = NULL;
    int rc = 0, dev = -1, eb = 0, El = 0;
    const char *x = (const char *)x_all + (size_t)off * H * esz;
    const char *dout = (const char *)dout_all + (size_t)off * H * esz;
    double t0 = moe_now();
    if (moe_ep_weights_random(MPI_COMM_WORLD, cfg, seed, o->virtual_ranks, dt, &w, err) != MOE_OK) rc = 1;
    if ((rc = agree(rc))) goto done;
    eb = w.expert_begin;
    El = w.expert_count;
    *eb_out = eb;
    *El_out = El;
    if (moe_ep_cuda_ctx_create(MPI_COMM_WORLD, &w, o, &c, err) != MOE_OK) {
        rc = 1;
        goto done; /* every rank gets the same status */
    }
    dev = moe_ep_cuda_device(c);
    if (rank == 0) {
        printf("moe-ep check: cuda backend, %s transport%s; weights generated and uploaded in %.1f s\n",
               moe_ep_cuda_transport(c), moe_ep_cuda_syncfree(c) ? " (sync-free)" : "", moe_now() - t0);
        fflush(stdout);
    }
    rc = cuda_run(c, MPI_COMM_WORLD, cfg, dt, Tr, x, dout, backward, El, 0, El, &ep, err);
    if ((rc = agree(rc))) goto done;
    if (stats)
        for (int r = 0; r < size; r++) {
            MPI_Barrier(MPI_COMM_WORLD);
            if (r == rank) {
                moe_ep_stats_print(stdout, moe_ep_cuda_stats(c));
                fflush(stdout);
            }
        }
    moe_ep_cuda_ctx_destroy(c);
    c = NULL;
    moe_weights_free(&w);

    /* the single-rank fused path over the whole batch on this rank's GPU (same forced routing) */
    moe_ep_options o1 = *o;
    o1.virtual_ranks = 1;
    o1.chunks = 1;
    o1.transport = MOE_EP_TRANSPORT_MPI;
    o1.max_tokens_per_rank = 0;
    o1.max_recv_tokens = 0;
    o1.device = dev;
    t0 = moe_now();
    if (moe_weights_random(cfg, seed, 0, E, dt, &wf, err) != MOE_OK ||
        moe_ep_cuda_ctx_create(MPI_COMM_SELF, &wf, &o1, &one, err) != MOE_OK)
        rc = 1;
    else
        rc = cuda_run(one, MPI_COMM_SELF, cfg, dt, T, x_all, dout_all, backward, E, eb, El, &ref, err);
    double t_ref = moe_now() - t0;
    moe_ep_cuda_ctx_destroy(one);
    one = NULL;
    moe_weights_free(&wf);
    if ((rc = agree(rc))) goto done;
    if (rank == 0) {
        printf("moe-ep check: rank 0: EP forward %.3f s%s", ep.t_fwd, backward ? "" : "; ");
        if (backward) printf(", backward %.3f s; ", ep.t_bwd);
        printf("single-rank reference (generate, upload, run) %.1f s\n", t_ref);
        fflush(stdout);
    }
    snprintf(info, info_len, "GPU %d, device memory in use %.2f GiB with the EP slice, %.2f GiB with all experts",
             dev, ep.mem_gib, ref.mem_gib);

    /* stages */
    double t_cmp = moe_now();
    double tol = moe_check_tol(dt, false), tg = moe_check_tol(dt, true);
    cmp_rows(rep, "router logits", dt, ep.logits, ref.logits, off, Tr, E, tol);
    skip = calloc((size_t)Tr + 1, sizeof(bool));
    int ndiff = 0, nbad = 0;
    for (int t = 0; t < Tr && skip; t++) {
        const int32_t *a = ep.ids + (size_t)t * k, *b = ref.ids + ((size_t)off + t) * k;
        if (same_set(a, b, k)) continue;
        skip[t] = true;
        ndiff++;
        if (!near_tie(dt, ref.logits, (size_t)off + t, E, a, b, k, tol)) nbad++;
    }
    char note[96] = "";
    int ntie = ndiff - nbad, tie_cap = Tr / 50 > 1 ? Tr / 50 : 1;
    if (ntie > 0)
        snprintf(note, sizeof note, "%d near-tie token%s (logits within tol) left out%s", ntie,
                 ntie == 1 ? "" : "s", ntie > tie_cap ? ": more than 2%" : "");
    char what[40];
    snprintf(what, sizeof what, "%d tokens x %d", Tr, k);
    moe_check_exact(rep, "routing (top-k ids)", what, Tr, nbad + (ntie > tie_cap ? ntie : 0), note);
    cmp_rows_skip(rep, "output", dt, ep.out, ref.out, off, Tr, H, tol, skip);
    if (backward) {
        cmp_rows_skip(rep, "grad hidden_states", dt, ep.dx, ref.dx, off, Tr, H, tg, skip);
        int all = 0;
        MPI_Allreduce(&ndiff, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        if (all > 0) {
            /* a token routed to other experts changes every weight gradient it touches */
            moe_check_exact(rep, "weight gradients", "not compared", 0, 0,
                            "tokens routed differently (near-tie) on some rank");
        } else {
            cmp_rows(rep, "grad router", dt, ep.g_router, ref.g_router, 0, E, H, dt == MOE_DTYPE_F32 ? tg : 2.5 * tg);
            cmp_rows(rep, "grad gate_up (per expert)", dt, ep.g_w13, ref.g_w13, 0, El, 2 * I * H, tg);
            cmp_rows(rep, "grad down (per expert)", dt, ep.g_w2, ref.g_w2, 0, El, H * I, tg);
            if (Is > 0) {
                cmp_rows(rep, "grad shared gate", dt, ep.g_sg, ref.g_sg, 0, 1, Is * H, tg);
                cmp_rows(rep, "grad shared up", dt, ep.g_su, ref.g_su, 0, 1, Is * H, tg);
                cmp_rows(rep, "grad shared down", dt, ep.g_sd, ref.g_sd, 0, 1, H * Is, tg);
            }
        }
    }
    if (rank == 0) {
        printf("moe-ep check: rank 0: comparisons %.1f s\n", moe_now() - t_cmp);
        fflush(stdout);
    }
done:
    moe_ep_cuda_ctx_destroy(c);
    moe_ep_cuda_ctx_destroy(one);
    moe_weights_free(&w);
    moe_weights_free(&wf);
    cuda_result_free(&ep);
    cuda_result_free(&ref);
    free(skip);
    return rc;
}
#endif

int cli_ep_check(const char *model, int tokens, const char *dtype_s, const char *backend_s,
                 uint64_t seed, bool backward, const cli_ep_args *ep)
{
    int rank, size;
    ep_init(&rank, &size);
    moe_error err = {0};
    moe_config cfg;
    if (moe_config_resolve(model, &cfg, &err) != MOE_OK) {
        if (rank == 0) fprintf(stderr, "moe-ep check: --model: %s\n", err.msg);
        return ep_finish(2);
    }
    moe_dtype dt = cfg.dtype;
    if (dtype_s && (!moe_dtype_parse(dtype_s, &dt) || dt == MOE_DTYPE_F64)) {
        if (rank == 0) fprintf(stderr, "moe-ep check: --dtype expects bf16, fp16 or fp32, got '%s'\n", dtype_s);
        return ep_finish(2);
    }
    moe_ep_options o;
    bool use_cuda = false;
    int rc = agree(ep_options(ep, &cfg, backend_s, &use_cuda, &o, "check"));
    if (rc) return ep_finish(rc);
    const int T = tokens, H = cfg.hidden, E = cfg.num_experts, I = cfg.inter;
    const size_t esz = moe_dtype_size(dt);
    int Tr, off;
    split(T, size, rank, &Tr, &off);
    moe_weights w = {0}, wf = {0}, g = {0}, gf = {0};
    moe_ep_ctx *ctx = NULL;
    moe_fwd_state st;
    memset(&st, 0, sizeof st);
    void *x_all = malloc((size_t)T * H * esz + 1), *dout_all = malloc((size_t)T * H * esz + 1);
    void *dx_all = malloc((size_t)T * H * esz + 1);
    void *out = malloc((size_t)Tr * H * esz + 1), *dx = malloc((size_t)Tr * H * esz + 1);
    moe_check_report rep;
    moe_check_report_init(&rep);
    /* the same global tensors as the single-rank check: any slice is generated identically */
    moe_fill_normal(dt, x_all, (size_t)T * H, seed, "hidden_states", 0, 1.0);
    moe_fill_normal(dt, dout_all, (size_t)T * H, seed, "grad_output", 0, 1.0);
    const char *x = (const char *)x_all + (size_t)off * H * esz;
    const char *dout = (const char *)dout_all + (size_t)off * H * esz;
    if (rank == 0)
        printf("moe-ep check: %s H=%d I=%d E=%d k=%d, T=%d over %d ranks (x%d virtual, %s transport, "
               "%d chunks), dtype %s, seed %llu: expert-parallel vs the single-rank fused path\n",
               cfg.name, H, I, E, cfg.top_k, T, size, o.virtual_ranks,
               moe_ep_transport_name(o.transport), o.chunks, moe_dtype_name(dt), (unsigned long long)seed);
    if (rank == 0 && o.route.mode != MOE_EP_ROUTE_ROUTER)
        printf("moe-ep check: forced routing: compared against the single-rank EP path (V=1, N=1)\n");
    fflush(stdout);
    int eb = 0, El = 0;
    char info[192] = "";
    if (use_cuda) {
#ifdef MOE_HAVE_CUDA
        rc = check_cuda(&cfg, dt, &o, seed, T, Tr, off, x_all, dout_all, backward, ep->stats, rank,
                        size, &rep, &eb, &El, info, sizeof info, &err);
#endif
        if (rc) goto fail; /* agreed */
        goto report;
    }
    if (rank == 0) printf("moe-ep check: cpu backend\n");
    if (moe_ep_weights_random(MPI_COMM_WORLD, &cfg, seed, o.virtual_ranks, dt, &w, &err) != MOE_OK ||
        moe_ep_ctx_create(MPI_COMM_WORLD, &w, &o, &ctx, &err) != MOE_OK)
        rc = 1;
    if ((rc = agree(rc))) goto fail;
    eb = w.expert_begin;
    El = w.expert_count;
    if (moe_ep_forward(ctx, Tr, x, out, NULL, NULL, NULL, &err) != MOE_OK) rc = 1;
    if (!rc && backward) {
        if (moe_weights_zeros_like(&w, dt, &g, &err) != MOE_OK ||
            moe_ep_backward(ctx, Tr, x, dout, dx, &g, NULL, &err) != MOE_OK)
            rc = 1;
    }
    if ((rc = agree(rc))) goto fail;
    /* the single-rank fused path over the whole batch, on every rank (same forced routing) */
    {
        moe_ep_ctx *one = NULL;
        moe_ep_options o1 = o;
        o1.virtual_ranks = 1;
        o1.chunks = 1;
        o1.transport = MOE_EP_TRANSPORT_MPI;
        o1.max_tokens_per_rank = 0;
        if (moe_weights_random(&cfg, seed, 0, E, dt, &wf, &err) != MOE_OK ||
            moe_ep_ctx_create(MPI_COMM_SELF, &wf, &o1, &one, &err) != MOE_OK) {
            rc = 1;
        } else {
            void *out_all = malloc((size_t)T * H * esz + 1);
            if (moe_ep_forward(one, T, x_all, out_all, NULL, NULL, NULL, &err) != MOE_OK) rc = 1;
            if (!rc) cmp_rows(&rep, "output", dt, out, out_all, off, Tr, H, moe_check_tol(dt, false));
            if (!rc && backward) {
                if (moe_weights_zeros_like(&wf, dt, &gf, &err) != MOE_OK ||
                    moe_ep_backward(one, T, x_all, dout_all, dx_all, &gf, NULL, &err) != MOE_OK)
                    rc = 1;
                if (!rc) {
                    double tg = moe_check_tol(dt, true);
                    cmp_rows(&rep, "grad hidden_states", dt, dx, dx_all, off, Tr, H, tg);
                    cmp_rows(&rep, "grad router", dt, g.router.data, gf.router.data, 0, E, H,
                             dt == MOE_DTYPE_F32 ? tg : 2.5 * tg);
                    cmp_rows(&rep, "grad gate_up (per expert)", dt, g.w13.data, gf.w13.data, eb, El, 2 * I * H, tg);
                    cmp_rows(&rep, "grad down (per expert)", dt, g.w2.data, gf.w2.data, eb, El, H * I, tg);
                    if (cfg.shared_inter > 0) {
                        int Is = cfg.shared_inter;
                        cmp_rows(&rep, "grad shared gate", dt, g.shared_gate.data, gf.shared_gate.data, 0, 1, Is * H, tg);
                        cmp_rows(&rep, "grad shared up", dt, g.shared_up.data, gf.shared_up.data, 0, 1, Is * H, tg);
                        cmp_rows(&rep, "grad shared down", dt, g.shared_down.data, gf.shared_down.data, 0, 1, H * Is, tg);
                    }
                }
            }
            free(out_all);
        }
        moe_ep_ctx_destroy(one);
    }
    if ((rc = agree(rc))) goto fail;
report:
    for (int r = 0; r < size; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        if (r == rank) {
            printf("\nrank %d of %d: tokens [%d, %d), experts [%d, %d)%s%s\n", rank, size, off,
                   off + Tr, eb, eb + El, info[0] ? "; " : "", info);
            moe_check_print(&rep, stdout);
            fflush(stdout);
        }
    }
    if (ep->stats && !use_cuda) print_stats_in_order(ctx, rank, size);
    rc = agree(rep.all_pass ? 0 : 1);
    if (rank == 0) {
        /* say it when a near-tie kept the weight gradients out of the comparison */
        bool grads_skipped = false;
        for (int i = 0; i < rep.count; i++)
            grads_skipped |= strcmp(rep.rows[i].stage, "weight gradients") == 0;
        printf("\nmoe-ep check: %s on all %d ranks%s\n", rc ? "FAIL" : "PASS", size,
               grads_skipped ? " (weight gradients NOT compared: tokens routed differently at near-ties)" : "");
    }
    goto done;
fail:
    fprintf(stderr, "moe-ep check: %s\n", err.msg[0] ? err.msg : "failed on another rank");
    rc = agree(1);
done:
    moe_ep_ctx_destroy(ctx);
    moe_weights_free(&w); moe_weights_free(&wf); moe_weights_free(&g); moe_weights_free(&gf);
    free(x_all); free(dout_all); free(dx_all); free(out); free(dx);
    if (o.route.ids) free((void *)o.route.ids);
    return ep_finish(rc);
}
