/* svc_compute.c — the served layers: loading them and THE one function that runs a layer on a
 * rank's share of a batch (svc_layer_forward).
 *
 * Today every rank holds all experts of every served layer and runs its block of rows on the
 * local engine: data-parallel over the ranks, no communication inside the layer. When
 * expert parallelism (src/ep/) lands, svc_model_load loads each rank's expert slice with
 * moe_ep_weights_load and creates a moe_ep_ctx per layer, and svc_layer_forward becomes
 *     moe_ep_forward(l->ep, T, x, out, logits, NULL, NULL, err)
 * which is collective: every rank already calls this function once per batch, T = 0
 * included, in the same order, so nothing else in the service changes. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "block_state.h"
#include "engine.h"
#include "svc_internal.h"

moe_status moe_serve_load_weights(const moe_config *cfg, const char *spec, int layer,
                                  moe_dtype dt, moe_weights *w, moe_error *err)
{
    if (strncmp(spec, "random:", 7) == 0) {
        char *end;
        errno = 0;
        unsigned long long seed = strtoull(spec + 7, &end, 0);
        if (errno || end == spec + 7 || *end)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "weights '%s': expected random:SEED", spec);
        return moe_weights_random(cfg, seed + (uint64_t)(layer < 0 ? 0 : layer), 0,
                                  cfg->num_experts, dt, w, err);
    }
    return moe_weights_load(cfg, spec, layer, 0, cfg->num_experts, dt, w, err);
}

moe_status svc_model_load(svc_model *m, const moe_serve_options *o, int nranks, int local_rank,
                          moe_error *err)
{
    memset(m, 0, sizeof *m);
    MOE_TRY(moe_config_resolve(o->config, &m->cfg, err));
    if (o->backend == MOE_BACKEND_CUDA) {
#ifdef MOE_HAVE_CUDA
        /* One GPU per rank: the node-local rank picks it (the engine uses the current device). */
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1)
            return moe_fail(err, MOE_ERR_NO_DEVICE, "serve: --backend cuda but no usable GPU");
        if (cudaSetDevice(local_rank % ndev) != cudaSuccess)
            return moe_fail(err, MOE_ERR_CUDA, "serve: cudaSetDevice(%d) failed", local_rank % ndev);
#else
        (void)local_rank;
#endif
    }
    m->dt = o->dtype == MOE_NUM_DTYPES ? m->cfg.dtype : o->dtype;
    m->backend = o->backend;
    m->max_local_T = (o->max_batch_tokens + nranks - 1) / nranks;
    int n = o->layers ? o->nlayers : 1;
    m->layers = moe_calloc((size_t)n, sizeof *m->layers, "served layers", err);
    if (!m->layers) return MOE_ERR_NOMEM;
    for (int i = 0; i < n; i++) {
        svc_layer *l = &m->layers[i];
        int file_layer = o->layers ? o->layers[i] : -1;
        l->number = o->layers ? o->layers[i] : 0;
        m->nlayers = i + 1;
        moe_status st = moe_serve_load_weights(&m->cfg, o->weights, file_layer, m->dt, &l->w, err);
        if (st == MOE_OK)
            st = moe_engine_create(m->backend, &l->w, m->dt, m->max_local_T, &l->eng, err);
        if (st != MOE_OK) {
            if (o->layers) moe_error_prefix(err, "layer %d", file_layer);
            return st;
        }
    }
    return MOE_OK;
}

void svc_model_free(svc_model *m)
{
    for (int i = 0; i < m->nlayers; i++) {
        moe_engine_destroy(m->layers[i].eng);
        moe_weights_free(&m->layers[i].w);
    }
    free(m->layers);
    memset(m, 0, sizeof *m);
}

moe_status svc_layer_forward(svc_model *m, int layer_index, int T, const void *x, void *out,
                             void *logits, moe_error *err)
{
    if (layer_index < 0 || layer_index >= m->nlayers)
        return moe_fail(err, MOE_ERR_INTERNAL, "svc_layer_forward: layer index %d of %d",
                        layer_index, m->nlayers);
    if (T == 0) return MOE_OK; /* a rank with no rows this batch (EP will still take part) */
    svc_layer *l = &m->layers[layer_index];
    moe_fwd_state st;
    /* Allocated per call: the state's buffers are shaped by T. Small next to the GEMMs. */
    MOE_TRY(moe_fwd_state_alloc(&m->cfg, m->dt, T, false, &st, err));
    moe_status s = moe_engine_forward(l->eng, T, x, &st, err);
    if (s == MOE_OK) {
        size_t esz = moe_dtype_size(m->dt);
        memcpy(out, st.out, (size_t)T * (size_t)m->cfg.hidden * esz);
        if (logits) memcpy(logits, st.router_logits, (size_t)T * (size_t)m->cfg.num_experts * esz);
    }
    moe_fwd_state_free(&st);
    return s;
}
