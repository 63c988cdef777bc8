/*
 * grouped_gemm_wgmma_epilogue.cuh — the device helpers of grouped_gemm_wgmma.cu's kernel that
 * produce its results: SiLU and SiLU-and-mul packing, the epilogue straight from the
 * accumulators (quad transpose, scale_c_rows, permute_y scatter), the staged epilogue through
 * shared memory and bulk copies, and the B-tile loader. Not a standalone header: included once,
 * by grouped_gemm_wgmma.cu, inside its anonymous namespace and its MOE_WG_DEVICE section, after
 * WgParams, WgTile and wg_store2, whose names and constants these use (split out to keep each
 * file readable; the compiled code is the same).
 */
#ifndef MOE_GROUPED_GEMM_WGMMA_EPILOGUE_CUH
#define MOE_GROUPED_GEMM_WGMMA_EPILOGUE_CUH

/* SiLU in the epilogue: g * sigmoid(g) with the hardware exp2 and reciprocal (__expf,
 * __fdividef: two MUFU operations, a few ulp of fp32, far below the bf16/fp16 rounding that
 * follows), instead of silu_f's IEEE expf and division (a dozen instructions more per output,
 * 16384 outputs per tile, all while the tensor cores wait). exact = the IEEE form, for A/B.
 * g -> -inf: __expf overflows to inf and the quotient is -0, the right limit. */
__device__ __forceinline__ float silu_wg(float g, int exact)
{
    return exact ? silu_f(g) : __fdividef(g, 1.0f + __expf(-g));
}

/* SiLU-and-mul's packed outputs of 8-column group j = 4g + jj of row h (pack_acc_group's
 * layout): silu(gate) * up of gate group i and up group i + BN/16, and the rounded gate and up
 * themselves (C_preact; dropped by the compiler where not stored). One definition for the
 * register and the staged epilogue. */
template <typename T, int BN>
__device__ __forceinline__ void wg_pack_silu(const float (&acc)[BN / 2], int g, int h, int exact,
                                             uint32_t (&wc)[4], uint32_t (&wg_)[4], uint32_t (&wu)[4])
{
#pragma unroll
    for (int jj = 0; jj < 4; jj++) {
        const int i = 4 * g + jj;
        const float g0 = acc[4 * i + 2 * h], g1 = acc[4 * i + 2 * h + 1];
        const float u0 = acc[4 * (i + BN / 16) + 2 * h];
        const float u1 = acc[4 * (i + BN / 16) + 2 * h + 1];
        wc[jj] = pack2<T>(make_float2(silu_wg(g0, exact) * u0, silu_wg(g1, exact) * u1));
        wg_[jj] = pack2<T>(make_float2(g0, g1));
        wu[jj] = pack2<T>(make_float2(u0, u1));
    }
}

/* Epilogue of one m64 block from its accumulators (acc[4i + 2h + q]: row lane/4 + 8h, column
 * 8i + 2(lane%4) + q of this warp's 16 rows). crow[h] < 0: row not stored. Warp-uniform call
 * (the vector path shuffles). vec: the quad-transposed 16-byte stores (rows 16-byte aligned,
 * n_out % 8 == 0); otherwise 4-byte pairs as before. Same values and rounding either way. */
