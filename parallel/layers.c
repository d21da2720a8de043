/* The rank's share of the model and the transformer's layers: embedding, attention
 * sub-block, MoE sub-block (router, dispatcher, experts), head with cross-entropy.
 * Each is a forward/backward pair over the micro-batch's saved activations. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/parallel.h"
#include "parallel/parallel_internal.h"

double par_timers[PAR_T_COUNT];

const char *par_timer_name(enum par_timer t)
{
    static const char *const names[PAR_T_COUNT] = {"attention", "router", "experts",
                                                   "dispatch", "other"};
    return t < PAR_T_COUNT ? names[t] : "?";
}

void par_groups_serial(struct par_groups *g)
{
    struct dist_group *all[] = {&g->tp, &g->cp, &g->dp, &g->dpcp, &g->tpcp, &g->pp,
                                &g->ep, &g->etp, &g->edp, &g->etpep};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) dist_group_self(all[i]);
}

/* Carves consecutive, 64-byte aligned pieces out of one allocation. */
struct arena {
    char *base;
    size_t used, cap;
};

static void *arena_take(struct arena *a, size_t nbytes)
{
    size_t const aligned = (nbytes + 63) & ~(size_t)63;
    if (a->base == NULL) { /* sizing pass */
        a->used += aligned;
        return NULL;
    }
    VD_CHECK(a->used + aligned <= a->cap, "arena overflow");
    void *p = a->base + a->used;
    a->used += aligned;
    return p;
}

/* Lays out every activation and scratch buffer; called once to size, once to assign. */
static void layout_buffers(struct par_model *pm, struct arena *acts, struct arena *scr)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, d = (size_t)c->hidden_size;
    int const B = pm->shape.B, T = pm->shape.T;
    size_t const hd = d / (size_t)c->num_attention_heads;
    size_t const Hl = (size_t)(c->num_attention_heads / pm->lay.tp);
    size_t const Gl = (size_t)(c->num_key_value_heads / pm->lay.tp);
    size_t const E = (size_t)c->num_local_experts, k = (size_t)c->num_experts_per_tok;
    size_t const E_local = E / (size_t)pm->lay.ep;
    size_t const Fl = (size_t)(c->intermediate_size / pm->lay.etp);
    size_t const Vl = (size_t)(c->vocab_size / pm->lay.tp);
    size_t const A = par_moe_rows_max(pm);
    int const nl = pm->lay.layer_end - pm->lay.layer_begin;
    size_t const f = sizeof(float);

    pm->inputs = arena_take(acts, N * sizeof(int));
    pm->targets = arena_take(acts, N * sizeof(int));
    pm->pos = arena_take(acts, N * sizeof(int));
    pm->resid = arena_take(acts, (size_t)(nl + 1) * N * d * f);
    for (int l = 0; l < nl; l++) {
        struct par_block_acts *ba = &pm->blocks[l];
        ba->h_mid = arena_take(acts, N * d * f);
        ba->a = arena_take(acts, N * d * f);
        ba->rstd1 = arena_take(acts, N * f);
        ba->q = arena_take(acts, N * Hl * hd * f);
        ba->k = arena_take(acts, N * Gl * hd * f);
        ba->v = arena_take(acts, N * Gl * hd * f);
        ba->probs = arena_take(acts, (size_t)B * Hl * (size_t)T * (size_t)T * f);
        ba->att = arena_take(acts, N * Hl * hd * f);
        ba->m = arena_take(acts, N * d * f);
        ba->rstd2 = arena_take(acts, N * f);
        ba->rprobs = arena_take(acts, N * E * f);
        ba->rtopk_w = arena_take(acts, N * k * f);
        ba->rlse = arena_take(acts, N * f);
        ba->rtopk = arena_take(acts, N * k * sizeof(int));
        ba->slot_pos = arena_take(acts, N * k * sizeof(int));
        ba->perm_src = arena_take(acts, A * sizeof(int));
        ba->expert_off = arena_take(acts, (E_local + 1) * sizeof(size_t));
        ba->counts = arena_take(acts, E * f);
        ba->x_perm = arena_take(acts, A * d * f);
        ba->h1 = arena_take(acts, A * Fl * f);
        ba->h3 = arena_take(acts, A * Fl * f);
        ba->act = arena_take(acts, A * Fl * f);
        ba->y_perm = arena_take(acts, A * d * f);
    }
    if (pm->lay.has_head) {
        pm->hn = arena_take(acts, N * d * f);
        pm->rstd_f = arena_take(acts, N * f);
        pm->logits = arena_take(acts, N * Vl * f);
        pm->rowmax = arena_take(acts, N * f);
        pm->rowsum = arena_take(acts, N * f);
    }
    size_t const big = N * (Vl > d ? Vl : d);
    pm->dh = arena_take(scr, N * d * f);
    pm->dtmp = arena_take(scr, big * f);
    pm->dq = arena_take(scr, N * Hl * hd * f);
    pm->dk = arena_take(scr, N * Gl * hd * f);
    pm->dv = arena_take(scr, N * Gl * hd * f);
    pm->datt = arena_take(scr, N * Hl * hd * f);
    pm->drl = arena_take(scr, N * E * f);
    pm->dtopk_w = arena_take(scr, N * k * f);
    pm->dx_perm = arena_take(scr, A * d * f);
    pm->dy_perm = arena_take(scr, A * d * f);
    pm->exp_scratch = arena_take(scr, A * 2 * Fl * f);
    pm->att_scratch = arena_take(scr, model_attention_scratch_floats(T) * f);
    pm->rope_cos = arena_take(scr, (size_t)T * hd / 2 * f);
    pm->rope_sin = arena_take(scr, (size_t)T * hd / 2 * f);
    pm->router_sums = arena_take(scr, (2 * E + 1) * sizeof(double));
    pm->expert_counts = arena_take(scr, 3 * (E + 1) * sizeof(size_t));
    pm->aux_coef = arena_take(scr, E * f);
}

