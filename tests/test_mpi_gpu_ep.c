/*
 * test_mpi_gpu_ep.c — expert parallelism on the CUDA backend (src/ep/ep_cuda.c), run by ctest
 * under mpirun at -np 1, 2 and 4; every rank exits 77 (skipped) without a GPU or a CUDA build
 * unless MOE_REQUIRE_GPU=1. All ranks share the GPU(s) of the node.
 *
 * The single-rank answer is the plain fused path on the GPU (cuda_block_forward /
 * cuda_block_backward over ALL experts, all Tg tokens), which every rank computes itself from
 * the same global inputs (counter-based RNG). Each rank compares its own rows and its own
 * expert slice with what moe_ep_cuda_forward / moe_ep_cuda_backward produced (DESIGN.md
 * tolerances: global relative error AND the worst row within 10x; zero rows exactly zero).
 * Tokens whose top-k ids differ from the single-rank ones (a router-logit rounding near-tie
 * between differently sized GEMMs) are left out and counted; at most 2% may differ.
 *   virtual   rank 0 alone (MPI_COMM_SELF) plays V = 4 ranks over NCCL to itself: forward,
 *             backward, counters computed here from the ids, two runs bitwise equal;
 *   shared    all ranks on the GPU(s) over the MPI transport (host staging), N*V = 4 virtual
 *             ranks, uneven token counts (the last rank of 4 has none); also with buffers
 *             sized in advance (max_tokens_per_rank) and a receive overflow, which must fail
 *             on every rank with a clear message;
 *   nccl      more ranks than GPUs with NCCL is refused on every rank, pointing at MPI;
 *   forced    forced routing (uniform, skewed): the CUDA EP against the CPU backend's EP
 *             (moe_ep_forward / moe_ep_backward, itself tested against the double reference),
 *             counters equal;
 *   chunks    --chunks 3 (the pipelined forward: NCCL stream with V = 4 on rank 0, MPI on all
 *             ranks) against one chunk and the plain path, timeline checked; sync-free mode
 *             with chunks is refused;
 *   graph     sync-free mode (rank 0, V = 4 over NCCL, max_tokens_per_rank): the eager
 *             forward equals the plain path; captured into a CUDA graph it replays bitwise,
 *             and on new input contents it equals the plain path on them; a receive overflow
 *             raises the device flag that moe_ep_cuda_check reports.
 * Outputs are poisoned (NaN) before each run. Every verdict is agreed over all ranks.
 */
#include <math.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mpi_test.h"
#include "test_util.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "config.h"
#include "cuda/cuda_block.h"
#include "dtype.h"
#include "ep/ep.h"
#include "ep/ep_cuda.h"
#include "rng.h"
#include "weights.h"
#endif

#ifdef MOE_HAVE_CUDA
#define CHECK_CU(call)                                                                         \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "rank %d: %s:%d: %s -> %s\n", g_rank, __FILE__, __LINE__, #call,   \
                    cudaGetErrorString(e_));                                                   \
            ok = false;                                                                        \
        }                                                                                      \
    } while (0)

/* ------------------------------------------------------------------ set-up ---- */

typedef struct model_case {
    const char *name;
    moe_arch arch;
    int H, I, E, k, Is;
    moe_dtype dt;
} model_case;

/* Aligned bf16 shapes (the 16-byte paths) and odd fp32 shapes (the narrow paths). */
static const model_case k_cases[] = {
    {"qwen3 bf16", MOE_ARCH_QWEN3, 64, 48, 16, 4, 0, MOE_DTYPE_BF16},
    {"qwen3 fp32 odd", MOE_ARCH_QWEN3, 37, 23, 16, 3, 0, MOE_DTYPE_F32},
    {"llama4 bf16", MOE_ARCH_LLAMA4, 64, 32, 8, 1, 48, MOE_DTYPE_BF16},
    {"llama4 fp32 k2", MOE_ARCH_LLAMA4, 41, 19, 8, 2, 27, MOE_DTYPE_F32},
};
#define NCASES ((int)(sizeof k_cases / sizeof k_cases[0]))

static moe_config make_cfg(const model_case *m)
{
    moe_config c;
    moe_error err;
    moe_config_preset(m->arch == MOE_ARCH_QWEN3 ? "tiny-qwen3" : "tiny-llama4", &c, &err);
    c.hidden = m->H;
    c.inter = m->I;
    c.num_experts = m->E;
    c.top_k = m->k;
    c.shared_inter = m->Is;
    c.norm_topk_prob = m->arch == MOE_ARCH_QWEN3; /* a Qwen3 option only */
    c.dtype = m->dt;
    return c;
}

typedef struct setup {
    moe_config cfg;
    moe_dtype dt;
    size_t dsz;
    int Tg, T, off, N, rank, V;
    MPI_Comm comm;    /* the ranks taking part */
    int *offs;        /* [N+1] */
    void *xg, *doutg; /* [Tg,H] host */
    moe_weights wl, wf;
} setup;

static void fill_global(moe_dtype dt, const char *name, size_t n, void *buf)
{
    uint64_t s = moe_rng_stream(g_seed, name);
    for (size_t i = 0; i < n; i++) moe_store_elem(dt, buf, i, moe_rng_normal(s, (uint64_t)i));
}

/* Token split over N ranks: uneven, and with N = 4 the last rank has none. */
static void split(int Tg, int N, int *offs)
{
    offs[0] = 0;
    if (N == 1) {
        offs[1] = Tg;
        return;
    }
    int shares = 0;
    for (int r = 0; r < N; r++) shares += N == 4 && r == N - 1 ? 0 : r + 1;
    int at = 0;
    for (int r = 0; r < N; r++) {
        int n = N == 4 && r == N - 1 ? 0 : Tg * (r + 1) / shares;
        if (r == N - 1 || (N == 4 && r == N - 2)) n = Tg - at;
        offs[r + 1] = at + n;
        at += n;
        if (N == 4 && r == N - 2) break;
    }
    offs[N] = Tg;
    for (int r = 1; r <= N; r++)
        if (offs[r] < offs[r - 1]) offs[r] = offs[r - 1];
}

static bool setup_make(setup *s, MPI_Comm comm, const model_case *m, int Tg, int V)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    memset(s, 0, sizeof *s);
    s->cfg = make_cfg(m);
    s->dt = m->dt;
    s->dsz = moe_dtype_size(m->dt);
    s->Tg = Tg;
    s->V = V;
    s->comm = comm;
    MPI_Comm_size(comm, &s->N);
    MPI_Comm_rank(comm, &s->rank);
    s->offs = calloc((size_t)s->N + 1, sizeof(int));
    split(Tg, s->N, s->offs);
    s->off = s->offs[s->rank];
    s->T = s->offs[s->rank + 1] - s->off;
    size_t n = (size_t)Tg * m->H;
    s->xg = malloc(n * s->dsz);
    s->doutg = malloc(n * s->dsz);
    fill_global(s->dt, "test.gpu_ep.x", n, s->xg);
    fill_global(s->dt, "test.gpu_ep.dout", n, s->doutg);
    CHECK_ST(moe_ep_weights_random(comm, &s->cfg, g_seed, V, s->dt, &s->wl, &err));
    CHECK_ST(moe_weights_random(&s->cfg, g_seed, 0, s->cfg.num_experts, s->dt, &s->wf, &err));
    return ok;
}

