/* check.c — stage-by-stage comparisons of the correctness mode (see check.h).
 *
 * Every stage's reference is fed the fused path's own upstream values: routing is checked on the
 * fused logits, GEMM1 on the rows the fused sort chose, the activation on the fused GEMM1
 * output, GEMM2 on the fused activation. The end-to-end output and the gradients come from the
 * reference forced onto the fused routing (so a near-tie that rounds differently in the router
 * cannot fail them); the routing stage separately proves the fused choice is a valid top-k. */
#include "check.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/reference.h"
#include "dtype.h"
#include "rng.h"

void moe_check_report_init(moe_check_report *r)
{
    memset(r, 0, sizeof *r);
    r->all_pass = true;
}

static moe_check_row *next_row(moe_check_report *r, const char *stage, const char *compared)
{
    static moe_check_row overflow; /* never printed: only reached past 64 stages */
    moe_check_row *row = r->count < MOE_CHECK_MAX_ROWS ? &r->rows[r->count++] : &overflow;
    memset(row, 0, sizeof *row);
    snprintf(row->stage, sizeof row->stage, "%s", stage);
    snprintf(row->compared, sizeof row->compared, "%s", compared);
    row->worst_row = -1;
    return row;
}

/* One row's sums: num = sum (got-ref)^2, den = sum ref^2, and whether a NaN/Inf appeared. */
typedef void (*row_sums_fn)(const void *ctx, size_t row, double *num, double *den, bool *nan);

/* The stage rule over `rows` rows whose sums come from fn (so a huge tensor is never copied). */
static void compare_rows(moe_check_report *r, const char *stage, const char *compared,
                         size_t rows, double tol, row_sums_fn fn, const void *ctx)
{
    moe_check_row *row = next_row(r, stage, compared);
    bool nan = false, zero_bad = false;
    double num = 0, den = 0;
    for (size_t i = 0; i < rows; i++) {
        double rn = 0, rd = 0;
        bool rnan = false;
        fn(ctx, i, &rn, &rd, &rnan);
        num += rn;
        den += rd;
        double e = rd == 0 ? (rn == 0 ? 0 : INFINITY) : sqrt(rn / rd);
        if (rd == 0 && rn != 0) zero_bad = true;
        if (rnan) nan = true;
        if (e > row->worst_err || row->worst_row < 0 || rnan) {
            if (e > row->worst_err || row->worst_row < 0) row->worst_err = e;
            row->worst_row = (long)i;
        }
    }
    row->rel_err = den == 0 ? (num == 0 ? 0 : INFINITY) : sqrt(num / den);
    row->tol = tol;
    row->pass = !nan && !zero_bad && row->rel_err <= tol && row->worst_err <= 10 * tol;
    if (nan) snprintf(row->note, sizeof row->note, "NaN/Inf present (unwritten or overflow)");
    else if (zero_bad) snprintf(row->note, sizeof row->note, "a zero reference row is not zero");
    if (!row->pass) r->all_pass = false;
}

static void sums(const double *a, const double *ref, size_t n, double *num, double *den, bool *nan)
{
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(ref[i]) || isinf(a[i])) *nan = true;
        double d = a[i] - ref[i];
        *num += d * d;
        *den += ref[i] * ref[i];
    }
}

typedef struct dense_rows { const double *got, *ref; size_t cols; } dense_rows;

static void dense_row_sums(const void *ctx, size_t i, double *num, double *den, bool *nan)
{
    const dense_rows *d = ctx;
    sums(d->got + i * d->cols, d->ref + i * d->cols, d->cols, num, den, nan);
}

void moe_check_compare(moe_check_report *r, const char *stage, const char *compared,
                       const double *got, const double *ref, size_t rows, size_t cols,
                       double tol)
{
    dense_rows d = {got, ref, cols};
    compare_rows(r, stage, compared, rows, tol, dense_row_sums, &d);
}

/* Rows = chosen slabs of a tensor stored in dt (e.g. one expert's gradient each) against double
 * references, read in place. */
typedef struct slab_rows {
    moe_dtype dt;
    const void *base;
    size_t slab;           /* elements per row */
    const int *index;      /* row i is slab index[i] of base (NULL: slab i) */
    const double *const *ref; /* ref[i]: the reference of row i */
} slab_rows;

