/* launch/: the `vdist` program. Command line and configuration, data loading, hwloc
 * topology, the training loop, logging and metrics, benchmarks. Nothing includes this
 * header but launch/ itself and the tests.
 *
 * Error rule: as model.h: 0 or a negative VD_E* code with a message; main() decides to
 * stop, after every rank agreed on the failure (dist_agree). */
#ifndef VDIST_LAUNCH_H
#define VDIST_LAUNCH_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "ckpt/ckpt.h"
#include "model/model.h"

#define LAUNCH_PATH_MAX 1024

/* ---------------------------------------------------------------- config */

enum launch_lr_schedule { LAUNCH_LR_CONSTANT = 0, LAUNCH_LR_COSINE = 1 };
enum launch_dtype { LAUNCH_DTYPE_UINT16 = 0, LAUNCH_DTYPE_UINT32 = 1 };

struct launch_train {
    int steps;
    int global_batch;   /* sequences per optimizer step */
    int micro_batch;    /* sequences per micro-batch */
    int seq_len;
    double lr, lr_min;
    enum launch_lr_schedule lr_schedule;
    int warmup;
    double weight_decay, beta1, beta2, eps;
    double clip;        /* max global grad norm, 0 disables */
    uint64_t seed;
    char init_from[LAUNCH_PATH_MAX];  /* safetensors, empty: initialise */
    char export_to[LAUNCH_PATH_MAX];  /* directory for HF safetensors + config.json at the end */
    double peak_gflops; /* per rank; 0: measure SGEMM at start */
};

struct launch_data {
    char path[LAUNCH_PATH_MAX];
    enum launch_dtype dtype; /* for raw files; llm.c files carry their own */
};

/* Most model chunks (pp x vpp) a pipeline split may name. */
#define LAUNCH_CHUNKS_MAX 256

struct launch_parallel {
    int tp, cp, ep, etp, pp, vpp;
    char pp_layers[1024];   /* layers per model chunk joined by ','; empty: an even split */
    int pp_schedule;        /* 0 auto, then enum par_pp_schedule + 1 */
    int cp_comm_type;       /* 0 p2p (ring), 1 allgather */
    char order[64];
    bool distributed_optimizer;
    bool dispatch_direct;
};

enum launch_bind { LAUNCH_BIND_AUTO = 0, LAUNCH_BIND_NONE = 1 };

struct launch_launch {
    int bind;             /* enum launch_bind */
    int ranks_per_node;   /* declared node size; 0: the real nodes */
};

struct launch_ckpt {
    char dir[LAUNCH_PATH_MAX];  /* root of the run's checkpoints; empty: none */
    int interval, keep;
    char resume[LAUNCH_PATH_MAX]; /* "auto": latest under dir; "never"; or a checkpoint path */
    int zstd_level;
    bool async;                   /* compress and write in a background thread */
};

struct launch_log {
    char metrics[LAUNCH_PATH_MAX]; /* JSON-lines path, empty: none */
    char trace[LAUNCH_PATH_MAX];   /* Chrome trace-event JSON path, empty: none */
    int interval;                  /* progress line every `interval` steps */
};

struct launch_config {
    struct model_config model;
    char model_config_path[LAUNCH_PATH_MAX]; /* model.config: HF config.json */
    struct launch_train train;
    struct launch_data data;
    struct launch_parallel parallel;
    struct launch_launch launch;
    struct launch_ckpt ckpt;
    struct launch_log log;
};

/* Defaults of every key. */
void launch_config_defaults(struct launch_config *c);
/* Loads `path` (INI, may be NULL), then applies overrides `--section.key=value` in order,
 * then model.config (Hugging Face config.json) if set, whose keys lose to explicit model.*
 * keys from the file or command line. Then validates every key and the combinations.
 * 0, or VD_EINVAL naming the key, the value and what is allowed. */
int launch_config_load(struct launch_config *c, const char *path, int argc,
                       char *const *argv);
/* Sets one key from text (`section.key`, `value`): for the loader and tests. */
int launch_config_set(struct launch_config *c, const char *key, const char *value);
/* Cross-key checks (batch divisibility, model sizes, ...); the loader calls it. */
int launch_config_validate(const struct launch_config *c);
/* parallel.pp_layers as counts into out[cap]: how many (0 for empty), or -1 when it is not
 * a list of integers >= 1 joined by ','. */
int launch_pp_layers(const char *s, int *out, int cap);
/* parallel.pp_schedule, auto resolved by parallel.vpp. */
enum par_pp_schedule launch_pp_schedule(const struct launch_parallel *p);
/* Every key and its value as a JSON object {"section.key": value, ...} (malloc'd text). */
char *launch_config_to_json(const struct launch_config *c);
/* Prints every key with its default and meaning. */
void launch_config_help(FILE *out);
/* Writes the model keys as a Hugging Face config.json (MixtralForCausalLM). */
int launch_config_write_hf(const struct model_config *m, const char *path);
/* Reads the model keys of a Hugging Face config.json into m. */
int launch_config_read_hf(struct model_config *m, const char *path);

