/* Placement as the pure functions of launch/place.c and launch/traffic.c, with no MPI:
 * machines read by hwloc from synthetic descriptions and from the XML files of tests/topo/
 * (this host's topology only in one smoke test), each rank's share of a node's cores,
 * emulated clusters, the locality of every group kind and the traffic crossing nodes and
 * packages against references written here, the traffic estimates against hand-computed
 * values, the choice of a rank order and the report printed before training.
 * Runs from the repository root (the XML files are read from tests/topo/). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <CUnit/CUnit.h>

#include "launch/launch_internal.h"
#include "tests/testutil.h"

/* The machines. Their objects hold consecutive logical cores, so a level is described by
 * its cores per object (per_*: core, l3, numa, package; 0 when the level is absent). */
#define TOPO_2X2X8 "pack:2 numa:2 core:8 pu:1"       /* 32 cores */
#define TOPO_L3_16 "pack:2 [numa] l3:2 core:4 pu:1"  /* 16 cores, a NUMA domain a package */
#define TOPO_L3_32 "pack:2 numa:2 l3:2 core:4 pu:1"  /* 32 cores */
#define TOPO_ONE_PACKAGE "pack:1 numa:2 core:8 pu:1" /* 16 cores */
#define TOPO_WIDE "pack:1 core:128 pu:1"             /* long core lists */
/* TOPO_2X2X8 with the OS indexes of its PUs dealt across the packages (tests/topo/gen.sh) */
#define XML_INTERLEAVED "tests/topo/interleaved-2x2x8.xml"
/* 2 packages x 4 cores x 2 PUs, Linux's SMT numbering (tests/topo/gen.sh) */
#define XML_SMT "tests/topo/smt-2x4x2.xml"

enum { NLEVELS = LAUNCH_NODE_LEVELS, MAX_RANKS = 128, MAX_CORES = 128 };

static const int per_2x2x8[NLEVELS] = {1, 0, 8, 16};
static const int per_l3_16[NLEVELS] = {1, 4, 8, 8};
static const int per_l3_32[NLEVELS] = {1, 4, 8, 16};
static const int per_one_package[NLEVELS] = {1, 0, 8, 16};
static const int per_smt[NLEVELS] = {1, 4, 4, 4};

static const char *level_name(int level) { return launch_level_name((enum launch_level)level); }

/* ---------------------------------------------------------------- helpers */

static bool load(struct launch_machine *m, const char *topology)
{
    int const rc = launch_machine_load(m, topology);
    return TU_EXPECT(rc == 0, "launch_machine_load(\"%s\"): expected 0, got %d: %s", topology,
                     rc, vd_err_msg());
}

/* The recorded message contains fragment. */
static bool msg_has(const char *what, const char *fragment)
{
    return TU_EXPECT(strstr(vd_err_msg(), fragment) != NULL,
                     "%s: expected a message containing \"%s\", got \"%s\"", what, fragment,
                     vd_err_msg());
}

/* Rounding: sums of the same terms taken in another order. */
static bool near(double a, double b) { return fabs(a - b) <= 1e-9 * (fabs(a) + fabs(b) + 1.0); }

static void slot_text(char *buf, size_t nbytes, const struct launch_slot *s)
{
    snprintf(buf, nbytes,
             "node %d, %d core(s) \"%s\", core %d l3 %d numa %d package %d, host \"%s\"",
             s->node, s->ncores, s->cores, s->id[LAUNCH_LEVEL_CORE], s->id[LAUNCH_LEVEL_L3],
             s->id[LAUNCH_LEVEL_NUMA], s->id[LAUNCH_LEVEL_PACKAGE], s->host);
}

static bool same_slot(const struct launch_slot *a, const struct launch_slot *b)
{
    return a->node == b->node && a->ncores == b->ncores &&
           memcmp(a->id, b->id, sizeof a->id) == 0 && strcmp(a->cores, b->cores) == 0 &&
           strcmp(a->host, b->host) == 0;
}

/* The slot of a rank on `node` running on cores first..first+n-1 (n >= 1) of a machine
 * described by per, on host "node<node>". */
static void block_slot(struct launch_slot *s, int node, int first, int n,
                       const int per[NLEVELS])
{
    memset(s, 0, sizeof *s);
    s->node = node;
    s->ncores = n;
    for (int l = 0; l < NLEVELS; l++)
        s->id[l] = per[l] && first / per[l] == (first + n - 1) / per[l] ? first / per[l] : -1;
    if (n == 1)
        snprintf(s->cores, sizeof s->cores, "%d", first);
    else
        snprintf(s->cores, sizeof s->cores, "%d-%d", first, first + n - 1);
    snprintf(s->host, sizeof s->host, "node%d", node);
}

static bool expect_slot(const struct launch_slot *got, const struct launch_slot *want,
                        const char *what)
{
    char g[256], w[256];
    slot_text(g, sizeof g, got);
    slot_text(w, sizeof w, want);
    return TU_EXPECT(same_slot(got, want), "%s: expected %s, got %s", what, w, g);
}

/* ---------------------------------------------------------------- configs and grids */

static bool set_key(struct launch_config *c, const char *key, const char *value)
{
    int const rc = launch_config_set(c, key, value);
    return TU_EXPECT(rc == 0, "launch_config_set(%s, %s): expected 0, got %d: %s", key, value,
                     rc, vd_err_msg());
}

static void set_int(struct launch_config *c, const char *key, int value)
{
    char text[32];
    snprintf(text, sizeof text, "%d", value);
    set_key(c, key, text);
}

/* A small model: vocab 256, d 64, F 128, 4 layers, 4 heads (hd 16), 2 kv heads, 4 experts,
 * top 2; seq_len 64, micro_batch 2, global_batch 8; every parallel size 1. */
static void small_config(struct launch_config *c)
{
    launch_config_defaults(c);
    set_int(c, "model.vocab_size", 256);
    set_int(c, "model.hidden_size", 64);
    set_int(c, "model.intermediate_size", 128);
    set_int(c, "model.num_hidden_layers", 4);
    set_int(c, "model.num_attention_heads", 4);
    set_int(c, "model.num_key_value_heads", 2);
    set_int(c, "model.num_local_experts", 4);
    set_int(c, "model.num_experts_per_tok", 2);
    set_int(c, "train.seq_len", 64);
    set_int(c, "train.micro_batch", 2);
    set_int(c, "train.global_batch", 8);
}

static void set_layout(struct launch_config *c, int tp, int cp, int ep, int etp, int pp)
{
    set_int(c, "parallel.tp", tp);
    set_int(c, "parallel.cp", cp);
    set_int(c, "parallel.ep", ep);
    set_int(c, "parallel.etp", etp);
    set_int(c, "parallel.pp", pp);
}

/* Mixtral-8x7B's sizes with tp 2, ep 8, pp 4 (on 128 ranks: dp 16, etp 2, edp 2). */
static void mixtral_config(struct launch_config *c)
{
    launch_config_defaults(c);
    set_int(c, "model.hidden_size", 4096);
    set_int(c, "model.intermediate_size", 14336);
    set_int(c, "model.num_hidden_layers", 32);
    set_int(c, "model.num_attention_heads", 32);
    set_int(c, "model.num_key_value_heads", 8);
    set_int(c, "model.num_local_experts", 8);
    set_int(c, "model.num_experts_per_tok", 2);
    set_int(c, "model.vocab_size", 32000);
    set_int(c, "train.seq_len", 4096);
    set_int(c, "train.micro_batch", 1);
    set_int(c, "train.global_batch", 1024);
    set_layout(c, 2, 1, 8, 0, 4);
    int const rc = launch_config_validate(c);
    TU_EXPECT(rc == 0, "the Mixtral config: expected launch_config_validate to pass, got %d: %s",
              rc, vd_err_msg());
}

static int etp_of(const struct launch_config *c)
{
    return c->parallel.etp ? c->parallel.etp : c->parallel.tp;
}

/* The grid of c's sizes on world ranks under order (NULL: the default): whether
 * dist_grid_init takes it; grid_of also asserts that it does. */
static bool grid_quiet(struct dist_grid *g, const struct launch_config *c, int world,
                       const char *order)
{
    const struct launch_parallel *p = &c->parallel;
    return dist_grid_init(g, world, p->tp, p->cp, p->ep, etp_of(c), p->pp, order) == 0;
}

static bool grid_of(struct dist_grid *g, const struct launch_config *c, int world,
                    const char *order)
{
    const struct launch_parallel *p = &c->parallel;
    return TU_EXPECT(grid_quiet(g, c, world, order),
                     "dist_grid_init(world %d, tp %d cp %d ep %d etp %d pp %d, %s): refused: %s",
                     world, p->tp, p->cp, p->ep, etp_of(c), p->pp, order ? order : "default",
                     vd_err_msg());
}

/* Every permutation of the five names, as test_grid writes them. */
static char all_orders[120][16];
static int norders;

static void make_orders(void)
{
    static const char *const names[5] = {"tp", "cp", "ep", "dp", "pp"};
    if (norders) return;
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 5; b++)
            for (int c = 0; c < 5; c++)
                for (int d = 0; d < 5; d++)
                    for (int e = 0; e < 5; e++)
                        if ((1 << a | 1 << b | 1 << c | 1 << d | 1 << e) == 31)
                            snprintf(all_orders[norders++], sizeof all_orders[0],
                                     "%s-%s-%s-%s-%s", names[a], names[b], names[c], names[d],
                                     names[e]);
}

/* Slots of an emulated cluster; asserts that emulation succeeds. */
static bool emulate(struct launch_slot *slots, const struct launch_machine *m, int world,
                    int ranks_per_node, int cores_per_rank, enum launch_distribution dist)
{
    int const rc = launch_place_emulate(slots, m, world, ranks_per_node, cores_per_rank, dist);
    return TU_EXPECT(rc == 0, "launch_place_emulate(world %d, %d per node, %d cores, %s): "
                     "expected 0, got %d: %s", world, ranks_per_node, cores_per_rank,
                     dist == LAUNCH_DIST_BLOCK ? "block" : "cyclic", rc, vd_err_msg());
}

/* ---------------------------------------------------------------- references */

static const enum dist_kind every_kind[] = {DIST_TP,  DIST_CP, DIST_DP,  DIST_DPCP,
                                            DIST_TPCP, DIST_PP, DIST_EP,  DIST_ETP,
                                            DIST_EDP, DIST_ETPEP, DIST_WORLD};
#define NEVERY (sizeof every_kind / sizeof every_kind[0])

/* Whether two ranks' traffic crosses a package boundary: other nodes, other packages, or a
 * rank whose cores are not inside one package. */
static bool package_differs(const struct launch_slot *slots, int a, int b)
{
    const struct launch_slot *x = &slots[a], *y = &slots[b];
    int const pa = x->id[LAUNCH_LEVEL_PACKAGE], pb = y->id[LAUNCH_LEVEL_PACKAGE];
    return x->node != y->node || pa < 0 || pb < 0 || pa != pb;
}

/* The nearest level every member shares: of the levels inside the node where all ids are
 * one object, the one whose object holds the fewest cores (the lower level on a tie), else
 * the node, else the network; a lone rank is at its core. The object sizes are the slots'
 * id_cores, checked against the machine in test_levels_unnested. */
static enum launch_level group_level(const struct launch_slot *slots, const int *members, int n)
{
    if (n < 2) return LAUNCH_LEVEL_CORE;
    for (int i = 1; i < n; i++)
        if (slots[members[i]].node != slots[members[0]].node) return LAUNCH_LEVEL_NETWORK;
    int best = -1;
    for (int l = 0; l < NLEVELS; l++) {
        int const id = slots[members[0]].id[l];
        bool all = id >= 0;
        for (int i = 1; i < n && all; i++) all = slots[members[i]].id[l] == id;
        if (all && (best < 0 || slots[members[0]].id_cores[l] < slots[members[0]].id_cores[best]))
            best = l;
    }
    return best < 0 ? LAUNCH_LEVEL_NODE : (enum launch_level)best;
}

/* Machines whose L3 caches and NUMA domains do not nest as core < l3 < numa < package: one
 * NUMA domain over two packages (memory interleaved), and Sub-NUMA Clustering (one L3 over
 * two NUMA domains). The shared level is the smallest object that holds both ranks. */
static void test_levels_unnested(void)
{
    static const struct {
        const char *topology;
        int a, b; /* two cores */
        enum launch_level want;
    } cases[] = {
        {"pack:2 core:2 pu:1", 0, 1, LAUNCH_LEVEL_PACKAGE},    /* NUMA spans both packages */
        {"pack:2 core:2 pu:1", 0, 2, LAUNCH_LEVEL_NUMA},       /* only the NUMA domain */
        {"pack:1 l3:1 group:2 [numa] core:2 pu:1", 0, 1, LAUNCH_LEVEL_NUMA},
        {"pack:1 l3:1 group:2 [numa] core:2 pu:1", 0, 2, LAUNCH_LEVEL_L3},
        {"pack:2 [numa] l3:2 core:2 pu:1", 0, 1, LAUNCH_LEVEL_L3},
        {"pack:2 [numa] l3:2 core:2 pu:1", 0, 2, LAUNCH_LEVEL_NUMA},
        {"pack:2 [numa] l3:2 core:2 pu:1", 0, 4, LAUNCH_LEVEL_NODE},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct launch_machine m;
        if (!load(&m, cases[i].topology)) continue;
        struct launch_slot slots[2];
        launch_slot_make(&slots[0], &m, 0, &cases[i].a, 1, "h");
        launch_slot_make(&slots[1], &m, 0, &cases[i].b, 1, "h");
        for (int l = 0; l < NLEVELS; l++) { /* id_cores: the cores of the object, counted here */
            int count = 0;
            for (int c = 0; c < m.ncores; c++)
                count += slots[0].id[l] >= 0 && m.obj[l][c] == slots[0].id[l];
            TU_EXPECT(slots[0].id_cores[l] == count, "%s: core %d's %s object holds %d cores, "
                      "slot says %d", cases[i].topology, cases[i].a,
                      launch_level_name((enum launch_level)l), count, slots[0].id_cores[l]);
        }
        int const members[2] = {0, 1};
        enum launch_level const got = launch_place_group_level(slots, members, 2);
        TU_EXPECT(got == cases[i].want, "%s, cores %d and %d: expected level %s, got %s",
                  cases[i].topology, cases[i].a, cases[i].b, launch_level_name(cases[i].want),
                  launch_level_name(got));
        launch_machine_free(&m);
    }
}

