/* model/: pure compute, no MPI. The exact model of shared/docs/model.md on one rank's
 * shards: kernels, router, experts, parameter table, initialisation, AdamW.
 *
 * Error rule (base.h's): functions that can fail on input (a config, a layout) return 0
 * or a negative VD_E* code and record a message (vd_err_msg). Kernels cannot fail on
 * input: their preconditions are programming errors, checked with VD_CHECK, which aborts.
 * Kernels and layers never allocate: callers pass outputs and scratch.
 * Parameter gradients accumulate (+=); the caller zeroes them. */
#ifndef VDIST_MODEL_H
#define VDIST_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

/* ---------------------------------------------------------------- model config */

enum model_drop_policy { MODEL_DROP_POSITION = 0, MODEL_DROP_PROBS = 1 };
enum model_dispatcher { MODEL_DISPATCH_ALLTOALL = 0, MODEL_DISPATCH_ALLGATHER = 1 };

enum { MODEL_MAX_EXPERTS = 16384 }; /* model.num_local_experts, checked by validate */

struct model_config {
    int vocab_size;        /* V */
    int hidden_size;       /* d */
    int intermediate_size; /* F */
    int num_hidden_layers; /* L */
    int num_attention_heads; /* H */
    int num_key_value_heads; /* G */
    int num_local_experts;   /* E */
    int num_experts_per_tok; /* k */
    double rope_theta;
    double rms_norm_eps;
    double router_aux_loss_coef; /* alpha */
    double router_z_loss_coef;   /* beta */
    double moe_capacity_factor;  /* 0: dropless */
    enum model_drop_policy moe_drop_policy;
    enum model_dispatcher moe_token_dispatcher_type; /* how tokens reach their experts */
};

/* Defaults of shared/docs/model.md for the optional keys; sizes left 0. */
void model_config_defaults(struct model_config *cfg);
/* 0, or VD_EINVAL with a sentence naming the key, its value and what is allowed. */
int model_config_validate(const struct model_config *cfg);

/* Parameter counts of the whole model: total, and active per token (k of E experts). */
void model_param_counts(const struct model_config *cfg, size_t *total, size_t *active);
/* Forward FLOPs per token at sequence length T (Megatron-Core convention of model.md);
 * training is 3x this. */
double model_flops_per_token(const struct model_config *cfg, int seq_len);

/* ---------------------------------------------------------------- parameter table */

/* How a tensor's global shape is cut across ranks. */
enum model_shard {
    MODEL_SHARD_NONE = 0, /* every rank of the group holds it whole (replicated) */
    MODEL_SHARD_DIM0,     /* rows split evenly over the group */
    MODEL_SHARD_DIM1,     /* columns split evenly over the group */
};

/* Which process group a tensor is sharded over (and its gradient summed over when
 * replicated inside a stage). */
enum model_shard_group { MODEL_GROUP_TP = 0, MODEL_GROUP_ETP = 1 };

enum model_tensor_kind {
    MODEL_T_EMBED, MODEL_T_LN1, MODEL_T_WQ, MODEL_T_WK, MODEL_T_WV, MODEL_T_WO,
    MODEL_T_LN2, MODEL_T_ROUTER, MODEL_T_W1, MODEL_T_W3, MODEL_T_W2,
    MODEL_T_NORM, MODEL_T_HEAD,
};

struct model_tensor {
    char name[96];            /* Hugging Face name */
    enum model_tensor_kind kind;
    int layer;                /* -1 for embed, norm, head */
    int expert;               /* global expert index, -1 otherwise */
    int ndim;                 /* 1 or 2 */
    size_t shape[2];          /* global shape (shape[1] = 1 when ndim = 1) */
    enum model_shard shard;
    enum model_shard_group group;
    size_t local_shape[2];    /* this rank's block */
    size_t local_start[2];    /* global coordinates of the block's first element */
    size_t numel;             /* local element count */
    size_t offset;            /* into the flat parameter (and gradient, moment) buffers */
    bool decay;               /* AdamW weight decay: 2-D weights only */
    bool is_expert;           /* reduced over EDP instead of DP x CP */
};

