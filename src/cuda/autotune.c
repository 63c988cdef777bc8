/*
 * autotune.c — see autotune.h. Times every compiled configuration of the grouped GEMM on the
 * real problem and keeps the fastest in a JSON cache:
 *   { "version": 2,
 *     "entries": { "<key>": { "config": "128x256x64,w12,s3,tma,staged,acp", "ms": 0.123,
 *                             "candidates": 9, "version": 2 } } }
 * An entry without "version": 2 was tuned before the wgmma kernels' epilogue / A-load options
 * were candidates (its ",tma" configuration names no options): it counts as a miss and is
 * re-tuned and replaced.
 */
#include "autotune.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernel_config.h"
#include "kernel_launch.h"

#define AT_REPS 5
#define AT_VERSION 2

static bool quiet(void);

/* ---- keys ---- */

static moe_status gpu_name(char *buf, size_t len, moe_error *err)
{
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    struct cudaDeviceProp prop;
    if (e == cudaSuccess) e = cudaGetDeviceProperties(&prop, dev);
    if (e != cudaSuccess)
        return moe_fail(err, MOE_ERR_CUDA, "autotune: cannot query the current GPU: %s",
                        cudaGetErrorString(e));
    snprintf(buf, len, "%s", prop.name);
    return MOE_OK;
}

static moe_status make_key(const char *kernel, moe_dtype dt, int N, int K, int max_rows, int E,
                           int topk, const char *flags, char *buf, size_t len, moe_error *err)
{
    char gpu[256];
    MOE_TRY(gpu_name(gpu, sizeof gpu, err));
    int w = snprintf(buf, len, "%s|%s|%s|N=%d,K=%d,rows=%d,E=%d,topk=%d|%s", gpu,
                     moe_dtype_name(dt) ? moe_dtype_name(dt) : "?", kernel, N, K, max_rows, E, topk,
                     flags[0] ? flags : "-");
    if (w < 0 || (size_t)w >= len)
        return moe_fail(err, MOE_ERR_INTERNAL, "autotune: key buffer too small (%zu)", len);
    return MOE_OK;
}

static void add_flag(char *f, size_t len, bool on, const char *name)
{
    if (!on) return;
    size_t n = strlen(f);
    snprintf(f + n, len - n, "%s%s", n ? "," : "", name);
}

/* The key of a forward/dX problem; exact: timed with exact_hf_rounding, which changes the
 * kernel only with scale_a_rows or SiLU (flag "exact_hf" there). */
static moe_status key_fwd(const moe_grouped_gemm_args *a, bool exact, char *buf, size_t len,
                          moe_error *err)
{
    if (!a) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_autotune_key: args is NULL");
    char f[128] = "";
    add_flag(f, sizeof f, a->permute_x, "permute_x");
    add_flag(f, sizeof f, a->permute_y, "permute_y");
    add_flag(f, sizeof f, a->b_kn, "b_kn");
    add_flag(f, sizeof f, a->scale_a_rows != NULL, "scale_a");
    add_flag(f, sizeof f, a->scale_c_rows != NULL, "scale_c");
    add_flag(f, sizeof f, a->epilogue == MOE_EPI_SILU_MUL, "silu_mul");
    add_flag(f, sizeof f, a->C_preact != NULL, "preact");
    add_flag(f, sizeof f, exact && (a->scale_a_rows != NULL || a->epilogue == MOE_EPI_SILU_MUL),
             "exact_hf");
    return make_key("grouped_gemm", a->dtype, a->N, a->K, a->max_rows, a->num_experts, a->topk, f,
                    buf, len, err);
}

moe_status moe_autotune_key(const moe_grouped_gemm_args *a, char *buf, size_t len, moe_error *err)
{
    return key_fwd(a, false, buf, len, err);
}

moe_status moe_autotune_key_dw(const moe_grouped_gemm_dw_args *a, char *buf, size_t len,
                               moe_error *err)
{
    if (!a) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_autotune_key_dw: args is NULL");
    char f[128] = "";
    add_flag(f, sizeof f, a->permute_dy, "permute_dy");
    add_flag(f, sizeof f, a->permute_x, "permute_x");
    add_flag(f, sizeof f, a->scale_dy_rows != NULL, "scale_dy");
    add_flag(f, sizeof f, a->scale_x_rows != NULL, "scale_x");
    return make_key("grouped_gemm_dw", a->dtype, a->N, a->K, a->max_rows, a->num_experts, a->topk,
                    f, buf, len, err);
}

