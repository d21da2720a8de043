/* The rank's persistent share of the model: groups, layout, parameter table, flat
 * buffers, the stage's layer list and gradient buckets, the scratch of the layer calls;
 * and the activation sets a schedule allocates per micro-batch in flight. */
#include <stdlib.h>
#include <string.h>

#include "parallel/parallel_internal.h"

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

int par_pp_split(int num_layers, int pp, int vpp, const int *pp_layers, int n_pp_layers,
                 int *chunk_layers)
{
    int const n = pp * vpp;
    RETURN_IF(vpp > MODEL_CHUNKS_MAX, VD_EINVAL,
              "parallel.vpp = %d: at most %d model chunks per pipeline rank", vpp,
              MODEL_CHUNKS_MAX);
    if (pp_layers == NULL || n_pp_layers == 0) {
        RETURN_IF(num_layers % n, VD_EINVAL,
                  "num_hidden_layers = %d does not divide evenly over parallel.pp = %d x "
                  "parallel.vpp = %d = %d model chunks; pick pp x vpp dividing %d, or give "
                  "the split with parallel.pp_layers (%d entries adding up to %d)",
                  num_layers, pp, vpp, n, num_layers, n, num_layers);
        for (int c = 0; c < n; c++) chunk_layers[c] = num_layers / n;
        return 0;
    }
    RETURN_IF(n_pp_layers != n, VD_EINVAL,
              "parallel.pp_layers has %d entries; it needs one per model chunk, parallel.pp "
              "= %d x parallel.vpp = %d = %d, in layer order", n_pp_layers, pp, vpp, n);
    int sum = 0;
    for (int c = 0; c < n; c++) {
        RETURN_IF(pp_layers[c] < 1, VD_EINVAL,
                  "parallel.pp_layers entry %d is %d: every model chunk needs at least one "
                  "layer", c + 1, pp_layers[c]);
        sum += pp_layers[c];
        chunk_layers[c] = pp_layers[c];
    }
    RETURN_IF(sum != num_layers, VD_EINVAL,
              "parallel.pp_layers adds up to %d layers; the model has num_hidden_layers = %d",
              sum, num_layers);
    return 0;
}

