/* layer_weights.c — a layer's weights from caller-owned tensors in a named layout
 * (MOE_WEIGHTS_TENSORS): copied into the canonical host layout (weights.h), or borrowed in
 * place when the layout already is canonical. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../dtype.h"
#include "layer_internal.h"

static const moe_tensor_view *find(const moe_named_tensor *t, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (t[i].name && strcmp(t[i].name, name) == 0) return &t[i].view;
    return NULL;
}

static bool is_float(moe_dtype d)
{
    return d == MOE_DTYPE_BF16 || d == MOE_DTYPE_F16 || d == MOE_DTYPE_F32;
}

/* A tensor named `name` of shape [d0, d1] ([d1] rows of d2 when ndim 3); E-or-El leading
 * dims are checked by the caller. */
static moe_status get(const moe_named_tensor *t, int n, const char *name, int ndim,
                      const int64_t *shape, const moe_tensor_view **out, moe_error *err)
{
    const moe_tensor_view *v = find(t, n, name);
    char want[96], got[96];
    moe_shape_str(ndim, shape, want, sizeof want);
    if (!v)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: no tensor named '%s' (expected %s)",
                        name, want);
    if (!v->data)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: tensor '%s' has no data", name);
    if (!is_float(v->dtype))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "weights: tensor '%s' is %s; expected bf16, fp16 or fp32", name,
                        moe_dtype_name(v->dtype) ? moe_dtype_name(v->dtype) : "an unknown dtype");
    if (v->ndim < 1 || v->ndim > 4)
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "weights: tensor '%s' has ndim %d (a view has 1..4 dims), expected %s",
                        name, v->ndim, want);
    bool same = v->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = v->shape[i] == shape[i];
    if (!same) {
        moe_shape_str(v->ndim, v->shape, got, sizeof got);
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: tensor '%s' has shape %s, expected %s",
                        name, got, want);
    }
    *out = v;
    return MOE_OK;
}

/* A fused [E or El, a, b] tensor: its leading dim tells whether it holds every expert (each
 * rank reads its own) or exactly this rank's, in ascending id order. */
static moe_status get_fused(const moe_named_tensor *t, int n, const char *name, int E, int El,
                            int64_t a, int64_t b, const moe_tensor_view **out, bool *global,
                            moe_error *err)
{
    const moe_tensor_view *v = find(t, n, name);
    int64_t lead = v && v->ndim == 3 ? v->shape[0] : E;
    if (lead != E && lead != El) lead = E; /* reported against the full shape */
    int64_t shape[3] = {lead, a, b};
    MOE_TRY(get(t, n, name, 3, shape, out, err));
    *global = lead == E;
    return MOE_OK;
}

static void convert(const moe_tensor_view *src, size_t src_off, void *dst, moe_dtype dt,
                    size_t n)
{
    for (size_t i = 0; i < n; i++)
        moe_store_elem_f(dt, dst, i, moe_load_elem_f(src->dtype, src->data, src_off + i));
}

/* [a, b] block at src_off -> [b, a] into dst (Llama-4's experts to the canonical layout). */
static void transpose(const moe_tensor_view *src, size_t src_off, int64_t a, int64_t b,
                      void *dst, moe_dtype dt)
{
    for (int64_t i = 0; i < a; i++)
        for (int64_t j = 0; j < b; j++)
            moe_store_elem_f(dt, dst, (size_t)(j * a + i),
                             moe_load_elem_f(src->dtype, src->data, src_off + (size_t)(i * b + j)));
}

/* The layout is one of moe_weights_layout and fits the model's architecture. */
static moe_status check_layout(const moe_config *cfg, moe_weights_layout lay, moe_error *err)
{
    if ((int)lay < MOE_LAYOUT_CANONICAL || lay > MOE_LAYOUT_LLAMA4)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: layout %d is not a moe_weights_layout",
                        (int)lay);
    const bool llama = cfg->arch == MOE_ARCH_LLAMA4;
    if ((lay == MOE_LAYOUT_LLAMA4 && !llama) ||
        ((lay == MOE_LAYOUT_QWEN3_HUB || lay == MOE_LAYOUT_QWEN3_FUSED) && llama))
        return moe_fail(err, MOE_ERR_INVALID_ARG,
                        "weights: layout %s does not fit a %s model",
                        lay == MOE_LAYOUT_LLAMA4 ? "LLAMA4" : "QWEN3", llama ? "Llama-4" : "Qwen3");
    return MOE_OK;
}

