/* log.trace: the Chrome trace-event JSON of a run. The recorder in-process (JSON escaping of
 * odd names, a span's fields, the merge's atomicity), then the vdist program: a 2-rank run
 * whose trace parses and holds every rank's steps, optimizer steps, communication and
 * checkpoint as well-nested spans, asynchronous checkpoints, `vdist bench`, no file without
 * log.trace, a bad path refused before training, and a failed run that leaves nothing.
 *
 * Runs build/vdist (or $VDIST) from the repository root inside a fresh /tmp/vdist_trace_XXXXXX,
 * removed at the end; messages are checked with that path replaced by "<TMP>". */
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CUnit/CUnit.h>
#include <jansson.h>

#include "dist/dist.h"
#include "tests/testutil.h"

#define CHILD_TIMEOUT_S 120
#define MAX_RANKS 4

static struct tu_env g_env;
static struct tu_run g_run;

#define EXPECT(cond, ...) TU_EXPECT(cond, __VA_ARGS__)
static const char *const step_lines[] = {"step 1/", NULL};
#define EXPECT_REFUSED(...)                                                                \
    tu_expect_refused_at(__FILE__, __LINE__, &g_run, "the first training step", step_lines, \
                         __VA_ARGS__, (const char *)NULL)

static const char *tp(const char *name) { return tu_path(g_env.tmp, name); }

static bool out_has(const char *s) { return g_run.out && strstr(g_run.out, s) != NULL; }

/* tiny.ini for a few steps without the SGEMM measurement; the rest of the arguments follow. */
#define TINY "train --config %s/configs/tiny.ini --train.peak_gflops=1 "

/* ---------------------------------------------------------------- leftovers */

static char g_leftover[1024];

static int find_leftover_cb(const char *path, const struct stat *st, int flag, struct FTW *f)
{
    (void)st;
    (void)flag;
    const char *const base = path + f->base;
    if (!strstr(base, ".part") && !strstr(base, ".tmp.")) return 0;
    snprintf(g_leftover, sizeof g_leftover, "%s", path);
    return 1;
}

/* Whether a trace part file or a temporary is left anywhere under g_env.tmp (the first in
 * g_leftover). */
static bool has_leftover(void)
{
    g_leftover[0] = '\0';
    return nftw(g_env.tmp, find_leftover_cb, 16, FTW_PHYS) == 1;
}

static char *g_listing;
static size_t g_listing_len;

static int list_cb(const char *path, const struct stat *st, int flag, struct FTW *f)
{
    (void)st;
    (void)f;
    if (flag != FTW_F) return 0;
    const char *const rel = path + strlen(g_env.tmp);
    size_t const n = strlen(rel);
    char *const grown = realloc(g_listing, g_listing_len + n + 2);
    if (!grown) return 1;
    g_listing = grown;
    memcpy(g_listing + g_listing_len, rel, n);
    g_listing[g_listing_len + n] = '\n';
    g_listing_len += n + 1;
    g_listing[g_listing_len] = '\0';
    return 0;
}

/* Every file under g_env.tmp, one relative path a line, in nftw's order (caller frees). */
static char *list_files(void)
{
    g_listing = NULL;
    g_listing_len = 0;
    nftw(g_env.tmp, list_cb, 16, FTW_PHYS);
    return g_listing ? g_listing : strdup("");
}

/* ---------------------------------------------------------------- checking a trace */

/* What a trace of a run must hold on every rank. */
struct want {
    int ranks, steps;
    bool communication;  /* collective or point-to-point spans named "op kind" */
    const char *ckpt[4]; /* names of the checkpoint spans, each once per rank */
};

struct span {
    long long ts, end; /* nanoseconds */
};

static long long ns(const json_t *v) { return llround(json_number_value(v) * 1e3); }

