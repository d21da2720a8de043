/* The equivalence harness: shared/docs/parallelism.md's invariant, checked end to end.
 *
 * "For a fixed global batch, a run in any valid layout produces the same losses as a run
 * on one rank (gradient accumulation over the same micro-batches) within fp32 rounding,
 * and the same routing and dropping decisions."
 *
 * configs/tiny.ini is trained for 10 steps (--train.steps=10) in every layout of the table
 * below, on 2, 4 and 8 ranks under mpirun, each with the distributed optimizer on and off
 * and with and without gradient accumulation, and compared step by step with a 1-rank run
 * of the same global batch, micro-batch, seed and data:
 *
 *   - loss, lm_loss, aux_loss, z_loss of every step (metrics file) to a relative 1e-5;
 *   - dropped_frac of every step exactly (the dropping decisions must be the same);
 *   - grad_norm of every step to a relative 1e-4 (GNORM_REL_TOL says why);
 *   - the final parameters (train.export_to, gathered by global name from any layout),
 *     tensor by tensor by name, to PARAM_ABS_TOL (see there for the rationale).
 *
 * Layouts: dp2, dp4, dp8, tp2, tp4, tp2 x dp2 (also with the order dp-tp-cp-ep-pp),
 * tp2 x dp4, tp4 x dp2. Runs with model.moe_capacity_factor = 1.0 under both drop
 * policies (position, probs) in six of them check that tokens really are dropped
 * (dropped_frac > 0 in the reference) and that as many are dropped at every step as on
 * one rank (and, through the losses and parameters, the same ones).
 *
 * The 1-rank reference always uses the layout's micro_batch (dropping decisions depend on
 * the micro-batch), and is cached per (micro_batch, global_batch, extra options). A
 * negative control trains the reference with another seed and requires the comparison to
 * tell the two apart, so the harness cannot pass vacuously; a calibration run (the 1-rank
 * run from 1-ulp perturbed initial weights) checks that the tolerances lie above the
 * reference's own sensitivity to rounding.
 *
 * Every child runs with OMP_NUM_THREADS=1 inside one fresh /tmp/vdist_eq_XXXXXX (removed
 * at the end), with data.path empty: the first 1-rank run makes the embedded synthetic
 * dataset runs/synth-v64.bin there, and every later run, on any number of ranks, reads
 * that same file. Multi-rank children run under
 *   mpirun --allow-run-as-root --oversubscribe --bind-to none -np N
 * (8 ranks on a 2-core machine are oversubscribed, which costs time, not correctness).
 * A mismatch prints the full command line of the layout, the step, the field and both
 * values. A summary table (layout, ranks, max relative loss difference, max absolute and
 * relative parameter difference) is printed at the end. */
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <CUnit/Basic.h>
#include <CUnit/CUnit.h>
#include <jansson.h>

#include "launch/launch.h"

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
 * signature. Measured on this machine (capacity 1.0 position, micro_batch 4): the 1-ulp
 * run deviates by 8e-5 with the test's fixed signs, 1.8e-4 with other random signs, both
 * in layer 0, expert 3, unit 23; the layouts by at most 1.6e-4 (the same unit, tp4 x dp2),
 * and by at most 2.6e-5 without dropping.
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

static char g_tmp[64];         /* the shared working directory of every child */
static char g_vdist[PATH_MAX]; /* absolute path of the program */
static char g_root[1024];      /* repository root (for configs/) */
static char g_cmd[16384];       /* the last command, as a user would type it */
static char *g_out;            /* its stdout + stderr */
static int g_rc;               /* its exit status */

/* ---------------------------------------------------------------- helpers */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* g_tmp/name in a rotating static buffer (four live at once). */
static const char *tp(const char *name)
{
    static char buf[4][512];
    static int which;
    which = (which + 1) % 4;
    snprintf(buf[which], sizeof buf[which], "%s/%.400s", g_tmp, name);
    return buf[which];
}

