/*
 * moe_ep.h — the public API of moe-ep, an expert-parallel Mixture-of-Experts layer engine.
 *
 * C99 and C++-clean. Every handle is opaque; every call returns a moe_status; the detailed
 * message of the last failure on a context is moe_last_error(ctx). There is no global state:
 * two contexts never share anything.
 *
 * Tensors crossing the API are described by moe_tensor_view: a dtype, a shape and a pointer to
 * contiguous row-major host memory owned by the caller.
 */
#ifndef MOE_EP_H
#define MOE_EP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. Values are stable: they travel in the service's wire protocol. */
typedef enum moe_status {
    MOE_OK = 0,
    MOE_ERR_INVALID_ARG = 1,  /* a caller's argument is out of range or inconsistent */
    MOE_ERR_IO = 2,           /* a file or socket could not be read or written */
    MOE_ERR_FORMAT = 3,       /* a file's content is malformed (safetensors, JSON, config) */
    MOE_ERR_UNSUPPORTED = 4,  /* valid but not supported here (dtype, model type, backend) */
    MOE_ERR_NOMEM = 5,        /* host or device allocation failed */
    MOE_ERR_CUDA = 6,         /* a CUDA runtime / driver / cuBLAS call failed */
    MOE_ERR_NCCL = 7,         /* an NCCL call failed */
    MOE_ERR_MPI = 8,          /* an MPI call failed */
    MOE_ERR_NO_DEVICE = 9,    /* the CUDA backend was asked for but no GPU / no CUDA build */
    MOE_ERR_CHECK_FAILED = 10,/* a correctness comparison exceeded its tolerance */
    MOE_ERR_TIMEOUT = 11,     /* a wait exceeded its limit (peer rank died, NCCL stuck) */
    MOE_ERR_INTERNAL = 12,    /* a bug: an invariant of moe-ep itself does not hold */
    MOE_NUM_STATUS
} moe_status;

/* A short constant name of a status ("invalid argument"); never NULL. */
const char *moe_strerror(moe_status status);

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
size_t moe_dtype_size(moe_dtype dtype);

typedef enum moe_backend { MOE_BACKEND_CPU = 0, MOE_BACKEND_CUDA = 1 } moe_backend;

/* A context: backend choice, thread count and the last error message. */
typedef struct moe_ctx moe_ctx;

#define MOE_CTX_OPTIONS_MAGIC 0x4d4f4543u /* "MOEC" */
typedef struct moe_ctx_options {
    uint32_t size;       /* sizeof(moe_ctx_options) */
    uint32_t magic;      /* MOE_CTX_OPTIONS_MAGIC */
    moe_backend backend; /* default MOE_BACKEND_CPU */
    int threads;         /* CPU threads; 0 = all cores (OMP_NUM_THREADS respected) */
    int device;          /* CUDA device ordinal; -1 = pick from the local rank */
} moe_ctx_options;
#define MOE_CTX_OPTIONS_INIT { sizeof(moe_ctx_options), MOE_CTX_OPTIONS_MAGIC, MOE_BACKEND_CPU, 0, -1 }

/* [out] *ctx on success. opts may be NULL (defaults). MOE_ERR_NO_DEVICE when the CUDA backend
 * is asked for on a build or machine without one. */
moe_status moe_ctx_create(const moe_ctx_options *opts, moe_ctx **ctx);
void moe_ctx_destroy(moe_ctx *ctx);
/* The detailed message of the last failed call on ctx ("" if none). Owned by ctx. */
const char *moe_last_error(const moe_ctx *ctx);

/* A borrowed view of caller memory: contiguous, row-major. */
typedef struct moe_tensor_view {
    moe_dtype dtype;
    int ndim;
    int64_t shape[4];
    void *data;
} moe_tensor_view;

/* A loaded MoE block (config + weights resident on the context's backend). */
typedef struct moe_layer moe_layer;

/* Load one MoE block.
 * config: a preset name (qwen3-30b-a3b, llama4-scout, tiny-qwen3, tiny-llama4) or a path to
 *         an HF config.json.
 * weights: a .safetensors file or a model.safetensors.index.json (sharded checkpoint).
 * layer: -1 when the file uses the block's own state-dict names, else the decoder layer N.
 * dtype: the activation/compute dtype; MOE_NUM_DTYPES = the weights' own dtype. */
moe_status moe_layer_load(moe_ctx *ctx, const char *config, const char *weights, int layer,
                          moe_dtype dtype, moe_layer **out);
void moe_layer_destroy(moe_layer *layer);

/* Forward of the block on T tokens.
 * hidden [T,H] in the layer's dtype; out [T,H] and router_logits [T,E] (may be NULL) are
 * written in the same dtype. Synchronous: when it returns the outputs are in host memory. */
moe_status moe_layer_forward(moe_ctx *ctx, moe_layer *layer, const moe_tensor_view *hidden,
                             moe_tensor_view *out, moe_tensor_view *router_logits);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_H */
