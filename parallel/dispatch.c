/* The token dispatcher of one MoE layer (shared/docs/parallelism.md).
 *
 * 1. Decide: the routing of the whole micro-batch is gathered over the ranks that hold
 *    its tokens (tp x cp) and every one of them takes the capacity decision of model.md
 *    on it, so the kept assignments are those of one rank, whatever the layout.
 * 2. Dispatch the kept (token, slot) copies to the ranks of their experts over the MoE
 *    grid's etp x ep group, which may hold tokens of other micro-batches (folding):
 *    - alltoall: permute expert-major, all-to-all(v) over EP, all-gather(v) over ETP,
 *      sort to [local expert][source], one GEMM per expert, then the reverse
 *      (reduce-scatter(v) over ETP, all-to-all back), and the weighted sum at the source;
 *    - allgather: gather every row and its routing over etp x ep, run the local experts
 *      on the rows routed to them, reduce-scatter the weighted sums back.
 * Each rank runs its experts' F slice (etp), so expert outputs are partial sums that the
 * ETP reductions complete. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/parallel_internal.h"

size_t par_moe_rows_max(const struct par_model *pm)
{
    return pm->shape.Ns * (size_t)pm->cfg.num_experts_per_tok * (size_t)pm->groups.etpep.size;
}

void par_router_losses(struct par_model *pm, struct par_block_acts *ba,
                       struct par_mb_stats *st)
{
    const struct model_config *c = &pm->cfg;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    size_t const Ns = pm->shape.Ns;
    /* [0, E): c_e, [E, 2E): sum_t p_te, [2E]: sum_t lse_t^2 */
    double *sums = pm->router_sums;
    memset(sums, 0, (size_t)(2 * E + 1) * sizeof *sums);
    for (size_t t = 0; t < Ns; t++) {
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

/* ---------------------------------------------------------------- 1. the decision */

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

/* kept[s] for every assignment s = t k + j of the micro-batch (token order t), given its
 * routing topk (N, k) and probabilities (N, E). Returns the smallest probability gap that
 * decided a `probs` drop (the last kept against the first dropped of an over-full expert),
 * or +inf when no such decision was taken. */
static float decide_capacity(const struct par_model *pm, const int *topk, const float *probs,
                             unsigned char *kept, int *scratch)
{
    const struct model_config *c = &pm->cfg;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    size_t const S = pm->shape.N * (size_t)k;
    float margin = INFINITY;
    if (c->moe_capacity_factor <= 0.0) {
        memset(kept, 1, S);
        return margin;
    }
    size_t const C = (size_t)ceil(c->moe_capacity_factor * (double)pm->shape.N * k / E);
    size_t *per_expert = pm->expert_counts, *fill = per_expert + E + 1;
    if (c->moe_drop_policy == MODEL_DROP_POSITION) {
        memset(per_expert, 0, (size_t)E * sizeof *per_expert);
        for (size_t s = 0; s < S; s++) kept[s] = per_expert[topk[s]]++ < C;
        return margin;
    }
    /* probs: group the assignments by expert (stable), sort each group, keep the first C. */
    memset(per_expert, 0, ((size_t)E + 1) * sizeof *per_expert);
    for (size_t s = 0; s < S; s++) per_expert[topk[s] + 1]++;
    for (int e = 0; e < E; e++) per_expert[e + 1] += per_expert[e];
    memcpy(fill, per_expert, (size_t)E * sizeof *fill);
    for (size_t s = 0; s < S; s++) scratch[fill[topk[s]]++] = (int)s;
    for (int e = 0; e < E; e++) {
        size_t const n = per_expert[e + 1] - per_expert[e];
        int *grp = scratch + per_expert[e];
        struct probs_order o = {probs + e, E, k};
        qsort_r(grp, n, sizeof *grp, cmp_probs, &o);
        for (size_t i = 0; i < n; i++) kept[grp[i]] = i < C;
        if (n > C && C > 0)
            margin = fminf(margin, probs[(size_t)(grp[C - 1] / k) * E + e] -
                                       probs[(size_t)(grp[C] / k) * E + e]);
    }
    return margin;
}

/* The smallest gap between a token's k-th largest router probability and the largest it
 * did not select: how far the top-k choices are from a tie (+inf when k = E). */
static float topk_margin(const int *topk, const float *probs, size_t N, int E, int k)
{
    float margin = INFINITY;
    for (size_t t = 0; t < N; t++) {
        const float *p = probs + t * E;
        float best_out = -INFINITY;
        for (int e = 0; e < E; e++) {
            bool chosen = false;
            for (int j = 0; j < k; j++) chosen |= topk[t * k + j] == e;
            if (!chosen) best_out = fmaxf(best_out, p[e]);
        }
        margin = fminf(margin, p[topk[t * k + k - 1]] - best_out);
    }
    return margin;
}

void par_moe_decide(struct par_model *pm, struct par_block_acts *ba)
{
    const struct model_config *c = &pm->cfg;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    size_t const Ns = pm->shape.Ns, N = pm->shape.N, S = N * (size_t)k;
    const struct dist_group *g = &pm->groups.tpcp;
    /* Gathered in the group's rank order, then placed by token index. */
    int *tok = pm->sort_scratch, *topk = (int *)pm->xgather;
    float *probs = pm->xgather + S;
    dist_allgather_bytes(g, DIST_TPCP, tok, pm->row_token, Ns * sizeof(int));
    dist_allgather_bytes(g, DIST_TPCP, topk, ba->rtopk, Ns * (size_t)k * sizeof(int));
    dist_allgather(g, DIST_TPCP, probs, ba->rprobs, Ns * (size_t)E);
    for (size_t r = 0; r < N; r++) {
        size_t const t = (size_t)tok[r];
        memcpy(pm->full_topk + t * k, topk + r * k, (size_t)k * sizeof(int));
        memcpy(pm->full_probs + t * E, probs + r * E, (size_t)E * sizeof(float));
    }
    float const drop_margin =
        decide_capacity(pm, pm->full_topk, pm->full_probs, pm->full_kept, pm->sort_scratch);
    ba->margin = fminf(drop_margin, topk_margin(pm->full_topk, pm->full_probs, N, E, k));

    size_t *kept_per_expert = pm->expert_counts;
    memset(kept_per_expert, 0, (size_t)E * sizeof *kept_per_expert);
    long kept_total = 0;
    for (size_t s = 0; s < S; s++) {
        kept_per_expert[pm->full_topk[s]] += pm->full_kept[s];
        kept_total += pm->full_kept[s];
    }
    ba->tokens_max = 0;
    for (int e = 0; e < E; e++)
        if ((long)kept_per_expert[e] > ba->tokens_max) ba->tokens_max = (long)kept_per_expert[e];
    ba->dropped = (long)S - kept_total;
    for (size_t r = 0; r < Ns; r++)
        memcpy(ba->kept + r * k, pm->full_kept + (size_t)pm->row_token[r] * k, (size_t)k);
}

/* Dispatch time, for the step's split and the layer's metrics. */
static void dispatch_time(struct par_block_acts *ba, double t0)
{
    double const dt = omp_get_wtime() - t0;
    par_timers[PAR_T_DISPATCH] += dt;
    ba->dispatch_s += dt;
}

/* ---------------------------------------------------------------- expert compute */

/* The identity expert of the dispatcher tests: ETP rank 0 returns its input, the others
 * zero, so the ETP sums give back exactly the input. */
static void identity_rows(const struct par_model *pm, float *y, const float *x, size_t rows)
{
    size_t const n = rows * (size_t)pm->cfg.hidden_size;
    if (pm->lay.etp_rank == 0) memcpy(y, x, n * sizeof *y);
    else memset(y, 0, n * sizeof *y);
}

/* Runs each local expert on its contiguous block of x_perm into y_perm. */
static void experts_forward(struct par_model *pm, struct par_block_acts *ba,
                            const struct model_layer_ptrs *w)
{
    int const El = pm->cfg.num_local_experts / pm->lay.ep;
    int const d = pm->cfg.hidden_size, Fl = pm->cfg.intermediate_size / pm->lay.etp;
    double const t0 = omp_get_wtime();
    if (pm->identity_experts) {
        identity_rows(pm, ba->y_perm, ba->x_perm, ba->rows);
        return;
    }
    for (int el = 0; el < El; el++) {
        size_t const r0 = ba->expert_off[el], n = ba->expert_off[el + 1] - r0;
        model_expert_forward(ba->y_perm + r0 * d, ba->h1 + r0 * Fl, ba->h3 + r0 * Fl,
                             ba->act + r0 * Fl, ba->x_perm + r0 * d, w->w1[el], w->w3[el],
                             w->w2[el], n, d, Fl);
    }
    par_timers[PAR_T_EXPERTS] += omp_get_wtime() - t0;
}

/* dx_perm from dy_perm; expert weight gradients accumulate. */
static void experts_backward(struct par_model *pm, struct par_block_acts *ba,
                             const struct model_layer_ptrs *w, struct model_layer_ptrs *gw)
{
    int const El = pm->cfg.num_local_experts / pm->lay.ep;
    int const d = pm->cfg.hidden_size, Fl = pm->cfg.intermediate_size / pm->lay.etp;
    double const t0 = omp_get_wtime();
    if (pm->identity_experts) {
        identity_rows(pm, pm->dx_perm, pm->dy_perm, ba->rows);
        return;
    }
    for (int el = 0; el < El; el++) {
        size_t const r0 = ba->expert_off[el], n = ba->expert_off[el + 1] - r0;
        model_expert_backward(pm->dx_perm + r0 * d, gw->w1[el], gw->w3[el], gw->w2[el],
                              pm->dy_perm + r0 * d, ba->h1 + r0 * Fl, ba->h3 + r0 * Fl,
                              ba->act + r0 * Fl, ba->x_perm + r0 * d, w->w1[el], w->w3[el],
                              w->w2[el], n, d, Fl, pm->exp_scratch);
    }
    par_timers[PAR_T_EXPERTS] += omp_get_wtime() - t0;
}

/* dst[i] = src[from[i]] (rows of d floats), or the reverse scatter. */
static void gather_rows(float *dst, const float *src, const int *from, size_t n, size_t d)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) memcpy(dst + i * d, src + (size_t)from[i] * d, d * sizeof *dst);
}

