/*
 * grouped_gemm.cu — the forward / backward-dX grouped GEMM of the fused MoE path, one launch
 * over all experts, with the permutations, row scales and the SiLU-and-mul epilogue fused.
 *
 * Semantics (moe_stages.h, the CPU twin is cpu_grouped_gemm): for every expert e and every row
 * r in [off[e], off[e+1]):   C_r = A_src(r) @ op(B_e)   with fp32 accumulation, where
 *   src(r) = permute_x ? gather_idx[r] / topk : r
 *   A rows scaled by scale_a_rows[gather_idx[r]] and rounded to the dtype before the MMA,
 *   op(B_e) = B_e^T for B_e [N, K] (b_kn false) or B_e for B_e [K, N] (b_kn true),
 *   the fp32 accumulator times scale_c_rows[gather_idx[r]], then rounded, stored at row
 *   permute_y ? gather_idx[r] : r;  MOE_EPI_SILU_MUL: C[r, j] = round(silu(acc_j) * acc_{I+j}).
 *
 * Kernels (docs/KERNELS.md has the full design notes):
 *   moe_gg_mma_kernel   bf16/fp16 on tensor cores: mma.sync m16n8k16 (HMMA), ldmatrix, a
 *                       STAGES-deep cp.async pipeline; ALIGNED=false is the narrow fallback for
 *                       rows that are not 16-byte multiples (element loads into the same tiles).
 *   moe_gg_ffma_kernel  fp32 in full fp32 (FFMA), shared-memory tiled.
 *   The ",tma" configurations run the Hopper wgmma/TMA kernel of grouped_gemm_wgmma.cu when
 *   the problem allows it (bf16/fp16, B [N,K], aligned rows, an sm_90 device), else the
 *   mma.sync default (the report says which ran).
 * The launcher runs the resolved configuration it is given (moe_kernel_config_is_compiled) with
 * the caller's moe_kernel_tuning; it never resolves requests or reads the environment.
 * Grid: x = one slot per possible row tile (sized from max_rows on the host: at most
 * ceil(max_rows/BM) + E tiles), y = output-column tiles. Each CTA finds its expert on the device
 * from expert_offsets (gemm_common.cuh: find_tile_expert); slots past the last tile exit.
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
#include "grouped_gemm_wgmma.h"
#include "moe_kernels.h"

using namespace moe_gg;

namespace {

/* Everything a forward/dX kernel needs, by value (device pointers). */
struct GGParams {
    const int32_t *offsets;
    const int32_t *gather; /* NULL when no permute/scale needs it */
    const void *A;
    const void *B;
    void *C;
    void *C_preact;
    const void *scale_a;
    const void *scale_c;
    int E, N, K, max_rows, topk;
    int permute_x, permute_y, silu;
    int n_out;     /* columns of C: N, or N/2 with SiLU-and-mul */
    int c_pair;    /* C rows allow 2-element stores (even width, aligned base) */
    int p_pair;    /* same for C_preact and its up half (I even) */
};

/* Row bookkeeping of one row tile, in shared memory: where each of the BM rows reads A, where it
 * is stored, and its two row scales (1 when absent). A row past the expert's end, or whose
 * gather index is out of [0, max_rows), has arow = crow = -1: it loads zeros and stores nothing. */
template <typename T>
__device__ __forceinline__ void fill_row_info(const GGParams &p, const TileInfo &ti, int BM,
                                              int *s_arow, int *s_crow, float *s_ascale,
                                              float *s_cscale)
{
    for (int i = threadIdx.x; i < BM; i += blockDim.x) {
        const int r = ti.row0 + i;
        int arow = -1, crow = -1;
        float sa = 1.f, sc = 1.f;
        if (r < ti.row_end) {
            const int g = p.gather ? p.gather[r] : r;
            if (g >= 0 && g < p.max_rows) {
                arow = p.permute_x ? g / p.topk : r;
                crow = p.permute_y ? g : r;
                if (p.scale_a) sa = load_f(static_cast<const T *>(p.scale_a) + g);
                if (p.scale_c) sc = load_f(static_cast<const T *>(p.scale_c) + g);
            }
        }
        s_arow[i] = arow;
        s_crow[i] = crow;
        s_ascale[i] = sa;
        s_cscale[i] = sc;
    }
}

