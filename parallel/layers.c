/* The transformer's layers: embedding, attention sub-block, MoE sub-block (router,
 * dispatcher, experts), head with cross-entropy. Each is a forward/backward pair over one
 * micro-batch's activation set (par_acts) with working memory from the model's scratch;
 * a stage's forward and backward run its slice of the layer list. */
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

/* ---------------------------------------------------------------- embedding */

/* h (Ns, d) = embed[x] for this rank's rows. Vocabulary-parallel: each tensor rank looks
 * up the ids of its slice for all N tokens (zero rows elsewhere); a reduce-scatter over tp
 * sums the slices and leaves each rank its sequence-parallel rows. */
static void embed_forward(struct par_model *pm, const struct par_acts *a, float *h)
{
    size_t const N = pm->shape.N, d = (size_t)pm->cfg.hidden_size;
    int const Vl = pm->cfg.vocab_size / pm->lay.tp, v0 = Vl * pm->lay.tp_rank;
    float *full = pm->groups.tp.size > 1 ? pm->scr.embed_rows : h;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < N; t++) {
        int const row = a->inputs[t] - v0;
        if (row >= 0 && row < Vl)
            memcpy(full + t * d, pm->p.embed + (size_t)row * d, d * sizeof *h);
        else
            memset(full + t * d, 0, d * sizeof *h);
    }
    dist_reduce_scatter(&pm->groups.tp, DIST_TP, h, full, pm->shape.Ns * d);
}

/* dembed[x_t] += dh_t over all N tokens (gathered over tp) whose id is in this slice;
 * rows may repeat, so each thread owns a column range. */
static void embed_backward(struct par_model *pm, const struct par_acts *a, const float *dh)
{
    size_t const N = pm->shape.N, d = (size_t)pm->cfg.hidden_size;
    int const Vl = pm->cfg.vocab_size / pm->lay.tp, v0 = Vl * pm->lay.tp_rank;
    float *full = pm->scr.dgathered;
    dist_allgather(&pm->groups.tp, DIST_TP, full, dh, pm->shape.Ns * d);
#pragma omp parallel
    {
        int const nth = omp_get_num_threads(), th = omp_get_thread_num();
        size_t const c0 = d * (size_t)th / (size_t)nth, c1 = d * (size_t)(th + 1) / (size_t)nth;
        for (size_t t = 0; t < N; t++) {
            int const row = a->inputs[t] - v0;
            if (row < 0 || row >= Vl) continue;
            float *g = pm->g.embed + (size_t)row * d;
            for (size_t i = c0; i < c1; i++) g[i] += full[t * d + i];
        }
    }
}

/* ---------------------------------------------------------------- attention sub-block */

/* h_mid (Ns, d) = h + o_proj(attention(rope(q, k), v)) of rmsnorm(h). Column-parallel
 * q/k/v on local heads over the N rows gathered over tp; row-parallel o_proj whose partial
 * sums are reduce-scattered back to the sequence-parallel rows. */
static void attention_forward(struct par_model *pm, const struct par_acts *a,
                              struct par_block_acts *ba, const struct model_layer_ptrs *w,
                              const float *h)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    int const hd = c->hidden_size / c->num_attention_heads;
    int const Hl = c->num_attention_heads / pm->lay.tp, Gl = c->num_key_value_heads / pm->lay.tp;
    model_rmsnorm_forward(ba->a_loc, ba->rstd1, h, w->ln1, Ns, d, (float)c->rms_norm_eps);
    dist_allgather(&pm->groups.tp, DIST_TP, ba->a, ba->a_loc, Ns * d);
    model_matmul_forward(ba->q, ba->a, w->wq, N, d, (size_t)Hl * hd, false);
    model_matmul_forward(ba->k, ba->a, w->wk, N, d, (size_t)Gl * hd, false);
    model_matmul_forward(ba->v, ba->a, w->wv, N, d, (size_t)Gl * hd, false);
    model_rope_apply(ba->q, a->pos, pm->rope_cos, pm->rope_sin, N, Hl, hd, false);
    model_rope_apply(ba->k, a->pos, pm->rope_cos, pm->rope_sin, N, Gl, hd, false);
    par_attention_forward(pm, ba);
    float *o = pm->scr.attn_proj;
    model_matmul_forward(o, ba->att, w->wo, N, (size_t)Hl * hd, d, false);
    dist_reduce_scatter(&pm->groups.tp, DIST_TP, ba->h_mid, o, Ns * d);
    size_t const n = Ns * d;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) ba->h_mid[i] += h[i];
}

