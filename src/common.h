/*
 * common.h — internal error plumbing, logging and allocation helpers shared by every module.
 *
 * Errors travel up as a moe_status; the human-readable reason is written once, at the point
 * of failure, into the caller-supplied moe_error (moe_fail). Outer layers may prepend context
 * (moe_error_prefix). Library code never exit()s; only programs do.
 */
#ifndef MOE_COMMON_H
#define MOE_COMMON_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "moe_ep.h"

#define MOE_ERROR_MSG_LEN 1024

typedef struct moe_error {
    moe_status status;
    char msg[MOE_ERROR_MSG_LEN];
} moe_error;

/* Record a failure (printf-style reason) into err (may be NULL) and return st. */
moe_status moe_fail(moe_error *err, moe_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prepend "context: " to an already recorded message; returns err->status. */
moe_status moe_error_prefix(moe_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void moe_error_clear(moe_error *err);
/* The calling thread's error record behind moe_last_error(). moe_api_begin clears it and
 * returns it: every public entry point starts with it and fails into it. */
moe_error *moe_thread_error(void);
moe_error *moe_api_begin(void);

/* Propagate a failure unchanged. */
#define MOE_TRY(call)                                                                     \
    do {                                                                                  \
        moe_status moe_try_st_ = (call);                                                  \
        if (moe_try_st_ != MOE_OK) return moe_try_st_;                                   \
    } while (0)
/* Propagate to a cleanup label: res receives the status. */
#define MOE_TRY_GOTO(call, res, label)                                                    \
    do {                                                                                  \
        (res) = (call);                                                                   \
        if ((res) != MOE_OK) goto label;                                                  \
    } while (0)

/* Logging. WARN always prints; INFO when MOE_DEBUG is set (any value but 0). The optional
 * rank prefix is set by programs that run under MPI. */
void moe_log_set_rank(int rank);
void moe_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void moe_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Allocation that records MOE_ERR_NOMEM with the size and what it was for. */
void *moe_malloc(size_t nbytes, const char *what, moe_error *err);
void *moe_calloc(size_t n, size_t size, const char *what, moe_error *err);

/* Overflow-checked size arithmetic: false on overflow. */
bool moe_mul_size(size_t a, size_t b, size_t *out);

/* Wall clock in seconds (monotonic). */
double moe_now(void);

#define MOE_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MOE_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif /* MOE_COMMON_H */
