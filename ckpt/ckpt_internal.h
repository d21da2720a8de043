/* Shared between the files of ckpt/'s sharded checkpoints only: manifest.c (the manifest
 * read side, reading pieces, verify, inspect), ckpt_save.c, ckpt_load.c (and whole tensors),
 * ckpt_dir.c (latest, previous, prune, cleanup). Other folders include ckpt/ckpt.h.
 *
 * Sharded checkpoints: every rank compresses the pieces of the model it is the one writer
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
 * and ROOT/latest holds the name of the checkpoint committed last. Names of the form
 * step_N.<anything> are leftovers of saves and removals cut short (ckpt_dir.c). */
#ifndef VDIST_CKPT_INTERNAL_H
#define VDIST_CKPT_INTERNAL_H

#include <jansson.h>
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <zstd.h>

#include "ckpt/ckpt.h"

#define SHARD_FORMAT "vdist-sharded-checkpoint"
/* Version 2 added each piece's raw_nbytes and checksum, each tensor's dtype and the
 * training state; version 1 checkpoints still load (without the manifest's checksums). */
#define SHARD_VERSION 2
#define SHARD_MANIFEST "manifest.json"
#define SHARD_LATEST "latest"

enum shard_kind { SHARD_PARAM = 0, SHARD_M = 1, SHARD_V = 2, SHARD_NKIND = 3 };
/* "param", "m", "v": the manifest's names of the kinds. */
extern const char *const ckpt_kind_names[SHARD_NKIND];

static inline size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }
static inline size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

static inline void format_shape(char *out, size_t cap, int ndim, const size_t *shape)
{
    if (ndim == 1) snprintf(out, cap, "[%zu]", shape[0]);
    else snprintf(out, cap, "[%zu, %zu]", shape[0], shape[1]);
}

static inline uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Threads for n independent pieces of work: OpenMP's, at most n, at least 1. */
int ckpt_threads_for(size_t n);

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

/* Records the error in e unless one is there already; returns code. Any thread. */
int ckpt_bg_fail(struct bg_error *e, int code, const char *file, int line, const char *fmt,
                 ...) __attribute__((format(printf, 5, 6)));
#define BG_FAIL(e, code, ...) ckpt_bg_fail((e), (code), __FILE__, __LINE__, __VA_ARGS__)

static inline bool bg_failed(const struct bg_error *e)
{
    return __atomic_load_n(&e->code, __ATOMIC_ACQUIRE) != 0;
}

/* The recorded error as vd_err's, or 0. Calling thread only. */
static inline int bg_raise(const struct bg_error *e)
{
    return e->code ? vd_err_set(e->code, e->file, e->line, "%s", e->msg) : 0;
}

/* ---------------------------------------------------------------- files */

/* Reads exactly nbytes at offset; -1 with errno, or 0 with *got < nbytes at the file's end. */
int ckpt_read_at(int fd, void *buf, size_t nbytes, size_t offset, size_t *got);
/* rm -rf; 0 or VD_EIO. */
int ckpt_remove_tree(const char *path);

/* One contiguous copy. */
struct copy_range {
    float *dst;
    const float *src;
    size_t n;
};
/* Copies every range, spread over the threads in chunks of SHARD_COPY_CHUNK elements, so
 * the copy (and the page faults of a fresh destination) runs at the machine's memory speed
 * rather than one core's (ckpt_save.c). */
void ckpt_copy_ranges(const struct copy_range *r, size_t n);

/* ---------------------------------------------------------------- manifest, read side (manifest.c) */

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

/* Reads and validates dir's manifest: every field the loaders use is checked here. Free m
 * with ckpt_manifest_free whether it succeeded or not. */
int ckpt_manifest_read(struct manifest *m, const char *dir);
/* ckpt_manifest_read in two steps: the first reads dir's manifest and validates all but
 * the pieces, the second validates every piece against the tensor list. */
int ckpt_manifest_open(struct manifest *m, const char *dir);
int ckpt_manifest_read_pieces(struct manifest *m);
void ckpt_manifest_free(struct manifest *m);
/* Index of the manifest tensor with this name, or -1. */
int ckpt_manifest_find(const struct manifest *m, const char *name);
/* Every shard file the manifest names exists and is exactly its pieces, back to back. */
int ckpt_manifest_check_files(const struct manifest *m);
/* Each element of each tensor, per kind, in exactly one piece. *order_out (optional): the
 * piece indices sorted by (tensor, kind, block, range start), the caller's to free. */
int ckpt_manifest_check_coverage(const struct manifest *m, size_t **order_out);

/* ---------------------------------------------------------------- reading pieces (manifest.c) */

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

void ckpt_piece_reader_init(struct piece_reader *r, const struct manifest *m,
                            struct bg_error *err);
void ckpt_piece_reader_free(struct piece_reader *r);
/* Piece i's values, decompressed into `into` (raw_nbytes bytes) or, when it is NULL, into
 * the reader's buffer; *out points at them (valid until the next call). The frame is read
 * only once the file is known to hold it, and checked before anything is sized by it: its
 * length, the content size in its header, its checksum against the manifest's; zstd then
 * checks the content against the checksum. An error names the file and the piece. */
int ckpt_piece_reader_get(struct piece_reader *r, size_t i, float *into, const float **out);

#endif
