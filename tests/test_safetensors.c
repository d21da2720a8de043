/* safetensors reader and writer (ckpt/safetensors.c): round trips through the writer,
 * block reads, dtype conversion against hand-computed values, every validation rule of the
 * reference parser on hand-built files, and the writer's promise to leave no file behind
 * when it fails. Files live in a mkdtemp directory under /tmp, removed at the end. */
#include <CUnit/Basic.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt/ckpt.h"

static char tmp_dir[64];

/* ---------------------------------------------------------------- helpers */

static const char *join(char buf[static 512], const char *dir, const char *name)
{
    int const len = snprintf(buf, 512, "%s/%s", dir, name);
    CU_ASSERT_FATAL(len > 0 && len < 512);
    return buf;
}

static const char *path_in(char buf[static 512], const char *name)
{
    return join(buf, tmp_dir, name);
}

/* A fresh empty directory under tmp_dir, for tests that check what is left in it. */
static const char *subdir(char buf[static 512], const char *name)
{
    path_in(buf, name);
    CU_ASSERT_FATAL(mkdir(buf, 0755) == 0);
    return buf;
}

/* Entries of dir other than . and .. */
static int entry_count(const char *dir)
{
    DIR *const d = opendir(dir);
    if (!d) return -1;
    int count = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) count++;
    closedir(d);
    return count;
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* A safetensors file built by hand: the 8-byte length field (header_len), the header
 * text and data_nbytes bytes of data. */
static void write_raw_len(const char *path, uint64_t header_len, const char *header,
                          const void *data, size_t data_nbytes)
{
    FILE *const fp = fopen(path, "wb");
    CU_ASSERT_FATAL(fp != NULL);
    unsigned char len_bytes[8];
    for (int b = 0; b < 8; b++) len_bytes[b] = (unsigned char)(header_len >> (8 * b));
    CU_ASSERT_FATAL(fwrite(len_bytes, 1, 8, fp) == 8);
    size_t const header_nbytes = strlen(header);
    CU_ASSERT_FATAL(fwrite(header, 1, header_nbytes, fp) == header_nbytes);
    if (data_nbytes) CU_ASSERT_FATAL(fwrite(data, 1, data_nbytes, fp) == data_nbytes);
    CU_ASSERT_FATAL(fclose(fp) == 0);
}

static void write_raw(const char *path, const char *header, const void *data,
                      size_t data_nbytes)
{
    write_raw_len(path, strlen(header), header, data, data_nbytes);
}

static unsigned char *read_whole(const char *path, size_t *nbytes)
{
    FILE *const fp = fopen(path, "rb");
    CU_ASSERT_FATAL(fp != NULL);
    fseek(fp, 0, SEEK_END);
    long const size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *const buf = malloc((size_t)size + 1);
    CU_ASSERT_FATAL(fread(buf, 1, (size_t)size, fp) == (size_t)size);
    fclose(fp);
    buf[size] = 0;
    *nbytes = (size_t)size;
    return buf;
}

static float float_of(uint32_t b)
{
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

/* ---------------------------------------------------------------- round trip */

enum { RT_N = 5 };

static void test_roundtrip_bitwise(void)
{
    float w[12] = {1.0f, -0.0f, INFINITY, -INFINITY, 1e-40f /* subnormal */,
                   3.4028235e38f, 1.0f / 3.0f, -7.25f, 0.0f, 2.5f, -1e-7f, 42.0f};
    w[8] = float_of(0x7fc12345u); /* nan with a payload must survive bit for bit */
    float const bias[5] = {0.5f, -0.5f, 1.5f, -1.5f, 100.0f};
    float const scale = -3.75f;
    float cube[12];
    for (int k = 0; k < 12; k++) cube[k] = (float)k * 0.125f - 1.0f;
    const struct ckpt_st_write_tensor tensors[RT_N] = {
        {.name = "layers.0.w", .ndim = 2, .shape = {3, 4}, .data = w},
        {.name = "bias", .ndim = 1, .shape = {5}, .data = bias},
        {.name = "scale", .ndim = 0, .data = &scale},
        {.name = "empty", .ndim = 2, .shape = {0, 3}, .data = NULL},
        {.name = "cube", .ndim = 3, .shape = {2, 3, 2}, .data = cube},
    };
    const float *const values[RT_N] = {w, bias, &scale, NULL, cube};
    const char *const keys[] = {"format", "step", "note"};
    const char *const vals[] = {"pt", "42", "a \"quoted\" \xc3\xa9\n value"};
    char path[512];
    path_in(path, "rt.safetensors");
    CU_ASSERT_FATAL(ckpt_st_write(path, tensors, RT_N, keys, vals, 3) == 0);

    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_EQUAL_FATAL(ckpt_st_count(f), RT_N);
    size_t expect_begin = 0;
    for (int i = 0; i < RT_N; i++) {
        const struct ckpt_st_tensor *const t = ckpt_st_get(f, i);
        CU_ASSERT_STRING_EQUAL(t->name, tensors[i].name);
        CU_ASSERT_EQUAL(ckpt_st_find(f, tensors[i].name), i);
        CU_ASSERT_EQUAL(t->dtype, CKPT_F32);
        CU_ASSERT_EQUAL(t->ndim, tensors[i].ndim);
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            CU_ASSERT_EQUAL(t->shape[d], tensors[i].shape[d]);
            numel *= tensors[i].shape[d];
        }
        CU_ASSERT_EQUAL(t->numel, numel);
        CU_ASSERT_EQUAL(t->begin, expect_begin);
        CU_ASSERT_EQUAL(t->end, expect_begin + 4 * numel);
        expect_begin = t->end;
        if (numel == 0) continue;
        size_t const rows = t->ndim == 0 ? 1 : t->shape[0];
        float got[12];
        CU_ASSERT_EQUAL_FATAL(ckpt_st_read_block(f, i, got, 0, rows, 0, numel / rows), 0);
        CU_ASSERT(memcmp(got, values[i], numel * sizeof(float)) == 0);
    }
    CU_ASSERT_EQUAL(ckpt_st_find(f, "missing"), -1);
    CU_ASSERT_EQUAL(ckpt_st_find(f, ""), -1);
    for (int m = 0; m < 3; m++) {
        const char *const v = ckpt_st_metadata(f, keys[m]);
        CU_ASSERT(v != NULL && strcmp(v, vals[m]) == 0);
    }
    CU_ASSERT_PTR_NULL(ckpt_st_metadata(f, "absent"));
    ckpt_st_close(f);
}

