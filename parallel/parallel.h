/* parallel/: where compute meets communication. The rank's share of the model (its
 * parameter table and flat buffers), the transformer's layers as forward/backward pairs
 * over process groups, the token dispatcher, the attention seam, the schedule of a step,
 * gradient reduction and the optimizer step.
 *
 * The serial run is this code with every group of size one. A stage runs its slice of an
 * ordered list of layers (par_layer) for one micro-batch at a time, forward or backward,
 * and a schedule decides the order. State is split by lifetime: persistent (par_model),
 * per micro-batch in flight (par_acts), and scratch valid inside one stage call
 * (par_scratch).
 *
 * Error rule: set-up functions that can fail on input return 0 or a negative VD_E* code
 * (base/base.h); per-step functions cannot fail on input and check programming errors
 * only. */
#ifndef VDIST_PARALLEL_H
#define VDIST_PARALLEL_H

#include "dist/dist.h"
#include "model/model.h"
#include "parallel/pp_order.h"

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
/* The pipeline split: layers of each of the pp x vpp model chunks, in layer order, into
 * chunk_layers[pp vpp]; pp_layers (NULL: an even split) gives them explicitly. 0, or
 * VD_EINVAL naming the sizes when they do not divide or do not add up. */
int par_pp_split(int num_layers, int pp, int vpp, const int *pp_layers, int n_pp_layers,
                 int *chunk_layers);
/* This rank's share of the model under the grid (sizes, ranks, its model chunks: global
 * chunk c lives on pipeline rank c mod pp as its virtual chunk c div pp). chunk_layers from
 * par_pp_split. */
void par_layout_from_grid(struct model_layout *lay, const struct dist_grid *grid, int rank,
                          int vpp, const int *chunk_layers);

struct par_shape {
    int B, T;    /* sequences of a micro-batch, positions each */
    size_t Nmb;  /* tokens of the micro-batch: B T */
    int Tl;      /* positions of each sequence this context-parallel rank holds: T / cp, its
                    chunks r and 2 cp - 1 - r of T / (2 cp) positions (zigzag) */
    size_t N;    /* rows of this context-parallel rank (gathered over tp): B Tl */
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
    float *att;                    /* (N, Hl hd) */
    float *lse;                    /* (N, Hl): log-sum-exp of each query row's scores */
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
    const uint64_t *peer_x_perm;   /* (etp ep): every rank's x_perm of this layer in the same
                                      activation set (direct writes of the dispatch) */
    /* routing and dispatch statistics of this micro-batch */
    long dropped;                  /* assignments of the micro-batch dropped */
    long tokens_max;               /* most assignments kept by one expert */
    double dispatch_s;             /* dispatch time, forward and backward */
    float margin;                  /* smallest probability gap behind a routing or dropping
                                      decision (+inf: none) */
};

/* Losses of one micro-batch's forward over this stage's layers (each layer's dispatch
 * statistics are in its par_block_acts). */
struct par_mb_stats {
    double lm_loss, aux_loss, z_loss;
};

/* Everything one micro-batch keeps from its forward until its backward on one model chunk
 * of this rank: a schedule allocates as many as it keeps (chunk, micro-batch) pairs in
 * flight. Sized for the rank's largest chunk, so a set serves any chunk. One allocation. */
struct par_acts {
    int chunk;                     /* the rank's model chunk (virtual stage) it serves now;
                                      set before the forward */
    int *inputs, *targets, *pos;   /* (N) */
    float *resid;                  /* (L_c + 1, Ns, d): block inputs and the last output */
    struct par_block_acts *blocks; /* (L_c): the chunk's blocks */
    float *hn_loc, *rstd_f, *hn, *logits, *rowmax, *rowsum; /* head (last stage only) */
    struct par_mb_stats stats;     /* losses of the forward */
    uint64_t *peer_x_perm;         /* (L_c, etp ep), behind blocks[l].peer_x_perm */
    void *base;
};

/* Working memory of the layer calls, valid only inside one stage forward or backward call
 * (nothing in it survives to the next call, so a schedule may run the forward of one
 * micro-batch between the backwards of others). Each view has one use and one type. */
