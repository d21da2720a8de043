/* The whole model's gradients against finite differences of its own forward, on a tiny
 * configuration (V 16, d 8, H 2, G 1 (hd 4), F 6, L 2, E 4, k 2, B 2, T 5: 1,896 parameter
 * elements, every one of them checked): dropless, and with capacity dropping (factor 0.5,
 * C = 3 of ~5 assignments per expert) under both policies. The loss is
 * lm + aux + z of one micro-batch (par_stage_forward's stats), the gradient
 * par_stage_backward(1) after
 * par_zero_grads. The router loss coefficients are made large (alpha 0.5, beta 0.1) so the
 * aux and z terms carry a visible share of the gradient; a separate test isolates each of
 * them (the gradient at coefficient c minus the gradient at 0, against the finite difference
 * of that loss term alone), and a last one shows the checker catches a wrong z term, a
 * missing aux term and a single wrong element.
 *
 * Routing (top-k, capacity) is piecewise constant in the parameters: the loss jumps where a
 * perturbation changes a selection. Every perturbed forward's routing (each layer's top-k
 * experts and kept/dropped flags) is compared with the unperturbed one; when it differs the
 * element is retried at a quarter of the step, twice, and skipped if it still differs.
 * Skips are counted and fewer than 5% of the elements may be skipped. */
#include <CUnit/Basic.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/dist.h"
#include "parallel/parallel.h"

enum { V = 16, D = 8, NH = 2, NKV = 1, F = 6, NL = 2, NE = 4, TOPK = 2, B = 2, T = 5,
       N = B * T };

#define SEED 20240611u
/* model_init_params draws N(0, 0.02) (o_proj, w2: 0.01 at L = 2): activations of ~0.05
 * would leave the loss almost flat (logits ~0, router probabilities ~1/E) and the gradients
 * tiny next to the fp32 rounding of the loss. x15 gives weights of std 0.3 (0.15), so with
 * d = 8 every projection, router logit and lm logit is O(1). */
#define WEIGHT_SCALE 15.0f
/* Norm weights are 1 + 0.2 N(0, 1) instead of exactly 1, so a backward that drops a factor
 * g (or uses g = 1) cannot pass by accident. */
#define NORM_JITTER 0.2f
#define ALPHA 0.5
#define BETA 0.1

/* Finite difference: the 4-point (Richardson) stencil
 *     fd = [8 (L(p+h) - L(p-h)) - (L(p+2h) - L(p-2h))] / (12 h),
 * h = 1e-2 max(1, |p|) (all |p| here are below ~1.5, so h ~ 1e-2), each step the one
 * actually taken in fp32. Its error is
 *   - truncation, O(h^4 f^(5)): the plain central difference's h^2 f'''/6 was measured up
 *     to 3% on embedding rows (rmsnorm of a row of rms ~0.3 makes a step of 1e-2 a 3%
 *     change of the normalised row); the 4-point stencil brings it to ~2e-4 relative;
 *   - rounding: the loss comes out of a chain of fp32 kernels; its jitter delta (measured
 *     as the residual of a linear fit over 41 steps of 1e-6) has rms 3e-8 and max 1.6e-7
 *     (loss ~5). The stencil turns it into at most (16 + 2) delta / (12 h) = 1.5 delta / h,
 *     ~2.4e-5 at h = 1e-2, independent of the element's own gradient.
 * Smaller h raises the rounding term (at 2e-3 it reached the tolerance on small expert
 * gradients); larger h changes routing more often (at 2e-2, up to 17% of the elements
 * flipped it, depending on the seed). */
#define H_REL 1e-2
#define RETRIES 2 /* when routing changes: retry at h/4, then h/16 */

/* Pass: |fd - g| <= TOL_REL max(|fd|, |g|) + TOL_ABS max |g| over the tensor + NOISE / h.
 * NOISE / h bounds the rounding term (1.5 delta_max = 2.4e-7 measured; 5e-7 leaves 2x for
 * other BLAS kernels and thread counts), growing as the retries shrink h. TOL_REL covers
 * the truncation (<= 2e-4 measured) and the backward's own fp32 rounding (~1e-6) with
 * ample margin; TOL_ABS judges elements of near-zero gradient at the tensor's scale (a
 * gradient made of cancelling terms carries the rounding of those terms). Over 10 seeds x
 * 3 variants (57k element checks) the worst error was 0.15 of this tolerance; a plain
 * 2e-2 relative + 2e-3 of the tensor's max (no noise term) would be 4x looser on large
 * elements yet tighter than the rounding on tensors of small gradient. A missing or wrong
 * term of the backward, or a 2% error in one large element, exceeds it:
 * test_checker_detects shows it. */
