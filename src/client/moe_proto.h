/*
 * moe_proto.h — the moe-ep service wire format (docs/protocol.md is the byte-level table).
 * Internal: shared by the server (src/service/) and the client library (src/client/).
 *
 * Every message, both directions, is a 48-byte fixed header followed by payload_len bytes.
 * All integers are little-endian; the header is encoded and decoded field by field (never by
 * copying a struct), so compiler padding and host byte order never reach the wire.
 *
 *   off size field        request                          reply
 *    0   4  magic         "MOEP" (0x50454f4d as u32 LE)     same
 *    4   2  version       1                                 1
 *    6   2  op            FORWARD/INFO/STATS/SHUTDOWN       op | 0x8000
 *    8   8  request_id    chosen by the client              echoed
 *   16   4  layer (i32)   served layer number               echoed
 *   20   2  dtype         moe_dtype of the payload          dtype of the reply payload
 *   22   2  flags         bit 0: WANT_LOGITS                bit 0: HAS_LOGITS
 *   24   4  T             rows                              rows
 *   28   4  H             row width                         row width
 *   32   4  status        0                                 moe_status (0 = ok)
 *   36   4  aux           0                                 FORWARD with logits: E
 *   40   8  payload_len   bytes that follow                 bytes that follow
 */
#ifndef MOE_PROTO_H
#define MOE_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "moe_ep.h"

#define MOE_PROTO_MAGIC 0x50454f4du /* the bytes 'M','O','E','P' read as a u32 LE */
#define MOE_PROTO_VERSION 1u
#define MOE_PROTO_HEADER_SIZE 48
#define MOE_PROTO_MAX_MESSAGE 1024 /* bytes of an error reply's message, at most */
#define MOE_PROTO_MAX_LAYERS 1024  /* layers one INFO reply lists, at most */

typedef enum moe_proto_op {
    MOE_OP_FORWARD = 1,  /* payload x [T,H]; reply out [T,H] (+ logits [T,E] with WANT_LOGITS) */
    MOE_OP_INFO = 2,     /* no payload; reply: moe_proto_info */
    MOE_OP_STATS = 3,    /* no payload; reply: moe_proto_stats */
    MOE_OP_SHUTDOWN = 4, /* no payload; reply empty (only with --allow-remote-shutdown) */
} moe_proto_op;
#define MOE_OP_REPLY 0x8000u

#define MOE_FLAG_WANT_LOGITS 0x0001u /* request: also return the router logits */
#define MOE_FLAG_HAS_LOGITS 0x0001u  /* reply: the payload carries logits after the output */
#define MOE_FLAGS_KNOWN 0x0001u

/* The decoded header (host representation; never sent as is). */
typedef struct moe_proto_header {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    uint64_t request_id;
    int32_t layer;
    uint16_t dtype;
    uint16_t flags;
    uint32_t T;
    uint32_t H;
    uint32_t status;
    uint32_t aux;
    uint64_t payload_len;
} moe_proto_header;

/* A header with magic and version filled in, everything else zero. */
moe_proto_header moe_proto_header_init(uint16_t op, uint64_t request_id);
void moe_proto_encode_header(const moe_proto_header *h, uint8_t out[MOE_PROTO_HEADER_SIZE]);
/* Decodes every field; validates nothing (see moe_proto_check_request / _reply). */
void moe_proto_decode_header(const uint8_t in[MOE_PROTO_HEADER_SIZE], moe_proto_header *h);

/* Little-endian scalar helpers (exposed for the payload codecs and the tests). */
void moe_proto_put_u16(uint8_t *p, uint16_t v);
void moe_proto_put_u32(uint8_t *p, uint32_t v);
void moe_proto_put_u64(uint8_t *p, uint64_t v);
uint16_t moe_proto_get_u16(const uint8_t *p);
uint32_t moe_proto_get_u32(const uint8_t *p);
uint64_t moe_proto_get_u64(const uint8_t *p);

const char *moe_proto_op_name(uint16_t op); /* "FORWARD", ..., "unknown" */

/* ---- request validation (the server's, pure so it can be unit-tested) ---- */

/* What the server serves: one config for every layer. */
typedef struct moe_proto_served {
    int nlayers;
    const int32_t *layers; /* served layer numbers */
    uint32_t H, E;
    moe_dtype dtype;
    uint32_t max_T;          /* per-request (and per-batch) token limit */
    uint64_t max_payload;    /* per-request payload byte limit (>= max_T*H*dtype size) */
} moe_proto_served;

typedef enum moe_proto_verdict {
    MOE_PROTO_ACCEPT = 0,  /* a well-formed request: read the payload and serve it */
    MOE_PROTO_REJECT = 1,  /* reply with the error, read and drop the payload, keep the connection */
    MOE_PROTO_FATAL = 2,   /* reply with the error and close: the stream cannot be trusted */
} moe_proto_verdict;

