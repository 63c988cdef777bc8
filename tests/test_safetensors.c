/* test_safetensors.c — the safetensors reader and writer.
 *  - the reader on files built byte by byte here (independent of the writer): views, metadata,
 *    offsets in an order unlike the header's, scalars, empty tensors, non-ASCII names;
 *  - every malformed kind: the expected status and a message naming the file and the problem;
 *  - every proper prefix of a valid file fails cleanly; random header corruption never crashes;
 *  - writer round trip of every dtype with random content, with the written bytes checked
 *    against the format independently (header length, padding, key order, offsets);
 *  - files written by Python's safetensors (tests/fixtures/hf): read, checked against an
 *    independent parse of their header, rewritten by our writer and read back the same;
 *  - writer misuse: duplicate / reserved names, bad dtype, unwritable path, failed rename
 *    leaving nothing half-written.
 * Files live in a fresh mkdtemp directory, removed at the end. */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "test_util.h"
#include "dtype.h"
#include "rng.h"
#include "safetensors.h"

static char g_dir[256];
static int g_file_no;

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    return remove(p);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof g_dir, "%s/moe_st_test_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(g_dir)) return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    return nftw(g_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A fresh file name in the test directory. */
static void fresh_path(char *buf, size_t len, const char *tag)
{
    snprintf(buf, len, "%s/%s_%d.safetensors", g_dir, tag, g_file_no++);
}

static void write_file(const char *path, const void *bytes, size_t n)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    if (n) assert_int_equal(n, fwrite(bytes, 1, n, fp));
    assert_int_equal(0, fclose(fp));
}

static uint8_t *read_file(const char *path, size_t *n)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long len = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)len + 1);
    assert_non_null(b);
    assert_int_equal((size_t)len, fread(b, 1, (size_t)len, fp));
    fclose(fp);
    *n = (size_t)len;
    return b;
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Bytes of a file: length field = hlen (normally strlen(json)), the JSON, then data. */
static uint8_t *build_bytes(uint64_t hlen_field, const char *json, size_t jlen, const void *data,
                            size_t dlen, size_t *total)
{
    *total = 8 + jlen + dlen;
    uint8_t *b = calloc(*total ? *total : 1, 1);
    assert_non_null(b);
    put_le64(b, hlen_field);
    memcpy(b + 8, json, jlen);
    if (dlen && data) memcpy(b + 8 + jlen, data, dlen);
    return b;
}

static void write_st(const char *path, const char *json, const void *data, size_t dlen)
{
    size_t n;
    uint8_t *b = build_bytes(strlen(json), json, strlen(json), data, dlen, &n);
    write_file(path, b, n);
    free(b);
}

static bool is_zeroed(const moe_st_file *f)
{
    static const moe_st_file zero;
    return memcmp(f, &zero, sizeof zero) == 0;
}

/* Open must fail with want, a message naming the file and containing n1 (and n2). */
static void expect_open_fail(const char *path, moe_status want, const char *n1, const char *n2)
{
    moe_st_file f;
    memset(&f, 0x5a, sizeof f); /* garbage in: open must not read it */
    moe_error err = {0};
    moe_status st = moe_st_open(path, &f, &err);
    if (st != want || !strstr(err.msg, path) || (n1 && !strstr(err.msg, n1)) ||
        (n2 && !strstr(err.msg, n2)))
        print_error("status %d (want %d), message: %s\n  expected to contain '%s' and '%s'\n",
                    (int)st, (int)want, err.msg, n1 ? n1 : "", n2 ? n2 : "");
    assert_int_equal(want, st);
    assert_int_equal(want, err.status);
    assert_non_null(strstr(err.msg, path));
    if (n1) assert_non_null(strstr(err.msg, n1));
    if (n2) assert_non_null(strstr(err.msg, n2));
    assert_true(is_zeroed(&f));
    moe_st_close(&f); /* no-op on a failed open */
}

static void expect_json_fail(const char *json, size_t dlen, moe_status want, const char *n1,
                             const char *n2)
{
    char path[512];
    fresh_path(path, sizeof path, "bad");
    uint8_t *data = calloc(dlen ? dlen : 1, 1);
    write_st(path, json, data, dlen);
    free(data);
    expect_open_fail(path, want, n1, n2);
}

/* ---- reader on hand-built bytes ---- */

static void test_read_hand_built(void **state)
{
    (void)state;
    uint64_t stream = moe_rng_stream(moe_test_seed(), "hand_built");
    /* Data area (31 bytes, covered exactly): s F64 scalar [0,8), i I64 [1] [8,16),
     * w BF16 [2,3] [16,28), z F32 [0,5] at 28 (empty), u F8 [3] [28,31). */
    uint8_t data[31];
    for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)moe_rng_u64(stream, i);
    double scalar = 3.25;
    memcpy(data, &scalar, 8);
    int64_t i64 = -1234567890123ll;
    memcpy(data + 8, &i64, 8);
    /* header in an order unlike the offsets, with metadata in the middle, padded with spaces
     * to a length that is not a multiple of 8 (the reader must not insist on alignment) */
    const char *json =
        "{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[16,28]},"
        " \"s\" : {\"shape\":[],\"dtype\":\"F64\",\"data_offsets\":[0,8]},"
        "\"__metadata__\":{\"format\":\"pt\",\"note\":\"hand made\"},"
        "\"z\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[28,28],\"extra\":1},"
        "\"i\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[8,16]},"
        "\"\xc3\xa9u\":{\"dtype\":\"F8_E4M3\",\"shape\":[3],\"data_offsets\":[28.0,31]}}   ";
    char path[512];
    fresh_path(path, sizeof path, "hand");
    write_st(path, json, data, sizeof data);

    moe_st_file f;
    moe_error err = {0};
    moe_status st = moe_st_open(path, &f, &err);
    if (st) print_error("%s\n", err.msg);
    assert_int_equal(MOE_OK, st);
    assert_int_equal(5, f.count);
    assert_int_equal(sizeof data, f.data_len);
    assert_int_equal(8 + strlen(json) + sizeof data, f.map_len);
    assert_string_equal(path, f.path);

    static const char *names[] = {"w", "s", "z", "i", "\xc3\xa9u"}; /* header order */
    static const moe_dtype dts[] = {MOE_DTYPE_BF16, MOE_DTYPE_F64, MOE_DTYPE_F32, MOE_DTYPE_I64,
                                    MOE_DTYPE_F8_E4M3};
    static const int nds[] = {2, 0, 2, 1, 1};
    static const uint64_t begins[] = {16, 0, 28, 8, 28}, ends[] = {28, 8, 28, 16, 31};
    for (int k = 0; k < 5; k++) {
        assert_string_equal(names[k], f.entries[k].name);
        const moe_st_entry *e = moe_st_find(&f, names[k]);
        assert_ptr_equal(&f.entries[k], e);
        assert_int_equal(dts[k], e->dtype);
        assert_int_equal(nds[k], e->ndim);
        assert_int_equal(begins[k], e->begin);
        assert_int_equal(ends[k], e->end);
        moe_tensor v;
        assert_int_equal(MOE_OK, moe_st_get(&f, names[k], &v, &err));
        assert_false(v.owns);
        assert_int_equal(dts[k], v.dtype);
        assert_int_equal(ends[k] - begins[k], v.nbytes);
        assert_int_equal(ends[k] - begins[k], moe_tensor_numel(&v) * moe_dtype_size(v.dtype));
        /* the view is the file's bytes at 8 + header + begin */
        assert_ptr_equal((const uint8_t *)f.map + 8 + strlen(json) + begins[k], v.data);
        assert_memory_equal(data + begins[k], v.data, v.nbytes);
    }
    assert_int_equal(3, f.entries[0].shape[1]);
    assert_int_equal(0, f.entries[2].shape[0]);
    assert_int_equal(5, f.entries[2].shape[1]);
    moe_tensor s;
    assert_int_equal(MOE_OK, moe_st_get(&f, "s", &s, &err));
    assert_int_equal(1, moe_tensor_numel(&s));
    assert_true(moe_load_elem(MOE_DTYPE_F64, s.data, 0) == 3.25);
    moe_tensor it;
    assert_int_equal(MOE_OK, moe_st_get(&f, "i", &it, &err));
    int64_t got;
    memcpy(&got, it.data, 8);
    assert_true(got == i64);

    assert_string_equal("pt", moe_st_metadata(&f, "format"));
    assert_string_equal("hand made", moe_st_metadata(&f, "note"));
    assert_null(moe_st_metadata(&f, "missing"));
    assert_null(moe_st_find(&f, "nope"));
    assert_null(moe_st_find(&f, "__metadata__"));
    moe_tensor v;
    assert_int_equal(MOE_ERR_FORMAT, moe_st_get(&f, "nope", &v, &err));
    assert_non_null(strstr(err.msg, "tensor 'nope' not found in"));
    assert_non_null(strstr(err.msg, path));

    moe_st_close(&f);
    assert_true(is_zeroed(&f));
    moe_st_close(&f); /* twice is harmless */
}

