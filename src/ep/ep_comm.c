/* ep_comm.c — the EP communicator (moe_ep.h's moe_ep_comm): the duplicated MPI communicator,
 * the agreement of every rank on statuses and fields, and the transports (one MPI transport,
 * one NCCL communicator made when a layer first needs it). */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ep.h"
#include "hash.h"
#include "moe_threads.h"

moe_status ep_mpi_fail(moe_error *err, int rc, int rank, const char *what)
{
    char s[MPI_MAX_ERROR_STRING + 1];
    int len = 0;
    if (MPI_Error_string(rc, s, &len) != MPI_SUCCESS) {
        snprintf(s, sizeof s, "MPI error code %d", rc);
    } else {
        s[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING] = '\0';
    }
    return moe_fail(err, MOE_ERR_MPI, "rank %d: %s failed: %s", rank, what, s);
}

/* The first failing rank's status and reason travel to everyone, so a rank that was fine can
 * say why it returns an error. */
static moe_status share_failure(MPI_Comm comm, int rank, int first, moe_status st,
                                moe_error *err)
{
    struct {
        int status;
        char msg[MOE_ERROR_MSG_LEN];
    } msg;
    memset(&msg, 0, sizeof msg);
    if (rank == first) {
        msg.status = (int)st;
        if (err) memcpy(msg.msg, err->msg, sizeof msg.msg);
        msg.msg[sizeof msg.msg - 1] = '\0';
    }
    int rc = MPI_Bcast(&msg, (int)sizeof msg, MPI_BYTE, first, comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, rank, "MPI_Bcast (status agreement)");
    if (st != MOE_OK) return st; /* a rank that failed itself keeps its own reason */
    moe_status fs = (msg.status > 0 && msg.status < MOE_NUM_STATUS) ? (moe_status)msg.status
                                                                    : MOE_ERR_INTERNAL;
    return moe_fail(err, fs, "rank %d failed: %s", first, msg.msg);
}

moe_status ep_agree_fields(MPI_Comm comm, moe_status st, const int64_t *fields,
                           const char *const *names, int n, moe_error *err)
{
    int rank = 0;
    int rc = MPI_Comm_rank(comm, &rank);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, -1, "MPI_Comm_rank");
    /* One MIN-allreduce: the first failing rank, and every field as (v, -v) so its minimum
     * and maximum arrive together. */
    enum { MAXF = 32 };
    if (n > MAXF) return moe_fail(err, MOE_ERR_INTERNAL, "ep_agree_fields: %d fields", n);
    int64_t in[1 + 2 * MAXF], out[1 + 2 * MAXF];
    in[0] = st != MOE_OK ? rank : INT_MAX;
    for (int i = 0; i < n; i++) {
        in[1 + 2 * i] = fields[i];
        in[2 + 2 * i] = fields[i] == INT64_MIN ? INT64_MAX : -fields[i];
    }
    rc = MPI_Allreduce(in, out, 1 + 2 * n, MPI_INT64_T, MPI_MIN, comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, rank, "MPI_Allreduce (agreement)");
    if (out[0] != INT_MAX) return share_failure(comm, rank, (int)out[0], st, err);
    for (int i = 0; i < n; i++) {
        int64_t lo = out[1 + 2 * i], hi = -out[2 + 2 * i];
        if (lo != hi)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "ranks disagree on %s (this rank: %lld; the ranks hold values from "
                            "%lld to %lld): every rank must make the same call with the same "
                            "model and options", names[i], (long long)fields[i], (long long)lo,
                            (long long)hi);
    }
    return MOE_OK;
}

moe_status ep_agree(MPI_Comm comm, moe_status st, moe_error *err)
{
    return ep_agree_fields(comm, st, NULL, NULL, 0, err);
}