static int by_start(const void *pa, const void *pb)
{
    const struct span *a = pa, *b = pb;
    if (a->ts != b->ts) return a->ts < b->ts ? -1 : 1;
    return a->end > b->end ? -1 : a->end < b->end; /* the enclosing span first */
}

/* Spans of one track that overlap without one containing the other: Perfetto and
 * chrome://tracing draw a track's spans as a stack, which needs them nested. */
static int count_crossing(struct span *s, int n)
{
    qsort(s, (size_t)n, sizeof *s, by_start);
    long long stack[64];
    int depth = 0, bad = 0;
    for (int i = 0; i < n; i++) {
        while (depth > 0 && stack[depth - 1] <= s[i].ts) depth--;
        if (depth > 0 && s[i].end > stack[depth - 1]) bad++;
        if (depth < 64) stack[depth++] = s[i].end;
    }
    return bad;
}

/* Whether name is "op kind" with kind a group kind of dist/. */
static bool names_group_kind(const char *name)
{
    const char *const space = strchr(name, ' ');
    if (!space || space == name) return false;
    for (int k = 0; k < DIST_NKIND; k++)
        if (strcmp(space + 1, dist_kind_name((enum dist_kind)k)) == 0) return true;
    return false;
}

/* Per-rank tallies of one trace. */
struct tally {
    int spans, comm, comm_named, comm_bytes, steps_wrong, out_of_order;
    int optimizer[64], step[64], ckpt[4];
    bool named;
    long long last_end;
    struct span *all;
    int nall;
};

/* One "ph":"X" event of rank r into its tally; false when a field is missing. */
static bool tally_span(struct tally *t, const json_t *e, const struct want *w)
{
    const json_t *const ts = json_object_get(e, "ts"), *const dur = json_object_get(e, "dur");
    const char *const name = json_string_value(json_object_get(e, "name"));
    const char *const cat = json_string_value(json_object_get(e, "cat"));
    if (!json_is_number(ts) || !json_is_number(dur) || !name || !cat) return false;
    if (json_number_value(ts) < 0 || json_number_value(dur) < 0) return false;
    struct span const s = {ns(ts), ns(ts) + ns(dur)};
    /* spans are written as they end: in file order, their ends never go back */
    if (s.end < t->last_end) t->out_of_order++;
    t->last_end = s.end;
    t->all = realloc(t->all, (size_t)(t->nall + 1) * sizeof *t->all);
    t->all[t->nall++] = s;
    t->spans++;
    int k = 0;
    if (strcmp(cat, "optimizer") == 0 && sscanf(name, "optimizer step %d", &k) == 1 && k >= 1 &&
        k <= w->steps && k < 64)
        t->optimizer[k]++;
    else if (strcmp(cat, "optimizer") == 0)
        t->steps_wrong++;
    if (strcmp(cat, "step") == 0 && sscanf(name, "step %d", &k) == 1 && k >= 1 && k < 64)
        t->step[k]++;
    if (strcmp(cat, "collective") == 0 || strcmp(cat, "p2p") == 0) {
        t->comm++;
        t->comm_named += names_group_kind(name);
        json_t *const bytes = json_object_get(json_object_get(e, "args"), "bytes");
        t->comm_bytes += json_is_integer(bytes) && json_integer_value(bytes) >= 0;
    }
    for (int i = 0; i < 4 && w->ckpt[i]; i++)
        t->ckpt[i] += strcmp(cat, "checkpoint") == 0 && strcmp(name, w->ckpt[i]) == 0;
    return true;
}

/* The trace at path against w: one valid JSON object, one named track per rank, well-formed
 * spans, and on every rank each step and optimizer step once, communication spans named by
 * their group kind with their bytes, each checkpoint span once, spans nested. */
