/* Configuration: one table of keys drives defaults, parsing, range checks, the help text,
 * the INI loader, command-line overrides and which model keys model.config fills (the
 * Hugging Face config.json itself is read and written in config_hf.c).
 *
 * Values arrive as text (INI file, `--section.key=value`) and are checked completely
 * before anything is stored: a key either takes its new value or keeps its old one.
 * Internal functions write their message into a struct launch_cfg_err and return a VD_E*
 * code; the public entry points record it with vd_err_set, prefixed with where the text
 * came from (file and line, or the command line), so the user sees one sentence that
 * names the key, the value and what is allowed. */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <ini.h>
#include <jansson.h>

#include "launch/launch_internal.h"

/* ---------------------------------------------------------------- the key table */

enum key_type { KEY_INT, KEY_U64, KEY_DOUBLE, KEY_BOOL, KEY_STRING, KEY_ENUM };

enum {
    KF_MIN = 1u << 0,        /* value >= min (or > min with KF_MIN_EXCL) */
    KF_MAX = 1u << 1,        /* value <= max (or < max with KF_MAX_EXCL) */
    KF_MIN_EXCL = 1u << 2,
    KF_MAX_EXCL = 1u << 3,
    KF_ONLY_FALSE = 1u << 4, /* a bool kept for compatibility whose only legal value is false */
    KF_EMPTY_ZERO = 1u << 5, /* empty text stores 0, meaning "off"; 0 itself is not accepted */
    KF_ORDER = 1u << 6,      /* a rank order: a permutation of tp, cp, ep, dp, pp */
    KF_COUNTS = 1u << 7,     /* a list of counts: integers >= 1 joined by ',' (or empty) */
};

#define NO_FIELD SIZE_MAX

struct key_def {
    const char *name;   /* "section.key": the names are a contract with users' files */
    enum key_type type;
    const char *def;    /* default, as text: launch_config_defaults parses it */
    const char *help;
    size_t offset;      /* into struct launch_config, NO_FIELD when nothing is stored */
    size_t size;        /* bytes of the field (a string's capacity with its NUL) */
    double min, max;
    unsigned flags;
    const char *const *values; /* KEY_ENUM: names, index = stored value, NULL-terminated */
};

#define FIELD(f) offsetof(struct launch_config, f), sizeof(((struct launch_config *)0)->f)
#define INT_MIN1(f) FIELD(f), 1, 0, KF_MIN, NULL
#define INT_MIN0(f) FIELD(f), 0, 0, KF_MIN, NULL
#define NUM_GT0(f) FIELD(f), 0, 0, KF_MIN | KF_MIN_EXCL, NULL
#define NUM_GE0(f) FIELD(f), 0, 0, KF_MIN, NULL
#define NUM_01(f) FIELD(f), 0, 1, KF_MIN | KF_MAX | KF_MAX_EXCL, NULL
#define STR(f) FIELD(f), 0, 0, 0, NULL

/* Enumerations are stored through an int: their values are small and non-negative. */
_Static_assert(sizeof(enum model_drop_policy) == sizeof(int), "enum size");
_Static_assert(sizeof(enum launch_lr_schedule) == sizeof(int), "enum size");
_Static_assert(sizeof(enum launch_dtype) == sizeof(int), "enum size");

static const char *const drop_policy_values[] = {"position", "probs", NULL};
static const char *const dispatcher_values[] = {"alltoall", "allgather", NULL};
static const char *const lr_schedule_values[] = {"constant", "cosine", NULL};
static const char *const dtype_values[] = {"uint16", "uint32", NULL};
static const char *const order_names[] = {"tp", "cp", "ep", "dp", "pp"};
static const char *const pp_schedule_values[] = {"auto", "1f1b", "interleaved", "gpipe", NULL};
static const char *const cp_comm_values[] = {"p2p", "allgather", NULL};
static const char *const bind_values[] = {"auto", "none", NULL};
#define ORDER_COUNT (sizeof order_names / sizeof order_names[0])

/* Defaults of the model sizes are the `small` model of configs/small.ini (vocabulary 256,
 * the embedded synthetic dataset's), so a run without a config file trains something
 * sensible in minutes on a laptop. */
