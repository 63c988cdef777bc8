/* hf_fixtures.h — runs `moe-ep forward` / `moe-ep backward` on the HuggingFace-made fixtures in
 * tests/fixtures/hf (see its README) and compares with what the real HF modules computed. Used by
 * test_hf_fixtures (CPU backend) and test_gpu_hf_fixtures (CUDA backend). */
#ifndef MOE_HF_FIXTURES_H
#define MOE_HF_FIXTURES_H

#include <stdbool.h>

/* Every fixture through the program on `backend` ("cpu" or "cuda"), with the extra options
 * `extra` (NULL: none; e.g. "--exact-hf-rounding") given to forward and backward;
 * cmocka-asserts. Each compared tensor's relative error to HF's prints as one line. */
void moe_hf_fixtures_run_all(const char *backend, const char *extra);

#endif
