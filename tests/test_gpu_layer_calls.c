/*
 * test_gpu_layer_calls.c — the CUDA layer's calls beyond the stage-by-stage numbers
 * (test_gpu_layer.c): what the public API promises around them.
 *   empty     T = 0 through every call (asynchronous forward and backward with NULL buffers,
 *             the host calls, the stages), before and after calls with tokens: gradients of no
 *             tokens are +0.0, the next batch is unaffected;
 *   invalid   argument errors name what is wrong (T beyond max_tokens is MOE_ERR_OVERFLOW);
 *             layer info; caller tensors: a mis-shaped one named, borrowed host memory refused,
 *             borrowed device memory read in place = copied = generated weights (bitwise);
 *   nonfinite a NaN row of x leaves the other tokens' outputs bitwise unchanged;
 *             moe_layer_check_errors reports MOE_ERR_NONFINITE (the CUDA routing kernels count
 *             such tokens inside the top-k launch), as the CPU layer does;
 *   bound     T growing from 1 to max_tokens (forward and backward, asynchronous and host):
 *             the weights uploaded once (weight_uploads == 1), the workspace never grows after
 *             the first calls at max_tokens;
 *   saved     save_for_backward: the same output, dx and gradients (bitwise) as recomputing,
 *             through the asynchronous and the host calls, and a backward of another x
 *             recomputes;
 *   exact     exact_hf_rounding on the Hopper wgmma kernels: with inputs whose GEMM1 sums are
 *             exact in fp32 in any order (small integers, dyadic weights), GEMM1's output is
 *             bitwise the mma.sync kernels' and the CPU twin's (HF's rounding points: Llama-4's
 *             x*score rounded before the MMA); act within 1% of elements (SiLU: IEEE expf on
 *             both, ulps apart); the kernel reports name the paths; the fast default differs.
 * Expected runtime on an H100: ~10 s. Skipped (77) without a GPU or a CUDA build.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#ifdef MOE_HAVE_CUDA
#include "cpu/cpu_fused.h"
#include "gpu_layer_test.h"
#include "weights.h"

/* ------------------------------------------------------------------ helpers ---- */

/* Device gradients of a layer (every element poisoned); NULL where the model has none. */
static void dev_grads(const moe_layer *L, moe_layer_grads *g, size_t *bytes)
{
    const size_t es = L->dsz, H = L->H, I = L->I, E = L->map.El, Is = L->Is;
    const size_t b[6] = {(size_t)L->E * H * es, E * 2 * I * H * es, E * H * I * es, Is * H * es,
                         Is * H * es, H * Is * es};
    memset(g, 0, sizeof *g);
    for (int i = 0; i < 6; i++) {
        bytes[i] = b[i];
        if (b[i]) {
            *moe_test_grad_slot(g, i) = gt_dev(b[i]);
            gt_poison(*moe_test_grad_slot(g, i), b[i]);
        }
    }
}

static void dev_grads_free(moe_layer_grads *g)
{
    for (int i = 0; i < 6; i++) cudaFree(*moe_test_grad_slot(g, i));
}

/* Host gradients of the sizes dev_grads gave (every element poisoned); NULL where 0. */
static void host_grads(moe_layer_grads *g, const size_t *bytes)
{
    memset(g, 0, sizeof *g);
    for (int i = 0; i < 6; i++)
        if (bytes[i]) *moe_test_grad_slot(g, i) = gt_malloc(bytes[i]);
}

static void host_grads_free(moe_layer_grads *g)
{
    for (int i = 0; i < 6; i++) free(*moe_test_grad_slot(g, i));
}

/* one(c, dt, seed, case name) for the tiny Qwen3 (norm_topk_prob) and Llama-4 (k = 2, shared
 * expert) blocks, each in bf16 and fp32: the case name is "<config> <dtype> <what>". */
static void each_tiny_case(const char *what,
                           void (*one)(const moe_config *c, moe_dtype dt, uint64_t seed,
                                       const char *cn))
{
    uint64_t seed = moe_test_seed();
    const moe_config cfgs[2] = {gt_qwen_tiny(true), gt_llama_tiny(2, 27)};
    const moe_dtype dts[2] = {MOE_DTYPE_BF16, MOE_DTYPE_F32};
    for (int ci = 0; ci < 2; ci++)
        for (int di = 0; di < 2; di++) {
            char cn[96];
            snprintf(cn, sizeof cn, "%s %s %s", cfgs[ci].name, moe_dtype_name(dts[di]), what);
            one(&cfgs[ci], dts[di], seed, cn);
        }
}

/* ------------------------------------------------------------------ T = 0 ---- */

static bool all_zero(const void *p, size_t bytes)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < bytes; i++)
        if (b[i]) return false;
    return true;
}

/* T = 0 through every call: the asynchronous forward and backward (NULL buffers allowed), the
 * host calls ([0, H] views), the stages; gradients of no tokens are exact zeros (+0.0), and a
 * call with tokens between empty ones is unaffected. */
