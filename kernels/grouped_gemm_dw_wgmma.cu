/*
 * grouped_gemm_dw_wgmma.cu — the Hopper (sm_90a) weight gradient of a grouped GEMM with warpgroup
 * MMA (wgmma): for every expert e,
 *   dW_e [N, K] = sum over rows r of expert e of  dY_r^T (N)  x  X_r (K)
 * with the semantics of grouped_gemm_dw.cu (moe_stages.h, moe_grouped_gemm_dw_args): permute_dy /
 * permute_x read token-order row gather_idx[r] / topk, scale_dy_rows / scale_x_rows multiply the
 * row by scale[gather_idx[r]] and round it to the dtype before the MMA, fp32 accumulation, an
 * expert with no rows gets exact zeros. grouped_gemm_dw.cu's launcher calls it for a ",tma"
 * configuration where moe_gg_dw_wgmma_applicable says yes.
 *
 * The reduction runs over the routed rows, so both operands arrive row-major with the MMA's k
 * (the row) as their slow dimension: a stage holds 64 rows of dY's 128 columns of this tile (the
 * MMA's M, two 64-column boxes) and of X's 256 columns (its N, four boxes), each box 64 rows x
 * 128 bytes with the 128-byte swizzle, and wgmma reads both transposed (M-major A, N-major B:
 * the descriptors of wgmma_ptx.cuh). The rows are gathered with cp.async (16-byte chunks) by the
 * producer warpgroup; the two consumer warpgroups own 64 of the 128 dW rows each (128 fp32
 * accumulators per thread, one m64n256k16 per 16 rows).
 * Row scales: the producer puts each stage's 64 scales into shared memory (plain stores, then a
 * plain arrival that releases them: the full barrier then counts 2 x 128 arrivals); after the
 * full wait each consumer warpgroup multiplies and rounds its own dY box (scale_dy) or its half
 * of the X boxes, which both warpgroups read (scale_x: a 256-thread barrier after the pass), and
 * fences the async proxy before its wgmma.
 * Tiles: (expert, 128-row block of dW_e, 256-column block), expert-major, the column blocks
 * innermost (they share the expert's dY rows in L2); CTA b takes tiles b, b + grid, ... ; each
 * tile loops over all the expert's rows, so every output is summed in one fixed order by one
 * thread: deterministic, no atomics. A tile of an expert without rows stores zeros.
 */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "common.h"
#include "moe_stages.h"
}
#include "gemm_common.cuh"
#include "grouped_gemm_dw_wgmma.h"
#include "wgmma_ptx.cuh"

using namespace moe_gg;
using namespace moe_wgp;

