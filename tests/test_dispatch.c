/* The token dispatcher (parallel/dispatch.c) in exact mode: the capacity decision, both
 * dispatchers' forward and backward round trips, their counts and splits, on 1, 2, 4 and 8
 * ranks, in layouts with and without MoE parallel folding.
 *
 * One file, two programs. Started without VDIST_DISPATCH_RANKS, it is the CUnit driver:
 * each test runs this same executable under `mpirun -np N` with VDIST_DISPATCH_RANKS=N and
 * checks its exit status, every layout's line and rank 0's summary line (printing the whole
 * output on failure). Started with VDIST_DISPATCH_RANKS=N, it is the MPI program: for every
 * layout of the table on N ranks and both dispatchers it runs every routing scenario on
 * block 0 of a one-layer model, prints `dispatch: <layout> <dispatcher> wrong W` and a
 * summary line, and exits non-zero when any element was wrong.
 *
 * Exact mode: the test writes the router's outputs itself (rtopk, small integer weights
 * rtopk_w, probabilities rprobs on a 1/64 grid with ties) and the MoE input m_loc as
 * integers that encode (global token, column): m = 1 + column + d (replica N + token), where
 * the replica is the attention grid's dp coordinate (each replica runs its own micro-batch).
 * pm.identity_experts makes the experts return their input on ETP rank 0 and zeros
 * elsewhere, so every sum the dispatcher forms is a sum of small integers below 2^24:
 * exact in any order. Each result is compared with an expectation computed here from the
 * routing of every micro-batch, element by element; a wrong element is counted, never
 * tolerated. Outputs and the dispatcher's buffers are filled with NaN (or -7) first, so an
 * element the dispatcher failed to write is wrong too.
 *
 * The expected capacity decision is computed independently of the library, per micro-batch
 * (shared/docs/model.md): C = ceil(cf N k / E); `position` keeps an assignment (t, j) to
 * expert e when fewer than C assignments to e precede it in (token, slot) order; `probs`
 * when fewer than C assignments to e have a higher p_te or an equal p_te and come earlier
 * in (token, slot) order.
 *
 * VDIST_DISPATCH_CORRUPT=1 adds one to a single expected output value on world rank 0 so
 * the driver can show that a wrong element is reported and fails the run. */
#include <CUnit/CUnit.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/dist.h"
#include "parallel/parallel.h"
#include "tests/testutil.h"

/* ---------------------------------------------------------------- layouts */

/* Context and pipeline parallelism stay 1: the dispatcher runs inside one stage, and
 * this version trains with cp = pp = 1. dp and edp follow from the world size. */
struct layout {
    int world, tp, ep, etp;
    const char *order; /* NULL: the default */
    const char *name;  /* printed in the layout's line; no spaces */
};

static const struct layout layouts[] = {
    {1, 1, 1, 1, NULL, "serial"},
    {2, 1, 2, 1, NULL, "dp2/ep2"},
    {2, 2, 1, 2, NULL, "tp2/etp2"},
    {2, 2, 2, 1, NULL, "tp2/ep2-etp1"},
    {2, 2, 1, 1, NULL, "tp2/etp1-edp2"},
    {2, 1, 1, 2, NULL, "dp2/etp2"},
    {4, 2, 4, 1, NULL, "tp2-dp2/ep4"},
    {4, 4, 2, 2, NULL, "tp4/etp2-ep2"},
    {4, 2, 2, 2, NULL, "tp2-dp2/etp2-ep2"},
    {4, 1, 4, 1, NULL, "dp4/ep4"},
    {4, 2, 2, 1, "tp-cp-dp-ep-pp", "tp2-dp2/ep2-edp2@tp-cp-dp-ep-pp"},
    {8, 2, 8, 1, NULL, "tp2-dp4/ep8"},
    {8, 2, 4, 2, NULL, "tp2-dp4/etp2-ep4"},
    {8, 4, 8, 1, NULL, "tp4-dp2/ep8"},
    {8, 1, 4, 2, NULL, "dp8/etp2-ep4"},
    {8, 2, 2, 2, "tp-cp-dp-ep-pp", "tp2-dp4/etp2-ep2-edp2@tp-cp-dp-ep-pp"},
};
enum { NLAYOUTS = sizeof layouts / sizeof layouts[0] };

static int layouts_on(int world)
{
    int n = 0;
    for (int i = 0; i < NLAYOUTS; i++) n += layouts[i].world == world;
    return n;
}

/* The dispatchers, the all-to-all one with and without direct writes between the ranks of
 * this node (with them, every peer must take them: all ranks share this machine). */
enum { NDISP = 3 };
static const char *const dispatcher_names[NDISP] = {"alltoall", "alltoall-mpi", "allgather"};
static const enum model_dispatcher dispatchers[NDISP] = {
    MODEL_DISPATCH_ALLTOALL, MODEL_DISPATCH_ALLTOALL, MODEL_DISPATCH_ALLGATHER};
