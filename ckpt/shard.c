/* Sharded checkpoints: every rank compresses the pieces of the model it is the one writer
 * of into its own zstd file, rank 0 records them all in a manifest by tensor name and
 * global coordinates, and a checkpoint loads into any layout by copying each piece's
 * overlap with the loading rank's blocks and moment shards.
 *
 * On disk, ROOT/step_NNNNNNNN/ holds
 *   rank_RRRRR.zst  independent zstd frames (content checksum on), back to back, one per
 *                   piece: raw little-endian f32 values of one contiguous element range
 *                   [a, b) of one tensor block's row-major order, for one kind (param, m or v);
 *   manifest.json   written last: format, version, step, adam_step, seed, config, layout,
 *                   train_state, the tensors with global shapes and dtype, and every piece
 *                   (kind, tensor, global shape, block start and shape, range, file, byte
 *                   offset, compressed and raw sizes, and the frame's checksum);
 * and ROOT/latest holds the name of the checkpoint committed last.
 * A save writes into ROOT/step_NNNNNNNN.tmp.<pid>.<n>, renames it once the manifest is
 * durable, then replaces ROOT/latest (temporary file, rename, sync of ROOT): the rename of
 * latest is the commit. Names of the form step_N.<anything> are leftovers that ckpt_prune
 * and ckpt_cleanup remove.
 * A save has two halves: start (collective: plan this rank's pieces, snapshot their values,
 * create the temporary directory, agree) hands the compressing and writing to a thread
 * that uses no MPI; finish (collective: join, agree, gather the piece lists, manifest,
 * rename, latest) completes it. Every MPI call stays on the calling thread; the writer, like
 * the OpenMP workers, makes none.
 *
 * Speed: the writer compresses pieces of at most 16 MB on OpenMP threads, one zstd context
 * each; an ordered section gives each frame its offset in plan order once its size is
 * known, and the threads write their frames there in parallel while the others compress,
 * starting writeback as they go, so the final fsync has little left to do. The snapshot of
 * an asynchronous save is a parallel memcpy of contiguous ranges into a buffer kept from
 * the previous save (no page faults once warm). A load decompresses, in
 * parallel, only the pieces that meet this rank's blocks, straight into the staging buffer
 * when a piece is one run of it (the same block in both layouts) and row by row otherwise,
 * and counts coverage with one bit an element.
 *
 * Who writes what, so every element is written once and the work is spread:
 *   parameters: among the replicas of a block (the dp x cp group of a dense tensor, the
 *     edp group of an expert) the replica whose group rank is the tensor's table index
 *     modulo the group size; of a tensor replicated over its shard group (norms, routers)
 *     only shard-group rank 0's replicas write;
 *   moments under the distributed optimizer: each rank its own shards (their overlap with
 *     each tensor), again only on shard-group rank 0 for replicated tensors; without it,
 *     the parameters' rule.
 *
 * The manifest is untrusted input: every size, offset and shape is checked (overflow
 * included) before use, and nothing is allocated beyond what the shard files or the
 * configured model justify: a frame is read only once its bytes are known to be in its
 * file, a piece holds at most 2^24 elements and no more raw bytes than a zstd frame of its
 * size can hold, and coverage is checked on the pieces' blocks and ranges, not per element. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "ckpt/ckpt.h"
#include "dist/dist.h"

#define SHARD_FORMAT "vdist-sharded-checkpoint"
/* Version 2 added each piece's raw_nbytes and checksum, each tensor's dtype and the
 * training state; version 1 checkpoints still load (without the manifest's checksums). */
#define SHARD_VERSION 2
#define SHARD_VERSION_MIN 1
#define SHARD_MANIFEST "manifest.json"
#define SHARD_LATEST "latest"
/* Elements per piece written (16 MB raw): the unit of parallel compression and loading,
 * and of the buffers each thread holds. */
#define SHARD_PIECE_MAX ((size_t)1 << 22)
/* Elements per piece read at most (version 1 wrote pieces of up to 2^24). */
#define SHARD_PIECE_READ_MAX ((size_t)1 << 24)
/* Elements of one tensor at most: keeps a hostile manifest's sizes from overflowing. */
#define SHARD_NUMEL_MAX ((size_t)1 << 40)
/* Raw bytes a zstd frame can hold per byte of frame at most: a block holds at most
 * ZSTD_BLOCKSIZE_MAX bytes and costs at least 4 (a 3-byte header and one RLE byte). */
#define SHARD_MAX_RATIO ((size_t)ZSTD_BLOCKSIZE_MAX / 4)
/* Cells of the grid a tensor's distinct blocks cut it into, at most (verify). */
#define SHARD_GRID_MAX ((size_t)1 << 24)
/* Elements one thread copies at a time (snapshots, commits). */
#define SHARD_COPY_CHUNK ((size_t)1 << 18)

enum shard_kind { SHARD_PARAM = 0, SHARD_M = 1, SHARD_V = 2, SHARD_NKIND = 3 };
static const char *const kind_names[SHARD_NKIND] = {"param", "m", "v"};

static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }
static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

static void format_shape(char *out, size_t cap, int ndim, const size_t *shape)
{
    if (ndim == 1) snprintf(out, cap, "[%zu]", shape[0]);
    else snprintf(out, cap, "[%zu, %zu]", shape[0], shape[1]);
}

/* ---------------------------------------------------------------- errors off the main thread */

/* The first error of work spread over threads (the writer thread, OpenMP workers). It is
 * kept here, not recorded with vd_err_set, whose message is one global another thread may
 * set meanwhile; the calling thread raises it (bg_raise) once the work is joined. */
struct bg_error {
    int code; /* 0: none; read without the lock to stop early */
    const char *file;
    int line;
    char msg[2048];
};

__attribute__((format(printf, 5, 6))) static int bg_fail(struct bg_error *e, int code,
                                                         const char *file, int line,
                                                         const char *fmt, ...)
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
#define BG_FAIL(e, code, ...) bg_fail((e), (code), __FILE__, __LINE__, __VA_ARGS__)

static bool bg_failed(const struct bg_error *e)
{
    return __atomic_load_n(&e->code, __ATOMIC_ACQUIRE) != 0;
}

/* The recorded error as vd_err's, or 0. Calling thread only. */
static int bg_raise(const struct bg_error *e)
{
    return e->code ? vd_err_set(e->code, e->file, e->line, "%s", e->msg) : 0;
}

/* ---------------------------------------------------------------- files */

/* Writes all nbytes at offset; 0 or -1 with errno. */
static int write_at(int fd, const void *buf, size_t nbytes, size_t offset)
{
    const char *p = buf;
    while (nbytes > 0) {
        ssize_t const w = pwrite(fd, p, min_sz(nbytes, (size_t)1 << 30), (off_t)offset);
        if (w < 0 && errno == EINTR) continue;
        if (w == 0) errno = EIO;
        if (w <= 0) return -1;
        p += w;
        offset += (size_t)w;
        nbytes -= (size_t)w;
    }
    return 0;
}

/* Reads exactly nbytes at offset; -1 with errno, or 0 with *got < nbytes at the file's end. */
static int read_at(int fd, void *buf, size_t nbytes, size_t offset, size_t *got)
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

/* rm -rf; 0 or VD_EIO. */
static int remove_tree(const char *path)
{
    RETURN_IF(vd_remove_tree_quiet(path) != 0, VD_EIO, "cannot remove %s: %s", path, strerror(errno));
    return 0;
}

/* Writes text to dir/name durably and atomically (vd_replace_fd). */
static int write_file_atomic(const char *dir, const char *name, const char *text)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    FORWARD_IF(vd_path_join(path, sizeof path, dir, name));
    FORWARD_IF(vd_tmp_name(tmp, sizeof tmp, path));
    int const fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0 || vd_write_all(fd, tmp, text, strlen(text)) != 0) {
        int const err = errno;
        if (fd >= 0) close(fd);
        unlink(tmp);
        RETURN_ERR(VD_EIO, "cannot write %s: %s", tmp, strerror(err));
    }
    enum vd_replace_step failed;
    FORWARD_IF(vd_replace_fd(fd, tmp, path, &failed));
    return 0;
}

/* "step_<digits>" (exact: a checkpoint's final name) or "step_<digits>.<anything>" (a save
 * or removal cut short). */
static bool parse_step_name(const char *name, long *step, bool *exact)
{
    if (strncmp(name, "step_", 5) != 0) return false;
    const char *p = name + 5;
    if (*p < '0' || *p > '9') return false;
    errno = 0;
    char *end;
    long const s = strtol(p, &end, 10);
    if (errno != 0 || (*end != '\0' && *end != '.')) return false;
    *step = s;
    *exact = *end == '\0';
    return true;
}

/* ---------------------------------------------------------------- manifest, read side */