void par_layout_from_grid(struct model_layout *lay, const struct dist_grid *grid, int rank,
                          int vpp, const int *chunk_layers)
{
    struct dist_grid_coords c;
    dist_grid_coords(grid, rank, &c);
    int const pp = grid->dims.pp;
    *lay = (struct model_layout){
        .tp = grid->dims.tp, .tp_rank = c.tp, .ep = grid->dims.ep, .ep_rank = c.ep,
        .etp = grid->dims.etp, .etp_rank = c.etp, .nchunks = vpp,
        .has_embed = c.pp == 0, .has_head = c.pp == pp - 1};
    int begin = 0;
    for (int g = 0; g < pp * vpp; g++) { /* global chunk g: pipeline rank g mod pp */
        if (g % pp == c.pp) {
            lay->chunk_begin[g / pp] = begin;
            lay->chunk_end[g / pp] = begin + chunk_layers[g];
        }
        begin += chunk_layers[g];
    }
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

/* Sizes (base NULL) or carves (base set) one arena in two passes of `lay_out`; the memory
 * is zeroed. Returns the bytes. */
static size_t arena_build(void **base, void (*lay_out)(void *obj, const struct par_model *pm,
                                                        struct arena *ar),
                          void *obj, const struct par_model *pm)
{
    struct arena ar = {0};
    lay_out(obj, pm, &ar);
    size_t const nbytes = ar.used;
    ar = (struct arena){.base = vd_alloc(nbytes), .cap = nbytes};
    memset(ar.base, 0, nbytes);
    lay_out(obj, pm, &ar);
    *base = ar.base;
    return nbytes;
}

/* The model's dimensions on this rank, as the buffer layouts use them. */
struct dims {
    size_t Nmb, N, Ns, d, hd, Hl, Gl, E, k, E_local, Fl, Vl, A, q, Ng, etp, cp;
    int B, T;
    bool tp_gather;
};

static struct dims dims_of(const struct par_model *pm)
{
    const struct model_config *c = &pm->cfg;
    struct dims m = {.Nmb = pm->shape.Nmb, .N = pm->shape.N, .Ns = pm->shape.Ns,
                     .d = (size_t)c->hidden_size, .B = pm->shape.B, .T = pm->shape.T,
                     .cp = (size_t)pm->groups.cp.size};
    m.hd = m.d / (size_t)c->num_attention_heads;
    m.Hl = (size_t)(c->num_attention_heads / pm->lay.tp);
    m.Gl = (size_t)(c->num_key_value_heads / pm->lay.tp);
    m.E = (size_t)c->num_local_experts;
    m.k = (size_t)c->num_experts_per_tok;
    m.E_local = m.E / (size_t)pm->lay.ep;
    m.Fl = (size_t)(c->intermediate_size / pm->lay.etp);
    m.Vl = (size_t)(c->vocab_size / pm->lay.tp);
    m.A = par_moe_rows_max(pm);
    m.tp_gather = pm->groups.tp.size > 1;
    m.q = (size_t)pm->groups.etpep.size;
    m.Ng = m.Ns * m.q;
    m.etp = (size_t)pm->groups.etp.size;
    return m;
}

/* Blocks of the largest model chunk of the rank: an activation set serves any chunk. */
static int acts_blocks(const struct par_model *pm)
{
    int most = 0;
    for (int c = 0; c < pm->nchunks; c++)
        if (pm->chunks[c].nblocks > most) most = pm->chunks[c].nblocks;
    return most;
}

/* One activation set. Gathered copies alias the local ones when the gathering group has
 * size one. */
static void layout_acts(void *obj, const struct par_model *pm, struct arena *ar)
{
    struct par_acts *a = obj;
    struct dims const m = dims_of(pm);
    int const nl = acts_blocks(pm);
    size_t const N = m.N, Ns = m.Ns, d = m.d, E = m.E, k = m.k, A = m.A, f = sizeof(float);
    a->inputs = arena_take(ar, N * sizeof(int));
    a->targets = arena_take(ar, N * sizeof(int));
    a->pos = arena_take(ar, N * sizeof(int));
    a->resid = arena_take(ar, (size_t)(nl + 1) * Ns * d * f);
    for (int l = 0; l < nl; l++) {
        struct par_block_acts *ba = &a->blocks[l];
        ba->h_mid = arena_take(ar, Ns * d * f);
        ba->a_loc = arena_take(ar, Ns * d * f);
        ba->a = m.tp_gather ? arena_take(ar, N * d * f) : ba->a_loc;
        ba->rstd1 = arena_take(ar, Ns * f);
        ba->q = arena_take(ar, N * m.Hl * m.hd * f);
        ba->k = arena_take(ar, N * m.Gl * m.hd * f);
        ba->v = arena_take(ar, N * m.Gl * m.hd * f);
        ba->att = arena_take(ar, N * m.Hl * m.hd * f);
        ba->lse = arena_take(ar, N * m.Hl * f);
        ba->m_loc = arena_take(ar, Ns * d * f);
        ba->rstd2 = arena_take(ar, Ns * f);
        ba->rprobs = arena_take(ar, Ns * E * f);
        ba->rtopk_w = arena_take(ar, Ns * k * f);
        ba->rlse = arena_take(ar, Ns * f);
        ba->rtopk = arena_take(ar, Ns * k * sizeof(int));
        ba->counts = arena_take(ar, E * f);
        ba->kept = arena_take(ar, Ns * k);
        ba->slot_row = arena_take(ar, Ns * k * sizeof(int));
        ba->send_slot = arena_take(ar, Ns * k * sizeof(int));
        ba->y_ret = arena_take(ar, m.etp * Ns * k * d * f);
        ba->counts_matrix = arena_take(ar, m.q * E * sizeof(int));
        ba->w_g = arena_take(ar, m.Ng * k * f);
        ba->topk_g = arena_take(ar, m.Ng * k * sizeof(int));
        ba->kept_g = arena_take(ar, m.Ng * k);
        ba->sorted_from = arena_take(ar, A * sizeof(int));
        ba->slot_of = arena_take(ar, A * sizeof(int));
        ba->row_of_slot = arena_take(ar, m.Ng * k * sizeof(int));
        ba->expert_off = arena_take(ar, (m.E_local + 1) * sizeof(size_t));
        ba->x_perm = arena_take(ar, A * d * f);
        ba->h1 = arena_take(ar, A * m.Fl * f);
        ba->h3 = arena_take(ar, A * m.Fl * f);
        ba->act = arena_take(ar, A * m.Fl * f);
        ba->y_perm = arena_take(ar, A * d * f);
    }
    if (pm->lay.has_head) {
        a->hn_loc = arena_take(ar, Ns * d * f);
        a->hn = m.tp_gather ? arena_take(ar, N * d * f) : a->hn_loc;
        a->rstd_f = arena_take(ar, Ns * f);
        a->logits = arena_take(ar, N * m.Vl * f);
        a->rowmax = arena_take(ar, N * f);
        a->rowsum = arena_take(ar, N * f);
    }
}

/* The scratch of the layer calls. */
static void layout_scratch(void *obj, const struct par_model *pm, struct arena *ar)
{
    struct par_scratch *s = obj;
    struct dims const m = dims_of(pm);
    size_t const N = m.N, Ns = m.Ns, d = m.d, E = m.E, k = m.k, A = m.A, q = m.q;
    size_t const f = sizeof(float);
    bool const head = pm->lay.has_head;
    s->embed_rows = pm->lay.has_embed && m.tp_gather ? arena_take(ar, N * d * f) : NULL;
    s->attn_proj = arena_take(ar, N * d * f);
    s->router_logits = arena_take(ar, Ns * E * f);
    s->moe_out = arena_take(ar, Ns * d * f);
    s->ce_max = head ? arena_take(ar, N * f) : NULL;
    s->ce_target = head ? arena_take(ar, N * f) : NULL;
    s->dh = arena_take(ar, Ns * d * f);
    s->dnorm = arena_take(ar, Ns * d * f);
    s->dgathered = arena_take(ar, N * d * f);
    s->da = arena_take(ar, N * d * f);
    s->dlogits = head ? arena_take(ar, N * m.Vl * f) : NULL;
    s->dq = arena_take(ar, N * m.Hl * m.hd * f);
    s->dk = arena_take(ar, N * m.Gl * m.hd * f);
    s->dv = arena_take(ar, N * m.Gl * m.hd * f);
    s->datt = arena_take(ar, N * m.Hl * m.hd * f);
    s->drouter = arena_take(ar, Ns * E * f);
    s->dtopk_w = arena_take(ar, Ns * k * f);
    s->dx_perm = arena_take(ar, A * d * f);
    s->dy_perm = arena_take(ar, A * d * f);
    s->expert_ws = arena_take(ar, A * 2 * m.Fl * f);
    s->attn_ws = arena_take(ar, model_flash_scratch_floats(pm->shape.Tl, (int)m.hd) * f);
    s->attn_delta = arena_take(ar, N * m.Hl * f);
    size_t const kv = 2 * N * m.Gl * m.hd; /* one rank's keys and values */
    size_t const held = pm->opt.cp_allgather ? m.cp : 2;
    s->kv_ring = m.cp > 1 ? arena_take(ar, held * kv * f) : NULL;
    s->dkv_ring = m.cp > 1 ? arena_take(ar, held * kv * f) : NULL;
    s->dkv_part = m.cp > 1 ? arena_take(ar, kv * f) : NULL;
    s->aux_coef = arena_take(ar, E * f);
    size_t const Nmb = m.Nmb; /* the capacity decision sees the whole micro-batch */
    s->gathered_token = arena_take(ar, Nmb * sizeof(int));
    s->gathered_topk = arena_take(ar, Nmb * k * sizeof(int));
    s->gathered_probs = arena_take(ar, Nmb * E * f);
    s->full_topk = arena_take(ar, Nmb * k * sizeof(int));
    s->full_probs = arena_take(ar, Nmb * E * f);
    s->full_kept = arena_take(ar, Nmb * k);
    s->by_expert = arena_take(ar, Nmb * k * sizeof(int));
    s->expert_counts = arena_take(ar, 2 * (E + 1) * sizeof(size_t));
    s->router_sums = arena_take(ar, (2 * E + 1) * sizeof(double));
    s->xsend = arena_take(ar, Ns * k * (d > q ? d : q) * f);
    s->xrecv = arena_take(ar, m.etp * Ns * k * d * f);
    s->xgather = arena_take(ar, m.Ng * d * f);
    s->send_fill = arena_take(ar, (E + 1) * sizeof(int));
    s->xplan = arena_take(ar, (E + 1 + m.E_local * q + 1) * sizeof(int));
    s->xreqs = arena_take(ar, 2 * m.E_local * q * sizeof(MPI_Request));
    s->xpack = arena_take(ar, (size_t)pm->groups.ep.size * sizeof(bool));
}

void par_acts_init(struct par_acts *a, const struct par_model *pm)
{
    memset(a, 0, sizeof *a);
    int const nl = acts_blocks(pm);
    size_t const L = (size_t)(nl > 0 ? nl : 1), q = (size_t)pm->groups.etpep.size;
    a->blocks = vd_calloc(L, sizeof *a->blocks);
    arena_build(&a->base, layout_acts, a, pm);
    /* Every rank's expert blocks of this set, for the direct writes of the dispatch. */
    uint64_t *by_rank = vd_calloc(q * L, sizeof *by_rank); /* [rank][layer] */
    uint64_t *mine = by_rank + (size_t)pm->groups.etpep.rank * L;
    for (int l = 0; l < nl; l++) mine[l] = (uint64_t)(uintptr_t)a->blocks[l].x_perm;
    dist_allgather_bytes(&pm->groups.etpep, DIST_ETPEP, by_rank, mine, L * sizeof *mine);
    a->peer_x_perm = vd_calloc(q * L, sizeof *a->peer_x_perm); /* [layer][rank] */
    for (size_t r = 0; r < q; r++)
        for (size_t l = 0; l < L; l++) a->peer_x_perm[l * q + r] = by_rank[r * L + l];
    for (int l = 0; l < nl; l++) a->blocks[l].peer_x_perm = a->peer_x_perm + (size_t)l * q;
    free(by_rank);
}

void par_acts_free(struct par_acts *a)
{
    free(a->blocks);
    free(a->peer_x_perm);
    free(a->base);
    memset(a, 0, sizeof *a);
}

/* The ordered layer list of the rank, chunk by chunk: the embedding opens the first chunk,
 * the head closes the last. */
static void build_layers(struct par_model *pm)
{
    const struct model_layout *lay = &pm->lay;
    pm->layers = vd_calloc((size_t)model_layout_nlayers(lay) + 2, sizeof *pm->layers);
    pm->nchunks = lay->nchunks;
    int block = 0;
    for (int c = 0; c < lay->nchunks; c++) {
        struct par_chunk *ch = &pm->chunks[c];
        *ch = (struct par_chunk){.first = pm->nlayers, .block0 = block,
                                 .nblocks = lay->chunk_end[c] - lay->chunk_begin[c],
                                 .layer0 = lay->chunk_begin[c],
                                 .has_embed = c == 0 && lay->has_embed,
                                 .has_head = c == lay->nchunks - 1 && lay->has_head};
        if (ch->has_embed)
            pm->layers[pm->nlayers++] = (struct par_layer){.kind = PAR_LAYER_EMBED, .layer = -1};
        for (int l = lay->chunk_begin[c]; l < lay->chunk_end[c]; l++)
            pm->layers[pm->nlayers++] = (struct par_layer){.kind = PAR_LAYER_BLOCK, .layer = l};
        if (ch->has_head)
            pm->layers[pm->nlayers++] = (struct par_layer){.kind = PAR_LAYER_HEAD, .layer = -1};
        ch->count = pm->nlayers - ch->first;
        block += ch->nblocks;
    }
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

/* Which micro-batch token (b T + position) each row is: the context-parallel rank's rows
 * are, per sequence, its chunks r and 2 cp - 1 - r (zigzag, so that causal work balances);
 * sequence parallelism gives each tensor rank a contiguous slice of them. And the
 * coordinates of the etp x ep group's ranks. */
static void locate_rows(struct par_model *pm)
{
    size_t const Ns = pm->shape.Ns, N = pm->shape.N;
    int const cp = pm->groups.cp.size, cr = pm->groups.cp.rank, Tl = pm->shape.Tl;
    int const chunk = Tl / 2;
    pm->cp_token = vd_calloc(N, sizeof *pm->cp_token);
    for (size_t i = 0; i < N; i++) {
        int const b = (int)(i / (size_t)Tl), j = (int)(i % (size_t)Tl);
        int const pos = cp == 1      ? j
                        : j < chunk ? cr * chunk + j
                                    : (2 * cp - 1 - cr) * chunk + j - chunk;
        pm->cp_token[i] = b * pm->shape.T + pos;
    }
    pm->row_token = vd_calloc(Ns, sizeof *pm->row_token);
    for (size_t i = 0; i < Ns; i++)
        pm->row_token[i] = pm->cp_token[(size_t)pm->lay.tp_rank * Ns + i];
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

/* Sizes one activation set without keeping it (for the memory plan). */
static size_t acts_nbytes(const struct par_model *pm)
{
    int const nl = acts_blocks(pm);
    struct par_acts a = {.blocks = vd_calloc((size_t)(nl > 0 ? nl : 1), sizeof *a.blocks)};
    struct arena ar = {0};
    layout_acts(&a, pm, &ar);
    free(a.blocks);
    return ar.used;
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
    int const cp = groups->cp.size;
    pm->shape.B = B;
    pm->shape.T = T;
    pm->shape.Nmb = (size_t)B * (size_t)T;
    RETURN_IF(cp > 1 && T % (2 * cp), VD_EINVAL,
              "seq_len = %d is not divisible by 2 x parallel.cp = %d (context parallelism cuts "
              "each sequence into 2 cp equal chunks)", T, 2 * cp);
    pm->shape.Tl = T / cp;
    pm->shape.N = (size_t)B * (size_t)pm->shape.Tl;
    RETURN_IF(pm->shape.N % (size_t)lay->tp, VD_EINVAL,
              "micro_batch * seq_len / parallel.cp = %zu tokens is not divisible by parallel.tp "
              "= %d (sequence parallelism splits them evenly)", pm->shape.N, lay->tp);
    pm->shape.Ns = pm->shape.N / (size_t)lay->tp;
    FORWARD_IF(model_table_build(&pm->tab, cfg, lay));
    par_optim_init(pm);

    pm->params = vd_calloc(pm->tab.numel, sizeof(float));
    pm->grads = vd_calloc(pm->tab.numel, sizeof(float));
    model_ptrs_build(&pm->p, &pm->tab, pm->params, lay, cfg->num_local_experts);
    model_ptrs_build(&pm->g, &pm->tab, pm->grads, lay, cfg->num_local_experts);

    build_layers(pm);
    locate_buckets(pm);
    pm->reqs = vd_calloc(2 * (size_t)pm->nlayers + 2, sizeof *pm->reqs);

    pm->scratch_nbytes = arena_build(&pm->scr.base, layout_scratch, &pm->scr, pm);
    pm->act_nbytes = acts_nbytes(pm);
    int const hd = cfg->hidden_size / cfg->num_attention_heads;
    pm->rope_cos = vd_calloc((size_t)T * (size_t)hd / 2, sizeof(float));
    pm->rope_sin = vd_calloc((size_t)T * (size_t)hd / 2, sizeof(float));
    model_rope_table(pm->rope_cos, pm->rope_sin, T, hd, cfg->rope_theta);
    locate_rows(pm);
    /* Direct writes of the all-to-all forward dispatch need every peer's expert blocks
     * (each activation set gathers their addresses). */
    bool const a2a = cfg->moe_token_dispatcher_type == MODEL_DISPATCH_ALLTOALL;
    dist_direct_init(&pm->direct, &pm->groups.etpep, a2a && opt->dispatch_direct);
    return 0;
}

void par_model_free(struct par_model *pm)
{
    model_ptrs_free(&pm->p);
    model_ptrs_free(&pm->g);
    model_table_free(&pm->tab);
    free(pm->params);
    free(pm->grads);
    par_optim_free(pm);
    free(pm->layers);
    free(pm->reqs);
    free(pm->row_token);
    free(pm->cp_token);
    free(pm->etpep_ep);
    free(pm->etpep_etp);
    free(pm->etpep_of);
    free(pm->rope_cos);
    free(pm->rope_sin);
    free(pm->scr.base);
    dist_direct_free(&pm->direct);
    memset(pm, 0, sizeof *pm);
}
