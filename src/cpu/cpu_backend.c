/* cpu_backend.c — the layer's operations on the CPU (layer.h's moe_layer_backend_ops): the
 * fused path's CPU twins (cpu_fused.h) and the EP twins (cpu_ep.h) on host memory. Every
 * operation runs to completion on the calling thread's OpenMP team; there is one "stream".
 * Scratch comes from the layer's workspace, set L->ws_set. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "../layer/layer.h"
#include "cpu_ep.h"
#include "cpu_fused.h"
#include "cpu_fused_internal.h"

typedef struct cpu_state {
    double marks[MOE_NUM_MARKS];
    uint64_t nonfinite_tokens; /* tokens with a NaN/Inf router logit since the last check */
    void *shared_gu;           /* the stacked [2Is,H] shared gate|up */
} cpu_state;

static moe_status scratch(moe_layer *L, int id, size_t bytes, void **p, moe_error *err)
{
    return moe_ws_need(L->ws, L->ws_set, id, bytes, p, err);
}

static moe_status c_place(moe_layer *L, moe_error *err)
{
    cpu_state *s = L->be;
    if (!L->borrowed) {
        /* the host copy is what the CPU reads */
        L->w.router = L->host.router.data;
        L->w.w13 = L->host.w13.data;
        L->w.w2 = L->host.w2.data;
        L->w.shared_down = L->host.shared_down.data;
    }
    L->bytes_resident = (uint64_t)L->E * L->H * L->dsz +
                        (uint64_t)L->map.El * 3 * L->I * L->H * L->dsz;
    if (!L->shared) return MOE_OK;
    /* gate rows then up rows, like a routed expert's w13: one GEMM with the SiLU-and-mul
     * epilogue runs the shared expert's first half */
    const size_t half = (size_t)L->Is * L->H * L->dsz;
    if (!s->shared_gu) {
        s->shared_gu = moe_malloc(2 * half, "shared expert gate|up", err);
        if (!s->shared_gu) return MOE_ERR_NOMEM;
    }
    memcpy(s->shared_gu, L->host.shared_gate.data, half);
    memcpy((char *)s->shared_gu + half, L->host.shared_up.data, half);
    L->w.shared_gu = s->shared_gu;
    L->bytes_resident += 3 * (uint64_t)half;
    return MOE_OK;
}

static moe_status c_create(moe_layer *L, moe_error *err)
{
    L->be = moe_calloc(1, sizeof(cpu_state), "CPU backend state", err);
    if (!L->be) return MOE_ERR_NOMEM;
    return c_place(L, err);
}

static void c_destroy(moe_layer *L)
{
    cpu_state *s = L->be;
    if (s) free(s->shared_gu);
    free(L->be);
    L->be = NULL;
}

static moe_status c_copy(moe_layer *L, void *dst, const void *src, size_t bytes, moe_error *err)
{
    (void)L;
    (void)err;
    if (bytes && dst != src) memmove(dst, src, bytes);
    return MOE_OK;
}

static moe_status c_zero(moe_layer *L, void *p, size_t bytes, moe_error *err)
{
    (void)L;
    (void)err;
    if (bytes) memset(p, 0, bytes);
    return MOE_OK;
}

static moe_status c_nop(moe_layer *L, moe_error *err)
{
    (void)L;
    (void)err;
    return MOE_OK;
}

static moe_status c_enter(moe_layer *L, moe_error *err)
{
    (void)err;
    omp_set_num_threads(L->threads);
    return MOE_OK;
}

static moe_status c_mark(moe_layer *L, int marker, bool side, moe_error *err)
{
    (void)side;
    (void)err;
    cpu_state *s = L->be;
    /* a call starts: forget the previous call's marks, so a phase this call does not run
     * reads -1 rather than the previous call's time */
    if (marker == MOE_MARK_START) memset(s->marks, 0, sizeof s->marks);
    if (marker >= 0 && marker < MOE_NUM_MARKS) s->marks[marker] = moe_now();
    return MOE_OK;
}

