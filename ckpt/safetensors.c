/* safetensors import and export (ckpt.h).
 *
 * The reader accepts exactly what the reference parser (huggingface/safetensors,
 * SafeTensors::read_metadata) accepts, minus dtypes vdist cannot convert, so a file we
 * load is one every other tool loads too, and a refusal names the file and the tensor at
 * fault. The file is memory-mapped: opening a checkpoint of many gigabytes costs only its
 * header, and read_block touches only the pages of the block asked for.
 *
 * The writer produces what the reference writer produces (header padded with spaces to a
 * multiple of 8 bytes, so F32 data starts 8-byte aligned), except that tensors keep the
 * caller's order instead of being sorted by dtype and name. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt.h"

/* Tensor bytes are copied to and from floats in place. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host; add byte swaps to port it"
#endif
_Static_assert(SIZE_MAX >= LLONG_MAX, "JSON integers (long long) must fit in size_t");

enum { ST_LEN_NBYTES = 8, ST_MAX_DIMS = 4 };
#define ST_MAX_HEADER_NBYTES 100000000ull /* the reference parser's limit */
#define ST_METADATA_KEY "__metadata__"

struct ckpt_st_file {
    char *path;                      /* as given, for messages */
    const unsigned char *map;        /* the whole file, or NULL */
    size_t map_nbytes;
    const unsigned char *data;       /* the data section, after the header */
    size_t data_nbytes;
    json_t *header;                  /* owns tensor names and metadata strings */
    const json_t *meta;              /* inside header, or NULL */
    struct ckpt_st_tensor *tensors;  /* [count], in data order */
    const struct ckpt_st_tensor **by_name; /* [count], sorted by name for ckpt_st_find */
    int count;
};

/* ---------------------------------------------------------------- small helpers */

static const char *const st_dtype_names[] = {
    [CKPT_F32] = "F32", [CKPT_BF16] = "BF16", [CKPT_F16] = "F16",
    [CKPT_I32] = "I32", [CKPT_I64] = "I64",
};
static const size_t st_dtype_nbytes[] = {
    [CKPT_F32] = 4, [CKPT_BF16] = 2, [CKPT_F16] = 2, [CKPT_I32] = 4, [CKPT_I64] = 8,
};
enum { ST_NUM_DTYPES = sizeof st_dtype_names / sizeof st_dtype_names[0] };

static bool st_dtype_parse(const char *name, enum ckpt_dtype *dtype)
{
    for (int d = 0; d < ST_NUM_DTYPES; d++) {
        if (strcmp(name, st_dtype_names[d]) == 0) {
            *dtype = (enum ckpt_dtype)d;
            return true;
        }
    }
    return false;
}

static char *st_strdup(const char *s)
{
    size_t const nbytes = strlen(s) + 1;
    char *const copy = vd_alloc(nbytes);
    memcpy(copy, s, nbytes);
    return copy;
}

/* a * b, or false when it overflows. */
static bool st_mul(size_t a, size_t b, size_t *product)
{
    return !__builtin_mul_overflow(a, b, product);
}

/* Writes "[2, 3]" into buf; 4 dimensions of 20 digits fit in 128 bytes. */
static const char *st_shape_str(char buf[static 128], int ndim, const size_t *shape)
{
    size_t used = (size_t)snprintf(buf, 128, "[");
    for (int d = 0; d < ndim; d++)
        used += (size_t)snprintf(buf + used, 128 - used, "%s%zu", d ? ", " : "", shape[d]);
    snprintf(buf + used, 128 - used, "]");
    return buf;
}

/* "an object", "a string", ...: the type of a JSON value for messages. */
static const char *st_json_type_name(const json_t *value)
{
    switch (json_typeof(value)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE: return "true";
    case JSON_FALSE: return "false";
    case JSON_NULL: return "null";
    }
    return "an unknown value";
}

