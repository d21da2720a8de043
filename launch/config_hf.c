/* The Hugging Face config.json bridge: the model keys of a MixtralForCausalLM config.json
 * are read for model.config (config.c's loader decides which of them apply) and written
 * with every export (train.export_to, `vdist ckpt export`). Messages go through a struct
 * launch_cfg_err, as in config.c. */
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "launch/launch_internal.h"

static const struct {
    const char *name;
    size_t offset;
} hf_ints[] = {
    {"vocab_size", offsetof(struct model_config, vocab_size)},
    {"hidden_size", offsetof(struct model_config, hidden_size)},
    {"intermediate_size", offsetof(struct model_config, intermediate_size)},
    {"num_hidden_layers", offsetof(struct model_config, num_hidden_layers)},
    {"num_attention_heads", offsetof(struct model_config, num_attention_heads)},
    {"num_key_value_heads", offsetof(struct model_config, num_key_value_heads)},
    {"num_local_experts", offsetof(struct model_config, num_local_experts)},
    {"num_experts_per_tok", offsetof(struct model_config, num_experts_per_tok)},
};

/* vdist's training-only keys are written too (Hugging Face keeps unknown keys as
 * attributes), so an exported model trains on with the same losses. */
static const struct {
    const char *name;
    size_t offset;
} hf_reals[] = {
    {"rope_theta", offsetof(struct model_config, rope_theta)},
    {"rms_norm_eps", offsetof(struct model_config, rms_norm_eps)},
    {"router_aux_loss_coef", offsetof(struct model_config, router_aux_loss_coef)},
    {"router_z_loss_coef", offsetof(struct model_config, router_z_loss_coef)},
};

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "unknown";
}

static int hf_wrong_type(struct launch_cfg_err *e, const char *path, const char *key,
                         const json_t *v, const char *expected)
{
    char *const text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    int const rc = launch_cfg_fail(e, VD_EINVAL, "%s: key '%s' = %.100s is %s; expected %s",
                                   path, key, text ? text : "?", json_type_name(v), expected);
    free(text);
    return rc;
}

static int hf_get_int(struct launch_cfg_err *e, const char *path, const json_t *root,
                      const char *key, int *out)
{
    const json_t *const v = json_object_get(root, key);
    if (!v) return 0;
    if (!json_is_integer(v)) return hf_wrong_type(e, path, key, v, "an integer");
    json_int_t const x = json_integer_value(v);
    if (x < INT_MIN || x > INT_MAX)
        return launch_cfg_fail(e, VD_EINVAL, "%s: key '%s' = %lld does not fit in a 32-bit int",
                               path, key, (long long)x);
    *out = (int)x;
    return 0;
}

/* Reads the model keys into *m (keys absent from the file leave m's value), and the
 * sliding window (-1 when absent or null) for the caller to check against seq_len. */
int launch_config_read_hf_ex(struct model_config *m, const char *path, long long *sliding_window,
                             struct launch_cfg_err *e)
{
    FILE *const f = fopen(path, "rb");
    if (!f)
        return launch_cfg_fail(e, VD_EIO, "cannot open Hugging Face config '%s': %s", path,
                               strerror(errno));
    json_error_t jerr;
    json_t *const root = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
    fclose(f);
    if (!root)
        return launch_cfg_fail(e, VD_EFORMAT, "%s:%d:%d: invalid JSON: %s", path, jerr.line,
                               jerr.column, jerr.text);
    int rc = 0;
    struct model_config r = *m;
    *sliding_window = -1;
    if (!json_is_object(root)) {
        rc = launch_cfg_fail(e, VD_EFORMAT, "%s: expected a JSON object at the top level, found %s",
                             path, json_type_name(root));
        goto done;
    }

    for (size_t i = 0; i < sizeof hf_ints / sizeof hf_ints[0]; i++) {
        int *const dst = (int *)((char *)&r + hf_ints[i].offset);
        /* Hugging Face reads a null num_key_value_heads as num_attention_heads. */
        if (strcmp(hf_ints[i].name, "num_key_value_heads") == 0 &&
            json_is_null(json_object_get(root, hf_ints[i].name))) {
            *dst = r.num_attention_heads;
            continue;
        }
        if ((rc = hf_get_int(e, path, root, hf_ints[i].name, dst)) < 0) goto done;
    }
    for (size_t i = 0; i < sizeof hf_reals / sizeof hf_reals[0]; i++) {
        const json_t *const v = json_object_get(root, hf_reals[i].name);
        if (!v) continue;
        if (!json_is_number(v)) {
            rc = hf_wrong_type(e, path, hf_reals[i].name, v, "a number");
            goto done;
        }
        *(double *)((char *)&r + hf_reals[i].offset) = json_number_value(v);
    }

