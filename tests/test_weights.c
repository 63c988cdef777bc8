/* test_weights.c — canonical weights: random generation (formula, rank slices, thread count),
 * loading every HF naming (hub per-expert Qwen3, transformers-5 fused Qwen3, Llama-4) from
 * single files with and without layer prefixes and from a sharded index, conversion between
 * dtypes, bytes_read of a rank's slice, error messages naming the tensor, and gradient writing
 * under the loaded names/layouts.
 *
 * Independence: checkpoints are written here in HF layout with values val(name, flat index)
 * from the test's own hash; the expected canonical element is computed from the HF index
 * formula directly (e.g. Llama-4 w13[l][j][h] = gate_up[(b+l)][h][j]), never from weights.c. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"
#include "config.h"
#include "dtype.h"
#include "rng.h"
#include "safetensors.h"
#include "weights.h"

static char g_dir[256];
static uint64_t g_seed;

/* ---- the test's own value generator (not moe_rng: the loader must not share its source) ---- */
static uint64_t th_mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint64_t th_name(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}
/* A value in (-2, 2) with plenty of mantissa bits so rounding to bf16/fp16 matters. */
static double val(const char *name, uint64_t i)
{
    uint64_t h = th_mix(th_mix(g_seed ^ th_name(name)) ^ (i * 0xd1b54a32d192ed03ull));
    return ((double)(h >> 11) * 0x1p-53 - 0.5) * 4.0;
}

static void path_in_dir(char *buf, size_t len, const char *file)
{
    snprintf(buf, len, "%s/%s", g_dir, file);
}

/* Read an element of a (possibly unaligned, mmapped) tensor. */
static double elem(const moe_tensor *t, size_t i)
{
    size_t es = moe_dtype_size(t->dtype);
    uint64_t tmp = 0;
    memcpy(&tmp, (const uint8_t *)t->data + i * es, es);
    return moe_load_elem(t->dtype, &tmp, 0);
}

/* ---- HF-layout tensor specs and checkpoint writing ---- */
typedef struct tspec {
    char name[256];
    int ndim;
    int64_t shape[3];
} tspec;

#define MAX_SPECS 512

static void add_spec(tspec *s, int *n, const char *prefix, const char *name, int ndim, int64_t a,
                     int64_t b, int64_t c)
{
    snprintf(s[*n].name, sizeof s[*n].name, "%s%s", prefix, name);
    s[*n].ndim = ndim;
    s[*n].shape[0] = a;
    s[*n].shape[1] = b;
    s[*n].shape[2] = c;
    (*n)++;
}

/* The tensors a checkpoint of `naming` holds for one block under `prefix`. */
static int hf_specs(const moe_config *c, moe_weight_naming nm, const char *prefix, tspec *s)
{
    int n = 0;
    const int64_t H = c->hidden, I = c->inter, E = c->num_experts, Is = c->shared_inter;
    char nb[128];
    switch (nm) {
    case MOE_NAMING_QWEN3_PER_EXPERT:
        add_spec(s, &n, prefix, "gate.weight", 2, E, H, 0);
        for (int e = 0; e < E; e++) {
            snprintf(nb, sizeof nb, "experts.%d.gate_proj.weight", e);
            add_spec(s, &n, prefix, nb, 2, I, H, 0);
            snprintf(nb, sizeof nb, "experts.%d.up_proj.weight", e);
            add_spec(s, &n, prefix, nb, 2, I, H, 0);
            snprintf(nb, sizeof nb, "experts.%d.down_proj.weight", e);
            add_spec(s, &n, prefix, nb, 2, H, I, 0);
        }
        break;
    case MOE_NAMING_QWEN3_FUSED:
        add_spec(s, &n, prefix, "gate.weight", 2, E, H, 0);
        add_spec(s, &n, prefix, "experts.gate_up_proj", 3, E, 2 * I, H);
        add_spec(s, &n, prefix, "experts.down_proj", 3, E, H, I);
        break;
    case MOE_NAMING_LLAMA4:
        add_spec(s, &n, prefix, "router.weight", 2, E, H, 0);
        add_spec(s, &n, prefix, "experts.gate_up_proj", 3, E, H, 2 * I);
        add_spec(s, &n, prefix, "experts.down_proj", 3, E, I, H);
        add_spec(s, &n, prefix, "shared_expert.gate_proj.weight", 2, Is, H, 0);
        add_spec(s, &n, prefix, "shared_expert.up_proj.weight", 2, Is, H, 0);
        add_spec(s, &n, prefix, "shared_expert.down_proj.weight", 2, H, Is, 0);
        break;
    default: break;
    }
    return n;
}

/* Write specs[0..n) with values val(name, i) rounded to dt. */
static void write_specs(const char *path, const tspec *specs, int n, moe_dtype dt)
{
    moe_st_writer wr;
    moe_st_writer_init(&wr);
    moe_tensor *ts = calloc((size_t)n, sizeof *ts);
    assert_non_null(ts);
    moe_error err = {0};
    for (int k = 0; k < n; k++) {
        assert_int_equal(moe_tensor_alloc(&ts[k], dt, specs[k].ndim, specs[k].shape, &err), MOE_OK);
        size_t cnt = moe_tensor_numel(&ts[k]);
        for (size_t i = 0; i < cnt; i++) moe_store_elem(dt, ts[k].data, i, val(specs[k].name, i));
        assert_int_equal(moe_st_writer_add(&wr, specs[k].name, &ts[k], &err), MOE_OK);
    }
    moe_status st = moe_st_write(&wr, path, &err);
    if (st != MOE_OK) fprintf(stderr, "write %s: %s\n", path, err.msg);
    assert_int_equal(st, MOE_OK);
    moe_st_writer_free(&wr);
    for (int k = 0; k < n; k++) moe_tensor_free(&ts[k]);
    free(ts);
}

static int remove_spec(tspec *s, int n, const char *name)
{
    for (int k = 0; k < n; k++)
        if (strcmp(s[k].name, name) == 0) {
            memmove(&s[k], &s[k + 1], (size_t)(n - k - 1) * sizeof *s);
            return n - 1;
        }
    fail_msg("no spec %s", name);
    return n;
}

static tspec *find_spec(tspec *s, int n, const char *name)
{
    for (int k = 0; k < n; k++)
        if (strcmp(s[k].name, name) == 0) return &s[k];
    fail_msg("no spec %s", name);
    return NULL;
}

/* ---- expected canonical values from the HF index formulas ---- */
typedef struct expect_ctx {
    const moe_config *c;
    moe_weight_naming nm;
    const char *prefix;
    moe_dtype stored, loaded;
} expect_ctx;

static double rounded(const expect_ctx *x, const char *rel, uint64_t i)
{
    char name[512];
    snprintf(name, sizeof name, "%s%s", x->prefix, rel);
    return moe_round_to(x->loaded, moe_round_to(x->stored, val(name, i)));
}

