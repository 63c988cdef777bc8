/*
 * gemm_common.cuh — device helpers shared by the grouped GEMM kernels (grouped_gemm.cu,
 * grouped_gemm_dw.cu): element traits, the inline-PTX wrappers for cp.async / ldmatrix /
 * mma.sync m16n8k16, and the on-device "which expert does this tile belong to" search.
 *
 * Everything here is header-only device code; each .cu file that includes it instantiates what
 * it uses; fill_gemm_params, fill_dw_params and config_brief are the host helpers (the
 * moe_kernels.h types come before this file). Host C never sees this file.
 */
#ifndef MOE_GEMM_COMMON_CUH
#define MOE_GEMM_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "moe_kernels.h"

namespace moe_gg {

/* Shared-memory row padding (elements) of every bf16/fp16 tile: +8 elements = +16 bytes, so
 * consecutive rows of a tile start in different 16-byte bank groups and the 8 row addresses of
 * one ldmatrix 8x8 matrix hit 8 distinct groups (row strides 80, 144, 272, 528 bytes all step
 * through the 8 groups of a 128-byte bank line). */
constexpr int kPad = 8;

/* ---- element traits: the 16-bit types used by the tensor-core path ---- */
template <typename T> struct Elem;
template <> struct Elem<__nv_bfloat16> {
    using T2 = __nv_bfloat162;
    static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
    static __device__ __forceinline__ float2 to_f2(T2 v) { return __bfloat1622float2(v); }
    static __device__ __forceinline__ T2 from_f2(float2 v) { return __float22bfloat162_rn(v); }
};
template <> struct Elem<__half> {
    using T2 = __half2;
    static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
    static __device__ __forceinline__ float2 to_f2(T2 v) { return __half22float2(v); }
    static __device__ __forceinline__ T2 from_f2(float2 v) { return __float22half2_rn(v); }
};

/* Reinterpret a packed pair (one 32-bit mma operand register) as two elements and back. */
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t r)
{
    typename Elem<T>::T2 v;
    memcpy(&v, &r, 4);
    return Elem<T>::to_f2(v);
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float2 f)
{
    typename Elem<T>::T2 v = Elem<T>::from_f2(f);
    uint32_t r;
    memcpy(&r, &v, 4);
    return r;
}
/* Multiply both halves of a packed pair by s (fp32) and round back to T: the operand scaling
 * "multiply, round to the activation dtype, then the MMA" of moe_stages.h. The fp32 product of
 * two 16-bit floats is exact (11+11 or 8+8 significand bits < 24), so rounding it once equals
 * the CPU twin's round(float(a) * float(s)). */
template <typename T>
__device__ __forceinline__ uint32_t scale2(uint32_t r, float s)
{
    float2 f = unpack2<T>(r);
    f.x *= s;
    f.y *= s;
    return pack2<T>(f);
}
/* scale2 on the 8 elements of the 16-byte chunk at `at` (shared memory), in place: one row's
 * slice of a staged operand (scale_a_rows / scale_dy_rows / scale_x_rows passes). */
template <typename T>
__device__ __forceinline__ void scale8_inplace(void *at, float s)
{
    uint4 *q = reinterpret_cast<uint4 *>(at);
    uint4 v = *q;
    v.x = scale2<T>(v.x, s);
    v.y = scale2<T>(v.y, s);
    v.z = scale2<T>(v.z, s);
    v.w = scale2<T>(v.w, s);
    *q = v;
}
/* The packed outputs of 8-column group j = 4g + jj (jj < 4) of row h of a wgmma m64 fragment
 * (R fp32 accumulators, acc[4i + 2h + c]: column 8i + 2(lane%4) + c), as lane q holds them
 * before the quad transpose, times sc (the forward's row scale; 1 for dW). */
template <typename T, int R>
__device__ __forceinline__ void pack_acc_group(const float (&acc)[R], int g, int h, float sc, uint32_t (&w)[4])
{
#pragma unroll
    for (int j = 0; j < 4; j++)
        w[j] = pack2<T>(make_float2(acc[4 * (4 * g + j) + 2 * h] * sc, acc[4 * (4 * g + j) + 2 * h + 1] * sc));
}
template <typename T>
__device__ __forceinline__ uint32_t scale2(uint32_t r, float s0, float s1)
{
    float2 f = unpack2<T>(r);
    f.x *= s0;
    f.y *= s1;
    return pack2<T>(f);
}

