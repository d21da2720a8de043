/* The token dispatcher of one MoE layer: router losses, the capacity decision over the
 * whole micro-batch, the expert-major permutation and its reverse.
 *
 * The plan runs on the routing of all N tokens of the micro-batch, gathered over etp x ep
 * (the all-gather dispatcher), so every rank takes the same dropping decisions as one
 * rank would. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/parallel_internal.h"

size_t par_moe_rows_max(const struct par_model *pm)
{
    return pm->shape.N * (size_t)pm->cfg.num_experts_per_tok * (size_t)pm->lay.ep;
}

void par_router_losses(struct par_model *pm, struct par_block_acts *ba,
                       struct par_mb_stats *st)
{
    const struct model_config *c = &pm->cfg;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    size_t const N = pm->shape.Ns;
    /* [0, E): c_e, [E, 2E): sum_t p_te, [2E]: sum_t lse_t^2 */
    double *sums = pm->router_sums;
    memset(sums, 0, (size_t)(2 * E + 1) * sizeof *sums);
    for (size_t t = 0; t < N; t++) {
        for (int j = 0; j < k; j++) sums[ba->rtopk[t * k + j]] += 1.0;
        for (int e = 0; e < E; e++) sums[E + e] += ba->rprobs[t * E + e];
        sums[2 * E] += (double)ba->rlse[t] * ba->rlse[t];
    }
    dist_allreduce_sum_f64(&pm->groups.tpcp, DIST_TPCP, sums, (size_t)(2 * E + 1));
    double const Ng = (double)pm->shape.N;
    double aux = 0.0;
    for (int e = 0; e < E; e++) {
        ba->counts[e] = (float)sums[e];
        aux += sums[e] / Ng * (sums[E + e] / Ng);
    }
    st->aux_loss += c->router_aux_loss_coef * E / k * aux;
    st->z_loss += c->router_z_loss_coef * sums[2 * E] / Ng;
}

struct probs_order {
    const float *probs;
    int E, k;
};

/* Descending p_te, ties by (token, slot): the `probs` drop policy's order. `probs` points
 * at column e of the (N, E) router probabilities. */
static int cmp_probs(const void *a, const void *b, void *ctx)
{
    const struct probs_order *o = ctx;
    int const sa = *(const int *)a, sb = *(const int *)b;
    float const pa = o->probs[(size_t)(sa / o->k) * o->E];
    float const pb = o->probs[(size_t)(sb / o->k) * o->E];
    if (pa != pb) return pa > pb ? -1 : 1;
    return (sa > sb) - (sa < sb);
}

/* Marks kept[s] for every assignment s = t k + j of the micro-batch. */
static void decide_capacity(struct par_model *pm, struct par_block_acts *ba, unsigned char *kept,
                            int *scratch, size_t *per_expert, size_t *fill)
{
    const struct model_config *c = &pm->cfg;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    size_t const S = pm->shape.N * (size_t)k;
    if (c->moe_capacity_factor <= 0.0) {
        memset(kept, 1, S);
        return;
    }
    double const Ng = (double)pm->shape.N;
    size_t const C = (size_t)ceil(c->moe_capacity_factor * Ng * k / E);
    if (c->moe_drop_policy == MODEL_DROP_POSITION) {
        memset(per_expert, 0, (size_t)E * sizeof *per_expert);
        for (size_t s = 0; s < S; s++) kept[s] = per_expert[ba->g_topk[s]]++ < C;
        return;
    }
    /* probs: group the assignments by expert (stable), sort each group, keep the first C. */
    memset(per_expert, 0, ((size_t)E + 1) * sizeof *per_expert);
    for (size_t s = 0; s < S; s++) per_expert[ba->g_topk[s] + 1]++;
    for (int e = 0; e < E; e++) per_expert[e + 1] += per_expert[e];
    memcpy(fill, per_expert, (size_t)E * sizeof *fill);
    for (size_t s = 0; s < S; s++) scratch[fill[ba->g_topk[s]]++] = (int)s;
    for (int e = 0; e < E; e++) {
        size_t const n = per_expert[e + 1] - per_expert[e];
        int *grp = scratch + per_expert[e];
        struct probs_order o = {ba->g_probs + e, E, k};
        qsort_r(grp, n, sizeof *grp, cmp_probs, &o);
        for (size_t i = 0; i < n; i++) kept[grp[i]] = i < C;
    }
}

