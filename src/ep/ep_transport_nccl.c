/* ep_transport_nccl.c — the device-buffer transport: grouped ncclSend/ncclRecv on one stream,
 * one GPU per rank, communicator bootstrapped over MPI (see ep_transport.h).
 * Compiled only in CUDA builds; ep_transport_mpi.c holds the "unsupported" stand-in otherwise. */
#ifdef MOE_HAVE_CUDA

#include "ep_transport.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <stdlib.h>
#include <string.h>

typedef struct nccl_tp {
    ep_transport base; /* first: the ep_transport pointer is a nccl_tp pointer */
    ncclComm_t nccl;
    cudaStream_t stream;
    int device;
    bool stage_host;
} nccl_tp;

/* What a staged transfer owns until wait(): device copies of the buffers and the host
 * destinations to copy back into. */
typedef struct nccl_stage {
    cudaEvent_t done;
    int nbufs;
    void *dsend[EP_XFER_MAX_BUFS], *drecv[EP_XFER_MAX_BUFS];
} nccl_stage;

static moe_status cuda_fail(moe_error *err, cudaError_t e, int rank, const char *what)
{
    return moe_fail(err, MOE_ERR_CUDA, "rank %d: %s failed: %s", rank, what,
                    cudaGetErrorString(e));
}

static moe_status nccl_fail(moe_error *err, ncclResult_t r, int rank, const char *what)
{
    return moe_fail(err, MOE_ERR_NCCL, "rank %d: %s failed: %s", rank, what,
                    ncclGetErrorString(r));
}

#define CUDA_TRY(call, what)                                                             \
    do {                                                                                 \
        cudaError_t e_ = (call);                                                         \
        if (e_ != cudaSuccess) return cuda_fail(err, e_, t->base.rank, what);            \
    } while (0)
#define NCCL_TRY(call, what)                                                             \
    do {                                                                                 \
        ncclResult_t r_ = (call);                                                        \
        if (r_ != ncclSuccess) return nccl_fail(err, r_, t->base.rank, what);            \
    } while (0)

/* Wait for an event while watching the communicator: a peer that died or a broken network
 * shows up as an asynchronous NCCL error instead of a hang. */
static moe_status wait_event(nccl_tp *t, cudaEvent_t ev, moe_error *err)
{
    for (;;) {
        cudaError_t e = cudaEventQuery(ev);
        if (e == cudaSuccess) return MOE_OK;
        if (e != cudaErrorNotReady) return cuda_fail(err, e, t->base.rank, "cudaEventQuery");
        ncclResult_t async = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError(t->nccl, &async);
        if (r != ncclSuccess) return nccl_fail(err, r, t->base.rank, "ncclCommGetAsyncError");
        if (async != ncclSuccess && async != ncclInProgress) {
            ncclCommAbort(t->nccl);
            t->nccl = NULL;
            return nccl_fail(err, async, t->base.rank, "NCCL communicator (asynchronous error)");
        }
    }
}

static moe_status nccl_alltoall_i64(ep_transport *base, const int64_t *send, int64_t *recv,
                                    int n, moe_error *err)
{
    nccl_tp *t = (nccl_tp *)base;
    int N = base->nranks;
    size_t bytes = (size_t)N * (size_t)n * sizeof(int64_t);
    int64_t *d = NULL;
    CUDA_TRY(cudaMallocAsync((void **)&d, 2 * bytes + 1, t->stream), "cudaMallocAsync (counts)");
    moe_status st = MOE_OK;
    cudaError_t e = cudaMemcpyAsync(d, send, bytes, cudaMemcpyHostToDevice, t->stream);
    if (e != cudaSuccess) st = cuda_fail(err, e, base->rank, "cudaMemcpyAsync (counts)");
    if (st == MOE_OK) {
        ncclResult_t r = ncclGroupStart();
        for (int p = 0; p < N && r == ncclSuccess; p++) {
            r = ncclSend(d + (size_t)p * n, (size_t)n, ncclInt64, p, t->nccl, t->stream);
            if (r == ncclSuccess)
                r = ncclRecv(d + (size_t)N * n + (size_t)p * n, (size_t)n, ncclInt64, p, t->nccl,
                             t->stream);
        }
        ncclResult_t r2 = ncclGroupEnd();
        if (r == ncclSuccess) r = r2;
        if (r != ncclSuccess) st = nccl_fail(err, r, base->rank, "ncclSend/ncclRecv (counts)");
    }
    if (st == MOE_OK) {
        e = cudaMemcpyAsync(recv, d + (size_t)N * n, bytes, cudaMemcpyDeviceToHost, t->stream);
        if (e != cudaSuccess) st = cuda_fail(err, e, base->rank, "cudaMemcpyAsync (counts)");
    }
    cudaFreeAsync(d, t->stream);
    if (st == MOE_OK) {
        cudaEvent_t ev;
        e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
        if (e != cudaSuccess) return cuda_fail(err, e, base->rank, "cudaEventCreate");
        e = cudaEventRecord(ev, t->stream);
        if (e == cudaSuccess) st = wait_event(t, ev, err);
        else st = cuda_fail(err, e, base->rank, "cudaEventRecord");
        cudaEventDestroy(ev);
    }
    return st;
}