#define TOL_REL 5e-3
#define TOL_ABS 1e-3
#define NOISE 5e-7
#define MAX_SKIP_FRAC 0.05

static int inputs[N], targets[N];

static struct model_config make_cfg(double cf, enum model_drop_policy pol, double alpha,
                                    double beta)
{
    struct model_config c;
    model_config_defaults(&c);
    c.vocab_size = V;
    c.hidden_size = D;
    c.intermediate_size = F;
    c.num_hidden_layers = NL;
    c.num_attention_heads = NH;
    c.num_key_value_heads = NKV;
    c.num_local_experts = NE;
    c.num_experts_per_tok = TOPK;
    c.router_aux_loss_coef = alpha;
    c.router_z_loss_coef = beta;
    c.moe_capacity_factor = cf;
    c.moe_drop_policy = pol;
    return c;
}

/* The activation set of the model under test (one micro-batch in flight). */
static struct par_acts acts;

static void model_setup(struct par_model *pm, const struct model_config *cfg)
{
    struct model_layout lay;
    model_layout_serial(&lay, NL);
    struct par_groups groups;
    struct par_options const opt = {0};
    par_groups_serial(&groups);
    CU_ASSERT_FATAL(model_config_validate(cfg) == 0);
    CU_ASSERT_FATAL(par_model_init(pm, cfg, &lay, &groups, &opt, B, T) == 0);
    par_acts_init(&acts, pm);
    model_init_params(&pm->tab, pm->params, SEED, NL);
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        float *p = pm->params + t->offset;
        for (size_t j = 0; j < t->numel; j++)
            p[j] = t->ndim == 2 ? p[j] * WEIGHT_SCALE
                                : 1.0f + NORM_JITTER * model_init_normal(SEED + 1, t->name, j);
    }
}

enum loss_part { LOSS_TOTAL, LOSS_AUX, LOSS_Z };

static double forward_loss(struct par_model *pm, enum loss_part part)
{
    par_stage_forward(pm, &acts, inputs, targets, NULL, NULL);
    struct par_mb_stats const st = acts.stats;
    switch (part) {
    case LOSS_AUX: return st.aux_loss;
    case LOSS_Z: return st.z_loss;
    default: return st.lm_loss + st.aux_loss + st.z_loss;
    }
}

/* Routing of the last forward: per layer, each (token, slot)'s expert and kept flag (on
 * one rank the local rows are the whole micro-batch). */
struct routing {
    int topk[NL][N * TOPK];
    unsigned char kept[NL][N * TOPK];
};

static void routing_get(const struct par_acts *a, struct routing *r)
{
    memset(r, 0, sizeof *r);
    for (int l = 0; l < NL; l++)
        for (int s = 0; s < N * TOPK; s++) {
            r->topk[l][s] = a->blocks[l].rtopk[s];
            r->kept[l][s] = a->blocks[l].kept[s];
        }
}

static bool routing_same(const struct par_acts *a, const struct routing *r)
{
    struct routing now;
    routing_get(a, &now);
    return memcmp(&now, r, sizeof now) == 0;
}

/* Forward and backward (loss scale 1) at the current parameters of the model configured
 * with router loss coefficients alpha, beta (the model's own are restored after: a
 * gradient taken with other coefficients is wrong on purpose, or isolates a term); the
 * gradient is copied to a new buffer. */
static float *gradient(struct par_model *pm, struct par_mb_stats *st, double alpha,
                       double beta)
{
    struct model_config const keep = pm->cfg;
    pm->cfg.router_aux_loss_coef = alpha;
    pm->cfg.router_z_loss_coef = beta;
    par_stage_forward(pm, &acts, inputs, targets, NULL, NULL);
    *st = acts.stats;
    par_zero_grads(pm);
    par_stage_backward(pm, &acts, NULL, NULL, 1.0f, false);
    pm->cfg = keep;
    float *g = vd_alloc(pm->tab.numel * sizeof(float));
    memcpy(g, pm->grads, pm->tab.numel * sizeof(float));
    return g;
}