    const json_t *v = json_object_get(root, "moe_capacity_factor");
    if (v && !json_is_null(v)) {
        if (!json_is_number(v)) {
            rc = hf_wrong_type(e, path, "moe_capacity_factor", v, "a number or null");
            goto done;
        }
        r.moe_capacity_factor = json_number_value(v);
    } else if (v) {
        r.moe_capacity_factor = 0.0;
    }
    if ((v = json_object_get(root, "moe_drop_policy"))) {
        if (!json_is_string(v)) {
            rc = hf_wrong_type(e, path, "moe_drop_policy", v, "\"position\" or \"probs\"");
            goto done;
        }
        const char *const s = json_string_value(v);
        if (strcmp(s, "position") == 0) r.moe_drop_policy = MODEL_DROP_POSITION;
        else if (strcmp(s, "probs") == 0) r.moe_drop_policy = MODEL_DROP_PROBS;
        else {
            rc = launch_cfg_fail(e, VD_EINVAL,
                                 "%s: key 'moe_drop_policy' = \"%.100s\": allowed values are "
                                 "position, probs",
                                 path, s);
            goto done;
        }
    }

    /* Keys that would make the checkpoint a different model than model.md's are refused
     * rather than ignored. */
    if ((v = json_object_get(root, "tie_word_embeddings"))) {
        if (!json_is_boolean(v)) {
            rc = hf_wrong_type(e, path, "tie_word_embeddings", v, "a boolean");
            goto done;
        }
        if (json_is_true(v)) {
            rc = launch_cfg_fail(e, VD_EINVAL,
                                 "%s: tie_word_embeddings = true: tying the input embedding and "
                                 "lm_head weights is not supported; only false is allowed",
                                 path);
            goto done;
        }
    }
    if ((v = json_object_get(root, "sliding_window")) && !json_is_null(v)) {
        if (!json_is_integer(v)) {
            rc = hf_wrong_type(e, path, "sliding_window", v, "an integer or null");
            goto done;
        }
        *sliding_window = json_integer_value(v);
        if (*sliding_window < 0) *sliding_window = 0;
    }
    if ((v = json_object_get(root, "hidden_act"))) {
        if (!json_is_string(v)) {
            rc = hf_wrong_type(e, path, "hidden_act", v, "a string");
            goto done;
        }
        if (strcmp(json_string_value(v), "silu") != 0) {
            rc = launch_cfg_fail(e, VD_EINVAL,
                                 "%s: hidden_act = \"%.100s\" is not supported: the experts use "
                                 "SwiGLU, hidden_act must be \"silu\"",
                                 path, json_string_value(v));
            goto done;
        }
    }
    if ((v = json_object_get(root, "rope_scaling")) && !json_is_null(v)) {
        rc = launch_cfg_fail(e, VD_EINVAL,
                             "%s: rope_scaling is set: RoPE scaling is not supported, it must be "
                             "null or absent",
                             path);
        goto done;
    }
    if ((v = json_object_get(root, "head_dim")) && !json_is_null(v)) {
        int hd = 0;
        if ((rc = hf_get_int(e, path, root, "head_dim", &hd)) < 0) goto done;
        if (r.num_attention_heads < 1 || hd * r.num_attention_heads != r.hidden_size) {
            rc = launch_cfg_fail(e, VD_EINVAL,
                                 "%s: head_dim = %d differs from hidden_size = %d / "
                                 "num_attention_heads = %d: head_dim must be hidden_size / "
                                 "num_attention_heads",
                                 path, hd, r.hidden_size, r.num_attention_heads);
            goto done;
        }
    }
    *m = r;
done:
    json_decref(root);
    return rc;
}

