/* test_hf_fixtures.c — `moe-ep forward` and `moe-ep backward` on the CPU backend against the
 * outputs and autograd gradients of the real HuggingFace modules (tests/fixtures/hf). */
#include "test_util.h"
#include "hf_fixtures.h"

static void test_hf_fixtures_cpu(void **state)
{
    (void)state;
    moe_hf_fixtures_run_all("cpu", NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_hf_fixtures_cpu)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
