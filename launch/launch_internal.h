/* Shared between the files of launch/ only. */
#ifndef VDIST_LAUNCH_INTERNAL_H
#define VDIST_LAUNCH_INTERNAL_H

#include "dist/dist.h"
#include "launch/launch.h"

/* Cores this rank may use (hwloc): those of its binding, or, when it is bound to the whole
 * machine, its share among the node's node_ranks ranks; at least 1. */
int launch_topo_bound_cores(int node_ranks);
/* Sets the OpenMP (and so OpenBLAS) thread count to OMP_NUM_THREADS or the cores above. */
int launch_topo_set_threads(int node_ranks);

/* The grid of c's parallel sizes over the world, checked against what this version runs
 * and against the batch and sequence sizes; 0 or VD_EINVAL naming the sizes. */
int launch_layout_make(const struct launch_config *c, struct dist_grid *grid);
/* This rank's share of the model under the grid and the pipeline split of c. */
int launch_layout_rank(const struct launch_config *c, const struct dist_grid *grid,
                       struct model_layout *lay);
/* `vdist bench dispatch`: the MoE dispatcher's exchange against MPI_Alltoall. */
int launch_bench_dispatch(const struct launch_config *c);
/* `vdist bench ckpt`: checkpoint save/load speed, compression, disk speed, async blocking. */
int launch_bench_ckpt(const struct launch_config *c);
/* `vdist bench attention`: the attention kernels (stored probabilities vs flash) on one
 * rank at several sequence lengths; argv[0..argc) are its options (launch/bench_attn.c). */
int launch_bench_attention(const struct launch_config *c, int argc, char **argv);
void launch_bench_attention_help(FILE *out);

/* log.trace (launch/tracing.c). Open: nothing for an empty path; else, collectively, every
 * rank opens its part of the trace and starts recording at one moment; 0, or VD_EINVAL /
 * VD_EIO naming log.trace, agreed by all ranks, with no part file left. Close: collective
 * when a trace is open, a no-op otherwise. With rc (the run's agreed result) 0, stops
 * recording and rank 0 writes the trace from every rank's part (0 or the trace's agreed
 * error); with rc < 0, drops the parts quietly and returns rc. No part file is left either
 * way. */
int launch_trace_open(const char *path);
int launch_trace_close(const char *path, int rc);

/* `vdist ckpt ...`: argv[0] is "ckpt". Returns the process exit code. */
int launch_ckpt_main(int argc, char **argv);

/* ---------------------------------------------------------------- config*.c */

/* A message for the user, written where a problem is found; the public entry points record
 * it (vd_err_set), prefixed with where the text came from. */
struct launch_cfg_err {
    char msg[2048];
};
/* Writes the printf-style message into e and returns code. */
__attribute__((format(printf, 3, 4))) int launch_cfg_fail(struct launch_cfg_err *e, int code,
                                                          const char *fmt, ...);
/* launch_config_read_hf that leaves its message in e instead of recording it, and gives the
 * file's sliding window (-1 when absent or null) for the loader, which knows seq_len. */
int launch_config_read_hf_ex(struct model_config *m, const char *path,
                             long long *sliding_window, struct launch_cfg_err *e);

/* ---------------------------------------------------------------- data*.c */

/* The llm.c header holds the token count as an int32. */
#define LAUNCH_DATA_MAX_TOKENS ((size_t)INT32_MAX)
#define LAUNCH_SYNTH_MAX_STATES (1 << 20)

struct launch_tokens {
    char path[LAUNCH_PATH_MAX];
    void *map;          /* NULL for an empty file */
    size_t map_nbytes;
    const unsigned char *tok; /* first token */
    size_t count;
    size_t elem_nbytes; /* 2 or 4 */
    int version;        /* llm.c version, 0 for a raw file */
    size_t nseq;
    int seq_len;
};
/* Maps the file and reads its header (launch_tokens_close it); checks only the format, not
 * the ids, and sets neither seq_len nor nseq. */
int launch_tokens_map(launch_tokens **out, const char *path, enum launch_dtype raw_dtype);
/* Largest id, and the first position whose id >= limit (count when none). */
uint32_t launch_tokens_scan(const launch_tokens *t, uint64_t limit, size_t *first_bad);
/* "uint16" or "uint32" for 2 or 4 bytes a token. */
const char *launch_tokens_dtype_name(size_t elem_nbytes);

/* Writes an llm.c uint16 token file to "<path>.tmp.<pid>" and renames it over path only
 * when everything was written and synced, so path never holds a half-written file. Open
 * (which refuses a path too long or a temporary it cannot create), put every token, then
 * finish, which reports any write that failed on the way. */
struct launch_tok_writer {
    FILE *f;
    const char *path;
    char tmp[LAUNCH_PATH_MAX + 32];
    unsigned char *buf;
    size_t fill;  /* tokens in buf */
    size_t count; /* tokens so far */
    int err;      /* first errno of a failed write, 0 while all is well */
};
int launch_tok_writer_open(struct launch_tok_writer *w, const char *path);
void launch_tok_writer_put(struct launch_tok_writer *w, uint16_t id);
int launch_tok_writer_finish(struct launch_tok_writer *w);

/* 0, or VD_EINVAL with a sentence naming the parameter of s that is out of range. */
int launch_synth_validate(const struct launch_synth *s);

#endif
