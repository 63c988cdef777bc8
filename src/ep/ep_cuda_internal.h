/*
 * ep_cuda_internal.h — what ep_cuda.c (context, transports, forward) and ep_cuda_bwd.c
 * (backward) share. Not installed; see ep_cuda.h for the API.
 *
 * Buffers. Every device buffer is one of the DB_* ids below, in one of two sets: set 0 is the
 * forward's, set 1 the backward's. They are kept apart so that a backward that has to grow
 * its buffers never moves memory a captured forward graph points to. Set 0 is sized at
 * creation in sync-free mode (max_tokens_per_rank) and never grows there.
 * Row layouts are ep_internal.h's: send rows ordered (chunk c, round v, destination rank q),
 * receive rows (chunk c, round v, source rank p); C = 1 except for the chunked forward.
 * DB_DCOUNT holds C*G counts and DB_BASE C*G send-row bases (chunk-major). In sync-free mode every (v, q) / (v, p) block is a
 * slot of M rows at row (v*N + q)*M.
 */
#ifndef MOE_EP_CUDA_INTERNAL_H
#define MOE_EP_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <nccl.h>

#include "ep_cuda.h"
#include "moe_kernels.h"
#include "ep_internal.h"

enum {
    /* source side: T rows */
    DB_LOGITS, DB_IDS, DB_W, DB_TDEST, DB_TN, DB_TROW, DB_DCOUNT, DB_BASE,
    DB_SGU, DB_SACT, DB_SHOUT,
    /* dispatch out / combine back: S rows */
    DB_SEND_X, DB_SEND_IDS, DB_SEND_W, DB_SEND_DOUT, DB_BACK, DB_BACK_DW,
    /* dispatch in / combine out: R rows */
    DB_RECV_X, DB_RECV_IDS, DB_RECV_W, DB_RECV_DOUT, DB_PART, DB_PART_DW,
    /* sync-free: slot counts and the compacted rows of one round */
    DB_SCNT, DB_RCNT, DB_CX, DB_CIDS, DB_CW, DB_CPART,
    /* the receiver's scratch for one round of Rmax rows (Rmax*k expert rows) */
    DB_COUNTS, DB_OFFS, DB_GATHER, DB_SORT, DB_GU, DB_ACT, DB_ROWS, DB_DA0, DB_DGU,
    /* backward, source side */
    DB_SRC_DW, DB_DLOGITS, DB_DXR, DB_DXS, DB_DSACT, DB_DSGU, DB_GREP,
    DB_NUM
};

typedef struct ep_dbuf {
    void *p;
    size_t cap;
} ep_dbuf;

struct moe_ep_cuda_ctx {
    moe_ep_ctx *ep;       /* communicator, validated options, MPI transport (counts and the
                             MPI payload), counters; its w is the caller's host slice */
    moe_ep_options opts;  /* the caller's options, transport resolved */
    bool use_nccl, syncfree, plain, forced, llama, shared;
    int device, rank, N, V, G, E, El, epv, H, I, k, Is, D;
    moe_config cfg;
    moe_dtype dt;
    size_t dsz;
    int64_t M;   /* max_tokens_per_rank (0: sized per call) */
    int64_t Rc;  /* sync-free: rows one virtual rank computes per call */
    cudaStream_t s, s1;
    cudaEvent_t ev_fork, ev_join, ev_sync;
    cublasHandle_t h, h1;
    void *blas_ws, *blas_ws1;
    ncclComm_t nccl;
    /* weights on the device: router [E,H], w13 [El,2I,H], w2 [El,H,I], Llama-4 shared
     * gate|up [2Is,H] (gate rows then up rows) and down [H,Is] */
    void *router, *w13, *w2, *sgu_w, *sdown;
    cuda_block *blk; /* the plain path (N = 1, V = 1, router's routing) */
    int blk_T;
    bool blk_bwd;
    ep_dbuf d[2][DB_NUM];
    bool presized; /* set 0 was sized at creation (sync-free): it must not grow */
    /* pinned host memory: the MPI transport's staging (per set and buffer), counts, bases */
    ep_dbuf hb[2][DB_NUM];
    int32_t *h_dcount;
    int64_t *h_base;
    float *h_grep;
    /* chunked pipeline (options.chunks = C > 1): the communication stream (NCCL), a
     * timing origin, "all chunks packed", and 6 timing events per chunk (dispatch start /
     * done, compute begin / end, combine start / done) */
    cudaStream_t s2;
    cudaEvent_t ev_t0, ev_pk, *ev_tl;
    int32_t *d_status; /* sync-free overflow: [0] flag, [1] most rows seen */
    /* how this context's grouped GEMMs run (all on s, one after the other): its own tile
     * scheduler counters (the block of the plain path has its own) */
    moe_kernel_tuning tuning;
    int64_t *d_slotbase; /* sync-free: [G] first send row of each destination's slot */
};

/* Error helpers (use `c` and `err` of the caller). */
#define EPC_CU(call, what)                                                                     \
    do {                                                                                       \
        cudaError_t epc_e_ = (call);                                                           \
        if (epc_e_ != cudaSuccess)                                                             \
            return moe_fail(err, MOE_ERR_CUDA, "rank %d: %s: %s", c->rank, (what),             \
                            cudaGetErrorString(epc_e_));                                       \
    } while (0)