struct mtensor {
    const char *name; /* owned by the manifest's JSON */
    int ndim;
    size_t shape[2]; /* shape[1] = 1 when ndim = 1 */
};

struct mpiece {
    int kind;
    int tensor;            /* index in the manifest's tensors */
    size_t start[2];       /* the block's global coordinates */
    size_t bshape[2];      /* the block's shape */
    size_t a, b;           /* element range in the block's row-major order */
    const char *file;      /* shard file name inside the checkpoint directory */
    size_t file_idx;       /* in the manifest's files */
    size_t offset, nbytes; /* the compressed frame */
    size_t raw_nbytes;     /* (b - a) * 4 */
    bool has_checksum;     /* always from version 2 */
    uint32_t checksum;     /* the frame's last 4 bytes, little-endian */
};

struct manifest {
    json_t *root;
    char dir[PATH_MAX];
    char path[PATH_MAX];
    int version;
    long step, adam_step;
    int ntensors;
    struct mtensor *tensors;
    int *by_name; /* tensor indices sorted by name */
    size_t npieces;
    struct mpiece *pieces;
    size_t nfiles;
    const char **files; /* the distinct shard file names, sorted */
};

static void manifest_free(struct manifest *m)
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

/* Index of the manifest tensor with this name, or -1. */
static int manifest_find(const struct manifest *m, const char *name)
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
        if (strcmp(kind, kind_names[k]) == 0) p->kind = k;
    RETURN_IF(p->kind < 0, VD_EFORMAT,
              "%s: piece %zu has kind \"%s\"; kinds are \"param\", \"m\" and \"v\"", m->path, i,
              kind);
    p->tensor = manifest_find(m, name);
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

/* Reads dir's manifest and validates all but the pieces (manifest_read_pieces). */
static int manifest_open(struct manifest *m, const char *dir)
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

/* Validates every piece against the tensor list. */
static int manifest_read_pieces(struct manifest *m)
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

/* Reads and validates dir's manifest: every field the loaders use is checked here. */
static int manifest_read(struct manifest *m, const char *dir)
{
    FORWARD_IF(manifest_open(m, dir));
    FORWARD_IF(manifest_read_pieces(m));
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

/* Every shard file the manifest names exists and is exactly its pieces, back to back. */
static int manifest_check_files(const struct manifest *m)
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
                                path, order[j], kind_names[p->kind], m->tensors[p->tensor].name,
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

/* Each element of each tensor, per kind, in exactly one piece. *order_out (optional): the
 * piece indices sorted by cmp_piece_cover, the caller's to free. */
static int manifest_check_coverage(const struct manifest *m, size_t **order_out)
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
                                "and %zu in more than one", m->path, kind_names[k], t->name,
                                missing, t->shape[0] * t->shape[1], twice);
        }
    }
    if (rc == 0 && order_out) *order_out = order;
    else free(order);
    FORWARD_IF(rc);
    return 0;
}

/* ---------------------------------------------------------------- reading pieces */

/* Reads and decompresses pieces for one thread, keeping the last shard file open. Errors go
 * to err (it may be shared by threads). */
struct piece_reader {
    const struct manifest *m;
    struct bg_error *err;
    int fd;
    size_t file;        /* index in m->files of the open file */
    size_t file_nbytes; /* its size when opened */
    unsigned char *src;
    size_t src_cap;
    float *raw;
    size_t raw_cap;
    ZSTD_DCtx *dctx;
};

static void reader_init(struct piece_reader *r, const struct manifest *m, struct bg_error *err)
{
    *r = (struct piece_reader){.m = m, .err = err, .fd = -1, .dctx = ZSTD_createDCtx()};
    VD_CHECK(r->dctx != NULL, "out of memory creating a zstd context");
}

static void reader_free(struct piece_reader *r)
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

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Piece i's values, decompressed into `into` (raw_nbytes bytes) or, when it is NULL, into
 * the reader's buffer; *out points at them (valid until the next call). The frame is read
 * only once the file is known to hold it, and checked before anything is sized by it: its
 * length, the content size in its header, its checksum against the manifest's; zstd then
 * checks the content against the checksum. An error names the file and the piece. */
static int reader_get(struct piece_reader *r, size_t i, float *into, const float **out)
{
    const struct mpiece *p = &r->m->pieces[i];
    const char *name = r->m->tensors[p->tensor].name;
    const char *kind = kind_names[p->kind];
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
    if (read_at(r->fd, r->src, p->nbytes, p->offset, &got) != 0)
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

/* Threads for n independent pieces of work: OpenMP's, at most n, at least 1. */
static int threads_for(size_t n)
{
    int const t = omp_get_max_threads();
    return (int)max_sz(1, min_sz((size_t)(t > 0 ? t : 1), n));
}

/* ---------------------------------------------------------------- who holds and writes what */

/* What this rank needs (load) of one kind of tensor t: block elements [ea, eb), element
 * ea at `at` in the kind's buffer. */
struct need {
    bool any;
    size_t ea, eb, at;
};

static struct need need_of(const struct par_model *pm, const struct model_tensor *t, int kind)
{
    struct need n = {.any = true, .ea = 0, .eb = t->numel, .at = t->offset};
    if (kind != SHARD_PARAM) n.any = par_moment_span(pm, t, &n.ea, &n.eb, &n.at);
    return n;
}


/* ---------------------------------------------------------------- save */

/* A tensor's global shape as the manifest writes it: [rows] or [rows, cols]. */
static json_t *shape_json(const struct model_tensor *t)
{
    return t->ndim == 1 ? json_pack("[I]", (json_int_t)t->shape[0])
                        : json_pack("[II]", (json_int_t)t->shape[0], (json_int_t)t->shape[1]);
}

/* One piece to write: block elements [a, b) of one kind of tensor `tensor` (an index in
 * the save's copy of the table), values at src; where it landed in the shard file once
 * written, and its frame's checksum. */
struct plan_piece {
    int kind;
    int tensor;
    size_t a, b;
    const float *src;
    size_t offset, nbytes;
    uint32_t checksum;
};

/* A save between start and finish. start fills everything; while the writer thread runs it
 * reads the rest and writes only the pieces' offset, nbytes and checksum and err, which the
 * calling thread reads after joining it. */
struct ckpt_pending {
    char root[PATH_MAX], tmp[PATH_MAX], final[PATH_MAX], aside[PATH_MAX], undo[PATH_MAX];
    char name[32];        /* step_NNNNNNNN */
    char shard[PATH_MAX]; /* tmp/file */
    char file[32];        /* rank_RRRRR.zst */
    struct model_config cfg;
    struct ckpt_meta meta; /* its strings are config, layout and state, copies owned here */
    char *config, *layout, *state;
    struct model_tensor *tensors; /* pm's table, copied: pm need not outlive the save */
    int ntensors;
    struct plan_piece *pieces;
    size_t npieces;
    float *snapshot; /* the pieces' values; NULL when they point into pm (ckpt_save) */
    size_t snapshot_cap;
    int nthreads;      /* compressing threads */
    ZSTD_CCtx **cctx;  /* one per thread */
    char **dst;        /* one compressed piece per thread */
    size_t dst_cap;
    pthread_t writer;
    bool writer_started;
    struct bg_error err;
};

/* The snapshot buffer of the last finished asynchronous save, kept for the next one: its
 * pages are already mapped, so taking a snapshot is a copy at memory speed instead of a
 * page fault every 4 KB (which on some machines costs more than the copy itself). */
static struct {
    pthread_mutex_t mu;
    float *buf;
    size_t len;
} spare = {PTHREAD_MUTEX_INITIALIZER, NULL, 0};

/* A buffer of at least len floats (*cap of them): the spare one when it is large enough,
 * else a new one; NULL when memory is short. */
static float *snapshot_alloc(size_t len, size_t *cap)
{
    pthread_mutex_lock(&spare.mu);
    float *buf = NULL;
    if (spare.buf && spare.len >= len) {
        buf = spare.buf;
        *cap = spare.len;
    } else {
        free(spare.buf);
    }
    spare.buf = NULL;
    spare.len = 0;
    pthread_mutex_unlock(&spare.mu);
    if (!buf) {
        buf = malloc(len * sizeof(float));
        *cap = len;
    }
    return buf;
}

static void snapshot_keep(float *buf, size_t len)
{
    pthread_mutex_lock(&spare.mu);
    free(spare.buf);
    spare.buf = buf;
    spare.len = len;
    pthread_mutex_unlock(&spare.mu);
}

void ckpt_save_release(void)
{
    snapshot_keep(NULL, 0);
}

static void pending_free(struct ckpt_pending *p)
{
    free(p->config);
    free(p->layout);
    free(p->state);
    free(p->tensors);
    free(p->pieces);
    if (p->snapshot) snapshot_keep(p->snapshot, p->snapshot_cap);
    for (int t = 0; p->cctx && t < p->nthreads; t++) {
        ZSTD_freeCCtx(p->cctx[t]);
        free(p->dst[t]);
    }
    free(p->cctx);
    free(p->dst);
    free(p);
}

/* Block elements [a, b) of one kind of tensor i, values from `first` (element a), cut into
 * pieces of at most SHARD_PIECE_MAX. */
static void plan_range(struct ckpt_pending *p, size_t *cap, int kind, int i, const float *first,
                       size_t a, size_t b)
{
    for (size_t x = a; x < b; x += SHARD_PIECE_MAX) {
        if (p->npieces == *cap) {
            *cap = *cap ? 2 * *cap : 64;
            struct plan_piece *grown = realloc(p->pieces, *cap * sizeof *grown);
            VD_CHECK(grown != NULL, "out of memory planning a checkpoint");
            p->pieces = grown;
        }
        p->pieces[p->npieces++] = (struct plan_piece){
            .kind = kind, .tensor = i, .a = x, .b = min_sz(b, x + SHARD_PIECE_MAX),
            .src = first + (x - a)};
    }
}

/* The pieces this rank writes, in file order, their values still in pm. */
static void plan_pieces(struct ckpt_pending *p, const struct par_model *pm)
{
    const float *const state[SHARD_NKIND] = {pm->params, pm->adam_m, pm->adam_v};
    size_t cap = 0;
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        if (par_writes_block(pm, i))
            plan_range(p, &cap, SHARD_PARAM, i, pm->params + t->offset, 0, t->numel);
        for (int k = SHARD_M; k <= SHARD_V; k++) {
            if (!pm->opt.distributed_optimizer) {
                if (par_writes_block(pm, i))
                    plan_range(p, &cap, k, i, state[k] + t->offset, 0, t->numel);
                continue;
            }
            size_t ea, eb, at;
            if (par_shard_lead(pm, t) && par_moment_span(pm, t, &ea, &eb, &at))
                plan_range(p, &cap, k, i, state[k] + at, ea, eb);
        }
    }
}