static double c_mark_ms(moe_layer *L, int from, int to)
{
    cpu_state *s = L->be;
    if (from < 0 || to < 0 || from >= MOE_NUM_MARKS || to >= MOE_NUM_MARKS) return -1;
    if (s->marks[from] == 0 || s->marks[to] == 0) return -1;
    return (s->marks[to] - s->marks[from]) * 1e3;
}

/* ---- routing ---- */

static moe_status c_route(moe_layer *L, int T, const void *x, void *logits, int32_t *ids,
                          void *w, int32_t *counts, int32_t *offsets, int32_t *gather,
                          moe_error *err)
{
    if (T == 0) return MOE_OK;
    MOE_TRY(cpu_router_logits(L->dt, T, L->H, L->E, x, L->w.router, logits, err));
    /* tokens with a non-finite logit (moe_layer_check_errors reports them) */
    uint64_t bad = 0;
    const int E = L->E;
    const moe_dtype dt = L->dt;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (cf_par((int64_t)T * E))
    for (int t = 0; t < T; t++) {
        int b = 0;
        for (int e = 0; e < E; e++) b |= !isfinite(cf_load(dt, logits, (size_t)t * E + e));
        bad += (uint64_t)b;
    }
    ((cpu_state *)L->be)->nonfinite_tokens += bad;
    MOE_TRY(cpu_route_topk(&L->cfg, L->dt, T, logits, ids, w, err));
    if (counts) cpu_sort_by_expert(T, L->k, ids, 0, L->E, counts, offsets, gather);
    return MOE_OK;
}

/* ---- the experts ---- */

static moe_grouped_gemm_args gg_args(const moe_layer *L, int count, const int32_t *offs,
                                     const int32_t *gather, int R)
{
    moe_grouped_gemm_args g;
    memset(&g, 0, sizeof g);
    g.dtype = L->dt;
    g.num_experts = count;
    g.expert_offsets = offs;
    g.topk = L->k;
    g.max_rows = R * L->k;
    g.gather_idx = gather;
    g.epilogue = MOE_EPI_NONE;
    return g;
}

static moe_grouped_gemm_dw_args gdw_args(const moe_layer *L, int count, const int32_t *offs,
                                         const int32_t *gather, int R)
{
    moe_grouped_gemm_dw_args g;
    memset(&g, 0, sizeof g);
    g.dtype = L->dt;
    g.num_experts = count;
    g.expert_offsets = offs;
    g.topk = L->k;
    g.max_rows = R * L->k;
    g.gather_idx = gather;
    return g;
}

/* The sort (unless presorted) and GEMM1 of R rows; *M = rows kept. */
static moe_status sort_gemm1(moe_layer *L, int R, int first, int count, const void *x,
                             const int32_t *ids, const void *w, bool presorted, int32_t *counts,
                             int32_t *offs, int32_t *gather, void *gemm1_out, void *act, int *M,
                             moe_error *err)
{
    if (!presorted) *M = cpu_sort_by_expert(R, L->k, ids, 0, count, counts, offs, gather);
    else *M = offs[count];
    if (*M == 0) return MOE_OK;
    moe_grouped_gemm_args g1 = gg_args(L, count, offs, gather, R);
    g1.N = 2 * L->I;
    g1.K = L->H;
    g1.A = x;
    g1.B = moe_layer_w13(L, first);
    g1.C = act;
    g1.C_preact = gemm1_out;
    g1.permute_x = true;
    g1.scale_a_rows = L->llama ? w : NULL;
    g1.epilogue = MOE_EPI_SILU_MUL;
    return cpu_grouped_gemm(&g1, err);
}

