/*
 * grouped_gemm_wgmma.cu — the Hopper (sm_90a) forward grouped GEMM: warpgroup MMA (wgmma) with
 * the weights brought in by the tensor-memory accelerator (TMA) and the activation rows gathered
 * by cp.async, both into 128-byte-swizzled shared memory. Same semantics as the mma.sync kernel
 * of grouped_gemm.cu (moe_stages.h, moe_grouped_gemm_args) for B_e [N, K] and (b_kn, the
 * backward dX GEMMs) B_e [K, N], the latter loaded N-major and multiplied with wgmma's B transpose: the
 * permute_x row gather, permute_y scatter, scale_a_rows (multiply + round before the MMA),
 * scale_c_rows (fp32 multiply before rounding) and the SiLU-and-mul epilogue with C_preact.
 * grouped_gemm.cu's launcher calls moe_gg_wgmma_run() when the configuration asks for it
 * (",tma") and the problem allows it; everything else stays on the mma.sync kernels.
 *
 * Layout of one CTA (384 threads, one CTA per SM, persistent):
 *   warpgroup 0 = producer: thread 0 issues the TMA loads of the B tile (one box of BN rows, or
 *     with SiLU two boxes of BN/2 rows: gate rows j0.. and up rows I+j0..), all 128 threads
 *     gather the 128 A rows (8 x 16-byte cp.async each per stage) into the same swizzle;
 *   warpgroups 1, 2 = consumers: each owns 64 rows of the 128-row tile and issues
 *     wgmma.m64nBNk16 (4 per 64-wide k step) on the shared tiles, fp32 accumulators in registers
 *     (BN/2 per thread), then writes its rows straight from the accumulators: the 4 lanes that
 *     share a row swap their packed pairs (quad transpose, 4 shuffles per 4 words) so each
 *     writes 8 consecutive outputs with one 16-byte store (4-byte pairs where rows are not
 *     16-byte aligned). Where the output tile fits beside the stages (wg_out_pitch: e.g.
 *     128x256 with 3 stages), they stage those rows in shared memory instead and hand them to
 *     bulk copies, so they return to the MMAs without waiting on global stores
 *     (wg_epilogue_staged). The kernel also takes BM = 256 (128 rows per consumer warpgroup,
 *     two m64 wgmmas per k16), not in the compiled list: measured slower (docs/KERNELS.md).
 *   (",atma" and no permute_x: A comes by TMA too, one box of 64 x BM per stage,
 *   and producer warp 0 alone runs; the full barriers then count its one byte-count arrival.)
 * Pipeline: S stages, each [A 128x64 | B BNx64] bf16/fp16, 128 bytes per row, 16-byte chunks
 * swizzled (chunk ^ row%8), the layout wgmma's 128B-swizzle K-major descriptors describe.
 * full[s] mbarrier: 1 arrival with the TMA byte count + 128 producer arrivals that fire when
 * each thread's cp.async copies landed (cp.async.mbarrier.arrive.noinc); empty[s]: the 8
 * consumer warps once their wgmma on the stage completed. scale_a_rows: each consumer warpgroup
 * multiplies and rounds its own 64 A rows in shared memory after the full wait (proxy fence +
 * a 128-thread named barrier before its wgmma), overlapping the previous stage's MMAs.
 * No async-proxy fence between the cp.async writes and wgmma otherwise (as CUTLASS's cp.async
 * GMMA mainloops; moe_kernel_tuning.proxy_fence adds one: measured no difference).
 * Tiles: expert-major, then column tile, then row tile (so the 2-3 row tiles of one expert that
 * share a weight tile run side by side, and one expert's A rows stay hot in L2 across its column
 * tiles). CTA b takes tile b first; after that its producer takes the next tile from a counter
 * in device memory the caller passes (moe_kernel_tuning.sched_counters; dynamic scheduling:
 * tiles start in index order, so the row tiles that share a weight tile start within ~a
 * microsecond of each other and read it from L2 once; with the static order b, b + grid, ...,
 * which runs where the caller passes no counters, they drift apart over the waves and each
 * re-reads it from DRAM, docs/KERNELS.md round 4). The producer posts each tile's index with its first
 * stage (s_tile[stage]) and a -1 after the last; the consumers read it there. Warps find their
 * tile's expert themselves from the offsets (copied to shared memory once).
 */
#include <cuda.h> /* CUtensorMap and the driver enums only: the encoder comes from
                     cudaGetDriverEntryPointByVersion, never from linking -lcuda */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mutex>

extern "C" {
#include "common.h"
#include "moe_stages.h"
}
#include "gemm_common.cuh"
#include "grouped_gemm_configs.h"
#include "grouped_gemm_wgmma.h"
#include "moe_kernels.h"
#include "wgmma_ptx.cuh"

using namespace moe_gg;
using namespace moe_wgp;

