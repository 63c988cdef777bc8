/*
 * mpi_gpu_ep_test.h — what the expert-parallel GPU tests (test_mpi_gpu_ep*.c) share: the model
 * cases, the global inputs every rank generates identically (counter-based RNG) and its token
 * slice of them, the single-rank answer (the CUDA layer created without a communicator, over
 * all experts and all tokens, computed by every rank itself), one EP run through the public
 * calls with outputs poisoned first, and the comparison of a rank's rows and expert slice with
 * the answer (test_util's tolerances; tokens routed differently at a near-tie between
 * differently sized router GEMMs are left out and counted: at most 2%). Every check prints the
 * rank and what failed, and sets the caller's `ok` (mpi_test.h), so every rank takes the same
 * path to the next collective. Header-only, included by one translation unit per test; all of
 * it in CUDA builds only but main() (EPT_MAIN: a build without CUDA compiles the tests to a
 * skip).
 */
#ifndef MOE_MPI_GPU_EP_TEST_H
#define MOE_MPI_GPU_EP_TEST_H

#include "mpi_test.h"

#ifdef MOE_HAVE_CUDA

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "block_state.h"
#include "config.h"
#include "cpu/cpu_fused.h"
#include "dtype.h"
#include "ep/ep.h"
#include "layer/layer.h"
#include "moe_ep_mpi.h"
#include "rng.h"

#define EPT_UNUSED __attribute__((unused))

#define CHECK_CU(call)                                                                         \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "rank %d: %s:%d: %s -> %s\n", g_rank, __FILE__, __LINE__, #call,   \
                    cudaGetErrorString(e_));                                                   \
            ok = false;                                                                        \
        }                                                                                      \
    } while (0)

/* ------------------------------------------------------------------ the cases ---- */

typedef struct model_case {
    const char *name;
    moe_arch arch;
    int H, I, E, k, Is;
    moe_dtype dt;
} model_case;

/* Aligned bf16 shapes (the 16-byte paths) and odd fp32 shapes (the narrow paths). */
static const model_case k_cases[] EPT_UNUSED = {
    {"qwen3 bf16", MOE_ARCH_QWEN3, 64, 48, 16, 4, 0, MOE_DTYPE_BF16},
    {"qwen3 fp32 odd", MOE_ARCH_QWEN3, 37, 23, 16, 3, 0, MOE_DTYPE_F32},
    {"llama4 bf16", MOE_ARCH_LLAMA4, 64, 32, 8, 1, 48, MOE_DTYPE_BF16},
    {"llama4 fp32 k2", MOE_ARCH_LLAMA4, 41, 19, 8, 2, 27, MOE_DTYPE_F32},
};
#define NCASES ((int)(sizeof k_cases / sizeof k_cases[0]))

static EPT_UNUSED moe_config ept_cfg(const model_case *m)
{
    moe_config c;
    memset(&c, 0, sizeof c);
    c.arch = m->arch;
    snprintf(c.name, sizeof c.name, "%s", m->name);
    c.hidden = m->H;
    c.inter = m->I;
    c.num_experts = m->E;
    c.top_k = m->k;
    c.shared_inter = m->arch == MOE_ARCH_LLAMA4 ? m->Is : 0;
    c.norm_topk_prob = m->arch == MOE_ARCH_QWEN3;
    c.dtype = m->dt;
    c.num_layers = 1;
    return c;
}

/* ------------------------------------------------------------------ inputs ---- */

typedef struct setup {
    moe_config cfg;
    moe_dtype dt;
    size_t dsz;
    int Tg, T, off, N, rank;
    MPI_Comm comm;    /* the ranks taking part */
    int *offs;        /* [N+1] token slices */
    void *xg, *doutg; /* [Tg,H] host, the same on every rank */
    void *xg2, *doutg2; /* other contents (graph replays on new inputs) */
} setup;

static EPT_UNUSED void fill_global(moe_dtype dt, const char *name, size_t n, void *buf)
{
    moe_fill_normal(dt, buf, n, g_seed, name, 0, 1.0);
}

