/*
 * config.c — MoE block configurations: built-in presets and HF config.json parsing (cJSON).
 *
 * Which HF fields are read (everything else in the file is ignored):
 *   qwen3_moe    hidden_size, moe_intermediate_size (NOT intermediate_size, the dense MLP width),
 *                num_experts (hub) or num_local_experts (transformers 5 re-save),
 *                num_experts_per_tok, norm_topk_prob (absent = false, Qwen3MoeConfig's default),
 *                torch_dtype or dtype, num_hidden_layers (optional)
 *   llama4_text  hidden_size, intermediate_size (routed expert width AND shared expert width;
 *                NOT intermediate_size_mlp, the dense layers' width), num_local_experts,
 *                num_experts_per_tok, torch_dtype or dtype, num_hidden_layers (optional)
 *   llama4       the llama4_text fields under "text_config"; the dtype may be at the top level
 *                or inside text_config (text_config wins when both are present).
 * An absent dtype means fp32 (what transformers loads when a config names none).
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "dtype.h"

/* Upper bounds that keep every derived size (E*2I*H elements, times 8 bytes) far inside int64
 * and size_t, while being generous for any real model (Scout: H=5120, I=8192, E=16). */
#define MOE_CFG_MAX_DIM (1 << 20)     /* H, I, shared_inter */
#define MOE_CFG_MAX_EXPERTS (1 << 16) /* E */
#define MOE_CFG_MAX_W13_ELEMS ((int64_t)1 << 40)

const char *const moe_preset_names[] = {"qwen3-30b-a3b", "llama4-scout", "tiny-qwen3",
                                        "tiny-llama4", NULL};

static void set_name(moe_config *c, const char *name)
{
    snprintf(c->name, sizeof c->name, "%s", name);
}

moe_status moe_config_preset(const char *name, moe_config *out, moe_error *err)
{
    if (!name || !out) return moe_fail(err, MOE_ERR_INVALID_ARG, "config preset: NULL argument");
    moe_config c;
    memset(&c, 0, sizeof c);
    if (strcmp(name, "qwen3-30b-a3b") == 0) {
        c.arch = MOE_ARCH_QWEN3;
        c.hidden = 2048;
        c.inter = 768; /* moe_intermediate_size */
        c.num_experts = 128;
        c.top_k = 8;
        c.norm_topk_prob = true;
        c.shared_inter = 0;
        c.dtype = MOE_DTYPE_BF16;
        c.num_layers = 48;
    } else if (strcmp(name, "llama4-scout") == 0) {
        c.arch = MOE_ARCH_LLAMA4;
        c.hidden = 5120;
        c.inter = 8192;
        c.num_experts = 16;
        c.top_k = 1;
        c.shared_inter = 8192;
        c.dtype = MOE_DTYPE_BF16;
        c.num_layers = 48;
    } else if (strcmp(name, "tiny-qwen3") == 0) {
        /* Small, odd and pairwise different sizes: a transposed or swapped weight cannot have
         * the right shape by accident. */
        c.arch = MOE_ARCH_QWEN3;
        c.hidden = 37;
        c.inter = 23;
        c.num_experts = 7;
        c.top_k = 3;
        c.norm_topk_prob = true;
        c.dtype = MOE_DTYPE_F32;
        c.num_layers = 1;
    } else if (strcmp(name, "tiny-llama4") == 0) {
        c.arch = MOE_ARCH_LLAMA4;
        c.hidden = 41;
        c.inter = 19;
        c.num_experts = 5;
        c.top_k = 1;
        c.shared_inter = 19;
        c.dtype = MOE_DTYPE_F32;
        c.num_layers = 1;
    } else {
        char list[256] = "";
        for (int i = 0; moe_preset_names[i]; i++) {
            strncat(list, i ? ", " : "", sizeof list - strlen(list) - 1);
            strncat(list, moe_preset_names[i], sizeof list - strlen(list) - 1);
        }
        return moe_fail(err, MOE_ERR_INVALID_ARG, "unknown config preset '%s' (presets: %s)", name,
                        list);
    }
    set_name(&c, name);
    *out = c;
    return MOE_OK;
}

/* ---- JSON helpers. `src` names the file (or "<text>") in every message. ---- */

