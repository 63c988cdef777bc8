/*
 * svc_internal.h — what the service's files share: the served layers, the request queue
 * between rank 0's I/O thread and its worker, the statistics, and the MPI work protocol.
 */
#ifndef MOE_SVC_INTERNAL_H
#define MOE_SVC_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "../client/moe_proto.h"
#include "config.h"
#include "ep/ep.h"
#include "svc.h"
#include "weights.h"

/* ---- served layers (svc_compute.c) ---- */

typedef struct svc_layer {
    int32_t number;          /* the layer number clients name (0 for a block's own file) */
    moe_layer *layer;        /* this rank's part: its expert slice (EP) or all experts */
} svc_layer;

typedef struct svc_model {
    moe_config cfg;
    moe_dtype dt;
    moe_backend backend;
    int nranks;
    bool ep;                 /* experts sharded over the ranks (else replicated on each) */
    moe_ep_comm *comm;       /* the ranks' communicator (EP placement) */
    int nlayers;
    svc_layer *layers;
    int max_local_T;         /* rows one rank brings at most (ceil(max_batch / nranks)) */
} svc_model;

/* Resolve the config and choose the placement (not collective; same answer on every rank
 * given the same options). */
moe_status svc_model_plan(svc_model *m, const moe_serve_options *o, int nranks, moe_error *err);
/* Load every served layer on this rank: collective over comm when m->ep (every rank returns
 * the same status then), local otherwise. local_rank (within the node) picks the GPU on the
 * CUDA backend. */
moe_status svc_model_load(svc_model *m, const moe_serve_options *o, MPI_Comm comm, int local_rank,
                          moe_error *err);
void svc_model_free(svc_model *m);
/* THE call that runs a layer: x [T,H] -> out [T,H], logits [T,E] (optional). Every rank calls
 * it once per batch, T = its share (0 included); collective in the expert-parallel placement. */
moe_status svc_layer_forward(svc_model *m, int layer_index, int T, const void *x, void *out,
                             void *logits, moe_error *err);

/* ---- requests and the queue (rank 0) ---- */

typedef struct svc_request {
    struct svc_request *next;
    uint64_t conn_id;        /* the connection's unique id (connections are looked up by it) */
    uint64_t request_id;
    int layer_index;
    int32_t layer;
    uint32_t T;
    uint16_t flags;
    uint8_t *x;              /* [T,H] payload as received */
    uint64_t reserved;       /* bytes-in-flight reservation, released when the reply is out */
    double t_received;       /* moe_now() when the last payload byte arrived */
    /* filled by the worker */
    uint8_t *reply;          /* a whole reply frame (header + payload), ready to write */
    size_t reply_len;
} svc_request;

#define SVC_LAT_WINDOW 4096

typedef struct svc_shared {
    pthread_mutex_t mu;
    pthread_cond_t cv;       /* the worker waits here for requests (CLOCK_MONOTONIC) */
    svc_request *q_head, *q_tail;
    uint64_t q_len, q_tokens;
    svc_request *done_head, *done_tail; /* finished by the worker, for the I/O thread */
    bool draining;           /* no new requests; the worker exits once the queue is empty */
    bool worker_done;
    int wake_w;              /* write end of the I/O thread's wake-up pipe */
    /* statistics (under mu) */
    moe_proto_stats st;
    double t_start;
    uint32_t lat_us[SVC_LAT_WINDOW];
    uint64_t lat_n;          /* samples ever recorded; the window holds the last min(n, W) */
} svc_shared;

void svc_wake(svc_shared *sh); /* nudge the I/O thread's poll() */
/* Record one latency sample (caller holds mu). */
void svc_stats_latency(svc_shared *sh, double seconds);
/* A snapshot with the percentiles computed (caller holds mu). */
void svc_stats_snapshot(svc_shared *sh, moe_proto_stats *out);
/* The p-th percentile (0..100, nearest rank) of n values, sorting v in place. */
uint32_t svc_percentile(uint32_t *v, size_t n, double p);

/* Build an error reply frame (malloc'ed) answering h. */
uint8_t *svc_error_frame(const moe_proto_header *h, moe_status st, const char *msg, size_t *len);

/* ---- the I/O thread (svc_net.c) ---- */

typedef struct svc_net_args {
    svc_shared *sh;
    const moe_serve_options *o;
    const svc_model *m;
    int nranks;
    int listen_fd;
    int wake_r;              /* read end of the wake-up pipe (also written by the signal handler) */
    const char *unix_path;   /* unlinked when the listener closes (NULL for TCP) */
} svc_net_args;
void *svc_net_thread(void *arg);
/* Rank 0: SIGTERM/SIGINT start a drain (the handler writes to wake_w), SIGPIPE ignored. */
moe_status svc_signals_install(int wake_w, moe_error *err);
void svc_signals_restore(void);

/* ---- the worker and the MPI protocol (svc_worker.c) ---- */

/* Rank 0: batch and run until draining and empty, then release the other ranks. */
void svc_worker_root(MPI_Comm comm, svc_shared *sh, svc_model *m, const moe_serve_options *o);
/* Ranks > 0: run batches until rank 0 says exit. */
void svc_worker_rank(MPI_Comm comm, svc_model *m, const moe_serve_options *o);
/* MPI failure while serving: log and MPI_Abort the job. Never returns. */
void svc_mpi_fatal(MPI_Comm comm, int rc, const char *what) __attribute__((noreturn));

#endif /* MOE_SVC_INTERNAL_H */