static void ref_locality(struct launch_locality *out, const struct dist_grid *g,
                         const struct launch_slot *slots, enum dist_kind kind)
{
    int members[MAX_RANKS];
    memset(out, 0, sizeof *out);
    out->size = dist_grid_group_size(g, kind);
    out->level = LAUNCH_LEVEL_CORE;
    for (int r = 0; r < g->world; r++) {
        int count = 0;
        dist_grid_group(g, kind, r, members, &count, NULL);
        if (members[0] != r) continue; /* each group at its lowest rank */
        out->groups++;
        enum launch_level const l = group_level(slots, members, count);
        if (l > out->level) out->level = l;
        bool node = false, package = false;
        for (int i = 0; i < count; i++)
            for (int j = i + 1; j < count; j++) {
                node |= slots[members[i]].node != slots[members[j]].node;
                package |= package_differs(slots, members[i], members[j]);
            }
        out->cross_node += node;
        out->cross_package += package;
    }
}

static void locality_text(char *buf, size_t nbytes, const struct launch_locality *l)
{
    snprintf(buf, nbytes, "size %d, %d groups, level %s, %d crossing nodes, %d crossing packages",
             l->size, l->groups, launch_level_name(l->level), l->cross_node, l->cross_package);
}

static bool same_locality(const struct launch_locality *a, const struct launch_locality *b)
{
    return a->size == b->size && a->groups == b->groups && a->level == b->level &&
           a->cross_node == b->cross_node && a->cross_package == b->cross_package;
}

/* The pattern the header documents: cp's ring when cp_comm_type is p2p, pp's chain (a cycle
 * with interleaving), every other kind spread evenly. */
static enum launch_pattern ref_pattern(const struct launch_config *c, enum dist_kind kind)
{
    if (kind == DIST_CP && c->parallel.cp_comm_type == 0) return LAUNCH_PATTERN_RING;
    if (kind == DIST_PP) return c->parallel.vpp > 1 ? LAUNCH_PATTERN_CYCLE : LAUNCH_PATTERN_CHAIN;
    return LAUNCH_PATTERN_SPREAD;
}

/* Each rank's bytes of every kind (launch_traffic_estimate, checked on its own below),
 * split over its group's members by the kind's pattern; the shares sent to another node
 * or package summed. */
static void ref_crossing(struct launch_crossing *out, const struct launch_config *c,
                         const struct dist_grid *g, const struct launch_slot *slots)
{
    memset(out, 0, sizeof *out);
    double nbytes[DIST_NKIND];
    launch_traffic_estimate(nbytes, c, g);
    int members[MAX_RANKS];
    double share[MAX_RANKS];
    for (size_t k = 0; k < NEVERY; k++) {
        enum dist_kind const kind = every_kind[k];
        if (kind == DIST_WORLD) continue;
        enum launch_pattern const pattern = ref_pattern(c, kind);
        for (int r = 0; r < g->world; r++) {
            int n = 0, me = -1;
            dist_grid_group(g, kind, r, members, &n, NULL);
            for (int i = 0; i < n; i++) {
                share[i] = 0.0;
                if (members[i] == r) me = i;
            }
            if (n < 2) continue;
            int const next = (me + 1) % n, prev = (me + n - 1) % n;
            switch (pattern) {
            case LAUNCH_PATTERN_SPREAD:
                for (int i = 0; i < n; i++) share[i] = i == me ? 0.0 : 1.0 / (n - 1);
                break;
            case LAUNCH_PATTERN_RING: share[next] = 1.0; break;
            case LAUNCH_PATTERN_CHAIN:
                if (me + 1 < n) share[me + 1] += 0.5;
                if (me > 0) share[me - 1] += 0.5;
                break;
            case LAUNCH_PATTERN_CYCLE:
                share[next] += 0.5;
                share[prev] += 0.5;
                break;
            }
            for (int i = 0; i < n; i++) {
                double const b = share[i] * nbytes[kind];
                if (slots[members[i]].node != slots[r].node) {
                    out->kind_node_nbytes[kind] += b;
                    out->node_nbytes += b;
                }
                if (package_differs(slots, members[i], r)) out->package_nbytes += b;
            }
        }
    }
}

/* Records a problem for every difference between two crossings. */
static void compare_crossing(const struct launch_crossing *got, const struct launch_crossing *want,
                             const char *what)
{
    if (!near(got->node_nbytes, want->node_nbytes))
        tu_problem("%s: expected %.6g bytes across nodes, got %.6g", what, want->node_nbytes,
                   got->node_nbytes);
    if (!near(got->package_nbytes, want->package_nbytes))
        tu_problem("%s: expected %.6g bytes across packages, got %.6g", what,
                   want->package_nbytes, got->package_nbytes);
    for (int k = 0; k < DIST_NKIND; k++)
        if (!near(got->kind_node_nbytes[k], want->kind_node_nbytes[k]))
            tu_problem("%s: expected %.6g bytes of %s across nodes, got %.6g", what,
                       want->kind_node_nbytes[k], dist_kind_name((enum dist_kind)k),
                       got->kind_node_nbytes[k]);
}

/* ---------------------------------------------------------------- orders reference */

/* A grid's fingerprint: for each axis kind, each rank's group by its lowest member. Two
 * orders give the same grids exactly when their fingerprints agree. */
static const enum dist_kind axis_kinds[] = {DIST_TP, DIST_CP, DIST_DP, DIST_PP,
                                            DIST_EP, DIST_ETP, DIST_EDP};
enum { NAXES = sizeof axis_kinds / sizeof axis_kinds[0] };

static void grid_key(const struct dist_grid *g, int *key)
{
    int members[MAX_RANKS];
    memset(key, 0, sizeof(int) * NAXES * MAX_RANKS);
    for (int a = 0; a < NAXES; a++)
        for (int r = 0; r < g->world; r++) {
            dist_grid_group(g, axis_kinds[a], r, members, NULL, NULL);
            key[a * MAX_RANKS + r] = members[0];
        }
}

struct order_classes {
    int n;
    int key[LAUNCH_ORDERS_MAX][NAXES * MAX_RANKS];
    bool has_default[LAUNCH_ORDERS_MAX];
};

static int class_of(const struct order_classes *oc, const int *key)
{
    for (int j = 0; j < oc->n; j++)
        if (memcmp(oc->key[j], key, sizeof oc->key[j]) == 0) return j;
    return -1;
}

/* The distinct grids of c's sizes on world ranks over every order dist_grid_init takes. */
static void order_classes(struct order_classes *oc, const struct launch_config *c, int world)
{
    static int key[NAXES * MAX_RANKS];
    make_orders();
    oc->n = 0;
    for (int o = 0; o < norders; o++) {
        struct dist_grid g;
        if (!grid_quiet(&g, c, world, all_orders[o])) continue;
        grid_key(&g, key);
        int j = class_of(oc, key);
        if (j < 0) {
            j = oc->n++;
            memcpy(oc->key[j], key, sizeof key);
            oc->has_default[j] = false;
        }
        if (strcmp(all_orders[o], DIST_GRID_ORDER_DEFAULT) == 0) oc->has_default[j] = true;
    }
}

/* The tolerance launch_place_orders documents: one part in 1e9 of the package bytes. */
static double order_tol(const struct launch_order_estimate *a,
                        const struct launch_order_estimate *b)
{
    return 1e-9 * (a->crossing.package_nbytes + b->crossing.package_nbytes + 1.0);
}

/* launch_place_orders against the reference: one entry per distinct valid grid, the
 * default order naming its class, each entry's crossing that of its grid, sorted best
 * first (node bytes, package bytes, the default order, the text). Records problems; the
 * estimates in est (LAUNCH_ORDERS_MAX), their count returned (negative on a refusal). */
static int check_orders(struct launch_order_estimate *est, const struct launch_config *c,
                        int world, const struct launch_slot *slots, const char *what)
{
    static struct order_classes oc;
    static int key[NAXES * MAX_RANKS];
    order_classes(&oc, c, world);
    int const n = launch_place_orders(est, c, world, slots);
    if (n != oc.n) {
        tu_problem("%s: expected %d distinct orders, got %d (%s)", what, oc.n, n,
                   n < 0 ? vd_err_msg() : "");
        return n;
    }
    bool seen[LAUNCH_ORDERS_MAX] = {false};
    double min_node = INFINITY;
    for (int i = 0; i < n; i++) {
        struct dist_grid g;
        if (!grid_quiet(&g, c, world, est[i].order)) {
            tu_problem("%s: entry %d, \"%s\", is not an order dist_grid_init takes", what, i,
                       est[i].order);
            continue;
        }
        grid_key(&g, key);
        int const j = class_of(&oc, key);
        if (j < 0 || seen[j])
            tu_problem("%s: entry %d, %s, gives %s", what, i, est[i].order,
                       j < 0 ? "a grid no order gives" : "the grids of an earlier entry");
        if (j < 0) continue;
        seen[j] = true;
        if (oc.has_default[j] && strcmp(est[i].order, DIST_GRID_ORDER_DEFAULT) != 0)
            tu_problem("%s: entry %d gives the default order's grids but is named %s", what, i,
                       est[i].order);
        struct launch_crossing want;
        ref_crossing(&want, c, &g, slots);
        char label[256];
        snprintf(label, sizeof label, "%s: order %s", what, est[i].order);
        compare_crossing(&est[i].crossing, &want, label);
        if (est[i].crossing.node_nbytes < min_node) min_node = est[i].crossing.node_nbytes;
    }
    for (int i = 1; i < n; i++) {
        const struct launch_order_estimate *a = &est[i - 1], *b = &est[i];
        double const tol = order_tol(a, b);
        bool const ad = strcmp(a->order, DIST_GRID_ORDER_DEFAULT) == 0;
        bool const bd = strcmp(b->order, DIST_GRID_ORDER_DEFAULT) == 0;
        bool wrong;
        if (fabs(a->crossing.node_nbytes - b->crossing.node_nbytes) > tol)
            wrong = b->crossing.node_nbytes < a->crossing.node_nbytes;
        else if (fabs(a->crossing.package_nbytes - b->crossing.package_nbytes) > tol)
            wrong = b->crossing.package_nbytes < a->crossing.package_nbytes;
        else
            wrong = bd || (!ad && strcmp(a->order, b->order) > 0);
        if (wrong)
            tu_problem("%s: entry %d (%s: %.6g node, %.6g package bytes) should come before "
                       "entry %d (%s: %.6g, %.6g)", what, i, b->order, b->crossing.node_nbytes,
                       b->crossing.package_nbytes, i - 1, a->order, a->crossing.node_nbytes,
                       a->crossing.package_nbytes);
    }
    if (n > 0 && est[0].crossing.node_nbytes > min_node + order_tol(&est[0], &est[0]))
        tu_problem("%s: the first entry %s crosses nodes with %.6g bytes, another order with %.6g",
                   what, est[0].order, est[0].crossing.node_nbytes, min_node);
    return n;
}

/* ---------------------------------------------------------------- machines */

static int os_identity(int core) { return core; }
/* interleaved-2x2x8.xml: the j-th core of package p runs on PU 2 j + p. */
static int os_interleaved(int core) { return 2 * (core % 16) + core / 16; }
/* smt-2x4x2.xml: the j-th core of package p has PUs 2 j + p and 2 j + p + 8. */
static int os_smt(int core) { return 2 * (core % 4) + core / 4; }

/* m holds ncores cores whose objects are per's, core c's first PU at OS index os(c). */
static void expect_machine(const struct launch_machine *m, const char *topology, int ncores,
                           const int per[NLEVELS], int (*os)(int))
{
    if (!TU_EXPECT(m->ncores == ncores, "%s: expected %d cores, got %d", topology, ncores,
                   m->ncores))
        return;
    for (int l = 0; l < NLEVELS; l++) {
        int const want = per[l] ? ncores / per[l] : 0;
        TU_EXPECT(m->count[l] == want, "%s: expected %d %s objects, got %d", topology, want,
                  level_name(l), m->count[l]);
    }
    tu_problems_reset();
    for (int c = 0; c < ncores; c++) {
        for (int l = 0; l < NLEVELS; l++) {
            int const want = per[l] ? c / per[l] : -1;
            if (m->obj[l][c] != want)
                tu_problem("%s: core %d: expected %s %d, got %d", topology, c, level_name(l),
                           want, m->obj[l][c]);
        }
        if (m->os_index[c] != os(c))
            tu_problem("%s: core %d: expected OS index %d, got %d", topology, c, os(c),
                       m->os_index[c]);
    }
    TU_EXPECT_NO_PROBLEMS();
}

static void expect_describe(const struct launch_machine *m, const char *topology,
                            const char *const *fragments)
{
    char text[256];
    launch_machine_describe(m, text, sizeof text);
    for (const char *const *f = fragments; *f; f++)
        TU_EXPECT(strstr(text, *f) != NULL, "%s: expected the description to contain \"%s\", "
                  "got \"%s\"", topology, *f, text);
}

static void test_level_names(void)
{
    static const char *const want[LAUNCH_LEVEL_COUNT] = {"core", "l3",   "numa",
                                                         "package", "node", "network"};
    for (int l = 0; l < LAUNCH_LEVEL_COUNT; l++)
        TU_EXPECT(strcmp(level_name(l), want[l]) == 0, "level %d: expected \"%s\", got \"%s\"",
                  l, want[l], level_name(l));
}

static void test_machine_synthetic(void)
{
    struct launch_machine m;
    if (load(&m, TOPO_2X2X8)) {
        expect_machine(&m, TOPO_2X2X8, 32, per_2x2x8, os_identity);
        expect_describe(&m, TOPO_2X2X8,
                        (const char *const[]){"2 package", "4 NUMA", "0 L3", "32 cores", NULL});
    }
    launch_machine_free(&m);
    TU_EXPECT(m.ncores == 0 && m.obj[0] == NULL && m.os_index == NULL,
              "launch_machine_free: expected an empty machine, got %d cores", m.ncores);
    if (load(&m, TOPO_ONE_PACKAGE))
        expect_machine(&m, TOPO_ONE_PACKAGE, 16, per_one_package, os_identity);
    launch_machine_free(&m);
}

static void test_machine_l3(void)
{
    struct launch_machine m;
    if (load(&m, TOPO_L3_16)) {
        expect_machine(&m, TOPO_L3_16, 16, per_l3_16, os_identity);
        expect_describe(&m, TOPO_L3_16,
                        (const char *const[]){"2 package", "2 NUMA", "4 L3", "16 cores", NULL});
    }
    launch_machine_free(&m);
    if (load(&m, TOPO_L3_32)) {
        expect_machine(&m, TOPO_L3_32, 32, per_l3_32, os_identity);
        expect_describe(&m, TOPO_L3_32,
                        (const char *const[]){"2 package", "4 NUMA", "8 L3", "32 cores", NULL});
    }
    launch_machine_free(&m);
}