/* dh (Ns, d): on entry d loss / d h_mid, on return d loss / d h (the block input). */
static void attention_backward(struct par_model *pm, const struct par_acts *a,
                               const struct par_block_acts *ba, const struct model_layer_ptrs *w,
                               struct model_layer_ptrs *gw, const float *h, float *dh)
{
    const struct model_config *c = &pm->cfg;
    struct par_scratch *s = &pm->scr;
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    int const hd = c->hidden_size / c->num_attention_heads;
    int const Hl = c->num_attention_heads / pm->lay.tp, Gl = c->num_key_value_heads / pm->lay.tp;
    size_t const qw = (size_t)Hl * hd, kw = (size_t)Gl * hd;
    float *dout = s->dgathered;
    dist_allgather(&pm->groups.tp, DIST_TP, dout, dh, Ns * d);
    model_matmul_backward(s->datt, gw->wo, dout, ba->att, w->wo, N, qw, d, false);
    par_attention_backward(pm, ba, s->datt, s->dq, s->dk, s->dv);
    model_rope_apply(s->dq, a->pos, pm->rope_cos, pm->rope_sin, N, Hl, hd, true);
    model_rope_apply(s->dk, a->pos, pm->rope_cos, pm->rope_sin, N, Gl, hd, true);
    model_matmul_backward(s->da, gw->wq, s->dq, ba->a, w->wq, N, d, qw, false);
    model_matmul_backward(s->da, gw->wk, s->dk, ba->a, w->wk, N, d, kw, true);
    model_matmul_backward(s->da, gw->wv, s->dv, ba->a, w->wv, N, d, kw, true);
    dist_reduce_scatter(&pm->groups.tp, DIST_TP, s->dnorm, s->da, Ns * d);
    model_rmsnorm_backward(dh, gw->ln1, s->dnorm, h, w->ln1, ba->rstd1, Ns, d);
}

/* ---------------------------------------------------------------- MoE sub-block */

/* h_out (Ns, d) = h_mid + sum over kept (t, e) of w_te expert_e(rmsnorm(h_mid)_t). The
 * router runs on the local rows; the dispatcher (parallel/dispatch.c) decides capacity
 * over the micro-batch and moves the rows to their experts and back. */
static void moe_forward(struct par_model *pm, struct par_block_acts *ba,
                        const struct model_layer_ptrs *w, float *h_out, struct par_mb_stats *st)
{
    const struct model_config *c = &pm->cfg;
    size_t const Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    double const t0 = omp_get_wtime();
    model_rmsnorm_forward(ba->m_loc, ba->rstd2, ba->h_mid, w->ln2, Ns, d, (float)c->rms_norm_eps);
    float *rlogits = pm->scr.router_logits;
    model_matmul_forward(rlogits, ba->m_loc, w->router, Ns, d, (size_t)E, false);
    model_router_forward(ba->rprobs, ba->rtopk, ba->rtopk_w, ba->rlse, rlogits, Ns, E, k);
    par_router_losses(pm, ba, st);
    par_timers[PAR_T_ROUTER] += omp_get_wtime() - t0;

    double const t1 = omp_get_wtime();
    par_moe_decide(pm, ba);
    par_timers[PAR_T_DISPATCH] += omp_get_wtime() - t1;
    ba->dispatch_s += omp_get_wtime() - t1;
    float *moe = pm->scr.moe_out;
    par_moe_dispatch_forward(pm, ba, w, moe);
    size_t const n = Ns * d;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) h_out[i] = ba->h_mid[i] + moe[i];
}

