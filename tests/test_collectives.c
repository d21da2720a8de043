/* The checked collectives of dist/ over the communicators of real layouts, in exact mode,
 * and dist_agree's propagation of one rank's error.
 *
 * One file, two programs. Started without VDIST_COLL_RANKS, it is the CUnit driver: each
 * test runs this same executable under `mpirun -np N` with VDIST_COLL_RANKS=N and checks
 * its exit status and rank 0's summary line (printing the whole output on failure).
 * Started with VDIST_COLL_RANKS=N (by the driver), it is the MPI program: argv[1] says what
 * to run ("layouts" or "agree"), rank 0 prints one line per layout or scenario and a
 * summary line, and the exit status is non-zero when any element was wrong.
 *
 * Exact mode: every input is an integer in [-999, 999] stored as fp32, so sums over at
 * most 8 ranks are exact in any order and the results must equal a reference computed in
 * integers bit for bit; a wrong element is counted, never tolerated. Outputs are filled
 * with NaN first, which equals nothing, so an element the collective failed to write is
 * wrong too. VDIST_COLL_CORRUPT=1 adds one to a single expected value on world rank 0 so
 * the driver can show that a wrong element is reported and fails the run. */
#include <CUnit/CUnit.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/dist.h"
#include "tests/testutil.h"

/* ---------------------------------------------------------------- layouts */

struct layout {
    int world, tp, cp, ep, etp, pp;
    const char *order; /* NULL: the default */
    const char *note;
};

static const struct layout layouts[] = {
    {2, 2, 1, 1, 1, 1, NULL, "tp2"},
    {2, 1, 2, 1, 1, 1, NULL, "cp2"},
    {2, 1, 1, 2, 1, 1, NULL, "dp2, MoE ep2"},
    {2, 1, 1, 1, 2, 1, NULL, "dp2, MoE etp2"},
    {2, 1, 1, 1, 1, 2, NULL, "pp2"},
    {4, 2, 1, 1, 1, 1, NULL, "tp2 dp2"},
    {4, 2, 2, 1, 1, 1, NULL, "tp2 cp2"},
    {4, 2, 1, 4, 1, 1, NULL, "tp2 dp2, MoE ep4 folded over tp x dp"},
    {4, 1, 2, 2, 2, 1, NULL, "cp2 dp2, MoE etp2 ep2"},
    {4, 2, 1, 2, 1, 2, NULL, "tp2 pp2, MoE ep2"},
    {4, 2, 2, 4, 1, 1, "dp-pp-ep-cp-tp", "tp2 cp2 in reversed order, MoE ep4"},
    {8, 2, 1, 1, 1, 1, NULL, "tp2 dp4"},
    {8, 2, 2, 1, 1, 1, NULL, "tp2 cp2 dp2"},
    {8, 2, 1, 4, 1, 1, NULL, "tp2 dp4, MoE ep4 edp2"},
    {8, 2, 2, 2, 2, 1, NULL, "tp2 cp2 dp2, MoE etp2 ep2 edp2 (parallelism.md, 8 ranks)"},
    {8, 2, 1, 2, 1, 2, NULL, "tp2 dp2 pp2, MoE ep2 edp2"},
    {8, 1, 2, 4, 2, 1, "ep-dp-tp-cp-pp", "cp2 dp4, MoE etp2 ep4, non-default order"},
};
enum { NLAYOUTS = sizeof layouts / sizeof layouts[0] };

static int layouts_on(int world)
{
    int n = 0;
    for (int i = 0; i < NLAYOUTS; i++) n += layouts[i].world == world;
    return n;
}

/* Rank 0's closing line; the driver looks for it with wrong 0. */
#define SUMMARY_LAYOUTS "collectives: %d layouts on %d ranks, total wrong %lld\n"
#define SUMMARY_AGREE "agree: %d scenarios on %d ranks, total wrong %lld\n"

/* How the driver starts the MPI program: this executable under mpirun. */
static const struct tu_mpirun self = {"VDIST_COLL_RANKS", "VDIST_COLL_CORRUPT", 120};

/* ---------------------------------------------------------------- exact values */

