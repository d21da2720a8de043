/* ckpt/: files that hold tensors. For now: safetensors read (validated like the reference
 * parser) and write; later: sharded zstd checkpoints, their manifest, resharding.
 *
 * Error rule: every function that touches a file returns 0 or a negative VD_E* code with
 * a message (base.h's vd_err_*) naming the file and, where one is at fault, the tensor.
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

/* The file helpers are base's (vd_make_dirs, vd_sync_dir, vd_remove_tree_quiet in
 * base/base.h); this old name stays only until launch/train.c calls vd_make_dirs. */
static inline int ckpt_make_dirs(const char *path) { return vd_make_dirs(path); }

/* ---------------------------------------------------------------- Hugging Face weights */

/* Loads this rank's block of every tensor from Mixtral-named safetensors (F32 or BF16):
 * one file, a Hugging Face model.safetensors.index.json with its shards, or a directory
 * holding either. Every tensor of the file must belong to the configured model with the same
 * shape, and every model tensor must be present; an error names the tensor. */
int ckpt_load_hf(struct par_model *pm, const char *path);
/* Writes the model's parameters as Mixtral-named F32 safetensors: collective over the
 * world; every block's owner sends it to rank 0, which writes the file. The error (rank 0's
 * file error) is returned on rank 0 only: agree on it with dist_agree. */
int ckpt_export_hf(const struct par_model *pm, const char *path);

/* ---------------------------------------------------------------- sharded checkpoints */

/* A checkpoint is a directory ROOT/step_NNNNNNNN holding one zstd-compressed shard file per
 * writing rank and a manifest.json written last; a directory without a valid manifest is
 * not a checkpoint (it was cut short) and is never loaded. ROOT/latest holds the name of
 * the checkpoint committed last: a save renames its directory into place, then replaces
 * latest (temporary file, rename), so a crash at any moment leaves the previous complete
 * checkpoint loadable. Every model element of the parameters and both AdamW moments is
 * written exactly once, whatever the layout: the writing of replicated blocks is spread
 * over the replicas, and under the distributed optimizer each rank writes its own moment
 * shards. Pieces are recorded by tensor name and global coordinates, so a checkpoint loads
 * into any valid layout, each rank reading only the pieces that meet its blocks. */

/* ckpt/shard.c. Each piece is one contiguous element range (at most 2^22 elements) of one
 * tensor block (row-major) of one kind (param, m, v): an independent zstd frame with its
 * content checksum, in rank_RRRRR.zst; manifest.json (format "vdist-sharded-checkpoint",
 * version 2; version 1 still loads) lists the tensors' global shapes and dtype ("F32"),
 * the training state, and every piece with its block, range, file, offset, compressed and
 * raw sizes and checksum (the frame's last 4 bytes, 8 hex digits). Saving and loading run
 * on the OpenMP threads. ckpt_save and ckpt_load are collective over the world; the other
 * functions only read or change files: call ckpt_prune and ckpt_cleanup on one rank, the
 * readers on any (every rank sees the same answer on a shared filesystem). A failed
 * ckpt_load leaves pm as it was (it stages the values, briefly holding a second copy of
 * this rank's parameters and moments). ckpt_verify prints its summary only when the
 * checkpoint is sound; otherwise the error names the file and the piece or tensor at
 * fault. Directories named step_N.<suffix> are saves or removals cut short: never loaded,
 * removed by ckpt_cleanup, and by ckpt_prune once older than the newest complete one.
 * Manifests are untrusted input: sizes and offsets are overflow-checked, and nothing is
 * allocated beyond what the shard files or the configured model justify. */

struct ckpt_meta {
    long step;            /* optimizer steps done: the next step to run */
    long adam_step;       /* AdamW's t */
    uint64_t seed;        /* train.seed of the run (initialisation) */
    const char *config;   /* the run's configuration, JSON text (stored verbatim) */
    const char *layout;   /* the layout that wrote it, JSON text (for the record) */
    const char *state;    /* training state, JSON text (e.g. {"lr": ..., "step": ...,
                           * "data_next_sequence": ...}), stored as "train_state"; may be NULL */
};

/* Collective over the world: writes ROOT/step_NNNNNNNN (via a temporary directory renamed
 * once complete), then points ROOT/latest at it. level: zstd level (1..19). Returns 0, or
 * an error agreed by all ranks; on error nothing is left under the final name and latest
 * is unchanged. A step saved again is replaced whole. It is ckpt_save_start then
 * ckpt_save_finish, except that it takes no snapshot: the writer reads pm, which cannot
 * change while the caller waits. */
int ckpt_save(const struct par_model *pm, const char *root, const struct ckpt_meta *meta,
              int level);

/* Asynchronous saving (ckpt.async): the same checkpoint as ckpt_save in two collective
 * halves, so training goes on while this rank's pieces are compressed and written.
 * Memory: from start to finish a save holds a snapshot, one copy of the pieces this rank
 * writes (its share of the parameters and of both AdamW moments, 4 bytes an element, at
 * most 3 x its parameters, less where replicas share the writing or the distributed
 * optimizer shards the moments), and per OpenMP thread a zstd context and a buffer of one
 * compressed piece (~16 MB). The snapshot buffer is kept after finish for the next start
 * (whose copy then runs at memory speed, without page faults) until ckpt_save_release.
 * Between the halves other collectives may run; the writer thread makes no MPI call. It
 * compresses on as many OpenMP threads as the caller of start has, alongside training's.
 * ckpt_prune while a save is pending may remove its temporary directory when a newer
 * complete checkpoint exists (the save then fails in finish): prune after finish. */
