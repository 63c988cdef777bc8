/*
 * moe_stages.h — the fused path's stages, their arguments and their named intermediates.
 * Backend-neutral: the CPU backend (src/cpu/cpu_fused_*.c) and the CUDA kernels (the .cu
 * files in kernels/) implement the SAME argument structs, so the CPU twin of every kernel is
 * checkable line by line.
 * Pointers are host pointers on the CPU backend and device pointers on the CUDA backend.
 *
 * Shapes: T tokens, H hidden, I expert width, E experts (El local), k top-k, M = T*k routed rows.
 * "flat index" f = t*k + j names the j-th choice of token t. Expert order: rows sorted by expert,
 * stable in f, so row r of expert order came from flat index gather_idx[r], token gather_idx[r]/k.
 */
#ifndef MOE_STAGES_H
#define MOE_STAGES_H

#include <stdbool.h>
#include <stdint.h>

#include "common.h"

typedef enum moe_epilogue {
    MOE_EPI_NONE = 0,     /* C = rounded accumulator (times scale_c_rows if given) */
    MOE_EPI_SILU_MUL = 1, /* N = 2I accumulator columns [gate | up]; C [rows, I] =
                             round(silu(gate) * up), gate/up taken as the fp32 accumulators;
                             C_preact (optional) receives the rounded [rows, 2I] GEMM output */
} moe_epilogue;

/* One launch over all experts: for every expert e, rows [off[e], off[e+1]) of the expert-order
 * problem compute C_r = A_r @ op(B_e) with fp32 accumulation.
 *   B: b_kn == false: B_e is [N, K] (K contiguous), C = A B_e^T  (forward GEMMs)
 *      b_kn == true:  B_e is [K, N] (N contiguous), C = A B_e    (backward dX GEMMs)
 *   permute_x: A is token-order [T, K]; row r reads A[gather_idx[r] / topk]   (GEMM1 only)
 *   permute_y: C is flat-order [T*k, N]; row r is stored at C[gather_idx[r]]  (GEMM2 only)
 *   never both on one GEMM (rejected with MOE_ERR_INVALID_ARG).
 *   scale_a_rows [T*k] (dtype, optional): A row r is multiplied by scale_a_rows[gather_idx[r]]
 *      and ROUNDED to dtype before the multiply (Llama-4's input scaling, as HF does).
 *   scale_c_rows [T*k] (dtype, optional): the fp32 accumulator of row r is multiplied by
 *      scale_c_rows[gather_idx[r]] before rounding (Qwen3's top-k weight, fused in GEMM2);
 *      not with MOE_EPI_SILU_MUL (rejected).
 *   C_preact (MOE_EPI_SILU_MUL only; rejected otherwise) is stored with the same row
 *      permutation as C.
 *   max_rows: with gather_idx, its entries are flat indices in [0, max_rows), so max_rows is
 *      T*k there. Without permute_x, A must hold max_rows rows when the CUDA wgmma kernel
 *      loads it by TMA (its default there: whole boxes from the tile's first row, up to
 *      max_rows; rows past the experts' end are read, multiplied and never stored). The CPU twin requires expert_offsets[num_experts] <= max_rows and rejects an
 *      out-of-range gather index (and, with permute_y, a flat index stored twice); the CUDA
 *      kernel, which cannot check on the host, skips such a row.
 * Rows of C (or flat rows with permute_y) that no expert row maps to are left untouched. */
typedef struct moe_grouped_gemm_args {
    moe_dtype dtype;               /* of A, B, C, scales */
    int num_experts;               /* groups (local experts) */
    const int32_t *expert_offsets; /* [num_experts + 1], expert_offsets[0] == 0 */
    int N, K;
    int max_rows; /* host-known upper bound of expert_offsets[num_experts] (T*k): the CUDA
                     launch is sized by it so no device->host copy of the counts is needed */
    int topk;
    const int32_t *gather_idx; /* [M]; required by permute_x/permute_y/scales */
    const void *A;
    const void *B;
    bool b_kn;
    void *C;
    void *C_preact; /* with MOE_EPI_SILU_MUL only, optional */
    bool permute_x, permute_y;
    const void *scale_a_rows;
    const void *scale_c_rows;
    moe_epilogue epilogue;
} moe_grouped_gemm_args;

/* Weight gradient of a grouped GEMM: for every expert e,
 *   dW_e [N, K] = sum over rows r of expert e of  dY_r^T (N) x X_r (K)
 * where dY_r and X_r are read through the same row sources as in forward:
 *   permute_dy / permute_x: the operand is token-order [T, .] and row r reads [gather_idx[r]/k];
 *   scale_dy_rows / scale_x_rows: the row is multiplied by scale[gather_idx[r]] and rounded.
 * Experts with no rows get exact zeros. */
typedef struct moe_grouped_gemm_dw_args {
    moe_dtype dtype;
    int num_experts;
    const int32_t *expert_offsets;
    int N, K;
    int max_rows; /* as in moe_grouped_gemm_args */
    int topk;
    const int32_t *gather_idx;
    const void *dY;
    bool permute_dy;
    const void *scale_dy_rows;
    const void *X;
    bool permute_x;
    const void *scale_x_rows;
    void *dW; /* [num_experts, N, K] */
} moe_grouped_gemm_dw_args;

/* Named intermediates of one forward (the correctness mode compares each). Tensors of the
 * activation dtype unless stated. */
typedef struct moe_fwd_state {
    int T;
    int M;                    /* rows in expert order = expert_offsets[El]: set by the CPU
                                 forward (the CUDA forward keeps M on the device) */
    void *router_logits;      /* [T, E] rounded to dtype */
    int32_t *topk_ids;        /* [T, k] global expert ids, in top-k order (ties: lower id) */
    void *topk_w;             /* [T, k] Qwen3: routing weights; Llama-4: sigmoid scores */
    int32_t *token_counts;    /* [El] rows per local expert (buffers sized for E) */
    int32_t *expert_offsets;  /* [El + 1] */
    int32_t *gather_idx;      /* [T*k] */
    void *gemm1_out;          /* [M, 2I] expert order (optional unless backward follows) */
    void *act;                /* [M, I]  expert order */
    void *gemm2_out;          /* [T*k, H] flat order, after the Qwen3 weight multiply; rows
                                 of non-local experts are zero */
    void *shared_out;         /* [T, H] Llama-4 shared expert output */
    void *out;                /* [T, H] */
} moe_fwd_state;

#endif /* MOE_STAGES_H */
