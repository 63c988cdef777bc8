/* ep_cuda_bwd.c — the EP backward on the CUDA backend (see ep_cuda.h): the gradient of the
 * combine is a dispatch (dout rows travel with x), the receiver recomputes GEMM1 and runs the
 * fused path's backward kernels on what arrived, and the gradient of the dispatch is a combine
 * (partial dx rows and fp32 d-weights travel back). Mirrors moe_ep_backward (ep_layer.c) stage
 * by stage, with cuda_block's kernels and cuBLAS settings. Uses buffer set 1 throughout, so a
 * forward captured in a CUDA graph keeps its memory. Compiled only in CUDA builds. */
#ifdef MOE_HAVE_CUDA

#include "ep_cuda_internal.h"

#include <stdlib.h>
#include <string.h>

#include "../dtype.h"
#include "cuda/kernel_launch.h"
#include "ep_pack.h"
#include "moe_kernels.h"
#include "moe_kernels_aux.h"

enum { SET = 1 };

static moe_status reserve_bwd(moe_ep_cuda_ctx *c, int64_t T, int64_t S, int64_t R, int64_t Rmax,
                              moe_error *err)
{
    size_t d = c->dsz, H = (size_t)c->H, I = (size_t)c->I, k = (size_t)c->k,
           E = (size_t)c->E, Is = (size_t)c->Is, G = (size_t)c->G, D = (size_t)c->D;
    size_t t = (size_t)T, s = (size_t)S, r = (size_t)R, rk = (size_t)Rmax * k;
    struct {
        int id;
        size_t bytes;
    } need[] = {
        {DB_LOGITS, t * E * d},      {DB_IDS, t * k * 4},         {DB_W, t * k * d},
        {DB_TDEST, t * D * 4},       {DB_TN, t * 4},              {DB_TROW, t * D * 4},
        {DB_DCOUNT, G * 4},          {DB_BASE, G * 8},            {DB_SGU, t * 2 * Is * d},
        {DB_SACT, t * Is * d},       {DB_SRC_DW, t * k * 4},      {DB_DLOGITS, t * E * d},
        {DB_DXR, t * H * d},         {DB_DXS, t * H * d},         {DB_DSACT, t * Is * d},
        {DB_DSGU, t * 2 * Is * d},   {DB_GREP, (E * H + 3 * Is * H) * 4},
        {DB_SEND_X, s * H * d},      {DB_SEND_IDS, s * k * 4},    {DB_SEND_W, s * k * d},
        {DB_SEND_DOUT, s * H * d},   {DB_BACK, s * H * d},        {DB_BACK_DW, s * k * 4},
        {DB_RECV_X, r * H * d},      {DB_RECV_IDS, r * k * 4},    {DB_RECV_W, r * k * d},
        {DB_RECV_DOUT, r * H * d},   {DB_PART, r * H * d},        {DB_PART_DW, r * k * 4},
        {DB_COUNTS, (size_t)c->epv * 4}, {DB_OFFS, ((size_t)c->epv + 1) * 4},
        {DB_GATHER, rk * 4},
        {DB_SORT, moe_cuda_sort_scratch_bytes((int)(Rmax > 0 ? Rmax : 1), c->k, c->epv)},
        {DB_GU, rk * 2 * I * d},     {DB_ACT, rk * I * d},        {DB_ROWS, rk * H * d},
        {DB_DA0, rk * I * d},        {DB_DGU, rk * 2 * I * d},
    };
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++)
        MOE_TRY(epc_dneed(c, SET, need[i].id, need[i].bytes, err));
    return MOE_OK;
}

/* Backward of virtual rank v's experts on R received rows (ep_layer.c's experts_backward with
 * cuda_block's kernels): the slice's weight gradients dW13 [epv,2I,H] and dW2 [epv,H,I]
 * (overwritten; exact zeros for experts with no rows), the partial input gradient dxp [R,H]
 * (summed over the owned slots, Llama-4's score applied) and the fp32 d-weights dwp [R,k]
 * (0 for slots owned elsewhere). */
