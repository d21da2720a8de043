/* Saving a sharded checkpoint: every rank compresses the pieces of the model it is the
 * one writer of into its own zstd file, and rank 0 records them all in the manifest by
 * tensor name and global coordinates.
 *
 * A save writes into ROOT/step_NNNNNNNN.tmp.<pid>.<n>, renames it once the manifest is
 * durable, then replaces ROOT/latest (temporary file, rename, sync of ROOT): the rename of
 * latest is the commit.
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
 * the previous save (no page faults once warm).
 *
 * Who writes what, so every element is written once and the work is spread (parallel/
 * shards.c decides: par_writes_block, par_shard_lead, par_moment_span):
 *   parameters: among the replicas of a block (the dp x cp group of a dense tensor, the
 *     edp group of an expert) the replica whose group rank is the tensor's table index
 *     modulo the group size; of a tensor replicated over its shard group (norms, routers)
 *     only shard-group rank 0's replicas write;
 *   moments under the distributed optimizer: each rank its own shards (their overlap with
 *     each tensor), again only on shard-group rank 0 for replicated tensors; without it,
 *     the parameters' rule. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "ckpt/ckpt_internal.h"
#include "dist/dist.h"

/* Elements per piece written (16 MB raw): the unit of parallel compression and loading,
 * and of the buffers each thread holds. */
#define SHARD_PIECE_MAX ((size_t)1 << 22)
/* Elements one thread copies at a time (snapshots, commits). */
#define SHARD_COPY_CHUNK ((size_t)1 << 18)

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

void ckpt_copy_ranges(const struct copy_range *r, size_t n)
{
    size_t *first = vd_calloc(n + 1, sizeof *first); /* first chunk of each range */
    for (size_t i = 0; i < n; i++)
        first[i + 1] = first[i] + (r[i].n + SHARD_COPY_CHUNK - 1) / SHARD_COPY_CHUNK;
    size_t const chunks = first[n];
#pragma omp parallel for schedule(dynamic, 8) num_threads(ckpt_threads_for(chunks / 8 + 1))
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
    ckpt_copy_ranges(r, p->npieces);
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
    p->nthreads = ckpt_threads_for(p->npieces);
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
                            ckpt_kind_names[q->kind], p->tensors[q->tensor].name,
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
                              "kind", ckpt_kind_names[q->kind], "tensor", t->name,
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

/* This rank's pieces as JSON text, gathered on rank 0 in rank order into one array of
 * every piece. */
static json_t *gather_pieces(const json_t *mine)
{
    const struct dist_group *w = dist_world();
    char *text = json_dumps(mine, JSON_COMPACT);
    VD_CHECK(text != NULL, "out of memory serialising checkpoint pieces");
    size_t const len = strlen(text) + 1;
    size_t *lens = w->rank == 0 ? vd_calloc((size_t)w->size, sizeof *lens) : NULL;
    dist_gather_nbytes(w, DIST_WORLD, len, lens, 0);
    size_t total = 0;
    for (int r = 0; w->rank == 0 && r < w->size; r++) total += lens[r];
    char *all = w->rank == 0 ? vd_alloc(total) : NULL;
    dist_gatherv_bytes(w, DIST_WORLD, all, lens, text, len, 0);
    free(text);
    json_t *pieces = NULL;
    if (w->rank == 0) {
        pieces = json_array();
        size_t at = 0;
        for (int r = 0; r < w->size; r++) {
            json_t *part = json_loads(all + at, 0, NULL);
            VD_CHECK(part && json_array_extend(pieces, part) == 0,
                     "rank %d's checkpoint pieces do not parse", r);
            json_decref(part);
            at += lens[r];
        }
    }
    free(all);
    free(lens);
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
    struct model_layout serial;
    model_layout_serial(&serial, cfg->num_hidden_layers);
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
    if (old && ckpt_remove_tree(old) != 0) fprintf(stderr, "vdist: warning: %s\n", vd_err_msg());
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
