/*
 * layer.h — the MoE layer object behind moe_ep.h's moe_layer, and the small set of operations
 * each backend (the CPU twin in src/cpu/cpu_backend.c, CUDA in src/cuda/cuda_backend*.c)
 * implements. The EP driver (src/ep/ep_driver*.c) composes them; nothing else computes a
 * layer. Internal: not installed.
 *
 * Memory. "Backend memory" is host memory on the CPU and device memory of the layer's GPU on
 * CUDA. Every operation below reads and writes backend memory and is enqueued on the layer's
 * current stream (CUDA: L->stream, set by the caller of the driver for the call; the CPU runs
 * each operation to completion). The shared expert runs on a side stream between fork() and
 * join() (CPU: in order).
 *
 * Shapes. T tokens, H hidden, I expert width, E experts, k top-k, Is shared width. A "slice"
 * is a run of this process's local experts [first, first + count) (local index = position in
 * the ascending list of local ids, expert_map.h); rows handed to the experts carry k id slots
 * holding the index of the expert WITHIN the slice (or -1: not this slice's), and k weights.
 * On the plain path (one rank, no virtual ranks) the slice is every expert and the ids are the
 * router's global ids, which are then the same numbers.
 */
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include <stdbool.h>
#include <stdint.h>

#include "../config.h"
#include "../moe_stages.h"
#include "../weights.h"
#include "expert_map.h"

typedef struct moe_ep_comm moe_ep_comm;
typedef struct moe_layer_backend_ops moe_layer_backend_ops;

/* Phase markers (timing on): the driver records these around its steps. */
enum {
    MOE_MARK_START = 0,
    MOE_MARK_ROUTED,    /* router GEMM + top-k done */
    MOE_MARK_PERMUTED,  /* sort (plain) / plan + pack (EP) done */
    MOE_MARK_DISPATCHED,
    MOE_MARK_GEMM1,
    MOE_MARK_GEMM2,
    MOE_MARK_END,       /* combined (+ shared) */
    MOE_MARK_SHARED0,   /* on the side stream: shared expert start / end */
    MOE_MARK_SHARED1,
    MOE_NUM_MARKS
};

/* The weights as the backend reads them (backend memory). w13 [El,2I,H] (gate rows then up
 * rows) and w2 [El,H,I]; the shared expert as one [2Is,H] gate|up matrix and down [H,Is]. */
typedef struct moe_layer_weights {
    void *router, *w13, *w2, *shared_gu, *shared_down;
} moe_layer_weights;

/* Workspace buffer sets: forward and backward are apart, so a backward that grows its
 * buffers never moves memory a captured forward graph points to; IO holds the host API's
 * staging copies (CUDA). */
enum { WS_FWD = 0, WS_BWD = 1, WS_IO = 2, WS_PIN = 3, WS_NUM_SETS }; /* WS_PIN: pinned host
                                                                      mirrors for MPI staging */

/* Ids of workspace buffers (one namespace for both sets). */
enum {
    /* source side, T rows */
    WB_LOGITS, WB_IDS, WB_W, WB_TDEST, WB_TN, WB_TROW, WB_DCOUNT, WB_BASE, WB_SHOUT,
    WB_SGU, WB_SACT,
    /* dispatch out / combine back (S rows), dispatch in / combine out (R rows) */
    WB_SEND_X, WB_SEND_IDS, WB_SEND_W, WB_SEND_DOUT, WB_BACK, WB_BACK_DW,
    WB_RECV_X, WB_RECV_IDS, WB_RECV_W, WB_RECV_DOUT, WB_PART, WB_PART_DW,
    /* sync-free slots: counts and one round's compacted rows */
    WB_SCNT, WB_RCNT, WB_CX, WB_CIDS, WB_CW, WB_CDOUT, WB_CPART, WB_CPART_DW,
    /* the experts' scratch for Rmax rows of one round (Rmax*k expert-order rows) */
    WB_COUNTS, WB_OFFS, WB_GATHER, WB_SORT, WB_GU, WB_ACT, WB_ROWS, WB_DA0, WB_DGU, WB_DACT,
    WB_DTOP,
    /* backward, source side */
    WB_SRC_DW, WB_DLOGITS, WB_DXR, WB_DXS, WB_DSACT, WB_DSGU, WB_GREP, WB_GREP_ALL, WB_GREP_RND,
    /* gradients not wanted / in another layout */
    WB_G_ROUTER, WB_G_W13, WB_G_W2, WB_G_SG, WB_G_SU, WB_G_SD,
    /* host API staging (WS_IO) */
    WB_IO_X, WB_IO_OUT, WB_IO_LOGITS, WB_IO_DOUT, WB_IO_DLOG, WB_IO_DX,
    WB_NUM
};

