/* CUnit suite for the single-rank compute of model/: kernels, router, experts, loss
 * pieces, AdamW, learning-rate schedule, initialisation and the config arithmetic.
 *
 * Every expectation comes from shared/docs/model.md and the contracts in model/model.h,
 * never from outputs of the implementation:
 *   - forwards are compared with naive double-precision loops written here;
 *   - backwards are compared with central finite differences of the kernel's own forward
 *     for the scalar L = sum(out * R), R a fixed random tensor (so dout = R);
 *   - accumulation contracts (= or +=) are checked by pre-filling outputs with garbage
 *     or calling twice;
 *   - thread-count independence and empty blocks (n = 0) are checked for the kernels
 *     that run OpenMP regions.
 * Inputs come from a fixed-seed splitmix64 generator, so a run is reproducible. */
#include <CUnit/Basic.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_state = 1;

static void rng_seed(uint64_t seed) { rng_state = seed; }

static uint64_t rng_u64(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static double rng_unif(void) { return (double)(rng_u64() >> 11) * 0x1.0p-53; }

/* Uniform in (-a, a). */
static float rng_sym(double a) { return (float)((2.0 * rng_unif() - 1.0) * a); }

static int rng_int(int n) { return (int)(rng_u64() % (uint64_t)n); }

static void fill_sym(float *x, size_t n, double a)
{
    for (size_t i = 0; i < n; i++) x[i] = rng_sym(a);
}

static void fill_const(float *x, size_t n, float c)
{
    for (size_t i = 0; i < n; i++) x[i] = c;
}

static float *fbuf(size_t n)
{
    float *p = calloc(n ? n : 1, sizeof *p);
    if (!p) abort();
    return p;
}

static double *dbuf(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof *p);
    if (!p) abort();
    return p;
}

static float *fdup(const float *x, size_t n)
{
    float *p = fbuf(n);
    memcpy(p, x, n * sizeof *p);
    return p;
}

static double dot_fd(const float *a, const float *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

/* NaN never compares close. */
static int near(double got, double want, double rtol, double atol)
{
    return fabs(got - want) <= rtol * fmax(fabs(got), fabs(want)) + atol;
}

static size_t report_bad(const char *what, size_t bad, size_t n)
{
    if (bad) fprintf(stderr, "\n    %s: %zu of %zu elements differ\n", what, bad, n);
    return bad;
}

static size_t check_close(const char *what, const float *got, const double *want, size_t n,
                          double rtol, double atol)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (near(got[i], want[i], rtol, atol)) continue;
        if (bad < 6)
            fprintf(stderr, "\n    %s[%zu]: got %.9g, want %.9g", what, i, (double)got[i],
                    want[i]);
        bad++;
    }
    return report_bad(what, bad, n);
}

static size_t check_closef(const char *what, const float *got, const float *want, size_t n,
                           double rtol, double atol)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (near(got[i], want[i], rtol, atol)) continue;
        if (bad < 6)
            fprintf(stderr, "\n    %s[%zu]: got %.9g, want %.9g", what, i, (double)got[i],
                    (double)want[i]);
        bad++;
    }
    return report_bad(what, bad, n);
}

#define EXPECT_CLOSE(what, got, want, n, rtol, atol)                                   \
    CU_ASSERT_EQUAL(check_close((what), (got), (want), (n), (rtol), (atol)), 0)
#define EXPECT_CLOSEF(what, got, want, n, rtol, atol)                                  \
    CU_ASSERT_EQUAL(check_closef((what), (got), (want), (n), (rtol), (atol)), 0)

/* Forwards are compared with a double reference: an fp32 kernel with reductions of a
 * few dozen terms is off by a few ulp of the largest partial sum, ~1e-6 relative. A
 * wrong formula is off by O(1). */
#define FWD_RTOL 1e-5
#define FWD_ATOL 1e-5

/* Finite differences. The step is FD_H relative (absolute below |x| = 1): central
 * differences have truncation error h^2/6 |L'''| ~ 2e-5 for the O(1) smooth functions
 * here, and fp32 round-off in L(x+h) - L(x-h): only the outputs the perturbed element
 * reaches change (the kernels are deterministic, the others cancel exactly), each by
 * ~6e-8 |out|, so the error of the quotient is ~ sqrt(#reached) * 6e-8 / 2h ~ 1e-5 for
 * the sizes below. |a - b| <= 1e-2 max(|a|, |b|) + 1e-4 leaves a margin of ~10 over both
 * while a wrong gradient (a missing term, a wrong sign, a factor 2, a wrong index) is off
 * by O(1) relative, so every such bug still fails. L is accumulated in double. */
#define FD_H 1e-2
#define FD_RTOL 1e-2
#define FD_ATOL 1e-4

typedef double (*loss_fn)(void *ctx);

/* Compares grad (n) with central differences of loss() with respect to x (n), which
 * loss() reads through ctx; x is restored. Returns the number of mismatches. */
static size_t fd_check(const char *what, float *x, size_t n, const float *grad, loss_fn loss,
                       void *ctx)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        float const x0 = x[i];
        double const h = FD_H * fmax(1.0, fabs((double)x0));
        float const xp = (float)(x0 + h), xm = (float)(x0 - h);
        x[i] = xp;
        double const lp = loss(ctx);
        x[i] = xm;
        double const lm = loss(ctx);
        x[i] = x0;
        /* The step actually taken, after rounding x +- h to float. */
        double const fd = (lp - lm) / ((double)xp - (double)xm);
        if (near(grad[i], fd, FD_RTOL, FD_ATOL)) continue;
        if (bad < 6)
            fprintf(stderr, "\n    d%s[%zu]: backward %.7g, finite difference %.7g", what, i,
                    (double)grad[i], fd);
        bad++;
    }
    return report_bad(what, bad, n);
}

#define EXPECT_FD(what, x, n, grad, loss, ctx)                                         \
    CU_ASSERT_EQUAL(fd_check((what), (x), (n), (grad), (loss), (ctx)), 0)

/* Buffers for "nothing may be written": a sentinel value and a check it is intact. */
#define SENTINEL 12345.0f
static int all_equal(const float *x, size_t n, float v)
{
    for (size_t i = 0; i < n; i++)
        if (x[i] != v) return 0;
    return 1;
}

static int max_threads_saved = 1;

/* ---------------------------------------------------------------- references */

static double silu_d(double u) { return u / (1.0 + exp(-u)); }

/* out (n, m) = inp (n, kd) w (m, kd)^T */
static void ref_matmul(double *out, const float *inp, const float *w, size_t n, size_t kd,
                       size_t m)
{
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < m; j++) {
            double s = 0;
            for (size_t c = 0; c < kd; c++) s += (double)inp[i * kd + c] * w[j * kd + c];
            out[i * m + j] = s;
        }
}

static void ref_rmsnorm(double *out, double *rstd, const float *inp, const float *g, size_t n,
                        size_t d, double eps)
{
    for (size_t i = 0; i < n; i++) {
        double ss = 0;
        for (size_t c = 0; c < d; c++) ss += (double)inp[i * d + c] * inp[i * d + c];
        double const r = 1.0 / sqrt(ss / (double)d + eps);
        rstd[i] = r;
        for (size_t c = 0; c < d; c++) out[i * d + c] = inp[i * d + c] * r * g[c];
    }
}

/* model.md's RoPE on x (rows, nheads*hd) with positions pos[row]. */
static void ref_rope(double *out, const float *x, const int *pos, size_t rows, int nheads,
                     int hd, double theta)
{
    int const half = hd / 2;
    for (size_t r = 0; r < rows; r++)
        for (int h = 0; h < nheads; h++) {
            const float *u = x + (r * (size_t)nheads + (size_t)h) * (size_t)hd;
            double *o = out + (r * (size_t)nheads + (size_t)h) * (size_t)hd;
            for (int i = 0; i < half; i++) {
                double const freq = pow(theta, -2.0 * i / hd);
                double const ang = pos[r] * freq;
                o[i] = u[i] * cos(ang) - u[i + half] * sin(ang);
                o[i + half] = u[i + half] * cos(ang) + u[i] * sin(ang);
            }
        }
}

/* Causal GQA attention of model.md; probs (B, Hl, T, T), only j <= t written. */
static void ref_attention(double *out, double *probs, const float *q, const float *k,
                          const float *v, int B, int T, int Hl, int Gl, int hd)
{
    int const grp = Hl / Gl;
    double *s = dbuf((size_t)T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hl; h++) {
            int const g = h / grp;
            for (int t = 0; t < T; t++) {
                const float *qr = q + ((size_t)(b * T + t) * Hl + h) * hd;
                double mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    const float *kr = k + ((size_t)(b * T + j) * Gl + g) * hd;
                    double acc = 0;
                    for (int c = 0; c < hd; c++) acc += (double)qr[c] * kr[c];
                    s[j] = acc / sqrt((double)hd);
                    mx = fmax(mx, s[j]);
                }
                double sum = 0;
                for (int j = 0; j <= t; j++) {
                    s[j] = exp(s[j] - mx);
                    sum += s[j];
                }
                for (int j = 0; j <= t; j++)
                    probs[(((size_t)b * Hl + h) * T + t) * T + j] = s[j] / sum;
                double *orow = out + ((size_t)(b * T + t) * Hl + h) * hd;
                for (int c = 0; c < hd; c++) {
                    double acc = 0;
                    for (int j = 0; j <= t; j++)
                        acc += s[j] / sum * v[((size_t)(b * T + j) * Gl + g) * hd + c];
                    orow[c] = acc;
                }
            }
        }
    free(s);
}

/* softmax, lse, top-k (ties: lower index first) and renormalised weights of one row. */
static void ref_router_row(double *p, int *idx, double *w, double *lse, const float *logit,
                           int E, int k)
{
    double mx = -INFINITY;
    for (int e = 0; e < E; e++) mx = fmax(mx, logit[e]);
    double sum = 0;
    for (int e = 0; e < E; e++) sum += exp(logit[e] - mx);
    for (int e = 0; e < E; e++) p[e] = exp(logit[e] - mx) / sum;
    *lse = mx + log(sum);
    int taken[64] = {0};
    double wsum = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
        taken[best] = 1;
        idx[j] = best;
        wsum += p[best];
    }
    for (int j = 0; j < k; j++) w[j] = p[idx[j]] / wsum;
}

static void ref_expert(double *y, double *h1, double *h3, double *act, const float *x,
                       const float *w1, const float *w3, const float *w2, size_t n, int d,
                       int F)
{
    for (size_t i = 0; i < n; i++) {
        for (int f = 0; f < F; f++) {
            double a1 = 0, a3 = 0;
            for (int c = 0; c < d; c++) {
                a1 += (double)x[i * d + c] * w1[(size_t)f * d + c];
                a3 += (double)x[i * d + c] * w3[(size_t)f * d + c];
            }
            h1[i * F + f] = a1;
            h3[i * F + f] = a3;
            act[i * F + f] = silu_d(a1) * a3;
        }
        for (int c = 0; c < d; c++) {
            double acc = 0;
            for (int f = 0; f < F; f++) acc += act[i * F + f] * w2[(size_t)c * F + f];
            y[i * d + c] = acc;
        }
    }
}

/* ---------------------------------------------------------------- matmul */

struct mm_ctx {
    float *out;
    const float *inp, *w, *R;
    size_t n, kd, m;
};

static double mm_loss(void *p)
{
    struct mm_ctx *c = p;
    model_matmul_forward(c->out, c->inp, c->w, c->n, c->kd, c->m, false);
    return dot_fd(c->out, c->R, c->n * c->m);
}

static void test_matmul_forward(void)
{
    static const size_t shapes[][3] = {{7, 5, 3}, {1, 9, 4}, {33, 64, 17}, {64, 48, 96}};
    rng_seed(11);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        size_t const n = shapes[s][0], kd = shapes[s][1], m = shapes[s][2];
        float *inp = fbuf(n * kd), *w = fbuf(m * kd), *out = fbuf(n * m);
        float *base = fbuf(n * m);
        double *ref = dbuf(n * m);
        fill_sym(inp, n * kd, 1.0);
        fill_sym(w, m * kd, 1.0);
        ref_matmul(ref, inp, w, n, kd, m);
        fill_const(out, n * m, SENTINEL); /* accumulate = false must overwrite */
        model_matmul_forward(out, inp, w, n, kd, m, false);
        EXPECT_CLOSE("matmul out", out, ref, n * m, FWD_RTOL, FWD_ATOL);

        fill_sym(base, n * m, 2.0);
        memcpy(out, base, n * m * sizeof *out);
        model_matmul_forward(out, inp, w, n, kd, m, true);
        for (size_t i = 0; i < n * m; i++) ref[i] += base[i];
        EXPECT_CLOSE("matmul out (accumulate)", out, ref, n * m, FWD_RTOL, FWD_ATOL);
        free(inp), free(w), free(out), free(base), free(ref);
    }
}

