/*
 * test_cpu_fused_hf.c — the CPU fused path against HuggingFace itself: the fixtures under
 * tests/fixtures/hf (transformers 5 on a GPU, see their README) hold a block's weights, its
 * input, output and router logits, and for fp32 cases the gradients of sum(output *
 * grad_output). The fused forward must match HF's output and logits within docs/DESIGN.md's
 * tolerance (tokens whose logits tie at the k-th place, tie_mask, left out), and the fused
 * backward HF's input and parameter gradients, compared under HF's own names through
 * moe_weights_write_grads.
 */
#include <unistd.h>

#include "cpu_fused_testlib.h"
#include "block_state.h"
#include "cpu/cpu_fused.h"
#include "cpu_block_ref.h"
#include "safetensors.h"
#include "weights.h"

static double *rows_of(const moe_tensor *t, const int32_t *keep, int T, int cols, int *kept)
{
    double *d = tl_alloc((size_t)T * cols, sizeof(double));
    int n = 0;
    for (int r = 0; r < T; r++) {
        if (keep && !keep[r]) continue;
        for (int c = 0; c < cols; c++) d[(size_t)n * cols + c] = tl_ld(t->dtype, t->data, (size_t)r * cols + c);
        n++;
    }
    *kept = n;
    return d;
}

