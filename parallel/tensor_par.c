/* Tensor-parallel pieces shared by the layers: the vocabulary-parallel cross-entropy. */
#include <math.h>
#include <string.h>

#include "parallel/parallel_internal.h"

double par_vocab_crossentropy(struct par_model *pm, struct par_acts *a, int v_begin, size_t Vl)
{
    size_t const N = pm->shape.N;
    const struct dist_group *tp = &pm->groups.tp;
    float *local_max = pm->scr.ce_max, *tlogit = pm->scr.ce_target;
    model_softmax_stats(a->rowmax, a->rowsum, a->logits, N, Vl);
    model_target_logits(tlogit, a->logits, a->targets, N, Vl, v_begin);
    /* Combine (max, sum of exp) over the vocabulary slices: sum_r s_r exp(m_r - m). */
    memcpy(local_max, a->rowmax, N * sizeof(float));
    dist_allreduce_max(tp, DIST_TP, a->rowmax, N);
    for (size_t t = 0; t < N; t++) a->rowsum[t] *= expf(local_max[t] - a->rowmax[t]);
    dist_allreduce_sum(tp, DIST_TP, a->rowsum, N);
    dist_allreduce_sum(tp, DIST_TP, tlogit, N);
    double loss = 0.0;
    for (size_t t = 0; t < N; t++)
        loss += (double)logf(a->rowsum[t]) + a->rowmax[t] - tlogit[t];
    dist_allreduce_sum_f64(&pm->groups.cp, DIST_CP, &loss, 1); /* the other rows */
    return loss / (double)pm->shape.Nmb;
}
