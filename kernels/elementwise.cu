/*
 * elementwise.cu — the memory-bound kernels around the grouped GEMMs: the deterministic sum
 * over the k choices (with the shared expert's output and backward terms added in), SiLU-and-
 * mul forward (Llama-4's shared expert) and backward (with Qwen3's top-k weight gradient
 * fused in as a row dot product), and Llama-4's score-gradient row dot products.
 * Declarations and contracts: kernels/moe_kernels_aux.h. CPU twins: cpu_sum_topk,
 * cpu_silu_mul_backward (src/cpu/cpu_fused.h). Tested in tests/test_gpu_routing.c.
 *
 * Launch configuration
 *  - sum_topk / silu_mul: one thread per VEC consecutive columns (VEC*sizeof = 16 bytes when
 *    the width and the pointers allow, else 1), 256 threads per block. Every output element
 *    is summed by one thread in a fixed order (add, add2, j = 0..k-1): deterministic.
 *    Traffic for the Qwen3-30B sum at T=4096: reads T*k*H*2 = 128 MiB, writes 16 MiB.
 *  - silu_mul_backward / row_dot: one block of 128 threads per row (I = 768 bf16 is 96
 *    16-byte vectors, I = 8192 is 1024); the row dot is a per-thread sequential sum, then a
 *    butterfly in the warp, then the 4 warp sums in warp order.
 */
#include "moe_kernels_aux.h"
#include "moe_aux_device.cuh"

#include <climits>

using namespace moe_aux;

#define EW_THREADS 256
#define ROW_THREADS 128

static bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* ---- sum over k ---- */

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(EW_THREADS)
sum_topk_kernel(long long ntok, int k, int N, const scalar_t *__restrict__ rows,
                const scalar_t *__restrict__ row_scale, const scalar_t *__restrict__ add,
                const scalar_t *__restrict__ add2, const int32_t *__restrict__ ids, int begin,
                int El, scalar_t *__restrict__ out)
{
    typedef vec_t<scalar_t, VEC> V;
    const int nv = N / VEC;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= ntok * nv) return;
    const long long t = i / nv;
    const size_t col = (size_t)(i % nv) * VEC;
    float acc[VEC];
    if (add) {
        const V a = *(const V *)(add + (size_t)t * N + col);
#pragma unroll
        for (int v = 0; v < VEC; v++) acc[v] = to_f(a.v[v]);
    } else {
#pragma unroll
        for (int v = 0; v < VEC; v++) acc[v] = 0.f;
    }
    if (add2) {
        const V a = *(const V *)(add2 + (size_t)t * N + col);
#pragma unroll
        for (int v = 0; v < VEC; v++) acc[v] = __fadd_rn(acc[v], to_f(a.v[v]));
    }
    for (int j = 0; j < k; j++) {
        const long long f = t * k + j;
        if (ids) {
            const long long x = (long long)ids[f] - begin;
            if (x < 0 || x >= El) continue; /* another rank's expert: its row was not written */
        }
        const V r = *(const V *)(rows + (size_t)f * N + col);
        if (row_scale) {
            const float s = to_f(row_scale[f]);
#pragma unroll
            for (int v = 0; v < VEC; v++) acc[v] = __fadd_rn(acc[v], __fmul_rn(to_f(r.v[v]), s));
        } else {
#pragma unroll
            for (int v = 0; v < VEC; v++) acc[v] = __fadd_rn(acc[v], to_f(r.v[v]));
        }
    }
    V o;
#pragma unroll
    for (int v = 0; v < VEC; v++) o.v[v] = from_f<scalar_t>(acc[v]);
    *(V *)(out + (size_t)t * N + col) = o;
}