template <typename T, int BN>
__device__ __forceinline__ void wg_epilogue(const WgParams &p, const float (&acc)[BN / 2],
                                            const int (&crow)[2], const float (&csc)[2],
                                            const volatile int *col_tile_at, int lane, bool cvec,
                                            bool pvec)
{
    /* the column tile is read from shared memory where it is used (volatile): held in a
     * register across the epilogue it was the one value ptxas spilled (b_kn kernels) */
    T *C = static_cast<T *>(p.C);
    const int q = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const bool live = crow[h] >= 0;
        const int64_t rw = live ? crow[h] : 0;
        if (!p.silu) {
            T *cr = C + rw * p.n_out;
            if (cvec) {
#pragma unroll
                for (int g = 0; g < BN / 32; g++) {
                    uint32_t w[4];
                    pack_acc_group<T, BN / 2>(acc, g, h, csc[h], w);
                    quad_transpose(w, q);
                    const int col = *col_tile_at * BN + 8 * (4 * g + q);
                    if (live && col < p.n_out)
                        *reinterpret_cast<uint4 *>(cr + col) = make_uint4(w[0], w[1], w[2], w[3]);
                }
            } else if (live) {
#pragma unroll
                for (int i = 0; i < BN / 8; i++) {
                    const int col = *col_tile_at * BN + 8 * i + 2 * q;
                    wg_store2<T>(cr, col, p.n_out, p.c_pair, acc[4 * i + 2 * h] * csc[h],
                                 acc[4 * i + 2 * h + 1] * csc[h]);
                }
            }
        } else {
            const int I = p.n_out;
            T *cr = C + rw * I;
            T *pr = p.C_preact ? static_cast<T *>(p.C_preact) + rw * 2 * I : nullptr;
            if (cvec && (pvec || !pr)) {
#pragma unroll
                for (int g = 0; g < BN / 64; g++) {
                    uint32_t wc[4], wg_[4], wu[4];
                    wg_pack_silu<T, BN>(acc, g, h, p.exact_silu, wc, wg_, wu);
                    const int j = *col_tile_at * (BN / 2) + 8 * (4 * g + q);
                    quad_transpose(wc, q);
                    if (live && j < I)
                        *reinterpret_cast<uint4 *>(cr + j) = make_uint4(wc[0], wc[1], wc[2], wc[3]);
                    if (pr) {
                        quad_transpose(wg_, q);
                        quad_transpose(wu, q);
                        if (live && j < I) {
                            *reinterpret_cast<uint4 *>(pr + j) = make_uint4(wg_[0], wg_[1], wg_[2], wg_[3]);
                            *reinterpret_cast<uint4 *>(pr + I + j) = make_uint4(wu[0], wu[1], wu[2], wu[3]);
                        }
                    }
                }
            } else if (live) {
#pragma unroll
                for (int i = 0; i < BN / 16; i++) {
                    const int j = *col_tile_at * (BN / 2) + 8 * i + 2 * q;
                    const float g0 = acc[4 * i + 2 * h], g1 = acc[4 * i + 2 * h + 1];
                    const float u0 = acc[4 * (i + BN / 16) + 2 * h];
                    const float u1 = acc[4 * (i + BN / 16) + 2 * h + 1];
                    wg_store2<T>(cr, j, I, p.c_pair, silu_wg(g0, p.exact_silu) * u0,
                                 silu_wg(g1, p.exact_silu) * u1);
                    if (pr) {
                        wg_store2<T>(pr, j, I, p.p_pair, g0, g1);
                        wg_store2<T>(pr + I, j, I, p.p_pair, u0, u1);
                    }
                }
            }
        }
    }
}

/* The staged epilogue of one m64 block (WgParams.out_pitch > 0): the warp writes its 16 rows'
 * rounded outputs (pack_acc_group, wg_pack_silu: the values of wg_epilogue) into its own 16 rows of the shared
 * output tile, `rows` (generic address) / `rows_s` (shared address), `pitch` bytes apart, with
 * the same quad-transposed 16-byte stores; then 16 of its lanes each hand one row to a 1-D bulk
 * copy into C (to row crow, so permute_y's scatter costs nothing extra) and the warp goes back
 * to the MMAs while the copies run. The rows are the warp's own: the only wait is for its
 * previous tile's copies to have read them, a tile of MMAs later. Needs 16-byte-aligned C rows
 * (n_out % 8 == 0) and no C_preact. */