/* One contiguous copy. */
struct copy_range {
    float *dst;
    const float *src;
    size_t n;
};

/* Copies every range, spread over the threads in chunks of SHARD_COPY_CHUNK elements, so
 * the copy (and the page faults of a fresh destination) runs at the machine's memory speed
 * rather than one core's. */
static void copy_ranges(const struct copy_range *r, size_t n)
{
    size_t *first = vd_calloc(n + 1, sizeof *first); /* first chunk of each range */
    for (size_t i = 0; i < n; i++)
        first[i + 1] = first[i] + (r[i].n + SHARD_COPY_CHUNK - 1) / SHARD_COPY_CHUNK;
    size_t const chunks = first[n];
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads_for(chunks / 8 + 1))
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = 0, hi = n; /* the range holding chunk c: first[lo] <= c < first[lo + 1] */
        while (hi - lo > 1) {
            size_t const mid = lo + (hi - lo) / 2;
            if (first[mid] <= c) lo = mid;
            else hi = mid;
        }
        size_t const at = (c - first[lo]) * SHARD_COPY_CHUNK;
        memcpy(r[lo].dst + at, r[lo].src + at, min_sz(SHARD_COPY_CHUNK, r[lo].n - at) * sizeof(float));
    }
    free(first);
}

/* Copies every piece's values into one private buffer, in plan order, and points the pieces
 * at it: the pieces are contiguous ranges of pm, so this is plain memcpy. */
static int snapshot_take(struct ckpt_pending *p)
{
    size_t len = 0;
    for (size_t i = 0; i < p->npieces; i++) len += p->pieces[i].b - p->pieces[i].a;
    if (len == 0) return 0;
    p->snapshot = snapshot_alloc(len, &p->snapshot_cap);
    RETURN_IF(!p->snapshot, VD_ENOMEM,
              "cannot allocate %.1f MB for the snapshot of checkpoint step %ld (a copy of the "
              "parameters and moments this rank writes); save synchronously or free memory",
              (double)len * sizeof(float) / 1e6, p->meta.step);
    struct copy_range *r = vd_calloc(p->npieces, sizeof *r);
    size_t at = 0;
    for (size_t i = 0; i < p->npieces; i++) {
        struct plan_piece *q = &p->pieces[i];
        r[i] = (struct copy_range){.dst = p->snapshot + at, .src = q->src, .n = q->b - q->a};
        q->src = p->snapshot + at;
        at += q->b - q->a;
    }
    copy_ranges(r, p->npieces);
    free(r);
    return 0;
}

/* The compression contexts and buffers, one per thread, so the writer allocates nothing.
 * The threads are the calling thread's OpenMP count (a new thread does not inherit it). */
static int writer_prepare(struct ckpt_pending *p, int level)
{
    size_t largest = 0;
    for (size_t i = 0; i < p->npieces; i++)
        largest = max_sz(largest, p->pieces[i].b - p->pieces[i].a);
    if (largest == 0) return 0;
    p->nthreads = threads_for(p->npieces);
    p->cctx = vd_calloc((size_t)p->nthreads, sizeof *p->cctx);
    p->dst = vd_calloc((size_t)p->nthreads, sizeof *p->dst);
    p->dst_cap = ZSTD_compressBound(largest * sizeof(float));
    for (int t = 0; t < p->nthreads; t++) {
        p->cctx[t] = ZSTD_createCCtx();
        VD_CHECK(p->cctx[t] != NULL, "out of memory creating a zstd context");
        size_t const zrc1 = ZSTD_CCtx_setParameter(p->cctx[t], ZSTD_c_compressionLevel, level);
        size_t const zrc2 = ZSTD_CCtx_setParameter(p->cctx[t], ZSTD_c_checksumFlag, 1);
        VD_CHECK(!ZSTD_isError(zrc1) && !ZSTD_isError(zrc2), "zstd refuses level %d", level);
        p->dst[t] = malloc(p->dst_cap);
        RETURN_IF(!p->dst[t], VD_ENOMEM, "cannot allocate %zu bytes to compress checkpoint pieces",
                  p->dst_cap);
    }
    return 0;
}

/* The writer thread's work: each piece one zstd frame, compressed by the OpenMP threads and
 * placed in the shard file in plan order (made at the first piece, so a rank without
 * pieces has none), then fsync. An ordered section only hands out each frame's offset, in
 * plan order, once its size is known; the threads write their frames there in parallel
 * and start their writeback (a hint: fsync reports). It calls no MPI, no vd_err_* and
 * nothing that aborts; its only outputs are the pieces' offset, nbytes and checksum and
 * p->err. strerror_r: strerror's buffer is not the thread's own. */
static void shard_write(struct ckpt_pending *p)
{
    if (p->npieces == 0) return;
    char why[256];
    int const fd = open(p->shard, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) {
        BG_FAIL(&p->err, VD_EIO, "cannot create checkpoint shard %s: %s", p->shard,
                strerror_r(errno, why, sizeof why));
        return;
    }
    size_t offset = 0;
#pragma omp parallel num_threads(p->nthreads)
    {
        int const tid = omp_get_thread_num();
        char *const dst = p->dst[tid];
#pragma omp for ordered schedule(dynamic, 1)
        for (size_t i = 0; i < p->npieces; i++) {
            struct plan_piece *q = &p->pieces[i];
            size_t const nbytes =
                bg_failed(&p->err) ? 0
                                   : ZSTD_compress2(p->cctx[tid], dst, p->dst_cap, q->src,
                                                    (q->b - q->a) * sizeof(float));
            bool placed = false;
#pragma omp ordered
            if (!bg_failed(&p->err)) {
                if (ZSTD_isError(nbytes) || nbytes < 4) {
                    BG_FAIL(&p->err, VD_EIO, "%s: compressing %s of '%s' failed: %s", p->shard,
                            kind_names[q->kind], p->tensors[q->tensor].name,
                            ZSTD_isError(nbytes) ? ZSTD_getErrorName(nbytes) : "no frame");
                } else {
                    q->offset = offset;
                    q->nbytes = nbytes;
                    offset += nbytes;
                    placed = true;
                }
            }
            char msg[256];
            if (placed && write_at(fd, dst, nbytes, q->offset) != 0) {
                BG_FAIL(&p->err, VD_EIO, "cannot write checkpoint shard %s: %s", p->shard,
                        strerror_r(errno, msg, sizeof msg));
            } else if (placed) {
                /* the frame ends with its content checksum (checksumFlag) */
                q->checksum = le32((const unsigned char *)dst + nbytes - 4);
                sync_file_range(fd, (off_t)q->offset, (off_t)nbytes, SYNC_FILE_RANGE_WRITE);
            }
        }
    }
    if (!bg_failed(&p->err) && fsync(fd) != 0)
        BG_FAIL(&p->err, VD_EIO, "cannot sync checkpoint shard %s: %s", p->shard,
                strerror_r(errno, why, sizeof why));
    if (close(fd) != 0)
        BG_FAIL(&p->err, VD_EIO, "cannot close checkpoint shard %s: %s", p->shard,
                strerror_r(errno, why, sizeof why));
}

