/* Estimated communication per optimizer step of every group kind (launch_internal.h): the
 * bytes one rank sends over its group, from the model and the layout alone. The README's
 * "Traffic estimates" gives the same formulas; parallel.order = auto ranks orders by them
 * and the planner prices them.
 *
 * Collectives count what a bandwidth-optimal algorithm sends per rank (nccl-tests' bus
 * bytes): all-gather and reduce-scatter of a full buffer S move (n-1)/n S, all-reduce
 * 2 (n-1)/n S, all-to-all (n-1)/n of the rows; point-to-point the message. Small
 * bookkeeping (loss sums, router statistics, grad norm) is left out where it is below a
 * token row per micro-batch. */
#include "launch/launch_internal.h"

/* Sizes the formulas use, named as in the README. */
struct sizes {
    double d, L, E, k, F, V, hd, G;
    double m;       /* micro-batches per replica per step */
    double n;       /* tokens of one micro-batch on one cp rank */
    double Ls;      /* layers per pipeline stage (pp splits L evenly on average) */
    double tp, cp, dp, pp, vpp, etp, ep, edp;
};

static struct sizes sizes_of(const struct launch_config *c, const struct dist_grid *g)
{
    const struct model_config *mc = &c->model;
    struct sizes s = {
        .d = mc->hidden_size, .L = mc->num_hidden_layers, .E = mc->num_local_experts,
        .k = mc->num_experts_per_tok, .F = mc->intermediate_size, .V = mc->vocab_size,
        .hd = (double)mc->hidden_size / mc->num_attention_heads,
        .G = mc->num_key_value_heads,
        .tp = g->dims.tp, .cp = g->dims.cp, .dp = g->dims.dp, .pp = g->dims.pp,
        .vpp = c->parallel.vpp, .etp = g->dims.etp, .ep = g->dims.ep, .edp = g->dims.edp,
    };
    s.m = (double)c->train.global_batch / (s.dp * c->train.micro_batch);
    s.n = (double)c->train.micro_batch * c->train.seq_len / s.cp;
    s.Ls = s.L / s.pp;
    return s;
}

enum { FLOAT_NBYTES = 4 };

void launch_traffic_estimate(double nbytes[DIST_NKIND], const struct launch_config *c,
                             const struct dist_grid *g)
{
    for (int k = 0; k < DIST_NKIND; k++) nbytes[k] = 0.0;
    struct sizes const s = sizes_of(c, g);
    double const f = FLOAT_NBYTES;
    double const Ns = s.n / s.tp; /* tokens of a rank after sequence parallelism */

    /* tp: per layer and micro-batch, 6 all-gathers / reduce-scatters of the n x d sequence
     * (attention in and out, forward and backward; the MoE block's input forward and its
     * gradient backward), 2 more per micro-batch around the head; the all-reduce of the
     * replicated weights' gradients (2 norms and the router per layer, the final norm). */
    double const tp_frac = (s.tp - 1.0) / s.tp;
    nbytes[DIST_TP] = s.m * (6.0 * s.Ls + 2.0 / s.pp) * tp_frac * s.n * s.d * f +
                      2.0 * tp_frac * (s.Ls * (2.0 * s.d + s.d * s.E) + s.d / s.pp) * f;

    /* cp: per layer and micro-batch, each rank's keys and values (n x 2 G/tp hd) pass the
     * other cp - 1 ranks forward; backward again, with their gradients: 3 (cp - 1) blocks
     * (ring or all-gather + reduce-scatter alike). */
    double const kv = s.n * 2.0 * (s.G / s.tp) * s.hd * f;
    nbytes[DIST_CP] = s.m * s.Ls * 3.0 * (s.cp - 1.0) * kv;

    /* etp x ep, the dispatcher, per layer and micro-batch, forward (dispatch, combine) and
     * backward (the same two): all-to-all sends the (ep-1)/ep of the rank's Ns k assignment
     * rows bound for other ep ranks, then all-gathers over etp the rows that arrived (about
     * Ns k); all-gather sends the rank's Ns rows to the other etp ep - 1 ranks and
     * reduce-scatters the combine back. */
    double const row = s.d * f;
    double const ee = s.etp * s.ep;
    if (ee > 1.0)
        nbytes[DIST_ETPEP] =
            c->model.moe_token_dispatcher_type == MODEL_DISPATCH_ALLGATHER
                ? s.m * s.Ls * 4.0 * (ee - 1.0) * Ns * row
                : s.m * s.Ls * 4.0 * Ns * s.k * row * ((s.ep - 1.0) / s.ep + (s.etp - 1.0));
    /* tp x cp, capacity dropping only: per layer and micro-batch, the router's choices
     * (token id, k experts, E probabilities) of every rank's Ns tokens, all-gathered. */
    double const tc = s.tp * s.cp;
    if (c->model.moe_capacity_factor > 0.0)
        nbytes[DIST_TPCP] = s.m * s.Ls * (tc - 1.0) * Ns * (1.0 + s.k + s.E) * f;

    /* dp x cp and edp: the gradients once per step, reduce-scattered and the parameters
     * all-gathered (distributed optimizer) or all-reduced: 2 (n-1)/n of the rank's share.
     * Dense parameters are split over tp and pp; expert parameters (3 d F per expert) over
     * etp, ep and pp. */
    size_t total = 0, active = 0;
    model_param_counts(&c->model, &total, &active);
    double const expert = s.L * s.E * 3.0 * s.d * s.F;
    double const dense = (double)total - expert;
    double const dc = s.dp * s.cp;
    nbytes[DIST_DPCP] = 2.0 * (dc - 1.0) / dc * dense / (s.tp * s.pp) * f;
    nbytes[DIST_EDP] = 2.0 * (s.edp - 1.0) / s.edp * expert / (s.etp * s.ep * s.pp) * f;

    /* pp: per micro-batch and model chunk, the activations forward and their gradient
     * backward, each the rank's Ns x d. */
    if (s.pp > 1.0) nbytes[DIST_PP] = s.m * s.vpp * 2.0 * Ns * row;
}

enum launch_pattern launch_traffic_pattern(const struct launch_config *c, enum dist_kind kind)
{
    if (kind == DIST_CP && c->parallel.cp_comm_type == 0) return LAUNCH_PATTERN_RING;
    if (kind == DIST_PP) return c->parallel.vpp > 1 ? LAUNCH_PATTERN_CYCLE : LAUNCH_PATTERN_CHAIN;
    return LAUNCH_PATTERN_SPREAD;
}