__attribute__((format(printf, 3, 4))) static bool expect_impl(bool ok, unsigned line,
                                                              const char *fmt, ...)
{
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    CU_assertImplementation(ok ? CU_TRUE : CU_FALSE, line, msg, __FILE__, "", CU_FALSE);
    if (!ok) {
        printf("\n  FAILED (line %u): %s\n", line, msg);
        fflush(stdout);
    }
    return ok;
}
#define EXPECT(cond, ...) expect_impl((cond), __LINE__, __VA_ARGS__)

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0, got;
    char *b = malloc(cap);
    while ((got = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (cap - n - 1 == 0) b = realloc(b, cap *= 2);
    }
    fclose(f);
    b[n] = '\0';
    return b;
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* The last `n` characters of s (the end of a child's output holds its error). */
static const char *tail(const char *s, size_t n)
{
    size_t const len = strlen(s);
    return len > n ? s + len - n : s;
}

/* Runs `vdist ARGS` on `ranks` ranks (1: directly, as a user runs one rank; more: under
 * mpirun) inside g_tmp with stdout and stderr captured; returns the exit status (128 +
 * signal when it died of one, 124/137 after the timeout). g_cmd holds a command line that
 * reproduces the run from a shell. */
static int run_vdist(int ranks, const char *args)
{
    char launcher[256] = "";
    if (ranks > 1)
        snprintf(launcher, sizeof launcher,
                 "mpirun --allow-run-as-root --oversubscribe --bind-to none -np %d "
                 "-x OMP_NUM_THREADS ", ranks);
    snprintf(g_cmd, sizeof g_cmd, "cd %s && OMP_NUM_THREADS=1 %s%s %s", g_tmp, launcher,
             g_vdist, args);
    char shell[20480];
    snprintf(shell, sizeof shell,
             "cd '%s' && OMP_NUM_THREADS=1 timeout -k 5 %d %s'%s' %s > '%s/.captured' 2>&1",
             g_tmp, CHILD_TIMEOUT_S, launcher, g_vdist, args, g_tmp);
    int const st = system(shell);
    if (st == -1) g_rc = -1;
    else if (WIFEXITED(st)) g_rc = WEXITSTATUS(st);
    else if (WIFSIGNALED(st)) g_rc = 128 + WTERMSIG(st);
    else g_rc = -1;
    free(g_out);
    g_out = read_file(tp(".captured"));
    if (!g_out) g_out = strdup("");
    unlink(tp(".captured"));
    return g_rc;
}

/* ---------------------------------------------------------------- one training run */

enum { F_LOSS, F_LM, F_AUX, F_Z, F_LOSS_FIELDS, F_DROPPED = F_LOSS_FIELDS, F_GNORM, F_COUNT };
static const char *const field_names[F_COUNT] = {"loss",   "lm_loss",      "aux_loss",
                                                 "z_loss", "dropped_frac", "grad_norm"};

/* What a run left behind: its metrics per step and where its export lies. */
struct run {
    bool ok;                /* exit 0, layout as asked, STEPS complete metrics lines, export */
    char dir[64];           /* under g_tmp: metrics.jsonl, model.safetensors */
    char cmd[16384];        /* the command line that made it */
    double m[STEPS][F_COUNT];
    double seconds;
};

/* Reads dir/metrics.jsonl into r->m; every line must hold every field, steps 1..STEPS. */
static bool read_metrics(struct run *r)
{
    char name[128];
    snprintf(name, sizeof name, "%s/metrics.jsonl", r->dir);
    char *text = read_file(tp(name));
    if (!EXPECT(text != NULL, "`%s` must write its metrics file %s", r->cmd, tp(name)))
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
                    "`%s`: metrics line %d must be a JSON object with \"step\": %d (at most "
                    "%d lines): %s", r->cmd, lines + 1, lines + 1, STEPS, line);
        for (int f = 0; ok && f < F_COUNT; f++) {
            const json_t *v = json_object_get(o, field_names[f]);
            ok = EXPECT(v && json_is_number(v) && isfinite(json_number_value(v)),
                        "`%s`: metrics line %d must hold a finite \"%s\": %s", r->cmd,
                        lines + 1, field_names[f], line);
            if (ok) r->m[lines][f] = json_number_value(v);
        }
        json_decref(o);
        lines++;
    }
    free(text);
    return ok && EXPECT(lines == STEPS, "`%s` must write %d metrics lines, got %d", r->cmd,
                        STEPS, lines);
}

/* Trains tiny.ini for STEPS steps in the given layout, exporting to g_tmp/dir. `extra`:
 * further options (may be ""). Checks the program ran the layout it was asked for (its
 * "layout:" line), on the embedded synthetic data, to the end. */
