/* Configuration: defaults, the shipped configs, overrides, parse errors and their
 * messages, unknown-key suggestions, cross-key checks, the Hugging Face config.json round
 * trip and precedence, INI syntax errors and the help text. Runs from the repository
 * root (the configs are read from configs/). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <CUnit/Basic.h>
#include <CUnit/CUnit.h>

#include "launch/launch.h"

/* The key names are a contract with users' files: this list is written out, not taken
 * from the implementation, so renaming or dropping a key fails the help test. */
static const char *const all_keys[] = {
    "model.vocab_size", "model.hidden_size", "model.intermediate_size",
    "model.num_hidden_layers", "model.num_attention_heads", "model.num_key_value_heads",
    "model.num_local_experts", "model.num_experts_per_tok", "model.rope_theta",
    "model.rms_norm_eps", "model.tie_word_embeddings", "model.router_aux_loss_coef",
    "model.router_z_loss_coef", "model.moe_capacity_factor", "model.moe_drop_policy",
    "model.moe_token_dispatcher_type",
    "model.config", "train.steps", "train.global_batch", "train.micro_batch", "train.seq_len",
    "train.lr", "train.lr_min", "train.lr_schedule", "train.warmup", "train.weight_decay",
    "train.beta1", "train.beta2", "train.eps", "train.clip", "train.seed", "train.init_from",
    "train.export_to", "train.peak_gflops", "data.path", "data.dtype", "parallel.tp",
    "parallel.cp", "parallel.cp_comm_type", "parallel.ep", "parallel.etp", "parallel.pp",
    "parallel.vpp", "parallel.pp_layers", "parallel.pp_schedule", "parallel.order",
    "parallel.distributed_optimizer", "parallel.dispatch_direct", "launch.bind",
    "launch.ranks_per_node", "ckpt.dir", "ckpt.interval",
    "ckpt.keep", "ckpt.resume", "ckpt.async", "ckpt.zstd_level", "log.metrics", "log.trace",
    "log.interval",
};
#define NKEYS (sizeof all_keys / sizeof all_keys[0])

static char tmpdir[256];

