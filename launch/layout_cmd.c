/* `vdist layout`: where every rank and every group of a layout lands, before an allocation
 * is spent. With --world=N it needs no MPI: ranks fill nodes described by --topology (this
 * host by default) in order, --cores_per_rank each, launch.ranks_per_node per node. Without
 * it, under mpirun or srun, it describes the running job as `vdist train` would place it. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "launch/launch_internal.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: vdist layout [--config FILE] [--section.key=value ...] [options]\n\n"
            "Prints the rank grid of the layout, every group of every kind with the nearest\n"
            "level its ranks share (core, l3, numa, package, node, network), the locality\n"
            "table and the estimated traffic per step across nodes and packages; with\n"
            "parallel.order = auto, the estimate of every order and the one chosen.\n\n"
            "options:\n"
            "  --world=N            describe N ranks without MPI (else: the running job)\n"
            "  --topology=T         one node: an hwloc XML file or an hwloc synthetic\n"
            "                       description, e.g. \"pack:2 [numa] l3:1 core:16 pu:1\"\n"
            "                       (default: this host)\n"
            "  --cores_per_rank=C   cores of each rank (default 1)\n"
            "  --distribution=D     block (default: node 0 takes ranks 0..K-1) or cyclic\n"
            "                       (rank r on node r %% nodes, as Slurm's\n"
            "                       --distribution=cyclic)\n"
            "  --json               one JSON object instead of text\n"
            "launch.ranks_per_node=K sets the ranks per node (0: as many as fit).\n");
}

struct opts {
    const char *config;
    int world, cores_per_rank;
    const char *topology;
    enum launch_distribution dist;
    bool json, help;
    char **keys;
    int nkeys;
};

static int parse_int(const char *name, const char *v, int *out)
{
    char *end = NULL;
    long const x = strtol(v, &end, 10);
    RETURN_IF(!*v || *end || x < 1 || x > 1 << 20, VD_EINVAL,
              "%s=%s: expected an integer from 1 to %d", name, v, 1 << 20);
    *out = (int)x;
    return 0;
}

static int parse(struct opts *o, int argc, char **argv)
{
    memset(o, 0, sizeof *o);
    o->cores_per_rank = 1;
    o->topology = "";
    o->keys = vd_calloc((size_t)argc + 1, sizeof *o->keys);
    bool nodes_given = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) o->help = true;
        else if (!strcmp(a, "--json")) o->json = true;
        else if (!strcmp(a, "--config") && i + 1 < argc) o->config = argv[++i];
        else if (!strncmp(a, "--config=", 9)) o->config = a + 9;
        else if (!strncmp(a, "--world=", 8)) FORWARD_IF(parse_int("--world", a + 8, &o->world));
        else if (!strncmp(a, "--cores_per_rank=", 17))
            FORWARD_IF(parse_int("--cores_per_rank", a + 17, &o->cores_per_rank));
        else if (!strncmp(a, "--topology=", 11)) {
            o->topology = a + 11;
            RETURN_IF(!*o->topology, VD_EINVAL, "--topology= is empty: name an hwloc XML file "
                      "or give a synthetic description (leave the option out for this host)");
        }
        else if (!strcmp(a, "--distribution=block")) o->dist = LAUNCH_DIST_BLOCK;
        else if (!strcmp(a, "--distribution=cyclic")) o->dist = LAUNCH_DIST_CYCLIC;
        else if (!strncmp(a, "--distribution=", 15))
            RETURN_ERR(VD_EINVAL, "%s: the distribution is block or cyclic", a);
        else if (!strncmp(a, "--", 2) && strchr(a, '.') && strchr(a, '=')) o->keys[o->nkeys++] = argv[i];
        else
            RETURN_ERR(VD_EINVAL, "vdist layout: unknown argument '%s' (see vdist layout --help; "
                       "configuration keys are --section.key=value)", a);
        nodes_given |= !strncmp(a, "--topology=", 11) || !strncmp(a, "--cores_per_rank=", 17) ||
                       !strncmp(a, "--distribution=", 15);
    }
    RETURN_IF(nodes_given && o->world == 0, VD_EINVAL,
              "vdist layout: --topology, --cores_per_rank and --distribution describe the nodes "
              "of --world=N ranks without a job; give --world=N (or leave them out to describe "
              "the running job)");
    return 0;
}

/* The JSON names of the group kinds (the contract with scripts). */
static const struct {
    enum dist_kind kind;
    const char *name;
} json_kinds[] = {{DIST_TP, "tp"},     {DIST_CP, "cp"},     {DIST_DP, "dp"},
                  {DIST_DPCP, "dpcp"}, {DIST_TPCP, "tpcp"}, {DIST_PP, "pp"},
                  {DIST_EP, "ep"},     {DIST_ETP, "etp"},   {DIST_EDP, "edp"},
                  {DIST_ETPEP, "etpep"}};