static void *writer_main(void *arg)
{
    shard_write(arg);
    return NULL;
}

/* Starts the writer with every signal blocked (its OpenMP threads inherit the mask):
 * signals meant for the process go to the training thread, and a file size limit fails
 * the write (EFBIG) instead of killing the process with SIGXFSZ. A thread that cannot
 * start is the save's error, raised by finish like the writer's own. */
static void writer_launch(struct ckpt_pending *p)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int const err = pthread_create(&p->writer, NULL, writer_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    p->writer_started = err == 0;
    char why[256];
    if (err != 0)
        BG_FAIL(&p->err, VD_EIO, "cannot start the checkpoint writer thread: %s",
                strerror_r(err, why, sizeof why));
}

/* This rank's pieces as the manifest lists them. */
static json_t *pieces_json(const struct ckpt_pending *p)
{
    json_t *arr = json_array();
    VD_CHECK(arr != NULL, "out of memory building the manifest");
    for (size_t i = 0; i < p->npieces; i++) {
        const struct plan_piece *q = &p->pieces[i];
        const struct model_tensor *t = &p->tensors[q->tensor];
        char checksum[16];
        snprintf(checksum, sizeof checksum, "%08x", q->checksum);
        json_t *o = json_pack("{s:s, s:s, s:o, s:[II], s:[II], s:[II], s:s, s:I, s:I, s:I, s:s}",
                              "kind", kind_names[q->kind], "tensor", t->name,
                              "shape", shape_json(t),
                              "block_start", (json_int_t)t->local_start[0],
                              (json_int_t)t->local_start[1], "block_shape",
                              (json_int_t)t->local_shape[0], (json_int_t)t->local_shape[1],
                              "range", (json_int_t)q->a, (json_int_t)q->b, "file", p->file,
                              "offset", (json_int_t)q->offset, "nbytes", (json_int_t)q->nbytes,
                              "raw_nbytes", (json_int_t)((q->b - q->a) * sizeof(float)),
                              "checksum", checksum);
        VD_CHECK(o && json_array_append_new(arr, o) == 0, "out of memory building the manifest");
    }
    return arr;
}

/* This rank's pieces as JSON text (malloc'd), gathered on rank 0 in rank order into one
 * array of every piece. */
static json_t *gather_pieces(const json_t *mine)
{
    const struct dist_group *w = dist_world();
    char *text = json_dumps(mine, JSON_COMPACT);
    VD_CHECK(text != NULL, "out of memory serialising checkpoint pieces");
    int const len = dist_count(strlen(text) + 1);
    int *lens = w->rank == 0 ? vd_calloc((size_t)w->size, sizeof(int)) : NULL;
    int *displs = w->rank == 0 ? vd_calloc((size_t)w->size, sizeof(int)) : NULL;
    DIST_CHECK_MPI(MPI_Gather(&len, 1, MPI_INT, lens, 1, MPI_INT, 0, w->comm));
    size_t total = 0;
    for (int r = 0; w->rank == 0 && r < w->size; r++) {
        displs[r] = dist_count(total);
        total += (size_t)lens[r];
    }
    char *all = w->rank == 0 ? vd_alloc(total) : NULL;
    DIST_CHECK_MPI(MPI_Gatherv(text, len, MPI_CHAR, all, lens, displs, MPI_CHAR, 0, w->comm));
    free(text);
    json_t *pieces = NULL;
    if (w->rank == 0) {
        pieces = json_array();
        for (int r = 0; r < w->size; r++) {
            json_t *part = json_loads(all + displs[r], 0, NULL);
            VD_CHECK(part && json_array_extend(pieces, part) == 0,
                     "rank %d's checkpoint pieces do not parse", r);
            json_decref(part);
        }
    }
    free(all);
    free(lens);
    free(displs);
    return pieces;
}

/* JSON text as a JSON value when it parses, else as a string; NULL as null. */
static json_t *json_text_value(const char *text)
{
    if (!text) return json_null();
    json_t *v = json_loads(text, JSON_DECODE_ANY, NULL);
    return v ? v : json_string(text);
}

/* A JSON value back as text (malloc'd): a string as itself, anything else as compact JSON;
 * NULL for a missing value or null. */
static char *json_value_text(const json_t *v)
{
    if (!v || json_is_null(v)) return NULL;
    char *text = json_is_string(v) ? strdup(json_string_value(v))
                                   : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    VD_CHECK(text != NULL, "out of memory copying a checkpoint's metadata");
    return text;
}

static json_t *manifest_build(const struct model_config *cfg, const struct ckpt_meta *meta,
                              json_t *pieces)
{
    struct model_layout const serial = {.tp = 1, .ep = 1, .etp = 1, .layer_begin = 0,
                                        .layer_end = cfg->num_hidden_layers,
                                        .has_embed = true, .has_head = true};
    struct model_table full;
    VD_CHECK(model_table_build(&full, cfg, &serial) == 0, "the serial layout always fits");
    json_t *tensors = json_array();
    for (int i = 0; i < full.count; i++) {
        const struct model_tensor *t = &full.t[i];
        json_array_append_new(tensors, json_pack("{s:s, s:o, s:s}", "name", t->name, "shape",
                                                 shape_json(t), "dtype", "F32"));
    }
    model_table_free(&full);
    /* jansson's integers are signed 64-bit: a seed beyond that is kept as a decimal string */
    char seed_text[32];
    snprintf(seed_text, sizeof seed_text, "%llu", (unsigned long long)meta->seed);
    json_t *seed = meta->seed <= (uint64_t)INT64_MAX ? json_integer((json_int_t)meta->seed)
                                                     : json_string(seed_text);
    size_t const count = json_array_size(pieces);
    json_t *m = json_pack("{s:s, s:i, s:I, s:I, s:o, s:s, s:o, s:o, s:o, s:o, s:I, s:o}",
                          "format", SHARD_FORMAT, "version", SHARD_VERSION,
                          "step", (json_int_t)meta->step, "adam_step", (json_int_t)meta->adam_step,
                          "seed", seed, "dtype", "f32", "config", json_text_value(meta->config),
                          "layout", json_text_value(meta->layout),
                          "train_state", json_text_value(meta->state), "tensors", tensors,
                          "piece_count", (json_int_t)count, "pieces", pieces);
    VD_CHECK(m != NULL, "out of memory building the manifest");
    return m;
}

/* Writes the manifest durably: temporary file, fsync, rename, fsync of the directory. */
static int manifest_write(const json_t *m, const char *dir)
{
    char *text = json_dumps(m, JSON_INDENT(1));
    VD_CHECK(text != NULL, "out of memory serialising the manifest");
    size_t const len = strlen(text);
    char *line = vd_alloc(len + 2);
    memcpy(line, text, len);
    memcpy(line + len, "\n", 2);
    free(text);
    int const rc = write_file_atomic(dir, SHARD_MANIFEST, line);
    free(line);
    FORWARD_IF(rc);
    return 0;
}

/* Moves the finished directory tmp to final. A final name that exists (the same step saved
 * again) is swapped atomically where the filesystem can (renameat2 RENAME_EXCHANGE), else
 * moved aside first; the old checkpoint is removed after. Once the new one is under the
 * final name this succeeds: what fails after (syncing root, removing the old one) is a
 * warning, so an error always means nothing new is under the final name. */
static int publish(const char *tmp, const char *final, const char *root, const char *aside)
{
    const char *old = NULL;
    if (rename(tmp, final) != 0) {
        RETURN_IF(errno != EEXIST && errno != ENOTEMPTY, VD_EIO, "cannot rename %s to %s: %s",
                  tmp, final, strerror(errno));
        old = tmp;
        if (renameat2(AT_FDCWD, tmp, AT_FDCWD, final, RENAME_EXCHANGE) != 0) {
            RETURN_IF(rename(final, aside) != 0, VD_EIO, "cannot move the old %s aside to %s: %s",
                      final, aside, strerror(errno));
            if (rename(tmp, final) != 0) {
                int const err = errno;
                int const back = rename(aside, final);
                RETURN_ERR(VD_EIO, "cannot rename %s to %s: %s%s", tmp, final, strerror(err),
                           back ? "; the previous checkpoint of this step is left at the "
                                  "side name" : "");
            }
            old = aside;
        }
    }
    if (vd_sync_dir(root) != 0) fprintf(stderr, "vdist: warning: %s\n", vd_err_msg());
    /* an old checkpoint left behind is only disk space: its name is step_N.<suffix>, which
     * ckpt_prune removes */
    if (old && remove_tree(old) != 0) fprintf(stderr, "vdist: warning: %s\n", vd_err_msg());
    return 0;
}

