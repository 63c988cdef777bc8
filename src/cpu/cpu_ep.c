/* cpu_ep.c — CPU twins of the expert-parallel pack / unpack kernels (see cpu_ep.h and
 * kernels/ep_pack.h). */
#include "cpu_ep.h"

#include <string.h>

#include "cpu_fused_internal.h"

#define MAXK 64 /* as MOE_EP_PACK_MAX_K */

moe_status cpu_ep_plan(int T, int k, const int32_t *ids, int E, const int32_t *vowner, int G,
                       int32_t *tdest, int32_t *tn, int32_t *trow, int32_t *dcount,
                       moe_error *err)
{
    if (T < 0 || k < 1 || k > MAXK || G < 1 || E < 1 || !vowner || !dcount)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "cpu_ep_plan: need T >= 0, 1 <= k <= %d, G, E >= 1 (T=%d k=%d G=%d E=%d)",
                        MAXK, T, k, G, E);
    memset(dcount, 0, (size_t)G * sizeof *dcount);
    if (T == 0) return MOE_OK;
    const int D = k < G ? k : G;
    /* Each token's distinct owners, ascending. */
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        int d[MAXK], nd = 0;
        for (int j = 0; j < k; j++) {
            int e = ids[(size_t)t * k + j];
            if (e < 0 || e >= E) continue;
            int o = vowner[e];
            bool dup = false;
            for (int a = 0; a < nd; a++) dup |= d[a] == o;
            if (dup) continue;
            int i = nd;
            while (i > 0 && d[i - 1] > o) {
                d[i] = d[i - 1];
                i--;
            }
            d[i] = o;
            nd++;
        }
        for (int a = 0; a < D; a++) tdest[(size_t)t * D + a] = a < nd ? d[a] : -1;
        tn[t] = nd;
    }
    /* Rows: the tokens going to each destination numbered in ascending token order. */
    for (int t = 0; t < T; t++)
        for (int a = 0; a < tn[t]; a++) {
            int d = tdest[(size_t)t * D + a];
            trow[(size_t)t * D + a] = dcount[d]++;
        }
    return MOE_OK;
}

void cpu_ep_pack(int T, int k, int G, const int32_t *vowner, const int32_t *vlocal,
                 size_t row_bytes, size_t w_bytes, const void *x, const void *dout,
                 const int32_t *ids, const void *w, const int32_t *tdest, const int32_t *tn,
                 const int32_t *trow, const int64_t *base, void *sx, void *sdout, int32_t *sids,
                 void *sw)
{
    const int D = k < G ? k : G;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        for (int a = 0; a < tn[t]; a++) {
            int d = tdest[(size_t)t * D + a];
            int64_t r = base[d] + trow[(size_t)t * D + a];
            memcpy((char *)sx + r * row_bytes, (const char *)x + (size_t)t * row_bytes, row_bytes);
            if (sdout)
                memcpy((char *)sdout + r * row_bytes, (const char *)dout + (size_t)t * row_bytes,
                       row_bytes);
            for (int j = 0; j < k; j++) {
                int e = ids[(size_t)t * k + j];
                bool mine = e >= 0 && vowner[e] == d;
                sids[r * k + j] = mine ? vlocal[e] : -1;
                char *dst = (char *)sw + (size_t)(r * k + j) * w_bytes;
                if (mine) memcpy(dst, (const char *)w + ((size_t)t * k + j) * w_bytes, w_bytes);
                else memset(dst, 0, w_bytes); /* zero bits: +0 in every dtype */
            }
        }
}

void cpu_ep_reduce(moe_dtype dt, int T, int H, int G, int k, const void *add, const void *add2,
                   const void *back, const int64_t *base, const int32_t *tdest,
                   const int32_t *tn, const int32_t *trow, void *out)
{
    const int D = k < G ? k : G;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            size_t i = (size_t)t * H + h;
            float acc = add ? cf_load(dt, add, i) : 0.0f;
            if (add2) acc += cf_load(dt, add2, i);
            for (int a = 0; a < tn[t]; a++) {
                int64_t r = base[tdest[(size_t)t * D + a]] + trow[(size_t)t * D + a];
                acc += cf_load(dt, back, (size_t)r * H + h);
            }
            cf_store(dt, out, i, acc);
        }
}