/* Element i of group rank j in the check numbered `seed`: an integer in [-999, 999]. */
static long long ival(unsigned seed, int j, size_t i)
{
    uint64_t x = (uint64_t)seed * 0x9E3779B97F4A7C15u ^ (uint64_t)(j + 1) * 0xC2B2AE3D27D4EB4Fu ^
                 (uint64_t)i * 0x165667B19E3779F9u;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9u;
    x ^= x >> 29;
    return (long long)(x % 1999) - 999;
}

/* ---------------------------------------------------------------- checks per group */

struct bufs {
    float *a, *b;
    size_t cap; /* elements of each */
    int *ints;  /* world size */
};

static long long check_allreduce_sum(const struct dist_group *g, enum dist_kind kind,
                                     struct bufs *s, size_t m, unsigned seed)
{
    for (size_t i = 0; i < m; i++) s->a[i] = (float)ival(seed, g->rank, i);
    dist_allreduce_sum(g, kind, s->a, m);
    long long wrong = 0;
    for (size_t i = 0; i < m; i++) {
        long long sum = 0;
        for (int j = 0; j < g->size; j++) sum += ival(seed, j, i);
        wrong += tu_exact_differs(s->a[i], sum);
    }
    return wrong;
}

static long long check_allreduce_max(const struct dist_group *g, enum dist_kind kind,
                                     struct bufs *s, size_t m, unsigned seed)
{
    for (size_t i = 0; i < m; i++) s->a[i] = (float)ival(seed, g->rank, i);
    dist_allreduce_max(g, kind, s->a, m);
    long long wrong = 0;
    for (size_t i = 0; i < m; i++) {
        long long hi = ival(seed, 0, i);
        for (int j = 1; j < g->size; j++)
            if (ival(seed, j, i) > hi) hi = ival(seed, j, i);
        wrong += tu_exact_differs(s->a[i], hi);
    }
    return wrong;
}

static long long check_allgather(const struct dist_group *g, enum dist_kind kind,
                                 struct bufs *s, size_t m, unsigned seed)
{
    size_t const total = m * (size_t)g->size;
    for (size_t i = 0; i < m; i++) s->a[i] = (float)ival(seed, g->rank, i);
    tu_fill_nan(s->b, total);
    dist_allgather(g, kind, s->b, s->a, m);
    long long wrong = 0;
    for (size_t k = 0; k < total; k++)
        wrong += tu_exact_differs(s->b[k], ival(seed, (int)(k / m), k % m));
    return wrong;
}

static long long check_reduce_scatter(const struct dist_group *g, enum dist_kind kind,
                                      struct bufs *s, size_t m, unsigned seed)
{
    size_t const total = m * (size_t)g->size;
    for (size_t k = 0; k < total; k++) s->a[k] = (float)ival(seed, g->rank, k);
    tu_fill_nan(s->b, m);
    dist_reduce_scatter(g, kind, s->b, s->a, m);
    long long wrong = 0;
    for (size_t i = 0; i < m; i++) {
        long long sum = 0;
        for (int j = 0; j < g->size; j++) sum += ival(seed, j, (size_t)g->rank * m + i);
        wrong += tu_exact_differs(s->b[i], sum);
    }
    return wrong;
}

static long long check_bcast(const struct dist_group *g, enum dist_kind kind, struct bufs *s,
                             size_t m, unsigned seed)
{
    int const root = (int)(seed % (unsigned)g->size);
    if (g->rank == root)
        for (size_t i = 0; i < m; i++) s->a[i] = (float)ival(seed, root, i);
    else
        tu_fill_nan(s->a, m);
    dist_bcast(g, kind, s->a, m * sizeof *s->a, root);
    long long wrong = 0;
    for (size_t i = 0; i < m; i++) wrong += tu_exact_differs(s->a[i], ival(seed, root, i));
    return wrong;
}

/* Uneven point-to-point pieces as the all-to-all token dispatcher sends them (dist_irecv,
 * dist_isend, dist_wait_all): from rank src to rank dst go two pieces, tags 0 and 1, of
 * piece_count(src, dst, tag) elements (some zero, which post nothing), element k of piece
 * t being ival(seed, src, (2 dst + t) m + k); then a notice from every rank to every other. */
static size_t piece_count(int src, int dst, int tag, size_t m)
{
    return (size_t)((src + 2 * dst + tag + (int)(m % 3)) % 3) * m / 4;
}