static int suite_init(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/vdist_test_config_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int suite_clean(void)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void tmp_path(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", tmpdir, name);
}

static void write_file(const char *path, const char *text)
{
    FILE *const f = fopen(path, "w");
    CU_ASSERT_FATAL(f != NULL);
    fputs(text, f);
    fclose(f);
}

/* Message of the last error contains every one of the given fragments. */
static int msg_has(const char *a, const char *b)
{
    const char *const m = vd_err_msg();
    int const ok = strstr(m, a) != NULL && (!b || strstr(m, b) != NULL);
    if (!ok) printf("\n    message was: %s\n    expected: '%s' and '%s'\n", m, a, b ? b : "");
    return ok;
}

static void test_defaults(void)
{
    struct launch_config c;
    memset(&c, 0x5a, sizeof c);
    launch_config_defaults(&c);
    CU_ASSERT_EQUAL(c.model.vocab_size, 256);
    CU_ASSERT_EQUAL(c.model.hidden_size, 128);
    CU_ASSERT_EQUAL(c.model.intermediate_size, 256);
    CU_ASSERT_EQUAL(c.model.num_hidden_layers, 2);
    CU_ASSERT_EQUAL(c.model.num_attention_heads, 4);
    CU_ASSERT_EQUAL(c.model.num_key_value_heads, 2);
    CU_ASSERT_EQUAL(c.model.num_local_experts, 8);
    CU_ASSERT_EQUAL(c.model.num_experts_per_tok, 2);
    CU_ASSERT_EQUAL(c.model.rope_theta, 10000.0);
    CU_ASSERT_EQUAL(c.model.rms_norm_eps, 1e-5);
    CU_ASSERT_EQUAL(c.model.router_aux_loss_coef, 0.01);
    CU_ASSERT_EQUAL(c.model.router_z_loss_coef, 0.001);
    CU_ASSERT_EQUAL(c.model.moe_capacity_factor, 0.0);
    CU_ASSERT_EQUAL(c.model.moe_drop_policy, MODEL_DROP_POSITION);
    CU_ASSERT_STRING_EQUAL(c.model_config_path, "");
    CU_ASSERT_EQUAL(c.train.steps, 300);
    CU_ASSERT_EQUAL(c.train.global_batch, 16);
    CU_ASSERT_EQUAL(c.train.micro_batch, 8);
    CU_ASSERT_EQUAL(c.train.seq_len, 128);
    CU_ASSERT_EQUAL(c.train.lr, 3e-4);
    CU_ASSERT_EQUAL(c.train.lr_min, 0.0);
    CU_ASSERT_EQUAL(c.train.lr_schedule, LAUNCH_LR_COSINE);
    CU_ASSERT_EQUAL(c.train.warmup, 0);
    CU_ASSERT_EQUAL(c.train.weight_decay, 0.1);
    CU_ASSERT_EQUAL(c.train.beta1, 0.9);
    CU_ASSERT_EQUAL(c.train.beta2, 0.95);
    CU_ASSERT_EQUAL(c.train.eps, 1e-8);
    CU_ASSERT_EQUAL(c.train.clip, 1.0);
    CU_ASSERT_EQUAL(c.train.seed, 42);
    CU_ASSERT_STRING_EQUAL(c.train.init_from, "");
    CU_ASSERT_STRING_EQUAL(c.train.export_to, "");
    CU_ASSERT_EQUAL(c.train.peak_gflops, 0.0);
    CU_ASSERT_STRING_EQUAL(c.data.path, "");
    CU_ASSERT_EQUAL(c.data.dtype, LAUNCH_DTYPE_UINT16);
    CU_ASSERT_EQUAL(c.parallel.tp, 1);
    CU_ASSERT_EQUAL(c.parallel.cp, 1);
    CU_ASSERT_EQUAL(c.parallel.cp_comm_type, 0); /* p2p */
    CU_ASSERT_EQUAL(c.parallel.ep, 1);
    CU_ASSERT_EQUAL(c.parallel.etp, 0); /* 0: the same as parallel.tp */
    CU_ASSERT_EQUAL(c.parallel.pp, 1);
    CU_ASSERT_EQUAL(c.parallel.vpp, 1);
    CU_ASSERT_STRING_EQUAL(c.parallel.pp_layers, ""); /* an even split */
    CU_ASSERT_EQUAL(c.parallel.pp_schedule, 0);         /* auto */
    CU_ASSERT_EQUAL(launch_pp_schedule(&c.parallel), PAR_PP_1F1B);
    CU_ASSERT_STRING_EQUAL(c.parallel.order, "tp-cp-ep-dp-pp");
    CU_ASSERT_TRUE(c.parallel.distributed_optimizer);
    CU_ASSERT_TRUE(c.parallel.dispatch_direct);
    CU_ASSERT_EQUAL(c.launch.bind, LAUNCH_BIND_AUTO);
    CU_ASSERT_EQUAL(c.launch.ranks_per_node, 0); /* the real nodes */
    CU_ASSERT_STRING_EQUAL(c.ckpt.dir, "");
    CU_ASSERT_EQUAL(c.ckpt.interval, 0);
    CU_ASSERT_EQUAL(c.ckpt.keep, 2);
    CU_ASSERT_STRING_EQUAL(c.log.metrics, "");
    CU_ASSERT_STRING_EQUAL(c.log.trace, "");
    CU_ASSERT_EQUAL(c.log.interval, 1);
    CU_ASSERT_EQUAL(launch_config_validate(&c), 0);

    /* model/'s defaults of the optional keys agree with the table's. */
    struct model_config m;
    memset(&m, 0x5a, sizeof m);
    model_config_defaults(&m);
    CU_ASSERT_EQUAL(m.vocab_size, 0);
    CU_ASSERT_EQUAL(m.num_experts_per_tok, 0);
    CU_ASSERT_EQUAL(m.rope_theta, c.model.rope_theta);
    CU_ASSERT_EQUAL(m.rms_norm_eps, c.model.rms_norm_eps);
    CU_ASSERT_EQUAL(m.router_aux_loss_coef, c.model.router_aux_loss_coef);
    CU_ASSERT_EQUAL(m.router_z_loss_coef, c.model.router_z_loss_coef);
    CU_ASSERT_EQUAL(m.moe_capacity_factor, c.model.moe_capacity_factor);
    CU_ASSERT_EQUAL(m.moe_drop_policy, c.model.moe_drop_policy);
    /* Sizes left 0 are refused. */
    CU_ASSERT_EQUAL(model_config_validate(&m), VD_EINVAL);
    CU_ASSERT(msg_has("model.vocab_size = 0", "expected an integer >= 1"));
}

static void test_shipped_configs(void)
{
    struct launch_config c;
    int rc = launch_config_load(&c, "configs/tiny.ini", 0, NULL);
    if (rc) printf("\n    %s\n", vd_err_msg());
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.model.vocab_size, 64);
    CU_ASSERT_EQUAL(c.model.hidden_size, 32);
    CU_ASSERT_EQUAL(c.model.intermediate_size, 48);
    CU_ASSERT_EQUAL(c.model.num_hidden_layers, 2);
    CU_ASSERT_EQUAL(c.model.num_attention_heads, 8);
    CU_ASSERT_EQUAL(c.model.num_key_value_heads, 4);
    CU_ASSERT_EQUAL(c.model.num_local_experts, 8);
    CU_ASSERT_EQUAL(c.model.num_experts_per_tok, 2);
    CU_ASSERT_EQUAL(c.train.seq_len, 16);
    CU_ASSERT_EQUAL(c.train.micro_batch, 2);
    CU_ASSERT_EQUAL(c.train.global_batch, 4);
    CU_ASSERT_EQUAL(c.train.steps, 10);
    CU_ASSERT_EQUAL(c.train.lr, 1e-2);
    CU_ASSERT_EQUAL(c.train.lr_schedule, LAUNCH_LR_CONSTANT);
    CU_ASSERT_EQUAL(c.train.seed, 1);
    CU_ASSERT_STRING_EQUAL(c.data.path, "");

    rc = launch_config_load(&c, "configs/small.ini", 0, NULL);
    if (rc) printf("\n    %s\n", vd_err_msg());
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.model.vocab_size, 256);
    CU_ASSERT_EQUAL(c.model.hidden_size, 128);
    CU_ASSERT_EQUAL(c.model.num_local_experts, 8);
    CU_ASSERT_EQUAL(c.train.seq_len, 128);
    CU_ASSERT_EQUAL(c.train.micro_batch, 8);
    CU_ASSERT_EQUAL(c.train.global_batch, 16);
    CU_ASSERT_EQUAL(c.train.lr, 3e-3);
    CU_ASSERT_EQUAL(c.train.warmup, 30);
    CU_ASSERT_EQUAL(c.train.lr_schedule, LAUNCH_LR_COSINE);
    CU_ASSERT_STRING_EQUAL(c.data.path, "runs/synth.bin");
    CU_ASSERT_STRING_EQUAL(c.log.metrics, "runs/small/metrics.jsonl");

    rc = launch_config_load(&c, "configs/bench.ini", 0, NULL);
    if (rc) printf("\n    %s\n", vd_err_msg());
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.model.hidden_size, 512);
    CU_ASSERT_EQUAL(c.model.num_hidden_layers, 4);
    CU_ASSERT_EQUAL(c.model.num_attention_heads, 8);
    CU_ASSERT_EQUAL(c.model.num_key_value_heads, 4);
    CU_ASSERT_EQUAL(c.model.intermediate_size, 1408);
    CU_ASSERT_EQUAL(c.train.seq_len, 512);
    CU_ASSERT_EQUAL(c.train.micro_batch, 4);
    CU_ASSERT_EQUAL(c.train.global_batch, 8);
    CU_ASSERT_EQUAL(c.train.steps, 10);
    CU_ASSERT_STRING_EQUAL(c.data.path, "runs/synth.bin");
}