/* Compare every element of w (local experts b..b+n) with the formulas. */
static void check_loaded(const expect_ctx *x, const moe_weights *w)
{
    const int64_t H = x->c->hidden, I = x->c->inter, Is = x->c->shared_inter;
    const int b = w->expert_begin, n = w->expert_count;
    assert_int_equal(w->dtype, x->loaded);
    assert_int_equal(w->naming, x->nm);
    assert_string_equal(w->prefix, x->prefix);
    const int64_t sh13[3] = {n, 2 * I, H}, sh2[3] = {n, H, I}, shr[2] = {x->c->num_experts, H};
    assert_true(moe_shape_equal(&w->w13, 3, sh13));
    assert_true(moe_shape_equal(&w->w2, 3, sh2));
    assert_true(moe_shape_equal(&w->router, 2, shr));
    const char *rname = x->nm == MOE_NAMING_LLAMA4 ? "router.weight" : "gate.weight";
    for (int64_t i = 0; i < x->c->num_experts * H; i++)
        assert_true(elem(&w->router, (size_t)i) == rounded(x, rname, (uint64_t)i));
    char rel[128];
    for (int l = 0; l < n; l++) {
        const int64_t e = b + l;
        for (int64_t j = 0; j < 2 * I; j++)
            for (int64_t h = 0; h < H; h++) {
                double want;
                if (x->nm == MOE_NAMING_QWEN3_PER_EXPERT) {
                    snprintf(rel, sizeof rel, "experts.%d.%s_proj.weight", (int)e,
                             j < I ? "gate" : "up");
                    want = rounded(x, rel, (uint64_t)((j % I) * H + h));
                } else if (x->nm == MOE_NAMING_QWEN3_FUSED) {
                    want = rounded(x, "experts.gate_up_proj", (uint64_t)((e * 2 * I + j) * H + h));
                } else { /* Llama-4 gate_up_proj [E, H, 2I] */
                    want = rounded(x, "experts.gate_up_proj", (uint64_t)((e * H + h) * 2 * I + j));
                }
                double got = elem(&w->w13, (size_t)((l * 2 * I + j) * H + h));
                if (got != want)
                    fail_msg("w13[%d][%lld][%lld] = %g, want %g", l, (long long)j, (long long)h,
                             got, want);
            }
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < I; i++) {
                double want;
                if (x->nm == MOE_NAMING_QWEN3_PER_EXPERT) {
                    snprintf(rel, sizeof rel, "experts.%d.down_proj.weight", (int)e);
                    want = rounded(x, rel, (uint64_t)(h * I + i));
                } else if (x->nm == MOE_NAMING_QWEN3_FUSED) {
                    want = rounded(x, "experts.down_proj", (uint64_t)((e * H + h) * I + i));
                } else { /* Llama-4 down_proj [E, I, H] */
                    want = rounded(x, "experts.down_proj", (uint64_t)((e * I + i) * H + h));
                }
                double got = elem(&w->w2, (size_t)((l * H + h) * I + i));
                if (got != want)
                    fail_msg("w2[%d][%lld][%lld] = %g, want %g", l, (long long)h, (long long)i,
                             got, want);
            }
    }
    if (x->nm == MOE_NAMING_LLAMA4) {
        for (int64_t i = 0; i < Is * H; i++) {
            assert_true(elem(&w->shared_gate, (size_t)i) ==
                        rounded(x, "shared_expert.gate_proj.weight", (uint64_t)i));
            assert_true(elem(&w->shared_up, (size_t)i) ==
                        rounded(x, "shared_expert.up_proj.weight", (uint64_t)i));
            assert_true(elem(&w->shared_down, (size_t)i) ==
                        rounded(x, "shared_expert.down_proj.weight", (uint64_t)i));
        }
        const int64_t shs[2] = {Is, H}, shd[2] = {H, Is};
        assert_true(moe_shape_equal(&w->shared_gate, 2, shs));
        assert_true(moe_shape_equal(&w->shared_down, 2, shd));
    } else {
        assert_null(w->shared_gate.data);
        assert_null(w->shared_down.data);
    }
    /* Only the local experts' bytes: 3*I*H elements per expert in the stored dtype. */
    assert_int_equal(w->bytes_read, (uint64_t)n * 3 * (uint64_t)(I * H) * moe_dtype_size(x->stored));
}

/* Write a checkpoint of `nm` under `prefix` (plus a decoy layer), load several expert ranges and
 * dtypes, and check each against the formulas. */
static void round_trip(const char *preset, moe_weight_naming nm, int layer, const char *prefix,
                       const char *decoy_prefix, moe_dtype stored, moe_dtype loaded)
{
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset(preset, &c, &err), MOE_OK);
    static tspec specs[MAX_SPECS];
    int n = hf_specs(&c, nm, prefix, specs);
    if (decoy_prefix) n += hf_specs(&c, nm, decoy_prefix, specs + n);
    char path[512];
    path_in_dir(path, sizeof path, "rt.safetensors");
    write_specs(path, specs, n, stored);
    expect_ctx x = {&c, nm, prefix, stored, loaded};
    const int E = c.num_experts;
    const int ranges[][2] = {{0, E}, {0, 1}, {E - 1, 1}, {1, E - 2}, {E / 2, E - E / 2}};
    moe_weights full;
    assert_int_equal(moe_weights_load(&c, path, layer, 0, E, loaded, &full, &err), MOE_OK);
    for (size_t r = 0; r < sizeof ranges / sizeof ranges[0]; r++) {
        moe_weights w;
        moe_status st = moe_weights_load(&c, path, layer, ranges[r][0], ranges[r][1], loaded, &w,
                                         &err);
        if (st != MOE_OK) fprintf(stderr, "load: %s\n", err.msg);
        assert_int_equal(st, MOE_OK);
        assert_int_equal(w.expert_begin, ranges[r][0]);
        assert_int_equal(w.expert_count, ranges[r][1]);
        check_loaded(&x, &w);
        /* a rank's slice equals the matching part of the single-rank tensors */
        size_t es = moe_dtype_size(loaded);
        size_t p13 = (size_t)(2 * c.inter * c.hidden) * es, p2 = (size_t)(c.inter * c.hidden) * es;
        assert_memory_equal(w.w13.data, (uint8_t *)full.w13.data + (size_t)ranges[r][0] * p13,
                            (size_t)ranges[r][1] * p13);
        assert_memory_equal(w.w2.data, (uint8_t *)full.w2.data + (size_t)ranges[r][0] * p2,
                            (size_t)ranges[r][1] * p2);
        moe_weights_free(&w);
        assert_null(w.w13.data);
    }
    moe_weights_free(&full);
    unlink(path);
}

static void test_load_qwen3_per_expert(void **state)
{
    (void)state;
    round_trip("tiny-qwen3", MOE_NAMING_QWEN3_PER_EXPERT, -1, "", NULL, MOE_DTYPE_BF16,
               MOE_DTYPE_F32);
    round_trip("tiny-qwen3", MOE_NAMING_QWEN3_PER_EXPERT, 3, "model.layers.3.mlp.",
               "model.layers.2.mlp.", MOE_DTYPE_F32, MOE_DTYPE_BF16);
}

static void test_load_qwen3_fused(void **state)
{
    (void)state;
    round_trip("tiny-qwen3", MOE_NAMING_QWEN3_FUSED, -1, "", NULL, MOE_DTYPE_F32, MOE_DTYPE_F16);
    round_trip("tiny-qwen3", MOE_NAMING_QWEN3_FUSED, 0, "model.layers.0.mlp.",
               "model.layers.1.mlp.", MOE_DTYPE_F16, MOE_DTYPE_F32);
}

