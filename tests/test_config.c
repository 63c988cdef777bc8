/* test_config.c — presets, every HF config.json spelling (hub Qwen3, transformers-5 Qwen3,
 * llama4_text, full Llama-4 with text_config), the real transformers 5 fixture configs, and
 * errors that name the missing field and the file. Expected values come from the model cards /
 * the fixture files themselves, never from the parser. */
#include <stdio.h>
#include <string.h>

#include "test_util.h"
#include "config.h"

#define CFG_DIR MOE_FIXTURE_DIR "/configs/"
#define HF_DIR MOE_FIXTURE_DIR "/hf/"

static void expect_cfg(const moe_config *c, moe_arch arch, int H, int I, int E, int k, bool norm,
                       int shared, moe_dtype dt, int layers)
{
    assert_int_equal(c->arch, arch);
    assert_int_equal(c->hidden, H);
    assert_int_equal(c->inter, I);
    assert_int_equal(c->num_experts, E);
    assert_int_equal(c->top_k, k);
    assert_int_equal(c->norm_topk_prob, norm);
    assert_int_equal(c->shared_inter, shared);
    assert_int_equal(c->dtype, dt);
    assert_int_equal(c->num_layers, layers);
    moe_error err = {0};
    assert_int_equal(moe_config_validate(c, &err), MOE_OK);
}

static void test_presets(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("qwen3-30b-a3b", &c, &err), MOE_OK);
    expect_cfg(&c, MOE_ARCH_QWEN3, 2048, 768, 128, 8, true, 0, MOE_DTYPE_BF16, 48);
    assert_string_equal(c.name, "qwen3-30b-a3b");
    assert_int_equal(moe_config_preset("llama4-scout", &c, &err), MOE_OK);
    expect_cfg(&c, MOE_ARCH_LLAMA4, 5120, 8192, 16, 1, false, 8192, MOE_DTYPE_BF16, 48);
    assert_int_equal(moe_config_preset("tiny-qwen3", &c, &err), MOE_OK);
    expect_cfg(&c, MOE_ARCH_QWEN3, 37, 23, 7, 3, true, 0, MOE_DTYPE_F32, c.num_layers);
    assert_int_equal(moe_config_preset("tiny-llama4", &c, &err), MOE_OK);
    expect_cfg(&c, MOE_ARCH_LLAMA4, 41, 19, 5, 1, false, 19, MOE_DTYPE_F32, c.num_layers);

    /* The list is NULL-terminated, every entry resolves, and names are unique. */
    int n = 0;
    for (; moe_preset_names[n]; n++) {
        assert_int_equal(moe_config_resolve(moe_preset_names[n], &c, &err), MOE_OK);
        assert_string_equal(c.name, moe_preset_names[n]);
        for (int j = 0; j < n; j++) assert_true(strcmp(moe_preset_names[j], moe_preset_names[n]));
    }
    assert_int_equal(n, 4);

    /* Tiny presets: odd, pairwise different sizes so no transposed/swapped weight fits. */
    const char *tiny[2] = {"tiny-qwen3", "tiny-llama4"};
    for (int t = 0; t < 2; t++) {
        assert_int_equal(moe_config_preset(tiny[t], &c, &err), MOE_OK);
        int d[3] = {c.hidden, c.inter, c.num_experts};
        for (int i = 0; i < 3; i++) {
            assert_int_equal(d[i] % 2, 1);
            for (int j = 0; j < i; j++) assert_int_not_equal(d[i], d[j]);
            assert_int_not_equal(d[i], 2 * c.inter); /* also not equal to the fused 2I */
        }
    }
}

static void test_unknown_preset(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("qwen3-235b", &c, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "qwen3-235b"));
    assert_non_null(strstr(err.msg, "tiny-llama4")); /* lists what exists */
    moe_error_clear(&err);
    assert_int_equal(moe_config_resolve("no-such-preset-or-file", &c, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "no-such-preset-or-file"));
    assert_int_equal(moe_config_resolve(NULL, &c, &err), MOE_ERR_INVALID_ARG);
}

static void test_qwen3_hub(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_from_json_file(CFG_DIR "qwen3_hub.json", &c, &err), MOE_OK);
    /* moe_intermediate_size (768), not the dense intermediate_size (6144) */
    expect_cfg(&c, MOE_ARCH_QWEN3, 2048, 768, 128, 8, true, 0, MOE_DTYPE_BF16, 48);
    assert_string_equal(c.name, "qwen3_moe");
}

static void test_qwen3_tf5(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_resolve(CFG_DIR "qwen3_tf5.json", &c, &err), MOE_OK);
    /* num_local_experts, "dtype" spelling, and norm_topk_prob absent = false */
    expect_cfg(&c, MOE_ARCH_QWEN3, 37, 23, 7, 3, false, 0, MOE_DTYPE_F16, 2);
}

