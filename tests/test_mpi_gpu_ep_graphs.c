/*
 * test_mpi_gpu_ep_graphs.c — the expert-parallel CUDA layer in its sync-free mode (the NCCL
 * transport with max_tokens_per_rank: counts stay on the device, nothing waits for the host)
 * captured into CUDA graphs, and the replicated gradients; run by ctest under mpirun at -np 1,
 * 2 and 4 (exit 77 without a GPU unless MOE_REQUIRE_GPU=1).
 *   forward   rank 0 alone, V = 4 over NCCL (and over MPI_COMM_WORLD where every rank has its
 *             own GPU, T = 0 on the last of 4 ranks): the eager sync-free forward against the
 *             single-rank answer; captured (moe_layer_forward_async on the caller's stream),
 *             replayed on the eager inputs and on new contents of the same buffers: out and
 *             router logits bitwise the eager forward's on those inputs (which equals the
 *             answer on them), again after more replays;
 *   backward  the new requirement: the sync-free backward (V = 4, max_tokens_per_rank)
 *             captured the same way (moe_layer_backward_async), replayed on the eager inputs
 *             and on new x and dout: dx and every gradient bitwise the eager backward's, which
 *             matches the answer; the replicated gradients (router, shared expert) identical on
 *             every rank;
 *   overflow  a receive bound (max_recv_tokens) below what arrives: the sync-free forward and
 *             backward raise the device flag that moe_layer_check_errors reports as
 *             MOE_ERR_OVERFLOW (with the rows that arrived), once; T beyond
 *             max_tokens_per_rank is refused (MOE_ERR_OVERFLOW) before anything runs, and the
 *             layer works afterwards;
 *   order     (np > 1) the replicated gradients summed in rank order, identical on every rank:
 *             in fp32, each rank's partial is what the layer returns when only that rank brings
 *             tokens (the others T = 0), and the gradients of the whole batch are bitwise the
 *             fp32 sum of those partials in ascending rank order; over MPI (ranks sharing the
 *             GPU), and over NCCL sync-free where every rank has its own GPU.
 * Expected runtime on an H100: ~15 s at np 1, ~30 s at np 4 (one GPU shared).
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_gpu_ep_test.h"
#include "mpi_test.h"
#include "test_util.h"

#ifdef MOE_HAVE_CUDA

/* Device copies of one run's inputs and outputs. */
typedef struct dbufs {
    void *x, *dout, *out, *lg, *dx;
    moe_layer_grads g;
    size_t gb[6];
} dbufs;

static void dbufs_alloc(const moe_layer *L, const setup *s, dbufs *b)
{
    const size_t T = s->T, H = s->cfg.hidden, E = s->cfg.num_experts, es = s->dsz;
    memset(b, 0, sizeof *b);
    b->x = dev_poisoned(T * H * es);
    b->dout = dev_poisoned(T * H * es);
    b->out = dev_poisoned(T * H * es);
    b->lg = dev_poisoned(T * E * es);
    b->dx = dev_poisoned(T * H * es);
    grad_bytes(L, b->gb);
    for (int i = 0; i < 6; i++)
        if (b->gb[i]) *moe_test_grad_slot(&b->g, i) = dev_poisoned(b->gb[i]);
}

static void dbufs_free(dbufs *b)
{
    void *p[5] = {b->x, b->dout, b->out, b->lg, b->dx};
    for (int i = 0; i < 5; i++) cudaFree(p[i]);
    for (int i = 0; i < 6; i++) cudaFree(*moe_test_grad_slot(&b->g, i));
}

static void dbufs_inputs(const setup *s, dbufs *b, const void *xg, const void *doutg)
{
    const size_t T = s->T, H = s->cfg.hidden, es = s->dsz;
    dev_copy_in(b->x, mine(s, xg, H), T * H * es);
    dev_copy_in(b->dout, mine(s, doutg, H), T * H * es);
}

static void dbufs_poison_outputs(const setup *s, dbufs *b)
{
    const size_t T = s->T, H = s->cfg.hidden, E = s->cfg.num_experts, es = s->dsz;
    dev_poison(b->out, T * H * es);
    dev_poison(b->lg, T * E * es);
    dev_poison(b->dx, T * H * es);
    for (int i = 0; i < 6; i++)
        if (b->gb[i]) dev_poison(*moe_test_grad_slot(&b->g, i), b->gb[i]);
}

