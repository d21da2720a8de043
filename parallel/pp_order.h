/* parallel/pp_order: the order in which a pipeline rank runs the forwards and backwards of
 * one step, as a pure function of the schedule and the sizes (no MPI, no state). The
 * executor walks par_pp_order's ops, receiving each op's input from the neighbouring stage
 * before it and sending its output after it; every schedule here is deadlock-free when the
 * sends do not block (tests/test_pp_schedule.c simulates every stage together).
 *
 * Sizes: pp pipeline ranks (stages), vpp virtual chunks per rank, m micro-batches a step.
 * The model is cut into G = pp vpp chunks; global chunk g = chunk pp + stage lives on rank
 * g mod pp as its virtual chunk g div pp (shared/docs/parallelism.md, "Pipeline
 * parallelism in detail"). F(g, mb) needs F(g - 1, mb); B(g, mb) needs F(g, mb) and
 * B(g + 1, mb).
 *
 * Error rule: par_pp_check returns 0 or VD_EINVAL with a message (base/base.h) for sizes
 * a schedule cannot run; the other functions take sizes par_pp_check accepted and a stage
 * in 0..pp-1, and abort (VD_CHECK) otherwise. */
#ifndef VDIST_PP_ORDER_H
#define VDIST_PP_ORDER_H

#include <stdbool.h>

/* 1f1b: one forward, one backward after a warm-up (vpp = 1). interleaved: Megatron-Core's
 * interleaved 1F1B over vpp > 1 chunks per rank. gpipe: all forwards, then all backwards
 * (any vpp). */
enum par_pp_schedule { PAR_PP_1F1B, PAR_PP_INTERLEAVED, PAR_PP_GPIPE };

/* One step of a pipeline rank: forward or backward of virtual chunk `chunk` (0..vpp-1 on
 * this rank; global model chunk g = chunk * pp + stage) for micro-batch `mb` (0..m-1). */
struct par_pp_op {
    bool backward;
    int chunk, mb;
};

/* "1f1b", "interleaved", "gpipe" ("?" for a value outside the enum). */
const char *par_pp_schedule_name(enum par_pp_schedule s);
/* The schedule called `name` (exactly one of the names above), or -1 (also for NULL). */
int par_pp_schedule_parse(const char *name);
/* The default for vpp: 1f1b when vpp == 1, interleaved otherwise. */
enum par_pp_schedule par_pp_schedule_default(int vpp);

/* 0, or VD_EINVAL with a message naming the values, the rule and what is allowed, when
 * schedule s cannot run pp stages, vpp chunks per rank and m micro-batches:
 *   - pp, vpp, m >= 1 (and 2 m vpp ops must fit an int);
 *   - 1f1b needs vpp == 1 (use interleaved or gpipe otherwise);
 *   - interleaved needs vpp > 1 (use 1f1b otherwise) and m a multiple of pp, as in
 *     Megatron-Core, which runs micro-batches in groups of pp (the message names the
 *     nearest multiples);
 *   - gpipe runs anything. */
int par_pp_check(enum par_pp_schedule s, int pp, int vpp, int m);

/* The 2 m vpp ops of pipeline rank `stage` in execution order, into ops[2 m vpp]; each
 * (chunk, mb) appears once as a forward and later once as a backward.
 *   1f1b: min(pp - stage - 1, m) forwards of warm-up, then one forward and one backward
 *     until the forwards run out, then the remaining backwards; micro-batches 0..m-1.
 *   interleaved: forward k (k = 0..m vpp - 1) is chunk (k mod pp vpp) div pp of
 *     micro-batch (k div pp vpp) pp + k mod pp: groups of pp micro-batches go through
 *     chunk 0, then chunk 1, ..., then the next group; backward k is the same with the
 *     chunks reversed (vpp - 1 - ...). Warm-up: (pp - stage - 1) 2 + (vpp - 1) pp forwards
 *     (at most m vpp), or all of them when m == pp (then all forwards, then all
 *     backwards); then one forward, one backward as in 1f1b.
 *   gpipe: all forwards, chunk by chunk (chunk 0 for micro-batches 0..m-1, then chunk 1,
 *     ...); then all backwards, chunks in reverse (chunk vpp - 1 first) and within a chunk
 *     micro-batches 0..m-1 again, so the first micro-batch's activations go first. */
void par_pp_order(enum par_pp_schedule s, int pp, int vpp, int m, int stage,
                  struct par_pp_op *ops);

/* Most micro-batches whose activations rank `stage` holds at once (forward done, backward
 * not yet) over the order: per virtual chunk into live[vpp] (each chunk's own maximum;
 * NULL: not wanted), and over all chunks together at any one time (the return value, which
 * can be less than the sum of live[]). How many activation sets the executor allocates. */
int par_pp_live_max(enum par_pp_schedule s, int pp, int vpp, int m, int stage, int *live);

/* Theoretical bubble fraction (idle time over step time with equal-time chunks, any
 * ratio of backward to forward time, and free communication), the step time of the orders
 * above: 1f1b and gpipe (pp - 1) / (m + pp - 1); interleaved (pp - 1) / (vpp m + pp - 1);
 * gpipe with vpp > 1 1 - vpp m / ((vpp - 1) max(m, pp) + m + pp - 1), which is
 * interleaved's when m >= pp (each chunk but the last waits for micro-batch 0 to come back
 * round the pp stages). */
double par_pp_bubble(enum par_pp_schedule s, int pp, int vpp, int m);

#endif