static void scatter_rows(float *dst, const float *src, const int *to, size_t n, size_t d)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) memcpy(dst + (size_t)to[i] * d, src + i * d, d * sizeof *dst);
}

/* ---------------------------------------------------------------- 2a. all-to-all */

/* Exchange counts and offsets of the all-to-all path in rows, from the counts matrix
 * M[r][e] (rows rank r of etp x ep sends to global expert e). EP peers share my etp
 * coordinate; ETP peers share my ep coordinate (communicator rank = that coordinate). */
struct a2a_plan {
    int *send, *send_off;   /* per EP rank */
    int *recv, *recv_off;   /* per EP rank */
    int *etp_rows, *etp_off;/* rows each ETP rank received in its all-to-all */
};

static void a2a_plan_make(const struct par_model *pm, const struct par_block_acts *ba,
                          struct a2a_plan *pl)
{
    int const E = pm->cfg.num_local_experts, ep = pm->groups.ep.size, etp = pm->groups.etp.size;
    int const El = E / ep, b = pm->lay.ep_rank, a = pm->lay.etp_rank;
    int const q = pm->groups.etpep.size, me = pm->groups.etpep.rank;
    int *x = pm->xcounts;
    pl->send = x;
    pl->send_off = x + (q + 1);
    pl->recv = x + 2 * (q + 1);
    pl->recv_off = x + 3 * (q + 1);
    pl->etp_rows = x + 4 * (q + 1);
    pl->etp_off = x + 5 * (q + 1);
    memset(x, 0, 6 * ((size_t)q + 1) * sizeof *x);
    const int *M = ba->counts_matrix;
    for (int e = 0; e < E; e++) pl->send[e / El] += M[(size_t)me * E + e];
    for (int r = 0; r < q; r++) {
        int rows = 0; /* what rank r sends to the experts of my ep coordinate */
        for (int le = 0; le < El; le++) rows += M[(size_t)r * E + b * El + le];
        if (pm->etpep_etp[r] == a) pl->recv[pm->etpep_ep[r]] += rows;
        pl->etp_rows[pm->etpep_etp[r]] += rows;
    }
    for (int i = 0; i < ep; i++) {
        pl->send_off[i + 1] = pl->send_off[i] + pl->send[i];
        pl->recv_off[i + 1] = pl->recv_off[i] + pl->recv[i];
    }
    for (int i = 0; i < etp; i++) pl->etp_off[i + 1] = pl->etp_off[i] + pl->etp_rows[i];
}