static const struct key_def key_table[] = {
    /* [model] */
    {"model.vocab_size", KEY_INT, "256", "vocabulary size V: token ids are 0 .. V-1",
     INT_MIN1(model.vocab_size)},
    {"model.hidden_size", KEY_INT, "128", "hidden size d, the width of the residual stream",
     INT_MIN1(model.hidden_size)},
    {"model.intermediate_size", KEY_INT, "256", "FFN width F of each expert",
     INT_MIN1(model.intermediate_size)},
    {"model.num_hidden_layers", KEY_INT, "2", "number of transformer layers L",
     INT_MIN1(model.num_hidden_layers)},
    {"model.num_attention_heads", KEY_INT, "4",
     "query heads H; head_dim = hidden_size / H must be even",
     INT_MIN1(model.num_attention_heads)},
    {"model.num_key_value_heads", KEY_INT, "2",
     "key/value heads G (grouped-query attention); H must be a multiple of G",
     INT_MIN1(model.num_key_value_heads)},
    {"model.num_local_experts", KEY_INT, "8", "experts per MoE layer E",
     INT_MIN1(model.num_local_experts)},
    {"model.num_experts_per_tok", KEY_INT, "2", "experts each token is routed to, k <= E",
     INT_MIN1(model.num_experts_per_tok)},
    {"model.rope_theta", KEY_DOUBLE, "10000", "RoPE base frequency", NUM_GT0(model.rope_theta)},
    {"model.rms_norm_eps", KEY_DOUBLE, "1e-5", "epsilon inside every RMSNorm",
     NUM_GT0(model.rms_norm_eps)},
    {"model.tie_word_embeddings", KEY_BOOL, "false",
     "share embed_tokens and lm_head weights: not supported, only false is accepted",
     NO_FIELD, 0, 0, 0, KF_ONLY_FALSE, NULL},
    {"model.router_aux_loss_coef", KEY_DOUBLE, "0.01",
     "load-balancing loss weight alpha (equals alpha per layer when balanced)",
     NUM_GE0(model.router_aux_loss_coef)},
    {"model.router_z_loss_coef", KEY_DOUBLE, "0.001",
     "router z-loss weight beta (mean squared log-sum-exp of router logits)",
     NUM_GE0(model.router_z_loss_coef)},
    {"model.moe_capacity_factor", KEY_DOUBLE, "",
     "expert capacity factor: each expert keeps ceil(f * N * k / E) assignments per "
     "micro-batch; empty = dropless",
     FIELD(model.moe_capacity_factor), 0, 0, KF_MIN | KF_MIN_EXCL | KF_EMPTY_ZERO, NULL},
    {"model.moe_drop_policy", KEY_ENUM, "position",
     "which assignments an over-full expert keeps: by token position or by probability",
     FIELD(model.moe_drop_policy), 0, 0, 0, drop_policy_values},
    {"model.moe_token_dispatcher_type", KEY_ENUM, "alltoall",
     "how tokens reach the experts of other ranks: all-to-all over EP (then all-gather over "
     "ETP), or all-gather over ETP x EP",
     FIELD(model.moe_token_dispatcher_type), 0, 0, 0, dispatcher_values},
    {"model.config", KEY_STRING, "",
     "Hugging Face config.json whose model keys fill those not set in the file or on the "
     "command line (path relative to the working directory)",
     STR(model_config_path)},
    /* [train] */
    {"train.steps", KEY_INT, "300", "optimizer steps to run", INT_MIN1(train.steps)},
    {"train.global_batch", KEY_INT, "16", "sequences per optimizer step",
     INT_MIN1(train.global_batch)},
    {"train.micro_batch", KEY_INT, "8",
     "sequences per micro-batch; global_batch must be a multiple of it",
     INT_MIN1(train.micro_batch)},
    {"train.seq_len", KEY_INT, "128", "tokens per sequence T", INT_MIN1(train.seq_len)},
    {"train.lr", KEY_DOUBLE, "3e-4", "peak learning rate", NUM_GE0(train.lr)},
    {"train.lr_min", KEY_DOUBLE, "0", "final learning rate of the cosine schedule",
     NUM_GE0(train.lr_min)},
    {"train.lr_schedule", KEY_ENUM, "cosine",
     "constant lr, or linear warmup then cosine decay to lr_min", FIELD(train.lr_schedule),
     0, 0, 0, lr_schedule_values},
    {"train.warmup", KEY_INT, "0", "linear warmup steps of the cosine schedule",
     INT_MIN0(train.warmup)},
    {"train.weight_decay", KEY_DOUBLE, "0.1", "AdamW weight decay of 2-D weights",
     NUM_GE0(train.weight_decay)},
    {"train.beta1", KEY_DOUBLE, "0.9", "AdamW first-moment decay", NUM_01(train.beta1)},
    {"train.beta2", KEY_DOUBLE, "0.95", "AdamW second-moment decay", NUM_01(train.beta2)},
    {"train.eps", KEY_DOUBLE, "1e-8", "AdamW epsilon", NUM_GT0(train.eps)},
    {"train.clip", KEY_DOUBLE, "1.0", "max global gradient L2 norm, 0 disables clipping",
     NUM_GE0(train.clip)},
    {"train.seed", KEY_U64, "42", "seed of the initial weights", FIELD(train.seed), 0, 0, 0,
     NULL},
    {"train.init_from", KEY_STRING, "",
     "safetensors file (Hugging Face names) to start from; empty = initialise",
     STR(train.init_from)},
    {"train.export_to", KEY_STRING, "",
     "directory to write model.safetensors + config.json after training; empty = none",
     STR(train.export_to)},
    {"train.peak_gflops", KEY_DOUBLE, "0",
     "peak GFLOP/s per rank for MFU; 0 = measure an SGEMM at start",
     NUM_GE0(train.peak_gflops)},
    /* [data] */
    {"data.path", KEY_STRING, "",
     "token file (llm.c format or raw); empty = the embedded synthetic dataset",
     STR(data.path)},
    {"data.dtype", KEY_ENUM, "uint16", "token width of raw files (llm.c files carry their own)",
     FIELD(data.dtype), 0, 0, 0, dtype_values},
    /* [parallel] */
    {"parallel.tp", KEY_INT, "1", "tensor-parallel size (attention, with sequence parallelism)",
     INT_MIN1(parallel.tp)},
    {"parallel.cp", KEY_INT, "1", "context-parallel size (ring attention)",
     INT_MIN1(parallel.cp)},
    {"parallel.cp_comm_type", KEY_ENUM, "p2p",
     "context parallelism's key/value exchange: p2p (ring attention, transfers overlapped "
     "with compute) or allgather (all-gather keys and values, reduce-scatter their "
     "gradients)",
     FIELD(parallel.cp_comm_type), 0, 0, 0, cp_comm_values},
    {"parallel.ep", KEY_INT, "1", "expert-parallel size; must divide num_local_experts",
     INT_MIN1(parallel.ep)},
    {"parallel.etp", KEY_INT, "0",
     "expert tensor-parallel size; must divide intermediate_size; 0 = the same as parallel.tp",
     INT_MIN0(parallel.etp)},
    {"parallel.pp", KEY_INT, "1", "pipeline-parallel stages", INT_MIN1(parallel.pp)},
    {"parallel.vpp", KEY_INT, "1", "virtual (interleaved) stages per pipeline rank",
     INT_MIN1(parallel.vpp)},
    {"parallel.pp_layers", KEY_STRING, "",
     "layers of each model chunk (pp x vpp entries, in layer order) joined by ','; empty = "
     "an even split",
     FIELD(parallel.pp_layers), 0, 0, KF_COUNTS, NULL},
    {"parallel.pp_schedule", KEY_ENUM, "auto",
     "pipeline schedule: 1f1b, interleaved (vpp > 1), gpipe (all forwards, then all "
     "backwards); auto = 1f1b when vpp = 1, interleaved otherwise",
     FIELD(parallel.pp_schedule), 0, 0, 0, pp_schedule_values},
    {"parallel.order", KEY_STRING, "tp-cp-ep-dp-pp",
     "rank order, fastest-varying first: tp, cp, ep, dp, pp joined by '-'; auto = the order "
     "whose estimated traffic per step crosses the fewest node, then package, boundaries",
     FIELD(parallel.order), 0, 0, KF_ORDER, NULL},
    {"parallel.distributed_optimizer", KEY_BOOL, "true",
     "shard optimizer state over data-parallel ranks (ZeRO-1)",
     FIELD(parallel.distributed_optimizer), 0, 0, 0, NULL},
    {"parallel.dispatch_direct", KEY_BOOL, "true",
     "all-to-all dispatcher: write token rows straight into the expert blocks of ranks on "
     "the same node (Linux cross-memory attach) where the kernel allows it; false = MPI "
     "messages only",
     FIELD(parallel.dispatch_direct), 0, 0, 0, NULL},
    /* [launch] */
    {"launch.bind", KEY_ENUM, "auto",
     "auto: a rank the launcher left unbound is bound to its share of its node's cores (a "
     "contiguous block inside one NUMA domain where the share allows) and runs that many "
     "threads; a rank the launcher bound keeps its binding; none: leave binding alone",
     FIELD(launch.bind), 0, 0, 0, bind_values},
    {"launch.ranks_per_node", KEY_INT, "0",
     "declare nodes of this many consecutive ranks (emulates a cluster on one machine for "
     "the locality table, parallel.order = auto and direct writes); 0 = the real nodes",
     INT_MIN0(launch.ranks_per_node)},
    /* [ckpt] */
    {"ckpt.dir", KEY_STRING, "", "checkpoint directory; empty = no checkpoints", STR(ckpt.dir)},
    {"ckpt.interval", KEY_INT, "0",
     "steps between checkpoints (one is always written after the last step); 0 = last only",
     INT_MIN0(ckpt.interval)},
    {"ckpt.keep", KEY_INT, "2", "most recent checkpoints kept; 0 = keep all",
     INT_MIN0(ckpt.keep)},
    {"ckpt.resume", KEY_STRING, "auto",
     "checkpoint to resume from: auto = the latest complete one under ckpt.dir (fresh start "
     "when there is none), never, or a checkpoint directory",
     STR(ckpt.resume)},
    {"ckpt.async", KEY_BOOL, "false",
     "write checkpoints in a background thread; the step waits only for the in-memory copy",
     FIELD(ckpt.async), 0, 0, 0, NULL},
    {"ckpt.zstd_level", KEY_INT, "1",
     "zstd compression level of checkpoint shards, 1..19 (fp32 weights compress ~1.09x at any level; 1 is the fastest)",
     FIELD(ckpt.zstd_level), 1, 19, KF_MIN | KF_MAX, NULL},
    /* [log] */
    {"log.metrics", KEY_STRING, "", "JSON-lines metrics file; empty = none",
     STR(log.metrics)},
    {"log.trace", KEY_STRING, "",
     "Chrome trace-event JSON of the run (one track per rank: steps, optimizer, "
     "communication, checkpoints), for Perfetto or chrome://tracing; empty = none",
     STR(log.trace)},
    {"log.interval", KEY_INT, "1", "steps between progress lines", INT_MIN1(log.interval)},
};
#define KEY_COUNT (sizeof key_table / sizeof key_table[0])