extern "C" moe_status moe_cuda_sum_topk(moe_dtype dt, int T, int k, int N, const void *rows,
                                        const void *row_scale, const void *add, const void *add2,
                                        const int32_t *topk_ids, int expert_begin, int El,
                                        void *out, cudaStream_t stream, moe_error *err)
{
    MOE_AUX_REQUIRE(moe_aux_float_dtype(dt), "moe_cuda_sum_topk: dtype %d is not bf16/fp16/fp32",
                    (int)dt);
    MOE_AUX_REQUIRE(T >= 0 && k >= 1 && N >= 1,
                    "moe_cuda_sum_topk: need T >= 0, k >= 1, N >= 1 (T=%d, k=%d, N=%d)", T, k, N);
    MOE_AUX_REQUIRE(!topk_ids || El >= 1, "moe_cuda_sum_topk: El = %d with a topk_ids filter", El);
    if (T == 0) return MOE_OK;
    MOE_AUX_REQUIRE(rows && out, "moe_cuda_sum_topk: rows and out are required");
    const size_t es = moe_dtype_size(dt);
    const int vec = (int)(16 / es);
    const bool can_vec = N % vec == 0 && aligned16(rows) && aligned16(out) &&
                         (!add || aligned16(add)) && (!add2 || aligned16(add2));
    MOE_AUX_DISPATCH(dt, {
        const scalar_t *r = (const scalar_t *)rows, *sc = (const scalar_t *)row_scale,
                       *a = (const scalar_t *)add, *a2 = (const scalar_t *)add2;
        scalar_t *o = (scalar_t *)out;
        if (can_vec) {
            constexpr int V = 16 / sizeof(scalar_t);
            const long long n = (long long)T * (N / V);
            sum_topk_kernel<scalar_t, V><<<(unsigned)((n + EW_THREADS - 1) / EW_THREADS), EW_THREADS,
                                           0, stream>>>(T, k, N, r, sc, a, a2, topk_ids,
                                                        expert_begin, El, o);
        } else {
            const long long n = (long long)T * N;
            sum_topk_kernel<scalar_t, 1><<<(unsigned)((n + EW_THREADS - 1) / EW_THREADS), EW_THREADS,
                                           0, stream>>>(T, k, N, r, sc, a, a2, topk_ids,
                                                        expert_begin, El, o);
        }
    });
    MOE_AUX_CHECK_LAUNCH("sum_topk_kernel");
    return MOE_OK;
}

/* ---- SiLU-and-mul forward ---- */

/* The twin's silu (cpu_fused_gemm.c), each op rounded. */
__device__ __forceinline__ float silu_f(float g) { return __fdiv_rn(g, __fadd_rn(1.f, expf(-g))); }

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(EW_THREADS)
silu_mul_kernel(long long M, int I, const scalar_t *__restrict__ gu, scalar_t *__restrict__ act)
{
    typedef vec_t<scalar_t, VEC> V;
    const int nv = I / VEC;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * nv) return;
    const long long m = i / nv;
    const size_t col = (size_t)(i % nv) * VEC;
    const V g = *(const V *)(gu + (size_t)m * 2 * I + col);
    const V u = *(const V *)(gu + (size_t)m * 2 * I + I + col);
    V o;
#pragma unroll
    for (int v = 0; v < VEC; v++) o.v[v] = from_f<scalar_t>(__fmul_rn(silu_f(to_f(g.v[v])), to_f(u.v[v])));
    *(V *)(act + (size_t)m * I + col) = o;
}

extern "C" moe_status moe_cuda_silu_mul(moe_dtype dt, int M, int I, const void *gu, void *act,
                                        cudaStream_t stream, moe_error *err)
{
    MOE_AUX_REQUIRE(moe_aux_float_dtype(dt), "moe_cuda_silu_mul: dtype %d is not bf16/fp16/fp32",
                    (int)dt);
    MOE_AUX_REQUIRE(M >= 0 && I >= 1, "moe_cuda_silu_mul: need M >= 0, I >= 1 (M=%d, I=%d)", M, I);
    if (M == 0) return MOE_OK;
    MOE_AUX_REQUIRE(gu && act, "moe_cuda_silu_mul: gu and act are required");
    const int vec = (int)(16 / moe_dtype_size(dt));
    const bool can_vec = I % vec == 0 && aligned16(gu) && aligned16(act);
    MOE_AUX_DISPATCH(dt, {
        if (can_vec) {
            constexpr int V = 16 / sizeof(scalar_t);
            const long long n = (long long)M * (I / V);
            silu_mul_kernel<scalar_t, V><<<(unsigned)((n + EW_THREADS - 1) / EW_THREADS), EW_THREADS,
                                           0, stream>>>(M, I, (const scalar_t *)gu, (scalar_t *)act);
        } else {
            const long long n = (long long)M * I;
            silu_mul_kernel<scalar_t, 1><<<(unsigned)((n + EW_THREADS - 1) / EW_THREADS), EW_THREADS,
                                           0, stream>>>(M, I, (const scalar_t *)gu, (scalar_t *)act);
        }
    });
    MOE_AUX_CHECK_LAUNCH("silu_mul_kernel");
    return MOE_OK;
}

