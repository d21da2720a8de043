/* The equivalence harness: shared/docs/parallelism.md's invariant, checked end to end.
 *
 * "For a fixed global batch, a run in any valid layout produces the same losses as a run
 * on one rank (gradient accumulation over the same micro-batches) within fp32 rounding,
 * and the same routing and dropping decisions."
 *
 * configs/tiny.ini is trained for 10 steps (--train.steps=10) in every layout of the table
 * below, on 2, 4 and 8 ranks under mpirun, each with the distributed optimizer on and off
 * and with and without gradient accumulation, and compared step by step with a 1-rank run
 * of the same global batch, micro-batch, seed and data, at every step its decision margins
 * make comparable (see "Comparable steps" below):
 *
 *   - loss, lm_loss, aux_loss, z_loss of every compared step (metrics file) to a relative
 *     1e-5;
 *   - dropped_frac of every compared step exactly, the top-level one and each MoE layer's
 *     (moe_layers[l].dropped_frac): the dropping decisions must be the same;
 *   - grad_norm of every compared step to a relative 1e-4 (GNORM_REL_TOL says why);
 *   - when all steps are compared, the final parameters (train.export_to, gathered by
 *     global name from any layout), tensor by tensor by name, to PARAM_ABS_TOL (see there
 *     for the rationale).
 *
 * Layouts: dp2, dp4, dp8, tp2, tp4, tp2 x dp2 (also with the order dp-tp-cp-ep-pp),
 * tp2 x dp4, tp4 x dp2. Runs with model.moe_capacity_factor = 1.0 under both drop
 * policies (position, probs) in six of them check that tokens really are dropped
 * (dropped_frac > 0 in the reference) and that as many are dropped at every step as on
 * one rank (and, through the losses and parameters, the same ones).
 *
 * Expert parallelism on the folded grid (ep_layouts): 16 layouts on 2, 4 and 8 ranks
 * whose MoE grid etp x ep x edp re-splits the attention grid tp x dp -- EP larger than DP,
 * EP spanning the tensor ranks, ETP inside EP, EDP > 1, and two non-default orders --
 * each with both token dispatchers (alltoall, allgather), each dropless and with capacity
 * 1.0 under both policies, all compared as above (96 cases); and two of them (mpi_layouts)
 * with the all-to-all dispatcher sending MPI messages only, as between nodes, instead of
 * writing directly between the ranks of this machine (6 cases). The program's "layout:"
 * line must show both grids as asked.
 *
 * Pipeline parallelism (pp_layouts): 17 layouts on 2, 4 and 8 ranks -- pp2 under each
 * schedule (1f1b, gpipe) and with one micro-batch per step (fewer than stages), pp2 x tp2,
 * pp2 x dp2, expert parallelism folded inside the stages (up to pp2 x tp2 x dp2 | ep4, also
 * with pp fastest in the rank order), pp4, an uneven parallel.pp_layers, interleaved pp2
 * vpp2 (also x tp2 | ep2, and under gpipe) and pp4 vpp2 -- on models of 2, 4 or 8 layers
 * (the reference has the same layers), dropless and with capacity 1.0 (see layers_seed for
 * the deeper models' seeds and policies), with both dispatchers and both optimizers.
 *
 * Context parallelism (cp_layouts): 12 layouts on 2, 4 and 8 ranks -- cp2, cp4, cp2 x tp2,
 * cp2 x dp2, expert parallelism folded over the cp ranks (cp2 | ep2, cp2 x tp2 | ep4, cp2 x
 * tp2 x dp2 | ep8 in another rank order), cp2 x pp2 -- with the ring (p2p) and the
 * all-gather key/value exchange, dropless and with capacity 1.0 under both policies, both
 * dispatchers and both optimizers, with and without gradient accumulation.
 *
 * The 1-rank reference always uses the layout's micro_batch (dropping decisions depend on
 * the micro-batch), and is cached per (micro_batch, global_batch, extra options). A
 * negative control trains the reference with another seed and requires the comparison to
 * tell the two apart, so the harness cannot pass vacuously; a second one requires the
 * dropped_frac checks to tell capacity from dropless, the two drop policies apart, and one
 * drop moved between layers.
 *
 * Comparable steps (the decision margin). Routing (top-k) and capacity dropping are
 * discontinuous functions of the router probabilities. Layouts sum in other orders than
 * one rank, so their router probabilities differ from the reference's by fp32 rounding
 * (and, over the steps, by the parameters' drift); a decision closer to a tie than that
 * may legitimately go the other way, and from then on the trajectories part. The program
 * logs per step the smallest probability gap behind any routing or dropping decision of
 * that step ("decision_margin", top level: the minimum over the MoE layers; -1: no
 * decision). The reference's margins decide what is compared (comparable_steps): steps
 * 1..s*, where every step up to s* has a margin >= MARGIN_MIN (or -1); a step below it may
 * flip in a correct layout, so neither it nor any later step is compared, and the final
 * parameters only when all STEPS steps are. Within the compared steps everything is held
 * to the tolerances below, dropless and capacity alike, and a mismatch prints the
 * reference's margin at that step. Against a vacuous test (test_coverage): at least
 * MIN_COVERAGE of all (case, step) pairs are compared, every case compares at least
 * MIN_CASE_STEPS steps (a reference with a near-tie in its first steps is a configuration
 * to change, reported with its margins), and each drop policy has at least
 * MIN_FULL_CAPACITY cases compared over all steps, final parameters included. All cases
 * train with one seed, EQ_SEED (which says why it is not tiny.ini's). The summary shows,
 * per case, the compared steps, the reference's smallest margin among them and how far
 * the layout's own margins moved (a direct measure of the drift of the router
 * probabilities, against which MARGIN_MIN is calibrated). A calibration run trains the
 * 1-rank reference of capacity 1.0 position, micro_batch 4 again from its initial weights
 * perturbed by +-1 ulp: it must agree under the same rule (and, from the unperturbed
 * weights, bit for bit).
 *
 * Every child runs with OMP_NUM_THREADS=1 inside one fresh /tmp/vdist_eq_XXXXXX (removed
 * at the end unless VDIST_EQ_KEEP is set), with data.path empty: the first 1-rank run
 * makes the embedded synthetic dataset runs/synth-v64.bin there, and every later run, on
 * any number of ranks, reads that same file. Multi-rank children run under
 *   mpirun --allow-run-as-root --oversubscribe --bind-to none -np N
 * (8 ranks on a 2-core machine are oversubscribed, which costs time, not correctness).
 * A mismatch prints the layout, the step, the field, both values and the full command
 * lines of the run and of its reference, and the reference's decision margin at that step.
 * A summary table (layout, ranks, dispatcher, optimizer, micro-batching, capacity, largest
 * dropped_frac, compared steps, the reference's smallest margin over them, the largest
 * change of the margin in the layout, max relative loss difference, max absolute and
 * relative parameter difference, max relative grad_norm difference, seconds) is printed
 * at the end, with the coverage figures. */
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <CUnit/CUnit.h>
#include <jansson.h>

#include "tests/testutil.h"

/* A child that runs longer than this is killed (exit status 124 or 137): a hang fails the
 * case instead of the suite. A 10-step tiny run takes about a second even on 8
 * oversubscribed ranks. */
#define CHILD_TIMEOUT_S 120

#define STEPS 10

/* Losses: fp32 forward over the same micro-batches; only the order of fp32 sums differs
 * between layouts (tensor-parallel partial sums, reduce-scatter and all-reduce trees,
 * micro-batches accumulated on different replicas), so the losses agree to ~1e-9 at step
 * 1 and drift only through the parameters' tiny differences. Relative 1e-5 on every step.
 * z_loss (a small mean of squared router log-sum-exps) drifts most: measured up to
 * ~5e-6 at step 10, both across layouts and for the 1-rank run itself started from
 * weights perturbed by 1 ulp (the calibration test below). */
#define LOSS_REL_TOL 1e-5

/* grad_norm (before clipping) is not a loss, but the invariant implies it (same gradients)
 * and it catches what AdamW hides: AdamW is invariant to the scale of the gradient, so a
 * wrong data-parallel scale (a sum instead of a mean, a gradient reduced twice) shows in
 * the parameters only through clipping, but shows in grad_norm at step 1. Measured: at
 * most ~7e-6 relative; bound 1e-4. */
#define GNORM_REL_TOL 1e-4

/* Final parameters after 10 AdamW steps at lr 1e-2 (tiny.ini), weights of scale 0.02
 * (projections, experts, router, embeddings) to 1 (norms).
 *
 * Why not fp32 rounding (~1e-8 absolute): AdamW normalises each element's update,
 * lr * m_hat / (sqrt(v_hat) + eps), which does not shrink with the gradient. Where an
 * element's gradient is a near-cancellation (measured: one hidden unit f of one expert,
 * whose row f of w1 and w3 and column f of w2 all deviate together, while every other
 * element agrees to ~1e-6), a last-bit difference in the summands becomes a relative
 * difference of 1e-3 or more in the gradient, and the update (up to ~lr = 1e-2 a step)
 * inherits it over 10 steps.
 *
 * This is the reference's own conditioning, not the layout's: the calibration test trains
 * the 1-rank run from its initial weights perturbed by +-1 ulp and measures the same
 * signature. Measured on this machine (capacity 1.0 position, micro_batch 4, train.seed
 * 1): the 1-ulp run deviates by 8e-5 with the test's fixed signs, 1.8e-4 with other random
 * signs, both in layer 0, expert 3, unit 23; the layouts by at most 1.6e-4 (the same unit,
 * tp4 x dp2), and by at most 2.6e-5 without dropping. With EQ_SEED (46): the 1-ulp run by
 * 1.5e-5, the layouts by at most 7.9e-5.
 *
 * Bound: absolute 1e-3, 5x above that 1-ulp floor (which the calibration test checks
 * stays under the bound), still 10x below one step's update (lr = 1e-2) and 20x below the
 * initial weights' standard deviation (0.02). A real fault (a missing gradient reduction,
 * a shard stepped twice or not at all, a stale all-gather, a wrong shard offset) changes
 * whole tensors by ~lr per step and fails by an order of magnitude or more; wrong
 * gradient scales are caught by grad_norm above, and every fault that changes the model's
 * function by the losses at every step. The maximum relative deviation is reported too:
 * max |a - b| / max(|a|, |b|) over elements with max(|a|, |b|) >= REL_FLOOR (an element
 * near zero has no meaningful relative difference). */
#define PARAM_ABS_TOL 1e-3
#define REL_FLOOR 1e-2

/* The smallest decision margin (the reference's "decision_margin" of a step: the smallest
 * gap between router probabilities behind any routing or dropping decision of the step)
 * at which a layout must still take the reference's decisions. A step below it, and every
 * later step, is not compared (comparable_steps).
 *
 * Calibration, measured on this machine by running every case of this file with every
 * step compared (VDIST_EQ_MARGIN_MIN=0) under train.seed 1, 7, 10 and 46 (576 layout runs,
 * 5700 compared steps):
 *
 *   - Drift. A layout's own decision_margin differs from its reference's by at most 3e-8
 *     at step 1 (the same weights, fp32 sums in another order) and by a median of 2e-8 to
 *     8e-8 at later steps; the worst layouts (all tensor parallel) by up to 8e-7 at step 2
 *     and 1e-6 to 4e-6 from step 3 on: AdamW amplifies the rounding of near-cancelling
 *     gradients into parameter differences (PARAM_ABS_TOL), which move the router. The
 *     reference itself is that sensitive: from 1-ulp perturbed initial weights, its
 *     margins move by up to 2e-6 at micro_batch 8. (A change of the smallest gap bounds
 *     the drift of the gaps from below.)
 *   - Flips. All 11 cases that parted (a mismatch beyond the tolerances) parted at a step
 *     where the reference's margin was below 1e-6: 9 at exact or 1-ulp ties (0 or 1.5e-8:
 *     two bit-identical router rows -- a sequence that opens with a repeated token --
 *     which the probs policy orders by index, split by an ulp in the layout), 2 at 6.4e-7
 *     (tp4 | etp2 x ep2, micro_batch 8, capacity position, seed 1, step 10, where the
 *     layout's margin fell to 1.5e-8: the decision flipped).
 *   - No flip above it: 164 steps with reference margins in [1e-6, 2e-6), 235 in
 *     [2e-6, 3e-6) and 5100 above agreed in every field.
 *
 * So 1e-6: above every flip seen, 30x the step-1 drift and over 10x the typical later
 * drift. It is not 10x above the worst later drift of the tensor-parallel layouts
 * (4e-6): at step 3 or later, a compared step whose margin is
 * within a few MARGIN_MIN may in principle still flip, and a failure there is first to be
 * read as that; a failure at a margin far above (> 1e-5) is a fault. A larger MARGIN_MIN
 * leaves too little to compare: at 1.5e-6, no train.seed in 1..140 meets test_coverage's
 * demands (see EQ_SEED).
 *
 * VDIST_EQ_MARGIN_MIN=x overrides it (a calibration aid: 0 compares every step and shows
 * where decisions part; the coverage checks still apply). */