/* A required positive integer field of obj; `where` is "" or "text_config." for messages. */
static moe_status get_int(const cJSON *obj, const char *field, const char *where, const char *src,
                          int *out, moe_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, field);
    if (!v || cJSON_IsNull(v))
        return moe_fail(err, MOE_ERR_FORMAT, "%s: missing field '%s%s'", src, where, field);
    if (!cJSON_IsNumber(v))
        return moe_fail(err, MOE_ERR_FORMAT, "%s: field '%s%s' is not a number", src, where,
                        field);
    double d = v->valuedouble;
    if (!(d >= 1 && d <= (double)INT32_MAX) || d != (double)(int64_t)d)
        return moe_fail(err, MOE_ERR_FORMAT, "%s: field '%s%s' = %g is not a positive integer",
                        src, where, field, d);
    *out = (int)d;
    return MOE_OK;
}

/* Optional integer: *found=false when absent (or null). */
static moe_status get_int_opt(const cJSON *obj, const char *field, const char *where,
                              const char *src, int *out, bool *found, moe_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, field);
    *found = false;
    if (!v || cJSON_IsNull(v)) return MOE_OK;
    *found = true;
    return get_int(obj, field, where, src, out, err);
}

/* dtype from "torch_dtype" (transformers 4) or "dtype" (transformers 5) in obj.
 * *found = false when neither is present. */
static moe_status get_dtype(const cJSON *obj, const char *where, const char *src, moe_dtype *out,
                            bool *found, moe_error *err)
{
    static const char *const keys[] = {"torch_dtype", "dtype"};
    *found = false;
    if (!obj) return MOE_OK;
    for (size_t i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, keys[i]);
        if (!v || cJSON_IsNull(v)) continue;
        if (!cJSON_IsString(v))
            return moe_fail(err, MOE_ERR_FORMAT, "%s: field '%s%s' is not a string", src, where,
                            keys[i]);
        const char *s = v->valuestring;
        /* HF spells these "bfloat16"/"float16"/"float32"; accept the torch. prefix too. */
        if (strncmp(s, "torch.", 6) == 0) s += 6;
        moe_dtype d;
        if (!moe_dtype_parse(s, &d) || d == MOE_DTYPE_F64)
            return moe_fail(err, MOE_ERR_UNSUPPORTED,
                            "%s: field '%s%s' = \"%s\" (supported: bfloat16, float16, float32)",
                            src, where, keys[i], v->valuestring);
        *out = d;
        *found = true;
        return MOE_OK;
    }
    return MOE_OK;
}

static moe_status get_bool_opt(const cJSON *obj, const char *field, const char *src, bool *out,
                               moe_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, field);
    if (!v || cJSON_IsNull(v)) return MOE_OK; /* keep the default */
    if (!cJSON_IsBool(v))
        return moe_fail(err, MOE_ERR_FORMAT, "%s: field '%s' is not a boolean", src, field);
    *out = cJSON_IsTrue(v);
    return MOE_OK;
}

static moe_status parse_qwen3(const cJSON *root, const char *src, moe_config *c, moe_error *err)
{
    c->arch = MOE_ARCH_QWEN3;
    MOE_TRY(get_int(root, "hidden_size", "", src, &c->hidden, err));
    MOE_TRY(get_int(root, "moe_intermediate_size", "", src, &c->inter, err));
    /* The hub spells the expert count num_experts; transformers 5 re-saves it as
     * num_local_experts. */
    bool found = false;
    MOE_TRY(get_int_opt(root, "num_experts", "", src, &c->num_experts, &found, err));
    if (!found) {
        MOE_TRY(get_int_opt(root, "num_local_experts", "", src, &c->num_experts, &found, err));
        if (!found)
            return moe_fail(err, MOE_ERR_FORMAT,
                            "%s: missing field 'num_experts' (or 'num_local_experts')", src);
    }
    MOE_TRY(get_int(root, "num_experts_per_tok", "", src, &c->top_k, err));
    c->norm_topk_prob = false; /* Qwen3MoeConfig's default */
    MOE_TRY(get_bool_opt(root, "norm_topk_prob", src, &c->norm_topk_prob, err));
    c->shared_inter = 0; /* Qwen3MoeSparseMoeBlock has no shared expert */
    c->dtype = MOE_DTYPE_F32;
    MOE_TRY(get_dtype(root, "", src, &c->dtype, &found, err));
    MOE_TRY(get_int_opt(root, "num_hidden_layers", "", src, &c->num_layers, &found, err));
    return MOE_OK;
}

