/*
 * cpu_fused_gemm.c — the grouped GEMM (forward GEMM1/GEMM2 and the backward dX GEMMs) and the
 * plain GEMM, as the CPU twin of the CUDA grouped-GEMM kernel.
 *
 * Work is cut into tiles (expert e, up to RB expert-order rows, up to NB output columns); each
 * tile converts its A rows (through permute_x / scale_a) and its B block to fp32 in K chunks of
 * KC, accumulates the chunk's products, adds them to the tile's fp32 accumulators (chunks in
 * ascending order), then runs the epilogue (row scale, SiLU-and-mul, rounding, permute_y
 * store). Within a chunk, B_e [N,K] (b_kn false) uses dot products with 8-lane partial sums
 * (element k goes to lane k % 8, lanes combined pairwise); B_e [K,N] (b_kn true) uses outer
 * products, each element summed sequentially in k, so B is never transposed. Each output
 * element is made by exactly one tile in this fixed order: any thread count gives the same
 * bits.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu_fused.h"
#include "cpu_fused_internal.h"

#define RB 32  /* expert-order rows per tile */
#define NB 64  /* output columns per tile (with SiLU-and-mul: NB gate + NB up accumulators) */
#define KC 256 /* K per chunk, a multiple of 8 */
#define LDACC (2 * NB)
#define WS_FLOATS ((size_t)RB * KC + (size_t)2 * NB * KC + (size_t)RB * LDACC)

typedef struct gemm_job {
    const moe_grouped_gemm_args *a;
    bool accumulate; /* cpu_gemm's C = round(C + A op(B)) */
    bool silu;
    int nout;        /* output columns: N, or N/2 with SiLU-and-mul */
    cf_rows arow;
} gemm_job;

typedef struct rowblock {
    int e;
    int32_t r0, r1;
} rowblock;

/* b_kn false, B_e [N, K]: Bb[j][0..kcp) = row col0+j of B_e over k in [k0, k0+kc) (a column
 * of op(B), contiguous), zero-padded to kcp. */
static void load_b_nk(const moe_grouped_gemm_args *a, int e, int col0, int nb, int k0, int kc,
                      int kcp, float *Bb)
{
    size_t be = (size_t)e * (size_t)a->N * (size_t)a->K;
    for (int j = 0; j < nb; j++) {
        float *dst = Bb + (size_t)j * KC;
        cf_load_span(a->dtype, a->B, be + (size_t)(col0 + j) * a->K + k0, kc, dst);
        for (int kk = kc; kk < kcp; kk++) dst[kk] = 0.0f;
    }
}

/* b_kn true, B_e [K, N]: Bt[kk][0..nbp) = row k0+kk of B_e over columns [col0, col0+nb), in
 * its natural layout (no transposition), zero-padded to nbp (a multiple of 16). */
static void load_b_kn(const moe_grouped_gemm_args *a, int e, int col0, int nb, int nbp, int k0,
                      int kc, float *Bt)
{
    size_t be = (size_t)e * (size_t)a->N * (size_t)a->K;
    for (int kk = 0; kk < kc; kk++) {
        float *dst = Bt + (size_t)kk * NB;
        cf_load_span(a->dtype, a->B, be + (size_t)(k0 + kk) * a->N + col0, nb, dst);
        for (int j = nb; j < nbp; j++) dst[j] = 0.0f;
    }
}

/* b_kn: acc[i][off + j] += sum over kk < kc, ascending, of Ab[i][kk] * Bt[kk][j] for i < nr,
 * j < nb: the outer-product form, vectorised over 16 output columns, so B needs no
 * transposition. Each element's sum is sequential in k; pairs of rows share the B loads and
 * the 1-row tail does the same per-element arithmetic. */
