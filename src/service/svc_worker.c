/* svc_worker.c — batching on rank 0 and the MPI work protocol every rank follows.
 *
 * Per batch, over the service's communicator (a dup of the caller's, errors returned):
 *   1. MPI_Ibcast of the work header int64[4] = {cmd, layer index, T (rows in all), logits?}
 *      from rank 0. Ranks > 0 wait for it with MPI_Test + nanosleep instead of a blocking
 *      call, because Open MPI's blocking waits busy-poll a core: every 10 us for 5 ms after
 *      a batch (under load the next one is near), then backing off from 20 us, doubling, to
 *      idle_poll_us (1 ms: an idle rank costs a few % of a core). cmd EXIT ends the loop.
 *   2. MPI_Scatterv of the rows: rank r gets the contiguous block counts[r] = T/N (+1 for
 *      r < T%N) at displs[r] (rank 0 keeps its block in place).
 *   3. svc_layer_forward on the block (every rank, T_local = 0 included).
 *   4. MPI_Gather of a 256-byte status block {u32 status, 252-byte message} per rank.
 *   5. MPI_Gatherv of the output rows, and of the logits rows when a request asked for them.
 * Every rank makes the same calls whatever its local status, so a failure inside the layer
 * on one rank becomes an error reply for that batch's requests, never a hang. A failed MPI
 * call is fatal (MPI_Abort with a message): the collectives are out of step after it. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#include "svc_internal.h"

enum { CMD_WORK = 1, CMD_EXIT = 2 };
enum { STATUS_BLOCK = 256 };
#define HOT_WINDOW_S 0.005 /* ranks > 0 poll fast this long after a batch */

void svc_mpi_fatal(MPI_Comm comm, int rc, const char *what)
{
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, s, &len) != MPI_SUCCESS) snprintf(s, sizeof s, "error %d", rc);
    moe_warn("serve: fatal: %s failed: %s (a rank died or the network failed); ending the job", what, s);
    MPI_Abort(comm, 2);
    abort();
}