/* A JSON value as a size_t, or false when it is not a non-negative integer. */
static bool st_json_size(const json_t *value, size_t *out)
{
    if (!json_is_integer(value) || json_integer_value(value) < 0) return false;
    *out = (size_t)json_integer_value(value);
    return true;
}

/* ---------------------------------------------------------------- reader: header */

/* Maps the file open on fd; the caller closes fd (the mapping keeps the file alive). */
static int st_map_fd(ckpt_st_file *f, int fd)
{
    struct stat st;
    RETURN_IF(fstat(fd, &st) != 0, VD_EIO, "%s: cannot stat: %s", f->path, strerror(errno));
    RETURN_IF(!S_ISREG(st.st_mode), VD_EIO, "%s: not a regular file", f->path);
    RETURN_IF(st.st_size < ST_LEN_NBYTES, VD_EFORMAT,
              "%s: file has %lld bytes, fewer than the 8-byte header length that starts "
              "every safetensors file", f->path, (long long)st.st_size);
    void *const map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    RETURN_IF(map == MAP_FAILED, VD_EIO, "%s: cannot map %lld bytes: %s", f->path,
              (long long)st.st_size, strerror(errno));
    f->map = map;
    f->map_nbytes = (size_t)st.st_size;
    return 0;
}

static int st_map(ckpt_st_file *f)
{
    int const fd = open(f->path, O_RDONLY | O_CLOEXEC);
    RETURN_IF(fd < 0, VD_EIO, "%s: cannot open: %s", f->path, strerror(errno));
    int const err = st_map_fd(f, fd);
    close(fd);
    FORWARD_IF(err);
    return 0;
}

/* Parses the JSON header of header_nbytes bytes into f->header. */
static int st_parse_header(ckpt_st_file *f, size_t header_nbytes)
{
    const char *const text = (const char *)f->map + ST_LEN_NBYTES;
    RETURN_IF(header_nbytes == 0 || text[0] != '{', VD_EFORMAT,
              "%s: header does not start with '{'; a safetensors header is a JSON object",
              f->path);
    json_error_t jerr;
    f->header = json_loadb(text, header_nbytes, JSON_REJECT_DUPLICATES, &jerr);
    RETURN_IF(!f->header && json_error_code(&jerr) == json_error_duplicate_key, VD_EFORMAT,
              "%s: header repeats a name (%s, line %d, column %d); tensor names and "
              "__metadata__ keys must be unique", f->path, jerr.text, jerr.line, jerr.column);
    RETURN_IF(!f->header, VD_EFORMAT,
              "%s: header is not valid UTF-8 JSON: %s (line %d, column %d)", f->path,
              jerr.text, jerr.line, jerr.column);
    RETURN_IF(!json_is_object(f->header), VD_EFORMAT, "%s: header is %s, not a JSON object",
              f->path, st_json_type_name(f->header));
    return 0;
}

static int st_read_metadata(ckpt_st_file *f, const json_t *meta)
{
    RETURN_IF(!json_is_object(meta), VD_EFORMAT,
              "%s: __metadata__ is %s; it must be an object of string values",
              f->path, st_json_type_name(meta));
    const char *key;
    const json_t *value;
    json_object_foreach((json_t *)meta, key, value) {
        RETURN_IF(!json_is_string(value), VD_EFORMAT,
                  "%s: __metadata__ key '%s' has %s value; metadata values must be strings",
                  f->path, key, st_json_type_name(value));
    }
    f->meta = meta;
    return 0;
}

