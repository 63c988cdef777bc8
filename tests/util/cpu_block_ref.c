/*
 * cpu_block_ref.c — for tests: the whole MoE block as one chain of the CPU stage functions
 * (src/cpu/cpu_fused.h), forward and backward, with every intermediate in caller buffers and
 * any slice of the experts. The library runs the block through its layer and driver
 * (src/layer, src/ep); this chain is a second, independent composition of the same stages the
 * stage tests and the finite-difference checks drive directly:
 *
 * forward:  router GEMM -> top-k -> counting sort -> GEMM1 (permute_x, Llama-4 scale_a,
 *           SiLU-and-mul) -> GEMM2 (permute_y, Qwen3 scale_c) -> [shared expert] -> sum over k
 * backward: dA0 = dout W2 (permute_x, b_kn) -> [Qwen3: dw, dact = w dA0] -> dW2 -> SiLU-mul
 *           backward -> dXs = dGU W13 (permute_y, b_kn) -> dW13 -> [Llama-4: ds] -> router
 *           backward -> d_router, dx = dlogits router + [shared expert dx] + sum_j (s) dXs
 */
#include <stdio.h>
#include <stdlib.h>

#include "cpu_block_ref.h"
#include "cpu/cpu_fused_internal.h"

static moe_status check_tensor(const char *who, const char *name, const moe_tensor *t,
                               moe_dtype dt, int ndim, int64_t d0, int64_t d1, int64_t d2,
                               moe_error *err)
{
    int64_t want[3] = {d0, d1, d2};
    bool ok = t->data != NULL && t->dtype == dt && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == want[i];
    if (ok) return MOE_OK;
    char got[64], exp[64];
    const char *dn = moe_dtype_name(t->dtype);
    return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: tensor %s is %s %s%s, expected %s %s", who,
                    name, dn ? dn : "?", moe_shape_str(t->ndim, t->shape, got, sizeof got),
                    t->data ? "" : " (no data)", moe_dtype_name(dt),
                    moe_shape_str(ndim, want, exp, sizeof exp));
}

static bool has_shared(const moe_config *c)
{
    return c->arch == MOE_ARCH_LLAMA4 && c->shared_inter > 0;
}

/* The tensors of a weight set (weights or their gradients) in canonical layout. */
static moe_status check_weight_set(const char *who, const char *what, const moe_weights *w,
                                   const moe_config *c, int El, moe_dtype dt, moe_error *err)
{
    int64_t E = c->num_experts, H = c->hidden, I = c->inter, Is = c->shared_inter;
    char n[96];
    snprintf(n, sizeof n, "%s.router", what);
    MOE_TRY(check_tensor(who, n, &w->router, dt, 2, E, H, 0, err));
    snprintf(n, sizeof n, "%s.w13", what);
    MOE_TRY(check_tensor(who, n, &w->w13, dt, 3, El, 2 * I, H, err));
    snprintf(n, sizeof n, "%s.w2", what);
    MOE_TRY(check_tensor(who, n, &w->w2, dt, 3, El, H, I, err));
    if (has_shared(c)) {
        snprintf(n, sizeof n, "%s.shared_gate", what);
        MOE_TRY(check_tensor(who, n, &w->shared_gate, dt, 2, Is, H, 0, err));
        snprintf(n, sizeof n, "%s.shared_up", what);
        MOE_TRY(check_tensor(who, n, &w->shared_up, dt, 2, Is, H, 0, err));
        snprintf(n, sizeof n, "%s.shared_down", what);
        MOE_TRY(check_tensor(who, n, &w->shared_down, dt, 2, H, Is, 0, err));
    }
    return MOE_OK;
}