static void test_llama4_text(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_from_json_file(CFG_DIR "llama4_text.json", &c, &err), MOE_OK);
    /* intermediate_size (19) is both widths; intermediate_size_mlp (53) is ignored */
    expect_cfg(&c, MOE_ARCH_LLAMA4, 41, 19, 5, 1, false, 19, MOE_DTYPE_F32, 3);
    assert_string_equal(c.name, "llama4_text");
}

static void test_llama4_full_scout(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    assert_int_equal(moe_config_from_json_file(CFG_DIR "llama4_scout.json", &c, &err), MOE_OK);
    /* text_config fields; torch_dtype only at top level; intermediate_size_mlp=16384 ignored;
     * the vision_config's hidden/intermediate sizes must not leak in. */
    expect_cfg(&c, MOE_ARCH_LLAMA4, 5120, 8192, 16, 1, false, 8192, MOE_DTYPE_BF16, 48);
    assert_string_equal(c.name, "llama4");
}

static void test_text_api_and_precedence(void **state)
{
    (void)state;
    moe_config c;
    moe_error err = {0};
    /* dtype inside text_config wins over the top-level one */
    const char *j1 = "{\"model_type\":\"llama4\",\"torch_dtype\":\"bfloat16\",\"text_config\":"
                     "{\"hidden_size\":9,\"intermediate_size\":5,\"num_local_experts\":4,"
                     "\"num_experts_per_tok\":2,\"torch_dtype\":\"float16\"}}";
    assert_int_equal(moe_config_from_json_text(j1, &c, &err), MOE_OK);
    expect_cfg(&c, MOE_ARCH_LLAMA4, 9, 5, 4, 2, false, 5, MOE_DTYPE_F16, 0);
    /* num_experts wins over num_local_experts when both are present (hub spelling first);
     * no dtype at all = fp32 */
    const char *j2 = "{\"model_type\":\"qwen3_moe\",\"hidden_size\":8,\"moe_intermediate_size\":3,"
                     "\"num_experts\":6,\"num_local_experts\":99,\"num_experts_per_tok\":2,"
                     "\"norm_topk_prob\":false}";
    assert_int_equal(moe_config_from_json_text(j2, &c, &err), MOE_OK);
    expect_cfg(&c, MOE_ARCH_QWEN3, 8, 3, 6, 2, false, 0, MOE_DTYPE_F32, 0);
    /* a null field counts as missing */
    const char *j3 = "{\"model_type\":\"qwen3_moe\",\"hidden_size\":null,\"moe_intermediate_size\":3,"
                     "\"num_experts\":6,\"num_experts_per_tok\":2}";
    assert_int_equal(moe_config_from_json_text(j3, &c, &err), MOE_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "hidden_size"));
    /* fractional / zero / negative sizes */
    const char *j4 = "{\"model_type\":\"qwen3_moe\",\"hidden_size\":8.5,\"moe_intermediate_size\":3,"
                     "\"num_experts\":6,\"num_experts_per_tok\":2}";
    assert_int_equal(moe_config_from_json_text(j4, &c, &err), MOE_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "hidden_size"));
    const char *j5 = "{\"model_type\":\"qwen3_moe\",\"hidden_size\":8,\"moe_intermediate_size\":3,"
                     "\"num_experts\":6,\"num_experts_per_tok\":0}";
    assert_int_equal(moe_config_from_json_text(j5, &c, &err), MOE_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "num_experts_per_tok"));
    assert_int_equal(moe_config_from_json_text("[1,2]", &c, &err), MOE_ERR_FORMAT);
    assert_int_equal(moe_config_from_json_text("{\"hidden_size\":3}", &c, &err), MOE_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "model_type"));
}

/* One broken file: status and the words its message must contain (the file and the field). */
static void expect_bad(const char *file, moe_status want, const char *const *words)
{
    char path[1024];
    snprintf(path, sizeof path, CFG_DIR "%s", file);
    moe_config c;
    memset(&c, 0x5a, sizeof c);
    moe_config before = c;
    moe_error err = {0};
    moe_status st = moe_config_from_json_file(path, &c, &err);
    fprintf(stderr, "%s -> %s: %s\n", file, moe_strerror(st), err.msg);
    assert_int_equal(st, want);
    assert_int_equal(err.status, want);
    assert_non_null(strstr(err.msg, file));
    for (int i = 0; words[i]; i++) assert_non_null(strstr(err.msg, words[i]));
    assert_memory_equal(&c, &before, sizeof c); /* output untouched on failure */
}

