/* svc_net.c — rank 0's I/O thread: the listener, every connection's non-blocking reads and
 * writes through one poll() loop, frame validation, admission limits, timeouts, and handing
 * finished requests back to their connections.
 *
 * A connection reads one frame at a time: the 48-byte header, then its payload into the
 * request's own buffer (FORWARD), or into a scratch buffer to drop it (a rejected frame whose
 * length is trustworthy). Replies queue per connection and are written as the socket accepts
 * them. Connections are named by a unique 64-bit id; the worker's finished requests carry it,
 * and a request whose connection is gone is dropped, so one client's rows never reach another
 * connection. */
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "svc_internal.h"

/* ---- signals: the one piece of process-wide state the service owns (a handler can reach
 * nothing else). Installed on rank 0 only. ---- */
static volatile sig_atomic_t g_signal;
static int g_wake_fd = -1;
static struct sigaction g_old_term, g_old_int, g_old_pipe;

static void on_signal(int signo)
{
    int saved = errno;
    g_signal = signo;
    if (g_wake_fd >= 0) {
        char c = 's';
        ssize_t w = write(g_wake_fd, &c, 1);
        (void)w;
    }
    errno = saved;
}

moe_status svc_signals_install(int wake_w, moe_error *err)
{
    g_signal = 0;
    g_wake_fd = wake_w;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: poll() returns EINTR and sees the flag at once */
    struct sigaction ign;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    if (sigaction(SIGTERM, &sa, &g_old_term) != 0 || sigaction(SIGINT, &sa, &g_old_int) != 0 ||
        sigaction(SIGPIPE, &ign, &g_old_pipe) != 0)
        return moe_fail(err, MOE_ERR_INTERNAL, "sigaction: %s", strerror(errno));
    return MOE_OK;
}

void svc_signals_restore(void)
{
    sigaction(SIGTERM, &g_old_term, NULL);
    sigaction(SIGINT, &g_old_int, NULL);
    sigaction(SIGPIPE, &g_old_pipe, NULL);
    g_wake_fd = -1;
}

/* ---- connections ---- */

typedef struct out_buf {
    struct out_buf *next;
    uint8_t *data;
    size_t len, off;
    uint64_t reserved; /* bytes-in-flight released when written (or dropped) */
} out_buf;

typedef enum { RD_HEADER, RD_PAYLOAD, RD_DISCARD } rd_state;

typedef struct conn {
    int fd;
    uint64_t id;
    char peer[80];
    rd_state rd;
    uint8_t hb[MOE_PROTO_HEADER_SIZE];
    size_t hb_got;
    moe_proto_header cur;
    svc_request *req;       /* RD_PAYLOAD: the request being filled */
    uint64_t pay_got;
    uint64_t discard_left;  /* RD_DISCARD */
    double rd_progress;     /* last read progress inside a partial frame */
    out_buf *out_head, *out_tail;
    double wr_progress;     /* last write progress while output is queued */
    int pending;            /* requests of this connection in the queue or the worker */
    bool eof;               /* the peer closed its side: finish replies, then close */
    bool closing;           /* read nothing more; close once the output is written */
    bool dead;              /* close now */
} conn;

typedef struct net {
    svc_net_args *a;
    svc_shared *sh;
    const moe_serve_options *o;
    moe_proto_served served;
    int32_t *layer_numbers;
    moe_proto_info info;
    size_t row_h, row_e;
    conn **conns;
    int nconns;
    uint64_t next_id;
    uint64_t inflight;
    int listen_fd;
    bool draining;
    double accept_pause_until;
    uint8_t scratch[65536];
} net;

static void stat_error(net *n, moe_status st)
{
    pthread_mutex_lock(&n->sh->mu);
    n->sh->st.requests_failed++;
    if ((unsigned)st < MOE_PROTO_STATUS_SLOTS) n->sh->st.errors[st]++;
    pthread_mutex_unlock(&n->sh->mu);
}

static void stat_add(net *n, uint64_t *field, uint64_t v)
{
    pthread_mutex_lock(&n->sh->mu);
    *field += v;
    pthread_mutex_unlock(&n->sh->mu);
}

static bool partial_frame(const conn *c) { return c->hb_got > 0 || c->rd != RD_HEADER; }

static void free_request(svc_request *q)
{
    if (!q) return;
    free(q->x);
    free(q->reply);
    free(q);
}