static moe_status check_block(const char *who, const moe_weights *w, moe_dtype dt, int T,
                              const void *x, moe_error *err)
{
    if (!w) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: weights are NULL", who);
    MOE_TRY(cf_check_dtype(who, dt, err));
    const moe_config *c = &w->cfg;
    if (c->arch != MOE_ARCH_QWEN3 && c->arch != MOE_ARCH_LLAMA4)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "%s: unknown arch %d", who, (int)c->arch);
    if (c->hidden < 1 || c->inter < 1 || c->num_experts < 1 || c->top_k < 1 ||
        c->top_k > c->num_experts || c->shared_inter < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: config H=%d I=%d E=%d k=%d Is=%d out "
                        "of range", who, c->hidden, c->inter, c->num_experts, c->top_k,
                        c->shared_inter);
    if (w->expert_begin < 0 || w->expert_count < 1 ||
        w->expert_begin + w->expert_count > c->num_experts)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: local experts [%d, %d) outside [0, %d)",
                        who, w->expert_begin, w->expert_begin + w->expert_count,
                        c->num_experts);
    if (w->dtype != dt)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: weights are %s but activations %s: "
                        "load or convert the weights to the activation dtype", who,
                        moe_dtype_name(w->dtype) ? moe_dtype_name(w->dtype) : "?",
                        moe_dtype_name(dt));
    MOE_TRY(check_weight_set(who, "weights", w, c, w->expert_count, dt, err));
    if (T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T = %d < 0", who, T);
    if (T > 0 && !x) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: x is NULL", who);
    if ((int64_t)T * c->top_k > INT32_MAX)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T*k = %lld exceeds the int32 gather "
                        "indices", who, (long long)T * c->top_k);
    return MOE_OK;
}

/* shared_gate [Is,H] stacked on shared_up [Is,H] -> [2Is,H], so the shared expert runs as a
 * one-group GEMM with the same SiLU-and-mul epilogue as the routed experts. */
static void *stack_shared(const moe_weights *w, moe_dtype dt, moe_error *err)
{
    size_t half = (size_t)w->cfg.shared_inter * w->cfg.hidden * moe_dtype_size(dt);
    char *p = moe_malloc(2 * half, "stacked shared gate/up weights", err);
    if (!p) return NULL;
    memcpy(p, w->shared_gate.data, half);
    memcpy(p + half, w->shared_up.data, half);
    return p;
}

/* Shared expert on x [T,H]: gu [T,2Is] (optional: rounded gate|up), act [T,Is], out [T,H]. */
static moe_status shared_forward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                                 const void *wcat, void *gu, void *act, void *out,
                                 moe_error *err)
{
    int H = w->cfg.hidden, Is = w->cfg.shared_inter;
    int32_t off[2] = {0, T};
    moe_grouped_gemm_args g1 = {
        .dtype = dt, .num_experts = 1, .expert_offsets = off, .N = 2 * Is, .K = H,
        .max_rows = T, .topk = 1, .A = x, .B = wcat, .C = act, .C_preact = gu,
        .epilogue = MOE_EPI_SILU_MUL,
    };
    MOE_TRY(cpu_grouped_gemm(&g1, err));
    moe_grouped_gemm_args g2 = {
        .dtype = dt, .num_experts = 1, .expert_offsets = off, .N = H, .K = Is,
        .max_rows = T, .topk = 1, .A = act, .B = w->shared_down.data, .C = out,
        .epilogue = MOE_EPI_NONE,
    };
    return cpu_grouped_gemm(&g2, err);
}