static moe_status check_options(const moe_ep_options *o, moe_error *err)
{
    if (o->size < sizeof *o || o->magic != MOE_EP_OPTIONS_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_ep_comm_create: options not initialised with MOE_EP_OPTIONS_INIT "
                        "(size %u, magic 0x%08x)", o->size, o->magic);
    if (o->transport != MOE_TRANSPORT_AUTO && o->transport != MOE_TRANSPORT_MPI &&
        o->transport != MOE_TRANSPORT_NCCL)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_comm_create: transport %d: expected "
                        "MOE_TRANSPORT_AUTO, _MPI or _NCCL", (int)o->transport);
    if (o->virtual_ranks < 1 || o->virtual_ranks > 4096)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_ep_comm_create: virtual_ranks %d (--ep-virtual): expected 1..4096 "
                        "virtual ranks per process", o->virtual_ranks);
    if (o->chunks < 1 || o->chunks > 4096)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_ep_comm_create: chunks %d (--chunks): expected 1..4096", o->chunks);
    if (o->max_tokens_per_rank < 0 || o->max_tokens_per_rank > INT_MAX)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_ep_comm_create: max_tokens_per_rank %lld (--max-tokens-per-rank): "
                        "expected 0 (sized per call) .. %d", (long long)o->max_tokens_per_rank,
                        INT_MAX);
    if (o->max_recv_tokens < 0 || o->max_recv_tokens > INT_MAX ||
        (o->max_recv_tokens > 0 && o->max_tokens_per_rank == 0))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_ep_comm_create: max_recv_tokens %lld: expected 0 .. %d, and only "
                        "together with max_tokens_per_rank (--max-tokens-per-rank)",
                        (long long)o->max_recv_tokens, INT_MAX);
    if (o->chunks > 1 && o->max_tokens_per_rank > 0 && o->transport == MOE_TRANSPORT_NCCL)
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "moe_ep_comm_create: chunks %d with max_tokens_per_rank over NCCL "
                        "(--chunks with --max-tokens-per-rank): the sync-free forward runs as "
                        "one chunk; drop one of them", o->chunks);
    return MOE_OK;
}

moe_status moe_ep_comm_create(int32_t fcomm, const moe_ep_options *opts, moe_ep_comm **out)
{
    moe_error *err = moe_api_begin();
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_comm_create: comm (the output) is NULL");
    /* [out]: written only on MOE_OK (moe_ep.h) */
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (!inited || finalized)
        return moe_fail(err, MOE_ERR_MPI,
                        "moe_ep_comm_create: MPI is not initialised (call MPI_Init first)");
    MPI_Comm user = MPI_Comm_f2c((MPI_Fint)fcomm);
    if (user == MPI_COMM_NULL)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_ep_comm_create: the communicator is MPI_COMM_NULL");
    moe_ep_options def = MOE_EP_OPTIONS_INIT;
    moe_ep_options o = def;
    moe_status st = MOE_OK;
    if (opts) {
        st = check_options(opts, err);
        if (st == MOE_OK) o = *opts;
    }
    MPI_Comm dup = MPI_COMM_NULL;
    int rc = MPI_Comm_dup(user, &dup);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, -1, "MPI_Comm_dup");
    /* Errors return instead of aborting inside MPI, so messages can say which rank and why. */
    MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
    moe_ep_comm *c = calloc(1, sizeof *c);
    if (!c) {
        if (st == MOE_OK) st = moe_fail(err, MOE_ERR_NOMEM, "moe_ep_comm_create: no memory");
    } else {
        c->magic = MOE_EP_COMM_MAGIC;
        c->comm = dup;
        MPI_Comm_rank(dup, &c->rank);
        MPI_Comm_size(dup, &c->nranks);
        c->opts = o;
        c->nccl_device = -1;
        if (o.route && *o.route) {
            c->route_spec = strdup(o.route);
            if (!c->route_spec && st == MOE_OK)
                st = moe_fail(err, MOE_ERR_NOMEM, "moe_ep_comm_create: route spec");
        }
        c->opts.route = c->route_spec;
    }
    /* Every rank must pass the same options: the collectives would not match otherwise. */
    int64_t f[7] = {o.transport, o.virtual_ranks, o.chunks, o.max_tokens_per_rank,
                    o.max_recv_tokens, o.abort_on_fatal != 0,
                    (int64_t)(moe_fnv1a_str(MOE_FNV1A_INIT, o.route ? o.route : "router") >> 1)};
    static const char *const names[7] = {"the transport", "--ep-virtual", "--chunks",
                                         "--max-tokens-per-rank", "max_recv_tokens",
                                         "abort_on_fatal", "--route"};
    st = ep_agree_fields(dup, st, f, names, 7, err);
    /* the default thread count: this process's cores shared among the node's ranks */
    if (st == MOE_OK) moe_threads_init_comm(dup);
    if (st == MOE_OK) {
        MPI_Comm local = MPI_COMM_NULL;
        rc = MPI_Comm_split_type(dup, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &local);
        if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(local, &c->local_rank);
        if (rc == MPI_SUCCESS) rc = MPI_Comm_size(local, &c->local_size);
        if (local != MPI_COMM_NULL) MPI_Comm_free(&local);
        if (rc != MPI_SUCCESS) st = ep_mpi_fail(err, rc, c->rank, "MPI_Comm_split_type");
        if (st == MOE_OK) st = ep_transport_mpi_create(dup, &c->mpi, err);
        st = ep_agree(dup, st, err);
    }
    if (st != MOE_OK) {
        if (c) {
            if (c->mpi) c->mpi->destroy(c->mpi);
            free(c->route_spec);
            free(c);
        }
        MPI_Comm_free(&dup);
        return st;
    }
    *out = c;
    return MOE_OK;
}