/* The device outputs as a host ep_result (ids from the logits) for compare(). */
static bool to_result(const setup *s, const dbufs *b, ep_result *r)
{
    bool ok = true;
    const size_t T = s->T, H = s->cfg.hidden, E = s->cfg.num_experts, k = s->cfg.top_k, es = s->dsz;
    memset(r, 0, sizeof *r);
    r->out = dev_download(b->out, T * H * es);
    r->logits = dev_download(b->lg, T * E * es);
    r->dx = dev_download(b->dx, T * H * es);
    for (int i = 0; i < 6; i++) {
        r->gb[i] = b->gb[i];
        if (b->gb[i])
            *moe_test_grad_slot(&r->g, i) =
                dev_download(*moe_test_grad_slot((moe_layer_grads *)&b->g, i), b->gb[i]);
    }
    r->ids = malloc(T * k * 4 + 16);
    void *w = malloc(T * k * es + 16);
    moe_error e;
    moe_error_clear(&e);
    if (T && cpu_route_topk(&s->cfg, s->dt, s->T, r->logits, r->ids, w, &e) != MOE_OK) {
        fprintf(stderr, "rank %d: top-k of the EP logits: %s\n", g_rank, e.msg);
        ok = false;
    }
    free(w);
    return ok;
}

/* Every output of a and b bitwise equal (device). */
static bool dbufs_equal(const char *label, const setup *s, const dbufs *a, const dbufs *b)
{
    bool ok = true;
    ep_result ra, rb;
    ok &= to_result(s, a, &ra);
    ok &= to_result(s, b, &rb);
    const size_t T = s->T, H = s->cfg.hidden, E = s->cfg.num_experts, es = s->dsz;
    char what[320];
    snprintf(what, sizeof what, "%s: out", label);
    CHECK(same_bits(what, ra.out, rb.out, T * H * es, es));
    snprintf(what, sizeof what, "%s: router logits", label);
    CHECK(same_bits(what, ra.logits, rb.logits, T * E * es, es));
    snprintf(what, sizeof what, "%s: dx", label);
    CHECK(same_bits(what, ra.dx, rb.dx, T * H * es, es));
    for (int i = 0; i < 6; i++) {
        if (!ra.gb[i]) continue;
        snprintf(what, sizeof what, "%s: %s", label, moe_test_grad_names[i]);
        CHECK(same_bits(what, *moe_test_grad_slot(&ra.g, i), *moe_test_grad_slot(&rb.g, i), ra.gb[i], es));
    }
    result_free(&ra);
    result_free(&rb);
    return ok;
}

static void eager(moe_layer *L, const setup *s, dbufs *b, cudaStream_t st, bool *okp)
{
    bool ok = true;
    CHECK_API(moe_layer_forward_async(L, s->T, b->x, b->out, b->lg, st));
    CHECK_API(moe_layer_backward_async(L, s->T, b->x, b->dout, NULL, b->dx, &b->g, st));
    CHECK_CU(cudaStreamSynchronize(st));
    CHECK_API(moe_layer_check_errors(L));
    *okp &= ok;
}

/* ------------------------------------------------------------------ capture and replay ---- */

/* The sync-free forward and backward over comm: eager against the answers (a: xg/doutg, a2:
 * xg2/doutg2), both calls captured and replayed on either input = eager bitwise; the replicated
 * gradients identical on every rank. Collective over comm. */
