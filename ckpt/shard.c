/* Sharded checkpoints: every rank compresses the pieces of the model it is the one writer
 * of into its own zstd file, rank 0 records them all in a manifest by tensor name and
 * global coordinates, and a checkpoint loads into any layout by copying each piece's
 * overlap with the loading rank's blocks and moment shards.
 *
 * On disk, ROOT/step_NNNNNNNN/ holds
 *   rank_RRRRR.zst  independent zstd frames (content checksum on) appended one per piece:
 *                   raw little-endian f32 values of one contiguous element range [a, b) of
 *                   one tensor block's row-major order, for one kind (param, m or v);
 *   manifest.json   written last: format, version, step, adam_step, seed, config, layout,
 *                   the tensors with global shapes, and every piece (kind, tensor, global
 *                   shape, block start and shape, range, file, byte offset and size).
 * A save writes into ROOT/step_NNNNNNNN.tmp.<pid>.<n> and renames it once the manifest is
 * durable; names of the form step_N.<anything> are leftovers that ckpt_prune removes.
 * It has two halves: start (collective: plan this rank's pieces, snapshot their values,
 * create the temporary directory, agree) hands the compressing and writing to a thread
 * that uses no MPI; finish (collective: join, agree, gather the piece lists, manifest,
 * rename) completes it. Every MPI call stays on the calling thread; the writer, like
 * the OpenMP workers, makes none.
 *
 * Who writes what, so every element is written once and the work is spread:
 *   parameters: among the replicas of a block (the dp x cp group of a dense tensor, the
 *     edp group of an expert) the replica whose group rank is the tensor's table index
 *     modulo the group size; of a tensor replicated over its shard group (norms, routers)
 *     only shard-group rank 0's replicas write;
 *   moments under the distributed optimizer: each rank its own shards (their overlap with
 *     each tensor), again only on shard-group rank 0 for replicated tensors; without it,
 *     the parameters' rule. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <limits.h>
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
#define SHARD_VERSION 1
#define SHARD_MANIFEST "manifest.json"
/* Elements per piece at most (64 MB raw): bounds the buffers a load or verify needs. */
#define SHARD_PIECE_MAX ((size_t)1 << 24)
/* Elements of one tensor at most: keeps a hostile manifest's sizes from overflowing. */
#define SHARD_NUMEL_MAX ((size_t)1 << 40)

enum shard_kind { SHARD_PARAM = 0, SHARD_M = 1, SHARD_V = 2, SHARD_NKIND = 3 };
static const char *const kind_names[SHARD_NKIND] = {"param", "m", "v"};

static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }
static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

static void format_shape(char *out, size_t cap, int ndim, const size_t *shape)
{
    if (ndim == 1) snprintf(out, cap, "[%zu]", shape[0]);
    else snprintf(out, cap, "[%zu, %zu]", shape[0], shape[1]);
}

/* ---------------------------------------------------------------- files */

/* Joins dir and name into out; VD_EINVAL when it does not fit. */
static int path_join(char *out, size_t cap, const char *dir, const char *name)
{
    int const n = snprintf(out, cap, "%s/%s", dir, name);
    RETURN_IF(n < 0 || (size_t)n >= cap, VD_EINVAL, "path %s/%s is too long", dir, name);
    return 0;
}