/* Commits a published checkpoint: ROOT/latest names it. If that fails, the checkpoint is
 * taken back out of its final name (renamed to undo, removed) so the error leaves nothing
 * new behind, as a failed save must. */
static int commit_latest(const struct ckpt_pending *p)
{
    char text[64];
    snprintf(text, sizeof text, "%s\n", p->name);
    int const rc = write_file_atomic(p->root, SHARD_LATEST, text);
    if (rc != 0 && rename(p->final, p->undo) == 0) vd_remove_tree_quiet(p->undo);
    FORWARD_IF(rc);
    return 0;
}

/* ckpt_save_start, with the pieces' values copied (snapshot) or left in pm (ckpt_save, whose
 * caller waits). Everything that can fail before the writing is agreed here; the writer
 * starts only once every rank is ready. */
static int save_start(const struct par_model *pm, const char *root, const struct ckpt_meta *meta,
                      int level, bool snapshot, ckpt_pending **out)
{
    *out = NULL;
    const struct dist_group *world = dist_world();
    RETURN_IF(level < 1 || level > 19, VD_EINVAL,
              "ckpt.zstd_level = %d; allowed are 1 (fastest) to 19 (smallest)", level);
    RETURN_IF(meta->step < 0 || meta->adam_step < 0, VD_EINVAL,
              "checkpoint step %ld and adam step %ld must not be negative", meta->step,
              meta->adam_step);
    /* A name unique to this save, chosen by rank 0 for all. */
    static unsigned saves;
    char suffix[48];
    snprintf(suffix, sizeof suffix, "%ld.%u", (long)getpid(), saves++);
    dist_bcast(world, DIST_WORLD, suffix, sizeof suffix, 0);

    struct ckpt_pending *p = vd_calloc(1, sizeof *p);
    char name[96];
    int rc = 0;
    if (snprintf(p->root, sizeof p->root, "%s", root) >= (int)sizeof p->root)
        rc = vd_err_set(VD_EINVAL, __FILE__, __LINE__, "path %s is too long", root);
    snprintf(p->name, sizeof p->name, "step_%08ld", meta->step);
    if (rc == 0) rc = vd_path_join(p->final, sizeof p->final, root, p->name);
    snprintf(name, sizeof name, "step_%08ld.tmp.%s", meta->step, suffix);
    if (rc == 0) rc = vd_path_join(p->tmp, sizeof p->tmp, root, name);
    snprintf(name, sizeof name, "step_%08ld.old.%s", meta->step, suffix);
    if (rc == 0) rc = vd_path_join(p->aside, sizeof p->aside, root, name);
    snprintf(name, sizeof name, "step_%08ld.del.%s", meta->step, suffix);
    if (rc == 0) rc = vd_path_join(p->undo, sizeof p->undo, root, name);
    snprintf(p->file, sizeof p->file, "rank_%05d.zst", world->rank);
    if (rc == 0) rc = vd_path_join(p->shard, sizeof p->shard, p->tmp, p->file);
    p->cfg = pm->cfg;
    p->meta = *meta;
    p->config = meta->config ? strdup(meta->config) : NULL;
    p->layout = meta->layout ? strdup(meta->layout) : NULL;
    p->state = meta->state ? strdup(meta->state) : NULL;
    VD_CHECK((p->config || !meta->config) && (p->layout || !meta->layout) &&
                 (p->state || !meta->state),
             "out of memory copying the checkpoint's metadata");
    p->meta.config = p->config;
    p->meta.layout = p->layout;
    p->meta.state = p->state;
    p->ntensors = pm->tab.count;
    p->tensors = vd_calloc((size_t)p->ntensors + 1, sizeof *p->tensors);
    memcpy(p->tensors, pm->tab.t, (size_t)p->ntensors * sizeof *p->tensors);
    plan_pieces(p, pm);

    bool made = false;
    if (rc == 0 && world->rank == 0) {
        rc = vd_make_dirs(root);
        if (rc == 0 && mkdir(p->tmp, 0777) != 0)
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot create checkpoint directory %s: %s",
                            p->tmp, strerror(errno));
        made = rc == 0;
    }
    if (rc == 0 && snapshot) rc = snapshot_take(p);
    if (rc == 0) rc = writer_prepare(p, level);
    rc = dist_agree(world, rc);
    if (rc != 0) {
        if (made) vd_remove_tree_quiet(p->tmp);
        pending_free(p);
        FORWARD_IF(rc);
    }
    writer_launch(p);
    *out = p;
    return 0;
}

int ckpt_save_start(const struct par_model *pm, const char *root, const struct ckpt_meta *meta,
                    int level, ckpt_pending **out)
{
    FORWARD_IF(save_start(pm, root, meta, level, true, out));
    return 0;
}

int ckpt_save_finish(ckpt_pending *p)
{
    VD_CHECK(p != NULL, "ckpt_save_finish needs the handle of a ckpt_save_start that succeeded");
    const struct dist_group *world = dist_world();
    if (p->writer_started) {
        int const err = pthread_join(p->writer, NULL);
        VD_CHECK(err == 0, "cannot join the checkpoint writer thread: %s", strerror(err));
    }
    int rc = bg_raise(&p->err);
    /* Every shard is durable (or some rank failed) before rank 0 writes the manifest. */
    rc = dist_agree(world, rc);
    bool published = false;
    if (rc == 0) {
        json_t *mine = pieces_json(p);
        json_t *pieces = gather_pieces(mine);
        json_decref(mine);
        if (world->rank == 0) {
            json_t *m = manifest_build(&p->cfg, &p->meta, pieces);
            rc = manifest_write(m, p->tmp);
            json_decref(m);
            if (rc == 0) rc = publish(p->tmp, p->final, p->root, p->aside);
            published = rc == 0;
            if (rc == 0) rc = commit_latest(p);
        }
    }
    if (rc != 0 && world->rank == 0 && !published) vd_remove_tree_quiet(p->tmp);
    pending_free(p);
    FORWARD_IF(dist_agree(world, rc));
    return 0;
}

/* start then finish: one code path, without the snapshot, since pm cannot change while
 * the caller waits. */
int ckpt_save(const struct par_model *pm, const char *root, const struct ckpt_meta *meta,
              int level)
{
    ckpt_pending *p;
    FORWARD_IF(save_start(pm, root, meta, level, false, &p));
    FORWARD_IF(ckpt_save_finish(p));
    return 0;
}

/* ---------------------------------------------------------------- load */

/* The configured model against the manifest's tensors: the same names, the same shapes. */
static int check_model(const struct manifest *m, const struct model_config *cfg)
{
    struct model_layout const serial = {.tp = 1, .ep = 1, .etp = 1, .layer_begin = 0,
                                        .layer_end = cfg->num_hidden_layers, .has_embed = true,
                                        .has_head = true};
    struct model_table full;
    FORWARD_IF(model_table_build(&full, cfg, &serial));
    int rc = 0;
    for (int i = 0; rc == 0 && i < full.count; i++) {
        const struct model_tensor *t = &full.t[i];
        int const j = manifest_find(m, t->name);
        if (j < 0) {
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "%s: tensor '%s' of the configured model is missing from the "
                            "checkpoint (was it written for another model?)", m->path, t->name);
            break;
        }
        const struct mtensor *c = &m->tensors[j];
        if (c->ndim != t->ndim || c->shape[0] != t->shape[0] || c->shape[1] != t->shape[1]) {
            char got[64], want[64];
            format_shape(got, sizeof got, c->ndim, c->shape);
            format_shape(want, sizeof want, t->ndim, t->shape);
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "%s: tensor '%s' has shape %s in the checkpoint but the configured "
                            "model needs %s", m->path, t->name, got, want);
        }
    }
    for (int j = 0; rc == 0 && j < m->ntensors; j++)
        if (model_table_find(&full, m->tensors[j].name) < 0)
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "%s: tensor '%s' of the checkpoint is not part of the configured "
                            "model (check num_hidden_layers and num_local_experts)", m->path,
                            m->tensors[j].name);
    model_table_free(&full);
    FORWARD_IF(rc);
    return 0;
}

