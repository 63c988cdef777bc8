/*
 * test_mpi_gpu_ep.c — expert parallelism on the CUDA backend: the layer created with an EP
 * communicator (moe_ep_comm over MPI_COMM_WORLD, or MPI_COMM_SELF on rank 0) against the
 * single-rank CUDA layer (created without one) on the same generated data; run by ctest under
 * mpirun at -np 1, 2 and 4 (every rank exits 77 without a GPU or a CUDA build unless
 * MOE_REQUIRE_GPU=1). The ranks share the node's GPU(s): NCCL needs a GPU per rank, so the
 * cases over MPI_COMM_WORLD use the MPI transport (device rows staged through pinned host
 * memory) and add NCCL where every rank has its own GPU; NCCL with virtual ranks runs on rank 0
 * alone (V = 4 over NCCL to itself).
 * Each rank compares its rows and its expert slice with the single-rank answer (every rank
 * computes it itself: tolerances of test_util, global relative error AND worst row within 10x;
 * tokens routed differently at a logit near-tie are left out, at most 2%); outputs and
 * gradients are poisoned before each run; every verdict is agreed over all ranks.
 *   virtual   rank 0, V = 4 over NCCL: forward and backward (asynchronous calls), counters
 *             from the ids, the host calls give the same bits;
 *   shared    every rank over MPI, N*V = 4, uneven tokens (the last of 4 ranks has none); also
 *             with buffers sized in advance (max_tokens_per_rank) through the host calls;
 *   placement E = 10 over the ranks (uneven slices and virtual parts), an explicit
 *             non-contiguous expert map, and (np > 1) a map where the last rank owns no
 *             expert: local_experts as the map says, results against the answer;
 *   overflow  max_tokens_per_rank with a receive bound too small: MOE_ERR_OVERFLOW on every
 *             rank, naming the overflow; T beyond max_tokens_per_rank on one rank: every rank
 *             fails, naming it; the layer still works afterwards;
 *   refused   more ranks on the node than GPUs: NCCL refused on every rank pointing at MPI,
 *             AUTO picks MPI;
 *   forced    forced routing (uniform, skewed): the CUDA EP against the CPU backend's EP on
 *             the same communicator, counters (rows and bytes per peer) equal;
 *   chunks    --chunks 3 (rank 0 V = 4 over NCCL; every rank over MPI) against one chunk and
 *             the answer, the timeline; sync-free mode with chunks refused.
 * The CUDA-graph cases (sync-free forward and backward) are in test_mpi_gpu_ep_graphs.c.
 * Expected runtime on an H100: ~20 s at np 1, ~40 s at np 4 (one GPU shared).
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

static int default_V(void) { return 4 / (g_size <= 4 ? g_size : 4) > 0 ? 4 / (g_size <= 4 ? g_size : 4) : 1; }

static bool info_is(const moe_layer *L, const char *transport, int V, int El)
{
    bool ok = true;
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    CHECK_API(moe_layer_info_get(L, &in));
    if (strcmp(in.transport, transport) != 0 || in.virtual_ranks != V || (El >= 0 && in.num_local_experts != El) ||
        in.backend != MOE_BACKEND_CUDA) {
        fprintf(stderr, "rank %d: layer info: transport %s (expected %s), x%d virtual (expected %d), %d "
                "local experts (expected %d), backend %d\n", g_rank, in.transport, transport,
                in.virtual_ranks, V, in.num_local_experts, El, (int)in.backend);
        ok = false;
    }
    return ok;
}

/* r and r2 bitwise equal (out, dx, gradients). */
static bool results_equal(const char *label, const setup *s, const ep_result *r, const ep_result *r2,
                          bool backward)
{
    bool ok = true;
    const size_t T = s->T, H = s->cfg.hidden, es = s->dsz;
    char what[224];
    snprintf(what, sizeof what, "%s: out", label);
    CHECK(same_bits(what, r->out, r2->out, T * H * es, es));
    if (!backward) return ok;
    snprintf(what, sizeof what, "%s: dx", label);
    CHECK(same_bits(what, r->dx, r2->dx, T * H * es, es));
    for (int i = 0; i < 6; i++) {
        if (!r->gb[i]) continue;
        snprintf(what, sizeof what, "%s: %s", label, moe_test_grad_names[i]);
        CHECK(same_bits(what, *moe_test_grad_slot((moe_layer_grads *)&r->g, i),
                        *moe_test_grad_slot((moe_layer_grads *)&r2->g, i), r->gb[i], es));
    }
    return ok;
}

