/*
 * reference.h — the independent reference: a per-expert loop in HuggingFace's order, in double
 * arithmetic, rounding to `rd` exactly where HF's modules round (docs/DESIGN.md):
 *   Qwen3: logits=rd(x Wg^T); p=softmax(logits) in fp32; top-k; renorm; w=rd(w);
 *          per expert ascending id: g=rd(x Wgate^T), u=rd(x Wup^T), a=rd(silu(g)), h=rd(a*u),
 *          y=rd(h Wdown^T), y=rd(y*w); out=rd(out+y) starting from zeros (index_add_ order).
 *   Llama-4: logits=rd(x Wr^T); top-k; s=rd(sigmoid(top)); xs=rd(x*s); g,u as above with
 *          h=rd(u*silu(g)); y=rd(h W2); routed sum as above; out=rd(shared(x)+routed).
 * rd = MOE_DTYPE_F64 rounds nowhere (the finite-difference gradient checks).
 * Shares no code with the fused path (cpu_fused.h). Weights are read from a moe_weights in
 * canonical layout, element by element through dtype.h.
 */
#ifndef MOE_REFERENCE_H
#define MOE_REFERENCE_H

#include <stdbool.h>
#include <stdint.h>

#include "../weights.h"

typedef struct moe_ref_fwd {
    double *logits;    /* [T, E] */
    int32_t *topk_ids; /* [T, k] */
    double *topk_w;    /* [T, k] weights (Qwen3) / scores (Llama-4), rounded to rd */
    double *out;       /* [T, H] */
    /* [in, optional] [T, k] expert ids to route to instead of the top-k (each token's weights
     * are still its own probabilities / scores of those ids): the correctness mode routes the
     * reference like the fused path, so a near-tie that rounds differently cannot fail the
     * output or gradient comparisons. Ids must be distinct and in [0, E). */
    const int32_t *forced_ids;
} moe_ref_fwd;

/* x [T,H] in double. All outputs caller-allocated. Experts outside w's local slice are skipped
 * (their contribution is absent). */
moe_status ref_forward(const moe_weights *w, moe_dtype rd, int T, const double *x,
                       moe_ref_fwd *out, moe_error *err);

/* Gradients in double, canonical layout, for the loss sum(out * dout).
 * dx [T,H] (may be NULL); d_router [E,H] (may be NULL); per local expert e (index e-begin):
 * d_w13[e] [2I,H] and d_w2[e] [H,I], each may be NULL (skipped, so a --sample check computes
 * only the experts it verifies); d_shared_{gate,up,down} (Llama-4, may be NULL). */
typedef struct moe_ref_grads {
    double *dx;
    double *d_router;
    double **d_w13; /* array of El pointers (entries may be NULL) */
    double **d_w2;
    double *d_shared_gate, *d_shared_up, *d_shared_down;
    const int32_t *forced_ids; /* [in, optional] as in moe_ref_fwd */
} moe_ref_grads;

moe_status ref_backward(const moe_weights *w, moe_dtype rd, int T, const double *x,
                        const double *dout, moe_ref_grads *g, moe_error *err);

/* Stage references used by the correctness mode, fed the fused path's own upstream values:
 * routing of one token's logits row [E] -> ids [k], weights [k] (rounded to rd). */
void ref_route_row(const moe_config *cfg, moe_dtype rd, const double *logits_row, int32_t *ids,
                   double *wts);
/* One routed row: expert e (global id) on input row x [H] (already scaled for Llama-4),
 * producing g,u [I] each (may be NULL), act [I] and y [H] (before any weight multiply). */
void ref_expert_row(const moe_weights *w, moe_dtype rd, int e, const double *x, double *g,
                    double *u, double *act, double *y);
/* The same for n rows of one expert at once (x [n,H] -> g,u,act [n,I], y [n,H]): converts the
 * expert's weights once instead of once per row. */
void ref_expert_rows(const moe_weights *w, moe_dtype rd, int e, int n, const double *x,
                     double *g, double *u, double *act, double *y);

#endif /* MOE_REFERENCE_H */