typedef struct moe_workspace moe_workspace;
/* Backend memory of buffer (set, id), at least `bytes` (grown when smaller and the set is not
 * frozen; a frozen set that is too small is MOE_ERR_INTERNAL, naming the buffer). Growing
 * waits for the device first (the old memory may be in use). */
moe_status moe_ws_need(moe_workspace *ws, int set, int id, size_t bytes, void **p,
                       moe_error *err);
/* Grow (set, id) to at least `bytes` even in a frozen set: layer creation sizes the buffers
 * of every layer sharing the workspace before any call (create all layers, then capture). */
moe_status moe_ws_reserve(moe_workspace *ws, int set, int id, size_t bytes, moe_error *err);
bool moe_ws_valid(const moe_workspace *ws);
int moe_ws_users(const moe_workspace *ws);
size_t moe_ws_total_bytes(const moe_workspace *ws);
/* Free (refused while layers use it). */
moe_status moe_ws_destroy_checked(moe_workspace *ws, moe_error *err);
/* The buffer's current pointer (NULL if never sized). */
void *moe_ws_ptr(const moe_workspace *ws, int set, int id);
/* Freeze a set: from now on it never reallocates (sync-free sizing, graph capture). */
void moe_ws_freeze(moe_workspace *ws, int set);
moe_backend moe_ws_backend(const moe_workspace *ws);
int moe_ws_device(const moe_workspace *ws);
void moe_ws_attach(moe_workspace *ws, int delta); /* layers using it (destroy refuses > 0) */

/* ---- GPUs (src/layer/gpus.c) ---- */
/* GPUs this process can use: 0 in a build without CUDA, or when the runtime finds none. */
int moe_gpu_count(void);

/* ---- backend memory (src/layer/memory.c: host malloc, or cudaMalloc on the device) ---- */
moe_status moe_mem_alloc(moe_backend b, int device, size_t bytes, const char *what, void **p,
                         moe_error *err);
void moe_mem_free(moe_backend b, int device, void *p);
/* Host memory the GPU can copy from asynchronously (cudaMallocHost; malloc on the CPU). */
moe_status moe_mem_alloc_pinned(moe_backend b, size_t bytes, const char *what, void **p,
                                moe_error *err);
void moe_mem_free_pinned(moe_backend b, void *p);

/* ---- the layer ---- */

#define MOE_LAYER_MAGIC 0x5259414cu /* "LAYR" */

typedef struct moe_layer_saved moe_layer_saved;
struct ep_state;

/* Running totals and the last call (moe_ep.h's moe_layer_stats). */
typedef struct moe_layer_counters {
    uint64_t calls_forward, calls_backward, tokens_local, tokens_computed;
    uint64_t rows_sent, rows_recv, bytes_sent, bytes_recv;
    uint64_t *peer_rows_sent, *peer_rows_recv, *peer_bytes_sent, *peer_bytes_recv; /* [N] */
    double seconds;
    int last_call;
    int64_t last_tokens;
    double last_seconds, last_device_ms;
    double phase_ms[MOE_STATS_NUM_PHASES];
    int nchunks;
    moe_chunk_timeline timeline[MOE_STATS_MAX_CHUNKS];
    int route_one_launch; /* CUDA: the last route ran as one launch (router, top-k and sort) */
} moe_layer_counters;

struct moe_layer {
    uint32_t magic;
    moe_config cfg;
    moe_dtype dt;
    size_t dsz;
    int H, I, E, k, Is;
    bool llama, shared;
    moe_backend backend;
    int device; /* CUDA device, -1 on the CPU */
    int threads;
    const moe_layer_backend_ops *ops;
    void *be;   /* the backend's state (streams, handles, scratch counters) */

    moe_expert_map map; /* placement; map.El local experts */
    moe_layer_weights w; /* what the backend reads */
    moe_weights host;   /* canonical host copy: the CPU backend's resident weights (else the
                           staging of an upload, freed after it) */
    bool borrowed;      /* w points into caller memory */
    moe_weights_layout layout; /* of the source (gradients are written in it) */
    moe_weight_naming naming;  /* a file's tensor names (the CLI writes gradients under them) */
    char prefix[256];
    uint64_t weight_uploads, bytes_resident, weight_bytes_read;
    uint64_t replicated_hash; /* FNV of the router and shared-expert bytes (fingerprint) */
    moe_named_tensor *src_tensors; /* copied TENSORS sources, for reload (views only) */
    int src_count;