/* ------------------------------------------------------------------ virtual ranks ---- */

/* Rank 0 alone plays V = 4 ranks over NCCL to itself: equal to the plain layer. */
static void test_virtual_nccl(void **state)
{
    (void)state;
    bool ok = true;
    if (g_rank == 0) {
        cudaStream_t st;
        CHECK_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        moe_ep_comm *comm = comm_open(MPI_COMM_SELF, MOE_TRANSPORT_NCCL, 4, 1, 0, 0, NULL);
        ok &= comm != NULL;
        for (int m = 0; m < NCASES && comm; m++) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_SELF, &k_cases[m], 96, false);
            answer a;
            ok &= answer_plain(&s, s.xg, s.doutg, true, &a);
            moe_layer *L = layer_make(&s, comm, NULL, MOE_BACKEND_CUDA, 0, NULL);
            ok &= L != NULL;
            if (L) {
                char label[128];
                snprintf(label, sizeof label, "virtual V=4 nccl %s", k_cases[m].name);
                ok &= info_is(L, "nccl", 4, k_cases[m].E);
                ep_result r, r2;
                ok &= run_ep(L, &s, s.xg, s.doutg, true, st, true, &r);
                ok &= compare(label, &s, L, &r, &a, true);
                ok &= check_counters(label, &s, L, r.ids, &r.fwd);
                ok &= check_counters(label, &s, L, r.ids, &r.bwd);
                /* the host calls: the same bits */
                ok &= run_ep(L, &s, s.xg, s.doutg, true, st, false, &r2);
                ok &= results_equal(label, &s, &r, &r2, true);
                result_free(&r);
                result_free(&r2);
                CHECK_API(moe_layer_destroy(L));
                fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
            }
            answer_free(&a);
            setup_free(&s);
        }
        CHECK_API(moe_ep_comm_destroy(comm));
        CHECK_CU(cudaStreamDestroy(st));
    }
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ ranks sharing the GPU ---- */

/* Every rank over the MPI transport; N*V = 4; sized per call (asynchronous calls) and with
 * max_tokens_per_rank (host calls). */
static void test_shared_gpu_mpi(void **state)
{
    (void)state;
    bool ok = true;
    const int V = default_V(), Tg = 61;
    cudaStream_t st;
    CHECK_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    moe_ep_comm *comm[2] = {comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_MPI, V, 1, 0, 0, NULL),
                            comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_MPI, V, 1, Tg, 0, NULL)};
    ok &= comm[0] && comm[1];
    for (int m = 0; m < NCASES && all_true(ok); m++) {
        setup s;
        ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[m], Tg, false);
        answer a;
        ok &= answer_plain(&s, s.xg, s.doutg, true, &a);
        for (int sized = 0; sized < 2; sized++) {
            moe_layer *L = layer_make(&s, comm[sized], NULL, MOE_BACKEND_CUDA, sized ? Tg : 0, NULL);
            if (!all_true(L != NULL)) {
                ok = false;
                moe_layer_destroy(L);
                break;
            }
            char label[128];
            snprintf(label, sizeof label, "np=%d V=%d mpi%s %s", g_size, V,
                     sized ? " max_tokens_per_rank (host calls)" : "", k_cases[m].name);
            ok &= info_is(L, "mpi", V, -1);
            ep_result r;
            ok &= run_ep(L, &s, s.xg, s.doutg, true, st, !sized, &r);
            ok &= compare(label, &s, L, &r, &a, true);
            ok &= check_counters(label, &s, L, r.ids, &r.fwd);
            ok &= check_counters(label, &s, L, r.ids, &r.bwd);
            ok &= replicated_identical(label, MPI_COMM_WORLD, &r, s.dsz);
            result_free(&r);
            CHECK_API(moe_layer_destroy(L));
            if (g_rank == 0) fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
        }
        answer_free(&a);
        setup_free(&s);
    }
    for (int i = 0; i < 2; i++) CHECK_API(moe_ep_comm_destroy(comm[i]));
    CHECK_CU(cudaStreamDestroy(st));
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ placement ---- */

