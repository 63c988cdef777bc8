/*
 * test_api.c — the public C API v1 (src/moe_ep.h) on the CPU backend.
 *
 * Argument checking: every public function is called once per invalid argument (NULL pointers,
 * wrong magic, a size smaller than the struct, out-of-range enum and integer values, views of
 * the wrong shape or dtype, T out of range, max_tokens exceeded, a stream on the CPU, a handle
 * that is not one: a zeroed fake struct, never freed memory), asserting the exact status and
 * the exact moe_last_error() text; [out] arguments are untouched on failure; moe_last_error()
 * is "" after every successful call and thread-local (pthreads); moe_strerror, moe_version,
 * moe_dtype_name/size.
 *
 * Round trips, tiny-qwen3 and tiny-llama4 in fp32:
 *  (a) MOE_WEIGHTS_RANDOM forward + backward against the independent HF-order reference
 *      (src/cpu/reference.h, double, rounding to fp32 where HF rounds; routed like the layer)
 *      on the same weights (moe_weights_random with the same seed): fp32 rel err 1e-5,
 *      gradients 1e-4, the worst row (a token; an expert for w13/w2) within 10x;
 *  (b) MOE_WEIGHTS_TENSORS copied from caller tensors in every layout (CANONICAL, QWEN3_HUB,
 *      QWEN3_FUSED, LLAMA4 — built here from the canonical weights by moe_ep.h's definitions):
 *      bitwise the outputs of (a), gradients in the source layout (LLAMA4 transposed);
 *  (c) borrowed tensors (canonical, Qwen3 fused) read in place; a copied layer sees a change
 *      only after moe_layer_reload_weights (weight_uploads 1 -> 2); borrowing refused where
 *      the kernels cannot read the layout;
 *  (d) MOE_WEIGHTS_FILE: a file, a checkpoint directory, a sharded directory with
 *      model.safetensors.index.json (written with moe_st_*) all bitwise (a); an empty
 *      directory is MOE_ERR_IO;
 *  (e) the host API and the backend-pointer API give bitwise equal results;
 *  (f) save_for_backward = 1 gives bitwise the gradients of 0 (also for another x / T);
 *  (g) d_router_logits: d_router += dlog^T x and dx += dlog @ router (the reference has no
 *      logits gradient; the identity is the derivative of sum(logits * dlog) with logits =
 *      x router^T), and nothing else changes;
 *  (h) T growing 1 .. max_tokens uploads the weights once and the workspace stops growing;
 *  (i) a shared workspace for two layers of different sizes;
 *  (j) T = 0 everywhere (gradients exactly zero);
 *  (k) moe_layer_check_errors after NaN / Inf input rows;
 *  (l) statistics and timing;
 *  plus the EP communicator on one process (MPI singleton).
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mpi.h>
#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "test_util.h"
#include "config.h"
#include "cpu/reference.h"
#include "rng.h"
#include "safetensors.h"
#include "weights.h"

/* ------------------------------------------------------------------ expectations ---- */

/* printf into one of a few rotating buffers (expected messages). */
static const char *F(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static const char *F(const char *fmt, ...)
{
    static char bufs[8][2048];
    static int next;
    char *b = bufs[next++ & 7];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof bufs[0], fmt, ap);
    va_end(ap);
    return b;
}

static void expect_(moe_status got, moe_status want, const char *msg, const char *call, int line)
{
    const char *le = moe_last_error();
    if (le == NULL) fail_msg("line %d: %s: moe_last_error() is NULL", line, call);
    if (got == want && strcmp(le, msg) == 0) return;
    fail_msg("line %d: %s\n  status  %d (%s), expected %d (%s)\n  message \"%s\"\n  expected"
             " \"%s\"", line, call, (int)got, moe_strerror(got), (int)want, moe_strerror(want), le,
             msg);
}
/* The call returns `status` with exactly `msg` as moe_last_error(). */
#define EXPECT(call, status, msg) expect_((call), (status), (msg), #call, __LINE__)
/* MOE_OK, and moe_last_error() is "". */
#define OK(call) expect_((call), MOE_OK, "", #call, __LINE__)

/* ------------------------------------------------------------------ data ---- */

static float *fbuf(size_t n)
{
    float *p = malloc((n ? n : 1) * sizeof(float));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = NAN; /* poison: an element nobody wrote fails */
    return p;
}

static float *fdup(const float *src, size_t n)
{
    float *p = fbuf(n);
    memcpy(p, src, n * sizeof(float));
    return p;
}

static float *normals(const char *name, size_t n, double scale)
{
    float *p = fbuf(n);
    uint64_t st = moe_rng_stream(moe_test_seed(), name);
    for (size_t i = 0; i < n; i++) p[i] = (float)(scale * moe_rng_normal(st, i));
    return p;
}

/* [n, r, c] -> [n, c, r] */
static float *transpose3(const float *src, int n, int r, int c)
{
    float *d = fbuf((size_t)n * r * c);
    for (int b = 0; b < n; b++)
        for (int i = 0; i < r; i++)
            for (int j = 0; j < c; j++)
                d[((size_t)b * c + j) * r + i] = src[((size_t)b * r + i) * c + j];
    return d;
}

static void same_bits(const char *what, const float *a, const float *b, size_t n)
{
    if (n == 0 || memcmp(a, b, n * sizeof(float)) == 0) return;
    size_t i = 0;
    while (i < n && memcmp(&a[i], &b[i], sizeof(float)) == 0) i++;
    fail_msg("%s: not bitwise equal: element %zu of %zu is %.9g, expected %.9g", what, i, n,
             (double)a[i], (double)b[i]);
}

static bool differs(const float *a, const float *b, size_t n)
{
    return memcmp(a, b, n * sizeof(float)) != 0;
}

static moe_tensor_view view2(const void *data, int64_t r, int64_t c)
{
    moe_tensor_view v = {MOE_DTYPE_F32, 2, {r, c, 0, 0}, (void *)data};
    return v;
}

/* ------------------------------------------------------------------ models ---- */

/* moe_layer_grads' fields in order (their names: moe_test_grad_names) */
enum { G_ROUTER, G_W13, G_W2, G_SG, G_SU, G_SD, G_N };

typedef struct model {
    const char *name;
    moe_config cfg;
    int H, I, E, k, Is;
    bool llama;
    uint64_t seed;
    moe_weights w; /* canonical fp32, every expert: what MOE_WEIGHTS_RANDOM(seed) gives */
} model;

static void model_init(model *m, const char *name)
{
    memset(m, 0, sizeof *m);
    moe_error err = {0};
    m->name = name;
    if (moe_config_preset(name, &m->cfg, &err) != MOE_OK) fail_msg("%s", err.msg);
    m->H = m->cfg.hidden;
    m->I = m->cfg.inter;
    m->E = m->cfg.num_experts;
    m->k = m->cfg.top_k;
    m->Is = m->cfg.shared_inter;
    m->llama = m->cfg.arch == MOE_ARCH_LLAMA4;
    m->seed = moe_test_seed() ^ (m->llama ? 0x11a3a4u : 0x9e3u);
    if (moe_weights_random(&m->cfg, m->seed, 0, m->E, MOE_DTYPE_F32, &m->w, &err) != MOE_OK)
        fail_msg("%s", err.msg);
}

static void model_free(model *m) { moe_weights_free(&m->w); }

static size_t gsize(const model *m, int g)
{
    const size_t H = (size_t)m->H, I = (size_t)m->I, E = (size_t)m->E, Is = (size_t)m->Is;
    switch (g) {
    case G_ROUTER: return E * H;
    case G_W13: return E * 2 * I * H;
    case G_W2: return E * H * I;
    case G_SG: case G_SU: case G_SD: return Is * H;
    }
    return 0;
}

static const float *wdata(const model *m, int g)
{
    const moe_tensor *t[G_N] = {&m->w.router, &m->w.w13, &m->w.w2, &m->w.shared_gate,
                                &m->w.shared_up, &m->w.shared_down};
    return t[g]->data;
}

static moe_layer_options cpu_opts(void)
{
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    o.backend = MOE_BACKEND_CPU;
    o.dtype = MOE_DTYPE_F32;
    o.threads = 2;
    return o;
}

static moe_weights_source random_src(const model *m)
{
    moe_weights_source s = MOE_WEIGHTS_SOURCE_INIT;
    s.kind = MOE_WEIGHTS_RANDOM;
    s.seed = m->seed;
    return s;
}

static moe_layer *create(const char *config, const moe_weights_source *src,
                         const moe_layer_options *o)
{
    moe_layer *L = NULL;
    moe_status st = moe_layer_create(config, src, o, &L);
    if (st != MOE_OK)
        fail_msg("moe_layer_create(%s): %s: %s", config, moe_strerror(st), moe_last_error());
    assert_string_equal(moe_last_error(), "");
    assert_non_null(L);
    return L;
}

static moe_layer *random_layer(const model *m, const moe_layer_options *o)
{
    moe_weights_source s = random_src(m);
    moe_layer_options d = cpu_opts();
    return create(m->name, &s, o ? o : &d);
}

static moe_layer_info info_of(const moe_layer *L)
{
    moe_layer_info i = MOE_LAYER_INFO_INIT;
    OK(moe_layer_info_get(L, &i));
    return i;
}

/* ------------------------------------------------------------------ runs ---- */

/* What one forward + backward wrote (host, fp32). Gradients in the layer's source layout. */
typedef struct result {
    int T;
    float *out, *logits, *dx;
    float *g[G_N];
} result;

static void result_alloc(result *r, const model *m, int T)
{
    memset(r, 0, sizeof *r);
    r->T = T;
    r->out = fbuf((size_t)T * m->H);
    r->logits = fbuf((size_t)T * m->E);
    r->dx = fbuf((size_t)T * m->H);
    for (int g = 0; g < G_N; g++)
        if (g < G_SG || m->Is > 0) r->g[g] = fbuf(gsize(m, g));
}

static void result_free(result *r)
{
    free(r->out);
    free(r->logits);
    free(r->dx);
    for (int g = 0; g < G_N; g++) free(r->g[g]);
    memset(r, 0, sizeof *r);
}

static moe_layer_grads grads_of(const result *r)
{
    moe_layer_grads g = {r->g[G_ROUTER], r->g[G_W13], r->g[G_W2], r->g[G_SG], r->g[G_SU],
                         r->g[G_SD]};
    return g;
}

static void forward(moe_layer *L, const model *m, int T, const float *x, bool async, result *r)
{
    if (async) {
        OK(moe_layer_forward_async(L, T, x, r->out, r->logits, NULL));
        return;
    }
    moe_tensor_view h = view2(x, T, m->H), o = view2(r->out, T, m->H), l = view2(r->logits, T, m->E);
    OK(moe_layer_forward(L, &h, &o, &l));
}

static void backward(moe_layer *L, const model *m, int T, const float *x, const float *dout,
                     const float *dlog, bool async, result *r)
{
    moe_layer_grads g = grads_of(r);
    if (async) {
        OK(moe_layer_backward_async(L, T, x, dout, dlog, r->dx, &g, NULL));
        return;
    }
    moe_tensor_view h = view2(x, T, m->H), d = view2(dout, T, m->H), dl = view2(dlog, T, m->E);
    moe_tensor_view dx = view2(r->dx, T, m->H);
    OK(moe_layer_backward(L, &h, &d, dlog ? &dl : NULL, &dx, &g));
}

/* Forward then backward of the same x into a fresh result. */
static void run(moe_layer *L, const model *m, int T, const float *x, const float *dout,
                const float *dlog, bool async, result *r)
{
    result_alloc(r, m, T);
    forward(L, m, T, x, async, r);
    backward(L, m, T, x, dout, dlog, async, r);
}

/* The gradients of r in the canonical layout (LLAMA4: transposed back), newly allocated. */
static void canonical_grads(const model *m, const result *r, bool llama4_layout, float **g)
{
    for (int i = 0; i < G_N; i++) g[i] = r->g[i] ? fdup(r->g[i], gsize(m, i)) : NULL;
    if (!llama4_layout) return;
    free(g[G_W13]);
    free(g[G_W2]);
    g[G_W13] = transpose3(r->g[G_W13], m->E, m->H, 2 * m->I); /* [E,H,2I] -> [E,2I,H] */
    g[G_W2] = transpose3(r->g[G_W2], m->E, m->I, m->H);       /* [E,I,H] -> [E,H,I] */
}

/* got (gradients in its source layout) bitwise equal to ref (canonical). */
static void same_result(const char *what, const model *m, const result *got, bool llama4_layout,
                        const result *ref, bool with_grads)
{
    char w[160];
    snprintf(w, sizeof w, "%s %s: out", m->name, what);
    same_bits(w, got->out, ref->out, (size_t)ref->T * m->H);
    snprintf(w, sizeof w, "%s %s: router logits", m->name, what);
    same_bits(w, got->logits, ref->logits, (size_t)ref->T * m->E);
    if (!with_grads) return;
    snprintf(w, sizeof w, "%s %s: dx", m->name, what);
    same_bits(w, got->dx, ref->dx, (size_t)ref->T * m->H);
    float *g[G_N];
    canonical_grads(m, got, llama4_layout, g);
    for (int i = 0; i < G_N; i++) {
        if (!ref->g[i]) continue;
        snprintf(w, sizeof w, "%s %s: %s", m->name, what, moe_test_grad_names[i]);
        same_bits(w, g[i], ref->g[i], gsize(m, i));
    }
    for (int i = 0; i < G_N; i++) free(g[i]);
}

/* ------------------------------------------------------------------ the reference ---- */

static double *to_d(const float *p, size_t n)
{
    double *d = malloc((n ? n : 1) * sizeof(double));
    assert_non_null(d);
    for (size_t i = 0; i < n; i++) d[i] = p[i];
    return d;
}