namespace {

constexpr int DW_BM = 128;      /* dW rows (the MMA's M) per tile */
constexpr int DW_BN = 256;      /* dW columns (the MMA's N) per tile */
constexpr int DW_BK = 64;       /* routed rows per stage */
constexpr int DW_S = 4;         /* stages (3 with the staged epilogue: DW_S_STAGED) */
constexpr int DW_S_STAGED = 3;
constexpr int DW_THREADS = 384; /* producer warpgroup + two consumer warpgroups */
constexpr uint32_t DW_BOX = 64 * 128;               /* one box: 64 rows x 128 bytes */
constexpr uint32_t DW_A_BYTES = (DW_BM / 64) * DW_BOX; /* 16 KB */
constexpr uint32_t DW_B_BYTES = (DW_BN / 64) * DW_BOX; /* 32 KB */
/* as the forward kernel: 128*56 + 256*224 = 64512 registers, one CTA per SM */
constexpr int DW_PRODUCER_REGS = 56;
constexpr int DW_CONSUMER_REGS = 224;

struct DwWgParams : DwParamsCommon {
    int n_tiles, k_tiles; /* 128-row and 256-column blocks of one dW_e */
#ifdef MOE_DIAGNOSTICS
    int skip_epilogue;    /* diagnostic (wrong results): no stores, timing only */
#endif
};

/* The staged epilogue's output tile: 128 dW rows of 256 outputs, each row 64 bytes longer (the
 * two rows of a quarter-warp's 16-byte stores in different halves of the bank line). */
constexpr int DW_OUT_PITCH = DW_BN * 2 + 64;
constexpr size_t DW_OUT_BYTES = (size_t)DW_BM * DW_OUT_PITCH;

/* 1024 bytes of alignment slack, the s stages, the staged epilogue's output tile, 2*s
 * mbarriers, the stage row scales (dY then X, s x 64 floats each: scaled only); the clamped
 * offsets follow ((E+1) ints, added by the host). */
constexpr size_t dw_smem_bytes(bool scaled, int s, bool staged)
{
    return 1024 + (size_t)s * (DW_A_BYTES + DW_B_BYTES) + (staged ? DW_OUT_BYTES : 0) + (size_t)2 * s * 8 +
           (scaled ? (size_t)2 * s * DW_BK * 4 : 0);
}

#ifdef MOE_WG_DEVICE

/* Tile t (expert-major, then the dW row block, the column blocks innermost): its expert, first
 * dW row and column, and the expert's routed rows [lo, hi) (clamped offsets in shared memory). */
struct DwTile {
    int e, n0, k0, lo, hi;
};
__device__ __forceinline__ DwTile dw_tile(const DwWgParams &p, const int *s_off, int t)
{
    DwTile tl;
    tl.e = t / (p.n_tiles * p.k_tiles);
    const int rem = t - tl.e * p.n_tiles * p.k_tiles;
    tl.n0 = (rem / p.k_tiles) * DW_BM;
    tl.k0 = (rem % p.k_tiles) * DW_BN;
    tl.lo = s_off[tl.e];
    tl.hi = max(s_off[tl.e + 1], tl.lo);
    return tl;
}

/* The producer's copies of one operand row into NB boxes of a stage: 16 bytes at columns
 * col0 + 64 b (b < NB) of source row `row` (of `ld` elements) to dst + b boxes; zeros where the
 * row is -1 or the column is past ld. */
template <typename T, int NB>
__device__ __forceinline__ void dw_copy_boxes(uint32_t dst, const T *src, int row, int ld, int col0)
{
#pragma unroll
    for (int b = 0; b < NB; b++) {
        const int c = col0 + 64 * b;
        const bool v = row >= 0 && c < ld;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + b * DW_BOX),
                     "l"(v ? src + (int64_t)row * ld + c : src), "r"(v ? 16 : 0)
                     : "memory");
    }
}

