/* ep_cuda.c — expert parallelism on the CUDA backend: the context (device weights, streams,
 * cuBLAS, the NCCL communicator), device buffers and MPI staging, the transports, and the
 * forward in its two modes (sized per call, and sync-free). See ep_cuda.h; the backward is in
 * ep_cuda_bwd.c. Compiled only in CUDA builds. */
#ifdef MOE_HAVE_CUDA

#include "ep_cuda_internal.h"

#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "../dtype.h"
#include "cuda/kernel_launch.h"
#include "ep_pack.h"
#include "moe_kernels.h"
#include "moe_kernels_aux.h"

#define EPC_BLAS_WS ((size_t)32 << 20) /* as cuda_block: cuBLAS's recommended size on Hopper */

/* ------------------------------------------------------------------ buffers ---- */

moe_status epc_dneed(moe_ep_cuda_ctx *c, int set, int id, size_t bytes, moe_error *err)
{
    ep_dbuf *b = &c->d[set][id];
    if (b->p && b->cap >= bytes) return MOE_OK;
    if (set == 0 && c->presized && b->p)
        return moe_fail(err, MOE_ERR_INTERNAL,
                        "rank %d: EP device buffer %d needs %zu bytes but was sized %zu at "
                        "creation (sync-free mode must not allocate)", c->rank, id, bytes, b->cap);
    if (b->p) cudaFree(b->p); /* waits for the device: only in the sized (synchronising) mode */
    b->p = NULL;
    b->cap = 0;
    size_t n = ((bytes ? bytes : 16) + 255) & ~(size_t)255;
    cudaError_t e = cudaMalloc(&b->p, n);
    if (e != cudaSuccess) {
        b->p = NULL;
        cudaGetLastError();
        return moe_fail(err, e == cudaErrorMemoryAllocation ? MOE_ERR_NOMEM : MOE_ERR_CUDA,
                        "rank %d: cudaMalloc of %zu bytes for EP buffer %d: %s", c->rank, n, id,
                        cudaGetErrorString(e));
    }
    b->cap = n;
    return MOE_OK;
}

moe_status epc_hneed(moe_ep_cuda_ctx *c, int set, int id, size_t bytes, moe_error *err)
{
    ep_dbuf *b = &c->hb[set][id];
    if (b->p && b->cap >= bytes) return MOE_OK;
    if (b->p) cudaFreeHost(b->p);
    b->p = NULL;
    b->cap = 0;
    size_t n = ((bytes ? bytes : 16) + 255) & ~(size_t)255;
    cudaError_t e = cudaMallocHost(&b->p, n);
    if (e != cudaSuccess) {
        b->p = NULL;
        cudaGetLastError();
        return moe_fail(err, MOE_ERR_NOMEM, "rank %d: cudaMallocHost of %zu bytes (MPI staging): %s",
                        c->rank, n, cudaGetErrorString(e));
    }
    b->cap = n;
    return MOE_OK;
}

/* Forward buffers of one set for T source tokens, S send rows, R receive rows and Rmax rows
 * in one round (sized mode; backward adds its own in ep_cuda_bwd.c). */
static moe_status reserve_fwd(moe_ep_cuda_ctx *c, int set, int64_t T, int64_t S, int64_t R,
                              int64_t Rmax, moe_error *err)
{
    size_t d = c->dsz, H = (size_t)c->H, I = (size_t)c->I, k = (size_t)c->k,
           E = (size_t)c->E, Is = (size_t)c->Is, G = (size_t)c->G, D = (size_t)c->D,
           C = (size_t)c->opts.chunks;
    size_t t = (size_t)T, s = (size_t)S, r = (size_t)R, rk = (size_t)Rmax * k;
    struct {
        int id;
        size_t bytes;
    } need[] = {
        {DB_LOGITS, t * E * d}, {DB_IDS, t * k * 4},      {DB_W, t * k * d},
        {DB_TDEST, t * D * 4},  {DB_TN, t * 4},           {DB_TROW, t * D * 4},
        {DB_DCOUNT, G * C * 4}, {DB_BASE, G * C * 8},     {DB_SGU, t * 2 * Is * d},
        {DB_SACT, t * Is * d},  {DB_SHOUT, t * H * d},    {DB_SEND_X, s * H * d},
        {DB_SEND_IDS, s * k * 4}, {DB_SEND_W, s * k * d}, {DB_BACK, s * H * d},
        {DB_RECV_X, r * H * d}, {DB_RECV_IDS, r * k * 4}, {DB_RECV_W, r * k * d},
        {DB_PART, r * H * d},   {DB_COUNTS, (size_t)c->epv * 4},
        {DB_OFFS, ((size_t)c->epv + 1) * 4}, {DB_GATHER, rk * 4},
        {DB_SORT, moe_cuda_sort_scratch_bytes((int)(Rmax > 0 ? Rmax : 1), c->k, c->epv)},
        {DB_ACT, rk * I * d},   {DB_ROWS, rk * H * d},
    };
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++)
        MOE_TRY(epc_dneed(c, set, need[i].id, need[i].bytes, err));
    return MOE_OK;
}

/* Sync-free: every forward buffer at creation. Slots of M rows for the G destinations on the
 * send side and for the V rounds x N sources on the receive side; Rc compact rows per round. */
static moe_status reserve_syncfree(moe_ep_cuda_ctx *c, moe_error *err)
{
    int64_t slots = (int64_t)c->G * c->M;
    MOE_TRY(reserve_fwd(c, 0, c->M, slots, slots, c->Rc, err));
    size_t d = c->dsz, H = (size_t)c->H, k = (size_t)c->k, rc = (size_t)c->Rc;
    MOE_TRY(epc_dneed(c, 0, DB_SCNT, (size_t)c->G * 4, err));
    MOE_TRY(epc_dneed(c, 0, DB_RCNT, (size_t)c->G * 4, err));
    MOE_TRY(epc_dneed(c, 0, DB_CX, rc * H * d, err));
    MOE_TRY(epc_dneed(c, 0, DB_CIDS, rc * k * 4, err));
    MOE_TRY(epc_dneed(c, 0, DB_CW, rc * k * d, err));
    MOE_TRY(epc_dneed(c, 0, DB_CPART, rc * H * d, err));
    /* Destination d = q*V + v sends into slot (v*N + q). */
    int64_t *base = malloc((size_t)c->G * sizeof *base);
    if (!base) return moe_fail(err, MOE_ERR_NOMEM, "slot bases");
    for (int dd = 0; dd < c->G; dd++) {
        int q = dd / c->V, v = dd % c->V;
        base[dd] = ((int64_t)v * c->N + q) * c->M;
    }
    cudaError_t e = cudaMalloc((void **)&c->d_slotbase, (size_t)c->G * sizeof *base);
    if (e == cudaSuccess)
        e = cudaMemcpy(c->d_slotbase, base, (size_t)c->G * sizeof *base, cudaMemcpyHostToDevice);
    free(base);
    EPC_CU(e, "slot bases");
    c->presized = true;
    return MOE_OK;
}

/* ------------------------------------------------------------------ cuBLAS ---- */

static cudaDataType_t blas_type(moe_dtype dt)
{
    return dt == MOE_DTYPE_BF16 ? CUDA_R_16BF : dt == MOE_DTYPE_F16 ? CUDA_R_16F : CUDA_R_32F;
}

