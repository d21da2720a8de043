/* The parameter table (every tensor once: Hugging Face name, global shape, sharding),
 * layout-independent initialisation, pointer views, counts and FLOPs, AdamW. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"

struct table_builder {
    struct model_table *tab;
    int cap;
    const struct model_layout *lay;
};

/* Appends one tensor; `parts` and `part` say how its global shape is split. */
static void table_add(struct table_builder *b, enum model_tensor_kind kind, int layer,
                      int expert, const char *name, int ndim, size_t rows, size_t cols,
                      enum model_shard shard, enum model_shard_group group)
{
    struct model_table *tab = b->tab;
    if (tab->count == b->cap) {
        b->cap = b->cap ? 2 * b->cap : 64;
        struct model_tensor *t = realloc(tab->t, (size_t)b->cap * sizeof *t);
        VD_CHECK(t != NULL, "out of memory growing the parameter table");
        tab->t = t;
    }
    int const parts = group == MODEL_GROUP_TP ? b->lay->tp : b->lay->etp;
    int const part = group == MODEL_GROUP_TP ? b->lay->tp_rank : b->lay->etp_rank;
    struct model_tensor *t = &tab->t[tab->count++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->kind = kind;
    t->layer = layer;
    t->expert = expert;
    t->ndim = ndim;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->shard = shard;
    t->group = group;
    t->local_shape[0] = rows;
    t->local_shape[1] = cols;
    int const dim = shard == MODEL_SHARD_DIM0 ? 0 : shard == MODEL_SHARD_DIM1 ? 1 : -1;
    if (dim >= 0) {
        t->local_shape[dim] = t->shape[dim] / (size_t)parts;
        t->local_start[dim] = t->local_shape[dim] * (size_t)part;
    }
    t->numel = t->local_shape[0] * t->local_shape[1];
    t->offset = tab->numel;
    tab->numel += t->numel;
    t->decay = ndim == 2;
    t->is_expert = expert >= 0;
}

void model_layout_serial(struct model_layout *lay, int num_layers)
{
    *lay = (struct model_layout){.tp = 1, .ep = 1, .etp = 1, .nchunks = 1,
                                 .chunk_end = {num_layers}, .has_embed = true,
                                 .has_head = true};
}

int model_layout_nlayers(const struct model_layout *lay)
{
    int n = 0;
    for (int c = 0; c < lay->nchunks; c++) n += lay->chunk_end[c] - lay->chunk_begin[c];
    return n;
}

int model_layout_local(const struct model_layout *lay, int l)
{
    int n = 0;
    for (int c = 0; c < lay->nchunks; c++) {
        if (l >= lay->chunk_begin[c] && l < lay->chunk_end[c]) return n + l - lay->chunk_begin[c];
        n += lay->chunk_end[c] - lay->chunk_begin[c];
    }
    return -1;
}

int model_layout_global(const struct model_layout *lay, int li)
{
    for (int c = 0; c < lay->nchunks; c++) {
        int const n = lay->chunk_end[c] - lay->chunk_begin[c];
        if (li < n) return lay->chunk_begin[c] + li;
        li -= n;
    }
    VD_CHECK(false, "local layer index beyond the rank's chunks");
    return -1;
}

int model_table_build(struct model_table *tab, const struct model_config *cfg,
                      const struct model_layout *lay)
{
    memset(tab, 0, sizeof *tab);
    int const V = cfg->vocab_size, d = cfg->hidden_size, F = cfg->intermediate_size;
    int const H = cfg->num_attention_heads, G = cfg->num_key_value_heads;
    int const E = cfg->num_local_experts, hd = d / H;
    RETURN_IF(H % lay->tp || G % lay->tp, VD_EINVAL,
              "num_attention_heads = %d and num_key_value_heads = %d must both be divisible "
              "by parallel.tp = %d", H, G, lay->tp);
    RETURN_IF(V % lay->tp, VD_EINVAL,
              "vocab_size = %d is not divisible by parallel.tp = %d (the vocabulary is split "
              "evenly, without padding)", V, lay->tp);
    RETURN_IF(E % lay->ep, VD_EINVAL,
              "num_local_experts = %d is not divisible by parallel.ep = %d", E, lay->ep);
    RETURN_IF(F % lay->etp, VD_EINVAL,
              "intermediate_size = %d is not divisible by parallel.etp = %d", F, lay->etp);

    struct table_builder b = {.tab = tab, .cap = 0, .lay = lay};
    char name[96];
    if (lay->has_embed)
        table_add(&b, MODEL_T_EMBED, -1, -1, "model.embed_tokens.weight", 2, (size_t)V,
                  (size_t)d, MODEL_SHARD_DIM0, MODEL_GROUP_TP);
    int const nl = model_layout_nlayers(lay);
    for (int li = 0; li < nl; li++) {
        int const l = model_layout_global(lay, li);
        struct {
            enum model_tensor_kind kind;
            const char *suffix;
            int ndim;
            size_t rows, cols;
            enum model_shard shard;
        } const dense[] = {
            {MODEL_T_LN1, "input_layernorm.weight", 1, (size_t)d, 1, MODEL_SHARD_NONE},
            {MODEL_T_WQ, "self_attn.q_proj.weight", 2, (size_t)H * hd, (size_t)d, MODEL_SHARD_DIM0},
            {MODEL_T_WK, "self_attn.k_proj.weight", 2, (size_t)G * hd, (size_t)d, MODEL_SHARD_DIM0},
            {MODEL_T_WV, "self_attn.v_proj.weight", 2, (size_t)G * hd, (size_t)d, MODEL_SHARD_DIM0},
            {MODEL_T_WO, "self_attn.o_proj.weight", 2, (size_t)d, (size_t)H * hd, MODEL_SHARD_DIM1},
            {MODEL_T_LN2, "post_attention_layernorm.weight", 1, (size_t)d, 1, MODEL_SHARD_NONE},
            {MODEL_T_ROUTER, "block_sparse_moe.gate.weight", 2, (size_t)E, (size_t)d,
             MODEL_SHARD_NONE},
        };
        for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++) {
            snprintf(name, sizeof name, "model.layers.%d.%s", l, dense[i].suffix);
            table_add(&b, dense[i].kind, l, -1, name, dense[i].ndim, dense[i].rows,
                      dense[i].cols, dense[i].shard, MODEL_GROUP_TP);
        }
    }
    if (lay->has_head) {
        table_add(&b, MODEL_T_NORM, -1, -1, "model.norm.weight", 1, (size_t)d, 1,
                  MODEL_SHARD_NONE, MODEL_GROUP_TP);
        table_add(&b, MODEL_T_HEAD, -1, -1, "lm_head.weight", 2, (size_t)V, (size_t)d,
                  MODEL_SHARD_DIM0, MODEL_GROUP_TP);
    }
    tab->numel_dense = tab->numel;
    int const E_local = E / lay->ep;
    for (int li = 0; li < nl; li++)
        for (int el = 0; el < E_local; el++) {
            int const l = model_layout_global(lay, li);
            int const e = lay->ep_rank * E_local + el;
            /* w1 then w3 adjacent: the pair is one (2 F_local, d) block in memory. */
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, e);
            table_add(&b, MODEL_T_W1, l, e, name, 2, (size_t)F, (size_t)d, MODEL_SHARD_DIM0,
                      MODEL_GROUP_ETP);
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l, e);
            table_add(&b, MODEL_T_W3, l, e, name, 2, (size_t)F, (size_t)d, MODEL_SHARD_DIM0,
                      MODEL_GROUP_ETP);
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l, e);
            table_add(&b, MODEL_T_W2, l, e, name, 2, (size_t)d, (size_t)F, MODEL_SHARD_DIM1,
                      MODEL_GROUP_ETP);
        }
    return 0;
}