size_t par_dispatch_plan(struct par_model *pm, struct par_block_acts *ba,
                         struct par_mb_stats *st)
{
    const struct model_config *c = &pm->cfg;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    size_t const N = pm->shape.N, S = N * (size_t)k;
    /* kept flags borrow the backward's dx_perm scratch, unused during the forward */
    unsigned char *kept = (unsigned char *)pm->dx_perm;
    size_t *per_expert = pm->expert_counts, *cnt = per_expert + E + 1, *fill = cnt + E + 1;
    decide_capacity(pm, ba, kept, ba->perm_src, per_expert, fill);
    memset(cnt, 0, (size_t)E * sizeof *cnt);
    for (size_t s = 0; s < S; s++) cnt[ba->g_topk[s]] += kept[s];
    ba->expert_off[0] = 0;
    long kept_total = 0, kept_max = 0;
    for (int e = 0; e < E; e++) {
        ba->expert_off[e + 1] = ba->expert_off[e] + cnt[e];
        fill[e] = ba->expert_off[e];
        kept_total += (long)cnt[e];
        if ((long)cnt[e] > kept_max) kept_max = (long)cnt[e];
    }
    for (size_t s = 0; s < S; s++) {
        int const e = ba->g_topk[s];
        if (kept[s]) {
            ba->slot_pos[s] = (int)fill[e];
            ba->perm_src[fill[e]++] = (int)(s / (size_t)k);
        } else {
            ba->slot_pos[s] = -1;
        }
    }
    ba->dropped = (long)S - kept_total;
    st->dropped += ba->dropped;
    if (kept_max > st->tokens_max) st->tokens_max = kept_max;
    st->tokens_mean += (double)kept_total / E / c->num_hidden_layers;
    return (size_t)kept_total;
}

void par_dispatch_gather(struct par_model *pm, struct par_block_acts *ba, size_t rows)
{
    size_t const d = (size_t)pm->cfg.hidden_size;
#pragma omp parallel for schedule(static)
    for (size_t a = 0; a < rows; a++)
        memcpy(ba->x_perm + a * d, ba->m + (size_t)ba->perm_src[a] * d, d * sizeof(float));
}

void par_dispatch_combine(struct par_model *pm, struct par_block_acts *ba, float *h_out)
{
    size_t const d = (size_t)pm->cfg.hidden_size;
    int const k = pm->cfg.num_experts_per_tok;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < pm->shape.N; t++) {
        float *out = h_out + t * d;
        for (int j = 0; j < k; j++) {
            int const a = ba->slot_pos[t * k + j];
            if (a < 0) continue;
            float const w = ba->g_w[t * k + j];
            const float *y = ba->y_perm + (size_t)a * d;
            for (size_t i = 0; i < d; i++) out[i] += w * y[i];
        }
    }
}

void par_dispatch_combine_backward(struct par_model *pm, struct par_block_acts *ba,
                                   const float *dh_out, float *dy_perm, float *dtopk_w)
{
    size_t const d = (size_t)pm->cfg.hidden_size;
    int const k = pm->cfg.num_experts_per_tok;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < pm->shape.N; t++) {
        const float *g = dh_out + t * d;
        for (int j = 0; j < k; j++) {
            int const a = ba->slot_pos[t * k + j];
            if (a < 0) {
                dtopk_w[t * k + j] = 0.0f;
                continue;
            }
            float const w = ba->g_w[t * k + j];
            const float *y = ba->y_perm + (size_t)a * d;
            float *dy = dy_perm + (size_t)a * d;
            float dot = 0.0f;
            for (size_t i = 0; i < d; i++) {
                dy[i] = w * g[i];
                dot += g[i] * y[i];
            }
            dtopk_w[t * k + j] = dot;
        }
    }
}

void par_dispatch_gather_backward(struct par_model *pm, struct par_block_acts *ba, float *dm)
{
    size_t const d = (size_t)pm->cfg.hidden_size;
    int const k = pm->cfg.num_experts_per_tok;
    const float *dx = pm->dx_perm;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < pm->shape.N; t++) {
        float *out = dm + t * d;
        memset(out, 0, d * sizeof *out);
        for (int j = 0; j < k; j++) {
            int const a = ba->slot_pos[t * k + j];
            if (a < 0) continue;
            for (size_t i = 0; i < d; i++) out[i] += dx[(size_t)a * d + i];
        }
    }
}