static void train(struct run *r, const char *dir, int tp_size, int dp, const char *order,
                  bool dopt, int mb, int gb, const char *extra)
{
    memset(r, 0, sizeof *r);
    snprintf(r->dir, sizeof r->dir, "%s", dir);
    char args[4096], order_opt[96] = "";
    if (order) snprintf(order_opt, sizeof order_opt, " --parallel.order=%s", order);
    snprintf(args, sizeof args,
             "train --config %s/configs/tiny.ini --train.steps=%d --train.global_batch=%d "
             "--train.micro_batch=%d --parallel.tp=%d --parallel.distributed_optimizer=%s%s "
             "--train.peak_gflops=1 --log.interval=%d%s%s --log.metrics=%s/metrics.jsonl "
             "--train.export_to=%s",
             g_root, STEPS, gb, mb, tp_size, dopt ? "true" : "false", order_opt, STEPS,
             extra[0] ? " " : "", extra, dir, dir);
    double const t0 = now_s();
    run_vdist(tp_size * dp, args);
    r->seconds = now_s() - t0;
    snprintf(r->cmd, sizeof r->cmd, "%s", g_cmd);
    if (!EXPECT(g_rc == 0, "`%s` must succeed, got exit status %d; the end of its output:\n%s",
                r->cmd, g_rc, tail(g_out, 3000)))
        return;
    /* The program prints "layout: N ranks, attention tp T x cp C x dp D x pp P, ...". */
    int ranks = 0, t = 0, c = 0, d = 0;
    const char *p = strstr(g_out, "layout: ");
    bool const parsed = p && sscanf(p, "layout: %d ranks, attention tp %d x cp %d x dp %d",
                                    &ranks, &t, &c, &d) == 4;
    if (!EXPECT(parsed && ranks == tp_size * dp && t == tp_size && c == 1 && d == dp,
                "`%s` must run %d ranks as tp %d x cp 1 x dp %d; its layout line says: %.200s",
                r->cmd, tp_size * dp, tp_size, dp, p ? p : "(no \"layout:\" line)"))
        return;
    if (!EXPECT(strstr(g_out, "runs/synth-v64.bin"),
                "`%s` must train on the embedded synthetic dataset runs/synth-v64.bin (shared "
                "by every run in %s)", r->cmd, g_tmp))
        return;
    char st[128];
    snprintf(st, sizeof st, "%s/model.safetensors", dir);
    if (!EXPECT(file_exists(tp(st)), "`%s` must export %s", r->cmd, tp(st))) return;
    r->ok = read_metrics(r);
}

/* ---------------------------------------------------------------- parameters */

struct st_set {
    int n;
    char **name;
    int *ndim;
    size_t (*shape)[4];
    size_t *numel;
    float **data;
};

static void st_set_free(struct st_set *s)
{
    for (int i = 0; i < s->n; i++) {
        free(s->name[i]);
        free(s->data[i]);
    }
    free(s->name);
    free(s->ndim);
    free(s->shape);
    free(s->numel);
    free(s->data);
    memset(s, 0, sizeof *s);
}

static bool st_set_load(struct st_set *s, const char *path)
{
    memset(s, 0, sizeof *s);
    ckpt_st_file *f = NULL;
    if (!EXPECT(ckpt_st_open(&f, path) == 0, "ckpt_st_open(%s) must succeed: %s", path,
                vd_err_msg()))
        return false;
    int const n = ckpt_st_count(f);
    s->n = n;
    s->name = calloc((size_t)n, sizeof *s->name);
    s->ndim = calloc((size_t)n, sizeof *s->ndim);
    s->shape = calloc((size_t)n, sizeof *s->shape);
    s->numel = calloc((size_t)n, sizeof *s->numel);
    s->data = calloc((size_t)n, sizeof *s->data);
    bool ok = true;
    for (int i = 0; i < n; i++) {
        const struct ckpt_st_tensor *t = ckpt_st_get(f, i);
        s->name[i] = strdup(t->name);
        s->ndim[i] = t->ndim;
        memcpy(s->shape[i], t->shape, sizeof s->shape[i]);
        s->numel[i] = t->numel;
        s->data[i] = malloc((t->numel ? t->numel : 1) * sizeof(float));
        size_t const rows = t->ndim == 0 ? 1 : t->shape[0];
        size_t const cols = rows ? t->numel / rows : 0;
        ok = ok && EXPECT(t->dtype == CKPT_F32 &&
                              ckpt_st_read_block(f, i, s->data[i], 0, rows, 0, cols) == 0,
                          "tensor '%s' of %s must be F32 and readable: %s", t->name, path,
                          vd_err_msg());
    }
    ckpt_st_close(f);
    return ok;
}

static int st_set_find(const struct st_set *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->name[i], name) == 0) return i;
    return -1;
}

/* ---------------------------------------------------------------- comparison */

struct cmp {
    int loss_bad, dropped_bad, gnorm_bad, param_bad; /* counts of mismatches */
    double max_rel_loss;                  /* over steps and the four loss fields */
    int max_rel_loss_step;
    const char *max_rel_loss_field;
    double max_rel_gnorm;
    double max_abs_param, max_rel_param;
    char max_abs_param_name[128];
    bool params_compared;
};

static double rel_diff(double a, double b)
{
    double const s = fmax(fabs(a), fabs(b));
    return s > 0 ? fabs(a - b) / s : 0.0;
}

