/* parallel/: where compute meets communication. The rank's share of the model (its
 * parameter table and flat buffers), the transformer's layers as forward/backward pairs
 * over process groups, the token dispatcher, gradient reduction and the optimizer step.
 *
 * The serial run is this code with every group of size one. A training step is driven
 * per micro-batch over an ordered list of layers (par_layer), so a pipeline schedule can
 * run any stage's slice of that list for any micro-batch.
 *
 * Error rule: set-up functions that can fail on input return 0 or a negative VD_E* code
 * (model.h); per-step functions cannot fail on input and check programming errors only. */
#ifndef VDIST_PARALLEL_H
#define VDIST_PARALLEL_H

#include "dist/dist.h"
#include "model/model.h"

/* Every process group a rank's layers use (both grids of MoE parallel folding). */
struct par_groups {
    struct dist_group tp, cp, dp, dpcp, tpcp, pp; /* attention grid */
    struct dist_group ep, etp, edp, etpep;        /* MoE grid */
};
/* All groups of size one: the serial layout. */
void par_groups_serial(struct par_groups *g);
/* This rank's communicators of every group kind of the grid (collective over the world). */
void par_groups_create(struct par_groups *g, const struct dist_grid *grid);
void par_groups_free(struct par_groups *g);
/* This rank's share of the model under the grid (sizes, ranks, its pipeline stage). */
void par_layout_from_grid(struct model_layout *lay, const struct dist_grid *grid, int rank,
                          int num_layers);

struct par_shape {
    int B, T;    /* sequences of a micro-batch, positions each */
    size_t N;    /* tokens of the micro-batch: B T */
    size_t Ns;   /* rows of the residual stream this rank holds: N / tp (sequence parallel) */
};

/* One layer of the ordered list a step runs. */
enum par_layer_kind { PAR_LAYER_EMBED, PAR_LAYER_BLOCK, PAR_LAYER_HEAD };
struct par_layer {
    enum par_layer_kind kind;
    int layer; /* global transformer layer for PAR_LAYER_BLOCK */
    /* its gradient buckets in the flat buffers: dense [begin, end) reduced over dp x cp,
     * expert [begin, end) over edp (empty when begin == end) */
    size_t dense_begin, dense_end, expert_begin, expert_end;
};

/* Saved-for-backward activations of one transformer block and one micro-batch. Rows are
 * either this rank's Ns rows of the residual stream or all N rows of the micro-batch
 * (gathered over the tensor group); with groups of size one the two coincide. */
struct par_block_acts {
    float *h_mid;                  /* (Ns, d) residual after attention */
    float *a_loc, *rstd1;          /* input_layernorm out (Ns, d), (Ns) */
    float *a;                      /* (N, d) a_loc gathered over tp */
    float *q, *k, *v;              /* post-RoPE (N, Hl hd), (N, Gl hd) */
    float *probs;                  /* (B, Hl, T, T) */
    float *att;                    /* (N, Hl hd) */
    float *m_loc, *rstd2;          /* post_attention_layernorm out (Ns, d), (Ns) */
    float *rprobs, *rtopk_w, *rlse;/* router on local rows (Ns, E), (Ns, k), (Ns) */
    int *rtopk;                    /* (Ns, k) */
    float *counts;                 /* (E): c_e over the micro-batch, for the aux gradient */
    /* dispatcher state (parallel/dispatch.c) */
    unsigned char *kept;           /* (Ns, k): kept after the capacity decision */
    int *slot_row;                 /* (Ns, k): all-to-all send row of each kept slot, or -1 */
    int *send_slot;                /* (Ns k): local slot (row k + j) of each send row */
    float *y_ret;                  /* (etp, Ns k, d): partial expert outputs returned from
                                      each ETP rank, per send row */
    int *counts_matrix;            /* (etp ep, E): kept rows each rank sends to each expert */
    float *w_g;                    /* (Ng, k): gathered weights (all-gather dispatcher) */
    int *topk_g;                   /* (Ng, k) */
    unsigned char *kept_g;         /* (Ng, k) */
    int *sorted_from;              /* (R): gathered token of each expert row (all-gather) */
    int *slot_of;                  /* (R): gathered slot of each expert row (all-gather) */
    int *row_of_slot;              /* (Ng, k): expert row of each gathered slot, or -1 */
    size_t *expert_off;            /* (E_local + 1): rows of each local expert */
    size_t rows, send_rows;        /* expert rows; all-to-all send rows */
    float *x_perm, *h1, *h3, *act, *y_perm; /* (R, d), (R, F_l) x3, (R, d) */
    long dropped;                  /* assignments of the micro-batch dropped (last forward) */
    long tokens_max;               /* most assignments kept by one expert (last forward) */
    double dispatch_s;             /* dispatch time, forward and backward (caller resets) */
    float margin;                  /* smallest probability gap behind a routing or dropping
                                      decision of the last forward (+inf: none) */
};