template <typename T, bool SDY, bool SX, int S, bool STAGED>
__global__ void __launch_bounds__(DW_THREADS, 1) moe_gg_dw_wgmma_kernel(const DwWgParams p)
{
    constexpr bool SCALED = SDY || SX;
    extern __shared__ __align__(1024) unsigned char dw_smem[];
    const uint32_t raw = smem_u32(dw_smem);
    const uint32_t base = (raw + 1023u) & ~1023u;
    const uint32_t sA = base, sB = base + S * DW_A_BYTES;
    const uint32_t sOut = sB + S * DW_B_BYTES; /* STAGED: the output tile */
    const uint32_t bars = sOut + (STAGED ? (uint32_t)DW_OUT_BYTES : 0u);
    unsigned char *gbase = dw_smem + (base - raw);
    float *s_scale = reinterpret_cast<float *>(dw_smem + (bars - raw) + 16 * S); /* [2][S][64] */
    int *s_off = reinterpret_cast<int *>(dw_smem + (bars - raw) + 16 * S +
                                         (SCALED ? 2 * S * DW_BK * 4 : 0));
    auto full = [&](uint32_t s) { return bars + 8 * s; };
    auto empty = [&](uint32_t s) { return bars + 8 * (S + s); };

    for (int i = threadIdx.x; i <= p.E; i += DW_THREADS) s_off[i] = min(max(p.offsets[i], 0), p.max_rows);
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; s++) {
            /* 128 cp.async arrivals (+ 128 plain ones releasing the scales) */
            mbar_init(full(s), SCALED ? 256 : 128);
            mbar_init(empty(s), 8); /* the 8 consumer warps */
        }
        fence_barrier_init();
    }
    __syncthreads();

    const int tiles = p.E * p.n_tiles * p.k_tiles;
    if (threadIdx.x < 128) {
        /* ================= producer warpgroup ================= */
        setmaxnreg_dec<DW_PRODUCER_REGS>();
        const int pt = threadIdx.x;
        const int chunk = pt & 7, rsub = pt >> 3; /* rows rsub + 16 i of a stage, chunk `chunk` */
        const T *dY = static_cast<const T *>(p.dY);
        const T *X = static_cast<const T *>(p.X);
        uint32_t it = 0;
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            const DwTile tl = dw_tile(p, s_off, t);
            const int n0 = tl.n0, k0 = tl.k0, lo = tl.lo, hi = tl.hi;
            /* The gather indices of a stage's 4 rows are loaded one stage ahead (gnext), so the
             * L2 latency of those loads overlaps the previous stage's copies instead of
             * stalling each stage (the cp.async asm statements are compiler barriers: loads
             * written between them are issued in order). -1: no row. */
            int gnext[DW_BK / 16];
            auto load_rows = [&](int r0, int (&gv)[DW_BK / 16]) {
#pragma unroll
                for (int i = 0; i < DW_BK / 16; i++) {
                    const int r = r0 + rsub + 16 * i;
                    gv[i] = r < hi ? (p.gather ? p.gather[r] : r) : -1;
                }
            };
            if (lo < hi) load_rows(lo, gnext);
            for (int r0 = lo; r0 < hi; r0 += DW_BK, it++) {
                int ry[DW_BK / 16], rx[DW_BK / 16], gcur[DW_BK / 16];
#pragma unroll
                for (int i = 0; i < DW_BK / 16; i++) {
                    const int r = r0 + rsub + 16 * i, g = gnext[i];
                    gcur[i] = g;
                    ry[i] = rx[i] = -1;
                    if (r < hi && g >= 0 && g < p.max_rows) {
                        ry[i] = p.permute_dy ? g / p.topk : r;
                        rx[i] = p.permute_x ? g / p.topk : r;
                    }
                }
                if (r0 + DW_BK < hi) load_rows(r0 + DW_BK, gnext);
                float sc[DW_BK / 16];
                if (SCALED && chunk == 0) {
#pragma unroll
                    for (int i = 0; i < DW_BK / 16; i++) {
                        const int ok = SDY ? ry[i] >= 0 : rx[i] >= 0;
                        sc[i] = ok ? load_f(static_cast<const T *>(SDY ? p.scale_dy : p.scale_x) + gcur[i]) : 1.f;
                    }
                }
                const uint32_t s = it % S;
                if (it >= S) mbar_wait(empty(s), ((it / S) + 1) & 1);
#pragma unroll
                for (int i = 0; i < DW_BK / 16; i++) {
                    const int rl = rsub + 16 * i;
                    const uint32_t swz = (uint32_t)(rl * 128 + ((chunk ^ (rl & 7)) << 4));
                    dw_copy_boxes<T, DW_BM / 64>(sA + s * DW_A_BYTES + swz, dY, ry[i], p.N, n0 + 8 * chunk);
                    dw_copy_boxes<T, DW_BN / 64>(sB + s * DW_B_BYTES + swz, X, rx[i], p.K, k0 + 8 * chunk);
                }
                if (SCALED && chunk == 0) {
                    /* one operand is scaled (SDY or SX, not both): its slot, the other stays unused */
#pragma unroll
                    for (int i = 0; i < DW_BK / 16; i++)
                        s_scale[((SDY ? 0 : S) + s) * DW_BK + rsub + 16 * i] = sc[i];
                }
                cp_async_mbar_arrive(full(s));
                if (SCALED) mbar_arrive(full(s)); /* releases this thread's scale stores */
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
        /* ================= consumer warpgroups ================= */
        setmaxnreg_inc<DW_CONSUMER_REGS>();
        const int cw = threadIdx.x / 128 - 1; /* dW rows 64 cw .. 64 cw + 63 of the tile */
        const int tw = threadIdx.x & 127, warp = tw >> 5, lane = tw & 31, q = lane & 3;
        T *dW = static_cast<T *>(p.dW);
        float acc[DW_BN / 2];
        uint32_t it = 0;
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            const DwTile tl = dw_tile(p, s_off, t);
            const int e = tl.e, n0 = tl.n0, k0 = tl.k0, lo = tl.lo, hi = tl.hi;
#pragma unroll
            for (int i = 0; i < DW_BN / 2; i++) acc[i] = 0.f; /* an expert without rows: zeros */
            for (int r0 = lo; r0 < hi; r0 += DW_BK, it++) {
                const uint32_t s = it % S;
                mbar_wait(full(s), (it / S) & 1);
                if (SDY) {
                    /* this warpgroup's dY box: rows tw/8 + 16 i, chunk tw%8 */
#pragma unroll
                    for (int i = 0; i < DW_BK / 16; i++) {
                        const int rl = (tw >> 3) + 16 * i;
                        scale8_inplace<T>(gbase + s * DW_A_BYTES + cw * DW_BOX + rl * 128 +
                                              (((tw & 7) ^ (rl & 7)) << 4),
                                          s_scale[s * DW_BK + rl]);
                    }
                }
                if (SX) {
                    /* this warpgroup's half of the X boxes (2 of 4), rows tw/8 + 16 i */
#pragma unroll
                    for (int b = 0; b < 2; b++)
#pragma unroll
                        for (int i = 0; i < DW_BK / 16; i++) {
                            const int rl = (tw >> 3) + 16 * i;
                            scale8_inplace<T>(gbase + (sB - sA) + s * DW_B_BYTES +
                                                  (2 * cw + b) * DW_BOX + rl * 128 +
                                                  (((tw & 7) ^ (rl & 7)) << 4),
                                              s_scale[(S + s) * DW_BK + rl]);
                        }
                }
                if (SCALED) {
                    fence_proxy_async(); /* the generic-proxy writes, visible to the tensor cores */
                    if (SX)
                        asm volatile("bar.sync 3, 256;\n" ::: "memory"); /* both halves of X */
                    else
                        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cw) : "memory");
                }
                const uint64_t da = sw128_desc_mn(sA + s * DW_A_BYTES + cw * DW_BOX);
                const uint64_t db = sw128_desc_mn(sB + s * DW_B_BYTES);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < DW_BK / 16; kk++) /* 16 rows = 2048 bytes: +128 (>>4) */
                    Wgmma<T, DW_BN, 1, 1>::run(acc, da + 128 * kk, db + 128 * kk,
                                              (r0 > lo || kk > 0) ? 1 : 0);
                wgmma_commit();
                wgmma_wait<1>();
                if (r0 > lo && lane == 0) mbar_arrive(empty((it - 1) % S));
            }
            /* Unconditional (nothing is in flight after an expert with no rows): behind an
             * `if (hi > lo)`, ptxas saw a path from the wgmma-defined accumulators to the
             * stores without a wait, injected one and serialized every wgmma of the kernel
             * (ptxas info C7517 / C7512, in every dW instantiation up to round 4). */
            wgmma_wait<0>();
            fence_regs(acc);
            if (hi > lo && lane == 0) mbar_arrive(empty((it - 1) % S));