/* (L(x + h) - L(x - h)) / (the step actually taken); false when the +h or -h forward
 * routes differently from r0. */
static bool central(struct par_model *pm, float *x, double h, enum loss_part part,
                    const struct routing *r0, double *fd)
{
    float const x0 = *x, xp = (float)(x0 + h), xn = (float)(x0 - h);
    *x = xp;
    double const lp = forward_loss(pm, part);
    bool same = routing_same(&acts, r0);
    *x = xn;
    double const ln = forward_loss(pm, part);
    same = same && routing_same(&acts, r0);
    *x = x0;
    *fd = (lp - ln) / ((double)xp - (double)xn);
    return same;
}

/* The 4-point estimate (4 c(h) - c(2h)) / 3 of d part / d x, at the first step of h, h/4,
 * h/16 whose four forwards all route like r0; false when none does. */
static bool fd_element(struct par_model *pm, float *x, enum loss_part part,
                       const struct routing *r0, double *fd, double *h_used)
{
    double h = H_REL * fmax(1.0, fabs(*x));
    for (int a = 0; a <= RETRIES; a++, h /= 4) {
        double c1, c2;
        if (!central(pm, x, h, part, r0, &c1) || !central(pm, x, 2 * h, part, r0, &c2))
            continue;
        *fd = (4 * c1 - c2) / 3;
        *h_used = h;
        return true;
    }
    return false;
}

struct fd_stats {
    long checked, reduced, skipped, failed;
    double worst;    /* max over checked elements of |fd - g| / tolerance */
    double max_err;  /* max |fd - g| */
    long first_fail; /* flat index of the first failing element, -1 if none */
};

static bool is_router(const struct model_tensor *t) { return t->kind == MODEL_T_ROUTER; }

/* Compares grad (tab.numel floats, the analytic gradient of `part`) with finite
 * differences of `part` for every element of the tensors `want` accepts (NULL: all).
 * Prints one line per tensor `show` accepts: elements, retried at a reduced step, skipped,
 * max |g|, max |fd - g|, worst error / tolerance; and the first mismatches. */
static struct fd_stats fd_check(struct par_model *pm, const float *grad, enum loss_part part,
                                bool (*want)(const struct model_tensor *),
                                bool (*show)(const struct model_tensor *))
{
    struct fd_stats s = {.first_fail = -1};
    struct routing r0;
    (void)forward_loss(pm, part);
    routing_get(&acts, &r0);
    printf("\n    %-52s %4s %4s %4s %9s %9s %7s", "tensor", "n", "red", "skip", "max|g|",
           "max|fd-g|", "err/tol");
    for (int i = 0; i < pm->tab.count; i++) {
        const struct model_tensor *t = &pm->tab.t[i];
        if (want && !want(t)) continue;
        float *p = pm->params + t->offset;
        const float *g = grad + t->offset;
        double gmax = 0.0, emax = 0.0, worst = 0.0;
        long skipped = 0, reduced = 0;
        for (size_t j = 0; j < t->numel; j++) gmax = fmax(gmax, fabs(g[j]));
        for (size_t j = 0; j < t->numel; j++) {
            double fd, h;
            if (!fd_element(pm, p + j, part, &r0, &fd, &h)) {
                skipped++;
                continue;
            }
            reduced += h < H_REL * fmax(1.0, fabs(p[j]));
            double const err = fabs(fd - g[j]);
            double const tol =
                TOL_REL * fmax(fabs(fd), fabs(g[j])) + TOL_ABS * gmax + NOISE / h;
            emax = fmax(emax, err);
            worst = fmax(worst, err / tol);
            if (err > tol) {
                if (s.failed < 10)
                    printf("\n    MISMATCH %s[%zu]: analytic %.6g, finite difference %.6g "
                           "(step %.3g, tensor max |g| %.3g)", t->name, j, g[j], fd, h, gmax);
                if (s.first_fail < 0) s.first_fail = (long)(t->offset + j);
                s.failed++;
            }
            s.checked++;
        }
        s.skipped += skipped;
        s.reduced += reduced;
        s.worst = fmax(s.worst, worst);
        s.max_err = fmax(s.max_err, emax);
        if (!show || show(t))
            printf("\n    %-52s %4zu %4ld %4ld %9.3g %9.3g %7.3f", t->name, t->numel, reduced,
                   skipped, gmax, emax, worst);
    }
    printf("\n    checked %ld (%ld at a reduced step), skipped %ld (routing changed), "
           "failed %ld, worst err/tol %.3f, max |fd-g| %.3g", s.checked, s.reduced, s.skipped,
           s.failed, s.worst, s.max_err);
    (void)forward_loss(pm, LOSS_TOTAL); /* leave the unperturbed activations */
    return s;
}

