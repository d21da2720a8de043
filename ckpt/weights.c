/* Hugging Face weights in and out: a Mixtral-named safetensors file checked tensor by
 * tensor against the config, each rank reading only its own block. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt/ckpt.h"
#include "dist/dist.h"

static const char *dtype_name(enum ckpt_dtype d)
{
    static const char *const names[] = {"F32", "BF16", "F16", "I32", "I64"};
    return (unsigned)d < sizeof names / sizeof names[0] ? names[d] : "?";
}

static void format_shape(char *out, size_t cap, int ndim, const size_t *shape)
{
    size_t used = (size_t)snprintf(out, cap, "[");
    for (int i = 0; i < ndim && used < cap; i++)
        used += (size_t)snprintf(out + used, cap - used, "%s%zu", i ? ", " : "", shape[i]);
    if (used < cap) snprintf(out + used, cap - used, "]");
}

/* The safetensors files of one set of weights: a single file, or the shards a Hugging Face
 * model.safetensors.index.json names. */
struct hf_set {
    ckpt_st_file *files[256];
    char paths[256][1024];
    int n;
};

static void hf_set_close(struct hf_set *s)
{
    for (int i = 0; i < s->n; i++) ckpt_st_close(s->files[i]);
    s->n = 0;
}

static int hf_set_add(struct hf_set *s, const char *path)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->paths[i], path) == 0) return 0;
    RETURN_IF(s->n == 256, VD_EFORMAT, "%s: more than 256 safetensors shards", path);
    snprintf(s->paths[s->n], sizeof s->paths[0], "%s", path);
    FORWARD_IF(ckpt_st_open(&s->files[s->n], path));
    s->n++;
    return 0;
}

/* Opens the shards an index names (their paths relative to the index's directory). */
static int hf_set_open_index(struct hf_set *s, const char *index)
{
    json_error_t jerr;
    json_t *root = json_load_file(index, JSON_REJECT_DUPLICATES, &jerr);
    RETURN_IF(!root, VD_EFORMAT, "%s: %s (line %d)", index, jerr.text, jerr.line);
    json_t *map = json_object_get(root, "weight_map");
    int rc = json_is_object(map) ? 0
                                 : vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                                              "%s: no \"weight_map\" object", index);
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", index);
    char *slash = strrchr(dir, '/');
    if (slash) slash[1] = '\0';
    else dir[0] = '\0';
    const char *name;
    json_t *file;
    json_object_foreach(map, name, file)
    {
        if (rc != 0) break;
        const char *f = json_string_value(file);
        if (!f || strchr(f, '/') || strcmp(f, "..") == 0) {
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "%s: tensor '%s' maps to an invalid file name", index, name);
            break;
        }
        char path[2100];
        snprintf(path, sizeof path, "%s%s", dir, f);
        rc = hf_set_add(s, path);
    }
    json_decref(root);
    return rc;
}

/* path: a .safetensors file, an index .json, or a directory holding either. */
static int hf_set_open(struct hf_set *s, const char *path)
{
    s->n = 0;
    struct stat sb;
    RETURN_IF(stat(path, &sb) != 0, VD_EIO, "cannot open %s: %s", path, strerror(errno));
    char buf[1100];
    if (S_ISDIR(sb.st_mode)) {
        snprintf(buf, sizeof buf, "%s/model.safetensors.index.json", path);
        if (stat(buf, &sb) == 0) return hf_set_open_index(s, buf);
        snprintf(buf, sizeof buf, "%s/model.safetensors", path);
        return hf_set_add(s, buf);
    }
    size_t const len = strlen(path);
    if (len > 5 && strcmp(path + len - 5, ".json") == 0) return hf_set_open_index(s, path);
    return hf_set_add(s, path);
}

/* The file and index of tensor `name` in the set, or -1. */
static int hf_set_find(const struct hf_set *s, const char *name, int *index)
{
    for (int f = 0; f < s->n; f++)
        if ((*index = ckpt_st_find(s->files[f], name)) >= 0) return f;
    return -1;
}