/* Whether piece p may hold elements of need n of block t: their row and column spans meet. */
static bool piece_may_overlap(const struct mpiece *p, const struct model_tensor *t,
                              const struct need *n)
{
    size_t const pr0 = p->start[0] + p->a / p->bshape[1];
    size_t const pr1 = p->start[0] + (p->b - 1) / p->bshape[1] + 1;
    size_t const lr0 = t->local_start[0] + n->ea / t->local_shape[1];
    size_t const lr1 = t->local_start[0] + (n->eb - 1) / t->local_shape[1] + 1;
    size_t const pc0 = p->start[1], pc1 = p->start[1] + p->bshape[1];
    size_t const lc0 = t->local_start[1], lc1 = t->local_start[1] + t->local_shape[1];
    return max_sz(pr0, lr0) < min_sz(pr1, lr1) && max_sz(pc0, lc0) < min_sz(pc1, lc1);
}

/* Marks elements [at, at + n) of a coverage bitmap (one bit an element, shared by threads:
 * atomic); returns how many of them were marked already. */
static size_t mark_range(uint64_t *bits, size_t at, size_t n)
{
    size_t dup = 0;
    for (size_t e = at; e < at + n;) {
        size_t const bit = e % 64, cnt = min_sz(64 - bit, at + n - e);
        uint64_t const mask = (cnt == 64 ? ~(uint64_t)0 : ((uint64_t)1 << cnt) - 1) << bit;
        uint64_t const old = __atomic_fetch_or(&bits[e / 64], mask, __ATOMIC_RELAXED);
        dup += (size_t)__builtin_popcountll(old & mask);
        e += cnt;
    }
    return dup;
}

/* How many of elements [at, at + n) are marked. */
static size_t count_marked(const uint64_t *bits, size_t at, size_t n)
{
    size_t set = 0;
    for (size_t e = at; e < at + n;) {
        size_t const bit = e % 64, cnt = min_sz(64 - bit, at + n - e);
        uint64_t const mask = (cnt == 64 ? ~(uint64_t)0 : ((uint64_t)1 << cnt) - 1) << bit;
        set += (size_t)__builtin_popcountll(bits[e / 64] & mask);
        e += cnt;
    }
    return set;
}

/* Copies the elements of piece p (values src) that fall in need n of this rank's block of
 * t into the kind's staging buffer dst and marks them in bits; *dup counts elements marked
 * before. Pieces and blocks meet in row segments: piece element i is global
 * (r0 + i / cols, c0 + i % cols); each segment is one memcpy. */
static void copy_overlap(const struct mpiece *p, const float *src, const struct model_tensor *t,
                         const struct need *n, float *dst, uint64_t *bits, size_t *dup)
{
    size_t const pcols = p->bshape[1];
    size_t const lr0 = t->local_start[0], lc0 = t->local_start[1];
    size_t const lrows = t->local_shape[0], lcols = t->local_shape[1];
    size_t d = 0;
    for (size_t i = p->a; i < p->b;) {
        size_t const row = i / pcols, c_begin = i % pcols;
        size_t const seg_end = min_sz(p->b, (row + 1) * pcols);
        size_t const c_end = c_begin + (seg_end - i);
        size_t const gr = p->start[0] + row;
        i = seg_end;
        if (gr < lr0 || gr >= lr0 + lrows) continue;
        size_t const g0 = max_sz(p->start[1] + c_begin, lc0);
        size_t const g1 = min_sz(p->start[1] + c_end, lc0 + lcols);
        if (g0 >= g1) continue;
        size_t const e0 = (gr - lr0) * lcols + (g0 - lc0);
        size_t const k0 = max_sz(e0, n->ea), k1 = min_sz(e0 + (g1 - g0), n->eb);
        if (k0 >= k1) continue;
        /* piece element of block element k0, relative to the piece's first */
        size_t const s0 = row * pcols + (g0 + (k0 - e0) - p->start[1]) - p->a;
        memcpy(dst + n->at + (k0 - n->ea), src + s0, (k1 - k0) * sizeof(float));
        d += mark_range(bits, n->at + (k0 - n->ea), k1 - k0);
    }
    if (d) __atomic_add_fetch(dup, d, __ATOMIC_RELAXED);
}

/* Every needed element of every local tensor and kind covered exactly once. */
static int check_coverage(const struct par_model *pm, const struct manifest *m,
                          uint64_t *const bits[SHARD_NKIND], const size_t *twice)
{
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        for (int k = 0; k < SHARD_NKIND; k++) {
            struct need const n = need_of(pm, t, k);
            if (!n.any) continue;
            size_t const missing = (n.eb - n.ea) - count_marked(bits[k], n.at, n.eb - n.ea);
            size_t const dup = twice[(size_t)i * SHARD_NKIND + (size_t)k];
            RETURN_IF(missing || dup, VD_EFORMAT,
                      "%s: %s of tensor '%s': of this rank's block at (%zu, %zu) of shape "
                      "(%zu, %zu), %zu elements are in no piece and %zu in more than one",
                      m->path, kind_names[k], t->name, t->local_start[0], t->local_start[1],
                      t->local_shape[0], t->local_shape[1], missing, dup);
        }
    }
    return 0;
}

/* A piece to load and the local tensor it meets. */
struct load_job {
    size_t piece;
    int local;
};

/* Reads every piece that meets what this rank holds into the staging buffers, on OpenMP
 * threads: one decompression per piece, straight into dst where the piece is one run of
 * this rank's block (the same block in both layouts), row segments otherwise. */
static int load_pieces(const struct par_model *pm, const struct manifest *m,
                       float *const dst[SHARD_NKIND], uint64_t *const bits[SHARD_NKIND],
                       size_t *twice)
{
    int *local_of = vd_calloc((size_t)m->ntensors + 1, sizeof *local_of);
    for (int j = 0; j < m->ntensors; j++) local_of[j] = -1;
    for (int i = 0; i < pm->tab.count; i++) {
        int const j = manifest_find(m, pm->tab.t[i].name);
        if (j >= 0) local_of[j] = i;
    }
    struct load_job *jobs = vd_calloc(m->npieces + 1, sizeof *jobs);
    size_t njobs = 0;
    for (size_t i = 0; i < m->npieces; i++) {
        const struct mpiece *p = &m->pieces[i];
        int const li = local_of[p->tensor];
        if (li < 0) continue;
        const struct model_tensor *t = &pm->tab.t[li];
        struct need const n = need_of(pm, t, p->kind);
        if (n.any && piece_may_overlap(p, t, &n))
            jobs[njobs++] = (struct load_job){.piece = i, .local = li};
    }
    free(local_of);
    struct bg_error err = {0};
#pragma omp parallel num_threads(threads_for(njobs))
    {
        struct piece_reader r;
        reader_init(&r, m, &err);
#pragma omp for schedule(dynamic, 1)
        for (size_t j = 0; j < njobs; j++) {
            if (bg_failed(&err)) continue;
            const struct mpiece *p = &m->pieces[jobs[j].piece];
            const struct model_tensor *t = &pm->tab.t[jobs[j].local];
            struct need const n = need_of(pm, t, p->kind);
            size_t *dup = &twice[(size_t)jobs[j].local * SHARD_NKIND + (size_t)p->kind];
            bool const run = p->start[0] == t->local_start[0] &&
                             p->start[1] == t->local_start[1] &&
                             p->bshape[0] == t->local_shape[0] &&
                             p->bshape[1] == t->local_shape[1] && p->a >= n.ea && p->b <= n.eb;
            const float *vals;
            if (run) {
                size_t const at = n.at + (p->a - n.ea);
                if (reader_get(&r, jobs[j].piece, dst[p->kind] + at, &vals) == 0) {
                    size_t const d = mark_range(bits[p->kind], at, p->b - p->a);
                    if (d) __atomic_add_fetch(dup, d, __ATOMIC_RELAXED);
                }
            } else if (reader_get(&r, jobs[j].piece, NULL, &vals) == 0) {
                copy_overlap(p, vals, t, &n, dst[p->kind], bits[p->kind], dup);
            }
        }
        reader_free(&r);
    }
    free(jobs);
    FORWARD_IF(bg_raise(&err));
    return 0;
}