/* ---- the cache file ---- */

moe_status moe_autotune_cache_path(const char *cache_path, char *buf, size_t len, moe_error *err)
{
    int w;
    if (cache_path && *cache_path) {
        w = snprintf(buf, len, "%s", cache_path);
    } else {
        const char *env = getenv("MOE_AUTOTUNE_CACHE");
        if (env && *env) {
            w = snprintf(buf, len, "%s", env);
        } else {
            const char *home = getenv("HOME");
            if (!home || !*home)
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "autotune: no cache path given, MOE_AUTOTUNE_CACHE and HOME unset");
            w = snprintf(buf, len, "%s/.cache/moe-ep/autotune.json", home);
        }
    }
    if (w < 0 || (size_t)w >= len)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "autotune: cache path too long");
    return MOE_OK;
}

/* mkdir -p of the directory part of path. */
static moe_status make_parent_dirs(const char *path, moe_error *err)
{
    char dir[4096];
    if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir)
        return moe_fail(err, MOE_ERR_IO, "autotune: path too long: %s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) return MOE_OK;
    *slash = '\0';
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(dir, 0755) != 0 && errno != EEXIST)
            return moe_fail(err, MOE_ERR_IO, "autotune: cannot create directory %s: %s", dir,
                            strerror(errno));
        *p = '/';
    }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return moe_fail(err, MOE_ERR_IO, "autotune: cannot create directory %s: %s", dir,
                        strerror(errno));
    return MOE_OK;
}

/* The cache as JSON; a missing file gives an empty document. A malformed file is warned about
 * and replaced by an empty document (tuning still works; the next save rewrites it). */
static cJSON *load_cache(const char *path)
{
    cJSON *root = NULL;
    FILE *f = fopen(path, "rb");
    if (f) {
        char *text = NULL;
        long n = -1;
        if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && n < (64L << 20) &&
            fseek(f, 0, SEEK_SET) == 0 && (text = malloc((size_t)n + 1)) != NULL &&
            fread(text, 1, (size_t)n, f) == (size_t)n) {
            text[n] = '\0';
            root = cJSON_Parse(text);
            if (!root || !cJSON_IsObject(root))
                moe_warn("autotune: cache %s is not a JSON object; ignoring it", path);
        } else {
            moe_warn("autotune: cannot read cache %s; ignoring it", path);
        }
        free(text);
        fclose(f);
    }
    if (root && !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        root = NULL;
    }
    if (!root) root = cJSON_CreateObject();
    if (!root) return NULL;
    cJSON *entries = cJSON_GetObjectItemCaseSensitive(root, "entries");
    if (!cJSON_IsObject(entries)) {
        cJSON_DeleteItemFromObjectCaseSensitive(root, "entries");
        cJSON_AddItemToObject(root, "entries", cJSON_CreateObject());
    }
    if (!cJSON_GetObjectItemCaseSensitive(root, "version"))
        cJSON_AddNumberToObject(root, "version", AT_VERSION);
    return root;
}

static bool cache_get(const char *path, const char *key, moe_dtype dt, moe_kernel_config *out)
{
    cJSON *root = load_cache(path);
    if (!root) return false;
    bool ok = false;
    cJSON *entry = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(root, "entries"), key);
    cJSON *cfg = cJSON_GetObjectItemCaseSensitive(entry, "config");
    cJSON *ver = cJSON_GetObjectItemCaseSensitive(entry, "version");
    const bool current = cJSON_IsNumber(ver) && ver->valueint == AT_VERSION;
    if (cJSON_IsString(cfg) && !current) {
        if (!quiet())
            fprintf(stderr, "moe-ep autotune: cache %s: entry \"%s\" is from an older tuner (no "
                            "kernel options tried); re-tuning\n", path, key);
    } else if (cJSON_IsString(cfg)) {
        moe_kernel_config c;
        moe_error e2;
        moe_error_clear(&e2);
        if (moe_kernel_config_parse(cfg->valuestring, &c, &e2) == MOE_OK &&
            moe_kernel_config_resolve(&c, dt, 0, out, &e2) == MOE_OK)
            ok = true;
        else
            moe_warn("autotune: cache %s: entry \"%s\" has an unusable config (%s); re-tuning",
                     path, key, e2.msg);
    }
    cJSON_Delete(root);
    return ok;
}

