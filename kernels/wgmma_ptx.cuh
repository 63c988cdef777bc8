/*
 * wgmma_ptx.cuh — what the Hopper (sm_90a) kernels share: the PTX wrappers (mbarrier, TMA loads,
 * cluster registers, wgmma and its shared-memory descriptors, setmaxnreg), the quad transpose
 * of the accumulator epilogues, and the host's cached device facts (no environment: the launch
 * options come from the caller's moe_kernel_config and moe_kernel_tuning). Included by
 * grouped_gemm_wgmma.cu (forward and dX) and grouped_gemm_dw_wgmma.cu (dW). Device functions
 * exist only where MOE_WG_DEVICE is defined (the sm_90a pass of nvcc).
 */
#ifndef MOE_WGMMA_PTX_CUH
#define MOE_WGMMA_PTX_CUH

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "moe_kernels.h" /* moe_gg_epilogue, moe_gg_a_load, moe_kernel_tuning */

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_WG_DEVICE 1
#endif

namespace moe_wgp {

#ifdef MOE_WG_DEVICE
/* ---- PTX wrappers: mbarrier, TMA, wgmma, setmaxnreg (sm_90a) ---- */
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar)
{
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes)
{
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
/* Prefetch one B box (coordinates as tma_load_2d) from global memory into L2: no shared memory,
 * no barrier; the later TMA load of it then hits L2 instead of waiting for HBM. */
__device__ __forceinline__ void tma_prefetch_2d(const CUtensorMap *map, int c0, int c1)
{
    asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map)),
                 "r"(c0), "r"(c1)
                 : "memory");
}
/* Wait until the phase with the given parity has completed. A wait of more than ~10^10 cycles
 * (seconds; a legitimate one lasts at most one tile, microseconds) means a protocol bug: trap, so
 * the launch fails with an error instead of hanging the process. */
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity)
{
    uint32_t done;
    asm volatile("{\n.reg .pred p;\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
    return done != 0;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity)
{
    if (mbar_try_wait(bar, parity)) return;
    const long long t0 = clock64();
    while (!mbar_try_wait(bar, parity))
        if (clock64() - t0 > 10000000000LL) __trap();
}
/* Arrive on the barrier when every cp.async this thread issued so far has landed; .noinc: the
 * arrival counts against the barrier's expected count (set at init). */
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void fence_proxy_async()
{
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
/* ---- bulk stores shared -> global (the staged epilogues) ----
 * One 1-D copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared memory
 * to global memory by the async proxy, in this thread's current bulk group; the writer of the
 * shared bytes must have run fence_proxy_async() after writing them. commit closes the group;
 * wait_read<N> returns once at most N of this thread's groups still read shared memory (their
 * source may then be rewritten), wait_all<N> once at most N are incomplete (global writes done). */
__device__ __forceinline__ void bulk_store(void *gdst, uint32_t ssrc, uint32_t bytes)
{
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(gdst),
                 "r"(ssrc), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read()
{
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait_all()
{
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_barrier_init()
{
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
/* 2-D tensor load (coordinates: c0 along K, c1 along the [E*N] rows) completing on bar. */
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                            uint32_t bar)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}
/* ---- 2-CTA clusters (CL = 2): the pair shares each weight tile ----
 * Each CTA of the pair loads one half of the B tile and multicasts it into both CTAs' shared
 * memory (same offsets), completing on both CTAs' full barriers; a stage is free again only
 * when the consumers of both CTAs released it, so each consumer warp arrives on the empty
 * barrier of both CTAs. */
/* The cluster's special registers: this CTA's rank in its cluster, the cluster's index in the
 * grid, the number of clusters (x only: clusters are 1-D here). */
#define MOE_WG_SREG(fn, reg)                                                                     \
    __device__ __forceinline__ uint32_t fn()                                                     \
    {                                                                                            \
        uint32_t r;                                                                              \
        asm volatile("mov.u32 %0, %%" reg ";\n" : "=r"(r));                                     \
        return r;                                                                                \
    }
MOE_WG_SREG(cluster_ctarank, "cluster_ctarank")
MOE_WG_SREG(cluster_id_x, "clusterid.x")
MOE_WG_SREG(cluster_count_x, "nclusterid.x")
#undef MOE_WG_SREG
/* Every thread of every CTA of the cluster: release what came before, acquire the others'. */
__device__ __forceinline__ void cluster_sync()
{
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::
                     : "memory");
}
/* Arrive on the mbarrier at shared-memory offset bar of CTA `rank` of the cluster. Default
 * (.release.cta) semantics: the arrival only says "my wgmmas finished reading this stage"
 * (wgmma.wait_group already guarantees that); nothing written here is read by the peer, so no
 * cluster-scope release, which costs a MEMBAR.ALL.GPU per arrival (waiting, after an
 * epilogue, for all its global stores). */
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank)
{
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
                 "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
                 "r"(rank)
                 : "memory");
}
/* tma_load_2d into the same offset of every CTA in mask, completing on each one's barrier. */
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap *map, int c0,
                                                      int c1, uint32_t bar, uint16_t mask)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
                 : "memory");
}
/* L2 eviction policies for the B tiles (createpolicy): a weight tile is read by each row tile
 * of its expert (2-3 at a few hundred rows per expert), by CTAs that drift apart; kept
 * evict_last until the expert's last row tile reads it evict_first, it stays in L2 for its
 * siblings instead of coming from DRAM once per row tile. */
