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

void par_groups_create(struct par_groups *g, const struct dist_grid *grid)
{
    dist_group_create(&g->tp, grid, DIST_TP);
    dist_group_create(&g->cp, grid, DIST_CP);
    dist_group_create(&g->dp, grid, DIST_DP);
    dist_group_create(&g->dpcp, grid, DIST_DPCP);
    dist_group_create(&g->tpcp, grid, DIST_TPCP);
    dist_group_create(&g->pp, grid, DIST_PP);
    dist_group_create(&g->ep, grid, DIST_EP);
    dist_group_create(&g->etp, grid, DIST_ETP);
    dist_group_create(&g->edp, grid, DIST_EDP);
    dist_group_create(&g->etpep, grid, DIST_ETPEP);
}

void par_groups_free(struct par_groups *g)
{
    struct dist_group *all[] = {&g->tp, &g->cp, &g->dp, &g->dpcp, &g->tpcp, &g->pp,
                                &g->ep, &g->etp, &g->edp, &g->etpep};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) dist_group_free(all[i]);
}

void par_layout_from_grid(struct model_layout *lay, const struct dist_grid *grid, int rank,
                          int num_layers)
{
    struct dist_grid_coords c;
    dist_grid_coords(grid, rank, &c);
    int const pp = grid->dims.pp;
    *lay = (struct model_layout){
        .tp = grid->dims.tp, .tp_rank = c.tp, .ep = grid->dims.ep, .ep_rank = c.ep,
        .etp = grid->dims.etp, .etp_rank = c.etp,
        .layer_begin = num_layers * c.pp / pp, .layer_end = num_layers * (c.pp + 1) / pp,
        .has_embed = c.pp == 0, .has_head = c.pp == pp - 1};
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

/* Lays out every activation and scratch buffer; called once to size, once to assign.
 * Gathered copies alias the local ones when the gathering group has size one. */
static void layout_buffers(struct par_model *pm, struct arena *acts, struct arena *scr)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
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
    bool const tp_gather = pm->groups.tp.size > 1;
    size_t const q = (size_t)pm->groups.etpep.size, Ng = Ns * q;
    size_t const etp = (size_t)pm->groups.etp.size;
    size_t const f = sizeof(float);

    pm->inputs = arena_take(acts, N * sizeof(int));
    pm->targets = arena_take(acts, N * sizeof(int));
    pm->pos = arena_take(acts, N * sizeof(int));
    pm->resid = arena_take(acts, (size_t)(nl + 1) * Ns * d * f);
    for (int l = 0; l < nl; l++) {
        struct par_block_acts *ba = &pm->blocks[l];
        ba->h_mid = arena_take(acts, Ns * d * f);
        ba->a_loc = arena_take(acts, Ns * d * f);
        ba->a = tp_gather ? arena_take(acts, N * d * f) : ba->a_loc;
        ba->rstd1 = arena_take(acts, Ns * f);
        ba->q = arena_take(acts, N * Hl * hd * f);
        ba->k = arena_take(acts, N * Gl * hd * f);
        ba->v = arena_take(acts, N * Gl * hd * f);
        ba->probs = arena_take(acts, (size_t)B * Hl * (size_t)T * (size_t)T * f);
        ba->att = arena_take(acts, N * Hl * hd * f);
        ba->m_loc = arena_take(acts, Ns * d * f);
        ba->rstd2 = arena_take(acts, Ns * f);
        ba->rprobs = arena_take(acts, Ns * E * f);
        ba->rtopk_w = arena_take(acts, Ns * k * f);
        ba->rlse = arena_take(acts, Ns * f);
        ba->rtopk = arena_take(acts, Ns * k * sizeof(int));
        ba->counts = arena_take(acts, E * f);
        ba->kept = arena_take(acts, Ns * k);
        ba->slot_row = arena_take(acts, Ns * k * sizeof(int));
        ba->send_slot = arena_take(acts, Ns * k * sizeof(int));
        ba->y_ret = arena_take(acts, etp * Ns * k * d * f);
        ba->counts_matrix = arena_take(acts, q * E * sizeof(int));
        ba->w_g = arena_take(acts, Ng * k * f);
        ba->topk_g = arena_take(acts, Ng * k * sizeof(int));
        ba->kept_g = arena_take(acts, Ng * k);
        ba->sorted_from = arena_take(acts, A * sizeof(int));
        ba->slot_of = arena_take(acts, A * sizeof(int));
        ba->row_of_slot = arena_take(acts, Ng * k * sizeof(int));
        ba->expert_off = arena_take(acts, (E_local + 1) * sizeof(size_t));
        ba->x_perm = arena_take(acts, A * d * f);
        ba->h1 = arena_take(acts, A * Fl * f);
        ba->h3 = arena_take(acts, A * Fl * f);
        ba->act = arena_take(acts, A * Fl * f);
        ba->y_perm = arena_take(acts, A * d * f);
    }
    if (pm->lay.has_head) {
        pm->hn_loc = arena_take(acts, Ns * d * f);
        pm->hn = tp_gather ? arena_take(acts, N * d * f) : pm->hn_loc;
        pm->rstd_f = arena_take(acts, Ns * f);
        pm->logits = arena_take(acts, N * Vl * f);
        pm->rowmax = arena_take(acts, N * f);
        pm->rowsum = arena_take(acts, N * f);
    }
    size_t const big = N * (Vl > d ? Vl : d);
    pm->dh = arena_take(scr, Ns * d * f);
    pm->dsmall = arena_take(scr, Ns * d * f);
    pm->dfull = arena_take(scr, N * d * f);
    pm->dtmp = arena_take(scr, big * f);
    pm->dq = arena_take(scr, N * Hl * hd * f);
    pm->dk = arena_take(scr, N * Gl * hd * f);
    pm->dv = arena_take(scr, N * Gl * hd * f);
    pm->datt = arena_take(scr, N * Hl * hd * f);
    pm->drl = arena_take(scr, Ns * E * f);
    pm->dtopk_w = arena_take(scr, Ns * k * f);
    pm->dx_perm = arena_take(scr, A * d * f);
    pm->dy_perm = arena_take(scr, A * d * f);
    pm->exp_scratch = arena_take(scr, A * 2 * Fl * f);
    size_t const gather_floats = A * d > N * (k + E) ? A * d : N * (k + E);
    pm->xsend = arena_take(scr, Ns * k * (d > q ? d : q) * f);
    pm->xrecv = arena_take(scr, etp * Ns * k * d * f);
    pm->xgather = arena_take(scr, gather_floats * f);
    pm->full_topk = arena_take(scr, N * k * sizeof(int));
    pm->full_token = arena_take(scr, N * sizeof(int));
    pm->full_probs = arena_take(scr, N * E * f);
    pm->full_kept = arena_take(scr, N * k);
    size_t const sort_ints = N * k > q * E + E + 1 ? N * k : q * E + E + 1;
    pm->sort_scratch = arena_take(scr, sort_ints * sizeof(int));
    pm->xplan = arena_take(scr, (E + 1 + E_local * q + 1) * sizeof(int));
    pm->xreqs = arena_take(scr, 2 * E_local * q * sizeof(MPI_Request));
    pm->xpack = arena_take(scr, (size_t)pm->groups.ep.size * sizeof(bool));
    pm->att_scratch = arena_take(scr, model_attention_scratch_floats(T) * f);
    pm->rope_cos = arena_take(scr, (size_t)T * hd / 2 * f);
    pm->rope_sin = arena_take(scr, (size_t)T * hd / 2 * f);
    pm->router_sums = arena_take(scr, (2 * E + 1) * sizeof(double));
    pm->expert_counts = arena_take(scr, 3 * (E + 1) * sizeof(size_t));
    pm->aux_coef = arena_take(scr, E * f);
}