/* Compares run `x` with the reference `ref`: every step's losses (relative LOSS_REL_TOL),
 * dropped_frac (exactly), grad_norm (relative GNORM_REL_TOL) and the exported parameters
 * by name (absolute PARAM_ABS_TOL).
 * `report`: print each mismatch (the layout's command line, step, field, both values) as
 * a test failure; without it, only count (the negative control). */
static void compare(const struct run *x, const struct run *ref, bool report, struct cmp *c)
{
    memset(c, 0, sizeof *c);
    c->max_rel_loss_field = "";
    int shown = 0;
    for (int s = 0; s < STEPS; s++) {
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
                    EXPECT(false, "layout `%s`: step %d, %s = %.10g, but the 1-rank reference "
                           "`%s` has %.10g (relative difference %.3g > %g)", x->cmd, s + 1,
                           field_names[f], a, ref->cmd, b, d, LOSS_REL_TOL);
            }
        }
        double const a = x->m[s][F_DROPPED], b = ref->m[s][F_DROPPED];
        if (a != b) {
            c->dropped_bad++;
            if (report && shown++ < 12)
                EXPECT(false, "layout `%s`: step %d, dropped_frac = %.10g, but the 1-rank "
                       "reference `%s` has %.10g: the dropping decisions differ", x->cmd, s + 1,
                       a, ref->cmd, b);
        }
        double const ga = x->m[s][F_GNORM], gb = ref->m[s][F_GNORM], gd = rel_diff(ga, gb);
        c->max_rel_gnorm = fmax(c->max_rel_gnorm, gd);
        if (gd > GNORM_REL_TOL) {
            c->gnorm_bad++;
            if (report && shown++ < 12)
                EXPECT(false, "layout `%s`: step %d, grad_norm = %.10g, but the 1-rank reference "
                       "`%s` has %.10g (relative difference %.3g > %g)", x->cmd, s + 1, ga,
                       ref->cmd, gb, gd, GNORM_REL_TOL);
        }
    }
    if (report && shown > 12)
        printf("  ... %d more mismatches of `%s` not shown\n", shown - 12, x->cmd);
    if (report)
        EXPECT(c->loss_bad == 0 && c->dropped_bad == 0 && c->gnorm_bad == 0,
               "layout `%s`: %d loss values beyond relative %g, %d steps with another "
               "dropped_frac than the reference, %d grad_norms beyond relative %g (max relative "
               "loss difference %.3g, step %d, %s)", x->cmd, c->loss_bad, LOSS_REL_TOL,
               c->dropped_bad, c->gnorm_bad, GNORM_REL_TOL, c->max_rel_loss,
               c->max_rel_loss_step, c->max_rel_loss_field);

    char pa[128], pb[128];
    snprintf(pa, sizeof pa, "%s/model.safetensors", x->dir);
    snprintf(pb, sizeof pb, "%s/model.safetensors", ref->dir);
    struct st_set a, b;
    bool const la = st_set_load(&a, tp(pa)), lb = st_set_load(&b, tp(pb));
    if (la && lb &&
        EXPECT(a.n == b.n && a.n > 0, "layout `%s` exported %d tensors, the reference %d",
               x->cmd, a.n, b.n)) {
        c->params_compared = true;
        shown = 0;
        for (int i = 0; i < b.n; i++) {
            int const j = st_set_find(&a, b.name[i]);
            if (!EXPECT(j >= 0 && a.ndim[j] == b.ndim[i] &&
                            memcmp(a.shape[j], b.shape[i], sizeof a.shape[j]) == 0,
                        "layout `%s`: tensor '%s' must be exported with the reference's shape",
                        x->cmd, b.name[i])) {
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
                    EXPECT(false, "layout `%s`: final parameter %s[%zu] = %.9g, the reference "
                           "`%s` has %.9g (absolute difference %.3g > %g)", x->cmd, b.name[i],
                           at, (double)a.data[j][at], ref->cmd, (double)b.data[i][at], amax,
                           PARAM_ABS_TOL);
            }
        }
        if (report)
            EXPECT(c->param_bad == 0, "layout `%s`: %d of %d tensors differ from the reference "
                   "beyond absolute %g (max %.3g in %s)", x->cmd, c->param_bad, b.n,
                   PARAM_ABS_TOL, c->max_abs_param, c->max_abs_param_name);
    } else {
        c->param_bad++;
    }
    st_set_free(&a);
    st_set_free(&b);
}

/* ---------------------------------------------------------------- references */

/* 1-rank runs, cached per (micro_batch, global_batch, extra options). */
struct ref {
    int mb, gb;
    char extra[256];
    struct run run;
};
#define MAX_REFS 32
static struct ref g_refs[MAX_REFS];
static int g_nrefs;

