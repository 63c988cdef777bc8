/*
 * safetensors.c — validated mmap reader and atomic writer of safetensors files (see
 * safetensors.h for the format and the contract).
 *
 * Reader: the file is mapped read-only; the header is copied into a NUL-terminated buffer and
 * parsed with cJSON (so the parser can never run past the header into the data area or past
 * the end of the mapping); every entry is checked before anything points into the data area,
 * and together the entries must cover the data area exactly.
 * Writer: the header is built with cJSON (it escapes names); integers go in as raw text so a
 * byte offset of any size prints exactly (cJSON prints numbers through a double and "%d").
 */
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader maps it as host memory"
#endif

/* The reference implementation's limit; a larger value is a corrupt length, not a header. */
#define ST_MAX_HEADER 100000000ull
/* JSON numbers reach us as doubles: beyond 2^53 an integer may not be exact. */
#define ST_MAX_JSON_INT 9007199254740992.0 /* 2^53 */
#define ST_METADATA_KEY "__metadata__"

/* ---- dtype names ---- */

static const struct {
    const char *name;
    moe_dtype dtype;
} st_dtypes[] = {
    {"BF16", MOE_DTYPE_BF16}, {"F16", MOE_DTYPE_F16},         {"F32", MOE_DTYPE_F32},
    {"F64", MOE_DTYPE_F64},   {"F8_E4M3", MOE_DTYPE_F8_E4M3}, {"I32", MOE_DTYPE_I32},
    {"I64", MOE_DTYPE_I64},
};
#define ST_NUM_DTYPES ((int)(sizeof st_dtypes / sizeof st_dtypes[0]))

/* Valid in safetensors but not computed with here: refused as UNSUPPORTED (not FORMAT) so the
 * message does not call a correct file corrupt. */
static const char *const st_foreign_dtypes[] = {
    "BOOL", "U8", "I8", "I16", "U16", "U32", "U64", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3",
    "F6_E3M2", "C64",
};

static const char *st_dtype_name(moe_dtype d)
{
    for (int i = 0; i < ST_NUM_DTYPES; i++)
        if (st_dtypes[i].dtype == d) return st_dtypes[i].name;
    return NULL;
}

/* ---- small helpers ---- */

static const char *errno_str(int e, char *buf, size_t len)
{
#if defined(__GLIBC__) && defined(_GNU_SOURCE)
    return strerror_r(e, buf, len); /* GNU variant: returns the message */
#else
    if (strerror_r(e, buf, len) != 0) snprintf(buf, len, "errno %d", e);
    return buf;
#endif
}

/* "PATH: tensor 'NAME': reason" (tensor may be NULL: "PATH: reason"). */
static moe_status st_fail(moe_error *err, moe_status st, const char *path, const char *tensor,
                          const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static moe_status st_fail(moe_error *err, moe_status st, const char *path, const char *tensor,
                          const char *fmt, ...)
{
    char reason[MOE_ERROR_MSG_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    if (tensor) return moe_fail(err, st, "%s: tensor '%s': %s", path, tensor, reason);
    return moe_fail(err, st, "%s: %s", path, reason);
}

static char *st_strdup(const char *s, const char *what, moe_error *err)
{
    size_t n = strlen(s) + 1;
    char *p = moe_malloc(n, what, err);
    if (p) memcpy(p, s, n);
    return p;
}

/* A JSON number that is an exact non-negative integer no larger than 2^53. */
static bool json_uint(const cJSON *item, uint64_t *out)
{
    if (!cJSON_IsNumber(item)) return false;
    double v = item->valuedouble;
    if (!isfinite(v) || v < 0.0 || v > ST_MAX_JSON_INT || floor(v) != v) return false;
    *out = (uint64_t)v;
    return true;
}

static bool mul_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    if (a != 0 && b > UINT64_MAX / a) return false;
    *out = a * b;
    return true;
}

/* Offset of the first byte that is not well-formed UTF-8 (overlong forms, surrogates and code
 * points past U+10FFFF included), or len when all of it is. */
static size_t utf8_bad_offset(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t n;
        unsigned lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
        if (c >= 0xc2 && c <= 0xdf) n = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            if (c == 0xe0) lo = 0xa0;      /* overlong */
            else if (c == 0xed) hi = 0x9f; /* surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            if (c == 0xf0) lo = 0x90;      /* overlong */
            else if (c == 0xf4) hi = 0x8f; /* > U+10FFFF */
        } else return i;
        if (len - i <= n) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= n; k++)
            if ((s[i + k] & 0xc0) != 0x80) return i;
        i += n + 1;
    }
    return len;
}