static const char *const section_names[] = {"model", "train", "data", "parallel", "launch",
                                            "ckpt", "log"};
#define SECTION_COUNT (sizeof section_names / sizeof section_names[0])

/* ---------------------------------------------------------------- messages */

int launch_cfg_fail(struct launch_cfg_err *e, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return code;
}

/* Appends to a fixed buffer, truncating silently: for building lists in messages. */
__attribute__((format(printf, 3, 4))) static void buf_add(char *buf, size_t n,
                                                          const char *fmt, ...)
{
    size_t const used = strlen(buf);
    if (used + 1 >= n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + used, n - used, fmt, ap);
    va_end(ap);
}

static size_t section_len(const char *name)
{
    const char *dot = strchr(name, '.');
    return dot ? (size_t)(dot - name) : 0;
}

/* What a key accepts, e.g. "an integer >= 1" or "a number in [0, 1)". */
static void key_expect(const struct key_def *k, char *buf, size_t n)
{
    buf[0] = '\0';
    switch (k->type) {
    case KEY_INT: buf_add(buf, n, "an integer"); break;
    case KEY_U64: buf_add(buf, n, "an integer in [0, 2^64)"); return;
    case KEY_DOUBLE: buf_add(buf, n, "a number"); break;
    case KEY_BOOL:
        buf_add(buf, n, (k->flags & KF_ONLY_FALSE) ? "false" : "a boolean (true or false)");
        return;
    case KEY_STRING:
        if (k->flags & KF_ORDER)
            buf_add(buf, n, "auto or a permutation of tp, cp, ep, dp, pp joined by '-' "
                            "(e.g. tp-cp-ep-dp-pp)");
        else if (k->flags & KF_COUNTS)
            buf_add(buf, n, "integers >= 1 joined by ',' (e.g. 3,5,5,3), at most %d of them",
                    LAUNCH_CHUNKS_MAX);
        else
            buf_add(buf, n, "a string of at most %zu characters", k->size - 1);
        return;
    case KEY_ENUM:
        buf_add(buf, n, "one of ");
        for (int i = 0; k->values[i]; i++) buf_add(buf, n, "%s%s", i ? ", " : "", k->values[i]);
        return;
    }
    unsigned const f = k->flags;
    if ((f & KF_MIN) && (f & KF_MAX))
        buf_add(buf, n, " in %c%g, %g%c", (f & KF_MIN_EXCL) ? '(' : '[', k->min, k->max,
                (f & KF_MAX_EXCL) ? ')' : ']');
    else if (f & KF_MIN)
        buf_add(buf, n, " %s %g", (f & KF_MIN_EXCL) ? ">" : ">=", k->min);
    else if (f & KF_MAX)
        buf_add(buf, n, " %s %g", (f & KF_MAX_EXCL) ? "<" : "<=", k->max);
    if (f & KF_EMPTY_ZERO) buf_add(buf, n, " (or empty for dropless)");
}