static double *dzeros(size_t n)
{
    double *d = calloc(n ? n : 1, sizeof(double));
    assert_non_null(d);
    return d;
}

/* The layer's routing from its logits: the k largest, the lower id first on a tie. */
static void topk_of(const float *logits, int E, int k, int32_t *ids)
{
    bool used[256] = {false};
    assert_true(E <= 256);
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!used[e] && (best < 0 || logits[e] > logits[best])) best = e;
        used[best] = true;
        ids[j] = best;
    }
}

/* r (canonical gradients) against the reference on m's weights for the loss
 * sum(out * dout) + sum(logits * dlog) (dlog may be NULL). */
static void check_reference(const model *m, int T, const float *x, const float *dout,
                            const float *dlog, const result *r)
{
    const int H = m->H, I = m->I, E = m->E, k = m->k, Is = m->Is;
    moe_error err = {0};
    int32_t *ids = malloc((size_t)T * k * sizeof(int32_t) + 4);
    assert_non_null(ids);
    for (int t = 0; t < T; t++) topk_of(r->logits + (size_t)t * E, E, k, ids + (size_t)t * k);
    double *xd = to_d(x, (size_t)T * H), *doutd = to_d(dout, (size_t)T * H);
    moe_ref_fwd rf = {.logits = dzeros((size_t)T * E), .topk_ids = malloc((size_t)T * k * 4 + 4),
                      .topk_w = dzeros((size_t)T * k), .out = dzeros((size_t)T * H),
                      .forced_ids = ids};
    if (ref_forward(&m->w, MOE_DTYPE_F32, T, xd, &rf, &err) != MOE_OK) fail_msg("%s", err.msg);
    /* the reference's own routing agrees wherever the k-th and (k+1)-th logits are apart */
    moe_ref_fwd ru = {.logits = dzeros((size_t)T * E), .topk_ids = malloc((size_t)T * k * 4 + 4),
                      .topk_w = dzeros((size_t)T * k), .out = dzeros((size_t)T * H)};
    if (ref_forward(&m->w, MOE_DTYPE_F32, T, xd, &ru, &err) != MOE_OK) fail_msg("%s", err.msg);
    int compared = 0;
    for (int t = 0; t < T && k < E; t++) {
        float row[256];
        int32_t top[257];
        for (int e = 0; e < E; e++) row[e] = (float)ru.logits[(size_t)t * E + e];
        topk_of(row, E, k + 1, top);
        double a = row[top[k - 1]], b = row[top[k]];
        if (a - b <= 1e-5 * fabs(a)) continue;
        compared++;
        for (int j = 0; j < k; j++) {
            bool found = false;
            for (int i = 0; i < k; i++) found |= ids[t * k + i] == ru.topk_ids[t * k + j];
            if (!found) fail_msg("%s token %d: expert %d chosen by the reference only", m->name, t,
                                 ru.topk_ids[t * k + j]);
        }
    }
    assert_true(k == E || compared * 2 >= T);
    char what[160];
    const double tol = moe_test_tol(MOE_DTYPE_F32, false), gtol = moe_test_tol(MOE_DTYPE_F32, true);
    double *v = to_d(r->logits, (size_t)T * E);
    snprintf(what, sizeof what, "%s logits", m->name);
    moe_test_assert_close(what, v, rf.logits, (size_t)T, (size_t)E, tol);
    free(v);
    v = to_d(r->out, (size_t)T * H);
    snprintf(what, sizeof what, "%s out", m->name);
    moe_test_assert_close(what, v, rf.out, (size_t)T, (size_t)H, tol);
    free(v);

    double **d13 = calloc((size_t)E, sizeof(double *)), **d2 = calloc((size_t)E, sizeof(double *));
    double *all13 = dzeros((size_t)E * 2 * I * H), *all2 = dzeros((size_t)E * H * I);
    assert_non_null(d13);
    assert_non_null(d2);
    for (int e = 0; e < E; e++) {
        d13[e] = all13 + (size_t)e * 2 * I * H;
        d2[e] = all2 + (size_t)e * H * I;
    }
    moe_ref_grads rg = {
        .dx = dzeros((size_t)T * H), .d_router = dzeros((size_t)E * H), .d_w13 = d13, .d_w2 = d2,
        .d_shared_gate = Is ? dzeros((size_t)Is * H) : NULL,
        .d_shared_up = Is ? dzeros((size_t)Is * H) : NULL,
        .d_shared_down = Is ? dzeros((size_t)H * Is) : NULL, .forced_ids = ids,
    };
    if (ref_backward(&m->w, MOE_DTYPE_F32, T, xd, doutd, &rg, &err) != MOE_OK)
        fail_msg("%s", err.msg);
    if (dlog) {
        /* logits = x router^T: d/d router of sum(logits * dlog) = dlog^T x, d/dx = dlog router */
        const float *router = m->w.router.data;
        for (int t = 0; t < T; t++)
            for (int e = 0; e < E; e++) {
                const double g = dlog[(size_t)t * E + e];
                for (int h = 0; h < H; h++) {
                    rg.d_router[(size_t)e * H + h] += g * x[(size_t)t * H + h];
                    rg.dx[(size_t)t * H + h] += g * router[(size_t)e * H + h];
                }
            }
    }
    struct {
        int g;
        const double *ref;
        size_t rows;
    } cmp[] = {
        {G_ROUTER, rg.d_router, (size_t)E}, {G_W13, all13, (size_t)E}, {G_W2, all2, (size_t)E},
        {G_SG, rg.d_shared_gate, (size_t)Is}, {G_SU, rg.d_shared_up, (size_t)Is},
        {G_SD, rg.d_shared_down, (size_t)H},
    };
    v = to_d(r->dx, (size_t)T * H);
    snprintf(what, sizeof what, "%s dx%s", m->name, dlog ? " (+ d logits)" : "");
    moe_test_assert_close(what, v, rg.dx, (size_t)T, (size_t)H, gtol);
    free(v);
    for (size_t i = 0; i < sizeof cmp / sizeof cmp[0]; i++) {
        if (!cmp[i].ref) continue;
        const size_t n = gsize(m, cmp[i].g);
        v = to_d(r->g[cmp[i].g], n);
        snprintf(what, sizeof what, "%s %s%s", m->name, moe_test_grad_names[cmp[i].g],
                 dlog ? " (+ d logits)" : "");
        moe_test_assert_close(what, v, cmp[i].ref, cmp[i].rows, n / cmp[i].rows, gtol);
        free(v);
    }
    free(d13); free(d2); free(all13); free(all2);
    free(rg.dx); free(rg.d_router); free(rg.d_shared_gate); free(rg.d_shared_up);
    free(rg.d_shared_down);
    free(rf.logits); free(rf.topk_ids); free(rf.topk_w); free(rf.out);
    free(ru.logits); free(ru.topk_ids); free(ru.topk_w); free(ru.out);
    free(xd); free(doutd); free(ids);
}

/* ------------------------------------------------------------------ caller tensors ---- */

#define TS_MAX 96
typedef struct tset {
    int n;
    moe_named_tensor t[TS_MAX];
    char names[TS_MAX][64];
    float *buf[TS_MAX]; /* owned */
} tset;

static void ts_add(tset *s, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2,
                   float *data)
{
    assert_true(s->n < TS_MAX);
    int i = s->n++;
    snprintf(s->names[i], sizeof s->names[i], "%s", name);
    s->buf[i] = data;
    s->t[i].name = s->names[i];
    moe_tensor_view v = {MOE_DTYPE_F32, ndim, {d0, d1, d2, 0}, data};
    s->t[i].view = v;
}

static float *ts_get(tset *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->names[i], name) == 0) return s->buf[i];
    fail_msg("no tensor %s", name);
    return NULL;
}

/* m's canonical weights as caller tensors in `lay`, by moe_ep.h's definition of the layout. */
static void ts_build(tset *s, const model *m, moe_weights_layout lay)
{
    memset(s, 0, sizeof *s);
    const int H = m->H, I = m->I, E = m->E, Is = m->Is;
    const float *router = wdata(m, G_ROUTER), *w13 = wdata(m, G_W13), *w2 = wdata(m, G_W2);
    const size_t eh = (size_t)E * H;
    switch (lay) {
    case MOE_LAYOUT_CANONICAL:
        ts_add(s, "router", 2, E, H, 0, fdup(router, eh));
        ts_add(s, "w13", 3, E, 2 * I, H, fdup(w13, gsize(m, G_W13)));
        ts_add(s, "w2", 3, E, H, I, fdup(w2, gsize(m, G_W2)));
        break;
    case MOE_LAYOUT_QWEN3_HUB:
        ts_add(s, "gate.weight", 2, E, H, 0, fdup(router, eh));
        for (int e = 0; e < E; e++) {
            char n[64];
            const float *b13 = w13 + (size_t)e * 2 * I * H;
            snprintf(n, sizeof n, "experts.%d.gate_proj.weight", e);
            ts_add(s, n, 2, I, H, 0, fdup(b13, (size_t)I * H));
            snprintf(n, sizeof n, "experts.%d.up_proj.weight", e);
            ts_add(s, n, 2, I, H, 0, fdup(b13 + (size_t)I * H, (size_t)I * H));
            snprintf(n, sizeof n, "experts.%d.down_proj.weight", e);
            ts_add(s, n, 2, H, I, 0, fdup(w2 + (size_t)e * H * I, (size_t)H * I));
        }
        break;
    case MOE_LAYOUT_QWEN3_FUSED:
        ts_add(s, "gate.weight", 2, E, H, 0, fdup(router, eh));
        ts_add(s, "experts.gate_up_proj", 3, E, 2 * I, H, fdup(w13, gsize(m, G_W13)));
        ts_add(s, "experts.down_proj", 3, E, H, I, fdup(w2, gsize(m, G_W2)));
        break;
    case MOE_LAYOUT_LLAMA4:
        ts_add(s, "router.weight", 2, E, H, 0, fdup(router, eh));
        /* gate_up_proj [E,H,2I] (x @ it: gate columns then up), down_proj [E,I,H] */
        ts_add(s, "experts.gate_up_proj", 3, E, H, 2 * I, transpose3(w13, E, 2 * I, H));
        ts_add(s, "experts.down_proj", 3, E, I, H, transpose3(w2, E, H, I));
        break;
    }
    if (Is > 0) {
        const bool canon = lay == MOE_LAYOUT_CANONICAL;
        ts_add(s, canon ? "shared_gate" : "shared_expert.gate_proj.weight", 2, Is, H, 0,
               fdup(wdata(m, G_SG), (size_t)Is * H));
        ts_add(s, canon ? "shared_up" : "shared_expert.up_proj.weight", 2, Is, H, 0,
               fdup(wdata(m, G_SU), (size_t)Is * H));
        ts_add(s, canon ? "shared_down" : "shared_expert.down_proj.weight", 2, H, Is, 0,
               fdup(wdata(m, G_SD), (size_t)H * Is));
    }
}

static void ts_free(tset *s)
{
    for (int i = 0; i < s->n; i++) free(s->buf[i]);
    memset(s, 0, sizeof *s);
}

static moe_weights_source tensors_src(const tset *s, moe_weights_layout lay, int borrow)
{
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_TENSORS;
    src.layout = lay;
    src.tensors = s->t;
    src.num_tensors = s->n;
    src.borrow = borrow;
    return src;
}

/* ------------------------------------------------------------------ fixtures ---- */

typedef struct fixture {
    model m;
    int T;
    float *x, *dout, *dlog;
    result a; /* (a): RANDOM weights, host API */
} fixture;

static void fixture_init(fixture *f, const char *name, int T)
{
    memset(f, 0, sizeof *f);
    model_init(&f->m, name);
    f->T = T;
    char n[64];
    snprintf(n, sizeof n, "%s x", name);
    f->x = normals(n, (size_t)T * f->m.H, 1.0);
    snprintf(n, sizeof n, "%s dout", name);
    f->dout = normals(n, (size_t)T * f->m.H, 1.0);
    snprintf(n, sizeof n, "%s dlog", name);
    f->dlog = normals(n, (size_t)T * f->m.E, 1.0);
    moe_layer *L = random_layer(&f->m, NULL);
    run(L, &f->m, T, f->x, f->dout, NULL, false, &f->a);
    OK(moe_layer_destroy(L));
}

static void fixture_free(fixture *f)
{
    result_free(&f->a);
    free(f->x);
    free(f->dout);
    free(f->dlog);
    model_free(&f->m);
}

static const char *const model_names[2] = {"tiny-qwen3", "tiny-llama4"};

/* A zeroed struct standing for a handle that is not one (or was destroyed): only its first
 * word (the magic) is read. */
static uint64_t fake_handle[512];

/* ================================================================== status and version ==== */