static int st_read_shape(const ckpt_st_file *f, const char *name, const json_t *shape,
                         struct ckpt_st_tensor *t)
{
    RETURN_IF(!json_is_array(shape), VD_EFORMAT,
              "%s: tensor '%s' has no \"shape\" array of dimensions", f->path, name);
    size_t const ndim = json_array_size(shape);
    RETURN_IF(ndim > ST_MAX_DIMS, VD_EFORMAT,
              "%s: tensor '%s' has %zu dimensions; vdist reads at most %d", f->path, name, ndim,
              ST_MAX_DIMS);
    t->ndim = (int)ndim;
    t->numel = 1;
    for (size_t d = 0; d < ndim; d++) {
        RETURN_IF(!st_json_size(json_array_get(shape, d), &t->shape[d]), VD_EFORMAT,
                  "%s: tensor '%s' has shape entry %zu that is not a non-negative integer",
                  f->path, name, d);
        /* Left to right like the reference, so the same shapes count as overflowing. */
        RETURN_IF(!st_mul(t->numel, t->shape[d], &t->numel), VD_EFORMAT,
                  "%s: tensor '%s' has a shape whose element count overflows", f->path, name);
    }
    return 0;
}

static int st_read_offsets(const ckpt_st_file *f, const char *name, const json_t *offsets,
                           struct ckpt_st_tensor *t)
{
    RETURN_IF(!json_is_array(offsets) || json_array_size(offsets) != 2 ||
                  !st_json_size(json_array_get(offsets, 0), &t->begin) ||
                  !st_json_size(json_array_get(offsets, 1), &t->end),
              VD_EFORMAT,
              "%s: tensor '%s' needs \"data_offsets\" [begin, end] of two non-negative "
              "integers", f->path, name);
    RETURN_IF(t->end < t->begin, VD_EFORMAT,
              "%s: tensor '%s' has data_offsets [%zu, %zu] that end before they begin",
              f->path, name, t->begin, t->end);
    size_t need = 0;
    char shape_buf[128];
    RETURN_IF(!st_mul(t->numel, st_dtype_nbytes[t->dtype], &need), VD_EFORMAT,
              "%s: tensor '%s' with dtype %s and shape %s has a byte size that overflows",
              f->path, name, st_dtype_names[t->dtype],
              st_shape_str(shape_buf, t->ndim, t->shape));
    RETURN_IF(t->end - t->begin != need, VD_EFORMAT,
              "%s: tensor '%s' has data_offsets [%zu, %zu] (%zu bytes) but dtype %s and shape "
              "%s need %zu bytes", f->path, name, t->begin, t->end, t->end - t->begin,
              st_dtype_names[t->dtype], st_shape_str(shape_buf, t->ndim, t->shape), need);
    return 0;
}

/* One header entry; the offsets' place among the other tensors is checked later. */
static int st_read_tensor(const ckpt_st_file *f, const char *name, const json_t *entry,
                          struct ckpt_st_tensor *t)
{
    RETURN_IF(!json_is_object(entry), VD_EFORMAT,
              "%s: tensor '%s' is %s, not an object with dtype, shape and "
              "data_offsets", f->path, name, st_json_type_name(entry));
    t->name = name;
    const json_t *const dtype = json_object_get(entry, "dtype");
    RETURN_IF(!json_is_string(dtype), VD_EFORMAT, "%s: tensor '%s' has no \"dtype\" string",
              f->path, name);
    RETURN_IF(!st_dtype_parse(json_string_value(dtype), &t->dtype), VD_EFORMAT,
              "%s: tensor '%s' has dtype '%s', which vdist cannot read (it reads F32, BF16, "
              "F16, I32 and I64)", f->path, name, json_string_value(dtype));
    FORWARD_IF(st_read_shape(f, name, json_object_get(entry, "shape"), t));
    FORWARD_IF(st_read_offsets(f, name, json_object_get(entry, "data_offsets"), t));
    return 0;
}

static int st_read_entries(ckpt_st_file *f)
{
    const json_t *const meta = json_object_get(f->header, ST_METADATA_KEY);
    if (meta) FORWARD_IF(st_read_metadata(f, meta));
    size_t const count = json_object_size(f->header) - (meta ? 1 : 0);
    RETURN_IF(count > INT_MAX, VD_EFORMAT, "%s: header lists %zu tensors, more than %d",
              f->path, count, INT_MAX);
    f->tensors = vd_calloc(count, sizeof *f->tensors);
    const char *name;
    const json_t *entry;
    json_object_foreach(f->header, name, entry) {
        if (strcmp(name, ST_METADATA_KEY) == 0) continue;
        FORWARD_IF(st_read_tensor(f, name, entry, &f->tensors[f->count]));
        f->count++;
    }
    return 0;
}