/* Scales row counts and offsets of n ranks to element counts for MPI. */
static void to_elements(int *out_counts, int *out_offs, const int *rows, const int *offs, int n,
                        size_t d)
{
    for (int i = 0; i < n; i++) {
        out_counts[i] = dist_count((size_t)rows[i] * d);
        out_offs[i] = dist_count((size_t)offs[i] * d);
    }
}

/* Moves rows from the senders (send, expert-major) to the gathered block on the experts'
 * ranks (gathered: [etp peer][ep source][local expert]); reverse = false. With
 * reverse = true, sums the gathered block's partial rows over ETP and returns them to
 * the senders. `mid` is the per-rank all-to-all buffer. */
static void a2a_exchange(struct par_model *pm, const struct a2a_plan *pl, float *send,
                         float *mid, float *gathered, bool reverse)
{
    size_t const d = (size_t)pm->cfg.hidden_size;
    int const ep = pm->groups.ep.size, etp = pm->groups.etp.size;
    int *ec = pm->xcounts + 6 * ((size_t)pm->groups.etpep.size + 1);
    int *sc = ec, *so = ec + ep, *rc = ec + 2 * ep, *ro = ec + 3 * ep;
    int *gc = ec + 4 * ep, *go = gc + etp;
    to_elements(sc, so, pl->send, pl->send_off, ep, d);
    to_elements(rc, ro, pl->recv, pl->recv_off, ep, d);
    to_elements(gc, go, pl->etp_rows, pl->etp_off, etp, d);
    float *mine = gathered + (size_t)pl->etp_off[pm->lay.etp_rank] * d;
    if (!reverse) {
        float *recv = etp > 1 ? mid : mine;
        dist_alltoallv(&pm->groups.ep, DIST_EP, send, sc, so, recv, rc, ro);
        dist_allgatherv(&pm->groups.etp, DIST_ETP, gathered, recv, gc, go);
    } else {
        float *recv = etp > 1 ? mid : mine;
        dist_reduce_scatterv(&pm->groups.etp, DIST_ETP, recv, gathered, gc);
        dist_alltoallv(&pm->groups.ep, DIST_EP, recv, rc, ro, send, sc, so);
    }
}

