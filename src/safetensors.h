/*
 * safetensors.h — reader (mmap) and writer of the safetensors format:
 *   8-byte little-endian header length N, N bytes of JSON header, then the data area.
 * The header maps tensor names to {dtype, shape, data_offsets:[begin,end)} relative to the data
 * area, plus an optional "__metadata__" object of strings. Every field is validated: a bad file
 * is an error with a reason, never a crash or an out-of-bounds read.
 */
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "tensor.h"

typedef struct moe_st_entry {
    char *name;
    moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    uint64_t begin, end; /* offsets into the data area */
} moe_st_entry;

typedef struct moe_st_file {
    char *path;
    void *map;          /* whole file, read-only */
    size_t map_len;
    const uint8_t *data;/* start of the data area */
    size_t data_len;
    moe_st_entry *entries;
    int count;
} moe_st_file;

moe_status moe_st_open(const char *path, moe_st_file *f, moe_error *err);
void moe_st_close(moe_st_file *f);
/* The entry of a name, or NULL. */
const moe_st_entry *moe_st_find(const moe_st_file *f, const char *name);
/* A borrowed tensor view of an entry's bytes (valid until close). */
moe_tensor moe_st_view(const moe_st_file *f, const moe_st_entry *e);

/* Writing: collect (name, tensor) pairs, then write in one go (header padded with spaces to a
 * multiple of 8 bytes, as the reference implementation does). Names must be unique. */
typedef struct moe_st_writer {
    int count, cap;
    char **names;
    moe_tensor *tensors; /* borrowed: must stay valid until moe_st_write */
} moe_st_writer;

void moe_st_writer_init(moe_st_writer *w);
moe_status moe_st_writer_add(moe_st_writer *w, const char *name, const moe_tensor *t,
                             moe_error *err);
moe_status moe_st_write(const moe_st_writer *w, const char *path, moe_error *err);
void moe_st_writer_free(moe_st_writer *w);

#endif /* MOE_SAFETENSORS_H */
