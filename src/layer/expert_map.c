/* expert_map.c — placement of experts over (virtual) ranks; see expert_map.h. */
#include "expert_map.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "../hash.h"

void moe_expert_map_free(moe_expert_map *m)
{
    if (!m) return;
    free(m->owner);
    free(m->vowner);
    free(m->vlocal);
    free(m->vcount);
    free(m->local_ids);
    free(m->vfirst);
    free(m->rank_count);
    memset(m, 0, sizeof *m);
}

/* Part v of n items cut into V contiguous parts, the first n mod V one longer. */
static void part_of(int n, int V, int v, int *first, int *count)
{
    int q = n / V, r = n % V;
    *count = q + (v < r ? 1 : 0);
    *first = v * q + (v < r ? v : r);
}

moe_status moe_expert_map_build(int E, int N, int V, int rank, const int32_t *owner,
                                moe_expert_map *m, moe_error *err)
{
    if (!m) return moe_fail(err, MOE_ERR_INVALID_ARG, "expert map: NULL output");
    memset(m, 0, sizeof *m);
    if (E < 1) return moe_fail(err, MOE_ERR_INVALID_ARG, "expert map: E = %d experts", E);
    if (N < 1 || rank < 0 || rank >= N)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "expert map: rank %d of %d", rank, N);
    if (V < 1 || V > 4096)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "--ep-virtual %d: expected 1..4096", V);
    if ((int64_t)N * V > 1 << 20)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%d ranks x %d virtual ranks is too many", N,
                        V);
    if (!owner && N > E)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%d ranks but only %d experts: with contiguous slices every rank must "
                        "own at least one expert (use fewer ranks, or an explicit --expert-map "
                        "that leaves ranks empty)", N, E);
    const int G = N * V;
    m->E = E;
    m->N = N;
    m->V = V;
    m->G = G;
    m->rank = rank;
    m->explicit_map = owner != NULL;
    m->owner = moe_malloc((size_t)E * sizeof(int32_t), "expert owners", err);
    m->vowner = moe_malloc((size_t)E * sizeof(int32_t), "expert virtual owners", err);
    m->vlocal = moe_malloc((size_t)E * sizeof(int32_t), "expert virtual indices", err);
    m->vcount = moe_calloc((size_t)G, sizeof(int32_t), "virtual rank sizes", err);
    m->vfirst = moe_calloc((size_t)V, sizeof(int32_t), "virtual rank offsets", err);
    m->rank_count = moe_calloc((size_t)N, sizeof(int32_t), "rank sizes", err);
    if (!m->owner || !m->vowner || !m->vlocal || !m->vcount || !m->vfirst || !m->rank_count) {
        moe_expert_map_free(m);
        return MOE_ERR_NOMEM;
    }
    for (int e = 0; e < E; e++) {
        int r;
        if (owner) {
            r = owner[e];
            if (r < 0 || r >= N) {
                moe_expert_map_free(m);
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "expert map: expert %d is owned by rank %d, outside [0, %d)", e,
                                r, N);
            }
        } else {
            /* contiguous slices: ranks < E mod N own q+1 experts, the others q */
            int q = E / N, rem = E % N, cut = rem * (q + 1);
            r = e < cut ? e / (q + 1) : rem + (e - cut) / q;
        }
        m->owner[e] = r;
        m->rank_count[r]++;
    }
    /* Each rank's ids ascending, cut into V parts: walk the experts once per rank in id
     * order, counting the position within the rank. */
    int32_t *seen = moe_calloc((size_t)N, sizeof(int32_t), "rank positions", err);
    if (!seen) {
        moe_expert_map_free(m);
        return MOE_ERR_NOMEM;
    }
    for (int e = 0; e < E; e++) {
        int r = m->owner[e], pos = seen[r]++;
        int n = m->rank_count[r];
        /* which part holds position pos: parts of size q+1 first, then q */
        int q = n / V, rem = n % V, cut = rem * (q + 1);
        int v = pos < cut ? pos / (q + 1) : rem + (q > 0 ? (pos - cut) / q : 0);
        int first = 0, count = 0;
        part_of(n, V, v, &first, &count);
        m->vowner[e] = r * V + v;
        m->vlocal[e] = pos - first;
        m->vcount[r * V + v]++;
    }
    free(seen);
    m->El = m->rank_count[rank];
    if (m->El > 0) {
        m->local_ids = moe_malloc((size_t)m->El * sizeof(int32_t), "local expert ids", err);
        if (!m->local_ids) {
            moe_expert_map_free(m);
            return MOE_ERR_NOMEM;
        }
        int l = 0;
        for (int e = 0; e < E; e++)
            if (m->owner[e] == rank) m->local_ids[l++] = e;
    }
    for (int v = 0; v < V; v++) {
        int first = 0, count = 0;
        part_of(m->El, V, v, &first, &count);
        m->vfirst[v] = first;
    }
    return MOE_OK;
}