/* Queue bytes for writing (takes ownership of data). */
static void queue_out(net *n, conn *c, uint8_t *data, size_t len, uint64_t reserved)
{
    if (!data) { /* an error frame we could not allocate: nothing to say, drop the connection */
        n->inflight -= reserved;
        c->dead = true;
        return;
    }
    out_buf *b = malloc(sizeof *b);
    if (!b) {
        free(data);
        n->inflight -= reserved;
        c->dead = true;
        return;
    }
    *b = (out_buf){NULL, data, len, 0, reserved};
    if (!c->out_head) c->wr_progress = moe_now();
    if (c->out_tail) c->out_tail->next = b;
    else c->out_head = b;
    c->out_tail = b;
}

static void reply_error(net *n, conn *c, const moe_proto_header *h, moe_status st, const char *msg)
{
    moe_warn("serve: conn %llu (%s): %s request %llu: %s: %s", (unsigned long long)c->id, c->peer,
             moe_proto_op_name(h->op), (unsigned long long)h->request_id, moe_strerror(st), msg);
    stat_error(n, st);
    size_t len;
    uint8_t *f = svc_error_frame(h, st, msg, &len);
    queue_out(n, c, f, len, 0);
}

/* A fatal frame: answer with request id 0 (the header cannot be trusted) and close. */
static void reply_fatal(net *n, conn *c, moe_status st, const char *msg)
{
    moe_proto_header h = moe_proto_header_init(0, 0);
    moe_warn("serve: conn %llu (%s): %s: %s%s", (unsigned long long)c->id, c->peer,
             moe_strerror(st), msg, strstr(msg, "closing") ? "" : "; closing the connection");
    stat_error(n, st);
    size_t len;
    uint8_t *f = svc_error_frame(&h, st, msg, &len);
    queue_out(n, c, f, len, 0);
    c->closing = true;
}

static void close_conn(net *n, int i)
{
    conn *c = n->conns[i];
    if (c->req) {
        n->inflight -= c->req->reserved;
        free_request(c->req);
    }
    while (c->out_head) {
        out_buf *b = c->out_head;
        c->out_head = b->next;
        n->inflight -= b->reserved;
        free(b->data);
        free(b);
    }
    if (c->pending)
        moe_warn("serve: conn %llu (%s) closed with %d request(s) unanswered; their results "
                 "will be dropped", (unsigned long long)c->id, c->peer, c->pending);
    moe_info("serve: conn %llu (%s) closed", (unsigned long long)c->id, c->peer);
    close(c->fd);
    free(c);
    n->conns[i] = n->conns[--n->nconns];
    pthread_mutex_lock(&n->sh->mu);
    n->sh->st.connections_open = (uint64_t)n->nconns;
    pthread_mutex_unlock(&n->sh->mu);
}

static conn *find_conn(net *n, uint64_t id)
{
    for (int i = 0; i < n->nconns; i++)
        if (n->conns[i]->id == id) return n->conns[i];
    return NULL;
}

/* ---- frames ---- */

static uint8_t *make_frame(const moe_proto_header *req, const uint8_t *payload, size_t plen,
                           size_t *len)
{
    moe_proto_header h = moe_proto_header_init((uint16_t)(req->op | MOE_OP_REPLY), req->request_id);
    h.payload_len = plen;
    uint8_t *f = malloc(MOE_PROTO_HEADER_SIZE + plen);
    *len = 0;
    if (!f) return NULL;
    moe_proto_encode_header(&h, f);
    if (plen) memcpy(f + MOE_PROTO_HEADER_SIZE, payload, plen);
    *len = MOE_PROTO_HEADER_SIZE + plen;
    return f;
}

static void start_drain(net *n, const char *why)
{
    if (n->draining) return;
    n->draining = true;
    pthread_mutex_lock(&n->sh->mu);
    unsigned long long queued = n->sh->q_len;
    pthread_mutex_unlock(&n->sh->mu);
    moe_warn("serve: %s: draining (finishing %llu queued request(s)), then exiting", why, queued);
    if (n->listen_fd >= 0) {
        close(n->listen_fd);
        n->listen_fd = -1;
        if (n->a->unix_path) unlink(n->a->unix_path);
    }
    pthread_mutex_lock(&n->sh->mu);
    n->sh->draining = true;
    pthread_cond_broadcast(&n->sh->cv);
    pthread_mutex_unlock(&n->sh->mu);
    /* Frames not fully received are not in flight: drop them; read nothing more. */
    for (int i = 0; i < n->nconns; i++) {
        conn *c = n->conns[i];
        if (c->req) {
            n->inflight -= c->req->reserved;
            free_request(c->req);
            c->req = NULL;
        }
        c->closing = true;
    }
}