static void slab_row_sums(const void *ctx, size_t i, double *num, double *den, bool *nan)
{
    const slab_rows *s = ctx;
    size_t at = (size_t)(s->index ? s->index[i] : (int)i) * s->slab;
    const double *ref = s->ref[i];
    for (size_t q = 0; q < s->slab; q++) {
        double a = moe_load_elem(s->dt, s->base, at + q), b = ref[q];
        if (isnan(a) || isnan(b) || isinf(a)) *nan = true;
        *num += (a - b) * (a - b);
        *den += b * b;
    }
}

void moe_check_exact(moe_check_report *r, const char *stage, const char *compared, long n,
                     long mismatches, const char *note)
{
    moe_check_row *row = next_row(r, stage, compared);
    row->rel_err = NAN;
    row->worst_err = (double)mismatches;
    row->worst_row = n;
    row->pass = mismatches == 0;
    snprintf(row->note, sizeof row->note, "%s", note ? note : "");
    if (!row->pass) r->all_pass = false;
}

void moe_check_print(const moe_check_report *r, FILE *f)
{
    fprintf(f, "%-22s %-26s %10s %22s %9s  %s\n", "stage", "compared", "rel err",
            "worst row (index)", "tol", "result");
    for (int i = 0; i < r->count; i++) {
        const moe_check_row *w = &r->rows[i];
        if (isnan(w->rel_err)) {
            char mism[48];
            snprintf(mism, sizeof mism, "%ld of %ld differ", (long)w->worst_err, w->worst_row);
            fprintf(f, "%-22s %-26s %10s %22s %9s  %s%s%s\n", w->stage, w->compared, "exact", mism,
                    "exact", w->pass ? "ok" : "FAIL", w->note[0] ? "  " : "", w->note);
        } else {
            char worst[48];
            snprintf(worst, sizeof worst, "%.2e (%ld)", w->worst_err, w->worst_row);
            fprintf(f, "%-22s %-26s %10.2e %22s %9.1e  %s%s%s\n", w->stage, w->compared,
                    w->rel_err, worst, w->tol, w->pass ? "ok" : "FAIL", w->note[0] ? "  " : "",
                    w->note);
        }
    }
    fprintf(f, "%s: %d stages, %s\n", r->all_pass ? "PASS" : "FAIL", r->count,
            r->all_pass ? "all within tolerance" : "see FAIL rows above");
}

double moe_check_tol(moe_dtype dt, bool grad)
{
    switch (dt) {
    case MOE_DTYPE_BF16: return 1e-2;
    case MOE_DTYPE_F16: return 1e-3;
    case MOE_DTYPE_F32: return grad ? 1e-4 : 1e-5;
    default: return 1e-12;
    }
}

/* ---- helpers ---- */

static double *to_double(moe_dtype dt, const void *src, size_t n, moe_error *err)
{
    double *d = moe_malloc(n * sizeof(double), "check buffer", err);
    if (!d) return NULL;
    for (size_t i = 0; i < n; i++) d[i] = moe_load_elem(dt, src, i);
    return d;
}

/* A sorted sample of `want` distinct indices out of n (all of them when want <= 0 or >= n). */
static int *choose_sample(int n, int want, uint64_t seed, const char *what, int *count,
                          moe_error *err)
{
    if (want <= 0 || want >= n) want = n;
    int *idx = moe_malloc((size_t)(n > 0 ? n : 1) * sizeof(int), "sample", err);
    if (!idx) return NULL;
    for (int i = 0; i < n; i++) idx[i] = i;
    if (want < n) {
        uint64_t s = moe_rng_stream(seed, what);
        for (int i = 0; i < want; i++) { /* partial Fisher-Yates, then sort the chosen prefix */
            int j = i + (int)(moe_rng_u64(s, (uint64_t)i) % (uint64_t)(n - i));
            int t = idx[i]; idx[i] = idx[j]; idx[j] = t;
        }
        for (int i = 1; i < want; i++)
            for (int j = i; j > 0 && idx[j - 1] > idx[j]; j--) {
                int t = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = t;
            }
    }
    *count = want;
    return idx;
}

static void describe(char *buf, size_t len, int chosen, int total, const char *unit, int cols)
{
    if (chosen == total) snprintf(buf, len, "%d %s x %d", total, unit, cols);
    else snprintf(buf, len, "%d of %d %s (sampled)", chosen, total, unit);
}