/* An empty header object, and one with only metadata, are valid files of no tensors (and so
 * of an empty data area: bytes after such a header belong to no tensor and are refused). */
static void test_read_empty(void **state)
{
    (void)state;
    const char *jsons[] = {"{}", "{\"__metadata__\":{}}", "  {  }  "};
    for (int k = 0; k < 3; k++) {
        char path[512];
        fresh_path(path, sizeof path, "empty");
        write_st(path, jsons[k], NULL, 0);
        moe_st_file f;
        moe_error err = {0};
        assert_int_equal(MOE_OK, moe_st_open(path, &f, &err));
        assert_int_equal(0, f.count);
        assert_int_equal(0, f.data_len);
        assert_null(moe_st_find(&f, "a"));
        moe_st_close(&f);
        fresh_path(path, sizeof path, "empty_trailing");
        write_st(path, jsons[k], "xyz", 3);
        expect_open_fail(path, MOE_ERR_FORMAT, "no tensors, but the data area has 3 bytes", NULL);
    }
}

/* ---- malformed headers ---- */

#define F32_2(off0, off1) "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[" #off0 "," #off1 "]}"

static void test_malformed_json(void **state)
{
    (void)state;
    const struct {
        const char *json;
        size_t dlen;
        moe_status st;
        const char *n1, *n2;
    } cases[] = {
        /* header-level */
        {"", 0, MOE_ERR_FORMAT, "not valid JSON", NULL},
        {"{\"a\": ", 0, MOE_ERR_FORMAT, "not valid JSON", NULL},
        {"{\"a\":1,}", 0, MOE_ERR_FORMAT, "not valid JSON", NULL},
        {"[1,2]", 0, MOE_ERR_FORMAT, "not a JSON object", NULL},
        {"\"abc\"", 0, MOE_ERR_FORMAT, "not a JSON object", NULL},
        {"{} x", 0, MOE_ERR_FORMAT, "trailing", NULL},
        {"{}{}", 0, MOE_ERR_FORMAT, "trailing", NULL},
        /* entries */
        {"{\"a\":5}", 0, MOE_ERR_FORMAT, "tensor 'a'", "not an object"},
        {"{\"a\":[1]}", 0, MOE_ERR_FORMAT, "tensor 'a'", "not an object"},
        {"{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "tensor 'a'",
         "missing field 'dtype'"},
        {"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "tensor 'a'",
         "missing field 'shape'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, MOE_ERR_FORMAT, "tensor 'a'",
         "missing field 'data_offsets'"},
        {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
         MOE_ERR_FORMAT, "tensor 'a'", "'dtype' appears twice"},
        /* dtype */
        {"{\"a\":{\"dtype\":\"Q7\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "unknown dtype 'Q7'"},
        {"{\"a\":{\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "unknown dtype 'f32'"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]}}", 8, MOE_ERR_UNSUPPORTED,
         "tensor 'a'", "dtype 'U8' is not supported"},
        {"{\"a\":{\"dtype\":5,\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "'dtype' is not a string"},
        /* shape */
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":3,\"data_offsets\":[0,12]}}", 12, MOE_ERR_FORMAT,
         "tensor 'a'", "'shape' is not an array"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 0, MOE_ERR_FORMAT,
         "tensor 'a'", "shape[0] is not a non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, MOE_ERR_FORMAT,
         "tensor 'a'", "shape[0] is not a non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,\"x\"],\"data_offsets\":[0,8]}}", 8,
         MOE_ERR_FORMAT, "tensor 'a'", "shape[1] is not a non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,null],\"data_offsets\":[0,8]}}", 8,
         MOE_ERR_FORMAT, "tensor 'a'", "shape[1]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1e16],\"data_offsets\":[0,4]}}", 4, MOE_ERR_FORMAT,
         "tensor 'a'", "shape[0]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
         MOE_ERR_FORMAT, "tensor 'a'", "more than 4 dimensions"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
         "\"data_offsets\":[0,4]}}", 4, MOE_ERR_FORMAT, "tensor 'a'", "overflows"},
        {"{\"a\":{\"dtype\":\"F64\",\"shape\":[4294967296,2147483648],"
         "\"data_offsets\":[0,4]}}", 4, MOE_ERR_FORMAT, "tensor 'a'", "byte count overflows"},
        /* data_offsets */
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":7}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "'data_offsets' is not an array"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "exactly two integers"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "exactly two integers"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "exactly two integers"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0.5,8.5]}}", 9,
         MOE_ERR_FORMAT, "tensor 'a'", "data_offsets[0] is not a non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "data_offsets[0] is not a non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,\"8\"]}}", 8,
         MOE_ERR_FORMAT, "tensor 'a'", "data_offsets[1] is not a non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,1e300]}}", 8,
         MOE_ERR_FORMAT, "tensor 'a'", "data_offsets[1]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "begin is after end"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "past the data area (8 bytes)"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[9,9]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "past the data area"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "needs 8 bytes but data_offsets [0, 4] span 4"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,4]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "needs 2 bytes"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,0],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT,
         "tensor 'a'", "needs 0 bytes"},
        /* ranges and names across entries */
        {"{\"a\":" F32_2(0, 8) ",\"b\":" F32_2(4, 12) "}", 16, MOE_ERR_FORMAT,
         "'a' [0, 8) and 'b' [4, 12) overlap", NULL},
        {"{\"b\":" F32_2(8, 16) ",\"c\":" F32_2(20, 28) ",\"a\":{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]}}", 32,
         MOE_ERR_FORMAT, "overlap", "'a'"},
        /* ranges inside a longer earlier one */
        {"{\"big\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[0,32]},"
         "\"in1\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
         "\"in2\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", 32,
         MOE_ERR_FORMAT, "overlap", "'big'"},
        {"{\"a\":" F32_2(0, 8) ",\"a\":" F32_2(8, 16) "}", 16, MOE_ERR_FORMAT,
         "duplicate tensor name 'a'", NULL},
        {"{\"x\":" F32_2(0, 8) ",\"a\":" F32_2(8, 16) ",\"y\":" F32_2(16, 24) ",\"a\":"
         F32_2(24, 32) "}", 32, MOE_ERR_FORMAT, "duplicate tensor name 'a'", NULL},
        /* metadata */
        {"{\"__metadata__\":5}", 0, MOE_ERR_FORMAT, "'__metadata__' is not an object", NULL},
        {"{\"__metadata__\":[\"a\"]}", 0, MOE_ERR_FORMAT, "'__metadata__' is not an object",
         NULL},
        {"{\"__metadata__\":{\"k\":1}}", 0, MOE_ERR_FORMAT, "'__metadata__' value of key 'k'",
         "not a string"},
        {"{\"__metadata__\":{\"k\":{}}}", 0, MOE_ERR_FORMAT, "key 'k'", "not a string"},
        {"{\"__metadata__\":{},\"__metadata__\":{}}", 0, MOE_ERR_FORMAT,
         "'__metadata__' appears twice", NULL},
        {"{\"__metadata__\":{\"k\":\"1\",\"j\":\"2\",\"k\":\"3\"}}", 0, MOE_ERR_FORMAT,
         "duplicate key 'k'", NULL},
        /* not UTF-8: a stray continuation byte, an overlong '/', a surrogate, a 0xff */
        {"{\"a\x80\":" F32_2(0, 8) "}", 8, MOE_ERR_FORMAT, "not valid UTF-8", "0x80"},
        {"{\"a\xc0\xaf\":" F32_2(0, 8) "}", 8, MOE_ERR_FORMAT, "not valid UTF-8", "0xc0"},
        {"{\"a\xed\xa0\x80\":" F32_2(0, 8) "}", 8, MOE_ERR_FORMAT, "not valid UTF-8", NULL},
        {"{\"a\":" F32_2(0, 8) ",\"\xff\":1}", 8, MOE_ERR_FORMAT, "not valid UTF-8", NULL},
        {"{\"a\xe2\x82\":" F32_2(0, 8) "}", 8, MOE_ERR_FORMAT, "not valid UTF-8", NULL},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        print_message("case %zu: %s\n", k, cases[k].json);
        expect_json_fail(cases[k].json, cases[k].dlen, cases[k].st, cases[k].n1, cases[k].n2);
    }
}

