/* The `vdist` program as a user runs it: help, every kind of bad input (config, data,
 * weights) refused before training with exit status 1 or 2 and a message naming what is
 * wrong, the Hugging Face export round trip, a short training run that learns the
 * synthetic dataset toward its entropy floor with a complete metrics file, failed
 * exports that leave nothing half-written, the all-to-all dispatcher on a kernel that
 * refuses its direct writes between ranks, pipeline sizes refused on every rank (mpirun,
 * each rank's exit status printed by a shell around it), context-parallel sizes and
 * exchanges refused the same way, and the warning of a pipeline with fewer micro-batches
 * than stages.
 *
 * For that last test this executable is also a launcher: started with
 * VDIST_CLI_DENY_WRITEV=1 and a program with its arguments, it installs a seccomp filter
 * under which process_vm_writev fails with EPERM (as ptrace rules or a container make it
 * fail) and executes the program; mpirun starts each rank that way.
 *
 * Runs build/vdist (or $VDIST) from the repository root; every child runs with
 * OMP_NUM_THREADS=1 inside a fresh /tmp/vdist_cli_XXXXXX, which is removed at the end.
 * Messages are checked with the temporary directory's path replaced by "<TMP>", so a
 * number in the random name can never satisfy a check. */
#include <ftw.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <CUnit/CUnit.h>
#include <jansson.h>

#include "launch/launch.h"
#include "tests/testutil.h"

/* A child that runs longer than this is killed (exit status 124 or 137): a hang fails the
 * test instead of the suite. */
#define CHILD_TIMEOUT_S 150

static struct tu_env g_env; /* g_env.tmp is the working directory of every child */
static struct tu_run g_run; /* the last command ("vdist ARGS"), its output with "<TMP>" */

/* ---------------------------------------------------------------- helpers */

#define EXPECT(cond, ...) TU_EXPECT(cond, __VA_ARGS__)

/* g_env.tmp/name in a rotating static buffer (eight live at once). */
static const char *tp(const char *name) { return tu_path(g_env.tmp, name); }

/* Runs `vdist ARGS` inside g_env.tmp with stdout and stderr captured; returns the exit
 * status (128 + signal when the program died of one, 124/137 after the timeout). */
__attribute__((format(printf, 1, 2))) static int run_vdist(const char *fmt, ...)
{
    char args[6144];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(g_run.cmd, sizeof g_run.cmd, "vdist %s", args);
    char command[PATH_MAX + sizeof args + 8];
    snprintf(command, sizeof command, "'%s' %s", g_env.vdist, args);
    return tu_shell_run(&g_run, g_env.tmp, CHILD_TIMEOUT_S, command);
}

static bool out_has(const char *s) { return strstr(g_run.out, s) != NULL; }

/* `word` occurs in the output with no letter, digit, '_' or '.' on either side. */
static bool out_has_word(const char *word)
{
    size_t const n = strlen(word);
    for (const char *p = g_run.out; (p = strstr(p, word)); p++) {
        char const before = p == g_run.out ? ' ' : p[-1], after = p[n];
        bool const lb = !(before == '_' || before == '.' || (before >= '0' && before <= '9') ||
                          (before >= 'a' && before <= 'z') || (before >= 'A' && before <= 'Z'));
        bool const la = !(after == '_' || (after >= '0' && after <= '9') ||
                          (after >= 'a' && after <= 'z') || (after >= 'A' && after <= 'Z'));
        if (lb && la) return true;
    }
    return false;
}

/* A refusal: exit status 1 or 2 (not 0, not a crash or timeout), no training step, and
 * the message contains every string of the NULL-terminated list. */
static const char *const step_lines[] = {"step 1/", NULL};
#define EXPECT_REFUSED(...)                                                                \
    tu_expect_refused_at(__FILE__, __LINE__, &g_run, "the first training step", step_lines, \
                         __VA_ARGS__, (const char *)NULL)

/* An llm.c token file: 256-int32 header (magic, version, count_in_header), then the
 * tokens as uint16 (version 1) or uint32 (otherwise). */
static bool write_llmc(const char *path, int32_t version, int32_t count_in_header,
                       const uint32_t *tok, size_t n)
{
    size_t const elem = version == 1 ? 2 : 4;
    size_t const nbytes = 1024 + n * elem;
    unsigned char *b = calloc(nbytes, 1);
    uint32_t const fields[3] = {20240520u, (uint32_t)version, (uint32_t)count_in_header};
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < 4; i++) b[4 * k + i] = (unsigned char)(fields[k] >> (8 * i));
    for (size_t t = 0; t < n; t++)
        for (size_t i = 0; i < elem; i++)
            b[1024 + t * elem + i] = (unsigned char)(tok[t] >> (8 * i));
    bool const ok = tu_file_write(path, b, nbytes, "wb");
    free(b);
    return ok;
}

/* ---------------------------------------------------------------- fixtures */

/* root/configs/NAME.ini in a buffer of its own (stable while the rotating ones turn). */
static const char *config_path(const char *name)
{
    static char buf[3][1536];
    int const i = strcmp(name, "tiny") == 0 ? 0 : strcmp(name, "small") == 0 ? 1 : 2;
    snprintf(buf[i], sizeof buf[i], "%s/configs/%.100s.ini", g_env.root, name);
    return buf[i];
}

/* The synthetic dataset at the tiny model's vocabulary, made once. */
static const char *synth64(void)
{
    static bool made;
    static char path[512];
    snprintf(path, sizeof path, "%s", tp("synth64.bin"));
    if (!made) {
        run_vdist("data synth %s --vocab 64 --tokens 20000", path);
        EXPECT(g_run.rc == 0, "`%s` must succeed, got exit status %d", g_run.cmd, g_run.rc);
        made = g_run.rc == 0 && tu_file_exists(path);
    }
    return path;
}

/* configs/tiny.ini trained one step and exported to g_env.tmp/base, made once. */
static bool base_export(void)
{
    static int state; /* 0 not tried, 1 made, -1 failed */
    if (state == 0) {
        run_vdist("train --config %s --train.steps=1 --data.path=%s --train.export_to=%s",
                  config_path("tiny"), synth64(), tp("base"));
        bool const ok = EXPECT(g_run.rc == 0, "the base export `%s` must succeed, got %d",
                               g_run.cmd, g_run.rc) &
                        EXPECT(tu_file_exists(tp("base/model.safetensors")) &&
                                   tu_file_exists(tp("base/config.json")),
                               "the base export must write model.safetensors and config.json");
        state = ok ? 1 : -1;
    }
    return state == 1;
}

/* Writes s as F32 safetensors, leaving out tensor `skip` (-1: none), in reverse order
 * when `reverse`, plus one extra tensor when extra_name is set. */
