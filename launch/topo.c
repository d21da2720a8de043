/* hwloc: how many cores this rank may use, so the ranks' threads never oversubscribe the
 * cores: the cores of its binding, or its share of the node when it is not bound. */
#include <hwloc.h>
#include <omp.h>
#include <stdlib.h>

#include "launch/launch_internal.h"

/* Cores in this process's binding and on the whole machine. */
static void count_cores(int *bound, int *machine)
{
    *bound = *machine = 1;
    hwloc_topology_t topo;
    if (hwloc_topology_init(&topo) != 0) return;
    if (hwloc_topology_load(topo) == 0) {
        int const all = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
        *machine = all > 0 ? all : 1;
        hwloc_bitmap_t set = hwloc_bitmap_alloc();
        if (set && hwloc_get_cpubind(topo, set, HWLOC_CPUBIND_PROCESS) == 0) {
            int const n = hwloc_get_nbobjs_inside_cpuset_by_type(topo, set, HWLOC_OBJ_CORE);
            *bound = n > 0 ? n : 1;
        }
        hwloc_bitmap_free(set);
    }
    hwloc_topology_destroy(topo);
}

int launch_topo_bound_cores(int node_ranks)
{
    int bound = 1, machine = 1;
    count_cores(&bound, &machine);
    /* Unbound ranks (bound to every core) share the node's cores between them. */
    if (bound >= machine && node_ranks > 1) bound = machine / node_ranks;
    return bound > 0 ? bound : 1;
}

int launch_topo_set_threads(int node_ranks)
{
    /* An explicit OMP_NUM_THREADS wins: the user (or a test) asked for it. */
    const char *env = getenv("OMP_NUM_THREADS");
    int const n = env && atoi(env) > 0 ? atoi(env) : launch_topo_bound_cores(node_ranks);
    omp_set_num_threads(n);
    return n;
}