moe_status epc_gemm(moe_ep_cuda_ctx *c, cublasHandle_t h, moe_dtype cdt, int M, int N, int K,
                    const void *A, int lda, bool a_km, const void *B, int ldb, bool b_kn,
                    void *C, int ldc, const char *what, moe_error *err)
{
    if (M == 0 || N == 0 || K == 0) return MOE_OK; /* callers zero C where K = 0 matters */
    const float alpha = 1.0f, beta = 0.0f;
    cudaDataType_t t = blas_type(c->dt);
    /* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T (as cuda_block). */
    cublasStatus_t s = cublasGemmEx(h, b_kn ? CUBLAS_OP_N : CUBLAS_OP_T,
                                    a_km ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B, t, ldb,
                                    A, t, lda, &beta, C, blas_type(cdt), ldc, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
        return moe_fail(err, MOE_ERR_CUDA, "rank %d: %s: cuBLAS %s", c->rank, what,
                        cublasGetStatusString(s));
    return MOE_OK;
}

static moe_status blas_handle(moe_ep_cuda_ctx *c, cublasHandle_t *h, void **ws, cudaStream_t s,
                              moe_error *err)
{
    if (cublasCreate(h) != CUBLAS_STATUS_SUCCESS) {
        *h = NULL;
        return moe_fail(err, MOE_ERR_CUDA, "rank %d: cublasCreate failed", c->rank);
    }
    /* The settings of cuda_block (fp32 compute without TF32, no reduced-precision split-K, a
     * fixed workspace), so the router logits and the shared expert match the plain path. */
    cublasStatus_t st = cublasSetStream(*h, s);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasSetMathMode(*h, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
                                                  CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    if (st != CUBLAS_STATUS_SUCCESS)
        return moe_fail(err, MOE_ERR_CUDA, "rank %d: cuBLAS set-up: %s", c->rank,
                        cublasGetStatusString(st));
    EPC_CU(cudaMalloc(ws, EPC_BLAS_WS), "cuBLAS workspace");
    st = cublasSetWorkspace(*h, *ws, EPC_BLAS_WS);
    if (st != CUBLAS_STATUS_SUCCESS)
        return moe_fail(err, MOE_ERR_CUDA, "rank %d: cublasSetWorkspace: %s", c->rank,
                        cublasGetStatusString(st));
    return MOE_OK;
}

/* ------------------------------------------------------------------ streams ---- */

moe_status epc_stream_wait(moe_ep_cuda_ctx *c, moe_error *err)
{
    EPC_CU(cudaEventRecord(c->ev_sync, c->s), "cudaEventRecord");
    if (!c->nccl) {
        EPC_CU(cudaEventSynchronize(c->ev_sync), "waiting for the EP stream");
        return MOE_OK;
    }
    /* A dead peer or a broken link shows up as an asynchronous NCCL error, not as a hang. */
    for (;;) {
        cudaError_t e = cudaEventQuery(c->ev_sync);
        if (e == cudaSuccess) return MOE_OK;
        if (e != cudaErrorNotReady) EPC_CU(e, "waiting for the EP stream");
        ncclResult_t async = ncclSuccess;
        EPC_NCCL(ncclCommGetAsyncError(c->nccl, &async), "ncclCommGetAsyncError");
        if (async != ncclSuccess && async != ncclInProgress) {
            ncclCommAbort(c->nccl);
            c->nccl = NULL;
            return moe_fail(err, MOE_ERR_NCCL, "rank %d: NCCL communicator (asynchronous error): %s",
                            c->rank, ncclGetErrorString(async));
        }
        sched_yield();
    }
}

moe_status epc_fork(moe_ep_cuda_ctx *c, moe_error *err)
{
    EPC_CU(cudaEventRecord(c->ev_fork, c->s), "fork event");
    EPC_CU(cudaStreamWaitEvent(c->s1, c->ev_fork, 0), "fork wait");
    return MOE_OK;
}

moe_status epc_join(moe_ep_cuda_ctx *c, moe_error *err)
{
    EPC_CU(cudaEventRecord(c->ev_join, c->s1), "join event");
    EPC_CU(cudaStreamWaitEvent(c->s, c->ev_join, 0), "join wait");
    return MOE_OK;
}

/* ------------------------------------------------------------------ context ---- */

static void free_bufs(moe_ep_cuda_ctx *c)
{
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < DB_NUM; i++) {
            if (c->d[s][i].p) cudaFree(c->d[s][i].p);
            if (c->hb[s][i].p) cudaFreeHost(c->hb[s][i].p);
        }
    memset(c->d, 0, sizeof c->d);
    memset(c->hb, 0, sizeof c->hb);
}

void moe_ep_cuda_ctx_destroy(moe_ep_cuda_ctx *c)
{
    if (!c) return;
    if (c->device >= 0) cudaSetDevice(c->device);
    if (c->s) cudaStreamSynchronize(c->s);
    if (c->s1) cudaStreamSynchronize(c->s1);
    if (c->s2) cudaStreamSynchronize(c->s2);
    cuda_block_destroy(c->blk);
    if (c->nccl) ncclCommDestroy(c->nccl);
    if (c->h) cublasDestroy(c->h);
    if (c->h1) cublasDestroy(c->h1);
    free_bufs(c);
    void *dev[] = {c->blas_ws, c->blas_ws1, c->router, c->w13, c->w2, c->sgu_w, c->sdown,
                   c->d_status, c->d_slotbase, c->tuning.sched_counters};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) cudaFree(dev[i]);
    if (c->h_dcount) cudaFreeHost(c->h_dcount);
    if (c->h_base) cudaFreeHost(c->h_base);
    if (c->h_grep) cudaFreeHost(c->h_grep);
    if (c->ev_fork) cudaEventDestroy(c->ev_fork);
    if (c->ev_join) cudaEventDestroy(c->ev_join);
    if (c->ev_sync) cudaEventDestroy(c->ev_sync);
    if (c->ev_t0) cudaEventDestroy(c->ev_t0);
    if (c->ev_pk) cudaEventDestroy(c->ev_pk);
    if (c->ev_tl) {
        for (int i = 0; i < 6 * c->opts.chunks; i++)
            if (c->ev_tl[i]) cudaEventDestroy(c->ev_tl[i]);
        free(c->ev_tl);
    }
    if (c->s2) cudaStreamDestroy(c->s2);
    if (c->s) cudaStreamDestroy(c->s);
    if (c->s1) cudaStreamDestroy(c->s1);
    cudaGetLastError();
    moe_ep_ctx_destroy(c->ep);
    free(c);
}

static moe_status upload(moe_ep_cuda_ctx *c, void **dst, const void *src, size_t bytes,
                         const char *what, moe_error *err)
{
    EPC_CU(cudaMalloc(dst, bytes ? bytes : 16), what);
    if (bytes) EPC_CU(cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice), what);
    return MOE_OK;
}

/* Local checks of what the CUDA path adds to moe_ep_ctx_create's. */
static moe_status check_local(const moe_ep_cuda_ctx *c, moe_error *err)
{
    const moe_ep_options *o = &c->opts;
    if (o->chunks < 1 || o->chunks > 4096)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "chunks=%d: expected 1 to 4096", o->chunks);
    if (o->max_tokens_per_rank < 0 || o->max_recv_tokens < 0 ||
        (o->max_recv_tokens > 0 && o->max_tokens_per_rank == 0))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "max_tokens_per_rank=%lld, max_recv_tokens=%lld: both >= 0, and the "
                        "receive bound needs max_tokens_per_rank",
                        (long long)o->max_tokens_per_rank, (long long)o->max_recv_tokens);
    if ((int64_t)o->max_tokens_per_rank * c->k > INT_MAX / 2 ||
        (int64_t)o->max_tokens_per_rank * c->G > INT_MAX / 2)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "max_tokens_per_rank=%lld is too large",
                        (long long)o->max_tokens_per_rank);
    if (c->k > MOE_EP_PACK_MAX_K)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "top_k=%d: the CUDA EP plan handles k <= %d",
                        c->k, MOE_EP_PACK_MAX_K);
    if (c->dt != MOE_DTYPE_BF16 && c->dt != MOE_DTYPE_F16 && c->dt != MOE_DTYPE_F32)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "EP on the CUDA backend: dtype %s (bf16, fp16, fp32)",
                        moe_dtype_name(c->dt));
    return MOE_OK;
}

/* Same sizing and transport on every rank (moe_ep_ctx_create checked the rest). */
static moe_status check_same(moe_ep_cuda_ctx *c, moe_error *err)
{
    int64_t v[4] = {c->opts.max_tokens_per_rank, c->opts.max_recv_tokens, c->opts.transport,
                    c->opts.chunks};
    int64_t lo[4], hi[4];
    int rc = MPI_Allreduce(v, lo, 4, MPI_INT64_T, MPI_MIN, c->ep->comm);
    if (rc == MPI_SUCCESS) rc = MPI_Allreduce(v, hi, 4, MPI_INT64_T, MPI_MAX, c->ep->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, c->rank, "MPI_Allreduce (options)");
    static const char *names[4] = {"max_tokens_per_rank", "max_recv_tokens", "transport", "chunks"};
    for (int i = 0; i < 4; i++)
        if (lo[i] != hi[i])
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "ranks disagree on %s (from %lld to %lld): every rank must use the "
                            "same EP options", names[i], (long long)lo[i], (long long)hi[i]);
    return MOE_OK;
}

/* Pick the transport and the GPU. NCCL needs one GPU per rank; MPI lets ranks share. */
static moe_status pick_device(moe_ep_cuda_ctx *c, moe_error *err)
{
    MPI_Comm local = MPI_COMM_NULL;
    int lrank = 0, lsize = 1, ndev = 0;
    int rc = MPI_Comm_split_type(c->ep->comm, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &local);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(local, &lrank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(local, &lsize);
    if (local != MPI_COMM_NULL) MPI_Comm_free(&local);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, c->rank, "MPI_Comm_split_type (node-local ranks)");
    cudaError_t e = cudaGetDeviceCount(&ndev);
    moe_status st = MOE_OK;
    if (e != cudaSuccess || ndev == 0) {
        cudaGetLastError();
        st = moe_fail(err, MOE_ERR_NO_DEVICE, "rank %d: the CUDA backend's EP needs a GPU: %s",
                      c->rank, e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    }
    /* AUTO: NCCL only when every rank of every node has its own GPU (decided together). */
    int can = st == MOE_OK && (c->opts.device >= 0 || lsize <= ndev) ? 1 : 0, all = 0;
    rc = MPI_Allreduce(&can, &all, 1, MPI_INT, MPI_MIN, c->ep->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, c->rank, "MPI_Allreduce (transport)");
    if (c->opts.transport == MOE_EP_TRANSPORT_AUTO)
        c->opts.transport = all ? MOE_EP_TRANSPORT_NCCL : MOE_EP_TRANSPORT_MPI;
    c->use_nccl = c->opts.transport == MOE_EP_TRANSPORT_NCCL && !c->plain;
    if (st != MOE_OK) return st;
    if (c->use_nccl && c->opts.device < 0 && lsize > ndev)
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "rank %d: %d ranks on this node but %d GPU%s: NCCL needs one GPU per rank "
                        "(use --transport mpi to share a GPU)",
                        c->rank, lsize, ndev, ndev == 1 ? "" : "s");
    c->device = c->opts.device >= 0 ? c->opts.device : lrank % ndev;
    if (c->device >= ndev)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "rank %d: device %d but only %d GPUs", c->rank,
                        c->device, ndev);
    return MOE_OK;
}

