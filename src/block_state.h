/*
 * block_state.h — host buffers of one forward's named intermediates (moe_fwd_state) for a
 * config, an activation dtype and T tokens. The fused CPU path writes into them; the
 * correctness mode compares them stage by stage.
 *
 * Sizes (E = cfg->num_experts, k = cfg->top_k, H, I, Is = cfg->shared_inter):
 *   router_logits [T,E] dt, topk_ids [T,k] i32, topk_w [T,k] dt, token_counts [E] i32,
 *   expert_offsets [E+1] i32, gather_idx [T*k] i32, act [T*k, I] dt, gemm2_out [T*k, H] dt,
 *   out [T,H] dt; gemm1_out [T*k, 2I] dt only with for_backward; shared_out [T,H] dt only for
 *   Llama-4 with Is > 0. Expert-order buffers hold T*k rows, the most any routing produces.
 */
#ifndef MOE_BLOCK_STATE_H
#define MOE_BLOCK_STATE_H

#include <stdbool.h>

#include "config.h"
#include "moe_stages.h"

/* Allocate every buffer of st (st->T = T, st->M = 0). for_backward keeps gemm1_out.
 * T >= 0 (T = 0 gives valid, empty buffers). On failure nothing stays allocated. */
moe_status moe_fwd_state_alloc(const moe_config *cfg, moe_dtype dt, int T, bool for_backward,
                               moe_fwd_state *st, moe_error *err);
/* Fill every allocated buffer with NaN (floating) or -1 (integers) so an element a stage did
 * not write fails any comparison. cfg and dt must be those given to moe_fwd_state_alloc. */
void moe_fwd_state_poison(const moe_config *cfg, moe_dtype dt, moe_fwd_state *st);
/* Free what moe_fwd_state_alloc allocated and zero st. Safe on a zeroed st. */
void moe_fwd_state_free(moe_fwd_state *st);

#endif /* MOE_BLOCK_STATE_H */
