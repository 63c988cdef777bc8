/* layer.c — creating and destroying a layer (moe_ep.h): the config, the placement of its
 * experts, the weights from their source placed once on the backend, the workspace, the EP
 * state, and the fingerprint every rank agrees on; its info and statistics. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <omp.h>

#include "../config.h"
#include "../hash.h"
#include "../ep/ep.h"
#include "../ep/ep_driver.h"
#include "layer_internal.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

moe_status layer_check(const moe_layer *L, const char *fn, moe_error *err)
{
    if (!L || L->magic != MOE_LAYER_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: layer is NULL, destroyed or not a layer",
                        fn);
    return MOE_OK;
}

/* ------------------------------------------------------------------ options ---- */

static moe_status check_opts(const moe_layer_options *o, moe_error *err)
{
    if (o->size < sizeof *o || o->magic != MOE_LAYER_OPTIONS_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: options not initialised with MOE_LAYER_OPTIONS_INIT "
                        "(size %u, magic 0x%08x)", o->size, o->magic);
    if (o->backend != MOE_BACKEND_CPU && o->backend != MOE_BACKEND_CUDA &&
        o->backend != MOE_BACKEND_AUTO)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: backend %d: expected MOE_BACKEND_CPU, _CUDA or _AUTO",
                        (int)o->backend);
    if (o->dtype != MOE_DTYPE_BF16 && o->dtype != MOE_DTYPE_F16 && o->dtype != MOE_DTYPE_F32 &&
        o->dtype != MOE_NUM_DTYPES)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: dtype %d: expected bf16, fp16, fp32 or MOE_NUM_DTYPES "
                        "(the config's)", (int)o->dtype);
    if (o->max_tokens < 0 || o->max_tokens > INT_MAX)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: max_tokens %lld: expected 0 (none) .. %d",
                        (long long)o->max_tokens, INT_MAX);
    if (o->threads < 0 || o->threads > 4096)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: threads %d: expected 0 (default) .. 4096", o->threads);
    if (o->device < -1)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: device %d: expected -1 (automatic) or a CUDA ordinal",
                        o->device);
    if (o->comm && o->comm->magic != MOE_EP_COMM_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: comm is not an EP communicator (or was destroyed)");
    if (o->workspace && !moe_ws_valid(o->workspace))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: workspace is not a workspace (or was destroyed)");
    return MOE_OK;
}

static moe_status check_source(const moe_weights_source *s, moe_error *err)
{
    if (!s)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_create: weights source is NULL");
    if (s->size < sizeof *s || s->magic != MOE_WEIGHTS_SOURCE_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_create: weights source not initialised with "
                        "MOE_WEIGHTS_SOURCE_INIT (size %u, magic 0x%08x)", s->size, s->magic);
    switch (s->kind) {
    case MOE_WEIGHTS_FILE:
        if (!s->path || !*s->path)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "moe_layer_create: MOE_WEIGHTS_FILE needs a path");
        if (s->layer < -1)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "moe_layer_create: layer %d: expected -1 (the block's own names) or "
                            "a decoder layer index >= 0", s->layer);
        return MOE_OK;
    case MOE_WEIGHTS_RANDOM: return MOE_OK;
    case MOE_WEIGHTS_TENSORS:
        if (!s->tensors || s->num_tensors < 1)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "moe_layer_create: MOE_WEIGHTS_TENSORS needs tensors and "
                            "num_tensors >= 1");
        /* checked before borrowing, which would otherwise call it an unsupported layout */
        if ((int)s->layout < MOE_LAYOUT_CANONICAL || s->layout > MOE_LAYOUT_LLAMA4)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "moe_layer_create: layout %d: expected MOE_LAYOUT_CANONICAL, "
                            "_QWEN3_HUB, _QWEN3_FUSED or _LLAMA4", (int)s->layout);
        return MOE_OK;
    }
    return moe_fail(err, MOE_ERR_INVALID_ARG,
                    "moe_layer_create: weights kind %d: expected MOE_WEIGHTS_FILE, _RANDOM or "
                    "_TENSORS", (int)s->kind);
}