static void setup_free(setup *s)
{
    free(s->offs);
    free(s->xg);
    free(s->doutg);
    moe_weights_free(&s->wl);
    moe_weights_free(&s->wf);
}

/* ------------------------------------------------------------------ device helpers ---- */

/* The helpers below use the legacy stream, which the ctx's and the blocks' non-blocking
 * streams do not wait for: they synchronise the device so what they wrote is in place (and
 * what they read is complete). */
static void *dev_upload(const void *h, size_t bytes)
{
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 16) != cudaSuccess) return NULL;
    if (bytes) cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
    return d;
}

/* A device buffer of n elements of dt, filled with NaN (an unwritten element fails). */
static void *dev_poisoned(moe_dtype dt, size_t n)
{
    size_t es = moe_dtype_size(dt);
    void *h = malloc((n ? n : 1) * es);
    for (size_t i = 0; i < n; i++) moe_store_elem(dt, h, i, NAN);
    void *d = dev_upload(h, n * es);
    free(h);
    return d;
}

static void *dev_download(const void *d, size_t bytes)
{
    void *h = malloc(bytes ? bytes : 16);
    cudaDeviceSynchronize();
    if (bytes) cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost);
    return h;
}

static double *widen(moe_dtype dt, const void *p, size_t n)
{
    double *d = malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) d[i] = moe_load_elem(dt, p, i);
    return d;
}

/* rows x cols of a (device, dt) against ref (host double), leaving out rows with skip[r]. */
static bool close_dev(const char *what, moe_dtype dt, const void *a_dev, const double *ref,
                      size_t rows, size_t cols, const bool *skip, double tol)
{
    if (rows * cols == 0) return true;
    void *h = dev_download(a_dev, rows * cols * moe_dtype_size(dt));
    double *a = widen(dt, h, rows * cols);
    double *r = malloc(rows * cols * sizeof(double));
    size_t kept = 0;
    for (size_t i = 0; i < rows; i++) {
        if (skip && skip[i]) continue;
        memcpy(a + kept * cols, a + i * cols, cols * sizeof(double));
        memcpy(r + kept * cols, ref + i * cols, cols * sizeof(double));
        kept++;
    }
    char label[160];
    snprintf(label, sizeof label, "r%d %s", g_rank, what);
    bool ok = moe_test_close(label, a, r, kept, cols, tol);
    free(h);
    free(a);
    free(r);
    return ok;
}

/* ------------------------------------------------------------------ the single-rank answer -- */

typedef struct answer {
    double *out;  /* [Tg,H] */
    int32_t *ids; /* [Tg,k] */
    double *dx;   /* [Tg,H] */
    double *d_router, *d_w13, *d_w2, *d_sg, *d_su, *d_sd;
} answer;

static void answer_free(answer *a)
{
    free(a->out);
    free(a->ids);
    free(a->dx);
    free(a->d_router);
    free(a->d_w13);
    free(a->d_w2);
    free(a->d_sg);
    free(a->d_su);
    free(a->d_sd);
    memset(a, 0, sizeof *a);
}

/* The plain fused path on this rank's GPU over all experts and all Tg tokens of x (host). */
static bool answer_plain(const setup *s, const void *x, bool backward, answer *a)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    memset(a, 0, sizeof *a);
    const moe_config *c = &s->cfg;
    size_t Tg = (size_t)s->Tg, H = (size_t)c->hidden, k = (size_t)c->top_k, es = s->dsz;
    cuda_block *b = NULL;
    CHECK_ST(cuda_block_create(&s->wf, s->Tg, backward, &b, &err));
    if (!ok) return false;
    moe_fwd_state st;
    CHECK_ST(cuda_fwd_state_alloc(b, s->Tg, backward, &st, &err));
    void *dx_in = dev_upload(x, Tg * H * es), *ddout = dev_upload(s->doutg, Tg * H * es);
    void *ddx = dev_poisoned(s->dt, Tg * H);
    CHECK_ST(cuda_block_forward(b, dx_in, s->Tg, &st, backward, &err));
    CHECK_ST(cuda_block_sync(b, &err));
    void *h = dev_download(st.out, Tg * H * es);
    a->out = widen(s->dt, h, Tg * H);
    free(h);
    a->ids = dev_download(st.topk_ids, Tg * k * 4);
    if (backward && ok) {
        cuda_block_grads g;
        moe_weights hg;
        CHECK_ST(cuda_block_grads_alloc(b, &g, &err));
        CHECK_ST(moe_weights_zeros_like(&s->wf, s->dt, &hg, &err));
        CHECK_ST(cuda_block_backward(b, dx_in, s->Tg, &st, ddout, ddx, &g, &err));
        CHECK_ST(cuda_block_sync(b, &err));
        CHECK_ST(cuda_block_grads_download(b, &g, &hg, &err));
        h = dev_download(ddx, Tg * H * es);
        a->dx = widen(s->dt, h, Tg * H);
        free(h);
        a->d_router = widen(s->dt, hg.router.data, moe_tensor_numel(&hg.router));
        a->d_w13 = widen(s->dt, hg.w13.data, moe_tensor_numel(&hg.w13));
        a->d_w2 = widen(s->dt, hg.w2.data, moe_tensor_numel(&hg.w2));
        if (c->shared_inter > 0 && c->arch == MOE_ARCH_LLAMA4) {
            a->d_sg = widen(s->dt, hg.shared_gate.data, moe_tensor_numel(&hg.shared_gate));
            a->d_su = widen(s->dt, hg.shared_up.data, moe_tensor_numel(&hg.shared_up));
            a->d_sd = widen(s->dt, hg.shared_down.data, moe_tensor_numel(&hg.shared_down));
        }
        moe_weights_free(&hg);
        cuda_block_grads_free(&g);
    }
    cudaFree(dx_in);
    cudaFree(ddout);
    cudaFree(ddx);
    cuda_fwd_state_free(&st);
    cuda_block_destroy(b);
    return ok;
}

/* ------------------------------------------------------------------ one EP run ---- */

typedef struct ep_result {
    void *out, *dx;  /* device [T,H] */
    int32_t *ids;    /* host [T,k] */
    cuda_block_grads g;
    bool have_g;
    moe_ep_stats st, st_bwd; /* the forward's and the backward's counters */
} ep_result;

