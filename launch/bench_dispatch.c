/* `vdist bench dispatch`: the MoE token dispatcher's exchange (dispatch and combine, with
 * identity experts so no compute or load imbalance enters; the dispatcher's own time, so
 * the identity copy is not counted), forward and backward, against MPI_Alltoall moving the
 * same bytes on the same ranks. Rows are routed uniformly at random (k distinct experts
 * per token), so every rank sends about the same number of rows. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "launch/launch_internal.h"
#include "parallel/parallel.h"

/* splitmix64 step: a small deterministic generator for the routing. */
static uint64_t next_u64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* k distinct experts per local row, weights 1/k, probabilities uniform. */
static void random_routing(struct par_model *pm, struct par_block_acts *ba)
{
    int const E = pm->cfg.num_local_experts, k = pm->cfg.num_experts_per_tok;
    uint64_t seed = 12345 + (uint64_t)dist_world_rank() * 7919;
    for (size_t t = 0; t < pm->shape.Ns; t++) {
        for (int j = 0; j < k; j++) {
            int e;
            bool taken;
            do {
                e = (int)(next_u64(&seed) % (uint64_t)E);
                taken = false;
                for (int jj = 0; jj < j; jj++) taken |= ba->rtopk[t * k + jj] == e;
            } while (taken);
            ba->rtopk[t * k + j] = e;
            ba->rtopk_w[t * k + j] = 1.0f / (float)k;
        }
        for (int e = 0; e < E; e++) ba->rprobs[t * E + e] = 1.0f / (float)E;
    }
    size_t const n = pm->shape.Ns * (size_t)pm->cfg.hidden_size;
    for (size_t i = 0; i < n; i++) ba->m_loc[i] = (float)(i % 1000) * 1e-3f;
}

/* Seconds of the slowest rank for one call of fn, best of iters after a warm-up; fn
 * returns the seconds it counts (the dispatcher leaves out its experts). */
static double time_call(double (*fn)(void *), void *ctx, int iters)
{
    fn(ctx);
    double best = 1e30;
    for (int i = 0; i < iters; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double dt = fn(ctx);
        MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (dt < best) best = dt;
    }
    return best;
}

struct dispatch_ctx {
    struct par_model *pm;
    struct par_block_acts *ba;
    float *out, *dout, *dm, *dtopk;
};

/* The dispatcher's own time (ba->dispatch_s): dispatch and combine, not the experts. */
static double run_dispatch(void *p)
{
    struct dispatch_ctx *c = p;
    struct par_block_acts *ba = c->ba;
    ba->dispatch_s = 0.0;
    par_moe_dispatch_forward(c->pm, ba, &c->pm->p.layers[0], c->out);
    return ba->dispatch_s;
}

/* The same for the backward (after a forward). */
static double run_dispatch_backward(void *p)
{
    struct dispatch_ctx *c = p;
    struct par_block_acts *ba = c->ba;
    ba->dispatch_s = 0.0;
    par_moe_dispatch_backward(c->pm, ba, &c->pm->p.layers[0], &c->pm->g.layers[0], c->dout,
                              c->dm, c->dtopk);
    return ba->dispatch_s;
}

struct a2a_ctx {
    const struct dist_group *g;
    float *send, *recv;
    int block; /* floats per peer */
};

/* There and back, as the dispatcher's forward does. */
static double run_alltoall(void *p)
{
    struct a2a_ctx *c = p;
    double const t0 = MPI_Wtime();
    DIST_CHECK_MPI(MPI_Alltoall(c->send, c->block, MPI_FLOAT, c->recv, c->block, MPI_FLOAT, c->g->comm));
    DIST_CHECK_MPI(MPI_Alltoall(c->recv, c->block, MPI_FLOAT, c->send, c->block, MPI_FLOAT, c->g->comm));
    return MPI_Wtime() - t0;
}