static void on_header(net *n, conn *c)
{
    moe_proto_header h;
    moe_proto_decode_header(c->hb, &h);
    c->hb_got = 0;
    c->cur = h;
    char msg[MOE_PROTO_MAX_MESSAGE];
    moe_status st;
    moe_proto_verdict v = moe_proto_check_request(&h, &n->served, &st, msg, sizeof msg);
    if (v == MOE_PROTO_FATAL) {
        reply_fatal(n, c, st, msg);
        return;
    }
    if (v == MOE_PROTO_REJECT) {
        reply_error(n, c, &h, st, msg);
        goto discard;
    }
    size_t len;
    switch (h.op) {
    case MOE_OP_INFO: {
        uint8_t buf[MOE_PROTO_INFO_FIXED + 4 * MOE_PROTO_MAX_LAYERS];
        moe_proto_encode_info(&n->info, buf);
        uint8_t *f = make_frame(&h, buf, moe_proto_info_size(&n->info), &len);
        queue_out(n, c, f, len, 0);
        return;
    }
    case MOE_OP_STATS: {
        moe_proto_stats s;
        pthread_mutex_lock(&n->sh->mu);
        svc_stats_snapshot(n->sh, &s);
        pthread_mutex_unlock(&n->sh->mu);
        s.bytes_in_flight = n->inflight;
        s.connections_open = (uint64_t)n->nconns;
        uint8_t buf[MOE_PROTO_STATS_SIZE];
        moe_proto_encode_stats(&s, buf);
        uint8_t *f = make_frame(&h, buf, sizeof buf, &len);
        queue_out(n, c, f, len, 0);
        return;
    }
    case MOE_OP_SHUTDOWN:
        if (!n->o->allow_remote_shutdown) {
            reply_error(n, c, &h, MOE_ERR_UNSUPPORTED,
                        "SHUTDOWN: remote shutdown is disabled (start the server with "
                        "--allow-remote-shutdown)");
            return;
        }
        {
            uint8_t *f = make_frame(&h, NULL, 0, &len); /* before reading len */
            queue_out(n, c, f, len, 0);
        }
        start_drain(n, "SHUTDOWN request");
        return;
    default:
        break;
    }
    /* FORWARD: admission limits, then read the payload into the request. */
    int li = 0;
    for (int i = 0; i < n->served.nlayers; i++)
        if (n->served.layers[i] == h.layer) li = i;
    uint64_t reply = MOE_PROTO_HEADER_SIZE + (uint64_t)h.T * n->row_h +
                     ((h.flags & MOE_FLAG_WANT_LOGITS) ? (uint64_t)h.T * n->row_e : 0);
    uint64_t reserve = h.payload_len + reply;
    if (c->pending >= n->o->max_pending_per_conn) {
        snprintf(msg, sizeof msg, "server busy: %d requests of this connection are already "
                 "waiting (limit %d, --max-pending); read replies before sending more",
                 c->pending, n->o->max_pending_per_conn);
        reply_error(n, c, &h, MOE_ERR_NOMEM, msg);
        goto discard;
    }
    if (n->inflight + reserve > n->o->max_inflight_bytes) {
        snprintf(msg, sizeof msg, "server busy: %llu bytes in flight + %llu for this request "
                 "exceed the limit of %llu (--max-inflight-bytes); retry later",
                 (unsigned long long)n->inflight, (unsigned long long)reserve,
                 (unsigned long long)n->o->max_inflight_bytes);
        reply_error(n, c, &h, MOE_ERR_NOMEM, msg);
        goto discard;
    }
    svc_request *q = calloc(1, sizeof *q);
    if (q) q->x = malloc((size_t)h.payload_len);
    if (!q || !q->x) {
        free(q);
        reply_error(n, c, &h, MOE_ERR_NOMEM, "server: out of memory for the request payload");
        goto discard;
    }
    q->conn_id = c->id;
    q->request_id = h.request_id;
    q->layer_index = li;
    q->layer = h.layer;
    q->T = h.T;
    q->flags = h.flags;
    q->reserved = reserve;
    n->inflight += reserve;
    c->req = q;
    c->pay_got = 0;
    c->rd = RD_PAYLOAD;
    return;
discard:
    if (h.payload_len) {
        c->rd = RD_DISCARD;
        c->discard_left = h.payload_len;
    }
}