static const char *router_name(moe_weights_layout lay)
{
    return lay == MOE_LAYOUT_CANONICAL ? "router"
           : lay == MOE_LAYOUT_LLAMA4  ? "router.weight"
                                       : "gate.weight";
}

moe_status layer_weights_from_tensors(const moe_config *cfg, moe_dtype dt,
                                      moe_weights_layout lay, const moe_named_tensor *t, int n,
                                      const int32_t *ids, int El, moe_weights *w,
                                      moe_error *err)
{
    if (!t || n < 1)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: MOE_WEIGHTS_TENSORS with no tensors");
    MOE_TRY(check_layout(cfg, lay, err));
    MOE_TRY(moe_weights_zeros_ids(cfg, ids, El, dt, w, err));
    const int E = cfg->num_experts;
    const int64_t H = cfg->hidden, I = cfg->inter, Is = cfg->shared_inter;
    const size_t es = moe_dtype_size(dt);
    const moe_tensor_view *v;
    moe_status st;
    int64_t sr[2] = {E, H};
    MOE_TRY_GOTO(get(t, n, router_name(lay), 2, sr, &v, err), st, fail);
    convert(v, 0, w->router.data, dt, (size_t)(E * H));
    bool global = false;
    switch (lay) {
    case MOE_LAYOUT_CANONICAL:
    case MOE_LAYOUT_QWEN3_FUSED: {
        const char *n13 = lay == MOE_LAYOUT_CANONICAL ? "w13" : "experts.gate_up_proj";
        const char *n2 = lay == MOE_LAYOUT_CANONICAL ? "w2" : "experts.down_proj";
        MOE_TRY_GOTO(get_fused(t, n, n13, E, El, 2 * I, H, &v, &global, err), st, fail);
        for (int l = 0; l < El; l++)
            convert(v, (size_t)(global ? ids[l] : l) * 2 * I * H,
                    (char *)w->w13.data + (size_t)l * 2 * I * H * es, dt, (size_t)(2 * I * H));
        MOE_TRY_GOTO(get_fused(t, n, n2, E, El, H, I, &v, &global, err), st, fail);
        for (int l = 0; l < El; l++)
            convert(v, (size_t)(global ? ids[l] : l) * H * I,
                    (char *)w->w2.data + (size_t)l * H * I * es, dt, (size_t)(H * I));
        w->naming = lay == MOE_LAYOUT_CANONICAL ? MOE_NAMING_RANDOM : MOE_NAMING_QWEN3_FUSED;
        break;
    }
    case MOE_LAYOUT_QWEN3_HUB: {
        static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int l = 0; l < El; l++)
            for (int p = 0; p < 3; p++) {
                char name[128];
                snprintf(name, sizeof name, "experts.%d.%s.weight", ids[l], proj[p]);
                int64_t s[2] = {p == 2 ? H : I, p == 2 ? I : H};
                MOE_TRY_GOTO(get(t, n, name, 2, s, &v, err), st, fail);
                char *dst = p == 2 ? (char *)w->w2.data + (size_t)l * H * I * es
                                   : (char *)w->w13.data + (size_t)(l * 2 + p) * I * H * es;
                convert(v, 0, dst, dt, (size_t)(I * H));
            }
        w->naming = MOE_NAMING_QWEN3_PER_EXPERT;
        break;
    }
    case MOE_LAYOUT_LLAMA4:
        /* gate_up_proj [E,H,2I] -> w13 [El,2I,H]; down_proj [E,I,H] -> w2 [El,H,I] */
        MOE_TRY_GOTO(get_fused(t, n, "experts.gate_up_proj", E, El, H, 2 * I, &v, &global, err),
                     st, fail);
        for (int l = 0; l < El; l++)
            transpose(v, (size_t)(global ? ids[l] : l) * H * 2 * I, H, 2 * I,
                      (char *)w->w13.data + (size_t)l * 2 * I * H * es, dt);
        MOE_TRY_GOTO(get_fused(t, n, "experts.down_proj", E, El, I, H, &v, &global, err), st,
                     fail);
        for (int l = 0; l < El; l++)
            transpose(v, (size_t)(global ? ids[l] : l) * I * H, I, H,
                      (char *)w->w2.data + (size_t)l * H * I * es, dt);
        w->naming = MOE_NAMING_LLAMA4;
        break;
    }
    if (Is > 0) {
        const bool canon = lay == MOE_LAYOUT_CANONICAL;
        int64_t sg[2] = {Is, H}, sd[2] = {H, Is};
        MOE_TRY_GOTO(get(t, n, canon ? "shared_gate" : "shared_expert.gate_proj.weight", 2, sg,
                         &v, err), st, fail);
        convert(v, 0, w->shared_gate.data, dt, (size_t)(Is * H));
        MOE_TRY_GOTO(get(t, n, canon ? "shared_up" : "shared_expert.up_proj.weight", 2, sg, &v,
                         err), st, fail);
        convert(v, 0, w->shared_up.data, dt, (size_t)(Is * H));
        MOE_TRY_GOTO(get(t, n, canon ? "shared_down" : "shared_expert.down_proj.weight", 2, sd,
                         &v, err), st, fail);
        convert(v, 0, w->shared_down.data, dt, (size_t)(H * Is));
    }
    return MOE_OK;