/* Whatever the OS numbering, the logical order groups cores by package and NUMA domain,
 * and shares are dealt in logical order. */
static void test_machine_xml(void)
{
    struct launch_machine m;
    if (load(&m, XML_INTERLEAVED)) {
        expect_machine(&m, XML_INTERLEAVED, 32, per_2x2x8, os_interleaved);
        int cores[32];
        TU_EXPECT(launch_place_share(&m, 2, 0, 0, cores) == 16, "%s: expected 16 cores for rank "
                  "0 of 2", XML_INTERLEAVED);
        bool even = true;
        for (int i = 0; i < 16; i++) even &= cores[i] == i && m.os_index[cores[i]] % 2 == 0;
        TU_EXPECT(even, "%s: expected rank 0 of 2 on logical cores 0-15, the even PUs (package 0)",
                  XML_INTERLEAVED);
    }
    launch_machine_free(&m);
    if (load(&m, XML_SMT)) {
        expect_machine(&m, XML_SMT, 8, per_smt, os_smt);
        expect_describe(&m, XML_SMT,
                        (const char *const[]){"2 package", "2 NUMA", "2 L3", "8 cores", NULL});
    }
    launch_machine_free(&m);
}

/* The one test that reads this host: it loads, and what came is consistent. */
static void test_machine_host(void)
{
    struct launch_machine m;
    if (load(&m, "") && TU_EXPECT(m.ncores >= 1, "this host: expected cores, got %d", m.ncores)) {
        tu_problems_reset();
        for (int c = 0; c < m.ncores; c++) {
            if (m.obj[LAUNCH_LEVEL_CORE][c] != c)
                tu_problem("core %d: expected core id %d, got %d", c, c, m.obj[0][c]);
            for (int l = 1; l < NLEVELS; l++)
                if (m.obj[l][c] < -1 || m.obj[l][c] >= m.count[l])
                    tu_problem("core %d: %s %d is outside [-1, %d)", c, level_name(l),
                               m.obj[l][c], m.count[l]);
            if (m.os_index[c] < 0) tu_problem("core %d: OS index %d", c, m.os_index[c]);
            for (int d = 0; d < c; d++)
                if (m.os_index[d] == m.os_index[c])
                    tu_problem("cores %d and %d: the same OS index %d", d, c, m.os_index[c]);
        }
        TU_EXPECT_NO_PROBLEMS();
    }
    launch_machine_free(&m);
}

static void expect_refused_topology(const char *topology, const char *what)
{
    struct launch_machine m;
    int const rc = launch_machine_load(&m, topology);
    TU_EXPECT(rc == VD_EINVAL, "%s \"%s\": expected VD_EINVAL (%d), got %d", what, topology,
              VD_EINVAL, rc);
    msg_has(what, topology);
    launch_machine_free(&m);
    TU_EXPECT(m.ncores == 0, "%s: expected no cores after the refusal, got %d", what, m.ncores);
}

static void test_machine_bad(void)
{
    expect_refused_topology("tests/topo/missing.xml", "a path that does not exist");
    expect_refused_topology("pack:2 bogus:3 core:4 pu:1", "a synthetic description with an "
                            "unknown level");
    expect_refused_topology("tests/topo", "a directory");
    /* hwloc loads it, but there is no core to place a rank on */
    expect_refused_topology("pack:2 pu:2", "a topology without cores");
    char dir[64];
    if (!tu_tmpdir_create(dir, sizeof dir, "vdist_test_place_", "test_place")) {
        CU_FAIL("mkdtemp");
        return;
    }
    static const char garbage[] = "this is not XML at all\n\x01\x02<<<\n";
    static const char foreign[] = "<?xml version=\"1.0\"?>\n<inventory><cpu/></inventory>\n";
    char path[128];
    snprintf(path, sizeof path, "%s/garbage.xml", dir);
    if (TU_EXPECT(tu_file_write(path, garbage, sizeof garbage - 1, "wb"), "write %s", path))
        expect_refused_topology(path, "a garbage XML file");
    snprintf(path, sizeof path, "%s/foreign.xml", dir);
    if (TU_EXPECT(tu_file_write(path, foreign, sizeof foreign - 1, "wb"), "write %s", path))
        expect_refused_topology(path, "an XML file that is not an hwloc topology");
    tu_tmpdir_remove(dir);
}

/* ---------------------------------------------------------------- slots */

static void test_slot_make(void)
{
    struct launch_machine m;
    if (!load(&m, TOPO_2X2X8)) {
        launch_machine_free(&m);
        return;
    }
    struct launch_slot s, want;
    launch_slot_make(&s, &m, 3, (const int[]){3}, 1, "node3");
    block_slot(&want, 3, 3, 1, per_2x2x8);
    expect_slot(&s, &want, "core 3");
    launch_slot_make(&s, &m, 0, (const int[]){9, 11, 8, 10}, 4, "node0");
    block_slot(&want, 0, 8, 4, per_2x2x8);
    expect_slot(&s, &want, "cores 9, 11, 8, 10 (sorted, one NUMA domain)");
    launch_slot_make(&s, &m, 1, (const int[]){7, 8}, 2, "node1");
    block_slot(&want, 1, 7, 2, per_2x2x8);
    expect_slot(&s, &want, "cores 7-8 (across NUMA domains)");
    launch_slot_make(&s, &m, 1, (const int[]){16, 15}, 2, "node1");
    block_slot(&want, 1, 15, 2, per_2x2x8);
    expect_slot(&s, &want, "cores 15-16 (across packages)");

    want = (struct launch_slot){.node = 2, .ncores = 4, .id = {-1, -1, 0, 0}, .cores = "1-3,5",
                                .host = "h"};
    launch_slot_make(&s, &m, 2, (const int[]){5, 1, 3, 2}, 4, "h");
    expect_slot(&s, &want, "cores 5, 1, 3, 2");
    want = (struct launch_slot){.node = 0, .ncores = 2, .id = {-1, -1, -1, -1}, .cores = "0,31",
                                .host = ""};
    launch_slot_make(&s, &m, 0, (const int[]){31, 0}, 2, NULL);
    expect_slot(&s, &want, "cores 31, 0, host NULL");
    want = (struct launch_slot){.node = 0, .ncores = 0, .id = {-1, -1, -1, -1}, .cores = "",
                                .host = "x"};
    launch_slot_make(&s, &m, 0, NULL, 0, "x");
    expect_slot(&s, &want, "no cores");

    char host[2 * LAUNCH_HOST_MAX];
    memset(host, 'h', sizeof host - 1);
    host[sizeof host - 1] = '\0';
    launch_slot_make(&s, &m, 0, (const int[]){0}, 1, host);
    TU_EXPECT(strlen(s.host) == LAUNCH_HOST_MAX - 1 &&
                  strncmp(s.host, host, LAUNCH_HOST_MAX - 1) == 0,
              "a host name of %zu characters: expected its first %d, got %zu", strlen(host),
              LAUNCH_HOST_MAX - 1, strlen(s.host));
    launch_machine_free(&m);
}

/* Core lists too long for LAUNCH_CORES_TEXT: every list that fits comes whole; one that
 * does not is a prefix of whole pieces followed by ",...". */
static void test_slot_cores_text(void)
{
    struct launch_machine m;
    if (!load(&m, TOPO_WIDE)) {
        launch_machine_free(&m);
        return;
    }
    long whole = 0, cut = 0, fits_cut = 0, bad_cut = 0;
    char first_fits_cut[1200] = "", first_bad_cut[1200] = "";
    int cores[MAX_CORES];
    /* cores start, start + step, ... below end: lists of 1 to 64 pieces of 1 to 3 digits */
    for (int list = 0; list < 64 * 2 * 26; list++) {
        int const start = list / 52, step = 2 + list / 26 % 2, end = start + 1 + 5 * (list % 26);
        int n = 0;
        char full[1024] = "";
        size_t used = 0;
        for (int c = start; c < end && c < MAX_CORES; c += step) {
            cores[n++] = c;
            used += (size_t)snprintf(full + used, sizeof full - used, "%s%d", n > 1 ? "," : "", c);
        }
        struct launch_slot s;
        launch_slot_make(&s, &m, 0, cores, n, "node0");
        if (used < LAUNCH_CORES_TEXT) {
            whole++;
            if (strcmp(s.cores, full) != 0 && !fits_cut++)
                snprintf(first_fits_cut, sizeof first_fits_cut,
                         "\"%s\" (%zu characters) came as \"%s\"", full, used, s.cores);
            continue;
        }
        cut++;
        size_t const len = strlen(s.cores);
        bool const ok = len >= 4 && len < LAUNCH_CORES_TEXT &&
                        strcmp(s.cores + len - 4, ",...") == 0 &&
                        strncmp(s.cores, full, len - 4) == 0 && full[len - 4] == ',';
        if (!ok && !bad_cut++)
            snprintf(first_bad_cut, sizeof first_bad_cut, "\"%.60s...\" came as \"%s\"", full,
                     s.cores);
    }
    TU_EXPECT(whole > 0 && cut > 0, "the sweep: expected lists that fit and lists that do not");
    TU_EXPECT(bad_cut == 0, "a list too long: expected whole pieces then \",...\"; %ld of %ld "
              "were not, first: %s", bad_cut, cut, first_bad_cut);
    TU_EXPECT(fits_cut == 0, "a list that fits in %d bytes: expected it whole; %ld of %ld were "
              "cut, first: %s", LAUNCH_CORES_TEXT, fits_cut, whole, first_fits_cut);
    launch_machine_free(&m);
}

/* ---------------------------------------------------------------- shares of a node */

/* Rank index's block of c cores among k on m: contiguous, in range; records problems. */
static bool share_of(const struct launch_machine *m, int k, int index, int c_asked, int *cores,
                     int *first, const char *what)
{
    int const n = launch_place_share(m, k, index, c_asked, cores);
    int const c = c_asked ? c_asked : m->ncores / k;
    if (n != c) {
        tu_problem("%s: rank %d of %d, %d cores asked: expected %d cores, got %d", what, index, k,
                   c_asked, c, n);
        return false;
    }
    for (int i = 0; i < n; i++)
        if (cores[i] != cores[0] + i || cores[i] < 0 || cores[i] >= m->ncores) {
            tu_problem("%s: rank %d of %d: cores not a contiguous block of the node (core %d "
                       "is %d)", what, index, k, i, cores[i]);
            return false;
        }
    *first = cores[0];
    return true;
}

struct share_case {
    int k, c;          /* node ranks, cores per rank asked (0: ncores / k) */
    int first[16];     /* each rank's first core */
};

static void test_share_numa(void)
{
    static const struct share_case cases[] = {
        {4, 8, {0, 8, 16, 24}},
        {8, 4, {0, 4, 8, 12, 16, 20, 24, 28}},
        {16, 2, {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}},
        /* 2 whole blocks of 3 per domain, 8 in all: none straddles a domain */
        {8, 3, {0, 3, 8, 11, 16, 19, 24, 27}},
        /* 1 block of 6 per domain */
        {4, 6, {0, 8, 16, 24}},
        {4, 0, {0, 8, 16, 24}},
        {16, 0, {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}},
        {1, 0, {0}},
        /* the domains hold fewer whole blocks than ranks: contiguous in logical order */
        {10, 3, {0, 3, 6, 9, 12, 15, 18, 21, 24, 27}},
        {5, 6, {0, 6, 12, 18, 24}},
        {3, 0, {0, 10, 20}},
        {2, 16, {0, 16}},
    };
    struct launch_machine m;
    if (!load(&m, TOPO_2X2X8)) {
        launch_machine_free(&m);
        return;
    }
    int cores[MAX_CORES];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct share_case *sc = &cases[i];
        char what[64];
        snprintf(what, sizeof what, "%d ranks x %d cores on " TOPO_2X2X8, sc->k, sc->c);
        tu_problems_reset();
        int used[MAX_CORES] = {0};
        for (int r = 0; r < sc->k; r++) {
            int first = -1;
            if (!share_of(&m, sc->k, r, sc->c, cores, &first, what)) continue;
            if (first != sc->first[r])
                tu_problem("%s: rank %d: expected cores from %d, got from %d", what, r,
                           sc->first[r], first);
            int const c = sc->c ? sc->c : m.ncores / sc->k;
            for (int j = 0; j < c; j++)
                if (used[cores[j]]++) tu_problem("%s: core %d is shared", what, cores[j]);
        }
        TU_EXPECT_NO_PROBLEMS();
    }
    /* oversubscribed */
    static const int over[][2] = {{33, 1}, {4, 9}, {8, 5}, {64, 0}, {33, 0}};
    for (size_t i = 0; i < sizeof over / sizeof over[0]; i++)
        for (int r = 0; r < over[i][0]; r += over[i][0] - 1) {
            int const n = launch_place_share(&m, over[i][0], r, over[i][1], cores);
            TU_EXPECT(n == 0, "%d ranks x %d cores on 32 cores, rank %d: expected 0 "
                      "(oversubscribed), got %d", over[i][0], over[i][1], r, n);
        }
    launch_machine_free(&m);
}