    moe_ep_comm *comm; /* NULL: one rank */
    bool plain;        /* the plain fused path: one rank, V = 1, the router's routing */
    int64_t max_tokens;
    moe_workspace *ws;
    bool own_ws;
    bool save_for_backward, timing, exact_hf;
    /* the grouped GEMMs' configuration (CUDA): forced ("" = automatic), or autotuned */
    char kernel_config[128];
    bool autotune;
    char autotune_cache[512];
    moe_layer_saved *saved;
    /* the EP tables on the backend: vowner [E], vlocal [E] (int32) */
    int32_t *d_vowner, *d_vlocal;

    void *stream; /* the current call's stream (CUDA: cudaStream_t; NULL = legacy) */
    void *host_stream; /* the stream the host-memory calls use (CUDA: the layer's own) */
    const void *host_fwd_x; /* the host x of the last host-API forward (CUDA: its saved state
                               belongs to that x, not to the staging buffer it went through) */
    int ws_set;   /* the workspace set of the current call (WS_FWD or WS_BWD) */

    struct ep_state *ep; /* with a communicator */
    uint64_t fingerprint; /* agreed at creation; every collective call re-checks it */
    uint64_t calls;       /* forward calls so far (keys the saved state) */
    moe_layer_counters ctr;
};
typedef struct moe_layer moe_layer;

/* ---- the operations a backend implements ---- */

/* The experts of one slice on R rows (the fused path's stages): sort by expert, GEMM1 with
 * permute_x (Llama-4: rows scaled by their weight before the MMA) and the SiLU-and-mul
 * epilogue, GEMM2 with permute_y (Qwen3: the weight in the epilogue) into flat rows [R*k,H].
 * The slots of other slices are left unwritten. */
typedef struct moe_experts_args {
    int R;               /* rows (a bound when rows past the real ones carry ids -1) */
    int first, count;    /* the slice (local indices) */
    const void *x;       /* [R,H] */
    const int32_t *ids;  /* [R,k] index within the slice, or -1 */
    const void *w;       /* [R,k] */
    void *rows;          /* [R*k,H] out: flat rows (GEMM2's output) */
    /* optional intermediates (NULL: the backend's scratch): the sort and GEMM1's output */
    int32_t *counts, *offsets, *gather; /* [count], [count+1], [R*k] */
    void *gemm1_out;     /* [R*k,2I] rounded GEMM1 output (backward and check mode) */
    void *act;           /* [R*k,I] */
    bool presorted;      /* counts/offsets/gather already hold this sort (plain route) */
    bool zero_rows;      /* write zeros into the flat rows of slots outside the slice (check
                            mode compares gemm2_out; otherwise they are never read) */
    int rows_cap;        /* size the scratch for max(R, rows_cap) rows, so a layer with a
                            token bound allocates once */
} moe_experts_args;

/* Backward of moe_experts_args's forward for the loss sum(rows * drows), where the gradient of
 * every flat row of token t is dout[t] (the rows are summed over k): the slice's weight
 * gradients dW13 [count,2I,H], dW2 [count,H,I] (overwritten; zeros for experts with no rows),
 * dxs [R*k,H] flat rows of the input gradient (unscaled: Llama-4's score is applied by the sum
 * over k; rows of other slices unwritten), and dtop [R*k] fp32 (the gradient of each slot's
 * weight: Qwen3's top-k weight, Llama-4's score; 0 for other slices). */
typedef struct moe_experts_bwd_args {
    int R, first, count;
    const void *x, *dout;   /* [R,H] */
    const int32_t *ids;
    const void *w;
    void *dW13, *dW2;       /* the slice's gradients (canonical layout) */
    void *dxs;              /* [R*k,H] */
    float *dtop;            /* [R*k] */
    /* the forward's intermediates when saved (else recomputed: sort and GEMM1) */
    const int32_t *offsets, *gather;
    const void *gemm1_out, *act;
    int rows_cap;           /* as in moe_experts_args */
} moe_experts_bwd_args;

/* out[t] = round(add[t] (+ add2[t]) + sum_j rows[t*k+j] * (scale ? scale[t*k+j] : 1)) in fp32,
 * j ascending; with filter_count >= 0 a slot whose ids[t*k+j] is outside [0, filter_count) is
 * skipped (its row was never written). add, add2 optional; out may alias add. */
typedef struct moe_sumk_args {
    int T;
    const void *rows, *scale, *add, *add2;
    const int32_t *ids;
    int filter_count; /* -1: no filter */
    void *out;
} moe_sumk_args;