static void shape_text(int ndim, const int64_t *shape, char *buf, size_t len)
{
    moe_shape_str(ndim, shape, buf, len);
}

/* ---- reader ---- */

static void st_free_contents(moe_st_file *f)
{
    if (f->map && f->map != MAP_FAILED) munmap(f->map, f->map_len);
    if (f->entries)
        for (int i = 0; i < f->count; i++) free(f->entries[i].name);
    free(f->entries);
    free(f->by_name);
    if (f->meta_keys)
        for (int i = 0; i < f->meta_count; i++) free(f->meta_keys[i]);
    if (f->meta_values)
        for (int i = 0; i < f->meta_count; i++) free(f->meta_values[i]);
    free(f->meta_keys);
    free(f->meta_values);
    free(f->path);
    memset(f, 0, sizeof *f);
}

void moe_st_close(moe_st_file *f)
{
    if (f) st_free_contents(f);
}

/* One tensor entry: {"dtype": str, "shape": [uint...], "data_offsets": [begin, end]}.
 * Keys other than these three are ignored (as the reference reader does); a repeated key is an
 * error, since cJSON would silently take the first. */
static moe_status parse_entry(const char *path, const cJSON *item, size_t data_len,
                              moe_st_entry *e, moe_error *err)
{
    const char *name = item->string;
    if (!cJSON_IsObject(item))
        return st_fail(err, MOE_ERR_FORMAT, path, name,
                       "entry is not an object (expected {dtype, shape, data_offsets})");
    const cJSON *jdt = NULL, *jshape = NULL, *joff = NULL;
    for (const cJSON *c = item->child; c; c = c->next) {
        const cJSON **slot = NULL;
        if (strcmp(c->string, "dtype") == 0) slot = &jdt;
        else if (strcmp(c->string, "shape") == 0) slot = &jshape;
        else if (strcmp(c->string, "data_offsets") == 0) slot = &joff;
        if (!slot) continue;
        if (*slot)
            return st_fail(err, MOE_ERR_FORMAT, path, name, "field '%s' appears twice", c->string);
        *slot = c;
    }
    if (!jdt) return st_fail(err, MOE_ERR_FORMAT, path, name, "missing field 'dtype'");
    if (!jshape) return st_fail(err, MOE_ERR_FORMAT, path, name, "missing field 'shape'");
    if (!joff) return st_fail(err, MOE_ERR_FORMAT, path, name, "missing field 'data_offsets'");

    /* dtype */
    if (!cJSON_IsString(jdt))
        return st_fail(err, MOE_ERR_FORMAT, path, name, "field 'dtype' is not a string");
    int di = -1;
    for (int i = 0; i < ST_NUM_DTYPES; i++)
        if (strcmp(jdt->valuestring, st_dtypes[i].name) == 0) di = i;
    if (di < 0) {
        for (size_t i = 0; i < sizeof st_foreign_dtypes / sizeof st_foreign_dtypes[0]; i++)
            if (strcmp(jdt->valuestring, st_foreign_dtypes[i]) == 0)
                return st_fail(err, MOE_ERR_UNSUPPORTED, path, name,
                               "dtype '%s' is not supported (BF16, F16, F32, F64, F8_E4M3, I32, "
                               "I64 are)", jdt->valuestring);
        return st_fail(err, MOE_ERR_FORMAT, path, name,
                       "unknown dtype '%s' (expected BF16, F16, F32, F64, F8_E4M3, I32 or I64)",
                       jdt->valuestring);
    }
    e->dtype = st_dtypes[di].dtype;

    /* shape: 0..MOE_MAX_DIMS non-negative integers; an empty array is a scalar */
    if (!cJSON_IsArray(jshape))
        return st_fail(err, MOE_ERR_FORMAT, path, name, "field 'shape' is not an array");
    int nd = 0;
    uint64_t numel = 1;
    for (const cJSON *c = jshape->child; c; c = c->next, nd++) {
        if (nd >= MOE_MAX_DIMS)
            return st_fail(err, MOE_ERR_FORMAT, path, name,
                           "shape has more than %d dimensions", MOE_MAX_DIMS);
        uint64_t d;
        if (!json_uint(c, &d))
            return st_fail(err, MOE_ERR_FORMAT, path, name,
                           "shape[%d] is not a non-negative integer (at most 2^53)", nd);
        e->shape[nd] = (int64_t)d;
        if (!mul_u64(numel, d, &numel))
            return st_fail(err, MOE_ERR_FORMAT, path, name, "shape element count overflows");
    }
    e->ndim = nd;
    uint64_t nbytes;
    if (!mul_u64(numel, moe_dtype_size(e->dtype), &nbytes))
        return st_fail(err, MOE_ERR_FORMAT, path, name, "shape byte count overflows");

    /* data_offsets: [begin, end), begin <= end <= data area */
    if (!cJSON_IsArray(joff))
        return st_fail(err, MOE_ERR_FORMAT, path, name, "field 'data_offsets' is not an array");
    int noff = 0;
    for (const cJSON *c = joff->child; c; c = c->next) noff++;
    if (noff != 2)
        return st_fail(err, MOE_ERR_FORMAT, path, name,
                       "field 'data_offsets' must hold exactly two integers [begin, end] (has "
                       "%d elements)", noff);
    uint64_t off[2];
    const cJSON *c = joff->child;
    for (int i = 0; i < 2; i++, c = c->next)
        if (!json_uint(c, &off[i]))
            return st_fail(err, MOE_ERR_FORMAT, path, name,
                           "data_offsets[%d] is not a non-negative integer (at most 2^53)", i);
    if (off[0] > off[1])
        return st_fail(err, MOE_ERR_FORMAT, path, name,
                       "data_offsets [%" PRIu64 ", %" PRIu64 "]: begin is after end", off[0],
                       off[1]);
    if (off[1] > (uint64_t)data_len)
        return st_fail(err, MOE_ERR_FORMAT, path, name,
                       "data_offsets end %" PRIu64 " is past the data area (%zu bytes)", off[1],
                       data_len);
    if (nbytes != off[1] - off[0]) {
        char sh[160];
        shape_text(nd, e->shape, sh, sizeof sh);
        return st_fail(err, MOE_ERR_FORMAT, path, name,
                       "shape %s of %s needs %" PRIu64 " bytes but data_offsets [%" PRIu64
                       ", %" PRIu64 "] span %" PRIu64,
                       sh, st_dtypes[di].name, nbytes, off[0], off[1], off[1] - off[0]);
    }
    e->begin = off[0];
    e->end = off[1];
    return MOE_OK;
}

