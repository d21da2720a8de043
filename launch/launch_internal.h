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

#endif