/* ------------------------------------------------------------------ resources ---- */

static moe_status pick_backend(moe_layer *L, const moe_layer_options *o, moe_error *err)
{
    moe_backend b = o->backend;
    const int ndev = moe_gpu_count();
    if (b == MOE_BACKEND_AUTO) b = ndev > 0 ? MOE_BACKEND_CUDA : MOE_BACKEND_CPU;
    L->backend = b;
    L->device = -1;
    if (b == MOE_BACKEND_CPU) {
        L->ops = &moe_cpu_backend_ops;
        return MOE_OK;
    }
#ifndef MOE_HAVE_CUDA
    return moe_fail(err, MOE_ERR_NO_DEVICE,
                    "the CUDA backend was requested but this build has none (configure with the "
                    "CUDA toolkit); use the CPU backend");
#else
    if (ndev == 0)
        return moe_fail(err, MOE_ERR_NO_DEVICE,
                        "the CUDA backend was requested but no GPU is usable; use the CPU "
                        "backend");
    int dev = o->device;
    if (dev < 0) {
        /* one GPU per rank by node-local rank; ranks beyond the GPU count share them */
        if (o->comm) dev = o->comm->local_rank % ndev;
        else if (cudaGetDevice(&dev) != cudaSuccess) dev = 0;
    }
    if (dev >= ndev)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "device %d: this machine has %d GPU(s)", dev,
                        ndev);
    L->device = dev;
    L->ops = &moe_cuda_backend_ops;
    return MOE_OK;
#endif
}

/* Bytes a forward of T tokens needs in scratch on this rank (an estimate from above). */
static double scratch_bytes(const moe_layer *L, const moe_ep_comm *c, int64_t T)
{
    const double d = (double)L->dsz, H = L->H, I = L->I, E = L->E, k = L->k, Is = L->Is;
    double b = (double)T * (E * d + k * (4 + d) + k * (H + 3 * I) * d + (H + 3 * Is) * d);
    if (c && (c->nranks > 1 || c->opts.virtual_ranks > 1)) {
        /* every destination's slot on both sides, and the rows one rank computes */
        const double G = (double)c->nranks * c->opts.virtual_ranks;
        const double row = 2 * H * d + k * (4 + d);
        b += 2 * G * (double)T * row + G * (double)T * k * (H + 3 * I) * d;
    }
    return b;
}

static moe_status check_memory(const moe_layer *L, const moe_ep_comm *c, moe_error *err)
{
    const int64_t M = c ? c->opts.max_tokens_per_rank : 0;
    const int64_t T = L->max_tokens > M ? L->max_tokens : M;
    if (T == 0) return MOE_OK;
    const char *opt = M >= L->max_tokens && M > 0 ? "--max-tokens-per-rank" : "max_tokens";
    if ((int64_t)T * L->k > INT32_MAX)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s %lld: times top-k %d exceeds the 32-bit row indices of the kernels; "
                        "at most %lld", opt, (long long)T, L->k, (long long)(INT32_MAX / L->k));
    double need = scratch_bytes(L, c, T), avail = 0;
    if (L->backend == MOE_BACKEND_CPU) {
        long pages = sysconf(_SC_AVPHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        avail = pages > 0 && psz > 0 ? (double)pages * psz : 0;
    }
#ifdef MOE_HAVE_CUDA
    else {
        size_t fr = 0, tot = 0;
        int prev = -1;
        cudaGetDevice(&prev);
        cudaSetDevice(L->device);
        if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) avail = (double)fr;
        else cudaGetLastError();
        if (prev >= 0) cudaSetDevice(prev);
    }
#endif
    if (avail > 0 && need > avail)
        return moe_fail(err, MOE_ERR_NOMEM,
                        "%s %lld: buffers for that many tokens need about %.1f GiB on this rank "
                        "but %.1f GiB is free on the %s; lower %s", opt, (long long)T,
                        need / (1 << 30), avail / (1 << 30),
                        L->backend == MOE_BACKEND_CPU ? "host" : "GPU", opt);
    return MOE_OK;
}

