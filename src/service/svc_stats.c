/* svc_stats.c — the service's counters, latency percentiles, error frames and wake-ups. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "svc_internal.h"

void svc_wake(svc_shared *sh)
{
    char c = 1;
    /* The pipe is non-blocking: when it is full a wake-up is already pending. */
    ssize_t w = write(sh->wake_w, &c, 1);
    (void)w;
}

void svc_stats_latency(svc_shared *sh, double seconds)
{
    double us = seconds * 1e6;
    uint32_t v = us < 0 ? 0 : us > 4e9 ? 4000000000u : (uint32_t)us;
    sh->lat_us[sh->lat_n % SVC_LAT_WINDOW] = v;
    sh->lat_n++;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

uint32_t svc_percentile(uint32_t *v, size_t n, double p)
{
    if (n == 0) return 0;
    qsort(v, n, sizeof *v, cmp_u32);
    /* nearest rank: the smallest value with at least p% of the samples at or below it */
    double rank = p / 100.0 * (double)n;
    size_t i = (size_t)rank;
    if ((double)i < rank) i++;
    if (i == 0) i = 1;
    if (i > n) i = n;
    return v[i - 1];
}

void svc_stats_snapshot(svc_shared *sh, moe_proto_stats *out)
{
    *out = sh->st;
    out->uptime_us = (uint64_t)((moe_now() - sh->t_start) * 1e6);
    out->queue_depth = sh->q_len;
    out->queue_tokens = sh->q_tokens;
    size_t n = sh->lat_n < SVC_LAT_WINDOW ? (size_t)sh->lat_n : SVC_LAT_WINDOW;
    out->latency_samples = n;
    if (n) {
        uint32_t tmp[SVC_LAT_WINDOW];
        memcpy(tmp, sh->lat_us, n * sizeof *tmp);
        out->latency_p50_us = svc_percentile(tmp, n, 50);
        out->latency_p90_us = svc_percentile(tmp, n, 90);
        out->latency_p99_us = svc_percentile(tmp, n, 99);
        out->latency_max_us = tmp[n - 1];
    }
}

uint8_t *svc_error_frame(const moe_proto_header *req, moe_status st, const char *msg, size_t *len)
{
    size_t n = strnlen(msg, MOE_PROTO_MAX_MESSAGE);
    moe_proto_header h = moe_proto_header_init((uint16_t)(req->op | MOE_OP_REPLY), req->request_id);
    h.layer = req->layer;
    h.dtype = req->dtype;
    h.T = req->T;
    h.H = req->H;
    h.status = (uint32_t)st;
    h.payload_len = n;
    uint8_t *f = malloc(MOE_PROTO_HEADER_SIZE + n);
    if (!f) {
        *len = 0;
        return NULL;
    }
    moe_proto_encode_header(&h, f);
    memcpy(f + MOE_PROTO_HEADER_SIZE, msg, n);
    *len = MOE_PROTO_HEADER_SIZE + n;
    return f;
}