#define EPC_NCCL(call, what)                                                                   \
    do {                                                                                       \
        ncclResult_t epc_r_ = (call);                                                          \
        if (epc_r_ != ncclSuccess)                                                             \
            return moe_fail(err, MOE_ERR_NCCL, "rank %d: %s failed: %s", c->rank, (what),      \
                            ncclGetErrorString(epc_r_));                                       \
    } while (0)

/* The device buffer (set, id), grown to at least `bytes` (set 0 of a presized ctx never
 * grows: needing more is an internal error). */
moe_status epc_dneed(moe_ep_cuda_ctx *c, int set, int id, size_t bytes, moe_error *err);
static inline void *epc_d(const moe_ep_cuda_ctx *c, int set, int id) { return c->d[set][id].p; }
/* Pinned host staging buffer (set, id) of at least `bytes`. */
moe_status epc_hneed(moe_ep_cuda_ctx *c, int set, int id, size_t bytes, moe_error *err);

/* Row-major C[M,N] = op(A) op(B) (cuda_block's convention: a_km = A stored [K,M], b_kn = B
 * stored [K,N]), fp32 accumulation, inputs in c->dt, C in dtype `cdt` (c->dt or fp32). */
moe_status epc_gemm(moe_ep_cuda_ctx *c, cublasHandle_t h, moe_dtype cdt, int M, int N, int K,
                    const void *A, int lda, bool a_km, const void *B, int ldb, bool b_kn,
                    void *C, int ldc, const char *what, moe_error *err);

/* Wait for the ctx's stream; with NCCL, polls the communicator for asynchronous errors. */
moe_status epc_stream_wait(moe_ep_cuda_ctx *c, moe_error *err);

/* Route T tokens (router GEMM + top-k, or the forced routing through the host). */
moe_status epc_route(moe_ep_cuda_ctx *c, int set, int T, const void *x, int64_t g0,
                     void *logits, int32_t *ids, void *w, moe_error *err);
/* Index of this rank's first token among all ranks' (MPI_Exscan). */
moe_status epc_global_offset(moe_ep_cuda_ctx *c, int T, int64_t *g0, moe_error *err);

/* Device plan of T tokens in C chunks (chunk i = tokens [cb[i], cb[i+1]); cb NULL when C = 1)
 * into set's DB_TDEST/TN/TROW (per token, rows relative to the chunk) and DB_DCOUNT (C*G),
 * the counts to the host in one copy, one counts exchange (collective), the capacity check and
 * the dest bases (set's DB_BASE, C*G absolute send rows).
 * *phase on return: EPC_PLAN_AGREED (failed before the exchange; every rank returns the same
 * error), EPC_PLAN_FATAL (the exchange failed: ep_fatal was called) or EPC_PLAN_EXCHANGED
 * (the status is this rank's capacity check: the caller agrees on it before moving data). */
enum { EPC_PLAN_AGREED = 0, EPC_PLAN_FATAL = 1, EPC_PLAN_EXCHANGED = 2 };
moe_status epc_plan_sized(moe_ep_cuda_ctx *c, int set, int T, const int32_t *ids, int C,
                          const int32_t *cb, ep_plan *p, int *phase, moe_error *err);

/* Move nb buffers of every round: forward (back = false) from send rows to receive rows, or
 * back from receive rows to send rows. dev_send/dev_recv are device buffers; with MPI they
 * are staged through set's pinned buffers (ids hid[b]). */
moe_status epc_exchange(moe_ep_cuda_ctx *c, int set, const ep_plan *p, bool back, int nb,
                        void *const *dev_send, void *const *dev_recv, const size_t *row_bytes,
                        const int *hid_send, const int *hid_recv, const char *const *what,
                        moe_error *err);

/* Counters of a sized call (every chunk and round) into c->ep->call, and the timeline's
 * tokens and rows per chunk. */
void epc_count(moe_ep_cuda_ctx *c, const ep_plan *p, bool backward);
void epc_call_end(moe_ep_cuda_ctx *c, moe_ep_stats *stats, double t0);
moe_status epc_check_call(moe_ep_cuda_ctx *c, const char *fn, int T, const void *x,
                          const void *a, const char *aname, const void *b, const char *bname,
                          moe_error *err);
/* The plain path's block, with room for T tokens (and backward scratch when bwd). */
moe_status epc_plain_block(moe_ep_cuda_ctx *c, int T, bool bwd, moe_error *err);

/* Shared expert forward on s1 for T tokens of set: sgu, sact (and out when non-NULL). */
moe_status epc_shared_forward(moe_ep_cuda_ctx *c, int set, int T, const void *x, void *out,
                              moe_error *err);
/* Fork s1 from s / join s back. */
moe_status epc_fork(moe_ep_cuda_ctx *c, moe_error *err);
moe_status epc_join(moe_ep_cuda_ctx *c, moe_error *err);

/* Expert-slice pointers of virtual rank v (local index) in the device weights. */
static inline const char *epc_w13(const moe_ep_cuda_ctx *c, int v)
{
    return (const char *)c->w13 + (size_t)v * c->epv * 2 * c->I * c->H * c->dsz;
}
static inline const char *epc_w2(const moe_ep_cuda_ctx *c, int v)
{
    return (const char *)c->w2 + (size_t)v * c->epv * c->H * c->I * c->dsz;
}

#endif /* MOE_EP_CUDA_INTERNAL_H */