static moe_status setup_device(moe_ep_cuda_ctx *c, const moe_weights *w, moe_error *err)
{
    EPC_CU(cudaSetDevice(c->device), "cudaSetDevice");
    EPC_CU(cudaStreamCreateWithFlags(&c->s, cudaStreamNonBlocking), "cudaStreamCreate");
    EPC_CU(cudaStreamCreateWithFlags(&c->s1, cudaStreamNonBlocking), "cudaStreamCreate");
    EPC_CU(cudaEventCreateWithFlags(&c->ev_fork, cudaEventDisableTiming), "cudaEventCreate");
    EPC_CU(cudaEventCreateWithFlags(&c->ev_join, cudaEventDisableTiming), "cudaEventCreate");
    EPC_CU(cudaEventCreateWithFlags(&c->ev_sync, cudaEventDisableTiming), "cudaEventCreate");
    EPC_CU(cudaMalloc((void **)&c->d_status, 4 * sizeof(int32_t)), "status flag");
    EPC_CU(cudaMemset(c->d_status, 0, 4 * sizeof(int32_t)), "status flag");
    MOE_TRY(moe_sched_counters_alloc(&c->tuning.sched_counters, c->s, err));
    moe_kernel_tuning_apply_env(&c->tuning); /* -DMOE_DIAGNOSTICS=ON builds only (docs/ENV.md) */
    size_t CG = (size_t)c->G * c->opts.chunks;
    EPC_CU(cudaMallocHost((void **)&c->h_dcount, CG * sizeof(int32_t)), "counts");
    EPC_CU(cudaMallocHost((void **)&c->h_base, CG * sizeof(int64_t)), "bases");
    if (c->plain) return MOE_OK; /* the block holds its own weights */
    if (c->opts.chunks > 1) {
        EPC_CU(cudaStreamCreateWithFlags(&c->s2, cudaStreamNonBlocking), "cudaStreamCreate");
        EPC_CU(cudaEventCreate(&c->ev_t0), "cudaEventCreate");
        EPC_CU(cudaEventCreateWithFlags(&c->ev_pk, cudaEventDisableTiming), "cudaEventCreate");
        c->ev_tl = calloc((size_t)6 * c->opts.chunks, sizeof *c->ev_tl);
        if (!c->ev_tl) return moe_fail(err, MOE_ERR_NOMEM, "chunk events");
        for (int i = 0; i < 6 * c->opts.chunks; i++)
            EPC_CU(cudaEventCreate(&c->ev_tl[i]), "cudaEventCreate");
        /* the inner ctx was made with one chunk: room for this ctx's timeline */
        moe_ep_chunk_times *tl = realloc(c->ep->call.timeline,
                                         (size_t)c->opts.chunks * sizeof *tl);
        if (!tl) return moe_fail(err, MOE_ERR_NOMEM, "chunk timeline");
        memset(tl, 0, (size_t)c->opts.chunks * sizeof *tl);
        c->ep->call.timeline = tl;
        c->ep->call.timeline_cap = c->opts.chunks;
    }
    MOE_TRY(blas_handle(c, &c->h, &c->blas_ws, c->s, err));
    MOE_TRY(blas_handle(c, &c->h1, &c->blas_ws1, c->s1, err));
    MOE_TRY(upload(c, &c->router, w->router.data, w->router.nbytes, "router", err));
    MOE_TRY(upload(c, &c->w13, w->w13.data, w->w13.nbytes, "w13", err));
    MOE_TRY(upload(c, &c->w2, w->w2.data, w->w2.nbytes, "w2", err));
    if (c->shared) {
        size_t half = (size_t)c->Is * c->H * c->dsz;
        EPC_CU(cudaMalloc(&c->sgu_w, 2 * half), "shared gate|up");
        EPC_CU(cudaMemcpy(c->sgu_w, w->shared_gate.data, half, cudaMemcpyHostToDevice), "shared_gate");
        EPC_CU(cudaMemcpy((char *)c->sgu_w + half, w->shared_up.data, half, cudaMemcpyHostToDevice),
               "shared_up");
        MOE_TRY(upload(c, &c->sdown, w->shared_down.data, w->shared_down.nbytes, "shared_down", err));
    }
    return MOE_OK;
}

/* The communicator: rank 0's unique id travels with its status over MPI (as the NCCL
 * transport of the CPU backend does). Collective; agreed by the caller. */
static moe_status nccl_init(moe_ep_cuda_ctx *c, moe_status st, moe_error *err)
{
    struct {
        int status;
        ncclUniqueId id;
    } boot;
    memset(&boot, 0, sizeof boot);
    if (c->rank == 0 && st == MOE_OK) {
        ncclResult_t r = ncclGetUniqueId(&boot.id);
        if (r != ncclSuccess) {
            moe_fail(err, MOE_ERR_NCCL, "rank 0: ncclGetUniqueId failed: %s", ncclGetErrorString(r));
            boot.status = MOE_ERR_NCCL;
        }
    }
    int rc = MPI_Bcast(&boot, (int)sizeof boot, MPI_BYTE, 0, c->ep->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, c->rank, "MPI_Bcast (ncclUniqueId)");
    if (boot.status != MOE_OK)
        return c->rank == 0 ? MOE_ERR_NCCL
                            : moe_fail(err, MOE_ERR_NCCL, "rank 0 could not create the NCCL unique id");
    if (st != MOE_OK) return st;
    ncclResult_t r = ncclCommInitRank(&c->nccl, c->N, boot.id, c->rank);
    if (r != ncclSuccess) {
        c->nccl = NULL;
        return moe_fail(err, MOE_ERR_NCCL, "rank %d: ncclCommInitRank failed: %s", c->rank,
                        ncclGetErrorString(r));
    }
    return MOE_OK;
}

moe_status moe_ep_cuda_ctx_create(MPI_Comm comm, const moe_weights *w, const moe_ep_options *opts,
                                  moe_ep_cuda_ctx **out, moe_error *err)
{
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "EP (CUDA) context: out is NULL");
    *out = NULL;
    moe_ep_options defaults = MOE_EP_OPTIONS_INIT;
    moe_ep_cuda_ctx *c = calloc(1, sizeof *c);
    if (!c) return moe_fail(err, MOE_ERR_NOMEM, "EP (CUDA) context");
    c->device = -1;
    c->opts = opts ? *opts : defaults;
    /* The inner context validates the model, the slice and the options on every rank and
     * agrees on the result; it carries the counts over MPI. Its own host buffers stay unsized
     * (max_tokens_per_rank 0): the payload lives on the device here. */
    moe_ep_options io = c->opts;
    io.transport = MOE_EP_TRANSPORT_MPI;
    io.max_tokens_per_rank = 0;
    io.max_recv_tokens = 0;
    io.chunks = 1;
    moe_status st = moe_ep_ctx_create(comm, w, &io, &c->ep, err);
    if (st != MOE_OK) {
        free(c);
        return st;
    }
    moe_ep_ctx *ep = c->ep;
    c->rank = ep->rank;
    c->N = ep->nranks;
    c->V = ep->V;
    c->G = ep->G;
    c->E = ep->E;
    c->El = w->expert_count;
    c->epv = ep->epv;
    c->H = ep->H;
    c->I = ep->I;
    c->k = ep->k;
    c->Is = ep->Is;
    c->D = c->k < c->G ? c->k : c->G;
    c->cfg = ep->cfg;
    c->dt = ep->dt;
    c->dsz = ep->dsz;
    c->plain = ep->plain;
    c->forced = ep->opts.route.mode != MOE_EP_ROUTE_ROUTER;
    c->llama = c->cfg.arch == MOE_ARCH_LLAMA4;
    c->shared = c->Is > 0;
    c->M = c->opts.max_tokens_per_rank;

    st = check_local(c, err);
    st = ep_agree(ep->comm, st, err);
    if (st == MOE_OK) st = ep_agree(ep->comm, check_same(c, err), err);
    if (st == MOE_OK) st = ep_agree(ep->comm, pick_device(c, err), err);
    if (st == MOE_OK && c->opts.chunks > 1 && c->M > 0 && c->use_nccl && !c->plain)
        st = ep_agree(ep->comm,
                      moe_fail(err, MOE_ERR_UNSUPPORTED,
                               "--chunks %d with max_tokens_per_rank over NCCL (sync-free mode): "
                               "the sync-free forward runs as one chunk", c->opts.chunks), err);
    if (st == MOE_OK) {
        c->syncfree = c->M > 0 && c->use_nccl && !c->plain;
        int64_t per_round = (int64_t)c->N * c->M;
        c->Rc = c->opts.max_recv_tokens > 0 && c->opts.max_recv_tokens < per_round
                    ? c->opts.max_recv_tokens : per_round;
        st = ep_agree(ep->comm, setup_device(c, w, err), err);
    }
    if (st == MOE_OK && c->use_nccl) st = ep_agree(ep->comm, nccl_init(c, st, err), err);
    if (st == MOE_OK && c->M > 0) {
        moe_status ls = MOE_OK;
        if (c->plain) {
            ls = epc_plain_block(c, (int)c->M, false, err);
        } else if (c->syncfree) {
            ls = reserve_syncfree(c, err);
        } else {
            /* MPI with sizing: the CPU backend's bounds (moe_ep_buffer_sizes_for). */
            moe_ep_buffer_sizes bs;
            ls = moe_ep_buffer_sizes_for(c->M, c->opts.max_recv_tokens, c->N, c->V, &c->cfg,
                                         c->dt, false, &bs, err);
            if (ls == MOE_OK) ls = reserve_fwd(c, 0, c->M, bs.send_rows, bs.recv_rows, bs.recv_rows, err);
            if (ls == MOE_OK) c->opts.max_recv_tokens = bs.recv_rows;
        }
        if (ls == MOE_OK) ls = cudaDeviceSynchronize() == cudaSuccess ? MOE_OK
                              : moe_fail(err, MOE_ERR_CUDA, "rank %d: set-up", c->rank);
        st = ep_agree(ep->comm, ls, err);
    }
    if (st != MOE_OK) {
        moe_ep_cuda_ctx_destroy(c);
        return st;
    }
    const char *tn = c->plain ? "none" : c->use_nccl ? "nccl" : "mpi";
    snprintf(ep->total.transport, sizeof ep->total.transport, "%s", tn);
    snprintf(ep->call.transport, sizeof ep->call.transport, "%s", tn);
    *out = c;
    return MOE_OK;
}

cudaStream_t moe_ep_cuda_stream(const moe_ep_cuda_ctx *c) { return c->s; }
int moe_ep_cuda_device(const moe_ep_cuda_ctx *c) { return c->device; }
const char *moe_ep_cuda_transport(const moe_ep_cuda_ctx *c)
{
    return c->plain ? "none" : c->use_nccl ? "nccl" : "mpi";
}
bool moe_ep_cuda_syncfree(const moe_ep_cuda_ctx *c) { return c->syncfree; }
const moe_ep_stats *moe_ep_cuda_stats(const moe_ep_cuda_ctx *c) { return &c->ep->total; }
void moe_ep_cuda_reset_stats(moe_ep_cuda_ctx *c) { moe_ep_stats_reset(&c->ep->total); }