int ckpt_load(struct par_model *pm, const char *dir, long *step, char **config_json)
{
    if (config_json) *config_json = NULL;
    struct manifest m;
    int rc = manifest_open(&m, dir);
    if (rc == 0) rc = check_model(&m, &pm->cfg); /* before the pieces: names the cause */
    if (rc == 0) rc = manifest_read_pieces(&m);
    /* Staged, so a failed load leaves pm as it was. The staging buffers are not
     * initialised: only the needed ranges, each checked covered once, are copied back, so
     * padding keeps pm's values. */
    size_t const len[SHARD_NKIND] = {pm->tab.numel, pm->state_len, pm->state_len};
    float *const cur[SHARD_NKIND] = {pm->params, pm->adam_m, pm->adam_v};
    float *dst[SHARD_NKIND] = {NULL};
    uint64_t *bits[SHARD_NKIND] = {NULL};
    size_t *twice = vd_calloc((size_t)pm->tab.count * SHARD_NKIND + 1, sizeof *twice);
    for (int k = 0; rc == 0 && k < SHARD_NKIND; k++) {
        dst[k] = vd_alloc(len[k] * sizeof(float));
        bits[k] = vd_calloc(len[k] / 64 + 1, sizeof(uint64_t));
    }
    if (rc == 0) rc = load_pieces(pm, &m, dst, bits, twice);
    if (rc == 0) rc = check_coverage(pm, &m, bits, twice);
    rc = dist_agree(dist_world(), rc);
    if (rc == 0) {
        struct copy_range *r = vd_calloc((size_t)pm->tab.count * SHARD_NKIND + 1, sizeof *r);
        size_t nr = 0;
        for (int i = 0; i < pm->tab.count; i++)
            for (int k = 0; k < SHARD_NKIND; k++) {
                struct need const n = need_of(pm, &pm->tab.t[i], k);
                if (n.any)
                    r[nr++] = (struct copy_range){.dst = cur[k] + n.at, .src = dst[k] + n.at,
                                                  .n = n.eb - n.ea};
            }
        copy_ranges(r, nr);
        free(r);
        pm->adam_step = m.adam_step;
        if (step) *step = m.step;
        if (config_json) *config_json = json_value_text(json_object_get(m.root, "config"));
    }
    for (int k = 0; k < SHARD_NKIND; k++) {
        free(dst[k]);
        free(bits[k]);
    }
    free(twice);
    manifest_free(&m);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_train_state(const char *dir, char **state_json)
{
    *state_json = NULL;
    struct manifest m;
    int const rc = manifest_open(&m, dir);
    if (rc == 0) *state_json = json_value_text(json_object_get(m.root, "train_state"));
    manifest_free(&m);
    FORWARD_IF(rc);
    return 0;
}

/* ---------------------------------------------------------------- latest, prune, cleanup */

/* Whether root/name is a complete checkpoint of step `step`: a valid manifest, and every
 * shard file it names present and exactly its pieces. */
static bool is_complete(const char *root, const char *name, long step)
{
    char dir[PATH_MAX];
    if (vd_path_join(dir, sizeof dir, root, name) != 0) return false;
    struct manifest m;
    bool const ok = manifest_read(&m, dir) == 0 && m.step == step && manifest_check_files(&m) == 0;
    manifest_free(&m);
    return ok;
}

/* Whether root/name is a directory a save left without a valid manifest (cut short). One
 * whose manifest exists but cannot be opened (permissions, I/O) is not judged: false. */
static bool is_partial(const char *root, const char *name)
{
    char dir[PATH_MAX], path[PATH_MAX];
    if (vd_path_join(dir, sizeof dir, root, name) != 0 ||
        vd_path_join(path, sizeof path, dir, SHARD_MANIFEST) != 0)
        return false;
    int const fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT;
    close(fd);
    struct manifest m;
    bool bad = manifest_read(&m, dir) != 0;
    manifest_free(&m);
    /* a newer vdist's checkpoint is not this one's to judge */
    json_t *j = bad ? json_load_file(path, 0, NULL) : NULL;
    const char *format = json_string_value(json_object_get(j, "format"));
    const json_t *version = json_object_get(j, "version");
    if (format && strcmp(format, SHARD_FORMAT) == 0 && json_is_integer(version) &&
        json_integer_value(version) > SHARD_VERSION)
        bad = false;
    json_decref(j);
    return bad;
}

struct step_entry {
    char name[256];
    long step;
    bool exact; /* step_N, not step_N.<suffix> */
    bool complete;
};

/* The directories under root named step_N or step_N.<suffix>, with whether each is a
 * complete checkpoint when `judge`; *n = 0 when root does not exist. */
static int list_steps(const char *root, bool judge, struct step_entry **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    DIR *d = opendir(root);
    if (!d && errno == ENOENT) return 0;
    RETURN_IF(!d, VD_EIO, "cannot read checkpoint directory %s: %s", root, strerror(errno));
    size_t cap = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long step;
        bool exact;
        char path[PATH_MAX];
        struct stat st;
        if (!parse_step_name(e->d_name, &step, &exact) ||
            strlen(e->d_name) >= sizeof(*out)->name ||
            vd_path_join(path, sizeof path, root, e->d_name) != 0 || lstat(path, &st) != 0 ||
            !S_ISDIR(st.st_mode))
            continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            struct step_entry *grown = realloc(*out, cap * sizeof **out);
            VD_CHECK(grown != NULL, "out of memory listing %s", root);
            *out = grown;
        }
        struct step_entry *s = &(*out)[(*n)++];
        snprintf(s->name, sizeof s->name, "%s", e->d_name);
        s->step = step;
        s->exact = exact;
        s->complete = judge && exact && is_complete(root, e->d_name, step);
    }
    closedir(d);
    return 0;
}

/* ROOT/latest: 1 with the checkpoint name it holds (step_N) and its step, 0 when there is
 * no such file, -1 when it cannot be read or does not hold such a name. */
static int latest_read(const char *root, char *name, size_t cap, long *step)
{
    char path[PATH_MAX];
    if (vd_path_join(path, sizeof path, root, SHARD_LATEST) != 0) return -1;
    int const fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : -1;
    char buf[64];
    size_t got = 0;
    int const rc = read_at(fd, buf, sizeof buf - 1, 0, &got);
    close(fd);
    if (rc != 0) return -1;
    buf[got] = '\0';
    while (got > 0 && (buf[got - 1] == '\n' || buf[got - 1] == ' ' || buf[got - 1] == '\r'))
        buf[--got] = '\0';
    bool exact;
    if (!parse_step_name(buf, step, &exact) || !exact || got >= cap) return -1;
    memcpy(name, buf, got + 1);
    return 1;
}

/* The newest complete checkpoint of s[0..n) with a step below `below`, or NULL. */
static const struct step_entry *newest_complete(const struct step_entry *s, size_t n, long below)
{
    const struct step_entry *best = NULL;
    for (size_t i = 0; i < n; i++)
        if (s[i].complete && s[i].step < below && (!best || s[i].step > best->step)) best = &s[i];
    return best;
}

int ckpt_latest_ex(const char *root, char *out, size_t cap, bool *fell_back)
{
    RETURN_IF(cap == 0, VD_EINVAL, "no room for the checkpoint path");
    out[0] = '\0';
    if (fell_back) *fell_back = false;
    char name[64];
    long step = -1;
    int const pointer = latest_read(root, name, sizeof name, &step);
    int rc = 0;
    if (pointer == 1 && is_complete(root, name, step)) {
        rc = vd_path_join(out, cap, root, name);
    } else {
        struct step_entry *s;
        size_t n;
        FORWARD_IF(list_steps(root, true, &s, &n));
        const struct step_entry *best = newest_complete(s, n, LONG_MAX);
        if (best) rc = vd_path_join(out, cap, root, best->name);
        if (fell_back) *fell_back = pointer != 0 || best != NULL;
        free(s);
    }
    if (rc != 0) out[0] = '\0';
    FORWARD_IF(rc);
    return 0;
}

int ckpt_latest(const char *root, char *out, size_t cap)
{
    FORWARD_IF(ckpt_latest_ex(root, out, cap, NULL));
    return 0;
}

int ckpt_previous(const char *root, long before_step, char *out, size_t cap)
{
    RETURN_IF(cap == 0, VD_EINVAL, "no room for the checkpoint path");
    out[0] = '\0';
    struct step_entry *s;
    size_t n;
    FORWARD_IF(list_steps(root, true, &s, &n));
    const struct step_entry *best = newest_complete(s, n, before_step);
    int const rc = best ? vd_path_join(out, cap, root, best->name) : 0;
    if (rc != 0) out[0] = '\0';
    free(s);
    FORWARD_IF(rc);
    return 0;
}

static int cmp_step_desc(const void *x, const void *y)
{
    long const a = ((const struct step_entry *)x)->step, b = ((const struct step_entry *)y)->step;
    return (a < b) - (a > b);
}

/* Removes the checkpoint root/name, renamed first so a removal cut short never leaves a
 * checkpoint-like name. */
static int remove_checkpoint(const char *root, const char *name, long step)
{
    char path[PATH_MAX], gone[PATH_MAX], gone_name[96];
    FORWARD_IF(vd_path_join(path, sizeof path, root, name));
    snprintf(gone_name, sizeof gone_name, "step_%08ld.del.%ld", step, (long)getpid());
    FORWARD_IF(vd_path_join(gone, sizeof gone, root, gone_name));
    RETURN_IF(rename(path, gone) != 0, VD_EIO, "cannot rename %s to %s: %s", path, gone,
              strerror(errno));
    FORWARD_IF(remove_tree(gone));
    return 0;
}

