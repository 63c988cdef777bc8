/*
 * cpu_fused_elem.c — the row-wise stages around the GEMMs: the deterministic sum over k, the
 * SiLU-and-mul backward, and the backward of the two routing scalings (Qwen3's top-k weight
 * multiply in GEMM2's epilogue, Llama-4's input scaling in GEMM1's prologue).
 * Parallel over rows; each output is computed by one thread in a fixed order.
 */
#include <math.h>

#include "cpu_fused.h"
#include "cpu_fused_internal.h"

void cpu_sum_topk(moe_dtype dt, int T, int k, int N, const void *rows, const void *row_scale,
                  const void *add, void *out)
{
#pragma omp parallel for schedule(static) if (cf_par((int64_t)T * N * (k + 1)))
    for (int t = 0; t < T; t++) {
        size_t o = (size_t)t * N;
        for (int n = 0; n < N; n++) {
            float acc = add ? cf_load(dt, add, o + n) : 0.0f;
            for (int j = 0; j < k; j++) {
                size_t f = (size_t)t * k + j;
                float v = cf_load(dt, rows, f * N + n);
                if (row_scale) v *= cf_load(dt, row_scale, f);
                acc += v;
            }
            cf_store(dt, out, o + n, acc);
        }
    }
}

void cpu_silu_mul_backward(moe_dtype dt, int M, int I, const void *gu, const void *dact,
                           void *dgu)
{
#pragma omp parallel for schedule(static) if (cf_par((int64_t)M * I * 8))
    for (int r = 0; r < M; r++) {
        size_t g0 = (size_t)r * 2 * I, a0 = (size_t)r * I;
        for (int i = 0; i < I; i++) {
            float g = cf_load(dt, gu, g0 + i);
            float u = cf_load(dt, gu, g0 + I + i);
            float d = cf_load(dt, dact, a0 + i);
            float sig = 1.0f / (1.0f + expf(-g));
            float silu = g * sig;
            float dsilu = sig * (1.0f + g * (1.0f - sig)); /* d/dg of g*sigmoid(g) */
            cf_store(dt, dgu, g0 + i, d * u * dsilu);
            cf_store(dt, dgu, g0 + I + i, d * silu);
        }
    }
}

void cpu_topk_weight_backward(moe_dtype dt, int M, int I, const int32_t *gather_idx,
                              const void *act, const void *dA0, const void *topk_w, float *dw,
                              void *dact)
{
#pragma omp parallel for schedule(static) if (cf_par((int64_t)M * I * 2))
    for (int r = 0; r < M; r++) {
        size_t a0 = (size_t)r * I;
        int32_t f = gather_idx[r];
        float w = cf_load(dt, topk_w, (size_t)f);
        float dot = 0.0f;
        for (int i = 0; i < I; i++) {
            float d = cf_load(dt, dA0, a0 + i);
            dot += cf_load(dt, act, a0 + i) * d;
            cf_store(dt, dact, a0 + i, w * d);
        }
        dw[f] = dot;
    }
}

void cpu_scale_input_backward(moe_dtype dt, int T, int k, int H, const void *x, const void *dxs,
                              float *ds)
{
    int64_t flat = (int64_t)T * k;
#pragma omp parallel for schedule(static) if (cf_par(flat * H))
    for (int64_t f = 0; f < flat; f++) {
        size_t xr = (size_t)(f / k) * H, dr = (size_t)f * H;
        float dot = 0.0f;
        for (int h = 0; h < H; h++) dot += cf_load(dt, dxs, dr + h) * cf_load(dt, x, xr + h);
        ds[f] = dot;
    }
}