static int write_all(int fd, const void *buf, size_t nbytes)
{
    const char *p = buf;
    while (nbytes > 0) {
        ssize_t const w = write(fd, p, nbytes);
        if (w < 0 && errno == EINTR) continue;
        if (w == 0) errno = EIO;
        if (w <= 0) return -1;
        p += w;
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
        ssize_t const r = pread(fd, p + *got, nbytes - *got, (off_t)(offset + *got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        *got += (size_t)r;
    }
    return 0;
}

static int fsync_path(const char *path)
{
    int const fd = open(path, O_RDONLY | O_DIRECTORY);
    RETURN_IF(fd < 0, VD_EIO, "cannot open %s to sync it: %s", path, strerror(errno));
    int const rc = fsync(fd);
    int const err = errno;
    close(fd);
    RETURN_IF(rc != 0, VD_EIO, "cannot sync %s: %s", path, strerror(err));
    return 0;
}

/* mkdir -p. */
static int make_dirs(const char *path)
{
    char buf[PATH_MAX];
    int const n = snprintf(buf, sizeof buf, "%s", path);
    RETURN_IF(n < 0 || (size_t)n >= sizeof buf, VD_EINVAL, "path %s is too long", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            RETURN_ERR(VD_EIO, "cannot create checkpoint directory %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0777) != 0 && errno != EEXIST)
        RETURN_ERR(VD_EIO, "cannot create checkpoint directory %s: %s", buf, strerror(errno));
    struct stat st;
    RETURN_IF(stat(buf, &st) != 0 || !S_ISDIR(st.st_mode), VD_EIO,
              "checkpoint directory %s is not a directory", buf);
    return 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* rm -rf: 0 or -1 with errno, no message (clean-up after another error keeps that one). */
static int remove_tree_quiet(const char *path)
{
    return nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* rm -rf; 0 or VD_EIO. */
static int remove_tree(const char *path)
{
    RETURN_IF(remove_tree_quiet(path) != 0, VD_EIO, "cannot remove %s: %s", path, strerror(errno));
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
    int file_rank;         /* the rank number in the file's name */
    size_t offset, nbytes; /* the compressed frame */
};

struct manifest {
    json_t *root;
    char dir[PATH_MAX];
    char path[PATH_MAX];
    long step, adam_step;
    int ntensors;
    struct mtensor *tensors;
    int *by_name; /* tensor indices sorted by name */
    size_t npieces;
    struct mpiece *pieces;
};

static void manifest_free(struct manifest *m)
{
    json_decref(m->root);
    free(m->tensors);
    free(m->by_name);
    free(m->pieces);
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
        m->by_name[i] = i;
    }
    qsort_r(m->by_name, (size_t)m->ntensors, sizeof *m->by_name, cmp_tensor_name, m->tensors);
    for (int i = 1; i < m->ntensors; i++)
        RETURN_IF(strcmp(m->tensors[m->by_name[i - 1]].name, m->tensors[m->by_name[i]].name) == 0,
                  VD_EFORMAT, "%s: tensor '%s' is listed twice", m->path,
                  m->tensors[m->by_name[i]].name);
    return 0;
}

/* The rank of a shard file name as the writer makes them, rank_<digits>.zst, or -1. */
static int file_rank(const char *f)
{
    size_t const n = strlen(f);
    if (n < 10 || n > 20 || strncmp(f, "rank_", 5) != 0 || strcmp(f + n - 4, ".zst") != 0)
        return -1;
    long r = 0;
    for (size_t i = 5; i < n - 4; i++) {
        if (f[i] < '0' || f[i] > '9') return -1;
        r = 10 * r + (f[i] - '0');
        if (r > INT_MAX) return -1;
    }
    return (int)r;
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
    bool const block_ok = p->bshape[0] > 0 && p->bshape[1] > 0 &&
                          p->start[0] < t->shape[0] && p->bshape[0] <= t->shape[0] - p->start[0] &&
                          p->start[1] < t->shape[1] && p->bshape[1] <= t->shape[1] - p->start[1];
    RETURN_IF(!block_ok || p->a >= p->b || p->b > p->bshape[0] * p->bshape[1], VD_EFORMAT,
              "%s: piece %zu of '%s' (block at [%zu, %zu] of shape [%zu, %zu], elements [%zu, "
              "%zu)) lies outside the tensor", m->path, i, name, p->start[0], p->start[1],
              p->bshape[0], p->bshape[1], p->a, p->b);
    p->file = json_string_value(json_object_get(o, "file"));
    p->file_rank = p->file ? file_rank(p->file) : -1;
    RETURN_IF(p->file_rank < 0, VD_EFORMAT,
              "%s: piece %zu of '%s' needs a \"file\" named rank_<n>.zst", m->path, i, name);
    RETURN_IF(!json_size(o, "offset", &p->offset) || !json_size(o, "nbytes", &p->nbytes) ||
                  p->nbytes == 0 || p->nbytes > SIZE_MAX - p->offset,
              VD_EFORMAT, "%s: piece %zu of '%s' needs \"offset\" and a positive \"nbytes\"",
              m->path, i, name);
    return 0;
}

/* Reads dir's manifest and validates all but the pieces (manifest_read_pieces). */
static int manifest_open(struct manifest *m, const char *dir)
{
    memset(m, 0, sizeof *m);
    FORWARD_IF(path_join(m->path, sizeof m->path, dir, SHARD_MANIFEST));
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
    RETURN_IF(!json_is_integer(version) || json_integer_value(version) != SHARD_VERSION,
              VD_EFORMAT, "%s: checkpoint format version %lld; this vdist reads version %d",
              m->path, json_is_integer(version) ? (long long)json_integer_value(version) : -1LL,
              SHARD_VERSION);
    size_t step, adam_step;
    RETURN_IF(!json_size(m->root, "step", &step) || !json_size(m->root, "adam_step", &adam_step),
              VD_EFORMAT, "%s: \"step\" and \"adam_step\" must be non-negative integers", m->path);
    m->step = (long)step;
    m->adam_step = (long)adam_step;
    const char *dtype = json_string_value(json_object_get(m->root, "dtype"));
    RETURN_IF(!dtype || strcmp(dtype, "f32") != 0, VD_EFORMAT,
              "%s: \"dtype\" must be \"f32\"", m->path);
    FORWARD_IF(parse_tensors(m));
    return 0;
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
    return 0;
}

/* Reads and validates dir's manifest: every field the loaders use is checked here. */
static int manifest_read(struct manifest *m, const char *dir)
{
    FORWARD_IF(manifest_open(m, dir));
    FORWARD_IF(manifest_read_pieces(m));
    return 0;
}

/* Every shard file the manifest names exists and holds its pieces. */
static int manifest_files_ok(const struct manifest *m)
{
    const char *last = NULL;
    size_t size = 0;
    for (size_t i = 0; i < m->npieces; i++) {
        const struct mpiece *p = &m->pieces[i];
        if (!last || strcmp(last, p->file) != 0) {
            char path[PATH_MAX];
            FORWARD_IF(path_join(path, sizeof path, m->dir, p->file));
            struct stat st;
            RETURN_IF(stat(path, &st) != 0, VD_EIO, "%s: %s", path, strerror(errno));
            size = (size_t)st.st_size;
            last = p->file;
        }
        RETURN_IF(p->offset > size || p->nbytes > size - p->offset, VD_EFORMAT,
                  "%s/%s: %zu bytes, too short for piece %zu (bytes [%zu, %zu))", m->dir,
                  p->file, size, i, p->offset, p->offset + p->nbytes);
    }
    return 0;
}

/* Decompresses pieces, keeping the last shard file open. */
struct piece_reader {
    const struct manifest *m;
    const char *open_file;
    int fd;
    char *src;
    float *raw;
    size_t src_cap, raw_cap;
    ZSTD_DCtx *dctx;
};

static void reader_init(struct piece_reader *r, const struct manifest *m)
{
    *r = (struct piece_reader){.m = m, .fd = -1, .dctx = ZSTD_createDCtx()};
    VD_CHECK(r->dctx != NULL, "out of memory creating a zstd context");
}

static void reader_free(struct piece_reader *r)
{
    if (r->fd >= 0) close(r->fd);
    free(r->src);
    free(r->raw);
    ZSTD_freeDCtx(r->dctx);
}

/* The values of piece i in *out (valid until the next call). A frame that does not
 * decompress to exactly the piece's values, or whose checksum fails, is an error naming
 * the file and the piece. */
static int reader_get(struct piece_reader *r, size_t i, const float **out)
{
    const struct mpiece *p = &r->m->pieces[i];
    const char *name = r->m->tensors[p->tensor].name;
    char path[PATH_MAX];
    FORWARD_IF(path_join(path, sizeof path, r->m->dir, p->file));
    if (!r->open_file || strcmp(r->open_file, p->file) != 0) {
        if (r->fd >= 0) close(r->fd);
        r->open_file = NULL;
        r->fd = open(path, O_RDONLY);
        RETURN_IF(r->fd < 0, VD_EIO, "cannot open checkpoint shard %s: %s", path, strerror(errno));
        r->open_file = p->file;
    }
    size_t const raw_n = p->b - p->a;
    if (p->nbytes > r->src_cap) {
        free(r->src);
        r->src_cap = p->nbytes;
        r->src = vd_alloc(r->src_cap);
    }
    if (raw_n > r->raw_cap) {
        free(r->raw);
        r->raw_cap = raw_n;
        r->raw = vd_alloc(raw_n * sizeof(float));
    }
    size_t got = 0;
    RETURN_IF(read_at(r->fd, r->src, p->nbytes, p->offset, &got) != 0, VD_EIO,
              "cannot read checkpoint shard %s: %s", path, strerror(errno));
    RETURN_IF(got != p->nbytes, VD_EFORMAT,
              "%s: file cut short: piece %zu (%s of '%s') needs bytes [%zu, %zu)", path, i,
              kind_names[p->kind], name, p->offset, p->offset + p->nbytes);
    size_t const frame = ZSTD_findFrameCompressedSize(r->src, p->nbytes);
    unsigned long long const content = ZSTD_getFrameContentSize(r->src, p->nbytes);
    size_t const n = ZSTD_isError(frame) || frame != p->nbytes || content != raw_n * sizeof(float)
                         ? 0
                         : ZSTD_decompressDCtx(r->dctx, r->raw, raw_n * sizeof(float), r->src,
                                               p->nbytes);
    RETURN_IF(n != raw_n * sizeof(float), VD_EFORMAT,
              "%s: piece %zu (%s of '%s', elements [%zu, %zu) of its block, bytes [%zu, %zu)) "
              "is corrupt: %s", path, i, kind_names[p->kind], name, p->a, p->b, p->offset,
              p->offset + p->nbytes,
              ZSTD_isError(n) ? ZSTD_getErrorName(n)
              : ZSTD_isError(frame) ? ZSTD_getErrorName(frame)
                                    : "the frame's size does not match the manifest");
    *out = r->raw;
    return 0;
}

/* ---------------------------------------------------------------- who holds and writes what */

/* Whether this rank's block of t is the copy its shard group contributes: a tensor
 * replicated over that group (norms, routers) only on the group's rank 0. */
static bool shard_lead(const struct par_model *pm, const struct model_tensor *t)
{
    int const shard_rank = t->group == MODEL_GROUP_TP ? pm->groups.tp.rank : pm->groups.etp.rank;
    return t->shard != MODEL_SHARD_NONE || shard_rank == 0;
}

/* Whether this rank writes the whole block of tensor i (parameters; moments without the
 * distributed optimizer): one replica per tensor, chosen by the tensor's index so the
 * replicas share the work. */
static bool writes_block(const struct par_model *pm, int i)
{
    const struct model_tensor *t = &pm->tab.t[i];
    const struct dist_group *rep = t->is_expert ? &pm->groups.edp : &pm->groups.dpcp;
    return shard_lead(pm, t) && i % rep->size == rep->rank;
}

/* The moment elements of t this rank holds: block elements [*ea, *eb), element ea stored
 * at adam_m/adam_v + *at. False when it holds none. */
static bool moment_span(const struct par_model *pm, const struct model_tensor *t, size_t *ea,
                        size_t *eb, size_t *at)
{
    const struct par_range *r = t->is_expert ? &pm->expert : &pm->dense;
    const struct dist_group *g = t->is_expert ? &pm->groups.edp : &pm->groups.dpcp;
    size_t const lo =
        r->begin + (pm->opt.distributed_optimizer ? (size_t)g->rank * r->shard_len : 0);
    size_t const hi = lo + r->shard_len;
    size_t const t0 = t->offset, t1 = t->offset + t->numel;
    if (t1 <= lo || t0 >= hi) return false;
    size_t const s0 = max_sz(t0, lo), s1 = min_sz(t1, hi);
    *ea = s0 - t0;
    *eb = s1 - t0;
    *at = r->state_offset + (s0 - lo);
    return true;
}

/* What this rank needs (load) of one kind of tensor t: block elements [ea, eb), element
 * ea at `at` in the kind's buffer. */
struct need {
    bool any;
    size_t ea, eb, at;
};

static struct need need_of(const struct par_model *pm, const struct model_tensor *t, int kind)
{
    struct need n = {.any = true, .ea = 0, .eb = t->numel, .at = t->offset};
    if (kind != SHARD_PARAM) n.any = moment_span(pm, t, &n.ea, &n.eb, &n.at);
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
 * written. */
struct plan_piece {
    int kind;
    int tensor;
    size_t a, b;
    const float *src;
    size_t offset, nbytes;
};

/* The writer thread's first error. It is kept here, not recorded with vd_err_set, whose
 * message is one global the training thread may set meanwhile; finish raises it. */
struct bg_error {
    int code; /* 0: none */
    const char *file;
    int line;
    char msg[2048];
};

/* A save between start and finish. start fills everything; while the writer thread runs it
 * reads the rest and writes only the pieces' offset and nbytes and err, which the calling
 * thread reads after joining it. */
struct ckpt_pending {
    char root[PATH_MAX], tmp[PATH_MAX], final[PATH_MAX], aside[PATH_MAX];
    char shard[PATH_MAX]; /* tmp/file */
    char file[32];        /* rank_RRRRR.zst */
    struct model_config cfg;
    struct ckpt_meta meta; /* its strings are config and layout, copies owned here */
    char *config, *layout;
    struct model_tensor *tensors; /* pm's table, copied: pm need not outlive the save */
    int ntensors;
    struct plan_piece *pieces;
    size_t npieces;
    float *snapshot; /* the pieces' values; NULL when they point into pm (ckpt_save) */
    ZSTD_CCtx *cctx;
    char *dst; /* one compressed piece */
    size_t dst_cap;
    pthread_t writer;
    bool writer_started;
    struct bg_error err;
};

static void pending_free(struct ckpt_pending *p)
{
    free(p->config);
    free(p->layout);
    free(p->tensors);
    free(p->pieces);
    free(p->snapshot);
    ZSTD_freeCCtx(p->cctx);
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
        if (writes_block(pm, i))
            plan_range(p, &cap, SHARD_PARAM, i, pm->params + t->offset, 0, t->numel);
        for (int k = SHARD_M; k <= SHARD_V; k++) {
            if (!pm->opt.distributed_optimizer) {
                if (writes_block(pm, i))
                    plan_range(p, &cap, k, i, state[k] + t->offset, 0, t->numel);
                continue;
            }
            size_t ea, eb, at;
            if (shard_lead(pm, t) && moment_span(pm, t, &ea, &eb, &at))
                plan_range(p, &cap, k, i, state[k] + at, ea, eb);
        }
    }
}

/* Copies every piece's values into one private buffer and points the pieces at it. */
static int snapshot_take(struct ckpt_pending *p)
{
    size_t *at = vd_calloc(p->npieces + 1, sizeof *at);
    size_t len = 0;
    for (size_t i = 0; i < p->npieces; i++) {
        at[i] = len;
        len += p->pieces[i].b - p->pieces[i].a;
    }
    p->snapshot = len ? malloc(len * sizeof(float)) : NULL;
    if (len && !p->snapshot) {
        free(at);
        RETURN_ERR(VD_ENOMEM, "cannot allocate %.1f MB for the snapshot of checkpoint step %ld "
                   "(a copy of the parameters and moments this rank writes); save "
                   "synchronously or free memory", (double)len * sizeof(float) / 1e6,
                   p->meta.step);
    }
    /* training waits for this copy: spread it over the threads */
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t i = 0; i < p->npieces; i++) {
        struct plan_piece *q = &p->pieces[i];
        memcpy(p->snapshot + at[i], q->src, (q->b - q->a) * sizeof(float));
        q->src = p->snapshot + at[i];
    }
    free(at);
    return 0;
}

/* The compression context and a buffer for the largest piece, so the writer allocates
 * nothing. */
static int writer_prepare(struct ckpt_pending *p, int level)
{
    p->cctx = ZSTD_createCCtx();
    VD_CHECK(p->cctx != NULL, "out of memory creating a zstd context");
    size_t const zrc1 = ZSTD_CCtx_setParameter(p->cctx, ZSTD_c_compressionLevel, level);
    size_t const zrc2 = ZSTD_CCtx_setParameter(p->cctx, ZSTD_c_checksumFlag, 1);
    VD_CHECK(!ZSTD_isError(zrc1) && !ZSTD_isError(zrc2), "zstd refuses level %d", level);
    size_t largest = 0;
    for (size_t i = 0; i < p->npieces; i++)
        largest = max_sz(largest, p->pieces[i].b - p->pieces[i].a);
    if (largest == 0) return 0;
    p->dst_cap = ZSTD_compressBound(largest * sizeof(float));
    p->dst = malloc(p->dst_cap);
    RETURN_IF(!p->dst, VD_ENOMEM, "cannot allocate %zu bytes to compress checkpoint pieces",
              p->dst_cap);
    return 0;
}

__attribute__((format(printf, 5, 6))) static int bg_fail(struct bg_error *e, int code,
                                                         const char *file, int line,
                                                         const char *fmt, ...)
{
    if (e->code != 0) return code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->code = code;
    e->file = file;
    e->line = line;
    return code;
}
#define BG_FAIL(p, code, ...) bg_fail(&(p)->err, (code), __FILE__, __LINE__, __VA_ARGS__)

/* The writer thread's work: each piece one zstd frame appended to the shard file (made at
 * the first piece, so a rank without pieces has none), then fsync. It calls no MPI, no
 * vd_err_* and nothing that aborts; its only outputs are the pieces' offset and nbytes
 * and p->err. strerror_r: strerror's buffer is not the thread's own. */
static void shard_write(struct ckpt_pending *p)
{
    if (p->npieces == 0) return;
    char why[256];
    int const fd = open(p->shard, O_WRONLY | O_CREAT | O_EXCL, 0666);
    if (fd < 0) {
        BG_FAIL(p, VD_EIO, "cannot create checkpoint shard %s: %s", p->shard,
                strerror_r(errno, why, sizeof why));
        return;
    }
    int rc = 0;
    size_t offset = 0;
    for (size_t i = 0; rc == 0 && i < p->npieces; i++) {
        struct plan_piece *q = &p->pieces[i];
        size_t const nbytes = ZSTD_compress2(p->cctx, p->dst, p->dst_cap, q->src,
                                             (q->b - q->a) * sizeof(float));
        if (ZSTD_isError(nbytes))
            rc = BG_FAIL(p, VD_EIO, "%s: compressing %s of '%s' failed: %s", p->shard,
                         kind_names[q->kind], p->tensors[q->tensor].name,
                         ZSTD_getErrorName(nbytes));
        else if (write_all(fd, p->dst, nbytes) != 0)
            rc = BG_FAIL(p, VD_EIO, "cannot write checkpoint shard %s: %s", p->shard,
                         strerror_r(errno, why, sizeof why));
        else {
            q->offset = offset;
            q->nbytes = nbytes;
            offset += nbytes;
        }
    }
    if (rc == 0 && fsync(fd) != 0)
        rc = BG_FAIL(p, VD_EIO, "cannot sync checkpoint shard %s: %s", p->shard,
                     strerror_r(errno, why, sizeof why));
    if (close(fd) != 0 && rc == 0)
        BG_FAIL(p, VD_EIO, "cannot close checkpoint shard %s: %s", p->shard,
                strerror_r(errno, why, sizeof why));
}

static void *writer_main(void *arg)
{
    shard_write(arg);
    return NULL;
}

/* Starts the writer with every signal blocked: signals meant for the process go to the
 * training thread, and a file size limit fails the write (EFBIG) instead of killing the
 * process with SIGXFSZ. A thread that cannot start is the save's error, raised by finish
 * like the writer's own. */
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
        BG_FAIL(p, VD_EIO, "cannot start the checkpoint writer thread: %s",
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
        json_t *o = json_pack("{s:s, s:s, s:o, s:[II], s:[II], s:[II], s:s, s:I, s:I}",
                              "kind", kind_names[q->kind], "tensor", t->name,
                              "shape", shape_json(t),
                              "block_start", (json_int_t)t->local_start[0],
                              (json_int_t)t->local_start[1], "block_shape",
                              (json_int_t)t->local_shape[0], (json_int_t)t->local_shape[1],
                              "range", (json_int_t)q->a, (json_int_t)q->b, "file", p->file,
                              "offset", (json_int_t)q->offset, "nbytes", (json_int_t)q->nbytes);
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
        json_array_append_new(tensors,
                              json_pack("{s:s, s:o}", "name", t->name, "shape", shape_json(t)));
    }
    model_table_free(&full);
    /* jansson's integers are signed 64-bit: a seed beyond that is kept as a decimal string */
    char seed_text[32];
    snprintf(seed_text, sizeof seed_text, "%llu", (unsigned long long)meta->seed);
    json_t *seed = meta->seed <= (uint64_t)INT64_MAX ? json_integer((json_int_t)meta->seed)
                                                     : json_string(seed_text);
    size_t const count = json_array_size(pieces);
    json_t *m = json_pack("{s:s, s:i, s:I, s:I, s:o, s:s, s:o, s:o, s:o, s:I, s:o}",
                          "format", SHARD_FORMAT, "version", SHARD_VERSION,
                          "step", (json_int_t)meta->step, "adam_step", (json_int_t)meta->adam_step,
                          "seed", seed, "dtype", "f32", "config", json_text_value(meta->config),
                          "layout", json_text_value(meta->layout), "tensors", tensors,
                          "piece_count", (json_int_t)count, "pieces", pieces);
    VD_CHECK(m != NULL, "out of memory building the manifest");
    return m;
}

/* Writes the manifest durably: temporary file, fsync, rename, fsync of the directory. */
static int manifest_write(const json_t *m, const char *dir)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    FORWARD_IF(path_join(path, sizeof path, dir, SHARD_MANIFEST));
    FORWARD_IF(path_join(tmp, sizeof tmp, dir, SHARD_MANIFEST ".tmp"));
    char *text = json_dumps(m, JSON_INDENT(1));
    VD_CHECK(text != NULL, "out of memory serialising the manifest");
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    int rc = fd < 0 ? -1 : write_all(fd, text, strlen(text));
    if (rc == 0) rc = write_all(fd, "\n", 1);
    if (rc == 0) rc = fsync(fd);
    int const err = errno;
    if (fd >= 0 && close(fd) != 0 && rc == 0) rc = -1;
    free(text);
    RETURN_IF(rc != 0, VD_EIO, "cannot write %s: %s", tmp, strerror(err ? err : errno));
    RETURN_IF(rename(tmp, path) != 0, VD_EIO, "cannot rename %s to %s: %s", tmp, path,
              strerror(errno));
    FORWARD_IF(fsync_path(dir));
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
    if (fsync_path(root) != 0) fprintf(stderr, "vdist: warning: %s\n", vd_err_msg());
    /* an old checkpoint left behind is only disk space: its name is step_N.<suffix>, which
     * ckpt_prune removes */
    if (old && remove_tree(old) != 0) fprintf(stderr, "vdist: warning: %s\n", vd_err_msg());
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
    snprintf(name, sizeof name, "step_%08ld", meta->step);
    if (rc == 0) rc = path_join(p->final, sizeof p->final, root, name);
    snprintf(name, sizeof name, "step_%08ld.tmp.%s", meta->step, suffix);
    if (rc == 0) rc = path_join(p->tmp, sizeof p->tmp, root, name);
    snprintf(name, sizeof name, "step_%08ld.old.%s", meta->step, suffix);
    if (rc == 0) rc = path_join(p->aside, sizeof p->aside, root, name);
    snprintf(p->file, sizeof p->file, "rank_%05d.zst", world->rank);
    if (rc == 0) rc = path_join(p->shard, sizeof p->shard, p->tmp, p->file);
    p->cfg = pm->cfg;
    p->meta = *meta;
    p->config = meta->config ? strdup(meta->config) : NULL;
    p->layout = meta->layout ? strdup(meta->layout) : NULL;
    VD_CHECK((p->config || !meta->config) && (p->layout || !meta->layout),
             "out of memory copying the checkpoint's metadata");
    p->meta.config = p->config;
    p->meta.layout = p->layout;
    p->ntensors = pm->tab.count;
    p->tensors = vd_calloc((size_t)p->ntensors + 1, sizeof *p->tensors);
    memcpy(p->tensors, pm->tab.t, (size_t)p->ntensors * sizeof *p->tensors);
    plan_pieces(p, pm);

    bool made = false;
    if (rc == 0 && world->rank == 0) {
        rc = make_dirs(root);
        if (rc == 0 && mkdir(p->tmp, 0777) != 0)
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot create checkpoint directory %s: %s",
                            p->tmp, strerror(errno));
        made = rc == 0;
    }
    if (rc == 0 && snapshot) rc = snapshot_take(p);
    if (rc == 0) rc = writer_prepare(p, level);
    rc = dist_agree(world, rc);
    if (rc != 0) {
        if (made) remove_tree_quiet(p->tmp);
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
    int rc = p->err.code != 0
                 ? vd_err_set(p->err.code, p->err.file, p->err.line, "%s", p->err.msg)
                 : 0;
    /* Every shard is durable (or some rank failed) before rank 0 writes the manifest. */
    rc = dist_agree(world, rc);
    if (rc == 0) {
        json_t *mine = pieces_json(p);
        json_t *pieces = gather_pieces(mine);
        json_decref(mine);
        if (world->rank == 0) {
            json_t *m = manifest_build(&p->cfg, &p->meta, pieces);
            rc = manifest_write(m, p->tmp);
            json_decref(m);
            if (rc == 0) rc = publish(p->tmp, p->final, p->root, p->aside);
        }
    }
    if (rc != 0 && world->rank == 0) remove_tree_quiet(p->tmp);
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

/* Copies the elements of piece p (values src) that fall in need n of this rank's block of
 * t: block element e goes to dst[e - n->ea], counted in cov[e - n->ea]. Pieces and blocks
 * meet in row segments: piece element i is global (r0 + i / cols, c0 + i % cols). */
static void copy_overlap(const struct mpiece *p, const float *src, const struct model_tensor *t,
                         const struct need *n, float *dst, unsigned char *cov)
{
    size_t const pcols = p->bshape[1];
    size_t const lr0 = t->local_start[0], lc0 = t->local_start[1];
    size_t const lrows = t->local_shape[0], lcols = t->local_shape[1];
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
        memcpy(dst + (k0 - n->ea), src + s0, (k1 - k0) * sizeof(float));
        for (size_t e = k0; e < k1; e++)
            if (cov[e - n->ea] < 2) cov[e - n->ea]++;
    }
}

/* Every needed element of every local tensor and kind covered exactly once. */
static int check_coverage(const struct par_model *pm, const struct manifest *m,
                          unsigned char *const cov[SHARD_NKIND])
{
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        for (int k = 0; k < SHARD_NKIND; k++) {
            struct need const n = need_of(pm, t, k);
            if (!n.any) continue;
            size_t missing = 0, twice = 0;
            for (size_t e = 0; e < n.eb - n.ea; e++) {
                missing += cov[k][n.at + e] == 0;
                twice += cov[k][n.at + e] > 1;
            }
            RETURN_IF(missing || twice, VD_EFORMAT,
                      "%s: %s of tensor '%s': of this rank's block at (%zu, %zu) of shape "
                      "(%zu, %zu), %zu elements are in no piece and %zu in more than one",
                      m->path,
                      kind_names[k], t->name, t->local_start[0], t->local_start[1],
                      t->local_shape[0], t->local_shape[1], missing, twice);
        }
    }
    return 0;
}

/* Reads every piece that meets what this rank holds into the staging buffers. */
static int load_pieces(const struct par_model *pm, const struct manifest *m,
                       float *const dst[SHARD_NKIND], unsigned char *const cov[SHARD_NKIND])
{
    int *local_of = vd_calloc((size_t)m->ntensors + 1, sizeof *local_of);
    for (int j = 0; j < m->ntensors; j++) local_of[j] = -1;
    for (int i = 0; i < pm->tab.count; i++) {
        int const j = manifest_find(m, pm->tab.t[i].name);
        if (j >= 0) local_of[j] = i;
    }
    struct piece_reader r;
    reader_init(&r, m);
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < m->npieces; i++) {
        const struct mpiece *p = &m->pieces[i];
        int const li = local_of[p->tensor];
        if (li < 0) continue;
        const struct model_tensor *t = &pm->tab.t[li];
        struct need const n = need_of(pm, t, p->kind);
        if (!n.any || !piece_may_overlap(p, t, &n)) continue;
        const float *vals;
        rc = reader_get(&r, i, &vals);
        if (rc == 0) copy_overlap(p, vals, t, &n, dst[p->kind] + n.at, cov[p->kind] + n.at);
    }
    reader_free(&r);
    free(local_of);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_load(struct par_model *pm, const char *dir, long *step, char **config_json)
{
    if (config_json) *config_json = NULL;
    struct manifest m;
    int rc = manifest_open(&m, dir);
    if (rc == 0) rc = check_model(&m, &pm->cfg); /* before the pieces: names the cause */
    if (rc == 0) rc = manifest_read_pieces(&m);
    /* Staged, so a failed load leaves pm as it was; padding keeps pm's values. */
    size_t const len[SHARD_NKIND] = {pm->tab.numel, pm->state_len, pm->state_len};
    float *const cur[SHARD_NKIND] = {pm->params, pm->adam_m, pm->adam_v};
    float *dst[SHARD_NKIND] = {NULL};
    unsigned char *cov[SHARD_NKIND] = {NULL};
    for (int k = 0; rc == 0 && k < SHARD_NKIND; k++) {
        dst[k] = vd_alloc(len[k] * sizeof(float));
        memcpy(dst[k], cur[k], len[k] * sizeof(float));
        cov[k] = vd_calloc(len[k], 1);
    }
    if (rc == 0) rc = load_pieces(pm, &m, dst, cov);
    if (rc == 0) rc = check_coverage(pm, &m, cov);
    rc = dist_agree(dist_world(), rc);
    if (rc == 0) {
        for (int k = 0; k < SHARD_NKIND; k++) memcpy(cur[k], dst[k], len[k] * sizeof(float));
        pm->adam_step = m.adam_step;
        if (step) *step = m.step;
        const json_t *c = json_object_get(m.root, "config");
        if (config_json && c && !json_is_null(c)) {
            *config_json = json_is_string(c) ? strdup(json_string_value(c))
                                             : json_dumps(c, JSON_COMPACT | JSON_ENCODE_ANY);
            VD_CHECK(*config_json != NULL, "out of memory copying the checkpoint's config");
        }
    }
    for (int k = 0; k < SHARD_NKIND; k++) {
        free(dst[k]);
        free(cov[k]);
    }
    manifest_free(&m);
    FORWARD_IF(rc);
    return 0;
}

/* ---------------------------------------------------------------- latest, prune, verify */

/* Whether root/name is a complete checkpoint of step `step`. */
static bool is_complete(const char *root, const char *name, long step)
{
    char dir[PATH_MAX];
    if (path_join(dir, sizeof dir, root, name) != 0) return false;
    struct manifest m;
    bool const ok = manifest_read(&m, dir) == 0 && m.step == step && manifest_files_ok(&m) == 0;
    manifest_free(&m);
    return ok;
}

struct step_entry {
    char name[256];
    long step;
    bool complete;
};

/* The directories under root named step_N or step_N.<suffix>; *n = 0 when root does not
 * exist. */
static int list_steps(const char *root, struct step_entry **out, size_t *n)
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
            path_join(path, sizeof path, root, e->d_name) != 0 || lstat(path, &st) != 0 ||
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
        s->complete = exact && is_complete(root, e->d_name, step);
    }
    closedir(d);
    return 0;
}

