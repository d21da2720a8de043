/* The training loop: layout, data, weights, the step (micro-batches, optimizer), logging
 * and metrics, the benchmark's report, export. */
#include <cblas.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dist/dist.h"
#include "launch/launch_internal.h"
#include "parallel/parallel.h"

double launch_measure_sgemm_gflops(void)
{
    int const n = 2048; /* large enough that OpenBLAS reaches its asymptotic rate */
    float *a = vd_alloc((size_t)n * n * sizeof(float));
    float *b = vd_alloc((size_t)n * n * sizeof(float));
    float *c = vd_alloc((size_t)n * n * sizeof(float));
    for (size_t i = 0; i < (size_t)n * n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    double best = 0.0;
    for (int rep = 0; rep < 3; rep++) {
        double const t0 = omp_get_wtime();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f,
                    c, n);
        double const gf = 2.0 * n * n * n / (omp_get_wtime() - t0) / 1e9;
        if (rep > 0 && gf > best) best = gf; /* the first call warms caches and threads */
    }
    free(a);
    free(b);
    free(c);
    return best;
}

static void format_duration(char *out, size_t cap, double seconds)
{
    long const s = seconds > 0 ? (long)(seconds + 0.5) : 0;
    if (s >= 3600) snprintf(out, cap, "%ldh%02ldm", s / 3600, s / 60 % 60);
    else if (s >= 60) snprintf(out, cap, "%ldm%02lds", s / 60, s % 60);
    else snprintf(out, cap, "%lds", s);
}

static double mib(size_t nbytes) { return (double)nbytes / (1024.0 * 1024.0); }

/* Parameters, gradients, AdamW moments (whole or sharded), reduced-gradient shards,
 * the activation sets of the micro-batches in flight and scratch of this rank. */
static size_t plan_nbytes(const struct par_model *pm, size_t act_nbytes)
{
    size_t const f = sizeof(float);
    size_t const shards = pm->opt.distributed_optimizer ? pm->state_len : 0;
    return 2 * pm->tab.numel * f + (2 * pm->state_len + shards) * f + act_nbytes +
           pm->scratch_nbytes;
}

/* One line per number a user plans memory with. */
static void print_plan(const struct launch_config *c, const struct par_model *pm,
                       size_t act_nbytes,
                       int threads,
                       double peak, bool peak_measured)
{
    size_t total = 0, active = 0;
    model_param_counts(&c->model, &total, &active);
    size_t const pbytes = pm->tab.numel * sizeof(float);
    size_t const sbytes = pm->state_len * sizeof(float);
    printf("vdist: %d rank(s) x %d thread(s); model %zu parameters (%.2f M), %zu active per "
           "token (%.2f M)\n",
           dist_world_size(), threads, total, total / 1e6, active, active / 1e6);
    printf("memory plan per rank: parameters %.1f MiB, gradients %.1f MiB, AdamW state %.1f MiB%s, "
           "reduced-gradient shards %.1f MiB, activations %.1f MiB, scratch %.1f MiB, total %.1f MiB\n",
           mib(pbytes), mib(pbytes), mib(2 * sbytes),
           pm->opt.distributed_optimizer ? " (sharded)" : "",
           mib(pm->opt.distributed_optimizer ? sbytes : 0), mib(act_nbytes),
           mib(pm->scratch_nbytes), mib(plan_nbytes(pm, act_nbytes)));
    if (pm->groups.etpep.size > 1 && c->model.moe_token_dispatcher_type == MODEL_DISPATCH_ALLTOALL)
        printf("dispatch: rank 0 writes directly to %d of its %d etp x ep peers (%s)\n",
               pm->direct.peers, pm->groups.etpep.size - 1,
               c->parallel.dispatch_direct ? "same node, allowed by the kernel; MPI for the rest"
                                           : "parallel.dispatch_direct = false");
    printf("MFU peak: %.1f GFLOP/s per rank (%s)\n", peak,
           peak_measured ? "fp32 SGEMM 2048^3 measured now on this rank's threads"
                         : "train.peak_gflops");
}

/* One step's figures: the schedule's losses and per-layer statistics, the gradient norm. */
struct step_stats {
    double loss, lm, aux, z, grad_norm;
    int nlayers;
    const struct par_layer_stats *layers; /* (nlayers), owned by the schedule */
    double pipe_s, wait_s; /* this rank's forwards and backwards; blocked on pp receives */
};

/* Where a step's micro-batches come from: sequence (s GB + m mb + j) mod n_seq. */
struct step_batches {
    const launch_tokens *tok;
    int step, global_batch, micro_batch, seq_len;
};

