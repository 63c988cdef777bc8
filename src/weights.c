/*
 * weights.c — one MoE block's weights in the canonical layout (see weights.h): loading from
 * safetensors checkpoints in every HF naming, counter-based random weights, zero accumulators,
 * and writing gradients back under the names and layouts that were loaded.
 *
 * Loading reads through the mmap of the safetensors reader and touches only the bytes of the
 * local experts: a fused [E,...] tensor is read from the slice [expert_begin, +expert_count),
 * per-expert tensors are opened only for local experts, and in a sharded checkpoint only the
 * shards that hold a needed tensor are opened. `bytes_read` counts the routed-expert bytes read
 * (router and shared expert are read whole on every rank and are not counted), so an
 * expert-parallel run can assert that a rank read exactly its slice.
 */
#include "weights.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "dtype.h"
#include "rng.h"
#include "safetensors.h"

#define NAME_LEN 512

static bool is_compute_dtype(moe_dtype d)
{
    return d == MOE_DTYPE_BF16 || d == MOE_DTYPE_F16 || d == MOE_DTYPE_F32 || d == MOE_DTYPE_F64;
}

/* ---------------------------------------------------------------------------------------
 * Element conversion. Source bytes come from an mmapped file whose tensors need not be aligned
 * to their element size, so they are read with memcpy. Every stored float converts exactly to
 * double, and moe_store_elem rounds once to the target dtype.
 * --------------------------------------------------------------------------------------- */
static inline double load_unaligned(moe_dtype dt, const uint8_t *base, size_t i)
{
    switch (dt) {
    case MOE_DTYPE_BF16: {
        uint16_t v;
        memcpy(&v, base + 2 * i, 2);
        return moe_bf16_to_f32(v);
    }
    case MOE_DTYPE_F16: {
        uint16_t v;
        memcpy(&v, base + 2 * i, 2);
        return moe_f16_to_f32(v);
    }
    case MOE_DTYPE_F32: {
        float v;
        memcpy(&v, base + 4 * i, 4);
        return v;
    }
    case MOE_DTYPE_F64: {
        double v;
        memcpy(&v, base + 8 * i, 8);
        return v;
    }
    default: return NAN;
    }
}

/* dst[0..n) (dtype ddt) = src[0..n) (dtype sdt), converted. Parallel over blocks. */
static void convert_contig(moe_dtype sdt, const uint8_t *src, moe_dtype ddt, void *dst, size_t n)
{
    const int64_t blk = 1 << 16;
    const int64_t nblk = ((int64_t)n + blk - 1) / blk;
    if (sdt == ddt) {
        size_t es = moe_dtype_size(sdt);
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < nblk; b++) {
            size_t lo = (size_t)(b * blk), hi = MOE_MIN(n, lo + (size_t)blk);
            memcpy((uint8_t *)dst + lo * es, src + lo * es, (hi - lo) * es);
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblk; b++) {
        size_t lo = (size_t)(b * blk), hi = MOE_MIN(n, lo + (size_t)blk);
        for (size_t i = lo; i < hi; i++) moe_store_elem(ddt, dst, i, load_unaligned(sdt, src, i));
    }
}

/* Transpose with conversion: src is [rows, cols] row-major (dtype sdt), dst is [cols, rows]
 * row-major (dtype ddt): dst[c*rows + r] = src[r*cols + c]. Tiled so both sides stay in cache;
 * parallel over tiles (each dst element is written by exactly one thread). */
#define TILE 32

/* Same-dtype transpose: a pure bit copy of `es`-byte elements (Scout's 1.3G-element bf16
 * gate_up_proj per layer is the common case; no conversion per element). */
#define TRANSPOSE_BITS(T)                                                                       \
    do {                                                                                        \
        T *d = dst;                                                                             \
        _Pragma("omp parallel for schedule(static)")                                            \
        for (int64_t t = 0; t < tr * tc; t++) {                                                 \
            int64_t r0 = (t / tc) * TILE, c0 = (t % tc) * TILE;                                 \
            int64_t r1 = MOE_MIN(rows, r0 + TILE), c1 = MOE_MIN(cols, c0 + TILE);               \
            for (int64_t c = c0; c < c1; c++)                                                   \
                for (int64_t r = r0; r < r1; r++)                                               \
                    memcpy(&d[c * rows + r], src + (size_t)(r * cols + c) * sizeof(T), sizeof(T)); \
        }                                                                                       \
    } while (0)