static void placement_run(const setup *s, moe_ep_comm *comm, const int32_t *map, const answer *a,
                          const char *label, const char *transport, int V, cudaStream_t st, bool *okp)
{
    bool ok = true;
    const int E = s->cfg.num_experts;
    moe_layer *L = layer_make(s, comm, map, MOE_BACKEND_CUDA, 0, NULL);
    if (!all_true(L != NULL)) {
        moe_layer_destroy(L);
        *okp = false;
        return;
    }
    /* the local experts: the map's (ascending), or the default slices (the first E mod N
     * ranks one more) */
    int El = 0;
    int32_t want[64];
    for (int e = 0; e < E; e++) {
        int owner;
        if (map) owner = map[e];
        else {
            const int base = E / s->N, extra = E % s->N;
            owner = e < extra * (base + 1) ? e / (base + 1) : extra + (e - extra * (base + 1)) / base;
        }
        if (owner == s->rank) want[El++] = e;
    }
    ok &= info_is(L, transport, V, El);
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    CHECK_API(moe_layer_info_get(L, &in));
    for (int i = 0; i < El && i < in.num_local_experts; i++)
        if (in.local_experts[i] != want[i]) {
            fprintf(stderr, "rank %d: %s: local expert %d is %d, expected %d\n", g_rank, label, i,
                    in.local_experts[i], want[i]);
            ok = false;
        }
    ep_result r;
    ok &= run_ep(L, s, s->xg, s->doutg, true, st, true, &r);
    ok &= compare(label, s, L, &r, a, true);
    ok &= check_counters(label, s, L, r.ids, &r.fwd);
    result_free(&r);
    CHECK_API(moe_layer_destroy(L));
    if (g_rank == 0) fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
    *okp &= ok;
}

/* E = 10 over N ranks and V virtual ranks (uneven slices), an explicit non-contiguous map, and
 * a map leaving the last rank without experts (it still brings tokens); over MPI, and over
 * NCCL where every rank has its own GPU. */