/* The weights of this rank's experts from the source, into L->host (or borrowed). */
static moe_status load_weights(moe_layer *L, const moe_weights_source *s, moe_error *err)
{
    const int32_t *ids = L->map.local_ids;
    const int El = L->map.El;
    L->layout = MOE_LAYOUT_CANONICAL;
    switch (s->kind) {
    case MOE_WEIGHTS_FILE:
        MOE_TRY(moe_weights_load_ids(&L->cfg, s->path, s->layer, ids, El, L->dt, &L->host, err));
        L->weight_bytes_read = L->host.bytes_read;
        L->naming = L->host.naming;
        snprintf(L->prefix, sizeof L->prefix, "%s", L->host.prefix);
        L->layout = L->host.naming == MOE_NAMING_LLAMA4          ? MOE_LAYOUT_LLAMA4
                    : L->host.naming == MOE_NAMING_QWEN3_FUSED    ? MOE_LAYOUT_QWEN3_FUSED
                    : L->host.naming == MOE_NAMING_QWEN3_PER_EXPERT ? MOE_LAYOUT_QWEN3_HUB
                                                                    : MOE_LAYOUT_CANONICAL;
        return MOE_OK;
    case MOE_WEIGHTS_RANDOM:
        return moe_weights_random_ids(&L->cfg, s->seed, ids, El, L->dt, &L->host, err);
    case MOE_WEIGHTS_TENSORS:
        L->layout = s->layout;
        if (s->borrow) {
            MOE_TRY(layer_weights_borrow(&L->cfg, L->dt, s->layout, s->tensors, s->num_tensors,
                                         ids, El, &L->w, err));
            L->borrowed = true;
            return MOE_OK;
        }
        MOE_TRY(layer_weights_from_tensors(&L->cfg, L->dt, s->layout, s->tensors,
                                           s->num_tensors, ids, El, &L->host, err));
        L->naming = L->host.naming;
        /* kept for moe_layer_reload_weights: the views (the caller owns the memory) */
        L->src_tensors = moe_calloc((size_t)s->num_tensors, sizeof *L->src_tensors,
                                    "weight views", err);
        if (!L->src_tensors) return MOE_ERR_NOMEM;
        for (int i = 0; i < s->num_tensors; i++) {
            L->src_tensors[i] = s->tensors[i];
            L->src_tensors[i].name = s->tensors[i].name ? strdup(s->tensors[i].name) : NULL;
            if (s->tensors[i].name && !L->src_tensors[i].name) {
                L->src_count = i;
                return moe_fail(err, MOE_ERR_NOMEM, "weight names");
            }
        }
        L->src_count = s->num_tensors;
        return MOE_OK;
    }
    return MOE_ERR_INTERNAL;
}

static uint64_t replicated_hash(const moe_layer *L)
{
    uint64_t h = MOE_FNV1A_INIT;
    if (L->host.router.data) h = moe_fnv1a(h, L->host.router.data, L->host.router.nbytes);
    const moe_tensor *sh[3] = {&L->host.shared_gate, &L->host.shared_up, &L->host.shared_down};
    for (int i = 0; i < 3; i++)
        if (sh[i]->data) h = moe_fnv1a(h, sh[i]->data, sh[i]->nbytes);
    return h;
}

/* Every rank must hold the same model and options: the collectives would not match, or the
 * result would be wrong, otherwise. One agreement carries every field and the status. */
static moe_status agree_fingerprint(moe_layer *L, moe_ep_comm *c, moe_status st,
                                    moe_error *err)
{
    const moe_config *f = &L->cfg;
    int64_t v[16] = {f->arch, f->hidden, f->inter, f->num_experts, f->top_k, f->norm_topk_prob,
                     f->shared_inter, L->dt, L->backend,
                     (int64_t)(moe_expert_map_hash(&L->map) >> 1), c->opts.transport,
                     c->opts.virtual_ranks, c->opts.chunks, c->opts.max_tokens_per_rank,
                     c->opts.max_recv_tokens, (int64_t)(L->replicated_hash >> 1)};
    static const char *const names[16] = {
        "the model type (arch)", "hidden_size", "moe_intermediate_size (I)",
        "the number of experts", "top-k", "norm_topk_prob", "the shared expert's width",
        "the dtype", "the backend", "the expert map", "the transport", "--ep-virtual",
        "--chunks", "--max-tokens-per-rank", "max_recv_tokens",
        "the router and shared-expert weights (a hash of their bytes)"};
    uint64_t h = MOE_FNV1A_INIT;
    h = moe_fnv1a(h, v, sizeof v);
    L->fingerprint = h;
    return ep_agree_fields(c->comm, st, v, names, 16, err);
}

