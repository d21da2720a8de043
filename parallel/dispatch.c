/* The token dispatcher of one MoE layer (shared/docs/parallelism.md).
 *
 * 1. Decide: the routing of the whole micro-batch is gathered over the ranks that hold
 *    its tokens (tp x cp) and every one of them takes the capacity decision of model.md
 *    on it, so the kept assignments are those of one rank, whatever the layout.
 * 2. Dispatch the kept (token, slot) copies to the ranks of their experts over the MoE
 *    grid's etp x ep group, which may hold tokens of other micro-batches (folding):
 *    - alltoall: permute expert-major and send each (local expert, source) chunk straight
 *      to its place in the experts' [local expert][source] block on every rank of etp x ep
 *      that holds the expert (the all-to-all over EP and all-gather over ETP in one step),
 *      one GEMM per expert, then the reverse (each ETP rank's partial rows straight back
 *      to their source) and the weighted sum of the partial rows at the source;
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
    double *sums = pm->scr.router_sums;
    memset(sums, 0, (size_t)(2 * E + 1) * sizeof *sums);
    for (size_t t = 0; t < Ns; t++) {
        for (int j = 0; j < k; j++) sums[ba->rtopk[t * k + j]] += 1.0;
        for (int e = 0; e < E; e++) sums[E + e] += ba->rprobs[t * E + e];
        sums[2 * E] += (double)ba->rlse[t] * ba->rlse[t];
    }
    dist_allreduce_sum_f64(&pm->groups.tpcp, DIST_TPCP, sums, (size_t)(2 * E + 1));
    double const Ng = (double)pm->shape.Nmb;
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
    size_t const S = pm->shape.Nmb * (size_t)k;
    float margin = INFINITY;
    if (c->moe_capacity_factor <= 0.0) {
        memset(kept, 1, S);
        return margin;
    }
    size_t const C = (size_t)ceil(c->moe_capacity_factor * (double)pm->shape.Nmb * k / E);
    size_t *per_expert = pm->scr.expert_counts, *fill = per_expert + E + 1;
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
    size_t const Ns = pm->shape.Ns, N = pm->shape.Nmb, S = N * (size_t)k;
    const struct dist_group *g = &pm->groups.tpcp;
    struct par_scratch *s = &pm->scr;
    /* Gathered in the group's rank order, then placed by token index. */
    int *tok = pm->scr.gathered_token, *topk = pm->scr.gathered_topk;
    float *probs = pm->scr.gathered_probs;
    dist_allgather_bytes(g, DIST_TPCP, tok, pm->row_token, Ns * sizeof(int));
    dist_allgather_bytes(g, DIST_TPCP, topk, ba->rtopk, Ns * (size_t)k * sizeof(int));
    dist_allgather(g, DIST_TPCP, probs, ba->rprobs, Ns * (size_t)E);
    for (size_t r = 0; r < N; r++) {
        size_t const t = (size_t)tok[r];
        memcpy(s->full_topk + t * k, topk + r * k, (size_t)k * sizeof(int));
        memcpy(s->full_probs + t * E, probs + r * E, (size_t)E * sizeof(float));
    }
    float const drop_margin =
        decide_capacity(pm, s->full_topk, s->full_probs, s->full_kept, s->by_expert);
    ba->margin = fminf(drop_margin, topk_margin(s->full_topk, s->full_probs, N, E, k));

    size_t *kept_per_expert = s->expert_counts;
    memset(kept_per_expert, 0, (size_t)E * sizeof *kept_per_expert);
    long kept_total = 0;
    for (size_t i = 0; i < S; i++) {
        kept_per_expert[s->full_topk[i]] += s->full_kept[i];
        kept_total += s->full_kept[i];
    }
    ba->tokens_max = 0;
    for (int e = 0; e < E; e++)
        if ((long)kept_per_expert[e] > ba->tokens_max) ba->tokens_max = (long)kept_per_expert[e];
    ba->dropped = (long)S - kept_total;
    for (size_t r = 0; r < Ns; r++)
        memcpy(ba->kept + r * k, s->full_kept + (size_t)pm->row_token[r] * k, (size_t)k);
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
        identity_rows(pm, pm->scr.dx_perm, pm->scr.dy_perm, ba->rows);
        return;
    }
    for (int el = 0; el < El; el++) {
        size_t const r0 = ba->expert_off[el], n = ba->expert_off[el + 1] - r0;
        model_expert_backward(pm->scr.dx_perm + r0 * d, gw->w1[el], gw->w3[el], gw->w2[el],
                              pm->scr.dy_perm + r0 * d, ba->h1 + r0 * Fl, ba->h3 + r0 * Fl,
                              ba->act + r0 * Fl, ba->x_perm + r0 * d, w->w1[el], w->w3[el],
                              w->w2[el], n, d, Fl, pm->scr.expert_ws);
    }
    par_timers[PAR_T_EXPERTS] += omp_get_wtime() - t0;
}