static void result_free(ep_result *r)
{
    cudaFree(r->out);
    cudaFree(r->dx);
    free(r->ids);
    if (r->have_g) cuda_block_grads_free(&r->g);
    moe_ep_stats_free(&r->st);
    moe_ep_stats_free(&r->st_bwd);
    memset(r, 0, sizeof *r);
}

/* Forward (and backward) of this rank's rows of x through ctx. */
static bool run_ep(moe_ep_cuda_ctx *ctx, const setup *s, const void *xg, bool backward,
                   ep_result *r)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    memset(r, 0, sizeof *r);
    size_t T = (size_t)s->T, H = (size_t)s->cfg.hidden, k = (size_t)s->cfg.top_k, es = s->dsz;
    CHECK_ST(moe_ep_stats_init(&r->st, s->N, s->rank, s->V, &err));
    CHECK_ST(moe_ep_stats_init(&r->st_bwd, s->N, s->rank, s->V, &err));
    void *dx_in = dev_upload((const char *)xg + (size_t)s->off * H * es, T * H * es);
    void *ddout = dev_upload((const char *)s->doutg + (size_t)s->off * H * es, T * H * es);
    int32_t *dids = NULL;
    cudaMalloc((void **)&dids, T * k * 4 + 16);
    r->out = dev_poisoned(s->dt, T * H);
    CHECK_ST(moe_ep_cuda_forward(ctx, s->T, dx_in, r->out, NULL, dids, &r->st, &err));
    CHECK_ST(moe_ep_cuda_check(ctx, &err));
    r->ids = dev_download(dids, T * k * 4);
    if (backward) {
        r->dx = dev_poisoned(s->dt, T * H);
        CHECK_ST(moe_ep_cuda_grads_alloc(ctx, &r->g, &err));
        r->have_g = ok;
        if (ok) {
            /* poison the gradients: every element must be written */
            size_t El = (size_t)s->wl.expert_count, I = (size_t)s->cfg.inter;
            cudaMemset(r->g.w13, 0xff, El * 2 * I * H * es);
            cudaMemset(r->g.w2, 0xff, El * H * I * es);
            cudaMemset(r->g.router, 0xff, (size_t)s->cfg.num_experts * H * es);
            cudaDeviceSynchronize();
            CHECK_ST(moe_ep_cuda_backward(ctx, s->T, dx_in, ddout, r->dx, &r->g, &r->st_bwd, &err));
            CHECK_ST(moe_ep_cuda_check(ctx, &err));
        }
    }
    cudaFree(dx_in);
    cudaFree(ddout);
    cudaFree(dids);
    return ok;
}

/* This rank's tokens whose ids differ from the single-rank routing (left out of comparisons). */
static bool *routing_mask(const setup *s, const int32_t *ids, const answer *a, int *nskip)
{
    int k = s->cfg.top_k;
    bool *skip = calloc((size_t)s->T + 1, sizeof(bool));
    *nskip = 0;
    for (int t = 0; t < s->T; t++)
        if (memcmp(ids + (size_t)t * k, a->ids + (size_t)(s->off + t) * k, (size_t)k * 4) != 0) {
            skip[t] = true;
            (*nskip)++;
        }
    return skip;
}

/* Compare the EP result with the single-rank answer: out (and dx, this rank's expert slices,
 * the replicated gradients). */
static bool compare(const char *label, const setup *s, const ep_result *r, const answer *a,
                    bool backward)
{
    bool ok = true;
    const moe_config *c = &s->cfg;
    size_t H = (size_t)c->hidden, I = (size_t)c->inter, E = (size_t)c->num_experts,
           Is = (size_t)c->shared_inter, El = (size_t)s->wl.expert_count;
    int nskip = 0;
    bool *skip = routing_mask(s, r->ids, a, &nskip);
    if (nskip > 0)
        fprintf(stderr, "r%d %s: %d of %d tokens routed differently (logit near-tie), left out\n",
                g_rank, label, nskip, s->T);
    CHECK(nskip <= s->T / 50);
    char what[160];
    double tol = moe_test_tol(s->dt, false), gtol = moe_test_tol(s->dt, true);
    snprintf(what, sizeof what, "%s out", label);
    CHECK(close_dev(what, s->dt, r->out, a->out + (size_t)s->off * H, (size_t)s->T, H, skip, tol));
    if (backward && a->dx) {
        snprintf(what, sizeof what, "%s dx", label);
        CHECK(close_dev(what, s->dt, r->dx, a->dx + (size_t)s->off * H, (size_t)s->T, H, skip, gtol));
        /* With a token routed differently anywhere, weight gradients differ legitimately. */
        int any = nskip, all = 0;
        MPI_Allreduce(&any, &all, 1, MPI_INT, MPI_SUM, s->comm);
        if (all == 0 || s->N == 1) {
            size_t e0 = (size_t)s->wl.expert_begin;
            snprintf(what, sizeof what, "%s d w13", label);
            CHECK(close_dev(what, s->dt, r->g.w13, a->d_w13 + e0 * 2 * I * H, El, 2 * I * H, NULL, gtol));
            snprintf(what, sizeof what, "%s d w2", label);
            CHECK(close_dev(what, s->dt, r->g.w2, a->d_w2 + e0 * H * I, El, H * I, NULL, gtol));
            /* the router gradient in bf16/fp16 gets 2.5x: a difference of nearly equal
             * softmax-Jacobian terms (docs/PERF.md, test_cpu_fused_ref) */
            snprintf(what, sizeof what, "%s d router", label);
            CHECK(close_dev(what, s->dt, r->g.router, a->d_router, E, H, NULL,
                            s->dt == MOE_DTYPE_F32 ? gtol : 2.5 * gtol));
            if (a->d_sg) {
                snprintf(what, sizeof what, "%s d shared_gate", label);
                CHECK(close_dev(what, s->dt, r->g.shared_gate, a->d_sg, Is, H, NULL, gtol));
                snprintf(what, sizeof what, "%s d shared_up", label);
                CHECK(close_dev(what, s->dt, r->g.shared_up, a->d_su, Is, H, NULL, gtol));
                snprintf(what, sizeof what, "%s d shared_down", label);
                CHECK(close_dev(what, s->dt, r->g.shared_down, a->d_sd, H, Is, NULL, gtol));
            }
        }
    }
    free(skip);
    return ok;
}

/* Counters from the ids of every rank (gathered): a token goes once to each virtual rank
 * owning at least one of its experts. */