static void check_trace(const char *path, const struct want *w)
{
    json_error_t err;
    json_t *const root = json_load_file(path, 0, &err);
    if (!EXPECT(root != NULL, "%s must be valid JSON: %s (line %d)", path, err.text, err.line))
        return;
    const json_t *const events = json_object_get(root, "traceEvents");
    EXPECT(json_is_array(events), "the trace must hold a traceEvents array");
    const char *const unit = json_string_value(json_object_get(root, "displayTimeUnit"));
    EXPECT(unit && strcmp(unit, "ms") == 0, "displayTimeUnit must be \"ms\"");
    struct tally t[MAX_RANKS];
    memset(t, 0, sizeof t);
    int bad = 0;
    size_t i;
    const json_t *e;
    json_array_foreach(events, i, e) {
        const char *const ph = json_string_value(json_object_get(e, "ph"));
        json_int_t const pid = json_integer_value(json_object_get(e, "pid"));
        json_int_t const tid = json_integer_value(json_object_get(e, "tid"));
        if (!ph || pid != 1 || tid < 1 || tid > w->ranks) {
            bad++;
            continue;
        }
        struct tally *const r = &t[tid - 1];
        const char *const name = json_string_value(json_object_get(e, "name"));
        if (strcmp(ph, "M") == 0 && name && strcmp(name, "thread_name") == 0) {
            char want_name[32];
            snprintf(want_name, sizeof want_name, "rank %d", (int)tid - 1);
            const char *const got = json_string_value(
                json_object_get(json_object_get(e, "args"), "name"));
            r->named = got && strcmp(got, want_name) == 0;
        } else if (strcmp(ph, "X") == 0 && !tally_span(r, e, w)) {
            bad++;
        }
    }
    EXPECT(bad == 0, "%d events lack pid 1, a tid of a rank, or (spans) a name, a category "
           "and a non-negative ts and dur", bad);
    for (int r = 0; r < w->ranks; r++) {
        EXPECT(t[r].named, "track %d must be named \"rank %d\"", r + 1, r);
        EXPECT(t[r].spans > 0, "rank %d must have spans", r);
        int opt_wrong = t[r].steps_wrong, step_wrong = 0;
        for (int k = 1; k <= w->steps; k++) {
            opt_wrong += t[r].optimizer[k] != 1;
            step_wrong += t[r].step[k] != 1;
        }
        EXPECT(opt_wrong == 0, "rank %d must have one span \"optimizer step k\" for each of "
               "the %d steps (%d wrong)", r, w->steps, opt_wrong);
        EXPECT(step_wrong == 0, "rank %d must have one span \"step k\" for each of the %d "
               "steps (%d wrong)", r, w->steps, step_wrong);
        if (w->communication) {
            EXPECT(t[r].comm > 0, "rank %d must have collective or p2p spans", r);
            EXPECT(t[r].comm_named == t[r].comm && t[r].comm_bytes == t[r].comm,
                   "rank %d: every communication span must be named \"op kind\" with a "
                   "group kind and carry args.bytes (%d of %d named, %d with bytes)", r,
                   t[r].comm_named, t[r].comm, t[r].comm_bytes);
        }
        for (int c = 0; c < 4 && w->ckpt[c]; c++)
            EXPECT(t[r].ckpt[c] == 1, "rank %d must have one checkpoint span \"%s\", got %d",
                   r, w->ckpt[c], t[r].ckpt[c]);
        EXPECT(t[r].out_of_order == 0, "rank %d: %d spans end before the span written before "
               "them", r, t[r].out_of_order);
        int const crossing = count_crossing(t[r].all, t[r].nall);
        EXPECT(crossing == 0, "rank %d: %d spans overlap another without nesting", r,
               crossing);
        free(t[r].all);
    }
    json_decref(root);
}

/* ---------------------------------------------------------------- 1. the recorder */

