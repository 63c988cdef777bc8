/* workspace.c — scratch memory shared by the layers of one device (moe_ep.h's moe_workspace;
 * internal accessors in layer.h): buffers named by (set, id), grown on demand unless the set
 * is frozen, allocated in the backend's memory. */
#include <stdlib.h>
#include <string.h>

#include "layer.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#define WS_MAGIC 0x5753504bu /* "KPSW" */

typedef struct ws_buf {
    void *p;
    size_t cap;
} ws_buf;

struct moe_workspace {
    uint32_t magic;
    moe_backend backend;
    int device;
    int users;
    bool frozen[WS_NUM_SETS];
    ws_buf b[WS_NUM_SETS][WB_NUM];
};

moe_status moe_mem_alloc(moe_backend b, int device, size_t bytes, const char *what, void **p,
                         moe_error *err)
{
    *p = NULL;
    size_t n = ((bytes ? bytes : 16) + 255) & ~(size_t)255;
    if (b == MOE_BACKEND_CPU) {
        *p = moe_malloc(n, what, err);
        return *p ? MOE_OK : MOE_ERR_NOMEM;
    }
#ifdef MOE_HAVE_CUDA
    int prev = -1;
    cudaGetDevice(&prev);
    if (device >= 0 && prev != device) cudaSetDevice(device);
    cudaError_t e = cudaMalloc(p, n);
    if (device >= 0 && prev >= 0 && prev != device) cudaSetDevice(prev);
    if (e != cudaSuccess) {
        *p = NULL;
        cudaGetLastError();
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        return moe_fail(err, e == cudaErrorMemoryAllocation ? MOE_ERR_NOMEM : MOE_ERR_CUDA,
                        "cudaMalloc of %zu bytes for %s on device %d: %s (%zu of %zu bytes "
                        "free)", n, what, device, cudaGetErrorString(e), fr, tot);
    }
    return MOE_OK;
#else
    (void)device;
    return moe_fail(err, MOE_ERR_NO_DEVICE, "%s: this build has no CUDA backend", what);
#endif
}

void moe_mem_free(moe_backend b, int device, void *p)
{
    if (!p) return;
    if (b == MOE_BACKEND_CPU) {
        free(p);
        return;
    }
#ifdef MOE_HAVE_CUDA
    int prev = -1;
    cudaGetDevice(&prev);
    if (device >= 0 && prev != device) cudaSetDevice(device);
    cudaFree(p);
    cudaGetLastError();
    if (device >= 0 && prev >= 0 && prev != device) cudaSetDevice(prev);
#else
    (void)device;
#endif
}

moe_status moe_mem_alloc_pinned(moe_backend b, size_t bytes, const char *what, void **p,
                                moe_error *err)
{
    *p = NULL;
    size_t n = ((bytes ? bytes : 16) + 255) & ~(size_t)255;
#ifdef MOE_HAVE_CUDA
    if (b == MOE_BACKEND_CUDA) {
        cudaError_t e = cudaMallocHost(p, n);
        if (e != cudaSuccess) {
            *p = NULL;
            cudaGetLastError();
            return moe_fail(err, MOE_ERR_NOMEM, "cudaMallocHost of %zu bytes for %s: %s", n,
                            what, cudaGetErrorString(e));
        }
        return MOE_OK;
    }
#endif
    (void)b;
    *p = moe_malloc(n, what, err);
    return *p ? MOE_OK : MOE_ERR_NOMEM;
}

void moe_mem_free_pinned(moe_backend b, void *p)
{
    if (!p) return;
#ifdef MOE_HAVE_CUDA
    if (b == MOE_BACKEND_CUDA) {
        cudaFreeHost(p);
        return;
    }
#endif
    (void)b;
    free(p);
}