static void test_overrides(void)
{
    struct launch_config c;
    char *argv[] = {"--train.steps=77", "--model.hidden_size", "64", "--train.lr=0.5",
                    "--data.path=/x y/z.bin", "--train.steps=78"};
    int rc = launch_config_load(&c, "configs/tiny.ini", 6, argv);
    if (rc) printf("\n    %s\n", vd_err_msg());
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.train.steps, 78); /* the later override wins */
    CU_ASSERT_EQUAL(c.model.hidden_size, 64);
    CU_ASSERT_EQUAL(c.train.lr, 0.5);
    CU_ASSERT_STRING_EQUAL(c.data.path, "/x y/z.bin");
    CU_ASSERT_EQUAL(c.model.vocab_size, 64); /* from the file */

    /* A failed load leaves the config untouched. */
    struct launch_config before = c;
    char *bad1[] = {"steps=5"};
    CU_ASSERT_EQUAL(launch_config_load(&c, "configs/tiny.ini", 1, bad1), VD_EINVAL);
    CU_ASSERT(msg_has("'steps=5'", "--section.key=value"));
    CU_ASSERT_EQUAL(memcmp(&before, &c, sizeof c), 0);
    char *bad2[] = {"--train.steps"};
    CU_ASSERT_EQUAL(launch_config_load(&c, "configs/tiny.ini", 1, bad2), VD_EINVAL);
    CU_ASSERT(msg_has("'--train.steps'", "needs a value"));
    char *bad3[] = {"--steps=5"};
    CU_ASSERT_EQUAL(launch_config_load(&c, "configs/tiny.ini", 1, bad3), VD_EINVAL);
    CU_ASSERT(msg_has("'--steps=5'", "did you mean '--train.steps'"));
    char *bad4[] = {"--train.micro_batch=x"};
    CU_ASSERT_EQUAL(launch_config_load(&c, "configs/tiny.ini", 1, bad4), VD_EINVAL);
    CU_ASSERT(msg_has("command line", "train.micro_batch = 'x'"));
    CU_ASSERT_EQUAL(memcmp(&before, &c, sizeof c), 0);
}

struct bad_value {
    const char *key, *value, *expect;
};