/* Each layer's gradient buckets: the flat ranges of its dense and expert tensors (the table
 * keeps every layer's tensors together, so each is one contiguous range). */
static void locate_buckets(struct par_model *pm)
{
    for (int i = 0; i < pm->nlayers; i++) {
        struct par_layer *L = &pm->layers[i];
        L->dense_begin = L->expert_begin = SIZE_MAX;
        L->dense_end = L->expert_end = 0;
        for (int j = 0; j < pm->tab.count; j++) {
            const struct model_tensor *t = &pm->tab.t[j];
            bool const mine = L->kind == PAR_LAYER_BLOCK ? t->layer == L->layer
                              : L->kind == PAR_LAYER_EMBED ? t->kind == MODEL_T_EMBED
                                                           : t->kind == MODEL_T_NORM ||
                                                                 t->kind == MODEL_T_HEAD;
            if (!mine) continue;
            size_t *b = t->is_expert ? &L->expert_begin : &L->dense_begin;
            size_t *e = t->is_expert ? &L->expert_end : &L->dense_end;
            if (t->offset < *b) *b = t->offset;
            if (t->offset + t->numel > *e) *e = t->offset + t->numel;
        }
        if (L->dense_begin == SIZE_MAX) L->dense_begin = L->dense_end = 0;
        if (L->expert_begin == SIZE_MAX) L->expert_begin = L->expert_end = 0;
    }
}

