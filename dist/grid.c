/* The two rank grids of MoE parallel folding as pure arithmetic (no MPI calls): see the
 * grid block of dist.h and shared/docs/parallelism.md.
 *
 * Both grids are mixed-radix numberings of the same ranks. Each is stored as four axes
 * (size, stride), so a coordinate is (rank / stride) % size and a group is the set of
 * ranks that differ only along the group's axes. The order string is parsed once into
 * the strides; nothing else depends on it. Like Megatron-Core's RankGenerator, the
 * attention grid drops ep from the order (its ep is 1) and the MoE grid drops cp (its cp is
 * 1) and reads tp as etp and dp as edp. */
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "dist/dist.h"

/* The five names of the order string. */
enum { NAME_TP, NAME_CP, NAME_EP, NAME_DP, NAME_PP, NAME_COUNT };
static const char *const name_str[NAME_COUNT] = {"tp", "cp", "ep", "dp", "pp"};

/* Axes of each grid, the index into dist_grid.size / stride. */
enum { AX_TP = 0, AX_CP = 1, AX_DP = 2, AX_PP = 3 };    /* attention */
enum { AX_ETP = 0, AX_EP = 1, AX_EDP = 2, AX_MPP = 3 }; /* MoE */
enum { AX_COUNT = 4 };

/* Axis of each order name in each grid, -1 where the grid has no such axis. */
static const int name_axis[2][NAME_COUNT] = {
    [DIST_GRID_ATTN] = {AX_TP, AX_CP, -1, AX_DP, AX_PP},
    [DIST_GRID_MOE] = {AX_ETP, -1, AX_EP, AX_EDP, AX_MPP},
};
static const char *const axis_str[2][AX_COUNT] = {
    [DIST_GRID_ATTN] = {"tp", "cp", "dp", "pp"},
    [DIST_GRID_MOE] = {"etp", "ep", "edp", "pp"},
};

/* Parses "a-b-c-d-e" into seq (names, fastest first). Returns false unless it names each
 * of tp, cp, ep, dp, pp exactly once. */
static bool order_parse(const char *order, int seq[NAME_COUNT])
{
    bool seen[NAME_COUNT] = {false};
    const char *p = order;
    for (int i = 0; i < NAME_COUNT; i++) {
        int found = -1;
        for (int n = 0; n < NAME_COUNT; n++)
            if (strncmp(p, name_str[n], 2) == 0) found = n;
        if (found < 0 || seen[found]) return false;
        seen[found] = true;
        seq[i] = found;
        p += 2;
        char const sep = i + 1 < NAME_COUNT ? '-' : '\0';
        if (*p != sep) return false;
        p++;
    }
    return true;
}

/* a * b, saturating at LLONG_MAX (both >= 1): a saturated product exceeds any world, so
 * the divisibility check stays right for absurd sizes. */
static long long mul_sat(long long a, long long b)
{
    return a > LLONG_MAX / b ? LLONG_MAX : a * b;
}

/* Writes the pipeline stride of grid `which` as the product of the axes before pp in the
 * order, e.g. "tp*cp = 4", or "1" when pp comes first. */
static void stride_describe(char *buf, size_t nbytes, const struct dist_grid *g,
                            enum dist_grid_which which, const int seq[NAME_COUNT])
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < NAME_COUNT && seq[i] != NAME_PP && used < nbytes; i++) {
        int const a = name_axis[which][seq[i]];
        if (a >= 0)
            used += (size_t)snprintf(buf + used, nbytes - used, "%s%s", used ? "*" : "",
                                     axis_str[which][a]);
    }
    if (used < nbytes)
        snprintf(buf + used, nbytes - used, "%s%d", used ? " = " : "",
                 g->stride[which][AX_PP]);
}