namespace {

constexpr int WG_BK = 64;        /* k per stage: one 128-byte swizzle row of 16-bit elements */
constexpr int WG_THREADS = 384;  /* producer warpgroup + two consumer warpgroups */
/* Register split (setmaxnreg): 128*56 + 256*224 = 64512 = 384 * 168, the launch cap of one
 * CTA per SM. (Two CTAs per SM would cap registers at 80 at entry, and ptxas needs 90 for a
 * wgmma with 64 accumulators: not possible with 384 threads.) */
constexpr int WG_PRODUCER_REGS = 56;
constexpr int WG_CONSUMER_REGS = 224;

struct WgParams {
    const int32_t *offsets;
    const int32_t *gather; /* NULL when no permutation or row scale needs it */
    const void *A;
    void *C;
    void *C_preact;
    const void *scale_a;
    const void *scale_c;
    int E, N, K, max_rows, topk;
    int permute_x, permute_y, silu;
    int n_out;     /* columns of C: N, or N/2 with SiLU-and-mul */
    int c_pair;    /* C rows allow 2-element stores */
    int p_pair;    /* C_preact rows allow 2-element stores */
    int col_tiles; /* column tiles per expert */
    int proxy_fence;   /* consumers fence the async proxy after every full-barrier wait */
#ifdef MOE_DIAGNOSTICS
    int skip_epilogue; /* diagnostic (wrong results): no stores, timing only */
    int no_gather;     /* diagnostic (wrong results): A row r/topk, timing only */
#endif
    int c_vec;         /* C rows allow 16-byte stores (base 16-byte aligned, n_out % 8 == 0) */
    int p_vec;         /* C_preact likewise (its rows 2 n_out, the up half at + n_out) */
    int narrow_stores; /* timing knob (moe_kernel_tuning.narrow_stores): the 4-byte pair epilogue */
    int exact_silu;    /* exact_hf_rounding: IEEE expf and division in SiLU */
    int scale_a_acc;   /* scale_a_rows on the fp32 accumulators (0: the SCALE_A shared-memory pass,
                          exact_hf_rounding) */
    int l2_hints;      /* B loads' L2 policy: 0 none, 1 evict_last / last row tile evict_first,
                          2 only the last row tile's evict_first (from moe_kernel_tuning.l2_hints) */
    int prefetch;      /* B tiles prefetched into L2 this many k steps ahead (0: none) */
    int dyn_sched;     /* tiles from the caller's counters (0: the static order) */
    int a_tma;         /* A rows by TMA (tmap_a), not the cp.async gather: no permute_x, no
                          clusters (",atma", or no option: the default; moe_gg_wgmma_launch) */
    int out_pitch;     /* > 0: the staged epilogue, through a shared output tile of 128 rows of
                          this many bytes and bulk copies (wg_out_pitch); 0: from registers */
    int *sched;        /* the caller's counter pair (moe_kernel_tuning.sched_counters; dyn_sched):
                          {next tile - grid, CTAs finished}. The last CTA of a launch to finish
                          puts both back to zero, so the next launch that uses the pair (stream
                          order, or a CUDA-graph replay) starts clean without a memset. Two
                          launches that may run at the same time must never share a pair (each
                          would skip the tiles the other took, and unequal grids could leave it
                          dirty for later launches): the caller's rule (moe_kernels.h). */
};

/* ---- tile search, one warp at a time ----
 * Unit t (expert-major): expert e owns ru_e * col_tiles consecutive units, ru_e =
 * ceil(rt_e / CL) with rt_e = ceil(rows_e / BM) row tiles; inside, unit (col, rowu) is at
 * col * ru_e + rowu, and CTA `rank` of the cluster takes row tile CL * rowu + rank (with CL = 1:
 * the unit is the tile). A row tile past the expert's rows comes back with row_end <= row0 (no
 * rows: the CTA still takes part in the pair's weight loads). The warp scans the clamped
 * offsets in shared memory 32 experts per round (shuffle prefix sum, ballot for the owner).
 * Returns false (warp-uniformly) when t is past the last unit. */
struct WgTile {
    int expert, row0, row_end, col;
    bool last; /* the expert's last row tile (unit) of this column: no later reader of its B */
};

template <int BM, int CL>
__device__ __forceinline__ bool wg_find_tile(const int *s_off, int E, int col_tiles, int t,
                                             int rank, WgTile *out)
{
    const int lane = threadIdx.x & 31;
    int carry = 0;
    for (int base = 0; base < E; base += 32) {
        const int e = base + lane;
        int lo = 0, hi = 0, rt = 0;
        if (e < E) {
            lo = s_off[e];
            hi = max(s_off[e + 1], lo);
            rt = (hi - lo + BM - 1) / BM;
            rt = (rt + CL - 1) / CL; /* row units */
        }
        const int cnt = rt * col_tiles;
        int incl = cnt;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, d);
            if (lane >= d) incl += y;
        }
        incl += carry;
        const int excl = incl - cnt;
        const unsigned hit = __ballot_sync(0xffffffffu, cnt > 0 && t >= excl && t < incl);
        if (hit) {
            const int src = __ffs(hit) - 1;
            const int he = __shfl_sync(0xffffffffu, e, src);
            const int hlo = __shfl_sync(0xffffffffu, lo, src);
            const int hhi = __shfl_sync(0xffffffffu, hi, src);
            const int hrt = __shfl_sync(0xffffffffu, rt, src);
            const int local = t - __shfl_sync(0xffffffffu, excl, src);
            out->expert = he;
            out->col = local / hrt;
            out->row0 = hlo + ((local % hrt) * CL + rank) * BM;
            out->row_end = min(out->row0 + BM, hhi);
            out->last = local % hrt == hrt - 1;
            return true;
        }
        carry = __shfl_sync(0xffffffffu, incl, 31);
    }
    return false;
}

template <typename T>
__device__ __forceinline__ void wg_store2(T *row, int col, int ncols, bool pair, float v0, float v1)
{
    if (pair && col + 1 < ncols) {
        *reinterpret_cast<typename Elem<T>::T2 *>(row + col) = Elem<T>::from_f2(make_float2(v0, v1));
    } else {
        if (col < ncols) row[col] = Elem<T>::from_f(v0);
        if (col + 1 < ncols) row[col + 1] = Elem<T>::from_f(v1);
    }
}

/* BM = 256: the producer keeps its 16 gathered row indices per tile in shared memory (its own
 * 16 words, thread-major) instead of registers: at 56 registers, 16 more live values spilled. */
constexpr size_t wg_arow_smem_bytes(int bm)
{
    return bm > 128 ? (size_t)128 * (bm / 16) * 4 : 0;
}

/* The tile of each stage (s_tile[S][4]: row0 (-1: no more tiles), row_end, column, posted
 * by the producer with every stage) and the producer's two slots for the next tile's index (s_next[2]). */
constexpr size_t wg_sched_smem_bytes(int s)
{
    return (size_t)(4 * s + 2) * 4;
}

/* Shared memory of a configuration without its output tile: 1024 bytes of slack to align the
 * tiles to the 1024-byte swizzle period, the stages, the 2*S mbarriers, the stage posts and
 * (BM = 256) the producer's row indices. The clamped offsets, (E+1) ints, come on top (host).
 * Plain constexpr functions of runtime-typed arguments: the kernels' layout and the host's
 * "does it fit" check (moe_gg_wgmma_applicable) are the same arithmetic. */
constexpr size_t wg_core_smem(int bm, int bn, int s)
{
    return 1024 + (size_t)s * (bm + bn) * WG_BK * 2 + (size_t)2 * s * 8 + wg_sched_smem_bytes(s) +
           wg_arow_smem_bytes(bm);
}

#ifdef MOE_WG_DEVICE
/* SiLU packing, the epilogues and the B-tile loader */
#include "grouped_gemm_wgmma_epilogue.cuh"

template <int N> struct WgCount {
    static constexpr int value = N;
};

