/* test_protocol.c — the service wire format: the header's bytes at the offsets docs/protocol.md
 * gives (checked against hand-written expectations, not against the decoder), decode(encode)
 * round trips, the server's classification of every malformed request header, reply checks,
 * the INFO/STATS payloads and their malformed lengths, addresses, and a randomized sweep
 * (seeded, printed) showing that any 48 bytes either classify as ACCEPT with every invariant
 * holding or are rejected with a message. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "client/moe_proto.h"
#include "rng.h"
#include "service/svc_internal.h"

static const int32_t LAYERS[] = {3, 5};
static moe_proto_served served(void)
{
    moe_proto_served s = {.nlayers = 2, .layers = LAYERS, .H = 37, .E = 7,
                          .dtype = MOE_DTYPE_F32, .max_T = 100, .max_payload = 100 * 37 * 4};
    return s;
}

static moe_proto_header good_forward(void)
{
    moe_proto_header h = moe_proto_header_init(MOE_OP_FORWARD, 42);
    h.layer = 5;
    h.dtype = MOE_DTYPE_F32;
    h.T = 10;
    h.H = 37;
    h.payload_len = 10 * 37 * 4;
    return h;
}

/* ---- header bytes ---- */

static void test_header_bytes(void **state)
{
    (void)state;
    moe_proto_header h = moe_proto_header_init(MOE_OP_STATS, 0x0102030405060708ull);
    h.layer = -2;
    h.dtype = 0x0a0b;
    h.flags = 0x0c0d;
    h.T = 0x11223344u;
    h.H = 0x55667788u;
    h.status = 0x99aabbccu;
    h.aux = 0xddeeff00u;
    h.payload_len = 0x8877665544332211ull;
    uint8_t b[MOE_PROTO_HEADER_SIZE];
    memset(b, 0xee, sizeof b);
    moe_proto_encode_header(&h, b);
    const uint8_t want[MOE_PROTO_HEADER_SIZE] = {
        'M', 'O', 'E', 'P',                         /* magic */
        0x01, 0x00,                                 /* version 1 */
        0x03, 0x00,                                 /* op STATS */
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, /* request id */
        0xfe, 0xff, 0xff, 0xff,                     /* layer -2 */
        0x0b, 0x0a,                                 /* dtype */
        0x0d, 0x0c,                                 /* flags */
        0x44, 0x33, 0x22, 0x11,                     /* T */
        0x88, 0x77, 0x66, 0x55,                     /* H */
        0xcc, 0xbb, 0xaa, 0x99,                     /* status */
        0x00, 0xff, 0xee, 0xdd,                     /* aux */
        0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, /* payload length */
    };
    assert_memory_equal(b, want, sizeof want);
    moe_proto_header d;
    moe_proto_decode_header(b, &d);
    assert_int_equal(d.magic, MOE_PROTO_MAGIC);
    assert_int_equal(d.version, 1);
    assert_int_equal(d.op, MOE_OP_STATS);
    assert_true(d.request_id == 0x0102030405060708ull);
    assert_int_equal(d.layer, -2);
    assert_int_equal(d.dtype, 0x0a0b);
    assert_int_equal(d.flags, 0x0c0d);
    assert_true(d.T == 0x11223344u && d.H == 0x55667788u);
    assert_true(d.status == 0x99aabbccu && d.aux == 0xddeeff00u);
    assert_true(d.payload_len == 0x8877665544332211ull);
}

static void test_scalar_helpers(void **state)
{
    (void)state;
    uint8_t b[8];
    moe_proto_put_u16(b, 0xbeef);
    assert_true(b[0] == 0xef && b[1] == 0xbe);
    assert_int_equal(moe_proto_get_u16(b), 0xbeef);
    moe_proto_put_u32(b, 0xdeadbeefu);
    assert_true(b[0] == 0xef && b[3] == 0xde);
    assert_true(moe_proto_get_u32(b) == 0xdeadbeefu);
    moe_proto_put_u64(b, 0xfedcba9876543210ull);
    assert_true(b[0] == 0x10 && b[7] == 0xfe);
    assert_true(moe_proto_get_u64(b) == 0xfedcba9876543210ull);
}

/* ---- request classification ---- */

