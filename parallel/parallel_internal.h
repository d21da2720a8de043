/* Shared between the files of parallel/ only. Who calls whom, one way: schedule.c drives
 * layers.c (the layer pairs and the stage entry points) and optim.c; layers.c calls
 * attention.c, dispatch.c and tensor_par.c; state.c (the persistent model) calls optim.c to
 * plan and allocate the optimizer state; optim.c and ckpt/ ask shards.c for the geometry. */
#ifndef VDIST_PARALLEL_INTERNAL_H
#define VDIST_PARALLEL_INTERNAL_H

#include "parallel/parallel.h"

/* Rows of the permuted expert block this rank may receive in one micro-batch. */
size_t par_moe_rows_max(const struct par_model *pm);

/* Aux and z losses of one MoE layer from the router's output, added to st; c_e saved in
 * ba->counts. Statistics are summed over the ranks that hold the micro-batch's tokens. */
void par_router_losses(struct par_model *pm, struct par_block_acts *ba,
                       struct par_mb_stats *st);
/* Starts the gradient reduction of one layer's buckets (the step's last micro-batch, no
 * distributed optimizer); par_optimizer_step waits for them. */
void par_reduce_layer_start(struct par_model *pm, const struct par_layer *L);

/* Cross-entropy of a->logits (N, V_l, this rank's vocabulary slice) against a->targets,
 * with the softmax statistics combined over the tensor group; leaves the global row max
 * and sum in a->rowmax, a->rowsum. Returns the micro-batch's mean: the rows of every
 * context-parallel rank summed, over all B T tokens. */
double par_vocab_crossentropy(struct par_model *pm, struct par_acts *a, int v_begin, size_t Vl);

/* Plans the flat ranges and allocates the optimizer state (AdamW moments, reduced-gradient
 * shards) of a model whose table is built; par_optim_free releases them. */
void par_optim_init(struct par_model *pm);
void par_optim_free(struct par_model *pm);

/* Pads the dense and expert ranges of the flat buffers to multiples of their replica groups
 * (so the distributed optimizer reduce-scatters equal shards) and sizes the shards. */
void par_plan_ranges(struct par_model *pm);
/* The group a range is reduced over: dp x cp (dense) or edp (expert). */
const struct dist_group *par_range_group(const struct par_model *pm, const struct par_range *r);
/* First flat index of this rank's shard of range r. */
size_t par_shard_begin(const struct par_model *pm, const struct par_range *r);
/* The part [a, b) of tensor t inside [lo, lo + len) of the flat buffers, relative to lo;
 * false when they do not overlap. */
bool par_tensor_piece(const struct model_tensor *t, size_t lo, size_t len, size_t *a,
                      size_t *b);

#endif
