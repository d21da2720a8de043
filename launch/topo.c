/* The running job's placement (launch_internal.h): binding (launch.bind), the thread count,
 * every rank's slot gathered on every rank, parallel.order = auto resolved on them, and the
 * record of the topology and the mapping next to the metrics. The decisions themselves are
 * the pure functions of launch/place.c; this file only asks hwloc and MPI what the job is. */
#include <errno.h>
#include <fcntl.h>
#include <hwloc.h>
#include <libgen.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "launch/launch_internal.h"

/* This host's topology (hwloc), loaded again for binding: launch_machine keeps only the
 * arrays the pure functions need. */
struct host {
    hwloc_topology_t topo;
    hwloc_bitmap_t bound;   /* the process's binding */
    bool launcher_bound;    /* the binding is narrower than the cores it may use */
};

static int host_open(struct host *h)
{
    memset(h, 0, sizeof *h);
    RETURN_IF(hwloc_topology_init(&h->topo) != 0, VD_EIO, "hwloc cannot start");
    if (hwloc_topology_load(h->topo) != 0) {
        hwloc_topology_destroy(h->topo);
        h->topo = NULL;
        RETURN_ERR(VD_EIO, "hwloc cannot read this host's topology");
    }
    h->bound = hwloc_bitmap_alloc();
    VD_CHECK(h->bound, "out of memory");
    if (hwloc_get_cpubind(h->topo, h->bound, HWLOC_CPUBIND_PROCESS) != 0)
        hwloc_bitmap_copy(h->bound, hwloc_topology_get_allowed_cpuset(h->topo));
    h->launcher_bound = !hwloc_bitmap_isincluded(hwloc_topology_get_allowed_cpuset(h->topo),
                                                 h->bound);
    return 0;
}

static void host_close(struct host *h)
{
    if (h->bound) hwloc_bitmap_free(h->bound);
    if (h->topo) hwloc_topology_destroy(h->topo);
}

/* Logical indexes of the cores the binding touches, into cores (m->ncores); the count. */
static int bound_cores(const struct host *h, const struct launch_machine *m, int *cores)
{
    int n = 0;
    for (int c = 0; c < m->ncores; c++) {
        hwloc_obj_t const o = hwloc_get_obj_by_type(h->topo, HWLOC_OBJ_CORE, (unsigned)c);
        if (o && hwloc_bitmap_intersects(o->cpuset, h->bound)) cores[n++] = c;
    }
    return n;
}

/* Binds the process to the cores (logical indexes), every PU of each. */
static int bind_to(struct host *h, const int *cores, int n)
{
    hwloc_bitmap_t set = hwloc_bitmap_alloc();
    VD_CHECK(set, "out of memory");
    for (int i = 0; i < n; i++) {
        hwloc_obj_t const o = hwloc_get_obj_by_type(h->topo, HWLOC_OBJ_CORE, (unsigned)cores[i]);
        if (o) hwloc_bitmap_or(set, set, o->cpuset);
    }
    int const rc = hwloc_set_cpubind(h->topo, set, HWLOC_CPUBIND_PROCESS);
    if (rc == 0) hwloc_bitmap_copy(h->bound, set);
    hwloc_bitmap_free(set);
    RETURN_IF(rc != 0, VD_EIO, "launch.bind = auto: cannot bind to cores: %s (set "
              "launch.bind = none, or bind with the launcher)", strerror(errno));
    return 0;
}

/* A hash of the cores of this rank's binding (logical indexes), equal for equal sets. */
static uint64_t set_hash(const int *cores, int n)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (int i = 0; i < n; i++) h = (h ^ (uint64_t)cores[i]) * 1099511628211ULL;
    return h ^ (uint64_t)n;
}

/* This rank's node among the world's real nodes (hosts that share memory), numbered by
 * their lowest rank, its index and count on it, and how many ranks of the node are bound
 * to the same set of cores as this one (hash). */
