/* engine.c — backend dispatch for one MoE block (see engine.h). */
#include "engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "block_state.h"
#include "cpu/cpu_fused.h"

const char *const moe_phase_names[MOE_PHASE_COUNT] = {"route", "permute", "gemm1", "act", "gemm2", "combine"};

struct moe_engine {
    moe_backend backend;
    const moe_weights *w;
    moe_dtype dt;
    int max_T;
    char desc[160];
};

moe_status moe_engine_create(moe_backend backend, const moe_weights *w, moe_dtype dt, int max_T,
                             moe_engine **out, moe_error *err)
{
    *out = NULL;
    if (max_T < 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "engine: max_T %d < 0", max_T);
    if (dt != MOE_DTYPE_BF16 && dt != MOE_DTYPE_F16 && dt != MOE_DTYPE_F32)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "engine: dtype %s is not computed (bf16, fp16, fp32)",
                        moe_dtype_name(dt) ? moe_dtype_name(dt) : "?");
    if (backend == MOE_BACKEND_CUDA) {
#ifdef MOE_HAVE_CUDA
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "engine: the CUDA backend is not wired in yet");
#else
        return moe_fail(err, MOE_ERR_NO_DEVICE,
                        "the CUDA backend was requested but this build has none (configured with "
                        "MOE_ENABLE_CUDA=OFF or without a CUDA toolkit); use --backend cpu");
#endif
    }
    moe_engine *e = moe_calloc(1, sizeof *e, "engine", err);
    if (!e) return MOE_ERR_NOMEM;
    e->backend = backend;
    e->w = w;
    e->dt = dt;
    e->max_T = max_T;
    snprintf(e->desc, sizeof e->desc, "cpu (%d threads)", omp_get_max_threads());
    *out = e;
    return MOE_OK;
}

void moe_engine_destroy(moe_engine *e) { free(e); }

const char *moe_engine_describe(const moe_engine *e) { return e->desc; }

moe_status moe_engine_forward(moe_engine *e, int T, const void *x, moe_fwd_state *st,
                              moe_error *err)
{
    if (T < 0 || T > e->max_T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "forward: T=%d outside 0..%d", T, e->max_T);
    return cpu_block_forward(e->w, e->dt, T, x, st, err);
}

moe_status moe_engine_backward(moe_engine *e, int T, const void *x, const moe_fwd_state *st,
                               const void *dout, void *dx, moe_weights *grads, moe_error *err)
{
    if (T < 0 || T > e->max_T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "backward: T=%d outside 0..%d", T, e->max_T);
    return cpu_block_backward(e->w, e->dt, T, x, st, dout, dx, grads, err);
}

moe_status moe_engine_time(moe_engine *e, moe_bench_mode mode, int T, const void *const *xs,
                           const void *dout, int rotate, int warmup, int iters, double *times_ms,
                           double *phase_ms, moe_error *err)
{
    if (T < 1 || T > e->max_T)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "bench: T=%d outside 1..%d", T, e->max_T);
    if (rotate < 1 || warmup < 0 || iters < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "bench: rotate %d, warmup %d, iters %d", rotate,
                        warmup, iters);
    const moe_config *c = &e->w->cfg;
    moe_fwd_state st;
    moe_weights grads = {0};
    void *dx = NULL;
    moe_status s = moe_fwd_state_alloc(c, e->dt, T, mode != MOE_BENCH_FWD, &st, err);
    if (s != MOE_OK) return s;
    if (mode != MOE_BENCH_FWD) {
        dx = moe_malloc((size_t)T * c->hidden * moe_dtype_size(e->dt), "bench dx", err);
        if (!dx) { s = MOE_ERR_NOMEM; goto done; }
        if ((s = moe_weights_zeros_like(e->w, e->dt, &grads, err)) != MOE_OK) goto done;
        /* the backward-only mode times backward after one untimed forward per input set */
    }
    for (int i = 0; i < warmup + iters; i++) {
        const void *x = xs[i % rotate];
        double t0 = moe_now();
        if (mode == MOE_BENCH_BWD) {
            if ((s = cpu_block_forward(e->w, e->dt, T, x, &st, err)) != MOE_OK) goto done;
            t0 = moe_now();
        } else if ((s = cpu_block_forward(e->w, e->dt, T, x, &st, err)) != MOE_OK) {
            goto done;
        }
        if (mode != MOE_BENCH_FWD &&
            (s = cpu_block_backward(e->w, e->dt, T, x, &st, dout, dx, &grads, err)) != MOE_OK)
            goto done;
        if (i >= warmup) times_ms[i - warmup] = 1e3 * (moe_now() - t0);
    }
    if (phase_ms)
        for (int p = 0; p < MOE_PHASE_COUNT; p++) phase_ms[p] = NAN; /* CPU: not split yet */
done:
    moe_fwd_state_free(&st);
    moe_weights_free(&grads);
    free(dx);
    return s;
}
