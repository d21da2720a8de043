/* Sharded checkpoints on one rank (serial layout, with and without the distributed
 * optimizer): bitwise round trips of parameters, moments and AdamW's step; verify; the
 * newest complete checkpoint; pruning; and the failures: a corrupted shard, a manifest of
 * another shape, a save that cannot write. Asynchronous saves: what is written is the
 * snapshot taken at start, whatever happens to the model and the caller's strings after;
 * a failure of the background writer is reported by finish and leaves nothing. Multi-rank
 * and cross-layout resumes run through the real program in other suites. */
#include <CUnit/Basic.h>
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt.h"
#include "dist/dist.h"
#include "parallel/parallel.h"

static char tmpdir[64];

/* tests/golden/tiny_config.json's model. */
static void tiny_config(struct model_config *c)
{
    model_config_defaults(c);
    c->vocab_size = 64;
    c->hidden_size = 32;
    c->intermediate_size = 48;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 2;
    c->num_local_experts = 4;
    c->num_experts_per_tok = 2;
}

static void model_make(struct par_model *pm, const struct model_config *c, bool zero)
{
    struct model_layout lay;
    model_layout_serial(&lay, c->num_hidden_layers);
    struct par_groups groups;
    par_groups_serial(&groups);
    struct par_options const opt = {.distributed_optimizer = zero};
    CU_ASSERT_FATAL(par_model_init(pm, c, &lay, &groups, &opt, 1, 8) == 0);
}

/* Distinct values everywhere: parameters from the initialisation, moments from the same
 * deviates under other names (v made positive, as AdamW's is). */
static void model_fill(struct par_model *pm, uint64_t seed)
{
    model_init_params(&pm->tab, pm->params, seed, pm->cfg.num_hidden_layers);
    for (size_t i = 0; i < pm->state_len; i++) {
        pm->adam_m[i] = model_init_normal(seed, "test.m", i);
        pm->adam_v[i] = fabsf(model_init_normal(seed, "test.v", i));
    }
    pm->adam_step = (long)seed % 100 + 1;
}

static bool model_equal(const struct par_model *a, const struct par_model *b)
{
    return a->tab.numel == b->tab.numel && a->state_len == b->state_len &&
           memcmp(a->params, b->params, a->tab.numel * sizeof(float)) == 0 &&
           memcmp(a->adam_m, b->adam_m, a->state_len * sizeof(float)) == 0 &&
           memcmp(a->adam_v, b->adam_v, a->state_len * sizeof(float)) == 0 &&
           a->adam_step == b->adam_step;
}

static bool all_zero(const struct par_model *pm)
{
    for (size_t i = 0; i < pm->tab.numel; i++)
        if (pm->params[i] != 0.0f) return false;
    for (size_t i = 0; i < pm->state_len; i++)
        if (pm->adam_m[i] != 0.0f || pm->adam_v[i] != 0.0f) return false;
    return pm->adam_step == 0;
}

static int save(const struct par_model *pm, const char *root, long step, const char *config)
{
    struct ckpt_meta const meta = {.step = step, .adam_step = pm->adam_step, .seed = 1234,
                                   .config = config, .layout = "{\"world\": 1, \"tp\": 1}"};
    int const rc = ckpt_save(pm, root, &meta, 3);
    if (rc) printf("\n  ckpt_save: %s\n", vd_err_msg());
    return rc;
}

/* A fresh directory under the suite's temporary one. */
static void fresh_root(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", tmpdir, name);
    CU_ASSERT_FATAL(mkdir(out, 0777) == 0);
}

static bool exists(const char *dir, const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    struct stat st;
    return stat(path, &st) == 0;
}

static int entry_count(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

/* ckpt_verify's output and result. */
static int verify(const char *dir, char *out, size_t cap)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    CU_ASSERT_FATAL(f != NULL);
    int const rc = ckpt_verify(dir, f);
    fclose(f);
    snprintf(out, cap, "%s", buf ? buf : "");
    free(buf);
    return rc;
}

static bool msg_has(const char *needle)
{
    bool const ok = strstr(vd_err_msg(), needle) != NULL;
    if (!ok) printf("\n  expected '%s' in: %s\n", needle, vd_err_msg());
    return ok;
}

/* ---------------------------------------------------------------- tests */

static void roundtrip(bool zero, const char *name)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a, b;
    model_make(&a, &c, zero);
    model_make(&b, &c, zero);
    model_fill(&a, 42);
    char root[256], dir[300], text[512];
    fresh_root(root, sizeof root, name);
    const char *config = "{\"train\": {\"steps\": 10, \"lr\": 0.001}, \"name\": \"tiny\"}";
    CU_ASSERT_FATAL(save(&a, root, 5, config) == 0);
    snprintf(dir, sizeof dir, "%s/step_00000005", root);
    CU_ASSERT(exists(dir, "manifest.json"));
    CU_ASSERT(exists(dir, "rank_00000.zst"));
    CU_ASSERT(exists(root, "latest"));
    CU_ASSERT_EQUAL(entry_count(root), 2); /* the checkpoint and latest: no temporary left */

    long step = -1;
    char *back = NULL;
    int const rc = ckpt_load(&b, dir, &step, &back);
    if (rc) printf("\n  ckpt_load: %s\n", vd_err_msg());
    CU_ASSERT_FATAL(rc == 0);
    CU_ASSERT_EQUAL(step, 5);
    CU_ASSERT(model_equal(&a, &b));
    CU_ASSERT_EQUAL(b.adam_step, a.adam_step);
    json_t *want = json_loads(config, 0, NULL), *got = back ? json_loads(back, 0, NULL) : NULL;
    CU_ASSERT(got != NULL && json_equal(want, got));
    json_decref(want);
    json_decref(got);
    free(back);

    CU_ASSERT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(strstr(text, ", OK") != NULL);
    /* embed, 2 layers x 7 dense, norm, head, 2 layers x 4 experts x 3 */
    CU_ASSERT(strstr(text, "41 tensors") != NULL);
    printf("(%s) ", strtok(text, "\n"));
    par_model_free(&a);
    par_model_free(&b);
}

static void test_roundtrip(void) { roundtrip(false, "rt_plain"); }
static void test_roundtrip_zero(void) { roundtrip(true, "rt_zero"); }

/* Config text that is not JSON is kept as a string; no config gives NULL. */
static void test_config_text(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, false);
    model_fill(&a, 3);
    char root[256], dir[300];
    fresh_root(root, sizeof root, "cfgtext");
    CU_ASSERT_FATAL(save(&a, root, 1, "train.steps = 10 (not json)") == 0);
    CU_ASSERT_FATAL(save(&a, root, 2, NULL) == 0);
    long step;
    char *back = NULL;
    snprintf(dir, sizeof dir, "%s/step_00000001", root);
    CU_ASSERT_FATAL(ckpt_load(&a, dir, &step, &back) == 0);
    CU_ASSERT(back && strcmp(back, "train.steps = 10 (not json)") == 0);
    free(back);
    snprintf(dir, sizeof dir, "%s/step_00000002", root);
    CU_ASSERT_FATAL(ckpt_load(&a, dir, &step, &back) == 0);
    CU_ASSERT(back == NULL);
    par_model_free(&a);
}