/* Token split over N ranks: uneven (rank r ~ r+1 shares), and with N = 4 the last rank has
 * none. even: Tg/N each, the first Tg%N one more. */
static EPT_UNUSED void split(int Tg, int N, bool even, int *offs)
{
    offs[0] = 0;
    if (even || N == 1) {
        for (int r = 0; r < N; r++) offs[r + 1] = offs[r] + Tg / N + (r < Tg % N ? 1 : 0);
        return;
    }
    const int last = N == 4 ? N - 2 : N - 1; /* the last rank with tokens */
    int shares = 0;
    for (int r = 0; r <= last; r++) shares += r + 1;
    int at = 0;
    for (int r = 0; r < N; r++) {
        int n = r > last ? 0 : r == last ? Tg - at : Tg * (r + 1) / shares;
        offs[r + 1] = at + n;
        at += n;
    }
}

static EPT_UNUSED bool setup_make(setup *s, MPI_Comm comm, const model_case *m, int Tg, bool even)
{
    memset(s, 0, sizeof *s);
    s->cfg = ept_cfg(m);
    s->dt = m->dt;
    s->dsz = moe_dtype_size(m->dt);
    s->Tg = Tg;
    s->comm = comm;
    MPI_Comm_size(comm, &s->N);
    MPI_Comm_rank(comm, &s->rank);
    s->offs = calloc((size_t)s->N + 1, sizeof(int));
    split(Tg, s->N, even, s->offs);
    s->off = s->offs[s->rank];
    s->T = s->offs[s->rank + 1] - s->off;
    size_t n = (size_t)Tg * m->H;
    s->xg = malloc(n * s->dsz + 16);
    s->doutg = malloc(n * s->dsz + 16);
    s->xg2 = malloc(n * s->dsz + 16);
    s->doutg2 = malloc(n * s->dsz + 16);
    fill_global(s->dt, "test.gpu_ep.x", n, s->xg);
    fill_global(s->dt, "test.gpu_ep.dout", n, s->doutg);
    fill_global(s->dt, "test.gpu_ep.x2", n, s->xg2);
    fill_global(s->dt, "test.gpu_ep.dout2", n, s->doutg2);
    return s->offs && s->xg && s->doutg && s->xg2 && s->doutg2;
}

static EPT_UNUSED void setup_free(setup *s)
{
    free(s->offs);
    free(s->xg);
    free(s->doutg);
    free(s->xg2);
    free(s->doutg2);
    memset(s, 0, sizeof *s);
}

/* This rank's rows of a global [Tg, cols] tensor. */
static EPT_UNUSED const void *mine(const setup *s, const void *global, size_t cols)
{
    return (const char *)global + (size_t)s->off * cols * s->dsz;
}

/* ------------------------------------------------------------------ device helpers ---- */

/* The layers run on non-blocking streams the legacy stream does not wait for: these helpers
 * synchronise the device around their copies. */
static EPT_UNUSED void *dev_upload(const void *h, size_t bytes)
{
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 16) != cudaSuccess) return NULL;
    cudaDeviceSynchronize();
    if (bytes) cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
    return d;
}

static EPT_UNUSED void dev_copy_in(void *d, const void *h, size_t bytes)
{
    cudaDeviceSynchronize();
    if (bytes) cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
}

static EPT_UNUSED void *dev_poisoned(size_t bytes)
{
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 16) != cudaSuccess) return NULL;
    cudaMemset(d, 0xff, bytes ? bytes : 16); /* NaN in every float dtype */
    cudaDeviceSynchronize();
    return d;
}

static EPT_UNUSED void dev_poison(void *d, size_t bytes)
{
    cudaDeviceSynchronize();
    if (bytes) cudaMemset(d, 0xff, bytes);
    cudaDeviceSynchronize();
}

static EPT_UNUSED void *dev_download(const void *d, size_t bytes)
{
    void *h = malloc(bytes ? bytes : 16);
    cudaDeviceSynchronize();
    if (bytes && h) cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost);
    return h;
}