moe_status moe_ep_cuda_grads_alloc(const moe_ep_cuda_ctx *c, cuda_block_grads *g, moe_error *err)
{
    if (!c || !g) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_cuda_grads_alloc: NULL argument");
    memset(g, 0, sizeof *g);
    size_t es = c->dsz, H = (size_t)c->H, I = (size_t)c->I, Is = (size_t)c->Is;
    moe_status s;
    if ((s = cuda_dev_alloc(&g->router, (size_t)c->E * H * es, "d router", err)) != MOE_OK ||
        (s = cuda_dev_alloc(&g->w13, (size_t)c->El * 2 * I * H * es, "d w13", err)) != MOE_OK ||
        (s = cuda_dev_alloc(&g->w2, (size_t)c->El * H * I * es, "d w2", err)) != MOE_OK ||
        (c->shared &&
         ((s = cuda_dev_alloc(&g->shared_gate, Is * H * es, "d shared_gate", err)) != MOE_OK ||
          (s = cuda_dev_alloc(&g->shared_up, Is * H * es, "d shared_up", err)) != MOE_OK ||
          (s = cuda_dev_alloc(&g->shared_down, H * Is * es, "d shared_down", err)) != MOE_OK))) {
        cuda_block_grads_free(g);
        return s;
    }
    return MOE_OK;
}

moe_status moe_ep_cuda_check(moe_ep_cuda_ctx *c, moe_error *err)
{
    if (!c) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_cuda_check: ctx is NULL");
    EPC_CU(cudaSetDevice(c->device), "cudaSetDevice");
    MOE_TRY(epc_stream_wait(c, err));
    EPC_CU(cudaStreamSynchronize(c->s1), "waiting for the shared-expert stream");
    int32_t st[2] = {0, 0};
    EPC_CU(cudaMemcpy(st, c->d_status, sizeof st, cudaMemcpyDeviceToHost), "reading the status flag");
    if (st[0] == 0) return MOE_OK;
    EPC_CU(cudaMemset(c->d_status, 0, 2 * sizeof(int32_t)), "clearing the status flag");
    return moe_fail(err, MOE_ERR_INVALID_ARG,
                    "rank %d: receive buffer overflow: %d token rows arrived in one call but "
                    "max_recv_tokens=%lld (sync-free buffers sized in advance). The rows past "
                    "the bound were not computed, so this call's output is invalid; raise "
                    "max_recv_tokens or rebalance the routing",
                    c->rank, st[1], (long long)c->opts.max_recv_tokens);
}

/* ------------------------------------------------------------------ helpers ---- */

void epc_call_end(moe_ep_cuda_ctx *c, moe_ep_stats *stats, double t0)
{
    c->ep->call.seconds = moe_now() - t0;
    moe_ep_stats_add(&c->ep->total, &c->ep->call);
    if (stats) moe_ep_stats_add(stats, &c->ep->call);
}

moe_status epc_check_call(moe_ep_cuda_ctx *c, const char *fn, int T, const void *x, const void *a,
                          const char *aname, const void *b, const char *bname, moe_error *err)
{
    if (T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T_local=%d is negative", fn, T);
    if (T > 0 && (!x || !a || (bname && !b)))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: %d tokens but %s is NULL", fn, T,
                        !x ? "x" : !a ? aname : bname);
    if ((int64_t)T * c->k > INT_MAX / 2 || (int64_t)T * c->G > INT_MAX / 2)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: T_local=%d is too large", fn, T);
    if (c->M > 0 && T > c->M)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: %d local tokens exceed max_tokens_per_rank=%lld (buffers are sized "
                        "for it in advance)", fn, T, (long long)c->M);
    return MOE_OK;
}

moe_status epc_global_offset(moe_ep_cuda_ctx *c, int T, int64_t *g0, moe_error *err)
{
    *g0 = 0;
    if (c->N == 1) return MOE_OK;
    int64_t t = T, r = 0;
    int rc = MPI_Exscan(&t, &r, 1, MPI_INT64_T, MPI_SUM, c->ep->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, c->rank, "MPI_Exscan (token offset)");
    *g0 = c->rank == 0 ? 0 : r; /* MPI leaves rank 0's result undefined */
    return MOE_OK;
}

moe_status epc_plain_block(moe_ep_cuda_ctx *c, int T, bool bwd, moe_error *err)
{
    if (c->blk && T <= c->blk_T && (!bwd || c->blk_bwd)) return MOE_OK;
    int nt = T > c->blk_T ? T : c->blk_T;
    if (nt < 1) nt = 1;
    bool nb = bwd || c->blk_bwd;
    cuda_block_destroy(c->blk);
    c->blk = NULL;
    EPC_CU(cudaSetDevice(c->device), "cudaSetDevice");
    MOE_TRY(cuda_block_create(c->ep->w, nt, nb, &c->blk, err));
    c->blk_T = nt;
    c->blk_bwd = nb;
    return cuda_block_set_stream(c->blk, c->s, err);
}

moe_status epc_route(moe_ep_cuda_ctx *c, int set, int T, const void *x, int64_t g0, void *logits,
                     int32_t *ids, void *w, moe_error *err)
{
    if (T == 0) return MOE_OK;
    /* logits [T,E] = round(x [T,H] @ router^T), as cuda_block computes them. */
    MOE_TRY(epc_gemm(c, c->h, c->dt, T, c->E, c->H, x, c->H, false, c->router, c->H, false, logits,
                     c->E, "router GEMM", err));
    if (!c->forced) return moe_cuda_route_topk(&c->cfg, c->dt, T, logits, ids, w, NULL, c->s, err);
    /* Forced routing is defined on the host (ep.h): the ids are a function of the global
     * token index, the weights of the logits at those ids. */
    size_t tk = (size_t)T * c->k;
    MOE_TRY(epc_hneed(c, set, DB_LOGITS, (size_t)T * c->E * c->dsz, err));
    MOE_TRY(epc_hneed(c, set, DB_IDS, tk * 4, err));
    MOE_TRY(epc_hneed(c, set, DB_W, tk * c->dsz, err));
    void *hl = c->hb[set][DB_LOGITS].p, *hw = c->hb[set][DB_W].p;
    int32_t *hi = c->hb[set][DB_IDS].p;
    EPC_CU(cudaMemcpyAsync(hl, logits, (size_t)T * c->E * c->dsz, cudaMemcpyDeviceToHost, c->s),
           "router logits to the host (forced routing)");
    MOE_TRY(epc_stream_wait(c, err));
    MOE_TRY(moe_ep_route_ids(&c->ep->opts.route, c->E, c->k, c->G, g0, T, hi, err));
    ep_route_weights(&c->cfg, c->dt, c->ep->opts.route.weights, T, hl, hi, hw);
    EPC_CU(cudaMemcpyAsync(ids, hi, tk * 4, cudaMemcpyHostToDevice, c->s), "forced ids");
    EPC_CU(cudaMemcpyAsync(w, hw, tk * c->dsz, cudaMemcpyHostToDevice, c->s), "forced weights");
    return MOE_OK;
}

moe_status epc_shared_forward(moe_ep_cuda_ctx *c, int set, int T, const void *x, void *out,
                              moe_error *err)
{
    if (!c->shared || T == 0) return MOE_OK;
    int H = c->H, Is = c->Is;
    void *sgu = epc_d(c, set, DB_SGU), *sact = epc_d(c, set, DB_SACT);
    /* As cuda_block: gate|up [T,2Is] by one cuBLAS GEMM, SiLU-and-mul, down [T,H]. */
    MOE_TRY(epc_gemm(c, c->h1, c->dt, T, 2 * Is, H, x, H, false, c->sgu_w, H, false, sgu, 2 * Is,
                     "shared gate|up GEMM", err));
    MOE_TRY(moe_cuda_silu_mul(c->dt, T, Is, sgu, sact, c->s1, err));
    if (out)
        MOE_TRY(epc_gemm(c, c->h1, c->dt, T, H, Is, sact, Is, false, c->sdown, Is, false, out, H,
                         "shared down GEMM", err));
    return MOE_OK;
}

/* ------------------------------------------------------------------ plan and transport ---- */