static const bool dispatch_direct[NDISP] = {true, false, false};

#define LINE_LAYOUT "dispatch: %s %s wrong %lld\n"
#define SUMMARY "dispatch: %d cases on %d ranks, total wrong %lld\n"

/* How the driver starts the MPI program: this executable under mpirun. */
static const struct tu_mpirun self = {"VDIST_DISPATCH_RANKS", "VDIST_DISPATCH_CORRUPT", 120};

/* ---------------------------------------------------------------- the model */

/* Small sizes valid for every layout above: H, G and V divisible by tp <= 4, E = 8 by
 * ep <= 8, F by etp <= 2. N = B T = 24 tokens per micro-batch, divisible by tp. */
enum { D = 16, E = 8, F = 8, H = 4, G = 4, V = 64, B = 3, T = 8, N = B * T };

/* ---------------------------------------------------------------- scenarios */

enum routing {
    R_ROUND,  /* round robin: slot j of token g to expert (g k + j) mod E */
    R_RANDOM, /* hashed, distinct experts per token */
    R_HOT,    /* every token to the same experts (3 and 6; k = 1: expert 7) */
    R_SKEW,   /* tokens held by odd world ranks to experts 0 (and 4); others round robin */
    R_HOME,   /* k = 1: every token to an expert of its own rank's EP coordinate */
};

struct scenario {
    const char *name;
    int k;
    enum routing routing;
    double cf; /* 0: dropless */
    enum model_drop_policy policy;
};

static const struct scenario scenarios[] = {
    {"k2-round-dropless", 2, R_ROUND, 0.0, MODEL_DROP_POSITION},
    {"k2-round-cf0.5-position", 2, R_ROUND, 0.5, MODEL_DROP_POSITION},
    {"k2-round-cf0.5-probs", 2, R_ROUND, 0.5, MODEL_DROP_PROBS},
    {"k2-random-dropless", 2, R_RANDOM, 0.0, MODEL_DROP_POSITION},
    {"k2-random-cf1-position", 2, R_RANDOM, 1.0, MODEL_DROP_POSITION},
    {"k2-random-cf1-probs", 2, R_RANDOM, 1.0, MODEL_DROP_PROBS},
    {"k2-hot-dropless", 2, R_HOT, 0.0, MODEL_DROP_POSITION},
    {"k2-hot-cf1-position", 2, R_HOT, 1.0, MODEL_DROP_POSITION},
    {"k2-hot-cf1-probs", 2, R_HOT, 1.0, MODEL_DROP_PROBS},
    {"k2-skew-dropless", 2, R_SKEW, 0.0, MODEL_DROP_POSITION},
    {"k2-skew-cf1-probs", 2, R_SKEW, 1.0, MODEL_DROP_PROBS},
    {"k1-home-dropless", 1, R_HOME, 0.0, MODEL_DROP_POSITION},
    {"k1-hot-dropless", 1, R_HOT, 0.0, MODEL_DROP_POSITION},
    {"k1-hot-cf1-position", 1, R_HOT, 1.0, MODEL_DROP_POSITION},
    {"k1-hot-cf1-probs", 1, R_HOT, 1.0, MODEL_DROP_PROBS},
    {"k1-skew-cf1-position", 1, R_SKEW, 1.0, MODEL_DROP_POSITION},
    {"k1-random-cf2-position", 1, R_RANDOM, 2.0, MODEL_DROP_POSITION},
};
enum { NSCEN = sizeof scenarios / sizeof scenarios[0] };

/* ---------------------------------------------------------------- checks and their counts */

enum check {
    C_ROWTOK, C_KEPT, C_STATS, C_OUT, C_MLOC, C_SEND, C_YRET, C_COUNTS, C_ROWS, C_XPERM,
    C_DM, C_DTOPK, NCHECK
};
static const char *const check_names[NCHECK] = {
    "row_token", "kept", "dropped/tokens_max", "out", "m_loc changed", "send plan",
    "y_ret", "counts_matrix", "rows/expert_off", "x_perm", "dm", "dtopk_w"};

struct tally {
    struct tu_tally t; /* wrong elements per check; t.where: "layout dispatcher scenario" */
    /* what the scenario exercised: dropped assignments (counted once per micro-batch),
     * ranks with no kept local slot (they send nothing), local experts that get no row */
    long long cover[3];
};

/* ---------------------------------------------------------------- exact values */

static uint64_t mix(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t x = a * 0x9E3779B97F4A7C15u ^ (b + 1) * 0xC2B2AE3D27D4EB4Fu ^
                 (c + 7) * 0x165667B19E3779F9u;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9u;
    x ^= x >> 29;
    return x;
}

