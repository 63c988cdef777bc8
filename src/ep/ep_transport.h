/*
 * ep_transport.h — the small interface dispatch and combine talk to. Two implementations:
 *   MPI  (ep_transport_mpi.c)  host buffers; counts with MPI_Alltoall, payload with
 *        MPI_Ialltoallv (one per buffer), completed by MPI_Waitall.
 *   NCCL (ep_transport_nccl.c, CUDA builds only) device buffers; one GPU per rank; the payload
 *        as grouped ncclSend/ncclRecv on one stream; the communicator is bootstrapped over MPI
 *        (rank 0's ncclUniqueId is broadcast). Host buffers are staged through the GPU when
 *        the transport was created with stage_host (the CPU backend testing NCCL).
 *
 * A transfer moves up to EP_XFER_MAX_BUFS buffers with the SAME per-peer row counts (e.g. the
 * x rows, the id rows and the weight rows of one dispatch); buffer b's rows are row_bytes[b]
 * bytes. Counts and offsets are in rows, per peer rank of the communicator; offsets are
 * relative to the buffer pointers. Transfers are collective: every rank starts the same
 * transfers in the same order.
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
} ep_xfer;

/* An in-flight transfer. Opaque to callers; sized for the largest implementation. */
typedef struct ep_request {
    bool active;
    int nreq;
    MPI_Request mpi[EP_XFER_MAX_BUFS];
    void *impl; /* NCCL: the staging record */
} ep_request;

typedef struct ep_transport ep_transport;
struct ep_transport {
    const char *name; /* "mpi" | "nccl" */
    MPI_Comm comm;    /* the ctx's duplicated communicator (errors return) */
    int rank, nranks;
    /* counts[peer * n + i] -> recv[peer * n + i]: n int64 per peer, blocking. */
    moe_status (*alltoall_i64)(ep_transport *t, const int64_t *send, int64_t *recv, int n,
                               moe_error *err);
    moe_status (*start)(ep_transport *t, const ep_xfer *x, ep_request *req, moe_error *err);
    /* Let an in-flight transfer progress without blocking (MPI_Testall); may be a no-op. */
    moe_status (*progress)(ep_transport *t, ep_request *req, moe_error *err);
    moe_status (*wait)(ep_transport *t, ep_request *req, moe_error *err);
    void (*destroy)(ep_transport *t);
};

/* MPI transport over comm (not duplicated here: the ctx passes its own duplicate). */
moe_status ep_transport_mpi_create(MPI_Comm comm, ep_transport **out, moe_error *err);
/* NCCL transport (MOE_ERR_UNSUPPORTED without a CUDA build). device < 0: node-local rank's
 * GPU; more local ranks than GPUs is an error (NCCL refuses two ranks on one GPU).
 * stage_host: the buffers handed to start() are host memory. Collective over comm. */
moe_status ep_transport_nccl_create(MPI_Comm comm, int device, bool stage_host,
                                    ep_transport **out, moe_error *err);

/* A failed MPI call: "rank R: what: MPI error string" into err, MOE_ERR_MPI. */
moe_status ep_mpi_fail(moe_error *err, int rc, int rank, const char *what);
/* Agree on a status across comm: every rank returns the lowest-numbered failing rank's status
 * and message (prefixed "rank R: " on the others); MOE_OK only when all ranks passed st ==
 * MOE_OK. Itself checks its MPI calls. */
moe_status ep_agree(MPI_Comm comm, moe_status st, moe_error *err);

#endif /* MOE_EP_TRANSPORT_H */
