/* cli_run.c — `moe-ep forward` and `moe-ep backward`: one MoE block on a safetensors input,
 * the scriptable unit of inference and the hook for checking against HuggingFace / autograd.
 * Under mpirun (or with an EP option) the block runs expert-parallel through the same calls:
 * rank 0 reads the input and spreads the tokens in contiguous slices, each rank loads only its
 * experts, rank 0 gathers and writes the result — the same names and shapes as one rank's. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_layer.h"
#include "cli_opts.h"
#include "config.h"
#include "dtype.h"
#include "layer/layer.h"
#include "safetensors.h"
#include "weights.h"

/* Read a [T,H] or [B,S,H] tensor `name` of file `path`, converted to dt: returns T and the
 * original shape (for writing outputs shaped like the input). */
moe_status cli_read_rows(const char *path, const char *name, int H, moe_dtype dt, void **out,
                         int *T, moe_tensor *shape_of, moe_error *err)
{
    moe_st_file f;
    MOE_TRY(moe_st_open(path, &f, err));
    moe_status st = MOE_OK;
    moe_tensor view;
    if ((st = moe_st_get(&f, name, &view, err)) != MOE_OK) goto done;
    if ((view.ndim != 2 && view.ndim != 3) || view.shape[view.ndim - 1] != H) {
        char buf[64];
        st = moe_fail(err, MOE_ERR_FORMAT, "%s: tensor '%s' has shape %s; expected [T, %d] or [B, S, %d]",
                      path, name, moe_shape_str(view.ndim, view.shape, buf, sizeof buf), H, H);
        goto done;
    }
    if (!moe_dtype_is_float(view.dtype)) {
        st = moe_fail(err, MOE_ERR_FORMAT, "%s: tensor '%s' is %s; expected a floating dtype", path,
                      name, moe_dtype_name(view.dtype));
        goto done;
    }
    size_t n = moe_tensor_numel(&view);
    if (n / (size_t)H > 0x7fffffff) {
        st = moe_fail(err, MOE_ERR_FORMAT, "%s: '%s' has too many rows", path, name);
        goto done;
    }
    *T = (int)(n / (size_t)H);
    *out = moe_malloc(n * moe_dtype_size(dt) + 1, name, err);
    if (!*out) { st = MOE_ERR_NOMEM; goto done; }
    moe_tensor dst = moe_tensor_view_of(dt, view.ndim, view.shape, *out);
    st = moe_tensor_convert(&view, &dst, err);
    *shape_of = moe_tensor_view_of(dt, view.ndim, view.shape, NULL);
done:
    moe_st_close(&f);
    return st;
}

typedef struct run_args {
    const char *config, *weights, *input, *output, *grad_output;
    int layer;
} run_args;

/* Every rank's slice of rank 0's T rows (cli_split) in bytes: cnt[r] bytes at dis[r], for
 * the v-collectives of scatter_rows / gather_rows. */
static void row_slices(int T, size_t rb, int size, int *cnt, int *dis)
{
    for (int r = 0; r < size; r++) {
        int tr, off;
        cli_split(T, size, r, &tr, &off);
        cnt[r] = (int)((size_t)tr * rb);
        dis[r] = (int)((size_t)off * rb);
    }
}

/* Rank 0's [T, cols] rows spread (contiguous slices) / gathered, bytes per row `rb`. */
static void scatter_rows(const void *all, void *mine, int T, size_t rb, int rank, int size)
{
    int *cnt = calloc((size_t)size, sizeof(int)), *dis = calloc((size_t)size, sizeof(int));
    row_slices(T, rb, size, cnt, dis);
    MPI_Scatterv(all, cnt, dis, MPI_BYTE, mine, cnt[rank], MPI_BYTE, 0, MPI_COMM_WORLD);
    free(cnt);
    free(dis);
}

static void gather_rows(const void *mine, void *all, int T, size_t rb, int rank, int size)
{
    int *cnt = calloc((size_t)size, sizeof(int)), *dis = calloc((size_t)size, sizeof(int));
    row_slices(T, rb, size, cnt, dis);
    MPI_Gatherv(mine, cnt[rank], MPI_BYTE, all, cnt, dis, MPI_BYTE, 0, MPI_COMM_WORLD);
    free(cnt);
    free(dis);
}