static bool st_set_write(const struct tu_st_set *s, const char *path, int skip, bool reverse,
                         const char *extra_name, int extra_ndim, const size_t *extra_shape,
                         const float *extra_data)
{
    struct ckpt_st_write_tensor *w = calloc((size_t)s->n + 1, sizeof *w);
    int n = 0;
    for (int k = 0; k < s->n; k++) {
        int const i = reverse ? s->n - 1 - k : k;
        if (i == skip) continue;
        w[n].name = s->name[i];
        w[n].ndim = s->ndim[i];
        memcpy(w[n].shape, s->shape[i], sizeof w[n].shape);
        w[n].data = s->data[i];
        n++;
    }
    if (extra_name) {
        w[n].name = extra_name;
        w[n].ndim = extra_ndim;
        for (int d = 0; d < extra_ndim; d++) w[n].shape[d] = extra_shape[d];
        w[n].data = extra_data;
        n++;
    }
    const char *const keys[] = {"format"}, *const values[] = {"pt"};
    int const rc = ckpt_st_write(path, w, n, keys, values, 1);
    free(w);
    return EXPECT(rc == 0, "ckpt_st_write(%s) must succeed: %s", path, vd_err_msg());
}

/* Any "*.tmp.*" file (a writer's temporary) under dir, recursively; its path in found. */
static char g_found_tmp[PATH_MAX];
static int find_tmp_cb(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)sb;
    (void)type;
    if (strstr(path + ftw->base, ".tmp.")) {
        snprintf(g_found_tmp, sizeof g_found_tmp, "%s", path);
        return 1;
    }
    return 0;
}
static bool tree_has_tmp(const char *dir)
{
    g_found_tmp[0] = '\0';
    return nftw(dir, find_tmp_cb, 16, FTW_PHYS) == 1;
}

/* ---------------------------------------------------------------- 1. help */

static void test_help(void)
{
    run_vdist("--help");
    EXPECT(g_run.rc == 0, "`vdist --help` must exit 0, got %d", g_run.rc);
    EXPECT(out_has("train") && out_has("bench") && out_has("data"),
           "`vdist --help` must list the commands train, bench and data");

    run_vdist("%s", "");
    EXPECT(g_run.rc == 2, "`vdist` without a command must exit 2, got %d", g_run.rc);
    EXPECT(out_has("usage"), "`vdist` without a command must print the usage");

    /* The key names are a contract with users' files: written out here, a sample of
     * every section, each of which must start a line of the help table. */
    static const char *const keys[] = {
        "model.vocab_size", "model.hidden_size", "model.num_experts_per_tok",
        "model.moe_capacity_factor", "model.moe_drop_policy", "model.config",
        "train.steps", "train.global_batch", "train.micro_batch", "train.seq_len",
        "train.lr", "train.lr_schedule", "train.init_from", "train.export_to",
        "data.path", "data.dtype", "parallel.tp", "parallel.cp", "parallel.cp_comm_type",
        "parallel.ep", "parallel.pp",
        "parallel.vpp", "parallel.pp_layers", "parallel.pp_schedule", "parallel.order",
        "ckpt.dir", "ckpt.interval", "ckpt.keep", "log.metrics", "log.trace", "log.interval",
    };
    for (int b = 0; b < 2; b++) {
        run_vdist("%s --help", b ? "bench" : "train");
        EXPECT(g_run.rc == 0, "`%s` must exit 0, got %d", g_run.cmd, g_run.rc);
        EXPECT(!out_has("step 1/"), "`%s` must not train", g_run.cmd);
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
            EXPECT(tu_help_lists(g_run.out, keys[i]),
                   "`%s` must list the key %s at the start of a line", g_run.cmd, keys[i]);
        EXPECT(out_has("position|probs") && out_has("constant|cosine") &&
                   out_has("uint16|uint32") && out_has("auto|1f1b|interleaved|gpipe") &&
                   out_has("p2p|allgather"),
               "`%s` must show the allowed values of the enumerations", g_run.cmd);
    }

    run_vdist("data --help");
    EXPECT(g_run.rc == 0, "`vdist data --help` must exit 0, got %d", g_run.rc);
    EXPECT(out_has("text") && out_has("synth") && out_has("info"),
           "`vdist data --help` must list text, synth and info");
    run_vdist("data synth --help");
    EXPECT(g_run.rc == 0, "`vdist data synth --help` must exit 0, got %d", g_run.rc);
    EXPECT(out_has("--vocab") && out_has("--tokens") && out_has("--states"),
           "`vdist data synth --help` must list its options");

    run_vdist("frobnicate --config %s", config_path("tiny"));
    EXPECT(g_run.rc == 2, "an unknown command must exit 2, got %d", g_run.rc);
    EXPECT(out_has("frobnicate"), "the message must name the unknown command");
    run_vdist("data frobnicate");
    EXPECT(g_run.rc == 2, "an unknown data command must exit 2, got %d", g_run.rc);
    EXPECT(out_has("frobnicate"), "the message must name the unknown data command");
}

/* ---------------------------------------------------------------- 2. config errors */

static void test_config_errors(void)
{
    const char *const tiny = config_path("tiny");
    const char *const data = synth64();
    char base[PATH_MAX * 2];
    snprintf(base, sizeof base, "train --config %s --data.path=%s --train.steps=2", tiny, data);

    /* The control: the same command without the fault trains. */
    run_vdist("%s", base);
    EXPECT(g_run.rc == 0 && out_has("step 2/2"), "the control run `%s` must train, got %d",
           g_run.cmd, g_run.rc);

    run_vdist("%s --train.stpes=3", base);
    EXPECT_REFUSED("train.stpes", "did you mean", "train.steps");
    run_vdist("%s --model.hiden_size=32", base);
    EXPECT_REFUSED("model.hiden_size", "model.hidden_size");

    run_vdist("%s --train.seq_len=abc", base);
    EXPECT_REFUSED("train.seq_len", "abc", "integer");
    run_vdist("%s --train.global_batch=4.5", base);
    EXPECT_REFUSED("train.global_batch", "4.5", "integer");

    run_vdist("%s --train.micro_batch=-2", base);
    EXPECT_REFUSED("train.micro_batch", "-2", ">= 1");
    run_vdist("%s --train.lr=-0.001", base);
    EXPECT_REFUSED("train.lr", "-0.001", ">= 0");

    run_vdist("%s --model.moe_drop_policy=random", base);
    EXPECT_REFUSED("model.moe_drop_policy", "random", "position", "probs");
    run_vdist("%s --data.dtype=int8", base);
    EXPECT_REFUSED("data.dtype", "int8", "uint16", "uint32");

    run_vdist("%s --model.hidden_size=30", base);
    EXPECT_REFUSED("model.hidden_size", "30", "num_attention_heads");

    run_vdist("%s --train.global_batch=5", base);
    EXPECT_REFUSED("train.global_batch", "5", "train.micro_batch");

    run_vdist("%s --model.num_experts_per_tok=9", base);
    EXPECT_REFUSED("num_experts_per_tok", "9", "num_local_experts", "8");

    run_vdist("train --config %s --data.path=%s", tp("no_such.ini"), data);
    EXPECT_REFUSED("<TMP>/no_such.ini");

    /* Line 4 is neither a section, a key nor a comment; line 3 of the second file has a
     * value that does not parse; line 2 of the third names an unknown key. */
    static const char bad_syntax[] = "[model]\n# d = 32\nvocab_size = 64\nthis is not ini\n";
    CU_ASSERT_FATAL(tu_file_write(tp("bad_syntax.ini"), bad_syntax, sizeof bad_syntax - 1, "wb"));
    run_vdist("train --config %s --data.path=%s", tp("bad_syntax.ini"), data);
    EXPECT_REFUSED("<TMP>/bad_syntax.ini:4");
    static const char bad_value[] = "[train]\n\nsteps = many\n";
    CU_ASSERT_FATAL(tu_file_write(tp("bad_value.ini"), bad_value, sizeof bad_value - 1, "wb"));
    run_vdist("train --config %s --data.path=%s", tp("bad_value.ini"), data);
    EXPECT_REFUSED("<TMP>/bad_value.ini:3", "train.steps", "many");
    static const char bad_key[] = "[train]\nsetps = 3\n";
    CU_ASSERT_FATAL(tu_file_write(tp("bad_key.ini"), bad_key, sizeof bad_key - 1, "wb"));
    run_vdist("train --config %s --data.path=%s", tp("bad_key.ini"), data);
    EXPECT_REFUSED("<TMP>/bad_key.ini:2", "train.setps", "train.steps");

    /* One rank cannot hold a tensor-parallel group of two: the run must be refused, not
     * silently trained with another layout. */
    run_vdist("%s --parallel.tp=2", base);
    EXPECT_REFUSED("tp");
    EXPECT(out_has("parallel.tp") || out_has_word("tp"),
           "the refusal of `%s` must name tp (parallel.tp or the word tp)", g_run.cmd);

    run_vdist("%s --model.config=%s", base, tp("no_such_config.json"));
    EXPECT_REFUSED("model.config", "<TMP>/no_such_config.json");
}