static void transpose_convert(moe_dtype sdt, const uint8_t *src, int64_t rows, int64_t cols,
                              moe_dtype ddt, void *dst)
{
    const int64_t tr = (rows + TILE - 1) / TILE, tc = (cols + TILE - 1) / TILE;
    if (sdt == ddt) {
        switch (moe_dtype_size(sdt)) {
        case 2: TRANSPOSE_BITS(uint16_t); return;
        case 4: TRANSPOSE_BITS(uint32_t); return;
        case 8: TRANSPOSE_BITS(uint64_t); return;
        default: break;
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tr * tc; t++) {
        int64_t r0 = (t / tc) * TILE, c0 = (t % tc) * TILE;
        int64_t r1 = MOE_MIN(rows, r0 + TILE), c1 = MOE_MIN(cols, c0 + TILE);
        for (int64_t c = c0; c < c1; c++)
            for (int64_t r = r0; r < r1; r++)
                moe_store_elem(ddt, dst, (size_t)(c * rows + r),
                               load_unaligned(sdt, src, (size_t)(r * cols + c)));
    }
}

/* Same for tensors in our own (aligned) memory: used when writing Llama-4 gradients back. */
static void transpose_tensor_2d(const moe_tensor *src_base, size_t src_off_elems, int64_t rows,
                                int64_t cols, void *dst)
{
    size_t es = moe_dtype_size(src_base->dtype);
    transpose_convert(src_base->dtype, (const uint8_t *)src_base->data + src_off_elems * es, rows,
                      cols, src_base->dtype, dst);
}

/* ---------------------------------------------------------------------------------------
 * Tensor sources: one .safetensors file, or a model.safetensors.index.json whose weight_map
 * sends each name to a shard file (relative to the index's directory). Shards are opened on
 * first use.
 * --------------------------------------------------------------------------------------- */
typedef struct shard {
    char *file; /* as spelled in weight_map */
    moe_st_file st;
} shard;

typedef struct wsrc {
    const char *path;
    bool indexed;
    cJSON *index;
    const cJSON *map;
    char *dir; /* the index's directory, with a trailing '/' ("" for the cwd) */
    moe_st_file single;
    bool single_open;
    shard *shards;
    int nshards, cap;
    char *resolved; /* the file a directory path stands for */
} wsrc;

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Index files list every tensor of a model (tens of thousands of names); cap the size. */
#define MAX_INDEX_FILE (256u << 20)

static moe_status read_text_file(const char *path, char **out, moe_error *err)
{
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) return moe_fail(err, MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    moe_status st = MOE_OK;
    char *buf = NULL;
    long len = -1;
    if (fseek(fp, 0, SEEK_END) == 0) len = ftell(fp);
    if (len < 0) {
        st = moe_fail(err, MOE_ERR_IO, "%s: cannot determine size: %s", path, strerror(errno));
        goto done;
    }
    if ((unsigned long)len > MAX_INDEX_FILE) {
        st = moe_fail(err, MOE_ERR_FORMAT, "%s: %ld bytes is too large for an index file", path,
                      len);
        goto done;
    }
    rewind(fp);
    buf = moe_malloc((size_t)len + 1, "index file text", err);
    if (!buf) { st = MOE_ERR_NOMEM; goto done; }
    if (fread(buf, 1, (size_t)len, fp) != (size_t)len) {
        st = moe_fail(err, MOE_ERR_IO, "%s: short read", path);
        goto done;
    }
    buf[len] = '\0';
    *out = buf;
    buf = NULL;
done:
    free(buf);
    fclose(fp);
    return st;
}

/* A checkpoint directory names its weights file: the index when there is one, else the single
 * model.safetensors. *out is malloc'ed. */
static moe_status resolve_dir(const char *path, char **out, moe_error *err)
{
    *out = NULL;
    struct stat sb;
    if (stat(path, &sb) != 0 || !S_ISDIR(sb.st_mode)) return MOE_OK;
    static const char *const names[2] = {"model.safetensors.index.json", "model.safetensors"};
    for (int i = 0; i < 2; i++) {
        size_t n = strlen(path) + strlen(names[i]) + 2;
        char *full = moe_malloc(n, "checkpoint path", err);
        if (!full) return MOE_ERR_NOMEM;
        snprintf(full, n, "%s/%s", path, names[i]);
        if (stat(full, &sb) == 0 && S_ISREG(sb.st_mode)) {
            *out = full;
            return MOE_OK;
        }
        free(full);
    }
    return moe_fail(err, MOE_ERR_IO,
                    "%s: a directory without model.safetensors.index.json or model.safetensors",
                    path);
}

static moe_status src_open(wsrc *s, const char *path, moe_error *err)
{
    memset(s, 0, sizeof *s);
    MOE_TRY(resolve_dir(path, &s->resolved, err));
    if (s->resolved) path = s->resolved;
    s->path = path;
    if (!ends_with(path, ".json")) {
        MOE_TRY(moe_st_open(path, &s->single, err));
        s->single_open = true;
        return MOE_OK;
    }
    s->indexed = true;
    char *text = NULL;
    MOE_TRY(read_text_file(path, &text, err));
    s->index = cJSON_Parse(text);
    free(text);
    if (!s->index) return moe_fail(err, MOE_ERR_FORMAT, "%s: not valid JSON", path);
    s->map = cJSON_GetObjectItemCaseSensitive(s->index, "weight_map");
    if (!cJSON_IsObject(s->map))
        return moe_fail(err, MOE_ERR_FORMAT, "%s: no \"weight_map\" object", path);
    const char *slash = strrchr(path, '/');
    size_t dlen = slash ? (size_t)(slash - path) + 1 : 0;
    s->dir = moe_malloc(dlen + 1, "index directory", err);
    if (!s->dir) return MOE_ERR_NOMEM;
    memcpy(s->dir, path, dlen);
    s->dir[dlen] = '\0';
    return MOE_OK;
}

static void src_close(wsrc *s)
{
    if (s->single_open) moe_st_close(&s->single);
    for (int i = 0; i < s->nshards; i++) {
        moe_st_close(&s->shards[i].st);
        free(s->shards[i].file);
    }
    free(s->shards);
    free(s->dir);
    free(s->resolved);
    cJSON_Delete(s->index);
    memset(s, 0, sizeof *s);
}

static bool src_has(const wsrc *s, const char *name)
{
    if (s->indexed) return cJSON_GetObjectItemCaseSensitive(s->map, name) != NULL;
    return moe_st_find(&s->single, name) != NULL;
}

static void shape_str(int ndim, const int64_t *shape, char *buf, size_t len)
{
    moe_shape_str(ndim, shape, buf, len);
}

/* Find tensor `name`, check it is a float tensor of the expected shape; *file and *entry point
 * into s (valid until src_close). */
static moe_status src_get(wsrc *s, const char *name, int ndim, const int64_t *shape,
                          const moe_st_file **file, const moe_st_entry **entry, moe_error *err)
{
    char want[96], got[96];
    shape_str(ndim, shape, want, sizeof want);
    const moe_st_file *f = NULL;
    if (!s->indexed) {
        f = &s->single;
    } else {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(s->map, name);
        if (!v)
            return moe_fail(err, MOE_ERR_FORMAT,
                            "%s: missing tensor '%s' (expected shape %s): not in weight_map",
                            s->path, name, want);
        if (!cJSON_IsString(v) || !v->valuestring[0])
            return moe_fail(err, MOE_ERR_FORMAT,
                            "%s: weight_map entry of '%s' is not a file name", s->path, name);
        const char *fname = v->valuestring;
        for (int i = 0; i < s->nshards && !f; i++)
            if (strcmp(s->shards[i].file, fname) == 0) f = &s->shards[i].st;
        if (!f) {
            if (s->nshards == s->cap) {
                int cap = s->cap ? 2 * s->cap : 4;
                shard *ns = realloc(s->shards, (size_t)cap * sizeof *ns);
                if (!ns) return moe_fail(err, MOE_ERR_NOMEM, "shard table of %d", cap);
                s->shards = ns;
                s->cap = cap;
            }
            size_t plen = strlen(s->dir) + strlen(fname) + 1;
            char *full = moe_malloc(plen, "shard path", err);
            if (!full) return MOE_ERR_NOMEM;
            snprintf(full, plen, "%s%s", s->dir, fname);
            shard *sh = &s->shards[s->nshards];
            memset(sh, 0, sizeof *sh);
            moe_status st = moe_st_open(full, &sh->st, err);
            free(full);
            if (st != MOE_OK)
                return moe_error_prefix(err, "%s: shard of tensor '%s'", s->path, name);
            sh->file = strdup(fname);
            if (!sh->file) {
                moe_st_close(&sh->st);
                return moe_fail(err, MOE_ERR_NOMEM, "shard name");
            }
            s->nshards++;
            f = &sh->st;
        }
    }
    const moe_st_entry *e = moe_st_find(f, name);
    if (!e)
        return moe_fail(err, MOE_ERR_FORMAT, "%s: missing tensor '%s' (expected shape %s)",
                        f->path ? f->path : s->path, name, want);
    bool same = e->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = e->shape[i] == shape[i];
    if (!same) {
        shape_str(e->ndim, e->shape, got, sizeof got);
        return moe_fail(err, MOE_ERR_FORMAT, "%s: tensor '%s' has shape %s, expected %s",
                        f->path ? f->path : s->path, name, got, want);
    }
    if (!is_compute_dtype(e->dtype)) {
        const char *dn = moe_dtype_name(e->dtype);
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "%s: tensor '%s' is stored as %s; only bf16/fp16/fp32/fp64 can be loaded",
                        f->path ? f->path : s->path, name, dn ? dn : "an unknown dtype");
    }
    /* Defensive: the reader validates offsets, but the slice arithmetic below relies on the
     * byte length matching the shape. */
    uint64_t numel = 1;
    for (int i = 0; i < ndim; i++) numel *= (uint64_t)shape[i];
    if (e->end < e->begin || e->end - e->begin != numel * moe_dtype_size(e->dtype) ||
        e->end > f->data_len)
        return moe_fail(err, MOE_ERR_FORMAT, "%s: tensor '%s' byte range does not match shape %s",
                        f->path ? f->path : s->path, name, want);
    *file = f;
    *entry = e;
    return MOE_OK;
}

