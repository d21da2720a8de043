/* The running job's placement, as a user meets it: launch.bind (auto binds an unbound rank
 * to its share of the node's cores and runs that many threads; a launcher's binding is kept;
 * none leaves it; more ranks than cores stay unbound), the record next to the metrics
 * (mapping.tsv with every rank's cores and coordinates, topology-HOST.xml that hwloc reads
 * back), nodes declared by launch.ranks_per_node (the locality table and the direct writes
 * follow them), and `vdist layout`: its JSON contract on an emulated 4-node cluster without
 * MPI, the same under mpirun for the real job, and its refusals.
 *
 * Expectations that depend on this host's core count (binding, threads) read it with
 * launch_machine_load(""), the same hwloc view the program has. Every child runs inside a
 * fresh /tmp/vdist_topo_XXXXXX, removed at the end. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <CUnit/CUnit.h>
#include <jansson.h>

#include "launch/launch_internal.h"
#include "tests/testutil.h"

#define CHILD_TIMEOUT_S 120
#define EXPECT(cond, ...) TU_EXPECT(cond, __VA_ARGS__)

static struct tu_env g_env;
static struct tu_run g_run;
static int g_cores;   /* this host's cores, as hwloc sees them */
static int g_sockets; /* and its packages */

static const char *tp(const char *name) { return tu_path(g_env.tmp, name); }
static bool out_has(const char *s) { return g_run.out && strstr(g_run.out, s) != NULL; }

/* `vdist ARGS` on `ranks` ranks (1: without mpirun) with OMP_NUM_THREADS=1. */
__attribute__((format(printf, 2, 3))) static int run(int ranks, const char *fmt, ...)
{
    char args[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    return tu_vdist_run(&g_run, &g_env, ranks, CHILD_TIMEOUT_S, "%s", args);
}

/* A shell command line in g_env.tmp, with the environment as given there. */
static int shell(const char *command)
{
    snprintf(g_run.cmd, sizeof g_run.cmd, "%s", command);
    return tu_shell_run(&g_run, g_env.tmp, CHILD_TIMEOUT_S, command);
}

static char g_tiny[1200]; /* "--config ROOT/configs/tiny.ini" */

/* ---------------------------------------------------------------- mapping.tsv */

struct mapping_row {
    int rank, node;
    char host[64], cores[64];
    int tp, cp, dp, pp, etp, ep, edp;
};

/* Reads dir/mapping.tsv: a comment line, the header, then one row per rank in order.
 * Returns the rows read (at most cap), or -1 when the file is missing or malformed. */
static int read_mapping(const char *dir, struct mapping_row *rows, int cap)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/mapping.tsv", dir);
    char *text = tu_file_read(path, NULL);
    if (!text) return -1;
    int n = 0, line = 0;
    for (char *save = NULL, *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        line++;
        if (line == 1 && l[0] != '#') n = -1;
        if (line == 2 && strcmp(l, "rank\thost\tnode\tcores\ttp\tcp\tdp\tpp\tetp\tep\tedp") != 0)
            n = -1;
        if (n < 0 || line <= 2) continue;
        struct mapping_row r;
        if (n >= cap || sscanf(l, "%d\t%63[^\t]\t%d\t%63[^\t]\t%d\t%d\t%d\t%d\t%d\t%d\t%d", &r.rank,
                               r.host, &r.node, r.cores, &r.tp, &r.cp, &r.dp, &r.pp, &r.etp,
                               &r.ep, &r.edp) != 11 || r.rank != n) {
            n = -1;
            continue;
        }
        rows[n++] = r;
    }
    free(text);
    return n;
}

/* ---------------------------------------------------------------- tests */

/* 2 ranks the launcher left unbound: each gets one core of its own (when the host has 2
 * or more) and one thread; the mapping shows the cores the ranks were really bound to (read
 * back from the kernel by hwloc), and the topology record loads as this host's. */