moe_status epc_plan_sized(moe_ep_cuda_ctx *c, int set, int T, const int32_t *ids, int C,
                          const int32_t *cb, ep_plan *p, int *phase, moe_error *err)
{
    int N = c->N, V = c->V, G = c->G, D = c->D;
    memset(p, 0, sizeof *p);
    *phase = EPC_PLAN_AGREED;
    moe_status st = MOE_OK;
    p->chunk_begin = moe_malloc(((size_t)C + 1) * sizeof(int32_t), "plan chunks", err);
    if (!p->chunk_begin) st = MOE_ERR_NOMEM;
    if (st == MOE_OK) {
        if (cb) memcpy(p->chunk_begin, cb, ((size_t)C + 1) * sizeof(int32_t));
        else ep_split_even(T, C, p->chunk_begin);
    }
    int32_t *tdest = epc_d(c, set, DB_TDEST), *tn = epc_d(c, set, DB_TN), *trow = epc_d(c, set, DB_TROW);
    int32_t *dcount = epc_d(c, set, DB_DCOUNT);
    for (int i = 0; i < C && st == MOE_OK; i++) {
        int t0 = p->chunk_begin[i], Tc = p->chunk_begin[i + 1] - t0;
        st = moe_cuda_ep_plan(Tc, c->k, ids + (size_t)t0 * c->k, G, c->epv, tdest + (size_t)t0 * D,
                              tn + t0, trow + (size_t)t0 * D, dcount + (size_t)i * G, NULL, c->s, err);
    }
    if (st == MOE_OK) {
        cudaError_t e = cudaMemcpyAsync(c->h_dcount, dcount, (size_t)C * G * sizeof(int32_t),
                                        cudaMemcpyDeviceToHost, c->s);
        st = e == cudaSuccess ? epc_stream_wait(c, err)
                              : moe_fail(err, MOE_ERR_CUDA, "rank %d: counts to the host: %s",
                                         c->rank, cudaGetErrorString(e));
    }
    /* The plan arrays in ep_plan's layout, so ep_plan_exchange and the counters apply. */
    size_t n = (size_t)C * V * N;
    if (st == MOE_OK) {
        p->nranks = N;
        p->rank = c->rank;
        p->V = V;
        p->G = G;
        p->C = C;
        p->E = c->E;
        p->k = c->k;
        p->epv = c->epv;
        p->T = T;
        p->send_rows = moe_calloc(n, sizeof(int64_t), "plan send counts", err);
        p->send_off = moe_calloc(n + 1, sizeof(int64_t), "plan send offsets", err);
        p->recv_rows = moe_calloc(n, sizeof(int64_t), "plan receive counts", err);
        p->recv_off = moe_calloc(n + 1, sizeof(int64_t), "plan receive offsets", err);
        if (!p->send_rows || !p->send_off || !p->recv_rows || !p->recv_off) st = MOE_ERR_NOMEM;
    }
    if (st == MOE_OK) {
        for (int i = 0; i < C; i++)
            for (int d = 0; d < G; d++)
                p->send_rows[((size_t)i * V + d % V) * N + d / V] = c->h_dcount[(size_t)i * G + d];
        int64_t at = 0;
        for (size_t i = 0; i < n; i++) {
            p->send_off[i] = at;
            at += p->send_rows[i];
        }
        p->send_off[n] = at;
        p->send_total = at;
    }
    st = ep_agree(c->ep->comm, st, err);
    if (st != MOE_OK) return st;
    st = ep_plan_exchange(p, c->ep->tp, err);
    if (st != MOE_OK) {
        *phase = EPC_PLAN_FATAL;
        return ep_fatal(c->ep, st, err);
    }
    *phase = EPC_PLAN_EXCHANGED;
    st = ep_plan_check_capacity(p, c->M, c->opts.max_recv_tokens, err);
    if (st == MOE_OK) {
        for (int i = 0; i < C; i++)
            for (int d = 0; d < G; d++)
                c->h_base[(size_t)i * G + d] = p->send_off[((size_t)i * V + d % V) * N + d / V];
        cudaError_t e = cudaMemcpyAsync(epc_d(c, set, DB_BASE), c->h_base,
                                        (size_t)C * G * sizeof(int64_t), cudaMemcpyHostToDevice, c->s);
        if (e != cudaSuccess)
            st = moe_fail(err, MOE_ERR_CUDA, "rank %d: dest bases: %s", c->rank, cudaGetErrorString(e));
    }
    return st;
}

void epc_count(moe_ep_cuda_ctx *c, const ep_plan *p, bool backward)
{
    moe_ep_chunk_times *tl = c->ep->call.timeline;
    int C = p->C <= c->ep->call.timeline_cap ? p->C : c->ep->call.timeline_cap;
    c->ep->call.nchunks = C;
    for (int i = 0; tl && i < C; i++) tl[i].rows_sent = tl[i].rows_recv = 0; /* this call's */
    for (int i = 0; i < p->C; i++)
        for (int v = 0; v < c->V; v++) {
            ep_count_round(c->ep, p, i, v, backward);
            int64_t R = ep_round_recv_rows(p, i, v);
            c->ep->call.tokens_computed += (uint64_t)R;
            if (tl && i < C) {
                tl[i].rows_sent += ep_round_send_rows(p, i, v);
                tl[i].rows_recv += R;
            }
        }
    if (tl)
        for (int i = 0; i < C; i++) tl[i].tokens = p->chunk_begin[i + 1] - p->chunk_begin[i];
}

/* Grouped ncclSend/ncclRecv of every round and buffer of chunk ch on stream st. */
static moe_status nccl_exchange(moe_ep_cuda_ctx *c, const ep_plan *p, int ch, bool back, int nb,
                                void *const *snd, void *const *rcv, const size_t *row,
                                cudaStream_t stream, moe_error *err)
{
    int N = c->N;
    EPC_NCCL(ncclGroupStart(), "ncclGroupStart");
    ncclResult_t r = ncclSuccess;
    for (int v = 0; v < c->V && r == ncclSuccess; v++)
        for (int b = 0; b < nb && r == ncclSuccess; b++)
            for (int q = 0; q < N && r == ncclSuccess; q++) {
                size_t i = ((size_t)ch * c->V + v) * N + q;
                int64_t sr = back ? p->recv_rows[i] : p->send_rows[i];
                int64_t so = back ? p->recv_off[i] : p->send_off[i];
                int64_t rr = back ? p->send_rows[i] : p->recv_rows[i];
                int64_t ro = back ? p->send_off[i] : p->recv_off[i];
                if (sr > 0)
                    r = ncclSend((const char *)snd[b] + (size_t)so * row[b], (size_t)sr * row[b],
                                 ncclUint8, q, c->nccl, stream);
                if (r == ncclSuccess && rr > 0)
                    r = ncclRecv((char *)rcv[b] + (size_t)ro * row[b], (size_t)rr * row[b],
                                 ncclUint8, q, c->nccl, stream);
            }
    ncclResult_t r2 = ncclGroupEnd();
    if (r == ncclSuccess) r = r2;
    if (r != ncclSuccess)
        return moe_fail(err, MOE_ERR_NCCL, "rank %d: ncclSend/ncclRecv (%s): %s", c->rank,
                        back ? "combine" : "dispatch", ncclGetErrorString(r));
    return MOE_OK;
}

/* Start round (ch, v) of an MPI transfer of nb host-staged buffers (buffer set `set`'s pinned
 * buffers hs -> hr): forward from send rows to receive rows, or back. The transport copies the
 * counts, so the layout scratch L [4N] can be reused at once. */
static moe_status mpi_round_start(moe_ep_cuda_ctx *c, int set, const ep_plan *p, int ch, int v, bool back,
                                  int nb, const int *hs, const int *hr, const size_t *row,
                                  const char *const *what, int64_t *L, ep_request *req,
                                  moe_error *err)
{
    int N = c->N;
    size_t base = ((size_t)ch * c->V + v) * N;
    const int64_t *sr = back ? p->recv_rows : p->send_rows, *so = back ? p->recv_off : p->send_off;
    const int64_t *rr = back ? p->send_rows : p->recv_rows, *ro = back ? p->send_off : p->recv_off;
    for (int q = 0; q < N; q++) {
        L[q] = sr[base + q];
        L[N + q] = so[base + q] - so[base];
        L[2 * N + q] = rr[base + q];
        L[3 * N + q] = ro[base + q] - ro[base];
    }
    ep_xfer x;
    memset(&x, 0, sizeof x);
    x.nbufs = nb;
    for (int b = 0; b < nb; b++) {
        x.send[b] = (char *)c->hb[set][hs[b]].p + (size_t)so[base] * row[b];
        x.recv[b] = (char *)c->hb[set][hr[b]].p + (size_t)ro[base] * row[b];
        x.row_bytes[b] = row[b];
        x.what[b] = what[b];
    }
    x.send_rows = L;
    x.send_off = L + N;
    x.recv_rows = L + 2 * N;
    x.recv_off = L + 3 * N;
    return c->ep->tp->start(c->ep->tp, &x, req, err);
}

/* MPI: stage the device rows through pinned host buffers, one MPI_Ialltoallv per round and
 * buffer (the CPU backend's transport), and back to the device. */
static moe_status mpi_exchange(moe_ep_cuda_ctx *c, int set, const ep_plan *p, bool back, int nb,
                               void *const *snd, void *const *rcv, const size_t *row,
                               const int *hs, const int *hr, const char *const *what,
                               moe_error *err)
{
    int N = c->N, V = c->V;
    int64_t stot = back ? p->recv_total : p->send_total;
    int64_t rtot = back ? p->send_total : p->recv_total;
    for (int b = 0; b < nb; b++) {
        MOE_TRY(epc_hneed(c, set, hs[b], (size_t)stot * row[b], err));
        MOE_TRY(epc_hneed(c, set, hr[b], (size_t)rtot * row[b], err));
        if (stot)
            EPC_CU(cudaMemcpyAsync(c->hb[set][hs[b]].p, snd[b], (size_t)stot * row[b],
                                   cudaMemcpyDeviceToHost, c->s), "EP rows to the host (MPI)");
    }
    MOE_TRY(epc_stream_wait(c, err));
    ep_request *req = moe_calloc((size_t)V, sizeof *req, "EP requests", err);
    int64_t *lay = moe_malloc(4 * (size_t)N * V * sizeof(int64_t), "EP layout", err);
    moe_status st = req && lay ? MOE_OK : MOE_ERR_NOMEM;
    /* a layout scratch per round (the transport copies the counts, so one would do) */
    for (int v = 0; v < V && st == MOE_OK; v++)
        st = mpi_round_start(c, set, p, 0, v, back, nb, hs, hr, row, what, lay + (size_t)4 * N * v,
                             &req[v], err);
    for (int v = 0; v < V && req; v++) {
        moe_status ws = c->ep->tp->wait(c->ep->tp, &req[v], err);
        if (st == MOE_OK) st = ws;
    }
    free(req);
    free(lay);
    if (st != MOE_OK) return st;
    for (int b = 0; b < nb && rtot; b++)
        EPC_CU(cudaMemcpyAsync(rcv[b], c->hb[set][hr[b]].p, (size_t)rtot * row[b],
                               cudaMemcpyHostToDevice, c->s), "EP rows to the device (MPI)");
    return MOE_OK;
}

moe_status epc_exchange(moe_ep_cuda_ctx *c, int set, const ep_plan *p, bool back, int nb,
                        void *const *dev_send, void *const *dev_recv, const size_t *row_bytes,
                        const int *hid_send, const int *hid_recv, const char *const *what,
                        moe_error *err)
{
    if (c->use_nccl) return nccl_exchange(c, p, 0, back, nb, dev_send, dev_recv, row_bytes, c->s, err);
    return mpi_exchange(c, set, p, back, nb, dev_send, dev_recv, row_bytes, hid_send, hid_recv,
                        what, err);
}

/* ------------------------------------------------------------------ forward ---- */

/* Virtual rank v's experts on R received rows x [R,H] with k id slots ids [R,k] (ids outside
 * its slice ignored) and weights w [R,k]: part [R,H] = the sum over the owned slots of the
 * expert outputs (ep_layer.c's experts_forward with the CUDA kernels). Set 0's scratch. */