static void test_placement(void **state)
{
    (void)state;
    bool ok = true;
    const int V = default_V();
    const bool nccl = world_has_gpu_per_rank();
    const model_case cases[2] = {
        {"qwen3 bf16 E=10", MOE_ARCH_QWEN3, 64, 48, 10, 4, 0, MOE_DTYPE_BF16},
        {"llama4 fp32 E=10 k2", MOE_ARCH_LLAMA4, 41, 19, 10, 2, 27, MOE_DTYPE_F32},
    };
    cudaStream_t st;
    CHECK_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    for (int tp = 0; tp < (nccl ? 2 : 1); tp++) {
        moe_ep_comm *comm = comm_open(MPI_COMM_WORLD, tp ? MOE_TRANSPORT_NCCL : MOE_TRANSPORT_MPI, V, 1, 0, 0, NULL);
        if (!all_true(comm != NULL)) {
            ok = false;
            moe_ep_comm_destroy(comm);
            break;
        }
        const char *tname = tp ? "nccl" : "mpi";
        for (int m = 0; m < 2; m++) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_WORLD, &cases[m], 53, true);
            answer a;
            ok &= answer_plain(&s, s.xg, s.doutg, true, &a);
            const int E = cases[m].E;
            int32_t map[16];
            char label[160];
            snprintf(label, sizeof label, "np=%d V=%d %s %s default slices", g_size, V, tname, cases[m].name);
            placement_run(&s, comm, NULL, &a, label, tname, V, st, &ok);
            for (int e = 0; e < E; e++) map[e] = (3 * e + 1) % g_size;
            snprintf(label, sizeof label, "np=%d V=%d %s %s map (3e+1) mod N", g_size, V, tname, cases[m].name);
            placement_run(&s, comm, map, &a, label, tname, V, st, &ok);
            if (g_size > 1) {
                for (int e = 0; e < E; e++) map[e] = e % (g_size - 1);
                snprintf(label, sizeof label, "np=%d V=%d %s %s map without rank %d", g_size, V, tname,
                         cases[m].name, g_size - 1);
                placement_run(&s, comm, map, &a, label, tname, V, st, &ok);
            }
            answer_free(&a);
            setup_free(&s);
        }
        CHECK_API(moe_ep_comm_destroy(comm));
    }
    CHECK_CU(cudaStreamDestroy(st));
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ overflow ---- */

/* Buffers sized in advance (MPI) and a receive bound that is too small: every rank fails with
 * MOE_ERR_OVERFLOW before any payload moves and says so; T beyond max_tokens_per_rank on rank 0
 * fails every rank naming it; afterwards the layer still runs. */
