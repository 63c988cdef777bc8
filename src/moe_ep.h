/*
 * moe_ep.h — the public C API of moe-ep (v1), an expert-parallel Mixture-of-Experts layer
 * engine: one MoE block (HuggingFace Qwen3-MoE or Llama-4 semantics) whose experts are spread
 * over the ranks of an MPI job, run forward and backward on the CPU or on a CUDA GPU.
 *
 * C99 and C++; includes no CUDA, MPI or NCCL header. Link with -lmoe_ep (pkg-config moe_ep, or
 * CMake find_package(moe_ep) and target moe_ep::moe_ep).
 *
 * Conventions (after NCCL's nccl.h):
 *   - Every handle is opaque. Every call returns a moe_status; MOE_OK is 0.
 *   - The reason for the last failure of a call made by this thread is moe_last_error()
 *     (thread-local; a successful call clears it).
 *   - Option structs begin with {size, magic}; initialise them with their _INIT macro and then
 *     set fields, so a library built with a later, larger struct still reads yours correctly.
 *     A struct whose size or magic is wrong is MOE_ERR_INVALID_ARG.
 *   - [in] arguments are read only during the call unless stated ("borrowed": must stay valid
 *     until the handle is destroyed); [out] arguments are written only on MOE_OK.
 *   - Streams are `void *` standing for cudaStream_t (NULL = the legacy default stream).
 *   - Tensors are dense row-major. A "device pointer" is memory of the layer's backend: host
 *     memory for MOE_BACKEND_CPU, CUDA device memory of the layer's GPU for MOE_BACKEND_CUDA.
 *
 * Thread safety: calls on DIFFERENT layers may run concurrently from different threads,
 * unless those layers share a workspace (moe_workspace) — a workspace is used by one call at
 * a time. Calls on the SAME layer must not overlap, on the host or on the device: every call
 * reuses the layer's scratch, so asynchronous calls given different streams must be ordered by
 * the caller (events, or one stream), and a host-memory call after an asynchronous one on
 * another stream must wait for that stream first. moe_version, moe_strerror,
 * moe_dtype_name, moe_dtype_size and moe_last_error may be called from any thread at any time.
 *
 * Expert parallelism: a layer created with an EP communicator (moe_ep_comm_create) holds only
 * its rank's experts; forward and backward are then collective over the communicator (every
 * rank calls them, in the same order, each with its own tokens; T may differ and be 0).
 * Without a communicator (or with one rank) the layer is the plain fused path.
 */
#ifndef MOE_EP_H
#define MOE_EP_H

#include <stddef.h>
#include <stdint.h>

#include "moe_ep_version.h" /* MOE_EP_VERSION_{MAJOR,MINOR,PATCH}, MOE_EP_VERSION_CODE */

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ status and version ---- */

/* Status codes. Values are stable: they travel in the service's wire protocol. */
typedef enum moe_status {
    MOE_OK = 0,
    MOE_ERR_INVALID_ARG = 1,   /* an argument is NULL, out of range, inconsistent or not
                                  initialised with its _INIT macro */
    MOE_ERR_IO = 2,            /* a file or socket could not be read or written */
    MOE_ERR_FORMAT = 3,        /* a file's content is malformed (safetensors, JSON, config) */
    MOE_ERR_UNSUPPORTED = 4,   /* valid but not supported here (dtype, model type, backend) */
    MOE_ERR_NOMEM = 5,         /* host or device memory could not be allocated */
    MOE_ERR_CUDA = 6,          /* a CUDA runtime / cuBLAS call failed */
    MOE_ERR_NCCL = 7,          /* an NCCL call failed */
    MOE_ERR_MPI = 8,           /* an MPI call failed */
    MOE_ERR_NO_DEVICE = 9,     /* the CUDA backend was asked for but no GPU / no CUDA build */
    MOE_ERR_CHECK_FAILED = 10, /* a correctness comparison exceeded its tolerance */
    MOE_ERR_TIMEOUT = 11,      /* a wait exceeded its limit (peer rank died, NCCL stuck) */
    MOE_ERR_INTERNAL = 12,     /* a bug: an invariant of moe-ep itself does not hold */
    MOE_ERR_NONFINITE = 13,    /* moe_layer_check_errors: non-finite router logits were seen */
    MOE_ERR_OVERFLOW = 14,     /* a bound given at creation was exceeded (max_tokens,
                                  max_recv_tokens): nothing was truncated, the call failed */
    MOE_NUM_STATUS
} moe_status;

