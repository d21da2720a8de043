/* tests/testutil: what the CUnit suites share, linked into every test binary (the Makefile
 * links every C file of tests/ whose name does not start with test_ into each suite).
 *
 *   a suite's main         struct tu_suite, tu_cunit_main
 *   expectations           TU_EXPECT, tu_expect_show, tu_expect_refused_at
 *   a sweep's problems     tu_problems_reset, tu_problem, TU_EXPECT_NO_PROBLEMS
 *   running vdist          struct tu_env, tu_env_init, struct tu_run, tu_shell_run,
 *                          tu_vdist_run, tu_run_free, tu_help_lists
 *   files and directories  tu_now_s, tu_file_read, tu_file_read_masked, tu_file_write,
 *                          tu_file_exists, tu_path, tu_mask, tu_tmpdir_create,
 *                          tu_tmpdir_remove
 *   metrics files          struct tu_jsonl, tu_jsonl_read, tu_jsonl_free
 *   safetensors files      struct tu_st_set, tu_st_set_load, tu_st_set_find,
 *                          tu_st_set_free, tu_st_read_whole
 *   test models            struct tu_model_sizes, tu_model_config
 *   MPI suites             struct tu_mpirun, tu_mpirun_self, tu_exited_zero, tu_mpi_start,
 *                          tu_fill_nan, tu_exact_corrupt, tu_exact_differs, struct
 *                          tu_tally, tu_wrong_at, tu_tally_world
 *
 * Error rule: a helper that checks something a test relies on (tu_st_set_load,
 * tu_expect_refused_at, tu_expect_no_problems_at) makes its CUnit assertions through
 * TU_EXPECT, exactly as many as its comment says, so a suite's assertion count does not
 * depend on where the helper lives; every other helper asserts nothing and reports failure
 * by its return value (false, NULL or -1). */
#ifndef VDIST_TESTUTIL_H
#define VDIST_TESTUTIL_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>

#include <CUnit/CUnit.h>
#include <jansson.h>

#include "ckpt/ckpt.h"

/* ---------------------------------------------------------------- a suite's main */

struct tu_test {
    const char *name;
    void (*fn)(void);
};

/* What tu_cunit_main prints after each test. */
enum tu_timing {
    TU_UNTIMED,     /* nothing */
    TU_TIMED,       /* "(T s)" */
    TU_TIMED_NAMED, /* "(name: T s)" */
};

struct tu_suite {
    const char *name;            /* the CUnit suite */
    CU_InitializeFunc init;      /* NULL: none */
    CU_CleanupFunc clean;        /* NULL: none */
    const struct tu_test *tests; /* run in this order */
    size_t ntests;
    enum tu_timing timing;
    /* not NULL: called after the last test with the run's seconds, before the program line
     * (a suite's closing summary) */
    void (*report)(double seconds);
    const char *program; /* not NULL: "<program>: T s" closes the output (the whole run) */
};

/* The whole of a suite's main once its environment is set: registers the tests as one
 * CUnit suite, runs it in verbose mode and returns main's exit status: 0 when the suite's
 * init succeeded and every assertion passed, else 1. */
int tu_cunit_main(const struct tu_suite *suite);

/* ---------------------------------------------------------------- expectations */

/* A command a suite ran: what failure reports show of it. tu_shell_run fills all but cmd,
 * which the caller writes in the form its messages quote. */
struct tu_run {
    char cmd[16384]; /* the command line */
    char *out;       /* its stdout and stderr (NULL before the first run; tu_run_free) */
    int rc;          /* its exit status */
    bool out_shown;  /* a failure already printed out; cleared by every run */
    const char *mpirun_options; /* tu_vdist_run: more mpirun options, e.g. "--mca btl
                                   tcp,self"; NULL: none */
};

void tu_run_free(struct tu_run *run);

/* Makes every later failed expectation print run's command (introduced by `label`, e.g.
 * "command"), exit status and output, once per run. NULL: nothing more is printed. */
void tu_expect_show(struct tu_run *run, const char *label);

/* One CUnit assertion of ok at file:line, with the printf-style message; a failure also
 * prints the message at once (with the run of tu_expect_show). Returns ok, so a test can
 * branch on it. Use through TU_EXPECT. */
__attribute__((format(printf, 4, 5))) bool tu_expect_at(bool ok, const char *file,
                                                        unsigned line, const char *fmt, ...);
#define TU_EXPECT(cond, ...) tu_expect_at((cond), __FILE__, __LINE__, __VA_ARGS__)

/* run was refused: one assertion that its exit status is 1 or 2 (not 0, a crash or a
 * timeout), one that its output holds none of the NULL-terminated `step_lines` (it
 * trained nothing; the message says it must fail before `before`, e.g. "the first
 * training step"), and one per string of the NULL-terminated list from `first` that the
 * output must contain. Suites wrap it in a macro that passes __FILE__, __LINE__ and the
 * closing NULL. */