static void layer_free(moe_layer *L)
{
    if (!L) return;
    ep_state_destroy(L);
    drv_saved_free(L);
    if (L->ops && L->be) L->ops->destroy(L);
    if (L->ws) {
        moe_ws_attach(L->ws, -1);
        if (L->own_ws) moe_ws_destroy_checked(L->ws, NULL);
    }
    if (L->comm) L->comm->layers--;
    moe_expert_map_free(&L->map);
    moe_weights_free(&L->host);
    for (int i = 0; i < L->src_count; i++) free((char *)L->src_tensors[i].name);
    free(L->src_tensors);
    moe_layer_counters *c = &L->ctr;
    free(c->peer_rows_sent);
    free(c->peer_rows_recv);
    free(c->peer_bytes_sent);
    free(c->peer_bytes_recv);
    L->magic = 0;
    free(L);
}

moe_status moe_layer_create(const char *config, const moe_weights_source *src,
                            const moe_layer_options *opts, moe_layer **out)
{
    return moe_layer_create_config(config, NULL, src, opts, out);
}

moe_status moe_layer_create_config(const char *config, const moe_config *resolved,
                                   const moe_weights_source *src, const moe_layer_options *opts,
                                   moe_layer **out)
{
    moe_error *err = moe_api_begin();
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_create: layer (the output) is NULL");
    /* [out]: written only on MOE_OK (moe_ep.h) */
    moe_layer_options def = MOE_LAYER_OPTIONS_INIT;
    moe_status st = MOE_OK;
    if (opts) st = check_opts(opts, err);
    const moe_layer_options *o = st == MOE_OK && opts ? opts : &def;
    moe_ep_comm *c = o->comm;
    if (st == MOE_OK) st = check_source(src, err);
    if (st == MOE_OK && !config && !resolved)
        st = moe_fail(err, MOE_ERR_INVALID_ARG,
                      "moe_layer_create: config is NULL (a preset name or a config.json path)");
    moe_layer *L = calloc(1, sizeof *L);
    if (!L && st == MOE_OK) st = moe_fail(err, MOE_ERR_NOMEM, "moe_layer_create: no memory");
    if (L) {
        L->magic = MOE_LAYER_MAGIC;
        L->device = -1;
    }
    /* ---- local steps: a failure is agreed on with the other ranks before any collective */
    /* A resolved Llama-4 config without its shared expert (shared_inter 0: the benchmark's
     * --routed-only) is checked and its weights drawn with the shared expert (width I, as a
     * config.json gives it), which is dropped once the weights are in. */
    bool routed_only = false;
    if (st == MOE_OK && resolved) {
        L->cfg = *resolved;
        if (L->cfg.arch == MOE_ARCH_LLAMA4 && L->cfg.shared_inter == 0) {
            routed_only = true;
            L->cfg.shared_inter = L->cfg.inter;
        }
    } else if (st == MOE_OK) st = moe_config_resolve(config, &L->cfg, err);
    if (st == MOE_OK) st = moe_config_validate(&L->cfg, err);
    if (st == MOE_OK) {
        L->dt = o->dtype == MOE_NUM_DTYPES ? L->cfg.dtype : o->dtype;
        if (L->dt != MOE_DTYPE_BF16 && L->dt != MOE_DTYPE_F16 && L->dt != MOE_DTYPE_F32)
            st = moe_fail(err, MOE_ERR_UNSUPPORTED,
                          "moe_layer_create: compute dtype %s: expected bf16, fp16 or fp32",
                          moe_dtype_name(L->dt) ? moe_dtype_name(L->dt) : "?");
    }
    if (st == MOE_OK) {
        L->dsz = moe_dtype_size(L->dt);
        L->H = L->cfg.hidden;
        L->I = L->cfg.inter;
        L->E = L->cfg.num_experts;
        L->k = L->cfg.top_k;
        L->llama = L->cfg.arch == MOE_ARCH_LLAMA4;
        L->shared = L->llama && L->cfg.shared_inter > 0 && !routed_only;
        L->Is = L->shared ? L->cfg.shared_inter : 0;
        L->max_tokens = o->max_tokens;
        L->save_for_backward = o->save_for_backward != 0;
        L->timing = o->timing != 0;
        L->exact_hf = o->exact_hf_rounding != 0;
        L->autotune = o->autotune != 0;
        if (o->kernel_config) snprintf(L->kernel_config, sizeof L->kernel_config, "%s", o->kernel_config);
        if (o->autotune_cache) snprintf(L->autotune_cache, sizeof L->autotune_cache, "%s", o->autotune_cache);
        L->threads = o->threads > 0 ? o->threads : moe_default_threads();
        L->comm = c;
        const int N = c ? c->nranks : 1, V = c ? c->opts.virtual_ranks : 1;
        st = moe_expert_map_build(L->E, N, V, c ? c->rank : 0, o->expert_map, &L->map, err);
    }
    if (st == MOE_OK) st = pick_backend(L, o, err);
    if (st == MOE_OK && L->backend == MOE_BACKEND_CPU && L->kernel_config[0] &&
        strcmp(L->kernel_config, "auto") != 0)
        st = moe_fail(err, MOE_ERR_INVALID_ARG,
                      "kernel_config '%s' (--kernel-config) applies to the CUDA backend only; this "
                      "layer runs on the CPU", L->kernel_config);
    if (st == MOE_OK) st = check_memory(L, c, err);
    if (st == MOE_OK) st = load_weights(L, src, err);
    if (st == MOE_OK && routed_only) {
        moe_tensor_free(&L->host.shared_gate);
        moe_tensor_free(&L->host.shared_up);
        moe_tensor_free(&L->host.shared_down);
        L->cfg.shared_inter = 0;
        L->host.cfg.shared_inter = 0;
    }
    if (st == MOE_OK) L->replicated_hash = replicated_hash(L);
    if (st == MOE_OK) {
        if (o->workspace) {
            if (moe_ws_backend(o->workspace) != L->backend ||
                (L->backend == MOE_BACKEND_CUDA && moe_ws_device(o->workspace) != L->device))
                st = moe_fail(err, MOE_ERR_INVALID_ARG,
                              "moe_layer_create: the workspace is for %s device %d but the layer "
                              "runs on %s device %d", moe_ws_backend(o->workspace) ? "CUDA" : "CPU",
                              moe_ws_device(o->workspace), L->backend ? "CUDA" : "CPU", L->device);
            else L->ws = o->workspace;
        } else {
            moe_status ws = moe_workspace_create(L->backend, L->device, &L->ws);
            if (ws != MOE_OK) st = moe_error_prefix(err, "moe_layer_create");
            L->own_ws = ws == MOE_OK;
        }
        if (L->ws) moe_ws_attach(L->ws, +1);
    }
    if (st == MOE_OK) st = L->ops->create(L, err);
    if (st == MOE_OK) {
        L->weight_uploads = 1;
        if (L->backend == MOE_BACKEND_CUDA && !L->borrowed) {
            /* the device holds them now; the host copy was only the upload's staging */
            moe_config keep = L->host.cfg;
            moe_weights_free(&L->host);
            L->host.cfg = keep;
        }
    }
    const int N = c ? c->nranks : 1;
    if (st == MOE_OK) {
        moe_layer_counters *k = &L->ctr;
        k->peer_rows_sent = moe_calloc((size_t)N, sizeof(uint64_t), "counters", err);
        k->peer_rows_recv = moe_calloc((size_t)N, sizeof(uint64_t), "counters", err);
        k->peer_bytes_sent = moe_calloc((size_t)N, sizeof(uint64_t), "counters", err);
        k->peer_bytes_recv = moe_calloc((size_t)N, sizeof(uint64_t), "counters", err);
        if (!k->peer_rows_sent || !k->peer_rows_recv || !k->peer_bytes_sent || !k->peer_bytes_recv)
            st = MOE_ERR_NOMEM;
    }
    /* ---- collective steps */
    if (c) {
        /* counted here and released by layer_free, whichever step failed (L->comm was set
         * only once the local steps had got that far) */
        if (L) {
            c->layers++;
            L->comm = c;
        }
        if (L) st = agree_fingerprint(L, c, st, err);
        else st = ep_agree(c->comm, st, err);
        if (st == MOE_OK) st = ep_state_create(L, c, err);
    } else if (st == MOE_OK) {
        L->plain = true;
    }
    if (st != MOE_OK) {
        layer_free(L);
        return st;
    }
    *out = L;
    return MOE_OK;
}

