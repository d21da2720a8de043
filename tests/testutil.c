/* What the CUnit suites share; see testutil.h. */
#include "tests/testutil.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <CUnit/Basic.h>

#include "dist/dist.h"

/* ---------------------------------------------------------------- a suite's main */

enum { MAX_TESTS = 256 };

static const struct tu_suite *g_suite;
static CU_pTest g_registered[MAX_TESTS];

/* CUnit calls plain void functions: a timed suite registers this one for every test and it
 * finds which test CUnit is running. */
static void run_timed(void)
{
    CU_pTest const current = CU_get_current_test();
    for (size_t i = 0; i < g_suite->ntests; i++) {
        if (g_registered[i] != current) continue;
        const struct tu_test *const t = &g_suite->tests[i];
        double const t0 = tu_now_s();
        t->fn();
        if (g_suite->timing == TU_TIMED_NAMED)
            printf("\n    (%s: %.1f s)", t->name, tu_now_s() - t0);
        else
            printf("\n    (%.1f s)", tu_now_s() - t0);
        fflush(stdout);
        return;
    }
}

int tu_cunit_main(const struct tu_suite *suite)
{
    if (suite->ntests > MAX_TESTS) {
        fprintf(stderr, "%s: %zu tests, at most %d\n", suite->name, suite->ntests, MAX_TESTS);
        return 1;
    }
    g_suite = suite;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite const s = CU_add_suite(suite->name, suite->init, suite->clean);
    bool ok = s != NULL;
    for (size_t i = 0; ok && i < suite->ntests; i++) {
        g_registered[i] = CU_add_test(s, suite->tests[i].name,
                                      suite->timing == TU_UNTIMED ? suite->tests[i].fn
                                                                  : run_timed);
        ok = g_registered[i] != NULL;
    }
    if (!ok) {
        CU_cleanup_registry();
        return 1;
    }
    double const start = tu_now_s();
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned const failures = CU_get_number_of_failures();
    unsigned const suites_failed = CU_get_number_of_suites_failed();
    double const seconds = tu_now_s() - start;
    if (suite->report) suite->report(seconds);
    if (suite->program) printf("\n%s: %.1f s\n", suite->program, seconds);
    CU_cleanup_registry();
    return failures != 0 || suites_failed != 0;
}

/* ---------------------------------------------------------------- expectations */

static struct tu_run *g_show;
static const char *g_show_label;

void tu_run_free(struct tu_run *run)
{
    free(run->out);
    run->out = NULL;
}

void tu_expect_show(struct tu_run *run, const char *label)
{
    g_show = run;
    g_show_label = label;
}

bool tu_expect_at(bool ok, const char *file, unsigned line, const char *fmt, ...)
{
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    CU_assertImplementation(ok ? CU_TRUE : CU_FALSE, line, msg, file, "", CU_FALSE);
    if (!ok) {
        printf("\n  FAILED (line %u): %s\n", line, msg);
        if (g_show && !g_show->out_shown && g_show->cmd[0]) {
            printf("  %s: %s\n  exit status: %d\n  output:\n%s\n  (end of output)\n",
                   g_show_label, g_show->cmd, g_show->rc, g_show->out ? g_show->out : "");
            g_show->out_shown = true;
        }
        fflush(stdout);
    }
    return ok;
}

static bool out_has(const struct tu_run *run, const char *s)
{
    return run->out && strstr(run->out, s) != NULL;
}

void tu_expect_refused_at(const char *file, unsigned line, const struct tu_run *run,
                          const char *before, const char *const *step_lines,
                          const char *first, ...)
{
    tu_expect_at(run->rc == 1 || run->rc == 2, file, line,
                 "`%s` must fail with exit status 1 or 2 (not 0, a crash or a timeout); "
                 "got %d", run->cmd, run->rc);
    bool trained = false;
    for (const char *const *s = step_lines; *s; s++) trained = trained || out_has(run, *s);
    tu_expect_at(!trained, file, line,
                 "`%s` must fail before %s, but it printed a step line", run->cmd, before);
    va_list ap;
    va_start(ap, first);
    for (const char *s = first; s; s = va_arg(ap, const char *))
        tu_expect_at(out_has(run, s), file, line, "the message of `%s` must contain \"%s\"",
                     run->cmd, s);
    va_end(ap);
}