static EPT_UNUSED double *widen(moe_dtype dt, const void *p, size_t n)
{
    double *d = malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) d[i] = moe_load_elem(dt, p, i);
    return d;
}

/* rows x cols of a (host, dt) against ref (host, dt), leaving out rows with skip[r]. */
static EPT_UNUSED bool close_rows(const char *what, moe_dtype dt, const void *a, const void *ref,
                                  size_t rows, size_t cols, const bool *skip, double tol)
{
    if (rows * cols == 0) return true;
    double *da = widen(dt, a, rows * cols), *dr = widen(dt, ref, rows * cols);
    char label[224];
    snprintf(label, sizeof label, "r%d %s", g_rank, what);
    bool ok = moe_test_close_kept(label, da, dr, rows, cols, skip, tol);
    free(da);
    free(dr);
    return ok;
}

/* Bitwise equality of n bytes, naming the first differing element (es bytes each). */
static EPT_UNUSED bool same_bits(const char *what, const void *a, const void *b, size_t n, size_t es)
{
    if (n == 0 || memcmp(a, b, n) == 0) return true;
    size_t first = 0, bad = 0;
    for (size_t i = 0; i < n / es; i++)
        if (memcmp((const char *)a + i * es, (const char *)b + i * es, es) != 0) {
            if (!bad) first = i;
            bad++;
        }
    fprintf(stderr, "rank %d: %s: %zu of %zu elements differ bitwise, the first at element %zu\n",
            g_rank, what, bad, n / es, first);
    return false;
}

/* ------------------------------------------------------------------ layers ---- */

/* An EP communicator over comm (collective). */
static EPT_UNUSED moe_ep_comm *comm_open(MPI_Comm comm, moe_transport tp, int V, int C,
                                         int64_t M, int64_t max_recv, const char *route)
{
    moe_ep_options o = MOE_EP_OPTIONS_INIT;
    o.transport = tp;
    o.virtual_ranks = V;
    o.chunks = C;
    o.max_tokens_per_rank = M;
    o.max_recv_tokens = max_recv;
    o.route = route;
    moe_ep_comm *c = NULL;
    moe_status st = moe_ep_comm_create_mpi(comm, &o, &c);
    if (st != MOE_OK)
        fprintf(stderr, "rank %d: moe_ep_comm_create (transport %d, V %d, C %d, M %lld, recv %lld, "
                "route %s) -> %s: %s\n", g_rank, (int)tp, V, C, (long long)M, (long long)max_recv,
                route ? route : "router", moe_strerror(st), moe_last_error());
    return c;
}

/* The layer of s's config with random weights of the test seed: expert-parallel over comm
 * (map: owner per expert, or NULL) or, without comm, the plain single-rank layer. */
static EPT_UNUSED moe_layer *layer_make(const setup *s, moe_ep_comm *comm, const int32_t *map,
                                        moe_backend be, int64_t max_tokens, moe_status *status)
{
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    o.backend = be;
    o.dtype = s->dt;
    o.comm = comm;
    o.expert_map = map;
    o.max_tokens = max_tokens;
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_RANDOM;
    src.seed = g_seed;
    moe_layer *L = NULL;
    moe_status st = moe_layer_create_config(NULL, &s->cfg, &src, &o, &L);
    if (status) *status = st;
    if (st != MOE_OK && !status)
        fprintf(stderr, "rank %d: moe_layer_create (%s, %s) -> %s: %s\n", g_rank, s->cfg.name,
                comm ? "EP" : "plain", moe_strerror(st), moe_last_error());
    return L;
}

/* Gradient sizes of layer L (El local experts): router, w13, w2, shared gate, up, down. */
static EPT_UNUSED void grad_bytes(const moe_layer *L, size_t *b)
{
    const size_t es = L->dsz, H = L->H, I = L->I, El = L->map.El, Is = L->Is;
    b[0] = (size_t)L->E * H * es;
    b[1] = El * 2 * I * H * es;
    b[2] = El * H * I * es;
    b[3] = b[4] = Is * H * es;
    b[5] = H * Is * es;
}

/* ------------------------------------------------------------------ the single-rank answer -- */