/* Every tensor of the set must be a model tensor of the same shape, in one file only;
 * every model tensor present. */
static int check_against_model(const struct hf_set *s, const struct model_table *full)
{
    for (int f = 0; f < s->n; f++) {
        const char *path = s->paths[f];
        for (int i = 0; i < ckpt_st_count(s->files[f]); i++) {
            const struct ckpt_st_tensor *t = ckpt_st_get(s->files[f], i);
            int const m = model_table_find(full, t->name);
            RETURN_IF(m < 0, VD_EFORMAT,
                      "%s: tensor '%s' is not part of the configured model (check "
                      "num_hidden_layers, num_local_experts and the Mixtral names)",
                      path, t->name);
            int other = -1;
            RETURN_IF(hf_set_find(s, t->name, &other) != f, VD_EFORMAT,
                      "%s: tensor '%s' is also in another shard", path, t->name);
            const struct model_tensor *mt = &full->t[m];
            RETURN_IF(t->dtype != CKPT_F32 && t->dtype != CKPT_BF16, VD_EFORMAT,
                      "%s: tensor '%s' has dtype %s; weights must be F32 or BF16", path,
                      t->name, dtype_name(t->dtype));
            bool const same = t->ndim == mt->ndim && t->shape[0] == mt->shape[0] &&
                              (mt->ndim == 1 || t->shape[1] == mt->shape[1]);
            if (!same) {
                char got[96], want[96];
                format_shape(got, sizeof got, t->ndim, t->shape);
                format_shape(want, sizeof want, mt->ndim, mt->shape);
                RETURN_ERR(VD_EFORMAT, "%s: tensor '%s' has shape %s but the config needs %s",
                           path, t->name, got, want);
            }
        }
    }
    int index = -1;
    for (int m = 0; m < full->count; m++)
        RETURN_IF(hf_set_find(s, full->t[m].name, &index) < 0, VD_EFORMAT,
                  "%s: tensor '%s' is missing", s->n ? s->paths[0] : "weights",
                  full->t[m].name);
    return 0;
}

int ckpt_load_hf(struct par_model *pm, const char *path)
{
    struct hf_set *set = vd_calloc(1, sizeof *set);
    int rc = hf_set_open(set, path);
    struct model_layout serial;
    model_layout_serial(&serial, pm->cfg.num_hidden_layers);
    struct model_table full = {0};
    if (rc == 0) rc = model_table_build(&full, &pm->cfg, &serial);
    if (rc == 0) rc = check_against_model(set, &full);
    for (int i = 0; rc == 0 && i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        int index = -1;
        int const f = hf_set_find(set, t->name, &index);
        rc = ckpt_st_read_block(set->files[f], index, pm->params + t->offset, t->local_start[0],
                                t->local_shape[0], t->local_start[1], t->local_shape[1]);
    }
    model_table_free(&full);
    hf_set_close(set);
    free(set);
    FORWARD_IF(rc);
    return 0;
}

/* Copies a (rows, cols) block into a tensor of `ld` columns at (r0, c0). */
static void place_block(float *dst, size_t ld, size_t r0, size_t c0, const float *src,
                        size_t rows, size_t cols)
{
    for (size_t r = 0; r < rows; r++)
        memcpy(dst + (r0 + r) * ld + c0, src + r * cols, cols * sizeof(float));
}

/* Number of blocks a tensor is cut into across the layout. */
static int block_count(const struct par_model *pm, const struct model_tensor *t)
{
    if (t->shard == MODEL_SHARD_NONE) return 1;
    return t->group == MODEL_GROUP_TP ? pm->lay.tp : pm->lay.etp;
}

/* The export's messages: one tag for all, since the tensor's index travels in the header
 * (a model may have more tensors than MPI guarantees tags). */
enum { EXPORT_TAG = 0 };