/* Defects outside the JSON text: the length field, the file itself. */
static void test_malformed_file(void **state)
{
    (void)state;
    char path[512];
    size_t n;
    uint8_t *b;
    const char *ok = "{\"a\":" F32_2(0, 8) "}";
    uint8_t zeros[8] = {0};

    /* shorter than the 8-byte length */
    for (size_t len = 0; len < 8; len++) {
        fresh_path(path, sizeof path, "short");
        write_file(path, "\x02\0\0\0\0\0\0\0", len);
        expect_open_fail(path, MOE_ERR_FORMAT, "truncated", "shorter than the 8-byte");
    }
    /* header length past the end of the file */
    fresh_path(path, sizeof path, "hlen_past");
    b = build_bytes(1000, ok, strlen(ok), zeros, 8, &n);
    write_file(path, b, n);
    free(b);
    expect_open_fail(path, MOE_ERR_FORMAT, "header length 1000 runs past the end", NULL);
    /* absurd header lengths, including ones where 8 + N overflows */
    const uint64_t absurd[] = {100000001ull, 1ull << 40, 1ull << 63, UINT64_MAX,
                               UINT64_MAX - 7};
    for (size_t k = 0; k < sizeof absurd / sizeof absurd[0]; k++) {
        fresh_path(path, sizeof path, "hlen_absurd");
        b = build_bytes(absurd[k], ok, strlen(ok), zeros, 8, &n);
        write_file(path, b, n);
        free(b);
        expect_open_fail(path, MOE_ERR_FORMAT, "absurd header length", NULL);
    }
    /* header length one short / one long of the JSON: JSON is cut, or eats a data byte */
    fresh_path(path, sizeof path, "hlen_short");
    b = build_bytes(strlen(ok) - 1, ok, strlen(ok), zeros, 8, &n);
    write_file(path, b, n);
    free(b);
    expect_open_fail(path, MOE_ERR_FORMAT, "not valid JSON", NULL);
    fresh_path(path, sizeof path, "hlen_long");
    uint8_t ones[8];
    memset(ones, 'x', sizeof ones);
    b = build_bytes(strlen(ok) + 1, ok, strlen(ok), ones, 8, &n);
    write_file(path, b, n);
    free(b);
    expect_open_fail(path, MOE_ERR_FORMAT, "trailing", NULL);
    /* a NUL inside the header (C string functions would stop there) */
    fresh_path(path, sizeof path, "nul");
    char withnul[64];
    size_t wl = (size_t)snprintf(withnul, sizeof withnul, "{}    ");
    withnul[3] = '\0';
    b = build_bytes(wl, withnul, wl, NULL, 0, &n);
    write_file(path, b, n);
    free(b);
    expect_open_fail(path, MOE_ERR_FORMAT, "NUL byte at offset 3", NULL);
    /* JSON nested deeper than cJSON's limit fails as JSON, no stack overflow */
    fresh_path(path, sizeof path, "deep");
    size_t depth = 5000;
    char *deep = malloc(2 * depth + 16);
    size_t dl = 0;
    deep[dl++] = '{';
    memcpy(deep + dl, "\"a\":", 4);
    dl += 4;
    for (size_t i = 0; i < depth; i++) deep[dl++] = '[';
    for (size_t i = 0; i < depth; i++) deep[dl++] = ']';
    deep[dl++] = '}';
    deep[dl] = '\0';
    write_st(path, deep, NULL, 0);
    free(deep);
    expect_open_fail(path, MOE_ERR_FORMAT, "not valid JSON", NULL);

    /* I/O: a missing file, a directory */
    snprintf(path, sizeof path, "%s/does_not_exist.safetensors", g_dir);
    expect_open_fail(path, MOE_ERR_IO, "cannot open", strerror(ENOENT));
    expect_open_fail(g_dir, MOE_ERR_IO, "not a regular file", NULL);

    /* NULL arguments */
    moe_st_file f;
    moe_error err = {0};
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_open(NULL, &f, &err));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_open(path, NULL, &err));
    moe_st_close(NULL);
}

