/* The pure rank grids of dist/grid.c (no MPI): the worked examples of
 * shared/docs/parallelism.md exactly, then every layout of up to 64 ranks against an
 * independent reference (plain mixed-radix decoding of the order string), then the
 * refusals and their messages. */
#include <CUnit/Basic.h>
#include <CUnit/CUnit.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/dist.h"
#include "tests/testutil.h"

enum { MAX_WORLD = 64 };

/* ---------------------------------------------------------------- reference */

/* A grid decoded independently of grid.c: the order's names, filtered per grid, each with
 * its size in that grid, and every rank's coordinates decoded digit by digit. Names are
 * the order's tokens; in the MoE grid "tp" stands for etp and "dp" for edp. */
enum { N_TP, N_CP, N_EP, N_DP, N_PP, N_COUNT };
static const char *const ref_names[N_COUNT] = {"tp", "cp", "ep", "dp", "pp"};

struct ref_grid {
    int world;
    int n[2];       /* names per grid (4) */
    int name[2][4]; /* N_*, fastest first */
    int size[2][N_COUNT];
    int coord[2][MAX_WORLD][N_COUNT];
};

/* Size of name n in grid w, or -1 when the grid lacks it. */
static int ref_size_of(int w, int n, const struct dist_grid_dims *d)
{
    static const int attn[N_COUNT] = {1, 1, -1, 1, 1}, moe[N_COUNT] = {1, -1, 1, 1, 1};
    if ((w == DIST_GRID_ATTN ? attn : moe)[n] < 0) return -1;
    switch (n) {
    case N_TP: return w == DIST_GRID_ATTN ? d->tp : d->etp;
    case N_CP: return d->cp;
    case N_EP: return d->ep;
    case N_DP: return w == DIST_GRID_ATTN ? d->dp : d->edp;
    default: return d->pp;
    }
}

static void ref_build(struct ref_grid *r, int world, const struct dist_grid_dims *d,
                      const char *order)
{
    char buf[64];
    snprintf(buf, sizeof buf, "%s", order);
    memset(r, 0, sizeof *r);
    r->world = world;
    char *save = NULL;
    for (char *tok = strtok_r(buf, "-", &save); tok; tok = strtok_r(NULL, "-", &save))
        for (int n = 0; n < N_COUNT; n++)
            for (int w = 0; w < 2; w++)
                if (!strcmp(tok, ref_names[n]) && ref_size_of(w, n, d) > 0) {
                    r->name[w][r->n[w]++] = n;
                    r->size[w][n] = ref_size_of(w, n, d);
                }
    for (int w = 0; w < 2; w++)
        for (int rank = 0; rank < world; rank++)
            for (int i = 0, rest = rank; i < r->n[w]; i++) {
                int const n = r->name[w][i];
                r->coord[w][rank][n] = rest % r->size[w][n];
                rest /= r->size[w][n];
            }
}

/* Ranks a and b lie in the same group spanned by `names` (a mask of N_* bits) in grid w:
 * they agree on every other name. */
static bool ref_same_group(const struct ref_grid *r, int w, int a, int b, unsigned names)
{
    for (int i = 0; i < r->n[w]; i++) {
        int const n = r->name[w][i];
        if (!(names >> n & 1u) && r->coord[w][a][n] != r->coord[w][b][n]) return false;
    }
    return true;
}

/* Index of `rank` in its group: mixed radix over the group's names in the grid's order. */
static int ref_index(const struct ref_grid *r, int w, int rank, unsigned names)
{
    int index = 0, scale = 1;
    for (int i = 0; i < r->n[w]; i++) {
        int const n = r->name[w][i];
        if (names >> n & 1u) {
            index += r->coord[w][rank][n] * scale;
            scale *= r->size[w][n];
        }
    }
    return index;
}

#define BIT(n) (1u << (n))
/* Each group kind: its grid and the names it spans (in the MoE grid N_TP is etp and N_DP
 * is edp). */
struct kind_def {
    enum dist_kind kind;
    const char *label;
    int which;
    unsigned names;
};