static void empty_batch_case(const moe_config *c, moe_dtype dt, uint64_t seed, const char *cn)
{
    const size_t es = moe_dtype_size(dt), H = c->hidden, E = c->num_experts;
    fprintf(stderr, "--- %s\n", cn);
    moe_layer *G = gt_layer(c, MOE_BACKEND_CUDA, dt, seed, NULL);
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    for (int round = 0; round < 2; round++) {
        /* round 1: after a call with tokens (buffers sized, state from a forward) */
        if (round == 1) {
            void *x = gt_random(dt, 5 * H, seed, "test.x", 1.0), *o = gt_malloc(5 * H * es);
            moe_tensor_view vx = {dt, 2, {5, (int64_t)H}, x}, vo = {dt, 2, {5, (int64_t)H}, o};
            API(moe_layer_forward(G, &vx, &vo, NULL));
            free(x);
            free(o);
        }
        API(moe_layer_forward_async(G, 0, NULL, NULL, NULL, st));
        moe_layer_grads g;
        size_t gb[6];
        dev_grads(G, &g, gb);
        API(moe_layer_backward_async(G, 0, NULL, NULL, NULL, NULL, &g, st));
        CU(cudaStreamSynchronize(st));
        for (int i = 0; i < 6; i++) {
            if (!gb[i]) continue;
            void *h = gt_host_from(*moe_test_grad_slot(&g, i), gb[i]);
            if (!all_zero(h, gb[i]))
                fail_msg("%s: backward_async with T = 0 (round %d): %s is not all +0.0", cn, round,
                         moe_test_grad_names[i]);
            free(h);
        }
        dev_grads_free(&g);
        /* host calls on [0, H] views (their data pointers must still be given) */
        char dummy[64];
        moe_tensor_view vx = {dt, 2, {0, (int64_t)H}, dummy}, vo = {dt, 2, {0, (int64_t)H}, dummy};
        moe_tensor_view vl = {dt, 2, {0, (int64_t)E}, dummy}, vdx = {dt, 2, {0, (int64_t)H}, dummy};
        API(moe_layer_forward(G, &vx, &vo, &vl));
        moe_layer_grads hg;
        host_grads(&hg, gb);
        API(moe_layer_backward(G, &vx, &vo, &vl, &vdx, &hg));
        for (int i = 0; i < 6; i++)
            if (gb[i] && !all_zero(*moe_test_grad_slot(&hg, i), gb[i]))
                fail_msg("%s: moe_layer_backward with T = 0 (round %d): %s is not all +0.0", cn,
                         round, moe_test_grad_names[i]);
        host_grads_free(&hg);
        /* the stages of no tokens: nothing routed, zero counts */
        moe_fwd_state s0;
        INT(moe_fwd_state_alloc(c, dt, 0, true, &s0, ERR));
        moe_fwd_state_poison(c, dt, &s0);
        INT(moe_layer_forward_stages(G, 0, dummy, &s0, ERR));
        if (s0.M != 0) fail_msg("%s: stages of T = 0 report M = %d", cn, s0.M);
        for (size_t e = 0; e < E; e++)
            if (s0.token_counts[e] != 0 || s0.expert_offsets[e + 1] != 0 || s0.expert_offsets[0] != 0)
                fail_msg("%s: stages of T = 0 (round %d): expert %zu has count %d, offsets %d..%d",
                         cn, round, e, s0.token_counts[e], s0.expert_offsets[e], s0.expert_offsets[e + 1]);
        moe_fwd_state_free(&s0);
        API(moe_layer_check_errors(G));
    }
    /* a batch with tokens after the empty calls: the same as on a fresh layer */
    moe_layer *F = gt_layer(c, MOE_BACKEND_CUDA, dt, seed, NULL);
    void *x = gt_random(dt, 9 * H, seed, "test.x9", 1.0), *o1 = gt_malloc(9 * H * es), *o2 = gt_malloc(9 * H * es);
    moe_tensor_view vx = {dt, 2, {9, (int64_t)H}, x}, v1 = {dt, 2, {9, (int64_t)H}, o1}, v2 = {dt, 2, {9, (int64_t)H}, o2};
    API(moe_layer_forward(G, &vx, &v1, NULL));
    API(moe_layer_forward(F, &vx, &v2, NULL));
    gt_assert_bitwise(cn, "T = 9 after empty calls = on a fresh layer", dt, o1, o2, 9 * H, H);
    free(x);
    free(o1);
    free(o2);
    API(moe_layer_destroy(F));
    API(moe_layer_destroy(G));
    CU(cudaStreamDestroy(st));
}

static void test_empty_batch(void **state)
{
    (void)state;
    each_tiny_case("T=0", empty_batch_case);
}

/* ------------------------------------------------------------------ errors ---- */

static void expect_fail(moe_status got, moe_status want, const char *needle, const char *what)
{
    if (got != want)
        fail_msg("%s: returned %s (%s), expected %s", what, moe_strerror(got), moe_last_error(),
                 moe_strerror(want));
    if (needle && !strstr(moe_last_error(), needle))
        fail_msg("%s: the message \"%s\" does not name \"%s\"", what, moe_last_error(), needle);
    fprintf(stderr, "expected failure, %s: %s\n", what, moe_last_error());
}