/* Which micro-batch token each local row is (sequence parallelism: a contiguous slice per
 * tensor rank), and the coordinates of the etp x ep group's ranks. */
static void locate_rows(struct par_model *pm)
{
    size_t const Ns = pm->shape.Ns;
    pm->row_token = vd_calloc(Ns, sizeof *pm->row_token);
    for (size_t i = 0; i < Ns; i++) pm->row_token[i] = (int)((size_t)pm->lay.tp_rank * Ns + i);
    size_t const q = (size_t)pm->groups.etpep.size;
    pm->etpep_ep = vd_calloc(q, sizeof(int));
    pm->etpep_etp = vd_calloc(q, sizeof(int));
    pm->etpep_of = vd_calloc(q, sizeof(int));
    int const mine[2] = {pm->lay.etp_rank, pm->lay.ep_rank};
    int *both = vd_calloc(2 * q, sizeof(int));
    dist_allgather_bytes(&pm->groups.etpep, DIST_ETPEP, both, mine, sizeof mine);
    for (size_t r = 0; r < q; r++) {
        pm->etpep_etp[r] = both[2 * r];
        pm->etpep_ep[r] = both[2 * r + 1];
        pm->etpep_of[both[2 * r] + pm->groups.etp.size * both[2 * r + 1]] = (int)r;
    }
    free(both);
}

int par_model_init(struct par_model *pm, const struct model_config *cfg,
                   const struct model_layout *lay, const struct par_groups *groups,
                   const struct par_options *opt, int B, int T)
{
    memset(pm, 0, sizeof *pm);
    pm->cfg = *cfg;
    pm->lay = *lay;
    pm->groups = *groups;
    pm->opt = *opt;
    pm->shape.B = B;
    pm->shape.T = T;
    pm->shape.N = (size_t)B * (size_t)T;
    RETURN_IF(pm->shape.N % (size_t)lay->tp, VD_EINVAL,
              "micro_batch * seq_len = %zu tokens is not divisible by parallel.tp = %d "
              "(sequence parallelism splits them evenly)", pm->shape.N, lay->tp);
    pm->shape.Ns = pm->shape.N / (size_t)lay->tp;
    FORWARD_IF(model_table_build(&pm->tab, cfg, lay));
    par_plan_ranges(pm);

    pm->params = vd_calloc(pm->tab.numel, sizeof(float));
    pm->grads = vd_calloc(pm->tab.numel, sizeof(float));
    pm->adam_m = vd_calloc(pm->state_len, sizeof(float));
    pm->adam_v = vd_calloc(pm->state_len, sizeof(float));
    pm->gshard = opt->distributed_optimizer ? vd_calloc(pm->state_len, sizeof(float)) : NULL;
    model_ptrs_build(&pm->p, &pm->tab, pm->params, lay, cfg->num_local_experts);
    model_ptrs_build(&pm->g, &pm->tab, pm->grads, lay, cfg->num_local_experts);

    /* The ordered layer list of this stage. */
    int const nl = lay->layer_end - lay->layer_begin;
    pm->layers = vd_calloc((size_t)nl + 2, sizeof *pm->layers);
    if (lay->has_embed) pm->layers[pm->nlayers++] = (struct par_layer){.kind = PAR_LAYER_EMBED, .layer = -1};
    for (int l = lay->layer_begin; l < lay->layer_end; l++)
        pm->layers[pm->nlayers++] = (struct par_layer){.kind = PAR_LAYER_BLOCK, .layer = l};
    if (lay->has_head) pm->layers[pm->nlayers++] = (struct par_layer){.kind = PAR_LAYER_HEAD, .layer = -1};
    locate_buckets(pm);
    pm->reqs = vd_calloc(2 * (size_t)pm->nlayers + 2, sizeof *pm->reqs);

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
    locate_rows(pm);

    /* Direct writes of the all-to-all forward dispatch need every peer's expert blocks. */
    bool const a2a = cfg->moe_token_dispatcher_type == MODEL_DISPATCH_ALLTOALL;
    dist_direct_init(&pm->direct, &pm->groups.etpep, a2a && opt->dispatch_direct);
    size_t const q = (size_t)pm->groups.etpep.size, L = (size_t)(nl > 0 ? nl : 1);
    uint64_t *by_rank = vd_calloc(q * L, sizeof *by_rank); /* [rank][layer] */
    uint64_t *mine = by_rank + (size_t)pm->groups.etpep.rank * L;
    for (int l = 0; l < nl; l++) mine[l] = (uint64_t)(uintptr_t)pm->blocks[l].x_perm;
    dist_allgather_bytes(&pm->groups.etpep, DIST_ETPEP, by_rank, mine, L * sizeof *mine);
    pm->peer_xperm = vd_calloc(q * L, sizeof *pm->peer_xperm); /* [layer][rank] */
    for (size_t r = 0; r < q; r++)
        for (size_t l = 0; l < L; l++) pm->peer_xperm[l * q + r] = by_rank[r * L + l];
    free(by_rank);
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
    free(pm->gshard);
    free(pm->layers);
    free(pm->reqs);
    free(pm->blocks);
    free(pm->act_base);
    free(pm->row_token);
    free(pm->etpep_ep);
    free(pm->etpep_etp);
    free(pm->etpep_of);
    free(pm->scratch_base);
    free(pm->peer_xperm);
    dist_direct_free(&pm->direct);
    memset(pm, 0, sizeof *pm);
}