#define MARGIN_MIN 1e-6
static double g_margin_min = MARGIN_MIN;

/* Against a vacuous test (test_coverage): the share of all (case, step) pairs compared,
 * the fewest steps any case may compare, and how many cases of each drop policy must
 * compare all STEPS steps and their final parameters. */
#define MIN_COVERAGE 0.90
#define MIN_CASE_STEPS 3
#define MIN_FULL_CAPACITY 5

static struct tu_env g_env; /* g_env.tmp is the shared working directory of every child */
static struct tu_run g_run; /* the last command, as a user would type it, and its output */

/* ---------------------------------------------------------------- helpers */

/* g_env.tmp/name in a rotating static buffer (eight live at once). */
static const char *tp(const char *name) { return tu_path(g_env.tmp, name); }

#define EXPECT TU_EXPECT

/* The last `n` characters of s (the end of a child's output holds its error). */
static const char *tail(const char *s, size_t n)
{
    size_t const len = strlen(s);
    return len > n ? s + len - n : s;
}

/* Runs `vdist ARGS` on `ranks` ranks (1: directly, as a user runs one rank; more: under
 * mpirun) inside g_env.tmp with stdout and stderr captured; returns the exit status (128 +
 * signal when it died of one, 124/137 after the timeout). g_run.cmd holds a command line
 * that reproduces the run from a shell. */
static int run_vdist(int ranks, const char *args)
{
    return tu_vdist_run(&g_run, &g_env, ranks, CHILD_TIMEOUT_S, "%s", args);
}

/* ---------------------------------------------------------------- one training run */

enum { F_LOSS, F_LM, F_AUX, F_Z, F_LOSS_FIELDS, F_DROPPED = F_LOSS_FIELDS, F_GNORM, F_COUNT };
static const char *const field_names[F_COUNT] = {"loss",   "lm_loss",      "aux_loss",
                                                 "z_loss", "dropped_frac", "grad_norm"};

/* tiny.ini has 2 layers; the metrics' "moe_layers" array may hold up to this many. */
#define MAX_MOE_LAYERS 8

/* What a run left behind: its metrics per step and where its export lies. */
struct run {
    bool ok;                /* exit 0, layout as asked, STEPS complete metrics lines, export */
    char dir[64];           /* under g_env.tmp: metrics.jsonl, model.safetensors */
    char label[160];        /* the layout in words (failure messages) */
    char cmd[16384];        /* the command line that made it */
    double m[STEPS][F_COUNT];
    int nlayers;            /* entries of "moe_layers" (the same at every step) */
    double layer_dropped[STEPS][MAX_MOE_LAYERS]; /* moe_layers[l].dropped_frac */
    double margin[STEPS];   /* decision_margin: min over the layers; -1: no decision */
    double layer_margin[STEPS][MAX_MOE_LAYERS]; /* moe_layers[l].decision_margin */
    double seconds;
};

/* Reads the "moe_layers" array of metrics line `step` (1-based) into r: one object per
 * layer, "layer" 0, 1, ... in order, each with a finite "dropped_frac" in [0, 1] and a
 * "decision_margin" (-1, or a number >= 0), as many at every step; their mean must be the
 * top-level dropped_frac (every layer sees the same number of assignments), and the
 * top-level decision_margin the smallest of theirs that is not -1 (-1 if all are). */
static bool read_moe_layers(struct run *r, const json_t *o, int step, const char *line)
{
    const json_t *arr = json_object_get(o, "moe_layers");
    size_t const n = json_is_array(arr) ? json_array_size(arr) : 0;
    if (!EXPECT(n >= 1 && n <= MAX_MOE_LAYERS && (step == 1 || (int)n == r->nlayers),
                "%s `%s`: metrics line %d must hold a \"moe_layers\" array of 1..%d entries, "
                "as many as the previous lines (%d): %s", r->label, r->cmd, step,
                MAX_MOE_LAYERS, r->nlayers, line))
        return false;
    r->nlayers = (int)n;
    double mean = 0.0, least = -1.0;
    for (size_t l = 0; l < n; l++) {
        const json_t *e = json_array_get(arr, l);
        const json_t *li = json_object_get(e, "layer"), *d = json_object_get(e, "dropped_frac");
        const json_t *mg = json_object_get(e, "decision_margin");
        double const mv = json_is_number(mg) ? json_number_value(mg) : NAN;
        if (!EXPECT(json_is_integer(li) && json_integer_value(li) == (json_int_t)l &&
                        json_is_number(d) && isfinite(json_number_value(d)) &&
                        json_number_value(d) >= 0.0 && json_number_value(d) <= 1.0 &&
                        (mv == -1.0 || (mv >= 0.0 && isfinite(mv))),
                    "%s `%s`: metrics line %d, moe_layers[%zu] must be {\"layer\": %zu, ..., "
                    "\"dropped_frac\": a number in [0, 1], \"decision_margin\": -1 or a number "
                    ">= 0}: %s", r->label, r->cmd, step, l, l, line))
            return false;
        r->layer_dropped[step - 1][l] = json_number_value(d);
        r->layer_margin[step - 1][l] = mv;
        if (mv >= 0.0 && (least < 0.0 || mv < least)) least = mv;
        mean += json_number_value(d) / (double)n;
    }
    if (!EXPECT(r->margin[step - 1] == least,
                "%s `%s`: metrics line %d, the top-level decision_margin (%.10g) must be the "
                "smallest moe_layers[].decision_margin that is not -1 (%.10g): %s", r->label,
                r->cmd, step, r->margin[step - 1], least, line))
        return false;
    /* The metrics print 10 significant digits. */
    double const top = r->m[step - 1][F_DROPPED];
    return EXPECT(fabs(mean - top) <= 1e-9,
                  "%s `%s`: metrics line %d, the mean of moe_layers[].dropped_frac (%.10g) must "
                  "be the top-level dropped_frac (%.10g): %s", r->label, r->cmd, step, mean,
                  top, line);
}

/* Reads dir/metrics.jsonl into r->m; every line must hold every field, steps 1..STEPS. */
static bool read_metrics(struct run *r)
{
    char name[128];
    snprintf(name, sizeof name, "%s/metrics.jsonl", r->dir);
    char *text = tu_file_read(tp(name), NULL);
    if (!EXPECT(text != NULL, "%s: `%s` must write its metrics file %s", r->label, r->cmd,
                tp(name)))
        return false;
    int lines = 0;
    bool ok = true;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line && ok;
         line = strtok_r(NULL, "\n", &save)) {
        json_error_t jerr;
        json_t *o = json_loads(line, 0, &jerr);
        const json_t *st = o ? json_object_get(o, "step") : NULL;
        ok = EXPECT(o && json_is_object(o) && json_is_integer(st) &&
                        json_integer_value(st) == lines + 1 && lines < STEPS,
                    "%s `%s`: metrics line %d must be a JSON object with \"step\": %d (at "
                    "most %d lines): %s", r->label, r->cmd, lines + 1, lines + 1, STEPS, line);
        for (int f = 0; ok && f < F_COUNT; f++) {
            const json_t *v = json_object_get(o, field_names[f]);
            ok = EXPECT(v && json_is_number(v) && isfinite(json_number_value(v)),
                        "%s `%s`: metrics line %d must hold a finite \"%s\": %s", r->label, r->cmd,
                        lines + 1, field_names[f], line);
            if (ok) r->m[lines][f] = json_number_value(v);
        }
        if (ok) {
            const json_t *v = json_object_get(o, "decision_margin");
            double const mv = json_is_number(v) ? json_number_value(v) : NAN;
            ok = EXPECT(mv == -1.0 || (mv >= 0.0 && isfinite(mv)),
                        "%s `%s`: metrics line %d must hold a \"decision_margin\" that is -1 or "
                        "a finite number >= 0: %s", r->label, r->cmd, lines + 1, line);
            r->margin[lines] = mv;
        }
        if (ok) ok = read_moe_layers(r, o, lines + 1, line);
        json_decref(o);
        lines++;
    }
    free(text);
    return ok && EXPECT(lines == STEPS, "%s `%s` must write %d metrics lines, got %d", r->label,
                        r->cmd,
                        STEPS, lines);
}

/* A layout: the attention grid tp x dp (cp = pp = 1) and the MoE grid etp x ep x edp over
 * the same tp * dp ranks (edp = tp * dp / (etp * ep)). etp 0 and ep 0 pass no option (the
 * program's defaults: etp = tp, ep = 1), as the layouts without expert parallelism do. */
struct layout {
    const char *name;
    int tp, dp;
    int etp, ep;       /* 0: not passed */
    const char *order; /* NULL: the default tp-cp-ep-dp-pp */
    bool accum;        /* expert-parallel layouts: with gradient accumulation or not */
    bool mpi_dispatch; /* parallel.dispatch_direct=false: no direct writes between ranks */
    /* pipeline parallelism (pp_layouts); 0 / NULL: not passed (pp 1) */
    int pp, vpp;
    const char *pp_schedule, *pp_layers;
    int layers;        /* model.num_hidden_layers, also of the reference; 0: tiny.ini's 2 */
    /* context parallelism (cp_layouts); 0 / NULL: not passed (cp 1, p2p) */
    int cp;
    const char *cp_comm;
    /* emulated nodes (node_layouts): launch.ranks_per_node (0: not passed), and Open MPI's
     * TCP transport between every pair of ranks (--mca btl tcp,self) */
    int ranks_per_node;
    bool tcp;
};
static int lay_cp(const struct layout *l) { return l->cp ? l->cp : 1; }
static int lay_pp(const struct layout *l) { return l->pp ? l->pp : 1; }
static int lay_ranks(const struct layout *l) { return l->tp * lay_cp(l) * l->dp * lay_pp(l); }
static int lay_etp(const struct layout *l) { return l->etp ? l->etp : l->tp; }
static int lay_ep(const struct layout *l) { return l->ep ? l->ep : 1; }
static int lay_edp(const struct layout *l)
{
    return l->tp * lay_cp(l) * l->dp / (lay_etp(l) * lay_ep(l));
}

/* The seed of the cases and references of a model of `layers` layers (pp_layouts), in
 * place of EQ_SEED: its trajectories, and so its references' decision margins, are the
 * deeper model's own. Scanned like EQ_SEED (1-rank references, micro_batch 2, global_batch
 * 8): with 4 layers seed 17 (of 1..40) keeps every decision margin >= MARGIN_MIN over all
 * 10 steps dropless and with capacity 1.0 position; with 8 layers seed 19 (of 1..23; only
 * 12 and 19 reach 8 steps in both) all 10 dropless and 8 with position. Under the probs
 * policy every seed scanned meets exact ties (margin 0) within the first steps at 4 and 8
 * layers (more layers, more chances of two bit-identical router rows), so the deeper
 * models run dropless and position only; the probs policy meets the pipeline in the
 * 2-layer layouts. */