static const struct kind_def kinds[] = {
    {DIST_TP, "TP", DIST_GRID_ATTN, BIT(N_TP)},
    {DIST_CP, "CP", DIST_GRID_ATTN, BIT(N_CP)},
    {DIST_DP, "DP", DIST_GRID_ATTN, BIT(N_DP)},
    {DIST_DPCP, "DPCP", DIST_GRID_ATTN, BIT(N_DP) | BIT(N_CP)},
    {DIST_TPCP, "TPCP", DIST_GRID_ATTN, BIT(N_TP) | BIT(N_CP)},
    {DIST_PP, "PP", DIST_GRID_ATTN, BIT(N_PP)},
    {DIST_EP, "EP", DIST_GRID_MOE, BIT(N_EP)},
    {DIST_ETP, "ETP", DIST_GRID_MOE, BIT(N_TP)},
    {DIST_EDP, "EDP", DIST_GRID_MOE, BIT(N_DP)},
    {DIST_ETPEP, "ETPEP", DIST_GRID_MOE, BIT(N_TP) | BIT(N_EP)},
    {DIST_WORLD, "WORLD", DIST_GRID_ATTN, BIT(N_TP) | BIT(N_CP) | BIT(N_DP) | BIT(N_PP)},
};
enum { NKINDS = sizeof kinds / sizeof kinds[0] };

/* ---------------------------------------------------------------- checks */

static void problem(const struct dist_grid *g, const char *what, int rank, const char *kind)
{
    tu_problem("world %d tp %d cp %d dp %d pp %d etp %d ep %d edp %d order %s: %s "
               "(rank %d, group %s)",
               g->world, g->dims.tp, g->dims.cp, g->dims.dp, g->dims.pp, g->dims.etp,
               g->dims.ep, g->dims.edp, g->order, what, rank, kind);
}

