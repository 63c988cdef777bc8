/* ep_transport_mpi.c — the host-buffer transport: MPI_Ialltoallv per buffer for the payload,
 * MPI_Allgather for the replicated gradients (see ep_transport.h). */
#include "ep.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The int count/displacement arrays of one MPI_Ialltoallv must stay untouched until the
 * operation completes, so they live with the request. */
typedef struct mpi_req_arrays {
    int *sc, *sd, *rc, *rd; /* [nranks] each, one allocation */
} mpi_req_arrays;

static moe_status to_int(int64_t v, int *out, const char *what, int rank, moe_error *err)
{
    if (v < 0 || v > INT_MAX)
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "rank %d: %s = %lld rows does not fit MPI's int counts", rank, what,
                        (long long)v);
    *out = (int)v;
    return MOE_OK;
}

static moe_status mpi_start(ep_transport *t, const ep_xfer *x, ep_request *req, moe_error *err)
{
    req->active = false;
    req->nreq = 0;
    req->impl = NULL;
    if (!x->host_mem)
        return moe_fail(err, MOE_ERR_INTERNAL, "rank %d: the MPI transport moves host buffers "
                        "(device rows must be staged)", t->rank);
    if (x->nbufs < 1 || x->nbufs > EP_XFER_MAX_BUFS)
        return moe_fail(err, MOE_ERR_INTERNAL, "rank %d: transfer with %d buffers", t->rank,
                        x->nbufs);
    int N = t->nranks;
    int *arr = moe_malloc(4 * (size_t)N * sizeof(int), "MPI alltoallv counts", err);
    if (!arr) return MOE_ERR_NOMEM;
    mpi_req_arrays *a = moe_malloc(sizeof *a, "MPI request", err);
    if (!a) {
        free(arr);
        return MOE_ERR_NOMEM;
    }
    a->sc = arr;
    a->sd = arr + N;
    a->rc = arr + 2 * N;
    a->rd = arr + 3 * N;
    moe_status st = MOE_OK;
    for (int p = 0; p < N && st == MOE_OK; p++) {
        st = to_int(x->send_rows[p], &a->sc[p], "send count", t->rank, err);
        if (st == MOE_OK) st = to_int(x->send_off[p], &a->sd[p], "send offset", t->rank, err);
        if (st == MOE_OK) st = to_int(x->recv_rows[p], &a->rc[p], "receive count", t->rank, err);
        if (st == MOE_OK) st = to_int(x->recv_off[p], &a->rd[p], "receive offset", t->rank, err);
    }
    if (st != MOE_OK) {
        free(arr);
        free(a);
        return st;
    }
    req->impl = a;
    req->active = true;
    for (int b = 0; b < x->nbufs; b++) {
        if (x->row_bytes[b] == 0 || x->row_bytes[b] > INT_MAX) {
            st = moe_fail(err, MOE_ERR_INTERNAL, "rank %d: %s: row of %zu bytes", t->rank,
                          x->what[b] ? x->what[b] : "buffer", x->row_bytes[b]);
            break;
        }
        /* One datatype per row keeps the counts in rows, so a transfer of up to 2^31 rows
         * (not bytes) fits MPI's int counts. */
        MPI_Datatype row;
        int rc = MPI_Type_contiguous((int)x->row_bytes[b], MPI_BYTE, &row);
        if (rc == MPI_SUCCESS) rc = MPI_Type_commit(&row);
        if (rc != MPI_SUCCESS) {
            st = ep_mpi_fail(err, rc, t->rank, "MPI_Type_contiguous");
            break;
        }
        rc = MPI_Ialltoallv(x->send[b], a->sc, a->sd, row, x->recv[b], a->rc, a->rd, row,
                            t->comm, &req->mpi[req->nreq]);
        MPI_Type_free(&row); /* deferred by MPI until the operation completes */
        if (rc != MPI_SUCCESS) {
            char what[128];
            snprintf(what, sizeof what, "MPI_Ialltoallv (%s)", x->what[b] ? x->what[b] : "rows");
            st = ep_mpi_fail(err, rc, t->rank, what);
            break;
        }
        req->nreq++;
    }
    return st; /* on failure the caller treats it as fatal; started requests are left */
}