int par_model_init(struct par_model *pm, const struct model_config *cfg,
                   const struct model_layout *lay, const struct par_groups *groups, int B,
                   int T)
{
    memset(pm, 0, sizeof *pm);
    pm->cfg = *cfg;
    pm->lay = *lay;
    pm->groups = *groups;
    pm->shape.B = B;
    pm->shape.T = T;
    pm->shape.N = (size_t)B * (size_t)T;
    FORWARD_IF(model_table_build(&pm->tab, cfg, lay));

    size_t const nbytes = pm->tab.numel * sizeof(float);
    pm->params = vd_calloc(pm->tab.numel, sizeof(float));
    pm->grads = vd_calloc(pm->tab.numel, sizeof(float));
    pm->adam_m = vd_calloc(pm->tab.numel, sizeof(float));
    pm->adam_v = vd_calloc(pm->tab.numel, sizeof(float));
    (void)nbytes;
    model_ptrs_build(&pm->p, &pm->tab, pm->params, lay, cfg->num_local_experts);
    model_ptrs_build(&pm->g, &pm->tab, pm->grads, lay, cfg->num_local_experts);

    /* The ordered layer list of this stage. */
    int const nl = lay->layer_end - lay->layer_begin;
    pm->layers = vd_calloc((size_t)nl + 2, sizeof *pm->layers);
    if (lay->has_embed) pm->layers[pm->nlayers++] = (struct par_layer){PAR_LAYER_EMBED, -1};
    for (int l = lay->layer_begin; l < lay->layer_end; l++)
        pm->layers[pm->nlayers++] = (struct par_layer){PAR_LAYER_BLOCK, l};
    if (lay->has_head) pm->layers[pm->nlayers++] = (struct par_layer){PAR_LAYER_HEAD, -1};

    pm->blocks = vd_calloc((size_t)(nl > 0 ? nl : 1), sizeof *pm->blocks);
    struct arena acts = {0}, scr = {0};
    layout_buffers(pm, &acts, &scr);
    pm->act_nbytes = acts.used;
    pm->scratch_nbytes = scr.used;
    acts = (struct arena){.base = vd_alloc(acts.used), .cap = acts.used};
    scr = (struct arena){.base = vd_alloc(scr.used), .cap = scr.used};
    memset(acts.base, 0, acts.cap);
    memset(scr.base, 0, scr.cap);
    layout_buffers(pm, &acts, &scr);
    pm->act_base = acts.base;
    pm->scratch_base = scr.base;

    int const hd = cfg->hidden_size / cfg->num_attention_heads;
    model_rope_table(pm->rope_cos, pm->rope_sin, T, hd, cfg->rope_theta);
    return 0;
}

void par_model_free(struct par_model *pm)
{
    model_ptrs_free(&pm->p);
    model_ptrs_free(&pm->g);
    model_table_free(&pm->tab);
    free(pm->params);
    free(pm->grads);
    free(pm->adam_m);
    free(pm->adam_v);
    free(pm->layers);
    free(pm->blocks);
    free(pm->act_base);
    free(pm->scratch_base);
    memset(pm, 0, sizeof *pm);
}

void par_zero_grads(struct par_model *pm)
{
    memset(pm->grads, 0, pm->tab.numel * sizeof(float));
}

