/*
 * grouped_gemm_dw.cu — the weight gradient of a grouped GEMM, one launch over all experts:
 *   dW_e [N, K] = sum over rows r of expert e of  dY_r^T (N)  x  X_r (K)
 * with dY_r / X_r read through the forward's row sources (moe_stages.h, the CPU twin is
 * cpu_grouped_gemm_dw): permute_dy / permute_x read token-order row gather_idx[r] / topk, and
 * scale_dy_rows / scale_x_rows multiply the row by scale[gather_idx[r]] and round to the dtype.
 * fp32 accumulation; an expert with no rows gets exact zeros.
 *
 * Decomposition: one CTA per (k-tile, n-tile, expert) = (blockIdx.x, .y, .z) owns a BM x BN
 * tile of dW_e and loops over ALL of the expert's rows in steps of BK rows. Every output element
 * is therefore summed by one thread in a fixed order: deterministic, no atomics, no split.
 *
 * Tensor-core kernel: the MMA's reduction dimension is the row index, so both operands come from
 * row-major [rows, .] tiles and are loaded with ldmatrix.trans: the dY tile [BK rows][BM n] gives
 * the A fragments (m = n index, k = row), the X tile [BK rows][BN k] the B fragments. Row scales
 * are applied in shared memory once a stage has landed (an extra barrier, only when given).
 */
#include <stdint.h>
#include <stdio.h>

/* The project's C headers have no extern "C" guards of their own: include them inside one. */
extern "C" {
#include "common.h"
#include "moe_stages.h"
}
#include "gemm_common.cuh"
#include "grouped_gemm_configs.h"
#include "grouped_gemm_dw_wgmma.h"
#include "moe_kernels.h"

using namespace moe_gg;

