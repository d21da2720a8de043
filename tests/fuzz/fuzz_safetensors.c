/* libFuzzer harness for the safetensors reader (ckpt_st_open, ckpt/safetensors.c).
 *
 * Each input is a whole file, written to a memfd and opened through /proc/self/fd/N, so
 * the reader maps it exactly as it maps a file on disk. A file the reader accepts must
 * then keep the promises of ckpt.h, checked here as an oracle (a broken promise aborts,
 * which libFuzzer reports as a crash): every tensor reads whole over its 2-D view, a
 * strided sub-block reads the same values as the whole read, a block past the last row is
 * refused with VD_EINVAL, and ckpt_st_find finds every tensor under its own name.
 * Sanitizers catch the rest: reads outside the mapping, overflows, leaks, and any
 * allocation over -malloc_limit_mb (libFuzzer's "out-of-memory (malloc(N))").
 *
 * Half the mutations are structure-aware: the header is mutated as JSON (json_mutate.h),
 * written back with a correct length field, and the data section is then either kept,
 * resized to the largest end offset, or the offsets are recomputed back to back from the
 * shapes and dtypes, so that many mutants pass validation and reach ckpt_st_read_block. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ckpt/ckpt.h"
#include "tests/fuzz/json_mutate.h"

#define FUZZ_CHECK(cond, ...)                                                              \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_safetensors: %s:%d: broken promise: ", __FILE__,         \
                    __LINE__);                                                             \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, " (%s)\n", vd_err_msg());                                      \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

static int input_fd = -1;
static char input_path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    input_fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
    if (input_fd < 0) {
        perror("fuzz_safetensors: memfd_create");
        abort();
    }
    snprintf(input_path, sizeof input_path, "/proc/self/fd/%d", input_fd);
    return 0;
}

static void write_input(const uint8_t *data, size_t size)
{
    if (ftruncate(input_fd, 0) != 0) abort();
    size_t done = 0;
    while (done < size) {
        ssize_t const w = pwrite(input_fd, data + done, size - done, (off_t)done);
        if (w <= 0) abort();
        done += (size_t)w;
    }
}

/* Bitwise equality, so NaN payloads compare too. */
static bool same_float(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* Reads tensor i every way the API allows; vals has room for the whole tensor. */
static void check_tensor(const ckpt_st_file *f, int i, float *vals, float *sub)
{
    const struct ckpt_st_tensor *const t = ckpt_st_get(f, i);
    FUZZ_CHECK(t->ndim >= 0 && t->ndim <= 4, "tensor %d has %d dimensions", i, t->ndim);
    FUZZ_CHECK(t->begin <= t->end, "tensor '%s' ends before it begins", t->name);
    FUZZ_CHECK(ckpt_st_find(f, t->name) == i, "ckpt_st_find('%s') is %d, not %d", t->name,
               ckpt_st_find(f, t->name), i);
    size_t const rows = t->ndim == 0 ? 1 : t->shape[0];
    size_t cols = 1;
    for (int d = 1; d < t->ndim; d++)
        if (__builtin_mul_overflow(cols, t->shape[d], &cols)) cols = SIZE_MAX;
    FUZZ_CHECK(rows == 0 || rows * cols == t->numel, "tensor '%s': %zu x %zu is not %zu",
               t->name, rows, cols, t->numel);

    int rc = ckpt_st_read_block(f, i, vals, 0, rows, 0, cols);
    FUZZ_CHECK(rc == 0, "whole read of tensor '%s' failed", t->name);
    if (rows > 0 && cols > 1) {
        size_t const r0 = rows / 2, nr = rows - r0, c0 = 1, nc = cols - 1;
        rc = ckpt_st_read_block(f, i, sub, r0, nr, c0, nc);
        FUZZ_CHECK(rc == 0, "sub-block read of tensor '%s' failed", t->name);
        for (size_t r = 0; r < nr; r++)
            for (size_t c = 0; c < nc; c++)
                FUZZ_CHECK(same_float(sub[r * nc + c], vals[(r0 + r) * cols + c0 + c]),
                           "tensor '%s': sub-block element (%zu, %zu) differs", t->name,
                           r0 + r, c0 + c);
    }
    rc = ckpt_st_read_block(f, i, vals, rows, 1, 0, cols > 0 ? 1 : 0);
    FUZZ_CHECK(rc == VD_EINVAL, "a row past the end of tensor '%s' gave %d", t->name, rc);
    vd_err_clear();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    write_input(data, size);
    ckpt_st_file *f = NULL;
    if (ckpt_st_open(&f, input_path) != 0) {
        FUZZ_CHECK(f == NULL, "a failed open returned a handle");
        vd_err_clear();
        return 0;
    }
    (void)ckpt_st_metadata(f, "format");
    int const n = ckpt_st_count(f);
    FUZZ_CHECK(n >= 0, "%d tensors", n);
    size_t most = 1;
    for (int i = 0; i < n; i++) {
        size_t const numel = ckpt_st_get(f, i)->numel;
        most = numel > most ? numel : most;
    }
    /* numel * dtype size is the tensor's bytes in the file, so this is at most 4x the
     * input's size: the fuzzer's input limit bounds it. */
    float *const vals = malloc(most * sizeof *vals);
    float *const sub = malloc(most * sizeof *sub);
    if (!vals || !sub) abort();
    for (int i = 0; i < n; i++) check_tensor(f, i, vals, sub);
    free(vals);
    free(sub);
    ckpt_st_close(f);
    return 0;
}

/* ---------------------------------------------------------------- structure-aware mutator */

static const char *const dtype_words[] = {"F32", "BF16", "F16", "I32", "I64", "F64", "U8", ""};

static size_t dtype_nbytes(const char *dtype)
{
    if (!dtype) return 4;
    if (strcmp(dtype, "I64") == 0 || strcmp(dtype, "F64") == 0) return 8;
    if (strcmp(dtype, "BF16") == 0 || strcmp(dtype, "F16") == 0) return 2;
    if (strcmp(dtype, "U8") == 0) return 1;
    return 4;
}

/* Bytes the tensor's shape and dtype need, or SIZE_MAX. */
static size_t entry_nbytes(const json_t *entry)
{
    const json_t *const shape = json_object_get(entry, "shape");
    size_t n = dtype_nbytes(json_string_value(json_object_get(entry, "dtype")));
    for (size_t d = 0; d < json_array_size(shape); d++) {
        json_int_t const dim = json_integer_value(json_array_get(shape, d));
        if (dim < 0 || __builtin_mul_overflow(n, (size_t)dim, &n)) return SIZE_MAX;
    }
    return n;
}

/* Sets every tensor's data_offsets back to back in header order; the total, or SIZE_MAX
 * when it would pass cap. */
static size_t relayout(json_t *root, size_t cap)
{
    size_t offset = 0;
    const char *key;
    json_t *entry;
    json_object_foreach(root, key, entry) {
        if (!json_is_object(entry) || strcmp(key, "__metadata__") == 0) continue;
        size_t const n = entry_nbytes(entry);
        if (n > cap || offset > cap - n) return SIZE_MAX;
        json_object_set_new(entry, "data_offsets",
                            json_pack("[II]", (json_int_t)offset, (json_int_t)(offset + n)));
        offset += n;
    }
    return offset;
}

/* The largest end offset of the header, capped. */
static size_t largest_end(const json_t *root, size_t cap)
{
    size_t end = 0;
    const char *key;
    json_t *entry;
    json_object_foreach((json_t *)root, key, entry) {
        json_int_t const e = json_integer_value(json_array_get(json_object_get(entry,
                                                                               "data_offsets"), 1));
        if (e > 0 && (size_t)e > end) end = (size_t)e;
    }
    return end < cap ? end : cap;
}

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed)
{
    uint64_t state = (uint64_t)seed * 0x9e3779b97f4a7c15ull + 1;
    if (fuzz_rng(&state) % 2 || size < 8) return LLVMFuzzerMutate(data, size, max_size);
    uint64_t header_nbytes = 0;
    for (int b = 7; b >= 0; b--) header_nbytes = header_nbytes << 8 | data[b];
    if (header_nbytes > size - 8) return LLVMFuzzerMutate(data, size, max_size);
    json_t *const root = json_loadb((const char *)data + 8, (size_t)header_nbytes, 0, NULL);
    if (!root) return LLVMFuzzerMutate(data, size, max_size);
    fuzz_json_mutate(root, &state, dtype_words, sizeof dtype_words / sizeof dtype_words[0]);

    const uint8_t *const old_data = data + 8 + header_nbytes;
    size_t const old_nbytes = size - 8 - (size_t)header_nbytes;
    size_t data_nbytes = old_nbytes;
    switch (fuzz_rng(&state) % 3) {
    case 1: data_nbytes = largest_end(root, max_size); break;
    case 2: {
        size_t const total = relayout(root, max_size);
        if (total != SIZE_MAX) data_nbytes = total;
        break;
    }
    default: break;
    }
    char *const text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
    json_decref(root);
    size_t const len = text ? strlen(text) : 0;
    size_t const padded = (len + 7) / 8 * 8;
    if (!text || padded > max_size || max_size - padded < 8 ||
        data_nbytes > max_size - padded - 8) {
        free(text);
        return LLVMFuzzerMutate(data, size, max_size);
    }
    /* The new data: the old bytes again and again (zeros when there were none). */
    uint8_t *const out = malloc(8 + padded + data_nbytes);
    if (!out) abort();
    for (int b = 0; b < 8; b++) out[b] = (uint8_t)((uint64_t)padded >> (8 * b));
    memcpy(out + 8, text, len);
    memset(out + 8 + len, ' ', padded - len);
    for (size_t i = 0; i < data_nbytes; i++)
        out[8 + padded + i] = old_nbytes ? old_data[i % old_nbytes] : 0;
    free(text);
    size_t const total = 8 + padded + data_nbytes;
    memcpy(data, out, total);
    free(out);
    return total;
}