/* ---------------------------------------------------------------- reader: layout */

/* By data offsets; ties (empty tensors sharing an offset) keep header order, which is
 * address order since tensors[] is filled in header order. */
static int st_cmp_offsets(const void *pa, const void *pb)
{
    const struct ckpt_st_tensor *const a = *(const struct ckpt_st_tensor *const *)pa;
    const struct ckpt_st_tensor *const b = *(const struct ckpt_st_tensor *const *)pb;
    if (a->begin != b->begin) return a->begin < b->begin ? -1 : 1;
    if (a->end != b->end) return a->end < b->end ? -1 : 1;
    return (a > b) - (a < b);
}

static int st_cmp_names(const void *pa, const void *pb)
{
    const struct ckpt_st_tensor *const a = *(const struct ckpt_st_tensor *const *)pa;
    const struct ckpt_st_tensor *const b = *(const struct ckpt_st_tensor *const *)pb;
    return strcmp(a->name, b->name);
}

/* Reorders f->tensors by data offsets. */
static void st_sort_by_offsets(ckpt_st_file *f)
{
    size_t const count = (size_t)f->count;
    const struct ckpt_st_tensor **const order = vd_calloc(count, sizeof *order);
    for (size_t i = 0; i < count; i++) order[i] = &f->tensors[i];
    qsort(order, count, sizeof *order, st_cmp_offsets);
    struct ckpt_st_tensor *const sorted = vd_calloc(count, sizeof *sorted);
    for (size_t i = 0; i < count; i++) sorted[i] = *order[i];
    free(order);
    free(f->tensors);
    f->tensors = sorted;
}

/* The data section must be the tensors' bytes back to back: nothing unread can hide in
 * it, and no two tensors alias. */
static int st_check_layout(const ckpt_st_file *f)
{
    size_t expected = 0;
    const char *prev = NULL;
    for (int i = 0; i < f->count; i++) {
        const struct ckpt_st_tensor *const t = &f->tensors[i];
        RETURN_IF(t->begin > expected && !prev, VD_EFORMAT,
                  "%s: tensor '%s' starts at byte %zu of the data section; the first tensor "
                  "must start at 0", f->path, t->name, t->begin);
        RETURN_IF(t->begin > expected, VD_EFORMAT,
                  "%s: tensor '%s' starts at byte %zu of the data section but tensor '%s' "
                  "ends at %zu: the %zu bytes between them belong to no tensor", f->path,
                  t->name, t->begin, prev, expected, t->begin - expected);
        RETURN_IF(t->begin < expected, VD_EFORMAT,
                  "%s: tensor '%s' has data_offsets [%zu, %zu], which overlap tensor '%s' "
                  "ending at byte %zu", f->path, t->name, t->begin, t->end, prev, expected);
        expected = t->end;
        prev = t->name;
    }
    RETURN_IF(expected > f->data_nbytes, VD_EFORMAT,
              "%s: tensor '%s' ends at byte %zu of the data section, but the file has only "
              "%zu bytes after the header (truncated?)", f->path, prev, expected,
              f->data_nbytes);
    RETURN_IF(expected < f->data_nbytes, VD_EFORMAT,
              "%s: file has %zu trailing bytes after the last tensor's data (the data section "
              "has %zu bytes, the tensors cover %zu)", f->path, f->data_nbytes - expected,
              f->data_nbytes, expected);
    return 0;
}

static void st_index_names(ckpt_st_file *f)
{
    size_t const count = (size_t)f->count;
    f->by_name = vd_calloc(count, sizeof *f->by_name);
    for (size_t i = 0; i < count; i++) f->by_name[i] = &f->tensors[i];
    qsort(f->by_name, count, sizeof *f->by_name, st_cmp_names);
}