namespace {

struct DWParams : DwParamsCommon {
    int w_pair; /* dW rows allow 2-element stores */
};

/* Source row of expert-order row r for one operand, or -1 (zeros) when r is past the expert's
 * end or its gather index is out of range. g receives the gather index (for the scale). */
__device__ __forceinline__ int dw_src_row(const DWParams &p, int r, int hi, bool permute, int *g)
{
    if (r >= hi) return -1;
    int gi = p.gather ? __ldg(p.gather + r) : r;
    if (gi < 0 || gi >= p.max_rows) return -1;
    *g = gi;
    return permute ? gi / p.topk : r;
}

template <typename T>
__device__ __forceinline__ void store2w(T *row, int col, int ncols, bool pair, float v0, float v1)
{
    if (pair && col + 1 < ncols) {
        *reinterpret_cast<typename Elem<T>::T2 *>(row + col) = Elem<T>::from_f2(make_float2(v0, v1));
    } else {
        if (col < ncols) row[col] = Elem<T>::from_f(v0);
        if (col + 1 < ncols) row[col + 1] = Elem<T>::from_f(v1);
    }
}

/* Zeros for the tile of an expert with no rows. */
template <typename T>
__device__ void zero_tile(const DWParams &p, T *dWe, int n0, int k0, int BM, int BN)
{
    for (int i = threadIdx.x; i < BM * BN; i += blockDim.x) {
        const int n = n0 + i / BN, k = k0 + i % BN;
        if (n < p.N && k < p.K) dWe[(int64_t)n * p.K + k] = T(0.f);
    }
}

template <int BM, int BN, int BK, int NT, int STAGES, typename T>
constexpr size_t dw_smem_bytes()
{
    return (size_t)STAGES * BK * ((BM + kPad) + (BN + kPad)) * sizeof(T) +
           (size_t)2 * STAGES * BK * sizeof(float);
}

template <int BM, int BN, int NT>
constexpr int dw_min_blocks()
{
    return (BM * BN / NT) > 64 ? 1 : (NT >= 256 ? 2 : 3);
}

template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool ALIGNED>
__global__ void __launch_bounds__(WM *WN * 32, (dw_min_blocks<BM, BN, WM * WN * 32>()))
    moe_gg_dw_mma_kernel(const DWParams p)
{
    constexpr int NT = WM * WN * 32;
    constexpr int WTM = BM / WM, WTN = BN / WN;
    constexpr int MS = WTM / 16, NS = WTN / 8;
    constexpr int LDA = BM + kPad; /* sA: [BK rows][BM n] */
    constexpr int LDB = BN + kPad; /* sB: [BK rows][BN k] */
    constexpr int A_STAGE = BK * LDA, B_STAGE = BK * LDB;
    constexpr int A_CPR = BM / 8, B_CPR = BN / 8; /* 16-byte chunks per tile row */
    constexpr int A_IT = BK * A_CPR / NT, B_IT = BK * B_CPR / NT;
    constexpr int A_ROWSTEP = NT / A_CPR, B_ROWSTEP = NT / B_CPR;
    static_assert(WTM % 16 == 0 && WTN % 16 == 0 && BK % 16 == 0, "tile shape");
    static_assert((BK * A_CPR) % NT == 0 && (BK * B_CPR) % NT == 0 && NT % A_CPR == 0 &&
                      NT % B_CPR == 0,
                  "tile chunks must divide evenly over the threads");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sA = reinterpret_cast<T *>(smem_raw);
    T *sB = sA + STAGES * A_STAGE;
    float *s_sdy = reinterpret_cast<float *>(sB + STAGES * B_STAGE); /* [STAGES][BK] */
    float *s_sx = s_sdy + STAGES * BK;                               /* [STAGES][BK] */

    const int e = blockIdx.z, n0 = blockIdx.y * BM, k0 = blockIdx.x * BN;
    const int N = p.N, K = p.K;
    T *dWe = static_cast<T *>(p.dW) + (int64_t)e * N * K;
    int lo, hi;
    expert_rows(p.offsets, e, p.max_rows, &lo, &hi);
    if (hi <= lo) {
        zero_tile<T>(p, dWe, n0, k0, BM, BN);
        return;
    }

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;
    const T *__restrict__ dY = static_cast<const T *>(p.dY);
    const T *__restrict__ X = static_cast<const T *>(p.X);
    const bool has_sdy = p.scale_dy != nullptr, has_sx = p.scale_x != nullptr;

    /* Columns this thread loads (fixed), rows vary with the step. */
    const int a_r0 = tid / A_CPR, a_c8 = (tid % A_CPR) * 8;
    const int b_r0 = tid / B_CPR, b_c8 = (tid % B_CPR) * 8;
    const int a_lim = max(0, min(8, N - (n0 + a_c8)));
    const int b_lim = max(0, min(8, K - (k0 + b_c8)));

    auto load_stage = [&](int stage, int step) {
        const int rbase = lo + step * BK;
        T *a_dst = sA + stage * A_STAGE;
        T *b_dst = sB + stage * B_STAGE;
#pragma unroll
        for (int it = 0; it < A_IT; it++) {
            const int rr = a_r0 + it * A_ROWSTEP;
            int g = 0;
            const int src = a_lim > 0 ? dw_src_row(p, rbase + rr, hi, p.permute_dy, &g) : -1;
            const T *ptr = src >= 0 ? dY + (int64_t)src * N + n0 + a_c8 : dY;
            T *dst = a_dst + rr * LDA + a_c8;
            if (ALIGNED) {
                cp_async16(dst, ptr, src >= 0 ? 16 : 0);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) dst[j] = (src >= 0 && j < a_lim) ? ptr[j] : T(0.f);
            }
        }
#pragma unroll
        for (int it = 0; it < B_IT; it++) {
            const int rr = b_r0 + it * B_ROWSTEP;
            int g = 0;
            const int src = b_lim > 0 ? dw_src_row(p, rbase + rr, hi, p.permute_x, &g) : -1;
            const T *ptr = src >= 0 ? X + (int64_t)src * K + k0 + b_c8 : X;
            T *dst = b_dst + rr * LDB + b_c8;
            if (ALIGNED) {
                cp_async16(dst, ptr, src >= 0 ? 16 : 0);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) dst[j] = (src >= 0 && j < b_lim) ? ptr[j] : T(0.f);
            }
        }
        /* Row scales of this step (zero rows past the end: their data is zero anyway). */
        if (has_sdy || has_sx) {
            for (int i = tid; i < 2 * BK; i += NT) {
                const int rr = i % BK;
                const bool is_dy = i < BK;
                if (is_dy ? !has_sdy : !has_sx) continue;
                int g = 0;
                const int src = dw_src_row(p, rbase + rr, hi, false, &g);
                float s = 0.f;
                if (src >= 0) s = load_f(static_cast<const T *>(is_dy ? p.scale_dy : p.scale_x) + g);
                (is_dy ? s_sdy : s_sx)[stage * BK + rr] = s;
            }
        }
    };

    float acc[MS][NS][4];