/* Most model chunks one rank may hold (parallel.vpp). */
#define MODEL_CHUNKS_MAX 16

/* What of the model this rank holds. Sizes of one are the serial case. */
struct model_layout {
    int tp, tp_rank;     /* attention tensor parallelism */
    int ep, ep_rank;     /* expert parallelism */
    int etp, etp_rank;   /* expert tensor parallelism */
    /* The model chunks (virtual pipeline stages) this rank holds, in layer order: chunk c
     * is layers [chunk_begin[c], chunk_end[c]). The embedding belongs to chunk 0 when
     * has_embed, the final norm and lm_head to chunk nchunks - 1 when has_head. */
    int nchunks;
    int chunk_begin[MODEL_CHUNKS_MAX], chunk_end[MODEL_CHUNKS_MAX];
    bool has_embed, has_head;
};
/* The whole model in one chunk, every group of size one. */
void model_layout_serial(struct model_layout *lay, int num_layers);
/* Layers this rank holds over all its chunks. */
int model_layout_nlayers(const struct model_layout *lay);
/* The rank's index of global layer l (its chunks' layers counted in order), or -1. */
int model_layout_local(const struct model_layout *lay, int l);
/* The global layer of the rank's local index li (inverse of model_layout_local). */
int model_layout_global(const struct model_layout *lay, int li);

struct model_table {
    struct model_tensor *t;
    int count;
    size_t numel;        /* total local elements: the flat buffers' length */
    size_t numel_dense;  /* the first numel_dense elements are non-expert tensors;
                            experts follow, so each reduction group sees one range */
};

/* Builds the table of every tensor this rank holds, dense tensors first then experts,
 * in a fixed order. Returns 0 or VD_EINVAL when the layout does not divide the model. */
int model_table_build(struct model_table *tab, const struct model_config *cfg,
                      const struct model_layout *lay);
void model_table_free(struct model_table *tab);
/* Index of a tensor by Hugging Face name, or -1. */
int model_table_find(const struct model_table *tab, const char *name);

/* Layout-independent initialisation (model.md): element (i, j) of a tensor gets a value
 * depending only on (seed, name, global index i * shape[1] + j). */
void model_init_params(const struct model_table *tab, float *params, uint64_t seed,
                       int num_layers);
/* The standard normal deviate used above, exposed for tests. */
float model_init_normal(uint64_t seed, const char *name, uint64_t index);

/* Pointers into a flat buffer (parameters or gradients) for one rank's tensors. */
struct model_layer_ptrs {
    float *ln1, *wq, *wk, *wv, *wo, *ln2, *router;
    float **w1, **w3, **w2; /* [E_local], local experts in order */
};
struct model_ptrs {
    float *embed, *norm, *head;   /* NULL when this stage lacks them */
    struct model_layer_ptrs *layers; /* [model_layout_nlayers], by local index */
    float **expert_slots;            /* storage behind the w1/w3/w2 arrays */
};
void model_ptrs_build(struct model_ptrs *p, const struct model_table *tab, float *base,
                      const struct model_layout *lay, int num_local_experts);
void model_ptrs_free(struct model_ptrs *p);

/* ---------------------------------------------------------------- kernels */
/* Shapes in comments are (rows, cols), row-major. Each kernel parallelises itself with
 * OpenMP over its outermost independent loop; BLAS calls use OpenBLAS's threads. */

/* out (n, m) = inp (n, kd) w^T, w (m, kd); accumulate: out += instead of =. */
void model_matmul_forward(float *out, const float *inp, const float *w, size_t n,
                          size_t kd, size_t m, bool accumulate);
/* dinp (n, kd) (+)= dout (n, m) w; dw (m, kd) += dout^T inp. Either output may be NULL. */
void model_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                           const float *w, size_t n, size_t kd, size_t m,
                           bool accumulate_dinp);