static void test_bind_auto(void)
{
    int const rc = run(2, "train %s --train.steps=2 --log.metrics=%s/auto/metrics.jsonl",
                       g_tiny, g_env.tmp);
    if (!EXPECT(rc == 0, "2 ranks must train, exit status %d", rc)) return;
    struct mapping_row rows[8];
    int const n = read_mapping(tp("auto"), rows, 8);
    if (!EXPECT(n == 2, "auto/mapping.tsv must hold a row per rank (2), read %d", n)) return;
    if (g_cores >= 2) {
        int const share = g_cores / 2;
        char want[96];
        snprintf(want, sizeof want, share == 1 ? "bound each rank to 1 core of its node"
                                               : "bound each rank to %d cores of its node",
                 share);
        EXPECT(out_has(want) && out_has("1 thread(s) per rank"),
               "with %d cores, 2 unbound ranks must be bound to %d core(s) each and run "
               "1 thread (OMP_NUM_THREADS=1 set): \"%s\"", g_cores, share, want);
        EXPECT(strcmp(rows[0].cores, rows[1].cores) != 0,
               "the two ranks must run on different cores, mapping says %s and %s",
               rows[0].cores, rows[1].cores);
        if (share == 1)
            EXPECT(!strcmp(rows[0].cores, "0") && !strcmp(rows[1].cores, "1"),
                   "ranks 0 and 1 must be bound to logical cores 0 and 1, mapping says %s "
                   "and %s", rows[0].cores, rows[1].cores);
    } else {
        EXPECT(out_has("not bound: 2 ranks share the 1 cores"),
               "on a 1-core host 2 ranks must stay unbound, saying why");
    }
    EXPECT(rows[0].node == 0 && rows[1].node == 0 && rows[0].dp == 0 && rows[1].dp == 1,
           "mapping: both ranks on node 0, dp coordinates 0 and 1; got nodes %d %d, dp %d %d",
           rows[0].node, rows[1].node, rows[0].dp, rows[1].dp);
    char xml[1200];
    snprintf(xml, sizeof xml, "%s/auto/topology-%s.xml", g_env.tmp, rows[0].host);
    struct launch_machine m;
    int const lrc = launch_machine_load(&m, xml);
    EXPECT(lrc == 0 && m.ncores == g_cores,
           "%s must be an hwloc XML of this host (%d cores), load returned %d with %d cores",
           xml, g_cores, lrc, m.ncores);
    launch_machine_free(&m);
    EXPECT(out_has("locality: 2 rank(s) on 1 node(s)"), "the locality table must be printed");
}

/* One rank without OMP_NUM_THREADS: bound to every core, that many threads. */
static void test_threads_follow_binding(void)
{
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "env -u OMP_NUM_THREADS '%s' layout %s", g_env.vdist, g_tiny);
    int const rc = shell(cmd);
    if (!EXPECT(rc == 0, "`vdist layout` on one rank must succeed, exit status %d", rc)) return;
    char want[96];
    snprintf(want, sizeof want, "%d thread(s) per rank", g_cores);
    EXPECT(out_has(want), "one unbound rank without OMP_NUM_THREADS must run one thread per "
           "core of the host (%d): \"%s\"", g_cores, want);
}