/* dh (Ns, d): on entry d loss / d h_out, on return d loss / d h_mid. */
static void moe_backward(struct par_model *pm, struct par_block_acts *ba,
                         const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                         float *dh, float loss_scale)
{
    const struct model_config *c = &pm->cfg;
    struct par_scratch *s = &pm->scr;
    size_t const Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    float *dm = s->dnorm;
    par_moe_dispatch_backward(pm, ba, w, gw, dh, dm, s->dtopk_w);

    /* Router: aux = alpha (E/k) sum_e (c_e/N) P_e with P_e = mean_t p_te, so
     * d aux / d p_te = alpha (E/k) c_e / N^2; z = beta mean_t lse_t^2 gives 2 beta lse_t / N. */
    double const t0 = omp_get_wtime();
    double const Ng = (double)pm->shape.Nmb;
    float *aux_coef = s->aux_coef;
    for (int e = 0; e < E; e++)
        aux_coef[e] = (float)(c->router_aux_loss_coef * E / k * ba->counts[e] / (Ng * Ng) *
                              loss_scale);
    float const zcoef = (float)(2.0 * c->router_z_loss_coef / Ng * loss_scale);
    model_router_backward(s->drouter, s->dtopk_w, ba->rprobs, ba->rtopk, ba->rtopk_w, ba->rlse,
                          aux_coef, zcoef, Ns, E, k);
    model_matmul_backward(dm, gw->router, s->drouter, ba->m_loc, w->router, Ns, d, (size_t)E, true);
    model_rmsnorm_backward(dh, gw->ln2, dm, ba->h_mid, w->ln2, ba->rstd2, Ns, d);
    par_timers[PAR_T_ROUTER] += omp_get_wtime() - t0;
}

/* ---------------------------------------------------------------- head */

/* logits (N, V_l) = rmsnorm(h) lm_head^T over the rows gathered over tp, this rank's
 * vocabulary slice; returns the micro-batch's mean cross-entropy. */
static double head_forward(struct par_model *pm, struct par_acts *a, const float *h)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    size_t const Vl = (size_t)(c->vocab_size / pm->lay.tp);
    int const v_begin = (int)Vl * pm->lay.tp_rank;
    model_rmsnorm_forward(a->hn_loc, a->rstd_f, h, pm->p.norm, Ns, d, (float)c->rms_norm_eps);
    dist_allgather(&pm->groups.tp, DIST_TP, a->hn, a->hn_loc, Ns * d);
    model_matmul_forward(a->logits, a->hn, pm->p.head, N, d, Vl, false);
    return par_vocab_crossentropy(pm, a, v_begin, Vl);
}

/* dh (Ns, d) = d loss / d h, overwritten. */
static void head_backward(struct par_model *pm, const struct par_acts *a, const float *h,
                          float *dh, float loss_scale)
{
    const struct model_config *c = &pm->cfg;
    struct par_scratch *s = &pm->scr;
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    size_t const Vl = (size_t)(c->vocab_size / pm->lay.tp);
    int const v_begin = (int)Vl * pm->lay.tp_rank;
    model_crossentropy_backward(s->dlogits, a->logits, a->targets, a->rowmax, a->rowsum, N, Vl,
                                v_begin, (float)(loss_scale / (double)pm->shape.Nmb));
    float *dhn = s->dgathered;
    model_matmul_backward(dhn, pm->g.head, s->dlogits, a->hn, pm->p.head, N, d, Vl, false);
    dist_reduce_scatter(&pm->groups.tp, DIST_TP, s->dnorm, dhn, Ns * d);
    memset(dh, 0, Ns * d * sizeof(float));
    model_rmsnorm_backward(dh, pm->g.norm, s->dnorm, h, pm->p.norm, a->rstd_f, Ns, d);
}

/* ---------------------------------------------------------------- a stage's layers */

