/* ep_route.c — forced routing (--route): expert ids chosen on purpose instead of by the router,
 * so skew and empty ranks can be produced and their counts asserted (semantics in ep.h). */
#include "ep.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../dtype.h"
#include "../rng.h"

bool moe_ep_transport_parse(const char *s, moe_transport *out)
{
    if (!s) return false;
    if (strcmp(s, "auto") == 0) *out = MOE_TRANSPORT_AUTO;
    else if (strcmp(s, "mpi") == 0) *out = MOE_TRANSPORT_MPI;
    else if (strcmp(s, "nccl") == 0) *out = MOE_TRANSPORT_NCCL;
    else return false;
    return true;
}

const char *moe_ep_transport_name(moe_transport t)
{
    switch (t) {
    case MOE_TRANSPORT_AUTO: return "auto";
    case MOE_TRANSPORT_MPI: return "mpi";
    case MOE_TRANSPORT_NCCL: return "nccl";
    }
    return "?";
}

void moe_ep_route_free(moe_ep_route *r)
{
    if (!r) return;
    free(r->ids);
    r->ids = NULL;
    r->rows = 0;
}

moe_status moe_ep_route_load_file(const char *path, int num_experts, int top_k, int32_t **ids,
                                  int64_t *rows, moe_error *err)
{
    *ids = NULL;
    *rows = 0;
    if (top_k < 1 || num_experts < top_k)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "routing file: k=%d, E=%d", top_k, num_experts);
    FILE *f = fopen(path, "r");
    if (!f)
        return moe_fail(err, MOE_ERR_IO, "routing file %s: cannot open: %s", path,
                        strerror(errno));
    size_t cap = 256, n = 0;
    int32_t *v = moe_malloc(cap * sizeof(int32_t), "routing table", err);
    moe_status st = v ? MOE_OK : MOE_ERR_NOMEM;
    char line[4096];
    int lineno = 0;
    while (st == MOE_OK && fgets(line, sizeof line, f)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        char *s = line;
        for (;;) {
            while (*s && isspace((unsigned char)*s)) s++;
            if (!*s) break;
            char *end;
            errno = 0;
            long e = strtol(s, &end, 10);
            if (end == s || errno) {
                st = moe_fail(err, MOE_ERR_FORMAT, "routing file %s line %d: not an integer: '%.20s'",
                              path, lineno, s);
                break;
            }
            s = end;
            if (e < 0 || e >= num_experts) {
                st = moe_fail(err, MOE_ERR_FORMAT,
                              "routing file %s line %d: expert id %ld outside [0, %d)", path,
                              lineno, e, num_experts);
                break;
            }
            size_t tok = n / (size_t)top_k, j = n % (size_t)top_k;
            for (size_t a = 0; a < j; a++)
                if (v[tok * top_k + a] == e) {
                    st = moe_fail(err, MOE_ERR_FORMAT,
                                  "routing file %s line %d: token %zu repeats expert %ld", path,
                                  lineno, tok, e);
                    break;
                }
            if (st != MOE_OK) break;
            if (n == cap) {
                int32_t *nv = realloc(v, 2 * cap * sizeof(int32_t));
                if (!nv) {
                    st = moe_fail(err, MOE_ERR_NOMEM, "routing table: %zu ids", 2 * cap);
                    break;
                }
                v = nv;
                cap *= 2;
            }
            v[n++] = (int32_t)e;
        }
    }
    fclose(f);
    if (st == MOE_OK && (n == 0 || n % (size_t)top_k != 0))
        st = moe_fail(err, MOE_ERR_FORMAT,
                      "routing file %s: %zu ids is not a positive multiple of k=%d", path, n,
                      top_k);
    if (st != MOE_OK) {
        free(v);
        return st;
    }
    *ids = v;
    *rows = (int64_t)(n / (size_t)top_k);
    return MOE_OK;
}