/* launch.bind = none keeps every rank on all cores; a launcher's binding is kept. */
static void test_bind_none_and_launcher(void)
{
    int rc = run(2, "train %s --train.steps=1 --launch.bind=none --log.metrics=%s/none/m.jsonl",
                 g_tiny, g_env.tmp);
    if (EXPECT(rc == 0, "launch.bind = none must train, exit status %d", rc)) {
        EXPECT(out_has("launch.bind = none: binding left as it is (unbound)"),
               "launch.bind = none must say that it left the ranks alone");
        struct mapping_row rows[4];
        int const n = read_mapping(tp("none"), rows, 4);
        char all[32];
        snprintf(all, sizeof all, g_cores > 1 ? "0-%d" : "0", g_cores - 1);
        EXPECT(n == 2 && !strcmp(rows[0].cores, all) && !strcmp(rows[1].cores, all),
               "unbound ranks run on every core (%s), mapping says %s and %s", all,
               n == 2 ? rows[0].cores : "?", n == 2 ? rows[1].cores : "?");
    }
    g_run.mpirun_options = "--bind-to core";
    rc = run(2, "layout %s", g_tiny);
    g_run.mpirun_options = NULL;
    if (EXPECT(rc == 0, "`mpirun --bind-to core vdist layout` must succeed, exit status %d", rc))
        EXPECT(out_has("kept the launcher's binding (rank 0: 1 core(s), 1 rank(s) bound to "
                       "that set)") && out_has("1 thread(s) per rank"),
               "a rank the launcher bound must keep its binding and say so");
    /* Open MPI binding 2 ranks to the one package of a 1-package host binds them to every
     * core they may use, which is no binding: launch.bind = auto shares the cores. */
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "env -u OMP_NUM_THREADS mpirun --allow-run-as-root "
             "--oversubscribe --bind-to socket -np 2 '%s' layout %s", g_env.vdist, g_tiny);
    rc = shell(cmd);
    char want[96];
    snprintf(want, sizeof want, g_cores / 2 == 1 ? "bound each rank to 1 core of its node"
                                                 : "bound each rank to %d cores of its node",
             g_cores / 2);
    if (EXPECT(rc == 0, "`mpirun --bind-to socket -np 2 vdist layout` must succeed, exit "
               "status %d", rc))
        EXPECT(g_sockets != 1 || g_cores < 2 || out_has(want),
               "2 ranks bound to the one package of a %d-core host must be re-bound to "
               "%d core(s) each: \"%s\"", g_cores, g_cores / 2, want);
}

/* More ranks than cores: nobody is bound (binding would stack ranks on cores). */
static void test_oversubscribed_unbound(void)
{
    int const ranks = g_cores < 4 ? 4 : g_cores + 1;
    if (ranks > 8) return; /* a big host: the suite does not start that many ranks */
    int const rc = run(ranks, "layout %s --train.global_batch=%d --train.micro_batch=1", g_tiny,
                       ranks);
    char want[128];
    snprintf(want, sizeof want, "not bound: %d ranks share the %d cores of a node", ranks,
             g_cores);
    EXPECT(rc == 0 && out_has(want), "%d ranks on %d cores must stay unbound: \"%s\" (exit "
           "status %d)", ranks, g_cores, want, rc);
}

/* launch.ranks_per_node = 2 on 4 ranks: two nodes in the table, the mapping and the
 * direct writes (rank 0 writes directly only to rank 1 of its 3 etp x ep peers). */
static void test_declared_nodes(void)
{
    int const rc = run(4, "train %s --train.steps=1 --train.global_batch=8 --parallel.ep=4 "
                       "--launch.ranks_per_node=2 --log.metrics=%s/nodes/m.jsonl", g_tiny,
                       g_env.tmp);
    if (!EXPECT(rc == 0, "4 ranks on declared nodes of 2 must train, exit status %d", rc)) return;
    EXPECT(out_has("locality: 4 rank(s) on 2 node(s)"), "the table must see 2 declared nodes");
    EXPECT(out_has("rank 0 writes directly to 1 of its 3 etp x ep peers"),
           "direct writes must stay inside a declared node (1 of 3 peers)");
    struct mapping_row rows[4];
    int const n = read_mapping(tp("nodes"), rows, 4);
    EXPECT(n == 4 && rows[0].node == 0 && rows[1].node == 0 && rows[2].node == 1 &&
               rows[3].node == 1,
           "mapping.tsv must put ranks 0,1 on node 0 and 2,3 on node 1 (read %d rows)", n);
}

/* ---------------------------------------------------------------- vdist layout */

static const char *const kinds[] = {"tp", "cp", "dp", "dpcp", "tpcp", "pp", "ep", "etp", "edp",
                                    "etpep"};
static const char *const levels[] = {"core", "l3", "numa", "package", "node", "network"};