static double tensor_max(const struct model_tensor *t, const float *g)
{
    double m = 0.0;
    for (size_t j = 0; j < t->numel; j++) m = fmax(m, fabs(g[t->offset + j]));
    return m;
}

/* Every expert of every layer keeps at least one assignment (so each tensor has a gradient
 * to check); capacity runs drop some, dropless runs none. */
static void check_routing_coverage(const struct par_acts *a, bool expect_drops)
{
    for (int l = 0; l < NL; l++) {
        int cnt[NE] = {0};
        for (int s = 0; s < N * TOPK; s++)
            if (a->blocks[l].kept[s]) cnt[a->blocks[l].rtopk[s]]++;
        for (int e = 0; e < NE; e++) CU_ASSERT(cnt[e] > 0);
        if (expect_drops) {
            CU_ASSERT(a->blocks[l].dropped > 0);
        } else {
            CU_ASSERT_EQUAL(a->blocks[l].dropped, 0);
        }
    }
}

/* Kept flags the `position` policy would give for the routing of the last forward. */
static bool probs_differs_from_position(const struct par_acts *a)
{
    int const C = (int)ceil(0.5 * N * TOPK / NE);
    bool differs = false;
    for (int l = 0; l < NL; l++) {
        int fill[NE] = {0};
        for (int s = 0; s < N * TOPK; s++) {
            bool const pos_kept = fill[a->blocks[l].rtopk[s]]++ < C;
            differs |= pos_kept != (a->blocks[l].kept[s]);
        }
    }
    return differs;
}

static void check_variant(double cf, enum model_drop_policy pol)
{
    struct model_config const cfg = make_cfg(cf, pol, ALPHA, BETA);
    struct par_model pm;
    model_setup(&pm, &cfg);
    struct par_mb_stats st;
    float *grad = gradient(&pm, &st, ALPHA, BETA);
    printf("\n    losses: lm %.5f aux %.5f z %.5f, dropped %ld + %ld", st.lm_loss, st.aux_loss,
           st.z_loss, acts.blocks[0].dropped, acts.blocks[1].dropped);
    CU_ASSERT(isfinite(st.lm_loss) && st.aux_loss > 0.0 && st.z_loss > 0.0);
    check_routing_coverage(&acts, cf > 0.0);
    if (cf > 0.0 && pol == MODEL_DROP_PROBS) CU_ASSERT(probs_differs_from_position(&acts));

    /* Not all zero: every tensor, router included, gets a gradient. */
    for (int i = 0; i < pm.tab.count; i++) {
        double const gmax = tensor_max(&pm.tab.t[i], grad);
        if (!(gmax > 1e-4)) printf("\n    %s: gradient ~zero (max %.3g)", pm.tab.t[i].name, gmax);
        CU_ASSERT(gmax > 1e-4);
    }

    struct fd_stats const s = fd_check(&pm, grad, LOSS_TOTAL, NULL, NULL);
    printf("\n  ");
    CU_ASSERT_EQUAL(s.checked + s.skipped, (long)pm.tab.numel);
    CU_ASSERT(s.skipped < MAX_SKIP_FRAC * (double)pm.tab.numel);
    CU_ASSERT_EQUAL(s.failed, 0);
    free(grad);
    par_acts_free(&acts);
    par_model_free(&pm);
}