typedef struct answer {
    void *out, *logits, *dx; /* host [Tg,H], [Tg,E], [Tg,H] */
    int32_t *ids;            /* [Tg,k] */
    moe_layer_grads g;       /* host, every expert, canonical layout */
} answer;

static EPT_UNUSED void answer_free(answer *a)
{
    free(a->out);
    free(a->logits);
    free(a->dx);
    free(a->ids);
    for (int i = 0; i < 6; i++) free(*moe_test_grad_slot(&a->g, i));
    memset(a, 0, sizeof *a);
}

/* The plain CUDA layer (no communicator) over all experts and the Tg tokens x / dout. */
static EPT_UNUSED bool answer_plain(const setup *s, const void *x, const void *dout, bool backward,
                                    answer *a)
{
    bool ok = true;
    memset(a, 0, sizeof *a);
    const moe_config *c = &s->cfg;
    const size_t Tg = (size_t)s->Tg, H = c->hidden, E = c->num_experts, es = s->dsz;
    moe_layer *L = layer_make(s, NULL, NULL, MOE_BACKEND_CUDA, 0, NULL);
    if (!L) return false;
    moe_fwd_state st;
    moe_error err;
    moe_error_clear(&err);
    if (moe_fwd_state_alloc(c, s->dt, s->Tg, true, &st, &err) != MOE_OK ||
        moe_layer_forward_stages(L, s->Tg, x, &st, &err) != MOE_OK) {
        fprintf(stderr, "rank %d: the single-rank answer: %s\n", g_rank, err.msg);
        ok = false;
    }
    a->out = malloc(Tg * H * es + 16);
    a->logits = malloc(Tg * E * es + 16);
    a->ids = malloc(Tg * c->top_k * 4 + 16);
    if (ok) {
        memcpy(a->out, st.out, Tg * H * es);
        memcpy(a->logits, st.router_logits, Tg * E * es);
        memcpy(a->ids, st.topk_ids, Tg * c->top_k * 4);
    }
    moe_fwd_state_free(&st);
    if (backward && ok) {
        size_t gb[6];
        grad_bytes(L, gb);
        for (int i = 0; i < 6; i++)
            if (gb[i]) *moe_test_grad_slot(&a->g, i) = malloc(gb[i]);
        a->dx = malloc(Tg * H * es + 16);
        moe_tensor_view vx = {s->dt, 2, {s->Tg, (int64_t)H}, (void *)x};
        moe_tensor_view vd = {s->dt, 2, {s->Tg, (int64_t)H}, (void *)dout};
        moe_tensor_view vdx = {s->dt, 2, {s->Tg, (int64_t)H}, a->dx};
        CHECK_API(moe_layer_backward(L, &vx, &vd, NULL, &vdx, &a->g));
    }
    CHECK_API(moe_layer_destroy(L));
    return ok;
}

/* ------------------------------------------------------------------ one EP run ---- */

typedef struct ep_result {
    void *out, *logits, *dx; /* host [T,H], [T,E], [T,H] */
    int32_t *ids;            /* [T,k]: the twin's top-k of the logits (= the kernel's) */
    moe_layer_grads g;       /* host: router [E,H], the local experts, the shared expert */
    size_t gb[6];
    moe_layer_stats fwd, bwd; /* the forward's and the backward's counters (reset before each) */
    uint64_t *peers;          /* their per-peer arrays */
} ep_result;

static EPT_UNUSED void result_free(ep_result *r)
{
    free(r->out);
    free(r->logits);
    free(r->dx);
    free(r->ids);
    free(r->peers);
    for (int i = 0; i < 6; i++) free(*moe_test_grad_slot(&r->g, i));
    memset(r, 0, sizeof *r);
}

static EPT_UNUSED void stats_with_peers(moe_layer_stats *s, uint64_t *arr, int N)
{
    moe_layer_stats z = MOE_LAYER_STATS_INIT;
    *s = z;
    s->peers = N;
    s->peer_rows_sent = arr;
    s->peer_rows_recv = arr + N;
    s->peer_bytes_sent = arr + 2 * N;
    s->peer_bytes_recv = arr + 3 * N;
}

