/* ep_transport_nccl.c — the device-buffer transport: grouped ncclSend/ncclRecv, one GPU per
 * rank, the communicator bootstrapped over MPI: the library's one NCCL bootstrap (see
 * ep_transport.h). Compiled only in CUDA builds; ep_transport_mpi.c holds the "unsupported"
 * stand-in otherwise. */
#ifdef MOE_HAVE_CUDA

#include "ep.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <stdlib.h>
#include <string.h>

typedef struct nccl_tp {
    ep_transport base; /* first: the ep_transport pointer is a nccl_tp pointer */
    ncclComm_t nccl;
    cudaStream_t stream; /* overlapped transfers and host staging */
    cudaEvent_t ev_in;   /* "the caller's stream reached the transfer" */
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

/* Rows [0, extent) of a buffer cover every peer's block. */
static size_t extent_bytes(const int64_t *rows, const int64_t *off, int N, size_t row_bytes)
{
    int64_t hi = 0;
    for (int p = 0; p < N; p++)
        if (rows[p] > 0 && off[p] + rows[p] > hi) hi = off[p] + rows[p];
    return (size_t)hi * row_bytes;
}

/* One group for every buffer and peer: NCCL schedules the sends and receives together, so no
 * ordering between peers can deadlock. */
static moe_status nccl_group(nccl_tp *t, const ep_xfer *x, const void *const *src,
                             void *const *dst, cudaStream_t stream, moe_error *err)
{
    const int N = t->base.nranks;
    NCCL_TRY(ncclGroupStart(), "ncclGroupStart");
    ncclResult_t r = ncclSuccess;
    for (int b = 0; b < x->nbufs && r == ncclSuccess; b++) {
        size_t rb = x->row_bytes[b];
        for (int p = 0; p < N && r == ncclSuccess; p++) {
            if (x->send_rows[p] > 0)
                r = ncclSend((const char *)src[b] + (size_t)x->send_off[p] * rb,
                             (size_t)x->send_rows[p] * rb, ncclUint8, p, t->nccl, stream);
            if (r == ncclSuccess && x->recv_rows[p] > 0)
                r = ncclRecv((char *)dst[b] + (size_t)x->recv_off[p] * rb,
                             (size_t)x->recv_rows[p] * rb, ncclUint8, p, t->nccl, stream);
        }
    }
    ncclResult_t r2 = ncclGroupEnd();
    if (r == ncclSuccess) r = r2;
    if (r != ncclSuccess) {
        char what[160];
        snprintf(what, sizeof what, "ncclSend/ncclRecv (%s)", x->what[0] ? x->what[0] : "rows");
        return nccl_fail(err, r, t->base.rank, what);
    }
    return MOE_OK;
}

static moe_status nccl_start(ep_transport *base, const ep_xfer *x, ep_request *req,
                             moe_error *err)
{
    nccl_tp *t = (nccl_tp *)base;
    const int N = base->nranks;
    req->active = true;
    req->nreq = 0;
    req->impl = NULL;
    req->stream = NULL;
    if (!x->host_mem) {
        cudaStream_t s = (cudaStream_t)x->stream;
        if (!x->overlap) return nccl_group(t, x, x->send, x->recv, s, err);
        /* on the transport's stream, after what x->stream holds; wait() joins it back */
        if (!req->event)
            CUDA_TRY(cudaEventCreateWithFlags((cudaEvent_t *)&req->event, cudaEventDisableTiming),
                     "cudaEventCreate");
        CUDA_TRY(cudaEventRecord(t->ev_in, s), "cudaEventRecord");
        CUDA_TRY(cudaStreamWaitEvent(t->stream, t->ev_in, 0), "cudaStreamWaitEvent");
        MOE_TRY(nccl_group(t, x, x->send, x->recv, t->stream, err));
        CUDA_TRY(cudaEventRecord((cudaEvent_t)req->event, t->stream), "cudaEventRecord");
        req->stream = s;
        return MOE_OK;
    }
    /* host buffers: staged through device copies on the transport's stream */
    nccl_stage *sg = moe_calloc(1, sizeof *sg, "NCCL transfer record", err);
    if (!sg) return MOE_ERR_NOMEM;
    req->impl = sg;
    sg->nbufs = x->nbufs;
    CUDA_TRY(cudaEventCreateWithFlags(&sg->done, cudaEventDisableTiming), "cudaEventCreate");
    const void *src[EP_XFER_MAX_BUFS];
    void *dst[EP_XFER_MAX_BUFS];
    for (int b = 0; b < x->nbufs; b++) {
        size_t sb = extent_bytes(x->send_rows, x->send_off, N, x->row_bytes[b]);
        size_t rb = extent_bytes(x->recv_rows, x->recv_off, N, x->row_bytes[b]);
        CUDA_TRY(cudaMallocAsync(&sg->dsend[b], sb + 1, t->stream), "cudaMallocAsync (staging)");
        CUDA_TRY(cudaMallocAsync(&sg->drecv[b], rb + 1, t->stream), "cudaMallocAsync (staging)");
        if (sb)
            CUDA_TRY(cudaMemcpyAsync(sg->dsend[b], x->send[b], sb, cudaMemcpyHostToDevice,
                                     t->stream), "cudaMemcpyAsync (staging in)");
        src[b] = sg->dsend[b];
        dst[b] = sg->drecv[b];
    }
    MOE_TRY(nccl_group(t, x, src, dst, t->stream, err));
    for (int b = 0; b < x->nbufs; b++) {
        size_t rb = extent_bytes(x->recv_rows, x->recv_off, N, x->row_bytes[b]);
        if (rb)
            CUDA_TRY(cudaMemcpyAsync(x->recv[b], sg->drecv[b], rb, cudaMemcpyDeviceToHost,
                                     t->stream), "cudaMemcpyAsync (staging out)");
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
    req->active = false;
    nccl_stage *sg = req->impl;
    if (!sg) {
        /* device buffers: stream order, or the caller's stream waits for the overlap */
        if (req->stream)
            CUDA_TRY(cudaStreamWaitEvent((cudaStream_t)req->stream, (cudaEvent_t)req->event, 0),
                     "cudaStreamWaitEvent");
        req->stream = NULL;
        return MOE_OK;
    }
    moe_status st = MOE_OK;
    if (sg->done) st = wait_event(t, sg->done, err);
    for (int b = 0; b < sg->nbufs; b++) {
        if (sg->dsend[b]) cudaFreeAsync(sg->dsend[b], t->stream);
        if (sg->drecv[b]) cudaFreeAsync(sg->drecv[b], t->stream);
    }
    if (sg->done) cudaEventDestroy(sg->done);
    free(sg);
    req->impl = NULL;
    return st;
}

static moe_status nccl_allgather(ep_transport *base, const void *send, void *recv, size_t bytes,
                                 bool host_mem, void *stream, moe_error *err)
{
    nccl_tp *t = (nccl_tp *)base;
    const size_t N = (size_t)base->nranks;
    if (!host_mem) {
        NCCL_TRY(ncclAllGather(send, recv, bytes, ncclUint8, t->nccl, (cudaStream_t)stream),
                 "ncclAllGather (gradients)");
        return MOE_OK;
    }
    void *d = NULL;
    CUDA_TRY(cudaMallocAsync(&d, bytes * (N + 1) + 1, t->stream), "cudaMallocAsync (staging)");
    moe_status st = MOE_OK;
    cudaError_t e = cudaMemcpyAsync((char *)d + bytes * N, send, bytes, cudaMemcpyHostToDevice,
                                    t->stream);
    if (e != cudaSuccess) st = cuda_fail(err, e, base->rank, "cudaMemcpyAsync (staging in)");
    if (st == MOE_OK) {
        ncclResult_t r = ncclAllGather((char *)d + bytes * N, d, bytes, ncclUint8, t->nccl,
                                       t->stream);
        if (r != ncclSuccess) st = nccl_fail(err, r, base->rank, "ncclAllGather (gradients)");
    }
    if (st == MOE_OK) {
        e = cudaMemcpyAsync(recv, d, bytes * N, cudaMemcpyDeviceToHost, t->stream);
        if (e != cudaSuccess) st = cuda_fail(err, e, base->rank, "cudaMemcpyAsync (staging out)");
    }
    cudaFreeAsync(d, t->stream);
    if (st == MOE_OK) st = base->sync(base, NULL, err);
    return st;
}

/* Host wait for `stream` (or the transport's own) while watching the communicator. */
static moe_status nccl_sync(ep_transport *base, void *stream, moe_error *err)
{
    nccl_tp *t = (nccl_tp *)base;
    cudaEvent_t ev;
    CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    moe_status st = MOE_OK;
    cudaError_t e = cudaEventRecord(ev, stream ? (cudaStream_t)stream : t->stream);
    if (e == cudaSuccess) st = wait_event(t, ev, err);
    else st = cuda_fail(err, e, base->rank, "cudaEventRecord");
    cudaEventDestroy(ev);
    return st;
}

void ep_request_free(ep_request *req)
{
    if (!req) return;
    if (req->event) cudaEventDestroy((cudaEvent_t)req->event);
    req->event = NULL;
}

static void nccl_destroy(ep_transport *base)
{
    nccl_tp *t = (nccl_tp *)base;
    if (!t) return;
    if (t->stream) cudaStreamSynchronize(t->stream);
    if (t->nccl) ncclCommDestroy(t->nccl);
    if (t->ev_in) cudaEventDestroy(t->ev_in);
    if (t->stream) cudaStreamDestroy(t->stream);
    free(t);
}

moe_status ep_transport_nccl_create(MPI_Comm comm, int device, ep_transport **out,
                                    moe_error *err)
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
        t->base.device = device;
        cudaError_t e = cudaSetDevice(device);
        if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&t->stream, cudaStreamNonBlocking);
        if (e == cudaSuccess) e = cudaEventCreateWithFlags(&t->ev_in, cudaEventDisableTiming);
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
            if (t->ev_in) cudaEventDestroy(t->ev_in);
            if (t->stream) cudaStreamDestroy(t->stream);
            free(t);
        }
        return st;
    }
    t->base.name = "nccl";
    t->base.comm = comm;
    t->base.start = nccl_start;
    t->base.allgather = nccl_allgather;
    t->base.sync = nccl_sync;
    t->base.progress = nccl_progress;
    t->base.wait = nccl_wait;
    t->base.destroy = nccl_destroy;
    *out = &t->base;
    return MOE_OK;
}

#endif /* MOE_HAVE_CUDA */