static int layers_seed(int layers) { return layers == 4 ? 17 : 19; }

/* The trailing fields of a layout without pipeline parallelism. */
#define NO_PP 0, 0, NULL, NULL, 0, NO_CP
#define NO_CP 0, NULL, NO_NODES
#define NO_NODES 0, false
static const struct layout one_rank = {"1 rank", 1, 1, 0, 0, NULL, false, false, NO_PP};

/* Trains tiny.ini for STEPS steps in the given layout, exporting to g_env.tmp/dir.
 * `dispatcher`: model.moe_token_dispatcher_type, or NULL for the default (not passed).
 * `extra`: further options (may be ""). Checks the program ran the layout it was asked for
 * (both grids of its "layout:" line), on the embedded synthetic data, to the end. */
static void train(struct run *r, const char *dir, const struct layout *lay,
                  const char *dispatcher, bool dopt, int mb, int gb, const char *extra)
{
    memset(r, 0, sizeof *r);
    snprintf(r->dir, sizeof r->dir, "%s", dir);
    snprintf(r->label, sizeof r->label, "layout %s%s%s (attention tp %d x cp %d x dp %d x pp %d, "
             "MoE etp %d x ep %d x edp %d x pp %d%s%s%s%s)", lay->name,
             dispatcher ? ", dispatcher " : "", dispatcher ? dispatcher : "", lay->tp,
             lay_cp(lay), lay->dp, lay_pp(lay), lay_etp(lay), lay_ep(lay), lay_edp(lay),
             lay_pp(lay),
             lay->pp_schedule ? ", schedule " : "", lay->pp_schedule ? lay->pp_schedule : "",
             lay->pp_layers ? ", pp_layers " : "", lay->pp_layers ? lay->pp_layers : "");
    char args[4096], par[512] = "";
    size_t n = 0;
    if (lay->pp) n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.pp=%d", lay->pp);
    if (lay->cp) n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.cp=%d", lay->cp);
    if (lay->cp_comm)
        n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.cp_comm_type=%s",
                              lay->cp_comm);
    if (lay->vpp) n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.vpp=%d", lay->vpp);
    if (lay->pp_schedule)
        n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.pp_schedule=%s",
                              lay->pp_schedule);
    if (lay->pp_layers)
        n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.pp_layers=%s",
                              lay->pp_layers);
    if (lay->layers)
        n += (size_t)snprintf(par + n, sizeof par - n, " --model.num_hidden_layers=%d",
                              lay->layers);
    if (lay->etp) n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.etp=%d", lay->etp);
    if (lay->ep) n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.ep=%d", lay->ep);
    if (lay->order)
        n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.order=%s", lay->order);
    if (lay->mpi_dispatch)
        n += (size_t)snprintf(par + n, sizeof par - n, " --parallel.dispatch_direct=false");
    if (lay->ranks_per_node)
        n += (size_t)snprintf(par + n, sizeof par - n, " --launch.ranks_per_node=%d",
                              lay->ranks_per_node);
    if (dispatcher)
        snprintf(par + n, sizeof par - n, " --model.moe_token_dispatcher_type=%s", dispatcher);
    snprintf(args, sizeof args,
             "train --config %s/configs/tiny.ini --train.steps=%d --train.global_batch=%d "
             "--train.micro_batch=%d --parallel.tp=%d%s --parallel.distributed_optimizer=%s "
             "--train.peak_gflops=1 --log.interval=%d%s%s --log.metrics=%s/metrics.jsonl "
             "--train.export_to=%s",
             g_env.root, STEPS, gb, mb, lay->tp, par, dopt ? "true" : "false", STEPS,
             extra[0] ? " " : "", extra, dir, dir);
    if (lay->layers) /* after `extra`, whose train.seed it overrides */
        snprintf(args + strlen(args), sizeof args - strlen(args), " --train.seed=%d",
                 layers_seed(lay->layers));
    double const t0 = tu_now_s();
    g_run.mpirun_options = lay->tcp ? "--mca btl tcp,self --mca btl_tcp_if_include lo" : NULL;
    run_vdist(lay_ranks(lay), args);
    g_run.mpirun_options = NULL;
    r->seconds = tu_now_s() - t0;
    snprintf(r->cmd, sizeof r->cmd, "%s", g_run.cmd);
    if (!EXPECT(g_run.rc == 0, "%s: `%s` must succeed, got exit status %d; the end of its "
                "output:\n%s", r->label, r->cmd, g_run.rc, tail(g_run.out, 3000)))
        return;
    /* The program prints "layout: N ranks, attention tp T x cp C x dp D x pp P, MoE etp
     * ET x ep EP x edp ED x pp P, order O". */
    int ranks = 0, t = 0, c = 0, d = 0, pp = 0, et = 0, ep = 0, ed = 0, mpp = 0;
    char order[64] = "";
    const char *p = strstr(g_run.out, "layout: ");
    bool const parsed =
        p && sscanf(p, "layout: %d ranks, attention tp %d x cp %d x dp %d x pp %d, MoE etp %d "
                       "x ep %d x edp %d x pp %d, order %63s", &ranks, &t, &c, &d, &pp, &et,
                    &ep, &ed, &mpp, order) == 10;
    /* parallel.order = auto: whichever order it printed as chosen */
    bool const automatic = lay->order && strcmp(lay->order, "auto") == 0;
    char chosen[64] = "";
    const char *const pick = automatic ? strstr(g_run.out, "parallel.order = auto:") : NULL;
    if (pick) {
        const char *const mark = strstr(pick, "<- chosen");
        const char *line = mark;
        while (line && line > pick && line[-1] != '\n') line--;
        if (line) sscanf(line, " %63s", chosen);
    }
    if (!EXPECT(!automatic || chosen[0],
                "%s: `%s` must print the orders parallel.order = auto considered and the one "
                "\"<- chosen\"", r->label, r->cmd))
        return;
    const char *const want_order = automatic ? chosen : lay->order ? lay->order : "tp-cp-ep-dp-pp";
    if (!EXPECT(parsed && ranks == lay_ranks(lay) && t == lay->tp && c == lay_cp(lay) &&
                    d == lay->dp &&
                    pp == lay_pp(lay) && et == lay_etp(lay) && ep == lay_ep(lay) &&
                    ed == lay_edp(lay) && mpp == lay_pp(lay) && strcmp(order, want_order) == 0,
                "%s: `%s` must run %d ranks as attention tp %d x cp %d x dp %d x pp %d, MoE etp "
                "%d x ep %d x edp %d x pp %d, order %s; its layout line says: %.200s", r->label,
                r->cmd, lay_ranks(lay), lay->tp, lay_cp(lay), lay->dp, lay_pp(lay), lay_etp(lay),
                lay_ep(lay), lay_edp(lay), lay_pp(lay), want_order,
                p ? p : "(no \"layout:\" line)"))
        return;
    if (!EXPECT(strstr(g_run.out, "runs/synth-v64.bin"),
                "%s: `%s` must train on the embedded synthetic dataset runs/synth-v64.bin "
                "(shared by every run in %s)", r->label, r->cmd, g_env.tmp))
        return;
    char st[128];
    snprintf(st, sizeof st, "%s/model.safetensors", dir);
    if (!EXPECT(tu_file_exists(tp(st)), "%s: `%s` must export %s", r->label, r->cmd, tp(st)))
        return;
    r->ok = read_metrics(r);
}

/* ---------------------------------------------------------------- comparison */

struct cmp {
    int steps;             /* steps compared: 1..steps (comparable_steps of the reference) */
    int loss_bad, dropped_bad, gnorm_bad, param_bad; /* counts of mismatches */
    int layer_dropped_bad; /* (step, layer) pairs with another moe_layers[].dropped_frac */
    int first_bad_step;    /* the first compared step with a mismatch; 0: none */
    double first_bad_margin; /* the reference's decision_margin there */
    double max_rel_loss;                  /* over the compared steps and the four losses */
    int max_rel_loss_step;
    const char *max_rel_loss_field;
    double max_rel_gnorm;
    double min_ref_margin;   /* the reference's smallest margin >= 0 over them; -1: none */
    double max_margin_drift; /* max |x's margin - the reference's| over them */
    double max_abs_param, max_rel_param;
    char max_abs_param_name[128];
    bool params_compared;
};

static double rel_diff(double a, double b)
{
    double const s = fmax(fabs(a), fabs(b));
    return s > 0 ? fabs(a - b) / s : 0.0;
}

/* The reference's decision margin at step s (0-based) in words, for failure messages:
 * the top-level one and, where given, layer l's. */
static const char *margin_words(const struct run *ref, int s, int l)
{
    static char buf[2][160];
    static int which;
    which ^= 1;
    if (l >= 0)
        snprintf(buf[which], sizeof buf[which], "the reference's decision_margin at step %d: "
                 "%.3g (layer %d: %.3g; MARGIN_MIN %g)", s + 1, ref->margin[s], l,
                 ref->layer_margin[s][l], g_margin_min);
    else
        snprintf(buf[which], sizeof buf[which], "the reference's decision_margin at step %d: "
                 "%.3g (MARGIN_MIN %g)", s + 1, ref->margin[s], g_margin_min);
    return buf[which];
}

/* Compares run `x` with the reference `ref` over steps 1..nsteps: losses (relative
 * LOSS_REL_TOL), dropped_frac (exactly, the top-level one and each layer's in
 * moe_layers), grad_norm (relative GNORM_REL_TOL); and, when nsteps is STEPS, the
 * exported parameters by name (absolute PARAM_ABS_TOL). `report`: print each mismatch
 * (the layout's command line, step, field, both values, the reference's margin there) as
 * a test failure; without it, only count (the negative controls). */