moe_status moe_layer_destroy(moe_layer *L)
{
    moe_error *err = moe_api_begin();
    if (!L) return MOE_OK;
    MOE_TRY(layer_check(L, "moe_layer_destroy", err));
    if (L->ops) L->ops->sync(L, err);
    layer_free(L);
    moe_error_clear(err);
    return MOE_OK;
}

moe_status moe_layer_reload_weights(moe_layer *L)
{
    moe_error *err = moe_api_begin();
    MOE_TRY(layer_check(L, "moe_layer_reload_weights", err));
    if (!L->src_tensors)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_reload_weights: the layer's weights were not copied from "
                        "caller tensors (MOE_WEIGHTS_TENSORS with borrow = 0)%s",
                        L->borrowed ? "; borrowed tensors are read in place on every call" : "");
    MOE_TRY(L->ops->sync(L, err));
    moe_weights w;
    MOE_TRY(layer_weights_from_tensors(&L->cfg, L->dt, L->layout, L->src_tensors, L->src_count,
                                       L->map.local_ids, L->map.El, &w, err));
    moe_weights_free(&L->host);
    L->host = w;
    moe_status st = L->ops->place(L, err);
    if (st != MOE_OK) return st;
    L->weight_uploads++;
    if (L->backend == MOE_BACKEND_CUDA) {
        moe_config keep = L->host.cfg;
        moe_weights_free(&L->host);
        L->host.cfg = keep;
    }
    return MOE_OK;
}