static const struct run *reference(int mb, int gb, const char *extra)
{
    for (int i = 0; i < g_nrefs; i++)
        if (g_refs[i].mb == mb && g_refs[i].gb == gb && strcmp(g_refs[i].extra, extra) == 0)
            return &g_refs[i].run;
    if (!EXPECT(g_nrefs < MAX_REFS, "more than %d references", MAX_REFS)) return NULL;
    struct ref *r = &g_refs[g_nrefs];
    r->mb = mb;
    r->gb = gb;
    snprintf(r->extra, sizeof r->extra, "%s", extra);
    char dir[32];
    snprintf(dir, sizeof dir, "ref%02d", g_nrefs);
    g_nrefs++;
    /* The optimizer flag is irrelevant on one rank; the default (true) is passed. */
    train(&r->run, dir, 1, 1, NULL, true, mb, gb, extra);
    return &r->run;
}

/* ---------------------------------------------------------------- the layouts */

struct layout {
    const char *name;
    int tp, dp;
    const char *order; /* NULL: the default tp-cp-ep-dp-pp */
};
static const struct layout layouts[] = {
    {"dp2", 1, 2, NULL},
    {"dp4", 1, 4, NULL},
    {"dp8", 1, 8, NULL},
    {"tp2", 2, 1, NULL},
    {"tp4", 4, 1, NULL},
    {"tp2 x dp2", 2, 2, NULL},
    /* The same sizes with DP fastest: the tensor group is ranks {0,2}, not neighbours. */
    {"tp2 x dp2 (dp-tp order)", 2, 2, "dp-tp-cp-ep-pp"},
    {"tp2 x dp4", 2, 4, NULL},
    {"tp4 x dp2", 4, 2, NULL},
};
#define NLAYOUTS (sizeof layouts / sizeof layouts[0])

static const char CAP_POSITION[] = "--model.moe_capacity_factor=1.0 --model.moe_drop_policy=position";
static const char CAP_PROBS[] = "--model.moe_capacity_factor=1.0 --model.moe_drop_policy=probs";

struct eq_case {
    char name[160];
    const struct layout *lay;
    bool dopt, accum;
    int mb, gb;
    const char *extra; /* "" or a capacity setting */
    /* results */
    bool ran, passed;
    struct cmp cmp;
    double seconds;
};
#define MAX_CASES 64
static struct eq_case g_cases[MAX_CASES];
static int g_ncases;

/* Global batch 8 (16 for dp 8, so that every replica still runs two micro-batches with
 * accumulation). With accumulation: micro_batch 2 (dp <= 2) or 1 (dp >= 4), so each
 * replica runs at least two micro-batches; without: micro_batch = global_batch / dp, one
 * micro-batch per replica. */
static void add_case(const struct layout *lay, bool dopt, bool accum, const char *extra,
                     const char *extra_name)
{
    if (g_ncases >= MAX_CASES) return;
    struct eq_case *c = &g_cases[g_ncases++];
    c->lay = lay;
    c->dopt = dopt;
    c->accum = accum;
    c->gb = lay->dp >= 8 ? 16 : 8;
    c->mb = accum ? (lay->dp <= 2 ? 2 : 1) : c->gb / lay->dp;
    c->extra = extra;
    snprintf(c->name, sizeof c->name, "%s, %s optimizer, %s (micro_batch %d, global_batch %d, "
             "%d micro-batch(es) per replica)%s%s", lay->name, dopt ? "distributed" : "replicated",
             accum ? "accumulation" : "no accumulation", c->mb, c->gb, c->gb / (c->mb * lay->dp),
             extra_name ? ", " : "", extra_name ? extra_name : "");
}

static void build_cases(void)
{
    for (size_t l = 0; l < NLAYOUTS; l++)
        for (int dopt = 1; dopt >= 0; dopt--)
            for (int accum = 1; accum >= 0; accum--)
                add_case(&layouts[l], dopt, accum, "", NULL);
    /* Capacity 1.0: C = ceil(N k / E) = N / 2 per expert per micro-batch, so any routing
     * imbalance drops tokens. Tensor-parallel layouts split each micro-batch's tokens over
     * ranks (sequence parallelism), where the decision needs the whole micro-batch. */
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
                    add_case(&layouts[l], cap[i].dopt, cap[i].accum,
                             pol ? CAP_PROBS : CAP_POSITION,
                             pol ? "capacity 1.0 probs" : "capacity 1.0 position");
}

/* ---------------------------------------------------------------- tests */

/* Every child shares g_tmp: the first 1-rank run writes runs/synth-v64.bin there, before
 * any layout runs (so no two jobs race to make it). */
