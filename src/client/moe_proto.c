/* moe_proto.c — encode/decode/validate the service wire format (see moe_proto.h and
 * docs/protocol.md). Pure functions: no I/O, no allocation. */
#include "moe_proto.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void moe_proto_put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
void moe_proto_put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
void moe_proto_put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
uint16_t moe_proto_get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
uint32_t moe_proto_get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
uint64_t moe_proto_get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

moe_proto_header moe_proto_header_init(uint16_t op, uint64_t request_id)
{
    moe_proto_header h;
    memset(&h, 0, sizeof h);
    h.magic = MOE_PROTO_MAGIC;
    h.version = MOE_PROTO_VERSION;
    h.op = op;
    h.request_id = request_id;
    return h;
}

void moe_proto_encode_header(const moe_proto_header *h, uint8_t out[MOE_PROTO_HEADER_SIZE])
{
    moe_proto_put_u32(out + 0, h->magic);
    moe_proto_put_u16(out + 4, h->version);
    moe_proto_put_u16(out + 6, h->op);
    moe_proto_put_u64(out + 8, h->request_id);
    moe_proto_put_u32(out + 16, (uint32_t)h->layer);
    moe_proto_put_u16(out + 20, h->dtype);
    moe_proto_put_u16(out + 22, h->flags);
    moe_proto_put_u32(out + 24, h->T);
    moe_proto_put_u32(out + 28, h->H);
    moe_proto_put_u32(out + 32, h->status);
    moe_proto_put_u32(out + 36, h->aux);
    moe_proto_put_u64(out + 40, h->payload_len);
}

void moe_proto_decode_header(const uint8_t in[MOE_PROTO_HEADER_SIZE], moe_proto_header *h)
{
    h->magic = moe_proto_get_u32(in + 0);
    h->version = moe_proto_get_u16(in + 4);
    h->op = moe_proto_get_u16(in + 6);
    h->request_id = moe_proto_get_u64(in + 8);
    h->layer = (int32_t)moe_proto_get_u32(in + 16);
    h->dtype = moe_proto_get_u16(in + 20);
    h->flags = moe_proto_get_u16(in + 22);
    h->T = moe_proto_get_u32(in + 24);
    h->H = moe_proto_get_u32(in + 28);
    h->status = moe_proto_get_u32(in + 32);
    h->aux = moe_proto_get_u32(in + 36);
    h->payload_len = moe_proto_get_u64(in + 40);
}

const char *moe_proto_op_name(uint16_t op)
{
    switch (op & ~MOE_OP_REPLY) {
    case MOE_OP_FORWARD: return "FORWARD";
    case MOE_OP_INFO: return "INFO";
    case MOE_OP_STATS: return "STATS";
    case MOE_OP_SHUTDOWN: return "SHUTDOWN";
    default: return "unknown";
    }
}

