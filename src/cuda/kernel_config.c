/*
 * kernel_config.c — grouped-GEMM kernel configurations: parsing
 * "128x128x32,w8,s3[,tma][,c2][,staged|,direct][,atma|,acp]", validation against the compiled
 * list (kernels/grouped_gemm_configs.h), defaults, and the resolution of a request into the
 * compiled configuration the launchers take.
 * The bf16/fp16 list is the mma.sync configurations followed by the Hopper wgmma/TMA ones
 * (use_tma = 1, e.g. "128x256x64,w12,s4,tma"). The epilogue and A-load options are run-time
 * choices of the wgmma kernels, valid on any ",tma" configuration (not part of the list).
 * Host C only; nothing here touches the GPU.
 */
#include "kernel_config.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grouped_gemm_configs.h"

#define MOE_CFG_MMA(bm, bn, bk, wm, wn, s) {bm, bn, bk, (wm) * (wn), s, 0, 0, 0, 0},
#define MOE_CFG_WG(bm, bn, bk, w, s, cl) {bm, bn, bk, w, s, 1, (cl) > 1 ? (cl) : 0, 0, 0},
static const moe_kernel_config k_mma_configs[] = {MOE_GG_MMA_CONFIGS(MOE_CFG_MMA)
                                                      MOE_GG_WGMMA_CONFIGS(MOE_CFG_WG)};
#undef MOE_CFG_MMA
#undef MOE_CFG_WG

#define MOE_CFG_FFMA(bm, bn) {bm, bn, MOE_GG_FFMA_BK, MOE_GG_FFMA_THREADS / 32, 1, 0, 0, 0, 0},
static const moe_kernel_config k_ffma_configs[] = {MOE_GG_FFMA_CONFIGS(MOE_CFG_FFMA)};
#undef MOE_CFG_FFMA

#define K_COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* The automatic choice for bf16/fp16 (moe_kernel_config_resolve with no request): the Hopper
 * wgmma kernel (it falls back to moe_kernel_config_default_mma by itself on other GPUs, for
 * unaligned problems, b_kn with N * 2 bytes not a multiple of 16, and dW) when experts average at least
 * MOE_GG_WGMMA_MIN_AVG_ROWS rows, else the mma.sync default. Measured on an H100
 * (docs/KERNELS.md): 128x256x64,w12,s4,tma beat every mma.sync configuration on Qwen3-30B-A3B
 * and Llama-4-Scout GEMM1/GEMM2 from T=256 (16 rows per expert: 1.07x / 1.14x) to T=16384
 * (1.60x / 1.86x); fewer rows per expert were not measured. The CTA pairs sharing each weight
 * tile (",c2") measured slower on an H200 at T = 1024 / 4096 and no faster at 16384
 * (docs/KERNELS.md, round 3): the autotuner may pick them, the default does not. */
#define MOE_GG_DEFAULT_WGMMA 1
#define MOE_GG_WGMMA_MIN_AVG_ROWS 16
#define MOE_GG_DEFAULT_WGMMA_CONFIG 128, 256, 64, 12, 4, 1, 0, MOE_GG_EPILOGUE_AUTO, MOE_GG_A_AUTO

int moe_kernel_configs(moe_dtype dtype, const moe_kernel_config **list)
{
    switch (dtype) {
    case MOE_DTYPE_BF16:
    case MOE_DTYPE_F16:
        *list = k_mma_configs;
        return K_COUNT(k_mma_configs);
    case MOE_DTYPE_F32:
        *list = k_ffma_configs;
        return K_COUNT(k_ffma_configs);
    default:
        *list = NULL;
        return 0;
    }
}

moe_kernel_config moe_kernel_config_narrow(void) { return moe_gg_narrow_config(); }

const char *moe_kernel_config_str(const moe_kernel_config *c, char *buf, size_t len)
{
    if (!c) {
        snprintf(buf, len, "(none)");
        return buf;
    }
    if (!c->tile_m && !c->tile_n && !c->tile_k && !c->warps && !c->stages && !c->use_tma) {
        snprintf(buf, len, "auto");
        return buf;
    }
    snprintf(buf, len, "%dx%dx%d,w%d,s%d%s%s%s%s", c->tile_m, c->tile_n, c->tile_k, c->warps,
             c->stages, c->use_tma ? ",tma" : "", c->cluster > 1 ? ",c2" : "",
             c->epilogue == MOE_GG_EPILOGUE_STAGED   ? ",staged"
             : c->epilogue == MOE_GG_EPILOGUE_DIRECT ? ",direct"
                                                     : "",
             c->a_load == MOE_GG_A_TMA ? ",atma" : c->a_load == MOE_GG_A_CPASYNC ? ",acp" : "");
    return buf;
}