static void fill_micro_batch(void *ctx, int m, int *inputs, int *targets)
{
    const struct step_batches *b = ctx;
    size_t const nseq = launch_tokens_nseq(b->tok), T = (size_t)b->seq_len;
    for (int j = 0; j < b->micro_batch; j++) {
        size_t const seq = ((size_t)b->step * b->global_batch + (size_t)m * b->micro_batch + j) % nseq;
        launch_tokens_sequence(b->tok, seq, inputs + (size_t)j * T, targets + (size_t)j * T);
    }
}

/* One optimizer step: the schedule runs the step's micro-batches, then the update. */
static double train_step(struct par_model *pm, struct par_schedule *sched,
                         const launch_tokens *tok, const struct launch_config *c, int step,
                         float lr, struct step_stats *out)
{
    struct step_batches sb = {.tok = tok, .step = step, .global_batch = c->train.global_batch,
                              .micro_batch = c->train.micro_batch, .seq_len = c->train.seq_len};
    struct par_batches const batches = {.fill = fill_micro_batch, .ctx = &sb,
                                        .n_micro = c->train.global_batch / c->train.micro_batch};
    struct par_step_stats st;
    par_schedule_step(sched, pm, &batches, &st);
    struct par_hparams const hp = {.lr = lr, .beta1 = (float)c->train.beta1,
                                   .beta2 = (float)c->train.beta2, .eps = (float)c->train.eps,
                                   .weight_decay = (float)c->train.weight_decay,
                                   .clip = (float)c->train.clip};
    double const t_opt = vd_trace_now();
    out->grad_norm = par_optimizer_step(pm, &hp);
    vd_trace_span("optimizer", t_opt, vd_trace_now(), "optimizer step %d", step + 1);
    out->lm = st.lm;
    out->aux = st.aux;
    out->z = st.z;
    out->nlayers = st.nlayers;
    out->layers = st.layers;
    out->pipe_s = st.step_s;
    out->wait_s = st.wait_s;
    out->loss = out->lm + out->aux + out->z;
    return out->loss;
}

static void write_metrics(FILE *f, int step, const struct step_stats *s, float lr, double ms,
                          double tps, double mfu)
{
    /* the step's MoE figures over its layers (every layer has the same assignments) */
    double dropped = 0.0, tmax = 0.0, tmean = 0.0, margin = -1.0;
    for (int l = 0; l < s->nlayers; l++) {
        double const m = s->layers[l].margin;
        if (m >= 0.0 && (margin < 0.0 || m < margin)) margin = m;
        dropped += s->layers[l].dropped_frac / s->nlayers;
        tmax = fmax(tmax, s->layers[l].tokens_max);
        tmean += s->layers[l].tokens_mean / s->nlayers;
    }
    json_t *o = json_pack("{s:i, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f}",
                          "step", step, "loss", s->loss, "lm_loss", s->lm, "aux_loss", s->aux,
                          "z_loss", s->z, "grad_norm", s->grad_norm, "lr", (double)lr,
                          "step_ms", ms, "tokens_per_s", tps, "mfu", mfu, "dropped_frac",
                          dropped, "tokens_per_expert_max", tmax,
                          "tokens_per_expert_mean", tmean);
    json_t *layers = json_array();
    for (int l = 0; l < s->nlayers; l++) {
        const struct par_layer_stats *ls = &s->layers[l];
        json_array_append_new(layers, json_pack("{s:i, s:f, s:f, s:f, s:f, s:f}", "layer", l,
                                                "tokens_per_expert_max", ls->tokens_max,
                                                "tokens_per_expert_mean", ls->tokens_mean,
                                                "dropped_frac", ls->dropped_frac,
                                                "dispatch_ms", ls->dispatch_ms,
                                                "decision_margin", ls->margin));
    }
    json_object_set_new(o, "decision_margin", json_real(margin));
    json_object_set_new(o, "moe_layers", layers);
    char *line = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    fprintf(f, "%s\n", line);
    fflush(f);
    free(line);
    json_decref(o);
}

/* With data.path empty, the embedded synthetic dataset at the model's vocabulary, made
 * once by rank 0 under runs/ (written to a temporary name, then renamed). */