static const uint8_t *entry_bytes(const moe_st_file *f, const moe_st_entry *e)
{
    return f->data + e->begin;
}

/* ---------------------------------------------------------------------------------------
 * Allocation of the canonical tensors.
 * --------------------------------------------------------------------------------------- */
/* ids: n distinct global expert ids, ascending (NULL: the contiguous range [b, b+n)). */
static moe_status check_ids(const moe_config *cfg, int b, int n, const int32_t *ids,
                            moe_error *err)
{
    if (!ids) {
        if (b < 0 || n < 0 || b > cfg->num_experts - n)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "expert range [%d, %d+%d) is not inside [0, E=%d)", b, b, n,
                            cfg->num_experts);
        return MOE_OK;
    }
    for (int l = 0; l < n; l++)
        if (ids[l] < 0 || ids[l] >= cfg->num_experts || (l > 0 && ids[l] <= ids[l - 1]))
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "expert ids: entry %d is %d: expected ascending distinct ids in "
                            "[0, E=%d)", l, ids[l], cfg->num_experts);
    return MOE_OK;
}

int moe_weights_expert_id(const moe_weights *w, int l)
{
    return w->expert_ids ? w->expert_ids[l] : w->expert_begin + l;
}

static moe_status alloc_canonical(const moe_config *cfg, int b, int n, const int32_t *ids,
                                  moe_dtype dt, moe_weights *w, moe_error *err)
{
    memset(w, 0, sizeof *w);
    w->cfg = *cfg;
    w->dtype = dt;
    w->expert_begin = ids ? (n > 0 ? ids[0] : 0) : b;
    w->expert_count = n;
    /* a list that is one contiguous range is stored as the range */
    bool contiguous = true;
    for (int l = 1; ids && l < n; l++) contiguous &= ids[l] == ids[0] + l;
    if (ids && !contiguous) {
        w->expert_ids = moe_malloc((size_t)n * sizeof(int32_t), "expert ids", err);
        if (!w->expert_ids) return MOE_ERR_NOMEM;
        memcpy(w->expert_ids, ids, (size_t)n * sizeof(int32_t));
        w->expert_begin = -1;
    }
    const int64_t H = cfg->hidden, I = cfg->inter, E = cfg->num_experts, Is = cfg->shared_inter;
    moe_status st;
    MOE_TRY_GOTO(moe_tensor_alloc2(&w->router, dt, E, H, err), st, fail);
    MOE_TRY_GOTO(moe_tensor_alloc3(&w->w13, dt, n, 2 * I, H, err), st, fail);
    MOE_TRY_GOTO(moe_tensor_alloc3(&w->w2, dt, n, H, I, err), st, fail);
    if (Is > 0) {
        MOE_TRY_GOTO(moe_tensor_alloc2(&w->shared_gate, dt, Is, H, err), st, fail);
        MOE_TRY_GOTO(moe_tensor_alloc2(&w->shared_up, dt, Is, H, err), st, fail);
        MOE_TRY_GOTO(moe_tensor_alloc2(&w->shared_down, dt, H, Is, err), st, fail);
    }
    return MOE_OK;
fail:
    moe_weights_free(w);
    return st;
}

