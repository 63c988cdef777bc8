/*
 * ep_transport.h — the interface the EP driver moves rows through. Two implementations, one
 * communicator each per moe_ep_comm (one bootstrap):
 *   MPI  (ep_transport_mpi.c)  host buffers; MPI_Ialltoallv per buffer, MPI_Waitall. A CUDA
 *        layer's device rows are staged through pinned host memory by the driver.
 *   NCCL (ep_transport_nccl.c, CUDA builds) device buffers; grouped ncclSend/ncclRecv, one GPU
 *        per rank, the communicator bootstrapped over MPI (rank 0's ncclUniqueId broadcast).
 *        Host buffers (a CPU layer asking for NCCL) are staged through the GPU.
 *
 * A transfer moves up to EP_XFER_MAX_BUFS buffers with the SAME per-peer row counts (the x,
 * id and weight rows of one dispatch round); buffer b's rows are row_bytes[b] bytes; counts
 * and offsets are in rows, per peer, relative to the buffer pointers. Transfers are
 * collective: every rank starts the same transfers in the same order.
 *
 * Streams (device buffers): the transfer is ordered after the work queued on x->stream.
 * overlap = false: it is enqueued on x->stream itself and wait() does nothing (stream order
 * carries it: capturable into a CUDA graph). overlap = true: it runs on the transport's own
 * stream (so computation on x->stream can go on), and wait() makes x->stream wait for it.
 * Host buffers: wait() returns when the data is there.
 */
#ifndef MOE_EP_TRANSPORT_H
#define MOE_EP_TRANSPORT_H

#include <mpi.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common.h"

#define EP_XFER_MAX_BUFS 4

typedef struct ep_xfer {
    int nbufs;
    const void *send[EP_XFER_MAX_BUFS];
    void *recv[EP_XFER_MAX_BUFS];
    size_t row_bytes[EP_XFER_MAX_BUFS];
    const char *what[EP_XFER_MAX_BUFS]; /* names for error messages ("x rows") */
    const int64_t *send_rows, *send_off; /* [nranks] */
    const int64_t *recv_rows, *recv_off; /* [nranks] */
    bool host_mem;  /* the buffers are host memory */
    void *stream;   /* cudaStream_t the transfer is ordered with (device buffers) */
    bool overlap;   /* run on the transport's own stream (see above) */
} ep_xfer;

/* An in-flight transfer. Opaque to callers; sized for the largest implementation. Its
 * resources (an event) are kept between uses: zero it once, free with ep_request_free. */
typedef struct ep_request {
    bool active;
    int nreq;
    MPI_Request mpi[EP_XFER_MAX_BUFS];
    void *impl;   /* NCCL host staging record */
    void *event;  /* NCCL overlap: the done event (cudaEvent_t), created once */
    void *stream; /* the stream wait() orders */
} ep_request;

typedef struct ep_transport ep_transport;
struct ep_transport {
    const char *name; /* "mpi" | "nccl" */
    MPI_Comm comm;    /* the moe_ep_comm's duplicated communicator */
    int rank, nranks;
    int device;       /* NCCL: the GPU; -1 for MPI */
    moe_status (*start)(ep_transport *t, const ep_xfer *x, ep_request *req, moe_error *err);
    /* Let an in-flight transfer progress without blocking (MPI_Testall); may be a no-op. */
    moe_status (*progress)(ep_transport *t, ep_request *req, moe_error *err);
    moe_status (*wait)(ep_transport *t, ep_request *req, moe_error *err);
    /* recv [nranks * bytes] = every rank's send [bytes], in rank order (collective). Device
     * buffers are ordered on `stream` (no host wait); host buffers complete in the call. */
    moe_status (*allgather)(ep_transport *t, const void *send, void *recv, size_t bytes,
                            bool host_mem, void *stream, moe_error *err);
    /* Host wait for everything this transport queued, watching for asynchronous errors. */
    moe_status (*sync)(ep_transport *t, void *stream, moe_error *err);
    void (*destroy)(ep_transport *t);
};

/* MPI transport over comm (not duplicated here: the moe_ep_comm passes its own duplicate). */
moe_status ep_transport_mpi_create(MPI_Comm comm, ep_transport **out, moe_error *err);
/* NCCL transport on `device` (MOE_ERR_UNSUPPORTED without a CUDA build). Collective. */
moe_status ep_transport_nccl_create(MPI_Comm comm, int device, ep_transport **out,
                                    moe_error *err);
/* Free a request's kept resources. */
void ep_request_free(ep_request *req);

#endif /* MOE_EP_TRANSPORT_H */