static moe_status parse_metadata(const char *path, const cJSON *item, moe_st_file *f,
                                 moe_error *err)
{
    if (!cJSON_IsObject(item))
        return st_fail(err, MOE_ERR_FORMAT, path, NULL,
                       "'" ST_METADATA_KEY "' is not an object of strings");
    int n = 0;
    for (const cJSON *c = item->child; c; c = c->next) {
        if (!cJSON_IsString(c))
            return st_fail(err, MOE_ERR_FORMAT, path, NULL,
                           "'" ST_METADATA_KEY "' value of key '%s' is not a string", c->string);
        n++;
    }
    f->meta_keys = moe_calloc((size_t)n, sizeof(char *), "safetensors metadata", err);
    f->meta_values = moe_calloc((size_t)n, sizeof(char *), "safetensors metadata", err);
    if (!f->meta_keys || !f->meta_values) return MOE_ERR_NOMEM;
    for (const cJSON *c = item->child; c; c = c->next) {
        char *k = st_strdup(c->string, "safetensors metadata", err);
        char *v = k ? st_strdup(c->valuestring, "safetensors metadata", err) : NULL;
        if (!v) {
            free(k);
            return MOE_ERR_NOMEM;
        }
        f->meta_keys[f->meta_count] = k;
        f->meta_values[f->meta_count] = v;
        f->meta_count++;
    }
    return MOE_OK;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int cmp_entry_name(const void *a, const void *b)
{
    const moe_st_entry *x = *(const moe_st_entry *const *)a, *y = *(const moe_st_entry *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_entry_range(const void *a, const void *b)
{
    const moe_st_entry *x = *(const moe_st_entry *const *)a, *y = *(const moe_st_entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* After every entry parsed: names unique, and the byte ranges tile the data area exactly, as
 * the reference reader requires: sorted by (begin, end), each range begins where the previous
 * one ended (the first at 0) and the last ends at the end of the data area. So no byte of the
 * data area belongs to two tensors or to none; an empty tensor sits at a boundary. (A header
 * length that is off by a few bytes shifts the data area against the offsets; this is what
 * catches it when the header's JSON still parses.) Fills f->by_name. */
static moe_status check_entries(const char *path, moe_st_file *f, moe_error *err)
{
    moe_status st = MOE_OK;
    size_t n = (size_t)f->count;
    const moe_st_entry **p = moe_calloc(n, sizeof *p, "safetensors index", err);
    f->by_name = moe_calloc(n, sizeof(int), "safetensors index", err);
    if (!p || !f->by_name) {
        free(p);
        return MOE_ERR_NOMEM;
    }
    for (size_t i = 0; i < n; i++) p[i] = &f->entries[i];
    qsort(p, n, sizeof *p, cmp_entry_name);
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && strcmp(p[i - 1]->name, p[i]->name) == 0) {
            st = st_fail(err, MOE_ERR_FORMAT, path, NULL, "duplicate tensor name '%s'",
                         p[i]->name);
            goto done;
        }
        f->by_name[i] = (int)(p[i] - f->entries);
    }
    qsort(p, n, sizeof *p, cmp_entry_range);
    uint64_t pos = 0; /* where the next range must begin: the end of the previous one */
    const moe_st_entry *prev = NULL;
    for (size_t i = 0; i < n; i++) {
        if (p[i]->begin < pos) { /* pos > 0, so prev is set */
            st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                         "tensors '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64 ", %" PRIu64
                         ") overlap in the data area",
                         prev->name, prev->begin, prev->end, p[i]->name, p[i]->begin, p[i]->end);
            goto done;
        }
        if (p[i]->begin > pos) {
            if (prev)
                st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                             "gap in the data area: bytes [%" PRIu64 ", %" PRIu64
                             ") between tensors '%s' (ends at %" PRIu64 ") and '%s' (begins at "
                             "%" PRIu64 ") belong to no tensor (the tensors must cover the data "
                             "area exactly)",
                             pos, p[i]->begin, prev->name, pos, p[i]->name, p[i]->begin);
            else
                st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                             "gap in the data area: bytes [0, %" PRIu64 ") before tensor '%s' "
                             "belong to no tensor (the first tensor must begin at offset 0)",
                             p[i]->begin, p[i]->name);
            goto done;
        }
        pos = p[i]->end;
        prev = p[i];
    }
    if (pos != (uint64_t)f->data_len) { /* pos < data_len: every end was checked in bounds */
        if (prev)
            st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                         "%" PRIu64 " byte(s) after the last tensor ('%s' ends at %" PRIu64
                         ") belong to no tensor: the data area has %zu bytes (trailing bytes, or "
                         "a wrong header length)",
                         (uint64_t)f->data_len - pos, prev->name, pos, f->data_len);
        else
            st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                         "no tensors, but the data area has %zu bytes (trailing bytes, or a "
                         "wrong header length)", f->data_len);
        goto done;
    }
    /* Metadata keys are unique too (cJSON keeps both copies of a repeated key). */
    if (f->meta_count > 1) {
        const char **mk = moe_calloc((size_t)f->meta_count, sizeof *mk, "safetensors index", err);
        if (!mk) {
            st = MOE_ERR_NOMEM;
            goto done;
        }
        for (int i = 0; i < f->meta_count; i++) mk[i] = f->meta_keys[i];
        qsort(mk, (size_t)f->meta_count, sizeof *mk, cmp_str);
        for (int i = 1; i < f->meta_count; i++) {
            if (strcmp(mk[i - 1], mk[i]) == 0) {
                st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                             "duplicate key '%s' in '" ST_METADATA_KEY "'", mk[i]);
                break;
            }
        }
        free(mk);
    }