void moe_weights_free(moe_weights *w)
{
    if (!w) return;
    moe_tensor_free(&w->router);
    moe_tensor_free(&w->w13);
    moe_tensor_free(&w->w2);
    moe_tensor_free(&w->shared_gate);
    moe_tensor_free(&w->shared_up);
    moe_tensor_free(&w->shared_down);
    free(w->expert_ids);
    memset(w, 0, sizeof *w);
}

static moe_status check_common_args(const moe_config *cfg, int b, int n, const int32_t *ids,
                                    moe_dtype *dt, moe_weights *w, moe_error *err)
{
    if (!cfg || !w) return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: NULL argument");
    memset(w, 0, sizeof *w); /* on any failure the caller holds nothing to free */
    MOE_TRY(moe_config_validate(cfg, err));
    MOE_TRY(check_ids(cfg, b, n, ids, err));
    /* MOE_NUM_DTYPES: the config's (checkpoint's) own dtype. */
    if (*dt == MOE_NUM_DTYPES) *dt = cfg->dtype;
    if (!is_compute_dtype(*dt))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights dtype %s: expected bf16/fp16/fp32/fp64",
                        moe_dtype_name(*dt) ? moe_dtype_name(*dt) : "(invalid)");
    return MOE_OK;
}

/* ---------------------------------------------------------------------------------------
 * Random weights.
 * --------------------------------------------------------------------------------------- */

/* t[i] = round_dtype(normal(stream(seed, name), offset + i) * scale) for every local element. */
static void fill_random(moe_tensor *t, uint64_t seed, const char *name, uint64_t offset,
                        double scale)
{
    const uint64_t stream = moe_rng_stream(seed, name);
    const int64_t n = (int64_t)moe_tensor_numel(t);
    void *d = t->data;
    switch (t->dtype) {
    case MOE_DTYPE_BF16: {
        moe_bf16 *p = d;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++)
            p[i] = moe_f64_to_bf16(moe_rng_normal(stream, offset + (uint64_t)i) * scale);
        break;
    }
    case MOE_DTYPE_F16: {
        moe_f16 *p = d;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++)
            p[i] = moe_f64_to_f16(moe_rng_normal(stream, offset + (uint64_t)i) * scale);
        break;
    }
    case MOE_DTYPE_F32: {
        float *p = d;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++)
            p[i] = (float)(moe_rng_normal(stream, offset + (uint64_t)i) * scale);
        break;
    }
    default: {
        double *p = d;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) p[i] = moe_rng_normal(stream, offset + (uint64_t)i) * scale;
        break;
    }
    }
}

static moe_status random_impl(const moe_config *cfg, uint64_t seed, int expert_begin,
                              int expert_count, const int32_t *ids, moe_dtype dtype,
                              moe_weights *w, moe_error *err)
{
    MOE_TRY(check_common_args(cfg, expert_begin, expert_count, ids, &dtype, w, err));
    MOE_TRY(alloc_canonical(cfg, expert_begin, expert_count, ids, dtype, w, err));
    const uint64_t H = (uint64_t)cfg->hidden, I = (uint64_t)cfg->inter;
    const double sH = 1.0 / sqrt((double)H), sI = 1.0 / sqrt((double)I);
    fill_random(&w->router, seed, "router", 0, sH);
    /* Local expert l is global expert e: its block starts at e * per-expert size (one
     * expert at a time: the local ids need not be contiguous). */
    const size_t es = moe_dtype_size(dtype);
    for (int l = 0; l < expert_count; l++) {
        const uint64_t e = (uint64_t)moe_weights_expert_id(w, l);
        int64_t s13[2] = {2 * (int64_t)I, (int64_t)H}, s2[2] = {(int64_t)H, (int64_t)I};
        moe_tensor v13 = moe_tensor_view_of(dtype, 2, s13, (char *)w->w13.data + (size_t)l * 2 * I * H * es);
        moe_tensor v2 = moe_tensor_view_of(dtype, 2, s2, (char *)w->w2.data + (size_t)l * H * I * es);
        fill_random(&v13, seed, "w13", e * 2 * I * H, sH);
        fill_random(&v2, seed, "w2", e * H * I, sI);
    }
    if (cfg->shared_inter > 0) {
        fill_random(&w->shared_gate, seed, "shared_gate", 0, sH);
        fill_random(&w->shared_up, seed, "shared_up", 0, sH);
        fill_random(&w->shared_down, seed, "shared_down", 0,
                    1.0 / sqrt((double)cfg->shared_inter));
    }
    w->naming = MOE_NAMING_RANDOM;
    w->prefix[0] = '\0';
    w->bytes_read = 0;
    return MOE_OK;
}