static void compare(const struct run *x, const struct run *ref, int nsteps, bool report,
                    struct cmp *c)
{
    memset(c, 0, sizeof *c);
    c->steps = nsteps;
    c->max_rel_loss_field = "";
    c->min_ref_margin = -1.0;
    int shown = 0;
    for (int s = 0; s < nsteps; s++) {
        int const bad_before = c->loss_bad + c->dropped_bad + c->layer_dropped_bad + c->gnorm_bad;
        if (ref->margin[s] >= 0.0 &&
            (c->min_ref_margin < 0.0 || ref->margin[s] < c->min_ref_margin))
            c->min_ref_margin = ref->margin[s];
        if ((ref->margin[s] >= 0.0) != (x->margin[s] >= 0.0))
            c->max_margin_drift = INFINITY; /* decisions in one run, none in the other */
        else if (ref->margin[s] >= 0.0)
            c->max_margin_drift = fmax(c->max_margin_drift, fabs(x->margin[s] - ref->margin[s]));
        for (int f = 0; f < F_LOSS_FIELDS; f++) {
            double const a = x->m[s][f], b = ref->m[s][f], d = rel_diff(a, b);
            if (d > c->max_rel_loss) {
                c->max_rel_loss = d;
                c->max_rel_loss_step = s + 1;
                c->max_rel_loss_field = field_names[f];
            }
            if (d > LOSS_REL_TOL) {
                c->loss_bad++;
                if (report && shown++ < 12)
                    EXPECT(false, "%s: step %d, %s = %.10g, the 1-rank reference has %.10g "
                           "(relative difference %.3g > %g; %s)\n      run:       %s\n      "
                           "reference: %s", x->label, s + 1, field_names[f], a, b, d,
                           LOSS_REL_TOL, margin_words(ref, s, -1), x->cmd, ref->cmd);
            }
        }
        double const a = x->m[s][F_DROPPED], b = ref->m[s][F_DROPPED];
        if (a != b) {
            c->dropped_bad++;
            if (report && shown++ < 12)
                EXPECT(false, "%s: step %d, dropped_frac = %.10g, the 1-rank reference has "
                       "%.10g: the dropping decisions differ (%s)\n      run:       %s\n      "
                       "reference: %s", x->label, s + 1, a, b, margin_words(ref, s, -1), x->cmd,
                       ref->cmd);
        }
        for (int l = 0; l < ref->nlayers && l < x->nlayers; l++) {
            double const la = x->layer_dropped[s][l], lb = ref->layer_dropped[s][l];
            if (la != lb) {
                c->layer_dropped_bad++;
                if (report && shown++ < 12)
                    EXPECT(false, "%s: step %d, moe_layers[%d].dropped_frac = %.10g, the 1-rank "
                           "reference has %.10g: layer %d's dropping decisions differ (%s)\n"
                           "      run:       %s\n      reference: %s", x->label, s + 1, l, la,
                           lb, l, margin_words(ref, s, l), x->cmd, ref->cmd);
            }
        }
        double const ga = x->m[s][F_GNORM], gb = ref->m[s][F_GNORM], gd = rel_diff(ga, gb);
        c->max_rel_gnorm = fmax(c->max_rel_gnorm, gd);
        if (gd > GNORM_REL_TOL) {
            c->gnorm_bad++;
            if (report && shown++ < 12)
                EXPECT(false, "%s: step %d, grad_norm = %.10g, the 1-rank reference has %.10g "
                       "(relative difference %.3g > %g; %s)\n      run:       %s\n      "
                       "reference: %s", x->label, s + 1, ga, gb, gd, GNORM_REL_TOL,
                       margin_words(ref, s, -1), x->cmd, ref->cmd);
        }
        if (!c->first_bad_step &&
            c->loss_bad + c->dropped_bad + c->layer_dropped_bad + c->gnorm_bad > bad_before) {
            c->first_bad_step = s + 1;
            c->first_bad_margin = ref->margin[s];
        }
    }
    if (x->nlayers != ref->nlayers) {
        c->layer_dropped_bad++;
        if (report)
            EXPECT(false, "%s: %d entries in moe_layers, the 1-rank reference has %d\n      "
                   "run:       %s\n      reference: %s", x->label, x->nlayers, ref->nlayers,
                   x->cmd, ref->cmd);
    }
    if (report && shown > 12)
        printf("  ... %d more mismatches of %s `%s` not shown\n", shown - 12, x->label, x->cmd);
    if (report)
        EXPECT(c->loss_bad == 0 && c->dropped_bad == 0 && c->layer_dropped_bad == 0 &&
                   c->gnorm_bad == 0,
               "%s: over the %d compared steps, %d loss values beyond relative %g, %d steps "
               "with another dropped_frac than the reference, %d (step, layer) pairs with "
               "another moe_layers[].dropped_frac, %d grad_norms beyond relative %g (max "
               "relative loss difference %.3g, step %d, %s; first mismatch at step %d, %s)\n"
               "      run: %s", x->label, nsteps, c->loss_bad, LOSS_REL_TOL, c->dropped_bad,
               c->layer_dropped_bad, c->gnorm_bad, GNORM_REL_TOL, c->max_rel_loss,
               c->max_rel_loss_step, c->max_rel_loss_field, c->first_bad_step,
               c->first_bad_step ? margin_words(ref, c->first_bad_step - 1, -1) : "-",
               x->cmd);
    if (nsteps < STEPS) return; /* the trajectories may part: the parameters are not compared */

    char pa[128], pb[128];
    snprintf(pa, sizeof pa, "%s/model.safetensors", x->dir);
    snprintf(pb, sizeof pb, "%s/model.safetensors", ref->dir);
    struct tu_st_set a, b;
    bool const la = tu_st_set_load(&a, tp(pa)), lb = tu_st_set_load(&b, tp(pb));
    if (la && lb &&
        EXPECT(a.n == b.n && a.n > 0, "%s `%s` exported %d tensors, the reference %d",
               x->label, x->cmd, a.n, b.n)) {
        c->params_compared = true;
        shown = 0;
        for (int i = 0; i < b.n; i++) {
            int const j = tu_st_set_find(&a, b.name[i]);
            if (!EXPECT(j >= 0 && a.ndim[j] == b.ndim[i] &&
                            memcmp(a.shape[j], b.shape[i], sizeof a.shape[j]) == 0 &&
                            a.dtype[j] == CKPT_F32 && b.dtype[i] == CKPT_F32,
                        "%s `%s`: tensor '%s' must be exported as F32 with the reference's "
                        "shape",
                        x->label, x->cmd, b.name[i])) {
                c->param_bad++;
                continue;
            }
            double amax = 0.0;
            size_t at = 0;
            for (size_t k = 0; k < b.numel[i]; k++) {
                double const va = a.data[j][k], vb = b.data[i][k], d = fabs(va - vb);
                double const scale = fmax(fabs(va), fabs(vb));
                if (!(d <= amax)) { /* NaN counts as the worst */
                    amax = isnan(d) ? INFINITY : d;
                    at = k;
                }
                if (scale >= REL_FLOOR) c->max_rel_param = fmax(c->max_rel_param, d / scale);
            }
            if (amax > c->max_abs_param) {
                c->max_abs_param = amax;
                snprintf(c->max_abs_param_name, sizeof c->max_abs_param_name, "%s", b.name[i]);
            }
            if (amax > PARAM_ABS_TOL) {
                c->param_bad++;
                if (report && shown++ < 8)
                    EXPECT(false, "%s: final parameter %s[%zu] = %.9g, the 1-rank reference "
                           "has %.9g (absolute difference %.3g > %g)\n      run:       %s\n"
                           "      reference: %s", x->label, b.name[i], at,
                           (double)a.data[j][at], (double)b.data[i][at], amax, PARAM_ABS_TOL,
                           x->cmd, ref->cmd);
            }
        }
        if (report)
            EXPECT(c->param_bad == 0, "%s: %d of %d tensors differ from the reference beyond "
                   "absolute %g (max %.3g in %s)\n      run: %s", x->label, c->param_bad, b.n,
                   PARAM_ABS_TOL, c->max_abs_param, c->max_abs_param_name, x->cmd);
    } else {
        c->param_bad++;
    }
    tu_st_set_free(&a);
    tu_st_set_free(&b);
}

/* ---------------------------------------------------------------- references */

/* 1-rank runs, cached per (micro_batch, global_batch, extra options). */
struct ref {
    int mb, gb, layers;
    char extra[256];
    struct run run;
    double seconds;
};
#define MAX_REFS 32
static struct ref g_refs[MAX_REFS];
static int g_nrefs;

static struct ref *find_ref(int mb, int gb, int layers, const char *extra)
{
    for (int i = 0; i < g_nrefs; i++)
        if (g_refs[i].mb == mb && g_refs[i].gb == gb && g_refs[i].layers == layers &&
            strcmp(g_refs[i].extra, extra) == 0)
            return &g_refs[i];
    return NULL;
}

/* The 1-rank run of a model of `layers` layers (0: tiny.ini's). */
static const struct run *reference_of(int mb, int gb, int layers, const char *extra)
{
    struct ref *const found = find_ref(mb, gb, layers, extra);
    if (found) return &found->run;
    if (!EXPECT(g_nrefs < MAX_REFS, "more than %d references", MAX_REFS)) return NULL;
    struct ref *r = &g_refs[g_nrefs];
    r->mb = mb;
    r->gb = gb;
    r->layers = layers;
    snprintf(r->extra, sizeof r->extra, "%s", extra);
    char dir[32];
    snprintf(dir, sizeof dir, "ref%02d", g_nrefs);
    g_nrefs++;
    /* The optimizer flag is irrelevant on one rank; the default (true) is passed. */
    struct layout one = one_rank;
    one.layers = layers;
    train(&r->run, dir, &one, NULL, true, mb, gb, extra);
    r->seconds = r->run.seconds;
    return &r->run;
}

static const struct run *reference(int mb, int gb, const char *extra)
{
    return reference_of(mb, gb, 0, extra);
}

/* ---------------------------------------------------------------- the layouts */

/* Without expert parallelism (ep 1, etp = tp): every optimizer x accumulation
 * combination, dropless; six of them also with capacity 1.0 (build_cases). */
static const struct layout layouts[] = {
    {"dp2", 1, 2, 0, 0, NULL, false, false, NO_PP},
    {"dp4", 1, 4, 0, 0, NULL, false, false, NO_PP},
    {"dp8", 1, 8, 0, 0, NULL, false, false, NO_PP},
    {"tp2", 2, 1, 0, 0, NULL, false, false, NO_PP},
    {"tp4", 4, 1, 0, 0, NULL, false, false, NO_PP},
    {"tp2 x dp2", 2, 2, 0, 0, NULL, false, false, NO_PP},
    /* The same sizes with DP fastest: the tensor group is ranks {0,2}, not neighbours. */
    {"tp2 x dp2 (dp-tp order)", 2, 2, 0, 0, "dp-tp-cp-ep-pp", false, false, NO_PP},
    {"tp2 x dp4", 2, 4, 0, 0, NULL, false, false, NO_PP},
    {"tp4 x dp2", 4, 2, 0, 0, NULL, false, false, NO_PP},
};
#define NLAYOUTS (sizeof layouts / sizeof layouts[0])

/* MoE parallel folding (shared/docs/parallelism.md): the MoE grid etp x ep x edp re-splits
 * the attention grid's tp x dp ranks, EP larger than DP and spanning the tensor ranks.
 * Names: "attention | MoE". Each runs with both dispatchers (alltoall, allgather), each
 * dropless and with capacity 1.0 under both policies (build_cases); `accum` picks the
 * micro-batching (add_case), the optimizer alternates (distributed for alltoall on the
 * even rows, for allgather on the odd ones) so that both meet both dispatchers. */
static const struct layout ep_layouts[] = {
    /* 2 ranks */
    {"dp2 | ep2", 1, 2, 1, 2, NULL, true, false, NO_PP},
    {"tp2 | ep2", 2, 1, 1, 2, NULL, false, false, NO_PP},
    {"tp2 | etp2", 2, 1, 2, 1, NULL, true, false, NO_PP},
    /* 4 ranks */
    {"tp4 | ep4", 4, 1, 1, 4, NULL, true, false, NO_PP},
    {"tp2 x dp2 | ep4", 2, 2, 1, 4, NULL, false, false, NO_PP},
    {"tp4 | etp2 x ep2", 4, 1, 2, 2, NULL, false, false, NO_PP},
    {"dp4 | ep2 x edp2", 1, 4, 1, 2, NULL, true, false, NO_PP},
    {"dp4 | ep4", 1, 4, 1, 4, NULL, false, false, NO_PP},
    {"tp2 x dp2 | etp2 x ep2", 2, 2, 2, 2, NULL, true, false, NO_PP},
    /* EDP fastest after ETP: the EP group is ranks {0,2}, the EDP group {0,1} (an
     * attention TP group). */
    {"tp2 x dp2 | ep2 x edp2 (tp-cp-dp-ep-pp)", 2, 2, 1, 2, "tp-cp-dp-ep-pp", false, false, NO_PP},
    /* 8 ranks */
    {"tp2 x dp4 | ep8", 2, 4, 1, 8, NULL, true, false, NO_PP},
    {"tp2 x dp4 | ep4 x edp2", 2, 4, 1, 4, NULL, false, false, NO_PP},
    {"tp2 x dp4 | etp2 x ep4", 2, 4, 2, 4, NULL, true, false, NO_PP},
    {"tp4 x dp2 | ep8", 4, 2, 1, 8, NULL, false, false, NO_PP},
    {"dp8 | ep8", 1, 8, 1, 8, NULL, true, false, NO_PP},
    /* DP fastest: attention TP group {0,4}; MoE EP group {0,2,4,6}, EDP {0,1}. */
    {"tp2 x dp4 | ep4 x edp2 (dp-tp-cp-ep-pp)", 2, 4, 1, 4, "dp-tp-cp-ep-pp", true, false, NO_PP},
};
#define NEP_LAYOUTS (sizeof ep_layouts / sizeof ep_layouts[0])

/* The all-to-all dispatcher writes rows directly between ranks of one node; these run it
 * with MPI messages only (the path between nodes), alltoall only. */