struct par_scratch {
    /* forward */
    float *embed_rows;    /* (N, d): this tp rank's vocabulary slice of the embedding rows */
    float *attn_proj;     /* (N, d): o_proj partial sums before the reduce-scatter */
    float *router_logits; /* (Ns, E) */
    float *moe_out;       /* (Ns, d): the weighted expert sum of the local rows */
    float *ce_max, *ce_target; /* (N): this slice's softmax max and target logit */
    /* backward */
    float *dh;            /* (Ns, d): gradient of the residual stream at the current layer */
    float *dnorm;         /* (Ns, d): gradient at a norm's output */
    float *dgathered;     /* (N, d): a gradient gathered over tp */
    float *da;            /* (N, d): gradient at the attention input */
    float *dlogits;       /* (N, V_l) */
    float *dq, *dk, *dv, *datt; /* (N, Hl hd), (N, Gl hd) x2, (N, Hl hd) */
    float *drouter;       /* (Ns, E): gradient at the router logits */
    float *dtopk_w;       /* (Ns, k) */
    float *dx_perm, *dy_perm; /* (R, d) */
    float *expert_ws;     /* (R, 2 F_l): model_expert_backward's workspace */
    float *attn_ws;       /* model_flash_scratch_floats: the attention kernels' */
    float *attn_delta;    /* (N, Hl): the attention backward's row term */
    float *kv_ring;       /* p2p: (2, 2 N Gl hd) the key/value block held and the next one;
                             allgather: (cp, 2 N Gl hd) every rank's */
    float *dkv_ring;      /* p2p: (2, 2 N Gl hd) their gradients arriving and leaving;
                             allgather: (cp, 2 N Gl hd) */
    float *dkv_part;      /* (2 N Gl hd): this rank's contribution to the held block's */
    float *aux_coef;      /* (E): d aux / d p_te per expert */
    /* the capacity decision over the micro-batch */
    int *gathered_token;  /* (N): micro-batch token of each gathered row */
    int *gathered_topk;   /* (N, k) in gathered row order */
    float *gathered_probs;/* (N, E) in gathered row order */
    int *full_topk;       /* (N, k) in token order */
    float *full_probs;    /* (N, E) */
    unsigned char *full_kept; /* (N k) */
    int *by_expert;       /* (N k): assignments grouped by expert (probs drop policy) */
    size_t *expert_counts;/* (2 (E + 1)) */
    double *router_sums;  /* (2 E + 1) */
    /* the dispatchers' exchanges */
    float *xsend;         /* (Ns k, max(d, etp ep)): packed send rows; gathered dw */
    float *xrecv;         /* (etp, Ns k, d): returned partial gradient rows */
    float *xgather;       /* (Ng, d): rows gathered over etp x ep (all-gather dispatcher) */
    int *send_fill;       /* (E + 1): next send row per expert */
    int *xplan;           /* (E + 1 + E_local etp ep + 1) all-to-all plan */
    MPI_Request *xreqs;   /* (2 E_local etp ep) all-to-all pieces */
    bool *xpack;          /* (ep) all-to-all rows packed per ep coordinate */
    void *base;
};

struct par_hparams {
    float lr, beta1, beta2, eps, weight_decay, clip;
};

struct par_options {
    bool distributed_optimizer; /* ZeRO-1: optimizer state sharded over the replicas */
    bool cp_allgather;          /* context parallelism: all-gather keys and values over cp
                                   instead of passing them around the ring */
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

/* One model chunk of the rank: its slice of the layer list and of the local blocks. */
struct par_chunk {
    int first, count;   /* par_model.layers[first, first + count) */
    int block0, nblocks;/* its transformer blocks: local indices [block0, block0 + nblocks) */
    int layer0;         /* global index of its first block */
    bool has_embed, has_head;
};

/* The rank's persistent share of the model (parallel/state.c): layout, groups, table,
 * flat parameters, gradients and optimizer state, this stage's layer list, the scratch of
 * the layer calls. Activations live in par_acts, one per micro-batch in flight. */
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

    struct par_layer *layers; /* the ordered list of this rank's layers, chunk by chunk */
    int nlayers;
    struct par_chunk chunks[MODEL_CHUNKS_MAX];
    int nchunks;
    int *row_token;           /* (Ns): index in the micro-batch (b T + position) of each row */
    int *cp_token;            /* (N): the same for each row of this context-parallel rank */
    int *etpep_ep, *etpep_etp;/* (etp ep): coordinates of each rank of the etp x ep group */
    int *etpep_of;            /* (etp ep): group rank at (etp coordinate a, ep b), a + etp b */
    float *rope_cos, *rope_sin; /* (T, hd / 2) */
    struct dist_direct direct;/* over etp x ep: which ranks take direct writes */
    bool identity_experts;    /* tests only: experts return their input (exact round trips) */
    /* gradient reductions started during the backward, waited for by the optimizer step */
    MPI_Request *reqs;        /* (2 layers + 2) */
    int nreqs;
    size_t req_nbytes;

    struct par_scratch scr;
    size_t act_nbytes;        /* one par_acts */
    size_t scratch_nbytes;
};

/* Allocates the rank's share for micro-batches of B sequences of T positions. 0 or
 * VD_EINVAL when the layout does not divide the model. */
int par_model_init(struct par_model *pm, const struct model_config *cfg,
                   const struct model_layout *lay, const struct par_groups *groups,
                   const struct par_options *opt, int B, int T);
void par_model_free(struct par_model *pm);

/* One micro-batch's activation set (serving chunk 0 until told otherwise). Collective over
 * the etp x ep group (every rank learns where the others' expert blocks are), so every rank
 * of a stage allocates its sets in the same order. */
void par_acts_init(struct par_acts *a, const struct par_model *pm);
void par_acts_free(struct par_acts *a);

/* A stage's forward of one micro-batch over the layers of the model chunk a serves.
 * inputs and targets (B, T) of the whole micro-batch (each rank takes its share): the
 * first chunk embeds inputs, the last takes its loss against targets. h_in (Ns, d): the
 * residual stream from the previous chunk (NULL on the first); h_out (Ns, d): this chunk's
 * output for the next (NULL on the last). Losses of the chunk's layers in a->stats. */