moe_status moe_weights_random(const moe_config *cfg, uint64_t seed, int expert_begin,
                              int expert_count, moe_dtype dtype, moe_weights *w, moe_error *err)
{
    return random_impl(cfg, seed, expert_begin, expert_count, NULL, dtype, w, err);
}

moe_status moe_weights_random_ids(const moe_config *cfg, uint64_t seed, const int32_t *ids,
                                  int n, moe_dtype dtype, moe_weights *w, moe_error *err)
{
    return random_impl(cfg, seed, 0, n, ids, dtype, w, err);
}

moe_status moe_weights_zeros_ids(const moe_config *cfg, const int32_t *ids, int n, moe_dtype dtype,
                                 moe_weights *w, moe_error *err)
{
    MOE_TRY(check_common_args(cfg, 0, n, ids, &dtype, w, err));
    MOE_TRY(alloc_canonical(cfg, 0, n, ids, dtype, w, err));
    moe_tensor *ts[] = {&w->router, &w->w13, &w->w2, &w->shared_gate, &w->shared_up,
                        &w->shared_down};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
        if (ts[i]->data) memset(ts[i]->data, 0, ts[i]->nbytes);
    w->naming = MOE_NAMING_RANDOM;
    return MOE_OK;
}

moe_status moe_weights_zeros_like(const moe_weights *like, moe_dtype dtype, moe_weights *w,
                                  moe_error *err)
{
    if (!like || !w) return moe_fail(err, MOE_ERR_INVALID_ARG, "weights zeros_like: NULL argument");
    if (dtype == MOE_NUM_DTYPES) dtype = like->dtype;
    if (!is_compute_dtype(dtype))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "weights zeros_like dtype: expected bf16/fp16/fp32/fp64");
    MOE_TRY(alloc_canonical(&like->cfg, like->expert_begin, like->expert_count, like->expert_ids,
                            dtype, w, err));
    /* All-zero bits are +0.0 in every float dtype. */
    moe_tensor *ts[] = {&w->router, &w->w13, &w->w2, &w->shared_gate, &w->shared_up,
                        &w->shared_down};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
        if (ts[i]->data) memset(ts[i]->data, 0, ts[i]->nbytes);
    w->naming = like->naming;
    memcpy(w->prefix, like->prefix, sizeof w->prefix);
    w->bytes_read = 0;
    return MOE_OK;
}

/* ---------------------------------------------------------------------------------------
 * Loading.
 * --------------------------------------------------------------------------------------- */

static moe_status mkname(char *buf, const char *prefix, const char *name, moe_error *err)
{
    int n = snprintf(buf, NAME_LEN, "%s%s", prefix, name);
    if (n < 0 || n >= NAME_LEN)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "tensor name too long: %s%s", prefix, name);
    return MOE_OK;
}

/* Whole tensor `prefix+name` of `shape` into dst (same shape, contiguous). */
static moe_status load_whole(wsrc *s, const char *prefix, const char *name, moe_tensor *dst,
                             moe_error *err)
{
    char full[NAME_LEN];
    MOE_TRY(mkname(full, prefix, name, err));
    const moe_st_file *f = NULL;
    const moe_st_entry *e = NULL;
    MOE_TRY(src_get(s, full, dst->ndim, dst->shape, &f, &e, err));
    convert_contig(e->dtype, entry_bytes(f, e), dst->dtype, dst->data, moe_tensor_numel(dst));
    return MOE_OK;
}

static moe_status load_qwen3_per_expert(wsrc *s, const char *prefix, moe_weights *w,
                                        moe_error *err)
{
    const int64_t H = w->cfg.hidden, I = w->cfg.inter;
    const size_t es = moe_dtype_size(w->dtype);
    const int64_t ih[2] = {I, H}, hi[2] = {H, I};
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    for (int l = 0; l < w->expert_count; l++) {
        int e = moe_weights_expert_id(w, l);
        for (int p = 0; p < 3; p++) {
            char rel[NAME_LEN], full[NAME_LEN];
            snprintf(rel, sizeof rel, "experts.%d.%s.weight", e, proj[p]);
            MOE_TRY(mkname(full, prefix, rel, err));
            const moe_st_file *f = NULL;
            const moe_st_entry *en = NULL;
            MOE_TRY(src_get(s, full, 2, p == 2 ? hi : ih, &f, &en, err));
            /* gate -> w13[l, 0:I, :], up -> w13[l, I:2I, :], down -> w2[l] */
            uint8_t *dst = p == 2 ? (uint8_t *)w->w2.data + (size_t)(l * H * I) * es
                                  : (uint8_t *)w->w13.data + (size_t)((l * 2 + p) * I * H) * es;
            convert_contig(en->dtype, entry_bytes(f, en), w->dtype, dst, (size_t)(I * H));
            w->bytes_read += en->end - en->begin;
        }
    }
    return MOE_OK;
}