/* Every owner of a block sends it to rank 0: a header (the tensor's index in the full
 * table, the block's start and shape), then its values. Rank 0 takes the blocks in the
 * order they come, each header's values next from the same sender, and assembles whole
 * tensors in `full` (NULL elsewhere). */
static void gather_to_root(const struct par_model *pm, const struct model_table *tab,
                           float *full, const size_t *full_off)
{
    const struct dist_group *w = dist_world();
    size_t remote = 0; /* blocks rank 0 does not own itself */
    for (int i = 0; i < tab->count; i++) {
        const struct model_tensor *ft = &tab->t[i];
        int const li = model_table_find(&pm->tab, ft->name);
        const struct model_tensor *t = li >= 0 ? &pm->tab.t[li] : NULL;
        bool const mine = t && par_owns_block(pm, t);
        if (mine && w->rank == 0) {
            place_block(full + full_off[i], ft->shape[1], t->local_start[0], t->local_start[1],
                        pm->params + t->offset, t->local_shape[0], t->local_shape[1]);
        } else if (mine) {
            uint64_t const hdr[5] = {(uint64_t)i, t->local_start[0], t->local_start[1],
                                     t->local_shape[0], t->local_shape[1]};
            dist_send_bytes(w, DIST_WORLD, hdr, sizeof hdr, 0, EXPORT_TAG);
            dist_send(w, DIST_WORLD, pm->params + t->offset, t->numel, 0, EXPORT_TAG);
        }
        if (w->rank == 0) remote += (size_t)(block_count(pm, t ? t : ft) - (mine ? 1 : 0));
    }
    for (size_t b = 0; b < remote; b++) {
        uint64_t hdr[5];
        int const from = dist_recv_bytes(w, DIST_WORLD, hdr, sizeof hdr, DIST_ANY_SOURCE,
                                         EXPORT_TAG);
        VD_CHECK(hdr[0] < (uint64_t)tab->count, "rank %d sent a block of tensor %llu of %d",
                 from, (unsigned long long)hdr[0], tab->count);
        const struct model_tensor *ft = &tab->t[hdr[0]];
        size_t const n = (size_t)(hdr[3] * hdr[4]);
        float *buf = vd_alloc(n * sizeof(float));
        dist_recv(w, DIST_WORLD, buf, n, from, EXPORT_TAG);
        place_block(full + full_off[hdr[0]], ft->shape[1], (size_t)hdr[1], (size_t)hdr[2], buf,
                    (size_t)hdr[3], (size_t)hdr[4]);
        free(buf);
    }
}

int ckpt_export_hf(const struct par_model *pm, const char *path)
{
    struct model_layout serial;
    model_layout_serial(&serial, pm->cfg.num_hidden_layers);
    struct model_table full;
    VD_CHECK(model_table_build(&full, &pm->cfg, &serial) == 0, "the serial layout always fits");
    bool const root = dist_world_rank() == 0;
    size_t *off = vd_calloc((size_t)full.count, sizeof *off);
    size_t total = 0;
    for (int i = 0; i < full.count; i++) {
        off[i] = total;
        total += full.t[i].shape[0] * full.t[i].shape[1];
    }
    float *data = root ? vd_calloc(total, sizeof(float)) : NULL;
    gather_to_root(pm, &full, data, off);
    int rc = 0;
    if (root) {
        struct ckpt_st_write_tensor *w = vd_calloc((size_t)full.count, sizeof *w);
        for (int i = 0; i < full.count; i++) {
            const struct model_tensor *t = &full.t[i];
            w[i] = (struct ckpt_st_write_tensor){.name = t->name, .ndim = t->ndim,
                                                 .shape = {t->shape[0], t->shape[1]},
                                                 .data = data + off[i]};
        }
        const char *const keys[] = {"format"}, *const values[] = {"pt"};
        rc = ckpt_st_write(path, w, full.count, keys, values, 1);
        free(w);
    }
    free(data);
    free(off);
    model_table_free(&full);
    FORWARD_IF(rc);
    return 0;
}