__device__ __forceinline__ uint64_t l2_policy(bool evict_first)
{
    uint64_t pol;
    if (evict_first)
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
    else
        asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(pol));
    return pol;
}
/* tma_load_2d with an L2 cache policy */
__device__ __forceinline__ void tma_load_2d_hint(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                                 uint32_t bar, uint64_t pol)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 ".L2::cache_hint [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "l"(pol)
                 : "memory");
}
/* 3-D tensor load (c0 along N, c1 along K, c2 the expert) for B [E][K][N] (b_kn), with an L2
 * cache policy when hint; coordinates past K or N fill zeros. */
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                            int c2, uint32_t bar, bool hint, uint64_t pol)
{
    if (hint)
        asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                     ".L2::cache_hint [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
                     "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "l"(pol)
                     : "memory");
    else
        asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                     " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
                     "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
                     : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Keep the compiler from touching the accumulators across the asynchronous MMAs. */
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R])
{
#pragma unroll
    for (int i = 0; i < R; i++) asm volatile("" : "+f"(d[i])::"memory");
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc()
{
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec()
{
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

/* Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: rows of 128 bytes,
 * 8-row groups 1024 bytes apart (stride byte offset), the leading byte offset unused by this
 * layout (1 by convention), swizzle mode 1 = 128B in bits 62-63. Advancing 16 elements along K
 * inside the 64-wide tile adds 32 bytes to the start address (+2 in the >>4 encoding): the
 * hardware applies the swizzle to the final address bits, which is why tiles are 1024-aligned. */
__device__ __forceinline__ uint64_t sw128_desc(uint32_t smem_addr)
{
    uint64_t d = (uint64_t)((smem_addr & 0x3FFFFu) >> 4);
    d |= (uint64_t)1 << 16;
    d |= (uint64_t)(1024 >> 4) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}

/* The same for an N-major B tile (b_kn: B stored [K, N]): the stage holds BN/64 boxes of 64 k
 * rows x 64 columns (128 bytes per k row, swizzled as above), one box per 64 columns. In the
 * N-major canonical 128B-swizzle layout ((8,8,n),(8,k)) : ((1,8,LBO),(64,SBO)) elements, the
 * 8-row k groups sit 1024 bytes apart (stride byte offset) and the 64-column groups one box,
 * 8 KB, apart (leading byte offset). A k16 step inside the stage starts 16 rows = 2048 bytes
 * on (+128 in the >>4 encoding). */
constexpr uint32_t WG_KN_BOX_BYTES = 64 * 128;
__device__ __forceinline__ uint64_t sw128_desc_mn(uint32_t smem_addr)
{
    uint64_t d = (uint64_t)((smem_addr & 0x3FFFFu) >> 4);
    d |= (uint64_t)(WG_KN_BOX_BYTES >> 4) << 16;
    d |= (uint64_t)(1024 >> 4) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}

/* D[64 x N] (+)= A[64 x 16] * B[N x 16]^T from shared memory, A K-major (TA = 0) or M-major
 * (TA = 1, the dW kernel), B K-major (TB = 0) or N-major (TB = 1: b_kn and dW), through wgmma's
 * transpose bits; acc = 0 overwrites.
 * Per thread: d[4i + q] holds row 16*warp + lane/4 (+8 for q >= 2), column 8i + 2*(lane%4) +
 * (q & 1) of the warpgroup's 64 x N block. */
template <typename T, int N, int TA, int TB> struct Wgmma;
/* The four instantiations differ only in the PTX type and N: one macro writes them. The
 * accumulator operand lists are spelt out 8 at a time (inline asm takes no arrays). */
#define MOE_WG_D8(i)                                                                           \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),  \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define MOE_WG_D64(o)                                                                          \
    MOE_WG_D8(o), MOE_WG_D8(o + 8), MOE_WG_D8(o + 16), MOE_WG_D8(o + 24), MOE_WG_D8(o + 32),   \
        MOE_WG_D8(o + 40), MOE_WG_D8(o + 48), MOE_WG_D8(o + 56)
#define MOE_WG_OUT_128 MOE_WG_D64(0)
#define MOE_WG_OUT_256 MOE_WG_D64(0), MOE_WG_D64(64)
#define MOE_WG_REGS_128 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define MOE_WG_REGS_256 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
/* operands after the accumulators: descriptor A, descriptor B, acc (N/2 = accumulator count) */
#define MOE_WG_TAIL_128(TA, TB) "%64, %65, p, 1, 1, " #TA ", " #TB ";\n}\n"
#define MOE_WG_TAIL_256(TA, TB) "%128, %129, p, 1, 1, " #TA ", " #TB ";\n}\n"
#define MOE_WG_PRED_128 "%66"
#define MOE_WG_PRED_256 "%130"
#define MOE_WGMMA(CT, PTXT, N, TA, TB)                                                         \
    template <> struct Wgmma<CT, N, TA, TB> {                                                  \
        static __device__ __forceinline__ void run(float (&d)[N / 2], uint64_t da, uint64_t db, \
                                                   int acc)                                    \
        {                                                                                      \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " MOE_WG_PRED_##N ", 0;\n"          \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTXT "." PTXT " "    \
                         MOE_WG_REGS_##N ", " MOE_WG_TAIL_##N(TA, TB)                          \
                         : MOE_WG_OUT_##N                                                      \
                         : "l"(da), "l"(db), "r"(acc));                                        \
        }                                                                                      \
    };
MOE_WGMMA(__nv_bfloat16, "bf16", 128, 0, 0)
MOE_WGMMA(__half, "f16", 128, 0, 0)
MOE_WGMMA(__nv_bfloat16, "bf16", 256, 0, 0)
MOE_WGMMA(__half, "f16", 256, 0, 0)
MOE_WGMMA(__nv_bfloat16, "bf16", 128, 0, 1)
MOE_WGMMA(__half, "f16", 128, 0, 1)
MOE_WGMMA(__nv_bfloat16, "bf16", 256, 0, 1)
MOE_WGMMA(__half, "f16", 256, 0, 1)
MOE_WGMMA(__nv_bfloat16, "bf16", 256, 1, 1)
MOE_WGMMA(__half, "f16", 256, 1, 1)

/* 4x4 transpose of 32-bit words inside a quad (the 4 lanes that share an accumulator row):
 * on entry lane q holds w[j] = the packed column pair 2q, 2q+1 of 8-column group j; on exit
 * lane q holds the 4 pairs of group q (columns 8q .. 8q+7: one 16-byte store). Two xor
 * exchanges of 2 words each. All 32 lanes must take part. */
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4], int q)
{
    const bool b1 = (q & 2) != 0, b0 = (q & 1) != 0;
    uint32_t s0 = b1 ? w[0] : w[2], s1 = b1 ? w[1] : w[3];
    uint32_t r0 = __shfl_xor_sync(0xffffffffu, s0, 2), r1 = __shfl_xor_sync(0xffffffffu, s1, 2);
    if (b1) {
        w[0] = r0;
        w[1] = r1;
    } else {
        w[2] = r0;
        w[3] = r1;
    }
    s0 = b0 ? w[0] : w[1];
    s1 = b0 ? w[2] : w[3];
    r0 = __shfl_xor_sync(0xffffffffu, s0, 1);
    r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
    if (b0) {
        w[0] = r0;
        w[2] = r1;
    } else {
        w[1] = r0;
        w[3] = r1;
    }
}

/* ---- the staged epilogue's row protocol (forward and dW kernels) ----
 * A warp owns 16 rows of a shared output tile, `pitch` bytes apart (a multiple of 16). Per tile:
 * staged_rows_begin (its lanes 0-15 wait until their bulk copies of the previous tile have read
 * the rows), staged_rows_put for each 8-column group of packed outputs, staged_rows_flush (every
 * lane's writes made visible to the async proxy, then lane l < 16 copies row l to dst_l, a global
 * row start, NULL: none, `bytes` long, a multiple of 16). staged_rows_end before the CTA exits. */
__device__ __forceinline__ void staged_rows_begin(int lane)
{
    if (lane < 16) bulk_wait_read<0>();
    __syncwarp();
}
/* w: this lane's 4 packed pairs of 8-column group j = 4g + jj (jj < 4) of its row lane/4 + 8h,
 * as the accumulator layout holds them; stored quad-transposed as one 16-byte chunk per lane. */
__device__ __forceinline__ void staged_rows_put(unsigned char *rows, int pitch, int lane, int h, int g,
                                                uint32_t (&w)[4])
{
    const int q = lane & 3;
    quad_transpose(w, q);
    *reinterpret_cast<uint4 *>(rows + ((lane >> 2) + 8 * h) * pitch + 16 * (4 * g + q)) =
        make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void staged_rows_flush(int lane, void *dst_l, uint32_t rows_s, int pitch,
                                                  uint32_t bytes)
{
    fence_proxy_async();
    __syncwarp();
    if (lane < 16) {
        if (dst_l) bulk_store(dst_l, rows_s + (uint32_t)(lane * pitch), bytes);
        bulk_commit();
    }
}
__device__ __forceinline__ void staged_rows_end(int lane)
{
    if (lane < 16) bulk_wait_all<0>();
}
#endif /* MOE_WG_DEVICE */

/* Per-device facts, cached: compute capability 9.0, SM count, opt-in shared memory. */
struct DevInfo {
    bool hopper;
    int sms;
    int smem_optin;
};

inline bool dev_info(DevInfo *out)
{
    constexpr int kMaxDev = 64;
    static DevInfo cache[kMaxDev];
    static int state[kMaxDev]; /* 0 unknown, 1 known (benign race: same values written) */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
        cudaGetLastError();
        return false;
    }
    if (dev < kMaxDev && __atomic_load_n(&state[dev], __ATOMIC_ACQUIRE)) {
        *out = cache[dev];
        return true;
    }
    int major = 0, minor = 0, sms = 0, optin = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    DevInfo d = {major == 9 && minor == 0, sms, optin};
    if (dev < kMaxDev) {
        cache[dev] = d;
        __atomic_store_n(&state[dev], 1, __ATOMIC_RELEASE);
    }
    *out = d;
    return true;
}

/* Whether this build holds the real sm_90a code of kernel Kern: the stub compiled for other
 * targets declares static shared memory, the real kernels use dynamic shared memory only.
 * Asked once per kernel. */
template <auto Kern> bool sm90a_kernel_built()
{
    static const bool real = []() {
        cudaFuncAttributes at;
        if (cudaFuncGetAttributes(&at, Kern) != cudaSuccess) {
            cudaGetLastError();
            return false;
        }
        return at.sharedSizeBytes == 0;
    }();
    return real;
}

} // namespace moe_wgp

#endif /* MOE_WGMMA_PTX_CUH */