static void test_status_version_dtypes(void **state)
{
    (void)state;
    static const char *const names[MOE_NUM_STATUS] = {
        "success", "invalid argument", "I/O error", "malformed input", "unsupported",
        "out of memory", "CUDA error", "NCCL error", "MPI error", "no GPU available",
        "correctness check failed", "timed out", "internal error", "non-finite values",
        "capacity exceeded"};
    for (int s = 0; s < MOE_NUM_STATUS; s++) assert_string_equal(moe_strerror((moe_status)s), names[s]);
    assert_string_equal(moe_strerror(MOE_NUM_STATUS), "unknown status");
    assert_string_equal(moe_strerror((moe_status)-1), "unknown status");
    assert_string_equal(moe_strerror((moe_status)1000), "unknown status");

    assert_int_equal(moe_version(), MOE_EP_VERSION_CODE);
    assert_int_equal(MOE_EP_VERSION_CODE, MOE_EP_VERSION_MAJOR * 10000 +
                                              MOE_EP_VERSION_MINOR * 100 + MOE_EP_VERSION_PATCH);
    assert_string_equal(moe_version_string(), MOE_EP_VERSION_STRING);
    char v[64];
    snprintf(v, sizeof v, "%d.%d.%d", MOE_EP_VERSION_MAJOR, MOE_EP_VERSION_MINOR,
             MOE_EP_VERSION_PATCH);
    assert_string_equal(moe_version_string(), v);

    static const char *const dn[MOE_NUM_DTYPES] = {"bf16", "fp16", "fp32", "fp64", "fp8_e4m3",
                                                   "int32", "int64"};
    static const size_t ds[MOE_NUM_DTYPES] = {2, 2, 4, 8, 1, 4, 8};
    for (int d = 0; d < MOE_NUM_DTYPES; d++) {
        assert_string_equal(moe_dtype_name((moe_dtype)d), dn[d]);
        assert_int_equal(moe_dtype_size((moe_dtype)d), ds[d]);
    }
    assert_null(moe_dtype_name(MOE_NUM_DTYPES));
    assert_null(moe_dtype_name((moe_dtype)-1));
    assert_int_equal(moe_dtype_size(MOE_NUM_DTYPES), 0);
    assert_int_equal(moe_dtype_size((moe_dtype)-1), 0);

    assert_true(moe_default_threads() >= 1);
    assert_int_equal(moe_default_threads(), moe_default_threads());
    /* a fresh thread's (and this one's, before any call) last error is "" and never NULL */
    assert_non_null(moe_last_error());
}

/* ================================================================== thread-local errors ==== */

typedef struct thr {
    pthread_barrier_t *bar;
    char at_start[256], after_fail[256], after_main_ok[256];
    moe_status st;
} thr;

static void *thread_body(void *p)
{
    thr *t = p;
    snprintf(t->at_start, sizeof t->at_start, "%s", moe_last_error());
    pthread_barrier_wait(t->bar); /* 1: the main thread failed a call before */
    moe_layer_info info = MOE_LAYER_INFO_INIT;
    t->st = moe_layer_info_get(NULL, &info);
    snprintf(t->after_fail, sizeof t->after_fail, "%s", moe_last_error());
    pthread_barrier_wait(t->bar); /* 2: the main thread checks its own */
    pthread_barrier_wait(t->bar); /* 3: the main thread succeeded a call */
    snprintf(t->after_main_ok, sizeof t->after_main_ok, "%s", moe_last_error());
    return NULL;
}

static void test_last_error_thread_local(void **state)
{
    (void)state;
    size_t b = 0;
    EXPECT(moe_workspace_bytes(NULL, &b), MOE_ERR_INVALID_ARG, "moe_workspace_bytes: not a workspace");
    pthread_barrier_t bar;
    assert_int_equal(pthread_barrier_init(&bar, NULL, 2), 0);
    thr t;
    memset(&t, 0, sizeof t);
    t.bar = &bar;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, thread_body, &t), 0);
    pthread_barrier_wait(&bar); /* 1 */
    pthread_barrier_wait(&bar); /* 2: the other thread failed */
    assert_string_equal(moe_last_error(), "moe_workspace_bytes: not a workspace");
    moe_workspace *ws = NULL;
    OK(moe_workspace_create(MOE_BACKEND_CPU, -1, &ws));
    OK(moe_workspace_destroy(ws));
    pthread_barrier_wait(&bar); /* 3 */
    assert_int_equal(pthread_join(th, NULL), 0);
    pthread_barrier_destroy(&bar);
    assert_string_equal(t.at_start, "");
    assert_int_equal(t.st, MOE_ERR_INVALID_ARG);
    assert_string_equal(t.after_fail, "moe_layer_info_get: layer is NULL, destroyed or not a layer");
    assert_string_equal(t.after_main_ok, t.after_fail);
    assert_string_equal(moe_last_error(), "");
}

/* ================================================================== workspace ==== */

static void test_workspace_args(void **state)
{
    (void)state;
    moe_workspace *ws = (moe_workspace *)fake_handle, *keep = ws;
    EXPECT(moe_workspace_create(MOE_BACKEND_CPU, -1, NULL), MOE_ERR_INVALID_ARG,
           "moe_workspace_create: ws (the output) is NULL");
    EXPECT(moe_workspace_create((moe_backend)3, -1, &ws), MOE_ERR_INVALID_ARG,
           "moe_workspace_create: backend 3: expected MOE_BACKEND_CPU, _CUDA or _AUTO");
    EXPECT(moe_workspace_create((moe_backend)-1, -1, &ws), MOE_ERR_INVALID_ARG,
           "moe_workspace_create: backend -1: expected MOE_BACKEND_CPU, _CUDA or _AUTO");
#ifdef MOE_HAVE_CUDA
    {
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0)
            EXPECT(moe_workspace_create(MOE_BACKEND_CUDA, -1, &ws), MOE_ERR_NO_DEVICE,
                   "moe_workspace_create: the CUDA backend was requested but no GPU is usable; "
                   "use the CPU backend");
    }
#else
    EXPECT(moe_workspace_create(MOE_BACKEND_CUDA, 0, &ws), MOE_ERR_NO_DEVICE,
           "moe_workspace_create: the CUDA backend was requested but this build has none "
           "(configure with the CUDA toolkit); use the CPU backend");
#endif
    assert_ptr_equal(ws, keep); /* [out] untouched on failure */

    size_t bytes = 12345;
    EXPECT(moe_workspace_bytes(NULL, &bytes), MOE_ERR_INVALID_ARG, "moe_workspace_bytes: not a workspace");
    EXPECT(moe_workspace_bytes((moe_workspace *)fake_handle, &bytes), MOE_ERR_INVALID_ARG,
           "moe_workspace_bytes: not a workspace");
    assert_int_equal(bytes, 12345);
    EXPECT(moe_workspace_destroy((moe_workspace *)fake_handle), MOE_ERR_INVALID_ARG,
           "moe_workspace_destroy: not a workspace (or destroyed twice)");
    OK(moe_workspace_destroy(NULL));

    OK(moe_workspace_create(MOE_BACKEND_CPU, 7, &ws)); /* device ignored on the CPU */
    assert_non_null(ws);
    EXPECT(moe_workspace_bytes(ws, NULL), MOE_ERR_INVALID_ARG, "moe_workspace_bytes: bytes is NULL");
    OK(moe_workspace_bytes(ws, &bytes));
    assert_int_equal(bytes, 0);
    OK(moe_workspace_destroy(ws));
#ifndef MOE_HAVE_CUDA
    /* AUTO resolves as for layers: the CPU without CUDA */
    ws = NULL;
    OK(moe_workspace_create(MOE_BACKEND_AUTO, -1, &ws));
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    o.backend = MOE_BACKEND_CPU;
    o.workspace = ws;
    model m;
    model_init(&m, "tiny-qwen3");
    moe_layer *L = random_layer(&m, &o);
    OK(moe_layer_destroy(L));
    OK(moe_workspace_destroy(ws));
    model_free(&m);
#endif
}

/* ================================================================== layer creation ==== */

static void test_create_args(void **state)
{
    (void)state;
    model m;
    model_init(&m, "tiny-qwen3");
    const int H = m.H, I = m.I, E = m.E;
    moe_layer *keep = (moe_layer *)fake_handle, *L = keep;
    moe_weights_source src = random_src(&m);
    moe_layer_options o = cpu_opts();

#define CREATE_FAILS(cfg, s, opt, status, msg)                                                 \
    do {                                                                                       \
        EXPECT(moe_layer_create((cfg), (s), (opt), &L), (status), (msg));                      \
        assert_ptr_equal(L, keep);                                                             \
    } while (0)

    EXPECT(moe_layer_create("tiny-qwen3", &src, &o, NULL), MOE_ERR_INVALID_ARG,
           "moe_layer_create: layer (the output) is NULL");
    CREATE_FAILS(NULL, &src, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: config is NULL (a preset name or a config.json path)");
    CREATE_FAILS("no-such-model", &src, &o, MOE_ERR_INVALID_ARG,
                 "config 'no-such-model' is neither a preset (qwen3-30b-a3b, llama4-scout, "
                 "tiny-qwen3, tiny-llama4) nor an existing file");
    /* options */
    moe_layer_options b = o;
    b.size = sizeof b - 8;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 F("moe_layer_create: options not initialised with MOE_LAYER_OPTIONS_INIT "
                   "(size %u, magic 0x%08x)", (unsigned)(sizeof b - 8), MOE_LAYER_OPTIONS_MAGIC));
    b = o;
    b.magic = MOE_WEIGHTS_SOURCE_MAGIC;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 F("moe_layer_create: options not initialised with MOE_LAYER_OPTIONS_INIT "
                   "(size %u, magic 0x%08x)", (unsigned)sizeof b, MOE_WEIGHTS_SOURCE_MAGIC));
    b = o;
    b.backend = (moe_backend)3;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: backend 3: expected MOE_BACKEND_CPU, _CUDA or _AUTO");
    b = o;
    b.dtype = MOE_DTYPE_F64;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: dtype 3: expected bf16, fp16, fp32 or MOE_NUM_DTYPES (the "
                 "config's)");
    b.dtype = (moe_dtype)-1;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: dtype -1: expected bf16, fp16, fp32 or MOE_NUM_DTYPES (the "
                 "config's)");
    b = o;
    b.max_tokens = -1;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: max_tokens -1: expected 0 (none) .. 2147483647");
    b.max_tokens = (int64_t)INT_MAX + 1;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: max_tokens 2147483648: expected 0 (none) .. 2147483647");
    b.max_tokens = INT_MAX; /* in range, but times k = 3 exceeds the kernels' row indices */
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "max_tokens 2147483647: times top-k 3 exceeds the 32-bit row indices of the "
                 "kernels; at most 715827882");
    b = o;
    b.threads = -1;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: threads -1: expected 0 (default) .. 4096");
    b.threads = 4097;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: threads 4097: expected 0 (default) .. 4096");
    b = o;
    b.device = -2;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: device -2: expected -1 (automatic) or a CUDA ordinal");
    b = o;
    b.comm = (moe_ep_comm *)fake_handle;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: comm is not an EP communicator (or was destroyed)");
    b = o;
    b.workspace = (moe_workspace *)fake_handle;
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: workspace is not a workspace (or was destroyed)");
    b = o;
    b.backend = MOE_BACKEND_CUDA;
#ifdef MOE_HAVE_CUDA
    {
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0)
            CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_NO_DEVICE,
                         "the CUDA backend was requested but no GPU is usable; use the CPU "
                         "backend");
    }
#else
    CREATE_FAILS("tiny-qwen3", &src, &b, MOE_ERR_NO_DEVICE,
                 "the CUDA backend was requested but this build has none (configure with the "
                 "CUDA toolkit); use the CPU backend");