static void test_load_llama4(void **state)
{
    (void)state;
    round_trip("tiny-llama4", MOE_NAMING_LLAMA4, -1, "", NULL, MOE_DTYPE_F32, MOE_DTYPE_F32);
    round_trip("tiny-llama4", MOE_NAMING_LLAMA4, 5, "language_model.model.layers.5.feed_forward.",
               "language_model.model.layers.4.feed_forward.", MOE_DTYPE_BF16, MOE_DTYPE_F32);
    round_trip("tiny-llama4", MOE_NAMING_LLAMA4, 1, "model.layers.1.feed_forward.", NULL,
               MOE_DTYPE_F64, MOE_DTYPE_BF16);
}

/* The weights' own dtype when MOE_NUM_DTYPES is asked for. */
static void test_load_default_dtype(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("tiny-qwen3", &c, &err), MOE_OK);
    c.dtype = MOE_DTYPE_BF16;
    static tspec specs[MAX_SPECS];
    int n = hf_specs(&c, MOE_NAMING_QWEN3_FUSED, "", specs);
    char path[512];
    path_in_dir(path, sizeof path, "dd.safetensors");
    write_specs(path, specs, n, MOE_DTYPE_F32);
    moe_weights w;
    assert_int_equal(moe_weights_load(&c, path, -1, 2, 3, MOE_NUM_DTYPES, &w, &err), MOE_OK);
    expect_ctx x = {&c, MOE_NAMING_QWEN3_FUSED, "", MOE_DTYPE_F32, MOE_DTYPE_BF16};
    check_loaded(&x, &w);
    moe_weights_free(&w);
    unlink(path);
}

/* ---- sharded checkpoints ---- */
static void write_index(const char *path, const tspec *specs, int n, const char *const *shard_of,
                        const char *extra)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "{\n  \"metadata\": {\"total_size\": 12345},\n  \"weight_map\": {\n");
    for (int k = 0; k < n; k++)
        fprintf(f, "    \"%s\": \"%s\"%s\n", specs[k].name, shard_of[k],
                (k + 1 < n || extra) ? "," : "");
    if (extra) fprintf(f, "    %s\n", extra);
    fprintf(f, "  }\n}\n");
    fclose(f);
}

static void test_load_sharded(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("tiny-qwen3", &c, &err), MOE_OK);
    const char *prefix = "model.layers.7.mlp.";
    static tspec specs[MAX_SPECS], s1[MAX_SPECS], s2[MAX_SPECS];
    int n = hf_specs(&c, MOE_NAMING_QWEN3_PER_EXPERT, prefix, specs);
    /* shard 1: the router and experts 0..3; shard 2: experts 4..6 */
    const char *shard_of[MAX_SPECS];
    int n1 = 0, n2 = 0;
    for (int k = 0; k < n; k++) {
        int e = -1;
        sscanf(specs[k].name + strlen(prefix), "experts.%d.", &e);
        if (e >= 4) { s2[n2++] = specs[k]; shard_of[k] = "model-00002-of-00002.safetensors"; }
        else { s1[n1++] = specs[k]; shard_of[k] = "model-00001-of-00002.safetensors"; }
    }
    char p1[512], p2[512], idx[512];
    path_in_dir(p1, sizeof p1, "model-00001-of-00002.safetensors");
    path_in_dir(p2, sizeof p2, "model-00002-of-00002.safetensors");
    path_in_dir(idx, sizeof idx, "model.safetensors.index.json");
    write_specs(p1, s1, n1, MOE_DTYPE_BF16);
    write_specs(p2, s2, n2, MOE_DTYPE_BF16);
    /* a tensor of another module in a shard that does not exist: must never be opened */
    write_index(idx, specs, n, shard_of,
                "\"model.embed_tokens.weight\": \"model-00003-of-00003.safetensors\"");
    expect_ctx x = {&c, MOE_NAMING_QWEN3_PER_EXPERT, prefix, MOE_DTYPE_BF16, MOE_DTYPE_F32};
    const int ranges[][2] = {{0, 7}, {0, 4}, {4, 3}, {3, 2}};
    for (int r = 0; r < 4; r++) {
        moe_weights w;
        moe_status st = moe_weights_load(&c, idx, 7, ranges[r][0], ranges[r][1], MOE_DTYPE_F32,
                                         &w, &err);
        if (st != MOE_OK) fprintf(stderr, "sharded load: %s\n", err.msg);
        assert_int_equal(st, MOE_OK);
        check_loaded(&x, &w);
        moe_weights_free(&w);
    }

    /* Experts 5 and 6 in a shard that is absent: a rank owning experts 0..4 still loads (the
     * shard is never opened); one owning expert 5 gets an I/O error naming tensor and shard. */
    for (int k = 0; k < n; k++) {
        int e = -1;
        sscanf(specs[k].name + strlen(prefix), "experts.%d.", &e);
        if (e >= 5) shard_of[k] = "absent-shard.safetensors";
    }
    write_index(idx, specs, n, shard_of, NULL);
    moe_weights w;
    assert_int_equal(moe_weights_load(&c, idx, 7, 0, 5, MOE_DTYPE_F32, &w, &err), MOE_OK);
    check_loaded(&x, &w);
    moe_weights_free(&w);
    moe_error_clear(&err);
    moe_status st = moe_weights_load(&c, idx, 7, 4, 3, MOE_DTYPE_F32, &w, &err);
    fprintf(stderr, "absent shard -> %s\n", err.msg);
    assert_int_equal(st, MOE_ERR_IO);
    assert_non_null(strstr(err.msg, "absent-shard.safetensors"));
    assert_non_null(strstr(err.msg, "model.layers.7.mlp.experts.5.gate_proj.weight"));
    assert_null(w.w13.data);

    /* The index says shard 1 but the tensor is not in it. */
    for (int k = 0; k < n; k++) shard_of[k] = "model-00001-of-00002.safetensors";
    write_index(idx, specs, n, shard_of, NULL);
    st = moe_weights_load(&c, idx, 7, 4, 1, MOE_DTYPE_F32, &w, &err);
    fprintf(stderr, "wrong shard -> %s\n", err.msg);
    assert_int_equal(st, MOE_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "model.layers.7.mlp.experts.4.gate_proj.weight"));

    /* An index without a weight_map. */
    FILE *f = fopen(idx, "w");
    fputs("{\"metadata\": {}}", f);
    fclose(f);
    assert_int_equal(moe_weights_load(&c, idx, 7, 0, 1, MOE_DTYPE_F32, &w, &err), MOE_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "weight_map"));
    unlink(p1);
    unlink(p2);
    unlink(idx);
}

/* ---- errors name the tensor, the expected and the found shape ---- */
static moe_status load_expect(const moe_config *c, const char *path, int layer, int b, int n,
                              moe_status want, const char *const *words)
{
    moe_weights w;
    memset(&w, 0x11, sizeof w);
    moe_error err = {0};
    moe_status st = moe_weights_load(c, path, layer, b, n, MOE_DTYPE_F32, &w, &err);
    fprintf(stderr, "  -> %s: %s\n", moe_strerror(st), err.msg);
    assert_int_equal(st, want);
    if (st == MOE_OK) {
        moe_weights_free(&w);
    } else {
        for (int i = 0; words && words[i]; i++) {
            if (!strstr(err.msg, words[i])) fail_msg("message lacks '%s'", words[i]);
        }
        assert_null(w.w13.data); /* nothing left allocated */
        assert_null(w.router.data);
    }
    return st;
}

