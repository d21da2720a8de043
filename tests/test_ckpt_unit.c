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
    struct model_layout const lay = {.tp = 1, .ep = 1, .etp = 1, .layer_begin = 0,
                                     .layer_end = c->num_hidden_layers, .has_embed = true,
                                     .has_head = true};
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
    CU_ASSERT_EQUAL(entry_count(root), 1); /* no temporary left */

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

static void test_latest(void)
{
    struct model_config c;
    tiny_config(&c);
    struct par_model a;
    model_make(&a, &c, true);
    model_fill(&a, 1);
    char root[256], out[512], path[512];
    snprintf(root, sizeof root, "%s/latest_none", tmpdir);
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0); /* no root yet: nothing */
    CU_ASSERT_EQUAL(out[0], '\0');
    fresh_root(root, sizeof root, "latest");
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    CU_ASSERT_EQUAL(out[0], '\0');
    CU_ASSERT_FATAL(save(&a, root, 1, "{}") == 0);
    CU_ASSERT_FATAL(save(&a, root, 3, "{}") == 0);
    CU_ASSERT_FATAL(save(&a, root, 2, "{}") == 0);
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
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    snprintf(path, sizeof path, "%s/step_00000003", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    /* a shard gone: not complete either */
    snprintf(path, sizeof path, "%s/step_00000003/rank_00000.zst", root);
    CU_ASSERT_FATAL(unlink(path) == 0);
    CU_ASSERT_EQUAL(ckpt_latest(root, out, sizeof out), 0);
    snprintf(path, sizeof path, "%s/step_00000002", root);
    CU_ASSERT_STRING_EQUAL(out, path);
    CU_ASSERT_NOT_EQUAL(ckpt_latest(root, out, 8), 0); /* no room: an error, not a cut path */
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
    CU_ASSERT_EQUAL(entry_count(root), 4);
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
    CU_ASSERT_EQUAL(entry_count(root), 1);
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
                                   .config = config, .layout = "{\"world\": 1, \"tp\": 1}"};
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
    CU_ASSERT_EQUAL(entry_count(root), 2); /* no temporary left */

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
        !CU_add_test(s, "prune keeps the newest, drops older leftovers", test_prune) ||
        !CU_add_test(s, "saving a step again replaces it", test_resave) ||
        !CU_add_test(s, "a corrupted or cut shard fails load and verify", test_corrupt_shard) ||
        !CU_add_test(s, "another model's shapes are named", test_wrong_shape) ||
        !CU_add_test(s, "a piece missing from the manifest", test_missing_piece) ||
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
    dist_finalize();
    return failures ? 1 : 0;
}
