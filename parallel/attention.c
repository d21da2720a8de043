/* The attention seam: the one place a transformer block's core attention is computed.
 * Today every layout runs the whole sequence of each micro-batch on one rank (the kernel
 * of model/); context parallelism dispatches from here to its ring over the CP group. */
#include "parallel/parallel_internal.h"

void par_attention_forward(struct par_model *pm, struct par_block_acts *ba)
{
    const struct model_config *c = &pm->cfg;
    int const hd = c->hidden_size / c->num_attention_heads;
    int const Hl = c->num_attention_heads / pm->lay.tp, Gl = c->num_key_value_heads / pm->lay.tp;
    model_attention_forward(ba->att, ba->probs, ba->q, ba->k, ba->v, pm->shape.B, pm->shape.T,
                            Hl, Gl, hd);
}

void par_attention_backward(struct par_model *pm, const struct par_block_acts *ba,
                            const float *datt, float *dq, float *dk, float *dv)
{
    const struct model_config *c = &pm->cfg;
    int const hd = c->hidden_size / c->num_attention_heads;
    int const Hl = c->num_attention_heads / pm->lay.tp, Gl = c->num_key_value_heads / pm->lay.tp;
    model_attention_backward(dq, dk, dv, datt, ba->probs, ba->q, ba->k, ba->v, pm->shape.B,
                             pm->shape.T, Hl, Gl, hd, pm->scr.attn_ws);
}
