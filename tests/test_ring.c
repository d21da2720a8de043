/* Context-parallel attention (parallel/attention.c: the ring, cp_comm_type=p2p, and the
 * all-gather exchange) against a float64 serial reference, on 2, 4 and 8 ranks: cp 2, 4
 * and 8, cp x tp, cp x dp, cp x tp x dp, and a dp2 control (cp 1 on each replica).
 *
 * One file, two programs. Started without VDIST_RING_RANKS, it is the CUnit driver: each
 * test runs this same executable under `mpirun -np N` with VDIST_RING_RANKS=N and checks
 * its exit status, every layout's line and rank 0's summary line (printing the whole
 * output on failure). Started with VDIST_RING_RANKS=N, it is the MPI program: for every
 * layout of the table on N ranks and both exchanges it builds the grid and a one-layer
 * model, writes the post-RoPE q, k, v of attention block 0 and the output gradient itself
 * (each rank its rows, in pm->cp_token order, and its tensor rank's heads), calls
 * par_attention_forward and par_attention_backward, gathers every rank's out, lse, dq, dk
 * and dv to rank 0 by (replica, global token, head), which counts the wrong elements and
 * prints `ring: <layout> <exchange> wrong W`, then a summary line; it exits non-zero when
 * any element was wrong. Results are filled with NaN first, so one nobody wrote is wrong,
 * and a (replica, token, head) written twice or never is a wrong row layout; each rank also
 * checks that its rows are the zigzag chunks of parallelism.md and that the calls left its
 * q, k and v as written.
 *
 * Two input scenarios per layout:
 *   uniform: q = k = 0, so every score is 0 and query t of a sequence gives each of the
 *     t + 1 keys it sees (global positions 0..t) the probability 1 / (t + 1). Exactly
 *     checkable: exp(lse) must be t + 1 (every (query chunk, key chunk) pair visited once,
 *     the causal pattern right: a pair missed, visited twice or masked wrongly changes the
 *     count), and with v integers in +-[1, 4], out (t + 1) must be the integer sum of v over
 *     keys 0..t of the same sequence, replica and kv head. Both within 1/32 of the integer,
 *     which the fp32 rounding of these small values never comes near. In the backward,
 *     dq = scale sum_u dS k_u and dk = scale sum_t dS q_t with k = q = 0 are exactly 0 for
 *     any output gradient (dout integers in [-2, 2]); dv_u = sum over the group's query
 *     heads and t >= u of dout_t / (t + 1) against the float64 reference.
 *   scored: q, k, v, dout on a 1/8 grid in [-1, 1], every result against the float64
 *     reference.
 * "Against the reference" means within TOL times the element's scale, the sum of the
 * magnitudes of the terms that form it. Inputs depend on the replica, so keys of another
 * replica, sequence or head are wrong values, not equal ones.
 *
 * VDIST_RING_CORRUPT=1 adds 1 to one element of one key row on the last world rank, as a
 * rank that used a stale or foreign block would; every layout must then report wrong
 * elements (uniform: dq is no longer 0; scored: everything that sees the key) and the run
 * must fail, which shows that the checks can fail. */
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

/* dp = world / (tp cp); no expert or pipeline parallelism (the seam sees neither). */
struct layout {
    int world, tp, cp;
    const char *name; /* printed in the layout's line; no spaces */
};

static const struct layout layouts[] = {
    {2, 1, 1, "dp2"},
    {2, 1, 2, "cp2"},
    {4, 1, 4, "cp4"},
    {4, 2, 2, "cp2-tp2"},
    {4, 1, 2, "cp2-dp2"},
    {8, 1, 8, "cp8"},
    {8, 2, 4, "cp4-tp2"},
    {8, 2, 2, "cp2-tp2-dp2"},
};
enum { NLAYOUTS = sizeof layouts / sizeof layouts[0] };

enum { NCOMM = 2 };
static const char *const comm_names[NCOMM] = {"p2p", "allgather"};

/* The lines the MPI program prints, the wrong count after each prefix. */
#define LINE_PREFIX "ring: %s %s wrong "
#define SUMMARY_PREFIX "ring: %d cases on %d ranks, total wrong "
#define LINE_LAYOUT LINE_PREFIX "%lld\n"
#define SUMMARY SUMMARY_PREFIX "%lld\n"