/* Rank 0 assembles every expert's gradient [E, per] (source layout) from the ranks' local
 * experts, placing each at its global id. */
static int gather_experts(const moe_layer *L, const void *mine, void *all, size_t per, int rank,
                          int size)
{
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    if (moe_layer_info_get(L, &in) != MOE_OK) return 1;
    int El = in.num_local_experts;
    int *counts = calloc((size_t)size, sizeof(int)), *displ = calloc((size_t)size, sizeof(int));
    MPI_Gather(&El, 1, MPI_INT, counts, 1, MPI_INT, 0, MPI_COMM_WORLD);
    int total = 0;
    for (int r = 0; rank == 0 && r < size; r++) {
        displ[r] = total;
        total += counts[r];
    }
    int32_t *ids = rank == 0 ? malloc(((size_t)total + 1) * sizeof(int32_t)) : NULL;
    MPI_Gatherv(in.local_experts, El, MPI_INT32_T, ids, counts, displ, MPI_INT32_T, 0, MPI_COMM_WORLD);
    char *buf = rank == 0 ? malloc((size_t)total * per + 1) : NULL;
    /* per-expert blocks as one derived type keeps the counts in experts */
    MPI_Datatype blk;
    MPI_Type_contiguous((int)per, MPI_BYTE, &blk);
    MPI_Type_commit(&blk);
    MPI_Gatherv(mine, El, blk, buf, counts, displ, blk, 0, MPI_COMM_WORLD);
    MPI_Type_free(&blk);
    for (int i = 0; rank == 0 && i < total; i++)
        memcpy((char *)all + (size_t)ids[i] * per, buf + (size_t)i * per, per);
    free(ids);
    free(buf);
    free(counts);
    free(displ);
    return 0;
}

/* [n, a, b] -> [n, b, a] on the host (Llama-4's layout back to the canonical one). */
static void transpose_host(moe_dtype dt, int n, int a, int b, const void *src, void *dst)
{
    const size_t es = moe_dtype_size(dt);
    for (int e = 0; e < n; e++)
        for (int i = 0; i < a; i++)
            for (int j = 0; j < b; j++)
                memcpy((char *)dst + (((size_t)e * b + j) * a + i) * es,
                       (const char *)src + (((size_t)e * a + i) * b + j) * es, es);
}

