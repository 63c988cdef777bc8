/* cli_check.c — `moe-ep check`: the correctness mode. Random weights and inputs from the
 * counter-based generator, one run of the layer (CPU twin or CUDA) with every intermediate
 * kept, then each named stage against the reference (check.h). Exit 0 only if all pass. Under
 * mpirun (or with an EP option) cli_check_ep.c compares the expert-parallel layer with the
 * single-rank one instead. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block_state.h"
#include "check.h"
#include "cli.h"
#include "cli_check.h"
#include "cli_layer.h"
#include "cli_opts.h"
#include "config.h"
#include "dtype.h"
#include "layer/layer.h"
#include "rng.h"
#include "weights.h"

double cli_check_token_bytes(const moe_config *cfg, moe_dtype dt, int64_t T, bool backward)
{
    const double d = (double)moe_dtype_size(dt), H = cfg->hidden, E = cfg->num_experts;
    const double k = cfg->top_k, I = cfg->inter, Is = cfg->shared_inter;
    const double passes = backward ? 2 : 1;
    const double io = (4 * H + E) * d;                                  /* x, dout, dx, out, logits */
    const double stages = k * (3 * I + H) * d + 2 * k * (4 + d);        /* kept intermediates */
    const double scratch = passes * (E * d + k * (4 + d) + k * (H + 3 * I) * d + (H + 3 * Is) * d);
    const double ref = passes * (E + 4 * H + k * (3 * I + H) + 3 * Is) * 8; /* doubles */
    return (double)T * (io + stages + scratch + ref);
}

static const char *arch_name(moe_arch a) { return a == MOE_ARCH_QWEN3 ? "Qwen3-MoE" : "Llama-4 MoE"; }