moe_status moe_ep_route_parse(const char *spec, int num_experts, int top_k, moe_ep_route *r,
                              moe_error *err)
{
    memset(r, 0, sizeof *r);
    if (!spec || !*spec) return MOE_OK; /* the router's own routing */
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", spec);
    char *comma = strstr(buf, ",w=");
    if (comma) {
        const char *wm = comma + 3;
        if (strcmp(wm, "uniform") == 0) r->weights = MOE_EP_ROUTE_W_UNIFORM;
        else if (strcmp(wm, "router") == 0) r->weights = MOE_EP_ROUTE_W_ROUTER;
        else
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "--route %s: weights '%s' (expected w=router or w=uniform)", spec, wm);
        *comma = '\0';
    }
    if (strcmp(buf, "router") == 0) r->mode = MOE_EP_ROUTE_ROUTER;
    else if (strcmp(buf, "uniform") == 0) r->mode = MOE_EP_ROUTE_UNIFORM;
    else if (strcmp(buf, "skewed") == 0) r->mode = MOE_EP_ROUTE_SKEWED;
    else if (strncmp(buf, "all-to-one", 10) == 0 && (buf[10] == '\0' || buf[10] == ':')) {
        r->mode = MOE_EP_ROUTE_ALL_TO_ONE;
        if (buf[10] == ':') {
            char *end;
            long t = strtol(buf + 11, &end, 10);
            if (*end || end == buf + 11 || t < 0 || t > 1 << 20)
                return moe_fail(err, MOE_ERR_INVALID_ARG, "--route %s: bad target rank", spec);
            r->target = (int)t;
        }
    } else if (strncmp(buf, "experts:", 8) == 0) {
        /* the same k experts for every token: a one-row table */
        r->mode = MOE_EP_ROUTE_FILE;
        r->ids = moe_malloc((size_t)top_k * sizeof(int32_t), "routing table", err);
        if (!r->ids) return MOE_ERR_NOMEM;
        r->rows = 1;
        const char *p = buf + 8;
        for (int j = 0; j < top_k; j++) {
            char *end;
            long e = strtol(p, &end, 10);
            bool dup = false;
            for (int i = 0; i < j; i++) dup |= r->ids[i] == e;
            if (end == p || e < 0 || e >= num_experts || dup || (*end != ',' && *end != '\0') ||
                (j + 1 < top_k && *end != ',') || (j + 1 == top_k && *end != '\0')) {
                moe_ep_route_free(r);
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "--route %s: expected experts:ID,ID,... with k=%d distinct ids in "
                                "[0, %d)", spec, top_k, num_experts);
            }
            r->ids[j] = (int32_t)e;
            p = end + 1;
        }
    } else if (strncmp(buf, "file:", 5) == 0) {
        r->mode = MOE_EP_ROUTE_FILE;
        int32_t *ids = NULL;
        MOE_TRY(moe_ep_route_load_file(buf + 5, num_experts, top_k, &ids, &r->rows, err));
        r->ids = ids;
    } else {
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "--route %s: expected router, uniform, skewed, all-to-one[:RANK], "
                        "experts:ID,... or file:PATH (optionally ,w=uniform)",
                        spec);
    }
    return MOE_OK;
}

/* k distinct experts, P(e) ~ 1/(e+1)^2 without replacement: a few low ids get most tokens. */
static void skewed_row(int E, int k, uint64_t stream, int64_t g, int32_t *out, double *wbuf)
{
    double total = 0;
    for (int e = 0; e < E; e++) {
        wbuf[e] = 1.0 / ((double)(e + 1) * (e + 1));
        total += wbuf[e];
    }
    for (int j = 0; j < k; j++) {
        double u = moe_rng_uniform(stream, (uint64_t)g * (uint64_t)k + (uint64_t)j) * total;
        int pick = -1;
        double acc = 0;
        for (int e = 0; e < E; e++) {
            if (wbuf[e] == 0) continue;
            pick = e; /* the last available one, should rounding leave u beyond the sum */
            acc += wbuf[e];
            if (u < acc) break;
        }
        out[j] = pick;
        total -= wbuf[pick];
        wbuf[pick] = 0;
    }
}

