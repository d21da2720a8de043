/* libFuzzer harness for the safetensors reader (ckpt_st_open, ckpt/safetensors.c).
 *
 * Each input is a whole file, written to a memfd and opened through /proc/self/fd/N, so
 * the reader maps it exactly as it maps a file on disk. A file the reader accepts must
 * then keep the promises of ckpt.h, checked here as an oracle (a broken promise aborts,
 * which libFuzzer reports as a crash): every tensor reads whole over its 2-D view, a
 * strided sub-block reads the same values as the whole read, a block past the last row is
 * refused with VD_EINVAL, and ckpt_st_find finds every tensor under its own name.
 * Sanitizers catch the rest: reads outside the mapping, overflows, leaks, and any
 * allocation over -malloc_limit_mb (libFuzzer's "out-of-memory (malloc(N))"). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ckpt/ckpt.h"

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