/* The bytes on disk are what the reference writer produces for the same tensor. */
static void test_write_exact_bytes(void)
{
    float const x[2] = {1.0f, -2.0f};
    const struct ckpt_st_write_tensor t = {.name = "x", .ndim = 1, .shape = {2}, .data = x};
    char dir[512], path[512];
    subdir(dir, "exact");
    join(path, dir, "x.safetensors");
    CU_ASSERT_FATAL(ckpt_st_write(path, &t, 1, NULL, NULL, 0) == 0);
    size_t nbytes = 0;
    unsigned char *const buf = read_whole(path, &nbytes);
    const char *const json = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    size_t const json_len = strlen(json); /* 54 bytes, padded with 2 spaces to 56 */
    size_t const header_len = 56;
    CU_ASSERT_EQUAL_FATAL(nbytes, 8 + header_len + 8);
    uint64_t len_field = 0;
    for (int b = 7; b >= 0; b--) len_field = len_field << 8 | buf[b];
    CU_ASSERT_EQUAL(len_field, header_len);
    CU_ASSERT(memcmp(buf + 8, json, json_len) == 0);
    for (size_t k = json_len; k < header_len; k++) CU_ASSERT_EQUAL(buf[8 + k], ' ');
    CU_ASSERT(memcmp(buf + 8 + header_len, x, sizeof x) == 0);
    free(buf);
    CU_ASSERT_EQUAL(entry_count(dir), 1); /* no temporary left beside it */
}

/* Header layout: __metadata__ first, tensors in the caller's order (not sorted by name),
 * 8 + N a multiple of 8, the data section exactly the tensors' bytes. */
static void test_write_header_order(void)
{
    float const v[6] = {1, 2, 3, 4, 5, 6};
    const struct ckpt_st_write_tensor tensors[3] = {
        {.name = "zeta", .ndim = 1, .shape = {1}, .data = v},
        {.name = "alpha", .ndim = 2, .shape = {2, 2}, .data = v},
        {.name = "mid", .ndim = 1, .shape = {1}, .data = v + 5},
    };
    const char *const key = "k", *const val = "v";
    char path[512];
    path_in(path, "order.safetensors");
    CU_ASSERT_FATAL(ckpt_st_write(path, tensors, 3, &key, &val, 1) == 0);
    size_t nbytes = 0;
    unsigned char *const buf = read_whole(path, &nbytes);
    uint64_t n = 0;
    for (int b = 7; b >= 0; b--) n = n << 8 | buf[b];
    CU_ASSERT_EQUAL((8 + n) % 8, 0);
    CU_ASSERT_EQUAL(nbytes, 8 + n + 6 * sizeof(float));
    const char *const header = (const char *)buf + 8;
    CU_ASSERT(strncmp(header, "{\"__metadata__\":{\"k\":\"v\"},\"zeta\":", 33) == 0);
    const char *const a = strstr(header, "\"alpha\"");
    const char *const m = strstr(header, "\"mid\"");
    CU_ASSERT(a != NULL && m != NULL && a < m);
    float const data[6] = {1, 1, 2, 3, 4, 6}; /* zeta, alpha, mid */
    CU_ASSERT(memcmp(buf + 8 + n, data, sizeof data) == 0);
    free(buf);

    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_STRING_EQUAL(ckpt_st_get(f, 0)->name, "zeta");
    CU_ASSERT_STRING_EQUAL(ckpt_st_get(f, 1)->name, "alpha");
    CU_ASSERT_STRING_EQUAL(ckpt_st_get(f, 2)->name, "mid");
    ckpt_st_close(f);
}

static void test_write_no_metadata_and_overwrite(void)
{
    float const a[3] = {1, 2, 3}, b[3] = {4, 5, 6};
    struct ckpt_st_write_tensor t = {.name = "t", .ndim = 1, .shape = {3}, .data = a};
    char dir[512], path[512];
    subdir(dir, "overwrite");
    join(path, dir, "t.safetensors");
    CU_ASSERT_FATAL(ckpt_st_write(path, &t, 1, NULL, NULL, 0) == 0);
    t.data = b;
    CU_ASSERT_FATAL(ckpt_st_write(path, &t, 1, NULL, NULL, 0) == 0);
    CU_ASSERT_EQUAL(entry_count(dir), 1);
    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_PTR_NULL(ckpt_st_metadata(f, "format"));
    float got[3];
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, got, 0, 3, 0, 1) == 0);
    CU_ASSERT(memcmp(got, b, sizeof got) == 0);
    ckpt_st_close(f);
}