/* ---- SiLU-and-mul backward (+ Qwen3 weight gradient) ---- */

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(ROW_THREADS)
silu_mul_bwd_kernel(const int32_t *__restrict__ m_dev, int I, const scalar_t *__restrict__ gu,
                    const scalar_t *__restrict__ dact, const scalar_t *__restrict__ row_scale,
                    const int32_t *__restrict__ gather, const scalar_t *__restrict__ act,
                    float *__restrict__ dw_out, scalar_t *__restrict__ dgu)
{
    __shared__ float red[ROW_THREADS / 32];
    typedef vec_t<scalar_t, VEC> V;
    const long long r = blockIdx.x;
    if (m_dev && r >= *m_dev) return; /* block-uniform */
    const float sc = row_scale ? to_f(row_scale[gather[r]]) : 1.f;
    const scalar_t *grow = gu + (size_t)r * 2 * I, *urow = grow + I;
    const scalar_t *drow = dact + (size_t)r * I;
    scalar_t *dg_row = dgu + (size_t)r * 2 * I, *du_row = dg_row + I;
    float dot = 0.f;
    for (int c = threadIdx.x * VEC; c < I; c += blockDim.x * VEC) {
        const V g = *(const V *)(grow + c), u = *(const V *)(urow + c), d = *(const V *)(drow + c);
        V a = {};
        if (dw_out) a = *(const V *)(act + (size_t)r * I + c);
        V og, ou;
#pragma unroll
        for (int v = 0; v < VEC; v++) {
            float da = to_f(d.v[v]);
            if (dw_out) dot += to_f(a.v[v]) * da;
            if (row_scale) da = round_to<scalar_t>(__fmul_rn(sc, da)); /* HF rounds w * grad */
            /* The twin's expressions in its order, each op rounded (no FMA contraction). */
            const float gg = to_f(g.v[v]), uu = to_f(u.v[v]);
            const float s = __fdiv_rn(1.f, __fadd_rn(1.f, expf(-gg)));
            const float silu = __fmul_rn(gg, s);
            const float dsilu = __fmul_rn(s, __fadd_rn(1.f, __fmul_rn(gg, __fsub_rn(1.f, s))));
            og.v[v] = from_f<scalar_t>(__fmul_rn(__fmul_rn(da, uu), dsilu));
            ou.v[v] = from_f<scalar_t>(__fmul_rn(da, silu));
        }
        *(V *)(dg_row + c) = og;
        *(V *)(du_row + c) = ou;
    }
    if (dw_out) { /* block-uniform */
        const float tot = block_sum_to_thread0(dot, red);
        if (threadIdx.x == 0) dw_out[gather[r]] = tot;
    }
}

extern "C" moe_status moe_cuda_silu_mul_backward(moe_dtype dt, int max_rows, const int32_t *m_dev,
                                                 int I, const void *gu, const void *dact,
                                                 const void *row_scale, const int32_t *gather_idx,
                                                 const void *act, float *dw_out, void *dgu,
                                                 cudaStream_t stream, moe_error *err)
{
    MOE_AUX_REQUIRE(moe_aux_float_dtype(dt),
                    "moe_cuda_silu_mul_backward: dtype %d is not bf16/fp16/fp32", (int)dt);
    MOE_AUX_REQUIRE(max_rows >= 0 && I >= 1,
                    "moe_cuda_silu_mul_backward: need max_rows >= 0, I >= 1 (%d, %d)", max_rows, I);
    if (max_rows == 0) return MOE_OK;
    MOE_AUX_REQUIRE(gu && dact && dgu, "moe_cuda_silu_mul_backward: gu, dact and dgu are required");
    MOE_AUX_REQUIRE(!(row_scale || dw_out) || gather_idx,
                    "moe_cuda_silu_mul_backward: gather_idx is required with row_scale or dw_out");
    MOE_AUX_REQUIRE(!dw_out || act, "moe_cuda_silu_mul_backward: act is required with dw_out");
    const int vec = (int)(16 / moe_dtype_size(dt));
    const bool can_vec = I % vec == 0 && aligned16(gu) && aligned16(dact) && aligned16(dgu) &&
                         (!act || aligned16(act));
    MOE_AUX_DISPATCH(dt, {
        const scalar_t *g = (const scalar_t *)gu, *d = (const scalar_t *)dact,
                       *sc = (const scalar_t *)row_scale, *a = (const scalar_t *)act;
        scalar_t *o = (scalar_t *)dgu;
        if (can_vec) {
            constexpr int V = 16 / sizeof(scalar_t);
            silu_mul_bwd_kernel<scalar_t, V><<<(unsigned)max_rows, ROW_THREADS, 0, stream>>>(
                m_dev, I, g, d, sc, gather_idx, a, dw_out, o);
        } else {
            silu_mul_bwd_kernel<scalar_t, 1><<<(unsigned)max_rows, ROW_THREADS, 0, stream>>>(
                m_dev, I, g, d, sc, gather_idx, a, dw_out, o);
        }
    });
    MOE_AUX_CHECK_LAUNCH("silu_mul_bwd_kernel");
    return MOE_OK;
}

