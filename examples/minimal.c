/*
 * minimal.c — the smallest program using moe-ep's public API: one MoE layer (the tiny-qwen3
 * preset, random weights from seed 1) on the CPU in fp32, the forward of a few tokens of
 * fixed input, and the sum of the output. Uses nothing but <moe_ep.h>.
 *
 *   cc minimal.c $(pkg-config --cflags --libs moe_ep) -o minimal && ./minimal
 *
 * (examples/README.md; with CMake, examples/CMakeLists.txt). Exits non-zero on any error,
 * printing moe_last_error().
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <moe_ep.h>

/* Run a moe-ep call; on failure print the reason and leave through `fail`. */
#define CHECK(call)                                                                           \
    do {                                                                                      \
        moe_status st_ = (call);                                                              \
        if (st_ != MOE_OK) {                                                                  \
            fprintf(stderr, "minimal: %s: %s: %s\n", #call, moe_strerror(st_),                \
                    moe_last_error());                                                        \
            goto fail;                                                                        \
        }                                                                                     \
    } while (0)

int main(void)
{
    enum { T = 4 }; /* tokens */
    moe_layer *layer = NULL;
    float *x = NULL, *y = NULL;
    int rc = 1;

    /* The library loaded must be the one this program was compiled against. */
    printf("moe-ep %s\n", moe_version_string());
    if (moe_version() != MOE_EP_VERSION_CODE) {
        fprintf(stderr, "minimal: compiled against moe-ep %s (%d) but running with %s (%d)\n",
                MOE_EP_VERSION_STRING, MOE_EP_VERSION_CODE, moe_version_string(),
                moe_version());
        return 1;
    }

    /* A layer of the tiny-qwen3 preset with random weights, on the CPU, in fp32. */
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_RANDOM;
    src.seed = 1;
    moe_layer_options opts = MOE_LAYER_OPTIONS_INIT;
    opts.backend = MOE_BACKEND_CPU;
    opts.dtype = MOE_DTYPE_F32;
    CHECK(moe_layer_create("tiny-qwen3", &src, &opts, &layer));

    moe_layer_info info = MOE_LAYER_INFO_INIT;
    CHECK(moe_layer_info_get(layer, &info));
    const int H = info.hidden;
    printf("layer: hidden %d, %d experts (top-%d), on %s\n", H, info.num_experts, info.top_k,
           info.device_name);

    /* T tokens of fixed input, x[t][h] in [-1, 1). */
    x = malloc(sizeof(float) * T * H);
    y = malloc(sizeof(float) * T * H);
    if (!x || !y) {
        fprintf(stderr, "minimal: out of memory\n");
        goto fail;
    }
    for (int i = 0; i < T * H; i++) x[i] = (float)((i * 37) % 64 - 32) / 32.0f;

    moe_tensor_view hidden = {MOE_DTYPE_F32, 2, {T, H, 0, 0}, x};
    moe_tensor_view out = {MOE_DTYPE_F32, 2, {T, H, 0, 0}, y};
    CHECK(moe_layer_forward(layer, &hidden, &out, NULL));

    double sum = 0.0;
    for (int i = 0; i < T * H; i++) sum += y[i];
    if (!isfinite(sum)) {
        fprintf(stderr, "minimal: the output is not finite\n");
        goto fail;
    }
    printf("forward of %d tokens: sum of the output %.6f\n", T, sum);
    rc = 0;

fail:
    if (layer && moe_layer_destroy(layer) != MOE_OK) {
        fprintf(stderr, "minimal: moe_layer_destroy: %s\n", moe_last_error());
        rc = 1;
    }
    free(x);
    free(y);
    return rc;
}