/* Fused [E, a, b] tensor `name`: copy the local experts' slice [El, a, b] into dst unchanged
 * (transpose=false) or transposed per expert to [El, b, a] (transpose=true). */
static moe_status load_fused_slice(wsrc *s, const char *prefix, const char *name, int64_t a,
                                   int64_t bdim, bool transpose, moe_weights *w, moe_tensor *dst,
                                   moe_error *err)
{
    char full[NAME_LEN];
    MOE_TRY(mkname(full, prefix, name, err));
    const int64_t shape[3] = {w->cfg.num_experts, a, bdim};
    const moe_st_file *f = NULL;
    const moe_st_entry *e = NULL;
    MOE_TRY(src_get(s, full, 3, shape, &f, &e, err));
    const size_t ses = moe_dtype_size(e->dtype), des = moe_dtype_size(dst->dtype);
    const size_t per = (size_t)(a * bdim);
    const uint8_t *src = entry_bytes(f, e);
    for (int l = 0; l < w->expert_count; l++) {
        const uint8_t *se = src + (size_t)moe_weights_expert_id(w, l) * per * ses;
        uint8_t *de = (uint8_t *)dst->data + (size_t)l * per * des;
        if (!transpose) convert_contig(e->dtype, se, dst->dtype, de, per);
        else transpose_convert(e->dtype, se, a, bdim, dst->dtype, de);
    }
    w->bytes_read += (uint64_t)w->expert_count * per * ses;
    return MOE_OK;
}

static moe_status load_impl(const moe_config *cfg, const char *path, int layer, int expert_begin,
                            int expert_count, const int32_t *ids, moe_dtype dtype,
                            moe_weights *w, moe_error *err)
{
    MOE_TRY(check_common_args(cfg, expert_begin, expert_count, ids, &dtype, w, err));
    if (!path) return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: NULL path");
    memset(w, 0, sizeof *w);
    wsrc s;
    moe_status st = src_open(&s, path, err);
    if (st != MOE_OK) {
        src_close(&s);
        return st;
    }
    const bool llama = cfg->arch == MOE_ARCH_LLAMA4;
    const char *router_name = llama ? "router.weight" : "gate.weight";

    /* Find the prefix under which this block's router lives. */
    char prefix[256] = "";
    if (layer >= 0) {
        static const char *const pats[3] = {"model.layers.%d.mlp.", "model.layers.%d.feed_forward.",
                                            "language_model.model.layers.%d.feed_forward."};
        bool found = false;
        char tried[3][128];
        for (int i = 0; i < 3 && !found; i++) {
            snprintf(tried[i], sizeof tried[i], pats[i], layer);
            char full[NAME_LEN];
            snprintf(full, sizeof full, "%s%s", tried[i], router_name);
            if (src_has(&s, full)) {
                memcpy(prefix, tried[i], sizeof tried[i]); /* 128 < sizeof prefix */
                found = true;
            }
        }
        if (!found) {
            st = moe_fail(err, MOE_ERR_FORMAT,
                          "%s: no MoE router '%s' for layer %d under any of '%s', '%s', '%s' "
                          "(not an MoE layer, wrong layer, or wrong model type %s?)",
                          path, router_name, layer, tried[0], tried[1], tried[2], cfg->name);
            src_close(&s);
            return st;
        }
    }

    MOE_TRY_GOTO(alloc_canonical(cfg, expert_begin, expert_count, ids, dtype, w, err), st, fail);
    snprintf(w->prefix, sizeof w->prefix, "%s", prefix);
    MOE_TRY_GOTO(load_whole(&s, prefix, router_name, &w->router, err), st, fail);
    const int64_t H = cfg->hidden, I = cfg->inter;
    if (!llama) {
        char fused[NAME_LEN];
        MOE_TRY_GOTO(mkname(fused, prefix, "experts.gate_up_proj", err), st, fail);
        if (src_has(&s, fused)) {
            /* transformers 5 in-memory layout: already canonical, slice only. */
            w->naming = MOE_NAMING_QWEN3_FUSED;
            MOE_TRY_GOTO(load_fused_slice(&s, prefix, "experts.gate_up_proj", 2 * I, H, false, w,
                                          &w->w13, err), st, fail);
            MOE_TRY_GOTO(load_fused_slice(&s, prefix, "experts.down_proj", H, I, false, w,
                                          &w->w2, err), st, fail);
        } else {
            w->naming = MOE_NAMING_QWEN3_PER_EXPERT;
            MOE_TRY_GOTO(load_qwen3_per_expert(&s, prefix, w, err), st, fail);
        }
    } else {
        w->naming = MOE_NAMING_LLAMA4;
        /* gate_up_proj [E,H,2I] -> w13 [El,2I,H]; down_proj [E,I,H] -> w2 [El,H,I] */
        MOE_TRY_GOTO(load_fused_slice(&s, prefix, "experts.gate_up_proj", H, 2 * I, true, w,
                                      &w->w13, err), st, fail);
        MOE_TRY_GOTO(load_fused_slice(&s, prefix, "experts.down_proj", I, H, true, w, &w->w2,
                                      err), st, fail);
        MOE_TRY_GOTO(load_whole(&s, prefix, "shared_expert.gate_proj.weight", &w->shared_gate,
                                err), st, fail);
        MOE_TRY_GOTO(load_whole(&s, prefix, "shared_expert.up_proj.weight", &w->shared_up, err),
                     st, fail);
        MOE_TRY_GOTO(load_whole(&s, prefix, "shared_expert.down_proj.weight", &w->shared_down,
                                err), st, fail);
    }
    src_close(&s);
    return MOE_OK;
fail:
    src_close(&s);
    moe_weights_free(w);
    return st;
}