/* Many tensors written out of name order: find must return each one's index. */
static void test_find_many(void)
{
    enum { N = 300 };
    static struct ckpt_st_write_tensor tensors[N];
    static char names[N][16];
    static float values[N];
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "t%03d", (i * 7) % N);
        values[i] = (float)i;
        tensors[i] = (struct ckpt_st_write_tensor){
            .name = names[i], .ndim = 1, .shape = {1}, .data = &values[i]};
    }
    char path[512];
    path_in(path, "many.safetensors");
    CU_ASSERT_FATAL(ckpt_st_write(path, tensors, N, NULL, NULL, 0) == 0);
    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_EQUAL_FATAL(ckpt_st_count(f), N);
    int wrong = 0;
    for (int i = 0; i < N; i++) {
        float got = -1;
        int const idx = ckpt_st_find(f, names[i]);
        if (idx != i || ckpt_st_read_block(f, idx, &got, 0, 1, 0, 1) != 0 || got != (float)i)
            wrong++;
    }
    CU_ASSERT_EQUAL(wrong, 0);
    CU_ASSERT_EQUAL(ckpt_st_find(f, "t300"), -1);
    ckpt_st_close(f);
}

/* ---------------------------------------------------------------- read_block */

/* A 5 x 7 F32 tensor "m" with m[r][c] = 10 r + c, a (2, 3, 4) tensor "c3" with value
 * = index, a 1-D "v" of 6 and a scalar "s". */
static ckpt_st_file *open_block_file(void)
{
    float m[35], c3[24], v[6], s = 9.5f;
    for (int r = 0; r < 5; r++)
        for (int c = 0; c < 7; c++) m[r * 7 + c] = (float)(10 * r + c);
    for (int k = 0; k < 24; k++) c3[k] = (float)k;
    for (int k = 0; k < 6; k++) v[k] = (float)(100 + k);
    const struct ckpt_st_write_tensor tensors[4] = {
        {.name = "m", .ndim = 2, .shape = {5, 7}, .data = m},
        {.name = "c3", .ndim = 3, .shape = {2, 3, 4}, .data = c3},
        {.name = "v", .ndim = 1, .shape = {6}, .data = v},
        {.name = "s", .ndim = 0, .data = &s},
    };
    char path[512];
    path_in(path, "block.safetensors");
    CU_ASSERT_FATAL(ckpt_st_write(path, tensors, 4, NULL, NULL, 0) == 0);
    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    return f;
}

static void test_block_2d(void)
{
    ckpt_st_file *const f = open_block_file();
    float out[40];
    /* rows [1, 4) x cols [2, 6), with a sentinel after the block */
    out[12] = -1;
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, out, 1, 3, 2, 4) == 0);
    int wrong = 0;
    for (int r = 0; r < 3; r++)
        for (int c = 0; c < 4; c++) wrong += out[r * 4 + c] != (float)(10 * (1 + r) + 2 + c);
    CU_ASSERT_EQUAL(wrong, 0);
    CU_ASSERT_EQUAL(out[12], -1.0f);
    /* whole rows [3, 5) */
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, out, 3, 2, 0, 7) == 0);
    CU_ASSERT_EQUAL(out[0], 30.0f);
    CU_ASSERT_EQUAL(out[13], 46.0f);
    /* the last element alone */
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, out, 4, 1, 6, 1) == 0);
    CU_ASSERT_EQUAL(out[0], 46.0f);
    /* an empty block at the edge is allowed and writes nothing */
    out[0] = -5;
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 0, out, 5, 0, 0, 7), 0);
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 0, out, 0, 5, 7, 0), 0);
    CU_ASSERT_EQUAL(out[0], -5.0f);
    ckpt_st_close(f);
}

static void test_block_views(void)
{
    ckpt_st_file *const f = open_block_file();
    float out[24];
    /* (2, 3, 4) is read as (2, 12): row 1, cols [5, 9) are elements 17..20 */
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 1, out, 1, 1, 5, 4) == 0);
    CU_ASSERT(out[0] == 17.0f && out[1] == 18.0f && out[2] == 19.0f && out[3] == 20.0f);
    /* 1-D (6) is read as (6, 1) */
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 2, out, 2, 3, 0, 1) == 0);
    CU_ASSERT(out[0] == 102.0f && out[1] == 103.0f && out[2] == 104.0f);
    /* a scalar is (1, 1) */
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 3, out, 0, 1, 0, 1) == 0);
    CU_ASSERT_EQUAL(out[0], 9.5f);
    ckpt_st_close(f);
}