static moe_status experts_forward(moe_ep_cuda_ctx *c, int v, int R, const void *x,
                                  const int32_t *ids, const void *w, void *part, moe_error *err)
{
    if (R == 0) return MOE_OK;
    int k = c->k, H = c->H, I = c->I, e0 = (c->rank * c->V + v) * c->epv;
    int32_t *offs = epc_d(c, 0, DB_OFFS), *gather = epc_d(c, 0, DB_GATHER);
    MOE_TRY(moe_cuda_sort_by_expert(R, k, ids, e0, c->epv, epc_d(c, 0, DB_COUNTS), offs, gather,
                                    epc_d(c, 0, DB_SORT), c->d[0][DB_SORT].cap, c->s, err));
    moe_grouped_gemm_args g1 = {
        .dtype = c->dt, .num_experts = c->epv, .expert_offsets = offs, .N = 2 * I, .K = H,
        .max_rows = R * k, .topk = k, .gather_idx = gather, .A = x, .B = epc_w13(c, v),
        .C = epc_d(c, 0, DB_ACT), .permute_x = true, .scale_a_rows = c->llama ? w : NULL,
        .epilogue = MOE_EPI_SILU_MUL,
    };
    MOE_TRY(moe_grouped_gemm_launch(&g1, NULL, &c->tuning, c->s, NULL, err));
    /* Slots owned elsewhere are never written by GEMM2: the k-sum's id filter skips them. */
    moe_grouped_gemm_args g2 = {
        .dtype = c->dt, .num_experts = c->epv, .expert_offsets = offs, .N = H, .K = I,
        .max_rows = R * k, .topk = k, .gather_idx = gather, .A = epc_d(c, 0, DB_ACT),
        .B = epc_w2(c, v), .C = epc_d(c, 0, DB_ROWS), .permute_y = true,
        .scale_c_rows = c->llama ? NULL : w, .epilogue = MOE_EPI_NONE,
    };
    MOE_TRY(moe_grouped_gemm_launch(&g2, NULL, &c->tuning, c->s, NULL, err));
    return moe_cuda_sum_topk(c->dt, R, k, H, epc_d(c, 0, DB_ROWS), NULL, NULL, NULL, ids, e0,
                             c->epv, part, c->s, err);
}

/* Sized mode, after route and plan: exact row counts on the host, payload of that size. */
static moe_status forward_sized(moe_ep_cuda_ctx *c, int T, const void *x, const int32_t *ids,
                                const void *w, void *out, moe_error *err)
{
    ep_plan plan;
    int phase;
    moe_status st = epc_plan_sized(c, 0, T, ids, 1, NULL, &plan, &phase, err);
    if (phase != EPC_PLAN_EXCHANGED) {
        ep_plan_free(&plan);
        return st;
    }
    /* The capacity check and the buffers are agreed on before any payload moves. */
    if (st == MOE_OK) st = reserve_fwd(c, 0, T, plan.send_total, plan.recv_total, plan.recv_max_round, err);
    st = ep_agree(c->ep->comm, st, err);
    if (st != MOE_OK) {
        ep_plan_free(&plan);
        return st;
    }
    size_t xrow = (size_t)c->H * c->dsz, idrow = (size_t)c->k * 4, wrow = (size_t)c->k * c->dsz;
    st = moe_cuda_ep_pack(T, c->k, c->G, c->epv, xrow, c->dsz, x, NULL, ids, w,
                          epc_d(c, 0, DB_TDEST), epc_d(c, 0, DB_TN), epc_d(c, 0, DB_TROW),
                          epc_d(c, 0, DB_BASE), epc_d(c, 0, DB_SEND_X), NULL,
                          epc_d(c, 0, DB_SEND_IDS), epc_d(c, 0, DB_SEND_W), c->s, err);
    void *snd[3] = {epc_d(c, 0, DB_SEND_X), epc_d(c, 0, DB_SEND_IDS), epc_d(c, 0, DB_SEND_W)};
    void *rcv[3] = {epc_d(c, 0, DB_RECV_X), epc_d(c, 0, DB_RECV_IDS), epc_d(c, 0, DB_RECV_W)};
    size_t row[3] = {xrow, idrow, wrow};
    int hs[3] = {DB_SEND_X, DB_SEND_IDS, DB_SEND_W}, hr[3] = {DB_RECV_X, DB_RECV_IDS, DB_RECV_W};
    static const char *const wd[3] = {"dispatch x rows", "dispatch expert ids", "dispatch weights"};
    if (st == MOE_OK) st = epc_exchange(c, 0, &plan, false, 3, snd, rcv, row, hs, hr, wd, err);
    for (int v = 0; v < c->V && st == MOE_OK; v++) {
        int64_t R = ep_round_recv_rows(&plan, 0, v), rb = ep_round_recv_base(&plan, 0, v);
        st = experts_forward(c, v, (int)R, (char *)epc_d(c, 0, DB_RECV_X) + rb * xrow,
                             (const int32_t *)((char *)epc_d(c, 0, DB_RECV_IDS) + rb * idrow),
                             (char *)epc_d(c, 0, DB_RECV_W) + rb * wrow,
                             (char *)epc_d(c, 0, DB_PART) + rb * xrow, err);
    }
    void *ps[1] = {epc_d(c, 0, DB_PART)}, *pb[1] = {epc_d(c, 0, DB_BACK)};
    int hps[1] = {DB_PART}, hpb[1] = {DB_BACK};
    static const char *const wc[1] = {"combine partial rows"};
    if (st == MOE_OK) st = epc_exchange(c, 0, &plan, true, 1, ps, pb, row, hps, hpb, wc, err);
    if (st == MOE_OK && c->shared && T > 0) st = epc_join(c, err);
    if (st == MOE_OK)
        st = moe_cuda_ep_reduce(c->dt, T, c->H, c->G, c->k, c->shared ? epc_d(c, 0, DB_SHOUT) : NULL,
                                NULL, epc_d(c, 0, DB_BACK), epc_d(c, 0, DB_BASE),
                                epc_d(c, 0, DB_TDEST), epc_d(c, 0, DB_TN), epc_d(c, 0, DB_TROW),
                                out, c->s, err);
    if (st == MOE_OK) epc_count(c, &plan, false);
    ep_plan_free(&plan);
    return st == MOE_OK ? MOE_OK : ep_fatal(c->ep, st, err);
}

/* Rows [first row of chunk ch, first row of chunk ch+1) of the receive (or send) side. */
static int64_t chunk_row0(const ep_plan *p, int ch, bool recv)
{
    const int64_t *off = recv ? p->recv_off : p->send_off;
    return off[(size_t)ch * p->V * p->nranks];
}

/* Chunked pipeline (options.chunks = C > 1, sized mode), after route: the local batch is cut
 * in C contiguous pieces (ep_split_even, as on the CPU backend). Every chunk is planned on the
 * device at once; the C*G counts come to the host in one copy and go out in one exchange, and
 * every chunk is packed. Then chunk i's experts run on the ctx's stream while the dispatch of
 * chunk i+1 and the combine of chunk i-1 are in flight:
 *   NCCL: grouped ncclSend/ncclRecv on the communication stream s2, issued in the order
 *         D0 D1 K0 D2 K1 ... (the same on every rank); compute i waits for D_i's event, K_i
 *         for compute i's;
 *   MPI:  every chunk's dispatch is posted at once (MPI_Ialltoallv from pinned staging); chunk
 *         i is copied in when it arrived and its experts launched; the combine of chunk i-1 is
 *         posted when its partial rows reached the host, while chunk i computes.
 * The partial rows come back into the rows they were sent from and the reduction runs per
 * chunk at the end, in ascending virtual-rank order as with C = 1. A chunk's round holds a
 * subset of the C = 1 round's rows in the same (global token) order, so every output row is
 * the same sum of the same products; only the grouped GEMM's kernel choice, which may depend
 * on the rows in a launch, can change the last bits. The call waits for the device at its end
 * to read the timeline (device events: dispatch and combine on the NCCL stream, compute on
 * the ctx's stream; host times for MPI's posts and completions). */