static const struct tu_mpirun self = {"VDIST_RING_RANKS", "VDIST_RING_CORRUPT", 120};

/* ---------------------------------------------------------------- the model */

/* B sequences of T positions: cp 8 leaves chunks of 2 positions, cp 4 x tp 2 rows that
 * split evenly. H = 2 G query heads (every kv head serves two), split over tp <= 2. */
enum { B = 2, T = 32, H = 4, G = 2, HD = 8, BT = B * T, D = H * HD, V = 64, E = 2, F = 8 };

/* The reference's tolerance, relative to an element's scale (the sum of the magnitudes of
 * its terms): fp32 rounding of a sum of n <= 2 T terms stays below n 2^-24 = 3.8e-6 of that
 * even when the blockwise kernels round every partial result and merge in fp32 (the naive
 * stand-in of model/flash_tmp.c stays near 2e-7); a block skipped, visited twice or masked
 * wrongly moves an element by a sizeable part of its scale (a chunk of 2 keys among 32
 * moves it by about 1/16). */
#define TOL 1e-5
/* How far exp(lse) and out (t + 1) may lie from their integers in the uniform scenario. */
#define INT_SLACK (1.0 / 32)

/* ---------------------------------------------------------------- inputs */

enum scenario { S_UNIFORM, S_SCORED, NSCEN };
static const char *const scenario_names[NSCEN] = {"uniform", "scored"};
enum input { IN_Q, IN_K, IN_V, IN_DOUT };

static uint64_t mix(uint64_t x)
{
    x = x * 0x9E3779B97F4A7C15u + 0x632BE59BD9B4E019u;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9u;
    x ^= x >> 29;
    x *= 0x94D049BB133111EBu;
    return x ^ (x >> 32);
}

/* Element x of input `in` of replica rep, global token tok (b T + position), head h (a
 * query head of q and dout, a kv head of k and v). */
static float input(enum scenario s, enum input in, int rep, int tok, int h, int x)
{
    uint64_t const r = mix(((((uint64_t)in * 4 + (uint64_t)rep) * BT + (uint64_t)tok) * H +
                            (uint64_t)h) * HD + (uint64_t)x);
    if (s == S_SCORED) return (float)((int)(r % 17) - 8) / 8.0f;
    switch (in) {
    case IN_Q:
    case IN_K:
        return 0.0f;
    case IN_V:
        return (float)((r >> 8) & 1 ? 1 + (int)(r % 4) : -1 - (int)(r % 4));
    case IN_DOUT:
        break;
    }
    return (float)((int)(r % 5) - 2);
}

/* ---------------------------------------------------------------- checks and their counts */

enum check { C_ROWS, C_INPUTS, C_LSE, C_OUT, C_DQ, C_DK, C_DV, NCHECK };
static const char *const check_names[NCHECK] = {"row layout", "inputs changed", "lse", "out",
                                                "dq", "dk", "dv"};

/* A case's wrong elements (tu_tally, its where "layout exchange scenario") and the largest
 * difference from the reference it saw. */
struct tally {
    struct tu_tally t;
    double worst; /* largest |got - reference| / scale of the compared elements */
};

/* Where an element lives, for the messages. */
struct elem {
    int rep, tok; /* replica, token b T + position */
    int head;     /* a query head, or a kv head when kv */
    bool kv;
    int col;      /* -1: a per-head value (lse) */
};

/* Counts element e of check c as wrong; `what` says how. */
static void wrong_elem(struct tally *ty, enum check c, const struct elem *e, const char *what)
{
    tu_wrong_at(&ty->t, c, "replica %d sequence %d position %d %s %d column %d: %s", e->rep,
                e->tok / T, e->tok % T, e->kv ? "kv head" : "head", e->head, e->col, what);
}

/* got within TOL scale of want. */
static void expect_close(struct tally *ty, enum check c, const struct elem *e, float got,
                         double want, double scale)
{
    double const err = fabs((double)got - want);
    if (scale > 0.0 && err / scale > ty->worst) ty->worst = err / scale;
    if (err <= TOL * scale) return;
    char what[128];
    snprintf(what, sizeof what, "%.9g, reference %.9g (scale %.3g)", (double)got, want, scale);
    wrong_elem(ty, c, e, what);
}