static moe_status c_experts_forward(moe_layer *L, const moe_experts_args *a, moe_error *err)
{
    const int R = a->R, count = a->count;
    const size_t rk = (size_t)R * L->k;
    if (a->zero_rows && rk) memset(a->rows, 0, rk * L->H * L->dsz);
    if (R == 0 || count == 0) {
        if (a->offsets) memset(a->offsets, 0, (size_t)(count + 1) * 4);
        if (a->counts && count) memset(a->counts, 0, (size_t)count * 4);
        return MOE_OK;
    }
    int32_t *counts = a->counts, *offs = a->offsets, *gather = a->gather;
    void *act = a->act;
    const size_t rkc = (size_t)(R > a->rows_cap ? R : a->rows_cap) * L->k;
    if (!counts) MOE_TRY(scratch(L, WB_COUNTS, (size_t)(count + 1) * 4, (void **)&counts, err));
    if (!offs) MOE_TRY(scratch(L, WB_OFFS, (size_t)(count + 1) * 4, (void **)&offs, err));
    if (!gather) MOE_TRY(scratch(L, WB_GATHER, rkc * 4, (void **)&gather, err));
    if (!act) MOE_TRY(scratch(L, WB_ACT, rkc * L->I * L->dsz, &act, err));
    int M = 0;
    MOE_TRY(sort_gemm1(L, R, a->first, count, a->x, a->ids, a->w, a->presorted, counts, offs,
                       gather, a->gemm1_out, act, &M, err));
    moe_layer_mark(L, MOE_MARK_GEMM1, false);
    if (M == 0) {
        moe_layer_mark(L, MOE_MARK_GEMM2, false);
        return MOE_OK;
    }
    moe_grouped_gemm_args g2 = gg_args(L, count, offs, gather, R);
    g2.N = L->H;
    g2.K = L->I;
    g2.A = act;
    g2.B = moe_layer_w2(L, a->first);
    g2.C = a->rows;
    g2.permute_y = true;
    g2.scale_c_rows = L->llama ? NULL : a->w;
    MOE_TRY(cpu_grouped_gemm(&g2, err));
    moe_layer_mark(L, MOE_MARK_GEMM2, false);
    return MOE_OK;
}