static moe_proto_verdict classify(const moe_proto_header *h, moe_status *st, char *msg)
{
    moe_proto_served s = served();
    return moe_proto_check_request(h, &s, st, msg, 512);
}

#define EXPECT(h, verdict, code, needle) expect(&(h), (verdict), (code), (needle))
static void expect(const moe_proto_header *h, moe_proto_verdict verdict, moe_status code,
                   const char *needle)
{
    moe_status st;
    char msg[512];
    moe_proto_verdict v = classify(h, &st, msg);
    bool found = !needle || strstr(msg, needle);
    if (v != verdict || st != code || !found)
        fprintf(stderr, "got verdict %d status %d message '%s'\n", v, st, msg);
    assert_int_equal(v, verdict);
    assert_int_equal(st, code);
    assert_true(found);
}

static void test_accepts(void **state)
{
    (void)state;
    moe_proto_header h = good_forward();
    EXPECT(h, MOE_PROTO_ACCEPT, MOE_OK, NULL);
    h.flags = MOE_FLAG_WANT_LOGITS;
    EXPECT(h, MOE_PROTO_ACCEPT, MOE_OK, NULL);
    h.layer = 3;
    h.T = 100; /* exactly the limit */
    h.payload_len = 100 * 37 * 4;
    EXPECT(h, MOE_PROTO_ACCEPT, MOE_OK, NULL);
    h.T = 1;
    h.payload_len = 37 * 4;
    EXPECT(h, MOE_PROTO_ACCEPT, MOE_OK, NULL);
    for (uint16_t op = MOE_OP_INFO; op <= MOE_OP_SHUTDOWN; op++) {
        moe_proto_header q = moe_proto_header_init(op, 1);
        EXPECT(q, MOE_PROTO_ACCEPT, MOE_OK, NULL);
        /* fields a FORWARD uses are ignored by the others */
        q.layer = 99;
        q.T = 7;
        EXPECT(q, MOE_PROTO_ACCEPT, MOE_OK, NULL);
    }
}

static void test_fatal_frames(void **state)
{
    (void)state;
    moe_proto_header h = good_forward();
    h.magic = 0x4d4f4550; /* the bytes in the wrong order */
    EXPECT(h, MOE_PROTO_FATAL, MOE_ERR_FORMAT, "bad magic");
    h = good_forward();
    h.version = 0;
    EXPECT(h, MOE_PROTO_FATAL, MOE_ERR_UNSUPPORTED, "version 0");
    h.version = 2;
    EXPECT(h, MOE_PROTO_FATAL, MOE_ERR_UNSUPPORTED, "version 2");
    /* a payload over the limit is never read: fatal */
    h = good_forward();
    h.payload_len = 100 * 37 * 4 + 1;
    EXPECT(h, MOE_PROTO_FATAL, MOE_ERR_INVALID_ARG, "over the per-request limit");
    h.payload_len = UINT64_MAX;
    EXPECT(h, MOE_PROTO_FATAL, MOE_ERR_INVALID_ARG, "over the per-request limit");
    /* T over the limit with its consistent (too large) payload: the message names T */
    h = good_forward();
    h.T = 101;
    h.payload_len = 101 * 37 * 4;
    EXPECT(h, MOE_PROTO_FATAL, MOE_ERR_INVALID_ARG, "T=101");
    /* an INFO announcing a huge payload is fatal too (it would have to be read) */
    h = moe_proto_header_init(MOE_OP_INFO, 1);
    h.payload_len = 1ull << 40;
    EXPECT(h, MOE_PROTO_FATAL, MOE_ERR_INVALID_ARG, NULL);
    /* magic is checked first: a bad magic with every other field bad is still FORMAT */
    memset(&h, 0xff, sizeof h);
    EXPECT(h, MOE_PROTO_FATAL, MOE_ERR_FORMAT, "bad magic");
}