moe_status cpu_block_forward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                             moe_fwd_state *st, moe_error *err)
{
    static const char who[] = "cpu_block_forward";
    MOE_TRY(check_block(who, w, dt, T, x, err));
    const moe_config *c = &w->cfg;
    if (!st) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state is NULL", who);
    if (st->T != T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state allocated for T = %d, called with "
                        "T = %d", who, st->T, T);
    const char *missing = !st->router_logits ? "router_logits" : !st->topk_ids ? "topk_ids"
                        : !st->topk_w ? "topk_w" : !st->token_counts ? "token_counts"
                        : !st->expert_offsets ? "expert_offsets" : !st->gather_idx ? "gather_idx"
                        : !st->act ? "act" : !st->gemm2_out ? "gemm2_out" : !st->out ? "out"
                        : (has_shared(c) && !st->shared_out) ? "shared_out" : NULL;
    if (missing)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state buffer %s is NULL", who, missing);

    int H = c->hidden, I = c->inter, E = c->num_experts, k = c->top_k;
    int El = w->expert_count;
    MOE_TRY(cpu_router_logits(dt, T, H, E, x, w->router.data, st->router_logits, err));
    MOE_TRY(cpu_route_topk(c, dt, T, st->router_logits, st->topk_ids, st->topk_w, err));
    int M = cpu_sort_by_expert(T, k, st->topk_ids, w->expert_begin, El, st->token_counts,
                               st->expert_offsets, st->gather_idx);
    st->M = M;
    bool llama = c->arch == MOE_ARCH_LLAMA4;
    size_t flat = (size_t)T * k;

    /* GEMM1: x rows gathered in the prologue (Llama-4: scaled by the score and rounded),
     * [M,H] x [H,2I], SiLU-and-mul epilogue -> act [M,I] (and gemm1_out [M,2I]). */
    moe_grouped_gemm_args g1 = {
        .dtype = dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = 2 * I,
        .K = H, .topk = k, .max_rows = (int)flat, .gather_idx = st->gather_idx, .A = x,
        .B = w->w13.data, .b_kn = false, .C = st->act, .C_preact = st->gemm1_out,
        .permute_x = true, .scale_a_rows = llama ? st->topk_w : NULL,
        .epilogue = MOE_EPI_SILU_MUL,
    };
    if (T > 0) MOE_TRY(cpu_grouped_gemm(&g1, err));

    /* GEMM2: [M,I] x [I,H], rows stored at their flat index (Qwen3: times the weight). Flat
     * rows of experts not held here stay zero. */
    if ((size_t)M < flat) memset(st->gemm2_out, 0, flat * H * moe_dtype_size(dt));
    moe_grouped_gemm_args g2 = {
        .dtype = dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = H, .K = I,
        .topk = k, .max_rows = (int)flat, .gather_idx = st->gather_idx, .A = st->act,
        .B = w->w2.data, .b_kn = false, .C = st->gemm2_out, .permute_y = true,
        .scale_c_rows = llama ? NULL : st->topk_w, .epilogue = MOE_EPI_NONE,
    };
    if (T > 0) MOE_TRY(cpu_grouped_gemm(&g2, err));

    moe_status res = MOE_OK;
    void *wcat = NULL, *sact = NULL;
    if (has_shared(c) && T > 0) {
        wcat = stack_shared(w, dt, err);
        sact = moe_malloc((size_t)T * c->shared_inter * moe_dtype_size(dt),
                          "shared expert activation", err);
        if (!wcat || !sact) {
            res = MOE_ERR_NOMEM;
            goto done;
        }
        MOE_TRY_GOTO(shared_forward(w, dt, T, x, wcat, NULL, sact, st->shared_out, err), res,
                     done);
    }
    cpu_sum_topk(dt, T, k, H, st->gemm2_out, NULL, has_shared(c) ? st->shared_out : NULL,
                 st->out);
done:
    free(wcat);
    free(sact);
    return res;
}

/* Scratch of the backward, freed together. */
typedef struct bwd_bufs {
    void *dA0, *dact, *dgu, *dxs, *dlogits;
    float *dtop;
    void *wcat, *sgu, *sact, *dsact, *dsgu, *dwcat;
} bwd_bufs;

static void bwd_free(bwd_bufs *b)
{
    void *all[] = {b->dA0, b->dact, b->dgu, b->dxs, b->dlogits, b->dtop,
                   b->wcat, b->sgu, b->sact, b->dsact, b->dsgu, b->dwcat};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
}

