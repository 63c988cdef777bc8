/* api.c — the public calls of moe_ep.h that run a layer: forward and backward on backend
 * memory (asynchronous) and on host memory (synchronous, staged through the workspace on
 * CUDA), the asynchronous error query, the workspace handle, and the stage-by-stage forward of
 * the correctness mode. Each checks its arguments, then hands over to the one driver
 * (src/ep/ep.h). */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ep/ep.h"
#include "ep/ep_driver.h"
#include "layer/layer_internal.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

/* ------------------------------------------------------------------ workspace ---- */

moe_status moe_workspace_destroy(moe_workspace *ws)
{
    moe_error *err = moe_api_begin();
    return moe_ws_destroy_checked(ws, err);
}

moe_status moe_workspace_bytes(const moe_workspace *ws, size_t *bytes)
{
    moe_error *err = moe_api_begin();
    if (!moe_ws_valid(ws))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_workspace_bytes: not a workspace");
    if (!bytes) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_workspace_bytes: bytes is NULL");
    *bytes = moe_ws_total_bytes(ws);
    return MOE_OK;
}

/* ------------------------------------------------------------------ calls ---- */

/* Common start of a call on backend memory: the handle, T, the stream, the thread count. */
static moe_status begin_call(moe_layer *L, const char *fn, int64_t T, void *stream,
                             moe_error *err)
{
    MOE_TRY(layer_check(L, fn, err));
    if (T < 0 || T > INT32_MAX / (L->k > 0 ? L->k : 1))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T = %lld: expected 0 .. %d tokens", fn,
                        (long long)T, INT32_MAX / L->k);
    if (L->max_tokens > 0 && T > L->max_tokens)
        return moe_fail(err, MOE_ERR_OVERFLOW,
                        "%s: T = %lld exceeds the layer's max_tokens = %lld (its buffers are "
                        "sized for that)", fn, (long long)T, (long long)L->max_tokens);
    /* Sync-free EP buffers are slots of max_tokens_per_rank rows and nothing on the device
     * checks T against them (the plan and the pack would write past them): refuse here, before
     * the call's agreement, so every rank fails together. (Sized EP calls check it in the
     * plan.) */
    if (L->ep && L->ep->syncfree && T > L->ep->M)
        return moe_fail(err, MOE_ERR_OVERFLOW,
                        "%s: T = %lld exceeds --max-tokens-per-rank %lld (the sync-free "
                        "expert-parallel buffers are sized for it)", fn, (long long)T,
                        (long long)L->ep->M);
    if (L->backend == MOE_BACKEND_CPU && stream)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: stream must be NULL on the CPU backend (calls run to completion)", fn);
    L->stream = stream;
    return L->ops->enter(L, err);
}

/* A required pointer for T > 0 tokens. */
static moe_status need(const void *p, int64_t T, const char *fn, const char *what,
                       moe_error *err)
{
    if (T > 0 && !p) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: %s is NULL", fn, what);
    return MOE_OK;
}

/* With EP, a local argument error must fail every rank (not leave them in a collective):
 * agree on it first. */
static moe_status agree_local(moe_layer *L, moe_status st, moe_error *err)
{
    if (L && L->magic == MOE_LAYER_MAGIC && L->ep && !L->plain)
        return ep_agree(L->ep->comm->comm, st, err);
    return st;
}

moe_status moe_layer_forward_async(moe_layer *L, int64_t T, const void *x, void *out,
                                   void *router_logits, void *stream)
{
    static const char fn[] = "moe_layer_forward_async";
    moe_error *err = moe_api_begin();
    moe_status st = begin_call(L, fn, T, stream, err);
    if (st == MOE_OK) st = need(x, T, fn, "x", err);
    if (st == MOE_OK) st = need(out, T, fn, "out", err);
    st = agree_local(L, st, err);
    if (st != MOE_OK) return st;
    L->host_fwd_x = NULL;
    return ep_forward(L, (int)T, x, out, router_logits, err);
}

moe_status moe_layer_backward_async(moe_layer *L, int64_t T, const void *x, const void *dout,
                                    const void *d_router_logits, void *dx,
                                    const moe_layer_grads *grads, void *stream)
{
    static const char fn[] = "moe_layer_backward_async";
    moe_error *err = moe_api_begin();
    moe_status st = begin_call(L, fn, T, stream, err);
    if (st == MOE_OK) st = need(x, T, fn, "x", err);
    if (st == MOE_OK) st = need(dout, T, fn, "dout", err);
    st = agree_local(L, st, err);
    if (st != MOE_OK) return st;
    return ep_backward(L, (int)T, x, dout, d_router_logits, dx, grads, err);
}