static void micro_kn(int nr, int nb, int nbp, int kc, const float *Ab, const float *Bt,
                     float *acc, int off)
{
    for (int n0 = 0; n0 < nbp; n0 += 16) {
        int w = MOE_MIN(16, nb - n0);
        int i = 0;
        for (; i + 2 <= nr; i += 2) {
            const float *a0 = Ab + (size_t)i * KC, *a1 = a0 + KC;
            cf_v4 s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0};
            cf_v4 s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0};
            for (int kk = 0; kk < kc; kk++) {
                const float *b = Bt + (size_t)kk * NB + n0;
                cf_v4 b0 = CF_LD4(b), b1 = CF_LD4(b + 4), b2 = CF_LD4(b + 8), b3 = CF_LD4(b + 12);
                float x0 = a0[kk], x1 = a1[kk];
                s00 += x0 * b0;
                s01 += x0 * b1;
                s02 += x0 * b2;
                s03 += x0 * b3;
                s10 += x1 * b0;
                s11 += x1 * b1;
                s12 += x1 * b2;
                s13 += x1 * b3;
            }
            float r0[16], r1[16];
            CF_ST4(r0, s00); CF_ST4(r0 + 4, s01); CF_ST4(r0 + 8, s02); CF_ST4(r0 + 12, s03);
            CF_ST4(r1, s10); CF_ST4(r1 + 4, s11); CF_ST4(r1 + 8, s12); CF_ST4(r1 + 12, s13);
            float *c0 = acc + (size_t)i * LDACC + off + n0, *c1 = c0 + LDACC;
            for (int q = 0; q < w; q++) {
                c0[q] += r0[q];
                c1[q] += r1[q];
            }
        }
        for (; i < nr; i++) {
            const float *a0 = Ab + (size_t)i * KC;
            cf_v4 s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0};
            for (int kk = 0; kk < kc; kk++) {
                const float *b = Bt + (size_t)kk * NB + n0;
                float x0 = a0[kk];
                s00 += x0 * CF_LD4(b);
                s01 += x0 * CF_LD4(b + 4);
                s02 += x0 * CF_LD4(b + 8);
                s03 += x0 * CF_LD4(b + 12);
            }
            float r0[16];
            CF_ST4(r0, s00); CF_ST4(r0 + 4, s01); CF_ST4(r0 + 8, s02); CF_ST4(r0 + 12, s03);
            float *c0 = acc + (size_t)i * LDACC + off + n0;
            for (int q = 0; q < w; q++) c0[q] += r0[q];
        }
    }
}

/* acc[i][j] += dot(Ab[i], Bb[j]) over kcp (a multiple of 8), i < nr, j < nbb.
 * Four rows share each B load; the 1-row tail does the very same lane arithmetic, so a row's
 * result does not depend on which path computed it. */
static void micro(int nr, int nbb, int kcp, const float *Ab, const float *Bb, float *acc)
{
    int i = 0;
    for (; i + 4 <= nr; i += 4) {
        const float *a0 = Ab + (size_t)i * KC, *a1 = a0 + KC, *a2 = a1 + KC, *a3 = a2 + KC;
        for (int j = 0; j < nbb; j++) {
            const float *b = Bb + (size_t)j * KC;
            cf_v4 s0l = {0}, s0h = {0}, s1l = {0}, s1h = {0}, s2l = {0}, s2h = {0}, s3l = {0},
                  s3h = {0};
            for (int k = 0; k < kcp; k += 8) {
                cf_v4 bl = CF_LD4(b + k), bh = CF_LD4(b + k + 4);
                s0l += CF_LD4(a0 + k) * bl;
                s0h += CF_LD4(a0 + k + 4) * bh;
                s1l += CF_LD4(a1 + k) * bl;
                s1h += CF_LD4(a1 + k + 4) * bh;
                s2l += CF_LD4(a2 + k) * bl;
                s2h += CF_LD4(a2 + k + 4) * bh;
                s3l += CF_LD4(a3 + k) * bl;
                s3h += CF_LD4(a3 + k + 4) * bh;
            }
            acc[(size_t)(i + 0) * LDACC + j] += cf_hsum8(s0l, s0h);
            acc[(size_t)(i + 1) * LDACC + j] += cf_hsum8(s1l, s1h);
            acc[(size_t)(i + 2) * LDACC + j] += cf_hsum8(s2l, s2h);
            acc[(size_t)(i + 3) * LDACC + j] += cf_hsum8(s3l, s3h);
        }
    }
    for (; i < nr; i++) {
        const float *a0 = Ab + (size_t)i * KC;
        for (int j = 0; j < nbb; j++) {
            const float *b = Bb + (size_t)j * KC;
            cf_v4 s0l = {0}, s0h = {0};
            for (int k = 0; k < kcp; k += 8) {
                s0l += CF_LD4(a0 + k) * CF_LD4(b + k);
                s0h += CF_LD4(a0 + k + 4) * CF_LD4(b + k + 4);
            }
            acc[(size_t)i * LDACC + j] += cf_hsum8(s0l, s0h);
        }
    }
}

static inline float silu_f(float g) { return g / (1.0f + expf(-g)); }