/* sorted_from and expert_off: the gathered block [etp peer][ep source][local expert]
 * reordered to [local expert][etp peer][ep source]. */
static void a2a_sort_plan(struct par_model *pm, struct par_block_acts *ba)
{
    int const E = pm->cfg.num_local_experts, ep = pm->groups.ep.size, etp = pm->groups.etp.size;
    int const El = E / ep, b = pm->lay.ep_rank;
    const int *M = ba->counts_matrix;
    /* start of chunk (a', b'', le) in the gathered block */
    int *start = pm->sort_scratch;
    int pos = 0;
    for (int a2 = 0; a2 < etp; a2++)
        for (int b2 = 0; b2 < ep; b2++) {
            int const r = pm->etpep_of[a2 + etp * b2];
            for (int le = 0; le < El; le++) {
                start[(a2 * ep + b2) * El + le] = pos;
                pos += M[(size_t)r * E + b * El + le];
            }
        }
    size_t row = 0;
    for (int le = 0; le < El; le++) {
        ba->expert_off[le] = row;
        for (int a2 = 0; a2 < etp; a2++)
            for (int b2 = 0; b2 < ep; b2++) {
                int const r = pm->etpep_of[a2 + etp * b2];
                int const n = M[(size_t)r * E + b * El + le], s0 = start[(a2 * ep + b2) * El + le];
                for (int i = 0; i < n; i++) ba->sorted_from[row++] = s0 + i;
            }
    }
    ba->expert_off[El] = row;
    ba->rows = row;
}