static void test_first_reference(void)
{
    const struct run *r = reference(1, 8, "");
    CU_ASSERT_FATAL(EXPECT(r && r->ok, "the first 1-rank reference must train"));
    EXPECT(file_exists(tp("runs/synth-v64.bin")),
           "the first run must make the embedded synthetic dataset %s", tp("runs/synth-v64.bin"));
    printf("\n    (1-rank reference, micro_batch 1, global_batch 8: %.1f s; lm_loss %.4f -> "
           "%.4f)", r->seconds, r->m[0][F_LM], r->m[STEPS - 1][F_LM]);
}

/* The harness must be able to fail: the same reference re-run agrees bit for bit (the
 * 1-rank run is deterministic, so the tolerances measure layouts, not noise), and a run
 * with another seed is told apart on losses and parameters. */
static void test_negative_control(void)
{
    const struct run *ref = reference(1, 8, "");
    CU_ASSERT_FATAL(ref && ref->ok);
    struct run again, other;
    train(&again, "ctl_same", 1, 1, NULL, true, 1, 8, "");
    if (again.ok) {
        struct cmp c;
        compare(&again, ref, true, &c);
        EXPECT(c.max_rel_loss == 0.0 && c.max_abs_param == 0.0,
               "re-running the 1-rank reference `%s` must reproduce it bit for bit; max "
               "relative loss difference %.3g, max parameter difference %.3g", again.cmd,
               c.max_rel_loss, c.max_abs_param);
    }
    train(&other, "ctl_seed", 1, 1, NULL, true, 1, 8, "--train.seed=2");
    if (other.ok) {
        struct cmp c;
        compare(&other, ref, false, &c);
        printf("\n    (seed 2 against seed 1: %d of %d loss values and %d tensors beyond the "
               "tolerances; max relative loss difference %.3g, max parameter difference %.3g)",
               c.loss_bad, STEPS * F_LOSS_FIELDS, c.param_bad, c.max_rel_loss, c.max_abs_param);
        EXPECT(c.loss_bad >= STEPS && c.param_bad > 0,
               "the comparison must tell a run with seed 2 (`%s`) from the seed-1 reference: "
               "only %d loss values and %d tensors were beyond the tolerances", other.cmd,
               c.loss_bad, c.param_bad);
    }
}

/* The calibration of the tolerances: the 1-rank reference's own sensitivity. Its initial
 * weights (exported by a step at lr 0, which keeps every bit) are perturbed by +-1 ulp
 * each (a fixed pseudo-random sign) and the same 1-rank run is trained from them. What it
 * deviates by is the floor no layout can be asked to beat: the tolerances must lie above
 * it. Capacity 1.0 position, micro_batch 4: the setting of the largest deviation
 * measured across layouts. */
static struct cmp g_calib;
static bool g_calib_ran;

static void test_calibration(void)
{
    const struct run *ref = reference(4, 8, CAP_POSITION);
    CU_ASSERT_FATAL(EXPECT(ref && ref->ok, "the 1-rank reference must train"));
    char args[2048];
    snprintf(args, sizeof args, "train --config %s/configs/tiny.ini --train.steps=1 "
             "--train.lr=0 --train.weight_decay=0 --train.peak_gflops=1 "
             "--train.export_to=calib_init", g_root);
    run_vdist(1, args);
    CU_ASSERT_FATAL(EXPECT(g_rc == 0 && file_exists(tp("calib_init/model.safetensors")),
                           "`%s` must export the initial weights, got exit status %d:\n%s",
                           g_cmd, g_rc, tail(g_out, 3000)));
    struct st_set w;
    CU_ASSERT_FATAL(st_set_load(&w, tp("calib_init/model.safetensors")));
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
    int const rc = ckpt_st_write(tp("calib_init/perturbed.safetensors"), wt, w.n, keys, values, 1);
    free(wt);
    st_set_free(&w);
    CU_ASSERT_FATAL(EXPECT(rc == 0, "writing the perturbed weights must succeed: %s",
                           vd_err_msg()));
    char extra[512];
    snprintf(extra, sizeof extra, "%s --train.init_from=calib_init/perturbed.safetensors",
             CAP_POSITION);
    struct run x;
    train(&x, "calib", 1, 1, NULL, true, 4, 8, extra);
    if (!x.ok) return;
    compare(&x, ref, false, &g_calib);
    g_calib_ran = true;
    printf("\n    (1 rank from 1-ulp perturbed weights: max rel loss diff %.2e (step %d, %s), "
           "max rel grad_norm diff %.2e, max abs param diff %.2e in %s)",
           g_calib.max_rel_loss, g_calib.max_rel_loss_step, g_calib.max_rel_loss_field,
           g_calib.max_rel_gnorm, g_calib.max_abs_param, g_calib.max_abs_param_name);
    EXPECT(g_calib.max_abs_param > 0 && g_calib.max_rel_loss > 0,
           "the perturbed run `%s` must differ from the reference `%s` at all", x.cmd, ref->cmd);
    EXPECT(g_calib.loss_bad == 0 && g_calib.gnorm_bad == 0 && g_calib.dropped_bad == 0 &&
               g_calib.param_bad == 0,
           "the tolerances must lie above the 1-rank run's own sensitivity to 1-ulp "
           "perturbations of its initial weights, or they test noise: `%s` against `%s` has "
           "%d loss values beyond relative %g (max %.3g), %d grad_norms beyond relative %g "
           "(max %.3g), %d steps with another dropped_frac, %d tensors beyond absolute %g "
           "(max %.3g in %s)", x.cmd, ref->cmd, g_calib.loss_bad, LOSS_REL_TOL,
           g_calib.max_rel_loss, g_calib.gnorm_bad, GNORM_REL_TOL, g_calib.max_rel_gnorm,
           g_calib.dropped_bad, g_calib.param_bad, PARAM_ABS_TOL, g_calib.max_abs_param,
           g_calib.max_abs_param_name);
}