/* Scanning for the newest complete checkpoint, as ckpt_latest does without a usable latest
 * pointer: cut-short directories are never picked. */
static void test_latest(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, true);
    model_fill(&a, 1);
    char root[256], out[512], path[512];
    bool fell_back = true;
    snprintf(root, sizeof root, "%s/latest_none", tmpdir);
    CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0); /* no root yet */
    CU_ASSERT_EQUAL(out[0], '\0');
    CU_ASSERT(!fell_back);
    fresh_root(root, sizeof root, "latest");
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    CU_ASSERT_EQUAL(out[0], '\0');
    CU_ASSERT_FATAL(save(&a, root, 1, "{}") == 0);
    CU_ASSERT_FATAL(save(&a, root, 3, "{}") == 0);
    CU_ASSERT_FATAL(save(&a, root, 2, "{}") == 0);
    /* the pointer names what was committed last, even an older step (a run resumed from an
     * earlier checkpoint continues from there) */
    CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0);
    snprintf(path, sizeof path, "%s/step_00000002", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT(!fell_back);
    /* without it: the newest complete one by scanning */
    snprintf(path, sizeof path, "%s/latest", root);
    CU_ASSERT_FATAL(unlink(path) == 0);
    /* newer, but cut short: no manifest, a manifest that does not parse, a temporary */
    snprintf(path, sizeof path, "%s/step_00000009", root);
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    snprintf(path, sizeof path, "%s/step_00000007", root);
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    snprintf(path, sizeof path, "%s/step_00000007/manifest.json", root);
    FILE *f = fopen(path, "w");
    CU_ASSERT_FATAL(f != NULL);
    fputs("{\"format\": \"vdist-sharded-checkpoint\", \"version\": 1, \"pie", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/step_00000008.tmp.1.0", root);
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0);
    snprintf(path, sizeof path, "%s/step_00000003", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT(fell_back);
    /* a shard gone: not complete either */
    snprintf(path, sizeof path, "%s/step_00000003/rank_00000.zst", root);
    CU_ASSERT_FATAL(unlink(path) == 0);
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    snprintf(path, sizeof path, "%s/step_00000002", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT_NOT_EQUAL(ckpt_latest(root, out, 8), 0); /* no room: an error, not a cut path */
    par_model_free(&a);
}

/* Writes text to dir/name. */
static void put_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    CU_ASSERT_FATAL(f != NULL);
    fputs(text, f);
    fclose(f);
}

/* dir/name's content into out ("" when missing). */
static void get_file(const char *dir, const char *name, char *out, size_t cap)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    out[0] = '\0';
    FILE *f = fopen(path, "r");
    if (!f) return;
    size_t const n = fread(out, 1, cap - 1, f);
    out[n] = '\0';
    fclose(f);
}

/* ROOT/latest: written by each save, read first, and a fall back (said so) when it names a
 * checkpoint that is gone, cut or corrupt, or holds something else. */
static void test_latest_pointer(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, false);
    model_fill(&a, 4);
    char root[256], out[512], path[512], text[64];
    bool fell_back = true;
    fresh_root(root, sizeof root, "pointer");
    for (long s = 1; s <= 3; s++) CU_ASSERT_FATAL(save(&a, root, s, "{}") == 0);
    get_file(root, "latest", text, sizeof text);
    CU_ASSERT_STRING_EQUAL(text, "step_00000003\n");
    CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0);
    snprintf(path, sizeof path, "%s/step_00000003", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT(!fell_back);
    /* it names a checkpoint that was deleted */
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s/step_00000003'", root);
    CU_ASSERT_FATAL(system(cmd) == 0);
    CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0);
    snprintf(path, sizeof path, "%s/step_00000002", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT(fell_back);
    /* it names one whose shard was cut short */
    put_file(root, "latest", "step_00000002\n");
    snprintf(path, sizeof path, "%s/step_00000002/rank_00000.zst", root);
    struct stat st;
    CU_ASSERT_FATAL(stat(path, &st) == 0 && truncate(path, st.st_size - 1) == 0);
    CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0);
    snprintf(path, sizeof path, "%s/step_00000001", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT(fell_back);
    /* it names one whose manifest is not valid */
    put_file(root, "latest", "step_00000001");
    CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0);
    CU_ASSERT(!fell_back); /* without the newline too */
    snprintf(path, sizeof path, "%s/step_00000001", root);
    put_file(path, "manifest.json", "{\"format\": \"vdist-sharded-checkpoint\"}");
    CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0);
    CU_ASSERT_EQUAL(out[0], '\0'); /* nothing else is complete */
    CU_ASSERT(fell_back);
    /* it holds something that is not a checkpoint's name: never followed */
    CU_ASSERT_FATAL(save(&a, root, 4, "{}") == 0);
    const char *const bad[] = {"../pointer/step_00000004", "/etc", "step_4x", "", "step_"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        put_file(root, "latest", bad[i]);
        CU_ASSERT_EQUAL(ckpt_latest_ex(root, out, sizeof out, &fell_back), 0);
        snprintf(path, sizeof path, "%s/step_00000004", root);
        CU_ASSERT_STRING_EQUAL(out, path);
        CU_ASSERT(fell_back);
    }
    /* prune keeps what latest names, however old */
    put_file(root, "latest", "step_00000002");
    CU_ASSERT_FATAL(save(&a, root, 2, "{}") == 0); /* repaired; latest names it again */
    CU_ASSERT_FATAL(save(&a, root, 5, "{}") == 0);
    put_file(root, "latest", "step_00000002");
    CU_ASSERT_EQUAL(ckpt_prune(root, 1), 0);
    CU_ASSERT(exists(root, "step_00000002") && exists(root, "step_00000005"));
    CU_ASSERT(!exists(root, "step_00000004") && !exists(root, "step_00000001"));
    par_model_free(&a);
}

