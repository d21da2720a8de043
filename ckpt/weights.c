/* Hugging Face weights in and out: a Mixtral-named safetensors file checked tensor by
 * tensor against the config, each rank reading only its own block. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"

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

/* Every file tensor must be a model tensor of the same shape; every model tensor present. */
static int check_against_model(const ckpt_st_file *f, const char *path,
                               const struct model_table *full)
{
    for (int i = 0; i < ckpt_st_count(f); i++) {
        const struct ckpt_st_tensor *t = ckpt_st_get(f, i);
        int const m = model_table_find(full, t->name);
        RETURN_IF(m < 0, VD_EFORMAT,
                  "%s: tensor '%s' is not part of the configured model (check "
                  "num_hidden_layers, num_local_experts and the Mixtral names)",
                  path, t->name);
        const struct model_tensor *mt = &full->t[m];
        RETURN_IF(t->dtype != CKPT_F32 && t->dtype != CKPT_BF16, VD_EFORMAT,
                  "%s: tensor '%s' has dtype %s; weights must be F32 or BF16", path, t->name,
                  dtype_name(t->dtype));
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
    for (int m = 0; m < full->count; m++)
        RETURN_IF(ckpt_st_find(f, full->t[m].name) < 0, VD_EFORMAT,
                  "%s: tensor '%s' is missing", path, full->t[m].name);
    return 0;
}

int ckpt_load_hf(struct par_model *pm, const char *path)
{
    ckpt_st_file *f = NULL;
    FORWARD_IF(ckpt_st_open(&f, path));
    struct model_layout serial = {.tp = 1, .ep = 1, .etp = 1, .layer_begin = 0,
                                  .layer_end = pm->cfg.num_hidden_layers, .has_embed = true,
                                  .has_head = true};
    struct model_table full;
    int rc = model_table_build(&full, &pm->cfg, &serial);
    if (rc == 0) rc = check_against_model(f, path, &full);
    for (int i = 0; rc == 0 && i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        rc = ckpt_st_read_block(f, ckpt_st_find(f, t->name), pm->params + t->offset,
                                t->local_start[0], t->local_shape[0], t->local_start[1],
                                t->local_shape[1]);
    }
    model_table_free(&full);
    ckpt_st_close(f);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_export_hf(const struct par_model *pm, const char *path)
{
    const struct model_layout *l = &pm->lay;
    RETURN_IF(l->tp != 1 || l->ep != 1 || l->etp != 1 || !l->has_embed || !l->has_head,
              VD_EINVAL,
              "exporting %s needs the whole model on one rank (tp, ep, etp, pp all 1); "
              "this rank holds a shard", path);
    struct ckpt_st_write_tensor *w = vd_calloc((size_t)pm->tab.count, sizeof *w);
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        w[i] = (struct ckpt_st_write_tensor){.name = t->name, .ndim = t->ndim,
                                             .shape = {t->shape[0], t->shape[1]},
                                             .data = pm->params + t->offset};
    }
    const char *const keys[] = {"format"}, *const values[] = {"pt"};
    int const rc = ckpt_st_write(path, w, pm->tab.count, keys, values, 1);
    free(w);
    FORWARD_IF(rc);
    return 0;
}
