/* svc_compute.c — the served layers: choosing how they are spread over the ranks, creating
 * them through the public API (moe_ep.h), and THE one function that runs a layer on a rank's
 * share of a batch (svc_layer_forward).
 *
 * Two placements (moe_serve_options.ep, decided identically on every rank):
 *   expert-parallel  every layer is created on one moe_ep_comm: rank r holds its slice of the
 *                    experts (uneven slices when N does not divide E) plus the router and
 *                    shared expert, and svc_layer_forward is the layer's collective forward:
 *                    the rank's rows are routed, dispatched to the experts' owners, computed
 *                    there and combined back. Every rank calls it once per batch, in the same
 *                    order, T = 0 included — which the worker loop already does. CPU backend.
 *   replicated       every rank holds all experts and runs its rows alone: data-parallel, no
 *                    communication inside the layer. Used with one rank, with the CUDA
 *                    backend, or when asked (--ep off).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "svc_internal.h"

moe_status moe_serve_layer_create(const char *config, const char *spec, int layer, moe_dtype dt,
                                  moe_backend backend, int64_t max_tokens, int threads,
                                  moe_ep_comm *comm, moe_layer **out, moe_error *err)
{
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    if (strncmp(spec, "random:", 7) == 0) {
        char *end;
        errno = 0;
        unsigned long long seed = strtoull(spec + 7, &end, 0);
        if (errno || end == spec + 7 || *end)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "weights '%s': expected random:SEED", spec);
        src.kind = MOE_WEIGHTS_RANDOM;
        src.seed = seed + (uint64_t)(layer < 0 ? 0 : layer);
    } else {
        src.kind = MOE_WEIGHTS_FILE;
        src.path = spec;
        src.layer = layer;
    }
    moe_layer_options lo = MOE_LAYER_OPTIONS_INIT;
    lo.backend = backend;
    lo.dtype = dt;
    lo.max_tokens = max_tokens;
    lo.threads = threads;
    lo.comm = comm;
    moe_status st = moe_layer_create(config, &src, &lo, out);
    if (st != MOE_OK) moe_fail(err, st, "%s", moe_last_error());
    return st;
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
    else if (o->backend != MOE_BACKEND_CPU) why = "the service runs expert-parallel on the CPU backend only";
    else if (nranks > E) why = "there are more ranks than experts";
    if (o->ep == MOE_SERVE_EP_ON && why)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "serve: --ep on, but %s (E=%d experts, %d rank(s), "
                        "backend %s)", why, E, nranks, o->backend == MOE_BACKEND_CPU ? "cpu" : "cuda");
    m->ep = o->ep != MOE_SERVE_EP_OFF && !why;
    return MOE_OK;
}

moe_status svc_model_load(svc_model *m, const moe_serve_options *o, MPI_Comm comm, int local_rank,
                          moe_error *err)
{
    (void)local_rank; /* the layer picks its GPU from the node-local rank */
    int n = o->layers ? o->nlayers : 1;
    m->layers = moe_calloc((size_t)n, sizeof *m->layers, "served layers", err);
    if (!m->layers) return MOE_ERR_NOMEM;
    if (m->ep) {
        /* Buffers sized once: a rank never gets more than max_local_T rows. */
        moe_ep_options eo = MOE_EP_OPTIONS_INIT;
        eo.transport = MOE_TRANSPORT_MPI;
        eo.max_tokens_per_rank = m->max_local_T;
        moe_status st = moe_ep_comm_create((int32_t)MPI_Comm_c2f(comm), &eo, &m->comm);
        if (st != MOE_OK) return moe_fail(err, st, "%s", moe_last_error());
    }
    for (int i = 0; i < n; i++) {
        svc_layer *l = &m->layers[i];
        int file_layer = o->layers ? o->layers[i] : -1;
        l->number = o->layers ? o->layers[i] : 0;
        m->nlayers = i + 1;
        /* collective with EP: every rank gets the same status, so they leave together */
        moe_status st = moe_serve_layer_create(o->config, o->weights, file_layer, m->dt,
                                               m->backend, m->max_local_T, o->threads, m->comm,
                                               &l->layer, err);
        if (st != MOE_OK) {
            if (o->layers) moe_error_prefix(err, "layer %d", file_layer);
            return st;
        }
    }
    return MOE_OK;
}

void svc_model_free(svc_model *m)
{
    for (int i = 0; i < m->nlayers; i++) moe_layer_destroy(m->layers[i].layer);
    if (m->comm) moe_ep_comm_destroy(m->comm);
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
    if (T == 0 && !m->ep) return MOE_OK; /* a rank with no rows this batch */
    const int H = m->cfg.hidden, E = m->cfg.num_experts;
    moe_tensor_view vx = {m->dt, 2, {T, H}, (void *)x};
    moe_tensor_view vo = {m->dt, 2, {T, H}, out};
    moe_tensor_view vl = {m->dt, 2, {T, E}, logits};
    moe_status st = moe_layer_forward(l->layer, &vx, &vo, logits ? &vl : NULL);
    if (st != MOE_OK) return moe_fail(err, st, "%s", moe_last_error());
    return MOE_OK;
}