moe_status moe_weights_load(const moe_config *cfg, const char *path, int layer, int expert_begin,
                            int expert_count, moe_dtype dtype, moe_weights *w, moe_error *err)
{
    return load_impl(cfg, path, layer, expert_begin, expert_count, NULL, dtype, w, err);
}

moe_status moe_weights_load_ids(const moe_config *cfg, const char *path, int layer,
                                const int32_t *ids, int n, moe_dtype dtype, moe_weights *w,
                                moe_error *err)
{
    return load_impl(cfg, path, layer, 0, n, ids, dtype, w, err);
}

/* ---------------------------------------------------------------------------------------
 * Gradients.
 * --------------------------------------------------------------------------------------- */

/* Names and temporaries that must outlive the writer until moe_st_write. */
typedef struct grad_out {
    moe_st_writer wr;
    char **names;
    moe_tensor *tmps; /* owned temporaries (transposes) */
    moe_tensor *views;
    int n, cap;
} grad_out;

static moe_status gout_add(grad_out *g, const char *prefix, const char *name, moe_tensor t,
                           bool owned, moe_error *err)
{
    if (g->n == g->cap) {
        int cap = g->cap ? 2 * g->cap : 16;
        char **nn = realloc(g->names, (size_t)cap * sizeof *nn);
        if (nn) g->names = nn;
        moe_tensor *nt = realloc(g->tmps, (size_t)cap * sizeof *nt);
        if (nt) g->tmps = nt;
        moe_tensor *nv = realloc(g->views, (size_t)cap * sizeof *nv);
        if (nv) g->views = nv;
        if (!nn || !nt || !nv) {
            if (owned) moe_tensor_free(&t);
            return moe_fail(err, MOE_ERR_NOMEM, "gradient table of %d", cap);
        }
        g->cap = cap;
    }
    size_t len = strlen("grad.") + strlen(prefix) + strlen(name) + 1;
    char *full = malloc(len);
    if (!full) {
        if (owned) moe_tensor_free(&t);
        return moe_fail(err, MOE_ERR_NOMEM, "gradient name");
    }
    snprintf(full, len, "grad.%s%s", prefix, name);
    int i = g->n++;
    g->names[i] = full;
    memset(&g->tmps[i], 0, sizeof g->tmps[i]);
    if (owned) g->tmps[i] = t;
    g->views[i] = t;
    return MOE_OK;
}

static void gout_free(grad_out *g)
{
    moe_st_writer_free(&g->wr);
    for (int i = 0; i < g->n; i++) {
        free(g->names[i]);
        moe_tensor_free(&g->tmps[i]);
    }
    free(g->names);
    free(g->tmps);
    free(g->views);
    memset(g, 0, sizeof *g);
}

static moe_status same_shape(const moe_tensor *a, const moe_tensor *b, const char *what,
                             moe_error *err)
{
    bool same = a->ndim == b->ndim && (a->data != NULL) == (b->data != NULL);
    for (int i = 0; same && i < a->ndim; i++) same = a->shape[i] == b->shape[i];
    if (!same) {
        char sa[96], sb[96];
        moe_shape_str(a->ndim, a->shape, sa, sizeof sa);
        moe_shape_str(b->ndim, b->shape, sb, sizeof sb);
        return moe_fail(err, MOE_ERR_INVALID_ARG, "gradient '%s' has shape %s%s, weights have %s%s",
                        what, sb, b->data ? "" : " (absent)", sa, a->data ? "" : " (absent)");
    }
    if (b->data && !is_compute_dtype(b->dtype))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "gradient '%s' dtype is not a float dtype", what);
    return MOE_OK;
}

/* A borrowed 2-D view of rows [row0, row0+rows) of expert l in a [El, R, C] tensor. */
static moe_tensor expert_rows(const moe_tensor *t, int l, int64_t row0, int64_t rows)
{
    const int64_t R = t->shape[1], C = t->shape[2];
    const size_t es = moe_dtype_size(t->dtype);
    int64_t shape[2] = {rows, C};
    return moe_tensor_view_of(t->dtype, 2, shape,
                              (uint8_t *)t->data + (size_t)(((int64_t)l * R + row0) * C) * es);
}

/* [El, R, C] canonical -> new [El, C, R] tensor (Llama-4's HF layout). */
static moe_status transposed_copy(const moe_tensor *t, moe_tensor *out, moe_error *err)
{
    const int64_t El = t->shape[0], R = t->shape[1], C = t->shape[2];
    MOE_TRY(moe_tensor_alloc3(out, t->dtype, El, C, R, err));
    const size_t es = moe_dtype_size(t->dtype);
    for (int64_t l = 0; l < El; l++)
        transpose_tensor_2d(t, (size_t)(l * R * C), R, C,
                            (uint8_t *)out->data + (size_t)(l * R * C) * es);
    return MOE_OK;
}