#define NJSON_KINDS (sizeof json_kinds / sizeof json_kinds[0])

static json_t *int_list(const int *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(v[i]));
    return a;
}

static json_t *to_json(const struct launch_config *c, const struct dist_grid *g,
                       const struct launch_slot *slots, const struct launch_order_estimate *est,
                       int nest)
{
    json_t *o = json_object();
    json_object_set_new(o, "world", json_integer(g->world));
    json_object_set_new(o, "order", json_string(g->order));
    int nodes = 0;
    for (int r = 0; r < g->world; r++) nodes = slots[r].node >= nodes ? slots[r].node + 1 : nodes;
    json_t *jn = json_array();
    int *members = vd_calloc((size_t)g->world, sizeof *members);
    for (int nd = 0; nd < nodes; nd++) {
        int n = 0;
        for (int r = 0; r < g->world; r++)
            if (slots[r].node == nd) members[n++] = r;
        json_array_append_new(jn, int_list(members, n));
    }
    json_object_set_new(o, "nodes", jn);
    json_t *ranks = json_array();
    for (int r = 0; r < g->world; r++) {
        struct dist_grid_coords x;
        dist_grid_coords(g, r, &x);
        json_array_append_new(ranks,
                              json_pack("{s:i, s:i, s:s, s:{s:i, s:i, s:i, s:i}, s:{s:i, s:i, "
                                        "s:i, s:i}}", "rank", r, "node", slots[r].node, "cores",
                                        slots[r].cores, "attention", "tp", x.tp, "cp", x.cp, "dp",
                                        x.dp, "pp", x.pp, "moe", "etp", x.etp, "ep", x.ep, "edp",
                                        x.edp, "pp", x.pp));
    }
    json_object_set_new(o, "ranks", ranks);
    json_t *groups = json_object(), *loc = json_object(), *cross = json_object();
    json_t *traffic = json_object();
    double nbytes[DIST_NKIND];
    launch_traffic_estimate(nbytes, c, g);
    for (size_t i = 0; i < NJSON_KINDS; i++) {
        enum dist_kind const k = json_kinds[i].kind;
        json_t *list = json_array();
        for (int r = 0; r < g->world; r++) {
            int count = 0, index = 0;
            dist_grid_group(g, k, r, members, &count, &index);
            if (index == 0) json_array_append_new(list, int_list(members, count));
        }
        json_object_set_new(groups, json_kinds[i].name, list);
        struct launch_locality l;
        launch_place_locality(&l, g, slots, k);
        json_object_set_new(loc, json_kinds[i].name, json_string(launch_level_name(l.level)));
        json_object_set_new(cross, json_kinds[i].name, json_integer(l.cross_node));
        json_object_set_new(traffic, json_kinds[i].name, json_real(nbytes[k]));
    }
    free(members);
    json_object_set_new(o, "groups", groups);
    json_object_set_new(o, "locality", loc);
    json_object_set_new(o, "crossing_nodes", cross);
    json_object_set_new(o, "traffic_bytes_per_rank", traffic);
    struct launch_crossing cr;
    launch_place_crossing(&cr, c, g, slots);
    json_object_set_new(o, "bytes_crossing_nodes", json_real(cr.node_nbytes));
    json_object_set_new(o, "bytes_crossing_packages", json_real(cr.package_nbytes));
    if (nest > 0) {
        json_t *orders = json_array();
        for (int i = 0; i < nest; i++)
            json_array_append_new(orders, json_pack("{s:s, s:f, s:f}", "order", est[i].order,
                                                    "bytes_crossing_nodes",
                                                    est[i].crossing.node_nbytes,
                                                    "bytes_crossing_packages",
                                                    est[i].crossing.package_nbytes));
        json_object_set_new(o, "orders", orders);
    }
    return o;
}