static double silu(double g) { return g / (1.0 + exp(-g)); }

/* The expert owning expert-order row r (offsets are [El+1]). */
static int expert_of_row(const int32_t *off, int El, int r)
{
    int lo = 0, hi = El - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (off[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* ---- forward ---- */

moe_status moe_check_forward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                             const moe_fwd_state *st, const moe_check_options *o,
                             moe_check_report *rep, moe_error *err)
{
    const moe_config *c = &w->cfg;
    const int H = c->hidden, I = c->inter, E = c->num_experts, k = c->top_k;
    const int El = w->expert_count, eb = w->expert_begin;
    const bool llama = c->arch == MOE_ARCH_LLAMA4;
    const double tol = moe_check_tol(dt, false);
    moe_status st_ret = MOE_OK;
    char what[64];

    double *xd = NULL, *logits = NULL, *tw = NULL, *buf_got = NULL, *buf_ref = NULL;
    double *g = NULL, *u = NULL, *a = NULL, *y = NULL;
    int *tok = NULL;
    int32_t *my_counts = NULL, *my_gather = NULL, *my_off = NULL;
    moe_ref_fwd ref = {0};

    xd = to_double(dt, x, (size_t)T * H, err);
    logits = to_double(dt, st->router_logits, (size_t)T * E, err);
    tw = to_double(dt, st->topk_w, (size_t)T * k, err);
    if (!xd || !logits || !tw) { st_ret = MOE_ERR_NOMEM; goto done; }
    int ntok = 0;
    tok = choose_sample(T, o->sample, o->seed, "check.tokens", &ntok, err);
    if (!tok) { st_ret = MOE_ERR_NOMEM; goto done; }

    /* Reference forward, routed like the fused path. */
    ref.logits = moe_malloc((size_t)T * E * sizeof(double), "ref logits", err);
    ref.topk_ids = moe_malloc((size_t)T * k * sizeof(int32_t), "ref ids", err);
    ref.topk_w = moe_malloc((size_t)T * k * sizeof(double), "ref weights", err);
    ref.out = moe_malloc((size_t)T * H * sizeof(double), "ref out", err);
    if (!ref.logits || !ref.topk_ids || !ref.topk_w || !ref.out) { st_ret = MOE_ERR_NOMEM; goto done; }
    ref.forced_ids = st->topk_ids;
    MOE_TRY_GOTO(ref_forward(w, dt, T, xd, &ref, err), st_ret, done);

    size_t maxrow = (size_t)MOE_MAX(MOE_MAX(E, 2 * I), H);
    buf_got = moe_malloc((size_t)ntok * maxrow * sizeof(double) + 8, "check rows", err);
    buf_ref = moe_malloc((size_t)ntok * maxrow * sizeof(double) + 8, "check rows", err);
    if (!buf_got || !buf_ref) { st_ret = MOE_ERR_NOMEM; goto done; }

    /* 1. router logits */
    for (int i = 0; i < ntok; i++) {
        memcpy(buf_got + (size_t)i * E, logits + (size_t)tok[i] * E, E * sizeof(double));
        memcpy(buf_ref + (size_t)i * E, ref.logits + (size_t)tok[i] * E, E * sizeof(double));
    }
    describe(what, sizeof what, ntok, T, "tokens", E);
    moe_check_compare(rep, "router_logits", what, buf_got, buf_ref, ntok, E, tol);

    /* 2. routing on the fused logits: the chosen set must be a valid top-k (every chosen logit
     *    >= every other), the order descending, and the weights match the reference's weights
     *    for that set. Ties are legal either way and counted. */
    long bad_sets = 0, ties = 0;
    int32_t rid[512];
    double rw[512];
    const int kk = k <= 512 ? k : 512;
    for (int i = 0; i < ntok; i++) {
        int t = tok[i];
        const int32_t *ids = st->topk_ids + (size_t)t * k;
        const double *lr = logits + (size_t)t * E;
        double minsel = INFINITY, maxother = -INFINITY;
        bool dup = false;
        for (int j = 0; j < k; j++) {
            if (ids[j] < 0 || ids[j] >= E) { dup = true; break; }
            for (int q = 0; q < j; q++) dup |= ids[q] == ids[j];
            minsel = fmin(minsel, lr[ids[j]]);
            if (j > 0 && lr[ids[j]] > lr[ids[j - 1]]) dup = true; /* not descending */
        }
        for (int e = 0; e < E && !dup; e++) {
            bool sel = false;
            for (int j = 0; j < k; j++) sel |= ids[j] == e;
            if (!sel) maxother = fmax(maxother, lr[e]);
        }
        if (dup || maxother > minsel) bad_sets++;
        else if (maxother == minsel) ties++;
        /* weights: the reference's value for the same ids */
        ref_route_row(c, dt, lr, rid, rw);
        for (int j = 0; j < kk; j++) {
            buf_got[(size_t)i * kk + j] = tw[(size_t)t * k + j];
            double want = NAN;
            for (int q = 0; q < kk; q++)
                if (rid[q] == ids[j]) want = rw[q];
            /* on a tie the reference may have picked the other id; same value either way */
            if (isnan(want)) want = rw[j];
            buf_ref[(size_t)i * kk + j] = want;
        }
    }
    char note[96];
    snprintf(note, sizeof note, "%ld tokens with ties at the k-th place", ties);
    describe(what, sizeof what, ntok, T, "tokens", k);
    moe_check_exact(rep, "routing (valid top-k)", what, ntok, bad_sets, note);
    moe_check_compare(rep, llama ? "routing scores" : "routing weights", what, buf_got, buf_ref,
                      ntok, kk, tol);

    /* 3. counts, offsets, gather indices: exact against an independent stable sort of the
     *    fused ids over the local experts. */
    my_counts = calloc((size_t)El + 1, sizeof(int32_t));
    my_off = calloc((size_t)El + 2, sizeof(int32_t));
    my_gather = malloc((size_t)T * k * sizeof(int32_t) + 4);
    if (!my_counts || !my_off || !my_gather) { st_ret = moe_fail(err, MOE_ERR_NOMEM, "check: sort buffers"); goto done; }
    for (long f = 0; f < (long)T * k; f++) {
        int e = st->topk_ids[f] - eb;
        if (e >= 0 && e < El) my_counts[e]++;
    }
    for (int e = 0; e < El; e++) my_off[e + 1] = my_off[e] + my_counts[e];
    int M = my_off[El];
    {
        long n = 0;
        for (int e = 0; e < El; e++) /* expert by expert, flat indices ascending: stable */
            for (long f = 0; f < (long)T * k; f++)
                if (st->topk_ids[f] - eb == e) my_gather[n++] = (int32_t)f;
        long mc = 0, mo = 0, mg = 0;
        for (int e = 0; e < El; e++) mc += my_counts[e] != st->token_counts[e];
        for (int e = 0; e <= El; e++) mo += my_off[e] != st->expert_offsets[e];
        for (int r = 0; r < M; r++) mg += my_gather[r] != st->gather_idx[r];
        snprintf(what, sizeof what, "%d experts", El);
        moe_check_exact(rep, "token_counts", what, El, mc, NULL);
        moe_check_exact(rep, "expert_offsets", what, El + 1, mo, NULL);
        snprintf(what, sizeof what, "%d rows", M);
        moe_check_exact(rep, "gather_idx", what, M, mg, "stable counting sort");
        if (mc || mo || mg) goto e2e; /* later stages index by the sort: stop here */
    }

    /* 4. GEMM1 / activation / GEMM2 on sampled expert-order rows, each fed the fused path's
     *    own upstream values. */
    {
        int nrow = 0;
        int *rows = choose_sample(M, o->sample, o->seed, "check.rows", &nrow, err);
        if (!rows) { st_ret = MOE_ERR_NOMEM; goto done; }
        g = malloc(sizeof(double) * (size_t)I);
        u = malloc(sizeof(double) * (size_t)I);
        a = malloc(sizeof(double) * (size_t)I);
        y = malloc(sizeof(double) * (size_t)H);
        double *xs = malloc(sizeof(double) * (size_t)H);
        if (!g || !u || !a || !y || !xs) {
            free(rows); free(xs);
            st_ret = moe_fail(err, MOE_ERR_NOMEM, "check: row buffers");
            goto done;
        }
        size_t need = (size_t)nrow * (size_t)MOE_MAX(2 * I, H);
        double *got2 = calloc(need + 1, sizeof(double)), *ref2 = calloc(need + 1, sizeof(double));
        if (!got2 || !ref2) {
            free(rows); free(xs); free(got2); free(ref2);
            st_ret = moe_fail(err, MOE_ERR_NOMEM, "check: row buffers");
            goto done;
        }
        /* GEMM1: the sampled rows are sorted, so each expert's rows are contiguous and the
         * reference runs once per expert over all of them */
        if (st->gemm1_out) {
            double *xrows = malloc(sizeof(double) * (size_t)MOE_MAX(nrow, 1) * H);
            double *gr = malloc(sizeof(double) * (size_t)MOE_MAX(nrow, 1) * I);
            double *ur = malloc(sizeof(double) * (size_t)MOE_MAX(nrow, 1) * I);
            if (!xrows || !gr || !ur) {
                free(xrows); free(gr); free(ur); free(rows); free(xs); free(got2); free(ref2);
                st_ret = moe_fail(err, MOE_ERR_NOMEM, "check: row buffers");
                goto done;
            }
            for (int i0 = 0; i0 < nrow;) {
                int el = expert_of_row(st->expert_offsets, El, rows[i0]);
                int i1 = i0;
                while (i1 < nrow && expert_of_row(st->expert_offsets, El, rows[i1]) == el) {
                    int f = st->gather_idx[rows[i1]], t = f / k;
                    double *xr = xrows + (size_t)(i1 - i0) * H;
                    for (int h = 0; h < H; h++)
                        xr[h] = llama ? moe_round_to(dt, xd[(size_t)t * H + h] * tw[f])
                                      : xd[(size_t)t * H + h];
                    i1++;
                }
                ref_expert_rows(w, dt, eb + el, i1 - i0, xrows, gr, ur, NULL, NULL);
                for (int i = i0; i < i1; i++) {
                    memcpy(ref2 + (size_t)i * 2 * I, gr + (size_t)(i - i0) * I, I * sizeof(double));
                    memcpy(ref2 + (size_t)i * 2 * I + I, ur + (size_t)(i - i0) * I, I * sizeof(double));
                    for (int j = 0; j < 2 * I; j++)
                        got2[(size_t)i * 2 * I + j] =
                            moe_load_elem(dt, st->gemm1_out, (size_t)rows[i] * 2 * I + j);
                }
                i0 = i1;
            }
            free(xrows); free(gr); free(ur);
            describe(what, sizeof what, nrow, M, "rows", 2 * I);
            moe_check_compare(rep, "gemm1_out (gate|up)", what, got2, ref2, nrow, 2 * I, tol);
            /* activation from the fused GEMM1 output, HF's rounding points */
            for (int i = 0; i < nrow; i++) {
                int r = rows[i];
                for (int j = 0; j < I; j++) {
                    double gg = moe_load_elem(dt, st->gemm1_out, (size_t)r * 2 * I + j);
                    double uu = moe_load_elem(dt, st->gemm1_out, (size_t)r * 2 * I + I + j);
                    ref2[(size_t)i * I + j] = moe_round_to(dt, moe_round_to(dt, silu(gg)) * uu);
                    got2[(size_t)i * I + j] = moe_load_elem(dt, st->act, (size_t)r * I + j);
                }
            }
            describe(what, sizeof what, nrow, M, "rows", I);
            moe_check_compare(rep, "act (silu*up)", what, got2, ref2, nrow, I, tol);
        }
        /* GEMM2 from the fused activation, with the fused top-k weight (Qwen3) */
        if (st->act && st->gemm2_out) {
            for (int i = 0; i < nrow; i++) {
                int r = rows[i], f = st->gather_idx[r];
                int el = expert_of_row(st->expert_offsets, El, r);
                for (int j = 0; j < I; j++) a[j] = moe_load_elem(dt, st->act, (size_t)r * I + j);
                const size_t base = (size_t)el * H * I;
                for (int h = 0; h < H; h++) {
                    double s = 0;
                    for (int j = 0; j < I; j++)
                        s += a[j] * moe_load_elem(w->dtype, w->w2.data, base + (size_t)h * I + j);
                    s = moe_round_to(dt, s);
                    if (!llama) s = moe_round_to(dt, s * tw[f]);
                    ref2[(size_t)i * H + h] = s;
                    got2[(size_t)i * H + h] = moe_load_elem(dt, st->gemm2_out, (size_t)f * H + h);
                }
            }
            describe(what, sizeof what, nrow, M, "rows", H);
            moe_check_compare(rep, "gemm2_out (permuted)", what, got2, ref2, nrow, H, tol);
        }
        free(rows); free(xs); free(got2); free(ref2);
    }

e2e:
    /* 5. the block's output against the reference routed the same way */
    for (int i = 0; i < ntok; i++) {
        int t = tok[i];
        for (int h = 0; h < H; h++) {
            buf_got[(size_t)i * H + h] = moe_load_elem(dt, st->out, (size_t)t * H + h);
            buf_ref[(size_t)i * H + h] = ref.out[(size_t)t * H + h];
        }
    }
    describe(what, sizeof what, ntok, T, "tokens", H);
    moe_check_compare(rep, "output", what, buf_got, buf_ref, ntok, H, tol);

done:
    free(xd); free(logits); free(tw); free(buf_got); free(buf_ref); free(tok);
    free(g); free(u); free(a); free(y);
    free(my_counts); free(my_off); free(my_gather);
    free(ref.logits); free(ref.topk_ids); free(ref.topk_w); free(ref.out);
    return st_ret;
}

/* ---- backward ---- */

moe_status moe_check_backward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                              const moe_fwd_state *st, const void *dout, const void *dx,
                              const moe_weights *grads, const moe_check_options *o,
                              moe_check_report *rep, moe_error *err)
{
    const moe_config *c = &w->cfg;
    const int H = c->hidden, I = c->inter, E = c->num_experts;
    const int El = w->expert_count;
    const int Is = c->shared_inter;
    const bool llama = c->arch == MOE_ARCH_LLAMA4;
    const double tol = moe_check_tol(dt, true);
    moe_status ret = MOE_OK;
    char what[64];
    int nexp = 0, ntok = 0;
    int *experts = NULL, *tok = NULL;
    double *xd = NULL, *doutd = NULL, *got = NULL;
    moe_ref_grads g;
    memset(&g, 0, sizeof g);

    xd = to_double(dt, x, (size_t)T * H, err);
    doutd = to_double(dt, dout, (size_t)T * H, err);
    experts = choose_sample(El, o->sample, o->seed, "check.experts", &nexp, err);
    tok = choose_sample(T, o->sample, o->seed, "check.tokens", &ntok, err);
    g.dx = moe_malloc((size_t)T * H * sizeof(double), "ref dx", err);
    g.d_router = moe_malloc((size_t)E * H * sizeof(double), "ref d_router", err);
    g.d_w13 = calloc((size_t)El, sizeof(double *));
    g.d_w2 = calloc((size_t)El, sizeof(double *));
    if (!xd || !doutd || !experts || !tok || !g.dx || !g.d_router || !g.d_w13 || !g.d_w2) {
        ret = moe_fail(err, MOE_ERR_NOMEM, "check backward: buffers");
        goto done;
    }
    for (int i = 0; i < nexp; i++) {
        int e = experts[i];
        g.d_w13[e] = moe_malloc((size_t)2 * I * H * sizeof(double), "ref d_w13", err);
        g.d_w2[e] = moe_malloc((size_t)H * I * sizeof(double), "ref d_w2", err);
        if (!g.d_w13[e] || !g.d_w2[e]) { ret = MOE_ERR_NOMEM; goto done; }
    }
    if (llama && Is > 0) {
        g.d_shared_gate = moe_malloc((size_t)Is * H * sizeof(double), "ref d_shared", err);
        g.d_shared_up = moe_malloc((size_t)Is * H * sizeof(double), "ref d_shared", err);
        g.d_shared_down = moe_malloc((size_t)H * Is * sizeof(double), "ref d_shared", err);
        if (!g.d_shared_gate || !g.d_shared_up || !g.d_shared_down) { ret = MOE_ERR_NOMEM; goto done; }
    }
    g.forced_ids = st->topk_ids;
    MOE_TRY_GOTO(ref_backward(w, dt, T, xd, doutd, &g, err), ret, done);

    size_t maxn = (size_t)MOE_MAX((size_t)2 * I * H, (size_t)T * H);
    maxn = MOE_MAX(maxn, (size_t)E * H);
    got = moe_malloc(maxn * sizeof(double), "check grads", err);
    if (!got) { ret = MOE_ERR_NOMEM; goto done; }

    /* dx over sampled tokens */
    {
        double *refr = moe_malloc((size_t)ntok * H * sizeof(double), "check dx", err);
        if (!refr) { ret = MOE_ERR_NOMEM; goto done; }
        for (int i = 0; i < ntok; i++)
            for (int h = 0; h < H; h++) {
                got[(size_t)i * H + h] = moe_load_elem(dt, dx, (size_t)tok[i] * H + h);
                refr[(size_t)i * H + h] = g.dx[(size_t)tok[i] * H + h];
            }
        describe(what, sizeof what, ntok, T, "tokens", H);
        moe_check_compare(rep, "grad hidden_states", what, got, refr, ntok, H, tol);
        free(refr);
    }
    /* router weight gradient: rows are experts */
    for (size_t i = 0; i < (size_t)E * H; i++) got[i] = moe_load_elem(dt, grads->router.data, i);
    snprintf(what, sizeof what, "%d experts x %d", E, H);
    /* The router gradient is a difference of nearly equal terms (the softmax / renormalisation
     * Jacobian), so in bf16/fp16 it carries ~2x the relative rounding error of the other
     * gradients on both sides (HF's rounding points in the reference, bf16/fp16 activations in
     * the fused path): its tolerance is 2.5x the dtype's (test_cpu_fused_ref measures the same). */
    double rtol = dt == MOE_DTYPE_F32 ? tol : 2.5 * tol;
    moe_check_compare(rep, "grad router", what, got, g.d_router, E, H, rtol);
    if (rtol != tol)
        snprintf(rep->rows[rep->count - 1].note, sizeof rep->rows[0].note,
                 "tolerance 2.5x: softmax Jacobian cancellation");

    /* expert gradients: one "row" per expert, so the tolerance applies per expert, and an
     * expert with no tokens must be exactly zero */
    {
        const double **refs = malloc(sizeof(double *) * (size_t)(nexp ? nexp : 1));
        if (!refs) { ret = moe_fail(err, MOE_ERR_NOMEM, "check dW"); goto done; }
        for (int i = 0; i < nexp; i++) refs[i] = g.d_w13[experts[i]];
        slab_rows s13 = {dt, grads->w13.data, (size_t)2 * I * H, experts, refs};
        describe(what, sizeof what, nexp, El, "experts", 2 * I * H);
        compare_rows(rep, "grad gate_up (per expert)", what, (size_t)nexp, tol, slab_row_sums, &s13);
        for (int i = 0; i < nexp; i++) refs[i] = g.d_w2[experts[i]];
        slab_rows s2 = {dt, grads->w2.data, (size_t)H * I, experts, refs};
        describe(what, sizeof what, nexp, El, "experts", H * I);
        compare_rows(rep, "grad down (per expert)", what, (size_t)nexp, tol, slab_row_sums, &s2);
        free(refs);
    }
    if (llama && Is > 0) {
        const struct { const char *name; const moe_tensor *t; const double *ref; int rows, cols; } sh[3] = {
            {"grad shared gate", &grads->shared_gate, g.d_shared_gate, Is, H},
            {"grad shared up", &grads->shared_up, g.d_shared_up, Is, H},
            {"grad shared down", &grads->shared_down, g.d_shared_down, H, Is},
        };
        for (int s = 0; s < 3; s++) {
            size_t n = (size_t)sh[s].rows * sh[s].cols;
            const double *ref1[1] = {sh[s].ref};
            slab_rows one = {dt, sh[s].t->data, n, NULL, ref1};
            snprintf(what, sizeof what, "%d x %d", sh[s].rows, sh[s].cols);
            /* one "row" for the whole matrix: a shared weight gradient sums over every token */
            compare_rows(rep, sh[s].name, what, 1, tol, slab_row_sums, &one);
        }
    }

done:
    free(xd); free(doutd); free(got); free(experts); free(tok);
    free(g.dx); free(g.d_router);
    if (g.d_w13)
        for (int e = 0; e < El; e++) { free(g.d_w13[e]); free(g.d_w2[e]); }
    free(g.d_w13); free(g.d_w2);
    free(g.d_shared_gate); free(g.d_shared_up); free(g.d_shared_down);
    return ret;
}
