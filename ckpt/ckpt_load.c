/* Loading a sharded checkpoint into any layout (the model's shapes must match): each rank
 * copies each piece's overlap with its blocks and moment shards; and whole tensors by name
 * for tools (ckpt_reader).
 *
 * Speed: a load decompresses, in parallel, only the pieces that meet this rank's blocks,
 * straight into the staging buffer when a piece is one run of it (the same block in both
 * layouts) and row by row otherwise, and counts coverage with one bit an element. */
#include <jansson.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt_internal.h"
#include "dist/dist.h"

/* ---------------------------------------------------------------- what this rank needs */

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

/* ---------------------------------------------------------------- load */

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

/* The configured model against the manifest's tensors: the same names, the same shapes. */
static int check_model(const struct manifest *m, const struct model_config *cfg)
{
    struct model_layout serial;
    model_layout_serial(&serial, cfg->num_hidden_layers);
    struct model_table full;
    FORWARD_IF(model_table_build(&full, cfg, &serial));
    int rc = 0;
    for (int i = 0; rc == 0 && i < full.count; i++) {
        const struct model_tensor *t = &full.t[i];
        int const j = ckpt_manifest_find(m, t->name);
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
                      m->path, ckpt_kind_names[k], t->name, t->local_start[0], t->local_start[1],
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
        int const j = ckpt_manifest_find(m, pm->tab.t[i].name);
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
#pragma omp parallel num_threads(ckpt_threads_for(njobs))
    {
        struct piece_reader r;
        ckpt_piece_reader_init(&r, m, &err);
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
                if (ckpt_piece_reader_get(&r, jobs[j].piece, dst[p->kind] + at, &vals) == 0) {
                    size_t const d = mark_range(bits[p->kind], at, p->b - p->a);
                    if (d) __atomic_add_fetch(dup, d, __ATOMIC_RELAXED);
                }
            } else if (ckpt_piece_reader_get(&r, jobs[j].piece, NULL, &vals) == 0) {
                copy_overlap(p, vals, t, &n, dst[p->kind], bits[p->kind], dup);
            }
        }
        ckpt_piece_reader_free(&r);
    }
    free(jobs);
    FORWARD_IF(bg_raise(&err));
    return 0;
}

int ckpt_load(struct par_model *pm, const char *dir, long *step, char **config_json)
{
    if (config_json) *config_json = NULL;
    struct manifest m;
    int rc = ckpt_manifest_open(&m, dir);
    if (rc == 0) rc = check_model(&m, &pm->cfg); /* before the pieces: names the cause */
    if (rc == 0) rc = ckpt_manifest_read_pieces(&m);
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
        ckpt_copy_ranges(r, nr);
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
    ckpt_manifest_free(&m);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_train_state(const char *dir, char **state_json)
{
    *state_json = NULL;
    struct manifest m;
    int const rc = ckpt_manifest_open(&m, dir);
    if (rc == 0) *state_json = json_value_text(json_object_get(m.root, "train_state"));
    ckpt_manifest_free(&m);
    FORWARD_IF(rc);
    return 0;
}

/* ---------------------------------------------------------------- whole tensors */

_Static_assert((int)CKPT_KIND_PARAM == SHARD_PARAM && (int)CKPT_KIND_M == SHARD_M &&
                   (int)CKPT_KIND_V == SHARD_V,
               "the public kinds are the manifest's");

struct ckpt_reader {
    struct manifest m;
    size_t *order; /* piece indices as ckpt_manifest_check_coverage sorts them */
    size_t *first; /* order[first[j * 3 + k] .. first[j * 3 + k + 1]): tensor j's kind k */
    int nthreads;
    struct piece_reader *readers; /* one per thread */
    struct bg_error err;
};

void ckpt_reader_close(ckpt_reader *r)
{
    if (!r) return;
    for (int t = 0; r->readers && t < r->nthreads; t++) ckpt_piece_reader_free(&r->readers[t]);
    free(r->readers);
    free(r->order);
    free(r->first);
    ckpt_manifest_free(&r->m);
    free(r);
}

int ckpt_reader_open(ckpt_reader **out, const char *dir)
{
    *out = NULL;
    ckpt_reader *r = vd_calloc(1, sizeof *r);
    int rc = ckpt_manifest_read(&r->m, dir);
    if (rc == 0) rc = ckpt_manifest_check_files(&r->m);
    if (rc == 0) rc = ckpt_manifest_check_coverage(&r->m, &r->order);
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
    r->nthreads = ckpt_threads_for(SIZE_MAX);
    r->readers = vd_calloc((size_t)r->nthreads, sizeof *r->readers);
    for (int t = 0; t < r->nthreads; t++) ckpt_piece_reader_init(&r->readers[t], &r->m, &r->err);
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
                ckpt_piece_reader_get(pr, r->order[j], out + p->start[0] * cols + p->a, &vals);
            } else if (ckpt_piece_reader_get(pr, r->order[j], NULL, &vals) == 0) {
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
