/* Dense kernels: matmul (OpenBLAS), RMSNorm, RoPE, causal grouped-query attention and the
 * softmax/cross-entropy pieces. Shapes are (rows, cols), row-major. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "model/model.h"

/* out (n, m) = inp (n, kd) w^T, w (m, kd). */
void model_matmul_forward(float *out, const float *inp, const float *w, size_t n,
                          size_t kd, size_t m, bool accumulate)
{
    if (n == 0 || m == 0) return;
    if (kd == 0) {
        if (!accumulate) memset(out, 0, n * m * sizeof *out);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)m, (int)kd, 1.0f, inp,
                (int)kd, w, (int)kd, accumulate ? 1.0f : 0.0f, out, (int)m);
}

/* dinp (n, kd) (+)= dout (n, m) w (m, kd); dw (m, kd) += dout^T inp. */
void model_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                           const float *w, size_t n, size_t kd, size_t m,
                           bool accumulate_dinp)
{
    if (n == 0 || kd == 0) return;
    if (dinp) {
        if (m == 0) {
            if (!accumulate_dinp) memset(dinp, 0, n * kd * sizeof *dinp);
        } else {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)kd, (int)m,
                        1.0f, dout, (int)m, w, (int)kd, accumulate_dinp ? 1.0f : 0.0f, dinp,
                        (int)kd);
        }
    }
    if (dw && m > 0)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)m, (int)kd, (int)n, 1.0f,
                    dout, (int)m, inp, (int)kd, 1.0f, dw, (int)kd);
}

void model_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *g,
                           size_t n, size_t d, float eps)
{
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < n; t++) {
        const float *x = inp + t * d;
        float *y = out + t * d;
        float ss = 0.0f;
        for (size_t i = 0; i < d; i++) ss += x[i] * x[i];
        float const r = 1.0f / sqrtf(ss / (float)d + eps);
        rstd[t] = r;
        for (size_t i = 0; i < d; i++) y[i] = x[i] * r * g[i];
    }
}

/* dx_j = r (dy_j g_j - x_j r^2 mean_i(dy_i g_i x_i)); dg_i += sum_t dy_ti x_ti r_t. */
void model_rmsnorm_backward(float *dinp, float *dg, const float *dout, const float *inp,
                            const float *g, const float *rstd, size_t n, size_t d)
{
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (size_t t = 0; t < n; t++) {
            const float *x = inp + t * d, *dy = dout + t * d;
            float *dx = dinp + t * d;
            float const r = rstd[t];
            float dot = 0.0f;
            for (size_t i = 0; i < d; i++) dot += dy[i] * g[i] * x[i];
            float const c = r * r * dot / (float)d;
            for (size_t i = 0; i < d; i++) dx[i] += r * (dy[i] * g[i] - x[i] * c);
        }
        /* Each thread owns a column range of dg, so no reduction scratch is needed. */
        int const nth = omp_get_num_threads(), th = omp_get_thread_num();
        size_t const c0 = d * (size_t)th / (size_t)nth, c1 = d * (size_t)(th + 1) / (size_t)nth;
        for (size_t t = 0; t < n; t++) {
            const float *x = inp + t * d, *dy = dout + t * d;
            float const r = rstd[t];
            for (size_t i = c0; i < c1; i++) dg[i] += dy[i] * x[i] * r;
        }
    }
}

void model_rope_table(float *cos_t, float *sin_t, int seq_len, int head_dim, double theta)
{
    int const half = head_dim / 2;
    for (int t = 0; t < seq_len; t++)
        for (int i = 0; i < half; i++) {
            double const freq = pow(theta, -2.0 * i / head_dim);
            double const angle = t * freq;
            cos_t[(size_t)t * half + i] = (float)cos(angle);
            sin_t[(size_t)t * half + i] = (float)sin(angle);
        }
}