/* Forward (and backward) of this rank's rows of xg / doutg through L: with `stream` on device
 * copies (the asynchronous calls; outputs poisoned), else through the host calls (outputs
 * poisoned). Every gradient is poisoned first: each element must be written. */
static EPT_UNUSED bool run_ep(moe_layer *L, const setup *s, const void *xg, const void *doutg,
                              bool backward, cudaStream_t stream, bool async, ep_result *r)
{
    bool ok = true;
    memset(r, 0, sizeof *r);
    const moe_config *c = &s->cfg;
    const size_t T = (size_t)s->T, H = c->hidden, E = c->num_experts, k = c->top_k, es = s->dsz;
    const int N = L->map.N;
    r->peers = calloc(8 * (size_t)N, sizeof(uint64_t));
    stats_with_peers(&r->fwd, r->peers, N);
    stats_with_peers(&r->bwd, r->peers + 4 * N, N);
    r->out = malloc(T * H * es + 16);
    r->logits = malloc(T * E * es + 16);
    memset(r->out, 0xff, T * H * es);
    memset(r->logits, 0xff, T * E * es);
    const void *x = mine(s, xg, H), *dout = mine(s, doutg, H);
    void *dx_in = NULL, *ddout = NULL, *dout_ = NULL, *dlg = NULL, *ddx = NULL;
    moe_layer_grads dg = {0};
    grad_bytes(L, r->gb);
    CHECK_API(moe_layer_stats_reset(L));
    if (async) {
        dx_in = dev_upload(x, T * H * es);
        ddout = dev_upload(dout, T * H * es);
        dout_ = dev_poisoned(T * H * es);
        dlg = dev_poisoned(T * E * es);
        CHECK_API(moe_layer_forward_async(L, s->T, dx_in, dout_, dlg, stream));
        CHECK_CU(cudaStreamSynchronize(stream));
        CHECK_API(moe_layer_check_errors(L));
        cudaMemcpy(r->out, dout_, T * H * es, cudaMemcpyDeviceToHost);
        cudaMemcpy(r->logits, dlg, T * E * es, cudaMemcpyDeviceToHost);
    } else {
        moe_tensor_view vx = {s->dt, 2, {s->T, (int64_t)H}, (void *)x};
        moe_tensor_view vo = {s->dt, 2, {s->T, (int64_t)H}, r->out};
        moe_tensor_view vl = {s->dt, 2, {s->T, (int64_t)E}, r->logits};
        CHECK_API(moe_layer_forward(L, &vx, &vo, &vl));
        CHECK_API(moe_layer_check_errors(L));
    }
    CHECK_API(moe_layer_stats_get(L, &r->fwd));
    r->ids = malloc(T * k * 4 + 16);
    void *w = malloc(T * k * es + 16);
    moe_error e;
    moe_error_clear(&e);
    if (T && cpu_route_topk(c, s->dt, s->T, r->logits, r->ids, w, &e) != MOE_OK) {
        fprintf(stderr, "rank %d: top-k of the EP logits: %s\n", g_rank, e.msg);
        ok = false;
    }
    free(w);
    if (backward && ok) {
        r->dx = malloc(T * H * es + 16);
        memset(r->dx, 0xff, T * H * es);
        CHECK_API(moe_layer_stats_reset(L));
        for (int i = 0; i < 6; i++) {
            if (!r->gb[i]) continue;
            *moe_test_grad_slot(&r->g, i) = malloc(r->gb[i]);
            memset(*moe_test_grad_slot(&r->g, i), 0xff, r->gb[i]);
            if (async) *moe_test_grad_slot(&dg, i) = dev_poisoned(r->gb[i]);
        }
        if (async) {
            ddx = dev_poisoned(T * H * es);
            CHECK_API(moe_layer_backward_async(L, s->T, dx_in, ddout, NULL, ddx, &dg, stream));
            CHECK_CU(cudaStreamSynchronize(stream));
            CHECK_API(moe_layer_check_errors(L));
            cudaMemcpy(r->dx, ddx, T * H * es, cudaMemcpyDeviceToHost);
            for (int i = 0; i < 6; i++)
                if (r->gb[i])
                    cudaMemcpy(*moe_test_grad_slot(&r->g, i), *moe_test_grad_slot(&dg, i), r->gb[i],
                               cudaMemcpyDeviceToHost);
        } else {
            moe_tensor_view vx = {s->dt, 2, {s->T, (int64_t)H}, (void *)x};
            moe_tensor_view vd = {s->dt, 2, {s->T, (int64_t)H}, (void *)dout};
            moe_tensor_view vdx = {s->dt, 2, {s->T, (int64_t)H}, r->dx};
            CHECK_API(moe_layer_backward(L, &vx, &vd, NULL, &vdx, &r->g));
        }
        CHECK_API(moe_layer_stats_get(L, &r->bwd));
    }
    cudaFree(dx_in);
    cudaFree(ddout);
    cudaFree(dout_);
    cudaFree(dlg);
    cudaFree(ddx);
    for (int i = 0; i < 6; i++) cudaFree(*moe_test_grad_slot(&dg, i));
    return ok;
}