/* Mixtral-8x7B, tp2 | etp1 ep8, pp4, on 4 nodes x 2 packages x 16 cores, without MPI. */
static void test_layout_json_cluster(void)
{
    int const rc = run(1, "layout --config %s/configs/mixtral-8x7b.ini --world=128 "
                       "--launch.ranks_per_node=32 --topology='pack:2 [numa] l3:1 core:16 pu:1' "
                       "--parallel.tp=2 --parallel.ep=8 --parallel.etp=1 --parallel.pp=4 --parallel.order=auto "
                       "--json", g_env.root);
    if (!EXPECT(rc == 0, "vdist layout --json must succeed, exit status %d", rc)) return;
    json_error_t err;
    json_t *o = json_loads(g_run.out, 0, &err);
    if (!EXPECT(json_is_object(o), "the output must be one JSON object: %s", err.text)) return;
    EXPECT(json_integer_value(json_object_get(o, "world")) == 128, "world must be 128");
    const json_t *nodes = json_object_get(o, "nodes");
    bool nodes_ok = json_array_size(nodes) == 4;
    for (size_t i = 0; nodes_ok && i < 4; i++) {
        const json_t *l = json_array_get(nodes, i);
        nodes_ok = json_array_size(l) == 32;
        for (size_t j = 0; nodes_ok && j < 32; j++)
            nodes_ok = json_integer_value(json_array_get(l, j)) == (json_int_t)(32 * i + j);
    }
    EXPECT(nodes_ok, "nodes must be 4 lists of 32 consecutive ranks");
    const json_t *groups = json_object_get(o, "groups"), *loc = json_object_get(o, "locality");
    const json_t *cross = json_object_get(o, "crossing_nodes");
    /* group sizes of tp2 | etp1 ep8, pp4 on 128 ranks: dp 16, edp 4 */
    static const int want_size[] = {2, 1, 16, 16, 2, 4, 8, 1, 4, 8};
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        const json_t *list = json_object_get(groups, kinds[k]);
        size_t const ng = json_array_size(list);
        bool sizes_ok = ng * (size_t)want_size[k] == 128;
        for (size_t i = 0; sizes_ok && i < ng; i++)
            sizes_ok = json_array_size(json_array_get(list, i)) == (size_t)want_size[k];
        EXPECT(sizes_ok, "groups.%s must hold %d groups of %d ranks, got %zu", kinds[k],
               128 / want_size[k], want_size[k], ng);
        const char *lv = json_string_value(json_object_get(loc, kinds[k]));
        bool known = false;
        for (size_t l = 0; lv && l < 6; l++) known |= !strcmp(lv, levels[l]);
        EXPECT(known, "locality.%s must be one of core, l3, numa, package, node, network, got %s",
               kinds[k], lv ? lv : "(none)");
        EXPECT(json_is_integer(json_object_get(cross, kinds[k])),
               "crossing_nodes.%s must be an integer", kinds[k]);
    }
    /* tp pairs of consecutive ranks share an L3 (16 cores per L3 here); the order chosen
     * keeps tp inside nodes */
    EXPECT(!strcmp(json_string_value(json_object_get(loc, "tp")), "l3") &&
               json_integer_value(json_object_get(cross, "tp")) == 0,
           "tp groups must share an L3 and never cross nodes");
    const json_t *orders = json_object_get(o, "orders");
    double const chosen = json_number_value(json_object_get(o, "bytes_crossing_nodes"));
    bool least = json_array_size(orders) > 1 &&
                 !strcmp(json_string_value(json_object_get(json_array_get(orders, 0), "order")),
                         json_string_value(json_object_get(o, "order")));
    for (size_t i = 0; least && i < json_array_size(orders); i++)
        least = chosen <= json_number_value(
                              json_object_get(json_array_get(orders, i), "bytes_crossing_nodes"));
    EXPECT(least && chosen > 0.0,
           "order = auto must use the first of \"orders\", whose bytes_crossing_nodes (%g) "
           "are the least of all orders and > 0 (pp or dp must cross the 4 nodes)", chosen);
    json_decref(o);
}