static long long check_pieces(const struct dist_group *g, struct bufs *s, size_t m,
                              unsigned seed)
{
    int const n = g->size, r = g->rank;
    MPI_Request *req = calloc(4 * (size_t)n, sizeof *req);
    size_t *roff = calloc(2 * (size_t)n, sizeof *roff);
    VD_CHECK(req && roff, "out of memory");
    size_t soff = 0, rtot = 0;
    int nr = 0;
    for (int p = 0; p < n; p++)
        for (int t = 0; t < 2; t++) {
            roff[2 * p + t] = rtot;
            rtot += piece_count(p, r, t, m);
        }
    VD_CHECK(rtot <= s->cap, "piece buffers too small");
    tu_fill_nan(s->b, rtot);
    for (int p = 0; p < n; p++)
        for (int t = 0; t < 2; t++)
            dist_irecv(g, s->b + roff[2 * p + t], piece_count(p, r, t, m), p, t, &req[nr++]);
    for (int p = 0; p < n; p++)
        for (int t = 0; t < 2; t++) {
            size_t const out = piece_count(r, p, t, m);
            VD_CHECK(soff + out <= s->cap, "piece buffers too small");
            for (size_t k = 0; k < out; k++)
                s->a[soff + k] = (float)ival(seed, r, (size_t)(2 * p + t) * m + k);
            dist_isend(g, s->a + soff, out, p, t, &req[nr++]);
            soff += out;
        }
    dist_wait_all(req, nr, DIST_WORLD, 0);
    long long wrong = 0;
    for (int p = 0; p < n; p++)
        for (int t = 0; t < 2; t++)
            for (size_t k = 0; k < piece_count(p, r, t, m); k++)
                wrong += tu_exact_differs(s->b[roff[2 * p + t] + k],
                                          ival(seed, p, (size_t)(2 * r + t) * m + k));
    /* notices: every pair, both ways, on a tag no piece used */
    nr = 0;
    for (int p = 0; p < n; p++)
        if (p != r) dist_expect_notice(g, p, 2, &req[nr++]);
    for (int p = 0; p < n; p++)
        if (p != r) dist_notify(g, p, 2, &req[nr++]);
    dist_wait_all(req, nr, DIST_WORLD, 0);
    free(req);
    free(roff);
    return wrong;
}

/* Pieces of uneven size to one root, as the checkpoint gathers its piece lists and the
 * export its blocks: group rank j's piece is piece_count(j, seed % 3, 0, m) elements (some
 * zero), element k being ival(seed, j, k). */
static size_t uneven(int j, unsigned seed, size_t m)
{
    return piece_count(j, (int)(seed % 3), 0, m);
}

/* dist_gather_nbytes then dist_gatherv_bytes: the sizes and the pieces, back to back in
 * rank order, on root (seed % size). */
static long long check_gatherv(const struct dist_group *g, enum dist_kind kind,
                               struct bufs *s, size_t m, unsigned seed)
{
    int const root = (int)(seed % (unsigned)g->size);
    bool const is_root = g->rank == root;
    size_t const mine = uneven(g->rank, seed, m);
    for (size_t k = 0; k < mine; k++) s->a[k] = (float)ival(seed, g->rank, k);
    size_t *nbytes = is_root ? calloc((size_t)g->size, sizeof *nbytes) : NULL;
    VD_CHECK(!is_root || nbytes, "out of memory");
    dist_gather_nbytes(g, kind, mine * sizeof *s->a, nbytes, root);
    long long wrong = 0;
    size_t total = 0;
    for (int j = 0; is_root && j < g->size; j++) {
        wrong += nbytes[j] != uneven(j, seed, m) * sizeof *s->a;
        total += nbytes[j];
    }
    VD_CHECK(total <= s->cap * sizeof *s->b, "gather buffers too small");
    if (is_root) tu_fill_nan(s->b, total / sizeof *s->b);
    dist_gatherv_bytes(g, kind, s->b, nbytes, s->a, mine * sizeof *s->a, root);
    size_t at = 0;
    for (int j = 0; is_root && !wrong && j < g->size; at += uneven(j, seed, m), j++)
        for (size_t k = 0; k < uneven(j, seed, m); k++)
            wrong += tu_exact_differs(s->b[at + k], ival(seed, j, k));
    free(nbytes);
    return wrong;
}