/* Output column mapping of a tile. Without SiLU, tile-local column i is global B column
 * tile_n*BN + i. With SiLU-and-mul the tile must hold gate column j and up column I+j in the
 * same thread's accumulators: each "group" of GW local columns (a warp's width) is split into
 * GW/2 gate columns followed by the GW/2 matching up columns, and the tile covers BN/2 output
 * columns. Returns the global B column (row of B_e [N,K], or column of B_e [K,N]) and, in *lim,
 * how many of the 8 consecutive local columns starting at i (i a multiple of 8) are in range. */
__device__ __forceinline__ int map_col(int i, int tile_n, int BN, int GW, int N, bool silu,
                                       int *lim)
{
    if (!silu) {
        const int g = tile_n * BN + i;
        *lim = max(0, min(8, N - g));
        return g;
    }
    const int I = N / 2, half = GW / 2;
    const int grp = i / GW, w = i % GW;
    const int j = tile_n * (BN / 2) + grp * half + (w % half);
    *lim = max(0, min(8, I - j));
    return (w / half) * I + j;
}

/* The same mapping for one local column i (any group width, even one narrower than 8):
 * the global B column, or -1 when it is out of range. */
__device__ __forceinline__ int map_col1(int i, int tile_n, int BN, int GW, int N, bool silu)
{
    if (!silu) {
        const int g = tile_n * BN + i;
        return g < N ? g : -1;
    }
    const int I = N / 2, half = GW / 2;
    const int grp = i / GW, w = i % GW;
    const int j = tile_n * (BN / 2) + grp * half + (w % half);
    return j < I ? (w / half) * I + j : -1;
}

template <typename T>
__device__ __forceinline__ void store2(T *row, int col, int ncols, bool pair, float v0, float v1)
{
    if (pair && col + 1 < ncols) {
        *reinterpret_cast<typename Elem<T>::T2 *>(row + col) = Elem<T>::from_f2(make_float2(v0, v1));
    } else {
        if (col < ncols) row[col] = Elem<T>::from_f(v0);
        if (col + 1 < ncols) row[col + 1] = Elem<T>::from_f(v1);
    }
}

template <int BM, int BN, int BK, int NT, int STAGES, bool BKN, typename T>
constexpr size_t mma_smem_bytes()
{
    return (size_t)STAGES * (BM * (BK + kPad) + (BKN ? BK * (BN + kPad) : BN * (BK + kPad))) *
               sizeof(T) +
           (size_t)4 * BM * 4 + (size_t)(NT / 32 + 4) * 4;
}

/* Register budget: 8-warp tiles with <= 64 accumulators per thread run two CTAs per SM (<= 128
 * registers), 4-warp tiles three (<= 168); 128-accumulator tiles run one. */
template <int BM, int BN, int NT>
constexpr int mma_min_blocks()
{
    return (BM * BN / NT) > 64 ? 1 : (NT >= 256 ? 2 : 3);
}

