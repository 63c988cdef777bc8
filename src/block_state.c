/* block_state.c — allocate / poison / free a moe_fwd_state (see block_state.h). */
#include "block_state.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"

/* One buffer of the state: where its pointer lives, its element count and kind. */
typedef struct state_buf {
    void **slot;
    const char *name;
    size_t count;
    bool is_int; /* int32, else dtype */
} state_buf;

enum { MAX_BUFS = 12 };

/* Lists st's buffers for (cfg, T); with for_backward false, gemm1_out is left out. Returns the
 * number listed, or -1 when a size overflows. */
static int list_bufs(const moe_config *cfg, int T, bool for_backward, moe_fwd_state *st,
                     state_buf *b)
{
    size_t t = (size_t)T, E = (size_t)cfg->num_experts, k = (size_t)cfg->top_k;
    size_t H = (size_t)cfg->hidden, I = (size_t)cfg->inter;
    size_t flat, sz[6];
    if (!moe_mul_size(t, k, &flat) || !moe_mul_size(t, E, &sz[0]) ||
        !moe_mul_size(flat, I, &sz[1]) || !moe_mul_size(flat, 2 * I, &sz[2]) ||
        !moe_mul_size(flat, H, &sz[3]) || !moe_mul_size(t, H, &sz[4]))
        return -1;
    int n = 0;
    b[n++] = (state_buf){&st->router_logits, "router_logits", sz[0], false};
    b[n++] = (state_buf){(void **)&st->topk_ids, "topk_ids", flat, true};
    b[n++] = (state_buf){&st->topk_w, "topk_w", flat, false};
    b[n++] = (state_buf){(void **)&st->token_counts, "token_counts", E, true};
    b[n++] = (state_buf){(void **)&st->expert_offsets, "expert_offsets", E + 1, true};
    b[n++] = (state_buf){(void **)&st->gather_idx, "gather_idx", flat, true};
    if (for_backward) b[n++] = (state_buf){&st->gemm1_out, "gemm1_out", sz[2], false};
    b[n++] = (state_buf){&st->act, "act", sz[1], false};
    b[n++] = (state_buf){&st->gemm2_out, "gemm2_out", sz[3], false};
    if (cfg->arch == MOE_ARCH_LLAMA4 && cfg->shared_inter > 0)
        b[n++] = (state_buf){&st->shared_out, "shared_out", sz[4], false};
    b[n++] = (state_buf){&st->out, "out", sz[4], false};
    return n;
}

moe_status moe_fwd_state_alloc(const moe_config *cfg, moe_dtype dt, int T, bool for_backward,
                               moe_fwd_state *st, moe_error *err)
{
    if (!cfg || !st)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_fwd_state_alloc: %s is NULL",
                        !cfg ? "cfg" : "st");
    memset(st, 0, sizeof *st);
    if (T < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_fwd_state_alloc: T = %d < 0", T);
    if (cfg->num_experts < 1 || cfg->top_k < 1 || cfg->hidden < 1 || cfg->inter < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_fwd_state_alloc: config sizes E=%d "
                        "k=%d H=%d I=%d must be >= 1", cfg->num_experts, cfg->top_k,
                        cfg->hidden, cfg->inter);
    if (dt != MOE_DTYPE_BF16 && dt != MOE_DTYPE_F16 && dt != MOE_DTYPE_F32)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "moe_fwd_state_alloc: activation dtype %s, "
                        "expected bf16, fp16 or fp32",
                        moe_dtype_name(dt) ? moe_dtype_name(dt) : "(invalid)");
    state_buf b[MAX_BUFS];
    int n = list_bufs(cfg, T, for_backward, st, b);
    if (n < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_fwd_state_alloc: T = %d makes a buffer "
                        "size overflow", T);
    for (int i = 0; i < n; i++) {
        size_t bytes;
        size_t esz = b[i].is_int ? sizeof(int32_t) : moe_dtype_size(dt);
        if (!moe_mul_size(b[i].count, esz, &bytes)) {
            moe_fwd_state_free(st);
            return moe_fail(err, MOE_ERR_INVALID_ARG, "moe_fwd_state_alloc: %s: size "
                            "overflows", b[i].name);
        }
        void *p = moe_malloc(bytes, b[i].name, err);
        if (!p) {
            moe_fwd_state_free(st);
            return MOE_ERR_NOMEM;
        }
        *b[i].slot = p;
    }
    st->T = T;
    return MOE_OK;
}

void moe_fwd_state_poison(const moe_config *cfg, moe_dtype dt, moe_fwd_state *st)
{
    if (!cfg || !st) return;
    state_buf b[MAX_BUFS];
    int n = list_bufs(cfg, st->T, true, st, b);
    for (int i = 0; i < n; i++) {
        void *p = *b[i].slot;
        if (!p) continue;
        if (b[i].is_int) {
            memset(p, 0xff, b[i].count * sizeof(int32_t));
        } else {
            for (size_t j = 0; j < b[i].count; j++) moe_store_elem_f(dt, p, j, NAN);
        }
    }
}

void moe_fwd_state_free(moe_fwd_state *st)
{
    if (!st) return;
    free(st->router_logits);
    free(st->topk_ids);
    free(st->topk_w);
    free(st->token_counts);
    free(st->expert_offsets);
    free(st->gather_idx);
    free(st->gemm1_out);
    free(st->act);
    free(st->gemm2_out);
    free(st->shared_out);
    free(st->out);
    memset(st, 0, sizeof *st);
}