static moe_status c_experts_backward(moe_layer *L, const moe_experts_bwd_args *a,
                                     moe_error *err)
{
    const int R = a->R, count = a->count, H = L->H, I = L->I, k = L->k;
    const moe_dtype dt = L->dt;
    const size_t rk = (size_t)R * k, dsz = L->dsz;
    const size_t w13b = (size_t)count * 2 * I * H * dsz, w2b = (size_t)count * H * I * dsz;
    if (rk) memset(a->dtop, 0, rk * sizeof(float));
    if (R == 0 || count == 0) {
        if (w13b) memset(a->dW13, 0, w13b);
        if (w2b) memset(a->dW2, 0, w2b);
        return MOE_OK;
    }
    const int32_t *offs = a->offsets, *gather = a->gather;
    const void *gu = a->gemm1_out, *act = a->act;
    const size_t rkc = (size_t)(R > a->rows_cap ? R : a->rows_cap) * k;
    int M = 0;
    if (!offs || !gather || !gu || !act) {
        /* recompute the sort and GEMM1, keeping its rounded output */
        int32_t *c2, *o2, *g2;
        void *gu2, *act2;
        MOE_TRY(scratch(L, WB_COUNTS, (size_t)(count + 1) * 4, (void **)&c2, err));
        MOE_TRY(scratch(L, WB_OFFS, (size_t)(count + 1) * 4, (void **)&o2, err));
        MOE_TRY(scratch(L, WB_GATHER, rkc * 4, (void **)&g2, err));
        MOE_TRY(scratch(L, WB_GU, rkc * 2 * I * dsz, &gu2, err));
        MOE_TRY(scratch(L, WB_ACT, rkc * I * dsz, &act2, err));
        MOE_TRY(sort_gemm1(L, R, a->first, count, a->x, a->ids, a->w, false, c2, o2, g2, gu2,
                           act2, &M, err));
        offs = o2;
        gather = g2;
        gu = gu2;
        act = act2;
    } else {
        M = offs[count];
    }
    if (M == 0) {
        memset(a->dW13, 0, w13b);
        memset(a->dW2, 0, w2b);
        return MOE_OK;
    }
    void *dA0, *dgu, *dact = NULL;
    MOE_TRY(scratch(L, WB_DA0, rkc * I * dsz, &dA0, err));
    MOE_TRY(scratch(L, WB_DGU, rkc * 2 * I * dsz, &dgu, err));
    if (!L->llama) MOE_TRY(scratch(L, WB_DACT, rkc * I * dsz, &dact, err));
    /* dA0 [M,I] = dout[token of r] @ W2_e (W2_e [H,I] read as [K,N]). */
    moe_grouped_gemm_args gA = gg_args(L, count, offs, gather, R);
    gA.N = I;
    gA.K = H;
    gA.A = a->dout;
    gA.permute_x = true;
    gA.B = moe_layer_w2(L, a->first);
    gA.b_kn = true;
    gA.C = dA0;
    MOE_TRY(cpu_grouped_gemm(&gA, err));
    /* Qwen3: the weight multiplied GEMM2's output: d w = <act, dA0>, d act = w dA0. */
    const void *dact_in = dA0;
    if (!L->llama) {
        cpu_topk_weight_backward(dt, M, I, gather, act, dA0, a->w, a->dtop, dact);
        dact_in = dact;
    }
    /* dW2_e [H,I] = sum_r (w dout)^T act_r */
    moe_grouped_gemm_dw_args d2 = gdw_args(L, count, offs, gather, R);
    d2.N = H;
    d2.K = I;
    d2.dY = a->dout;
    d2.permute_dy = true;
    d2.scale_dy_rows = L->llama ? NULL : a->w;
    d2.X = act;
    d2.dW = a->dW2;
    MOE_TRY(cpu_grouped_gemm_dw(&d2, err));
    cpu_silu_mul_backward(dt, M, I, gu, dact_in, dgu);
    /* dxs [R*k,H] flat = dgu @ W13_e ([2I,H] read as [K,N]); other slices' rows unwritten. */
    moe_grouped_gemm_args gX = gg_args(L, count, offs, gather, R);
    gX.N = H;
    gX.K = 2 * I;
    gX.A = dgu;
    gX.B = moe_layer_w13(L, a->first);
    gX.b_kn = true;
    gX.C = a->dxs;
    gX.permute_y = true;
    MOE_TRY(cpu_grouped_gemm(&gX, err));
    /* dW13_e [2I,H] = sum_r dgu_r^T xs_r (Llama-4: xs = round(x_t s_f)) */
    moe_grouped_gemm_dw_args d13 = gdw_args(L, count, offs, gather, R);
    d13.N = 2 * I;
    d13.K = H;
    d13.dY = dgu;
    d13.X = a->x;
    d13.permute_x = true;
    d13.scale_x_rows = L->llama ? a->w : NULL;
    d13.dW = a->dW13;
    MOE_TRY(cpu_grouped_gemm_dw(&d13, err));
    if (L->llama) {
        /* d score_f = x_t . dxs_f for the slots of this slice (others stay 0) */
        const int32_t *ids = a->ids;
        const void *x = a->x, *dxs = a->dxs;
        float *ds = a->dtop;
#pragma omp parallel for schedule(static) if (cf_par((int64_t)rk * H))
        for (int64_t f = 0; f < (int64_t)rk; f++) {
            int id = ids[f];
            if (id < 0 || id >= count) continue;
            size_t xr = (size_t)(f / k) * H, dr = (size_t)f * H;
            float dot = 0.0f;
            for (int h = 0; h < H; h++) dot += cf_load(dt, dxs, dr + h) * cf_load(dt, x, xr + h);
            ds[f] = dot;
        }
    }
    return MOE_OK;
}