template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool BKN, bool ALIGNED>
__global__ void __launch_bounds__(WM *WN * 32, (mma_min_blocks<BM, BN, WM * WN * 32>()))
    moe_gg_mma_kernel(const GGParams p)
{
    constexpr int NT = WM * WN * 32;
    constexpr int WTM = BM / WM, WTN = BN / WN; /* warp tile */
    constexpr int MS = WTM / 16, NS = WTN / 8;  /* m16 x n8 MMA tiles per warp */
    constexpr int LDA = BK + kPad;              /* sA: [BM][BK+pad], K contiguous */
    constexpr int LDB = BKN ? BN + kPad : BK + kPad; /* sB: [BK][BN+pad] or [BN][BK+pad] */
    constexpr int A_STAGE = BM * LDA;
    constexpr int B_STAGE = BKN ? BK * LDB : BN * LDB;
    constexpr int KCH = BK / 8; /* 16-byte chunks per tile row along K */
    constexpr int A_IT = BM * KCH / NT;
    constexpr int B_IT = (BKN ? BK * (BN / 8) : BN * KCH) / NT;
    static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16x16");
    static_assert(BK % 16 == 0, "BK must be a multiple of 16");
    static_assert((BM * KCH) % NT == 0 && ((BKN ? BK * (BN / 8) : BN * KCH) % NT) == 0,
                  "tile chunks must divide evenly over the threads");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sA = reinterpret_cast<T *>(smem_raw);
    T *sB = sA + STAGES * A_STAGE;
    int *s_arow = reinterpret_cast<int *>(sB + STAGES * B_STAGE);
    int *s_crow = s_arow + BM;
    float *s_ascale = reinterpret_cast<float *>(s_crow + BM);
    float *s_cscale = s_ascale + BM;
    int *s_scratch = reinterpret_cast<int *>(s_cscale + BM);

    TileInfo ti;
    if (!find_tile_expert<NT>(p.offsets, p.E, p.max_rows, BM, blockIdx.x, s_scratch, &ti)) return;
    fill_row_info<T>(p, ti, BM, s_arow, s_crow, s_ascale, s_cscale);
    __syncthreads();

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;
    const int tile_n = blockIdx.y;
    const bool silu = p.silu != 0;
    const int K = p.K, N = p.N;
    const T *__restrict__ A = static_cast<const T *>(p.A);
    const T *__restrict__ Be = static_cast<const T *>(p.B) + (int64_t)ti.expert * N * K;

    /* Per-thread source pointers: a thread loads the same tile rows/columns at every k step,
     * so the row lookups happen once. Chunk c = tid + it*NT of a tile; NULL = the chunk is
     * outside the problem (zeros). */
    constexpr int A_ROWSTEP = NT / KCH;
    const int a_row0 = tid / KCH, a_kc = (tid % KCH) * 8;
    const T *a_src[A_IT];
#pragma unroll
    for (int it = 0; it < A_IT; it++) {
        const int ar = s_arow[a_row0 + it * A_ROWSTEP];
        a_src[it] = ar >= 0 ? A + (int64_t)ar * K + a_kc : nullptr;
    }
    /* B [N,K] (b_kn false): like A, one pointer per B_e row the thread loads.
     * B [K,N] (b_kn true): the thread loads 8 columns at rows b_row0 + it*B_ROWSTEP of every
     * k step: one column pointer, lim = how many of the 8 columns exist. */
    constexpr int B_CPR = BKN ? BN / 8 : KCH; /* chunks per smem row */
    constexpr int B_ROWSTEP = NT / B_CPR;
    const int b_row0 = tid / B_CPR, b_c8 = (tid % B_CPR) * 8;
    const T *b_src[BKN ? 1 : B_IT];
    int b_lim = 0;
    if (BKN) {
        const int gcol = map_col(b_c8, tile_n, BN, WTN, N, silu, &b_lim);
        b_src[0] = b_lim > 0 ? Be + gcol : nullptr;
    } else {
#pragma unroll
        for (int it = 0; it < (BKN ? 1 : B_IT); it++) {
            const int grow = map_col1(b_row0 + it * B_ROWSTEP, tile_n, BN, WTN, N, silu);
            b_src[it] = grow >= 0 ? Be + (int64_t)grow * K + b_c8 : nullptr;
        }
    }

    auto load_stage = [&](int stage, int kt) {
        const int k0 = kt * BK;
        T *a_dst = sA + stage * A_STAGE;
        T *b_dst = sB + stage * B_STAGE;
#pragma unroll
        for (int it = 0; it < A_IT; it++) {
            const int gk = k0 + a_kc;
            T *dst = a_dst + (a_row0 + it * A_ROWSTEP) * LDA + a_kc;
            if (ALIGNED) {
                const bool v = a_src[it] != nullptr && gk < K;
                cp_async16(dst, v ? a_src[it] + k0 : A, v ? 16 : 0);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++)
                    dst[j] = (a_src[it] && gk + j < K) ? a_src[it][k0 + j] : T(0.f);
            }
        }
#pragma unroll
        for (int it = 0; it < B_IT; it++) {
            T *dst = b_dst + (b_row0 + it * B_ROWSTEP) * LDB + b_c8;
            if (BKN) {
                const int gk = k0 + b_row0 + it * B_ROWSTEP;
                const bool v = b_src[0] != nullptr && gk < K;
                const T *src = v ? b_src[0] + (int64_t)gk * N : Be;
                if (ALIGNED) {
                    cp_async16(dst, src, v ? 16 : 0);
                } else {
#pragma unroll
                    for (int j = 0; j < 8; j++) dst[j] = (v && j < b_lim) ? src[j] : T(0.f);
                }
            } else {
                const int gk = k0 + b_c8;
                const T *src = b_src[BKN ? 0 : it];
                if (ALIGNED) {
                    const bool v = src != nullptr && gk < K;
                    cp_async16(dst, v ? src + k0 : Be, v ? 16 : 0);
                } else {
#pragma unroll
                    for (int j = 0; j < 8; j++)
                        dst[j] = (src && gk + j < K) ? src[k0 + j] : T(0.f);
                }
            }
        }
    };

    /* scale_a_rows: the thread scales the A chunks it loaded itself, in shared memory, between
     * its cp.async wait and the stage's barrier (its own copies are visible to it then), so the
     * MMA loop stays branch-free. */
    const bool has_sa = p.scale_a != nullptr;

    float acc[MS][NS][4];