static void test_parse_errors(void)
{
    static const struct bad_value cases[] = {
        {"train.micro_batch", "abc", "expected an integer >= 1"},
        {"train.micro_batch", "12x", "expected an integer >= 1"},
        {"train.micro_batch", "", "expected an integer >= 1"},
        {"train.micro_batch", "1.5", "expected an integer >= 1"},
        {"train.micro_batch", "99999999999", "does not fit in a 32-bit int"},
        {"train.micro_batch", "-2", "expected an integer >= 1"},
        {"train.micro_batch", "0", "expected an integer >= 1"},
        {"train.warmup", "-1", "expected an integer >= 0"},
        {"train.seed", "-1", "expected an integer in [0, 2^64)"},
        {"train.seed", "99999999999999999999999", "overflows"},
        {"train.lr", "fast", "expected a number >= 0"},
        {"train.lr", "1e-3x", "expected a number >= 0"},
        {"train.lr", "1e999", "out of a double's range"},
        {"train.lr", "nan", "expected a number >= 0"},
        {"train.lr", "-0.1", "expected a number >= 0"},
        {"train.beta1", "1", "expected a number in [0, 1)"},
        {"train.eps", "0", "expected a number > 0"},
        {"model.rope_theta", "0", "expected a number > 0"},
        {"model.moe_capacity_factor", "0", "expected a number > 0"},
        {"model.moe_capacity_factor", "-1.5", "expected a number > 0"},
        {"model.moe_drop_policy", "foo", "allowed values are position, probs"},
        {"train.lr_schedule", "linear", "allowed values are constant, cosine"},
        {"data.dtype", "int8", "allowed values are uint16, uint32"},
        {"parallel.distributed_optimizer", "maybe", "expected a boolean (true or false)"},
        {"model.tie_word_embeddings", "true", "tying"},
        {"parallel.order", "tp-cp-ep-dp", "a permutation of tp, cp, ep, dp, pp"},
        {"parallel.order", "tp-cp-ep-dp-dp", "a permutation of tp, cp, ep, dp, pp"},
        {"parallel.order", "tp-cp-ep-dp-pp-", "a permutation of tp, cp, ep, dp, pp"},
        {"parallel.pp_layers", "3,x", "expected integers >= 1 joined by ','"},
        {"parallel.pp_layers", "0,2", "expected integers >= 1 joined by ','"},
        {"parallel.pp_layers", "2,,2", "expected integers >= 1 joined by ','"},
        {"parallel.pp_layers", "2,2,", "expected integers >= 1 joined by ','"},
        {"parallel.pp_layers", "2;2", "expected integers >= 1 joined by ','"},
        {"parallel.pp_layers", "-1,3", "expected integers >= 1 joined by ','"},
        {"parallel.pp_schedule", "zigzag", "allowed values are auto, 1f1b, interleaved, gpipe"},
        {"parallel.cp_comm_type", "ring", "allowed values are p2p, allgather"},
        {"parallel.order", "automatic", "auto or a permutation of tp, cp, ep, dp, pp"},
        {"launch.bind", "core", "allowed values are auto, none"},
        {"launch.ranks_per_node", "-1", "expected an integer >= 0"},
    };
    struct launch_config c, before;
    launch_config_defaults(&c);
    before = c;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char head[256];
        snprintf(head, sizeof head, "%s = '%s'", cases[i].key, cases[i].value);
        vd_err_clear();
        int const rc = launch_config_set(&c, cases[i].key, cases[i].value);
        if (rc != VD_EINVAL) printf("\n    %s was accepted\n", head);
        CU_ASSERT_EQUAL(rc, VD_EINVAL);
        CU_ASSERT(msg_has(head, cases[i].expect));
        CU_ASSERT_EQUAL(memcmp(&before, &c, sizeof c), 0); /* nothing half-set */
    }
    char longpath[LAUNCH_PATH_MAX + 10];
    memset(longpath, 'a', sizeof longpath - 1);
    longpath[sizeof longpath - 1] = '\0';
    CU_ASSERT_EQUAL(launch_config_set(&c, "data.path", longpath), VD_EINVAL);
    CU_ASSERT(msg_has("data.path = 'aaaa", "at most 1023 characters"));
    /* One model chunk more than the program holds. */
    char chunks[2 * LAUNCH_CHUNKS_MAX + 2] = "1";
    for (int i = 1; i <= LAUNCH_CHUNKS_MAX; i++) strcat(chunks, ",1");
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.pp_layers", chunks), VD_EINVAL);
    CU_ASSERT(msg_has("parallel.pp_layers = '1,1,", "at most 256 of them"));

    /* Valid spellings of each type. */
    CU_ASSERT_EQUAL(launch_config_set(&c, "train.micro_batch", " 4 "), 0);
    CU_ASSERT_EQUAL(c.train.micro_batch, 4);
    CU_ASSERT_EQUAL(launch_config_set(&c, "train.seed", "18446744073709551615"), 0);
    CU_ASSERT_EQUAL(c.train.seed, UINT64_MAX);
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.distributed_optimizer", "off"), 0);
    CU_ASSERT_FALSE(c.parallel.distributed_optimizer);
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.distributed_optimizer", "True"), 0);
    CU_ASSERT_TRUE(c.parallel.distributed_optimizer);
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.dispatch_direct", "false"), 0);
    CU_ASSERT_FALSE(c.parallel.dispatch_direct);
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.order", "auto"), 0);
    CU_ASSERT_STRING_EQUAL(c.parallel.order, "auto");
    CU_ASSERT_EQUAL(launch_config_set(&c, "launch.bind", "none"), 0);
    CU_ASSERT_EQUAL(c.launch.bind, LAUNCH_BIND_NONE);
    CU_ASSERT_EQUAL(launch_config_set(&c, "launch.ranks_per_node", "4"), 0);
    CU_ASSERT_EQUAL(c.launch.ranks_per_node, 4);
    CU_ASSERT_EQUAL(launch_config_set(&c, "model.tie_word_embeddings", "false"), 0);
    CU_ASSERT_EQUAL(launch_config_set(&c, "model.moe_capacity_factor", "1.25"), 0);
    CU_ASSERT_EQUAL(c.model.moe_capacity_factor, 1.25);
    CU_ASSERT_EQUAL(launch_config_set(&c, "model.moe_capacity_factor", ""), 0);
    CU_ASSERT_EQUAL(c.model.moe_capacity_factor, 0.0);
    CU_ASSERT_EQUAL(launch_config_set(&c, "model.moe_drop_policy", "probs"), 0);
    CU_ASSERT_EQUAL(c.model.moe_drop_policy, MODEL_DROP_PROBS);
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.cp_comm_type", "allgather"), 0);
    CU_ASSERT_EQUAL(c.parallel.cp_comm_type, 1);
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.order", "pp-dp-ep-cp-tp"), 0);
    CU_ASSERT_STRING_EQUAL(c.parallel.order, "pp-dp-ep-cp-tp");
    CU_ASSERT_EQUAL(launch_config_set(&c, "train.lr", "2.5e-4"), 0);
    CU_ASSERT_EQUAL(c.train.lr, 2.5e-4);
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.pp_layers", "3,5,5,3"), 0);
    CU_ASSERT_STRING_EQUAL(c.parallel.pp_layers, "3,5,5,3");
    int counts[LAUNCH_CHUNKS_MAX];
    CU_ASSERT_EQUAL(launch_pp_layers(c.parallel.pp_layers, counts, LAUNCH_CHUNKS_MAX), 4);
    CU_ASSERT(counts[0] == 3 && counts[1] == 5 && counts[2] == 5 && counts[3] == 3);
    CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.pp_layers", ""), 0);
    CU_ASSERT_EQUAL(launch_pp_layers(c.parallel.pp_layers, counts, LAUNCH_CHUNKS_MAX), 0);
    static const struct {
        const char *text;
        int vpp;
        enum par_pp_schedule kind;
    } schedules[] = {{"1f1b", 1, PAR_PP_1F1B},
                     {"interleaved", 2, PAR_PP_INTERLEAVED},
                     {"gpipe", 2, PAR_PP_GPIPE},
                     {"auto", 1, PAR_PP_1F1B},
                     {"auto", 2, PAR_PP_INTERLEAVED}};
    for (size_t i = 0; i < sizeof schedules / sizeof schedules[0]; i++) {
        CU_ASSERT_EQUAL(launch_config_set(&c, "parallel.pp_schedule", schedules[i].text), 0);
        c.parallel.vpp = schedules[i].vpp;
        CU_ASSERT_EQUAL(launch_pp_schedule(&c.parallel), schedules[i].kind);
    }
}

