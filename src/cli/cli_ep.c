/* cli_ep.c — `moe-ep forward` and `moe-ep check` expert-parallel (see cli_ep.h).
 *
 * Tokens are spread in contiguous slices: rank r holds global tokens [off_r, off_r + T_r) with
 * T_r = T/N (+1 for the first T%N ranks), as if they arrived data-parallel after attention.
 * Every rank calls every collective in the same order; a failure on one rank is agreed on
 * (agree()) before the next collective so no rank is left waiting. */
#include "cli_ep.h"

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

/* Options from the command line; the CUDA backend's EP driver is separate work. */
static int ep_options(const cli_ep_args *a, const moe_config *cfg, const char *backend_s,
                      bool allow_cuda, bool *use_cuda, moe_ep_options *o, const char *cmd)
{
    memset(o, 0, sizeof *o);
    o->virtual_ranks = a->virtual_ranks;
    o->chunks = a->chunks;
    o->max_tokens_per_rank = a->max_tokens_per_rank;
    o->abort_on_fatal = true;
    o->device = -1;
    bool want_cuda = backend_s && (strcmp(backend_s, "cuda") == 0 || strcmp(backend_s, "gpu") == 0);
    bool auto_gpu = (!backend_s || strcmp(backend_s, "auto") == 0) && cli_gpu_available();
    *use_cuda = allow_cuda && (want_cuda || auto_gpu);
    if (want_cuda && !allow_cuda) {
        fprintf(stderr, "moe-ep %s: the expert-parallel check runs on the CPU backend (--backend cpu); "
                        "the CUDA EP path is checked by test_mpi_gpu_ep and `moe-ep forward`\n", cmd);
        return 2;
    }
#ifndef MOE_HAVE_CUDA
    if (want_cuda) {
        fprintf(stderr, "moe-ep %s: --backend cuda: this build has no CUDA backend\n", cmd);
        return 2;
    }
#endif
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
    if ((rc = ep_options(ep, &cfg, backend_s, true, &use_cuda, &o, "forward"))) return ep_finish(rc);
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

/* Compare rows [off, off+n) of a global [*, cols] reference with the local result. */
static void cmp_rows(moe_check_report *rep, const char *stage, moe_dtype dt, const void *got,
                     const void *ref_all, int off, int n, int cols, double tol)
{
    double *g = malloc(sizeof(double) * ((size_t)n * cols + 1));
    double *r = malloc(sizeof(double) * ((size_t)n * cols + 1));
    for (size_t i = 0; i < (size_t)n * cols; i++) {
        g[i] = moe_load_elem(dt, got, i);
        r[i] = moe_load_elem(dt, ref_all, (size_t)off * cols + i);
    }
    char what[48];
    snprintf(what, sizeof what, "%d rows x %d", n, cols);
    moe_check_compare(rep, stage, what, g, r, (size_t)n, (size_t)cols, tol);
    free(g);
    free(r);
}

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
    int rc = ep_options(ep, &cfg, backend_s, false, &use_cuda, &o, "check");
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
    if (moe_ep_weights_random(MPI_COMM_WORLD, &cfg, seed, o.virtual_ranks, dt, &w, &err) != MOE_OK ||
        moe_ep_ctx_create(MPI_COMM_WORLD, &w, &o, &ctx, &err) != MOE_OK)
        rc = 1;
    if ((rc = agree(rc))) goto fail;
    if (moe_ep_forward(ctx, Tr, x, out, NULL, NULL, NULL, &err) != MOE_OK) rc = 1;
    if (!rc && backward) {
        if (moe_weights_zeros_like(&w, dt, &g, &err) != MOE_OK ||
            moe_ep_backward(ctx, Tr, x, dout, dx, &g, NULL, &err) != MOE_OK)
            rc = 1;
    }
    if ((rc = agree(rc))) goto fail;
    /* the single-rank fused path over the whole batch, on every rank (same forced routing) */
    if (o.route.mode != MOE_EP_ROUTE_ROUTER) {
        if (rank == 0) printf("moe-ep check: forced routing: compared against the single-rank EP path (V=1, N=1)\n");
    }
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
                    int El = w.expert_count, eb = w.expert_begin;
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
    for (int r = 0; r < size; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        if (r == rank) {
            printf("\nrank %d of %d: tokens [%d, %d), experts [%d, %d)\n", rank, size, off, off + Tr,
                   w.expert_begin, w.expert_begin + w.expert_count);
            moe_check_print(&rep, stdout);
            fflush(stdout);
        }
    }
    if (ep->stats) print_stats_in_order(ctx, rank, size);
    rc = agree(rep.all_pass ? 0 : 1);
    if (rank == 0) printf("\nmoe-ep check: %s on all %d ranks\n", rc ? "FAIL" : "PASS", size);
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