/* dist_send_bytes and dist_send to root (seed % size), received with DIST_ANY_SOURCE in
 * arrival order, each header's values next from the same sender (as the export does): every
 * other rank sends its group rank and element count, then its uneven piece. */
static long long check_send_recv(const struct dist_group *g, enum dist_kind kind,
                                 struct bufs *s, size_t m, unsigned seed)
{
    int const root = (int)(seed % (unsigned)g->size), tag = (int)(seed % 7);
    long long wrong = 0;
    if (g->rank != root) {
        uint64_t const hdr[2] = {(uint64_t)g->rank, uneven(g->rank, seed, m)};
        for (size_t k = 0; k < hdr[1]; k++) s->a[k] = (float)ival(seed, g->rank, k);
        dist_send_bytes(g, kind, hdr, sizeof hdr, root, tag);
        dist_send(g, kind, s->a, hdr[1], root, tag);
        return 0;
    }
    int seen = 0;
    for (int b = 1; b < g->size; b++) {
        uint64_t hdr[2];
        int const from = dist_recv_bytes(g, kind, hdr, sizeof hdr, DIST_ANY_SOURCE, tag);
        if (hdr[0] != (uint64_t)from || hdr[1] != uneven(from, seed, m) || hdr[1] > s->cap) {
            wrong++;
            continue;
        }
        tu_fill_nan(s->b, hdr[1]);
        wrong += dist_recv(g, kind, s->b, hdr[1], from, tag) != from;
        for (size_t k = 0; k < hdr[1]; k++) wrong += tu_exact_differs(s->b[k], ival(seed, from, k));
        seen++;
    }
    return wrong + (seen != g->size - 1);
}

/* The communicator holds exactly the grid's members, in the grid's order. */
static long long check_members(const struct dist_grid *grid, const struct dist_group *g,
                               enum dist_kind kind, struct bufs *s)
{
    int const me = dist_world_rank();
    int *const got = s->ints, *const want = s->ints + grid->world;
    DIST_CHECK_MPI(MPI_Allgather(&me, 1, MPI_INT, got, 1, MPI_INT, g->comm));
    int count = 0, index = -1;
    dist_grid_group(grid, kind, me, want, &count, &index);
    long long wrong = (count != g->size) + (index != g->rank);
    for (int k = 0; k < g->size && k < count; k++) wrong += got[k] != want[k];
    return wrong;
}

/* Element counts per rank: one, a small odd count, one large enough for the libraries'
 * segmented (ring, pipelined) algorithms, and one over two and a half of
 * dist_reduce_scatter's rounds (2^18 floats); none divisible by the group sizes. */
static const size_t counts[] = {1, 1003, 65541, 655363};
enum { NCOUNTS = sizeof counts / sizeof counts[0], CHECKS_PER_COUNT = 8 };

/* Runs every check on every group kind of one layout; returns this rank's wrong count and
 * adds the checks run to *checks. A layout the grid refuses counts as one wrong element. */
static long long run_layout(const struct layout *l, struct bufs *s, long *checks)
{
    struct dist_grid grid;
    if (dist_grid_init(&grid, dist_world_size(), l->tp, l->cp, l->ep, l->etp, l->pp,
                       l->order) < 0) {
        if (dist_world_rank() == 0) printf("layout refused: %s\n", vd_err_msg());
        return dist_world_rank() == 0;
    }
    long long wrong = 0;
    unsigned seed = 1;
    for (int kind = 0; kind < DIST_NKIND; kind++) {
        struct dist_group g;
        dist_group_create(&g, &grid, (enum dist_kind)kind);
        wrong += check_members(&grid, &g, (enum dist_kind)kind, s);
        ++*checks;
        for (int c = 0; c < NCOUNTS; c++) {
            size_t const m = counts[c];
            wrong += check_allreduce_sum(&g, (enum dist_kind)kind, s, m, seed++);
            wrong += check_allreduce_max(&g, (enum dist_kind)kind, s, m, seed++);
            wrong += check_allgather(&g, (enum dist_kind)kind, s, m, seed++);
            wrong += check_reduce_scatter(&g, (enum dist_kind)kind, s, m, seed++);
            wrong += check_bcast(&g, (enum dist_kind)kind, s, m, seed++);
            wrong += check_pieces(&g, s, m, seed++);
            wrong += check_gatherv(&g, (enum dist_kind)kind, s, m, seed++);
            wrong += check_send_recv(&g, (enum dist_kind)kind, s, m, seed++);
            *checks += CHECKS_PER_COUNT;
        }
        dist_group_free(&g);
    }
    return wrong;
}