/* ---- the kernel ----
 * BM = 128: each consumer warpgroup owns 64 rows (one m64 wgmma per k16, BN/2 accumulators);
 * BM = 256: 128 rows each (two m64 wgmmas per k16 on the same B descriptor, 2 x BN/2
 * accumulators), so a weight tile is streamed once per 256 rows. A warpgroup skips the wgmmas
 * of its m64 blocks that hold no row of the tile (warpgroup-uniform): a short last row tile
 * costs its B stream, not the tensor time of 256 rows.
 * CL = 2: launched in clusters of two CTAs that take the two row tiles of one (expert, column,
 * row pair) unit and share its weight tile: each loads one half of every B stage (the gate or
 * the up box with SiLU, else one BN/2-row half) and multicasts it into both, so each weight byte
 * leaves L2 once per 2 row tiles instead of once per tile (the mainloop is bound by L2->SM
 * traffic: 48 KB per k step per CTA without, 32 KB with). */
template <typename T, int BM, int BN, int S, bool SCALE_A, int CL, bool BKN>
__global__ void __launch_bounds__(WG_THREADS, 1)
    moe_gg_wgmma_kernel(const WgParams p, const __grid_constant__ CUtensorMap tmap,
                        const __grid_constant__ CUtensorMap tmap_a)
{
    constexpr int MB = BM / 128;                  /* m64 blocks per consumer warpgroup */
    constexpr uint32_t A_BYTES = BM * WG_BK * 2; /* 16 / 32 KB: BM rows x 128 bytes */
    constexpr uint32_t B_BYTES = BN * WG_BK * 2;
    static_assert(BN == 128 || BN == 256, "wgmma N of 128 or 256");
    static_assert(BM == 128 || BM == 256, "128 or 256 rows per tile");
    static_assert(MB * BN / 2 <= 128, "at most 128 fp32 accumulators per consumer thread");
    static_assert(S >= 3, "at least three stages");
    static_assert(CL == 1 || CL == 2, "clusters of one or two CTAs");
    static_assert(!BKN || CL == 1, "b_kn: no clusters");
    /* A by TMA is compiled into the one-CTA kernels without the shared-memory scale_a pass (in
     * the others its producer loop made ptxas spill at 56 registers; the host never asks them) */
    constexpr bool A_TMA_PATH = CL == 1 && !SCALE_A;

    extern __shared__ __align__(1024) unsigned char wg_smem[];
    const uint32_t raw = smem_u32(wg_smem);
    const uint32_t base = (raw + 1023u) & ~1023u; /* swizzle period */
    const uint32_t sA = base, sB = base + S * A_BYTES;
    const uint32_t sOut = sB + S * B_BYTES; /* staged epilogue: the output tile, 128 rows */
    const uint32_t bars = sOut + 128u * (uint32_t)p.out_pitch; /* full[S], then empty[S] */
    unsigned char *gbase = wg_smem + (base - raw);
    volatile int *s_tile = reinterpret_cast<int *>(wg_smem + (bars - raw) + 16 * S);
    volatile int *s_next = s_tile + 4 * S;
    int *s_arow = reinterpret_cast<int *>(wg_smem + (bars - raw) + 16 * S + wg_sched_smem_bytes(S)); /* BM = 256 only */
    int *s_off = reinterpret_cast<int *>(wg_smem + (bars - raw) + 16 * S + wg_sched_smem_bytes(S) +
                                         wg_arow_smem_bytes(BM));
    constexpr bool AROW_SMEM = BM > 128;
    auto full = [&](uint32_t s) { return bars + 8 * s; };
    auto empty = [&](uint32_t s) { return bars + 8 * (S + s); };

    /* Offsets clamped into [0, max_rows] once (a malformed table cannot send a tile outside
     * the buffers the host sized from max_rows; hi is raised to lo in the search). */
    for (int i = threadIdx.x; i <= p.E; i += WG_THREADS)
        s_off[i] = min(max(p.offsets[i], 0), p.max_rows);
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; s++) {
            /* 128 producer threads + the TMA byte-count arrival; with A by TMA too, thread 0's
             * byte-count arrival alone */
            mbar_init(full(s), A_TMA_PATH && p.a_tma ? 1 : 128 + 1);
            mbar_init(empty(s), 8 * CL); /* the 8 consumer warps of each CTA of the cluster */
        }
        fence_barrier_init();
    }
    __syncthreads();
    /* the peer's barriers must be initialised before anything is multicast or arrives there */
    if (CL > 1) cluster_sync();
    const int rank = CL > 1 ? (int)cluster_ctarank() : 0;
    const int unit0 = CL > 1 ? (int)cluster_id_x() : (int)blockIdx.x;
    const int units_step = CL > 1 ? (int)cluster_count_x() : (int)gridDim.x;

    const int KT = (p.K + WG_BK - 1) / WG_BK;
    if (threadIdx.x < 128) {
        /* ================= producer warpgroup ================= */
        setmaxnreg_dec<WG_PRODUCER_REGS>();
        const int pt = threadIdx.x;
        const int chunk = pt & 7, rsub = pt >> 3; /* rows rsub + 16 i, 16-byte chunk `chunk` */
        const uint32_t a_off = (uint32_t)(rsub * 128 + ((chunk ^ (rsub & 7)) << 4));
        const T *A = static_cast<const T *>(p.A);
        uint32_t it = 0; /* k steps issued by this CTA so far (all tiles) */
        const bool dyn = CL == 1 && p.dyn_sched;
        int t = unit0;
        /* the tile, with every stage (released to the consumers by the stage's arrival): they
         * read its rows at the first stage and its column at the last */
        auto post_tile = [&](uint32_t s, const WgTile &tl) {
            s_tile[4 * s] = tl.row0;
            s_tile[4 * s + 1] = tl.row_end;
            s_tile[4 * s + 2] = tl.col;
        };
        if (A_TMA_PATH && p.a_tma) {
            /* A by TMA as well (no permute_x; ",atma"): warp 0 alone produces,
             * lane 0 issuing both operands' loads; the full barriers count its one
             * byte-count arrival. A's box: the tile's BM rows from row0 on (rows past the
             * tile's end are multiplied and never stored; zeros past max_rows and K). */
            for (uint32_t nt = 0; pt < 32; nt++) {
                WgTile tl = {};
                const bool more = wg_find_tile<BM, CL>(s_off, p.E, p.col_tiles, t, rank, &tl);
                if (pt == 0) {
                    const bool hint = CL == 1 && p.l2_hints > 0 && (tl.last || p.l2_hints == 1);
                    const uint64_t pol = l2_policy(tl.last);
                    for (int kt = 0; more && kt < KT; kt++, it++) {
                        const uint32_t s = it % S;
                        if (it >= S) mbar_wait(empty(s), ((it / S) + 1) & 1);
                        post_tile(s, tl);
                        mbar_arrive_expect_tx(full(s), A_BYTES + B_BYTES);
                        tma_load_2d(sA + s * A_BYTES, &tmap_a, kt * WG_BK, tl.row0, full(s));
                        wg_load_b<BN, CL, BKN>(&tmap, p, sB + s * B_BYTES, tl, kt, rank, full(s), hint, pol);
                    }
                    if (!more) { /* the end: stage `it` carries tile -1 */
                        const uint32_t s = it % S;
                        if (it >= S) mbar_wait(empty(s), ((it / S) + 1) & 1);
                        s_tile[4 * s] = -1;
                        mbar_arrive(full(s));
                    }
                }
                if (!more) break;
                if (dyn) {
                    int nx = 0;
                    if (pt == 0) nx = (int)gridDim.x + atomicAdd(&p.sched[0], 1);
                    t = __shfl_sync(0xffffffffu, nx, 0);
                } else {
                    t += units_step;
                }
            }
        } else
        for (uint32_t nt = 0;; nt++) {
            WgTile tl;
            if (!wg_find_tile<BM, CL>(s_off, p.E, p.col_tiles, t, rank, &tl)) {
                /* the end: stage `it` carries tile -1 (129 plain arrivals, no bytes) */
                const uint32_t s = it % S;
                if (it >= S) mbar_wait(empty(s), ((it / S) + 1) & 1);
                if (pt == 0) {
                    s_tile[4 * s] = -1;
                    mbar_arrive(full(s));
                }
                mbar_arrive(full(s));
                break;
            }
            int arow[AROW_SMEM ? 1 : BM / 16];
#pragma unroll
            for (int i = 0; i < BM / 16; i++) {
                const int r = tl.row0 + rsub + 16 * i;
                int ar = -1;
                if (r < tl.row_end) {
                    const int g = p.gather ? p.gather[r] : r;
#ifdef MOE_DIAGNOSTICS
                    if (g >= 0 && g < p.max_rows)
                        ar = p.permute_x ? (p.no_gather ? r : g) / p.topk : r;
#else
                    if (g >= 0 && g < p.max_rows) ar = p.permute_x ? g / p.topk : r;
#endif
                }
                if (AROW_SMEM)
                    s_arow[i * 128 + pt] = ar; /* read back by this thread only */
                else
                    arow[AROW_SMEM ? 0 : i] = ar;
            }
            const bool hint = CL == 1 && p.l2_hints > 0 && (tl.last || p.l2_hints == 1);
            const uint64_t pol = l2_policy(tl.last);
            for (int kt = 0; kt < KT; kt++, it++) {
                const uint32_t s = it % S;
                /* use it/S - 1 released (by both CTAs' consumers with CL = 2) */
                if (it >= S) mbar_wait(empty(s), ((it / S) + 1) & 1);
                if (!BKN && pt == 0 && p.prefetch > 0) { /* a 2-D map only */
                    /* moe_kernel_tuning.prefetch = n (off by default): L2 prefetch of the B boxes n
                     * steps ahead (at the tile's first step also the ones before that), so the
                     * TMA loads, issued only S steps ahead, would find them in L2. Measured
                     * 1.2-1.8x slower on an H100 (docs/KERNELS.md): kept as an experiment. */
                    const int brow = tl.expert * p.N + tl.col * (p.silu ? BN / 2 : BN);
                    const int box_step = p.silu ? p.N / 2 : BN / 2;
                    const int k0 = kt == 0 ? 1 : kt + p.prefetch;
                    const int k1 = min(kt + p.prefetch, KT - 1);
                    for (int kp = k0; kp <= k1; kp++)
                        for (int b = CL > 1 ? rank : 0; b < (CL > 1 ? rank + 1 : 2); b++)
                            tma_prefetch_2d(&tmap, kp * WG_BK, brow + b * box_step);
                }
                if (pt == 0) {
                    post_tile(s, tl);
                    /* this CTA's barrier expects the whole tile, both halves */
                    mbar_arrive_expect_tx(full(s), B_BYTES);
                    wg_load_b<BN, CL, BKN>(&tmap, p, sB + s * B_BYTES, tl, kt, rank, full(s), hint, pol);
                }
                const int k = kt * WG_BK + chunk * 8;
                const uint32_t dst = sA + s * A_BYTES + a_off;
#pragma unroll
                for (int i = 0; i < BM / 16; i++) {
                    const int ar = AROW_SMEM ? s_arow[i * 128 + pt] : arow[AROW_SMEM ? 0 : i];
                    const bool v = ar >= 0 && k < p.K;
                    const T *src = v ? A + (int64_t)ar * p.K + k : A;
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                     dst + i * 16 * 128),
                                 "l"(src), "r"(v ? 16 : 0)
                                 : "memory");
                }
                /* arrives when this thread's copies (this stage's and any earlier) landed */
                cp_async_mbar_arrive(full(s));
            }
            if (dyn) {
                /* thread 0 takes the next tile, the warpgroup's named barrier hands it round
                 * (two slots: a slot is rewritten only after every thread passed the next
                 * barrier, i.e. read it) */
                if (pt == 0) s_next[nt & 1] = (int)gridDim.x + atomicAdd(&p.sched[0], 1);
                asm volatile("bar.sync 3, 128;\n" ::: "memory");
                t = s_next[nt & 1];
            } else {
                t += units_step;
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        if (dyn && pt == 0) { /* (thread 0 fetched for every tile this CTA took, either path) */
            /* every counter fetch of this CTA is ordered before its count-in; the last CTA to
             * count in resets the slot for the next launch */
            __threadfence();
            if (atomicAdd(&p.sched[1], 1) == (int)gridDim.x - 1) {
                __threadfence(); /* the others' fetches, seen through their count-ins, come first */
                atomicExch(&p.sched[0], 0);
                atomicExch(&p.sched[1], 0);
            }
        }
    } else {
        /* ================= consumer warpgroups ================= */
        setmaxnreg_inc<WG_CONSUMER_REGS>();
        const int cw = threadIdx.x / 128 - 1; /* rows 64 MB cw .. 64 MB (cw + 1) - 1 of the tile */
        const int tw = threadIdx.x & 127, warp = tw >> 5, lane = tw & 31;
        /* scale_a pass: this thread's chunk (tw%8) of rows tw/8 + 16i of the warpgroup's 64 MB */
        const uint32_t sa_off = (uint32_t)(cw * 64 * MB * 128 + (tw >> 3) * 128 +
                                           (((tw & 7) ^ ((tw >> 3) & 7)) << 4));
        const bool cvec = p.c_vec && !p.narrow_stores;
        const bool pvec = p.p_vec && !p.narrow_stores;
        /* a stage is released to the producer of each CTA of the cluster (both load into it) */
        auto release = [&](uint32_t s) {
            if (lane != 0) return;
            if (CL > 1) {
                for (int r = 0; r < CL; r++) mbar_arrive_cluster(empty(s), (uint32_t)r);
            } else {
                mbar_arrive(empty(s));
            }
        };
        float acc[MB][BN / 2];
#pragma unroll
        for (int m = 0; m < MB; m++)
#pragma unroll
            for (int i = 0; i < BN / 2; i++) acc[m][i] = 0.f;
        uint32_t it = 0;
        for (;;) {
            /* the tile comes with its first stage */
            mbar_wait(full(it % S), (it / S) & 1);
            const int *post = const_cast<const int *>(s_tile) + 4 * (it % S); /* after the wait's clobber */
            WgTile tl;
            tl.row0 = post[0];
            if (tl.row0 < 0) break;
            tl.row_end = post[1];
            const int wrow0 = tl.row0 + 64 * MB * cw; /* this warpgroup's first row */
            const int rem = tl.row_end - wrow0;
            const int nact = rem <= 0 ? 0 : min((rem + 63) >> 6, MB); /* m64 blocks with rows */
            /* The two rows per m64 block this thread stores: where, and their output scale. */
            int crow[MB][2];
            float csc[MB][2], asc[MB][2]; /* asc: scale_a of the row when applied in fp32 */
#pragma unroll
            for (int m = 0; m < MB; m++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int r = wrow0 + 64 * m + 16 * warp + (lane >> 2) + 8 * h;
                    crow[m][h] = -1;
                    csc[m][h] = 1.f;
                    asc[m][h] = 1.f;
                    if (r < tl.row_end) {
                        const int g = p.gather ? p.gather[r] : r;
                        if (g >= 0 && g < p.max_rows) {
                            crow[m][h] = p.permute_y ? g : r;
                            if (p.scale_c) csc[m][h] = load_f(static_cast<const T *>(p.scale_c) + g);
                            if (p.scale_a_acc) asc[m][h] = load_f(static_cast<const T *>(p.scale_a) + g);
                        }
                    }
                }
            float sa[4 * MB]; /* scale_a of the 4 MB A rows this thread scales (see below) */
            if (SCALE_A) {
#pragma unroll
                for (int i = 0; i < 4 * MB; i++) {
                    const int r = wrow0 + (tw >> 3) + 16 * i;
                    sa[i] = 1.f;
                    if (r < tl.row_end) {
                        const int g = p.gather ? p.gather[r] : r;
                        if (g >= 0 && g < p.max_rows)
                            sa[i] = load_f(static_cast<const T *>(p.scale_a) + g);
                    }
                }
            }
            /* The k loop for NM active m64 blocks (compile time: no branch may sit between
             * wgmma.fence and the commit, or ptxas serializes every wgmma). */
            auto mainloop = [&](auto nm_tag) {
                constexpr int NM = decltype(nm_tag)::value;
                for (int kt = 0; kt < KT; kt++, it++) {
                    const uint32_t s = it % S;
                    mbar_wait(full(s), (it / S) & 1);
                    if (SCALE_A) {
                        /* scale_a_rows: the warpgroup multiplies its own 64 MB A rows in shared
                         * memory (thread: 16-byte chunk tw%8 of rows tw/8 + 16i), rounds them to
                         * T, makes the writes visible to the tensor cores (proxy fence) and syncs
                         * its 128 threads; meanwhile the previous stage's MMAs still run. */
                        unsigned char *st = gbase + s * A_BYTES + sa_off;
#pragma unroll
                        for (int i = 0; i < 4 * NM; i++) scale8_inplace<T>(st + i * 16 * 128, sa[i]);
                        fence_proxy_async();
                        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cw) : "memory");
                    } else if (p.proxy_fence) {
                        fence_proxy_async(); /* A came through cp.async (generic proxy) */
                    }
                    const uint64_t da = sw128_desc(sA + s * A_BYTES + cw * 64 * MB * 128);
                    const uint64_t db = BKN ? sw128_desc_mn(sB + s * B_BYTES) : sw128_desc(sB + s * B_BYTES);
                    wgmma_fence();
#pragma unroll
                    for (int kk = 0; kk < WG_BK / 16; kk++)
#pragma unroll
                        for (int m = 0; m < NM; m++) /* 64 rows x 128 B = 8 KB: +512 (>>4) */
                            Wgmma<T, BN, 0, BKN>::run(acc[m], da + 512 * m + 2 * kk,
                                                   db + (BKN ? 128 : 2) * kk,
                                              (kt > 0 || kk > 0) ? 1 : 0);
                    wgmma_commit();
                    wgmma_wait<1>(); /* the previous stage's MMAs are done: release it */
                    if (kt > 0) release((it - 1) % S);
                }
            };
            if (nact >= MB)
                mainloop(WgCount<MB>());
            else if (nact >= 1)
                mainloop(WgCount<(MB > 1 ? 1 : MB)>());
            else
                mainloop(WgCount<0>()); /* no rows: keep the stage protocol, no MMAs */
            wgmma_wait<0>();