/* A short constant name of a status ("invalid argument"); never NULL. */
const char *moe_strerror(moe_status status);
/* The detailed reason of this thread's last failed call ("" after a success). Thread-local;
 * valid until this thread's next moe-ep call. Never NULL. */
const char *moe_last_error(void);

/* MOE_EP_VERSION_CODE of the library actually loaded (compare with the header's to detect a
 * mismatch), and its "MAJOR.MINOR.PATCH" string. */
int moe_version(void);
const char *moe_version_string(void);

/* ------------------------------------------------------------------ dtypes ---- */

typedef enum moe_dtype {
    MOE_DTYPE_BF16 = 0,
    MOE_DTYPE_F16 = 1,
    MOE_DTYPE_F32 = 2,
    MOE_DTYPE_F64 = 3,     /* host only: the reference's gradient checks */
    MOE_DTYPE_F8_E4M3 = 4, /* recognised in files; not computed with */
    MOE_DTYPE_I32 = 5,
    MOE_DTYPE_I64 = 6,
    MOE_NUM_DTYPES
} moe_dtype;

/* "bf16", "fp16", "fp32", ...; NULL for an out-of-range value. */
const char *moe_dtype_name(moe_dtype dtype);
/* Bytes per element; 0 for an out-of-range value. */
size_t moe_dtype_size(moe_dtype dtype);

/* A view of caller memory: dense row-major, `ndim` dims (1..4). */
typedef struct moe_tensor_view {
    moe_dtype dtype;
    int ndim;
    int64_t shape[4];
    void *data;
} moe_tensor_view;

/* ------------------------------------------------------------------ backends ---- */

typedef enum moe_backend {
    MOE_BACKEND_CPU = 0,  /* the fused path's CPU twin (OpenMP) */
    MOE_BACKEND_CUDA = 1, /* the CUDA kernels (sm_90a wgmma on Hopper) */
    MOE_BACKEND_AUTO = 2, /* CUDA when this build has it and a GPU is usable, else CPU */
} moe_backend;

/* The CPU thread count the library uses when an option says 0: OMP_NUM_THREADS when set, else
 * the cores this process is bound to divided by the processes of this node bound to the same
 * cores (so 4 ranks sharing 8 cores use 2 each), at least 1. */
int moe_default_threads(void);

/* ------------------------------------------------------------------ workspace ---- */

/* Scratch memory for forward/backward. Layers on one device (and one stream) may share one
 * workspace so a many-layer model pays for one: it grows to the largest need of the layers
 * that use it, and serves one call at a time. A layer created without one makes its own. */
typedef struct moe_workspace moe_workspace;

/* [out] *ws. device: the CUDA device for MOE_BACKEND_CUDA (-1: the current device); ignored
 * on the CPU. The backend must match the layers that use it (MOE_BACKEND_AUTO resolves as for
 * layers). */
moe_status moe_workspace_create(moe_backend backend, int device, moe_workspace **ws);
/* Frees the memory. Every layer using it must be destroyed first (MOE_ERR_INVALID_ARG and
 * nothing freed otherwise). NULL is a no-op returning MOE_OK. */
moe_status moe_workspace_destroy(moe_workspace *ws);
/* Bytes currently allocated (host or device). */
moe_status moe_workspace_bytes(const moe_workspace *ws, size_t *bytes);

/* ------------------------------------------------------------------ EP communicator ---- */

/* Expert-parallel options (the same on every rank; checked at creation). */
typedef enum moe_transport {
    MOE_TRANSPORT_AUTO = 0, /* NCCL when every rank has its own GPU (CUDA layers), else MPI */
    MOE_TRANSPORT_MPI = 1,  /* host buffers, MPI_Alltoallv (device buffers staged) */
    MOE_TRANSPORT_NCCL = 2, /* grouped ncclSend/ncclRecv on device buffers, one GPU per rank */
} moe_transport;