/* ---------------------------------------------------------------- 3. data errors */

static void test_data_errors(void)
{
    const char *const tiny = config_path("tiny");
    enum { N = 400 };
    uint32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (uint32_t)(i * 7 % 64);

    /* The control: a valid hand-made file trains. */
    CU_ASSERT_FATAL(write_llmc(tp("good.bin"), 1, N, tok, N));
    run_vdist("train --config %s --train.steps=1 --data.path=%s", tiny, tp("good.bin"));
    EXPECT(g_run.rc == 0 && out_has("step 1/1"), "the control run `%s` must train, got %d",
           g_run.cmd, g_run.rc);

    run_vdist("train --config %s --data.path=%s", tiny, tp("no_such_tokens.bin"));
    EXPECT_REFUSED("<TMP>/no_such_tokens.bin");

    /* One id out of range at position 123: the message names that id. */
    tok[123] = 1000;
    CU_ASSERT_FATAL(write_llmc(tp("big_id.bin"), 1, N, tok, N));
    tok[123] = 5;
    run_vdist("train --config %s --data.path=%s", tiny, tp("big_id.bin"));
    EXPECT_REFUSED("<TMP>/big_id.bin", "1000", "64");

    /* tiny.ini has seq_len 16: one sequence needs 17 tokens. */
    CU_ASSERT_FATAL(write_llmc(tp("short.bin"), 1, 10, tok, 10));
    run_vdist("train --config %s --data.path=%s", tiny, tp("short.bin"));
    EXPECT_REFUSED("<TMP>/short.bin", "17", "10");

    CU_ASSERT_FATAL(write_llmc(tp("bad_version.bin"), 7, N, tok, N));
    run_vdist("train --config %s --data.path=%s", tiny, tp("bad_version.bin"));
    EXPECT_REFUSED("<TMP>/bad_version.bin", "version", "7");

    /* The header promises more tokens than the file holds. */
    CU_ASSERT_FATAL(write_llmc(tp("truncated.bin"), 1, N + 50, tok, N));
    run_vdist("train --config %s --data.path=%s", tiny, tp("truncated.bin"));
    EXPECT_REFUSED("<TMP>/truncated.bin", "450");
}

/* ---------------------------------------------------------------- 4. weights errors */

static void test_weights_errors(void)
{
    const char *const tiny = config_path("tiny");
    const char *const data = synth64();
    CU_ASSERT_FATAL(base_export());
    struct tu_st_set s;
    CU_ASSERT_FATAL(tu_st_set_load(&s, tp("base/model.safetensors")));

    /* The control: every tensor rewritten (in reverse order) loads and trains. */
    if (st_set_write(&s, tp("w_ok.safetensors"), -1, true, NULL, 0, NULL, NULL)) {
        run_vdist("train --config %s --data.path=%s --train.steps=1 --train.init_from=%s",
                  tiny, data, tp("w_ok.safetensors"));
        EXPECT(g_run.rc == 0 && out_has("step 1/1"),
               "the control `%s` (all tensors, reordered) must train, got %d", g_run.cmd, g_run.rc);
    }

    static const char not_st[] = "this is a text file, not safetensors\n";
    CU_ASSERT_FATAL(tu_file_write(tp("w_text.safetensors"), not_st, sizeof not_st - 1, "wb"));
    run_vdist("train --config %s --data.path=%s --train.init_from=%s", tiny, data,
              tp("w_text.safetensors"));
    EXPECT_REFUSED("<TMP>/w_text.safetensors");

    run_vdist("train --config %s --data.path=%s --train.init_from=%s", tiny, data,
              tp("no_such.safetensors"));
    EXPECT_REFUSED("<TMP>/no_such.safetensors");

    /* The same number of elements in the transposed shape. */
    static const char wrong[] = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    int const iw = tu_st_set_find(&s, wrong);
    if (EXPECT(iw >= 0 && s.ndim[iw] == 2, "the export must hold a 2-D %s", wrong)) {
        size_t const r = s.shape[iw][0], c = s.shape[iw][1];
        s.shape[iw][0] = c;
        s.shape[iw][1] = r;
        bool const ok = st_set_write(&s, tp("w_shape.safetensors"), -1, false, NULL, 0, NULL,
                                     NULL);
        s.shape[iw][0] = r;
        s.shape[iw][1] = c;
        if (ok) {
            run_vdist("train --config %s --data.path=%s --train.init_from=%s", tiny, data,
                      tp("w_shape.safetensors"));
            EXPECT_REFUSED("<TMP>/w_shape.safetensors", wrong);
        }
    }

    static const char gone[] = "model.layers.0.post_attention_layernorm.weight";
    int const ig = tu_st_set_find(&s, gone);
    if (EXPECT(ig >= 0, "the export must hold %s", gone) &&
        st_set_write(&s, tp("w_missing.safetensors"), ig, false, NULL, 0, NULL, NULL)) {
        run_vdist("train --config %s --data.path=%s --train.init_from=%s", tiny, data,
                  tp("w_missing.safetensors"));
        EXPECT_REFUSED("<TMP>/w_missing.safetensors", gone);
    }

    /* A third layer's norm: what a file of a deeper model holds. */
    static const char extra[] = "model.layers.2.input_layernorm.weight";
    int const ie = tu_st_set_find(&s, "model.layers.0.input_layernorm.weight");
    if (EXPECT(ie >= 0 && tu_st_set_find(&s, extra) < 0, "the export must hold layer 0's norm "
               "and no layer 2") &&
        st_set_write(&s, tp("w_extra.safetensors"), -1, false, extra, s.ndim[ie], s.shape[ie],
                     s.data[ie])) {
        run_vdist("train --config %s --data.path=%s --train.init_from=%s", tiny, data,
                  tp("w_extra.safetensors"));
        EXPECT_REFUSED("<TMP>/w_extra.safetensors", extra);
    }
    tu_st_set_free(&s);
}