#ifdef MOE_DIAGNOSTICS
            if (p.skip_epilogue) continue;
#endif
            if (STAGED) {
                /* through the warp's 16 rows of the output tile (64 cw + 16 warp ..) and one
                 * bulk copy per dW row, while the next tile's MMAs run (wgmma_ptx.cuh) */
                const uint32_t wrows = (uint32_t)((64 * cw + 16 * warp) * DW_OUT_PITCH);
                unsigned char *rows = gbase + (sOut - base) + wrows;
                staged_rows_begin(lane);
#pragma unroll
                for (int h = 0; h < 2; h++)
#pragma unroll
                    for (int g = 0; g < DW_BN / 32; g++) {
                        uint32_t w[4];
                        pack_acc_group<T, DW_BN / 2>(acc, g, h, 1.f, w);
                        staged_rows_put(rows, DW_OUT_PITCH, lane, h, g, w);
                    }
                const int n = n0 + 64 * cw + 16 * warp + (lane & 15); /* lane l < 16: row l */
                const int cols = min(DW_BN, p.K - k0);
                staged_rows_flush(lane, n < p.N ? dW + ((int64_t)e * p.N + n) * p.K + k0 : nullptr,
                                  sOut + wrows, DW_OUT_PITCH, (uint32_t)cols * 2);
            } else {
            /* acc[4i + 2h + c]: dW row n0 + 64 cw + 16 warp + lane/4 + 8h, column k0 + 8i + 2q + c;
             * quad-transposed so each lane stores 8 consecutive columns (16 bytes) */
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int n = n0 + 64 * cw + 16 * warp + (lane >> 2) + 8 * h;
                T *row = dW + ((int64_t)e * p.N + (n < p.N ? n : 0)) * p.K;
#pragma unroll
                for (int g = 0; g < DW_BN / 32; g++) {
                    uint32_t w[4];
                    pack_acc_group<T, DW_BN / 2>(acc, g, h, 1.f, w);
                    quad_transpose(w, q);
                    const int k = k0 + 8 * (4 * g + q);
                    if (n < p.N && k < p.K)
                        *reinterpret_cast<uint4 *>(row + k) = make_uint4(w[0], w[1], w[2], w[3]);
                }
            }
            }
        }
        if (STAGED) staged_rows_end(lane); /* the tile outlives the copies reading it */
    }
}