static int mpi_layouts(void)
{
    int const world = dist_world_size(), rank = dist_world_rank();
    const char *const corrupt = getenv(self.corrupt_env);
    tu_exact_corrupt(rank == 0 && corrupt && strcmp(corrupt, "1") == 0);

    struct bufs s;
    s.cap = counts[NCOUNTS - 1] * (size_t)world;
    s.a = vd_alloc(s.cap * sizeof *s.a);
    s.b = vd_alloc(s.cap * sizeof *s.b);
    s.ints = vd_alloc(2 * (size_t)world * sizeof *s.ints);

    long long total = 0;
    int done = 0;
    for (int i = 0; i < NLAYOUTS; i++) {
        const struct layout *const l = &layouts[i];
        if (l->world != world) continue;
        long checks = 0;
        long long const mine = run_layout(l, &s, &checks);
        long long wrong = 0;
        DIST_CHECK_MPI(MPI_Allreduce(&mine, &wrong, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD));
        total += wrong;
        done++;
        if (rank == 0) {
            printf("layout %d ranks tp%d cp%d ep%d etp%d pp%d order %s (%s): %d group kinds, "
                   "%ld checks per rank, wrong %lld\n",
                   world, l->tp, l->cp, l->ep, l->etp, l->pp,
                   l->order ? l->order : DIST_GRID_ORDER_DEFAULT, l->note, DIST_NKIND, checks,
                   wrong);
            fflush(stdout);
        }
    }
    if (rank == 0) printf(SUMMARY_LAYOUTS, done, world, total);
    free(s.a);
    free(s.b);
    free(s.ints);
    return total == 0 && done > 0 ? 0 : 1;
}

/* ---------------------------------------------------------------- dist_agree */

/* One scenario: the ranks of `g` listed in fail (by group rank, with their codes) fail with
 * a message naming them; every rank must get the lowest failing rank's code, and rank 0 of
 * g its message. Returns this rank's wrong count. */
static long long agree_scenario(const struct dist_group *g, int nfail, const int *fail_rank,
                                const int *fail_code, const char *label)
{
    vd_err_clear();
    int local = 0;
    for (int f = 0; f < nfail; f++)
        if (g->rank == fail_rank[f])
            local = vd_err_set(fail_code[f], __FILE__, __LINE__,
                               "shard file /nonexistent/%s-rank-%d.bin cannot be opened", label,
                               g->rank);
    int first = -1, code = 0;
    for (int f = 0; f < nfail; f++)
        if (first < 0 || fail_rank[f] < first) first = fail_rank[f], code = fail_code[f];

    int const got = dist_agree(g, local);
    long long wrong = got != code;
    if (code < 0 && got >= 0) wrong++;
    if (code < 0 && g->rank == 0) {
        char want[128];
        snprintf(want, sizeof want, "/nonexistent/%s-rank-%d.bin", label, first);
        if (!strstr(vd_err_msg(), want)) {
            printf("agree %s: rank 0's message \"%s\" does not name \"%s\"\n", label,
                   vd_err_msg(), want);
            wrong++;
        }
        if (dist_world_rank() == 0)
            printf("agree %s: rank 0 got code %d, message: %s\n", label, got, vd_err_msg());
    }
    return wrong;
}