/* A small valid file whose tensors cover the whole data area: every proper prefix must fail
 * with FORMAT (truncated length, header past the end, or a tensor past the data area), never
 * read out of bounds; only the full length opens. */
static void test_truncated_prefixes(void **state)
{
    (void)state;
    const char *json =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"a\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[6,10]},"
        "\"c\":{\"dtype\":\"I32\",\"shape\":[2,1],\"data_offsets\":[10,18]}}";
    uint8_t data[18];
    for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)(i * 37 + 1);
    size_t n;
    uint8_t *full = build_bytes(strlen(json), json, strlen(json), data, sizeof data, &n);
    char path[512];
    fresh_path(path, sizeof path, "prefix");
    for (size_t len = 0; len <= n; len++) {
        write_file(path, full, len);
        moe_st_file f;
        moe_error err = {0};
        moe_status st = moe_st_open(path, &f, &err);
        if (len < n) {
            if (st != MOE_ERR_FORMAT) print_error("prefix %zu of %zu: status %d\n", len, n, st);
            assert_int_equal(MOE_ERR_FORMAT, st);
            assert_non_null(strstr(err.msg, path));
            assert_true(strstr(err.msg, "truncated") || strstr(err.msg, "past the data area"));
            assert_true(is_zeroed(&f));
        } else {
            assert_int_equal(MOE_OK, st);
            assert_int_equal(3, f.count);
            moe_tensor c;
            assert_int_equal(MOE_OK, moe_st_get(&f, "c", &c, &err));
            assert_memory_equal(data + 10, c.data, 8);
            moe_st_close(&f);
        }
    }
    free(full);
}

/* Random byte changes in the header: open either fails with a reason or succeeds with every
 * entry in bounds, sized by its shape and disjoint from the others, together covering the data
 * area exactly. Run under valgrind this
 * also shows no read outside the mapping. */
static void test_corrupted_headers(void **state)
{
    (void)state;
    uint64_t stream = moe_rng_stream(moe_test_seed(), "corrupt");
    const char *json =
        "{\"a\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[6,10]},"
        "\"c\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[10,18]}}";
    const char alphabet[] = "{}[]\",:0123456789-.eE abcF_\\\x80\xff";
    uint8_t data[18] = {0};
    size_t n;
    uint8_t *full = build_bytes(strlen(json), json, strlen(json), data, sizeof data, &n);
    uint8_t *mut = malloc(n);
    char path[512];
    fresh_path(path, sizeof path, "corrupt");
    int opened = 0;
    for (uint64_t it = 0; it < 400; it++) {
        memcpy(mut, full, n);
        int nchanges = 1 + (int)(moe_rng_u64(stream, 3 * it) % 3);
        for (int c = 0; c < nchanges; c++) {
            uint64_t r = moe_rng_u64(stream, 3 * it + 1 + (uint64_t)c * 1000003u);
            size_t pos = 8 + (size_t)(r % strlen(json));
            mut[pos] = (uint8_t)alphabet[(r >> 32) % (sizeof alphabet - 1)];
        }
        write_file(path, mut, n);
        moe_st_file f;
        moe_error err = {0};
        moe_status st = moe_st_open(path, &f, &err);
        if (st != MOE_OK) {
            assert_true(st == MOE_ERR_FORMAT || st == MOE_ERR_UNSUPPORTED);
            assert_non_null(strstr(err.msg, path));
            assert_true(is_zeroed(&f));
            continue;
        }
        opened++;
        size_t covered = 0;
        for (int i = 0; i < f.count; i++) {
            const moe_st_entry *e = &f.entries[i];
            assert_true(e->begin <= e->end && e->end <= f.data_len);
            moe_tensor v = moe_st_view(&f, e);
            assert_int_equal(e->end - e->begin, moe_tensor_numel(&v) * moe_dtype_size(v.dtype));
            for (int j = 0; j < i; j++) {
                const moe_st_entry *o = &f.entries[j];
                assert_true(strcmp(o->name, e->name) != 0);
                bool empty = e->begin == e->end || o->begin == o->end;
                assert_true(empty || e->end <= o->begin || o->end <= e->begin);
            }
            volatile uint8_t sink = 0;
            for (size_t b = 0; b < v.nbytes; b++) sink ^= ((const uint8_t *)v.data)[b];
            (void)sink;
            covered += v.nbytes;
        }
        assert_int_equal(f.data_len, covered);
        moe_st_close(&f);
    }
    print_message("corrupted headers: %d of 400 still valid\n", opened);
    free(mut);
    free(full);
}

/* ---- the data area must be covered exactly; names cannot hold a NUL ---- */

/* A header length one byte short of the header: the header's last byte (the writer's padding)
 * becomes the first byte of the data area, so every tensor would be read one byte off. Built
 * from files of the project's own writer, with names of every length mod 8 so the header's
 * padding takes every size from 0 to 7 (with no padding the cut header is not JSON; with any,
 * the JSON still parses and only the coverage rule can catch it). One byte long is refused
 * too (it eats a data byte), and the files as written open. */
