/* The schedule of one step on one pipeline rank: this replica's micro-batches through the
 * rank's model chunks in the order of its stage (parallel/pp_order.c), each a forward and
 * later a backward, gradients accumulating. Between chunks on different ranks the residual
 * stream (forward) and its gradient (backward) travel as non-blocking point-to-point
 * messages inside the pp group: the receive of the next message is posted before the
 * current op runs, sends are not waited on until their buffer is needed again. With one
 * stage and one chunk this is the plain loop: forward, backward, next micro-batch.
 *
 * The step's losses and per-layer routing statistics are gathered here, over the
 * data-parallel replicas and the pipeline stages. Without the distributed optimizer, the
 * last backward of each chunk starts its layers' gradient reduction as they finish. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/trace.h"
#include "parallel/parallel_internal.h"

int par_schedule_init(struct par_schedule *s, const struct par_model *pm,
                      const struct par_pipeline *pipe)
{
    memset(s, 0, sizeof *s);
    int const P = pm->groups.pp.size, stage = pm->groups.pp.rank, V = pm->nchunks;
    FORWARD_IF(par_pp_check(pipe->kind, P, V, pipe->m));
    s->pipe = *pipe;
    s->nops = 2 * pipe->m * V;
    s->ops = vd_calloc((size_t)s->nops, sizeof *s->ops);
    par_pp_order(pipe->kind, P, V, pipe->m, stage, s->ops);
    s->nacts = par_pp_live_max(pipe->kind, P, V, pipe->m, stage, NULL);
    s->acts = vd_calloc((size_t)s->nacts, sizeof *s->acts);
    for (int i = 0; i < s->nacts; i++) par_acts_init(&s->acts[i], pm);
    s->act_nbytes = (size_t)s->nacts * pm->act_nbytes;
    s->set_busy = vd_calloc((size_t)s->nacts, sizeof *s->set_busy);
    s->set_of = vd_calloc((size_t)V * (size_t)pipe->m, sizeof *s->set_of);
    size_t const msg = pm->shape.Ns * (size_t)pm->cfg.hidden_size;
    s->recv_buf = P > 1 ? vd_calloc(2 * msg, sizeof *s->recv_buf) : NULL;
    s->recv_req[0] = s->recv_req[1] = MPI_REQUEST_NULL;
    s->inputs = vd_calloc(2 * pm->shape.Nmb, sizeof *s->inputs);
    s->targets = s->inputs + pm->shape.Nmb;
    int const L = pm->cfg.num_hidden_layers;
    s->layer_sums = vd_calloc(2 * (size_t)L + 1, sizeof *s->layer_sums);
    s->layer_max = vd_calloc(2 * (size_t)L + 1, sizeof *s->layer_max);
    s->layer_stats = vd_calloc((size_t)L + 1, sizeof *s->layer_stats);
    return 0;
}

void par_schedule_free(struct par_schedule *s)
{
    for (int i = 0; i < s->nacts; i++) par_acts_free(&s->acts[i]);
    for (int i = 0; i < s->nsends; i++) free(s->sends[i].buf);
    free(s->sends);
    free(s->acts);
    free(s->ops);
    free(s->set_busy);
    free(s->set_of);
    free(s->recv_buf);
    free(s->inputs);
    free(s->layer_sums);
    free(s->layer_max);
    free(s->layer_stats);
    memset(s, 0, sizeof *s);
}

/* ---------------------------------------------------------------- messages */

/* Where an op's chunk sits in the model: global chunk g of G, on pipeline rank g mod P. */
struct place {
    int P, G, g;
};

static struct place place_of(const struct par_model *pm, const struct par_pp_op *op)
{
    int const P = pm->groups.pp.size;
    return (struct place){.P = P, .G = P * pm->nchunks, .g = op->chunk * P + pm->groups.pp.rank};
}

/* Whether the op starts from a message: a forward after the first chunk, a backward
 * before the last. */
static bool takes_message(const struct par_model *pm, const struct par_pp_op *op)
{
    struct place const p = place_of(pm, op);
    return op->backward ? p.g < p.G - 1 : p.g > 0;
}

/* A message's tag: its direction, the virtual chunk that receives it and its micro-batch
 * (modulo what fits; messages of one chunk and direction are sent and received in
 * micro-batch order, so equal tags match in order). */
static int message_tag(const struct par_model *pm, bool backward, int recv_chunk, int mb)
{
    int const span = (DIST_TAG_MAX + 1) / (2 * pm->nchunks);
    return ((backward ? pm->nchunks : 0) + recv_chunk) * span + mb % span;
}

/* Posts the receive of the first op from index i on that takes a message, into buffer
 * `slot`. Returns that op's index, or nops. */