static int default_data(const struct launch_config *c, char *path, size_t cap)
{
    struct launch_synth syn;
    launch_synth_defaults(&syn);
    syn.vocab = c->model.vocab_size;
    if (syn.branch > syn.vocab) syn.branch = syn.vocab;
    snprintf(path, cap, "runs/synth-v%d.bin", syn.vocab);
    int rc = 0;
    if (dist_world_rank() == 0) {
        double floor_nats = 0.0;
        struct stat sb;
        if (mkdir("runs", 0755) != 0 && errno != EEXIST)
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot create directory runs/ for "
                            "the synthetic dataset (set data.path)");
        else if (stat(path, &sb) == 0)
            rc = launch_synth_floor(&syn, &floor_nats);
        else
            rc = launch_synth_write(&syn, path, &floor_nats);
        if (rc == 0)
            printf("data.path is empty: training on the embedded synthetic dataset %s "
                   "(entropy floor %.4f nats/token)\n", path, floor_nats);
    }
    return dist_agree(dist_world(), rc);
}

/* Every rank opens the data and the weights; failures are agreed on before any step. */
static int open_inputs(const struct launch_config *c, struct par_model *pm, launch_tokens **tok)
{
    char path[LAUNCH_PATH_MAX];
    snprintf(path, sizeof path, "%s", c->data.path);
    if (path[0] == '\0') FORWARD_IF(default_data(c, path, sizeof path));
    int rc = launch_tokens_open(tok, path, c->data.dtype, c->model.vocab_size, c->train.seq_len);
    if (rc == 0 && c->train.init_from[0]) rc = ckpt_load_hf(pm, c->train.init_from);
    return dist_agree(dist_world(), rc);
}

/* The export directory exists (made with its parents) and is writable. */
static int make_export_dir(const char *dir)
{
    FORWARD_IF(vd_make_dirs(dir));
    RETURN_IF(access(dir, W_OK) != 0, VD_EIO, "train.export_to = %s is not writable: %s", dir,
              strerror(errno));
    return 0;
}

/* Before training: the export directory exists and is writable, so no run is lost to a
 * typo in its path. */
static int check_export_dir(const struct launch_config *c)
{
    int const rc = c->train.export_to[0] && dist_world_rank() == 0 ? make_export_dir(c->train.export_to) : 0;
    return dist_agree(dist_world(), rc);
}

/* Writes model.safetensors then config.json; if the second fails the first is removed, so
 * the directory never holds weights without their config. */
static int export_model(const struct launch_config *c, const struct par_model *pm)
{
    char weights[LAUNCH_PATH_MAX + 32], config[LAUNCH_PATH_MAX + 32];
    snprintf(weights, sizeof weights, "%s/model.safetensors", c->train.export_to);
    snprintf(config, sizeof config, "%s/config.json", c->train.export_to);
    int rc = ckpt_export_hf(pm, weights);
    if (dist_world_rank() == 0 && rc == 0) {
        rc = launch_config_write_hf(&c->model, config);
        if (rc < 0) unlink(weights);
        else printf("exported %s and %s\n", weights, config);
    }
    return dist_agree(dist_world(), rc);
}

/* ---------------------------------------------------------------- checkpoints */

static bool want_checkpoint(const struct launch_config *c, int done)
{
    if (!c->ckpt.dir[0]) return false;
    return done == c->train.steps || (c->ckpt.interval > 0 && done % c->ckpt.interval == 0);
}

/* A checkpoint in flight (ckpt.async) and what it cost the steps. */
struct ckpt_state {
    ckpt_pending *pending;
    long pending_step;
    double blocked_s; /* time the training loop waited on checkpoints */
    int saves;
};

/* Finishes the save in flight, if any, then prunes (rank 0). */
static int finish_checkpoint(const struct launch_config *c, struct ckpt_state *cs)
{
    if (!cs->pending) return 0;
    double const t0 = vd_trace_now();
    int rc = ckpt_save_finish(cs->pending);
    cs->pending = NULL;
    double const t1 = vd_trace_now();
    cs->blocked_s += t1 - t0;
    vd_trace_span("checkpoint", t0, t1, "ckpt_save_finish step %ld", cs->pending_step);
    if (rc == 0 && dist_world_rank() == 0) rc = ckpt_prune(c->ckpt.dir, c->ckpt.keep);
    rc = dist_agree(dist_world(), rc);
    if (rc == 0 && dist_world_rank() == 0)
        printf("checkpoint %s/step_%08ld complete\n", c->ckpt.dir, cs->pending_step);
    return rc;
}

/* Saves after `done` steps: synchronously, or (ckpt.async) by starting a background write
 * that the next checkpoint or the end of training finishes. */
