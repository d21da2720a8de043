/* The pipeline orders of parallel/pp_order.c (no MPI). For every schedule, pp 1..8, vpp
 * 1..4 and m 1..16: the check accepts exactly what the schedule runs and its refusals name
 * the values; every accepted order holds each forward and backward once, forward first;
 * all stages simulated together finish (no deadlock), every message is received exactly
 * once, and the step takes the time the bubble formula says; the live counts agree with a
 * count made here and stay within the schedule's bound. Then orders written out by hand
 * from the definitions, and the simulator shown to catch deadlocks. */
#include <CUnit/Basic.h>
#include <CUnit/CUnit.h>
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "parallel/pp_order.h"
#include "tests/testutil.h"

enum {
    MAX_PP = 8,
    MAX_VPP = 4,
    MAX_M = 16,
    MAX_G = MAX_PP * MAX_VPP,
    MAX_OPS = 2 * MAX_M * MAX_VPP,
    NSCHEDULES = 3,
};
static const enum par_pp_schedule schedules[NSCHEDULES] = {PAR_PP_1F1B, PAR_PP_INTERLEAVED,
                                                           PAR_PP_GPIPE};

/* ---------------------------------------------------------------- problems */

/* Records a problem of the sizes' order (tests/testutil's sweep problems). */
__attribute__((format(printf, 5, 6))) static void problem(enum par_pp_schedule s, int pp,
                                                           int vpp, int m, const char *fmt,
                                                           ...)
{
    char what[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    tu_problem("%s pp %d vpp %d m %d: %s", par_pp_schedule_name(s), pp, vpp, m, what);
}

/* ---------------------------------------------------------------- an order's content */

/* Whether ops[0..n) holds every (chunk, mb) of vpp chunks and m micro-batches once as a
 * forward and once as a backward, the forward first; why not into why. */
static bool is_complete_order(const struct par_pp_op *ops, int n, int vpp, int m,
                              char *why, size_t cap)
{
    int fwd_at[MAX_VPP][MAX_M], bwd_at[MAX_VPP][MAX_M];
    memset(fwd_at, -1, sizeof fwd_at);
    memset(bwd_at, -1, sizeof bwd_at);
    if (n != 2 * m * vpp) {
        snprintf(why, cap, "%d ops, want %d", n, 2 * m * vpp);
        return false;
    }
    for (int i = 0; i < n; i++) {
        const struct par_pp_op *op = &ops[i];
        if (op->chunk < 0 || op->chunk >= vpp || op->mb < 0 || op->mb >= m) {
            snprintf(why, cap, "op %d is chunk %d mb %d, outside %d chunks and %d micro-batches",
                     i, op->chunk, op->mb, vpp, m);
            return false;
        }
        int *const at = op->backward ? &bwd_at[op->chunk][op->mb] : &fwd_at[op->chunk][op->mb];
        if (*at >= 0) {
            snprintf(why, cap, "%s of chunk %d mb %d at %d and again at %d",
                     op->backward ? "backward" : "forward", op->chunk, op->mb, *at, i);
            return false;
        }
        *at = i;
        if (op->backward && fwd_at[op->chunk][op->mb] < 0) {
            snprintf(why, cap, "backward of chunk %d mb %d at %d before its forward", op->chunk,
                     op->mb, i);
            return false;
        }
    }
    return true; /* n ops, none twice: every one is there */
}

/* Live activations counted from the order, the way the executor would allocate them: per
 * chunk the most held at once into live[vpp], the most held at once in all (returned). */
static int count_live(const struct par_pp_op *ops, int n, int vpp, int *live)
{
    int held[MAX_VPP] = {0}, total = 0, most = 0;
    for (int c = 0; c < vpp; c++) live[c] = 0;
    for (int i = 0; i < n; i++) {
        int const c = ops[i].chunk;
        if (ops[i].backward) {
            held[c]--;
            total--;
            continue;
        }
        if (++held[c] > live[c]) live[c] = held[c];
        if (++total > most) most = total;
    }
    return most;
}

/* ---------------------------------------------------------------- the simulator */

/* Every stage runs its ops in order, each once its inputs are there; sends never block.
 * Op times: forward tf, backward tb, messages free; an op starts when its stage is free
 * and its inputs are done, so the time is the ASAP schedule of the given orders. */
struct sim_result {
    bool malformed;         /* an op outside vpp chunks and m micro-batches: nothing ran */
    bool complete;          /* every op of every stage ran */
    int stuck_stage;        /* the first stage left with ops; -1 when complete */
    int stuck_at[MAX_PP];   /* each stage's next op when nothing could go on */
    long sends, bad_pairs;  /* messages sent; (src, dst, dir, chunk, mb) not sent once and
                               received once */
    long makespan;          /* when the last op ends */
};

/* Sends and receives per (direction, src, dst, global chunk of the sender, mb). */
static int sent[2][MAX_PP][MAX_PP][MAX_G][MAX_M], recvd[2][MAX_PP][MAX_PP][MAX_G][MAX_M];

static void simulate(int pp, int vpp, int m, const struct par_pp_op *const *ops,
                     const int *nops, int tf, int tb, struct sim_result *r)
{
    int const G = pp * vpp;
    long fwd_end[MAX_G][MAX_M], bwd_end[MAX_G][MAX_M], free_at[MAX_PP] = {0};
    int pos[MAX_PP] = {0};
    memset(r, 0, sizeof *r);
    memset(sent, 0, sizeof sent);
    memset(recvd, 0, sizeof recvd);
    for (int g = 0; g < G; g++)
        for (int mb = 0; mb < m; mb++) fwd_end[g][mb] = bwd_end[g][mb] = -1;
    for (int s = 0; s < pp; s++)
        for (int i = 0; i < nops[s]; i++)
            if (ops[s][i].chunk < 0 || ops[s][i].chunk >= vpp || ops[s][i].mb < 0 ||
                ops[s][i].mb >= m)
                r->malformed = true;
    if (r->malformed) return;

    for (bool progress = true; progress;) {
        progress = false;
        for (int s = 0; s < pp; s++)
            for (; pos[s] < nops[s]; pos[s]++) {
                const struct par_pp_op op = ops[s][pos[s]];
                int const g = op.chunk * pp + s, mb = op.mb, dir = op.backward;
                /* the op whose output this one needs from another chunk (-1: none) */
                int const from = op.backward ? (g < G - 1 ? g + 1 : -1) : g - 1;
                long const *const input = from < 0 ? NULL
                                          : op.backward ? &bwd_end[from][mb]
                                                        : &fwd_end[from][mb];
                if (input && *input < 0) break;
                if (op.backward && fwd_end[g][mb] < 0) break;
                long start = free_at[s];
                if (input && *input > start) start = *input;
                if (op.backward && fwd_end[g][mb] > start) start = fwd_end[g][mb];
                free_at[s] = start + (op.backward ? tb : tf);
                (op.backward ? bwd_end : fwd_end)[g][mb] = free_at[s];
                if (free_at[s] > r->makespan) r->makespan = free_at[s];
                if (from >= 0) recvd[dir][from % pp][s][from][mb]++;
                int const to = op.backward ? g - 1 : g + 1;
                if (to >= 0 && to < G) {
                    sent[dir][s][to % pp][g][mb]++;
                    r->sends++;
                }
                progress = true;
            }
    }
    r->complete = true;
    r->stuck_stage = -1;
    for (int s = 0; s < pp; s++) {
        r->stuck_at[s] = pos[s];
        if (pos[s] < nops[s] && r->complete) {
            r->complete = false;
            r->stuck_stage = s;
        }
    }
    for (int dir = 0; dir < 2; dir++)
        for (int src = 0; src < pp; src++)
            for (int dst = 0; dst < pp; dst++)
                for (int g = 0; g < G; g++)
                    for (int mb = 0; mb < m; mb++) {
                        int const want = g % pp == src && dst == (dir ? g + pp - 1 : g + 1) % pp &&
                                         (dir ? g > 0 : g < G - 1);
                        r->bad_pairs += sent[dir][src][dst][g][mb] != want ||
                                        recvd[dir][src][dst][g][mb] != want;
                    }
}

/* ---------------------------------------------------------------- every size */

/* Whether `name = value` stands in msg as a whole number (not inside "vpp = 12" when
 * asking for "pp = 1"). */
static bool says(const char *msg, const char *name, long long value)
{
    char want[64];
    int const len = snprintf(want, sizeof want, "%s = %lld", name, value);
    for (const char *at = strstr(msg, want); at; at = strstr(at + 1, want)) {
        bool const starts = at == msg || !(isalnum((unsigned char)at[-1]) || at[-1] == '_');
        if (starts && !isdigit((unsigned char)at[len])) return true;
    }
    return false;
}

/* A refusal of runnable-looking sizes: the message names the schedule and the values of
 * the rule broken, and for m the nearest multiples of pp that would run. */
static void check_refusal(enum par_pp_schedule s, int pp, int vpp, int m, int rc)
{
    const char *const msg = vd_err_msg();
    if (rc != VD_EINVAL) problem(s, pp, vpp, m, "refused with %d, want VD_EINVAL", rc);
    if (!strstr(msg, par_pp_schedule_name(s)))
        problem(s, pp, vpp, m, "refusal does not name the schedule: %s", msg);
    if (s == PAR_PP_1F1B && !(says(msg, "vpp", vpp) && strstr(msg, "interleaved") &&
                              strstr(msg, "gpipe")))
        problem(s, pp, vpp, m, "refusal does not say vpp and the way out: %s", msg);
    if (s == PAR_PP_INTERLEAVED && vpp == 1 && !(says(msg, "vpp", 1) && strstr(msg, "1f1b")))
        problem(s, pp, vpp, m, "refusal does not say vpp = 1 and 1f1b: %s", msg);
    if (s == PAR_PP_INTERLEAVED && vpp > 1) {
        int const below = m / pp * pp, above = below + pp;
        if (!says(msg, "m", m) || !says(msg, "pp", pp) || !says(msg, "m", above) ||
            (below > 0 && !says(msg, "m", below)))
            problem(s, pp, vpp, m, "refusal does not name m, pp and m = %d, %d: %s", below,
                    above, msg);
    }
}

/* Exact theoretical step time over the ideal with unit-time chunks, as the simulator
 * computes it, against par_pp_bubble. */
static void check_bubble(enum par_pp_schedule s, int pp, int vpp, int m,
                         const struct sim_result *r, int tf, int tb)
{
    double const work = (double)m * vpp * (tf + tb);
    double const got = 1.0 - work / (double)r->makespan;
    double const want = par_pp_bubble(s, pp, vpp, m);
    if (fabs(got - want) > 1e-12)
        problem(s, pp, vpp, m, "simulated bubble %.6f (step %ld, work %.0f, tf %d tb %d), "
                "formula %.6f", got, r->makespan, work, tf, tb, want);
}

/* The most activations a stage of s may hold: the warm-up's forwards and one more in the
 * steady state, or all. The bound is tight for every schedule, so it is asserted exactly. */
static int live_bound(enum par_pp_schedule s, int pp, int vpp, int m, int stage)
{
    int const n = m * vpp;
    switch (s) {
    case PAR_PP_1F1B: return pp - stage < m ? pp - stage : m;
    case PAR_PP_INTERLEAVED: {
        int const w = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1;
        return m == pp || w > n ? n : w;
    }
    case PAR_PP_GPIPE: return n;
    }
    return n;
}

static long interleaved_stages, chunk_sum_over;

static void check_sizes(enum par_pp_schedule s, int pp, int vpp, int m)
{
    bool const runs = s == PAR_PP_1F1B          ? vpp == 1
                      : s == PAR_PP_INTERLEAVED ? vpp > 1 && m % pp == 0
                                                : true;
    vd_err_clear();
    int const rc = par_pp_check(s, pp, vpp, m);
    if ((rc == 0) != runs) {
        problem(s, pp, vpp, m, "check returned %d (%s), want %s", rc, vd_err_msg(),
                runs ? "0" : "a refusal");
        return;
    }
    if (!runs) {
        check_refusal(s, pp, vpp, m, rc);
        return;
    }

    static struct par_pp_op orders[MAX_PP][MAX_OPS + 1];
    const struct par_pp_op *stage_ops[MAX_PP];
    int nops[MAX_PP];
    int const n = 2 * m * vpp;
    for (int st = 0; st < pp; st++) {
        struct par_pp_op *const ops = orders[st];
        for (int i = 0; i <= n; i++) ops[i] = (struct par_pp_op){true, -7, -7};
        par_pp_order(s, pp, vpp, m, st, ops);
        stage_ops[st] = ops;
        nops[st] = n;
        char why[256];
        if (ops[n].chunk != -7 || ops[n].mb != -7)
            problem(s, pp, vpp, m, "stage %d: order wrote past its %d ops", st, n);
        if (!is_complete_order(ops, n, vpp, m, why, sizeof why)) {
            problem(s, pp, vpp, m, "stage %d: %s", st, why);
            return;
        }

        int live[MAX_VPP + 1], mine[MAX_VPP];
        for (int c = 0; c <= vpp; c++) live[c] = -7;
        int const most = par_pp_live_max(s, pp, vpp, m, st, live);
        int const counted = count_live(ops, n, vpp, mine);
        if (most != counted || memcmp(live, mine, sizeof(int) * (size_t)vpp) || live[vpp] != -7)
            problem(s, pp, vpp, m, "stage %d: live_max %d (chunk 0: %d), counted %d (%d)", st,
                    most, live[0], counted, mine[0]);
        int const bound = live_bound(s, pp, vpp, m, st);
        if (most != bound)
            problem(s, pp, vpp, m, "stage %d holds %d, want exactly the bound %d", st, most,
                    bound);
        if (s == PAR_PP_INTERLEAVED) {
            int sum = 0;
            for (int c = 0; c < vpp; c++) sum += live[c];
            interleaved_stages++;
            chunk_sum_over += sum > most;
        }
    }

    struct sim_result r;
    /* Equal forward and backward, then the usual backward of twice the forward's time. */
    for (int tb = 1; tb <= 2; tb++) {
        simulate(pp, vpp, m, stage_ops, nops, 1, tb, &r);
        if (r.malformed || !r.complete) {
            problem(s, pp, vpp, m, "deadlock: stage %d stuck at op %d",
                    r.stuck_stage, r.stuck_stage >= 0 ? r.stuck_at[r.stuck_stage] : -1);
            return;
        }
        if (r.bad_pairs || r.sends != 2L * (pp * vpp - 1) * m)
            problem(s, pp, vpp, m, "%ld messages sent, want %ld; %ld (src, dst, dir, chunk, "
                    "mb) not sent and received exactly once", r.sends,
                    2L * (pp * vpp - 1) * m, r.bad_pairs);
        check_bubble(s, pp, vpp, m, &r, 1, tb);
    }
}

static void test_every_size(void)
{
    tu_problems_reset();
    interleaved_stages = chunk_sum_over = 0;
    long runnable = 0, refused = 0;
    double const t0 = tu_now_s();
    for (int k = 0; k < NSCHEDULES; k++)
        for (int pp = 1; pp <= MAX_PP; pp++)
            for (int vpp = 1; vpp <= MAX_VPP; vpp++)
                for (int m = 1; m <= MAX_M; m++) {
                    check_sizes(schedules[k], pp, vpp, m);
                    vd_err_clear();
                    if (par_pp_check(schedules[k], pp, vpp, m) == 0)
                        runnable++;
                    else
                        refused++;
                }
    printf("\n  %ld runnable, %ld refused (%.2f s); on %ld of %ld interleaved stages the "
           "chunks' live maxima sum to more than the most held at once ",
           runnable, refused, tu_now_s() - t0, chunk_sum_over, interleaved_stages);
    /* 1f1b: 8 pp x 16 m; gpipe: 8 x 4 x 16; interleaved: 3 vpp x the 42 (pp, m) with pp
     * dividing m (16 + 8 + 5 + 4 + 3 + 2 + 2 + 2). */
    CU_ASSERT_EQUAL(runnable, 128 + 512 + 126);
    TU_EXPECT_NO_PROBLEMS();
}

/* ---------------------------------------------------------------- by hand */

/* The order as text: "F3" / "B3" for micro-batch 3 when vpp == 1, else "F1.3" for chunk 1
 * of micro-batch 3. */
static const char *order_text(enum par_pp_schedule s, int pp, int vpp, int m, int stage)
{
    static char text[MAX_OPS * 8];
    struct par_pp_op ops[MAX_OPS];
    par_pp_order(s, pp, vpp, m, stage, ops);
    size_t used = 0;
    text[0] = '\0';
    for (int i = 0; i < 2 * m * vpp; i++) {
        char const kind = ops[i].backward ? 'B' : 'F';
        used += (size_t)(vpp == 1 ? snprintf(text + used, sizeof text - used, "%s%c%d",
                                             i ? " " : "", kind, ops[i].mb)
                                  : snprintf(text + used, sizeof text - used, "%s%c%d.%d",
                                             i ? " " : "", kind, ops[i].chunk, ops[i].mb));
    }
    return text;
}

static void test_orders_by_hand(void)
{
    /* 1f1b, pp 4, m 6: warm-up 3, 2, 1, 0 forwards. */
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_1F1B, 4, 1, 6, 0),
                           "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5");
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_1F1B, 4, 1, 6, 2),
                           "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5");
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_1F1B, 4, 1, 6, 3),
                           "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5");
    /* fewer micro-batches than the warm-up: all forwards first */
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_1F1B, 4, 1, 2, 0), "F0 F1 B0 B1");
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_1F1B, 1, 1, 3, 0), "F0 B0 F1 B1 F2 B2");

    /* interleaved, pp 2, vpp 2, m 4. Forward k: chunk (k mod 4) div 2, mb (k div 4) 2 +
     * k mod 2: (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) (1,3); backward k the same with
     * the chunk reversed: (1,0) (1,1) (0,0) (0,1) (1,2) (1,3) (0,2) (0,3). Stage 0 warms
     * up with (2 - 0 - 1) 2 + (2 - 1) 2 = 4 forwards, stage 1 with 2. */
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_INTERLEAVED, 2, 2, 4, 0),
                           "F0.0 F0.1 F1.0 F1.1 "
                           "F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 "
                           "B1.2 B1.3 B0.2 B0.3");
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_INTERLEAVED, 2, 2, 4, 1),
                           "F0.0 F0.1 "
                           "F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 "
                           "B0.2 B0.3");
    /* m == pp: every forward, then every backward */
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_INTERLEAVED, 2, 2, 2, 1),
                           "F0.0 F0.1 F1.0 F1.1 B1.0 B1.1 B0.0 B0.1");
    /* pp 2, vpp 3, m 4, stage 1: warm-up 0 + 2 2 = 4 of the 12 forwards. */
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_INTERLEAVED, 2, 3, 4, 1),
                           "F0.0 F0.1 F1.0 F1.1 "
                           "F2.0 B2.0 F2.1 B2.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 "
                           "F2.2 B2.2 F2.3 B2.3 "
                           "B1.2 B1.3 B0.2 B0.3");

    /* gpipe: chunk by chunk forwards, chunks reversed for the backwards, micro-batches
     * ascending in both. */
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_GPIPE, 2, 2, 3, 1),
                           "F0.0 F0.1 F0.2 F1.0 F1.1 F1.2 B1.0 B1.1 B1.2 B0.0 B0.1 B0.2");
    CU_ASSERT_STRING_EQUAL(order_text(PAR_PP_GPIPE, 3, 1, 3, 0), "F0 F1 F2 B0 B1 B2");

    /* Live counts: 1f1b pp 4 stage 0 m 6 holds F0..F3; interleaved pp 2 vpp 2 m 4 stage 0
     * holds 5 at once (4 of warm-up, 1 more in each pair), chunk 0 all 4 micro-batches at
     * once (F0.0 .. F0.3 before B0.0) and chunk 1 two. */
    int live[MAX_VPP];
    CU_ASSERT_EQUAL(par_pp_live_max(PAR_PP_1F1B, 4, 1, 6, 0, live), 4);
    CU_ASSERT_EQUAL(live[0], 4);
    CU_ASSERT_EQUAL(par_pp_live_max(PAR_PP_INTERLEAVED, 2, 2, 4, 0, live), 5);
    CU_ASSERT(live[0] == 4 && live[1] == 2);
    CU_ASSERT_EQUAL(par_pp_live_max(PAR_PP_INTERLEAVED, 2, 2, 4, 1, NULL), 3);
    CU_ASSERT_EQUAL(par_pp_live_max(PAR_PP_GPIPE, 2, 2, 3, 1, live), 6);
    CU_ASSERT(live[0] == 3 && live[1] == 3);
}