static void test_matmul_backward(void)
{
    size_t const n = 7, kd = 5, m = 4;
    rng_seed(12);
    float *inp = fbuf(n * kd), *w = fbuf(m * kd), *R = fbuf(n * m), *out = fbuf(n * m);
    float *dinp = fbuf(n * kd), *dw = fbuf(m * kd);
    fill_sym(inp, n * kd, 1.0);
    fill_sym(w, m * kd, 1.0);
    fill_sym(R, n * m, 1.0);
    struct mm_ctx ctx = {out, inp, w, R, n, kd, m};

    fill_const(dinp, n * kd, SENTINEL); /* accumulate_dinp = false: overwritten */
    model_matmul_backward(dinp, dw, R, inp, w, n, kd, m, false);
    EXPECT_FD("inp", inp, n * kd, dinp, mm_loss, &ctx);
    EXPECT_FD("w", w, m * kd, dw, mm_loss, &ctx);

    /* dw +=: a second call doubles it; dinp with accumulate adds to what is there. */
    float *dw1 = fdup(dw, m * kd), *dinp1 = fdup(dinp, n * kd);
    float *pre = fbuf(n * kd), *want = fbuf(n * kd);
    fill_sym(pre, n * kd, 3.0);
    memcpy(dinp, pre, n * kd * sizeof *dinp);
    model_matmul_backward(dinp, dw, R, inp, w, n, kd, m, true);
    for (size_t i = 0; i < n * kd; i++) want[i] = pre[i] + dinp1[i];
    EXPECT_CLOSEF("dinp (accumulate)", dinp, want, n * kd, 1e-6, 1e-6);
    for (size_t i = 0; i < m * kd; i++) dw1[i] *= 2;
    EXPECT_CLOSEF("dw after two calls", dw, dw1, m * kd, 1e-6, 1e-6);

    /* Either output may be NULL. */
    fill_const(dinp, n * kd, SENTINEL);
    model_matmul_backward(dinp, NULL, R, inp, w, n, kd, m, false);
    for (size_t i = 0; i < n * kd; i++) want[i] = dinp1[i];
    EXPECT_CLOSEF("dinp (dw NULL)", dinp, want, n * kd, 1e-6, 1e-6);
    memset(dw, 0, m * kd * sizeof *dw);
    model_matmul_backward(NULL, dw, R, inp, w, n, kd, m, false);
    for (size_t i = 0; i < m * kd; i++) dw1[i] *= 0.5f;
    EXPECT_CLOSEF("dw (dinp NULL)", dw, dw1, m * kd, 1e-6, 1e-6);

    free(inp), free(w), free(R), free(out), free(dinp), free(dw), free(dw1), free(dinp1);
    free(pre), free(want);
}

/* ---------------------------------------------------------------- rmsnorm */

struct rms_ctx {
    float *out, *rstd;
    const float *inp, *g, *R;
    size_t n, d;
    float eps;
};

static double rms_loss(void *p)
{
    struct rms_ctx *c = p;
    model_rmsnorm_forward(c->out, c->rstd, c->inp, c->g, c->n, c->d, c->eps);
    return dot_fd(c->out, c->R, c->n * c->d);
}

static void test_rmsnorm_forward(void)
{
    size_t const n = 9, d = 16;
    float const eps = 1e-5f;
    rng_seed(21);
    float *inp = fbuf(n * d), *g = fbuf(d), *out = fbuf(n * d), *rstd = fbuf(n);
    double *ref = dbuf(n * d), *rref = dbuf(n);
    fill_sym(inp, n * d, 2.0);
    for (size_t c = 0; c < d; c++) g[c] = 1.0f + rng_sym(0.5);
    /* A row of tiny values, where eps matters (mean z^2 = 1e-6 vs eps = 1e-5). */
    for (size_t c = 0; c < d; c++) inp[3 * d + c] = (c % 2 ? 1e-3f : -1e-3f);
    ref_rmsnorm(ref, rref, inp, g, n, d, eps);
    model_rmsnorm_forward(out, rstd, inp, g, n, d, eps);
    EXPECT_CLOSE("rmsnorm out", out, ref, n * d, FWD_RTOL, FWD_ATOL);
    EXPECT_CLOSE("rmsnorm rstd", rstd, rref, n, FWD_RTOL, 0);
    free(inp), free(g), free(out), free(rstd), free(ref), free(rref);
}

static void test_rmsnorm_backward(void)
{
    size_t const n = 5, d = 8;
    float const eps = 1e-5f;
    rng_seed(22);
    float *inp = fbuf(n * d), *g = fbuf(d), *out = fbuf(n * d), *rstd = fbuf(n);
    float *R = fbuf(n * d), *dinp = fbuf(n * d), *dg = fbuf(d);
    fill_sym(inp, n * d, 1.5);
    for (size_t c = 0; c < d; c++) g[c] = 1.0f + rng_sym(0.7);
    fill_sym(R, n * d, 1.0);
    struct rms_ctx ctx = {out, rstd, inp, g, R, n, d, eps};
    model_rmsnorm_forward(out, rstd, inp, g, n, d, eps);
    model_rmsnorm_backward(dinp, dg, R, inp, g, rstd, n, d);
    EXPECT_FD("inp", inp, n * d, dinp, rms_loss, &ctx);
    EXPECT_FD("g", g, d, dg, rms_loss, &ctx);

    /* Both outputs accumulate: a second call doubles them. */
    float *dinp2 = fdup(dinp, n * d), *dg2 = fdup(dg, d);
    for (size_t i = 0; i < n * d; i++) dinp2[i] *= 2;
    for (size_t i = 0; i < d; i++) dg2[i] *= 2;
    model_rmsnorm_forward(out, rstd, inp, g, n, d, eps);
    model_rmsnorm_backward(dinp, dg, R, inp, g, rstd, n, d);
    EXPECT_CLOSEF("rmsnorm dinp after two calls", dinp, dinp2, n * d, 1e-6, 1e-7);
    EXPECT_CLOSEF("rmsnorm dg after two calls", dg, dg2, d, 1e-6, 1e-7);
    free(inp), free(g), free(out), free(rstd), free(R), free(dinp), free(dg), free(dinp2);
    free(dg2);
}

/* ---------------------------------------------------------------- rope */

static void test_rope_table(void)
{
    static const double thetas[] = {10000.0, 500000.0, 100.0};
    static const int hds[] = {8, 16, 2};
    int const T = 16;
    for (int s = 0; s < 3; s++) {
        int const hd = hds[s], half = hd / 2;
        float *ct = fbuf((size_t)T * half), *st = fbuf((size_t)T * half);
        double *cref = dbuf((size_t)T * half), *sref = dbuf((size_t)T * half);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < half; i++) {
                double const ang = t * pow(thetas[s], -2.0 * i / hd);
                cref[t * half + i] = cos(ang);
                sref[t * half + i] = sin(ang);
            }
        model_rope_table(ct, st, T, hd, thetas[s]);
        /* Angles up to 16 rad: an fp32 angle is off by up to ~1e-6. */
        EXPECT_CLOSE("rope cos", ct, cref, (size_t)T * half, 0, 5e-6);
        EXPECT_CLOSE("rope sin", st, sref, (size_t)T * half, 0, 5e-6);
        free(ct), free(st), free(cref), free(sref);
    }
}

static void test_rope_forward(void)
{
    int const T = 6, nseq = 2, nheads = 3, hd = 8, Tmax = 12;
    size_t const rows = (size_t)nseq * T, n = rows * nheads * hd;
    static const double thetas[] = {10000.0, 7.0};
    rng_seed(31);
    float *x = fbuf(n), *y = fbuf(n);
    float *ct = fbuf((size_t)Tmax * hd / 2), *st = fbuf((size_t)Tmax * hd / 2);
    double *ref = dbuf(n);
    int *pos = malloc(rows * sizeof *pos);
    for (int s = 0; s < 2; s++) {
        model_rope_table(ct, st, Tmax, hd, thetas[s]);
        fill_sym(x, n, 1.0);
        /* Positions t = row % T inside each sequence. */
        for (size_t r = 0; r < rows; r++) pos[r] = (int)(r % (size_t)T);
        ref_rope(ref, x, pos, rows, nheads, hd, thetas[s]);
        memcpy(y, x, n * sizeof *y);
        model_rope_apply(y, pos, ct, st, rows, nheads, hd, false);
        EXPECT_CLOSE("rope(x), pos = row % T", y, ref, n, FWD_RTOL, FWD_ATOL);
        /* Arbitrary positions (a context-parallel chunk): the kernel must use pos[]. */
        for (size_t r = 0; r < rows; r++) pos[r] = (int)((r * 7 + 3) % (size_t)Tmax);
        ref_rope(ref, x, pos, rows, nheads, hd, thetas[s]);
        memcpy(y, x, n * sizeof *y);
        model_rope_apply(y, pos, ct, st, rows, nheads, hd, false);
        EXPECT_CLOSE("rope(x), arbitrary pos", y, ref, n, FWD_RTOL, FWD_ATOL);
    }
    free(x), free(y), free(ct), free(st), free(ref), free(pos);
}

/* The backward of a rotation is its transpose: <rope(x), y> = <x, rope^-1(y)>, and
 * rope^-1(rope(x)) = x. */
static void test_rope_inverse(void)
{
    int const T = 7, nseq = 2, nheads = 2, hd = 16;
    size_t const rows = (size_t)nseq * T, n = rows * nheads * hd;
    rng_seed(32);
    float *x = fbuf(n), *y = fbuf(n), *rx = fbuf(n), *iy = fbuf(n);
    float *ct = fbuf((size_t)T * hd / 2), *st = fbuf((size_t)T * hd / 2);
    int *pos = malloc(rows * sizeof *pos);
    for (size_t r = 0; r < rows; r++) pos[r] = (int)(r % (size_t)T);
    model_rope_table(ct, st, T, hd, 10000.0);
    fill_sym(x, n, 1.0);
    fill_sym(y, n, 1.0);
    memcpy(rx, x, n * sizeof *rx);
    model_rope_apply(rx, pos, ct, st, rows, nheads, hd, false);
    memcpy(iy, y, n * sizeof *iy);
    model_rope_apply(iy, pos, ct, st, rows, nheads, hd, true);
    double const lhs = dot_fd(rx, y, n), rhs = dot_fd(x, iy, n);
    if (!near(lhs, rhs, 1e-5, 1e-5))
        fprintf(stderr, "\n    <rope(x), y> = %.9g but <x, rope_inverse(y)> = %.9g\n", lhs, rhs);
    CU_ASSERT(near(lhs, rhs, 1e-5, 1e-5));

    model_rope_apply(rx, pos, ct, st, rows, nheads, hd, true);
    EXPECT_CLOSEF("rope_inverse(rope(x))", rx, x, n, 1e-5, 1e-6);
    /* And the other order. */
    model_rope_apply(iy, pos, ct, st, rows, nheads, hd, false);
    EXPECT_CLOSEF("rope(rope_inverse(y))", iy, y, n, 1e-5, 1e-6);
    free(x), free(y), free(rx), free(iy), free(ct), free(st), free(pos);
}

/* ---------------------------------------------------------------- attention */

static float *attn_scratch(int T)
{
    /* Exactly what the API asks for: a short buffer shows up under ASan with threads. */
    return fbuf(model_attention_scratch_floats(T));
}

static size_t check_probs(const float *probs, const double *ref, int B, int Hl, int T)
{
    size_t bad = 0, cnt = 0;
    for (int bh = 0; bh < B * Hl; bh++)
        for (int t = 0; t < T; t++)
            for (int j = 0; j <= t; j++) {
                size_t const i = ((size_t)bh * T + t) * T + j;
                cnt++;
                if (near(probs[i], ref[i], FWD_RTOL, 1e-6)) continue;
                if (bad < 6)
                    fprintf(stderr, "\n    probs[bh %d, t %d, j %d]: got %.9g, want %.9g", bh,
                            t, j, (double)probs[i], ref[i]);
                bad++;
            }
    return report_bad("attention probs (j <= t)", bad, cnt);
}

static void test_attention_forward(void)
{
    /* (B, T, Hl, Gl, hd): GQA, MHA, MQA, longer heads. */
    static const int cfgs[][5] = {
        {2, 5, 4, 2, 4}, {2, 5, 4, 4, 4}, {1, 6, 4, 1, 4}, {3, 7, 6, 3, 8}, {1, 1, 2, 1, 4},
        /* several causal row blocks, the last one ragged */
        {1, 2 * MODEL_ATTN_BLOCK + 5, 2, 1, 4}};
    rng_seed(41);
    for (size_t s = 0; s < sizeof cfgs / sizeof cfgs[0]; s++) {
        int const B = cfgs[s][0], T = cfgs[s][1], Hl = cfgs[s][2], Gl = cfgs[s][3];
        int const hd = cfgs[s][4];
        size_t const nq = (size_t)B * T * Hl * hd, nk = (size_t)B * T * Gl * hd;
        size_t const np = (size_t)B * Hl * T * T;
        float *q = fbuf(nq), *k = fbuf(nk), *v = fbuf(nk), *out = fbuf(nq), *probs = fbuf(np);
        double *oref = dbuf(nq), *pref = dbuf(np);
        fill_sym(q, nq, 1.5);
        fill_sym(k, nk, 1.5);
        fill_sym(v, nk, 1.0);
        ref_attention(oref, pref, q, k, v, B, T, Hl, Gl, hd);
        fill_const(out, nq, SENTINEL);
        model_attention_forward(out, probs, q, k, v, B, T, Hl, Gl, hd);
        EXPECT_CLOSE("attention out", out, oref, nq, FWD_RTOL, FWD_ATOL);
        CU_ASSERT_EQUAL(check_probs(probs, pref, B, Hl, T), 0);
        free(q), free(k), free(v), free(out), free(probs), free(oref), free(pref);
    }
}