/* Short type for the help table, e.g. "int >= 1", "float in [0, 1)", "position|probs". */
static void key_type_text(const struct key_def *k, char *buf, size_t n)
{
    buf[0] = '\0';
    switch (k->type) {
    case KEY_INT: buf_add(buf, n, "int"); break;
    case KEY_U64: buf_add(buf, n, "uint64"); return;
    case KEY_DOUBLE: buf_add(buf, n, "float"); break;
    case KEY_BOOL: buf_add(buf, n, (k->flags & KF_ONLY_FALSE) ? "bool (false only)" : "bool");
        return;
    case KEY_STRING:
        buf_add(buf, n, (k->flags & KF_ORDER) ? "order" : (k->flags & KF_COUNTS) ? "counts" : "string");
        return;
    case KEY_ENUM:
        for (int i = 0; k->values[i]; i++) buf_add(buf, n, "%s%s", i ? "|" : "", k->values[i]);
        return;
    }
    unsigned const f = k->flags;
    if ((f & KF_MIN) && (f & KF_MAX))
        buf_add(buf, n, " in %c%g,%g%c", (f & KF_MIN_EXCL) ? '(' : '[', k->min, k->max,
                (f & KF_MAX_EXCL) ? ')' : ']');
    else if (f & KF_MIN)
        buf_add(buf, n, " %s %g", (f & KF_MIN_EXCL) ? ">" : ">=", k->min);
    if (f & KF_EMPTY_ZERO) buf_add(buf, n, " or empty");
}

/* ---------------------------------------------------------------- lookup */

static const struct key_def *key_find(const char *name)
{
    for (size_t i = 0; i < KEY_COUNT; i++)
        if (strcmp(key_table[i].name, name) == 0) return &key_table[i];
    return NULL;
}

/* Edit distance with adjacent transpositions (optimal string alignment), so that
 * "stpes" is one edit from "steps". Long inputs are not worth suggesting for. */
static int edit_distance(const char *a, size_t na, const char *b, size_t nb)
{
    enum { MAXN = 96 };
    if (na >= MAXN || nb >= MAXN) return INT_MAX / 2;
    int rows[3][MAXN + 1];
    int *prev2 = rows[0], *prev = rows[1], *cur = rows[2];
    for (size_t j = 0; j <= nb; j++) prev[j] = (int)j;
    for (size_t i = 1; i <= na; i++) {
        cur[0] = (int)i;
        for (size_t j = 1; j <= nb; j++) {
            int const cost = a[i - 1] != b[j - 1];
            int best = prev[j] + 1;
            if (cur[j - 1] + 1 < best) best = cur[j - 1] + 1;
            if (prev[j - 1] + cost < best) best = prev[j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                prev2[j - 2] + 1 < best)
                best = prev2[j - 2] + 1;
            cur[j] = best;
        }
        int *const t = prev2;
        prev2 = prev;
        prev = cur;
        cur = t;
    }
    return prev[nb];
}

/* The key closest to `name` (which may lack its section), or NULL when none is close. */
static const struct key_def *key_suggest(const char *name)
{
    size_t const sec = section_len(name);
    const char *const part = sec ? name + sec + 1 : name;
    size_t const npart = strlen(part), nname = strlen(name);
    const struct key_def *best = NULL;
    int best_d = INT_MAX;
    for (size_t i = 0; i < KEY_COUNT; i++) {
        const char *const kn = key_table[i].name;
        size_t const ksec = section_len(kn);
        const char *const kpart = kn + ksec + 1;
        int d = INT_MAX;
        if (sec) d = edit_distance(name, nname, kn, strlen(kn));
        /* A key in the wrong section (model.steps) or without one (steps) is close to
         * the key of that name, one or two edits for the section. */
        bool const same_sec = sec == ksec && strncmp(name, kn, sec) == 0;
        if (!same_sec) {
            int const dp = edit_distance(part, npart, kpart, strlen(kpart)) + (sec ? 2 : 1);
            if (dp < d) d = dp;
        }
        if (d < best_d) {
            best_d = d;
            best = &key_table[i];
        }
    }
    int limit = (int)nname / 4;
    if (limit < 1) limit = 1;
    if (limit > 3) limit = 3;
    return best_d <= limit ? best : NULL;
}

/* "unknown key ..." with the closest key, else the section's keys, else the sections. */
static int unknown_key(struct launch_cfg_err *e, const char *name)
{
    const struct key_def *const near = key_suggest(name);
    if (near)
        return launch_cfg_fail(e, VD_EINVAL, "unknown key '%s' (did you mean '%s'?)", name,
                               near->name);
    size_t const sec = section_len(name);
    char list[1024] = "";
    for (size_t i = 0; sec && i < KEY_COUNT; i++)
        if (section_len(key_table[i].name) == sec &&
            strncmp(key_table[i].name, name, sec) == 0)
            buf_add(list, sizeof list, "%s%s", list[0] ? ", " : "", key_table[i].name + sec + 1);
    if (list[0])
        return launch_cfg_fail(e, VD_EINVAL, "unknown key '%s': the keys of [%.*s] are %s", name,
                               (int)sec, name, list);
    for (size_t i = 0; i < SECTION_COUNT; i++)
        buf_add(list, sizeof list, "%s%s", i ? ", " : "", section_names[i]);
    return launch_cfg_fail(e, VD_EINVAL,
                           "unknown key '%s': keys are written section.key, with the sections %s",
                           name, list);
}

/* ---------------------------------------------------------------- parsing one value */

union key_value {
    int i;
    uint64_t u;
    double d;
    bool b;
};

static bool range_ok(const struct key_def *k, double v)
{
    unsigned const f = k->flags;
    if (f & KF_MIN) {
        if ((f & KF_MIN_EXCL) ? !(v > k->min) : !(v >= k->min)) return false;
    }
    if (f & KF_MAX) {
        if ((f & KF_MAX_EXCL) ? !(v < k->max) : !(v <= k->max)) return false;
    }
    return true;
}