/* ------------------------------------------------------------------ comparisons ---- */

/* This rank's tokens whose top-k ids (as sets) differ from the single-rank routing. */
static EPT_UNUSED bool *routing_mask(const setup *s, const int32_t *ids, const int32_t *ref_ids, int *nskip)
{
    const int k = s->cfg.top_k;
    bool *skip = calloc((size_t)s->T + 1, sizeof(bool));
    *nskip = 0;
    for (int t = 0; t < s->T; t++) {
        const int32_t *a = ids + (size_t)t * k, *b = ref_ids + (size_t)(s->off + t) * k;
        for (int i = 0; i < k && !skip[t]; i++) {
            bool found = false;
            for (int j = 0; j < k; j++) found |= a[i] == b[j];
            if (!found) {
                skip[t] = true;
                (*nskip)++;
            }
        }
    }
    return skip;
}

/* The EP result against the single-rank answer: out (and dx, this rank's experts' gradients,
 * the replicated ones). Collective over s->comm (the count of differently routed tokens). */
static EPT_UNUSED bool compare(const char *label, const setup *s, const moe_layer *L,
                               const ep_result *r, const answer *a, bool backward)
{
    bool ok = true;
    const moe_config *c = &s->cfg;
    const size_t H = c->hidden, I = c->inter, E = c->num_experts, Is = c->shared_inter, es = s->dsz;
    int nskip = 0;
    bool *skip = routing_mask(s, r->ids, a->ids, &nskip);
    if (nskip > 0)
        fprintf(stderr, "r%d %s: %d of %d tokens routed differently (logit near-tie), left out\n",
                g_rank, label, nskip, s->T);
    CHECK(nskip <= s->T / 50);
    char what[224];
    const double tol = moe_test_tol(s->dt, false), gtol = moe_test_tol(s->dt, true);
    snprintf(what, sizeof what, "%s out", label);
    CHECK(close_rows(what, s->dt, r->out, mine(s, a->out, H), (size_t)s->T, H, skip, tol));
    snprintf(what, sizeof what, "%s router logits", label);
    CHECK(close_rows(what, s->dt, r->logits, mine(s, a->logits, E), (size_t)s->T, E, NULL, tol));
    if (backward && a->dx) {
        snprintf(what, sizeof what, "%s dx", label);
        CHECK(close_rows(what, s->dt, r->dx, mine(s, a->dx, H), (size_t)s->T, H, skip, gtol));
        /* with a token routed differently anywhere, the weight gradients differ legitimately */
        int all = 0;
        MPI_Allreduce(&nskip, &all, 1, MPI_INT, MPI_SUM, s->comm);
        if (all == 0) {
            const int El = L->map.El;
            const int32_t *ids = L->map.local_ids;
            const size_t r13 = 2 * I * H * es, r2 = H * I * es;
            char *w13 = malloc((size_t)El * r13 + 16), *w2 = malloc((size_t)El * r2 + 16);
            for (int i = 0; i < El; i++) { /* this rank's experts (ascending ids, maybe not contiguous) */
                memcpy(w13 + (size_t)i * r13, (const char *)a->g.w13 + (size_t)ids[i] * r13, r13);
                memcpy(w2 + (size_t)i * r2, (const char *)a->g.w2 + (size_t)ids[i] * r2, r2);
            }
            snprintf(what, sizeof what, "%s d w13 (%d local experts)", label, El);
            CHECK(close_rows(what, s->dt, r->g.w13, w13, (size_t)El, 2 * I * H, NULL, gtol));
            snprintf(what, sizeof what, "%s d w2", label);
            CHECK(close_rows(what, s->dt, r->g.w2, w2, (size_t)El, H * I, NULL, gtol));
            free(w13);
            free(w2);
            /* the router gradient in bf16/fp16 gets 2.5x: a difference of nearly equal
             * softmax-Jacobian terms (docs/PERF.md, test_cpu_fused_ref) */
            snprintf(what, sizeof what, "%s d router", label);
            CHECK(close_rows(what, s->dt, r->g.router, a->g.router, E, H, NULL,
                             s->dt == MOE_DTYPE_F32 ? gtol : 2.5 * gtol));
            if (Is > 0 && c->arch == MOE_ARCH_LLAMA4) {
                snprintf(what, sizeof what, "%s d shared_gate", label);
                CHECK(close_rows(what, s->dt, r->g.shared_gate, a->g.shared_gate, 1, Is * H, NULL, gtol));
                snprintf(what, sizeof what, "%s d shared_up", label);
                CHECK(close_rows(what, s->dt, r->g.shared_up, a->g.shared_up, 1, Is * H, NULL, gtol));
                snprintf(what, sizeof what, "%s d shared_down", label);
                CHECK(close_rows(what, s->dt, r->g.shared_down, a->g.shared_down, 1, H * Is, NULL, gtol));
            }
        } else if (s->rank == 0) {
            fprintf(stderr, "r0 %s: weight gradients not compared (%d tokens routed differently)\n", label, all);
        }
    }
    free(skip);
    return ok;
}