/* dst row i = src row slot[i] / k. */
static void take_rows(float *restrict dst, const float *restrict src, const int *slot, size_t n,
                      size_t d, int k)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        memcpy(dst + i * d, src + (size_t)(slot[i] / k) * d, d * sizeof *dst);
}

/* A weighted sum of rows into one output row o: the terms in the order added, the first
 * two in one pass; zero when none. */
struct row_sum {
    float *o;
    const float *y0;
    float w0;
    int n;
    size_t d;
};

static void row_sum_add(struct row_sum *rs, const float *y, float w)
{
    float *restrict o = rs->o;
    const float *restrict x = y;
    size_t const d = rs->d;
    if (rs->n == 0) {
        rs->y0 = y;
        rs->w0 = w;
    } else if (rs->n == 1) {
        const float *restrict a = rs->y0;
        float const wa = rs->w0;
#pragma omp simd
        for (size_t c = 0; c < d; c++) o[c] = wa * a[c] + w * x[c];
    } else {
#pragma omp simd
        for (size_t c = 0; c < d; c++) o[c] += w * x[c];
    }
    rs->n++;
}

static void row_sum_end(struct row_sum *rs)
{
    float *restrict o = rs->o;
    const float *restrict a = rs->y0;
    float const wa = rs->w0;
    if (rs->n == 0) {
        memset(o, 0, rs->d * sizeof *o);
    } else if (rs->n == 1) {
#pragma omp simd
        for (size_t c = 0; c < rs->d; c++) o[c] = wa * a[c];
    }
}

/* ---------------------------------------------------------------- 2a. all-to-all */

/* One exchange each way over the etp x ep group X: every rank of X sends the rows routed
 * to the experts of ep coordinate b to each of the etp ranks at b (the all-to-all over EP
 * and the all-gather over ETP of parallelism.md in one step), and the way back returns
 * each ETP rank's partial rows to their source, which sums them in the weighted combine
 * (the reduce-scatter over ETP and the all-to-all back in one step). The bytes on the wire
 * are those of the two-step form. Every piece is contiguous on both sides, so Open MPI
 * moves it with one copy: send rows are expert-major, and the expert block is
 * [local expert][source in X order], so one piece is one (local expert, source) chunk and
 * the block needs no sort. A rank's own rows go straight from the token rows into its
 * expert block and are read back from there. */
struct a2a_plan {
    int q, me, etp, E, El, a, b; /* |X|, my rank in X, ETP size, experts, local experts,
                                    my (etp, ep) */
    const int *M;             /* (q, E): kept rows each rank of X sends to each expert */
    const int *start;         /* (E + 1): my first send row of each expert (expert-major) */
    const int *chunk;         /* (El q + 1): first expert-block row of chunk (le, source i) */
    size_t Sk, d;             /* rows of one ETP rank's part of a return buffer; hidden size */
};

/* The plan from the counts matrix; also the expert block's rows and expert_off. */
static void a2a_plan_make(struct par_model *pm, struct par_block_acts *ba, struct a2a_plan *pl)
{
    int const E = pm->cfg.num_local_experts, q = pm->groups.etpep.size;
    int const El = E / pm->groups.ep.size, b = pm->lay.ep_rank;
    int *start = pm->scr.xplan, *chunk = pm->scr.xplan + E + 1;
    *pl = (struct a2a_plan){.q = q, .me = pm->groups.etpep.rank, .etp = pm->groups.etp.size,
                            .E = E, .El = El, .a = pm->lay.etp_rank, .b = b,
                            .M = ba->counts_matrix, .start = start, .chunk = chunk,
                            .Sk = pm->shape.Ns * (size_t)pm->cfg.num_experts_per_tok,
                            .d = (size_t)pm->cfg.hidden_size};
    const int *mine = ba->counts_matrix + (size_t)pl->me * E;
    start[0] = 0;
    for (int e = 0; e < E; e++) start[e + 1] = start[e] + mine[e];
    int row = 0;
    for (int le = 0; le < El; le++) {
        ba->expert_off[le] = (size_t)row;
        for (int i = 0; i < q; i++) {
            chunk[le * q + i] = row;
            row += ba->counts_matrix[(size_t)i * E + b * El + le];
        }
    }
    chunk[El * q] = row;
    ba->expert_off[El] = (size_t)row;
    ba->rows = (size_t)row;
}