void par_stage_forward(struct par_model *pm, struct par_acts *a, const int *inputs,
                       const int *targets, const float *h_in, float *h_out);
/* The backward of the micro-batch whose forward filled a: dh_out (Ns, d) the gradient of
 * the chunk's output (NULL on the last chunk, which starts at its loss), dh_in (Ns, d) the
 * gradient of its input (NULL on the first).
 * Gradients accumulate, scaled by loss_scale
 * (1 / micro-batches of the step). With reduce, each layer's gradient buckets start
 * reducing as soon as its backward is done (the step's last micro-batch, no distributed
 * optimizer). */
void par_stage_backward(struct par_model *pm, struct par_acts *a, const float *dh_out,
                        float *dh_in, float loss_scale, bool reduce);

/* The micro-batches of one step as the schedule asks for them: fills inputs and targets
 * (B, T) of micro-batch m of the step (0 <= m < n_micro, the global index). */
struct par_batches {
    void (*fill)(void *ctx, int m, int *inputs, int *targets);
    void *ctx;
    int n_micro; /* micro-batches of the global batch, over all replicas */
};

/* Per MoE layer over a step's micro-batches and replicas. */
struct par_layer_stats {
    double tokens_max, tokens_mean, dropped_frac, dispatch_ms;
    double margin; /* smallest decision margin over the step's micro-batches (-1: none) */
};

/* What one step's forwards and backwards give back: losses (means over the global
 * batch's micro-batches) and per-layer statistics of every MoE layer of the model
 * (gathered from all pipeline stages), identical on every rank. */
struct par_step_stats {
    double lm, aux, z;
    int nlayers;
    struct par_layer_stats *layers; /* (nlayers), owned by the schedule */
    double step_s;                  /* this rank's forwards and backwards, wall time */
    double wait_s;                  /* of which blocked on pipeline receives */
};

/* How a step's micro-batches go through the pipeline (parallel/pp_order.h). */
struct par_pipeline {
    enum par_pp_schedule kind;
    int m; /* micro-batches per step on each data-parallel replica */
};

/* The schedule (parallel/schedule.c): runs the forwards and backwards of one step's
 * micro-batches on this rank (its replica's share) in the pipeline order of its stage,
 * exchanging the residual stream and its gradient with the neighbouring stages by
 * non-blocking point-to-point messages in the pp group; gradients accumulate, the
 * optimizer step follows. Holds the activation sets (as many as the order keeps in
 * flight), the message buffers and the micro-batch buffers. */
struct par_send {
    float *buf;        /* (Ns, d) */
    MPI_Request req;
};
struct par_schedule {
    struct par_pipeline pipe;
    struct par_pp_op *ops;        /* (2 m vpp): this stage's order */
    int nops;
    struct par_acts *acts;        /* as many as the order keeps in flight */
    int nacts;
    size_t act_nbytes;            /* all activation sets */
    int *set_of;                  /* (vpp m): set of (chunk, micro-batch) in flight, or -1 */
    bool *set_busy;               /* (nacts) */
    float *recv_buf;              /* (2, Ns, d): the next two messages' landing places */
    MPI_Request recv_req[2];
    struct par_send *sends;       /* outgoing messages; a buffer is reused once its send is
                                     done, and the pool grows while none is */
    int nsends;
    int *inputs, *targets;        /* (B, T) of the micro-batch being fed */
    double *layer_sums;           /* (2 L + 1): per layer of the model, dropped assignments,
                                     then dispatch milliseconds */
    float *layer_max;             /* (2 L + 1): most kept by one expert, -margin */
    struct par_layer_stats *layer_stats;
};
/* 0, or VD_EINVAL (par_pp_check's message) when the order cannot run. */
int par_schedule_init(struct par_schedule *s, const struct par_model *pm,
                      const struct par_pipeline *pipe);
void par_schedule_free(struct par_schedule *s);
void par_schedule_step(struct par_schedule *s, struct par_model *pm,
                       const struct par_batches *batches, struct par_step_stats *out);

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

/* The attention seam: every block's core attention (after q/k/v and RoPE, before o_proj)
 * goes through these, context parallelism's ring or all-gather over the cp group included
 * (parallel/attention.c). */
/* att (N, Hl hd) and lse (N, Hl) from q, k, v (post-RoPE) of ba. */
void par_attention_forward(struct par_model *pm, struct par_block_acts *ba);
/* dq, dk, dv (overwritten) from datt. */
void par_attention_backward(struct par_model *pm, const struct par_block_acts *ba,
                            const float *datt, float *dq, float *dk, float *dv);

/* Per-kind wall time of the last forward and backward, for the benchmark's split. */
enum par_timer { PAR_T_ATTN, PAR_T_ROUTER, PAR_T_EXPERTS, PAR_T_DISPATCH, PAR_T_OTHER,
                 PAR_T_COUNT };
extern double par_timers[PAR_T_COUNT];
const char *par_timer_name(enum par_timer t);

#endif