static moe_status experts_backward(moe_ep_cuda_ctx *c, int v, int R, const void *x,
                                   const void *dout, const int32_t *ids, const void *w,
                                   void *dW13, void *dW2, void *dxp, float *dwp, moe_error *err)
{
    int k = c->k, H = c->H, I = c->I, epv = c->epv, e0 = (c->rank * c->V + v) * epv;
    size_t w13b = (size_t)epv * 2 * I * H * c->dsz, w2b = (size_t)epv * H * I * c->dsz;
    if (R == 0) {
        EPC_CU(cudaMemsetAsync(dW13, 0, w13b, c->s), "zeroing d w13");
        EPC_CU(cudaMemsetAsync(dW2, 0, w2b, c->s), "zeroing d w2");
        return MOE_OK;
    }
    bool qwen = !c->llama;
    int32_t *offs = epc_d(c, SET, DB_OFFS), *gather = epc_d(c, SET, DB_GATHER);
    void *gu = epc_d(c, SET, DB_GU), *act = epc_d(c, SET, DB_ACT), *rows = epc_d(c, SET, DB_ROWS);
    void *dA0 = epc_d(c, SET, DB_DA0), *dgu = epc_d(c, SET, DB_DGU);
    const int rk = R * k;
    MOE_TRY(moe_cuda_sort_by_expert(R, k, ids, e0, epv, epc_d(c, SET, DB_COUNTS), offs, gather,
                                    epc_d(c, SET, DB_SORT), c->d[SET][DB_SORT].cap, c->s, err));
    /* Forward again, keeping GEMM1's rounded output for the SiLU-and-mul backward. */
    moe_grouped_gemm_args g1 = {
        .dtype = c->dt, .num_experts = epv, .expert_offsets = offs, .N = 2 * I, .K = H,
        .max_rows = rk, .topk = k, .gather_idx = gather, .A = x, .B = epc_w13(c, v), .C = act,
        .C_preact = gu, .permute_x = true, .scale_a_rows = c->llama ? w : NULL,
        .epilogue = MOE_EPI_SILU_MUL,
    };
    MOE_TRY(moe_grouped_gemm_launch(&g1, NULL, &c->tuning, c->s, NULL, err));
    /* dA0 [M,I] = dout[token of r] @ W2_e ([H,I] read as [K,N]). */
    moe_grouped_gemm_args gA = {
        .dtype = c->dt, .num_experts = epv, .expert_offsets = offs, .N = I, .K = H,
        .max_rows = rk, .topk = k, .gather_idx = gather, .A = dout, .B = epc_w2(c, v),
        .b_kn = true, .C = dA0, .permute_x = true, .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(moe_grouped_gemm_launch(&gA, NULL, &c->tuning, c->s, NULL, err));
    /* Slots owned elsewhere get no d-weight from here: zero, not stale. */
    EPC_CU(cudaMemsetAsync(dwp, 0, (size_t)rk * sizeof(float), c->s), "zeroing d-weights");
    /* SiLU-and-mul backward; Qwen3: dact = round(w dA0) and dw_f = act_r . dA0_r fused in. */
    MOE_TRY(moe_cuda_silu_mul_backward(c->dt, rk, offs + epv, I, gu, dA0, qwen ? w : NULL, gather,
                                       act, qwen ? dwp : NULL, dgu, c->s, err));
    /* dW2_e [H,I] = sum_r (w_f dout_t)^T act_r */
    moe_grouped_gemm_dw_args d2 = {
        .dtype = c->dt, .num_experts = epv, .expert_offsets = offs, .N = H, .K = I,
        .max_rows = rk, .topk = k, .gather_idx = gather, .dY = dout, .permute_dy = true,
        .scale_dy_rows = qwen ? w : NULL, .X = act, .dW = dW2,
    };
    MOE_TRY(moe_grouped_gemm_dw_launch(&d2, NULL, &c->tuning, c->s, NULL, err));
    /* dXs [R*k,H] flat = dgu_r @ W13_e ([2I,H] read as [K,N]); unowned slots stay unwritten. */
    moe_grouped_gemm_args gX = {
        .dtype = c->dt, .num_experts = epv, .expert_offsets = offs, .N = H, .K = 2 * I,
        .max_rows = rk, .topk = k, .gather_idx = gather, .A = dgu, .B = epc_w13(c, v),
        .b_kn = true, .C = rows, .permute_y = true, .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(moe_grouped_gemm_launch(&gX, NULL, &c->tuning, c->s, NULL, err));
    /* dW13_e [2I,H] = sum_r dgu_r^T xs_r (Llama-4: xs = round(x_t s_f)) */
    moe_grouped_gemm_dw_args d13 = {
        .dtype = c->dt, .num_experts = epv, .expert_offsets = offs, .N = 2 * I, .K = H,
        .max_rows = rk, .topk = k, .gather_idx = gather, .dY = dgu, .X = x, .permute_x = true,
        .scale_x_rows = c->llama ? w : NULL, .dW = dW13,
    };
    MOE_TRY(moe_grouped_gemm_dw_launch(&d13, NULL, &c->tuning, c->s, NULL, err));
    /* Llama-4: d score_f = x_t . dXs_f (0 for slots owned elsewhere). */
    if (c->llama)
        MOE_TRY(moe_cuda_row_dot(c->dt, rk, H, x, k, rows, ids, e0, epv, dwp, c->s, err));
    return moe_cuda_sum_topk(c->dt, R, k, H, rows, c->llama ? w : NULL, NULL, NULL, ids, e0, epv,
                             dxp, c->s, err);
}

/* Llama-4's shared expert on the local tokens, on s1: forward again, then
 * d act = dout @ down, the SiLU-and-mul backward, dx_shared [T,H] (dtype) and the fp32 weight
 * gradient partials g_gu [2Is,H] and g_down [H,Is] (summed over ranks later). */
static moe_status shared_backward(moe_ep_cuda_ctx *c, int T, const void *x, const void *dout,
                                  float *g_gu, float *g_down, moe_error *err)
{
    int H = c->H, Is = c->Is;
    void *sgu = epc_d(c, SET, DB_SGU), *sact = epc_d(c, SET, DB_SACT);
    void *dsact = epc_d(c, SET, DB_DSACT), *dsgu = epc_d(c, SET, DB_DSGU);
    MOE_TRY(epc_shared_forward(c, SET, T, x, NULL, err));
    MOE_TRY(epc_gemm(c, c->h1, c->dt, T, Is, H, dout, H, false, c->sdown, Is, true, dsact, Is,
                     "shared d act GEMM", err));
    MOE_TRY(epc_gemm(c, c->h1, MOE_DTYPE_F32, H, Is, T, dout, H, true, sact, Is, true, g_down, Is,
                     "shared d down GEMM", err));
    MOE_TRY(moe_cuda_silu_mul_backward(c->dt, T, NULL, Is, sgu, dsact, NULL, NULL, NULL, NULL,
                                       dsgu, c->s1, err));
    MOE_TRY(epc_gemm(c, c->h1, MOE_DTYPE_F32, 2 * Is, H, T, dsgu, 2 * Is, true, x, H, true, g_gu,
                     H, "shared d gate|up GEMM", err));
    return epc_gemm(c, c->h1, c->dt, T, H, 2 * Is, dsgu, 2 * Is, false, c->sgu_w, H, true,
                    epc_d(c, SET, DB_DXS), H, "shared dx GEMM", err);
}

static moe_status plain_backward(moe_ep_cuda_ctx *c, int T, const void *x, const void *dout,
                                 void *dx, const cuda_block_grads *g, moe_error *err)
{
    MOE_TRY(epc_plain_block(c, T, true, err));
    moe_fwd_state fs;
    moe_status st = cuda_fwd_state_alloc(c->blk, T, true, &fs, err);
    if (st != MOE_OK) return st;
    st = cuda_block_forward(c->blk, x, T, &fs, true, err);
    if (st == MOE_OK) st = cuda_block_backward(c->blk, x, T, &fs, dout, dx, g, err);
    if (st == MOE_OK) st = cuda_block_sync(c->blk, err); /* before the state is freed */
    cuda_fwd_state_free(&fs);
    c->ep->call.tokens_computed = (uint64_t)T;
    c->ep->call.expert_rows = (uint64_t)T * c->k;
    return st;
}

/* Sum the fp32 partials of the replicated gradients over the ranks (ascending rank order),
 * round once and store them into the device gradients. */
static moe_status replicated_grads(moe_ep_cuda_ctx *c, const cuda_block_grads *g, moe_error *err)
{
    size_t EH = (size_t)c->E * c->H, IsH = (size_t)c->Is * c->H, n = EH + 3 * IsH;
    float *h = c->h_grep;
    MOE_TRY(ep_allreduce_ordered(c->ep->comm, c->rank, c->N, h, n, err));
    void *tmp = moe_malloc((n ? n : 1) * c->dsz, "rounded gradients", err);
    if (!tmp) return MOE_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) moe_store_elem_f(c->dt, tmp, i, h[i]);
    struct {
        void *dst;
        size_t off, count;
    } parts[4] = {
        {g->router, 0, EH},
        {g->shared_gate, EH, IsH},
        {g->shared_up, EH + IsH, IsH},
        {g->shared_down, EH + 2 * IsH, IsH},
    };
    moe_status st = MOE_OK;
    for (int i = 0; i < (c->shared ? 4 : 1) && st == MOE_OK; i++) {
        cudaError_t e = cudaMemcpy(parts[i].dst, (char *)tmp + parts[i].off * c->dsz,
                                   parts[i].count * c->dsz, cudaMemcpyHostToDevice);
        if (e != cudaSuccess)
            st = moe_fail(err, MOE_ERR_CUDA, "rank %d: replicated gradients to the device: %s",
                          c->rank, cudaGetErrorString(e));
    }
    free(tmp);
    return st;
}

moe_status moe_ep_cuda_backward(moe_ep_cuda_ctx *c, int T, const void *x, const void *dout,
                                void *dx, const cuda_block_grads *grads, moe_ep_stats *stats,
                                moe_error *err)
{
    if (!c) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_cuda_backward: ctx is NULL");
    double t0 = moe_now();
    moe_ep_stats_reset(&c->ep->call);
    moe_status st = epc_check_call(c, "moe_ep_cuda_backward", T, x, dout, "dout", dx, "dx", err);
    if (st == MOE_OK && (!grads || !grads->router || !grads->w13 || !grads->w2 ||
                         (c->shared && (!grads->shared_gate || !grads->shared_up ||
                                        !grads->shared_down))))
        st = moe_fail(err, MOE_ERR_INVALID_ARG,
                      "moe_ep_cuda_backward: grads or one of its tensors is NULL");
    if (st == MOE_OK && cudaSetDevice(c->device) != cudaSuccess)
        st = moe_fail(err, MOE_ERR_CUDA, "rank %d: cudaSetDevice(%d)", c->rank, c->device);
    if (!c->plain) st = ep_agree(c->ep->comm, st, err);
    if (st != MOE_OK) return st;
    c->ep->call.calls_backward = 1;
    c->ep->call.tokens_local = (uint64_t)T;
    if (c->plain) {
        st = plain_backward(c, T, x, dout, dx, grads, err);
        epc_call_end(c, stats, t0);
        return st;
    }

    int H = c->H, E = c->E, k = c->k, Is = c->Is;
    size_t dsz = c->dsz, xrow = (size_t)H * dsz, idrow = (size_t)k * 4, wrow = (size_t)k * dsz;
    size_t EH = (size_t)E * H, n_rep = EH + 3 * (size_t)Is * H;
    int64_t g0 = 0;
    if (c->forced && (st = epc_global_offset(c, T, &g0, err)) != MOE_OK) return ep_fatal(c->ep, st, err);

    /* 1. local: buffers, the shared expert's backward on s1, routing (agreed in the plan). */
    st = reserve_bwd(c, T, 0, 0, 0, err);
    if (st == MOE_OK && !c->h_grep) {
        cudaError_t e = cudaMallocHost((void **)&c->h_grep, n_rep * sizeof(float) + 16);
        if (e != cudaSuccess) {
            c->h_grep = NULL;
            st = moe_fail(err, MOE_ERR_NOMEM, "rank %d: pinned gradient buffer", c->rank);
        }
    }
    float *grep = epc_d(c, SET, DB_GREP);
    void *logits = epc_d(c, SET, DB_LOGITS), *w = epc_d(c, SET, DB_W);
    int32_t *ids = epc_d(c, SET, DB_IDS);
    if (st == MOE_OK && cudaMemsetAsync(grep, 0, n_rep * sizeof(float), c->s) != cudaSuccess)
        st = moe_fail(err, MOE_ERR_CUDA, "rank %d: zeroing the gradient partials", c->rank);
    if (st == MOE_OK && c->shared && T > 0) {
        st = epc_fork(c, err); /* after the zeroing: s1 writes its part of grep */
        if (st == MOE_OK)
            st = shared_backward(c, T, x, dout, grep + EH, grep + EH + 2 * (size_t)Is * H, err);
    }
    if (st == MOE_OK) st = epc_route(c, SET, T, x, g0, logits, ids, w, err);
    if (st != MOE_OK) return ep_agree(c->ep->comm, st, err); /* matches the plan's agreement */

    /* 2. plan, counts, buffers: agreed before any payload moves. */
    ep_plan plan;
    int phase;
    st = epc_plan_sized(c, SET, T, ids, 1, NULL, &plan, &phase, err);
    if (phase != EPC_PLAN_EXCHANGED) {
        ep_plan_free(&plan);
        return st;
    }
    if (st == MOE_OK) st = reserve_bwd(c, T, plan.send_total, plan.recv_total, plan.recv_max_round, err);
    st = ep_agree(c->ep->comm, st, err);
    if (st != MOE_OK) {
        ep_plan_free(&plan);
        return st;
    }

    /* 3. dispatch x and dout (the gradient of the combine). */
    st = moe_cuda_ep_pack(T, k, c->G, c->epv, xrow, dsz, x, dout, ids, w,
                          epc_d(c, SET, DB_TDEST), epc_d(c, SET, DB_TN), epc_d(c, SET, DB_TROW),
                          epc_d(c, SET, DB_BASE), epc_d(c, SET, DB_SEND_X),
                          epc_d(c, SET, DB_SEND_DOUT), epc_d(c, SET, DB_SEND_IDS),
                          epc_d(c, SET, DB_SEND_W), c->s, err);
    {
        void *snd[4] = {epc_d(c, SET, DB_SEND_X), epc_d(c, SET, DB_SEND_IDS),
                        epc_d(c, SET, DB_SEND_W), epc_d(c, SET, DB_SEND_DOUT)};
        void *rcv[4] = {epc_d(c, SET, DB_RECV_X), epc_d(c, SET, DB_RECV_IDS),
                        epc_d(c, SET, DB_RECV_W), epc_d(c, SET, DB_RECV_DOUT)};
        size_t row[4] = {xrow, idrow, wrow, xrow};
        int hs[4] = {DB_SEND_X, DB_SEND_IDS, DB_SEND_W, DB_SEND_DOUT};
        int hr[4] = {DB_RECV_X, DB_RECV_IDS, DB_RECV_W, DB_RECV_DOUT};
        static const char *const wd[4] = {"dispatch x rows", "dispatch expert ids",
                                          "dispatch weights", "dispatch dout rows"};
        if (st == MOE_OK) st = epc_exchange(c, SET, &plan, false, 4, snd, rcv, row, hs, hr, wd, err);
    }
    /* 4. every virtual rank's experts on what arrived. */
    for (int v = 0; v < c->V && st == MOE_OK; v++) {
        int64_t R = ep_round_recv_rows(&plan, 0, v), rb = ep_round_recv_base(&plan, 0, v);
        size_t off13 = (size_t)v * c->epv * 2 * c->I * H * dsz;
        size_t off2 = (size_t)v * c->epv * H * c->I * dsz;
        st = experts_backward(c, v, (int)R, (char *)epc_d(c, SET, DB_RECV_X) + rb * xrow,
                              (char *)epc_d(c, SET, DB_RECV_DOUT) + rb * xrow,
                              (const int32_t *)((char *)epc_d(c, SET, DB_RECV_IDS) + rb * idrow),
                              (char *)epc_d(c, SET, DB_RECV_W) + rb * wrow,
                              (char *)grads->w13 + off13, (char *)grads->w2 + off2,
                              (char *)epc_d(c, SET, DB_PART) + rb * xrow,
                              (float *)epc_d(c, SET, DB_PART_DW) + rb * k, err);
    }
    /* 5. partial dx rows and d-weights back (the gradient of the dispatch). */
    {
        void *snd[2] = {epc_d(c, SET, DB_PART), epc_d(c, SET, DB_PART_DW)};
        void *rcv[2] = {epc_d(c, SET, DB_BACK), epc_d(c, SET, DB_BACK_DW)};
        size_t row[2] = {xrow, (size_t)k * sizeof(float)};
        int hs[2] = {DB_PART, DB_PART_DW}, hr[2] = {DB_BACK, DB_BACK_DW};
        static const char *const wc[2] = {"combine dx rows", "combine d-weights"};
        if (st == MOE_OK) st = epc_exchange(c, SET, &plan, true, 2, snd, rcv, row, hs, hr, wc, err);
    }
    /* 6. the source: d-weights from each slot's owner, the router's backward, and
     * dx = round(dlogits @ router + shared dx + partial dx rows in ascending rank order). */
    if (st == MOE_OK && T > 0) {
        float *dw = epc_d(c, SET, DB_SRC_DW);
        void *dlog = epc_d(c, SET, DB_DLOGITS);
        bool router_grad = !(c->forced && c->ep->opts.route.weights == MOE_EP_ROUTE_W_UNIFORM);
        st = moe_cuda_ep_dweights(T, k, c->G, c->epv, ids, epc_d(c, SET, DB_BACK_DW),
                                  epc_d(c, SET, DB_BASE), epc_d(c, SET, DB_TDEST),
                                  epc_d(c, SET, DB_TN), epc_d(c, SET, DB_TROW), dw, c->s, err);
        if (st == MOE_OK && router_grad)
            st = moe_cuda_router_backward(&c->cfg, c->dt, T, logits, ids, dw, dlog, c->s, err);
        if (st == MOE_OK && !router_grad &&
            cudaMemsetAsync(dlog, 0, (size_t)T * E * dsz, c->s) != cudaSuccess)
            st = moe_fail(err, MOE_ERR_CUDA, "rank %d: zeroing d logits", c->rank);
        if (st == MOE_OK)
            st = epc_gemm(c, c->h, MOE_DTYPE_F32, E, H, T, dlog, E, true, x, H, true, grep, H,
                          "d router GEMM", err);
        if (st == MOE_OK)
            st = epc_gemm(c, c->h, c->dt, T, H, E, dlog, E, false, c->router, H, true,
                          epc_d(c, SET, DB_DXR), H, "dx router GEMM", err);
        if (st == MOE_OK && c->shared) st = epc_join(c, err);
        if (st == MOE_OK)
            st = moe_cuda_ep_reduce(c->dt, T, H, c->G, k, epc_d(c, SET, DB_DXR),
                                    c->shared ? epc_d(c, SET, DB_DXS) : NULL,
                                    epc_d(c, SET, DB_BACK), epc_d(c, SET, DB_BASE),
                                    epc_d(c, SET, DB_TDEST), epc_d(c, SET, DB_TN),
                                    epc_d(c, SET, DB_TROW), dx, c->s, err);
    }
    if (st == MOE_OK) {
        cudaError_t e = cudaMemcpyAsync(c->h_grep, grep, n_rep * sizeof(float),
                                        cudaMemcpyDeviceToHost, c->s);
        st = e == cudaSuccess ? epc_stream_wait(c, err)
                              : moe_fail(err, MOE_ERR_CUDA, "rank %d: gradient partials: %s",
                                         c->rank, cudaGetErrorString(e));
    }
    if (st == MOE_OK) epc_count(c, &plan, true);
    ep_plan_free(&plan);
    if (st != MOE_OK) return ep_fatal(c->ep, st, err);
    /* 7. router and shared expert are replicated: their gradients sum over every rank. */
    st = ep_agree(c->ep->comm, st, err);
    if (st == MOE_OK) st = replicated_grads(c, grads, err);
    if (st != MOE_OK) return ep_fatal(c->ep, st, err);
    epc_call_end(c, stats, t0);
    return MOE_OK;
}

#endif /* MOE_HAVE_CUDA */
