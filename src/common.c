/* common.c — error recording, logging, checked allocation, clocks (see common.h). */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const status_names[MOE_NUM_STATUS] = {
    [MOE_OK] = "success",
    [MOE_ERR_INVALID_ARG] = "invalid argument",
    [MOE_ERR_IO] = "I/O error",
    [MOE_ERR_FORMAT] = "malformed input",
    [MOE_ERR_UNSUPPORTED] = "unsupported",
    [MOE_ERR_NOMEM] = "out of memory",
    [MOE_ERR_CUDA] = "CUDA error",
    [MOE_ERR_NCCL] = "NCCL error",
    [MOE_ERR_MPI] = "MPI error",
    [MOE_ERR_NO_DEVICE] = "no GPU available",
    [MOE_ERR_CHECK_FAILED] = "correctness check failed",
    [MOE_ERR_TIMEOUT] = "timed out",
    [MOE_ERR_INTERNAL] = "internal error",
    [MOE_ERR_NONFINITE] = "non-finite values",
    [MOE_ERR_OVERFLOW] = "capacity exceeded",
};

const char *moe_strerror(moe_status status)
{
    if ((int)status < 0 || status >= MOE_NUM_STATUS) return "unknown status";
    return status_names[status];
}

moe_status moe_fail(moe_error *err, moe_status st, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->status = st;
    }
    return st;
}

moe_status moe_error_prefix(moe_error *err, const char *fmt, ...)
{
    if (!err) return MOE_ERR_INTERNAL;
    char prefix[MOE_ERROR_MSG_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    char joined[2 * MOE_ERROR_MSG_LEN + 4];
    snprintf(joined, sizeof joined, "%s: %s", prefix, err->msg);
    size_t n = strlen(joined);
    if (n >= sizeof err->msg) n = sizeof err->msg - 1; /* keep the head: it has the context */
    memcpy(err->msg, joined, n);
    err->msg[n] = '\0';
    return err->status;
}

void moe_error_clear(moe_error *err)
{
    if (!err) return;
    err->status = MOE_OK;
    err->msg[0] = '\0';
}

/* The public API's last error, one per thread (moe_last_error). */
static _Thread_local moe_error thread_error;

moe_error *moe_thread_error(void) { return &thread_error; }

const char *moe_last_error(void) { return thread_error.msg; }

moe_error *moe_api_begin(void)
{
    thread_error.status = MOE_OK;
    thread_error.msg[0] = '\0';
    return &thread_error;
}

int moe_version(void) { return MOE_EP_VERSION_CODE; }
const char *moe_version_string(void) { return MOE_EP_VERSION_STRING; }

/* The rank prefix is process-wide on purpose: it labels this process's stderr, nothing else. */
static int log_rank = -1;

void moe_log_set_rank(int rank) { log_rank = rank; }

static void vlog(const char *level, const char *fmt, va_list ap)
{
    char line[2048];
    vsnprintf(line, sizeof line, fmt, ap);
    if (log_rank >= 0)
        fprintf(stderr, "moe-ep[rank %d] %s: %s\n", log_rank, level, line);
    else
        fprintf(stderr, "moe-ep %s: %s\n", level, line);
}

void moe_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog("WARN", fmt, ap);
    va_end(ap);
}

void moe_info(const char *fmt, ...)
{
    const char *dbg = getenv("MOE_DEBUG");
    if (!dbg || !*dbg || strcmp(dbg, "0") == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vlog("INFO", fmt, ap);
    va_end(ap);
}

void *moe_malloc(size_t nbytes, const char *what, moe_error *err)
{
    void *p = malloc(nbytes ? nbytes : 1);
    if (!p) moe_fail(err, MOE_ERR_NOMEM, "cannot allocate %zu bytes for %s", nbytes, what);
    return p;
}

void *moe_calloc(size_t n, size_t size, const char *what, moe_error *err)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) moe_fail(err, MOE_ERR_NOMEM, "cannot allocate %zu x %zu bytes for %s", n, size, what);
    return p;
}

bool moe_mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a) return false;
    *out = a * b;
    return true;
}

double moe_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
