/* Checkpoints and resume, end to end through the real program (`vdist train`, `vdist ckpt
 * latest`, `vdist ckpt verify`) on configs/tiny.ini with --train.global_batch=8:
 *
 *   1. exact resume in the same layout: 6 steps with checkpoints, then the same run to 10
 *      steps resumed from the newest checkpoint; metrics of steps 1..10 and the exported
 *      weights equal a 10-step run's bit for bit (the metrics file drops lines past the
 *      resumed step and appends); again with ckpt.async=true where the program has it;
 *   2. resume into other layouts: saved on 4 ranks (tp2 x dp2, distributed optimizer),
 *      resumed in six others: 2 ranks (ep2, etp1, replicated optimizer), 8 ranks (tp2,
 *      ep4), 4 ranks dp4, 1 rank (replicated optimizer), 4 ranks dp4 with ep4, and 4
 *      ranks tp4 with etp2 x ep2 and the all-gather dispatcher; losses and grad_norm per
 *      step and the final weights against the 1-rank run within the equivalence harness's
 *      tolerances;
 *   3. a crash: a long run with a checkpoint every step is SIGKILLed once two checkpoints
 *      exist; `vdist ckpt latest` names a complete one, `vdist ckpt verify` passes on it,
 *      leftovers of cut-short saves (step_N.tmp.*, a step_N without manifest) are never
 *      chosen, and the resumed run continues bit for bit like an uninterrupted one; on one
 *      rank, and again with pp2 on 2 ranks (4 layers), every rank killed at once;
 *   4. ckpt.keep: interval 1, keep 2, 5 steps leave exactly step_00000004 and
 *      step_00000005;
 *   5. refusals before training: a missing checkpoint directory, a corrupted shard, a
 *      checkpoint of another model, a checkpoint past train.steps;
 *   6. the writing of replicated tensors is spread over their replicas (dp4 without the
 *      distributed optimizer writes shards from more than one rank) and verifies;
 *   7. ckpt.resume=auto falls back, saying so, past a latest checkpoint whose shard is
 *      corrupt, and re-runs the steps after it exactly; `vdist ckpt export` of a
 *      checkpoint loaded with train.init_from gives back its weights bit for bit;
 *   8. pipeline layouts (--model.num_hidden_layers=4): saved on 4 ranks pp2 x dp2
 *      (distributed optimizer), resumed in the same layout bit for bit against its
 *      uninterrupted run (metrics and exported weights), and in pp1, pp4, pp2 x vpp2
 *      (interleaved), pp2 with pp_layers 1,3 and pp2 x tp2 within the tolerances of 2.;
 *      saved on pp2 x vpp2, resumed on 1 rank; each run's layout and pipeline line;
 *   9. pipeline exports: the 4-layer reference's weights loaded with train.init_from into
 *      1 rank, pp2 and pp2 x vpp2, one step at lr 0 with a checkpoint: the step's losses
 *      agree with the 1-rank run's, and train.export_to and `vdist ckpt export` of the
 *      checkpoint hold the 1-rank run's tensors, equal by name.
 *  10. context parallelism: saved on 2 ranks cp2 (ring exchange), resumed in the same layout
 *      bit for bit against its uninterrupted run (metrics and exported weights), and on 1
 *      rank, in cp4 and in cp2 with the all-gather exchange within the tolerances of 2.
 *
 * "Bit for bit" for metrics means every field of every line except the timings (step_ms,
 * tokens_per_s, mfu, moe_layers[].dispatch_ms) compares equal as JSON: the values are the
 * ones the program prints (10 significant digits), so the exported model.safetensors,
 * compared byte for byte, is the real bitwise check.
 *
 * The key that selects the checkpoint to resume from was renamed ckpt.load -> ckpt.resume
 * during development; the suite asks `vdist train --help` which one the program has.
 *
 * Every child runs with OMP_NUM_THREADS=1 inside one fresh /tmp/vdist_resume_XXXXXX
 * (removed at the end unless VDIST_RESUME_KEEP is set), with data.path empty: the first
 * run makes runs/synth-v64.bin there and every later run reads it. Multi-rank children run
 * under mpirun --allow-run-as-root --oversubscribe --bind-to none -np N. Messages are
 * checked with the directory's path replaced by "<TMP>". A failure prints the command
 * line that reproduces it, its exit status and its output. */
#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
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

#include <CUnit/CUnit.h>
#include <jansson.h>

#include "ckpt/ckpt.h"
#include "tests/testutil.h"

/* A child that runs longer than this is killed (exit status 124 or 137). */
#define CHILD_TIMEOUT_S 120

/* The equivalence harness's tolerances (tests/test_equivalence.c gives the rationale):
 * losses fp32-close across layouts, grad_norm a little looser, and the parameters after
 * 10 AdamW steps at lr 1e-2 to an absolute 1e-3 (AdamW amplifies last-bit differences of
 * near-cancelling gradients; a real fault moves whole tensors by ~lr a step). */
#define LOSS_REL_TOL 1e-5
#define GNORM_REL_TOL 1e-4
#define PARAM_ABS_TOL 1e-3

#define REF_STEPS 10
#define SAVE_STEP 6
#define CRASH_STEPS 400
/* With pp 2 a step and its checkpoint take longer: fewer steps leave the same margin. */
#define CRASH_STEPS_PP 40

static struct tu_env g_env; /* g_env.tmp is the shared working directory of every child */
static struct tu_run g_run; /* the last command, as a user would type it; "<TMP>" output */
static char g_key[32];      /* "ckpt.resume" or "ckpt.load" */

/* ---------------------------------------------------------------- helpers */

#define EXPECT(cond, ...) TU_EXPECT(cond, __VA_ARGS__)

/* g_env.tmp/name in a rotating static buffer (eight live at once). */
static const char *tp(const char *name) { return tu_path(g_env.tmp, name); }
/* g_env.tmp/d/name, the same way. */
static const char *tp2(const char *d, const char *name)
{
    char rel[256];
    snprintf(rel, sizeof rel, "%s/%s", d, name);
    return tp(rel);
}

static bool copy_file(const char *from, const char *to)
{
    size_t n = 0;
    char *b = tu_file_read(from, &n);
    bool const ok = b && tu_file_write(to, b, n, "wb");
    free(b);
    return ok;
}

/* cp -r from to (to must not exist). */
static bool copy_tree(const char *from, const char *to)
{
    char cmd[2 * PATH_MAX + 32];
    snprintf(cmd, sizeof cmd, "cp -r '%s' '%s'", from, to);
    return system(cmd) == 0;
}

/* The sorted names of dir's entries (without . and .., and without the `latest` pointer,
 * which test_keep checks on its own), joined by ' '; "" when empty or missing. */
static void list_dir(const char *dir, char *out, size_t cap)
{
    out[0] = '\0';
    struct dirent **names = NULL;
    int const n = scandir(dir, &names, NULL, alphasort);
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = names[i]->d_name;
        if (strcmp(nm, ".") != 0 && strcmp(nm, "..") != 0 && strcmp(nm, "latest") != 0 &&
            len + strlen(nm) + 2 < cap)
            len += (size_t)snprintf(out + len, cap - len, "%s%s", len ? " " : "", nm);
        free(names[i]);
    }
    free(names);
}

/* "" for one rank (a user runs one rank directly), else the mpirun command line that
 * starts `ranks` ranks, ending in a blank. */
static void mpirun_prefix(char *out, size_t cap, int ranks)
{
    out[0] = '\0';
    if (ranks > 1)
        snprintf(out, cap, "mpirun --allow-run-as-root --oversubscribe --bind-to none -np %d "
                 "-x OMP_NUM_THREADS ", ranks);
}

/* Runs `vdist ARGS` on `ranks` ranks (1: directly, as a user runs one rank; more: under
 * mpirun) inside g_env.tmp with stdout and stderr captured; returns the exit status (128 +
 * signal when it died of one, 124/137 after the timeout). */
__attribute__((format(printf, 2, 3))) static int run_vdist(int ranks, const char *fmt, ...)
{
    char args[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    return tu_vdist_run(&g_run, &g_env, ranks, CHILD_TIMEOUT_S, "%s", args);
}

static bool out_has(const char *s) { return g_run.out && strstr(g_run.out, s) != NULL; }

/* The run succeeded: exit 0. */
#define EXPECT_RAN() \
    EXPECT(g_run.rc == 0, "`%s` must succeed, got exit status %d", g_run.cmd, g_run.rc)

/* A refusal: exit status 1 or 2 (not 0, not a crash or timeout), no training step, and
 * the message contains every string of the NULL-terminated list. */
static const char *const step_lines[] = {"step 1/", "step 7/", NULL};
#define EXPECT_REFUSED(...)                                                           \
    tu_expect_refused_at(__FILE__, __LINE__, &g_run, "any training step", step_lines, \
                         __VA_ARGS__, (const char *)NULL)

/* The options every training run shares: tiny.ini, global batch 8, a constant learning
 * rate (so a run of 6 steps and one of 10 have the same schedule), and a given SGEMM peak
 * (only MFU uses it; measuring it costs half a second a run). */
static const char *base_args(void)
{
    static char buf[1400];
    snprintf(buf, sizeof buf,
             "train --config %s/configs/tiny.ini --train.global_batch=8 "
             "--train.lr_schedule=constant --train.peak_gflops=100",
             g_env.root);
    return buf;
}

/* The step of a checkpoint path ending in step_NNNNNNNN (exactly), or -1. */
static long path_step(const char *path)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    if (strncmp(b, "step_", 5) != 0 || strlen(b) != 13) return -1;
    for (int i = 5; i < 13; i++)
        if (b[i] < '0' || b[i] > '9') return -1;
    return strtol(b + 5, NULL, 10);
}