static int post_next_receive(struct par_schedule *s, const struct par_model *pm, int i, int slot)
{
    for (; i < s->nops; i++) {
        const struct par_pp_op *op = &s->ops[i];
        if (!takes_message(pm, op)) continue;
        struct place const p = place_of(pm, op);
        int const from_g = op->backward ? p.g + 1 : p.g - 1;
        size_t const msg = pm->shape.Ns * (size_t)pm->cfg.hidden_size;
        dist_irecv(&pm->groups.pp, s->recv_buf + (size_t)slot * msg, msg, from_g % p.P,
                   message_tag(pm, op->backward, op->chunk, op->mb), &s->recv_req[slot]);
        return i;
    }
    return s->nops;
}

/* A free outgoing buffer: one whose send is done, or a new one. */
static struct par_send *send_slot(struct par_schedule *s, const struct par_model *pm)
{
    for (int i = 0; i < s->nsends; i++)
        if (s->sends[i].req == MPI_REQUEST_NULL || dist_test(&s->sends[i].req))
            return &s->sends[i];
    struct par_send *grown = realloc(s->sends, (size_t)(s->nsends + 1) * sizeof *grown);
    VD_CHECK(grown != NULL, "out of memory growing the pipeline's send buffers");
    s->sends = grown;
    struct par_send *n = &s->sends[s->nsends++];
    n->buf = vd_calloc(pm->shape.Ns * (size_t)pm->cfg.hidden_size, sizeof *n->buf);
    n->req = MPI_REQUEST_NULL;
    return n;
}

/* Sends the op's output (already in sd->buf) to the next chunk's rank. */
static void send_output(const struct par_model *pm, const struct par_pp_op *op,
                        struct par_send *sd)
{
    struct place const p = place_of(pm, op);
    int const to_g = op->backward ? p.g - 1 : p.g + 1;
    dist_isend(&pm->groups.pp, sd->buf, pm->shape.Ns * (size_t)pm->cfg.hidden_size,
               to_g % p.P, message_tag(pm, op->backward, to_g / p.P, op->mb), &sd->req);
}

/* ---------------------------------------------------------------- statistics */

/* Folds one micro-batch's per-layer statistics of a chunk into sums (dropped assignments)
 * and maxima (most kept by one expert; margins, whose minima travel as maxima of their
 * negations), by global layer. */
static void collect_layers(struct par_schedule *s, const struct par_model *pm,
                           const struct par_acts *a)
{
    int const L = pm->cfg.num_hidden_layers;
    const struct par_chunk *ch = &pm->chunks[a->chunk];
    for (int bi = 0; bi < ch->nblocks; bi++) {
        const struct par_block_acts *ba = &a->blocks[bi];
        int const l = ch->layer0 + bi;
        s->layer_sums[l] += (double)ba->dropped;
        s->layer_sums[L + l] += ba->dispatch_s * 1e3;
        s->layer_max[l] = fmaxf(s->layer_max[l], (float)ba->tokens_max);
        s->layer_max[L + l] = fmaxf(s->layer_max[L + l], -ba->margin);
    }
}

/* The step's per-layer statistics over micro-batches, replicas and stages: the most tokens
 * one expert kept, mean tokens per expert, dropped fraction, smallest decision margin. */
static void finish_layers(struct par_schedule *s, const struct par_model *pm, int n_micro)
{
    int const L = pm->cfg.num_hidden_layers;
    int const E = pm->cfg.num_local_experts, k = pm->cfg.num_experts_per_tok;
    /* dropped assignments over the replicas (dispatch time stays this rank's) */
    dist_allreduce_sum_f64(&pm->groups.dp, DIST_DP, s->layer_sums, (size_t)L);
    dist_allreduce_max(&pm->groups.dp, DIST_DP, s->layer_max, 2 * (size_t)L);
    /* each layer lives on one stage; the others hold zeros, or -inf margins */
    dist_allreduce_sum_f64(&pm->groups.pp, DIST_PP, s->layer_sums, 2 * (size_t)L);
    dist_allreduce_max(&pm->groups.pp, DIST_PP, s->layer_max, 2 * (size_t)L);
    double const assignments = (double)n_micro * (double)pm->shape.Nmb * k;
    for (int l = 0; l < L; l++) {
        struct par_layer_stats *ls = &s->layer_stats[l];
        ls->dispatch_ms = s->layer_sums[L + l];
        ls->dropped_frac = s->layer_sums[l] / assignments;
        ls->tokens_max = s->layer_max[l];
        ls->tokens_mean = (assignments - s->layer_sums[l]) / n_micro / E;
        ls->margin = isinf(s->layer_max[L + l]) ? -1.0 : -(double)s->layer_max[L + l];
    }
}

/* ---------------------------------------------------------------- the step */