static void test_broken_files(void **state)
{
    (void)state;
    expect_bad("bad_qwen3_no_inter.json", MOE_ERR_FORMAT,
               (const char *[]){"moe_intermediate_size", NULL});
    expect_bad("bad_qwen3_no_experts.json", MOE_ERR_FORMAT,
               (const char *[]){"num_experts", "num_local_experts", NULL});
    expect_bad("bad_qwen3_k_gt_e.json", MOE_ERR_INVALID_ARG, (const char *[]){"k=5", "E=4", NULL});
    expect_bad("bad_llama4_no_text_config.json", MOE_ERR_FORMAT,
               (const char *[]){"text_config", NULL});
    expect_bad("bad_llama4_no_experts.json", MOE_ERR_FORMAT,
               (const char *[]){"text_config.num_local_experts", NULL});
    expect_bad("bad_model_type.json", MOE_ERR_FORMAT, (const char *[]){"mixtral", NULL});
    expect_bad("bad_dtype.json", MOE_ERR_UNSUPPORTED, (const char *[]){"torch_dtype", "int8", NULL});
    expect_bad("bad_json.json", MOE_ERR_FORMAT, (const char *[]){"JSON", NULL});
    expect_bad("bad_hidden_string.json", MOE_ERR_FORMAT, (const char *[]){"hidden_size", NULL});
    expect_bad("does_not_exist.json", MOE_ERR_IO, (const char *[]){NULL});
}

/* The configs transformers 5.17 wrote for the HF fixtures: parse, and a model directory
 * resolves to its config.json. Expected values are read from the folder's own names. */
static void test_hf_fixture_configs(void **state)
{
    (void)state;
    static const struct {
        const char *dir;
        moe_arch arch;
        int k;
        bool norm;
        moe_dtype dt;
    } cases[] = {
        {"qwen3_norm_fp32", MOE_ARCH_QWEN3, 3, true, MOE_DTYPE_F32},
        {"qwen3_nonorm_fp32", MOE_ARCH_QWEN3, 3, false, MOE_DTYPE_F32},
        {"qwen3_norm_bf16", MOE_ARCH_QWEN3, 3, true, MOE_DTYPE_BF16},
        {"llama4_k1_fp32", MOE_ARCH_LLAMA4, 1, false, MOE_DTYPE_F32},
        {"llama4_k2_fp32", MOE_ARCH_LLAMA4, 2, false, MOE_DTYPE_F32},
        {"llama4_k1_bf16", MOE_ARCH_LLAMA4, 1, false, MOE_DTYPE_BF16},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[1024];
        snprintf(path, sizeof path, HF_DIR "%s", cases[i].dir);
        moe_config c;
        moe_error err = {0};
        moe_status st = moe_config_resolve(path, &c, &err);
        if (st != MOE_OK) fprintf(stderr, "%s: %s\n", path, err.msg);
        assert_int_equal(st, MOE_OK);
        if (cases[i].arch == MOE_ARCH_QWEN3)
            expect_cfg(&c, MOE_ARCH_QWEN3, 37, 23, 7, cases[i].k, cases[i].norm, 0, cases[i].dt, 1);
        else
            expect_cfg(&c, MOE_ARCH_LLAMA4, 41, 19, 5, cases[i].k, false, 19, cases[i].dt, 1);
    }
}

static void test_validate(void **state)
{
    (void)state;
    moe_config base, c;
    moe_error err = {0};
    assert_int_equal(moe_config_preset("tiny-qwen3", &base, &err), MOE_OK);
    c = base; c.top_k = 0;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    c = base; c.top_k = c.num_experts + 1;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "k="));
    c = base; c.top_k = c.num_experts; /* k == E is fine */
    assert_int_equal(moe_config_validate(&c, &err), MOE_OK);
    c = base; c.hidden = 0;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(err.msg, "H="));
    c = base; c.inter = -3;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    c = base; c.num_experts = 0;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    c = base; c.shared_inter = 5; /* Qwen3 has no shared expert */
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    c = base; c.dtype = MOE_DTYPE_I32;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    c = base; c.arch = (moe_arch)7;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    /* Sizes whose product overflows what can be allocated/indexed. */
    c = base; c.hidden = 1 << 20; c.inter = 1 << 20; c.num_experts = 1 << 16; c.top_k = 1;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    c = base; c.hidden = 2000000000;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_config_preset("tiny-llama4", &base, &err), MOE_OK);
    c = base; c.shared_inter = 0; /* Llama-4 always has its shared expert */
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    c = base; c.norm_topk_prob = true;
    assert_int_equal(moe_config_validate(&c, &err), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_config_validate(NULL, &err), MOE_ERR_INVALID_ARG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_presets),
        cmocka_unit_test(test_unknown_preset),
        cmocka_unit_test(test_qwen3_hub),
        cmocka_unit_test(test_qwen3_tf5),
        cmocka_unit_test(test_llama4_text),
        cmocka_unit_test(test_llama4_full_scout),
        cmocka_unit_test(test_text_api_and_precedence),
        cmocka_unit_test(test_broken_files),
        cmocka_unit_test(test_hf_fixture_configs),
        cmocka_unit_test(test_validate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
