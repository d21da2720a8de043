/* The manifest of a sharded checkpoint, read side, and the frames it points at: parsing
 * and validating manifest.json (ckpt_manifest_*), reading and checking pieces
 * (ckpt_piece_reader_*), and the tools that need nothing else, ckpt_verify and
 * ckpt_inspect.
 *
 * The manifest is untrusted input: every size, offset and shape is checked (overflow
 * included) before use, and nothing is allocated beyond what the shard files or the
 * configured model justify: a frame is read only once its bytes are known to be in its
 * file, a piece holds at most 2^24 elements and no more raw bytes than a zstd frame of its
 * size can hold, and coverage is checked on the pieces' blocks and ranges, not per element.
 * tests/fuzz/fuzz_manifest.c fuzzes all of it through ckpt_verify and ckpt_latest. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "ckpt/ckpt_internal.h"

/* The oldest format version read (SHARD_VERSION is the newest). */
#define SHARD_VERSION_MIN 1
/* Elements per piece read at most (version 1 wrote pieces of up to 2^24). */
#define SHARD_PIECE_READ_MAX ((size_t)1 << 24)
/* Elements of one tensor at most: keeps a hostile manifest's sizes from overflowing. */
#define SHARD_NUMEL_MAX ((size_t)1 << 40)
/* Raw bytes a zstd frame can hold per byte of frame at most: a block holds at most
 * ZSTD_BLOCKSIZE_MAX bytes and costs at least 4 (a 3-byte header and one RLE byte). */
#define SHARD_MAX_RATIO ((size_t)ZSTD_BLOCKSIZE_MAX / 4)
/* Cells of the grid a tensor's distinct blocks cut it into, at most (verify). */
#define SHARD_GRID_MAX ((size_t)1 << 24)

const char *const ckpt_kind_names[SHARD_NKIND] = {"param", "m", "v"};

/* ---------------------------------------------------------------- errors off the main thread */

int ckpt_bg_fail(struct bg_error *e, int code, const char *file, int line, const char *fmt,
                 ...)
{
#pragma omp critical(shard_bg_error)
    if (e->code == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
        e->file = file;
        e->line = line;
        __atomic_store_n(&e->code, code, __ATOMIC_RELEASE);
    }
    return code;
}

/* ---------------------------------------------------------------- files */

