/* `vdist bench comm`: the collectives of every process group of a layout, timed the way
 * nccl-tests times them (time per call, algbw, busbw) and checked exactly (a count of wrong
 * elements) before each timing.
 *
 * Conventions of nccl-tests: for allgather and reduce-scatter the size is the whole
 * (gathered, or reduced) buffer, for all-to-all the buffer each rank sends, for allreduce
 * and point-to-point the buffer itself. algbw = size / time (1 GB = 1e9 B); busbw = algbw *
 * 2(n-1)/n for allreduce, * (n-1)/n for allgather, reduce-scatter and all-to-all, * 1 for
 * send/recv, with n the group size, so that busbw is comparable with the links' speed
 * whatever n is. The time is the average over the world's ranks of each rank's time per
 * call (itself averaged over the timed iterations); min and max show the spread. */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/dist.h"
#include "launch/launch.h"

/* ---------------------------------------------------------------- options */

struct bench_opts {
    size_t min_nbytes, max_nbytes;
    int iters, warmup;
    bool help;
};

enum {
    BENCH_MIN_NBYTES_DEFAULT = 1 << 10,
    BENCH_MAX_NBYTES_DEFAULT = 64 << 20,
    BENCH_ITERS_DEFAULT = 20,
    BENCH_WARMUP_DEFAULT = 5,
    BENCH_ITERS_MAX = 1000000,
};
/* Two buffers of this size per rank at most; element counts stay within MPI's int. */
#define BENCH_NBYTES_MAX ((size_t)1 << 31)

void launch_bench_comm_help(FILE *out)
{
    fprintf(out,
            "usage: [mpirun -np N] vdist bench comm --config FILE [--section.key=value ...]\n"
            "                      [--min-bytes N] [--max-bytes N] [--iters N] [--warmup N]\n\n"
            "Times the collectives of every process group of the layout in [parallel]\n"
            "(tp, cp, ep, etp, pp, order; dp and edp follow from the world size) that has\n"
            "more than one rank, over message sizes doubling from --min-bytes to --max-bytes,\n"
            "after checking each exactly (the wrong column counts wrong elements; it must\n"
            "be 0).\n\n"
            "  --min-bytes N  smallest message, bytes (K, M, G suffixes: KiB, MiB, GiB;\n"
            "                 default 1K)\n"
            "  --max-bytes N  largest message (default 64M, at most 2G)\n"
            "  --iters N      timed calls per size (default %d)\n"
            "  --warmup N     untimed calls before them (default %d)\n"
            "  --help         this text\n\n"
            "Sizes follow nccl-tests: the whole gathered buffer for allgather and\n"
            "reduce-scatter, the buffer each rank sends for all-to-all. algbw = size / time;\n"
            "busbw = algbw * 2(n-1)/n (allreduce), * (n-1)/n (allgather, reduce-scatter,\n"
            "all-to-all), * 1 (send/recv); n the group size; GB/s = 1e9 B/s.\n",
            BENCH_ITERS_DEFAULT, BENCH_WARMUP_DEFAULT);
}

/* Bytes with an optional binary suffix: "4096", "64K", "16M", "1G" (also KiB, MiB, GiB). */
static int parse_nbytes(const char *opt, const char *text, size_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    bool ok = text[0] >= '0' && text[0] <= '9' && end != text && errno == 0;
    unsigned shift = 0;
    if (ok && *end) {
        switch (*end) {
        case 'K': case 'k': shift = 10; break;
        case 'M': case 'm': shift = 20; break;
        case 'G': case 'g': shift = 30; break;
        default: ok = false;
        }
        end++;
        if (ok && *end && strcmp(end, "iB") != 0 && strcmp(end, "B") != 0) ok = false;
    }
    if (ok && v > (BENCH_NBYTES_MAX >> shift)) ok = false;
    RETURN_IF(!ok, VD_EINVAL,
              "%s '%s' is not a byte count from 4 to 2G: give a whole number of bytes, "
              "optionally with a K, M or G suffix (KiB, MiB, GiB), e.g. %s 64M",
              opt, text, opt);
    *out = (size_t)(v << shift);
    return 0;
}

