/*
 * test_util.h — shared harness for moe-ep's cmocka tests.
 *
 * TESTS OVERVIEW
 *  - Every test that draws random data calls moe_test_seed() once: a fresh seed per run (from
 *    the clock), printed so a failure can be replayed with MOE_TEST_SEED=<seed>.
 *  - GPU tests call moe_test_require_gpu() in main() (MOE_TEST_GPU_MAIN writes such a main()):
 *    without a usable GPU it returns 77 (ctest's SKIP_RETURN_CODE), or fails when
 *    MOE_REQUIRE_GPU=1 is set.
 *  - moe_test_rel_err(): ||a-b|| / ||b|| over doubles; moe_test_assert_close(): that AND the
 *    worst row within 10x, as docs/DESIGN.md "Tolerances" says; NaN never passes.
 *  - cmocka includes are here (setjmp/stdarg/stddef order matters).
 */
#ifndef MOE_TEST_UTIL_H
#define MOE_TEST_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>

#include "moe_ep.h"

#define MOE_TEST_SKIP 77

uint64_t moe_test_seed(void);
/* 0 if a GPU is usable; else MOE_TEST_SKIP (or 1 with MOE_REQUIRE_GPU=1), printing why. */
int moe_test_require_gpu(void);
/* main() of a single-process GPU test, its tests (cmocka_unit_test(...), ...) defined in CUDA
 * builds only: without a usable GPU it skips (or fails with MOE_REQUIRE_GPU=1), else runs them.
 * A build without CUDA never names them (it never has a usable GPU; 1 if it did). */
#ifdef MOE_HAVE_CUDA
#define MOE_TEST_GPU_MAIN(...)                                                                \
    int main(void)                                                                            \
    {                                                                                         \
        int rc_ = moe_test_require_gpu();                                                     \
        if (rc_) return rc_;                                                                  \
        const struct CMUnitTest tests[] = {__VA_ARGS__};                                      \
        return cmocka_run_group_tests(tests, NULL, NULL);                                     \
    }
#else
#define MOE_TEST_GPU_MAIN(...)                                                                \
    int main(void)                                                                            \
    {                                                                                         \
        int rc_ = moe_test_require_gpu();                                                     \
        return rc_ ? rc_ : 1;                                                                 \
    }
#endif
/* The fields of moe_layer_grads in order (router, w13, w2, shared gate, up, down): their names
 * ("d router", ...) and field i of g. */
extern const char *const moe_test_grad_names[6];
void **moe_test_grad_slot(moe_layer_grads *g, int i);
/* Global relative error; +inf if either has a NaN or ref is zero while a is not. */
double moe_test_rel_err(const double *a, const double *ref, size_t n);
/* Check rows x cols: global rel err <= tol and every row's rel err <= 10*tol (a zero reference
 * row must be exactly zero). Prints the worst row on failure. Returns true when within. */
bool moe_test_close(const char *what, const double *a, const double *ref, size_t rows,
                    size_t cols, double tol);
/* moe_test_close over the rows r with skip[r] false (skip NULL: every row): a and ref are
 * compacted in place (the kept rows first). */
bool moe_test_close_kept(const char *what, double *a, double *ref, size_t rows, size_t cols,
                         const bool *skip, double tol);
#define moe_test_assert_close(what, a, ref, rows, cols, tol) \
    assert_true(moe_test_close((what), (a), (ref), (rows), (cols), (tol)))
/* Default tolerance of a dtype (docs/DESIGN.md): bf16 1e-2, fp16 1e-3, fp32 1e-5; grad=true: fp32 1e-4. */
double moe_test_tol(moe_dtype dt, bool grad);
/* Router backward of one token in double, written from the math (not the library's code):
 * logits [E] (as the layer rounded them), its top-k ids [k] and dL/d(routing weight j) dw [k]
 * -> dl [E]. Qwen3 (llama = false): softmax over E, renormalised over the k when norm (then
 * only the k selected logits get gradient); Llama-4: sigmoid of each selected logit. */
void moe_test_router_bwd_ref(bool llama, bool norm, int E, int k, const double *logits,
                             const int32_t *id, const double *dw, double *dl);

#endif /* MOE_TEST_UTIL_H */
