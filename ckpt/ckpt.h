/* ckpt/: files that hold tensors. For now: safetensors read (validated like the reference
 * parser) and write; later: sharded zstd checkpoints, their manifest, resharding.
 *
 * Error rule: every function that touches a file returns 0 or a negative VD_E* code with
 * a message (model.h's vd_err_*) naming the file and, where one is at fault, the tensor.
 * Writers never leave a half-written file under the final name (temporary + rename). */
#ifndef VDIST_CKPT_H
#define VDIST_CKPT_H

#include <stdio.h>

#include "model/model.h"
#include "parallel/parallel.h"

enum ckpt_dtype { CKPT_F32 = 0, CKPT_BF16 = 1, CKPT_F16 = 2, CKPT_I32 = 3, CKPT_I64 = 4 };

struct ckpt_st_tensor {
    const char *name;       /* owned by the file handle */
    enum ckpt_dtype dtype;
    int ndim;               /* 0..4 */
    size_t shape[4];
    size_t numel;
    size_t begin, end;      /* byte offsets inside the data section */
};

/* An open, validated safetensors file (memory-mapped, read-only). */
typedef struct ckpt_st_file ckpt_st_file;

/* Opens and validates: 8-byte little-endian header length, header at most 100 MB and
 * inside the file, a JSON object without duplicate names, each tensor's dtype known,
 * shape non-negative, data_offsets [begin, end] with end - begin = numel * dtype size,
 * offsets contiguous from 0 without overlap or gap and ending at the file's end,
 * `__metadata__` (optional) a map of strings. */
int ckpt_st_open(ckpt_st_file **f, const char *path);
void ckpt_st_close(ckpt_st_file *f);
int ckpt_st_count(const ckpt_st_file *f);
const struct ckpt_st_tensor *ckpt_st_get(const ckpt_st_file *f, int i);
/* Index of the tensor with this name, or -1. */
int ckpt_st_find(const ckpt_st_file *f, const char *name);
/* Value of a `__metadata__` key, or NULL. */
const char *ckpt_st_metadata(const ckpt_st_file *f, const char *key);
/* Copies the block rows [r0, r0 + nr) x cols [c0, c0 + nc) of tensor i, viewed as 2-D
 * (shape[0], numel / shape[0]; a 1-D tensor is (shape[0], 1)), converted to f32 (F32, BF16,
 * F16, I32, I64), into out (nr, nc) row-major. */
int ckpt_st_read_block(const ckpt_st_file *f, int i, float *out, size_t r0, size_t nr,
                       size_t c0, size_t nc);

struct ckpt_st_write_tensor {
    const char *name;
    int ndim;
    size_t shape[4];
    const float *data;      /* numel f32 values, row-major */
};
/* Writes tensors as F32 in the given order (metadata: n_meta key/value pairs, may be 0). */
int ckpt_st_write(const char *path, const struct ckpt_st_write_tensor *tensors, int n,
                  const char *const *meta_keys, const char *const *meta_values, int n_meta);

/* ---------------------------------------------------------------- Hugging Face weights */

/* Loads this rank's block of every tensor from a Mixtral-named safetensors file (F32 or
 * BF16). Every tensor of the file must belong to the configured model with the same
 * shape, and every model tensor must be present; an error names the tensor. */
int ckpt_load_hf(struct par_model *pm, const char *path);
/* Writes the model's parameters as Mixtral-named F32 safetensors: collective over the
 * world; every block's owner sends it to rank 0, which writes the file. The error (rank 0's
 * file error) is returned on rank 0 only: agree on it with dist_agree. */
int ckpt_export_hf(const struct par_model *pm, const char *path);

/* ---------------------------------------------------------------- sharded checkpoints */

/* A checkpoint is a directory ROOT/step_NNNNNNNN holding one zstd-compressed shard file per
 * writing rank and a manifest.json written last; a directory without a valid manifest is
 * not a checkpoint (it was cut short) and is never loaded. Every model element of the
 * parameters and both AdamW moments is written exactly once, whatever the layout: the
 * writing of replicated blocks is spread over the replicas, and under the distributed
 * optimizer each rank writes its own moment shards. Pieces are recorded by tensor name
 * and global coordinates, so a checkpoint loads into any valid layout. */