/* out (n, d) = rmsnorm(inp) * g; rstd (n) saved for backward. */
void model_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *g,
                           size_t n, size_t d, float eps);
/* dinp (n, d) += ...; dg (d) += ... */
void model_rmsnorm_backward(float *dinp, float *dg, const float *dout, const float *inp,
                            const float *g, const float *rstd, size_t n, size_t d);

/* RoPE table: cos/sin (T, hd/2) for positions 0..T-1 of each sequence. */
void model_rope_table(float *cos_t, float *sin_t, int seq_len, int head_dim, double theta);
/* Rotates x (n_seq * T, nheads * hd) in place, position t = row % T (+ pos_offset of the
 * row's chunk is the caller's business: `pos` (rows) gives each row's position).
 * inverse = true applies the transpose rotation (the backward of the forward). */
void model_rope_apply(float *x, const int *pos, const float *cos_t, const float *sin_t,
                      size_t rows, int nheads, int head_dim, bool inverse);

/* Query rows per block of the causal attention kernels (blocks above the diagonal are
 * skipped). */
#define MODEL_ATTN_BLOCK 64

/* The materialised-probabilities reference of the attention core (training uses the
 * blockwise model_flash_* below; `vdist bench attention` and test_kernels compare them).
 * Causal grouped-query attention on local heads, per sequence of T positions.
 * q (B*T, Hl*hd), k, v (B*T, Gl*hd), out (B*T, Hl*hd); probs (B, Hl, T, T) saved.
 * Query head i uses key/value head i / (Hl/Gl). */
void model_attention_forward(float *out, float *probs, const float *q, const float *k,
                             const float *v, int B, int T, int Hl, int Gl, int hd);
/* dq (=), dk, dv (=) from dout; scratch of model_attention_scratch_floats(T) floats. */
void model_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                              const float *probs, const float *q, const float *k,
                              const float *v, int B, int T, int Hl, int Gl, int hd,
                              float *scratch);
/* T * T per OpenMP thread (omp_get_max_threads() at the time of the call). */
size_t model_attention_scratch_floats(int T);

/* Blockwise attention with an online softmax (model/flash.c): the same attention as
 * model_attention_* without storing probabilities (memory O(T x block) per head), on one
 * (query block, key block) pair at a time so that context parallelism can run it on
 * pieces of a sequence and merge them.
 *
 * Where a pair lies: per sequence b (0..B-1), Tq query rows starting at row b * q_seq of
 * q / out / dout / dq / lse / delta, and Tk key rows starting at row b * k_seq of
 * k / v / dk / dv. Row strides: Hl * hd floats for q, out, dout, dq; Gl * hd for k, v, dk,
 * dv; Hl for lse and delta (one value per query row and head). Query head i uses
 * key/value head i / (Hl / Gl). Scores are scaled by 1 / sqrt(hd). Every query row sees at
 * least one key. Results are bit-identical for any number of OpenMP threads. */
enum model_attn_mask {
    MODEL_MASK_FULL,   /* every query row sees every key row */
    MODEL_MASK_CAUSAL, /* Tq == Tk, aligned: query row t sees key rows 0..t */
};
struct model_attn_blocks {
    int B, Tq, Tk;
    size_t q_seq, k_seq;
    int Hl, Gl, hd;
    enum model_attn_mask mask;
};
/* out (normalised attention output) and lse (log-sum-exp of each query row's scaled
 * scores over this key block). merge = false: overwrite; merge = true: out and lse already
 * hold the result over other key blocks of the same queries, and are replaced by the
 * result over all of them (combined by log-sum-exp; a row with lse = -INFINITY holds
 * nothing yet, and its out is not read). scratch: model_flash_scratch_floats(Tk, hd). */
void model_flash_forward(float *out, float *lse, const float *q, const float *k,
                         const float *v, const struct model_attn_blocks *g, bool merge,
                         float *scratch);
/* delta = rowsum(dout * out) per query row and head, the backward's row term (out and lse
 * are the final ones over all key blocks). */
void model_flash_delta(float *delta, const float *dout, const float *out,
                       const struct model_attn_blocks *g);