/* A machine built by hand: NUMA domains of uneven sizes, or none known. */
static void test_share_hand_machines(void)
{
    int core_id[16], l3[16], numa[16], package[16], os[16];
    for (int c = 0; c < 16; c++) {
        core_id[c] = c;
        l3[c] = -1;
        numa[c] = c < 6 ? 0 : 1;
        package[c] = 0;
        os[c] = c;
    }
    struct launch_machine m = {.ncores = 16, .obj = {core_id, l3, numa, package}, .os_index = os,
                               .count = {16, 0, 2, 1}};
    int cores[16];
    /* domains of 6 and 10 cores: 1 + 2 whole blocks of 4 */
    static const int uneven[3] = {0, 6, 10};
    for (int r = 0; r < 3; r++) {
        int const n = launch_place_share(&m, 3, r, 4, cores);
        TU_EXPECT(n == 4 && cores[0] == uneven[r] && cores[3] == uneven[r] + 3,
                  "NUMA domains of 6 and 10 cores, 3 ranks x 4: rank %d: expected cores %d-%d, "
                  "got %d cores from %d", r, uneven[r], uneven[r] + 3, n, n > 0 ? cores[0] : -1);
    }
    /* 4 ranks x 4 do not fit as whole blocks (3): contiguous */
    for (int r = 0; r < 4; r++) {
        int const n = launch_place_share(&m, 4, r, 4, cores);
        TU_EXPECT(n == 4 && cores[0] == 4 * r, "NUMA domains of 6 and 10, 4 ranks x 4: rank %d: "
                  "expected cores from %d, got %d cores from %d", r, 4 * r, n,
                  n > 0 ? cores[0] : -1);
    }
    /* cores 0-5 in no domain, 6-15 in one: the domain holds 2 blocks of 4, not 3 */
    for (int c = 0; c < 6; c++) numa[c] = -1;
    m.count[LAUNCH_LEVEL_NUMA] = 1;
    for (int r = 0; r < 3; r++) {
        int const n = launch_place_share(&m, 3, r, 4, cores);
        TU_EXPECT(n == 4 && cores[0] == 4 * r, "cores 0-5 in no NUMA domain, 6-15 in one, 3 ranks "
                  "x 4: rank %d: expected cores from %d, got %d cores from %d", r, 4 * r, n,
                  n > 0 ? cores[0] : -1);
    }
    for (int c = 0; c < 16; c++) numa[c] = -1;
    m.count[LAUNCH_LEVEL_NUMA] = 0;
    for (int r = 0; r < 4; r++) {
        int const n = launch_place_share(&m, 4, r, 0, cores);
        TU_EXPECT(n == 4 && cores[0] == 4 * r, "no NUMA domain known, 4 ranks: rank %d: expected "
                  "cores from %d, got %d cores from %d", r, 4 * r, n, n > 0 ? cores[0] : -1);
    }
}

/* Every (ranks, cores per rank) on every machine: the right count, contiguous, disjoint,
 * each block inside one NUMA domain whenever the domains hold enough whole blocks, and 0
 * exactly when the node would be oversubscribed. */
static void test_share_sweep(void)
{
    static const char *const topologies[] = {TOPO_2X2X8, TOPO_L3_16, TOPO_L3_32,
                                             TOPO_ONE_PACKAGE, XML_INTERLEAVED, XML_SMT};
    long shares = 0;
    tu_problems_reset();
    for (size_t t = 0; t < sizeof topologies / sizeof topologies[0]; t++) {
        struct launch_machine m;
        if (!load(&m, topologies[t])) {
            launch_machine_free(&m);
            continue;
        }
        int domain_size[MAX_CORES] = {0};
        for (int c = 0; c < m.ncores; c++) domain_size[m.obj[LAUNCH_LEVEL_NUMA][c]]++;
        int cores[MAX_CORES];
        for (int k = 1; k <= m.ncores + 1; k++)
            for (int asked = 0; asked <= m.ncores + 1; asked++) {
                int const c = asked ? asked : m.ncores / k;
                if (c < 1 || c * k > m.ncores) {
                    int const n = launch_place_share(&m, k, k - 1, asked, cores);
                    if (n != 0)
                        tu_problem("%s: %d ranks x %d cores: expected 0, got %d", topologies[t],
                                   k, asked, n);
                    continue;
                }
                int blocks = 0;
                for (int d = 0; d < m.count[LAUNCH_LEVEL_NUMA]; d++) blocks += domain_size[d] / c;
                int used[MAX_CORES] = {0};
                for (int r = 0; r < k; r++) {
                    int first;
                    shares++;
                    if (!share_of(&m, k, r, asked, cores, &first, topologies[t])) continue;
                    for (int j = 0; j < c; j++)
                        if (used[cores[j]]++)
                            tu_problem("%s: %d ranks x %d cores: core %d shared", topologies[t], k,
                                       c, cores[j]);
                    if (blocks >= k &&
                        m.obj[LAUNCH_LEVEL_NUMA][first] != m.obj[LAUNCH_LEVEL_NUMA][first + c - 1])
                        tu_problem("%s: %d ranks x %d cores (%d whole blocks fit in the domains): "
                                   "rank %d's cores %d-%d straddle NUMA domains", topologies[t],
                                   k, c, blocks, r, first, first + c - 1);
                }
            }
        launch_machine_free(&m);
    }
    printf("\n  %ld shares checked ", shares);
    TU_EXPECT_NO_PROBLEMS();
}

/* ---------------------------------------------------------------- emulated clusters */

/* The first core of rank index's block among k ranks of c cores on a machine of ncores
 * cores in NUMA domains of numa consecutive cores: the index-th of the whole blocks the
 * domains hold when there are k of them, else c index. */
static int block_first(int ncores, int numa, int k, int c, int index)
{
    int const per_domain = numa / c;
    if (per_domain * (ncores / numa) >= k)
        return numa * (index / per_domain) + c * (index % per_domain);
    return c * index;
}

/* Every slot as the header documents it: rank r on node r / k (block) or r % nodes
 * (cyclic), its block among k shares of its node. */
static void expect_emulated(const struct launch_slot *slots, int world, int k, int c,
                            enum launch_distribution dist, int ncores, const int per[NLEVELS],
                            const char *what)
{
    int const nodes = (world + k - 1) / k;
    tu_problems_reset();
    for (int r = 0; r < world; r++) {
        int const node = dist == LAUNCH_DIST_BLOCK ? r / k : r % nodes;
        int const index = dist == LAUNCH_DIST_BLOCK ? r % k : r / nodes;
        struct launch_slot want;
        block_slot(&want, node, block_first(ncores, per[LAUNCH_LEVEL_NUMA], k, c, index), c, per);
        if (!same_slot(&slots[r], &want)) {
            char g[256], w[256];
            slot_text(g, sizeof g, &slots[r]);
            slot_text(w, sizeof w, &want);
            tu_problem("%s: rank %d: expected %s, got %s", what, r, w, g);
        }
    }
    TU_EXPECT_NO_PROBLEMS();
}

static int ranks_on(const struct launch_slot *slots, int world, int node)
{
    int n = 0;
    for (int r = 0; r < world; r++) n += slots[r].node == node;
    return n;
}

static void test_emulate_single(void)
{
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS];
    if (!load(&m, TOPO_2X2X8)) {
        launch_machine_free(&m);
        return;
    }
    if (emulate(slots, &m, 32, 0, 1, LAUNCH_DIST_BLOCK))
        expect_emulated(slots, 32, 32, 1, LAUNCH_DIST_BLOCK, 32, per_2x2x8, "32 ranks on 1 node");
    struct launch_slot want;
    block_slot(&want, 0, 17, 1, per_2x2x8);
    expect_slot(&slots[17], &want, "rank 17 of 32");
    if (emulate(slots, &m, 8, 0, 4, LAUNCH_DIST_BLOCK))
        expect_emulated(slots, 8, 8, 4, LAUNCH_DIST_BLOCK, 32, per_2x2x8, "8 ranks x 4 cores");
    block_slot(&want, 0, 20, 4, per_2x2x8);
    expect_slot(&slots[5], &want, "rank 5 of 8 x 4 cores");
    launch_machine_free(&m);
}

static void test_emulate_cluster(void)
{
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS], implicit[MAX_RANKS];
    if (!load(&m, TOPO_2X2X8)) {
        launch_machine_free(&m);
        return;
    }
    if (emulate(slots, &m, 128, 32, 1, LAUNCH_DIST_BLOCK))
        expect_emulated(slots, 128, 32, 1, LAUNCH_DIST_BLOCK, 32, per_2x2x8,
                        "4 nodes x 32, block");
    if (emulate(implicit, &m, 128, 0, 1, LAUNCH_DIST_BLOCK)) {
        bool same = true;
        for (int r = 0; r < 128; r++) same &= same_slot(&slots[r], &implicit[r]);
        TU_EXPECT(same, "128 ranks with ranks_per_node 0: expected the slots of 32 per node");
    }
    for (int node = 0; node < 4; node++)
        TU_EXPECT(ranks_on(slots, 128, node) == 32, "node %d: expected 32 ranks, got %d", node,
                  ranks_on(slots, 128, node));
    struct launch_slot want;
    block_slot(&want, 2, 13, 1, per_2x2x8);
    expect_slot(&slots[77], &want, "rank 77 of 4 x 32");
    launch_machine_free(&m);
}

/* The last node holds the rest, on the first shares of its cores. */
static void test_emulate_uneven(void)
{
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS];
    if (!load(&m, TOPO_2X2X8)) {
        launch_machine_free(&m);
        return;
    }
    if (emulate(slots, &m, 40, 16, 2, LAUNCH_DIST_BLOCK)) {
        expect_emulated(slots, 40, 16, 2, LAUNCH_DIST_BLOCK, 32, per_2x2x8,
                        "40 ranks, 16 x 2 cores per node");
        static const int want_count[4] = {16, 16, 8, 0};
        for (int node = 0; node < 4; node++)
            TU_EXPECT(ranks_on(slots, 40, node) == want_count[node], "40 ranks, 16 per node: "
                      "node %d: expected %d ranks, got %d", node, want_count[node],
                      ranks_on(slots, 40, node));
        struct launch_slot want;
        block_slot(&want, 2, 14, 2, per_2x2x8);
        expect_slot(&slots[39], &want, "rank 39 (the 8th of node 2)");
    }
    if (emulate(slots, &m, 24, 0, 3, LAUNCH_DIST_BLOCK)) {
        /* 10 shares of 3 a node (whole blocks: 8): contiguous, some across domains */
        expect_emulated(slots, 24, 10, 3, LAUNCH_DIST_BLOCK, 32, per_2x2x8,
                        "24 ranks, 0 per node, 3 cores each");
        TU_EXPECT(slots[22].node == 2 && strcmp(slots[22].cores, "6-8") == 0 &&
                      slots[22].id[LAUNCH_LEVEL_NUMA] == -1 &&
                      slots[22].id[LAUNCH_LEVEL_PACKAGE] == 0,
                  "24 ranks x 3 cores: rank 22: expected node 2, cores 6-8 across NUMA domains, "
                  "got node %d cores %s numa %d", slots[22].node, slots[22].cores,
                  slots[22].id[LAUNCH_LEVEL_NUMA]);
    }
    launch_machine_free(&m);
}

static void test_emulate_cyclic(void)
{
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS];
    if (!load(&m, TOPO_2X2X8)) {
        launch_machine_free(&m);
        return;
    }
    if (emulate(slots, &m, 128, 32, 1, LAUNCH_DIST_CYCLIC))
        expect_emulated(slots, 128, 32, 1, LAUNCH_DIST_CYCLIC, 32, per_2x2x8,
                        "4 nodes x 32, cyclic");
    struct launch_slot want;
    block_slot(&want, 1, 19, 1, per_2x2x8);
    expect_slot(&slots[77], &want, "rank 77 of 4 x 32, cyclic");
    if (emulate(slots, &m, 40, 16, 2, LAUNCH_DIST_CYCLIC)) {
        expect_emulated(slots, 40, 16, 2, LAUNCH_DIST_CYCLIC, 32, per_2x2x8,
                        "40 ranks, 16 x 2 per node, cyclic");
        static const int want_count[3] = {14, 13, 13};
        for (int node = 0; node < 3; node++)
            TU_EXPECT(ranks_on(slots, 40, node) == want_count[node], "40 ranks cyclic on 3 "
                      "nodes: node %d: expected %d ranks, got %d", node, want_count[node],
                      ranks_on(slots, 40, node));
    }
    launch_machine_free(&m);
}

static void test_emulate_cores_per_rank(void)
{
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS];
    if (!load(&m, TOPO_L3_32)) {
        launch_machine_free(&m);
        return;
    }
    if (emulate(slots, &m, 16, 8, 4, LAUNCH_DIST_BLOCK))
        expect_emulated(slots, 16, 8, 4, LAUNCH_DIST_BLOCK, 32, per_l3_32,
                        "16 ranks, 8 x 4 cores per node (L3 of 4)");
    struct launch_slot want;
    block_slot(&want, 1, 12, 4, per_l3_32);
    expect_slot(&slots[11], &want, "rank 11 of 16 x 4 cores");
    if (emulate(slots, &m, 6, 0, 5, LAUNCH_DIST_BLOCK))
        expect_emulated(slots, 6, 6, 5, LAUNCH_DIST_BLOCK, 32, per_l3_32,
                        "6 ranks x 5 cores, 0 per node");
    launch_machine_free(&m);
}

static void expect_emulate_refused(const struct launch_machine *m, int world, int rpn, int cpr,
                                   const char *const *fragments)
{
    struct launch_slot slots[4], before[4];
    memset(slots, 0xab, sizeof slots);
    memcpy(before, slots, sizeof slots);
    char what[96];
    snprintf(what, sizeof what, "emulate world %d, %d per node, %d cores per rank", world, rpn,
             cpr);
    int const rc = launch_place_emulate(slots, m, world, rpn, cpr, LAUNCH_DIST_BLOCK);
    TU_EXPECT(rc == VD_EINVAL, "%s: expected VD_EINVAL, got %d", what, rc);
    for (const char *const *f = fragments; *f; f++) msg_has(what, *f);
    TU_EXPECT(memcmp(slots, before, sizeof slots) == 0, "%s: expected no slot written", what);
}

static void test_emulate_refusals(void)
{
    struct launch_machine m;
    if (!load(&m, TOPO_2X2X8)) {
        launch_machine_free(&m);
        return;
    }
    expect_emulate_refused(&m, 64, 17, 2,
                           (const char *const[]){"ranks_per_node = 17", "34", "32", "16", NULL});
    expect_emulate_refused(&m, 64, 33, 1,
                           (const char *const[]){"ranks_per_node = 33", "32", NULL});
    expect_emulate_refused(&m, 4, -1, 1, (const char *const[]){"ranks_per_node = -1", NULL});
    expect_emulate_refused(&m, 0, 4, 1, (const char *const[]){"world", "at least 1", NULL});
    expect_emulate_refused(&m, -3, 4, 1, (const char *const[]){"world", "-3", NULL});
    expect_emulate_refused(&m, 4, 4, 0,
                           (const char *const[]){"cores_per_rank", "1 to 32", NULL});
    expect_emulate_refused(&m, 4, 0, 33,
                           (const char *const[]){"cores_per_rank", "33", "1 to 32", NULL});
    launch_machine_free(&m);
}

/* ---------------------------------------------------------------- locality */

struct layout {
    int tp, cp, ep, etp, pp;
};

struct sweep_case {
    const char *topology;
    int world, ranks_per_node, cores_per_rank;
    enum launch_distribution dist;
    struct layout layouts[8];
};