static void on_payload(net *n, conn *c)
{
    svc_request *q = c->req;
    c->req = NULL;
    c->rd = RD_HEADER;
    q->t_received = moe_now();
    c->pending++;
    pthread_mutex_lock(&n->sh->mu);
    if (n->sh->q_tail) n->sh->q_tail->next = q;
    else n->sh->q_head = q;
    n->sh->q_tail = q;
    n->sh->q_len++;
    n->sh->q_tokens += q->T;
    pthread_cond_signal(&n->sh->cv);
    pthread_mutex_unlock(&n->sh->mu);
}

static void do_read(net *n, conn *c)
{
    size_t budget = 8u << 20; /* bytes per poll round, so one fast sender cannot starve others */
    while (!c->closing && !c->dead && !c->eof && budget > 0) {
        uint8_t *buf;
        size_t want;
        if (c->rd == RD_HEADER) {
            buf = c->hb + c->hb_got;
            want = sizeof c->hb - c->hb_got;
        } else if (c->rd == RD_PAYLOAD) {
            buf = c->req->x + c->pay_got;
            want = (size_t)(c->cur.payload_len - c->pay_got);
        } else {
            buf = n->scratch;
            want = c->discard_left < sizeof n->scratch ? (size_t)c->discard_left : sizeof n->scratch;
        }
        if (want > budget) want = budget;
        ssize_t r = recv(c->fd, buf, want, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            moe_warn("serve: conn %llu (%s): recv: %s; closing it", (unsigned long long)c->id,
                     c->peer, strerror(errno));
            c->dead = true;
            return;
        }
        if (r == 0) {
            if (partial_frame(c)) {
                char msg[200];
                if (c->rd == RD_HEADER)
                    snprintf(msg, sizeof msg, "truncated frame: the connection closed after %zu "
                             "of the %d header bytes", c->hb_got, MOE_PROTO_HEADER_SIZE);
                else
                    snprintf(msg, sizeof msg, "truncated frame: the connection closed after "
                             "%llu of the %llu payload bytes of request %llu",
                             (unsigned long long)(c->rd == RD_PAYLOAD ? c->pay_got
                                                  : c->cur.payload_len - c->discard_left),
                             (unsigned long long)c->cur.payload_len,
                             (unsigned long long)c->cur.request_id);
                if (c->req) {
                    n->inflight -= c->req->reserved;
                    free_request(c->req);
                    c->req = NULL;
                }
                c->rd = RD_HEADER;
                c->hb_got = 0;
                /* The peer may have closed only its sending side: tell it, then close. */
                reply_fatal(n, c, MOE_ERR_FORMAT, msg);
            }
            c->eof = true;
            return;
        }
        budget -= (size_t)r;
        c->rd_progress = moe_now();
        if (c->rd == RD_HEADER) {
            c->hb_got += (size_t)r;
            if (c->hb_got == sizeof c->hb) on_header(n, c);
        } else if (c->rd == RD_PAYLOAD) {
            c->pay_got += (uint64_t)r;
            if (c->pay_got == c->cur.payload_len) on_payload(n, c);
        } else {
            c->discard_left -= (uint64_t)r;
            if (c->discard_left == 0) c->rd = RD_HEADER;
        }
    }
}

static void do_write(net *n, conn *c)
{
    while (c->out_head && !c->dead) {
        out_buf *b = c->out_head;
        ssize_t w = send(c->fd, b->data + b->off, b->len - b->off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            moe_warn("serve: conn %llu (%s): send: %s; the reply is lost, closing it",
                     (unsigned long long)c->id, c->peer, strerror(errno));
            c->dead = true;
            return;
        }
        b->off += (size_t)w;
        c->wr_progress = moe_now();
        if (b->off == b->len) {
            c->out_head = b->next;
            if (!c->out_head) c->out_tail = NULL;
            n->inflight -= b->reserved;
            free(b->data);
            free(b);
        }
    }
}