/* ---------------------------------------------------------------- a sweep's problems */

static char g_first_problem[1024];
static long g_problems;

void tu_problems_reset(void)
{
    g_problems = 0;
    g_first_problem[0] = '\0';
}

void tu_problem(const char *fmt, ...)
{
    if (g_problems++) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_first_problem, sizeof g_first_problem, fmt, ap);
    va_end(ap);
}

bool tu_expect_no_problems_at(const char *file, unsigned line)
{
    return tu_expect_at(g_problems == 0, file, line, "%ld problems; first: %s", g_problems,
                        g_first_problem);
}

/* ---------------------------------------------------------------- running vdist */

int tu_env_init(struct tu_env *env, const char *who, const char *tmp_prefix)
{
    env->tmp[0] = '\0';
    const char *const v = getenv("VDIST");
    const char *const prog = v && *v ? v : "build/vdist";
    if (!realpath(prog, env->vdist) || access(env->vdist, X_OK) != 0) {
        fprintf(stderr, "%s: the program '%s' is not there or not executable (set VDIST or "
                        "run from the repository root after make)\n", who, prog);
        return -1;
    }
    bool const have_root = getcwd(env->root, sizeof env->root) != NULL;
    char tiny[sizeof env->root + 32] = "";
    if (have_root) snprintf(tiny, sizeof tiny, "%s/configs/tiny.ini", env->root);
    if (!have_root || !tu_file_exists(tiny)) {
        fprintf(stderr, "%s: run from the repository root (configs/tiny.ini not found)\n", who);
        return -1;
    }
    if (strpbrk(env->root, "'\"\\ $`") || strpbrk(env->vdist, "'\"\\ $`")) {
        fprintf(stderr, "%s: paths with quotes, blanks or $ are not supported\n", who);
        return -1;
    }
    return tu_tmpdir_create(env->tmp, sizeof env->tmp, tmp_prefix, who) ? 0 : -1;
}

int tu_shell_run(struct tu_run *run, const char *dir, int timeout_s, const char *command)
{
    static const char fmt[] =
        "cd '%s' && OMP_NUM_THREADS=1 timeout -k 5 %d %s > '%s/.captured' 2>&1";
    int const len = snprintf(NULL, 0, fmt, dir, timeout_s, command, dir);
    char *const shell = malloc((size_t)len + 1);
    int st = -1;
    if (shell) {
        snprintf(shell, (size_t)len + 1, fmt, dir, timeout_s, command, dir);
        st = system(shell);
        free(shell);
    }
    if (st == -1) run->rc = -1;
    else if (WIFEXITED(st)) run->rc = WEXITSTATUS(st);
    else if (WIFSIGNALED(st)) run->rc = 128 + WTERMSIG(st);
    else run->rc = -1;
    free(run->out);
    run->out = tu_file_read_masked(tu_path(dir, ".captured"), dir);
    unlink(tu_path(dir, ".captured"));
    run->out_shown = false;
    return run->rc;
}

int tu_vdist_run(struct tu_run *run, const struct tu_env *env, int ranks, int timeout_s,
                 const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *args = NULL;
    int const n = vasprintf(&args, fmt, ap);
    va_end(ap);
    if (n < 0) {
        run->rc = -1;
        return -1;
    }
    char launcher[256] = "";
    if (ranks > 1)
        snprintf(launcher, sizeof launcher,
                 "mpirun --allow-run-as-root --oversubscribe --bind-to none -np %d "
                 "-x OMP_NUM_THREADS %s%s", ranks,
                 run->mpirun_options ? run->mpirun_options : "", run->mpirun_options ? " " : "");
    snprintf(run->cmd, sizeof run->cmd, "cd %s && OMP_NUM_THREADS=1 %s%s %s", env->tmp,
             launcher, env->vdist, args);
    size_t const cap = strlen(launcher) + strlen(env->vdist) + strlen(args) + 8;
    char *const command = malloc(cap);
    run->rc = -1;
    if (command) {
        snprintf(command, cap, "%s'%s' %s", launcher, env->vdist, args);
        tu_shell_run(run, env->tmp, timeout_s, command);
    }
    free(command);
    free(args);
    return run->rc;
}

