/*
 * reference.c — the independent HuggingFace-order reference (see reference.h, docs/DESIGN.md).
 *
 * Everything is computed in double and rounded with moe_round_to(rd, .) exactly where HF's
 * modules round; rd = MOE_DTYPE_F64 rounds nowhere. The steps HF computes in fp32 whatever
 * the activation dtype (softmax, sigmoid, the renormalisation) are rounded to fp32 ("fr"),
 * except with rd = F64, where nothing is rounded so finite differences stay smooth.
 *
 * Shares no code with the fused path (src/cpu/cpu_fused*.c): its own projections, routing and
 * per-expert token lists are written here, in the simplest order that is still fast enough for
 * full-size shapes (a per-expert loop over HF's experts, like Qwen3MoeSparseMoeBlock's).
 *
 * Determinism: every output element is produced by one fixed sequence of double operations
 * that does not depend on the thread count, on how tokens are grouped, or on chunking:
 *  - a dot product (forward projections) sums in 4 interleaved lanes combined by a fixed tree,
 *    the same code whether it runs for 1 or 4 tokens at once;
 *  - an input gradient dX[t,c] += dY[t,r] W[r,c] adds r in ascending order;
 *  - a weight gradient dW[r,c] += dY[t,r] X[t,c] adds t in ascending order;
 *  - out / the routed sum adds experts in ascending id per token (HF's index_add_ order), and
 *    dx adds the experts (ascending), then the shared expert, then the router.
 * OpenMP only splits independent output rows / column blocks.
 *
 * Memory: the weights are never copied whole. Each projection converts a small block of weight
 * rows (or a PANEL_R x PANEL_C panel) to double at a time, into per-thread scratch, and uses it
 * for every token of the current chunk. Tokens are processed in chunks of at most ROW_CHUNK
 * rows per expert, so the activation buffers are [ROW_CHUNK, max(I, Is, H)].
 */
#include "reference.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../dtype.h"

enum {
    FWD_ROWS = 8,    /* weight rows converted together by a forward projection */
    PANEL_R = 64,    /* weight rows converted together by an input-gradient projection */
    PANEL_C = 64,    /* ... and its columns (one parallel work item) */
    ROW_CHUNK = 256, /* most token rows of one expert processed at once */
};

/* ------------------------------------------------------------------------------------------ */
/* Scalar pieces                                                                               */

static double sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }

/* silu(g) = g * sigmoid(g); for very negative g, exp overflows to inf and this gives -0. */
static double silu(double g) { return g / (1.0 + exp(-g)); }

/* d silu / dg = s + g s (1 - s) = s (1 + g (1 - s)), s = sigmoid(g). */
static double silu_grad(double g)
{
    double s = sigmoid(g);
    return s * (1.0 + g * (1.0 - s));
}

/* The dtype in which HF computes softmax / sigmoid / renormalisation: fp32, unless the whole
 * reference runs unrounded. */
static moe_dtype fp32_semantics(moe_dtype rd) { return rd == MOE_DTYPE_F64 ? MOE_DTYPE_F64 : MOE_DTYPE_F32; }

static bool rd_valid(moe_dtype rd)
{
    return rd == MOE_DTYPE_BF16 || rd == MOE_DTYPE_F16 || rd == MOE_DTYPE_F32 ||
           rd == MOE_DTYPE_F64;
}

/* ------------------------------------------------------------------------------------------ */
/* Dense kernels (reference-private)                                                          */

/* n elements of weight tensor t from element off, widened to double. */
static void load_span(const moe_tensor *t, size_t off, int n, double *dst)
{
    switch (t->dtype) {
    case MOE_DTYPE_F64:
        memcpy(dst, (const double *)t->data + off, (size_t)n * sizeof(double));
        break;
    case MOE_DTYPE_F32: {
        const float *s = (const float *)t->data + off;
        for (int i = 0; i < n; i++) dst[i] = s[i];
        break;
    }
    case MOE_DTYPE_BF16: {
        /* bf16 widens exactly by placing its 16 bits on top of an fp32 (inline here: the
         * per-element call of moe_load_elem was a third of a full-size run). */
        const uint16_t *s = (const uint16_t *)t->data + off;
        for (int i = 0; i < n; i++) {
            uint32_t u = (uint32_t)s[i] << 16;
            float f;
            memcpy(&f, &u, sizeof f);
            dst[i] = f;
        }
        break;
    }
    default:
        for (int i = 0; i < n; i++) dst[i] = moe_load_elem(t->dtype, t->data, off + (size_t)i);
        break;
    }
}

/* Two doubles in one SSE register (GCC/Clang vector extension). Element-wise + and * on it are
 * exactly the scalar operations, lane by lane, so a vector path and its scalar tail give
 * bitwise the same value for an element. The build is ISO C (-std=c11), where GCC does not
 * contract a*b+c into an FMA, so these are separately rounded multiplies and adds. */
typedef double v2d __attribute__((vector_size(16)));

static inline v2d ld2(const double *p)
{
    v2d v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void st2(double *p, v2d v) { memcpy(p, &v, sizeof v); }
static inline v2d bc2(double a) { return (v2d){a, a}; }

/* Dot products: element i goes to lane i % 4 (lanes 0,1 in a0; 2,3 in a1), the lanes are
 * combined as (l0 + l2) + (l1 + l3). dot1 and dot4 run exactly this per token, so a token's
 * value does not depend on which tokens it is computed with. */
static inline double dot_fold(v2d a0, v2d a1)
{
    v2d s = a0 + a1;
    return s[0] + s[1];
}

static inline void dot_tail(const double *w, const double *x, int i, int n, v2d *a0, v2d *a1)
{
    for (int l = 0; i + l < n; l++) {
        double p = w[i + l] * x[i + l];
        if (l < 2) (*a0)[l] += p;
        else (*a1)[l - 2] += p;
    }
}

static double dot1(const double *w, const double *x, int n)
{
    v2d a0 = {0, 0}, a1 = {0, 0};
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        a0 += ld2(w + i) * ld2(x + i);
        a1 += ld2(w + i + 2) * ld2(x + i + 2);
    }
    dot_tail(w, x, i, n, &a0, &a1);
    return dot_fold(a0, a1);
}