int launch_pp_layers(const char *s, int *out, int cap)
{
    int n = 0;
    if (*s == '\0') return 0;
    for (const char *p = s;; p++) {
        char *end;
        errno = 0;
        long const v = strtol(p, &end, 10);
        if (end == p || errno || v < 1 || v > 1000000 || n == cap || (*end && *end != ','))
            return -1;
        out[n++] = (int)v;
        if (!*end) return n;
        p = end;
    }
}

static bool order_ok(const char *s)
{
    if (strcmp(s, "auto") == 0) return true;
    bool seen[ORDER_COUNT] = {false};
    size_t count = 0;
    for (const char *p = s;; p++) {
        const char *const dash = strchr(p, '-');
        size_t const len = dash ? (size_t)(dash - p) : strlen(p);
        size_t j = 0;
        while (j < ORDER_COUNT &&
               !(strlen(order_names[j]) == len && strncmp(order_names[j], p, len) == 0))
            j++;
        if (j == ORDER_COUNT || seen[j]) return false;
        seen[j] = true;
        count++;
        if (!dash) break;
        p = dash;
    }
    return count == ORDER_COUNT;
}

static bool parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) return *out = true, true;
        if (strcasecmp(s, no[i]) == 0) return *out = false, true;
    }
    return false;
}

/* Parses `s` (already trimmed) for key k into *out; the message quotes the value. */
static int key_parse(const struct key_def *k, const char *s, union key_value *out,
                     struct launch_cfg_err *e)
{
    char expect[256];
    key_expect(k, expect, sizeof expect);
    char *end = NULL;
    switch (k->type) {
    case KEY_INT: {
        errno = 0;
        long long const v = strtoll(s, &end, 10);
        if (end == s || *end != '\0')
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': expected %s", k->name, s, expect);
        if (errno == ERANGE || v < INT_MIN || v > INT_MAX)
            return launch_cfg_fail(e, VD_EINVAL,
                                   "%s = '%.200s': expected %s (the value does not fit in a "
                                   "32-bit int)",
                                   k->name, s, expect);
        if (!range_ok(k, (double)v))
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': expected %s", k->name, s, expect);
        out->i = (int)v;
        return 0;
    }
    case KEY_U64: {
        errno = 0;
        unsigned long long const v = strtoull(s, &end, 10);
        /* strtoull accepts "-1" and wraps it; a seed never is negative. */
        if (end == s || *end != '\0' || strchr(s, '-'))
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': expected %s", k->name, s, expect);
        if (errno == ERANGE)
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': expected %s (the value overflows)",
                                   k->name, s, expect);
        out->u = (uint64_t)v;
        return 0;
    }
    case KEY_DOUBLE: {
        if (s[0] == '\0' && (k->flags & KF_EMPTY_ZERO)) {
            out->d = 0.0;
            return 0;
        }
        errno = 0;
        double const v = strtod(s, &end);
        if (end == s || *end != '\0')
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': expected %s", k->name, s, expect);
        if (errno == ERANGE || !isfinite(v))
            return launch_cfg_fail(e, VD_EINVAL,
                                   "%s = '%.200s': expected %s (the value is out of a double's "
                                   "range or not finite)",
                                   k->name, s, expect);
        if (!range_ok(k, v))
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': expected %s", k->name, s, expect);
        out->d = v;
        return 0;
    }
    case KEY_BOOL:
        if (!parse_bool(s, &out->b))
            return launch_cfg_fail(e, VD_EINVAL,
                                   "%s = '%.200s': expected a boolean (true or false)", k->name,
                                   s);
        if ((k->flags & KF_ONLY_FALSE) && out->b)
            return launch_cfg_fail(e, VD_EINVAL,
                                   "%s = '%.200s': tying the input embedding and lm_head weights "
                                   "is not supported; only false is allowed",
                                   k->name, s);
        return 0;
    case KEY_STRING:
        if (strlen(s) >= k->size)
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s...': expected %s", k->name, s,
                                   expect);
        if ((k->flags & KF_ORDER) && !order_ok(s))
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': expected %s", k->name, s, expect);
        int counts[LAUNCH_CHUNKS_MAX];
        if ((k->flags & KF_COUNTS) && launch_pp_layers(s, counts, LAUNCH_CHUNKS_MAX) < 0)
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': expected %s", k->name, s, expect);
        return 0; /* the caller copies the text */
    case KEY_ENUM:
        for (int i = 0; k->values[i]; i++)
            if (strcmp(s, k->values[i]) == 0) {
                out->i = i;
                return 0;
            }
        {
            char list[256] = "";
            for (int i = 0; k->values[i]; i++)
                buf_add(list, sizeof list, "%s%s", i ? ", " : "", k->values[i]);
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%.200s': allowed values are %s", k->name, s,
                                   list);
        }
    }
    return launch_cfg_fail(e, VD_EINVAL, "%s: unknown key type", k->name);
}

/* Sets key `name` from text. *index (may be NULL) receives the key's table index. */
static int key_set(struct launch_config *c, const char *name, const char *text, size_t *index,
                   struct launch_cfg_err *e)
{
    const struct key_def *const k = key_find(name);
    if (!k) return unknown_key(e, name);

    /* Surrounding blanks are never part of a value (the INI reader strips them too). */
    while (isspace((unsigned char)*text)) text++;
    size_t len = strlen(text);
    while (len > 0 && isspace((unsigned char)text[len - 1])) len--;
    char *const s = vd_alloc(len + 1);
    memcpy(s, text, len);
    s[len] = '\0';

    union key_value v;
    int const rc = key_parse(k, s, &v, e);
    if (rc == 0 && k->offset != NO_FIELD) {
        char *const dst = (char *)c + k->offset;
        switch (k->type) {
        case KEY_INT:
        case KEY_ENUM: memcpy(dst, &v.i, sizeof v.i); break;
        case KEY_U64: memcpy(dst, &v.u, sizeof v.u); break;
        case KEY_DOUBLE: memcpy(dst, &v.d, sizeof v.d); break;
        case KEY_BOOL: memcpy(dst, &v.b, sizeof v.b); break;
        case KEY_STRING: memcpy(dst, s, len + 1); break;
        }
    }
    free(s);
    if (rc == 0 && index) *index = (size_t)(k - key_table);
    return rc;
}

