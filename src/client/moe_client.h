/*
 * moe_client.h — client library of the moe-ep service (`moe-ep serve`). C99 and C++-clean;
 * needs only this header and moe_ep.h (for moe_status and moe_dtype).
 *
 *   moe_client *c = moe_client_new();
 *   if (moe_client_connect(c, "unix:/tmp/moe.sock") != MOE_OK) puts(moe_client_last_error(c));
 *   moe_client_forward(c, 0, MOE_DTYPE_F32, T, H, x, out, NULL, 0);   // x, out: [T,H]
 *   moe_client_free(c);
 *
 * One handle = one connection, used by one thread at a time (open one handle per thread for
 * concurrency). Calls are synchronous: each sends one request and waits for its reply.
 * Errors: a moe_status; moe_client_last_error() says why. An error the SERVER reported
 * (wrong shape, unknown layer, busy, ...) keeps the connection usable and its message starts
 * with "server: "; a transport or framing error (connection lost, timeout, malformed reply)
 * closes the connection, and later calls fail with MOE_ERR_IO until moe_client_connect again.
 * The wire format is docs/protocol.md.
 */
#ifndef MOE_CLIENT_H
#define MOE_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "moe_ep.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_client moe_client;

/* A handle, not connected yet; NULL only when out of memory. Default timeout: 60 s. */
moe_client *moe_client_new(void);
/* Close the connection (if any) and free the handle. NULL is a no-op. */
void moe_client_free(moe_client *c);
/* Connect to "unix:PATH" or "tcp:HOST:PORT" (closing a previous connection first). */
moe_status moe_client_connect(moe_client *c, const char *addr);
void moe_client_disconnect(moe_client *c);
/* Bound on each call (connect, and send + receive of one request); <= 0 restores 60 s. */
void moe_client_set_timeout(moe_client *c, int timeout_ms);
/* The reason of the last failed call ("" after a success). Owned by the handle. */
const char *moe_client_last_error(const moe_client *c);

/* Run one served layer on T rows: x [T,H] in dtype (the layer's dtype) -> out [T,H].
 * router_logits (optional, [T,E] in dtype, E = the model's expert count) requests the router
 * logits as well; pass NULL and E = 0 to skip them. */
moe_status moe_client_forward(moe_client *c, int layer, moe_dtype dtype, int T, int H,
                              const void *x, void *out, void *router_logits, int E);

#define MOE_CLIENT_MAX_LAYERS 1024
typedef struct moe_client_info {
    int nranks;          /* MPI ranks the server runs on */
    int nlayers;         /* served layers, listed in layers[] */
    int hidden, num_experts, top_k, inter, shared_inter;
    moe_dtype dtype;     /* of every served layer's activations */
    int arch;            /* 0 Qwen3-MoE, 1 Llama-4 */
    int max_tokens;      /* per-request (and per-batch) row limit */
    int max_wait_us;     /* the batching latency budget */
    char model[64];
    char backend[16];
    int32_t layers[MOE_CLIENT_MAX_LAYERS];
} moe_client_info;
moe_status moe_client_info_get(moe_client *c, moe_client_info *info);

#define MOE_CLIENT_STATUS_SLOTS 16
typedef struct moe_client_stats {
    uint64_t uptime_us;
    uint64_t requests_ok, requests_failed, tokens, batches, batch_tokens_max;
    uint64_t queue_depth, queue_tokens;
    uint64_t connections_open, connections_total, connections_rejected, connections_timed_out;
    uint64_t bytes_in_flight;
    uint64_t latency_samples, latency_p50_us, latency_p90_us, latency_p99_us, latency_max_us;
    uint64_t errors[MOE_CLIENT_STATUS_SLOTS]; /* error replies by moe_status */
} moe_client_stats;
moe_status moe_client_stats_get(moe_client *c, moe_client_stats *stats);

/* Ask the server to drain and exit (refused unless it runs with --allow-remote-shutdown). */
moe_status moe_client_shutdown(moe_client *c);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CLIENT_H */