/* ---------------------------------------------------------------- data */

/* A token file, memory-mapped: llm.c format (256 int32 header, magic 20240520, version
 * 1 = uint16, 2 = uint32 tokens) or raw little-endian uint16/uint32. */
typedef struct launch_tokens launch_tokens;

/* Opens and checks the file: header, length >= seq_len + 1 tokens, every id < vocab. */
int launch_tokens_open(launch_tokens **t, const char *path, enum launch_dtype raw_dtype,
                       int vocab_size, int seq_len);
void launch_tokens_close(launch_tokens *t);
size_t launch_tokens_count(const launch_tokens *t);
/* n_seq = floor((len - 1) / T). */
size_t launch_tokens_nseq(const launch_tokens *t);
/* Inputs and targets (T each) of sequence i (model.md's data order). */
void launch_tokens_sequence(const launch_tokens *t, size_t i, int *inputs, int *targets);

/* The embedded dataset: a fixed random probabilistic automaton over `states` states and
 * `vocab` tokens; each state emits one of `branch` tokens with random probabilities and
 * moves to the state given by (state, token). */
struct launch_synth {
    int states, vocab, branch;
    uint64_t seed;
    size_t tokens;
};
void launch_synth_defaults(struct launch_synth *s);
/* Writes `tokens` tokens in llm.c format (uint16) to path and returns, in *floor_nats,
 * the automaton's entropy rate in nats per token. */
int launch_synth_write(const struct launch_synth *s, const char *path, double *floor_nats);
/* The entropy rate without writing anything. */
int launch_synth_floor(const struct launch_synth *s, double *floor_nats);
/* The entropy rate and the entropy of the stationary unigram distribution (what a model
 * that ignores context reaches), both in nats per token. */
int launch_synth_entropy(const struct launch_synth *s, double *floor_nats,
                         double *unigram_nats);
/* The automaton itself, for tests that re-simulate it. Entry e = state * branch + j:
 * state `state` emits token[e] with probability weight[e] / (sum of its `branch`
 * weights), then moves to next[e]. Generation starts in state 0. */
struct launch_synth_table {
    int states, branch;
    int *token;
    uint64_t *weight;
    int *next;
};
/* 0, or VD_EINVAL naming the parameter that is out of range. */
int launch_synth_table_build(struct launch_synth_table *tab, const struct launch_synth *s);
void launch_synth_table_free(struct launch_synth_table *tab);
/* Byte-level tokens (vocab 256) of any file, llm.c format uint16. */
int launch_data_text(const char *in_path, const char *out_path);
/* `vdist data ...`: argv[0] is "data". Returns the process exit code. */
int launch_data_main(int argc, char **argv);

/* ---------------------------------------------------------------- training */

struct launch_train_result {
    int steps;                  /* optimizer steps taken */
    double first_loss, last_loss;
    double tokens_per_s, mfu;   /* averaged over the steps after the first */
    double peak_gflops;         /* per rank, measured or given */
};
/* Trains as the config says (every rank calls it); with bench, also prints the time split
 * and the memory plan against the peak RSS. 0 or a negative VD_E* agreed by all ranks. */
int launch_train_run(const struct launch_config *c, bool bench, struct launch_train_result *res);
/* Measured fp32 SGEMM GFLOP/s of this rank's threads. */
double launch_measure_sgemm_gflops(void);

/* BENCH-COMM-BEGIN */
/* ---------------------------------------------------------------- communication bench */

/* `vdist bench comm`: on every rank, after MPI init. Builds both rank grids of c->parallel
 * over the world, and for every group kind of size > 1 sweeps message sizes (doubling
 * from --min-bytes to --max-bytes) over the collectives vdist runs on that kind, after an
 * exact-mode correctness check of each (kind, collective, size). Rank 0 prints one table
 * per group kind: time per call (avg/min/max over the world's ranks), algbw and busbw as
 * nccl-tests defines them, and the count of wrong elements.
 * argv[0..argc) are options only (no program name): --min-bytes N, --max-bytes N (N in
 * bytes, or with a K, M or G suffix for KiB, MiB, GiB), --iters N, --warmup N, --help.
 * Returns 0; VD_EINVAL with a sentence for a bad option or a layout the grid refuses;
 * VD_EMPI when any collective produced a wrong element. Every rank returns the same. */
int launch_bench_comm(const struct launch_config *c, int argc, char **argv);
/* Prints the options of launch_bench_comm. */
void launch_bench_comm_help(FILE *out);
/* BENCH-COMM-END */

#endif