static void real_node(int *node, int *node_ranks, int *node_index, uint64_t hash, int *same_set)
{
    MPI_Comm comm;
    int const rank = dist_world_rank(), world = dist_world_size();
    DIST_CHECK_MPI(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank,
                                       MPI_INFO_NULL, &comm));
    MPI_Comm_size(comm, node_ranks);
    MPI_Comm_rank(comm, node_index);
    int leader = rank;
    DIST_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &leader, 1, MPI_INT, MPI_MIN, comm));
    uint64_t *hashes = vd_calloc((size_t)*node_ranks, sizeof *hashes);
    DIST_CHECK_MPI(MPI_Allgather(&hash, 1, MPI_UINT64_T, hashes, 1, MPI_UINT64_T, comm));
    *same_set = 0;
    for (int i = 0; i < *node_ranks; i++) *same_set += hashes[i] == hash;
    free(hashes);
    MPI_Comm_free(&comm);
    int *leaders = vd_calloc((size_t)world, sizeof *leaders);
    DIST_CHECK_MPI(MPI_Allgather(&leader, 1, MPI_INT, leaders, 1, MPI_INT, MPI_COMM_WORLD));
    *node = 0;
    for (int r = 0; r < leader; r++) *node += leaders[r] == r; /* leaders below mine */
    free(leaders);
}

/* Binding of this rank; writes what happened into note. */
static int place_self(struct host *h, const struct launch_machine *m,
                      const struct launch_config *c, int node_ranks, int node_index,
                      int same_set, char *note, size_t note_nbytes)
{
    int *cores = vd_calloc((size_t)m->ncores, sizeof *cores);
    int rc = 0, share = 0;
    if (c->launch.bind == LAUNCH_BIND_NONE) {
        snprintf(note, note_nbytes, "launch.bind = none: binding left as it is (%s)",
                 h->launcher_bound ? "bound by the launcher" : "unbound");
    } else if (h->launcher_bound) {
        snprintf(note, note_nbytes, "kept the launcher's binding (rank 0: %d core(s), %d "
                 "rank(s) bound to that set)", bound_cores(h, m, cores), same_set);
    } else if ((share = launch_place_share(m, node_ranks, node_index, 0, cores)) == 0) {
        snprintf(note, note_nbytes, "not bound: %d ranks share the %d cores of a node "
                 "(fewer cores than ranks)", node_ranks, m->ncores);
    } else {
        rc = bind_to(h, cores, share);
        if (rc == 0 && share == 1)
            snprintf(note, note_nbytes, "bound each rank to 1 core of its node (launch.bind = "
                     "auto; rank 0: logical core %d)", cores[0]);
        else if (rc == 0)
            snprintf(note, note_nbytes, "bound each rank to %d cores of its node (launch.bind "
                     "= auto; rank 0: logical cores %d-%d)", share, cores[0], cores[share - 1]);
    }
    free(cores);
    return rc;
}

/* OMP_NUM_THREADS when set (the user or a test asked for it), else the cores this rank
 * may use: those of its binding divided among the ranks bound to the same set (a launcher
 * may bind several ranks to one package), or its share of the node when it is unbound. */
static int set_threads(const struct host *h, const struct launch_machine *m, int node_ranks,
                       int same_set)
{
    const char *env = getenv("OMP_NUM_THREADS");
    int n = env && atoi(env) > 0 ? atoi(env) : 0;
    if (n == 0 && h->topo) {
        int *cores = vd_calloc((size_t)m->ncores, sizeof *cores);
        n = bound_cores(h, m, cores) / (same_set > 0 ? same_set : 1);
        free(cores);
        bool const whole = hwloc_bitmap_isincluded(hwloc_topology_get_allowed_cpuset(h->topo),
                                                   h->bound);
        if (whole && node_ranks > 1) n = m->ncores / node_ranks;
    }
    n = n < 1 ? 1 : n;
    omp_set_num_threads(n);
    return n;
}