static const struct layout mpi_layouts[] = {
    {"dp2 | ep2, MPI dispatch", 1, 2, 1, 2, NULL, true, true, NO_PP},
    {"tp2 x dp4 | etp2 x ep4, MPI dispatch", 2, 4, 2, 4, NULL, false, true, NO_PP},
};
#define NMPI_LAYOUTS (sizeof mpi_layouts / sizeof mpi_layouts[0])
static const char *const dispatchers[] = {"alltoall", "allgather"};

/* Pipeline parallelism (shared/docs/parallelism.md): stages of contiguous layers, the
 * residual stream and its gradient between them as point-to-point messages, folding
 * inside each stage, and every schedule. tiny.ini has 2 layers; pp4 and the interleaved
 * layouts train (and compare with) models of 4 or 8 layers. Each runs dropless and with
 * capacity 1.0 under both policies, the dispatcher and the optimizer alternating; with
 * `accum` micro_batch 2 (4 micro-batches per step: 1F1B's steady state, interleaving),
 * without it one micro-batch (fewer micro-batches than stages). */
static const struct layout pp_layouts[] = {
    {"pp2", 1, 1, 0, 0, NULL, true, false, 2, 0, NULL, NULL, 0, NO_CP},
    {"pp2, one micro-batch", 1, 1, 0, 0, NULL, false, false, 2, 0, NULL, NULL, 0, NO_CP},
    {"pp2 gpipe", 1, 1, 0, 0, NULL, true, false, 2, 0, "gpipe", NULL, 0, NO_CP},
    {"pp2 x tp2", 2, 1, 0, 0, NULL, true, false, 2, 0, NULL, NULL, 0, NO_CP},
    {"pp2 x tp2, one micro-batch", 2, 1, 0, 0, NULL, false, false, 2, 0, NULL, NULL, 0, NO_CP},
    {"pp2 x dp2", 1, 2, 0, 0, NULL, true, false, 2, 0, NULL, NULL, 0, NO_CP},
    {"pp2 x tp2 | ep2", 2, 1, 1, 2, NULL, true, false, 2, 0, NULL, NULL, 0, NO_CP},
    {"pp2 x dp2 | ep2, gpipe", 1, 2, 1, 2, NULL, true, false, 2, 0, "gpipe", NULL, 0, NO_CP},
    {"pp2 x tp2 x dp2 | ep4", 2, 2, 1, 4, NULL, true, false, 2, 0, NULL, NULL, 0, NO_CP},
    {"pp2 x tp2 x dp2 | ep4 (pp fastest)", 2, 2, 1, 4, "pp-tp-cp-ep-dp", true, false, 2, 0,
     NULL, NULL, 0, NO_CP},
    {"pp4 (4 layers)", 1, 1, 0, 0, NULL, true, false, 4, 0, NULL, NULL, 4, NO_CP},
    {"pp2 layers 1,3 (4 layers)", 1, 1, 0, 0, NULL, true, false, 2, 0, NULL, "1,3", 4, NO_CP},
    {"pp2 vpp2 (4 layers)", 1, 1, 0, 0, NULL, true, false, 2, 2, NULL, NULL, 4, NO_CP},
    {"pp2 vpp2 x tp2 | ep2 (4 layers)", 2, 1, 1, 2, NULL, true, false, 2, 2, NULL, NULL, 4,
     NO_CP},
    {"pp2 vpp2 gpipe (4 layers)", 1, 1, 0, 0, NULL, true, false, 2, 2, "gpipe", NULL, 4, NO_CP},
    {"pp4 vpp2 (8 layers)", 1, 1, 0, 0, NULL, true, false, 4, 2, NULL, NULL, 8, NO_CP},
    {"pp2 vpp2 layers 1,2,3,2 (8 layers)", 1, 1, 0, 0, NULL, true, false, 2, 2, NULL,
     "1,2,3,2", 8, NO_CP},
};
#define NPP_LAYOUTS (sizeof pp_layouts / sizeof pp_layouts[0])

/* Context parallelism (shared/docs/parallelism.md): each sequence cut into 2 cp chunks,
 * zigzag over the cp ranks, keys and values passed around the ring (p2p) or all-gathered,
 * with tensor, data and pipeline parallelism, and expert parallelism folded over the cp
 * ranks (EP over TP x CP). tiny.ini's 16 positions give chunks of 4 (cp 2) or 2 (cp 4,
 * cp 2 x tp 2). Each runs dropless and with capacity 1.0 under both policies, the
 * dispatcher and the optimizer alternating. */
static const struct layout cp_layouts[] = {
    {"cp2", 1, 1, 0, 0, NULL, true, false, 0, 0, NULL, NULL, 0, 2, NULL, NO_NODES},
    {"cp2 allgather", 1, 1, 0, 0, NULL, false, false, 0, 0, NULL, NULL, 0, 2, "allgather", NO_NODES},
    {"cp4", 1, 1, 0, 0, NULL, true, false, 0, 0, NULL, NULL, 0, 4, NULL, NO_NODES},
    {"cp4 allgather", 1, 1, 0, 0, NULL, true, false, 0, 0, NULL, NULL, 0, 4, "allgather", NO_NODES},
    {"cp2 x tp2", 2, 1, 0, 0, NULL, true, false, 0, 0, NULL, NULL, 0, 2, NULL, NO_NODES},
    {"cp2 x dp2", 1, 2, 0, 0, NULL, true, false, 0, 0, NULL, NULL, 0, 2, NULL, NO_NODES},
    {"cp2 x dp2 allgather", 1, 2, 0, 0, NULL, false, false, 0, 0, NULL, NULL, 0, 2,
     "allgather", NO_NODES},
    {"cp2 | ep2", 1, 1, 1, 2, NULL, true, false, 0, 0, NULL, NULL, 0, 2, NULL, NO_NODES},
    {"cp2 x tp2 | ep4", 2, 1, 1, 4, NULL, true, false, 0, 0, NULL, NULL, 0, 2, NULL, NO_NODES},
    {"cp2 x tp2 | ep4 allgather", 2, 1, 1, 4, NULL, false, false, 0, 0, NULL, NULL, 0, 2,
     "allgather", NO_NODES},
    {"cp2 x pp2", 1, 1, 0, 0, NULL, true, false, 2, 0, NULL, NULL, 0, 2, NULL, NO_NODES},
    {"cp2 x tp2 x dp2 | ep8 (dp-cp-tp order)", 2, 2, 1, 8, "dp-cp-tp-ep-pp", true, false, 0,
     0, NULL, NULL, 0, 2, NULL, NO_NODES},
};
#define NCP_LAYOUTS (sizeof cp_layouts / sizeof cp_layouts[0])

/* A cluster emulated on this machine: nodes of 2 consecutive ranks (launch.ranks_per_node),
 * so direct writes happen only inside them, and every message between ranks, of one node or
 * not, over TCP on the loopback (Open MPI's shared-memory transport excluded), the path
 * messages between real nodes take (--mca btl tcp,self --mca btl_tcp_if_include lo). One layout lets parallel.order = auto choose its order
 * on the declared nodes. Dropless and capacity 1.0 under both policies. */
static const struct layout node_layouts[] = {
    {"tp2 x dp2 | ep4, nodes of 2, TCP", 2, 2, 1, 4, NULL, true, false, 0, 0, NULL, NULL, 0, 0,
     NULL, 2, true},
    {"pp2 x dp2 | ep2, nodes of 2, TCP", 1, 2, 1, 2, NULL, true, false, 2, 0, NULL, NULL, 0, 0,
     NULL, 2, true},
    {"cp2 x dp2 | ep4, nodes of 2, TCP, order auto", 1, 2, 1, 4, "auto", true, false, 0, 0,
     NULL, NULL, 0, 2, NULL, 2, true},
};
#define NNODE_LAYOUTS (sizeof node_layouts / sizeof node_layouts[0])

/* The seed of the initial weights (train.seed) of every case and reference.
 *
 * Not tiny.ini's seed 1: under MARGIN_MIN it fails test_coverage -- 71% of the (case,
 * step) pairs compared, no probs case over all steps, 33 cases with fewer than 3 steps --
 * because its probs references meet exact ties (margin 0) at step 1 or 2 and its dropless
 * (micro_batch 2, global_batch 16) reference a margin of 8.9e-7 at step 3. The margins
 * follow the trajectory, so train.seed was scanned: the 1-rank references of all 16
 * (micro_batch, global_batch, variant) settings of the cases, seeds 1..140, against the
 * coverage demands. 46 is the only one that meets them all: 93.3% of the pairs compared;
 * all steps in 68 of 68 dropless, 33 of 38 position and 22 of 38 probs cases; at least 4
 * steps in every case. (The probs variant is what most seeds fail on: its exact ties
 * between bit-identical router rows come with the data and are frequent.) A change of the
 * model, the data, the numerics or the cases moves the trajectories, and may move a
 * reference's margins under MARGIN_MIN: test_coverage then names the cases, and the scan
 * is to be repeated (VDIST_EQ_SEED=N runs every case with seed N). */
#define EQ_SEED 46
static int g_seed = EQ_SEED; /* VDIST_EQ_SEED overrides it (a calibration aid) */

/* The options of the three variants (set_variants): dropless, and capacity 1.0 under each
 * drop policy, each with train.seed = g_seed. */
static char DROPLESS[64], CAP_POSITION[160], CAP_PROBS[160];
static void set_variants(void)
{
    snprintf(DROPLESS, sizeof DROPLESS, "--train.seed=%d", g_seed);
    snprintf(CAP_POSITION, sizeof CAP_POSITION,
             "--model.moe_capacity_factor=1.0 --model.moe_drop_policy=position %s", DROPLESS);
    snprintf(CAP_PROBS, sizeof CAP_PROBS,
             "--model.moe_capacity_factor=1.0 --model.moe_drop_policy=probs %s", DROPLESS);
}

struct eq_case {
    char name[256];
    const struct layout *lay;
    const char *dispatcher; /* NULL: the default, not passed */
    bool dopt, accum;
    int mb, gb;
    const char *extra; /* DROPLESS, CAP_POSITION or CAP_PROBS */
    /* results */
    bool ran, passed;
    struct cmp cmp;
    double max_dropped; /* largest dropped_frac over the compared steps */
    int steps;          /* steps compared (comparable_steps of the reference); 0: none */
    double seconds;
};
#define MAX_CASES 256
static struct eq_case g_cases[MAX_CASES];
static int g_ncases;

/* Global batch 8 (16 for dp 8, so that every replica still runs two micro-batches with
 * accumulation). With accumulation: micro_batch 2 (dp <= 2) or 1 (dp >= 4), so each
 * replica runs at least two micro-batches; without: micro_batch = global_batch / dp, one
 * micro-batch per replica. */
static void add_case(const struct layout *lay, const char *dispatcher, bool dopt, bool accum,
                     const char *extra, const char *extra_name)
{
    if (g_ncases >= MAX_CASES) {
        fprintf(stderr, "test_equivalence: more than %d cases (raise MAX_CASES)\n", MAX_CASES);
        exit(2);
    }
    struct eq_case *c = &g_cases[g_ncases++];
    c->lay = lay;
    c->dispatcher = dispatcher;
    c->dopt = dopt;
    c->accum = accum;
    c->gb = lay->dp >= 8 ? 16 : 8;
    c->mb = accum ? (lay->dp <= 2 ? 2 : 1) : c->gb / lay->dp;
    c->extra = extra;
    snprintf(c->name, sizeof c->name, "%s%s%s, %s optimizer, %s (micro_batch %d, global_batch "
             "%d, %d micro-batch(es) per replica)%s%s", lay->name,
             dispatcher ? ", dispatcher " : "", dispatcher ? dispatcher : "",
             dopt ? "distributed" : "replicated", accum ? "accumulation" : "no accumulation",
             c->mb, c->gb, c->gb / (c->mb * lay->dp), extra_name ? ", " : "",
             extra_name ? extra_name : "");
}