#else /* not sm_90a: a stub the host recognises by its static shared memory (never launched) */

template <typename T, bool SDY, bool SX, int S, bool STAGED>
__global__ void __launch_bounds__(DW_THREADS, 1) moe_gg_dw_wgmma_kernel(const DwWgParams p)
{
    __shared__ int dw_stub_marker[32];
    if (threadIdx.x < 32) reinterpret_cast<volatile int *>(dw_stub_marker)[threadIdx.x] = p.E;
}

#endif /* MOE_WG_DEVICE */

/* ---- host side ---- */

template <typename T, bool SDY, bool SX, int S, bool STAGED>
cudaError_t launch_dw_wg(const DwWgParams &p, const DevInfo &d, int max_ctas, cudaStream_t s)
{
    auto kern = moe_gg_dw_wgmma_kernel<T, SDY, SX, S, STAGED>;
    const size_t smem = dw_smem_bytes(SDY || SX, S, STAGED) + (size_t)(p.E + 1) * 4;
    /* the cap: the device's whole opt-in, one value for every launch (see launch_wg) */
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, d.smem_optin);
    if (e != cudaSuccess) return e;
    const long long tiles = (long long)p.E * p.n_tiles * p.k_tiles;
    long long grid = tiles < d.sms ? tiles : d.sms;
    if (max_ctas > 0 && grid > max_ctas) grid = max_ctas; /* the tests' moe_kernel_tuning.max_ctas */
    kern<<<(unsigned)grid, DW_THREADS, smem, s>>>(p);
    return cudaGetLastError();
}

/* staged: the 3-stage kernel with the staged epilogue (the default where it fits), else the
 * 4-stage one storing from registers (",direct") */
template <typename T, bool SDY, bool SX>
cudaError_t launch_dw_wg_epi(const DwWgParams &p, const DevInfo &d, bool staged, int max_ctas, cudaStream_t s)
{
    return staged ? launch_dw_wg<T, SDY, SX, DW_S_STAGED, true>(p, d, max_ctas, s)
                  : launch_dw_wg<T, SDY, SX, DW_S, false>(p, d, max_ctas, s);
}

