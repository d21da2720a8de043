/* The attention seam: the one place a transformer block's core attention is computed, by
 * the blockwise kernels of model/ (online softmax; the backward recomputes probabilities
 * from the saved log-sum-exp, so nothing of size T x T is kept).
 *
 * Context parallelism: each sequence is cut into 2 cp chunks and context-parallel rank r
 * holds chunks r and 2 cp - 1 - r (its "pieces", in that order, as its Tl = T / cp rows
 * per sequence; with cp = 1 the whole sequence is one piece). A rank's queries attend to
 * every rank's keys and values: of a (query chunk a, key chunk b) pair, b < a attends
 * fully, b = a causally, b > a not at all, and the partial results over key blocks merge
 * by log-sum-exp. The keys and values of each rank travel around the cp group (p2p: ring
 * attention, the next block's transfer overlapping this block's compute, and in the
 * backward their gradients travel along and end at their owner) or are all-gathered
 * (allgather: their gradients are reduce-scattered back). Grouped-query attention sends
 * the Gl key/value heads only. */
#include <math.h>
#include <string.h>

#include "parallel/parallel_internal.h"

enum { TAG_KV = 1, TAG_DKV = 2 };

/* The local heads and one rank's key/value block: [K (N, Gl hd) | V (N, Gl hd)]. */
struct geo {
    int cp, r, pieces, len; /* cp group, this rank, pieces per sequence, positions each */
    int Hl, Gl, hd;
    size_t qs, ks, kv;      /* row strides of q and k; floats of one rank's K (= of its V) */
};

static struct geo geo_of(const struct par_model *pm)
{
    const struct model_config *c = &pm->cfg;
    struct geo g = {.cp = pm->groups.cp.size, .r = pm->groups.cp.rank,
                    .hd = c->hidden_size / c->num_attention_heads,
                    .Hl = c->num_attention_heads / pm->lay.tp,
                    .Gl = c->num_key_value_heads / pm->lay.tp};
    g.pieces = g.cp == 1 ? 1 : 2;
    g.len = pm->shape.Tl / g.pieces;
    g.qs = (size_t)g.Hl * (size_t)g.hd;
    g.ks = (size_t)g.Gl * (size_t)g.hd;
    g.kv = pm->shape.N * g.ks;
    return g;
}

/* The global chunk of piece p of rank r. */
static int chunk_of(const struct geo *g, int r, int p)
{
    return p == 0 ? r : 2 * g->cp - 1 - r;
}

/* The blocks of one (query piece, key piece) pair, with the mask their chunks call for;
 * false when the keys lie entirely after the queries. */
static bool pair_blocks(const struct par_model *pm, const struct geo *g, int qp, int src, int kp,
                        struct model_attn_blocks *b)
{
    int const a = chunk_of(g, g->r, qp), kb = chunk_of(g, src, kp);
    if (kb > a) return false;
    *b = (struct model_attn_blocks){.B = pm->shape.B, .Tq = g->len, .Tk = g->len,
                                    .q_seq = (size_t)pm->shape.Tl, .k_seq = (size_t)pm->shape.Tl,
                                    .Hl = g->Hl, .Gl = g->Gl, .hd = g->hd,
                                    .mask = kb == a ? MODEL_MASK_CAUSAL : MODEL_MASK_FULL};
    return true;
}

/* Merges into ba->att and ba->lse the attention of the local queries to rank src's keys
 * and values k, v (its rows in the local layout). */
static void attend_forward(struct par_model *pm, const struct geo *g, struct par_block_acts *ba,
                           const float *k, const float *v, int src)
{
    for (int qp = 0; qp < g->pieces; qp++)
        for (int kp = 0; kp < g->pieces; kp++) {
            struct model_attn_blocks b;
            if (!pair_blocks(pm, g, qp, src, kp, &b)) continue;
            size_t const qo = (size_t)qp * g->len, ko = (size_t)kp * g->len;
            model_flash_forward(ba->att + qo * g->qs, ba->lse + qo * (size_t)g->Hl,
                                ba->q + qo * g->qs, k + ko * g->ks, v + ko * g->ks, &b, true,
                                pm->scr.attn_ws);
        }
}

