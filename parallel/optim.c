/* After a step's micro-batches: gradient reduction, global-norm clipping, AdamW, and
 * under the distributed optimizer (ZeRO-1) the parameter all-gather.
 *
 * Gradients are summed, not averaged: every micro-batch's backward already carries the
 * factor 1 / (micro-batches of the global batch), so the sums are the step's mean. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/parallel_internal.h"

void par_optim_init(struct par_model *pm)
{
    par_plan_ranges(pm);
    pm->adam_m = vd_calloc(pm->state_len, sizeof(float));
    pm->adam_v = vd_calloc(pm->state_len, sizeof(float));
    pm->gshard = pm->opt.distributed_optimizer ? vd_calloc(pm->state_len, sizeof(float)) : NULL;
}

void par_optim_free(struct par_model *pm)
{
    free(pm->adam_m);
    free(pm->adam_v);
    free(pm->gshard);
    pm->adam_m = pm->adam_v = pm->gshard = NULL;
}

void par_zero_grads(struct par_model *pm)
{
    memset(pm->grads, 0, pm->tab.numel * sizeof(float));
}

/* Norms, routers: replicated over tp, each rank holds the partial gradient of its rows. */
static void reduce_tp_replicated(struct par_model *pm)
{
    if (pm->groups.tp.size == 1) return;
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        if (t->group == MODEL_GROUP_TP && t->shard == MODEL_SHARD_NONE)
            dist_allreduce_sum(&pm->groups.tp, DIST_TP, pm->grads + t->offset, t->numel);
    }
}

void par_reduce_layer_start(struct par_model *pm, const struct par_layer *L)
{
    VD_CHECK(!pm->opt.distributed_optimizer, "overlapped reduction is the replicated path");
    if (pm->groups.tp.size > 1)
        for (int i = 0; i < pm->tab.count; i++) {
            const struct model_tensor *t = &pm->tab.t[i];
            if (t->group == MODEL_GROUP_TP && t->shard == MODEL_SHARD_NONE &&
                t->offset >= L->dense_begin && t->offset < L->dense_end)
                dist_allreduce_sum(&pm->groups.tp, DIST_TP, pm->grads + t->offset, t->numel);
        }
    dist_iallreduce_sum(&pm->groups.dpcp, pm->grads + L->dense_begin,
                        L->dense_end - L->dense_begin, &pm->reqs[pm->nreqs++]);
    dist_iallreduce_sum(&pm->groups.edp, pm->grads + L->expert_begin,
                        L->expert_end - L->expert_begin, &pm->reqs[pm->nreqs++]);
    pm->req_nbytes += (L->dense_end - L->dense_begin + L->expert_end - L->expert_begin) *
                      sizeof(float);
}

/* Reduces one range over its replicas: a reduce-scatter into this rank's shard (ZeRO-1),
 * or an all-reduce of the whole range. Returns where the reduced values now live. */
static float *reduce_range(struct par_model *pm, const struct par_range *r,
                           const struct dist_group *g, enum dist_kind kind)
{
    if (pm->opt.distributed_optimizer) {
        float *shard = pm->gshard + r->state_offset;
        dist_reduce_scatter(g, kind, shard, pm->grads + r->begin, r->shard_len);
        return shard;
    }
    dist_allreduce_sum(g, kind, pm->grads + r->begin, r->len);
    return pm->grads + r->begin;
}

/* Sum of squares of the reduced gradient held here, each model element counted once:
 * shards are disjoint over replicas; without shards only replica rank 0 counts. */
static double sq_norm_range(const struct par_model *pm, const struct par_range *r,
                            const struct dist_group *g, const float *vals)
{
    if (!pm->opt.distributed_optimizer && g->rank != 0) return 0.0;
    size_t const lo = par_shard_begin(pm, r);
    double sum = 0.0;
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        size_t a, b;
        if (!par_tensor_piece(t, lo, r->shard_len, &a, &b) || !par_shard_lead(pm, t)) continue;
        double s = 0.0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t j = a; j < b; j++) s += (double)vals[j] * vals[j];
        sum += s;
    }
    return sum;
}

static void adamw_range(struct par_model *pm, const struct par_range *r,
                        const struct dist_group *g, const float *grad,
                        const struct model_adamw *hp, float scale)
{
    size_t const lo = par_shard_begin(pm, r);
    float *p = pm->params + lo;
    float *m = pm->adam_m + r->state_offset, *v = pm->adam_v + r->state_offset;
    float *gs = (float *)grad;
    if (scale < 1.0f) {
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < r->shard_len; j++) gs[j] *= scale;
    }
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        size_t a, b;
        if (par_tensor_piece(t, lo, r->shard_len, &a, &b))
            model_adamw_update(p + a, gs + a, m + a, v + a, b - a, hp, t->decay);
    }
    if (pm->opt.distributed_optimizer)
        dist_allgather(g, g == &pm->groups.edp ? DIST_EDP : DIST_DPCP, pm->params + r->begin,
                       p, r->shard_len);
}

double par_optimizer_step(struct par_model *pm, const struct par_hparams *hp)
{
    const struct dist_group *gd = &pm->groups.dpcp, *ge = &pm->groups.edp;
    float *gdense = pm->grads + pm->dense.begin, *gexp = pm->grads + pm->expert.begin;
    if (pm->nreqs > 0) {
        /* started layer by layer during the last backward (par_reduce_layer_start) */
        dist_wait_all(pm->reqs, pm->nreqs, DIST_DPCP, pm->req_nbytes);
        pm->nreqs = 0;
        pm->req_nbytes = 0;
    } else {
        reduce_tp_replicated(pm);
        gdense = reduce_range(pm, &pm->dense, gd, DIST_DPCP);
        gexp = reduce_range(pm, &pm->expert, ge, DIST_EDP);
    }
    double sq = sq_norm_range(pm, &pm->dense, gd, gdense) +
                sq_norm_range(pm, &pm->expert, ge, gexp);
    dist_allreduce_sum_f64(dist_world(), DIST_WORLD, &sq, 1);
    double const norm = sqrt(sq);
    float const scale =
        hp->clip > 0.0f && norm > 0.0 ? (float)fmin(1.0, hp->clip / (norm + 1e-6)) : 1.0f;
    pm->adam_step++;
    struct model_adamw const a = {.lr = hp->lr, .beta1 = hp->beta1, .beta2 = hp->beta2,
                                  .eps = hp->eps, .weight_decay = hp->weight_decay,
                                  .step = pm->adam_step};
    adamw_range(pm, &pm->dense, gd, gdense, &a, scale);
    adamw_range(pm, &pm->expert, ge, gexp, &a, scale);
    par_zero_grads(pm);
    return norm;
}