static void test_unknown_key(void)
{
    struct launch_config c;
    launch_config_defaults(&c);
    CU_ASSERT_EQUAL(launch_config_set(&c, "train.stpes", "5"), VD_EINVAL);
    CU_ASSERT(msg_has("unknown key 'train.stpes' (did you mean 'train.steps'?)", NULL));
    CU_ASSERT_EQUAL(launch_config_set(&c, "model.hiden_size", "5"), VD_EINVAL);
    CU_ASSERT(msg_has("unknown key 'model.hiden_size'", "did you mean 'model.hidden_size'"));
    CU_ASSERT_EQUAL(launch_config_set(&c, "model.steps", "5"), VD_EINVAL);
    CU_ASSERT(msg_has("did you mean 'train.steps'", NULL));
    CU_ASSERT_EQUAL(launch_config_set(&c, "train.zzzzzzzz", "5"), VD_EINVAL);
    CU_ASSERT(msg_has("unknown key 'train.zzzzzzzz'", "the keys of [train] are steps, "));
    CU_ASSERT(msg_has("peak_gflops", NULL));
    CU_ASSERT(!strstr(vd_err_msg(), "did you mean"));
    CU_ASSERT_EQUAL(launch_config_set(&c, "foo.bar", "5"), VD_EINVAL);
    CU_ASSERT(msg_has("unknown key 'foo.bar'", "model, train, data, parallel, launch, ckpt, log"));
}

struct cross_case {
    const char *set[4][2]; /* up to four key/value pairs applied to tiny */
    const char *expect1, *expect2;
};

static void test_cross_checks(void)
{
    static const struct cross_case cases[] = {
        {{{"model.hidden_size", "100"}, {"model.num_attention_heads", "8"}},
         "model.hidden_size = 100 is not divisible by model.num_attention_heads = 8",
         "hidden_size must be a multiple of num_attention_heads"},
        {{{"model.hidden_size", "40"}}, "head_dim = 5", "must be even"},
        {{{"model.num_key_value_heads", "3"}},
         "model.num_attention_heads = 8 is not divisible by model.num_key_value_heads = 3",
         "multiple of num_key_value_heads"},
        {{{"model.num_experts_per_tok", "9"}},
         "model.num_experts_per_tok = 9 is larger than model.num_local_experts = 8",
         "1 <= num_experts_per_tok <= num_local_experts"},
        {{{"model.num_local_experts", "20000"}}, "model.num_local_experts = 20000",
         "at most 16384 experts"},
        {{{"train.global_batch", "6"}, {"train.micro_batch", "4"}},
         "train.global_batch = 6 is not divisible by train.micro_batch = 4",
         "multiple of micro_batch"},
        {{{"train.lr_schedule", "cosine"}, {"train.warmup", "10"}},
         "train.warmup = 10 is not smaller than train.steps = 10", "warmup must be < steps"},
        {{{"train.lr_min", "0.1"}}, "train.lr_min = 0.1 is larger than train.lr = 0.01",
         "lr_min must be <= lr"},
        {{{"parallel.ep", "3"}}, "model.num_local_experts = 8 is not divisible by parallel.ep = 3",
         "same number of experts"},
        {{{"parallel.tp", "8"}, {"model.vocab_size", "64"}}, "divisible by parallel.tp = 8",
         "heads evenly"},
        {{{"parallel.tp", "2"}, {"model.vocab_size", "63"}},
         "model.vocab_size = 63 is not divisible by parallel.tp = 2", "vocabulary"},
        {{{"parallel.etp", "5"}},
         "model.intermediate_size = 48 is not divisible by parallel.etp = 5", "FFN width"},
        {{{"parallel.cp", "3"}}, "train.seq_len = 16 is not divisible by 2 * parallel.cp = 6",
         "2 * cp equal chunks"},
        {{{"parallel.vpp", "2"}}, "parallel.vpp = 2 with parallel.pp = 1", "vpp > 1 needs pp > 1"},
        {{{"parallel.pp", "3"}}, "parallel.pp = 3 times parallel.vpp = 1",
         "model.num_hidden_layers = 2"},
        {{{"parallel.pp", "2"}, {"parallel.vpp", "2"}, {"model.num_hidden_layers", "6"}},
         "num_hidden_layers = 6 does not divide evenly over parallel.pp = 2 x parallel.vpp = 2 "
         "= 4 model chunks", "parallel.pp_layers (4 entries adding up to 6)"},
        {{{"parallel.pp", "2"}, {"model.num_hidden_layers", "4"}, {"parallel.pp_layers", "1,1,2"}},
         "parallel.pp_layers has 3 entries", "parallel.pp = 2 x parallel.vpp = 1 = 2"},
        {{{"parallel.pp", "2"}, {"model.num_hidden_layers", "4"}, {"parallel.pp_layers", "1,2"}},
         "parallel.pp_layers adds up to 3 layers", "num_hidden_layers = 4"},
        {{{"parallel.pp", "2"}, {"parallel.vpp", "2"}, {"model.num_hidden_layers", "4"},
          {"parallel.pp_schedule", "1f1b"}},
         "parallel.pp_schedule = 1f1b with parallel.vpp = 2", "interleaved or gpipe"},
        {{{"parallel.pp", "2"}, {"parallel.pp_schedule", "interleaved"}},
         "parallel.pp_schedule = interleaved with parallel.vpp = 1", "vpp > 1"},
    };
    struct launch_config base;
    CU_ASSERT_EQUAL_FATAL(launch_config_load(&base, "configs/tiny.ini", 0, NULL), 0);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct launch_config c = base;
        for (int j = 0; j < 4 && cases[i].set[j][0]; j++)
            CU_ASSERT_EQUAL_FATAL(launch_config_set(&c, cases[i].set[j][0], cases[i].set[j][1]), 0);
        vd_err_clear();
        int const rc = launch_config_validate(&c);
        if (rc != VD_EINVAL) printf("\n    case %zu (%s) was accepted\n", i, cases[i].expect1);
        CU_ASSERT_EQUAL(rc, VD_EINVAL);
        CU_ASSERT(msg_has(cases[i].expect1, cases[i].expect2));
    }

    /* Values set in code, not through text, are range-checked too. */
    struct launch_config c = base;
    c.train.micro_batch = 0;
    CU_ASSERT_EQUAL(launch_config_validate(&c), VD_EINVAL);
    CU_ASSERT(msg_has("train.micro_batch = 0", "expected an integer >= 1"));
    c = base;
    c.train.beta2 = 1.0;
    CU_ASSERT_EQUAL(launch_config_validate(&c), VD_EINVAL);
    CU_ASSERT(msg_has("train.beta2 = 1", "in [0, 1)"));
    c = base;
    snprintf(c.parallel.order, sizeof c.parallel.order, "tp-tp-ep-dp-pp");
    CU_ASSERT_EQUAL(launch_config_validate(&c), VD_EINVAL);
    CU_ASSERT(msg_has("parallel.order = 'tp-tp-ep-dp-pp'", "permutation"));
    c = base;
    c.model.num_local_experts = 0;
    CU_ASSERT_EQUAL(launch_config_validate(&c), VD_EINVAL);
    CU_ASSERT(msg_has("model.num_local_experts = 0", "expected an integer >= 1"));

    /* The loader validates: a bad combination in a file is refused. */
    char *argv[] = {"--train.global_batch=5"};
    CU_ASSERT_EQUAL(launch_config_load(&c, "configs/tiny.ini", 1, argv), VD_EINVAL);
    CU_ASSERT(msg_has("train.global_batch = 5 is not divisible by train.micro_batch = 2", NULL));
    /* The constant schedule ignores warmup, so warmup >= steps is fine there. */
    c = base;
    c.train.warmup = 100;
    CU_ASSERT_EQUAL(launch_config_validate(&c), 0);
}