static int cmp_int(const void *a, const void *b)
{
    int const x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Every property of grid g against the reference: coordinates and their inverse, and for
 * every group kind the members, size, index, split arguments and the partition of the
 * world; the PP groups also against the MoE grid's. Records problems. */
static void check_grid(const struct dist_grid *g)
{
    struct ref_grid ref;
    ref_build(&ref, g->world, &g->dims, g->order);
    int const world = g->world;
    if (g->dims.tp * g->dims.cp * g->dims.dp * g->dims.pp != world ||
        g->dims.etp * g->dims.ep * g->dims.edp * g->dims.pp != world)
        problem(g, "dims do not multiply to the world", 0, "-");

    for (int r = 0; r < world; r++) {
        struct dist_grid_coords c;
        dist_grid_coords(g, r, &c);
        const int *const ra = ref.coord[DIST_GRID_ATTN][r];
        const int *const rm = ref.coord[DIST_GRID_MOE][r];
        int const want[7] = {ra[N_TP], ra[N_CP], ra[N_DP], ra[N_PP],
                             rm[N_TP], rm[N_EP], rm[N_DP]};
        int const got[7] = {c.tp, c.cp, c.dp, c.pp, c.etp, c.ep, c.edp};
        if (memcmp(want, got, sizeof want)) problem(g, "coordinates", r, "-");
        if (rm[N_PP] != c.pp)
            problem(g, "pipeline stage differs between the grids", r, "-");
        if (dist_grid_rank_of(g, DIST_GRID_ATTN, &c) != r)
            problem(g, "attention rank_of is not the inverse of coords", r, "-");
        if (dist_grid_rank_of(g, DIST_GRID_MOE, &c) != r)
            problem(g, "MoE rank_of is not the inverse of coords", r, "-");
    }

    for (int k = 0; k < NKINDS; k++) {
        const struct kind_def *kd = &kinds[k];
        int want_size = 1;
        for (int n = 0; n < N_COUNT; n++)
            if (kd->names >> n & 1u) want_size *= ref_size_of(kd->which, n, &g->dims);
        if (dist_grid_group_size(g, kd->kind) != want_size)
            problem(g, "group size", 0, kd->label);
        int hits[MAX_WORLD] = {0}, colors[MAX_WORLD], keys[MAX_WORLD];
        for (int r = 0; r < world; r++)
            dist_grid_split_args(g, kd->kind, r, &colors[r], &keys[r]);
        for (int r = 0; r < world; r++) {
            int members[MAX_WORLD], count = -1, index = -1;
            int const color = colors[r], key = keys[r];
            dist_grid_group(g, kd->kind, r, members, &count, &index);
            if (count != want_size) {
                problem(g, "member count", r, kd->label);
                continue;
            }
            if (index < 0 || index >= count || members[index] != r)
                problem(g, "rank is not at its index among the members", r, kd->label);
            if (index != ref_index(&ref, kd->which, r, kd->names))
                problem(g, "index is not the rank's (mixed-radix) coordinate", r,
                        kd->label);
            if (key != index) problem(g, "split key is not the index", r, kd->label);
            if (color < 0) problem(g, "negative split color", r, kd->label);
            for (int i = 0; i < count; i++) {
                int const m = members[i];
                if (m < 0 || m >= world || (i > 0 && m <= members[i - 1])) {
                    problem(g, "members not ascending ranks of the world", r, kd->label);
                    break;
                }
                if (!ref_same_group(&ref, kd->which, r, m, kd->names))
                    problem(g, "member outside the reference group", r, kd->label);
                if (kd->kind == DIST_PP &&
                    !ref_same_group(&ref, DIST_GRID_MOE, r, m, BIT(N_PP)))
                    problem(g, "PP group differs from the MoE grid's", r, kd->label);
                if (colors[m] != color)
                    problem(g, "split color differs in a group", r, kd->label);
                if (index == 0) hits[m]++;
            }
        }
        for (int r = 0; r < world; r++)
            if (hits[r] != 1) problem(g, "groups do not partition the world", r, kd->label);
        qsort(colors, (size_t)world, sizeof colors[0], cmp_int);
        int distinct = world > 0;
        for (int r = 1; r < world; r++) distinct += colors[r] != colors[r - 1];
        if (distinct != world / want_size)
            problem(g, "split colors do not tell the groups apart", 0, kd->label);
    }
}

/* Asserts that the groups of `kind` are exactly `expected` (ngroups groups of gsize
 * ranks, each in index order), with one split color per group. */
static void check_groups(const struct dist_grid *g, enum dist_kind kind, const char *label,
                         const int *expected, int ngroups, int gsize)
{
    tu_problems_reset();
    if (ngroups * gsize != g->world)
        problem(g, "expected table does not cover the world", 0, label);
    if (dist_grid_group_size(g, kind) != gsize) problem(g, "group size", 0, label);
    int colors[MAX_WORLD];
    for (int grp = 0; grp < ngroups; grp++)
        for (int i = 0; i < gsize; i++) {
            int const r = expected[grp * gsize + i];
            int members[MAX_WORLD], count = -1, index = -1, key = -1;
            dist_grid_group(g, kind, r, members, &count, &index);
            dist_grid_split_args(g, kind, r, &colors[grp * gsize + i], &key);
            if (count != gsize ||
                memcmp(members, &expected[grp * gsize], sizeof(int) * (size_t)gsize))
                problem(g, "members differ from the table", r, label);
            if (index != i || key != i)
                problem(g, "index differs from the table", r, label);
            if (colors[grp * gsize + i] != colors[grp * gsize])
                problem(g, "split color differs in a group", r, label);
            for (int other = 0; other < grp; other++)
                if (colors[other * gsize] == colors[grp * gsize])
                    problem(g, "two groups share a split color", r, label);
        }
    TU_EXPECT_NO_PROBLEMS();
}

/* ---------------------------------------------------------------- worked examples */

static void test_example_16(void)
{
    struct dist_grid g;
    CU_ASSERT_EQUAL_FATAL(dist_grid_init(&g, 16, 2, 2, 4, 1, 2, NULL), 0);
    CU_ASSERT_STRING_EQUAL(g.order, "tp-cp-ep-dp-pp");
    CU_ASSERT(g.dims.dp == 2 && g.dims.edp == 2);

    static const int tp[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    static const int cp[] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
    static const int dp[] = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15};
    static const int dpcp[] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};
    static const int pp[] = {0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15};
    static const int ep[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    check_groups(&g, DIST_TP, "TP", tp, 8, 2);
    check_groups(&g, DIST_CP, "CP", cp, 8, 2);
    check_groups(&g, DIST_DP, "DP", dp, 8, 2);
    check_groups(&g, DIST_DPCP, "DPCP", dpcp, 4, 4);
    check_groups(&g, DIST_PP, "PP", pp, 8, 2);
    check_groups(&g, DIST_EP, "EP", ep, 4, 4);
    /* EP folded onto attention TP x CP: the same groups. */
    check_groups(&g, DIST_TPCP, "TPCP", ep, 4, 4);
    check_groups(&g, DIST_ETP, "ETP", tp, 16, 1);
    check_groups(&g, DIST_EDP, "EDP", dp, 8, 2);
    check_groups(&g, DIST_ETPEP, "ETPEP", ep, 4, 4);

    struct dist_grid_coords c;
    dist_grid_coords(&g, 5, &c);
    CU_ASSERT(c.tp == 1 && c.cp == 0 && c.dp == 1 && c.pp == 0);
    CU_ASSERT(c.etp == 0 && c.ep == 1 && c.edp == 1);
    CU_ASSERT_EQUAL(dist_grid_rank_of(&g, DIST_GRID_ATTN, &c), 5);
    CU_ASSERT_EQUAL(dist_grid_rank_of(&g, DIST_GRID_MOE, &c), 5);
    c = (struct dist_grid_coords){.tp = 1, .cp = 1, .dp = 0, .pp = 1};
    CU_ASSERT_EQUAL(dist_grid_rank_of(&g, DIST_GRID_ATTN, &c),
                    1 + 2 * (1 + 2 * (0 + 2 * 1)));
    c = (struct dist_grid_coords){.etp = 0, .ep = 3, .edp = 1, .pp = 1};
    CU_ASSERT_EQUAL(dist_grid_rank_of(&g, DIST_GRID_MOE, &c), 3 + 4 * (1 + 2 * 1));
}

static void test_example_8(void)
{
    static const int etp[] = {0, 1, 2, 3, 4, 5, 6, 7};
    static const int ep[] = {0, 2, 1, 3, 4, 6, 5, 7};
    static const int edp[] = {0, 4, 1, 5, 2, 6, 3, 7};
    static const int etpep[] = {0, 1, 2, 3, 4, 5, 6, 7};
    /* The MoE grid does not depend on how the attention grid is cut. */
    static const int attn[][2] = {{1, 1}, {2, 2}, {8, 1}, {1, 4}};
    for (size_t i = 0; i < sizeof attn / sizeof attn[0]; i++) {
        struct dist_grid g;
        CU_ASSERT_EQUAL_FATAL(dist_grid_init(&g, 8, attn[i][0], attn[i][1], 2, 2, 1, NULL),
                              0);
        CU_ASSERT_EQUAL(g.dims.edp, 2);
        check_groups(&g, DIST_ETP, "ETP", etp, 4, 2);
        check_groups(&g, DIST_EP, "EP", ep, 4, 2);
        check_groups(&g, DIST_EDP, "EDP", edp, 4, 2);
        check_groups(&g, DIST_ETPEP, "ETPEP", etpep, 2, 4);
        struct dist_grid_coords c;
        dist_grid_coords(&g, 5, &c);
        CU_ASSERT(c.etp == 1 && c.ep == 0 && c.edp == 1 && c.pp == 0);
    }
}

/* ---------------------------------------------------------------- every layout */

/* Calls fn for every (tp, cp, pp, ep, etp) whose products divide world. */
static long for_each_layout(int world, void (*fn)(int, int, int, int, int, int, void *),
                            void *arg)
{
    long n = 0;
    for (int tp = 1; tp <= world; tp++) {
        if (world % tp) continue;
        for (int cp = 1; cp <= world / tp; cp++) {
            if ((world / tp) % cp) continue;
            for (int pp = 1; pp <= world / (tp * cp); pp++) {
                if ((world / (tp * cp)) % pp) continue;
                for (int ep = 1; ep <= world / pp; ep++) {
                    if ((world / pp) % ep) continue;
                    for (int etp = 1; etp <= world / (pp * ep); etp++) {
                        if ((world / (pp * ep)) % etp) continue;
                        fn(world, tp, cp, pp, ep, etp, arg);
                        n++;
                    }
                }
            }
        }
    }
    return n;
}

static void layout_default(int world, int tp, int cp, int pp, int ep, int etp, void *arg)
{
    (void)arg;
    struct dist_grid g;
    if (dist_grid_init(&g, world, tp, cp, ep, etp, pp, NULL) != 0) {
        struct dist_grid blank = {.world = world};
        problem(&blank, vd_err_msg(), -1, "init");
        return;
    }
    check_grid(&g);
}

static void test_all_layouts(void)
{
    tu_problems_reset();
    long layouts = 0;
    for (int world = 1; world <= MAX_WORLD; world++)
        layouts += for_each_layout(world, layout_default, NULL);
    printf("\n  %ld layouts of 1..%d ranks checked ", layouts, MAX_WORLD);
    CU_ASSERT(layouts > 10000);
    TU_EXPECT_NO_PROBLEMS();
}

/* Every order: init accepts exactly the orders under which the reference's PP groups of
 * both grids coincide, and the accepted grids pass every check. */
static char orders[120][16];
static int norders;

static void make_orders(void)
{
    static const char *const names[5] = {"tp", "cp", "ep", "dp", "pp"};
    norders = 0;
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 5; b++)
            for (int c = 0; c < 5; c++)
                for (int d = 0; d < 5; d++)
                    for (int e = 0; e < 5; e++) {
                        int const mask = 1 << a | 1 << b | 1 << c | 1 << d | 1 << e;
                        if (mask != 31) continue;
                        snprintf(orders[norders++], 16, "%s-%s-%s-%s-%s", names[a],
                                 names[b], names[c], names[d], names[e]);
                    }
}