/* s escaped, between quotes, decoded by jansson, must give want. */
static void check_escape(const char *s, const char *want)
{
    char esc[512], quoted[520];
    vd_trace_json_escape(esc, sizeof esc, s);
    snprintf(quoted, sizeof quoted, "\"%s\"", esc);
    json_error_t err;
    json_t *const v = json_loads(quoted, JSON_DECODE_ANY, &err);
    EXPECT(v && json_is_string(v), "the escape of \"%s\" must be a JSON string: %s", s,
           err.text);
    EXPECT(v && strcmp(json_string_value(v), want) == 0,
           "the escape of \"%s\" must decode to \"%s\", got \"%s\"", s, want,
           v ? json_string_value(v) : "(nothing)");
    json_decref(v);
}

static void test_recorder(void)
{
    check_escape("allreduce tp", "allreduce tp");
    check_escape("quote\" back\\slash /", "quote\" back\\slash /");
    check_escape("nl\n tab\t cr\r bell\a esc\x1b one\x01 del\x7f", "nl\n tab\t cr\r bell\a "
                 "esc\x1b one\x01 del\x7f");
    check_escape("caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80", "caf\xc3\xa9 \xe4\xb8\xad "
                 "\xf0\x9f\x98\x80");
#define FFFD "\xef\xbf\xbd"
    check_escape("bad \xff byte", "bad " FFFD " byte");
    check_escape("overlong \xc0\xaf", "overlong " FFFD FFFD);
    check_escape("surrogate \xed\xa0\x80", "surrogate " FFFD FFFD FFFD);
    check_escape("cut \xe4\xb8", "cut " FFFD FFFD);
    check_escape("past \xf4\x90\x80\x80", "past " FFFD FFFD FFFD FFFD);
    /* what does not fit is cut at a whole escape */
    char small[4];
    size_t const n = vd_trace_json_escape(small, sizeof small, "ab\"c");
    EXPECT(n == 2 && strcmp(small, "ab") == 0, "escaping ab\"c into 4 bytes must give \"ab\", "
           "got \"%s\" (%zu)", small, n);

    /* one rank's recorder, merged: odd names survive, spans outside start/close do not */
    const char *const path = tp("unit.json");
    EXPECT(!vd_trace_on(), "tracing must be off before a trace is started");
    CU_ASSERT_FATAL(vd_trace_open(path, 0) == 0);
    vd_trace_span("compute", 0.0, 1.0, "before start");
    vd_trace_start();
    EXPECT(vd_trace_on(), "tracing must be on after vd_trace_start");
    double const t0 = vd_trace_now();
    vd_trace_span("compute", t0, t0 + 1e-3, "F c%d mb%d \"q\"\n\xff", 1, 2);
    vd_trace_span_nbytes("p2p", t0, t0 + 2e-3, 4096, "send %s", "pp");
    vd_trace_span("compute", t0 - 10.0, t0 - 5.0, "before zero");
    EXPECT(vd_trace_close() == 0, "closing the part must succeed: %s", vd_err_msg());
    vd_trace_span("compute", t0, t0, "after close");
    CU_ASSERT_FATAL(vd_trace_merge(path, 1) == 0);
    vd_trace_discard(path, 0);
    json_error_t err;
    json_t *const root = json_load_file(path, 0, &err);
    CU_ASSERT_FATAL(root != NULL);
    const json_t *const ev = json_object_get(root, "traceEvents");
    int spans = 0, odd = 0, sent = 0, clamped = 0;
    size_t i;
    const json_t *e;
    json_array_foreach(ev, i, e) {
        if (strcmp(json_string_value(json_object_get(e, "ph")), "X") != 0) continue;
        spans++;
        const char *const name = json_string_value(json_object_get(e, "name"));
        double const dur = json_number_value(json_object_get(e, "dur"));
        odd += strcmp(name, "F c1 mb2 \"q\"\n" FFFD) == 0 && fabs(dur - 1000.0) < 0.01;
        sent += strcmp(name, "send pp") == 0 &&
                json_integer_value(json_object_get(json_object_get(e, "args"), "bytes")) == 4096;
        clamped += strcmp(name, "before zero") == 0 &&
                   json_number_value(json_object_get(e, "ts")) == 0.0 && dur == 0.0;
    }
    EXPECT(spans == 3, "the trace must hold the 3 spans recorded while on, got %d", spans);
    EXPECT(odd == 1, "the odd name must come back decoded, with dur 1000 us");
    EXPECT(sent == 1, "the span with bytes must carry args.bytes = 4096");
    EXPECT(clamped == 1, "a span before time zero must be clamped to ts 0, dur 0");
    json_decref(root);
#undef FFFD

    /* a merge that cannot read a part keeps the old trace and leaves no temporary */
    char *const before = tu_file_read(path, NULL);
    CU_ASSERT_FATAL(vd_trace_open(path, 0) == 0);
    vd_trace_start();
    vd_trace_close();
    EXPECT(vd_trace_merge(path, 2) == VD_EIO, "a merge with rank 1's part missing must fail");
    EXPECT(strstr(vd_err_msg(), "unit.json.rank1.part") != NULL,
           "its message must name the missing part: %s", vd_err_msg());
    vd_trace_discard(path, 0);
    char *const after = tu_file_read(path, NULL);
    EXPECT(before && after && strcmp(before, after) == 0,
           "a failed merge must leave the previous trace as it was");
    EXPECT(!has_leftover(), "no part or temporary file may be left (found %s)", g_leftover);
    free(before);
    free(after);
    unlink(path);
}