static moe_status mpi_progress(ep_transport *t, ep_request *req, moe_error *err)
{
    if (!req->active || req->nreq == 0) return MOE_OK;
    int flag = 0;
    int rc = MPI_Testall(req->nreq, req->mpi, &flag, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, t->rank, "MPI_Testall");
    return MOE_OK;
}

static moe_status mpi_wait(ep_transport *t, ep_request *req, moe_error *err)
{
    if (!req->active) return MOE_OK;
    moe_status st = MOE_OK;
    if (req->nreq > 0) {
        MPI_Status stats[EP_XFER_MAX_BUFS];
        int rc = MPI_Waitall(req->nreq, req->mpi, stats);
        if (rc == MPI_ERR_IN_STATUS) {
            for (int i = 0; i < req->nreq; i++)
                if (stats[i].MPI_ERROR != MPI_SUCCESS) {
                    rc = stats[i].MPI_ERROR;
                    break;
                }
        }
        if (rc != MPI_SUCCESS) st = ep_mpi_fail(err, rc, t->rank, "MPI_Waitall (alltoallv)");
    }
    mpi_req_arrays *a = req->impl;
    if (a) {
        free(a->sc);
        free(a);
    }
    req->impl = NULL;
    req->active = false;
    req->nreq = 0;
    return st;
}

static moe_status mpi_allgather(ep_transport *t, const void *send, void *recv, size_t bytes,
                                bool host_mem, void *stream, moe_error *err)
{
    (void)stream;
    if (!host_mem)
        return moe_fail(err, MOE_ERR_INTERNAL, "rank %d: MPI allgather of device memory", t->rank);
    if (bytes > INT_MAX)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "rank %d: allgather of %zu bytes exceeds MPI's "
                        "int counts", t->rank, bytes);
    int rc = MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, t->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, t->rank, "MPI_Allgather (gradients)");
    return MOE_OK;
}

static moe_status mpi_sync(ep_transport *t, void *stream, moe_error *err)
{
    (void)t;
    (void)stream;
    (void)err;
    return MOE_OK;
}

static void mpi_destroy(ep_transport *t) { free(t); }

moe_status ep_transport_mpi_create(MPI_Comm comm, ep_transport **out, moe_error *err)
{
    *out = NULL;
    ep_transport *t = moe_calloc(1, sizeof *t, "MPI transport", err);
    if (!t) return MOE_ERR_NOMEM;
    t->name = "mpi";
    t->comm = comm;
    int rc = MPI_Comm_rank(comm, &t->rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm, &t->nranks);
    if (rc != MPI_SUCCESS) {
        free(t);
        return ep_mpi_fail(err, rc, -1, "MPI_Comm_rank/size");
    }
    t->device = -1;
    t->start = mpi_start;
    t->allgather = mpi_allgather;
    t->sync = mpi_sync;
    t->progress = mpi_progress;
    t->wait = mpi_wait;
    t->destroy = mpi_destroy;
    *out = t;
    return MOE_OK;
}

#ifndef MOE_HAVE_CUDA
void ep_request_free(ep_request *req)
{
    if (req) req->event = NULL;
}

/* Without a CUDA build there is no NCCL: say so (ep_transport_nccl.c is compiled out). */
moe_status ep_transport_nccl_create(MPI_Comm comm, int device, ep_transport **out,
                                    moe_error *err)
{
    (void)comm;
    (void)device;
    *out = NULL;
    return moe_fail(err, MOE_ERR_UNSUPPORTED,
                    "the NCCL transport needs a CUDA build (configure with the CUDA toolkit and "
                    "NCCL); use --transport mpi");
}
#endif