#endif
    /* a huge but representable token bound: more memory than the host has */
    b = o;
    b.max_tokens = 700000000;
    {
        moe_status st = moe_layer_create("tiny-qwen3", &src, &b, &L);
        const char *msg = moe_last_error();
        const char *head = "max_tokens 700000000: buffers for that many tokens need about ";
        const char *tail = " GiB is free on the host; lower max_tokens";
        if (st != MOE_ERR_NOMEM || strncmp(msg, head, strlen(head)) != 0 ||
            strlen(msg) < strlen(tail) || strcmp(msg + strlen(msg) - strlen(tail), tail) != 0)
            fail_msg("max_tokens 700000000: %s: %s", moe_strerror(st), msg);
        assert_ptr_equal(L, keep);
    }

    /* the weights source */
    CREATE_FAILS("tiny-qwen3", NULL, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: weights source is NULL");
    moe_weights_source s = src;
    s.size = 8;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 F("moe_layer_create: weights source not initialised with MOE_WEIGHTS_SOURCE_INIT "
                   "(size 8, magic 0x%08x)", MOE_WEIGHTS_SOURCE_MAGIC));
    s = src;
    s.magic = 0;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 F("moe_layer_create: weights source not initialised with MOE_WEIGHTS_SOURCE_INIT "
                   "(size %u, magic 0x00000000)", (unsigned)sizeof s));
    s = src;
    s.kind = (moe_weights_kind)3;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: weights kind 3: expected MOE_WEIGHTS_FILE, _RANDOM or _TENSORS");
    s = src;
    s.kind = MOE_WEIGHTS_FILE;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: MOE_WEIGHTS_FILE needs a path");
    s.path = "";
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: MOE_WEIGHTS_FILE needs a path");
    s.path = "/nonexistent/model.safetensors";
    s.layer = -2;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: layer -2: expected -1 (the block's own names) or a decoder "
                 "layer index >= 0");
    s.layer = -1;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_IO,
                 "/nonexistent/model.safetensors: cannot open: No such file or directory");
    s = src;
    s.kind = MOE_WEIGHTS_TENSORS;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: MOE_WEIGHTS_TENSORS needs tensors and num_tensors >= 1");

    /* caller tensors */
    tset t;
    ts_build(&t, &m, MOE_LAYOUT_CANONICAL);
    s = tensors_src(&t, MOE_LAYOUT_CANONICAL, 0);
    s.num_tensors = 0;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: MOE_WEIGHTS_TENSORS needs tensors and num_tensors >= 1");
    s.num_tensors = -3;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 "moe_layer_create: MOE_WEIGHTS_TENSORS needs tensors and num_tensors >= 1");
    for (int borrow = 0; borrow < 2; borrow++) {
        s = tensors_src(&t, (moe_weights_layout)4, borrow);
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     "moe_layer_create: layout 4: expected MOE_LAYOUT_CANONICAL, _QWEN3_HUB, "
                     "_QWEN3_FUSED or _LLAMA4");
        s.layout = (moe_weights_layout)-1;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     "moe_layer_create: layout -1: expected MOE_LAYOUT_CANONICAL, _QWEN3_HUB, "
                     "_QWEN3_FUSED or _LLAMA4");
        /* a layout of the other architecture */
        s.layout = MOE_LAYOUT_LLAMA4;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     "weights: layout LLAMA4 does not fit a Qwen3 model");
        s = tensors_src(&t, MOE_LAYOUT_CANONICAL, borrow);
        /* a missing tensor, named with its expected shape */
        s.num_tensors = 2;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     F("weights: no tensor named 'w2' (expected [%d, %d, %d])", E, H, I));
        s.num_tensors = t.n;
        /* wrong shape, ndim, dtype, no data */
        moe_named_tensor bad[3];
        memcpy(bad, t.t, sizeof bad);
        s.tensors = bad;
        bad[1].view.shape[1] = 2 * I + 1;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     F("weights: tensor 'w13' has shape [%d, %d, %d], expected [%d, %d, %d]", E,
                       2 * I + 1, H, E, 2 * I, H));
        bad[1] = t.t[1];
        bad[0].view.ndim = 3;
        bad[0].view.shape[2] = 1;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     F("weights: tensor 'router' has shape [%d, %d, 1], expected [%d, %d]", E, H,
                       E, H));
        bad[0].view.ndim = 7;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     F("weights: tensor 'router' has ndim 7 (a view has 1..4 dims), expected "
                       "[%d, %d]", E, H));
        bad[0] = t.t[0];
        bad[0].view.dtype = MOE_DTYPE_I32;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     "weights: tensor 'router' is int32; expected bf16, fp16 or fp32");
        bad[0].view.dtype = (moe_dtype)99;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     "weights: tensor 'router' is an unknown dtype; expected bf16, fp16 or fp32");
        bad[0] = t.t[0];
        bad[2].view.data = NULL;
        CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                     "weights: tensor 'w2' has no data");
    }
    /* borrowed tensors must be in the layer's dtype (nothing converts them) */
    s = tensors_src(&t, MOE_LAYOUT_CANONICAL, 1);
    b = o;
    b.dtype = MOE_DTYPE_BF16;
    CREATE_FAILS("tiny-qwen3", &s, &b, MOE_ERR_INVALID_ARG,
                 "weights: borrowed tensors must be in the layer's dtype bf16 (the router is fp32)");
    ts_free(&t);
    /* borrowing what the kernels cannot read in place */
    ts_build(&t, &m, MOE_LAYOUT_QWEN3_HUB);
    s = tensors_src(&t, MOE_LAYOUT_QWEN3_HUB, 1);
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_UNSUPPORTED,
                 "weights: borrowing (read in place) needs the canonical or Qwen3 fused layout, "
                 "whose expert tensors the kernels read as they are; pass borrow = 0 to copy a "
                 "per-expert layout");
    /* a per-expert tensor missing (experts are named by global id) */
    s.borrow = 0;
    moe_named_tensor *hub = malloc(sizeof(moe_named_tensor) * (size_t)t.n);
    assert_non_null(hub);
    int nh = 0;
    for (int i = 0; i < t.n; i++)
        if (strcmp(t.names[i], "experts.3.up_proj.weight") != 0) hub[nh++] = t.t[i];
    s.tensors = hub;
    s.num_tensors = nh;
    CREATE_FAILS("tiny-qwen3", &s, &o, MOE_ERR_INVALID_ARG,
                 F("weights: no tensor named 'experts.3.up_proj.weight' (expected [%d, %d])", I, H));
    free(hub);
    ts_free(&t);
    model_free(&m);

    model ml;
    model_init(&ml, "tiny-llama4");
    ts_build(&t, &ml, MOE_LAYOUT_LLAMA4);
    s = tensors_src(&t, MOE_LAYOUT_LLAMA4, 1);
    CREATE_FAILS("tiny-llama4", &s, &o, MOE_ERR_UNSUPPORTED,
                 "weights: borrowing (read in place) needs the canonical or Qwen3 fused layout, "
                 "whose expert tensors the kernels read as they are; pass borrow = 0 to copy a "
                 "Llama-4 layout");
    s.borrow = 0;
    s.layout = MOE_LAYOUT_QWEN3_FUSED;
    CREATE_FAILS("tiny-llama4", &s, &o, MOE_ERR_INVALID_ARG,
                 "weights: layout QWEN3 does not fit a Llama-4 model");
    s.layout = MOE_LAYOUT_QWEN3_HUB;
    s.borrow = 1;
    CREATE_FAILS("tiny-llama4", &s, &o, MOE_ERR_INVALID_ARG,
                 "weights: layout QWEN3 does not fit a Llama-4 model");
    s.layout = MOE_LAYOUT_LLAMA4;
    s.borrow = 0;
    s.num_tensors = t.n - 1;
    CREATE_FAILS("tiny-llama4", &s, &o, MOE_ERR_INVALID_ARG,
                 F("weights: no tensor named 'shared_expert.down_proj.weight' (expected [%d, %d])",
                   ml.H, ml.Is));
    ts_free(&t);
    ts_build(&t, &ml, MOE_LAYOUT_CANONICAL);
    s = tensors_src(&t, MOE_LAYOUT_CANONICAL, 1);
    CREATE_FAILS("tiny-llama4", &s, &o, MOE_ERR_UNSUPPORTED,
                 "weights: borrowing a model with a shared expert is not supported (its gate and "
                 "up must be one stacked matrix); pass borrow = 0");
    ts_free(&t);
    model_free(&ml);
#undef CREATE_FAILS
}

/* ================================================================== calls on a layer ==== */