int launch_config_read_hf(struct model_config *m, const char *path)
{
    /* The sliding window is checked by launch_config_load, which knows seq_len. */
    long long sliding_window;
    struct launch_cfg_err e;
    int const rc = launch_config_read_hf_ex(m, path, &sliding_window, &e);
    if (rc < 0) RETURN_ERR(rc, "%s", e.msg);
    return 0;
}

/* Fewest significant digits that read back as exactly v, so 1e-05 stays 1e-05. */
static int shortest_digits(double v)
{
    for (int p = 1; p < 17; p++) {
        char buf[40];
        snprintf(buf, sizeof buf, "%.*g", p, v);
        if (strtod(buf, NULL) == v) return p;
    }
    return 17;
}

int launch_config_write_hf(const struct model_config *m, const char *path)
{
    FORWARD_IF(model_config_validate(m));
    json_t *const root = json_object();
    json_t *const arch = json_array();
    json_array_append_new(arch, json_string("MixtralForCausalLM"));
    json_object_set_new(root, "architectures", arch);
    json_object_set_new(root, "model_type", json_string("mixtral"));
    for (size_t i = 0; i < sizeof hf_ints / sizeof hf_ints[0]; i++)
        json_object_set_new(root, hf_ints[i].name,
                            json_integer(*(const int *)((const char *)m + hf_ints[i].offset)));
    json_object_set_new(root, "hidden_act", json_string("silu"));
    json_object_set_new(root, "max_position_embeddings", json_integer(4096));
    json_object_set_new(root, "rope_theta", json_real(m->rope_theta));
    json_object_set_new(root, "rms_norm_eps", json_real(m->rms_norm_eps));
    json_object_set_new(root, "tie_word_embeddings", json_false());
    json_object_set_new(root, "sliding_window", json_null());
    json_object_set_new(root, "attention_dropout", json_real(0.0));
    json_object_set_new(root, "initializer_range", json_real(0.02));
    json_object_set_new(root, "router_aux_loss_coef", json_real(m->router_aux_loss_coef));
    json_object_set_new(root, "router_jitter_noise", json_real(0.0));
    json_object_set_new(root, "output_router_logits", json_false());
    json_object_set_new(root, "use_cache", json_true());
    json_object_set_new(root, "torch_dtype", json_string("float32"));
    json_object_set_new(root, "router_z_loss_coef", json_real(m->router_z_loss_coef));
    json_object_set_new(root, "moe_capacity_factor", m->moe_capacity_factor > 0
                                                         ? json_real(m->moe_capacity_factor)
                                                         : json_null());
    json_object_set_new(root, "moe_drop_policy",
                        json_string(m->moe_drop_policy == MODEL_DROP_PROBS ? "probs"
                                                                           : "position"));

    /* Jansson prints every real with one precision: take the fewest digits that keep each
     * value exact, and at least 7 so that numbers like 10000.0 print without exponent. */
    double const reals[] = {m->rope_theta, m->rms_norm_eps, m->router_aux_loss_coef,
                            m->router_z_loss_coef, m->moe_capacity_factor, 0.02};
    int digits = 7;
    for (size_t i = 0; i < sizeof reals / sizeof reals[0]; i++)
        if (shortest_digits(reals[i]) > digits) digits = shortest_digits(reals[i]);

    char tmp[LAUNCH_PATH_MAX + 32];
    if (vd_tmp_name(tmp, sizeof tmp, path) != 0) {
        json_decref(root);
        RETURN_ERR(VD_EINVAL, "cannot write '%s': the path is too long", path);
    }
    FILE *const f = fopen(tmp, "w");
    if (!f) {
        int const err = errno;
        json_decref(root);
        RETURN_ERR(VD_EIO, "cannot create '%s': %s", tmp, strerror(err));
    }
    bool ok = json_dumpf(root, f, JSON_INDENT(2) | JSON_REAL_PRECISION(digits)) == 0;
    json_decref(root);
    ok = ok && fputc('\n', f) != EOF;
    int err = errno;
    if (ok) {
        enum vd_replace_step failed;
        /* the directory's sync is best effort: the file is complete and in place by then */
        if (vd_replace_stream(f, false, tmp, path, &failed) == 0 ||
            failed >= VD_REPLACE_OPEN_DIR)
            return 0;
        err = errno;
    } else {
        fclose(f);
    }
    unlink(tmp);
    RETURN_ERR(VD_EIO, "cannot write Hugging Face config '%s': %s", path, strerror(err));
}