static void model_equal(const struct model_config *a, const struct model_config *b)
{
    CU_ASSERT_EQUAL(a->vocab_size, b->vocab_size);
    CU_ASSERT_EQUAL(a->hidden_size, b->hidden_size);
    CU_ASSERT_EQUAL(a->intermediate_size, b->intermediate_size);
    CU_ASSERT_EQUAL(a->num_hidden_layers, b->num_hidden_layers);
    CU_ASSERT_EQUAL(a->num_attention_heads, b->num_attention_heads);
    CU_ASSERT_EQUAL(a->num_key_value_heads, b->num_key_value_heads);
    CU_ASSERT_EQUAL(a->num_local_experts, b->num_local_experts);
    CU_ASSERT_EQUAL(a->num_experts_per_tok, b->num_experts_per_tok);
    CU_ASSERT_EQUAL(a->rope_theta, b->rope_theta);
    CU_ASSERT_EQUAL(a->rms_norm_eps, b->rms_norm_eps);
    CU_ASSERT_EQUAL(a->router_aux_loss_coef, b->router_aux_loss_coef);
    CU_ASSERT_EQUAL(a->router_z_loss_coef, b->router_z_loss_coef);
    CU_ASSERT_EQUAL(a->moe_capacity_factor, b->moe_capacity_factor);
    CU_ASSERT_EQUAL(a->moe_drop_policy, b->moe_drop_policy);
}