static void msgf(char *msg, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void msgf(char *msg, size_t len, const char *fmt, ...)
{
    if (!msg || len == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
}

static const char *dtname(uint16_t d)
{
    const char *n = moe_dtype_name((moe_dtype)d);
    return n ? n : "(invalid)";
}

moe_proto_verdict moe_proto_check_request(const moe_proto_header *h, const moe_proto_served *s,
                                          moe_status *status, char *msg, size_t msglen)
{
    *status = MOE_OK;
    if (msg && msglen) msg[0] = 0;
#define BAD(verdict, code, ...)                                                               \
    do {                                                                                      \
        *status = (code);                                                                     \
        msgf(msg, msglen, __VA_ARGS__);                                                       \
        return (verdict);                                                                     \
    } while (0)
    if (h->magic != MOE_PROTO_MAGIC)
        BAD(MOE_PROTO_FATAL, MOE_ERR_FORMAT,
            "bad magic 0x%08x (expected 0x%08x, the bytes \"MOEP\"); closing the connection",
            (unsigned)h->magic, (unsigned)MOE_PROTO_MAGIC);
    if (h->version != MOE_PROTO_VERSION)
        BAD(MOE_PROTO_FATAL, MOE_ERR_UNSUPPORTED,
            "protocol version %u is not supported (this server speaks version %u); closing the "
            "connection", (unsigned)h->version, (unsigned)MOE_PROTO_VERSION);
    if (h->payload_len > s->max_payload && h->op == MOE_OP_FORWARD && h->T > s->max_T)
        BAD(MOE_PROTO_FATAL, MOE_ERR_INVALID_ARG,
            "FORWARD: T=%u is over the per-request limit of %u rows (--max-batch-tokens); its "
            "%llu payload bytes are not read: closing the connection", (unsigned)h->T,
            (unsigned)s->max_T, (unsigned long long)h->payload_len);
    if (h->payload_len > s->max_payload)
        BAD(MOE_PROTO_FATAL, MOE_ERR_INVALID_ARG,
            "payload length %llu is over the per-request limit of %llu bytes; closing the "
            "connection", (unsigned long long)h->payload_len, (unsigned long long)s->max_payload);
    uint16_t op = h->op;
    if ((op & MOE_OP_REPLY) || op < MOE_OP_FORWARD || op > MOE_OP_SHUTDOWN)
        BAD(MOE_PROTO_REJECT, MOE_ERR_UNSUPPORTED,
            "unknown op %u (expected 1 FORWARD, 2 INFO, 3 STATS or 4 SHUTDOWN)", (unsigned)op);
    if (h->status != 0 || h->aux != 0)
        BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG,
            "%s request: status (%u) and aux (%u) must be 0 in a request", moe_proto_op_name(op),
            (unsigned)h->status, (unsigned)h->aux);
    if (h->flags & ~MOE_FLAGS_KNOWN)
        BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "%s request: unknown flag bits 0x%04x",
            moe_proto_op_name(op), (unsigned)(h->flags & ~MOE_FLAGS_KNOWN));
    if (op != MOE_OP_FORWARD) {
        if (h->payload_len != 0)
            BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG,
                "%s request carries %llu payload bytes; it takes none", moe_proto_op_name(op),
                (unsigned long long)h->payload_len);
        return MOE_PROTO_ACCEPT;
    }
    bool served = false;
    for (int i = 0; i < s->nlayers; i++)
        if (s->layers[i] == h->layer) served = true;
    if (!served) {
        char list[160];
        size_t n = 0;
        list[0] = 0;
        for (int i = 0; i < s->nlayers && n + 16 < sizeof list; i++)
            n += (size_t)snprintf(list + n, sizeof list - n, "%s%d", i ? "," : "", (int)s->layers[i]);
        if (n + 16 >= sizeof list) snprintf(list + n, sizeof list - n, ",...");
        BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG,
            "FORWARD: layer %d is not served (served layers: %s)", (int)h->layer, list);
    }
    if (h->dtype != (uint16_t)s->dtype)
        BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG,
            "FORWARD: dtype %u (%s) does not match layer %d's dtype %u (%s)", (unsigned)h->dtype,
            dtname(h->dtype), (int)h->layer, (unsigned)s->dtype, dtname((uint16_t)s->dtype));
    if (h->H != s->H)
        BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG,
            "FORWARD: H=%u does not match layer %d's hidden size %u", (unsigned)h->H,
            (int)h->layer, (unsigned)s->H);
    if (h->T == 0)
        BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "FORWARD: T=0 (a request carries at least one row)");
    if (h->T > s->max_T)
        BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG,
            "FORWARD: T=%u is over the per-request limit of %u rows (--max-batch-tokens)",
            (unsigned)h->T, (unsigned)s->max_T);
    uint64_t want = (uint64_t)h->T * h->H * moe_dtype_size(s->dtype);
    if (h->payload_len != want)
        BAD(MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG,
            "FORWARD: payload length %llu does not match T*H*sizeof(%s) = %u*%u*%zu = %llu",
            (unsigned long long)h->payload_len, dtname(h->dtype), (unsigned)h->T, (unsigned)h->H,
            moe_dtype_size(s->dtype), (unsigned long long)want);
#undef BAD
    return MOE_PROTO_ACCEPT;
}