fail:
    moe_weights_free(w);
    return st;
}

moe_status layer_weights_borrow(const moe_config *cfg, moe_dtype dt, moe_weights_layout lay,
                                const moe_named_tensor *t, int n, const int32_t *ids, int El,
                                moe_layer_weights *out, moe_error *err)
{
    /* a layout that does not fit the model is an argument error, borrowed or not */
    MOE_TRY(check_layout(cfg, lay, err));
    if (lay != MOE_LAYOUT_CANONICAL && lay != MOE_LAYOUT_QWEN3_FUSED)
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "weights: borrowing (read in place) needs the canonical or Qwen3 fused "
                        "layout, whose expert tensors the kernels read as they are; pass "
                        "borrow = 0 to copy a %s layout", lay == MOE_LAYOUT_LLAMA4 ? "Llama-4"
                                                                                  : "per-expert");
    if (cfg->arch != MOE_ARCH_QWEN3 && cfg->shared_inter > 0)
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "weights: borrowing a model with a shared expert is not supported (its "
                        "gate and up must be one stacked matrix); pass borrow = 0");
    for (int l = 1; l < El; l++)
        if (ids[l] != ids[0] + l)
            return moe_fail(err, MOE_ERR_UNSUPPORTED,
                            "weights: borrowing needs this rank's experts to be one contiguous "
                            "range (they are not under this expert map); pass borrow = 0");
    const int E = cfg->num_experts;
    const int64_t H = cfg->hidden, I = cfg->inter;
    const moe_tensor_view *v;
    int64_t sr[2] = {E, H};
    MOE_TRY(get(t, n, router_name(lay), 2, sr, &v, err));
    if (v->dtype != dt)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: borrowed tensors must be in the "
                        "layer's dtype %s (the router is %s)", moe_dtype_name(dt),
                        moe_dtype_name(v->dtype));
    out->router = v->data;
    const char *n13 = lay == MOE_LAYOUT_CANONICAL ? "w13" : "experts.gate_up_proj";
    const char *n2 = lay == MOE_LAYOUT_CANONICAL ? "w2" : "experts.down_proj";
    bool global = false;
    const size_t es = moe_dtype_size(dt);
    const size_t first = El > 0 ? (size_t)ids[0] : 0;
    MOE_TRY(get_fused(t, n, n13, E, El, 2 * I, H, &v, &global, err));
    if (v->dtype != dt)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: borrowed '%s' must be %s", n13,
                        moe_dtype_name(dt));
    out->w13 = (char *)v->data + (global ? first * 2 * I * H * es : 0);
    MOE_TRY(get_fused(t, n, n2, E, El, H, I, &v, &global, err));
    if (v->dtype != dt)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "weights: borrowed '%s' must be %s", n2,
                        moe_dtype_name(dt));
    out->w2 = (char *)v->data + (global ? first * H * I * es : 0);
    out->shared_gu = out->shared_down = NULL;
    return MOE_OK;
}