static int parse_count(const char *opt, const char *text, int lo, int *out)
{
    char *end = NULL;
    errno = 0;
    long const v = strtol(text, &end, 10);
    RETURN_IF(end == text || *end || errno != 0 || v < lo || v > BENCH_ITERS_MAX, VD_EINVAL,
              "%s '%s' is not a whole number from %d to %d", opt, text, lo,
              BENCH_ITERS_MAX);
    *out = (int)v;
    return 0;
}

/* argv holds options only. Accepts "--name value" and "--name=value". */
static int opts_parse(struct bench_opts *o, int argc, char **argv)
{
    *o = (struct bench_opts){
        .min_nbytes = BENCH_MIN_NBYTES_DEFAULT,
        .max_nbytes = BENCH_MAX_NBYTES_DEFAULT,
        .iters = BENCH_ITERS_DEFAULT,
        .warmup = BENCH_WARMUP_DEFAULT,
    };
    static const char *const names[] = {"--min-bytes", "--max-bytes", "--iters", "--warmup"};
    for (int i = 0; i < argc; i++) {
        const char *const arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            o->help = true;
            continue;
        }
        int which = -1;
        const char *value = NULL;
        for (int n = 0; n < 4; n++) {
            size_t const len = strlen(names[n]);
            if (strncmp(arg, names[n], len) != 0) continue;
            if (arg[len] == '=') value = arg + len + 1;
            else if (arg[len] != '\0') continue;
            which = n;
        }
        RETURN_IF(which < 0, VD_EINVAL,
                  "unknown option '%s' for vdist bench comm: the options are --min-bytes N, "
                  "--max-bytes N, --iters N, --warmup N and --help",
                  arg);
        if (!value) {
            RETURN_IF(i + 1 >= argc, VD_EINVAL, "option %s needs a value, e.g. %s %s",
                      names[which], names[which], which < 2 ? "1M" : "20");
            value = argv[++i];
        }
        switch (which) {
        case 0: FORWARD_IF(parse_nbytes(names[0], value, &o->min_nbytes)); break;
        case 1: FORWARD_IF(parse_nbytes(names[1], value, &o->max_nbytes)); break;
        case 2: FORWARD_IF(parse_count(names[2], value, 1, &o->iters)); break;
        default: FORWARD_IF(parse_count(names[3], value, 0, &o->warmup)); break;
        }
    }
    RETURN_IF(o->min_nbytes < sizeof(float), VD_EINVAL,
              "--min-bytes %zu is below one element: messages are fp32, at least 4 bytes",
              o->min_nbytes);
    RETURN_IF(o->max_nbytes < o->min_nbytes, VD_EINVAL,
              "--max-bytes %zu is below --min-bytes %zu: sizes double from the minimum up "
              "to the maximum",
              o->max_nbytes, o->min_nbytes);
    return 0;
}

/* ---------------------------------------------------------------- collectives */

enum bench_coll {
    COLL_ALLREDUCE,
    COLL_ALLGATHER,
    COLL_REDUCE_SCATTER,
    COLL_ALLTOALL,
    COLL_RING,  /* sendrecv to both neighbours of a ring (context-parallel attention) */
    COLL_CHAIN, /* send to the next stage, receive from the previous (pipeline) */
};

static const char *coll_name(enum bench_coll c)
{
    switch (c) {
    case COLL_ALLREDUCE: return "allreduce";
    case COLL_ALLGATHER: return "allgather";
    case COLL_REDUCE_SCATTER: return "reduce_scatter";
    case COLL_ALLTOALL: return "alltoall";
    case COLL_RING: return "sendrecv_ring";
    default: return "sendrecv_pp";
    }
}