int ckpt_read_at(int fd, void *buf, size_t nbytes, size_t offset, size_t *got)
{
    char *p = buf;
    *got = 0;
    while (*got < nbytes) {
        ssize_t const r = pread(fd, p + *got, min_sz(nbytes - *got, (size_t)1 << 30),
                                (off_t)(offset + *got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        *got += (size_t)r;
    }
    return 0;
}

/* ---------------------------------------------------------------- manifest, read side */

void ckpt_manifest_free(struct manifest *m)
{
    json_decref(m->root);
    free(m->tensors);
    free(m->by_name);
    free(m->pieces);
    free(m->files);
    memset(m, 0, sizeof *m);
}

static int cmp_tensor_name(const void *x, const void *y, void *base)
{
    const struct mtensor *t = base;
    return strcmp(t[*(const int *)x].name, t[*(const int *)y].name);
}

int ckpt_manifest_find(const struct manifest *m, const char *name)
{
    int lo = 0, hi = m->ntensors;
    while (lo < hi) {
        int const mid = lo + (hi - lo) / 2;
        int const c = strcmp(m->tensors[m->by_name[mid]].name, name);
        if (c == 0) return m->by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

static bool json_size(const json_t *o, const char *key, size_t *out)
{
    const json_t *v = json_object_get(o, key);
    if (!json_is_integer(v) || json_integer_value(v) < 0) return false;
    *out = (size_t)json_integer_value(v);
    return true;
}

/* An array of 1 or 2 (max_n) non-negative integers; returns its length or 0. */
static int json_dims(const json_t *o, const char *key, size_t out[2], int min_n, int max_n)
{
    const json_t *a = json_object_get(o, key);
    int const n = json_is_array(a) ? (int)json_array_size(a) : 0;
    if (n < min_n || n > max_n) return 0;
    out[1] = 1;
    for (int i = 0; i < n; i++) {
        const json_t *v = json_array_get(a, (size_t)i);
        if (!json_is_integer(v) || json_integer_value(v) < 0) return 0;
        out[i] = (size_t)json_integer_value(v);
    }
    return n;
}

/* Exactly 8 hexadecimal digits. */
static bool parse_checksum(const char *s, uint32_t *out)
{
    if (!s || strlen(s) != 8) return false;
    uint32_t v = 0;
    for (int i = 0; i < 8; i++) {
        char const c = s[i];
        int const d = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                             : -1;
        if (d < 0) return false;
        v = v << 4 | (uint32_t)d;
    }
    *out = v;
    return true;
}

static int parse_tensors(struct manifest *m)
{
    const json_t *arr = json_object_get(m->root, "tensors");
    RETURN_IF(!json_is_array(arr) || json_array_size(arr) > INT_MAX, VD_EFORMAT,
              "%s: \"tensors\" must be an array", m->path);
    m->ntensors = (int)json_array_size(arr);
    m->tensors = vd_calloc((size_t)m->ntensors + 1, sizeof *m->tensors);
    m->by_name = vd_calloc((size_t)m->ntensors + 1, sizeof *m->by_name);
    for (int i = 0; i < m->ntensors; i++) {
        const json_t *o = json_array_get(arr, (size_t)i);
        struct mtensor *t = &m->tensors[i];
        t->name = json_string_value(json_object_get(o, "name"));
        RETURN_IF(!t->name, VD_EFORMAT, "%s: tensor %d has no \"name\"", m->path, i);
        t->ndim = json_dims(o, "shape", t->shape, 1, 2);
        RETURN_IF(t->ndim == 0 || t->shape[0] == 0 || t->shape[1] == 0 ||
                      t->shape[0] > SHARD_NUMEL_MAX / t->shape[1],
                  VD_EFORMAT, "%s: tensor '%s' needs a \"shape\" of 1 or 2 positive sizes "
                  "(at most 2^40 elements)", m->path, t->name);
        const char *dtype = json_string_value(json_object_get(o, "dtype"));
        RETURN_IF((dtype || m->version >= 2) && (!dtype || strcmp(dtype, "F32") != 0),
                  VD_EFORMAT, "%s: tensor '%s' needs \"dtype\": \"F32\"", m->path, t->name);
        m->by_name[i] = i;
    }
    qsort_r(m->by_name, (size_t)m->ntensors, sizeof *m->by_name, cmp_tensor_name, m->tensors);
    for (int i = 1; i < m->ntensors; i++)
        RETURN_IF(strcmp(m->tensors[m->by_name[i - 1]].name, m->tensors[m->by_name[i]].name) == 0,
                  VD_EFORMAT, "%s: tensor '%s' is listed twice", m->path,
                  m->tensors[m->by_name[i]].name);
    return 0;
}

/* Whether f is a shard file name as the writer makes them, rank_<digits>.zst (so it names
 * a file inside the checkpoint directory, nothing else). */
static bool shard_file_name_ok(const char *f)
{
    size_t const n = strlen(f);
    if (n < 10 || n > 20 || strncmp(f, "rank_", 5) != 0 || strcmp(f + n - 4, ".zst") != 0)
        return false;
    for (size_t i = 5; i < n - 4; i++)
        if (f[i] < '0' || f[i] > '9') return false;
    return true;
}

static int parse_piece(struct manifest *m, size_t i, const json_t *o)
{
    struct mpiece *p = &m->pieces[i];
    const char *kind = json_string_value(json_object_get(o, "kind"));
    const char *name = json_string_value(json_object_get(o, "tensor"));
    RETURN_IF(!kind || !name, VD_EFORMAT, "%s: piece %zu needs \"kind\" and \"tensor\"",
              m->path, i);
    p->kind = -1;
    for (int k = 0; k < SHARD_NKIND; k++)
        if (strcmp(kind, ckpt_kind_names[k]) == 0) p->kind = k;
    RETURN_IF(p->kind < 0, VD_EFORMAT,
              "%s: piece %zu has kind \"%s\"; kinds are \"param\", \"m\" and \"v\"", m->path, i,
              kind);
    p->tensor = ckpt_manifest_find(m, name);
    RETURN_IF(p->tensor < 0, VD_EFORMAT, "%s: piece %zu is of tensor '%s', which is not listed",
              m->path, i, name);
    const struct mtensor *t = &m->tensors[p->tensor];
    size_t shape[2], range[2];
    int const nd = json_dims(o, "shape", shape, 1, 2);
    if (nd != t->ndim || shape[0] != t->shape[0] || shape[1] != t->shape[1]) {
        char got[64], want[64];
        format_shape(got, sizeof got, nd ? nd : 1, shape);
        format_shape(want, sizeof want, t->ndim, t->shape);
        RETURN_ERR(VD_EFORMAT, "%s: piece %zu of tensor '%s' has shape %s but the tensor list "
                   "says %s", m->path, i, name, nd ? got : "(none)", want);
    }
    RETURN_IF(json_dims(o, "block_start", p->start, 2, 2) != 2 ||
                  json_dims(o, "block_shape", p->bshape, 2, 2) != 2 ||
                  json_dims(o, "range", range, 2, 2) != 2,
              VD_EFORMAT, "%s: piece %zu of '%s' needs \"block_start\", \"block_shape\" and "
              "\"range\" as pairs of sizes", m->path, i, name);
    p->a = range[0];
    p->b = range[1];
    /* bshape <= shape, so bshape[0] * bshape[1] <= 2^40 */
    bool const block_ok = p->bshape[0] > 0 && p->bshape[1] > 0 &&
                          p->start[0] < t->shape[0] && p->bshape[0] <= t->shape[0] - p->start[0] &&
                          p->start[1] < t->shape[1] && p->bshape[1] <= t->shape[1] - p->start[1];
    RETURN_IF(!block_ok || p->a >= p->b || p->b > p->bshape[0] * p->bshape[1], VD_EFORMAT,
              "%s: piece %zu of '%s' (block at [%zu, %zu] of shape [%zu, %zu], elements [%zu, "
              "%zu)) lies outside the tensor", m->path, i, name, p->start[0], p->start[1],
              p->bshape[0], p->bshape[1], p->a, p->b);
    RETURN_IF(p->b - p->a > SHARD_PIECE_READ_MAX, VD_EFORMAT,
              "%s: piece %zu of '%s' holds %zu elements; pieces hold at most %zu", m->path, i,
              name, p->b - p->a, SHARD_PIECE_READ_MAX);
    p->file = json_string_value(json_object_get(o, "file"));
    RETURN_IF(!p->file || !shard_file_name_ok(p->file), VD_EFORMAT,
              "%s: piece %zu of '%s' needs a \"file\" named rank_<n>.zst", m->path, i, name);
    RETURN_IF(!json_size(o, "offset", &p->offset) || !json_size(o, "nbytes", &p->nbytes) ||
                  p->nbytes == 0 || p->nbytes > SIZE_MAX - p->offset,
              VD_EFORMAT, "%s: piece %zu of '%s' needs \"offset\" and a positive \"nbytes\"",
              m->path, i, name);
    p->raw_nbytes = (p->b - p->a) * sizeof(float);
    size_t raw = 0;
    bool const has_raw = json_object_get(o, "raw_nbytes") != NULL;
    RETURN_IF((has_raw || m->version >= 2) &&
                  (!json_size(o, "raw_nbytes", &raw) || raw != p->raw_nbytes),
              VD_EFORMAT, "%s: piece %zu of '%s' needs \"raw_nbytes\" = %zu (4 bytes for each "
              "of its %zu elements)", m->path, i, name, p->raw_nbytes, p->b - p->a);
    RETURN_IF(p->raw_nbytes / SHARD_MAX_RATIO > p->nbytes, VD_EFORMAT,
              "%s: piece %zu of '%s' claims %zu raw bytes from a frame of %zu bytes, more than "
              "zstd can encode in it", m->path, i, name, p->raw_nbytes, p->nbytes);
    const json_t *ck = json_object_get(o, "checksum");
    p->has_checksum = ck != NULL || m->version >= 2;
    RETURN_IF(p->has_checksum && !parse_checksum(json_string_value(ck), &p->checksum),
              VD_EFORMAT, "%s: piece %zu of '%s' needs a \"checksum\" of 8 hexadecimal digits",
              m->path, i, name);
    return 0;
}

int ckpt_manifest_open(struct manifest *m, const char *dir)
{
    memset(m, 0, sizeof *m);
    FORWARD_IF(vd_path_join(m->path, sizeof m->path, dir, SHARD_MANIFEST));
    snprintf(m->dir, sizeof m->dir, "%s", dir);
    json_error_t jerr;
    m->root = json_load_file(m->path, JSON_REJECT_DUPLICATES, &jerr);
    if (!m->root) {
        struct stat st;
        RETURN_IF(stat(m->path, &st) != 0, VD_EIO,
                  "%s: not a complete checkpoint (%s: %s)", dir, m->path, strerror(errno));
        RETURN_ERR(VD_EFORMAT, "%s: not valid JSON (line %d: %s)", m->path, jerr.line, jerr.text);
    }
    const char *format = json_string_value(json_object_get(m->root, "format"));
    RETURN_IF(!format || strcmp(format, SHARD_FORMAT) != 0, VD_EFORMAT,
              "%s: not a vdist sharded checkpoint (\"format\" is not \"%s\")", m->path,
              SHARD_FORMAT);
    const json_t *version = json_object_get(m->root, "version");
    json_int_t const v = json_is_integer(version) ? json_integer_value(version) : -1;
    RETURN_IF(v < SHARD_VERSION_MIN || v > SHARD_VERSION, VD_EFORMAT,
              "%s: checkpoint format version %lld; this vdist reads versions %d to %d", m->path,
              (long long)v, SHARD_VERSION_MIN, SHARD_VERSION);
    m->version = (int)v;
    size_t step, adam_step;
    RETURN_IF(!json_size(m->root, "step", &step) || !json_size(m->root, "adam_step", &adam_step) ||
                  step > LONG_MAX || adam_step > LONG_MAX,
              VD_EFORMAT, "%s: \"step\" and \"adam_step\" must be non-negative integers", m->path);
    m->step = (long)step;
    m->adam_step = (long)adam_step;
    const char *dtype = json_string_value(json_object_get(m->root, "dtype"));
    RETURN_IF(!dtype || strcmp(dtype, "f32") != 0, VD_EFORMAT,
              "%s: \"dtype\" must be \"f32\"", m->path);
    FORWARD_IF(parse_tensors(m));
    return 0;
}

static int cmp_str_ptr(const void *x, const void *y)
{
    return strcmp(*(const char *const *)x, *(const char *const *)y);
}

/* The distinct shard files, and each piece's index among them. */
static void index_files(struct manifest *m)
{
    m->files = vd_calloc(m->npieces + 1, sizeof *m->files);
    for (size_t i = 0; i < m->npieces; i++) m->files[i] = m->pieces[i].file;
    qsort(m->files, m->npieces, sizeof *m->files, cmp_str_ptr);
    m->nfiles = 0;
    for (size_t i = 0; i < m->npieces; i++)
        if (m->nfiles == 0 || strcmp(m->files[m->nfiles - 1], m->files[i]) != 0)
            m->files[m->nfiles++] = m->files[i];
    for (size_t i = 0; i < m->npieces; i++) {
        const char **f = bsearch(&m->pieces[i].file, m->files, m->nfiles, sizeof *m->files,
                                 cmp_str_ptr);
        VD_CHECK(f != NULL, "a piece's file is among the files");
        m->pieces[i].file_idx = (size_t)(f - m->files);
    }
}

int ckpt_manifest_read_pieces(struct manifest *m)
{
    size_t count;
    const json_t *arr = json_object_get(m->root, "pieces");
    RETURN_IF(!json_is_array(arr), VD_EFORMAT, "%s: \"pieces\" must be an array", m->path);
    m->npieces = json_array_size(arr);
    RETURN_IF(!json_size(m->root, "piece_count", &count) || count != m->npieces, VD_EFORMAT,
              "%s: \"piece_count\" does not match the %zu pieces listed (manifest cut short?)",
              m->path, m->npieces);
    m->pieces = vd_calloc(m->npieces + 1, sizeof *m->pieces);
    for (size_t i = 0; i < m->npieces; i++) FORWARD_IF(parse_piece(m, i, json_array_get(arr, i)));
    index_files(m);
    return 0;
}

int ckpt_manifest_read(struct manifest *m, const char *dir)
{
    FORWARD_IF(ckpt_manifest_open(m, dir));
    FORWARD_IF(ckpt_manifest_read_pieces(m));
    return 0;
}

/* Piece indices sorted by (file, offset). */
static int cmp_piece_in_file(const void *x, const void *y, void *base)
{
    const struct mpiece *pieces = base;
    const struct mpiece *a = &pieces[*(const size_t *)x], *b = &pieces[*(const size_t *)y];
    if (a->file_idx != b->file_idx) return (a->file_idx > b->file_idx) - (a->file_idx < b->file_idx);
    return (a->offset > b->offset) - (a->offset < b->offset);
}

int ckpt_manifest_check_files(const struct manifest *m)
{
    size_t *order = vd_calloc(m->npieces + 1, sizeof *order);
    for (size_t i = 0; i < m->npieces; i++) order[i] = i;
    qsort_r(order, m->npieces, sizeof *order, cmp_piece_in_file, m->pieces);
    int rc = 0;
    for (size_t j = 0; rc == 0 && j < m->npieces;) {
        const struct mpiece *first = &m->pieces[order[j]];
        char path[PATH_MAX];
        struct stat st;
        rc = vd_path_join(path, sizeof path, m->dir, first->file);
        if (rc == 0 && stat(path, &st) != 0)
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "%s: %s", path, strerror(errno));
        size_t end = 0;
        for (; rc == 0 && j < m->npieces && m->pieces[order[j]].file_idx == first->file_idx;
             j++) {
            const struct mpiece *p = &m->pieces[order[j]];
            if (p->offset != end)
                rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                                "%s: piece %zu (%s of '%s') starts at byte %zu, but the pieces "
                                "before it end at %zu: pieces must follow each other",
                                path, order[j], ckpt_kind_names[p->kind], m->tensors[p->tensor].name,
                                p->offset, end);
            end = p->offset + p->nbytes;
        }
        if (rc == 0 && (size_t)st.st_size != end)
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "%s: %zu bytes, but its pieces in the manifest add up to %zu", path,
                            (size_t)st.st_size, end);
    }
    free(order);
    FORWARD_IF(rc);
    return 0;
}

/* Piece indices sorted by (tensor, kind, block, range start): coverage and whole tensors. */
static int cmp_piece_cover(const void *x, const void *y, void *base)
{
    const struct mpiece *pieces = base;
    const struct mpiece *a = &pieces[*(const size_t *)x], *b = &pieces[*(const size_t *)y];
    size_t const ka[7] = {(size_t)a->tensor, (size_t)a->kind, a->start[0], a->start[1],
                          a->bshape[0], a->bshape[1], a->a};
    size_t const kb[7] = {(size_t)b->tensor, (size_t)b->kind, b->start[0], b->start[1],
                          b->bshape[0], b->bshape[1], b->a};
    for (int i = 0; i < 7; i++)
        if (ka[i] != kb[i]) return (ka[i] > kb[i]) - (ka[i] < kb[i]);
    return 0;
}

static bool same_block(const struct mpiece *a, const struct mpiece *b)
{
    return a->start[0] == b->start[0] && a->start[1] == b->start[1] &&
           a->bshape[0] == b->bshape[0] && a->bshape[1] == b->bshape[1];
}

static int cmp_sz(const void *x, const void *y)
{
    size_t const a = *(const size_t *)x, b = *(const size_t *)y;
    return (a > b) - (a < b);
}

/* Sorts v and drops repeats; returns the new length. */
static size_t unique_sz(size_t *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_sz);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (k == 0 || v[k - 1] != v[i]) v[k++] = v[i];
    return k;
}