/* Rows of chunk x = le q + i of the expert block, and of my expert e's send rows. */
static size_t chunk_rows(const struct a2a_plan *pl, int x)
{
    return (size_t)(pl->chunk[x + 1] - pl->chunk[x]);
}

static size_t expert_rows(const struct a2a_plan *pl, int e)
{
    return (size_t)(pl->start[e + 1] - pl->start[e]);
}

/* First row of the chunk (le, source me) in the expert block of a rank at ep coordinate
 * bi: the rows of bi's earlier local experts, then those of earlier sources. */
static size_t chunk_at(const struct a2a_plan *pl, int bi, int le)
{
    size_t row = 0;
    for (int l2 = 0; l2 <= le; l2++)
        for (int i = 0; i < (l2 < le ? pl->q : pl->me); i++)
            row += (size_t)pl->M[(size_t)i * pl->E + bi * pl->El + l2];
    return row;
}

/* Writes the send rows [s0, s1) (rows of src, by token) straight to `remote` in peer's
 * memory, runs of consecutive tokens as one piece. */
static void write_rows(const struct par_model *pm, const struct par_block_acts *ba, int peer,
                       const float *src, int s0, int s1, float *remote)
{
    size_t const d = (size_t)pm->cfg.hidden_size, row = d * sizeof(float);
    int const k = pm->cfg.num_experts_per_tok;
    struct iovec piece[DIST_DIRECT_PIECES];
    int n = 0;
    size_t nbytes = 0;
    for (int s = s0; s < s1; s++) {
        const float *x = src + (size_t)(ba->send_slot[s] / k) * d;
        const struct iovec *last = n > 0 ? &piece[n - 1] : NULL;
        if (last && (const char *)last->iov_base + last->iov_len == (const char *)x) {
            piece[n - 1].iov_len += row;
        } else {
            if (n == DIST_DIRECT_PIECES) {
                dist_direct_write(&pm->direct, peer, piece, n, remote);
                remote += nbytes / sizeof(float);
                n = 0;
                nbytes = 0;
            }
            piece[n++] = (struct iovec){(void *)x, row};
        }
        nbytes += row;
    }
    if (n > 0) dist_direct_write(&pm->direct, peer, piece, n, remote);
}

/* Moves this rank's send rows (row s: the src row of its token) into the expert blocks
 * `perm` of the experts' ranks. src NULL: the caller has already put the rows in place
 * (those of every other rank packed in xsend, its own in perm). With `remote` (every
 * rank's block, and src), the rows for ranks that take direct writes are written there
 * straight from src and a notice follows; the others travel as MPI messages of packed
 * rows. The target block is free: its rank entered this layer's counts exchange, so it is
 * done with the block's last contents. */
