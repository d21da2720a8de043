/* After a step's micro-batches: gradient reduction, global-norm clipping, AdamW. */
#include <math.h>
#include <string.h>

#include "parallel/parallel_internal.h"

/* Sum of squares of the gradient, each element of the model counted once whatever the
 * layout: a tensor replicated inside its shard group counts on that group's rank 0, and
 * reduced replicas (dense over DP x CP, experts over EDP) count on their rank 0. */
static double grad_sq_norm(const struct par_model *pm)
{
    const struct par_groups *g = &pm->groups;
    double local = 0.0;
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        int const shard_rank = t->group == MODEL_GROUP_TP ? g->tp.rank : g->etp.rank;
        int const replica_rank = t->is_expert ? g->edp.rank : g->dpcp.rank;
        if ((t->shard == MODEL_SHARD_NONE && shard_rank != 0) || replica_rank != 0) continue;
        const float *x = pm->grads + t->offset;
        double s = 0.0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t j = 0; j < t->numel; j++) s += (double)x[j] * x[j];
        local += s;
    }
    dist_allreduce_sum_f64(dist_world(), DIST_WORLD, &local, 1);
    return local;
}

static void reduce_grads(struct par_model *pm)
{
    float *dense = pm->grads, *expert = pm->grads + pm->tab.numel_dense;
    dist_allreduce_sum(&pm->groups.dpcp, DIST_DPCP, dense, pm->tab.numel_dense);
    dist_allreduce_sum(&pm->groups.edp, DIST_EDP, expert, pm->tab.numel - pm->tab.numel_dense);
}

double par_optimizer_step(struct par_model *pm, const struct par_hparams *hp)
{
    reduce_grads(pm);
    double const norm = sqrt(grad_sq_norm(pm));
    float const scale = hp->clip > 0.0f && norm > 0.0 ? (float)fmin(1.0, hp->clip / (norm + 1e-6)) : 1.0f;
    if (scale < 1.0f) {
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < pm->tab.numel; j++) pm->grads[j] *= scale;
    }
    pm->adam_step++;
    struct model_adamw const a = {.lr = hp->lr, .beta1 = hp->beta1, .beta2 = hp->beta2,
                                  .eps = hp->eps, .weight_decay = hp->weight_decay,
                                  .step = pm->adam_step};
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        model_adamw_update(pm->params + t->offset, pm->grads + t->offset, pm->adam_m + t->offset,
                           pm->adam_v + t->offset, t->numel, &a, t->decay);
    }
    par_zero_grads(pm);
    return norm;
}