static void test_layer_call_args(void **state)
{
    (void)state;
    model m;
    model_init(&m, "tiny-qwen3");
    const int H = m.H, E = m.E, T = 5;
    moe_layer_options o = cpu_opts();
    o.max_tokens = 8;
    moe_layer *L = random_layer(&m, &o);
    moe_layer *F0 = (moe_layer *)fake_handle;
    float *x = normals("args x", (size_t)9 * H, 1.0), *out = fbuf((size_t)9 * H);
    float *lg = fbuf((size_t)9 * E), *dx = fbuf((size_t)9 * H);
    float *g13 = fbuf(gsize(&m, G_W13));
    int stream_obj;
    void *stream = &stream_obj;
    const char *lnull = "layer is NULL, destroyed or not a layer";

    /* ---- info */
    moe_layer_info info = MOE_LAYER_INFO_INIT;
    EXPECT(moe_layer_info_get(NULL, &info), MOE_ERR_INVALID_ARG, F("moe_layer_info_get: %s", lnull));
    EXPECT(moe_layer_info_get(F0, &info), MOE_ERR_INVALID_ARG, F("moe_layer_info_get: %s", lnull));
    EXPECT(moe_layer_info_get(L, NULL), MOE_ERR_INVALID_ARG, "moe_layer_info_get: info is NULL");
    info.size = sizeof info - 1;
    EXPECT(moe_layer_info_get(L, &info), MOE_ERR_INVALID_ARG,
           F("moe_layer_info_get: info not initialised with MOE_LAYER_INFO_INIT (size %u, magic "
             "0x%08x)", (unsigned)sizeof info - 1, MOE_LAYER_INFO_MAGIC));
    assert_int_equal(info.hidden, 0); /* [out] untouched */
    info.size = sizeof info;
    info.magic = MOE_LAYER_STATS_MAGIC;
    EXPECT(moe_layer_info_get(L, &info), MOE_ERR_INVALID_ARG,
           F("moe_layer_info_get: info not initialised with MOE_LAYER_INFO_INIT (size %u, magic "
             "0x%08x)", (unsigned)sizeof info, MOE_LAYER_STATS_MAGIC));
    /* ---- stats */
    moe_layer_stats st = MOE_LAYER_STATS_INIT;
    EXPECT(moe_layer_stats_get(NULL, &st), MOE_ERR_INVALID_ARG, F("moe_layer_stats_get: %s", lnull));
    EXPECT(moe_layer_stats_get(F0, &st), MOE_ERR_INVALID_ARG, F("moe_layer_stats_get: %s", lnull));
    EXPECT(moe_layer_stats_get(L, NULL), MOE_ERR_INVALID_ARG, "moe_layer_stats_get: stats is NULL");
    st.size = 16;
    EXPECT(moe_layer_stats_get(L, &st), MOE_ERR_INVALID_ARG,
           F("moe_layer_stats_get: stats not initialised with MOE_LAYER_STATS_INIT (size 16, "
             "magic 0x%08x)", MOE_LAYER_STATS_MAGIC));
    st.size = sizeof st;
    st.magic = MOE_LAYER_INFO_MAGIC;
    EXPECT(moe_layer_stats_get(L, &st), MOE_ERR_INVALID_ARG,
           F("moe_layer_stats_get: stats not initialised with MOE_LAYER_STATS_INIT (size %u, "
             "magic 0x%08x)", (unsigned)sizeof st, MOE_LAYER_INFO_MAGIC));
    st.magic = MOE_LAYER_STATS_MAGIC;
    st.peers = -1;
    EXPECT(moe_layer_stats_get(L, &st), MOE_ERR_INVALID_ARG,
           "moe_layer_stats_get: peers = -1: expected 0 (no per-peer totals) or at least the "
           "layer's 1 rank(s)");
    st.peers = 0;
    EXPECT(moe_layer_stats_reset(NULL), MOE_ERR_INVALID_ARG, F("moe_layer_stats_reset: %s", lnull));
    EXPECT(moe_layer_stats_reset(F0), MOE_ERR_INVALID_ARG, F("moe_layer_stats_reset: %s", lnull));
    EXPECT(moe_layer_set_timing(NULL, 1), MOE_ERR_INVALID_ARG, F("moe_layer_set_timing: %s", lnull));
    EXPECT(moe_layer_set_timing(F0, 0), MOE_ERR_INVALID_ARG, F("moe_layer_set_timing: %s", lnull));
    EXPECT(moe_layer_check_errors(NULL), MOE_ERR_INVALID_ARG, F("moe_layer_check_errors: %s", lnull));
    EXPECT(moe_layer_check_errors(F0), MOE_ERR_INVALID_ARG, F("moe_layer_check_errors: %s", lnull));
    EXPECT(moe_layer_reload_weights(NULL), MOE_ERR_INVALID_ARG, F("moe_layer_reload_weights: %s", lnull));
    EXPECT(moe_layer_reload_weights(F0), MOE_ERR_INVALID_ARG, F("moe_layer_reload_weights: %s", lnull));
    EXPECT(moe_layer_reload_weights(L), MOE_ERR_INVALID_ARG,
           "moe_layer_reload_weights: the layer's weights were not copied from caller tensors "
           "(MOE_WEIGHTS_TENSORS with borrow = 0)");
    EXPECT(moe_layer_destroy(F0), MOE_ERR_INVALID_ARG, F("moe_layer_destroy: %s", lnull));
    OK(moe_layer_destroy(NULL));

    /* ---- forward on backend memory */
    const char *fa = "moe_layer_forward_async";
    EXPECT(moe_layer_forward_async(NULL, T, x, out, NULL, NULL), MOE_ERR_INVALID_ARG, F("%s: %s", fa, lnull));
    EXPECT(moe_layer_forward_async(F0, T, x, out, NULL, NULL), MOE_ERR_INVALID_ARG, F("%s: %s", fa, lnull));
    EXPECT(moe_layer_forward_async(L, -1, x, out, NULL, NULL), MOE_ERR_INVALID_ARG,
           F("%s: T = -1: expected 0 .. 715827882 tokens", fa));
    EXPECT(moe_layer_forward_async(L, INT64_MIN, x, out, NULL, NULL), MOE_ERR_INVALID_ARG,
           F("%s: T = %lld: expected 0 .. 715827882 tokens", fa, (long long)INT64_MIN));
    EXPECT(moe_layer_forward_async(L, 9, x, out, NULL, NULL), MOE_ERR_OVERFLOW,
           F("%s: T = 9 exceeds the layer's max_tokens = 8 (its buffers are sized for that)", fa));
    EXPECT(moe_layer_forward_async(L, T, x, out, NULL, stream), MOE_ERR_INVALID_ARG,
           F("%s: stream must be NULL on the CPU backend (calls run to completion)", fa));
    EXPECT(moe_layer_forward_async(L, T, NULL, out, NULL, NULL), MOE_ERR_INVALID_ARG, F("%s: x is NULL", fa));
    EXPECT(moe_layer_forward_async(L, T, x, NULL, lg, NULL), MOE_ERR_INVALID_ARG, F("%s: out is NULL", fa));
    /* ---- backward on backend memory */
    const char *ba = "moe_layer_backward_async";
    moe_layer_grads g = {NULL, g13, NULL, NULL, NULL, NULL};
    EXPECT(moe_layer_backward_async(NULL, T, x, x, NULL, dx, &g, NULL), MOE_ERR_INVALID_ARG, F("%s: %s", ba, lnull));
    EXPECT(moe_layer_backward_async(F0, T, x, x, NULL, dx, &g, NULL), MOE_ERR_INVALID_ARG, F("%s: %s", ba, lnull));
    EXPECT(moe_layer_backward_async(L, -2, x, x, NULL, dx, &g, NULL), MOE_ERR_INVALID_ARG,
           F("%s: T = -2: expected 0 .. 715827882 tokens", ba));
    EXPECT(moe_layer_backward_async(L, 715827883, x, x, NULL, dx, &g, NULL), MOE_ERR_INVALID_ARG,
           F("%s: T = 715827883: expected 0 .. 715827882 tokens", ba));
    EXPECT(moe_layer_backward_async(L, 9, x, x, NULL, dx, &g, NULL), MOE_ERR_OVERFLOW,
           F("%s: T = 9 exceeds the layer's max_tokens = 8 (its buffers are sized for that)", ba));
    EXPECT(moe_layer_backward_async(L, T, x, x, NULL, dx, &g, stream), MOE_ERR_INVALID_ARG,
           F("%s: stream must be NULL on the CPU backend (calls run to completion)", ba));
    EXPECT(moe_layer_backward_async(L, T, NULL, x, NULL, dx, &g, NULL), MOE_ERR_INVALID_ARG, F("%s: x is NULL", ba));
    EXPECT(moe_layer_backward_async(L, T, x, NULL, NULL, dx, &g, NULL), MOE_ERR_INVALID_ARG, F("%s: dout is NULL", ba));

    /* ---- forward on host memory */
    const char *fh = "moe_layer_forward";
    moe_tensor_view h = view2(x, T, H), ov = view2(out, T, H), lv = view2(lg, T, E), v;
    EXPECT(moe_layer_forward(NULL, &h, &ov, NULL), MOE_ERR_INVALID_ARG, F("%s: %s", fh, lnull));
    EXPECT(moe_layer_forward(F0, &h, &ov, NULL), MOE_ERR_INVALID_ARG, F("%s: %s", fh, lnull));
    EXPECT(moe_layer_forward(L, NULL, &ov, NULL), MOE_ERR_INVALID_ARG, F("%s: hidden is NULL", fh));
    const char *hshape = F("%s: hidden must be [T, %d] or [B, S, %d]", fh, H, H);
    v = h;
    v.ndim = 1;
    v.shape[0] = (int64_t)T * H;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG, hshape);
    v = h;
    v.ndim = 4;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG, hshape);
    v = h;
    v.shape[1] = H + 1;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG, hshape);
    v = h;
    v.shape[0] = -5;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG,
           F("%s: hidden has a negative dimension", fh));
    v.ndim = 3;
    v.shape[0] = -1;
    v.shape[1] = -5;
    v.shape[2] = H;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG,
           F("%s: hidden has a negative dimension", fh));
    /* dims whose product wraps around int64 (2^40 x 2^40) must not pass as T = 0 */
    v.shape[0] = (int64_t)1 << 40;
    v.shape[1] = (int64_t)1 << 40;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG,
           F("%s: hidden holds more than 2147483647 tokens", fh));
    v = h;
    v.dtype = MOE_DTYPE_BF16;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG,
           F("%s: hidden is bf16, the layer computes in fp32", fh));
    v.dtype = (moe_dtype)42;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG,
           F("%s: hidden is dtype 42 (not a moe_dtype), the layer computes in fp32", fh));
    v = h;
    v.data = NULL;
    EXPECT(moe_layer_forward(L, &v, &ov, NULL), MOE_ERR_INVALID_ARG, F("%s: hidden has no data", fh));
    const char *oshape = F("%s: out must be fp32 with %d rows of %d", fh, T, H);
    EXPECT(moe_layer_forward(L, &h, NULL, NULL), MOE_ERR_INVALID_ARG, oshape);
    v = ov;
    v.data = NULL;
    EXPECT(moe_layer_forward(L, &h, &v, NULL), MOE_ERR_INVALID_ARG, oshape);
    v = ov;
    v.shape[0] = T + 1;
    EXPECT(moe_layer_forward(L, &h, &v, NULL), MOE_ERR_INVALID_ARG, oshape);
    v = ov;
    v.shape[1] = H - 1;
    EXPECT(moe_layer_forward(L, &h, &v, NULL), MOE_ERR_INVALID_ARG, oshape);
    v = ov;
    v.dtype = MOE_DTYPE_F16;
    EXPECT(moe_layer_forward(L, &h, &v, NULL), MOE_ERR_INVALID_ARG, oshape);
    v = ov;
    v.ndim = 0;
    EXPECT(moe_layer_forward(L, &h, &v, NULL), MOE_ERR_INVALID_ARG, oshape);
    const char *lshape = F("%s: router_logits must be fp32 [%d, %d]", fh, T, E);
    v = lv;
    v.shape[1] = E + 1;
    EXPECT(moe_layer_forward(L, &h, &ov, &v), MOE_ERR_INVALID_ARG, lshape);
    v = lv;
    v.dtype = MOE_DTYPE_F64;
    EXPECT(moe_layer_forward(L, &h, &ov, &v), MOE_ERR_INVALID_ARG, lshape);
    v = lv;
    v.data = NULL;
    EXPECT(moe_layer_forward(L, &h, &ov, &v), MOE_ERR_INVALID_ARG, lshape);
    v = view2(x, 9, H);
    moe_tensor_view o9 = view2(out, 9, H);
    EXPECT(moe_layer_forward(L, &v, &o9, NULL), MOE_ERR_OVERFLOW,
           F("%s: T = 9 exceeds the layer's max_tokens = 8 (its buffers are sized for that)", fh));
    /* the accepted shapes: [T,H], [B,S,H], out flat [T*H] */
    OK(moe_layer_forward(L, &h, &ov, &lv));
    float *out2 = fbuf((size_t)T * H);
    v.ndim = 3;
    v.shape[0] = 1;
    v.shape[1] = T;
    v.shape[2] = H;
    v.data = x;
    moe_tensor_view o1 = {MOE_DTYPE_F32, 1, {(int64_t)T * H}, out2};
    OK(moe_layer_forward(L, &v, &o1, NULL));
    same_bits("[B,S,H] forward", out2, out, (size_t)T * H);
    free(out2);

    /* ---- backward on host memory */
    const char *bh = "moe_layer_backward";
    moe_tensor_view dv = view2(x, T, H), dxv = view2(dx, T, H), dlv = view2(lg, T, E);
    EXPECT(moe_layer_backward(NULL, &h, &dv, NULL, &dxv, &g), MOE_ERR_INVALID_ARG, F("%s: %s", bh, lnull));
    EXPECT(moe_layer_backward(F0, &h, &dv, NULL, &dxv, &g), MOE_ERR_INVALID_ARG, F("%s: %s", bh, lnull));
    EXPECT(moe_layer_backward(L, NULL, &dv, NULL, &dxv, &g), MOE_ERR_INVALID_ARG, F("%s: hidden is NULL", bh));
    v = h;
    v.shape[1] = 2;
    EXPECT(moe_layer_backward(L, &v, &dv, NULL, &dxv, &g), MOE_ERR_INVALID_ARG,
           F("%s: hidden must be [T, %d] or [B, S, %d]", bh, H, H));
    v = h;
    v.dtype = MOE_DTYPE_F16;
    EXPECT(moe_layer_backward(L, &v, &dv, NULL, &dxv, &g), MOE_ERR_INVALID_ARG,
           F("%s: hidden is fp16, the layer computes in fp32", bh));
    const char *dshape = F("%s: dout must be fp32 with %d rows of %d", bh, T, H);
    EXPECT(moe_layer_backward(L, &h, NULL, NULL, &dxv, &g), MOE_ERR_INVALID_ARG, dshape);
    v = dv;
    v.shape[0] = 4;
    EXPECT(moe_layer_backward(L, &h, &v, NULL, &dxv, &g), MOE_ERR_INVALID_ARG, dshape);
    v = dv;
    v.dtype = MOE_DTYPE_BF16;
    EXPECT(moe_layer_backward(L, &h, &v, NULL, &dxv, &g), MOE_ERR_INVALID_ARG, dshape);
    v = dlv;
    v.shape[0] = 4;
    EXPECT(moe_layer_backward(L, &h, &dv, &v, &dxv, &g), MOE_ERR_INVALID_ARG,
           F("%s: d_router_logits must be fp32 [%d, %d]", bh, T, E));
    v = dxv;
    v.shape[1] = H + 3;
    EXPECT(moe_layer_backward(L, &h, &dv, NULL, &v, &g), MOE_ERR_INVALID_ARG,
           F("%s: dx must be fp32 with %d rows of %d", bh, T, H));
    v = dxv;
    v.data = NULL;
    EXPECT(moe_layer_backward(L, &h, &dv, NULL, &v, &g), MOE_ERR_INVALID_ARG,
           F("%s: dx must be fp32 with %d rows of %d", bh, T, H));
    v = view2(x, 9, H);
    moe_tensor_view d9 = view2(x, 9, H);
    EXPECT(moe_layer_backward(L, &v, &d9, NULL, NULL, NULL), MOE_ERR_OVERFLOW,
           F("%s: T = 9 exceeds the layer's max_tokens = 8 (its buffers are sized for that)", bh));
    /* NULL grads, NULL dx, one gradient only: fine */
    OK(moe_layer_backward(L, &h, &dv, NULL, NULL, NULL));
    OK(moe_layer_backward(L, &h, &dv, &dlv, &dxv, &g));
    OK(moe_layer_backward_async(L, T, x, x, NULL, NULL, NULL, NULL));

    /* the failures above changed nothing: the counters saw only the calls that ran */
    moe_layer_stats s2 = MOE_LAYER_STATS_INIT;
    OK(moe_layer_stats_get(L, &s2));
    assert_int_equal(s2.calls_forward, 2);
    assert_int_equal(s2.calls_backward, 3);
    assert_int_equal(s2.tokens_local, 5 * T);

    OK(moe_layer_destroy(L));
    free(x); free(out); free(lg); free(dx); free(g13);
    model_free(&m);
}

/* ================================================================== info ==== */

static void test_info(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        model m;
        model_init(&m, model_names[mi]);
        moe_layer_options o = cpu_opts();
        o.max_tokens = 33;
        o.threads = 0; /* the default */
        moe_layer *L = random_layer(&m, &o);
        /* a caller built against a later, larger struct: accepted, the known part filled */
        struct {
            moe_layer_info i;
            char later[64];
        } big;
        memset(&big, 0x5a, sizeof big);
        big.i.size = sizeof big;
        big.i.magic = MOE_LAYER_INFO_MAGIC;
        OK(moe_layer_info_get(L, &big.i));
        moe_layer_info i = big.i;
        assert_int_equal(i.size, sizeof big);
        assert_int_equal(i.magic, MOE_LAYER_INFO_MAGIC);
        assert_int_equal(i.hidden, m.H);
        assert_int_equal(i.inter, m.I);
        assert_int_equal(i.num_experts, m.E);
        assert_int_equal(i.top_k, m.k);
        assert_int_equal(i.shared_inter, m.Is);
        assert_int_equal(i.arch, m.llama ? 1 : 0);
        assert_int_equal(i.dtype, MOE_DTYPE_F32);
        assert_int_equal(i.backend, MOE_BACKEND_CPU);
        assert_int_equal(i.device, -1);
        assert_int_equal(i.rank, 0);
        assert_int_equal(i.nranks, 1);
        assert_int_equal(i.virtual_ranks, 1);
        assert_int_equal(i.num_local_experts, m.E);
        assert_non_null(i.local_experts);
        for (int e = 0; e < m.E; e++) assert_int_equal(i.local_experts[e], e);
        assert_true(i.bytes_resident > 0);
        assert_int_equal(i.weight_uploads, 1);
        assert_int_equal(i.max_tokens, 33);
        assert_string_equal(i.transport, "none");
        assert_string_equal(i.device_name, F("cpu (%d threads)", moe_default_threads()));
        for (size_t b = 0; b < sizeof big.later; b++) assert_int_equal(big.later[b], 0x5a);
        OK(moe_layer_destroy(L));
        /* dtype MOE_NUM_DTYPES: the config's (fp32 for the tiny presets); AUTO: the CPU here */
        o = cpu_opts();
        o.dtype = MOE_NUM_DTYPES;
#ifndef MOE_HAVE_CUDA
        o.backend = MOE_BACKEND_AUTO;
#endif
        L = random_layer(&m, &o);
        i = info_of(L);
        assert_int_equal(i.dtype, MOE_DTYPE_F32);
        assert_int_equal(i.backend, MOE_BACKEND_CPU);
        assert_int_equal(i.max_tokens, 0);
        assert_string_equal(i.device_name, "cpu (2 threads)");
        OK(moe_layer_destroy(L));
        /* opts NULL: every default */
        moe_weights_source s = random_src(&m);
        L = create(m.name, &s, NULL);
        i = info_of(L);
        assert_int_equal(i.dtype, MOE_DTYPE_F32);
        OK(moe_layer_destroy(L));
        model_free(&m);
    }
}

/* ================================================================== (a), (e), (g) ==== */

