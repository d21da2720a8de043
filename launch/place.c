/* Placement as pure functions (launch_internal.h): a node's cores and what holds them,
 * where each rank runs, how each group kind of both grids lands on the machine, and which
 * rank order keeps the most traffic inside nodes, then packages.
 *
 * hwloc reads the topology (this host, an XML file or a synthetic description) once into
 * plain arrays (struct launch_machine); everything after that is arithmetic on them, so
 * the placement of a 4-node cluster can be computed and tested on a laptop. */
#include <hwloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "launch/launch_internal.h"

const char *launch_level_name(enum launch_level level)
{
    static const char *const names[LAUNCH_LEVEL_COUNT] = {"core", "l3",   "numa",
                                                          "package", "node", "network"};
    VD_CHECK((int)level >= 0 && level < LAUNCH_LEVEL_COUNT, "level %d", (int)level);
    return names[level];
}

/* ---------------------------------------------------------------- the machine */

/* Logical index of the object of `type` whose cpuset holds the core's, -1 when none. NUMA
 * domains are memory children in hwloc 2 (not ancestors of cores), hence the cpuset test
 * for every level rather than hwloc_get_ancestor_obj_by_type. */
static int holder(hwloc_topology_t topo, hwloc_obj_type_t type, hwloc_obj_t core)
{
    int const n = hwloc_get_nbobjs_by_type(topo, type);
    for (int i = 0; i < n; i++) {
        hwloc_obj_t const o = hwloc_get_obj_by_type(topo, type, (unsigned)i);
        if (o->cpuset && hwloc_bitmap_isincluded(core->cpuset, o->cpuset)) return i;
    }
    return -1;
}

static int machine_fill(struct launch_machine *m, hwloc_topology_t topo, const char *text)
{
    int const ncores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    RETURN_IF(ncores < 1, VD_EINVAL, "topology \"%s\" has no cores (a synthetic description "
              "needs a core level, e.g. \"pack:2 core:16 pu:1\")", text && *text ? text : "of "
              "this host");
    m->ncores = ncores;
    for (int l = 0; l < LAUNCH_NODE_LEVELS; l++)
        m->obj[l] = vd_calloc((size_t)ncores, sizeof *m->obj[l]);
    m->os_index = vd_calloc((size_t)ncores, sizeof *m->os_index);
    static const hwloc_obj_type_t types[LAUNCH_NODE_LEVELS] = {
        HWLOC_OBJ_CORE, HWLOC_OBJ_L3CACHE, HWLOC_OBJ_NUMANODE, HWLOC_OBJ_PACKAGE};
    for (int l = 0; l < LAUNCH_NODE_LEVELS; l++) {
        int const n = hwloc_get_nbobjs_by_type(topo, types[l]);
        m->count[l] = n > 0 ? n : 0;
    }
    for (int c = 0; c < ncores; c++) {
        hwloc_obj_t const core = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)c);
        m->obj[LAUNCH_LEVEL_CORE][c] = c;
        for (int l = 1; l < LAUNCH_NODE_LEVELS; l++) m->obj[l][c] = holder(topo, types[l], core);
        m->os_index[c] = hwloc_bitmap_first(core->cpuset);
    }
    return 0;
}

int launch_machine_load(struct launch_machine *m, const char *topology)
{
    memset(m, 0, sizeof *m);
    hwloc_topology_t topo;
    RETURN_IF(hwloc_topology_init(&topo) != 0, VD_EIO, "hwloc cannot start");
    struct stat st;
    int rc = 0;
    if (topology && *topology && stat(topology, &st) == 0) {
        if (hwloc_topology_set_xml(topo, topology) != 0)
            rc = vd_err_set(VD_EINVAL, __FILE__, __LINE__,
                            "topology %s: hwloc cannot read it as an XML topology", topology);
    } else if (topology && *topology && hwloc_topology_set_synthetic(topo, topology) != 0) {
        rc = vd_err_set(VD_EINVAL, __FILE__, __LINE__,
                        "topology \"%s\" is neither an existing hwloc XML file nor an hwloc "
                        "synthetic description (levels joined by spaces, e.g. \"pack:2 [numa] "
                        "l3:1 core:16 pu:1\")", topology);
    }
    if (rc == 0 && hwloc_topology_load(topo) != 0)
        rc = vd_err_set(VD_EINVAL, __FILE__, __LINE__, "topology \"%s\": hwloc cannot load it",
                        topology && *topology ? topology : "of this host");
    if (rc == 0) rc = machine_fill(m, topo, topology);
    hwloc_topology_destroy(topo);
    return rc;
}