static void test_previous(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, false);
    model_fill(&a, 5);
    char root[256], out[512], path[512];
    snprintf(root, sizeof root, "%s/previous_none", tmpdir);
    CU_ASSERT_EQUAL(ckpt_previous(root, 10, out, sizeof out), 0);
    CU_ASSERT_EQUAL(out[0], '\0');
    fresh_root(root, sizeof root, "previous");
    for (long s = 2; s <= 6; s += 2) CU_ASSERT_FATAL(save(&a, root, s, "{}") == 0);
    snprintf(path, sizeof path, "%s/step_00000005", root); /* cut short: skipped */
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    CU_ASSERT_EQUAL(ckpt_previous(root, 6, out, sizeof out), 0);
    snprintf(path, sizeof path, "%s/step_00000004", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT_EQUAL(ckpt_previous(root, 4, out, sizeof out), 0);
    snprintf(path, sizeof path, "%s/step_00000002", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT_EQUAL(ckpt_previous(root, 2, out, sizeof out), 0);
    CU_ASSERT_EQUAL(out[0], '\0');
    CU_ASSERT_EQUAL(ckpt_previous(root, 100, out, sizeof out), 0);
    snprintf(path, sizeof path, "%s/step_00000006", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT_NOT_EQUAL(ckpt_previous(root, 100, out, 8), 0);
    par_model_free(&a);
}

/* ckpt_cleanup removes what interrupted saves left, and nothing else. */
static void test_cleanup(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, false);
    model_fill(&a, 6);
    char root[256], path[512], out[512];
    snprintf(root, sizeof root, "%s/cleanup_none", tmpdir);
    CU_ASSERT_EQUAL(ckpt_cleanup(root), 0); /* no root: nothing to do */
    fresh_root(root, sizeof root, "cleanup");
    CU_ASSERT_FATAL(save(&a, root, 1, "{}") == 0);
    CU_ASSERT_FATAL(save(&a, root, 2, "{}") == 0);
    const char *const partial[] = {"step_00000003.tmp.77.0", "step_00000001.del.5",
                                   "step_00000002.old.9.1", "step_00000004", "step_00000005"};
    for (size_t i = 0; i < sizeof partial / sizeof *partial; i++) {
        snprintf(path, sizeof path, "%s/%s", root, partial[i]);
        CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
        put_file(path, "rank_00000.zst", "x");
    }
    snprintf(path, sizeof path, "%s/step_00000005", root);
    put_file(path, "manifest.json", "{\"format\": \"vdist-sharded-checkpoint\", \"ver");
    put_file(root, "latest.tmp.77", "step_00000003");
    put_file(root, "notes.txt", "mine");
    snprintf(path, sizeof path, "%s/step_keep", root);
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    snprintf(path, sizeof path, "%s/step_00000006", root); /* a newer vdist's: not judged */
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    put_file(path, "manifest.json", "{\"format\": \"vdist-sharded-checkpoint\", \"version\": 99}");
    CU_ASSERT_EQUAL(entry_count(root), 12);
    int const rc = ckpt_cleanup(root);
    if (rc) printf("\n  ckpt_cleanup: %s\n", vd_err_msg());
    CU_ASSERT_EQUAL(rc, 0);
    for (size_t i = 0; i < sizeof partial / sizeof *partial; i++)
        CU_ASSERT(!exists(root, partial[i]));
    CU_ASSERT(!exists(root, "latest.tmp.77"));
    CU_ASSERT(exists(root, "step_00000001") && exists(root, "step_00000002"));
    CU_ASSERT(exists(root, "latest") && exists(root, "notes.txt") && exists(root, "step_keep"));
    CU_ASSERT(exists(root, "step_00000006"));
    CU_ASSERT_EQUAL(entry_count(root), 6);
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    snprintf(path, sizeof path, "%s/step_00000002", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT_EQUAL(ckpt_cleanup(root), 0); /* idempotent */
    CU_ASSERT_EQUAL(entry_count(root), 6);
    par_model_free(&a);
}

static void test_prune(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, false);
    model_fill(&a, 1);
    char root[256], path[512];
    fresh_root(root, sizeof root, "prune");
    for (long s = 1; s <= 4; s++) CU_ASSERT_FATAL(save(&a, root, s, "{}") == 0);
    snprintf(path, sizeof path, "%s/step_00000002.tmp.99.0", root);
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    snprintf(path, sizeof path, "%s/step_00000009.tmp.99.1", root); /* a save under way */
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    snprintf(path, sizeof path, "%s/notes.txt", root);
    FILE *f = fopen(path, "w");
    CU_ASSERT_FATAL(f != NULL);
    fclose(f);
    CU_ASSERT_EQUAL(ckpt_prune(root, 0), 0); /* keeps every complete one */
    CU_ASSERT(exists(root, "step_00000001") && exists(root, "step_00000004"));
    CU_ASSERT(!exists(root, "step_00000002.tmp.99.0"));
    CU_ASSERT_EQUAL(ckpt_prune(root, 2), 0);
    CU_ASSERT(!exists(root, "step_00000001"));
    CU_ASSERT(!exists(root, "step_00000002"));
    CU_ASSERT(exists(root, "step_00000003"));
    CU_ASSERT(exists(root, "step_00000004"));
    CU_ASSERT(exists(root, "step_00000009.tmp.99.1"));
    CU_ASSERT(exists(root, "notes.txt"));
    CU_ASSERT_EQUAL(entry_count(root), 5); /* and latest */
    CU_ASSERT_EQUAL(ckpt_prune(root, 1), 0);
    CU_ASSERT(!exists(root, "step_00000003") && exists(root, "step_00000004"));
    CU_ASSERT_NOT_EQUAL(ckpt_prune(root, -1), 0);
    par_model_free(&a);
}

/* Saving a step again replaces it whole. */
static void test_resave(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a, b;
    model_make(&a, &c, true);
    model_make(&b, &c, true);
    char root[256], dir[300];
    fresh_root(root, sizeof root, "resave");
    model_fill(&a, 1);
    CU_ASSERT_FATAL(save(&a, root, 3, "{}") == 0);
    model_fill(&a, 2);
    CU_ASSERT_FATAL(save(&a, root, 3, "{}") == 0);
    CU_ASSERT_EQUAL(entry_count(root), 2); /* the step and latest */
    snprintf(dir, sizeof dir, "%s/step_00000003", root);
    long step;
    CU_ASSERT_FATAL(ckpt_load(&b, dir, &step, NULL) == 0);
    CU_ASSERT(model_equal(&a, &b));
    par_model_free(&a);
    par_model_free(&b);
}

static void test_corrupt_shard(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a, b;
    model_make(&a, &c, false);
    model_make(&b, &c, false);
    model_fill(&a, 5);
    char root[256], dir[300], path[512], text[512];
    fresh_root(root, sizeof root, "corrupt");
    CU_ASSERT_FATAL(save(&a, root, 1, "{}") == 0);
    snprintf(dir, sizeof dir, "%s/step_00000001", root);
    snprintf(path, sizeof path, "%s/rank_00000.zst", dir);
    FILE *f = fopen(path, "r+b");
    CU_ASSERT_FATAL(f != NULL);
    fseek(f, 0, SEEK_END);
    long const size = ftell(f);
    fseek(f, size / 2, SEEK_SET);
    int const byte = fgetc(f);
    fseek(f, size / 2, SEEK_SET);
    fputc(byte ^ 0x5a, f);
    fclose(f);
    long step = -1;
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("rank_00000.zst"));
    CU_ASSERT(msg_has("corrupt"));
    CU_ASSERT(all_zero(&b)); /* a failed load changes nothing */
    CU_ASSERT_EQUAL(step, -1);
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(msg_has("rank_00000.zst"));
    CU_ASSERT_STRING_EQUAL(text, "");
    /* cut short */
    CU_ASSERT_FATAL(truncate(path, size - 100) == 0);
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("rank_00000.zst"));
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(msg_has("rank_00000.zst"));
    par_model_free(&a);
    par_model_free(&b);
}