/* x (named name) within INT_SLACK of the integer n: the uniform scenario's exact checks. */
static void expect_integer(struct tally *ty, enum check c, const struct elem *e, double x,
                           long long n, const char *name)
{
    if (fabs(x - (double)n) <= INT_SLACK) return;
    char what[128];
    snprintf(what, sizeof what, "%s = %.9g, expected %lld", name, x, n);
    wrong_elem(ty, c, e, what);
}

/* got exactly 0 (-0 too). */
static void expect_zero(struct tally *ty, enum check c, const struct elem *e, float got)
{
    if (got == 0.0f) return;
    char what[64];
    snprintf(what, sizeof what, "%.9g, expected 0", (double)got);
    wrong_elem(ty, c, e, what);
}

/* ---------------------------------------------------------------- the float64 reference */

/* One replica's attention over whole sequences, its gradients, and each element's scale. */
struct reference {
    double out[BT * H * HD], out_s[BT * H * HD];
    double lse[BT * H];
    double dq[BT * H * HD], dq_s[BT * H * HD];
    double dk[BT * G * HD], dk_s[BT * G * HD];
    double dv[BT * G * HD], dv_s[BT * G * HD];
};

static void reference_compute(struct reference *r, enum scenario s, int rep)
{
    memset(r, 0, sizeof *r);
    double const sc = 1.0 / sqrt((double)HD);
    double p[T], dp[T];
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int const g = h / (H / G);
            for (int t = 0; t < T; t++) {
                int const tq = b * T + t;
                double mx = -INFINITY;
                for (int u = 0; u <= t; u++) {
                    double d = 0.0;
                    for (int x = 0; x < HD; x++)
                        d += (double)input(s, IN_Q, rep, tq, h, x) *
                             (double)input(s, IN_K, rep, b * T + u, g, x);
                    p[u] = d * sc;
                    mx = fmax(mx, p[u]);
                }
                double sum = 0.0;
                for (int u = 0; u <= t; u++) sum += exp(p[u] - mx);
                double const l = mx + log(sum);
                r->lse[tq * H + h] = l;
                for (int u = 0; u <= t; u++) p[u] = exp(p[u] - l);
                double *const o = r->out + ((size_t)tq * H + h) * HD;
                double *const os = r->out_s + ((size_t)tq * H + h) * HD;
                double delta = 0.0, delta_abs = 0.0;
                for (int x = 0; x < HD; x++) {
                    for (int u = 0; u <= t; u++) {
                        double const v = input(s, IN_V, rep, b * T + u, g, x);
                        o[x] += p[u] * v;
                        os[x] += p[u] * fabs(v);
                    }
                    double const dout = input(s, IN_DOUT, rep, tq, h, x);
                    delta += dout * o[x];
                    delta_abs += fabs(dout * o[x]);
                }
                for (int u = 0; u <= t; u++) {
                    dp[u] = 0.0;
                    double dp_abs = 0.0;
                    for (int x = 0; x < HD; x++) {
                        double const t_ = (double)input(s, IN_DOUT, rep, tq, h, x) *
                                          (double)input(s, IN_V, rep, b * T + u, g, x);
                        dp[u] += t_;
                        dp_abs += fabs(t_);
                    }
                    double const ds = p[u] * (dp[u] - delta) * sc;
                    double const ds_abs = p[u] * (dp_abs + delta_abs) * sc;
                    size_t const ku = ((size_t)(b * T + u) * G + g) * HD;
                    size_t const qt = ((size_t)tq * H + h) * HD;
                    for (int x = 0; x < HD; x++) {
                        double const q = input(s, IN_Q, rep, tq, h, x);
                        double const k = input(s, IN_K, rep, b * T + u, g, x);
                        double const dout = input(s, IN_DOUT, rep, tq, h, x);
                        r->dq[qt + x] += ds * k;
                        r->dq_s[qt + x] += ds_abs * fabs(k);
                        r->dk[ku + x] += ds * q;
                        r->dk_s[ku + x] += ds_abs * fabs(q);
                        r->dv[ku + x] += p[u] * dout;
                        r->dv_s[ku + x] += p[u] * fabs(dout);
                    }
                }
            }
        }
}

/* ---------------------------------------------------------------- one layout's context */

/* One row of a rank's results as gathered to rank 0: its global token, then out (Hl HD),
 * lse (Hl), dq (Hl HD), dk (Gl HD), dv (Gl HD). */