static void a2a_forward(struct par_model *pm, struct par_block_acts *ba,
                        const struct model_layer_ptrs *w, float *out)
{
    size_t const Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    int const E = pm->cfg.num_local_experts, k = pm->cfg.num_experts_per_tok;
    double t0 = omp_get_wtime();
    /* permute the kept local slots expert-major: send row of slot (t, j) */
    int *cnt = ba->counts_matrix + (size_t)pm->groups.etpep.rank * E;
    memset(cnt, 0, (size_t)E * sizeof *cnt);
    for (size_t s = 0; s < Ns * (size_t)k; s++) cnt[ba->rtopk[s]] += ba->kept[s];
    int *fill = pm->sort_scratch;
    fill[0] = 0;
    for (int e = 0; e < E; e++) fill[e + 1] = fill[e] + cnt[e];
    ba->send_rows = (size_t)fill[E];
    for (size_t s = 0; s < Ns * (size_t)k; s++) {
        ba->slot_row[s] = ba->kept[s] ? fill[ba->rtopk[s]]++ : -1;
        if (ba->kept[s]) ba->send_tok[ba->slot_row[s]] = (int)(s / (size_t)k);
    }
    gather_rows(pm->xsend, ba->m_loc, ba->send_tok, ba->send_rows, d);
    /* every rank's counts, so each can lay out what it receives */
    dist_allgather_bytes(&pm->groups.etpep, DIST_ETPEP, ba->counts_matrix, cnt,
                         (size_t)E * sizeof *cnt);
    struct a2a_plan pl;
    a2a_plan_make(pm, ba, &pl);
    a2a_exchange(pm, &pl, pm->xsend, pm->xrecv, pm->xgather, false);
    a2a_sort_plan(pm, ba);
    gather_rows(ba->x_perm, pm->xgather, ba->sorted_from, ba->rows, d);
    dispatch_time(ba, t0);

    experts_forward(pm, ba, w);

    t0 = omp_get_wtime();
    scatter_rows(pm->xgather, ba->y_perm, ba->sorted_from, ba->rows, d);
    a2a_plan_make(pm, ba, &pl);
    a2a_exchange(pm, &pl, ba->y_ret, pm->xrecv, pm->xgather, true);
    /* out (Ns, d) = sum over kept slots of w * y */
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < Ns; t++) {
        float *o = out + t * d;
        memset(o, 0, d * sizeof *o);
        for (int j = 0; j < k; j++) {
            int const a = ba->slot_row[t * k + j];
            if (a < 0) continue;
            float const wt = ba->rtopk_w[t * k + j];
            const float *y = ba->y_ret + (size_t)a * d;
            for (size_t i = 0; i < d; i++) o[i] += wt * y[i];
        }
    }
    dispatch_time(ba, t0);
}

static void a2a_backward(struct par_model *pm, struct par_block_acts *ba,
                         const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                         const float *dout, float *dm, float *dtopk_w)
{
    size_t const Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    int const k = pm->cfg.num_experts_per_tok;
    double t0 = omp_get_wtime();
    /* dy of each send row = w * dout of its token; dw = <dout, y> */
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < Ns; t++) {
        const float *g = dout + t * d;
        for (int j = 0; j < k; j++) {
            int const a = ba->slot_row[t * k + j];
            if (a < 0) {
                dtopk_w[t * k + j] = 0.0f;
                continue;
            }
            float const wt = ba->rtopk_w[t * k + j];
            const float *y = ba->y_ret + (size_t)a * d;
            float *dy = pm->xsend + (size_t)a * d;
            float dot = 0.0f;
            for (size_t i = 0; i < d; i++) {
                dy[i] = wt * g[i];
                dot += g[i] * y[i];
            }
            dtopk_w[t * k + j] = dot;
        }
    }
    struct a2a_plan pl;
    a2a_plan_make(pm, ba, &pl);
    a2a_exchange(pm, &pl, pm->xsend, pm->xrecv, pm->xgather, false);
    gather_rows(pm->dy_perm, pm->xgather, ba->sorted_from, ba->rows, d);
    dispatch_time(ba, t0);

    experts_backward(pm, ba, w, gw);

    t0 = omp_get_wtime();
    scatter_rows(pm->xgather, pm->dx_perm, ba->sorted_from, ba->rows, d);
    a2a_plan_make(pm, ba, &pl);
    a2a_exchange(pm, &pl, pm->xsend, pm->xrecv, pm->xgather, true);
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < Ns; t++) {
        float *o = dm + t * d;
        memset(o, 0, d * sizeof *o);
        for (int j = 0; j < k; j++) {
            int const a = ba->slot_row[t * k + j];
            if (a < 0) continue;
            const float *dx = pm->xsend + (size_t)a * d;
            for (size_t i = 0; i < d; i++) o[i] += dx[i];
        }
    }
    dispatch_time(ba, t0);
}

/* ---------------------------------------------------------------- 2b. all-gather */

/* Gathers rows and routing over etp x ep and lays out the rows routed to local experts:
 * sorted_from = gathered token, slot_of = gathered slot, by [local expert][slot order]. */