static void test_block_out_of_bounds(void)
{
    ckpt_st_file *const f = open_block_file();
    float out[64];
    for (int k = 0; k < 64; k++) out[k] = -1;
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 0, out, 3, 3, 0, 7), VD_EINVAL); /* rows 3..5 of 5 */
    CU_ASSERT(strstr(vd_err_msg(), "'m'") != NULL);
    CU_ASSERT(strstr(vd_err_msg(), "block.safetensors") != NULL);
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 0, out, 0, 1, 5, 3), VD_EINVAL); /* cols 5..7 of 7 */
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 0, out, 6, 0, 0, 1), VD_EINVAL); /* start past end */
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 0, out, SIZE_MAX, 2, 0, 1), VD_EINVAL); /* wraps */
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 0, out, 0, 1, 1, SIZE_MAX), VD_EINVAL);
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 2, out, 0, 1, 0, 2), VD_EINVAL); /* 1-D has 1 col */
    CU_ASSERT(strstr(vd_err_msg(), "'v'") != NULL);
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 3, out, 0, 2, 0, 1), VD_EINVAL); /* scalar is 1x1 */
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, 1, out, 0, 1, 0, 13), VD_EINVAL); /* c3 is 2x12 */
    int touched = 0;
    for (int k = 0; k < 64; k++) touched += out[k] != -1.0f;
    CU_ASSERT_EQUAL(touched, 0);
    ckpt_st_close(f);
}

/* An odd-length header and a 2-byte tensor first put the F32 tensor at an odd address. */
static void test_block_unaligned_f32(void)
{
    unsigned char data[2 + 12];
    uint16_t const h = 0x3f80; /* bf16 1.0 */
    float const v[3] = {1.25f, -8.0f, 3.0f};
    memcpy(data, &h, 2);
    memcpy(data + 2, v, sizeof v);
    char path[512];
    path_in(path, "unaligned.safetensors");
    write_raw(path,
              "{\"h\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[0,2]},"
              "\"f\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[2,14]}}",
              data, sizeof data);
    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    float out[3];
    CU_ASSERT_FATAL(ckpt_st_read_block(f, ckpt_st_find(f, "f"), out, 0, 3, 0, 1) == 0);
    CU_ASSERT(memcmp(out, v, sizeof v) == 0);
    CU_ASSERT_FATAL(ckpt_st_read_block(f, ckpt_st_find(f, "h"), out, 0, 1, 0, 1) == 0);
    CU_ASSERT_EQUAL(out[0], 1.0f);
    ckpt_st_close(f);
}

/* ---------------------------------------------------------------- dtypes */

static void test_bf16(void)
{
    /* bf16 is the top half of an f32: 0x3fc0 -> 0x3fc00000 = 1.5, 0x4049 -> 3.140625,
     * 0x0001 -> 0x00010000 = 2^16 * 2^-149 = 2^-133. */
    uint16_t const raw[8] = {0x3f80, 0xc000, 0x3fc0, 0x4049, 0x7f80, 0x0001, 0x8000, 0x7fc0};
    char path[512];
    path_in(path, "bf16.safetensors");
    write_raw(path, "{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,4],\"data_offsets\":[0,16]}}", raw,
              sizeof raw);
    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_EQUAL(ckpt_st_get(f, 0)->dtype, CKPT_BF16);
    float out[8];
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, out, 0, 2, 0, 4) == 0);
    CU_ASSERT_EQUAL(out[0], 1.0f);
    CU_ASSERT_EQUAL(out[1], -2.0f);
    CU_ASSERT_EQUAL(out[2], 1.5f);
    CU_ASSERT_EQUAL(out[3], 3.140625f);
    CU_ASSERT(isinf(out[4]) && out[4] > 0);
    CU_ASSERT_EQUAL(out[5], 0x1p-133f);
    CU_ASSERT(out[6] == 0.0f && signbit(out[6]));
    CU_ASSERT(isnan(out[7]));
    /* a block of partial rows: row 1, cols [1, 3) */
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, out, 1, 1, 1, 2) == 0);
    CU_ASSERT_EQUAL(out[0], 0x1p-133f);
    CU_ASSERT(out[1] == 0.0f && signbit(out[1]));
    ckpt_st_close(f);
}

static void test_f16(void)
{
    /* IEEE half: exponent bias 15, 10 mantissa bits; exponent 0 is subnormal,
     * mantissa * 2^-24. 0x3555: 2^-2 * (1 + 341/1024) = 0.333251953125;
     * 0x3bff: 2^-1 * (1 + 1023/1024) = 0.99951171875; 0x7bff: 2^15 * (2 - 2^-10) = 65504;
     * 0x0400: 2^-14; 0x03ff: 1023 * 2^-24; 0x8001: -2^-24. */
    uint16_t const raw[12] = {0x3c00, 0xc000, 0x3555, 0x3bff, 0x7bff, 0x0400,
                              0x0001, 0x03ff, 0x8001, 0x8000, 0x7c00, 0xfc00};
    uint16_t const nan_raw = 0x7e00;
    unsigned char data[26];
    memcpy(data, raw, sizeof raw);
    memcpy(data + 24, &nan_raw, 2);
    char path[512];
    path_in(path, "f16.safetensors");
    write_raw(path,
              "{\"h\":{\"dtype\":\"F16\",\"shape\":[3,4],\"data_offsets\":[0,24]},"
              "\"n\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[24,26]}}",
              data, sizeof data);
    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    float out[12];
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, out, 0, 3, 0, 4) == 0);
    CU_ASSERT_EQUAL(out[0], 1.0f);
    CU_ASSERT_EQUAL(out[1], -2.0f);
    CU_ASSERT_EQUAL(out[2], 0.333251953125f);
    CU_ASSERT_EQUAL(out[3], 0.99951171875f);
    CU_ASSERT_EQUAL(out[4], 65504.0f);
    CU_ASSERT_EQUAL(out[5], 6.103515625e-05f);
    CU_ASSERT_EQUAL(out[6], 5.9604644775390625e-08f);
    CU_ASSERT_EQUAL(out[7], 6.097555160522461e-05f);
    CU_ASSERT_EQUAL(out[8], -5.9604644775390625e-08f);
    CU_ASSERT(out[9] == 0.0f && signbit(out[9]));
    CU_ASSERT(isinf(out[10]) && out[10] > 0);
    CU_ASSERT(isinf(out[11]) && out[11] < 0);
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 1, out, 0, 1, 0, 1) == 0);
    CU_ASSERT(isnan(out[0]));
    ckpt_st_close(f);
}