static void sweep_layout(const struct sweep_case *sc, const struct layout *lay,
                         const struct launch_slot *slots, long *grids)
{
    struct launch_config c;
    launch_config_defaults(&c);
    c.model.vocab_size = 256;
    c.model.hidden_size = 64;
    c.model.intermediate_size = 128;
    c.model.num_hidden_layers = 8;
    c.model.num_attention_heads = 8;
    c.model.num_key_value_heads = 4;
    c.model.num_local_experts = 8;
    c.model.num_experts_per_tok = 2;
    c.train.seq_len = 256;
    c.train.micro_batch = 1;
    c.train.global_batch = 240; /* a multiple of every dp here */
    c.parallel.tp = lay->tp;
    c.parallel.cp = lay->cp;
    c.parallel.ep = lay->ep;
    c.parallel.etp = lay->etp;
    c.parallel.pp = lay->pp;
    char what[256];
    for (int o = 0; o < norders; o++) {
        struct dist_grid g;
        if (!grid_quiet(&g, &c, sc->world, all_orders[o])) continue;
        ++*grids;
        for (size_t k = 0; k < NEVERY; k++) {
            int members[MAX_RANKS], n = 0;
            for (int r = 0; r < sc->world; r++) {
                dist_grid_group(&g, every_kind[k], r, members, &n, NULL);
                if (members[0] != r) continue;
                /* the members in rank order, then backwards */
                int backwards[MAX_RANKS];
                for (int i = 0; i < n; i++) backwards[i] = members[n - 1 - i];
                enum launch_level const want = group_level(slots, members, n);
                enum launch_level const fwd = launch_place_group_level(slots, members, n);
                enum launch_level const bwd = launch_place_group_level(slots, backwards, n);
                if (fwd != want || bwd != want)
                    tu_problem("%s world %d, order %s, %s group of rank %d: expected level %s, "
                               "got %s (%s backwards)", sc->topology, sc->world, all_orders[o],
                               dist_kind_name(every_kind[k]), r, launch_level_name(want),
                               launch_level_name(fwd), launch_level_name(bwd));
            }
            struct launch_locality got, want;
            launch_place_locality(&got, &g, slots, every_kind[k]);
            ref_locality(&want, &g, slots, every_kind[k]);
            if (!same_locality(&got, &want)) {
                char gt[160], wt[160];
                locality_text(gt, sizeof gt, &got);
                locality_text(wt, sizeof wt, &want);
                tu_problem("%s, world %d (%d per node, %d cores, %s), tp %d cp %d ep %d etp %d "
                           "pp %d, order %s, %s: expected %s, got %s", sc->topology, sc->world,
                           sc->ranks_per_node, sc->cores_per_rank,
                           sc->dist == LAUNCH_DIST_BLOCK ? "block" : "cyclic", lay->tp, lay->cp,
                           lay->ep, lay->etp, lay->pp, all_orders[o],
                           dist_kind_name(every_kind[k]), wt, gt);
            }
        }
        /* as configured, then with cp all-gather and interleaved pp */
        for (int variant = 0; variant < 2; variant++) {
            c.parallel.cp_comm_type = variant;
            c.parallel.vpp = variant && lay->pp > 1 ? 2 : 1;
            struct launch_crossing got, want;
            launch_place_crossing(&got, &c, &g, slots);
            ref_crossing(&want, &c, &g, slots);
            snprintf(what, sizeof what, "%s world %d, tp %d cp %d ep %d etp %d pp %d vpp %d "
                     "cp_comm_type %d, order %s", sc->topology, sc->world, lay->tp, lay->cp,
                     lay->ep, lay->etp, lay->pp, c.parallel.vpp, variant, all_orders[o]);
            compare_crossing(&got, &want, what);
        }
        c.parallel.cp_comm_type = 0;
        c.parallel.vpp = 1;
    }
    static struct launch_order_estimate est[LAUNCH_ORDERS_MAX];
    snprintf(what, sizeof what, "orders of %s world %d, tp %d cp %d ep %d etp %d pp %d",
             sc->topology, sc->world, lay->tp, lay->cp, lay->ep, lay->etp, lay->pp);
    check_orders(est, &c, sc->world, slots, what);
}

/* Every kind's locality and the crossing traffic, on several placements, layouts and every
 * order, against the references; and the orders' list of each layout. */
static void test_locality_reference(void)
{
    static const struct sweep_case cases[] = {
        {TOPO_2X2X8, 32, 0, 1, LAUNCH_DIST_BLOCK,
         {{1, 1, 1, 1, 1}, {2, 1, 1, 0, 1}, {2, 2, 2, 1, 2}, {4, 1, 4, 1, 2}, {2, 2, 4, 2, 2},
          {1, 4, 2, 2, 4}, {8, 1, 2, 4, 1}, {2, 1, 8, 2, 2}}},
        {TOPO_2X2X8, 64, 16, 2, LAUNCH_DIST_BLOCK,
         {{2, 1, 8, 2, 4}, {4, 2, 4, 1, 2}, {2, 4, 2, 2, 2}, {1, 1, 8, 1, 4}, {2, 2, 2, 2, 2}}},
        {TOPO_L3_32, 48, 16, 2, LAUNCH_DIST_CYCLIC,
         {{2, 1, 2, 2, 2}, {2, 2, 4, 1, 3}, {4, 1, 2, 2, 2}, {1, 1, 8, 2, 3}}},
        {TOPO_2X2X8, 24, 0, 3, LAUNCH_DIST_BLOCK,
         {{2, 1, 2, 1, 2}, {3, 2, 2, 3, 2}, {1, 2, 4, 1, 3}, {2, 2, 2, 2, 1}}},
        {TOPO_2X2X8, 40, 16, 2, LAUNCH_DIST_BLOCK,
         {{2, 1, 2, 2, 2}, {4, 2, 1, 4, 1}, {1, 1, 4, 2, 5}, {2, 2, 2, 1, 2}}},
        {XML_INTERLEAVED, 64, 32, 1, LAUNCH_DIST_CYCLIC,
         {{2, 1, 8, 2, 4}, {4, 2, 2, 2, 2}, {1, 2, 4, 1, 2}}},
        {XML_SMT, 16, 4, 2, LAUNCH_DIST_BLOCK,
         {{2, 1, 2, 1, 2}, {4, 1, 4, 1, 1}, {2, 2, 2, 2, 2}}},
    };
    make_orders();
    long grids = 0;
    tu_problems_reset();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct sweep_case *sc = &cases[i];
        struct launch_machine m;
        struct launch_slot slots[MAX_RANKS];
        if (!load(&m, sc->topology)) {
            launch_machine_free(&m);
            continue;
        }
        if (emulate(slots, &m, sc->world, sc->ranks_per_node, sc->cores_per_rank, sc->dist))
            for (size_t l = 0; l < 8 && sc->layouts[l].tp; l++)
                sweep_layout(sc, &sc->layouts[l], slots, &grids);
        launch_machine_free(&m);
    }
    printf("\n  %ld grids checked ", grids);
    TU_EXPECT(grids > 500, "expected more than 500 grids in the sweep, got %ld", grids);
    TU_EXPECT_NO_PROBLEMS();
}

struct locality_want {
    enum dist_kind kind;
    int size, groups;
    enum launch_level level;
    int cross_node, cross_package;
};

/* The Mixtral layout on 4 nodes x 32 cores, one core a rank, default order: attention grid
 * tp (stride 1) dp (16, stride 2) pp (4, stride 32); MoE grid etp (stride 1) ep (8, stride
 * 2) edp (2, stride 16) pp. Each node holds one pipeline stage, so pp crosses nodes. */
static void test_locality_mixtral(void)
{
    static const char *const topologies[2] = {TOPO_2X2X8, TOPO_L3_32};
    struct launch_config c;
    mixtral_config(&c);
    struct dist_grid g;
    int const rc = launch_layout_make(&c, 128, &g);
    TU_EXPECT(rc == 0, "the Mixtral layout on 128 ranks: expected launch_layout_make to pass, "
              "got %d: %s", rc, vd_err_msg());
    if (!grid_of(&g, &c, 128, NULL)) return;
    TU_EXPECT(g.dims.dp == 16 && g.dims.etp == 2 && g.dims.edp == 2,
              "expected dp 16, etp 2, edp 2, got dp %d etp %d edp %d", g.dims.dp, g.dims.etp,
              g.dims.edp);
    for (int t = 0; t < 2; t++) {
        enum launch_level const near_level = t ? LAUNCH_LEVEL_L3 : LAUNCH_LEVEL_NUMA;
        struct locality_want const want[] = {
            {DIST_TP, 2, 64, near_level, 0, 0},
            {DIST_CP, 1, 128, LAUNCH_LEVEL_CORE, 0, 0},
            {DIST_DP, 16, 8, LAUNCH_LEVEL_NODE, 0, 8},
            {DIST_DPCP, 16, 8, LAUNCH_LEVEL_NODE, 0, 8},
            {DIST_TPCP, 2, 64, near_level, 0, 0},
            {DIST_PP, 4, 32, LAUNCH_LEVEL_NETWORK, 32, 32},
            {DIST_EP, 8, 16, LAUNCH_LEVEL_PACKAGE, 0, 0},
            {DIST_ETP, 2, 64, near_level, 0, 0},
            {DIST_EDP, 2, 64, LAUNCH_LEVEL_NODE, 0, 64},
            {DIST_ETPEP, 16, 8, LAUNCH_LEVEL_PACKAGE, 0, 0},
            {DIST_WORLD, 128, 1, LAUNCH_LEVEL_NETWORK, 1, 1},
        };
        struct launch_machine m;
        struct launch_slot slots[MAX_RANKS];
        if (!load(&m, topologies[t]) || !emulate(slots, &m, 128, 32, 1, LAUNCH_DIST_BLOCK)) {
            launch_machine_free(&m);
            continue;
        }
        printf("\n    %s: crossing nodes:", topologies[t]);
        for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
            struct launch_locality got;
            launch_place_locality(&got, &g, slots, want[i].kind);
            struct launch_locality const w = {want[i].size, want[i].groups, want[i].level,
                                              want[i].cross_node, want[i].cross_package};
            char gt[160], wt[160];
            locality_text(gt, sizeof gt, &got);
            locality_text(wt, sizeof wt, &w);
            TU_EXPECT(same_locality(&got, &w), "Mixtral on 4 x 32 (%s), %s: expected %s, got %s",
                      topologies[t], dist_kind_name(want[i].kind), wt, gt);
            printf(" %s %d/%d,", dist_kind_name(want[i].kind), got.cross_node, got.groups);
        }
        launch_machine_free(&m);
    }
    printf("\n  ");
}

/* ---------------------------------------------------------------- traffic estimates */

/* The small config on 16 ranks, tp 2 cp 2 ep 2 (etp = tp = 2) pp 2: dp 2, edp 2.
 * Sizes the formulas use: d 64, L 4, E 4, k 2, F 128, V 256, hd 64/4 = 16, G 2, f 4 bytes;
 * m = global_batch / (dp micro_batch) = 8 / (2 x 2) = 2 micro-batches; n = micro_batch
 * seq_len / cp = 2 x 64 / 2 = 64 tokens; Ns = n / tp = 32; Ls = L / pp = 2. */
static void small_layout(struct launch_config *c)
{
    small_config(c);
    set_layout(c, 2, 2, 2, 0, 2);
}

/* Parameters (model_param_counts' sizes, written out): outer 2 V d + d = 32768 + 64 =
 * 32832; a layer's dense part 2 d + d hd (H + 2 G) + H hd d + E d = 128 + 8192 + 4096 + 256
 * = 12672; dense = 32832 + 4 x 12672 = 83520; experts L E 3 d F = 4 x 4 x 3 x 64 x 128 =
 * 393216. */
enum { SMALL_DENSE = 83520, SMALL_EXPERT = 393216 };

static void expect_nbytes(const double *got, enum dist_kind kind, double want, const char *what)
{
    TU_EXPECT(near(got[kind], want), "%s, %s: expected %.1f bytes, got %.1f", what,
              dist_kind_name(kind), want, got[kind]);
}

static void test_traffic_hand(void)
{
    struct launch_config c;
    small_layout(&c);
    int rc = launch_config_validate(&c);
    TU_EXPECT(rc == 0, "the small config: expected it valid, got %d: %s", rc, vd_err_msg());
    struct dist_grid g;
    rc = launch_layout_make(&c, 16, &g);
    TU_EXPECT(rc == 0, "the small layout on 16 ranks: expected it valid, got %d: %s", rc,
              vd_err_msg());
    if (!grid_of(&g, &c, 16, NULL)) return;
    double nb[DIST_NKIND];
    launch_traffic_estimate(nb, &c, &g);
    /* tp: m (6 Ls + 2/pp) (tp-1)/tp n d f = 2 x 13 x 1/2 x 64 x 64 x 4 = 212992, plus the
     * replicated gradients 2 (tp-1)/tp (Ls (2 d + d E) + d / pp) f = (2 x 384 + 32) x 4 =
     * 3200 */
    expect_nbytes(nb, DIST_TP, 212992.0 + 3200.0, "small");
    /* cp: kv = n 2 (G/tp) hd f = 64 x 2 x 1 x 16 x 4 = 8192; m Ls 3 (cp-1) kv = 2 x 2 x 3 x
     * 8192 = 98304 */
    expect_nbytes(nb, DIST_CP, 98304.0, "small");
    /* etp x ep, all-to-all: m Ls 4 Ns k d f ((ep-1)/ep + etp-1) = 2 x 2 x 4 x 32 x 2 x 256 x
     * 1.5 = 393216 */
    expect_nbytes(nb, DIST_ETPEP, 393216.0, "small");
    /* dp x cp: 2 (dc-1)/dc dense / (tp pp) f, dc = 4: 1.5 x 83520 / 4 x 4 = 125280 */
    expect_nbytes(nb, DIST_DPCP, 2.0 * 3.0 / 4.0 * SMALL_DENSE / 4.0 * 4.0, "small");
    /* edp: 2 (edp-1)/edp expert / (etp ep pp) f = 393216 / 8 x 4 = 196608 */
    expect_nbytes(nb, DIST_EDP, 2.0 * 1.0 / 2.0 * SMALL_EXPERT / 8.0 * 4.0, "small");
    /* pp: m vpp 2 Ns d f = 2 x 1 x 2 x 32 x 256 = 32768 */
    expect_nbytes(nb, DIST_PP, 32768.0, "small");
    /* no capacity: no router exchange; no traffic on the others */
    expect_nbytes(nb, DIST_TPCP, 0.0, "small");
    expect_nbytes(nb, DIST_DP, 0.0, "small");
    expect_nbytes(nb, DIST_EP, 0.0, "small");
    expect_nbytes(nb, DIST_ETP, 0.0, "small");
    expect_nbytes(nb, DIST_WORLD, 0.0, "small");

    /* capacity dropping: tp x cp all-gathers the router's choices, m Ls (tc-1) Ns (1+k+E) f =
     * 2 x 2 x 3 x 32 x 7 x 4 = 10752 */
    set_key(&c, "model.moe_capacity_factor", "1.25");
    launch_traffic_estimate(nb, &c, &g);
    expect_nbytes(nb, DIST_TPCP, 10752.0, "capacity 1.25");

    /* the all-gather dispatcher on ep 4, etp 1 (edp 2): m Ls 4 (etp ep - 1) Ns d f = 2 x 2 x
     * 4 x 3 x 32 x 256 = 393216, against all-to-all's m Ls 4 Ns k d f (ep-1)/ep = 196608 */
    small_config(&c);
    set_layout(&c, 2, 2, 4, 1, 2);
    if (!grid_of(&g, &c, 16, NULL)) return;
    launch_traffic_estimate(nb, &c, &g);
    expect_nbytes(nb, DIST_ETPEP, 196608.0, "all-to-all, ep 4 etp 1");
    set_key(&c, "model.moe_token_dispatcher_type", "allgather");
    launch_traffic_estimate(nb, &c, &g);
    expect_nbytes(nb, DIST_ETPEP, 393216.0, "all-gather, ep 4 etp 1");
    /* interleaving: pp sends once per model chunk */
    small_layout(&c);
    set_int(&c, "parallel.vpp", 2);
    if (!grid_of(&g, &c, 16, NULL)) return;
    launch_traffic_estimate(nb, &c, &g);
    expect_nbytes(nb, DIST_PP, 2.0 * 32768.0, "vpp 2");
}