static double coll_busbw_factor(enum bench_coll c, int n)
{
    switch (c) {
    case COLL_ALLREDUCE: return 2.0 * (n - 1) / n;
    case COLL_ALLGATHER:
    case COLL_REDUCE_SCATTER:
    case COLL_ALLTOALL: return (double)(n - 1) / n;
    default: return 1.0;
    }
}

/* Collectives that split the buffer into one block per rank need a multiple of n. */
static bool coll_blocked(enum bench_coll c)
{
    return c == COLL_ALLGATHER || c == COLL_REDUCE_SCATTER || c == COLL_ALLTOALL;
}

/* What vdist runs on each group kind (shared/docs/parallelism.md). */
struct kind_plan {
    enum dist_kind kind;
    int ncoll;
    enum bench_coll coll[3];
};

static const struct kind_plan plans[] = {
    {DIST_TP, 3, {COLL_ALLGATHER, COLL_REDUCE_SCATTER, COLL_ALLREDUCE}},
    {DIST_CP, 1, {COLL_RING}},
    {DIST_DP, 3, {COLL_ALLREDUCE, COLL_REDUCE_SCATTER, COLL_ALLGATHER}},
    {DIST_DPCP, 3, {COLL_ALLREDUCE, COLL_REDUCE_SCATTER, COLL_ALLGATHER}},
    {DIST_PP, 1, {COLL_CHAIN}},
    {DIST_EP, 1, {COLL_ALLTOALL}},
    {DIST_ETP, 2, {COLL_ALLGATHER, COLL_REDUCE_SCATTER}},
    {DIST_ETPEP, 1, {COLL_ALLTOALL}},
    {DIST_EDP, 3, {COLL_ALLREDUCE, COLL_REDUCE_SCATTER, COLL_ALLGATHER}},
};

/* One call of collective c over `count` elements in all (the nccl-tests size). a is the
 * input (and the in-place allreduce buffer), b the output. */
static void coll_call(enum bench_coll c, const struct dist_group *g, enum dist_kind kind,
                      float *a, float *b, size_t count)
{
    size_t const block = count / (size_t)g->size;
    int const next = (g->rank + 1) % g->size, prev = (g->rank + g->size - 1) % g->size;
    switch (c) {
    case COLL_ALLREDUCE: dist_allreduce_sum(g, kind, a, count); break;
    case COLL_ALLGATHER: dist_allgather(g, kind, b, a, block); break;
    case COLL_REDUCE_SCATTER: dist_reduce_scatter(g, kind, b, a, block); break;
    case COLL_ALLTOALL:
        DIST_CHECK_MPI(MPI_Alltoall(a, dist_count(block), MPI_FLOAT, b, dist_count(block),
                                    MPI_FLOAT, g->comm));
        break;
    case COLL_RING:
        DIST_CHECK_MPI(MPI_Sendrecv(a, dist_count(count), MPI_FLOAT, next, 0, b,
                                    dist_count(count), MPI_FLOAT, prev, 0, g->comm,
                                    MPI_STATUS_IGNORE));
        break;
    case COLL_CHAIN:
        DIST_CHECK_MPI(MPI_Sendrecv(a, dist_count(count), MPI_FLOAT,
                                    g->rank + 1 < g->size ? g->rank + 1 : MPI_PROC_NULL, 0,
                                    b, dist_count(count), MPI_FLOAT,
                                    g->rank > 0 ? g->rank - 1 : MPI_PROC_NULL, 0, g->comm,
                                    MPI_STATUS_IGNORE));
        break;
    }
}

/* ---------------------------------------------------------------- exact check */

/* Integer-valued inputs, element i of group rank j: j * scale + i % 997. scale keeps every
 * sum over the group below 2^24, so each partial sum, in whatever order the library adds,
 * is an exact fp32 integer and the result must equal the expectation bit for bit. */
struct exact {
    int n;
    long long scale;
};