static bool graph_case(const setup *s, moe_ep_comm *comm, const answer *a, const answer *a2,
                       const char *label)
{
    bool ok = true;
    moe_layer *L = layer_make(s, comm, NULL, MOE_BACKEND_CUDA, s->Tg, NULL);
    if (!all_true(L != NULL)) {
        moe_layer_destroy(L);
        return false;
    }
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    CHECK_API(moe_layer_info_get(L, &in));
    if (strcmp(in.transport, "nccl") != 0 || !L->ep || !L->ep->syncfree) {
        fprintf(stderr, "rank %d: %s: transport %s, sync-free %d: expected the sync-free NCCL path\n",
                g_rank, label, in.transport, L->ep ? (int)L->ep->syncfree : -1);
        ok = false;
    }
    cudaStream_t st;
    CHECK_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    dbufs e1, e2, gr;
    dbufs_alloc(L, s, &e1);
    dbufs_alloc(L, s, &e2);
    dbufs_alloc(L, s, &gr);
    dbufs_inputs(s, &e1, s->xg, s->doutg);
    dbufs_inputs(s, &e2, s->xg2, s->doutg2);
    /* eager, each input: against the answers */
    eager(L, s, &e1, st, &ok);
    eager(L, s, &e2, st, &ok);
    char what[224];
    ep_result r;
    ok &= to_result(s, &e1, &r);
    snprintf(what, sizeof what, "%s eager", label);
    ok &= compare(what, s, L, &r, a, true);
    ok &= replicated_identical(what, s->comm, &r, s->dsz);
    result_free(&r);
    ok &= to_result(s, &e2, &r);
    snprintf(what, sizeof what, "%s eager, input 2", label);
    ok &= compare(what, s, L, &r, a2, true);
    result_free(&r);
    /* capture: every rank at once (the calls still agree over MPI while capturing) */
    cudaGraph_t gf = NULL, gb = NULL;
    cudaGraphExec_t ef = NULL, eb = NULL;
    CHECK_CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    moe_status s1 = moe_layer_forward_async(L, s->T, gr.x, gr.out, gr.lg, st);
    CHECK_CU(cudaStreamEndCapture(st, &gf));
    CHECK_CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    moe_status s2 = moe_layer_backward_async(L, s->T, gr.x, gr.dout, NULL, gr.dx, &gr.g, st);
    CHECK_CU(cudaStreamEndCapture(st, &gb));
    if (s1 != MOE_OK || s2 != MOE_OK) {
        fprintf(stderr, "rank %d: %s: under capture: forward %s, backward %s: %s\n", g_rank, label,
                moe_strerror(s1), moe_strerror(s2), moe_last_error());
        ok = false;
    }
    if (ok) CHECK_CU(cudaGraphInstantiate(&ef, gf, 0));
    if (ok) CHECK_CU(cudaGraphInstantiate(&eb, gb, 0));
    if (all_true(ok && ef && eb)) {
        for (int round = 0; round < 3; round++) {
            const int i = round == 0 ? 1 : 2; /* the eager input, then new contents, then again */
            dbufs_inputs(s, &gr, i == 1 ? s->xg : s->xg2, i == 1 ? s->doutg : s->doutg2);
            dbufs_poison_outputs(s, &gr);
            int launches = round == 2 ? 4 : 1;
            for (int l = 0; l < launches; l++) {
                CHECK_CU(cudaGraphLaunch(ef, st));
                CHECK_CU(cudaGraphLaunch(eb, st));
            }
            CHECK_CU(cudaStreamSynchronize(st));
            CHECK_API(moe_layer_check_errors(L));
            snprintf(what, sizeof what, "%s: graph replay %d (input %d, %d launches) vs eager", label,
                     round, i, launches);
            ok &= dbufs_equal(what, s, &gr, i == 1 ? &e1 : &e2);
        }
        ok &= to_result(s, &gr, &r);
        snprintf(what, sizeof what, "%s graph replay", label);
        ok &= replicated_identical(what, s->comm, &r, s->dsz);
        result_free(&r);
    } else {
        ok = false;
    }
    if (ef) cudaGraphExecDestroy(ef);
    if (eb) cudaGraphExecDestroy(eb);
    if (gf) cudaGraphDestroy(gf);
    if (gb) cudaGraphDestroy(gb);
    dbufs_free(&e1);
    dbufs_free(&e2);
    dbufs_free(&gr);
    CHECK_API(moe_layer_destroy(L));
    CHECK_CU(cudaStreamDestroy(st));
    return ok;
}

/* Rank 0 with V = 4 over NCCL to itself; and every rank over NCCL where each has its own GPU
 * (V = 4/N, T = 0 on the last of 4 ranks). Forward and backward graphs, every case. */