static void check_fixture(const char *name)
{
    char dir[512], wp[600], io[600];
    snprintf(dir, sizeof dir, MOE_FIXTURE_DIR "/hf/%s", name);
    snprintf(wp, sizeof wp, "%s/weights.safetensors", dir);
    snprintf(io, sizeof io, "%s/io.safetensors", dir);
    moe_error err = {0};
    moe_config c;
    if (moe_config_resolve(dir, &c, &err) != MOE_OK) fail_msg("%s", err.msg);
    moe_dtype dt = c.dtype;
    moe_weights w;
    if (moe_weights_load(&c, wp, -1, 0, c.num_experts, dt, &w, &err) != MOE_OK)
        fail_msg("%s", err.msg);
    moe_st_file f;
    if (moe_st_open(io, &f, &err) != MOE_OK) fail_msg("%s", err.msg);
    moe_tensor xin, yout, lg, tie;
    assert_int_equal(moe_st_get(&f, "hidden_states", &xin, &err), MOE_OK);
    assert_int_equal(moe_st_get(&f, "output", &yout, &err), MOE_OK);
    assert_int_equal(moe_st_get(&f, "router_logits", &lg, &err), MOE_OK);
    assert_int_equal(moe_st_get(&f, "tie_mask", &tie, &err), MOE_OK);
    assert_int_equal(xin.dtype, dt);
    int H = c.hidden, E = c.num_experts;
    int T = (int)(moe_tensor_numel(&xin) / (size_t)H);
    int32_t *keep = tl_alloc((size_t)T, 4), ties = 0;
    for (int t = 0; t < T; t++) {
        keep[t] = ((const int32_t *)tie.data)[t] == 0;
        ties += !keep[t];
    }

    moe_fwd_state st;
    assert_int_equal(moe_fwd_state_alloc(&c, dt, T, true, &st, &err), MOE_OK);
    moe_fwd_state_poison(&c, dt, &st);
    if (cpu_block_forward(&w, dt, T, xin.data, &st, &err) != MOE_OK) fail_msg("%s", err.msg);
    double tol = moe_test_tol(dt, false);
    char what[128];
    int n1, n2;
    moe_tensor mine_out = moe_tensor_view_of(dt, 2, (int64_t[]){T, H}, st.out);
    moe_tensor mine_lg = moe_tensor_view_of(dt, 2, (int64_t[]){T, E}, st.router_logits);
    double *a = rows_of(&mine_out, keep, T, H, &n1), *b = rows_of(&yout, keep, T, H, &n2);
    snprintf(what, sizeof what, "%s out (%d ties left out)", name, ties);
    assert_true(n1 > 0 && moe_test_close(what, a, b, (size_t)n1, (size_t)H, tol));
    free(a);
    free(b);
    a = rows_of(&mine_lg, NULL, T, E, &n1);
    b = rows_of(&lg, NULL, T, E, &n2);
    snprintf(what, sizeof what, "%s router logits", name);
    assert_true(moe_test_close(what, a, b, (size_t)T, (size_t)E, tol));
    free(a);
    free(b);

    moe_tensor dout;
    if (moe_st_get(&f, "grad_output", &dout, &err) == MOE_OK) {
        /* Gradients sum over tokens: a tie would change them; the fp32 fixtures have none. */
        assert_int_equal(ties, 0);
        moe_weights g;
        assert_int_equal(moe_weights_zeros_like(&w, dt, &g, &err), MOE_OK);
        void *dx = tl_alloc((size_t)T * H, moe_dtype_size(dt));
        tl_poison(dt, dx, (size_t)T * H);
        if (cpu_block_backward(&w, dt, T, xin.data, &st, dout.data, dx, &g, &err) != MOE_OK)
            fail_msg("%s", err.msg);
        double gtol = moe_test_tol(dt, true);
        moe_tensor hdx;
        assert_int_equal(moe_st_get(&f, "grad.hidden_states", &hdx, &err), MOE_OK);
        moe_tensor mdx = moe_tensor_view_of(dt, 2, (int64_t[]){T, H}, dx);
        a = rows_of(&mdx, NULL, T, H, &n1);
        b = rows_of(&hdx, NULL, T, H, &n2);
        snprintf(what, sizeof what, "%s dx", name);
        assert_true(moe_test_close(what, a, b, (size_t)T, (size_t)H, gtol));
        free(a);
        free(b);
        /* Parameter gradients under HF's names and layouts. */
        char gp[] = "/tmp/moe_fused_hf_XXXXXX";
        int fd = mkstemp(gp);
        assert_true(fd >= 0);
        close(fd);
        if (moe_weights_write_grads(&w, &g, NULL, gp, &err) != MOE_OK) fail_msg("%s", err.msg);
        moe_st_file mine;
        assert_int_equal(moe_st_open(gp, &mine, &err), MOE_OK);
        int compared = 0;
        for (int i = 0; i < f.count; i++) {
            const char *nm = f.entries[i].name;
            if (strncmp(nm, "grad.", 5) != 0 || strcmp(nm, "grad.hidden_states") == 0) continue;
            const moe_st_entry *m = moe_st_find(&mine, nm);
            if (!m) fail_msg("%s: no %s in the written gradients", name, nm);
            moe_tensor hv = moe_st_view(&f, &f.entries[i]), mv = moe_st_view(&mine, m);
            size_t n = moe_tensor_numel(&hv);
            assert_int_equal(moe_tensor_numel(&mv), n);
            /* rows: the leading dim (an expert for the fused expert tensors) */
            size_t rows = (size_t)hv.shape[0], cols = n / rows;
            a = rows_of(&mv, NULL, (int)rows, (int)cols, &n1);
            b = rows_of(&hv, NULL, (int)rows, (int)cols, &n2);
            snprintf(what, sizeof what, "%s %s", name, nm);
            assert_true(moe_test_close(what, a, b, rows, cols, gtol));
            free(a);
            free(b);
            compared++;
        }
        assert_true(compared >= 3);
        moe_st_close(&mine);
        unlink(gp);
        free(dx);
        moe_weights_free(&g);
    }
    free(keep);
    moe_fwd_state_free(&st);
    moe_st_close(&f);
    moe_weights_free(&w);
}

static void test_hf_fixtures(void **state)
{
    (void)state;
    const char *names[] = {"qwen3_norm_fp32", "qwen3_nonorm_fp32", "qwen3_norm_bf16",
                           "llama4_k1_fp32", "llama4_k2_fp32", "llama4_k1_bf16"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) check_fixture(names[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hf_fixtures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