struct order_stats {
    long accepted, refused;
};

static void layout_orders(int world, int tp, int cp, int pp, int ep, int etp, void *arg)
{
    struct order_stats *st = arg;
    struct dist_grid_dims const d = {
        .tp = tp, .cp = cp, .dp = world / (tp * cp * pp), .pp = pp,
        .etp = etp, .ep = ep, .edp = world / (etp * ep * pp),
    };
    for (int o = 0; o < norders; o++) {
        struct ref_grid ref;
        ref_build(&ref, world, &d, orders[o]);
        bool same = true;
        for (int a = 0; a < world && same; a++)
            for (int b = 0; b < world && same; b++)
                same = ref_same_group(&ref, DIST_GRID_ATTN, a, b, BIT(N_PP)) ==
                       ref_same_group(&ref, DIST_GRID_MOE, a, b, BIT(N_PP));
        struct dist_grid g;
        int const rc = dist_grid_init(&g, world, tp, cp, ep, etp, pp, orders[o]);
        struct dist_grid blank = {.world = world, .dims = d};
        snprintf(blank.order, sizeof blank.order, "%s", orders[o]);
        if (rc == 0) {
            st->accepted++;
            if (!same) problem(&blank, "accepted with differing PP groups", -1, "init");
            if (strcmp(g.order, orders[o])) problem(&blank, "order not kept", -1, "init");
            check_grid(&g);
        } else {
            st->refused++;
            if (same) problem(&blank, vd_err_msg(), -1, "refused");
            if (rc != VD_EINVAL || !strstr(vd_err_msg(), "pipeline") ||
                !strstr(vd_err_msg(), orders[o]))
                problem(&blank, "refusal without a pipeline message naming the order", -1,
                        "init");
        }
    }
}