int cli_check(int argc, char **argv)
{
    cli_check_args c = {.tokens = 64, .seed = 1};
    cli_layer_args la;
    cli_layer_args_init(&la);
    cli_opt opts[] = {
        {"model", OPT_STRING, "PRESET|config.json", "preset (qwen3-30b-a3b, llama4-scout, tiny-qwen3, tiny-llama4) or an HF config.json (required)", .str = &c.model},
        {"tokens", OPT_INT, "T", "number of tokens (default 64; with EP the global batch, spread over the ranks)", .i = &c.tokens, .min = 1},
        {"seed", OPT_U64, "S", "generator seed for weights and inputs (default 1)", .u64 = &c.seed},
        {"backward", OPT_FLAG, NULL, "also check the backward pass (dX, router and expert gradients)", .flag = &c.backward},
        {"sample", OPT_INT, "N", "verify N random tokens / rows / experts instead of all (default 0 = all; single-rank runs only)", .i = &c.sample, .min = 0},
        CLI_LAYER_OPTIONS(la),
        CLI_EP_OPTIONS(la),
        {0},
    };
    const char *syn = "--model PRESET|config.json [--tokens T] [--dtype D] [--backend B] [--seed S] [--backward] [--sample N]";
    const char *desc =
        "Runs the fused path and the independent HuggingFace-order reference on the same generated\n"
        "weights and inputs and prints every named stage (router logits, routing, counts, gather\n"
        "indices, GEMM1, activation, GEMM2, output; with --backward the input, router and per-expert\n"
        "gradients) with its relative error, worst row and tolerance. Exits 1 if any stage fails.\n"
        "Under mpirun with several ranks (or with an EP option) the layer runs expert-parallel and\n"
        "each rank compares its tokens' output and gradients with the single-rank fused path.";
    int rc = cli_parse("check", syn, desc, opts, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if ((rc = cli_require("check", opts, "model"))) return rc;
    if (cli_ep_wanted(&la)) {
        if (c.sample > 0) {
            fprintf(stderr, "moe-ep check: --sample applies to single-rank runs only; the "
                            "expert-parallel check compares every row\n");
            return 2;
        }
        return cli_check_ep(&c, &la);
    }

    moe_error err = {0};
    moe_config cfg;
    if (moe_config_resolve(c.model, &cfg, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep check: --model: %s\n", err.msg);
        return 2;
    }
    moe_layer_options lo;
    moe_dtype dt;
    if ((rc = cli_layer_options("check", &la, &cfg, &lo, &dt))) return rc;

    /* a huge --tokens is refused before anything is allocated */
    if ((rc = cli_host_memory_check("check", "--tokens", c.tokens, "the check's tensors for that many tokens",
                                    cli_check_token_bytes(&cfg, dt, c.tokens, c.backward))))
        return rc;

    int status = 1;
    moe_weights w = {0}, grads = {0};
    const moe_weights *wref = &w; /* the reference's weights */
    moe_layer *L = NULL;
    moe_fwd_state st;
    memset(&st, 0, sizeof st);
    void *x = NULL, *dout = NULL, *dx = NULL;
    const int T = c.tokens, H = cfg.hidden;
    const size_t esz = moe_dtype_size(dt);

    printf("moe-ep check: %s (%s) H=%d I=%d E=%d k=%d%s%s, T=%d, dtype %s, seed %llu%s\n",
           cfg.name, arch_name(cfg.arch), cfg.hidden, cfg.inter, cfg.num_experts, cfg.top_k,
           cfg.arch == MOE_ARCH_QWEN3 ? (cfg.norm_topk_prob ? ", norm_topk_prob" : ", no renorm") : "",
           cfg.shared_inter ? ", shared expert" : "", T, moe_dtype_name(dt),
           (unsigned long long)c.seed, c.sample ? "" : ", every element verified");
    if (c.sample)
        printf("moe-ep check: --sample %d: verifying %d random tokens / rows / experts per stage\n",
               c.sample, c.sample);
    fflush(stdout);

    double t0 = moe_now();
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_RANDOM;
    src.seed = c.seed;
    lo.max_tokens = T;
    moe_status s = moe_layer_create(c.model, &src, &lo, &L);
    if (s != MOE_OK) {
        status = cli_api_fail("check", s);
        goto out;
    }
    moe_layer_info info = MOE_LAYER_INFO_INIT;
    moe_layer_info_get(L, &info);
    /* the reference's weights: on the CPU the layer's own resident copy (all E experts, drawn
     * from the seed), so a full-size check holds and draws them once; a CUDA layer keeps none
     * on the host, so they are drawn again from the same seed */
    if (info.backend == MOE_BACKEND_CPU && !L->borrowed && L->host.router.data &&
        L->host.expert_begin == 0 && L->host.expert_count == cfg.num_experts && L->host.dtype == dt)
        wref = &L->host;
    else if (moe_weights_random(&cfg, c.seed, 0, cfg.num_experts, dt, &w, &err) != MOE_OK)
        goto fail;
    x = moe_malloc((size_t)T * H * esz, "hidden_states", &err);
    if (!x) goto fail;
    moe_fill_normal(dt, x, (size_t)T * H, c.seed, "hidden_states", 0, 1.0);
    if (moe_fwd_state_alloc(&cfg, dt, T, true, &st, &err) != MOE_OK) goto fail;
    moe_fwd_state_poison(&cfg, dt, &st);
    printf("moe-ep check: backend %s%s; weights generated in %.1f s\n",
           info.backend == MOE_BACKEND_CPU ? "" : "cuda: ", info.device_name, moe_now() - t0);
    fflush(stdout);

    double t1 = moe_now();
    if (moe_layer_forward_stages(L, T, x, &st, &err) != MOE_OK) goto fail;
    double t_fwd = moe_now() - t1;
    if (c.backward) {
        dout = moe_malloc((size_t)T * H * esz, "grad_output", &err);
        dx = moe_malloc((size_t)T * H * esz, "grad hidden_states", &err);
        if (!dout || !dx) goto fail;
        moe_fill_normal(dt, dout, (size_t)T * H, c.seed, "grad_output", 0, 1.0);
        for (size_t i = 0; i < (size_t)T * H; i++) moe_store_elem(dt, dx, i, 0.0 / 0.0);
        if (moe_weights_zeros_like(wref, dt, &grads, &err) != MOE_OK) goto fail;
        /* poison the gradients: every element must be written (zeros for idle experts too) */
        moe_tensor *gt[] = {&grads.router, &grads.w13, &grads.w2, &grads.shared_gate, &grads.shared_up, &grads.shared_down};
        for (size_t i = 0; i < sizeof gt / sizeof gt[0]; i++)
            if (gt[i]->data) moe_tensor_poison(gt[i]);
        moe_layer_grads g = {grads.router.data, grads.w13.data, grads.w2.data,
                             grads.shared_gate.data, grads.shared_up.data, grads.shared_down.data};
        moe_tensor_view vx = {dt, 2, {T, H}, x}, vd = {dt, 2, {T, H}, dout}, vdx = {dt, 2, {T, H}, dx};
        t1 = moe_now();
        s = moe_layer_backward(L, &vx, &vd, NULL, &vdx, &g);
        if (s != MOE_OK) {
            status = cli_api_fail("check", s);
            goto out;
        }
    }
    double t_bwd = c.backward ? moe_now() - t1 : 0;
    char ks[1024];
    cli_kernel_summary(L, ks, sizeof ks);
    if (ks[0]) printf("moe-ep check: kernels: %s\n", ks);
    printf("moe-ep check: fused forward %.3f s%s", t_fwd, c.backward ? "" : "\n");
    if (c.backward) printf(", backward %.3f s\n", t_bwd);
    fflush(stdout);

    moe_check_options co = {.sample = c.sample, .seed = c.seed, .backward = c.backward};
    moe_check_report rep;
    moe_check_report_init(&rep);
    t1 = moe_now();
    if (moe_check_forward(wref, dt, T, x, &st, &co, &rep, &err) != MOE_OK) goto fail;
    if (c.backward && moe_check_backward(wref, dt, T, x, &st, dout, dx, &grads, &co, &rep, &err) != MOE_OK)
        goto fail;
    printf("moe-ep check: reference and comparisons %.1f s\n\n", moe_now() - t1);
    moe_check_print(&rep, stdout);
    status = rep.all_pass ? 0 : 1;
    goto out;

fail:
    fprintf(stderr, "moe-ep check: %s (%s)\n", err.msg, moe_strerror(err.status));
    status = err.status == MOE_ERR_INVALID_ARG ? 2 : 1;
out:
    moe_fwd_state_free(&st);
    moe_layer_destroy(L);
    moe_weights_free(&w);
    moe_weights_free(&grads);
    free(x);
    free(dout);
    free(dx);
    return status;
}