/* Argument errors name what is wrong; caller tensors (copied or borrowed device memory). */
static void test_invalid(void **state)
{
    (void)state;
    const moe_config c = gt_qwen_tiny(true);
    const moe_dtype dt = MOE_DTYPE_BF16;
    const size_t es = 2, H = c.hidden, I = c.inter, E = c.num_experts;
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    o.max_tokens = 16;
    moe_layer *G = gt_layer(&c, MOE_BACKEND_CUDA, dt, 1, &o);
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    API(moe_layer_info_get(G, &in));
    if (in.backend != MOE_BACKEND_CUDA || in.device < 0 || !in.device_name[0] || in.weight_uploads != 1 ||
        strcmp(in.transport, "none") != 0 || in.num_local_experts != (int)E || in.max_tokens != 16)
        fail_msg("layer info: backend %d device %d '%s' uploads %llu transport '%s' experts %d "
                 "max_tokens %lld", (int)in.backend, in.device, in.device_name,
                 (unsigned long long)in.weight_uploads, in.transport, in.num_local_experts,
                 (long long)in.max_tokens);
    fprintf(stderr, "layer on %s (device %d), %llu bytes resident\n", in.device_name, in.device,
            (unsigned long long)in.bytes_resident);
    void *x = gt_dev(17 * H * es), *out = gt_dev(17 * H * es);
    expect_fail(moe_layer_forward_async(G, 17, x, out, NULL, NULL), MOE_ERR_OVERFLOW, "max_tokens",
                "T = 17 > max_tokens = 16");
    expect_fail(moe_layer_forward_async(G, 8, NULL, out, NULL, NULL), MOE_ERR_INVALID_ARG, "x is NULL", "x NULL");
    expect_fail(moe_layer_forward_async(G, 8, x, NULL, NULL, NULL), MOE_ERR_INVALID_ARG, "out is NULL", "out NULL");
    expect_fail(moe_layer_forward_async(G, -1, x, out, NULL, NULL), MOE_ERR_INVALID_ARG, "T = -1", "T < 0");
    expect_fail(moe_layer_backward_async(G, 8, x, NULL, NULL, out, NULL, NULL), MOE_ERR_INVALID_ARG,
                "dout is NULL", "dout NULL");
    void *hx = gt_malloc(8 * H * 4);
    moe_tensor_view bad = {dt, 2, {8, (int64_t)H - 1}, hx}, f32 = {MOE_DTYPE_F32, 2, {8, (int64_t)H}, hx};
    moe_tensor_view vo = {dt, 2, {8, (int64_t)H}, hx};
    expect_fail(moe_layer_forward(G, &bad, &vo, NULL), MOE_ERR_INVALID_ARG, "hidden must be", "[8, H-1] hidden");
    expect_fail(moe_layer_forward(G, &f32, &vo, NULL), MOE_ERR_INVALID_ARG, "computes in bf16", "fp32 hidden, bf16 layer");
    /* a configuration that is not compiled, and one for the CPU backend: refused at creation */
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    moe_layer *B = NULL;
    moe_layer_options ob = MOE_LAYER_OPTIONS_INIT;
    ob.backend = MOE_BACKEND_CUDA;
    ob.dtype = dt;
    ob.kernel_config = "100x100x10";
    expect_fail(moe_layer_create_config(NULL, &c, &src, &ob, &B), MOE_ERR_INVALID_ARG, "kernel config",
                "kernel_config 100x100x10");
    ob.backend = MOE_BACKEND_CPU;
    ob.kernel_config = "128x128x64,w8,s3";
    expect_fail(moe_layer_create_config(NULL, &c, &src, &ob, &B), MOE_ERR_INVALID_ARG, "CUDA backend only",
                "kernel_config on the CPU backend");
    if (B) fail_msg("a failed creation left a layer");
    /* a stream on the CPU backend */
    moe_layer *C = gt_layer(&c, MOE_BACKEND_CPU, dt, 1, NULL);
    expect_fail(moe_layer_forward_async(C, 1, hx, hx, NULL, (void *)G), MOE_ERR_INVALID_ARG,
                "stream must be NULL", "a stream on the CPU backend");

    /* caller tensors: a mis-shaped one is named; borrowed memory must be this GPU's */
    moe_weights w;
    INT(moe_weights_random(&c, 5, 0, (int)E, dt, &w, ERR));
    moe_named_tensor t[3] = {
        {"router", {dt, 2, {(int64_t)E, (int64_t)H}, w.router.data}},
        {"w13", {dt, 3, {(int64_t)E, 2 * (int64_t)I, (int64_t)H}, w.w13.data}},
        {"w2", {dt, 3, {(int64_t)E, (int64_t)H - 1, (int64_t)I}, w.w2.data}},
    };
    src.kind = MOE_WEIGHTS_TENSORS;
    src.layout = MOE_LAYOUT_CANONICAL;
    src.tensors = t;
    src.num_tensors = 3;
    ob.backend = MOE_BACKEND_CUDA;
    ob.kernel_config = NULL;
    expect_fail(moe_layer_create_config(NULL, &c, &src, &ob, &B), MOE_ERR_INVALID_ARG, "w2", "w2 of shape [E, H-1, I]");
    t[2].view.shape[1] = (int64_t)H;
    src.borrow = 1;
    expect_fail(moe_layer_create_config(NULL, &c, &src, &ob, &B), MOE_ERR_INVALID_ARG, "device memory",
                "borrowed host memory on a CUDA layer");
    /* borrowed device copies: read in place, nothing resident, the same output as copied
     * weights and as the generated ones of the same seed */
    const size_t rb = E * H * es, b13 = E * 2 * I * H * es, b2 = E * H * I * es;
    void *dr = gt_dev_from(w.router.data, rb), *d13 = gt_dev_from(w.w13.data, b13), *d2 = gt_dev_from(w.w2.data, b2);
    moe_named_tensor td[3] = {t[0], t[1], t[2]};
    td[0].view.data = dr;
    td[1].view.data = d13;
    td[2].view.data = d2;
    src.tensors = td;
    moe_layer *Bw = NULL, *Cp = NULL;
    API(moe_layer_create_config(NULL, &c, &src, &ob, &Bw));
    src.tensors = t;
    src.borrow = 0;
    API(moe_layer_create_config(NULL, &c, &src, &ob, &Cp));
    moe_layer *Gs = gt_layer(&c, MOE_BACKEND_CUDA, dt, 5, NULL);
    moe_layer_info ib = MOE_LAYER_INFO_INIT;
    API(moe_layer_info_get(Bw, &ib));
    if (ib.bytes_resident != 0) fail_msg("a borrowed layer holds %llu bytes", (unsigned long long)ib.bytes_resident);
    void *xh = gt_random(dt, 12 * H, 9, "test.x", 1.0), *o1 = gt_malloc(12 * H * es), *o2 = gt_malloc(12 * H * es);
    void *o3 = gt_malloc(12 * H * es);
    moe_tensor_view vx = {dt, 2, {12, (int64_t)H}, xh}, v1 = {dt, 2, {12, (int64_t)H}, o1};
    moe_tensor_view v2 = {dt, 2, {12, (int64_t)H}, o2}, v3 = {dt, 2, {12, (int64_t)H}, o3};
    API(moe_layer_forward(Bw, &vx, &v1, NULL));
    API(moe_layer_forward(Cp, &vx, &v2, NULL));
    API(moe_layer_forward(Gs, &vx, &v3, NULL));
    gt_assert_bitwise("caller tensors", "borrowed = copied", dt, o1, o2, 12 * H, H);
    gt_assert_bitwise("caller tensors", "copied = generated (same seed)", dt, o2, o3, 12 * H, H);
    API(moe_layer_destroy(Bw));
    API(moe_layer_destroy(Cp));
    API(moe_layer_destroy(Gs));
    cudaFree(dr);
    cudaFree(d13);
    cudaFree(d2);
    moe_weights_free(&w);
    free(xh);
    free(o1);
    free(o2);
    free(o3);
    free(hx);
    cudaFree(x);
    cudaFree(out);
    API(moe_layer_destroy(C));
    API(moe_layer_destroy(G));
}

