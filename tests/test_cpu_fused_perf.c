/*
 * test_cpu_fused_perf.c — the CPU fused path at Qwen3-30B-A3B's real widths (H = 2048,
 * I = 768, k = 8, bf16), timed, and bitwise identical on 1 and 2 threads.
 *
 * By default a reduced run (E = 16 experts, T = 16 tokens) that prints its timings and checks
 * determinism. MOE_TEST_PERF=1 runs the full block (E = 128) at T = 64 on 2 threads and fails
 * if forward + backward (second, warm iteration) takes more than MOE_TEST_PERF_LIMIT seconds
 * (default 10).
 */
#include <omp.h>

#include "cpu_fused_testlib.h"
#include "block_state.h"
#include "cpu/cpu_fused.h"
#include "cpu_block_ref.h"
#include "weights.h"

/* Cheap fill: uniform in [-a, a) from the counter RNG's raw bits, rounded to bf16. */
static void fill(moe_tensor *t, uint64_t stream, float a)
{
    size_t n = moe_tensor_numel(t);
    uint16_t *p = t->data;
    for (size_t i = 0; i < n; i++) {
        float u = (float)(moe_rng_u64(stream, i) >> 40) * 0x1p-24f; /* [0,1) */
        p[i] = moe_f32_to_bf16((2.0f * u - 1.0f) * a);
    }
}

typedef struct run_out {
    moe_weights g;
    void *dx, *out;
    double t_fwd, t_bwd;
} run_out;

static void run(const moe_weights *w, int T, const void *x, const void *dout, int threads,
                int reps, run_out *o)
{
    moe_dtype dt = w->dtype;
    moe_error err = {0};
    int H = w->cfg.hidden;
    if (moe_weights_zeros_like(w, dt, &o->g, &err) != MOE_OK) fail_msg("%s", err.msg);
    o->dx = tl_alloc((size_t)T * H, 2);
    o->out = tl_alloc((size_t)T * H, 2);
    moe_fwd_state st;
    assert_int_equal(moe_fwd_state_alloc(&w->cfg, dt, T, true, &st, &err), MOE_OK);
    int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    for (int r = 0; r < reps; r++) {
        double t0 = moe_now();
        if (cpu_block_forward(w, dt, T, x, &st, &err) != MOE_OK) fail_msg("%s", err.msg);
        double t1 = moe_now();
        if (cpu_block_backward(w, dt, T, x, &st, dout, o->dx, &o->g, &err) != MOE_OK)
            fail_msg("%s", err.msg);
        double t2 = moe_now();
        o->t_fwd = t1 - t0;
        o->t_bwd = t2 - t1;
        fprintf(stderr, "E=%d T=%d threads=%d rep %d: forward %.3f s, backward %.3f s\n",
                w->cfg.num_experts, T, threads, r, o->t_fwd, o->t_bwd);
    }
    omp_set_num_threads(saved);
    memcpy(o->out, st.out, (size_t)T * H * 2);
    moe_fwd_state_free(&st);
}

static void test_qwen3_30b_widths(void **state)
{
    (void)state;
    const char *full_env = getenv("MOE_TEST_PERF");
    bool full = full_env && strcmp(full_env, "1") == 0;
    moe_error err = {0};
    moe_config c;
    assert_int_equal(moe_config_preset("qwen3-30b-a3b", &c, &err), MOE_OK);
    int T = full ? 64 : 16;
    if (!full) c.num_experts = 16;
    int H = c.hidden, I = c.inter, E = c.num_experts;
    moe_dtype dt = MOE_DTYPE_BF16;
    moe_weights w;
    memset(&w, 0, sizeof w);
    w.cfg = c;
    w.dtype = dt;
    w.expert_count = E;
    assert_int_equal(moe_tensor_alloc2(&w.router, dt, E, H, &err), MOE_OK);
    assert_int_equal(moe_tensor_alloc3(&w.w13, dt, E, 2 * I, H, &err), MOE_OK);
    assert_int_equal(moe_tensor_alloc3(&w.w2, dt, E, H, I, &err), MOE_OK);
    uint64_t seed = moe_test_seed();
    fill(&w.router, moe_rng_stream(seed, "router"), 1.7f / sqrtf((float)H));
    fill(&w.w13, moe_rng_stream(seed, "w13"), 1.7f / sqrtf((float)H));
    fill(&w.w2, moe_rng_stream(seed, "w2"), 1.7f / sqrtf((float)I));
    moe_tensor x, dout;
    assert_int_equal(moe_tensor_alloc2(&x, dt, T, H, &err), MOE_OK);
    assert_int_equal(moe_tensor_alloc2(&dout, dt, T, H, &err), MOE_OK);
    fill(&x, moe_rng_stream(seed, "x"), 1.7f);
    fill(&dout, moe_rng_stream(seed, "dout"), 1.7f);

    run_out a, b;
    run(&w, T, x.data, dout.data, 2, full ? 2 : 1, &a);
    if (full) {
        const char *lim = getenv("MOE_TEST_PERF_LIMIT");
        double limit = lim ? atof(lim) : 10.0;
        fprintf(stderr, "Qwen3-30B-A3B block, T=%d, 2 threads: forward + backward %.3f s "
                "(limit %.1f s)\n", T, a.t_fwd + a.t_bwd, limit);
        assert_true(a.t_fwd + a.t_bwd <= limit);
    } else {
        run(&w, T, x.data, dout.data, 1, 1, &b);
        size_t n = (size_t)T * H * 2;
        assert_true(tl_bits_equal(a.out, b.out, n));
        assert_true(tl_bits_equal(a.dx, b.dx, n));
        assert_true(tl_bits_equal(a.g.router.data, b.g.router.data, a.g.router.nbytes));
        assert_true(tl_bits_equal(a.g.w13.data, b.g.w13.data, a.g.w13.nbytes));
        assert_true(tl_bits_equal(a.g.w2.data, b.g.w2.data, a.g.w2.nbytes));
        /* and not trivially: the output and gradients are finite and not all zero */
        bool any = false;
        for (size_t i = 0; i < (size_t)T * H; i++) {
            float v = moe_bf16_to_f32(((uint16_t *)a.dx)[i]);
            assert_true(isfinite(v));
            any |= v != 0.0f;
        }
        assert_true(any);
        moe_weights_free(&b.g);
        free(b.dx);
        free(b.out);
    }
    moe_weights_free(&a.g);
    free(a.dx);
    free(a.out);
    moe_tensor_free(&x);
    moe_tensor_free(&dout);
    moe_tensor_free(&w.router);
    moe_tensor_free(&w.w13);
    moe_tensor_free(&w.w2);
}

int main(void)
{
    moe_test_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qwen3_30b_widths),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