/* text: the Llama4TextConfig object; top: the enclosing Llama4Config (NULL for llama4_text). */
static moe_status parse_llama4(const cJSON *text, const cJSON *top, const char *src,
                               moe_config *c, moe_error *err)
{
    const char *where = top ? "text_config." : "";
    c->arch = MOE_ARCH_LLAMA4;
    MOE_TRY(get_int(text, "hidden_size", where, src, &c->hidden, err));
    /* intermediate_size is both the routed experts' and the shared expert's width;
     * intermediate_size_mlp belongs to the dense (non-MoE) layers and is ignored. */
    MOE_TRY(get_int(text, "intermediate_size", where, src, &c->inter, err));
    c->shared_inter = c->inter;
    MOE_TRY(get_int(text, "num_local_experts", where, src, &c->num_experts, err));
    MOE_TRY(get_int(text, "num_experts_per_tok", where, src, &c->top_k, err));
    c->norm_topk_prob = false;
    bool found = false;
    c->dtype = MOE_DTYPE_F32;
    MOE_TRY(get_dtype(text, where, src, &c->dtype, &found, err));
    if (!found && top) MOE_TRY(get_dtype(top, "", src, &c->dtype, &found, err));
    MOE_TRY(get_int_opt(text, "num_hidden_layers", where, src, &c->num_layers, &found, err));
    return MOE_OK;
}

static moe_status parse_root(const cJSON *root, const char *src, moe_config *out, moe_error *err)
{
    if (!cJSON_IsObject(root))
        return moe_fail(err, MOE_ERR_FORMAT, "%s: the top level is not a JSON object", src);
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (!mt || cJSON_IsNull(mt))
        return moe_fail(err, MOE_ERR_FORMAT, "%s: missing field 'model_type'", src);
    if (!cJSON_IsString(mt))
        return moe_fail(err, MOE_ERR_FORMAT, "%s: field 'model_type' is not a string", src);
    moe_config c;
    memset(&c, 0, sizeof c);
    const char *type = mt->valuestring;
    if (strcmp(type, "qwen3_moe") == 0) {
        MOE_TRY(parse_qwen3(root, src, &c, err));
    } else if (strcmp(type, "llama4_text") == 0) {
        MOE_TRY(parse_llama4(root, NULL, src, &c, err));
    } else if (strcmp(type, "llama4") == 0) {
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(root, "text_config");
        if (!text || cJSON_IsNull(text))
            return moe_fail(err, MOE_ERR_FORMAT, "%s: missing field 'text_config'", src);
        if (!cJSON_IsObject(text))
            return moe_fail(err, MOE_ERR_FORMAT, "%s: field 'text_config' is not an object", src);
        MOE_TRY(parse_llama4(text, root, src, &c, err));
    } else {
        return moe_fail(err, MOE_ERR_FORMAT,
                        "%s: model_type '%s' is not a supported MoE block "
                        "(supported: qwen3_moe, llama4_text, llama4)",
                        src, type);
    }
    set_name(&c, type);
    moe_status st = moe_config_validate(&c, err);
    if (st != MOE_OK) return moe_error_prefix(err, "%s", src);
    *out = c;
    return MOE_OK;
}

static moe_status parse_text(const char *text, const char *src, moe_config *out, moe_error *err)
{
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 0);
    if (!root) {
        size_t at = end ? (size_t)(end - text) : 0;
        return moe_fail(err, MOE_ERR_FORMAT, "%s: invalid JSON near byte %zu", src, at);
    }
    moe_status st = parse_root(root, src, out, err);
    cJSON_Delete(root);
    return st;
}

moe_status moe_config_from_json_text(const char *text, moe_config *out, moe_error *err)
{
    if (!text || !out) return moe_fail(err, MOE_ERR_INVALID_ARG, "config: NULL argument");
    return parse_text(text, "<config text>", out, err);
}

/* Config files are a few KiB; anything past this is not a config.json. */
#define MOE_CFG_MAX_FILE (16u << 20)