static void test_load_errors(void **state)
{
    (void)state;
    moe_config cq, cl;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("tiny-qwen3", &cq, &err), MOE_OK);
    assert_int_equal(moe_config_preset("tiny-llama4", &cl, &err), MOE_OK);
    static tspec specs[MAX_SPECS];
    char path[512];
    path_in_dir(path, sizeof path, "err.safetensors");
    const char *pq = "model.layers.3.mlp.";

    /* a missing per-expert tensor: fatal only for the rank that owns that expert */
    int n = hf_specs(&cq, MOE_NAMING_QWEN3_PER_EXPERT, pq, specs);
    n = remove_spec(specs, n, "model.layers.3.mlp.experts.2.up_proj.weight");
    write_specs(path, specs, n, MOE_DTYPE_F32);
    load_expect(&cq, path, 3, 0, 7, MOE_ERR_FORMAT,
                (const char *[]){"model.layers.3.mlp.experts.2.up_proj.weight", "[23, 37]", NULL});
    load_expect(&cq, path, 3, 3, 4, MOE_OK, NULL);
    /* a rank of an expert map may own no expert: the router (and shared expert) alone, and
     * expert 2's missing tensor is never looked for */
    load_expect(&cq, path, 3, 0, 0, MOE_OK, NULL);

    /* a transposed router */
    n = hf_specs(&cq, MOE_NAMING_QWEN3_PER_EXPERT, pq, specs);
    tspec *r = find_spec(specs, n, "model.layers.3.mlp.gate.weight");
    r->shape[0] = 37;
    r->shape[1] = 7;
    write_specs(path, specs, n, MOE_DTYPE_F32);
    load_expect(&cq, path, 3, 0, 7, MOE_ERR_FORMAT,
                (const char *[]){"model.layers.3.mlp.gate.weight", "[7, 37]", "[37, 7]", NULL});

    /* a transposed down_proj of one expert */
    n = hf_specs(&cq, MOE_NAMING_QWEN3_PER_EXPERT, pq, specs);
    r = find_spec(specs, n, "model.layers.3.mlp.experts.6.down_proj.weight");
    r->shape[0] = 23;
    r->shape[1] = 37;
    write_specs(path, specs, n, MOE_DTYPE_F32);
    load_expect(&cq, path, 3, 5, 2, MOE_ERR_FORMAT,
                (const char *[]){"experts.6.down_proj.weight", "[37, 23]", "[23, 37]", NULL});

    /* wrong layer, and full names loaded as a bare block */
    load_expect(&cq, path, 9, 0, 7, MOE_ERR_FORMAT,
                (const char *[]){"model.layers.9.mlp.", "language_model.model.layers.9.feed_forward.",
                                 "gate.weight", NULL});
    load_expect(&cq, path, -1, 0, 7, MOE_ERR_FORMAT, (const char *[]){"'gate.weight'", NULL});

    /* Llama-4 experts stored in the Qwen3 orientation [E,2I,H] are rejected */
    const char *pl = "language_model.model.layers.0.feed_forward.";
    n = hf_specs(&cl, MOE_NAMING_LLAMA4, pl, specs);
    r = find_spec(specs, n, "language_model.model.layers.0.feed_forward.experts.gate_up_proj");
    r->shape[1] = 38;
    r->shape[2] = 41;
    write_specs(path, specs, n, MOE_DTYPE_BF16);
    load_expect(&cl, path, 0, 0, 5, MOE_ERR_FORMAT,
                (const char *[]){"language_model.model.layers.0.feed_forward.experts.gate_up_proj",
                                 "[5, 41, 38]", "[5, 38, 41]", NULL});

    /* Llama-4 without its shared expert */
    n = hf_specs(&cl, MOE_NAMING_LLAMA4, pl, specs);
    n = remove_spec(specs, n, "language_model.model.layers.0.feed_forward.shared_expert.up_proj.weight");
    write_specs(path, specs, n, MOE_DTYPE_BF16);
    load_expect(&cl, path, 0, 1, 2, MOE_ERR_FORMAT,
                (const char *[]){"shared_expert.up_proj.weight", "[19, 41]", NULL});

    /* a Llama-4 file read with a Qwen3 config: no gate.weight router */
    n = hf_specs(&cl, MOE_NAMING_LLAMA4, "", specs);
    write_specs(path, specs, n, MOE_DTYPE_F32);
    load_expect(&cq, path, -1, 0, 7, MOE_ERR_FORMAT, (const char *[]){"gate.weight", NULL});

    /* Qwen3 fused with the down projection missing */
    n = hf_specs(&cq, MOE_NAMING_QWEN3_FUSED, "", specs);
    n = remove_spec(specs, n, "experts.down_proj");
    write_specs(path, specs, n, MOE_DTYPE_F32);
    load_expect(&cq, path, -1, 0, 7, MOE_ERR_FORMAT,
                (const char *[]){"experts.down_proj", "[7, 37, 23]", NULL});

    /* an integer tensor where a weight should be */
    {
        moe_st_writer wr;
        moe_st_writer_init(&wr);
        moe_tensor t;
        assert_int_equal(moe_tensor_alloc2(&t, MOE_DTYPE_I32, 7, 37, &err), MOE_OK);
        memset(t.data, 0, t.nbytes);
        assert_int_equal(moe_st_writer_add(&wr, "gate.weight", &t, &err), MOE_OK);
        assert_int_equal(moe_st_write(&wr, path, &err), MOE_OK);
        moe_st_writer_free(&wr);
        moe_tensor_free(&t);
        load_expect(&cq, path, -1, 0, 7, MOE_ERR_UNSUPPORTED,
                    (const char *[]){"gate.weight", "int32", NULL});
    }

    /* bad arguments */
    load_expect(&cq, path, -1, 5, 3, MOE_ERR_INVALID_ARG, (const char *[]){"E=7", NULL});
    load_expect(&cq, path, -1, -1, 2, MOE_ERR_INVALID_ARG, NULL);
    moe_weights w;
    assert_int_equal(moe_weights_load(&cq, path, -1, 0, 7, MOE_DTYPE_I32, &w, &err),
                     MOE_ERR_INVALID_ARG);
    path_in_dir(path, sizeof path, "nonexistent.safetensors");
    load_expect(&cq, path, -1, 0, 7, MOE_ERR_IO, (const char *[]){"nonexistent.safetensors", NULL});
    path_in_dir(path, sizeof path, "err.safetensors");
    unlink(path);
}