/* ---------------------------------------------------------------- metrics files */

/* Removes the fields that measure time: the rest is a function of the arithmetic. */
static void strip_timings(json_t *o)
{
    json_object_del(o, "step_ms");
    json_object_del(o, "tokens_per_s");
    json_object_del(o, "mfu");
    json_t *layers = json_object_get(o, "moe_layers");
    for (size_t l = 0; json_is_array(layers) && l < json_array_size(layers); l++)
        json_object_del(json_array_get(layers, l), "dispatch_ms");
}

/* Reads a JSON-lines metrics file, timings removed (tu_jsonl_free it); false (with a
 * failure) when it is missing. */
static bool metrics_read(struct tu_jsonl *m, const char *path, const char *what)
{
    if (!EXPECT(tu_jsonl_read(m, path), "%s: the metrics file %s must exist", what, path))
        return false;
    for (int i = 0; i < m->n; i++)
        if (m->line[i]) strip_timings(m->line[i]);
    return true;
}

static long line_step(const struct tu_jsonl *m, int i)
{
    const json_t *s = m->line[i] ? json_object_get(m->line[i], "step") : NULL;
    return json_is_integer(s) ? (long)json_integer_value(s) : -1;
}

/* The file holds exactly one line per step first..last, in order. */
static bool metrics_steps(const struct tu_jsonl *m, int first, int last, const char *what)
{
    bool ok = EXPECT(m->n == last - first + 1, "%s: the metrics file must hold %d lines "
                     "(steps %d..%d), got %d", what, last - first + 1, first, last, m->n);
    for (int i = 0; ok && i < m->n; i++)
        ok = EXPECT(line_step(m, i) == first + i, "%s: metrics line %d must be a JSON object "
                    "with \"step\": %d: %s", what, i + 1, first + i, m->text[i]);
    return ok;
}

/* Lines of steps first..last (1-based step i on line i - 1) of a and b equal as JSON, the
 * timings aside. Reports the first few differences. */
static bool metrics_equal(const struct tu_jsonl *a, const struct tu_jsonl *b, int first,
                          int last, const char *what)
{
    int bad = 0;
    for (int s = first; s <= last; s++) {
        const json_t *x = s - 1 < a->n ? a->line[s - 1] : NULL;
        const json_t *y = s - 1 < b->n ? b->line[s - 1] : NULL;
        if (x && y && json_equal(x, y)) continue;
        if (bad++ < 3)
            EXPECT(false, "%s: step %d must equal the uninterrupted run bit for bit (timings "
                   "aside):\n    got:  %s\n    want: %s", what, s,
                   s - 1 < a->n ? a->text[s - 1] : "(no line)",
                   s - 1 < b->n ? b->text[s - 1] : "(no line)");
    }
    if (bad > 3) EXPECT(false, "%s: %d steps differ in all", what, bad);
    return bad == 0;
}