static void ag_forward(struct par_model *pm, struct par_block_acts *ba,
                       const struct model_layer_ptrs *w, float *out)
{
    size_t const Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    int const E = pm->cfg.num_local_experts, k = pm->cfg.num_experts_per_tok;
    int const El = E / pm->groups.ep.size, e0 = pm->lay.ep_rank * El;
    const struct dist_group *g = &pm->groups.etpep;
    size_t const Ng = Ns * (size_t)g->size, S = Ng * (size_t)k;
    double t0 = omp_get_wtime();
    float *m_g = pm->xgather;
    dist_allgather(g, DIST_ETPEP, m_g, ba->m_loc, Ns * d);
    dist_allgather(g, DIST_ETPEP, ba->w_g, ba->rtopk_w, Ns * (size_t)k);
    dist_allgather_bytes(g, DIST_ETPEP, ba->topk_g, ba->rtopk, Ns * (size_t)k * sizeof(int));
    dist_allgather_bytes(g, DIST_ETPEP, ba->kept_g, ba->kept, Ns * (size_t)k);
    size_t row = 0;
    for (int le = 0; le < El; le++) {
        ba->expert_off[le] = row;
        for (size_t s = 0; s < S; s++)
            if (ba->kept_g[s] && ba->topk_g[s] == e0 + le) {
                ba->sorted_from[row] = (int)(s / (size_t)k);
                ba->slot_of[row++] = (int)s;
            }
    }
    ba->expert_off[El] = row;
    ba->rows = row;
    gather_rows(ba->x_perm, m_g, ba->sorted_from, row, d);
    dispatch_time(ba, t0);

    experts_forward(pm, ba, w);

    t0 = omp_get_wtime();
    float *out_g = g->size > 1 ? pm->xgather : out;
    memset(out_g, 0, Ng * d * sizeof(float));
    /* rows of one token may belong to several local experts: a serial pass over rows keeps
     * the sum's order fixed */
    for (size_t r = 0; r < row; r++) {
        float const wt = ba->w_g[ba->slot_of[r]];
        float *o = out_g + (size_t)ba->sorted_from[r] * d;
        const float *y = ba->y_perm + r * d;
        for (size_t i = 0; i < d; i++) o[i] += wt * y[i];
    }
    dist_reduce_scatter(g, DIST_ETPEP, out, out_g, Ns * d);
    dispatch_time(ba, t0);
}

static void ag_backward(struct par_model *pm, struct par_block_acts *ba,
                        const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                        const float *dout, float *dm, float *dtopk_w)
{
    size_t const Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    int const k = pm->cfg.num_experts_per_tok;
    const struct dist_group *g = &pm->groups.etpep;
    size_t const Ng = Ns * (size_t)g->size;
    double t0 = omp_get_wtime();
    float *dout_g = pm->xgather, *dw_g = pm->xsend;
    dist_allgather(g, DIST_ETPEP, dout_g, dout, Ns * d);
    memset(dw_g, 0, Ng * (size_t)k * sizeof(float));
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < ba->rows; r++) {
        const float *gr = dout_g + (size_t)ba->sorted_from[r] * d, *y = ba->y_perm + r * d;
        float const wt = ba->w_g[ba->slot_of[r]];
        float *dy = pm->dy_perm + r * d;
        float dot = 0.0f;
        for (size_t i = 0; i < d; i++) {
            dy[i] = wt * gr[i];
            dot += gr[i] * y[i];
        }
        dw_g[ba->slot_of[r]] = dot; /* each slot has one expert, so one row */
    }
    /* partial over the F slices (etp) and held by the expert's rank (ep): sum and return */
    dist_reduce_scatter(g, DIST_ETPEP, dtopk_w, dw_g, Ns * (size_t)k);
    dispatch_time(ba, t0);

    experts_backward(pm, ba, w, gw);

    t0 = omp_get_wtime();
    float *dm_g = g->size > 1 ? pm->xgather : dm;
    memset(dm_g, 0, Ng * d * sizeof(float));
    for (size_t r = 0; r < ba->rows; r++) {
        float *o = dm_g + (size_t)ba->sorted_from[r] * d;
        const float *dx = pm->dx_perm + r * d;
        for (size_t i = 0; i < d; i++) o[i] += dx[i];
    }
    dist_reduce_scatter(g, DIST_ETPEP, dm, dm_g, Ns * d);
    dispatch_time(ba, t0);
}

/* ---------------------------------------------------------------- entry points */

void par_moe_dispatch_forward(struct par_model *pm, struct par_block_acts *ba,
                              const struct model_layer_ptrs *w, float *out)
{
    if (pm->cfg.moe_token_dispatcher_type == MODEL_DISPATCH_ALLGATHER) ag_forward(pm, ba, w, out);
    else a2a_forward(pm, ba, w, out);
}

void par_moe_dispatch_backward(struct par_model *pm, struct par_block_acts *ba,
                               const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                               const float *dout, float *dm, float *dtopk_w)
{
    if (pm->cfg.moe_token_dispatcher_type == MODEL_DISPATCH_ALLGATHER)
        ag_backward(pm, ba, w, gw, dout, dm, dtopk_w);
    else
        a2a_backward(pm, ba, w, gw, dout, dm, dtopk_w);
}