static moe_status cache_put(const char *path, const char *key, const moe_kernel_config *c,
                            double ms, int candidates, moe_error *err)
{
    MOE_TRY(make_parent_dirs(path, err));
    cJSON *root = load_cache(path); /* re-read: keep entries other processes added meanwhile */
    if (!root) return moe_fail(err, MOE_ERR_NOMEM, "autotune: out of memory building the cache");
    cJSON *entries = cJSON_GetObjectItemCaseSensitive(root, "entries");
    cJSON *entry = cJSON_CreateObject();
    char buf[64];
    cJSON_AddStringToObject(entry, "config", moe_kernel_config_str(c, buf, sizeof buf));
    cJSON_AddNumberToObject(entry, "ms", ms);
    cJSON_AddNumberToObject(entry, "candidates", candidates);
    cJSON_AddNumberToObject(entry, "version", AT_VERSION);
    if (cJSON_GetObjectItemCaseSensitive(entries, key))
        cJSON_ReplaceItemInObjectCaseSensitive(entries, key, entry);
    else
        cJSON_AddItemToObject(entries, key, entry);
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return moe_fail(err, MOE_ERR_NOMEM, "autotune: out of memory printing the cache");

    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    moe_status st = MOE_OK;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        st = moe_fail(err, MOE_ERR_IO, "autotune: cannot write %s: %s", tmp, strerror(errno));
    } else {
        size_t n = strlen(text);
        bool ok = fwrite(text, 1, n, f) == n && fputc('\n', f) != EOF;
        ok = (fclose(f) == 0) && ok;
        if (!ok || rename(tmp, path) != 0) {
            st = moe_fail(err, MOE_ERR_IO, "autotune: cannot write cache %s: %s", path,
                          strerror(errno));
            remove(tmp);
        }
    }
    free(text);
    return st;
}

/* ---- timing ---- */

