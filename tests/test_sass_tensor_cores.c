/*
 * test_sass_tensor_cores.c — the bf16/fp16 grouped GEMM kernels really run on tensor cores:
 * disassemble this very executable (which links the kernels, see `keep` below) with
 * `cuobjdump --dump-sass` and require an HMMA (mma.sync) or HGMMA (wgmma) instruction in every
 * tensor-core grouped GEMM kernel (moe_gg_mma_kernel<...>, moe_gg_dw_mma_kernel<...>), and at
 * least one of each family; the Hopper kernels (moe_gg_wgmma_kernel<...> forward/dX,
 * moe_gg_dw_wgmma_kernel<...> dW) must show HGMMA in their sm_90a code, and there must be some
 * of each, and their wgmmas must be batched: at least one HGMMA without the `gsb0` wait flag
 * (a kernel whose every HGMMA carries it runs them one at a time: ptxas does that when it
 * cannot keep the accumulators in flight, "wgmma.mma_async instructions are serialized",
 * which the round-4 dW kernels did unnoticed). Needs no GPU: it reads the embedded cubins.
 *
 * Exit 77 (skip) on a build without CUDA. cuobjdump is looked up in $CUOBJDUMP, $PATH,
 * $CUDA_HOME/bin, $CUDA_PATH/bin and /usr/local/cuda/bin (it needs nvdisasm beside it or on
 * $PATH / $NVDISASM_PATH); when it cannot be found or cannot disassemble, the test skips with
 * the reason, unless MOE_REQUIRE_SASS=1, which makes that a failure.
 */
#include "test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_HAVE_CUDA
#include <unistd.h>

#include "moe_kernels.h"

/* Referencing the launchers makes the linker pull the kernel objects out of the static library
 * (libmoe_ep_internal.a). */
typedef moe_status (*gg_fn)(const moe_grouped_gemm_args *, const moe_kernel_config *,
                            const moe_kernel_tuning *, cudaStream_t, moe_kernel_report *,
                            moe_error *);
typedef moe_status (*gw_fn)(const moe_grouped_gemm_dw_args *, const moe_kernel_config *,
                            const moe_kernel_tuning *, cudaStream_t, moe_kernel_report *,
                            moe_error *);
static volatile gg_fn keep_fwd = moe_cuda_grouped_gemm;
static volatile gw_fn keep_dw = moe_cuda_grouped_gemm_dw;

static bool executable(const char *p) { return p && *p && access(p, X_OK) == 0; }