static bool check_counters(const setup *s, const int32_t *my_ids, const moe_ep_stats *st,
                           MPI_Comm comm)
{
    bool ok = true;
    int k = s->cfg.top_k, E = s->cfg.num_experts, N = s->N, V = s->V, G = N * V, epv = E / G;
    int32_t *ids = malloc((size_t)s->Tg * k * sizeof(int32_t) + 16);
    int *cnt = calloc((size_t)N, sizeof(int)), *dsp = calloc((size_t)N, sizeof(int));
    for (int r = 0; r < N; r++) {
        cnt[r] = (s->offs[r + 1] - s->offs[r]) * k;
        dsp[r] = s->offs[r] * k;
    }
    MPI_Allgatherv(my_ids, s->T * k, MPI_INT32_T, ids, cnt, dsp, MPI_INT32_T, comm);
    uint64_t *sent = calloc((size_t)N, 8), *recv = calloc((size_t)N, 8), *vs = calloc((size_t)G, 8);
    for (int p = 0; p < N; p++)
        for (int t = s->offs[p]; t < s->offs[p + 1]; t++)
            for (int d = 0; d < G; d++) {
                bool has = false;
                for (int j = 0; j < k; j++) has |= ids[(size_t)t * k + j] / epv == d;
                if (!has) continue;
                if (p == s->rank) {
                    sent[d / V]++;
                    vs[d]++;
                }
                if (d / V == s->rank) recv[p]++;
            }
    for (int q = 0; q < N; q++) {
        CHECK(st->tokens_sent[q] == sent[q]);
        CHECK(st->tokens_recv[q] == recv[q]);
    }
    for (int d = 0; d < G; d++) CHECK(st->vtokens_sent[d] == vs[d]);
    CHECK(st->tokens_local == (uint64_t)s->T);
    free(ids);
    free(cnt);
    free(dsp);
    free(sent);
    free(recv);
    free(vs);
    return ok;
}

/* ------------------------------------------------------------------ tests ---- */

/* Rank 0 alone plays V = 4 ranks over NCCL to itself: equal to the plain fused path. */
static void test_virtual_nccl(void **state)
{
    (void)state;
    bool ok = true;
    if (g_rank == 0) {
        for (int m = 0; m < NCASES; m++) {
            moe_error err;
            moe_error_clear(&err);
            setup s;
            ok &= setup_make(&s, MPI_COMM_SELF, &k_cases[m], 96, 4);
            answer a;
            ok &= answer_plain(&s, s.xg, true, &a);
            moe_ep_options o = MOE_EP_OPTIONS_INIT;
            o.transport = MOE_EP_TRANSPORT_NCCL;
            o.virtual_ranks = 4;
            o.device = 0;
            moe_ep_cuda_ctx *ctx = NULL;
            CHECK_ST(moe_ep_cuda_ctx_create(MPI_COMM_SELF, &s.wl, &o, &ctx, &err));
            if (ctx) {
                CHECK(strcmp(moe_ep_cuda_transport(ctx), "nccl") == 0);
                ep_result r, r2;
                char label[96];
                snprintf(label, sizeof label, "virtual V=4 nccl %s", k_cases[m].name);
                ok &= run_ep(ctx, &s, s.xg, true, &r);
                ok &= compare(label, &s, &r, &a, true);
                ok &= check_counters(&s, r.ids, &r.st, MPI_COMM_SELF);
                ok &= check_counters(&s, r.ids, &r.st_bwd, MPI_COMM_SELF);
                /* the same call again: bitwise the same output */
                ok &= run_ep(ctx, &s, s.xg, false, &r2);
                size_t bytes = (size_t)s.T * s.cfg.hidden * s.dsz;
                void *o1 = dev_download(r.out, bytes), *o2 = dev_download(r2.out, bytes);
                CHECK(memcmp(o1, o2, bytes) == 0);
                free(o1);
                free(o2);
                result_free(&r);
                result_free(&r2);
                moe_ep_cuda_ctx_destroy(ctx);
            }
            fprintf(stderr, "r0 virtual V=4 nccl %s: %s\n", k_cases[m].name, ok ? "ok" : "FAILED");
            answer_free(&a);
            setup_free(&s);
        }
    }
    assert_true(all_true(ok));
}

/* Every rank on the shared GPU(s) over the MPI transport; N*V = 4. */
static void test_shared_gpu_mpi(void **state)
{
    (void)state;
    bool ok = true;
    int V = 4 / (g_size <= 4 ? g_size : 4);
    if (V < 1) V = 1;
    for (int m = 0; m < NCASES; m++) {
        moe_error err;
        moe_error_clear(&err);
        setup s;
        ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[m], 61, V);
        answer a;
        ok &= answer_plain(&s, s.xg, true, &a);
        for (int sized = 0; sized < 2; sized++) {
            moe_ep_options o = MOE_EP_OPTIONS_INIT;
            o.transport = MOE_EP_TRANSPORT_MPI;
            o.virtual_ranks = V;
            if (sized) o.max_tokens_per_rank = 61;
            moe_ep_cuda_ctx *ctx = NULL;
            CHECK_ST(moe_ep_cuda_ctx_create(MPI_COMM_WORLD, &s.wl, &o, &ctx, &err));
            if (!ctx) continue;
            CHECK(strcmp(moe_ep_cuda_transport(ctx), "mpi") == 0);
            ep_result r;
            char label[128];
            snprintf(label, sizeof label, "np=%d V=%d mpi%s %s", g_size, V,
                     sized ? " max_tokens_per_rank" : "", k_cases[m].name);
            ok &= run_ep(ctx, &s, s.xg, true, &r);
            ok &= compare(label, &s, &r, &a, true);
            ok &= check_counters(&s, r.ids, &r.st, MPI_COMM_WORLD);
            ok &= check_counters(&s, r.ids, &r.st_bwd, MPI_COMM_WORLD);
            result_free(&r);
            moe_ep_cuda_ctx_destroy(ctx);
            if (g_rank == 0)
                fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
        }
        answer_free(&a);
        setup_free(&s);
    }
    assert_true(all_true(ok));
}

/* Buffers sized in advance (MPI) and a receive bound that is too small: every rank fails with
 * the overflow message before any payload moves, and nothing is written to out. */
static void test_overflow_mpi(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    setup s;
    ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[0], 61, 4 / g_size > 0 ? 4 / g_size : 1);
    moe_ep_options o = MOE_EP_OPTIONS_INIT;
    o.transport = MOE_EP_TRANSPORT_MPI;
    o.virtual_ranks = s.V;
    o.max_tokens_per_rank = 61;
    o.max_recv_tokens = 2;
    moe_ep_cuda_ctx *ctx = NULL;
    CHECK_ST(moe_ep_cuda_ctx_create(MPI_COMM_WORLD, &s.wl, &o, &ctx, &err));
    if (ctx) {
        size_t H = (size_t)s.cfg.hidden;
        void *x = dev_upload((const char *)s.xg + (size_t)s.off * H * s.dsz, (size_t)s.T * H * s.dsz);
        void *out = dev_poisoned(s.dt, (size_t)s.T * H);
        moe_status st = moe_ep_cuda_forward(ctx, s.T, x, out, NULL, NULL, NULL, &err);
        CHECK(st == MOE_ERR_INVALID_ARG);
        CHECK(strstr(err.msg, "overflow") != NULL);
        if (g_rank == 0) fprintf(stderr, "r0 expected overflow: %s\n", err.msg);
        /* T beyond max_tokens_per_rank on one rank only: every rank fails */
        moe_error_clear(&err);
        st = moe_ep_cuda_forward(ctx, g_rank == 0 ? 62 : s.T, x, out, NULL, NULL, NULL, &err);
        CHECK(st == MOE_ERR_INVALID_ARG);
        CHECK(strstr(err.msg, "max_tokens_per_rank") != NULL);
        cudaFree(x);
        cudaFree(out);
        moe_ep_cuda_ctx_destroy(ctx);
    }
    setup_free(&s);
    assert_true(all_true(ok));
}