#define MOE_EP_OPTIONS_MAGIC 0x4d455001u /* "MEP" 1 */
typedef struct moe_ep_options {
    uint32_t size;               /* sizeof(moe_ep_options) */
    uint32_t magic;              /* MOE_EP_OPTIONS_MAGIC */
    moe_transport transport;     /* default AUTO */
    int virtual_ranks;           /* V >= 1 (default 1): each process acts as V ranks, every
                                    piece still through the transport (the one-GPU way to run
                                    the NCCL path) */
    int chunks;                  /* C >= 1 (default 1): the forward's batch is cut in C chunks
                                    so transfers overlap the experts */
    int64_t max_tokens_per_rank; /* M: 0 (default) = buffers sized per call; > 0: every call's
                                    T <= M, buffers sized once at layer creation, and with
                                    NCCL the forward and backward never wait for the host
                                    (CUDA-graph capturable) */
    int64_t max_recv_tokens;     /* with M > 0: token rows one rank may receive in one call;
                                    0 = the worst case (ranks x M). More is MOE_ERR_OVERFLOW,
                                    never a truncation */
    int abort_on_fatal;          /* non-zero (default): MPI_Abort on a failure after data
                                    started moving, since peers may be blocked in a transfer */
    const char *route;           /* forced routing for tests and benchmarks: NULL or "router"
                                    (default), "uniform", "skewed", "all-to-one[:R]",
                                    "file:PATH", optionally ",w=uniform" (docs/EP.md) */
} moe_ep_options;
#define MOE_EP_OPTIONS_INIT                                                                   \
    { sizeof(moe_ep_options), MOE_EP_OPTIONS_MAGIC, MOE_TRANSPORT_AUTO, 1, 1, 0, 0, 1, NULL }

/* The ranks of an MPI communicator acting together on expert-parallel layers. */
typedef struct moe_ep_comm moe_ep_comm;

/* Collective over the MPI communicator given as its Fortran handle (MPI_Comm_c2f(comm); see
 * moe_ep_mpi.h for an MPI_Comm convenience). The communicator is duplicated (errors return
 * instead of aborting inside MPI); MPI must be initialised and stay so until destroy.
 * [in] opts may be NULL (defaults). Every rank gets the same status: a rank's bad option is
 * reported on the others as "rank R: <reason>". The transport (and the NCCL communicator) is
 * made when the first CUDA or CPU layer is created on it. */
moe_status moe_ep_comm_create(int32_t mpi_comm_fortran, const moe_ep_options *opts,
                              moe_ep_comm **comm);
/* Collective. Every layer created on it must be destroyed first. NULL is a no-op. */
moe_status moe_ep_comm_destroy(moe_ep_comm *comm);
/* This rank and the number of ranks (real, not virtual). */
moe_status moe_ep_comm_rank(const moe_ep_comm *comm, int *rank, int *nranks);

/* ------------------------------------------------------------------ weights ---- */

/* Where a layer's weights come from. */
typedef enum moe_weights_kind {
    MOE_WEIGHTS_FILE = 0,    /* path: a .safetensors file, a model.safetensors.index.json, or
                                a checkpoint directory holding either; with EP each rank reads
                                only its experts */
    MOE_WEIGHTS_RANDOM = 1,  /* seed: the counter-based generator (identical for any rank
                                count: each rank draws its slice of the same global tensors) */
    MOE_WEIGHTS_TENSORS = 2, /* tensors: caller-owned memory in a named layout */
} moe_weights_kind;