static void test_syncfree_graphs(void **state)
{
    (void)state;
    bool ok = true;
    const int Tg = 128;
    for (int world = 0; world < 2; world++) {
        if (world && !world_has_gpu_per_rank()) {
            if (g_rank == 0) fprintf(stderr, "ranks share a GPU: NCCL over MPI_COMM_WORLD not run\n");
            break;
        }
        if (!world && g_rank != 0) continue;
        MPI_Comm mc = world ? MPI_COMM_WORLD : MPI_COMM_SELF;
        int N = 1;
        MPI_Comm_size(mc, &N);
        const int V = world ? (4 / N > 0 ? 4 / N : 1) : 4;
        moe_ep_comm *comm = comm_open(mc, MOE_TRANSPORT_NCCL, V, 1, Tg, 0, NULL);
        ok &= comm != NULL;
        for (int m = 0; m < NCASES && comm; m++) {
            setup s;
            ok &= setup_make(&s, mc, &k_cases[m], Tg, false);
            answer a, a2;
            ok &= answer_plain(&s, s.xg, s.doutg, true, &a);
            ok &= answer_plain(&s, s.xg2, s.doutg2, true, &a2);
            char label[128];
            snprintf(label, sizeof label, "sync-free N=%d V=%d nccl %s", N, V, k_cases[m].name);
            ok &= graph_case(&s, comm, &a, &a2, label);
            if (s.rank == 0) fprintf(stderr, "r0 %s, graphs: %s\n", label, ok ? "ok" : "FAILED");
            answer_free(&a);
            answer_free(&a2);
            setup_free(&s);
        }
        CHECK_API(moe_ep_comm_destroy(comm));
    }
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ overflow ---- */

/* A receive bound below what arrives (sync-free: nothing can wait for the host to refuse the
 * call): the device flag, reported once by moe_layer_check_errors as MOE_ERR_OVERFLOW. */
static void test_syncfree_overflow(void **state)
{
    (void)state;
    bool ok = true;
    if (g_rank == 0) {
        const int T = 128;
        moe_ep_comm *comm = comm_open(MPI_COMM_SELF, MOE_TRANSPORT_NCCL, 4, 1, T, T / 4, NULL);
        ok &= comm != NULL;
        for (int m = 0; m < NCASES && comm; m += 2) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_SELF, &k_cases[m], T, false);
            moe_layer *L = layer_make(&s, comm, NULL, MOE_BACKEND_CUDA, T, NULL);
            ok &= L != NULL;
            if (L) {
                cudaStream_t st;
                CHECK_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
                dbufs b;
                dbufs_alloc(L, &s, &b);
                dbufs_inputs(&s, &b, s.xg, s.doutg);
                for (int bwd = 0; bwd < 2; bwd++) {
                    if (!bwd) CHECK_API(moe_layer_forward_async(L, T, b.x, b.out, b.lg, st));
                    else CHECK_API(moe_layer_backward_async(L, T, b.x, b.dout, NULL, b.dx, &b.g, st));
                    moe_status cs = moe_layer_check_errors(L);
                    if (cs != MOE_ERR_OVERFLOW || !strstr(moe_last_error(), "overflow")) {
                        fprintf(stderr, "r0 %s %s with max_recv_tokens %d: check_errors %s (%s), "
                                "expected an overflow\n", k_cases[m].name, bwd ? "backward" : "forward",
                                T / 4, moe_strerror(cs), moe_last_error());
                        ok = false;
                    }
                    fprintf(stderr, "r0 expected sync-free overflow (%s): %s\n", bwd ? "backward" : "forward",
                            moe_last_error());
                    CHECK_API(moe_layer_check_errors(L)); /* the flag was cleared */
                }
                dbufs_free(&b);
                CHECK_API(moe_layer_destroy(L));
                CHECK_CU(cudaStreamDestroy(st));
            }
            setup_free(&s);
        }
        CHECK_API(moe_ep_comm_destroy(comm));
        /* T beyond max_tokens_per_rank: refused before anything runs (the slots hold M rows),
         * and the layer works afterwards */
        comm = comm_open(MPI_COMM_SELF, MOE_TRANSPORT_NCCL, 4, 1, T, 0, NULL);
        ok &= comm != NULL;
        if (comm) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_SELF, &k_cases[2], T, false);
            answer a;
            ok &= answer_plain(&s, s.xg, s.doutg, false, &a);
            moe_layer *L = layer_make(&s, comm, NULL, MOE_BACKEND_CUDA, 0, NULL);
            ok &= L != NULL;
            if (L) {
                const size_t H = s.cfg.hidden, es = s.dsz;
                void *x = dev_poisoned((size_t)(T + 1) * H * es), *out = dev_poisoned((size_t)(T + 1) * H * es);
                moe_status st = moe_layer_forward_async(L, T + 1, x, out, NULL, NULL);
                if (st != MOE_ERR_OVERFLOW || !strstr(moe_last_error(), "max-tokens-per-rank")) {
                    fprintf(stderr, "r0 sync-free T = %d > max_tokens_per_rank %d: %s (%s)\n", T + 1, T,
                            moe_strerror(st), moe_last_error());
                    ok = false;
                }
                fprintf(stderr, "r0 expected refusal: %s\n", moe_last_error());
                cudaFree(x);
                cudaFree(out);
                cudaStream_t cs;
                CHECK_CU(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
                ep_result r;
                ok &= run_ep(L, &s, s.xg, s.doutg, false, cs, true, &r);
                ok &= compare("sync-free after the refusal", &s, L, &r, &a, false);
                result_free(&r);
                CHECK_CU(cudaStreamDestroy(cs));
                CHECK_API(moe_layer_destroy(L));
            }
            answer_free(&a);
            setup_free(&s);
            CHECK_API(moe_ep_comm_destroy(comm));
        }
    }
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ rank order ---- */