/* ------------------------------------------------------------------ non-finite logits ---- */

/* A NaN row of x: the other tokens' outputs are bitwise those of the same batch without it, and
 * moe_layer_check_errors reports MOE_ERR_NONFINITE (once: the record is cleared), on CUDA as on
 * the CPU. */
static void test_nonfinite_logits(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const moe_config cfgs[2] = {gt_qwen_tiny(true), gt_llama_tiny(1, 19)};
    for (int ci = 0; ci < 2; ci++) {
        const moe_config *c = &cfgs[ci];
        const moe_dtype dt = MOE_DTYPE_BF16;
        const size_t es = 2, H = c->hidden, T = 16, bad_row = 5;
        moe_layer *G = gt_layer(c, MOE_BACKEND_CUDA, dt, seed, NULL);
        moe_layer *C = gt_layer(c, MOE_BACKEND_CPU, dt, seed, NULL);
        void *x = gt_random(dt, T * H, seed, "test.x", 1.0), *xn = gt_malloc(T * H * es);
        memcpy(xn, x, T * H * es);
        for (size_t h = 0; h < H; h++) moe_store_elem(dt, xn, bad_row * H + h, NAN);
        void *o1 = gt_malloc(T * H * es), *o2 = gt_malloc(T * H * es);
        moe_tensor_view vx = {dt, 2, {(int64_t)T, (int64_t)H}, x}, vn = {dt, 2, {(int64_t)T, (int64_t)H}, xn};
        moe_tensor_view v1 = {dt, 2, {(int64_t)T, (int64_t)H}, o1}, v2 = {dt, 2, {(int64_t)T, (int64_t)H}, o2};
        API(moe_layer_forward(G, &vx, &v1, NULL));
        API(moe_layer_check_errors(G));
        API(moe_layer_forward(G, &vn, &v2, NULL));
        for (size_t t = 0; t < T; t++)
            if (t != bad_row && memcmp((char *)o1 + t * H * es, (char *)o2 + t * H * es, H * es) != 0)
                fail_msg("%s: token %zu's output changed when token %zu's input became NaN", c->name, t, bad_row);
        moe_status st = moe_layer_check_errors(G);
        expect_fail(st, MOE_ERR_NONFINITE, "1 token", "CUDA: a NaN row of x");
        API(moe_layer_check_errors(G)); /* cleared */
        /* the CPU layer reports it (the semantics the CUDA backend is to match) */
        API(moe_layer_forward(C, &vn, &v2, NULL));
        expect_fail(moe_layer_check_errors(C), MOE_ERR_NONFINITE, "1 token", "CPU: a NaN row of x");
        API(moe_layer_check_errors(C));
        free(x);
        free(xn);
        free(o1);
        free(o2);
        API(moe_layer_destroy(G));
        API(moe_layer_destroy(C));
    }
}
/* ------------------------------------------------------------------ the token bound ---- */