#pragma unroll
            for (int m = 0; m < MB; m++) fence_regs(acc[m]);
            /* The epilogue reads the tile's column from the last stage's post, so that stage
             * goes back to the producer only after it (the producer still has S - 1 free). */
            const uint32_t last = (it - 1) % S;
#ifdef MOE_DIAGNOSTICS
            if (p.skip_epilogue) {
                release(last);
                continue;
            }
#endif
            if (p.scale_a_acc) {
                /* scale_a_rows: (s x) W = s (x W); the row of acc[4i + 2h + q] is h */
#pragma unroll
                for (int m = 0; m < MB; m++)
#pragma unroll
                    for (int j = 0; j < BN / 2; j++) acc[m][j] *= asc[m][(j >> 1) & 1];
            }
            if (MB == 1 && p.out_pitch > 0) {
                /* the warp's 16 rows of the tile are rows 64 cw + 16 warp .. of sOut */
                const uint32_t wrows = (uint32_t)((64 * cw + 16 * warp) * p.out_pitch);
                if (nact > 0)
                    wg_epilogue_staged<T, BN>(p, acc[0], crow[0], csc[0], s_tile + 4 * last + 2, lane,
                                              gbase + (sOut - base) + wrows, sOut + wrows, p.out_pitch);
            } else {
#pragma unroll
                for (int m = 0; m < MB; m++)
                    if (m < nact)
                        wg_epilogue<T, BN>(p, acc[m], crow[m], csc[m], s_tile + 4 * last + 2, lane, cvec, pvec);
            }
            __syncwarp(); /* every lane has read the column before lane 0 hands the stage back */
            release(last);
        }
        /* the output tile must outlive the bulk copies that read it (and their writes land
         * before the kernel ends) */
        if (p.out_pitch > 0) staged_rows_end(lane);
    }
    /* CL = 2: no CTA leaves while its peer may still arrive on its barriers */
    if (CL > 1) cluster_sync();
}