/* Index of x in the sorted v (present). */
static size_t index_sz(const size_t *v, size_t n, size_t x)
{
    const size_t *f = bsearch(&x, v, n, sizeof *v, cmp_sz);
    VD_CHECK(f != NULL, "a block's edge is among the edges");
    return (size_t)(f - v);
}

/* Coverage of one kind of one tensor by pieces idx[0..n) (sorted by cmp_piece_cover): the
 * ranges of each block follow each other from its first element to its last, and the
 * distinct blocks tile the tensor, checked on the grid their edges cut it into. Counts
 * elements in no piece and in more than one (the latter from the first overlap found). */
static int tensor_cover(const struct manifest *m, const struct mtensor *t, const size_t *idx,
                        size_t n, size_t *missing, size_t *twice)
{
    *missing = *twice = 0;
    size_t nblocks = 0;
    size_t *rows = vd_calloc(2 * n + 2, sizeof *rows), *cols = vd_calloc(2 * n + 2, sizeof *cols);
    size_t *blocks = vd_calloc(n + 1, sizeof *blocks); /* first piece of each block */
    for (size_t j = 0; j < n;) {
        const struct mpiece *p0 = &m->pieces[idx[j]];
        size_t const area = p0->bshape[0] * p0->bshape[1];
        size_t end = 0;
        blocks[nblocks++] = idx[j];
        for (; j < n && same_block(&m->pieces[idx[j]], p0); j++) {
            const struct mpiece *p = &m->pieces[idx[j]];
            if (p->a > end) *missing += p->a - end;
            else *twice += min_sz(p->b, end) - p->a;
            end = max_sz(end, p->b);
        }
        *missing += area - end;
    }
    size_t nr = 0, nc = 0;
    rows[nr++] = 0;
    rows[nr++] = t->shape[0];
    cols[nc++] = 0;
    cols[nc++] = t->shape[1];
    for (size_t b = 0; b < nblocks; b++) {
        const struct mpiece *p = &m->pieces[blocks[b]];
        rows[nr++] = p->start[0];
        rows[nr++] = p->start[0] + p->bshape[0];
        cols[nc++] = p->start[1];
        cols[nc++] = p->start[1] + p->bshape[1];
    }
    nr = unique_sz(rows, nr) - 1; /* cells, not edges, from here */
    nc = unique_sz(cols, nc) - 1;
    int rc = 0;
    if (nr > SHARD_GRID_MAX / nc)
        rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                        "%s: tensor '%s' is cut into blocks along %zu row and %zu column edges; "
                        "at most %zu cells are supported", m->path, t->name, nr + 1, nc + 1,
                        SHARD_GRID_MAX);
    unsigned char *grid = rc == 0 ? vd_calloc(nr * nc, 1) : NULL;
    bool overlap = false;
    for (size_t b = 0; rc == 0 && !overlap && b < nblocks; b++) {
        const struct mpiece *p = &m->pieces[blocks[b]];
        size_t const r0 = index_sz(rows, nr + 1, p->start[0]);
        size_t const r1 = index_sz(rows, nr + 1, p->start[0] + p->bshape[0]);
        size_t const c0 = index_sz(cols, nc + 1, p->start[1]);
        size_t const c1 = index_sz(cols, nc + 1, p->start[1] + p->bshape[1]);
        for (size_t r = r0; r < r1; r++)
            for (size_t c = c0; c < c1; c++) {
                overlap |= grid[r * nc + c] != 0;
                if (grid[r * nc + c]) *twice += (rows[r + 1] - rows[r]) * (cols[c + 1] - cols[c]);
                grid[r * nc + c] = 1;
            }
    }
    for (size_t r = 0; rc == 0 && !overlap && r < nr; r++)
        for (size_t c = 0; c < nc; c++)
            if (!grid[r * nc + c]) *missing += (rows[r + 1] - rows[r]) * (cols[c + 1] - cols[c]);
    free(grid);
    free(rows);
    free(cols);
    free(blocks);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_manifest_check_coverage(const struct manifest *m, size_t **order_out)
{
    size_t *order = vd_calloc(m->npieces + 1, sizeof *order);
    for (size_t i = 0; i < m->npieces; i++) order[i] = i;
    qsort_r(order, m->npieces, sizeof *order, cmp_piece_cover, m->pieces);
    int rc = 0;
    size_t next = 0;
    for (int j = 0; rc == 0 && j < m->ntensors; j++) {
        const struct mtensor *t = &m->tensors[j];
        for (int k = 0; rc == 0 && k < SHARD_NKIND; k++) {
            size_t const first = next;
            while (next < m->npieces && m->pieces[order[next]].tensor == j &&
                   m->pieces[order[next]].kind == k)
                next++;
            size_t missing = 0, twice = 0;
            rc = tensor_cover(m, t, order + first, next - first, &missing, &twice);
            if (rc == 0 && (missing || twice))
                rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                                "%s: %s of tensor '%s': %zu of its %zu elements are in no piece "
                                "and %zu in more than one", m->path, ckpt_kind_names[k], t->name,
                                missing, t->shape[0] * t->shape[1], twice);
        }
    }
    if (rc == 0 && order_out) *order_out = order;
    else free(order);
    FORWARD_IF(rc);
    return 0;
}