/* The MoE input of global token g (replica N + token), column c. */
static long long m_value(int g, int c) { return 1 + c + (long long)D * g; }
/* Its upstream gradient: an integer in [-3, 3]. */
static long long dout_value(int g, int c)
{
    return (long long)(mix(11, (uint64_t)g, (uint64_t)c) % 7) - 3;
}
/* Weight of slot j: 1, 2 or 3. */
static long long w_value(int g, int j) { return 1 + (g + 2 * j) % 3; }

/* ---------------------------------------------------------------- one layout's context */

struct ctx {
    struct dist_grid grid;
    int dp, Ns, El;
    struct dist_grid_coords my;
    int *members, nmembers, my_index; /* the etp x ep group, group rank order */
};

/* The world rank holding token t of replica rep (sequence parallel: tp = t / Ns). */
static int holder_of(const struct ctx *cx, int rep, int t)
{
    struct dist_grid_coords c = {.tp = t / cx->Ns, .cp = 0, .dp = rep, .pp = 0};
    return dist_grid_rank_of(&cx->grid, DIST_GRID_ATTN, &c);
}

/* Routing of token t of replica rep: topk (k), probabilities (E). */
static void route(const struct ctx *cx, const struct scenario *sc, int rep, int t, int *topk,
                  float *probs)
{
    int const k = sc->k, g = rep * N + t;
    int const holder = holder_of(cx, rep, t);
    switch (sc->routing) {
    case R_ROUND:
        for (int j = 0; j < k; j++) topk[j] = (g * k + j) % E;
        break;
    case R_RANDOM: {
        int const e0 = (int)(mix(3, (uint64_t)g, 0) % E);
        topk[0] = e0;
        if (k > 1) topk[1] = (e0 + 1 + (int)(mix(3, (uint64_t)g, 1) % (E - 1))) % E;
        break;
    }
    case R_HOT:
        if (k == 1) topk[0] = E - 1;
        else topk[0] = 3, topk[1] = 6;
        break;
    case R_SKEW:
        if (holder % 2 == 1)
            for (int j = 0; j < k; j++) topk[j] = j * (E / 2);
        else
            for (int j = 0; j < k; j++) topk[j] = (g * k + j) % E;
        break;
    case R_HOME: {
        struct dist_grid_coords c;
        dist_grid_coords(&cx->grid, holder, &c);
        VD_CHECK(k == 1, "R_HOME routes one slot");
        topk[0] = c.ep * cx->El + t % cx->El;
        break;
    }
    }
    /* The router's top-k have the largest probabilities; on a 1/64 grid with ties. */
    for (int e = 0; e < E; e++)
        probs[e] = (float)(1 + (int)(mix(5, (uint64_t)g, (uint64_t)e) % 4)) / 64.0f;
    for (int j = 0; j < k; j++)
        probs[topk[j]] =
            (float)(40 - 8 * j + (int)(mix(5, (uint64_t)g, (uint64_t)topk[j]) % 4)) / 64.0f;
}

/* The micro-batch of replica rep: routing and the serial capacity decision. */
struct mb {
    int topk[N * 2];
    float probs[N * E];
    unsigned char kept[N * 2];
    long dropped, tokens_max;
};

static void micro_batch(const struct ctx *cx, const struct scenario *sc, int rep, struct mb *b)
{
    int const k = sc->k, S = N * k;
    for (int t = 0; t < N; t++) route(cx, sc, rep, t, b->topk + t * k, b->probs + t * E);
    long const C = sc->cf > 0.0 ? (long)ceil(sc->cf * (double)N * k / E) : S;
    long per_expert[E] = {0};
    b->dropped = 0;
    for (int s = 0; s < S; s++) {
        int const e = b->topk[s];
        float const p = b->probs[(s / k) * E + e];
        long before = 0;
        for (int s2 = 0; s2 < S; s2++) {
            if (s2 == s || b->topk[s2] != e) continue;
            float const p2 = b->probs[(s2 / k) * E + e];
            bool const earlier = sc->policy == MODEL_DROP_PROBS ? p2 > p || (p2 == p && s2 < s)
                                                                 : s2 < s;
            before += earlier;
        }
        b->kept[s] = sc->cf <= 0.0 || before < C;
        per_expert[e] += b->kept[s];
        b->dropped += !b->kept[s];
    }
    b->tokens_max = 0;
    for (int e = 0; e < E; e++)
        if (per_expert[e] > b->tokens_max) b->tokens_max = per_expert[e];
}

/* ---------------------------------------------------------------- one scenario */

struct bufs {
    float *out, *dout, *dm, *dtopk, *m_copy;
    unsigned char *seen; /* (dp N) */
    struct mb *mbs;      /* (dp) */
};

/* Rows of the expert block a rank may receive: every local slot of its etp x ep group
 * (the size of ba->x_perm). */
static size_t rows_max(const struct par_model *pm)
{
    return pm->shape.Ns * (size_t)pm->cfg.num_experts_per_tok * (size_t)pm->groups.etpep.size;
}