void tu_expect_refused_at(const char *file, unsigned line, const struct tu_run *run,
                          const char *before, const char *const *step_lines,
                          const char *first, ...);

/* ---------------------------------------------------------------- a sweep's problems */

/* A test that checks thousands of cases asserts once: tu_problems_reset before the sweep,
 * tu_problem for everything found wrong (only the first one's text is kept), then
 * TU_EXPECT_NO_PROBLEMS: one assertion that none was found, whose failure prints how many
 * and the first. */
void tu_problems_reset(void);
__attribute__((format(printf, 1, 2))) void tu_problem(const char *fmt, ...);
bool tu_expect_no_problems_at(const char *file, unsigned line);
#define TU_EXPECT_NO_PROBLEMS() tu_expect_no_problems_at(__FILE__, __LINE__)

/* ---------------------------------------------------------------- running vdist */

/* Where a suite that runs the vdist program works. */
struct tu_env {
    char vdist[PATH_MAX]; /* the program, an absolute path */
    char root[1024];      /* the repository root (the working directory at start) */
    char tmp[64];         /* the suite's temporary directory; "" until made */
};

/* For a suite's init: env->vdist from $VDIST (default build/vdist), which must be
 * executable; env->root the working directory, which must hold configs/tiny.ini; neither
 * may hold a quote, blank, backslash or $ (both go into shell commands as they are); and
 * a fresh env->tmp, /tmp/<tmp_prefix>XXXXXX. On failure prints why to stderr, beginning
 * with `who`, and returns -1; else 0. */
int tu_env_init(struct tu_env *env, const char *who, const char *tmp_prefix);

/* Runs the shell command line `command` inside dir with OMP_NUM_THREADS=1, killed after
 * timeout_s seconds (SIGTERM, SIGKILL 5 s later), its stdout and stderr captured through
 * dir/.captured (removed after). Sets run->out (every occurrence of dir replaced by
 * "<TMP>") and run->rc: the exit status, 128 + signal when it died of one, 124 or 137 after
 * the timeout, -1 when it could not run; clears run->out_shown. Returns run->rc. */
int tu_shell_run(struct tu_run *run, const char *dir, int timeout_s, const char *command);

/* Runs `vdist ARGS` (env->vdist; ARGS printf-style) on `ranks` ranks (1: directly, as a
 * user runs one rank; more: under mpirun --allow-run-as-root --oversubscribe --bind-to none,
 * OMP_NUM_THREADS passed on, and run->mpirun_options) inside env->tmp through tu_shell_run, and writes into run->cmd
 * a command line that reproduces the run from a shell. Returns run->rc. */
__attribute__((format(printf, 5, 6))) int tu_vdist_run(struct tu_run *run,
                                                       const struct tu_env *env, int ranks,
                                                       int timeout_s, const char *fmt, ...);

/* Whether a line of a help text lists `key`: starts, after blanks, with key and a blank. */
bool tu_help_lists(const char *text, const char *key);

/* ---------------------------------------------------------------- files and directories */

/* Seconds on the monotonic clock. */
double tu_now_s(void);

/* The whole file, NUL-terminated (caller frees), its size in *nbytes (may be NULL); NULL
 * when it cannot be opened. */
char *tu_file_read(const char *path, size_t *nbytes);
/* The file as text with every occurrence of dir replaced by "<TMP>"; "" when it cannot be
 * read. Never NULL; caller frees. */
char *tu_file_read_masked(const char *path, const char *dir);
/* Writes (mode "wb") or appends (mode "ab") nbytes; false when any of it failed. */
bool tu_file_write(const char *path, const void *bytes, size_t nbytes, const char *mode);
bool tu_file_exists(const char *path);

/* dir/name in a rotating static buffer: eight results stay valid at once. */
const char *tu_path(const char *dir, const char *name);
/* s with every occurrence of dir replaced by "<TMP>", so a number in a random directory
 * name cannot satisfy a check; a new string (caller frees). */
char *tu_mask(const char *s, const char *dir);

/* Makes a fresh directory /tmp/<prefix>XXXXXX in dir (cap bytes). On failure prints
 * "<who>: mkdtemp: <reason>" to stderr, leaves dir "" and returns false. */
bool tu_tmpdir_create(char *dir, size_t cap, const char *prefix, const char *who);
/* Removes dir and everything under it (rm -r); nothing when dir is "". */
void tu_tmpdir_remove(const char *dir);

/* ---------------------------------------------------------------- metrics files */

/* A JSON-lines file (a metrics file), line by line; empty lines are skipped. */
struct tu_jsonl {
    int n;         /* lines */
    char **text;   /* line i as written, without its newline */
    json_t **line; /* line i parsed; NULL when it is not a JSON object */
    char **error;  /* why line[i] is NULL: "not an object" or the parser's message */
};

