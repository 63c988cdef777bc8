/* A kernel that cannot fit its launch bounds' registers (32 per thread at 1024 x 2): ptxas must
 * spill its 64 live values, which the project's no-spill flags turn into an error. */
__global__ void __launch_bounds__(1024, 2) moe_spill_probe(const float *in, float *out)
{
    float v[64];
#pragma unroll
    for (int i = 0; i < 64; i++) v[i] = in[threadIdx.x + i * 1024];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 64; i++)
#pragma unroll
        for (int j = 0; j < 64; j++) s += v[i] * v[(i * 7 + j) % 64];
    out[threadIdx.x] = s;
}