/* ---- host memory ---- */

/* rows x cols elements of dt in view v (shape [rows, cols] or [B, S, cols]); data may be NULL
 * only when there are no elements (as for hidden). */
static bool view_is(const moe_tensor_view *v, moe_dtype dt, int64_t rows, int64_t cols)
{
    if (!v || v->dtype != dt || v->ndim < 1 || v->ndim > 3) return false;
    if (!v->data && rows * cols > 0) return false;
    int64_t r = 1;
    for (int i = 0; i < v->ndim - 1; i++) r *= v->shape[i];
    if (v->ndim == 1) return rows * cols == v->shape[0];
    return r == rows && v->shape[v->ndim - 1] == cols;
}

static moe_status tokens_of(const moe_layer *L, const moe_tensor_view *h, const char *fn,
                            int64_t *T, moe_error *err)
{
    if (!h)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: hidden is NULL", fn);
    if (h->ndim < 2 || h->ndim > 3 || h->shape[h->ndim - 1] != L->H)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: hidden must be [T, %d] or [B, S, %d]", fn,
                        L->H, L->H);
    int64_t t = 1;
    for (int i = 0; i < h->ndim - 1; i++) {
        if (h->shape[i] < 0)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: hidden has a negative dimension", fn);
        /* bounded before multiplying: the product of the leading dims must not wrap */
        if (h->shape[i] > INT32_MAX || (t *= h->shape[i]) > INT32_MAX)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: hidden holds more than %d tokens", fn,
                            INT32_MAX);
    }
    if (h->dtype != L->dt) {
        char other[32];
        if (moe_dtype_name(h->dtype)) snprintf(other, sizeof other, "%s", moe_dtype_name(h->dtype));
        else snprintf(other, sizeof other, "dtype %d (not a moe_dtype)", (int)h->dtype);
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: hidden is %s, the layer computes in %s",
                        fn, other, moe_dtype_name(L->dt));
    }
    if (t > 0 && !h->data) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: hidden has no data", fn);
    *T = t;
    return MOE_OK;
}

/* Device copies of host data through the workspace's IO set (CUDA), or the host pointer. */
static moe_status stage_in(moe_layer *L, int id, const void *host, size_t bytes, void **dev,
                           moe_error *err)
{
    if (L->backend == MOE_BACKEND_CPU || !host) {
        *dev = (void *)host;
        return MOE_OK;
    }
    MOE_TRY(moe_ws_need(L->ws, WS_IO, id, bytes + 16, dev, err));
    return bytes ? L->ops->upload(L, *dev, host, bytes, err) : MOE_OK;
}

static moe_status stage_out(moe_layer *L, int id, void *host, size_t bytes, void **dev,
                            moe_error *err)
{
    if (L->backend == MOE_BACKEND_CPU || !host) {
        *dev = host;
        return MOE_OK;
    }
    return moe_ws_need(L->ws, WS_IO, id, bytes + 16, dev, err);
}

moe_status moe_layer_forward(moe_layer *L, const moe_tensor_view *hidden, moe_tensor_view *out,
                             moe_tensor_view *router_logits)
{
    static const char fn[] = "moe_layer_forward";
    moe_error *err = moe_api_begin();
    /* not a layer: nothing below may read it (and there are no peers to agree with) */
    MOE_TRY(layer_check(L, fn, err));
    int64_t T = 0;
    moe_status st = tokens_of(L, hidden, fn, &T, err);
    if (st == MOE_OK && !view_is(out, L->dt, T, L->H))
        st = moe_fail(err, MOE_ERR_INVALID_ARG, "%s: out must be %s with %lld rows of %d", fn,
                      moe_dtype_name(L->dt), (long long)T, L->H);
    if (st == MOE_OK && router_logits && !view_is(router_logits, L->dt, T, L->E))
        st = moe_fail(err, MOE_ERR_INVALID_ARG, "%s: router_logits must be %s [%lld, %d]", fn,
                      moe_dtype_name(L->dt), (long long)T, L->E);
    if (st == MOE_OK) st = begin_call(L, fn, T, NULL, err);
    if (st == MOE_OK) L->stream = L->host_stream;
    const size_t xb = (size_t)T * L->H * L->dsz, lb = (size_t)T * L->E * L->dsz;
    void *dx = NULL, *dout = NULL, *dlog = NULL;
    if (st == MOE_OK) st = stage_in(L, WB_IO_X, hidden->data, xb, &dx, err);
    if (st == MOE_OK) st = stage_out(L, WB_IO_OUT, out->data, xb, &dout, err);
    if (st == MOE_OK && router_logits) st = stage_out(L, WB_IO_LOGITS, router_logits->data, lb, &dlog, err);
    st = agree_local(L, st, err);
    if (st != MOE_OK) return st;
    st = ep_forward(L, (int)T, dx, dout, dlog, err);
    L->host_fwd_x = st == MOE_OK ? hidden->data : NULL;
    if (st == MOE_OK && L->backend == MOE_BACKEND_CUDA) {
        st = L->ops->download(L, out->data, dout, xb, err);
        if (st == MOE_OK && router_logits) st = L->ops->download(L, router_logits->data, dlog, lb, err);
    }
    return st;
}