/* ---------------------------------------------------------------- embedding */

/* h (N, d) = embed[x]. */
static void embed_forward(struct par_model *pm, float *h)
{
    size_t const d = (size_t)pm->cfg.hidden_size;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < pm->shape.N; t++)
        memcpy(h + t * d, pm->p.embed + (size_t)pm->inputs[t] * d, d * sizeof *h);
}

/* dembed[x_t] += dh_t; rows may repeat, so each thread owns a column range. */
static void embed_backward(struct par_model *pm, const float *dh)
{
    size_t const d = (size_t)pm->cfg.hidden_size;
#pragma omp parallel
    {
        int const nth = omp_get_num_threads(), th = omp_get_thread_num();
        size_t const c0 = d * (size_t)th / (size_t)nth, c1 = d * (size_t)(th + 1) / (size_t)nth;
        for (size_t t = 0; t < pm->shape.N; t++) {
            float *row = pm->g.embed + (size_t)pm->inputs[t] * d;
            for (size_t i = c0; i < c1; i++) row[i] += dh[t * d + i];
        }
    }
}

/* ---------------------------------------------------------------- attention sub-block */

/* h_mid (N, d) = h + o_proj(attention(rope(q, k), v)) of rmsnorm(h). */
static void attention_forward(struct par_model *pm, struct par_block_acts *ba,
                              const struct model_layer_ptrs *w, const float *h)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, d = (size_t)c->hidden_size;
    int const hd = c->hidden_size / c->num_attention_heads;
    int const Hl = c->num_attention_heads / pm->lay.tp, Gl = c->num_key_value_heads / pm->lay.tp;
    model_rmsnorm_forward(ba->a, ba->rstd1, h, w->ln1, N, d, (float)c->rms_norm_eps);
    model_matmul_forward(ba->q, ba->a, w->wq, N, d, (size_t)Hl * hd, false);
    model_matmul_forward(ba->k, ba->a, w->wk, N, d, (size_t)Gl * hd, false);
    model_matmul_forward(ba->v, ba->a, w->wv, N, d, (size_t)Gl * hd, false);
    model_rope_apply(ba->q, pm->pos, pm->rope_cos, pm->rope_sin, N, Hl, hd, false);
    model_rope_apply(ba->k, pm->pos, pm->rope_cos, pm->rope_sin, N, Gl, hd, false);
    model_attention_forward(ba->att, ba->probs, ba->q, ba->k, ba->v, pm->shape.B, pm->shape.T,
                            Hl, Gl, hd);
    memcpy(ba->h_mid, h, N * d * sizeof(float));
    model_matmul_forward(ba->h_mid, ba->att, w->wo, N, (size_t)Hl * hd, d, true);
}

/* dh (N, d): on entry d loss / d h_mid, on return d loss / d h (the block input). */
static void attention_backward(struct par_model *pm, struct par_block_acts *ba,
                               const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                               const float *h, float *dh)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, d = (size_t)c->hidden_size;
    int const hd = c->hidden_size / c->num_attention_heads;
    int const Hl = c->num_attention_heads / pm->lay.tp, Gl = c->num_key_value_heads / pm->lay.tp;
    size_t const qw = (size_t)Hl * hd, kw = (size_t)Gl * hd;
    model_matmul_backward(pm->datt, gw->wo, dh, ba->att, w->wo, N, qw, d, false);
    model_attention_backward(pm->dq, pm->dk, pm->dv, pm->datt, ba->probs, ba->q, ba->k, ba->v,
                             pm->shape.B, pm->shape.T, Hl, Gl, hd, pm->att_scratch);
    model_rope_apply(pm->dq, pm->pos, pm->rope_cos, pm->rope_sin, N, Hl, hd, true);
    model_rope_apply(pm->dk, pm->pos, pm->rope_cos, pm->rope_sin, N, Gl, hd, true);
    float *da = pm->dtmp;
    model_matmul_backward(da, gw->wq, pm->dq, ba->a, w->wq, N, d, qw, false);
    model_matmul_backward(da, gw->wk, pm->dk, ba->a, w->wk, N, d, kw, true);
    model_matmul_backward(da, gw->wv, pm->dv, ba->a, w->wv, N, d, kw, true);
    model_rmsnorm_backward(dh, gw->ln1, da, h, w->ln1, ba->rstd1, N, d);
}

/* ---------------------------------------------------------------- MoE sub-block */