static void epilogue(const gemm_job *g, const rowblock *rb, int col0, int nb, const float *acc)
{
    const moe_grouped_gemm_args *a = g->a;
    moe_dtype dt = a->dtype;
    float vals[NB];
    for (int i = 0; i < rb->r1 - rb->r0; i++) {
        int64_t r = (int64_t)rb->r0 + i;
        size_t crow = (size_t)(a->permute_y ? a->gather_idx[r] : r);
        float sc = a->scale_c_rows ? cf_load(dt, a->scale_c_rows, (size_t)a->gather_idx[r]) : 1.0f;
        const float *ar = acc + (size_t)i * LDACC;
        if (g->silu) {
            int I = g->nout;
            if (a->C_preact) {
                cf_store_span(dt, a->C_preact, crow * (size_t)a->N + col0, nb, ar);
                cf_store_span(dt, a->C_preact, crow * (size_t)a->N + I + col0, nb, ar + nb);
            }
            /* act = silu(gate) * up from the fp32 accumulators, rounded once. */
            for (int j = 0; j < nb; j++) vals[j] = silu_f(ar[j]) * ar[nb + j];
        } else {
            for (int j = 0; j < nb; j++) vals[j] = ar[j];
            if (a->scale_c_rows)
                for (int j = 0; j < nb; j++) vals[j] *= sc;
            if (g->accumulate)
                for (int j = 0; j < nb; j++)
                    vals[j] += cf_load(dt, a->C, crow * (size_t)g->nout + col0 + j);
        }
        cf_store_span(dt, a->C, crow * (size_t)g->nout + col0, nb, vals);
    }
}

static void run_tile(const gemm_job *g, const rowblock *rb, int col0, int nb, float *ws)
{
    const moe_grouped_gemm_args *a = g->a;
    float *Ab = ws;
    float *Bb = Ab + (size_t)RB * KC; /* b_kn false: [2 NB][KC]; true: two [KC][NB] blocks */
    float *acc = Bb + (size_t)2 * NB * KC;
    int nr = rb->r1 - rb->r0;
    int nbp = (nb + 15) & ~15;
    memset(acc, 0, sizeof(float) * (size_t)RB * LDACC);
    for (int k0 = 0; k0 < a->K; k0 += KC) {
        int kc = MOE_MIN(KC, a->K - k0);
        int kcp = (kc + 7) & ~7;
        for (int i = 0; i < nr; i++) {
            float *dst = Ab + (size_t)i * KC;
            cf_load_row(&g->arow, (int64_t)rb->r0 + i, k0, kc, dst);
            for (int kk = kc; kk < kcp; kk++) dst[kk] = 0.0f;
        }
        if (!a->b_kn) {
            load_b_nk(a, rb->e, col0, nb, k0, kc, kcp, Bb);
            if (g->silu) load_b_nk(a, rb->e, g->nout + col0, nb, k0, kc, kcp, Bb + (size_t)nb * KC);
            micro(nr, g->silu ? 2 * nb : nb, kcp, Ab, Bb, acc);
        } else {
            load_b_kn(a, rb->e, col0, nb, nbp, k0, kc, Bb);
            micro_kn(nr, nb, nbp, kc, Ab, Bb, acc, 0);
            if (g->silu) {
                float *Bu = Bb + (size_t)NB * KC;
                load_b_kn(a, rb->e, g->nout + col0, nb, nbp, k0, kc, Bu);
                micro_kn(nr, nb, nbp, kc, Ab, Bu, acc, nb);
            }
        }
    }
    epilogue(g, rb, col0, nb, acc);
}

/* Runs a validated job over every (row block, column block) tile. */
static moe_status run_job(const gemm_job *g, moe_error *err)
{
    const moe_grouped_gemm_args *a = g->a;
    int E = a->num_experts;
    int64_t nrb = 0;
    for (int e = 0; e < E; e++)
        nrb += ((int64_t)a->expert_offsets[e + 1] - a->expert_offsets[e] + RB - 1) / RB;
    if (nrb == 0) return MOE_OK;
    rowblock *rbs = moe_malloc((size_t)nrb * sizeof *rbs, "grouped GEMM row blocks", err);
    if (!rbs) return MOE_ERR_NOMEM;
    int64_t n = 0;
    for (int e = 0; e < E; e++)
        for (int32_t r = a->expert_offsets[e]; r < a->expert_offsets[e + 1]; r += RB)
            rbs[n++] = (rowblock){e, r, MOE_MIN(r + RB, a->expert_offsets[e + 1])};
    int nnb = (g->nout + NB - 1) / NB;
    int64_t ntask = nrb * nnb;
    int failed = 0;
    int64_t work = (int64_t)a->expert_offsets[E] * g->nout * a->K;
#pragma omp parallel if (ntask > 1 && cf_par(work))
    {
        float *ws = cf_scratch(WS_FLOATS);
        if (!ws) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; t++) {
            if (!ws) continue;
            int cb = (int)(t % nnb);
            int col0 = cb * NB;
            run_tile(g, &rbs[t / nnb], col0, MOE_MIN(NB, g->nout - col0), ws);
        }
        cf_scratch_free(ws);
    }
    free(rbs);
    if (failed)
        return moe_fail(err, MOE_ERR_NOMEM, "grouped GEMM: cannot allocate %zu bytes of "
                        "per-thread scratch", WS_FLOATS * sizeof(float));
    return MOE_OK;
}