done:
    free(p);
    return st;
}

/* cJSON decodes the escape \u0000 into a NUL byte and keeps strings as C strings, so a name
 * "a\u0000b" would silently become "a" (and a dtype "F32\u0000x" would read as F32). Scan the
 * raw text of the (already parsed, so well-formed) header for a \u0000 escape inside any
 * string and refuse it, naming the string. An escaped backslash followed by "u0000" ("\\u0000")
 * is a backslash and five characters, not a NUL: escapes are consumed whole, left to right. */
static moe_status check_nul_escapes(const char *path, const char *hdr, size_t hlen,
                                    moe_error *err)
{
    int depth = 0; /* nesting of objects and arrays; the root object's keys are at depth 1 */
    for (size_t i = 0; i < hlen; i++) {
        char c = hdr[i];
        if (c == '{' || c == '[') depth++;
        else if (c == '}' || c == ']') depth--;
        if (c != '"') continue;
        size_t start = ++i; /* first character of the string's raw text */
        bool nul = false;
        while (i < hlen && hdr[i] != '"') {
            if (hdr[i] == '\\' && i + 1 < hlen) {
                /* the escaped character is skipped whole; a \uXXXX's hex digits are plain
                 * characters and need no special step */
                if (hdr[i + 1] == 'u' && i + 5 < hlen && memcmp(hdr + i + 2, "0000", 4) == 0)
                    nul = true;
                i++;
            }
            i++;
        }
        if (!nul) continue;
        size_t len = i - start, k = i + 1;
        while (k < hlen && (hdr[k] == ' ' || hdr[k] == '\t' || hdr[k] == '\n' || hdr[k] == '\r'))
            k++;
        bool key = k < hlen && hdr[k] == ':';
        char raw[160]; /* the string as written (escapes shown), shortened if long */
        if (len < sizeof raw) snprintf(raw, sizeof raw, "%.*s", (int)len, hdr + start);
        else snprintf(raw, sizeof raw, "%.*s...", (int)(sizeof raw - 4), hdr + start);
        if (key && depth == 1)
            return st_fail(err, MOE_ERR_FORMAT, path, raw,
                           "the name contains \\u0000 (NUL), which a tensor name cannot hold");
        return st_fail(err, MOE_ERR_FORMAT, path, NULL,
                       "the header %s \"%s\" (header byte %zu) contains \\u0000 (NUL), which "
                       "moe-ep cannot hold", key ? "key" : "string", raw, start);
    }
    return MOE_OK;
}