/* Sets the shape of one tensor in the manifest's list and its pieces (another model). */
static void manifest_set_shape(const char *dir, const char *tensor, size_t r, size_t c)
{
    char path[512];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_t *m = json_load_file(path, 0, NULL);
    CU_ASSERT_FATAL(m != NULL);
    json_t *lists[2] = {json_object_get(m, "tensors"), json_object_get(m, "pieces")};
    const char *keys[2] = {"name", "tensor"};
    for (int l = 0; l < 2; l++) {
        size_t i;
        json_t *o;
        json_array_foreach(lists[l], i, o) {
            if (strcmp(json_string_value(json_object_get(o, keys[l])), tensor) == 0)
                json_object_set_new(o, "shape", json_pack("[II]", (json_int_t)r, (json_int_t)c));
        }
    }
    CU_ASSERT_FATAL(json_dump_file(m, path, JSON_INDENT(1)) == 0);
    json_decref(m);
}

static void test_wrong_shape(void)
{
    struct model_config c, wider;
    tiny_config(&c);
    struct par_model a, b;
    model_make(&a, &c, false);
    model_fill(&a, 6);
    char root[256], dir[300];
    fresh_root(root, sizeof root, "shape");
    CU_ASSERT_FATAL(save(&a, root, 1, "{}") == 0);
    snprintf(dir, sizeof dir, "%s/step_00000001", root);
    long step;
    /* into a model with other expert sizes */
    wider = c;
    wider.intermediate_size = 64;
    model_make(&b, &wider, false);
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("model.layers.0.block_sparse_moe.experts.0.w1.weight"));
    CU_ASSERT(msg_has("[48, 32]") && msg_has("[64, 32]") && msg_has("manifest.json"));
    par_model_free(&b);
    /* into a model with fewer layers: the extra tensors are named */
    wider = c;
    wider.num_hidden_layers = 1;
    model_make(&b, &wider, false);
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("model.layers.1."));
    par_model_free(&b);
    /* a manifest whose tensor has another shape */
    manifest_set_shape(dir, "model.layers.1.self_attn.q_proj.weight", 32, 16);
    model_make(&b, &c, false);
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("'model.layers.1.self_attn.q_proj.weight'"));
    CU_ASSERT(msg_has("[32, 16]") && msg_has("[32, 32]"));
    CU_ASSERT(all_zero(&b));
    par_model_free(&a);
    par_model_free(&b);
}

/* A piece dropped from the manifest: load and verify name what is not covered. */
static void test_missing_piece(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a, b;
    model_make(&a, &c, true);
    model_make(&b, &c, true);
    model_fill(&a, 8);
    char root[256], dir[300], path[512], text[512];
    fresh_root(root, sizeof root, "missing");
    CU_ASSERT_FATAL(save(&a, root, 1, "{}") == 0);
    snprintf(dir, sizeof dir, "%s/step_00000001", root);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_t *m = json_load_file(path, 0, NULL);
    CU_ASSERT_FATAL(m != NULL);
    json_t *pieces = json_object_get(m, "pieces");
    size_t victim = 0, i;
    json_t *o;
    json_array_foreach(pieces, i, o) {
        if (strcmp(json_string_value(json_object_get(o, "kind")), "v") == 0 &&
            strcmp(json_string_value(json_object_get(o, "tensor")), "lm_head.weight") == 0)
            victim = i;
    }
    json_array_remove(pieces, victim);
    json_object_set_new(m, "piece_count", json_integer((json_int_t)json_array_size(pieces)));
    CU_ASSERT_FATAL(json_dump_file(m, path, JSON_INDENT(1)) == 0);
    json_decref(m);
    long step;
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("'lm_head.weight'") && msg_has("in no piece"));
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(msg_has("v of tensor 'lm_head.weight'"));
    par_model_free(&a);
    par_model_free(&b);
}

/* Every piece of `kind` of `tensor` in dir's manifest gets key = value (value stolen); a
 * NULL value deletes the key. */
static void manifest_piece_set(const char *dir, const char *tensor, const char *kind,
                               const char *key, json_t *value)
{
    char path[512];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_t *m = json_load_file(path, 0, NULL);
    CU_ASSERT_FATAL(m != NULL);
    size_t i;
    json_t *o;
    json_array_foreach(json_object_get(m, "pieces"), i, o) {
        if (strcmp(json_string_value(json_object_get(o, "tensor")), tensor) != 0 ||
            strcmp(json_string_value(json_object_get(o, "kind")), kind) != 0)
            continue;
        if (value) json_object_set(o, key, value);
        else json_object_del(o, key);
    }
    json_decref(value);
    CU_ASSERT_FATAL(json_dump_file(m, path, JSON_INDENT(1)) == 0);
    json_decref(m);
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long const n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = calloc((size_t)n + 1, 1);
    if (text && fread(text, 1, (size_t)n, f) != (size_t)n) {
        free(text);
        text = NULL;
    }
    fclose(f);
    return text;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    CU_ASSERT_FATAL(f != NULL);
    fputs(text, f);
    fclose(f);
}

/* Version 2's fields: each tensor's dtype, each piece's raw size and checksum (the frame's
 * last 4 bytes), the training state; a checksum edited in the manifest fails verify and
 * load, naming the file and the tensor. */