static moe_status c_sum_k(moe_layer *L, const moe_sumk_args *a, moe_error *err)
{
    (void)err;
    const int T = a->T, k = L->k, N = L->H, fc = a->filter_count;
    const moe_dtype dt = L->dt;
#pragma omp parallel for schedule(static) if (cf_par((int64_t)T * N * (k + 1)))
    for (int t = 0; t < T; t++) {
        size_t o = (size_t)t * N;
        for (int n = 0; n < N; n++) {
            float acc = a->add ? cf_load(dt, a->add, o + n) : 0.0f;
            if (a->add2) acc += cf_load(dt, a->add2, o + n);
            for (int j = 0; j < k; j++) {
                size_t f = (size_t)t * k + j;
                if (fc >= 0 && (a->ids[f] < 0 || a->ids[f] >= fc)) continue;
                float v = cf_load(dt, a->rows, f * N + n);
                if (a->scale) v *= cf_load(dt, a->scale, f);
                acc += v;
            }
            cf_store(dt, a->out, o + n, acc);
        }
    }
    return MOE_OK;
}

/* ---- the shared expert and the router (replicated weights) ---- */

/* C[N,K] = A[T,N]^T B[T,K] in fp32, t ascending (deterministic), overwritten. */
static void gemm_tn_f32(moe_dtype dt, int T, int N, int K, const void *A, const void *B,
                        float *C)
{
    memset(C, 0, (size_t)N * K * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *c = C + (size_t)n * K;
        for (int t = 0; t < T; t++) {
            float av = cf_load(dt, A, (size_t)t * N + n);
            for (int kk = 0; kk < K; kk++) c[kk] += av * cf_load(dt, B, (size_t)t * K + kk);
        }
    }
}

/* g [N,K] = A[T,N]^T B[T,K]: fp32 partials, or rounded to the layer's dtype. */
static moe_status weight_grad(moe_layer *L, int T, int N, int K, const void *A, const void *B,
                              moe_dtype gdt, void *g, moe_error *err)
{
    if (gdt == MOE_DTYPE_F32 && L->dt != MOE_DTYPE_F32) {
        gemm_tn_f32(L->dt, T, N, K, A, B, g);
        return MOE_OK;
    }
    int32_t off[2] = {0, T};
    moe_grouped_gemm_dw_args d = {
        .dtype = L->dt, .num_experts = 1, .expert_offsets = off, .N = N, .K = K,
        .max_rows = T, .topk = 1, .dY = A, .X = B, .dW = g,
    };
    if (T == 0) {
        memset(g, 0, (size_t)N * K * moe_dtype_size(gdt));
        return MOE_OK;
    }
    return cpu_grouped_gemm_dw(&d, err);
}

static moe_status c_shared_forward(moe_layer *L, int T, const void *x, void *sgu, void *sact,
                                   void *out, moe_error *err)
{
    if (T == 0) return MOE_OK;
    const int H = L->H, Is = L->Is;
    int32_t off[2] = {0, T};
    moe_grouped_gemm_args g1 = {
        .dtype = L->dt, .num_experts = 1, .expert_offsets = off, .N = 2 * Is, .K = H,
        .max_rows = T, .topk = 1, .A = x, .B = L->w.shared_gu, .C = sact, .C_preact = sgu,
        .epilogue = MOE_EPI_SILU_MUL,
    };
    MOE_TRY(cpu_grouped_gemm(&g1, err));
    if (!out) return MOE_OK;
    moe_grouped_gemm_args g2 = {
        .dtype = L->dt, .num_experts = 1, .expert_offsets = off, .N = H, .K = Is,
        .max_rows = T, .topk = 1, .A = sact, .B = L->w.shared_down, .C = out,
        .epilogue = MOE_EPI_NONE,
    };
    return cpu_grouped_gemm(&g2, err);
}