/* (a) against the reference, (e) backend pointers == host views, (g) d_router_logits. */
static void test_random_vs_reference(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        fixture f;
        fixture_init(&f, model_names[mi], 40);
        model *m = &f.m;
        check_reference(m, f.T, f.x, f.dout, NULL, &f.a);

        /* (e) the backend-pointer API, stream NULL */
        moe_layer *L = random_layer(m, NULL);
        result r;
        run(L, m, f.T, f.x, f.dout, NULL, true, &r);
        same_result("async vs host", m, &r, false, &f.a, true);
        result_free(&r);

        /* (g) the gradient of the router logits as an output */
        result gd, ga;
        run(L, m, f.T, f.x, f.dout, f.dlog, false, &gd);
        run(L, m, f.T, f.x, f.dout, f.dlog, true, &ga);
        same_result("d logits, async vs host", m, &ga, false, &gd, true);
        same_bits("out with d logits", gd.out, f.a.out, (size_t)f.T * m->H);
        assert_true(differs(gd.g[G_ROUTER], f.a.g[G_ROUTER], gsize(m, G_ROUTER)));
        assert_true(differs(gd.dx, f.a.dx, (size_t)f.T * m->H));
        for (int g = G_W13; g < G_N; g++) /* the experts and the shared expert: unchanged */
            if (gd.g[g]) same_bits(moe_test_grad_names[g], gd.g[g], f.a.g[g], gsize(m, g));
        check_reference(m, f.T, f.x, f.dout, f.dlog, &gd);
        /* the identity on its own: the difference of the two runs is dlog^T x and dlog router */
        {
            const int T = f.T, H = m->H, E = m->E;
            double *got = dzeros((size_t)E * H), *want = dzeros((size_t)E * H);
            for (size_t i = 0; i < (size_t)E * H; i++)
                got[i] = (double)gd.g[G_ROUTER][i] - f.a.g[G_ROUTER][i];
            for (int t = 0; t < T; t++)
                for (int e = 0; e < E; e++)
                    for (int h = 0; h < H; h++)
                        want[(size_t)e * H + h] += (double)f.dlog[(size_t)t * E + e] * f.x[(size_t)t * H + h];
            char w[96];
            snprintf(w, sizeof w, "%s d router difference", m->name);
            moe_test_assert_close(w, got, want, (size_t)E, (size_t)H, 1e-4);
            free(got);
            free(want);
            got = dzeros((size_t)T * H);
            want = dzeros((size_t)T * H);
            const float *router = m->w.router.data;
            for (size_t i = 0; i < (size_t)T * H; i++) got[i] = (double)gd.dx[i] - f.a.dx[i];
            for (int t = 0; t < T; t++)
                for (int e = 0; e < E; e++)
                    for (int h = 0; h < H; h++)
                        want[(size_t)t * H + h] += (double)f.dlog[(size_t)t * E + e] * router[(size_t)e * H + h];
            snprintf(w, sizeof w, "%s dx difference", m->name);
            moe_test_assert_close(w, got, want, (size_t)T, (size_t)H, 1e-4);
            free(got);
            free(want);
        }
        /* a zero d_router_logits is the same as none */
        float *z = calloc((size_t)f.T * m->E, sizeof(float));
        assert_non_null(z);
        result gz;
        run(L, m, f.T, f.x, f.dout, z, false, &gz);
        same_result("zero d logits", m, &gz, false, &f.a, true);
        free(z);
        result_free(&gz);
        result_free(&gd);
        result_free(&ga);
        OK(moe_layer_destroy(L));
        fixture_free(&f);
    }
}

/* ================================================================== (b) ==== */

static void test_tensors_every_layout(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        fixture f;
        fixture_init(&f, model_names[mi], 29);
        model *m = &f.m;
        const moe_weights_layout qwen[3] = {MOE_LAYOUT_CANONICAL, MOE_LAYOUT_QWEN3_HUB,
                                            MOE_LAYOUT_QWEN3_FUSED};
        const moe_weights_layout llama[2] = {MOE_LAYOUT_CANONICAL, MOE_LAYOUT_LLAMA4};
        const moe_weights_layout *lays = m->llama ? llama : qwen;
        const int nl = m->llama ? 2 : 3;
        for (int li = 0; li < nl; li++) {
            tset t;
            ts_build(&t, m, lays[li]);
            moe_weights_source s = tensors_src(&t, lays[li], 0);
            moe_layer_options o = cpu_opts();
            moe_layer *L = create(m->name, &s, &o);
            /* copied: the caller's memory may go away at once */
            ts_free(&t);
            moe_layer_info i = info_of(L);
            assert_int_equal(i.weight_uploads, 1);
            result r;
            for (int async = 0; async < 2; async++) {
                run(L, m, f.T, f.x, f.dout, NULL, async, &r);
                char w[64];
                snprintf(w, sizeof w, "layout %d%s", (int)lays[li], async ? " async" : "");
                same_result(w, m, &r, lays[li] == MOE_LAYOUT_LLAMA4, &f.a, true);
                result_free(&r);
            }
            OK(moe_layer_destroy(L));
        }
        fixture_free(&f);
    }
}

/* ================================================================== (c) ==== */

static void test_borrowed_and_reload(void **state)
{
    (void)state;
    fixture f;
    fixture_init(&f, "tiny-qwen3", 23);
    model *m = &f.m;
    const moe_weights_layout lays[2] = {MOE_LAYOUT_CANONICAL, MOE_LAYOUT_QWEN3_FUSED};
    for (int li = 0; li < 2; li++) {
        tset t;
        ts_build(&t, m, lays[li]);
        moe_layer_options o = cpu_opts();
        moe_weights_source sb = tensors_src(&t, lays[li], 1), sc = tensors_src(&t, lays[li], 0);
        moe_layer *B = create(m->name, &sb, &o), *C = create(m->name, &sc, &o);
        result r;
        run(B, m, f.T, f.x, f.dout, NULL, false, &r);
        same_result("borrowed", m, &r, false, &f.a, true);
        result_free(&r);
        run(C, m, f.T, f.x, f.dout, NULL, true, &r);
        same_result("copied", m, &r, false, &f.a, true);
        result_free(&r);
        EXPECT(moe_layer_reload_weights(B), MOE_ERR_INVALID_ARG,
               "moe_layer_reload_weights: the layer's weights were not copied from caller "
               "tensors (MOE_WEIGHTS_TENSORS with borrow = 0); borrowed tensors are read in "
               "place on every call");

        /* the caller changes its memory: halve every w2 entry, move one router weight */
        float *w2 = ts_get(&t, lays[li] == MOE_LAYOUT_CANONICAL ? "w2" : "experts.down_proj");
        float *router = ts_get(&t, lays[li] == MOE_LAYOUT_CANONICAL ? "router" : "gate.weight");
        for (size_t i = 0; i < gsize(m, G_W2); i++) w2[i] *= 0.5f;
        router[3] += 0.75f;
        /* what the changed weights give: a layer copied from them now */
        moe_layer *N = create(m->name, &sc, &o);
        result changed;
        run(N, m, f.T, f.x, f.dout, NULL, false, &changed);
        OK(moe_layer_destroy(N));
        assert_true(differs(changed.out, f.a.out, (size_t)f.T * m->H));
        /* borrowed: read in place, the next call reflects it */
        run(B, m, f.T, f.x, f.dout, NULL, false, &r);
        same_result("borrowed after the change", m, &r, false, &changed, true);
        result_free(&r);
        assert_int_equal(info_of(B).weight_uploads, 1);
        /* copied: not until moe_layer_reload_weights */
        run(C, m, f.T, f.x, f.dout, NULL, false, &r);
        same_result("copied after the change", m, &r, false, &f.a, true);
        result_free(&r);
        assert_int_equal(info_of(C).weight_uploads, 1);
        OK(moe_layer_reload_weights(C));
        assert_int_equal(info_of(C).weight_uploads, 2);
        run(C, m, f.T, f.x, f.dout, NULL, false, &r);
        same_result("copied after reload", m, &r, false, &changed, true);
        result_free(&r);
        result_free(&changed);
        OK(moe_layer_destroy(B));
        OK(moe_layer_destroy(C));
        ts_free(&t);
    }
    /* Llama-4: copied LLAMA4 layout, reload after a change */
    {
        fixture g;
        fixture_init(&g, "tiny-llama4", 17);
        tset t;
        ts_build(&t, &g.m, MOE_LAYOUT_LLAMA4);
        moe_weights_source sc = tensors_src(&t, MOE_LAYOUT_LLAMA4, 0);
        moe_layer_options o = cpu_opts();
        moe_layer *C = create(g.m.name, &sc, &o);
        float *down = ts_get(&t, "experts.down_proj");
        float *sd = ts_get(&t, "shared_expert.down_proj.weight");
        for (size_t i = 0; i < gsize(&g.m, G_W2); i++) down[i] *= 0.5f;
        for (size_t i = 0; i < gsize(&g.m, G_SD); i++) sd[i] *= 2.0f;
        moe_layer *N = create(g.m.name, &sc, &o);
        result changed, r;
        run(N, &g.m, g.T, g.x, g.dout, NULL, false, &changed);
        OK(moe_layer_destroy(N));
        run(C, &g.m, g.T, g.x, g.dout, NULL, false, &r);
        same_result("llama4 copied after the change", &g.m, &r, true, &g.a, true);
        result_free(&r);
        OK(moe_layer_reload_weights(C));
        assert_int_equal(info_of(C).weight_uploads, 2);
        run(C, &g.m, g.T, g.x, g.dout, NULL, false, &r);
        same_result("llama4 copied after reload", &g.m, &r, false, &changed, true);
        assert_true(differs(r.out, g.a.out, (size_t)g.T * g.m.H));
        result_free(&r);
        result_free(&changed);
        OK(moe_layer_destroy(C));
        ts_free(&t);
        fixture_free(&g);
    }
    fixture_free(&f);
}

/* ================================================================== (d) ==== */

static char *make_tmpdir(void)
{
    char tmpl[] = "/tmp/moe_test_api_XXXXXX";
    char *d = mkdtemp(tmpl);
    if (!d) fail_msg("mkdtemp: %s", strerror(errno));
    return strdup(d);
}

static void rm_rf(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* Write tensors [from, to) of t into path. */
static void write_st(const tset *t, int from, int to, const char *path)
{
    moe_st_writer w;
    moe_st_writer_init(&w);
    moe_tensor ts[TS_MAX];
    moe_error err = {0};
    for (int i = from; i < to; i++) {
        ts[i] = moe_tensor_view_of(MOE_DTYPE_F32, t->t[i].view.ndim, t->t[i].view.shape,
                                   t->t[i].view.data);
        if (moe_st_writer_add(&w, t->names[i], &ts[i], &err) != MOE_OK) fail_msg("%s", err.msg);
    }
    if (moe_st_write(&w, path, &err) != MOE_OK) fail_msg("%s", err.msg);
    moe_st_writer_free(&w);
}

static moe_layer *file_layer(const model *m, const char *path)
{
    moe_weights_source s = MOE_WEIGHTS_SOURCE_INIT;
    s.kind = MOE_WEIGHTS_FILE;
    s.path = path;
    moe_layer_options o = cpu_opts();
    return create(m->name, &s, &o);
}

static void test_file_sources(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        fixture f;
        fixture_init(&f, model_names[mi], 21);
        model *m = &f.m;
        char *one = make_tmpdir(), *sharded = make_tmpdir(), *empty = make_tmpdir();
        /* one file: the HF names of the fused layouts */
        tset t;
        const moe_weights_layout file_lay = m->llama ? MOE_LAYOUT_LLAMA4 : MOE_LAYOUT_QWEN3_FUSED;
        ts_build(&t, m, file_lay);
        char file[512];
        snprintf(file, sizeof file, "%s/model.safetensors", one);
        write_st(&t, 0, t.n, file);
        ts_free(&t);
        /* sharded: Qwen3's per-expert hub names / Llama-4's, in three shards: the router in the
         * second, the first tensors after it in the first, the rest in the third */
        ts_build(&t, m, m->llama ? MOE_LAYOUT_LLAMA4 : MOE_LAYOUT_QWEN3_HUB);
        const int cut = m->llama ? 3 : 1 + 3 * (m->E / 2);
        static const char *const shard[3] = {"model-00001-of-00003.safetensors",
                                             "model-00002-of-00003.safetensors",
                                             "model-00003-of-00003.safetensors"};
        char sp[3][512], index[512];
        for (int i = 0; i < 3; i++) snprintf(sp[i], sizeof sp[i], "%s/%s", sharded, shard[i]);
        write_st(&t, 0, 1, sp[1]);
        write_st(&t, 1, cut, sp[0]);
        write_st(&t, cut, t.n, sp[2]);
        snprintf(index, sizeof index, "%s/model.safetensors.index.json", sharded);
        FILE *fp = fopen(index, "w");
        assert_non_null(fp);
        fprintf(fp, "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {");
        for (int i = 0; i < t.n; i++)
            fprintf(fp, "%s\"%s\": \"%s\"", i ? ", " : "", t.names[i],
                    shard[i == 0 ? 1 : i < cut ? 0 : 2]);
        fprintf(fp, "}}\n");
        fclose(fp);
        ts_free(&t);

        const char *paths[4] = {file, one, index, sharded};
        for (int p = 0; p < 4; p++) {
            moe_layer *L = file_layer(m, paths[p]);
            moe_layer_info i = info_of(L);
            assert_int_equal(i.weight_uploads, 1);
            moe_layer_stats st = MOE_LAYER_STATS_INIT;
            OK(moe_layer_stats_get(L, &st));
            assert_int_equal(st.weight_bytes_read, (uint64_t)m->E * 3 * m->I * m->H * 4);
            result r;
            run(L, m, f.T, f.x, f.dout, NULL, p % 2 == 1, &r);
            char w[600];
            snprintf(w, sizeof w, "file %s", paths[p]);
            same_result(w, m, &r, m->llama, &f.a, true);
            result_free(&r);
            OK(moe_layer_destroy(L));
        }
        /* a directory with neither file */
        moe_weights_source s = MOE_WEIGHTS_SOURCE_INIT;
        s.kind = MOE_WEIGHTS_FILE;
        s.path = empty;
        moe_layer_options o = cpu_opts();
        moe_layer *L = NULL;
        EXPECT(moe_layer_create(m->name, &s, &o, &L), MOE_ERR_IO,
               F("%s: a directory without model.safetensors.index.json or model.safetensors",
                 empty));
        assert_null(L);
        /* the wrong architecture's file: the router's name is missing */
        s.path = file;
        EXPECT(moe_layer_create(model_names[1 - mi], &s, &o, &L), MOE_ERR_FORMAT,
               F("%s: missing tensor '%s' (expected shape [%d, %d])", file,
                 m->llama ? "gate.weight" : "router.weight", m->llama ? 7 : 5,
                 m->llama ? 37 : 41));
        rm_rf(one);
        rm_rf(sharded);
        rm_rf(empty);
        free(one);
        free(sharded);
        free(empty);
        fixture_free(&f);
    }
}