#pragma unroll
    for (int ms = 0; ms < MS; ms++)
#pragma unroll
        for (int ns = 0; ns < NS; ns++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[ms][ns][q] = 0.f;

    const int KT = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<STAGES - 2>();
        if (has_sa) { /* multiply and round to T, before the MMA (moe_stages.h) */
            T *a_st = sA + (kt % STAGES) * A_STAGE;
#pragma unroll
            for (int it = 0; it < A_IT; it++) {
                const int row = a_row0 + it * A_ROWSTEP;
                scale8_inplace<T>(a_st + row * LDA + a_kc, s_ascale[row]);
            }
        }
        __syncthreads(); /* stage kt landed (and scaled) for everyone; stage kt-1 consumed */
        {
            const int nk = kt + STAGES - 1;
            if (nk < KT) load_stage(nk % STAGES, nk);
            cp_async_commit();
        }
        const T *a_st = sA + (kt % STAGES) * A_STAGE;
        const T *b_st = sB + (kt % STAGES) * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t af[MS][4], bfr[NS][2];
#pragma unroll
            for (int ms = 0; ms < MS; ms++) {
                ldmatrix_x4(af[ms], a_st + (wm * WTM + ms * 16 + (lane & 15)) * LDA + kk * 16 +
                                        (lane >> 4) * 8);
            }
#pragma unroll
            for (int n2 = 0; n2 < NS / 2; n2++) {
                uint32_t r[4];
                if (BKN)
                    ldmatrix_x4_trans(r, b_st + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDB +
                                             wn * WTN + n2 * 16 + (lane >> 4) * 8);
                else
                    ldmatrix_x4(r, b_st + (wn * WTN + n2 * 16 + (lane >> 4) * 8 + (lane & 7)) * LDB +
                                       kk * 16 + ((lane >> 3) & 1) * 8);
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

    /* Epilogue straight from the accumulators: thread holds rows g, g+8 and column pairs 2t4. */
    const int g = lane >> 2, t4 = lane & 3;
    T *C = static_cast<T *>(p.C);
#pragma unroll
    for (int ms = 0; ms < MS; ms++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int rl = wm * WTM + ms * 16 + g + h * 8;
            const int crow = s_crow[rl];
            if (crow < 0) continue;
            if (!silu) {
                const float sc = s_cscale[rl];
                T *crow_p = C + (int64_t)crow * p.n_out;
#pragma unroll
                for (int ns = 0; ns < NS; ns++) {
                    const int col = tile_n * BN + wn * WTN + ns * 8 + 2 * t4;
                    store2<T>(crow_p, col, p.n_out, p.c_pair, acc[ms][ns][2 * h] * sc,
                              acc[ms][ns][2 * h + 1] * sc);
                }
            } else {
                const int I = p.n_out;
                T *crow_p = C + (int64_t)crow * I;
                T *prow_p = p.C_preact ? static_cast<T *>(p.C_preact) + (int64_t)crow * 2 * I
                                       : nullptr;
#pragma unroll
                for (int ns = 0; ns < NS / 2; ns++) {
                    const int j = tile_n * (BN / 2) + wn * (WTN / 2) + ns * 8 + 2 * t4;
                    const float g0 = acc[ms][ns][2 * h], g1 = acc[ms][ns][2 * h + 1];
                    const float u0 = acc[ms][ns + NS / 2][2 * h], u1 = acc[ms][ns + NS / 2][2 * h + 1];
                    store2<T>(crow_p, j, I, p.c_pair, silu_f(g0) * u0, silu_f(g1) * u1);
                    if (prow_p) {
                        store2<T>(prow_p, j, I, p.p_pair, g0, g1);
                        store2<T>(prow_p + I, j, I, p.p_pair, u0, u1);
                    }
                }
            }
        }
    }
}