static void test_rejected_frames(void **state)
{
    (void)state;
    moe_proto_header h;
    const uint16_t bad_ops[] = {0, 5, 77, 0xffff, MOE_OP_FORWARD | MOE_OP_REPLY,
                                MOE_OP_INFO | MOE_OP_REPLY};
    for (size_t i = 0; i < sizeof bad_ops / sizeof bad_ops[0]; i++) {
        h = good_forward();
        h.op = bad_ops[i];
        EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_UNSUPPORTED, "unknown op");
    }
    h = good_forward();
    h.status = 1;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "must be 0");
    h = good_forward();
    h.aux = 7;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "must be 0");
    h = good_forward();
    h.flags = 0x0002;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "unknown flag");
    h = moe_proto_header_init(MOE_OP_STATS, 1);
    h.payload_len = 4;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "takes none");
    h = moe_proto_header_init(MOE_OP_SHUTDOWN, 1);
    h.payload_len = 1;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "takes none");

    h = good_forward();
    h.layer = 4;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "layer 4 is not served (served layers: 3,5)");
    h.layer = -1;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "not served");
    h = good_forward();
    h.dtype = MOE_DTYPE_BF16;
    h.payload_len = 10 * 37 * 2;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "dtype 0 (bf16)");
    h.dtype = 999;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "(invalid)");
    h = good_forward();
    h.H = 36;
    h.payload_len = 10 * 36 * 4;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "H=36");
    h = good_forward();
    h.T = 0;
    h.payload_len = 0;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "T=0");
    h = good_forward();
    h.T = 101; /* over the limit, with a small (inconsistent) payload: readable, so REJECT */
    h.payload_len = 8;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "T=101");
    h.T = 0xffffffffu;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "over the per-request limit");
    h = good_forward();
    h.payload_len -= 1;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "does not match T*H");
    h.payload_len += 2;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "does not match T*H");
    h.payload_len = 0;
    EXPECT(h, MOE_PROTO_REJECT, MOE_ERR_INVALID_ARG, "does not match T*H");
}

/* Any 48 bytes: never a crash, a message whenever not accepted, and ACCEPT only when every
 * invariant the server relies on holds. Half the samples start from a valid header with a
 * few random bytes flipped, so the deeper checks are reached too. */
static void test_random_headers(void **state)
{
    (void)state;
    uint64_t stream = moe_rng_stream(moe_test_seed(), "test_protocol.random");
    moe_proto_served s = served();
    int accepted = 0, rejected = 0, fatal = 0;
    for (uint64_t it = 0; it < 200000; it++) {
        uint8_t b[MOE_PROTO_HEADER_SIZE];
        uint64_t base = it * 64;
        if (it & 1) {
            for (int i = 0; i < MOE_PROTO_HEADER_SIZE; i++) b[i] = (uint8_t)moe_rng_u64(stream, base + (uint64_t)i);
        } else {
            moe_proto_header g = good_forward();
            if (it % 4 == 0) g = moe_proto_header_init((uint16_t)(1 + it % 4), it);
            moe_proto_encode_header(&g, b);
            int flips = 1 + (int)(moe_rng_u64(stream, base) % 3);
            for (int f = 0; f < flips; f++) {
                uint64_t r = moe_rng_u64(stream, base + 1 + (uint64_t)f);
                b[r % MOE_PROTO_HEADER_SIZE] ^= (uint8_t)(1u << ((r >> 8) % 8));
            }
        }
        moe_proto_header h;
        moe_proto_decode_header(b, &h);
        moe_status st;
        char msg[512];
        moe_proto_verdict v = moe_proto_check_request(&h, &s, &st, msg, sizeof msg);
        if (v == MOE_PROTO_ACCEPT) {
            accepted++;
            assert_int_equal(st, MOE_OK);
            assert_true(h.magic == MOE_PROTO_MAGIC && h.version == MOE_PROTO_VERSION);
            assert_true(h.op >= MOE_OP_FORWARD && h.op <= MOE_OP_SHUTDOWN);
            assert_true(h.status == 0 && h.aux == 0 && (h.flags & ~MOE_FLAGS_KNOWN) == 0);
            if (h.op == MOE_OP_FORWARD) {
                assert_true(h.layer == 3 || h.layer == 5);
                assert_true(h.dtype == MOE_DTYPE_F32 && h.H == 37 && h.T >= 1 && h.T <= 100);
                assert_true(h.payload_len == (uint64_t)h.T * 37 * 4);
            } else {
                assert_true(h.payload_len == 0);
            }
        } else {
            assert_true(st != MOE_OK);
            assert_true(strlen(msg) > 10);
            if (v == MOE_PROTO_FATAL) fatal++;
            else rejected++;
            if (v == MOE_PROTO_REJECT) assert_true(h.payload_len <= s.max_payload);
        }
    }
    fprintf(stderr, "random headers: %d accepted, %d rejected, %d fatal\n", accepted, rejected, fatal);
    assert_true(accepted > 0 && rejected > 0 && fatal > 0);
}