static void test_dropless(void) { check_variant(0.0, MODEL_DROP_POSITION); }
static void test_capacity_position(void) { check_variant(0.5, MODEL_DROP_POSITION); }
static void test_capacity_probs(void) { check_variant(0.5, MODEL_DROP_PROBS); }

/* One router loss term alone: the gradient with its coefficient minus the gradient with it
 * zero (the other losses do not depend on it, and routing does not) is the gradient of the
 * term, checked against the finite difference of the term alone over every element (it
 * reaches everything upstream of each router: attention, norms, embedding, layer 0's
 * experts). On each router it must be a sizeable share of the whole gradient. */
static void check_term(double cf, enum model_drop_policy pol, enum loss_part part)
{
    struct model_config const cfg = make_cfg(cf, pol, ALPHA, BETA);
    struct par_model pm;
    model_setup(&pm, &cfg);
    struct par_mb_stats st;
    bool const aux = part == LOSS_AUX;
    float *g_all = gradient(&pm, &st, ALPHA, BETA);
    float *g_without = gradient(&pm, &st, aux ? 0.0 : ALPHA, aux ? BETA : 0.0);
    float *g_term = vd_alloc(pm.tab.numel * sizeof(float));
    for (size_t i = 0; i < pm.tab.numel; i++) g_term[i] = g_all[i] - g_without[i];

    for (int i = 0; i < pm.tab.count; i++) {
        const struct model_tensor *t = &pm.tab.t[i];
        if (!is_router(t)) continue;
        double const term = tensor_max(t, g_term), all = tensor_max(t, g_all);
        printf("\n    %s: max |d %s / dW| %.3g, %.0f%% of max |d loss / dW| %.3g", t->name,
               aux ? "aux" : "z", term, 100.0 * term / all, all);
        CU_ASSERT(term > 0.05 * all);
    }
    struct fd_stats const s = fd_check(&pm, g_term, part, NULL, is_router);
    printf("\n  ");
    CU_ASSERT(s.skipped < MAX_SKIP_FRAC * (double)pm.tab.numel);
    CU_ASSERT_EQUAL(s.failed, 0);
    free(g_all);
    free(g_without);
    free(g_term);
    par_acts_free(&acts);
    par_model_free(&pm);
}

static void test_aux_term(void)
{
    check_term(0.0, MODEL_DROP_POSITION, LOSS_AUX);
    check_term(0.5, MODEL_DROP_PROBS, LOSS_AUX);
}

static void test_z_term(void)
{
    check_term(0.0, MODEL_DROP_POSITION, LOSS_Z);
    check_term(0.5, MODEL_DROP_PROBS, LOSS_Z);
}

/* The checker itself: gradients made wrong on purpose must fail it. */
static void test_checker_detects(void)
{
    struct model_config const cfg = make_cfg(0.5, MODEL_DROP_POSITION, ALPHA, BETA);
    struct par_model pm;
    model_setup(&pm, &cfg);
    struct par_mb_stats st;

    printf("\n    gradient taken with the z coefficient's sign flipped:");
    float *g = gradient(&pm, &st, ALPHA, -BETA);
    struct fd_stats s = fd_check(&pm, g, LOSS_TOTAL, is_router, NULL);
    CU_ASSERT(s.failed > 0);
    free(g);

    printf("\n    gradient taken without the aux term (alpha 0):");
    g = gradient(&pm, &st, 0.0, BETA);
    s = fd_check(&pm, g, LOSS_TOTAL, is_router, NULL);
    CU_ASSERT(s.failed > 0);
    free(g);

    /* One element of layer 1's router, its largest, 2% off. */
    g = gradient(&pm, &st, ALPHA, BETA);
    int const r1 = model_table_find(&pm.tab, "model.layers.1.block_sparse_moe.gate.weight");
    CU_ASSERT_FATAL(r1 >= 0);
    const struct model_tensor *t = &pm.tab.t[r1];
    size_t big = t->offset;
    for (size_t j = t->offset; j < t->offset + t->numel; j++)
        if (fabsf(g[j]) > fabsf(g[big])) big = j;
    printf("\n    %s[%zu] (%.4g) 2%% off:", t->name, big - t->offset, g[big]);
    g[big] *= 1.02f;
    s = fd_check(&pm, g, LOSS_TOTAL, is_router, NULL);
    CU_ASSERT_EQUAL(s.failed, 1);
    CU_ASSERT_EQUAL(s.first_fail, (long)big);
    printf("\n  ");
    free(g);
    par_acts_free(&acts);
    par_model_free(&pm);
}