moe_status moe_layer_info_get(const moe_layer *L, moe_layer_info *info)
{
    moe_error *err = moe_api_begin();
    MOE_TRY(layer_check(L, "moe_layer_info_get", err));
    if (!info) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_info_get: info is NULL");
    if (info->size < sizeof *info || info->magic != MOE_LAYER_INFO_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_info_get: info not initialised with MOE_LAYER_INFO_INIT "
                        "(size %u, magic 0x%08x)", info->size, info->magic);
    moe_layer_info i;
    memset(&i, 0, sizeof i);
    i.size = info->size;
    i.magic = info->magic;
    i.hidden = L->H;
    i.inter = L->I;
    i.num_experts = L->E;
    i.top_k = L->k;
    i.shared_inter = L->Is;
    i.arch = L->llama ? 1 : 0;
    i.dtype = L->dt;
    i.backend = L->backend;
    i.device = L->device;
    i.rank = L->map.rank;
    i.nranks = L->map.N;
    i.virtual_ranks = L->map.V;
    i.num_local_experts = L->map.El;
    i.local_experts = L->map.local_ids;
    i.bytes_resident = L->bytes_resident;
    i.workspace_bytes = moe_ws_total_bytes(L->ws);
    i.weight_uploads = L->weight_uploads;
    i.max_tokens = L->max_tokens;
    snprintf(i.transport, sizeof i.transport, "%s",
             L->plain || !L->ep || !L->ep->tp ? "none" : L->ep->tp->name);
    if (L->backend == MOE_BACKEND_CPU) {
        snprintf(i.device_name, sizeof i.device_name, "cpu (%d threads)", L->threads);
    } else {
#ifdef MOE_HAVE_CUDA
        struct cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, L->device) == cudaSuccess)
            snprintf(i.device_name, sizeof i.device_name, "%.120s", p.name);
        else cudaGetLastError();