int dist_grid_init(struct dist_grid *g, int world, int tp, int cp, int ep, int etp, int pp,
                   const char *order)
{
    if (!order) order = DIST_GRID_ORDER_DEFAULT;
    RETURN_IF(world < 1, VD_EINVAL, "world size %d is invalid: it must be at least 1",
              world);
    struct {
        const char *name;
        int size;
    } const given[] = {{"tp", tp}, {"cp", cp}, {"ep", ep}, {"etp", etp}, {"pp", pp}};
    for (size_t i = 0; i < sizeof given / sizeof given[0]; i++)
        RETURN_IF(given[i].size < 1, VD_EINVAL,
                  "%s size %d is invalid: parallel sizes must be at least 1", given[i].name,
                  given[i].size);

    int seq[NAME_COUNT];
    RETURN_IF(!order_parse(order, seq), VD_EINVAL,
              "parallel order \"%s\" is not a permutation of tp, cp, ep, dp, pp (names "
              "joined by '-', the first varying fastest, e.g. \"%s\")",
              order, DIST_GRID_ORDER_DEFAULT);

    long long const attn_fixed = mul_sat(mul_sat(tp, cp), pp);
    RETURN_IF(world % attn_fixed != 0, VD_EINVAL,
              "world size %d is not divisible by tp*cp*pp = %.0f (tp %d, cp %d, pp %d), so "
              "no attention grid tp x cp x dp x pp covers it",
              world, (double)tp * cp * pp, tp, cp, pp);
    long long const moe_fixed = mul_sat(mul_sat(etp, ep), pp);
    RETURN_IF(world % moe_fixed != 0, VD_EINVAL,
              "world size %d is not divisible by etp*ep*pp = %.0f (etp %d, ep %d, pp %d), so "
              "no MoE grid etp x ep x edp x pp covers it",
              world, (double)etp * ep * pp, etp, ep, pp);

    struct dist_grid out;
    memset(&out, 0, sizeof out);
    out.world = world;
    out.dims = (struct dist_grid_dims){
        .tp = tp, .cp = cp, .dp = (int)(world / attn_fixed), .pp = pp,
        .etp = etp, .ep = ep, .edp = (int)(world / moe_fixed),
    };
    snprintf(out.order, sizeof out.order, "%s-%s-%s-%s-%s", name_str[seq[0]],
             name_str[seq[1]], name_str[seq[2]], name_str[seq[3]], name_str[seq[4]]);
    int const sizes[2][AX_COUNT] = {
        [DIST_GRID_ATTN] = {tp, cp, out.dims.dp, pp},
        [DIST_GRID_MOE] = {etp, ep, out.dims.edp, pp},
    };
    for (int w = 0; w < 2; w++) {
        int stride = 1;
        for (int i = 0; i < NAME_COUNT; i++) {
            int const a = name_axis[w][seq[i]];
            if (a < 0) continue;
            out.size[w][a] = sizes[w][a];
            out.stride[w][a] = stride;
            stride *= sizes[w][a];
        }
    }

    /* With the same stride, the pipeline coordinate and the coordinates around it are the
     * same in both grids; with different strides (and pp > 1) rank 0's groups differ. */
    if (pp > 1 && out.stride[DIST_GRID_ATTN][AX_PP] != out.stride[DIST_GRID_MOE][AX_MPP]) {
        char attn_desc[64], moe_desc[64];
        stride_describe(attn_desc, sizeof attn_desc, &out, DIST_GRID_ATTN, seq);
        stride_describe(moe_desc, sizeof moe_desc, &out, DIST_GRID_MOE, seq);
        RETURN_ERR(VD_EINVAL,
                   "parallel order \"%s\" gives the attention and MoE grids different "
                   "pipeline groups (pp %d; consecutive stages %s ranks apart in the "
                   "attention grid, %s in the MoE grid): the names before pp must have "
                   "the same product in both grids; put pp last",
                   out.order, pp, attn_desc, moe_desc);
    }
    *g = out;
    return 0;
}

static void check_rank(const struct dist_grid *g, int rank)
{
    VD_CHECK(rank >= 0 && rank < g->world, "rank %d is outside the world of %d ranks", rank,
             g->world);
}

void dist_grid_coords(const struct dist_grid *g, int rank, struct dist_grid_coords *c)
{
    check_rank(g, rank);
    int v[2][AX_COUNT];
    for (int w = 0; w < 2; w++)
        for (int a = 0; a < AX_COUNT; a++)
            v[w][a] = rank / g->stride[w][a] % g->size[w][a];
    *c = (struct dist_grid_coords){
        .tp = v[DIST_GRID_ATTN][AX_TP], .cp = v[DIST_GRID_ATTN][AX_CP],
        .dp = v[DIST_GRID_ATTN][AX_DP], .pp = v[DIST_GRID_ATTN][AX_PP],
        .etp = v[DIST_GRID_MOE][AX_ETP], .ep = v[DIST_GRID_MOE][AX_EP],
        .edp = v[DIST_GRID_MOE][AX_EDP],
    };
    VD_CHECK(v[DIST_GRID_MOE][AX_MPP] == c->pp, "grid pipeline coordinates disagree");
}