/* ---------------------------------------------------------------- 5. export round trip */

static void expect_same_tensors(const char *pa, const char *pb)
{
    struct tu_st_set a, b;
    bool const la = tu_st_set_load(&a, pa), lb = tu_st_set_load(&b, pb);
    if (la && lb && EXPECT(a.n == b.n && a.n > 0, "%s and %s must hold the same number of "
                           "tensors (%d and %d)", pa, pb, a.n, b.n)) {
        int bad = 0;
        for (int i = 0; i < a.n; i++) {
            int const j = tu_st_set_find(&b, a.name[i]);
            bool same = j >= 0 && a.dtype[i] == CKPT_F32 && b.dtype[j] == CKPT_F32 &&
                        a.ndim[i] == b.ndim[j] &&
                        memcmp(a.shape[i], b.shape[j], sizeof a.shape[i]) == 0 &&
                        memcmp(a.data[i], b.data[j], a.numel[i] * sizeof(float)) == 0;
            if (!same && bad++ < 5)
                EXPECT(false, "tensor '%s' differs between %s and %s (presence, dtype, shape "
                       "or bits)", a.name[i], pa, pb);
        }
        EXPECT(bad == 0, "%d tensors differ between %s and %s", bad, pa, pb);
    }
    tu_st_set_free(&a);
    tu_st_set_free(&b);
}

static void test_export_round_trip(void)
{
    const char *const tiny = config_path("tiny");
    const char *const data = synth64();

    run_vdist("train --config %s --data.path=%s --train.steps=3 --train.export_to=%s", tiny,
              data, tp("rt_a"));
    CU_ASSERT_FATAL(EXPECT(g_run.rc == 0 && tu_file_exists(tp("rt_a/model.safetensors")) &&
                               tu_file_exists(tp("rt_a/config.json")),
                           "`%s` must export model.safetensors and config.json, got %d", g_run.cmd,
                           g_run.rc));
    double first_a = NAN;
    const char *p = strstr(g_run.out, "step 1/3 | loss ");
    if (p) first_a = strtod(p + strlen("step 1/3 | loss "), NULL);

    /* One step at learning rate 0 (constant, no weight decay) changes nothing. */
    run_vdist("train --config %s --data.path=%s --train.steps=1 --train.lr=0 "
              "--train.lr_schedule=constant --train.weight_decay=0 --train.init_from=%s "
              "--train.export_to=%s",
              tiny, data, tp("rt_a/model.safetensors"), tp("rt_b"));
    EXPECT(g_run.rc == 0, "`%s` must succeed (lr 0 is allowed), got %d", g_run.cmd, g_run.rc);
    p = strstr(g_run.out, "step 1/1 | loss ");
    double const first_b = p ? strtod(p + strlen("step 1/1 | loss "), NULL) : NAN;
    EXPECT(isfinite(first_a) && isfinite(first_b) && first_b < first_a,
           "starting from the exported weights, the first loss (%g) must be below the fresh "
           "model's first loss (%g)", first_b, first_a);
    if (g_run.rc == 0)
        expect_same_tensors(tp("rt_a/model.safetensors"), tp("rt_b/model.safetensors"));

    /* config.json describes the configured model. */
    struct launch_config want;
    CU_ASSERT_FATAL(EXPECT(launch_config_load(&want, tiny, 0, NULL) == 0,
                           "configs/tiny.ini must load: %s", vd_err_msg()));
    struct model_config got;
    model_config_defaults(&got);
    got.vocab_size = got.hidden_size = got.intermediate_size = got.num_hidden_layers = -1;
    got.num_attention_heads = got.num_key_value_heads = got.num_local_experts = -1;
    got.num_experts_per_tok = -1;
    if (EXPECT(launch_config_read_hf(&got, tp("rt_a/config.json")) == 0,
               "launch_config_read_hf must read the exported config.json: %s", vd_err_msg())) {
        const struct model_config *w = &want.model;
        EXPECT(got.vocab_size == w->vocab_size && got.hidden_size == w->hidden_size &&
                   got.intermediate_size == w->intermediate_size &&
                   got.num_hidden_layers == w->num_hidden_layers &&
                   got.num_attention_heads == w->num_attention_heads &&
                   got.num_key_value_heads == w->num_key_value_heads &&
                   got.num_local_experts == w->num_local_experts &&
                   got.num_experts_per_tok == w->num_experts_per_tok,
               "config.json's sizes must be tiny.ini's");
        EXPECT(got.rope_theta == w->rope_theta && got.rms_norm_eps == w->rms_norm_eps &&
                   got.router_aux_loss_coef == w->router_aux_loss_coef &&
                   got.router_z_loss_coef == w->router_z_loss_coef &&
                   got.moe_capacity_factor == w->moe_capacity_factor &&
                   got.moe_drop_policy == w->moe_drop_policy,
               "config.json's real-valued and routing keys must read back exactly");
    }
    char *ca = tu_file_read(tp("rt_a/config.json"), NULL);
    char *cb = tu_file_read(tp("rt_b/config.json"), NULL);
    EXPECT(ca && cb && strcmp(ca, cb) == 0, "both exports must write the same config.json");
    free(ca);
    free(cb);

    /* The export alone is enough to go on: no config file, the model from config.json. */
    run_vdist("train --model.config=%s --data.path=%s --train.seq_len=16 --train.micro_batch=2 "
              "--train.global_batch=4 --train.steps=1 --train.lr=0 --train.lr_schedule=constant "
              "--train.weight_decay=0 --train.init_from=%s --train.export_to=%s",
              tp("rt_a/config.json"), data, tp("rt_a/model.safetensors"), tp("rt_c"));
    EXPECT(g_run.rc == 0, "`%s` (the model from the exported config.json) must succeed, got %d",
           g_run.cmd, g_run.rc);
    if (g_run.rc == 0)
        expect_same_tensors(tp("rt_a/model.safetensors"), tp("rt_c/model.safetensors"));
}

/* ---------------------------------------------------------------- 6. training run */

static double json_num(const json_t *o, const char *key, bool *ok)
{
    const json_t *v = json_object_get(o, key);
    if (!v || !json_is_number(v) || !isfinite(json_number_value(v))) {
        *ok = false;
        return NAN;
    }
    return json_number_value(v);
}