moe_status moe_ep_comm_destroy(moe_ep_comm *c)
{
    moe_error *err = moe_api_begin();
    if (!c) return MOE_OK;
    if (c->magic != MOE_EP_COMM_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_ep_comm_destroy: not a communicator (or destroyed twice)");
    if (c->layers > 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_ep_comm_destroy: %d layer(s) still use this communicator; destroy "
                        "them first", c->layers);
    if (c->nccl) c->nccl->destroy(c->nccl);
    if (c->mpi) c->mpi->destroy(c->mpi);
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
    free(c->route_spec);
    c->magic = 0;
    free(c);
    return MOE_OK;
}

moe_status moe_ep_comm_rank(const moe_ep_comm *c, int *rank, int *nranks)
{
    moe_error *err = moe_api_begin();
    if (!c || c->magic != MOE_EP_COMM_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_comm_rank: not a communicator");
    if (!rank && !nranks)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_ep_comm_rank: rank and nranks are both NULL");
    if (rank) *rank = c->rank;
    if (nranks) *nranks = c->nranks;
    return MOE_OK;
}

/* Whether NCCL can run here: every rank of every node needs its own GPU. Collective. */
static moe_status nccl_possible(moe_ep_comm *c, bool *ok, char *why, size_t wlen,
                                moe_error *err)
{
    const int ndev = moe_gpu_count();
    int mine = c->local_size <= ndev ? 1 : 0, all = 0;
    int rc = MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, c->comm);
    if (rc != MPI_SUCCESS) return ep_mpi_fail(err, rc, c->rank, "MPI_Allreduce (GPU count)");
    *ok = all == 1;
    if (!*ok)
        snprintf(why, wlen, "%d ranks on %s node but %d GPU(s): NCCL needs one GPU per rank "
                 "(use --transport mpi to share a GPU)", c->local_size,
                 mine ? "some" : "this", ndev);
    return MOE_OK;
}

moe_status ep_comm_pick_transport(moe_ep_comm *c, moe_layer *L, ep_transport **tp,
                                  moe_error *err)
{
    *tp = NULL;
    const moe_transport want = c->opts.transport;
    const bool cuda = L->backend == MOE_BACKEND_CUDA;
    bool use_nccl = false;
    if (want == MOE_TRANSPORT_NCCL || (want == MOE_TRANSPORT_AUTO && cuda)) {
        bool ok = false;
        char why[256] = "";
        MOE_TRY(nccl_possible(c, &ok, why, sizeof why, err));
        if (want == MOE_TRANSPORT_NCCL && !ok)
            return ep_agree(c->comm, moe_fail(err, MOE_ERR_UNSUPPORTED, "rank %d: --transport "
                                              "nccl: %s", c->rank, why), err);
        use_nccl = ok;
#ifndef MOE_HAVE_CUDA
        if (want == MOE_TRANSPORT_NCCL)
            return ep_agree(c->comm, moe_fail(err, MOE_ERR_UNSUPPORTED,
                                              "--transport nccl needs a CUDA build with NCCL; use "
                                              "--transport mpi"), err);
        use_nccl = false;
#endif
    }
    if (!use_nccl) {
        *tp = c->mpi;
        return MOE_OK;
    }
    const int device = cuda ? L->device : c->local_rank;
    moe_status st = MOE_OK;
    if (c->nccl && c->nccl_device != device)
        st = moe_fail(err, MOE_ERR_UNSUPPORTED,
                      "rank %d: this communicator's NCCL runs on GPU %d but the layer is on GPU "
                      "%d: every layer of one communicator must use the same GPU", c->rank,
                      c->nccl_device, device);
    st = ep_agree(c->comm, st, err);
    if (st != MOE_OK) return st;
    if (!c->nccl) {
        MOE_TRY(ep_transport_nccl_create(c->comm, device, &c->nccl, err));
        c->nccl_device = device;
    }
    *tp = c->nccl;
    return MOE_OK;
}
