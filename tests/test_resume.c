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
 *      chosen, and the resumed run continues bit for bit like an uninterrupted one;
 *   4. ckpt.keep: interval 1, keep 2, 5 steps leave exactly step_00000004 and
 *      step_00000005;
 *   5. refusals before training: a missing checkpoint directory, a corrupted shard, a
 *      checkpoint of another model, a checkpoint past train.steps;
 *   6. the writing of replicated tensors is spread over their replicas (dp4 without the
 *      distributed optimizer writes shards from more than one rank) and verifies;
 *   7. ckpt.resume=auto falls back, saying so, past a latest checkpoint whose shard is
 *      corrupt, and re-runs the steps after it exactly; `vdist ckpt export` of a
 *      checkpoint loaded with train.init_from gives back its weights bit for bit.
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

static struct tu_env g_env; /* g_env.tmp is the shared working directory of every child */
static struct tu_run g_run; /* the last command, as a user would type it; "<TMP>" output */
static char g_key[32];      /* "ckpt.resume" or "ckpt.load" */

/* ---------------------------------------------------------------- helpers */

#define EXPECT(cond, ...) TU_EXPECT(cond, __VA_ARGS__)

/* g_env.tmp/name in a rotating static buffer (eight live at once). */
static const char *tp(const char *name) { return tu_path(g_env.tmp, name); }

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

/* 10 steps on one rank: metrics ref/metrics.jsonl, export ref/. Made once; it also makes
 * the synthetic dataset. */