void par_zero_grads(struct par_model *pm)
{
    memset(pm->grads, 0, pm->tab.numel * sizeof(float));
}

/* ---------------------------------------------------------------- embedding */

/* h (Ns, d) = embed[x] for this rank's rows. Vocabulary-parallel: each tensor rank looks
 * up the ids of its slice for all N tokens (zero rows elsewhere); a reduce-scatter over tp
 * sums the slices and leaves each rank its sequence-parallel rows. */
static void embed_forward(struct par_model *pm, float *h)
{
    size_t const N = pm->shape.N, d = (size_t)pm->cfg.hidden_size;
    int const Vl = pm->cfg.vocab_size / pm->lay.tp, v0 = Vl * pm->lay.tp_rank;
    float *full = pm->groups.tp.size > 1 ? pm->dtmp : h;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < N; t++) {
        int const row = pm->inputs[t] - v0;
        if (row >= 0 && row < Vl)
            memcpy(full + t * d, pm->p.embed + (size_t)row * d, d * sizeof *h);
        else
            memset(full + t * d, 0, d * sizeof *h);
    }
    dist_reduce_scatter(&pm->groups.tp, DIST_TP, h, full, pm->shape.Ns * d);
}

/* dembed[x_t] += dh_t over all N tokens (gathered over tp) whose id is in this slice;
 * rows may repeat, so each thread owns a column range. */