moe_status moe_config_from_json_file(const char *path, moe_config *out, moe_error *err)
{
    if (!path || !out) return moe_fail(err, MOE_ERR_INVALID_ARG, "config: NULL argument");
    FILE *fp = fopen(path, "rb");
    if (!fp) return moe_fail(err, MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char *buf = NULL;
    moe_status st = MOE_OK;
    if (fseek(fp, 0, SEEK_END) != 0) {
        st = moe_fail(err, MOE_ERR_IO, "%s: cannot seek: %s", path, strerror(errno));
        goto done;
    }
    long len = ftell(fp);
    if (len < 0 || (unsigned long)len > MOE_CFG_MAX_FILE) {
        st = moe_fail(err, len < 0 ? MOE_ERR_IO : MOE_ERR_FORMAT,
                      "%s: size %ld is not that of a config.json (limit %u bytes)", path, len,
                      MOE_CFG_MAX_FILE);
        goto done;
    }
    rewind(fp);
    buf = moe_malloc((size_t)len + 1, "config.json text", err);
    if (!buf) { st = MOE_ERR_NOMEM; goto done; }
    if (fread(buf, 1, (size_t)len, fp) != (size_t)len) {
        st = moe_fail(err, MOE_ERR_IO, "%s: short read", path);
        goto done;
    }
    buf[len] = '\0';
    st = parse_text(buf, path, out, err);
done:
    free(buf);
    fclose(fp);
    return st;
}

moe_status moe_config_resolve(const char *preset_or_path, moe_config *out, moe_error *err)
{
    if (!preset_or_path || !out)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "config: NULL argument");
    for (int i = 0; moe_preset_names[i]; i++)
        if (strcmp(preset_or_path, moe_preset_names[i]) == 0)
            return moe_config_preset(preset_or_path, out, err);
    struct stat sb;
    if (stat(preset_or_path, &sb) != 0) {
        char list[256] = "";
        for (int i = 0; moe_preset_names[i]; i++) {
            strncat(list, i ? ", " : "", sizeof list - strlen(list) - 1);
            strncat(list, moe_preset_names[i], sizeof list - strlen(list) - 1);
        }
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "config '%s' is neither a preset (%s) nor an existing file", preset_or_path,
                        list);
    }
    if (S_ISDIR(sb.st_mode)) {
        /* A model directory: its config.json. */
        char p[4096];
        int n = snprintf(p, sizeof p, "%s/config.json", preset_or_path);
        if (n < 0 || (size_t)n >= sizeof p)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "config path too long: %s", preset_or_path);
        return moe_config_from_json_file(p, out, err);
    }
    return moe_config_from_json_file(preset_or_path, out, err);
}

moe_status moe_config_validate(const moe_config *c, moe_error *err)
{
    if (!c) return moe_fail(err, MOE_ERR_INVALID_ARG, "config: NULL");
    if (c->arch != MOE_ARCH_QWEN3 && c->arch != MOE_ARCH_LLAMA4)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "config: arch %d unknown", (int)c->arch);
    if (c->hidden < 1 || c->hidden > MOE_CFG_MAX_DIM)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "config: hidden size H=%d outside 1..%d",
                        c->hidden, MOE_CFG_MAX_DIM);
    if (c->inter < 1 || c->inter > MOE_CFG_MAX_DIM)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "config: expert intermediate size I=%d outside 1..%d", c->inter,
                        MOE_CFG_MAX_DIM);
    if (c->num_experts < 1 || c->num_experts > MOE_CFG_MAX_EXPERTS)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "config: number of experts E=%d outside 1..%d",
                        c->num_experts, MOE_CFG_MAX_EXPERTS);
    if (c->top_k < 1 || c->top_k > c->num_experts)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "config: top-k k=%d outside 1..E (E=%d)",
                        c->top_k, c->num_experts);
    if (c->arch == MOE_ARCH_QWEN3 && c->shared_inter != 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "config: Qwen3-MoE has no shared expert, but shared_inter=%d",
                        c->shared_inter);
    if (c->arch == MOE_ARCH_LLAMA4 && (c->shared_inter < 1 || c->shared_inter > MOE_CFG_MAX_DIM))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "config: Llama-4 shared expert width %d outside 1..%d", c->shared_inter,
                        MOE_CFG_MAX_DIM);
    if (c->arch == MOE_ARCH_LLAMA4 && c->norm_topk_prob)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "config: norm_topk_prob is a Qwen3 option; Llama-4 uses sigmoid scores");
    if (c->dtype != MOE_DTYPE_BF16 && c->dtype != MOE_DTYPE_F16 && c->dtype != MOE_DTYPE_F32 &&
        c->dtype != MOE_DTYPE_F64)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "config: dtype %d is not bf16/fp16/fp32/fp64",
                        (int)c->dtype);
    if (c->num_layers < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "config: num_layers=%d is negative",
                        c->num_layers);
    /* The largest tensor, w13 [E,2I,H], must stay addressable with room for 8-byte elements. */
    int64_t w13 = (int64_t)c->num_experts * 2 * (int64_t)c->inter * (int64_t)c->hidden;
    if (w13 > MOE_CFG_MAX_W13_ELEMS)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "config: E*2I*H = %lld elements exceeds the limit %lld", (long long)w13,
                        (long long)MOE_CFG_MAX_W13_ELEMS);
    if (memchr(c->name, '\0', sizeof c->name) == NULL)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "config: name is not terminated");
    return MOE_OK;
}
