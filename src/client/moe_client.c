/* moe_client.c — the client library (see moe_client.h): one blocking connection per handle. */
#include "moe_client.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "moe_net.h"
#include "moe_proto.h"

#define CLIENT_MAGIC 0x544e4c43u /* "CLNT" */

struct moe_client {
    uint32_t magic;
    int fd;
    int timeout_ms;
    uint64_t next_id;
    moe_error err;
};

moe_client *moe_client_new(void)
{
    moe_client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->magic = CLIENT_MAGIC;
    c->fd = -1;
    c->timeout_ms = 60000;
    c->next_id = 1;
    return c;
}

void moe_client_disconnect(moe_client *c)
{
    if (!c || c->magic != CLIENT_MAGIC) return;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

void moe_client_free(moe_client *c)
{
    if (!c || c->magic != CLIENT_MAGIC) return;
    moe_client_disconnect(c);
    c->magic = 0;
    free(c);
}

void moe_client_set_timeout(moe_client *c, int timeout_ms)
{
    if (c && c->magic == CLIENT_MAGIC) c->timeout_ms = timeout_ms > 0 ? timeout_ms : 60000;
}

const char *moe_client_last_error(const moe_client *c)
{
    if (!c || c->magic != CLIENT_MAGIC) return "invalid moe_client handle";
    return c->err.msg;
}

static moe_status ok(moe_client *c)
{
    moe_error_clear(&c->err);
    return MOE_OK;
}

moe_status moe_client_connect(moe_client *c, const char *addr)
{
    if (!c || c->magic != CLIENT_MAGIC) return MOE_ERR_INVALID_ARG;
    moe_client_disconnect(c);
    moe_proto_addr a;
    moe_status st = moe_proto_parse_addr(addr, &a, c->err.msg, sizeof c->err.msg);
    if (st != MOE_OK) return c->err.status = st;
    st = moe_net_connect(&a, c->timeout_ms, &c->fd, &c->err);
    if (st != MOE_OK) return st;
    return ok(c);
}

/* A transport/framing failure: the stream is no longer trustworthy. */
static moe_status broken(moe_client *c, moe_status st)
{
    moe_client_disconnect(c);
    return st;
}

/* Send header + payload, read the reply header and validate it; on a server error reply read
 * its message into c->err. On success *reply holds the header and the payload is still to be
 * read by the caller (reply->payload_len bytes). */
static moe_status exchange(moe_client *c, moe_proto_header *req, const void *payload,
                           uint64_t max_reply, moe_proto_header *reply, double *deadline)
{
    if (c->fd < 0)
        return moe_fail(&c->err, MOE_ERR_IO, "not connected (call moe_client_connect)");
    *deadline = moe_now() + c->timeout_ms / 1000.0;
    uint8_t hb[MOE_PROTO_HEADER_SIZE];
    req->request_id = c->next_id++;
    moe_proto_encode_header(req, hb);
    moe_status st;
    if ((st = moe_net_write_all(c->fd, hb, sizeof hb, *deadline, &c->err)) != MOE_OK ||
        (req->payload_len &&
         (st = moe_net_write_all(c->fd, payload, (size_t)req->payload_len, *deadline, &c->err)) != MOE_OK)) {
        /* The server may have refused the frame and closed before taking the whole payload
         * (e.g. T over its limit): its error reply, if it sent one, says more than EPIPE. */
        moe_error saved = c->err;
        if (st == MOE_ERR_IO &&
            moe_net_read_all(c->fd, hb, sizeof hb, moe_now() + 1.0, &c->err) == MOE_OK) {
            moe_proto_decode_header(hb, reply);
            char m[256];
            if (reply->status != MOE_OK &&
                moe_proto_check_reply(reply, req->op, req->request_id, 0, m, sizeof m) == MOE_OK) {
                char msg[MOE_PROTO_MAX_MESSAGE + 1];
                size_t n = (size_t)reply->payload_len;
                if (moe_net_read_all(c->fd, msg, n, moe_now() + 1.0, &c->err) == MOE_OK) {
                    msg[n] = 0;
                    moe_status code = (moe_status)reply->status;
                    moe_fail(&c->err, code, "server: %s: %s", moe_strerror(code), msg);
                    return broken(c, code);
                }
            }
        }
        c->err = saved;
        moe_error_prefix(&c->err, "%s request", moe_proto_op_name(req->op));
        return broken(c, st);
    }
    if ((st = moe_net_read_all(c->fd, hb, sizeof hb, *deadline, &c->err)) != MOE_OK) {
        moe_error_prefix(&c->err, "%s request", moe_proto_op_name(req->op));
        return broken(c, st);
    }
    moe_proto_decode_header(hb, reply);
    st = moe_proto_check_reply(reply, req->op, req->request_id, max_reply, c->err.msg,
                               sizeof c->err.msg);
    if (st != MOE_OK) {
        c->err.status = st;
        return broken(c, st);
    }
    if (reply->status != MOE_OK) {
        char msg[MOE_PROTO_MAX_MESSAGE + 1];
        size_t n = (size_t)reply->payload_len;
        if ((st = moe_net_read_all(c->fd, msg, n, *deadline, &c->err)) != MOE_OK) {
            moe_error_prefix(&c->err, "reading the server's error message");
            return broken(c, st);
        }
        msg[n] = 0;
        moe_status code = (moe_status)reply->status;
        moe_fail(&c->err, code, "server: %s: %s", moe_strerror(code), msg);
        /* The server closes the connection after a fatal frame error; so do we, then. A
         * request-level error keeps it. */
        if (reply->request_id == 0 || code == MOE_ERR_FORMAT) moe_client_disconnect(c);
        return code;
    }
    return MOE_OK;
}

static moe_status read_payload(moe_client *c, void *buf, uint64_t n, double deadline)
{
    moe_status st = moe_net_read_all(c->fd, buf, (size_t)n, deadline, &c->err);
    if (st != MOE_OK) {
        moe_error_prefix(&c->err, "reading the reply payload");
        return broken(c, st);
    }
    return MOE_OK;
}

moe_status moe_client_forward(moe_client *c, int layer, moe_dtype dtype, int T, int H,
                              const void *x, void *out, void *router_logits, int E)
{
    if (!c || c->magic != CLIENT_MAGIC) return MOE_ERR_INVALID_ARG;
    size_t esz = moe_dtype_size(dtype);
    if (esz == 0) return moe_fail(&c->err, MOE_ERR_INVALID_ARG, "forward: dtype %d is not valid", (int)dtype);
    if (T < 1 || H < 1 || !x || !out)
        return moe_fail(&c->err, MOE_ERR_INVALID_ARG, "forward: need T >= 1 (got %d), H >= 1 (got %d), x and out", T, H);
    if (router_logits && E < 1)
        return moe_fail(&c->err, MOE_ERR_INVALID_ARG, "forward: router_logits given with E=%d", E);
    moe_proto_header req = moe_proto_header_init(MOE_OP_FORWARD, 0), rep;
    req.layer = layer;
    req.dtype = (uint16_t)dtype;
    req.flags = router_logits ? MOE_FLAG_WANT_LOGITS : 0;
    req.T = (uint32_t)T;
    req.H = (uint32_t)H;
    uint64_t out_bytes = (uint64_t)T * (uint64_t)H * esz;
    uint64_t logit_bytes = router_logits ? (uint64_t)T * (uint64_t)E * esz : 0;
    req.payload_len = out_bytes;
    double deadline;
    moe_status st = exchange(c, &req, x, out_bytes + logit_bytes, &rep, &deadline);
    if (st != MOE_OK) return st;
    bool has_logits = rep.flags & MOE_FLAG_HAS_LOGITS;
    if (rep.T != req.T || rep.H != req.H || rep.dtype != req.dtype ||
        has_logits != (router_logits != NULL) || (has_logits && rep.aux != (uint32_t)E) ||
        rep.payload_len != out_bytes + logit_bytes) {
        moe_fail(&c->err, MOE_ERR_FORMAT,
                 "FORWARD reply: T=%u H=%u dtype=%u logits=%d E=%u payload %llu does not answer "
                 "T=%d H=%d dtype=%d logits=%d E=%d (%llu bytes)",
                 (unsigned)rep.T, (unsigned)rep.H, (unsigned)rep.dtype, (int)has_logits,
                 (unsigned)rep.aux, (unsigned long long)rep.payload_len, T, H, (int)dtype,
                 router_logits != NULL, E, (unsigned long long)(out_bytes + logit_bytes));
        return broken(c, MOE_ERR_FORMAT);
    }
    MOE_TRY(read_payload(c, out, out_bytes, deadline));
    if (router_logits) MOE_TRY(read_payload(c, router_logits, logit_bytes, deadline));
    return ok(c);
}

moe_status moe_client_info_get(moe_client *c, moe_client_info *info)
{
    if (!c || c->magic != CLIENT_MAGIC || !info) return MOE_ERR_INVALID_ARG;
    moe_proto_header req = moe_proto_header_init(MOE_OP_INFO, 0), rep;
    double deadline;
    uint64_t max = MOE_PROTO_INFO_FIXED + 4 * MOE_PROTO_MAX_LAYERS;
    MOE_TRY(exchange(c, &req, NULL, max, &rep, &deadline));
    uint8_t *buf = malloc(max);
    if (!buf) return broken(c, moe_fail(&c->err, MOE_ERR_NOMEM, "INFO reply buffer"));
    moe_status st = read_payload(c, buf, rep.payload_len, deadline);
    moe_proto_info pi;
    if (st == MOE_OK) {
        st = moe_proto_decode_info(buf, rep.payload_len, &pi, c->err.msg, sizeof c->err.msg);
        if (st != MOE_OK) broken(c, c->err.status = st);
    }
    free(buf);
    if (st != MOE_OK) return st;
    memset(info, 0, sizeof *info);
    info->nranks = (int)pi.nranks;
    info->nlayers = (int)pi.nlayers;
    info->hidden = (int)pi.H;
    info->num_experts = (int)pi.E;
    info->top_k = (int)pi.top_k;
    info->inter = (int)pi.I;
    info->shared_inter = (int)pi.shared_I;
    info->dtype = (moe_dtype)pi.dtype;
    info->arch = pi.arch;
    info->max_tokens = (int)pi.max_T;
    info->max_wait_us = (int)pi.max_wait_us;
    memcpy(info->model, pi.model, sizeof info->model);
    memcpy(info->backend, pi.backend, sizeof info->backend);
    for (uint32_t i = 0; i < pi.nlayers; i++) info->layers[i] = pi.layers[i];
    return ok(c);
}

moe_status moe_client_stats_get(moe_client *c, moe_client_stats *s)
{
    if (!c || c->magic != CLIENT_MAGIC || !s) return MOE_ERR_INVALID_ARG;
    moe_proto_header req = moe_proto_header_init(MOE_OP_STATS, 0), rep;
    double deadline;
    MOE_TRY(exchange(c, &req, NULL, MOE_PROTO_STATS_SIZE, &rep, &deadline));
    uint8_t buf[MOE_PROTO_STATS_SIZE];
    if (rep.payload_len != MOE_PROTO_STATS_SIZE) {
        moe_fail(&c->err, MOE_ERR_FORMAT, "STATS reply: %llu bytes, expected %d",
                 (unsigned long long)rep.payload_len, MOE_PROTO_STATS_SIZE);
        return broken(c, MOE_ERR_FORMAT);
    }
    MOE_TRY(read_payload(c, buf, rep.payload_len, deadline));
    moe_proto_stats ps;
    moe_status st = moe_proto_decode_stats(buf, rep.payload_len, &ps, c->err.msg, sizeof c->err.msg);
    if (st != MOE_OK) return broken(c, c->err.status = st);
    s->uptime_us = ps.uptime_us;
    s->requests_ok = ps.requests_ok;
    s->requests_failed = ps.requests_failed;
    s->tokens = ps.tokens;
    s->batches = ps.batches;
    s->batch_tokens_max = ps.batch_tokens_max;
    s->queue_depth = ps.queue_depth;
    s->queue_tokens = ps.queue_tokens;
    s->connections_open = ps.connections_open;
    s->connections_total = ps.connections_total;
    s->connections_rejected = ps.connections_rejected;
    s->connections_timed_out = ps.connections_timed_out;
    s->bytes_in_flight = ps.bytes_in_flight;
    s->latency_samples = ps.latency_samples;
    s->latency_p50_us = ps.latency_p50_us;
    s->latency_p90_us = ps.latency_p90_us;
    s->latency_p99_us = ps.latency_p99_us;
    s->latency_max_us = ps.latency_max_us;
    for (int i = 0; i < MOE_CLIENT_STATUS_SLOTS && i < MOE_PROTO_STATUS_SLOTS; i++)
        s->errors[i] = ps.errors[i];
    return ok(c);
}

moe_status moe_client_shutdown(moe_client *c)
{
    if (!c || c->magic != CLIENT_MAGIC) return MOE_ERR_INVALID_ARG;
    moe_proto_header req = moe_proto_header_init(MOE_OP_SHUTDOWN, 0), rep;
    double deadline;
    MOE_TRY(exchange(c, &req, NULL, 0, &rep, &deadline));
    return ok(c);
}
