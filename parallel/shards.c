/* The one owner of the optimizer's shard geometry: how the flat buffers divide into the
 * dense and expert ranges, which part of each range a rank's distributed-optimizer shard
 * holds, and which rank's copy of a tensor counts (gradient norm) or is written (exports,
 * checkpoints). The optimizer step and ckpt/ both ask here. */
#include "parallel/parallel_internal.h"

static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }
static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

void par_plan_ranges(struct par_model *pm)
{
    size_t const pd = (size_t)pm->groups.dpcp.size, pe = (size_t)pm->groups.edp.size;
    size_t const dense = pm->tab.numel_dense, expert = pm->tab.numel - pm->tab.numel_dense;
    pm->dense = (struct par_range){.begin = 0, .len = (dense + pd - 1) / pd * pd};
    pm->expert = (struct par_range){.begin = pm->dense.len, .len = (expert + pe - 1) / pe * pe};
    size_t const shift = pm->dense.len - dense;
    for (int i = 0; i < pm->tab.count; i++)
        if (pm->tab.t[i].is_expert) pm->tab.t[i].offset += shift;
    pm->tab.numel = pm->expert.begin + pm->expert.len;
    bool const zero = pm->opt.distributed_optimizer;
    pm->dense.shard_len = zero ? pm->dense.len / pd : pm->dense.len;
    pm->expert.shard_len = zero ? pm->expert.len / pe : pm->expert.len;
    pm->dense.state_offset = 0;
    pm->expert.state_offset = pm->dense.shard_len;
    pm->state_len = pm->dense.shard_len + pm->expert.shard_len;
}

const struct dist_group *par_range_group(const struct par_model *pm, const struct par_range *r)
{
    return r == &pm->expert ? &pm->groups.edp : &pm->groups.dpcp;
}

size_t par_shard_begin(const struct par_model *pm, const struct par_range *r)
{
    size_t const rank = (size_t)par_range_group(pm, r)->rank;
    return r->begin + (pm->opt.distributed_optimizer ? rank * r->shard_len : 0);
}

bool par_tensor_piece(const struct model_tensor *t, size_t lo, size_t len, size_t *a,
                      size_t *b)
{
    *a = t->offset > lo ? t->offset - lo : 0;
    *b = t->offset + t->numel < lo + len ? t->offset + t->numel - lo : len;
    return t->offset + t->numel > lo && *a < *b;
}

bool par_moment_span(const struct par_model *pm, const struct model_tensor *t, size_t *ea,
                     size_t *eb, size_t *at)
{
    const struct par_range *r = t->is_expert ? &pm->expert : &pm->dense;
    size_t const lo = par_shard_begin(pm, r), hi = lo + r->shard_len;
    size_t const t0 = t->offset, t1 = t->offset + t->numel;
    if (t1 <= lo || t0 >= hi) return false;
    size_t const s0 = max_sz(t0, lo), s1 = min_sz(t1, hi);
    *ea = s0 - t0;
    *eb = s1 - t0;
    *at = r->state_offset + (s0 - lo);
    return true;
}

bool par_shard_lead(const struct par_model *pm, const struct model_tensor *t)
{
    int const shard_rank = t->group == MODEL_GROUP_TP ? pm->groups.tp.rank : pm->groups.etp.rank;
    return t->shard != MODEL_SHARD_NONE || shard_rank == 0;
}

bool par_owns_block(const struct par_model *pm, const struct model_tensor *t)
{
    int const replica = t->is_expert ? pm->groups.edp.rank : pm->groups.dpcp.rank;
    return replica == 0 && par_shard_lead(pm, t);
}

bool par_writes_block(const struct par_model *pm, int i)
{
    const struct model_tensor *t = &pm->tab.t[i];
    const struct dist_group *rep = t->is_expert ? &pm->groups.edp : &pm->groups.dpcp;
    return par_shard_lead(pm, t) && i % rep->size == rep->rank;
}