static void test_hf_roundtrip(void)
{
    char path[512];
    tmp_path(path, sizeof path, "config.json");
    const struct model_config cases[] = {
        {1000, 96, 200, 3, 6, 2, 16, 4, 1e6, 1e-6, 0.02, 0.002, 1.25, MODEL_DROP_PROBS, MODEL_DISPATCH_ALLTOALL},
        {32000, 4096, 14336, 32, 32, 8, 8, 2, 1000000.0, 1e-5, 0.1 + 0.2, 1.0 / 3, 0.0,
         MODEL_DROP_POSITION, MODEL_DISPATCH_ALLTOALL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = launch_config_write_hf(&cases[i], path);
        if (rc) printf("\n    %s\n", vd_err_msg());
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        struct model_config back;
        model_config_defaults(&back);
        rc = launch_config_read_hf(&back, path);
        if (rc) printf("\n    %s\n", vd_err_msg());
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        model_equal(&cases[i], &back);
        if (i > 0) continue;
        /* What Hugging Face needs to see; plain values print in their shortest form. */
        FILE *const f = fopen(path, "r");
        CU_ASSERT_FATAL(f != NULL);
        char text[8192];
        size_t const n = fread(text, 1, sizeof text - 1, f);
        fclose(f);
        text[n] = '\0';
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"architectures\": [\n    \"MixtralForCausalLM\""));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"model_type\": \"mixtral\""));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"torch_dtype\": \"float32\""));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"tie_word_embeddings\": false"));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"output_router_logits\": false"));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"sliding_window\": null"));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"num_local_experts\": 16"));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"rope_theta\": 1000000.0"));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"rms_norm_eps\": 1e-6"));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"moe_capacity_factor\": 1.25"));
        CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"max_position_embeddings\": 4096"));
    }
    /* No temporary left behind. */
    char cmd[600];
    snprintf(cmd, sizeof cmd, "ls '%s' | grep -q tmp", tmpdir);
    CU_ASSERT_NOT_EQUAL(system(cmd), 0);

    /* An invalid model is not written. */
    struct model_config bad = cases[0];
    bad.num_key_value_heads = 4;
    char path2[512];
    tmp_path(path2, sizeof path2, "never.json");
    CU_ASSERT_EQUAL(launch_config_write_hf(&bad, path2), VD_EINVAL);
    CU_ASSERT_EQUAL(access(path2, F_OK), -1);

    /* Reading errors name the key. */
    struct model_config m;
    model_config_defaults(&m);
    write_file(path, "{\"hidden_size\": \"128\"}");
    CU_ASSERT_EQUAL(launch_config_read_hf(&m, path), VD_EINVAL);
    CU_ASSERT(msg_has("'hidden_size'", "expected an integer"));
    write_file(path, "{\"rope_theta\": true}");
    CU_ASSERT_EQUAL(launch_config_read_hf(&m, path), VD_EINVAL);
    CU_ASSERT(msg_has("'rope_theta'", "expected a number"));
    write_file(path, "{\"tie_word_embeddings\": true}");
    CU_ASSERT_EQUAL(launch_config_read_hf(&m, path), VD_EINVAL);
    CU_ASSERT(msg_has("tie_word_embeddings", "not supported"));
    write_file(path, "{\"vocab_size\": 5000000000}");
    CU_ASSERT_EQUAL(launch_config_read_hf(&m, path), VD_EINVAL);
    CU_ASSERT(msg_has("'vocab_size'", "32-bit"));
    write_file(path, "{\"hidden_act\": \"gelu\"}");
    CU_ASSERT_EQUAL(launch_config_read_hf(&m, path), VD_EINVAL);
    CU_ASSERT(msg_has("hidden_act", "silu"));
    write_file(path, "{\"vocab_size\": 10,\n \"hidden_size\": }");
    CU_ASSERT_EQUAL(launch_config_read_hf(&m, path), VD_EFORMAT);
    CU_ASSERT(msg_has(":2:", "invalid JSON"));
    CU_ASSERT_EQUAL(launch_config_read_hf(&m, "/nonexistent/config.json"), VD_EIO);
    CU_ASSERT(msg_has("/nonexistent/config.json", NULL));
    /* Untouched by failures; other Hugging Face keys are ignored. */
    struct model_config fresh;
    model_config_defaults(&fresh);
    model_equal(&m, &fresh);
    write_file(path, "{\"architectures\": [\"MixtralForCausalLM\"], \"model_type\": \"mixtral\","
                     " \"torch_dtype\": \"bfloat16\", \"bos_token_id\": 1, \"vocab_size\": 77,"
                     " \"num_key_value_heads\": null, \"num_attention_heads\": 6}");
    CU_ASSERT_EQUAL(launch_config_read_hf(&m, path), 0);
    CU_ASSERT_EQUAL(m.vocab_size, 77);
    CU_ASSERT_EQUAL(m.num_key_value_heads, 6);
}

static void test_hf_precedence(void)
{
    char hf[512], ini[512], text[1200];
    tmp_path(hf, sizeof hf, "hf_config.json");
    struct model_config m;
    model_config_defaults(&m);
    m = (struct model_config){512, 64, 96, 4, 4, 4, 8, 2, 5e5, 1e-6, 0.02, 0.001, 0, 0, 0};
    CU_ASSERT_EQUAL_FATAL(launch_config_write_hf(&m, hf), 0);

    tmp_path(ini, sizeof ini, "prec.ini");
    snprintf(text, sizeof text,
             "[model]\nconfig = %s\nhidden_size = 32\n[train]\nseq_len = 16\n", hf);
    write_file(ini, text);
    char *argv[] = {"--model.num_hidden_layers=2", "--model.rms_norm_eps=1e-4"};
    struct launch_config c;
    int const rc = launch_config_load(&c, ini, 2, argv);
    if (rc) printf("\n    %s\n", vd_err_msg());
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.model.hidden_size, 32);        /* the file wins over HF */
    CU_ASSERT_EQUAL(c.model.num_hidden_layers, 2);   /* the command line wins over HF */
    CU_ASSERT_EQUAL(c.model.rms_norm_eps, 1e-4);
    CU_ASSERT_EQUAL(c.model.vocab_size, 512);        /* the rest comes from HF */
    CU_ASSERT_EQUAL(c.model.intermediate_size, 96);
    CU_ASSERT_EQUAL(c.model.num_key_value_heads, 4);
    CU_ASSERT_EQUAL(c.model.rope_theta, 5e5);
    CU_ASSERT_STRING_EQUAL(c.model_config_path, hf);

    /* An explicit value equal to the default still wins. */
    char *argv2[] = {"--model.vocab_size=256"};
    CU_ASSERT_EQUAL_FATAL(launch_config_load(&c, ini, 1, argv2), 0);
    CU_ASSERT_EQUAL(c.model.vocab_size, 256);

    /* A sliding window shorter than the sequence is refused; a long one is harmless. */
    write_file(hf, "{\"vocab_size\": 64, \"sliding_window\": 8}");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EINVAL);
    CU_ASSERT(msg_has("sliding_window = 8 is smaller than train.seq_len = 16",
                      "sliding window attention is not supported"));
    write_file(hf, "{\"vocab_size\": 64, \"sliding_window\": 4096}");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), 0);
    CU_ASSERT_EQUAL(c.model.vocab_size, 64);
    write_file(hf, "{\"num_local_experts\": \"eight\"}");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EINVAL);
    CU_ASSERT(msg_has("model.config", "'num_local_experts'"));
}