/* A strictly positive decimal int at *p (advancing *p); false if none or out of range. */
static bool parse_pos_int(const char **p, int *out)
{
    if (!isdigit((unsigned char)**p)) return false;
    errno = 0;
    char *end;
    long v = strtol(*p, &end, 10);
    if (errno || v <= 0 || v > 4096) return false;
    *p = end;
    *out = (int)v;
    return true;
}

#define CFG_SYNTAX                                                                               \
    "expected TMxTNxTK[,wWARPS][,sSTAGES][,tma][,c1|,c2][,staged|,direct][,atma|,acp], e.g. "   \
    "\"128x128x32,w8,s3\" or \"128x256x64,w12,s4,tma,c2\", or \"auto\""

/* Whether p starts with the option word w, followed by ',' or the end. */
static bool option_is(const char *p, const char *w)
{
    size_t n = strlen(w);
    return strncmp(p, w, n) == 0 && (p[n] == ',' || p[n] == '\0');
}

moe_status moe_kernel_config_parse(const char *text, moe_kernel_config *cfg, moe_error *err)
{
    if (!cfg) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_kernel_config_parse: cfg is NULL");
    memset(cfg, 0, sizeof *cfg);
    if (!text) return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_kernel_config_parse: text is NULL");
    if (*text == '\0' || strcmp(text, "auto") == 0) return MOE_OK;

    moe_kernel_config c = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    bool cluster_given = false;
    const char *p = text;
    if (!parse_pos_int(&p, &c.tile_m) || *p++ != 'x' || !parse_pos_int(&p, &c.tile_n) ||
        *p++ != 'x' || !parse_pos_int(&p, &c.tile_k))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "kernel config \"%s\": bad tile sizes; " CFG_SYNTAX, text);
    while (*p == ',') {
        p++;
        /* option words first: "staged" must not be read as a stage count */
        if (option_is(p, "staged") || option_is(p, "direct")) {
            if (c.epilogue)
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "kernel config \"%s\": repeated epilogue option; " CFG_SYNTAX, text);
            c.epilogue = *p == 's' ? MOE_GG_EPILOGUE_STAGED : MOE_GG_EPILOGUE_DIRECT;
            p += 6;
        } else if (option_is(p, "atma") || option_is(p, "acp")) {
            if (c.a_load)
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "kernel config \"%s\": repeated A-load option; " CFG_SYNTAX, text);
            c.a_load = p[1] == 't' ? MOE_GG_A_TMA : MOE_GG_A_CPASYNC;
            p += c.a_load == MOE_GG_A_TMA ? 4 : 3;
        } else if (*p == 'w') {
            p++;
            if (c.warps || !parse_pos_int(&p, &c.warps))
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "kernel config \"%s\": bad or repeated warp count; " CFG_SYNTAX,
                                text);
        } else if (*p == 's') {
            p++;
            if (c.stages || !parse_pos_int(&p, &c.stages))
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "kernel config \"%s\": bad or repeated stage count; " CFG_SYNTAX,
                                text);
        } else if (option_is(p, "tma")) {
            c.use_tma = 1;
            p += 3;
        } else if (option_is(p, "notma")) {
            c.use_tma = 0;
            p += 5;
        } else if (p[0] == 'c' && (p[1] == '1' || p[1] == '2') && (p[2] == ',' || p[2] == '\0')) {
            if (cluster_given)
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "kernel config \"%s\": repeated cluster size; " CFG_SYNTAX, text);
            cluster_given = true;
            c.cluster = p[1] == '2' ? 2 : 0; /* c1 = no cluster, stored as 0 */
            p += 2;
        } else {
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "kernel config \"%s\": unknown option at \"%s\"; " CFG_SYNTAX, text,
                            p);
        }
    }
    if (*p != '\0')
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "kernel config \"%s\": trailing text \"%s\"; " CFG_SYNTAX, text, p);
    *cfg = c;
    return MOE_OK;
}

static bool is_auto(const moe_kernel_config *c)
{
    return !c || (!c->tile_m && !c->tile_n && !c->tile_k && !c->warps && !c->stages &&
                  !c->use_tma);
}

static bool matches(const moe_kernel_config *req, const moe_kernel_config *c)
{
    return (!req->tile_m || req->tile_m == c->tile_m) && (!req->tile_n || req->tile_n == c->tile_n) &&
           (!req->tile_k || req->tile_k == c->tile_k) && (!req->warps || req->warps == c->warps) &&
           (!req->stages || req->stages == c->stages) && !req->use_tma == !c->use_tma &&
           (req->cluster > 1) == (c->cluster > 1);
}