/* ---------------------------------------------------------------- public: keys */

char *launch_config_to_json(const struct launch_config *c)
{
    json_t *o = json_object();
    for (size_t i = 0; i < KEY_COUNT; i++) {
        const struct key_def *k = &key_table[i];
        if (k->offset == NO_FIELD) continue;
        const char *src = (const char *)c + k->offset;
        json_t *v = NULL;
        int iv;
        uint64_t uv;
        double dv;
        bool bv;
        switch (k->type) {
        case KEY_INT: memcpy(&iv, src, sizeof iv); v = json_integer(iv); break;
        case KEY_ENUM: memcpy(&iv, src, sizeof iv); v = json_string(k->values[iv]); break;
        case KEY_U64: memcpy(&uv, src, sizeof uv); v = json_integer((json_int_t)uv); break;
        case KEY_DOUBLE: memcpy(&dv, src, sizeof dv); v = json_real(dv); break;
        case KEY_BOOL: memcpy(&bv, src, sizeof bv); v = json_boolean(bv); break;
        case KEY_STRING: v = json_string(src); break;
        }
        json_object_set_new(o, k->name, v);
    }
    char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    json_decref(o);
    VD_CHECK(text != NULL, "out of memory serialising the configuration");
    return text;
}

void launch_config_defaults(struct launch_config *c)
{
    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < KEY_COUNT; i++) {
        struct launch_cfg_err e;
        int const rc = key_set(c, key_table[i].name, key_table[i].def, NULL, &e);
        VD_CHECK(rc == 0, "default of %s does not parse: %s", key_table[i].name, e.msg);
    }
}

int launch_config_set(struct launch_config *c, const char *key, const char *value)
{
    struct launch_cfg_err e;
    int const rc = key_set(c, key, value, NULL, &e);
    if (rc < 0) RETURN_ERR(rc, "%s", e.msg);
    return 0;
}

void launch_config_help(FILE *out)
{
    fprintf(out, "Configuration keys: INI sections [model] [train] [data] [parallel] [ckpt] "
                 "[log] with 'key = value' lines,\nor --section.key=value on the command line "
                 "(which wins over the file).\n");
    size_t prev_sec = 0;
    for (size_t i = 0; i < KEY_COUNT; i++) {
        const struct key_def *const k = &key_table[i];
        size_t const sec = section_len(k->name);
        if (i == 0 || sec != prev_sec || strncmp(k->name, key_table[i - 1].name, sec) != 0)
            fprintf(out, "\n[%.*s]\n", (int)sec, k->name);
        prev_sec = sec;
        char type[128];
        key_type_text(k, type, sizeof type);
        char def[96];
        snprintf(def, sizeof def, "%s", k->def[0] ? k->def : "\"\"");
        fprintf(out, "  %-32s %-22s default %-16s %s\n", k->name, type, def, k->help);
    }
}

/* ---------------------------------------------------------------- validation */

/* Range of a stored value against the table: catches values set in code, not text. */
static int key_check_stored(const struct launch_config *c, const struct key_def *k,
                            struct launch_cfg_err *e)
{
    if (k->offset == NO_FIELD) return 0;
    const char *const src = (const char *)c + k->offset;
    char expect[256];
    key_expect(k, expect, sizeof expect);
    switch (k->type) {
    case KEY_INT: {
        int v;
        memcpy(&v, src, sizeof v);
        if (!range_ok(k, v))
            return launch_cfg_fail(e, VD_EINVAL, "%s = %d: expected %s", k->name, v, expect);
        return 0;
    }
    case KEY_ENUM: {
        int v, n = 0;
        memcpy(&v, src, sizeof v);
        while (k->values[n]) n++;
        if (v < 0 || v >= n)
            return launch_cfg_fail(e, VD_EINVAL, "%s = %d: expected %s", k->name, v, expect);
        return 0;
    }
    case KEY_DOUBLE: {
        double v;
        memcpy(&v, src, sizeof v);
        if ((k->flags & KF_EMPTY_ZERO) && v == 0.0) return 0;
        if (!isfinite(v) || !range_ok(k, v))
            return launch_cfg_fail(e, VD_EINVAL, "%s = %g: expected %s", k->name, v, expect);
        return 0;
    }
    case KEY_STRING:
        if (!memchr(src, '\0', k->size))
            return launch_cfg_fail(e, VD_EINVAL, "%s: the string is not terminated", k->name);
        if ((k->flags & KF_ORDER) && !order_ok(src))
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%s': expected %s", k->name, src, expect);
        int counts[LAUNCH_CHUNKS_MAX];
        if ((k->flags & KF_COUNTS) && launch_pp_layers(src, counts, LAUNCH_CHUNKS_MAX) < 0)
            return launch_cfg_fail(e, VD_EINVAL, "%s = '%s': expected %s", k->name, src, expect);
        return 0;
    case KEY_U64:
    case KEY_BOOL: return 0;
    }
    return 0;
}