struct attn_ctx {
    float *out, *probs;
    const float *q, *k, *v, *R;
    int B, T, Hl, Gl, hd;
};

static double attn_loss(void *p)
{
    struct attn_ctx *c = p;
    model_attention_forward(c->out, c->probs, c->q, c->k, c->v, c->B, c->T, c->Hl, c->Gl,
                            c->hd);
    return dot_fd(c->out, c->R, (size_t)c->B * c->T * c->Hl * c->hd);
}

static void attention_backward_case(int B, int T, int Hl, int Gl, int hd)
{
    size_t const nq = (size_t)B * T * Hl * hd, nk = (size_t)B * T * Gl * hd;
    rng_seed(42);
    float *q = fbuf(nq), *k = fbuf(nk), *v = fbuf(nk), *out = fbuf(nq), *R = fbuf(nq);
    float *probs = fbuf((size_t)B * Hl * T * T);
    float *dq = fbuf(nq), *dk = fbuf(nk), *dv = fbuf(nk), *scratch = attn_scratch(T);
    fill_sym(q, nq, 1.5);
    fill_sym(k, nk, 1.5);
    fill_sym(v, nk, 1.0);
    fill_sym(R, nq, 1.0);
    struct attn_ctx ctx = {out, probs, q, k, v, R, B, T, Hl, Gl, hd};
    /* dq, dk, dv are assigned (=), so garbage in them must not matter. */
    fill_const(dq, nq, SENTINEL);
    fill_const(dk, nk, SENTINEL);
    fill_const(dv, nk, SENTINEL);
    model_attention_forward(out, probs, q, k, v, B, T, Hl, Gl, hd);
    model_attention_backward(dq, dk, dv, R, probs, q, k, v, B, T, Hl, Gl, hd, scratch);
    EXPECT_FD("q", q, nq, dq, attn_loss, &ctx);
    EXPECT_FD("k", k, nk, dk, attn_loss, &ctx);
    EXPECT_FD("v", v, nk, dv, attn_loss, &ctx);

    /* A second call gives the same values (assignment, not accumulation). */
    float *dq1 = fdup(dq, nq), *dk1 = fdup(dk, nk), *dv1 = fdup(dv, nk);
    model_attention_forward(out, probs, q, k, v, B, T, Hl, Gl, hd);
    model_attention_backward(dq, dk, dv, R, probs, q, k, v, B, T, Hl, Gl, hd, scratch);
    EXPECT_CLOSEF("dq second call", dq, dq1, nq, 1e-6, 1e-7);
    EXPECT_CLOSEF("dk second call", dk, dk1, nk, 1e-6, 1e-7);
    EXPECT_CLOSEF("dv second call", dv, dv1, nk, 1e-6, 1e-7);
    free(q), free(k), free(v), free(out), free(R), free(probs), free(dq), free(dk), free(dv);
    free(scratch), free(dq1), free(dk1), free(dv1);
}

static void test_attention_backward(void)
{
    attention_backward_case(2, 5, 4, 2, 4);
    /* several causal row blocks, the last one ragged */
    attention_backward_case(1, 2 * MODEL_ATTN_BLOCK + 5, 2, 1, 2);
}

/* B = 0 (no sequences) writes nothing and does not crash; T = 1 is attention to oneself:
 * out = v of the head's kv head, dq = dk = 0, dv = sum of dout over the group's heads. */
static void test_attention_edge_sizes(void)
{
    int const Hl = 4, Gl = 2, hd = 4;
    float *q = fbuf(64), *k = fbuf(64), *v = fbuf(64), *out = fbuf(64), *probs = fbuf(64);
    float *dq = fbuf(64), *dk = fbuf(64), *dv = fbuf(64), *dout = fbuf(64);
    float *scratch = attn_scratch(4);
    fill_const(out, 64, SENTINEL);
    fill_const(probs, 64, SENTINEL);
    fill_const(dq, 64, SENTINEL);
    fill_const(dk, 64, SENTINEL);
    fill_const(dv, 64, SENTINEL);
    model_attention_forward(out, probs, q, k, v, 0, 4, Hl, Gl, hd);
    model_attention_backward(dq, dk, dv, dout, probs, q, k, v, 0, 4, Hl, Gl, hd, scratch);
    CU_ASSERT(all_equal(out, 64, SENTINEL));
    CU_ASSERT(all_equal(probs, 64, SENTINEL));
    CU_ASSERT(all_equal(dq, 64, SENTINEL) && all_equal(dk, 64, SENTINEL) &&
              all_equal(dv, 64, SENTINEL));

    int const B = 3, T = 1;
    size_t const nq = (size_t)B * Hl * hd, nk = (size_t)B * Gl * hd;
    rng_seed(43);
    fill_sym(q, nq, 1.0);
    fill_sym(k, nk, 1.0);
    fill_sym(v, nk, 1.0);
    fill_sym(dout, nq, 1.0);
    model_attention_forward(out, probs, q, k, v, B, T, Hl, Gl, hd);
    model_attention_backward(dq, dk, dv, dout, probs, q, k, v, B, T, Hl, Gl, hd, scratch);
    double *want = dbuf(nq), *zero = dbuf(nq), *wdv = dbuf(nk);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hl; h++)
            for (int c = 0; c < hd; c++) {
                int const g = h / (Hl / Gl);
                want[((size_t)b * Hl + h) * hd + c] = v[((size_t)b * Gl + g) * hd + c];
                wdv[((size_t)b * Gl + g) * hd + c] += dout[((size_t)b * Hl + h) * hd + c];
            }
    EXPECT_CLOSE("T=1 attention out", out, want, nq, FWD_RTOL, FWD_ATOL);
    EXPECT_CLOSE("T=1 dq", dq, zero, nq, 0, 1e-6);
    EXPECT_CLOSE("T=1 dk", dk, zero, nk, 0, 1e-6);
    EXPECT_CLOSE("T=1 dv", dv, wdv, nk, FWD_RTOL, FWD_ATOL);
    free(q), free(k), free(v), free(out), free(probs), free(dq), free(dk), free(dv), free(dout);
    free(scratch), free(want), free(zero), free(wdv);
}

/* ---------------------------------------------------------------- flash attention */

/* Element offsets of a (query block, key block) pair as model.h lays it out. */
static size_t fl_qoff(const struct model_attn_blocks *g, int b, int t, int h)
{
    return (((size_t)b * g->q_seq + (size_t)t) * (size_t)g->Hl + (size_t)h) * (size_t)g->hd;
}

static size_t fl_koff(const struct model_attn_blocks *g, int b, int u, int j)
{
    return (((size_t)b * g->k_seq + (size_t)u) * (size_t)g->Gl + (size_t)j) * (size_t)g->hd;
}

static size_t fl_row(const struct model_attn_blocks *g, int b, int t, int h)
{
    return ((size_t)b * g->q_seq + (size_t)t) * (size_t)g->Hl + (size_t)h;
}

/* Attention of one block pair in double with an explicit (Tq, Tk) softmax. Writes out and
 * lse of the block's rows (padding rows between sequences are left as they are), and when
 * dout is given, adds the gradients to dq, dk, dv: with P = softmax(S),
 * dv = P^T dout, dS = P (dout v^T - rowsum(dout * out)), dq = dS k / sqrt(hd),
 * dk = dS^T q / sqrt(hd). */
static void ref_flash(const struct model_attn_blocks *g, const float *q, const float *k,
                      const float *v, const float *dout, double *out, double *lse, double *dq,
                      double *dk, double *dv)
{
    int const hd = g->hd, grp = g->Hl / g->Gl;
    double const scale = 1.0 / sqrt((double)hd);
    double *P = dbuf((size_t)g->Tq * g->Tk), *o = dbuf((size_t)hd);
    for (int b = 0; b < g->B; b++)
        for (int h = 0; h < g->Hl; h++) {
            int const j = h / grp;
            for (int t = 0; t < g->Tq; t++) {
                double *pr = P + (size_t)t * g->Tk, mx = -INFINITY, sum = 0;
                const float *qr = q + fl_qoff(g, b, t, h);
                for (int u = 0; u < g->Tk; u++) {
                    pr[u] = -INFINITY;
                    if (g->mask == MODEL_MASK_CAUSAL && u > t) continue;
                    const float *kr = k + fl_koff(g, b, u, j);
                    double s = 0;
                    for (int c = 0; c < hd; c++) s += (double)qr[c] * kr[c];
                    pr[u] = s * scale;
                    mx = fmax(mx, pr[u]);
                }
                for (int u = 0; u < g->Tk; u++) sum += exp(pr[u] - mx);
                for (int u = 0; u < g->Tk; u++) pr[u] = exp(pr[u] - mx) / sum;
                lse[fl_row(g, b, t, h)] = mx + log(sum);
                for (int c = 0; c < hd; c++) {
                    o[c] = 0;
                    for (int u = 0; u < g->Tk; u++) o[c] += pr[u] * v[fl_koff(g, b, u, j) + c];
                    out[fl_qoff(g, b, t, h) + c] = o[c];
                }
                if (!dout) continue;
                const float *dr = dout + fl_qoff(g, b, t, h);
                double D = 0;
                for (int c = 0; c < hd; c++) D += dr[c] * o[c];
                for (int u = 0; u < g->Tk; u++) {
                    size_t const ku = fl_koff(g, b, u, j);
                    double dp = 0;
                    for (int c = 0; c < hd; c++) dp += (double)dr[c] * v[ku + c];
                    double const ds = pr[u] * (dp - D) * scale;
                    for (int c = 0; c < hd; c++) {
                        dq[fl_qoff(g, b, t, h) + c] += ds * k[ku + c];
                        dk[ku + c] += ds * qr[c];
                        dv[ku + c] += pr[u] * dr[c];
                    }
                }
            }
        }
    free(P), free(o);
}

/* Inputs, outputs and scratch of one block pair. Outputs start as SENTINEL (out, lse,
 * delta) or small random values (dq, dk, dv: the backward accumulates onto them). */
struct fl_data {
    struct model_attn_blocks g;
    size_t nq, nk, nr; /* floats of q-shaped, k-shaped and lse-shaped tensors */
    float *q, *k, *v, *dout, *out, *lse, *delta, *dq, *dk, *dv, *scratch;
};

static struct model_attn_blocks fl_blocks(int B, int Tq, int Tk, int pad, int Hl, int Gl,
                                          int hd, enum model_attn_mask mask)
{
    struct model_attn_blocks g = {B, Tq, Tk, (size_t)(Tq + pad), (size_t)(Tk + 2 * pad),
                                  Hl, Gl, hd, mask};
    return g;
}

static void fl_alloc(struct fl_data *d, const struct model_attn_blocks *g, uint64_t seed)
{
    d->g = *g;
    d->nr = (size_t)g->B * g->q_seq * g->Hl;
    d->nq = d->nr * g->hd;
    d->nk = (size_t)g->B * g->k_seq * g->Gl * g->hd;
    rng_seed(seed);
    d->q = fbuf(d->nq), d->dout = fbuf(d->nq), d->out = fbuf(d->nq), d->dq = fbuf(d->nq);
    d->k = fbuf(d->nk), d->v = fbuf(d->nk), d->dk = fbuf(d->nk), d->dv = fbuf(d->nk);
    d->lse = fbuf(d->nr), d->delta = fbuf(d->nr);
    /* exactly what the API asks for: a short buffer shows up under ASan */
    d->scratch = fbuf(model_flash_scratch_floats(g->Tk, g->hd));
    fill_sym(d->q, d->nq, 1.5);
    fill_sym(d->k, d->nk, 1.5);
    fill_sym(d->v, d->nk, 1.0);
    fill_sym(d->dout, d->nq, 1.0);
    fill_sym(d->dq, d->nq, 0.1);
    fill_sym(d->dk, d->nk, 0.1);
    fill_sym(d->dv, d->nk, 0.1);
    fill_const(d->out, d->nq, SENTINEL);
    fill_const(d->lse, d->nr, SENTINEL);
    fill_const(d->delta, d->nr, SENTINEL);
}

static void fl_free(struct fl_data *d)
{
    free(d->q), free(d->k), free(d->v), free(d->dout), free(d->out), free(d->lse);
    free(d->delta), free(d->dq), free(d->dk), free(d->dv), free(d->scratch);
}