/* Classify a request header. On REJECT/FATAL *status and msg (NUL-terminated) say why.
 * Order of checks: magic (FORMAT, fatal), version (UNSUPPORTED, fatal), payload_len over
 * max_payload (INVALID_ARG, fatal; the message names T when a FORWARD's T is over max_T), a reply bit or an unknown op (UNSUPPORTED), nonzero
 * status/aux or unknown flags (INVALID_ARG), then per op: INFO/STATS/SHUTDOWN carry no
 * payload; FORWARD: layer served, dtype = served dtype, H = served H, 1 <= T <= max_T,
 * payload_len = T*H*sizeof(dtype) (all INVALID_ARG). */
moe_proto_verdict moe_proto_check_request(const moe_proto_header *h, const moe_proto_served *s,
                                          moe_status *status, char *msg, size_t msglen);

/* Validate a reply header against the request it answers: magic, version, op | REPLY,
 * request id, status in range, payload_len <= max_payload. MOE_ERR_FORMAT with msg if not. */
moe_status moe_proto_check_reply(const moe_proto_header *h, uint16_t op, uint64_t request_id,
                                 uint64_t max_payload, char *msg, size_t msglen);

/* ---- INFO payload ---- */
typedef struct moe_proto_info {
    uint32_t nranks;
    uint32_t nlayers;
    uint32_t H, E, top_k, I, shared_I;
    uint16_t dtype;
    uint16_t arch;           /* moe_arch: 0 Qwen3, 1 Llama-4 */
    uint32_t max_T;
    uint32_t max_wait_us;
    char model[64];          /* NUL-terminated */
    char backend[16];        /* NUL-terminated: "cpu", "cuda" */
    int32_t layers[MOE_PROTO_MAX_LAYERS];
} moe_proto_info;
#define MOE_PROTO_INFO_FIXED 120 /* bytes before the layer list */
size_t moe_proto_info_size(const moe_proto_info *info);
/* buf has moe_proto_info_size(info) bytes. */
void moe_proto_encode_info(const moe_proto_info *info, uint8_t *buf);
/* MOE_ERR_FORMAT (msg) when len does not match the layer count or the strings lack a NUL. */
moe_status moe_proto_decode_info(const uint8_t *buf, uint64_t len, moe_proto_info *info,
                                 char *msg, size_t msglen);

/* ---- STATS payload: MOE_PROTO_STATS_FIELDS u64 values, then MOE_PROTO_STATUS_SLOTS error
 * counters (u64 each, indexed by moe_status; slot 0 unused; a fixed count so the layout does
 * not move when moe_status grows) ---- */
#define MOE_PROTO_STATUS_SLOTS 16
typedef struct moe_proto_stats {
    uint64_t uptime_us;
    uint64_t requests_ok;       /* FORWARD requests answered with output */
    uint64_t requests_failed;   /* error replies sent (any op) plus requests lost to a closed connection */
    uint64_t tokens;            /* rows of successful FORWARD requests */
    uint64_t batches;           /* engine runs across the ranks */
    uint64_t batch_tokens_max;  /* largest batch so far */
    uint64_t queue_depth;       /* requests received and waiting for a batch, now */
    uint64_t queue_tokens;      /* their rows */
    uint64_t connections_open;
    uint64_t connections_total;
    uint64_t connections_rejected; /* over --max-connections */
    uint64_t connections_timed_out;/* a partial frame or an unread reply stalled past --io-timeout-ms */
    uint64_t bytes_in_flight;   /* reserved for admitted requests: payload + reply, until written */
    uint64_t latency_samples;   /* requests in the latency window (the last 4096) */
    uint64_t latency_p50_us;    /* receipt of the full request -> reply queued for writing */
    uint64_t latency_p90_us;
    uint64_t latency_p99_us;
    uint64_t latency_max_us;
    uint64_t errors[MOE_PROTO_STATUS_SLOTS]; /* error replies by status code */
} moe_proto_stats;
#define MOE_PROTO_STATS_FIELDS 18
#define MOE_PROTO_STATS_SIZE ((MOE_PROTO_STATS_FIELDS + MOE_PROTO_STATUS_SLOTS) * 8)
void moe_proto_encode_stats(const moe_proto_stats *s, uint8_t buf[MOE_PROTO_STATS_SIZE]);
moe_status moe_proto_decode_stats(const uint8_t *buf, uint64_t len, moe_proto_stats *s,
                                  char *msg, size_t msglen);

/* ---- addresses: "unix:PATH" or "tcp:HOST:PORT" (HOST a name or IPv4/IPv6 literal; an IPv6
 * literal may be bracketed: tcp:[::1]:9000) ---- */
typedef struct moe_proto_addr {
    bool is_unix;
    char path[108];  /* unix: sun_path limit */
    char host[256];
    char port[8];
} moe_proto_addr;
moe_status moe_proto_parse_addr(const char *s, moe_proto_addr *a, char *msg, size_t msglen);

#endif /* MOE_PROTO_H */