/* ================================================================== (f) ==== */

static void test_save_for_backward(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        fixture f;
        fixture_init(&f, model_names[mi], 31);
        model *m = &f.m;
        moe_layer_options o = cpu_opts();
        o.save_for_backward = 1;
        moe_layer *S = random_layer(m, &o);
        result r;
        for (int async = 0; async < 2; async++) {
            run(S, m, f.T, f.x, f.dout, NULL, async, &r);
            same_result("save_for_backward", m, &r, false, &f.a, true);
            result_free(&r);
        }
        run(S, m, f.T, f.x, f.dout, f.dlog, false, &r);
        moe_layer *P = random_layer(m, NULL);
        result p;
        run(P, m, f.T, f.x, f.dout, f.dlog, false, &p);
        same_result("save_for_backward with d logits", m, &r, false, &p, true);
        result_free(&r);
        result_free(&p);
        /* a backward of another x (or fewer tokens of the same) must not use the saved state */
        float *x2 = normals("save x2", (size_t)f.T * m->H, 1.0);
        result_alloc(&r, m, f.T);
        forward(S, m, f.T, f.x, false, &r);
        backward(S, m, f.T, x2, f.dout, NULL, false, &r);
        result_alloc(&p, m, f.T);
        backward(P, m, f.T, x2, f.dout, NULL, false, &p);
        char w[64];
        snprintf(w, sizeof w, "another x");
        float *gr[G_N], *gp[G_N];
        canonical_grads(m, &r, false, gr);
        canonical_grads(m, &p, false, gp);
        same_bits(w, r.dx, p.dx, (size_t)f.T * m->H);
        for (int g = 0; g < G_N; g++)
            if (gr[g]) same_bits(moe_test_grad_names[g], gr[g], gp[g], gsize(m, g));
        for (int g = 0; g < G_N; g++) { free(gr[g]); free(gp[g]); }
        result_free(&r);
        result_free(&p);
        const int T2 = f.T - 7;
        result_alloc(&r, m, f.T);
        forward(S, m, f.T, f.x, true, &r);
        backward(S, m, T2, f.x, f.dout, NULL, true, &r);
        result_alloc(&p, m, f.T);
        backward(P, m, T2, f.x, f.dout, NULL, true, &p);
        same_bits("fewer tokens: dx", r.dx, p.dx, (size_t)T2 * m->H);
        for (int g = 0; g < G_N; g++)
            if (r.g[g]) same_bits(moe_test_grad_names[g], r.g[g], p.g[g], gsize(m, g));
        result_free(&r);
        result_free(&p);
        free(x2);
        OK(moe_layer_destroy(S));
        OK(moe_layer_destroy(P));
        fixture_free(&f);
    }
}

/* ================================================================== (h) ==== */

static void test_token_growth(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        fixture f;
        const int M = 24;
        fixture_init(&f, model_names[mi], M);
        model *m = &f.m;
        for (int save = 0; save < 2; save++) {
            moe_layer_options o = cpu_opts();
            o.max_tokens = M;
            o.save_for_backward = save;
            moe_layer *L = random_layer(m, &o);
            moe_layer_info i = info_of(L);
            assert_int_equal(i.weight_uploads, 1);
            const uint64_t resident = i.bytes_resident;
            uint64_t ws_at_max = 0;
            result r;
            result_alloc(&r, m, M);
            for (int T = 1; T <= M; T++) {
                forward(L, m, T, f.x, T % 2 == 0, &r);
                i = info_of(L);
                assert_int_equal(i.weight_uploads, 1);
                assert_int_equal(i.bytes_resident, resident);
            }
            same_bits("ramp: the forward at max_tokens", r.out, f.a.out, (size_t)M * m->H);
            ws_at_max = info_of(L).workspace_bytes;
            assert_true(ws_at_max > 0);
            for (int T = 1; T <= M; T += 5) forward(L, m, T, f.x, false, &r);
            assert_int_equal(info_of(L).workspace_bytes, ws_at_max);
            /* the backward's scratch: sized for max_tokens at its first call */
            backward(L, m, M, f.x, f.dout, NULL, false, &r);
            const uint64_t ws_bwd = info_of(L).workspace_bytes;
            for (int T = 0; T <= M; T += 3) {
                forward(L, m, T, f.x, true, &r);
                backward(L, m, T, f.x, f.dout, NULL, T % 2 == 1, &r);
                i = info_of(L);
                assert_int_equal(i.workspace_bytes, ws_bwd);
                assert_int_equal(i.weight_uploads, 1);
            }
            forward(L, m, M, f.x, false, &r);
            backward(L, m, M, f.x, f.dout, NULL, false, &r);
            same_result("ramp", m, &r, false, &f.a, true);
            /* beyond max_tokens: refused, nothing grows */
            EXPECT(moe_layer_forward_async(L, M + 1, f.x, r.out, NULL, NULL), MOE_ERR_OVERFLOW,
                   F("moe_layer_forward_async: T = %d exceeds the layer's max_tokens = %d (its "
                     "buffers are sized for that)", M + 1, M));
            i = info_of(L);
            assert_int_equal(i.workspace_bytes, ws_bwd);
            assert_int_equal(i.weight_uploads, 1);
            moe_layer_stats st = MOE_LAYER_STATS_INIT;
            OK(moe_layer_stats_get(L, &st));
            assert_int_equal(st.device_bytes_in_use, resident + ws_bwd);
            result_free(&r);
            OK(moe_layer_destroy(L));
        }
        fixture_free(&f);
    }
}

/* ================================================================== (i) ==== */

static void test_shared_workspace(void **state)
{
    (void)state;
    fixture q, l;
    fixture_init(&q, "tiny-qwen3", 37);
    fixture_init(&l, "tiny-llama4", 19);
    moe_workspace *ws = NULL;
    OK(moe_workspace_create(MOE_BACKEND_CPU, -1, &ws));
    moe_layer_options o = cpu_opts();
    o.workspace = ws;
    moe_layer *A = random_layer(&q.m, &o), *B = random_layer(&l.m, &o);
    size_t bytes = 0;
    OK(moe_workspace_bytes(ws, &bytes));
    assert_int_equal(bytes, info_of(A).workspace_bytes);
    for (int rep = 0; rep < 2; rep++) {
        result r;
        run(A, &q.m, q.T, q.x, q.dout, NULL, rep == 1, &r);
        same_result("shared workspace A", &q.m, &r, false, &q.a, true);
        result_free(&r);
        run(B, &l.m, l.T, l.x, l.dout, NULL, rep == 0, &r);
        same_result("shared workspace B", &l.m, &r, false, &l.a, true);
        result_free(&r);
    }
    OK(moe_workspace_bytes(ws, &bytes));
    assert_true(bytes > 0);
    assert_int_equal(bytes, info_of(A).workspace_bytes);
    assert_int_equal(bytes, info_of(B).workspace_bytes);
    moe_layer_stats st = MOE_LAYER_STATS_INIT;
    OK(moe_layer_stats_get(B, &st));
    assert_int_equal(st.device_bytes_in_use, info_of(B).bytes_resident + bytes);
    EXPECT(moe_workspace_destroy(ws), MOE_ERR_INVALID_ARG,
           "moe_workspace_destroy: 2 layer(s) still use this workspace; destroy them first");
    OK(moe_layer_destroy(A));
    EXPECT(moe_workspace_destroy(ws), MOE_ERR_INVALID_ARG,
           "moe_workspace_destroy: 1 layer(s) still use this workspace; destroy them first");
    /* still usable after the refusals */
    result r;
    run(B, &l.m, l.T, l.x, l.dout, NULL, false, &r);
    same_result("shared workspace B after A", &l.m, &r, false, &l.a, true);
    result_free(&r);
    OK(moe_layer_destroy(B));
    OK(moe_workspace_bytes(ws, &bytes));
    assert_true(bytes > 0); /* the memory stays with the workspace until it is destroyed */
    OK(moe_workspace_destroy(ws));
    fixture_free(&q);
    fixture_free(&l);
}

/* ================================================================== (j) ==== */

static void test_zero_tokens(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        for (int lay = 0; lay < 2; lay++) {
            model m;
            model_init(&m, model_names[mi]);
            const moe_weights_layout wl =
                lay == 0 ? MOE_LAYOUT_CANONICAL
                         : (m.llama ? MOE_LAYOUT_LLAMA4 : MOE_LAYOUT_QWEN3_FUSED);
            tset t;
            ts_build(&t, &m, wl);
            moe_weights_source s = tensors_src(&t, wl, 0);
            moe_layer_options o = cpu_opts();
            moe_layer *L = create(m.name, &s, &o);
            ts_free(&t);
            result r;
            result_alloc(&r, &m, 0);
            moe_layer_grads g = grads_of(&r);
            /* host views of 0 rows with no memory behind them */
            moe_tensor_view h = view2(NULL, 0, m.H), ov = view2(NULL, 0, m.H);
            moe_tensor_view lv = view2(NULL, 0, m.E), dv = view2(NULL, 0, m.H);
            moe_tensor_view dxv = view2(NULL, 0, m.H);
            OK(moe_layer_forward(L, &h, &ov, &lv));
            OK(moe_layer_backward(L, &h, &dv, &lv, &dxv, &g));
            for (int i = 0; i < G_N; i++)
                if (r.g[i])
                    for (size_t e = 0; e < gsize(&m, i); e++)
                        if (r.g[i][e] != 0.0f || signbit(r.g[i][e]))
                            fail_msg("%s T = 0: %s[%zu] = %g", m.name, moe_test_grad_names[i], e,
                                     (double)r.g[i][e]);
            /* [B, 0, H] and [0, S, H] */
            moe_tensor_view h3 = {MOE_DTYPE_F32, 3, {4, 0, m.H, 0}, NULL};
            moe_tensor_view o3 = {MOE_DTYPE_F32, 3, {0, 9, m.H, 0}, NULL};
            OK(moe_layer_forward(L, &h3, &o3, NULL));
            /* backend memory: every pointer NULL */
            OK(moe_layer_forward_async(L, 0, NULL, NULL, NULL, NULL));
            for (int i = 0; i < G_N; i++)
                if (r.g[i]) for (size_t e = 0; e < gsize(&m, i); e++) r.g[i][e] = NAN;
            OK(moe_layer_backward_async(L, 0, NULL, NULL, NULL, NULL, &g, NULL));
            for (int i = 0; i < G_N; i++)
                if (r.g[i])
                    for (size_t e = 0; e < gsize(&m, i); e++) assert_true(r.g[i][e] == 0.0f);
            OK(moe_layer_backward_async(L, 0, NULL, NULL, NULL, NULL, NULL, NULL));
            moe_layer_stats st = MOE_LAYER_STATS_INIT;
            OK(moe_layer_stats_get(L, &st));
            assert_int_equal(st.calls_forward, 3);
            assert_int_equal(st.calls_backward, 3);
            assert_int_equal(st.tokens_local, 0);
            assert_int_equal(st.last_call, 2);
            assert_int_equal(st.last_tokens, 0);
            OK(moe_layer_check_errors(L));
            result_free(&r);
            OK(moe_layer_destroy(L));
            model_free(&m);
        }
    }
}

/* ================================================================== (k) ==== */

static void test_nonfinite_check(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        fixture f;
        fixture_init(&f, model_names[mi], 9);
        model *m = &f.m;
        moe_layer *L = random_layer(m, NULL);
        OK(moe_layer_check_errors(L));
        float *x = fdup(f.x, (size_t)f.T * m->H);
        x[2 * m->H + 5] = NAN;      /* token 2 */
        x[6 * m->H + 0] = INFINITY; /* token 6 */
        result r;
        result_alloc(&r, m, f.T);
        forward(L, m, f.T, x, false, &r);
        /* the other tokens are unaffected */
        for (int t = 0; t < f.T; t++)
            if (t != 2 && t != 6) {
                char w[64];
                snprintf(w, sizeof w, "%s token %d beside NaN rows", m->name, t);
                same_bits(w, r.out + (size_t)t * m->H, f.a.out + (size_t)t * m->H, (size_t)m->H);
            }
        EXPECT(moe_layer_check_errors(L), MOE_ERR_NONFINITE,
               "2 token(s) had non-finite router logits (NaN or Inf in the input or the router "
               "weights); their outputs are not meaningful");
        OK(moe_layer_check_errors(L)); /* reported once, then clean */
        /* a clean call in between changes nothing; the backward routes too */
        forward(L, m, f.T, f.x, true, &r);
        OK(moe_layer_check_errors(L));
        x[2 * m->H + 5] = f.x[2 * m->H + 5];
        backward(L, m, f.T, x, f.dout, NULL, false, &r);
        EXPECT(moe_layer_check_errors(L), MOE_ERR_NONFINITE,
               "1 token(s) had non-finite router logits (NaN or Inf in the input or the router "
               "weights); their outputs are not meaningful");
        OK(moe_layer_check_errors(L));
        result_free(&r);
        free(x);
        OK(moe_layer_destroy(L));
        fixture_free(&f);
    }
}

/* ================================================================== (l) ==== */