template <typename T>
__device__ __forceinline__ float load_f(const T *p)
{
    return Elem<T>::to_f(*p);
}
template <>
__device__ __forceinline__ float load_f<float>(const float *p)
{
    return *p;
}

/* ---- PTX wrappers ---- */
__device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* 16-byte global->shared async copy; src_bytes 0 writes zeros and reads nothing (.cg: bypass
 * L1, the tiles are streamed once per CTA). */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
                 "l"(gmem), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *smem)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *smem)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem)));
}

/* D = A(16x16, row) * B(16x8, col) + D, fp32 accumulators. Fragment layout (g = lane/4,
 * t = lane%4): a[0] (row g, k 2t..2t+1), a[1] (row g+8, k 2t..), a[2] (row g, k 2t+8..),
 * a[3] (row g+8, k 2t+8..); b[0] (k 2t..2t+1, col g), b[1] (k 2t+8.., col g);
 * d[0..1] (row g, cols 2t..2t+1), d[2..3] (row g+8, cols 2t..2t+1). */
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float d[4], const uint32_t a[4], const uint32_t b[2])
    {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float d[4], const uint32_t a[4], const uint32_t b[2])
    {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

/* ---- which expert a row tile belongs to, found on the device ----
 * The forward grid has one x-slot per possible row tile: expert e owns ceil(rows_e / BM)
 * consecutive tiles, in expert order. Tile number `tile` therefore belongs to the expert whose
 * running tile count first exceeds it. The block computes the per-expert tile counts from
 * expert_offsets (one expert per thread, NT experts per round), scans them, and the one thread
 * whose range holds `tile` publishes (expert, first row, end row). No host ever sees the counts.
 * Offsets are clamped into [0, max_rows] so a malformed table cannot make a tile read past the
 * buffers the host sized from max_rows. Returns false (uniformly) when the tile is past the end.
 * scratch: NT/32 + 4 ints of shared memory. */
struct TileInfo {
    int expert, row0, row_end;
};

template <int NT>
__device__ __forceinline__ bool find_tile_expert(const int32_t *__restrict__ offsets, int E,
                                                 int max_rows, int BM, int tile, int *scratch,
                                                 TileInfo *out)
{
    constexpr int NW = NT / 32;
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    int *s_warp = scratch;       /* [NW] */
    int *s_found = scratch + NW; /* [3] */
    if (tid == 0) s_found[0] = -1;
    int carry = 0; /* tiles of the experts of earlier rounds */
    for (int base = 0; base < E; base += NT) {
        const int e = base + tid;
        int cnt = 0, lo = 0, hi = 0;
        if (e < E) {
            lo = min(max(offsets[e], 0), max_rows);
            hi = min(max(offsets[e + 1], lo), max_rows);
            cnt = (hi - lo + BM - 1) / BM;
        }
        int x = cnt; /* inclusive scan within the warp */
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, x, d);
            if (lane >= d) x += y;
        }
        if (lane == 31) s_warp[wid] = x;
        __syncthreads();
        if (wid == 0) {
            int v = lane < NW ? s_warp[lane] : 0;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                int y = __shfl_up_sync(0xffffffffu, v, d);
                if (lane >= d) v += y;
            }
            if (lane < NW) s_warp[lane] = v;
        }
        __syncthreads();
        const int incl = carry + (wid > 0 ? s_warp[wid - 1] : 0) + x;
        const int excl = incl - cnt;
        if (cnt > 0 && tile >= excl && tile < incl) {
            const int r0 = lo + (tile - excl) * BM;
            s_found[0] = e;
            s_found[1] = r0;
            s_found[2] = min(r0 + BM, hi);
        }
        carry += s_warp[NW - 1];
        __syncthreads(); /* s_found visible; s_warp free for the next round */
        if (carry > tile) break; /* uniform: every thread read the same s_warp[NW-1] */
    }
    out->expert = s_found[0];
    out->row0 = s_found[1];
    out->row_end = s_found[2];
    return out->expert >= 0;
}

/* Rows of expert e, clamped like above (the dW kernels own one expert per blockIdx.z). */
__device__ __forceinline__ void expert_rows(const int32_t *__restrict__ offsets, int e,
                                            int max_rows, int *lo, int *hi)
{
    int l = min(max(offsets[e], 0), max_rows);
    int h = min(max(offsets[e + 1], l), max_rows);
    *lo = l;
    *hi = h;
}