/* Reads path into m (tu_jsonl_free it, also after false); false when it cannot be read. */
bool tu_jsonl_read(struct tu_jsonl *m, const char *path);
void tu_jsonl_free(struct tu_jsonl *m);

/* ---------------------------------------------------------------- safetensors files */

/* Reads tensor i of f whole, converted to f32, into a new *data of numel elements (at least
 * one; caller frees, also on failure). Returns ckpt_st_read_block's result. */
int tu_st_read_whole(const ckpt_st_file *f, int i, float **data);

/* Every tensor of a safetensors file in file order, read as f32. */
struct tu_st_set {
    int n;
    char **name;
    enum ckpt_dtype *dtype; /* as stored */
    int *ndim;
    size_t (*shape)[4];
    size_t *numel;
    float **data;
};

/* Loads the file at path: one assertion that it opens, then one per tensor that it reads.
 * Returns whether all held; tu_st_set_free s in any case. */
bool tu_st_set_load(struct tu_st_set *s, const char *path);
/* The index of the tensor called name, or -1. */
int tu_st_set_find(const struct tu_st_set *s, const char *name);
void tu_st_set_free(struct tu_st_set *s);

/* ---------------------------------------------------------------- test models */

/* The sizes of a small model a suite builds in code. */
struct tu_model_sizes {
    int vocab, d, ffn, layers, heads, kv_heads, experts, k;
};
/* cfg with those sizes and model_config_defaults for everything else; aborts (VD_CHECK)
 * when they do not validate. */
void tu_model_config(struct model_config *cfg, const struct tu_model_sizes *s);

/* ---------------------------------------------------------------- MPI suites */

/* An MPI suite is one file and two programs: main runs the CUnit driver unless ranks_env is
 * set, in which case it is one rank of the MPI program the driver started with
 * tu_mpirun_self. */
struct tu_mpirun {
    const char *ranks_env;   /* set to the rank count in the ranks, e.g. VDIST_COLL_RANKS */
    const char *corrupt_env; /* set to "1" when a run asks for corruption, else removed */
    int timeout_s;           /* a run that takes longer is stopped */
};

/* Runs this executable under `mpirun --allow-run-as-root --oversubscribe --bind-to none
 * -np np` with how->ranks_env=np, OMP_NUM_THREADS=1, how->corrupt_env as `corrupt` says,
 * and arg (NULL: none) as its argument. *out gets its stdout and stderr (caller frees; NULL
 * when it could not start). A run past how->timeout_s gets SIGTERM (mpirun passes it on to
 * its ranks), SIGKILL 3 s later, and a line "[driver] mpirun killed after N s" at the end of
 * its output. Returns the wait status, -1 when it could not run or timed out. */
int tu_mpirun_self(const struct tu_mpirun *how, int np, const char *arg, bool corrupt,
                   char **out);
/* A wait status of tu_mpirun_self that says exit 0. */
bool tu_exited_zero(int status);

/* Exact mode: inputs are small integers stored as fp32, so a result must equal its
 * expectation, computed in integers, bit for bit. Outputs are filled with NaN first, which
 * equals nothing, so an element a collective failed to write counts as wrong. */
void tu_fill_nan(float *x, size_t count);
/* Whether got differs from expect. After tu_exact_corrupt(true) the next call compares with
 * expect + 1 instead, once: how a driver shows that one wrong element fails a run (an MPI
 * program calls it on world rank 0 when how->corrupt_env is "1"). */
bool tu_exact_differs(float got, long long expect);
void tu_exact_corrupt(bool on);

/* The MPI program's start: dist_init, then whether the world has `ranks` ranks (the count
 * the driver put in how->ranks_env). When it has not, rank 0 says so, the program leaves
 * MPI (dist_finalize) and false comes back: main then returns 2. */
bool tu_mpi_start(const struct tu_mpirun *how, int *argc, char ***argv, int ranks);

/* Wrong elements of one case of an exact-mode MPI program, counted per check. Set names,
 * nchecks and where; zero the rest. */
enum { TU_CHECKS_MAX = 16 };
struct tu_tally {
    const char *const *names; /* each check's name, nchecks of them */
    int nchecks;              /* at most TU_CHECKS_MAX */
    const char *where;        /* the case, e.g. "<layout> <dispatcher> <scenario>" */
    long long wrong[TU_CHECKS_MAX];
    int printed[TU_CHECKS_MAX];
};
/* Counts one wrong element of check c; the first three of each check are printed as
 * "  [rank R] <where>: <check>: <message>". */
__attribute__((format(printf, 3, 4))) void tu_wrong_at(struct tu_tally *ty, int c,
                                                       const char *fmt, ...);
/* Collective over the world: every rank's counts of ty summed into all (nchecks of them)
 * and their total returned; rank 0 prints "  <where>: wrong N: <check> n ..." naming the
 * checks that were wrong when the total is not 0. */
long long tu_tally_world(const struct tu_tally *ty, long long *all);

#endif
