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
/* Decides which assignments are kept (capacity over the whole micro-batch), lays out the
 * expert-major permutation (ba->slot_pos, perm_src, expert_off) and returns its rows. */
size_t par_dispatch_plan(struct par_model *pm, struct par_block_acts *ba,
                         struct par_mb_stats *st);
/* x_perm (rows, d) = the normalised token rows in expert-major order. */
void par_dispatch_gather(struct par_model *pm, struct par_block_acts *ba, size_t rows);
/* h_out (N, d) += sum over kept slots of w * y_perm. */
void par_dispatch_combine(struct par_model *pm, struct par_block_acts *ba, float *h_out);
/* dy_perm = w * dh_out of each kept slot; dtopk_w = <dh_out, y> (0 for dropped slots). */
void par_dispatch_combine_backward(struct par_model *pm, struct par_block_acts *ba,
                                   const float *dh_out, float *dy_perm, float *dtopk_w);
/* dm (N, d) = sum over kept slots of dx_perm rows (overwritten). */
void par_dispatch_gather_backward(struct par_model *pm, struct par_block_acts *ba, float *dm);

/* Mean cross-entropy of pm->logits (N, V_l, this rank's vocabulary slice) against
 * pm->targets, with the softmax statistics combined over the tensor group; leaves the
 * global row max and sum in pm->rowmax, pm->rowsum. */
double par_vocab_crossentropy(struct par_model *pm, int v_begin, size_t Vl);

#endif