static uint64_t ws_bytes(const moe_layer *L)
{
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    API(moe_layer_info_get(L, &in));
    if (in.weight_uploads != 1)
        fail_msg("%s: weight_uploads = %llu, expected 1 (the weights are placed once)",
                 L->cfg.name, (unsigned long long)in.weight_uploads);
    return in.workspace_bytes;
}

/* T from 1 to max_tokens, twice: every call kind at every T. The weights stay uploaded once;
 * after the first pass (which ends with calls at max_tokens) the workspace does not grow. */
static void test_token_bound(void **state)
{
    (void)state;
    uint64_t seed = moe_test_seed();
    const moe_config cfgs[2] = {gt_llama_tiny(2, 27), gt_qwen_tiny(true)};
    for (int ci = 0; ci < 2; ci++) {
        const moe_config *c = &cfgs[ci];
        const moe_dtype dt = MOE_DTYPE_BF16;
        const int Tmax = 48;
        const size_t es = 2, H = c->hidden, E = c->num_experts;
        moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
        o.max_tokens = Tmax;
        moe_layer *G = gt_layer(c, MOE_BACKEND_CUDA, dt, seed, &o);
        const uint64_t w0 = ws_bytes(G);
        cudaStream_t st;
        CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        void *hx = gt_random(dt, Tmax * H, seed, "test.x", 1.0), *hd = gt_random(dt, Tmax * H, seed, "test.dout", 1.0);
        void *x = gt_dev_from(hx, Tmax * H * es), *d = gt_dev_from(hd, Tmax * H * es);
        void *out = gt_dev(Tmax * H * es), *lg = gt_dev(Tmax * E * es), *dx = gt_dev(Tmax * H * es);
        void *ho = gt_malloc(Tmax * H * es), *hl = gt_malloc(Tmax * E * es), *hdx = gt_malloc(Tmax * H * es);
        void *first_out = gt_malloc(Tmax * H * es);
        moe_layer_grads g;
        size_t gb[6];
        dev_grads(G, &g, gb);
        uint64_t at_max = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int T = 1; T <= Tmax; T++) {
                API(moe_layer_forward_async(G, T, x, out, lg, st));
                API(moe_layer_backward_async(G, T, x, d, NULL, dx, &g, st));
                /* calls on one layer must not overlap: the host calls run on the layer's own
                 * stream, which does not wait for st */
                CU(cudaStreamSynchronize(st));
                moe_tensor_view vx = {dt, 2, {T, (int64_t)H}, hx}, vo = {dt, 2, {T, (int64_t)H}, ho};
                moe_tensor_view vl = {dt, 2, {T, (int64_t)E}, hl}, vd = {dt, 2, {T, (int64_t)H}, hd};
                moe_tensor_view vdx = {dt, 2, {T, (int64_t)H}, hdx};
                API(moe_layer_forward(G, &vx, &vo, &vl));
                API(moe_layer_backward(G, &vx, &vd, NULL, &vdx, NULL));
                const uint64_t now = ws_bytes(G);
                if (pass == 0 && T == Tmax) {
                    at_max = now;
                    memcpy(first_out, ho, Tmax * H * es);
                }
                if (pass == 1 && now != at_max)
                    fail_msg("%s: the workspace grew from %llu to %llu bytes at T = %d, after the "
                             "calls at max_tokens = %d", c->name, (unsigned long long)at_max,
                             (unsigned long long)now, T, Tmax);
                for (size_t i = 0; i < (size_t)T * H; i++)
                    if (!isfinite(moe_load_elem(dt, ho, i)))
                        fail_msg("%s: T = %d: out[%zu, %zu] = %g", c->name, T, i / H, i % H, moe_load_elem(dt, ho, i));
                if (pass == 1 && T == Tmax)
                    gt_assert_bitwise(c->name, "out at max_tokens, first and second pass", dt, ho, first_out, Tmax * H, H);
            }
        API(moe_layer_check_errors(G));
        fprintf(stderr, "%s: workspace %llu bytes at creation, %llu after calls up to max_tokens = %d%s\n",
                c->name, (unsigned long long)w0, (unsigned long long)at_max, Tmax,
                w0 == at_max ? "" : " (NOTE: moe_ep.h says that with max_tokens the buffers are sized "
                                    "once at creation; they are sized by the first calls instead)");
        dev_grads_free(&g);
        void *p[] = {hx, hd, ho, hl, hdx, first_out};
        for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
        cudaFree(x);
        cudaFree(d);
        cudaFree(out);
        cudaFree(lg);
        cudaFree(dx);
        API(moe_layer_destroy(G));
        CU(cudaStreamDestroy(st));
    }
}

/* ------------------------------------------------------------------ save_for_backward ---- */

static void assert_grads_equal(const char *cn, const char *what, moe_dtype dt, const moe_layer_grads *a,
                               const moe_layer_grads *b, const size_t *bytes, bool b_on_host)
{
    const void *pa[6] = {a->router, a->w13, a->w2, a->shared_gate, a->shared_up, a->shared_down};
    const void *pb[6] = {b->router, b->w13, b->w2, b->shared_gate, b->shared_up, b->shared_down};
    for (int i = 0; i < 6; i++) {
        if (!pa[i]) continue;
        char w[160];
        snprintf(w, sizeof w, "%s: %s", what, moe_test_grad_names[i]);
        void *ha = gt_host_from(pa[i], bytes[i]);
        void *hb = b_on_host ? (void *)pb[i] : gt_host_from(pb[i], bytes[i]);
        gt_assert_bitwise(cn, w, dt, ha, hb, bytes[i] / moe_dtype_size(dt), 1);
        free(ha);
        if (!b_on_host) free(hb);
    }
}