/* The text report: the rank grid, every group with its locality, the locality table. */
static void print_text(const struct launch_config *c, const struct dist_grid *g,
                       const struct launch_slot *slots)
{
    const struct dist_grid_dims *d = &g->dims;
    printf("layout: %d ranks, attention tp %d x cp %d x dp %d x pp %d, MoE etp %d x ep %d x "
           "edp %d x pp %d, order %s\n", g->world, d->tp, d->cp, d->dp, d->pp, d->etp, d->ep,
           d->edp, d->pp, g->order);
    printf("ranks:\n  %5s %-12s %4s %-10s  %3s %3s %3s %3s  %3s %3s %3s\n", "rank", "host",
           "node", "cores", "tp", "cp", "dp", "pp", "etp", "ep", "edp");
    for (int r = 0; r < g->world; r++) {
        struct dist_grid_coords x;
        dist_grid_coords(g, r, &x);
        printf("  %5d %-12s %4d %-10s  %3d %3d %3d %3d  %3d %3d %3d\n", r, slots[r].host,
               slots[r].node, slots[r].cores[0] ? slots[r].cores : "-", x.tp, x.cp, x.dp, x.pp,
               x.etp, x.ep, x.edp);
    }
    int *members = vd_calloc((size_t)g->world, sizeof *members);
    printf("groups (each group's ranks and the nearest level they all share):\n");
    for (size_t i = 0; i < NJSON_KINDS; i++) {
        enum dist_kind const k = json_kinds[i].kind;
        if (dist_grid_group_size(g, k) < 2) continue;
        printf("  %s:", dist_kind_name(k));
        for (int r = 0; r < g->world; r++) {
            int count = 0, index = 0;
            dist_grid_group(g, k, r, members, &count, &index);
            if (index != 0) continue;
            enum launch_level const level = launch_place_group_level(slots, members, count);
            printf(" [");
            for (int j = 0; j < count; j++) printf("%s%d", j ? "," : "", members[j]);
            printf("] %s", launch_level_name(level));
        }
        printf("\n");
    }
    free(members);
    launch_place_print(stdout, c, g, slots);
}

static int describe(const struct opts *o, struct launch_config *c, const struct launch_slot *slots,
                    int world, bool root)
{
    struct launch_order_estimate *est = vd_calloc(LAUNCH_ORDERS_MAX, sizeof *est);
    int nest = 0;
    int rc = launch_place_resolve_order(c, world, slots, root && !o->json ? stdout : NULL, est,
                                        &nest);
    struct dist_grid g;
    if (rc == 0) rc = launch_layout_make(c, world, &g);
    if (rc == 0 && root && o->json) {
        json_t *j = to_json(c, &g, slots, est, nest);
        char *text = json_dumps(j, JSON_INDENT(1));
        printf("%s\n", text);
        free(text);
        json_decref(j);
    } else if (rc == 0 && root) {
        print_text(c, &g, slots);
    }
    free(est);
    return rc;
}

/* --world: the pure description, no MPI. */
static int layout_emulated(const struct opts *o, struct launch_config *c)
{
    struct launch_machine m;
    int rc = launch_machine_load(&m, o->topology);
    struct launch_slot *slots = vd_calloc((size_t)o->world, sizeof *slots);
    if (rc == 0)
        rc = launch_place_emulate(slots, &m, o->world, c->launch.ranks_per_node,
                                  o->cores_per_rank, o->dist);
    if (rc == 0 && !o->json) {
        char desc[160];
        launch_machine_describe(&m, desc, sizeof desc);
        int k = c->launch.ranks_per_node ? c->launch.ranks_per_node
                                         : m.ncores / o->cores_per_rank;
        k = k < o->world ? k : o->world;
        printf("nodes: %d rank(s) per node (%s), %d core(s) per rank, %s distribution; each "
               "node: %s\n", k, c->launch.ranks_per_node ? "launch.ranks_per_node" : "as many as fit",
               o->cores_per_rank, o->dist == LAUNCH_DIST_CYCLIC ? "cyclic" : "block", desc);
    }
    if (rc == 0) rc = describe(o, c, slots, o->world, true);
    free(slots);
    launch_machine_free(&m);
    return rc;
}

/* Under MPI: the running job, placed as vdist train places it. */
static int layout_job(const struct opts *o, struct launch_config *c)
{
    struct launch_topo t;
    int rc = launch_topo_setup(&t, c);
    bool const root = dist_world_rank() == 0;
    if (rc == 0 && root && !o->json) printf("binding: %s; %d thread(s) per rank\n", t.bind_note,
                                            t.threads);
    if (rc == 0) rc = describe(o, c, t.slots, t.world, root);
    launch_topo_free(&t);
    return dist_agree(dist_world(), rc);
}

int launch_layout_main(int argc, char **argv)
{
    struct opts o;
    int rc = parse(&o, argc, argv);
    if (rc == 0 && o.help) {
        usage(stdout);
        free(o.keys);
        return 0;
    }
    bool const mpi = rc == 0 && o.world == 0;
    if (mpi) dist_init(&argc, &argv);
    bool const root = !mpi || dist_world_rank() == 0;
    struct launch_config *c = vd_alloc(sizeof *c);
    if (rc == 0) rc = launch_config_load(c, o.config, o.nkeys, o.keys);
    if (mpi) rc = dist_agree(dist_world(), rc);
    if (rc == 0) rc = mpi ? layout_job(&o, c) : layout_emulated(&o, c);
    if (rc < 0 && root) fprintf(stderr, "vdist: error: %s\n", vd_err_msg());
    free(c);
    free(o.keys);
    if (mpi) dist_finalize();
    return rc < 0 ? 2 : 0;
}