/* One chunked case: a C = 3 ctx against a C = 1 ctx with the same options (and against the
 * single-rank answer a): routing equal, output within tolerance (bitwise equality reported,
 * not required: the grouped GEMM may pick another kernel for fewer rows), a second call
 * bitwise equal to the first, counters from the ids, and the timeline: 3 chunks whose tokens
 * add up to T and, on the NCCL stream, dispatch <= compute <= combine per chunk. The backward
 * (one chunk) of the chunked ctx matches too. */
static bool chunks_case(const setup *s, MPI_Comm comm, moe_ep_options o, const answer *a,
                        const char *label)
{
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    moe_ep_cuda_ctx *c1 = NULL, *c3 = NULL;
    o.chunks = 1;
    CHECK_ST(moe_ep_cuda_ctx_create(comm, &s->wl, &o, &c1, &err));
    o.chunks = 3;
    CHECK_ST(moe_ep_cuda_ctx_create(comm, &s->wl, &o, &c3, &err));
    if (c1 && c3) {
        bool nccl = strcmp(moe_ep_cuda_transport(c3), "nccl") == 0;
        ep_result r1, r3, r3b;
        ok &= run_ep(c1, s, s->xg, false, &r1);
        ok &= run_ep(c3, s, s->xg, true, &r3);
        ok &= run_ep(c3, s, s->xg, false, &r3b);
        ok &= compare(label, s, &r3, a, true);
        ok &= check_counters(s, r3.ids, &r3.st, comm);
        size_t T = (size_t)s->T, H = (size_t)s->cfg.hidden, k = (size_t)s->cfg.top_k;
        size_t bytes = T * H * s->dsz;
        CHECK(memcmp(r1.ids, r3.ids, T * k * 4) == 0);
        void *o1 = dev_download(r1.out, bytes), *o3 = dev_download(r3.out, bytes),
             *o3b = dev_download(r3b.out, bytes);
        bool bitwise = memcmp(o1, o3, bytes) == 0;
        CHECK(memcmp(o3, o3b, bytes) == 0);
        double *w1 = widen(s->dt, o1, T * H), *w3 = widen(s->dt, o3, T * H);
        char what[160];
        snprintf(what, sizeof what, "r%d %s: C=3 vs C=1", g_rank, label);
        CHECK(moe_test_close(what, w3, w1, T, H, moe_test_tol(s->dt, false)));
        fprintf(stderr, "r%d %s: C=3 %s C=1\n", g_rank, label,
                bitwise ? "bitwise equal to" : "within tolerance of (not bitwise)");
        const moe_ep_stats *st = &r3.st;
        CHECK(st->nchunks == 3 && st->timeline != NULL);
        if (st->nchunks == 3 && st->timeline) {
            int64_t tok = 0;
            const double eps = 1e-6;
            for (int i = 0; i < 3; i++) {
                const moe_ep_chunk_times *t = &st->timeline[i];
                tok += t->tokens;
                CHECK(t->compute_begin <= t->compute_end + eps);
                CHECK(t->dispatch_post <= t->dispatch_done + eps);
                CHECK(t->combine_post <= t->combine_done + eps);
                CHECK(t->combine_done > 0);
                if (nccl) {
                    CHECK(t->dispatch_done <= t->compute_begin + eps);
                    CHECK(t->compute_end <= t->combine_post + eps);
                }
            }
            CHECK(tok == (int64_t)s->T);
            if (g_rank == 0)
                for (int i = 0; i < 3; i++) {
                    const moe_ep_chunk_times *t = &st->timeline[i];
                    fprintf(stderr, "r0 %s chunk %d: %lld tokens, dispatch %.3f-%.3f compute "
                            "%.3f-%.3f combine %.3f-%.3f ms\n", label, i, (long long)t->tokens,
                            1e3 * t->dispatch_post, 1e3 * t->dispatch_done, 1e3 * t->compute_begin,
                            1e3 * t->compute_end, 1e3 * t->combine_post, 1e3 * t->combine_done);
                }
        }
        free(o1);
        free(o3);
        free(o3b);
        free(w1);
        free(w3);
        result_free(&r1);
        result_free(&r3);
        result_free(&r3b);
    }
    moe_ep_cuda_ctx_destroy(c1);
    moe_ep_cuda_ctx_destroy(c3);
    return ok;
}

/* --chunks 3 on the CUDA backend: rank 0 alone with V = 4 over NCCL (the communication
 * stream), then every rank over MPI (N*V = 4, the last of 4 ranks with no tokens), both
 * architectures; sync-free mode with chunks is refused. */
static void test_chunks(void **state)
{
    (void)state;
    bool ok = true;
    int V = 4 / g_size > 0 ? 4 / g_size : 1;
    for (int m = 0; m < NCASES; m++) {
        moe_error err;
        moe_error_clear(&err);
        char label[128];
        if (g_rank == 0) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_SELF, &k_cases[m], 96, 4);
            answer a;
            ok &= answer_plain(&s, s.xg, true, &a);
            moe_ep_options o = MOE_EP_OPTIONS_INIT;
            o.transport = MOE_EP_TRANSPORT_NCCL;
            o.virtual_ranks = 4;
            o.device = 0;
            snprintf(label, sizeof label, "chunks V=4 nccl %s", k_cases[m].name);
            ok &= chunks_case(&s, MPI_COMM_SELF, o, &a, label);
            if (m == 0) {
                moe_ep_cuda_ctx *ctx = NULL;
                o.chunks = 2;
                o.max_tokens_per_rank = 96;
                CHECK(moe_ep_cuda_ctx_create(MPI_COMM_SELF, &s.wl, &o, &ctx, &err) == MOE_ERR_UNSUPPORTED);
                CHECK(ctx == NULL && strstr(err.msg, "chunks") != NULL);
            }
            fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
            answer_free(&a);
            setup_free(&s);
        }
        setup s;
        ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[m], 61, V);
        answer a;
        ok &= answer_plain(&s, s.xg, true, &a);
        moe_ep_options o = MOE_EP_OPTIONS_INIT;
        o.transport = MOE_EP_TRANSPORT_MPI;
        o.virtual_ranks = V;
        snprintf(label, sizeof label, "chunks np=%d V=%d mpi %s", g_size, V, k_cases[m].name);
        ok &= chunks_case(&s, MPI_COMM_WORLD, o, &a, label);
        if (g_rank == 0) fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
        answer_free(&a);
        setup_free(&s);
    }
    assert_true(all_true(ok));
}