/* ---- real transformers 5 fixtures ---- */
static void test_hf_fixture_weights(void **state)
{
    (void)state;
    const char *qdirs[] = {"qwen3_norm_fp32", "qwen3_norm_bf16"};
    moe_error err = {0};
    for (int d = 0; d < 2; d++) {
        char dir[512], wp[600], hp[600];
        snprintf(dir, sizeof dir, MOE_FIXTURE_DIR "/hf/%s", qdirs[d]);
        snprintf(wp, sizeof wp, "%s/weights.safetensors", dir);
        snprintf(hp, sizeof hp, "%s/weights_hub.safetensors", dir);
        moe_config c;
        assert_int_equal(moe_config_resolve(dir, &c, &err), MOE_OK);
        moe_weights a, b;
        assert_int_equal(moe_weights_load(&c, wp, -1, 1, 5, MOE_NUM_DTYPES, &a, &err), MOE_OK);
        assert_int_equal(moe_weights_load(&c, hp, -1, 1, 5, MOE_NUM_DTYPES, &b, &err), MOE_OK);
        assert_int_equal(a.naming, MOE_NAMING_QWEN3_FUSED);
        assert_int_equal(b.naming, MOE_NAMING_QWEN3_PER_EXPERT);
        assert_int_equal(a.dtype, c.dtype);
        /* the fused in-memory layout and the hub's per-expert split are the same weights */
        assert_memory_equal(a.router.data, b.router.data, a.router.nbytes);
        assert_memory_equal(a.w13.data, b.w13.data, a.w13.nbytes);
        assert_memory_equal(a.w2.data, b.w2.data, a.w2.nbytes);
        assert_int_equal(a.bytes_read, b.bytes_read);
        moe_weights_free(&a);
        moe_weights_free(&b);
    }
    /* Llama-4: the canonical tensors are the file's tensors transposed, read here directly. */
    char dir[512] = MOE_FIXTURE_DIR "/hf/llama4_k1_fp32", wp[600];
    snprintf(wp, sizeof wp, "%s/weights.safetensors", dir);
    moe_config c;
    assert_int_equal(moe_config_resolve(dir, &c, &err), MOE_OK);
    moe_weights w;
    assert_int_equal(moe_weights_load(&c, wp, -1, 2, 3, MOE_DTYPE_F64, &w, &err), MOE_OK);
    moe_st_file f;
    assert_int_equal(moe_st_open(wp, &f, &err), MOE_OK);
    moe_tensor gu = moe_st_view(&f, moe_st_find(&f, "experts.gate_up_proj"));
    moe_tensor dn = moe_st_view(&f, moe_st_find(&f, "experts.down_proj"));
    const int64_t H = 41, I = 19;
    for (int l = 0; l < 3; l++)
        for (int64_t j = 0; j < 2 * I; j++)
            for (int64_t h = 0; h < H; h++)
                assert_true(elem(&w.w13, (size_t)((l * 2 * I + j) * H + h)) ==
                            elem(&gu, (size_t)(((2 + l) * H + h) * 2 * I + j)));
    for (int l = 0; l < 3; l++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < I; i++)
                assert_true(elem(&w.w2, (size_t)((l * H + h) * I + i)) ==
                            elem(&dn, (size_t)(((2 + l) * I + i) * H + h)));
    moe_st_close(&f);
    moe_weights_free(&w);
}

/* ---- random weights ---- */
static void check_random_formula(const moe_weights *w, uint64_t seed)
{
    const moe_config *c = &w->cfg;
    const int64_t H = c->hidden, I = c->inter, Is = c->shared_inter;
    const uint64_t b = (uint64_t)w->expert_begin;
    struct { const moe_tensor *t; const char *name; uint64_t off; double fan_in; } ts[] = {
        {&w->router, "router", 0, (double)H},
        {&w->w13, "w13", b * 2 * (uint64_t)(I * H), (double)H},
        {&w->w2, "w2", b * (uint64_t)(H * I), (double)I},
        {&w->shared_gate, "shared_gate", 0, (double)H},
        {&w->shared_up, "shared_up", 0, (double)H},
        {&w->shared_down, "shared_down", 0, (double)Is},
    };
    for (size_t k = 0; k < 6; k++) {
        if (!ts[k].t->data) {
            assert_true(Is == 0 && k >= 3);
            continue;
        }
        uint64_t stream = moe_rng_stream(seed, ts[k].name);
        size_t n = moe_tensor_numel(ts[k].t);
        for (size_t i = 0; i < n; i++) {
            double want = moe_round_to(w->dtype, moe_rng_normal(stream, ts[k].off + i) /
                                                     sqrt(ts[k].fan_in));
            double got = moe_load_elem(w->dtype, ts[k].t->data, i);
            if (got != want) fail_msg("%s[%zu] = %.9g, want %.9g", ts[k].name, i, got, want);
        }
    }
}

static void test_random(void **state)
{
    (void)state;
    const char *presets[] = {"tiny-qwen3", "tiny-llama4"};
    const moe_dtype dts[] = {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16};
    moe_error err = {0};
    for (int p = 0; p < 2; p++)
        for (int d = 0; d < 3; d++) {
            moe_config c;
            assert_int_equal(moe_config_preset(presets[p], &c, &err), MOE_OK);
            const int E = c.num_experts;
            moe_weights full;
            assert_int_equal(moe_weights_random(&c, g_seed, 0, E, dts[d], &full, &err), MOE_OK);
            assert_int_equal(full.naming, MOE_NAMING_RANDOM);
            assert_int_equal(full.bytes_read, 0);
            check_random_formula(&full, g_seed);
            /* every expert range is exactly the corresponding slice */
            for (int b = 0; b < E; b++)
                for (int n = 1; b + n <= E; n++) {
                    moe_weights w;
                    assert_int_equal(moe_weights_random(&c, g_seed, b, n, dts[d], &w, &err), MOE_OK);
                    size_t p13 = full.w13.nbytes / (size_t)E, p2 = full.w2.nbytes / (size_t)E;
                    assert_int_equal(w.w13.nbytes, (size_t)n * p13);
                    assert_memory_equal(w.w13.data, (uint8_t *)full.w13.data + (size_t)b * p13,
                                        (size_t)n * p13);
                    assert_memory_equal(w.w2.data, (uint8_t *)full.w2.data + (size_t)b * p2,
                                        (size_t)n * p2);
                    assert_memory_equal(w.router.data, full.router.data, full.router.nbytes);
                    if (c.shared_inter) {
                        assert_memory_equal(w.shared_gate.data, full.shared_gate.data,
                                            full.shared_gate.nbytes);
                        assert_memory_equal(w.shared_down.data, full.shared_down.data,
                                            full.shared_down.nbytes);
                    }
                    moe_weights_free(&w);
                }
            /* the thread count does not matter */
            int nt = omp_get_max_threads();
            omp_set_num_threads(3);
            moe_weights w3;
            assert_int_equal(moe_weights_random(&c, g_seed, 0, E, dts[d], &w3, &err), MOE_OK);
            omp_set_num_threads(nt);
            assert_memory_equal(w3.w13.data, full.w13.data, full.w13.nbytes);
            assert_memory_equal(w3.w2.data, full.w2.data, full.w2.nbytes);
            moe_weights_free(&w3);
            /* another seed gives other weights; the tensors are not copies of each other */
            moe_weights o;
            assert_int_equal(moe_weights_random(&c, g_seed + 1, 0, E, dts[d], &o, &err), MOE_OK);
            assert_memory_not_equal(o.w13.data, full.w13.data, full.w13.nbytes);
            assert_memory_not_equal(full.router.data, full.w13.data, full.router.nbytes);
            moe_weights_free(&o);
            moe_weights_free(&full);
        }
}