static void test_checksums(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a, b;
    model_make(&a, &c, false);
    model_make(&b, &c, false);
    model_fill(&a, 21);
    char root[256], dir[300], path[512], text[512];
    fresh_root(root, sizeof root, "checksums");
    const char *state = "{\"lr\": 0.00025, \"data_next_sequence\": 40, \"step\": 5}";
    struct ckpt_meta const meta = {.step = 5, .adam_step = a.adam_step, .config = "{}",
                                   .layout = "{}", .state = state};
    CU_ASSERT_FATAL(ckpt_save(&a, root, &meta, 3) == 0);
    snprintf(dir, sizeof dir, "%s/step_00000005", root);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_t *m = json_load_file(path, 0, NULL);
    CU_ASSERT_FATAL(m != NULL);
    CU_ASSERT_EQUAL(json_integer_value(json_object_get(m, "version")), 2);
    json_t *want = json_loads(state, 0, NULL);
    CU_ASSERT(json_equal(json_object_get(m, "train_state"), want));
    size_t i;
    json_t *o;
    json_array_foreach(json_object_get(m, "tensors"), i, o)
        CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(o, "dtype")), "F32");
    snprintf(path, sizeof path, "%s/rank_00000.zst", dir);
    FILE *f = fopen(path, "rb");
    CU_ASSERT_FATAL(f != NULL);
    size_t bad = 0;
    json_array_foreach(json_object_get(m, "pieces"), i, o) {
        const json_t *range = json_object_get(o, "range");
        json_int_t const n = json_integer_value(json_array_get(range, 1)) -
                             json_integer_value(json_array_get(range, 0));
        json_int_t const end = json_integer_value(json_object_get(o, "offset")) +
                               json_integer_value(json_object_get(o, "nbytes"));
        unsigned char tail[4] = {0};
        char hex[16];
        fseek(f, (long)end - 4, SEEK_SET);
        bad += fread(tail, 1, 4, f) != 4;
        snprintf(hex, sizeof hex, "%08x",
                 (unsigned)tail[0] | (unsigned)tail[1] << 8 | (unsigned)tail[2] << 16 |
                     (unsigned)tail[3] << 24);
        const char *ck = json_string_value(json_object_get(o, "checksum"));
        bad += json_integer_value(json_object_get(o, "raw_nbytes")) != 4 * n;
        bad += !ck || strcmp(ck, hex) != 0;
    }
    fclose(f);
    CU_ASSERT_EQUAL(bad, 0);
    json_decref(m);
    char *back = NULL;
    CU_ASSERT_FATAL(ckpt_train_state(dir, &back) == 0);
    json_t *got = back ? json_loads(back, 0, NULL) : NULL;
    CU_ASSERT(got && json_equal(got, want));
    json_decref(got);
    json_decref(want);
    free(back);
    CU_ASSERT_EQUAL(verify(dir, text, sizeof text), 0);

    /* a checksum that does not match its frame */
    manifest_piece_set(dir, "lm_head.weight", "m", "checksum", json_string("0badc0de"));
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(msg_has("rank_00000.zst") && msg_has("'lm_head.weight'") && msg_has("checksum") &&
              msg_has("0badc0de"));
    long step = -1;
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("rank_00000.zst") && msg_has("'lm_head.weight'") && msg_has("checksum"));
    CU_ASSERT(all_zero(&b));
    /* one that is not 8 hex digits; one missing from a version 2 manifest */
    manifest_piece_set(dir, "lm_head.weight", "m", "checksum", json_string("0badc0dx"));
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(msg_has("'lm_head.weight'") && msg_has("\"checksum\""));
    manifest_piece_set(dir, "lm_head.weight", "m", "checksum", NULL);
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("'lm_head.weight'") && msg_has("\"checksum\""));
    CU_ASSERT(all_zero(&b));
    par_model_free(&a);
    par_model_free(&b);
}

/* A version 1 manifest (no checksums, raw sizes, dtypes, state) still loads and verifies;
 * a newer version is refused. */
static void test_version1(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a, b;
    model_make(&a, &c, true);
    model_make(&b, &c, true);
    model_fill(&a, 22);
    char root[256], dir[300], path[512], text[512];
    fresh_root(root, sizeof root, "version1");
    CU_ASSERT_FATAL(save(&a, root, 1, "{}") == 0);
    snprintf(dir, sizeof dir, "%s/step_00000001", root);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_t *m = json_load_file(path, 0, NULL);
    CU_ASSERT_FATAL(m != NULL);
    json_object_set_new(m, "version", json_integer(1));
    json_object_del(m, "train_state");
    size_t i;
    json_t *o;
    json_array_foreach(json_object_get(m, "tensors"), i, o) json_object_del(o, "dtype");
    json_array_foreach(json_object_get(m, "pieces"), i, o) {
        json_object_del(o, "raw_nbytes");
        json_object_del(o, "checksum");
    }
    CU_ASSERT_FATAL(json_dump_file(m, path, JSON_INDENT(1)) == 0);
    long step = -1;
    int const rc = ckpt_load(&b, dir, &step, NULL);
    if (rc) printf("\n  ckpt_load: %s\n", vd_err_msg());
    CU_ASSERT_EQUAL(rc, 0);
    CU_ASSERT(model_equal(&a, &b));
    CU_ASSERT_EQUAL(verify(dir, text, sizeof text), 0);
    char *state = (char *)"x";
    CU_ASSERT_EQUAL(ckpt_train_state(dir, &state), 0);
    CU_ASSERT_PTR_NULL(state);
    json_object_set_new(m, "version", json_integer(3));
    CU_ASSERT_FATAL(json_dump_file(m, path, JSON_INDENT(1)) == 0);
    json_decref(m);
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("version 3"));
    par_model_free(&a);
    par_model_free(&b);
}

static void test_inspect(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, false);
    model_fill(&a, 23);
    char root[256], dir[300];
    fresh_root(root, sizeof root, "inspect");
    struct ckpt_meta const meta = {
        .step = 5, .adam_step = 6, .seed = 77,
        .config = "{\"model.hidden_size\": 32, \"model.num_hidden_layers\": 2, "
                  "\"train.steps\": 10}",
        .layout = "{\"world\": 1, \"tp\": 1}", .state = "{\"lr\": 0.5}"};
    CU_ASSERT_FATAL(ckpt_save(&a, root, &meta, 3) == 0);
    snprintf(dir, sizeof dir, "%s/step_00000005", root);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    CU_ASSERT_FATAL(f != NULL);
    int const rc = ckpt_inspect(dir, f);
    fclose(f);
    CU_ASSERT_EQUAL(rc, 0);
    const char *const want[] = {"  step         5\n", "  adam_step    6\n",
                                "  seed         77\n", "{\"world\":1,\"tp\":1}",
                                "\"model.hidden_size\":32", "\"model.num_hidden_layers\":2",
                                "{\"lr\":0.5}", "  tensors      41 (", "ratio", "  param  ",
                                "  m  ", "  v  ", "  total  ", "1 files, 123 pieces"};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        bool const ok = buf && strstr(buf, want[i]);
        CU_ASSERT(ok);
        if (!ok) printf("\n  expected '%s' in:\n%s", want[i], buf ? buf : "");
    }
    CU_ASSERT(buf && !strstr(buf, "train.steps")); /* only the model's keys */
    printf("\n%s", buf ? buf : "");
    free(buf);
    f = fopen("/dev/null", "w");
    CU_ASSERT_NOT_EQUAL(ckpt_inspect(root, f), 0); /* not a checkpoint */
    fclose(f);
    CU_ASSERT(msg_has("manifest.json"));
    par_model_free(&a);
}

/* The files of dir named model-*-of-*.safetensors, counted. */
static int count_shards(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += strncmp(e->d_name, "model-", 6) == 0 && strstr(e->d_name, ".safetensors") != NULL;
    closedir(d);
    return n;
}

/* Export to Hugging Face shards: the index names every tensor's file, and the files hold
 * exactly the saved parameters. */
