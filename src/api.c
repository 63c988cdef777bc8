/* api.c — the public API of moe_ep.h on top of the internal modules: a context carries the
 * backend choice and the last error; a layer is a config, its weights and an engine. */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "block_state.h"
#include "config.h"
#include "engine.h"
#include "moe_ep.h"
#include "weights.h"

#define MOE_CTX_MAGIC 0x4354584du   /* "MXTC" */
#define MOE_LAYER_MAGIC 0x5259414cu /* "LAYR" */

struct moe_ctx {
    uint32_t magic;
    moe_backend backend;
    int threads;
    moe_error err;
};

struct moe_layer {
    uint32_t magic;
    moe_ctx *ctx;
    moe_config cfg;
    moe_dtype dt;
    moe_weights w;
    moe_engine *eng;
    int engine_T; /* the engine is rebuilt when a larger T arrives */
};

moe_status moe_ctx_create(const moe_ctx_options *opts, moe_ctx **out)
{
    if (!out) return MOE_ERR_INVALID_ARG;
    *out = NULL;
    moe_ctx_options def = MOE_CTX_OPTIONS_INIT;
    if (!opts) opts = &def;
    if (opts->magic != MOE_CTX_OPTIONS_MAGIC || opts->size < sizeof(moe_ctx_options))
        return MOE_ERR_INVALID_ARG; /* not initialised with MOE_CTX_OPTIONS_INIT */
    if (opts->backend != MOE_BACKEND_CPU && opts->backend != MOE_BACKEND_CUDA) return MOE_ERR_INVALID_ARG;
#ifndef MOE_HAVE_CUDA
    if (opts->backend == MOE_BACKEND_CUDA) return MOE_ERR_NO_DEVICE;
#endif
    moe_ctx *c = calloc(1, sizeof *c);
    if (!c) return MOE_ERR_NOMEM;
    c->magic = MOE_CTX_MAGIC;
    c->backend = opts->backend;
    c->threads = opts->threads;
    if (c->threads > 0) omp_set_num_threads(c->threads);
    *out = c;
    return MOE_OK;
}

void moe_ctx_destroy(moe_ctx *ctx)
{
    if (!ctx || ctx->magic != MOE_CTX_MAGIC) return;
    ctx->magic = 0;
    free(ctx);
}

const char *moe_last_error(const moe_ctx *ctx)
{
    if (!ctx || ctx->magic != MOE_CTX_MAGIC) return "invalid or destroyed moe_ctx";
    return ctx->err.msg;
}

static moe_status record(moe_ctx *ctx, moe_status st)
{
    if (st == MOE_OK) moe_error_clear(&ctx->err);
    return st;
}

moe_status moe_layer_load(moe_ctx *ctx, const char *config, const char *weights, int layer,
                          moe_dtype dtype, moe_layer **out)
{
    if (!ctx || ctx->magic != MOE_CTX_MAGIC) return MOE_ERR_INVALID_ARG;
    moe_error *err = &ctx->err;
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_load: out is NULL");
    *out = NULL;
    if (!config || !weights)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_load: config and weights are required");
    moe_layer *l = moe_calloc(1, sizeof *l, "layer", err);
    if (!l) return MOE_ERR_NOMEM;
    l->magic = MOE_LAYER_MAGIC;
    l->ctx = ctx;
    moe_status st = moe_config_resolve(config, &l->cfg, err);
    if (st == MOE_OK) {
        l->dt = dtype == MOE_NUM_DTYPES ? l->cfg.dtype : dtype;
        st = moe_weights_load(&l->cfg, weights, layer, 0, l->cfg.num_experts, l->dt, &l->w, err);
    }
    if (st != MOE_OK) {
        moe_weights_free(&l->w);
        free(l);
        return st;
    }
    *out = l;
    return record(ctx, MOE_OK);
}

void moe_layer_destroy(moe_layer *l)
{
    if (!l || l->magic != MOE_LAYER_MAGIC) return;
    moe_engine_destroy(l->eng);
    moe_weights_free(&l->w);
    l->magic = 0;
    free(l);
}

static bool view_is(const moe_tensor_view *v, moe_dtype dt, int64_t rows, int64_t cols)
{
    if (!v || !v->data || v->dtype != dt || v->ndim < 2 || v->ndim > 3) return false;
    int64_t r = 1;
    for (int i = 0; i < v->ndim - 1; i++) r *= v->shape[i];
    return r == rows && v->shape[v->ndim - 1] == cols;
}

moe_status moe_layer_forward(moe_ctx *ctx, moe_layer *l, const moe_tensor_view *hidden,
                             moe_tensor_view *out, moe_tensor_view *router_logits)
{
    if (!ctx || ctx->magic != MOE_CTX_MAGIC) return MOE_ERR_INVALID_ARG;
    moe_error *err = &ctx->err;
    if (!l || l->magic != MOE_LAYER_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_forward: invalid or destroyed layer");
    const int H = l->cfg.hidden, E = l->cfg.num_experts;
    if (!hidden || !hidden->data || hidden->ndim < 2 || hidden->ndim > 3 || hidden->shape[hidden->ndim - 1] != H)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_forward: hidden must be [T,%d] or [B,S,%d]", H, H);
    int64_t T64 = 1;
    for (int i = 0; i < hidden->ndim - 1; i++) T64 *= hidden->shape[i];
    if (T64 > 0x7fffffff) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_forward: T too large");
    const int T = (int)T64;
    if (hidden->dtype != l->dt)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_forward: hidden is %s, the layer computes in %s",
                        moe_dtype_name(hidden->dtype) ? moe_dtype_name(hidden->dtype) : "?", moe_dtype_name(l->dt));
    if (!view_is(out, l->dt, T, H))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_forward: out must be %s with %d rows of %d",
                        moe_dtype_name(l->dt), T, H);
    if (router_logits && !view_is(router_logits, l->dt, T, E))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_forward: router_logits must be %s [%d, %d]",
                        moe_dtype_name(l->dt), T, E);
    if (!l->eng || l->engine_T < T) {
        moe_engine_destroy(l->eng);
        l->eng = NULL;
        moe_status st = moe_engine_create(ctx->backend, &l->w, l->dt, T, &l->eng, err);
        if (st != MOE_OK) return st;
        l->engine_T = T;
    }
    moe_fwd_state st;
    moe_status s = moe_fwd_state_alloc(&l->cfg, l->dt, T, false, &st, err);
    if (s != MOE_OK) return s;
    s = moe_engine_forward(l->eng, T, hidden->data, &st, err);
    if (s == MOE_OK) {
        size_t esz = moe_dtype_size(l->dt);
        memcpy(out->data, st.out, (size_t)T * H * esz);
        if (router_logits) memcpy(router_logits->data, st.router_logits, (size_t)T * E * esz);
    }
    moe_fwd_state_free(&st);
    return record(ctx, s);
}