/* A real-size slice: one expert of Qwen3-30B-A3B, and its statistics (scale 1/sqrt(fan_in)). */
static void test_random_large_slice(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("qwen3-30b-a3b", &c, &err), MOE_OK);
    moe_weights w;
    double t0 = moe_now();
    assert_int_equal(moe_weights_random(&c, g_seed, 77, 1, MOE_NUM_DTYPES, &w, &err), MOE_OK);
    fprintf(stderr, "qwen3-30b-a3b expert 77: %.3f s\n", moe_now() - t0);
    assert_int_equal(w.dtype, MOE_DTYPE_BF16);
    const int64_t H = 2048, I = 768;
    uint64_t s13 = moe_rng_stream(g_seed, "w13"), s2 = moe_rng_stream(g_seed, "w2");
    for (size_t i = 0; i < (size_t)(2 * I * H); i += 997)
        assert_true(moe_load_elem(MOE_DTYPE_BF16, w.w13.data, i) ==
                    moe_round_to(MOE_DTYPE_BF16,
                                 moe_rng_normal(s13, (uint64_t)(77 * 2 * I * H) + i) / sqrt(2048.0)));
    double ss = 0;
    for (size_t i = 0; i < (size_t)(H * I); i++) {
        double v = moe_load_elem(MOE_DTYPE_BF16, w.w2.data, i);
        assert_true(v == moe_round_to(MOE_DTYPE_BF16,
                                      moe_rng_normal(s2, (uint64_t)(77 * H * I) + i) / sqrt(768.0)));
        ss += v * v;
    }
    double sd = sqrt(ss / (double)(H * I)) * sqrt(768.0);
    assert_true(fabs(sd - 1.0) < 0.01);
    moe_weights_free(&w);
}

static void test_random_args_and_zeros(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("tiny-llama4", &c, &err), MOE_OK);
    moe_weights w, z;
    assert_int_equal(moe_weights_random(&c, 1, 3, 3, MOE_DTYPE_F32, &w, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "E=5"));
    /* no expert at all is a valid slice (a rank of an expert map may own none) */
    assert_int_equal(moe_weights_random(&c, 1, 0, 0, MOE_DTYPE_F32, &w, &err), MOE_OK);
    assert_int_equal(w.w13.shape[0], 0);
    assert_non_null(w.router.data);
    moe_weights_free(&w);
    assert_int_equal(moe_weights_random(&c, 1, 0, 1, MOE_DTYPE_I64, &w, &err), MOE_ERR_INVALID_ARG);
    moe_config bad = c;
    bad.top_k = 9;
    assert_int_equal(moe_weights_random(&bad, 1, 0, 1, MOE_DTYPE_F32, &w, &err), MOE_ERR_INVALID_ARG);

    assert_int_equal(moe_weights_random(&c, g_seed, 1, 3, MOE_DTYPE_BF16, &w, &err), MOE_OK);
    assert_int_equal(moe_weights_zeros_like(&w, MOE_DTYPE_F64, &z, &err), MOE_OK);
    assert_int_equal(z.dtype, MOE_DTYPE_F64);
    assert_int_equal(z.expert_begin, 1);
    assert_int_equal(z.expert_count, 3);
    const moe_tensor *a[] = {&w.router, &w.w13, &w.w2, &w.shared_gate, &w.shared_up, &w.shared_down};
    const moe_tensor *b[] = {&z.router, &z.w13, &z.w2, &z.shared_gate, &z.shared_up, &z.shared_down};
    for (int k = 0; k < 6; k++) {
        assert_int_equal(a[k]->ndim, b[k]->ndim);
        for (int d = 0; d < a[k]->ndim; d++) assert_int_equal(a[k]->shape[d], b[k]->shape[d]);
        for (size_t i = 0; i < moe_tensor_numel(b[k]); i++)
            assert_true(((double *)b[k]->data)[i] == 0.0);
    }
    moe_weights_free(&z);
    assert_int_equal(moe_weights_zeros_like(&w, MOE_NUM_DTYPES, &z, &err), MOE_OK);
    assert_int_equal(z.dtype, MOE_DTYPE_BF16);
    moe_weights_free(&z);
    moe_weights_free(&w);
}

/* ---- gradients ---- */

/* Fill every canonical tensor of g with val("grad:<tensor>", i). */
static void fill_grads(moe_weights *g)
{
    struct { moe_tensor *t; const char *n; } ts[] = {
        {&g->router, "grad:router"}, {&g->w13, "grad:w13"}, {&g->w2, "grad:w2"},
        {&g->shared_gate, "grad:sg"}, {&g->shared_up, "grad:su"}, {&g->shared_down, "grad:sd"}};
    for (int k = 0; k < 6; k++)
        for (size_t i = 0; ts[k].t->data && i < moe_tensor_numel(ts[k].t); i++)
            moe_store_elem(ts[k].t->dtype, ts[k].t->data, i, val(ts[k].n, i));
}

/* Expect tensor `name` in f with the shape, and element i == want(i). Returns the entry. */
static const moe_st_entry *expect_tensor(const moe_st_file *f, const char *name, int ndim,
                                         const int64_t *shape)
{
    const moe_st_entry *e = moe_st_find(f, name);
    if (!e) fail_msg("gradient file lacks '%s'", name);
    assert_int_equal(e->ndim, ndim);
    for (int d = 0; d < ndim; d++) assert_int_equal(e->shape[d], shape[d]);
    return e;
}