static void test_bubble_by_hand(void)
{
    CU_ASSERT_DOUBLE_EQUAL(par_pp_bubble(PAR_PP_1F1B, 4, 1, 8), 3.0 / 11.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(par_pp_bubble(PAR_PP_1F1B, 1, 1, 5), 0.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(par_pp_bubble(PAR_PP_INTERLEAVED, 4, 2, 8), 3.0 / 19.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(par_pp_bubble(PAR_PP_INTERLEAVED, 8, 4, 16), 7.0 / 71.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(par_pp_bubble(PAR_PP_GPIPE, 4, 1, 8), 3.0 / 11.0, 1e-15);
    /* gpipe over chunks: with m >= pp as interleaved; with m < pp each chunk but the last
     * waits for micro-batch 0 to come round: forwards take 4 + 2 + 3 units for 4 of work. */
    CU_ASSERT_DOUBLE_EQUAL(par_pp_bubble(PAR_PP_GPIPE, 4, 2, 8), 3.0 / 19.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(par_pp_bubble(PAR_PP_GPIPE, 4, 2, 2), 5.0 / 9.0, 1e-15);
}

static void test_names(void)
{
    for (int k = 0; k < NSCHEDULES; k++)
        CU_ASSERT_EQUAL(par_pp_schedule_parse(par_pp_schedule_name(schedules[k])),
                        (int)schedules[k]);
    CU_ASSERT_STRING_EQUAL(par_pp_schedule_name(PAR_PP_1F1B), "1f1b");
    CU_ASSERT_STRING_EQUAL(par_pp_schedule_name(PAR_PP_INTERLEAVED), "interleaved");
    CU_ASSERT_STRING_EQUAL(par_pp_schedule_name(PAR_PP_GPIPE), "gpipe");
    CU_ASSERT_EQUAL(par_pp_schedule_parse("1F1B"), -1);
    CU_ASSERT_EQUAL(par_pp_schedule_parse("interleave"), -1);
    CU_ASSERT_EQUAL(par_pp_schedule_parse(""), -1);
    CU_ASSERT_EQUAL(par_pp_schedule_parse(NULL), -1);
    CU_ASSERT_EQUAL(par_pp_schedule_default(1), PAR_PP_1F1B);
    CU_ASSERT_EQUAL(par_pp_schedule_default(2), PAR_PP_INTERLEAVED);
    CU_ASSERT_EQUAL(par_pp_schedule_default(4), PAR_PP_INTERLEAVED);
}

/* Sizes below 1 and the refusals' wording. */
static void test_refusals(void)
{
    static const int bad[][3] = {{0, 1, 4}, {2, 0, 4}, {2, 1, 0}, {-3, 1, 4}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        for (int k = 0; k < NSCHEDULES; k++) {
            int const pp = bad[i][0], vpp = bad[i][1], m = bad[i][2];
            CU_ASSERT_EQUAL(par_pp_check(schedules[k], pp, vpp, m), VD_EINVAL);
            const char *const msg = vd_err_msg();
            CU_ASSERT(says(msg, "pp", pp) && says(msg, "vpp", vpp) && says(msg, "m", m) &&
                      strstr(msg, "at least 1"));
        }
    CU_ASSERT_EQUAL(par_pp_check(PAR_PP_GPIPE, 2, 1 << 20, 1 << 20), VD_EINVAL);
    CU_ASSERT_EQUAL(par_pp_check((enum par_pp_schedule)7, 2, 1, 4), VD_EINVAL);
    CU_ASSERT(strstr(vd_err_msg(), "unknown") != NULL);

    CU_ASSERT_EQUAL(par_pp_check(PAR_PP_INTERLEAVED, 4, 2, 6), VD_EINVAL);
    const char *const msg = vd_err_msg();
    printf("\n  e.g. %s ", msg);
    CU_ASSERT(says(msg, "m", 6) && says(msg, "pp", 4) && says(msg, "m", 4) && says(msg, "m", 8));
    CU_ASSERT(!says(msg, "m", 0));
    CU_ASSERT_EQUAL(par_pp_check(PAR_PP_INTERLEAVED, 4, 2, 3), VD_EINVAL);
    CU_ASSERT(says(vd_err_msg(), "m", 4) && !says(vd_err_msg(), "m", 0));
}

/* ---------------------------------------------------------------- the simulator itself */

static bool parse_ops(const char *text, struct par_pp_op *ops, int *n)
{
    *n = 0;
    for (const char *p = text; *p;) {
        if (*p == ' ') {
            p++;
            continue;
        }
        int chunk, mb, used;
        char kind;
        if (sscanf(p, "%c%d.%d%n", &kind, &chunk, &mb, &used) != 3 || *n >= MAX_OPS)
            return false;
        ops[(*n)++] = (struct par_pp_op){kind == 'B', chunk, mb};
        p += used;
    }
    return true;
}

/* Runs the simulator on orders given as text, one string per stage ("F0.1 B0.1 ..."). */
static void simulate_text(int pp, int vpp, int m, const char *const *text,
                          struct sim_result *r)
{
    static struct par_pp_op orders[MAX_PP][MAX_OPS];
    const struct par_pp_op *ops[MAX_PP];
    int nops[MAX_PP];
    for (int s = 0; s < pp; s++) {
        CU_ASSERT_FATAL(parse_ops(text[s], orders[s], &nops[s]));
        ops[s] = orders[s];
    }
    simulate(pp, vpp, m, ops, nops, 1, 1, r);
}

static void test_simulator_finds_deadlocks(void)
{
    struct sim_result r;
    char why[256];
    struct par_pp_op ops[MAX_OPS];
    int n;

    /* 1f1b pp 2 m 2 as it is: both stages finish, 2 messages each way. */
    simulate_text(2, 1, 2, (const char *const[]){"F0.0 F0.1 B0.0 B0.1", "F0.0 B0.0 F0.1 B0.1"},
                  &r);
    CU_ASSERT(r.complete && r.stuck_stage == -1 && r.sends == 4 && r.bad_pairs == 0);
    CU_ASSERT_EQUAL(r.makespan, 6); /* (m + pp - 1) (tf + tb) */

    /* Stage 0 with a backward moved before its forward: nothing runs anywhere. */
    simulate_text(2, 1, 2, (const char *const[]){"B0.0 F0.0 F0.1 B0.1", "F0.0 B0.0 F0.1 B0.1"},
                  &r);
    CU_ASSERT(!r.complete && r.stuck_stage == 0 && r.stuck_at[0] == 0 && r.stuck_at[1] == 0);
    CU_ASSERT(r.bad_pairs > 0);

    /* Each stage waits on the other, though each order alone is complete: stage 0's B0
     * needs stage 1's B0, which comes after stage 1's F1, which needs stage 0's F1. */
    const char *const cross[2] = {"F0.0 B0.0 F0.1 B0.1", "F0.1 F0.0 B0.0 B0.1"};
    for (int s = 0; s < 2; s++) {
        CU_ASSERT_FATAL(parse_ops(cross[s], ops, &n));
        CU_ASSERT(is_complete_order(ops, n, 1, 2, why, sizeof why));
    }
    simulate_text(2, 1, 2, cross, &r);
    CU_ASSERT(!r.complete && r.stuck_stage == 0 && r.stuck_at[0] == 1 && r.stuck_at[1] == 0);

    /* Interleaved pp 2 vpp 2 m 2 with stage 1 running chunk 1 before chunk 0 of mb 0: its
     * F1.0 (global chunk 3) needs global chunk 2 on stage 0, which needs stage 1's F0.0. */
    simulate_text(2, 2, 2,
                  (const char *const[]){"F0.0 F0.1 F1.0 F1.1 B1.0 B1.1 B0.0 B0.1",
                                        "F1.0 F0.0 F0.1 F1.1 B1.0 B1.1 B0.0 B0.1"},
                  &r);
    CU_ASSERT(!r.complete && r.stuck_at[1] == 0 && r.stuck_at[0] == 2);

    /* The order checker: a repeated forward, a backward first, a missing op, a stray
     * chunk; the simulator refuses the stray chunk without running. */
    static const char *const broken[] = {"F0.0 F0.0 B0.0 B0.1", "B0.0 F0.0 F0.1 B0.1",
                                         "F0.0 F0.1 B0.0", "F0.0 F1.1 B0.0 B1.1"};
    for (size_t i = 0; i < sizeof broken / sizeof broken[0]; i++) {
        CU_ASSERT_FATAL(parse_ops(broken[i], ops, &n));
        CU_ASSERT(!is_complete_order(ops, n, 1, 2, why, sizeof why));
    }
    simulate_text(2, 1, 2, (const char *const[]){broken[3], "F0.0 B0.0 F0.1 B0.1"}, &r);
    CU_ASSERT(r.malformed && !r.complete);
}

int main(void)
{
    static const struct tu_test tests[] = {
        {"names, parsing and the default", test_names},
        {"refusals of sizes below 1 and their wording", test_refusals},
        {"orders and live counts written out by hand", test_orders_by_hand},
        {"bubble fractions by hand", test_bubble_by_hand},
        {"the simulator catches deadlocks and broken orders", test_simulator_finds_deadlocks},
        {"every schedule, pp 1..8, vpp 1..4, m 1..16: check, order, simulation, live",
         test_every_size},
    };
    static const struct tu_suite suite = {
        .name = "pipeline schedules",
        .tests = tests,
        .ntests = sizeof tests / sizeof tests[0],
        .timing = TU_TIMED,
        .program = "test_pp_schedule",
    };
    return tu_cunit_main(&suite);
}