/* NCCL with more ranks on the node than GPUs: refused on every rank, pointing at MPI. */
static void test_nccl_refused(void **state)
{
    (void)state;
    bool ok = true;
    int ndev = 0;
    cudaGetDeviceCount(&ndev);
    MPI_Comm node;
    int local = 1;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
    if (local > ndev) {
        moe_error err;
        moe_error_clear(&err);
        setup s;
        ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[0], 16, 4 / g_size > 0 ? 4 / g_size : 1);
        moe_ep_options o = MOE_EP_OPTIONS_INIT;
        o.transport = MOE_EP_TRANSPORT_NCCL;
        o.virtual_ranks = s.V;
        moe_ep_cuda_ctx *ctx = NULL;
        moe_status st = moe_ep_cuda_ctx_create(MPI_COMM_WORLD, &s.wl, &o, &ctx, &err);
        CHECK(st == MOE_ERR_UNSUPPORTED && ctx == NULL);
        CHECK(strstr(err.msg, "--transport mpi") != NULL);
        if (g_rank == 0) fprintf(stderr, "r0 expected refusal: %s\n", err.msg);
        /* AUTO picks MPI there */
        o.transport = MOE_EP_TRANSPORT_AUTO;
        moe_error_clear(&err);
        CHECK_ST(moe_ep_cuda_ctx_create(MPI_COMM_WORLD, &s.wl, &o, &ctx, &err));
        if (ctx) {
            CHECK(strcmp(moe_ep_cuda_transport(ctx), "mpi") == 0);
            moe_ep_cuda_ctx_destroy(ctx);
        }
        setup_free(&s);
    }
    assert_true(all_true(ok));
}

/* Forced routing: the CUDA EP against the CPU backend's EP with the same options. */
static void test_forced_vs_cpu(void **state)
{
    (void)state;
    bool ok = true;
    const char *routes[2] = {"uniform", "skewed"};
    int V = 4 / g_size > 0 ? 4 / g_size : 1;
    for (int m = 0; m < NCASES; m += 2) { /* one Qwen3 (bf16) and one Llama-4 (bf16) case */
        for (int ri = 0; ri < 2; ri++) {
            moe_error err;
            moe_error_clear(&err);
            setup s;
            ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[m], 61, V);
            moe_ep_options o = MOE_EP_OPTIONS_INIT;
            o.transport = MOE_EP_TRANSPORT_MPI;
            o.virtual_ranks = V;
            CHECK_ST(moe_ep_route_parse(routes[ri], s.cfg.num_experts, s.cfg.top_k, &o.route, &err));
            /* the CPU backend's answer */
            moe_ep_ctx *cpu = NULL;
            size_t T = (size_t)s.T, H = (size_t)s.cfg.hidden, es = s.dsz;
            const char *xl = (const char *)s.xg + (size_t)s.off * H * es;
            const char *dl = (const char *)s.doutg + (size_t)s.off * H * es;
            void *cout = malloc(T * H * es + 16), *cdx = malloc(T * H * es + 16);
            moe_weights cg;
            moe_ep_stats cst;
            CHECK_ST(moe_ep_stats_init(&cst, s.N, s.rank, V, &err));
            CHECK_ST(moe_weights_zeros_like(&s.wl, s.dt, &cg, &err));
            CHECK_ST(moe_ep_ctx_create(MPI_COMM_WORLD, &s.wl, &o, &cpu, &err));
            if (cpu) {
                CHECK_ST(moe_ep_forward(cpu, s.T, xl, cout, NULL, NULL, &cst, &err));
                CHECK_ST(moe_ep_backward(cpu, s.T, xl, dl, cdx, &cg, NULL, &err));
                moe_ep_ctx_destroy(cpu);
            }
            moe_ep_cuda_ctx *ctx = NULL;
            CHECK_ST(moe_ep_cuda_ctx_create(MPI_COMM_WORLD, &s.wl, &o, &ctx, &err));
            if (ctx) {
                ep_result r;
                ok &= run_ep(ctx, &s, s.xg, true, &r);
                double tol = moe_test_tol(s.dt, false), gtol = moe_test_tol(s.dt, true);
                double *ref = widen(s.dt, cout, T * H);
                char what[128];
                snprintf(what, sizeof what, "forced %s %s out vs CPU EP", routes[ri], k_cases[m].name);
                CHECK(close_dev(what, s.dt, r.out, ref, T, H, NULL, tol));
                free(ref);
                ref = widen(s.dt, cdx, T * H);
                snprintf(what, sizeof what, "forced %s %s dx vs CPU EP", routes[ri], k_cases[m].name);
                CHECK(close_dev(what, s.dt, r.dx, ref, T, H, NULL, gtol));
                free(ref);
                size_t El = (size_t)s.wl.expert_count, I = (size_t)s.cfg.inter;
                ref = widen(s.dt, cg.w13.data, El * 2 * I * H);
                snprintf(what, sizeof what, "forced %s %s d w13 vs CPU EP", routes[ri], k_cases[m].name);
                CHECK(close_dev(what, s.dt, r.g.w13, ref, El, 2 * I * H, NULL, gtol));
                free(ref);
                ref = widen(s.dt, cg.router.data, (size_t)s.cfg.num_experts * H);
                snprintf(what, sizeof what, "forced %s %s d router vs CPU EP", routes[ri], k_cases[m].name);
                CHECK(close_dev(what, s.dt, r.g.router, ref, (size_t)s.cfg.num_experts, H, NULL,
                                s.dt == MOE_DTYPE_F32 ? gtol : 2.5 * gtol));
                free(ref);
                /* the same rows travelled: the counters equal the CPU backend's */
                for (int q = 0; q < s.N; q++) {
                    CHECK(r.st.tokens_sent[q] == cst.tokens_sent[q]);
                    CHECK(r.st.tokens_recv[q] == cst.tokens_recv[q]);
                    CHECK(r.st.bytes_sent[q] == cst.bytes_sent[q]);
                    CHECK(r.st_bwd.tokens_sent[q] == cst.tokens_sent[q]);
                    CHECK(r.st_bwd.tokens_recv[q] == cst.tokens_recv[q]);
                }
                result_free(&r);
                moe_ep_cuda_ctx_destroy(ctx);
            }
            if (g_rank == 0)
                fprintf(stderr, "r0 forced %s %s vs CPU EP: %s\n", routes[ri], k_cases[m].name,
                        ok ? "ok" : "FAILED");
            free(cout);
            free(cdx);
            moe_weights_free(&cg);
            moe_ep_stats_free(&cst);
            free((void *)o.route.ids);
            setup_free(&s);
        }
    }
    assert_true(all_true(ok));
}

