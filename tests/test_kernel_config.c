/*
 * test_kernel_config.c — grouped-GEMM kernel configuration strings (src/cuda/kernel_config.c):
 * parse, print, validate against the compiled list, resolve partial and automatic requests,
 * and the wgmma run-time options (",staged" / ",direct" epilogue, ",atma" / ",acp" A load):
 * accepted only with ",tma", kept through resolution, printed back, repeated or unknown ones
 * rejected. Host code only: runs without a GPU (CI), on every CUDA build; exit 77 (skip) on a
 * build without CUDA, which has no grouped-GEMM kernels to configure.
 */
#include "test_util.h"

#include <stdio.h>
#include <string.h>

#ifdef MOE_HAVE_CUDA
#include "cuda/kernel_config.h"
#include "moe_kernels.h"

static const moe_dtype k_dtypes[3] = {MOE_DTYPE_BF16, MOE_DTYPE_F16, MOE_DTYPE_F32};

static void test_config_strings(void **state)
{
    (void)state;
    moe_kernel_config c;
    moe_error err;
    char buf[64];
    moe_error_clear(&err);
    assert_int_equal(moe_kernel_config_parse("128x128x32,w8,s3", &c, &err), MOE_OK);
    assert_int_equal(c.tile_m, 128);
    assert_int_equal(c.tile_n, 128);
    assert_int_equal(c.tile_k, 32);
    assert_int_equal(c.warps, 8);
    assert_int_equal(c.stages, 3);
    assert_int_equal(c.use_tma, 0);
    assert_string_equal(moe_kernel_config_str(&c, buf, sizeof buf), "128x128x32,w8,s3");
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_BF16, &err), MOE_OK);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_F16, &err), MOE_OK);
    /* fp32 runs the FFMA kernels: the tensor-core tiles are not valid there */
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_F32, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "64x64x16"));

    /* ",tma" names the Hopper wgmma configurations; an mma.sync tile with ",tma" is not one */
    assert_int_equal(moe_kernel_config_parse("128x128x64,w8,s3,tma", &c, &err), MOE_OK);
    assert_int_equal(c.use_tma, 1);
    moe_error_clear(&err);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_BF16, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "128x256x64,w12,s4,tma"));
    assert_int_equal(moe_kernel_config_parse("128x256x64,w12,s4,tma", &c, &err), MOE_OK);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_BF16, &err), MOE_OK);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_F16, &err), MOE_OK);
    moe_error_clear(&err);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_F32, &err), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_kernel_config_parse("128x256x64,w12,s4", &c, &err), MOE_OK);
    moe_error_clear(&err);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_BF16, &err), MOE_ERR_INVALID_ARG);
    {
        moe_kernel_config req, got;
        assert_int_equal(moe_kernel_config_parse("128x128x64,tma", &req, &err), MOE_OK);
        assert_int_equal(moe_kernel_config_resolve(&req, MOE_DTYPE_BF16, 0, &got, &err), MOE_OK);
        assert_int_equal(got.use_tma, 1);
        assert_int_equal(got.warps, 12);
        assert_int_equal(moe_kernel_config_parse("128x128x64", &req, &err), MOE_OK);
        assert_int_equal(moe_kernel_config_resolve(&req, MOE_DTYPE_BF16, 0, &got, &err), MOE_OK);
        assert_int_equal(got.use_tma, 0);
        /* the automatic choice: wgmma for bf16/fp16 with enough rows per expert */
        assert_int_equal(moe_kernel_config_resolve(NULL, MOE_DTYPE_BF16, 256, &got, &err), MOE_OK);
        assert_int_equal(got.use_tma, 1);
        assert_int_equal(moe_kernel_config_resolve(NULL, MOE_DTYPE_F16, 256, &got, &err), MOE_OK);
        assert_int_equal(got.use_tma, 1);
        assert_int_equal(moe_kernel_config_resolve(NULL, MOE_DTYPE_BF16, 4, &got, &err), MOE_OK);
        assert_int_equal(got.use_tma, 0);
        assert_int_equal(moe_kernel_config_resolve(NULL, MOE_DTYPE_F32, 256, &got, &err), MOE_OK);
        assert_int_equal(got.use_tma, 0);
        /* the default takes no CTA pairs (",c2" measured slower); a request can */
        assert_int_equal(moe_kernel_config_resolve(NULL, MOE_DTYPE_BF16, 4096, &got, &err), MOE_OK);
        assert_int_equal(got.cluster, 0);
        assert_int_equal(got.use_tma, 1);
        assert_int_equal(moe_kernel_config_parse("128x256x64,w12,s4,tma,c2", &req, &err), MOE_OK);
        assert_int_equal(req.cluster, 2);
        assert_string_equal(moe_kernel_config_str(&req, buf, sizeof buf), "128x256x64,w12,s4,tma,c2");
        assert_int_equal(moe_kernel_config_resolve(&req, MOE_DTYPE_BF16, 0, &got, &err), MOE_OK);
        assert_int_equal(got.cluster, 2);
        /* ",c1" is the unclustered kernel, the same as no cluster field */
        assert_int_equal(moe_kernel_config_parse("128x256x64,tma,c1", &req, &err), MOE_OK);
        assert_int_equal(moe_kernel_config_resolve(&req, MOE_DTYPE_BF16, 0, &got, &err), MOE_OK);
        assert_int_equal(got.cluster, 0);
        assert_int_equal(got.stages, 4);
        /* no mma.sync configuration is clustered */
        assert_int_equal(moe_kernel_config_parse("128x128x64,w8,s3,c2", &req, &err), MOE_OK);
        moe_error_clear(&err);
        assert_int_equal(moe_kernel_config_resolve(&req, MOE_DTYPE_BF16, 0, &got, &err),
                         MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(err.msg, "128x256x64,w12,s4,tma,c2"));
        got = moe_kernel_config_default_mma(MOE_DTYPE_BF16, 256);
        assert_int_equal(got.use_tma, 0);
        assert_int_equal(moe_kernel_config_validate(&got, MOE_DTYPE_BF16, &err), MOE_OK);
        got = moe_kernel_config_default_mma(MOE_DTYPE_F32, 256);
        assert_int_equal(moe_kernel_config_validate(&got, MOE_DTYPE_F32, &err), MOE_OK);
    }

    assert_int_equal(moe_kernel_config_parse("auto", &c, &err), MOE_OK);
    assert_int_equal(c.tile_m, 0);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_F32, &err), MOE_OK);
    /* partial: the first compiled match */
    assert_int_equal(moe_kernel_config_parse("64x64x32", &c, &err), MOE_OK);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_BF16, &err), MOE_OK);

    const char *bad[] = {"128x128", "128x128x32,w", "128x128x32,q3", "x128x32", "128x128x32,w8,w8",
                         "128x128x32 ", "-1x128x32", "128x128x32,s0", "128x256x64,tma,c3",
                         "128x256x64,tma,c2,c2", "128x256x64,tma,c"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        moe_error_clear(&err);
        assert_int_equal(moe_kernel_config_parse(bad[i], &c, &err), MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(err.msg, "e.g."));
    }
    assert_int_equal(moe_kernel_config_parse("96x128x32,w8,s3", &c, &err), MOE_OK);
    moe_error_clear(&err);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_BF16, &err), MOE_ERR_INVALID_ARG);
    fprintf(stderr, "validate: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "valid:"));

    /* every listed configuration round-trips through its string */
    for (int d = 0; d < 3; d++) {
        const moe_kernel_config *list;
        int n = moe_kernel_configs(k_dtypes[d], &list);
        for (int i = 0; i < n; i++) {
            moe_kernel_config r;
            assert_int_equal(moe_kernel_config_parse(moe_kernel_config_str(&list[i], buf, sizeof buf),
                                                     &r, &err), MOE_OK);
            assert_memory_equal(&r, &list[i], sizeof r);
            assert_int_equal(moe_kernel_config_validate(&r, k_dtypes[d], &err), MOE_OK);
        }
    }
}