static bool find_tool(char *out, size_t len)
{
    const char *env = getenv("CUOBJDUMP");
    if (executable(env)) {
        snprintf(out, len, "%s", env);
        return true;
    }
    const char *path = getenv("PATH");
    if (path) {
        char *copy = strdup(path), *save = NULL;
        for (char *d = strtok_r(copy, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
            snprintf(out, len, "%s/cuobjdump", d);
            if (executable(out)) {
                free(copy);
                return true;
            }
        }
        free(copy);
    }
    const char *roots[] = {getenv("CUDA_HOME"), getenv("CUDA_PATH"), "/usr/local/cuda"};
    for (size_t i = 0; i < sizeof roots / sizeof roots[0]; i++) {
        if (!roots[i] || !*roots[i]) continue;
        snprintf(out, len, "%s/bin/cuobjdump", roots[i]);
        if (executable(out)) return true;
    }
    return false;
}

static bool required(void)
{
    const char *r = getenv("MOE_REQUIRE_SASS");
    return r && strcmp(r, "1") == 0;
}

#define MAX_KERNELS 512

static int g_skip_reason; /* set by the test when the tool is unusable */

static void test_grouped_gemm_sass(void **state)
{
    (void)state;
    assert_non_null((void *)keep_fwd);
    assert_non_null((void *)keep_dw);
    char tool[1024], self[1024], cmd[2300];
    if (!find_tool(tool, sizeof tool)) {
        fprintf(stderr, "cuobjdump not found ($CUOBJDUMP, $PATH, $CUDA_HOME/bin, "
                        "/usr/local/cuda/bin); install the CUDA toolkit's cuobjdump and nvdisasm "
                        "(e.g. pip nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)\n");
        if (required()) fail_msg("MOE_REQUIRE_SASS=1 and no cuobjdump");
        g_skip_reason = 1;
        skip();
    }
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    assert_true(n > 0);
    self[n] = '\0';
    snprintf(cmd, sizeof cmd, "'%s' --dump-sass '%s' 2>&1", tool, self);
    fprintf(stderr, "running: %s\n", cmd);
    FILE *f = popen(cmd, "r");
    assert_non_null(f);

    static char names[MAX_KERNELS][512];
    static int hmma[MAX_KERNELS];
    static int batched[MAX_KERNELS]; /* HGMMAs that do not wait for themselves (no gsb0) */
    static bool wgmma[MAX_KERNELS];
    int nk = 0, cur = -1, lines = 0, ffma_kernels = 0;
    bool sm90a = false, any90a = false; /* the cubin being listed is sm_90a code; any was */
    bool tool_broken = false;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        lines++;
        if (strstr(line, "cuobjdump fatal") || strstr(line, "nvdisasm fatal")) {
            fprintf(stderr, "%s", line);
            tool_broken = true;
        }
        if (strstr(line, "code for sm_")) {
            sm90a = strstr(line, "code for sm_90a") != NULL;
            any90a |= sm90a;
        }
        const char *fn = strstr(line, "Function : ");
        if (fn) {
            fn += strlen("Function : ");
            cur = -1;
            if (strstr(fn, "moe_gg_ffma_kernel") || strstr(fn, "moe_gg_dw_ffma_kernel")) ffma_kernels++;
            const bool wg = (strstr(fn, "moe_gg_wgmma_kernel") || strstr(fn, "moe_gg_dw_wgmma_kernel")) && sm90a;
            if ((strstr(fn, "moe_gg_mma_kernel") || strstr(fn, "moe_gg_dw_mma_kernel") || wg) &&
                nk < MAX_KERNELS) {
                cur = nk++;
                snprintf(names[cur], sizeof names[cur], "%s", fn);
                names[cur][strcspn(names[cur], "\n")] = '\0';
                hmma[cur] = 0;
                batched[cur] = 0;
                wgmma[cur] = wg;
            }
            continue;
        }
        if (cur >= 0 && (wgmma[cur] ? strstr(line, "HGMMA") != NULL
                                    : (strstr(line, "HMMA") || strstr(line, "HGMMA"))))
            hmma[cur]++;
        if (cur >= 0 && wgmma[cur] && strstr(line, "HGMMA") && !strstr(line, "gsb0")) batched[cur]++;
    }
    int rc = pclose(f);
    if (tool_broken || (rc != 0 && nk == 0)) {
        fprintf(stderr, "cuobjdump could not disassemble (exit %d); it needs nvdisasm on $PATH or "
                        "$NVDISASM_PATH\n", rc);
        if (required()) fail_msg("MOE_REQUIRE_SASS=1 and cuobjdump failed");
        g_skip_reason = 1;
        skip();
    }
    int fwd = 0, dw = 0, wg = 0, wg_dw = 0, without = 0, serialized = 0;
    for (int i = 0; i < nk; i++) {
        bool is_dw = strstr(names[i], "moe_gg_dw_mma_kernel") != NULL;
        fwd += !is_dw && !wgmma[i];
        dw += is_dw;
        wg += wgmma[i] && !strstr(names[i], "moe_gg_dw_wgmma_kernel");
        wg_dw += wgmma[i] && strstr(names[i], "moe_gg_dw_wgmma_kernel");
        if (hmma[i] == 0) {
            fprintf(stderr, "NO %s instruction in %s\n", wgmma[i] ? "HGMMA" : "tensor-core",
                    names[i]);
            without++;
        }
        if (wgmma[i] && hmma[i] > 0 && batched[i] == 0) {
            fprintf(stderr, "SERIALIZED wgmma (every HGMMA waits, gsb0) in %s\n", names[i]);
            serialized++;
        }
    }
    fprintf(stderr, "%d SASS lines; %d forward (mma.sync), %d wgmma forward/dX and %d wgmma dW "
                    "(sm_90a), %d dW (mma.sync) tensor-core grouped GEMM kernels, %d without "
                    "HMMA/HGMMA, %d with serialized wgmma; %d FFMA (fp32) kernels\n",
            lines, fwd, wg, wg_dw, dw, without, serialized, ffma_kernels);
    assert_true(fwd > 0);
    assert_true(dw > 0);
    if (any90a) { /* a build for other targets has no wgmma kernels */
        assert_true(wg > 0);
        assert_true(wg_dw > 0);
    }
    assert_int_equal(without, 0);
    assert_int_equal(serialized, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_grouped_gemm_sass)};
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    /* cmocka reports a skipped test as success; tell ctest it was skipped. */
    if (rc == 0 && g_skip_reason) return MOE_TEST_SKIP;
    return rc;
}

#else

int main(void)
{
    fprintf(stderr, "SKIPPED: this build has no CUDA backend, so no kernels to disassemble\n");
    return MOE_TEST_SKIP;
}

#endif