#endif
    }
    memcpy(info, &i, sizeof i);
    return MOE_OK;
}

moe_status moe_layer_stats_get(const moe_layer *L, moe_layer_stats *s)
{
    moe_error *err = moe_api_begin();
    MOE_TRY(layer_check(L, "moe_layer_stats_get", err));
    if (!s) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_stats_get: stats is NULL");
    if (s->size < sizeof *s || s->magic != MOE_LAYER_STATS_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_stats_get: stats not initialised with MOE_LAYER_STATS_INIT "
                        "(size %u, magic 0x%08x)", s->size, s->magic);
    const moe_layer_counters *c = &L->ctr;
    const int N = L->map.N;
    if (s->peers < 0 || (s->peers > 0 && s->peers < N))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_layer_stats_get: peers = %d: expected 0 (no per-peer totals) or at "
                        "least the layer's %d rank(s)", s->peers, N);
    s->calls_forward = c->calls_forward;
    s->calls_backward = c->calls_backward;
    s->tokens_local = c->tokens_local;
    s->tokens_computed = c->tokens_computed;
    s->rows_sent = c->rows_sent;
    s->rows_recv = c->rows_recv;
    s->bytes_sent = c->bytes_sent;
    s->bytes_recv = c->bytes_recv;
    s->weight_bytes_read = L->weight_bytes_read;
    s->device_bytes_in_use = L->bytes_resident + moe_ws_total_bytes(L->ws);
    s->seconds = c->seconds;
    for (int q = 0; s->peers > 0 && q < N; q++) {
        if (s->peer_rows_sent) s->peer_rows_sent[q] = c->peer_rows_sent[q];
        if (s->peer_rows_recv) s->peer_rows_recv[q] = c->peer_rows_recv[q];
        if (s->peer_bytes_sent) s->peer_bytes_sent[q] = c->peer_bytes_sent[q];
        if (s->peer_bytes_recv) s->peer_bytes_recv[q] = c->peer_bytes_recv[q];
    }
    s->last_call = c->last_call;
    s->last_tokens = c->last_tokens;
    s->last_seconds = c->last_seconds;
    s->last_device_ms = c->last_device_ms;
    memcpy(s->phase_ms, c->phase_ms, sizeof s->phase_ms);
    s->nchunks = c->nchunks;
    memcpy(s->timeline, c->timeline, sizeof s->timeline);
    for (int g = 0; g < MOE_STATS_NUM_GEMMS; g++)
        L->ops->gemm_report(L, g, s->gemm_kernel[g], sizeof s->gemm_kernel[g], s->gemm_config[g],
                            sizeof s->gemm_config[g]);
    s->route_one_launch = c->route_one_launch;
    return MOE_OK;
}

moe_status moe_layer_stats_reset(moe_layer *L)
{
    moe_error *err = moe_api_begin();
    MOE_TRY(layer_check(L, "moe_layer_stats_reset", err));
    moe_layer_counters *c = &L->ctr;
    const int N = L->map.N;
    c->calls_forward = c->calls_backward = c->tokens_local = c->tokens_computed = 0;
    c->rows_sent = c->rows_recv = c->bytes_sent = c->bytes_recv = 0;
    c->seconds = 0;
    memset(c->peer_rows_sent, 0, (size_t)N * sizeof(uint64_t));
    memset(c->peer_rows_recv, 0, (size_t)N * sizeof(uint64_t));
    memset(c->peer_bytes_sent, 0, (size_t)N * sizeof(uint64_t));
    memset(c->peer_bytes_recv, 0, (size_t)N * sizeof(uint64_t));
    return MOE_OK;
}

moe_status moe_layer_set_timing(moe_layer *L, int on)
{
    moe_error *err = moe_api_begin();
    MOE_TRY(layer_check(L, "moe_layer_set_timing", err));
    L->timing = on != 0;
    return MOE_OK;
}