static void check_grad_file(const char *path, const moe_weights *like, const moe_weights *g,
                            const moe_tensor *dx)
{
    moe_st_file f;
    moe_error err = {0};
    assert_int_equal(moe_st_open(path, &f, &err), MOE_OK);
    const int64_t H = like->cfg.hidden, I = like->cfg.inter, Is = like->cfg.shared_inter;
    const int64_t E = like->cfg.num_experts;
    const int b = like->expert_begin, n = like->expert_count;
    const char *p = like->prefix;
    char name[600];
    int expected = 1; /* grad.hidden_states */
    const moe_st_entry *e = expect_tensor(&f, "grad.hidden_states", dx->ndim, dx->shape);
    moe_tensor v = moe_st_view(&f, e);
    for (size_t i = 0; i < moe_tensor_numel(dx); i++)
        assert_true(elem(&v, i) == moe_load_elem(dx->dtype, dx->data, i));
    const int64_t shr[2] = {E, H};
    /* router and shared expert: same layout under the loaded name */
    const char *rn = like->naming == MOE_NAMING_RANDOM ? "router"
                     : like->naming == MOE_NAMING_LLAMA4 ? "router.weight" : "gate.weight";
    snprintf(name, sizeof name, "grad.%s%s", p, rn);
    v = moe_st_view(&f, expect_tensor(&f, name, 2, shr));
    for (size_t i = 0; i < (size_t)(E * H); i++)
        assert_true(elem(&v, i) == moe_load_elem(g->dtype, g->router.data, i));
    expected++;
    if (Is > 0) {
        const char *sn[3][2] = {{"shared_gate", "shared_expert.gate_proj.weight"},
                                {"shared_up", "shared_expert.up_proj.weight"},
                                {"shared_down", "shared_expert.down_proj.weight"}};
        const moe_tensor *st[3] = {&g->shared_gate, &g->shared_up, &g->shared_down};
        for (int k = 0; k < 3; k++) {
            snprintf(name, sizeof name, "grad.%s%s", p,
                     sn[k][like->naming == MOE_NAMING_RANDOM ? 0 : 1]);
            v = moe_st_view(&f, expect_tensor(&f, name, 2, st[k]->shape));
            for (size_t i = 0; i < moe_tensor_numel(st[k]); i++)
                assert_true(elem(&v, i) == moe_load_elem(g->dtype, st[k]->data, i));
            expected++;
        }
    }
    /* experts: check every element through the HF index formula */
#define G13(l, j, h) moe_load_elem(g->dtype, g->w13.data, (size_t)(((l) * 2 * I + (j)) * H + (h)))
#define G2(l, h, i) moe_load_elem(g->dtype, g->w2.data, (size_t)(((l) * H + (h)) * I + (i)))
    if (like->naming == MOE_NAMING_QWEN3_PER_EXPERT) {
        const int64_t sih[2] = {I, H}, shi[2] = {H, I};
        for (int l = 0; l < n; l++) {
            moe_tensor gt, ut, dt;
            snprintf(name, sizeof name, "grad.%sexperts.%d.gate_proj.weight", p, b + l);
            gt = moe_st_view(&f, expect_tensor(&f, name, 2, sih));
            snprintf(name, sizeof name, "grad.%sexperts.%d.up_proj.weight", p, b + l);
            ut = moe_st_view(&f, expect_tensor(&f, name, 2, sih));
            snprintf(name, sizeof name, "grad.%sexperts.%d.down_proj.weight", p, b + l);
            dt = moe_st_view(&f, expect_tensor(&f, name, 2, shi));
            for (int64_t j = 0; j < I; j++)
                for (int64_t h = 0; h < H; h++) {
                    assert_true(elem(&gt, (size_t)(j * H + h)) == G13(l, j, h));
                    assert_true(elem(&ut, (size_t)(j * H + h)) == G13(l, I + j, h));
                    assert_true(elem(&dt, (size_t)(h * I + j)) == G2(l, h, j));
                }
            expected += 3;
        }
        /* no gradient of a non-local expert */
        snprintf(name, sizeof name, "grad.%sexperts.%d.gate_proj.weight", p, b + n);
        assert_null(moe_st_find(&f, name));
    } else {
        const bool llama = like->naming == MOE_NAMING_LLAMA4;
        const int64_t s13[3] = {n, llama ? H : 2 * I, llama ? 2 * I : H};
        const int64_t s2[3] = {n, llama ? I : H, llama ? H : I};
        snprintf(name, sizeof name, "grad.%s%s", p,
                 like->naming == MOE_NAMING_RANDOM ? "w13" : "experts.gate_up_proj");
        moe_tensor t13 = moe_st_view(&f, expect_tensor(&f, name, 3, s13));
        snprintf(name, sizeof name, "grad.%s%s", p,
                 like->naming == MOE_NAMING_RANDOM ? "w2" : "experts.down_proj");
        moe_tensor t2 = moe_st_view(&f, expect_tensor(&f, name, 3, s2));
        for (int l = 0; l < n; l++)
            for (int64_t j = 0; j < 2 * I; j++)
                for (int64_t h = 0; h < H; h++) {
                    size_t at = llama ? (size_t)((l * H + h) * 2 * I + j)
                                      : (size_t)((l * 2 * I + j) * H + h);
                    assert_true(elem(&t13, at) == G13(l, j, h));
                }
        for (int l = 0; l < n; l++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = 0; i < I; i++) {
                    size_t at = llama ? (size_t)((l * I + i) * H + h)
                                      : (size_t)((l * H + h) * I + i);
                    assert_true(elem(&t2, at) == G2(l, h, i));
                }
        expected += 2;
    }
#undef G13
#undef G2
    assert_int_equal(f.count, expected);
    moe_st_close(&f);
}

static void grads_case(moe_weights *like, moe_dtype gdt)
{
    moe_error err = {0};
    moe_weights g;
    assert_int_equal(moe_weights_zeros_like(like, gdt, &g, &err), MOE_OK);
    fill_grads(&g);
    moe_tensor dx;
    assert_int_equal(moe_tensor_alloc2(&dx, gdt, 4, like->cfg.hidden, &err), MOE_OK);
    for (size_t i = 0; i < moe_tensor_numel(&dx); i++) moe_store_elem(gdt, dx.data, i, val("dx", i));
    char path[512];
    path_in_dir(path, sizeof path, "grads.safetensors");
    moe_status st = moe_weights_write_grads(like, &g, &dx, path, &err);
    if (st != MOE_OK) fprintf(stderr, "write_grads: %s\n", err.msg);
    assert_int_equal(st, MOE_OK);
    check_grad_file(path, like, &g, &dx);
    unlink(path);
    moe_tensor_free(&dx);
    moe_weights_free(&g);
}

static void test_write_grads(void **state)
{
    (void)state;
    moe_config cq, cl;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("tiny-qwen3", &cq, &err), MOE_OK);
    assert_int_equal(moe_config_preset("tiny-llama4", &cl, &err), MOE_OK);
    moe_weights w;
    /* random: canonical names */
    assert_int_equal(moe_weights_random(&cq, g_seed, 2, 3, MOE_DTYPE_BF16, &w, &err), MOE_OK);
    grads_case(&w, MOE_DTYPE_F32);
    moe_weights_free(&w);
    assert_int_equal(moe_weights_random(&cl, g_seed, 0, 5, MOE_DTYPE_F32, &w, &err), MOE_OK);
    grads_case(&w, MOE_DTYPE_F32);
    moe_weights_free(&w);

    /* loaded: each naming, with a layer prefix and a local slice */
    static tspec specs[MAX_SPECS];
    char path[512];
    path_in_dir(path, sizeof path, "like.safetensors");
    const struct { moe_config *c; moe_weight_naming nm; const char *pre; int layer, b, n; } cases[] = {
        {&cq, MOE_NAMING_QWEN3_PER_EXPERT, "model.layers.4.mlp.", 4, 2, 3},
        {&cq, MOE_NAMING_QWEN3_FUSED, "", -1, 3, 4},
        {&cq, MOE_NAMING_QWEN3_FUSED, "model.layers.0.mlp.", 0, 0, 7},
        {&cl, MOE_NAMING_LLAMA4, "language_model.model.layers.2.feed_forward.", 2, 1, 3},
        {&cl, MOE_NAMING_LLAMA4, "model.layers.2.feed_forward.", 2, 0, 5},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int n = hf_specs(cases[k].c, cases[k].nm, cases[k].pre, specs);
        write_specs(path, specs, n, MOE_DTYPE_F32);
        assert_int_equal(moe_weights_load(cases[k].c, path, cases[k].layer, cases[k].b, cases[k].n,
                                          MOE_DTYPE_F32, &w, &err), MOE_OK);
        grads_case(&w, MOE_DTYPE_F32);
        grads_case(&w, MOE_DTYPE_BF16);
        moe_weights_free(&w);
    }
    unlink(path);
}

