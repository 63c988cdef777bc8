/* test_gpu_hf_fixtures.c — the HuggingFace fixtures through `moe-ep forward/backward` on the
 * CUDA backend, with the fast defaults and with --exact-hf-rounding (HF's rounding points in
 * the Hopper kernels: x*score rounded before GEMM1, IEEE SiLU); each compared tensor's relative
 * error to HF's is printed for both. (The fixtures' H = 37 / 41 are not 16-byte rows: their
 * grouped GEMMs take the narrow mma.sync path, which always rounds where HF does, so both runs
 * agree here; the fast paths' distance from HF on the real shapes comes from `moe-ep check`,
 * docs/KERNELS.md.) Skipped without a GPU (fails instead with MOE_REQUIRE_GPU=1). */
#include "test_util.h"
#include "hf_fixtures.h"

static void test_hf_fixtures_cuda(void **state)
{
    (void)state;
    moe_hf_fixtures_run_all("cuda", NULL);
}

static void test_hf_fixtures_cuda_exact(void **state)
{
    (void)state;
    moe_hf_fixtures_run_all("cuda", "--exact-hf-rounding");
}

int main(void)
{
    int gpu = moe_test_require_gpu();
    if (gpu) return gpu;
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_hf_fixtures_cuda),
                                       cmocka_unit_test(test_hf_fixtures_cuda_exact)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