static void test_header_length_off_by_one(void **state)
{
    (void)state;
    uint64_t stream = moe_rng_stream(moe_test_seed(), "off_by_one");
    int padded = 0;
    for (int len = 1; len <= 8; len++) {
        float a[3];
        uint16_t b[5];
        for (int i = 0; i < 3; i++) a[i] = (float)moe_rng_u64(stream, (uint64_t)(len * 16 + i));
        for (int i = 0; i < 5; i++) b[i] = (uint16_t)moe_rng_u64(stream, (uint64_t)(len * 16 + 8 + i));
        int64_t sa = 3, sb = 5;
        moe_tensor ta = moe_tensor_view_of(MOE_DTYPE_F32, 1, &sa, a);
        moe_tensor tb = moe_tensor_view_of(MOE_DTYPE_BF16, 1, &sb, b);
        char name[16];
        memset(name, 'n', (size_t)len);
        name[len] = '\0';
        moe_error err = {0};
        moe_st_writer w;
        moe_st_writer_init(&w);
        assert_int_equal(MOE_OK, moe_st_writer_add(&w, name, &ta, &err));
        assert_int_equal(MOE_OK, moe_st_writer_add(&w, "b", &tb, &err));
        char path[512];
        fresh_path(path, sizeof path, "written");
        assert_int_equal(MOE_OK, moe_st_write(&w, path, &err));
        moe_st_writer_free(&w);
        moe_st_file f;
        assert_int_equal(MOE_OK, moe_st_open(path, &f, &err));
        moe_st_close(&f);

        size_t n;
        uint8_t *bytes = read_file(path, &n);
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | bytes[i];
        bool pad = bytes[8 + hlen - 1] == ' ';
        padded += pad;

        put_le64(bytes, hlen - 1);
        fresh_path(path, sizeof path, "hlen_one_short");
        write_file(path, bytes, n);
        print_message("name length %d, header %llu bytes%s: one short\n", len,
                      (unsigned long long)hlen, pad ? " (padded)" : "");
        if (pad)
            expect_open_fail(path, MOE_ERR_FORMAT, "1 byte(s) after the last tensor ('b' ends at 22)",
                             "the data area has 23 bytes");
        else
            expect_open_fail(path, MOE_ERR_FORMAT, "not valid JSON", NULL);

        put_le64(bytes, hlen + 1);
        fresh_path(path, sizeof path, "hlen_one_long");
        write_file(path, bytes, n);
        expect_open_fail(path, MOE_ERR_FORMAT, NULL, NULL);
        free(bytes);
    }
    assert_true(padded >= 6); /* the interesting case was exercised */
}

/* The data area is covered exactly: no gap (at the start, between tensors, after the last),
 * no overlap (an empty tensor inside another's bytes included), nothing after a header of no
 * tensors. What may happen: any header order, empty tensors at a boundary, at the end, or
 * several at one offset. */