/* The strings of list[0..n) ("a | b | ..."; only the ",tma" ones with wgmma_only) into buf, as
 * many as fit; returns how many were written. */
static int join_configs(const moe_kernel_config *list, int n, bool wgmma_only, char *buf, size_t len)
{
    size_t used = 0;
    int count = 0;
    buf[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (wgmma_only && !list[i].use_tma) continue;
        char one[64];
        int w = snprintf(buf + used, len - used, "%s%s", count ? " | " : "",
                         moe_kernel_config_str(&list[i], one, sizeof one));
        if (w < 0 || (size_t)w >= len - used) break;
        used += (size_t)w;
        count++;
    }
    return count;
}

static moe_status no_match(const moe_kernel_config *req, moe_dtype dtype, moe_error *err)
{
    const moe_kernel_config *list;
    int n = moe_kernel_configs(dtype, &list);
    char want[64], valid[900];
    join_configs(list, n, false, valid, sizeof valid);
    return moe_fail(err, MOE_ERR_INVALID_ARG,
                    "kernel config %s is not compiled for %s grouped GEMMs; valid: %s",
                    moe_kernel_config_str(req, want, sizeof want), moe_dtype_name(dtype), valid);
}

moe_kernel_config moe_kernel_config_default_mma(moe_dtype dtype, int avg_rows)
{
    return moe_gg_default_mma_config(dtype, avg_rows);
}

/* *out = the listed configuration matching want's tile fields, with want's run-time options. */
static bool pick_listed(const moe_kernel_config *want, const moe_kernel_config *list, int n,
                        moe_kernel_config *out)
{
    for (int i = 0; i < n; i++)
        if (matches(want, &list[i])) {
            *out = list[i];
            out->epilogue = want->epilogue;
            out->a_load = want->a_load;
            return true;
        }
    return false;
}

moe_status moe_kernel_config_resolve(const moe_kernel_config *req, moe_dtype dtype, int avg_rows,
                                     moe_kernel_config *out, moe_error *err)
{
    const moe_kernel_config *list;
    int n = moe_kernel_configs(dtype, &list);
    if (n == 0)
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "grouped GEMM: dtype %s has no kernels (bf16, fp16, fp32 only)",
                        moe_dtype_name(dtype) ? moe_dtype_name(dtype) : "?");
    char buf[96];
    if (req && (req->epilogue < MOE_GG_EPILOGUE_AUTO || req->epilogue > MOE_GG_EPILOGUE_STAGED ||
                req->a_load < MOE_GG_A_AUTO || req->a_load > MOE_GG_A_TMA))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "kernel config: unknown epilogue option %d or A-load option %d",
                        req->epilogue, req->a_load);
    if (is_auto(req)) {
        moe_kernel_config want = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        if (dtype != MOE_DTYPE_F32 && MOE_GG_DEFAULT_WGMMA && avg_rows >= MOE_GG_WGMMA_MIN_AVG_ROWS)
            want = (moe_kernel_config){MOE_GG_DEFAULT_WGMMA_CONFIG};
        else
            want = moe_kernel_config_default_mma(dtype, avg_rows);
        /* options given with the automatic choice apply where it picks a wgmma configuration */
        if (req && want.use_tma && req->epilogue) want.epilogue = req->epilogue;
        if (req && want.use_tma && req->a_load) want.a_load = req->a_load;
        if (!pick_listed(&want, list, n, out)) *out = list[0];
        return MOE_OK;
    }
    if ((req->epilogue || req->a_load) && !req->use_tma) {
        /* name the configurations that take them (none for fp32) */
        char wg[400];
        const bool any = join_configs(list, n, true, wg, sizeof wg) > 0;
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "kernel config %s: ,staged ,direct ,atma and ,acp are options of the Hopper "
                        "wgmma configurations%s%s",
                        moe_kernel_config_str(req, buf, sizeof buf),
                        any ? ", which are: " : "; there are none for ", any ? wg : moe_dtype_name(dtype));
    }
    if (pick_listed(req, list, n, out)) return MOE_OK;
    return no_match(req, dtype, err);
}

moe_status moe_kernel_config_validate(const moe_kernel_config *cfg, moe_dtype dtype,
                                      moe_error *err)
{
    moe_kernel_config out;
    return moe_kernel_config_resolve(cfg, dtype, 0, &out, err);
}