/* Sync-free mode on rank 0 (V = 4 over NCCL): eager == plain, graph replay bitwise, graph on
 * new input == plain on it, overflow flag. */
static void test_syncfree_graph(void **state)
{
    (void)state;
    bool ok = true;
    if (g_rank == 0) {
        for (int m = 0; m < NCASES; m += 2) {
            moe_error err;
            moe_error_clear(&err);
            setup s;
            const int T = 128;
            ok &= setup_make(&s, MPI_COMM_SELF, &k_cases[m], T, 4);
            size_t H = (size_t)s.cfg.hidden, es = s.dsz, bytes = (size_t)T * H * es;
            answer a, a2;
            ok &= answer_plain(&s, s.xg, false, &a);
            void *x2h = malloc(bytes);
            fill_global(s.dt, "test.gpu_ep.x2", (size_t)T * H, x2h);
            ok &= answer_plain(&s, x2h, false, &a2);
            moe_ep_options o = MOE_EP_OPTIONS_INIT;
            o.transport = MOE_EP_TRANSPORT_NCCL;
            o.virtual_ranks = 4;
            o.device = 0;
            o.max_tokens_per_rank = T;
            moe_ep_cuda_ctx *ctx = NULL;
            CHECK_ST(moe_ep_cuda_ctx_create(MPI_COMM_SELF, &s.wl, &o, &ctx, &err));
            if (ctx) {
                CHECK(moe_ep_cuda_syncfree(ctx));
                cudaStream_t st = moe_ep_cuda_stream(ctx);
                void *x = dev_upload(s.xg, bytes), *out = dev_poisoned(s.dt, (size_t)T * H);
                int32_t *ids = NULL;
                cudaMalloc((void **)&ids, (size_t)T * s.cfg.top_k * 4);
                char label[128];
                /* eager */
                CHECK_ST(moe_ep_cuda_forward(ctx, T, x, out, NULL, ids, NULL, &err));
                CHECK_ST(moe_ep_cuda_check(ctx, &err));
                ep_result r;
                memset(&r, 0, sizeof r);
                r.out = out;
                r.ids = dev_download(ids, (size_t)T * s.cfg.top_k * 4);
                snprintf(label, sizeof label, "sync-free eager %s", k_cases[m].name);
                ok &= compare(label, &s, &r, &a, false);
                free(r.ids);
                void *eager = dev_download(out, bytes);
                /* capture, poison, replay */
                cudaGraph_t g = NULL;
                cudaGraphExec_t ge = NULL;
                CHECK_CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
                moe_status cs = moe_ep_cuda_forward(ctx, T, x, out, NULL, ids, NULL, &err);
                CHECK_CU(cudaStreamEndCapture(st, &g));
                if (cs != MOE_OK) {
                    fprintf(stderr, "r0 forward under capture: %s\n", err.msg);
                    ok = false;
                }
                if (ok) CHECK_CU(cudaGraphInstantiate(&ge, g, 0));
                if (ok && ge) {
                    cudaMemset(out, 0xff, bytes);
                    cudaDeviceSynchronize();
                    CHECK_CU(cudaGraphLaunch(ge, st));
                    CHECK_ST(moe_ep_cuda_check(ctx, &err));
                    void *rep = dev_download(out, bytes);
                    CHECK(memcmp(rep, eager, bytes) == 0);
                    free(rep);
                    /* new contents in the same buffer, replay again */
                    cudaMemcpy(x, x2h, bytes, cudaMemcpyHostToDevice);
                    cudaMemset(out, 0xff, bytes);
                    cudaDeviceSynchronize();
                    CHECK_CU(cudaGraphLaunch(ge, st));
                    CHECK_ST(moe_ep_cuda_check(ctx, &err));
                    r.ids = dev_download(ids, (size_t)T * s.cfg.top_k * 4);
                    snprintf(label, sizeof label, "sync-free graph replay, new x, %s", k_cases[m].name);
                    ok &= compare(label, &s, &r, &a2, false);
                    free(r.ids);
                    /* a few more replays: the same every time */
                    void *first = dev_download(out, bytes);
                    for (int i = 0; i < 3; i++) CHECK_CU(cudaGraphLaunch(ge, st));
                    CHECK_ST(moe_ep_cuda_check(ctx, &err));
                    void *later = dev_download(out, bytes);
                    CHECK(memcmp(first, later, bytes) == 0);
                    free(first);
                    free(later);
                }
                if (ge) cudaGraphExecDestroy(ge);
                if (g) cudaGraphDestroy(g);
                free(eager);
                cudaFree(x);
                cudaFree(out);
                cudaFree(ids);
                moe_ep_cuda_ctx_destroy(ctx);
            }
            /* a receive bound below what arrives: the device flag, reported by the check */
            o.max_recv_tokens = T / 4;
            ctx = NULL;
            CHECK_ST(moe_ep_cuda_ctx_create(MPI_COMM_SELF, &s.wl, &o, &ctx, &err));
            if (ctx) {
                void *x = dev_upload(s.xg, bytes), *out = dev_poisoned(s.dt, (size_t)T * H);
                CHECK_ST(moe_ep_cuda_forward(ctx, T, x, out, NULL, NULL, NULL, &err));
                moe_error_clear(&err);
                moe_status cs = moe_ep_cuda_check(ctx, &err);
                CHECK(cs == MOE_ERR_INVALID_ARG && strstr(err.msg, "overflow") != NULL);
                fprintf(stderr, "r0 expected sync-free overflow: %s\n", err.msg);
                moe_error_clear(&err);
                CHECK_ST(moe_ep_cuda_check(ctx, &err)); /* the flag was cleared */
                cudaFree(x);
                cudaFree(out);
                moe_ep_cuda_ctx_destroy(ctx);
            }
            fprintf(stderr, "r0 sync-free + graph %s: %s\n", k_cases[m].name, ok ? "ok" : "FAILED");
            free(x2h);
            answer_free(&a);
            answer_free(&a2);
            setup_free(&s);
        }
    }
    assert_true(all_true(ok));
}

/* MOE_EP_TIMING=1 (np 1 only, run alone): a Qwen3-like block (H=2048, I=768, E=32, k=8, bf16,
 * T=2048): the plain fused path against the EP forward with 4 virtual ranks — sized (NCCL
 * and MPI), sync-free eager, and the sync-free forward replayed from a CUDA graph. Medians of
 * 20 calls after 3 warm-ups; wall clock around each call including its synchronisation (the
 * plain path and the graph: CUDA events on their stream). Each result is checked against the
 * plain path. */