static moe_status parse_header(const char *path, const char *hdr, size_t hlen, moe_st_file *f,
                               moe_error *err)
{
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(hdr, hlen, &end, 0);
    if (!root) {
        size_t at = end && end >= hdr && end <= hdr + hlen ? (size_t)(end - hdr) : 0;
        return st_fail(err, MOE_ERR_FORMAT, path, NULL,
                       "header is not valid JSON (error near header byte %zu of %zu)", at, hlen);
    }
    moe_status st = MOE_OK;
    /* The reference writer pads the header with spaces; anything else after the JSON value is
     * a corrupt header. */
    for (const char *q = end; q < hdr + hlen; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r') {
            st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                         "header has trailing bytes after the JSON object (header byte %zu)",
                         (size_t)(q - hdr));
            goto out;
        }
    }
    if (!cJSON_IsObject(root)) {
        st = st_fail(err, MOE_ERR_FORMAT, path, NULL, "header is not a JSON object");
        goto out;
    }
    MOE_TRY_GOTO(check_nul_escapes(path, hdr, hlen, err), st, out);
    int ntensors = 0;
    for (const cJSON *c = root->child; c; c = c->next)
        if (strcmp(c->string, ST_METADATA_KEY) != 0) ntensors++;
    f->entries = moe_calloc((size_t)ntensors, sizeof *f->entries, "safetensors entries", err);
    if (!f->entries) {
        st = MOE_ERR_NOMEM;
        goto out;
    }
    bool have_meta = false;
    for (const cJSON *c = root->child; c; c = c->next) {
        if (strcmp(c->string, ST_METADATA_KEY) == 0) {
            if (have_meta) {
                st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                             "'" ST_METADATA_KEY "' appears twice");
                goto out;
            }
            have_meta = true;
            MOE_TRY_GOTO(parse_metadata(path, c, f, err), st, out);
            continue;
        }
        moe_st_entry *e = &f->entries[f->count];
        MOE_TRY_GOTO(parse_entry(path, c, f->data_len, e, err), st, out);
        e->name = st_strdup(c->string, "safetensors tensor name", err);
        if (!e->name) {
            st = MOE_ERR_NOMEM;
            goto out;
        }
        f->count++;
    }
    st = check_entries(path, f, err);