static void embed_backward(struct par_model *pm, const float *dh)
{
    size_t const N = pm->shape.N, d = (size_t)pm->cfg.hidden_size;
    int const Vl = pm->cfg.vocab_size / pm->lay.tp, v0 = Vl * pm->lay.tp_rank;
    float *full = pm->dfull;
    dist_allgather(&pm->groups.tp, DIST_TP, full, dh, pm->shape.Ns * d);
#pragma omp parallel
    {
        int const nth = omp_get_num_threads(), th = omp_get_thread_num();
        size_t const c0 = d * (size_t)th / (size_t)nth, c1 = d * (size_t)(th + 1) / (size_t)nth;
        for (size_t t = 0; t < N; t++) {
            int const row = pm->inputs[t] - v0;
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
static void attention_forward(struct par_model *pm, struct par_block_acts *ba,
                              const struct model_layer_ptrs *w, const float *h)
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
    model_rope_apply(ba->q, pm->pos, pm->rope_cos, pm->rope_sin, N, Hl, hd, false);
    model_rope_apply(ba->k, pm->pos, pm->rope_cos, pm->rope_sin, N, Gl, hd, false);
    model_attention_forward(ba->att, ba->probs, ba->q, ba->k, ba->v, pm->shape.B, pm->shape.T,
                            Hl, Gl, hd);
    float *o = pm->dtmp;
    model_matmul_forward(o, ba->att, w->wo, N, (size_t)Hl * hd, d, false);
    dist_reduce_scatter(&pm->groups.tp, DIST_TP, ba->h_mid, o, Ns * d);
    size_t const n = Ns * d;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) ba->h_mid[i] += h[i];
}

/* dh (Ns, d): on entry d loss / d h_mid, on return d loss / d h (the block input). */
static void attention_backward(struct par_model *pm, struct par_block_acts *ba,
                               const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                               const float *h, float *dh)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    int const hd = c->hidden_size / c->num_attention_heads;
    int const Hl = c->num_attention_heads / pm->lay.tp, Gl = c->num_key_value_heads / pm->lay.tp;
    size_t const qw = (size_t)Hl * hd, kw = (size_t)Gl * hd;
    float *dout = pm->dfull;
    dist_allgather(&pm->groups.tp, DIST_TP, dout, dh, Ns * d);
    model_matmul_backward(pm->datt, gw->wo, dout, ba->att, w->wo, N, qw, d, false);
    model_attention_backward(pm->dq, pm->dk, pm->dv, pm->datt, ba->probs, ba->q, ba->k, ba->v,
                             pm->shape.B, pm->shape.T, Hl, Gl, hd, pm->att_scratch);
    model_rope_apply(pm->dq, pm->pos, pm->rope_cos, pm->rope_sin, N, Hl, hd, true);
    model_rope_apply(pm->dk, pm->pos, pm->rope_cos, pm->rope_sin, N, Gl, hd, true);
    float *da = pm->dtmp;
    model_matmul_backward(da, gw->wq, pm->dq, ba->a, w->wq, N, d, qw, false);
    model_matmul_backward(da, gw->wk, pm->dk, ba->a, w->wk, N, d, kw, true);
    model_matmul_backward(da, gw->wv, pm->dv, ba->a, w->wv, N, d, kw, true);
    dist_reduce_scatter(&pm->groups.tp, DIST_TP, pm->dsmall, da, Ns * d);
    model_rmsnorm_backward(dh, gw->ln1, pm->dsmall, h, w->ln1, ba->rstd1, Ns, d);
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
    float *rlogits = pm->drl; /* router logits live only until the router has run */
    model_matmul_forward(rlogits, ba->m_loc, w->router, Ns, d, (size_t)E, false);
    model_router_forward(ba->rprobs, ba->rtopk, ba->rtopk_w, ba->rlse, rlogits, Ns, E, k);
    par_router_losses(pm, ba, st);
    par_timers[PAR_T_ROUTER] += omp_get_wtime() - t0;

    double const t1 = omp_get_wtime();
    par_moe_decide(pm, ba);
    par_timers[PAR_T_DISPATCH] += omp_get_wtime() - t1;
    ba->dispatch_s += omp_get_wtime() - t1;
    float *moe = pm->dsmall; /* backward scratch, free during the forward */
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
    size_t const Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    int const E = c->num_local_experts, k = c->num_experts_per_tok;
    float *dm = pm->dsmall;
    par_moe_dispatch_backward(pm, ba, w, gw, dh, dm, pm->dtopk_w);

    /* Router: aux = alpha (E/k) sum_e (c_e/N) P_e with P_e = mean_t p_te, so
     * d aux / d p_te = alpha (E/k) c_e / N^2; z = beta mean_t lse_t^2 gives 2 beta lse_t / N. */
    double const t0 = omp_get_wtime();
    double const Ng = (double)pm->shape.N;
    float *aux_coef = pm->aux_coef;
    for (int e = 0; e < E; e++)
        aux_coef[e] = (float)(c->router_aux_loss_coef * E / k * ba->counts[e] / (Ng * Ng) *
                              loss_scale);
    float const zcoef = (float)(2.0 * c->router_z_loss_coef / Ng * loss_scale);
    model_router_backward(pm->drl, pm->dtopk_w, ba->rprobs, ba->rtopk, ba->rtopk_w, ba->rlse,
                          aux_coef, zcoef, Ns, E, k);
    model_matmul_backward(dm, gw->router, pm->drl, ba->m_loc, w->router, Ns, d, (size_t)E, true);
    model_rmsnorm_backward(dh, gw->ln2, dm, ba->h_mid, w->ln2, ba->rstd2, Ns, d);
    par_timers[PAR_T_ROUTER] += omp_get_wtime() - t0;
}