/* The wgmma options: parsed, printed back, kept by resolve, rejected without ",tma". */
static void test_wgmma_options(void **state)
{
    (void)state;
    moe_kernel_config c, got;
    moe_error err;
    char buf[64];
    moe_error_clear(&err);
    struct {
        const char *text;
        int epilogue, a_load;
    } ok[] = {
        {"128x256x64,w12,s4,tma", MOE_GG_EPILOGUE_AUTO, MOE_GG_A_AUTO},
        {"128x256x64,w12,s4,tma,staged", MOE_GG_EPILOGUE_STAGED, MOE_GG_A_AUTO},
        {"128x256x64,w12,s4,tma,direct", MOE_GG_EPILOGUE_DIRECT, MOE_GG_A_AUTO},
        {"128x256x64,w12,s4,tma,atma", MOE_GG_EPILOGUE_AUTO, MOE_GG_A_TMA},
        {"128x256x64,w12,s3,tma,staged,acp", MOE_GG_EPILOGUE_STAGED, MOE_GG_A_CPASYNC},
        {"128x256x64,w12,s4,tma,c2,direct,atma", MOE_GG_EPILOGUE_DIRECT, MOE_GG_A_TMA},
        {"128x128x64,w12,s6,tma,staged,atma", MOE_GG_EPILOGUE_STAGED, MOE_GG_A_TMA},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        assert_int_equal(moe_kernel_config_parse(ok[i].text, &c, &err), MOE_OK);
        assert_int_equal(c.epilogue, ok[i].epilogue);
        assert_int_equal(c.a_load, ok[i].a_load);
        assert_string_equal(moe_kernel_config_str(&c, buf, sizeof buf), ok[i].text);
        for (int d = 0; d < 2; d++) { /* bf16, fp16 */
            assert_int_equal(moe_kernel_config_resolve(&c, k_dtypes[d], 0, &got, &err), MOE_OK);
            assert_int_equal(got.use_tma, 1);
            assert_int_equal(got.epilogue, ok[i].epilogue);
            assert_int_equal(got.a_load, ok[i].a_load);
            assert_int_equal(moe_kernel_config_validate(&c, k_dtypes[d], &err), MOE_OK);
        }
    }
    /* the options in any order, and with a partial request: the first listed match */
    assert_int_equal(moe_kernel_config_parse("128x256x64,atma,tma,staged", &c, &err), MOE_OK);
    assert_int_equal(moe_kernel_config_resolve(&c, MOE_DTYPE_BF16, 0, &got, &err), MOE_OK);
    assert_string_equal(moe_kernel_config_str(&got, buf, sizeof buf),
                        "128x256x64,w12,s4,tma,staged,atma");

    /* options need a wgmma configuration: on mma.sync or fp32 tiles they are an error */
    const char *no_tma[] = {"128x128x64,w8,s3,staged", "128x128x64,w8,s3,atma",
                            "128x128x64,w8,s3,notma,direct"};
    for (size_t i = 0; i < sizeof no_tma / sizeof no_tma[0]; i++) {
        assert_int_equal(moe_kernel_config_parse(no_tma[i], &c, &err), MOE_OK);
        moe_error_clear(&err);
        assert_int_equal(moe_kernel_config_resolve(&c, MOE_DTYPE_BF16, 0, &got, &err),
                         MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(err.msg, "kernel config 128x128x64,w8,s3,")); /* names the request */
        assert_non_null(strstr(err.msg, "which are: 128x256x64,w12,s4,tma")); /* what takes them */
    }
    assert_int_equal(moe_kernel_config_parse("64x64x16,staged", &c, &err), MOE_OK);
    moe_error_clear(&err);
    assert_int_equal(moe_kernel_config_validate(&c, MOE_DTYPE_F32, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "none for fp32"));

    /* repeated, conflicting or misspelt options */
    const char *bad[] = {"128x256x64,tma,staged,direct", "128x256x64,tma,staged,staged",
                         "128x256x64,tma,atma,acp",      "128x256x64,tma,stage",
                         "128x256x64,tma,atm",           "128x256x64,tma,stagedx",
                         "128x256x64,tma,,staged",       "128x256x64,tma,staged,"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        moe_error_clear(&err);
        assert_int_equal(moe_kernel_config_parse(bad[i], &c, &err), MOE_ERR_INVALID_ARG);
        assert_non_null(strstr(err.msg, bad[i]));
        assert_non_null(strstr(err.msg, "e.g."));
    }

    /* out-of-range option values from the C API */
    moe_kernel_config raw = {128, 256, 64, 12, 4, 1, 0, 7, 0};
    moe_error_clear(&err);
    assert_int_equal(moe_kernel_config_resolve(&raw, MOE_DTYPE_BF16, 0, &got, &err),
                     MOE_ERR_INVALID_ARG);
    raw.epilogue = 0;
    raw.a_load = -1;
    assert_int_equal(moe_kernel_config_resolve(&raw, MOE_DTYPE_BF16, 0, &got, &err),
                     MOE_ERR_INVALID_ARG);

    /* the automatic choice: no options of its own; options given with it apply where it picks
     * the wgmma kernel and are dropped where it picks mma.sync (few rows per expert, fp32) */
    assert_int_equal(moe_kernel_config_resolve(NULL, MOE_DTYPE_BF16, 256, &got, &err), MOE_OK);
    assert_int_equal(got.epilogue, MOE_GG_EPILOGUE_AUTO);
    assert_int_equal(got.a_load, MOE_GG_A_AUTO);
    moe_kernel_config only_opts = {0, 0, 0, 0, 0, 0, 0, MOE_GG_EPILOGUE_STAGED, MOE_GG_A_TMA};
    assert_int_equal(moe_kernel_config_resolve(&only_opts, MOE_DTYPE_BF16, 256, &got, &err), MOE_OK);
    assert_int_equal(got.use_tma, 1);
    assert_int_equal(got.epilogue, MOE_GG_EPILOGUE_STAGED);
    assert_int_equal(got.a_load, MOE_GG_A_TMA);
    assert_int_equal(moe_kernel_config_resolve(&only_opts, MOE_DTYPE_BF16, 4, &got, &err), MOE_OK);
    assert_int_equal(got.use_tma, 0);
    assert_int_equal(got.epilogue, MOE_GG_EPILOGUE_AUTO);
    assert_int_equal(got.a_load, MOE_GG_A_AUTO);
    assert_int_equal(moe_kernel_config_resolve(&only_opts, MOE_DTYPE_F32, 256, &got, &err), MOE_OK);
    assert_int_equal(got.epilogue, MOE_GG_EPILOGUE_AUTO);
}