static void test_stats_and_timing(void **state)
{
    (void)state;
    for (int mi = 0; mi < 2; mi++) {
        fixture f;
        fixture_init(&f, model_names[mi], 13);
        model *m = &f.m;
        moe_layer *L = random_layer(m, NULL);
        moe_layer_stats s = MOE_LAYER_STATS_INIT;
        OK(moe_layer_stats_get(L, &s));
        assert_int_equal(s.calls_forward, 0);
        assert_int_equal(s.calls_backward, 0);
        assert_int_equal(s.tokens_local, 0);
        assert_int_equal(s.last_call, 0);
        assert_int_equal(s.weight_bytes_read, 0); /* generated, not read */
        result r;
        result_alloc(&r, m, f.T);
        forward(L, m, f.T, f.x, false, &r);
        forward(L, m, 4, f.x, true, &r);
        OK(moe_layer_stats_get(L, &s));
        assert_int_equal(s.calls_forward, 2);
        assert_int_equal(s.calls_backward, 0);
        assert_int_equal(s.tokens_local, f.T + 4);
        assert_int_equal(s.tokens_computed, f.T + 4);
        assert_int_equal(s.rows_sent, 0); /* one rank: nothing travels */
        assert_int_equal(s.bytes_sent, 0);
        assert_int_equal(s.last_call, 1);
        assert_int_equal(s.last_tokens, 4);
        assert_true(s.seconds >= s.last_seconds && s.last_seconds >= 0);
        /* timing off: no device times */
        assert_true(s.last_device_ms == -1);
        for (int p = 0; p < MOE_STATS_NUM_PHASES; p++) assert_true(s.phase_ms[p] == -1);
        for (int g = 0; g < MOE_STATS_NUM_GEMMS; g++) {
            assert_string_equal(s.gemm_kernel[g], "");
            assert_string_equal(s.gemm_config[g], "");
        }
        assert_int_equal(s.route_one_launch, 0);
        backward(L, m, 7, f.x, f.dout, NULL, false, &r);
        OK(moe_layer_stats_get(L, &s));
        assert_int_equal(s.calls_backward, 1);
        assert_int_equal(s.tokens_local, f.T + 4 + 7);
        assert_int_equal(s.last_call, 2);
        assert_int_equal(s.last_tokens, 7);
        /* per-peer totals into caller arrays: one peer, nothing sent */
        uint64_t ps[1] = {99}, pr[1] = {99};
        s.peers = 1;
        s.peer_rows_sent = ps;
        s.peer_rows_recv = pr;
        OK(moe_layer_stats_get(L, &s));
        assert_int_equal(ps[0], 0);
        assert_int_equal(pr[0], 0);
        /* timing on: the call's device (here host) time and the phases measured are >= 0 */
        OK(moe_layer_set_timing(L, 1));
        forward(L, m, f.T, f.x, false, &r);
        moe_layer_stats t = MOE_LAYER_STATS_INIT;
        OK(moe_layer_stats_get(L, &t));
        assert_true(t.last_device_ms >= 0);
        fprintf(stderr, "%s timing: call %.3f ms; phases", m->name, t.last_device_ms);
        for (int p = 0; p < MOE_STATS_NUM_PHASES; p++) fprintf(stderr, " %.3f", t.phase_ms[p]);
        fprintf(stderr, "\n");
        /* one rank: every phase but the dispatch runs (the sort inside the route); the shared
         * expert only in Llama-4 */
        for (int p = 0; p < MOE_STATS_NUM_PHASES; p++) {
            const bool runs = p != MOE_PHASE_DISPATCH && (p != MOE_PHASE_SHARED || m->llama);
            if (runs ? !(t.phase_ms[p] >= 0) : t.phase_ms[p] != -1)
                fail_msg("%s phase %d: %g ms", m->name, p, t.phase_ms[p]);
        }
        backward(L, m, f.T, f.x, f.dout, NULL, true, &r);
        OK(moe_layer_stats_get(L, &t));
        assert_true(t.last_device_ms >= 0);
        for (int p = 0; p < MOE_STATS_NUM_PHASES; p++) assert_true(t.phase_ms[p] == -1);
        /* a call with no tokens measures nothing: no stale times of the call before */
        forward(L, m, 0, f.x, true, &r);
        OK(moe_layer_stats_get(L, &t));
        assert_int_equal(t.last_tokens, 0);
        assert_true(t.last_device_ms >= 0);
        for (int p = 0; p < MOE_STATS_NUM_PHASES; p++) assert_true(t.phase_ms[p] == -1);
        backward(L, m, 0, f.x, f.dout, NULL, true, &r);
        OK(moe_layer_stats_get(L, &t));
        assert_int_equal(t.last_call, 2);
        assert_true(t.last_device_ms >= 0 && t.last_device_ms < 1e3);
        OK(moe_layer_set_timing(L, 0));
        forward(L, m, f.T, f.x, false, &r);
        OK(moe_layer_stats_get(L, &t));
        assert_true(t.last_device_ms == -1);
        for (int p = 0; p < MOE_STATS_NUM_PHASES; p++) assert_true(t.phase_ms[p] == -1);
        /* timing does not change results */
        same_bits("timing on/off", r.out, f.a.out, (size_t)f.T * m->H);
        /* reset: the running totals, not the last call */
        OK(moe_layer_stats_reset(L));
        OK(moe_layer_stats_get(L, &t));
        assert_int_equal(t.calls_forward, 0);
        assert_int_equal(t.calls_backward, 0);
        assert_int_equal(t.tokens_local, 0);
        assert_int_equal(t.tokens_computed, 0);
        assert_true(t.seconds == 0);
        assert_int_equal(t.last_call, 1);
        assert_int_equal(t.last_tokens, f.T);
        /* the timing option at creation */
        moe_layer_options o = cpu_opts();
        o.timing = 1;
        moe_layer *T1 = random_layer(m, &o);
        forward(T1, m, f.T, f.x, true, &r);
        OK(moe_layer_stats_get(T1, &t));
        assert_true(t.last_device_ms >= 0);
        OK(moe_layer_destroy(T1));
        result_free(&r);
        OK(moe_layer_destroy(L));
        fixture_free(&f);
    }
}

/* ================================================================== EP communicator ==== */

static void test_ep_comm_before_mpi(void **state)
{
    (void)state;
    int inited = 0;
    MPI_Initialized(&inited);
    assert_int_equal(inited, 0);
    moe_ep_comm *keep = (moe_ep_comm *)fake_handle, *c = keep;
    EXPECT(moe_ep_comm_create(0, NULL, NULL), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: comm (the output) is NULL");
    EXPECT(moe_ep_comm_create(0, NULL, &c), MOE_ERR_MPI,
           "moe_ep_comm_create: MPI is not initialised (call MPI_Init first)");
    assert_ptr_equal(c, keep);
    OK(moe_ep_comm_destroy(NULL));
}

static void test_ep_comm(void **state)
{
    (void)state;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) assert_int_equal(MPI_Init(NULL, NULL), MPI_SUCCESS);
    const int32_t world = (int32_t)MPI_Comm_c2f(MPI_COMM_WORLD);
    moe_ep_comm *keep = (moe_ep_comm *)fake_handle, *c = keep;
    EXPECT(moe_ep_comm_create((int32_t)MPI_Comm_c2f(MPI_COMM_NULL), NULL, &c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: the communicator is MPI_COMM_NULL");
    const moe_ep_options d = MOE_EP_OPTIONS_INIT;
    moe_ep_options o = d;
    o.size = 4;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           F("moe_ep_comm_create: options not initialised with MOE_EP_OPTIONS_INIT (size 4, magic "
             "0x%08x)", MOE_EP_OPTIONS_MAGIC));
    o = d;
    o.magic = MOE_LAYER_OPTIONS_MAGIC;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           F("moe_ep_comm_create: options not initialised with MOE_EP_OPTIONS_INIT (size %u, "
             "magic 0x%08x)", (unsigned)sizeof o, MOE_LAYER_OPTIONS_MAGIC));
    o = d;
    o.transport = (moe_transport)3;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: transport 3: expected MOE_TRANSPORT_AUTO, _MPI or _NCCL");
    o = d;
    o.virtual_ranks = 0;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: virtual_ranks 0 (--ep-virtual): expected 1..4096 virtual ranks "
           "per process");
    o.virtual_ranks = 4097;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: virtual_ranks 4097 (--ep-virtual): expected 1..4096 virtual ranks "
           "per process");
    o = d;
    o.chunks = 0;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: chunks 0 (--chunks): expected 1..4096");
    o = d;
    o.max_tokens_per_rank = -1;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: max_tokens_per_rank -1 (--max-tokens-per-rank): expected 0 "
           "(sized per call) .. 2147483647");
    o = d;
    o.max_recv_tokens = 5;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: max_recv_tokens 5: expected 0 .. 2147483647, and only together "
           "with max_tokens_per_rank (--max-tokens-per-rank)");
    o.max_tokens_per_rank = 8;
    o.max_recv_tokens = -1;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_create: max_recv_tokens -1: expected 0 .. 2147483647, and only together "
           "with max_tokens_per_rank (--max-tokens-per-rank)");
    o = d;
    o.transport = MOE_TRANSPORT_NCCL;
    o.chunks = 2;
    o.max_tokens_per_rank = 8;
    EXPECT(moe_ep_comm_create(world, &o, &c), MOE_ERR_UNSUPPORTED,
           "moe_ep_comm_create: chunks 2 with max_tokens_per_rank over NCCL (--chunks with "
           "--max-tokens-per-rank): the sync-free forward runs as one chunk; drop one of them");
    assert_ptr_equal(c, keep);

    /* rank queries */
    int rank = -1, n = -1;
    EXPECT(moe_ep_comm_rank(NULL, &rank, &n), MOE_ERR_INVALID_ARG, "moe_ep_comm_rank: not a communicator");
    EXPECT(moe_ep_comm_rank((moe_ep_comm *)fake_handle, &rank, &n), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_rank: not a communicator");
    EXPECT(moe_ep_comm_destroy((moe_ep_comm *)fake_handle), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_destroy: not a communicator (or destroyed twice)");
    OK(moe_ep_comm_create(world, NULL, &c));
    EXPECT(moe_ep_comm_rank(c, NULL, NULL), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_rank: rank and nranks are both NULL");
    OK(moe_ep_comm_rank(c, &rank, &n));
    assert_int_equal(rank, 0);
    assert_int_equal(n, 1);
    n = -1;
    OK(moe_ep_comm_rank(c, NULL, &n));
    assert_int_equal(n, 1);

    /* a layer on one rank: the plain path, bitwise the layer without a communicator */
    fixture f;
    fixture_init(&f, "tiny-qwen3", 15);
    moe_layer_options lo = cpu_opts();
    lo.comm = c;
    int32_t bad_map[7] = {0, 0, 0, 1, 0, 0, 0};
    lo.expert_map = bad_map;
    moe_weights_source src = random_src(&f.m);
    moe_layer *L = NULL;
    EXPECT(moe_layer_create(f.m.name, &src, &lo, &L), MOE_ERR_INVALID_ARG,
           "expert map: expert 3 is owned by rank 1, outside [0, 1)");
    assert_null(L);
    int32_t map[7] = {0};
    lo.expert_map = map;
    L = create(f.m.name, &src, &lo);
    moe_layer_info i = info_of(L);
    assert_int_equal(i.nranks, 1);
    assert_int_equal(i.num_local_experts, f.m.E);
    assert_string_equal(i.transport, "none");
    result r;
    run(L, &f.m, f.T, f.x, f.dout, NULL, false, &r);
    same_result("one-rank communicator", &f.m, &r, false, &f.a, true);
    result_free(&r);
    EXPECT(moe_ep_comm_destroy(c), MOE_ERR_INVALID_ARG,
           "moe_ep_comm_destroy: 1 layer(s) still use this communicator; destroy them first");
    /* two virtual ranks: the expert-parallel path through MPI, against the reference */
    moe_ep_comm *cv = NULL;
    o = d;
    o.virtual_ranks = 2;
    o.transport = MOE_TRANSPORT_MPI;
    OK(moe_ep_comm_create(world, &o, &cv));
    lo.comm = cv;
    lo.expert_map = NULL;
    moe_layer *V = create(f.m.name, &src, &lo);
    i = info_of(V);
    assert_int_equal(i.virtual_ranks, 2);
    assert_string_equal(i.transport, "mpi");
    run(V, &f.m, f.T, f.x, f.dout, NULL, true, &r);
    check_reference(&f.m, f.T, f.x, f.dout, NULL, &r);
    moe_layer_stats st = MOE_LAYER_STATS_INIT;
    OK(moe_layer_stats_get(V, &st));
    assert_int_equal(st.calls_forward, 1);
    assert_int_equal(st.calls_backward, 1);
    assert_int_equal(st.tokens_local, 2 * f.T);
    result_free(&r);
    OK(moe_layer_destroy(V));
    OK(moe_ep_comm_destroy(cv));
    OK(moe_layer_destroy(L));
    OK(moe_ep_comm_destroy(c));
    fixture_free(&f);
}

int main(void)
{
    moe_test_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ep_comm_before_mpi), /* first: MPI is not initialised yet */
        cmocka_unit_test(test_status_version_dtypes),
        cmocka_unit_test(test_last_error_thread_local),
        cmocka_unit_test(test_workspace_args),
        cmocka_unit_test(test_create_args),
        cmocka_unit_test(test_layer_call_args),
        cmocka_unit_test(test_info),
        cmocka_unit_test(test_random_vs_reference),
        cmocka_unit_test(test_tensors_every_layout),
        cmocka_unit_test(test_borrowed_and_reload),
        cmocka_unit_test(test_file_sources),
        cmocka_unit_test(test_save_for_backward),
        cmocka_unit_test(test_token_growth),
        cmocka_unit_test(test_shared_workspace),
        cmocka_unit_test(test_zero_tokens),
        cmocka_unit_test(test_nonfinite_check),
        cmocka_unit_test(test_stats_and_timing),
        cmocka_unit_test(test_ep_comm),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (inited && !finalized) MPI_Finalize();
    return rc;
}