static void do_accept(net *n)
{
    if (n->listen_fd < 0 || moe_now() < n->accept_pause_until) return;
    for (;;) {
        int fd = accept4(n->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                /* e.g. EMFILE: pause accepting briefly instead of spinning on a listener that
                 * stays readable */
                moe_warn("serve: accept: %s; pausing accepts for 100 ms", strerror(errno));
                n->accept_pause_until = moe_now() + 0.1;
            }
            return;
        }
        if (n->nconns >= n->o->max_connections) {
            char msg[160];
            snprintf(msg, sizeof msg, "server busy: too many connections (limit %d, "
                     "--max-connections); try again later", n->o->max_connections);
            moe_proto_header h = moe_proto_header_init(0, 0);
            size_t len;
            uint8_t *f = svc_error_frame(&h, MOE_ERR_NOMEM, msg, &len);
            if (f) {
                ssize_t w = send(fd, f, len, MSG_NOSIGNAL | MSG_DONTWAIT); /* best effort */
                (void)w;
                free(f);
            }
            close(fd);
            moe_warn("serve: refused a connection: %s", msg);
            pthread_mutex_lock(&n->sh->mu);
            n->sh->st.connections_rejected++;
            n->sh->st.errors[MOE_ERR_NOMEM]++;
            pthread_mutex_unlock(&n->sh->mu);
            continue;
        }
        conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->id = ++n->next_id;
        if (n->a->unix_path) {
            snprintf(c->peer, sizeof c->peer, "unix");
        } else {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct sockaddr_storage ss;
            socklen_t sl = sizeof ss;
            char host[64] = "?";
            int port = 0;
            if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0) {
                if (ss.ss_family == AF_INET) {
                    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
                    inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
                    port = ntohs(s4->sin_port);
                } else if (ss.ss_family == AF_INET6) {
                    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
                    inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
                    port = ntohs(s6->sin6_port);
                }
            }
            snprintf(c->peer, sizeof c->peer, "tcp %s:%d", host, port);
        }
        n->conns[n->nconns++] = c;
        moe_info("serve: conn %llu (%s) opened", (unsigned long long)c->id, c->peer);
        pthread_mutex_lock(&n->sh->mu);
        n->sh->st.connections_total++;
        n->sh->st.connections_open = (uint64_t)n->nconns;
        pthread_mutex_unlock(&n->sh->mu);
    }
}

/* Hand the worker's finished requests to their connections. */
static void collect_done(net *n)
{
    pthread_mutex_lock(&n->sh->mu);
    svc_request *list = n->sh->done_head;
    n->sh->done_head = n->sh->done_tail = NULL;
    pthread_mutex_unlock(&n->sh->mu);
    double now = moe_now();
    while (list) {
        svc_request *q = list;
        list = q->next;
        conn *c = find_conn(n, q->conn_id);
        moe_proto_header rh;
        moe_status st = MOE_ERR_NOMEM;
        if (q->reply) {
            moe_proto_decode_header(q->reply, &rh);
            st = (moe_status)rh.status;
        }
        pthread_mutex_lock(&n->sh->mu);
        if (c && st == MOE_OK) {
            n->sh->st.requests_ok++;
            n->sh->st.tokens += q->T;
            svc_stats_latency(n->sh, now - q->t_received);
        } else {
            n->sh->st.requests_failed++;
            if (st != MOE_OK && (unsigned)st < MOE_PROTO_STATUS_SLOTS) n->sh->st.errors[st]++;
        }
        pthread_mutex_unlock(&n->sh->mu);
        if (!c) {
            moe_warn("serve: request %llu finished but its connection %llu is gone; result dropped",
                     (unsigned long long)q->request_id, (unsigned long long)q->conn_id);
            n->inflight -= q->reserved;
            free_request(q);
            continue;
        }
        c->pending--;
        if (st != MOE_OK)
            moe_warn("serve: conn %llu (%s): FORWARD request %llu failed: %s",
                     (unsigned long long)c->id, c->peer, (unsigned long long)q->request_id,
                     moe_strerror(st));
        queue_out(n, c, q->reply, q->reply_len, q->reserved);
        q->reply = NULL;
        free_request(q);
    }
}