/* save_for_backward keeps the forward's routing, GEMM1 output and the shared expert's
 * activations for the backward of the same x: the same bits as recomputing them. */
static void save_for_backward_case(const moe_config *c, moe_dtype dt, uint64_t seed,
                                   const char *cn)
{
    const size_t es = moe_dtype_size(dt), H = c->hidden, T = 40;
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    o.save_for_backward = 1;
    moe_layer *A = gt_layer(c, MOE_BACKEND_CUDA, dt, seed, &o);
    moe_layer *B = gt_layer(c, MOE_BACKEND_CUDA, dt, seed, NULL);
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    void *hx = gt_random(dt, T * H, seed, "test.x", 1.0), *hx2 = gt_random(dt, T * H, seed, "test.x2", 1.0);
    void *hd = gt_random(dt, T * H, seed, "test.dout", 1.0);
    void *x = gt_dev_from(hx, T * H * es), *x2 = gt_dev_from(hx2, T * H * es), *d = gt_dev_from(hd, T * H * es);
    void *oa = gt_dev(T * H * es), *ob = gt_dev(T * H * es), *dxa = gt_dev(T * H * es), *dxb = gt_dev(T * H * es);
    moe_layer_grads ga, gb;
    size_t bytes[6];
    dev_grads(A, &ga, bytes);
    dev_grads(B, &gb, bytes);
    /* forward then backward of the same x: the saved state is used */
    API(moe_layer_forward_async(A, (int64_t)T, x, oa, NULL, st));
    if (!A->saved) fail_msg("%s: the forward kept no state", cn);
    API(moe_layer_backward_async(A, (int64_t)T, x, d, NULL, dxa, &ga, st));
    API(moe_layer_forward_async(B, (int64_t)T, x, ob, NULL, st));
    API(moe_layer_backward_async(B, (int64_t)T, x, d, NULL, dxb, &gb, st));
    CU(cudaStreamSynchronize(st));
    gt_assert_dev_bitwise(cn, "out, saved vs not", dt, oa, ob, T * H, H);
    gt_assert_dev_bitwise(cn, "dx, saved vs recomputed", dt, dxa, dxb, T * H, H);
    assert_grads_equal(cn, "saved vs recomputed", dt, &ga, &gb, bytes, false);
    /* the host calls: forward then backward of the same hidden states */
    void *ho = gt_malloc(T * H * es), *hdx = gt_malloc(T * H * es);
    moe_layer_grads hg;
    host_grads(&hg, bytes);
    moe_tensor_view vx = {dt, 2, {(int64_t)T, (int64_t)H}, hx}, vo = {dt, 2, {(int64_t)T, (int64_t)H}, ho};
    moe_tensor_view vd = {dt, 2, {(int64_t)T, (int64_t)H}, hd}, vdx = {dt, 2, {(int64_t)T, (int64_t)H}, hdx};
    API(moe_layer_forward(A, &vx, &vo, NULL));
    API(moe_layer_backward(A, &vx, &vd, NULL, &vdx, &hg));
    void *hdxb = gt_host_from(dxb, T * H * es);
    gt_assert_bitwise(cn, "host calls: dx, saved vs recomputed", dt, hdx, hdxb, T * H, H);
    assert_grads_equal(cn, "host calls, saved vs recomputed", dt, &gb, &hg, bytes, true);
    /* forward of x, then of x2, then the backward of x: the saved state is x2's, so
     * the backward must recompute (the same bits as B's backward of x) */
    API(moe_layer_forward_async(A, (int64_t)T, x, oa, NULL, st));
    API(moe_layer_forward_async(A, (int64_t)T, x2, oa, NULL, st));
    gt_poison(dxa, T * H * es);
    API(moe_layer_backward_async(A, (int64_t)T, x, d, NULL, dxa, &ga, st));
    CU(cudaStreamSynchronize(st));
    gt_assert_dev_bitwise(cn, "dx of x after a forward of another x", dt, dxa, dxb, T * H, H);
    assert_grads_equal(cn, "after a forward of another x", dt, &ga, &gb, bytes, false);
    /* and a backward of x2 right after its forward: B's backward of x2 */
    API(moe_layer_forward_async(A, (int64_t)T, x2, oa, NULL, st));
    API(moe_layer_backward_async(A, (int64_t)T, x2, d, NULL, dxa, &ga, st));
    API(moe_layer_backward_async(B, (int64_t)T, x2, d, NULL, dxb, &gb, st));
    CU(cudaStreamSynchronize(st));
    gt_assert_dev_bitwise(cn, "dx of x2, saved vs recomputed", dt, dxa, dxb, T * H, H);
    assert_grads_equal(cn, "x2, saved vs recomputed", dt, &ga, &gb, bytes, false);
    fprintf(stderr, "%s: ok\n", cn);
    host_grads_free(&hg);
    void *p[] = {hx, hx2, hd, ho, hdx, hdxb};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
    void *dp[] = {x, x2, d, oa, ob, dxa, dxb};
    for (size_t i = 0; i < sizeof dp / sizeof dp[0]; i++) cudaFree(dp[i]);
    dev_grads_free(&ga);
    dev_grads_free(&gb);
    API(moe_layer_destroy(A));
    API(moe_layer_destroy(B));
    CU(cudaStreamDestroy(st));
}