static void a2a_dispatch(struct par_model *pm, const struct par_block_acts *ba,
                         const struct a2a_plan *pl, const float *src, float *perm,
                         const uint64_t *remote)
{
    const struct dist_group *g = &pm->groups.etpep;
    int const El = pl->El, q = pl->q, k = pm->cfg.num_experts_per_tok, ep = pm->groups.ep.size;
    size_t const d = pl->d;
    VD_CHECK(remote == NULL || src, "direct writes copy from src");
    const bool *direct = pm->direct.ok;
    MPI_Request *req = pm->scr.xreqs;
    int n = 0;
    size_t nbytes = 0;
    for (int i = 0; i < q; i++) {
        if (i == pl->me) continue;
        if (remote && direct[i]) {
            dist_expect_notice(g, i, El, &req[n++]);
            continue;
        }
        for (int le = 0; le < El; le++) {
            int const x = le * q + i;
            dist_irecv(g, perm + (size_t)pl->chunk[x] * d, chunk_rows(pl, x) * d, i, le,
                       &req[n++]);
        }
    }
    /* Peers in turn from the next rank on (not all at rank 0 first). The rows of an ep
     * coordinate that MPI peers take are packed before its first MPI send, so that one
     * travels while the next coordinate is packed. */
    bool *packed = pm->scr.xpack;
    if (src) memset(packed, 0, (size_t)ep * sizeof *packed);
    for (int j = 1; j < q; j++) {
        int const i = (pl->me + j) % q, bi = pm->etpep_ep[i];
        bool const by_mpi = !(remote && direct[i]);
        if (by_mpi && src && !packed[bi]) {
            int const s0 = pl->start[bi * El], s1 = pl->start[(bi + 1) * El];
            take_rows(pm->scr.xsend + (size_t)s0 * d, src, ba->send_slot + s0, (size_t)(s1 - s0),
                      d, k);
            packed[bi] = true;
        }
        for (int le = 0; le < El; le++) {
            int const e = bi * El + le;
            size_t const cnt = expert_rows(pl, e) * d;
            nbytes += cnt * sizeof(float);
            if (by_mpi) {
                dist_isend(g, pm->scr.xsend + (size_t)pl->start[e] * d, cnt, i, le, &req[n++]);
            } else if (cnt > 0) {
                float *to = (float *)(uintptr_t)remote[i] + chunk_at(pl, bi, le) * d;
                write_rows(pm, ba, i, src, pl->start[e], pl->start[e + 1], to);
            }
        }
        if (!by_mpi) dist_notify(g, i, El, &req[n++]); /* all written */
    }
    for (int le = 0; le < El && src; le++) {
        int const e = pl->b * El + le;
        take_rows(perm + (size_t)pl->chunk[le * q + pl->me] * d, src,
                  ba->send_slot + pl->start[e], expert_rows(pl, e), d, k);
    }
    dist_wait_all(req, n, DIST_ETPEP, nbytes);
}

/* Returns the expert block's rows `perm` (partial over the F slices) to their sources: the
 * row of send row s from ETP rank a lands in ret at a Sk + s; the rows a rank returns to
 * itself stay in perm (a2a_part finds either). */
static void a2a_return(struct par_model *pm, const struct a2a_plan *pl, const float *perm,
                       float *ret)
{
    const struct dist_group *g = &pm->groups.etpep;
    int const El = pl->El, q = pl->q;
    size_t const d = pl->d;
    MPI_Request *req = pm->scr.xreqs;
    int n = 0;
    size_t nbytes = 0;
    for (int i = 0; i < q; i++)
        for (int le = 0; le < El && i != pl->me; le++) {
            int const e = pm->etpep_ep[i] * El + le;
            size_t const row = (size_t)pm->etpep_etp[i] * pl->Sk + (size_t)pl->start[e];
            dist_irecv(g, ret + row * d, expert_rows(pl, e) * d, i, le, &req[n++]);
        }
    for (int i = 0; i < q; i++)
        for (int le = 0; le < El && i != pl->me; le++) {
            int const x = le * q + i;
            size_t const cnt = chunk_rows(pl, x) * d;
            dist_isend(g, perm + (size_t)pl->chunk[x] * d, cnt, i, le, &req[n++]);
            nbytes += cnt * sizeof(float);
        }
    dist_wait_all(req, n, DIST_ETPEP, nbytes);
}

/* The partial row of my send row s (routed to expert e) from the ETP rank a at e's ep
 * coordinate: my own in perm, or returned in ret. */
static const float *a2a_part(const struct a2a_plan *pl, const float *perm, const float *ret,
                             int e, size_t s, int a)
{
    if (a == pl->a && e / pl->El == pl->b) {
        size_t const row = (size_t)pl->chunk[(e % pl->El) * pl->q + pl->me] + s -
                           (size_t)pl->start[e];
        return perm + row * pl->d;
    }
    return ret + ((size_t)a * pl->Sk + s) * pl->d;
}

/* out (Ns, d): each token's sum over its kept slots of wts[slot] (1 when NULL) times the
 * slot's expert output, the sum of the ETP ranks' partial rows; terms in (slot, ETP rank)
 * order. */