out:
    cJSON_Delete(root);
    return st;
}

moe_status moe_st_open(const char *path, moe_st_file *out, moe_error *err)
{
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_st_open: file handle is NULL");
    memset(out, 0, sizeof *out);
    if (!path) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_st_open: path is NULL");

    moe_st_file f;
    memset(&f, 0, sizeof f);
    moe_status st = MOE_OK;
    char *hdr = NULL;
    char ebuf[128];

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return st_fail(err, MOE_ERR_IO, path, NULL, "cannot open: %s",
                               errno_str(errno, ebuf, sizeof ebuf));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = st_fail(err, MOE_ERR_IO, path, NULL, "cannot stat: %s",
                     errno_str(errno, ebuf, sizeof ebuf));
        close(fd);
        return st;
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return st_fail(err, MOE_ERR_IO, path, NULL, "not a regular file");
    }
    if (sb.st_size < 8) {
        close(fd);
        return st_fail(err, MOE_ERR_FORMAT, path, NULL,
                       "truncated: %lld bytes, shorter than the 8-byte header length",
                       (long long)sb.st_size);
    }
    if ((uint64_t)sb.st_size > SIZE_MAX) {
        close(fd);
        return st_fail(err, MOE_ERR_IO, path, NULL, "too large to map");
    }
    f.map_len = (size_t)sb.st_size;
    /* MAP_PRIVATE + PROT_READ: nothing we do can change the file. (Another process truncating
     * it while mapped would still fault on access; that is outside what a reader can check.) */
    f.map = mmap(NULL, f.map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (f.map == MAP_FAILED) {
        f.map = NULL;
        return st_fail(err, MOE_ERR_IO, path, NULL, "cannot mmap %zu bytes: %s", f.map_len,
                       errno_str(map_errno, ebuf, sizeof ebuf));
    }
    f.path = st_strdup(path, "safetensors path", err);
    if (!f.path) {
        st = MOE_ERR_NOMEM;
        goto fail;
    }

    const uint8_t *bytes = f.map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | bytes[i];
    size_t after = f.map_len - 8;
    if (hlen > ST_MAX_HEADER) {
        st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                     "absurd header length %" PRIu64 " (limit %llu bytes; file has %zu after "
                     "the length)", hlen, ST_MAX_HEADER, after);
        goto fail;
    }
    if (hlen > after) {
        st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                     "truncated: header length %" PRIu64 " runs past the end of the file (%zu "
                     "bytes after the 8-byte length)", hlen, after);
        goto fail;
    }
    f.data = bytes + 8 + hlen;
    f.data_len = after - (size_t)hlen;

    /* A NUL-terminated private copy: cJSON then cannot read past the header whatever it does. */
    hdr = moe_malloc((size_t)hlen + 1, "safetensors header", err);
    if (!hdr) {
        st = MOE_ERR_NOMEM;
        goto fail;
    }
    memcpy(hdr, bytes + 8, (size_t)hlen);
    hdr[hlen] = '\0';
    const char *nul = memchr(hdr, '\0', (size_t)hlen);
    if (nul) {
        st = st_fail(err, MOE_ERR_FORMAT, path, NULL, "header contains a NUL byte at offset %zu",
                     (size_t)(nul - hdr));
        goto fail;
    }
    size_t bad = utf8_bad_offset((const unsigned char *)hdr, (size_t)hlen);
    if (bad != hlen) {
        st = st_fail(err, MOE_ERR_FORMAT, path, NULL,
                     "header is not valid UTF-8 (bad byte 0x%02x at header offset %zu)",
                     (unsigned char)hdr[bad], bad);
        goto fail;
    }
    MOE_TRY_GOTO(parse_header(path, hdr, (size_t)hlen, &f, err), st, fail);
    free(hdr);
    *out = f;
    return MOE_OK;

fail:
    free(hdr);
    st_free_contents(&f);
    return st;
}

const moe_st_entry *moe_st_find(const moe_st_file *f, const char *name)
{
    if (!f || !name || !f->by_name) return NULL;
    int lo = 0, hi = f->count - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const moe_st_entry *e = &f->entries[f->by_name[mid]];
        int c = strcmp(name, e->name);
        if (c == 0) return e;
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return NULL;
}