/* Fills f from its file; on error the caller closes f, which frees whatever was set. */
static int st_load(ckpt_st_file *f)
{
    FORWARD_IF(st_map(f));
    uint64_t header_nbytes = 0;
    for (int b = ST_LEN_NBYTES - 1; b >= 0; b--) header_nbytes = header_nbytes << 8 | f->map[b];
    RETURN_IF(header_nbytes > ST_MAX_HEADER_NBYTES, VD_EFORMAT,
              "%s: header length %llu is over the 100000000-byte limit of safetensors (is "
              "this a safetensors file?)", f->path, (unsigned long long)header_nbytes);
    RETURN_IF(header_nbytes > f->map_nbytes - ST_LEN_NBYTES, VD_EFORMAT,
              "%s: header of %llu bytes runs past the end of the file (%zu bytes)", f->path,
              (unsigned long long)header_nbytes, f->map_nbytes);
    FORWARD_IF(st_parse_header(f, (size_t)header_nbytes));
    f->data = f->map + ST_LEN_NBYTES + header_nbytes;
    f->data_nbytes = f->map_nbytes - ST_LEN_NBYTES - (size_t)header_nbytes;
    FORWARD_IF(st_read_entries(f));
    st_sort_by_offsets(f);
    FORWARD_IF(st_check_layout(f));
    st_index_names(f);
    return 0;
}

/* ---------------------------------------------------------------- reader: API */

int ckpt_st_open(ckpt_st_file **out, const char *path)
{
    VD_CHECK(out && path, "ckpt_st_open needs an output handle and a path");
    *out = NULL;
    ckpt_st_file *const f = vd_calloc(1, sizeof *f);
    f->path = st_strdup(path);
    int const err = st_load(f);
    if (err < 0) {
        ckpt_st_close(f);
        return vd_err_forward(err, __FILE__, __LINE__);
    }
    *out = f;
    return 0;
}

void ckpt_st_close(ckpt_st_file *f)
{
    if (!f) return;
    if (f->map) munmap((void *)f->map, f->map_nbytes);
    json_decref(f->header);
    free(f->tensors);
    free(f->by_name);
    free(f->path);
    free(f);
}

int ckpt_st_count(const ckpt_st_file *f) { return f->count; }

const struct ckpt_st_tensor *ckpt_st_get(const ckpt_st_file *f, int i)
{
    VD_CHECK(i >= 0 && i < f->count, "%s: tensor index %d outside [0, %d)", f->path, i,
             f->count);
    return &f->tensors[i];
}

int ckpt_st_find(const ckpt_st_file *f, const char *name)
{
    const struct ckpt_st_tensor key = {.name = name};
    const struct ckpt_st_tensor *const key_ptr = &key;
    const struct ckpt_st_tensor *const *const hit =
        bsearch(&key_ptr, f->by_name, (size_t)f->count, sizeof *f->by_name, st_cmp_names);
    return hit ? (int)(*hit - f->tensors) : -1;
}

const char *ckpt_st_metadata(const ckpt_st_file *f, const char *key)
{
    return f->meta ? json_string_value(json_object_get(f->meta, key)) : NULL;
}

/* ---------------------------------------------------------------- reader: blocks */

