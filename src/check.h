/*
 * check.h — the correctness mode's comparisons: each named stage of the fused path against the
 * reference, fed the fused path's own upstream values (docs/DESIGN.md "Tolerances").
 *
 * A stage passes when ||got-ref||/||ref|| <= tol AND every row's relative error <= 10*tol
 * (rows: tokens; experts for weight gradients), a row whose reference is exactly zero is exactly
 * zero, and nothing is NaN. Integer stages (counts, gather indices) must match exactly.
 */
#ifndef MOE_CHECK_H
#define MOE_CHECK_H

#include <stdbool.h>
#include <stdio.h>

#include "moe_stages.h"
#include "weights.h"

#define MOE_CHECK_MAX_ROWS 64

typedef struct moe_check_row {
    char stage[40];
    char compared[40]; /* what was compared: "64 x 128", "8 of 512 rows (sampled)" */
    double rel_err;    /* global relative error (NAN for exact stages) */
    double worst_err;  /* worst row's relative error */
    long worst_row;    /* its index (-1 if none) */
    double tol;        /* 0 for exact stages */
    bool pass;
    char note[96];
} moe_check_row;

typedef struct moe_check_report {
    moe_check_row rows[MOE_CHECK_MAX_ROWS];
    int count;
    bool all_pass;
} moe_check_report;

typedef struct moe_check_options {
    int sample;        /* 0 = verify everything; N = N random tokens / rows / experts */
    uint64_t seed;     /* for the sample choice */
    bool backward;
} moe_check_options;

void moe_check_report_init(moe_check_report *r);
/* Compare rows x cols doubles under the stage rule above; appends a row to the report. */
void moe_check_compare(moe_check_report *r, const char *stage, const char *compared,
                       const double *got, const double *ref, size_t rows, size_t cols,
                       double tol);
/* An exact stage: mismatches = number of differing elements, n = elements compared. */
void moe_check_exact(moe_check_report *r, const char *stage, const char *compared, long n,
                     long mismatches, const char *note);
void moe_check_print(const moe_check_report *r, FILE *f);
/* docs/DESIGN.md tolerances: bf16 1e-2, fp16 1e-3, fp32 1e-5 (grad: 1e-4). */
double moe_check_tol(moe_dtype dt, bool grad);

/* Forward stages of one fused run (st: host copy with every intermediate kept) on input x
 * [T,H] (dt) against the reference, plus the end-to-end output with the reference routed the
 * same way. */
moe_status moe_check_forward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                             const moe_fwd_state *st, const moe_check_options *o,
                             moe_check_report *rep, moe_error *err);
/* Backward: dx [T,H] and grads (canonical layout, dt) from the fused path, for the loss
 * sum(out * dout), against the reference's backward routed like the fused forward. */
moe_status moe_check_backward(const moe_weights *w, moe_dtype dt, int T, const void *x,
                              const moe_fwd_state *st, const void *dout, const void *dx,
                              const moe_weights *grads, const moe_check_options *o,
                              moe_check_report *rep, moe_error *err);

#endif /* MOE_CHECK_H */
