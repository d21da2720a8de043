/* The pipeline orders of pp_order.h. Every schedule has the same shape over n = m vpp
 * forward units and n backward units: w forwards of warm-up, then forward w + j and
 * backward j alternating while forwards remain, then the last w backwards. The schedules
 * differ only in w and in which (chunk, mb) the k-th forward and k-th backward are, so op i
 * is computed directly from i and nothing is allocated. */
#include <limits.h>
#include <stddef.h>
#include <string.h>

#include "base/base.h"
#include "parallel/pp_order.h"

static const char *const schedule_names[] = {
    [PAR_PP_1F1B] = "1f1b",
    [PAR_PP_INTERLEAVED] = "interleaved",
    [PAR_PP_GPIPE] = "gpipe",
};
enum { NSCHEDULES = sizeof schedule_names / sizeof schedule_names[0] };

const char *par_pp_schedule_name(enum par_pp_schedule s)
{
    return (unsigned)s < NSCHEDULES ? schedule_names[s] : "?";
}

int par_pp_schedule_parse(const char *name)
{
    for (int s = 0; name && s < NSCHEDULES; s++)
        if (!strcmp(name, schedule_names[s])) return s;
    return -1;
}

enum par_pp_schedule par_pp_schedule_default(int vpp)
{
    return vpp == 1 ? PAR_PP_1F1B : PAR_PP_INTERLEAVED;
}

int par_pp_check(enum par_pp_schedule s, int pp, int vpp, int m)
{
    RETURN_IF((unsigned)s >= NSCHEDULES, VD_EINVAL,
              "pipeline schedule %d is unknown: use 1f1b, interleaved or gpipe", (int)s);
    const char *const name = schedule_names[s];
    RETURN_IF(pp < 1 || vpp < 1 || m < 1, VD_EINVAL,
              "pipeline schedule %s cannot run pp = %d stages, vpp = %d chunks per rank and "
              "m = %d micro-batches: each must be at least 1",
              name, pp, vpp, m);
    RETURN_IF((long long)m * vpp > INT_MAX / 2 || (long long)pp * vpp > INT_MAX, VD_EINVAL,
              "pipeline schedule %s cannot run pp = %d stages, vpp = %d chunks per rank and "
              "m = %d micro-batches: 2 m vpp steps and pp vpp chunks must stay below %d",
              name, pp, vpp, m, INT_MAX);
    switch (s) {
    case PAR_PP_1F1B:
        RETURN_IF(vpp != 1, VD_EINVAL,
                  "pipeline schedule 1f1b runs one chunk per rank, but vpp = %d: use "
                  "interleaved or gpipe for vpp > 1, or set vpp = 1",
                  vpp);
        return 0;
    case PAR_PP_INTERLEAVED: {
        RETURN_IF(vpp == 1, VD_EINVAL,
                  "pipeline schedule interleaved needs more than one chunk per rank, but "
                  "vpp = 1: use 1f1b (or gpipe) for vpp = 1, or set vpp > 1");
        if (m % pp == 0) return 0;
        long long const below = m / pp * pp, above = below + pp;
        if (below == 0)
            RETURN_ERR(VD_EINVAL,
                       "pipeline schedule interleaved runs micro-batches in groups of pp "
                       "(Megatron-Core's rule), but m = %d is not a multiple of pp = %d: use "
                       "m = %lld or another multiple of %d (or the gpipe schedule)",
                       m, pp, above, pp);
        RETURN_ERR(VD_EINVAL,
                   "pipeline schedule interleaved runs micro-batches in groups of pp "
                   "(Megatron-Core's rule), but m = %d is not a multiple of pp = %d: use "
                   "m = %lld or m = %lld, the nearest multiples of %d (or the gpipe schedule)",
                   m, pp, below, above, pp);
    }
    case PAR_PP_GPIPE: return 0;
    }
    return 0;
}