static void test_case(void)
{
    /* CUnit test functions take no argument: the case is found by the test's name. */
    CU_pTest const t = CU_get_current_test();
    struct eq_case *c = NULL;
    for (int i = 0; i < g_ncases && !c; i++)
        if (t && strcmp(t->pName, g_cases[i].name) == 0) c = &g_cases[i];
    CU_ASSERT_FATAL(c != NULL);
    double const t0 = now_s();
    const struct run *ref = reference(c->mb, c->gb, c->extra);
    if (!EXPECT(ref && ref->ok, "the 1-rank reference for %s must train", c->name)) return;
    unsigned const failures_before = CU_get_number_of_failures();
    char dir[32];
    snprintf(dir, sizeof dir, "case%02d", (int)(c - g_cases));
    struct run x;
    train(&x, dir, c->lay->tp, c->lay->dp, c->lay->order, c->dopt, c->mb, c->gb, c->extra);
    c->ran = true;
    if (x.ok) {
        compare(&x, ref, true, &c->cmp);
        if (c->extra[0]) {
            double ref_dropped = 0.0;
            for (int s = 0; s < STEPS; s++) ref_dropped = fmax(ref_dropped, ref->m[s][F_DROPPED]);
            EXPECT(ref_dropped > 0.0, "capacity 1.0 must drop tokens in the reference `%s` "
                   "(dropped_frac is 0 at every step): the case checks nothing", ref->cmd);
        }
    }
    c->passed = x.ok && CU_get_number_of_failures() == failures_before;
    c->seconds = now_s() - t0;
    printf("\n    (%.1f s; %d ranks; max rel loss diff %.2e; max abs param diff %.2e)",
           c->seconds, c->lay->tp * c->lay->dp, c->cmp.max_rel_loss, c->cmp.max_abs_param);
}

/* ---------------------------------------------------------------- summary */

static void print_row(const char *layout, int ranks, const char *opt, const char *mbgb,
                      const char *accum, const char *cap, const struct cmp *c,
                      const char *result)
{
    char at[32] = "-";
    if (c && c->max_rel_loss > 0)
        snprintf(at, sizeof at, "s%d %s", c->max_rel_loss_step, c->max_rel_loss_field);
    if (!c) {
        printf("%-24s %5d %-4s %-9s %-5s %-12s %10s %-12s %10s %10s %10s %s\n", layout, ranks,
               opt, mbgb, accum, cap, "-", at, "-", "-", "-", result);
        return;
    }
    printf("%-24s %5d %-4s %-9s %-5s %-12s %10.2e %-12s %10.2e %10.2e %10.2e %s\n", layout,
           ranks, opt, mbgb, accum, cap, c->max_rel_loss, at, c->max_abs_param,
           c->max_rel_param, c->max_rel_gnorm, result);
}