/* Global token index encoded by an x_perm row, or -1 when the row is not a valid row of m. */
static int decode_row(const struct ctx *cx, const float *row)
{
    float const v0 = row[0];
    if (!(v0 >= 1.0f) || v0 != floorf(v0)) return -1;
    long long const g = ((long long)v0 - 1) / D;
    if (g < 0 || g >= (long long)cx->dp * N) return -1;
    for (int c = 0; c < D; c++)
        if (row[c] != (float)m_value((int)g, c)) return -1;
    return (int)g;
}

/* Index of world rank r in my etp x ep group, or -1. */
static int member_index(const struct ctx *cx, int r)
{
    for (int i = 0; i < cx->nmembers; i++)
        if (cx->members[i] == r) return i;
    return -1;
}

/* Checks the expert block x_perm (both dispatchers): for each local expert exactly the
 * kept rows routed to it from the whole etp x ep group, each source's rows contiguous and
 * in increasing token order. */
static void check_x_perm(const struct ctx *cx, const struct scenario *sc,
                         const struct par_model *pm, const struct par_block_acts *ba,
                         struct bufs *bf, struct tally *ty)
{
    int const k = sc->k, Ng = cx->dp * N;
    size_t const A = rows_max(pm);
    size_t expect_total = 0;
    size_t *expect_n = calloc((size_t)cx->El, sizeof *expect_n);
    int *src_seen = calloc((size_t)cx->nmembers, sizeof *src_seen);
    VD_CHECK(expect_n && src_seen, "out of memory");
    for (int le = 0; le < cx->El; le++) {
        int const e = cx->my.ep * cx->El + le;
        for (int g = 0; g < Ng; g++) {
            int const rep = g / N, t = g % N;
            if (member_index(cx, holder_of(cx, rep, t)) < 0) continue;
            for (int j = 0; j < k; j++)
                if (bf->mbs[rep].kept[t * k + j] && bf->mbs[rep].topk[t * k + j] == e)
                    expect_n[le]++;
        }
        expect_total += expect_n[le];
    }
    if (ba->rows != expect_total)
        tu_wrong_at(&ty->t, C_ROWS, "rows %zu, expected %zu", ba->rows, expect_total);
    for (int le = 0; le <= cx->El; le++) {
        size_t want = 0;
        for (int i = 0; i < le; i++) want += expect_n[i];
        if (ba->expert_off[le] != want)
            tu_wrong_at(&ty->t, C_ROWS, "expert_off[%d] = %zu, expected %zu", le,
                        ba->expert_off[le], want);
    }
    /* Walk the blocks by the expected offsets, so a wrong offset does not hide the rows. */
    size_t r0 = 0;
    for (int le = 0; le < cx->El; le++) {
        int const e = cx->my.ep * cx->El + le;
        memset(bf->seen, 0, (size_t)Ng);
        memset(src_seen, 0, (size_t)cx->nmembers * sizeof *src_seen);
        int prev_src = -1, prev_g = -1;
        for (size_t r = r0; r < r0 + expect_n[le] && r < A; r++) {
            const float *row = ba->x_perm + r * D;
            int const g = decode_row(cx, row);
            if (g < 0) {
                tu_wrong_at(&ty->t, C_XPERM, "expert %d row %zu is not a row of m (first value %g)",
                            e, r, (double)row[0]);
                continue;
            }
            int const rep = g / N, t = g % N;
            int const src = member_index(cx, holder_of(cx, rep, t));
            bool routed = false;
            for (int j = 0; j < k; j++)
                routed |= bf->mbs[rep].kept[t * k + j] && bf->mbs[rep].topk[t * k + j] == e;
            if (src < 0 || !routed || bf->seen[g]) {
                tu_wrong_at(&ty->t, C_XPERM,
                            "expert %d row %zu holds token %d of replica %d (%s)", e, r, t, rep,
                            src < 0 ? "from outside the etp x ep group"
                                    : !routed ? "not routed to this expert, or dropped"
                                              : "a second time");
                continue;
            }
            bf->seen[g] = 1;
            if (src != prev_src) {
                if (src_seen[src])
                    tu_wrong_at(&ty->t, C_XPERM,
                                "expert %d row %zu: rows of source %d not contiguous", e, r, src);
                src_seen[src] = 1;
            } else if (g <= prev_g) {
                tu_wrong_at(&ty->t, C_XPERM,
                            "expert %d row %zu: token %d after token %d of the same source", e, r,
                            g, prev_g);
            }
            prev_src = src;
            prev_g = g;
        }
        r0 += expect_n[le];
        ty->cover[2] += expect_n[le] == 0;
    }
    free(expect_n);
    free(src_seen);
}

/* The all-to-all path's plan: send rows expert-major in (token, slot) order, and the
 * partial rows returned from every ETP rank of each expert that is not this rank (its
 * own stay in its expert block): the sent row from ETP rank 0, zeros from the others
 * (identity experts). */