static int cmp_float(const void *x, const void *y)
{
    float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

static bool quiet(void)
{
    const char *q = getenv("MOE_AUTOTUNE_QUIET");
    return q && *q && strcmp(q, "0") != 0;
}

/* One problem behind a function pointer so forward and dW share the loop; tuning: the
 * caller's, with the autotuner's own scheduler counters. */
typedef struct at_problem {
    const moe_grouped_gemm_args *fwd;
    const moe_grouped_gemm_dw_args *dw;
    const moe_kernel_tuning *tuning;
} at_problem;

static moe_status run_once(const at_problem *p, const moe_kernel_config *c, cudaStream_t s,
                           moe_kernel_report *rep, moe_error *err)
{
    return p->fwd ? moe_cuda_grouped_gemm(p->fwd, c, p->tuning, s, rep, err)
                  : moe_cuda_grouped_gemm_dw(p->dw, c, p->tuning, s, rep, err);
}

/* Median time (ms) of AT_REPS timed launches of one configuration (after its warm-up). */
static moe_status time_config(const at_problem *p, const moe_kernel_config *c, cudaStream_t s,
                              cudaEvent_t ev[2], float *ms_out, moe_error *err)
{
    float t[AT_REPS];
    for (int i = 0; i < AT_REPS; i++) {
        cudaError_t e = cudaEventRecord(ev[0], s);
        if (e == cudaSuccess) {
            moe_status st = run_once(p, c, s, NULL, err);
            if (st != MOE_OK) return st;
            e = cudaEventRecord(ev[1], s);
        }
        if (e == cudaSuccess) e = cudaEventSynchronize(ev[1]);
        if (e == cudaSuccess) e = cudaEventElapsedTime(&t[i], ev[0], ev[1]);
        if (e != cudaSuccess)
            return moe_fail(err, MOE_ERR_CUDA, "autotune: timing failed: %s", cudaGetErrorString(e));
    }
    qsort(t, AT_REPS, sizeof t[0], cmp_float);
    *ms_out = t[AT_REPS / 2];
    return MOE_OK;
}

/* The wgmma run-time options tried on every ",tma" configuration (moe_kernel_config.epilogue,
 * .a_load), each path named explicitly, so the entry names the path whatever the defaults are
 * later. Options a problem cannot take run the same kernel path as another candidate; the
 * launch report shows that and the duplicate is not timed. */
static const int k_epilogue_options[] = {MOE_GG_EPILOGUE_DIRECT, MOE_GG_EPILOGUE_STAGED};
static const int k_a_load_options[] = {MOE_GG_A_CPASYNC, MOE_GG_A_TMA};
#define AT_MAX_CANDIDATES 256

/* Every candidate for p: the compiled list, with the option variants of the wgmma entries. */
static int list_candidates(const at_problem *p, const moe_kernel_config *list, int n,
                           moe_kernel_config *out)
{
    int count = 0;
    for (int i = 0; i < n; i++) {
        const moe_kernel_config *lc = &list[i];
        /* Every ",tma" configuration runs the same wgmma dW kernel (its own 128x256 tile): try
         * it once, as 128x256x64,w12,s4,tma; b_kn runs a ",c2" tile without clusters (its ",c1"
         * twin). */
        if (lc->use_tma && p->dw &&
            !(lc->tile_m == 128 && lc->tile_n == 256 && lc->stages == 4 && lc->cluster <= 1))
            continue;
        if (lc->use_tma && !p->dw && p->fwd->b_kn && lc->cluster > 1) continue;
        if (!lc->use_tma) {
            if (count < AT_MAX_CANDIDATES) out[count++] = *lc;
            continue;
        }
        const int n_a = p->dw ? 1 : (int)(sizeof k_a_load_options / sizeof k_a_load_options[0]);
        for (size_t ep = 0; ep < sizeof k_epilogue_options / sizeof k_epilogue_options[0]; ep++)
            for (int al = 0; al < n_a && count < AT_MAX_CANDIDATES; al++) {
                out[count] = *lc;
                out[count].epilogue = k_epilogue_options[ep];
                out[count].a_load = p->dw ? MOE_GG_A_AUTO : k_a_load_options[al]; /* dW: no choice */
                count++;
            }
    }
    return count;
}

/* What a candidate's warm-up launch ran: its tile as listed, the options as reported (explicit,
 * so the cache entry means the same path whatever the defaults or the environment later). */
static moe_kernel_config ran_as(const moe_kernel_config *cand, const moe_kernel_report *rep)
{
    moe_kernel_config r = *cand;
    if (cand->use_tma && rep->kernel && strstr(rep->kernel, "wgmma")) {
        r.epilogue = rep->config.epilogue;
        r.a_load = rep->config.a_load;
    } else {
        r.epilogue = MOE_GG_EPILOGUE_AUTO;
        r.a_load = MOE_GG_A_AUTO;
    }
    return r;
}

static moe_status tune(const char *path, const char *key, const at_problem *p, moe_dtype dt,
                       cudaStream_t s, moe_kernel_config *out, moe_error *err)
{
    const moe_kernel_config *list;
    int n_list = moe_kernel_configs(dt, &list);
    if (n_list == 0)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "autotune: no kernels for dtype %s",
                        moe_dtype_name(dt) ? moe_dtype_name(dt) : "?");
    moe_kernel_config cand[AT_MAX_CANDIDATES], seen[AT_MAX_CANDIDATES];
    const char *seen_kernel[AT_MAX_CANDIDATES];
    const int n = list_candidates(p, list, n_list, cand);
    cudaEvent_t ev[2] = {NULL, NULL};
    cudaError_t e = cudaEventCreate(&ev[0]);
    if (e == cudaSuccess) e = cudaEventCreate(&ev[1]);
    if (e != cudaSuccess) {
        if (ev[0]) cudaEventDestroy(ev[0]);
        return moe_fail(err, MOE_ERR_CUDA, "autotune: cudaEventCreate: %s", cudaGetErrorString(e));
    }
    moe_status st = MOE_OK;
    int timed = 0, n_seen = 0;
    moe_kernel_config best = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    float best_ms = -1;
    char buf[64];
    if (!quiet()) fprintf(stderr, "moe-ep autotune: tuning %s (up to %d candidates)\n", key, n);
    for (int i = 0; i < n; i++) {
        moe_kernel_report rep = {0};
        moe_error e2;
        moe_error_clear(&e2);
        moe_status ts = run_once(p, &cand[i], s, &rep, &e2); /* warm-up, and what ran */
        moe_kernel_config ran = ran_as(&cand[i], &rep);
        bool dup = false;
        for (int j = 0; ts == MOE_OK && j < n_seen && !dup; j++)
            dup = memcmp(&seen[j], &ran, sizeof ran) == 0 && rep.kernel && seen_kernel[j] &&
                  strcmp(rep.kernel, seen_kernel[j]) == 0;
        if (dup) continue; /* an option this problem cannot take: the same path as before */
        float ms = 0;
        if (ts == MOE_OK) ts = time_config(p, &cand[i], s, ev, &ms, &e2);
        if (ts == MOE_ERR_CUDA) { /* a broken launch: the stream may be poisoned, stop */
            st = moe_fail(err, ts, "autotune: %s", e2.msg);
            break;
        }
        if (ts != MOE_OK) {
            if (!quiet())
                fprintf(stderr, "moe-ep autotune:   %-28s skipped: %s\n",
                        moe_kernel_config_str(&cand[i], buf, sizeof buf), e2.msg);
            continue;
        }
        seen[n_seen] = ran;
        seen_kernel[n_seen++] = rep.kernel;
        timed++;
        if (!quiet())
            fprintf(stderr, "moe-ep autotune:   %-28s %9.4f ms  (%d/%d)\n",
                    moe_kernel_config_str(&ran, buf, sizeof buf), ms, i + 1, n);
        if (best_ms < 0 || ms < best_ms) {
            best = ran;
            best_ms = ms;
        }
        /* The narrow fallback ignores the configuration: one kernel, nothing to compare. */
        if (rep.kernel && strstr(rep.kernel, "narrow")) break;
    }
    cudaEventDestroy(ev[0]);
    cudaEventDestroy(ev[1]);
    if (st != MOE_OK) return st;
    if (best_ms < 0)
        return moe_fail(err, MOE_ERR_INTERNAL, "autotune: no candidate ran for %s", key);
    *out = best;
    if (!quiet())
        fprintf(stderr, "moe-ep autotune: picked %s (%.4f ms, %d timed) -> %s\n",
                moe_kernel_config_str(out, buf, sizeof buf), best_ms, timed, path);
    moe_status ps = cache_put(path, key, out, best_ms, timed, err);
    if (ps != MOE_OK) {
        /* The choice is still good for this run; only persistence failed. */
        moe_warn("%s", err ? err->msg : "autotune: could not save the cache");
        if (err) moe_error_clear(err);
    }
    return MOE_OK;
}