static size_t record_floats(int Hl, int Gl)
{
    return 1 + (size_t)Hl * (2 * HD + 1) + 2 * (size_t)Gl * HD;
}

/* Rank 0's view of every replica's results by (replica, token), NaN where none came. */
struct gathered {
    float *out, *lse, *dq, *dk, *dv; /* (dp, BT, H HD), (dp, BT, H), (dp, BT, H HD),
                                        (dp, BT, G HD) x2 */
    int *writes;                     /* (dp, BT, tp): records of each (replica, token, head
                                        slice) */
};

struct ctx {
    struct dist_grid grid;
    struct dist_grid_coords my;
    int dp, tp, Hl, Gl;
    size_t N, rec; /* rows of a rank; floats of one record */
    struct par_model pm;
    struct par_acts acts;
    float *datt, *dq, *dk, *dv, *kept; /* this rank's (N, ...); kept: q, k, v as written */
    float *mine, *all;                 /* records: this rank's (N rec), all (world N rec) */
    struct gathered gat;
    struct reference *ref;
};

/* Writes this rank's inputs of scenario s (its rows, its heads) into block 0 and
 * cx->datt, and keeps a copy of q, k, v. */
static void fill_inputs(struct ctx *cx, enum scenario s, bool corrupt)
{
    struct par_block_acts *const ba = &cx->acts.blocks[0];
    int const rep = cx->my.dp, tpr = cx->my.tp, Hl = cx->Hl, Gl = cx->Gl;
    size_t const nq = cx->N * (size_t)Hl * HD, nk = cx->N * (size_t)Gl * HD;
    for (size_t i = 0; i < cx->N; i++) {
        int const tok = cx->pm.cp_token[i];
        for (int j = 0; j < Hl; j++)
            for (int x = 0; x < HD; x++) {
                size_t const o = (i * (size_t)Hl + (size_t)j) * HD + (size_t)x;
                ba->q[o] = input(s, IN_Q, rep, tok, tpr * Hl + j, x);
                cx->datt[o] = input(s, IN_DOUT, rep, tok, tpr * Hl + j, x);
            }
        for (int j = 0; j < Gl; j++)
            for (int x = 0; x < HD; x++) {
                size_t const o = (i * (size_t)Gl + (size_t)j) * HD + (size_t)x;
                ba->k[o] = input(s, IN_K, rep, tok, tpr * Gl + j, x);
                ba->v[o] = input(s, IN_V, rep, tok, tpr * Gl + j, x);
            }
    }
    if (corrupt) ba->k[0] += 1.0f;
    memcpy(cx->kept, ba->q, nq * sizeof(float));
    memcpy(cx->kept + nq, ba->k, nk * sizeof(float));
    memcpy(cx->kept + nq + nk, ba->v, nk * sizeof(float));
}

/* The rows this rank holds: per sequence, chunks r and 2 cp - 1 - r of T / (2 cp)
 * positions (cp 1: the whole sequence), as parallelism.md defines them. */
static void check_rows(const struct ctx *cx, struct tally *ty)
{
    int const cp = cx->grid.dims.cp, r = cx->my.cp, Tl = T / cp, chunk = Tl / 2;
    if (cx->pm.shape.Tl != Tl || cx->N != (size_t)B * (size_t)Tl)
        tu_wrong_at(&ty->t, C_ROWS, "shape Tl %d, N %zu; expected %d, %d", cx->pm.shape.Tl,
                    cx->N, Tl, B * Tl);
    for (size_t i = 0; i < cx->N && i < (size_t)B * (size_t)Tl; i++) {
        int const b = (int)i / Tl, j = (int)i % Tl;
        int const pos = cp == 1     ? j
                        : j < chunk ? r * chunk + j
                                    : (2 * cp - 1 - r) * chunk + j - chunk;
        if (cx->pm.cp_token[i] != b * T + pos)
            tu_wrong_at(&ty->t, C_ROWS, "row %zu holds token %d, expected %d (sequence %d "
                        "position %d)", i, cx->pm.cp_token[i], b * T + pos, b, pos);
    }
}