moe_status moe_proto_check_reply(const moe_proto_header *h, uint16_t op, uint64_t request_id,
                                 uint64_t max_payload, char *msg, size_t msglen)
{
    if (h->magic != MOE_PROTO_MAGIC) {
        msgf(msg, msglen, "reply: bad magic 0x%08x (not a moe-ep server?)", (unsigned)h->magic);
        return MOE_ERR_FORMAT;
    }
    if (h->version != MOE_PROTO_VERSION) {
        msgf(msg, msglen, "reply: protocol version %u (expected %u)", (unsigned)h->version,
             (unsigned)MOE_PROTO_VERSION);
        return MOE_ERR_FORMAT;
    }
    /* An error about the connection itself (too many connections, a fatal frame) comes with
     * the op of what it answers, or 0 | REPLY when it answers nothing in particular. */
    if (h->op != (uint16_t)(op | MOE_OP_REPLY) && !(h->status != 0 && h->op == MOE_OP_REPLY)) {
        msgf(msg, msglen, "reply: op 0x%04x does not answer %s (expected 0x%04x)", (unsigned)h->op,
             moe_proto_op_name(op), (unsigned)(op | MOE_OP_REPLY));
        return MOE_ERR_FORMAT;
    }
    if (h->request_id != request_id && !(h->status != 0 && h->request_id == 0)) {
        msgf(msg, msglen, "reply: request id %llu does not match the request's %llu",
             (unsigned long long)h->request_id, (unsigned long long)request_id);
        return MOE_ERR_FORMAT;
    }
    if (h->status >= MOE_PROTO_STATUS_SLOTS) {
        msgf(msg, msglen, "reply: status %u out of range", (unsigned)h->status);
        return MOE_ERR_FORMAT;
    }
    uint64_t lim = h->status != 0 ? MOE_PROTO_MAX_MESSAGE : max_payload;
    if (h->payload_len > lim) {
        msgf(msg, msglen, "reply: payload length %llu over the expected %llu",
             (unsigned long long)h->payload_len, (unsigned long long)lim);
        return MOE_ERR_FORMAT;
    }
    return MOE_OK;
}

/* ---- INFO ---- */

size_t moe_proto_info_size(const moe_proto_info *info)
{
    uint32_t n = info->nlayers > MOE_PROTO_MAX_LAYERS ? MOE_PROTO_MAX_LAYERS : info->nlayers;
    return MOE_PROTO_INFO_FIXED + 4 * (size_t)n;
}

static void put_str(uint8_t *p, const char *s, size_t field)
{
    memset(p, 0, field);
    size_t n = strnlen(s, field - 1);
    memcpy(p, s, n);
}

void moe_proto_encode_info(const moe_proto_info *info, uint8_t *buf)
{
    uint32_t n = info->nlayers > MOE_PROTO_MAX_LAYERS ? MOE_PROTO_MAX_LAYERS : info->nlayers;
    moe_proto_put_u32(buf + 0, info->nranks);
    moe_proto_put_u32(buf + 4, n);
    moe_proto_put_u32(buf + 8, info->H);
    moe_proto_put_u32(buf + 12, info->E);
    moe_proto_put_u32(buf + 16, info->top_k);
    moe_proto_put_u32(buf + 20, info->I);
    moe_proto_put_u32(buf + 24, info->shared_I);
    moe_proto_put_u16(buf + 28, info->dtype);
    moe_proto_put_u16(buf + 30, info->arch);
    moe_proto_put_u32(buf + 32, info->max_T);
    moe_proto_put_u32(buf + 36, info->max_wait_us);
    put_str(buf + 40, info->model, 64);
    put_str(buf + 104, info->backend, 16);
    for (uint32_t i = 0; i < n; i++)
        moe_proto_put_u32(buf + MOE_PROTO_INFO_FIXED + 4 * i, (uint32_t)info->layers[i]);
}

static bool get_str(const uint8_t *p, size_t field, char *out)
{
    if (!memchr(p, 0, field)) return false;
    memcpy(out, p, field);
    return true;
}

moe_status moe_proto_decode_info(const uint8_t *buf, uint64_t len, moe_proto_info *info,
                                 char *msg, size_t msglen)
{
    memset(info, 0, sizeof *info);
    if (len < MOE_PROTO_INFO_FIXED) {
        msgf(msg, msglen, "INFO reply: %llu bytes, expected at least %d",
             (unsigned long long)len, MOE_PROTO_INFO_FIXED);
        return MOE_ERR_FORMAT;
    }
    info->nranks = moe_proto_get_u32(buf + 0);
    info->nlayers = moe_proto_get_u32(buf + 4);
    if (info->nlayers > MOE_PROTO_MAX_LAYERS ||
        len != MOE_PROTO_INFO_FIXED + 4 * (uint64_t)info->nlayers) {
        msgf(msg, msglen, "INFO reply: %llu bytes do not hold %u layers",
             (unsigned long long)len, (unsigned)info->nlayers);
        return MOE_ERR_FORMAT;
    }
    info->H = moe_proto_get_u32(buf + 8);
    info->E = moe_proto_get_u32(buf + 12);
    info->top_k = moe_proto_get_u32(buf + 16);
    info->I = moe_proto_get_u32(buf + 20);
    info->shared_I = moe_proto_get_u32(buf + 24);
    info->dtype = moe_proto_get_u16(buf + 28);
    info->arch = moe_proto_get_u16(buf + 30);
    info->max_T = moe_proto_get_u32(buf + 32);
    info->max_wait_us = moe_proto_get_u32(buf + 36);
    if (!get_str(buf + 40, 64, info->model) || !get_str(buf + 104, 16, info->backend)) {
        msgf(msg, msglen, "INFO reply: model or backend string is not NUL-terminated");
        return MOE_ERR_FORMAT;
    }
    for (uint32_t i = 0; i < info->nlayers; i++)
        info->layers[i] = (int32_t)moe_proto_get_u32(buf + MOE_PROTO_INFO_FIXED + 4 * i);
    return MOE_OK;
}