/* SiLU in fp32 as the CPU twin writes it: g * sigmoid(g) = g / (1 + exp(-g)), accurate expf
 * (not __expf) so results stay within rounding of the host's. For g -> -inf, exp overflows to
 * inf and the quotient is -0, the right limit. */
__device__ __forceinline__ float silu_f(float g)
{
    return g / (1.0f + expf(-g));
}

/* Whether a pointer sits on 16 bytes (cp.async / TMA / 16-byte stores need it). */
__host__ __device__ inline bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15u) == 0; }

/* Host side: the launch parameters that the forward/dX kernels' structs (GGParams in
 * grouped_gemm.cu, WgParams in grouped_gemm_wgmma.cu) share under the same names, from the C
 * arguments (moe_stages.h, included before this file); es = element size in bytes. */
template <class P> inline void fill_gemm_params(P &p, const moe_grouped_gemm_args *a, size_t es)
{
    const bool silu = a->epilogue == MOE_EPI_SILU_MUL;
    const bool need_gather = a->permute_x || a->permute_y || a->scale_a_rows || a->scale_c_rows;
    p.offsets = a->expert_offsets;
    p.gather = need_gather ? a->gather_idx : nullptr;
    p.A = a->A;
    p.C = a->C;
    p.C_preact = silu ? a->C_preact : nullptr;
    p.scale_a = a->scale_a_rows;
    p.scale_c = a->scale_c_rows;
    p.E = a->num_experts;
    p.N = a->N;
    p.K = a->K;
    p.max_rows = a->max_rows;
    p.topk = a->topk >= 1 ? a->topk : 1;
    p.permute_x = a->permute_x;
    p.permute_y = a->permute_y;
    p.silu = silu;
    p.n_out = silu ? a->N / 2 : a->N;
    p.c_pair = ((uintptr_t)a->C % (2 * es)) == 0 && p.n_out % 2 == 0;
    p.p_pair = a->C_preact && ((uintptr_t)a->C_preact % (2 * es)) == 0 && p.n_out % 2 == 0;
}

/* The launch parameters every dW kernel takes (the base of DWParams in grouped_gemm_dw.cu and of
 * DwWgParams in grouped_gemm_dw_wgmma.cu), filled from the C arguments by fill_dw_params. */
struct DwParamsCommon {
    const int32_t *offsets;
    const int32_t *gather; /* NULL when no permute/scale needs it */
    const void *dY;
    const void *X;
    void *dW;
    const void *scale_dy;
    const void *scale_x;
    int E, N, K, max_rows, topk;
    int permute_dy, permute_x;
};

inline void fill_dw_params(DwParamsCommon &p, const moe_grouped_gemm_dw_args *a)
{
    const bool need_gather = a->permute_dy || a->permute_x || a->scale_dy_rows || a->scale_x_rows;
    p.offsets = a->expert_offsets;
    p.gather = need_gather ? a->gather_idx : nullptr;
    p.dY = a->dY;
    p.X = a->X;
    p.dW = a->dW;
    p.scale_dy = a->scale_dy_rows;
    p.scale_x = a->scale_x_rows;
    p.E = a->num_experts;
    p.N = a->N;
    p.K = a->K;
    p.max_rows = a->max_rows;
    p.topk = a->topk >= 1 ? a->topk : 1;
    p.permute_dy = a->permute_dy;
    p.permute_x = a->permute_x;
}

/* A configuration as its tile and options, for the launchers' error messages (the full printer,
 * moe_kernel_config_str, belongs to the host's src/cuda/kernel_config.c). */
inline const char *config_brief(const moe_kernel_config &c, char *buf, size_t len)
{
    snprintf(buf, len, "%dx%dx%d,w%d,s%d%s%s%s%s", c.tile_m, c.tile_n, c.tile_k, c.warps, c.stages,
             c.use_tma ? ",tma" : "", c.cluster > 1 ? ",c2" : "",
             c.epilogue == 2 ? ",staged" : c.epilogue == 1 ? ",direct" : "",
             c.a_load == 2 ? ",atma" : c.a_load == 1 ? ",acp" : "");
    return buf;
}

} // namespace moe_gg

#endif /* MOE_GEMM_COMMON_CUH */