moe_tensor moe_st_view(const moe_st_file *f, const moe_st_entry *e)
{
    /* The cast drops const: moe_tensor has one data pointer for both uses; the pages are
     * read-only, so a write through this view faults instead of corrupting the file. */
    moe_tensor t = moe_tensor_view_of(e->dtype, e->ndim, e->shape, (void *)(f->data + e->begin));
    t.nbytes = (size_t)(e->end - e->begin);
    return t;
}

moe_status moe_st_get(const moe_st_file *f, const char *name, moe_tensor *view, moe_error *err)
{
    if (!f || !name || !view)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_st_get: NULL %s",
                        !f ? "file" : !name ? "name" : "view");
    const moe_st_entry *e = moe_st_find(f, name);
    if (!e)
        return moe_fail(err, MOE_ERR_FORMAT, "tensor '%s' not found in %s", name,
                        f->path ? f->path : "(closed file)");
    *view = moe_st_view(f, e);
    return MOE_OK;
}

const char *moe_st_metadata(const moe_st_file *f, const char *key)
{
    if (!f || !key) return NULL;
    for (int i = 0; i < f->meta_count; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_values[i];
    return NULL;
}

/* ---- writer ---- */

void moe_st_writer_init(moe_st_writer *w) { memset(w, 0, sizeof *w); }

void moe_st_writer_free(moe_st_writer *w)
{
    if (!w) return;
    for (int i = 0; i < w->count; i++) free(w->names[i]);
    free(w->names);
    free(w->tensors);
    memset(w, 0, sizeof *w);
}

moe_status moe_st_writer_add(moe_st_writer *w, const char *name, const moe_tensor *t,
                             moe_error *err)
{
    if (!w || !name || !t)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_st_writer_add: NULL %s",
                        !w ? "writer" : !name ? "name" : "tensor");
    if (strcmp(name, ST_METADATA_KEY) == 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "safetensors writer: tensor name '%s' is reserved", name);
    const char *dt = st_dtype_name(t->dtype);
    if (!dt)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "safetensors writer: tensor '%s' has unsupported dtype %d", name,
                        (int)t->dtype);
    if (t->ndim < 0 || t->ndim > MOE_MAX_DIMS)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "safetensors writer: tensor '%s' has %d dims (0..%d allowed)", name,
                        t->ndim, MOE_MAX_DIMS);
    uint64_t nbytes = moe_dtype_size(t->dtype);
    for (int i = 0; i < t->ndim; i++) {
        /* the reader refuses dims past 2^53 (JSON integers), so the writer does too */
        if (t->shape[i] < 0 || (double)t->shape[i] > ST_MAX_JSON_INT ||
            !mul_u64(nbytes, (uint64_t)t->shape[i], &nbytes))
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "safetensors writer: tensor '%s' has bad dimension %d = %lld", name, i,
                            (long long)t->shape[i]);
    }
    if (nbytes != (uint64_t)t->nbytes)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "safetensors writer: tensor '%s': shape needs %" PRIu64
                        " bytes but nbytes is %zu", name, nbytes, t->nbytes);
    if (nbytes > 0 && !t->data)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "safetensors writer: tensor '%s' has no data", name);
    /* Linear scan: writers hold hundreds of tensors, not millions. */
    for (int i = 0; i < w->count; i++)
        if (strcmp(w->names[i], name) == 0)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "safetensors writer: duplicate tensor name '%s'", name);
    if (w->count == w->cap) {
        int cap = w->cap ? 2 * w->cap : 16;
        char **names = realloc(w->names, (size_t)cap * sizeof *names);
        if (!names) return moe_fail(err, MOE_ERR_NOMEM, "safetensors writer: out of memory");
        w->names = names;
        moe_tensor *ts = realloc(w->tensors, (size_t)cap * sizeof *ts);
        if (!ts) return moe_fail(err, MOE_ERR_NOMEM, "safetensors writer: out of memory");
        w->tensors = ts;
        w->cap = cap;
    }
    char *copy = st_strdup(name, "safetensors tensor name", err);
    if (!copy) return MOE_ERR_NOMEM;
    w->names[w->count] = copy;
    w->tensors[w->count] = *t;
    w->tensors[w->count].owns = false; /* borrowed */
    w->count++;
    return MOE_OK;
}

static bool add_raw_u64(cJSON *array, uint64_t v)
{
    char buf[24];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    cJSON *n = cJSON_CreateRaw(buf);
    return n && cJSON_AddItemToArray(array, n);
}