#define MPI_CHECK(comm, call)                                                                 \
    do {                                                                                      \
        int rc_ = (call);                                                                     \
        if (rc_ != MPI_SUCCESS) svc_mpi_fatal((comm), rc_, #call);                            \
    } while (0)

/* Per-rank buffers of one batch. */
typedef struct work_bufs {
    int nranks, rank;
    size_t row_h, row_e;        /* bytes of an output row and of a logits row */
    MPI_Datatype t_h, t_e;      /* one row each, as contiguous bytes */
    int *counts, *displs;
    uint8_t *x, *out, *logits;  /* ranks > 0: [max_local_T] rows; rank 0: [max_batch] rows */
    uint8_t *status_blocks;     /* rank 0: [nranks][STATUS_BLOCK] */
} work_bufs;

static moe_status bufs_init(work_bufs *b, MPI_Comm comm, const svc_model *m,
                            const moe_serve_options *o, moe_error *err)
{
    memset(b, 0, sizeof *b);
    MPI_Comm_size(comm, &b->nranks);
    MPI_Comm_rank(comm, &b->rank);
    size_t esz = moe_dtype_size(m->dt);
    b->row_h = (size_t)m->cfg.hidden * esz;
    b->row_e = (size_t)m->cfg.num_experts * esz;
    MPI_Type_contiguous((int)b->row_h, MPI_BYTE, &b->t_h);
    MPI_Type_commit(&b->t_h);
    MPI_Type_contiguous((int)b->row_e, MPI_BYTE, &b->t_e);
    MPI_Type_commit(&b->t_e);
    size_t rows = b->rank == 0 ? (size_t)o->max_batch_tokens : (size_t)m->max_local_T;
    b->counts = moe_calloc((size_t)b->nranks, sizeof(int), "batch counts", err);
    b->displs = moe_calloc((size_t)b->nranks, sizeof(int), "batch displs", err);
    b->x = moe_malloc(rows * b->row_h, "batch input rows", err);
    b->out = moe_malloc(rows * b->row_h, "batch output rows", err);
    b->logits = moe_malloc(rows * b->row_e, "batch logits rows", err);
    if (b->rank == 0) b->status_blocks = moe_malloc((size_t)b->nranks * STATUS_BLOCK, "status blocks", err);
    if (!b->counts || !b->displs || !b->x || !b->out || !b->logits || (b->rank == 0 && !b->status_blocks))
        return MOE_ERR_NOMEM;
    return MOE_OK;
}

static void bufs_free(work_bufs *b)
{
    if (b->t_h) MPI_Type_free(&b->t_h);
    if (b->t_e) MPI_Type_free(&b->t_e);
    free(b->counts); free(b->displs); free(b->x); free(b->out); free(b->logits);
    free(b->status_blocks);
    memset(b, 0, sizeof *b);
}

/* Steps 2-5 of the protocol (the header is known on every rank). On rank 0 the rows are in
 * b->x[0..T) and come back in b->out / b->logits, statuses in b->status_blocks. */
static void run_work(MPI_Comm comm, svc_model *m, work_bufs *b, const int64_t hdr[4])
{
    int T = (int)hdr[2];
    bool want = hdr[3] != 0;
    int N = b->nranks, r = b->rank;
    for (int i = 0, off = 0; i < N; i++) {
        b->counts[i] = T / N + (i < T % N ? 1 : 0);
        b->displs[i] = off;
        off += b->counts[i];
    }
    int mine = b->counts[r];
    if (r == 0)
        MPI_CHECK(comm, MPI_Scatterv(b->x, b->counts, b->displs, b->t_h, MPI_IN_PLACE, mine,
                                     b->t_h, 0, comm));
    else
        MPI_CHECK(comm, MPI_Scatterv(NULL, NULL, NULL, b->t_h, b->x, mine, b->t_h, 0, comm));

    moe_error err = {0};
    moe_status st = svc_layer_forward(m, (int)hdr[1], mine, b->x, b->out, want ? b->logits : NULL, &err);
    if (st != MOE_OK) moe_warn("serve: layer run failed on this rank (%d rows): %s", mine, err.msg);
    uint8_t blk[STATUS_BLOCK];
    memset(blk, 0, sizeof blk);
    moe_proto_put_u32(blk, (uint32_t)st);
    if (st != MOE_OK) { /* the head of the message: it names what failed */
        size_t n = strnlen(err.msg, STATUS_BLOCK - 5);
        memcpy(blk + 4, err.msg, n);
    }
    MPI_CHECK(comm, MPI_Gather(blk, STATUS_BLOCK, MPI_BYTE, b->status_blocks, STATUS_BLOCK,
                               MPI_BYTE, 0, comm));
    if (r == 0) {
        MPI_CHECK(comm, MPI_Gatherv(MPI_IN_PLACE, mine, b->t_h, b->out, b->counts, b->displs,
                                    b->t_h, 0, comm));
        if (want)
            MPI_CHECK(comm, MPI_Gatherv(MPI_IN_PLACE, mine, b->t_e, b->logits, b->counts,
                                        b->displs, b->t_e, 0, comm));
    } else {
        MPI_CHECK(comm, MPI_Gatherv(b->out, mine, b->t_h, NULL, NULL, NULL, b->t_h, 0, comm));
        if (want)
            MPI_CHECK(comm, MPI_Gatherv(b->logits, mine, b->t_e, NULL, NULL, NULL, b->t_e, 0, comm));
    }
}

static void sleep_ns(long ns)
{
    struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

void svc_worker_rank(MPI_Comm comm, svc_model *m, const moe_serve_options *o)
{
    work_bufs b;
    moe_error err = {0};
    if (bufs_init(&b, comm, m, o, &err) != MOE_OK) {
        /* Startup already agreed; a rank that cannot hold its buffers cannot take part. */
        moe_warn("serve: %s", err.msg);
        MPI_Abort(comm, 1);
    }
    long max_ns = (long)(o->idle_poll_us > 0 ? o->idle_poll_us : 1000) * 1000L;
    /* Sleeps this short need a small timer slack (Linux's default 50 us would stretch them). */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
    double last_work = moe_now();
    for (;;) {
        int64_t hdr[4];
        MPI_Request rq;
        MPI_CHECK(comm, MPI_Ibcast(hdr, 4, MPI_INT64_T, 0, comm, &rq));
        long ns = 20000;
        for (;;) {
            int done = 0;
            MPI_CHECK(comm, MPI_Test(&rq, &done, MPI_STATUS_IGNORE));
            if (done) break;
            /* Right after a batch the next one is likely close (steady load): poll every
             * 10 us for HOT_WINDOW, then back off to the idle interval. */
            if (moe_now() - last_work < HOT_WINDOW_S) {
                sleep_ns(10000);
                continue;
            }
            sleep_ns(ns);
            ns = ns * 2 > max_ns ? max_ns : ns * 2;
        }
        if (hdr[0] == CMD_EXIT) break;
        if (hdr[0] != CMD_WORK) {
            moe_warn("serve: unknown work command %lld from rank 0", (long long)hdr[0]);
            MPI_Abort(comm, 2);
        }
        run_work(comm, m, &b, hdr);
        last_work = moe_now();
    }
    bufs_free(&b);
}

static void bcast_header(MPI_Comm comm, int64_t hdr[4])
{
    MPI_Request rq;
    MPI_CHECK(comm, MPI_Ibcast(hdr, 4, MPI_INT64_T, 0, comm, &rq));
    MPI_CHECK(comm, MPI_Wait(&rq, MPI_STATUS_IGNORE));
}

static struct timespec abs_monotonic(double t)
{
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    return ts;
}

/* Rows the next batch of layer li would hold (FIFO within the layer, stopping at the first
 * request that would overflow the limit). Caller holds mu. */
static uint64_t batch_rows(const svc_shared *sh, int li, uint64_t limit)
{
    uint64_t rows = 0;
    for (const svc_request *q = sh->q_head; q; q = q->next) {
        if (q->layer_index != li) continue;
        if (rows + q->T > limit) break;
        rows += q->T;
    }
    return rows;
}

/* Detach that batch from the queue, in order. Caller holds mu. */
static svc_request *take_batch(svc_shared *sh, int li, uint64_t limit)
{
    svc_request *head = NULL, **tail = &head, **pp = &sh->q_head, *prev = NULL;
    uint64_t rows = 0;
    while (*pp) {
        svc_request *q = *pp;
        if (q->layer_index == li && rows + q->T <= limit) {
            rows += q->T;
            *pp = q->next;
            if (sh->q_tail == q) sh->q_tail = prev;
            q->next = NULL;
            *tail = q;
            tail = &q->next;
            sh->q_len--;
            sh->q_tokens -= q->T;
            continue;
        }
        if (q->layer_index == li) break;
        prev = q;
        pp = &q->next;
    }
    return head;
}

/* Build each request's reply (or error) frame from the gathered batch. */
static void make_replies(svc_request *batch, const svc_model *m, const work_bufs *b)
{
    moe_status bad = MOE_OK;
    char msg[STATUS_BLOCK + 32];
    for (int r = 0; r < b->nranks && bad == MOE_OK; r++) {
        const uint8_t *blk = b->status_blocks + (size_t)r * STATUS_BLOCK;
        moe_status st = (moe_status)moe_proto_get_u32(blk);
        if (st != MOE_OK) {
            bad = st;
            snprintf(msg, sizeof msg, "rank %d: %.*s", r, STATUS_BLOCK - 4, (const char *)blk + 4);
        }
    }
    size_t off = 0;
    for (svc_request *q = batch; q; q = q->next) {
        moe_proto_header h = moe_proto_header_init(MOE_OP_FORWARD | MOE_OP_REPLY, q->request_id);
        h.layer = q->layer;
        h.dtype = (uint16_t)m->dt;
        h.T = q->T;
        h.H = (uint32_t)m->cfg.hidden;
        if (bad != MOE_OK) {
            moe_proto_header req = h;
            req.op = MOE_OP_FORWARD;
            q->reply = svc_error_frame(&req, bad, msg, &q->reply_len);
        } else {
            bool lg = q->flags & MOE_FLAG_WANT_LOGITS;
            size_t ob = (size_t)q->T * b->row_h, lb = lg ? (size_t)q->T * b->row_e : 0;
            h.flags = lg ? MOE_FLAG_HAS_LOGITS : 0;
            h.aux = lg ? (uint32_t)m->cfg.num_experts : 0;
            h.payload_len = ob + lb;
            q->reply_len = MOE_PROTO_HEADER_SIZE + ob + lb;
            q->reply = malloc(q->reply_len);
            if (!q->reply) {
                moe_proto_header req = h;
                req.op = MOE_OP_FORWARD;
                q->reply = svc_error_frame(&req, MOE_ERR_NOMEM, "server: out of memory for the reply",
                                           &q->reply_len);
            } else {
                moe_proto_encode_header(&h, q->reply);
                memcpy(q->reply + MOE_PROTO_HEADER_SIZE, b->out + off * b->row_h, ob);
                if (lg) memcpy(q->reply + MOE_PROTO_HEADER_SIZE + ob, b->logits + off * b->row_e, lb);
            }
        }
        off += q->T;
    }
}

void svc_worker_root(MPI_Comm comm, svc_shared *sh, svc_model *m, const moe_serve_options *o)
{
    work_bufs b;
    moe_error err = {0};
    if (bufs_init(&b, comm, m, o, &err) != MOE_OK) {
        moe_warn("serve: %s", err.msg);
        MPI_Abort(comm, 1);
    }
    const uint64_t limit = (uint64_t)o->max_batch_tokens;
    const double wait_s = o->max_wait_us * 1e-6;
    for (;;) {
        pthread_mutex_lock(&sh->mu);
        while (!sh->q_head && !sh->draining) pthread_cond_wait(&sh->cv, &sh->mu);
        if (!sh->q_head) { /* draining and nothing left */
            pthread_mutex_unlock(&sh->mu);
            break;
        }
        /* Wait for more rows of the oldest request's layer, within its latency budget. */
        int li;
        for (;;) {
            li = sh->q_head->layer_index;
            double deadline = sh->q_head->t_received + wait_s;
            if (batch_rows(sh, li, limit) >= limit || sh->draining || moe_now() >= deadline) break;
            struct timespec ts = abs_monotonic(deadline);
            pthread_cond_timedwait(&sh->cv, &sh->mu, &ts);
        }
        svc_request *batch = take_batch(sh, li, limit);
        pthread_mutex_unlock(&sh->mu);

        int64_t T = 0, want = 0;
        for (svc_request *q = batch; q; q = q->next) {
            memcpy(b.x + (size_t)T * b.row_h, q->x, (size_t)q->T * b.row_h);
            free(q->x);
            q->x = NULL;
            T += q->T;
            if (q->flags & MOE_FLAG_WANT_LOGITS) want = 1;
        }
        int64_t hdr[4] = {CMD_WORK, li, T, want};
        bcast_header(comm, hdr);
        run_work(comm, m, &b, hdr);
        make_replies(batch, m, &b);

        pthread_mutex_lock(&sh->mu);
        sh->st.batches++;
        if ((uint64_t)T > sh->st.batch_tokens_max) sh->st.batch_tokens_max = (uint64_t)T;
        if (sh->done_tail) sh->done_tail->next = batch;
        else sh->done_head = batch;
        svc_request *t = batch;
        while (t->next) t = t->next;
        sh->done_tail = t;
        pthread_mutex_unlock(&sh->mu);
        svc_wake(sh);
    }
    int64_t hdr[4] = {CMD_EXIT, 0, 0, 0};
    bcast_header(comm, hdr);
    bufs_free(&b);
    pthread_mutex_lock(&sh->mu);
    sh->worker_done = true;
    pthread_mutex_unlock(&sh->mu);
    svc_wake(sh);
}