static int save_checkpoint(const struct launch_config *c, const struct par_model *pm,
                           const struct dist_grid *grid, int done, size_t nseq,
                           struct ckpt_state *cs)
{
    FORWARD_IF(finish_checkpoint(c, cs));
    char *config = launch_config_to_json(c);
    char layout[256];
    const struct dist_grid_dims *d = &grid->dims;
    snprintf(layout, sizeof layout,
             "{\"world\":%d,\"tp\":%d,\"cp\":%d,\"dp\":%d,\"pp\":%d,\"etp\":%d,\"ep\":%d,"
             "\"edp\":%d,\"order\":\"%s\",\"distributed_optimizer\":%s}",
             grid->world, d->tp, d->cp, d->dp, d->pp, d->etp, d->ep, d->edp, grid->order,
             pm->opt.distributed_optimizer ? "true" : "false");
    /* where the run continues: the next step's learning rate and first sequence (both
     * follow from the step; recorded for users and tools) */
    char state[256];
    float const next_lr = model_lr_at(c->train.lr_schedule == LAUNCH_LR_COSINE, (float)c->train.lr,
                                      (float)c->train.lr_min, c->train.warmup, c->train.steps, done);
    snprintf(state, sizeof state,
             "{\"step\":%d,\"next_lr\":%.9g,\"data_next_sequence\":%zu,\"rng\":\"none: "
             "initialisation is counter-based on train.seed, training draws no random numbers\"}",
             done, (double)next_lr, (size_t)done * (size_t)c->train.global_batch % nseq);
    struct ckpt_meta const meta = {.step = done, .adam_step = pm->adam_step,
                                   .seed = c->train.seed, .config = config, .layout = layout,
                                   .state = state};
    double const t0 = vd_trace_now();
    cs->pending_step = done;
    cs->saves++;
    int rc;
    if (c->ckpt.async) {
        rc = ckpt_save_start(pm, c->ckpt.dir, &meta, c->ckpt.zstd_level, &cs->pending);
    } else {
        rc = ckpt_save(pm, c->ckpt.dir, &meta, c->ckpt.zstd_level);
        if (rc == 0 && dist_world_rank() == 0) rc = ckpt_prune(c->ckpt.dir, c->ckpt.keep);
        rc = dist_agree(dist_world(), rc);
        if (rc == 0 && dist_world_rank() == 0)
            printf("checkpoint %s/step_%08d complete\n", c->ckpt.dir, done);
    }
    free(config);
    double const t1 = vd_trace_now();
    cs->blocked_s += t1 - t0;
    vd_trace_span("checkpoint", t0, t1, "%s step %d",
                  c->ckpt.async ? "ckpt_save_start" : "ckpt_save", done);
    return rc;
}

/* ckpt.resume: auto resumes from the latest complete checkpoint under ckpt.dir, if any,
 * and falls back to older complete ones (saying so) when one cannot be loaded. */
static int resume(const struct launch_config *c, struct par_model *pm, long *start)
{
    bool const root = dist_world_rank() == 0, automatic = strcmp(c->ckpt.resume, "auto") == 0;
    char dir[LAUNCH_PATH_MAX] = "";
    bool fell_back = false;
    int rc = 0;
    if (automatic && c->ckpt.dir[0]) {
        if (root) rc = ckpt_cleanup(c->ckpt.dir); /* saves an earlier run left unfinished */
        FORWARD_IF(dist_agree(dist_world(), rc));
        rc = ckpt_latest_ex(c->ckpt.dir, dir, sizeof dir, &fell_back);
    } else if (!automatic && strcmp(c->ckpt.resume, "never") != 0) {
        snprintf(dir, sizeof dir, "%s", c->ckpt.resume);
    }
    FORWARD_IF(dist_agree(dist_world(), rc));
    if (fell_back && root)
        printf("%s/latest was missing or named an incomplete checkpoint: using %s\n",
               c->ckpt.dir, dir);
    while (dir[0]) {
        rc = ckpt_load(pm, dir, start, NULL);
        if (rc == 0 || !automatic) break;
        long const failed_step = *start;
        char const *why = vd_err_msg();
        char previous[LAUNCH_PATH_MAX] = "";
        long step_of_dir = 0;
        const char *base = strrchr(dir, '/');
        if (base && sscanf(base, "/step_%ld", &step_of_dir) != 1) step_of_dir = failed_step;
        if (ckpt_previous(c->ckpt.dir, step_of_dir, previous, sizeof previous) != 0) previous[0] = '\0';
        if (root)
            printf("checkpoint %s could not be loaded (%s); %s%s\n", dir, why,
                   previous[0] ? "falling back to " : "no older complete checkpoint",
                   previous);
        if (!previous[0]) break;
        snprintf(dir, sizeof dir, "%s", previous);
    }
    FORWARD_IF(rc);
    if (!dir[0]) return 0;
    RETURN_IF(*start > c->train.steps, VD_EINVAL,
              "checkpoint %s is at step %ld, past train.steps = %d: raise train.steps to "
              "continue the run", dir, *start, c->train.steps);
    if (root) printf("resumed from %s at step %ld\n", dir, *start);
    return 0;
}

