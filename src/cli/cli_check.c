/* cli_check.c — `moe-ep check`: the correctness mode. Random weights and inputs from the
 * counter-based generator, one run of the fused path (CPU twin or CUDA) with every intermediate
 * kept, then each named stage against the reference (check.h). Exit 0 only if all pass. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "block_state.h"
#include "check.h"
#include "cli.h"
#include "cli_ep.h"
#include "cli_opts.h"
#include "config.h"
#include "dtype.h"
#include "engine.h"
#include "rng.h"
#include "weights.h"

static const char *arch_name(moe_arch a) { return a == MOE_ARCH_QWEN3 ? "Qwen3-MoE" : "Llama-4 MoE"; }

int cli_check(int argc, char **argv)
{
    const char *model = NULL, *dtype_s = NULL, *backend_s = "auto";
    int tokens = 64, sample = 0, threads = 0;
    uint64_t seed = 1;
    bool backward = false;
    const char *kcfg = NULL, *tcache = NULL;
    bool autotune = false, exact_hf = false;
    cli_ep_args ep;
    cli_ep_args_init(&ep);
    cli_opt opts[] = {
        {"model", OPT_STRING, "PRESET|config.json", "preset (qwen3-30b-a3b, llama4-scout, tiny-qwen3, tiny-llama4) or an HF config.json (required)", .str = &model},
        {"tokens", OPT_INT, "T", "number of tokens (default 64)", .i = &tokens, .min = 1},
        {"dtype", OPT_STRING, "bf16|fp16|fp32", "activation and weight dtype (default: the config's dtype)", .str = &dtype_s},
        {"backend", OPT_STRING, "cpu|cuda|auto", "where the fused path runs (default auto: cuda when a GPU is usable)", .str = &backend_s},
        {"seed", OPT_U64, "S", "generator seed for weights and inputs (default 1)", .u64 = &seed},
        {"backward", OPT_FLAG, NULL, "also check the backward pass (dX, router and expert gradients)", .flag = &backward},
        {"sample", OPT_INT, "N", "verify N random tokens / rows / experts instead of all (default 0 = all; single-rank runs only)", .i = &sample, .min = 0},
        {"threads", OPT_INT, "N", "CPU threads (default: all cores, or OMP_NUM_THREADS)", .i = &threads, .min = 0},
        {"kernel-config", OPT_STRING, "CFG", "CUDA, single-rank runs: force every grouped GEMM to CFG (e.g. 128x128x64,w8,s3 or 128x256x64,w12,s3,tma,staged; syntax: docs/KERNELS.md; default auto)", .str = &kcfg},
        {"autotune", OPT_FLAG, NULL, "CUDA, single-rank runs: time the compiled GEMM configs on the real shapes and use the fastest (cached)", .flag = &autotune},
        {"autotune-cache", OPT_STRING, "PATH", "autotune cache file (default $MOE_AUTOTUNE_CACHE or ~/.cache/moe-ep/autotune.json)", .str = &tcache},
        {"exact-hf-rounding", OPT_FLAG, NULL, "CUDA, single-rank runs: round where HF does in the Hopper grouped GEMMs (x*score rounded before GEMM1, IEEE SiLU) instead of the faster defaults (docs/KERNELS.md); the CPU backend always does", .flag = &exact_hf},
        CLI_EP_OPTIONS(ep),
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
    if (threads > 0) omp_set_num_threads(threads);
    if (cli_ep_wanted(&ep)) {
        if ((rc = cli_ep_reject_plain_only("check", sample, kcfg, autotune, tcache, exact_hf))) return rc;
        return cli_ep_check(model, tokens, dtype_s, backend_s, seed, backward, &ep);
    }

    moe_error err = {0};
    moe_config cfg;
    if (moe_config_resolve(model, &cfg, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep check: --model: %s\n", err.msg);
        return 2;
    }
    moe_dtype dt = cfg.dtype;
    if (dtype_s && (!moe_dtype_parse(dtype_s, &dt) || dt == MOE_DTYPE_F64)) {
        fprintf(stderr, "moe-ep check: --dtype expects bf16, fp16 or fp32, got '%s'\n", dtype_s);
        return 2;
    }
    moe_backend backend;
    if (!cli_parse_backend(backend_s, &backend)) {
        fprintf(stderr, "moe-ep check: --backend expects cpu, cuda or auto, got '%s'\n", backend_s);
        return 2;
    }

    int status = 1;
    moe_weights w = {0}, grads = {0};
    moe_engine *eng = NULL;
    moe_fwd_state st;
    memset(&st, 0, sizeof st);
    void *x = NULL, *dout = NULL, *dx = NULL;
    const int T = tokens, H = cfg.hidden;
    const size_t esz = moe_dtype_size(dt);

    printf("moe-ep check: %s (%s) H=%d I=%d E=%d k=%d%s%s, T=%d, dtype %s, seed %llu%s\n",
           cfg.name, arch_name(cfg.arch), cfg.hidden, cfg.inter, cfg.num_experts, cfg.top_k,
           cfg.arch == MOE_ARCH_QWEN3 ? (cfg.norm_topk_prob ? ", norm_topk_prob" : ", no renorm") : "",
           cfg.shared_inter ? ", shared expert" : "", T, moe_dtype_name(dt),
           (unsigned long long)seed, sample ? "" : ", every element verified");
    if (sample) printf("moe-ep check: --sample %d: verifying %d random tokens / rows / experts per stage\n", sample, sample);
    fflush(stdout);

    double t0 = moe_now();
    if (moe_weights_random(&cfg, seed, 0, cfg.num_experts, dt, &w, &err) != MOE_OK) goto fail;
    x = moe_malloc((size_t)T * H * esz, "hidden_states", &err);
    if (!x) goto fail;
    moe_fill_normal(dt, x, (size_t)T * H, seed, "hidden_states", 0, 1.0);
    if (moe_engine_create(backend, &w, dt, T, &eng, &err) != MOE_OK) goto fail;
    {
        moe_engine_options eo = {.kernel_config = kcfg, .autotune = autotune, .autotune_cache = tcache,
                                 .exact_hf_rounding = exact_hf};
        if (moe_engine_configure(eng, &eo, &err) != MOE_OK) goto fail;
    }
    if (moe_fwd_state_alloc(&cfg, dt, T, true, &st, &err) != MOE_OK) goto fail;
    moe_fwd_state_poison(&cfg, dt, &st);
    printf("moe-ep check: backend %s; weights generated in %.1f s\n", moe_engine_describe(eng), moe_now() - t0);
    fflush(stdout);

    double t1 = moe_now();
    if (moe_engine_forward(eng, T, x, &st, &err) != MOE_OK) goto fail;
    double t_fwd = moe_now() - t1;
    if (backward) {
        dout = moe_malloc((size_t)T * H * esz, "grad_output", &err);
        dx = moe_malloc((size_t)T * H * esz, "grad hidden_states", &err);
        if (!dout || !dx) goto fail;
        moe_fill_normal(dt, dout, (size_t)T * H, seed, "grad_output", 0, 1.0);
        for (size_t i = 0; i < (size_t)T * H; i++) moe_store_elem(dt, dx, i, 0.0 / 0.0);
        if (moe_weights_zeros_like(&w, dt, &grads, &err) != MOE_OK) goto fail;
        /* poison the gradients: every element must be written (zeros for idle experts too) */
        moe_tensor *gt[] = {&grads.router, &grads.w13, &grads.w2, &grads.shared_gate, &grads.shared_up, &grads.shared_down};
        for (size_t i = 0; i < sizeof gt / sizeof gt[0]; i++)
            if (gt[i]->data) moe_tensor_poison(gt[i]);
        t1 = moe_now();
        if (moe_engine_backward(eng, T, x, &st, dout, dx, &grads, &err) != MOE_OK) goto fail;
    }
    double t_bwd = backward ? moe_now() - t1 : 0;
    char ks[1024];
    moe_engine_kernel_summary(eng, ks, sizeof ks);
    if (ks[0]) printf("moe-ep check: kernels: %s\n", ks);
    printf("moe-ep check: fused forward %.3f s%s", t_fwd, backward ? "" : "\n");
    if (backward) printf(", backward %.3f s\n", t_bwd);
    fflush(stdout);

    moe_check_options co = {.sample = sample, .seed = seed, .backward = backward};
    moe_check_report rep;
    moe_check_report_init(&rep);
    t1 = moe_now();
    if (moe_check_forward(&w, dt, T, x, &st, &co, &rep, &err) != MOE_OK) goto fail;
    if (backward && moe_check_backward(&w, dt, T, x, &st, dout, dx, &grads, &co, &rep, &err) != MOE_OK)
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
    moe_engine_destroy(eng);
    moe_weights_free(&w);
    moe_weights_free(&grads);
    free(x); free(dout); free(dx);
    return status;
}
