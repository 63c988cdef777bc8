/*
 * svc.h — the moe-ep service: serve MoE layers over a socket from an MPI job.
 *
 * Shape of the job (docs/SERVICE.md has the long form):
 *   rank 0   an I/O thread (poll()-based, non-blocking sockets, per-connection buffers and
 *            timeouts) parses frames (docs/protocol.md) and queues FORWARD requests; the main
 *            thread is the worker: it batches queued requests of one layer (up to
 *            max_batch_tokens rows, waiting at most max_wait_us after the oldest), broadcasts
 *            the batch to every rank, runs its share, gathers the outputs and hands each
 *            request exactly its own rows back to the I/O thread.
 *   rank > 0 waits for the next batch in a sleep-poll loop (MPI_Test on an MPI_Ibcast with a
 *            nanosleep backoff up to idle_poll_us), so an idle rank does not spin a core
 *            (Open MPI's blocking waits busy-poll), then runs its share.
 * Only rank 0's worker thread calls MPI (MPI_THREAD_FUNNELED is enough).
 * The tokens of a batch are split over the ranks as if data-parallel (rank r gets a contiguous
 * block of rows); every rank runs the layer on its block (svc_compute.c is the one place that
 * runs it): expert-parallel (moe_ep_forward, each rank holding E/N experts) when the placement
 * allows, else on the local engine with every expert on every rank.
 */
#ifndef MOE_SVC_H
#define MOE_SVC_H

#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>

#include "common.h"

typedef enum moe_serve_ep {
    MOE_SERVE_EP_AUTO = 0, /* expert-parallel when possible (CPU backend, N > 1, E % N == 0) */
    MOE_SERVE_EP_ON = 1,   /* expert-parallel, or a startup error saying why not */
    MOE_SERVE_EP_OFF = 2,  /* every rank holds all experts and runs its rows locally */
} moe_serve_ep;

typedef struct moe_serve_options {
    const char *listen;           /* "unix:PATH" or "tcp:HOST:PORT" (PORT 0: any free port) */
    const char *config;           /* preset name or HF config.json */
    const char *weights;          /* .safetensors, model.safetensors.index.json, or random:SEED */
    const int *layers;            /* decoder layers to serve (model.layers.N); NULL: the file */
    int nlayers;                  /*   uses the block's own names and is served as layer 0 */
    moe_backend backend;
    moe_serve_ep ep;              /* how the experts are placed over the ranks */
    moe_dtype dtype;              /* activation dtype; MOE_NUM_DTYPES = the config's */
    int threads;                  /* CPU threads per rank; 0 (default) = moe_default_threads() */
    const char *ready_file;       /* written by rank 0 once serving: "PID\nADDRESS\n" */
    int max_batch_tokens;         /* rows per batch, and per request (default 4096) */
    int max_wait_us;              /* batching latency budget (default 500) */
    int max_connections;          /* open connections (default 64) */
    uint64_t max_inflight_bytes;  /* payload + reply bytes of admitted requests (256 MiB) */
    int max_pending_per_conn;     /* requests queued per connection (default 64) */
    int io_timeout_ms;            /* a partial frame or an unread reply may stall this long (10 s) */
    int idle_poll_us;             /* ranks > 0: longest sleep between polls when idle (1000) */
    bool allow_remote_shutdown;   /* honour the SHUTDOWN op */
    /* Called on rank 0 once serving (after the ready file is written), e.g. to print. */
    void (*on_ready)(void *user, const char *bound_address, const char *placement);
    void *user;
} moe_serve_options;

void moe_serve_options_default(moe_serve_options *o);

/* One served layer through the public API: spec is a checkpoint path (layer < 0: the block's
 * own names; else decoder layer N) or "random:SEED" (the counter-based generator, seed
 * SEED + layer for layer >= 0), so benchmarks can serve a preset without a checkpoint. With
 * comm, collective and expert-parallel. The client's verification creates its reference
 * through this too, so both sides agree. */
moe_status moe_serve_layer_create(const char *config, const char *spec, int layer, moe_dtype dt,
                                  moe_backend backend, int64_t max_tokens, int threads,
                                  moe_ep_comm *comm, moe_layer **out, moe_error *err);

/* Collective over comm: every rank calls it with the same options. Loads the layers, serves
 * until SIGTERM/SIGINT reaches rank 0 or a SHUTDOWN request is honoured, drains in-flight
 * requests, and returns MOE_OK on every rank. A startup failure on any rank (bad config,
 * missing tensor, address in use) is returned on EVERY rank with the failing rank's message.
 * An MPI failure while serving ends the job with MPI_Abort (a clear message first).
 * Rank 0 installs handlers for SIGTERM/SIGINT (drain) and ignores SIGPIPE. */
moe_status moe_serve_run(MPI_Comm comm, const moe_serve_options *o, moe_error *err);

#endif /* MOE_SVC_H */