/* The calls left q, k and v of the block as fill_inputs wrote them. */
static void check_inputs_kept(const struct ctx *cx, struct tally *ty)
{
    const struct par_block_acts *const ba = &cx->acts.blocks[0];
    size_t const nq = cx->N * (size_t)cx->Hl * HD, nk = cx->N * (size_t)cx->Gl * HD;
    const float *const now[3] = {ba->q, ba->k, ba->v};
    size_t const off[3] = {0, nq, nq + nk}, len[3] = {nq, nk, nk};
    for (int a = 0; a < 3; a++)
        if (memcmp(now[a], cx->kept + off[a], len[a] * sizeof(float)) != 0)
            tu_wrong_at(&ty->t, C_INPUTS, "%s", a == 0 ? "q" : a == 1 ? "k" : "v");
}

/* This rank's results as records, gathered to rank 0 in world rank order. */
static void gather_records(struct ctx *cx)
{
    const struct par_block_acts *const ba = &cx->acts.blocks[0];
    size_t const qs = (size_t)cx->Hl * HD, ks = (size_t)cx->Gl * HD;
    for (size_t i = 0; i < cx->N; i++) {
        float *p = cx->mine + i * cx->rec;
        *p++ = (float)cx->pm.cp_token[i];
        memcpy(p, ba->att + i * qs, qs * sizeof *p), p += qs;
        memcpy(p, ba->lse + i * (size_t)cx->Hl, (size_t)cx->Hl * sizeof *p), p += cx->Hl;
        memcpy(p, cx->dq + i * qs, qs * sizeof *p), p += qs;
        memcpy(p, cx->dk + i * ks, ks * sizeof *p), p += ks;
        memcpy(p, cx->dv + i * ks, ks * sizeof *p);
    }
    int const n = (int)(cx->N * cx->rec);
    DIST_CHECK_MPI(MPI_Gather(cx->mine, n, MPI_FLOAT, cx->all, n, MPI_FLOAT, 0, MPI_COMM_WORLD));
}

/* Rank 0: every record into its place by (replica, token, heads); a token out of range or
 * a (replica, token, tensor rank) that does not come exactly once is a wrong row layout. */
static void assemble(struct ctx *cx, struct tally *ty)
{
    struct gathered *const gt = &cx->gat;
    size_t const dp = (size_t)cx->dp, qs = (size_t)cx->Hl * HD, ks = (size_t)cx->Gl * HD;
    tu_fill_nan(gt->out, dp * BT * H * HD);
    tu_fill_nan(gt->lse, dp * BT * H);
    tu_fill_nan(gt->dq, dp * BT * H * HD);
    tu_fill_nan(gt->dk, dp * BT * G * HD);
    tu_fill_nan(gt->dv, dp * BT * G * HD);
    memset(gt->writes, 0, dp * BT * (size_t)cx->tp * sizeof *gt->writes);
    for (int w = 0; w < cx->grid.world; w++) {
        struct dist_grid_coords c;
        dist_grid_coords(&cx->grid, w, &c);
        for (size_t i = 0; i < cx->N; i++) {
            const float *p = cx->all + ((size_t)w * cx->N + i) * cx->rec;
            float const tokf = *p++;
            if (!(tokf >= 0.0f && tokf < (float)BT && tokf == floorf(tokf))) {
                tu_wrong_at(&ty->t, C_ROWS, "world rank %d row %zu: token %g", w, i, (double)tokf);
                continue;
            }
            size_t const at = (size_t)c.dp * BT + (size_t)tokf;
            gt->writes[at * (size_t)cx->tp + (size_t)c.tp]++;
            memcpy(gt->out + at * H * HD + (size_t)c.tp * qs, p, qs * sizeof *p), p += qs;
            memcpy(gt->lse + at * H + (size_t)c.tp * (size_t)cx->Hl, p,
                   (size_t)cx->Hl * sizeof *p), p += cx->Hl;
            memcpy(gt->dq + at * H * HD + (size_t)c.tp * qs, p, qs * sizeof *p), p += qs;
            memcpy(gt->dk + at * G * HD + (size_t)c.tp * ks, p, ks * sizeof *p), p += ks;
            memcpy(gt->dv + at * G * HD + (size_t)c.tp * ks, p, ks * sizeof *p);
        }
    }
    for (size_t at = 0; at < dp * BT; at++)
        for (int a = 0; a < cx->tp; a++)
            if (gt->writes[at * (size_t)cx->tp + (size_t)a] != 1)
                tu_wrong_at(&ty->t, C_ROWS, "replica %zu token %zu, tensor rank %d's heads: "
                            "%d records", at / BT, at % BT, a,
                            gt->writes[at * (size_t)cx->tp + (size_t)a]);
}