void model_table_free(struct model_table *tab)
{
    free(tab->t);
    memset(tab, 0, sizeof *tab);
}

int model_table_find(const struct model_table *tab, const char *name)
{
    for (int i = 0; i < tab->count; i++)
        if (strcmp(tab->t[i].name, name) == 0) return i;
    return -1;
}

/* splitmix64's finaliser: a bijective 64-bit mix with full avalanche. */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t name_hash(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

/* Box-Muller on two counter-based uniforms: the value depends on (seed, name, index)
 * only, so every layout draws the same weights without sharing a generator state. */
float model_init_normal(uint64_t seed, const char *name, uint64_t index)
{
    uint64_t const key = mix64(seed ^ mix64(name_hash(name)));
    uint64_t const a = mix64(key + (2 * index + 1) * 0x9e3779b97f4a7c15ULL);
    uint64_t const b = mix64(key + (2 * index + 2) * 0x9e3779b97f4a7c15ULL);
    double const u1 = ((double)(a >> 11) + 0.5) * 0x1.0p-53;
    double const u2 = ((double)(b >> 11) + 0.5) * 0x1.0p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

void model_init_params(const struct model_table *tab, float *params, uint64_t seed,
                       int num_layers)
{
    for (int i = 0; i < tab->count; i++) {
        const struct model_tensor *t = &tab->t[i];
        float *p = params + t->offset;
        if (t->ndim == 1) {
            for (size_t j = 0; j < t->numel; j++) p[j] = 1.0f;
            continue;
        }
        float const std = t->kind == MODEL_T_WO || t->kind == MODEL_T_W2
                              ? 0.02f / sqrtf(2.0f * (float)num_layers)
                              : 0.02f;
        size_t const rows = t->local_shape[0], cols = t->local_shape[1];
#pragma omp parallel for schedule(static)
        for (size_t r = 0; r < rows; r++)
            for (size_t c = 0; c < cols; c++) {
                uint64_t const g = (t->local_start[0] + r) * t->shape[1] + t->local_start[1] + c;
                p[r * cols + c] = std * model_init_normal(seed, t->name, g);
            }
    }
}

void model_ptrs_build(struct model_ptrs *p, const struct model_table *tab, float *base,
                      const struct model_layout *lay, int num_local_experts)
{
    int const nl = model_layout_nlayers(lay);
    int const E_local = num_local_experts / lay->ep;
    memset(p, 0, sizeof *p);
    p->layers = vd_calloc((size_t)(nl > 0 ? nl : 1), sizeof *p->layers);
    p->expert_slots = vd_calloc((size_t)(nl > 0 ? nl : 1) * 3 * (size_t)E_local + 1,
                                sizeof *p->expert_slots);
    for (int l = 0; l < nl; l++) {
        p->layers[l].w1 = p->expert_slots + (size_t)l * 3 * E_local;
        p->layers[l].w3 = p->layers[l].w1 + E_local;
        p->layers[l].w2 = p->layers[l].w3 + E_local;
    }
    for (int i = 0; i < tab->count; i++) {
        const struct model_tensor *t = &tab->t[i];
        float *ptr = base + t->offset;
        struct model_layer_ptrs *L = t->layer >= 0 ? &p->layers[model_layout_local(lay, t->layer)] : NULL;
        int const el = t->expert >= 0 ? t->expert - lay->ep_rank * E_local : -1;
        switch (t->kind) {
        case MODEL_T_EMBED: p->embed = ptr; break;
        case MODEL_T_NORM: p->norm = ptr; break;
        case MODEL_T_HEAD: p->head = ptr; break;
        case MODEL_T_LN1: L->ln1 = ptr; break;
        case MODEL_T_WQ: L->wq = ptr; break;
        case MODEL_T_WK: L->wk = ptr; break;
        case MODEL_T_WV: L->wv = ptr; break;
        case MODEL_T_WO: L->wo = ptr; break;
        case MODEL_T_LN2: L->ln2 = ptr; break;
        case MODEL_T_ROUTER: L->router = ptr; break;
        case MODEL_T_W1: L->w1[el] = ptr; break;
        case MODEL_T_W3: L->w3[el] = ptr; break;
        case MODEL_T_W2: L->w2[el] = ptr; break;
        }
    }
}

void model_ptrs_free(struct model_ptrs *p)
{
    free(p->layers);
    free(p->expert_slots);
    memset(p, 0, sizeof *p);
}

void model_param_counts(const struct model_config *cfg, size_t *total, size_t *active)
{
    size_t const V = (size_t)cfg->vocab_size, d = (size_t)cfg->hidden_size;
    size_t const F = (size_t)cfg->intermediate_size, L = (size_t)cfg->num_hidden_layers;
    size_t const H = (size_t)cfg->num_attention_heads, G = (size_t)cfg->num_key_value_heads;
    size_t const E = (size_t)cfg->num_local_experts, k = (size_t)cfg->num_experts_per_tok;
    size_t const hd = d / H;
    size_t const dense_layer = 2 * d + d * hd * (H + 2 * G) + H * hd * d + E * d;
    size_t const outer = 2 * V * d + d;
    *total = outer + L * (dense_layer + E * 3 * F * d);
    *active = outer + L * (dense_layer + k * 3 * F * d);
}

double model_flops_per_token(const struct model_config *cfg, int seq_len)
{
    double const d = cfg->hidden_size, H = cfg->num_attention_heads;
    double const G = cfg->num_key_value_heads, hd = d / H, F = cfg->intermediate_size;
    double const E = cfg->num_local_experts, k = cfg->num_experts_per_tok;
    double const layer = 2 * d * hd * (H + 2 * G) + 2 * H * hd * d + 2.0 * seq_len * d +
                         2 * d * E + k * 6 * d * F;
    return cfg->num_hidden_layers * layer + 2 * d * cfg->vocab_size;
}

void model_adamw_update(float *p, const float *g, float *m, float *v, size_t n,
                        const struct model_adamw *hp, bool decay)
{
    float const b1 = hp->beta1, b2 = hp->beta2;
    float const c1 = 1.0f / (1.0f - powf(b1, (float)hp->step));
    float const c2 = 1.0f / (1.0f - powf(b2, (float)hp->step));
    float const shrink = decay ? 1.0f - hp->lr * hp->weight_decay : 1.0f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        p[i] = p[i] * shrink - hp->lr * (m[i] * c1) / (sqrtf(v[i] * c2) + hp->eps);
    }
}

float model_lr_at(int cosine, float lr_max, float lr_min, int warmup, int total, int step)
{
    if (!cosine) return lr_max;
    if (step < warmup) return lr_max * (float)(step + 1) / (float)warmup;
    double const frac = total > warmup ? (double)(step - warmup) / (double)(total - warmup) : 1.0;
    return (float)(lr_min + 0.5 * (lr_max - lr_min) * (1.0 + cos(M_PI * frac)));
}