static moe_status shared_backward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                                  const void *dout, void *dx, moe_weights *grads, bwd_bufs *b,
                                  moe_error *err)
{
    int H = w->cfg.hidden, Is = w->cfg.shared_inter;
    size_t es = moe_dtype_size(dt);
    b->wcat = stack_shared(w, dt, err);
    if (!b->wcat) return MOE_ERR_NOMEM;
    if (!(b->sgu = moe_malloc((size_t)T * 2 * Is * es, "shared gate/up", err)) ||
        !(b->sact = moe_malloc((size_t)T * Is * es, "shared act", err)) ||
        !(b->dsact = moe_malloc((size_t)T * Is * es, "shared d act", err)) ||
        !(b->dsgu = moe_malloc((size_t)T * 2 * Is * es, "shared d gate/up", err)) ||
        !(b->dwcat = moe_malloc((size_t)2 * Is * H * es, "shared d gate/up weights", err)))
        return MOE_ERR_NOMEM;
    /* Recompute the forward's gate/up and activation; the output itself is not needed, so
     * it goes to dsact, overwritten below. */
    void *sout = moe_malloc((size_t)T * H * es, "shared out (recompute)", err);
    if (!sout) return MOE_ERR_NOMEM;
    moe_status res = shared_forward(w, dt, T, x, b->wcat, b->sgu, b->sact, sout, err);
    free(sout);
    MOE_TRY(res);
    int32_t off[2] = {0, T};
    /* d act [T,Is] = dout [T,H] @ shared_down [H,Is]. */
    MOE_TRY(cpu_gemm(dt, T, Is, H, dout, w->shared_down.data, true, b->dsact, false, err));
    moe_grouped_gemm_dw_args dd = {
        .dtype = dt, .num_experts = 1, .expert_offsets = off, .N = H, .K = Is,
        .max_rows = T, .topk = 1, .dY = dout, .X = b->sact, .dW = grads->shared_down.data,
    };
    MOE_TRY(cpu_grouped_gemm_dw(&dd, err));
    cpu_silu_mul_backward(dt, T, Is, b->sgu, b->dsact, b->dsgu);
    moe_grouped_gemm_dw_args dgu = {
        .dtype = dt, .num_experts = 1, .expert_offsets = off, .N = 2 * Is, .K = H,
        .max_rows = T, .topk = 1, .dY = b->dsgu, .X = x, .dW = b->dwcat,
    };
    MOE_TRY(cpu_grouped_gemm_dw(&dgu, err));
    size_t half = (size_t)Is * H * es;
    memcpy(grads->shared_gate.data, b->dwcat, half);
    memcpy(grads->shared_up.data, (char *)b->dwcat + half, half);
    /* dx += d gate/up [T,2Is] @ [gate; up] [2Is,H] */
    return cpu_gemm(dt, T, H, 2 * Is, b->dsgu, b->wcat, true, dx, true, err);
}

static void zero_tensor(moe_tensor *t)
{
    if (t->data) memset(t->data, 0, moe_tensor_numel(t) * moe_dtype_size(t->dtype));
}