#pragma unroll
    for (int ms = 0; ms < MS; ms++)
#pragma unroll
        for (int ns = 0; ns < NS; ns++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[ms][ns][q] = 0.f;

    const int g8 = lane >> 2, t4 = lane & 3;
    const int steps = (hi - lo + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < steps) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < steps; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int st = kt % STAGES;
        if (has_sdy || has_sx) {
            /* Row scales: multiply and round in shared memory (one extra barrier, only when
             * scales are given), so the MMA loop below stays branch-free. The scales of this
             * stage were stored before the barrier above. */
            T *a_w = sA + st * A_STAGE;
            T *b_w = sB + st * B_STAGE;
            if (has_sdy)
                for (int c = tid; c < BK * A_CPR; c += NT) {
                    const int rr = c / A_CPR;
                    scale8_inplace<T>(a_w + rr * LDA + (c % A_CPR) * 8, s_sdy[st * BK + rr]);
                }
            if (has_sx)
                for (int c = tid; c < BK * B_CPR; c += NT) {
                    const int rr = c / B_CPR;
                    scale8_inplace<T>(b_w + rr * LDB + (c % B_CPR) * 8, s_sx[st * BK + rr]);
                }
            __syncthreads();
        }
        {
            const int nk = kt + STAGES - 1;
            if (nk < steps) load_stage(nk % STAGES, nk);
            cp_async_commit();
        }
        const T *a_st = sA + st * A_STAGE;
        const T *b_st = sB + st * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t af[MS][4], bfr[NS][2];
#pragma unroll
            for (int ms = 0; ms < MS; ms++) {
                ldmatrix_x4_trans(af[ms], a_st + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDA +
                                              wm * WTM + ms * 16 + ((lane >> 3) & 1) * 8);
            }
#pragma unroll
            for (int n2 = 0; n2 < NS / 2; n2++) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, b_st + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDB +
                                         wn * WTN + n2 * 16 + (lane >> 4) * 8);
                bfr[2 * n2][0] = r[0];
                bfr[2 * n2][1] = r[1];
                bfr[2 * n2 + 1][0] = r[2];
                bfr[2 * n2 + 1][1] = r[3];
            }
#pragma unroll
            for (int ms = 0; ms < MS; ms++)
#pragma unroll
                for (int ns = 0; ns < NS; ns++) Mma<T>::run(acc[ms][ns], af[ms], bfr[ns]);
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int ms = 0; ms < MS; ms++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int n = n0 + wm * WTM + ms * 16 + g8 + h * 8;
            if (n >= N) continue;
            T *row = dWe + (int64_t)n * K;
#pragma unroll
            for (int ns = 0; ns < NS; ns++) {
                const int col = k0 + wn * WTN + ns * 8 + 2 * t4;
                store2w<T>(row, col, K, p.w_pair, acc[ms][ns][2 * h], acc[ms][ns][2 * h + 1]);
            }
        }
}

/* fp32 dW in full fp32 (FFMA): 256 threads as 16x16, each a (BM/16) x (BN/16) micro-tile of
 * dW_e, rows consumed 16 at a time through shared memory. */
