/* tensor.c — host tensors (see tensor.h). */
#include "tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"

size_t moe_tensor_numel(const moe_tensor *t)
{
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

moe_status moe_tensor_alloc(moe_tensor *t, moe_dtype dtype, int ndim, const int64_t *shape,
                            moe_error *err)
{
    memset(t, 0, sizeof *t);
    if (ndim < 0 || ndim > MOE_MAX_DIMS)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "tensor rank %d outside 0..%d", ndim, MOE_MAX_DIMS);
    size_t n = moe_dtype_size(dtype);
    if (n == 0) return moe_fail(err, MOE_ERR_INVALID_ARG, "tensor dtype %d unknown", (int)dtype);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return moe_fail(err, MOE_ERR_INVALID_ARG, "negative tensor dimension %lld",
                            (long long)shape[i]);
        if (!moe_mul_size(n, (size_t)shape[i], &n))
            return moe_fail(err, MOE_ERR_INVALID_ARG, "tensor size overflows");
        t->shape[i] = shape[i];
    }
    t->data = moe_malloc(n, "tensor", err);
    if (!t->data) return MOE_ERR_NOMEM;
    t->dtype = dtype;
    t->ndim = ndim;
    t->nbytes = n;
    t->owns = true;
    return MOE_OK;
}

moe_status moe_tensor_alloc1(moe_tensor *t, moe_dtype dtype, int64_t d0, moe_error *err)
{
    int64_t s[1] = {d0};
    return moe_tensor_alloc(t, dtype, 1, s, err);
}

moe_status moe_tensor_alloc2(moe_tensor *t, moe_dtype dtype, int64_t d0, int64_t d1,
                             moe_error *err)
{
    int64_t s[2] = {d0, d1};
    return moe_tensor_alloc(t, dtype, 2, s, err);
}

moe_status moe_tensor_alloc3(moe_tensor *t, moe_dtype dtype, int64_t d0, int64_t d1, int64_t d2,
                             moe_error *err)
{
    int64_t s[3] = {d0, d1, d2};
    return moe_tensor_alloc(t, dtype, 3, s, err);
}

void moe_tensor_free(moe_tensor *t)
{
    if (!t) return;
    if (t->owns) free(t->data);
    memset(t, 0, sizeof *t);
}

moe_tensor moe_tensor_view_of(moe_dtype dtype, int ndim, const int64_t *shape, void *data)
{
    moe_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dtype;
    t.ndim = ndim;
    size_t n = moe_dtype_size(dtype);
    for (int i = 0; i < ndim; i++) {
        t.shape[i] = shape[i];
        n *= (size_t)shape[i];
    }
    t.nbytes = n;
    t.data = data;
    t.owns = false;
    return t;
}

void moe_tensor_poison(moe_tensor *t)
{
    size_t n = moe_tensor_numel(t);
    if (!t->data) return;
    if (moe_dtype_is_float(t->dtype) && t->dtype != MOE_DTYPE_F8_E4M3) {
        for (size_t i = 0; i < n; i++) moe_store_elem(t->dtype, t->data, i, NAN);
    } else {
        memset(t->data, 0xff, t->nbytes);
    }
}

moe_status moe_tensor_convert(const moe_tensor *src, moe_tensor *dst, moe_error *err)
{
    size_t n = moe_tensor_numel(src);
    if (n != moe_tensor_numel(dst))
        return moe_fail(err, MOE_ERR_INVALID_ARG, "convert: %zu elements into %zu", n,
                        moe_tensor_numel(dst));
    if (src->dtype == dst->dtype) {
        memcpy(dst->data, src->data, n * moe_dtype_size(src->dtype));
        return MOE_OK;
    }
    for (size_t i = 0; i < n; i++)
        moe_store_elem(dst->dtype, dst->data, i, moe_load_elem(src->dtype, src->data, i));
    return MOE_OK;
}

const char *moe_shape_str(int ndim, const int64_t *shape, char *buf, size_t len)
{
    size_t used = 0;
    used += (size_t)snprintf(buf + used, len - used, "[");
    for (int i = 0; i < ndim && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%lld", i ? ", " : "",
                                 (long long)shape[i]);
    if (used < len) snprintf(buf + used, len - used, "]");
    return buf;
}

bool moe_shape_equal(const moe_tensor *t, int ndim, const int64_t *shape)
{
    if (t->ndim != ndim) return false;
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] != shape[i]) return false;
    return true;
}
