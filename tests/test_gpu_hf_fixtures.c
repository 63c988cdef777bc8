/* test_gpu_hf_fixtures.c — the HuggingFace fixtures through `moe-ep forward/backward` on the
 * CUDA backend. Skipped without a GPU (fails instead with MOE_REQUIRE_GPU=1). */
#include "test_util.h"
#include "hf_fixtures.h"

static void test_hf_fixtures_cuda(void **state)
{
    (void)state;
    moe_hf_fixtures_run_all("cuda");
}

int main(void)
{
    int gpu = moe_test_require_gpu();
    if (gpu) return gpu;
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_hf_fixtures_cuda)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