static void a2a_combine(const struct par_model *pm, const struct par_block_acts *ba,
                        const struct a2a_plan *pl, const float *perm, const float *ret,
                        const float *wts, float *out)
{
    size_t const Ns = pm->shape.Ns, d = pl->d;
    int const k = pm->cfg.num_experts_per_tok;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < Ns; t++) {
        struct row_sum rs = {.o = out + t * d, .d = d};
        for (int j = 0; j < k; j++) {
            size_t const slot = t * (size_t)k + (size_t)j;
            int const s = ba->slot_row[slot];
            for (int a = 0; a < pl->etp && s >= 0; a++)
                row_sum_add(&rs, a2a_part(pl, perm, ret, ba->rtopk[slot], (size_t)s, a),
                            wts ? wts[slot] : 1.0f);
        }
        row_sum_end(&rs);
    }
}

static void a2a_forward(struct par_model *pm, struct par_block_acts *ba,
                        const struct model_layer_ptrs *w, float *out)
{
    size_t const Ns = pm->shape.Ns;
    int const E = pm->cfg.num_local_experts, k = pm->cfg.num_experts_per_tok;
    double t0 = omp_get_wtime();
    /* send rows: the kept local slots, expert-major, in (token, slot) order per expert */
    int *cnt = ba->counts_matrix + (size_t)pm->groups.etpep.rank * E;
    memset(cnt, 0, (size_t)E * sizeof *cnt);
    for (size_t s = 0; s < Ns * (size_t)k; s++) cnt[ba->rtopk[s]] += ba->kept[s];
    int *fill = pm->scr.send_fill;
    fill[0] = 0;
    for (int e = 0; e < E; e++) fill[e + 1] = fill[e] + cnt[e];
    ba->send_rows = (size_t)fill[E];
    for (size_t s = 0; s < Ns * (size_t)k; s++) {
        ba->slot_row[s] = ba->kept[s] ? fill[ba->rtopk[s]]++ : -1;
        if (ba->kept[s]) ba->send_slot[ba->slot_row[s]] = (int)s;
    }
    /* every rank's counts, so each can lay out what it receives */
    dist_allgather_bytes(&pm->groups.etpep, DIST_ETPEP, ba->counts_matrix, cnt,
                         (size_t)E * sizeof *cnt);
    struct a2a_plan pl;
    a2a_plan_make(pm, ba, &pl);
    a2a_dispatch(pm, ba, &pl, ba->m_loc, ba->x_perm, ba->peer_x_perm);
    dispatch_time(ba, t0);

    experts_forward(pm, ba, w);

    t0 = omp_get_wtime();
    a2a_return(pm, &pl, ba->y_perm, ba->y_ret);
    a2a_combine(pm, ba, &pl, ba->y_perm, ba->y_ret, ba->rtopk_w, out);
    dispatch_time(ba, t0);
}

static void a2a_backward(struct par_model *pm, struct par_block_acts *ba,
                         const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                         const float *dout, float *dm, float *dtopk_w)
{
    size_t const Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    int const k = pm->cfg.num_experts_per_tok;
    double t0 = omp_get_wtime();
    struct a2a_plan pl;
    a2a_plan_make(pm, ba, &pl);
    /* One pass over the kept slots: dw = <dout, y> (y: the sum of the ETP partials kept
     * from the forward), and dy = w dout into its send row, packed for MPI peers and in
     * place in the expert block for this rank's own experts. */
    int const El = pl.El, q = pl.q, ep = pm->groups.ep.size;
    bool *pack = pm->scr.xpack;
    for (int b2 = 0; b2 < ep; b2++) pack[b2] = b2 != pl.b || pl.etp > 1; /* another rank's */
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < Ns; t++) {
        const float *restrict g = dout + t * d;
        for (int j = 0; j < k; j++) {
            size_t const slot = t * (size_t)k + (size_t)j;
            int const s = ba->slot_row[slot], e = ba->rtopk[slot];
            if (s < 0) {
                dtopk_w[slot] = 0.0f;
                continue;
            }
            float *packed = pack[e / El] ? pm->scr.xsend + (size_t)s * d : NULL, *own = NULL;
            if (e / El == pl.b)
                own = pm->scr.dy_perm +
                      ((size_t)pl.chunk[(e % El) * q + pl.me] + (size_t)(s - pl.start[e])) * d;
            float *restrict dy = own ? own : packed;
            const float *restrict y = a2a_part(&pl, ba->y_perm, ba->y_ret, e, (size_t)s, 0);
            float const wt = ba->rtopk_w[slot];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (size_t i = 0; i < d; i++) {
                dy[i] = wt * g[i];
                dot += g[i] * y[i];
            }
            if (own && packed) memcpy(packed, own, d * sizeof *own);
            for (int a = 1; a < pl.etp; a++) {
                const float *restrict ya = a2a_part(&pl, ba->y_perm, ba->y_ret, e, (size_t)s, a);
#pragma omp simd reduction(+ : dot)
                for (size_t i = 0; i < d; i++) dot += g[i] * ya[i];
            }
            dtopk_w[slot] = dot;
        }
    }
    a2a_dispatch(pm, ba, &pl, NULL, pm->scr.dy_perm, NULL);
    dispatch_time(ba, t0);

    experts_backward(pm, ba, w, gw);

    t0 = omp_get_wtime();
    a2a_return(pm, &pl, pm->scr.dx_perm, pm->scr.xrecv);
    a2a_combine(pm, ba, &pl, pm->scr.dx_perm, pm->scr.xrecv, NULL, dm);
    dispatch_time(ba, t0);
}