#else /* not sm_90a: a stub the host recognises by its static shared memory (never launched) */

template <typename T, int BM, int BN, int S, bool SCALE_A, int CL, bool BKN>
__global__ void __launch_bounds__(WG_THREADS, 1)
    moe_gg_wgmma_kernel(const WgParams p, const __grid_constant__ CUtensorMap tmap,
                        const __grid_constant__ CUtensorMap tmap_a)
{
    __shared__ int wg_stub_marker[32];
    if (threadIdx.x < 32) reinterpret_cast<volatile int *>(wg_stub_marker)[threadIdx.x] = p.E;
    (void)tmap;
    (void)tmap_a;
}

#endif /* MOE_WG_DEVICE */

/* ---- host side ---- */

typedef CUresult (*EncodeTiledFn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                  const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                  const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                  CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda at link time);
 * NULL when the driver does not provide it. Looked up once (thread-safe static init). */
EncodeTiledFn tensor_map_encoder()
{
    static const EncodeTiledFn fn = []() -> EncodeTiledFn {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                             &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            return nullptr;
        }
        return reinterpret_cast<EncodeTiledFn>(f);
    }();
    return fn;
}

/* A 2-D tensor map over `rows` rows of `cols` 16-bit elements (row stride cols * 2 bytes) in
 * boxes of 64 columns (one 128-byte swizzle row) x box_rows rows, zeros outside: the weights
 * [E*N, K] and, for TMA loads of A, [max_rows, K]. */
