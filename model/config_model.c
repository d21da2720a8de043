/* The model's configuration: defaults of shared/docs/model.md and the checks that make a
 * configuration computable (every size positive, heads divide the hidden size, ...).
 * Messages name keys as the config file does (`model.<key>`), since that is where a
 * user fixes them. */
#include <math.h>

#include "model/model.h"

void model_config_defaults(struct model_config *cfg)
{
    *cfg = (struct model_config){
        .rope_theta = 10000.0,
        .rms_norm_eps = 1e-5,
        .router_aux_loss_coef = 0.01,
        .router_z_loss_coef = 0.001,
        .moe_capacity_factor = 0.0,
        .moe_drop_policy = MODEL_DROP_POSITION,
    };
}

int model_config_validate(const struct model_config *cfg)
{
    const struct {
        const char *name;
        int value;
    } sizes[] = {
        {"vocab_size", cfg->vocab_size},
        {"hidden_size", cfg->hidden_size},
        {"intermediate_size", cfg->intermediate_size},
        {"num_hidden_layers", cfg->num_hidden_layers},
        {"num_attention_heads", cfg->num_attention_heads},
        {"num_key_value_heads", cfg->num_key_value_heads},
        {"num_local_experts", cfg->num_local_experts},
        {"num_experts_per_tok", cfg->num_experts_per_tok},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        RETURN_IF(sizes[i].value < 1, VD_EINVAL,
                  "model.%s = %d: expected an integer >= 1", sizes[i].name, sizes[i].value);
    /* vocab_size <= 2^31 holds by its type: token ids are int32 everywhere. */

    int const d = cfg->hidden_size, H = cfg->num_attention_heads;
    int const G = cfg->num_key_value_heads;
    RETURN_IF(d % H != 0, VD_EINVAL,
              "model.hidden_size = %d is not divisible by model.num_attention_heads = %d: "
              "hidden_size must be a multiple of num_attention_heads",
              d, H);
    RETURN_IF((d / H) % 2 != 0, VD_EINVAL,
              "model.hidden_size = %d / model.num_attention_heads = %d gives head_dim = %d, "
              "which is odd: RoPE rotates pairs, so head_dim must be even",
              d, H, d / H);
    RETURN_IF(H % G != 0, VD_EINVAL,
              "model.num_attention_heads = %d is not divisible by "
              "model.num_key_value_heads = %d: num_attention_heads must be a multiple of "
              "num_key_value_heads",
              H, G);
    /* the all-to-all dispatcher tells a rank pair's pieces apart by local expert (MPI tags
     * are only guaranteed up to 32767) */
    RETURN_IF(cfg->num_local_experts > MODEL_MAX_EXPERTS, VD_EINVAL,
              "model.num_local_experts = %d: at most %d experts are supported",
              cfg->num_local_experts, MODEL_MAX_EXPERTS);
    RETURN_IF(cfg->num_experts_per_tok > cfg->num_local_experts, VD_EINVAL,
              "model.num_experts_per_tok = %d is larger than model.num_local_experts = %d: "
              "each token needs 1 <= num_experts_per_tok <= num_local_experts",
              cfg->num_experts_per_tok, cfg->num_local_experts);

    RETURN_IF(!(isfinite(cfg->rope_theta) && cfg->rope_theta > 0), VD_EINVAL,
              "model.rope_theta = %g: expected a number > 0", cfg->rope_theta);
    RETURN_IF(!(isfinite(cfg->rms_norm_eps) && cfg->rms_norm_eps > 0), VD_EINVAL,
              "model.rms_norm_eps = %g: expected a number > 0", cfg->rms_norm_eps);
    RETURN_IF(!(isfinite(cfg->router_aux_loss_coef) && cfg->router_aux_loss_coef >= 0),
              VD_EINVAL, "model.router_aux_loss_coef = %g: expected a number >= 0",
              cfg->router_aux_loss_coef);
    RETURN_IF(!(isfinite(cfg->router_z_loss_coef) && cfg->router_z_loss_coef >= 0),
              VD_EINVAL, "model.router_z_loss_coef = %g: expected a number >= 0",
              cfg->router_z_loss_coef);
    RETURN_IF(!(isfinite(cfg->moe_capacity_factor) && cfg->moe_capacity_factor >= 0),
              VD_EINVAL,
              "model.moe_capacity_factor = %g: expected a number > 0 (or 0 for dropless)",
              cfg->moe_capacity_factor);
    RETURN_IF(cfg->moe_drop_policy != MODEL_DROP_POSITION &&
                  cfg->moe_drop_policy != MODEL_DROP_PROBS,
              VD_EINVAL, "model.moe_drop_policy = %d: allowed values are position, probs",
              (int)cfg->moe_drop_policy);
    return 0;
}