/* ---------------------------------------------------------------- reading pieces */

void ckpt_piece_reader_init(struct piece_reader *r, const struct manifest *m, struct bg_error *err)
{
    *r = (struct piece_reader){.m = m, .err = err, .fd = -1, .dctx = ZSTD_createDCtx()};
    VD_CHECK(r->dctx != NULL, "out of memory creating a zstd context");
}

void ckpt_piece_reader_free(struct piece_reader *r)
{
    if (r->fd >= 0) close(r->fd);
    free(r->src);
    free(r->raw);
    ZSTD_freeDCtx(r->dctx);
    r->fd = -1;
    r->src = NULL;
    r->raw = NULL;
    r->dctx = NULL;
}

int ckpt_piece_reader_get(struct piece_reader *r, size_t i, float *into, const float **out)
{
    const struct mpiece *p = &r->m->pieces[i];
    const char *name = r->m->tensors[p->tensor].name;
    const char *kind = ckpt_kind_names[p->kind];
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/%s", r->m->dir, p->file);
    char why[256];
    if (r->fd < 0 || r->file != p->file_idx) {
        if (r->fd >= 0) close(r->fd);
        r->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (r->fd < 0)
            return BG_FAIL(r->err, VD_EIO, "cannot open checkpoint shard %s (%s of '%s'): %s",
                           path, kind, name, strerror_r(errno, why, sizeof why));
        struct stat st;
        if (fstat(r->fd, &st) != 0) {
            close(r->fd);
            r->fd = -1;
            return BG_FAIL(r->err, VD_EIO, "cannot read checkpoint shard %s: %s", path,
                           strerror_r(errno, why, sizeof why));
        }
        r->file = p->file_idx;
        r->file_nbytes = (size_t)st.st_size;
    }
    if (p->offset > r->file_nbytes || p->nbytes > r->file_nbytes - p->offset)
        return BG_FAIL(r->err, VD_EFORMAT,
                       "%s: file cut short: piece %zu (%s of '%s') needs bytes [%zu, %zu) of "
                       "its %zu", path, i, kind, name, p->offset, p->offset + p->nbytes,
                       r->file_nbytes);
    if (p->nbytes > r->src_cap) {
        free(r->src);
        r->src_cap = p->nbytes;
        r->src = vd_alloc(r->src_cap);
    }
    size_t got = 0;
    if (ckpt_read_at(r->fd, r->src, p->nbytes, p->offset, &got) != 0)
        return BG_FAIL(r->err, VD_EIO, "cannot read checkpoint shard %s: %s", path,
                       strerror_r(errno, why, sizeof why));
    if (got != p->nbytes)
        return BG_FAIL(r->err, VD_EFORMAT,
                       "%s: file cut short: piece %zu (%s of '%s') needs bytes [%zu, %zu)", path,
                       i, kind, name, p->offset, p->offset + p->nbytes);
    size_t const frame = ZSTD_findFrameCompressedSize(r->src, p->nbytes);
    unsigned long long const content = ZSTD_getFrameContentSize(r->src, p->nbytes);
    const char *bad = NULL;
    char detail[160];
    if (ZSTD_isError(frame)) {
        bad = ZSTD_getErrorName(frame);
    } else if (frame != p->nbytes) {
        snprintf(detail, sizeof detail, "its frame is %zu bytes, the manifest says %zu", frame,
                 p->nbytes);
        bad = detail;
    } else if (content != p->raw_nbytes) {
        snprintf(detail, sizeof detail, "its frame holds %lld bytes, the manifest says %zu",
                 content > LLONG_MAX ? -1LL : (long long)content, p->raw_nbytes);
        bad = detail;
    } else if (p->nbytes < 9 || !(r->src[4] & 0x04)) {
        /* RFC 8878: the frame header descriptor follows the 4-byte magic number; bit 2 is
         * Content_Checksum_Flag, and the checksum is then the frame's last 4 bytes */
        bad = "its frame has no content checksum";
    } else if (p->has_checksum && le32(r->src + p->nbytes - 4) != p->checksum) {
        snprintf(detail, sizeof detail, "its checksum is %08x, the manifest records %08x",
                 le32(r->src + p->nbytes - 4), p->checksum);
        bad = detail;
    }
    float *dst = into;
    if (!bad && !dst) {
        if (p->raw_nbytes > r->raw_cap) {
            free(r->raw);
            r->raw_cap = p->raw_nbytes;
            r->raw = vd_alloc(r->raw_cap);
        }
        dst = r->raw;
    }
    size_t const n = bad ? 0 : ZSTD_decompressDCtx(r->dctx, dst, p->raw_nbytes, r->src, p->nbytes);
    if (!bad && ZSTD_isError(n)) bad = ZSTD_getErrorName(n);
    else if (!bad && n != p->raw_nbytes) bad = "the frame decompresses to another size";
    if (bad)
        return BG_FAIL(r->err, VD_EFORMAT,
                       "%s: piece %zu (%s of '%s', elements [%zu, %zu) of its block, bytes "
                       "[%zu, %zu)) is corrupt: %s", path, i, kind, name, p->a, p->b, p->offset,
                       p->offset + p->nbytes, bad);
    *out = dst;
    return 0;
}