/* Forward (overwriting), delta, backward (accumulating). */
static void fl_run(struct fl_data *d)
{
    model_flash_forward(d->out, d->lse, d->q, d->k, d->v, &d->g, false, d->scratch);
    model_flash_delta(d->delta, d->dout, d->out, &d->g);
    model_flash_backward(d->dq, d->dk, d->dv, d->dout, d->lse, d->delta, d->q, d->k, d->v,
                         &d->g, d->scratch);
}

static double *ddup(const float *x, size_t n)
{
    double *p = dbuf(n);
    for (size_t i = 0; i < n; i++) p[i] = x[i];
    return p;
}

/* Gradients add up over up to 200 keys of terms of both signs, each off by a few fp32
 * ulp, and dS = P (dP - delta) cancels: 1e-4 relative (1e-5 absolute for the sums that
 * cancel to near zero); the largest error measured at these sizes is under 1/20 of it.
 * A wrong term is O(1). */
#define BWD_RTOL 1e-4
#define BWD_ATOL 1e-5

/* (B, Tq, Tk, pad, Hl, Gl, hd, mask): lengths off the 64 x 128 tiles, one row, one key,
 * GQA, MHA and MQA, several sequences with padding rows between them (q_seq = Tq + pad,
 * k_seq = Tk + 2 pad), full blocks of unequal lengths. */
static const int flash_cases[][8] = {
    {2, 1, 1, 3, 4, 2, 8, MODEL_MASK_CAUSAL},     {2, 7, 7, 2, 4, 2, 8, MODEL_MASK_CAUSAL},
    {2, 67, 67, 5, 4, 4, 8, MODEL_MASK_CAUSAL},   {1, 200, 200, 0, 4, 2, 16, MODEL_MASK_CAUSAL},
    {2, 200, 200, 11, 2, 1, 4, MODEL_MASK_CAUSAL}, {2, 7, 67, 1, 4, 2, 8, MODEL_MASK_FULL},
    {2, 67, 7, 3, 4, 4, 8, MODEL_MASK_FULL},      {1, 1, 200, 0, 4, 2, 8, MODEL_MASK_FULL},
    {2, 200, 1, 2, 4, 2, 8, MODEL_MASK_FULL},     {2, 130, 257, 1, 4, 1, 8, MODEL_MASK_FULL},
};

static struct model_attn_blocks flash_case(size_t s)
{
    const int *c = flash_cases[s];
    return fl_blocks(c[0], c[1], c[2], c[3], c[4], c[5], c[6], (enum model_attn_mask)c[7]);
}

/* Forward and backward against ref_flash; padding rows keep their prior values. */
static void test_flash_vs_reference(void)
{
    for (size_t s = 0; s < sizeof flash_cases / sizeof flash_cases[0]; s++) {
        struct model_attn_blocks const g = flash_case(s);
        struct fl_data d;
        fl_alloc(&d, &g, 100 + s);
        double *out = ddup(d.out, d.nq), *lse = ddup(d.lse, d.nr), *delta = ddup(d.delta, d.nr);
        double *dq = ddup(d.dq, d.nq), *dk = ddup(d.dk, d.nk), *dv = ddup(d.dv, d.nk);
        ref_flash(&g, d.q, d.k, d.v, d.dout, out, lse, dq, dk, dv);
        for (int b = 0; b < g.B; b++)
            for (int t = 0; t < g.Tq; t++)
                for (int h = 0; h < g.Hl; h++) {
                    double D = 0;
                    for (int c = 0; c < g.hd; c++)
                        D += d.dout[fl_qoff(&g, b, t, h) + c] * out[fl_qoff(&g, b, t, h) + c];
                    delta[fl_row(&g, b, t, h)] = D;
                }
        fl_run(&d);
        EXPECT_CLOSE("flash out", d.out, out, d.nq, FWD_RTOL, FWD_ATOL);
        EXPECT_CLOSE("flash lse", d.lse, lse, d.nr, FWD_RTOL, FWD_ATOL);
        EXPECT_CLOSE("flash delta", d.delta, delta, d.nr, FWD_RTOL, FWD_ATOL);
        EXPECT_CLOSE("flash dq", d.dq, dq, d.nq, BWD_RTOL, BWD_ATOL);
        EXPECT_CLOSE("flash dk", d.dk, dk, d.nk, BWD_RTOL, BWD_ATOL);
        EXPECT_CLOSE("flash dv", d.dv, dv, d.nk, BWD_RTOL, BWD_ATOL);
        fl_free(&d);
        free(out), free(lse), free(delta), free(dq), free(dk), free(dv);
    }
}

struct fl_fd_ctx {
    struct fl_data *d;
};

static double flash_loss(void *p)
{
    struct fl_data *d = ((struct fl_fd_ctx *)p)->d;
    model_flash_forward(d->out, d->lse, d->q, d->k, d->v, &d->g, false, d->scratch);
    /* padding rows of out hold SENTINEL, dout is zero there */
    return dot_fd(d->out, d->dout, d->nq);
}

/* Zeroes the padding rows of dout so that L = sum(out * dout) sees only the block. */
static void fl_zero_padding(struct fl_data *d)
{
    for (int b = 0; b < d->g.B; b++)
        for (size_t t = (size_t)d->g.Tq; t < d->g.q_seq; t++)
            memset(d->dout + fl_qoff(&d->g, b, (int)t, 0), 0,
                   (size_t)d->g.Hl * d->g.hd * sizeof(float));
}

static void test_flash_finite_differences(void)
{
    struct model_attn_blocks const cases[] = {
        fl_blocks(2, 7, 7, 2, 4, 2, 4, MODEL_MASK_CAUSAL),
        fl_blocks(2, 5, 9, 1, 2, 1, 4, MODEL_MASK_FULL),
        /* over two 128-key tiles and three 64-row tiles, the last ones ragged */
        fl_blocks(1, 133, 133, 0, 2, 1, 2, MODEL_MASK_CAUSAL),
    };
    for (size_t s = 0; s < sizeof cases / sizeof cases[0]; s++) {
        struct fl_data d;
        fl_alloc(&d, &cases[s], 200 + s);
        fl_zero_padding(&d);
        memset(d.dq, 0, d.nq * sizeof(float));
        memset(d.dk, 0, d.nk * sizeof(float));
        memset(d.dv, 0, d.nk * sizeof(float));
        fl_run(&d);
        struct fl_fd_ctx ctx = {&d};
        EXPECT_FD("q (flash)", d.q, d.nq, d.dq, flash_loss, &ctx);
        EXPECT_FD("k (flash)", d.k, d.nk, d.dk, flash_loss, &ctx);
        EXPECT_FD("v (flash)", d.v, d.nk, d.dv, flash_loss, &ctx);
        fl_free(&d);
    }
}

/* A causal sequence cut into chunks of unequal length, as context parallelism cuts it. */
enum { FL_CHUNKS = 4 };
static const int fl_chunk_len[FL_CHUNKS] = {50, 67, 13, 70};

static int fl_chunk_start(int a)
{
    int s = 0;
    for (int i = 0; i < a; i++) s += fl_chunk_len[i];
    return s;
}

/* The pair (query chunk a, key chunk b <= a) of the whole block w: full below the
 * diagonal, causal on it. */
static struct model_attn_blocks fl_pair(const struct model_attn_blocks *w, int a, int b)
{
    struct model_attn_blocks p = *w;
    p.Tq = fl_chunk_len[a];
    p.Tk = fl_chunk_len[b];
    p.mask = a == b ? MODEL_MASK_CAUSAL : MODEL_MASK_FULL;
    return p;
}

/* Key chunk of the i-th call for query chunk a in one of three orders: ascending (the
 * first call overwrites), descending, and the diagonal first; the last two merge from
 * the start onto lse = -INFINITY and out = NaN. */
static int fl_order(int order, int a, int i)
{
    if (order == 0) return i;
    if (order == 1) return a - i;
    return i == 0 ? a : i - 1;
}

/* out, lse (d->out, d->lse) merged over the key chunks of every query chunk; skip >= 0
 * leaves that key chunk out (to show that the comparison notices). */
static void fl_forward_chunked(struct fl_data *d, int order, int skip)
{
    struct model_attn_blocks const *w = &d->g;
    size_t const qs = (size_t)w->Hl * w->hd, ks = (size_t)w->Gl * w->hd;
    for (int b = 0; order != 0 && b < w->B; b++) {
        fill_const(d->out + fl_qoff(w, b, 0, 0), (size_t)w->Tq * qs, NAN);
        fill_const(d->lse + fl_row(w, b, 0, 0), (size_t)w->Tq * w->Hl, -INFINITY);
    }
    for (int a = 0; a < FL_CHUNKS; a++) {
        size_t const ra = (size_t)fl_chunk_start(a);
        for (int i = 0; i <= a; i++) {
            int const b = fl_order(order, a, i);
            if (b == skip) continue;
            size_t const rb = (size_t)fl_chunk_start(b);
            struct model_attn_blocks const p = fl_pair(w, a, b);
            model_flash_forward(d->out + ra * qs, d->lse + ra * w->Hl, d->q + ra * qs,
                                d->k + rb * ks, d->v + rb * ks, &p, order != 0 || i > 0,
                                d->scratch);
        }
    }
}

/* dq, dk, dv accumulated over every (query chunk, key chunk) pair, with the final lse and
 * delta of the whole rows; pairs in descending query chunk order. */
static void fl_backward_chunked(struct fl_data *d)
{
    struct model_attn_blocks const *w = &d->g;
    size_t const qs = (size_t)w->Hl * w->hd, ks = (size_t)w->Gl * w->hd;
    model_flash_delta(d->delta, d->dout, d->out, w);
    for (int a = FL_CHUNKS - 1; a >= 0; a--)
        for (int b = 0; b <= a; b++) {
            size_t const ra = (size_t)fl_chunk_start(a), rb = (size_t)fl_chunk_start(b);
            struct model_attn_blocks const p = fl_pair(w, a, b);
            model_flash_backward(d->dq + ra * qs, d->dk + rb * ks, d->dv + rb * ks,
                                 d->dout + ra * qs, d->lse + ra * w->Hl, d->delta + ra * w->Hl,
                                 d->q + ra * qs, d->k + rb * ks, d->v + rb * ks, &p,
                                 d->scratch);
        }
}

/* Two copies of the same inputs for the chunked sequence (2 sequences of all the chunks,
 * padded), the whole run (forward, delta, backward) on the first. */
static void fl_whole_and_part(struct fl_data *whole, struct fl_data *part, uint64_t seed)
{
    int const T = fl_chunk_start(FL_CHUNKS);
    struct model_attn_blocks const w = fl_blocks(2, T, T, 5, 4, 2, 8, MODEL_MASK_CAUSAL);
    fl_alloc(whole, &w, seed);
    fl_alloc(part, &w, seed);
    fl_run(whole);
}

/* The whole causal attention of a 200-row sequence against its 4 chunks merged in any
 * order (forward), and against the pairs' backwards accumulated. Merging is exact up to
 * fp32 rounding of the combination, hence the tolerances of a double reference. */
static void test_flash_merge(void)
{
    struct fl_data whole, part;
    fl_whole_and_part(&whole, &part, 300);
    for (int order = 0; order < 3; order++) {
        fl_forward_chunked(&part, order, -1);
        EXPECT_CLOSEF("merged out vs whole", part.out, whole.out, whole.nq, FWD_RTOL, 1e-6);
        EXPECT_CLOSEF("merged lse vs whole", part.lse, whole.lse, whole.nr, FWD_RTOL, 1e-6);
    }
    fl_backward_chunked(&part);
    EXPECT_CLOSEF("chunked delta vs whole", part.delta, whole.delta, whole.nr, FWD_RTOL, 1e-6);
    EXPECT_CLOSEF("chunked dq vs whole", part.dq, whole.dq, whole.nq, BWD_RTOL, BWD_ATOL);
    EXPECT_CLOSEF("chunked dk vs whole", part.dk, whole.dk, whole.nk, BWD_RTOL, BWD_ATOL);
    EXPECT_CLOSEF("chunked dv vs whole", part.dv, whole.dv, whole.nk, BWD_RTOL, BWD_ATOL);
    fl_free(&whole), fl_free(&part);
}

/* The flash kernels against model_attention_* (materialised probabilities) at lengths
 * from one tile to several, contiguous sequences. */