template <int BM, int BN>
__global__ void __launch_bounds__(MOE_GG_FFMA_THREADS) moe_gg_dw_ffma_kernel(const DWParams p)
{
    constexpr int NT = MOE_GG_FFMA_THREADS, BK = MOE_GG_FFMA_BK;
    constexpr int TM = BM / 16, TN = BN / 16;
    __shared__ __align__(16) float As[BK][BM + 4];
    __shared__ __align__(16) float Bs[BK][BN + 4];
    __shared__ int s_dyrow[BK], s_xrow[BK];
    __shared__ float s_sdy[BK], s_sx[BK];

    const int e = blockIdx.z, n0 = blockIdx.y * BM, k0 = blockIdx.x * BN;
    const int N = p.N, K = p.K;
    float *dWe = static_cast<float *>(p.dW) + (int64_t)e * N * K;
    int lo, hi;
    expert_rows(p.offsets, e, p.max_rows, &lo, &hi);
    if (hi <= lo) {
        zero_tile<float>(p, dWe, n0, k0, BM, BN);
        return;
    }
    const float *__restrict__ dY = static_cast<const float *>(p.dY);
    const float *__restrict__ X = static_cast<const float *>(p.X);
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = 0.f;

    for (int rb = lo; rb < hi; rb += BK) {
        if (tid < BK) {
            int g = 0;
            const int r = rb + tid;
            const int sd = dw_src_row(p, r, hi, p.permute_dy, &g);
            s_dyrow[tid] = sd;
            s_sdy[tid] = (sd >= 0 && p.scale_dy) ? static_cast<const float *>(p.scale_dy)[g] : 1.f;
            const int sx = dw_src_row(p, r, hi, p.permute_x, &g);
            s_xrow[tid] = sx;
            s_sx[tid] = (sx >= 0 && p.scale_x) ? static_cast<const float *>(p.scale_x)[g] : 1.f;
        }
        __syncthreads();
        for (int idx = tid; idx < BK * BM; idx += NT) {
            const int rr = idx / BM, n = idx % BM, sr = s_dyrow[rr];
            As[rr][n] = (sr >= 0 && n0 + n < N) ? dY[(int64_t)sr * N + n0 + n] * s_sdy[rr] : 0.f;
        }
        for (int idx = tid; idx < BK * BN; idx += NT) {
            const int rr = idx / BN, k = idx % BN, sr = s_xrow[rr];
            Bs[rr][k] = (sr >= 0 && k0 + k < K) ? X[(int64_t)sr * K + k0 + k] * s_sx[rr] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < BK; rr++) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; i += 4) {
                const float4 v = *reinterpret_cast<const float4 *>(&As[rr][ty * TM + i]);
                a[i] = v.x; a[i + 1] = v.y; a[i + 2] = v.z; a[i + 3] = v.w;
            }
#pragma unroll
            for (int j = 0; j < TN; j += 4) {
                const float4 v = *reinterpret_cast<const float4 *>(&Bs[rr][tx * TN + j]);
                b[j] = v.x; b[j + 1] = v.y; b[j + 2] = v.z; b[j + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; i++) {
        const int n = n0 + ty * TM + i;
        if (n >= N) continue;
#pragma unroll
        for (int j = 0; j < TN; j++) {
            const int k = k0 + tx * TN + j;
            if (k < K) dWe[(int64_t)n * K + k] = acc[i][j];
        }
    }
}

/* ---- host side ---- */

template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool AL>
cudaError_t launch_dw_mma(const DWParams &p, cudaStream_t s)
{
    constexpr int NT = WM * WN * 32;
    const size_t smem = dw_smem_bytes<BM, BN, BK, NT, STAGES, T>();
    auto kern = moe_gg_dw_mma_kernel<T, BM, BN, BK, WM, WN, STAGES, AL>;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    dim3 grid((p.K + BN - 1) / BN, (p.N + BM - 1) / BM, p.E);
    kern<<<grid, NT, smem, s>>>(p);
    return cudaGetLastError();
}

template <int BM, int BN>
cudaError_t launch_dw_ffma(const DWParams &p, cudaStream_t s)
{
    dim3 grid((p.K + BN - 1) / BN, (p.N + BM - 1) / BM, p.E);
    moe_gg_dw_ffma_kernel<BM, BN><<<grid, MOE_GG_FFMA_THREADS, 0, s>>>(p);
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_dw_mma(const DWParams &p, const moe_kernel_config &c, bool aligned,
                            cudaStream_t s, bool *found)
{
    *found = true;
    if (!aligned) {
#define MOE_DW_NARROW(bm, bn, bk, wm, wn, st) return launch_dw_mma<T, bm, bn, bk, wm, wn, st, false>(p, s);
        MOE_GG_NARROW_CONFIG(MOE_DW_NARROW)
#undef MOE_DW_NARROW
    }
#define MOE_DW_CASE(bm, bn, bk, wm, wn, st)                                                     \
    if (c.tile_m == bm && c.tile_n == bn && c.tile_k == bk && c.warps == wm * wn && c.stages == st) \
        return launch_dw_mma<T, bm, bn, bk, wm, wn, st, true>(p, s);
    MOE_GG_MMA_CONFIGS(MOE_DW_CASE)
#undef MOE_DW_CASE
    *found = false;
    return cudaSuccess;
}

cudaError_t dispatch_dw_ffma(const DWParams &p, const moe_kernel_config &c, cudaStream_t s,
                             bool *found)
{
    *found = true;
#define MOE_DW_FCASE(bm, bn) \
    if (c.tile_m == bm && c.tile_n == bn) return launch_dw_ffma<bm, bn>(p, s);
    MOE_GG_FFMA_CONFIGS(MOE_DW_FCASE)
#undef MOE_DW_FCASE
    *found = false;
    return cudaSuccess;
}

const char *dw_kernel_name(moe_dtype dt, bool aligned)
{
    switch (dt) {
    case MOE_DTYPE_BF16: return aligned ? "grouped_gemm_dw_mma_bf16" : "grouped_gemm_dw_mma_bf16_narrow";
    case MOE_DTYPE_F16: return aligned ? "grouped_gemm_dw_mma_fp16" : "grouped_gemm_dw_mma_fp16_narrow";
    default: return "grouped_gemm_dw_ffma_fp32";
    }
}

} // namespace

extern "C" moe_status moe_cuda_grouped_gemm_dw(const moe_grouped_gemm_dw_args *a,
                                               const moe_kernel_config *cfg,
                                               const moe_kernel_tuning *tuning,
                                               cudaStream_t stream, moe_kernel_report *report,
                                               moe_error *err)
{
    const char *fn = "moe_cuda_grouped_gemm_dw";
    if (!a) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: args is NULL", fn);
    if (a->dtype != MOE_DTYPE_BF16 && a->dtype != MOE_DTYPE_F16 && a->dtype != MOE_DTYPE_F32)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "%s: dtype %s not supported (bf16, fp16, fp32)",
                        fn, moe_dtype_name(a->dtype) ? moe_dtype_name(a->dtype) : "?");
    if (a->num_experts < 1 || a->num_experts > 65535 || a->N < 1 || a->K < 1 || a->max_rows < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: need 1 <= num_experts <= 65535, N >= 1, K >= 1, max_rows >= 0 (got "
                        "E=%d N=%d K=%d max_rows=%d)", fn, a->num_experts, a->N, a->K, a->max_rows);
    if ((long long)a->num_experts * a->N * a->K > ((long long)1 << 40) ||
        (long long)a->max_rows * MOE_MAX(a->N, a->K) > ((long long)1 << 40))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: problem too large (E=%d N=%d K=%d rows=%d)",
                        fn, a->num_experts, a->N, a->K, a->max_rows);
    const bool need_gather = a->permute_dy || a->permute_x || a->scale_dy_rows || a->scale_x_rows;
    if (need_gather && !a->gather_idx)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: gather_idx is NULL but permute_dy/permute_x/scale rows need it", fn);
    if (need_gather && a->topk < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: topk must be >= 1 (got %d)", fn, a->topk);
    if (!a->expert_offsets || !a->dW || (a->max_rows > 0 && (!a->dY || !a->X)))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: expert_offsets, dY, X and dW must be device pointers (one is NULL)", fn);

    char buf[64];
    if (!cfg)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: no configuration: pass a resolved one (moe_kernel_config_resolve, or "
                        "moe_grouped_gemm_dw_launch to resolve and launch)", fn);
    if (!moe_kernel_config_is_compiled(cfg, a->dtype))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: configuration %s is not a compiled %s configuration; resolve requests "
                        "with moe_kernel_config_resolve", fn, config_brief(*cfg, buf, sizeof buf),
                        moe_dtype_name(a->dtype));
    moe_kernel_config c = *cfg;
    const moe_kernel_tuning no_tuning = {};
    const moe_kernel_tuning &t = tuning ? *tuning : no_tuning;
    const int avg_rows = a->max_rows / a->num_experts;
    /* A ",tma" configuration runs the wgmma dW kernel (its own 128x256 tile) where it can,
     * else the mma.sync default. */
    if (c.use_tma && moe_gg_dw_wgmma_applicable(a)) {
        if (report) {
            report->kernel = moe_gg_dw_wgmma_kernel_name(a->dtype);
            /* the dW kernel's own tile (stages: 3 when staged, set after the launch) */
            report->config = c;
            report->config.tile_m = 128;
            report->config.tile_n = 256;
            report->config.tile_k = 64;
            report->config.warps = 12;
            report->config.stages = 4;
            report->config.cluster = 0;
            report->used_tma = 0;
            report->staged_epilogue = 0;
            report->a_tma = 0;
            report->sched_dynamic = 0; /* the dW kernel takes its tiles in the static order */
            report->fast_rounding = 0; /* its row scales are rounded before the MMA, as HF's */
        }
        int staged = 0;
        cudaError_t we = moe_gg_dw_wgmma_launch(a, c.epilogue, t, stream, &staged);
        if (we != cudaSuccess)
            return moe_fail(err, MOE_ERR_CUDA, "%s: launch of %s (%s) failed: %s", fn,
                            moe_gg_dw_wgmma_kernel_name(a->dtype),
                            config_brief(c, buf, sizeof buf), cudaGetErrorString(we));
        if (report) {
            report->staged_epilogue = staged;
            report->config.stages = staged ? 3 : 4;
            report->config.epilogue = staged ? MOE_GG_EPILOGUE_STAGED : MOE_GG_EPILOGUE_DIRECT;
            report->config.a_load = MOE_GG_A_AUTO; /* no A-load choice in the dW kernel */
        }
        return MOE_OK;
    }
    if (c.use_tma) c = moe_gg_default_mma_config(a->dtype, avg_rows);

    const size_t es = moe_dtype_size(a->dtype);
    const bool aligned = a->dtype != MOE_DTYPE_F32 && aligned16(a->dY) && aligned16(a->X) &&
                         (a->N * es) % 16 == 0 && (a->K * es) % 16 == 0;
    DWParams p;
    fill_dw_params(p, a);
    p.w_pair = ((uintptr_t)a->dW % (2 * es)) == 0 && a->K % 2 == 0;

    const bool fast = aligned || a->dtype == MOE_DTYPE_F32;
    moe_kernel_config ran = fast ? c : moe_gg_narrow_config();
    if (report) {
        report->kernel = dw_kernel_name(a->dtype, fast);
        report->config = ran;
        report->used_tma = 0;
        report->staged_epilogue = 0;
        report->a_tma = 0;
        report->sched_dynamic = 0;
        report->fast_rounding = 0;
    }
    /* Even with max_rows == 0 the launch runs: every expert is empty and dW must be zeros. */
    cudaError_t e = cudaSuccess;
    bool found = false;
    switch (a->dtype) {
    case MOE_DTYPE_BF16: e = dispatch_dw_mma<__nv_bfloat16>(p, c, aligned, stream, &found); break;
    case MOE_DTYPE_F16: e = dispatch_dw_mma<__half>(p, c, aligned, stream, &found); break;
    default: e = dispatch_dw_ffma(p, c, stream, &found); break;
    }
    if (!found)
        return moe_fail(err, MOE_ERR_INTERNAL, "%s: config %s is listed but not instantiated", fn,
                        config_brief(c, buf, sizeof buf));
    if (e != cudaSuccess)
        return moe_fail(err, MOE_ERR_CUDA, "%s: launch of %s (%s) failed: %s", fn,
                        dw_kernel_name(a->dtype, fast), config_brief(ran, buf, sizeof buf),
                        cudaGetErrorString(e));
    return MOE_OK;
}