static void test_overflow_mpi(void **state)
{
    (void)state;
    bool ok = true;
    const int Tg = 61, M = 61;
    setup s;
    ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[0], Tg, false);
    const size_t H = s.cfg.hidden, es = s.dsz;
    moe_ep_comm *tight = comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_MPI, default_V(), 1, M, 2, NULL);
    moe_ep_comm *sized = comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_MPI, default_V(), 1, M, 0, NULL);
    moe_layer *L1 = all_true(tight != NULL) ? layer_make(&s, tight, NULL, MOE_BACKEND_CUDA, 0, NULL) : NULL;
    moe_layer *L2 = all_true(sized != NULL) ? layer_make(&s, sized, NULL, MOE_BACKEND_CUDA, 0, NULL) : NULL;
    if (all_true(L1 && L2)) {
        /* M + 1 rows (rank 0's call below routes them before the bound is checked) */
        void *hx = calloc((size_t)(M + 1) * H * es, 1);
        if (hx) memcpy(hx, mine(&s, s.xg, H), (size_t)s.T * H * es);
        void *x = dev_upload(hx, (size_t)(M + 1) * H * es);
        free(hx);
        void *out = dev_poisoned((size_t)(M + 1) * H * es);
        moe_status st = moe_layer_forward_async(L1, s.T, x, out, NULL, NULL);
        if (st != MOE_ERR_OVERFLOW || !strstr(moe_last_error(), "overflow")) {
            fprintf(stderr, "rank %d: max_recv_tokens 2: %s (%s), expected an overflow\n", g_rank,
                    moe_strerror(st), moe_last_error());
            ok = false;
        }
        if (g_rank == 0) fprintf(stderr, "r0 expected overflow: %s\n", moe_last_error());
        st = moe_layer_forward_async(L2, g_rank == 0 ? M + 1 : s.T, x, out, NULL, NULL);
        if (st != MOE_ERR_OVERFLOW || !strstr(moe_last_error(), "max-tokens-per-rank")) {
            fprintf(stderr, "rank %d: T = %d on rank 0 over max_tokens_per_rank %d: %s (%s)\n",
                    g_rank, M + 1, M, moe_strerror(st), moe_last_error());
            ok = false;
        }
        if (g_rank == 1 || g_size == 1) fprintf(stderr, "r%d expected failure: %s\n", g_rank, moe_last_error());
        cudaFree(x);
        cudaFree(out);
        /* the layer still runs */
        answer a;
        ok &= answer_plain(&s, s.xg, s.doutg, false, &a);
        cudaStream_t cs;
        CHECK_CU(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
        ep_result r;
        ok &= run_ep(L2, &s, s.xg, s.doutg, false, cs, true, &r);
        ok &= compare("after the overflows", &s, L2, &r, &a, false);
        result_free(&r);
        answer_free(&a);
        CHECK_CU(cudaStreamDestroy(cs));
    } else {
        ok = false;
    }
    CHECK_API(moe_layer_destroy(L1));
    CHECK_API(moe_layer_destroy(L2));
    CHECK_API(moe_ep_comm_destroy(tight));
    CHECK_API(moe_ep_comm_destroy(sized));
    setup_free(&s);
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ NCCL refused ---- */

/* More ranks on the node than GPUs: NCCL refused on every rank, pointing at MPI; AUTO picks
 * MPI. */
static void test_nccl_refused(void **state)
{
    (void)state;
    bool ok = true;
    if (!world_has_gpu_per_rank()) {
        setup s;
        ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[0], 16, true);
        moe_ep_comm *c = comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_NCCL, default_V(), 1, 0, 0, NULL);
        moe_status st = MOE_OK;
        moe_layer *L = c ? layer_make(&s, c, NULL, MOE_BACKEND_CUDA, 0, &st) : NULL;
        if (st != MOE_ERR_UNSUPPORTED || L || !strstr(moe_last_error(), "--transport mpi")) {
            fprintf(stderr, "rank %d: NCCL with ranks sharing a GPU: %s (%s), expected a refusal "
                    "pointing at --transport mpi\n", g_rank, moe_strerror(st), moe_last_error());
            ok = false;
        }
        if (g_rank == 0) fprintf(stderr, "r0 expected refusal: %s\n", moe_last_error());
        moe_layer_destroy(L);
        CHECK_API(moe_ep_comm_destroy(c));
        c = comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_AUTO, default_V(), 1, 0, 0, NULL);
        L = c ? layer_make(&s, c, NULL, MOE_BACKEND_CUDA, 0, NULL) : NULL;
        ok &= L != NULL;
        if (L) ok &= info_is(L, "mpi", default_V(), -1);
        CHECK_API(moe_layer_destroy(L));
        CHECK_API(moe_ep_comm_destroy(c));
        setup_free(&s);
    } else if (g_rank == 0) {
        fprintf(stderr, "every rank has its own GPU: nothing to refuse\n");
    }
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ forced routing ---- */

