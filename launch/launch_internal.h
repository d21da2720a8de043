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
/* `vdist bench dispatch`: the MoE dispatcher's exchange against MPI_Alltoall. */
int launch_bench_dispatch(const struct launch_config *c);
/* `vdist bench ckpt`: checkpoint save/load speed, compression, disk speed, async blocking. */
int launch_bench_ckpt(const struct launch_config *c);

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

#endif
