/* Shared between the files of parallel/ only: the pieces the layers call. */
#ifndef VDIST_PARALLEL_INTERNAL_H
#define VDIST_PARALLEL_INTERNAL_H

#include "parallel/parallel.h"

/* Rows of the permuted expert block this rank may receive in one micro-batch. */
size_t par_moe_rows_max(const struct par_model *pm);

/* Aux and z losses of one MoE layer from the router's output; c_e saved in ba->counts.
 * Statistics are summed over the ranks that hold the micro-batch's tokens. */
void par_router_losses(struct par_model *pm, struct par_block_acts *ba,
                       struct par_mb_stats *st);
/* The capacity decision over the whole micro-batch (gathered over tp x cp): ba->kept for
 * the local slots, the layer's dropped and per-expert statistics. */
void par_moe_decide(struct par_model *pm, struct par_block_acts *ba, struct par_mb_stats *st);
/* out (Ns, d) = sum over the local rows' kept slots of w * expert(m), through the
 * configured dispatcher. */
void par_moe_dispatch_forward(struct par_model *pm, struct par_block_acts *ba,
                              const struct model_layer_ptrs *w, float *out);
/* From dout (Ns, d): dm (Ns, d, overwritten), dtopk_w (Ns, k; 0 for dropped slots) and the
 * local experts' weight gradients (accumulated). */
void par_moe_dispatch_backward(struct par_model *pm, struct par_block_acts *ba,
                               const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                               const float *dout, float *dm, float *dtopk_w);

/* Mean cross-entropy of pm->logits (N, V_l, this rank's vocabulary slice) against
 * pm->targets, with the softmax statistics combined over the tensor group; leaves the
 * global row max and sum in pm->rowmax, pm->rowsum. */
double par_vocab_crossentropy(struct par_model *pm, int v_begin, size_t Vl);

#endif