static bool reference(void)
{
    static int state; /* 0 not tried, 1 made, -1 failed */
    if (state == 0) {
        mkdir(tp("ref"), 0755);
        run_vdist(1, "%s --train.steps=%d --log.metrics=%s --train.export_to=%s", base_args(),
                  REF_STEPS, tp("ref/metrics.jsonl"), tp("ref"));
        state = EXPECT_RAN() && EXPECT(tu_file_exists(tp("ref/model.safetensors")),
                                       "`%s` must export ref/model.safetensors", g_run.cmd)
                    ? 1
                    : -1;
    }
    return state == 1;
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

static void test_other_layouts(void)
{
    CU_ASSERT_FATAL(reference());
    struct tu_jsonl ref;
    CU_ASSERT_FATAL(metrics_read(&ref, tp("ref/metrics.jsonl"), "the reference"));
    mkdir(tp("t2"), 0755);

    /* Saved by 4 ranks: tp2 x dp2 (MoE etp2 x edp2), distributed optimizer. */
    run_vdist(4, "%s --train.steps=%d --parallel.tp=2 --parallel.distributed_optimizer=true "
              "--ckpt.dir=%s --log.metrics=%s",
              base_args(), SAVE_STEP, tp("t2/ck"), tp("t2/save.jsonl"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    EXPECT(out_has("layout: 4 ranks, attention tp 2 x cp 1 x dp 2 x pp 1, MoE etp 2 x ep 1 x "
                   "edp 2 x pp 1"), "`%s` must run the layout tp2 x dp2", g_run.cmd);
    struct tu_jsonl save;
    CU_ASSERT_FATAL(metrics_read(&save, tp("t2/save.jsonl"), "the 4-rank save"));
    double wl = 0, wg = 0;
    if (metrics_steps(&save, 1, SAVE_STEP, "the 4-rank save"))
        metrics_close(&save, &ref, 1, SAVE_STEP, "the 4-rank save (tp2 x dp2)", &wl, &wg);
    const char *ck = tp("t2/ck/step_00000006");
    CU_ASSERT_FATAL(EXPECT(tu_file_exists(tp("t2/ck/step_00000006/manifest.json")),
                           "`%s` must write %s", g_run.cmd, ck));
    char ckpath[600];
    snprintf(ckpath, sizeof ckpath, "%s", ck);

    static const struct {
        const char *name;
        int ranks;
        const char *opts;
        const char *layout;
    } targets[] = {
        {"2 ranks ep2 etp1, replicated optimizer", 2,
         "--parallel.ep=2 --parallel.etp=1 --parallel.distributed_optimizer=false",
         "layout: 2 ranks, attention tp 1 x cp 1 x dp 2 x pp 1, MoE etp 1 x ep 2 x edp 1 x pp 1"},
        {"8 ranks tp2 ep4", 8, "--parallel.tp=2 --parallel.ep=4",
         "layout: 8 ranks, attention tp 2 x cp 1 x dp 4 x pp 1, MoE etp 2 x ep 4 x edp 1 x pp 1"},
        {"4 ranks dp4", 4, "",
         "layout: 4 ranks, attention tp 1 x cp 1 x dp 4 x pp 1, MoE etp 1 x ep 1 x edp 4 x pp 1"},
        {"1 rank, replicated optimizer", 1, "--parallel.distributed_optimizer=false",
         "layout: 1 ranks, attention tp 1 x cp 1 x dp 1 x pp 1, MoE etp 1 x ep 1 x edp 1 x pp 1"},
        {"4 ranks dp4 ep4", 4, "--parallel.ep=4 --parallel.etp=1",
         "layout: 4 ranks, attention tp 1 x cp 1 x dp 4 x pp 1, MoE etp 1 x ep 4 x edp 1 x pp 1"},
        {"4 ranks tp4 etp2 ep2, all-gather dispatcher", 4,
         "--parallel.tp=4 --parallel.etp=2 --parallel.ep=2 "
         "--model.moe_token_dispatcher_type=allgather",
         "layout: 4 ranks, attention tp 4 x cp 1 x dp 1 x pp 1, MoE etp 2 x ep 2 x edp 1 x pp 1"},
    };
    for (size_t k = 0; k < sizeof targets / sizeof targets[0]; k++) {
        char metrics[64], export[64], label[160];
        snprintf(metrics, sizeof metrics, "t2/resume%zu.jsonl", k);
        snprintf(export, sizeof export, "t2/export%zu", k);
        snprintf(label, sizeof label, "resumed on %s", targets[k].name);
        /* The resumed run's file starts as the saving run's: it keeps steps 1..6. */
        CU_ASSERT_FATAL(copy_file(tp("t2/save.jsonl"), tp(metrics)));
        run_vdist(targets[k].ranks, "%s --train.steps=%d %s --%s=%s --log.metrics=%s "
                  "--train.export_to=%s",
                  base_args(), REF_STEPS, targets[k].opts, g_key, ckpath, tp(metrics),
                  tp(export));
        if (!EXPECT_RAN()) continue;
        EXPECT(out_has(targets[k].layout), "`%s` must run the layout \"%s\"", g_run.cmd,
               targets[k].layout);
        EXPECT(out_has("resumed from <TMP>/t2/ck/step_00000006 at step 6") &&
                   !out_has("step 6/") && out_has("step 7/10"),
               "`%s` must resume at step 6 and run steps 7..10", g_run.cmd);
        struct tu_jsonl got;
        double wloss = 0, wgnorm = 0, wparam = 0;
        char where[256] = "";
        if (metrics_read(&got, tp(metrics), label) && metrics_steps(&got, 1, REF_STEPS, label)) {
            for (int s = 1; s <= SAVE_STEP; s++)
                EXPECT(strcmp(got.text[s - 1], save.text[s - 1]) == 0,
                       "%s: metrics line %d must be kept as the saving run wrote it", label, s);
            metrics_close(&got, &ref, SAVE_STEP + 1, REF_STEPS, label, &wloss, &wgnorm);
        }
        tu_jsonl_free(&got);
        char exp_path[128];
        snprintf(exp_path, sizeof exp_path, "%s/model.safetensors", export);
        if (weights_compare(tp(exp_path), tp("ref/model.safetensors"), &wparam, where,
                            sizeof where, label))
            EXPECT(wparam <= PARAM_ABS_TOL, "%s: the final weights must be within absolute %g "
                   "of the 1-rank run's; '%s' differs by %.3g", label, PARAM_ABS_TOL, where,
                   wparam);
        printf("\n    (%s: max rel loss diff %.2e, max rel grad_norm diff %.2e, max abs "
               "param diff %.2e)", label, wloss, wgnorm, wparam);
    }
    printf("\n    (saved on tp2 x dp2: max rel loss diff %.2e, grad_norm %.2e)", wl, wg);
    tu_jsonl_free(&save);
    tu_jsonl_free(&ref);
}

/* ---------------------------------------------------------------- 3. crash */

/* Starts `vdist ARGS` (one rank, no mpirun) in g_env.tmp in a process group of its own,
 * output to log; returns its pid (= its process group), or -1. */
static pid_t spawn_vdist(const char *args, const char *log)
{
    snprintf(g_run.cmd, sizeof g_run.cmd, "cd %s && OMP_NUM_THREADS=1 %s %s", g_env.tmp,
             g_env.vdist, args);
    char shell[16384];
    snprintf(shell, sizeof shell, "exec '%s' %s > '%s' 2>&1", g_env.vdist, args, log);
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

/* The resumed run's metrics file: the crashed run's lines of steps 1..k (k the checkpoint
 * it resumed from), then its own k+1..CRASH_STEPS, one line per step in order, each equal
 * to the uninterrupted run's line bit for bit. Missing steps are named. */
static void crash_metrics_check(const struct tu_jsonl *got, const struct tu_jsonl *full, long k)
{
    static int count[CRASH_STEPS + 1];
    memset(count, 0, sizeof count);
    bool ordered = true;
    long prev = 0;
    for (int i = 0; i < got->n; i++) {
        long const s = line_step(got, i);
        if (s >= 1 && s <= CRASH_STEPS) count[s]++;
        ordered = ordered && s > prev;
        prev = s;
    }
    char missing[512] = "";
    int nmissing = 0, twice = 0;
    size_t len = 0;
    for (int s = 1; s <= CRASH_STEPS; s++) {
        twice += count[s] > 1;
        if (count[s] == 0 && nmissing++ < 20 && len + 16 < sizeof missing)
            len += (size_t)snprintf(missing + len, sizeof missing - len, "%s%d",
                                    len ? ", " : "", s);
    }
    EXPECT(nmissing == 0 && twice == 0 && ordered && got->n == CRASH_STEPS,
           "the resumed run's metrics file must hold one line per step 1..%d in order (the "
           "crashed run's lines up to the checkpoint's step %ld, then the resumed run's): %d "
           "lines, %d steps missing (%s)%s, %d steps twice, %s%s", CRASH_STEPS, k, got->n,
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
        if (s < 1 || s > CRASH_STEPS) continue;
        if (got->line[i] && json_equal(got->line[i], full->line[s - 1])) continue;
        if (bad++ < 3)
            EXPECT(false, "the resumed run's metrics: step %ld must equal the uninterrupted "
                   "run bit for bit (timings aside):\n    got:  %s\n    want: %s", s,
                   got->text[i], full->text[s - 1]);
    }
    if (bad > 3) EXPECT(false, "the resumed run's metrics: %d lines differ in all", bad);
}

static void test_crash(void)
{
    mkdir(tp("t3"), 0755);
    char common[2048];
    /* The cosine schedule (warmup 5) also checks that the resumed run takes the same
     * learning rates: train.steps is the same in every run. */
    snprintf(common, sizeof common,
             "%s --train.steps=%d --train.lr_schedule=cosine --train.warmup=5 "
             "--log.interval=1000",
             base_args(), CRASH_STEPS);

    /* The uninterrupted run. */
    run_vdist(1, "%s --log.metrics=%s --train.export_to=%s", common, tp("t3/full.jsonl"),
              tp("t3/full"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    struct tu_jsonl full;
    CU_ASSERT_FATAL(metrics_read(&full, tp("t3/full.jsonl"), "the uninterrupted run"));
    CU_ASSERT_FATAL(metrics_steps(&full, 1, CRASH_STEPS, "the uninterrupted run"));

    /* The run that crashes: a checkpoint after every step, killed (the whole process
     * group, SIGKILL) as soon as two checkpoints are complete. */
    char args[4096];
    snprintf(args, sizeof args, "%s --ckpt.dir=%s --ckpt.interval=1 --log.metrics=%s", common,
             tp("t3/ck"), tp("t3/metrics.jsonl"));
    pid_t const pid = spawn_vdist(args, tp("t3/crashed.log"));
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
        if (ckpt_latest(tp("t3/ck"), latest, sizeof latest) == 0 && latest[0]) {
            seen = path_step(latest);
            if (seen >= 2) break;
        }
        struct timespec const ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    if (!exited) {
        kill(-pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    double const killed_at = tu_now_s() - t0;
    free(g_run.out);
    g_run.out = tu_file_read_masked(tp("t3/crashed.log"), g_env.tmp);
    g_run.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    g_run.out_shown = false;
    CU_ASSERT_FATAL(EXPECT(!exited && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL &&
                               seen >= 2,
                           "`%s` must still be running when its second checkpoint appears, "
                           "and die of SIGKILL (it %s; newest checkpoint seen: step %ld)",
                           g_run.cmd, exited ? "exited on its own" : "was killed", seen));
    char names[4096];
    list_dir(tp("t3/ck"), names, sizeof names);
    printf("\n    (killed after %.2f s with step %ld complete; left: %s)", killed_at, seen,
           names);

    /* What a user finds: `vdist ckpt latest` names a complete checkpoint, and it verifies. */
    run_vdist(1, "ckpt latest %s", tp("t3/ck"));
    CU_ASSERT_FATAL(EXPECT_RAN());
    char found[PATH_MAX] = "";
    sscanf(g_run.out, "%4095s", found);
    long const k = path_step(found);
    CU_ASSERT_FATAL(EXPECT(strncmp(found, "<TMP>/t3/ck/step_", 17) == 0 && k >= seen,
                           "`%s` must print the newest complete checkpoint <TMP>/t3/ck/"
                           "step_NNNNNNNN (at least step %ld), got: %s", g_run.cmd, seen,
                           g_run.out));
    char ckname[32], ckpath[600];
    snprintf(ckname, sizeof ckname, "step_%08ld", k);
    snprintf(ckpath, sizeof ckpath, "%s/t3/ck/%s", g_env.tmp, ckname);
    run_vdist(1, "ckpt verify %s", ckpath);
    EXPECT(g_run.rc == 0 && out_has("OK"), "`%s` must pass (exit 0, \"OK\")", g_run.cmd);

    /* Leftovers of saves cut short must never be chosen, however whole they look: a
     * complete copy under a temporary name and an exact name without its manifest, both
     * newer than the checkpoint. */
    char leftover_tmp[96], leftover_bare[96];
    snprintf(leftover_tmp, sizeof leftover_tmp, "t3/ck/step_%08ld.tmp.99999.0", k + 5);
    snprintf(leftover_bare, sizeof leftover_bare, "t3/ck/step_%08ld", k + 6);
    CU_ASSERT_FATAL(copy_tree(ckpath, tp(leftover_tmp)) && copy_tree(ckpath, tp(leftover_bare)));
    char manifest[128];
    snprintf(manifest, sizeof manifest, "%s/manifest.json", leftover_bare);
    CU_ASSERT_FATAL(unlink(tp(manifest)) == 0);
    run_vdist(1, "ckpt latest %s", tp("t3/ck"));
    EXPECT(g_run.rc == 0 && strncmp(g_run.out, "<TMP>/t3/ck/", 12) == 0 &&
               strncmp(g_run.out + 12, ckname, strlen(ckname)) == 0 &&
               g_run.out[12 + strlen(ckname)] == '\n',
           "with the leftovers %s and %s (no manifest) beside it, `%s` must still print "
           "<TMP>/t3/ck/%s", leftover_tmp, leftover_bare, g_run.cmd, ckname);

    /* Resume: the same run (checkpoints only at the end now; the interval does not change
     * the arithmetic). */
    run_vdist(1, "%s --ckpt.dir=%s --%s=auto --log.metrics=%s --train.export_to=%s", common,
              tp("t3/ck"), g_key, tp("t3/metrics.jsonl"), tp("t3/resumed"));
    if (EXPECT_RAN()) {
        char want[256];
        snprintf(want, sizeof want, "resumed from <TMP>/t3/ck/%s at step %ld", ckname, k);
        EXPECT(out_has(want), "`%s` must print \"%s\"", g_run.cmd, want);
        struct tu_jsonl got;
        if (metrics_read(&got, tp("t3/metrics.jsonl"), "the resumed run"))
            crash_metrics_check(&got, &full, k);
        tu_jsonl_free(&got);
        expect_same_bytes(tp("t3/resumed/model.safetensors"), tp("t3/full/model.safetensors"),
                          "the resumed run's final weights");
        /* Its final save prunes what older saves left behind. */
        list_dir(tp("t3/ck"), names, sizeof names);
        bool clean = strstr(names, "step_00000400") != NULL;
        for (char *p = names; clean && (p = strstr(p, "step_")); p += 5)
            clean = strlen(p) >= 13 && (p[13] == ' ' || p[13] == '\0');
        EXPECT(clean, "after the resumed run's last checkpoint, %s must hold only complete "
               "checkpoints (step_00000400 among them; leftovers older than it pruned), "
               "got: %s", tp("t3/ck"), names);
    }
    tu_jsonl_free(&full);
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