static void check_a2a(const struct ctx *cx, const struct scenario *sc,
                      const struct par_block_acts *ba,
                      const struct mb *mine, const int *row_token, struct tally *ty)
{
    int const k = sc->k, Ns = cx->Ns, etp = cx->grid.dims.etp;
    size_t kept_local = 0;
    for (int r = 0; r < Ns; r++)
        for (int j = 0; j < k; j++) kept_local += mine->kept[row_token[r] * k + j];
    if (ba->send_rows != kept_local)
        tu_wrong_at(&ty->t, C_SEND, "send_rows %zu, expected %zu", ba->send_rows, kept_local);
    /* The expected send row of each kept local slot: expert-major, (token, slot) order. */
    int a = 0;
    for (int e = 0; e < E; e++)
        for (int r = 0; r < Ns; r++)
            for (int j = 0; j < k; j++) {
                int const s = row_token[r] * k + j;
                bool const kept = mine->kept[s];
                int const got = ba->slot_row[r * k + j];
                if (mine->topk[s] != e) continue;
                if (!kept) {
                    if (got != -1)
                        tu_wrong_at(&ty->t, C_SEND, "dropped slot (row %d, j %d) has send row %d",
                                    r, j, got);
                    continue;
                }
                if (got != a)
                    tu_wrong_at(&ty->t, C_SEND,
                                "slot (row %d, j %d) of expert %d: send row %d, expected %d", r,
                                j, e, got, a);
                else if (ba->send_slot[a] != r * k + j)
                    tu_wrong_at(&ty->t, C_SEND, "send_slot[%d] = %d, expected slot %d", a,
                                ba->send_slot[a], r * k + j);
                a++;
            }
    size_t const n = ba->send_rows < (size_t)Ns * k ? ba->send_rows : (size_t)Ns * k;
    for (size_t i = 0; i < n; i++) {
        int const slot = ba->send_slot[i];
        if (slot < 0 || slot >= Ns * k) {
            tu_wrong_at(&ty->t, C_YRET, "send_slot[%zu] = %d is not a local slot", i, slot);
            continue;
        }
        int const r = slot / k, e = mine->topk[row_token[r] * k + slot % k];
        for (int a2 = 0; a2 < etp; a2++) {
            if (a2 == cx->my.etp && e / cx->El == cx->my.ep) continue;
            const float *got = ba->y_ret + ((size_t)a2 * Ns * k + i) * D;
            for (int c = 0; c < D; c++) {
                float const want = a2 == 0 ? ba->m_loc[(size_t)r * D + c] : 0.0f;
                if (memcmp(&got[c], &want, sizeof want) != 0) {
                    tu_wrong_at(&ty->t, C_YRET, "send row %zu (local row %d, expert %d) "
                                "from ETP rank %d, column %d: %g, expected %g", i, r, e, a2, c,
                                (double)got[c], (double)want);
                    break;
                }
            }
        }
    }
}

/* counts_matrix against the micro-batches of every member of the etp x ep group. */
static void check_counts(const struct ctx *cx, const struct scenario *sc,
                         const struct par_block_acts *ba, const struct bufs *bf,
                         struct tally *ty)
{
    int const k = sc->k;
    for (int i = 0; i < cx->nmembers; i++) {
        struct dist_grid_coords c;
        dist_grid_coords(&cx->grid, cx->members[i], &c);
        const struct mb *b = &bf->mbs[c.dp];
        for (int e = 0; e < E; e++) {
            int want = 0;
            for (int t = c.tp * cx->Ns; t < (c.tp + 1) * cx->Ns; t++)
                for (int j = 0; j < k; j++) want += b->kept[t * k + j] && b->topk[t * k + j] == e;
            int const got = ba->counts_matrix[(size_t)i * E + e];
            if (got != want)
                tu_wrong_at(&ty->t, C_COUNTS,
                            "member %d (world rank %d) to expert %d: %d, expected %d", i,
                            cx->members[i], e, got, want);
        }
    }
}

static void run_scenario(const struct ctx *cx, const struct scenario *sc,
                         struct par_model *pm, struct par_block_acts *ba, struct bufs *bf,
                         struct tally *ty)
{
    int const k = sc->k, Ns = cx->Ns;
    pm->cfg.moe_capacity_factor = sc->cf;
    pm->cfg.moe_drop_policy = sc->policy;
    for (int rep = 0; rep < cx->dp; rep++) micro_batch(cx, sc, rep, &bf->mbs[rep]);
    const struct mb *mine = &bf->mbs[cx->my.dp];
    int const rep = cx->my.dp;