moe_status moe_layer_backward(moe_layer *L, const moe_tensor_view *hidden,
                              const moe_tensor_view *dout, const moe_tensor_view *d_router_logits,
                              moe_tensor_view *dx, const moe_layer_grads *grads)
{
    static const char fn[] = "moe_layer_backward";
    moe_error *err = moe_api_begin();
    /* not a layer: nothing below may read it (and there are no peers to agree with) */
    MOE_TRY(layer_check(L, fn, err));
    int64_t T = 0;
    moe_status st = tokens_of(L, hidden, fn, &T, err);
    if (st == MOE_OK && !view_is(dout, L->dt, T, L->H))
        st = moe_fail(err, MOE_ERR_INVALID_ARG, "%s: dout must be %s with %lld rows of %d", fn,
                      moe_dtype_name(L->dt), (long long)T, L->H);
    if (st == MOE_OK && d_router_logits && !view_is(d_router_logits, L->dt, T, L->E))
        st = moe_fail(err, MOE_ERR_INVALID_ARG, "%s: d_router_logits must be %s [%lld, %d]", fn,
                      moe_dtype_name(L->dt), (long long)T, L->E);
    if (st == MOE_OK && dx && !view_is(dx, L->dt, T, L->H))
        st = moe_fail(err, MOE_ERR_INVALID_ARG, "%s: dx must be %s with %lld rows of %d", fn,
                      moe_dtype_name(L->dt), (long long)T, L->H);
    if (st == MOE_OK) st = begin_call(L, fn, T, NULL, err);
    if (st == MOE_OK) L->stream = L->host_stream;
    const size_t xb = (size_t)T * L->H * L->dsz, lb = (size_t)T * L->E * L->dsz;
    void *dxin = NULL, *ddout = NULL, *ddlog = NULL, *ddx = NULL;
    if (st == MOE_OK) st = stage_in(L, WB_IO_X, hidden->data, xb, &dxin, err);
    if (st == MOE_OK) st = stage_in(L, WB_IO_DOUT, dout->data, xb, &ddout, err);
    if (st == MOE_OK && d_router_logits)
        st = stage_in(L, WB_IO_DLOG, d_router_logits->data, lb, &ddlog, err);
    if (st == MOE_OK && dx) st = stage_out(L, WB_IO_DX, dx->data, xb, &ddx, err);
    /* gradients: the caller's host buffers, or device copies of them on CUDA */
    moe_layer_grads dg = {0};
    const size_t dsz = L->dsz, El = (size_t)L->map.El, H = (size_t)L->H, I = (size_t)L->I;
    const size_t Is = (size_t)L->Is;
    struct {
        void *const *host;
        void **dev;
        int id;
        size_t bytes;
    } g[6] = {
        {grads ? &grads->router : NULL, &dg.router, WB_G_ROUTER, (size_t)L->E * H * dsz},
        {grads ? &grads->w13 : NULL, &dg.w13, WB_G_W13, El * 2 * I * H * dsz},
        {grads ? &grads->w2 : NULL, &dg.w2, WB_G_W2, El * H * I * dsz},
        {grads ? &grads->shared_gate : NULL, &dg.shared_gate, WB_G_SG, Is * H * dsz},
        {grads ? &grads->shared_up : NULL, &dg.shared_up, WB_G_SU, Is * H * dsz},
        {grads ? &grads->shared_down : NULL, &dg.shared_down, WB_G_SD, H * Is * dsz},
    };
    for (int i = 0; i < 6 && st == MOE_OK && grads; i++)
        if (*g[i].host) st = stage_out(L, g[i].id, *g[i].host, g[i].bytes, g[i].dev, err);
    st = agree_local(L, st, err);
    if (st != MOE_OK) return st;
    /* CUDA stages every host x through one buffer: the saved forward is this x's only when
     * the caller passes the pointer it gave that forward */
    if (L->backend == MOE_BACKEND_CUDA && hidden->data != L->host_fwd_x) drv_saved_forget(L);
    st = ep_backward(L, (int)T, dxin, ddout, ddlog, ddx, grads ? &dg : NULL, err);
    if (st == MOE_OK && L->backend == MOE_BACKEND_CUDA) {
        if (dx) st = L->ops->download(L, dx->data, ddx, xb, err);
        for (int i = 0; i < 6 && st == MOE_OK && grads; i++)
            if (*g[i].host) st = L->ops->download(L, *g[i].host, *g[i].dev, g[i].bytes, err);
    }
    return st;
}