/* Writing the loaded weights themselves as "gradients" must give back the checkpoint's own
 * tensors under "grad." + name, byte for byte (the inverse of every load transform). */
static void test_write_grads_inverts_load(void **state)
{
    (void)state;
    const char *presets[] = {"tiny-qwen3", "tiny-qwen3", "tiny-llama4"};
    const moe_weight_naming nms[] = {MOE_NAMING_QWEN3_PER_EXPERT, MOE_NAMING_QWEN3_FUSED,
                                     MOE_NAMING_LLAMA4};
    moe_error err = {0};
    static tspec specs[MAX_SPECS];
    char path[512], gpath[512];
    path_in_dir(path, sizeof path, "inv.safetensors");
    path_in_dir(gpath, sizeof gpath, "inv_grads.safetensors");
    for (int k = 0; k < 3; k++) {
        moe_config c;
        assert_int_equal(moe_config_preset(presets[k], &c, &err), MOE_OK);
        const char *pre = "model.layers.1.feed_forward.";
        int n = hf_specs(&c, nms[k], pre, specs);
        write_specs(path, specs, n, MOE_DTYPE_BF16);
        moe_weights w;
        assert_int_equal(moe_weights_load(&c, path, 1, 0, c.num_experts, MOE_DTYPE_BF16, &w, &err),
                         MOE_OK);
        assert_int_equal(moe_weights_write_grads(&w, &w, NULL, gpath, &err), MOE_OK);
        moe_st_file src, gf;
        assert_int_equal(moe_st_open(path, &src, &err), MOE_OK);
        assert_int_equal(moe_st_open(gpath, &gf, &err), MOE_OK);
        assert_int_equal(gf.count, src.count); /* no dx given: no grad.hidden_states */
        for (int i = 0; i < src.count; i++) {
            char gname[600];
            snprintf(gname, sizeof gname, "grad.%s", src.entries[i].name);
            const moe_st_entry *ge = moe_st_find(&gf, gname);
            if (!ge) fail_msg("no %s", gname);
            moe_tensor a = moe_st_view(&src, &src.entries[i]), b = moe_st_view(&gf, ge);
            assert_int_equal(a.ndim, b.ndim);
            for (int d = 0; d < a.ndim; d++) assert_int_equal(a.shape[d], b.shape[d]);
            assert_int_equal(a.nbytes, b.nbytes);
            assert_memory_equal(a.data, b.data, a.nbytes);
        }
        moe_st_close(&src);
        moe_st_close(&gf);
        moe_weights_free(&w);
    }
    unlink(path);
    unlink(gpath);
}

/* The gradient names match those HF itself produced for the fixtures (io.safetensors holds
 * "grad.<param>" from the PyTorch backward). */
static void test_grad_names_match_hf(void **state)
{
    (void)state;
    const char *dirs[] = {"qwen3_norm_fp32", "llama4_k1_fp32"};
    moe_error err = {0};
    for (int d = 0; d < 2; d++) {
        char dir[512], wp[600], io[600], gp[512];
        snprintf(dir, sizeof dir, MOE_FIXTURE_DIR "/hf/%s", dirs[d]);
        snprintf(wp, sizeof wp, "%s/weights.safetensors", dir);
        snprintf(io, sizeof io, "%s/io.safetensors", dir);
        path_in_dir(gp, sizeof gp, "hfnames.safetensors");
        moe_config c;
        assert_int_equal(moe_config_resolve(dir, &c, &err), MOE_OK);
        moe_weights w;
        assert_int_equal(moe_weights_load(&c, wp, -1, 0, c.num_experts, MOE_DTYPE_F32, &w, &err),
                         MOE_OK);
        moe_st_file hf, mine;
        assert_int_equal(moe_st_open(io, &hf, &err), MOE_OK);
        const moe_st_entry *hx = moe_st_find(&hf, "grad.hidden_states");
        assert_non_null(hx);
        moe_tensor dx = moe_st_view(&hf, hx);
        assert_int_equal(moe_weights_write_grads(&w, &w, &dx, gp, &err), MOE_OK);
        assert_int_equal(moe_st_open(gp, &mine, &err), MOE_OK);
        int hf_grads = 0;
        for (int i = 0; i < hf.count; i++) {
            if (strncmp(hf.entries[i].name, "grad.", 5) != 0) continue;
            hf_grads++;
            const moe_st_entry *m = moe_st_find(&mine, hf.entries[i].name);
            if (!m) fail_msg("HF gradient '%s' not written by write_grads", hf.entries[i].name);
            assert_int_equal(m->ndim, hf.entries[i].ndim);
            for (int k = 0; k < m->ndim; k++) assert_int_equal(m->shape[k], hf.entries[i].shape[k]);
        }
        assert_int_equal(mine.count, hf_grads);
        moe_st_close(&mine);
        moe_st_close(&hf);
        moe_weights_free(&w);
        unlink(gp);
    }
}

static void test_write_grads_errors(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("tiny-qwen3", &c, &err), MOE_OK);
    moe_weights w, g;
    assert_int_equal(moe_weights_random(&c, g_seed, 0, 3, MOE_DTYPE_F32, &w, &err), MOE_OK);
    assert_int_equal(moe_weights_random(&c, g_seed, 0, 4, MOE_DTYPE_F32, &g, &err), MOE_OK);
    char path[512];
    path_in_dir(path, sizeof path, "bad_grads.safetensors");
    assert_int_equal(moe_weights_write_grads(&w, &g, NULL, path, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "w13"));
    moe_weights_free(&g);
    assert_int_equal(moe_weights_zeros_like(&w, MOE_DTYPE_F32, &g, &err), MOE_OK);
    moe_tensor dx;
    assert_int_equal(moe_tensor_alloc2(&dx, MOE_DTYPE_F32, 3, c.hidden + 1, &err), MOE_OK);
    assert_int_equal(moe_weights_write_grads(&w, &g, &dx, path, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "dx"));
    moe_tensor_free(&dx);
    assert_int_equal(moe_weights_write_grads(&w, &g, NULL, "/nonexistent-dir/x.safetensors", &err),
                     MOE_ERR_IO);
    moe_weights_free(&g);
    moe_weights_free(&w);
    assert_int_equal(access(path, F_OK), -1);
}

static int setup(void **state)
{
    (void)state;
    g_seed = moe_test_seed();
    snprintf(g_dir, sizeof g_dir, "/tmp/moe_test_weights_XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    rmdir(g_dir); /* every test unlinks its files; a failed one leaves them for inspection */
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_random_large_slice),
        cmocka_unit_test(test_random_args_and_zeros),
        cmocka_unit_test(test_load_qwen3_per_expert),
        cmocka_unit_test(test_load_qwen3_fused),
        cmocka_unit_test(test_load_llama4),
        cmocka_unit_test(test_load_default_dtype),
        cmocka_unit_test(test_load_sharded),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_hf_fixture_weights),
        cmocka_unit_test(test_write_grads),
        cmocka_unit_test(test_write_grads_inverts_load),
        cmocka_unit_test(test_grad_names_match_hf),
        cmocka_unit_test(test_write_grads_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