static void test_integers(void)
{
    int32_t const i32[4] = {-3, 0, 123456, 2147483647};
    /* 2^53 + 1 is not a float: it rounds to 2^53 */
    int64_t const i64[4] = {-7, (int64_t)1 << 40, -((int64_t)1 << 53),
                            ((int64_t)1 << 53) + 1};
    unsigned char data[16 + 32];
    memcpy(data, i32, sizeof i32);
    memcpy(data + 16, i64, sizeof i64);
    char path[512];
    path_in(path, "int.safetensors");
    write_raw(path,
              "{\"a\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
              "\"b\":{\"dtype\":\"I64\",\"shape\":[4],\"data_offsets\":[16,48]}}",
              data, sizeof data);
    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    float out[4];
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, out, 0, 2, 0, 2) == 0);
    CU_ASSERT(out[0] == -3.0f && out[1] == 0.0f && out[2] == 123456.0f &&
              out[3] == 2147483648.0f);
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 1, out, 0, 4, 0, 1) == 0);
    CU_ASSERT(out[0] == -7.0f && out[1] == 0x1p40f && out[2] == -0x1p53f && out[3] == 0x1p53f);
    ckpt_st_close(f);
}

/* ---------------------------------------------------------------- validation */

static const unsigned char zeros[64];

/* Opening header + data_nbytes zero bytes must fail with VD_EFORMAT, a message naming
 * the file and containing want1 and want2 (either may be NULL). */
static void expect_format_error_len(uint64_t header_len, const char *header,
                                    size_t data_nbytes, const char *want1, const char *want2)
{
    char path[512];
    path_in(path, "raw.safetensors");
    write_raw_len(path, header_len, header, zeros, data_nbytes);
    ckpt_st_file *f = (ckpt_st_file *)&f; /* must be reset to NULL */
    vd_err_clear();
    CU_ASSERT_EQUAL(ckpt_st_open(&f, path), VD_EFORMAT);
    CU_ASSERT_PTR_NULL(f);
    const char *const msg = vd_err_msg();
    CU_ASSERT(strstr(msg, "raw.safetensors") != NULL);
    CU_ASSERT(!want1 || strstr(msg, want1) != NULL);
    CU_ASSERT(!want2 || strstr(msg, want2) != NULL);
    if (getenv("VDIST_TEST_SHOW_ERRORS")) printf("\n    %s\n", msg);
}

static void expect_format_error(const char *header, size_t data_nbytes, const char *want1,
                                const char *want2)
{
    expect_format_error_len(strlen(header), header, data_nbytes, want1, want2);
}

#define ENTRY(name, dtype, shape, b, e)                                                  \
    "\"" name "\":{\"dtype\":\"" dtype "\",\"shape\":" shape                              \
    ",\"data_offsets\":[" #b "," #e "]}"

static void test_err_file_too_short(void)
{
    char path[512];
    path_in(path, "short.safetensors");
    FILE *const fp = fopen(path, "wb");
    CU_ASSERT_FATAL(fp != NULL);
    fwrite("{}\0\0\0", 1, 5, fp);
    fclose(fp);
    ckpt_st_file *f = NULL;
    CU_ASSERT_EQUAL(ckpt_st_open(&f, path), VD_EFORMAT);
    CU_ASSERT(strstr(vd_err_msg(), "short.safetensors") != NULL);
    CU_ASSERT_EQUAL(ckpt_st_open(&f, "/nonexistent/dir/x.safetensors"), VD_EIO);
    CU_ASSERT(strstr(vd_err_msg(), "/nonexistent/dir/x.safetensors") != NULL);
    CU_ASSERT_EQUAL(ckpt_st_open(&f, tmp_dir), VD_EIO); /* a directory */
}

static void test_err_header_too_large(void)
{
    expect_format_error_len(100000001ull, "{}", 0, "100000000", NULL);
    expect_format_error_len(UINT64_MAX, "{}", 0, "limit", NULL);
}

static void test_err_header_past_eof(void)
{
    /* exactly the limit passes the size check and fails on the file's length */
    expect_format_error_len(100000000ull, "{}", 0, "past the end", NULL);
    expect_format_error_len(3, "{}", 0, "past the end", NULL);
}

static void test_err_not_json(void)
{
    expect_format_error("{not json}", 0, "JSON", NULL);
    expect_format_error("{\"a\":{\"dtype\":\"F32\"", 0, "JSON", NULL); /* cut short */
    expect_format_error("{\"\xff\":1}", 0, "UTF-8", NULL);
    expect_format_error("{} x", 0, "JSON", NULL);
}

static void test_err_not_object_start(void)
{
    expect_format_error(" {}", 0, "'{'", NULL); /* valid JSON, but the reference refuses it */
    expect_format_error("[]", 0, "'{'", NULL);
    expect_format_error_len(0, "", 0, "'{'", NULL);
}