static bool rel_close(double a, double b, double tol)
{
    return fabs(a - b) <= tol * fmax(fabs(a), fabs(b)) + 1e-12;
}

static void test_training_run(void)
{
    const char *const small = config_path("small");
    int const steps = 120;

    run_vdist("data synth %s --tokens 300000", tp("synth256.bin"));
    CU_ASSERT_FATAL(EXPECT(g_run.rc == 0, "`%s` must succeed, got %d", g_run.cmd, g_run.rc));
    double floor_nats = NAN, unigram = NAN;
    const char *p = strstr(g_run.out, "entropy floor ");
    if (p) floor_nats = strtod(p + strlen("entropy floor "), NULL);
    p = strstr(g_run.out, "unigram ");
    if (p) unigram = strtod(p + strlen("unigram "), NULL);
    CU_ASSERT_FATAL(EXPECT(isfinite(floor_nats) && isfinite(unigram) && floor_nats > 0 &&
                               floor_nats < unigram && unigram <= log(256.0) + 1e-9,
                           "`vdist data synth` must print the entropy floor and the unigram "
                           "entropy (got %g and %g)", floor_nats, unigram));

    struct launch_config cfg;
    CU_ASSERT_FATAL(EXPECT(launch_config_load(&cfg, small, 0, NULL) == 0,
                           "configs/small.ini must load: %s", vd_err_msg()));
    double const t0 = tu_now_s();
    run_vdist("train --config %s --data.path=%s --train.steps=%d --log.metrics=%s", small,
              tp("synth256.bin"), steps, tp("metrics.jsonl"));
    double const took = tu_now_s() - t0;
    printf("\n    (small.ini, %d steps: %.1f s)", steps, took);
    CU_ASSERT_FATAL(EXPECT(g_run.rc == 0, "`%s` must succeed, got %d", g_run.cmd, g_run.rc));
    double peak = NAN;
    p = strstr(g_run.out, "MFU peak: ");
    if (p) peak = strtod(p + strlen("MFU peak: "), NULL);
    EXPECT(isfinite(peak) && peak > 0, "the run must print the MFU peak it used");

    struct tu_jsonl metrics;
    CU_ASSERT_FATAL(EXPECT(tu_jsonl_read(&metrics, tp("metrics.jsonl")),
                           "the run must write log.metrics"));

    /* model.md's FLOPs per token (Megatron-Core), training = 3x forward. */
    const struct model_config *m = &cfg.model;
    double const d = m->hidden_size, H = m->num_attention_heads, G = m->num_key_value_heads;
    double const hd = d / H, T = cfg.train.seq_len, E = m->num_local_experts;
    double const fwd = m->num_hidden_layers * (2 * d * hd * (H + 2 * G) + 2 * H * hd * d +
                                               2 * T * d + 2 * d * E +
                                               m->num_experts_per_tok * 6 * d *
                                                   m->intermediate_size) +
                       2 * d * m->vocab_size;
    double const tokens_per_step = (double)cfg.train.global_batch * T;

    static const char *const fields[] = {"step", "loss", "lm_loss", "aux_loss", "z_loss",
                                         "grad_norm", "lr", "step_ms", "tokens_per_s", "mfu"};
    int lines = 0, bad_fields = 0, bad_sum = 0, bad_lr = 0, bad_rate = 0, bad_mfu = 0;
    double first_lm = NAN, last_lm[5] = {NAN, NAN, NAN, NAN, NAN};
    for (int i = 0; i < metrics.n; i++) {
        const char *const line = metrics.text[i];
        const json_t *const o = metrics.line[i];
        lines++;
        if (!EXPECT(o != NULL, "metrics line %d must be a JSON object: %s", lines,
                    metrics.error[i]))
            continue;
        bool ok = true;
        for (size_t f = 0; f < sizeof fields / sizeof fields[0]; f++) json_num(o, fields[f], &ok);
        const json_t *st = json_object_get(o, "step");
        ok = ok && json_is_integer(st) && json_integer_value(st) == lines;
        if (!ok && bad_fields++ < 3)
            EXPECT(false, "metrics line %d must hold every field (step = %d as an integer, "
                   "loss, lm_loss, aux_loss, z_loss, grad_norm, lr, step_ms, tokens_per_s, "
                   "mfu, all finite numbers): %s", lines, lines, line);
        bool k = true;
        double const loss = json_num(o, "loss", &k), lm = json_num(o, "lm_loss", &k);
        double const aux = json_num(o, "aux_loss", &k), z = json_num(o, "z_loss", &k);
        double const lr = json_num(o, "lr", &k), ms = json_num(o, "step_ms", &k);
        double const tps = json_num(o, "tokens_per_s", &k), mfu = json_num(o, "mfu", &k);
        double const gn = json_num(o, "grad_norm", &k);
        if (!k) continue;
        if (!(rel_close(loss, lm + aux + z, 1e-6) && aux > 0 && z > 0 && gn > 0) &&
            bad_sum++ < 3)
            EXPECT(false, "step %d: loss %.10g must equal lm_loss + aux_loss + z_loss = %.10g "
                   "(relative 1e-6), with aux_loss, z_loss, grad_norm > 0", lines, loss,
                   lm + aux + z);
        /* model.md's schedule at s = step - 1. */
        int const s = lines - 1, W = cfg.train.warmup, S = steps;
        double const lmax = cfg.train.lr, lmin = cfg.train.lr_min;
        double const want_lr =
            cfg.train.lr_schedule == LAUNCH_LR_CONSTANT ? lmax
            : s < W ? lmax * (s + 1) / W
                    : lmin + 0.5 * (lmax - lmin) * (1 + cos(M_PI * (s - W) / (double)(S - W)));
        if (!rel_close(lr, want_lr, 1e-5) && bad_lr++ < 3)
            EXPECT(false, "step %d: lr %.10g must be model.md's schedule value %.10g", lines,
                   lr, want_lr);
        if (!(ms > 0 && rel_close(tps, tokens_per_step / (ms * 1e-3), 1e-6)) && bad_rate++ < 3)
            EXPECT(false, "step %d: tokens_per_s %.10g must be global_batch * seq_len / step "
                   "time = %.10g", lines, tps, tokens_per_step / (ms * 1e-3));
        double const want_mfu = 3 * fwd * tokens_per_step / (ms * 1e-3 * peak * 1e9);
        /* The peak is printed with one decimal: allow for its rounding. */
        if (!(mfu > 0 && rel_close(mfu, want_mfu, 2e-3 + 0.051 / peak)) && bad_mfu++ < 3)
            EXPECT(false, "step %d: mfu %.6g must be 3 x model.md's FLOPs per token x tokens / "
                   "(step time x %g GFLOP/s) = %.6g", lines, mfu, peak, want_mfu);
        if (lines == 1) first_lm = lm;
        last_lm[(lines - 1) % 5] = lm;
    }
    tu_jsonl_free(&metrics);
    EXPECT(lines == steps, "the metrics file must hold one line per step: %d, got %d", steps,
           lines);
    EXPECT(bad_fields == 0 && bad_sum == 0 && bad_lr == 0 && bad_rate == 0 && bad_mfu == 0,
           "metrics: %d lines lack fields, %d break loss = lm + aux + z, %d have a wrong lr, "
           "%d a wrong tokens_per_s, %d a wrong mfu", bad_fields, bad_sum, bad_lr, bad_rate,
           bad_mfu);

    double final_lm = 0;
    for (int i = 0; i < 5; i++) final_lm += last_lm[i] / 5;
    printf("\n    (floor %.4f, unigram %.4f, lm_loss %.4f -> %.4f)", floor_nats, unigram,
           first_lm, final_lm);
    EXPECT(isfinite(final_lm) && final_lm < unigram,
           "the final lm_loss %.4f (mean of the last 5 steps) must be below the unigram "
           "entropy %.4f: the model must use context", final_lm, unigram);
    EXPECT(final_lm <= floor_nats + 0.5, "the final lm_loss %.4f must be within 0.5 nats of "
           "the entropy floor %.4f", final_lm, floor_nats);
    EXPECT(final_lm >= floor_nats - 0.05, "the final lm_loss %.4f cannot be below the entropy "
           "floor %.4f (beyond noise)", final_lm, floor_nats);
    EXPECT(first_lm - final_lm >= 0.6 * (first_lm - floor_nats),
           "the lm_loss must fall by at least 60%% of (initial %.4f - floor %.4f); it fell from "
           "%.4f to %.4f", first_lm, floor_nats, first_lm, final_lm);
    EXPECT(fabs(first_lm - log((double)m->vocab_size)) < 0.3,
           "the initial lm_loss %.4f must be near log(vocab) = %.4f (small initial weights)",
           first_lm, log((double)m->vocab_size));
}

