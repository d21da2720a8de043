/* `vdist data text|synth|info`: the command line over the token files of data.c and the
 * synthetic dataset of data_synth.c. Exit status 0, 1 when the work failed, 2 for a usage
 * error. */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch/launch_internal.h"

#define DATA_EXIT_FAIL 1
#define DATA_EXIT_USAGE 2

static void usage_main(FILE *out)
{
    fprintf(out,
            "usage: vdist data <command> ...\n"
            "  text IN OUT           byte-level tokens (vocab 256) of any file IN, written\n"
            "                        to OUT in llm.c format (uint16)\n"
            "  synth OUT [options]   the embedded synthetic dataset: a random probabilistic\n"
            "                        automaton with a known entropy floor\n"
            "  info FILE [--dtype uint16|uint32]\n"
            "                        format, token count and largest token id of a token file\n"
            "`vdist data <command> --help` describes a command.\n");
}

static void usage_text(FILE *out)
{
    fprintf(out, "usage: vdist data text IN OUT\n"
                 "Writes every byte of IN as one token (vocab 256) to OUT, llm.c format with\n"
                 "uint16 tokens; OUT appears only once it is complete.\n");
}

static void usage_synth(FILE *out)
{
    struct launch_synth d;
    launch_synth_defaults(&d);
    fprintf(out,
            "usage: vdist data synth OUT [--states N] [--vocab N] [--branch N] [--tokens N]\n"
            "                            [--seed N]\n"
            "Writes tokens of a fixed random probabilistic automaton to OUT (llm.c format,\n"
            "uint16): each state emits one of `branch` tokens with random probabilities and\n"
            "moves to a state given by (state, token). Prints the entropy floor (the best\n"
            "loss any model can reach) and the unigram entropy, in nats per token.\n"
            "  --states N   states of the automaton, 1 to %d (default %d)\n"
            "  --vocab N    vocabulary size, 1 to 65536 (default %d)\n"
            "  --branch N   tokens each state can emit, 1 to vocab (default %d)\n"
            "  --tokens N   tokens to write, 1 to %zu (default %zu)\n"
            "  --seed N     seed of the automaton and the data (default %" PRIu64 ")\n",
            LAUNCH_SYNTH_MAX_STATES, d.states, d.vocab, d.branch, LAUNCH_DATA_MAX_TOKENS,
            d.tokens, d.seed);
}

static void usage_info(FILE *out)
{
    fprintf(out, "usage: vdist data info FILE [--dtype uint16|uint32]\n"
                 "Prints the format, token count and largest token id of FILE. Files without\n"
                 "an llm.c header are read as raw little-endian tokens of --dtype (default\n"
                 "uint16).\n");
}

static bool is_help(const char *a)
{
    return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0;
}

/* Decimal, no sign, no trailing text, within [lo, hi]. */
static bool parse_u64(const char *text, uint64_t lo, uint64_t hi, uint64_t *v)
{
    if (!text || !*text || text[0] < '0' || text[0] > '9') return false;
    errno = 0;
    char *end;
    unsigned long long const x = strtoull(text, &end, 10);
    if (errno || *end || x < lo || x > hi) return false;
    *v = x;
    return true;
}

/* "--name VALUE" or "--name=VALUE" at argv[*i]; advances *i past the value. Returns
 * the value, or NULL when argv[*i] is not this option; *missing when it lacks one. */
static const char *option_value(int argc, char **argv, int *i, const char *name,
                                bool *missing)
{
    size_t const len = strlen(name);
    const char *const a = argv[*i];
    if (strncmp(a, name, len) != 0) return NULL;
    if (a[len] == '=') return a + len + 1;
    if (a[len] != '\0') return NULL;
    if (*i + 1 >= argc) {
        *missing = true;
        return NULL;
    }
    return argv[++*i];
}

static int cmd_text(int argc, char **argv)
{
    if (argc >= 2 && is_help(argv[1])) {
        usage_text(stdout);
        return 0;
    }
    if (argc != 3) {
        fprintf(stderr, "vdist data text: expected IN and OUT, got %d argument%s\n",
                argc - 1, argc - 1 == 1 ? "" : "s");
        usage_text(stderr);
        return DATA_EXIT_USAGE;
    }
    if (launch_data_text(argv[1], argv[2]) < 0) {
        fprintf(stderr, "vdist data text: %s\n", vd_err_msg());
        return DATA_EXIT_FAIL;
    }
    launch_tokens *t;
    if (launch_tokens_map(&t, argv[2], LAUNCH_DTYPE_UINT16) < 0) {
        fprintf(stderr, "vdist data text: %s\n", vd_err_msg());
        return DATA_EXIT_FAIL;
    }
    printf("wrote %zu tokens to %s\n", t->count, argv[2]);
    launch_tokens_close(t);
    return 0;
}

struct synth_option {
    const char *name;
    uint64_t lo, hi;
    uint64_t *value;
};