/* The replicated gradients (router, shared expert) bitwise the same on every rank of comm. */
static EPT_UNUSED bool replicated_identical(const char *label, MPI_Comm comm, const ep_result *r,
                                            size_t es)
{
    bool ok = true;
    const int idx[4] = {0, 3, 4, 5};
    for (int q = 0; q < 4; q++) {
        const int i = idx[q];
        if (!r->gb[i]) continue;
        void *root = malloc(r->gb[i]);
        memcpy(root, *moe_test_grad_slot((moe_layer_grads *)&r->g, i), r->gb[i]);
        MPI_Bcast(root, (int)r->gb[i], MPI_BYTE, 0, comm);
        char what[224];
        snprintf(what, sizeof what, "%s: %s on this rank vs rank 0", label, moe_test_grad_names[i]);
        CHECK(same_bits(what, *moe_test_grad_slot((moe_layer_grads *)&r->g, i), root, r->gb[i], es));
        free(root);
    }
    return ok;
}

/* Counters from every rank's ids: a token goes once to each virtual rank owning at least one of
 * its experts; rows sent to / received from each real peer, tokens computed = rows received. */
static EPT_UNUSED bool check_counters(const char *label, const setup *s, const moe_layer *L,
                                      const int32_t *my_ids, const moe_layer_stats *st)
{
    bool ok = true;
    const int k = s->cfg.top_k, N = s->N, G = L->map.G, V = L->map.V;
    int32_t *ids = malloc((size_t)s->Tg * k * sizeof(int32_t) + 16);
    int *cnt = calloc((size_t)N, sizeof(int)), *dsp = calloc((size_t)N, sizeof(int));
    for (int r = 0; r < N; r++) {
        cnt[r] = (s->offs[r + 1] - s->offs[r]) * k;
        dsp[r] = s->offs[r] * k;
    }
    MPI_Allgatherv(my_ids, s->T * k, MPI_INT32_T, ids, cnt, dsp, MPI_INT32_T, s->comm);
    uint64_t *sent = calloc((size_t)N, 8), *recv = calloc((size_t)N, 8), tot_s = 0, tot_r = 0;
    for (int p = 0; p < N; p++)
        for (int t = s->offs[p]; t < s->offs[p + 1]; t++)
            for (int d = 0; d < G; d++) {
                bool has = false;
                for (int j = 0; j < k; j++) has |= L->map.vowner[ids[(size_t)t * k + j]] == d;
                if (!has) continue;
                if (p == s->rank) {
                    sent[d / V]++;
                    tot_s++;
                }
                if (d / V == s->rank) {
                    recv[p]++;
                    tot_r++;
                }
            }
    for (int q = 0; q < N; q++) {
        if (st->peer_rows_sent[q] != sent[q] || st->peer_rows_recv[q] != recv[q]) {
            fprintf(stderr, "rank %d: %s: peer %d: rows sent %llu (expected %llu), received %llu "
                    "(expected %llu)\n", g_rank, label, q, (unsigned long long)st->peer_rows_sent[q],
                    (unsigned long long)sent[q], (unsigned long long)st->peer_rows_recv[q],
                    (unsigned long long)recv[q]);
            ok = false;
        }
    }
    CHECK(st->rows_sent == tot_s);
    CHECK(st->rows_recv == tot_r);
    CHECK(st->tokens_computed == tot_r);
    CHECK(st->tokens_local == (uint64_t)s->T);
    free(ids);
    free(cnt);
    free(dsp);
    free(sent);
    free(recv);
    return ok;
}

