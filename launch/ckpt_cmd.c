/* `vdist ckpt`: look at, check and convert checkpoints without training. */
#include <jansson.h>
#include <string.h>

#include "dist/dist.h"
#include "launch/launch_internal.h"

static int usage(FILE *out, int code)
{
    fprintf(out,
            "usage: vdist ckpt inspect DIR       step, layout, tensors, sizes, compression\n"
            "       vdist ckpt verify DIR        every checksum, every region covered once\n"
            "       vdist ckpt latest ROOT       the latest complete checkpoint under ROOT\n"
            "       vdist ckpt export DIR OUT    Hugging Face safetensors shards,\n"
            "                                    model.safetensors.index.json and config.json\n");
    return code;
}

/* config.json of the model a checkpoint was trained with (its manifest's config). */
static int write_model_config(const char *dir, const char *out_dir)
{
    char path[LAUNCH_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    RETURN_IF(!root, VD_EFORMAT, "%s: %s (line %d)", path, jerr.text, jerr.line);
    json_t *cfg = json_object_get(root, "config");
    struct launch_config c;
    launch_config_defaults(&c);
    int rc = json_is_object(cfg) ? 0
                                 : vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                                              "%s holds no configuration object", path);
    const char *key;
    json_t *v;
    json_object_foreach(cfg, key, v)
    {
        if (rc != 0 || strncmp(key, "model.", 6) != 0 || strcmp(key, "model.config") == 0)
            continue;
        char text[256];
        if (json_is_string(v)) snprintf(text, sizeof text, "%s", json_string_value(v));
        else if (json_is_integer(v)) snprintf(text, sizeof text, "%lld", (long long)json_integer_value(v));
        else if (json_is_real(v)) snprintf(text, sizeof text, "%.17g", json_real_value(v));
        else if (json_is_boolean(v)) snprintf(text, sizeof text, "%s", json_is_true(v) ? "true" : "false");
        else continue;
        /* a dropless model stores capacity 0, which the key spells as empty */
        if (strcmp(key, "model.moe_capacity_factor") == 0 && json_number_value(v) == 0.0) text[0] = '\0';
        rc = launch_config_set(&c, key, text);
    }
    json_decref(root);
    FORWARD_IF(rc);
    snprintf(path, sizeof path, "%s/config.json", out_dir);
    FORWARD_IF(launch_config_write_hf(&c.model, path));
    return 0;
}

int launch_ckpt_main(int argc, char **argv)
{
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0))
        return usage(stdout, 0);
    const char *cmd = argc >= 3 ? argv[1] : "";
    bool const export = strcmp(cmd, "export") == 0 && argc == 4;
    if (!export && argc != 3) return usage(stderr, 2);
    dist_init(&argc, &argv);
    char dir[LAUNCH_PATH_MAX] = "";
    int rc = 0;
    if (strcmp(cmd, "inspect") == 0) {
        rc = ckpt_inspect(argv[2], stdout);
    } else if (strcmp(cmd, "verify") == 0) {
        rc = ckpt_verify(argv[2], stdout);
    } else if (strcmp(cmd, "latest") == 0) {
        bool fell_back = false;
        rc = ckpt_latest_ex(argv[2], dir, sizeof dir, &fell_back);
        if (rc == 0) printf("%s%s\n", dir[0] ? dir : "(no complete checkpoint)",
                            fell_back ? " (the latest pointer was not usable)" : "");
    } else if (export) {
        rc = ckpt_export_hf_sharded(argv[2], argv[3], (size_t)2 << 30);
        if (rc == 0) rc = write_model_config(argv[2], argv[3]);
        if (rc == 0) printf("exported %s to %s\n", argv[2], argv[3]);
    } else {
        dist_finalize();
        return usage(stderr, 2);
    }
    if (rc < 0) fprintf(stderr, "vdist: error: %s\n", vd_err_msg());
    dist_finalize();
    return rc < 0 ? 1 : 0;
}