/* ---------------------------------------------------------------- 2. runs of vdist */

static void test_two_ranks(void)
{
    tu_vdist_run(&g_run, &g_env, 2, CHILD_TIMEOUT_S,
                 TINY "--train.steps=3 --parallel.ep=2 --ckpt.dir=%s --log.trace=%s",
                 g_env.root, tp("ck"), tp("two.json"));
    if (!EXPECT(g_run.rc == 0, "`%s` must succeed, got %d", g_run.cmd, g_run.rc)) return;
    EXPECT(out_has("trace <TMP>/two.json written"), "rank 0 must say where the trace is");
    struct want const w = {.ranks = 2, .steps = 3, .communication = true,
                           .ckpt = {"ckpt_save step 3"}};
    check_trace(tp("two.json"), &w);
    EXPECT(!has_leftover(), "no part or temporary file may be left (found %s)", g_leftover);
}

static void test_async_checkpoints(void)
{
    tu_vdist_run(&g_run, &g_env, 1, CHILD_TIMEOUT_S,
                 TINY "--train.steps=2 --ckpt.dir=%s --ckpt.interval=1 --ckpt.async=true "
                 "--log.trace=%s", g_env.root, tp("ck_async"), tp("async.json"));
    if (!EXPECT(g_run.rc == 0, "`%s` must succeed, got %d", g_run.cmd, g_run.rc)) return;
    struct want const w = {.ranks = 1, .steps = 2,
                           .ckpt = {"ckpt_save_start step 1", "ckpt_save_finish step 1",
                                    "ckpt_save_start step 2", "ckpt_save_finish step 2"}};
    check_trace(tp("async.json"), &w);
    EXPECT(!has_leftover(), "no part or temporary file may be left (found %s)", g_leftover);
}

static void test_bench(void)
{
    tu_vdist_run(&g_run, &g_env, 2, CHILD_TIMEOUT_S,
                 "bench --config %s/configs/tiny.ini --train.peak_gflops=1 --train.steps=2 "
                 "--log.trace=%s", g_env.root, tp("bench.json"));
    if (!EXPECT(g_run.rc == 0, "`%s` must succeed, got %d", g_run.cmd, g_run.rc)) return;
    struct want const w = {.ranks = 2, .steps = 2, .communication = true};
    check_trace(tp("bench.json"), &w);
}