/* A free activation set for the op's (chunk, micro-batch); every rank of the stage runs
 * the same order, so they pick the same set (the dispatcher's direct writes rely on it). */
static struct par_acts *take_set(struct par_schedule *s, const struct par_pp_op *op)
{
    for (int set = 0; set < s->nacts; set++) {
        if (s->set_busy[set]) continue;
        s->set_busy[set] = true;
        s->set_of[op->chunk * s->pipe.m + op->mb] = set;
        s->acts[set].chunk = op->chunk;
        return &s->acts[set];
    }
    VD_CHECK(false, "no free activation set: the order keeps more in flight than "
             "par_pp_live_max said");
    return NULL;
}

void par_schedule_step(struct par_schedule *s, struct par_model *pm,
                       const struct par_batches *batches, struct par_step_stats *out)
{
    int const L = pm->cfg.num_hidden_layers, n_micro = batches->n_micro, m = s->pipe.m;
    const struct dist_group *dp = &pm->groups.dp;
    VD_CHECK(n_micro == m * dp->size, "the schedule was planned for %d micro-batches per "
             "replica, the step has %d over %d replicas", m, n_micro, dp->size);
    memset(s->layer_sums, 0, (2 * (size_t)L + 1) * sizeof *s->layer_sums);
    memset(s->layer_max, 0, (2 * (size_t)L + 1) * sizeof *s->layer_max);
    for (int l = 0; l < L; l++) s->layer_max[L + l] = -INFINITY;
    int backwards_left[MODEL_CHUNKS_MAX];
    for (int c = 0; c < pm->nchunks; c++) backwards_left[c] = m;
    size_t const msg = pm->shape.Ns * (size_t)pm->cfg.hidden_size;
    double sums[3] = {0}; /* lm, aux, z */
    double const t_step = vd_trace_now();
    double wait_s = 0.0;
    int slot = 0;
    int pending = post_next_receive(s, pm, 0, slot);
    for (int i = 0; i < s->nops; i++) {
        const struct par_pp_op *op = &s->ops[i];
        struct place const p = place_of(pm, op);
        const float *in = NULL;
        if (i == pending) { /* its message, then the next op's receive goes out */
            double const t0 = vd_trace_now();
            dist_wait_all(&s->recv_req[slot], 1, DIST_PP, msg * sizeof(float));
            double const t1 = vd_trace_now();
            wait_s += t1 - t0;
            vd_trace_span("p2p", t0, t1, "wait %s c%d mb%d", op->backward ? "grad" : "act",
                          p.g, op->mb);
            in = s->recv_buf + (size_t)slot * msg;
            slot ^= 1;
            pending = post_next_receive(s, pm, i + 1, slot);
        }
        bool const sends = op->backward ? p.g > 0 : p.g < p.G - 1;
        struct par_send *sd = sends ? send_slot(s, pm) : NULL;
        int const global_mb = dp->rank + op->mb * dp->size;
        double const t0 = vd_trace_now();
        if (!op->backward) {
            struct par_acts *a = take_set(s, op);
            const struct par_chunk *ch = &pm->chunks[op->chunk];
            if (ch->has_embed || ch->has_head)
                batches->fill(batches->ctx, global_mb, s->inputs, s->targets);
            par_stage_forward(pm, a, s->inputs, s->targets, in, sd ? sd->buf : NULL);
            sums[0] += a->stats.lm_loss;
            sums[1] += a->stats.aux_loss;
            sums[2] += a->stats.z_loss;
        } else {
            int const set = s->set_of[op->chunk * m + op->mb];
            struct par_acts *a = &s->acts[set];
            bool const reduce = --backwards_left[op->chunk] == 0 &&
                                !pm->opt.distributed_optimizer;
            par_stage_backward(pm, a, in, sd ? sd->buf : NULL, 1.0f / (float)n_micro, reduce);
            collect_layers(s, pm, a);
            s->set_busy[set] = false;
        }
        vd_trace_span("compute", t0, vd_trace_now(), "%s c%d mb%d", op->backward ? "B" : "F",
                      p.g, global_mb);
        if (sd) send_output(pm, op, sd);
    }
    for (int i = 0; i < s->nsends; i++)
        dist_wait_all(&s->sends[i].req, 1, DIST_PP, msg * sizeof(float));
    double const step_s = vd_trace_now() - t_step;
    dist_allreduce_sum_f64(dp, DIST_DP, sums, 3);
    dist_allreduce_sum_f64(&pm->groups.pp, DIST_PP, sums, 3);
    finish_layers(s, pm, n_micro);
    *out = (struct par_step_stats){.lm = sums[0] / n_micro, .aux = sums[1] / n_micro,
                                   .z = sums[2] / n_micro, .nlayers = L,
                                   .layers = s->layer_stats, .step_s = step_s,
                                   .wait_s = wait_s};
}