static void check_timeouts(net *n, double now)
{
    double lim = n->o->io_timeout_ms / 1000.0;
    for (int i = 0; i < n->nconns; i++) {
        conn *c = n->conns[i];
        if (c->dead) continue;
        if (c->out_head && now - c->wr_progress > lim) {
            moe_warn("serve: conn %llu (%s): replies unread for %d ms (%zu bytes waiting); "
                     "closing it", (unsigned long long)c->id, c->peer, n->o->io_timeout_ms,
                     c->out_head->len - c->out_head->off);
            stat_add(n, &n->sh->st.connections_timed_out, 1);
            c->dead = true;
            continue;
        }
        if (!c->closing && !c->eof && partial_frame(c) && now - c->rd_progress > lim) {
            char msg[200];
            if (c->rd == RD_HEADER)
                snprintf(msg, sizeof msg, "incomplete frame: %zu of the %d header bytes arrived "
                         "and nothing more for %d ms (--io-timeout-ms)", c->hb_got,
                         MOE_PROTO_HEADER_SIZE, n->o->io_timeout_ms);
            else
                snprintf(msg, sizeof msg, "incomplete frame: %llu of the %llu payload bytes of "
                         "request %llu arrived and nothing more for %d ms (--io-timeout-ms)",
                         (unsigned long long)(c->rd == RD_PAYLOAD ? c->pay_got
                                              : c->cur.payload_len - c->discard_left),
                         (unsigned long long)c->cur.payload_len,
                         (unsigned long long)c->cur.request_id, n->o->io_timeout_ms);
            if (c->req) {
                n->inflight -= c->req->reserved;
                free_request(c->req);
                c->req = NULL;
            }
            c->rd = RD_HEADER;
            c->hb_got = 0;
            stat_add(n, &n->sh->st.connections_timed_out, 1);
            reply_fatal(n, c, MOE_ERR_TIMEOUT, msg);
        }
    }
}

static bool setup(net *n, svc_net_args *a)
{
    memset(n, 0, sizeof *n);
    n->a = a;
    n->sh = a->sh;
    n->o = a->o;
    n->listen_fd = a->listen_fd;
    const svc_model *m = a->m;
    n->layer_numbers = calloc((size_t)m->nlayers, sizeof(int32_t));
    n->conns = calloc((size_t)n->o->max_connections, sizeof(conn *));
    if (!n->layer_numbers || !n->conns) return false;
    for (int i = 0; i < m->nlayers; i++) n->layer_numbers[i] = m->layers[i].number;
    size_t esz = moe_dtype_size(m->dt);
    n->row_h = (size_t)m->cfg.hidden * esz;
    n->row_e = (size_t)m->cfg.num_experts * esz;
    n->served = (moe_proto_served){
        .nlayers = m->nlayers, .layers = n->layer_numbers, .H = (uint32_t)m->cfg.hidden,
        .E = (uint32_t)m->cfg.num_experts, .dtype = m->dt,
        .max_T = (uint32_t)n->o->max_batch_tokens,
        .max_payload = (uint64_t)n->o->max_batch_tokens * n->row_h};
    moe_proto_info *in = &n->info;
    in->nranks = (uint32_t)a->nranks;
    in->nlayers = (uint32_t)MOE_MIN(m->nlayers, MOE_PROTO_MAX_LAYERS);
    in->H = (uint32_t)m->cfg.hidden;
    in->E = (uint32_t)m->cfg.num_experts;
    in->top_k = (uint32_t)m->cfg.top_k;
    in->I = (uint32_t)m->cfg.inter;
    in->shared_I = (uint32_t)m->cfg.shared_inter;
    in->dtype = (uint16_t)m->dt;
    in->arch = (uint16_t)m->cfg.arch;
    in->max_T = (uint32_t)n->o->max_batch_tokens;
    in->max_wait_us = (uint32_t)n->o->max_wait_us;
    snprintf(in->model, sizeof in->model, "%s", m->cfg.name);
    snprintf(in->backend, sizeof in->backend, "%s%s", m->backend == MOE_BACKEND_CUDA ? "cuda" : "cpu",
             m->ep ? "+ep" : "");
    for (uint32_t i = 0; i < in->nlayers; i++) in->layers[i] = n->layer_numbers[i];
    return true;
}