static void test_off(void)
{
    /* once, so the synthetic dataset it makes is not counted below */
    tu_vdist_run(&g_run, &g_env, 1, CHILD_TIMEOUT_S, TINY "--train.steps=1", g_env.root);
    char *const before = list_files();
    for (int explicit_empty = 0; explicit_empty < 2; explicit_empty++) {
        tu_vdist_run(&g_run, &g_env, 2, CHILD_TIMEOUT_S, TINY "--train.steps=2%s",
                     g_env.root, explicit_empty ? " --log.trace=" : "");
        EXPECT(g_run.rc == 0, "`%s` must succeed, got %d", g_run.cmd, g_run.rc);
        EXPECT(!out_has("written: open it in"), "`%s` must not mention a trace", g_run.cmd);
        char *const after = list_files();
        EXPECT(strcmp(before, after) == 0, "`%s` must create no file; before:\n%s\nafter:\n%s",
               g_run.cmd, before, after);
        free(after);
    }
    free(before);
}

static void test_bad_path(void)
{
    tu_vdist_run(&g_run, &g_env, 2, CHILD_TIMEOUT_S, TINY "--train.steps=1 --log.trace=%s",
                 g_env.root, tp("missing/dir/t.json"));
    EXPECT_REFUSED("log.trace", "<TMP>/missing/dir/t.json", "No such file or directory");
    EXPECT(!tu_file_exists(tp("missing")), "a refused log.trace must create nothing");

    CU_ASSERT_FATAL(mkdir(tp("adir"), 0755) == 0);
    tu_vdist_run(&g_run, &g_env, 2, CHILD_TIMEOUT_S, TINY "--train.steps=1 --log.trace=%s",
                 g_env.root, tp("adir"));
    EXPECT_REFUSED("log.trace = <TMP>/adir is a directory");
    EXPECT(!has_leftover(), "no part or temporary file may be left (found %s)", g_leftover);
}

static void test_failed_run(void)
{
    /* the export at the end fails: model.safetensors cannot replace a directory */
    CU_ASSERT_FATAL(mkdir(tp("ex"), 0755) == 0);
    CU_ASSERT_FATAL(mkdir(tp("ex/model.safetensors"), 0755) == 0);
    tu_vdist_run(&g_run, &g_env, 2, CHILD_TIMEOUT_S,
                 TINY "--train.steps=2 --train.export_to=%s --log.trace=%s", g_env.root, tp("ex"),
                 tp("failed.json"));
    EXPECT(g_run.rc == 2, "`%s` must fail with exit status 2, got %d", g_run.cmd, g_run.rc);
    EXPECT(out_has("<TMP>/ex/model.safetensors"), "the message must name the export, not "
           "the trace");
    EXPECT(!tu_file_exists(tp("failed.json")), "a failed run must write no trace");
    EXPECT(!has_leftover(), "no part or temporary file may be left (found %s)", g_leftover);
}

/* ---------------------------------------------------------------- main */

static int suite_init(void) { return tu_env_init(&g_env, "test_trace", "vdist_trace_"); }

static int suite_clean(void)
{
    tu_tmpdir_remove(g_env.tmp);
    tu_run_free(&g_run);
    return 0;
}

int main(void)
{
    setenv("OMP_NUM_THREADS", "1", 1);
    static const struct tu_test tests[] = {
        {"recorder: JSON escaping of odd names, spans, merge", test_recorder},
        {"2 ranks: one valid trace, every rank's steps, communication, checkpoint",
         test_two_ranks},
        {"asynchronous checkpoints: start and finish spans", test_async_checkpoints},
        {"vdist bench honours log.trace", test_bench},
        {"log.trace empty: no file is created", test_off},
        {"a bad log.trace is refused before training", test_bad_path},
        {"a failed run leaves no trace and no part files", test_failed_run},
    };
    static const struct tu_suite suite = {
        .name = "log.trace",
        .init = suite_init,
        .clean = suite_clean,
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_TIMED_NAMED,
        .program = "test_trace",
    };
    tu_expect_show(&g_run, "command");
    return tu_cunit_main(&suite);
}