struct moe_layer_backend_ops {
    const char *name;
    /* backend state for a new layer (streams, handles), then place(): the weights on the
     * backend */
    moe_status (*create)(moe_layer *L, moe_error *err);
    void (*destroy)(moe_layer *L);
    /* L->w from L->host (canonical host copy; the CPU reads it in place, CUDA uploads it) or,
     * when L->borrowed, the caller's pointers already in L->w; the shared expert's gate and up
     * stacked into one [2Is,H] matrix. Sets L->bytes_resident. Again on reload. */
    moe_status (*place)(moe_layer *L, moe_error *err);
    /* copy host bytes into backend memory (synchronous) */
    moe_status (*upload)(moe_layer *L, void *dst, const void *src, size_t bytes, moe_error *err);
    moe_status (*download)(moe_layer *L, void *dst, const void *src, size_t bytes,
                           moe_error *err);
    /* asynchronous copies/fills on the layer's stream */
    moe_status (*copy)(moe_layer *L, void *dst, const void *src, size_t bytes, moe_error *err);
    moe_status (*zero)(moe_layer *L, void *p, size_t bytes, moe_error *err);
    /* at the start of every call: make the layer's device current (CUDA), its thread count the
     * calling thread's (CPU) */
    moe_status (*enter)(moe_layer *L, moe_error *err);
    /* wait for the layer's streams (and check asynchronous errors) */
    moe_status (*sync)(moe_layer *L, moe_error *err);
    /* the side stream for the shared expert */
    moe_status (*fork)(moe_layer *L, moe_error *err);
    moe_status (*join)(moe_layer *L, moe_error *err);
    /* timing markers (timing on): record / elapsed ms between two, -1 if unknown */
    moe_status (*mark)(moe_layer *L, int marker, bool side, moe_error *err);
    double (*mark_ms)(moe_layer *L, int from, int to);

    /* logits [T,E] = round(x @ router^T); ids/w [T,k] = the router's top-k. With sort (plain
     * path only) also the sort over all experts into counts/offsets/gather (may be one
     * launch for small T). */
    moe_status (*route)(moe_layer *L, int T, const void *x, void *logits, int32_t *ids, void *w,
                        int32_t *counts, int32_t *offsets, int32_t *gather, moe_error *err);
    moe_status (*experts_forward)(moe_layer *L, const moe_experts_args *a, moe_error *err);
    moe_status (*experts_backward)(moe_layer *L, const moe_experts_bwd_args *a,
                                   moe_error *err);
    moe_status (*sum_k)(moe_layer *L, const moe_sumk_args *a, moe_error *err);
    /* Llama-4's shared expert (on the side stream): sgu [T,2Is], sact [T,Is], out [T,H] */
    moe_status (*shared_forward)(moe_layer *L, int T, const void *x, void *sgu, void *sact,
                                 void *out, moe_error *err);
    /* its backward from sgu/sact of a forward of the same x: dx_shared [T,H], weight
     * gradients into g_gu [2Is,H] and g_down [H,Is] in dtype gdt (the layer's, or fp32
     * partials for an EP sum) */
    moe_status (*shared_backward)(moe_layer *L, int T, const void *x, const void *dout,
                                  const void *sgu, const void *sact, void *dsact, void *dsgu,
                                  void *dx_shared, moe_dtype gdt, void *g_gu, void *g_down,
                                  moe_error *err);
    /* dlogits [T,E] = the router's backward from dtop [T*k] (+ d_logits_in); then
     * g_router [E,H] = dlogits^T x in dtype gdt, and dx_router [T,H] = dlogits @ router */
    moe_status (*router_backward)(moe_layer *L, int T, const void *x, const void *logits,
                                  const int32_t *ids, const float *dtop, bool through_topk,
                                  const void *d_logits_in, void *dlogits, moe_dtype gdt,
                                  void *g_router, void *dx_router, moe_error *err);
    /* [n,r,c] -> [n,c,r] (gradients in Llama-4's layout) */
    moe_status (*transpose)(moe_layer *L, int n, int r, int c, const void *src, void *dst,
                            moe_error *err);
    /* fp32 [n] -> dtype (rounded) */
    moe_status (*round_f32)(moe_layer *L, size_t n, const float *src, void *dst,
                            moe_error *err);

