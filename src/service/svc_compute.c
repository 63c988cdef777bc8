/* svc_compute.c — the served layers: choosing how they are spread over the ranks, loading
 * them, and THE one function that runs a layer on a rank's share of a batch
 * (svc_layer_forward).
 *
 * Two placements (moe_serve_options.ep, decided identically on every rank):
 *   expert-parallel  rank r holds experts [r*E/N, (r+1)*E/N) of every layer (plus the router
 *                    and shared expert) and svc_layer_forward is moe_ep_forward: the rank's
 *                    rows are routed, dispatched to the experts' owners, computed there and
 *                    combined back (src/ep/). Collective: every rank calls it once per batch,
 *                    in the same order, T = 0 included — which the worker loop already does.
 *                    CPU backend, E divisible by N.
 *   replicated       every rank holds all experts and runs its rows on the local engine
 *                    (moe_engine_forward, CPU or CUDA): data-parallel, no communication inside
 *                    the layer. Used with one rank, with the CUDA backend (the EP compute is
 *                    host-side today), when E is not divisible by N, or when asked (--ep off).
 */
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

moe_status svc_model_plan(svc_model *m, const moe_serve_options *o, int nranks, moe_error *err)
{
    memset(m, 0, sizeof *m);
    MOE_TRY(moe_config_resolve(o->config, &m->cfg, err));
    m->dt = o->dtype == MOE_NUM_DTYPES ? m->cfg.dtype : o->dtype;
    m->backend = o->backend;
    m->nranks = nranks;
    m->max_local_T = (o->max_batch_tokens + nranks - 1) / nranks;
    const int E = m->cfg.num_experts;
    const char *why = NULL;
    if (nranks == 1) why = "one rank";
    else if (o->backend != MOE_BACKEND_CPU) why = "the expert-parallel path runs on the CPU backend only";
    else if (E % nranks != 0) why = "the experts cannot be split evenly over the ranks";
    if (o->ep == MOE_SERVE_EP_ON && why)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "serve: --ep on, but %s (E=%d experts, %d rank(s), "
                        "backend %s)", why, E, nranks, o->backend == MOE_BACKEND_CPU ? "cpu" : "cuda");
    m->ep = o->ep != MOE_SERVE_EP_OFF && !why;
    return MOE_OK;
}

moe_status svc_model_load(svc_model *m, const moe_serve_options *o, MPI_Comm comm, int local_rank,
                          moe_error *err)
{
    if (o->backend == MOE_BACKEND_CUDA) {
#ifdef MOE_HAVE_CUDA
        /* One GPU per rank: the node-local rank picks it (the engine uses the current device). */
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1)
            return moe_fail(err, MOE_ERR_NO_DEVICE, "serve: --backend cuda but no usable GPU");
        if (cudaSetDevice(local_rank % ndev) != cudaSuccess)
            return moe_fail(err, MOE_ERR_CUDA, "serve: cudaSetDevice(%d) failed", local_rank % ndev);
#endif
    }
    (void)local_rank;
    int n = o->layers ? o->nlayers : 1;
    m->layers = moe_calloc((size_t)n, sizeof *m->layers, "served layers", err);
    if (!m->layers) return MOE_ERR_NOMEM;
    for (int i = 0; i < n; i++) {
        svc_layer *l = &m->layers[i];
        int file_layer = o->layers ? o->layers[i] : -1;
        l->number = o->layers ? o->layers[i] : 0;
        m->nlayers = i + 1;
        moe_status st;
        if (m->ep) {
            /* Collective, and every rank gets the same status (the EP layer agrees on it), so
             * the ranks leave this loop together. */
            if (strncmp(o->weights, "random:", 7) == 0) {
                char *end;
                unsigned long long seed = strtoull(o->weights + 7, &end, 0);
                st = *end || end == o->weights + 7
                         ? moe_fail(err, MOE_ERR_INVALID_ARG, "weights '%s': expected random:SEED", o->weights)
                         : MOE_OK;
                /* same seeds as moe_serve_load_weights, so clients can verify in process */
                if (st == MOE_OK)
                    st = moe_ep_weights_random(comm, &m->cfg, seed + (uint64_t)(file_layer < 0 ? 0 : file_layer),
                                               1, m->dt, &l->w, err);
            } else {
                st = moe_ep_weights_load(comm, &m->cfg, o->weights, file_layer, 1, m->dt, &l->w, err);
            }
            if (st == MOE_OK) {
                moe_ep_options eo = MOE_EP_OPTIONS_INIT;
                eo.transport = MOE_EP_TRANSPORT_MPI;
                /* Buffers sized once: a rank never gets more than max_local_T rows. */
                eo.max_tokens_per_rank = m->max_local_T;
                st = moe_ep_ctx_create(comm, &l->w, &eo, &l->ep, err);
            }
        } else {
            st = moe_serve_load_weights(&m->cfg, o->weights, file_layer, m->dt, &l->w, err);
            if (st == MOE_OK)
                st = moe_engine_create(m->backend, &l->w, m->dt, m->max_local_T, &l->eng, err);
        }
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
        if (m->layers[i].ep) moe_ep_ctx_destroy(m->layers[i].ep);
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
    svc_layer *l = &m->layers[layer_index];
    if (m->ep) return moe_ep_forward(l->ep, T, x, out, logits, NULL, NULL, err);
    if (T == 0) return MOE_OK; /* a rank with no rows this batch */
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