moe_status cpu_block_backward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                              const moe_fwd_state *st, const void *dout, void *dx,
                              moe_weights *grads, moe_error *err)
{
    static const char who[] = "cpu_block_backward";
    MOE_TRY(check_block(who, w, dt, T, x, err));
    const moe_config *c = &w->cfg;
    int H = c->hidden, I = c->inter, E = c->num_experts, k = c->top_k;
    if (!st) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state is NULL", who);
    if (st->T != T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state is for T = %d, called with T = %d",
                        who, st->T, T);
    const char *missing = !st->router_logits ? "router_logits" : !st->topk_ids ? "topk_ids"
                        : !st->topk_w ? "topk_w" : !st->expert_offsets ? "expert_offsets"
                        : !st->gather_idx ? "gather_idx" : !st->gemm1_out
                        ? "gemm1_out (allocate the state for backward)" : !st->act ? "act"
                        : NULL;
    if (missing)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: state buffer %s is NULL", who, missing);
    if (T > 0 && (!dout || !dx))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: %s is NULL", who, !dout ? "dout" : "dx");
    if (!grads) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: grads is NULL", who);
    int El = w->expert_count;
    MOE_TRY(check_weight_set(who, "grads", grads, c, El, dt, err));
    bool llama = c->arch == MOE_ARCH_LLAMA4;

    if (T == 0) {
        zero_tensor(&grads->router);
        zero_tensor(&grads->w13);
        zero_tensor(&grads->w2);
        if (has_shared(c)) {
            zero_tensor(&grads->shared_gate);
            zero_tensor(&grads->shared_up);
            zero_tensor(&grads->shared_down);
        }
        return MOE_OK;
    }
    int64_t M64;
    size_t flat = (size_t)T * k, es = moe_dtype_size(dt);
    MOE_TRY(cf_check_offsets(who, El, st->expert_offsets, (int)flat, &M64, err));
    size_t M = (size_t)M64;

    bwd_bufs b = {0};
    moe_status res = MOE_OK;
    if (!(b.dA0 = moe_malloc(M * I * es, "dA0", err)) ||
        (!llama && !(b.dact = moe_malloc(M * I * es, "d act", err))) ||
        !(b.dgu = moe_malloc(M * 2 * I * es, "d gate/up", err)) ||
        !(b.dxs = moe_malloc(flat * H * es, "dX per flat row", err)) ||
        !(b.dlogits = moe_malloc((size_t)T * E * es, "d logits", err)) ||
        !(b.dtop = moe_malloc(flat * sizeof(float), "d top-k weights", err))) {
        res = MOE_ERR_NOMEM;
        goto done;
    }
    /* With a slice of the experts, the flat rows of the others carry no gradient: zero d topk
     * weights and zero dXs rows (the router backward is linear in them, so the shares of the
     * slices add up to the whole). */
    memset(b.dtop, 0, flat * sizeof(float));
    if (M < flat) memset(b.dxs, 0, flat * H * es);

    /* dA0 [M,I] = dout[token of r] @ W2_e (W2_e [H,I] read as [K,N]). */
    moe_grouped_gemm_args gA = {
        .dtype = dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = I, .K = H,
        .topk = k, .max_rows = (int)flat, .gather_idx = st->gather_idx, .A = dout,
        .B = w->w2.data, .b_kn = true, .C = b.dA0, .permute_x = true, .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY_GOTO(cpu_grouped_gemm(&gA, err), res, done);
    /* Qwen3: GEMM2's epilogue multiplied by w: d w and d act = w * dA0. */
    void *dact = b.dA0;
    if (!llama) {
        cpu_topk_weight_backward(dt, (int)M, I, st->gather_idx, st->act, b.dA0, st->topk_w,
                                 b.dtop, b.dact);
        dact = b.dact;
    }
    /* dW2_e [H,I] = sum_r (w_f dout_t)^T act_r. */
    moe_grouped_gemm_dw_args dW2 = {
        .dtype = dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = H, .K = I,
        .topk = k, .max_rows = (int)flat, .gather_idx = st->gather_idx, .dY = dout,
        .permute_dy = true, .scale_dy_rows = llama ? NULL : st->topk_w, .X = st->act,
        .dW = grads->w2.data,
    };
    MOE_TRY_GOTO(cpu_grouped_gemm_dw(&dW2, err), res, done);
    cpu_silu_mul_backward(dt, (int)M, I, st->gemm1_out, dact, b.dgu);
    /* dXs [T*k,H] flat = dGU_r @ W13_e (W13_e [2I,H] read as [K,N]), stored at gather[r]. */
    moe_grouped_gemm_args gX = {
        .dtype = dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = H,
        .K = 2 * I, .topk = k, .max_rows = (int)flat, .gather_idx = st->gather_idx, .A = b.dgu,
        .B = w->w13.data, .b_kn = true, .C = b.dxs, .permute_y = true,
        .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY_GOTO(cpu_grouped_gemm(&gX, err), res, done);
    /* dW13_e [2I,H] = sum_r dGU_r^T x_r (Llama-4: the scaled, rounded x_t * s_f). */
    moe_grouped_gemm_dw_args dW13 = {
        .dtype = dt, .num_experts = El, .expert_offsets = st->expert_offsets, .N = 2 * I,
        .K = H, .topk = k, .max_rows = (int)flat, .gather_idx = st->gather_idx, .dY = b.dgu,
        .X = x, .permute_x = true, .scale_x_rows = llama ? st->topk_w : NULL,
        .dW = grads->w13.data,
    };
    MOE_TRY_GOTO(cpu_grouped_gemm_dw(&dW13, err), res, done);
    /* Llama-4: d score_f = dot(d xs_f, x_t). */
    if (llama) cpu_scale_input_backward(dt, T, k, H, x, b.dxs, b.dtop);
    MOE_TRY_GOTO(cpu_route_backward(c, dt, T, st->router_logits, st->topk_ids, b.dtop,
                                    b.dlogits, err), res, done);
    /* d_router [E,H] = dlogits^T x: a one-group weight gradient over the T tokens. */
    int32_t off_t[2] = {0, T};
    moe_grouped_gemm_dw_args dR = {
        .dtype = dt, .num_experts = 1, .expert_offsets = off_t, .N = E, .K = H,
        .max_rows = T, .topk = 1, .dY = b.dlogits, .X = x, .dW = grads->router.data,
    };
    MOE_TRY_GOTO(cpu_grouped_gemm_dw(&dR, err), res, done);
    /* dx = dlogits @ router (+ shared expert) + sum_j (s_f) dXs[t*k+j]. */
    MOE_TRY_GOTO(cpu_gemm(dt, T, H, E, b.dlogits, w->router.data, true, dx, false, err), res,
                 done);
    if (has_shared(c))
        MOE_TRY_GOTO(shared_backward(w, dt, T, x, dout, dx, grads, &b, err), res, done);
    cpu_sum_topk(dt, T, k, H, b.dxs, llama ? st->topk_w : NULL, dx, dx);
done:
    bwd_free(&b);
    return res;
}