static int cmd_synth(int argc, char **argv)
{
    struct launch_synth s;
    launch_synth_defaults(&s);
    uint64_t states = (uint64_t)s.states, vocab = (uint64_t)s.vocab,
             branch = (uint64_t)s.branch, tokens = s.tokens, seed = s.seed;
    struct synth_option const opts[] = {
        {"--states", 1, LAUNCH_SYNTH_MAX_STATES, &states},
        {"--vocab", 1, 65536, &vocab},
        {"--branch", 1, 65536, &branch},
        {"--tokens", 1, LAUNCH_DATA_MAX_TOKENS, &tokens},
        {"--seed", 0, UINT64_MAX, &seed},
    };
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            usage_synth(stdout);
            return 0;
        }
    }
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] != '-' || argv[i][1] == '\0') {
            if (out) {
                fprintf(stderr, "vdist data synth: one output file expected, got '%s' and "
                                "'%s'\n", out, argv[i]);
                return DATA_EXIT_USAGE;
            }
            out = argv[i];
            continue;
        }
        bool matched = false;
        for (size_t k = 0; k < sizeof opts / sizeof opts[0] && !matched; k++) {
            bool missing = false;
            const char *const v = option_value(argc, argv, &i, opts[k].name, &missing);
            if (missing) {
                fprintf(stderr, "vdist data synth: %s needs a value\n", opts[k].name);
                return DATA_EXIT_USAGE;
            }
            if (!v) continue;
            matched = true;
            if (!parse_u64(v, opts[k].lo, opts[k].hi, opts[k].value)) {
                fprintf(stderr,
                        "vdist data synth: %s must be a whole number from %" PRIu64
                        " to %" PRIu64 ", got '%s'\n",
                        opts[k].name, opts[k].lo, opts[k].hi, v);
                return DATA_EXIT_USAGE;
            }
        }
        if (!matched) {
            fprintf(stderr, "vdist data synth: unknown option '%s'; see `vdist data synth "
                            "--help`\n", argv[i]);
            return DATA_EXIT_USAGE;
        }
    }
    if (!out) {
        fprintf(stderr, "vdist data synth: the output file is missing\n");
        usage_synth(stderr);
        return DATA_EXIT_USAGE;
    }
    s.states = (int)states;
    s.vocab = (int)vocab;
    s.branch = (int)branch;
    s.tokens = (size_t)tokens;
    s.seed = seed;
    if (launch_synth_validate(&s) < 0) {
        fprintf(stderr, "vdist data synth: %s\n", vd_err_msg());
        return DATA_EXIT_USAGE;
    }
    double fl, uni;
    if (launch_synth_entropy(&s, &fl, &uni) < 0 || launch_synth_write(&s, out, NULL) < 0) {
        fprintf(stderr, "vdist data synth: %s\n", vd_err_msg());
        return DATA_EXIT_FAIL;
    }
    printf("wrote %zu tokens to %s; entropy floor %.4f nats/token (unigram %.4f "
           "nats/token)\n",
           s.tokens, out, fl, uni);
    return 0;
}

static int cmd_info(int argc, char **argv)
{
    enum launch_dtype dtype = LAUNCH_DTYPE_UINT16;
    const char *file = NULL;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            usage_info(stdout);
            return 0;
        }
    }
    for (int i = 1; i < argc; i++) {
        bool missing = false;
        const char *const v = option_value(argc, argv, &i, "--dtype", &missing);
        if (missing) {
            fprintf(stderr, "vdist data info: --dtype needs a value (uint16 or uint32)\n");
            return DATA_EXIT_USAGE;
        }
        if (v) {
            if (strcmp(v, "uint16") == 0) dtype = LAUNCH_DTYPE_UINT16;
            else if (strcmp(v, "uint32") == 0) dtype = LAUNCH_DTYPE_UINT32;
            else {
                fprintf(stderr, "vdist data info: --dtype must be uint16 or uint32, got "
                                "'%s'\n", v);
                return DATA_EXIT_USAGE;
            }
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "vdist data info: unknown option '%s'; see `vdist data info "
                            "--help`\n", argv[i]);
            return DATA_EXIT_USAGE;
        } else if (file) {
            fprintf(stderr, "vdist data info: one file expected, got '%s' and '%s'\n", file,
                    argv[i]);
            return DATA_EXIT_USAGE;
        } else {
            file = argv[i];
        }
    }
    if (!file) {
        fprintf(stderr, "vdist data info: the file is missing\n");
        usage_info(stderr);
        return DATA_EXIT_USAGE;
    }
    launch_tokens *t;
    if (launch_tokens_map(&t, file, dtype) < 0) {
        fprintf(stderr, "vdist data info: %s\n", vd_err_msg());
        return DATA_EXIT_FAIL;
    }
    size_t bad;
    uint32_t const max_id = launch_tokens_scan(t, UINT64_MAX, &bad);
    printf("file: %s\n", file);
    if (t->version)
        printf("format: llm.c version %d (%s tokens)\n", t->version,
               launch_tokens_dtype_name(t->elem_nbytes));
    else
        printf("format: raw little-endian %s (no llm.c header)\n",
               launch_tokens_dtype_name(t->elem_nbytes));
    printf("tokens: %zu\n", t->count);
    if (t->count)
        printf("max id: %" PRIu32 " (needs vocab_size >= %" PRIu64 ")\n", max_id,
               (uint64_t)max_id + 1);
    else
        printf("max id: none (no tokens)\n");
    launch_tokens_close(t);
    return 0;
}

int launch_data_main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "vdist data: a command is missing\n");
        usage_main(stderr);
        return DATA_EXIT_USAGE;
    }
    const char *const cmd = argv[1];
    if (is_help(cmd)) {
        usage_main(stdout);
        return 0;
    }
    if (strcmp(cmd, "text") == 0) return cmd_text(argc - 1, argv + 1);
    if (strcmp(cmd, "synth") == 0) return cmd_synth(argc - 1, argv + 1);
    if (strcmp(cmd, "info") == 0) return cmd_info(argc - 1, argv + 1);
    fprintf(stderr, "vdist data: unknown command '%s'; use text, synth or info\n", cmd);
    usage_main(stderr);
    return DATA_EXIT_USAGE;
}