/* ---- public ---- */

moe_status moe_autotune_lookup(const char *cache_path, const moe_grouped_gemm_args *a,
                               moe_kernel_config *out, bool *found, moe_error *err)
{
    char path[4096], key[1024];
    *found = false;
    MOE_TRY(moe_autotune_cache_path(cache_path, path, sizeof path, err));
    MOE_TRY(moe_autotune_key(a, key, sizeof key, err));
    *found = cache_get(path, key, a->dtype, out);
    return MOE_OK;
}

moe_status moe_autotune_lookup_dw(const char *cache_path, const moe_grouped_gemm_dw_args *a,
                                  moe_kernel_config *out, bool *found, moe_error *err)
{
    char path[4096], key[1024];
    *found = false;
    MOE_TRY(moe_autotune_cache_path(cache_path, path, sizeof path, err));
    MOE_TRY(moe_autotune_key_dw(a, key, sizeof key, err));
    *found = cache_get(path, key, a->dtype, out);
    return MOE_OK;
}

static moe_status dev_alloc(void **p, size_t bytes, const char *what, moe_error *err)
{
    *p = NULL;
    if (bytes == 0) return MOE_OK;
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        *p = NULL;
        cudaGetLastError();
        return moe_fail(err, MOE_ERR_NOMEM, "autotune: cannot allocate %zu bytes of scratch %s: %s",
                        bytes, what, cudaGetErrorString(e));
    }
    return MOE_OK;
}

/* No room for scratch outputs: run untuned (the default configuration) rather than fail. */
static moe_status untuned_default(moe_dtype dt, int avg_rows, moe_kernel_config *out,
                                  moe_error *err)
{
    moe_warn("%s; using the default configuration untuned", err ? err->msg : "autotune: no memory");
    if (err) moe_error_clear(err);
    return moe_kernel_config_resolve(NULL, dt, avg_rows, out, err);
}