static void test_all_orders(void)
{
    make_orders();
    CU_ASSERT_EQUAL_FATAL(norders, 120);
    tu_problems_reset();
    struct order_stats st = {0, 0};
    static const int worlds[] = {1, 2, 4, 6, 8, 12, 16};
    for (size_t i = 0; i < sizeof worlds / sizeof worlds[0]; i++)
        for_each_layout(worlds[i], layout_orders, &st);
    printf("\n  %ld grids accepted, %ld refused over 120 orders ", st.accepted, st.refused);
    CU_ASSERT(st.accepted > 0 && st.refused > 0);
    TU_EXPECT_NO_PROBLEMS();
}

/* ---------------------------------------------------------------- refusals */

/* Asserts init refuses with VD_EINVAL, leaves *g alone, and the message holds every
 * string of `want` (NULL-terminated). */
static void expect_refusal(int world, int tp, int cp, int ep, int etp, int pp,
                           const char *order, const char *const *want)
{
    struct dist_grid g, before;
    memset(&g, 0x5a, sizeof g);
    before = g;
    vd_err_clear();
    int const rc = dist_grid_init(&g, world, tp, cp, ep, etp, pp, order);
    CU_ASSERT_EQUAL(rc, VD_EINVAL);
    CU_ASSERT(memcmp(&g, &before, sizeof g) == 0);
    for (const char *const *w = want; *w; w++) {
        bool const found = strstr(vd_err_msg(), *w) != NULL;
        if (!found) fprintf(stderr, "\n  \"%s\" not in: %s\n", *w, vd_err_msg());
        CU_ASSERT(found);
    }
}

