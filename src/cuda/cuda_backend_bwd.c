/* cuda_backend_bwd.c — the layer's operations on a CUDA GPU, part 2: the experts' backward,
 * the shared expert's and the router's backward, the gradient layouts and the ordered sum of
 * every rank's partials, the expert-parallel plan/pack/reduce and sync-free slot kernels, and
 * the query of what the device recorded (see cuda_backend.c for the streams and the rules). */
#ifdef MOE_HAVE_CUDA

#include <stdio.h>
#include <string.h>

#include "cuda_backend.h"

/* ------------------------------------------------------------------ backward ---- */

/* The backward of one slice's experts on R rows (layer.h, moe_experts_bwd_args):
 *   [sort + GEMM1 again, keeping its rounded output, unless the forward's were saved] ->
 *   dA0 = dout W2 (permute_x) -> SiLU-and-mul backward (Qwen3: dact = round(w dA0) and
 *   dw_f = act_r . dA0_r fused in) -> dW2 -> dXs = dgu W13 (permute_y) -> dW13 ->
 *   [Llama-4: ds_f = x_t . dXs_f]. */
moe_status cb_experts_backward(moe_layer *L, const moe_experts_bwd_args *a, moe_error *err)
{
    const int R = a->R, count = a->count, k = L->k, H = L->H, I = L->I;
    const bool qwen = !L->llama;
    const size_t dsz = L->dsz, rk = (size_t)R * k;
    const int rc = R > a->rows_cap ? R : a->rows_cap;
    const size_t rkc = (size_t)rc * k;
    cudaStream_t s = cb_main(L);
    if (rk) CB_CUDA(cudaMemsetAsync(a->dtop, 0, rk * sizeof(float), s), "zeroing d top-k");
    if (R == 0 || count == 0) {
        CB_CUDA(cudaMemsetAsync(a->dW13, 0, (size_t)count * 2 * I * H * dsz, s), "zeroing dW13");
        CB_CUDA(cudaMemsetAsync(a->dW2, 0, (size_t)count * H * I * dsz, s), "zeroing dW2");
        return MOE_OK;
    }
    const int32_t *offs = a->offsets, *gather = a->gather;
    const void *gu = a->gemm1_out, *act = a->act;
    if (!offs || !gather || !gu || !act) {
        /* forward again, keeping GEMM1's rounded output for the SiLU-and-mul backward */
        int32_t *c2, *o2, *g2;
        void *gu2, *act2;
        MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_COUNTS, (size_t)(count + 1) * 4, (void **)&c2, err));
        MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_OFFS, (size_t)(count + 1) * 4, (void **)&o2, err));
        MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_GATHER, rkc * 4, (void **)&g2, err));
        MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_GU, rkc * 2 * I * dsz, &gu2, err));
        MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_ACT, rkc * I * dsz, &act2, err));
        MOE_TRY(cb_sort(L, R, count, a->ids, rc, c2, o2, g2, err));
        moe_grouped_gemm_args g1 = {
            .dtype = L->dt, .num_experts = count, .expert_offsets = o2, .N = 2 * I, .K = H,
            .max_rows = (int)rk, .topk = k, .gather_idx = g2, .A = a->x,
            .B = moe_layer_w13(L, a->first), .C = act2, .C_preact = gu2, .permute_x = true,
            .scale_a_rows = L->llama ? a->w : NULL, .epilogue = MOE_EPI_SILU_MUL,
        };
        MOE_TRY(cb_run_gemm(L, MOE_GEMM_FWD1, &g1, err));
        offs = o2;
        gather = g2;
        gu = gu2;
        act = act2;
    }
    void *dA0, *dgu;
    MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_DA0, rkc * I * dsz, &dA0, err));
    MOE_TRY(moe_ws_need(L->ws, L->ws_set, WB_DGU, rkc * 2 * I * dsz, &dgu, err));
    /* dA0 [M,I] = dout[token of r] @ W2_e ([H,I] read as [K,N]) */
    moe_grouped_gemm_args gA = {
        .dtype = L->dt, .num_experts = count, .expert_offsets = offs, .N = I, .K = H,
        .max_rows = (int)rk, .topk = k, .gather_idx = gather, .A = a->dout,
        .B = moe_layer_w2(L, a->first), .b_kn = true, .C = dA0, .permute_x = true,
        .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(cb_run_gemm(L, MOE_GEMM_BWD_DA, &gA, err));
    /* SiLU-and-mul backward; rows past M (on the device: offs[count]) return at once */
    MOE_TRY(moe_cuda_silu_mul_backward(L->dt, (int)rk, offs + count, I, gu, dA0,
                                       qwen ? a->w : NULL, gather, act, qwen ? a->dtop : NULL,
                                       dgu, s, err));
    /* dW2_e [H,I] = sum_r (w_f dout_t)^T act_r */
    moe_grouped_gemm_dw_args d2 = {
        .dtype = L->dt, .num_experts = count, .expert_offsets = offs, .N = H, .K = I,
        .max_rows = (int)rk, .topk = k, .gather_idx = gather, .dY = a->dout,
        .permute_dy = true, .scale_dy_rows = qwen ? a->w : NULL, .X = act, .dW = a->dW2,
    };
    MOE_TRY(cb_run_gemm_dw(L, MOE_GEMM_DW2, &d2, err));
    /* dXs [R*k,H] flat = dgu_r @ W13_e ([2I,H] read as [K,N]), stored at gather[r] */
    moe_grouped_gemm_args gX = {
        .dtype = L->dt, .num_experts = count, .expert_offsets = offs, .N = H, .K = 2 * I,
        .max_rows = (int)rk, .topk = k, .gather_idx = gather, .A = dgu,
        .B = moe_layer_w13(L, a->first), .b_kn = true, .C = a->dxs, .permute_y = true,
        .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(cb_run_gemm(L, MOE_GEMM_BWD_DX, &gX, err));
    /* dW13_e [2I,H] = sum_r dgu_r^T xs_r (Llama-4: xs = round(x_t s_f)) */
    moe_grouped_gemm_dw_args d13 = {
        .dtype = L->dt, .num_experts = count, .expert_offsets = offs, .N = 2 * I, .K = H,
        .max_rows = (int)rk, .topk = k, .gather_idx = gather, .dY = dgu, .X = a->x,
        .permute_x = true, .scale_x_rows = L->llama ? a->w : NULL, .dW = a->dW13,
    };
    MOE_TRY(cb_run_gemm_dw(L, MOE_GEMM_DW13, &d13, err));
    /* Llama-4: d score_f = x_t . dXs_f (slots of other slices: 0, their rows unwritten) */
    if (L->llama)
        MOE_TRY(moe_cuda_row_dot(L->dt, (int)rk, H, a->x, k, a->dxs, a->ids, 0, count, a->dtop,
                                 s, err));
    return MOE_OK;
}

/* Shared expert backward on the side stream: dsact = dout @ Wsd; g_down = dout^T sact;
 * dsgu = the SiLU-and-mul backward; g_gu [2Is,H] = dsgu^T x; dx_shared = dsgu @ [Wsg;Wsu]. */
moe_status cb_shared_backward(moe_layer *L, int T, const void *x, const void *dout,
                              const void *sgu, const void *sact, void *dsact, void *dsgu,
                              void *dx_shared, moe_dtype gdt, void *g_gu, void *g_down,
                              moe_error *err)
{
    const int H = L->H, Is = L->Is;
    if (T == 0) {
        CB_CUDA(cudaMemsetAsync(g_gu, 0, (size_t)2 * Is * H * moe_dtype_size(gdt), cb_side(L)), "zeroing");
        CB_CUDA(cudaMemsetAsync(g_down, 0, (size_t)H * Is * moe_dtype_size(gdt), cb_side(L)), "zeroing");
        return MOE_OK;
    }
    MOE_TRY(cb_gemm(L, true, L->dt, T, Is, H, dout, H, false, L->w.shared_down, Is, true, dsact,
                    Is, "shared d act GEMM", err));
    MOE_TRY(cb_gemm(L, true, gdt, H, Is, T, dout, H, true, sact, Is, true, g_down, Is,
                    "shared d down GEMM", err));
    MOE_TRY(moe_cuda_silu_mul_backward(L->dt, T, NULL, Is, sgu, dsact, NULL, NULL, NULL, NULL,
                                       dsgu, cb_side(L), err));
    MOE_TRY(cb_gemm(L, true, gdt, 2 * Is, H, T, dsgu, 2 * Is, true, x, H, true, g_gu, H,
                    "shared d gate|up GEMM", err));
    return cb_gemm(L, true, L->dt, T, H, 2 * Is, dsgu, 2 * Is, false, L->w.shared_gu, H, true,
                   dx_shared, H, "shared dx GEMM", err);
}

moe_status cb_router_backward(moe_layer *L, int T, const void *x, const void *logits,
                              const int32_t *ids, const float *dtop, bool through_topk,
                              const void *d_logits_in, void *dlogits, moe_dtype gdt,
                              void *g_router, void *dx_router, moe_error *err)
{
    const int E = L->E, H = L->H;
    cudaStream_t s = cb_main(L);
    if (through_topk)
        MOE_TRY(moe_cuda_router_backward(&L->cfg, L->dt, T, logits, ids, dtop, dlogits, s, err));
    else
        CB_CUDA(cudaMemsetAsync(dlogits, 0, (size_t)T * E * L->dsz, s), "zeroing d logits");
    /* the gradient of the logits as an output, added as autograd adds them (one rounding):
     * the k = 1 sum over "rows" dlogits with add = d_logits_in */
    if (d_logits_in && T > 0)
        MOE_TRY(moe_cuda_sum_topk(L->dt, T, 1, E, dlogits, NULL, d_logits_in, NULL, NULL, 0, 0,
                                  dlogits, s, err));
    /* g_router [E,H] = dlogits^T x; dx_router [T,H] = dlogits @ router */
    MOE_TRY(cb_gemm(L, false, gdt, E, H, T, dlogits, E, true, x, H, true, g_router, H,
                    "d router GEMM", err));
    if (!dx_router) return MOE_OK;
    return cb_gemm(L, false, L->dt, T, H, E, dlogits, E, false, L->w.router, H, true, dx_router,
                   H, "dx router GEMM", err);
}

moe_status cb_transpose(moe_layer *L, int n, int r, int c, const void *src, void *dst,
                        moe_error *err)
{
    return moe_cuda_transpose(n, r, c, L->dsz, src, dst, cb_main(L), err);
}

moe_status cb_sum_parts(moe_layer *L, int n_parts, size_t n, const float *parts, moe_dtype dt,
                        void *dst, moe_error *err)
{
    return moe_cuda_sum_parts(dt, n_parts, n, parts, dst, cb_main(L), err);
}

moe_status cb_round_f32(moe_layer *L, size_t n, const float *src, void *dst, moe_error *err)
{
    return moe_cuda_sum_parts(L->dt, 1, n, src, dst, cb_main(L), err);
}

/* ------------------------------------------------------------------ expert parallelism ---- */

moe_status cb_ep_plan(moe_layer *L, int T, const int32_t *ids, int32_t *tdest, int32_t *tn,
                      int32_t *trow, int32_t *dcount, moe_error *err)
{
    return moe_cuda_ep_plan(T, L->k, ids, L->E, L->d_vowner, L->map.G, tdest, tn, trow, dcount,
                            NULL, cb_main(L), err);
}

moe_status cb_ep_pack(moe_layer *L, int T, const void *x, const void *dout, const int32_t *ids,
                      const void *w, const int32_t *tdest, const int32_t *tn,
                      const int32_t *trow, const int64_t *base, void *sx, void *sdout,
                      int32_t *sids, void *sw, moe_error *err)
{
    return moe_cuda_ep_pack(T, L->k, L->map.G, L->d_vowner, L->d_vlocal, (size_t)L->H * L->dsz,
                            L->dsz, x, dout, ids, w, tdest, tn, trow, base, sx, sdout, sids, sw,
                            cb_main(L), err);
}

moe_status cb_ep_reduce(moe_layer *L, int T, const void *add, const void *add2, const void *back,
                        const int64_t *base, const int32_t *tdest, const int32_t *tn,
                        const int32_t *trow, void *out, moe_error *err)
{
    return moe_cuda_ep_reduce(L->dt, T, L->H, L->map.G, L->k, add, add2, back, base, tdest, tn,
                              trow, out, cb_main(L), err);
}

moe_status cb_ep_dweights(moe_layer *L, int T, const int32_t *ids, const float *back_dw,
                          const int64_t *base, const int32_t *tdest, const int32_t *tn,
                          const int32_t *trow, float *dw, moe_error *err)
{
    return moe_cuda_ep_dweights(T, L->k, L->map.G, L->d_vowner, ids, back_dw, base, tdest, tn,
                                trow, dw, cb_main(L), err);
}

moe_status cb_ep_slot_counts(moe_layer *L, const int32_t *dcount, int32_t *scnt, moe_error *err)
{
    return moe_cuda_ep_slot_counts(L->map.N, L->map.V, dcount, scnt, cb_main(L), err);
}

moe_status cb_ep_compact(moe_layer *L, int64_t slot_rows, const int32_t *rcnt, const void *sx,
                         const int32_t *sids, const void *sw, const void *sdout, int64_t cap,
                         void *cx, int32_t *cids, void *cw, void *cdout, moe_error *err)
{
    cuda_state *s = L->be;
    const size_t xrow = (size_t)L->H * L->dsz;
    MOE_TRY(moe_cuda_ep_compact(L->map.N, slot_rows, rcnt, L->k, xrow, L->dsz, sx, sids, sw, cap,
                                cx, cids, cw, s->d_status, cb_main(L), err));
    if (sdout)
        MOE_TRY(moe_cuda_ep_compact_rows(L->map.N, slot_rows, rcnt, xrow, sdout, cap, cdout,
                                         cb_main(L), err));
    return MOE_OK;
}

moe_status cb_ep_check_total(moe_layer *L, int n, const int32_t *rcnt, int64_t limit,
                             moe_error *err)
{
    cuda_state *s = L->be;
    return moe_cuda_ep_check_total(n, rcnt, limit, s->d_status, cb_main(L), err);
}

moe_status cb_ep_expand(moe_layer *L, int64_t slot_rows, const int32_t *rcnt, size_t row_bytes,
                        const void *compact, int64_t cap, void *slots, moe_error *err)
{
    return moe_cuda_ep_expand(L->map.N, slot_rows, rcnt, row_bytes, compact, cap, slots,
                              cb_main(L), err);
}

/* ------------------------------------------------------------------ errors and reports ---- */

moe_status cb_check_errors(moe_layer *L, moe_error *err)
{
    cuda_state *s = L->be;
    int32_t h[4] = {0};
    CB_CUDA(cudaMemcpy(h, s->d_status, sizeof h, cudaMemcpyDeviceToHost), "reading the status flags");
    if (h[0] == 0 && h[2] == 0) return MOE_OK;
    /* cleared before returning: a cudaMemset on the legacy stream could land after the next
     * call's kernels (on non-blocking streams) raised the flag again, losing that report */
    CB_CUDA(cudaMemsetAsync(s->d_status, 0, sizeof h, s->own), "clearing the status flags");
    CB_CUDA(cudaStreamSynchronize(s->own), "clearing the status flags");
    if (h[0])
        return moe_fail(err, MOE_ERR_OVERFLOW,
                        "rank %d: receive buffer overflow in a sync-free call: %d token rows "
                        "arrived but the buffers hold %lld (max_recv_tokens); the rows past the "
                        "bound were not computed, so that call's output is not valid. Raise "
                        "max_recv_tokens or rebalance the routing",
                        L->map.rank, h[1], L->ep ? (long long)L->ep->max_recv : 0LL);
    return moe_fail(err, MOE_ERR_NONFINITE,
                    "%d token(s) had non-finite router logits (NaN or Inf in the input or the "
                    "router weights); their outputs are not meaningful", h[2]);
}

void cb_gemm_report(const moe_layer *L, int g, char *kernel, size_t klen, char *config,
                    size_t clen)
{
    const cuda_state *s = L->be;
    const moe_kernel_report *r = &s->rep[g];
    if (klen) kernel[0] = '\0';
    if (clen) config[0] = '\0';
    if (!r->kernel) return;
    const moe_kernel_config *c = &r->config;
    snprintf(kernel, klen, "%s", r->kernel);
    snprintf(config, clen, "%dx%dx%d,w%d,s%d%s%s%s%s", c->tile_m, c->tile_n, c->tile_k, c->warps,
             c->stages, r->used_tma ? ",tma" : "", c->cluster > 1 ? ",c2" : "",
             r->staged_epilogue ? ",staged" : "", r->a_tma ? ",atma" : "");
}

#endif /* MOE_HAVE_CUDA */