/* Forced routing: the CUDA EP against the CPU backend's EP with the same options. */
static void test_forced_vs_cpu(void **state)
{
    (void)state;
    bool ok = true;
    const char *routes[2] = {"uniform", "skewed"};
    const int V = default_V();
    cudaStream_t st;
    CHECK_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    for (int ri = 0; ri < 2; ri++) {
        moe_ep_comm *comm = comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_MPI, V, 1, 0, 0, routes[ri]);
        if (!all_true(comm != NULL)) {
            ok = false;
            moe_ep_comm_destroy(comm);
            break;
        }
        for (int m = 0; m < NCASES; m += 2) { /* Qwen3 bf16 and Llama-4 bf16 */
            setup s;
            ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[m], 61, false);
            moe_layer *C = layer_make(&s, comm, NULL, MOE_BACKEND_CPU, 0, NULL);
            moe_layer *G = layer_make(&s, comm, NULL, MOE_BACKEND_CUDA, 0, NULL);
            if (!all_true(C && G)) {
                ok = false;
                moe_layer_destroy(C);
                moe_layer_destroy(G);
                setup_free(&s);
                continue;
            }
            ep_result rc, rg;
            ok &= run_ep(C, &s, s.xg, s.doutg, true, NULL, false, &rc);
            ok &= run_ep(G, &s, s.xg, s.doutg, true, st, true, &rg);
            const size_t T = s.T, H = s.cfg.hidden, I = s.cfg.inter, E = s.cfg.num_experts;
            const size_t El = (size_t)G->map.El;
            const double tol = moe_test_tol(s.dt, false), gtol = moe_test_tol(s.dt, true);
            char what[160];
            snprintf(what, sizeof what, "forced %s %s out vs CPU EP", routes[ri], k_cases[m].name);
            CHECK(close_rows(what, s.dt, rg.out, rc.out, T, H, NULL, tol));
            snprintf(what, sizeof what, "forced %s %s dx vs CPU EP", routes[ri], k_cases[m].name);
            CHECK(close_rows(what, s.dt, rg.dx, rc.dx, T, H, NULL, gtol));
            snprintf(what, sizeof what, "forced %s %s d w13 vs CPU EP", routes[ri], k_cases[m].name);
            CHECK(close_rows(what, s.dt, rg.g.w13, rc.g.w13, El, 2 * I * H, NULL, gtol));
            snprintf(what, sizeof what, "forced %s %s d w2 vs CPU EP", routes[ri], k_cases[m].name);
            CHECK(close_rows(what, s.dt, rg.g.w2, rc.g.w2, El, H * I, NULL, gtol));
            snprintf(what, sizeof what, "forced %s %s d router vs CPU EP", routes[ri], k_cases[m].name);
            CHECK(close_rows(what, s.dt, rg.g.router, rc.g.router, E, H, NULL,
                             s.dt == MOE_DTYPE_F32 ? gtol : 2.5 * gtol));
            /* the same rows travelled: the counters equal the CPU backend's */
            for (int q = 0; q < s.N; q++) {
                CHECK(rg.fwd.peer_rows_sent[q] == rc.fwd.peer_rows_sent[q]);
                CHECK(rg.fwd.peer_rows_recv[q] == rc.fwd.peer_rows_recv[q]);
                CHECK(rg.fwd.peer_bytes_sent[q] == rc.fwd.peer_bytes_sent[q]);
                CHECK(rg.fwd.peer_bytes_recv[q] == rc.fwd.peer_bytes_recv[q]);
                CHECK(rg.bwd.peer_rows_sent[q] == rc.bwd.peer_rows_sent[q]);
                CHECK(rg.bwd.peer_bytes_sent[q] == rc.bwd.peer_bytes_sent[q]);
            }
            CHECK(rg.fwd.tokens_computed == rc.fwd.tokens_computed);
            result_free(&rc);
            result_free(&rg);
            CHECK_API(moe_layer_destroy(C));
            CHECK_API(moe_layer_destroy(G));
            if (g_rank == 0)
                fprintf(stderr, "r0 forced %s %s vs CPU EP: %s\n", routes[ri], k_cases[m].name, ok ? "ok" : "FAILED");
            setup_free(&s);
        }
        CHECK_API(moe_ep_comm_destroy(comm));
    }
    CHECK_CU(cudaStreamDestroy(st));
    assert_true(all_true(ok));
}

/* ------------------------------------------------------------------ chunks ---- */

/* A C = 3 layer against a C = 1 layer with the same options (and the answer): routing equal,
 * output within tolerance (bitwise equality reported, not required: a grouped GEMM may pick
 * another kernel for fewer rows), a second call bitwise equal, counters from the ids, and the
 * timeline: 3 chunks whose tokens add up to T, each transfer posted before it completes. The
 * backward (one chunk) of the chunked layer matches too. */