static int run(const char *cmd, int argc, char **argv, bool backward)
{
    run_args a = {.layer = -1};
    cli_layer_args la;
    cli_layer_args_init(&la);
    cli_opt opts[] = {
        {"config", OPT_STRING, "PRESET|config.json", "model preset or HF config.json (required)", .str = &a.config},
        {"weights", OPT_STRING, "W", "weights: a .safetensors file, a model.safetensors.index.json, or a checkpoint directory holding either (required)", .str = &a.weights},
        {"layer", OPT_INT, "N", "decoder layer N of a full checkpoint (default: the block's own names)", .i = &a.layer, .min = 0},
        {"input", OPT_STRING, "X.safetensors", "file holding hidden_states [T,H] or [B,S,H] (required)", .str = &a.input},
        {"output", OPT_STRING, "Y.safetensors", backward ? "file to write grad.hidden_states and grad.<weight> into (required)" : "file to write output and router_logits into (required)", .str = &a.output},
        CLI_LAYER_OPTIONS(la),
        CLI_EP_OPTIONS(la),
        /* last: for `forward` its NULL name ends the table */
        {backward ? "grad-output" : NULL, OPT_STRING, "G.safetensors", "file holding grad_output, shaped like the output (required)", .str = &a.grad_output},
        {0},
    };
    const char *syn = backward
        ? "--config C --weights W [--layer N] --input X --grad-output G --output OUT [--backend B] [--dtype D]"
        : "--config C --weights W [--layer N] --input X --output Y [--backend B] [--dtype D]";
    const char *desc = backward
        ? "Runs the block forward then backward for the loss sum(output * grad_output) and writes\n"
          "grad.hidden_states plus, for every weight it loaded, grad.<that weight's name> in the\n"
          "loaded shape (per-expert weights give per-expert gradients). Under mpirun the block runs\n"
          "expert-parallel and rank 0 writes the same names and shapes a single rank would."
        : "Runs one MoE block on hidden_states and writes `output` (shaped like the input, in the\n"
          "compute dtype) and `router_logits` [T,E] (the router's pre-activation output). Under\n"
          "mpirun the block runs expert-parallel: rank 0 reads the input, spreads the tokens, and\n"
          "writes the output.";
    int rc = cli_parse(cmd, syn, desc, opts, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    const char *req[] = {"config", "weights", "input", "output", backward ? "grad-output" : NULL};
    for (size_t i = 0; i < sizeof req / sizeof req[0]; i++)
        if (req[i] && (rc = cli_require(cmd, opts, req[i]))) return rc;

    const bool ep = cli_ep_wanted(&la);
    int rank = 0, size = 1;
    if (ep) cli_mpi_begin(&rank, &size);
    moe_error err = {0};
    moe_config cfg;
    /* agreed: a rank whose config fails says why, and every rank leaves (none waits in a
     * collective for it) */
    rc = 0;
    if (moe_config_resolve(a.config, &cfg, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep %s: --config: %s\n", cmd, err.msg);
        rc = 2;
    }
    if ((rc = cli_agree(rc))) return ep ? cli_mpi_end(rc) : rc;
    moe_layer_options lo;
    moe_dtype dt;
    if ((rc = cli_agree(cli_layer_options(cmd, &la, &cfg, &lo, &dt)))) return ep ? cli_mpi_end(rc) : rc;
    const int H = cfg.hidden, E = cfg.num_experts, I = cfg.inter, Is = cfg.shared_inter;
    const size_t esz = moe_dtype_size(dt), xrow = (size_t)H * esz;
    void *x_all = NULL, *g_all = NULL, *x = NULL, *dout = NULL, *out = NULL, *logits = NULL;
    void *out_all = NULL, *logits_all = NULL, *dx = NULL, *dx_all = NULL;
    moe_layer *L = NULL;
    moe_ep_comm *comm = NULL;
    int32_t *owner = NULL;
    moe_tensor xshape;
    memset(&xshape, 0, sizeof xshape);
    moe_layer_grads g = {0}, gall = {0};
    int T = 0, Tg = 0;

    /* the layer first (a bad weights file is reported before the input is read) */
    if (ep) {
        if ((rc = cli_ep_open(cmd, &la, E, &comm, &owner))) goto out;
        lo.comm = comm;
        lo.expert_map = owner;
    }
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_FILE;
    src.path = a.weights;
    src.layer = a.layer;
    moe_status st = moe_layer_create(a.config, &src, &lo, &L);
    if (st != MOE_OK) {
        rc = cli_api_fail(cmd, st); /* collective: every rank got the same status */
        goto out;
    }
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    moe_layer_info_get(L, &in);
    const int El = in.num_local_experts;
    /* rank 0 reads the inputs; everyone learns T and the input's shape */
    if (rank == 0) {
        if (cli_read_rows(a.input, "hidden_states", H, dt, &x_all, &T, &xshape, &err) != MOE_OK) rc = 1;
        if (!rc && backward &&
            cli_read_rows(a.grad_output, "grad_output", H, dt, &g_all, &Tg, &(moe_tensor){0}, &err) != MOE_OK)
            rc = 1;
        if (!rc && backward && Tg != T)
            rc = (moe_fail(&err, MOE_ERR_FORMAT, "%s: grad_output has %d rows but hidden_states has %d",
                           a.grad_output, Tg, T), 1);
        if (rc) fprintf(stderr, "moe-ep %s: %s\n", cmd, err.msg);
    }
    if ((rc = cli_agree(rc))) goto out;
    int Tr = T, off = 0;
    if (ep) {
        int64_t meta[2 + MOE_MAX_DIMS] = {T, xshape.ndim};
        for (int i = 0; i < MOE_MAX_DIMS; i++) meta[2 + i] = xshape.shape[i];
        MPI_Bcast(meta, 2 + MOE_MAX_DIMS, MPI_INT64_T, 0, MPI_COMM_WORLD);
        T = (int)meta[0];
        xshape.ndim = (int)meta[1];
        for (int i = 0; i < MOE_MAX_DIMS; i++) xshape.shape[i] = meta[2 + i];
        cli_split(T, size, rank, &Tr, &off);
        x = malloc((size_t)Tr * xrow + 1);
        scatter_rows(x_all, x, T, xrow, rank, size);
        if (backward) {
            dout = malloc((size_t)Tr * xrow + 1);
            scatter_rows(g_all, dout, T, xrow, rank, size);
        }
    } else {
        x = x_all;
        dout = g_all;
    }
    moe_tensor_view vx = {dt, 2, {Tr, H}, x};
    if (!backward) {
        out = malloc((size_t)Tr * xrow + 1);
        logits = malloc((size_t)Tr * E * esz + 1);
        moe_tensor_view vo = {dt, 2, {Tr, H}, out}, vl = {dt, 2, {Tr, E}, logits};
        st = moe_layer_forward(L, &vx, &vo, &vl);
        if (st == MOE_OK) st = moe_layer_check_errors(L);
        if (st == MOE_ERR_NONFINITE) {
            fprintf(stderr, "moe-ep %s: warning: %s\n", cmd, moe_last_error());
            st = MOE_OK;
        }
    } else {
        dx = malloc((size_t)Tr * xrow + 1);
        const size_t w13b = (size_t)El * 2 * I * H * esz, w2b = (size_t)El * H * I * esz;
        g.router = malloc((size_t)E * H * esz + 1);
        g.w13 = malloc(w13b + 1);
        g.w2 = malloc(w2b + 1);
        if (Is > 0) {
            g.shared_gate = malloc((size_t)Is * H * esz);
            g.shared_up = malloc((size_t)Is * H * esz);
            g.shared_down = malloc((size_t)Is * H * esz);
        }
        moe_tensor_view vd = {dt, 2, {Tr, H}, dout}, vdx = {dt, 2, {Tr, H}, dx};
        st = moe_layer_backward(L, &vx, &vd, NULL, &vdx, &g);
        if (st == MOE_OK) st = moe_layer_check_errors(L);
        if (st == MOE_ERR_NONFINITE) {
            fprintf(stderr, "moe-ep %s: warning: %s\n", cmd, moe_last_error());
            st = MOE_OK;
        }
    }
    if (st != MOE_OK) rc = cli_api_fail(cmd, st);
    if ((rc = cli_agree(rc))) goto out;

    if (ep && rank == 0) {
        out_all = malloc((size_t)T * xrow + 1);
        logits_all = malloc((size_t)T * E * esz + 1);
        dx_all = malloc((size_t)T * xrow + 1);
    }
    if (ep && !backward) {
        gather_rows(out, out_all, T, xrow, rank, size);
        gather_rows(logits, logits_all, T, (size_t)E * esz, rank, size);
    } else if (!ep) {
        out_all = out;
        logits_all = logits;
        dx_all = dx;
        out = logits = dx = NULL;
    }
    if (backward) {
        /* rank 0 assembles every expert's gradient (the router's and the shared expert's are
         * the same on every rank) */
        const size_t per13 = 2 * (size_t)I * H * esz, per2 = (size_t)H * I * esz;
        if (ep) {
            gather_rows(dx, dx_all, T, xrow, rank, size);
            if (rank == 0) {
                gall = g;
                gall.w13 = malloc((size_t)E * per13 + 1);
                gall.w2 = malloc((size_t)E * per2 + 1);
            }
            gather_experts(L, g.w13, gall.w13, per13, rank, size);
            gather_experts(L, g.w2, gall.w2, per2, rank, size);
        } else {
            gall = g;
        }
    }
    if (rank == 0) {
        moe_st_writer wr;
        moe_st_writer_init(&wr);
        if (!backward) {
            moe_tensor ot = moe_tensor_view_of(dt, xshape.ndim, xshape.shape, out_all);
            int64_t ls[2] = {T, E};
            moe_tensor lt = moe_tensor_view_of(dt, 2, ls, logits_all);
            if (moe_st_writer_add(&wr, "output", &ot, &err) != MOE_OK ||
                moe_st_writer_add(&wr, "router_logits", &lt, &err) != MOE_OK ||
                moe_st_write(&wr, a.output, &err) != MOE_OK)
                rc = 1;
        } else {
            /* the gradients under the loaded names: the writer takes the canonical layout */
            const char *prefix = "";
            moe_weights like, gw;
            memset(&like, 0, sizeof like);
            memset(&gw, 0, sizeof gw);
            like.cfg = cfg;
            like.dtype = dt;
            like.expert_begin = 0;
            like.expert_count = E;
            like.naming = moe_layer_naming(L, &prefix);
            snprintf(like.prefix, sizeof like.prefix, "%s", prefix);
            void *w13c = gall.w13, *w2c = gall.w2;
            if (like.naming == MOE_NAMING_LLAMA4) {
                w13c = malloc((size_t)E * 2 * I * H * esz + 1);
                w2c = malloc((size_t)E * H * I * esz + 1);
                transpose_host(dt, E, H, 2 * I, gall.w13, w13c);
                transpose_host(dt, E, I, H, gall.w2, w2c);
            }
            int64_t sr[2] = {E, H}, s13[3] = {E, 2 * I, H}, s2[3] = {E, H, I}, ss[2] = {Is, H},
                    sd[2] = {H, Is};
            like.router = gw.router = moe_tensor_view_of(dt, 2, sr, gall.router);
            like.w13 = gw.w13 = moe_tensor_view_of(dt, 3, s13, w13c);
            like.w2 = gw.w2 = moe_tensor_view_of(dt, 3, s2, w2c);
            if (Is > 0) {
                like.shared_gate = gw.shared_gate = moe_tensor_view_of(dt, 2, ss, gall.shared_gate);
                like.shared_up = gw.shared_up = moe_tensor_view_of(dt, 2, ss, gall.shared_up);
                like.shared_down = gw.shared_down = moe_tensor_view_of(dt, 2, sd, gall.shared_down);
            }
            gw.dtype = dt;
            moe_tensor dxt = moe_tensor_view_of(dt, xshape.ndim, xshape.shape, dx_all);
            if (moe_weights_write_grads(&like, &gw, &dxt, a.output, &err) != MOE_OK) rc = 1;
            if (w13c != gall.w13) free(w13c);
            if (w2c != gall.w2) free(w2c);
        }
        moe_st_writer_free(&wr);
        if (rc) fprintf(stderr, "moe-ep %s: %s\n", cmd, err.msg);
        else if (ep)
            printf("moe-ep %s: %d tokens over %d ranks (x%d virtual, %s, transport %s) -> %s\n", cmd,
                   T, size, in.virtual_ranks, in.device_name, in.transport, a.output);
        else
            printf("moe-ep %s: %d tokens -> %s (%s) on %s\n", cmd, T, a.output,
                   backward ? "grad.hidden_states and weight gradients" : "output, router_logits",
                   in.device_name);
    }
    if (ep && la.stats) cli_print_ep_stats(L, rank, size);
    rc = cli_agree(rc);
out:
    moe_layer_destroy(L);
    moe_ep_comm_destroy(comm);
    free(owner);
    if (ep) {
        free(x);
        free(dout);
        if (rank == 0) {
            free(gall.w13);
            free(gall.w2);
        }
    }
    free(x_all);
    free(g_all);
    free(out);
    free(logits);
    free(out_all);
    free(logits_all);
    free(dx);
    free(dx_all);
    free(g.router);
    free(g.w13);
    free(g.w2);
    free(g.shared_gate);
    free(g.shared_up);
    free(g.shared_down);
    return ep ? cli_mpi_end(rc) : rc;
}

int cli_forward(int argc, char **argv) { return run("forward", argc, argv, false); }
int cli_backward(int argc, char **argv) { return run("backward", argc, argv, true); }