/* ---------------------------------------------------------------- 2b. all-gather */

/* out_g (Ng, d): each gathered token's sum over its slots routed to local experts of
 * wts[slot] (1 when NULL) times the expert row, in slot order; partial over the ranks of
 * etp x ep, which the reduce-scatter completes. */
static void ag_combine(const struct par_model *pm, const struct par_block_acts *ba,
                       const float *perm, const float *wts, float *out_g)
{
    size_t const d = (size_t)pm->cfg.hidden_size;
    size_t const Ng = pm->shape.Ns * (size_t)pm->groups.etpep.size;
    int const k = pm->cfg.num_experts_per_tok;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < Ng; t++) {
        struct row_sum rs = {.o = out_g + t * d, .d = d};
        for (int j = 0; j < k; j++) {
            size_t const slot = t * (size_t)k + (size_t)j;
            int const r = ba->row_of_slot[slot];
            if (r >= 0) row_sum_add(&rs, perm + (size_t)r * d, wts ? wts[slot] : 1.0f);
        }
        row_sum_end(&rs);
    }
}

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
    float *m_g = pm->scr.xgather;
    dist_allgather(g, DIST_ETPEP, m_g, ba->m_loc, Ns * d);
    dist_allgather(g, DIST_ETPEP, ba->w_g, ba->rtopk_w, Ns * (size_t)k);
    dist_allgather_bytes(g, DIST_ETPEP, ba->topk_g, ba->rtopk, Ns * (size_t)k * sizeof(int));
    dist_allgather_bytes(g, DIST_ETPEP, ba->kept_g, ba->kept, Ns * (size_t)k);
    size_t row = 0;
    for (size_t s = 0; s < S; s++) ba->row_of_slot[s] = -1;
    for (int le = 0; le < El; le++) {
        ba->expert_off[le] = row;
        for (size_t s = 0; s < S; s++)
            if (ba->kept_g[s] && ba->topk_g[s] == e0 + le) {
                ba->sorted_from[row] = (int)(s / (size_t)k);
                ba->row_of_slot[s] = (int)row;
                ba->slot_of[row++] = (int)s;
            }
    }
    ba->expert_off[El] = row;
    ba->rows = row;
    take_rows(ba->x_perm, m_g, ba->sorted_from, row, d, 1);
    dispatch_time(ba, t0);

    experts_forward(pm, ba, w);

    t0 = omp_get_wtime();
    float *out_g = g->size > 1 ? pm->scr.xgather : out;
    ag_combine(pm, ba, ba->y_perm, ba->w_g, out_g);
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
    float *dout_g = pm->scr.xgather, *dw_g = pm->scr.xsend;
    dist_allgather(g, DIST_ETPEP, dout_g, dout, Ns * d);
    memset(dw_g, 0, Ng * (size_t)k * sizeof(float));
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < ba->rows; r++) {
        const float *gr = dout_g + (size_t)ba->sorted_from[r] * d, *y = ba->y_perm + r * d;
        float const wt = ba->w_g[ba->slot_of[r]];
        float *dy = pm->scr.dy_perm + r * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
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
    float *dm_g = g->size > 1 ? pm->scr.xgather : dm;
    ag_combine(pm, ba, pm->scr.dx_perm, NULL, dm_g);
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