static bool chunks_case(const setup *s, moe_ep_comm *c1, moe_ep_comm *c3, const answer *a,
                        const char *label, cudaStream_t st)
{
    bool ok = true;
    moe_layer *L1 = layer_make(s, c1, NULL, MOE_BACKEND_CUDA, 0, NULL);
    moe_layer *L3 = layer_make(s, c3, NULL, MOE_BACKEND_CUDA, 0, NULL);
    if (all_true(L1 && L3)) {
        ep_result r1, r3, r3b;
        ok &= run_ep(L1, s, s->xg, s->doutg, false, st, true, &r1);
        ok &= run_ep(L3, s, s->xg, s->doutg, true, st, true, &r3);
        ok &= run_ep(L3, s, s->xg, s->doutg, false, st, true, &r3b);
        ok &= compare(label, s, L3, &r3, a, true);
        ok &= check_counters(label, s, L3, r3.ids, &r3.fwd);
        const size_t T = s->T, H = s->cfg.hidden, k = s->cfg.top_k, es = s->dsz;
        char what[224];
        snprintf(what, sizeof what, "%s: ids C=3 vs C=1", label);
        CHECK(same_bits(what, r1.ids, r3.ids, T * k * 4, 4));
        snprintf(what, sizeof what, "%s: two C=3 calls", label);
        CHECK(same_bits(what, r3.out, r3b.out, T * H * es, es));
        const bool bitwise = memcmp(r1.out, r3.out, T * H * es) == 0;
        snprintf(what, sizeof what, "%s: C=3 vs C=1", label);
        CHECK(close_rows(what, s->dt, r3.out, r1.out, T, H, NULL, moe_test_tol(s->dt, false)));
        fprintf(stderr, "r%d %s: C=3 %s C=1\n", g_rank, label,
                bitwise ? "bitwise equal to" : "within tolerance of (not bitwise)");
        const moe_layer_stats *sf = &r3.fwd;
        CHECK(sf->nchunks == 3);
        if (sf->nchunks == 3) {
            int64_t tok = 0;
            const double eps = 1e-6;
            for (int i = 0; i < 3; i++) {
                const moe_chunk_timeline *t = &sf->timeline[i];
                tok += t->tokens;
                CHECK(t->dispatch_post <= t->dispatch_done + eps);
                CHECK(t->dispatch_done <= t->compute_begin + eps);
                CHECK(t->compute_begin <= t->compute_end + eps);
                CHECK(t->compute_end <= t->combine_post + eps);
                CHECK(t->combine_post <= t->combine_done + eps);
                CHECK(t->combine_done > 0);
                if (g_rank == 0)
                    fprintf(stderr, "r0 %s chunk %d: %lld tokens, %lld rows sent, dispatch %.3f-%.3f "
                            "compute %.3f-%.3f combine %.3f-%.3f ms\n", label, i, (long long)t->tokens,
                            (long long)t->rows_sent, 1e3 * t->dispatch_post, 1e3 * t->dispatch_done,
                            1e3 * t->compute_begin, 1e3 * t->compute_end, 1e3 * t->combine_post,
                            1e3 * t->combine_done);
            }
            CHECK(tok == (int64_t)s->T);
        }
        result_free(&r1);
        result_free(&r3);
        result_free(&r3b);
    } else {
        ok = false;
    }
    moe_layer_destroy(L1);
    moe_layer_destroy(L3);
    return ok;
}

/* --chunks 3: rank 0 alone with V = 4 over NCCL, then every rank over MPI (N*V = 4, the last of
 * 4 ranks with no tokens), every case; sync-free mode with chunks is refused. */