/* ---- replies ---- */

static void test_check_reply(void **state)
{
    (void)state;
    char msg[256];
    moe_proto_header r = moe_proto_header_init(MOE_OP_FORWARD | MOE_OP_REPLY, 9);
    r.payload_len = 100;
    assert_int_equal(moe_proto_check_reply(&r, MOE_OP_FORWARD, 9, 100, msg, sizeof msg), MOE_OK);
    assert_int_equal(moe_proto_check_reply(&r, MOE_OP_FORWARD, 9, 99, msg, sizeof msg), MOE_ERR_FORMAT);
    assert_int_equal(moe_proto_check_reply(&r, MOE_OP_FORWARD, 8, 100, msg, sizeof msg), MOE_ERR_FORMAT);
    assert_non_null(strstr(msg, "request id"));
    assert_int_equal(moe_proto_check_reply(&r, MOE_OP_INFO, 9, 100, msg, sizeof msg), MOE_ERR_FORMAT);
    moe_proto_header q = r;
    q.op = MOE_OP_FORWARD; /* a request echoed back is not a reply */
    assert_int_equal(moe_proto_check_reply(&q, MOE_OP_FORWARD, 9, 100, msg, sizeof msg), MOE_ERR_FORMAT);
    q = r;
    q.magic ^= 1;
    assert_int_equal(moe_proto_check_reply(&q, MOE_OP_FORWARD, 9, 100, msg, sizeof msg), MOE_ERR_FORMAT);
    q = r;
    q.version = 3;
    assert_int_equal(moe_proto_check_reply(&q, MOE_OP_FORWARD, 9, 100, msg, sizeof msg), MOE_ERR_FORMAT);
    /* error replies: the status in range, the message bounded; a connection-level error
     * (op REPLY, id 0) answers any request */
    q = r;
    q.status = MOE_ERR_INVALID_ARG;
    q.payload_len = MOE_PROTO_MAX_MESSAGE;
    assert_int_equal(moe_proto_check_reply(&q, MOE_OP_FORWARD, 9, 0, msg, sizeof msg), MOE_OK);
    q.payload_len = MOE_PROTO_MAX_MESSAGE + 1;
    assert_int_equal(moe_proto_check_reply(&q, MOE_OP_FORWARD, 9, 1u << 20, msg, sizeof msg), MOE_ERR_FORMAT);
    q.payload_len = 10;
    q.status = MOE_PROTO_STATUS_SLOTS;
    assert_int_equal(moe_proto_check_reply(&q, MOE_OP_FORWARD, 9, 0, msg, sizeof msg), MOE_ERR_FORMAT);
    q = moe_proto_header_init(MOE_OP_REPLY, 0);
    q.status = MOE_ERR_NOMEM;
    assert_int_equal(moe_proto_check_reply(&q, MOE_OP_STATS, 123, 0, msg, sizeof msg), MOE_OK);
    q.status = 0; /* a success must answer the request by op and id */
    assert_int_equal(moe_proto_check_reply(&q, MOE_OP_STATS, 123, 0, msg, sizeof msg), MOE_ERR_FORMAT);
}