/* Opens the metrics file: fresh at step 0; on resume, keeps the lines of the steps up to
 * the checkpoint (a crashed run may have logged steps past it) and appends. */
static int open_metrics(const char *path, long start, FILE **out)
{
    if (start == 0) {
        *out = fopen(path, "w");
        RETURN_IF(!*out, VD_EIO, "cannot open log.metrics file %s: %s", path, strerror(errno));
        return 0;
    }
    char tmp[LAUNCH_PATH_MAX + 32];
    FORWARD_IF(vd_tmp_name(tmp, sizeof tmp, path));
    FILE *old = fopen(path, "r"), *f = fopen(tmp, "w");
    if (!f) {
        if (old) fclose(old);
        RETURN_ERR(VD_EIO, "cannot write log.metrics file %s: %s", tmp, strerror(errno));
    }
    char line[16384];
    while (old && fgets(line, sizeof line, old)) {
        json_t *o = json_loads(line, 0, NULL);
        json_int_t const step = o ? json_integer_value(json_object_get(o, "step")) : 0;
        json_decref(o);
        if (step >= 1 && step <= start) fputs(line, f);
    }
    if (old) fclose(old);
    /* the stream stays open, appending to path; the directory's sync is best effort */
    enum vd_replace_step failed;
    RETURN_IF(vd_replace_stream(f, true, tmp, path, &failed) != 0 &&
                  failed < VD_REPLACE_OPEN_DIR,
              VD_EIO, "cannot write log.metrics file %s: %s", path, strerror(errno));
    *out = f;
    return 0;
}

/* The layout of the grid, checked against what this version runs, before any work. */
int launch_layout_make(const struct launch_config *c, int world, struct dist_grid *grid)
{
    const struct launch_parallel *p = &c->parallel;
    int const etp = p->etp ? p->etp : p->tp; /* 0: the same as tp */
    VD_CHECK(strcmp(p->order, "auto") != 0, "parallel.order = auto is resolved before");
    FORWARD_IF(dist_grid_init(grid, world, p->tp, p->cp, p->ep, etp, p->pp,
                              p->order));
    int const dp = grid->dims.dp;
    RETURN_IF(c->train.global_batch % (dp * c->train.micro_batch), VD_EINVAL,
              "train.global_batch = %d is not divisible by data-parallel size %d x "
              "train.micro_batch = %d: every replica runs the same number of micro-batches",
              c->train.global_batch, dp, c->train.micro_batch);
    int const m = c->train.global_batch / (dp * c->train.micro_batch);
    RETURN_IF(par_pp_check(launch_pp_schedule(p), p->pp, p->vpp, m) < 0, VD_EINVAL,
              "train.global_batch = %d over data-parallel size %d x train.micro_batch = %d "
              "gives %d micro-batches per step and replica: %s", c->train.global_batch, dp,
              c->train.micro_batch, m, vd_err_msg());
    RETURN_IF(c->train.seq_len % p->tp, VD_EINVAL,
              "train.seq_len = %d is not divisible by parallel.tp = %d: sequence parallelism "
              "splits every sequence evenly over the tensor ranks", c->train.seq_len, p->tp);
    RETURN_IF(p->cp > 1 && c->train.seq_len % (2 * p->cp * p->tp), VD_EINVAL,
              "train.seq_len = %d is not divisible by 2 x parallel.cp x parallel.tp = %d: "
              "context parallelism cuts every sequence into 2 cp equal chunks, and sequence "
              "parallelism splits each rank's share evenly over the tensor ranks",
              c->train.seq_len, 2 * p->cp * p->tp);
    return 0;
}

int launch_layout_rank(const struct launch_config *c, const struct dist_grid *grid,
                       struct model_layout *lay)
{
    const struct launch_parallel *p = &c->parallel;
    int counts[LAUNCH_CHUNKS_MAX], chunk_layers[LAUNCH_CHUNKS_MAX];
    int const n = launch_pp_layers(p->pp_layers, counts, LAUNCH_CHUNKS_MAX);
    RETURN_IF(n < 0, VD_EINVAL, "parallel.pp_layers = '%s': not a list of counts", p->pp_layers);
    FORWARD_IF(par_pp_split(c->model.num_hidden_layers, p->pp, p->vpp, counts, n, chunk_layers));
    par_layout_from_grid(lay, grid, dist_world_rank(), p->vpp, chunk_layers);
    return 0;
}

/* The pipeline's plan, printed by rank 0: schedule, micro-batches, layers per chunk,
 * in-flight activation sets per stage and the bubble; a warning when m < pp. */
