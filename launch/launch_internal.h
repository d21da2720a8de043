/* Shared between the files of launch/ only. */
#ifndef VDIST_LAUNCH_INTERNAL_H
#define VDIST_LAUNCH_INTERNAL_H

#include "launch/launch.h"

/* Cores this rank may use (hwloc): those of its binding, or, when it is bound to the whole
 * machine, its share among the node's node_ranks ranks; at least 1. */
int launch_topo_bound_cores(int node_ranks);
/* Sets the OpenMP (and so OpenBLAS) thread count to OMP_NUM_THREADS or the cores above. */
int launch_topo_set_threads(int node_ranks);

#endif