static moe_status c_shared_backward(moe_layer *L, int T, const void *x, const void *dout,
                                    const void *sgu, const void *sact, void *dsact, void *dsgu,
                                    void *dx_shared, moe_dtype gdt, void *g_gu, void *g_down,
                                    moe_error *err)
{
    const int H = L->H, Is = L->Is;
    /* dsact [T,Is] = dout [T,H] @ shared_down [H,Is] */
    MOE_TRY(cpu_gemm(L->dt, T, Is, H, dout, L->w.shared_down, true, dsact, false, err));
    /* g_down [H,Is] = dout^T sact */
    MOE_TRY(weight_grad(L, T, H, Is, dout, sact, gdt, g_down, err));
    cpu_silu_mul_backward(L->dt, T, Is, sgu, dsact, dsgu);
    /* g_gu [2Is,H] = dsgu^T x */
    MOE_TRY(weight_grad(L, T, 2 * Is, H, dsgu, x, gdt, g_gu, err));
    /* dx_shared [T,H] = dsgu [T,2Is] @ [gate; up] [2Is,H] */
    return cpu_gemm(L->dt, T, H, 2 * Is, dsgu, L->w.shared_gu, true, dx_shared, false, err);
}

static moe_status c_router_backward(moe_layer *L, int T, const void *x, const void *logits,
                                    const int32_t *ids, const float *dtop, bool through_topk,
                                    const void *d_logits_in, void *dlogits, moe_dtype gdt,
                                    void *g_router, void *dx_router, moe_error *err)
{
    const int E = L->E, H = L->H;
    const size_t n = (size_t)T * E;
    if (through_topk) MOE_TRY(cpu_route_backward(&L->cfg, L->dt, T, logits, ids, dtop, dlogits, err));
    else if (n) memset(dlogits, 0, n * L->dsz);
    if (d_logits_in) {
        /* the gradient of the logits as an output: added as autograd adds (one rounding) */
#pragma omp parallel for schedule(static) if (cf_par((int64_t)n))
        for (size_t i = 0; i < n; i++)
            cf_store(L->dt, dlogits, i, cf_load(L->dt, dlogits, i) + cf_load(L->dt, d_logits_in, i));
    }
    MOE_TRY(weight_grad(L, T, E, H, dlogits, x, gdt, g_router, err));
    if (!dx_router) return MOE_OK;
    return cpu_gemm(L->dt, T, H, E, dlogits, L->w.router, true, dx_router, false, err);
}

static moe_status c_transpose(moe_layer *L, int n, int r, int c, const void *src, void *dst,
                              moe_error *err)
{
    (void)err;
    const size_t es = L->dsz;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < n; b++)
        for (int i = 0; i < r; i++)
            for (int j = 0; j < c; j++)
                memcpy((char *)dst + (((size_t)b * c + j) * r + i) * es,
                       (const char *)src + (((size_t)b * r + i) * c + j) * es, es);
    return MOE_OK;
}

static moe_status c_round_f32(moe_layer *L, size_t n, const float *src, void *dst,
                              moe_error *err)
{
    (void)err;
#pragma omp parallel for schedule(static) if (cf_par((int64_t)n))
    for (size_t i = 0; i < n; i++) cf_store(L->dt, dst, i, src[i]);
    return MOE_OK;
}

static moe_status c_sum_parts(moe_layer *L, int n_parts, size_t n, const float *parts,
                              moe_dtype dt, void *dst, moe_error *err)
{
    (void)L;
    (void)err;
#pragma omp parallel for schedule(static) if (cf_par((int64_t)n * n_parts))
    for (size_t i = 0; i < n; i++) {
        float acc = 0.0f;
        for (int r = 0; r < n_parts; r++) acc += parts[(size_t)r * n + i];
        cf_store(dt, dst, i, acc);
    }
    return MOE_OK;
}