static void test_chunks(void **state)
{
    (void)state;
    bool ok = true;
    const int V = default_V();
    cudaStream_t st;
    CHECK_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    moe_ep_comm *n1 = NULL, *n3 = NULL;
    if (g_rank == 0) {
        n1 = comm_open(MPI_COMM_SELF, MOE_TRANSPORT_NCCL, 4, 1, 0, 0, NULL);
        n3 = comm_open(MPI_COMM_SELF, MOE_TRANSPORT_NCCL, 4, 3, 0, 0, NULL);
        ok &= n1 && n3;
        /* sync-free (NCCL, max_tokens_per_rank) runs as one chunk: refused at the communicator
         * with NCCL named, at the layer when AUTO picks NCCL */
        moe_ep_options o = MOE_EP_OPTIONS_INIT;
        o.transport = MOE_TRANSPORT_NCCL;
        o.virtual_ranks = 4;
        o.chunks = 2;
        o.max_tokens_per_rank = 96;
        moe_ep_comm *bad = NULL;
        moe_status s1 = moe_ep_comm_create_mpi(MPI_COMM_SELF, &o, &bad);
        if (s1 != MOE_ERR_UNSUPPORTED || bad || !strstr(moe_last_error(), "chunks")) {
            fprintf(stderr, "r0 NCCL + chunks + max_tokens_per_rank: %s (%s)\n", moe_strerror(s1), moe_last_error());
            ok = false;
        }
        o.transport = MOE_TRANSPORT_AUTO;
        CHECK_API(moe_ep_comm_create_mpi(MPI_COMM_SELF, &o, &bad));
        if (bad) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_SELF, &k_cases[0], 96, false);
            moe_status s2 = MOE_OK;
            moe_layer *L = layer_make(&s, bad, NULL, MOE_BACKEND_CUDA, 0, &s2);
            if (s2 != MOE_ERR_UNSUPPORTED || L || !strstr(moe_last_error(), "chunks")) {
                fprintf(stderr, "r0 AUTO (NCCL) + chunks + max_tokens_per_rank: %s (%s)\n",
                        moe_strerror(s2), moe_last_error());
                ok = false;
            }
            moe_layer_destroy(L);
            setup_free(&s);
            CHECK_API(moe_ep_comm_destroy(bad));
        }
    }
    moe_ep_comm *m1 = comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_MPI, V, 1, 0, 0, NULL);
    moe_ep_comm *m3 = comm_open(MPI_COMM_WORLD, MOE_TRANSPORT_MPI, V, 3, 0, 0, NULL);
    ok &= m1 && m3;
    for (int m = 0; m < NCASES && all_true(ok); m++) {
        char label[128];
        if (g_rank == 0) {
            setup s;
            ok &= setup_make(&s, MPI_COMM_SELF, &k_cases[m], 96, false);
            answer a;
            ok &= answer_plain(&s, s.xg, s.doutg, true, &a);
            snprintf(label, sizeof label, "chunks V=4 nccl %s", k_cases[m].name);
            ok &= chunks_case(&s, n1, n3, &a, label, st);
            fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
            answer_free(&a);
            setup_free(&s);
        }
        setup s;
        ok &= setup_make(&s, MPI_COMM_WORLD, &k_cases[m], 61, false);
        answer a;
        ok &= answer_plain(&s, s.xg, s.doutg, true, &a);
        snprintf(label, sizeof label, "chunks np=%d V=%d mpi %s", g_size, V, k_cases[m].name);
        ok &= chunks_case(&s, m1, m3, &a, label, st);
        if (g_rank == 0) fprintf(stderr, "r0 %s: %s\n", label, ok ? "ok" : "FAILED");
        answer_free(&a);
        setup_free(&s);
    }
    CHECK_API(moe_ep_comm_destroy(m1));
    CHECK_API(moe_ep_comm_destroy(m3));
    CHECK_API(moe_ep_comm_destroy(n1));
    CHECK_API(moe_ep_comm_destroy(n3));
    CHECK_CU(cudaStreamDestroy(st));
    assert_true(all_true(ok));
}
#endif /* MOE_HAVE_CUDA */

EPT_MAIN(
    cmocka_unit_test(test_virtual_nccl),  cmocka_unit_test(test_shared_gpu_mpi),
    cmocka_unit_test(test_placement),     cmocka_unit_test(test_overflow_mpi),
    cmocka_unit_test(test_nccl_refused),  cmocka_unit_test(test_forced_vs_cpu),
    cmocka_unit_test(test_chunks))