    /* The router's outputs and the MoE input of the local rows. */
    for (int r = 0; r < Ns; r++) {
        int const t = pm->row_token[r];
        if (t != cx->my.tp * Ns + r) {
            tu_wrong_at(&ty->t, C_ROWTOK, "row %d is token %d, expected %d", r, t,
                        cx->my.tp * Ns + r);
            continue;
        }
        int const g = rep * N + t;
        for (int j = 0; j < k; j++) {
            ba->rtopk[r * k + j] = mine->topk[t * k + j];
            ba->rtopk_w[r * k + j] = (float)w_value(g, j);
        }
        memcpy(ba->rprobs + (size_t)r * E, mine->probs + (size_t)t * E, E * sizeof(float));
        ba->rlse[r] = 0.0f;
        for (int c = 0; c < D; c++) {
            ba->m_loc[(size_t)r * D + c] = (float)m_value(g, c);
            bf->dout[(size_t)r * D + c] = (float)dout_value(g, c);
        }
    }
    memcpy(bf->m_copy, ba->m_loc, (size_t)Ns * D * sizeof(float));
    if (cx->my.tp == 0) ty->cover[0] += mine->dropped;
    bool any_kept = false;
    for (int s = cx->my.tp * Ns * k; s < (cx->my.tp + 1) * Ns * k; s++) any_kept |= mine->kept[s];
    ty->cover[1] += !any_kept;

    /* The decision. */
    memset(ba->kept, 0x5a, (size_t)Ns * k);
    par_moe_decide(pm, ba);
    for (int r = 0; r < Ns; r++)
        for (int j = 0; j < k; j++) {
            int const t = cx->my.tp * Ns + r;
            if (ba->kept[r * k + j] != mine->kept[t * k + j])
                tu_wrong_at(&ty->t, C_KEPT,
                            "token %d slot %d (expert %d, p %g): kept %d, expected %d", t, j,
                            mine->topk[t * k + j],
                            (double)mine->probs[t * E + mine->topk[t * k + j]],
                            ba->kept[r * k + j], mine->kept[t * k + j]);
        }
    if (ba->dropped != mine->dropped)
        tu_wrong_at(&ty->t, C_STATS, "dropped %ld, expected %ld", ba->dropped, mine->dropped);
    if (ba->tokens_max != mine->tokens_max)
        tu_wrong_at(&ty->t, C_STATS, "tokens_max %ld, expected %ld", ba->tokens_max,
                    mine->tokens_max);

    /* Forward. */
    size_t const A = rows_max(pm);
    tu_fill_nan(ba->x_perm, A * D);
    tu_fill_nan(ba->y_ret, (size_t)cx->grid.dims.etp * Ns * k * D);
    for (int s = 0; s < Ns * k; s++) ba->slot_row[s] = ba->send_slot[s] = -7;
    tu_fill_nan(bf->out, (size_t)Ns * D);
    par_moe_dispatch_forward(pm, ba, &pm->p.layers[0], bf->out);
    for (int r = 0; r < Ns; r++) {
        int const t = cx->my.tp * Ns + r, g = rep * N + t;
        for (int c = 0; c < D; c++) {
            long long want = 0;
            for (int j = 0; j < k; j++)
                if (mine->kept[t * k + j]) want += w_value(g, j) * m_value(g, c);
            float const got = bf->out[(size_t)r * D + c];
            if (tu_exact_differs(got, want))
                tu_wrong_at(&ty->t, C_OUT, "token %d column %d: %g, expected %lld", t, c,
                            (double)got, want);
        }
    }
    for (size_t i = 0; i < (size_t)Ns * D; i++)
        if (memcmp(&ba->m_loc[i], &bf->m_copy[i], sizeof(float)) != 0)
            tu_wrong_at(&ty->t, C_MLOC, "element %zu", i);
    check_x_perm(cx, sc, pm, ba, bf, ty);
    if (pm->cfg.moe_token_dispatcher_type == MODEL_DISPATCH_ALLTOALL) {
        int row_token[N];
        for (int r = 0; r < Ns; r++) row_token[r] = cx->my.tp * Ns + r;
        check_a2a(cx, sc, ba, mine, row_token, ty);
        check_counts(cx, sc, ba, bf, ty);
    }

    /* Backward. */
    tu_fill_nan(bf->dm, (size_t)Ns * D);
    tu_fill_nan(bf->dtopk, (size_t)Ns * k);
    par_moe_dispatch_backward(pm, ba, &pm->p.layers[0], &pm->g.layers[0], bf->dout, bf->dm,
                              bf->dtopk);
    for (int r = 0; r < Ns; r++) {
        int const t = cx->my.tp * Ns + r, g = rep * N + t;
        for (int c = 0; c < D; c++) {
            long long want = 0;
            for (int j = 0; j < k; j++)
                if (mine->kept[t * k + j]) want += w_value(g, j) * dout_value(g, c);
            float const got = bf->dm[(size_t)r * D + c];
            if (tu_exact_differs(got, want))
                tu_wrong_at(&ty->t, C_DM, "token %d column %d: %g, expected %lld", t, c,
                            (double)got, want);
        }
        long long dot = 0;
        for (int c = 0; c < D; c++) dot += dout_value(g, c) * m_value(g, c);
        for (int j = 0; j < k; j++) {
            long long const want = mine->kept[t * k + j] ? dot : 0;
            float const got = bf->dtopk[r * k + j];
            if (tu_exact_differs(got, want))
                tu_wrong_at(&ty->t, C_DTOPK, "token %d slot %d (%s): %g, expected %lld", t, j,
                            mine->kept[t * k + j] ? "kept" : "dropped", (double)got, want);
        }
    }
}