/* ckpt/shard.c. Each piece is one contiguous element range of one tensor block (row-major)
 * of one kind (param, m, v): an independent zstd frame with its content checksum, appended
 * to rank_RRRRR.zst; manifest.json (format "vdist-sharded-checkpoint", version 1) lists the
 * tensors' global shapes and every piece with its block, range, file, offset and size.
 * ckpt_save and ckpt_load are collective over the world; ckpt_latest, ckpt_prune and
 * ckpt_verify only read or change files: call ckpt_prune on one rank, ckpt_latest on any
 * (every rank sees the same answer on a shared filesystem). A failed ckpt_load leaves pm
 * as it was (it stages the values, briefly holding a second copy of this rank's
 * parameters and moments). ckpt_verify prints its summary only when the checkpoint is
 * sound; otherwise the error names the file and the piece or tensor at fault. Directories
 * named step_N.<suffix> are saves or removals cut short: never loaded, pruned once older
 * than the newest complete checkpoint. */

struct ckpt_meta {
    long step;            /* optimizer steps done: the next step to run */
    long adam_step;       /* AdamW's t */
    uint64_t seed;        /* train.seed of the run (initialisation) */
    const char *config;   /* the run's configuration, JSON text (stored verbatim) */
    const char *layout;   /* the layout that wrote it, JSON text (for the record) */
};

/* Collective over the world: writes ROOT/step_NNNNNNNN (via a temporary directory renamed
 * once complete). level: zstd level (1..19). Returns 0, or an error agreed by all ranks;
 * on error nothing is left under the final name. A step saved again is replaced whole.
 * It is ckpt_save_start then ckpt_save_finish, except that it takes no snapshot: the
 * writer reads pm, which cannot change while the caller waits. */
int ckpt_save(const struct par_model *pm, const char *root, const struct ckpt_meta *meta,
              int level);

/* Asynchronous saving (ckpt.async): the same checkpoint as ckpt_save in two collective
 * halves, so training goes on while this rank's pieces are compressed and written.
 * Memory: from start to finish a save holds a snapshot, one copy of the pieces this rank
 * writes (its share of the parameters and of both AdamW moments, 4 bytes an element, at
 * most 3 x its parameters, less where replicas share the writing or the distributed
 * optimizer shards the moments), and a compression buffer of one piece (at most ~64 MB).
 * Between the halves other collectives may run; the writer thread makes no MPI call.
 * ckpt_prune while a save is pending may remove its temporary directory when a newer
 * complete checkpoint exists (the save then fails in finish): prune after finish. */
typedef struct ckpt_pending ckpt_pending;
/* Every rank calls it. Copies this rank's pieces (params, moments) into the snapshot, and
 * meta (strings included: the caller may free them); rank 0 creates the temporary
 * directory; all ranks agree on these; then a background thread (pthread) compresses and
 * writes the shard, and it returns: pm may change, or be freed, at once. Returns 0 with
 * *out, or an error agreed by all ranks with *out NULL and nothing left on disk. */
int ckpt_save_start(const struct par_model *pm, const char *root, const struct ckpt_meta *meta,
                    int level, ckpt_pending **out);
/* Collective: waits for this rank's writer thread, agrees on errors over all ranks (the
 * writer's, e.g. a full disk, included), gathers the piece lists, rank 0 writes the
 * manifest and renames into place. Returns 0 or an agreed error, after which nothing is
 * under the final name; frees p either way. Ranks finish their pending saves in the order
 * they started them. */
int ckpt_save_finish(ckpt_pending *p);
/* Collective: loads parameters, moments and AdamW's step from a checkpoint directory into
 * pm (any layout, the model's shapes must match). *step, and the stored config (malloc'd
 * JSON text, caller frees; may be NULL) are returned. */
int ckpt_load(struct par_model *pm, const char *dir, long *step, char **config_json);
/* The newest complete checkpoint under root into out (empty when there is none). */
int ckpt_latest(const char *root, char *out, size_t cap);
/* Deletes complete checkpoints under root beyond the newest `keep` (0: keep all), and
 * incomplete ones older than the newest complete one. */
int ckpt_prune(const char *root, int keep);
/* Reads every shard, checks sizes, checksums and that the pieces cover every element of
 * every tensor exactly once; prints a summary to out. */
int ckpt_verify(const char *dir, FILE *out);

#endif