/* The layout (and names) of caller-owned tensors, and of the gradients backward writes. */
typedef enum moe_weights_layout {
    MOE_LAYOUT_CANONICAL = 0,  /* "router" [E,H], "w13" [E,2I,H] (gate rows then up rows),
                                  "w2" [E,H,I], Llama-4 "shared_gate"/"shared_up" [Is,H],
                                  "shared_down" [H,Is] */
    MOE_LAYOUT_QWEN3_HUB = 1,  /* Qwen3MoeSparseMoeBlock's state dict on the hub:
                                  "gate.weight" [E,H], "experts.{e}.gate_proj.weight" [I,H],
                                  "experts.{e}.up_proj.weight" [I,H],
                                  "experts.{e}.down_proj.weight" [H,I] */
    MOE_LAYOUT_QWEN3_FUSED = 2,/* transformers 5 in memory: "gate.weight" [E,H],
                                  "experts.gate_up_proj" [E,2I,H], "experts.down_proj" [E,H,I] */
    MOE_LAYOUT_LLAMA4 = 3,     /* Llama4TextMoe: "router.weight" [E,H],
                                  "experts.gate_up_proj" [E,H,2I], "experts.down_proj" [E,I,H],
                                  "shared_expert.{gate,up,down}_proj.weight" */
} moe_weights_layout;

typedef struct moe_named_tensor {
    const char *name;
    moe_tensor_view view;
} moe_named_tensor;

#define MOE_WEIGHTS_SOURCE_MAGIC 0x4d575331u /* "MWS1" */
typedef struct moe_weights_source {
    uint32_t size;  /* sizeof(moe_weights_source) */
    uint32_t magic; /* MOE_WEIGHTS_SOURCE_MAGIC */
    moe_weights_kind kind;
    /* FILE */
    const char *path;
    int layer;      /* -1: the block's own state-dict names; N >= 0: decoder layer N of a full
                       checkpoint (any prefix moe-ep knows: model.layers.N.mlp.,
                       model.layers.N.feed_forward., language_model.model.layers.N.feed_forward.) */
    /* RANDOM */
    uint64_t seed;
    /* TENSORS: num_tensors views in `layout`, in the layer's dtype, memory of the layer's
     * backend when borrowed (host memory otherwise). Fused [E,...] tensors may hold all E
     * experts (each rank reads its own) or exactly this rank's experts in ascending id order;
     * per-expert names are needed for this rank's experts only. */
    moe_weights_layout layout;
    const moe_named_tensor *tensors;
    int num_tensors;
    int borrow;     /* non-zero: read in place on every call (the layout must be CANONICAL
                       or QWEN3_FUSED, whose expert tensors the kernels read as they are, with
                       all local experts contiguous, no shared expert, the layer's dtype, and
                       the memory the backend's; the tensors are borrowed; other layouts are
                       MOE_ERR_UNSUPPORTED); 0: copied at creation (and again by
                       moe_layer_reload_weights) */
} moe_weights_source;
#define MOE_WEIGHTS_SOURCE_INIT                                                               \
    { sizeof(moe_weights_source), MOE_WEIGHTS_SOURCE_MAGIC, MOE_WEIGHTS_RANDOM, NULL, -1, 0,    \
      MOE_LAYOUT_CANONICAL, NULL, 0, 0 }

/* ------------------------------------------------------------------ layers ---- */

typedef struct moe_layer moe_layer;

