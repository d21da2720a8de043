/* Shared between the files of launch/ only. */
#ifndef VDIST_LAUNCH_INTERNAL_H
#define VDIST_LAUNCH_INTERNAL_H

#include "launch/launch.h"

/* Cores in this process's binding (hwloc); 1 when unknown. */
int launch_topo_bound_cores(void);
/* Sets the OpenMP (and so OpenBLAS) thread count to OMP_NUM_THREADS or the bound cores. */
int launch_topo_set_threads(void);

#endif