int ckpt_latest(const char *root, char *out, size_t cap)
{
    RETURN_IF(cap == 0, VD_EINVAL, "no room for the checkpoint path");
    out[0] = '\0';
    struct step_entry *s;
    size_t n;
    FORWARD_IF(list_steps(root, &s, &n));
    long best = -1;
    const char *name = NULL;
    for (size_t i = 0; i < n; i++)
        if (s[i].complete && s[i].step > best) {
            best = s[i].step;
            name = s[i].name;
        }
    int rc = name ? path_join(out, cap, root, name) : 0;
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

int ckpt_prune(const char *root, int keep)
{
    RETURN_IF(keep < 0, VD_EINVAL, "ckpt.keep = %d; allowed are 0 (keep all) or more", keep);
    struct step_entry *s;
    size_t n;
    FORWARD_IF(list_steps(root, &s, &n));
    qsort(s, n, sizeof *s, cmp_step_desc);
    long newest = -1;
    for (size_t i = 0; i < n && newest < 0; i++)
        if (s[i].complete) newest = s[i].step;
    int rc = 0, kept = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char path[PATH_MAX], gone[PATH_MAX], name[300];
        rc = path_join(path, sizeof path, root, s[i].name);
        if (rc != 0) break;
        if (s[i].complete) {
            if (keep == 0 || kept++ < keep) continue;
            /* Renamed first, so a removal cut short never leaves a checkpoint-like name. */
            snprintf(name, sizeof name, "step_%08ld.del.%ld", s[i].step, (long)getpid());
            rc = path_join(gone, sizeof gone, root, name);
            if (rc == 0 && rename(path, gone) != 0)
                rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot rename %s to %s: %s", path,
                                gone, strerror(errno));
            if (rc == 0) rc = remove_tree(gone);
        } else if (s[i].step < newest) {
            rc = remove_tree(path);
        }
    }
    free(s);
    FORWARD_IF(rc);
    return 0;
}