/* The tuning the candidates run with: the caller's (NULL: defaults), with counters of the
 * autotuner's own in place of the caller's (allocated into *counters; none where the caller
 * runs the static order), since the timed launches must not share the caller's counters. */
static moe_status tuning_for(const moe_kernel_tuning *caller, cudaStream_t s, moe_kernel_tuning *t,
                             int32_t **counters, moe_error *err)
{
    *counters = NULL;
    if (caller)
        *t = *caller;
    else
        memset(t, 0, sizeof *t);
    t->sched_counters = NULL;
    if (caller && caller->sched_counters) {
        MOE_TRY(moe_sched_counters_alloc(counters, s, err));
        t->sched_counters = *counters;
    }
    return MOE_OK;
}

moe_status moe_autotune_pick(const char *cache_path, const moe_grouped_gemm_args *a,
                             const moe_kernel_tuning *tuning, cudaStream_t s,
                             moe_kernel_config *out, moe_error *err)
{
    if (!a || !out) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_autotune_pick: NULL argument");
    char path[4096], key[1024];
    MOE_TRY(moe_autotune_cache_path(cache_path, path, sizeof path, err));
    MOE_TRY(key_fwd(a, tuning && tuning->exact_hf_rounding, key, sizeof key, err));
    if (cache_get(path, key, a->dtype, out)) return MOE_OK;

    /* Scratch outputs: C [max_rows, n_out] (with permute_y the flat index space T*k, which is
     * max_rows), C_preact [max_rows, N]. */
    const size_t es = moe_dtype_size(a->dtype);
    const bool silu = a->epilogue == MOE_EPI_SILU_MUL;
    const size_t n_out = (size_t)(silu ? a->N / 2 : a->N);
    moe_grouped_gemm_args t = *a;
    void *c = NULL, *pre = NULL;
    moe_kernel_tuning tt;
    int32_t *counters = NULL;
    moe_status st = dev_alloc(&c, (size_t)a->max_rows * n_out * es, "C", err);
    if (st == MOE_OK && a->C_preact)
        st = dev_alloc(&pre, (size_t)a->max_rows * (size_t)a->N * es, "C_preact", err);
    if (st == MOE_OK) st = tuning_for(tuning, s, &tt, &counters, err);
    if (st == MOE_OK) {
        t.C = c ? c : a->C;
        t.C_preact = pre;
        at_problem p = {&t, NULL, &tt};
        st = tune(path, key, &p, a->dtype, s, out, err);
    }
    cudaFree(c);
    cudaFree(pre);
    moe_sched_counters_free(counters);
    if (st == MOE_ERR_NOMEM) return untuned_default(a->dtype, a->max_rows / a->num_experts, out, err);
    return st;
}

moe_status moe_autotune_pick_dw(const char *cache_path, const moe_grouped_gemm_dw_args *a,
                                const moe_kernel_tuning *tuning, cudaStream_t s,
                                moe_kernel_config *out, moe_error *err)
{
    if (!a || !out)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_autotune_pick_dw: NULL argument");
    char path[4096], key[1024];
    MOE_TRY(moe_autotune_cache_path(cache_path, path, sizeof path, err));
    MOE_TRY(moe_autotune_key_dw(a, key, sizeof key, err));
    if (cache_get(path, key, a->dtype, out)) return MOE_OK;

    const size_t es = moe_dtype_size(a->dtype);
    moe_grouped_gemm_dw_args t = *a;
    void *w = NULL;
    moe_kernel_tuning tt;
    int32_t *counters = NULL;
    moe_status st =
        dev_alloc(&w, (size_t)a->num_experts * (size_t)a->N * (size_t)a->K * es, "dW", err);
    if (st == MOE_OK) st = tuning_for(tuning, s, &tt, &counters, err);
    if (st == MOE_OK) {
        t.dW = w;
        at_problem p = {NULL, &t, &tt};
        st = tune(path, key, &p, a->dtype, s, out, err);
    }
    cudaFree(w);
    moe_sched_counters_free(counters);
    if (st == MOE_ERR_NOMEM) return untuned_default(a->dtype, a->max_rows / a->num_experts, out, err);
    return st;
}