static void test_refusals(void)
{
    expect_refusal(6, 2, 2, 1, 1, 1, NULL,
                   (const char *const[]){"world size 6 is not divisible by tp*cp*pp = 4 "
                                         "(tp 2, cp 2, pp 1)",
                                         NULL});
    expect_refusal(
        8, 2, 1, 3, 1, 1, NULL,
        (const char *const[]){"world size 8", "etp*ep*pp = 3", "etp 1, ep 3, pp 1", NULL});
    expect_refusal(
        12, 1, 1, 2, 2, 2, NULL,
        (const char *const[]){"world size 12", "etp*ep*pp = 8", "etp 2, ep 2, pp 2", NULL});
    expect_refusal(12, 1, 1, 1, 1, 8, NULL,
                   (const char *const[]){"world size 12", "tp*cp*pp = 8", "pp 8", NULL});
    expect_refusal(0, 1, 1, 1, 1, 1, NULL, (const char *const[]){"world size 0", NULL});
    expect_refusal(4, 0, 1, 1, 1, 1, NULL, (const char *const[]){"tp size 0", NULL});
    expect_refusal(4, 1, -2, 1, 1, 1, NULL, (const char *const[]){"cp size -2", NULL});
    expect_refusal(4, 1, 1, 0, 1, 1, NULL, (const char *const[]){"ep size 0", NULL});
    expect_refusal(4, 1, 1, 1, 0, 1, NULL, (const char *const[]){"etp size 0", NULL});
    expect_refusal(4, 1, 1, 1, 1, 0, NULL, (const char *const[]){"pp size 0", NULL});
    /* Products beyond int still get a message, not an overflow. */
    expect_refusal(
        8, 1 << 30, 1 << 30, 1, 1, 1 << 30, NULL,
        (const char *const[]){"world size 8 is not divisible by tp*cp*pp", NULL});

    static const char *const bad_orders[] = {
        "tp-cp-dp-pp", "tp-cp-ep-dp-pp-tp", "tp-tp-ep-dp-pp", "tp-cp-ep-dp-pp-",
        "tp,cp,ep,dp,pp", "", "TP-CP-EP-DP-PP", "tp-cp-ep-dp-ppx", "tpx-cp-ep-dp-pp",
    };
    for (size_t i = 0; i < sizeof bad_orders / sizeof bad_orders[0]; i++) {
        char quoted[64];
        snprintf(quoted, sizeof quoted, "\"%s\"", bad_orders[i]);
        expect_refusal(
            4, 1, 1, 1, 1, 1, bad_orders[i],
            (const char *const[]){quoted, "not a permutation of tp, cp, ep, dp, pp", NULL});
    }

    /* pp inside tp: attention stages are tp = 2 ranks apart, MoE stages etp = 1. */
    expect_refusal(
        8, 2, 1, 2, 1, 2, "tp-pp-cp-ep-dp",
        (const char *const[]){"\"tp-pp-cp-ep-dp\"", "pipeline", "tp = 2", "etp = 1", NULL});
    /* ...and accepted when tp = etp. */
    struct dist_grid g;
    CU_ASSERT_EQUAL(dist_grid_init(&g, 8, 2, 1, 2, 2, 2, "tp-pp-cp-ep-dp"), 0);
    /* pp fastest is the same in both grids. */
    CU_ASSERT_EQUAL(dist_grid_init(&g, 8, 2, 2, 4, 1, 2, "pp-tp-cp-ep-dp"), 0);
    struct dist_grid_coords c;
    dist_grid_coords(&g, 1, &c);
    CU_ASSERT(c.pp == 1 && c.tp == 0 && c.ep == 0);
}

/* Over small sizes, init accepts exactly the layouts whose products divide the world. */
static void test_accepts_exactly_divisible(void)
{
    long wrong = 0, accepted = 0;
    for (int world = 1; world <= 12; world++)
        for (int tp = 1; tp <= 4; tp++)
            for (int cp = 1; cp <= 4; cp++)
                for (int ep = 1; ep <= 4; ep++)
                    for (int etp = 1; etp <= 4; etp++)
                        for (int pp = 1; pp <= 4; pp++) {
                            struct dist_grid g;
                            bool const valid =
                                world % (tp * cp * pp) == 0 && world % (etp * ep * pp) == 0;
                            int const rc =
                                dist_grid_init(&g, world, tp, cp, ep, etp, pp, NULL);
                            wrong += (rc == 0) != valid;
                            accepted += rc == 0;
                        }
    CU_ASSERT_EQUAL(wrong, 0);
    CU_ASSERT(accepted > 0);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("grid", NULL, NULL);
    if (!s || !CU_add_test(s, "worked example, 16 ranks", test_example_16) ||
        !CU_add_test(s, "worked example, 8 ranks", test_example_8) ||
        !CU_add_test(s, "every layout of 1..64 ranks", test_all_layouts) ||
        !CU_add_test(s, "every order", test_all_orders) ||
        !CU_add_test(s, "refusals name the sizes", test_refusals) ||
        !CU_add_test(s, "accepts exactly divisible layouts",
                     test_accepts_exactly_divisible)) {
        CU_cleanup_registry();
        return 1;
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned const failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