/* Piece indices sorted by (tensor, kind), for the coverage check. */
static int cmp_piece(const void *x, const void *y, void *base)
{
    const struct mpiece *pieces = base;
    const struct mpiece *a = &pieces[*(const size_t *)x], *b = &pieces[*(const size_t *)y];
    if (a->tensor != b->tensor) return (a->tensor > b->tensor) - (a->tensor < b->tensor);
    return (a->kind > b->kind) - (a->kind < b->kind);
}

/* Each element of each tensor, per kind, in exactly one piece (global coordinates). */
static int verify_coverage(const struct manifest *m)
{
    size_t *order = vd_calloc(m->npieces + 1, sizeof *order);
    for (size_t i = 0; i < m->npieces; i++) order[i] = i;
    qsort_r(order, m->npieces, sizeof *order, cmp_piece, m->pieces);
    int rc = 0;
    size_t next = 0;
    for (int j = 0; rc == 0 && j < m->ntensors; j++) {
        const struct mtensor *t = &m->tensors[j];
        size_t const numel = t->shape[0] * t->shape[1];
        unsigned char *cov = vd_alloc(numel);
        for (int k = 0; rc == 0 && k < SHARD_NKIND; k++) {
            memset(cov, 0, numel);
            for (; next < m->npieces && m->pieces[order[next]].tensor == j &&
                   m->pieces[order[next]].kind == k;
                 next++) {
                const struct mpiece *p = &m->pieces[order[next]];
                for (size_t i = p->a; i < p->b; i++) {
                    size_t const g = (p->start[0] + i / p->bshape[1]) * t->shape[1] +
                                     p->start[1] + i % p->bshape[1];
                    if (cov[g] < 2) cov[g]++;
                }
            }
            size_t missing = 0, twice = 0;
            for (size_t g = 0; g < numel; g++) {
                missing += cov[g] == 0;
                twice += cov[g] > 1;
            }
            if (missing || twice)
                rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                                "%s: %s of tensor '%s': %zu of its %zu elements are in no piece "
                                "and %zu in more than one", m->path, kind_names[k], t->name,
                                missing, numel, twice);
        }
        free(cov);
    }
    free(order);
    FORWARD_IF(rc);
    return 0;
}