static void test_data_area_coverage(void **state)
{
    (void)state;
    const struct {
        const char *json;
        size_t dlen;
        const char *n1, *n2;
    } bad[] = {
        {"{\"a\":" F32_2(8, 16) "}", 16, "gap in the data area: bytes [0, 8) before tensor 'a'",
         "must begin at offset 0"},
        {"{\"a\":" F32_2(0, 8) ",\"b\":" F32_2(12, 20) "}", 20,
         "bytes [8, 12) between tensors 'a' (ends at 8) and 'b' (begins at 12)",
         "cover the data area exactly"},
        {"{\"b\":" F32_2(12, 20) ",\"c\":" F32_2(20, 28) ",\"a\":" F32_2(0, 8) "}", 28,
         "bytes [8, 12) between tensors 'a' (ends at 8) and 'b' (begins at 12)", NULL},
        {"{\"a\":" F32_2(0, 8) "}", 9, "1 byte(s) after the last tensor ('a' ends at 8)",
         "the data area has 9 bytes"},
        {"{\"a\":" F32_2(0, 8) ",\"b\":" F32_2(8, 16) "}", 24,
         "8 byte(s) after the last tensor ('b' ends at 16)", "the data area has 24 bytes"},
        {"{\"a\":" F32_2(0, 8) ",\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}",
         8, "tensors 'a' [0, 8) and 'z' [4, 4) overlap", NULL},
        {"{\"a\":" F32_2(0, 8) ",\"b\":" F32_2(0, 8) "}", 8,
         "tensors 'a' [0, 8) and 'b' [0, 8) overlap", NULL},
        {"{\"a\":" F32_2(0, 8) ",\"b\":" F32_2(4, 12) ",\"c\":" F32_2(12, 20) "}", 20,
         "tensors 'a' [0, 8) and 'b' [4, 12) overlap", NULL},
        {"{}", 1, "no tensors, but the data area has 1 bytes", NULL},
        {"{\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}", 4,
         "4 byte(s) after the last tensor ('z' ends at 0)", NULL},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        print_message("bad %zu: %s\n", k, bad[k].json);
        expect_json_fail(bad[k].json, bad[k].dlen, MOE_ERR_FORMAT, bad[k].n1, bad[k].n2);
    }
    const struct {
        const char *json;
        size_t dlen;
        int count;
    } good[] = {
        {"{\"c\":" F32_2(16, 24) ",\"a\":" F32_2(0, 8) ",\"b\":" F32_2(8, 16) "}", 24, 3},
        {"{\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},\"a\":" F32_2(0, 8)
         ",\"f\":{\"dtype\":\"BF16\",\"shape\":[2,0],\"data_offsets\":[8,8]},"
         "\"g\":{\"dtype\":\"I64\",\"shape\":[0],\"data_offsets\":[8,8]},\"b\":" F32_2(8, 16)
         ",\"h\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,16]}}", 16, 6},
        {"{\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0, 1},
    };
    for (size_t k = 0; k < sizeof good / sizeof good[0]; k++) {
        print_message("good %zu: %s\n", k, good[k].json);
        char path[512];
        fresh_path(path, sizeof path, "cover");
        uint8_t data[32] = {0};
        write_st(path, good[k].json, data, good[k].dlen);
        moe_st_file f;
        moe_error err = {0};
        moe_status st = moe_st_open(path, &f, &err);
        if (st) print_error("%s\n", err.msg);
        assert_int_equal(MOE_OK, st);
        assert_int_equal(good[k].count, f.count);
        moe_st_close(&f);
    }
}

/* JSON's \u0000 is a NUL; cJSON would cut the name there ("a\u0000b" read as "a"), so a NUL
 * escape in any header string is refused, naming the string. A backslash that is itself
 * escaped, followed by the text u0000, is no NUL: such names are read as written, and the
 * writer's files with them read back. */
static void test_nul_in_names(void **state)
{
    (void)state;
    const struct {
        const char *json;
        size_t dlen;
        const char *n1, *n2;
    } bad[] = {
        {"{\"a\\u0000b\":" F32_2(0, 8) "}", 8, "tensor 'a\\u0000b'", "\\u0000 (NUL)"},
        {"{\"\\u0000\":" F32_2(0, 8) "}", 8, "tensor '\\u0000'", "tensor name cannot hold"},
        {"{\"a\":" F32_2(0, 8) ",\"a\\u0000\":" F32_2(8, 16) "}", 16, "tensor 'a\\u0000'", NULL},
        /* an escaped backslash, then a real \u0000 */
        {"{\"a\\\\\\u0000\":" F32_2(0, 8) "}", 8, "tensor 'a\\\\\\u0000'", "NUL"},
        {"{\"__metadata__\\u0000\":{}}", 0, "tensor '__metadata__\\u0000'", "NUL"},
        {"{\"a\":{\"dtype\":\"F32\\u0000x\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
         "header string \"F32\\u0000x\"", "\\u0000 (NUL)"},
        {"{\"a\":{\"dtype\\u0000\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
         8, "header key \"dtype\\u0000\"", "NUL"},
        {"{\"__metadata__\":{\"format\":\"p\\u0000t\"}}", 0, "header string \"p\\u0000t\"", NULL},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        print_message("bad %zu: %s\n", k, bad[k].json);
        expect_json_fail(bad[k].json, bad[k].dlen, MOE_ERR_FORMAT, bad[k].n1, bad[k].n2);
    }

    /* the text \u0000 after an escaped backslash (one, or two of them) is plain text */
    const char *json = "{\"a\\\\u0000b\":" F32_2(0, 8) ",\"c\\\\\\\\u0000\":" F32_2(8, 16) "}";
    char path[512];
    fresh_path(path, sizeof path, "literal");
    uint8_t data[16] = {0};
    write_st(path, json, data, sizeof data);
    moe_st_file f;
    moe_error err = {0};
    moe_status st = moe_st_open(path, &f, &err);
    if (st) print_error("%s\n", err.msg);
    assert_int_equal(MOE_OK, st);
    assert_int_equal(2, f.count);
    assert_non_null(moe_st_find(&f, "a\\u0000b"));
    assert_non_null(moe_st_find(&f, "c\\\\u0000"));
    assert_null(moe_st_find(&f, "a"));
    moe_st_close(&f);

    /* the writer escapes the backslash; the reader gives the name back whole */
    float v[2] = {1.5f, -2.0f};
    int64_t two = 2;
    moe_tensor t = moe_tensor_view_of(MOE_DTYPE_F32, 1, &two, v);
    moe_st_writer w;
    moe_st_writer_init(&w);
    assert_int_equal(MOE_OK, moe_st_writer_add(&w, "x\\u0000y", &t, &err));
    assert_int_equal(MOE_OK, moe_st_writer_add(&w, "x", &t, &err));
    fresh_path(path, sizeof path, "literal_written");
    assert_int_equal(MOE_OK, moe_st_write(&w, path, &err));
    moe_st_writer_free(&w);
    st = moe_st_open(path, &f, &err);
    if (st) print_error("%s\n", err.msg);
    assert_int_equal(MOE_OK, st);
    assert_int_equal(2, f.count);
    assert_string_equal("x\\u0000y", f.entries[0].name);
    moe_tensor got;
    assert_int_equal(MOE_OK, moe_st_get(&f, "x\\u0000y", &got, &err));
    assert_memory_equal(v, got.data, sizeof v);
    moe_st_close(&f);
}

/* ---- writer ---- */

typedef struct {
    const char *name;
    moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
} spec;

static const char *st_name(moe_dtype d)
{
    switch (d) {
    case MOE_DTYPE_BF16: return "BF16";
    case MOE_DTYPE_F16: return "F16";
    case MOE_DTYPE_F32: return "F32";
    case MOE_DTYPE_F64: return "F64";
    case MOE_DTYPE_F8_E4M3: return "F8_E4M3";
    case MOE_DTYPE_I32: return "I32";
    case MOE_DTYPE_I64: return "I64";
    default: return "?";
    }
}

static void test_write_round_trip(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const spec specs[] = {
        {"model.layers.0.mlp.gate.weight", MOE_DTYPE_BF16, 2, {5, 7}},
        {"f16 \"quoted\" \\ name", MOE_DTYPE_F16, 1, {9}},
        {"f32.cube", MOE_DTYPE_F32, 3, {2, 3, 4}},
        {"f64.4d", MOE_DTYPE_F64, 4, {2, 1, 3, 2}},
        {"empty", MOE_DTYPE_F32, 2, {0, 4}},
        {"scalar", MOE_DTYPE_F32, 0, {0}},
        {"fp8", MOE_DTYPE_F8_E4M3, 1, {13}},
        {"ids.i32", MOE_DTYPE_I32, 2, {3, 1}},
        {"ids.i64", MOE_DTYPE_I64, 1, {5}},
        {"\xc3\xa9t\xc3\xa9", MOE_DTYPE_BF16, 1, {1}},
        {"a", MOE_DTYPE_F16, 0, {0}},
    };
    enum { NT = sizeof specs / sizeof specs[0] };
    moe_tensor ts[NT];
    moe_error err = {0};
    moe_st_writer w;
    moe_st_writer_init(&w);
    for (int k = 0; k < NT; k++) {
        assert_int_equal(MOE_OK, moe_tensor_alloc(&ts[k], specs[k].dtype, specs[k].ndim,
                                                  specs[k].shape, &err));
        uint64_t stream = moe_rng_stream(seed, specs[k].name);
        for (size_t b = 0; b < ts[k].nbytes; b++)
            ((uint8_t *)ts[k].data)[b] = (uint8_t)moe_rng_u64(stream, b);
        assert_int_equal(MOE_OK, moe_st_writer_add(&w, specs[k].name, &ts[k], &err));
    }
    assert_int_equal(NT, w.count);
    char path[512];
    fresh_path(path, sizeof path, "round");
    moe_status st = moe_st_write(&w, path, &err);
    if (st) print_error("%s\n", err.msg);
    assert_int_equal(MOE_OK, st);
    /* no temp file left */
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_not_equal(0, access(tmp, F_OK));

    /* The bytes, checked against the format without the reader. */
    size_t n;
    uint8_t *b = read_file(path, &n);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    assert_int_equal(0, (8 + hlen) % 8);
    assert_true(8 + hlen <= n);
    size_t jlen = hlen;
    while (jlen > 0 && b[8 + jlen - 1] == ' ') jlen--;
    assert_true(hlen - jlen < 8); /* padding is spaces, less than 8 of them */
    assert_int_equal('}', b[8 + jlen - 1]);
    cJSON *root = cJSON_ParseWithLength((const char *)b + 8, jlen);
    assert_non_null(root);
    cJSON *c = root->child;
    assert_string_equal("__metadata__", c->string);
    assert_string_equal("pt", cJSON_GetObjectItemCaseSensitive(c, "format")->valuestring);
    size_t expect_off = 0;
    for (int k = 0; k < NT; k++) {
        c = c->next;
        assert_non_null(c);
        assert_string_equal(specs[k].name, c->string); /* insertion order */
        assert_string_equal(st_name(specs[k].dtype),
                            cJSON_GetObjectItemCaseSensitive(c, "dtype")->valuestring);
        cJSON *sh = cJSON_GetObjectItemCaseSensitive(c, "shape");
        assert_int_equal(specs[k].ndim, cJSON_GetArraySize(sh));
        for (int d = 0; d < specs[k].ndim; d++)
            assert_true(cJSON_GetArrayItem(sh, d)->valuedouble == (double)specs[k].shape[d]);
        cJSON *off = cJSON_GetObjectItemCaseSensitive(c, "data_offsets");
        assert_int_equal(2, cJSON_GetArraySize(off));
        size_t nb = moe_dtype_size(specs[k].dtype);
        for (int d = 0; d < specs[k].ndim; d++) nb *= (size_t)specs[k].shape[d];
        assert_true(cJSON_GetArrayItem(off, 0)->valuedouble == (double)expect_off);
        assert_true(cJSON_GetArrayItem(off, 1)->valuedouble == (double)(expect_off + nb));
        assert_memory_equal(ts[k].data, b + 8 + hlen + expect_off, nb);
        expect_off += nb;
    }
    assert_null(c->next);
    assert_int_equal(8 + hlen + expect_off, n); /* contiguous, nothing after */
    cJSON_Delete(root);
    free(b);

    /* And through the reader. */
    moe_st_file f;
    st = moe_st_open(path, &f, &err);
    if (st) print_error("%s\n", err.msg);
    assert_int_equal(MOE_OK, st);
    assert_int_equal(NT, f.count);
    assert_string_equal("pt", moe_st_metadata(&f, "format"));
    for (int k = 0; k < NT; k++) {
        assert_string_equal(specs[k].name, f.entries[k].name);
        moe_tensor v;
        assert_int_equal(MOE_OK, moe_st_get(&f, specs[k].name, &v, &err));
        assert_int_equal(specs[k].dtype, v.dtype);
        assert_int_equal(specs[k].ndim, v.ndim);
        for (int d = 0; d < specs[k].ndim; d++) assert_int_equal(specs[k].shape[d], v.shape[d]);
        assert_int_equal(ts[k].nbytes, v.nbytes);
        if (v.nbytes) assert_memory_equal(ts[k].data, v.data, v.nbytes);
    }
    moe_st_close(&f);

    /* Overwriting an existing file replaces it whole. */
    moe_st_writer w2;
    moe_st_writer_init(&w2);
    assert_int_equal(MOE_OK, moe_st_writer_add(&w2, "only", &ts[2], &err));
    assert_int_equal(MOE_OK, moe_st_write(&w2, path, &err));
    assert_int_equal(MOE_OK, moe_st_open(path, &f, &err));
    assert_int_equal(1, f.count);
    assert_memory_equal(ts[2].data, f.data, ts[2].nbytes);
    assert_int_equal(ts[2].nbytes, f.data_len);
    moe_st_close(&f);
    moe_st_writer_free(&w2);

    /* An empty writer writes a valid file of no tensors. */
    moe_st_writer w3;
    moe_st_writer_init(&w3);
    fresh_path(path, sizeof path, "none");
    assert_int_equal(MOE_OK, moe_st_write(&w3, path, &err));
    assert_int_equal(MOE_OK, moe_st_open(path, &f, &err));
    assert_int_equal(0, f.count);
    assert_int_equal(0, f.data_len);
    moe_st_close(&f);
    moe_st_writer_free(&w3);

    moe_st_writer_free(&w);
    for (int k = 0; k < NT; k++) moe_tensor_free(&ts[k]);
}

/* Many tensors: the writer grows, the reader's name index finds every one. */
static void test_many_tensors(void **state)
{
    (void)state;
    enum { NT = 300 };
    uint64_t stream = moe_rng_stream(moe_test_seed(), "many");
    int32_t vals[NT];
    moe_tensor ts[NT];
    char names[NT][48];
    moe_error err = {0};
    moe_st_writer w;
    moe_st_writer_init(&w);
    for (int k = 0; k < NT; k++) {
        /* names in a scrambled order, so header order != sorted order */
        snprintf(names[k], sizeof names[k], "layers.%d.mlp.experts.%d.w",
                 (int)((k * 7919) % NT), k);
        vals[k] = (int32_t)moe_rng_u64(stream, (uint64_t)k);
        int64_t one = 1;
        ts[k] = moe_tensor_view_of(MOE_DTYPE_I32, 1, &one, &vals[k]);
        assert_int_equal(MOE_OK, moe_st_writer_add(&w, names[k], &ts[k], &err));
    }
    char path[512];
    fresh_path(path, sizeof path, "many");
    assert_int_equal(MOE_OK, moe_st_write(&w, path, &err));
    moe_st_writer_free(&w);
    moe_st_file f;
    assert_int_equal(MOE_OK, moe_st_open(path, &f, &err));
    assert_int_equal(NT, f.count);
    for (int k = 0; k < NT; k++) {
        moe_tensor v;
        assert_int_equal(MOE_OK, moe_st_get(&f, names[k], &v, &err));
        int32_t got;
        memcpy(&got, v.data, 4);
        assert_int_equal(vals[k], got);
    }
    moe_st_close(&f);
}

/* Files written by Python's safetensors (the HF fixtures): the reader agrees with an
 * independent cJSON parse of the header, the reference writer's full coverage of the data
 * area holds, and a rewrite by our writer reads back byte-identical. */
static void check_foreign_file(const char *path)
{
    moe_error err = {0};
    moe_st_file f;
    moe_status st = moe_st_open(path, &f, &err);
    if (st) print_error("%s\n", err.msg);
    assert_int_equal(MOE_OK, st);

    size_t n;
    uint8_t *b = read_file(path, &n);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    cJSON *root = cJSON_ParseWithLength((const char *)b + 8, (size_t)hlen);
    assert_non_null(root);
    int k = 0;
    size_t covered = 0;
    for (cJSON *c = root->child; c; c = c->next) {
        if (strcmp(c->string, "__metadata__") == 0) {
            for (cJSON *m = c->child; m; m = m->next)
                assert_string_equal(m->valuestring, moe_st_metadata(&f, m->string));
            continue;
        }
        const moe_st_entry *e = &f.entries[k++];
        assert_string_equal(c->string, e->name);
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(c, "dtype")->valuestring,
                            st_name(e->dtype));
        cJSON *off = cJSON_GetObjectItemCaseSensitive(c, "data_offsets");
        assert_true(cJSON_GetArrayItem(off, 0)->valuedouble == (double)e->begin);
        assert_true(cJSON_GetArrayItem(off, 1)->valuedouble == (double)e->end);
        cJSON *sh = cJSON_GetObjectItemCaseSensitive(c, "shape");
        assert_int_equal(cJSON_GetArraySize(sh), e->ndim);
        for (int d = 0; d < e->ndim; d++)
            assert_true(cJSON_GetArrayItem(sh, d)->valuedouble == (double)e->shape[d]);
        covered += (size_t)(e->end - e->begin);
    }
    assert_int_equal(k, f.count);
    assert_int_equal(covered, f.data_len);
    assert_int_equal(8 + hlen + f.data_len, n);
    cJSON_Delete(root);

    char out[512];
    fresh_path(out, sizeof out, "rewrite");
    moe_st_writer w;
    moe_st_writer_init(&w);
    for (int i = 0; i < f.count; i++) {
        moe_tensor v = moe_st_view(&f, &f.entries[i]);
        assert_int_equal(MOE_OK, moe_st_writer_add(&w, f.entries[i].name, &v, &err));
    }
    assert_int_equal(MOE_OK, moe_st_write(&w, out, &err));
    moe_st_writer_free(&w);
    moe_st_file g;
    assert_int_equal(MOE_OK, moe_st_open(out, &g, &err));
    assert_int_equal(f.count, g.count);
    for (int i = 0; i < f.count; i++) {
        moe_tensor a = moe_st_view(&f, &f.entries[i]), c;
        assert_int_equal(MOE_OK, moe_st_get(&g, f.entries[i].name, &c, &err));
        assert_int_equal(a.dtype, c.dtype);
        assert_int_equal(a.ndim, c.ndim);
        assert_int_equal(a.nbytes, c.nbytes);
        if (a.nbytes) assert_memory_equal(a.data, c.data, a.nbytes);
    }
    moe_st_close(&g);
    moe_st_close(&f);
    free(b);
}