/* ---------------------------------------------------------------- 7. failed exports */

static void test_export_failures(void)
{
    const char *const tiny = config_path("tiny");
    const char *const data = synth64();

    /* The export directory would be created under a regular file. */
    CU_ASSERT_FATAL(mkdir(tp("ex1"), 0755) == 0);
    static const char keep[] = "a regular file\n";
    CU_ASSERT_FATAL(tu_file_write(tp("ex1/plain"), keep, sizeof keep - 1, "wb"));
    run_vdist("train --config %s --data.path=%s --train.steps=1 --train.export_to=%s", tiny,
              data, tp("ex1/plain/out"));
    EXPECT(g_run.rc == 1 || g_run.rc == 2, "`%s` must fail with exit status 1 or 2, got %d",
           g_run.cmd, g_run.rc);
    EXPECT(out_has("<TMP>/ex1/plain/out"), "the message must name the export directory");
    EXPECT(!out_has("exported "), "a failed export must not report success");
    char *b = tu_file_read(tp("ex1/plain"), NULL);
    EXPECT(b && strcmp(b, keep) == 0, "the regular file must be left as it was");
    free(b);
    EXPECT(!tree_has_tmp(tp("ex1")), "no temporary file may be left (found %s)", g_found_tmp);

    /* The export directory's parent is missing. */
    run_vdist("train --config %s --data.path=%s --train.steps=1 --train.export_to=%s", tiny,
              data, tp("ex2/missing/out"));
    if (g_run.rc == 0) {
        EXPECT(tu_file_exists(tp("ex2/missing/out/model.safetensors")) &&
                   tu_file_exists(tp("ex2/missing/out/config.json")),
               "`%s` exited 0, so it must have created the directories and written both files",
               g_run.cmd);
    } else {
        EXPECT(g_run.rc == 1 || g_run.rc == 2, "`%s` must exit 0 or fail with 1 or 2, got %d",
               g_run.cmd, g_run.rc);
        EXPECT(out_has("<TMP>/ex2/missing/out"), "the message must name the export directory");
        EXPECT(!tu_file_exists(tp("ex2")), "a failed export must create nothing");
    }

    /* model.safetensors cannot replace a directory of that name: the writer's temporary
     * must go, and no config.json may describe a model that was not written. */
    CU_ASSERT_FATAL(mkdir(tp("ex3"), 0755) == 0);
    CU_ASSERT_FATAL(mkdir(tp("ex3/model.safetensors"), 0755) == 0);
    run_vdist("train --config %s --data.path=%s --train.steps=1 --train.export_to=%s", tiny,
              data, tp("ex3"));
    EXPECT(g_run.rc == 1 || g_run.rc == 2, "`%s` must fail with exit status 1 or 2, got %d",
           g_run.cmd, g_run.rc);
    EXPECT(out_has("<TMP>/ex3/model.safetensors"), "the message must name model.safetensors");
    EXPECT(!tree_has_tmp(tp("ex3")), "no temporary file may be left (found %s)", g_found_tmp);
    EXPECT(!tu_file_exists(tp("ex3/config.json")), "no config.json may be written when the "
           "weights were not");

    /* config.json cannot be written: its temporary must go too. */
    CU_ASSERT_FATAL(mkdir(tp("ex4"), 0755) == 0);
    CU_ASSERT_FATAL(mkdir(tp("ex4/config.json"), 0755) == 0);
    run_vdist("train --config %s --data.path=%s --train.steps=1 --train.export_to=%s", tiny,
              data, tp("ex4"));
    EXPECT(g_run.rc == 1 || g_run.rc == 2, "`%s` must fail with exit status 1 or 2, got %d",
           g_run.cmd, g_run.rc);
    EXPECT(out_has("<TMP>/ex4/config.json"), "the message must name config.json");
    EXPECT(!tree_has_tmp(tp("ex4")), "no temporary file may be left (found %s)", g_found_tmp);

    /* A metrics file that cannot be created stops the run before it trains. */
    run_vdist("train --config %s --data.path=%s --train.steps=1 --log.metrics=%s", tiny, data,
              tp("ex1/plain/metrics.jsonl"));
    EXPECT_REFUSED("<TMP>/ex1/plain/metrics.jsonl");
}

/* ---------------------------------------------------------------- main */

static int suite_init(void) { return tu_env_init(&g_env, "test_cli", "vdist_cli_"); }

/* ---------------------------------------------------------------- direct writes refused */

/* From here on (and in programs executed from here) process_vm_writev fails with EPERM;
 * every other system call is untouched. Returns 0 or -1 (errno set). */