#define MOE_LAYER_OPTIONS_MAGIC 0x4d4c4f31u /* "MLO1" */
typedef struct moe_layer_options {
    uint32_t size;           /* sizeof(moe_layer_options) */
    uint32_t magic;          /* MOE_LAYER_OPTIONS_MAGIC */
    moe_backend backend;     /* default AUTO */
    int device;              /* CUDA device; -1 (default): the node-local rank's GPU (modulo
                                the GPU count when ranks share GPUs) */
    moe_dtype dtype;         /* activation/compute dtype (bf16, fp16, fp32); MOE_NUM_DTYPES
                                (default) = the config's torch_dtype */
    int64_t max_tokens;      /* bound on T per call (0 = none: buffers grow as needed). With
                                it, T > max_tokens is MOE_ERR_OVERFLOW, creation checks that
                                max_tokens fits the memory, and the scratch grows to its
                                max_tokens size during the first calls and never after (run one
                                call of max_tokens eagerly before capturing a graph) */
    int threads;             /* CPU threads; 0 (default) = moe_default_threads() */
    const char *kernel_config; /* CUDA: force every grouped GEMM to this configuration
                                  ("128x128x64,w8,s3"; docs/KERNELS.md); NULL/"auto" = default */
    int autotune;            /* CUDA: time the compiled configurations on the real shapes and
                                keep the fastest (cached on disk) */
    const char *autotune_cache; /* NULL: $MOE_AUTOTUNE_CACHE or ~/.cache/moe-ep/autotune.json */
    int exact_hf_rounding;   /* CUDA: HF's exact rounding points (x*score rounded before
                                GEMM1, IEEE SiLU) instead of the fast defaults (docs/KERNELS.md
                                states the distance); the CPU backend is always exact */
    int save_for_backward;   /* keep the forward's intermediates in the layer (memory for
                                max_tokens tokens) so a backward of the same x right after
                                skips recomputing routing and GEMM1 */
    int timing;              /* record per-phase device times of every call (moe_layer_stats);
                                costs a few events per call */
    moe_workspace *workspace;/* shared scratch (borrowed), or NULL: the layer makes its own */
    moe_ep_comm *comm;       /* expert-parallel over these ranks (borrowed), or NULL */
    const int32_t *expert_map; /* with comm: owner rank of each of the E experts ([E], borrowed
                                  during creation), or NULL: contiguous slices, the first E mod N
                                  ranks owning one more. Every rank passes the same map */
} moe_layer_options;
#define MOE_LAYER_OPTIONS_INIT                                                                \
    { sizeof(moe_layer_options), MOE_LAYER_OPTIONS_MAGIC, MOE_BACKEND_AUTO, -1, MOE_NUM_DTYPES, \
      0, 0, NULL, 0, NULL, 0, 0, 0, NULL, NULL, NULL }

/* Create a layer: parse `config` (a preset name — qwen3-30b-a3b, llama4-scout, tiny-qwen3,
 * tiny-llama4 — or the path of an HF config.json), take the weights from `src`, place them on
 * the backend (uploaded once: later calls never upload them again, whatever T comes), and
 * allocate scratch. Collective when opts->comm is set (every rank gets the same status).
 * [in] opts may be NULL (defaults). [out] *layer. */
moe_status moe_layer_create(const char *config, const moe_weights_source *src,
                            const moe_layer_options *opts, moe_layer **layer);
/* Waits for the layer's work and frees it. Collective with a communicator. NULL: no-op. */
moe_status moe_layer_destroy(moe_layer *layer);

#define MOE_LAYER_INFO_MAGIC 0x4d4c4931u /* "MLI1" */
typedef struct moe_layer_info {
    uint32_t size;        /* set by the caller: sizeof(moe_layer_info) */
    uint32_t magic;       /* set by the caller: MOE_LAYER_INFO_MAGIC */
    int hidden, inter, num_experts, top_k; /* H, I, E, k */
    int shared_inter;     /* Llama-4 shared expert width; 0 = none */
    int arch;             /* 0 Qwen3-MoE, 1 Llama-4 */
    moe_dtype dtype;
    moe_backend backend;  /* resolved (never AUTO) */
    int device;           /* CUDA device, -1 on the CPU */
    int rank, nranks, virtual_ranks;
    int num_local_experts;
    const int32_t *local_experts; /* [num_local_experts] global ids, ascending (owned by the
                                     layer) */
    uint64_t bytes_resident;   /* weights held by the layer on its backend */
    uint64_t workspace_bytes;  /* its workspace's current size */
    uint64_t weight_uploads;   /* times the weights were placed on the backend (1 after
                                  creation; +1 per moe_layer_reload_weights) */
    int64_t max_tokens;
    char transport[16];        /* "none" (plain path), "mpi" or "nccl" */
    char device_name[128];     /* "cpu (8 threads)" or the GPU's name */
} moe_layer_info;
/* (C: designated initializers, so the other fields are zero without a warning; C++: a
 * function, since C++11 has none.) */
#ifdef __cplusplus
static inline moe_layer_info moe_layer_info_init_(void)
{
    moe_layer_info i = {};
    i.size = sizeof i;
    i.magic = MOE_LAYER_INFO_MAGIC;
    return i;
}
#define MOE_LAYER_INFO_INIT moe_layer_info_init_()
#else
#define MOE_LAYER_INFO_INIT { .size = sizeof(moe_layer_info), .magic = MOE_LAYER_INFO_MAGIC }
#endif