/* Forwards of warm-up on `stage`; n - w forward-backward pairs follow. */
static int warmup(enum par_pp_schedule s, int pp, int vpp, int m, int stage)
{
    int const n = m * vpp;
    switch (s) {
    case PAR_PP_1F1B: return pp - stage - 1 < m ? pp - stage - 1 : m;
    case PAR_PP_INTERLEAVED: {
        /* With m == pp Megatron-Core runs every forward first: a group is the whole step. */
        if (m == pp) return n;
        int const w = (pp - stage - 1) * 2 + (vpp - 1) * pp;
        return w < n ? w : n;
    }
    case PAR_PP_GPIPE: return n;
    }
    return n;
}

/* The k-th forward (or backward) unit's chunk and micro-batch. With vpp = 1 the
 * interleaved formula is micro-batch k of chunk 0, which is 1f1b's. */
static struct par_pp_op unit(enum par_pp_schedule s, int pp, int vpp, int m, int k,
                             bool backward)
{
    struct par_pp_op op = {.backward = backward};
    if (s == PAR_PP_GPIPE) {
        op.chunk = backward ? vpp - 1 - k / m : k / m;
        op.mb = k % m;
        return op;
    }
    int const group = pp * vpp, in_group = k % group;
    op.chunk = backward ? vpp - 1 - in_group / pp : in_group / pp;
    op.mb = k / group * pp + k % pp;
    return op;
}

/* Op i of the order (0 <= i < 2 n): the w forwards of warm-up, the pairs, the rest of the
 * backwards. */
static struct par_pp_op op_at(enum par_pp_schedule s, int pp, int vpp, int m, int w, int i)
{
    int const n = m * vpp;
    if (i < w) return unit(s, pp, vpp, m, i, false);
    if (i < 2 * n - w) {
        int const j = i - w;
        return j % 2 ? unit(s, pp, vpp, m, j / 2, true) : unit(s, pp, vpp, m, w + j / 2, false);
    }
    return unit(s, pp, vpp, m, i - n, true);
}

static void check_args(enum par_pp_schedule s, int pp, int vpp, int m, int stage)
{
    int const rc = par_pp_check(s, pp, vpp, m);
    VD_CHECK(rc == 0, "pipeline order asked for sizes its check refuses: %s", vd_err_msg());
    VD_CHECK(stage >= 0 && stage < pp, "pipeline stage %d outside 0..%d", stage, pp - 1);
}

void par_pp_order(enum par_pp_schedule s, int pp, int vpp, int m, int stage,
                  struct par_pp_op *ops)
{
    check_args(s, pp, vpp, m, stage);
    int const w = warmup(s, pp, vpp, m, stage);
    for (int i = 0; i < 2 * m * vpp; i++) ops[i] = op_at(s, pp, vpp, m, w, i);
}

/* The most micro-batches of virtual chunk `chunk` (all chunks: -1) held at once. */
static int live_of(enum par_pp_schedule s, int pp, int vpp, int m, int w, int chunk)
{
    int now = 0, most = 0;
    for (int i = 0; i < 2 * m * vpp; i++) {
        struct par_pp_op const op = op_at(s, pp, vpp, m, w, i);
        if (chunk >= 0 && op.chunk != chunk) continue;
        now += op.backward ? -1 : 1;
        if (now > most) most = now;
    }
    return most;
}

int par_pp_live_max(enum par_pp_schedule s, int pp, int vpp, int m, int stage, int *live)
{
    check_args(s, pp, vpp, m, stage);
    int const w = warmup(s, pp, vpp, m, stage);
    for (int c = 0; live && c < vpp; c++) live[c] = live_of(s, pp, vpp, m, w, c);
    return live_of(s, pp, vpp, m, w, -1);
}

double par_pp_bubble(enum par_pp_schedule s, int pp, int vpp, int m)
{
    check_args(s, pp, vpp, m, 0);
    if (s == PAR_PP_GPIPE && vpp > 1) {
        /* Micro-batch 0 comes back to stage 0 for its next chunk pp units after it left, so
         * each chunk but the last takes max(m, pp) units of the forwards (and backwards). */
        double const span = (double)(vpp - 1) * (m > pp ? m : pp) + m + pp - 1;
        return 1.0 - (double)m * vpp / span;
    }
    int const units = s == PAR_PP_INTERLEAVED ? vpp * m : m;
    return (double)(pp - 1) / (double)(units + pp - 1);
}