/* Rank 0: the gathered results of scenario s against the reference, replica by replica. */
static void check_results(struct ctx *cx, enum scenario s, struct tally *ty)
{
    const struct gathered *const gt = &cx->gat;
    struct reference *const r = cx->ref;
    bool const exact = s == S_UNIFORM;
    for (int rep = 0; rep < cx->dp; rep++) {
        reference_compute(r, s, rep);
        size_t const base = (size_t)rep * BT;
        for (int tok = 0; tok < BT; tok++) {
            int const t = tok % T;
            for (int h = 0; h < H; h++) {
                size_t const lh = (base + (size_t)tok) * H + (size_t)h, rh = (size_t)tok * H + h;
                struct elem e = {.rep = rep, .tok = tok, .head = h, .col = -1};
                if (exact) expect_integer(ty, C_LSE, &e, exp((double)gt->lse[lh]), t + 1,
                                          "exp(lse)");
                else expect_close(ty, C_LSE, &e, gt->lse[lh], r->lse[rh], 1.0 + fabs(r->lse[rh]));
                for (int x = 0; x < HD; x++) {
                    size_t const gi = lh * HD + (size_t)x, ri = rh * HD + (size_t)x;
                    e.col = x;
                    if (exact) {
                        long long sum = 0;
                        for (int u = 0; u <= t; u++)
                            sum += (long long)input(s, IN_V, rep, tok - t + u, h / (H / G), x);
                        expect_integer(ty, C_OUT, &e, (double)gt->out[gi] * (t + 1), sum,
                                       "out (t + 1)");
                        expect_zero(ty, C_DQ, &e, gt->dq[gi]);
                    } else {
                        expect_close(ty, C_OUT, &e, gt->out[gi], r->out[ri], r->out_s[ri]);
                        expect_close(ty, C_DQ, &e, gt->dq[gi], r->dq[ri], r->dq_s[ri]);
                    }
                }
            }
            for (int g = 0; g < G; g++)
                for (int x = 0; x < HD; x++) {
                    size_t const gi = ((base + (size_t)tok) * G + (size_t)g) * HD + (size_t)x;
                    size_t const ri = ((size_t)tok * G + (size_t)g) * HD + (size_t)x;
                    struct elem const e = {rep, tok, g, true, x};
                    if (exact) expect_zero(ty, C_DK, &e, gt->dk[gi]);
                    else expect_close(ty, C_DK, &e, gt->dk[gi], r->dk[ri], r->dk_s[ri]);
                    expect_close(ty, C_DV, &e, gt->dv[gi], r->dv[ri], r->dv_s[ri]);
                }
        }
    }
}

/* ---------------------------------------------------------------- one layout */

static void ctx_alloc(struct ctx *cx)
{
    size_t const N = cx->N, dp = (size_t)cx->dp;
    size_t const nq = N * (size_t)cx->Hl * HD, nk = N * (size_t)cx->Gl * HD;
    cx->datt = vd_alloc(nq * sizeof(float));
    cx->dq = vd_alloc(nq * sizeof(float));
    cx->dk = vd_alloc(nk * sizeof(float));
    cx->dv = vd_alloc(nk * sizeof(float));
    cx->kept = vd_alloc((nq + 2 * nk) * sizeof(float));
    cx->mine = vd_alloc(N * cx->rec * sizeof(float));
    memset(&cx->gat, 0, sizeof cx->gat);
    cx->all = NULL;
    cx->ref = NULL;
    if (dist_world_rank() != 0) return;
    cx->all = vd_alloc((size_t)cx->grid.world * N * cx->rec * sizeof(float));
    cx->gat.out = vd_alloc(dp * BT * H * HD * sizeof(float));
    cx->gat.lse = vd_alloc(dp * BT * H * sizeof(float));
    cx->gat.dq = vd_alloc(dp * BT * H * HD * sizeof(float));
    cx->gat.dk = vd_alloc(dp * BT * G * HD * sizeof(float));
    cx->gat.dv = vd_alloc(dp * BT * G * HD * sizeof(float));
    cx->gat.writes = vd_calloc(dp * BT * (size_t)cx->tp, sizeof(int));
    cx->ref = vd_alloc(sizeof *cx->ref);
}