static void test_err_duplicate_names(void)
{
    expect_format_error("{" ENTRY("dup.weight", "F32", "[1]", 0, 4) ","
                        ENTRY("dup.weight", "F32", "[1]", 4, 8) "}",
                        8, "dup.weight", "unique");
}

static void test_err_overlap(void)
{
    expect_format_error("{" ENTRY("a", "F32", "[4]", 0, 16) "," ENTRY("b", "F32", "[4]", 8, 24)
                        "}", 24, "'b'", "overlap");
    /* an empty tensor inside another one overlaps too */
    expect_format_error("{" ENTRY("a", "F32", "[4]", 0, 16) "," ENTRY("e", "F32", "[0]", 8, 8)
                        "}", 16, "'e'", "'a'");
}

static void test_err_gap(void)
{
    expect_format_error("{" ENTRY("a", "F32", "[4]", 0, 16) "," ENTRY("b", "F32", "[4]", 20, 36)
                        "}", 36, "'b'", "'a'");
    expect_format_error("{" ENTRY("a", "F32", "[4]", 4, 20) "}", 20, "'a'", "start at 0");
}

static void test_err_size_mismatch(void)
{
    expect_format_error("{" ENTRY("x.weight", "F32", "[2,2]", 0, 12) "}", 12,
                        "raw.safetensors: tensor 'x.weight' has data_offsets [0, 12] (12 "
                        "bytes) but dtype F32 and shape [2, 2] need 16 bytes", NULL);
    expect_format_error("{" ENTRY("h", "BF16", "[3]", 0, 12) "}", 12, "'h'", "6 bytes");
    expect_format_error("{" ENTRY("i", "I64", "[]", 0, 4) "}", 4, "'i'", "8 bytes");
}

static void test_err_trailing_bytes(void)
{
    expect_format_error("{" ENTRY("a", "F32", "[4]", 0, 16) "}", 20, "trailing", NULL);
    expect_format_error("{}", 1, "trailing", NULL);
    expect_format_error("{\"__metadata__\":{}}", 8, "trailing", NULL);
}

static void test_err_truncated(void)
{
    expect_format_error("{" ENTRY("a", "F32", "[4]", 0, 16) "}", 8, "'a'", "truncated");
}

static void test_err_unknown_dtype(void)
{
    expect_format_error("{" ENTRY("w", "F64", "[1]", 0, 8) "}", 8, "'w'", "F64");
    expect_format_error("{" ENTRY("mask", "BOOL", "[1]", 0, 1) "}", 1, "'mask'", "BOOL");
    expect_format_error("{" ENTRY("lower", "f32", "[1]", 0, 4) "}", 4, "'lower'", "f32");
    expect_format_error("{\"n\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'n'",
                        "dtype");
    expect_format_error("{\"m\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'m'", "dtype");
}

static void test_err_metadata_type(void)
{
    expect_format_error("{\"__metadata__\":{\"ok\":\"s\",\"step\":1},"
                        ENTRY("a", "F32", "[1]", 0, 4) "}", 4, "'step'", "string");
    expect_format_error("{\"__metadata__\":{\"nested\":{}}}", 0, "'nested'", "an object");
    expect_format_error("{\"__metadata__\":[\"x\"]}", 0, "__metadata__", "array");
    expect_format_error("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0, "\"k\"", "unique");
}

static void test_err_end_before_begin(void)
{
    expect_format_error("{" ENTRY("e", "F32", "[0]", 8, 4) "}", 8, "'e'", "end before");
}

static void test_err_bad_shape(void)
{
    expect_format_error("{" ENTRY("neg", "F32", "[-1]", 0, 4) "}", 4, "'neg'", "non-negative");
    expect_format_error("{" ENTRY("real", "F32", "[1.0]", 0, 4) "}", 4, "'real'", NULL);
    expect_format_error("{" ENTRY("five", "F32", "[1,1,1,1,1]", 0, 4) "}", 4, "'five'", "5");
    expect_format_error("{" ENTRY("str", "F32", "\"1\"", 0, 4) "}", 4, "'str'", "shape");
    expect_format_error("{\"ns\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "'ns'",
                        "shape");
    /* 2^32 * 2^32 elements overflow size_t; so do 2^62 * 4 bytes */
    expect_format_error("{" ENTRY("big", "F32", "[4294967296,4294967296]", 0, 4) "}", 4,
                        "'big'", "overflow");
    expect_format_error("{" ENTRY("wide", "F32", "[4611686018427387904]", 0, 4) "}", 4,
                        "'wide'", "overflow");
}

static void test_err_bad_offsets(void)
{
    expect_format_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "'t'", "data_offsets");
    expect_format_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 4,
                        "'t'", "data_offsets");
    expect_format_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4,
                        "'t'", "data_offsets");
    expect_format_error("{\"t\":5}", 0, "'t'", "object");
}