static double median(double *v, int n)
{
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
            double t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
    return v[n / 2];
}

static void test_timing(void **state)
{
    (void)state;
    bool ok = true;
    moe_error err;
    moe_error_clear(&err);
    const model_case big = {"qwen3-like E=32", MOE_ARCH_QWEN3, 2048, 768, 32, 8, 0, MOE_DTYPE_BF16};
    const int T = 2048, W = 3, NT = 20;
    setup s;
    ok &= setup_make(&s, MPI_COMM_SELF, &big, T, 4);
    size_t H = (size_t)big.H, bytes = (size_t)T * H * 2;
    answer a;
    ok &= answer_plain(&s, s.xg, false, &a);
    double ms[NT];
    /* plain */
    {
        cuda_block *b = NULL;
        CHECK_ST(cuda_block_create(&s.wf, T, false, &b, &err));
        moe_fwd_state st;
        memset(&st, 0, sizeof st);
        st.T = T;
        void *x = dev_upload(s.xg, bytes), *out = dev_poisoned(s.dt, (size_t)T * H);
        st.out = out;
        cudaEvent_t e0, e1;
        cudaEventCreate(&e0);
        cudaEventCreate(&e1);
        cudaStream_t str = cuda_block_stream(b);
        for (int i = 0; i < W + NT; i++) {
            cudaEventRecord(e0, str);
            CHECK_ST(cuda_block_forward(b, x, T, &st, false, &err));
            cudaEventRecord(e1, str);
            cudaEventSynchronize(e1);
            float f = 0;
            cudaEventElapsedTime(&f, e0, e1);
            if (i >= W) ms[i - W] = f;
        }
        fprintf(stderr, "timing %s T=%d: plain fused path (cuda_block_forward): %.3f ms\n",
                big.name, T, median(ms, NT));
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
        cudaFree(x);
        cudaFree(out);
        cuda_block_destroy(b);
    }
    struct {
        const char *name;
        moe_ep_transport_kind tp;
        int64_t M;
        bool graph;
    } modes[] = {
        {"EP V=4 nccl, sized per call (counts to the host)", MOE_EP_TRANSPORT_NCCL, 0, false},
        {"EP V=4 mpi (host staging), sized per call", MOE_EP_TRANSPORT_MPI, 0, false},
        {"EP V=4 nccl, sync-free, eager", MOE_EP_TRANSPORT_NCCL, T, false},
        {"EP V=4 nccl, sync-free, CUDA graph replay", MOE_EP_TRANSPORT_NCCL, T, true},
    };
    for (size_t mi = 0; mi < sizeof modes / sizeof modes[0]; mi++) {
        moe_ep_options o = MOE_EP_OPTIONS_INIT;
        o.transport = modes[mi].tp;
        o.virtual_ranks = 4;
        o.device = 0;
        o.max_tokens_per_rank = modes[mi].M;
        moe_ep_cuda_ctx *ctx = NULL;
        CHECK_ST(moe_ep_cuda_ctx_create(MPI_COMM_SELF, &s.wl, &o, &ctx, &err));
        if (!ctx) continue;
        cudaStream_t str = moe_ep_cuda_stream(ctx);
        void *x = dev_upload(s.xg, bytes), *out = dev_poisoned(s.dt, (size_t)T * H);
        cudaGraph_t g = NULL;
        cudaGraphExec_t ge = NULL;
        CHECK_ST(moe_ep_cuda_forward(ctx, T, x, out, NULL, NULL, NULL, &err));
        CHECK_ST(moe_ep_cuda_check(ctx, &err));
        if (modes[mi].graph) {
            CHECK_CU(cudaStreamBeginCapture(str, cudaStreamCaptureModeThreadLocal));
            CHECK_ST(moe_ep_cuda_forward(ctx, T, x, out, NULL, NULL, NULL, &err));
            CHECK_CU(cudaStreamEndCapture(str, &g));
            if (ok) CHECK_CU(cudaGraphInstantiate(&ge, g, 0));
        }
        cudaEvent_t e0, e1;
        cudaEventCreate(&e0);
        cudaEventCreate(&e1);
        for (int i = 0; i < W + NT && ok; i++) {
            if (ge) {
                cudaEventRecord(e0, str);
                CHECK_CU(cudaGraphLaunch(ge, str));
                cudaEventRecord(e1, str);
                cudaEventSynchronize(e1);
                float f = 0;
                cudaEventElapsedTime(&f, e0, e1);
                if (i >= W) ms[i - W] = f;
            } else {
                double t0 = moe_now();
                CHECK_ST(moe_ep_cuda_forward(ctx, T, x, out, NULL, NULL, NULL, &err));
                CHECK_ST(moe_ep_cuda_check(ctx, &err));
                if (i >= W) ms[i - W] = 1e3 * (moe_now() - t0);
            }
        }
        CHECK_ST(moe_ep_cuda_check(ctx, &err));
        if (ok) {
            fprintf(stderr, "timing %s T=%d: %s: %.3f ms\n", big.name, T, modes[mi].name,
                    median(ms, NT));
            ep_result r;
            memset(&r, 0, sizeof r);
            r.out = out;
            r.ids = malloc((size_t)T * big.k * 4);
            memcpy(r.ids, a.ids, (size_t)T * big.k * 4); /* out only; routing checked elsewhere */
            ok &= compare(modes[mi].name, &s, &r, &a, false);
            free(r.ids);
        }
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
        if (ge) cudaGraphExecDestroy(ge);
        if (g) cudaGraphDestroy(g);
        cudaFree(x);
        cudaFree(out);
        moe_ep_cuda_ctx_destroy(ctx);
    }
    answer_free(&a);
    setup_free(&s);
    assert_true(ok);
}

#endif /* MOE_HAVE_CUDA */

int main(int argc, char **argv)
{
    mpi_test_init(&argc, &argv);
    /* Every rank skips (or fails) together, so mpirun sees one answer. */
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
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_virtual_nccl),   cmocka_unit_test(test_shared_gpu_mpi),
        cmocka_unit_test(test_overflow_mpi),   cmocka_unit_test(test_nccl_refused),
        cmocka_unit_test(test_forced_vs_cpu),  cmocka_unit_test(test_syncfree_graph),
        cmocka_unit_test(test_chunks),
    };
    const char *tm = getenv("MOE_EP_TIMING");
    if (tm && strcmp(tm, "1") == 0 && g_size == 1) {
        const struct CMUnitTest timing[] = {cmocka_unit_test(test_timing)};
        rc = cmocka_run_group_tests(timing, NULL, NULL);
    } else {
        rc = cmocka_run_group_tests(tests, NULL, NULL);
    }
    MPI_Finalize();
    return rc;
#else
    MPI_Finalize();
    return 1;
#endif
}
