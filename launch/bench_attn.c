/* `vdist bench attention`: the attention core of one layer of the --config model on one
 * rank (micro_batch sequences, every head, no tensor parallelism), forward and backward,
 * with the kernel that keeps the probabilities (model_attention_*) and the blockwise one
 * with an online softmax (model_flash_*), at several sequence lengths. Reports time,
 * GFLOP/s against the SGEMM peak measured in the same run, and the memory each kernel
 * needs beyond the tensors both share. */
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "launch/launch_internal.h"

enum { ATTN_LENS_MAX = 16, ATTN_REPS_MAX = 10 };
#define ATTN_CAP_GIB_DEFAULT 4.0
#define ATTN_TIME_BUDGET_S 3.0 /* timed repetitions per kernel and length, at most */

struct attn_opts {
    int lens[ATTN_LENS_MAX];
    int nlens;
    double cap_gib;
    bool help;
};

void launch_bench_attention_help(FILE *out)
{
    fprintf(out,
            "usage: vdist bench attention --config FILE [--section.key=value ...]\n"
            "                             [--seq-lens T1,T2,...] [--mem-cap GIB]\n\n"
            "Times the attention core of one layer of the model (train.micro_batch\n"
            "sequences, all heads), forward and backward, for the kernel that stores the\n"
            "(B, H, T, T) probabilities and for the blockwise flash kernel, on one rank\n"
            "with OMP_NUM_THREADS threads.\n\n"
            "  --seq-lens L   sequence lengths, comma-separated (default 512,2048,8192)\n"
            "  --mem-cap GIB  skip the stored-probabilities kernel where its probabilities\n"
            "                 and scratch exceed this many GiB (default %.0f)\n"
            "  --help         this text\n\n"
            "FLOPs are those of model.md (causal half): forward 2 T^2 H hd per sequence\n"
            "(two matmuls), backward twice that; the flash backward executes a fifth matmul\n"
            "(recomputing the scores) that is not counted. Memory: what a kernel keeps from\n"
            "forward to backward (probabilities; lse) and its scratch (the flash one's\n"
            "includes delta); q, k, v, out and their gradients are the same for both and\n"
            "listed once.\n",
            ATTN_CAP_GIB_DEFAULT);
}

/* "512,2048,8192": 1 to ATTN_LENS_MAX lengths from 1 to 1 << 20. */
static int parse_lens(struct attn_opts *o, const char *text)
{
    o->nlens = 0;
    const char *p = text;
    for (;;) {
        char *end = NULL;
        errno = 0;
        long const v = strtol(p, &end, 10);
        RETURN_IF(end == p || errno != 0 || v < 1 || v > (1 << 20) ||
                      o->nlens == ATTN_LENS_MAX || (*end && *end != ','),
                  VD_EINVAL,
                  "--seq-lens '%s' is not a list of 1 to %d sequence lengths from 1 to %d "
                  "separated by commas, e.g. --seq-lens 512,2048",
                  text, ATTN_LENS_MAX, 1 << 20);
        o->lens[o->nlens++] = (int)v;
        if (!*end) return 0;
        p = end + 1;
    }
}

/* argv holds options only: "--name value" or "--name=value". */
static int attn_opts_parse(struct attn_opts *o, int argc, char **argv)
{
    *o = (struct attn_opts){.lens = {512, 2048, 8192}, .nlens = 3,
                            .cap_gib = ATTN_CAP_GIB_DEFAULT};
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            o->help = true;
            continue;
        }
        bool const lens = strncmp(arg, "--seq-lens", 10) == 0;
        bool const cap = strncmp(arg, "--mem-cap", 9) == 0;
        const char *value = strchr(arg, '=');
        size_t const len = value ? (size_t)(value - arg) : strlen(arg);
        RETURN_IF((!lens || len != 10) && (!cap || len != 9), VD_EINVAL,
                  "unknown option '%s' for vdist bench attention: the options are "
                  "--seq-lens T1,T2,..., --mem-cap GIB and --help",
                  arg);
        if (value) value++;
        else if (i + 1 < argc) value = argv[++i];
        RETURN_IF(!value, VD_EINVAL, "option %s needs a value, e.g. %s", arg,
                  lens ? "--seq-lens 512,2048" : "--mem-cap 8");
        if (lens) {
            FORWARD_IF(parse_lens(o, value));
            continue;
        }
        char *end = NULL;
        o->cap_gib = strtod(value, &end);
        RETURN_IF(end == value || *end || !(o->cap_gib >= 0.0 && o->cap_gib <= 1e6), VD_EINVAL,
                  "--mem-cap '%s' is not a number of GiB from 0 to 1e6, e.g. --mem-cap 8",
                  value);
    }
    return 0;
}