bool tu_help_lists(const char *text, const char *key)
{
    size_t const n = strlen(key);
    for (const char *line = text; line && *line;) {
        const char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        if (strncmp(p, key, n) == 0 && (p[n] == ' ' || p[n] == '\t')) return true;
        line = strchr(line, '\n');
        if (line) line++;
    }
    return false;
}

/* ---------------------------------------------------------------- files and directories */

double tu_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

char *tu_file_read(const char *path, size_t *nbytes)
{
    FILE *const f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0, got;
    char *b = malloc(cap);
    while ((got = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (cap - n - 1 == 0) b = realloc(b, cap *= 2);
    }
    fclose(f);
    b[n] = '\0';
    if (nbytes) *nbytes = n;
    return b;
}

char *tu_file_read_masked(const char *path, const char *dir)
{
    char *const raw = tu_file_read(path, NULL);
    char *const masked = tu_mask(raw ? raw : "", dir);
    free(raw);
    return masked;
}

bool tu_file_write(const char *path, const void *bytes, size_t nbytes, const char *mode)
{
    FILE *const f = fopen(path, mode);
    if (!f) return false;
    bool const ok = fwrite(bytes, 1, nbytes, f) == nbytes;
    return fclose(f) == 0 && ok;
}

bool tu_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

const char *tu_path(const char *dir, const char *name)
{
    static char buf[8][600];
    static int which;
    which = (which + 1) % 8;
    snprintf(buf[which], sizeof buf[which], "%s/%.500s", dir, name);
    return buf[which];
}

char *tu_mask(const char *s, const char *dir)
{
    size_t const nd = strlen(dir);
    if (nd == 0) return strdup(s);
    size_t cap = strlen(s) + 1, n = 0;
    for (const char *p = s; (p = strstr(p, dir)); p += nd) cap += 5;
    char *const out = malloc(cap);
    for (const char *p = s; *p;) {
        if (strncmp(p, dir, nd) == 0) {
            memcpy(out + n, "<TMP>", 5);
            n += 5;
            p += nd;
        } else {
            out[n++] = *p++;
        }
    }
    out[n] = '\0';
    return out;
}

bool tu_tmpdir_create(char *dir, size_t cap, const char *prefix, const char *who)
{
    snprintf(dir, cap, "/tmp/%sXXXXXX", prefix);
    if (mkdtemp(dir)) return true;
    fprintf(stderr, "%s: mkdtemp: %s\n", who, strerror(errno));
    dir[0] = '\0';
    return false;
}

void tu_tmpdir_remove(const char *dir)
{
    if (dir[0]) vd_remove_tree_quiet(dir);
}

/* ---------------------------------------------------------------- metrics files */

bool tu_jsonl_read(struct tu_jsonl *m, const char *path)
{
    memset(m, 0, sizeof *m);
    char *const text = tu_file_read(path, NULL);
    if (!text) return false;
    size_t cap = 0;
    char *save = NULL;
    for (char *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        if ((size_t)m->n == cap) {
            cap = cap ? 2 * cap : 64;
            m->text = realloc(m->text, cap * sizeof *m->text);
            m->line = realloc(m->line, cap * sizeof *m->line);
            m->error = realloc(m->error, cap * sizeof *m->error);
        }
        json_error_t jerr;
        json_t *o = json_loads(l, 0, &jerr);
        char *error = NULL;
        if (!o) {
            error = strdup(jerr.text);
        } else if (!json_is_object(o)) {
            json_decref(o);
            o = NULL;
            error = strdup("not an object");
        }
        m->text[m->n] = strdup(l);
        m->line[m->n] = o;
        m->error[m->n] = error;
        m->n++;
    }
    free(text);
    return true;
}

void tu_jsonl_free(struct tu_jsonl *m)
{
    for (int i = 0; i < m->n; i++) {
        json_decref(m->line[i]);
        free(m->text[i]);
        free(m->error[i]);
    }
    free(m->text);
    free(m->line);
    free(m->error);
    memset(m, 0, sizeof *m);
}

/* ---------------------------------------------------------------- safetensors files */

int tu_st_read_whole(const ckpt_st_file *f, int i, float **data)
{
    const struct ckpt_st_tensor *const t = ckpt_st_get(f, i);
    *data = malloc((t->numel ? t->numel : 1) * sizeof **data);
    size_t const rows = t->ndim == 0 ? 1 : t->shape[0];
    size_t const cols = rows ? t->numel / rows : 0;
    return ckpt_st_read_block(f, i, *data, 0, rows, 0, cols);
}

bool tu_st_set_load(struct tu_st_set *s, const char *path)
{
    memset(s, 0, sizeof *s);
    ckpt_st_file *f = NULL;
    if (!TU_EXPECT(ckpt_st_open(&f, path) == 0, "ckpt_st_open(%s) must succeed: %s", path,
                   vd_err_msg()))
        return false;
    int const n = ckpt_st_count(f);
    s->n = n;
    s->name = calloc((size_t)n, sizeof *s->name);
    s->dtype = calloc((size_t)n, sizeof *s->dtype);
    s->ndim = calloc((size_t)n, sizeof *s->ndim);
    s->shape = calloc((size_t)n, sizeof *s->shape);
    s->numel = calloc((size_t)n, sizeof *s->numel);
    s->data = calloc((size_t)n, sizeof *s->data);
    bool ok = true;
    for (int i = 0; i < n; i++) {
        const struct ckpt_st_tensor *const t = ckpt_st_get(f, i);
        s->name[i] = strdup(t->name);
        s->dtype[i] = t->dtype;
        s->ndim[i] = t->ndim;
        memcpy(s->shape[i], t->shape, sizeof s->shape[i]);
        s->numel[i] = t->numel;
        ok = ok && TU_EXPECT(tu_st_read_whole(f, i, &s->data[i]) == 0,
                             "reading tensor '%s' of %s must succeed: %s", t->name, path,
                             vd_err_msg());
    }
    ckpt_st_close(f);
    return ok;
}

int tu_st_set_find(const struct tu_st_set *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->name[i], name) == 0) return i;
    return -1;
}