static void test_export(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, true);
    model_fill(&a, 24);
    char root[256], dir[300], out[300], path[600];
    fresh_root(root, sizeof root, "export");
    CU_ASSERT_FATAL(save(&a, root, 3, "{}") == 0);
    snprintf(dir, sizeof dir, "%s/step_00000003", root);
    snprintf(out, sizeof out, "%s/hf/model", root); /* made, parents too */
    int rc = ckpt_export_hf_sharded(dir, out, 40000);
    if (rc) printf("\n  ckpt_export_hf_sharded: %s\n", vd_err_msg());
    CU_ASSERT_FATAL(rc == 0);
    int const nshards = count_shards(out);
    CU_ASSERT(nshards >= 2);
    CU_ASSERT_EQUAL(entry_count(out), nshards + 1); /* the shards and the index, no temporary */
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", out);
    json_t *index = json_load_file(path, 0, NULL);
    CU_ASSERT_FATAL(index != NULL);
    const json_t *map = json_object_get(index, "weight_map");
    CU_ASSERT_EQUAL(json_object_size(map), (size_t)a.tab.count);
    size_t total = 0, wrong = 0;
    for (int i = 0; i < a.tab.count; i++) {
        const struct model_tensor *t = &a.tab.t[i];
        total += t->numel * sizeof(float);
        const char *file = json_string_value(json_object_get(map, t->name));
        char want_name[64];
        bool name_ok = false;
        for (int s = 1; file && s <= nshards; s++) {
            snprintf(want_name, sizeof want_name, "model-%05d-of-%05d.safetensors", s, nshards);
            name_ok |= strcmp(file, want_name) == 0;
        }
        if (!name_ok) {
            wrong++;
            continue;
        }
        snprintf(path, sizeof path, "%s/%s", out, file);
        ckpt_st_file *st = NULL;
        if (ckpt_st_open(&st, path) != 0) {
            printf("\n  ckpt_st_open: %s\n", vd_err_msg());
            wrong++;
            continue;
        }
        int const j = ckpt_st_find(st, t->name);
        const struct ckpt_st_tensor *e = j >= 0 ? ckpt_st_get(st, j) : NULL;
        float *got = calloc(t->numel, sizeof(float));
        bool const same =
            e && e->dtype == CKPT_F32 && e->ndim == t->ndim && e->shape[0] == t->shape[0] &&
            (t->ndim == 1 || e->shape[1] == t->shape[1]) &&
            ckpt_st_read_block(st, j, got, 0, t->shape[0], 0, t->shape[1]) == 0 &&
            memcmp(got, a.params + t->offset, t->numel * sizeof(float)) == 0;
        wrong += !same;
        free(got);
        ckpt_st_close(st);
    }
    CU_ASSERT_EQUAL(wrong, 0);
    CU_ASSERT_EQUAL(json_integer_value(json_object_get(json_object_get(index, "metadata"),
                                                       "total_size")),
                    (json_int_t)total);
    json_decref(index);
    /* again, over the first: the same files */
    CU_ASSERT_EQUAL(ckpt_export_hf_sharded(dir, out, 40000), 0);
    CU_ASSERT_EQUAL(entry_count(out), nshards + 1);
    /* one file when the limit allows (0: the default) */
    snprintf(out, sizeof out, "%s/hf1", root);
    CU_ASSERT_EQUAL(ckpt_export_hf_sharded(dir, out, 0), 0);
    CU_ASSERT(exists(out, "model-00001-of-00001.safetensors"));
    /* a corrupt parameter piece: an error naming the shard, nothing written */
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_t *m = json_load_file(path, 0, NULL);
    CU_ASSERT_FATAL(m != NULL);
    long at = -1;
    size_t i;
    json_t *o;
    json_array_foreach(json_object_get(m, "pieces"), i, o) {
        if (strcmp(json_string_value(json_object_get(o, "tensor")), "lm_head.weight") == 0 &&
            strcmp(json_string_value(json_object_get(o, "kind")), "param") == 0)
            at = (long)(json_integer_value(json_object_get(o, "offset")) +
                        json_integer_value(json_object_get(o, "nbytes")) / 2);
    }
    json_decref(m);
    CU_ASSERT_FATAL(at > 0);
    snprintf(path, sizeof path, "%s/rank_00000.zst", dir);
    FILE *f = fopen(path, "r+b");
    CU_ASSERT_FATAL(f != NULL);
    fseek(f, at, SEEK_SET);
    int const byte = fgetc(f);
    fseek(f, at, SEEK_SET);
    fputc(byte ^ 0x5a, f);
    fclose(f);
    snprintf(out, sizeof out, "%s/hf2", root);
    CU_ASSERT_NOT_EQUAL(ckpt_export_hf_sharded(dir, out, 40000), 0);
    CU_ASSERT(msg_has("rank_00000.zst"));
    CU_ASSERT_EQUAL(entry_count(out), 0);
    par_model_free(&a);
}

/* Address space now, in bytes (VmSize), or 0. */
static size_t vm_size(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    size_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmSize: %zu kB", &kb) == 1) break;
    fclose(f);
    return kb * 1024;
}

/* Manifests whose sizes their files cannot back are refused before anything is sized by
 * them: under an address-space limit of what the process has plus 4 GB, any allocation
 * sized by one of these claims fails, and vd_alloc's failure aborts the suite. */
static void test_absurd_sizes(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a, b;
    model_make(&a, &c, false);
    model_make(&b, &c, false);
    model_fill(&a, 25);
    char root[256], dir[300], path[512], text[512], out[300];
    fresh_root(root, sizeof root, "absurd");
    CU_ASSERT_FATAL(save(&a, root, 1, "{}") == 0);
    snprintf(dir, sizeof dir, "%s/step_00000001", root);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    char *pristine = read_text(path);
    CU_ASSERT_FATAL(pristine != NULL);
    snprintf(out, sizeof out, "%s/hf", root);
    struct rlimit old, lim;
    CU_ASSERT_FATAL(getrlimit(RLIMIT_AS, &old) == 0);
    lim = old;
    lim.rlim_cur = vm_size() + ((size_t)4 << 30);
    CU_ASSERT_FATAL(vm_size() > 0 && setrlimit(RLIMIT_AS, &lim) == 0);
    long step;

    /* a frame of 2^40 bytes */
    manifest_piece_set(dir, "lm_head.weight", "param", "nbytes", json_integer((json_int_t)1 << 40));
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("rank_00000.zst") && msg_has("cut short") && msg_has("'lm_head.weight'"));
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(msg_has("rank_00000.zst"));
    write_text(path, pristine);
    /* 2^40 raw bytes, against the piece's range */
    manifest_piece_set(dir, "lm_head.weight", "param", "raw_nbytes",
                       json_integer((json_int_t)1 << 40));
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("\"raw_nbytes\"") && msg_has("'lm_head.weight'"));
    write_text(path, pristine);
    /* 2^24 elements (64 MB raw, consistent with range and shapes) from a small frame */
    manifest_set_shape(dir, "lm_head.weight", (size_t)1 << 19, 32);
    manifest_piece_set(dir, "lm_head.weight", "param", "block_shape",
                       json_pack("[II]", (json_int_t)1 << 19, (json_int_t)32));
    manifest_piece_set(dir, "lm_head.weight", "param", "range",
                       json_pack("[II]", (json_int_t)0, (json_int_t)1 << 24));
    manifest_piece_set(dir, "lm_head.weight", "param", "raw_nbytes",
                       json_integer((json_int_t)1 << 26));
    manifest_piece_set(dir, "lm_head.weight", "param", "nbytes", json_integer(100));
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(msg_has("more than zstd can encode") && msg_has("'lm_head.weight'"));
    write_text(path, pristine);
    /* a tensor of 2^40 elements: coverage is checked without a byte per element */
    manifest_set_shape(dir, "model.norm.weight", (size_t)1 << 20, (size_t)1 << 20);
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0);
    CU_ASSERT(msg_has("'model.norm.weight'") && msg_has("in no piece"));
    CU_ASSERT_NOT_EQUAL(ckpt_export_hf_sharded(dir, out, 0), 0);
    CU_ASSERT(msg_has("'model.norm.weight'"));
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0); /* not the configured model */
    CU_ASSERT(msg_has("'model.norm.weight'"));
    write_text(path, pristine);
    /* a shard file of the largest rank number */
    manifest_piece_set(dir, "lm_head.weight", "v", "file", json_string("rank_2147483647.zst"));
    CU_ASSERT_NOT_EQUAL(verify(dir, text, sizeof text), 0); /* rank_00000.zst has a gap now */
    CU_ASSERT(msg_has("rank_"));
    CU_ASSERT_NOT_EQUAL(ckpt_load(&b, dir, &step, NULL), 0);
    CU_ASSERT(msg_has("rank_2147483647.zst"));
    write_text(path, pristine);

    CU_ASSERT_FATAL(setrlimit(RLIMIT_AS, &old) == 0);
    CU_ASSERT(all_zero(&b));
    CU_ASSERT_EQUAL(verify(dir, text, sizeof text), 0); /* restored */
    free(pristine);
    par_model_free(&a);
    par_model_free(&b);
}