int ckpt_threads_for(size_t n)
{
    int const t = omp_get_max_threads();
    return (int)max_sz(1, min_sz((size_t)(t > 0 ? t : 1), n));
}

/* ---------------------------------------------------------------- verify, inspect */

/* Decompresses every piece on OpenMP threads, in file order, checking each frame. */
static int verify_pieces(const struct manifest *m)
{
    size_t *order = vd_calloc(m->npieces + 1, sizeof *order);
    for (size_t i = 0; i < m->npieces; i++) order[i] = i;
    qsort_r(order, m->npieces, sizeof *order, cmp_piece_in_file, m->pieces);
    struct bg_error err = {0};
#pragma omp parallel num_threads(ckpt_threads_for(m->npieces))
    {
        struct piece_reader r;
        ckpt_piece_reader_init(&r, m, &err);
#pragma omp for schedule(dynamic, 1)
        for (size_t j = 0; j < m->npieces; j++) {
            const float *vals;
            if (!bg_failed(&err)) ckpt_piece_reader_get(&r, order[j], NULL, &vals);
        }
        ckpt_piece_reader_free(&r);
    }
    free(order);
    FORWARD_IF(bg_raise(&err));
    return 0;
}

int ckpt_verify(const char *dir, FILE *out)
{
    struct manifest m;
    int rc = ckpt_manifest_read(&m, dir);
    if (rc == 0) rc = ckpt_manifest_check_coverage(&m, NULL);
    if (rc == 0) rc = ckpt_manifest_check_files(&m);
    if (rc == 0) rc = verify_pieces(&m);
    double raw = 0.0, packed = 0.0;
    for (size_t i = 0; rc == 0 && i < m.npieces; i++) {
        raw += (double)m.pieces[i].raw_nbytes;
        packed += (double)m.pieces[i].nbytes;
    }
    if (rc == 0)
        fprintf(out, "%s: %d tensors, %zu pieces, %.2f MB raw, %.2f MB compressed (%.2fx), OK\n",
                dir, m.ntensors, m.npieces, raw / 1e6, packed / 1e6,
                packed > 0.0 ? raw / packed : 0.0);
    ckpt_manifest_free(&m);
    FORWARD_IF(rc);
    return 0;
}