    /* ---- expert parallelism: the dispatch plan and the deterministic reductions ----
     * (the layouts of kernels/ep_pack.h; G virtual ranks, D = min(k, G) destinations) */
    moe_status (*ep_plan)(moe_layer *L, int T, const int32_t *ids, int32_t *tdest, int32_t *tn,
                          int32_t *trow, int32_t *dcount, moe_error *err);
    moe_status (*ep_pack)(moe_layer *L, int T, const void *x, const void *dout,
                          const int32_t *ids, const void *w, const int32_t *tdest,
                          const int32_t *tn, const int32_t *trow, const int64_t *base,
                          void *sx, void *sdout, int32_t *sids, void *sw, moe_error *err);
    moe_status (*ep_reduce)(moe_layer *L, int T, const void *add, const void *add2,
                            const void *back, const int64_t *base, const int32_t *tdest,
                            const int32_t *tn, const int32_t *trow, void *out, moe_error *err);
    moe_status (*ep_dweights)(moe_layer *L, int T, const int32_t *ids, const float *back_dw,
                              const int64_t *base, const int32_t *tdest, const int32_t *tn,
                              const int32_t *trow, float *dw, moe_error *err);
    /* sync-free slots (NULL on backends without them) */
    moe_status (*ep_slot_counts)(moe_layer *L, const int32_t *dcount, int32_t *scnt,
                                 moe_error *err);
    /* compact one virtual rank's N slots (x, ids, w and, in backward, dout) into cap rows;
     * an overflow raises the layer's device flag (reported by check_errors) */
    moe_status (*ep_compact)(moe_layer *L, int64_t slot_rows, const int32_t *rcnt,
                             const void *sx, const int32_t *sids, const void *sw,
                             const void *sdout, int64_t cap, void *cx, int32_t *cids, void *cw,
                             void *cdout, moe_error *err);
    /* the receive bound: the rows of n slot counts above limit raise the overflow flag */
    moe_status (*ep_check_total)(moe_layer *L, int n, const int32_t *rcnt, int64_t limit,
                                 moe_error *err);
    moe_status (*ep_expand)(moe_layer *L, int64_t slot_rows, const int32_t *rcnt,
                            size_t row_bytes, const void *compact, int64_t cap, void *slots,
                            moe_error *err);
    /* dst[i] = round(sum over r < n_parts of parts[r*n + i]) in ascending r (fp32) */
    moe_status (*sum_parts)(moe_layer *L, int n_parts, size_t n, const float *parts,
                            moe_dtype dt, void *dst, moe_error *err);
    /* the device's overflow / non-finite records (sync-free receive bound, router logits) */
    moe_status (*check_errors)(moe_layer *L, moe_error *err);
    /* the kernel each GEMM of the last call ran ("" on the CPU) */
    void (*gemm_report)(const moe_layer *L, int gemm, char *kernel, size_t klen, char *config,
                        size_t clen);
};

extern const moe_layer_backend_ops moe_cpu_backend_ops;
#ifdef MOE_HAVE_CUDA
extern const moe_layer_backend_ops moe_cuda_backend_ops;
#endif

/* Record a timing marker when timing is on (backends call it between their launches). */
static inline void moe_layer_mark(moe_layer *L, int marker, bool side)
{
    if (L->timing) L->ops->mark(L, marker, side, NULL);
}

/* Slice pointers into the layer's weights. */
static inline const void *moe_layer_w13(const moe_layer *L, int first)
{
    return (const char *)L->w.w13 + (size_t)first * 2 * L->I * L->H * L->dsz;
}
static inline const void *moe_layer_w2(const moe_layer *L, int first)
{
    return (const char *)L->w.w2 + (size_t)first * L->H * L->I * L->dsz;
}

/* moe_layer_create with an already resolved config (resolved != NULL; `config` is then
 * ignored): the benchmark's --routed-only drops Llama-4's shared expert this way. */
moe_status moe_layer_create_config(const char *config, const moe_config *resolved,
                                   const moe_weights_source *src, const moe_layer_options *opts,
                                   moe_layer **out);

/* The names the weights were loaded under (FILE sources; MOE_NAMING_RANDOM otherwise). */
static inline moe_weight_naming moe_layer_naming(const moe_layer *L, const char **prefix)
{
    if (prefix) *prefix = L->prefix;
    return L->naming;
}

/* The stage-by-stage view of one plain forward, for the correctness mode (src/check.c):
 * every intermediate of moe_fwd_state, downloaded into host buffers `host` (from
 * moe_fwd_state_alloc for T, with gemm1_out when keep_gemm1). One rank only. */
moe_status moe_layer_forward_stages(moe_layer *L, int T, const void *x_host,
                                    moe_fwd_state *host, moe_error *err);

#endif /* MOE_LAYER_H */