/* The gradient of one micro-batch's backward alone (gradients zeroed before it). */
static float *grad_copy(const struct par_model *pm)
{
    float *g = vd_alloc(pm->tab.numel * sizeof(float));
    memcpy(g, pm->grads, pm->tab.numel * sizeof(float));
    return g;
}

static size_t count_differing(const float *a, const float *b, size_t n)
{
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return differ;
}

/* Two micro-batches in flight, as a pipeline schedule keeps them: the forwards of A and B
 * (each into its own activation set), then B's backward, then A's, give the same losses
 * and gradients as each micro-batch's forward and backward alone. Nothing a backward reads
 * may live in scratch that a later forward or backward overwrites. Each backward runs on
 * zeroed gradients, so the same operations give the same bits: compared exactly. */
static void test_interleaved_micro_batches(void)
{
    struct model_config const cfg = make_cfg(0.5, MODEL_DROP_PROBS, ALPHA, BETA);
    struct par_model pm;
    model_setup(&pm, &cfg);
    struct par_acts acts_b;
    par_acts_init(&acts_b, &pm);
    const int *in_b = targets, *tg_b = inputs; /* a second micro-batch: roles swapped */

    par_zero_grads(&pm);
    par_stage_forward(&pm, &acts, inputs, targets, NULL, NULL);
    struct par_mb_stats const alone_a = acts.stats;
    par_stage_backward(&pm, &acts, NULL, NULL, 1.0f, false);
    float *ga = grad_copy(&pm);
    par_zero_grads(&pm);
    par_stage_forward(&pm, &acts, in_b, tg_b, NULL, NULL);
    struct par_mb_stats const alone_b = acts.stats;
    par_stage_backward(&pm, &acts, NULL, NULL, 1.0f, false);
    float *gb = grad_copy(&pm);
    CU_ASSERT(alone_a.lm_loss != alone_b.lm_loss); /* two different micro-batches */
    CU_ASSERT(count_differing(ga, gb, pm.tab.numel) > pm.tab.numel / 2);

    par_zero_grads(&pm);
    par_stage_forward(&pm, &acts, inputs, targets, NULL, NULL);
    par_stage_forward(&pm, &acts_b, in_b, tg_b, NULL, NULL);
    CU_ASSERT(memcmp(&acts.stats, &alone_a, sizeof alone_a) == 0);
    CU_ASSERT(memcmp(&acts_b.stats, &alone_b, sizeof alone_b) == 0);
    par_stage_backward(&pm, &acts_b, NULL, NULL, 1.0f, false);
    size_t const differ_b = count_differing(pm.grads, gb, pm.tab.numel);
    par_zero_grads(&pm);
    par_stage_backward(&pm, &acts, NULL, NULL, 1.0f, false);
    size_t const differ_a = count_differing(pm.grads, ga, pm.tab.numel);
    printf("\n    gradient elements differing from the micro-batch alone: B %zu, A %zu of %zu ",
           differ_b, differ_a, pm.tab.numel);
    CU_ASSERT_EQUAL(differ_b, 0);
    CU_ASSERT_EQUAL(differ_a, 0);
    free(ga);
    free(gb);
    par_acts_free(&acts_b);
    par_acts_free(&acts);
    par_model_free(&pm);
}

/* The model cut into two stages on one rank (layer 0 with the embedding; layer 1 with the
 * head), run through the stage entry points: the first stage's output feeds the second,
 * the second's input gradient feeds the first's backward. Losses, the residual stream
 * between them and every tensor's gradient equal the whole model's on this rank exactly:
 * the same operations in the same order. */