/* Under mpirun, `vdist layout --json` describes the job: its world and real cores. */
static void test_layout_real_job(void)
{
    int const rc = run(2, "layout %s --json", g_tiny);
    if (!EXPECT(rc == 0, "mpirun -np 2 vdist layout --json must succeed, exit status %d", rc))
        return;
    json_t *o = json_loads(g_run.out, 0, NULL);
    EXPECT(json_integer_value(json_object_get(o, "world")) == 2 &&
               json_array_size(json_object_get(o, "nodes")) == 1,
           "the real job: 2 ranks on 1 node");
    json_decref(o);
}

/* Bad input: a message naming what is wrong, exit status 2. */
static void test_layout_refusals(void)
{
    static const struct {
        const char *args, *says;
    } bad[] = {
        {"--world=0", "--world=0: expected an integer from 1"},
        {"--world=4 --topology=nonsense", "is neither an existing hwloc XML file nor an hwloc "
                                          "synthetic description"},
        {"--world=64 --topology='pack:1 core:8 pu:1' --launch.ranks_per_node=16",
         "launch.ranks_per_node = 16 with 1 core(s) per rank needs 16 cores per node; the node "
         "has 8"},
        {"--world=4 --cores_per_rank=9 --topology='core:8 pu:1'", "--cores_per_rank=9"},
        {"--world=4 --bogus", "unknown argument '--bogus'"},
        {"--world=3 --parallel.tp=2", "world size 3 is not divisible by tp*cp*pp"},
        {"--world=4 --launch.bind=sometimes", "launch.bind"},
        {"--topology='pack:2 core:4 pu:1'", "describe the nodes of --world=N ranks"},
        {"--world=4 --distribution=random", "the distribution is block or cyclic"},
        {"--world=4 --topology=", "--topology= is empty"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int const rc = run(1, "layout %s %s", g_tiny, bad[i].args);
        EXPECT(rc == 2 && out_has(bad[i].says),
               "`vdist layout %s` must exit 2 saying \"%s\", got exit status %d", bad[i].args,
               bad[i].says, rc);
    }
}

static int suite_init(void)
{
    if (tu_env_init(&g_env, "test_topo", "vdist_topo_") != 0) return 1;
    snprintf(g_tiny, sizeof g_tiny, "--config %s/configs/tiny.ini", g_env.root);
    struct launch_machine m;
    if (launch_machine_load(&m, "") != 0) return 1;
    g_cores = m.ncores;
    g_sockets = m.count[LAUNCH_LEVEL_PACKAGE];
    launch_machine_free(&m);
    return 0;
}

static int suite_clean(void)
{
    tu_tmpdir_remove(g_env.tmp);
    tu_run_free(&g_run);
    return 0;
}

int main(void)
{
    setenv("OMP_NUM_THREADS", "1", 1);
    static const struct tu_test tests[] = {
        {"bind=auto: one core per rank, real binding in mapping.tsv, topology XML reloads",
         test_bind_auto},
        {"threads follow the binding when OMP_NUM_THREADS is unset", test_threads_follow_binding},
        {"bind=none leaves ranks unbound; a launcher's binding is kept",
         test_bind_none_and_launcher},
        {"more ranks than cores stay unbound", test_oversubscribed_unbound},
        {"launch.ranks_per_node: table, mapping and direct writes follow declared nodes",
         test_declared_nodes},
        {"vdist layout --json on a 4-node cluster without MPI", test_layout_json_cluster},
        {"vdist layout --json under mpirun describes the job", test_layout_real_job},
        {"vdist layout refuses bad input with a message", test_layout_refusals},
    };
    static const struct tu_suite suite = {
        .name = "placement of the running job",
        .init = suite_init,
        .clean = suite_clean,
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_TIMED_NAMED,
        .program = "test_topo",
    };
    tu_expect_show(&g_run, "command");
    return tu_cunit_main(&suite);
}
