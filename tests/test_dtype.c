/* test_dtype.c — bf16/fp16 conversions: rounding ties to even, NaN stays NaN, Inf, overflow,
 * subnormals, and the fp64 single-rounding path against exhaustive fp32 round trips. */
#include <math.h>
#include <string.h>

#include "test_util.h"
#include "dtype.h"

static float f_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static void test_bf16_ties_to_even(void **state)
{
    (void)state;
    /* 1.0 + half an ulp of bf16 (2^-8): tie, round to even (down to 1.0) */
    assert_int_equal(0x3f80, moe_f32_to_bf16(f_bits(0x3f808000u)));
    /* 1.0 + 1 bf16 ulp + half ulp: tie, round to even (up to 0x3f82) */
    assert_int_equal(0x3f82, moe_f32_to_bf16(f_bits(0x3f818000u)));
    /* just above the tie rounds up */
    assert_int_equal(0x3f81, moe_f32_to_bf16(f_bits(0x3f808001u)));
    /* negative values mirror */
    assert_int_equal(0xbf80, moe_f32_to_bf16(f_bits(0xbf808000u)));
}

static void test_bf16_specials(void **state)
{
    (void)state;
    assert_int_equal(0x7f80, moe_f32_to_bf16(INFINITY));
    assert_int_equal(0xff80, moe_f32_to_bf16(-INFINITY));
    /* a NaN whose payload sits only in the low bits must not become Inf */
    moe_bf16 n = moe_f32_to_bf16(f_bits(0x7f800001u));
    assert_true(isnan(moe_bf16_to_f32(n)));
    /* the largest finite float rounds to Inf in bf16 */
    assert_int_equal(0x7f80, moe_f32_to_bf16(f_bits(0x7f7fffffu)));
    /* subnormal survives */
    assert_int_equal(0x0001, moe_f32_to_bf16(f_bits(0x00010000u)));
    assert_true(moe_bf16_to_f32(0x0001) > 0.0f);
    /* signed zero */
    assert_int_equal(0x8000, moe_f32_to_bf16(-0.0f));
}

static void test_f16_edges(void **state)
{
    (void)state;
    assert_int_equal(0x3c00, moe_f32_to_f16(1.0f));
    assert_int_equal(0x7bff, moe_f32_to_f16(65504.0f));
    assert_int_equal(0x7c00, moe_f32_to_f16(65520.0f)); /* tie at max -> even -> Inf */
    assert_int_equal(0x7bff, moe_f32_to_f16(65519.0f));
    assert_int_equal(0xfc00, moe_f32_to_f16(-INFINITY));
    assert_true(isnan(moe_f16_to_f32(moe_f32_to_f16(NAN))));
    /* smallest subnormal 2^-24, and half of it ties to even (zero) */
    assert_int_equal(0x0001, moe_f32_to_f16(ldexpf(1.0f, -24)));
    assert_int_equal(0x0000, moe_f32_to_f16(ldexpf(1.0f, -25)));
    assert_int_equal(0x0002, moe_f32_to_f16(ldexpf(3.0f, -25))); /* 1.5 ulp -> 2 */
    /* 1 + 2^-11 is a tie between 1 and 1+2^-10: even -> 1 */
    assert_int_equal(0x3c00, moe_f32_to_f16(1.0f + ldexpf(1.0f, -11)));
    assert_int_equal(0x3c02, moe_f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)));
    assert_true(moe_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    assert_true(moe_f16_to_f32(0x03ff) == ldexpf(1023.0f, -24));
}

/* Every bf16 / f16 bit pattern survives a round trip through f32. */
static void test_round_trips_exhaustive(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = moe_bf16_to_f32((moe_bf16)h);
        if (isnan(f)) continue;
        assert_int_equal(h, moe_f32_to_bf16(f));
        float g = moe_f16_to_f32((moe_f16)h);
        if (isnan(g)) continue;
        assert_int_equal(h, moe_f32_to_f16(g));
    }
}

/* fp64 -> bf16 rounds once: a double just above a bf16 tie must round up even though its fp32
 * rounding lands exactly on the tie. */
static void test_f64_single_rounding(void **state)
{
    (void)state;
    double tie = 1.0 + ldexp(1.0, -8);
    assert_int_equal(0x3f80, moe_f64_to_bf16(tie));
    assert_int_equal(0x3f81, moe_f64_to_bf16(tie + ldexp(1.0, -40)));
    assert_int_equal(0x3f80, moe_f64_to_bf16(tie - ldexp(1.0, -40)));
    assert_true(moe_round_to(MOE_DTYPE_F64, 0.1) == 0.1);
    assert_true(moe_round_to(MOE_DTYPE_F32, 0.1) == (double)0.1f);
}

static void test_dtype_parse(void **state)
{
    (void)state;
    moe_dtype d;
    assert_true(moe_dtype_parse("bf16", &d));
    assert_int_equal(MOE_DTYPE_BF16, d);
    assert_true(moe_dtype_parse("float16", &d));
    assert_int_equal(MOE_DTYPE_F16, d);
    assert_false(moe_dtype_parse("int7", &d));
    assert_false(moe_dtype_parse(NULL, &d));
    assert_string_equal("fp32", moe_dtype_name(MOE_DTYPE_F32));
    assert_null(moe_dtype_name((moe_dtype)99));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_ties_to_even),  cmocka_unit_test(test_bf16_specials),
        cmocka_unit_test(test_f16_edges),          cmocka_unit_test(test_round_trips_exhaustive),
        cmocka_unit_test(test_f64_single_rounding), cmocka_unit_test(test_dtype_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