/* A kind whose groups are single ranks sends nothing. */
static void test_traffic_zero(void)
{
    static const struct layout layouts[] = {{1, 1, 1, 1, 1}, {2, 1, 1, 1, 1}, {1, 2, 1, 1, 1},
                                            {1, 1, 4, 1, 1}, {1, 1, 1, 1, 4}, {2, 2, 2, 2, 2},
                                            {4, 1, 1, 4, 1}, {1, 1, 2, 2, 4}};
    static const int worlds[] = {1, 4, 16};
    struct launch_config c;
    small_config(&c);
    set_key(&c, "model.moe_capacity_factor", "1.5");
    tu_problems_reset();
    long checked = 0;
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++)
        for (size_t w = 0; w < sizeof worlds / sizeof worlds[0]; w++) {
            const struct layout *l = &layouts[i];
            c.parallel.tp = l->tp;
            c.parallel.cp = l->cp;
            c.parallel.ep = l->ep;
            c.parallel.etp = l->etp;
            c.parallel.pp = l->pp;
            struct dist_grid g;
            if (!grid_quiet(&g, &c, worlds[w], NULL)) continue;
            double nb[DIST_NKIND];
            launch_traffic_estimate(nb, &c, &g);
            for (size_t k = 0; k < NEVERY; k++) {
                enum dist_kind const kind = every_kind[k];
                int const size = dist_grid_group_size(&g, kind);
                checked++;
                if (nb[kind] < 0.0 || (size == 1 && nb[kind] != 0.0))
                    tu_problem("world %d tp %d cp %d ep %d etp %d pp %d: %s (size %d): "
                               "expected %s, got %.1f bytes", worlds[w], l->tp, l->cp, l->ep,
                               l->etp, l->pp, dist_kind_name(kind), size,
                               size == 1 ? "0" : ">= 0", nb[kind]);
            }
            if (worlds[w] == 1)
                for (int k = 0; k < DIST_NKIND; k++)
                    if (nb[k] != 0.0)
                        tu_problem("1 rank: %s sends %.1f bytes",
                                   dist_kind_name((enum dist_kind)k), nb[k]);
        }
    TU_EXPECT(checked > 100, "expected more than 100 kinds checked, got %ld", checked);
    TU_EXPECT_NO_PROBLEMS();
}

static void test_traffic_scaling(void)
{
    struct launch_config c;
    small_layout(&c);
    set_key(&c, "model.moe_capacity_factor", "1.25");
    struct dist_grid g;
    if (!grid_of(&g, &c, 16, NULL)) return;
    double base[DIST_NKIND], twice[DIST_NKIND];
    launch_traffic_estimate(base, &c, &g);
    set_int(&c, "train.global_batch", 16);
    launch_traffic_estimate(twice, &c, &g);
    /* per micro-batch traffic doubles; tp's gradient all-reduce (3200 bytes, once a step)
     * does not */
    TU_EXPECT(near(twice[DIST_TP], 2.0 * base[DIST_TP] - 3200.0), "tp with twice the batch: "
              "expected 2 x %.1f - 3200 (the per-step gradient part), got %.1f", base[DIST_TP],
              twice[DIST_TP]);
    static const enum dist_kind doubled[] = {DIST_CP, DIST_ETPEP, DIST_TPCP, DIST_PP};
    for (size_t i = 0; i < sizeof doubled / sizeof doubled[0]; i++) {
        enum dist_kind const k = doubled[i];
        TU_EXPECT(base[k] > 0.0 && near(twice[k], 2.0 * base[k]), "%s with twice the batch: "
                  "expected 2 x %.1f, got %.1f", dist_kind_name(k), base[k], twice[k]);
    }
    static const enum dist_kind same[] = {DIST_DPCP, DIST_EDP};
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
        enum dist_kind const k = same[i];
        TU_EXPECT(base[k] > 0.0 && near(twice[k], base[k]), "%s with twice the batch: expected "
                  "%.1f unchanged, got %.1f", dist_kind_name(k), base[k], twice[k]);
    }
    /* top-k: the all-to-all dispatcher moves k rows a token, the all-gather one whole tokens */
    set_int(&c, "train.global_batch", 8);
    set_int(&c, "model.num_experts_per_tok", 4);
    double k4[DIST_NKIND];
    launch_traffic_estimate(k4, &c, &g);
    TU_EXPECT(near(k4[DIST_ETPEP], 2.0 * base[DIST_ETPEP]), "etp x ep with k 4 instead of 2: "
              "expected 2 x %.1f, got %.1f", base[DIST_ETPEP], k4[DIST_ETPEP]);
    set_key(&c, "model.moe_token_dispatcher_type", "allgather");
    double ag4[DIST_NKIND], ag2[DIST_NKIND];
    launch_traffic_estimate(ag4, &c, &g);
    set_int(&c, "model.num_experts_per_tok", 2);
    launch_traffic_estimate(ag2, &c, &g);
    TU_EXPECT(ag2[DIST_ETPEP] > 0.0 && near(ag4[DIST_ETPEP], ag2[DIST_ETPEP]), "the all-gather "
              "dispatcher with k 4: expected %.1f as with k 2, got %.1f", ag2[DIST_ETPEP],
              ag4[DIST_ETPEP]);
    /* cp's ring and all-gather move the same bytes */
    set_key(&c, "parallel.cp_comm_type", "allgather");
    double cpag[DIST_NKIND];
    launch_traffic_estimate(cpag, &c, &g);
    TU_EXPECT(near(cpag[DIST_CP], base[DIST_CP]), "cp all-gather: expected %.1f as the ring, "
              "got %.1f", base[DIST_CP], cpag[DIST_CP]);
}

static void test_traffic_pattern(void)
{
    struct launch_config c;
    small_layout(&c);
    for (size_t k = 0; k < NEVERY; k++) {
        enum dist_kind const kind = every_kind[k];
        enum launch_pattern const want = kind == DIST_CP   ? LAUNCH_PATTERN_RING
                                         : kind == DIST_PP ? LAUNCH_PATTERN_CHAIN
                                                           : LAUNCH_PATTERN_SPREAD;
        TU_EXPECT(launch_traffic_pattern(&c, kind) == want, "%s (cp p2p, vpp 1): expected "
                  "pattern %d, got %d", dist_kind_name(kind), (int)want,
                  (int)launch_traffic_pattern(&c, kind));
    }
    set_key(&c, "parallel.cp_comm_type", "allgather");
    set_int(&c, "parallel.vpp", 2);
    TU_EXPECT(launch_traffic_pattern(&c, DIST_CP) == LAUNCH_PATTERN_SPREAD,
              "cp all-gather: expected spread, got %d", (int)launch_traffic_pattern(&c, DIST_CP));
    TU_EXPECT(launch_traffic_pattern(&c, DIST_PP) == LAUNCH_PATTERN_CYCLE,
              "pp with vpp 2: expected a cycle, got %d", (int)launch_traffic_pattern(&c, DIST_PP));
}

/* ---------------------------------------------------------------- crossing */

static bool crossing_of(struct launch_crossing *x, double nb[DIST_NKIND], struct dist_grid *g,
                        const struct launch_config *c, int world, const char *order,
                        const struct launch_slot *slots)
{
    if (!grid_of(g, c, world, order)) return false;
    launch_traffic_estimate(nb, c, g);
    launch_place_crossing(x, c, g, slots);
    return true;
}

static void expect_bytes(double got, double want, const char *what)
{
    TU_EXPECT(near(got, want), "%s: expected %.3f bytes, got %.3f", what, want, got);
}

/* 4 ranks, 2 a node, dp 4: a rank's dp x cp and edp peers are 1 on its node and 2 off it,
 * so 2/3 of its bytes leave the node. */