static void print_pipeline(const struct launch_config *c, const struct par_model *pm,
                           const struct par_schedule *s)
{
    const struct launch_parallel *p = &c->parallel;
    if (p->pp == 1) return;
    int const m = s->pipe.m;
    double const bubble = par_pp_bubble(s->pipe.kind, p->pp, p->vpp, m);
    const char *const plural = m == 1 ? "" : "es";
    printf("pipeline: %s, pp %d x vpp %d, %d micro-batch%s per step and replica; rank 0's "
           "chunks:", par_pp_schedule_name(s->pipe.kind), p->pp, p->vpp, m, plural);
    for (int ch = 0; ch < pm->lay.nchunks; ch++)
        printf(" layers %d-%d", pm->lay.chunk_begin[ch], pm->lay.chunk_end[ch] - 1);
    printf("; activation sets in flight on rank 0: %d; theoretical bubble %.1f%%\n", s->nacts,
           100.0 * bubble);
    /* (pp - 1) / (m + pp - 1) is the bubble of one chunk per rank; gpipe over vpp > 1
     * chunks (the only other schedule that runs m < pp) idles less */
    if (m < p->pp)
        printf("warning: %d micro-batch%s per step and replica on %d pipeline stages: each "
               "stage idles %.0f%% of the step%s; raise train.global_batch or lower "
               "train.micro_batch to fill the pipeline\n",
               m, plural, p->pp, 100.0 * bubble,
               p->vpp == 1 ? " (bubble (pp - 1) / (m + pp - 1))" : "");
}

/* Rank 0 prints every group kind with its size and rank 0's members. */
static void print_layout(const struct dist_grid *grid)
{
    const struct dist_grid_dims *d = &grid->dims;
    printf("layout: %d ranks, attention tp %d x cp %d x dp %d x pp %d, MoE etp %d x ep %d x "
           "edp %d x pp %d, order %s\n", grid->world, d->tp, d->cp, d->dp, d->pp, d->etp, d->ep,
           d->edp, d->pp, grid->order);
    enum dist_kind const kinds[] = {DIST_TP, DIST_CP, DIST_DP, DIST_DPCP, DIST_TPCP, DIST_PP,
                                    DIST_EP, DIST_ETP, DIST_EDP, DIST_ETPEP};
    int *members = vd_calloc((size_t)grid->world, sizeof *members);
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        int count = 0;
        dist_grid_group(grid, kinds[i], 0, members, &count, NULL);
        printf("  %-9s size %-3d rank 0's group [", dist_kind_name(kinds[i]), count);
        for (int j = 0; j < count; j++) printf("%s%d", j ? "," : "", members[j]);
        printf("]\n");
    }
    free(members);
}

static void print_bench(const struct par_model *pm, size_t act_nbytes, int steps_timed, double step_s,
                        double tps, double mfu)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double total = 0.0;
    for (int i = 0; i < PAR_T_COUNT; i++) total += par_timers[i];
    printf("bench: %d timed steps, %.1f ms/step, %.0f tokens/s, MFU %.1f%%\n", steps_timed,
           step_s * 1e3, tps, 100.0 * mfu);
    printf("bench: time split of forward+backward:");
    for (int i = 0; i < PAR_T_COUNT; i++)
        printf(" %s %.1f%%", par_timer_name((enum par_timer)i),
               total > 0 ? 100.0 * par_timers[i] / total : 0.0);
    printf("\n");
    printf("bench: rank 0 communication over the whole run:");
    bool any = false;
    for (int k = 0; k < DIST_NKIND; k++) {
        const struct dist_comm_stat *cs = dist_comm_stats((enum dist_kind)k);
        if (cs->calls == 0) continue;
        printf("%s %s %.1f ms in %ld calls (%.1f MiB)", any ? ";" : "",
               dist_kind_name((enum dist_kind)k), cs->seconds * 1e3, cs->calls, mib((size_t)cs->nbytes));
        any = true;
    }
    printf("%s\n", any ? "" : " none");
    printf("bench: peak RSS %.1f MiB against a memory plan of %.1f MiB\n",
           (double)ru.ru_maxrss / 1024.0, mib(plan_nbytes(pm, act_nbytes)));
}

/* The pipeline bubble each stage measured over the timed steps (the share of its forwards
 * and backwards spent waiting for a neighbour's message) against the schedule's theory;
 * collective over the pp group, rank 0 prints. */
