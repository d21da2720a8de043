/* The schedule of one step on one pipeline stage: this replica's micro-batches, each a
 * forward and then a backward over the stage's layers, gradients accumulating; the step's
 * losses and per-layer routing statistics are gathered here, over the data-parallel
 * replicas. Without the distributed optimizer, the last micro-batch's backward starts each
 * layer's gradient reduction as soon as that layer is done. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/parallel_internal.h"

void par_schedule_init(struct par_schedule *s, const struct par_model *pm)
{
    memset(s, 0, sizeof *s);
    int const nl = pm->lay.layer_end - pm->lay.layer_begin;
    s->nacts = 1; /* one micro-batch in flight: its forward, then its backward */
    s->acts = vd_calloc((size_t)s->nacts, sizeof *s->acts);
    for (int i = 0; i < s->nacts; i++) par_acts_init(&s->acts[i], pm);
    s->inputs = vd_calloc(2 * pm->shape.N, sizeof *s->inputs);
    s->targets = s->inputs + pm->shape.N;
    s->layer_dropped = vd_calloc((size_t)nl + 1, sizeof *s->layer_dropped);
    s->layer_max = vd_calloc(2 * (size_t)nl + 1, sizeof *s->layer_max);
    s->layer_stats = vd_calloc((size_t)nl + 1, sizeof *s->layer_stats);
}

void par_schedule_free(struct par_schedule *s)
{
    for (int i = 0; i < s->nacts; i++) par_acts_free(&s->acts[i]);
    free(s->acts);
    free(s->inputs);
    free(s->layer_dropped);
    free(s->layer_max);
    free(s->layer_stats);
    memset(s, 0, sizeof *s);
}

/* Folds one micro-batch's per-layer statistics into sums (dropped assignments) and maxima (most kept
 * by one expert; margins, whose minima travel as maxima of their negations). */
static void collect_layers(struct par_schedule *s, const struct par_model *pm,
                           const struct par_acts *a)
{
    int const nl = pm->lay.layer_end - pm->lay.layer_begin;
    for (int l = 0; l < nl; l++) {
        const struct par_block_acts *ba = &a->blocks[l];
        s->layer_dropped[l] += (double)ba->dropped;
        s->layer_stats[l].dispatch_ms += ba->dispatch_s * 1e3;
        s->layer_max[l] = fmaxf(s->layer_max[l], (float)ba->tokens_max);
        s->layer_max[nl + l] = fmaxf(s->layer_max[nl + l], -ba->margin);
    }
}

/* The step's per-layer statistics over micro-batches and replicas: the most tokens one
 * expert kept, mean tokens per expert, dropped fraction, smallest decision margin. */
static void finish_layers(struct par_schedule *s, const struct par_model *pm, int n_micro)
{
    int const nl = pm->lay.layer_end - pm->lay.layer_begin;
    int const E = pm->cfg.num_local_experts, k = pm->cfg.num_experts_per_tok;
    dist_allreduce_sum_f64(&pm->groups.dp, DIST_DP, s->layer_dropped, (size_t)nl);
    dist_allreduce_max(&pm->groups.dp, DIST_DP, s->layer_max, 2 * (size_t)nl);
    double const assignments = (double)n_micro * (double)pm->shape.N * k;
    for (int l = 0; l < nl; l++) {
        struct par_layer_stats *ls = &s->layer_stats[l];
        ls->dropped_frac = s->layer_dropped[l] / assignments;
        ls->tokens_max = s->layer_max[l];
        ls->tokens_mean = (assignments - s->layer_dropped[l]) / n_micro / E;
        ls->margin = isinf(s->layer_max[nl + l]) ? -1.0 : -(double)s->layer_max[nl + l];
    }
}

void par_schedule_step(struct par_schedule *s, struct par_model *pm,
                       const struct par_batches *batches, struct par_step_stats *out)
{
    int const nl = pm->lay.layer_end - pm->lay.layer_begin, n_micro = batches->n_micro;
    const struct dist_group *dp = &pm->groups.dp;
    memset(s->layer_dropped, 0, ((size_t)nl + 1) * sizeof *s->layer_dropped);
    memset(s->layer_max, 0, (2 * (size_t)nl + 1) * sizeof *s->layer_max);
    for (int l = 0; l < nl; l++) {
        s->layer_max[nl + l] = -INFINITY;
        s->layer_stats[l].dispatch_ms = 0.0;
    }
    double sums[3] = {0}; /* lm, aux, z */
    struct par_acts *a = &s->acts[0];
    for (int m = dp->rank; m < n_micro; m += dp->size) {
        batches->fill(batches->ctx, m, s->inputs, s->targets);
        par_stage_forward(pm, a, s->inputs, s->targets, NULL, NULL);
        bool const last = m + dp->size >= n_micro;
        par_stage_backward(pm, a, NULL, NULL, 1.0f / (float)n_micro,
                           last && !pm->opt.distributed_optimizer);
        collect_layers(s, pm, a);
        sums[0] += a->stats.lm_loss;
        sums[1] += a->stats.aux_loss;
        sums[2] += a->stats.z_loss;
    }
    dist_allreduce_sum_f64(dp, DIST_DP, sums, 3);
    finish_layers(s, pm, n_micro);
    *out = (struct par_step_stats){.lm = sums[0] / n_micro, .aux = sums[1] / n_micro,
                                   .z = sums[2] / n_micro, .nlayers = nl,
                                   .layers = s->layer_stats};
}