/* A manifest value as one line of compact JSON, or `none`. */
static void print_json(FILE *out, const char *label, const json_t *v, const char *none)
{
    char *text = v && !json_is_null(v) ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    fprintf(out, "  %-12s %s\n", label, text ? text : none);
    free(text);
}

int ckpt_inspect(const char *dir, FILE *out)
{
    struct manifest m;
    int const rc = ckpt_manifest_read(&m, dir);
    if (rc != 0) {
        ckpt_manifest_free(&m);
        FORWARD_IF(rc);
    }
    double raw[SHARD_NKIND] = {0}, packed[SHARD_NKIND] = {0};
    size_t pieces[SHARD_NKIND] = {0}, params = 0;
    for (size_t i = 0; i < m.npieces; i++) {
        const struct mpiece *p = &m.pieces[i];
        raw[p->kind] += (double)p->raw_nbytes;
        packed[p->kind] += (double)p->nbytes;
        pieces[p->kind]++;
    }
    for (int j = 0; j < m.ntensors; j++) params += m.tensors[j].shape[0] * m.tensors[j].shape[1];
    fprintf(out, "checkpoint %s\n", dir);
    fprintf(out, "  %-12s %s version %d\n", "format", SHARD_FORMAT, m.version);
    fprintf(out, "  %-12s %ld\n", "step", m.step);
    fprintf(out, "  %-12s %ld\n", "adam_step", m.adam_step);
    print_json(out, "seed", json_object_get(m.root, "seed"), "(none)");
    print_json(out, "layout", json_object_get(m.root, "layout"), "(none)");
    /* the model's keys of the run's configuration, when it was recorded as JSON */
    const json_t *config = json_object_get(m.root, "config");
    json_t *model = json_object();
    const char *key;
    json_t *value;
    if (json_is_object(config))
        json_object_foreach((json_t *)config, key, value)
            if (strncmp(key, "model.", 6) == 0) json_object_set(model, key, value);
    print_json(out, "model", json_object_size(model) ? model : NULL, "(not recorded)");
    json_decref(model);
    print_json(out, "train_state", json_object_get(m.root, "train_state"), "(none)");
    fprintf(out, "  %-12s %d (%zu parameters)\n", "tensors", m.ntensors, params);
    fprintf(out, "  %-6s %8s %12s %12s %7s\n", "kind", "pieces", "raw MB", "stored MB", "ratio");
    double raw_all = 0.0, packed_all = 0.0;
    for (int k = 0; k < SHARD_NKIND; k++) {
        fprintf(out, "  %-6s %8zu %12.2f %12.2f %6.2fx\n", ckpt_kind_names[k], pieces[k], raw[k] / 1e6,
                packed[k] / 1e6, packed[k] > 0.0 ? raw[k] / packed[k] : 0.0);
        raw_all += raw[k];
        packed_all += packed[k];
    }
    fprintf(out, "  %-6s %8zu %12.2f %12.2f %6.2fx\n", "total", m.npieces, raw_all / 1e6,
            packed_all / 1e6, packed_all > 0.0 ? raw_all / packed_all : 0.0);
    fprintf(out, "  %-12s %zu files, %zu pieces\n", "shards", m.nfiles, m.npieces);
    ckpt_manifest_free(&m);
    return 0;
}