static void ctx_free(struct ctx *cx)
{
    float *const bufs[] = {cx->datt, cx->dq, cx->dk, cx->dv, cx->kept, cx->mine, cx->all,
                           cx->gat.out, cx->gat.lse, cx->gat.dq, cx->gat.dk, cx->gat.dv};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(cx->gat.writes);
    free(cx->ref);
}

/* One scenario on the layout of cx: inputs, forward, backward, checks. The world's wrong
 * count; prints the scenario's line when any (rank 0). */
static long long run_scenario(struct ctx *cx, enum scenario s, const char *layout_comm,
                              bool corrupt, double *worst)
{
    char where[160];
    snprintf(where, sizeof where, "%s %s", layout_comm, scenario_names[s]);
    struct tally ty = {.t = {.names = check_names, .nchecks = NCHECK, .where = where}};
    struct par_block_acts *const ba = &cx->acts.blocks[0];
    size_t const nq = cx->N * (size_t)cx->Hl * HD, nk = cx->N * (size_t)cx->Gl * HD;
    fill_inputs(cx, s, corrupt);
    tu_fill_nan(ba->att, nq);
    tu_fill_nan(ba->lse, cx->N * (size_t)cx->Hl);
    tu_fill_nan(cx->dq, nq);
    tu_fill_nan(cx->dk, nk);
    tu_fill_nan(cx->dv, nk);
    par_attention_forward(&cx->pm, ba);
    par_attention_backward(&cx->pm, ba, cx->datt, cx->dq, cx->dk, cx->dv);
    check_inputs_kept(cx, &ty);
    gather_records(cx);
    if (dist_world_rank() == 0) {
        assemble(cx, &ty);
        check_results(cx, s, &ty);
        *worst = fmax(*worst, ty.worst);
    }
    long long all[NCHECK];
    return tu_tally_world(&ty.t, all);
}

/* Both scenarios on one layout with one exchange; returns the world's wrong count and
 * prints the layout's line. */
static long long run_layout(const struct layout *l, int comm, bool corrupt)
{
    int const rank = dist_world_rank();
    char layout_comm[96];
    snprintf(layout_comm, sizeof layout_comm, "%s %s", l->name, comm_names[comm]);
    struct ctx cx;
    if (dist_grid_init(&cx.grid, dist_world_size(), l->tp, l->cp, 1, 1, 1, NULL) < 0) {
        if (rank == 0) printf("layout %s refused: %s\n" LINE_LAYOUT, l->name, vd_err_msg(),
                              l->name, comm_names[comm], 1LL);
        return 1;
    }
    dist_grid_coords(&cx.grid, rank, &cx.my);
    struct par_groups groups;
    par_groups_create(&groups, &cx.grid);
    struct model_layout lay;
    int const one_layer = 1;
    par_layout_from_grid(&lay, &cx.grid, rank, 1, &one_layer);

    struct model_config cfg;
    tu_model_config(&cfg, &(struct tu_model_sizes){V, D, F, 1, H, G, E, 1});
    struct par_options const opt = {.cp_allgather = comm == 1};
    if (dist_agree(dist_world(), par_model_init(&cx.pm, &cfg, &lay, &groups, &opt, B, T)) < 0) {
        if (rank == 0) printf("layout %s: par_model_init refused: %s\n" LINE_LAYOUT, l->name,
                              vd_err_msg(), l->name, comm_names[comm], 1LL);
        par_groups_free(&groups);
        return 1;
    }
    par_acts_init(&cx.acts, &cx.pm);
    cx.dp = cx.grid.dims.dp;
    cx.tp = l->tp;
    cx.Hl = H / l->tp;
    cx.Gl = G / l->tp;
    cx.N = cx.pm.shape.N;
    cx.rec = record_floats(cx.Hl, cx.Gl);
    ctx_alloc(&cx);

    struct tally setup = {.t = {.names = check_names, .nchecks = NCHECK, .where = layout_comm}};
    check_rows(&cx, &setup);
    long long all[NCHECK];
    long long wrong = tu_tally_world(&setup.t, all);
    double worst = 0.0;
    for (int s = 0; s < NSCEN; s++)
        wrong += run_scenario(&cx, (enum scenario)s, layout_comm,
                              corrupt && rank == cx.grid.world - 1, &worst);
    if (rank == 0) {
        printf("  %s: largest difference from the reference %.2e of its scale (tolerance "
               "%.0e)\n", layout_comm, worst, TOL);
        printf(LINE_LAYOUT, l->name, comm_names[comm], wrong);
        fflush(stdout);
    }
    ctx_free(&cx);
    par_acts_free(&cx.acts);
    par_model_free(&cx.pm);
    par_groups_free(&groups);
    return wrong;
}