/* ---------------------------------------------------------------- head */

/* logits (N, V_l) = rmsnorm(h) lm_head^T over the rows gathered over tp, this rank's
 * vocabulary slice; returns the micro-batch's mean cross-entropy. */
static double head_forward(struct par_model *pm, const float *h)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    size_t const Vl = (size_t)(c->vocab_size / pm->lay.tp);
    int const v_begin = (int)Vl * pm->lay.tp_rank;
    model_rmsnorm_forward(pm->hn_loc, pm->rstd_f, h, pm->p.norm, Ns, d, (float)c->rms_norm_eps);
    dist_allgather(&pm->groups.tp, DIST_TP, pm->hn, pm->hn_loc, Ns * d);
    model_matmul_forward(pm->logits, pm->hn, pm->p.head, N, d, Vl, false);
    return par_vocab_crossentropy(pm, v_begin, Vl);
}

/* dh (Ns, d) = d loss / d h, overwritten. */
static void head_backward(struct par_model *pm, const float *h, float *dh, float loss_scale)
{
    const struct model_config *c = &pm->cfg;
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)c->hidden_size;
    size_t const Vl = (size_t)(c->vocab_size / pm->lay.tp);
    int const v_begin = (int)Vl * pm->lay.tp_rank;
    float *dlogits = pm->dtmp;
    model_crossentropy_backward(dlogits, pm->logits, pm->targets, pm->rowmax, pm->rowsum, N, Vl,
                                v_begin, (float)(loss_scale / (double)N));
    float *dhn = pm->dfull;
    model_matmul_backward(dhn, pm->g.head, dlogits, pm->hn, pm->p.head, N, d, Vl, false);
    dist_reduce_scatter(&pm->groups.tp, DIST_TP, pm->dsmall, dhn, Ns * d);
    memset(dh, 0, Ns * d * sizeof(float));
    model_rmsnorm_backward(dh, pm->g.norm, pm->dsmall, h, pm->p.norm, pm->rstd_f, Ns, d);
}

/* ---------------------------------------------------------------- the layer list */

void par_forward(struct par_model *pm, const int *inputs, const int *targets,
                 struct par_mb_stats *st)
{
    size_t const N = pm->shape.N, Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
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
            attention_forward(pm, ba, &pm->p.layers[li], pm->resid + (size_t)li * Ns * d);
            par_timers[PAR_T_ATTN] += omp_get_wtime() - t0;
            moe_forward(pm, ba, &pm->p.layers[li], pm->resid + (size_t)(li + 1) * Ns * d, st);
        } else {
            int const nl = pm->lay.layer_end - pm->lay.layer_begin;
            st->lm_loss = head_forward(pm, pm->resid + (size_t)nl * Ns * d);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        }
    }
}

void par_backward(struct par_model *pm, float loss_scale)
{
    size_t const Ns = pm->shape.Ns, d = (size_t)pm->cfg.hidden_size;
    for (int i = pm->nlayers - 1; i >= 0; i--) {
        const struct par_layer *L = &pm->layers[i];
        double const t0 = omp_get_wtime();
        if (L->kind == PAR_LAYER_HEAD) {
            int const nl = pm->lay.layer_end - pm->lay.layer_begin;
            head_backward(pm, pm->resid + (size_t)nl * Ns * d, pm->dh, loss_scale);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        } else if (L->kind == PAR_LAYER_BLOCK) {
            int const li = L->layer - pm->lay.layer_begin;
            struct par_block_acts *ba = &pm->blocks[li];
            moe_backward(pm, ba, &pm->p.layers[li], &pm->g.layers[li], pm->dh, loss_scale);
            double const t1 = omp_get_wtime();
            attention_backward(pm, ba, &pm->p.layers[li], &pm->g.layers[li],
                               pm->resid + (size_t)li * Ns * d, pm->dh);
            par_timers[PAR_T_ATTN] += omp_get_wtime() - t1;
        } else {
            embed_backward(pm, pm->dh);
            par_timers[PAR_T_OTHER] += omp_get_wtime() - t0;
        }
        if (pm->reduce_in_backward) par_reduce_layer_start(pm, L);
    }
}