static void test_unwritable(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, false);
    model_fill(&a, 9);
    char root[256], path[512];
    /* a root below a regular file: fails before anything is written */
    fresh_root(root, sizeof root, "unwritable");
    snprintf(path, sizeof path, "%s/file", root);
    FILE *f = fopen(path, "w");
    CU_ASSERT_FATAL(f != NULL);
    fclose(f);
    snprintf(path, sizeof path, "%s/file/ckpt", root);
    CU_ASSERT_NOT_EQUAL(ckpt_save(&a, path, &(struct ckpt_meta){.step = 1}, 3), 0);
    CU_ASSERT(msg_has("file/ckpt"));
    snprintf(path, sizeof path, "%s/file", root);
    CU_ASSERT_NOT_EQUAL(ckpt_save(&a, path, &(struct ckpt_meta){.step = 1}, 3), 0);
    CU_ASSERT_EQUAL(entry_count(root), 1);
    /* the shard write fails half-way (file size limit): the temporary goes, nothing stays */
    fresh_root(root, sizeof root, "fsize");
    struct rlimit old, lim;
    CU_ASSERT_FATAL(getrlimit(RLIMIT_FSIZE, &old) == 0);
    lim = old;
    lim.rlim_cur = 2000;
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    CU_ASSERT_FATAL(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    int const rc = ckpt_save(&a, root, &(struct ckpt_meta){.step = 1}, 3);
    CU_ASSERT_FATAL(setrlimit(RLIMIT_FSIZE, &old) == 0);
    signal(SIGXFSZ, prev);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    CU_ASSERT(msg_has("rank_00000.zst"));
    CU_ASSERT_EQUAL(entry_count(root), 0);
    char out[512];
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    CU_ASSERT_EQUAL(out[0], '\0');
    CU_ASSERT_NOT_EQUAL(ckpt_save(&a, root, &(struct ckpt_meta){.step = 1}, 0), 0); /* level */
    /* latest cannot be replaced (a directory): the commit fails, and the checkpoint it would
     * have named is taken back */
    fresh_root(root, sizeof root, "nolatest");
    snprintf(path, sizeof path, "%s/latest", root);
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    CU_ASSERT_NOT_EQUAL(ckpt_save(&a, root, &(struct ckpt_meta){.step = 1}, 3), 0);
    CU_ASSERT(msg_has("latest"));
    CU_ASSERT_EQUAL(entry_count(root), 1);
    par_model_free(&a);
}

/* The first entry of dir whose name starts with prefix into out; false when none. */
static bool find_entry(const char *dir, const char *prefix, char *out, size_t cap)
{
    DIR *d = opendir(dir);
    if (!d) return false;
    bool found = false;
    const struct dirent *e;
    while (!found && (e = readdir(d)) != NULL)
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) {
            snprintf(out, cap, "%s/%s", dir, e->d_name);
            found = true;
        }
    closedir(d);
    return found;
}

/* ckpt_save_start with the test's metadata; the config string is the caller's to free. */
static int start(const struct par_model *pm, const char *root, long step, const char *config,
                 ckpt_pending **p)
{
    struct ckpt_meta const meta = {.step = step, .adam_step = pm->adam_step, .seed = 1234,
                                   .config = config, .layout = "{\"world\": 1, \"tp\": 1}",
                                   .state = config};
    int const rc = ckpt_save_start(pm, root, &meta, 3, p);
    if (rc) printf("\n  ckpt_save_start: %s\n", vd_err_msg());
    return rc;
}

/* Start, change the model (the next training steps) and free the config, finish: what
 * loads is the model as it was at start. Two saves may be under way at once. */