static struct exact exact_for(int n)
{
    long long const pairs = (long long)n * (n - 1) / 2;
    long long const scale = pairs * 1000 + (long long)n * 996 < (1LL << 24) ? 1000 : 1;
    VD_CHECK(pairs * scale + (long long)n * 996 < (1LL << 24),
             "group of %d ranks: the exact check's sums would exceed 2^24", n);
    return (struct exact){.n = n, .scale = scale};
}

static float exact_value(const struct exact *e, int j, size_t i)
{
    return (float)((long long)j * e->scale + (long long)(i % 997));
}

static float exact_sum(const struct exact *e, size_t i)
{
    long long const pairs = (long long)e->n * (e->n - 1) / 2;
    return (float)(pairs * e->scale + (long long)e->n * (long long)(i % 997));
}

/* Runs c once on exact inputs; returns this rank's number of wrong output elements. The
 * output is first filled with NaN, which equals nothing, so an element never written
 * counts as wrong. */
static long long coll_check(enum bench_coll c, const struct dist_group *g,
                            enum dist_kind kind, float *a, float *b, size_t count)
{
    struct exact const e = exact_for(g->size);
    int const r = g->rank, n = g->size;
    size_t const block = count / (size_t)n;
    long long wrong = 0;
    if (c == COLL_ALLGATHER) {
        for (size_t i = 0; i < block; i++) a[i] = exact_value(&e, r, (size_t)r * block + i);
    } else {
        for (size_t i = 0; i < count; i++) a[i] = exact_value(&e, r, i);
    }
    for (size_t i = 0; i < count; i++) b[i] = NAN;

    coll_call(c, g, kind, a, b, count);

    switch (c) {
    case COLL_ALLREDUCE:
        for (size_t i = 0; i < count; i++) wrong += a[i] != exact_sum(&e, i);
        break;
    case COLL_ALLGATHER:
        for (size_t i = 0; i < count; i++) wrong += b[i] != exact_value(&e, (int)(i / block), i);
        break;
    case COLL_REDUCE_SCATTER:
        for (size_t i = 0; i < block; i++) wrong += b[i] != exact_sum(&e, (size_t)r * block + i);
        break;
    case COLL_ALLTOALL:
        for (size_t i = 0; i < count; i++)
            wrong += b[i] != exact_value(&e, (int)(i / block), (size_t)r * block + i % block);
        break;
    case COLL_RING: {
        int const prev = (r + n - 1) % n;
        for (size_t i = 0; i < count; i++) wrong += b[i] != exact_value(&e, prev, i);
        break;
    }
    case COLL_CHAIN:
        if (r > 0)
            for (size_t i = 0; i < count; i++) wrong += b[i] != exact_value(&e, r - 1, i);
        break;
    }
    return wrong;
}

/* ---------------------------------------------------------------- one table row */

struct bench_row {
    size_t nbytes, count;
    double t_avg, t_min, t_max; /* seconds per call */
    long long wrong;            /* summed over the world (valid on world rank 0) */
};

/* Checks, warms up and times collective c on `count` elements; collective over the world.
 * Returns this rank's wrong count; *row is complete on world rank 0. */
static long long bench_one(enum bench_coll c, const struct dist_group *g, enum dist_kind kind,
                           float *a, float *b, size_t count, const struct bench_opts *o,
                           struct bench_row *row)
{
    MPI_Comm const world = dist_world()->comm;
    long long const wrong = coll_check(c, g, kind, a, b, count);

    /* Zeros keep the repeated in-place allreduce finite; the reduction's speed does not
     * depend on the (normal) values. */
    memset(a, 0, count * sizeof *a);
    for (int i = 0; i < o->warmup; i++) coll_call(c, g, kind, a, b, count);
    DIST_CHECK_MPI(MPI_Barrier(world));
    double const t0 = MPI_Wtime();
    for (int i = 0; i < o->iters; i++) coll_call(c, g, kind, a, b, count);
    double const t = (MPI_Wtime() - t0) / o->iters;