static void build_cases(void)
{
    for (size_t l = 0; l < NLAYOUTS; l++)
        for (int dopt = 1; dopt >= 0; dopt--)
            for (int accum = 1; accum >= 0; accum--)
                add_case(&layouts[l], NULL, dopt, accum, DROPLESS, NULL);
    /* Capacity 1.0: C = ceil(N k / E) = N / 4 per expert per micro-batch (8 experts, top
     * 2), so any routing imbalance drops tokens. Tensor-parallel layouts split each
     * micro-batch's tokens over ranks (sequence parallelism), where the decision needs the
     * whole micro-batch. */
    static const struct {
        const char *lay;
        bool dopt, accum;
    } cap[] = {
        {"dp2", true, true},        {"tp2", true, true},        {"tp4", false, false},
        {"tp2 x dp2", true, true},  {"tp2 x dp4", false, true}, {"tp4 x dp2", true, false},
    };
    for (int pol = 0; pol < 2; pol++)
        for (size_t i = 0; i < sizeof cap / sizeof cap[0]; i++)
            for (size_t l = 0; l < NLAYOUTS; l++)
                if (strcmp(layouts[l].name, cap[i].lay) == 0)
                    add_case(&layouts[l], NULL, cap[i].dopt, cap[i].accum,
                             pol ? CAP_PROBS : CAP_POSITION,
                             pol ? "capacity 1.0 probs" : "capacity 1.0 position");
    /* Expert parallelism: every layout x dispatcher x {dropless, position, probs}. */
    static const char *const variant_extra[] = {DROPLESS, CAP_POSITION, CAP_PROBS};
    static const char *const variant_name[] = {NULL, "capacity 1.0 position",
                                               "capacity 1.0 probs"};
    for (size_t l = 0; l < NEP_LAYOUTS; l++)
        for (int d = 0; d < 2; d++)
            for (int v = 0; v < 3; v++)
                add_case(&ep_layouts[l], dispatchers[d], (l + (size_t)d) % 2 == 0,
                         ep_layouts[l].accum, variant_extra[v], variant_name[v]);
    for (size_t l = 0; l < NMPI_LAYOUTS; l++)
        for (int v = 0; v < 3; v++)
            add_case(&mpi_layouts[l], dispatchers[0], l % 2 == 0, mpi_layouts[l].accum,
                     variant_extra[v], variant_name[v]);
    for (size_t l = 0; l < NPP_LAYOUTS; l++)
        for (int v = 0; v < (pp_layouts[l].layers ? 2 : 3); v++)
            add_case(&pp_layouts[l], dispatchers[(l + (size_t)v) % 2], (l + (size_t)v) % 2 == 0,
                     pp_layouts[l].accum, variant_extra[v], variant_name[v]);
    for (size_t l = 0; l < NCP_LAYOUTS; l++)
        for (int v = 0; v < 3; v++)
            add_case(&cp_layouts[l], dispatchers[(l + (size_t)v) % 2], (l + (size_t)v) % 2 == 1,
                     cp_layouts[l].accum, variant_extra[v], variant_name[v]);
    for (size_t l = 0; l < NNODE_LAYOUTS; l++)
        for (int v = 0; v < 3; v++)
            add_case(&node_layouts[l], dispatchers[(l + (size_t)v) % 2], (l + (size_t)v) % 2 == 0,
                     node_layouts[l].accum, variant_extra[v], variant_name[v]);
    /* VDIST_EQ_ONLY=text keeps the cases whose name contains it (a debugging aid: the
     * coverage demands then apply to those alone). */
    const char *const only = getenv("VDIST_EQ_ONLY");
    if (only && *only) {
        int kept = 0;
        for (int i = 0; i < g_ncases; i++)
            if (strstr(g_cases[i].name, only)) g_cases[kept++] = g_cases[i];
        g_ncases = kept;
    }
}

/* ---------------------------------------------------------------- tests */

/* How many steps of a run with reference `ref` are compared: the steps 1..s* such that
 * every step up to s* has a decision_margin >= g_margin_min in the reference, or -1 (no
 * decision at all). At a step below it a decision is within the layouts' legitimate drift
 * of a tie and may go either way, and after it the trajectories may part. The count
 * depends on the reference alone, so no layout can narrow its own comparison. */
static int comparable_steps(const struct run *ref)
{
    int s = 0;
    while (s < STEPS && (ref->margin[s] == -1.0 || ref->margin[s] >= g_margin_min)) s++;
    return s;
}