/* Each shard file is exactly its pieces, back to back. */
static int verify_file_sizes(const struct manifest *m)
{
    int top = -1;
    for (size_t i = 0; i < m->npieces; i++)
        if (m->pieces[i].file_rank > top) top = m->pieces[i].file_rank;
    size_t *sum = vd_calloc((size_t)top + 2, sizeof *sum);
    size_t *first = vd_calloc((size_t)top + 2, sizeof *first);
    for (size_t i = m->npieces; i-- > 0;) {
        sum[m->pieces[i].file_rank] += m->pieces[i].nbytes;
        first[m->pieces[i].file_rank] = i;
    }
    int rc = 0;
    for (int r = 0; rc == 0 && r <= top; r++) {
        if (sum[r] == 0) continue;
        char path[PATH_MAX];
        struct stat st;
        rc = path_join(path, sizeof path, m->dir, m->pieces[first[r]].file);
        if (rc == 0 && stat(path, &st) != 0)
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "%s: %s", path, strerror(errno));
        else if (rc == 0 && (size_t)st.st_size != sum[r])
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "%s: %zu bytes, but its pieces in the manifest add up to %zu", path,
                            (size_t)st.st_size, sum[r]);
    }
    free(sum);
    free(first);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_verify(const char *dir, FILE *out)
{
    struct manifest m;
    int rc = manifest_read(&m, dir);
    if (rc == 0) rc = verify_coverage(&m);
    if (rc == 0) rc = verify_file_sizes(&m);
    double raw = 0.0, packed = 0.0;
    if (rc == 0) {
        struct piece_reader r;
        reader_init(&r, &m);
        for (size_t i = 0; rc == 0 && i < m.npieces; i++) {
            const float *vals;
            rc = reader_get(&r, i, &vals);
            raw += (double)(m.pieces[i].b - m.pieces[i].a) * sizeof(float);
            packed += (double)m.pieces[i].nbytes;
        }
        reader_free(&r);
    }
    if (rc == 0)
        fprintf(out, "%s: %d tensors, %zu pieces, %.2f MB raw, %.2f MB compressed (%.2fx), OK\n",
                dir, m.ntensors, m.npieces, raw / 1e6, packed / 1e6,
                packed > 0.0 ? raw / packed : 0.0);
    manifest_free(&m);
    FORWARD_IF(rc);
    return 0;
}