static void test_flash_vs_old_kernel(void)
{
    static const int lens[] = {64, 131, 300};
    int const B = 2, Hl = 4, Gl = 2, hd = 16;
    for (size_t s = 0; s < sizeof lens / sizeof lens[0]; s++) {
        int const T = lens[s];
        struct model_attn_blocks const g = fl_blocks(B, T, T, 0, Hl, Gl, hd, MODEL_MASK_CAUSAL);
        struct fl_data d;
        fl_alloc(&d, &g, 400 + s);
        memset(d.dq, 0, d.nq * sizeof(float));
        memset(d.dk, 0, d.nk * sizeof(float));
        memset(d.dv, 0, d.nk * sizeof(float));
        fl_run(&d);
        float *out = fbuf(d.nq), *probs = fbuf((size_t)B * Hl * T * T);
        float *scratch = attn_scratch(T);
        float *dq = fbuf(d.nq), *dk = fbuf(d.nk), *dv = fbuf(d.nk);
        model_attention_forward(out, probs, d.q, d.k, d.v, B, T, Hl, Gl, hd);
        model_attention_backward(dq, dk, dv, d.dout, probs, d.q, d.k, d.v, B, T, Hl, Gl, hd,
                                 scratch);
        EXPECT_CLOSEF("flash out vs model_attention_forward", d.out, out, d.nq, FWD_RTOL, 1e-6);
        EXPECT_CLOSEF("flash dq vs model_attention_backward", d.dq, dq, d.nq, BWD_RTOL, BWD_ATOL);
        EXPECT_CLOSEF("flash dk vs model_attention_backward", d.dk, dk, d.nk, BWD_RTOL, BWD_ATOL);
        EXPECT_CLOSEF("flash dv vs model_attention_backward", d.dv, dv, d.nk, BWD_RTOL, BWD_ATOL);
        fl_free(&d);
        free(out), free(probs), free(scratch), free(dq), free(dk), free(dv);
    }
}

/* Everything the kernels write, for the comparison across thread counts. */
static void fl_run_threads(struct fl_data *d, const struct model_attn_blocks *g, int nthreads)
{
    omp_set_num_threads(nthreads);
    fl_alloc(d, g, 500);
    fl_run(d);
    /* and a full block merged onto the result, as context parallelism does */
    struct model_attn_blocks h = *g;
    h.mask = MODEL_MASK_FULL;
    h.Tq = 67;
    model_flash_forward(d->out, d->lse, d->q, d->k, d->v, &h, true, d->scratch);
    omp_set_num_threads(max_threads_saved);
}

static int fl_same_bits(const char *what, const float *a, const float *b, size_t n)
{
    if (memcmp(a, b, n * sizeof *a) == 0) return 1;
    fprintf(stderr, "\n    %s: results differ between thread counts", what);
    return 0;
}

/* Each output element is summed in one fixed order whatever the threads: bit-identical. */
static void test_flash_thread_determinism(void)
{
    struct model_attn_blocks const g = fl_blocks(2, 200, 200, 3, 4, 2, 16, MODEL_MASK_CAUSAL);
    struct fl_data one;
    fl_run_threads(&one, &g, 1);
    for (int nth = 2; nth <= 3; nth++) {
        struct fl_data d;
        fl_run_threads(&d, &g, nth);
        CU_ASSERT(fl_same_bits("flash out", d.out, one.out, d.nq));
        CU_ASSERT(fl_same_bits("flash lse", d.lse, one.lse, d.nr));
        CU_ASSERT(fl_same_bits("flash delta", d.delta, one.delta, d.nr));
        CU_ASSERT(fl_same_bits("flash dq", d.dq, one.dq, d.nq));
        CU_ASSERT(fl_same_bits("flash dk", d.dk, one.dk, d.nk));
        CU_ASSERT(fl_same_bits("flash dv", d.dv, one.dv, d.nk));
        fl_free(&d);
    }
    fl_free(&one);
}

/* Elements of got outside the tolerance of want, silently. */
static size_t fl_count_far(const float *got, const float *want, size_t n, double rtol,
                           double atol)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += !near(got[i], want[i], rtol, atol);
    return bad;
}

/* The comparisons above catch a wrong kernel: a corrupted element of q changes one
 * (row, head) of out, a key chunk left out of a merge changes the later query chunks, a
 * final lse off by 1e-3 on one row changes dq of that row. */
static void test_flash_errors_are_caught(void)
{
    struct fl_data whole, part;
    fl_whole_and_part(&whole, &part, 600);
    struct model_attn_blocks const w = whole.g;
    size_t const row = fl_row(&w, 1, 77, 3);
    part.q[row * w.hd + 2] += 0.5f;
    model_flash_forward(part.out, part.lse, part.q, part.k, part.v, &w, false, part.scratch);
    size_t const bad_q = fl_count_far(part.out, whole.out, whole.nq, FWD_RTOL, 1e-6);
    CU_ASSERT(bad_q > 0 && bad_q <= (size_t)w.hd);
    part.q[row * w.hd + 2] -= 0.5f;

    fl_forward_chunked(&part, 1, 2);
    CU_ASSERT(fl_count_far(part.out, whole.out, whole.nq, FWD_RTOL, 1e-6) > 0);

    fl_forward_chunked(&part, 1, -1);
    CU_ASSERT_EQUAL(fl_count_far(part.out, whole.out, whole.nq, FWD_RTOL, 1e-6), 0);
    part.lse[row] += 1e-3f;
    fl_backward_chunked(&part);
    CU_ASSERT(fl_count_far(part.dq, whole.dq, whole.nq, BWD_RTOL, BWD_ATOL) > 0);
    fl_free(&whole), fl_free(&part);
}

/* B = 0 writes nothing. */
static void test_flash_no_sequences(void)
{
    struct model_attn_blocks g = fl_blocks(1, 5, 5, 0, 4, 2, 4, MODEL_MASK_CAUSAL);
    struct fl_data d;
    fl_alloc(&d, &g, 700);
    fill_const(d.dq, d.nq, SENTINEL);
    fill_const(d.dk, d.nk, SENTINEL);
    fill_const(d.dv, d.nk, SENTINEL);
    d.g.B = 0;
    fl_run(&d);
    CU_ASSERT(all_equal(d.out, d.nq, SENTINEL) && all_equal(d.lse, d.nr, SENTINEL));
    CU_ASSERT(all_equal(d.delta, d.nr, SENTINEL) && all_equal(d.dq, d.nq, SENTINEL));
    CU_ASSERT(all_equal(d.dk, d.nk, SENTINEL) && all_equal(d.dv, d.nk, SENTINEL));
    fl_free(&d);
}

/* ---------------------------------------------------------------- router */

static void test_router_forward(void)
{
    /* (n, E, k) */
    static const int cfgs[][3] = {{10, 8, 2}, {7, 5, 1}, {4, 4, 4}, {6, 16, 3}};
    rng_seed(51);
    for (size_t s = 0; s < sizeof cfgs / sizeof cfgs[0]; s++) {
        size_t const n = (size_t)cfgs[s][0];
        int const E = cfgs[s][1], k = cfgs[s][2];
        float *logits = fbuf(n * E), *probs = fbuf(n * E), *tw = fbuf(n * k), *lse = fbuf(n);
        int *idx = malloc(n * k * sizeof *idx), *ridx = malloc(n * k * sizeof *ridx);
        double *pref = dbuf(n * E), *wref = dbuf(n * k), *lref = dbuf(n);
        fill_sym(logits, n * E, 3.0);
        /* A row far from 0, where exp without the max subtracted overflows. */
        for (int e = 0; e < E; e++) logits[E + e] += 200.0f;
        for (size_t t = 0; t < n; t++)
            ref_router_row(pref + t * E, ridx + t * k, wref + t * k, lref + t,
                           logits + t * E, E, k);
        model_router_forward(probs, idx, tw, lse, logits, n, E, k);
        EXPECT_CLOSE("router probs", probs, pref, n * E, FWD_RTOL, 1e-7);
        EXPECT_CLOSE("router lse", lse, lref, n, FWD_RTOL, FWD_ATOL);
        EXPECT_CLOSE("router topk_w", tw, wref, n * k, FWD_RTOL, 1e-7);
        size_t bad = 0;
        for (size_t i = 0; i < n * k; i++)
            if (idx[i] != ridx[i]) {
                if (bad++ < 6)
                    fprintf(stderr, "\n    topk_idx[%zu]: got %d, want %d", i, idx[i], ridx[i]);
            }
        CU_ASSERT_EQUAL(report_bad("router topk_idx", bad, n * k), 0);
        free(logits), free(probs), free(tw), free(lse), free(idx), free(ridx), free(pref);
        free(wref), free(lref);
    }
}

/* Exact ties in p (equal logits) go to the lower expert index. */
static void test_router_ties(void)
{
    int const E = 4, k = 2;
    static const float logits[] = {
        1, 2, 2, 0,    /* -> 1, 2 */
        0, 0, 0, 0,    /* -> 0, 1 */
        3, 1, 3, 3,    /* -> 0, 2 */
        -1, 5, -1, -1, /* -> 1, 0 */
        2, 2, 7, 2,    /* -> 2, 0 */
    };
    static const int want[] = {1, 2, 0, 1, 0, 2, 1, 0, 2, 0};
    size_t const n = 5;
    float probs[20], tw[10], lse[5];
    int idx[10];
    model_router_forward(probs, idx, tw, lse, logits, n, E, k);
    for (size_t i = 0; i < n * k; i++) {
        if (idx[i] != want[i])
            fprintf(stderr, "\n    ties: topk_idx[row %zu, slot %zu] = %d, want %d\n", i / 2,
                    i % 2, idx[i], want[i]);
        CU_ASSERT_EQUAL(idx[i], want[i]);
    }
    /* Rows 0-2 pick two equal p: weights 1/2 each. */
    for (size_t i = 0; i < 6; i++) CU_ASSERT(near(tw[i], 0.5, 1e-6, 0));
}

struct router_ctx {
    float *probs, *tw, *lse;
    int *idx;
    const float *logits, *D, *A;
    float zc;
    size_t n;
    int E, k;
};

/* L = sum_t [ sum_j D_tj w_tj + sum_e A_e p_te + zc/2 lse_t^2 ]: dL/dw = D, dL/dp_te =
 * A_e, dL/dlse_t = zc lse_t, the three gradients model_router_backward takes. */
static double router_loss(void *p)
{
    struct router_ctx *c = p;
    model_router_forward(c->probs, c->idx, c->tw, c->lse, c->logits, c->n, c->E, c->k);
    double L = 0;
    for (size_t t = 0; t < c->n; t++) {
        for (int j = 0; j < c->k; j++) L += (double)c->D[t * c->k + j] * c->tw[t * c->k + j];
        for (int e = 0; e < c->E; e++) L += (double)c->A[e] * c->probs[t * c->E + e];
        L += 0.5 * c->zc * (double)c->lse[t] * c->lse[t];
    }
    return L;
}

/* Logits whose ranks are separated by >= 0.2, far more than the finite-difference step,
 * so the top-k choice does not flip under perturbation. */
static void router_logits(float *logits, size_t n, int E)
{
    int perm[64];
    for (size_t t = 0; t < n; t++) {
        for (int e = 0; e < E; e++) perm[e] = e;
        for (int e = E - 1; e > 0; e--) {
            int const r = rng_int(e + 1), tmp = perm[e];
            perm[e] = perm[r];
            perm[r] = tmp;
        }
        for (int e = 0; e < E; e++)
            logits[t * E + e] = 0.3f * (float)perm[e] - 1.0f + rng_sym(0.05);
    }
}

static void router_fd_case(const char *label, int use_w, int use_aux, int use_z, int drop)
{
    size_t const n = 6;
    int const E = 8, k = 3;
    float *logits = fbuf(n * E), *probs = fbuf(n * E), *tw = fbuf(n * k), *lse = fbuf(n);
    float *D = fbuf(n * k), *A = fbuf(E), *dlogits = fbuf(n * E);
    int *idx = malloc(n * k * sizeof *idx);
    router_logits(logits, n, E);
    if (use_w) fill_sym(D, n * k, 1.0);
    if (use_aux) fill_sym(A, E, 1.0);
    float const zc = use_z ? 0.37f : 0.0f;
    if (drop) { /* dropped slots get dtopk_w = 0; row 4 lost all of them */
        D[0 * k + 2] = 0;
        D[1 * k + 0] = 0;
        D[3 * k + 1] = 0;
        D[4 * k + 0] = D[4 * k + 1] = D[4 * k + 2] = 0;
    }
    struct router_ctx ctx = {probs, tw, lse, idx, logits, D, A, zc, n, E, k};
    model_router_forward(probs, idx, tw, lse, logits, n, E, k);
    fill_const(dlogits, n * E, SENTINEL);
    model_router_backward(dlogits, D, probs, idx, tw, lse, A, zc, n, E, k);
    EXPECT_FD(label, logits, n * E, dlogits, router_loss, &ctx);
    free(logits), free(probs), free(tw), free(lse), free(D), free(A), free(dlogits), free(idx);
}

static void test_router_backward(void)
{
    rng_seed(52);
    router_fd_case("logits (topk_w term)", 1, 0, 0, 0);
    router_fd_case("logits (aux term)", 0, 1, 0, 0);
    router_fd_case("logits (z term)", 0, 0, 1, 0);
    router_fd_case("logits (all terms)", 1, 1, 1, 0);
    router_fd_case("logits (all terms, dropped slots)", 1, 1, 1, 1);
}

/* ---------------------------------------------------------------- experts */