typedef struct ckpt_pending ckpt_pending;
/* Every rank calls it. Copies this rank's pieces (params, moments: contiguous ranges,
 * memcpy on the OpenMP threads) into the snapshot, and meta (strings included: the caller
 * may free them); rank 0 creates the temporary directory; all ranks agree on these; then a
 * background thread (pthread) compresses and writes the shard, and it returns: pm may
 * change, or be freed, at once. Returns 0 with *out, or an error agreed by all ranks with
 * *out NULL and nothing left on disk. */
int ckpt_save_start(const struct par_model *pm, const char *root, const struct ckpt_meta *meta,
                    int level, ckpt_pending **out);
/* Collective: waits for this rank's writer thread, agrees on errors over all ranks (the
 * writer's, e.g. a full disk, included), gathers the piece lists, rank 0 writes the
 * manifest, renames into place and updates ROOT/latest. Returns 0 or an agreed error,
 * after which nothing is under the final name; frees p either way. Ranks finish their
 * pending saves in the order they started them. */
int ckpt_save_finish(ckpt_pending *p);
/* Frees the snapshot buffer kept from the last asynchronous save (see above). */
void ckpt_save_release(void);
/* Collective: loads parameters, moments and AdamW's step from a checkpoint directory into
 * pm (any layout, the model's shapes must match). *step, and the stored config (malloc'd
 * JSON text, caller frees; may be NULL) are returned. */
int ckpt_load(struct par_model *pm, const char *dir, long *step, char **config_json);
/* The stored training state (ckpt_meta.state) of a checkpoint directory: malloc'd JSON text
 * in *state_json (caller frees), NULL when none was stored. */
int ckpt_train_state(const char *dir, char **state_json);
/* The checkpoint to resume from, as a path ROOT/step_NNNNNNNN in out (empty when there is
 * none): the one ROOT/latest names when it is complete (valid manifest, every shard present
 * with its size); otherwise the newest complete step_* found by scanning ROOT, and then
 * *fell_back (may be NULL) is set: latest was missing (with a checkpoint found anyway),
 * unreadable, or named a checkpoint that is gone or incomplete. ckpt_latest is the same
 * without fell_back. */
int ckpt_latest_ex(const char *root, char *out, size_t cap, bool *fell_back);
int ckpt_latest(const char *root, char *out, size_t cap);
/* The newest complete checkpoint under root with a step below before_step into out (empty
 * when there is none): where to fall back when loading the latest one fails. */
int ckpt_previous(const char *root, long before_step, char *out, size_t cap);
/* Deletes complete checkpoints under root beyond the newest `keep` (0: keep all) except the
 * one ROOT/latest names, and incomplete ones older than the newest complete one. */
int ckpt_prune(const char *root, int keep);
/* Removes what saves cut short left under root: step_N.<suffix> directories (temporaries,
 * removals), step_N directories without a valid manifest, latest.tmp.* files. Complete
 * checkpoints and anything else stay. Call it on one rank when no save can be in flight
 * (at start). */
int ckpt_cleanup(const char *root);
/* Reads every shard, checks sizes, checksums (the manifest's and zstd's) and that the
 * pieces cover every element of every tensor exactly once; prints a summary to out. */
int ckpt_verify(const char *dir, FILE *out);
/* Prints what a checkpoint holds, from its manifest alone (validated): step, adam_step,
 * seed, layout, the configuration's model.* keys, the training state, the tensor count,
 * per kind the pieces, raw and compressed sizes and ratio, and the files and pieces. */
int ckpt_inspect(const char *dir, FILE *out);

/* Whole tensors of a checkpoint by global name, for tools (export). Opening validates the
 * manifest, the shard files' sizes and the coverage of every tensor; reading decompresses a
 * tensor's pieces on the OpenMP threads (each holding one piece) and checks them. One
 * thread at a time per handle. */
enum ckpt_kind { CKPT_KIND_PARAM = 0, CKPT_KIND_M = 1, CKPT_KIND_V = 2 };
typedef struct ckpt_reader ckpt_reader;
int ckpt_reader_open(ckpt_reader **r, const char *dir);
void ckpt_reader_close(ckpt_reader *r);
/* The tensors, in the manifest's order (the model's). */
int ckpt_reader_count(const ckpt_reader *r);
/* Tensor i's name (owned by r), ndim (1 or 2) and global shape (shape[1] = 1 when 1-D). */
const char *ckpt_reader_tensor(const ckpt_reader *r, int i, int *ndim, size_t shape[2]);
/* Tensor i's values of one kind, row-major, into out (shape[0] x shape[1] floats). */
int ckpt_reader_read(ckpt_reader *r, int i, enum ckpt_kind kind, float *out);

/* ckpt/ckpt_export.c. Writes a checkpoint's parameters as Hugging Face safetensors (F32)
 * into out_dir: model-00001-of-0000N.safetensors, each holding whole tensors in the model's
 * order up to max_shard_bytes of data (0: 2 GB; a larger tensor gets a file of its own),
 * and model.safetensors.index.json ({"metadata": {"total_size": bytes}, "weight_map":
 * {name: file}}). Streams: memory is one tensor plus a piece per thread. Everything is
 * written (and synced) into a temporary directory inside out_dir first, then renamed into
 * place with the index last, so a failed export leaves nothing under those names (short of
 * a failing rename). Files of an earlier export that the new index does not name are left
 * alone. config.json is the caller's. */
int ckpt_export_hf_sharded(const char *dir, const char *out_dir, size_t max_shard_bytes);

#endif