/* Every rank has its own GPU (the NCCL transport over MPI_COMM_WORLD is possible). */
static EPT_UNUSED bool world_has_gpu_per_rank(void)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess) ndev = 0;
    MPI_Comm node;
    int local = 1;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
    return all_true(local <= ndev);
}

#endif /* MOE_HAVE_CUDA */

/* ------------------------------------------------------------------ main ---- */

/* The start of main(): MPI; every rank skips (or fails) together, so mpirun sees one answer:
 * then MPI is finalised and the exit code returned. Else 0, the node's cores shared between
 * its ranks, one seed, and each rank on GPU rank % GPUs. */
static inline int ept_main_begin(int *argc, char ***argv)
{
    mpi_test_init(argc, argv);
    int rc = moe_test_require_gpu(), worst = 0;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (worst != 0) {
        MPI_Finalize();
        return worst == MOE_TEST_SKIP ? MOE_TEST_SKIP : 1;
    }
#ifdef MOE_HAVE_CUDA
    mpi_test_share_cores_and_seed();
    int ndev = 0;
    cudaGetDeviceCount(&ndev);
    cudaSetDevice(ndev > 0 ? g_rank % ndev : 0);
#endif
    return 0;
}

/* main() of a test_mpi_gpu_ep*.c, its tests (cmocka_unit_test(...), ...) defined in CUDA builds
 * only. A build without CUDA never names them (it never has a usable GPU; 1 if it did). */
#ifdef MOE_HAVE_CUDA
#define EPT_MAIN(...)                                                                          \
    int main(int argc, char **argv)                                                            \
    {                                                                                          \
        int rc_ = ept_main_begin(&argc, &argv);                                                \
        if (rc_) return rc_;                                                                   \
        const struct CMUnitTest tests[] = {__VA_ARGS__};                                       \
        rc_ = cmocka_run_group_tests(tests, NULL, NULL);                                       \
        MPI_Finalize();                                                                        \
        return rc_;                                                                            \
    }
#else
#define EPT_MAIN(...)                                                                          \
    int main(int argc, char **argv)                                                            \
    {                                                                                          \
        int rc_ = ept_main_begin(&argc, &argv);                                                \
        if (rc_) return rc_;                                                                   \
        MPI_Finalize();                                                                        \
        return 1;                                                                              \
    }
#endif

#endif /* MOE_MPI_GPU_EP_TEST_H */