/* Rows [0, extent) of a buffer cover every peer's block. */
static size_t extent_bytes(const int64_t *rows, const int64_t *off, int N, size_t row_bytes)
{
    int64_t hi = 0;
    for (int p = 0; p < N; p++)
        if (rows[p] > 0 && off[p] + rows[p] > hi) hi = off[p] + rows[p];
    return (size_t)hi * row_bytes;
}

static moe_status nccl_start(ep_transport *base, const ep_xfer *x, ep_request *req,
                             moe_error *err)
{
    nccl_tp *t = (nccl_tp *)base;
    int N = base->nranks;
    memset(req, 0, sizeof *req);
    nccl_stage *sg = moe_calloc(1, sizeof *sg, "NCCL transfer record", err);
    if (!sg) return MOE_ERR_NOMEM;
    req->impl = sg;
    req->active = true;
    sg->nbufs = x->nbufs;
    CUDA_TRY(cudaEventCreateWithFlags(&sg->done, cudaEventDisableTiming), "cudaEventCreate");
    const void *src[EP_XFER_MAX_BUFS];
    void *dst[EP_XFER_MAX_BUFS];
    for (int b = 0; b < x->nbufs; b++) {
        src[b] = x->send[b];
        dst[b] = x->recv[b];
        if (!t->stage_host) continue;
        size_t sb = extent_bytes(x->send_rows, x->send_off, N, x->row_bytes[b]);
        size_t rb = extent_bytes(x->recv_rows, x->recv_off, N, x->row_bytes[b]);
        CUDA_TRY(cudaMallocAsync(&sg->dsend[b], sb + 1, t->stream), "cudaMallocAsync (staging)");
        CUDA_TRY(cudaMallocAsync(&sg->drecv[b], rb + 1, t->stream), "cudaMallocAsync (staging)");
        if (sb)
            CUDA_TRY(cudaMemcpyAsync(sg->dsend[b], x->send[b], sb, cudaMemcpyHostToDevice,
                                     t->stream),
                     "cudaMemcpyAsync (staging in)");
        src[b] = sg->dsend[b];
        dst[b] = sg->drecv[b];
    }
    /* One group for every buffer and peer: NCCL schedules the sends and receives together,
     * so no ordering between peers can deadlock. */
    NCCL_TRY(ncclGroupStart(), "ncclGroupStart");
    ncclResult_t r = ncclSuccess;
    for (int b = 0; b < x->nbufs && r == ncclSuccess; b++) {
        size_t rb = x->row_bytes[b];
        for (int p = 0; p < N && r == ncclSuccess; p++) {
            if (x->send_rows[p] > 0)
                r = ncclSend((const char *)src[b] + (size_t)x->send_off[p] * rb,
                             (size_t)x->send_rows[p] * rb, ncclUint8, p, t->nccl, t->stream);
            if (r == ncclSuccess && x->recv_rows[p] > 0)
                r = ncclRecv((char *)dst[b] + (size_t)x->recv_off[p] * rb,
                             (size_t)x->recv_rows[p] * rb, ncclUint8, p, t->nccl, t->stream);
        }
    }
    ncclResult_t r2 = ncclGroupEnd();
    if (r == ncclSuccess) r = r2;
    if (r != ncclSuccess) return nccl_fail(err, r, base->rank, "ncclSend/ncclRecv (payload)");
    if (t->stage_host) {
        for (int b = 0; b < x->nbufs; b++) {
            size_t rb = extent_bytes(x->recv_rows, x->recv_off, N, x->row_bytes[b]);
            if (rb)
                CUDA_TRY(cudaMemcpyAsync(x->recv[b], sg->drecv[b], rb, cudaMemcpyDeviceToHost,
                                         t->stream),
                         "cudaMemcpyAsync (staging out)");
        }
    }
    CUDA_TRY(cudaEventRecord(sg->done, t->stream), "cudaEventRecord");
    return MOE_OK;
}

static moe_status nccl_progress(ep_transport *base, ep_request *req, moe_error *err)
{
    (void)base;
    (void)req;
    (void)err;
    return MOE_OK; /* NCCL progresses on its own stream */
}

static moe_status nccl_wait(ep_transport *base, ep_request *req, moe_error *err)
{
    nccl_tp *t = (nccl_tp *)base;
    if (!req->active) return MOE_OK;
    nccl_stage *sg = req->impl;
    moe_status st = MOE_OK;
    if (sg) {
        if (sg->done) st = wait_event(t, sg->done, err);
        for (int b = 0; b < sg->nbufs; b++) {
            if (sg->dsend[b]) cudaFreeAsync(sg->dsend[b], t->stream);
            if (sg->drecv[b]) cudaFreeAsync(sg->drecv[b], t->stream);
        }
        if (sg->done) cudaEventDestroy(sg->done);
        free(sg);
    }
    req->impl = NULL;
    req->active = false;
    return st;
}