static void print_summary(double total_s)
{
    printf("\nequivalence with the 1-rank run, %d steps of configs/tiny.ini. Tolerances: losses "
           "relative %g, grad_norm relative %g, dropped_frac exact, parameters absolute %g. "
           "mb x n/gb: micro_batch x micro-batches per replica / global_batch. rel loss: max "
           "over steps and loss, lm_loss, aux_loss, z_loss (at: where). rel param: over "
           "elements with |w| >= %g.\n", STEPS, LOSS_REL_TOL, GNORM_REL_TOL, PARAM_ABS_TOL,
           REL_FLOOR);
    printf("%-24s %5s %-4s %-9s %-5s %-12s %10s %-12s %10s %10s %10s %s\n", "layout", "ranks",
           "opt", "mb x n/gb", "accum", "capacity", "rel loss", "at", "abs param",
           "rel param", "rel gnorm", "result");
    double worst_loss = 0, worst_param = 0, worst_rel = 0, worst_gnorm = 0;
    int passed = 0, ran = 0;
    for (int i = 0; i < g_ncases; i++) {
        const struct eq_case *c = &g_cases[i];
        char mbgb[32];
        snprintf(mbgb, sizeof mbgb, "%dx%d/%d", c->mb, c->gb / (c->mb * c->lay->dp), c->gb);
        const char *cap = c->extra == CAP_POSITION ? "1.0 position"
                          : c->extra == CAP_PROBS  ? "1.0 probs"
                                                   : "dropless";
        int const ranks = c->lay->tp * c->lay->dp;
        const char *opt = c->dopt ? "dist" : "repl", *accum = c->accum ? "yes" : "no";
        if (!c->ran) {
            print_row(c->lay->name, ranks, opt, mbgb, accum, cap, NULL, "NOT RUN");
            continue;
        }
        ran++;
        passed += c->passed;
        worst_loss = fmax(worst_loss, c->cmp.max_rel_loss);
        worst_param = fmax(worst_param, c->cmp.max_abs_param);
        worst_rel = fmax(worst_rel, c->cmp.max_rel_param);
        worst_gnorm = fmax(worst_gnorm, c->cmp.max_rel_gnorm);
        print_row(c->lay->name, ranks, opt, mbgb, accum, cap, &c->cmp,
                  c->passed ? "ok" : "FAIL");
    }
    if (g_calib_ran)
        print_row("1 rank, 1-ulp init", 1, "-", "4x2/8", "yes", "1.0 position", &g_calib,
                  "(calibration)");
    printf("%d of %d cases ran, %d passed; %d 1-rank references; worst over layouts: relative "
           "loss %.2e, absolute parameter %.2e, relative parameter %.2e, relative grad_norm "
           "%.2e; %.1f s in all\n", ran, g_ncases, passed, g_nrefs, worst_loss, worst_param,
           worst_rel, worst_gnorm, total_s);
}

/* ---------------------------------------------------------------- main */

static int rm_cb(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(path);
}

static int suite_init(void)
{
    const char *const v = getenv("VDIST");
    const char *const prog = v && *v ? v : "build/vdist";
    if (!realpath(prog, g_vdist) || access(g_vdist, X_OK) != 0) {
        fprintf(stderr, "test_equivalence: the program '%s' is not there or not executable "
                        "(set VDIST or run from the repository root after make)\n", prog);
        return -1;
    }
    if (!getcwd(g_root, sizeof g_root)) return -1;
    char tiny[1100];
    snprintf(tiny, sizeof tiny, "%s/configs/tiny.ini", g_root);
    if (!file_exists(tiny)) {
        fprintf(stderr, "test_equivalence: run from the repository root (configs/tiny.ini "
                        "not found)\n");
        return -1;
    }
    /* Paths go into shell commands inside '...' or bare: refuse any that would break. */
    if (strpbrk(g_root, "'\"\\ $`") || strpbrk(g_vdist, "'\"\\ $`")) {
        fprintf(stderr, "test_equivalence: paths with quotes, blanks or $ are not supported\n");
        return -1;
    }
    snprintf(g_tmp, sizeof g_tmp, "/tmp/vdist_eq_XXXXXX");
    if (!mkdtemp(g_tmp)) {
        fprintf(stderr, "test_equivalence: mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    return 0;
}

static int suite_clean(void)
{
    if (g_tmp[0] && !getenv("VDIST_EQ_KEEP")) nftw(g_tmp, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    free(g_out);
    g_out = NULL;
    return 0;
}

int main(void)
{
    setenv("OMP_NUM_THREADS", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    build_cases();
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("layouts match the 1-rank run", suite_init, suite_clean);
    bool ok = s && CU_add_test(s, "1-rank reference (makes the shared synthetic dataset)",
                               test_first_reference) &&
              CU_add_test(s, "negative control: a reference with another seed is told apart",
                          test_negative_control) &&
              CU_add_test(s, "calibration: the 1-rank run from 1-ulp perturbed initial weights "
                             "stays within the tolerances", test_calibration);
    for (int i = 0; ok && i < g_ncases; i++) ok = CU_add_test(s, g_cases[i].name, test_case);
    if (!ok) {
        CU_cleanup_registry();
        return 1;
    }
    double const start = now_s();
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned const failures = CU_get_number_of_failures();
    unsigned const suites_failed = CU_get_number_of_suites_failed();
    double const took = now_s() - start;
    print_summary(took);
    printf("test_equivalence: %.1f s\n", took);
    CU_cleanup_registry();
    return failures != 0 || suites_failed != 0;
}