static void dot4(const double *w, const double *x0, const double *x1, const double *x2,
                 const double *x3, int n, double out[4])
{
    v2d a00 = {0, 0}, a01 = {0, 0}, a10 = {0, 0}, a11 = {0, 0};
    v2d a20 = {0, 0}, a21 = {0, 0}, a30 = {0, 0}, a31 = {0, 0};
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        v2d w0 = ld2(w + i), w1 = ld2(w + i + 2);
        a00 += w0 * ld2(x0 + i);
        a01 += w1 * ld2(x0 + i + 2);
        a10 += w0 * ld2(x1 + i);
        a11 += w1 * ld2(x1 + i + 2);
        a20 += w0 * ld2(x2 + i);
        a21 += w1 * ld2(x2 + i + 2);
        a30 += w0 * ld2(x3 + i);
        a31 += w1 * ld2(x3 + i + 2);
    }
    dot_tail(w, x0, i, n, &a00, &a01);
    dot_tail(w, x1, i, n, &a10, &a11);
    dot_tail(w, x2, i, n, &a20, &a21);
    dot_tail(w, x3, i, n, &a30, &a31);
    out[0] = dot_fold(a00, a01);
    out[1] = dot_fold(a10, a11);
    out[2] = dot_fold(a20, a21);
    out[3] = dot_fold(a30, a31);
}

/* Per-thread scratch for the weight conversions: nthr areas of `stride` doubles. */
typedef struct scratch {
    double *buf;
    int nthr;
    size_t stride;
} scratch;

static double *scratch_area(const scratch *s)
{
    int tid = omp_get_thread_num();
    if (tid >= s->nthr) tid = s->nthr - 1; /* cannot happen: teams never exceed max threads */
    return s->buf + (size_t)tid * s->stride;
}

/* Scratch doubles one thread needs for projections with inner size up to maxc. */
static size_t scratch_need(size_t maxc)
{
    return MOE_MAX((size_t)FWD_ROWS * maxc, (size_t)PANEL_R * PANEL_C);
}

/* Forward projection: Y[n,R] = rd(X[n,C] @ W^T) where W [R,C] starts at element off of tensor
 * Wt. Parallel over blocks of FWD_ROWS weight rows: the block is converted once, then every
 * group of 4 tokens is dotted with each of its rows (the tokens stay in cache across rows). */
static void proj_fwd(const moe_tensor *Wt, size_t off, int R, int C, int n, const double *X,
                     double *Y, moe_dtype rd, const scratch *sc)
{
    if (n <= 0 || R <= 0) return;
    int nb = (R + FWD_ROWS - 1) / FWD_ROWS;
#pragma omp parallel for schedule(dynamic, 1) if ((double)R * C * n > 65536.0)
    for (int b = 0; b < nb; b++) {
        int r0 = b * FWD_ROWS, rn = MOE_MIN(FWD_ROWS, R - r0);
        double *panel = scratch_area(sc);
        load_span(Wt, off + (size_t)r0 * (size_t)C, rn * C, panel);
        int t = 0;
        for (; t + 4 <= n; t += 4) {
            const double *x0 = X + (size_t)t * C;
            for (int q = 0; q < rn; q++) {
                double v[4];
                dot4(panel + (size_t)q * C, x0, x0 + C, x0 + 2 * (size_t)C, x0 + 3 * (size_t)C,
                     C, v);
                for (int j = 0; j < 4; j++)
                    Y[(size_t)(t + j) * R + r0 + q] = moe_round_to(rd, v[j]);
            }
        }
        for (; t < n; t++)
            for (int q = 0; q < rn; q++)
                Y[(size_t)t * R + r0 + q] =
                    moe_round_to(rd, dot1(panel + (size_t)q * C, X + (size_t)t * C, C));
    }
}

/* Input gradient: dX[n,C] += dY[n,R] @ W, W [R,C] at element off of Wt. Every element adds
 * its r terms one at a time in ascending r (the vector tiles and the scalar edges perform the
 * same operations in the same order). Parallel over PANEL_C-wide column blocks; within one,
 * PANEL_R rows of W are converted at a time and a 4-token x 4-column tile of dX stays in
 * registers across them. */
static void proj_dx(const moe_tensor *Wt, size_t off, int R, int C, int n, const double *dY,
                    double *dX, const scratch *sc)
{
    if (n <= 0 || R <= 0 || C <= 0) return;
    int nb = (C + PANEL_C - 1) / PANEL_C;
#pragma omp parallel for schedule(dynamic, 1) if ((double)R * C * n > 65536.0)
    for (int b = 0; b < nb; b++) {
        int c0 = b * PANEL_C, cn = MOE_MIN(PANEL_C, C - c0);
        double *panel = scratch_area(sc); /* [PANEL_R, PANEL_C] */
        for (int r0 = 0; r0 < R; r0 += PANEL_R) {
            int rn = MOE_MIN(PANEL_R, R - r0);
            for (int q = 0; q < rn; q++)
                load_span(Wt, off + (size_t)(r0 + q) * C + c0, cn, panel + (size_t)q * PANEL_C);
            const double *dy = dY + r0; /* dy[t*R + q] = dY[t, r0+q] */
            int t = 0;
            for (; t + 4 <= n; t += 4) {
                const double *y0 = dy + (size_t)t * R, *y1 = y0 + R, *y2 = y1 + R, *y3 = y2 + R;
                double *d0 = dX + (size_t)t * C + c0, *d1 = d0 + C, *d2 = d1 + C, *d3 = d2 + C;
                int c = 0;
                for (; c + 4 <= cn; c += 4) {
                    v2d a00 = ld2(d0 + c), a01 = ld2(d0 + c + 2), a10 = ld2(d1 + c),
                        a11 = ld2(d1 + c + 2), a20 = ld2(d2 + c), a21 = ld2(d2 + c + 2),
                        a30 = ld2(d3 + c), a31 = ld2(d3 + c + 2);
                    for (int q = 0; q < rn; q++) {
                        const double *wq = panel + (size_t)q * PANEL_C + c;
                        v2d w0 = ld2(wq), w1 = ld2(wq + 2);
                        v2d s0 = bc2(y0[q]), s1 = bc2(y1[q]), s2 = bc2(y2[q]), s3 = bc2(y3[q]);
                        a00 += s0 * w0; a01 += s0 * w1;
                        a10 += s1 * w0; a11 += s1 * w1;
                        a20 += s2 * w0; a21 += s2 * w1;
                        a30 += s3 * w0; a31 += s3 * w1;
                    }
                    st2(d0 + c, a00); st2(d0 + c + 2, a01);
                    st2(d1 + c, a10); st2(d1 + c + 2, a11);
                    st2(d2 + c, a20); st2(d2 + c + 2, a21);
                    st2(d3 + c, a30); st2(d3 + c + 2, a31);
                }
                for (; c < cn; c++) {
                    for (int j = 0; j < 4; j++) {
                        double *d = dX + (size_t)(t + j) * C + c0 + c;
                        const double *yj = dy + (size_t)(t + j) * R;
                        double a = *d;
                        for (int q = 0; q < rn; q++) a += yj[q] * panel[(size_t)q * PANEL_C + c];
                        *d = a;
                    }
                }
            }
            for (; t < n; t++) {
                const double *yt = dy + (size_t)t * R;
                double *d = dX + (size_t)t * C + c0;
                for (int q = 0; q < rn; q++) {
                    double a = yt[q];
                    const double *wq = panel + (size_t)q * PANEL_C;
                    for (int c = 0; c < cn; c++) d[c] += a * wq[c];
                }
            }
        }
    }
}