int launch_topo_setup(struct launch_topo *t, const struct launch_config *c)
{
    memset(t, 0, sizeof *t);
    int const rank = dist_world_rank(), world = dist_world_size();
    t->world = world;
    dist_declare_nodes(c->launch.ranks_per_node);
    struct host h;
    struct launch_machine m;
    memset(&m, 0, sizeof m);
    /* A host hwloc cannot read runs on, unbound, with what it knows. */
    char note[sizeof t->bind_note] = "";
    bool const known = host_open(&h) == 0 && launch_machine_load(&m, "") == 0;
    if (!known)
        snprintf(note, sizeof note, "not bound: hwloc cannot read this host's topology (%s)",
                 vd_err_msg());
    int *cores = vd_calloc((size_t)(m.ncores > 0 ? m.ncores : 1), sizeof *cores);
    int n = known ? bound_cores(&h, &m, cores) : 0;
    int node = 0, node_ranks = 1, node_index = 0, same_set = 1;
    real_node(&node, &node_ranks, &node_index, set_hash(cores, n), &same_set);
    int rc = known ? place_self(&h, &m, c, node_ranks, node_index, same_set, note, sizeof note)
                   : 0;
    rc = dist_agree(dist_world(), rc);
    if (rc == 0) {
        t->threads = set_threads(&h, &m, node_ranks, same_set);
        n = known ? bound_cores(&h, &m, cores) : 0;
        char host[LAUNCH_HOST_MAX] = "";
        gethostname(host, sizeof host - 1);
        int const k = c->launch.ranks_per_node;
        struct launch_slot mine;
        launch_slot_make(&mine, &m, k > 0 ? rank / k : node, cores, n, host);
        t->slots = vd_calloc((size_t)world, sizeof *t->slots);
        DIST_CHECK_MPI(MPI_Allgather(&mine, (int)sizeof mine, MPI_BYTE, t->slots,
                                     (int)sizeof mine, MPI_BYTE, MPI_COMM_WORLD));
        snprintf(t->bind_note, sizeof t->bind_note, "%s", note);
    }
    free(cores);
    launch_machine_free(&m);
    host_close(&h);
    return rc;
}

void launch_topo_free(struct launch_topo *t)
{
    free(t->slots);
    memset(t, 0, sizeof *t);
}

/* ---------------------------------------------------------------- the record */

/* The directory of log.metrics ("." for a bare file name) into dir. */
static void metrics_dir(const struct launch_config *c, char *dir, size_t nbytes)
{
    char copy[LAUNCH_PATH_MAX];
    snprintf(copy, sizeof copy, "%s", c->log.metrics);
    snprintf(dir, nbytes, "%s", dirname(copy));
}

/* Writes nbytes of text as dir/topology-HOST.xml, durably, never half-written. */
static int write_xml(const char *dir, const char *host, const char *text, size_t nbytes)
{
    char name[LAUNCH_HOST_MAX + 32], path[LAUNCH_PATH_MAX + 128], tmp[LAUNCH_PATH_MAX + 160];
    snprintf(name, sizeof name, "topology-%s.xml", host[0] ? host : "host");
    FORWARD_IF(vd_path_join(path, sizeof path, dir, name));
    FORWARD_IF(vd_tmp_name(tmp, sizeof tmp, path));
    int const fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    RETURN_IF(fd < 0, VD_EIO, "cannot write the topology record %s: %s", tmp, strerror(errno));
    if (vd_write_all(fd, tmp, text, nbytes) < 0) {
        close(fd);
        unlink(tmp);
        RETURN_ERR(VD_EIO, "cannot write the topology record %s: %s", tmp, strerror(errno));
    }
    enum vd_replace_step failed;
    RETURN_IF(vd_replace_fd(fd, tmp, path, &failed) < 0 && failed < VD_REPLACE_OPEN_DIR,
              VD_EIO, "cannot write the topology record %s: %s", path, strerror(errno));
    return 0;
}