bool moe_expert_map_contiguous(const moe_expert_map *m, int *begin)
{
    if (m->El == 0) {
        if (begin) *begin = 0;
        return true;
    }
    for (int l = 1; l < m->El; l++)
        if (m->local_ids[l] != m->local_ids[0] + l) return false;
    if (begin) *begin = m->local_ids[0];
    return true;
}

uint64_t moe_expert_map_hash(const moe_expert_map *m)
{
    uint64_t h = MOE_FNV1A_INIT;
    int32_t dims[3] = {m->E, m->N, m->V};
    h = moe_fnv1a(h, dims, sizeof dims);
    return moe_fnv1a(h, m->owner, (size_t)m->E * sizeof(int32_t));
}

moe_status moe_expert_map_parse(const char *json, const char *what, int E, int N,
                                int32_t **owner_out, moe_error *err)
{
    *owner_out = NULL;
    cJSON *root = cJSON_Parse(json);
    if (!root) return moe_fail(err, MOE_ERR_FORMAT, "%s: not valid JSON", what);
    moe_status st = MOE_OK;
    int32_t *owner = NULL;
    const cJSON *lists = cJSON_GetObjectItemCaseSensitive(root, "experts_per_rank");
    if (!cJSON_IsArray(lists)) {
        st = moe_fail(err, MOE_ERR_FORMAT,
                      "%s: expected {\"experts_per_rank\": [[ids of rank 0], [ids of rank 1], "
                      "...]}", what);
        goto done;
    }
    int n = cJSON_GetArraySize(lists);
    if (n != N) {
        st = moe_fail(err, MOE_ERR_INVALID_ARG,
                      "%s: experts_per_rank has %d lists but the job has %d ranks", what, n, N);
        goto done;
    }
    owner = moe_malloc((size_t)E * sizeof *owner, "expert owners", err);
    if (!owner) {
        st = MOE_ERR_NOMEM;
        goto done;
    }
    for (int e = 0; e < E; e++) owner[e] = -1;
    int r = 0;
    const cJSON *list;
    cJSON_ArrayForEach(list, lists) {
        if (!cJSON_IsArray(list)) {
            st = moe_fail(err, MOE_ERR_FORMAT, "%s: experts_per_rank[%d] is not a list", what, r);
            goto done;
        }
        const cJSON *id;
        cJSON_ArrayForEach(id, list) {
            double v = cJSON_IsNumber(id) ? id->valuedouble : -1.0;
            if (!cJSON_IsNumber(id) || v != (double)(int)v || v < 0 || v >= E) {
                st = moe_fail(err, MOE_ERR_INVALID_ARG,
                              "%s: experts_per_rank[%d] holds %s, expected expert ids in [0, %d)",
                              what, r, cJSON_IsNumber(id) ? "an id out of range" : "a non-number",
                              E);
                goto done;
            }
            int e = (int)v;
            if (owner[e] >= 0) {
                st = moe_fail(err, MOE_ERR_UNSUPPORTED,
                              "%s: expert %d is listed for rank %d and rank %d: each expert must "
                              "have exactly one owner (replication is not supported)",
                              what, e, owner[e], r);
                goto done;
            }
            owner[e] = r;
        }
        r++;
    }
    for (int e = 0; e < E; e++)
        if (owner[e] < 0) {
            st = moe_fail(err, MOE_ERR_INVALID_ARG,
                          "%s: expert %d is not listed for any rank: every expert of [0, %d) "
                          "needs exactly one owner", what, e, E);
            goto done;
        }
done:
    cJSON_Delete(root);
    if (st != MOE_OK) {
        free(owner);
        return st;
    }
    *owner_out = owner;
    return MOE_OK;
}

#define MAX_MAP_FILE (64u << 20)

moe_status moe_expert_map_load_file(const char *path, int E, int N, int32_t **owner,
                                    moe_error *err)
{
    *owner = NULL;
    if (!path) return moe_fail(err, MOE_ERR_INVALID_ARG, "--expert-map: no file name");
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return moe_fail(err, MOE_ERR_IO, "--expert-map %s: cannot open: %s", path,
                        strerror(errno));
    char *buf = NULL;
    long len = -1;
    moe_status st = MOE_OK;
    if (fseek(fp, 0, SEEK_END) == 0) len = ftell(fp);
    if (len < 0 || (unsigned long)len > MAX_MAP_FILE) {
        st = moe_fail(err, MOE_ERR_IO, "--expert-map %s: cannot read (size %ld)", path, len);
        goto done;
    }
    rewind(fp);
    buf = moe_malloc((size_t)len + 1, "expert map text", err);
    if (!buf) {
        st = MOE_ERR_NOMEM;
        goto done;
    }
    if (fread(buf, 1, (size_t)len, fp) != (size_t)len) {
        st = moe_fail(err, MOE_ERR_IO, "--expert-map %s: short read", path);
        goto done;
    }
    buf[len] = '\0';
    char what[320];
    snprintf(what, sizeof what, "--expert-map %s", path);
    st = moe_expert_map_parse(buf, what, E, N, owner, err);
done:
    free(buf);
    fclose(fp);
    return st;
}