/* Weight gradient: dW[R,C] += dY[n,R]^T @ X[n,C]; every element adds its t terms one at a
 * time in ascending t. Parallel over blocks of 4 rows of dW; a 4-row x 4-column tile stays in
 * registers over all tokens. */
static void proj_dw(int R, int C, int n, const double *dY, const double *X, double *dW)
{
    if (n <= 0 || R <= 0) return;
    int nb = (R + 3) / 4;
#pragma omp parallel for schedule(dynamic, 1) if ((double)R * C * n > 65536.0)
    for (int b = 0; b < nb; b++) {
        int r0 = b * 4;
        if (r0 + 4 <= R) {
            double *d0 = dW + (size_t)r0 * C, *d1 = d0 + C, *d2 = d1 + C, *d3 = d2 + C;
            int c = 0;
            for (; c + 4 <= C; c += 4) {
                v2d a00 = ld2(d0 + c), a01 = ld2(d0 + c + 2), a10 = ld2(d1 + c),
                    a11 = ld2(d1 + c + 2), a20 = ld2(d2 + c), a21 = ld2(d2 + c + 2),
                    a30 = ld2(d3 + c), a31 = ld2(d3 + c + 2);
                for (int t = 0; t < n; t++) {
                    const double *xt = X + (size_t)t * C + c, *yt = dY + (size_t)t * R + r0;
                    v2d x0 = ld2(xt), x1 = ld2(xt + 2);
                    v2d s0 = bc2(yt[0]), s1 = bc2(yt[1]), s2 = bc2(yt[2]), s3 = bc2(yt[3]);
                    a00 += s0 * x0; a01 += s0 * x1;
                    a10 += s1 * x0; a11 += s1 * x1;
                    a20 += s2 * x0; a21 += s2 * x1;
                    a30 += s3 * x0; a31 += s3 * x1;
                }
                st2(d0 + c, a00); st2(d0 + c + 2, a01);
                st2(d1 + c, a10); st2(d1 + c + 2, a11);
                st2(d2 + c, a20); st2(d2 + c + 2, a21);
                st2(d3 + c, a30); st2(d3 + c + 2, a31);
            }
            for (; c < C; c++)
                for (int q = 0; q < 4; q++) {
                    double a = dW[(size_t)(r0 + q) * C + c];
                    for (int t = 0; t < n; t++) a += dY[(size_t)t * R + r0 + q] * X[(size_t)t * C + c];
                    dW[(size_t)(r0 + q) * C + c] = a;
                }
        } else {
            for (int r = r0; r < R; r++) {
                double *d = dW + (size_t)r * C;
                for (int t = 0; t < n; t++) {
                    double a = dY[(size_t)t * R + r];
                    const double *x = X + (size_t)t * C;
                    for (int c = 0; c < C; c++) d[c] += a * x[c];
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Routing                                                                                     */

/* Top-k of key(0..E-1): k passes, each taking the largest value not yet taken; a strictly
 * larger value is needed to displace the current best, so on a tie the lower id wins, and the
 * output is in descending value order (equal values: ascending id). NaNs never win against a
 * number but still fill the k slots if nothing else is left. */
typedef double (*route_key_fn)(const void *ctx, int e);

static void topk_select(int E, int k, route_key_fn key, const void *ctx, int32_t *ids,
                        double *vals)
{
    for (int j = 0; j < k; j++) {
        int best = -1;
        double bv = 0;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int q = 0; q < j; q++)
                if (ids[q] == e) { taken = true; break; }
            if (taken) continue;
            double v = key(ctx, e);
            if (best < 0 || (isnan(bv) && !isnan(v)) || v > bv) { best = e; bv = v; }
        }
        ids[j] = best;
        vals[j] = bv;
    }
}

/* Softmax of one logits row, evaluated on demand: p_e = fr(exp(l_e - m) / Z). */
typedef struct softmax_row {
    const double *l;
    double m, Z;
    moe_dtype fr;
} softmax_row;

static void softmax_init(softmax_row *s, const double *l, int E, moe_dtype fr)
{
    s->l = l;
    s->fr = fr;
    s->m = l[0];
    for (int e = 1; e < E; e++)
        if (l[e] > s->m) s->m = l[e];
    s->Z = 0;
    for (int e = 0; e < E; e++) s->Z += exp(l[e] - s->m);
}

static double softmax_p(const softmax_row *s, int e)
{
    return moe_round_to(s->fr, exp(s->l[e] - s->m) / s->Z);
}

static double key_softmax(const void *ctx, int e) { return softmax_p((const softmax_row *)ctx, e); }
static double key_logit(const void *ctx, int e) { return ((const double *)ctx)[e]; }

/* Route one token's logits row [E] -> ids [k], weights [k] (rounded to rd), and what the
 * backward needs: pre [k] (Qwen3: the selected fp32 probabilities p; Llama-4: the fp32 sigmoid
 * before rounding to rd, which is what HF's autograd differentiates) and *S_out (Qwen3 with
 * norm_topk_prob: fr(sum of the selected p); else 1). */
static void route_one(const moe_config *cfg, moe_dtype rd, const double *lrow,
                      const int32_t *forced, int32_t *ids, double *wts, double *pre,
                      double *S_out)
{
    int E = cfg->num_experts, k = cfg->top_k;
    moe_dtype fr = fp32_semantics(rd);
    if (cfg->arch == MOE_ARCH_QWEN3) {
        softmax_row sm;
        softmax_init(&sm, lrow, E, fr);
        if (forced) /* the caller's choice of experts, with this token's own probabilities */
            for (int j = 0; j < k; j++) { ids[j] = forced[j]; pre[j] = softmax_p(&sm, forced[j]); }
        else
            topk_select(E, k, key_softmax, &sm, ids, pre);
        double S = 1.0;
        if (cfg->norm_topk_prob) {
            double sum = 0;
            for (int j = 0; j < k; j++) sum += pre[j];
            S = moe_round_to(fr, sum);
        }
        for (int j = 0; j < k; j++) {
            double v = cfg->norm_topk_prob ? moe_round_to(fr, pre[j] / S) : pre[j];
            wts[j] = moe_round_to(rd, v);
        }
        if (S_out) *S_out = S;
    } else {
        double *top = wts; /* the top values, overwritten by the scores below */
        if (forced)
            for (int j = 0; j < k; j++) { ids[j] = forced[j]; top[j] = lrow[forced[j]]; }
        else
            topk_select(E, k, key_logit, lrow, ids, top);
        for (int j = 0; j < k; j++) {
            pre[j] = moe_round_to(fr, sigmoid(top[j]));
            wts[j] = moe_round_to(rd, pre[j]);
        }
        if (S_out) *S_out = 1.0;
    }
}

void ref_route_row(const moe_config *cfg, moe_dtype rd, const double *logits_row, int32_t *ids,
                   double *wts)
{
    if (!cfg || !logits_row || !ids || !wts || cfg->top_k <= 0 || cfg->top_k > cfg->num_experts)
        return;
    double pre_small[64];
    double *pre = cfg->top_k <= 64 ? pre_small : malloc((size_t)cfg->top_k * sizeof(double));
    if (!pre) {
        for (int j = 0; j < cfg->top_k; j++) { ids[j] = -1; wts[j] = NAN; }
        return;
    }
    route_one(cfg, rd, logits_row, NULL, ids, wts, pre, NULL);
    if (pre != pre_small) free(pre);
}

/* Routing backward of one token: d of the k routing weights (Qwen3) / scores (Llama-4) ->
 * dlogits row [E] (fully written). Straight-through for every rounding.
 * Qwen3 without renormalisation: w_j = p_{id_j}; dp is dw on the selected entries and 0
 *   elsewhere; softmax: dl_e = p_e (dp_e - sum_m p_m dp_m) — every logit gets gradient.
 * Qwen3 with renormalisation: w_j = p_j / S, S = sum_sel p; dp_j = (dw_j - c) / S with
 *   c = sum_i dw_i p_i / S. Then sum_m p_m dp_m = c - c * sum_i (p_i/S) = 0 exactly in real
 *   arithmetic, so dl_e = p_e dp_e on the selected entries and 0 elsewhere (test_reference
 *   checks this against finite differences of the full function).
 * Llama-4: s_j = sigmoid(v_j); dv_j = ds_j s_j (1 - s_j) on the selected logits, 0 elsewhere. */
static void route_backward(const moe_config *cfg, moe_dtype rd, const double *lrow,
                           const int32_t *ids, const double *pre, double S, const double *dw,
                           double *dl)
{
    int E = cfg->num_experts, k = cfg->top_k;
    for (int e = 0; e < E; e++) dl[e] = 0;
    if (cfg->arch == MOE_ARCH_LLAMA4) {
        for (int j = 0; j < k; j++) dl[ids[j]] += dw[j] * pre[j] * (1.0 - pre[j]);
        return;
    }
    if (cfg->norm_topk_prob) {
        double c = 0;
        for (int j = 0; j < k; j++) c += dw[j] * (pre[j] / S);
        for (int j = 0; j < k; j++) dl[ids[j]] = pre[j] * (dw[j] - c) / S;
        return;
    }
    softmax_row sm;
    softmax_init(&sm, lrow, E, fp32_semantics(rd));
    double inner = 0; /* sum_m p_m dp_m over the selected m */
    for (int j = 0; j < k; j++) inner += pre[j] * dw[j];
    for (int e = 0; e < E; e++) dl[e] = -softmax_p(&sm, e) * inner;
    for (int j = 0; j < k; j++) dl[ids[j]] = pre[j] * (dw[j] - inner);
}

/* ------------------------------------------------------------------------------------------ */
/* One MLP (a routed expert or the shared expert): gate/up [Iw,H] at offsets of tensors, down   */
/* [H,Iw]. Forward: G = rd(X Wg^T), U = rd(X Wu^T), A = rd(silu(G)), Hh = rd(A*U),             */
/* Y = rd(Hh Wd^T).                                                                             */

typedef struct mlp {
    const moe_tensor *tg, *tu, *td;
    size_t og, ou, od;
    int Iw;
} mlp;

/* Activation buffers for up to ROW_CHUNK rows. */
typedef struct bufs {
    double *X, *G, *U, *A, *Hh, *Y, *dY, *dH, *dG, *dU, *dX;
} bufs;

static void mlp_forward(const mlp *m, int H, moe_dtype rd, int n, const double *X, double *G,
                        double *U, double *A, double *Hh, double *Y, const scratch *sc)
{
    int Iw = m->Iw;
    proj_fwd(m->tg, m->og, Iw, H, n, X, G, rd, sc);
    proj_fwd(m->tu, m->ou, Iw, H, n, X, U, rd, sc);
    size_t ni = (size_t)n * Iw;
    for (size_t i = 0; i < ni; i++) {
        A[i] = moe_round_to(rd, silu(G[i]));
        Hh[i] = moe_round_to(rd, A[i] * U[i]);
    }
    if (Y) proj_fwd(m->td, m->od, H, Iw, n, Hh, Y, rd, sc);
}

/* Backward of mlp_forward from dY [n,H]. dWg [Iw,H], dWu [Iw,H], dWd [H,Iw] are accumulated
 * into where non-NULL; dX [n,H] is overwritten when non-NULL. */
static void mlp_backward(const mlp *m, int H, int n, const bufs *b, double *dWg, double *dWu,
                         double *dWd, double *dX, const scratch *sc)
{
    int Iw = m->Iw;
    if (dWd) proj_dw(H, Iw, n, b->dY, b->Hh, dWd);
    if (!dWg && !dWu && !dX) return;
    size_t ni = (size_t)n * Iw;
    memset(b->dH, 0, ni * sizeof(double));
    proj_dx(m->td, m->od, H, Iw, n, b->dY, b->dH, sc);
    for (size_t i = 0; i < ni; i++) {
        b->dG[i] = b->dH[i] * b->U[i] * silu_grad(b->G[i]);
        b->dU[i] = b->dH[i] * b->A[i];
    }
    if (dWg) proj_dw(Iw, H, n, b->dG, b->X, dWg);
    if (dWu) proj_dw(Iw, H, n, b->dU, b->X, dWu);
    if (dX) {
        memset(dX, 0, (size_t)n * H * sizeof(double));
        proj_dx(m->tg, m->og, Iw, H, n, b->dG, dX, sc);
        proj_dx(m->tu, m->ou, Iw, H, n, b->dU, dX, sc);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Validation                                                                                  */

static moe_status check_tensor(const moe_tensor *t, const char *name, int ndim, int64_t d0,
                               int64_t d1, int64_t d2, moe_error *err)
{
    int64_t want[3] = {d0, d1, d2};
    bool ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == want[i];
    if (!ok) {
        char got[64], exp_[64];
        moe_shape_str(t->ndim, t->shape, got, sizeof got);
        moe_shape_str(ndim, want, exp_, sizeof exp_);
        return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: weight %s has shape %s, expected %s",
                        name, got, exp_);
    }
    if (!moe_dtype_is_float(t->dtype))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: weight %s has non-float dtype %s",
                        name, moe_dtype_name(t->dtype) ? moe_dtype_name(t->dtype) : "?");
    if (!t->data && moe_tensor_numel(t) > 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: weight %s has no data", name);
    return MOE_OK;
}

/* Only Llama-4 has a shared expert (Qwen3MoeSparseMoeBlock has none; a Qwen3 config's
 * shared_inter is ignored). */
static bool has_shared(const moe_weights *w)
{
    return w->cfg.arch == MOE_ARCH_LLAMA4 && w->cfg.shared_inter > 0;
}

static moe_status check_weights(const moe_weights *w, moe_dtype rd, moe_error *err)
{
    if (!w) return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: weights are NULL");
    const moe_config *c = &w->cfg;
    if (c->arch != MOE_ARCH_QWEN3 && c->arch != MOE_ARCH_LLAMA4)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: unknown arch %d", (int)c->arch);
    if (c->hidden <= 0 || c->inter <= 0 || c->num_experts <= 0 || c->top_k <= 0 ||
        c->top_k > c->num_experts || c->shared_inter < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "reference: config H=%d I=%d E=%d k=%d shared=%d out of range "
                        "(need positive sizes and 1 <= k <= E)",
                        c->hidden, c->inter, c->num_experts, c->top_k, c->shared_inter);
    if (w->expert_begin < 0 || w->expert_count < 0 ||
        w->expert_begin + w->expert_count > c->num_experts)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "reference: local experts [%d, %d) outside [0, %d)", w->expert_begin,
                        w->expert_begin + w->expert_count, c->num_experts);
    if (!rd_valid(rd))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "reference: rounding dtype %d is not bf16/fp16/fp32/fp64", (int)rd);
    int H = c->hidden, I = c->inter, E = c->num_experts, El = w->expert_count;
    MOE_TRY(check_tensor(&w->router, "router", 2, E, H, 0, err));
    if (El > 0) {
        MOE_TRY(check_tensor(&w->w13, "w13", 3, El, 2 * (int64_t)I, H, err));
        MOE_TRY(check_tensor(&w->w2, "w2", 3, El, H, I, err));
    }
    if (has_shared(w)) {
        int Is = c->shared_inter;
        MOE_TRY(check_tensor(&w->shared_gate, "shared_gate", 2, Is, H, 0, err));
        MOE_TRY(check_tensor(&w->shared_up, "shared_up", 2, Is, H, 0, err));
        MOE_TRY(check_tensor(&w->shared_down, "shared_down", 2, H, Is, 0, err));
    }
    return MOE_OK;
}

/* Forced routing must name k distinct experts in [0, E) per token. */
static moe_status check_forced(const moe_weights *w, int T, const int32_t *forced, moe_error *err)
{
    if (!forced || !w) return MOE_OK; /* NULL weights are reported by check_weights */
    const moe_config *c = &w->cfg;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < c->top_k; j++) {
            int32_t e = forced[(size_t)t * c->top_k + j];
            if (e < 0 || e >= c->num_experts)
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "reference: forced expert id %d of token %d outside [0, %d)", e, t,
                                c->num_experts);
            for (int q = 0; q < j; q++)
                if (forced[(size_t)t * c->top_k + q] == e)
                    return moe_fail(err, MOE_ERR_INVALID_ARG,
                                    "reference: token %d is forced to expert %d twice", t, e);
        }
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* The block                                                                                   */

typedef struct run {
    const moe_weights *w;
    moe_dtype rd;
    int T, H, I, E, El, k, Is, begin;
    bool llama;
    const double *x;
    const int32_t *forced; /* [T,k] expert ids to use instead of the top-k (NULL: route) */
    /* routing, [T,E] / [T,k] */
    double *logits;
    int32_t *ids;
    double *wts, *pre, *S;
    /* per local expert: rows (flat index t*k+j, ascending t) in tok[off[e] .. off[e+1]) */
    int32_t *off, *tok;
    bufs b;
    scratch sc;
    /* forward output (NULL: not wanted) and backward (NULL dout: forward only) */
    double *out;
    const double *dout;
    moe_ref_grads *g;
    double *dwt; /* [T,k] d of the routing weight (Qwen3) / score (Llama-4) */
} run;

static void run_free(run *r)
{
    free(r->logits); free(r->ids); free(r->wts); free(r->pre); free(r->S);
    free(r->off); free(r->tok); free(r->sc.buf); free(r->dwt);
    double **p[] = {&r->b.X, &r->b.G, &r->b.U, &r->b.A, &r->b.Hh, &r->b.Y,
                    &r->b.dY, &r->b.dH, &r->b.dG, &r->b.dU, &r->b.dX};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(*p[i]);
}

static double *alloc_d(size_t n, const char *what, moe_error *err)
{
    size_t bytes;
    if (!moe_mul_size(n ? n : 1, sizeof(double), &bytes)) {
        moe_fail(err, MOE_ERR_NOMEM, "reference: %s: size overflows", what);
        return NULL;
    }
    return moe_malloc(bytes, what, err);
}

static moe_status run_alloc(run *r, moe_error *err)
{
    size_t T = (size_t)r->T, E = (size_t)r->E, k = (size_t)r->k, H = (size_t)r->H;
    size_t Iw = (size_t)MOE_MAX(r->I, r->Is);
    size_t rows = (size_t)MOE_MIN(r->T > 0 ? r->T : 1, ROW_CHUNK);
    if (!(r->logits = alloc_d(T * E, "reference logits", err))) return MOE_ERR_NOMEM;
    if (!(r->ids = moe_malloc(MOE_MAX(T * k, (size_t)1) * sizeof(int32_t), "reference ids", err)))
        return MOE_ERR_NOMEM;
    if (!(r->wts = alloc_d(T * k, "reference weights", err))) return MOE_ERR_NOMEM;
    if (!(r->pre = alloc_d(T * k, "reference routing", err))) return MOE_ERR_NOMEM;
    if (!(r->S = alloc_d(T, "reference routing sums", err))) return MOE_ERR_NOMEM;
    if (!(r->off = moe_malloc(((size_t)r->El + 1) * sizeof(int32_t), "reference offsets", err)))
        return MOE_ERR_NOMEM;
    if (!(r->tok = moe_malloc(MOE_MAX(T * k, (size_t)1) * sizeof(int32_t), "reference rows", err)))
        return MOE_ERR_NOMEM;
    r->sc.nthr = omp_get_max_threads();
    if (r->sc.nthr < 1) r->sc.nthr = 1;
    r->sc.stride = scratch_need(MOE_MAX(H, Iw));
    if (!(r->sc.buf = alloc_d((size_t)r->sc.nthr * r->sc.stride, "reference scratch", err)))
        return MOE_ERR_NOMEM;
    struct { double **p; size_t n; } want[] = {
        {&r->b.X, rows * H},   {&r->b.G, rows * Iw},  {&r->b.U, rows * Iw},
        {&r->b.A, rows * Iw},  {&r->b.Hh, rows * Iw}, {&r->b.Y, rows * H},
        {&r->b.dY, rows * H},  {&r->b.dH, rows * Iw}, {&r->b.dG, rows * Iw},
        {&r->b.dU, rows * Iw}, {&r->b.dX, rows * H},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (!(*want[i].p = alloc_d(want[i].n, "reference activations", err))) return MOE_ERR_NOMEM;
    if (r->dout && !(r->dwt = alloc_d(T * k, "reference routing gradient", err)))
        return MOE_ERR_NOMEM;
    return MOE_OK;
}

/* Logits, routing, and the per-expert row lists. */
static void run_route(run *r)
{
    const moe_weights *w = r->w;
    proj_fwd(&w->router, 0, r->E, r->H, r->T, r->x, r->logits, r->rd, &r->sc);
    for (int t = 0; t < r->T; t++)
        route_one(&w->cfg, r->rd, r->logits + (size_t)t * r->E,
                  r->forced ? r->forced + (size_t)t * r->k : NULL, r->ids + (size_t)t * r->k,
                  r->wts + (size_t)t * r->k, r->pre + (size_t)t * r->k, &r->S[t]);
    /* Bucket the flat indices f = t*k+j by local expert, ascending f within each expert. */
    for (int e = 0; e <= r->El; e++) r->off[e] = 0;
    int M = r->T * r->k;
    for (int f = 0; f < M; f++) {
        int le = r->ids[f] - r->begin;
        if (le >= 0 && le < r->El) r->off[le + 1]++;
    }
    for (int e = 0; e < r->El; e++) r->off[e + 1] += r->off[e];
    /* Place each row at its expert's cursor (off[le] advances to the next expert's start),
     * then shift the offsets back. */
    for (int f = 0; f < M; f++) {
        int le = r->ids[f] - r->begin;
        if (le >= 0 && le < r->El) r->tok[r->off[le]++] = f;
    }
    for (int e = r->El; e > 0; e--) r->off[e] = r->off[e - 1];
    r->off[0] = 0;
}

static bool grads_want_expert(const run *r, int le)
{
    const moe_ref_grads *g = r->g;
    if (!g) return false;
    if (g->dx || g->d_router) return true;
    return (g->d_w13 && g->d_w13[le]) || (g->d_w2 && g->d_w2[le]);
}

/* One chunk of rows [p0, p0+n) of local expert le: forward, accumulate into out, backward. */
static void run_expert_chunk(run *r, int le, int p0, int n, double *acc)
{
    const moe_weights *w = r->w;
    int H = r->H, I = r->I, k = r->k;
    size_t eoff13 = (size_t)le * 2 * (size_t)I * H, eoff2 = (size_t)le * H * (size_t)I;
    mlp m = {&w->w13, &w->w13, &w->w2, eoff13, eoff13 + (size_t)I * H, eoff2, I};
    bufs *b = &r->b;
    const int32_t *rows = r->tok + p0;

    /* Inputs: Qwen3 x_t; Llama-4 xs = rd(x_t * score). */
    for (int i = 0; i < n; i++) {
        int t = rows[i] / k;
        const double *xt = r->x + (size_t)t * H;
        double *xi = b->X + (size_t)i * H;
        if (r->llama) {
            double s = r->wts[rows[i]];
            for (int c = 0; c < H; c++) xi[c] = moe_round_to(r->rd, xt[c] * s);
        } else {
            memcpy(xi, xt, (size_t)H * sizeof(double));
        }
    }
    mlp_forward(&m, H, r->rd, n, b->X, b->G, b->U, b->A, b->Hh, b->Y, &r->sc);

    if (acc) {
        /* HF: index_add_ of rd(y * w) (Qwen3) / the routed sum (Llama-4), one expert at a
         * time in ascending id; rows of one expert are distinct tokens. */
        for (int i = 0; i < n; i++) {
            int t = rows[i] / k;
            const double *yi = b->Y + (size_t)i * H;
            double *o = acc + (size_t)t * H;
            double wt = r->wts[rows[i]];
            if (r->llama) /* HF: routed_out.sum(dim=0): accumulated, rounded once later */
                for (int c = 0; c < H; c++) o[c] += yi[c];
            else
                for (int c = 0; c < H; c++)
                    o[c] = moe_round_to(r->rd, o[c] + moe_round_to(r->rd, yi[c] * wt));
        }
    }
    if (!r->dout || !grads_want_expert(r, le)) return;

    const moe_ref_grads *g = r->g;
    /* dY: Qwen3 y_scaled = y * w: dw = dot(dout_t, y), dy = w dout_t; Llama-4 dy = dout_t. */
    for (int i = 0; i < n; i++) {
        int f = rows[i], t = f / k;
        const double *dt = r->dout + (size_t)t * H;
        double *dyi = b->dY + (size_t)i * H;
        if (r->llama) {
            memcpy(dyi, dt, (size_t)H * sizeof(double));
        } else {
            r->dwt[f] = dot1(dt, b->Y + (size_t)i * H, H);
            double wt = r->wts[f];
            for (int c = 0; c < H; c++) dyi[c] = wt * dt[c];
        }
    }
    double *dw13 = g->d_w13 ? g->d_w13[le] : NULL;
    double *dw2 = g->d_w2 ? g->d_w2[le] : NULL;
    /* The input gradient is needed for dx, and on Llama-4 also for the score (router). */
    bool need_dx = g->dx || (r->llama && g->d_router);
    mlp_backward(&m, H, n, b, dw13, dw13 ? dw13 + (size_t)I * H : NULL, dw2,
                 need_dx ? b->dX : NULL, &r->sc);
    if (!need_dx) return;
    for (int i = 0; i < n; i++) {
        int f = rows[i], t = f / k;
        const double *dxi = b->dX + (size_t)i * H;
        if (r->llama) {
            /* xs = x * s: ds = dot(dxs, x); dx += s dxs. */
            r->dwt[f] = dot1(dxi, r->x + (size_t)t * H, H);
            if (g->dx) {
                double s = r->wts[f];
                double *d = g->dx + (size_t)t * H;
                for (int c = 0; c < H; c++) d[c] += s * dxi[c];
            }
        } else {
            double *d = g->dx + (size_t)t * H;
            for (int c = 0; c < H; c++) d[c] += dxi[c];
        }
    }
}

/* The shared expert (Llama-4) over tokens [t0, t0+n): adds into out (forward) and the grads. */
static void run_shared_chunk(run *r, int t0, int n, double *routed)
{
    const moe_weights *w = r->w;
    int H = r->H;
    mlp m = {&w->shared_gate, &w->shared_up, &w->shared_down, 0, 0, 0, r->Is};
    bufs *b = &r->b;
    const double *X = r->x + (size_t)t0 * H;
    memcpy(b->X, X, (size_t)n * H * sizeof(double));
    mlp_forward(&m, H, r->rd, n, b->X, b->G, b->U, b->A, b->Hh, b->Y, &r->sc);
    if (r->out) {
        for (int i = 0; i < n; i++) {
            double *o = r->out + (size_t)(t0 + i) * H;
            const double *s = b->Y + (size_t)i * H;
            const double *ro = routed + (size_t)(t0 + i) * H;
            /* out = rd(shared + rd(sum of the routed outputs)) */
            for (int c = 0; c < H; c++)
                o[c] = moe_round_to(r->rd, s[c] + moe_round_to(r->rd, ro[c]));
        }
    }
    if (!r->dout) return;
    moe_ref_grads *g = r->g;
    if (!g->dx && !g->d_shared_gate && !g->d_shared_up && !g->d_shared_down) return;
    memcpy(b->dY, r->dout + (size_t)t0 * H, (size_t)n * H * sizeof(double));
    mlp_backward(&m, H, n, b, g->d_shared_gate, g->d_shared_up, g->d_shared_down,
                 g->dx ? b->dX : NULL, &r->sc);
    if (g->dx) {
        for (size_t i = 0; i < (size_t)n * H; i++) g->dx[(size_t)t0 * H + i] += b->dX[i];
    }
}

static void zero_d(double *p, size_t n)
{
    if (p) memset(p, 0, n * sizeof(double));
}

static moe_status run_block(run *r, moe_error *err)
{
    const moe_weights *w = r->w;
    const moe_config *c = &w->cfg;
    r->H = c->hidden;
    r->I = c->inter;
    r->E = c->num_experts;
    r->k = c->top_k;
    r->El = w->expert_count;
    r->begin = w->expert_begin;
    r->llama = c->arch == MOE_ARCH_LLAMA4;
    r->Is = has_shared(w) ? c->shared_inter : 0;
    MOE_TRY(run_alloc(r, err));
    size_t TH = (size_t)r->T * r->H;

    /* Zero every requested gradient first, so an expert with no rows is exactly zero. */
    moe_ref_grads *g = r->g;
    if (r->dout) {
        zero_d(g->dx, TH);
        zero_d(g->d_router, (size_t)r->E * r->H);
        for (int le = 0; le < r->El; le++) {
            if (g->d_w13) zero_d(g->d_w13[le], 2 * (size_t)r->I * r->H);
            if (g->d_w2) zero_d(g->d_w2[le], (size_t)r->H * r->I);
        }
        if (r->Is > 0) {
            zero_d(g->d_shared_gate, (size_t)r->Is * r->H);
            zero_d(g->d_shared_up, (size_t)r->Is * r->H);
            zero_d(g->d_shared_down, (size_t)r->H * r->Is);
        }
        for (size_t i = 0; i < (size_t)r->T * r->k; i++) r->dwt[i] = 0;
    }

    run_route(r);

    /* Routed sum from zeros: Qwen3 writes it straight into out; Llama-4 keeps it apart until
     * the shared expert is added (out = rd(shared + routed)). */
    double *routed = NULL;
    if (r->out) {
        if (r->llama) {
            if (!(routed = alloc_d(TH, "reference routed sum", err))) return MOE_ERR_NOMEM;
        } else {
            routed = r->out;
        }
        memset(routed, 0, TH * sizeof(double));
    }

    for (int le = 0; le < r->El; le++) {
        int n = r->off[le + 1] - r->off[le];
        if (n == 0) continue;
        if (!r->out && !grads_want_expert(r, le)) continue;
        for (int p = 0; p < n; p += ROW_CHUNK)
            run_expert_chunk(r, le, r->off[le] + p, MOE_MIN(ROW_CHUNK, n - p), routed);
    }

    if (r->llama) {
        if (r->Is > 0) {
            for (int t0 = 0; t0 < r->T; t0 += ROW_CHUNK)
                run_shared_chunk(r, t0, MOE_MIN(ROW_CHUNK, r->T - t0), routed);
        } else if (r->out) {
            for (size_t i = 0; i < TH; i++) r->out[i] = moe_round_to(r->rd, routed[i]);
        }
        free(routed);
    }

    /* Router backward: dlogits [T,E] from the routing weights' gradients; then dx += dl Wr
     * and d_router = dl^T x. */
    if (r->dout && (g->dx || g->d_router)) {
        double *dl = alloc_d((size_t)r->T * r->E, "reference dlogits", err);
        if (!dl) return MOE_ERR_NOMEM;
        for (int t = 0; t < r->T; t++)
            route_backward(c, r->rd, r->logits + (size_t)t * r->E, r->ids + (size_t)t * r->k,
                           r->pre + (size_t)t * r->k, r->S[t], r->dwt + (size_t)t * r->k,
                           dl + (size_t)t * r->E);
        if (g->dx) proj_dx(&w->router, 0, r->E, r->H, r->T, dl, g->dx, &r->sc);
        if (g->d_router) proj_dw(r->E, r->H, r->T, dl, r->x, g->d_router);
        free(dl);
    }
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Public entry points                                                                         */

moe_status ref_forward(const moe_weights *w, moe_dtype rd, int T, const double *x,
                       moe_ref_fwd *out, moe_error *err)
{
    MOE_TRY(check_weights(w, rd, err));
    if (T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: T = %d is negative", T);
    if (!x && T > 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: x is NULL");
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: forward outputs are NULL");
    run r;
    memset(&r, 0, sizeof r);
    r.w = w;
    r.rd = rd;
    r.T = T;
    r.x = x;
    r.forced = out->forced_ids;
    MOE_TRY(check_forced(w, T, r.forced, err));
    r.out = out->out;
    double *tmp_out = NULL;
    if (!r.out) {
        /* A caller may want only the routing; the block still runs in full (cheap to allow). */
        if (!(tmp_out = alloc_d((size_t)T * w->cfg.hidden, "reference out", err)))
            return MOE_ERR_NOMEM;
        r.out = tmp_out;
    }
    moe_status st = run_block(&r, err);
    if (st == MOE_OK) {
        size_t TE = (size_t)T * r.E, Tk = (size_t)T * r.k;
        if (out->logits) memcpy(out->logits, r.logits, TE * sizeof(double));
        if (out->topk_ids) memcpy(out->topk_ids, r.ids, Tk * sizeof(int32_t));
        if (out->topk_w) memcpy(out->topk_w, r.wts, Tk * sizeof(double));
    }
    free(tmp_out);
    run_free(&r);
    return st;
}

moe_status ref_backward(const moe_weights *w, moe_dtype rd, int T, const double *x,
                        const double *dout, moe_ref_grads *g, moe_error *err)
{
    MOE_TRY(check_weights(w, rd, err));
    if (T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: T = %d is negative", T);
    if (T > 0 && (!x || !dout))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: backward needs x and dout (got %s)",
                        !x ? "x = NULL" : "dout = NULL");
    if (!g) return moe_fail(err, MOE_ERR_INVALID_ARG, "reference: gradient outputs are NULL");
    static const double no_tokens = 0; /* a non-NULL dout for T == 0 */
    run r;
    memset(&r, 0, sizeof r);
    r.w = w;
    r.rd = rd;
    r.T = T;
    r.x = x;
    r.forced = g ? g->forced_ids : NULL;
    MOE_TRY(check_forced(w, T, r.forced, err));
    r.dout = dout ? dout : &no_tokens;
    r.g = g;
    moe_status st = run_block(&r, err);
    run_free(&r);
    return st;
}

void ref_expert_rows(const moe_weights *w, moe_dtype rd, int e, int n, const double *x,
                     double *g, double *u, double *act, double *y)
{
    int I = w ? w->cfg.inter : 0, H = w ? w->cfg.hidden : 0;
    moe_error err;
    bool ok = x && n >= 0 && check_weights(w, rd, &err) == MOE_OK && e >= w->expert_begin &&
              e < w->expert_begin + w->expert_count;
    double *G = NULL, *U = NULL, *A = NULL, *Hh = NULL, *Y = NULL;
    scratch sc = {NULL, 1, 0};
    size_t nI = (size_t)MOE_MAX(n, 1) * (size_t)I, nH = (size_t)MOE_MAX(n, 1) * (size_t)H;
    if (ok) {
        sc.nthr = MOE_MAX(omp_get_max_threads(), 1);
        sc.stride = scratch_need((size_t)MOE_MAX(H, I));
        G = malloc(nI * sizeof(double));
        U = malloc(nI * sizeof(double));
        A = malloc(nI * sizeof(double));
        Hh = malloc(nI * sizeof(double));
        Y = malloc(nH * sizeof(double));
        sc.buf = malloc((size_t)sc.nthr * sc.stride * sizeof(double));
        ok = G && U && A && Hh && Y && sc.buf;
    }
    nI = (size_t)n * I;
    nH = (size_t)n * H;
    if (ok) {
        int le = e - w->expert_begin;
        size_t eoff13 = (size_t)le * 2 * (size_t)I * H, eoff2 = (size_t)le * H * (size_t)I;
        mlp m = {&w->w13, &w->w13, &w->w2, eoff13, eoff13 + (size_t)I * H, eoff2, I};
        mlp_forward(&m, H, rd, n, x, G, U, A, Hh, Y, &sc);
        if (g) memcpy(g, G, nI * sizeof(double));
        if (u) memcpy(u, U, nI * sizeof(double));
        if (act) memcpy(act, Hh, nI * sizeof(double));
        if (y) memcpy(y, Y, nH * sizeof(double));
    } else if (n > 0) {
        /* Cannot report: leave NaN so any comparison against these values fails loudly. */
        for (size_t i = 0; i < nI; i++) {
            if (g) g[i] = NAN;
            if (u) u[i] = NAN;
            if (act) act[i] = NAN;
        }
        for (size_t i = 0; y && i < nH; i++) y[i] = NAN;
    }
    free(G); free(U); free(A); free(Hh); free(Y); free(sc.buf);
}

void ref_expert_row(const moe_weights *w, moe_dtype rd, int e, const double *x, double *g,
                    double *u, double *act, double *y)
{
    ref_expert_rows(w, rd, e, 1, x, g, u, act, y);
}
