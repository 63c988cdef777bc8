/* cli_run.c — `moe-ep forward` and `moe-ep backward`: one MoE block on a safetensors input, the
 * scriptable unit of inference and the hook for checking against HuggingFace / autograd. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "block_state.h"
#include "cli.h"
#include "cli_ep.h"
#include "cli_opts.h"
#include "config.h"
#include "dtype.h"
#include "engine.h"
#include "safetensors.h"
#include "weights.h"

typedef struct run_args {
    const char *config, *weights, *input, *output, *grad_output, *dtype_s, *backend_s;
    int layer, threads;
} run_args;

/* Read a [T,H] or [B,S,H] tensor `name` of file `path`, converted to dt: returns T and the
 * original shape (for writing outputs shaped like the input). */
moe_status cli_read_rows(const char *path, const char *name, int H, moe_dtype dt,
                            void **out, int *T, moe_tensor *shape_of, moe_error *err)
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

static int run(const char *cmd, int argc, char **argv, bool backward)
{
    run_args a = {.backend_s = "auto", .layer = -1};
    const char *kcfg = NULL, *tcache = NULL;
    bool autotune = false, exact_hf = false;
    cli_ep_args ep;
    cli_ep_args_init(&ep);
    cli_opt opts[] = {
        {"config", OPT_STRING, "PRESET|config.json", "model preset or HF config.json (required)", .str = &a.config},
        {"weights", OPT_STRING, "W.safetensors", "weights: a .safetensors file or model.safetensors.index.json (required)", .str = &a.weights},
        {"layer", OPT_INT, "N", "decoder layer N of a full checkpoint (default: the block's own names)", .i = &a.layer, .min = 0},
        {"input", OPT_STRING, "X.safetensors", "file holding hidden_states [T,H] or [B,S,H] (required)", .str = &a.input},
        {"output", OPT_STRING, "Y.safetensors", backward ? "file to write grad.hidden_states and grad.<weight> into (required)" : "file to write output and router_logits into (required)", .str = &a.output},
        {"backend", OPT_STRING, "cpu|cuda|auto", "where to run (default auto: cuda when a GPU is usable)", .str = &a.backend_s},
        {"dtype", OPT_STRING, "bf16|fp16|fp32", "compute dtype (default: the config's dtype)", .str = &a.dtype_s},
        {"threads", OPT_INT, "N", "CPU threads (default: all cores, or OMP_NUM_THREADS)", .i = &a.threads, .min = 0},
        {"kernel-config", OPT_STRING, "CFG", "CUDA, single-rank runs: force every grouped GEMM to CFG (e.g. 128x128x64,w8,s3 or 128x256x64,w12,s3,tma,staged; syntax: docs/KERNELS.md; default auto)", .str = &kcfg},
        {"autotune", OPT_FLAG, NULL, "CUDA, single-rank runs: time the compiled GEMM configs on the real shapes and use the fastest (cached)", .flag = &autotune},
        {"autotune-cache", OPT_STRING, "PATH", "autotune cache file (default $MOE_AUTOTUNE_CACHE or ~/.cache/moe-ep/autotune.json)", .str = &tcache},
        {"exact-hf-rounding", OPT_FLAG, NULL, "CUDA, single-rank runs: round where HF does in the Hopper grouped GEMMs (x*score rounded before GEMM1, IEEE SiLU) instead of the faster defaults (docs/KERNELS.md); the CPU backend always does", .flag = &exact_hf},
        CLI_EP_OPTIONS(ep),
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
          "loaded shape (per-expert weights give per-expert gradients)."
        : "Runs one MoE block on hidden_states and writes `output` (shaped like the input, in the\n"
          "compute dtype) and `router_logits` [T,E] (the router's pre-activation output).";
    int rc = cli_parse(cmd, syn, desc, opts, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    const char *req[] = {"config", "weights", "input", "output", backward ? "grad-output" : NULL};
    for (size_t i = 0; i < sizeof req / sizeof req[0]; i++)
        if (req[i] && (rc = cli_require(cmd, opts, req[i]))) return rc;
    if (a.threads > 0) omp_set_num_threads(a.threads);
    if (cli_ep_wanted(&ep)) {
        if ((rc = cli_ep_reject_plain_only(cmd, 0, kcfg, autotune, tcache, exact_hf))) return rc;
        if (backward) {
            fprintf(stderr, "moe-ep backward: expert-parallel backward is available through the library "
                            "(moe_ep_backward) and `moe-ep check --backward` under mpirun; the backward "
                            "command itself runs on one rank\n");
            return 2;
        }
        return cli_ep_forward(a.config, a.weights, a.layer, a.input, a.output, a.dtype_s, a.backend_s, &ep);
    }

    moe_error err = {0};
    moe_config cfg;
    if (moe_config_resolve(a.config, &cfg, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep %s: --config: %s\n", cmd, err.msg);
        return 2;
    }
    moe_dtype dt = cfg.dtype;
    if (a.dtype_s && (!moe_dtype_parse(a.dtype_s, &dt) || dt == MOE_DTYPE_F64)) {
        fprintf(stderr, "moe-ep %s: --dtype expects bf16, fp16 or fp32, got '%s'\n", cmd, a.dtype_s);
        return 2;
    }
    moe_backend backend;
    if (!cli_parse_backend(a.backend_s, &backend)) {
        fprintf(stderr, "moe-ep %s: --backend expects cpu, cuda or auto, got '%s'\n", cmd, a.backend_s);
        return 2;
    }

    int status = 1;
    moe_weights w = {0}, grads = {0};
    moe_engine *eng = NULL;
    moe_fwd_state st;
    memset(&st, 0, sizeof st);
    void *x = NULL, *dout = NULL, *dx = NULL;
    moe_tensor xshape, gshape;
    int T = 0, Tg = 0;
    const int H = cfg.hidden, E = cfg.num_experts;

    if (moe_weights_load(&cfg, a.weights, a.layer, 0, E, dt, &w, &err) != MOE_OK) goto fail;
    if (cli_read_rows(a.input, "hidden_states", H, dt, &x, &T, &xshape, &err) != MOE_OK) goto fail;
    if (backward) {
        if (cli_read_rows(a.grad_output, "grad_output", H, dt, &dout, &Tg, &gshape, &err) != MOE_OK) goto fail;
        if (Tg != T) {
            moe_fail(&err, MOE_ERR_FORMAT, "%s: grad_output has %d rows but hidden_states has %d",
                     a.grad_output, Tg, T);
            goto fail;
        }
    }
    if (moe_engine_create(backend, &w, dt, T, &eng, &err) != MOE_OK) goto fail;
    {
        moe_engine_options eo = {.kernel_config = kcfg, .autotune = autotune, .autotune_cache = tcache,
                                 .exact_hf_rounding = exact_hf};
        if (moe_engine_configure(eng, &eo, &err) != MOE_OK) goto fail;
    }
    if (moe_fwd_state_alloc(&cfg, dt, T, backward, &st, &err) != MOE_OK) goto fail;
    if (moe_engine_forward(eng, T, x, &st, &err) != MOE_OK) goto fail;

    moe_st_writer wr;
    moe_st_writer_init(&wr);
    moe_tensor out_t = moe_tensor_view_of(dt, xshape.ndim, xshape.shape, st.out);
    int64_t lshape[2] = {T, E};
    moe_tensor logits_t = moe_tensor_view_of(dt, 2, lshape, st.router_logits);
    if (!backward) {
        if (moe_st_writer_add(&wr, "output", &out_t, &err) != MOE_OK ||
            moe_st_writer_add(&wr, "router_logits", &logits_t, &err) != MOE_OK ||
            moe_st_write(&wr, a.output, &err) != MOE_OK) {
            moe_st_writer_free(&wr);
            goto fail;
        }
        moe_st_writer_free(&wr);
        printf("moe-ep forward: %d tokens -> %s (output, router_logits) on %s\n", T, a.output,
               moe_engine_describe(eng));
    } else {
        moe_st_writer_free(&wr);
        dx = moe_malloc((size_t)T * H * moe_dtype_size(dt) + 1, "grad hidden_states", &err);
        if (!dx) goto fail;
        if (moe_weights_zeros_like(&w, dt, &grads, &err) != MOE_OK) goto fail;
        if (moe_engine_backward(eng, T, x, &st, dout, dx, &grads, &err) != MOE_OK) goto fail;
        moe_tensor dx_t = moe_tensor_view_of(dt, xshape.ndim, xshape.shape, dx);
        if (moe_weights_write_grads(&w, &grads, &dx_t, a.output, &err) != MOE_OK) goto fail;
        printf("moe-ep backward: %d tokens -> %s (grad.hidden_states and weight gradients) on %s\n",
               T, a.output, moe_engine_describe(eng));
    }
    status = 0;
    goto out;
fail:
    fprintf(stderr, "moe-ep %s: %s\n", cmd, err.msg);
    status = 1;
out:
    moe_fwd_state_free(&st);
    moe_engine_destroy(eng);
    moe_weights_free(&w);
    moe_weights_free(&grads);
    free(x); free(dout); free(dx);
    return status;
}

int cli_forward(int argc, char **argv) { return run("forward", argc, argv, false); }
int cli_backward(int argc, char **argv) { return run("backward", argc, argv, true); }
