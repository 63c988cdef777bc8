/* svc_main.c — moe_serve_run: startup agreed across the ranks, then rank 0's I/O thread and
 * worker, or a rank's worker loop; the ready file; clean exit after a drain. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../client/moe_net.h"
#include "svc_internal.h"

void moe_serve_options_default(moe_serve_options *o)
{
    memset(o, 0, sizeof *o);
    o->backend = MOE_BACKEND_CPU;
    o->dtype = MOE_NUM_DTYPES;
    o->max_batch_tokens = 4096;
    o->max_wait_us = 500;
    o->max_connections = 64;
    o->max_inflight_bytes = 256ull << 20;
    o->max_pending_per_conn = 64;
    o->io_timeout_ms = 10000;
    o->idle_poll_us = 1000;
}

/* Every rank learns whether any rank failed; the lowest failing rank's status and message
 * reach all of them ("rank R: ..."), so every rank returns the same error and none is left
 * waiting in a collective. */
static moe_status agree(MPI_Comm comm, moe_status st, moe_error *err)
{
    int rank, n;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &n);
    int mine = st != MOE_OK ? rank : n, first = n;
    int rc = MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
    if (rc != MPI_SUCCESS) svc_mpi_fatal(comm, rc, "MPI_Allreduce (startup agreement)");
    if (first == n) return MOE_OK;
    char msg[MOE_ERROR_MSG_LEN];
    int code = st;
    if (rank == first) snprintf(msg, sizeof msg, "%s", err->msg);
    if ((rc = MPI_Bcast(msg, sizeof msg, MPI_CHAR, first, comm)) != MPI_SUCCESS ||
        (rc = MPI_Bcast(&code, 1, MPI_INT, first, comm)) != MPI_SUCCESS)
        svc_mpi_fatal(comm, rc, "MPI_Bcast (startup agreement)");
    msg[sizeof msg - 1] = 0;
    /* (the expert-parallel layer's own agreement already says "rank R: ...") */
    if (n > 1 && strncmp(msg, "rank ", 5) != 0)
        return moe_fail(err, (moe_status)code, "rank %d: %s", first, msg);
    return moe_fail(err, (moe_status)code, "%s", msg);
}

static moe_status check_options(const moe_serve_options *o, moe_error *err)
{
    if (!o->listen) return moe_fail(err, MOE_ERR_INVALID_ARG, "serve: no listen address");
    if (!o->config || !o->weights)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "serve: config and weights are required");
    if (o->max_batch_tokens < 1 || o->max_wait_us < 0 || o->max_connections < 1 ||
        o->max_pending_per_conn < 1 || o->io_timeout_ms < 1 || o->idle_poll_us < 1 ||
        o->max_inflight_bytes < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "serve: limits must be positive (max-batch-tokens %d, max-wait-us %d, "
                        "max-connections %d, max-pending %d, io-timeout-ms %d, idle-poll-us %d)",
                        o->max_batch_tokens, o->max_wait_us, o->max_connections,
                        o->max_pending_per_conn, o->io_timeout_ms, o->idle_poll_us);
    if (o->layers && o->nlayers < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "serve: an empty layer list");
    for (int i = 0; o->layers && i < o->nlayers; i++) {
        if (o->layers[i] < 0)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "serve: layer %d < 0", o->layers[i]);
        for (int j = 0; j < i; j++)
            if (o->layers[j] == o->layers[i])
                return moe_fail(err, MOE_ERR_INVALID_ARG, "serve: layer %d listed twice", o->layers[i]);
    }
    return MOE_OK;
}

/* The ready file appears atomically (written to F.tmp, then renamed): "PID\nADDRESS\n". */
static moe_status write_ready(const char *path, const char *bound, moe_error *err)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "ready file path too long");
    FILE *f = fopen(tmp, "w");
    if (!f) return moe_fail(err, MOE_ERR_IO, "ready file %s: %s", tmp, strerror(errno));
    int ok = fprintf(f, "%ld\n%s\n", (long)getpid(), bound) > 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return moe_fail(err, MOE_ERR_IO, "ready file %s: %s", path, strerror(errno));
    }
    return MOE_OK;
}

static moe_status shared_init(svc_shared *sh, moe_error *err)
{
    memset(sh, 0, sizeof *sh);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* deadlines come from moe_now() */
    if (pthread_mutex_init(&sh->mu, NULL) != 0 || pthread_cond_init(&sh->cv, &ca) != 0) {
        pthread_condattr_destroy(&ca);
        return moe_fail(err, MOE_ERR_INTERNAL, "serve: pthread mutex/cond init failed");
    }
    pthread_condattr_destroy(&ca);
    sh->t_start = moe_now();
    return MOE_OK;
}

static void shared_free(svc_shared *sh)
{
    for (int pass = 0; pass < 2; pass++) {
        svc_request *q = pass ? sh->done_head : sh->q_head;
        while (q) {
            svc_request *nx = q->next;
            free(q->x);
            free(q->reply);
            free(q);
            q = nx;
        }
    }
    pthread_mutex_destroy(&sh->mu);
    pthread_cond_destroy(&sh->cv);
}