/* h_out (N, d) = h_mid + sum over kept (t, e) of w_te expert_e(rmsnorm(h_mid)_t). */
static void moe_forward(struct par_model *pm, struct par_block_acts *ba,
                        const struct model_layer_ptrs *w, float *h_out, struct par_mb_stats *st)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, d = (size_t)c->hidden_size;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    int const Fl = c->intermediate_size / pm->lay.etp;
    double t0 = omp_get_wtime();
    model_rmsnorm_forward(ba->m, ba->rstd2, ba->h_mid, w->ln2, N, d, (float)c->rms_norm_eps);
    float *rlogits = pm->drl; /* router logits live only until the router has run */
    model_matmul_forward(rlogits, ba->m, w->router, N, d, (size_t)E, false);
    model_router_forward(ba->rprobs, ba->rtopk, ba->rtopk_w, ba->rlse, rlogits, N, E, k);
    par_router_losses(pm, ba, st);
    double t1 = omp_get_wtime();
    par_timers[PAR_T_ROUTER] += t1 - t0;

    size_t const rows = par_dispatch_plan(pm, ba, st);
    par_dispatch_gather(pm, ba, rows);
    double t2 = omp_get_wtime();
    par_timers[PAR_T_DISPATCH] += t2 - t1;

    int const E_local = E / pm->lay.ep;
    for (int el = 0; el < E_local; el++) {
        size_t const r0 = ba->expert_off[el], n = ba->expert_off[el + 1] - r0;
        model_expert_forward(ba->y_perm + r0 * d, ba->h1 + r0 * Fl, ba->h3 + r0 * Fl,
                             ba->act + r0 * Fl, ba->x_perm + r0 * d, w->w1[el], w->w3[el],
                             w->w2[el], n, (int)d, Fl);
    }
    double t3 = omp_get_wtime();
    par_timers[PAR_T_EXPERTS] += t3 - t2;

    memcpy(h_out, ba->h_mid, N * d * sizeof(float));
    par_dispatch_combine(pm, ba, h_out);
    par_timers[PAR_T_DISPATCH] += omp_get_wtime() - t3;
}

/* dh (N, d): on entry d loss / d h_out, on return d loss / d h_mid. */
static void moe_backward(struct par_model *pm, struct par_block_acts *ba,
                         const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                         float *dh, float loss_scale)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, d = (size_t)c->hidden_size;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    int const Fl = c->intermediate_size / pm->lay.etp;
    double t0 = omp_get_wtime();
    par_dispatch_combine_backward(pm, ba, dh, pm->dy_perm, pm->dtopk_w);
    double t1 = omp_get_wtime();
    par_timers[PAR_T_DISPATCH] += t1 - t0;

    int const E_local = E / pm->lay.ep;
    for (int el = 0; el < E_local; el++) {
        size_t const r0 = ba->expert_off[el], n = ba->expert_off[el + 1] - r0;
        model_expert_backward(pm->dx_perm + r0 * d, gw->w1[el], gw->w3[el], gw->w2[el],
                              pm->dy_perm + r0 * d, ba->h1 + r0 * Fl, ba->h3 + r0 * Fl,
                              ba->act + r0 * Fl, ba->x_perm + r0 * d, w->w1[el], w->w3[el],
                              w->w2[el], n, (int)d, Fl, pm->exp_scratch);
    }
    double t2 = omp_get_wtime();
    par_timers[PAR_T_EXPERTS] += t2 - t1;

    float *dm = pm->dtmp;
    par_dispatch_gather_backward(pm, ba, dm);
    double t3 = omp_get_wtime();
    par_timers[PAR_T_DISPATCH] += t3 - t2;

    /* Router: aux = alpha (E/k) sum_e (c_e/N) P_e with P_e = mean_t p_te, so
     * d aux / d p_te = alpha (E/k) c_e / N^2; z = beta mean_t lse_t^2 gives 2 beta lse_t / N. */
    double const Ng = (double)pm->shape.B * pm->shape.T;
    float *aux_coef = pm->aux_coef;
    for (int e = 0; e < E; e++)
        aux_coef[e] = (float)(c->router_aux_loss_coef * E / k * ba->counts[e] / (Ng * Ng) *
                              loss_scale);
    float const zcoef = (float)(2.0 * c->router_z_loss_coef / Ng * loss_scale);
    model_router_backward(pm->drl, pm->dtopk_w, ba->rprobs, ba->rtopk, ba->rtopk_w, ba->rlse,
                          aux_coef, zcoef, N, E, k);
    model_matmul_backward(dm, gw->router, pm->drl, ba->m, w->router, N, d, (size_t)E, true);
    model_rmsnorm_backward(dh, gw->ln2, dm, ba->h_mid, w->ln2, ba->rstd2, N, d);
    par_timers[PAR_T_ROUTER] += omp_get_wtime() - t3;
}