static float st_f16_to_f32(uint16_t h)
{
    uint32_t const sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t const exponent = (h >> 10) & 0x1fu;
    uint32_t const mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | mantissa << 13; /* inf, or nan keeping its payload */
    } else if (exponent != 0) {
        bits = sign | (exponent + 127 - 15) << 23 | mantissa << 13;
    } else {
        /* Zero or subnormal, mantissa * 2^-24: exact in f32, whose range is wider. */
        float const magnitude = ldexpf((float)mantissa, -24);
        return sign ? -magnitude : magnitude;
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static float st_bf16_to_f32(uint16_t h)
{
    uint32_t const bits = (uint32_t)h << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* n contiguous elements of src (any alignment) to f32. */
static void st_convert(float *dst, const unsigned char *src, size_t n, enum ckpt_dtype dtype)
{
    switch (dtype) {
    case CKPT_F32:
        memcpy(dst, src, n * sizeof *dst);
        return;
    case CKPT_BF16:
    case CKPT_F16:
        for (size_t k = 0; k < n; k++) {
            uint16_t h;
            memcpy(&h, src + 2 * k, sizeof h);
            dst[k] = dtype == CKPT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
        }
        return;
    case CKPT_I32:
        for (size_t k = 0; k < n; k++) {
            int32_t v;
            memcpy(&v, src + 4 * k, sizeof v);
            dst[k] = (float)v;
        }
        return;
    case CKPT_I64:
        for (size_t k = 0; k < n; k++) {
            int64_t v;
            memcpy(&v, src + 8 * k, sizeof v);
            dst[k] = (float)v;
        }
        return;
    }
    VD_CHECK(false, "unknown dtype %d", (int)dtype);
}

/* Columns of the 2-D view: the product of the dimensions after the first, which stays
 * meaningful when shape[0] is 0 (it saturates only then, when no row can be read). */
static size_t st_view_cols(const struct ckpt_st_tensor *t)
{
    size_t cols = 1;
    for (int d = 1; d < t->ndim; d++)
        if (!st_mul(cols, t->shape[d], &cols)) return SIZE_MAX;
    return cols;
}

int ckpt_st_read_block(const ckpt_st_file *f, int i, float *out, size_t r0, size_t nr,
                       size_t c0, size_t nc)
{
    const struct ckpt_st_tensor *const t = ckpt_st_get(f, i);
    size_t const rows = t->ndim == 0 ? 1 : t->shape[0];
    size_t const cols = st_view_cols(t);
    char shape_buf[128];
    RETURN_IF(r0 > rows || nr > rows - r0 || c0 > cols || nc > cols - c0, VD_EINVAL,
              "%s: block of %zu x %zu at row %zu, column %zu lies outside tensor '%s' of "
              "shape %s, read as %zu x %zu", f->path, nr, nc, r0, c0, t->name,
              st_shape_str(shape_buf, t->ndim, t->shape), rows, cols);
    if (nr == 0 || nc == 0) return 0;
    VD_CHECK(out, "ckpt_st_read_block: out is NULL");
    size_t const esize = st_dtype_nbytes[t->dtype];
    const unsigned char *const first = f->data + t->begin + (r0 * cols + c0) * esize;
    if (nc == cols) { /* whole rows are one contiguous run */
        st_convert(out, first, nr * nc, t->dtype);
        return 0;
    }
    for (size_t r = 0; r < nr; r++)
        st_convert(out + r * nc, first + r * cols * esize, nc, t->dtype);
    return 0;
}

/* ---------------------------------------------------------------- writer */

/* Adds one tensor's entry to the header and advances *offset past its data. */
static int st_header_add_tensor(json_t *root, const char *path,
                                const struct ckpt_st_write_tensor *t, size_t *offset)
{
    VD_CHECK(t->name, "%s: a tensor to write has no name", path);
    RETURN_IF(strcmp(t->name, ST_METADATA_KEY) == 0, VD_EINVAL,
              "%s: '%s' cannot name a tensor; safetensors reserves it for metadata", path,
              t->name);
    RETURN_IF(json_object_get(root, t->name), VD_EINVAL,
              "%s: tensor name '%s' is given more than once; names must be unique", path,
              t->name);
    RETURN_IF(t->ndim < 0 || t->ndim > ST_MAX_DIMS, VD_EINVAL,
              "%s: tensor '%s' has %d dimensions; 0 to %d are allowed", path, t->name,
              t->ndim, ST_MAX_DIMS);
    json_t *const entry = json_object();
    RETURN_IF(!entry, VD_ENOMEM, "%s: out of memory building the header", path);
    RETURN_IF(json_object_set_new(root, t->name, entry) != 0, VD_EINVAL,
              "%s: tensor name '%s' is not valid UTF-8", path, t->name);
    RETURN_IF(json_object_set_new(entry, "dtype", json_string("F32")) != 0, VD_ENOMEM,
              "%s: out of memory building the header", path);
    json_t *const shape = json_array();
    RETURN_IF(json_object_set_new(entry, "shape", shape) != 0, VD_ENOMEM,
              "%s: out of memory building the header", path);
    size_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        RETURN_IF(!st_mul(numel, t->shape[d], &numel) || t->shape[d] > LLONG_MAX, VD_EINVAL,
                  "%s: tensor '%s' has a shape whose element count overflows", path, t->name);
        RETURN_IF(json_array_append_new(shape, json_integer((json_int_t)t->shape[d])) != 0,
                  VD_ENOMEM, "%s: out of memory building the header", path);
    }
    VD_CHECK(t->data || numel == 0, "%s: tensor '%s' has no data", path, t->name);
    size_t const begin = *offset;
    size_t end = 0;
    RETURN_IF(!st_mul(numel, sizeof(float), &end) || __builtin_add_overflow(begin, end, &end) ||
                  end > LLONG_MAX,
              VD_EINVAL, "%s: tensor '%s' would end past the largest offset a file can hold",
              path, t->name);
    RETURN_IF(json_object_set_new(entry, "data_offsets",
                                  json_pack("[II]", (json_int_t)begin, (json_int_t)end)) != 0,
              VD_ENOMEM, "%s: out of memory building the header", path);
    *offset = end;
    return 0;
}

static int st_header_add_metadata(json_t *root, const char *path, const char *const *keys,
                                  const char *const *values, int n_meta)
{
    json_t *const meta = json_object();
    RETURN_IF(json_object_set_new(root, ST_METADATA_KEY, meta) != 0, VD_ENOMEM,
              "%s: out of memory building the header", path);
    for (int m = 0; m < n_meta; m++) {
        VD_CHECK(keys[m] && values[m], "%s: metadata entry %d has a NULL key or value", path,
                 m);
        RETURN_IF(json_object_get(meta, keys[m]), VD_EINVAL,
                  "%s: metadata key '%s' is given more than once", path, keys[m]);
        RETURN_IF(json_object_set_new(meta, keys[m], json_string(values[m])) != 0, VD_EINVAL,
                  "%s: metadata key '%s' or its value is not valid UTF-8", path, keys[m]);
    }
    return 0;
}

/* The header text, padded with spaces to a multiple of 8 bytes; *text is the caller's to
 * free. */
static int st_header_build(char **text, size_t *nbytes, const char *path,
                           const struct ckpt_st_write_tensor *tensors, int n,
                           const char *const *meta_keys, const char *const *meta_values,
                           int n_meta)
{
    json_t *const root = json_object();
    RETURN_IF(!root, VD_ENOMEM, "%s: out of memory building the header", path);
    int err = 0;
    /* The reference writer puts __metadata__ first; readers do not care, people do. */
    if (n_meta > 0) err = st_header_add_metadata(root, path, meta_keys, meta_values, n_meta);
    size_t offset = 0;
    for (int i = 0; i < n && err == 0; i++)
        err = st_header_add_tensor(root, path, &tensors[i], &offset);
    /* jansson >= 2.8 always keeps insertion order; the flag asks older versions for it. */
    char *const dumped = err == 0 ? json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(root);
    FORWARD_IF(err);
    RETURN_IF(!dumped, VD_ENOMEM, "%s: out of memory writing the header", path);
    size_t const len = strlen(dumped);
    size_t const padded = (len + 7) / 8 * 8;
    bool const fits = padded <= ST_MAX_HEADER_NBYTES;
    if (fits) {
        *text = vd_alloc(padded);
        memcpy(*text, dumped, len);
        memset(*text + len, ' ', padded - len);
    }
    free(dumped);
    RETURN_IF(!fits, VD_EINVAL,
              "%s: header of %zu bytes would be over the 100000000-byte limit readers accept",
              path, padded);
    *nbytes = padded;
    return 0;
}

/* Writes the whole file through fd (tmp names it in errors); vd_replace_fd syncs it. */
static int st_write_contents(int fd, const char *tmp, const char *header,
                             size_t header_nbytes, const struct ckpt_st_write_tensor *tensors,
                             int n)
{
    unsigned char len_bytes[ST_LEN_NBYTES];
    for (int b = 0; b < ST_LEN_NBYTES; b++)
        len_bytes[b] = (unsigned char)((uint64_t)header_nbytes >> (8 * b));
    FORWARD_IF(vd_write_all(fd, tmp, len_bytes, sizeof len_bytes));
    FORWARD_IF(vd_write_all(fd, tmp, header, header_nbytes));
    for (int i = 0; i < n; i++) {
        size_t numel = 1; /* cannot overflow: the header's construction checked it */
        for (int d = 0; d < tensors[i].ndim; d++) numel *= tensors[i].shape[d];
        FORWARD_IF(vd_write_all(fd, tmp, tensors[i].data, numel * sizeof(float)));
    }
    return 0;
}

/* Writes the whole file under tmp and commits it as path (vd_replace_fd); on error nothing
 * is left under either name. Syncing the directory after the rename is best effort: the new
 * file is complete and in place by then, and reporting an error would tell the caller it
 * is not. */
static int st_write_replace(const char *tmp, const char *path, const char *header,
                            size_t header_nbytes, const struct ckpt_st_write_tensor *tensors,
                            int n)
{
    int const fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    RETURN_IF(fd < 0, VD_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    int const err = st_write_contents(fd, tmp, header, header_nbytes, tensors, n);
    if (err < 0) {
        close(fd);
        unlink(tmp);
        return vd_err_forward(err, __FILE__, __LINE__);
    }
    enum vd_replace_step failed;
    if (vd_replace_fd(fd, tmp, path, &failed) == 0) return 0;
    switch (failed) {
    case VD_REPLACE_OPEN_DIR:
    case VD_REPLACE_SYNC_DIR:
        return 0;
    case VD_REPLACE_RENAME:
        RETURN_ERR(VD_EIO, "%s: cannot rename %s to it: %s", path, tmp, strerror(errno));
    case VD_REPLACE_CLOSE:
        RETURN_ERR(VD_EIO, "%s: cannot close: %s", tmp, strerror(errno));
    default:
        RETURN_ERR(VD_EIO, "%s: cannot flush to disk: %s", tmp, strerror(errno));
    }
}

int ckpt_st_write(const char *path, const struct ckpt_st_write_tensor *tensors, int n,
                  const char *const *meta_keys, const char *const *meta_values, int n_meta)
{
    VD_CHECK(path && n >= 0 && (n == 0 || tensors), "ckpt_st_write: bad tensor arguments");
    VD_CHECK(n_meta >= 0 && (n_meta == 0 || (meta_keys && meta_values)),
             "ckpt_st_write: bad metadata arguments");
    char *header = NULL;
    size_t header_nbytes = 0;
    FORWARD_IF(st_header_build(&header, &header_nbytes, path, tensors, n, meta_keys,
                               meta_values, n_meta));
    size_t const tmp_nbytes = strlen(path) + 32; /* room for any pid: never too long */
    char *const tmp = vd_alloc(tmp_nbytes);
    int err = vd_tmp_name(tmp, tmp_nbytes, path);
    if (err == 0) err = st_write_replace(tmp, path, header, header_nbytes, tensors, n);
    free(tmp);
    free(header);
    FORWARD_IF(err);
    return 0;
}