moe_status moe_layer_info_get(const moe_layer *layer, moe_layer_info *info);

/* Copied caller tensors (MOE_WEIGHTS_TENSORS, borrow = 0): read them again after the caller
 * changed them (same views as at creation). Waits for the layer's work first. */
moe_status moe_layer_reload_weights(moe_layer *layer);

/* ---- forward and backward on the backend's memory, asynchronous ---- */

/* Forward of T tokens: x [T,H] -> out [T,H], optional router_logits [T,E], all in the
 * layer's dtype, "device pointers" (see the top). CUDA: enqueued on `stream` (the layer's
 * work is ordered after what `stream` holds and `stream` waits for the layer at the end);
 * returns without waiting for the GPU; capturable into a CUDA graph when the layer needs no
 * host synchronisation (one rank, or NCCL with max_tokens_per_rank) and was run once eagerly
 * (autotuning). CPU: stream must be NULL; runs to completion. Collective with EP. */
moe_status moe_layer_forward_async(moe_layer *layer, int64_t T, const void *x, void *out,
                                   void *router_logits, void *stream);

/* Weight gradients in the layout the weights were given in (router [E,H], the local experts'
 * w13 and w2 in the source layout: canonical / Qwen3 [El,2I,H] and [El,H,I], Llama-4
 * [El,H,2I] and [El,I,H]; Llama-4's shared expert). Overwritten, not accumulated. A NULL data
 * pointer: that gradient is not wanted (computed into scratch and dropped). With EP the
 * router and shared-expert gradients are summed over all ranks' tokens (identical on every
 * rank, added in rank order). */
typedef struct moe_layer_grads {
    void *router, *w13, *w2, *shared_gate, *shared_up, *shared_down;
} moe_layer_grads;

/* Backward of sum(out * dout) (+ sum(router_logits * d_router_logits) when given): dx [T,H]
 * and the weight gradients. x is the forward's input. Device pointers and stream as for the
 * forward. dx may be NULL (not wanted). Collective with EP. */
moe_status moe_layer_backward_async(moe_layer *layer, int64_t T, const void *x,
                                    const void *dout, const void *d_router_logits, void *dx,
                                    const moe_layer_grads *grads, void *stream);

/* ---- the same on host memory, synchronous ---- */

/* hidden [T,H] (or [B,S,H]) in the layer's dtype -> out (same shape), router_logits [T,E]
 * optional. CUDA layers copy through the workspace. Returns when the outputs are written. */
moe_status moe_layer_forward(moe_layer *layer, const moe_tensor_view *hidden,
                             moe_tensor_view *out, moe_tensor_view *router_logits);
/* Host twin of moe_layer_backward_async; grads are host pointers. */
moe_status moe_layer_backward(moe_layer *layer, const moe_tensor_view *hidden,
                              const moe_tensor_view *dout, const moe_tensor_view *d_router_logits,
                              moe_tensor_view *dx, const moe_layer_grads *grads);

/* ---- errors the device found without telling the host ---- */

/* Waits for the layer's work, then reports what its asynchronous calls recorded since the
 * last check, and clears it: MOE_ERR_OVERFLOW (a sync-free receive exceeded max_recv_tokens;
 * the rows that arrived and the bound are in moe_last_error), MOE_ERR_NONFINITE (router logits
 * with NaN/Inf: the number of tokens is in moe_last_error), an NCCL asynchronous error, or a
 * failed kernel. Local (not collective). Graph replays are not re-validated against the
 * fingerprint: call this after them. */
moe_status moe_layer_check_errors(moe_layer *layer);

/* ---- statistics ---- */

#define MOE_LAYER_STATS_MAGIC 0x4d4c5331u /* "MLS1" */
#define MOE_STATS_MAX_CHUNKS 16
#define MOE_STATS_NUM_PHASES 7
#define MOE_STATS_NUM_GEMMS 6

/* Phase indices of moe_layer_stats.phase_ms (forward): ROUTE router GEMM + top-k; PERMUTE
 * the sort by expert (EP: the plan and the packing of the rows to send); DISPATCH the
 * transfer to the experts' owners; GEMM1 and GEMM2 the grouped GEMMs (SiLU-and-mul is GEMM1's
 * epilogue); COMBINE the transfer back and the sum over k (+ the shared expert's output);
 * SHARED Llama-4's shared expert, which runs beside the others on a second stream. */