/* Tensors both kernels share, and what each keeps and uses as scratch. */
struct attn_bufs {
    int B, T, H, G, hd;
    size_t nq, nk;
    float *q, *k, *v, *out, *dout, *dq, *dk, *dv;
    float *probs, *old_scratch;             /* NULL when over the cap */
    float *lse, *delta, *flash_scratch;
    struct model_attn_blocks g;
};

static void fill_random(float *x, size_t n, uint64_t seed, float amp)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = ((float)(seed >> 40) / 16777216.0f - 0.5f) * 2.0f * amp;
    }
}

static size_t old_floats(int B, int H, int T)
{
    return (size_t)B * H * T * T + model_attention_scratch_floats(T);
}

static void bufs_init(struct attn_bufs *a, int B, int T, int H, int G, int hd, bool old)
{
    *a = (struct attn_bufs){.B = B, .T = T, .H = H, .G = G, .hd = hd};
    a->nq = (size_t)B * T * H * hd;
    a->nk = (size_t)B * T * G * hd;
    float **qs[] = {&a->q, &a->out, &a->dout, &a->dq}, **ks[] = {&a->k, &a->v, &a->dk, &a->dv};
    for (int i = 0; i < 4; i++) {
        *qs[i] = vd_alloc(a->nq * sizeof(float));
        *ks[i] = vd_alloc(a->nk * sizeof(float));
    }
    /* scores of a few units: a softmax that is neither flat nor one-hot */
    fill_random(a->q, a->nq, 1, 0.5f);
    fill_random(a->k, a->nk, 2, 0.5f);
    fill_random(a->v, a->nk, 3, 1.0f);
    fill_random(a->dout, a->nq, 4, 1.0f);
    if (old) {
        a->probs = vd_alloc((size_t)B * H * T * T * sizeof(float));
        a->old_scratch = vd_alloc(model_attention_scratch_floats(T) * sizeof(float));
    }
    a->lse = vd_alloc((size_t)B * T * H * sizeof(float));
    a->delta = vd_alloc((size_t)B * T * H * sizeof(float));
    a->flash_scratch = vd_alloc(model_flash_scratch_floats(T, hd) * sizeof(float));
    a->g = (struct model_attn_blocks){B, T, T, (size_t)T, (size_t)T, H, G, hd,
                                      MODEL_MASK_CAUSAL};
}

static void bufs_free(struct attn_bufs *a)
{
    float *all[] = {a->q, a->k, a->v, a->out, a->dout, a->dq, a->dk, a->dv, a->probs,
                    a->old_scratch, a->lse, a->delta, a->flash_scratch};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
}

static void old_forward(struct attn_bufs *a)
{
    model_attention_forward(a->out, a->probs, a->q, a->k, a->v, a->B, a->T, a->H, a->G, a->hd);
}

static void old_backward(struct attn_bufs *a)
{
    model_attention_backward(a->dq, a->dk, a->dv, a->dout, a->probs, a->q, a->k, a->v, a->B,
                             a->T, a->H, a->G, a->hd, a->old_scratch);
}

static void flash_forward(struct attn_bufs *a)
{
    model_flash_forward(a->out, a->lse, a->q, a->k, a->v, &a->g, false, a->flash_scratch);
}

/* Zeroing the accumulators counts: the old backward assigns its gradients. */
static void flash_backward(struct attn_bufs *a)
{
    memset(a->dq, 0, a->nq * sizeof(float));
    memset(a->dk, 0, a->nk * sizeof(float));
    memset(a->dv, 0, a->nk * sizeof(float));
    model_flash_delta(a->delta, a->dout, a->out, &a->g);
    model_flash_backward(a->dq, a->dk, a->dv, a->dout, a->lse, a->delta, a->q, a->k, a->v,
                         &a->g, a->flash_scratch);
}

/* Best seconds of forward and backward over up to ATTN_REPS_MAX pairs after a warm-up
 * pair, stopping once ATTN_TIME_BUDGET_S is spent (the warm-up alone when it is longer). */