static void nccl_destroy(ep_transport *base)
{
    nccl_tp *t = (nccl_tp *)base;
    if (!t) return;
    if (t->stream) cudaStreamSynchronize(t->stream);
    if (t->nccl) ncclCommDestroy(t->nccl);
    if (t->stream) cudaStreamDestroy(t->stream);
    free(t);
}

moe_status ep_transport_nccl_create(MPI_Comm comm, int device, bool stage_host,
                                    ep_transport **out, moe_error *err)
{
    *out = NULL;
    int rank = 0, N = 1;
    int rc = MPI_Comm_rank(comm, &rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm, &N);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, -1, "MPI_Comm_rank/size");

    /* Step 1 (local): pick and open the GPU. NCCL refuses two ranks on one GPU, so more local
     * ranks than GPUs is an error that points at the MPI transport. */
    moe_status st = MOE_OK;
    MPI_Comm local = MPI_COMM_NULL;
    int lrank = 0, lsize = 1, ndev = 0;
    rc = MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(local, &lrank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(local, &lsize);
    if (local != MPI_COMM_NULL) MPI_Comm_free(&local);
    if (rc != MPI_SUCCESS) st = ep_mpi_fail(err, rc, rank, "MPI_Comm_split_type (node-local ranks)");
    nccl_tp *t = NULL;
    if (st == MOE_OK) {
        cudaError_t e = cudaGetDeviceCount(&ndev);
        if (e != cudaSuccess || ndev == 0) {
            st = moe_fail(err, MOE_ERR_NO_DEVICE, "rank %d: NCCL transport needs a GPU: %s", rank,
                          e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        } else if (device < 0 && lsize > ndev) {
            st = moe_fail(err, MOE_ERR_UNSUPPORTED,
                          "rank %d: %d ranks on this node but %d GPUs: NCCL needs one GPU per "
                          "rank (use --transport mpi to share a GPU)",
                          rank, lsize, ndev);
        } else {
            if (device < 0) device = lrank;
            if (device >= ndev) {
                st = moe_fail(err, MOE_ERR_INVALID_ARG, "rank %d: device %d but only %d GPUs",
                              rank, device, ndev);
            }
        }
    }
    if (st == MOE_OK) {
        t = moe_calloc(1, sizeof *t, "NCCL transport", err);
        if (!t) st = MOE_ERR_NOMEM;
    }
    if (st == MOE_OK) {
        t->base.rank = rank;
        t->base.nranks = N;
        t->device = device;
        t->stage_host = stage_host;
        cudaError_t e = cudaSetDevice(device);
        if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&t->stream, cudaStreamNonBlocking);
        if (e != cudaSuccess) st = cuda_fail(err, e, rank, "cudaSetDevice/cudaStreamCreate");
    }
    st = ep_agree(comm, st, err);

    /* Step 2: rank 0 makes the unique id, everyone receives it with its status. */
    struct {
        int status;
        ncclUniqueId id;
    } boot;
    memset(&boot, 0, sizeof boot);
    if (st == MOE_OK) {
        if (rank == 0) {
            ncclResult_t r = ncclGetUniqueId(&boot.id);
            if (r != ncclSuccess) {
                nccl_fail(err, r, rank, "ncclGetUniqueId");
                boot.status = MOE_ERR_NCCL;
            }
        }
        rc = MPI_Bcast(&boot, (int)sizeof boot, MPI_BYTE, 0, comm);
        if (rc != MPI_SUCCESS) st = ep_mpi_fail(err, rc, rank, "MPI_Bcast (ncclUniqueId)");
        else if (boot.status != MOE_OK && rank != 0)
            st = moe_fail(err, MOE_ERR_NCCL, "rank 0 could not create the NCCL unique id");
        else if (boot.status != MOE_OK)
            st = MOE_ERR_NCCL;
    }
    /* Step 3: the collective init; agree afterwards so a rank whose init failed does not
     * leave the others using a half-made communicator. */
    if (st == MOE_OK) {
        ncclResult_t r = ncclCommInitRank(&t->nccl, N, boot.id, rank);
        if (r != ncclSuccess) {
            t->nccl = NULL;
            st = nccl_fail(err, r, rank, "ncclCommInitRank");
        }
        st = ep_agree(comm, st, err);
    }
    if (st != MOE_OK) {
        if (t) {
            if (t->nccl) ncclCommAbort(t->nccl);
            t->nccl = NULL;
            if (t->stream) cudaStreamDestroy(t->stream);
            free(t);
        }
        return st;
    }
    t->base.name = "nccl";
    t->base.comm = comm;
    t->base.alltoall_i64 = nccl_alltoall_i64;
    t->base.start = nccl_start;
    t->base.progress = nccl_progress;
    t->base.wait = nccl_wait;
    t->base.destroy = nccl_destroy;
    *out = &t->base;
    return MOE_OK;
}

#endif /* MOE_HAVE_CUDA */