static void test_read_python_written(void **state)
{
    (void)state;
    char root[512];
    snprintf(root, sizeof root, "%s/hf", MOE_FIXTURE_DIR);
    DIR *d = opendir(root);
    if (!d) {
        print_message("no fixtures at %s\n", root);
        skip();
    }
    int files = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char sub[1024];
        snprintf(sub, sizeof sub, "%s/%s", root, de->d_name);
        DIR *d2 = opendir(sub);
        if (!d2) continue;
        struct dirent *fe;
        while ((fe = readdir(d2))) {
            size_t l = strlen(fe->d_name);
            if (l < 12 || strcmp(fe->d_name + l - 12, ".safetensors") != 0) continue;
            char p[1600];
            snprintf(p, sizeof p, "%s/%s", sub, fe->d_name);
            print_message("python-written: %s\n", p);
            check_foreign_file(p);
            files++;
        }
        closedir(d2);
    }
    closedir(d);
    if (files == 0) skip();
}

static void test_writer_errors(void **state)
{
    (void)state;
    moe_error err = {0};
    float buf[6] = {1, 2, 3, 4, 5, 6};
    int64_t shape[2] = {2, 3};
    moe_tensor t = moe_tensor_view_of(MOE_DTYPE_F32, 2, shape, buf);
    moe_st_writer w;
    moe_st_writer_init(&w);
    assert_int_equal(MOE_OK, moe_st_writer_add(&w, "x", &t, &err));
    assert_int_equal(MOE_OK, moe_st_writer_add(&w, "y", &t, &err));

    /* duplicate name */
    moe_error_clear(&err);
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, "x", &t, &err));
    assert_non_null(strstr(err.msg, "duplicate tensor name 'x'"));
    assert_int_equal(2, w.count);
    /* reserved name */
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, "__metadata__", &t, &err));
    assert_non_null(strstr(err.msg, "reserved"));
    /* unsupported dtype */
    moe_tensor bad = t;
    bad.dtype = (moe_dtype)42;
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, "bad", &bad, &err));
    assert_non_null(strstr(err.msg, "'bad'"));
    assert_non_null(strstr(err.msg, "unsupported dtype"));
    bad.dtype = MOE_NUM_DTYPES;
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, "bad", &bad, &err));
    /* byte count that does not match the shape */
    bad = t;
    bad.nbytes = 20;
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, "bad", &bad, &err));
    assert_non_null(strstr(err.msg, "needs 24 bytes"));
    /* negative dimension, too many dims, no data */
    bad = t;
    bad.shape[1] = -3;
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, "bad", &bad, &err));
    bad = t;
    bad.ndim = 5;
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, "bad", &bad, &err));
    bad = t;
    bad.data = NULL;
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, "bad", &bad, &err));
    assert_int_equal(MOE_ERR_INVALID_ARG, moe_st_writer_add(&w, NULL, &t, &err));
    assert_int_equal(2, w.count);

    /* a directory that does not exist: IO error naming the path and errno's text; nothing
     * created */
    char path[600];
    snprintf(path, sizeof path, "%s/no_such_dir/out.safetensors", g_dir);
    assert_int_equal(MOE_ERR_IO, moe_st_write(&w, path, &err));
    assert_non_null(strstr(err.msg, path));
    assert_non_null(strstr(err.msg, strerror(ENOENT)));
    assert_int_not_equal(0, access(path, F_OK));

    /* the rename fails (the target is a directory): IO error, the directory is untouched and
     * no temp file remains */
    snprintf(path, sizeof path, "%s/a_directory", g_dir);
    assert_int_equal(0, mkdir(path, 0755));
    char inner[700];
    snprintf(inner, sizeof inner, "%s/keep", path);
    write_file(inner, "k", 1);
    assert_int_equal(MOE_ERR_IO, moe_st_write(&w, path, &err));
    assert_non_null(strstr(err.msg, "rename"));
    assert_non_null(strstr(err.msg, path));
    char tmp[700];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_not_equal(0, access(tmp, F_OK));
    struct stat sb;
    assert_int_equal(0, stat(path, &sb));
    assert_true(S_ISDIR(sb.st_mode));
    assert_int_equal(0, access(inner, F_OK));

    /* the writer still works after the failures */
    fresh_path(path, sizeof path, "after_errors");
    assert_int_equal(MOE_OK, moe_st_write(&w, path, &err));
    moe_st_file f;
    assert_int_equal(MOE_OK, moe_st_open(path, &f, &err));
    assert_int_equal(2, f.count);
    moe_st_close(&f);
    moe_st_writer_free(&w);
    moe_st_writer_free(&w); /* twice is harmless */
}

int main(void)
{
    moe_test_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_hand_built),   cmocka_unit_test(test_read_empty),
        cmocka_unit_test(test_malformed_json),    cmocka_unit_test(test_malformed_file),
        cmocka_unit_test(test_truncated_prefixes), cmocka_unit_test(test_corrupted_headers),
        cmocka_unit_test(test_header_length_off_by_one), cmocka_unit_test(test_data_area_coverage),
        cmocka_unit_test(test_nul_in_names),
        cmocka_unit_test(test_write_round_trip),  cmocka_unit_test(test_many_tensors),
        cmocka_unit_test(test_writer_errors),     cmocka_unit_test(test_read_python_written),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