static int config_check(const struct launch_config *c, struct launch_cfg_err *e)
{
    for (size_t i = 0; i < KEY_COUNT; i++) {
        int const rc = key_check_stored(c, &key_table[i], e);
        if (rc < 0) return rc;
    }
    const struct model_config *const m = &c->model;
    const struct launch_train *const t = &c->train;
    const struct launch_parallel *const p = &c->parallel;

    if (t->global_batch % t->micro_batch != 0)
        return launch_cfg_fail(e, VD_EINVAL,
                               "train.global_batch = %d is not divisible by train.micro_batch = "
                               "%d: global_batch must be a multiple of micro_batch",
                               t->global_batch, t->micro_batch);
    if (t->lr_schedule == LAUNCH_LR_COSINE && t->warmup >= t->steps)
        return launch_cfg_fail(e, VD_EINVAL,
                               "train.warmup = %d is not smaller than train.steps = %d: with "
                               "train.lr_schedule = cosine, warmup must be < steps",
                               t->warmup, t->steps);
    if (t->lr_min > t->lr)
        return launch_cfg_fail(e, VD_EINVAL,
                               "train.lr_min = %g is larger than train.lr = %g: lr_min must be "
                               "<= lr",
                               t->lr_min, t->lr);

    /* Layout checks that do not need the world size; once it is known, dist_grid_init and
     * launch_layout_make check the rest. */
    if (m->num_attention_heads % p->tp != 0 || m->num_key_value_heads % p->tp != 0)
        return launch_cfg_fail(e, VD_EINVAL,
                               "model.num_attention_heads = %d and model.num_key_value_heads = %d "
                               "must both be divisible by parallel.tp = %d: tensor parallelism "
                               "splits the heads evenly",
                               m->num_attention_heads, m->num_key_value_heads, p->tp);
    if (m->vocab_size % p->tp != 0)
        return launch_cfg_fail(e, VD_EINVAL,
                               "model.vocab_size = %d is not divisible by parallel.tp = %d: the "
                               "embedding and lm_head are split evenly over the vocabulary",
                               m->vocab_size, p->tp);
    if (m->num_local_experts % p->ep != 0)
        return launch_cfg_fail(e, VD_EINVAL,
                               "model.num_local_experts = %d is not divisible by parallel.ep = %d: "
                               "every expert-parallel rank holds the same number of experts",
                               m->num_local_experts, p->ep);
    int const etp = p->etp ? p->etp : p->tp; /* 0: the same as tp */
    if (m->intermediate_size % etp != 0)
        return launch_cfg_fail(e, VD_EINVAL,
                               "model.intermediate_size = %d is not divisible by parallel.etp = "
                               "%d: expert tensor parallelism splits each expert's FFN width "
                               "evenly",
                               m->intermediate_size, etp);
    if (p->cp > 1 && t->seq_len % (2 * p->cp) != 0)
        return launch_cfg_fail(e, VD_EINVAL,
                               "train.seq_len = %d is not divisible by 2 * parallel.cp = %d: "
                               "context parallelism cuts each sequence into 2 * cp equal chunks",
                               t->seq_len, 2 * p->cp);
    if (p->vpp > 1 && p->pp == 1)
        return launch_cfg_fail(e, VD_EINVAL,
                               "parallel.vpp = %d with parallel.pp = 1: virtual stages "
                               "interleave a pipeline, so vpp > 1 needs pp > 1",
                               p->vpp);
    if ((long long)p->pp * p->vpp > m->num_hidden_layers)
        return launch_cfg_fail(e, VD_EINVAL,
                               "parallel.pp = %d times parallel.vpp = %d stages exceed "
                               "model.num_hidden_layers = %d: every (virtual) stage needs a layer",
                               p->pp, p->vpp, m->num_hidden_layers);
    int counts[LAUNCH_CHUNKS_MAX], chunk_layers[LAUNCH_CHUNKS_MAX];
    int const n = launch_pp_layers(p->pp_layers, counts, LAUNCH_CHUNKS_MAX);
    if ((long long)p->pp * p->vpp > LAUNCH_CHUNKS_MAX)
        return launch_cfg_fail(e, VD_EINVAL,
                               "parallel.pp = %d times parallel.vpp = %d model chunks: at most "
                               "%d are supported", p->pp, p->vpp, LAUNCH_CHUNKS_MAX);
    if (n < 0 || par_pp_split(m->num_hidden_layers, p->pp, p->vpp, counts, n, chunk_layers) < 0)
        return launch_cfg_fail(e, VD_EINVAL, "%s", n < 0 ? "parallel.pp_layers: not a list of "
                               "counts" : vd_err_msg());
    enum par_pp_schedule const kind = launch_pp_schedule(p);
    if (kind == PAR_PP_1F1B && p->vpp > 1)
        return launch_cfg_fail(e, VD_EINVAL,
                               "parallel.pp_schedule = 1f1b with parallel.vpp = %d: 1f1b runs one "
                               "model chunk per pipeline rank; use interleaved or gpipe with "
                               "vpp > 1", p->vpp);
    if (kind == PAR_PP_INTERLEAVED && p->vpp == 1)
        return launch_cfg_fail(e, VD_EINVAL,
                               "parallel.pp_schedule = interleaved with parallel.vpp = 1: the "
                               "interleaved schedule needs vpp > 1 model chunks per rank; use "
                               "1f1b or set parallel.vpp");
    return 0;
}

enum par_pp_schedule launch_pp_schedule(const struct launch_parallel *p)
{
    return p->pp_schedule == 0 ? par_pp_schedule_default(p->vpp)
                               : (enum par_pp_schedule)(p->pp_schedule - 1);
}

int launch_config_validate(const struct launch_config *c)
{
    FORWARD_IF(model_config_validate(&c->model));
    struct launch_cfg_err e;
    int const rc = config_check(c, &e);
    if (rc < 0) RETURN_ERR(rc, "%s", e.msg);
    return 0;
}

/* ---------------------------------------------------------------- loading */

struct ini_ctx {
    struct launch_config *c;
    bool *explicit_keys;
    FILE *f;
    int line;     /* the line inih is processing */
    int err_line; /* first line we failed on, 0 when none */
    int err_code;
    struct launch_cfg_err err;
};

/* fgets for inih that counts lines (so messages can name them), strips leading blanks
 * (so indented keys are keys, not continuation lines) and '#' comments after a blank,
 * and turns an over-long line into an error instead of two half-lines. */
static char *ini_read_line(char *str, int num, void *stream)
{
    struct ini_ctx *const x = stream;
    if (!fgets(str, num, x->f)) return NULL;
    x->line++;
    size_t len = strlen(str);
    if (len > 0 && str[len - 1] != '\n') {
        int const ch = fgetc(x->f);
        if (ch != EOF && ch != '\n') {
            for (int c = ch; c != EOF && c != '\n'; c = fgetc(x->f)) {}
            if (!x->err_line) {
                x->err_line = x->line;
                x->err_code = VD_EFORMAT;
                launch_cfg_fail(&x->err, VD_EFORMAT,
                                "the line is longer than %d characters; give long values on the "
                                "command line instead",
                                num - 2);
            }
            snprintf(str, (size_t)num, "!\n"); /* a syntax error on this line for inih */
            return str;
        }
    }
    size_t lead = 0;
    while (str[lead] == ' ' || str[lead] == '\t') lead++;
    memmove(str, str + lead, len - lead + 1);
    len -= lead;
    for (size_t i = 1; i < len; i++)
        if (str[i] == '#' && (str[i - 1] == ' ' || str[i - 1] == '\t')) {
            str[i] = '\n';
            str[i + 1] = '\0';
            break;
        }
    return str;
}