/* ---------------------------------------------------------------- head */

/* logits (N, V_l) = rmsnorm(h) lm_head^T; returns the micro-batch's mean cross-entropy. */
static double head_forward(struct par_model *pm, const float *h)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, d = (size_t)c->hidden_size;
    size_t const Vl = (size_t)(c->vocab_size / pm->lay.tp);
    int const v_begin = (int)Vl * pm->lay.tp_rank;
    model_rmsnorm_forward(pm->hn, pm->rstd_f, h, pm->p.norm, N, d, (float)c->rms_norm_eps);
    model_matmul_forward(pm->logits, pm->hn, pm->p.head, N, d, Vl, false);
    return par_vocab_crossentropy(pm, v_begin, Vl);
}

/* dh (N, d) = d loss / d h, overwritten. */
static void head_backward(struct par_model *pm, const float *h, float *dh, float loss_scale)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, d = (size_t)c->hidden_size;
    size_t const Vl = (size_t)(c->vocab_size / pm->lay.tp);
    int const v_begin = (int)Vl * pm->lay.tp_rank;
    double const Ng = (double)pm->shape.B * pm->shape.T;
    float *dlogits = pm->dtmp;
    model_crossentropy_backward(dlogits, pm->logits, pm->targets, pm->rowmax, pm->rowsum, N, Vl,
                                v_begin, (float)(loss_scale / Ng));
    float *dhn = pm->datt; /* (N, d) fits: Hl hd >= d / tp, and tp = 1 on this path */
    model_matmul_backward(dhn, pm->g.head, dlogits, pm->hn, pm->p.head, N, d, Vl, false);
    par_tp_reduce_input_grad(pm, dhn, N * d);
    memset(dh, 0, N * d * sizeof(float));
    model_rmsnorm_backward(dh, pm->g.norm, dhn, h, pm->p.norm, pm->rstd_f, N, d);
}

/* ---------------------------------------------------------------- the layer list */

void par_forward(struct par_model *pm, const int *inputs, const int *targets,
                 struct par_mb_stats *st)
{
    size_t const N = pm->shape.N, d = (size_t)pm->cfg.hidden_size;
    int const T = pm->shape.T;
    memset(st, 0, sizeof *st);
    memcpy(pm->inputs, inputs, N * sizeof(int));
    memcpy(pm->targets, targets, N * sizeof(int));
    for (size_t t = 0; t < N; t++) pm->pos[t] = (int)(t % (size_t)T);
    for (int i = 0; i < pm->nlayers; i++) {
        const struct par_layer *L = &pm->layers[i];
        double const t0 = omp_get_wtime();
        if (L->kind == PAR_LAYER_EMBED) {
            embed_forward(pm, pm->resid);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        } else if (L->kind == PAR_LAYER_BLOCK) {
            int const li = L->layer - pm->lay.layer_begin;
            struct par_block_acts *ba = &pm->blocks[li];
            attention_forward(pm, ba, &pm->p.layers[li], pm->resid + (size_t)li * N * d);
            par_timers[PAR_T_ATTN] += omp_get_wtime() - t0;
            moe_forward(pm, ba, &pm->p.layers[li], pm->resid + (size_t)(li + 1) * N * d, st);
        } else {
            int const nl = pm->lay.layer_end - pm->lay.layer_begin;
            st->lm_loss = head_forward(pm, pm->resid + (size_t)nl * N * d);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        }
    }
}

void par_backward(struct par_model *pm, float loss_scale)
{
    size_t const N = pm->shape.N, d = (size_t)pm->cfg.hidden_size;
    for (int i = pm->nlayers - 1; i >= 0; i--) {
        const struct par_layer *L = &pm->layers[i];
        double const t0 = omp_get_wtime();
        if (L->kind == PAR_LAYER_HEAD) {
            int const nl = pm->lay.layer_end - pm->lay.layer_begin;
            head_backward(pm, pm->resid + (size_t)nl * N * d, pm->dh, loss_scale);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        } else if (L->kind == PAR_LAYER_BLOCK) {
            int const li = L->layer - pm->lay.layer_begin;
            struct par_block_acts *ba = &pm->blocks[li];
            moe_backward(pm, ba, &pm->p.layers[li], &pm->g.layers[li], pm->dh, loss_scale);
            double const t1 = omp_get_wtime();
            attention_backward(pm, ba, &pm->p.layers[li], &pm->g.layers[li],
                               pm->resid + (size_t)li * N * d, pm->dh);
            par_timers[PAR_T_ATTN] += omp_get_wtime() - t1;
        } else {
            embed_backward(pm, pm->dh);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        }
    }
}