static void test_ini_errors(void)
{
    char ini[512];
    struct launch_config c;
    tmp_path(ini, sizeof ini, "bad.ini");

    write_file(ini, "# comment\n[train]\nthis line is not valid\nsteps = 5\n");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EFORMAT);
    char where[600];
    snprintf(where, sizeof where, "%s:3: syntax error", ini);
    CU_ASSERT(msg_has(where, NULL));

    write_file(ini, "[train]\n; comment\nsteps = 5\n  micro_batch = abc\n");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EINVAL);
    snprintf(where, sizeof where, "%s:4: train.micro_batch = 'abc'", ini);
    CU_ASSERT(msg_has(where, "expected an integer >= 1"));

    write_file(ini, "[train]\nsteps = 5\n[trian]\nseq_len = 8\n");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EINVAL);
    snprintf(where, sizeof where, "%s:4: unknown key 'trian.seq_len'", ini);
    CU_ASSERT(msg_has(where, "did you mean 'train.seq_len'"));

    write_file(ini, "steps = 5\n");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EINVAL);
    CU_ASSERT(msg_has(":1: key 'steps' is outside any section", NULL));

    /* The first problem is the one reported, whatever its kind. */
    write_file(ini, "[train]\nsteps = x\nnot valid\n");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EINVAL);
    CU_ASSERT(msg_has(":2: train.steps = 'x'", NULL));
    write_file(ini, "[train]\nsteps = x\nseq_len = y\n");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EINVAL);
    CU_ASSERT(msg_has(":2: train.steps = 'x'", NULL));
    write_file(ini, "[train]\nnot valid\nsteps = x\n");
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EFORMAT);
    CU_ASSERT(msg_has(":2: syntax error", NULL));

    /* An over-long line is an error, not two half-lines. */
    char text[700];
    snprintf(text, sizeof text, "[data]\npath = %0400d\n", 0);
    write_file(ini, text);
    CU_ASSERT_EQUAL(launch_config_load(&c, ini, 0, NULL), VD_EFORMAT);
    CU_ASSERT(msg_has(":2: the line is longer than", "command line"));

    /* Comments: full-line '#' and ';', inline after a blank; indented keys are keys. */
    write_file(ini, "# top\n[train] # section comment\n  steps = 7 # seven\n"
                    "\tseq_len = 32 ; inline\n; end\n[data]\npath = a#b\n");
    int const rc = launch_config_load(&c, ini, 0, NULL);
    if (rc) printf("\n    %s\n", vd_err_msg());
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.train.steps, 7);
    CU_ASSERT_EQUAL(c.train.seq_len, 32);
    CU_ASSERT_STRING_EQUAL(c.data.path, "a#b");

    CU_ASSERT_EQUAL(launch_config_load(&c, "/nonexistent/x.ini", 0, NULL), VD_EIO);
    CU_ASSERT(msg_has("cannot open config file '/nonexistent/x.ini'", NULL));
}

static void test_help(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *const out = open_memstream(&buf, &len);
    CU_ASSERT_FATAL(out != NULL);
    launch_config_help(out);
    fclose(out);
    /* One line per key, "  section.key ...". */
    size_t key_lines = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        if (strncmp(line, "  ", 2) != 0) continue;
        key_lines++;
        bool known = false;
        for (size_t i = 0; i < NKEYS; i++) {
            size_t const n = strlen(all_keys[i]);
            if (strncmp(line + 2, all_keys[i], n) == 0 && line[2 + n] == ' ') known = true;
        }
        if (!known) printf("\n    help line for no known key: %s\n", line);
        CU_ASSERT(known);
        CU_ASSERT_PTR_NOT_NULL(strstr(line, "default"));
    }
    CU_ASSERT_EQUAL(key_lines, NKEYS);
    free(buf);

    /* Every listed key exists (accepts its own default through the loader). */
    struct launch_config c;
    launch_config_defaults(&c);
    for (size_t i = 0; i < NKEYS; i++) {
        vd_err_clear();
        launch_config_set(&c, all_keys[i], "");
        CU_ASSERT_PTR_NULL(strstr(vd_err_msg(), "unknown key"));
    }
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite const s = CU_add_suite("config", suite_init, suite_clean);
    if (!s || !CU_add_test(s, "defaults", test_defaults) ||
        !CU_add_test(s, "shipped configs load and validate", test_shipped_configs) ||
        !CU_add_test(s, "command-line overrides", test_overrides) ||
        !CU_add_test(s, "parse errors name key and value", test_parse_errors) ||
        !CU_add_test(s, "unknown key suggestions", test_unknown_key) ||
        !CU_add_test(s, "cross-key checks", test_cross_checks) ||
        !CU_add_test(s, "Hugging Face config.json round trip", test_hf_roundtrip) ||
        !CU_add_test(s, "model.config precedence", test_hf_precedence) ||
        !CU_add_test(s, "INI errors and comments", test_ini_errors) ||
        !CU_add_test(s, "help lists every key", test_help)) {
        CU_cleanup_registry();
        return 1;
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned const failures = CU_get_number_of_failures() + CU_get_number_of_tests_failed();
    CU_cleanup_registry();
    return failures != 0;
}