static int deny_process_vm_writev(void)
{
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_process_vm_writev, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog const prog = {sizeof filter / sizeof filter[0], filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

/* The launcher (see the top of the file): exit status 3 when the filter cannot be set. */
static int deny_and_exec(char **argv)
{
    if (deny_process_vm_writev() != 0) {
        fprintf(stderr, "test_cli launcher: cannot install the seccomp filter: %s\n",
                strerror(errno));
        return 3;
    }
    execv(argv[0], argv);
    fprintf(stderr, "test_cli launcher: cannot execute %s: %s\n", argv[0], strerror(errno));
    return 3;
}

/* `loss`, `lm_loss` and `grad_norm` of every line of a metrics file, as written. */
static bool loss_fields(const char *path, char *out, size_t cap)
{
    struct tu_jsonl m;
    bool const ok = tu_jsonl_read(&m, path) && m.n > 0;
    size_t n = 0;
    out[0] = '\0';
    for (int i = 0; ok && i < m.n && m.line[i]; i++) {
        static const char *const keys[] = {"loss", "lm_loss", "grad_norm"};
        for (int k = 0; k < 3; k++) {
            const json_t *v = json_object_get(m.line[i], keys[k]);
            n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, "%s=%.17g ", keys[k],
                                  json_is_number(v) ? json_number_value(v) : NAN);
        }
    }
    tu_jsonl_free(&m);
    return ok;
}

/* Trains tiny.ini for 3 steps on `ranks` ranks with experts over all of them (all-to-all
 * dispatcher), metrics to g_env.tmp/<name>.jsonl; the last `denied` ranks run with
 * process_vm_writev refused. Returns the exit status. */
static int run_ep(int ranks, int denied, const char *name)
{
    char self[PATH_MAX];
    ssize_t const len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) return -1;
    self[len] = '\0';
    char metrics[600], args[2048], command[2 * PATH_MAX + 3 * sizeof args];
    snprintf(metrics, sizeof metrics, "%s.jsonl", name);
    snprintf(args, sizeof args,
             "train --config %s --data.path=%s --train.steps=3 --parallel.ep=%d "
             "--train.micro_batch=%d --train.global_batch=4 --log.metrics=%s",
             config_path("tiny"), synth64(), ranks, 4 / ranks, tp(metrics));
    const char *const mpirun = "mpirun --allow-run-as-root --oversubscribe --bind-to none";
    int n = snprintf(command, sizeof command, "%s", mpirun);
    if (ranks > denied)
        n += snprintf(command + n, sizeof command - (size_t)n, " -np %d '%s' %s",
                      ranks - denied, g_env.vdist, args);
    if (denied > 0)
        snprintf(command + n, sizeof command - (size_t)n,
                 "%s -np %d -x VDIST_CLI_DENY_WRITEV=1 '%s' '%s' %s",
                 ranks > denied ? " :" : "", denied, self, g_env.vdist, args);
    snprintf(g_run.cmd, sizeof g_run.cmd,
             "mpirun -np %d vdist %s (process_vm_writev refused on the last %d)", ranks, args,
             denied);
    return tu_shell_run(&g_run, g_env.tmp, CHILD_TIMEOUT_S, command);
}

/* The all-to-all dispatcher on a kernel that refuses some or all of its direct writes
 * between ranks: 2 ranks with both refusing, 4 ranks with the last two refusing (rank 0
 * writes directly to rank 1 and sends MPI messages to ranks 2 and 3, so one dispatch mixes
 * both). The refusal must be detected at start (no failed write later) and each run must
 * train to the same losses and gradient norms bit for bit as with every write allowed:
 * the rows in the experts' blocks are the same either way. */
static void test_direct_writes_refused(void)
{
    static const struct {
        int ranks, denied;
        const char *peers; /* rank 0's line */
    } runs[] = {
        {2, 0, "writes directly to 1 of its 1 etp x ep peers"},
        {2, 2, "writes directly to 0 of its 1 etp x ep peers"},
        {4, 0, "writes directly to 3 of its 3 etp x ep peers"},
        {4, 2, "writes directly to 1 of its 3 etp x ep peers"},
    };
    static char want[4096], got[4096];
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "ep%d-denied%d", runs[i].ranks, runs[i].denied);
        int const rc = run_ep(runs[i].ranks, runs[i].denied, name);
        if (!EXPECT(rc == 0, "`%s` must succeed, got %d", g_run.cmd, rc)) continue;
        EXPECT(out_has(runs[i].peers), "`%s`: rank 0 must say it %s", g_run.cmd,
               runs[i].peers);
        char metrics[64];
        snprintf(metrics, sizeof metrics, "%s.jsonl", name);
        if (runs[i].denied == 0) {
            EXPECT(loss_fields(tp(metrics), want, sizeof want), "%s must be written", metrics);
            continue;
        }
        bool const read = loss_fields(tp(metrics), got, sizeof got);
        EXPECT(read && strcmp(want, got) == 0,
               "`%s`: losses and grad norms must agree bit for bit with every write allowed:"
               "\n  allowed: %s\n  refused: %s", g_run.cmd, want, got);
    }
}

/* ---------------------------------------------------------------- 9. pipeline sizes */

/* Runs `vdist ARGS` on `ranks` ranks under mpirun, each rank inside a shell that prints
 * "[rank R: vdist exited S]" after it and exits 0, so that mpirun aborts no rank and the
 * output holds every rank's exit status. Returns mpirun's exit status. */
static int run_ranks(int ranks, const char *args)
{
    snprintf(g_run.cmd, sizeof g_run.cmd, "mpirun -np %d vdist %s", ranks, args);
    char command[PATH_MAX + 8192];
    snprintf(command, sizeof command,
             "mpirun --allow-run-as-root --oversubscribe --bind-to none -np %d -x "
             "OMP_NUM_THREADS sh -c '\"$0\" \"$@\"; echo \"[rank $OMPI_COMM_WORLD_RANK: vdist "
             "exited $?]\"' '%s' %s",
             ranks, g_env.vdist, args);
    return tu_shell_run(&g_run, g_env.tmp, CHILD_TIMEOUT_S, command);
}

/* After run_ranks: the exit status every rank printed, when mpirun exited 0 and the
 * ranks agree, else -1; what each printed into seen (cap bytes). */
static int ranks_status(int ranks, char *seen, size_t cap)
{
    int status = -2;
    size_t len = 0;
    seen[0] = '\0';
    for (int r = 0; r < ranks; r++) {
        char tag[48];
        snprintf(tag, sizeof tag, "[rank %d: vdist exited ", r);
        const char *p = strstr(g_run.out, tag);
        int const s = p ? atoi(p + strlen(tag)) : -1;
        status = status == -2 || status == s ? s : -1;
        if (len < cap)
            len += (size_t)snprintf(seen + len, cap - len, "%srank %d: %s", r ? ", " : "", r,
                                    p ? "" : "no status");
        if (p && len < cap) len += (size_t)snprintf(seen + len, cap - len, "%d", s);
    }
    return g_run.rc == 0 ? status : -1;
}

/* After run_ranks: refused before training on every rank alike (each exits 1 or 2 by
 * itself: a rank that trains on alone, waits in a collective or aborts the job fails it),
 * with a message that holds a and b. */
static void expect_refused_on_every_rank(int ranks, const char *a, const char *b)
{
    char seen[256];
    int const status = ranks_status(ranks, seen, sizeof seen);
    EXPECT(status == 1 || status == 2, "`%s` must be refused on every rank alike, each "
           "exiting 1 or 2 (mpirun exit status %d; %s)", g_run.cmd, g_run.rc, seen);
    if (g_run.rc == 0) g_run.rc = status; /* the program's status, not the shells' */
    EXPECT_REFUSED(a, b);
}