void model_rope_apply(float *x, const int *pos, const float *cos_t, const float *sin_t,
                      size_t rows, int nheads, int head_dim, bool inverse)
{
    int const half = head_dim / 2;
    float const sign = inverse ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *c = cos_t + (size_t)pos[r] * half;
        const float *s = sin_t + (size_t)pos[r] * half;
        for (int h = 0; h < nheads; h++) {
            float *u = x + (r * nheads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                float const u1 = u[i], u2 = u[i + half], sn = sign * s[i];
                u[i] = u1 * c[i] - u2 * sn;
                u[i + half] = u2 * c[i] + u1 * sn;
            }
        }
    }
}

/* Causal softmax of row t of an already-scaled score block: entries past t become 0. */
static void causal_softmax_row(float *row, int t, int T)
{
    float mx = row[0];
    for (int u = 1; u <= t; u++) mx = fmaxf(mx, row[u]);
    float sum = 0.0f;
    for (int u = 0; u <= t; u++) {
        row[u] = expf(row[u] - mx);
        sum += row[u];
    }
    float const inv = 1.0f / sum;
    for (int u = 0; u <= t; u++) row[u] *= inv;
    for (int u = t + 1; u < T; u++) row[u] = 0.0f;
}

/* Causal attention skips the blocks above the diagonal: query rows are taken in blocks of
 * MODEL_ATTN_BLOCK, and the rows of block r only meet keys [0, end of block r). That
 * computes (nb + 1) / (2 nb) of the full T x T work with GEMMs that stay large. */

/* One (sequence, query head) task per iteration: probs = softmax(scale q k^T), out = probs v,
 * two GEMMs per row block. Tasks run in parallel, so BLAS runs single-threaded inside. */
void model_attention_forward(float *out, float *probs, const float *q, const float *k,
                             const float *v, int B, int T, int Hl, int Gl, int hd)
{
    int const qs = Hl * hd, ks = Gl * hd, group = Hl / Gl;
    float const scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < B * Hl; task++) {
        int const b = task / Hl, i = task % Hl, j = i / group;
        const float *qb = q + (size_t)b * T * qs + (size_t)i * hd;
        const float *kb = k + (size_t)b * T * ks + (size_t)j * hd;
        const float *vb = v + (size_t)b * T * ks + (size_t)j * hd;
        float *ob = out + (size_t)b * T * qs + (size_t)i * hd;
        float *p = probs + (size_t)task * T * T;
        for (int r0 = 0; r0 < T; r0 += MODEL_ATTN_BLOCK) {
            int const rn = T - r0 < MODEL_ATTN_BLOCK ? T - r0 : MODEL_ATTN_BLOCK, cols = r0 + rn;
            float *pr = p + (size_t)r0 * T;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rn, cols, hd, scale,
                        qb + (size_t)r0 * qs, qs, kb, ks, 0.0f, pr, T);
            for (int t = 0; t < rn; t++) causal_softmax_row(pr + (size_t)t * T, r0 + t, T);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rn, hd, cols, 1.0f, pr, T,
                        vb, ks, 0.0f, ob + (size_t)r0 * qs, qs);
        }
    }
}

/* One (T, T) block per OpenMP thread: size it after the thread count is set. */
size_t model_attention_scratch_floats(int T)
{
    return (size_t)omp_get_max_threads() * (size_t)T * (size_t)T;
}

/* Zeroes T rows of hd values at stride ld. */
static void zero_rows(float *x, int T, int hd, int ld)
{
    for (int t = 0; t < T; t++) memset(x + (size_t)t * ld, 0, (size_t)hd * sizeof *x);
}

/* Tasks are (sequence, key/value head) so that the query heads sharing a key/value head
 * accumulate into dk, dv without races. */