int dist_grid_rank_of(const struct dist_grid *g, enum dist_grid_which which,
                      const struct dist_grid_coords *c)
{
    VD_CHECK(which == DIST_GRID_ATTN || which == DIST_GRID_MOE, "unknown grid %d",
             (int)which);
    int const v[2][AX_COUNT] = {
        [DIST_GRID_ATTN] = {c->tp, c->cp, c->dp, c->pp},
        [DIST_GRID_MOE] = {c->etp, c->ep, c->edp, c->pp},
    };
    int rank = 0;
    for (int a = 0; a < AX_COUNT; a++) {
        VD_CHECK(v[which][a] >= 0 && v[which][a] < g->size[which][a],
                 "%s coordinate %d is outside [0, %d)", axis_str[which][a], v[which][a],
                 g->size[which][a]);
        rank += v[which][a] * g->stride[which][a];
    }
    return rank;
}

/* The grid and axes of each group kind; DIST_NKIND marks kinds without a grid group. */
static const struct {
    int which, n, axes[AX_COUNT];
} kind_def[DIST_NKIND] = {
    [DIST_TP] = {DIST_GRID_ATTN, 1, {AX_TP}},
    [DIST_CP] = {DIST_GRID_ATTN, 1, {AX_CP}},
    [DIST_DP] = {DIST_GRID_ATTN, 1, {AX_DP}},
    [DIST_DPCP] = {DIST_GRID_ATTN, 2, {AX_DP, AX_CP}},
    [DIST_TPCP] = {DIST_GRID_ATTN, 2, {AX_TP, AX_CP}},
    [DIST_PP] = {DIST_GRID_ATTN, 1, {AX_PP}},
    [DIST_EP] = {DIST_GRID_MOE, 1, {AX_EP}},
    [DIST_ETP] = {DIST_GRID_MOE, 1, {AX_ETP}},
    [DIST_EDP] = {DIST_GRID_MOE, 1, {AX_EDP}},
    [DIST_ETPEP] = {DIST_GRID_MOE, 2, {AX_ETP, AX_EP}},
    [DIST_WORLD] = {DIST_GRID_ATTN, 4, {AX_TP, AX_CP, AX_DP, AX_PP}},
};

/* The grid and axes of a group kind, the axes by ascending stride (the order's fastest
 * first), so that the mixed radix over them is ascending rank. Returns the axis count. */
static int kind_axes(const struct dist_grid *g, enum dist_kind kind,
                     enum dist_grid_which *which, int axes[AX_COUNT])
{
    VD_CHECK((int)kind >= 0 && kind < DIST_NKIND && kind_def[kind].n > 0,
             "group kind %d has no grid group", (int)kind);
    int const n = kind_def[kind].n;
    *which = kind_def[kind].which;
    const int *const stride = g->stride[*which];
    /* Insertion sort; ties (size-one axes) may land either way: they add no digit. */
    for (int i = 0; i < n; i++) {
        int j = i;
        for (; j > 0 && stride[axes[j - 1]] > stride[kind_def[kind].axes[i]]; j--)
            axes[j] = axes[j - 1];
        axes[j] = kind_def[kind].axes[i];
    }
    return n;
}

int dist_grid_group_size(const struct dist_grid *g, enum dist_kind kind)
{
    enum dist_grid_which which;
    int axes[AX_COUNT];
    int const n = kind_axes(g, kind, &which, axes);
    int size = 1;
    for (int i = 0; i < n; i++) size *= g->size[which][axes[i]];
    return size;
}

/* The group of `rank` for `kind` as its lowest rank (base), rank's index and the size. */
struct group_pos {
    enum dist_grid_which which;
    int n, axes[AX_COUNT];
    int base, index, size;
};

static void group_locate(const struct dist_grid *g, enum dist_kind kind, int rank,
                         struct group_pos *p)
{
    check_rank(g, rank);
    p->n = kind_axes(g, kind, &p->which, p->axes);
    p->base = rank;
    p->index = 0;
    p->size = 1;
    for (int i = 0; i < p->n; i++) {
        int const s = g->stride[p->which][p->axes[i]], m = g->size[p->which][p->axes[i]];
        int const digit = rank / s % m;
        p->base -= digit * s;
        p->index += digit * p->size;
        p->size *= m;
    }
}

void dist_grid_group(const struct dist_grid *g, enum dist_kind kind, int rank, int *members,
                     int *count, int *index)
{
    struct group_pos p;
    group_locate(g, kind, rank, &p);
    if (members)
        for (int k = 0; k < p.size; k++) {
            int r = p.base, rest = k;
            for (int i = 0; i < p.n; i++) {
                int const m = g->size[p.which][p.axes[i]];
                r += rest % m * g->stride[p.which][p.axes[i]];
                rest /= m;
            }
            members[k] = r;
        }
    if (count) *count = p.size;
    if (index) *index = p.index;
}

void dist_grid_split_args(const struct dist_grid *g, enum dist_kind kind, int rank,
                          int *color, int *key)
{
    struct group_pos p;
    group_locate(g, kind, rank, &p);
    *color = p.base;
    *key = p.index;
}