static double num(const json_t *o, const char *key)
{
    const json_t *v = o ? json_object_get(o, key) : NULL;
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static double rel_diff(double a, double b)
{
    double const d = fabs(a - b), s = fmax(fabs(a), fabs(b));
    return d == 0.0 ? 0.0 : s > 0.0 ? d / s : INFINITY;
}

/* Steps first..last of a against the 1-rank reference: losses to LOSS_REL_TOL, grad_norm
 * to GNORM_REL_TOL, lr and dropped_frac exactly. *worst_loss and *worst_gnorm take the
 * largest relative differences. */
static bool metrics_close(const struct tu_jsonl *a, const struct tu_jsonl *ref, int first,
                          int last, const char *what, double *worst_loss, double *worst_gnorm)
{
    static const char *const losses[] = {"loss", "lm_loss", "aux_loss", "z_loss"};
    int bad = 0;
    for (int s = first; s <= last; s++) {
        const json_t *x = s - 1 < a->n ? a->line[s - 1] : NULL;
        const json_t *y = s - 1 < ref->n ? ref->line[s - 1] : NULL;
        for (size_t f = 0; f < 4; f++) {
            double const d = rel_diff(num(x, losses[f]), num(y, losses[f]));
            if (!(d <= LOSS_REL_TOL) && bad++ < 4)
                EXPECT(false, "%s: step %d: %s %.10g must be within relative %g of the 1-rank "
                       "run's %.10g (difference %.3g)", what, s, losses[f], num(x, losses[f]),
                       LOSS_REL_TOL, num(y, losses[f]), d);
            if (d > *worst_loss || isnan(d)) *worst_loss = isnan(d) ? INFINITY : d;
        }
        double const g = rel_diff(num(x, "grad_norm"), num(y, "grad_norm"));
        if (!(g <= GNORM_REL_TOL) && bad++ < 4)
            EXPECT(false, "%s: step %d: grad_norm %.10g must be within relative %g of the "
                   "1-rank run's %.10g (difference %.3g)", what, s, num(x, "grad_norm"),
                   GNORM_REL_TOL, num(y, "grad_norm"), g);
        if (g > *worst_gnorm || isnan(g)) *worst_gnorm = isnan(g) ? INFINITY : g;
        static const char *const exact[] = {"lr", "dropped_frac"};
        for (size_t f = 0; f < 2; f++)
            if (!(num(x, exact[f]) == num(y, exact[f])) && bad++ < 4)
                EXPECT(false, "%s: step %d: %s %.10g must equal the 1-rank run's %.10g", what,
                       s, exact[f], num(x, exact[f]), num(y, exact[f]));
    }
    if (bad > 4) EXPECT(false, "%s: %d values out of tolerance in all", what, bad);
    return bad == 0;
}

/* ---------------------------------------------------------------- exported weights */

/* Two safetensors exports, tensor by tensor by name: the same names and shapes, the
 * largest absolute element difference into *max_abs (its tensor into where). */
static bool weights_compare(const char *a_path, const char *b_path, double *max_abs,
                            char *where, size_t where_cap, const char *what)
{
    *max_abs = 0.0;
    where[0] = '\0';
    ckpt_st_file *a = NULL, *b = NULL;
    if (!EXPECT(ckpt_st_open(&a, a_path) == 0, "%s: %s must open: %s", what, a_path,
                vd_err_msg()))
        return false;
    if (!EXPECT(ckpt_st_open(&b, b_path) == 0, "%s: %s must open: %s", what, b_path,
                vd_err_msg())) {
        ckpt_st_close(a);
        return false;
    }
    bool ok = EXPECT(ckpt_st_count(a) == ckpt_st_count(b), "%s: %s holds %d tensors, %s %d",
                     what, a_path, ckpt_st_count(a), b_path, ckpt_st_count(b));
    for (int i = 0; ok && i < ckpt_st_count(a); i++) {
        const struct ckpt_st_tensor *ta = ckpt_st_get(a, i);
        int const j = ckpt_st_find(b, ta->name);
        const struct ckpt_st_tensor *tb = j >= 0 ? ckpt_st_get(b, j) : NULL;
        ok = EXPECT(tb && tb->ndim == ta->ndim && tb->numel == ta->numel &&
                        memcmp(tb->shape, ta->shape, sizeof ta->shape) == 0,
                    "%s: tensor '%s' of %s must be in %s with the same shape", what, ta->name,
                    a_path, b_path);
        if (!ok) break;
        float *x = NULL, *y = NULL;
        ok = EXPECT(tu_st_read_whole(a, i, &x) == 0 && tu_st_read_whole(b, j, &y) == 0,
                    "%s: reading '%s' must succeed: %s", what, ta->name, vd_err_msg());
        for (size_t k = 0; ok && k < ta->numel; k++) {
            double const d = fabs((double)x[k] - (double)y[k]);
            if (d > *max_abs || isnan(d)) {
                *max_abs = isnan(d) ? INFINITY : d;
                snprintf(where, where_cap, "%s", ta->name);
            }
        }
        free(x);
        free(y);
    }
    ckpt_st_close(a);
    ckpt_st_close(b);
    return ok;
}

/* Byte-for-byte equal files; otherwise reports the largest tensor difference. */
static void expect_same_bytes(const char *got, const char *want, const char *what)
{
    size_t na = 0, nb = 0;
    char *a = tu_file_read(got, &na), *b = tu_file_read(want, &nb);
    bool const same = a && b && na == nb && memcmp(a, b, na) == 0;
    free(a);
    free(b);
    if (same) return;
    double d = 0.0;
    char where[256] = "";
    if (tu_file_exists(got) && tu_file_exists(want))
        weights_compare(got, want, &d, where, sizeof where, what);
    EXPECT(false, "%s: %s must equal %s byte for byte (largest difference %.3g in '%s')", what,
           got, want, d, where);
}

/* ---------------------------------------------------------------- the 1-rank reference */

/* 10 steps on one rank with the options `opts`: metrics DIR/metrics.jsonl, export DIR/.
 * Made once per directory (*state: 0 not tried, 1 made, -1 failed); the first run also
 * makes the synthetic dataset. */
static bool one_rank_run(const char *dir, const char *opts, int *state)
{
    if (*state == 0) {
        mkdir(tp(dir), 0755);
        run_vdist(1, "%s %s --train.steps=%d --log.metrics=%s --train.export_to=%s",
                  base_args(), opts, REF_STEPS, tp2(dir, "metrics.jsonl"), tp(dir));
        *state = EXPECT_RAN() && EXPECT(tu_file_exists(tp2(dir, "model.safetensors")),
                                        "`%s` must export %s/model.safetensors", g_run.cmd, dir)
                     ? 1
                     : -1;
    }
    return *state == 1;
}

/* The reference of the 2-layer tiny model, in ref/. */
static bool reference(void)
{
    static int state;
    return one_rank_run("ref", "", &state);
}

/* The pipeline tests' model: 4 layers, so that pp 4 and pp 2 x vpp 2 have a layer a
 * chunk. Its reference is in ref4/. */
#define PP_MODEL "--model.num_hidden_layers=4"
static bool reference_pp(void)
{
    static int state;
    return one_rank_run("ref4", PP_MODEL, &state);
}

/* ---------------------------------------------------------------- 1. same layout */

/* Under directory d (t1, t1a): 6 steps with checkpoints after 4 and 6, then resumed to 10;
 * `extra` options go to both runs. */
static void exact_resume(const char *d, const char *extra)
{
    CU_ASSERT_FATAL(reference());
    struct tu_jsonl ref;
    CU_ASSERT_FATAL(metrics_read(&ref, tp("ref/metrics.jsonl"), "the reference"));
    CU_ASSERT_FATAL(metrics_steps(&ref, 1, REF_STEPS, "the reference"));
    mkdir(tp(d), 0755);
    char ck[64], ckdir[64], ml[64], ex[64], exw[96], want[160];
    snprintf(ck, sizeof ck, "%s/ck", d);
    snprintf(ml, sizeof ml, "%s/metrics.jsonl", d);
    snprintf(ex, sizeof ex, "%s/export", d);
    snprintf(exw, sizeof exw, "%s/export/model.safetensors", d);
    snprintf(ckdir, sizeof ckdir, "%s/ck/step_00000006", d);
    snprintf(want, sizeof want, "resumed from <TMP>/%s at step 6", ckdir);

    /* Steps 1..6, checkpoints after 4 and 6. */
    run_vdist(1, "%s --train.steps=%d --ckpt.dir=%s --ckpt.interval=4 --log.metrics=%s %s",
              base_args(), SAVE_STEP, tp(ck), tp(ml), extra);
    if (!EXPECT_RAN()) goto done;
    char names[4096];
    list_dir(tp(ck), names, sizeof names);
    EXPECT(strcmp(names, "step_00000004 step_00000006") == 0,
           "`%s` must leave checkpoints step_00000004 and step_00000006 (interval 4 and the "
           "last step), got: %s", g_run.cmd, names);

    /* As a run killed after step 6 would have: two lines past the checkpoint, which the
     * resumed run must drop. */
    static const char stale[] = "{\"step\":7,\"loss\":99.0}\n{\"step\":8,\"loss\":98.0}\n";
    CU_ASSERT_FATAL(tu_file_write(tp(ml), stale, sizeof stale - 1, "ab"));

    /* The same run to 10 steps, resumed from the newest checkpoint. */
    run_vdist(1, "%s --train.steps=%d --ckpt.dir=%s --ckpt.interval=4 --%s=auto "
              "--log.metrics=%s --train.export_to=%s %s",
              base_args(), REF_STEPS, tp(ck), g_key, tp(ml), tp(ex), extra);
    if (!EXPECT_RAN()) goto done;
    EXPECT(out_has(want), "`%s` must print \"%s\"", g_run.cmd, want);
    EXPECT(!out_has("step 1/") && !out_has("step 6/") && out_has("step 7/10") &&
               out_has("step 10/10"),
           "`%s` must run steps 7..10 only", g_run.cmd);
    list_dir(tp(ck), names, sizeof names);
    EXPECT(strcmp(names, "step_00000008 step_00000010") == 0,
           "after `%s` (interval 4, keep 2 by default) the checkpoints must be step_00000008 "
           "and step_00000010, got: %s", g_run.cmd, names);

    struct tu_jsonl got;
    if (metrics_read(&got, tp(ml), "the resumed run") &&
        metrics_steps(&got, 1, REF_STEPS, "the resumed run (stale lines 7, 8 dropped)"))
        metrics_equal(&got, &ref, 1, REF_STEPS, "the resumed run's metrics");
    tu_jsonl_free(&got);
    expect_same_bytes(tp(exw), tp("ref/model.safetensors"),
                      "the resumed run's final weights");
done:
    tu_jsonl_free(&ref);
}

static void test_exact_resume(void) { exact_resume("t1", ""); }

/* The same with checkpoints written in the background (ckpt.async), where the program has
 * that key: the checkpoint of step 4 must hold step 4's state although step 5 runs while
 * it is written. */
static bool g_has_async;
static void test_exact_resume_async(void)
{
    if (!g_has_async) {
        printf("\n    (skipped: `vdist train --help` lists no ckpt.async)");
        return;
    }
    exact_resume("t1a", "--ckpt.async=true");
}

/* ---------------------------------------------------------------- 2. other layouts */

/* A layout a run saves or resumes in. */
struct layout {
    const char *name;
    int ranks;
    const char *opts;     /* the options that make it, beside the test's model options */
    const char *layout;   /* rank 0's "layout: ..." line, which the run must print */
    const char *pipeline; /* a part of its "pipeline: ..." line; NULL: none to check */
};

/* The last run printed t's layout (and pipeline). */
static void expect_layout(const struct layout *t)
{
    EXPECT(out_has(t->layout), "`%s` must run the layout \"%s\"", g_run.cmd, t->layout);
    if (!t->pipeline) return;
    EXPECT(out_has(t->pipeline), "`%s` must print the pipeline \"%s\"", g_run.cmd,
           t->pipeline);
    EXPECT(!out_has("pipeline stages: each stage idles"), "`%s` has at least pp micro-batches "
           "a step: it must not warn of an idle pipeline", g_run.cmd);
}

/* The exported weights at `path` within PARAM_ABS_TOL of the reference's; the largest
 * difference into *wparam. */
static void expect_weights_close(const char *path, const char *ref_path, const char *label,
                                 double *wparam)
{
    char where[256] = "";
    if (weights_compare(path, ref_path, wparam, where, sizeof where, label))
        EXPECT(*wparam <= PARAM_ABS_TOL, "%s: the final weights must be within absolute %g "
               "of the 1-rank run's; '%s' differs by %.3g", label, PARAM_ABS_TOL, where,
               *wparam);
}

/* A checkpoint of step SAVE_STEP and what runs resumed from it compare with. */
struct saved {
    const char *dir;              /* the test's directory under g_env.tmp, e.g. "t2" */
    const char *model;            /* model options of every run of the test */
    const struct tu_jsonl *save;  /* the saving run's metrics (DIR/save.jsonl), 1..SAVE_STEP */
    const struct tu_jsonl *ref;   /* metrics of steps 1..REF_STEPS to compare with */
    const char *ref_weights;      /* the final weights to compare with, under g_env.tmp */
};

/* Runs `saver` for SAVE_STEP steps with a checkpoint at the end (DIR/ck) and metrics into
 * DIR/save.jsonl, which *save gets (tu_jsonl_free it, also after false): the layout, the
 * steps against the 1-rank reference within the tolerances, the checkpoint written. */
static bool save_in(const struct layout *saver, const char *dir, const char *model,
                    const struct tu_jsonl *ref, struct tu_jsonl *save)
{
    memset(save, 0, sizeof *save);
    mkdir(tp(dir), 0755);
    char manifest[96], label[160];
    snprintf(manifest, sizeof manifest, "ck/step_%08d/manifest.json", SAVE_STEP);
    snprintf(label, sizeof label, "the save on %s", saver->name);
    run_vdist(saver->ranks, "%s %s --train.steps=%d %s --ckpt.dir=%s --log.metrics=%s",
              base_args(), model, SAVE_STEP, saver->opts, tp2(dir, "ck"),
              tp2(dir, "save.jsonl"));
    if (!EXPECT_RAN()) return false;
    expect_layout(saver);
    if (!metrics_read(save, tp2(dir, "save.jsonl"), label)) return false;
    double wl = 0, wg = 0;
    if (metrics_steps(save, 1, SAVE_STEP, label))
        metrics_close(save, ref, 1, SAVE_STEP, label, &wl, &wg);
    printf("\n    (%s: max rel loss diff %.2e, grad_norm %.2e)", label, wl, wg);
    return EXPECT(tu_file_exists(tp2(dir, manifest)), "`%s` must write %s/%s", g_run.cmd, dir,
                  manifest);
}

/* Resumes s's checkpoint in layout t to REF_STEPS steps (metrics DIR/resumeK.jsonl, export
 * DIR/exportK) and checks that it resumed at SAVE_STEP, kept the saving run's metrics lines,
 * and that steps SAVE_STEP+1..REF_STEPS and the final weights equal s->ref's bit for bit
 * when `exact` (s->ref ran in this layout), else are within the harness's tolerances. */
static void resume_in(const struct saved *s, const struct layout *t, size_t k, bool exact)
{
    char metrics[32], export[32], weights[64], ck[32], want[160], label[160];
    snprintf(metrics, sizeof metrics, "resume%zu.jsonl", k);
    snprintf(export, sizeof export, "export%zu", k);
    snprintf(weights, sizeof weights, "export%zu/model.safetensors", k);
    snprintf(ck, sizeof ck, "ck/step_%08d", SAVE_STEP);
    snprintf(want, sizeof want, "resumed from <TMP>/%s/%s at step %d", s->dir, ck, SAVE_STEP);
    snprintf(label, sizeof label, "resumed on %s", t->name);
    /* The resumed run's file starts as the saving run's: it keeps steps 1..6. */
    CU_ASSERT_FATAL(copy_file(tp2(s->dir, "save.jsonl"), tp2(s->dir, metrics)));
    run_vdist(t->ranks, "%s %s --train.steps=%d %s --%s=%s --log.metrics=%s --train.export_to=%s",
              base_args(), s->model, REF_STEPS, t->opts, g_key, tp2(s->dir, ck),
              tp2(s->dir, metrics), tp2(s->dir, export));
    if (!EXPECT_RAN()) return;
    expect_layout(t);
    EXPECT(out_has(want) && !out_has("step 6/") && out_has("step 7/10"),
           "`%s` must print \"%s\" and run steps 7..10", g_run.cmd, want);
    struct tu_jsonl got;
    double wloss = 0, wgnorm = 0, wparam = 0;
    if (metrics_read(&got, tp2(s->dir, metrics), label) &&
        metrics_steps(&got, 1, REF_STEPS, label)) {
        for (int i = 1; i <= SAVE_STEP; i++)
            EXPECT(strcmp(got.text[i - 1], s->save->text[i - 1]) == 0,
                   "%s: metrics line %d must be kept as the saving run wrote it", label, i);
        if (exact)
            metrics_equal(&got, s->ref, SAVE_STEP + 1, REF_STEPS, label);
        else
            metrics_close(&got, s->ref, SAVE_STEP + 1, REF_STEPS, label, &wloss, &wgnorm);
    }
    tu_jsonl_free(&got);
    if (exact) {
        expect_same_bytes(tp2(s->dir, weights), tp(s->ref_weights), label);
        printf("\n    (%s: compared bit for bit)", label);
        return;
    }
    expect_weights_close(tp2(s->dir, weights), tp(s->ref_weights), label, &wparam);
    printf("\n    (%s: max rel loss diff %.2e, max rel grad_norm diff %.2e, max abs param "
           "diff %.2e)", label, wloss, wgnorm, wparam);
}

static void test_other_layouts(void)
{
    CU_ASSERT_FATAL(reference());
    struct tu_jsonl ref, save;
    CU_ASSERT_FATAL(metrics_read(&ref, tp("ref/metrics.jsonl"), "the reference"));
    static const struct layout saver = {
        "4 ranks tp2 x dp2 (distributed optimizer)", 4,
        "--parallel.tp=2 --parallel.distributed_optimizer=true",
        "layout: 4 ranks, attention tp 2 x cp 1 x dp 2 x pp 1, MoE etp 2 x ep 1 x edp 2 x pp 1",
        NULL};
    if (save_in(&saver, "t2", "", &ref, &save)) {
        static const struct layout targets[] = {
            {"2 ranks ep2 etp1, replicated optimizer", 2,
             "--parallel.ep=2 --parallel.etp=1 --parallel.distributed_optimizer=false",
             "layout: 2 ranks, attention tp 1 x cp 1 x dp 2 x pp 1, MoE etp 1 x ep 2 x edp 1 x "
             "pp 1", NULL},
            {"8 ranks tp2 ep4", 8, "--parallel.tp=2 --parallel.ep=4",
             "layout: 8 ranks, attention tp 2 x cp 1 x dp 4 x pp 1, MoE etp 2 x ep 4 x edp 1 x "
             "pp 1", NULL},
            {"4 ranks dp4", 4, "",
             "layout: 4 ranks, attention tp 1 x cp 1 x dp 4 x pp 1, MoE etp 1 x ep 1 x edp 4 x "
             "pp 1", NULL},
            {"1 rank, replicated optimizer", 1, "--parallel.distributed_optimizer=false",
             "layout: 1 ranks, attention tp 1 x cp 1 x dp 1 x pp 1, MoE etp 1 x ep 1 x edp 1 x "
             "pp 1", NULL},
            {"4 ranks dp4 ep4", 4, "--parallel.ep=4 --parallel.etp=1",
             "layout: 4 ranks, attention tp 1 x cp 1 x dp 4 x pp 1, MoE etp 1 x ep 4 x edp 1 x "
             "pp 1", NULL},
            {"4 ranks tp4 etp2 ep2, all-gather dispatcher", 4,
             "--parallel.tp=4 --parallel.etp=2 --parallel.ep=2 "
             "--model.moe_token_dispatcher_type=allgather",
             "layout: 4 ranks, attention tp 4 x cp 1 x dp 1 x pp 1, MoE etp 2 x ep 2 x edp 1 x "
             "pp 1", NULL},
        };
        struct saved const s = {"t2", "", &save, &ref, "ref/model.safetensors"};
        for (size_t k = 0; k < sizeof targets / sizeof targets[0]; k++)
            resume_in(&s, &targets[k], k, false);
    }
    tu_jsonl_free(&save);
    tu_jsonl_free(&ref);
}

/* Under directory dir, with the model options `model`: targets[0]'s uninterrupted run of
 * REF_STEPS steps (dir/full.jsonl, dir/full) within the tolerances of the 1-rank reference
 * (metrics ref, weights ref_weights under g_env.tmp); its save at SAVE_STEP, equal to that
 * run bit for bit; and that checkpoint resumed in every target: in targets[0] bit for bit
 * against the uninterrupted run, in the others within the tolerances of the reference. */
static void resume_everywhere(const char *dir, const char *model, const struct layout *targets,
                              size_t ntargets, const struct tu_jsonl *ref,
                              const char *ref_weights)
{
    const struct layout *const saver = &targets[0];
    char label[160], full_weights[64];
    snprintf(label, sizeof label, "%s uninterrupted", saver->name);
    snprintf(full_weights, sizeof full_weights, "%s/full/model.safetensors", dir);
    mkdir(tp(dir), 0755);
    run_vdist(saver->ranks, "%s %s --train.steps=%d %s --log.metrics=%s --train.export_to=%s",
              base_args(), model, REF_STEPS, saver->opts, tp2(dir, "full.jsonl"),
              tp2(dir, "full"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    expect_layout(saver);
    struct tu_jsonl full, save;
    CU_ASSERT_FATAL(metrics_read(&full, tp2(dir, "full.jsonl"), label));
    double wl = 0, wg = 0, wp = 0;
    if (metrics_steps(&full, 1, REF_STEPS, label))
        metrics_close(&full, ref, 1, REF_STEPS, label, &wl, &wg);
    expect_weights_close(tp(full_weights), tp(ref_weights), label, &wp);
    printf("\n    (%s: max rel loss diff %.2e, grad_norm %.2e, max abs param diff %.2e)",
           label, wl, wg, wp);

    snprintf(label, sizeof label, "the save on %s", saver->name);
    if (save_in(saver, dir, model, ref, &save) &&
        metrics_equal(&save, &full, 1, SAVE_STEP, label)) {
        struct saved const same = {dir, model, &save, &full, full_weights};
        struct saved const other = {dir, model, &save, ref, ref_weights};
        for (size_t k = 0; k < ntargets; k++)
            resume_in(k == 0 ? &same : &other, &targets[k], k, k == 0);
    }
    tu_jsonl_free(&save);
    tu_jsonl_free(&full);
}

/* ---------------------------------------------------------------- 3. crash */

/* Starts `vdist ARGS` on `ranks` ranks (as run_vdist does) in g_env.tmp in a process group
 * of its own, output to log; returns its pid (= its process group), or -1. */
static pid_t spawn_vdist(int ranks, const char *args, const char *log)
{
    char launcher[256];
    mpirun_prefix(launcher, sizeof launcher, ranks);
    snprintf(g_run.cmd, sizeof g_run.cmd, "cd %s && OMP_NUM_THREADS=1 %s%s %s", g_env.tmp,
             launcher, g_env.vdist, args);
    char shell[16384];
    snprintf(shell, sizeof shell, "exec %s'%s' %s > '%s' 2>&1", launcher, g_env.vdist, args,
             log);
    fflush(stdout);
    pid_t const pid = fork();
    if (pid == 0) {
        setpgid(0, 0);
        if (chdir(g_env.tmp) != 0) _exit(127);
        execl("/bin/sh", "sh", "-c", shell, (char *)NULL);
        _exit(127);
    }
    if (pid > 0) setpgid(pid, pid); /* either side may run first */
    return pid;
}

/* The state letter and parent of process pid from /proc/PID/stat; false when it is gone. */
static bool proc_stat(long pid, char *state, long *ppid)
{
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return false;
    size_t const len = fread(stat, 1, sizeof stat - 1, f);
    fclose(f);
    stat[len] = '\0';
    /* "pid (comm) state ppid ...": the name may hold blanks and parentheses */
    const char *p = strrchr(stat, ')');
    return p && sscanf(p + 1, " %c %ld", state, ppid) == 2;
}

/* The children of pid (at most cap); how many. */
static int children_of(pid_t pid, pid_t *out, int cap)
{
    DIR *d = opendir("/proc");
    int n = 0;
    for (struct dirent *e; d && n < cap && (e = readdir(d));) {
        char *end, state;
        long ppid;
        long const child = strtol(e->d_name, &end, 10);
        if (!*end && child > 0 && proc_stat(child, &state, &ppid) && ppid == pid)
            out[n++] = (pid_t)child;
    }
    if (d) closedir(d);
    return n;
}

/* Whether pid has ended: gone, or a zombie. */
static bool ended(pid_t pid)
{
    char state;
    long ppid;
    return !proc_stat(pid, &state, &ppid) || state == 'Z';
}

/* SIGKILLs a run started by spawn_vdist and waits for it; its wait status into *status.
 * mpirun starts each rank in a process group of its own: they are killed first, by pid,
 * so that no rank outlives the others (a rank left running would go on writing). */
static void kill_run(pid_t pid, int *status)
{
    pid_t ranks[64];
    int const n = children_of(pid, ranks, 64);
    for (int i = 0; i < n; i++) kill(ranks[i], SIGKILL);
    kill(-pid, SIGKILL);
    waitpid(pid, status, 0);
    double const t0 = tu_now_s();
    for (int i = 0; i < n; i++)
        while (!ended(ranks[i]) && tu_now_s() - t0 < 10.0) {
            struct timespec const ts = {0, 2000000};
            nanosleep(&ts, NULL);
        }
}

/* The resumed run's metrics file: the crashed run's lines of steps 1..k (k the checkpoint
 * it resumed from), then its own k+1..steps, one line per step in order, each equal to the
 * uninterrupted run's line bit for bit. Missing steps are named. */
static void crash_metrics_check(const struct tu_jsonl *got, const struct tu_jsonl *full, long k,
                                int steps)
{
    static int count[CRASH_STEPS + 1];
    CU_ASSERT_FATAL(steps <= CRASH_STEPS);
    memset(count, 0, sizeof count);
    bool ordered = true;
    long prev = 0;
    for (int i = 0; i < got->n; i++) {
        long const s = line_step(got, i);
        if (s >= 1 && s <= steps) count[s]++;
        ordered = ordered && s > prev;
        prev = s;
    }
    char missing[512] = "";
    int nmissing = 0, twice = 0;
    size_t len = 0;
    for (int s = 1; s <= steps; s++) {
        twice += count[s] > 1;
        if (count[s] == 0 && nmissing++ < 20 && len + 16 < sizeof missing)
            len += (size_t)snprintf(missing + len, sizeof missing - len, "%s%d",
                                    len ? ", " : "", s);
    }
    EXPECT(nmissing == 0 && twice == 0 && ordered && got->n == steps,
           "the resumed run's metrics file must hold one line per step 1..%d in order (the "
           "crashed run's lines up to the checkpoint's step %ld, then the resumed run's): %d "
           "lines, %d steps missing (%s)%s, %d steps twice, %s%s", steps, k, got->n,
           nmissing, missing, nmissing > 20 ? ", ..." : "", twice,
           ordered ? "in order" : "out of order",
           nmissing == 1 && count[k] == 0
               ? ". Only the checkpoint's own step is missing: the crashed run was killed after "
                 "the checkpoint of that step became complete but before it wrote that step's "
                 "metrics line (the line must be written before its checkpoint is saved), and "
                 "the resumed run starts after it"
               : "");
    /* Every line present, by its step, against the uninterrupted run. */
    int bad = 0;
    for (int i = 0; i < got->n; i++) {
        long const s = line_step(got, i);
        if (s < 1 || s > steps) continue;
        if (got->line[i] && json_equal(got->line[i], full->line[s - 1])) continue;
        if (bad++ < 3)
            EXPECT(false, "the resumed run's metrics: step %ld must equal the uninterrupted "
                   "run bit for bit (timings aside):\n    got:  %s\n    want: %s", s,
                   got->text[i], full->text[s - 1]);
    }
    if (bad > 3) EXPECT(false, "the resumed run's metrics: %d lines differ in all", bad);
}

/* Under directory d, on `ranks` ranks with the options `opts`, `steps` steps: an
 * uninterrupted run, and the same run with a checkpoint every step SIGKILLed once two
 * checkpoints are complete; then what a user finds (`vdist ckpt latest`, `vdist ckpt
 * verify`, leftovers of cut-short saves never chosen) and the resumed run, bit for bit
 * like the uninterrupted one. */
static void crash_resume(const char *d, int ranks, const char *opts, int steps)
{
    mkdir(tp(d), 0755);
    char ck[64], ck_tmp[96];
    snprintf(ck, sizeof ck, "%s/ck", d);
    snprintf(ck_tmp, sizeof ck_tmp, "<TMP>/%s/ck/", d);
    char common[2048];
    /* The cosine schedule (warmup 5) also checks that the resumed run takes the same
     * learning rates: train.steps is the same in every run. */
    snprintf(common, sizeof common,
             "%s %s --train.steps=%d --train.lr_schedule=cosine --train.warmup=5 "
             "--log.interval=1000",
             base_args(), opts, steps);

    /* The uninterrupted run. */
    run_vdist(ranks, "%s --log.metrics=%s --train.export_to=%s", common,
              tp2(d, "full.jsonl"), tp2(d, "full"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    struct tu_jsonl full;
    CU_ASSERT_FATAL(metrics_read(&full, tp2(d, "full.jsonl"), "the uninterrupted run"));
    CU_ASSERT_FATAL(metrics_steps(&full, 1, steps, "the uninterrupted run"));

    /* The run that crashes: a checkpoint after every step, killed (every process, SIGKILL)
     * as soon as two checkpoints are complete. */
    char args[4096];
    snprintf(args, sizeof args, "%s --ckpt.dir=%s --ckpt.interval=1 --log.metrics=%s", common,
             tp(ck), tp2(d, "metrics.jsonl"));
    pid_t const pid = spawn_vdist(ranks, args, tp2(d, "crashed.log"));
    CU_ASSERT_FATAL(pid > 0);
    char latest[PATH_MAX] = "";
    long seen = -1;
    int status = 0;
    bool exited = false;
    double const t0 = tu_now_s();
    while (tu_now_s() - t0 < 60.0) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            exited = true;
            break;
        }
        if (ckpt_latest(tp(ck), latest, sizeof latest) == 0 && latest[0]) {
            seen = path_step(latest);
            if (seen >= 2) break;
        }
        struct timespec const ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    if (!exited) kill_run(pid, &status);
    double const killed_at = tu_now_s() - t0;
    free(g_run.out);
    g_run.out = tu_file_read_masked(tp2(d, "crashed.log"), g_env.tmp);
    g_run.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    g_run.out_shown = false;
    CU_ASSERT_FATAL(EXPECT(!exited && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL &&
                               seen >= 2,
                           "`%s` must still be running when its second checkpoint appears, "
                           "and die of SIGKILL (it %s; newest checkpoint seen: step %ld)",
                           g_run.cmd, exited ? "exited on its own" : "was killed", seen));
    char names[4096];
    list_dir(tp(ck), names, sizeof names);
    printf("\n    (killed after %.2f s with step %ld complete; left: %s)", killed_at, seen,
           names);

    /* What a user finds: `vdist ckpt latest` names a complete checkpoint, and it verifies. */
    run_vdist(1, "ckpt latest %s", tp(ck));
    CU_ASSERT_FATAL(EXPECT_RAN());
    char found[PATH_MAX] = "";
    sscanf(g_run.out, "%4095s", found);
    size_t const pre = strlen(ck_tmp);
    long const k = strncmp(found, ck_tmp, pre) == 0 ? path_step(found) : -1;
    CU_ASSERT_FATAL(EXPECT(k >= seen, "`%s` must print the newest complete checkpoint "
                           "%sstep_NNNNNNNN (at least step %ld), got: %s", g_run.cmd, ck_tmp,
                           seen, g_run.out));
    char ckname[32], ckpath[600];
    snprintf(ckname, sizeof ckname, "step_%08ld", k);
    snprintf(ckpath, sizeof ckpath, "%s/%s/%s", g_env.tmp, ck, ckname);
    run_vdist(1, "ckpt verify %s", ckpath);
    EXPECT(g_run.rc == 0 && out_has("OK"), "`%s` must pass (exit 0, \"OK\")", g_run.cmd);

    /* Leftovers of saves cut short must never be chosen, however whole they look: a
     * complete copy under a temporary name and an exact name without its manifest, both
     * newer than the checkpoint. */
    char leftover_tmp[128], leftover_bare[128];
    snprintf(leftover_tmp, sizeof leftover_tmp, "%s/step_%08ld.tmp.99999.0", ck, k + 5);
    snprintf(leftover_bare, sizeof leftover_bare, "%s/step_%08ld", ck, k + 6);
    CU_ASSERT_FATAL(copy_tree(ckpath, tp(leftover_tmp)) && copy_tree(ckpath, tp(leftover_bare)));
    char manifest[160];
    snprintf(manifest, sizeof manifest, "%s/manifest.json", leftover_bare);
    CU_ASSERT_FATAL(unlink(tp(manifest)) == 0);
    run_vdist(1, "ckpt latest %s", tp(ck));
    EXPECT(g_run.rc == 0 && strncmp(g_run.out, ck_tmp, pre) == 0 &&
               strncmp(g_run.out + pre, ckname, strlen(ckname)) == 0 &&
               g_run.out[pre + strlen(ckname)] == '\n',
           "with the leftovers %s and %s (no manifest) beside it, `%s` must still print "
           "%s%s", leftover_tmp, leftover_bare, g_run.cmd, ck_tmp, ckname);

    /* Resume: the same run (checkpoints only at the end now; the interval does not change
     * the arithmetic). */
    run_vdist(ranks, "%s --ckpt.dir=%s --%s=auto --log.metrics=%s --train.export_to=%s",
              common, tp(ck), g_key, tp2(d, "metrics.jsonl"), tp2(d, "resumed"));
    if (EXPECT_RAN()) {
        char want[256];
        snprintf(want, sizeof want, "resumed from %s%s at step %ld", ck_tmp, ckname, k);
        EXPECT(out_has(want), "`%s` must print \"%s\"", g_run.cmd, want);
        struct tu_jsonl got;
        if (metrics_read(&got, tp2(d, "metrics.jsonl"), "the resumed run"))
            crash_metrics_check(&got, &full, k, steps);
        tu_jsonl_free(&got);
        expect_same_bytes(tp2(d, "resumed/model.safetensors"), tp2(d, "full/model.safetensors"),
                          "the resumed run's final weights");
        /* Its final save prunes what older saves left behind. */
        char last[32];
        snprintf(last, sizeof last, "step_%08d", steps);
        list_dir(tp(ck), names, sizeof names);
        bool clean = strstr(names, last) != NULL;
        for (char *p = names; clean && (p = strstr(p, "step_")); p += 5)
            clean = strlen(p) >= 13 && (p[13] == ' ' || p[13] == '\0');
        EXPECT(clean, "after the resumed run's last checkpoint, %s must hold only complete "
               "checkpoints (%s among them; leftovers older than it pruned), got: %s", tp(ck),
               last, names);
    }
    tu_jsonl_free(&full);
}

static void test_crash(void) { crash_resume("t3", 1, "", CRASH_STEPS); }

/* The same with pp 2 on 2 ranks: every rank killed at once, each stage's shard of the
 * checkpoint complete or ignored. */
static void test_crash_pp(void)
{
    crash_resume("t9", 2, PP_MODEL " --parallel.pp=2", CRASH_STEPS_PP);
}

/* ---------------------------------------------------------------- 4. keep */

static void test_keep(void)
{
    mkdir(tp("t4"), 0755);
    run_vdist(1, "%s --train.steps=5 --ckpt.dir=%s --ckpt.interval=1 --ckpt.keep=2",
              base_args(), tp("t4/ck"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    char names[4096];
    list_dir(tp("t4/ck"), names, sizeof names);
    EXPECT(strcmp(names, "step_00000004 step_00000005") == 0,
           "`%s` must leave exactly step_00000004 and step_00000005, got: %s", g_run.cmd, names);
    /* the latest pointer names the newest checkpoint */
    size_t nlatest = 0;
    char *latest = tu_file_read(tp("t4/ck/latest"), &nlatest);
    EXPECT(latest && strstr(latest, "step_00000005") != NULL,
           "%s must name step_00000005, got: %s", tp("t4/ck/latest"), latest ? latest : "(missing)");
    free(latest);
    for (int s = 4; s <= 5; s++) {
        char dir[64];
        snprintf(dir, sizeof dir, "t4/ck/step_%08d", s);
        run_vdist(1, "ckpt verify %s", tp(dir));
        EXPECT(g_run.rc == 0 && out_has("OK"), "`%s` must pass", g_run.cmd);
    }
}

/* ---------------------------------------------------------------- 5. refusals */

static void test_refusals(void)
{
    mkdir(tp("t5"), 0755);
    /* A sound checkpoint at step 6 and one of a model with another FFN width. */
    run_vdist(1, "%s --train.steps=%d --ckpt.dir=%s", base_args(), SAVE_STEP, tp("t5/ck"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    run_vdist(1, "%s --train.steps=1 --model.intermediate_size=64 --ckpt.dir=%s", base_args(),
              tp("t5/other"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    CU_ASSERT_FATAL(tu_file_exists(tp("t5/ck/step_00000006/manifest.json")) &&
                    tu_file_exists(tp("t5/other/step_00000001/manifest.json")));
    /* A metrics file the refused runs must leave as it is. */
    static const char keep[] = "{\"step\":1,\"loss\":1.0}\n";
    CU_ASSERT_FATAL(tu_file_write(tp("t5/metrics.jsonl"), keep, sizeof keep - 1, "wb"));

    /* The control: the sound checkpoint resumes. */
    run_vdist(1, "%s --train.steps=%d --%s=%s", base_args(), SAVE_STEP + 1, g_key,
              tp("t5/ck/step_00000006"));
    EXPECT(g_run.rc == 0 && out_has("step 7/7"), "the control `%s` must resume and train step 7",
           g_run.cmd);

    run_vdist(1, "%s --%s=%s --log.metrics=%s", base_args(), g_key, tp("t5/missing"),
              tp("t5/metrics.jsonl"));
    EXPECT_REFUSED("<TMP>/t5/missing");

    /* One byte flipped in the middle of a shard. */
    CU_ASSERT_FATAL(copy_tree(tp("t5/ck/step_00000006"), tp("t5/corrupt")));
    size_t n = 0;
    char *b = tu_file_read(tp("t5/corrupt/rank_00000.zst"), &n);
    CU_ASSERT_FATAL(b != NULL && n > 16);
    b[n / 2] ^= 0x5a;
    CU_ASSERT_FATAL(tu_file_write(tp("t5/corrupt/rank_00000.zst"), b, n, "wb"));
    free(b);
    run_vdist(1, "%s --%s=%s --log.metrics=%s", base_args(), g_key, tp("t5/corrupt"),
              tp("t5/metrics.jsonl"));
    EXPECT_REFUSED("<TMP>/t5/corrupt/rank_00000.zst");
    run_vdist(1, "ckpt verify %s", tp("t5/corrupt"));
    EXPECT(g_run.rc == 1 && out_has("<TMP>/t5/corrupt/rank_00000.zst") && !out_has("OK"),
           "`%s` must fail (exit 1) naming <TMP>/t5/corrupt/rank_00000.zst", g_run.cmd);

    /* Another model: intermediate_size 64 in the checkpoint, 48 configured. */
    run_vdist(1, "%s --%s=%s --log.metrics=%s", base_args(), g_key,
              tp("t5/other/step_00000001"), tp("t5/metrics.jsonl"));
    EXPECT_REFUSED("'model.layers.", ".weight'");
    EXPECT((out_has("[64, 32]") && out_has("[48, 32]")) ||
               (out_has("[32, 64]") && out_has("[32, 48]")),
           "the message of `%s` must give both shapes of the tensor ([64, 32] and [48, 32], "
           "or [32, 64] and [32, 48])", g_run.cmd);

    /* A checkpoint past train.steps, found by auto. */
    char before[4096], after[4096];
    list_dir(tp("t5/ck"), before, sizeof before);
    run_vdist(1, "%s --train.steps=4 --ckpt.dir=%s --%s=auto --log.metrics=%s", base_args(),
              tp("t5/ck"), g_key, tp("t5/metrics.jsonl"));
    EXPECT_REFUSED("train.steps", "raise train.steps");
    list_dir(tp("t5/ck"), after, sizeof after);
    EXPECT(strcmp(before, after) == 0, "`%s` must leave %s as it was (%s), got: %s", g_run.cmd,
           tp("t5/ck"), before, after);

    char *m = tu_file_read(tp("t5/metrics.jsonl"), NULL);
    EXPECT(m && strcmp(m, keep) == 0, "the refused runs must leave their log.metrics file "
           "<TMP>/t5/metrics.jsonl as it was");
    free(m);
}

/* ---------------------------------------------------------------- 6. spread writing */

static void test_spread(void)
{
    mkdir(tp("t6"), 0755);
    run_vdist(4, "%s --train.steps=1 --parallel.distributed_optimizer=false --ckpt.dir=%s",
              base_args(), tp("t6/ck"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    EXPECT(out_has("layout: 4 ranks, attention tp 1 x cp 1 x dp 4 x pp 1"),
           "`%s` must run dp4", g_run.cmd);
    const char *dir = tp("t6/ck/step_00000001");
    char names[4096];
    list_dir(dir, names, sizeof names);
    int shards = 0;
    for (int r = 0; r < 4; r++) {
        char f[64];
        struct stat st;
        snprintf(f, sizeof f, "t6/ck/step_00000001/rank_%05d.zst", r);
        shards += stat(tp(f), &st) == 0 && st.st_size > 0;
    }
    /* Every tensor is replicated on the 4 ranks: its writer is one of them. */
    json_error_t jerr;
    char mpath[700];
    snprintf(mpath, sizeof mpath, "%s/manifest.json", dir);
    json_t *man = json_load_file(mpath, 0, &jerr);
    const json_t *pieces = json_object_get(man, "pieces");
    char files[4][32] = {{0}};
    int nfiles = 0;
    for (size_t i = 0; json_is_array(pieces) && i < json_array_size(pieces); i++) {
        const json_t *p = json_array_get(pieces, i);
        const char *kind = json_string_value(json_object_get(p, "kind"));
        const char *file = json_string_value(json_object_get(p, "file"));
        if (!kind || strcmp(kind, "param") != 0 || !file) continue;
        bool known = false;
        for (int j = 0; j < nfiles; j++) known = known || strcmp(files[j], file) == 0;
        if (!known && nfiles < 4) snprintf(files[nfiles++], sizeof files[0], "%s", file);
    }
    json_decref(man);
    printf("\n    (dp4, replicated optimizer: %d non-empty shard files; parameters in %d; %s)",
           shards, nfiles, names);
    EXPECT(shards > 1, "a checkpoint of `%s` (dp4, every tensor replicated 4 times) must "
           "spread its writing over the replicas: shard files of more than one rank, got %s",
           g_run.cmd, names);
    EXPECT(nfiles > 1, "the parameters of `%s` (dp4) must be written by more than one "
           "replica: the manifest's \"param\" pieces name %d file(s)", g_run.cmd, nfiles);
    run_vdist(1, "ckpt verify %s", dir);
    EXPECT(g_run.rc == 0 && out_has("OK"), "`%s` must pass (exit 0, \"OK\")", g_run.cmd);
}


/* ---------------------------------------------------------------- 7. fallback, export */

/* ckpt.resume=auto falls back, saying so, past a latest checkpoint that does not load;
 * then `vdist ckpt export` and train.init_from give back exactly the checkpoint's weights. */
static void test_fallback_and_export(void)
{
    mkdir(tp("t7"), 0755);
    run_vdist(1, "%s --train.steps=4 --ckpt.dir=%s --ckpt.interval=2 --train.export_to=%s",
              base_args(), tp("t7/ck"), tp("t7/final"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    /* a flipped byte in step 4's shard: auto must fall back to step 2 and say so */
    size_t n = 0;
    char *b = tu_file_read(tp("t7/ck/step_00000004/rank_00000.zst"), &n);
    CU_ASSERT_FATAL(b != NULL && n > 16);
    b[n / 2] ^= 0x5a;
    CU_ASSERT_FATAL(tu_file_write(tp("t7/ck/step_00000004/rank_00000.zst"), b, n, "wb"));
    free(b);
    run_vdist(1, "%s --train.steps=4 --ckpt.dir=%s --ckpt.interval=2 --%s=auto "
              "--train.export_to=%s", base_args(), tp("t7/ck"), g_key, tp("t7/again"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    EXPECT(out_has("could not be loaded") && out_has("rank_00000.zst") &&
               out_has("falling back to <TMP>/t7/ck/step_00000002") &&
               out_has("resumed from <TMP>/t7/ck/step_00000002 at step 2"),
           "`%s` must say step 4 does not load, name the shard, and fall back to step 2",
           g_run.cmd);
    /* the re-run of steps 3..4 from step 2 reproduces the first run exactly */
    expect_same_bytes(tp("t7/again/model.safetensors"), tp("t7/final/model.safetensors"),
                      "weights after falling back and re-running steps 3 and 4");
    /* export the (re-written) step 4 as sharded Hugging Face files, load them with
     * train.init_from and take one step with lr 0: the weights come back unchanged */
    run_vdist(1, "ckpt export %s %s", tp("t7/ck/step_00000004"), tp("t7/hf"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    EXPECT(tu_file_exists(tp("t7/hf/model.safetensors.index.json")) &&
               tu_file_exists(tp("t7/hf/config.json")),
           "`%s` must write model.safetensors.index.json and config.json", g_run.cmd);
    run_vdist(1, "%s --train.steps=1 --train.lr=0 --train.weight_decay=0 --train.init_from=%s "
              "--train.export_to=%s", base_args(), tp("t7/hf"), tp("t7/reloaded"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    expect_same_bytes(tp("t7/reloaded/model.safetensors"), tp("t7/final/model.safetensors"),
                      "weights exported from the checkpoint and loaded with train.init_from");
}

/* ---------------------------------------------------------------- 8. pipeline layouts */

/* A checkpoint of pp2 x dp2 (4 layers, distributed optimizer over dp within each stage)
 * resumed in the same layout (bit for bit against that layout's uninterrupted run) and in
 * pp1, pp4, pp2 x vpp2, pp2 with an uneven split and pp2 x tp2 (within the tolerances of
 * the 1-rank run); then a checkpoint of pp2 x vpp2 resumed on one rank. */
static void test_pp_layouts(void)
{
    CU_ASSERT_FATAL(reference_pp());
    struct tu_jsonl ref, save;
    CU_ASSERT_FATAL(metrics_read(&ref, tp("ref4/metrics.jsonl"), "the 4-layer reference"));
    /* targets[0] saves; targets[3] saves the second checkpoint. */
    static const struct layout targets[] = {
        {"4 ranks pp2 x dp2", 4, "--parallel.pp=2",
         "layout: 4 ranks, attention tp 1 x cp 1 x dp 2 x pp 2, MoE etp 1 x ep 1 x edp 2 x pp 2",
         "pipeline: 1f1b, pp 2 x vpp 1, 2 micro-batches per step and replica; rank 0's chunks: "
         "layers 0-1;"},
        {"1 rank", 1, "",
         "layout: 1 ranks, attention tp 1 x cp 1 x dp 1 x pp 1, MoE etp 1 x ep 1 x edp 1 x pp 1",
         NULL},
        {"4 ranks pp4", 4, "--parallel.pp=4",
         "layout: 4 ranks, attention tp 1 x cp 1 x dp 1 x pp 4, MoE etp 1 x ep 1 x edp 1 x pp 4",
         "pipeline: 1f1b, pp 4 x vpp 1, 4 micro-batches per step and replica; rank 0's chunks: "
         "layers 0-0;"},
        {"2 ranks pp2 x vpp2", 2, "--parallel.pp=2 --parallel.vpp=2",
         "layout: 2 ranks, attention tp 1 x cp 1 x dp 1 x pp 2, MoE etp 1 x ep 1 x edp 1 x pp 2",
         "pipeline: interleaved, pp 2 x vpp 2, 4 micro-batches per step and replica; rank 0's "
         "chunks: layers 0-0 layers 2-2;"},
        {"2 ranks pp2 with pp_layers 1,3", 2, "--parallel.pp=2 --parallel.pp_layers=1,3",
         "layout: 2 ranks, attention tp 1 x cp 1 x dp 1 x pp 2, MoE etp 1 x ep 1 x edp 1 x pp 2",
         "pipeline: 1f1b, pp 2 x vpp 1, 4 micro-batches per step and replica; rank 0's chunks: "
         "layers 0-0;"},
        {"4 ranks pp2 x tp2", 4, "--parallel.pp=2 --parallel.tp=2",
         "layout: 4 ranks, attention tp 2 x cp 1 x dp 1 x pp 2, MoE etp 2 x ep 1 x edp 1 x pp 2",
         "pipeline: 1f1b, pp 2 x vpp 1, 4 micro-batches per step and replica; rank 0's chunks: "
         "layers 0-1;"},
    };

    resume_everywhere("t8", PP_MODEL, targets, sizeof targets / sizeof targets[0], &ref,
                      "ref4/model.safetensors");

    /* Saved with two model chunks per rank, resumed with all four on one. */
    if (save_in(&targets[3], "t8v", PP_MODEL, &ref, &save)) {
        struct saved const s = {"t8v", PP_MODEL, &save, &ref, "ref4/model.safetensors"};
        resume_in(&s, &targets[1], 0, false);
    }
    tu_jsonl_free(&save);
    tu_jsonl_free(&ref);
}

/* ---------------------------------------------------------------- 9. pipeline exports */

/* The tensors of two exports equal by name: the same names, shapes and values. A
 * directory written by `vdist ckpt export` is compared file by file: the same index, and
 * each shard it names (model-NNNNN-of-NNNNN.safetensors) tensor by tensor. */
static void expect_same_tensors(const char *got, const char *want, const char *what)
{
    double d = 0.0;
    char where[256] = "";
    if (weights_compare(got, want, &d, where, sizeof where, what))
        EXPECT(d == 0.0, "%s: every tensor of %s must equal its namesake in %s; '%s' differs "
               "by %.3g", what, got, want, where, d);
}

static void expect_same_export_dirs(const char *got, const char *want, const char *what)
{
    char a[PATH_MAX], b[PATH_MAX];
    snprintf(a, sizeof a, "%s/model.safetensors.index.json", got);
    snprintf(b, sizeof b, "%s/model.safetensors.index.json", want);
    expect_same_bytes(a, b, what);
    struct dirent **names = NULL;
    int const n = scandir(want, &names, NULL, alphasort);
    int shards = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = names[i]->d_name;
        size_t const len = strlen(nm);
        if (strncmp(nm, "model-", 6) == 0 && len > 12 &&
            strcmp(nm + len - 12, ".safetensors") == 0) {
            snprintf(a, sizeof a, "%s/%s", got, nm);
            snprintf(b, sizeof b, "%s/%s", want, nm);
            expect_same_tensors(a, b, what);
            shards++;
        }
        free(names[i]);
    }
    free(names);
    EXPECT(shards > 0, "%s: %s must hold model-*.safetensors shards", what, want);
}

/* Trained weights (the 4-layer reference's) loaded with train.init_from and trained one
 * step at lr 0 with a checkpoint, on one rank, on pp2 and on pp2 x vpp2: the step's losses
 * agree (the loaded layers run where they belong), and train.export_to and `vdist ckpt
 * export` of the checkpoint give, tensor by tensor, the 1-rank run's (= the loaded) weights. */
static void test_pp_export(void)
{
    CU_ASSERT_FATAL(reference_pp());
    mkdir(tp("t10"), 0755);
    static const struct layout runs[] = {
        {"1 rank", 1, "",
         "layout: 1 ranks, attention tp 1 x cp 1 x dp 1 x pp 1", NULL},
        {"2 ranks pp2", 2, "--parallel.pp=2",
         "layout: 2 ranks, attention tp 1 x cp 1 x dp 1 x pp 2",
         "pipeline: 1f1b, pp 2 x vpp 1"},
        {"2 ranks pp2 x vpp2", 2, "--parallel.pp=2 --parallel.vpp=2",
         "layout: 2 ranks, attention tp 1 x cp 1 x dp 1 x pp 2",
         "pipeline: interleaved, pp 2 x vpp 2"},
    };
    struct tu_jsonl one = {0};
    for (size_t k = 0; k < sizeof runs / sizeof runs[0]; k++) {
        /* run k's files: t10/kK/{ck,metrics.jsonl,export,hf} */
        char d[32];
        snprintf(d, sizeof d, "t10/k%zu", k);
        mkdir(tp(d), 0755);
        run_vdist(runs[k].ranks, "%s %s %s --train.steps=1 --train.lr=0 "
                  "--train.weight_decay=0 --train.init_from=%s --ckpt.dir=%s "
                  "--log.metrics=%s --train.export_to=%s",
                  base_args(), PP_MODEL, runs[k].opts, tp("ref4"), tp2(d, "ck"),
                  tp2(d, "metrics.jsonl"), tp2(d, "export"));
        if (!EXPECT_RAN()) continue;
        expect_layout(&runs[k]);
        char label[160];
        snprintf(label, sizeof label, "train.export_to on %s after train.init_from", runs[k].name);
        if (k == 0) {
            expect_same_bytes(tp2(d, "export/model.safetensors"), tp("ref4/model.safetensors"),
                              label);
            CU_ASSERT_FATAL(metrics_read(&one, tp2(d, "metrics.jsonl"), "the 1-rank run"));
        } else {
            expect_same_tensors(tp2(d, "export/model.safetensors"),
                                tp("t10/k0/export/model.safetensors"), label);
            struct tu_jsonl got;
            double wl = 0, wg = 0;
            snprintf(label, sizeof label, "step 1 on %s after train.init_from", runs[k].name);
            if (metrics_read(&got, tp2(d, "metrics.jsonl"), label) &&
                metrics_steps(&got, 1, 1, label))
                metrics_close(&got, &one, 1, 1, label, &wl, &wg);
            tu_jsonl_free(&got);
        }
        run_vdist(1, "ckpt export %s %s", tp2(d, "ck/step_00000001"), tp2(d, "hf"));
        if (!EXPECT_RAN()) continue;
        snprintf(label, sizeof label, "`vdist ckpt export` of the checkpoint of %s", runs[k].name);
        if (k > 0) expect_same_export_dirs(tp2(d, "hf"), tp("t10/k0/hf"), label);
    }
    tu_jsonl_free(&one);
}

/* ---------------------------------------------------------------- 10. context parallelism */

/* A checkpoint of cp2 (ring exchange) resumed in cp2 (bit for bit against its
 * uninterrupted run) and in 1 rank, cp4 and cp2 with the all-gather exchange (within the
 * tolerances of the 1-rank run): the checkpoint does not depend on how the sequence was cut. */
static void test_cp_layouts(void)
{
    CU_ASSERT_FATAL(reference());
    struct tu_jsonl ref;
    CU_ASSERT_FATAL(metrics_read(&ref, tp("ref/metrics.jsonl"), "the reference"));
    static const struct layout targets[] = {
        {"2 ranks cp2", 2, "--parallel.cp=2",
         "layout: 2 ranks, attention tp 1 x cp 2 x dp 1 x pp 1, MoE etp 1 x ep 1 x edp 2 x pp 1",
         NULL},
        {"1 rank", 1, "",
         "layout: 1 ranks, attention tp 1 x cp 1 x dp 1 x pp 1, MoE etp 1 x ep 1 x edp 1 x pp 1",
         NULL},
        {"4 ranks cp4", 4, "--parallel.cp=4",
         "layout: 4 ranks, attention tp 1 x cp 4 x dp 1 x pp 1, MoE etp 1 x ep 1 x edp 4 x pp 1",
         NULL},
        {"2 ranks cp2 with the all-gather exchange", 2,
         "--parallel.cp=2 --parallel.cp_comm_type=allgather",
         "layout: 2 ranks, attention tp 1 x cp 2 x dp 1 x pp 1, MoE etp 1 x ep 1 x edp 2 x pp 1",
         NULL},
    };
    resume_everywhere("t11", "", targets, sizeof targets / sizeof targets[0], &ref,
                      "ref/model.safetensors");
    tu_jsonl_free(&ref);
}

/* ---------------------------------------------------------------- main */

/* Which key selects the checkpoint to resume from: the one `vdist train --help` lists. */
static bool find_resume_key(void)
{
    static const char *const keys[] = {"ckpt.resume", "ckpt.load"};
    run_vdist(1, "train --help");
    g_has_async = g_run.rc == 0 && tu_help_lists(g_run.out, "ckpt.async");
    for (size_t i = 0; g_run.rc == 0 && i < sizeof keys / sizeof keys[0]; i++)
        if (tu_help_lists(g_run.out, keys[i])) {
            snprintf(g_key, sizeof g_key, "%s", keys[i]);
            return true;
        }
    return false;
}

static int suite_init(void)
{
    if (tu_env_init(&g_env, "test_resume", "vdist_resume_") != 0) return -1;
    if (!find_resume_key()) {
        fprintf(stderr, "test_resume: `vdist train --help` lists neither ckpt.resume nor "
                        "ckpt.load:\n%s\n", g_run.out ? g_run.out : "");
        return -1;
    }
    return 0;
}

static int suite_clean(void)
{
    if (g_env.tmp[0] && !getenv("VDIST_RESUME_KEEP")) tu_tmpdir_remove(g_env.tmp);
    else if (g_env.tmp[0]) printf("\ntest_resume: kept %s\n", g_env.tmp);
    tu_run_free(&g_run);
    return 0;
}

int main(void)
{
    setenv("OMP_NUM_THREADS", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    static const struct tu_test tests[] = {
        {"same layout: resumed run equals the uninterrupted one bit for bit", test_exact_resume},
        {"same layout with ckpt.async=true: resumed run bit for bit", test_exact_resume_async},
        {"other layouts: tp2 x dp2 (distributed optimizer) resumed in 6 layouts",
         test_other_layouts},
        {"crash: SIGKILL mid-run; latest is complete and verifies; leftovers never chosen; "
         "resume is exact", test_crash},
        {"ckpt.keep=2 with interval 1 over 5 steps keeps steps 4 and 5", test_keep},
        {"refused before training: missing, corrupt, other model, past train.steps",
         test_refusals},
        {"dp4 without distributed optimizer spreads shard writing; verifies", test_spread},
        {"auto falls back past a corrupt latest checkpoint; ckpt export -> train.init_from",
         test_fallback_and_export},
        {"pipeline layouts: pp2 x dp2 resumed bit for bit in pp2 x dp2, close in pp1, pp4, "
         "pp2 x vpp2, pp_layers 1,3, pp2 x tp2; pp2 x vpp2 resumed on 1 rank", test_pp_layouts},
        {"crash under pp2: SIGKILL of every rank mid-run; resume is exact", test_crash_pp},
        {"pp2 and pp2 x vpp2: train.init_from, train.export_to and ckpt export give the 1-rank "
         "run's tensors", test_pp_export},
        {"context parallelism: cp2 resumed bit for bit in cp2, close in 1 rank, cp4 and cp2 "
         "with the all-gather exchange", test_cp_layouts},
    };
    static const struct tu_suite suite = {
        .name = "checkpoints and resume",
        .init = suite_init,
        .clean = suite_clean,
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_TIMED,
        .program = "test_resume",
    };
    tu_expect_show(&g_run, "last command");
    return tu_cunit_main(&suite);
}