moe_status moe_serve_run(MPI_Comm user_comm, const moe_serve_options *o, moe_error *err)
{
    MPI_Comm comm;
    int rc = MPI_Comm_dup(user_comm, &comm);
    if (rc != MPI_SUCCESS) return moe_fail(err, MOE_ERR_MPI, "serve: MPI_Comm_dup failed (%d)", rc);
    /* Errors come back as codes: the service decides (abort with a message) instead of MPI's
     * default handler killing the job without one. */
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    int rank, nranks;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &nranks);

    svc_model model;
    memset(&model, 0, sizeof model);
    moe_status st = check_options(o, err);
    int local_rank = rank;
    MPI_Comm node;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
        MPI_Comm_rank(node, &local_rank);
        MPI_Comm_free(&node);
    }
    if (st == MOE_OK) st = svc_model_plan(&model, o, nranks, err);
    if (st == MOE_OK) {
        size_t esz = moe_dtype_size(model.dt), rowb = (size_t)model.cfg.hidden * esz;
        size_t rowe = (size_t)model.cfg.num_experts * esz;
        if (rowb > (size_t)0x7fffffff || rowe > (size_t)0x7fffffff ||
            (size_t)o->max_batch_tokens > SIZE_MAX / (rowb + rowe))
            st = moe_fail(err, MOE_ERR_INVALID_ARG, "serve: --max-batch-tokens %d rows of %zu "
                          "bytes overflow", o->max_batch_tokens, rowb);
    }
    /* Agree before loading: the expert-parallel load is collective, so no rank may skip it
     * because of a failure the others did not have. */
    st = agree(comm, st, err);
    if (st == MOE_OK) {
        st = svc_model_load(&model, o, comm, local_rank, err);
        st = agree(comm, st, err);
    }
    if (st != MOE_OK) {
        svc_model_free(&model);
        MPI_Comm_free(&comm);
        return st;
    }

    /* Rank 0: the listener, the wake-up pipe, the ready file. */
    int listen_fd = -1, wake[2] = {-1, -1};
    char bound[320] = "";
    moe_proto_addr addr;
    memset(&addr, 0, sizeof addr);
    if (rank == 0) {
        st = moe_proto_parse_addr(o->listen, &addr, err->msg, sizeof err->msg);
        if (st != MOE_OK) err->status = st;
        if (st == MOE_OK && pipe2(wake, O_NONBLOCK | O_CLOEXEC) != 0)
            st = moe_fail(err, MOE_ERR_IO, "serve: pipe: %s", strerror(errno));
        if (st == MOE_OK) st = moe_net_listen(&addr, 128, &listen_fd, bound, sizeof bound, err);
        if (st == MOE_OK && o->ready_file) st = write_ready(o->ready_file, bound, err);
        if (st != MOE_OK) {
            if (listen_fd >= 0) {
                close(listen_fd);
                if (addr.is_unix) unlink(addr.path);
            }
            listen_fd = -1;
        }
    }
    st = agree(comm, st, err);
    if (st != MOE_OK) {
        if (wake[0] >= 0) { close(wake[0]); close(wake[1]); }
        svc_model_free(&model);
        MPI_Comm_free(&comm);
        return st;
    }

    if (rank != 0) {
        svc_worker_rank(comm, &model, o);
    } else {
        svc_shared sh;
        pthread_t io;
        bool io_started = false;
        st = shared_init(&sh, err);
        if (st == MOE_OK) {
            sh.wake_w = wake[1];
            st = svc_signals_install(wake[1], err);
        }
        svc_net_args na = {.sh = &sh, .o = o, .m = &model, .nranks = nranks,
                           .listen_fd = listen_fd, .wake_r = wake[0],
                           .unix_path = addr.is_unix ? addr.path : NULL};
        if (st == MOE_OK) {
            if (pthread_create(&io, NULL, svc_net_thread, &na) != 0)
                st = moe_fail(err, MOE_ERR_INTERNAL, "serve: cannot start the I/O thread");
            else
                io_started = true;
        }
        if (st != MOE_OK) {
            /* The other ranks wait for work: release them before returning the error. */
            moe_warn("serve: %s", err->msg);
            close(listen_fd);
            if (addr.is_unix) unlink(addr.path);
            pthread_mutex_lock(&sh.mu);
            sh.draining = true;
            pthread_mutex_unlock(&sh.mu);
        } else if (o->on_ready) {
            /* where rank 0's layers run ("cpu (N threads)" / the GPU's name), so the threads
             * --threads gave (or the default) show */
            moe_layer_info li = MOE_LAYER_INFO_INIT;
            char where[400];
            moe_layer_info_get(model.layers[0].layer, &li);
            snprintf(where, sizeof where, "%s, rank 0 on %s",
                     model.ep ? "expert-parallel" : "experts replicated on every rank",
                     li.device_name);
            o->on_ready(o->user, bound, where);
        }
        /* With draining already set, the worker only releases the other ranks. */
        svc_worker_root(comm, &sh, &model, o);
        if (io_started) pthread_join(io, NULL);
        svc_signals_restore();
        if (o->ready_file) unlink(o->ready_file);
        shared_free(&sh);
        close(wake[0]);
        close(wake[1]);
    }
    svc_model_free(&model);
    MPI_Comm_free(&comm);
    return st;
}