/* The backward of attend_forward: dq +=, and dk +=, dv += for rank src's block. */
static void attend_backward(struct par_model *pm, const struct geo *g,
                            const struct par_block_acts *ba, const float *datt, float *dq,
                            const float *k, const float *v, float *dk, float *dv, int src)
{
    for (int qp = 0; qp < g->pieces; qp++)
        for (int kp = 0; kp < g->pieces; kp++) {
            struct model_attn_blocks b;
            if (!pair_blocks(pm, g, qp, src, kp, &b)) continue;
            size_t const qo = (size_t)qp * g->len, ko = (size_t)kp * g->len;
            size_t const lo = qo * (size_t)g->Hl;
            model_flash_backward(dq + qo * g->qs, dk + ko * g->ks, dv + ko * g->ks,
                                 datt + qo * g->qs, ba->lse + lo, pm->scr.attn_delta + lo,
                                 ba->q + qo * g->qs, k + ko * g->ks, v + ko * g->ks, &b,
                                 pm->scr.attn_ws);
        }
}

/* [K | V] of this rank into buf. */
static void pack_kv(const struct geo *g, float *buf, const float *k, const float *v)
{
    memcpy(buf, k, g->kv * sizeof *buf);
    memcpy(buf + g->kv, v, g->kv * sizeof *buf);
}

/* Ring step i's transfer of key/value blocks: the held one (slot `cur` of kv_ring) to the
 * next rank, the next one from the previous rank into the other slot. */
static void ring_kv_start(struct par_model *pm, const struct geo *g, int cur, MPI_Request *req)
{
    const struct dist_group *cpg = &pm->groups.cp;
    float *ring = pm->scr.kv_ring;
    size_t const n = 2 * g->kv;
    dist_irecv(cpg, ring + (size_t)(cur ^ 1) * n, n, (g->r + g->cp - 1) % g->cp, TAG_KV, &req[0]);
    dist_isend(cpg, ring + (size_t)cur * n, n, (g->r + 1) % g->cp, TAG_KV, &req[1]);
}

void par_attention_forward(struct par_model *pm, struct par_block_acts *ba)
{
    struct geo const g = geo_of(pm);
    size_t const rows = pm->shape.N, n = 2 * g.kv;
    memset(ba->att, 0, rows * g.qs * sizeof(float));
    for (size_t i = 0; i < rows * (size_t)g.Hl; i++) ba->lse[i] = -INFINITY;
    if (g.cp == 1) {
        attend_forward(pm, &g, ba, ba->k, ba->v, g.r);
        return;
    }
    float *ring = pm->scr.kv_ring;
    if (pm->opt.cp_allgather) {
        pack_kv(&g, pm->scr.dkv_part, ba->k, ba->v);
        dist_allgather(&pm->groups.cp, DIST_CP, ring, pm->scr.dkv_part, n);
        for (int src = 0; src < g.cp; src++)
            attend_forward(pm, &g, ba, ring + (size_t)src * n, ring + (size_t)src * n + g.kv, src);
        return;
    }
    pack_kv(&g, ring, ba->k, ba->v);
    for (int i = 0; i < g.cp; i++) {
        int const cur = i & 1, src = (g.r - i + g.cp) % g.cp;
        MPI_Request req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
        if (i < g.cp - 1) ring_kv_start(pm, &g, cur, req);
        const float *held = ring + (size_t)cur * n;
        attend_forward(pm, &g, ba, held, held + g.kv, src);
        dist_wait_all(req, 2, DIST_CP, 2 * n * sizeof(float));
    }
}

/* Ring backward: the key/value blocks travel as in the forward; the gradient of the held
 * block (the contributions of the ranks it visited, in ring order) travels one step
 * behind it and, after the last step, reaches its owner. */