static moe_status forward_chunked(moe_ep_cuda_ctx *c, int T, const void *x, const int32_t *ids,
                                  const void *w, void *out, double t_call, moe_error *err)
{
    const int C = c->opts.chunks, V = c->V, N = c->N, k = c->k, D = c->D, G = c->G;
    int32_t *cb = malloc(((size_t)C + 1) * sizeof *cb);
    if (!cb) return ep_agree(c->ep->comm, moe_fail(err, MOE_ERR_NOMEM, "chunk bounds"), err);
    ep_split_even(T, C, cb);
    ep_plan plan;
    int phase;
    moe_status st = epc_plan_sized(c, 0, T, ids, C, cb, &plan, &phase, err);
    if (phase != EPC_PLAN_EXCHANGED) {
        free(cb);
        ep_plan_free(&plan);
        return st;
    }
    if (st == MOE_OK) st = reserve_fwd(c, 0, T, plan.send_total, plan.recv_total, plan.recv_max_round, err);
    size_t xrow = (size_t)c->H * c->dsz, idrow = (size_t)k * 4, wrow = (size_t)k * c->dsz;
    size_t row[3] = {xrow, idrow, wrow};
    int hs[3] = {DB_SEND_X, DB_SEND_IDS, DB_SEND_W}, hr[3] = {DB_RECV_X, DB_RECV_IDS, DB_RECV_W};
    int hps[1] = {DB_PART}, hpb[1] = {DB_BACK};
    if (st == MOE_OK && !c->use_nccl)
        for (int b = 0; b < 3 && st == MOE_OK; b++) {
            st = epc_hneed(c, 0, hs[b], (size_t)plan.send_total * row[b], err);
            if (st == MOE_OK) st = epc_hneed(c, 0, hr[b], (size_t)plan.recv_total * row[b], err);
        }
    if (st == MOE_OK && !c->use_nccl) st = epc_hneed(c, 0, DB_PART, (size_t)plan.recv_total * xrow, err);
    if (st == MOE_OK && !c->use_nccl) st = epc_hneed(c, 0, DB_BACK, (size_t)plan.send_total * xrow, err);
    ep_request *req = NULL;
    int64_t *L = NULL;
    if (st == MOE_OK && !c->use_nccl) {
        req = moe_calloc((size_t)2 * C * V, sizeof *req, "EP requests", err);
        L = moe_malloc(4 * (size_t)N * sizeof *L, "EP layout", err);
        if (!req || !L) st = MOE_ERR_NOMEM;
    }
    /* Buffers and the capacity check are agreed on before any payload moves. */
    st = ep_agree(c->ep->comm, st, err);
    if (st != MOE_OK) {
        free(cb);
        free(req);
        free(L);
        ep_plan_free(&plan);
        return st;
    }
    char *sx = epc_d(c, 0, DB_SEND_X), *sids = epc_d(c, 0, DB_SEND_IDS), *sw = epc_d(c, 0, DB_SEND_W);
    char *rx = epc_d(c, 0, DB_RECV_X), *rids = epc_d(c, 0, DB_RECV_IDS), *rw = epc_d(c, 0, DB_RECV_W);
    char *part = epc_d(c, 0, DB_PART), *back = epc_d(c, 0, DB_BACK);
    int32_t *tdest = epc_d(c, 0, DB_TDEST), *tn = epc_d(c, 0, DB_TN), *trow = epc_d(c, 0, DB_TROW);
    int64_t *base = epc_d(c, 0, DB_BASE);
    void *snd[3] = {sx, sids, sw}, *rcv[3] = {rx, rids, rw}, *ps[1] = {part}, *pb[1] = {back};
    static const char *const wd[3] = {"dispatch x rows", "dispatch expert ids", "dispatch weights"};
    static const char *const wc[1] = {"combine partial rows"};
    moe_ep_chunk_times *tl = c->ep->call.timeline;
    memset(tl, 0, (size_t)C * sizeof *tl);
#define EV(i, j) c->ev_tl[6 * (i) + (j)]
#define TRY(call)                                                                              \
    do {                                                                                       \
        if ((st = (call)) != MOE_OK) goto fatal;                                               \
    } while (0)
#define TRYCU(call, what)                                                                      \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            st = moe_fail(err, MOE_ERR_CUDA, "rank %d: %s: %s", c->rank, (what),               \
                          cudaGetErrorString(e_));                                             \
            goto fatal;                                                                        \
        }                                                                                      \
    } while (0)
    /* the timing origin: the stream is (nearly) idle after the counts exchange */
    TRYCU(cudaEventRecord(c->ev_t0, c->s), "cudaEventRecord");
    double h0 = moe_now() - t_call;
    for (int i = 0; i < C; i++) {
        int t0 = cb[i];
        TRY(moe_cuda_ep_pack(cb[i + 1] - t0, k, G, c->epv, xrow, c->dsz, (const char *)x + (size_t)t0 * xrow,
                             NULL, ids + (size_t)t0 * k, (const char *)w + (size_t)t0 * wrow,
                             tdest + (size_t)t0 * D, tn + t0, trow + (size_t)t0 * D, base + (size_t)i * G,
                             sx, NULL, (int32_t *)sids, sw, c->s, err));
    }
    /* chunk i's experts: every round's rows, on the ctx's stream, between timing events */
#define COMPUTE(i)                                                                             \
    do {                                                                                       \
        TRYCU(cudaEventRecord(EV(i, 2), c->s), "cudaEventRecord");                             \
        for (int v = 0; v < V; v++) {                                                          \
            int64_t R = ep_round_recv_rows(&plan, (i), v), rb = ep_round_recv_base(&plan, (i), v); \
            TRY(experts_forward(c, v, (int)R, rx + rb * xrow, (const int32_t *)(rids + rb * idrow), \
                                rw + rb * wrow, part + rb * xrow, err));                      \
        }                                                                                      \
        TRYCU(cudaEventRecord(EV(i, 3), c->s), "cudaEventRecord");                             \
    } while (0)
    if (c->use_nccl) {
        TRYCU(cudaEventRecord(c->ev_pk, c->s), "cudaEventRecord");
        TRYCU(cudaStreamWaitEvent(c->s2, c->ev_pk, 0), "cudaStreamWaitEvent");
#define DISPATCH(i)                                                                            \
    do {                                                                                       \
        TRYCU(cudaEventRecord(EV(i, 0), c->s2), "cudaEventRecord");                            \
        TRY(nccl_exchange(c, &plan, (i), false, 3, snd, rcv, row, c->s2, err));                \
        TRYCU(cudaEventRecord(EV(i, 1), c->s2), "cudaEventRecord");                            \
    } while (0)
        DISPATCH(0);
        for (int i = 0; i < C; i++) {
            if (i + 1 < C) DISPATCH(i + 1);
            TRYCU(cudaStreamWaitEvent(c->s, EV(i, 1), 0), "cudaStreamWaitEvent");
            COMPUTE(i);
            TRYCU(cudaStreamWaitEvent(c->s2, EV(i, 3), 0), "cudaStreamWaitEvent");
            TRYCU(cudaEventRecord(EV(i, 4), c->s2), "cudaEventRecord");
            TRY(nccl_exchange(c, &plan, i, true, 1, ps, pb, row, c->s2, err));
            TRYCU(cudaEventRecord(EV(i, 5), c->s2), "cudaEventRecord");
        }
#undef DISPATCH
        TRYCU(cudaStreamWaitEvent(c->s, EV(C - 1, 5), 0), "cudaStreamWaitEvent");
    } else {
        /* every chunk's rows to the host, then every dispatch posted */
        int64_t stot = plan.send_total;
        for (int b = 0; b < 3 && stot; b++)
            TRYCU(cudaMemcpyAsync(c->hb[0][hs[b]].p, snd[b], (size_t)stot * row[b],
                                  cudaMemcpyDeviceToHost, c->s), "EP rows to the host (MPI)");
        TRY(epc_stream_wait(c, err));
        ep_request *disp = req, *comb = req + (size_t)C * V;
        for (int i = 0; i < C; i++) {
            for (int v = 0; v < V; v++)
                TRY(mpi_round_start(c, 0, &plan, i, v, false, 3, hs, hr, row, wd, L, &disp[(size_t)i * V + v], err));
            tl[i].dispatch_post = moe_now() - t_call;
        }
#define POST_COMBINE(i)                                                                        \
    do {                                                                                       \
        TRYCU(cudaEventSynchronize(EV(i, 4)), "waiting for the partial rows");                \
        for (int v = 0; v < V; v++)                                                            \
            TRY(mpi_round_start(c, 0, &plan, (i), v, true, 1, hps, hpb, row, wc, L,              \
                                &comb[(size_t)(i) * V + v], err));                             \
        tl[i].combine_post = moe_now() - t_call;                                               \
    } while (0)
        for (int i = 0; i < C; i++) {
            for (int v = 0; v < V; v++) TRY(c->ep->tp->wait(c->ep->tp, &disp[(size_t)i * V + v], err));
            tl[i].dispatch_done = moe_now() - t_call;
            int64_t r0 = chunk_row0(&plan, i, true), r1 = chunk_row0(&plan, i + 1, true);
            for (int b = 0; b < 3 && r1 > r0; b++)
                TRYCU(cudaMemcpyAsync((char *)rcv[b] + (size_t)r0 * row[b],
                                      (char *)c->hb[0][hr[b]].p + (size_t)r0 * row[b],
                                      (size_t)(r1 - r0) * row[b], cudaMemcpyHostToDevice, c->s),
                      "EP rows to the device (MPI)");
            COMPUTE(i);
            if (r1 > r0)
                TRYCU(cudaMemcpyAsync((char *)c->hb[0][DB_PART].p + (size_t)r0 * xrow, part + (size_t)r0 * xrow,
                                      (size_t)(r1 - r0) * xrow, cudaMemcpyDeviceToHost, c->s),
                      "partial rows to the host (MPI)");
            TRYCU(cudaEventRecord(EV(i, 4), c->s), "cudaEventRecord");
            /* the combine of chunk i-1 travels while chunk i computes */
            if (i >= 1) POST_COMBINE(i - 1);
        }
        POST_COMBINE(C - 1);
#undef POST_COMBINE
        for (int i = 0; i < C; i++) {
            for (int v = 0; v < V; v++) TRY(c->ep->tp->wait(c->ep->tp, &comb[(size_t)i * V + v], err));
            tl[i].combine_done = moe_now() - t_call;
        }
        if (stot)
            TRYCU(cudaMemcpyAsync(back, c->hb[0][DB_BACK].p, (size_t)stot * xrow,
                                  cudaMemcpyHostToDevice, c->s), "partial rows to the device (MPI)");
    }
#undef COMPUTE
    if (c->shared && T > 0) TRY(epc_join(c, err));
    for (int i = 0; i < C; i++) {
        int t0 = cb[i];
        TRY(moe_cuda_ep_reduce(c->dt, cb[i + 1] - t0, c->H, G, k,
                               c->shared ? (const char *)epc_d(c, 0, DB_SHOUT) + (size_t)t0 * xrow : NULL,
                               NULL, back, base + (size_t)i * G, tdest + (size_t)t0 * D, tn + t0,
                               trow + (size_t)t0 * D, (char *)out + (size_t)t0 * xrow, c->s, err));
    }
    epc_count(c, &plan, false);
    TRY(epc_stream_wait(c, err));
    /* the timeline from the device events, relative to the call's start */
    for (int i = 0; i < C; i++) {
        double *slot[6] = {&tl[i].dispatch_post, &tl[i].dispatch_done, &tl[i].compute_begin,
                           &tl[i].compute_end, &tl[i].combine_post, &tl[i].combine_done};
        for (int j = 0; j < 6; j++) {
            if (!c->use_nccl && j != 2 && j != 3) continue; /* MPI: host times */
            float ms = 0;
            if (cudaEventElapsedTime(&ms, c->ev_t0, EV(i, j)) == cudaSuccess) *slot[j] = h0 + ms / 1e3;
            else cudaGetLastError();
        }
    }
