/*
 * safetensors.h — reader (mmap) and writer of the safetensors format:
 *   8-byte little-endian header length N, N bytes of JSON header, then the data area.
 * The header maps tensor names to {dtype, shape, data_offsets:[begin,end)} relative to the data
 * area, plus an optional "__metadata__" object of strings. Every field is validated: a bad file
 * is an error with a reason, never a crash or an out-of-bounds read. As in the reference reader,
 * the tensors' byte ranges must cover the data area exactly (sorted by offset: contiguous from
 * 0, no gap, no overlap, the last ending at the end of the file), so a wrong header length or
 * trailing bytes are refused rather than read shifted; and no header string may hold a NUL
 * (the JSON escape \u0000), which a C string would silently cut.
 *
 * Errors: MOE_ERR_IO (cannot open / map / write), MOE_ERR_FORMAT (malformed content),
 * MOE_ERR_UNSUPPORTED (a dtype safetensors knows but moe-ep does not: BOOL, U8, F8_E5M2, ...),
 * MOE_ERR_INVALID_ARG (writer misuse). Messages name the file and the tensor / field.
 *
 * Alignment: the data pointer of a view is wherever the file put the tensor. Files from the
 * reference writer (and from moe_st_write when every tensor's byte size is a multiple of 8)
 * are aligned; a file that is not may give an unaligned pointer, which x86 tolerates.
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
    uint64_t begin, end; /* offsets into the data area, begin <= end <= data_len */
} moe_st_entry;

typedef struct moe_st_file {
    char *path;
    void *map;          /* whole file, read-only (PROT_READ: writing through a view faults) */
    size_t map_len;
    const uint8_t *data;/* start of the data area */
    size_t data_len;
    moe_st_entry *entries; /* in header order */
    int count;
    int *by_name;       /* entry indices sorted by name (moe_st_find's binary search) */
    int meta_count;     /* "__metadata__" pairs, in header order */
    char **meta_keys, **meta_values;
} moe_st_file;

/* Map and validate a file. On failure *f is left zeroed (moe_st_close on it is a no-op). */
moe_status moe_st_open(const char *path, moe_st_file *f, moe_error *err);
/* Unmap and free; safe on a zeroed or already closed file. */
void moe_st_close(moe_st_file *f);
/* The entry of a name, or NULL. O(log count). */
const moe_st_entry *moe_st_find(const moe_st_file *f, const char *name);
/* A borrowed tensor view of an entry's bytes (valid until close; read-only memory). */
moe_tensor moe_st_view(const moe_st_file *f, const moe_st_entry *e);
/* find + view: MOE_ERR_FORMAT "tensor 'X' not found in FILE" when the name is missing. */
moe_status moe_st_get(const moe_st_file *f, const char *name, moe_tensor *view, moe_error *err);
/* The "__metadata__" value of key, or NULL. */
const char *moe_st_metadata(const moe_st_file *f, const char *key);

/* Writing: collect (name, tensor) pairs, then write in one go (header padded with spaces to a
 * multiple of 8 bytes, as the reference implementation does; tensors in insertion order, their
 * data contiguous; "__metadata__": {"format": "pt"} as transformers writes it).
 * Names must be unique. The file appears atomically: written to PATH.tmp, then renamed. */
typedef struct moe_st_writer {
    int count, cap;
    char **names;
    moe_tensor *tensors; /* borrowed: must stay valid until moe_st_write */
} moe_st_writer;

void moe_st_writer_init(moe_st_writer *w);
/* MOE_ERR_INVALID_ARG for a duplicate or reserved name, an unknown dtype, a bad shape or a
 * byte count that does not match the shape. */
moe_status moe_st_writer_add(moe_st_writer *w, const char *name, const moe_tensor *t,
                             moe_error *err);
moe_status moe_st_write(const moe_st_writer *w, const char *path, moe_error *err);
void moe_st_writer_free(moe_st_writer *w);

#endif /* MOE_SAFETENSORS_H */