/* ---- expert parallelism ---- */

static moe_status c_ep_plan(moe_layer *L, int T, const int32_t *ids, int32_t *tdest, int32_t *tn,
                            int32_t *trow, int32_t *dcount, moe_error *err)
{
    return cpu_ep_plan(T, L->k, ids, L->E, L->map.vowner, L->map.G, tdest, tn, trow, dcount, err);
}

static moe_status c_ep_pack(moe_layer *L, int T, const void *x, const void *dout,
                            const int32_t *ids, const void *w, const int32_t *tdest,
                            const int32_t *tn, const int32_t *trow, const int64_t *base, void *sx,
                            void *sdout, int32_t *sids, void *sw, moe_error *err)
{
    (void)err;
    cpu_ep_pack(T, L->k, L->map.G, L->map.vowner, L->map.vlocal, (size_t)L->H * L->dsz, L->dsz,
                x, dout, ids, w, tdest, tn, trow, base, sx, sdout, sids, sw);
    return MOE_OK;
}

static moe_status c_ep_reduce(moe_layer *L, int T, const void *add, const void *add2,
                              const void *back, const int64_t *base, const int32_t *tdest,
                              const int32_t *tn, const int32_t *trow, void *out, moe_error *err)
{
    (void)err;
    cpu_ep_reduce(L->dt, T, L->H, L->map.G, L->k, add, add2, back, base, tdest, tn, trow, out);
    return MOE_OK;
}

static moe_status c_ep_dweights(moe_layer *L, int T, const int32_t *ids, const float *back_dw,
                                const int64_t *base, const int32_t *tdest, const int32_t *tn,
                                const int32_t *trow, float *dw, moe_error *err)
{
    (void)err;
    cpu_ep_dweights(T, L->k, L->map.G, L->map.vowner, ids, back_dw, base, tdest, tn, trow, dw);
    return MOE_OK;
}

static moe_status c_check_errors(moe_layer *L, moe_error *err)
{
    cpu_state *s = L->be;
    uint64_t n = s->nonfinite_tokens;
    s->nonfinite_tokens = 0;
    if (n)
        return moe_fail(err, MOE_ERR_NONFINITE,
                        "%llu token(s) had non-finite router logits (NaN or Inf in the input or "
                        "the router weights); their outputs are not meaningful",
                        (unsigned long long)n);
    return MOE_OK;
}

static void c_gemm_report(const moe_layer *L, int gemm, char *kernel, size_t klen, char *config,
                          size_t clen)
{
    (void)L;
    (void)gemm;
    if (klen) kernel[0] = '\0';
    if (clen) config[0] = '\0';
}

const moe_layer_backend_ops moe_cpu_backend_ops = {
    .name = "cpu",
    .create = c_create,
    .destroy = c_destroy,
    .place = c_place,
    .upload = c_copy,
    .download = c_copy,
    .copy = c_copy,
    .zero = c_zero,
    .enter = c_enter,
    .sync = c_nop,
    .fork = c_nop,
    .join = c_nop,
    .mark = c_mark,
    .mark_ms = c_mark_ms,
    .route = c_route,
    .experts_forward = c_experts_forward,
    .experts_backward = c_experts_backward,
    .sum_k = c_sum_k,
    .shared_forward = c_shared_forward,
    .shared_backward = c_shared_backward,
    .router_backward = c_router_backward,
    .transpose = c_transpose,
    .round_f32 = c_round_f32,
    .ep_plan = c_ep_plan,
    .ep_pack = c_ep_pack,
    .ep_reduce = c_ep_reduce,
    .ep_dweights = c_ep_dweights,
    .ep_slot_counts = NULL,
    .ep_compact = NULL,
    .ep_check_total = NULL,
    .ep_expand = NULL,
    .sum_parts = c_sum_parts,
    .check_errors = c_check_errors,
    .gemm_report = c_gemm_report,
};