static void time_pair(struct attn_bufs *a, void (*fwd)(struct attn_bufs *),
                      void (*bwd)(struct attn_bufs *), double *t_fwd, double *t_bwd)
{
    *t_fwd = *t_bwd = INFINITY;
    double spent = 0.0;
    for (int rep = 0; rep <= ATTN_REPS_MAX && spent < ATTN_TIME_BUDGET_S; rep++) {
        double const t0 = omp_get_wtime();
        fwd(a);
        double const t1 = omp_get_wtime();
        bwd(a);
        double const t2 = omp_get_wtime();
        spent += t2 - t0;
        bool const warm = rep > 0 || t2 - t0 > ATTN_TIME_BUDGET_S;
        if (warm && t1 - t0 < *t_fwd) *t_fwd = t1 - t0;
        if (warm && t2 - t1 < *t_bwd) *t_bwd = t2 - t1;
    }
}

static double mib(double nbytes) { return nbytes / (1024.0 * 1024.0); }

static void print_row(int T, const char *name, double t_fwd, double t_bwd, double flops_fwd,
                      double peak, double kept_nbytes, double scratch_nbytes)
{
    double const tot = t_fwd + t_bwd;
    printf("%6d  %-6s %9.2f %9.2f %9.2f %8.1f %8.1f %8.1f %6.1f%% %10.1f %9.1f\n", T, name,
           t_fwd * 1e3, t_bwd * 1e3, tot * 1e3, flops_fwd / t_fwd / 1e9,
           2.0 * flops_fwd / t_bwd / 1e9, 3.0 * flops_fwd / tot / 1e9,
           100.0 * 3.0 * flops_fwd / tot / 1e9 / peak, mib(kept_nbytes), mib(scratch_nbytes));
}

int launch_bench_attention(const struct launch_config *c, int argc, char **argv)
{
    struct attn_opts o;
    FORWARD_IF(attn_opts_parse(&o, argc, argv));
    if (o.help) {
        if (dist_world_rank() == 0) launch_bench_attention_help(stdout);
        return 0;
    }
    RETURN_IF(dist_world_size() != 1, VD_EINVAL,
              "vdist bench attention measures one rank's kernels: run it without mpirun "
              "(or with -np 1); %d ranks were started",
              dist_world_size());
    int const threads = omp_get_max_threads();
    struct model_config const *m = &c->model;
    int const B = c->train.micro_batch, H = m->num_attention_heads;
    int const G = m->num_key_value_heads, hd = m->hidden_size / H;
    double const peak = launch_measure_sgemm_gflops();
    double const cap_nbytes = o.cap_gib * 1024.0 * 1024.0 * 1024.0;
    printf("bench attention: B %d, H %d, G %d, hd %d, causal, 1 rank x %d threads; SGEMM peak "
           "%.1f GFLOP/s (2048^3, these threads); memory cap of the stored probabilities "
           "%.3g GiB\n", B, H, G, hd, threads, peak, o.cap_gib);
    printf("FLOPs (model.md, causal half): forward 2 T^2 H hd per sequence, backward twice "
           "that (flash executes 5 matmuls there, 4 counted); %%peak of the total\n");
    printf("%6s  %-6s %9s %9s %9s %8s %8s %8s %7s %10s %9s\n", "T", "kernel", "fwd ms",
           "bwd ms", "total ms", "fwd GF/s", "bwd GF/s", "tot GF/s", "%peak", "kept MiB",
           "scratch MiB");
    for (int li = 0; li < o.nlens; li++) {
        int const T = o.lens[li];
        double const flops_fwd = 2.0 * B * (double)T * T * H * hd;
        double const old_nbytes = (double)old_floats(B, H, T) * sizeof(float);
        bool const old = old_nbytes <= cap_nbytes;
        struct attn_bufs a;
        bufs_init(&a, B, T, H, G, hd, old);
        double tf, tb;
        if (old) {
            time_pair(&a, old_forward, old_backward, &tf, &tb);
            print_row(T, "old", tf, tb, flops_fwd, peak, (double)B * H * T * T * sizeof(float),
                      (double)model_attention_scratch_floats(T) * sizeof(float));
        } else {
            printf("%6d  %-6s skipped: probabilities and scratch need %.1f GiB, over the cap\n",
                   T, "old", old_nbytes / (1024.0 * 1024.0 * 1024.0));
        }
        time_pair(&a, flash_forward, flash_backward, &tf, &tb);
        print_row(T, "flash", tf, tb, flops_fwd, peak, (double)B * T * H * sizeof(float),
                  (double)(model_flash_scratch_floats(T, hd) + (size_t)B * T * H) * sizeof(float));
        printf("%6d  shared q, k, v, out and gradients: %.1f MiB\n", T,
               mib(4.0 * (double)(a.nq + a.nk) * sizeof(float)));
        fflush(stdout);
        bufs_free(&a);
    }
    return 0;
}