static void test_two_stages(void)
{
    struct model_config const cfg = make_cfg(0.5, MODEL_DROP_POSITION, ALPHA, BETA);
    struct par_model whole;
    model_setup(&whole, &cfg);
    par_zero_grads(&whole);
    par_stage_forward(&whole, &acts, inputs, targets, NULL, NULL);
    par_stage_backward(&whole, &acts, NULL, NULL, 1.0f, false);
    struct par_mb_stats const want = acts.stats;

    struct par_groups groups;
    par_groups_serial(&groups);
    struct par_options const opt = {0};
    struct model_layout const lay[2] = {
        {.tp = 1, .ep = 1, .etp = 1, .nchunks = 1, .chunk_end = {1}, .has_embed = true},
        {.tp = 1, .ep = 1, .etp = 1, .nchunks = 1, .chunk_begin = {1}, .chunk_end = {NL},
         .has_head = true}};
    struct par_model st[2];
    struct par_acts sa[2];
    for (int i = 0; i < 2; i++) {
        CU_ASSERT_FATAL(par_model_init(&st[i], &cfg, &lay[i], &groups, &opt, B, T) == 0);
        par_acts_init(&sa[i], &st[i]);
        for (int j = 0; j < st[i].tab.count; j++) { /* the whole model's weights */
            const struct model_tensor *t = &st[i].tab.t[j];
            int const w = model_table_find(&whole.tab, t->name);
            CU_ASSERT_FATAL(w >= 0);
            memcpy(st[i].params + t->offset, whole.params + whole.tab.t[w].offset,
                   t->numel * sizeof(float));
        }
        par_zero_grads(&st[i]);
    }
    float h[N * D], dh[N * D];
    par_stage_forward(&st[0], &sa[0], inputs, NULL, NULL, h);
    par_stage_forward(&st[1], &sa[1], NULL, targets, h, NULL);
    CU_ASSERT(memcmp(h, acts.resid + (size_t)N * D, sizeof h) == 0);
    CU_ASSERT_EQUAL(sa[0].stats.lm_loss, 0.0);
    CU_ASSERT_EQUAL(sa[1].stats.lm_loss, want.lm_loss);
    CU_ASSERT_EQUAL(sa[0].stats.aux_loss + sa[1].stats.aux_loss, want.aux_loss);
    CU_ASSERT_EQUAL(sa[0].stats.z_loss + sa[1].stats.z_loss, want.z_loss);
    par_stage_backward(&st[1], &sa[1], NULL, dh, 1.0f, false);
    par_stage_backward(&st[0], &sa[0], dh, NULL, 1.0f, false);
    size_t differ = 0, checked = 0;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < st[i].tab.count; j++) {
            const struct model_tensor *t = &st[i].tab.t[j];
            const float *g = whole.grads + whole.tab.t[model_table_find(&whole.tab, t->name)].offset;
            differ += count_differing(st[i].grads + t->offset, g, t->numel);
            checked += t->numel;
        }
    printf("\n    %zu of %zu gradient elements differ from the whole model's ", differ, checked);
    CU_ASSERT_EQUAL(checked, whole.tab.numel);
    CU_ASSERT_EQUAL(differ, 0);
    for (int i = 0; i < 2; i++) {
        par_acts_free(&sa[i]);
        par_model_free(&st[i]);
    }
    par_acts_free(&acts);
    par_model_free(&whole);
}

int main(int argc, char **argv)
{
    dist_init(&argc, &argv);
    /* A fixed pseudo-random micro-batch over the whole vocabulary. */
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < N; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        inputs[i] = (int)((x >> 33) % V);
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        targets[i] = (int)((x >> 33) % V);
    }
    CU_initialize_registry();
    CU_pSuite s = CU_add_suite("model gradients vs finite differences", NULL, NULL);
    CU_add_test(s, "dropless: every parameter element", test_dropless);
    CU_add_test(s, "capacity 0.5 position: every parameter element", test_capacity_position);
    CU_add_test(s, "capacity 0.5 probs: every parameter element", test_capacity_probs);
    CU_add_test(s, "aux loss alone: gradient(alpha) - gradient(0)", test_aux_term);
    CU_add_test(s, "z loss alone: gradient(beta) - gradient(0)", test_z_term);
    CU_add_test(s, "the checker catches wrong gradients", test_checker_detects);
    CU_add_test(s, "two micro-batches in flight: same losses and gradients",
                test_interleaved_micro_batches);
    CU_add_test(s, "two stages through the stage entry points: the whole model's numbers",
                test_two_stages);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned const failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    dist_finalize();
    return failures != 0;
}