static int mpi_main(int argc, char **argv, int ranks)
{
    if (!tu_mpi_start(&self, &argc, &argv, ranks)) return 2;
    int const world = dist_world_size(), rank = dist_world_rank();
    const char *const corrupt_env = getenv(self.corrupt_env);
    bool const corrupt = corrupt_env && strcmp(corrupt_env, "1") == 0;
    long long total = 0;
    int cases = 0;
    for (int i = 0; i < NLAYOUTS; i++) {
        if (layouts[i].world != world) continue;
        for (int comm = 0; comm < NCOMM; comm++) {
            total += run_layout(&layouts[i], comm, corrupt);
            cases++;
        }
    }
    if (rank == 0) printf(SUMMARY, cases, world, total);
    fflush(stdout);
    dist_finalize();
    return total == 0 && cases > 0 ? 0 : 1;
}

/* ---------------------------------------------------------------- the driver */

/* The line of out that starts with `prefix` ends in a wrong count: 0 (clean), above 0
 * (corrupt). One assertion. */
static bool expect_count(const char *out, const char *prefix, bool corrupt)
{
    const char *const p = out ? strstr(out, prefix) : NULL;
    long long const w = p ? strtoll(p + strlen(prefix), NULL, 10) : -1;
    bool const good = corrupt ? w > 0 : w == 0;
    CU_ASSERT(good);
    if (!good)
        printf("\n  \"%s\" must be followed by %s, got %lld (-1: no such line)", prefix,
               corrupt ? "a count > 0" : "0", w);
    return good;
}

/* Every layout on np ranks with both exchanges (corrupt: one key element changed on the
 * last rank). Clean: exit status 0, every layout's line and the summary with wrong 0.
 * Corrupted: a failed run, every layout's line and the summary with a wrong count > 0. */
static void expect_ranks(int np, bool corrupt)
{
    char *out = NULL;
    int const status = tu_mpirun_self(&self, np, NULL, corrupt, &out);
    bool ok = corrupt ? status != -1 && !tu_exited_zero(status) : tu_exited_zero(status);
    CU_ASSERT(ok);
    char prefix[256];
    int cases = 0;
    for (int i = 0; i < NLAYOUTS; i++) {
        if (layouts[i].world != np) continue;
        for (int comm = 0; comm < NCOMM; comm++, cases++) {
            snprintf(prefix, sizeof prefix, LINE_PREFIX, layouts[i].name, comm_names[comm]);
            ok = expect_count(out, prefix, corrupt) && ok;
        }
    }
    snprintf(prefix, sizeof prefix, SUMMARY_PREFIX, cases, np);
    ok = expect_count(out, prefix, corrupt) && ok;
    if (!ok)
        printf("\n--- mpirun -np %d%s (status %d):\n%s---\n", np, corrupt ? ", corrupted" : "",
               status, out ? out : "(no output)");
    free(out);
}

static void test_ranks_2(void) { expect_ranks(2, false); }
static void test_ranks_4(void) { expect_ranks(4, false); }
static void test_ranks_8(void) { expect_ranks(8, false); }
static void test_corruption_is_caught(void) { expect_ranks(2, true); }

int main(int argc, char **argv)
{
    const char *const ranks = getenv(self.ranks_env);
    if (ranks) return mpi_main(argc, argv, atoi(ranks));

    static const struct tu_test tests[] = {
        {"2 ranks: dp2 control, cp2; ring and all-gather against the reference", test_ranks_2},
        {"4 ranks: cp4, cp2 x tp2, cp2 x dp2; ring and all-gather", test_ranks_4},
        {"8 ranks: cp8, cp4 x tp2, cp2 x tp2 x dp2; ring and all-gather", test_ranks_8},
        {"a corrupted key element is counted in every layout and fails the run",
         test_corruption_is_caught},
    };
    static const struct tu_suite suite = {
        .name = "context-parallel attention (mpirun)",
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_TIMED,
    };
    return tu_cunit_main(&suite);
}