/* ---- fp32: full-precision FFMA kernel ----
 * 256 threads as a 16x16 grid, each computing a (BM/16) x (BN/16) micro-tile; tiles of BK=16
 * staged in shared memory transposed (k-major) so the inner loop reads float4s. With SiLU the
 * thread's TN columns are TN/2 gate columns then the TN/2 matching up columns (map_col with a
 * group width of TN). Scales apply in fp32 (the dtype's rounding is the identity). */
template <int BM, int BN, bool BKN>
__global__ void __launch_bounds__(MOE_GG_FFMA_THREADS) moe_gg_ffma_kernel(const GGParams p)
{
    constexpr int NT = MOE_GG_FFMA_THREADS, BK = MOE_GG_FFMA_BK;
    constexpr int TM = BM / 16, TN = BN / 16;
    static_assert(TN % 4 == 0 && TM % 4 == 0, "micro-tile must be float4-wide");
    __shared__ __align__(16) float As[BK][BM + 4];
    __shared__ __align__(16) float Bs[BK][BN + 4];
    __shared__ int s_arow[BM], s_crow[BM];
    __shared__ float s_ascale[BM], s_cscale[BM];
    __shared__ int s_bcol[BN];
    __shared__ int s_scratch[NT / 32 + 4];

    TileInfo ti;
    if (!find_tile_expert<NT>(p.offsets, p.E, p.max_rows, BM, blockIdx.x, s_scratch, &ti)) return;
    fill_row_info<float>(p, ti, BM, s_arow, s_crow, s_ascale, s_cscale);
    const int tid = threadIdx.x, tile_n = blockIdx.y;
    const bool silu = p.silu != 0;
    const int K = p.K, N = p.N;
    for (int i = tid; i < BN; i += NT) {
        s_bcol[i] = map_col1(i, tile_n, BN, TN, N, silu);
    }
    __syncthreads();

    const float *__restrict__ A = static_cast<const float *>(p.A);
    const float *__restrict__ Be = static_cast<const float *>(p.B) + (int64_t)ti.expert * N * K;
    const int tx = tid % 16, ty = tid / 16;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < K; k0 += BK) {
        for (int idx = tid; idx < BM * BK; idx += NT) { /* k fastest: coalesced along A rows */
            const int row = idx / BK, kk = idx % BK, ar = s_arow[row];
            As[kk][row] = (ar >= 0 && k0 + kk < K) ? A[(int64_t)ar * K + k0 + kk] * s_ascale[row] : 0.f;
        }
        if (BKN) {
            for (int idx = tid; idx < BN * BK; idx += NT) { /* n fastest */
                const int kk = idx / BN, n = idx % BN, gc = s_bcol[n];
                Bs[kk][n] = (gc >= 0 && k0 + kk < K) ? Be[(int64_t)(k0 + kk) * N + gc] : 0.f;
            }
        } else {
            for (int idx = tid; idx < BN * BK; idx += NT) { /* k fastest */
                const int n = idx / BK, kk = idx % BK, gc = s_bcol[n];
                Bs[kk][n] = (gc >= 0 && k0 + kk < K) ? Be[(int64_t)gc * K + k0 + kk] : 0.f;
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk++) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; i += 4) {
                const float4 v = *reinterpret_cast<const float4 *>(&As[kk][ty * TM + i]);
                a[i] = v.x; a[i + 1] = v.y; a[i + 2] = v.z; a[i + 3] = v.w;
            }
#pragma unroll
            for (int j = 0; j < TN; j += 4) {
                const float4 v = *reinterpret_cast<const float4 *>(&Bs[kk][tx * TN + j]);
                b[j] = v.x; b[j + 1] = v.y; b[j + 2] = v.z; b[j + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    float *C = static_cast<float *>(p.C);
#pragma unroll
    for (int i = 0; i < TM; i++) {
        const int rl = ty * TM + i, crow = s_crow[rl];
        if (crow < 0) continue;
        if (!silu) {
            const float sc = s_cscale[rl];
#pragma unroll
            for (int j = 0; j < TN; j++) {
                const int col = tile_n * BN + tx * TN + j;
                if (col < p.n_out) C[(int64_t)crow * p.n_out + col] = acc[i][j] * sc;
            }
        } else {
            const int I = p.n_out;
#pragma unroll
            for (int j = 0; j < TN / 2; j++) {
                const int col = tile_n * (BN / 2) + tx * (TN / 2) + j;
                if (col >= I) continue;
                const float gv = acc[i][j], uv = acc[i][j + TN / 2];
                C[(int64_t)crow * I + col] = silu_f(gv) * uv;
                if (p.C_preact) {
                    float *pr = static_cast<float *>(p.C_preact) + (int64_t)crow * 2 * I;
                    pr[col] = gv;
                    pr[I + col] = uv;
                }
            }
        }
    }
}

/* ---- host side ---- */

struct Launch {
    int grid_x, grid_y;
};

template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool BKN, bool AL>
cudaError_t launch_mma(const GGParams &p, int tiles_x, cudaStream_t s)
{
    constexpr int NT = WM * WN * 32;
    const size_t smem = mma_smem_bytes<BM, BN, BK, NT, STAGES, BKN, T>();
    auto kern = moe_gg_mma_kernel<T, BM, BN, BK, WM, WN, STAGES, BKN, AL>;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    const int out_per_tile = p.silu ? BN / 2 : BN;
    dim3 grid(tiles_x, (p.n_out + out_per_tile - 1) / out_per_tile);
    kern<<<grid, NT, smem, s>>>(p);
    return cudaGetLastError();
}

template <int BM, int BN, bool BKN>
cudaError_t launch_ffma(const GGParams &p, int tiles_x, cudaStream_t s)
{
    const int out_per_tile = p.silu ? BN / 2 : BN;
    dim3 grid(tiles_x, (p.n_out + out_per_tile - 1) / out_per_tile);
    moe_gg_ffma_kernel<BM, BN, BKN><<<grid, MOE_GG_FFMA_THREADS, 0, s>>>(p);
    return cudaGetLastError();
}

/* Row-tile slots for tile height BM: every expert wastes at most one partial tile, and no tile
 * is empty, so sum_e ceil(rows_e/BM) <= min(ceil(max_rows/BM) + E, max_rows). */
int row_tile_slots(int max_rows, int E, int BM)
{
    const long long a = ((long long)max_rows + BM - 1) / BM + E;
    return (int)(a < max_rows ? a : max_rows);
}

template <typename T, bool BKN>
cudaError_t dispatch_mma(const GGParams &p, const moe_kernel_config &c, bool aligned,
                         cudaStream_t s, bool *found)
{
    *found = true;
    if (!aligned) {
#define MOE_GG_NARROW(bm, bn, bk, wm, wn, st) \
    return launch_mma<T, bm, bn, bk, wm, wn, st, BKN, false>(p, row_tile_slots(p.max_rows, p.E, bm), s);
        MOE_GG_NARROW_CONFIG(MOE_GG_NARROW)
#undef MOE_GG_NARROW
    }
#define MOE_GG_CASE(bm, bn, bk, wm, wn, st)                                                     \
    if (c.tile_m == bm && c.tile_n == bn && c.tile_k == bk && c.warps == wm * wn && c.stages == st) \
        return launch_mma<T, bm, bn, bk, wm, wn, st, BKN, true>(p, row_tile_slots(p.max_rows, p.E, bm), s);
    MOE_GG_MMA_CONFIGS(MOE_GG_CASE)
#undef MOE_GG_CASE
    *found = false;
    return cudaSuccess;
}

template <bool BKN>
cudaError_t dispatch_ffma(const GGParams &p, const moe_kernel_config &c, cudaStream_t s,
                          bool *found)
{
    *found = true;
#define MOE_GG_FCASE(bm, bn)                  \
    if (c.tile_m == bm && c.tile_n == bn) \
        return launch_ffma<bm, bn, BKN>(p, row_tile_slots(p.max_rows, p.E, bm), s);
    MOE_GG_FFMA_CONFIGS(MOE_GG_FCASE)
#undef MOE_GG_FCASE
    *found = false;
    return cudaSuccess;
}

const char *kernel_name(moe_dtype dt, bool aligned)
{
    switch (dt) {
    case MOE_DTYPE_BF16: return aligned ? "grouped_gemm_mma_bf16" : "grouped_gemm_mma_bf16_narrow";
    case MOE_DTYPE_F16: return aligned ? "grouped_gemm_mma_fp16" : "grouped_gemm_mma_fp16_narrow";
    default: return "grouped_gemm_ffma_fp32";
    }
}

} // namespace

extern "C" moe_status moe_cuda_grouped_gemm(const moe_grouped_gemm_args *a,
                                            const moe_kernel_config *cfg,
                                            const moe_kernel_tuning *tuning, cudaStream_t stream,
                                            moe_kernel_report *report, moe_error *err)
{
    const char *fn = "moe_cuda_grouped_gemm";
    if (!a) return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: args is NULL", fn);
    if (a->dtype != MOE_DTYPE_BF16 && a->dtype != MOE_DTYPE_F16 && a->dtype != MOE_DTYPE_F32)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "%s: dtype %s not supported (bf16, fp16, fp32)",
                        fn, moe_dtype_name(a->dtype) ? moe_dtype_name(a->dtype) : "?");
    if (a->permute_x && a->permute_y)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: permute_x and permute_y are both set; permute_x (gather A rows from "
                        "token order) is for GEMM1 and permute_y (scatter C rows to flat order) "
                        "for GEMM2, never both on one GEMM", fn);
    if (a->num_experts < 1 || a->N < 1 || a->K < 1 || a->max_rows < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: need num_experts >= 1, N >= 1, K >= 1, max_rows >= 0 (got E=%d N=%d "
                        "K=%d max_rows=%d)", fn, a->num_experts, a->N, a->K, a->max_rows);
    if ((long long)a->num_experts * a->N * a->K > ((long long)1 << 40) ||
        (long long)a->max_rows * MOE_MAX(a->N, a->K) > ((long long)1 << 40))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: problem too large (E=%d N=%d K=%d rows=%d)",
                        fn, a->num_experts, a->N, a->K, a->max_rows);
    if (a->epilogue != MOE_EPI_NONE && a->epilogue != MOE_EPI_SILU_MUL)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: unknown epilogue %d", fn, (int)a->epilogue);
    const bool silu = a->epilogue == MOE_EPI_SILU_MUL;
    if (silu && a->N % 2)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: MOE_EPI_SILU_MUL needs an even N (= 2I, [gate | up]); got N=%d", fn, a->N);
    if (silu && a->scale_c_rows)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: scale_c_rows with MOE_EPI_SILU_MUL is not defined (the top-k weight "
                        "belongs to GEMM2's epilogue)", fn);
    if (!silu && a->C_preact)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: C_preact is only written with MOE_EPI_SILU_MUL", fn);
    const bool need_gather = a->permute_x || a->permute_y || a->scale_a_rows || a->scale_c_rows;
    if (need_gather && !a->gather_idx)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: gather_idx is NULL but permute_x/permute_y/scale rows need it", fn);
    if (need_gather && a->topk < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "%s: topk must be >= 1 (got %d)", fn, a->topk);
    if (a->max_rows > 0 && (!a->expert_offsets || !a->A || !a->B || !a->C))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: expert_offsets, A, B and C must be device pointers (one is NULL)", fn);

    char buf[64];
    if (!cfg)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: no configuration: pass a resolved one (moe_kernel_config_resolve, or "
                        "moe_grouped_gemm_launch to resolve and launch)", fn);
    if (!moe_kernel_config_is_compiled(cfg, a->dtype))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "%s: configuration %s is not a compiled %s configuration; resolve requests "
                        "with moe_kernel_config_resolve", fn, config_brief(*cfg, buf, sizeof buf),
                        moe_dtype_name(a->dtype));
    moe_kernel_config c = *cfg;
    const moe_kernel_tuning no_tuning = {};
    const moe_kernel_tuning &t = tuning ? *tuning : no_tuning;
    const int avg_rows = a->max_rows / a->num_experts;

    const size_t es = moe_dtype_size(a->dtype);
    /* The 16-byte cp.async path needs every A and B row (and, with SiLU on B [K,N], every
     * 8-column half-chunk) to start on a 16-byte boundary. */
    bool aligned = a->dtype != MOE_DTYPE_F32 && aligned16(a->A) && aligned16(a->B) &&
                   (a->K * es) % 16 == 0 && (!a->b_kn || (a->N * es) % 16 == 0) &&
                   (!(silu && a->b_kn) || ((a->N / 2) * es) % 16 == 0);

    GGParams p;
    fill_gemm_params(p, a, es);
    p.B = a->B;

    /* A ",tma" configuration runs the wgmma kernel where it can, else the mma.sync default. */
    const bool wg = c.use_tma && moe_gg_wgmma_applicable(a, &c);
    if (c.use_tma && !wg) c = moe_gg_default_mma_config(a->dtype, avg_rows);
    moe_kernel_config ran = aligned || a->dtype == MOE_DTYPE_F32 ? c : moe_gg_narrow_config();
    if (report) {
        report->kernel = wg ? moe_gg_wgmma_kernel_name(a->dtype)
                            : kernel_name(a->dtype, aligned || a->dtype == MOE_DTYPE_F32);
        report->config = ran;
        if (wg && a->b_kn) report->config.cluster = 0; /* b_kn runs the one-CTA kernel */
        report->used_tma = wg ? 1 : 0;
        report->config.epilogue = MOE_GG_EPILOGUE_AUTO; /* set below to what ran */
        report->config.a_load = MOE_GG_A_AUTO;
        report->staged_epilogue = 0;
        report->a_tma = 0;
        report->sched_dynamic = 0;
        report->fast_rounding = 0; /* mma.sync / FFMA: HF's rounding points */
    }
    if (a->max_rows == 0) return MOE_OK; /* no rows can exist: nothing to compute or store */

    if (wg) {
        moe_gg_wgmma_ran r = {0, 0, 0, 0};
        cudaError_t we = moe_gg_wgmma_launch(a, &c, t, stream, &r);
        if (we != cudaSuccess)
            return moe_fail(err, MOE_ERR_CUDA, "%s: launch of %s (%s) failed: %s", fn,
                            moe_gg_wgmma_kernel_name(a->dtype),
                            config_brief(c, buf, sizeof buf), cudaGetErrorString(we));
        if (report) { /* the paths that ran, whatever the configuration asked for */
            report->staged_epilogue = r.staged_epilogue;
            report->a_tma = r.a_tma;
            report->sched_dynamic = r.sched_dynamic;
            report->fast_rounding = r.fast_rounding;
            report->config.epilogue = r.staged_epilogue ? MOE_GG_EPILOGUE_STAGED : MOE_GG_EPILOGUE_DIRECT;
            report->config.a_load = r.a_tma ? MOE_GG_A_TMA : MOE_GG_A_CPASYNC;
        }
        return MOE_OK;
    }

    cudaError_t e = cudaSuccess;
    bool found = false;
    switch (a->dtype) {
    case MOE_DTYPE_BF16:
        e = a->b_kn ? dispatch_mma<__nv_bfloat16, true>(p, c, aligned, stream, &found)
                    : dispatch_mma<__nv_bfloat16, false>(p, c, aligned, stream, &found);
        break;
    case MOE_DTYPE_F16:
        e = a->b_kn ? dispatch_mma<__half, true>(p, c, aligned, stream, &found)
                    : dispatch_mma<__half, false>(p, c, aligned, stream, &found);
        break;
    default:
        e = a->b_kn ? dispatch_ffma<true>(p, c, stream, &found)
                    : dispatch_ffma<false>(p, c, stream, &found);
        break;
    }
    if (!found)
        return moe_fail(err, MOE_ERR_INTERNAL, "%s: config %s is listed but not instantiated", fn,
                        config_brief(c, buf, sizeof buf));
    if (e != cudaSuccess)
        return moe_fail(err, MOE_ERR_CUDA, "%s: launch of %s (%s) failed: %s", fn,
                        kernel_name(a->dtype, aligned || a->dtype == MOE_DTYPE_F32),
                        config_brief(ran, buf, sizeof buf), cudaGetErrorString(e));
    return MOE_OK;
}