template <typename T, int BN>
__device__ __forceinline__ void wg_epilogue_staged(const WgParams &p, const float (&acc)[BN / 2],
                                                   const int (&crow)[2], const float (&csc)[2],
                                                   const volatile int *col_tile_at, int lane,
                                                   unsigned char *rows, uint32_t rows_s, int pitch)
{
    staged_rows_begin(lane);
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (!p.silu) {
#pragma unroll
            for (int g = 0; g < BN / 32; g++) {
                uint32_t w[4];
                pack_acc_group<T, BN / 2>(acc, g, h, csc[h], w);
                staged_rows_put(rows, pitch, lane, h, g, w);
            }
        } else {
#pragma unroll
            for (int g = 0; g < BN / 64; g++) {
                uint32_t wc[4], wg_[4], wu[4];
                wg_pack_silu<T, BN>(acc, g, h, p.exact_silu, wc, wg_, wu);
                staged_rows_put(rows, pitch, lane, h, g, wc);
            }
        }
    }
    /* lane l < 16 copies row l: held (crow) by lane 4 (l % 8), as its h = l / 8 */
    const int l = lane & 15;
    const int c0 = __shfl_sync(0xffffffffu, crow[0], 4 * (l & 7));
    const int c1 = __shfl_sync(0xffffffffu, crow[1], 4 * (l & 7));
    const int row = l < 8 ? c0 : c1;
    const int width = p.silu ? BN / 2 : BN; /* outputs per tile row */
    const int col0 = *col_tile_at * width;
    const int n = min(width, p.n_out - col0); /* a multiple of 8: n_out % 8 == 0 */
    T *dst = row >= 0 && n > 0 ? static_cast<T *>(p.C) + (int64_t)row * p.n_out + col0 : nullptr;
    staged_rows_flush(lane, dst, rows_s, pitch, (uint32_t)n * 2);
}

/* Thread 0 of the producer: the B tile of stage `dst` for tile tl, k step kt, completing on
 * `bar`. Two boxes of BN/2 rows: with SiLU the gate rows j0.. and the up rows I + j0.., else the
 * two halves of the BN rows; CL = 1 loads both, with CL = 2 CTA `rank` loads box `rank` and
 * multicasts it to the pair. b_kn: BN/64 boxes of 64 columns x 64 k rows per half, from the
 * 3-D map [E][K][N]. */
template <int BN, int CL, bool BKN>
__device__ __forceinline__ void wg_load_b(const CUtensorMap *tmap, const WgParams &p, uint32_t dst,
                                          const WgTile &tl, int kt, int rank, uint32_t bar, bool hint,
                                          uint64_t pol)
{
    constexpr uint32_t B_BYTES = BN * WG_BK * 2;
    const int brow = tl.expert * p.N + tl.col * (p.silu ? BN / 2 : BN);
    const int box_step = p.silu ? p.N / 2 : BN / 2;
    const int box_lo = CL > 1 ? rank : 0, box_hi = CL > 1 ? rank + 1 : 2;
    for (int b = box_lo; b < box_hi; b++) {
        if (BKN) {
            /* half b: columns n0.. (gate or up with SiLU), 64 per box */
            const int n0 = p.silu ? b * (p.N / 2) + tl.col * (BN / 2) : tl.col * BN + b * (BN / 2);
#pragma unroll
            for (int j = 0; j < BN / 128; j++)
                tma_load_3d(dst + b * (B_BYTES / 2) + j * WG_KN_BOX_BYTES, tmap, n0 + 64 * j, kt * WG_BK,
                            tl.expert, bar, hint, pol);
        } else if (CL > 1)
            tma_load_2d_multicast(dst + b * (B_BYTES / 2), tmap, kt * WG_BK, brow + b * box_step, bar,
                                  (1u << CL) - 1);
        else if (hint)
            tma_load_2d_hint(dst + b * (B_BYTES / 2), tmap, kt * WG_BK, brow + b * box_step, bar, pol);
        else
            tma_load_2d(dst + b * (B_BYTES / 2), tmap, kt * WG_BK, brow + b * box_step, bar);
    }
}

#endif /* MOE_GROUPED_GEMM_WGMMA_EPILOGUE_CUH */