/* The replicated gradients of the layer on comm: identical on every rank, and (fp32) bitwise the
 * ascending-rank fp32 sum of each rank's partial, that is of the gradients when only that rank
 * brings its tokens. */
static bool rank_order_case(const setup *s, moe_ep_comm *comm, int64_t M, const char *label)
{
    bool ok = true;
    moe_layer *L = layer_make(s, comm, NULL, MOE_BACKEND_CUDA, M, NULL);
    if (!all_true(L != NULL)) {
        moe_layer_destroy(L);
        return false;
    }
    cudaStream_t st;
    CHECK_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    answer a;
    ok &= answer_plain(s, s->xg, s->doutg, true, &a);
    ep_result full;
    ok &= run_ep(L, s, s->xg, s->doutg, true, st, true, &full);
    ok &= compare(label, s, L, &full, &a, true);
    ok &= replicated_identical(label, s->comm, &full, s->dsz);
    if (s->dt == MOE_DTYPE_F32) {
        const int idx[4] = {0, 3, 4, 5};
        float *sum[6] = {NULL};
        for (int q = 0; q < 4; q++)
            if (full.gb[idx[q]]) sum[idx[q]] = calloc(full.gb[idx[q]] / 4 + 1, sizeof(float));
        for (int r = 0; r < s->N; r++) {
            setup one = *s;
            if (s->rank != r) one.T = 0; /* only rank r brings its tokens */
            ep_result part;
            ok &= run_ep(L, &one, s->xg, s->doutg, true, st, true, &part);
            for (int q = 0; q < 4; q++) {
                const int i = idx[q];
                if (!sum[i]) continue;
                const float *p = *moe_test_grad_slot(&part.g, i);
                for (size_t e = 0; e < full.gb[i] / 4; e++) sum[i][e] = sum[i][e] + p[e];
            }
            result_free(&part);
        }
        for (int q = 0; q < 4; q++) {
            const int i = idx[q];
            if (!sum[i]) continue;
            const float *g = *moe_test_grad_slot(&full.g, i);
            size_t bad = 0, first = 0;
            for (size_t e = 0; e < full.gb[i] / 4; e++)
                if (!(g[e] == sum[i][e])) {
                    if (!bad) first = e;
                    bad++;
                }
            if (bad) {
                fprintf(stderr, "rank %d: %s: %s: %zu elements are not the rank-order fp32 sum of the "
                        "ranks' partials; first %zu: %.9g vs %.9g\n", g_rank, label,
                        moe_test_grad_names[i], bad, first, g[first], sum[i][first]);
                ok = false;
            }
            free(sum[i]);
        }
        if (s->rank == 0 && ok)
            fprintf(stderr, "r0 %s: replicated gradients = the rank-order fp32 sum of %d partials\n", label, s->N);
    }
    result_free(&full);
    answer_free(&a);
    CHECK_API(moe_layer_destroy(L));
    CHECK_CU(cudaStreamDestroy(st));
    return ok;
}

static void test_replicated_rank_order(void **state)
{
    (void)state;
    bool ok = true;
    if (g_size == 1) {
        fprintf(stderr, "one rank: nothing to order\n");
        return;
    }
    const bool nccl = world_has_gpu_per_rank();
    const int V = 4 / g_size > 0 ? 4 / g_size : 1, Tg = 61;
    for (int tp = 0; tp < (nccl ? 2 : 1); tp++) {
        /* MPI sized per call; NCCL sync-free (max_tokens_per_rank) */
        const int64_t M = tp ? Tg : 0;
        moe_ep_comm *comm = comm_open(MPI_COMM_WORLD, tp ? MOE_TRANSPORT_NCCL : MOE_TRANSPORT_MPI, V, 1, M, 0, NULL);
        if (!all_true(comm != NULL)) {
            moe_ep_comm_destroy(comm);
            ok = false;
            break;
        }
        for (int m = 0; m < NCASES; m++) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[m], Tg, false);
            char label[128];
            snprintf(label, sizeof label, "rank order np=%d V=%d %s %s", g_size, V, tp ? "nccl sync-free" : "mpi",
                     k_cases[m].name);
            ok &= rank_order_case(&s, comm, M, label);
            if (g_rank == 0) fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
            setup_free(&s);
        }
        CHECK_API(moe_ep_comm_destroy(comm));
    }
    assert_true(all_true(ok));
}
#endif /* MOE_HAVE_CUDA */

EPT_MAIN(
    cmocka_unit_test(test_syncfree_graphs),
    cmocka_unit_test(test_syncfree_overflow),
    cmocka_unit_test(test_replicated_rank_order))