static void test_error_frame(void **state)
{
    (void)state;
    moe_proto_header req = good_forward();
    size_t len;
    const char *m = "FORWARD: H=36 does not match";
    uint8_t *f = svc_error_frame(&req, MOE_ERR_INVALID_ARG, m, &len);
    assert_non_null(f);
    assert_int_equal(len, MOE_PROTO_HEADER_SIZE + strlen(m));
    moe_proto_header h;
    moe_proto_decode_header(f, &h);
    assert_int_equal(h.op, MOE_OP_FORWARD | MOE_OP_REPLY);
    assert_true(h.request_id == 42 && h.layer == 5 && h.T == 10 && h.H == 37);
    assert_int_equal(h.status, MOE_ERR_INVALID_ARG);
    assert_int_equal(h.payload_len, strlen(m));
    assert_memory_equal(f + MOE_PROTO_HEADER_SIZE, m, strlen(m));
    char msg[128];
    assert_int_equal(moe_proto_check_reply(&h, MOE_OP_FORWARD, 42, 0, msg, sizeof msg), MOE_OK);
    free(f);
    /* an over-long message is cut to the protocol's limit */
    char big[3000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = 0;
    f = svc_error_frame(&req, MOE_ERR_INTERNAL, big, &len);
    assert_int_equal(len, MOE_PROTO_HEADER_SIZE + MOE_PROTO_MAX_MESSAGE);
    free(f);
}

/* ---- payloads ---- */

static void test_info(void **state)
{
    (void)state;
    moe_proto_info in;
    memset(&in, 0, sizeof in);
    in.nranks = 2;
    in.nlayers = 3;
    in.H = 2048;
    in.E = 128;
    in.top_k = 8;
    in.I = 768;
    in.shared_I = 0;
    in.dtype = MOE_DTYPE_BF16;
    in.arch = 0;
    in.max_T = 4096;
    in.max_wait_us = 500;
    snprintf(in.model, sizeof in.model, "qwen3_moe");
    snprintf(in.backend, sizeof in.backend, "cpu");
    in.layers[0] = 0;
    in.layers[1] = 7;
    in.layers[2] = 47;
    size_t n = moe_proto_info_size(&in);
    assert_int_equal(n, MOE_PROTO_INFO_FIXED + 12);
    uint8_t buf[MOE_PROTO_INFO_FIXED + 4 * 8];
    memset(buf, 0xcc, sizeof buf);
    moe_proto_encode_info(&in, buf);
    /* a few offsets by hand */
    assert_int_equal(moe_proto_get_u32(buf + 0), 2);
    assert_int_equal(moe_proto_get_u32(buf + 4), 3);
    assert_int_equal(moe_proto_get_u32(buf + 8), 2048);
    assert_int_equal(moe_proto_get_u16(buf + 28), MOE_DTYPE_BF16);
    assert_int_equal(moe_proto_get_u32(buf + 32), 4096);
    assert_string_equal((const char *)buf + 40, "qwen3_moe");
    assert_int_equal(buf[40 + 63], 0);
    assert_string_equal((const char *)buf + 104, "cpu");
    assert_int_equal(moe_proto_get_u32(buf + 120 + 8), 47);
    moe_proto_info out;
    char msg[256];
    assert_int_equal(moe_proto_decode_info(buf, n, &out, msg, sizeof msg), MOE_OK);
    assert_int_equal(out.nlayers, 3);
    assert_int_equal(out.layers[1], 7);
    assert_int_equal(out.E, 128);
    assert_string_equal(out.model, "qwen3_moe");
    /* malformed: lengths that do not match the layer count, short, no NUL */
    assert_int_equal(moe_proto_decode_info(buf, n - 1, &out, msg, sizeof msg), MOE_ERR_FORMAT);
    assert_int_equal(moe_proto_decode_info(buf, n + 4, &out, msg, sizeof msg), MOE_ERR_FORMAT);
    assert_int_equal(moe_proto_decode_info(buf, 50, &out, msg, sizeof msg), MOE_ERR_FORMAT);
    moe_proto_put_u32(buf + 4, MOE_PROTO_MAX_LAYERS + 1);
    assert_int_equal(moe_proto_decode_info(buf, n, &out, msg, sizeof msg), MOE_ERR_FORMAT);
    moe_proto_put_u32(buf + 4, 3);
    memset(buf + 104, 'a', 16);
    assert_int_equal(moe_proto_decode_info(buf, n, &out, msg, sizeof msg), MOE_ERR_FORMAT);
    assert_non_null(strstr(msg, "NUL"));
}

static void test_stats(void **state)
{
    (void)state;
    moe_proto_stats s;
    memset(&s, 0, sizeof s);
    s.uptime_us = 1;
    s.requests_ok = 0x1122334455667788ull;
    s.latency_max_us = 99;
    s.errors[MOE_ERR_TIMEOUT] = 5;
    s.errors[MOE_PROTO_STATUS_SLOTS - 1] = 6;
    uint8_t buf[MOE_PROTO_STATS_SIZE];
    moe_proto_encode_stats(&s, buf);
    assert_true(moe_proto_get_u64(buf + 8) == 0x1122334455667788ull); /* 2nd field */
    assert_true(moe_proto_get_u64(buf + 17 * 8) == 99);               /* 18th field */
    assert_true(moe_proto_get_u64(buf + (18 + MOE_ERR_TIMEOUT) * 8) == 5);
    moe_proto_stats d;
    char msg[128];
    assert_int_equal(moe_proto_decode_stats(buf, sizeof buf, &d, msg, sizeof msg), MOE_OK);
    assert_memory_equal(&s, &d, sizeof s);
    assert_int_equal(moe_proto_decode_stats(buf, sizeof buf - 8, &d, msg, sizeof msg), MOE_ERR_FORMAT);
    assert_int_equal(moe_proto_decode_stats(buf, sizeof buf + 8, &d, msg, sizeof msg), MOE_ERR_FORMAT);
}

static void test_addresses(void **state)
{
    (void)state;
    moe_proto_addr a;
    char msg[256];
    assert_int_equal(moe_proto_parse_addr("unix:/tmp/x.sock", &a, msg, sizeof msg), MOE_OK);
    assert_true(a.is_unix);
    assert_string_equal(a.path, "/tmp/x.sock");
    assert_int_equal(moe_proto_parse_addr("tcp:127.0.0.1:8080", &a, msg, sizeof msg), MOE_OK);
    assert_false(a.is_unix);
    assert_string_equal(a.host, "127.0.0.1");
    assert_string_equal(a.port, "8080");
    assert_int_equal(moe_proto_parse_addr("tcp:[::1]:0", &a, msg, sizeof msg), MOE_OK);
    assert_string_equal(a.host, "::1");
    assert_string_equal(a.port, "0");
    assert_int_equal(moe_proto_parse_addr("tcp:localhost:65535", &a, msg, sizeof msg), MOE_OK);
    const char *bad[] = {"unix:", "tcp:", "tcp:host", "tcp::80", "tcp:h:", "tcp:h:65536",
                         "tcp:h:-1", "tcp:h:8x", "tcp:[::1]80", "udp:h:1", "/tmp/sock", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        msg[0] = 0;
        assert_int_equal(moe_proto_parse_addr(bad[i], &a, msg, sizeof msg), MOE_ERR_INVALID_ARG);
        assert_true(strlen(msg) > 0);
    }
    char longp[200] = "unix:";
    memset(longp + 5, 'a', 150);
    longp[155] = 0;
    assert_int_equal(moe_proto_parse_addr(longp, &a, msg, sizeof msg), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_proto_parse_addr(NULL, &a, msg, sizeof msg), MOE_ERR_INVALID_ARG);
}

static void test_percentiles(void **state)
{
    (void)state;
    uint32_t v[100];
    for (int i = 0; i < 100; i++) v[i] = (uint32_t)(100 - i); /* 100..1, unsorted */
    assert_int_equal(svc_percentile(v, 100, 50), 50);
    assert_int_equal(svc_percentile(v, 100, 99), 99);
    assert_int_equal(svc_percentile(v, 100, 100), 100);
    assert_int_equal(svc_percentile(v, 100, 0), 1);
    uint32_t one = 7;
    assert_int_equal(svc_percentile(&one, 1, 50), 7);
    assert_int_equal(svc_percentile(&one, 1, 99), 7);
    assert_int_equal(svc_percentile(NULL, 0, 50), 0);
    uint32_t three[3] = {30, 10, 20};
    assert_int_equal(svc_percentile(three, 3, 50), 20);
    assert_int_equal(svc_percentile(three, 3, 99), 30);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_bytes),
        cmocka_unit_test(test_scalar_helpers),
        cmocka_unit_test(test_accepts),
        cmocka_unit_test(test_fatal_frames),
        cmocka_unit_test(test_rejected_frames),
        cmocka_unit_test(test_random_headers),
        cmocka_unit_test(test_check_reply),
        cmocka_unit_test(test_error_frame),
        cmocka_unit_test(test_info),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_addresses),
        cmocka_unit_test(test_percentiles),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