static void ring_backward(struct par_model *pm, const struct geo *g,
                          const struct par_block_acts *ba, const float *datt, float *dq,
                          float *dk, float *dv)
{
    const struct dist_group *cpg = &pm->groups.cp;
    size_t const n = 2 * g->kv;
    float *ring = pm->scr.kv_ring, *in = pm->scr.dkv_ring, *out = in + n;
    int const prev = (g->r + g->cp - 1) % g->cp, next = (g->r + 1) % g->cp;
    MPI_Request dreq[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL}; /* incoming, outgoing */
    pack_kv(g, ring, ba->k, ba->v);
    for (int i = 0; i < g->cp; i++) {
        int const cur = i & 1, src = (g->r - i + g->cp) % g->cp;
        MPI_Request req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
        if (i < g->cp - 1) ring_kv_start(pm, g, cur, req);
        dist_wait_all(&dreq[1], 1, DIST_CP, n * sizeof(float)); /* `out` is free again */
        memset(out, 0, n * sizeof *out);
        const float *held = ring + (size_t)cur * n;
        attend_backward(pm, g, ba, datt, dq, held, held + g->kv, out, out + g->kv, src);
        if (i > 0) { /* what the ranks before added to this block's gradient */
            dist_wait_all(&dreq[0], 1, DIST_CP, n * sizeof(float));
            for (size_t j = 0; j < n; j++) out[j] += in[j];
        }
        dist_isend(cpg, out, n, next, TAG_DKV, &dreq[1]);
        dist_irecv(cpg, in, n, prev, TAG_DKV, &dreq[0]);
        dist_wait_all(req, 2, DIST_CP, 2 * n * sizeof(float));
    }
    dist_wait_all(dreq, 2, DIST_CP, 2 * n * sizeof(float)); /* this rank's own, complete */
    memcpy(dk, in, g->kv * sizeof *dk);
    memcpy(dv, in + g->kv, g->kv * sizeof *dv);
}

void par_attention_backward(struct par_model *pm, const struct par_block_acts *ba,
                            const float *datt, float *dq, float *dk, float *dv)
{
    struct geo const g = geo_of(pm);
    size_t const rows = pm->shape.N, n = 2 * g.kv;
    struct model_attn_blocks const all = {.B = pm->shape.B, .Tq = pm->shape.Tl,
                                          .Tk = pm->shape.Tl, .q_seq = (size_t)pm->shape.Tl,
                                          .k_seq = (size_t)pm->shape.Tl, .Hl = g.Hl, .Gl = g.Gl,
                                          .hd = g.hd, .mask = MODEL_MASK_CAUSAL};
    model_flash_delta(pm->scr.attn_delta, datt, ba->att, &all);
    memset(dq, 0, rows * g.qs * sizeof *dq);
    if (g.cp == 1) {
        memset(dk, 0, g.kv * sizeof *dk);
        memset(dv, 0, g.kv * sizeof *dv);
        attend_backward(pm, &g, ba, datt, dq, ba->k, ba->v, dk, dv, g.r);
        return;
    }
    if (!pm->opt.cp_allgather) {
        ring_backward(pm, &g, ba, datt, dq, dk, dv);
        return;
    }
    /* all-gather the blocks again, their gradients reduce-scattered to the owners */
    float *ring = pm->scr.kv_ring, *dring = pm->scr.dkv_ring, *mine = pm->scr.dkv_part;
    pack_kv(&g, mine, ba->k, ba->v);
    dist_allgather(&pm->groups.cp, DIST_CP, ring, mine, n);
    memset(dring, 0, (size_t)g.cp * n * sizeof *dring);
    for (int src = 0; src < g.cp; src++) {
        float *d = dring + (size_t)src * n;
        const float *held = ring + (size_t)src * n;
        attend_backward(pm, &g, ba, datt, dq, held, held + g.kv, d, d + g.kv, src);
    }
    dist_reduce_scatter(&pm->groups.cp, DIST_CP, mine, dring, n);
    memcpy(dk, mine, g.kv * sizeof *dk);
    memcpy(dv, mine + g.kv, g.kv * sizeof *dv);
}