void tu_st_set_free(struct tu_st_set *s)
{
    for (int i = 0; i < s->n; i++) {
        free(s->name[i]);
        free(s->data[i]);
    }
    free(s->name);
    free(s->dtype);
    free(s->ndim);
    free(s->shape);
    free(s->numel);
    free(s->data);
    memset(s, 0, sizeof *s);
}

/* ---------------------------------------------------------------- MPI suites */

int tu_mpirun_self(const struct tu_mpirun *how, int np, const char *arg, bool corrupt,
                   char **out)
{
    *out = NULL;
    char exe[4096];
    ssize_t const len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) return -1;
    exe[len] = '\0';
    char path[] = "/tmp/vdist_mpirun_self_XXXXXX";
    int const fd = mkstemp(path);
    if (fd < 0) return -1;
    unlink(path);

    char nbuf[16];
    snprintf(nbuf, sizeof nbuf, "%d", np);
    fflush(stdout);
    pid_t const pid = fork();
    if (pid == 0) {
        setenv(how->ranks_env, nbuf, 1);
        setenv("OMP_NUM_THREADS", "1", 1);
        if (corrupt) setenv(how->corrupt_env, "1", 1);
        else unsetenv(how->corrupt_env);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        char *const args[] = {"mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to",
                              "none", "-np", nbuf, exe, (char *)arg, NULL};
        execvp(args[0], args);
        perror("execvp mpirun");
        _exit(127);
    }
    int status = -1;
    if (pid > 0) {
        struct timespec const tick = {0, 20 * 1000 * 1000};
        int waited_ms = 0;
        pid_t done = 0;
        while ((done = waitpid(pid, &status, WNOHANG)) == 0 &&
               waited_ms < how->timeout_s * 1000) {
            nanosleep(&tick, NULL);
            waited_ms += 20;
        }
        if (done == 0) {
            kill(pid, SIGTERM);
            sleep(3);
            if (waitpid(pid, &status, WNOHANG) == 0) {
                kill(pid, SIGKILL);
                waitpid(pid, &status, 0);
            }
            dprintf(fd, "\n[driver] mpirun killed after %d s\n", how->timeout_s);
            status = -1;
        }
    }
    off_t const size = lseek(fd, 0, SEEK_END);
    char *const text = malloc(size > 0 ? (size_t)size + 1 : 1);
    size_t got = 0;
    if (text && size > 0 && lseek(fd, 0, SEEK_SET) == 0)
        for (ssize_t n; got < (size_t)size && (n = read(fd, text + got, (size_t)size - got)) > 0;)
            got += (size_t)n;
    if (text) text[got] = '\0';
    close(fd);
    *out = text;
    return status;
}