/* ---------------------------------------------------------------- one layout */

/* Runs every scenario of one layout with one dispatcher; returns the world's wrong count
 * and prints the layout's line (and, when wrong, the scenarios and checks that were). */
static long long run_layout(const struct layout *l, int disp)
{
    int const rank = dist_world_rank();
    struct ctx cx;
    if (dist_grid_init(&cx.grid, dist_world_size(), l->tp, 1, l->ep, l->etp, 1, l->order) < 0) {
        if (rank == 0) printf("layout %s refused: %s\n" LINE_LAYOUT, l->name, vd_err_msg(),
                              l->name, dispatcher_names[disp], 1LL);
        return 1;
    }
    dist_grid_coords(&cx.grid, rank, &cx.my);
    cx.dp = cx.grid.dims.dp;
    cx.Ns = N / l->tp;
    cx.El = E / l->ep;
    cx.nmembers = dist_grid_group_size(&cx.grid, DIST_ETPEP);
    cx.members = vd_calloc((size_t)cx.nmembers, sizeof *cx.members);
    dist_grid_group(&cx.grid, DIST_ETPEP, rank, cx.members, NULL, &cx.my_index);

    struct par_groups groups;
    par_groups_create(&groups, &cx.grid);
    struct model_layout lay;
    int const one_layer = 1;
    par_layout_from_grid(&lay, &cx.grid, rank, 1, &one_layer);

    struct bufs bf;
    bf.out = vd_alloc((size_t)cx.Ns * D * sizeof(float));
    bf.dout = vd_alloc((size_t)cx.Ns * D * sizeof(float));
    bf.dm = vd_alloc((size_t)cx.Ns * D * sizeof(float));
    bf.dtopk = vd_alloc((size_t)cx.Ns * 2 * sizeof(float));
    bf.m_copy = vd_alloc((size_t)cx.Ns * D * sizeof(float));
    bf.seen = vd_alloc((size_t)cx.dp * N);
    bf.mbs = vd_calloc((size_t)cx.dp, sizeof *bf.mbs);

    long long layout_wrong = 0, cover[3] = {0};
    char where[256];
    for (int kk = 1; kk <= 2; kk++) {
        struct model_config cfg;
        tu_model_config(&cfg, &(struct tu_model_sizes){V, D, F, 1, H, G, E, kk});
        cfg.moe_token_dispatcher_type = dispatchers[disp];
        struct par_model pm;
        struct par_options const opt = {.distributed_optimizer = false,
                                         .dispatch_direct = dispatch_direct[disp]};
        int const rc = dist_agree(dist_world(), par_model_init(&pm, &cfg, &lay, &groups, &opt,
                                                                B, T));
        if (rc < 0) {
            if (rank == 0) printf("layout %s: par_model_init refused: %s\n", l->name,
                                  vd_err_msg());
            layout_wrong++;
            continue;
        }
        pm.identity_experts = true;
        struct par_acts acts;
        par_acts_init(&acts, &pm);
        for (int si = 0; si < NSCEN; si++) {
            const struct scenario *sc = &scenarios[si];
            if (sc->k != kk) continue;
            snprintf(where, sizeof where, "%s %s %s", l->name, dispatcher_names[disp],
                     sc->name);
            struct tally ty = {.t = {.names = check_names, .nchecks = NCHECK, .where = where}};
            if (pm.groups.etpep.rank != cx.my_index ||
                pm.groups.etpep.size != cx.nmembers)
                tu_wrong_at(&ty.t, C_COUNTS, "etp x ep group rank %d of %d, grid says %d of %d",
                         pm.groups.etpep.rank, pm.groups.etpep.size, cx.my_index,
                         cx.nmembers);
            int const want_direct = dispatch_direct[disp] ? cx.nmembers - 1 : 0;
            if (pm.direct.peers != want_direct)
                tu_wrong_at(&ty.t, C_COUNTS, "direct writes to %d of %d peers, expected %d",
                         pm.direct.peers, cx.nmembers - 1, want_direct);
            run_scenario(&cx, sc, &pm, &acts.blocks[0], &bf, &ty);
            long long all[NCHECK], cov[3];
            layout_wrong += tu_tally_world(&ty.t, all);
            DIST_CHECK_MPI(MPI_Allreduce(ty.cover, cov, 3, MPI_LONG_LONG, MPI_SUM,
                                         MPI_COMM_WORLD));
            for (int c = 0; c < 3; c++) cover[c] += cov[c];
        }
        par_acts_free(&acts);
        par_model_free(&pm);
    }
    if (rank == 0) {
        printf("  %s %s: %d scenarios; over them %lld assignments dropped, %lld ranks with "
               "nothing to send, %lld local experts with no rows\n", l->name,
               dispatcher_names[disp], NSCEN, cover[0], cover[1], cover[2]);
        printf(LINE_LAYOUT, l->name, dispatcher_names[disp], layout_wrong);
        fflush(stdout);
    }
    free(bf.out);
    free(bf.dout);
    free(bf.dm);
    free(bf.dtopk);
    free(bf.m_copy);
    free(bf.seen);
    free(bf.mbs);
    free(cx.members);
    par_groups_free(&groups);
    return layout_wrong;
}