void cpu_ep_dweights(int T, int k, int G, const int32_t *vowner, const int32_t *ids,
                     const float *back_dw, const int64_t *base, const int32_t *tdest,
                     const int32_t *tn, const int32_t *trow, float *dw)
{
    const int D = k < G ? k : G;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            int e = ids[(size_t)t * k + j];
            float v = 0.0f;
            if (e >= 0) {
                int d = vowner[e];
                for (int a = 0; a < tn[t]; a++)
                    if (tdest[(size_t)t * D + a] == d) {
                        v = back_dw[(base[d] + trow[(size_t)t * D + a]) * k + j];
                        break;
                    }
            }
            dw[(size_t)t * k + j] = v;
        }
}

void cpu_ep_slot_counts(int N, int V, const int32_t *dcount, int32_t *scnt)
{
    for (int d = 0; d < N * V; d++) scnt[(d % V) * N + d / V] = dcount[d];
}

static int64_t slot_total(int N, const int32_t *rcnt, int p, int64_t *off)
{
    int64_t s = 0;
    for (int q = 0; q < N; q++) {
        if (q == p) *off = s;
        s += rcnt[q];
    }
    return s;
}

void cpu_ep_compact(int N, int64_t slot_rows, const int32_t *rcnt, int k, size_t row_bytes,
                    size_t w_bytes, const void *sx, const int32_t *sids, const void *sw,
                    int64_t cap, void *cx, int32_t *cids, void *cw, int32_t *status)
{
    int64_t off = 0, total = slot_total(N, rcnt, -1, &off);
    for (int p = 0; p < N; p++) {
        slot_total(N, rcnt, p, &off);
        for (int64_t r = 0; r < rcnt[p]; r++) {
            int64_t i = p * slot_rows + r, dst = off + r;
            if (dst >= cap) {
                status[0] = 1;
                int32_t tc = (int32_t)(total < 0x7fffffff ? total : 0x7fffffff);
                if (status[1] < tc) status[1] = tc;
                continue;
            }
            memcpy((char *)cx + dst * row_bytes, (const char *)sx + i * row_bytes, row_bytes);
            memcpy(cids + dst * k, sids + i * k, (size_t)k * 4);
            memcpy((char *)cw + dst * k * w_bytes, (const char *)sw + i * k * w_bytes,
                   (size_t)k * w_bytes);
        }
    }
    for (int64_t i = total; i < cap; i++) {
        for (int j = 0; j < k; j++) cids[i * k + j] = -1;
        memset((char *)cw + i * k * w_bytes, 0, (size_t)k * w_bytes);
    }
}

void cpu_ep_compact_rows(int N, int64_t slot_rows, const int32_t *rcnt, size_t row_bytes,
                         const void *slots, int64_t cap, void *compact)
{
    int64_t off = 0, total = slot_total(N, rcnt, -1, &off);
    for (int p = 0; p < N; p++) {
        slot_total(N, rcnt, p, &off);
        for (int64_t r = 0; r < rcnt[p] && off + r < cap; r++)
            memcpy((char *)compact + (off + r) * row_bytes,
                   (const char *)slots + (p * slot_rows + r) * row_bytes, row_bytes);
    }
    for (int64_t i = total; i < cap; i++) memset((char *)compact + i * row_bytes, 0, row_bytes);
}

void cpu_ep_expand(int N, int64_t slot_rows, const int32_t *rcnt, size_t row_bytes,
                   const void *compact, int64_t cap, void *slots)
{
    for (int p = 0; p < N; p++) {
        int64_t off = 0;
        slot_total(N, rcnt, p, &off);
        for (int64_t r = 0; r < rcnt[p]; r++) {
            char *dst = (char *)slots + (p * slot_rows + r) * row_bytes;
            if (off + r < cap) memcpy(dst, (const char *)compact + (off + r) * row_bytes, row_bytes);
            else memset(dst, 0, row_bytes);
        }
    }
}