void *svc_net_thread(void *arg)
{
    svc_net_args *a = arg;
    net *n = malloc(sizeof *n);
    if (!n || !setup(n, a)) {
        moe_warn("serve: out of memory starting the I/O thread; shutting down");
        svc_shared *sh = a->sh;
        pthread_mutex_lock(&sh->mu);
        sh->draining = true;
        pthread_cond_broadcast(&sh->cv);
        pthread_mutex_unlock(&sh->mu);
        if (n) { free(n->layer_numbers); free(n->conns); free(n); }
        return NULL;
    }
    struct pollfd *pfd = calloc((size_t)n->o->max_connections + 2, sizeof *pfd);
    if (!pfd) {
        moe_warn("serve: out of memory for the poll set");
        start_drain(n, "out of memory");
    }
    for (;;) {
        if (g_signal && !n->draining) {
            char why[40];
            snprintf(why, sizeof why, "signal %d (%s)", (int)g_signal,
                     g_signal == SIGTERM ? "SIGTERM" : g_signal == SIGINT ? "SIGINT" : "?");
            start_drain(n, why);
        }
        collect_done(n);
        for (int i = 0; i < n->nconns; i++) do_write(n, n->conns[i]);
        /* Close what is finished. */
        for (int i = n->nconns - 1; i >= 0; i--) {
            conn *c = n->conns[i];
            bool quiet = !c->out_head && c->pending == 0;
            if (c->dead || ((c->closing || c->eof) && quiet)) close_conn(n, i);
        }
        if (n->draining) {
            pthread_mutex_lock(&n->sh->mu);
            bool done = n->sh->worker_done && !n->sh->done_head;
            pthread_mutex_unlock(&n->sh->mu);
            if (done && n->nconns == 0) break;
            if (!pfd) { /* cannot poll: wait for the worker, then drop what is left */
                if (done) break;
                usleep(1000);
                continue;
            }
        }
        /* The poll set: the wake-up pipe, the listener, and every connection with something
         * to read or write (one with neither is left out, so a hang-up it cannot act on does
         * not make poll() return at once forever). */
        int np = 0;
        pfd[np++] = (struct pollfd){.fd = a->wake_r, .events = POLLIN};
        int lslot = -1;
        if (n->listen_fd >= 0 && n->nconns <= n->o->max_connections) {
            lslot = np;
            pfd[np++] = (struct pollfd){.fd = n->listen_fd, .events = POLLIN};
        }
        int first = np;
        double now = moe_now(), lim = n->o->io_timeout_ms / 1000.0, next = now + 0.25;
        for (int i = 0; i < n->nconns; i++) {
            conn *c = n->conns[i];
            short ev = 0;
            if (!c->closing && !c->eof) ev |= POLLIN;
            if (c->out_head) ev |= POLLOUT;
            pfd[np++] = (struct pollfd){.fd = ev ? c->fd : -1, .events = ev};
            if (c->out_head) next = MOE_MIN(next, c->wr_progress + lim);
            if (!c->closing && !c->eof && partial_frame(c)) next = MOE_MIN(next, c->rd_progress + lim);
        }
        int ms = (int)((next - now) * 1000.0) + 1;
        if (ms < 0) ms = 0;
        int r = poll(pfd, (nfds_t)np, ms);
        if (r < 0 && errno != EINTR) {
            moe_warn("serve: poll: %s", strerror(errno));
            usleep(1000);
        }
        if (r > 0) {
            if (pfd[0].revents) {
                uint8_t junk[256];
                while (read(a->wake_r, junk, sizeof junk) > 0) {}
            }
            if (lslot >= 0 && pfd[lslot].revents) do_accept(n);
            /* Connections accepted just now are after the polled ones; conns[] is unchanged
             * otherwise (closing happens at the top of the loop). */
            for (int i = 0; i < np - first && i < n->nconns; i++) {
                conn *c = n->conns[i];
                short re = pfd[first + i].revents;
                if (!re) continue;
                if (re & (POLLIN | POLLHUP | POLLERR)) {
                    if (!c->closing && !c->eof) do_read(n, c);
                    else if (!(re & POLLOUT) && (re & (POLLHUP | POLLERR))) c->dead = true;
                }
                if (re & POLLOUT) do_write(n, c);
            }
        }
        check_timeouts(n, moe_now());
    }
    for (int i = n->nconns - 1; i >= 0; i--) close_conn(n, i);
    if (n->listen_fd >= 0) {
        close(n->listen_fd);
        if (a->unix_path) unlink(a->unix_path);
    }
    free(pfd);
    free(n->layer_numbers);
    free(n->conns);
    free(n);
    return NULL;
}