static void test_crossing_spread(void)
{
    struct launch_machine m;
    struct launch_slot slots[4];
    struct launch_config c;
    small_config(&c);
    if (!load(&m, TOPO_2X2X8) || !emulate(slots, &m, 4, 2, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    struct launch_crossing x;
    double nb[DIST_NKIND];
    struct dist_grid g;
    if (crossing_of(&x, nb, &g, &c, 4, NULL, slots)) {
        TU_EXPECT(nb[DIST_DPCP] > 0.0 && nb[DIST_EDP] > 0.0, "dp 4: expected dp x cp and edp "
                  "traffic");
        expect_bytes(x.kind_node_nbytes[DIST_DPCP], 4.0 * 2.0 / 3.0 * nb[DIST_DPCP],
                     "dp 4 on 2 x 2, dp x cp across nodes");
        expect_bytes(x.kind_node_nbytes[DIST_EDP], 4.0 * 2.0 / 3.0 * nb[DIST_EDP],
                     "dp 4 on 2 x 2, edp across nodes");
        expect_bytes(x.node_nbytes, 4.0 * 2.0 / 3.0 * (nb[DIST_DPCP] + nb[DIST_EDP]),
                     "dp 4 on 2 x 2, across nodes");
        /* the two ranks of a node share package 0 */
        expect_bytes(x.package_nbytes, x.node_nbytes,
                     "dp 4 on 2 x 2, 1 core each, across packages");
    }
    /* 16 cores a rank: the two ranks of a node are on its two packages */
    if (emulate(slots, &m, 4, 2, 16, LAUNCH_DIST_BLOCK) &&
        crossing_of(&x, nb, &g, &c, 4, NULL, slots)) {
        expect_bytes(x.node_nbytes, 4.0 * 2.0 / 3.0 * (nb[DIST_DPCP] + nb[DIST_EDP]),
                     "dp 4 on 2 x 2 x 16 cores, across nodes");
        expect_bytes(x.package_nbytes, 4.0 * (nb[DIST_DPCP] + nb[DIST_EDP]),
                     "dp 4 on 2 x 2 x 16 cores, across packages");
    }
    launch_machine_free(&m);
}

/* cp 4 on 2 nodes of 2: the ring 0 -> 1 -> 2 -> 3 -> 0 crosses at 1 -> 2 and 3 -> 0; the
 * all-gather sends 2/3 of each rank's bytes off its node. */
static void test_crossing_ring(void)
{
    struct launch_machine m;
    struct launch_slot slots[4];
    struct launch_config c;
    small_config(&c);
    set_layout(&c, 1, 4, 1, 0, 1);
    if (!load(&m, TOPO_2X2X8) || !emulate(slots, &m, 4, 2, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    struct launch_crossing x;
    double nb[DIST_NKIND];
    struct dist_grid g;
    if (crossing_of(&x, nb, &g, &c, 4, NULL, slots)) {
        TU_EXPECT(nb[DIST_CP] > 0.0, "cp 4: expected cp traffic");
        expect_bytes(x.kind_node_nbytes[DIST_CP], 2.0 * nb[DIST_CP], "cp 4 ring on 2 x 2");
        expect_bytes(x.kind_node_nbytes[DIST_DPCP], 4.0 * 2.0 / 3.0 * nb[DIST_DPCP],
                     "cp 4 on 2 x 2, dp x cp");
    }
    set_key(&c, "parallel.cp_comm_type", "allgather");
    if (crossing_of(&x, nb, &g, &c, 4, NULL, slots))
        expect_bytes(x.kind_node_nbytes[DIST_CP], 4.0 * 2.0 / 3.0 * nb[DIST_CP],
                     "cp 4 all-gather on 2 x 2");
    /* order cp-...: the same grid; on nodes of 1 every hop of the ring crosses */
    set_key(&c, "parallel.cp_comm_type", "p2p");
    if (emulate(slots, &m, 4, 1, 1, LAUNCH_DIST_BLOCK) &&
        crossing_of(&x, nb, &g, &c, 4, NULL, slots))
        expect_bytes(x.kind_node_nbytes[DIST_CP], 4.0 * nb[DIST_CP], "cp 4 ring on 4 x 1");
    launch_machine_free(&m);
}

/* pp 4: a chain 0 - 1 - 2 - 3, each rank's bytes half to each neighbour, the ends having
 * one; interleaved (vpp 2) a cycle, 3 feeding 0. */
static void test_crossing_chain(void)
{
    struct launch_machine m;
    struct launch_slot slots[4];
    struct launch_config c;
    small_config(&c);
    set_int(&c, "model.num_hidden_layers", 8);
    set_layout(&c, 1, 1, 1, 0, 4);
    if (!load(&m, TOPO_2X2X8)) {
        launch_machine_free(&m);
        return;
    }
    struct launch_crossing x;
    double nb[DIST_NKIND];
    struct dist_grid g;
    /* 4 nodes of 1: every link crosses: 1/2 + 1 + 1 + 1/2 of a rank's bytes */
    if (emulate(slots, &m, 4, 1, 1, LAUNCH_DIST_BLOCK) &&
        crossing_of(&x, nb, &g, &c, 4, NULL, slots)) {
        TU_EXPECT(nb[DIST_PP] > 0.0, "pp 4: expected pp traffic");
        expect_bytes(x.kind_node_nbytes[DIST_PP], 3.0 * nb[DIST_PP], "pp 4 chain on 4 x 1");
        expect_bytes(x.node_nbytes, 3.0 * nb[DIST_PP], "pp 4 chain on 4 x 1, every kind");
        expect_bytes(x.package_nbytes, 3.0 * nb[DIST_PP], "pp 4 chain on 4 x 1, packages");
    }
    set_int(&c, "parallel.vpp", 2);
    TU_EXPECT(launch_config_validate(&c) == 0, "pp 4 vpp 2 on 8 layers: %s", vd_err_msg());
    if (crossing_of(&x, nb, &g, &c, 4, NULL, slots))
        expect_bytes(x.kind_node_nbytes[DIST_PP], 4.0 * nb[DIST_PP], "pp 4 cycle on 4 x 1");
    /* 2 nodes of 2: the chain crosses at 1 - 2 only, the cycle also at 3 - 0 */
    if (emulate(slots, &m, 4, 2, 1, LAUNCH_DIST_BLOCK) &&
        crossing_of(&x, nb, &g, &c, 4, NULL, slots))
        expect_bytes(x.kind_node_nbytes[DIST_PP], 2.0 * nb[DIST_PP], "pp 4 cycle on 2 x 2");
    set_int(&c, "parallel.vpp", 1);
    if (crossing_of(&x, nb, &g, &c, 4, NULL, slots)) {
        expect_bytes(x.kind_node_nbytes[DIST_PP], nb[DIST_PP], "pp 4 chain on 2 x 2");
        expect_bytes(x.package_nbytes, nb[DIST_PP], "pp 4 chain on 2 x 2, packages");
    }
    launch_machine_free(&m);
}

/* pp 2 x dp 2 on 2 nodes of 2: the default order (pp slowest) keeps dp and edp inside
 * nodes and sends pp across; tp-cp-ep-pp-dp the other way round. */
static void test_crossing_orders(void)
{
    struct launch_machine m;
    struct launch_slot slots[4];
    struct launch_config c;
    small_config(&c);
    set_layout(&c, 1, 1, 1, 0, 2);
    if (!load(&m, TOPO_2X2X8) || !emulate(slots, &m, 4, 2, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    struct launch_crossing x;
    double nb[DIST_NKIND];
    struct dist_grid g;
    if (crossing_of(&x, nb, &g, &c, 4, NULL, slots)) {
        expect_bytes(x.kind_node_nbytes[DIST_PP], 4.0 * 0.5 * nb[DIST_PP], "default order, pp");
        expect_bytes(x.kind_node_nbytes[DIST_DPCP], 0.0, "default order, dp x cp");
        expect_bytes(x.kind_node_nbytes[DIST_EDP], 0.0, "default order, edp");
        expect_bytes(x.node_nbytes, 2.0 * nb[DIST_PP], "default order, every kind");
    }
    if (crossing_of(&x, nb, &g, &c, 4, "tp-cp-ep-pp-dp", slots)) {
        expect_bytes(x.kind_node_nbytes[DIST_PP], 0.0, "tp-cp-ep-pp-dp, pp");
        expect_bytes(x.kind_node_nbytes[DIST_DPCP], 4.0 * nb[DIST_DPCP], "tp-cp-ep-pp-dp, dp x cp");
        expect_bytes(x.kind_node_nbytes[DIST_EDP], 4.0 * nb[DIST_EDP], "tp-cp-ep-pp-dp, edp");
        expect_bytes(x.node_nbytes, 4.0 * (nb[DIST_DPCP] + nb[DIST_EDP]),
                     "tp-cp-ep-pp-dp, every kind");
    }
    launch_machine_free(&m);
}

/* ---------------------------------------------------------------- orders */

/* On one node every order ties on node bytes and packages decide; on a one-package node
 * everything ties and the default order comes first, then the rest by text. */
static void test_orders_ties(void)
{
    static struct launch_order_estimate est[LAUNCH_ORDERS_MAX];
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS];
    struct launch_config c;
    small_config(&c);
    set_layout(&c, 2, 1, 4, 0, 2);
    make_orders();
    if (load(&m, TOPO_2X2X8) && emulate(slots, &m, 32, 0, 1, LAUNCH_DIST_BLOCK)) {
        tu_problems_reset();
        int const n = check_orders(est, &c, 32, slots, "one node of 32");
        TU_EXPECT_NO_PROBLEMS();
        double lo = INFINITY, hi = 0.0, node = 0.0;
        for (int i = 0; i < n; i++) {
            lo = fmin(lo, est[i].crossing.package_nbytes);
            hi = fmax(hi, est[i].crossing.package_nbytes);
            node = fmax(node, est[i].crossing.node_nbytes);
        }
        TU_EXPECT(n > 1 && node == 0.0 && lo < hi, "one node of 32: expected several orders, "
                  "none crossing nodes, some crossing packages more than others; got %d orders, "
                  "%.1f node bytes, package bytes %.1f..%.1f", n, node, lo, hi);
        TU_EXPECT(n > 0 && est[0].crossing.package_nbytes == lo, "one node of 32: expected "
                  "the first order to cross packages least (%.1f), got %s with %.1f", lo,
                  n > 0 ? est[0].order : "-", n > 0 ? est[0].crossing.package_nbytes : 0.0);
    }
    launch_machine_free(&m);
    if (load(&m, TOPO_ONE_PACKAGE) && emulate(slots, &m, 16, 0, 1, LAUNCH_DIST_BLOCK)) {
        set_layout(&c, 2, 1, 2, 0, 2);
        tu_problems_reset();
        int const n = check_orders(est, &c, 16, slots, "one package of 16");
        TU_EXPECT_NO_PROBLEMS();
        TU_EXPECT(n > 1 && strcmp(est[0].order, DIST_GRID_ORDER_DEFAULT) == 0,
                  "one package of 16, every order tied: expected %s first of several, got %s "
                  "of %d", DIST_GRID_ORDER_DEFAULT, n > 0 ? est[0].order : "-", n);
        bool sorted = true;
        for (int i = 2; i < n; i++) sorted &= strcmp(est[i - 1].order, est[i].order) < 0;
        TU_EXPECT(sorted, "one package of 16, every order tied: expected the orders after the "
                  "default by text");
    }
    launch_machine_free(&m);
}

/* The Mixtral layout on 4 nodes of 32. A node holds 32 ranks; etp x ep groups (16 ranks)
 * send by far the most (all-to-all, 4 times a layer and micro-batch) and the pipeline
 * groups (4 stages) cannot also stay inside a node with them (64 ranks), nor can an order
 * put pp below dp and edp without breaking the rule that both grids share their pipeline
 * groups. So the best any order can do is the default's: one pipeline stage a node, only
 * pp crossing nodes. auto must find no order better than that, keep tp inside nodes, and
 * rank every order as the references do. */
static void test_orders_mixtral(void)
{
    static struct launch_order_estimate est[LAUNCH_ORDERS_MAX];
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS];
    struct launch_config c;
    mixtral_config(&c);
    if (!load(&m, TOPO_2X2X8) || !emulate(slots, &m, 128, 32, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    tu_problems_reset();
    int const n = check_orders(est, &c, 128, slots, "Mixtral on 4 x 32");
    TU_EXPECT_NO_PROBLEMS();
    int def = -1;
    for (int i = 0; i < n; i++)
        if (strcmp(est[i].order, DIST_GRID_ORDER_DEFAULT) == 0) def = i;
    if (TU_EXPECT(n > 1 && def >= 0, "Mixtral: expected the default order among %d", n)) {
        printf("\n    auto: %s, %.4g bytes across nodes; default: %.4g; worst %s: %.4g (%d "
               "orders) ", est[0].order, est[0].crossing.node_nbytes,
               est[def].crossing.node_nbytes, est[n - 1].order, est[n - 1].crossing.node_nbytes,
               n);
        TU_EXPECT(est[0].crossing.node_nbytes <= est[def].crossing.node_nbytes,
                  "Mixtral: expected auto's order %s to cross nodes with no more bytes than the "
                  "default's %.6g, got %.6g", est[0].order, est[def].crossing.node_nbytes,
                  est[0].crossing.node_nbytes);
        /* only pp crosses: 32 chains of 4 stages, each 1/2 + 1 + 1 + 1/2 of a rank's bytes */
        double nb[DIST_NKIND];
        struct dist_grid g;
        if (grid_of(&g, &c, 128, NULL)) {
            launch_traffic_estimate(nb, &c, &g);
            expect_bytes(est[def].crossing.node_nbytes, 32.0 * 3.0 * nb[DIST_PP],
                         "Mixtral, default order, across nodes");
        }
        TU_EXPECT(est[n - 1].crossing.node_nbytes > 10.0 * est[0].crossing.node_nbytes,
                  "Mixtral: expected the worst order (%s) to cross nodes with far more bytes "
                  "than the best", est[n - 1].order);
        if (grid_of(&g, &c, 128, est[0].order)) {
            struct launch_locality tp;
            launch_place_locality(&tp, &g, slots, DIST_TP);
            TU_EXPECT(tp.cross_node == 0, "Mixtral, auto's order %s: expected no tp group "
                      "across nodes, got %d", est[0].order, tp.cross_node);
        }
    }
    launch_machine_free(&m);
}

/* A small model with many micro-batches, pp 2 x dp 2 on 2 nodes of 2: pipeline traffic
 * (2 x 64 micro-batches x 128 x 64 floats a rank) outweighs the gradients' (dp x cp and
 * edp), so auto sends dp across nodes and keeps pp inside, unlike the default. */
static void test_orders_beat_default(void)
{
    static struct launch_order_estimate est[LAUNCH_ORDERS_MAX];
    struct launch_machine m;
    struct launch_slot slots[4];
    struct launch_config c;
    small_config(&c);
    set_layout(&c, 1, 1, 1, 0, 2);
    set_int(&c, "train.global_batch", 256);
    if (!load(&m, TOPO_2X2X8) || !emulate(slots, &m, 4, 2, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    tu_problems_reset();
    int const n = check_orders(est, &c, 4, slots, "pp 2 dp 2 on 2 x 2");
    TU_EXPECT_NO_PROBLEMS();
    struct dist_grid g;
    double nb[DIST_NKIND];
    if (n > 0 && grid_of(&g, &c, 4, NULL)) {
        launch_traffic_estimate(nb, &c, &g);
        /* default: pp across, 4 ranks x 1/2; the other order: dp x cp and edp, 4 ranks x 1 */
        TU_EXPECT(2.0 * nb[DIST_PP] > 4.0 * (nb[DIST_DPCP] + nb[DIST_EDP]), "reference: expected "
                  "pp to outweigh the gradients, 2 x %.0f against 4 x (%.0f + %.0f)",
                  nb[DIST_PP], nb[DIST_DPCP], nb[DIST_EDP]);
        expect_bytes(est[0].crossing.node_nbytes, 4.0 * (nb[DIST_DPCP] + nb[DIST_EDP]),
                     "pp 2 dp 2, auto's order across nodes");
        TU_EXPECT(strcmp(est[0].order, DIST_GRID_ORDER_DEFAULT) != 0 && n == 2 &&
                      strcmp(est[1].order, DIST_GRID_ORDER_DEFAULT) == 0,
                  "pp 2 dp 2: expected 2 orders, the default second, got %s first of %d",
                  est[0].order, n);
        if (grid_of(&g, &c, 4, est[0].order)) {
            struct launch_locality pp;
            launch_place_locality(&pp, &g, slots, DIST_PP);
            TU_EXPECT(pp.cross_node == 0, "pp 2 dp 2, auto's order %s: expected pp inside nodes, "
                      "got %d groups across", est[0].order, pp.cross_node);
        }
    }
    launch_machine_free(&m);
}

/* parallel.order = auto resolved: the order of launch_place_orders' first entry, the list
 * printed; a named order left alone. */
static void test_orders_resolve(void)
{
    static struct launch_order_estimate est[LAUNCH_ORDERS_MAX], mine[LAUNCH_ORDERS_MAX];
    struct launch_machine m;
    struct launch_slot slots[4];
    struct launch_config c;
    small_config(&c);
    set_layout(&c, 1, 1, 1, 0, 2);
    set_int(&c, "train.global_batch", 256);
    if (!load(&m, TOPO_2X2X8) || !emulate(slots, &m, 4, 2, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    int const n = launch_place_orders(est, &c, 4, slots);
    int count = -1;
    int rc = launch_place_resolve_order(&c, 4, slots, NULL, NULL, &count);
    TU_EXPECT(rc == 0 && count == 0 && strcmp(c.parallel.order, DIST_GRID_ORDER_DEFAULT) == 0,
              "a named order: expected 0, no order considered and the order kept, got %d, %d "
              "and %s", rc, count, c.parallel.order);
    set_key(&c, "parallel.order", "auto");
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!TU_EXPECT(f != NULL, "open_memstream")) return;
    rc = launch_place_resolve_order(&c, 4, slots, f, mine, &count);
    fclose(f);
    TU_EXPECT(rc == 0 && count == n && n > 0 && strcmp(c.parallel.order, est[0].order) == 0,
              "auto: expected 0, %d orders and %s, got %d, %d and %s", n,
              n > 0 ? est[0].order : "-", rc, count, c.parallel.order);
    bool same = count == n;
    for (int i = 0; i < n && same; i++)
        same = strcmp(mine[i].order, est[i].order) == 0 &&
               mine[i].crossing.node_nbytes == est[i].crossing.node_nbytes &&
               mine[i].crossing.package_nbytes == est[i].crossing.package_nbytes;
    TU_EXPECT(same, "auto: expected the estimates of launch_place_orders left in est");
    for (int i = 0; i < n; i++)
        TU_EXPECT(strstr(text, est[i].order) != NULL, "auto: expected the list to name %s:\n%s",
                  est[i].order, text);
    free(text);
    set_key(&c, "parallel.order", "auto");
    set_int(&c, "parallel.tp", 3);
    rc = launch_place_resolve_order(&c, 4, slots, NULL, NULL, NULL);
    TU_EXPECT(rc == VD_EINVAL && strcmp(c.parallel.order, "auto") == 0, "auto with tp 3 on 4 "
              "ranks: expected VD_EINVAL and the order left auto, got %d and %s", rc,
              c.parallel.order);
    launch_machine_free(&m);
}

static void test_orders_invalid(void)
{
    static struct launch_order_estimate est[LAUNCH_ORDERS_MAX];
    struct launch_machine m;
    struct launch_slot slots[8];
    struct launch_config c;
    small_config(&c);
    set_layout(&c, 4, 1, 1, 0, 1);
    if (!load(&m, TOPO_2X2X8) || !emulate(slots, &m, 6, 0, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    struct dist_grid g;
    int rc = dist_grid_init(&g, 6, 4, 1, 1, 4, 1, NULL);
    char refusal[512];
    snprintf(refusal, sizeof refusal, "%s", vd_err_msg());
    char *at = strstr(refusal, " (at ");
    if (at) *at = '\0';
    TU_EXPECT(rc < 0 && refusal[0], "tp 4 on 6 ranks: expected dist_grid_init to refuse it");
    vd_err_clear();
    rc = launch_place_orders(est, &c, 6, slots);
    TU_EXPECT(rc == VD_EINVAL, "tp 4 on 6 ranks: expected VD_EINVAL, got %d", rc);
    msg_has("tp 4 on 6 ranks", refusal);
    launch_machine_free(&m);
}

/* ---------------------------------------------------------------- the report */

static const enum dist_kind report_kinds[] = {DIST_TP,  DIST_CP, DIST_DP,  DIST_DPCP,
                                              DIST_TPCP, DIST_PP, DIST_EP,  DIST_ETP,
                                              DIST_EDP, DIST_ETPEP};
#define NREPORT (sizeof report_kinds / sizeof report_kinds[0])

/* Whether some order keeps every group of kind inside nodes. */
static bool some_order_keeps(const struct launch_config *c, int world,
                             const struct launch_slot *slots, enum dist_kind kind)
{
    for (int o = 0; o < norders; o++) {
        struct dist_grid g;
        struct launch_locality l;
        if (!grid_quiet(&g, c, world, all_orders[o])) continue;
        ref_locality(&l, &g, slots, kind);
        if (l.cross_node == 0) return true;
    }
    return false;
}

/* The report of c on g: a row per kind with the reference's numbers, and a warning line,
 * exactly when some kind crosses nodes that another order keeps inside, naming those kinds
 * and auto's order. Returns the report (caller frees) for more checks. */
static char *check_print(const struct launch_config *c, const struct dist_grid *g,
                         const struct launch_slot *slots, const char *what)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!TU_EXPECT(f != NULL, "open_memstream")) return NULL;
    launch_place_print(f, c, g, slots);
    fclose(f);
    make_orders();
    double nb[DIST_NKIND];
    launch_traffic_estimate(nb, c, g);
    struct launch_crossing x;
    ref_crossing(&x, c, g, slots);
    char header[64];
    snprintf(header, sizeof header, "order %s", g->order);
    TU_EXPECT(strstr(text, header) != NULL, "%s: expected the report to name \"%s\":\n%s", what,
              header, text);
    bool any_warned = false;
    /* the line starts "warning:" when auto would pick another order, "note:" otherwise */
    const char *warning = strstr(text, "warning:");
    if (!warning) warning = strstr(text, "note:");
    char line[2048] = "";
    if (warning) {
        size_t const n = strcspn(warning, "\n");
        snprintf(line, sizeof line, "%.*s", (int)n, warning);
        TU_EXPECT(warning == text || warning[-1] == '\n', "%s: \"warning:\" inside a line", what);
        TU_EXPECT(strstr(warning + n, "warning:") == NULL, "%s: expected one warning line:\n%s",
                  what, text);
    }
    for (size_t i = 0; i < NREPORT; i++) {
        enum dist_kind const k = report_kinds[i];
        const char *name = dist_kind_name(k);
        struct launch_locality want;
        ref_locality(&want, g, slots, k);
        /* the row: name, size, groups, level, groups across nodes and packages, MiB */
        bool found = false;
        for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
            int size, groups, cn, cpk;
            char level[16];
            double mib, mib_nodes;
            if (strncmp(p, "  ", 2) != 0 || strncmp(p + 2, name, strlen(name)) != 0 ||
                sscanf(p + 2 + strlen(name), " %d %d %15s %d %d %lf %lf", &size, &groups, level,
                       &cn, &cpk, &mib, &mib_nodes) != 7)
                continue;
            found = true;
            double const want_mib = nb[k] / 1048576.0;
            double const want_nodes = x.kind_node_nbytes[k] / 1048576.0;
            TU_EXPECT(size == want.size && groups == want.groups &&
                          strcmp(level, launch_level_name(want.level)) == 0 &&
                          cn == want.cross_node && cpk == want.cross_package &&
                          fabs(mib - want_mib) <= 6e-4 + 1e-9 * want_mib &&
                          fabs(mib_nodes - want_nodes) <= 6e-4 + 1e-9 * want_nodes,
                      "%s: row %s: expected %d %d %s %d %d %.3f %.3f, got %d %d %s %d %d %.3f %.3f",
                      what, name, want.size, want.groups, launch_level_name(want.level),
                      want.cross_node, want.cross_package, want_mib, want_nodes, size, groups,
                      level, cn, cpk, mib, mib_nodes);
            break;
        }
        TU_EXPECT(found, "%s: expected a row for %s:\n%s", what, name, text);
        bool const warn = want.size > 1 && want.cross_node > 0 &&
                          some_order_keeps(c, g->world, slots, k);
        char a[64], b[64];
        snprintf(a, sizeof a, ": %s (", name);
        snprintf(b, sizeof b, ", %s (", name);
        bool const named = strstr(line, a) != NULL || strstr(line, b) != NULL;
        TU_EXPECT(named == warn, "%s: %s (%d of %d groups across nodes, %s order keeps them "
                  "inside): expected the warning %s it; warning: \"%s\"", what, name,
                  want.cross_node, want.groups, warn ? "another" : "no other",
                  warn ? "to name" : "not to name", line);
        any_warned |= warn;
    }
    TU_EXPECT(any_warned == (warning != NULL), "%s: expected %s warning line:\n%s", what,
              any_warned ? "a" : "no", text);
    if (warning) {
        static struct launch_order_estimate est[LAUNCH_ORDERS_MAX];
        int const n = launch_place_orders(est, c, g->world, slots);
        TU_EXPECT(n > 0 && strstr(line, est[0].order) != NULL, "%s: expected the warning to "
                  "name auto's order %s: \"%s\"", what, n > 0 ? est[0].order : "-", line);
        /* "warning:" exactly when auto's order moves fewer bytes across nodes (then
         * packages) than this one, "note:" when this one moves as few */
        struct launch_crossing here;
        launch_place_crossing(&here, c, g, slots);
        double const tol = 1e-9 * (here.package_nbytes + est[0].crossing.package_nbytes + 1.0);
        bool const worse = n > 0 && (est[0].crossing.node_nbytes < here.node_nbytes - tol ||
                                     (fabs(est[0].crossing.node_nbytes - here.node_nbytes) <= tol &&
                                      est[0].crossing.package_nbytes < here.package_nbytes - tol));
        TU_EXPECT(strncmp(line, worse ? "warning:" : "note:", worse ? 8 : 5) == 0,
                  "%s: expected the line to start with %s (auto's order %s moves %s bytes): "
                  "\"%s\"", what, worse ? "warning:" : "note:", n > 0 ? est[0].order : "-",
                  worse ? "fewer" : "no fewer", line);
        /* a suggestion to change order names one whose grids differ from these */
        const char *pick = strstr(line, "would pick ");
        char order[16] = "";
        struct dist_grid alt;
        if (pick && sscanf(pick + strlen("would pick "), "%15[a-z-]", order) == 1 &&
            TU_EXPECT(grid_quiet(&alt, c, g->world, order), "%s: the warning suggests %s, "
                      "which is no valid order", what, order)) {
            static int key[NAXES * MAX_RANKS], alt_key[NAXES * MAX_RANKS];
            grid_key(g, key);
            grid_key(&alt, alt_key);
            TU_EXPECT(memcmp(key, alt_key, sizeof key) != 0, "%s: the warning suggests order %s, "
                      "whose grids are those of %s: \"%s\"", what, order, g->order, line);
        }
    }
    return text;
}

/* tp 2 pp 4 on 4 nodes of 2: pp cannot stay inside a node under any order, so the default
 * order, which keeps tp inside, draws no warning; pp-tp-cp-ep-dp sends every tp group
 * across nodes and is warned about tp, not pp. */
static void test_print_warning(void)
{
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS];
    struct launch_config c;
    small_config(&c);
    set_layout(&c, 2, 1, 1, 0, 4);
    if (!load(&m, TOPO_2X2X8) || !emulate(slots, &m, 8, 2, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    struct dist_grid g;
    if (grid_of(&g, &c, 8, NULL)) {
        char *text = check_print(&c, &g, slots, "tp 2 pp 4 on 4 x 2, default order");
        TU_EXPECT(text && !strstr(text, "warning:"), "default order: expected no warning:\n%s",
                  text ? text : "");
        free(text);
    }
    if (grid_of(&g, &c, 8, "pp-tp-cp-ep-dp")) {
        char *text = check_print(&c, &g, slots, "tp 2 pp 4 on 4 x 2, pp-tp-cp-ep-dp");
        TU_EXPECT(text && strstr(text, "warning: tp (4 of 4 groups)"), "pp-tp-cp-ep-dp: expected "
                  "a warning beginning with tp (4 of 4 groups):\n%s", text ? text : "");
        free(text);
    }
    /* tp 2 pp 2 on 2 nodes of 2: whichever of tp and pp is slower crosses */
    set_layout(&c, 2, 1, 1, 0, 2);
    if (emulate(slots, &m, 4, 2, 1, LAUNCH_DIST_BLOCK)) {
        static const char *const orders[] = {NULL, "pp-tp-cp-ep-dp"};
        for (int o = 0; o < 2; o++)
            if (grid_of(&g, &c, 4, orders[o])) {
                char what[96];
                snprintf(what, sizeof what, "tp 2 pp 2 on 2 x 2, %s", g.order);
                free(check_print(&c, &g, slots, what));
            }
    }
    /* dp 4 on 2 nodes of 2: the one dp x cp group (and edp group) crosses under every
     * order, so no order is suggested */
    set_layout(&c, 1, 1, 1, 0, 1);
    if (emulate(slots, &m, 4, 2, 1, LAUNCH_DIST_BLOCK) && grid_of(&g, &c, 4, NULL)) {
        char *text = check_print(&c, &g, slots, "dp 4 on 2 x 2");
        TU_EXPECT(text && !strstr(text, "warning:"), "dp 4 on 2 x 2: expected no warning:\n%s",
                  text ? text : "");
        free(text);
    }
    set_layout(&c, 2, 1, 1, 0, 2);
    /* one node: nothing crosses */
    if (emulate(slots, &m, 8, 0, 4, LAUNCH_DIST_BLOCK) && grid_of(&g, &c, 8, "pp-tp-cp-ep-dp")) {
        char *text = check_print(&c, &g, slots, "tp 2 pp 2 on one node");
        TU_EXPECT(text && !strstr(text, "warning:"), "one node: expected no warning:\n%s",
                  text ? text : "");
        free(text);
    }
    launch_machine_free(&m);
}

static void test_print_mixtral(void)
{
    static struct launch_order_estimate est[LAUNCH_ORDERS_MAX];
    struct launch_machine m;
    struct launch_slot slots[MAX_RANKS];
    struct launch_config c;
    mixtral_config(&c);
    if (!load(&m, TOPO_L3_32) || !emulate(slots, &m, 128, 32, 1, LAUNCH_DIST_BLOCK)) {
        launch_machine_free(&m);
        return;
    }
    struct dist_grid g;
    if (grid_of(&g, &c, 128, NULL)) free(check_print(&c, &g, slots, "Mixtral, default order"));
    int const n = launch_place_orders(est, &c, 128, slots);
    if (TU_EXPECT(n > 0, "Mixtral: expected orders, got %d", n) &&
        grid_of(&g, &c, 128, est[0].order))
        free(check_print(&c, &g, slots, "Mixtral, auto's order"));
    if (grid_of(&g, &c, 128, "pp-dp-ep-cp-tp"))
        free(check_print(&c, &g, slots, "Mixtral, pp-dp-ep-cp-tp"));
    launch_machine_free(&m);
}

int main(void)
{
    static const struct tu_test tests[] = {
        {"level names", test_level_names},
        {"machine: synthetic 2 x 2 x 8 and one package", test_machine_synthetic},
        {"machine: L3 caches", test_machine_l3},
        {"machine: XML files, interleaved OS indexes and SMT", test_machine_xml},
        {"machine: this host loads (smoke)", test_machine_host},
        {"machine: bad topologies are refused naming them", test_machine_bad},
        {"slot: ids and core text", test_slot_make},
        {"slot: long core lists", test_slot_cores_text},
        {"levels: L3 and NUMA that do not nest", test_levels_unnested},
        {"share: NUMA blocks, fallback, oversubscription", test_share_numa},
        {"share: hand-built machines", test_share_hand_machines},
        {"share: every size on every machine", test_share_sweep},
        {"emulate: one node", test_emulate_single},
        {"emulate: 4 nodes x 32", test_emulate_cluster},
        {"emulate: an uneven last node", test_emulate_uneven},
        {"emulate: cyclic", test_emulate_cyclic},
        {"emulate: several cores a rank", test_emulate_cores_per_rank},
        {"emulate: refusals", test_emulate_refusals},
        {"locality and crossing: every order against the references", test_locality_reference},
        {"locality: Mixtral on 4 x 32", test_locality_mixtral},
        {"traffic: hand-computed", test_traffic_hand},
        {"traffic: none on groups of one", test_traffic_zero},
        {"traffic: batch and top-k scaling", test_traffic_scaling},
        {"traffic: patterns", test_traffic_pattern},
        {"crossing: spread", test_crossing_spread},
        {"crossing: cp ring", test_crossing_ring},
        {"crossing: pp chain and cycle", test_crossing_chain},
        {"crossing: pp x dp under two orders", test_crossing_orders},
        {"orders: ties", test_orders_ties},
        {"orders: Mixtral on 4 x 32", test_orders_mixtral},
        {"orders: auto beats the default", test_orders_beat_default},
        {"orders: parallel.order = auto resolved", test_orders_resolve},
        {"orders: no valid order", test_orders_invalid},
        {"report: warnings", test_print_warning},
        {"report: Mixtral", test_print_mixtral},
    };
    static const struct tu_suite suite = {
        .name = "placement",
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_TIMED,
        .program = "test_place",
    };
    return tu_cunit_main(&suite);
}