void launch_machine_free(struct launch_machine *m)
{
    for (int l = 0; l < LAUNCH_NODE_LEVELS; l++) free(m->obj[l]);
    free(m->os_index);
    memset(m, 0, sizeof *m);
}

void launch_machine_describe(const struct launch_machine *m, char *buf, size_t nbytes)
{
    snprintf(buf, nbytes, "%d package(s), %d NUMA domain(s), %d L3 cache(s), %d cores",
             m->count[LAUNCH_LEVEL_PACKAGE], m->count[LAUNCH_LEVEL_NUMA],
             m->count[LAUNCH_LEVEL_L3], m->ncores);
}

/* ---------------------------------------------------------------- slots */

/* "0-3,8,10-11" for sorted indexes into buf; a list that does not fit keeps its first
 * pieces and ends in ",...". */
static void cores_text(char *buf, size_t nbytes, const int *cores, int n)
{
    size_t const cap = (size_t)n * 24 + 1, dots = 4; /* a piece: ",-2147483648-..." */
    char *full = vd_calloc(cap, 1);
    size_t used = 0;
    for (int i = 0; i < n;) {
        int j = i;
        while (j + 1 < n && cores[j + 1] == cores[j] + 1) j++;
        used += (size_t)(j > i ? snprintf(full + used, cap - used, "%s%d-%d", i ? "," : "",
                                          cores[i], cores[j])
                               : snprintf(full + used, cap - used, "%s%d", i ? "," : "",
                                          cores[i]));
        i = j + 1;
    }
    if (used >= nbytes) { /* cut after the last whole piece that leaves room for ",..." */
        size_t cut = nbytes - dots - 1;
        while (cut > 0 && full[cut] != ',') cut--;
        memcpy(full + cut, ",...", dots + 1);
    }
    snprintf(buf, nbytes, "%s", full);
    free(full);
}