/* The chunk's output (Ns, d) after a forward into a. */
static float *acts_output(const struct par_model *pm, struct par_acts *a)
{
    size_t const Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    return a->resid + (size_t)pm->chunks[a->chunk].nblocks * Ns * d;
}

void par_stage_forward(struct par_model *pm, struct par_acts *a, const int *inputs,
                       const int *targets, const float *h_in, float *h_out)
{
    const struct par_chunk *ch = &pm->chunks[a->chunk];
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    int const T = pm->shape.T;
    VD_CHECK(ch->has_embed == (h_in == NULL) && ch->has_head == (h_out == NULL),
             "a chunk takes tokens or the previous chunk's output, and gives its output "
             "or the loss");
    struct par_mb_stats *st = &a->stats;
    memset(st, 0, sizeof *st);
    for (size_t t = 0; t < N; t++) { /* this context-parallel rank's rows */
        int const tok = pm->cp_token[t];
        if (ch->has_embed) a->inputs[t] = inputs[tok];
        if (ch->has_head) a->targets[t] = targets[tok];
        a->pos[t] = tok % T;
    }
    if (h_in) memcpy(a->resid, h_in, Ns * d * sizeof(float));
    for (int i = ch->first; i < ch->first + ch->count; i++) {
        const struct par_layer *L = &pm->layers[i];
        double const t0 = omp_get_wtime();
        if (L->kind == PAR_LAYER_EMBED) {
            embed_forward(pm, a, a->resid);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        } else if (L->kind == PAR_LAYER_BLOCK) {
            int const bi = L->layer - ch->layer0, li = ch->block0 + bi;
            struct par_block_acts *ba = &a->blocks[bi];
            ba->dispatch_s = 0.0;
            attention_forward(pm, a, ba, &pm->p.layers[li], a->resid + (size_t)bi * Ns * d);
            par_timers[PAR_T_ATTN] += omp_get_wtime() - t0;
            moe_forward(pm, ba, &pm->p.layers[li], a->resid + (size_t)(bi + 1) * Ns * d, st);
        } else {
            st->lm_loss = head_forward(pm, a, acts_output(pm, a));
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        }
    }
    if (h_out) memcpy(h_out, acts_output(pm, a), Ns * d * sizeof(float));
}

void par_stage_backward(struct par_model *pm, struct par_acts *a, const float *dh_out,
                        float *dh_in, float loss_scale, bool reduce)
{
    const struct par_chunk *ch = &pm->chunks[a->chunk];
    size_t const Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    VD_CHECK(ch->has_head == (dh_out == NULL) && ch->has_embed == (dh_in == NULL),
             "a chunk's backward takes its output's gradient unless it ends at the loss, and "
             "gives its input's unless it starts at the embedding");
    float *dh = pm->scr.dh;
    if (dh_out) memcpy(dh, dh_out, Ns * d * sizeof(float));
    for (int i = ch->first + ch->count - 1; i >= ch->first; i--) {
        const struct par_layer *L = &pm->layers[i];
        double const t0 = omp_get_wtime();
        if (L->kind == PAR_LAYER_HEAD) {
            head_backward(pm, a, acts_output(pm, a), dh, loss_scale);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        } else if (L->kind == PAR_LAYER_BLOCK) {
            int const bi = L->layer - ch->layer0, li = ch->block0 + bi;
            struct par_block_acts *ba = &a->blocks[bi];
            moe_backward(pm, ba, &pm->p.layers[li], &pm->g.layers[li], dh, loss_scale);
            double const t1 = omp_get_wtime();
            attention_backward(pm, a, ba, &pm->p.layers[li], &pm->g.layers[li],
                               a->resid + (size_t)bi * Ns * d, dh);
            par_timers[PAR_T_ATTN] += omp_get_wtime() - t1;
        } else {
            embed_backward(pm, a, dh);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        }
        if (reduce) par_reduce_layer_start(pm, L);
    }
    if (dh_in) memcpy(dh_in, dh, Ns * d * sizeof(float));
}