static void test_save_for_backward(void **state)
{
    (void)state;
    each_tiny_case("save_for_backward", save_for_backward_case);
}

/* ------------------------------------------------------------------ exact_hf_rounding ---- */

/* A layer on caller tensors (copied) with options o. */
static moe_layer *layer_on(const moe_config *c, moe_dtype dt, const moe_weights *w,
                           moe_backend be, const char *kcfg, int exact)
{
    const int64_t E = c->num_experts, H = c->hidden, I = c->inter;
    moe_named_tensor t[3] = {
        {"router", {dt, 2, {E, H}, w->router.data}},
        {"w13", {dt, 3, {E, 2 * I, H}, w->w13.data}},
        {"w2", {dt, 3, {E, H, I}, w->w2.data}},
    };
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_TENSORS;
    src.layout = MOE_LAYOUT_CANONICAL;
    src.tensors = t;
    src.num_tensors = 3;
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    o.backend = be;
    o.dtype = dt;
    o.kernel_config = kcfg;
    o.exact_hf_rounding = exact;
    moe_layer *L = NULL;
    API(moe_layer_create_config(NULL, c, &src, &o, &L));
    return L;
}

static void stages_of(moe_layer *L, const moe_config *c, moe_dtype dt, int T, const void *x,
                      moe_fwd_state *s)
{
    INT(moe_fwd_state_alloc(c, dt, T, true, s, ERR));
    moe_fwd_state_poison(c, dt, s);
    INT(moe_layer_forward_stages(L, T, x, s, ERR));
}

/* GEMM1 with HF's rounding points on the Hopper wgmma kernels. Small integer inputs (|x| <= 7)
 * and dyadic weights (k/64, |k| <= 4) make every product and partial sum of GEMM1 exact in fp32
 * (Llama-4: round(x*score) keeps 8 significant bits of at least score*2^-7, the weights 3 bits
 * of 2^-6 units, the sum at most 112*score: it spans fewer than 22 bits), so any summation
 * order gives the same pre-activations: then exact_hf_rounding's GEMM1 output must equal the
 * mma.sync kernels' and the CPU twin's bit for bit. The fast default computes score*(x W)
 * instead (exact too here), which differs wherever x*score is not a bf16 number. */