moe_status cpu_grouped_gemm(const moe_grouped_gemm_args *a, moe_error *err)
{
    static const char who[] = "cpu_grouped_gemm";
    if (!a) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: args is NULL", who);
    MOE_TRY(cf_check_dtype(who, a->dtype, err));
    if (a->permute_x && a->permute_y)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: permute_x and permute_y on one GEMM: "
                        "permute_x is for GEMM1 (gather tokens), permute_y for GEMM2 (scatter "
                        "to flat order), never both", who);
    if (a->N < 1 || a->K < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: N = %d, K = %d, expected >= 1", who,
                        a->N, a->K);
    if (a->epilogue != MOE_EPI_NONE && a->epilogue != MOE_EPI_SILU_MUL)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: unknown epilogue %d", who,
                        (int)a->epilogue);
    if (a->epilogue == MOE_EPI_SILU_MUL && a->N % 2 != 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: SiLU-and-mul needs N = 2I even, got "
                        "N = %d", who, a->N);
    if (a->epilogue == MOE_EPI_SILU_MUL && a->scale_c_rows)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: scale_c_rows with the SiLU-and-mul "
                        "epilogue is not defined (the top-k weight belongs to GEMM2)", who);
    if (a->epilogue != MOE_EPI_SILU_MUL && a->C_preact)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: C_preact is only written with the "
                        "SiLU-and-mul epilogue", who);
    int64_t M;
    MOE_TRY(cf_check_offsets(who, a->num_experts, a->expert_offsets, a->max_rows, &M, err));
    if (!a->A || !a->B || !a->C)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: %s is NULL", who,
                        !a->A ? "A" : !a->B ? "B" : "C");
    bool need_gather = a->permute_x || a->permute_y || a->scale_a_rows || a->scale_c_rows;
    if (need_gather)
        MOE_TRY(cf_check_gather(who, M, a->max_rows, a->topk, a->gather_idx, a->permute_y,
                                err));
    gemm_job g = {
        .a = a,
        .accumulate = false,
        .silu = a->epilogue == MOE_EPI_SILU_MUL,
        .nout = a->epilogue == MOE_EPI_SILU_MUL ? a->N / 2 : a->N,
        .arow = {a->dtype, a->A, a->K, a->permute_x, a->scale_a_rows, a->gather_idx, a->topk},
    };
    return run_job(&g, err);
}

moe_status cpu_gemm(moe_dtype dt, int M, int N, int K, const void *A, const void *B, bool b_kn,
                    void *C, bool accumulate, moe_error *err)
{
    static const char who[] = "cpu_gemm";
    MOE_TRY(cf_check_dtype(who, dt, err));
    if (M < 0 || N < 0 || K < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: negative size M=%d N=%d K=%d", who, M,
                        N, K);
    if (M == 0 || N == 0) return MOE_OK;
    if (K == 0) {
        /* An empty sum: C = round(0) (or C unchanged). */
        if (!accumulate)
            for (size_t i = 0; i < (size_t)M * N; i++) cf_store(dt, C, i, 0.0f);
        return MOE_OK;
    }
    int32_t offsets[2] = {0, M};
    moe_grouped_gemm_args a = {
        .dtype = dt, .num_experts = 1, .expert_offsets = offsets, .N = N, .K = K,
        .max_rows = M, .topk = 1,
        .A = A, .B = B, .b_kn = b_kn, .C = C, .epilogue = MOE_EPI_NONE,
    };
    gemm_job g = {
        .a = &a, .accumulate = accumulate, .silu = false, .nout = N,
        .arow = {dt, A, K, false, NULL, NULL, 1},
    };
    return run_job(&g, err);
}