template <typename T>
cudaError_t dispatch_dw_wg(const DwWgParams &p, bool sdy, bool sx, const DevInfo &d, bool staged,
                           int max_ctas, cudaStream_t s)
{
    if (sdy) return launch_dw_wg_epi<T, true, false>(p, d, staged, max_ctas, s);
    if (sx) return launch_dw_wg_epi<T, false, true>(p, d, staged, max_ctas, s);
    return launch_dw_wg_epi<T, false, false>(p, d, staged, max_ctas, s);
}

template <typename T, bool SDY, bool SX>
bool dw_built()
{
    return sm90a_kernel_built<moe_gg_dw_wgmma_kernel<T, SDY, SX, DW_S, false>>() &&
           sm90a_kernel_built<moe_gg_dw_wgmma_kernel<T, SDY, SX, DW_S_STAGED, true>>();
}

template <typename T>
bool dw_real_for(bool sdy, bool sx)
{
    if (sdy) return dw_built<T, true, false>();
    if (sx) return dw_built<T, false, true>();
    return dw_built<T, false, false>();
}

} // namespace

bool moe_gg_dw_wgmma_applicable(const moe_grouped_gemm_dw_args *a)
{
    if (!a || (a->dtype != MOE_DTYPE_BF16 && a->dtype != MOE_DTYPE_F16)) return false;
    if (a->scale_dy_rows && a->scale_x_rows) return false; /* not instantiated: mma.sync */
    const size_t es = 2;
    /* 16-byte cp.async chunks of dY and X rows, 16-byte stores of dW rows */
    if (!aligned16(a->dY) || !aligned16(a->X) || !aligned16(a->dW)) return false;
    if ((a->N * es) % 16 != 0 || (a->K * es) % 16 != 0) return false;
    DevInfo d;
    if (!dev_info(&d) || !d.hopper) return false;
    const bool scaled = a->scale_dy_rows || a->scale_x_rows;
    const size_t need = dw_smem_bytes(scaled, DW_S, false) + (size_t)(a->num_experts + 1) * 4;
    if (need > (size_t)d.smem_optin) return false;
    const bool sdy = a->scale_dy_rows != nullptr, sx = a->scale_x_rows != nullptr;
    return a->dtype == MOE_DTYPE_BF16 ? dw_real_for<__nv_bfloat16>(sdy, sx) : dw_real_for<__half>(sdy, sx);
}

const char *moe_gg_dw_wgmma_kernel_name(moe_dtype dt)
{
    return dt == MOE_DTYPE_F16 ? "grouped_gemm_dw_wgmma_fp16" : "grouped_gemm_dw_wgmma_bf16";
}

cudaError_t moe_gg_dw_wgmma_launch(const moe_grouped_gemm_dw_args *a, int epilogue,
                                   const moe_kernel_tuning &t, cudaStream_t stream,
                                   int *staged_epilogue)
{
    DevInfo d;
    if (!dev_info(&d)) return cudaErrorInvalidDevice;
    DwWgParams p;
    fill_dw_params(p, a);
    p.n_tiles = (a->N + DW_BM - 1) / DW_BM;
    p.k_tiles = (a->K + DW_BN - 1) / DW_BN;
#ifdef MOE_DIAGNOSTICS
    p.skip_epilogue = t.diag_skip_epilogue;
#endif
    const bool sdy = a->scale_dy_rows != nullptr, sx = a->scale_x_rows != nullptr;
    /* the staged epilogue by default (auto), measured 20-24% faster than the 4-stage kernel
     * storing from registers on an H200 (docs/KERNELS.md, round 6); ",direct" for that one */
    const bool staged = epilogue != MOE_GG_EPILOGUE_DIRECT &&
                        dw_smem_bytes(sdy || sx, DW_S_STAGED, true) + (size_t)(a->num_experts + 1) * 4 <=
                            (size_t)d.smem_optin;
    if (staged_epilogue) *staged_epilogue = staged;
    return a->dtype == MOE_DTYPE_BF16 ? dispatch_dw_wg<__nv_bfloat16>(p, sdy, sx, d, staged, t.max_ctas, stream)
                                      : dispatch_dw_wg<__half>(p, sdy, sx, d, staged, t.max_ctas, stream);
}