/* The backward of one (query block, key block) pair: recomputes the probabilities from
 * q, k and the final lse block by block, and accumulates dq +=, dk +=, dv += (the caller
 * zeroes them). scratch: model_flash_scratch_floats(Tk, hd). */
void model_flash_backward(float *dq, float *dk, float *dv, const float *dout,
                          const float *lse, const float *delta, const float *q,
                          const float *k, const float *v, const struct model_attn_blocks *g,
                          float *scratch);
/* Floats of scratch the two calls need for keys of Tk rows, for every OpenMP thread
 * (omp_get_max_threads() at the time of the call): O(block x (block + hd)) per thread. */
size_t model_flash_scratch_floats(int Tk, int hd);

/* ---------------------------------------------------------------- router */

/* Per-token routing of n tokens: probs (n, E) = softmax(logits); topk experts (n, k) and
 * their renormalised weights (n, k), slot j the j-th largest p (ties: lower index);
 * lse (n) the log-sum-exp of each row (for the z-loss). */
void model_router_forward(float *probs, int *topk_idx, float *topk_w, float *lse,
                          const float *logits, size_t n, int E, int k);
/* dlogits (n, E) = from dtopk_w (n, k) (zero for dropped slots), the aux-loss gradient
 * coefficient per expert aux_coef[e] (d aux / d p_te, same for every token) and the
 * z-loss coefficient zcoef (d z / d lse_t = zcoef * lse_t). */
void model_router_backward(float *dlogits, const float *dtopk_w, const float *probs,
                           const int *topk_idx, const float *topk_w, const float *lse,
                           const float *aux_coef, float zcoef, size_t n, int E, int k);

/* ---------------------------------------------------------------- experts */

/* SwiGLU expert on a contiguous block x (n, d): h1 = x w1^T, h3 = x w3^T (n, Fl),
 * act = silu(h1) * h3, y (n, d) = act w2^T; w1, w3 (Fl, d), w2 (d, Fl). h1, h3, act saved. */
void model_expert_forward(float *y, float *h1, float *h3, float *act, const float *x,
                          const float *w1, const float *w3, const float *w2, size_t n,
                          int d, int Fl);
/* dx (n, d) = (not accumulated); dw1, dw3, dw2 +=. scratch (n, 2 * Fl). */
void model_expert_backward(float *dx, float *dw1, float *dw3, float *dw2, const float *dy,
                           const float *h1, const float *h3, const float *act,
                           const float *x, const float *w1, const float *w3,
                           const float *w2, size_t n, int d, int Fl, float *scratch);

/* ---------------------------------------------------------------- loss pieces */

/* Row max and sum of exp(row - max) of logits (n, Vl): the local part of a (vocabulary-
 * parallel) softmax; the caller combines them over the tensor group. */
void model_softmax_stats(float *rowmax, float *rowsum, const float *logits, size_t n,
                         size_t Vl);
/* Logit of each row's target when it falls in [v_begin, v_begin + Vl), else 0. */
void model_target_logits(float *tlogit, const float *logits, const int *targets, size_t n,
                         size_t Vl, int v_begin);
/* dlogits (n, Vl) = scale * (softmax - onehot) given the global row max and sum. */
void model_crossentropy_backward(float *dlogits, const float *logits, const int *targets,
                                 const float *rowmax, const float *rowsum, size_t n,
                                 size_t Vl, int v_begin, float scale);

/* ---------------------------------------------------------------- AdamW */

struct model_adamw {
    float lr, beta1, beta2, eps, weight_decay;
    long step; /* t, 1 for the first update */
};
/* One AdamW update of n elements (PyTorch semantics); decay selects weight decay. */
void model_adamw_update(float *p, const float *g, float *m, float *v, size_t n,
                        const struct model_adamw *hp, bool decay);
/* Learning rate at step s (0-based) for `cosine` (warmup W, total S) or constant. */
float model_lr_at(int cosine, float lr_max, float lr_min, int warmup, int total, int step);

#endif