enum { MOE_PHASE_ROUTE = 0, MOE_PHASE_PERMUTE = 1, MOE_PHASE_DISPATCH = 2, MOE_PHASE_GEMM1 = 3,
       MOE_PHASE_GEMM2 = 4, MOE_PHASE_COMBINE = 5, MOE_PHASE_SHARED = 6 };
/* GEMM indices of moe_layer_stats.gemm_kernel / gemm_config. */
enum { MOE_GEMM_FWD1 = 0, MOE_GEMM_FWD2 = 1, MOE_GEMM_BWD_DA = 2, MOE_GEMM_BWD_DX = 3,
       MOE_GEMM_DW2 = 4, MOE_GEMM_DW13 = 5 };

typedef struct moe_chunk_timeline {
    int64_t tokens, rows_sent, rows_recv;
    double dispatch_post, dispatch_done, compute_begin, compute_end, combine_post,
        combine_done; /* seconds since the call began */
} moe_chunk_timeline;

typedef struct moe_layer_stats {
    uint32_t size;  /* set by the caller: sizeof(moe_layer_stats) */
    uint32_t magic; /* set by the caller: MOE_LAYER_STATS_MAGIC */
    /* running totals since creation or moe_layer_stats_reset */
    uint64_t calls_forward, calls_backward;
    uint64_t tokens_local;     /* tokens this rank brought */
    uint64_t tokens_computed;  /* token rows run through this rank's experts (sync-free EP
                                  calls count none: their row counts stay on the device) */
    uint64_t rows_sent, rows_recv;   /* token rows dispatched / received (all peers; not
                                        counted by sync-free calls) */
    uint64_t bytes_sent, bytes_recv; /* payload bytes, dispatch and combine */
    uint64_t weight_bytes_read;      /* expert weight bytes read from files at creation */
    uint64_t device_bytes_in_use;    /* weights + workspace + layer buffers on the backend */
    double seconds;                  /* host wall time inside forward/backward */
    /* per peer (real ranks): caller-owned arrays of `peers` entries (set by the caller, or
     * NULL), filled with the running totals */
    int peers;
    uint64_t *peer_rows_sent, *peer_rows_recv, *peer_bytes_sent, *peer_bytes_recv;
    /* the last call */
    int last_call;        /* 0 none, 1 forward, 2 backward */
    int64_t last_tokens;
    double last_seconds;  /* host wall time */
    double last_device_ms;/* device time of the whole call (timing on; else -1) */
    double phase_ms[MOE_STATS_NUM_PHASES]; /* timing on: device ms per phase (-1 = not run) */
    int nchunks;
    moe_chunk_timeline timeline[MOE_STATS_MAX_CHUNKS];
    char gemm_kernel[MOE_STATS_NUM_GEMMS][48]; /* "" = not run (or CPU) */
    char gemm_config[MOE_STATS_NUM_GEMMS][64];
    int route_one_launch; /* CUDA: the last route ran as one launch */
} moe_layer_stats;
#ifdef __cplusplus
static inline moe_layer_stats moe_layer_stats_init_(void)
{
    moe_layer_stats s = {};
    s.size = sizeof s;
    s.magic = MOE_LAYER_STATS_MAGIC;
    return s;
}
#define MOE_LAYER_STATS_INIT moe_layer_stats_init_()
#else
#define MOE_LAYER_STATS_INIT { .size = sizeof(moe_layer_stats), .magic = MOE_LAYER_STATS_MAGIC }
#endif

/* Fill *stats (local, not collective). */
moe_status moe_layer_stats_get(const moe_layer *layer, moe_layer_stats *stats);
moe_status moe_layer_stats_reset(moe_layer *layer);
/* Turn the per-phase timing (moe_layer_options.timing) on or off. With it on, every call waits
 * for the device at its end to read the times: turn it off before capturing a CUDA graph. */
moe_status moe_layer_set_timing(moe_layer *layer, int on);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_H */