/* A layout refused through the real program on `ranks` ranks: what the message must hold. */
struct refusal_case {
    int ranks;
    const char *opts;
    const char *expect[2];
};

/* Runs each case (tiny.ini, 2 steps, the options of the case) and expects it refused
 * before the first step on every rank with a message that holds both strings. */
static void expect_refusals(const struct refusal_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char args[PATH_MAX * 3];
        snprintf(args, sizeof args, "train --config %s --data.path=%s --train.steps=2 "
                 "--train.peak_gflops=100 %s", config_path("tiny"), synth64(), cases[i].opts);
        run_ranks(cases[i].ranks, args);
        expect_refused_on_every_rank(cases[i].ranks, cases[i].expect[0], cases[i].expect[1]);
    }
}

/* Pipeline sizes that only the program's checks see together (the model's layers, the
 * world size, the micro-batches per replica), each run on 2 ranks (one on 3): refused
 * before the first step on every rank with a message naming the sizes. */
static void test_pp_refusals(void)
{
    static const struct refusal_case cases[] = {
        {2, "--parallel.pp=2 --parallel.vpp=2 --model.num_hidden_layers=6",
         {"num_hidden_layers = 6", "parallel.pp = 2 x parallel.vpp = 2 = 4"}},
        {2, "--parallel.pp=2 --model.num_hidden_layers=4 --parallel.pp_layers=1,1,2",
         {"parallel.pp_layers has 3 entries", "parallel.pp = 2 x parallel.vpp = 1 = 2"}},
        {2, "--parallel.pp=2 --model.num_hidden_layers=4 --parallel.pp_layers=1,2",
         {"parallel.pp_layers adds up to 3 layers", "num_hidden_layers = 4"}},
        {2, "--parallel.pp=2 --parallel.vpp=2 --model.num_hidden_layers=4 "
            "--parallel.pp_schedule=1f1b",
         {"parallel.pp_schedule = 1f1b", "parallel.vpp = 2"}},
        {2, "--parallel.pp=2 --parallel.pp_schedule=interleaved",
         {"parallel.pp_schedule = interleaved", "parallel.vpp = 1"}},
        {2, "--parallel.pp=2 --parallel.vpp=2 --model.num_hidden_layers=4 "
            "--train.global_batch=6 --train.micro_batch=2",
         {"train.global_batch = 6 over data-parallel size 1 x train.micro_batch = 2 gives 3 "
          "micro-batches", "m = 3 is not a multiple of pp = 2"}},
        {2, "--parallel.vpp=2", {"parallel.vpp = 2", "parallel.pp = 1"}},
        {3, "--parallel.pp=2", {"world size 3", "pp 2"}},
    };
    expect_refusals(cases, sizeof cases / sizeof cases[0]);
}

/* Context-parallel sizes and exchanges the program cannot run, on 2 to 4 ranks: a
 * sequence that does not cut into 2 cp chunks whose rows split over tp (seq_len 12 with
 * cp 2 x tp 2 passes each of the single-size checks), one that does not cut into 2 cp
 * chunks, a cp group larger than the world, and an exchange that does not exist. */
static void test_cp_refusals(void)
{
    static const struct refusal_case cases[] = {
        {4, "--parallel.cp=2 --parallel.tp=2 --train.seq_len=12",
         {"train.seq_len = 12", "2 x parallel.cp x parallel.tp = 8"}},
        {3, "--parallel.cp=3", {"train.seq_len = 16", "2 * parallel.cp = 6"}},
        {2, "--parallel.cp=4", {"world size 2", "cp 4"}},
        {2, "--parallel.cp=2 --parallel.cp_comm_type=ring",
         {"parallel.cp_comm_type = 'ring'", "allowed values are p2p, allgather"}},
    };
    expect_refusals(cases, sizeof cases / sizeof cases[0]);
}

/* One micro-batch a step on two stages: the run trains, after a warning that states the
 * bubble, (pp - 1) / (m + pp - 1) = 50%. */
static void test_pp_bubble_warning(void)
{
    char args[PATH_MAX * 3];
    snprintf(args, sizeof args, "train --config %s --data.path=%s --train.steps=2 "
             "--train.peak_gflops=100 --parallel.pp=2 --train.global_batch=2 "
             "--train.micro_batch=2", config_path("tiny"), synth64());
    run_ranks(2, args);
    char seen[256];
    int const status = ranks_status(2, seen, sizeof seen);
    EXPECT(status == 0 && out_has("step 2/2"), "`%s` must train its 2 steps and exit 0 on "
           "both ranks (mpirun exit status %d; %s)", g_run.cmd, g_run.rc, seen);
    const char *w = strstr(g_run.out, "warning:");
    char line[512] = "";
    if (w) snprintf(line, sizeof line, "%.*s", (int)strcspn(w, "\n"), w);
    EXPECT(strstr(line, "1 micro-batch") && strstr(line, "2 pipeline stages") &&
               strstr(line, "50%"),
           "`%s` must print a line \"warning: ...\" naming 1 micro-batch on 2 stages and the "
           "bubble, 50%%; got: %s", g_run.cmd, w ? line : "(no warning)");
}

static int suite_clean(void)
{
    tu_tmpdir_remove(g_env.tmp);
    tu_run_free(&g_run);
    return 0;
}

int main(int argc, char **argv)
{
    const char *const deny = getenv("VDIST_CLI_DENY_WRITEV");
    if (deny && strcmp(deny, "1") == 0 && argc > 1) return deny_and_exec(argv + 1);
    setenv("OMP_NUM_THREADS", "1", 1);
    static const struct tu_test tests[] = {
        {"help and unknown commands", test_help},
        {"config errors are refused before training", test_config_errors},
        {"data errors are refused before training", test_data_errors},
        {"weights errors (train.init_from) are refused before training", test_weights_errors},
        {"export round trip: lr 0 step keeps every bit; config.json reloads",
         test_export_round_trip},
        {"small.ini learns the synthetic data toward its floor; metrics complete",
         test_training_run},
        {"failed exports leave nothing half-written", test_export_failures},
        {"direct writes refused by the kernel: MPI carries the rows, same losses",
         test_direct_writes_refused},
        {"pipeline sizes refused on every rank before training, naming the sizes",
         test_pp_refusals},
        {"context-parallel sizes and an unknown cp_comm_type refused on every rank before "
         "training, naming the sizes and the allowed values", test_cp_refusals},
        {"pp2 with one micro-batch a step trains after a warning stating the 50% bubble",
         test_pp_bubble_warning},
    };
    static const struct tu_suite suite = {
        .name = "vdist command line",
        .init = suite_init,
        .clean = suite_clean,
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_TIMED_NAMED,
        .program = "test_cli",
    };
    tu_expect_show(&g_run, "command");
    return tu_cunit_main(&suite);
}