static void test_expert_forward(void)
{
    size_t const n = 13;
    int const d = 16, F = 24;
    rng_seed(61);
    float *x = fbuf(n * d), *w1 = fbuf((size_t)F * d), *w3 = fbuf((size_t)F * d);
    float *w2 = fbuf((size_t)d * F), *y = fbuf(n * d), *h1 = fbuf(n * F), *h3 = fbuf(n * F);
    float *act = fbuf(n * F);
    double *yr = dbuf(n * d), *h1r = dbuf(n * F), *h3r = dbuf(n * F), *ar = dbuf(n * F);
    fill_sym(x, n * d, 1.0);
    fill_sym(w1, (size_t)F * d, 0.5);
    fill_sym(w3, (size_t)F * d, 0.5);
    fill_sym(w2, (size_t)d * F, 0.5);
    ref_expert(yr, h1r, h3r, ar, x, w1, w3, w2, n, d, F);
    fill_const(y, n * d, SENTINEL);
    model_expert_forward(y, h1, h3, act, x, w1, w3, w2, n, d, F);
    EXPECT_CLOSE("expert y", y, yr, n * d, FWD_RTOL, FWD_ATOL);
    EXPECT_CLOSE("expert h1", h1, h1r, n * F, FWD_RTOL, FWD_ATOL);
    EXPECT_CLOSE("expert h3", h3, h3r, n * F, FWD_RTOL, FWD_ATOL);
    EXPECT_CLOSE("expert act", act, ar, n * F, FWD_RTOL, FWD_ATOL);
    free(x), free(w1), free(w3), free(w2), free(y), free(h1), free(h3), free(act), free(yr);
    free(h1r), free(h3r), free(ar);
}

struct expert_ctx {
    float *y, *h1, *h3, *act;
    const float *x, *w1, *w3, *w2, *R;
    size_t n;
    int d, F;
};

static double expert_loss(void *p)
{
    struct expert_ctx *c = p;
    model_expert_forward(c->y, c->h1, c->h3, c->act, c->x, c->w1, c->w3, c->w2, c->n, c->d,
                         c->F);
    return dot_fd(c->y, c->R, c->n * (size_t)c->d);
}

static void test_expert_backward(void)
{
    size_t const n = 6;
    int const d = 8, F = 5;
    size_t const nx = n * d, nw = (size_t)F * d, nh = n * F;
    rng_seed(62);
    float *x = fbuf(nx), *w1 = fbuf(nw), *w3 = fbuf(nw), *w2 = fbuf(nw), *R = fbuf(nx);
    float *y = fbuf(nx), *h1 = fbuf(nh), *h3 = fbuf(nh), *act = fbuf(nh);
    float *dx = fbuf(nx), *dw1 = fbuf(nw), *dw3 = fbuf(nw), *dw2 = fbuf(nw);
    float *scratch = fbuf(n * 2 * F);
    fill_sym(x, nx, 1.0);
    fill_sym(w1, nw, 0.7);
    fill_sym(w3, nw, 0.7);
    fill_sym(w2, nw, 0.7);
    fill_sym(R, nx, 1.0);
    struct expert_ctx ctx = {y, h1, h3, act, x, w1, w3, w2, R, n, d, F};
    model_expert_forward(y, h1, h3, act, x, w1, w3, w2, n, d, F);
    fill_const(dx, nx, SENTINEL); /* dx is assigned */
    model_expert_backward(dx, dw1, dw3, dw2, R, h1, h3, act, x, w1, w3, w2, n, d, F, scratch);
    EXPECT_FD("x", x, nx, dx, expert_loss, &ctx);
    EXPECT_FD("w1", w1, nw, dw1, expert_loss, &ctx);
    EXPECT_FD("w3", w3, nw, dw3, expert_loss, &ctx);
    EXPECT_FD("w2", w2, nw, dw2, expert_loss, &ctx);

    /* Weight gradients accumulate, dx does not. */
    float *dx1 = fdup(dx, nx), *g1 = fdup(dw1, nw), *g3 = fdup(dw3, nw), *g2 = fdup(dw2, nw);
    for (size_t i = 0; i < nw; i++) g1[i] *= 2, g3[i] *= 2, g2[i] *= 2;
    model_expert_forward(y, h1, h3, act, x, w1, w3, w2, n, d, F);
    model_expert_backward(dx, dw1, dw3, dw2, R, h1, h3, act, x, w1, w3, w2, n, d, F, scratch);
    EXPECT_CLOSEF("expert dx second call", dx, dx1, nx, 1e-6, 1e-7);
    EXPECT_CLOSEF("expert dw1 after two calls", dw1, g1, nw, 1e-6, 1e-7);
    EXPECT_CLOSEF("expert dw3 after two calls", dw3, g3, nw, 1e-6, 1e-7);
    EXPECT_CLOSEF("expert dw2 after two calls", dw2, g2, nw, 1e-6, 1e-7);
    free(x), free(w1), free(w3), free(w2), free(R), free(y), free(h1), free(h3), free(act);
    free(dx), free(dw1), free(dw3), free(dw2), free(scratch), free(dx1), free(g1), free(g3);
    free(g2);
}

/* An expert that receives no tokens: nothing written, weight gradients unchanged. */
static void test_expert_empty(void)
{
    int const d = 8, F = 6;
    size_t const nw = (size_t)F * d;
    rng_seed(63);
    float *x = fbuf(16), *w1 = fbuf(nw), *w3 = fbuf(nw), *w2 = fbuf(nw);
    float *y = fbuf(16), *h1 = fbuf(16), *h3 = fbuf(16), *act = fbuf(16), *dy = fbuf(16);
    float *dx = fbuf(16), *dw1 = fbuf(nw), *dw3 = fbuf(nw), *dw2 = fbuf(nw), *scr = fbuf(16);
    fill_sym(w1, nw, 1.0);
    fill_sym(w3, nw, 1.0);
    fill_sym(w2, nw, 1.0);
    fill_sym(dw1, nw, 1.0);
    fill_sym(dw3, nw, 1.0);
    fill_sym(dw2, nw, 1.0);
    float *g1 = fdup(dw1, nw), *g3 = fdup(dw3, nw), *g2 = fdup(dw2, nw);
    fill_const(y, 16, SENTINEL);
    fill_const(h1, 16, SENTINEL);
    fill_const(h3, 16, SENTINEL);
    fill_const(act, 16, SENTINEL);
    fill_const(dx, 16, SENTINEL);
    fill_const(scr, 16, SENTINEL);
    model_expert_forward(y, h1, h3, act, x, w1, w3, w2, 0, d, F);
    model_expert_backward(dx, dw1, dw3, dw2, dy, h1, h3, act, x, w1, w3, w2, 0, d, F, scr);
    CU_ASSERT(all_equal(y, 16, SENTINEL) && all_equal(h1, 16, SENTINEL) &&
              all_equal(h3, 16, SENTINEL) && all_equal(act, 16, SENTINEL));
    CU_ASSERT(all_equal(dx, 16, SENTINEL));
    EXPECT_CLOSEF("dw1 after empty backward", dw1, g1, nw, 0, 0);
    EXPECT_CLOSEF("dw3 after empty backward", dw3, g3, nw, 0, 0);
    EXPECT_CLOSEF("dw2 after empty backward", dw2, g2, nw, 0, 0);

    /* Empty router and matmul blocks as well (a rank whose tokens all went elsewhere). */
    int ridx[4] = {-7, -7, -7, -7};
    model_router_forward(y, ridx, h3, act, x, 0, 4, 2);
    CU_ASSERT(all_equal(y, 16, SENTINEL) && all_equal(h3, 16, SENTINEL) &&
              all_equal(act, 16, SENTINEL) && ridx[0] == -7 && ridx[3] == -7);
    model_matmul_forward(y, x, w1, 0, (size_t)d, (size_t)F, false);
    model_matmul_backward(dx, dw1, dy, x, w1, 0, (size_t)d, (size_t)F, false);
    CU_ASSERT(all_equal(y, 16, SENTINEL) && all_equal(dx, 16, SENTINEL));
    EXPECT_CLOSEF("matmul dw after empty backward", dw1, g1, nw, 0, 0);
    free(x), free(w1), free(w3), free(w2), free(y), free(h1), free(h3), free(act), free(dy);
    free(dx), free(dw1), free(dw3), free(dw2), free(scr), free(g1), free(g3), free(g2);
}

/* ---------------------------------------------------------------- loss pieces */

static void ref_ce_stats(double *mx, double *sum, const float *logits, size_t n, size_t V)
{
    for (size_t t = 0; t < n; t++) {
        double m = -INFINITY, s = 0;
        for (size_t j = 0; j < V; j++) m = fmax(m, logits[t * V + j]);
        for (size_t j = 0; j < V; j++) s += exp(logits[t * V + j] - m);
        mx[t] = m;
        sum[t] = s;
    }
}

static void test_softmax_stats_target(void)
{
    size_t const n = 6, V = 13;
    rng_seed(71);
    float *logits = fbuf(n * V), *mx = fbuf(n), *sm = fbuf(n), *tl = fbuf(n);
    double *mref = dbuf(n), *sref = dbuf(n), *tref = dbuf(n);
    int targets[6];
    fill_sym(logits, n * V, 4.0);
    for (size_t j = 0; j < V; j++) logits[2 * V + j] += 150.0f; /* exp overflows unshifted */
    for (size_t t = 0; t < n; t++) targets[t] = rng_int((int)V);
    ref_ce_stats(mref, sref, logits, n, V);
    model_softmax_stats(mx, sm, logits, n, V);
    EXPECT_CLOSE("rowmax", mx, mref, n, 0, 0);
    EXPECT_CLOSE("rowsum", sm, sref, n, FWD_RTOL, 0);

    /* As a shard [v_begin, v_begin + Vl) of a larger vocabulary: targets outside give 0. */
    int const v_begin = 20;
    int tg[6] = {20, 32, 19, 33, 25, 0};
    for (size_t t = 0; t < n; t++) {
        int const j = tg[t] - v_begin;
        tref[t] = (j >= 0 && j < (int)V) ? logits[t * V + (size_t)j] : 0.0;
    }
    fill_const(tl, n, SENTINEL);
    model_target_logits(tl, logits, tg, n, V, v_begin);
    EXPECT_CLOSE("target logits (v_begin 20)", tl, tref, n, 0, 0);
    for (size_t t = 0; t < n; t++) tref[t] = logits[t * V + (size_t)targets[t]];
    model_target_logits(tl, logits, targets, n, V, 0);
    EXPECT_CLOSE("target logits (v_begin 0)", tl, tref, n, 0, 0);
    free(logits), free(mx), free(sm), free(tl), free(mref), free(sref), free(tref);
}

struct ce_ctx {
    float *mx, *sm, *tl;
    const float *logits;
    const int *targets;
    size_t n, V;
    float scale;
};

/* scale * sum_t CE_t from the kernels' own stats: CE_t = log(sum_t) + max_t - logit[y_t]. */
static double ce_loss(void *p)
{
    struct ce_ctx *c = p;
    model_softmax_stats(c->mx, c->sm, c->logits, c->n, c->V);
    model_target_logits(c->tl, c->logits, c->targets, c->n, c->V, 0);
    double L = 0;
    for (size_t t = 0; t < c->n; t++) L += log((double)c->sm[t]) + c->mx[t] - c->tl[t];
    return c->scale * L;
}

static void test_crossentropy_backward(void)
{
    size_t const n = 5, V = 9;
    rng_seed(72);
    float *logits = fbuf(n * V), *mx = fbuf(n), *sm = fbuf(n), *tl = fbuf(n);
    float *dlogits = fbuf(n * V);
    int targets[5];
    fill_sym(logits, n * V, 2.0);
    for (size_t t = 0; t < n; t++) targets[t] = rng_int((int)V);
    struct ce_ctx ctx = {mx, sm, tl, logits, targets, n, V, 0.37f};
    model_softmax_stats(mx, sm, logits, n, V);
    fill_const(dlogits, n * V, SENTINEL);
    model_crossentropy_backward(dlogits, logits, targets, mx, sm, n, V, 0, ctx.scale);
    EXPECT_FD("logits (cross-entropy)", logits, n * V, dlogits, ce_loss, &ctx);

    /* And against the closed form scale * (softmax - onehot), in double. */
    double *mref = dbuf(n), *sref = dbuf(n), *want = dbuf(n * V);
    ref_ce_stats(mref, sref, logits, n, V);
    for (size_t t = 0; t < n; t++)
        for (size_t j = 0; j < V; j++)
            want[t * V + j] = ctx.scale * (exp(logits[t * V + j] - mref[t]) / sref[t] -
                                           (j == (size_t)targets[t] ? 1.0 : 0.0));
    EXPECT_CLOSE("dlogits closed form", dlogits, want, n * V, FWD_RTOL, 1e-7);
    free(logits), free(mx), free(sm), free(tl), free(dlogits), free(mref), free(sref);
    free(want);
}

/* Vocabulary parallelism: stats of two uneven shards, combined with the max and rescaled
 * sums, give the loss and the gradient of the whole vocabulary. */