    double sum = 0, lo = 0, hi = 0;
    long long wrong_all = 0;
    DIST_CHECK_MPI(MPI_Reduce(&t, &sum, 1, MPI_DOUBLE, MPI_SUM, 0, world));
    DIST_CHECK_MPI(MPI_Reduce(&t, &lo, 1, MPI_DOUBLE, MPI_MIN, 0, world));
    DIST_CHECK_MPI(MPI_Reduce(&t, &hi, 1, MPI_DOUBLE, MPI_MAX, 0, world));
    DIST_CHECK_MPI(MPI_Reduce(&wrong, &wrong_all, 1, MPI_LONG_LONG, MPI_SUM, 0, world));
    *row = (struct bench_row){
        .nbytes = count * sizeof(float), .count = count,
        .t_avg = sum / dist_world_size(), .t_min = lo, .t_max = hi, .wrong = wrong_all,
    };
    return wrong;
}

static void row_print(const struct bench_row *row, enum bench_coll c, int n)
{
    double const algbw = (double)row->nbytes / row->t_avg / 1e9;
    printf("%12zu %12zu %15s %12.2f %12.2f %12.2f %11.3f %11.3f %7lld\n", row->nbytes,
           row->count, coll_name(c), row->t_avg * 1e6, row->t_min * 1e6, row->t_max * 1e6,
           algbw, algbw * coll_busbw_factor(c, n), row->wrong);
    fflush(stdout);
}

/* Rank 0's header of a group kind's table. */
static void kind_header(const struct dist_grid *grid, enum dist_kind kind, int n)
{
    int *const members = vd_alloc((size_t)n * sizeof *members);
    dist_grid_group(grid, kind, 0, members, NULL, NULL);
    int const ngroups = grid->world / n;
    printf("\n# group %s: %d ranks per group, %d group%s; rank 0's group: [",
           dist_kind_name(kind), n, ngroups, ngroups == 1 ? "" : "s");
    int const shown = n <= 32 ? n : 32;
    for (int i = 0; i < shown; i++) printf("%s%d", i ? ", " : "", members[i]);
    printf("%s]\n", shown < n ? ", ..." : "");
    printf("# %10s %12s %15s %12s %12s %12s %11s %11s %7s\n", "size(B)", "count(elts)",
           "collective", "time_avg(us)", "time_min(us)", "time_max(us)", "algbw(GB/s)",
           "busbw(GB/s)", "wrong");
    free(members);
}

/* A kind whose group is the same ranks, with the same collectives, as an earlier kind's. */
static const char *kind_duplicate(const struct dist_grid *grid, enum dist_kind kind)
{
    if (kind == DIST_DPCP && grid->dims.cp == 1) return "dp (cp = 1)";
    if (kind == DIST_ETPEP && grid->dims.etp == 1) return "ep (etp = 1)";
    return NULL;
}

/* ---------------------------------------------------------------- entry */

