/*
 * tensor.h — a host tensor: dtype, up to 4 dims, contiguous row-major data.
 * A tensor either owns its data (freed by moe_tensor_free) or borrows it (e.g. a view into an
 * mmapped safetensors file).
 */
#ifndef MOE_TENSOR_H
#define MOE_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

#define MOE_MAX_DIMS 4

typedef struct moe_tensor {
    moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    void *data;
    size_t nbytes;
    bool owns;
} moe_tensor;

/* Number of elements (product of the shape; 1 for ndim 0). */
size_t moe_tensor_numel(const moe_tensor *t);
/* Allocate an owned tensor; contents uninitialised. shape has ndim entries. */
moe_status moe_tensor_alloc(moe_tensor *t, moe_dtype dtype, int ndim, const int64_t *shape,
                            moe_error *err);
/* Convenience for 1-3 dims: moe_tensor_alloc2(t, dt, rows, cols, err) etc. */
moe_status moe_tensor_alloc1(moe_tensor *t, moe_dtype dtype, int64_t d0, moe_error *err);
moe_status moe_tensor_alloc2(moe_tensor *t, moe_dtype dtype, int64_t d0, int64_t d1,
                             moe_error *err);
moe_status moe_tensor_alloc3(moe_tensor *t, moe_dtype dtype, int64_t d0, int64_t d1, int64_t d2,
                             moe_error *err);
void moe_tensor_free(moe_tensor *t);
/* A borrowed view (owns = false). */
moe_tensor moe_tensor_view_of(moe_dtype dtype, int ndim, const int64_t *shape, void *data);
/* Fill every element with NaN (floating dtypes) or -1 (integers): "poison" before a run so an
 * element nobody wrote fails the comparison. */
void moe_tensor_poison(moe_tensor *t);
/* Copy with dtype conversion (rounding to dst's dtype). Shapes must have equal numel. */
moe_status moe_tensor_convert(const moe_tensor *src, moe_tensor *dst, moe_error *err);
/* "[2048, 768]" into buf. */
const char *moe_shape_str(int ndim, const int64_t *shape, char *buf, size_t len);
bool moe_shape_equal(const moe_tensor *t, int ndim, const int64_t *shape);

#endif /* MOE_TENSOR_H */