/* What the reference accepts, vdist accepts. */
static void test_accept_variants(void)
{
    char path[512];
    path_in(path, "ok.safetensors");
    ckpt_st_file *f = NULL;

    /* header order differs from data order; trailing spaces; an unknown field */
    float const v[5] = {1, 2, 3, 4, 5};
    write_raw(path,
              "{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[16,20],\"extra\":1},"
              "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,16]},"
              "\"e2\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[16,16]},"
              "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
              "\"e1\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}    ",
              v, sizeof v);
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_EQUAL_FATAL(ckpt_st_count(f), 5);
    /* data order; empty tensors at the same offset ("z", "e2") keep header order */
    CU_ASSERT_STRING_EQUAL(ckpt_st_get(f, 0)->name, "e1");
    CU_ASSERT_STRING_EQUAL(ckpt_st_get(f, 1)->name, "a");
    CU_ASSERT_STRING_EQUAL(ckpt_st_get(f, 2)->name, "z");
    CU_ASSERT_STRING_EQUAL(ckpt_st_get(f, 3)->name, "e2");
    CU_ASSERT_STRING_EQUAL(ckpt_st_get(f, 4)->name, "b");
    CU_ASSERT_EQUAL(ckpt_st_find(f, "z"), 2);
    float out[4];
    CU_ASSERT_FATAL(ckpt_st_read_block(f, ckpt_st_find(f, "b"), out, 0, 1, 0, 1) == 0);
    CU_ASSERT_EQUAL(out[0], 5.0f);
    CU_ASSERT_FATAL(ckpt_st_read_block(f, ckpt_st_find(f, "a"), out, 0, 2, 0, 2) == 0);
    CU_ASSERT(memcmp(out, v, 4 * sizeof(float)) == 0);
    /* (0, 5) view: no rows to read */
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, ckpt_st_find(f, "e2"), out, 0, 0, 0, 5), 0);
    CU_ASSERT_EQUAL(ckpt_st_read_block(f, ckpt_st_find(f, "e2"), out, 0, 1, 0, 5), VD_EINVAL);
    ckpt_st_close(f);

    /* no tensors at all, with and without metadata */
    write_raw(path, "{}", NULL, 0);
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_EQUAL(ckpt_st_count(f), 0);
    CU_ASSERT_EQUAL(ckpt_st_find(f, "a"), -1);
    ckpt_st_close(f);
    write_raw(path, "{\"__metadata__\":{\"format\":\"pt\"}}", NULL, 0);
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_EQUAL(ckpt_st_count(f), 0);
    const char *const format = ckpt_st_metadata(f, "format");
    CU_ASSERT(format != NULL && strcmp(format, "pt") == 0);
    ckpt_st_close(f);
    ckpt_st_close(NULL);
}

/* ---------------------------------------------------------------- writer failures */

static void test_write_missing_dir(void)
{
    float const x = 1;
    const struct ckpt_st_write_tensor t = {.name = "x", .ndim = 0, .data = &x};
    char dir[512], path[512];
    subdir(dir, "missing_parent");
    join(path, dir, "no/such/dir/x.safetensors");
    CU_ASSERT_EQUAL(ckpt_st_write(path, &t, 1, NULL, NULL, 0), VD_EIO);
    CU_ASSERT(strstr(vd_err_msg(), "no/such/dir/x.safetensors") != NULL);
    CU_ASSERT(!file_exists(path));
    CU_ASSERT_EQUAL(entry_count(dir), 0);
}

/* The temporary is written, then rename fails (the target is a directory): the
 * temporary must be gone and the target untouched. */
static void test_write_rename_fails(void)
{
    float const x = 1;
    const struct ckpt_st_write_tensor t = {.name = "x", .ndim = 0, .data = &x};
    char dir[512], path[512];
    subdir(dir, "rename_fails");
    join(path, dir, "target.safetensors");
    CU_ASSERT_FATAL(mkdir(path, 0755) == 0);
    CU_ASSERT_EQUAL(ckpt_st_write(path, &t, 1, NULL, NULL, 0), VD_EIO);
    CU_ASSERT(strstr(vd_err_msg(), "rename") != NULL);
    CU_ASSERT_EQUAL(entry_count(dir), 1);
    CU_ASSERT_EQUAL(entry_count(path), 0);
}

static void test_write_duplicate_names(void)
{
    float const a[2] = {1, 2}, b[2] = {3, 4};
    const struct ckpt_st_write_tensor good = {.name = "w", .ndim = 1, .shape = {2}, .data = a};
    const struct ckpt_st_write_tensor dup[3] = {
        {.name = "layer.w", .ndim = 1, .shape = {2}, .data = b},
        {.name = "other", .ndim = 1, .shape = {2}, .data = b},
        {.name = "layer.w", .ndim = 1, .shape = {2}, .data = b},
    };
    char dir[512], path[512];
    subdir(dir, "dup");
    join(path, dir, "d.safetensors");
    CU_ASSERT_EQUAL(ckpt_st_write(path, dup, 3, NULL, NULL, 0), VD_EINVAL);
    CU_ASSERT(strstr(vd_err_msg(), "'layer.w'") != NULL);
    CU_ASSERT(!file_exists(path));
    CU_ASSERT_EQUAL(entry_count(dir), 0);

    /* a failed write leaves an existing file as it was */
    CU_ASSERT_FATAL(ckpt_st_write(path, &good, 1, NULL, NULL, 0) == 0);
    CU_ASSERT_EQUAL(ckpt_st_write(path, dup, 3, NULL, NULL, 0), VD_EINVAL);
    CU_ASSERT_EQUAL(entry_count(dir), 1);
    ckpt_st_file *f = NULL;
    CU_ASSERT_FATAL(ckpt_st_open(&f, path) == 0);
    CU_ASSERT_EQUAL(ckpt_st_count(f), 1);
    float out[2];
    CU_ASSERT_FATAL(ckpt_st_read_block(f, 0, out, 0, 2, 0, 1) == 0);
    CU_ASSERT(memcmp(out, a, sizeof a) == 0);
    ckpt_st_close(f);
}