int ckpt_prune(const char *root, int keep)
{
    RETURN_IF(keep < 0, VD_EINVAL, "ckpt.keep = %d; allowed are 0 (keep all) or more", keep);
    struct step_entry *s;
    size_t n;
    FORWARD_IF(list_steps(root, true, &s, &n));
    qsort(s, n, sizeof *s, cmp_step_desc);
    char latest[64] = "";
    long latest_step;
    if (latest_read(root, latest, sizeof latest, &latest_step) != 1) latest[0] = '\0';
    long newest = -1;
    for (size_t i = 0; i < n && newest < 0; i++)
        if (s[i].complete) newest = s[i].step;
    int rc = 0, kept = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char path[PATH_MAX];
        if (s[i].complete) {
            /* the committed checkpoint stays, whatever its age */
            if (keep == 0 || kept++ < keep || strcmp(s[i].name, latest) == 0) continue;
            rc = remove_checkpoint(root, s[i].name, s[i].step);
        } else if (s[i].step < newest) {
            rc = vd_path_join(path, sizeof path, root, s[i].name);
            if (rc == 0) rc = remove_tree(path);
        }
    }
    free(s);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_cleanup(const char *root)
{
    struct step_entry *s;
    size_t n;
    FORWARD_IF(list_steps(root, false, &s, &n));
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        char path[PATH_MAX];
        int r = 0;
        if (!s[i].exact) {
            r = vd_path_join(path, sizeof path, root, s[i].name);
            if (r == 0) r = remove_tree(path);
        } else if (is_partial(root, s[i].name)) {
            r = remove_checkpoint(root, s[i].name, s[i].step);
        }
        if (rc == 0) rc = r;
    }
    free(s);
    /* latest.tmp.<pid>: a commit cut short */
    DIR *d = opendir(root);
    const struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        char path[PATH_MAX];
        if (strncmp(e->d_name, SHARD_LATEST ".tmp.", strlen(SHARD_LATEST ".tmp.")) != 0 ||
            vd_path_join(path, sizeof path, root, e->d_name) != 0)
            continue;
        if (unlink(path) != 0 && rc == 0)
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot remove %s: %s", path,
                            strerror(errno));
    }
    if (d) closedir(d);
    FORWARD_IF(rc);
    return 0;
}

/* ---------------------------------------------------------------- verify, inspect */

/* Decompresses every piece on OpenMP threads, in file order, checking each frame. */
static int verify_pieces(const struct manifest *m)
{
    size_t *order = vd_calloc(m->npieces + 1, sizeof *order);
    for (size_t i = 0; i < m->npieces; i++) order[i] = i;
    qsort_r(order, m->npieces, sizeof *order, cmp_piece_in_file, m->pieces);
    struct bg_error err = {0};
#pragma omp parallel num_threads(threads_for(m->npieces))
    {
        struct piece_reader r;
        reader_init(&r, m, &err);
#pragma omp for schedule(dynamic, 1)
        for (size_t j = 0; j < m->npieces; j++) {
            const float *vals;
            if (!bg_failed(&err)) reader_get(&r, order[j], NULL, &vals);
        }
        reader_free(&r);
    }
    free(order);
    FORWARD_IF(bg_raise(&err));
    return 0;
}

int ckpt_verify(const char *dir, FILE *out)
{
    struct manifest m;
    int rc = manifest_read(&m, dir);
    if (rc == 0) rc = manifest_check_coverage(&m, NULL);
    if (rc == 0) rc = manifest_check_files(&m);
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
    manifest_free(&m);
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
    int const rc = manifest_read(&m, dir);
    if (rc != 0) {
        manifest_free(&m);
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
        fprintf(out, "  %-6s %8zu %12.2f %12.2f %6.2fx\n", kind_names[k], pieces[k], raw[k] / 1e6,
                packed[k] / 1e6, packed[k] > 0.0 ? raw[k] / packed[k] : 0.0);
        raw_all += raw[k];
        packed_all += packed[k];
    }
    fprintf(out, "  %-6s %8zu %12.2f %12.2f %6.2fx\n", "total", m.npieces, raw_all / 1e6,
            packed_all / 1e6, packed_all > 0.0 ? raw_all / packed_all : 0.0);
    fprintf(out, "  %-12s %zu files, %zu pieces\n", "shards", m.nfiles, m.npieces);
    manifest_free(&m);
    return 0;
}

/* ---------------------------------------------------------------- whole tensors */

_Static_assert((int)CKPT_KIND_PARAM == SHARD_PARAM && (int)CKPT_KIND_M == SHARD_M &&
                   (int)CKPT_KIND_V == SHARD_V,
               "the public kinds are the manifest's");

struct ckpt_reader {
    struct manifest m;
    size_t *order; /* piece indices sorted by cmp_piece_cover */
    size_t *first; /* order[first[j * 3 + k] .. first[j * 3 + k + 1]): tensor j's kind k */
    int nthreads;
    struct piece_reader *readers; /* one per thread */
    struct bg_error err;
};

void ckpt_reader_close(ckpt_reader *r)
{
    if (!r) return;
    for (int t = 0; r->readers && t < r->nthreads; t++) reader_free(&r->readers[t]);
    free(r->readers);
    free(r->order);
    free(r->first);
    manifest_free(&r->m);
    free(r);
}

int ckpt_reader_open(ckpt_reader **out, const char *dir)
{
    *out = NULL;
    ckpt_reader *r = vd_calloc(1, sizeof *r);
    int rc = manifest_read(&r->m, dir);
    if (rc == 0) rc = manifest_check_files(&r->m);
    if (rc == 0) rc = manifest_check_coverage(&r->m, &r->order);
    if (rc != 0) {
        ckpt_reader_close(r);
        FORWARD_IF(rc);
    }
    size_t const groups = (size_t)r->m.ntensors * SHARD_NKIND;
    r->first = vd_calloc(groups + 1, sizeof *r->first);
    size_t j = 0;
    for (size_t g = 0; g < groups; g++) {
        r->first[g] = j;
        while (j < r->m.npieces &&
               (size_t)r->m.pieces[r->order[j]].tensor * SHARD_NKIND +
                       (size_t)r->m.pieces[r->order[j]].kind == g)
            j++;
    }
    r->first[groups] = j;
    r->nthreads = threads_for(SIZE_MAX);
    r->readers = vd_calloc((size_t)r->nthreads, sizeof *r->readers);
    for (int t = 0; t < r->nthreads; t++) reader_init(&r->readers[t], &r->m, &r->err);
    *out = r;
    return 0;
}

int ckpt_reader_count(const ckpt_reader *r)
{
    return r->m.ntensors;
}

const char *ckpt_reader_tensor(const ckpt_reader *r, int i, int *ndim, size_t shape[2])
{
    VD_CHECK(i >= 0 && i < r->m.ntensors, "tensor %d of %d", i, r->m.ntensors);
    const struct mtensor *t = &r->m.tensors[i];
    if (ndim) *ndim = t->ndim;
    if (shape) {
        shape[0] = t->shape[0];
        shape[1] = t->shape[1];
    }
    return t->name;
}

int ckpt_reader_read(ckpt_reader *r, int i, enum ckpt_kind kind, float *out)
{
    VD_CHECK(i >= 0 && i < r->m.ntensors && (int)kind >= 0 && (int)kind < SHARD_NKIND,
             "tensor %d of %d, kind %d", i, r->m.ntensors, (int)kind);
    const struct mtensor *t = &r->m.tensors[i];
    size_t const g = (size_t)i * SHARD_NKIND + (size_t)kind;
    size_t const lo = r->first[g], hi = r->first[g + 1];
    memset(&r->err, 0, sizeof r->err);
#pragma omp parallel num_threads((int)min_sz((size_t)r->nthreads, max_sz(1, hi - lo)))
    {
        struct piece_reader *pr = &r->readers[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
        for (size_t j = lo; j < hi; j++) {
            if (bg_failed(&r->err)) continue;
            const struct mpiece *p = &r->m.pieces[r->order[j]];
            size_t const cols = t->shape[1], pcols = p->bshape[1];
            const float *vals;
            if (p->start[1] == 0 && pcols == cols) {
                /* the block's rows are whole rows of the tensor: the piece is one run */
                reader_get(pr, r->order[j], out + p->start[0] * cols + p->a, &vals);
            } else if (reader_get(pr, r->order[j], NULL, &vals) == 0) {
                for (size_t e = p->a; e < p->b;) {
                    size_t const row = e / pcols, seg = min_sz(p->b, (row + 1) * pcols) - e;
                    memcpy(out + (p->start[0] + row) * cols + p->start[1] + e % pcols,
                           vals + (e - p->a), seg * sizeof(float));
                    e += seg;
                }
            }
        }
    }
    FORWARD_IF(bg_raise(&r->err));
    return 0;
}