static int cmp_int(const void *a, const void *b)
{
    int const x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

void launch_slot_make(struct launch_slot *s, const struct launch_machine *m, int node,
                      const int *cores, int n, const char *host)
{
    memset(s, 0, sizeof *s);
    s->node = node;
    s->ncores = n;
    snprintf(s->host, sizeof s->host, "%s", host ? host : "");
    int *sorted = vd_calloc((size_t)(n > 0 ? n : 1), sizeof *sorted);
    if (n > 0) memcpy(sorted, cores, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_int);
    cores_text(s->cores, sizeof s->cores, sorted, n);
    for (int l = 0; l < LAUNCH_NODE_LEVELS; l++) {
        int id = n > 0 ? m->obj[l][sorted[0]] : -1;
        for (int i = 1; i < n && id >= 0; i++)
            if (m->obj[l][sorted[i]] != id) id = -1;
        s->id[l] = id;
        for (int c = 0; c < m->ncores && id >= 0; c++) s->id_cores[l] += m->obj[l][c] == id;
    }
    free(sorted);
}

int launch_place_share(const struct launch_machine *m, int node_ranks, int index,
                       int cores_per_rank, int *cores)
{
    VD_CHECK(node_ranks >= 1 && index >= 0 && index < node_ranks && cores_per_rank >= 0,
             "share %d of %d, %d cores", index, node_ranks, cores_per_rank);
    int const c = cores_per_rank ? cores_per_rank : m->ncores / node_ranks;
    if (c < 1 || (long long)c * node_ranks > m->ncores) return 0;
    /* Whole blocks per NUMA domain, the domains in logical order (their cores are
     * contiguous in hwloc's logical order). When they hold every rank's block, block i is
     * the i-th of them; a domain's leftover cores stay idle rather than split a block. */
    const int *numa = m->obj[LAUNCH_LEVEL_NUMA];
    int fit = 0;
    for (int i = 0; i < m->ncores;) {
        int j = i;
        while (j < m->ncores && numa[j] == numa[i]) j++;
        fit += numa[i] >= 0 ? (j - i) / c : 0;
        i = j;
    }
    int first = index * c;
    if (fit >= node_ranks) {
        int seen = 0;
        for (int i = 0; i < m->ncores;) {
            int j = i;
            while (j < m->ncores && numa[j] == numa[i]) j++;
            int const here = (j - i) / c;
            if (index < seen + here) {
                first = i + (index - seen) * c;
                break;
            }
            seen += here;
            i = j;
        }
    }
    for (int i = 0; i < c; i++) cores[i] = first + i;
    return c;
}

int launch_place_emulate(struct launch_slot *slots, const struct launch_machine *m, int world,
                         int ranks_per_node, int cores_per_rank,
                         enum launch_distribution dist)
{
    RETURN_IF(world < 1, VD_EINVAL, "--world=%d: the world size must be at least 1", world);
    RETURN_IF(cores_per_rank < 1 || cores_per_rank > m->ncores, VD_EINVAL,
              "--cores_per_rank=%d: each rank needs 1 to %d cores (the node's cores)",
              cores_per_rank, m->ncores);
    int const k = ranks_per_node ? ranks_per_node : m->ncores / cores_per_rank;
    RETURN_IF(ranks_per_node < 0 || (long long)k * cores_per_rank > m->ncores, VD_EINVAL,
              "launch.ranks_per_node = %d with %d core(s) per rank needs %lld cores per node; "
              "the node has %d: at most %d ranks fit (0 = as many as fit)",
              ranks_per_node, cores_per_rank, (long long)k * cores_per_rank, m->ncores,
              m->ncores / cores_per_rank);
    int const nodes = (world + k - 1) / k;
    int *cores = vd_calloc((size_t)cores_per_rank, sizeof *cores);
    for (int r = 0; r < world; r++) {
        int node = r / k, index = r % k;
        if (dist == LAUNCH_DIST_CYCLIC) {
            node = r % nodes;
            index = r / nodes;
        }
        /* Cores are dealt as if every node were full (k shares): a node that holds fewer
         * ranks (the last of a block placement, the later ones of a cyclic placement of a
         * world that is not a multiple of k) leaves its last cores idle. */
        int const n = launch_place_share(m, k, index, cores_per_rank, cores);
        VD_CHECK(n == cores_per_rank, "share of rank %d", r);
        char host[LAUNCH_HOST_MAX];
        snprintf(host, sizeof host, "node%d", node);
        launch_slot_make(&slots[r], m, node, cores, n, host);
    }
    free(cores);
    return 0;
}

/* ---------------------------------------------------------------- locality */

/* The package a slot is in, as a key unique over the job; a rank spanning packages (or on
 * a node without package objects) gets a key of its own. */
static long package_key(const struct launch_slot *s, int rank)
{
    int const p = s->id[LAUNCH_LEVEL_PACKAGE];
    return p >= 0 ? (long)s->node * 4096 + p : -1 - (long)rank;
}

enum launch_level launch_place_group_level(const struct launch_slot *slots, const int *members,
                                           int n)
{
    if (n < 2) return LAUNCH_LEVEL_CORE;
    const struct launch_slot *first = &slots[members[0]];
    for (int i = 1; i < n; i++)
        if (slots[members[i]].node != first->node) return LAUNCH_LEVEL_NETWORK;
    enum launch_level best = LAUNCH_LEVEL_NODE;
    for (int l = 0; l < LAUNCH_NODE_LEVELS; l++) {
        bool shared = first->id[l] >= 0;
        for (int i = 1; i < n && shared; i++) shared = slots[members[i]].id[l] == first->id[l];
        if (shared && (best == LAUNCH_LEVEL_NODE || first->id_cores[l] < first->id_cores[best]))
            best = (enum launch_level)l;
    }
    return best;
}

void launch_place_locality(struct launch_locality *out, const struct dist_grid *g,
                           const struct launch_slot *slots, enum dist_kind kind)
{
    int const size = dist_grid_group_size(g, kind);
    int *members = vd_calloc((size_t)size, sizeof *members);
    memset(out, 0, sizeof *out);
    out->size = size;
    out->level = LAUNCH_LEVEL_CORE;
    for (int r = 0; r < g->world; r++) {
        int index = 0;
        dist_grid_group(g, kind, r, members, NULL, &index);
        if (index != 0) continue; /* each group once, at its first member */
        out->groups++;
        enum launch_level const level = launch_place_group_level(slots, members, size);
        if (level > out->level) out->level = level;
        bool node_cross = false, package_cross = false;
        for (int i = 1; i < size; i++) {
            node_cross |= slots[members[i]].node != slots[members[0]].node;
            package_cross |= package_key(&slots[members[i]], members[i]) !=
                             package_key(&slots[members[0]], members[0]);
        }
        out->cross_node += node_cross;
        out->cross_package += package_cross;
    }
    free(members);
}

/* ---------------------------------------------------------------- crossing traffic */

/* Counts of a rank's traffic crossing nodes and packages, as fractions of its bytes. */
static void rank_crossing(const struct launch_slot *slots, const int *members, int size,
                          int index, enum launch_pattern pattern, double *node_frac,
                          double *package_frac)
{
    *node_frac = *package_frac = 0.0;
    if (size < 2) return;
    int const me = members[index];
    int peers[2], npeers = 0;
    double weight = 0.0;
    if (pattern == LAUNCH_PATTERN_SPREAD) {
        for (int i = 0; i < size; i++) {
            if (i == index) continue;
            *node_frac += slots[members[i]].node != slots[me].node;
            *package_frac += package_key(&slots[members[i]], members[i]) !=
                             package_key(&slots[me], me);
        }
        *node_frac /= size - 1;
        *package_frac /= size - 1;
        return;
    }
    if (pattern == LAUNCH_PATTERN_RING) {
        peers[npeers++] = members[(index + 1) % size];
        weight = 1.0;
    } else { /* half forward to the next member, half backward to the previous */
        bool const ring = pattern == LAUNCH_PATTERN_CYCLE;
        if (index + 1 < size || ring) peers[npeers++] = members[(index + 1) % size];
        if (index > 0 || ring) peers[npeers++] = members[(index + size - 1) % size];
        weight = 0.5;
    }
    for (int i = 0; i < npeers; i++) {
        *node_frac += weight * (slots[peers[i]].node != slots[me].node);
        *package_frac +=
            weight * (package_key(&slots[peers[i]], peers[i]) != package_key(&slots[me], me));
    }
}

void launch_place_crossing(struct launch_crossing *out, const struct launch_config *c,
                           const struct dist_grid *g, const struct launch_slot *slots)
{
    memset(out, 0, sizeof *out);
    double nbytes[DIST_NKIND];
    launch_traffic_estimate(nbytes, c, g);
    for (int k = 0; k < DIST_NKIND; k++) {
        if (nbytes[k] <= 0.0 || k == DIST_WORLD) continue;
        int const size = dist_grid_group_size(g, (enum dist_kind)k);
        if (size < 2) continue;
        enum launch_pattern const pattern = launch_traffic_pattern(c, (enum dist_kind)k);
        int *members = vd_calloc((size_t)size, sizeof *members);
        for (int r = 0; r < g->world; r++) {
            int index = 0;
            dist_grid_group(g, (enum dist_kind)k, r, members, NULL, &index);
            double fn, fp;
            rank_crossing(slots, members, size, index, pattern, &fn, &fp);
            out->kind_node_nbytes[k] += fn * nbytes[k];
            out->node_nbytes += fn * nbytes[k];
            out->package_nbytes += fp * nbytes[k];
        }
        free(members);
    }
}

/* ---------------------------------------------------------------- orders */

static double mib(double nbytes) { return nbytes / (1024.0 * 1024.0); }

/* Two orders give the same grids when every axis of size > 1 has the same stride. */
static void grid_signature(const struct dist_grid *g, int sig[2][4])
{
    for (int w = 0; w < 2; w++)
        for (int a = 0; a < 4; a++) sig[w][a] = g->size[w][a] > 1 ? g->stride[w][a] : 0;
}

static int grid_dims(const struct launch_config *c, int world, const char *order,
                     struct dist_grid *g)
{
    const struct launch_parallel *p = &c->parallel;
    return dist_grid_init(g, world, p->tp, p->cp, p->ep, p->etp ? p->etp : p->tp, p->pp, order);
}

/* a moves fewer bytes across nodes, or as many and fewer across packages: 1; b does: -1;
 * neither: 0. Bytes are sums of the same terms in a different order; differences below one
 * part in 1e9 are rounding, not a better order. */
static int compare_bytes(const struct launch_order_estimate *a,
                         const struct launch_order_estimate *b)
{
    double const tol = 1e-9 * (a->crossing.package_nbytes + b->crossing.package_nbytes + 1.0);
    if (a->crossing.node_nbytes < b->crossing.node_nbytes - tol) return 1;
    if (a->crossing.node_nbytes > b->crossing.node_nbytes + tol) return -1;
    if (a->crossing.package_nbytes < b->crossing.package_nbytes - tol) return 1;
    if (a->crossing.package_nbytes > b->crossing.package_nbytes + tol) return -1;
    return 0;
}

static bool fewer_bytes(const struct launch_order_estimate *a,
                        const struct launch_order_estimate *b)
{
    return compare_bytes(a, b) > 0;
}

static bool better(const struct launch_order_estimate *a, const struct launch_order_estimate *b)
{
    int const by_bytes = compare_bytes(a, b);
    if (by_bytes != 0) return by_bytes > 0;
    bool const ad = strcmp(a->order, DIST_GRID_ORDER_DEFAULT) == 0;
    bool const bd = strcmp(b->order, DIST_GRID_ORDER_DEFAULT) == 0;
    if (ad != bd) return ad;
    return strcmp(a->order, b->order) < 0;
}

int launch_place_orders(struct launch_order_estimate *out, const struct launch_config *c,
                        int world, const struct launch_slot *slots)
{
    static const char *const names[5] = {"tp", "cp", "ep", "dp", "pp"};
    int sigs[LAUNCH_ORDERS_MAX][2][4], key_of[LAUNCH_ORDERS_MAX];
    int count = 0;
    /* Permutations in lexicographic order of the index digits: i is a number in base 5
     * whose digits must all differ. */
    for (int i = 0; i < 3125; i++) {
        int d[5], used = 0, x = i;
        bool ok = true;
        for (int j = 4; j >= 0; j--, x /= 5) {
            d[j] = x % 5;
            ok &= !(used & (1 << d[j]));
            used |= 1 << d[j];
        }
        if (!ok) continue;
        char order[16];
        snprintf(order, sizeof order, "%s-%s-%s-%s-%s", names[d[0]], names[d[1]], names[d[2]],
                 names[d[3]], names[d[4]]);
        struct dist_grid g;
        if (grid_dims(c, world, order, &g) < 0) continue;
        int sig[2][4];
        grid_signature(&g, sig);
        /* A class of orders giving the same grids goes by the member that places tp
         * earliest, then cp, ep, dp (the default order, which comes first, when it is a
         * member): axes of size one then sit where a reader expects them. */
        int same = -1;
        for (int j = 0; j < count && same < 0; j++)
            if (memcmp(sigs[j], sig, sizeof sig) == 0) same = j;
        int key = 0; /* the position of each name, tp's the most significant digit */
        for (int nm = 0; nm < 5; nm++) {
            int pos = 0;
            while (d[pos] != nm) pos++;
            key = key * 5 + pos;
        }
        if (same >= 0) {
            if (key < key_of[same]) {
                snprintf(out[same].order, sizeof out[same].order, "%s", order);
                key_of[same] = key;
            }
            continue;
        }
        key_of[count] = key;
        struct launch_order_estimate e;
        snprintf(e.order, sizeof e.order, "%s", order);
        launch_place_crossing(&e.crossing, c, &g, slots);
        memcpy(sigs[count], sig, sizeof sig);
        out[count++] = e;
    }
    if (count == 0) {
        struct dist_grid g;
        FORWARD_IF(grid_dims(c, world, DIST_GRID_ORDER_DEFAULT, &g));
        RETURN_ERR(VD_EINVAL, "no rank order gives a valid grid");
    }
    /* insertion sort, best first */
    for (int i = 1; i < count; i++) {
        struct launch_order_estimate const e = out[i];
        int j = i;
        for (; j > 0 && better(&e, &out[j - 1]); j--) out[j] = out[j - 1];
        out[j] = e;
    }
    return count;
}

int launch_place_resolve_order(struct launch_config *c, int world,
                               const struct launch_slot *slots, FILE *out,
                               struct launch_order_estimate *est, int *norders)
{
    if (norders) *norders = 0;
    if (strcmp(c->parallel.order, "auto") != 0) return 0;
    struct launch_order_estimate *mine = est ? est : vd_calloc(LAUNCH_ORDERS_MAX, sizeof *mine);
    int const n = launch_place_orders(mine, c, world, slots);
    if (n > 0) {
        if (out) {
            fprintf(out, "parallel.order = auto: %d distinct order(s), estimated MiB per step "
                    "across nodes / packages:\n", n);
            for (int i = 0; i < n; i++)
                fprintf(out, "  %-16s %12.3f %12.3f%s\n", mine[i].order,
                        mib(mine[i].crossing.node_nbytes), mib(mine[i].crossing.package_nbytes),
                        i == 0 ? "  <- chosen" : "");
        }
        snprintf(c->parallel.order, sizeof c->parallel.order, "%s", mine[0].order);
    }
    if (!est) free(mine);
    if (norders && n > 0) *norders = n;
    return n < 0 ? n : 0;
}

/* ---------------------------------------------------------------- the report */

/* Group kinds in the order the report lists them: those that talk in every layer first. */
static const enum dist_kind report_kinds[] = {DIST_TP,   DIST_ETP,  DIST_ETPEP, DIST_EP,
                                              DIST_CP,   DIST_TPCP, DIST_PP,    DIST_DP,
                                              DIST_DPCP, DIST_EDP};
#define NREPORT (sizeof report_kinds / sizeof report_kinds[0])

void launch_place_print(FILE *out, const struct launch_config *c, const struct dist_grid *g,
                        const struct launch_slot *slots)
{
    int nodes = 0;
    for (int r = 0; r < g->world; r++) nodes = slots[r].node + 1 > nodes ? slots[r].node + 1 : nodes;
    double nbytes[DIST_NKIND];
    launch_traffic_estimate(nbytes, c, g);
    struct launch_crossing cross;
    launch_place_crossing(&cross, c, g, slots);
    fprintf(out, "locality: %d rank(s) on %d node(s), order %s\n", g->world, nodes, g->order);
    fprintf(out, "  %-9s %5s %7s  %-8s %10s %13s %14s %14s\n", "group", "size", "groups",
            "shared", "cross node", "cross package", "MiB/step/rank", "x-node MiB/step");
    struct launch_locality loc[NREPORT];
    for (size_t i = 0; i < NREPORT; i++) {
        enum dist_kind const k = report_kinds[i];
        launch_place_locality(&loc[i], g, slots, k);
        fprintf(out, "  %-9s %5d %7d  %-8s %10d %13d %14.3f %14.3f\n", dist_kind_name(k),
                loc[i].size, loc[i].groups, launch_level_name(loc[i].level), loc[i].cross_node,
                loc[i].cross_package, mib(nbytes[k]), mib(cross.kind_node_nbytes[k]));
    }
    fprintf(out, "  estimated traffic per step, all ranks: %.3f MiB across nodes (the "
            "x-node column summed), %.3f MiB across packages\n", mib(cross.node_nbytes),
            mib(cross.package_nbytes));
    /* Kinds that cross nodes here while some valid order keeps every group inside one. */
    struct launch_order_estimate *est = vd_calloc(LAUNCH_ORDERS_MAX, sizeof *est);
    int const n = launch_place_orders(est, c, g->world, slots);
    char names[256] = "";
    int keeper = -1;
    enum dist_kind keeper_kind = DIST_TP;
    size_t used = 0;
    for (size_t i = 0; i < NREPORT && n > 0; i++) {
        if (loc[i].cross_node == 0 || loc[i].size < 2) continue;
        for (int o = 0; o < n; o++) {
            struct dist_grid alt;
            struct launch_locality l;
            if (grid_dims(c, g->world, est[o].order, &alt) < 0) continue;
            launch_place_locality(&l, &alt, slots, report_kinds[i]);
            if (l.cross_node > 0) continue;
            if (keeper < 0) {
                keeper = o;
                keeper_kind = report_kinds[i];
            }
            char one[64];
            int const len = snprintf(one, sizeof one, "%s%s (%d of %d groups)", used ? ", " : "",
                                     dist_kind_name(report_kinds[i]), loc[i].cross_node,
                                     loc[i].groups);
            if (used + (size_t)len < sizeof names) {
                memcpy(names + used, one, (size_t)len + 1);
                used += (size_t)len;
            }
            break;
        }
    }
    if (keeper >= 0) {
        /* a warning when another order moves less across nodes (then packages), a note
         * when this one already moves the least */
        struct launch_order_estimate here = {.crossing = cross};
        snprintf(here.order, sizeof here.order, "%s", g->order);
        bool const worse = fewer_bytes(&est[0], &here);
        fprintf(out, "%s: %s cross node boundaries under order %s (%.3f MiB per step "
                "across nodes), while other orders keep each inside nodes (e.g. %s for %s: "
                "%.3f MiB per step across nodes)", worse ? "warning" : "note", names, g->order,
                mib(cross.node_nbytes), est[keeper].order, dist_kind_name(keeper_kind),
                mib(est[keeper].crossing.node_nbytes));
        if (worse)
            fprintf(out, "; parallel.order = auto would pick %s (%.3f MiB)", est[0].order,
                    mib(est[0].crossing.node_nbytes));
        else
            fprintf(out, "; this order already moves the least traffic across nodes");
        fprintf(out, "\n");
    }
    free(est);
}