static int mpi_main(int argc, char **argv, int ranks)
{
    if (!tu_mpi_start(&self, &argc, &argv, ranks)) return 2;
    int const world = dist_world_size(), rank = dist_world_rank();
    const char *const corrupt = getenv(self.corrupt_env);
    tu_exact_corrupt(rank == 0 && corrupt && strcmp(corrupt, "1") == 0);
    long long total = 0;
    int cases = 0;
    for (int i = 0; i < NLAYOUTS; i++) {
        if (layouts[i].world != world) continue;
        for (int disp = 0; disp < NDISP; disp++) {
            total += run_layout(&layouts[i], disp);
            cases++;
        }
    }
    if (rank == 0) printf(SUMMARY, cases, world, total);
    fflush(stdout);
    dist_finalize();
    return total == 0 && cases > 0 ? 0 : 1;
}

/* ---------------------------------------------------------------- the driver */

/* Every layout on np ranks with both dispatchers: exit status 0, each layout's line with
 * wrong 0 and the summary with total wrong 0. */
static void expect_ranks(int np)
{
    char *out = NULL;
    int const status = tu_mpirun_self(&self, np, NULL, false, &out);
    bool ok = tu_exited_zero(status);
    CU_ASSERT(ok);
    char needle[256];
    for (int i = 0; i < NLAYOUTS; i++) {
        if (layouts[i].world != np) continue;
        for (int disp = 0; disp < NDISP; disp++) {
            snprintf(needle, sizeof needle, LINE_LAYOUT, layouts[i].name,
                     dispatcher_names[disp], 0LL);
            bool const found = out && strstr(out, needle);
            CU_ASSERT(found);
            ok = ok && found;
        }
    }
    snprintf(needle, sizeof needle, SUMMARY, NDISP * layouts_on(np), np, 0LL);
    bool const found = out && strstr(out, needle);
    CU_ASSERT(found);
    ok = ok && found;
    if (!ok)
        printf("\n--- mpirun -np %d (status %d):\n%s---\n", np, status,
               out ? out : "(no output)");
    free(out);
}

static void test_ranks_1(void) { expect_ranks(1); }
static void test_ranks_2(void) { expect_ranks(2); }
static void test_ranks_4(void) { expect_ranks(4); }
static void test_ranks_8(void) { expect_ranks(8); }

/* The harness itself: one corrupted expectation must be counted and fail the run. */
static void test_corruption_is_caught(void)
{
    char *out = NULL;
    int const status = tu_mpirun_self(&self, 2, NULL, true, &out);
    char needle[128];
    snprintf(needle, sizeof needle, SUMMARY, NDISP * layouts_on(2), 2, 1LL);
    bool const failed = status != -1 && !tu_exited_zero(status);
    bool const found = out && strstr(out, needle);
    CU_ASSERT(failed);
    CU_ASSERT(found);
    if (!failed || !found)
        printf("\n--- mpirun -np 2, corrupted (status %d; looked for \"%s\"):\n%s---\n", status,
               needle, out ? out : "(no output)");
    free(out);
}

int main(int argc, char **argv)
{
    const char *const ranks = getenv(self.ranks_env);
    if (ranks) return mpi_main(argc, argv, atoi(ranks));

    static const struct tu_test tests[] = {
        {"1 rank: every dispatcher, every routing, exact", test_ranks_1},
        {"2-rank layouts: every dispatcher, every routing, exact", test_ranks_2},
        {"4-rank layouts: every dispatcher, every routing, exact", test_ranks_4},
        {"8-rank layouts: every dispatcher, every routing, exact", test_ranks_8},
        {"a corrupted expectation fails the run", test_corruption_is_caught},
    };
    static const struct tu_suite suite = {
        .name = "token dispatcher (mpirun)",
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_UNTIMED,
    };
    return tu_cunit_main(&suite);
}