/* Losses of one micro-batch's forward (each layer's dispatch statistics are in its
 * par_block_acts). */
struct par_mb_stats {
    double lm_loss, aux_loss, z_loss;
};

struct par_hparams {
    float lr, beta1, beta2, eps, weight_decay, clip;
};

struct par_options {
    bool distributed_optimizer; /* ZeRO-1: optimizer state sharded over the replicas */
    bool dispatch_direct;       /* all-to-all forward dispatch writes rows straight into
                                   same-node ranks' expert blocks (dist_direct) */
};

/* A contiguous range of the flat buffers reduced over one group of replicas, and this
 * rank's shard of it under the distributed optimizer. */
struct par_range {
    size_t begin, len;        /* len padded to a multiple of the group size */
    size_t shard_len;         /* len / group size */
    size_t state_offset;      /* where this range's shard starts in the optimizer state */
};

/* The rank's share of the model: table, flat buffers, pointers, activations, scratch. */
struct par_model {
    struct model_config cfg;
    struct model_layout lay;
    struct par_shape shape;
    struct par_groups groups;
    struct par_options opt;
    struct model_table tab;
    /* params, grads: tab.numel floats; adam_m, adam_v: the whole range, or this rank's
     * shards under the distributed optimizer; gshard: reduced gradient shards */
    float *params, *grads, *adam_m, *adam_v, *gshard;
    size_t state_len;
    struct par_range dense, expert; /* reduced over dp x cp, and over edp */
    struct model_ptrs p, g;
    long adam_step;

    int *row_token;           /* (Ns): index in the micro-batch (b T + position) of each row */
    int *etpep_ep, *etpep_etp;/* (etp ep): coordinates of each rank of the etp x ep group */
    int *etpep_of;            /* (etp ep): group rank at (etp coordinate a, ep b), a + etp b */
    bool identity_experts;    /* tests only: experts return their input (exact round trips) */
    /* set by the caller for a step's last micro-batch: without the distributed optimizer,
     * each layer's gradient buckets start reducing as soon as its backward is done */
    bool reduce_in_backward;
    MPI_Request *reqs;        /* (2 layers + 2) reductions in flight */
    int nreqs;
    size_t req_nbytes;
    struct par_layer *layers; /* the ordered list of this stage's layers */
    int nlayers;

    /* activations of one micro-batch */
    int *inputs, *targets, *pos;   /* (N) */
    float *resid;                  /* (L_local + 1, Ns, d): block inputs and the last output */
    struct par_block_acts *blocks;
    float *hn_loc, *rstd_f, *hn, *logits, *rowmax, *rowsum; /* head */
    /* scratch */
    float *dh, *dsmall, *dfull, *dtmp, *dq, *dk, *dv, *datt, *drl, *dtopk_w, *dx_perm,
        *dy_perm, *exp_scratch, *att_scratch;
    float *xsend, *xrecv, *xgather;     /* dispatcher exchange buffers */
    int *full_topk, *full_token;        /* (N k), (N): the micro-batch's routing, gathered */
    float *full_probs;                  /* (N, E) */
    unsigned char *full_kept;           /* (N k) */
    int *sort_scratch;                  /* (N k) */
    int *xplan;                         /* (E + 1 + E_local etp ep + 1) all-to-all plan */
    MPI_Request *xreqs;                 /* (2 E_local etp ep) all-to-all pieces */
    bool *xpack;                        /* (ep) all-to-all rows packed per ep coordinate */
    struct dist_direct direct;          /* over etp x ep: which ranks take direct writes */
    uint64_t *peer_xperm;               /* (local layers, etp ep): every rank's x_perm */
    float *rope_cos, *rope_sin;
    double *router_sums;      /* (2 E + 1) */
    size_t *expert_counts;    /* (3 (E + 1)) */
    float *aux_coef;          /* (E) */
    size_t act_nbytes, scratch_nbytes;
    void *act_base, *scratch_base; /* the two allocations behind the pointers above */
};