/* ---- row dot products (Llama-4 score gradient) ---- */

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(ROW_THREADS)
row_dot_kernel(int N, const scalar_t *__restrict__ A, int a_row_div, const scalar_t *__restrict__ B,
               const int32_t *__restrict__ ids, int begin, int El, float *__restrict__ out)
{
    __shared__ float red[ROW_THREADS / 32];
    typedef vec_t<scalar_t, VEC> V;
    const long long f = blockIdx.x;
    if (ids) {
        const long long x = (long long)ids[f] - begin;
        if (x < 0 || x >= El) { /* block-uniform */
            if (threadIdx.x == 0) out[f] = 0.f;
            return;
        }
    }
    const scalar_t *arow = A + (size_t)(f / a_row_div) * N, *brow = B + (size_t)f * N;
    float dot = 0.f;
    for (int c = threadIdx.x * VEC; c < N; c += blockDim.x * VEC) {
        const V a = *(const V *)(arow + c), b = *(const V *)(brow + c);
#pragma unroll
        for (int v = 0; v < VEC; v++) dot += to_f(a.v[v]) * to_f(b.v[v]);
    }
    const float tot = block_sum_to_thread0(dot, red);
    if (threadIdx.x == 0) out[f] = tot;
}

extern "C" moe_status moe_cuda_row_dot(moe_dtype dt, int R, int N, const void *A, int a_row_div,
                                       const void *B, const int32_t *topk_ids, int expert_begin,
                                       int El, float *out, cudaStream_t stream, moe_error *err)
{
    MOE_AUX_REQUIRE(moe_aux_float_dtype(dt), "moe_cuda_row_dot: dtype %d is not bf16/fp16/fp32",
                    (int)dt);
    MOE_AUX_REQUIRE(R >= 0 && N >= 1 && a_row_div >= 1,
                    "moe_cuda_row_dot: need R >= 0, N >= 1, a_row_div >= 1 (%d, %d, %d)", R, N,
                    a_row_div);
    MOE_AUX_REQUIRE(!topk_ids || El >= 1, "moe_cuda_row_dot: El = %d with a topk_ids filter", El);
    if (R == 0) return MOE_OK;
    MOE_AUX_REQUIRE(A && B && out, "moe_cuda_row_dot: A, B and out are required");
    const int vec = (int)(16 / moe_dtype_size(dt));
    const bool can_vec = N % vec == 0 && aligned16(A) && aligned16(B);
    MOE_AUX_DISPATCH(dt, {
        const scalar_t *a = (const scalar_t *)A, *b = (const scalar_t *)B;
        if (can_vec) {
            constexpr int V = 16 / sizeof(scalar_t);
            row_dot_kernel<scalar_t, V><<<(unsigned)R, ROW_THREADS, 0, stream>>>(
                N, a, a_row_div, b, topk_ids, expert_begin, El, out);
        } else {
            row_dot_kernel<scalar_t, 1><<<(unsigned)R, ROW_THREADS, 0, stream>>>(
                N, a, a_row_div, b, topk_ids, expert_begin, El, out);
        }
    });
    MOE_AUX_CHECK_LAUNCH("row_dot_kernel");
    return MOE_OK;
}