static void print_bubble(const struct par_model *pm, const struct par_schedule *s,
                         const double pipe_s[2], int steps)
{
    const struct dist_group *pp = &pm->groups.pp;
    if (pp->size == 1) return;
    double *all = vd_calloc(2 * (size_t)pp->size, sizeof *all);
    dist_allgather_bytes(pp, DIST_PP, all, pipe_s, 2 * sizeof *pipe_s);
    if (dist_world_rank() == 0) {
        double const theory = par_pp_bubble(s->pipe.kind, pp->size, pm->nchunks, s->pipe.m);
        printf("bench: pipeline bubble (%s, pp %d x vpp %d, m %d): theory %.1f%%; measured "
               "per stage (time waiting for messages / forward+backward time):",
               par_pp_schedule_name(s->pipe.kind), pp->size, pm->nchunks, s->pipe.m,
               100.0 * theory);
        double worst = 0.0;
        for (int r = 0; r < pp->size; r++) {
            double const b = all[2 * r] > 0 ? all[2 * r + 1] / all[2 * r] : 0.0;
            worst = b > worst ? b : worst;
            printf(" %d: %.1f%% (%.1f ms/step busy)", r, 100.0 * b,
                   1e3 * (all[2 * r] - all[2 * r + 1]) / steps);
        }
        printf("; largest %.2fx theory\n", theory > 0 ? worst / theory : 0.0);
    }
    free(all);
}

static int train_run(const struct launch_config *c, const struct launch_topo *topo, bool bench,
                     struct launch_train_result *res)
{
    bool const root = dist_world_rank() == 0;
    int const threads = topo->threads;
    struct dist_grid grid;
    FORWARD_IF(launch_layout_make(c, dist_world_size(), &grid));
    FORWARD_IF(check_export_dir(c));
    FORWARD_IF(launch_topo_record(c, topo, &grid));
    struct par_groups groups;
    par_groups_create(&groups, &grid);
    struct model_layout lay;
    int rc = launch_layout_rank(c, &grid, &lay);
    if (rc < 0) {
        par_groups_free(&groups);
        return rc;
    }
    if (root) {
        print_layout(&grid);
        printf("binding: %s; %d thread(s) per rank\n", topo->bind_note, threads);
        launch_place_print(stdout, c, &grid, topo->slots);
    }
    struct par_options const opt = {.distributed_optimizer = c->parallel.distributed_optimizer,
                                     .dispatch_direct = c->parallel.dispatch_direct,
                                     .cp_allgather = c->parallel.cp_comm_type == 1};
    struct par_model pm;
    rc = par_model_init(&pm, &c->model, &lay, &groups, &opt, c->train.micro_batch,
                        c->train.seq_len);
    rc = dist_agree(dist_world(), rc);
    if (rc < 0) {
        par_groups_free(&groups);
        return rc;
    }
    struct par_pipeline const pipe = {
        .kind = launch_pp_schedule(&c->parallel),
        .m = c->train.global_batch / (grid.dims.dp * c->train.micro_batch)};
    struct par_schedule sched;
    VD_CHECK(par_schedule_init(&sched, &pm, &pipe) == 0, "launch_layout_make checked it: %s",
             vd_err_msg());
    model_init_params(&pm.tab, pm.params, c->train.seed, c->model.num_hidden_layers);
    launch_tokens *tok = NULL;
    rc = open_inputs(c, &pm, &tok);
    long start = 0;
    if (rc == 0) rc = resume(c, &pm, &start);
    if (rc < 0) {
        launch_tokens_close(tok);
        par_schedule_free(&sched);
        par_model_free(&pm);
        par_groups_free(&groups);
        return rc;
    }
    bool const measured = c->train.peak_gflops <= 0.0;
    double const peak = measured ? launch_measure_sgemm_gflops() : c->train.peak_gflops;
    res->peak_gflops = peak;
    if (root) print_plan(c, &pm, sched.act_nbytes, threads, peak, measured);
    if (root && grid.dims.cp > 1)
        printf("context: cp %d, %s, each rank holds chunks of %d positions of every "
               "sequence (zigzag)\n", grid.dims.cp,
               c->parallel.cp_comm_type ? "keys and values all-gathered (allgather)"
                                        : "ring attention (p2p)",
               c->train.seq_len / (2 * grid.dims.cp));
    if (root) print_pipeline(c, &pm, &sched);