/* ---- STATS ---- */

/* The fixed fields in wire order. */
#define STATS_FIELD_LIST(X)                                                                   \
    X(uptime_us) X(requests_ok) X(requests_failed) X(tokens) X(batches) X(batch_tokens_max)   \
    X(queue_depth) X(queue_tokens) X(connections_open) X(connections_total)                   \
    X(connections_rejected) X(connections_timed_out) X(bytes_in_flight) X(latency_samples)    \
    X(latency_p50_us) X(latency_p90_us) X(latency_p99_us) X(latency_max_us)

void moe_proto_encode_stats(const moe_proto_stats *s, uint8_t buf[MOE_PROTO_STATS_SIZE])
{
    uint8_t *p = buf;
#define PUT(f) moe_proto_put_u64(p, s->f); p += 8;
    STATS_FIELD_LIST(PUT)
#undef PUT
    for (int i = 0; i < MOE_PROTO_STATUS_SLOTS; i++, p += 8) moe_proto_put_u64(p, s->errors[i]);
}

moe_status moe_proto_decode_stats(const uint8_t *buf, uint64_t len, moe_proto_stats *s,
                                  char *msg, size_t msglen)
{
    memset(s, 0, sizeof *s);
    if (len != MOE_PROTO_STATS_SIZE) {
        msgf(msg, msglen, "STATS reply: %llu bytes, expected %d", (unsigned long long)len,
             MOE_PROTO_STATS_SIZE);
        return MOE_ERR_FORMAT;
    }
    const uint8_t *p = buf;
#define GET(f) s->f = moe_proto_get_u64(p); p += 8;
    STATS_FIELD_LIST(GET)
#undef GET
    for (int i = 0; i < MOE_PROTO_STATUS_SLOTS; i++, p += 8) s->errors[i] = moe_proto_get_u64(p);
    return MOE_OK;
}

/* ---- addresses ---- */

moe_status moe_proto_parse_addr(const char *s, moe_proto_addr *a, char *msg, size_t msglen)
{
    memset(a, 0, sizeof *a);
    if (!s) {
        msgf(msg, msglen, "address is missing (expected unix:PATH or tcp:HOST:PORT)");
        return MOE_ERR_INVALID_ARG;
    }
    if (strncmp(s, "unix:", 5) == 0) {
        const char *path = s + 5;
        if (!*path || strlen(path) >= sizeof a->path) {
            msgf(msg, msglen, "address '%s': the socket path must have 1 to %zu bytes", s,
                 sizeof a->path - 1);
            return MOE_ERR_INVALID_ARG;
        }
        a->is_unix = true;
        strcpy(a->path, path);
        return MOE_OK;
    }
    if (strncmp(s, "tcp:", 4) == 0) {
        const char *hp = s + 4;
        const char *colon;
        size_t hostlen;
        if (hp[0] == '[') { /* [v6 literal]:port */
            const char *rb = strchr(hp, ']');
            if (!rb || rb[1] != ':') goto bad_tcp;
            hp++;
            hostlen = (size_t)(rb - hp);
            colon = rb + 1;
        } else {
            colon = strrchr(hp, ':');
            if (!colon) goto bad_tcp;
            hostlen = (size_t)(colon - hp);
        }
        const char *port = colon + 1;
        if (hostlen == 0 || hostlen >= sizeof a->host) goto bad_tcp;
        char *end;
        long pv = strtol(port, &end, 10);
        if (!*port || *end || pv < 0 || pv > 65535) goto bad_tcp;
        memcpy(a->host, hp, hostlen);
        a->host[hostlen] = 0;
        snprintf(a->port, sizeof a->port, "%ld", pv);
        return MOE_OK;
    bad_tcp:
        msgf(msg, msglen, "address '%s': expected tcp:HOST:PORT (PORT 0..65535; IPv6 as [ADDR]:PORT)", s);
        return MOE_ERR_INVALID_ARG;
    }
    msgf(msg, msglen, "address '%s': expected unix:PATH or tcp:HOST:PORT", s);
    return MOE_ERR_INVALID_ARG;
}