CUresult encode_rows_map(EncodeTiledFn encode, CUtensorMap *map, CUtensorMapDataType ty, const void *base,
                         uint64_t rows, int cols, int box_rows)
{
    const cuuint64_t gdim[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
    const cuuint64_t gstride[1] = {(cuuint64_t)cols * 2};
    const cuuint32_t box[2] = {(cuuint32_t)WG_BK, (cuuint32_t)box_rows};
    const cuuint32_t estride[2] = {1, 1};
    return encode(map, ty, 2, const_cast<void *>(base), gdim, gstride, box, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

template <typename T, int BM, int BN, int S, bool SA, int CL, bool BKN>
bool kernel_is_real()
{
    return sm90a_kernel_built<moe_gg_wgmma_kernel<T, BM, BN, S, SA, CL, BKN>>();
}

/* Row-tile slots for BM-row tiles: every expert wastes at most one partial tile. */
long long row_tile_slots_wg(int max_rows, int E, int bm)
{
    const long long a = ((long long)max_rows + bm - 1) / bm + E;
    return a < max_rows ? a : max_rows;
}

/* The staged epilogue's row pitch for a launch (WgParams.out_pitch; 0: the register epilogue).
 * The output tile is 128 rows of out_cols outputs. A pitch of its row bytes + 64 puts the two
 * rows that one quarter-warp's 16-byte stores reach at once in different halves of the 128-byte
 * bank line (no conflicts); that is what the automatic choice (no option, the default) asks
 * for, so it stages wherever that tile fits beside the configuration's stages, e.g. 128x256 with
 * 3 stages. ",staged" also takes the unpadded pitch (2-way conflicts) where only that fits
 * (e.g. 128x256 with 4 stages and SiLU: 32 KB); ",direct" never stages. The staged epilogue
 * needs 16-byte C rows, no C_preact and 128-row tiles. */
int wg_out_pitch(const moe_kernel_config &c, int out_cols, int E, int smem_optin, bool possible)
{
    const int mode = c.epilogue;
    if (!possible || c.tile_m != 128 || mode == MOE_GG_EPILOGUE_DIRECT) return 0;
    const size_t core = wg_core_smem(c.tile_m, c.tile_n, c.stages) + (size_t)(E + 1) * 4;
    const size_t row = (size_t)out_cols * 2;
    if (core + 128 * (row + 64) <= (size_t)smem_optin) return (int)(row + 64);
    if (mode == MOE_GG_EPILOGUE_STAGED && core + 128 * row <= (size_t)smem_optin) return (int)row;
    return 0;
}

/* The launch configuration of a grid of clusters of cl CTAs (1-D), with its one attribute in
 * *at (which must outlive the configuration). */
cudaLaunchConfig_t cluster_launch_config(cudaLaunchAttribute *at, unsigned grid, int cl,
                                         size_t smem, cudaStream_t s)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(WG_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    at->id = cudaLaunchAttributeClusterDimension;
    at->val.clusterDim.x = (unsigned)cl;
    at->val.clusterDim.y = 1;
    at->val.clusterDim.z = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    return cfg;
}

/* How many clusters of CL CTAs of this kernel (with smem bytes each) can be resident at once:
 * the persistent grid's size. Asked once per instantiation and shared-memory size. */
template <typename K>
int resident_clusters(K kern, int cl, size_t smem, int sms)
{
    cudaLaunchAttribute at;
    const cudaLaunchConfig_t cfg = cluster_launch_config(&at, (unsigned)(sms / cl * cl), cl, smem, 0);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

/* One launch of the kernel instantiation; max_ctas > 0 caps the persistent grid (a test hook,
 * moe_kernel_tuning.max_ctas); *dyn: whether the launch took its tiles from p.sched (one-CTA
 * kernels only: the clusters run the static order). */
template <typename T, int BM, int BN, int S, bool SA, int CL, bool BKN = false>
cudaError_t launch_wg(const WgParams &p, const CUtensorMap &map, const CUtensorMap &map_a, const DevInfo &d,
                      int max_ctas, cudaStream_t s, int *dyn)
{
    auto kern = moe_gg_wgmma_kernel<T, BM, BN, S, SA, CL, BKN>;
    const size_t smem = wg_core_smem(BM, BN, S) + (size_t)128 * p.out_pitch + (size_t)(p.E + 1) * 4;
    /* The kernel's cap on dynamic shared memory: the device's whole opt-in, the same value on
     * every launch (one CTA per SM anyway). Setting each launch's own size would let a
     * concurrent launch on another host thread, with a smaller output tile (GEMM2 vs GEMM1
     * share an instantiation), lower the cap between this one's set and launch. */
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, d.smem_optin);
    if (e != cudaSuccess) return e;
    /* units: every expert's row tiles in groups of CL (each expert wastes at most one group) */
    const long long units =
        (row_tile_slots_wg(p.max_rows, p.E, BM) + (long long)(CL - 1) * (p.E + 1)) / CL * p.col_tiles;
    if (CL == 1) {
        long long grid = units < d.sms ? units : d.sms;
        if (max_ctas > 0 && grid > max_ctas) grid = max_ctas;
        if (grid < 1) grid = 1;
        *dyn = p.dyn_sched;
        kern<<<(unsigned)grid, WG_THREADS, smem, s>>>(p, map, map_a);
        return cudaGetLastError();
    }
    /* Clusters: as many as can be resident together (a GPU that cannot co-schedule a pair
     * runs the one-CTA kernel of the same tile instead: same results, no weight sharing). */
    static std::mutex mu; /* launches from several host threads, with different tile sizes */
    static size_t known_smem = 0;
    static int known_sms = 0, known_clusters = 0;
    long long clusters;
    {
        std::lock_guard<std::mutex> lock(mu);
        if (known_smem != smem || known_sms != d.sms) {
            known_clusters = resident_clusters(kern, CL, smem, d.sms);
            known_smem = smem;
            known_sms = d.sms;
        }
        clusters = known_clusters;
    }
    if (clusters < 1) return launch_wg<T, BM, BN, S, SA, 1, BKN>(p, map, map_a, d, max_ctas, s, dyn);
    if (units < clusters) clusters = units;
    if (max_ctas > 0 && clusters * CL > max_ctas) clusters = max_ctas / CL;
    if (clusters < 1) clusters = 1;
    *dyn = 0;
    cudaLaunchAttribute at;
    const cudaLaunchConfig_t cfg = cluster_launch_config(&at, (unsigned)(clusters * CL), CL, smem, s);
    e = cudaLaunchKernelEx(&cfg, kern, p, map, map_a);
    return e != cudaSuccess ? e : cudaGetLastError();
}

/* Whether c names wgmma configuration X(bm, bn, bk, w, st, cl) (cluster 0 and 1: none). */
#define MOE_WG_IS(c, bm, bn, bk, w, st, cl)                                                    \
    ((c).tile_m == bm && (c).tile_n == bn && (c).tile_k == bk && (c).warps == w &&               \
     (c).stages == st && ((c).cluster > 1 ? (c).cluster : 1) == cl)

bool config_listed(const moe_kernel_config &c)
{
#define MOE_WG_LISTED(bm, bn, bk, w, st, cl) \
    if (MOE_WG_IS(c, bm, bn, bk, w, st, cl)) return true;
    MOE_GG_WGMMA_CONFIGS(MOE_WG_LISTED)
#undef MOE_WG_LISTED
    return false;
}

template <typename T>
bool real_for(const moe_kernel_config &c)
{
#define MOE_WG_REAL(bm, bn, bk, w, st, cl)                                                      \
    if (MOE_WG_IS(c, bm, bn, bk, w, st, cl))                                                    \
        return kernel_is_real<T, bm, bn, st, false, cl, false>() &&                               \
               kernel_is_real<T, bm, bn, st, true, cl, false>() &&                                \
               kernel_is_real<T, bm, bn, st, false, 1, true>();
    MOE_GG_WGMMA_CONFIGS(MOE_WG_REAL)
#undef MOE_WG_REAL
    return false;
}

/* b_kn runs the one-CTA kernel of the configuration's tile (no clusters), scale_a on the
 * accumulators. */
template <typename T>
cudaError_t dispatch_wg(const WgParams &p, const CUtensorMap &map, const CUtensorMap &map_a, const DevInfo &d,
                        const moe_kernel_config &c, bool sa, bool bkn, int max_ctas, cudaStream_t s,
                        int *dyn)
{
#define MOE_WG_LAUNCH(bm, bn, bk, w, st, cl)                                                    \
    if (MOE_WG_IS(c, bm, bn, bk, w, st, cl))                                                    \
        return bkn  ? launch_wg<T, bm, bn, st, false, 1, true>(p, map, map_a, d, max_ctas, s, dyn) \
               : sa ? launch_wg<T, bm, bn, st, true, cl>(p, map, map_a, d, max_ctas, s, dyn)      \
                    : launch_wg<T, bm, bn, st, false, cl>(p, map, map_a, d, max_ctas, s, dyn);
    MOE_GG_WGMMA_CONFIGS(MOE_WG_LAUNCH)
#undef MOE_WG_LAUNCH
    return cudaErrorInvalidConfiguration;
}

} // namespace

bool moe_gg_wgmma_applicable(const moe_grouped_gemm_args *a, const moe_kernel_config *c)
{
    if (!a || !c || !c->use_tma) return false;
    if (a->dtype != MOE_DTYPE_BF16 && a->dtype != MOE_DTYPE_F16) return false;
    const size_t es = 2;
    /* TMA: base and row stride 16-byte aligned; cp.async of A rows: the same for A. */
    if (!aligned16(a->A) || !aligned16(a->B) || (a->K * es) % 16 != 0) return false;
    if (a->b_kn) {
        /* B [E][K][N]: its rows of N elements are the tensor map's stride, and a box's first
         * column must sit on 16 bytes too (with SiLU the up half starts at column N/2; an
         * unaligned one faulted as an illegal instruction on an H200) */
        if ((a->N * es) % 16 != 0) return false;
        if (a->epilogue == MOE_EPI_SILU_MUL && (a->N / 2 * es) % 16 != 0) return false;
    } else if ((long long)a->num_experts * a->N >= ((long long)1 << 31)) {
        return false; /* tensor-map row coordinates of [E*N, K] are 32-bit */
    }
    DevInfo d;
    if (!dev_info(&d) || !d.hopper) return false;
    if (!tensor_map_encoder()) return false;
    if (!config_listed(*c)) return false;
    const size_t need = wg_core_smem(c->tile_m, c->tile_n, c->stages) + (size_t)(a->num_experts + 1) * 4;
    if (need > (size_t)d.smem_optin) return false;
    return a->dtype == MOE_DTYPE_BF16 ? real_for<__nv_bfloat16>(*c) : real_for<__half>(*c);
}

const char *moe_gg_wgmma_kernel_name(moe_dtype dt)
{
    return dt == MOE_DTYPE_F16 ? "grouped_gemm_wgmma_fp16" : "grouped_gemm_wgmma_bf16";
}

cudaError_t moe_gg_wgmma_launch(const moe_grouped_gemm_args *a, const moe_kernel_config *c,
                                const moe_kernel_tuning &t, cudaStream_t stream, moe_gg_wgmma_ran *ran)
{
    DevInfo d;
    if (!dev_info(&d)) return cudaErrorInvalidDevice;
    EncodeTiledFn encode = tensor_map_encoder();
    if (!encode) return cudaErrorNotSupported;
    const bool silu = a->epilogue == MOE_EPI_SILU_MUL;
    const size_t es = 2;

    WgParams p;
    fill_gemm_params(p, a, es);
    p.proxy_fence = t.proxy_fence;
#ifdef MOE_DIAGNOSTICS
    p.skip_epilogue = t.diag_skip_epilogue;
    p.no_gather = t.diag_no_gather;
#endif
    p.narrow_stores = t.narrow_stores;
    /* SiLU: the hardware exp2/reciprocal by default, IEEE expf and division with
     * exact_hf_rounding (as HF, the CPU twin and the mma.sync kernels) */
    p.exact_silu = t.exact_hf_rounding;
    /* scale_a_rows: by default on the fp32 accumulators after the k loop (exact in real
     * arithmetic; the input is not rounded to the dtype after scaling as in moe_stages.h, a
     * difference within the dtype's rounding); exact_hf_rounding scales and rounds the A tiles
     * in shared memory before the MMAs instead, as the mma.sync kernels do (b_kn, which no
     * layer GEMM combines with scale_a_rows, has no such pass: always the accumulators). */
    p.scale_a_acc = a->scale_a_rows != nullptr && (a->b_kn || !t.exact_hf_rounding);
    /* moe_l2_hints -> the kernel's 0 none, 1 evict_last + last evict_first, 2 last only */
    p.l2_hints = t.l2_hints == MOE_L2_HINTS_NONE ? 0 : t.l2_hints == MOE_L2_HINTS_EVICT_FIRST ? 2 : 1;
    p.prefetch = t.prefetch < 0 ? 0 : t.prefetch > 64 ? 64 : t.prefetch;
    p.sched = t.sched_counters;
    p.dyn_sched = p.sched != nullptr;
    p.c_vec = aligned16(a->C) && p.n_out % 8 == 0;
    p.p_vec = a->C_preact && aligned16(a->C_preact) && p.n_out % 8 == 0;
    const int out_per_tile = silu ? c->tile_n / 2 : c->tile_n;
    p.col_tiles = (p.n_out + out_per_tile - 1) / out_per_tile;
    p.out_pitch = wg_out_pitch(*c, out_per_tile, a->num_experts, d.smem_optin,
                               p.c_vec && !p.C_preact && !p.narrow_stores);

    /* B [N, K]: one tensor map over every expert's weights stacked as [E*N, K] (K contiguous):
     * a box of 64 x BN/2 rows (two boxes per stage: gate and up with SiLU, else the two halves;
     * one per CTA of a pair), zeros outside (the K tail and past the last expert; rows of a
     * neighbouring expert are never stored). B [K, N] (b_kn): a 3-D map [E][K][N] with boxes of
     * 64 columns x 64 k rows (BN/64 per stage), zeros past K and N within each expert. Both
     * 128-byte swizzle. */
    CUtensorMap map;
    const CUtensorMapDataType ty =
        a->dtype == MOE_DTYPE_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    CUresult r;
    if (a->b_kn) {
        const cuuint64_t gdim[3] = {(cuuint64_t)a->N, (cuuint64_t)a->K, (cuuint64_t)a->num_experts};
        const cuuint64_t gstride[2] = {(cuuint64_t)a->N * es, (cuuint64_t)a->K * a->N * es};
        const cuuint32_t box[3] = {64, (cuuint32_t)WG_BK, 1};
        const cuuint32_t estride[3] = {1, 1, 1};
        r = encode(&map, ty, 3, const_cast<void *>(a->B), gdim, gstride, box, estride,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    } else {
        r = encode_rows_map(encode, &map, ty, a->B, (uint64_t)a->num_experts * a->N, a->K, c->tile_n / 2);
    }
    if (r != CUDA_SUCCESS) return cudaErrorInvalidValue;
    /* A [max_rows, K] in expert order (no permute_x) by TMA: boxes of 64 x BM rows; one-CTA
     * kernels (b_kn runs without clusters) without the shared-memory scale_a pass only */
    CUtensorMap map_a;
    memset(&map_a, 0, sizeof map_a);
    /* A by TMA unless the configuration says ",acp" (the default since the H200 run of
     * 2026-12-05, docs/KERNELS.md round 6: GEMM2 and the dX GEMM of dgu 8-17% faster, never
     * slower), and only where A needs no gather */
    p.a_tma = !a->permute_x && (c->cluster <= 1 || a->b_kn) && !(a->scale_a_rows && !p.scale_a_acc) &&
              c->a_load != MOE_GG_A_CPASYNC;
    if (p.a_tma && encode_rows_map(encode, &map_a, ty, a->A, (uint64_t)a->max_rows, a->K, c->tile_m) != CUDA_SUCCESS)
        return cudaErrorInvalidValue;

    const bool sa = a->scale_a_rows != nullptr && !p.scale_a_acc;
    int dyn = 0;
    const cudaError_t e =
        a->dtype == MOE_DTYPE_BF16
            ? dispatch_wg<__nv_bfloat16>(p, map, map_a, d, *c, sa, a->b_kn, t.max_ctas, stream, &dyn)
            : dispatch_wg<__half>(p, map, map_a, d, *c, sa, a->b_kn, t.max_ctas, stream, &dyn);
    if (ran) {
        ran->staged_epilogue = p.out_pitch > 0;
        ran->a_tma = p.a_tma;
        ran->sched_dynamic = dyn;
        ran->fast_rounding = p.scale_a_acc || (silu && !p.exact_silu);
    }
    return e;
}