/* What the launchers accept (moe_kernel_config_is_compiled, kernels/moe_kernels.h): every
 * listed configuration of its dtype, every resolution of a request (partial, automatic, with
 * options), the fallbacks; never a request that still needs resolving, an unlisted one, an
 * option without ",tma", or another dtype's configuration. */
static void test_resolved_is_compiled(void **state)
{
    (void)state;
    moe_error err;
    moe_kernel_config got;
    for (int d = 0; d < 3; d++) {
        const moe_kernel_config *list;
        const int n = moe_kernel_configs(k_dtypes[d], &list);
        assert_true(n > 0);
        for (int i = 0; i < n; i++) {
            assert_true(moe_kernel_config_is_compiled(&list[i], k_dtypes[d]));
            /* a list of the other family is not this dtype's */
            assert_false(moe_kernel_config_is_compiled(&list[i], k_dtypes[d] == MOE_DTYPE_F32
                                                                    ? MOE_DTYPE_BF16
                                                                    : MOE_DTYPE_F32));
            if (list[i].use_tma) {
                moe_kernel_config o = list[i];
                o.epilogue = MOE_GG_EPILOGUE_STAGED;
                o.a_load = MOE_GG_A_CPASYNC;
                assert_true(moe_kernel_config_is_compiled(&o, k_dtypes[d]));
                o.epilogue = 3;
                assert_false(moe_kernel_config_is_compiled(&o, k_dtypes[d]));
            } else {
                moe_kernel_config o = list[i];
                o.a_load = MOE_GG_A_TMA;
                assert_false(moe_kernel_config_is_compiled(&o, k_dtypes[d]));
            }
        }
        const int rows[4] = {0, 4, 100, 4096};
        for (int r = 0; r < 4; r++) {
            moe_error_clear(&err);
            assert_int_equal(moe_kernel_config_resolve(NULL, k_dtypes[d], rows[r], &got, &err), MOE_OK);
            assert_true(moe_kernel_config_is_compiled(&got, k_dtypes[d]));
            const moe_kernel_config m = moe_kernel_config_default_mma(k_dtypes[d], rows[r]);
            assert_true(moe_kernel_config_is_compiled(&m, k_dtypes[d]));
            assert_false(m.use_tma);
        }
        moe_kernel_config zero = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        assert_false(moe_kernel_config_is_compiled(&zero, k_dtypes[d]));
        assert_false(moe_kernel_config_is_compiled(NULL, k_dtypes[d]));
    }
    const moe_kernel_config narrow = moe_kernel_config_narrow();
    assert_true(moe_kernel_config_is_compiled(&narrow, MOE_DTYPE_BF16));
    const char *partial[] = {"128x128x64,tma", "64x64x32", "128x256x64,tma,c2,staged,atma", "128x128x64"};
    for (size_t i = 0; i < sizeof partial / sizeof partial[0]; i++) {
        moe_kernel_config req;
        moe_error_clear(&err);
        assert_int_equal(moe_kernel_config_parse(partial[i], &req, &err), MOE_OK);
        assert_int_equal(moe_kernel_config_resolve(&req, MOE_DTYPE_BF16, 0, &got, &err), MOE_OK);
        assert_true(moe_kernel_config_is_compiled(&got, MOE_DTYPE_BF16));
        assert_true(moe_kernel_config_is_compiled(&got, MOE_DTYPE_F16));
        if (req.warps == 0) assert_false(moe_kernel_config_is_compiled(&req, MOE_DTYPE_BF16));
    }
    moe_kernel_config unlisted = {96, 96, 32, 8, 3, 0, 0, 0, 0};
    assert_false(moe_kernel_config_is_compiled(&unlisted, MOE_DTYPE_BF16));
    moe_kernel_config bad_dtype = {128, 128, 64, 8, 3, 0, 0, 0, 0};
    assert_false(moe_kernel_config_is_compiled(&bad_dtype, MOE_DTYPE_I32));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_strings),
        cmocka_unit_test(test_wgmma_options),
        cmocka_unit_test(test_resolved_is_compiled),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else /* no CUDA in this build */

int main(void)
{
    printf("SKIP: built without CUDA (MOE_ENABLE_CUDA=OFF): no grouped-GEMM configurations\n");
    return MOE_TEST_SKIP;
}

#endif