static void test_vocab_split(void)
{
    size_t const n = 6, V = 11, V0 = 5, V1 = V - V0;
    rng_seed(73);
    float *logits = fbuf(n * V), *s0 = fbuf(n * V0), *s1 = fbuf(n * V1);
    float *mx = fbuf(n), *sm = fbuf(n), *tl = fbuf(n);
    float *m0 = fbuf(n), *u0 = fbuf(n), *t0 = fbuf(n), *m1 = fbuf(n), *u1 = fbuf(n),
          *t1 = fbuf(n);
    float *gm = fbuf(n), *gs = fbuf(n);
    float *dwhole = fbuf(n * V), *d0 = fbuf(n * V0), *d1 = fbuf(n * V1);
    int targets[6] = {0, 4, 5, 10, 7, 2};
    fill_sym(logits, n * V, 3.0);
    logits[1 * V + 8] += 9.0f; /* the max of row 1 in the second shard */
    logits[3 * V + 1] += 9.0f; /* the max of row 3 in the first shard */
    for (size_t t = 0; t < n; t++) {
        memcpy(s0 + t * V0, logits + t * V, V0 * sizeof *s0);
        memcpy(s1 + t * V1, logits + t * V + V0, V1 * sizeof *s1);
    }
    model_softmax_stats(mx, sm, logits, n, V);
    model_target_logits(tl, logits, targets, n, V, 0);
    model_softmax_stats(m0, u0, s0, n, V0);
    model_target_logits(t0, s0, targets, n, V0, 0);
    model_softmax_stats(m1, u1, s1, n, V1);
    model_target_logits(t1, s1, targets, n, V1, (int)V0);

    double *mref = dbuf(n), *sref = dbuf(n);
    ref_ce_stats(mref, sref, logits, n, V);
    double loss_whole = 0, loss_split = 0, loss_ref = 0;
    for (size_t t = 0; t < n; t++) {
        float const M = fmaxf(m0[t], m1[t]);
        gm[t] = M;
        gs[t] = (float)(u0[t] * exp((double)m0[t] - M) + u1[t] * exp((double)m1[t] - M));
        loss_whole += log((double)sm[t]) + mx[t] - tl[t];
        loss_split += log((double)gs[t]) + gm[t] - ((double)t0[t] + t1[t]);
        loss_ref += log(sref[t]) + mref[t] - logits[t * V + (size_t)targets[t]];
    }
    if (!near(loss_split, loss_ref, 1e-5, 1e-6) || !near(loss_whole, loss_ref, 1e-5, 1e-6))
        fprintf(stderr, "\n    vocab split: whole %.9g, split %.9g, reference %.9g\n",
                loss_whole, loss_split, loss_ref);
    CU_ASSERT(near(loss_whole, loss_ref, 1e-5, 1e-6));
    CU_ASSERT(near(loss_split, loss_ref, 1e-5, 1e-6));

    /* Each shard's gradient, from the combined stats, is its slice of the whole's. */
    model_crossentropy_backward(dwhole, logits, targets, mx, sm, n, V, 0, 0.5f);
    model_crossentropy_backward(d0, s0, targets, gm, gs, n, V0, 0, 0.5f);
    model_crossentropy_backward(d1, s1, targets, gm, gs, n, V1, (int)V0, 0.5f);
    float *joined = fbuf(n * V);
    for (size_t t = 0; t < n; t++) {
        memcpy(joined + t * V, d0 + t * V0, V0 * sizeof *joined);
        memcpy(joined + t * V + V0, d1 + t * V1, V1 * sizeof *joined);
    }
    EXPECT_CLOSEF("dlogits of the shards vs the whole", joined, dwhole, n * V, 1e-5, 1e-7);
    free(logits), free(s0), free(s1), free(mx), free(sm), free(tl), free(m0), free(u0);
    free(t0), free(m1), free(u1), free(t1), free(gm), free(gs), free(dwhole), free(d0);
    free(d1), free(mref), free(sref), free(joined);
}

/* ---------------------------------------------------------------- AdamW and lr */

static void adamw_case(float lr, float wd, float eps, bool decay, double gscale)
{
    size_t const n = 37;
    int const steps = 4;
    float *p = fbuf(n), *g = fbuf(n), *m = fbuf(n), *v = fbuf(n);
    double *pr = dbuf(n), *mr = dbuf(n), *vr = dbuf(n);
    struct model_adamw hp = {lr, 0.9f, 0.95f, eps, wd, 0};
    fill_sym(p, n, 1.0);
    for (size_t i = 0; i < n; i++) pr[i] = p[i];
    for (int t = 1; t <= steps; t++) {
        fill_sym(g, n, gscale);
        g[0] = 0.0f; /* p changes only by decay and momentum */
        hp.step = t;
        model_adamw_update(p, g, m, v, n, &hp, decay);
        double const b1 = hp.beta1, b2 = hp.beta2;
        for (size_t i = 0; i < n; i++) {
            mr[i] = b1 * mr[i] + (1 - b1) * g[i];
            vr[i] = b2 * vr[i] + (1 - b2) * (double)g[i] * g[i];
            if (decay) pr[i] *= 1.0 - (double)lr * wd;
            double const mh = mr[i] / (1 - pow(b1, t)), vh = vr[i] / (1 - pow(b2, t));
            pr[i] -= lr * mh / (sqrt(vh) + eps);
        }
        EXPECT_CLOSE("adamw m", m, mr, n, 1e-5, 1e-9);
        EXPECT_CLOSE("adamw v", v, vr, n, 1e-5, 1e-12);
        EXPECT_CLOSE("adamw p", p, pr, n, 1e-5, 1e-7);
    }
    free(p), free(g), free(m), free(v), free(pr), free(mr), free(vr);
}

static void test_adamw(void)
{
    rng_seed(81);
    adamw_case(1e-3f, 0.1f, 1e-8f, true, 1.0);
    adamw_case(1e-3f, 0.1f, 1e-8f, false, 1.0);
    /* Large lr * wd tells decoupled decay before the step from decay after it. */
    adamw_case(0.1f, 0.5f, 1e-8f, true, 1.0);
    /* eps comparable to sqrt(v_hat): tells eps outside the sqrt from inside. */
    adamw_case(1e-2f, 0.1f, 1e-3f, true, 1e-3);
}

static void test_lr_schedule(void)
{
    float const lmax = 3e-4f, lmin = 3e-5f;
    int const W = 10, S = 110;
    static const int steps[] = {0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110};
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        int const s = steps[i];
        CU_ASSERT(near(model_lr_at(0, lmax, lmin, W, S, s), lmax, 1e-6, 0));
        double want;
        if (s < W)
            want = (double)lmax * (s + 1) / W;
        else
            want = lmin + 0.5 * ((double)lmax - lmin) *
                              (1 + cos(M_PI * (double)(s - W) / (double)(S - W)));
        double const got = model_lr_at(1, lmax, lmin, W, S, s);
        if (!near(got, want, 1e-5, 0))
            fprintf(stderr, "\n    cosine lr at step %d: got %.9g, want %.9g\n", s, got, want);
        CU_ASSERT(near(got, want, 1e-5, 0));
    }
    /* Landmarks of the formula: end of warmup is lr_max, half way lr mid, the end lr_min. */
    CU_ASSERT(near(model_lr_at(1, lmax, lmin, W, S, W - 1), lmax, 1e-6, 0));
    CU_ASSERT(near(model_lr_at(1, lmax, lmin, W, S, 60), 0.5 * (lmax + lmin), 1e-5, 0));
    CU_ASSERT(near(model_lr_at(1, lmax, lmin, W, S, S), lmin, 1e-5, 0));
    /* No warmup. */
    CU_ASSERT(near(model_lr_at(1, lmax, lmin, 0, 100, 0), lmax, 1e-6, 0));
    CU_ASSERT(near(model_lr_at(1, lmax, lmin, 0, 100, 25),
                   lmin + 0.5 * (lmax - lmin) * (1 + cos(M_PI * 0.25)), 1e-5, 0));
}

/* ---------------------------------------------------------------- initialisation */

static void test_init_normal(void)
{
    const char *name = "model.layers.0.self_attn.q_proj.weight";
    uint64_t const seed = 1234;
    size_t const n = 100000;
    double *a = dbuf(n);
    double sum = 0, sq = 0;
    size_t inside1 = 0;
    for (size_t i = 0; i < n; i++) {
        a[i] = model_init_normal(seed, name, i);
        sum += a[i];
        sq += a[i] * a[i];
        inside1 += fabs(a[i]) < 1.0;
    }
    double const mean = sum / n, sd = sqrt(sq / n - mean * mean);
    double const frac1 = (double)inside1 / n;
    /* For n = 1e5 iid N(0,1): the mean has sd 1/sqrt(n) = 0.0032 and the sample sd has sd
     * ~1/sqrt(2n) = 0.0022, so a 0.01 bound is a 3.2- and 4.5-sigma test (false failure
     * < 0.2%, and the draw is fixed by the seed). P(|x| < 1) = 0.6827 with sd 0.0015: a
     * 0.01 bound tells a normal from, say, a uniform of the same sd (0.577). */
    fprintf(stderr, "\n    init_normal: mean %.5f, sd %.5f, P(|x|<1) %.4f ", mean, sd, frac1);
    CU_ASSERT(fabs(mean) < 0.01);
    CU_ASSERT(fabs(sd - 1.0) < 0.01);
    CU_ASSERT(fabs(frac1 - 0.6827) < 0.01);

    /* Deterministic, whatever was called before and wherever the name is stored. */
    char copy[96];
    snprintf(copy, sizeof copy, "%s", name);
    (void)model_init_normal(99, "lm_head.weight", 5);
    size_t same = 0;
    for (size_t i = 0; i < 1000; i++) same += model_init_normal(seed, copy, i) == (float)a[i];
    CU_ASSERT_EQUAL(same, 1000);
    for (size_t i = 999; i < n; i += 9973) CU_ASSERT(model_init_normal(seed, name, i) == (float)a[i]);

    /* Other names and seeds give other (uncorrelated) streams; neighbours differ. */
    const char *name2 = "model.layers.0.self_attn.k_proj.weight";
    const char *name3 = "model.layers.1.self_attn.q_proj.weight";
    double c2 = 0, c3 = 0, cs = 0, cshift = 0;
    size_t eq2 = 0, eq3 = 0, eqs = 0;
    for (size_t i = 0; i < n; i++) {
        double const b2 = model_init_normal(seed, name2, i);
        double const b3 = model_init_normal(seed, name3, i);
        double const bs = model_init_normal(seed + 1, name, i);
        c2 += a[i] * b2, c3 += a[i] * b3, cs += a[i] * bs;
        if (i + 1 < n) cshift += a[i] * a[i + 1];
        eq2 += b2 == a[i], eq3 += b3 == a[i], eqs += bs == a[i];
    }
    /* The sample correlation of independent streams has sd 1/sqrt(n) = 0.0032. */
    fprintf(stderr, "corr: name %.4f, layer %.4f, seed %.4f, lag-1 %.4f ", c2 / n, c3 / n,
            cs / n, cshift / n);
    CU_ASSERT(fabs(c2 / n) < 0.02);
    CU_ASSERT(fabs(c3 / n) < 0.02);
    CU_ASSERT(fabs(cs / n) < 0.02);
    CU_ASSERT(fabs(cshift / n) < 0.02);
    CU_ASSERT(eq2 < 10 && eq3 < 10 && eqs < 10);
    free(a);
}

/* ---------------------------------------------------------------- config arithmetic */

static struct model_config small_config(void)
{
    struct model_config c;
    model_config_defaults(&c);
    c.vocab_size = 100;
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.num_hidden_layers = 3;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.num_local_experts = 8;
    c.num_experts_per_tok = 2;
    return c;
}

static void test_config_defaults(void)
{
    struct model_config c;
    memset(&c, 0x5a, sizeof c);
    model_config_defaults(&c);
    CU_ASSERT(c.rope_theta == 10000.0);
    CU_ASSERT(near(c.rms_norm_eps, 1e-5, 1e-6, 0));
    CU_ASSERT(near(c.router_aux_loss_coef, 0.01, 1e-6, 0));
    CU_ASSERT(near(c.router_z_loss_coef, 0.001, 1e-6, 0));
    CU_ASSERT(c.moe_capacity_factor == 0.0); /* dropless */
    CU_ASSERT(c.moe_drop_policy == MODEL_DROP_POSITION || c.moe_drop_policy == MODEL_DROP_PROBS);
    CU_ASSERT(c.vocab_size == 0 && c.hidden_size == 0 && c.intermediate_size == 0 &&
              c.num_hidden_layers == 0 && c.num_attention_heads == 0 &&
              c.num_key_value_heads == 0 && c.num_local_experts == 0 &&
              c.num_experts_per_tok == 0);
}