void model_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                              const float *probs, const float *q, const float *k,
                              const float *v, int B, int T, int Hl, int Gl, int hd,
                              float *scratch)
{
    int const qs = Hl * hd, ks = Gl * hd, group = Hl / Gl;
    float const scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel
    {
        float *dp = scratch + (size_t)omp_get_thread_num() * T * T;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * Gl; task++) {
            int const b = task / Gl, j = task % Gl;
            const float *kb = k + (size_t)b * T * ks + (size_t)j * hd;
            const float *vb = v + (size_t)b * T * ks + (size_t)j * hd;
            float *dkb = dk + (size_t)b * T * ks + (size_t)j * hd;
            float *dvb = dv + (size_t)b * T * ks + (size_t)j * hd;
            zero_rows(dkb, T, hd, ks);
            zero_rows(dvb, T, hd, ks);
            for (int i = j * group; i < (j + 1) * group; i++) {
                const float *qb = q + (size_t)b * T * qs + (size_t)i * hd;
                const float *dob = dout + (size_t)b * T * qs + (size_t)i * hd;
                float *dqb = dq + (size_t)b * T * qs + (size_t)i * hd;
                const float *p = probs + ((size_t)b * Hl + i) * T * T;
                for (int r0 = 0; r0 < T; r0 += MODEL_ATTN_BLOCK) {
                    int const rn = T - r0 < MODEL_ATTN_BLOCK ? T - r0 : MODEL_ATTN_BLOCK;
                    int const cols = r0 + rn;
                    const float *pr = p + (size_t)r0 * T, *dor = dob + (size_t)r0 * qs;
                    float *dr = dp + (size_t)r0 * T;
                    /* dv += p^T do; dp = do v^T */
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cols, hd, rn, 1.0f, pr,
                                T, dor, qs, 1.0f, dvb, ks);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rn, cols, hd, 1.0f, dor,
                                qs, vb, ks, 0.0f, dr, T);
                    /* ds = p (dp - rowsum(p dp)) * scale, in place of dp */
                    for (int t = 0; t < rn; t++) {
                        const float *prow = pr + (size_t)t * T;
                        float *drow = dr + (size_t)t * T;
                        int const last = r0 + t;
                        float dot = 0.0f;
                        for (int u = 0; u <= last; u++) dot += prow[u] * drow[u];
                        for (int u = 0; u <= last; u++) drow[u] = prow[u] * (drow[u] - dot) * scale;
                        for (int u = last + 1; u < cols; u++) drow[u] = 0.0f;
                    }
                    /* dq = ds k; dk += ds^T q */
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rn, hd, cols, 1.0f, dr,
                                T, kb, ks, 0.0f, dqb + (size_t)r0 * qs, qs);
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cols, hd, rn, 1.0f, dr, T,
                                qb + (size_t)r0 * qs, qs, 1.0f, dkb, ks);
                }
            }
        }
    }
}

void model_softmax_stats(float *rowmax, float *rowsum, const float *logits, size_t n,
                         size_t Vl)
{
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < n; t++) {
        const float *x = logits + t * Vl;
        float mx = -INFINITY;
        for (size_t i = 0; i < Vl; i++) mx = fmaxf(mx, x[i]);
        float s = 0.0f;
        for (size_t i = 0; i < Vl; i++) s += expf(x[i] - mx);
        rowmax[t] = mx;
        rowsum[t] = s;
    }
}

void model_target_logits(float *tlogit, const float *logits, const int *targets, size_t n,
                         size_t Vl, int v_begin)
{
    for (size_t t = 0; t < n; t++) {
        long const local = (long)targets[t] - v_begin;
        tlogit[t] = local >= 0 && local < (long)Vl ? logits[t * Vl + (size_t)local] : 0.0f;
    }
}

void model_crossentropy_backward(float *dlogits, const float *logits, const int *targets,
                                 const float *rowmax, const float *rowsum, size_t n,
                                 size_t Vl, int v_begin, float scale)
{
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < n; t++) {
        const float *x = logits + t * Vl;
        float *dx = dlogits + t * Vl;
        float const inv = scale / rowsum[t];
        for (size_t i = 0; i < Vl; i++) dx[i] = expf(x[i] - rowmax[t]) * inv;
        long const local = (long)targets[t] - v_begin;
        if (local >= 0 && local < (long)Vl) dx[local] -= scale;
    }
}