int launch_bench_dispatch(const struct launch_config *c)
{
    struct dist_grid grid;
    FORWARD_IF(launch_layout_make(c, dist_world_size(), &grid));
    struct par_groups groups;
    par_groups_create(&groups, &grid);
    RETURN_IF(grid.dims.pp != 1, VD_EINVAL,
              "parallel.pp = %d: the dispatch benchmark measures one MoE layer on one stage; "
              "run it with parallel.pp = 1", grid.dims.pp);
    struct model_layout lay;
    int const one_layer = 1;
    par_layout_from_grid(&lay, &grid, dist_world_rank(), 1, &one_layer);
    struct model_config m = c->model;
    m.num_hidden_layers = 1;
    m.moe_capacity_factor = 0.0;
    struct par_options const opt = {.distributed_optimizer = false,
                                     .dispatch_direct = c->parallel.dispatch_direct};
    struct par_model pm;
    int rc = dist_agree(dist_world(), par_model_init(&pm, &m, &lay, &groups, &opt,
                                                     c->train.micro_batch, c->train.seq_len));
    if (rc < 0) {
        par_groups_free(&groups);
        return rc;
    }
    pm.identity_experts = true;
    struct par_acts acts;
    par_acts_init(&acts, &pm);
    struct par_block_acts *ba = &acts.blocks[0];
    random_routing(&pm, ba);
    par_moe_decide(&pm, ba);
    size_t const d = (size_t)m.hidden_size;
    size_t const rows_k = pm.shape.Ns * (size_t)m.num_experts_per_tok;
    float *out = vd_calloc(pm.shape.Ns * d, sizeof(float));
    float *dout = vd_calloc(pm.shape.Ns * d, sizeof(float));
    float *dm = vd_calloc(pm.shape.Ns * d, sizeof(float));
    float *dtopk = vd_calloc(rows_k, sizeof(float));
    for (size_t i = 0; i < pm.shape.Ns * d; i++) dout[i] = (float)(i % 777) * 1e-3f;
    struct dispatch_ctx dc = {&pm, ba, out, dout, dm, dtopk};
    int const iters = 10;
    double const t_disp = time_call(run_dispatch, &dc, iters);
    double const t_back = time_call(run_dispatch_backward, &dc, iters);

    /* The same bytes through MPI_Alltoall over the dispatcher's exchange group etp x ep:
     * the rows this rank sends (all-to-all: each kept slot to the etp ranks of its expert;
     * all-gather: every row to every other rank). */
    bool const ag = m.moe_token_dispatcher_type == MODEL_DISPATCH_ALLGATHER;
    const struct dist_group *g = &groups.etpep;
    double rows = ag ? (double)pm.shape.Ns * (g->size - 1)
                     : (double)ba->send_rows * grid.dims.etp;
    MPI_Allreduce(MPI_IN_PLACE, &rows, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    int const block = (int)(rows * (double)d / g->size) + 1;
    float *sbuf = vd_calloc((size_t)block * (size_t)g->size, sizeof(float));
    float *rbuf = vd_calloc((size_t)block * (size_t)g->size, sizeof(float));
    struct a2a_ctx ac = {g, sbuf, rbuf, block};
    double const t_a2a = g->size > 1 ? time_call(run_alltoall, &ac, iters) : 0.0;
    double const nbytes = 2.0 * (double)block * g->size * sizeof(float);
    if (dist_world_rank() == 0) {
        printf("bench dispatch: %s dispatcher, %d ranks, etp %d x ep %d, %zu rows of d = %zu per "
               "rank and micro-batch, k = %d\n",
               ag ? "allgather" : "alltoall", dist_world_size(), grid.dims.etp, grid.dims.ep,
               pm.shape.Ns, d, m.num_experts_per_tok);
        printf("bench dispatch: dispatch + combine %.3f ms (%.2f GB/s of rows moved there and "
               "back per rank)\n", t_disp * 1e3, nbytes / t_disp / 1e9);
        printf("bench dispatch: backward (gradients there and back) %.3f ms (%.2f GB/s)\n",
               t_back * 1e3, nbytes / t_back / 1e9);
        if (g->size > 1)
            printf("bench dispatch: MPI_Alltoall there and back, same bytes %.3f ms (%.2f GB/s); "
                   "dispatcher at %.0f%% of it forward, %.0f%% backward\n",
                   t_a2a * 1e3, nbytes / t_a2a / 1e9, 100.0 * t_a2a / t_disp,
                   100.0 * t_a2a / t_back);
        if (!ag && g->size > 1)
            printf("bench dispatch: forward writes directly to %d of %d peers "
                   "(parallel.dispatch_direct = %s)\n",
                   pm.direct.peers, g->size - 1, c->parallel.dispatch_direct ? "true" : "false");
    }
    free(dout);
    free(dm);
    free(dtopk);
    free(sbuf);
    free(rbuf);
    free(out);
    par_acts_free(&acts);
    par_model_free(&pm);
    par_groups_free(&groups);
    return 0;
}