moe_status moe_ep_route_ids(const moe_ep_route *r, const moe_expert_map *map, int k, int64_t g0,
                            int T, int32_t *ids, moe_error *err)
{
    const int E = map->E, G = map->G;
    if (k < 1 || k > E)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "forced routing: E=%d k=%d", E, k);
    switch (r->mode) {
    case MOE_EP_ROUTE_ROUTER:
        return moe_fail(err, MOE_ERR_INVALID_ARG, "forced routing: mode 'router' forces nothing");
    case MOE_EP_ROUTE_UNIFORM:
        for (int t = 0; t < T; t++)
            for (int j = 0; j < k; j++)
                ids[(size_t)t * k + j] = (int32_t)(((g0 + t) * k + j) % E);
        return MOE_OK;
    case MOE_EP_ROUTE_SKEWED: {
        double *wbuf = moe_malloc((size_t)E * sizeof(double), "skewed routing", err);
        if (!wbuf) return MOE_ERR_NOMEM;
        uint64_t stream = moe_rng_stream(0, "ep.route.skewed");
        for (int t = 0; t < T; t++) skewed_row(E, k, stream, g0 + t, ids + (size_t)t * k, wbuf);
        free(wbuf);
        return MOE_OK;
    }
    case MOE_EP_ROUTE_ALL_TO_ONE: {
        if (r->target < 0 || r->target >= G)
            return moe_fail(err, MOE_ERR_INVALID_ARG,
                            "--route all-to-one:%d: target outside the %d (virtual) ranks",
                            r->target, G);
        /* the target's experts first, then the following virtual ranks' (cyclic), each in
         * ascending id order: the first k of that list */
        int32_t pick[64];
        int n = 0;
        for (int step = 0; step < G && n < k; step++) {
            int d = (r->target + step) % G;
            for (int e = 0; e < E && n < k; e++)
                if (map->vowner[e] == d) pick[n++] = e;
        }
        if (n < k || k > 64)
            return moe_fail(err, MOE_ERR_INTERNAL, "all-to-one routing found %d of %d experts",
                            n, k);
        for (int t = 0; t < T; t++)
            for (int j = 0; j < k; j++) ids[(size_t)t * k + j] = pick[j];
        return MOE_OK;
    }
    case MOE_EP_ROUTE_FILE:
        if (!r->ids || r->rows < 1)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "forced routing from a file: no table");
        for (int t = 0; t < T; t++) {
            const int32_t *src = r->ids + (size_t)((g0 + t) % r->rows) * k;
            for (int j = 0; j < k; j++) {
                if (src[j] < 0 || src[j] >= E)
                    return moe_fail(err, MOE_ERR_INVALID_ARG,
                                    "forced routing table row %lld: expert %d outside [0,%d)",
                                    (long long)((g0 + t) % r->rows), src[j], E);
                ids[(size_t)t * k + j] = src[j];
            }
        }
        return MOE_OK;
    }
    return moe_fail(err, MOE_ERR_INVALID_ARG, "forced routing: unknown mode %d", (int)r->mode);
}

void ep_route_weights(const moe_config *cfg, moe_dtype dt, moe_ep_route_weights mode, int T,
                      const void *logits, const int32_t *ids, void *w)
{
    int E = cfg->num_experts, k = cfg->top_k;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        size_t base = (size_t)t * k;
        if (mode == MOE_EP_ROUTE_W_UNIFORM) {
            for (int j = 0; j < k; j++) moe_store_elem_f(dt, w, base + j, 1.0f / (float)k);
            continue;
        }
        const size_t lrow = (size_t)t * E;
        if (cfg->arch == MOE_ARCH_LLAMA4) {
            for (int j = 0; j < k; j++) {
                float l = moe_load_elem_f(dt, logits, lrow + ids[base + j]);
                moe_store_elem_f(dt, w, base + j, 1.0f / (1.0f + expf(-l)));
            }
            continue;
        }
        /* Qwen3: the softmax over all E (fp32), read at the forced ids. */
        float mx = -INFINITY;
        for (int e = 0; e < E; e++) {
            float l = moe_load_elem_f(dt, logits, lrow + e);
            if (l > mx) mx = l;
        }
        float sum = 0;
        for (int e = 0; e < E; e++) sum += expf(moe_load_elem_f(dt, logits, lrow + e) - mx);
        /* Two passes over the k slots (no scratch): their sum, then each renormalised. */
        float s = 0;
        for (int j = 0; j < k; j++)
            s += expf(moe_load_elem_f(dt, logits, lrow + ids[base + j]) - mx) / sum;
        for (int j = 0; j < k; j++) {
            float v = expf(moe_load_elem_f(dt, logits, lrow + ids[base + j]) - mx) / sum;
            moe_store_elem_f(dt, w, base + j, cfg->norm_topk_prob ? v / s : v);
        }
    }
}