static void test_write_bad_input(void)
{
    float const x[2] = {1, 2};
    char dir[512], path[512];
    subdir(dir, "bad_input");
    join(path, dir, "b.safetensors");
    const struct ckpt_st_write_tensor reserved = {.name = "__metadata__", .ndim = 0, .data = x};
    CU_ASSERT_EQUAL(ckpt_st_write(path, &reserved, 1, NULL, NULL, 0), VD_EINVAL);
    CU_ASSERT(strstr(vd_err_msg(), "__metadata__") != NULL);
    const struct ckpt_st_write_tensor five = {
        .name = "five", .ndim = 5, .shape = {1, 1, 1, 1}, .data = x};
    CU_ASSERT_EQUAL(ckpt_st_write(path, &five, 1, NULL, NULL, 0), VD_EINVAL);
    CU_ASSERT(strstr(vd_err_msg(), "'five'") != NULL);
    const struct ckpt_st_write_tensor bad_utf8 = {.name = "bad\xff", .ndim = 0, .data = x};
    CU_ASSERT_EQUAL(ckpt_st_write(path, &bad_utf8, 1, NULL, NULL, 0), VD_EINVAL);
    CU_ASSERT(strstr(vd_err_msg(), "UTF-8") != NULL);
    const struct ckpt_st_write_tensor ok = {.name = "ok", .ndim = 1, .shape = {2}, .data = x};
    const char *const keys[2] = {"k", "k"}, *const vals[2] = {"1", "2"};
    CU_ASSERT_EQUAL(ckpt_st_write(path, &ok, 1, keys, vals, 2), VD_EINVAL);
    CU_ASSERT(strstr(vd_err_msg(), "'k'") != NULL);
    CU_ASSERT_EQUAL(entry_count(dir), 0);
}

/* ---------------------------------------------------------------- main */

struct test_entry {
    const char *name;
    void (*fn)(void);
};

static bool add_suite(const char *name, const struct test_entry *tests, size_t n)
{
    CU_pSuite const suite = CU_add_suite(name, NULL, NULL);
    if (!suite) return false;
    for (size_t i = 0; i < n; i++)
        if (!CU_add_test(suite, tests[i].name, tests[i].fn)) return false;
    return true;
}

#define ADD_SUITE(name, tests) add_suite((name), (tests), sizeof(tests) / sizeof((tests)[0]))

int main(void)
{
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/vdist_st_XXXXXX");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    static const struct test_entry roundtrip[] = {
        {"round trip of 2-D, 1-D, scalar, empty, 3-D with metadata", test_roundtrip_bitwise},
        {"file bytes match the reference writer", test_write_exact_bytes},
        {"header order and alignment", test_write_header_order},
        {"no metadata; overwrite in place", test_write_no_metadata_and_overwrite},
        {"find among many tensors", test_find_many},
    };
    static const struct test_entry blocks[] = {
        {"2-D sub-blocks", test_block_2d},
        {"3-D, 1-D and scalar views", test_block_views},
        {"blocks outside the view are refused", test_block_out_of_bounds},
        {"unaligned F32 data", test_block_unaligned_f32},
    };
    static const struct test_entry dtypes[] = {
        {"BF16", test_bf16},
        {"F16 normals, subnormals, inf, nan", test_f16},
        {"I32 and I64", test_integers},
    };
    static const struct test_entry validation[] = {
        {"file too short or unreadable", test_err_file_too_short},
        {"header length over the limit", test_err_header_too_large},
        {"header past the end of the file", test_err_header_past_eof},
        {"header not JSON", test_err_not_json},
        {"header not starting with {", test_err_not_object_start},
        {"duplicate names", test_err_duplicate_names},
        {"overlapping offsets", test_err_overlap},
        {"gap between tensors", test_err_gap},
        {"size differs from dtype and shape", test_err_size_mismatch},
        {"trailing bytes", test_err_trailing_bytes},
        {"truncated data", test_err_truncated},
        {"unknown or missing dtype", test_err_unknown_dtype},
        {"metadata values not strings", test_err_metadata_type},
        {"offsets ending before they begin", test_err_end_before_begin},
        {"bad shapes", test_err_bad_shape},
        {"bad data_offsets", test_err_bad_offsets},
        {"valid variants are accepted", test_accept_variants},
    };
    static const struct test_entry writer_errors[] = {
        {"missing directory", test_write_missing_dir},
        {"rename failure removes the temporary", test_write_rename_fails},
        {"duplicate names", test_write_duplicate_names},
        {"reserved name, too many dims, bad UTF-8, duplicate metadata", test_write_bad_input},
    };
    int status = 1;
    if (CU_initialize_registry() == CUE_SUCCESS && ADD_SUITE("st_roundtrip", roundtrip) &&
        ADD_SUITE("st_read_block", blocks) && ADD_SUITE("st_dtypes", dtypes) &&
        ADD_SUITE("st_validation", validation) &&
        ADD_SUITE("st_writer_errors", writer_errors)) {
        CU_basic_set_mode(CU_BRM_VERBOSE);
        CU_basic_run_tests();
        status = CU_get_number_of_failures() != 0 ? 1 : 0;
    } else {
        fprintf(stderr, "CUnit set-up failed: %s\n", CU_get_error_msg());
    }
    CU_cleanup_registry();
    vd_remove_tree_quiet(tmp_dir);
    return status;
}