#undef EV
#undef TRY
#undef TRYCU
    free(cb);
    free(req);
    free(L);
    ep_plan_free(&plan);
    return MOE_OK;
fatal:
    /* requests still in flight are abandoned with the job (or the caller destroys ctx) */
    free(cb);
    free(req);
    free(L);
    ep_plan_free(&plan);
    return ep_fatal(c->ep, st, err);
}

/* Sync-free mode, after route and plan (counts on the device): whole slots travel with their
 * row counts, the receiver compacts, computes Rc rows per virtual rank and expands back. */
static moe_status forward_syncfree(moe_ep_cuda_ctx *c, int T, const void *x, const int32_t *ids,
                                   const void *w, void *out, moe_error *err)
{
    int N = c->N, V = c->V, k = c->k;
    int64_t M = c->M;
    size_t xrow = (size_t)c->H * c->dsz, idrow = (size_t)k * 4, wrow = (size_t)k * c->dsz;
    int32_t *scnt = epc_d(c, 0, DB_SCNT), *rcnt = epc_d(c, 0, DB_RCNT);
    MOE_TRY(moe_cuda_ep_slot_counts(N, V, epc_d(c, 0, DB_DCOUNT), scnt, c->s, err));
    MOE_TRY(moe_cuda_ep_pack(T, k, c->G, c->epv, xrow, c->dsz, x, NULL, ids, w,
                             epc_d(c, 0, DB_TDEST), epc_d(c, 0, DB_TN), epc_d(c, 0, DB_TROW),
                             c->d_slotbase, epc_d(c, 0, DB_SEND_X), NULL,
                             epc_d(c, 0, DB_SEND_IDS), epc_d(c, 0, DB_SEND_W), c->s, err));
    const char *snd[3] = {epc_d(c, 0, DB_SEND_X), epc_d(c, 0, DB_SEND_IDS), epc_d(c, 0, DB_SEND_W)};
    char *rcv[3] = {epc_d(c, 0, DB_RECV_X), epc_d(c, 0, DB_RECV_IDS), epc_d(c, 0, DB_RECV_W)};
    size_t row[3] = {xrow, idrow, wrow};
    /* One group: per (round, peer) the count, then the three buffers' whole slots. Sends and
     * receives to one peer match in issue order, the same on every rank. */
    EPC_NCCL(ncclGroupStart(), "ncclGroupStart");
    ncclResult_t r = ncclSuccess;
    for (int v = 0; v < V && r == ncclSuccess; v++)
        for (int q = 0; q < N && r == ncclSuccess; q++) {
            size_t i = (size_t)v * N + q;
            r = ncclSend(scnt + i, 1, ncclInt32, q, c->nccl, c->s);
            if (r == ncclSuccess) r = ncclRecv(rcnt + i, 1, ncclInt32, q, c->nccl, c->s);
            for (int b = 0; b < 3 && r == ncclSuccess; b++) {
                size_t off = i * (size_t)M * row[b], bytes = (size_t)M * row[b];
                r = ncclSend(snd[b] + off, bytes, ncclUint8, q, c->nccl, c->s);
                if (r == ncclSuccess) r = ncclRecv(rcv[b] + off, bytes, ncclUint8, q, c->nccl, c->s);
            }
        }
    ncclResult_t r2 = ncclGroupEnd();
    if (r == ncclSuccess) r = r2;
    if (r != ncclSuccess)
        return moe_fail(err, MOE_ERR_NCCL, "rank %d: ncclSend/ncclRecv (sync-free dispatch): %s",
                        c->rank, ncclGetErrorString(r));
    if (c->opts.max_recv_tokens > 0)
        MOE_TRY(moe_cuda_ep_check_total(V * N, rcnt, c->opts.max_recv_tokens, c->d_status, c->s, err));
    char *part = epc_d(c, 0, DB_PART);
    for (int v = 0; v < V; v++) {
        size_t slot0 = (size_t)v * N * M;
        MOE_TRY(moe_cuda_ep_compact(N, M, rcnt + (size_t)v * N, k, xrow, c->dsz,
                                    rcv[0] + slot0 * xrow, (const int32_t *)(rcv[1] + slot0 * idrow),
                                    rcv[2] + slot0 * wrow, c->Rc, epc_d(c, 0, DB_CX),
                                    epc_d(c, 0, DB_CIDS), epc_d(c, 0, DB_CW), c->d_status, c->s,
                                    err));
        MOE_TRY(experts_forward(c, v, (int)c->Rc, epc_d(c, 0, DB_CX), epc_d(c, 0, DB_CIDS),
                                epc_d(c, 0, DB_CW), epc_d(c, 0, DB_CPART), err));
        MOE_TRY(moe_cuda_ep_expand(N, M, rcnt + (size_t)v * N, xrow, epc_d(c, 0, DB_CPART), c->Rc,
                                   part + slot0 * xrow, c->s, err));
    }
    char *back = epc_d(c, 0, DB_BACK);
    EPC_NCCL(ncclGroupStart(), "ncclGroupStart");
    r = ncclSuccess;
    for (int v = 0; v < V && r == ncclSuccess; v++)
        for (int q = 0; q < N && r == ncclSuccess; q++) {
            size_t off = ((size_t)v * N + q) * (size_t)M * xrow, bytes = (size_t)M * xrow;
            r = ncclSend(part + off, bytes, ncclUint8, q, c->nccl, c->s);
            if (r == ncclSuccess) r = ncclRecv(back + off, bytes, ncclUint8, q, c->nccl, c->s);
        }
    r2 = ncclGroupEnd();
    if (r == ncclSuccess) r = r2;
    if (r != ncclSuccess)
        return moe_fail(err, MOE_ERR_NCCL, "rank %d: ncclSend/ncclRecv (sync-free combine): %s",
                        c->rank, ncclGetErrorString(r));
    if (c->shared && T > 0) MOE_TRY(epc_join(c, err));
    return moe_cuda_ep_reduce(c->dt, T, c->H, c->G, k, c->shared ? epc_d(c, 0, DB_SHOUT) : NULL,
                              NULL, back, c->d_slotbase, epc_d(c, 0, DB_TDEST), epc_d(c, 0, DB_TN),
                              epc_d(c, 0, DB_TROW), out, c->s, err);
}

moe_status moe_ep_cuda_forward(moe_ep_cuda_ctx *c, int T, const void *x, void *out,
                               void *router_logits, int32_t *topk_ids, moe_ep_stats *stats,
                               moe_error *err)
{
    if (!c) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_cuda_forward: ctx is NULL");
    double t0 = moe_now();
    moe_ep_stats_reset(&c->ep->call);
    moe_status st = epc_check_call(c, "moe_ep_cuda_forward", T, x, out, "out", NULL, NULL, err);
    if (st == MOE_OK && cudaSetDevice(c->device) != cudaSuccess)
        st = moe_fail(err, MOE_ERR_CUDA, "rank %d: cudaSetDevice(%d)", c->rank, c->device);
    if (!c->plain) st = ep_agree(c->ep->comm, st, err);
    if (st != MOE_OK) return st;
    c->ep->call.calls_forward = 1;
    c->ep->call.tokens_local = (uint64_t)T;

    if (c->plain) {
        /* N = 1, V = 1, the router's routing: the fused path itself. */
        if (T > 0) {
            MOE_TRY(epc_plain_block(c, T, false, err));
            moe_fwd_state fs;
            memset(&fs, 0, sizeof fs);
            fs.T = T;
            fs.out = out;
            fs.router_logits = router_logits;
            fs.topk_ids = topk_ids;
            st = cuda_block_forward(c->blk, x, T, &fs, false, err);
            c->ep->call.tokens_computed = (uint64_t)T;
            c->ep->call.expert_rows = (uint64_t)T * c->k;
        }
        epc_call_end(c, stats, t0);
        return st;
    }

    int64_t g0 = 0;
    if (c->forced && (st = epc_global_offset(c, T, &g0, err)) != MOE_OK) return ep_fatal(c->ep, st, err);
    /* Source-side buffers for T tokens (presized in sync-free mode, where T <= M). */
    if (!c->syncfree) st = reserve_fwd(c, 0, T, 0, 0, 0, err);
    void *logits = router_logits ? router_logits : epc_d(c, 0, DB_LOGITS);
    int32_t *ids = topk_ids ? topk_ids : epc_d(c, 0, DB_IDS);
    void *w = epc_d(c, 0, DB_W);
    /* Llama-4's shared expert needs only the local tokens: it runs on the second stream
     * while the routing, the dispatch and the experts run on the first. */
    if (st == MOE_OK && c->shared && T > 0) {
        st = epc_fork(c, err);
        if (st == MOE_OK) st = epc_shared_forward(c, 0, T, x, epc_d(c, 0, DB_SHOUT), err);
    }
    if (st == MOE_OK) st = epc_route(c, 0, T, x, g0, logits, ids, w, err);
    if (c->syncfree) {
        if (st == MOE_OK)
            st = moe_cuda_ep_plan(T, c->k, ids, c->G, c->epv, epc_d(c, 0, DB_TDEST),
                                  epc_d(c, 0, DB_TN), epc_d(c, 0, DB_TROW), epc_d(c, 0, DB_DCOUNT),
                                  NULL, c->s, err);
        if (st == MOE_OK) st = forward_syncfree(c, T, x, ids, w, out, err);
        if (st != MOE_OK) return ep_fatal(c->ep, st, err);
        c->ep->call.nchunks = 1;
        if (c->ep->call.timeline) c->ep->call.timeline[0].tokens = T;
    } else {
        /* Failures so far are local; forward_sized agrees on them before the exchange. */
        if (st != MOE_OK) {
            st = ep_agree(c->ep->comm, st, err);
            return st;
        }
        st = c->opts.chunks > 1 ? forward_chunked(c, T, x, ids, w, out, t0, err)
                                : forward_sized(c, T, x, ids, w, out, err);
        if (st != MOE_OK) return st;
    }
    epc_call_end(c, stats, t0);
    return MOE_OK;
}

#endif /* MOE_HAVE_CUDA */