static const char *const buf_names[WB_NUM] = {
    [WB_LOGITS] = "router logits", [WB_IDS] = "top-k ids", [WB_W] = "top-k weights",
    [WB_TDEST] = "plan destinations", [WB_TN] = "plan destination counts",
    [WB_TROW] = "plan rows", [WB_DCOUNT] = "plan counts", [WB_BASE] = "plan bases",
    [WB_SHOUT] = "shared expert output", [WB_SGU] = "shared gate|up", [WB_SACT] = "shared act",
    [WB_SEND_X] = "dispatch x rows", [WB_SEND_IDS] = "dispatch ids",
    [WB_SEND_W] = "dispatch weights", [WB_SEND_DOUT] = "dispatch dout rows",
    [WB_BACK] = "combine rows back", [WB_BACK_DW] = "combine d-weights back",
    [WB_RECV_X] = "received x rows", [WB_RECV_IDS] = "received ids",
    [WB_RECV_W] = "received weights", [WB_RECV_DOUT] = "received dout rows",
    [WB_PART] = "partial rows", [WB_PART_DW] = "partial d-weights", [WB_SCNT] = "slot counts",
    [WB_RCNT] = "received slot counts", [WB_CX] = "compacted x", [WB_CIDS] = "compacted ids",
    [WB_CW] = "compacted weights", [WB_CDOUT] = "compacted dout",
    [WB_CPART] = "compacted partial rows", [WB_CPART_DW] = "compacted partial d-weights",
    [WB_COUNTS] = "expert counts", [WB_OFFS] = "expert offsets", [WB_GATHER] = "gather index",
    [WB_SORT] = "sort scratch", [WB_GU] = "GEMM1 output", [WB_ACT] = "activations",
    [WB_ROWS] = "flat rows", [WB_DA0] = "dA0", [WB_DGU] = "d gate|up", [WB_DACT] = "d act", [WB_DTOP] = "d top-k",
    [WB_SRC_DW] = "d-weights", [WB_DLOGITS] = "d logits", [WB_DXR] = "dx router",
    [WB_DXS] = "dx shared", [WB_DSACT] = "shared d act", [WB_DSGU] = "shared d gate|up",
    [WB_GREP] = "replicated gradient partials", [WB_GREP_ALL] = "every rank's partials", [WB_GREP_RND] = "summed replicated gradients",
    [WB_G_ROUTER] = "router gradient", [WB_G_W13] = "w13 gradient", [WB_G_W2] = "w2 gradient",
    [WB_G_SG] = "shared gate gradient", [WB_G_SU] = "shared up gradient",
    [WB_G_SD] = "shared down gradient", [WB_IO_X] = "staged input",
    [WB_IO_OUT] = "staged output", [WB_IO_LOGITS] = "staged logits",
    [WB_IO_DOUT] = "staged dout", [WB_IO_DLOG] = "staged d logits", [WB_IO_DX] = "staged dx",
};

moe_status moe_workspace_create(moe_backend backend, int device, moe_workspace **out)
{
    static const char fn[] = "moe_workspace_create";
    moe_error *err = moe_api_begin();
    if (!out) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: ws (the output) is NULL", fn);
    if (backend != MOE_BACKEND_CPU && backend != MOE_BACKEND_CUDA && backend != MOE_BACKEND_AUTO)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: backend %d: expected MOE_BACKEND_CPU, _CUDA or _AUTO", fn,
                        (int)backend);
    const int ndev = moe_gpu_count();
    /* AUTO resolves as for layers: CUDA when this build has it and a GPU is usable */
    if (backend == MOE_BACKEND_AUTO) backend = ndev > 0 ? MOE_BACKEND_CUDA : MOE_BACKEND_CPU;
#ifndef MOE_HAVE_CUDA
    if (backend == MOE_BACKEND_CUDA)
        return moe_fail(err, MOE_ERR_NO_DEVICE,
                        "%s: the CUDA backend was requested but this build has none (configure "
                        "with the CUDA toolkit); use the CPU backend", fn);
#else
    if (backend == MOE_BACKEND_CUDA) {
        if (ndev == 0)
            return moe_fail(err, MOE_ERR_NO_DEVICE,
                            "%s: the CUDA backend was requested but no GPU is usable; use the "
                            "CPU backend", fn);
        if (device < 0 && cudaGetDevice(&device) != cudaSuccess) {
            cudaGetLastError();
            return moe_fail(err, MOE_ERR_NO_DEVICE, "%s: no current CUDA device", fn);
        }
        if (device >= ndev)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: device %d: this machine has %d GPU(s)",
                            fn, device, ndev);
    }