/* model.md: d % H == 0, H % G == 0, 1 <= k <= E. */
static void test_config_validate(void)
{
    struct model_config c = small_config();
    CU_ASSERT_EQUAL(model_config_validate(&c), 0);
    c.num_attention_heads = 5; /* 64 % 5 != 0 */
    CU_ASSERT_EQUAL(model_config_validate(&c), VD_EINVAL);
    c = small_config();
    c.num_key_value_heads = 3; /* 4 % 3 != 0 */
    CU_ASSERT_EQUAL(model_config_validate(&c), VD_EINVAL);
    c = small_config();
    c.num_experts_per_tok = 9; /* k > E */
    CU_ASSERT_EQUAL(model_config_validate(&c), VD_EINVAL);
    c = small_config();
    c.num_experts_per_tok = 0;
    CU_ASSERT_EQUAL(model_config_validate(&c), VD_EINVAL);
    vd_err_clear();
}

static void test_flops_per_token(void)
{
    struct model_config const c = small_config();
    /* d 64, H 4, G 2, hd 16, E 8, k 2, F 96, V 100, L 3, T 32, per layer:
     *   2 d hd (H + 2G) = 2*64*16*8   = 16384   (q, k, v)
     *   2 H hd d        = 2*4*16*64   =  8192   (o)
     *   2 T d           = 2*32*64     =  4096   (causal attention core)
     *   2 d E           = 2*64*8      =  1024   (router)
     *   k 6 d F         = 2*6*64*96   = 73728   (experts)
     *                                   103424
     * times L = 3: 310272, plus the head 2 d V = 12800: 323072. */
    double const want = 323072.0;
    double const got = model_flops_per_token(&c, 32);
    if (!near(got, want, 1e-12, 0))
        fprintf(stderr, "\n    flops/token: got %.1f, want %.1f\n", got, want);
    CU_ASSERT(near(got, want, 1e-12, 0));
    /* Only the attention core depends on T: +2 d L per extra position. */
    CU_ASSERT(near(model_flops_per_token(&c, 33), want + 2.0 * 64 * 3, 1e-12, 0));
}

static void test_param_counts(void)
{
    struct model_config const c = small_config();
    /* Per layer: ln1 64, q 64*64 = 4096, k 32*64 = 2048, v 2048, o 4096, ln2 64,
     * router 8*64 = 512: 12928 dense; experts 8 * 3 * 96 * 64 = 147456 (active: k = 2 of
     * them, 36864). Outside the layers: embed 100*64 = 6400, norm 64, head 6400.
     * total  = 3 * (12928 + 147456) + 12864 = 494016
     * active = 3 * (12928 +  36864) + 12864 = 162240 */
    size_t total = 0, active = 0;
    model_param_counts(&c, &total, &active);
    if (total != 494016 || active != 162240)
        fprintf(stderr, "\n    param counts: total %zu (want 494016), active %zu (want 162240)\n",
                total, active);
    CU_ASSERT_EQUAL(total, 494016);
    CU_ASSERT_EQUAL(active, 162240);
}

/* ---------------------------------------------------------------- threads */

/* The kernels parallelise themselves; a race (two threads += into the same dk row, the
 * same dg or dw element, a shared scratch row) shows as a result that depends on the
 * thread count. Runs each backward at 1 and at 4 threads on sizes with many rows. */
struct thread_run {
    float *attn_dq, *attn_dk, *attn_dv, *attn_out;
    float *rms_dinp, *rms_dg;
    float *ex_dx, *ex_dw1, *ex_dw3, *ex_dw2;
    float *r_dlogits;
};

enum { TB = 3, TT = 17, THL = 8, TGL = 2, THD = 8, TN = 203, TD = 24, TF = 20, TE = 8, TK = 2 };

static void thread_run_once(struct thread_run *o, int nthreads)
{
    omp_set_num_threads(nthreads);
    rng_seed(91);
    size_t const nq = (size_t)TB * TT * THL * THD, nk = (size_t)TB * TT * TGL * THD;
    float *q = fbuf(nq), *k = fbuf(nk), *v = fbuf(nk), *R = fbuf(nq);
    float *probs = fbuf((size_t)TB * THL * TT * TT), *scratch = attn_scratch(TT);
    fill_sym(q, nq, 1.5);
    fill_sym(k, nk, 1.5);
    fill_sym(v, nk, 1.0);
    fill_sym(R, nq, 1.0);
    o->attn_out = fbuf(nq), o->attn_dq = fbuf(nq), o->attn_dk = fbuf(nk), o->attn_dv = fbuf(nk);
    model_attention_forward(o->attn_out, probs, q, k, v, TB, TT, THL, TGL, THD);
    model_attention_backward(o->attn_dq, o->attn_dk, o->attn_dv, R, probs, q, k, v, TB, TT,
                             THL, TGL, THD, scratch);
    free(q), free(k), free(v), free(R), free(probs), free(scratch);

    size_t const nx = (size_t)TN * TD, nw = (size_t)TF * TD, nh = (size_t)TN * TF;
    float *x = fbuf(nx), *g = fbuf(TD), *out = fbuf(nx), *rstd = fbuf(TN), *dout = fbuf(nx);
    fill_sym(x, nx, 1.0);
    fill_sym(g, TD, 1.0);
    fill_sym(dout, nx, 1.0);
    o->rms_dinp = fbuf(nx), o->rms_dg = fbuf(TD);
    model_rmsnorm_forward(out, rstd, x, g, TN, TD, 1e-5f);
    model_rmsnorm_backward(o->rms_dinp, o->rms_dg, dout, x, g, rstd, TN, TD);

    float *w1 = fbuf(nw), *w3 = fbuf(nw), *w2 = fbuf(nw), *y = fbuf(nx);
    float *h1 = fbuf(nh), *h3 = fbuf(nh), *act = fbuf(nh), *scr = fbuf(nh * 2);
    fill_sym(w1, nw, 0.5);
    fill_sym(w3, nw, 0.5);
    fill_sym(w2, nw, 0.5);
    o->ex_dx = fbuf(nx), o->ex_dw1 = fbuf(nw), o->ex_dw3 = fbuf(nw), o->ex_dw2 = fbuf(nw);
    model_expert_forward(y, h1, h3, act, x, w1, w3, w2, TN, TD, TF);
    model_expert_backward(o->ex_dx, o->ex_dw1, o->ex_dw3, o->ex_dw2, dout, h1, h3, act, x, w1,
                          w3, w2, TN, TD, TF, scr);

    float *logits = fbuf((size_t)TN * TE), *p = fbuf((size_t)TN * TE), *tw = fbuf(TN * TK);
    float *lse = fbuf(TN), *D = fbuf(TN * TK), *A = fbuf(TE);
    int *idx = malloc(sizeof(int) * TN * TK);
    router_logits(logits, TN, TE);
    fill_sym(D, TN * TK, 1.0);
    fill_sym(A, TE, 1.0);
    o->r_dlogits = fbuf((size_t)TN * TE);
    model_router_forward(p, idx, tw, lse, logits, TN, TE, TK);
    model_router_backward(o->r_dlogits, D, p, idx, tw, lse, A, 0.3f, TN, TE, TK);
    free(x), free(g), free(out), free(rstd), free(dout), free(w1), free(w3), free(w2), free(y);
    free(h1), free(h3), free(act), free(scr), free(logits), free(p), free(tw), free(lse);
    free(D), free(A), free(idx);
    omp_set_num_threads(max_threads_saved);
}

static void thread_run_free(struct thread_run *o)
{
    free(o->attn_dq), free(o->attn_dk), free(o->attn_dv), free(o->attn_out), free(o->rms_dinp);
    free(o->rms_dg), free(o->ex_dx), free(o->ex_dw1), free(o->ex_dw3), free(o->ex_dw2);
    free(o->r_dlogits);
}

static void test_thread_count_independence(void)
{
    struct thread_run a, b;
    thread_run_once(&a, 1);
    for (int rep = 0; rep < 3; rep++) {
        thread_run_once(&b, 4);
        size_t const nq = (size_t)TB * TT * THL * THD, nk = (size_t)TB * TT * TGL * THD;
        size_t const nx = (size_t)TN * TD, nw = (size_t)TF * TD;
        /* Summation order may change with the split; lost updates are O(1). */
        double const rt = 1e-5, at = 1e-6;
        EXPECT_CLOSEF("attention out, 4 vs 1 threads", b.attn_out, a.attn_out, nq, rt, at);
        EXPECT_CLOSEF("attention dq, 4 vs 1 threads", b.attn_dq, a.attn_dq, nq, rt, at);
        EXPECT_CLOSEF("attention dk, 4 vs 1 threads", b.attn_dk, a.attn_dk, nk, rt, at);
        EXPECT_CLOSEF("attention dv, 4 vs 1 threads", b.attn_dv, a.attn_dv, nk, rt, at);
        EXPECT_CLOSEF("rmsnorm dinp, 4 vs 1 threads", b.rms_dinp, a.rms_dinp, nx, rt, at);
        EXPECT_CLOSEF("rmsnorm dg, 4 vs 1 threads", b.rms_dg, a.rms_dg, TD, rt, at);
        EXPECT_CLOSEF("expert dx, 4 vs 1 threads", b.ex_dx, a.ex_dx, nx, rt, at);
        EXPECT_CLOSEF("expert dw1, 4 vs 1 threads", b.ex_dw1, a.ex_dw1, nw, rt, at);
        EXPECT_CLOSEF("expert dw3, 4 vs 1 threads", b.ex_dw3, a.ex_dw3, nw, rt, at);
        EXPECT_CLOSEF("expert dw2, 4 vs 1 threads", b.ex_dw2, a.ex_dw2, nw, rt, at);
        EXPECT_CLOSEF("router dlogits, 4 vs 1 threads", b.r_dlogits, a.r_dlogits,
                      (size_t)TN * TE, rt, at);
        thread_run_free(&b);
    }
    thread_run_free(&a);
}

/* ---------------------------------------------------------------- main */

int main(void)
{
    static const struct {
        const char *name;
        CU_TestFunc fn;
    } tests[] = {
        {"matmul forward vs reference (incl. accumulate)", test_matmul_forward},
        {"matmul backward vs finite differences, accumulate flags, NULL outputs",
         test_matmul_backward},
        {"rmsnorm forward and rstd vs reference", test_rmsnorm_forward},
        {"rmsnorm backward vs finite differences, += semantics", test_rmsnorm_backward},
        {"rope table vs theta^(-2i/hd)", test_rope_table},
        {"rope forward vs rotate_half reference (row % T and given positions)",
         test_rope_forward},
        {"rope inverse is the transpose and undoes the forward", test_rope_inverse},
        {"attention forward vs causal GQA reference", test_attention_forward},
        {"attention backward vs finite differences (T 5, and T over 2 causal blocks)",
         test_attention_backward},
        {"attention with B = 0 and T = 1", test_attention_edge_sizes},
        {"flash attention forward and backward vs double reference (causal, full, GQA, "
         "ragged lengths, strided sequences)",
         test_flash_vs_reference},
        {"flash attention backward vs finite differences", test_flash_finite_differences},
        {"flash attention: key chunks merged in any order and pair backwards accumulated "
         "equal the whole",
         test_flash_merge},
        {"flash attention vs model_attention_forward/backward at T 64, 131, 300",
         test_flash_vs_old_kernel},
        {"flash attention is bit-identical at 1, 2 and 3 threads", test_flash_thread_determinism},
        {"flash attention comparisons catch a corrupted q, a missing key chunk, a wrong lse",
         test_flash_errors_are_caught},
        {"flash attention with B = 0", test_flash_no_sequences},
        {"router forward: softmax, lse, top-k, renormalised weights", test_router_forward},
        {"router top-k ties go to the lower index", test_router_ties},
        {"router backward vs finite differences (topk_w, aux, z, dropped slots)",
         test_router_backward},
        {"expert forward vs SwiGLU reference", test_expert_forward},
        {"expert backward vs finite differences, += weight gradients",
         test_expert_backward},
        {"expert/router/matmul with n = 0", test_expert_empty},
        {"softmax stats and target logits vs reference", test_softmax_stats_target},
        {"cross-entropy backward vs finite differences and closed form",
         test_crossentropy_backward},
        {"vocabulary split: two shards combine to the whole", test_vocab_split},
        {"AdamW vs PyTorch-semantics reference", test_adamw},
        {"learning-rate schedule: constant and cosine with warmup", test_lr_schedule},
        {"model_init_normal: determinism, N(0,1) statistics, independent streams",
         test_init_normal},
        {"model_config_defaults", test_config_defaults},
        {"model_config_validate divisibility and k range", test_config_validate},
        {"model_flops_per_token vs hand count", test_flops_per_token},
        {"model_param_counts vs hand count", test_param_counts},
        {"kernels give the same results at 1 and 4 threads", test_thread_count_independence},
    };
    max_threads_saved = omp_get_max_threads();
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite suite = CU_add_suite("kernels", NULL, NULL);
    if (!suite) return 2;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++)
        if (!CU_add_test(suite, tests[i].name, tests[i].fn)) return 2;
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned const failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