static int write_mapping(const char *dir, const struct launch_topo *t, const struct dist_grid *g)
{
    char path[LAUNCH_PATH_MAX + 32], tmp[LAUNCH_PATH_MAX + 64];
    FORWARD_IF(vd_path_join(path, sizeof path, dir, "mapping.tsv"));
    FORWARD_IF(vd_tmp_name(tmp, sizeof tmp, path));
    FILE *f = fopen(tmp, "w");
    RETURN_IF(!f, VD_EIO, "cannot write the mapping record %s: %s", tmp, strerror(errno));
    fprintf(f, "# order %s; node = the node the run used (launch.ranks_per_node when set); "
            "cores = hwloc logical indexes\n", g->order);
    fprintf(f, "rank\thost\tnode\tcores\ttp\tcp\tdp\tpp\tetp\tep\tedp\n");
    for (int r = 0; r < t->world; r++) {
        struct dist_grid_coords x;
        dist_grid_coords(g, r, &x);
        const struct launch_slot *s = &t->slots[r];
        fprintf(f, "%d\t%s\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", r, s->host, s->node,
                s->cores[0] ? s->cores : "-", x.tp, x.cp, x.dp, x.pp, x.etp, x.ep, x.edp);
    }
    enum vd_replace_step failed;
    int const rc = vd_replace_stream(f, false, tmp, path, &failed);
    RETURN_IF(rc < 0 && failed < VD_REPLACE_OPEN_DIR, VD_EIO,
              "cannot write the mapping record %s: %s", path, strerror(errno));
    return 0;
}

int launch_topo_record(const struct launch_config *c, const struct launch_topo *t,
                       const struct dist_grid *g)
{
    if (!c->log.metrics[0]) return 0;
    int const rank = dist_world_rank();
    /* The lowest rank of each host exports its topology; rank 0 writes every file, so the
     * run directory need not be shared between nodes. */
    bool first = true;
    for (int r = 0; r < rank && first; r++)
        first = strcmp(t->slots[r].host, t->slots[rank].host) != 0;
    char *xml = NULL;
    int xml_len = 0;
    hwloc_topology_t topo = NULL;
    if (first && hwloc_topology_init(&topo) == 0) {
        if (hwloc_topology_load(topo) != 0 ||
            hwloc_topology_export_xmlbuffer(topo, &xml, &xml_len, 0) != 0) {
            xml = NULL;
            xml_len = 0;
        }
    }
    size_t const mine = xml && xml_len > 1 ? (size_t)xml_len - 1 : 0; /* without its NUL */
    size_t *counts = rank == 0 ? vd_calloc((size_t)t->world, sizeof *counts) : NULL;
    dist_gather_nbytes(dist_world(), DIST_WORLD, mine, counts, 0);
    size_t total = 0;
    for (int r = 0; rank == 0 && r < t->world; r++) total += counts[r];
    char *all = rank == 0 ? vd_calloc(total + 1, 1) : NULL;
    dist_gatherv_bytes(dist_world(), DIST_WORLD, all, counts, xml, mine, 0);
    if (xml) hwloc_free_xmlbuffer(topo, xml);
    if (topo) hwloc_topology_destroy(topo);
    int rc = 0;
    if (rank == 0) {
        char dir[LAUNCH_PATH_MAX];
        metrics_dir(c, dir, sizeof dir);
        rc = vd_make_dirs(dir);
        if (rc < 0) {
            char why[512];
            snprintf(why, sizeof why, "%s", vd_err_msg());
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot record the placement next to "
                            "log.metrics = %s: %s", c->log.metrics, why);
        }
        size_t at = 0;
        for (int r = 0; r < t->world && rc == 0; r++) {
            if (counts[r] > 0) rc = write_xml(dir, t->slots[r].host, all + at, counts[r]);
            at += counts[r];
        }
        if (rc == 0) rc = write_mapping(dir, t, g);
    }
    free(all);
    free(counts);
    return dist_agree(dist_world(), rc);
}