#endif
    moe_workspace *ws = calloc(1, sizeof *ws);
    if (!ws) return moe_fail(err, MOE_ERR_NOMEM, "%s: no memory", fn);
    ws->magic = WS_MAGIC;
    ws->backend = backend;
    ws->device = backend == MOE_BACKEND_CPU ? -1 : device;
    *out = ws;
    return MOE_OK;
}

void moe_ws_release(moe_workspace *ws)
{
    for (int s = 0; s < WS_NUM_SETS; s++)
        for (int i = 0; i < WB_NUM; i++) {
            if (s == WS_PIN) moe_mem_free_pinned(ws->backend, ws->b[s][i].p);
            else moe_mem_free(ws->backend, ws->device, ws->b[s][i].p);
            ws->b[s][i].p = NULL;
            ws->b[s][i].cap = 0;
        }
}

bool moe_ws_valid(const moe_workspace *ws) { return ws && ws->magic == WS_MAGIC; }
int moe_ws_users(const moe_workspace *ws) { return ws->users; }

moe_status moe_ws_destroy_checked(moe_workspace *ws, moe_error *err)
{
    if (!ws) return MOE_OK;
    if (ws->magic != WS_MAGIC)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_workspace_destroy: not a workspace (or destroyed twice)");
    if (ws->users > 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "moe_workspace_destroy: %d layer(s) still use this workspace; destroy "
                        "them first", ws->users);
    moe_ws_release(ws);
    ws->magic = 0;
    free(ws);
    return MOE_OK;
}

size_t moe_ws_total_bytes(const moe_workspace *ws)
{
    size_t n = 0;
    for (int s = 0; s < WS_NUM_SETS; s++)
        for (int i = 0; i < WB_NUM; i++) n += ws->b[s][i].cap;
    return n;
}

static moe_status ws_grow(moe_workspace *ws, int set, int id, size_t bytes, bool reserve,
                          void **p, moe_error *err)
{
    ws_buf *b = &ws->b[set][id];
    if (b->p && b->cap >= bytes) {
        if (p) *p = b->p;
        return MOE_OK;
    }
    if (ws->frozen[set] && b->p && !reserve)
        return moe_fail(err, MOE_ERR_INTERNAL,
                        "workspace buffer '%s' needs %zu bytes but was sized %zu at creation "
                        "(a sized layer must not allocate)", buf_names[id], bytes, b->cap);
#ifdef MOE_HAVE_CUDA
    /* The old memory may still be in use by queued work. */
    if (b->p && ws->backend == MOE_BACKEND_CUDA) cudaDeviceSynchronize();
#endif
    if (set == WS_PIN) moe_mem_free_pinned(ws->backend, b->p);
    else moe_mem_free(ws->backend, ws->device, b->p);
    b->p = NULL;
    b->cap = 0;
    void *q = NULL;
    if (set == WS_PIN) MOE_TRY(moe_mem_alloc_pinned(ws->backend, bytes, buf_names[id], &q, err));
    else MOE_TRY(moe_mem_alloc(ws->backend, ws->device, bytes, buf_names[id], &q, err));
    b->p = q;
    b->cap = bytes ? bytes : 16;
    if (p) *p = q;
    return MOE_OK;
}

moe_status moe_ws_need(moe_workspace *ws, int set, int id, size_t bytes, void **p,
                       moe_error *err)
{
    return ws_grow(ws, set, id, bytes, false, p, err);
}

moe_status moe_ws_reserve(moe_workspace *ws, int set, int id, size_t bytes, moe_error *err)
{
    return ws_grow(ws, set, id, bytes, true, NULL, err);
}

void *moe_ws_ptr(const moe_workspace *ws, int set, int id) { return ws->b[set][id].p; }
void moe_ws_freeze(moe_workspace *ws, int set) { ws->frozen[set] = true; }
moe_backend moe_ws_backend(const moe_workspace *ws) { return ws->backend; }
int moe_ws_device(const moe_workspace *ws) { return ws->device; }
void moe_ws_attach(moe_workspace *ws, int delta) { ws->users += delta; }