moe_status moe_layer_check_errors(moe_layer *L)
{
    moe_error *err = moe_api_begin();
    MOE_TRY(layer_check(L, "moe_layer_check_errors", err));
    MOE_TRY(L->ops->enter(L, err));
    MOE_TRY(L->ops->sync(L, err));
    if (L->ep && L->ep->tp) MOE_TRY(L->ep->tp->sync(L->ep->tp, L->stream, err));
    return L->ops->check_errors(L, err);
}

/* ------------------------------------------------------------------ correctness mode ---- */

moe_status moe_layer_forward_stages(moe_layer *L, int T, const void *x_host,
                                    moe_fwd_state *host, moe_error *err)
{
    MOE_TRY(layer_check(L, "moe_layer_forward_stages", err));
    if (!L->plain)
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "the stage-by-stage forward runs on one rank (the plain path)");
    if (!host || host->T != T || T < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_layer_forward_stages: state for T = %d", T);
    MOE_TRY(L->ops->enter(L, err));
    L->stream = L->host_stream;
    L->ws_set = WS_FWD;
    if (L->backend == MOE_BACKEND_CPU) {
        MOE_TRY(ep_plain_forward(L, T, x_host, host, false, err));
        host->M = T > 0 ? host->expert_offsets[L->E] : 0;
        return MOE_OK;
    }
    /* CUDA: every intermediate into device buffers, then to the host */
    const size_t t = (size_t)T, tk = t * L->k, dsz = L->dsz;
    moe_fwd_state d;
    memset(&d, 0, sizeof d);
    d.T = T;
    struct {
        void *hostp;
        void **devp;
        size_t bytes;
    } b[] = {
        {host->router_logits, &d.router_logits, t * L->E * dsz},
        {host->topk_ids, (void **)&d.topk_ids, tk * 4},
        {host->topk_w, &d.topk_w, tk * dsz},
        {host->token_counts, (void **)&d.token_counts, (size_t)L->E * 4},
        {host->expert_offsets, (void **)&d.expert_offsets, ((size_t)L->E + 1) * 4},
        {host->gather_idx, (void **)&d.gather_idx, tk * 4},
        {host->gemm1_out, &d.gemm1_out, tk * 2 * L->I * dsz},
        {host->act, &d.act, tk * L->I * dsz},
        {host->gemm2_out, &d.gemm2_out, tk * L->H * dsz},
        {host->shared_out, &d.shared_out, t * L->H * dsz},
        {host->out, &d.out, t * L->H * dsz},
    };
    const int n = (int)(sizeof b / sizeof b[0]);
    moe_status st = MOE_OK;
    for (int i = 0; i < n && st == MOE_OK; i++)
        if (b[i].hostp) st = moe_mem_alloc(L->backend, L->device, b[i].bytes + 16, "stage buffer",
                                           b[i].devp, err);
    void *dx = NULL;
    if (st == MOE_OK) st = moe_mem_alloc(L->backend, L->device, t * L->H * dsz + 16, "stage input", &dx, err);
    if (st == MOE_OK) st = L->ops->upload(L, dx, x_host, t * L->H * dsz, err);
    /* no tokens: nothing runs, but the counts and offsets are still read back (zeros, as the
     * CPU backend writes them), not the fresh allocation's contents */
    if (st == MOE_OK && T == 0 && d.token_counts)
        st = L->ops->zero(L, d.token_counts, (size_t)L->E * 4, err);
    if (st == MOE_OK && T == 0 && d.expert_offsets)
        st = L->ops->zero(L, d.expert_offsets, ((size_t)L->E + 1) * 4, err);
    if (st == MOE_OK && T > 0) st = ep_plain_forward(L, T, dx, &d, false, err);
    for (int i = 0; i < n && st == MOE_OK; i++)
        if (b[i].hostp) st = L->ops->download(L, b[i].hostp, *b[i].devp, b[i].bytes, err);
    if (st == MOE_OK) host->M = T > 0 ? host->expert_offsets[L->E] : 0;
    for (int i = 0; i < n; i++)
        if (b[i].hostp) moe_mem_free(L->backend, L->device, *b[i].devp);
    moe_mem_free(L->backend, L->device, dx);
    return st;
}