/* The reference's decision margins of steps 1..STEPS in words (failure messages). */
static const char *margins_list(const struct run *ref)
{
    static char buf[512];
    size_t n = 0;
    for (int s = 0; s < STEPS && n < sizeof buf; s++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%.2g", s ? ", " : "", ref->margin[s]);
    return buf;
}

/* Every child shares g_env.tmp: the first 1-rank run writes runs/synth-v64.bin there, before
 * any layout runs (so no two jobs race to make it). */
static void test_first_reference(void)
{
    const struct run *r = reference(1, 8, DROPLESS);
    CU_ASSERT_FATAL(EXPECT(r && r->ok, "the first 1-rank reference must train"));
    EXPECT(tu_file_exists(tp("runs/synth-v64.bin")),
           "the first run must make the embedded synthetic dataset %s", tp("runs/synth-v64.bin"));
    printf("\n    (1-rank reference, micro_batch 1, global_batch 8: %.1f s; lm_loss %.4f -> "
           "%.4f)", r->seconds, r->m[0][F_LM], r->m[STEPS - 1][F_LM]);
}

/* The harness must be able to fail: the same reference re-run agrees bit for bit (the
 * 1-rank run is deterministic, so the tolerances measure layouts, not noise; its margins
 * too), and a run with another seed is told apart on losses and parameters (all steps). */
static void test_negative_control(void)
{
    const struct run *ref = reference(1, 8, DROPLESS);
    CU_ASSERT_FATAL(ref && ref->ok);
    struct run again, other;
    train(&again, "ctl_same", &one_rank, NULL, true, 1, 8, DROPLESS);
    if (again.ok) {
        struct cmp c;
        compare(&again, ref, STEPS, true, &c);
        EXPECT(c.max_rel_loss == 0.0 && c.max_abs_param == 0.0 && c.dropped_bad == 0 &&
                   c.layer_dropped_bad == 0 && c.max_rel_gnorm == 0.0 &&
                   c.max_margin_drift == 0.0,
               "re-running the 1-rank reference `%s` must reproduce it bit for bit; max "
               "relative loss difference %.3g, max parameter difference %.3g, max "
               "decision_margin difference %.3g", again.cmd, c.max_rel_loss, c.max_abs_param,
               c.max_margin_drift);
    }
    char other_seed[32];
    snprintf(other_seed, sizeof other_seed, "--train.seed=%d", g_seed + 1);
    train(&other, "ctl_seed", &one_rank, NULL, true, 1, 8, other_seed);
    if (other.ok) {
        struct cmp c;
        compare(&other, ref, STEPS, false, &c);
        printf("\n    (seed %d against seed %d: %d of %d loss values and %d tensors beyond the "
               "tolerances; max relative loss difference %.3g, max parameter difference %.3g)",
               g_seed + 1, g_seed, c.loss_bad, STEPS * F_LOSS_FIELDS, c.param_bad,
               c.max_rel_loss, c.max_abs_param);
        EXPECT(c.loss_bad >= STEPS && c.param_bad > 0,
               "the comparison must tell a run with seed %d (`%s`) from the seed-%d reference: "
               "only %d loss values and %d tensors were beyond the tolerances", g_seed + 1,
               other.cmd, g_seed, c.loss_bad, c.param_bad);
    }
}

/* The dropping checks must be able to fail too (the references compared here serve the
 * layouts anyway, so this costs no run; all steps compared): a capacity run against the
 * dropless reference differs in dropped_frac, top-level and per layer; the two drop
 * policies drop as many assignments but not the same ones, which the losses must tell;
 * and a run whose per-layer numbers differ while their mean (the top-level dropped_frac)
 * does not -- one assignment dropped in layer 1 instead of layer 0 -- is caught by the
 * per-layer comparison alone. */
static void test_negative_control_dropping(void)
{
    const struct run *dl = reference(2, 8, DROPLESS), *pos = reference(2, 8, CAP_POSITION),
                     *prob = reference(2, 8, CAP_PROBS);
    CU_ASSERT_FATAL(EXPECT(dl && dl->ok && pos && pos->ok && prob && prob->ok,
                           "the three 1-rank references (micro_batch 2) must train"));
    struct cmp c;
    compare(pos, dl, STEPS, false, &c);
    printf("\n    (capacity 1.0 position against dropless: %d steps with another dropped_frac, "
           "%d (step, layer) pairs with another moe_layers[].dropped_frac, %d loss values "
           "beyond the tolerance)", c.dropped_bad, c.layer_dropped_bad, c.loss_bad);
    EXPECT(c.dropped_bad >= STEPS && c.layer_dropped_bad >= STEPS,
           "the comparison must tell the capacity-1.0 run `%s` from the dropless `%s` by "
           "dropped_frac at every step: only %d steps and %d (step, layer) pairs differ",
           pos->cmd, dl->cmd, c.dropped_bad, c.layer_dropped_bad);
    compare(prob, pos, STEPS, false, &c);
    printf("\n    (policy probs against position: %d steps with another dropped_frac, %d loss "
           "values and %d tensors beyond the tolerances)", c.dropped_bad, c.loss_bad,
           c.param_bad);
    EXPECT(c.loss_bad > 0 && c.param_bad > 0,
           "the comparison must tell drop policy probs (`%s`) from position (`%s`): only %d "
           "loss values and %d tensors are beyond the tolerances", prob->cmd, pos->cmd,
           c.loss_bad, c.param_bad);
    struct run *m = malloc(sizeof *m);
    CU_ASSERT_FATAL(m != NULL);
    *m = *pos;
    snprintf(m->label, sizeof m->label, "the position reference with one drop moved");
    int at = -1;
    for (int s = 0; s < STEPS && at < 0; s++)
        if (m->nlayers >= 2 && m->layer_dropped[s][0] > 0) at = s;
    if (EXPECT(at >= 0, "the position reference `%s` must drop in layer 0 at some step",
               pos->cmd)) {
        /* One assignment of the step: n_micro * micro_batch * seq_len * k = 4 * 2 * 16 * 2. */
        double const one = 1.0 / 256.0;
        m->layer_dropped[at][0] -= one;
        m->layer_dropped[at][1] += one;
        compare(m, pos, STEPS, false, &c);
        EXPECT(c.layer_dropped_bad == 2 && c.dropped_bad == 0 && c.loss_bad == 0 &&
                   c.param_bad == 0,
               "moving one dropped assignment of step %d from layer 0 to layer 1 must show in "
               "exactly the two moe_layers[].dropped_frac values and nowhere else: %d (step, "
               "layer) pairs, %d steps with another dropped_frac, %d loss values, %d tensors",
               at + 1, c.layer_dropped_bad, c.dropped_bad, c.loss_bad, c.param_bad);
    }
    free(m);
}

/* Writes calib_init/model.safetensors (once): tiny.ini's initial weights, exported by a
 * 1-step run at lr 0 and weight decay 0, which keeps every bit. */
static bool initial_weights(void)
{
    if (tu_file_exists(tp("calib_init/model.safetensors"))) return true;
    char args[2048];
    snprintf(args, sizeof args, "train --config %s/configs/tiny.ini --train.steps=1 "
             "--train.lr=0 --train.weight_decay=0 --train.peak_gflops=1 --train.seed=%d "
             "--train.export_to=calib_init", g_env.root, g_seed);
    run_vdist(1, args);
    return EXPECT(g_run.rc == 0 && tu_file_exists(tp("calib_init/model.safetensors")),
                  "`%s` must export the initial weights, got exit status %d:\n%s", g_run.cmd, g_run.rc,
                  tail(g_run.out, 3000));
}

/* Writes calib_init/perturbed.safetensors (once): the initial weights, each perturbed by
 * +-1 ulp with a fixed pseudo-random sign. */
static bool perturbed_init(void)
{
    if (!initial_weights()) return false;
    if (tu_file_exists(tp("calib_init/perturbed.safetensors"))) return true;
    struct tu_st_set w;
    if (!tu_st_set_load(&w, tp("calib_init/model.safetensors"))) {
        tu_st_set_free(&w);
        return false;
    }
    uint32_t state = 12345u;
    struct ckpt_st_write_tensor *wt = calloc((size_t)w.n, sizeof *wt);
    for (int i = 0; i < w.n; i++) {
        for (size_t k = 0; k < w.numel[i]; k++) {
            uint32_t u;
            memcpy(&u, &w.data[i][k], sizeof u);
            state = state * 1664525u + 1013904223u;
            if (u & 0x7fffffffu) u += (state >> 31) ? 1u : (uint32_t)-1; /* +-1 ulp */
            memcpy(&w.data[i][k], &u, sizeof u);
        }
        wt[i].name = w.name[i];
        wt[i].ndim = w.ndim[i];
        memcpy(wt[i].shape, w.shape[i], sizeof wt[i].shape);
        wt[i].data = w.data[i];
    }
    const char *const keys[] = {"format"}, *const values[] = {"pt"};
    int const rc = ckpt_st_write(tp("calib_init/perturbed.safetensors"), wt, w.n, keys, values,
                                 1);
    free(wt);
    tu_st_set_free(&w);
    return EXPECT(rc == 0, "writing the perturbed weights %s must succeed: %s",
                  tp("calib_init/perturbed.safetensors"), vd_err_msg());
}

/* Does `extra` ask for capacity (dropping)? */
static bool is_capacity(const char *extra)
{
    return strstr(extra, "moe_capacity_factor") != NULL;
}

/* The calibration: the 1-rank reference's own sensitivity to rounding. Its initial
 * weights (exported by a step at lr 0, which keeps every bit) are perturbed by +-1 ulp
 * each and the same 1-rank run is trained from them: a perturbation no larger than a
 * layout's, so under the same rule it must agree with the reference at every comparable
 * step, and its deviation (shown in the summary) is the floor under the tolerances. The
 * setting is capacity 1.0 position, micro_batch 4 (that of the largest parameter deviation
 * measured across layouts). The unperturbed initial weights, loaded the same way
 * (train.init_from), must reproduce the reference bit for bit, so that the perturbation
 * is the only difference. */
static struct cmp g_calib;
static bool g_calib_ran;

static void test_calibration(void)
{
    const struct run *ref = reference(4, 8, CAP_POSITION);
    CU_ASSERT_FATAL(EXPECT(ref && ref->ok, "the 1-rank reference must train"));
    CU_ASSERT_FATAL(perturbed_init());
    char extra[512];
    snprintf(extra, sizeof extra, "%s --train.init_from=calib_init/model.safetensors",
             CAP_POSITION);
    struct run x;
    train(&x, "calib_same", &one_rank, NULL, true, 4, 8, extra);
    if (x.ok) {
        struct cmp c;
        compare(&x, ref, STEPS, false, &c);
        EXPECT(c.max_rel_loss == 0.0 && c.max_abs_param == 0.0 && c.dropped_bad == 0 &&
                   c.layer_dropped_bad == 0 && c.max_rel_gnorm == 0.0,
               "the run from the reference's exported initial weights `%s` must reproduce the "
               "reference `%s` bit for bit (else the calibration does not perturb its start); "
               "max relative loss difference %.3g, max parameter difference %.3g", x.cmd,
               ref->cmd, c.max_rel_loss, c.max_abs_param);
    }
    snprintf(extra, sizeof extra, "%s --train.init_from=calib_init/perturbed.safetensors",
             CAP_POSITION);
    train(&x, "calib_ulp", &one_rank, NULL, true, 4, 8, extra);
    snprintf(x.label, sizeof x.label, "1 rank from 1-ulp perturbed initial weights");
    if (!x.ok) return;
    compare(&x, ref, comparable_steps(ref), true, &g_calib);
    g_calib_ran = true;
    printf("\n    (1 rank from 1-ulp perturbed weights, %d steps compared: max rel loss diff "
           "%.2e (step %d, %s), max rel grad_norm diff %.2e, max abs param diff %.2e%s%s, "
           "max decision_margin change %.2e)", g_calib.steps, g_calib.max_rel_loss,
           g_calib.max_rel_loss_step, g_calib.max_rel_loss_field, g_calib.max_rel_gnorm,
           g_calib.max_abs_param, g_calib.params_compared ? " in " : " (not compared)",
           g_calib.max_abs_param_name, g_calib.max_margin_drift);
    EXPECT(g_calib.max_rel_loss > 0 || g_calib.max_rel_gnorm > 0,
           "the run from 1-ulp perturbed initial weights must differ from the reference `%s` "
           "at all", ref->cmd);
}

static void test_case(void)
{
    /* CUnit test functions take no argument: the case is found by the test's name. */
    CU_pTest const t = CU_get_current_test();
    struct eq_case *c = NULL;
    for (int i = 0; i < g_ncases && !c; i++)
        if (t && strcmp(t->pName, g_cases[i].name) == 0) c = &g_cases[i];
    CU_ASSERT_FATAL(c != NULL);
    double const t0 = tu_now_s();
    const struct run *ref = reference_of(c->mb, c->gb, c->lay->layers, c->extra);
    if (!EXPECT(ref && ref->ok, "the 1-rank reference for %s must train", c->name)) return;
    unsigned const failures_before = CU_get_number_of_failures();
    int const steps = comparable_steps(ref);
    EXPECT(steps >= MIN_CASE_STEPS,
           "%s: its 1-rank reference `%s` has a decision margin below MARGIN_MIN (%g) at "
           "step %d (decision_margin of steps 1..%d: %s), so only %d steps can be compared, "
           "fewer than %d: change the configuration of this case (EQ_SEED, batch, capacity)",
           c->name, ref->cmd, g_margin_min, steps + 1, STEPS, margins_list(ref), steps,
           MIN_CASE_STEPS);
    char dir[32];
    snprintf(dir, sizeof dir, "case%03d", (int)(c - g_cases));
    struct run x;
    train(&x, dir, c->lay, c->dispatcher, c->dopt, c->mb, c->gb, c->extra);
    c->ran = true;
    if (x.ok) {
        c->steps = steps;
        compare(&x, ref, steps, true, &c->cmp);
        for (int s = 0; s < steps; s++) c->max_dropped = fmax(c->max_dropped, x.m[s][F_DROPPED]);
        if (is_capacity(c->extra)) {
            /* Each layer's decisions are compared: each must have some to compare. */
            for (int l = 0; l < ref->nlayers; l++) {
                double mx = 0.0;
                for (int s = 0; s < steps; s++) mx = fmax(mx, ref->layer_dropped[s][l]);
                EXPECT(mx > 0.0, "capacity 1.0 must drop tokens in layer %d of the reference "
                       "`%s` within its %d compared steps (moe_layers[%d].dropped_frac is 0 "
                       "there): the case checks no dropping decision of that layer", l,
                       ref->cmd, steps, l);
            }
        }
    }
    c->passed = x.ok && CU_get_number_of_failures() == failures_before;
    c->seconds = tu_now_s() - t0;
    char pd[32] = "not compared";
    if (c->cmp.params_compared) snprintf(pd, sizeof pd, "%.2e", c->cmp.max_abs_param);
    printf("\n    (%.1f s; %d ranks; %d steps compared, reference decision_margin >= %.2e "
           "there; max rel loss diff %.2e; max abs param diff %s)", c->seconds,
           lay_ranks(c->lay), c->steps, c->cmp.min_ref_margin, c->cmp.max_rel_loss, pd);
}

/* Coverage over the cases: (case, step) pairs compared, cases compared over all STEPS
 * steps (final parameters included) per capacity variant (0 dropless, 1 position, 2
 * probs), and the case with the fewest compared steps. */
struct coverage {
    int pairs, compared;
    int full[3], total[3];
    int fewest; /* steps */
    const struct eq_case *fewest_case;
    int short_cases; /* fewer than MIN_CASE_STEPS */
};

static int variant_of(const struct eq_case *c)
{
    return c->extra == CAP_POSITION ? 1 : c->extra == CAP_PROBS ? 2 : 0;
}

static void coverage(struct coverage *v)
{
    memset(v, 0, sizeof *v);
    v->fewest = STEPS + 1;
    for (int i = 0; i < g_ncases; i++) {
        const struct eq_case *c = &g_cases[i];
        int const steps = c->ran ? c->steps : 0;
        v->pairs += STEPS;
        v->compared += steps;
        v->total[variant_of(c)]++;
        v->full[variant_of(c)] += steps == STEPS && c->cmp.params_compared;
        v->short_cases += steps < MIN_CASE_STEPS;
        if (steps < v->fewest) {
            v->fewest = steps;
            v->fewest_case = c;
        }
    }
}

/* The margin rule must not make the test vacuous: enough (case, step) pairs compared
 * overall, every case at least MIN_CASE_STEPS steps (each such failure is reported by its
 * case, with its reference's margins), and each drop policy with MIN_FULL_CAPACITY cases
 * compared over all steps, final parameters included. */
static void test_coverage(void)
{
    struct coverage v;
    coverage(&v);
    double const frac = v.pairs ? (double)v.compared / v.pairs : 0.0;
    printf("\n    (%d of %d (case, step) pairs compared, %.1f%%; all %d steps in %d of %d "
           "dropless, %d of %d position, %d of %d probs cases; fewest %d steps)", v.compared,
           v.pairs, 100.0 * frac, STEPS, v.full[0], v.total[0], v.full[1], v.total[1],
           v.full[2], v.total[2], v.fewest);
    EXPECT(frac >= MIN_COVERAGE,
           "only %d of %d (case, step) pairs were compared (%.1f%%, fewer than %.0f%%): the "
           "references' decision margins fall below MARGIN_MIN (%g) too early (the summary's "
           "\"steps\" column shows where), so the test checks too little", v.compared, v.pairs,
           100.0 * frac, 100.0 * MIN_COVERAGE, g_margin_min);
    EXPECT(v.short_cases == 0,
           "%d cases compare fewer than %d steps (the fewest: %d, %s): each is reported above "
           "with its reference's decision margins", v.short_cases, MIN_CASE_STEPS, v.fewest,
           v.fewest_case ? v.fewest_case->name : "-");
    static const char *const variant[] = {"dropless", "capacity 1.0 position",
                                          "capacity 1.0 probs"};
    for (int k = 1; k <= 2; k++)
        EXPECT(v.full[k] >= MIN_FULL_CAPACITY,
               "only %d of the %d %s cases are compared over all %d steps (final parameters "
               "included), fewer than %d: their references' decision margins fall below "
               "MARGIN_MIN (%g) before step %d (the summary's \"steps\" column)", v.full[k],
               v.total[k], variant[k], STEPS, MIN_FULL_CAPACITY, g_margin_min, STEPS);
}

/* ---------------------------------------------------------------- summary */

#define ROW_FMT_S                                                                              \
    "%-40s %5s %-9s %-4s %-9s %-5s %-12s %8s %5s %9s %9s %10s %-12s %10s %10s %10s %6s %s\n"

static void print_row(const char *layout, int ranks, const char *disp, const char *opt,
                      const char *mbgb, const char *accum, const char *cap, double dropped,
                      const struct cmp *c, double seconds, const char *result)
{
    char at[32] = "-", rk[16], dr[16] = "-", sec[16] = "-", st[16] = "-", mg[16] = "-";
    char dm[16] = "-", rl[16] = "-", ap[16] = "-", rp[16] = "-", rg[16] = "-";
    snprintf(rk, sizeof rk, "%d", ranks);
    if (dropped >= 0) snprintf(dr, sizeof dr, "%.4f", dropped);
    if (seconds > 0) snprintf(sec, sizeof sec, "%.1f", seconds);
    if (c) {
        snprintf(st, sizeof st, "%d", c->steps);
        if (c->min_ref_margin >= 0) snprintf(mg, sizeof mg, "%.2e", c->min_ref_margin);
        snprintf(dm, sizeof dm, "%.2e", c->max_margin_drift);
        if (c->max_rel_loss > 0)
            snprintf(at, sizeof at, "s%d %s", c->max_rel_loss_step, c->max_rel_loss_field);
        snprintf(rl, sizeof rl, "%.2e", c->max_rel_loss);
        if (c->params_compared) {
            snprintf(ap, sizeof ap, "%.2e", c->max_abs_param);
            snprintf(rp, sizeof rp, "%.2e", c->max_rel_param);
        }
        snprintf(rg, sizeof rg, "%.2e", c->max_rel_gnorm);
    }
    printf(ROW_FMT_S, layout, rk, disp, opt, mbgb, accum, cap, dr, st, mg, dm, rl, at, ap, rp,
           rg, sec, result);
}

/* Cases of one family of layouts (the summary's closing lines): how many ran and passed,
 * the worst relative loss, absolute parameter and relative grad_norm differences. */
struct tally {
    int cases, passed;
    double loss, param, gnorm, seconds;
};

static void tally_add(struct tally *t, const struct eq_case *c)
{
    t->passed += c->passed;
    t->loss = fmax(t->loss, c->cmp.max_rel_loss);
    t->param = fmax(t->param, c->cmp.max_abs_param);
    t->gnorm = fmax(t->gnorm, c->cmp.max_rel_gnorm);
    t->seconds += c->seconds;
}

static void print_summary(double total_s)
{
    printf("\nequivalence with the 1-rank run, %d steps of configs/tiny.ini with train.seed "
           "%d. Tolerances: losses relative %g, grad_norm relative %g, dropped_frac exact "
           "(top-level and every moe_layers entry), parameters absolute %g. layout: attention "
           "grid | MoE grid (etp = tp and ep 1 where the MoE grid is not written). dispatcher: "
           "- is the default (alltoall), not passed. mb x n/gb: micro_batch x micro-batches per "
           "replica / global_batch. dropped: the largest dropped_frac over the compared steps. "
           "steps: steps compared, 1..steps (every one with a reference decision_margin >= "
           "MARGIN_MIN = %g); the parameters only when all %d are. ref margin: the "
           "reference's smallest decision_margin over them. margin chg: the largest change "
           "of the layout's own decision_margin from the reference's over them (the drift of "
           "the router probabilities). rel loss: max over the compared steps and loss, "
           "lm_loss, aux_loss, z_loss (at: where). rel param: over elements with |w| >= %g. "
           "s: seconds of the case, its reference included when the case made it.\n", STEPS,
           g_seed, LOSS_REL_TOL, GNORM_REL_TOL, PARAM_ABS_TOL, g_margin_min, STEPS, REL_FLOOR);
    printf(ROW_FMT_S, "layout", "ranks", "dispatch", "opt", "mb x n/gb", "accum", "capacity",
           "dropped", "steps", "ref marg", "marg chg", "rel loss", "at", "abs param",
           "rel param", "rel gnorm", "s", "result");
    double worst_loss = 0, worst_param = 0, worst_rel = 0, worst_gnorm = 0, worst_drift = 0;
    double least_margin = -1;
    int passed = 0, ran = 0;
    /* expert, pipeline, context layouts, emulated nodes */
    struct tally ept = {0}, ppt = {0}, cpt = {0}, ndt = {0};
    const char *least_margin_case = "-", *worst_drift_case = "-";
    for (int i = 0; i < g_ncases; i++) {
        const struct eq_case *c = &g_cases[i];
        char mbgb[32];
        snprintf(mbgb, sizeof mbgb, "%dx%d/%d", c->mb, c->gb / (c->mb * c->lay->dp), c->gb);
        static const char *const capname[] = {"dropless", "1.0 position", "1.0 probs"};
        const char *cap = capname[variant_of(c)];
        int const ranks = lay_ranks(c->lay);
        const char *opt = c->dopt ? "dist" : "repl", *accum = c->accum ? "yes" : "no";
        const char *disp = c->dispatcher ? c->dispatcher : "-";
        bool const nodes = c->lay->ranks_per_node != 0;
        bool const cp = c->lay->cp != 0 && !nodes, pp = c->lay->pp != 0 && !cp && !nodes;
        bool const ep = c->dispatcher != NULL && !pp && !cp && !nodes;
        ept.cases += ep;
        ppt.cases += pp;
        cpt.cases += cp;
        ndt.cases += nodes;
        if (!c->ran) {
            print_row(c->lay->name, ranks, disp, opt, mbgb, accum, cap, -1, NULL, 0, "NOT RUN");
            continue;
        }
        ran++;
        passed += c->passed;
        worst_loss = fmax(worst_loss, c->cmp.max_rel_loss);
        worst_param = fmax(worst_param, c->cmp.max_abs_param);
        worst_rel = fmax(worst_rel, c->cmp.max_rel_param);
        worst_gnorm = fmax(worst_gnorm, c->cmp.max_rel_gnorm);
        if (c->passed && c->cmp.max_margin_drift > worst_drift) {
            worst_drift = c->cmp.max_margin_drift;
            worst_drift_case = c->name;
        }
        if (c->passed && c->cmp.min_ref_margin >= 0 &&
            (least_margin < 0 || c->cmp.min_ref_margin < least_margin)) {
            least_margin = c->cmp.min_ref_margin;
            least_margin_case = c->name;
        }
        if (cp) tally_add(&cpt, c);
        if (nodes) tally_add(&ndt, c);
        if (pp) tally_add(&ppt, c);
        if (ep) tally_add(&ept, c);
        char result[96] = "ok";
        if (!c->passed && c->cmp.first_bad_step)
            snprintf(result, sizeof result, "FAIL (from step %d, reference margin %.2e)",
                     c->cmp.first_bad_step, c->cmp.first_bad_margin);
        else if (!c->passed)
            snprintf(result, sizeof result, "FAIL");
        print_row(c->lay->name, ranks, disp, opt, mbgb, accum, cap, c->max_dropped, &c->cmp,
                  c->seconds, result);
    }
    if (g_calib_ran)
        print_row("1 rank, 1-ulp init", 1, "-", "-", "4x2/8", "yes", "1.0 position", -1,
                  &g_calib, 0, "(calibration)");
    struct coverage v;
    coverage(&v);
    printf("%d of %d cases ran, %d passed; %d 1-rank references; worst over layouts: relative "
           "loss %.2e, absolute parameter %.2e, relative parameter %.2e, relative grad_norm "
           "%.2e; %.1f s in all\n", ran, g_ncases, passed, g_nrefs, worst_loss, worst_param,
           worst_rel, worst_gnorm, total_s);
    printf("coverage (MARGIN_MIN %g): %d of %d (case, step) pairs compared (%.1f%%, at least "
           "%.0f%% required); all %d steps and the final parameters in %d of %d dropless, %d "
           "of %d position, %d of %d probs cases (at least %d of each policy required); "
           "fewest steps in a case: %d (at least %d required)\n", g_margin_min, v.compared,
           v.pairs, v.pairs ? 100.0 * v.compared / v.pairs : 0.0, 100.0 * MIN_COVERAGE, STEPS,
           v.full[0], v.total[0], v.full[1], v.total[1], v.full[2], v.total[2],
           MIN_FULL_CAPACITY, v.fewest, MIN_CASE_STEPS);
    printf("decision margins over the compared steps of the passing cases: smallest in a "
           "reference %.2e (%s); largest change of a layout's margin from its reference's "
           "%.2e (%s; MARGIN_MIN is %.2g times that)\n", least_margin, least_margin_case,
           worst_drift, worst_drift_case, worst_drift > 0 ? g_margin_min / worst_drift : INFINITY);
    printf("expert-parallel layouts: %d layouts x 2 dispatchers x 3 (dropless, capacity 1.0 "
           "position, probs), and %d layouts x alltoall with MPI messages only x 3 = %d cases, "
           "%d passed; worst: relative loss %.2e, absolute parameter %.2e, relative grad_norm "
           "%.2e; %.1f s\n", (int)NEP_LAYOUTS, (int)NMPI_LAYOUTS, ept.cases, ept.passed,
           ept.loss, ept.param, ept.gnorm, ept.seconds);
    printf("pipeline layouts: %d layouts x dropless, capacity 1.0 position (and probs with 2 "
           "layers) = %d cases, %d passed; worst: relative loss %.2e, absolute parameter %.2e, relative "
           "grad_norm %.2e; %.1f s\n", (int)NPP_LAYOUTS, ppt.cases, ppt.passed, ppt.loss,
           ppt.param, ppt.gnorm, ppt.seconds);
    printf("context-parallel layouts: %d layouts x 3 (dropless, capacity 1.0 position, probs) "
           "= %d cases, %d passed; worst: relative loss %.2e, absolute parameter %.2e, "
           "relative grad_norm %.2e; %.1f s\n", (int)NCP_LAYOUTS, cpt.cases, cpt.passed,
           cpt.loss, cpt.param, cpt.gnorm, cpt.seconds);
    printf("emulated nodes of 2 ranks over TCP: %d layouts x 3 (dropless, capacity 1.0 "
           "position, probs) = %d cases, %d passed; worst: relative loss %.2e, absolute "
           "parameter %.2e, relative grad_norm %.2e; %.1f s\n", (int)NNODE_LAYOUTS, ndt.cases,
           ndt.passed, ndt.loss, ndt.param, ndt.gnorm, ndt.seconds);
}

/* ---------------------------------------------------------------- main */

static int suite_init(void)
{
    return tu_env_init(&g_env, "test_equivalence", "vdist_eq_");
}

static int suite_clean(void)
{
    if (!getenv("VDIST_EQ_KEEP")) tu_tmpdir_remove(g_env.tmp);
    tu_run_free(&g_run);
    return 0;
}

int main(void)
{
    const char *const sd = getenv("VDIST_EQ_SEED");
    if (sd && *sd) {
        char *end = NULL;
        long const v = strtol(sd, &end, 10);
        if (*end || v < 0 || v > INT_MAX - 1) {
            fprintf(stderr, "test_equivalence: VDIST_EQ_SEED=%s is not a seed\n", sd);
            return 2;
        }
        g_seed = (int)v;
    }
    set_variants();
    const char *const mm = getenv("VDIST_EQ_MARGIN_MIN");
    if (mm && *mm) {
        char *end = NULL;
        g_margin_min = strtod(mm, &end);
        if (*end || !(g_margin_min >= 0)) {
            fprintf(stderr, "test_equivalence: VDIST_EQ_MARGIN_MIN=%s is not a number >= 0\n", mm);
            return 2;
        }
    }
    setenv("OMP_NUM_THREADS", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    build_cases();
    /* The cases are known only now (build_cases), so the list is filled here: four fixed
     * tests, one per case (test_case finds its case by the test's name), the coverage. */
    static struct tu_test tests[4 + MAX_CASES + 1] = {
        {"1-rank reference (makes the shared synthetic dataset)", test_first_reference},
        {"negative control: a reference with another seed is told apart",
         test_negative_control},
        {"negative control: other dropping decisions are told apart",
         test_negative_control_dropping},
        {"calibration: the 1-rank run from 1-ulp perturbed initial weights agrees at the "
         "comparable steps, from the unperturbed ones reproduces the reference",
         test_calibration},
    };
    size_t ntests = 4;
    for (int i = 0; i < g_ncases; i++)
        tests[ntests++] = (struct tu_test){g_cases[i].name, test_case};
    tests[ntests++] = (struct tu_test){
        "coverage: enough steps compared under the decision-margin rule", test_coverage};
    static struct tu_suite suite = {
        .name = "layouts match the 1-rank run",
        .init = suite_init,
        .clean = suite_clean,
        .tests = tests,
        .timing = TU_UNTIMED,
        .report = print_summary,
        .program = "test_equivalence",
    };
    suite.ntests = ntests;
    return tu_cunit_main(&suite);
}
