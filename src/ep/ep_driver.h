/*
 * ep_driver.h — what the driver's files (ep_driver.c, ep_forward.c, ep_backward.c) share.
 * Internal.
 */
#ifndef MOE_EP_DRIVER_H
#define MOE_EP_DRIVER_H

#include "ep.h"

/* The buffers of one transfer: send-layout and receive-layout buffers (backend memory), their
 * row bytes, the ids of their pinned host mirrors (MPI staging of device rows) and names. */
typedef struct drv_bufs {
    int n;
    void *send[EP_XFER_MAX_BUFS];
    void *recv[EP_XFER_MAX_BUFS];
    size_t row[EP_XFER_MAX_BUFS];
    int pin_send[EP_XFER_MAX_BUFS], pin_recv[EP_XFER_MAX_BUFS];
    const char *what[EP_XFER_MAX_BUFS];
} drv_bufs;

/* Log, MPI_Abort when asked (peers may be blocked in a transfer), return st. */
moe_status drv_fatal(moe_layer *L, moe_status st, moe_error *err);
/* Start of a call: reset the last-call record; with EP agree on st, the call kind (1 forward,
 * 2 backward) and the layer fingerprint. */
moe_status drv_call_begin(moe_layer *L, int kind, moe_status st, moe_error *err);
/* The plain path over a one-rank communicator: T within max_tokens_per_rank, as the plan checks
 * it on the EP path (MOE_ERR_OVERFLOW). */
moe_status drv_plain_bound(const moe_layer *L, int T, moe_error *err);
/* End of a call: totals, and with timing the device times of the phases (waits for them). */
void drv_call_end(moe_layer *L, int kind, int T, double t0);
/* Rows and bytes of a sized call into the counters. */
void drv_count(moe_layer *L, const ep_plan *p, bool backward);
/* This rank's first global token index (forced routing). Collective. */
moe_status drv_global_offset(moe_layer *L, int T, int64_t *g0, moe_error *err);
/* Workspace buffer of the current set. */
moe_status drv_buf(moe_layer *L, int id, size_t bytes, void **p, moe_error *err);
/* Router + top-k, or the forced routing (through the host; synchronises). */
moe_status drv_route(moe_layer *L, int T, const void *x, int64_t g0, void *logits, int32_t *ids,
                     void *w, moe_error *err);
/* Round (c, v) of a sized transfer: start, and wait (then the staged rows are on the device). */
moe_status drv_xfer_start(moe_layer *L, const ep_plan *p, int c, int v, bool back,
                          const drv_bufs *xb, bool overlap, ep_request *req, moe_error *err);
moe_status drv_xfer_wait(moe_layer *L, const ep_plan *p, int c, int v, bool back,
                         const drv_bufs *xb, ep_request *req, moe_error *err);

/* ---- the steps of a sized call (ep_forward.c, ep_backward.c) ---- */

/* After the plan kernels: this rank's per-destination counts of C chunks (dcount, backend
 * memory; chunk bounds cb, or NULL with C = 1) to the host, the plan from them, then the counts
 * exchange. st is the status so far: a local failure is agreed on before anything is
 * exchanged. On failure the plan is freed (a failed exchange through drv_fatal). Collective. */
moe_status drv_plan_sized(moe_layer *L, moe_status st, int C, int T, const int32_t *cb,
                          const void *dcount, ep_plan *plan, moe_error *err);
/* Every rank's st agreed on (the buffers, the capacity check) before any payload moves; on
 * failure the plan is freed. Collective. */
moe_status drv_plan_agree(moe_layer *L, moe_status st, ep_plan *plan, moe_error *err);

/* ---- the steps of a sync-free call (ep_forward.c, ep_backward.c) ---- */

/* The buffers both directions use, all of a fixed size (G slots of M rows, Rc compacted rows):
 * the plan tables, the slot counts sent and received, the x / ids / weights slots on both
 * sides, the partial rows (part: computed here for the senders, back: returned to this rank),
 * and one virtual rank's compacted rows. The backward adds its dout rows and d-weights. */
typedef struct drv_slots {
    void *tdest, *tn, *trow, *dcount, *scnt, *rcnt;
    void *sx, *sids, *sw, *rx, *rids, *rw, *part, *back;
    void *cx, *cids, *cw, *cpart;
} drv_slots;
moe_status drv_slots_get(moe_layer *L, drv_slots *b, moe_error *err);
/* The dispatch, virtual rank by virtual rank: the slot counts (one row a peer), then the slots
 * of `rows` (M rows a peer). */
moe_status drv_slots_dispatch(moe_layer *L, const drv_slots *b, const drv_bufs *rows,
                              moe_error *err);
/* The combine: the slots of `rows` (M rows a peer) back to their sources. */
moe_status drv_slots_combine(moe_layer *L, const drv_bufs *rows, moe_error *err);
/* Virtual rank v's received slots (rows with the counts that came with them) compacted into
 * b's Rc rows; with rdout, the dout slots into cdout too (the backward). */
moe_status drv_slots_compact(moe_layer *L, const drv_slots *b, int v, const void *rdout,
                             void *cdout, moe_error *err);
/* Rc compacted rows of row_bytes each back into virtual rank v's slots of `slots`. */
moe_status drv_slots_expand(moe_layer *L, const drv_slots *b, int v, size_t row_bytes,
                            const void *compact, void *slots, moe_error *err);

/* ---- the forward's intermediates kept for the backward (save_for_backward) ---- */
typedef struct moe_layer_saved_bufs {
    void *logits, *w, *gemm1_out, *act, *sgu, *sact;
    int32_t *ids, *offsets, *gather;
} moe_layer_saved_bufs;
/* With save_for_backward on a plain layer: the layer's buffers for T tokens (grown as
 * needed) and true; false otherwise. */
bool drv_saved_bufs(moe_layer *L, int T, moe_layer_saved_bufs *b);
/* They now hold the forward of x (T tokens). */
void drv_saved_commit(moe_layer *L, const void *x, int T);
/* Whether they hold the LAST forward and it was of x (T tokens). */
bool drv_saved_match(moe_layer *L, const void *x, int T, moe_layer_saved_bufs *b);
/* The saved state no longer describes the next backward's x (the host API stages every x into
 * the same device buffer, so the pointer alone cannot tell). */
void drv_saved_forget(moe_layer *L);
void drv_saved_free(moe_layer *L);

#endif /* MOE_EP_DRIVER_H */