bool tu_exited_zero(int status)
{
    return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static bool g_corrupt_pending;

void tu_fill_nan(float *x, size_t count)
{
    for (size_t i = 0; i < count; i++) x[i] = NAN;
}

bool tu_exact_differs(float got, long long expect)
{
    if (g_corrupt_pending) {
        expect += 1;
        g_corrupt_pending = false;
    }
    return !(got == (float)expect);
}

void tu_exact_corrupt(bool on) { g_corrupt_pending = on; }

void tu_model_config(struct model_config *cfg, const struct tu_model_sizes *s)
{
    model_config_defaults(cfg);
    cfg->vocab_size = s->vocab;
    cfg->hidden_size = s->d;
    cfg->intermediate_size = s->ffn;
    cfg->num_hidden_layers = s->layers;
    cfg->num_attention_heads = s->heads;
    cfg->num_key_value_heads = s->kv_heads;
    cfg->num_local_experts = s->experts;
    cfg->num_experts_per_tok = s->k;
    VD_CHECK(model_config_validate(cfg) == 0, "%s", vd_err_msg());
}

bool tu_mpi_start(const struct tu_mpirun *how, int *argc, char ***argv, int ranks)
{
    dist_init(argc, argv);
    int const world = dist_world_size();
    if (world == ranks) return true;
    if (dist_world_rank() == 0)
        printf("%s=%d but the world has %d ranks\n", how->ranks_env, ranks, world);
    fflush(stdout);
    dist_finalize();
    return false;
}

void tu_wrong_at(struct tu_tally *ty, int c, const char *fmt, ...)
{
    VD_CHECK(c >= 0 && c < ty->nchecks && ty->nchecks <= TU_CHECKS_MAX,
             "check %d of a tally of %d", c, ty->nchecks);
    ty->wrong[c]++;
    if (ty->printed[c]++ >= 3) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("  [rank %d] %s: %s: %s\n", dist_world_rank(), ty->where, ty->names[c], msg);
    fflush(stdout);
}

long long tu_tally_world(const struct tu_tally *ty, long long *all)
{
    DIST_CHECK_MPI(MPI_Allreduce(ty->wrong, all, ty->nchecks, MPI_LONG_LONG, MPI_SUM,
                                 MPI_COMM_WORLD));
    long long sum = 0;
    for (int c = 0; c < ty->nchecks; c++) sum += all[c];
    if (sum != 0 && dist_world_rank() == 0) {
        printf("  %s: wrong %lld:", ty->where, sum);
        for (int c = 0; c < ty->nchecks; c++)
            if (all[c]) printf(" %s %lld", ty->names[c], all[c]);
        printf("\n");
        fflush(stdout);
    }
    return sum;
}