    FILE *metrics = NULL;
    if (root && c->log.metrics[0]) rc = open_metrics(c->log.metrics, start, &metrics);
    rc = dist_agree(dist_world(), rc);
    if (rc == 0) rc = launch_trace_open(c->log.trace);
    double const tokens_per_step = (double)c->train.global_batch * c->train.seq_len;
    double const flops_per_step = 3.0 * model_flops_per_token(&c->model, c->train.seq_len) *
                                  tokens_per_step;
    double timed_s = 0.0, t_start = MPI_Wtime();
    double pipe_s[2] = {0}; /* timed steps: forwards and backwards, of which pp waits */
    struct ckpt_state cs = {0};
    for (int s = (int)start; rc == 0 && s < c->train.steps; s++) {
        if (s == start + 1) memset(par_timers, 0, sizeof par_timers); /* the first step warms up */
        float const lr = model_lr_at(c->train.lr_schedule == LAUNCH_LR_COSINE,
                                     (float)c->train.lr, (float)c->train.lr_min,
                                     c->train.warmup, c->train.steps, s);
        double const t0 = vd_trace_now();
        struct step_stats st;
        train_step(&pm, &sched, tok, c, s, lr, &st);
        double const t1 = vd_trace_now(), dt = t1 - t0;
        vd_trace_span("step", t0, t1, "step %d", s + 1);
        if (s > start || c->train.steps == start + 1) {
            timed_s += dt;
            pipe_s[0] += st.pipe_s;
            pipe_s[1] += st.wait_s;
        }
        double const tps = tokens_per_step / dt;
        double const mfu = flops_per_step / (dt * dist_world_size() * peak * 1e9);
        if (s == start) res->first_loss = st.loss;
        res->last_loss = st.loss;
        res->steps = s + 1;
        /* the step's metrics line is written before its checkpoint, so a run killed
         * after the checkpoint resumes with every line up to it */
        if (root && metrics) write_metrics(metrics, s + 1, &st, lr, dt * 1e3, tps, mfu);
        if (want_checkpoint(c, s + 1))
            rc = save_checkpoint(c, &pm, &grid, s + 1, launch_tokens_nseq(tok), &cs);
        if (!root) continue;
        bool const last = s + 1 == c->train.steps;
        if ((s + 1) % c->log.interval == 0 || last || s == 0) {
            char eta[32];
            format_duration(eta, sizeof eta, (MPI_Wtime() - t_start) / (s + 1 - start) *
                                                 (c->train.steps - s - 1));
            printf("step %d/%d | loss %.4f (lm %.4f aux %.4f z %.4f) | gnorm %.3f | lr %.2e | "
                   "%.0f tok/s | MFU %.1f%% | ETA %s\n",
                   s + 1, c->train.steps, st.loss, st.lm, st.aux, st.z, st.grad_norm, lr, tps,
                   100.0 * mfu, eta);
            fflush(stdout);
        }
    }
    int const run_steps = c->train.steps - (int)start;
    int const timed_steps = run_steps > 1 ? run_steps - 1 : 1;
    if (timed_s > 0) {
        res->tokens_per_s = tokens_per_step * timed_steps / timed_s;
        res->mfu = flops_per_step * timed_steps / (timed_s * dist_world_size() * peak * 1e9);
    }
    int const frc = finish_checkpoint(c, &cs);
    if (rc == 0) rc = frc;
    ckpt_save_release(); /* the snapshot buffer kept between asynchronous saves */
    if (rc == 0 && root && cs.saves > 0)
        printf("checkpoints: %d saved, the training loop waited %.3f s on them (%.1f ms per "
               "save%s)\n", cs.saves, cs.blocked_s, 1e3 * cs.blocked_s / cs.saves,
               c->ckpt.async ? ", asynchronous" : "");
    if (metrics) fclose(metrics);
    if (rc == 0 && bench) print_bubble(&pm, &sched, pipe_s, timed_steps);
    if (rc == 0 && bench && root)
        print_bench(&pm, sched.act_nbytes, timed_steps, timed_s / timed_steps, res->tokens_per_s, res->mfu);
    if (rc == 0 && c->train.export_to[0]) rc = export_model(c, &pm);
    rc = launch_trace_close(c->log.trace, rc);
    launch_tokens_close(tok);
    par_schedule_free(&sched);
    par_model_free(&pm);
    par_groups_free(&groups);
    return rc;
}

int launch_train_run(const struct launch_config *c, bool bench, struct launch_train_result *res)
{
    memset(res, 0, sizeof *res);
    /* a copy, whose parallel.order = auto becomes the order chosen for this job */
    struct launch_config *run = vd_alloc(sizeof *run);
    *run = *c;
    struct launch_topo topo;
    int rc = launch_topo_setup(&topo, run);
    if (rc == 0)
        rc = launch_place_resolve_order(run, topo.world, topo.slots,
                                        dist_world_rank() == 0 ? stdout : NULL, NULL, NULL);
    if (rc == 0) rc = train_run(run, &topo, bench, res);
    launch_topo_free(&topo);
    free(run);
    return rc;
}