static void test_exact_hf_rounding(void **state)
{
    (void)state;
    struct cudaDeviceProp prop;
    int dev = 0;
    CU(cudaGetDevice(&dev));
    CU(cudaGetDeviceProperties(&prop, dev));
    if (prop.major != 9) {
        fprintf(stderr, "not an sm_90 GPU (%s, sm_%d%d): no wgmma kernels to check\n", prop.name,
                prop.major, prop.minor);
        skip();
    }
    uint64_t seed = moe_test_seed();
    const moe_dtype dt = MOE_DTYPE_BF16;
    const int T = 128;
    const moe_config cfgs[2] = {gt_cfg(MOE_ARCH_LLAMA4, 256, 64, 4, 2, 0, false),
                                gt_cfg(MOE_ARCH_QWEN3, 256, 64, 4, 2, 0, true)};
    for (int ci = 0; ci < 2; ci++) {
        const moe_config *c = &cfgs[ci];
        const bool llama = c->arch == MOE_ARCH_LLAMA4;
        const size_t es = 2, H = c->hidden, I = c->inter, E = c->num_experts, k = c->top_k;
        const size_t M = (size_t)T * k;
        moe_weights w;
        INT(moe_weights_random(c, seed, 0, (int)E, dt, &w, ERR));
        uint64_t s13 = moe_rng_stream(seed, "test.exact.w13");
        for (size_t i = 0; i < E * 2 * I * H; i++) /* k/64, k in [-4, 4] */
            moe_store_elem(dt, w.w13.data, i, (double)((int)(moe_rng_u64(s13, i) % 9) - 4) / 64.0);
        for (size_t i = 0; i < E * H; i++) /* logits of about unit size: scores inside (0, 1) */
            moe_store_elem(dt, w.router.data, i, 0.25 * moe_load_elem(dt, w.router.data, i));
        void *x = gt_malloc((size_t)T * H * es);
        uint64_t sx = moe_rng_stream(seed, "test.exact.x");
        /* integers in [-7, 7]: x*score needs up to 11 significant bits, so rounding it to bf16
         * (HF) differs from scaling the accumulators (the fast default) */
        for (size_t i = 0; i < (size_t)T * H; i++)
            moe_store_elem(dt, x, i, (double)((int)(moe_rng_u64(sx, i) % 15) - 7));
        moe_layer *X = layer_on(c, dt, &w, MOE_BACKEND_CUDA, "128x256x64,w12,s4,tma", 1);
        moe_layer *F = layer_on(c, dt, &w, MOE_BACKEND_CUDA, "128x256x64,w12,s4,tma", 0);
        moe_layer *Mm = layer_on(c, dt, &w, MOE_BACKEND_CUDA, "128x128x64,w8,s3", 0);
        moe_fwd_state sX, sF, sM;
        stages_of(X, c, dt, T, x, &sX);
        stages_of(F, c, dt, T, x, &sF);
        stages_of(Mm, c, dt, T, x, &sM);
        const moe_kernel_report *rX = gt_report(X, MOE_GEMM_FWD1), *rF = gt_report(F, MOE_GEMM_FWD1);
        const moe_kernel_report *rM = gt_report(Mm, MOE_GEMM_FWD1);
        fprintf(stderr, "%s GEMM1: exact %s (tma %d, fast_rounding %d), fast %s (tma %d, fast_rounding "
                "%d), mma.sync %s (tma %d, fast_rounding %d)\n", c->name, rX->kernel, rX->used_tma,
                rX->fast_rounding, rF->kernel, rF->used_tma, rF->fast_rounding, rM->kernel,
                rM->used_tma, rM->fast_rounding);
        if (!rX->used_tma || !rF->used_tma || rM->used_tma)
            fail_msg("%s: GEMM1 did not run the kernels asked for (wgmma, wgmma, mma.sync)", c->name);
        if (rX->fast_rounding != 0 || rM->fast_rounding != 0 || rF->fast_rounding != 1)
            fail_msg("%s: GEMM1 reports fast_rounding %d (exact_hf_rounding), %d (mma.sync), %d "
                     "(default); expected 0, 0, 1", c->name, rX->fast_rounding, rM->fast_rounding,
                     rF->fast_rounding);
        /* the same routing everywhere (the router GEMM is cuBLAS in all three) */
        gt_assert_bitwise(c->name, "topk ids, exact vs mma.sync", MOE_DTYPE_I32, sX.topk_ids, sM.topk_ids, M, k);
        gt_assert_bitwise(c->name, "topk ids, fast vs mma.sync", MOE_DTYPE_I32, sF.topk_ids, sM.topk_ids, M, k);
        gt_assert_bitwise(c->name, "gather, exact vs mma.sync", MOE_DTYPE_I32, sX.gather_idx, sM.gather_idx, M, k);
        /* the CPU twin's GEMM1 fed the GPU's routing */
        void *gu = gt_malloc(M * 2 * I * es), *act = gt_malloc(M * I * es);
        moe_grouped_gemm_args g1;
        memset(&g1, 0, sizeof g1);
        g1.dtype = dt;
        g1.num_experts = (int)E;
        g1.expert_offsets = sX.expert_offsets;
        g1.N = 2 * (int)I;
        g1.K = (int)H;
        g1.max_rows = (int)M;
        g1.topk = (int)k;
        g1.gather_idx = sX.gather_idx;
        g1.A = x;
        g1.B = w.w13.data;
        g1.C = act;
        g1.C_preact = gu;
        g1.permute_x = true;
        g1.scale_a_rows = llama ? sX.topk_w : NULL;
        g1.epilogue = MOE_EPI_SILU_MUL;
        INT(cpu_grouped_gemm(&g1, ERR));
        gt_assert_bitwise(c->name, "GEMM1 output: wgmma exact_hf_rounding vs mma.sync", dt, sX.gemm1_out, sM.gemm1_out, M * 2 * I, 2 * I);
        gt_assert_bitwise(c->name, "GEMM1 output: wgmma exact_hf_rounding vs the CPU twin", dt, sX.gemm1_out, gu, M * 2 * I, 2 * I);
        gt_assert_bitwise(c->name, "GEMM1 output: mma.sync vs the CPU twin", dt, sM.gemm1_out, gu, M * 2 * I, 2 * I);
        const double ax = gt_mismatch_share(dt, sX.act, act, M * I), am = gt_mismatch_share(dt, sM.act, act, M * I);
        const double fg = gt_mismatch_share(dt, sF.gemm1_out, gu, M * 2 * I), fa = gt_mismatch_share(dt, sF.act, act, M * I);
        fprintf(stderr, "%s: act differs from the twin's in %.3f%% (exact), %.3f%% (mma.sync) of "
                "elements; the fast default: GEMM1 output %.3f%%, act %.3f%%\n", c->name, 100 * ax,
                100 * am, 100 * fg, 100 * fa);
        if (ax > 0.01 || am > 0.01)
            fail_msg("%s: act differs from the twin's in %.3f%% (exact) / %.3f%% (mma.sync) of "
                     "elements (at most 1%%: SiLU's expf a few ulps apart)", c->name, 100 * ax, 100 * am);
        /* Llama-4's fast default scales the accumulators (x*score never rounded): it must
         * differ, or the flag would be doing nothing */
        if (llama && fg == 0)
            fail_msg("%s: the fast default's GEMM1 output equals HF's rounding points exactly", c->name);
        if (!llama)
            gt_assert_bitwise(c->name, "Qwen3 GEMM1 output (no scale): fast vs the twin", dt, sF.gemm1_out, gu, M * 2 * I, 2 * I);
        moe_fwd_state_free(&sX);
        moe_fwd_state_free(&sF);
        moe_fwd_state_free(&sM);
        API(moe_layer_destroy(X));
        API(moe_layer_destroy(F));
        API(moe_layer_destroy(Mm));
        moe_weights_free(&w);
        free(x);
        free(gu);
        free(act);
    }
}
#endif /* MOE_HAVE_CUDA */

MOE_TEST_GPU_MAIN(
    cmocka_unit_test(test_invalid),         cmocka_unit_test(test_empty_batch),
    cmocka_unit_test(test_nonfinite_logits), cmocka_unit_test(test_token_bound),
    cmocka_unit_test(test_save_for_backward), cmocka_unit_test(test_exact_hf_rounding))