static int ini_on_value(void *user, const char *section, const char *name, const char *value)
{
    struct ini_ctx *const x = user;
    if (x->err_line) return 1; /* report only the first problem */
    int rc;
    size_t idx = 0;
    char key[256];
    if (section[0] == '\0') {
        rc = launch_cfg_fail(&x->err, VD_EINVAL,
                             "key '%s' is outside any section: put it under [model], [train], "
                             "[data], [parallel], [ckpt] or [log]",
                             name);
    } else if ((size_t)snprintf(key, sizeof key, "%s.%s", section, name) >= sizeof key) {
        rc = launch_cfg_fail(&x->err, VD_EINVAL, "unknown key '%.100s.%.100s'", section, name);
    } else {
        rc = key_set(x->c, key, value, &idx, &x->err);
    }
    if (rc < 0) {
        x->err_line = x->line;
        x->err_code = rc;
        return 0;
    }
    x->explicit_keys[idx] = true;
    return 1;
}

static int load_ini(struct launch_config *c, const char *path, bool *explicit_keys)
{
    FILE *const f = fopen(path, "r");
    if (!f) RETURN_ERR(VD_EIO, "cannot open config file '%s': %s", path, strerror(errno));
    struct ini_ctx x = {.c = c, .explicit_keys = explicit_keys, .f = f};
    int const line = ini_parse_stream(ini_read_line, &x, ini_on_value, &x);
    bool const read_error = ferror(f) != 0;
    fclose(f);
    if (read_error) RETURN_ERR(VD_EIO, "cannot read config file '%s'", path);
    if (line < 0) RETURN_ERR(VD_ENOMEM, "%s: the INI parser ran out of memory", path);
    if (line == 0) return 0;
    if (line == x.err_line) RETURN_ERR(x.err_code, "%s:%d: %s", path, line, x.err.msg);
    RETURN_ERR(VD_EFORMAT,
               "%s:%d: syntax error: expected '[section]', 'key = value' or a comment", path,
               line);
}

static int apply_overrides(struct launch_config *c, int argc, char *const *argv,
                           bool *explicit_keys)
{
    for (int i = 0; i < argc; i++) {
        const char *const arg = argv[i];
        char name[256];
        const char *value;
        const char *const eq = strchr(arg, '=');
        size_t const nlen = eq ? (size_t)(eq - arg) : strlen(arg);
        RETURN_IF(strncmp(arg, "--", 2) != 0 || nlen <= 2 || nlen - 2 >= sizeof name,
                  VD_EINVAL,
                  "command line: argument '%.200s' is not an option of the form "
                  "--section.key=value",
                  arg);
        memcpy(name, arg + 2, nlen - 2);
        name[nlen - 2] = '\0';
        if (eq) {
            value = eq + 1;
        } else {
            RETURN_IF(i + 1 >= argc, VD_EINVAL,
                      "command line: argument '%s' needs a value: --%s=VALUE or --%s VALUE",
                      arg, name, name);
            value = argv[++i];
        }
        if (!strchr(name, '.')) {
            const struct key_def *const near = key_suggest(name);
            RETURN_IF(near, VD_EINVAL,
                      "command line: argument '%.200s' names no section: keys are written "
                      "--section.key=value (did you mean '--%s'?)",
                      arg, near->name);
            RETURN_ERR(VD_EINVAL,
                       "command line: argument '%.200s' names no section: keys are written "
                       "--section.key=value",
                       arg);
        }
        struct launch_cfg_err e;
        size_t idx = 0;
        int const rc = key_set(c, name, value, &idx, &e);
        if (rc < 0) RETURN_ERR(rc, "command line: %s", e.msg);
        explicit_keys[idx] = true;
    }
    return 0;
}

/* model.config: the Hugging Face values of the model keys not set explicitly. */
static int apply_hf(struct launch_config *c, const bool *explicit_keys)
{
    struct model_config hf = c->model;
    long long sliding_window;
    struct launch_cfg_err e;
    int const rc = launch_config_read_hf_ex(&hf, c->model_config_path, &sliding_window, &e);
    if (rc < 0) RETURN_ERR(rc, "model.config: %s", e.msg);
    RETURN_IF(sliding_window >= 0 && sliding_window < c->train.seq_len, VD_EINVAL,
              "model.config: %s: sliding_window = %lld is smaller than train.seq_len = %d: "
              "sliding window attention is not supported (sliding_window must be null or "
              ">= seq_len)",
              c->model_config_path, sliding_window, c->train.seq_len);
    size_t const begin = offsetof(struct launch_config, model);
    size_t const end = begin + sizeof c->model;
    for (size_t i = 0; i < KEY_COUNT; i++) {
        const struct key_def *const k = &key_table[i];
        if (k->offset == NO_FIELD || k->offset < begin || k->offset >= end || explicit_keys[i])
            continue;
        memcpy((char *)c + k->offset, (const char *)&hf + (k->offset - begin), k->size);
    }
    return 0;
}

int launch_config_load(struct launch_config *c, const char *path, int argc,
                       char *const *argv)
{
    /* Built aside and copied at the end: a failed load leaves *c as it was. */
    struct launch_config next;
    launch_config_defaults(&next);
    bool explicit_keys[KEY_COUNT] = {false};
    if (path) FORWARD_IF(load_ini(&next, path, explicit_keys));
    FORWARD_IF(apply_overrides(&next, argc, argv, explicit_keys));
    if (next.model_config_path[0]) FORWARD_IF(apply_hf(&next, explicit_keys));
    if (next.parallel.etp == 0) next.parallel.etp = next.parallel.tp;
    FORWARD_IF(launch_config_validate(&next));
    *c = next;
    return 0;
}
