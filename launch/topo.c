/* hwloc: how many cores this rank is bound to, so its threads never oversubscribe them. */
#include <hwloc.h>
#include <omp.h>
#include <stdlib.h>

#include "launch/launch_internal.h"

int launch_topo_bound_cores(void)
{
    hwloc_topology_t topo;
    if (hwloc_topology_init(&topo) != 0) return 1;
    int cores = 1;
    if (hwloc_topology_load(topo) == 0) {
        hwloc_bitmap_t set = hwloc_bitmap_alloc();
        if (set && hwloc_get_cpubind(topo, set, HWLOC_CPUBIND_PROCESS) == 0) {
            int const n = hwloc_get_nbobjs_inside_cpuset_by_type(topo, set, HWLOC_OBJ_CORE);
            int const pus = hwloc_bitmap_weight(set);
            cores = n > 0 ? n : (pus > 0 ? pus : 1);
        }
        hwloc_bitmap_free(set);
    }
    hwloc_topology_destroy(topo);
    return cores;
}

int launch_topo_set_threads(void)
{
    /* An explicit OMP_NUM_THREADS wins: the user (or a test) asked for it. */
    const char *env = getenv("OMP_NUM_THREADS");
    int const n = env && atoi(env) > 0 ? atoi(env) : launch_topo_bound_cores();
    omp_set_num_threads(n);
    return n;
}