static int mpi_agree(void)
{
    int const world = dist_world_size(), rank = dist_world_rank();
    const struct dist_group *const w = dist_world();
    long long mine = 0, total = 0;
    int scenarios = 0;

    /* The last rank fails alone. */
    int const last[] = {world - 1}, eio[] = {VD_EIO};
    mine += agree_scenario(w, 1, last, eio, "last");
    scenarios++;
    /* Nobody fails. */
    mine += agree_scenario(w, 0, NULL, NULL, "none");
    scenarios++;
    /* Two ranks fail with different codes: the lower rank's code and message win. */
    int const two[] = {world - 1, world / 2}, codes[] = {VD_EIO, VD_EFORMAT};
    mine += agree_scenario(w, 2, two, codes, "two");
    scenarios++;
    /* Inside the tp groups of tp2: only the group of the last world rank fails, the other
     * groups agree on success. */
    struct dist_grid grid;
    VD_CHECK(dist_grid_init(&grid, world, 2, 1, 1, 1, 1, NULL) == 0, "%s", vd_err_msg());
    struct dist_group tp;
    dist_group_create(&tp, &grid, DIST_TP);
    bool const failing_group = rank / 2 == (world - 1) / 2;
    int const tp_last[] = {1};
    mine += agree_scenario(&tp, failing_group ? 1 : 0, tp_last, eio, "tp-group");
    dist_group_free(&tp);
    scenarios++;

    DIST_CHECK_MPI(MPI_Allreduce(&mine, &total, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD));
    if (rank == 0) printf(SUMMARY_AGREE, scenarios, world, total);
    return total == 0 ? 0 : 1;
}

static int mpi_main(int argc, char **argv, int ranks)
{
    dist_init(&argc, &argv);
    int code = 2;
    if (dist_world_size() != ranks) {
        if (dist_world_rank() == 0)
            printf("VDIST_COLL_RANKS=%d but the world has %d ranks\n", ranks,
                   dist_world_size());
    } else if (argc > 1 && strcmp(argv[1], "layouts") == 0) {
        code = mpi_layouts();
    } else if (argc > 1 && strcmp(argv[1], "agree") == 0) {
        code = mpi_agree();
    } else if (dist_world_rank() == 0) {
        printf("usage: VDIST_COLL_RANKS=N mpirun -np N %s layouts|agree\n", argv[0]);
    }
    fflush(stdout);
    dist_finalize();
    return code;
}

/* ---------------------------------------------------------------- the driver */

/* Runs, asserts exit status 0 (or not, when expect_fail) and that the output holds
 * `needle`; prints the output when an assertion fails. */
static void expect_run(int np, const char *what, bool corrupt, const char *needle,
                       bool expect_fail)
{
    char *out = NULL;
    int const status = tu_mpirun_self(&self, np, what, corrupt, &out);
    bool const status_ok =
        expect_fail ? status != -1 && !tu_exited_zero(status) : tu_exited_zero(status);
    bool const found = out && strstr(out, needle);
    CU_ASSERT(status_ok);
    CU_ASSERT(found);
    if (!status_ok || !found)
        printf("\n--- mpirun -np %d %s (status %d; looked for \"%s\"):\n%s---\n", np, what,
               status, needle, out ? out : "(no output)");
    free(out);
}

static void expect_layouts(int np)
{
    char needle[128];
    snprintf(needle, sizeof needle, SUMMARY_LAYOUTS, layouts_on(np), np, 0LL);
    expect_run(np, "layouts", false, needle, false);
}

static void test_layouts_2(void) { expect_layouts(2); }
static void test_layouts_4(void) { expect_layouts(4); }
static void test_layouts_8(void) { expect_layouts(8); }

static void test_agree_4(void)
{
    char needle[128];
    snprintf(needle, sizeof needle, SUMMARY_AGREE, 4, 4, 0LL);
    expect_run(4, "agree", false, needle, false);
}

/* The harness itself: one corrupted expectation must be counted and fail the run. */
static void test_corruption_is_caught(void)
{
    char needle[128];
    snprintf(needle, sizeof needle, SUMMARY_LAYOUTS, layouts_on(2), 2, 1LL);
    expect_run(2, "layouts", true, needle, true);
}

int main(int argc, char **argv)
{
    const char *const ranks = getenv(self.ranks_env);
    if (ranks) return mpi_main(argc, argv, atoi(ranks));

    static const struct tu_test tests[] = {
        {"every group kind of 2-rank layouts, exact", test_layouts_2},
        {"every group kind of 4-rank layouts, exact", test_layouts_4},
        {"every group kind of 8-rank layouts, exact", test_layouts_8},
        {"dist_agree propagates one rank's error", test_agree_4},
        {"a corrupted expectation fails the run", test_corruption_is_caught},
    };
    static const struct tu_suite suite = {
        .name = "collectives (mpirun)",
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_UNTIMED,
    };
    return tu_cunit_main(&suite);
}