int launch_bench_comm(const struct launch_config *c, int argc, char **argv)
{
    int const rank = dist_world_rank(), world = dist_world_size();
    struct bench_opts o;
    int rc = dist_agree(dist_world(), opts_parse(&o, argc, argv));
    if (rc < 0) return rc;
    if (o.help) {
        if (rank == 0) launch_bench_comm_help(stdout);
        return 0;
    }

    const struct launch_parallel *const p = &c->parallel;
    struct dist_grid grid;
    rc = dist_agree(dist_world(),
                    dist_grid_init(&grid, world, p->tp, p->cp, p->ep, p->etp, p->pp,
                                   p->order[0] ? p->order : NULL));
    if (rc < 0) return rc;

    size_t const cap = o.max_nbytes / sizeof(float);
    float *const a = malloc(cap * sizeof *a), *const b = malloc(cap * sizeof *b);
    int alloc_rc = 0;
    if (!a || !b)
        alloc_rc = vd_err_set(VD_ENOMEM, __FILE__, __LINE__,
                              "cannot allocate two buffers of --max-bytes %zu bytes on rank "
                              "%d; lower --max-bytes",
                              o.max_nbytes, rank);
    rc = dist_agree(dist_world(), alloc_rc);
    if (rc < 0) {
        free(a);
        free(b);
        return rc;
    }
    /* Touch every page now, not inside the first timing. */
    memset(a, 0, cap * sizeof *a);
    memset(b, 0, cap * sizeof *b);

    if (rank == 0) {
        const struct dist_grid_dims *const d = &grid.dims;
        printf("# vdist bench comm: world %d, order %s\n"
               "#   attention tp %d x cp %d x dp %d x pp %d; moe etp %d x ep %d x edp %d x pp %d\n"
               "#   sizes %zu .. %zu bytes (doubling); %d warm-up + %d timed calls per size\n"
               "#   time: per call, each rank's average over the timed calls; avg/min/max over "
               "the %d ranks\n"
               "#   algbw = size / time_avg; busbw = algbw * 2(n-1)/n allreduce, (n-1)/n "
               "allgather, reduce_scatter, alltoall, 1 send/recv; GB = 1e9 B\n"
               "#   wrong: elements that differ from the exact expectation (integer-valued "
               "fp32), summed over the ranks\n",
               world, grid.order, d->tp, d->cp, d->dp, d->pp, d->etp, d->ep, d->edp, d->pp,
               o.min_nbytes, o.max_nbytes, o.warmup, o.iters, world);
        fflush(stdout);
    }

    long long wrong_local = 0;
    int measured = 0;
    for (size_t k = 0; k < sizeof plans / sizeof plans[0]; k++) {
        const struct kind_plan *const plan = &plans[k];
        int const n = dist_grid_group_size(&grid, plan->kind);
        if (n == 1) continue;
        const char *const same = kind_duplicate(&grid, plan->kind);
        if (same) {
            if (rank == 0)
                printf("\n# group %s: the same groups as %s, not measured again\n",
                       dist_kind_name(plan->kind), same);
            continue;
        }
        struct dist_group g;
        dist_group_create(&g, &grid, plan->kind);
        VD_CHECK(g.size == n, "group %s has %d ranks, the grid says %d",
                 dist_kind_name(plan->kind), g.size, n);
        if (rank == 0) kind_header(&grid, plan->kind, n);
        for (size_t nbytes = o.min_nbytes; nbytes <= o.max_nbytes; nbytes *= 2) {
            for (int ci = 0; ci < plan->ncoll; ci++) {
                enum bench_coll const coll = plan->coll[ci];
                size_t count = nbytes / sizeof(float);
                if (coll_blocked(coll)) count -= count % (size_t)n;
                if (count == 0) continue;
                struct bench_row row;
                wrong_local += bench_one(coll, &g, plan->kind, a, b, count, &o, &row);
                if (rank == 0) row_print(&row, coll, n);
            }
            if (nbytes > o.max_nbytes / 2) break;
        }
        dist_group_free(&g);
        measured++;
    }
    free(a);
    free(b);
    /* The bench's calls are not training traffic. */
    dist_comm_stats_reset();

    long long wrong = 0;
    DIST_CHECK_MPI(MPI_Allreduce(&wrong_local, &wrong, 1, MPI_LONG_LONG, MPI_SUM,
                                 dist_world()->comm));
    if (rank == 0) {
        if (measured == 0)
            printf("# every group of this layout has one rank: nothing to measure (run "
                   "under mpirun -np N with N > 1, or set parallel sizes)\n");
        printf("\n# wrong elements in all: %lld%s\n", wrong, wrong ? "" : " (OK)");
        fflush(stdout);
    }
    RETURN_IF(wrong != 0, VD_EMPI,
              "communication bench: %lld output elements differed from their exact "
              "expectation (see the wrong column): the MPI library or the network "
              "corrupts data",
              wrong);
    return 0;
}