moe_status moe_weights_write_grads(const moe_weights *like, const moe_weights *grads,
                                   const moe_tensor *dx, const char *path, moe_error *err)
{
    if (!like || !grads || !path)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "write_grads: NULL argument");
    MOE_TRY(same_shape(&like->router, &grads->router, "router", err));
    MOE_TRY(same_shape(&like->w13, &grads->w13, "w13", err));
    MOE_TRY(same_shape(&like->w2, &grads->w2, "w2", err));
    MOE_TRY(same_shape(&like->shared_gate, &grads->shared_gate, "shared_gate", err));
    MOE_TRY(same_shape(&like->shared_up, &grads->shared_up, "shared_up", err));
    MOE_TRY(same_shape(&like->shared_down, &grads->shared_down, "shared_down", err));
    if (!grads->router.data || !grads->w13.data || !grads->w2.data)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "write_grads: gradients are not allocated");
    if (dx && (!dx->data || dx->ndim < 1 || dx->shape[dx->ndim - 1] != like->cfg.hidden ||
               !is_compute_dtype(dx->dtype)))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "write_grads: dx must be a float tensor [..., H=%d]", like->cfg.hidden);

    grad_out g;
    memset(&g, 0, sizeof g);
    moe_st_writer_init(&g.wr);
    moe_status st = MOE_OK;
    const char *pre = like->prefix;
    const int El = like->expert_count;
    const int64_t I = like->cfg.inter;
    const bool has_shared = grads->shared_gate.data != NULL;

    if (dx) MOE_TRY_GOTO(gout_add(&g, "", "hidden_states", *dx, false, err), st, done);
    switch (like->naming) {
    case MOE_NAMING_RANDOM:
        MOE_TRY_GOTO(gout_add(&g, "", "router", grads->router, false, err), st, done);
        MOE_TRY_GOTO(gout_add(&g, "", "w13", grads->w13, false, err), st, done);
        MOE_TRY_GOTO(gout_add(&g, "", "w2", grads->w2, false, err), st, done);
        if (has_shared) {
            MOE_TRY_GOTO(gout_add(&g, "", "shared_gate", grads->shared_gate, false, err), st, done);
            MOE_TRY_GOTO(gout_add(&g, "", "shared_up", grads->shared_up, false, err), st, done);
            MOE_TRY_GOTO(gout_add(&g, "", "shared_down", grads->shared_down, false, err), st, done);
        }
        break;
    case MOE_NAMING_QWEN3_PER_EXPERT:
        MOE_TRY_GOTO(gout_add(&g, pre, "gate.weight", grads->router, false, err), st, done);
        for (int l = 0; l < El; l++) {
            char rel[NAME_LEN];
            /* gate = w13 rows [0,I), up = rows [I,2I): contiguous, so borrowed views. */
            const int e = moe_weights_expert_id(like, l);
            snprintf(rel, sizeof rel, "experts.%d.gate_proj.weight", e);
            MOE_TRY_GOTO(gout_add(&g, pre, rel, expert_rows(&grads->w13, l, 0, I), false, err),
                         st, done);
            snprintf(rel, sizeof rel, "experts.%d.up_proj.weight", e);
            MOE_TRY_GOTO(gout_add(&g, pre, rel, expert_rows(&grads->w13, l, I, I), false, err),
                         st, done);
            snprintf(rel, sizeof rel, "experts.%d.down_proj.weight", e);
            MOE_TRY_GOTO(gout_add(&g, pre, rel,
                                  expert_rows(&grads->w2, l, 0, grads->w2.shape[1]), false, err),
                         st, done);
        }
        break;
    case MOE_NAMING_QWEN3_FUSED:
        /* The local slice [El, ...] under the fused name (the full [E, ...] when El == E). */
        MOE_TRY_GOTO(gout_add(&g, pre, "gate.weight", grads->router, false, err), st, done);
        MOE_TRY_GOTO(gout_add(&g, pre, "experts.gate_up_proj", grads->w13, false, err), st, done);
        MOE_TRY_GOTO(gout_add(&g, pre, "experts.down_proj", grads->w2, false, err), st, done);
        break;
    case MOE_NAMING_LLAMA4: {
        MOE_TRY_GOTO(gout_add(&g, pre, "router.weight", grads->router, false, err), st, done);
        moe_tensor t;
        /* w13 [El,2I,H] -> gate_up_proj [El,H,2I]; w2 [El,H,I] -> down_proj [El,I,H] */
        MOE_TRY_GOTO(transposed_copy(&grads->w13, &t, err), st, done);
        MOE_TRY_GOTO(gout_add(&g, pre, "experts.gate_up_proj", t, true, err), st, done);
        MOE_TRY_GOTO(transposed_copy(&grads->w2, &t, err), st, done);
        MOE_TRY_GOTO(gout_add(&g, pre, "experts.down_proj", t, true, err), st, done);
        if (has_shared) {
            MOE_TRY_GOTO(gout_add(&g, pre, "shared_expert.gate_proj.weight", grads->shared_gate,
                                  false, err), st, done);
            MOE_TRY_GOTO(gout_add(&g, pre, "shared_expert.up_proj.weight", grads->shared_up,
                                  false, err), st, done);
            MOE_TRY_GOTO(gout_add(&g, pre, "shared_expert.down_proj.weight", grads->shared_down,
                                  false, err), st, done);
        }
        break;
    }
    default:
        st = moe_fail(err, MOE_ERR_INVALID_ARG, "write_grads: unknown naming %d",
                      (int)like->naming);
        goto done;
    }
    for (int i = 0; i < g.n; i++)
        MOE_TRY_GOTO(moe_st_writer_add(&g.wr, g.names[i], &g.views[i], err), st, done);
    MOE_TRY_GOTO(moe_st_write(&g.wr, path, err), st, done);
done:
    gout_free(&g);
    return st;
}