/* The header text (unpadded), or NULL on allocation failure. */
static char *build_header(const moe_st_writer *w)
{
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    char *text = NULL;
    cJSON *meta = cJSON_AddObjectToObject(root, ST_METADATA_KEY);
    if (!meta || !cJSON_AddStringToObject(meta, "format", "pt")) goto out;
    uint64_t off = 0;
    for (int i = 0; i < w->count; i++) {
        const moe_tensor *t = &w->tensors[i];
        cJSON *e = cJSON_AddObjectToObject(root, w->names[i]);
        if (!e || !cJSON_AddStringToObject(e, "dtype", st_dtype_name(t->dtype))) goto out;
        cJSON *shape = cJSON_AddArrayToObject(e, "shape");
        if (!shape) goto out;
        for (int d = 0; d < t->ndim; d++)
            if (!add_raw_u64(shape, (uint64_t)t->shape[d])) goto out;
        cJSON *offs = cJSON_AddArrayToObject(e, "data_offsets");
        if (!offs || !add_raw_u64(offs, off) || !add_raw_u64(offs, off + t->nbytes)) goto out;
        off += t->nbytes;
    }
    text = cJSON_PrintUnformatted(root);
out:
    cJSON_Delete(root);
    return text;
}

static bool write_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        if (k == 0) {
            errno = EIO;
            return false;
        }
        p += k;
        n -= (size_t)k;
    }
    return true;
}

moe_status moe_st_write(const moe_st_writer *w, const char *path, moe_error *err)
{
    if (!w || !path)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_st_write: NULL %s", !w ? "writer" : "path");
    /* every byte offset must stay within the reader's 2^53 integer limit */
    uint64_t total = 0;
    for (int i = 0; i < w->count; i++) {
        total += w->tensors[i].nbytes;
        if ((double)total > ST_MAX_JSON_INT)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: tensors total more than 2^53 bytes",
                            path);
    }
    char *text = build_header(w);
    if (!text)
        return moe_fail(err, MOE_ERR_NOMEM, "%s: cannot build the safetensors header", path);
    size_t tlen = strlen(text);
    size_t hlen = (tlen + 7) / 8 * 8; /* 8 + hlen is a multiple of 8: the data area is aligned */
    char *hdr = moe_malloc(8 + hlen, "safetensors header", err);
    size_t plen = strlen(path);
    char *tmp = moe_malloc(plen + 5, "safetensors temp path", err);
    if (!hdr || !tmp) {
        free(text);
        free(hdr);
        free(tmp);
        return MOE_ERR_NOMEM;
    }
    for (int i = 0; i < 8; i++) hdr[i] = (char)(((uint64_t)hlen >> (8 * i)) & 0xffu);
    memcpy(hdr + 8, text, tlen);
    memset(hdr + 8 + tlen, ' ', hlen - tlen);
    free(text);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);

    moe_status st = MOE_OK;
    char ebuf[128];
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        st = moe_fail(err, MOE_ERR_IO, "cannot create %s (for %s): %s", tmp, path,
                      errno_str(errno, ebuf, sizeof ebuf));
        goto out;
    }
    bool ok = write_all(fd, hdr, 8 + hlen);
    for (int i = 0; ok && i < w->count; i++)
        if (w->tensors[i].nbytes) ok = write_all(fd, w->tensors[i].data, w->tensors[i].nbytes);
    if (ok) ok = fsync(fd) == 0; /* data on disk before the rename makes it visible */
    if (!ok) {
        st = moe_fail(err, MOE_ERR_IO, "cannot write %s (for %s): %s", tmp, path,
                      errno_str(errno, ebuf, sizeof ebuf));
        close(fd);
        unlink(tmp);
        goto out;
    }
    if (close(fd) != 0) {
        st = moe_fail(err, MOE_ERR_IO, "cannot write %s (for %s): %s", tmp, path,
                      errno_str(errno, ebuf, sizeof ebuf));
        unlink(tmp);
        goto out;
    }
    if (rename(tmp, path) != 0) {
        st = moe_fail(err, MOE_ERR_IO, "cannot rename %s to %s: %s", tmp, path,
                      errno_str(errno, ebuf, sizeof ebuf));
        unlink(tmp);
        goto out;
    }
out:
    free(hdr);
    free(tmp);
    return st;
}