static void async_snapshot(bool zero, const char *name)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a, want, b;
    model_make(&a, &c, zero);
    model_make(&want, &c, zero);
    model_make(&b, &c, zero);
    model_fill(&a, 11);
    model_fill(&want, 11);
    char root[256], dir[300], text[512];
    fresh_root(root, sizeof root, name);
    char *config = strdup("{\"train\": {\"steps\": 7}}");
    CU_ASSERT_FATAL(config != NULL);
    ckpt_pending *p1 = NULL, *p2 = NULL;
    CU_ASSERT_FATAL(start(&a, root, 6, config, &p1) == 0);
    CU_ASSERT_FATAL(p1 != NULL);
    memset(config, 'x', strlen(config));
    free(config);
    model_fill(&a, 12); /* parameters, moments and AdamW's step all change */
    CU_ASSERT(!model_equal(&a, &want));
    CU_ASSERT_FATAL(start(&a, root, 7, NULL, &p2) == 0);
    model_fill(&a, 13);
    CU_ASSERT(!exists(root, "step_00000006")); /* nothing final before finish */
    int rc = ckpt_save_finish(p1);
    if (rc) printf("\n  ckpt_save_finish: %s\n", vd_err_msg());
    CU_ASSERT_FATAL(rc == 0);
    rc = ckpt_save_finish(p2);
    if (rc) printf("\n  ckpt_save_finish: %s\n", vd_err_msg());
    CU_ASSERT_FATAL(rc == 0);
    CU_ASSERT_EQUAL(entry_count(root), 3); /* two steps and latest: no temporary left */

    snprintf(dir, sizeof dir, "%s/step_00000006", root);
    long step = -1;
    char *back = NULL;
    rc = ckpt_load(&b, dir, &step, &back);
    if (rc) printf("\n  ckpt_load: %s\n", vd_err_msg());
    CU_ASSERT_FATAL(rc == 0);
    CU_ASSERT_EQUAL(step, 6);
    CU_ASSERT(model_equal(&b, &want)); /* the snapshot's values, not the changed ones */
    json_t *got = back ? json_loads(back, 0, NULL) : NULL;
    json_t *sent = json_pack("{s:{s:i}}", "train", "steps", 7);
    CU_ASSERT(got != NULL && json_equal(got, sent));
    json_decref(got);
    free(back);
    CU_ASSERT_FATAL(ckpt_train_state(dir, &back) == 0); /* copied at start too */
    got = back ? json_loads(back, 0, NULL) : NULL;
    CU_ASSERT(got != NULL && json_equal(got, sent));
    json_decref(got);
    json_decref(sent);
    free(back);
    CU_ASSERT_EQUAL(verify(dir, text, sizeof text), 0);

    model_fill(&want, 12);
    snprintf(dir, sizeof dir, "%s/step_00000007", root);
    CU_ASSERT_FATAL(ckpt_load(&b, dir, &step, NULL) == 0);
    CU_ASSERT_EQUAL(step, 7);
    CU_ASSERT(model_equal(&b, &want));
    par_model_free(&a);
    par_model_free(&want);
    par_model_free(&b);
}

static void test_async_snapshot(void) { async_snapshot(false, "async_plain"); }
static void test_async_snapshot_zero(void) { async_snapshot(true, "async_zero"); }

/* Failures: start's own (agreed, no handle, nothing written), and the background writer's
 * (a file size limit; the temporary directory taken away while it writes), which finish
 * reports, leaving nothing under the final name. */
static void test_async_errors(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, false);
    model_fill(&a, 9);
    char root[256], path[512], out[512];
    ckpt_pending *p = (ckpt_pending *)&p; /* start must clear it on error */
    fresh_root(root, sizeof root, "async_start");
    snprintf(path, sizeof path, "%s/file", root);
    FILE *f = fopen(path, "w");
    CU_ASSERT_FATAL(f != NULL);
    fclose(f);
    CU_ASSERT_NOT_EQUAL(ckpt_save_start(&a, path, &(struct ckpt_meta){.step = 1}, 3, &p), 0);
    CU_ASSERT(p == NULL);
    CU_ASSERT_EQUAL(entry_count(root), 1);
    p = (ckpt_pending *)&p;
    CU_ASSERT_NOT_EQUAL(ckpt_save_start(&a, root, &(struct ckpt_meta){.step = 1}, 20, &p), 0);
    CU_ASSERT(p == NULL);

    /* The limit applies to the writer thread, which has SIGXFSZ blocked: its write fails
     * with EFBIG, no signal handler needed. */
    fresh_root(root, sizeof root, "async_fsize");
    struct rlimit old, lim;
    CU_ASSERT_FATAL(getrlimit(RLIMIT_FSIZE, &old) == 0);
    lim = old;
    lim.rlim_cur = 2000;
    CU_ASSERT_FATAL(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    int rc = start(&a, root, 1, "{}", &p);
    model_fill(&a, 10);
    if (rc == 0) rc = ckpt_save_finish(p);
    CU_ASSERT_FATAL(setrlimit(RLIMIT_FSIZE, &old) == 0);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    CU_ASSERT(msg_has("rank_00000.zst"));
    CU_ASSERT_EQUAL(entry_count(root), 0);
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    CU_ASSERT_EQUAL(out[0], '\0');

    /* The writer finds its directory gone (before or after creating its file): the error
     * names the temporary directory, and the step is not published. */
    fresh_root(root, sizeof root, "async_moved");
    CU_ASSERT_FATAL(start(&a, root, 2, "{}", &p) == 0);
    char tmp[512], moved[600];
    CU_ASSERT_FATAL(find_entry(root, "step_00000002.tmp.", tmp, sizeof tmp));
    snprintf(moved, sizeof moved, "%s/moved", root);
    CU_ASSERT_FATAL(rename(tmp, moved) == 0);
    CU_ASSERT_NOT_EQUAL(ckpt_save_finish(p), 0);
    CU_ASSERT(msg_has("step_00000002.tmp."));
    CU_ASSERT(!exists(root, "step_00000002"));
    CU_ASSERT_EQUAL(entry_count(root), 1); /* only what the test moved */
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    CU_ASSERT_EQUAL(out[0], '\0');
    par_model_free(&a);
}

int main(int argc, char **argv)
{
    dist_init(&argc, &argv);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/vdist_ckpt_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("sharded checkpoints (1 rank)", NULL, NULL);
    if (!s || !CU_add_test(s, "save, load: bitwise equal; verify OK", test_roundtrip) ||
        !CU_add_test(s, "the same with the distributed optimizer", test_roundtrip_zero) ||
        !CU_add_test(s, "config text that is not JSON, no config", test_config_text) ||
        !CU_add_test(s, "latest: newest complete, ignores cut-short ones", test_latest) ||
        !CU_add_test(s, "latest pointer: written, read, fallback", test_latest_pointer) ||
        !CU_add_test(s, "previous: newest complete below a step", test_previous) ||
        !CU_add_test(s, "cleanup removes partial saves only", test_cleanup) ||
        !CU_add_test(s, "prune keeps the newest, drops older leftovers", test_prune) ||
        !CU_add_test(s, "saving a step again replaces it", test_resave) ||
        !CU_add_test(s, "a corrupted or cut shard fails load and verify", test_corrupt_shard) ||
        !CU_add_test(s, "another model's shapes are named", test_wrong_shape) ||
        !CU_add_test(s, "a piece missing from the manifest", test_missing_piece) ||
        !CU_add_test(s, "checksums in the manifest, checked", test_checksums) ||
        !CU_add_test(s, "version 1 manifests still load", test_version1) ||
        !CU_add_test(s, "inspect: step, tensors, sizes, ratio", test_inspect) ||
        !CU_add_test(s, "export: HF shards and index reload exactly", test_export) ||
        !CU_add_test(s, "absurd sizes refused without allocating", test_absurd_sizes) ||
        !CU_add_test(s, "a save that cannot write leaves nothing", test_unwritable) ||
        !CU_add_test(s, "async: the snapshot at start is what loads", test_async_snapshot) ||
        !CU_add_test(s, "async, distributed optimizer: the same", test_async_snapshot_zero) ||
        !CU_add_test(s, "async: start and writer failures leave nothing", test_async_errors)) {
        CU_cleanup_registry();
        return 1;
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned const failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    ckpt_save_release();
    dist_finalize();
    return failures ? 1 : 0;
}