/* Allocates the rank's share for micro-batches of B sequences of T positions. 0 or
 * VD_EINVAL when the layout does not divide the model. */
int par_model_init(struct par_model *pm, const struct model_config *cfg,
                   const struct model_layout *lay, const struct par_groups *groups,
                   const struct par_options *opt, int B, int T);
void par_model_free(struct par_model *pm);

/* Forward of one micro-batch over the rank's layers: inputs and targets (B, T) of the
 * whole micro-batch (each rank takes its share). Fills st with losses of the micro-batch. */
void par_forward(struct par_model *pm, const int *inputs, const int *targets,
                 struct par_mb_stats *st);
/* Backward of the micro-batch last run forward; gradients accumulate, scaled by
 * loss_scale (1 / number of micro-batches of the step). */
void par_backward(struct par_model *pm, float loss_scale);

/* After the micro-batches of a step: reduces gradients, clips by the global norm (returns
 * it, before clipping), and takes one AdamW step with lr. Zeroes the gradients after. */
double par_optimizer_step(struct par_model *pm, const struct par_hparams *hp);
void par_zero_grads(struct par_model *pm);
/* The optimizer's shard geometry (parallel/shards.c, its one owner; ckpt/ asks here). */
/* Whether this rank's block of t is the copy its shard group contributes: a tensor
 * replicated over the tensor group (norms, routers) only on that group's rank 0. */
bool par_shard_lead(const struct par_model *pm, const struct model_tensor *t);
/* Whether this rank's block of t is the one copy of it that the layout writes (exports,
 * the gradient norm): replicas beyond rank 0 and tensor ranks of replicated tensors do not. */
bool par_owns_block(const struct par_model *pm, const struct model_tensor *t);
/* Whether this rank writes the whole block of tensor i in a checkpoint (parameters; moments
 * without the distributed optimizer): one replica per tensor, chosen by the tensor's index
 * so the replicas share the work. */
bool par_writes_block(const struct par_model *pm, int i);
/* The moment elements of t this rank holds: block elements [*ea, *eb), element ea stored at
 * adam_m / adam_v + *at. False when it holds none. */
bool par_moment_span(const struct par_model *pm, const struct model_tensor *t, size_t *ea,
                     size_t *eb, size_t *at);

/* The token dispatcher of one MoE layer (ba: that layer's activations, whose router
 * outputs rtopk, rtopk_w, rprobs and rows m_loc are set). */
/* The capacity decision over the whole micro-batch (gathered over tp x cp): ba->kept for
 * the local slots, ba->dropped and ba->tokens_max of the layer. */
void par_moe_decide(struct par_model *pm, struct par_block_acts *ba);
/* out (Ns, d) = sum over the local rows' kept slots of w * expert(m), through the
 * configured dispatcher. */
void par_moe_dispatch_forward(struct par_model *pm, struct par_block_acts *ba,
                              const struct model_layer_ptrs *w, float *out);
/* From dout (Ns, d): dm (Ns, d, overwritten), dtopk_w (Ns, k; 0 for dropped slots) and the
 * local experts' weight gradients (accumulated). */
void par_moe_dispatch_backward(struct par_model *pm, struct par_block_acts *ba,
                               const struct model_layer_ptrs *w, struct model_layer_ptrs *gw,
                               const float *dout, float *dm, float *dtopk_w);

/* Per-kind wall time of the last forward and backward, for the benchmark's split. */
enum par_timer { PAR_T_ATTN, PAR_T_ROUTER, PAR_T_EXPERTS, PAR_T_DISPATCH, PAR_T_OTHER,
                 PAR_T_COUNT };
extern double par_timers[PAR_T_COUNT];
const char *par_timer_name(enum par_timer t);

#endif
