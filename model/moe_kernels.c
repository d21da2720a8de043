/* The router (softmax, top-k, renormalised weights) and the SwiGLU expert. */
#include <math.h>
#include <string.h>

#include "model/model.h"

void model_router_forward(float *probs, int *topk_idx, float *topk_w, float *lse,
                          const float *logits, size_t n, int E, int k)
{
    VD_CHECK(k >= 1 && k <= E, "router: k = %d outside [1, E = %d]", k, E);
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < n; t++) {
        const float *r = logits + t * E;
        float *p = probs + t * E;
        float mx = r[0];
        for (int e = 1; e < E; e++) mx = fmaxf(mx, r[e]);
        float sum = 0.0f;
        for (int e = 0; e < E; e++) {
            p[e] = expf(r[e] - mx);
            sum += p[e];
        }
        for (int e = 0; e < E; e++) p[e] /= sum;
        lse[t] = mx + logf(sum);
        /* Slot j takes the largest p not yet taken; the strict '>' over ascending indices
         * breaks ties toward the lower expert index. */
        int *idx = topk_idx + t * k;
        float *w = topk_w + t * k;
        float wsum = 0.0f;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                bool taken = false;
                for (int jj = 0; jj < j; jj++) taken |= idx[jj] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            idx[j] = best;
            w[j] = p[best];
            wsum += p[best];
        }
        for (int j = 0; j < k; j++) w[j] /= wsum;
    }
}

/* w_j = p_j / S over the k selected: dp_i = (dw_i - sum_j dw_j w_j) / S. The aux loss adds
 * aux_coef[e] to every dp_te; softmax backward and the z-loss term give dlogits. */
void model_router_backward(float *dlogits, const float *dtopk_w, const float *probs,
                           const int *topk_idx, const float *topk_w, const float *lse,
                           const float *aux_coef, float zcoef, size_t n, int E, int k)
{
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < n; t++) {
        const float *p = probs + t * E;
        const int *idx = topk_idx + t * k;
        const float *w = topk_w + t * k, *dw = dtopk_w + t * k;
        float *dr = dlogits + t * E;
        float S = 0.0f, dot = 0.0f;
        for (int j = 0; j < k; j++) {
            S += p[idx[j]];
            dot += dw[j] * w[j];
        }
        for (int e = 0; e < E; e++) dr[e] = aux_coef[e]; /* dr holds dp first */
        for (int j = 0; j < k; j++) dr[idx[j]] += (dw[j] - dot) / S;
        float pdp = 0.0f;
        for (int e = 0; e < E; e++) pdp += p[e] * dr[e];
        float const z = zcoef * lse[t];
        for (int e = 0; e < E; e++) dr[e] = p[e] * (dr[e] - pdp) + z * p[e];
    }
}

void model_expert_forward(float *y, float *h1, float *h3, float *act, const float *x,
                          const float *w1, const float *w3, const float *w2, size_t n,
                          int d, int Fl)
{
    if (n == 0) return;
    model_matmul_forward(h1, x, w1, n, (size_t)d, (size_t)Fl, false);
    model_matmul_forward(h3, x, w3, n, (size_t)d, (size_t)Fl, false);
    size_t const total = n * (size_t)Fl;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < total; i++) {
        float const u = h1[i];
        act[i] = u / (1.0f + expf(-u)) * h3[i];
    }
    model_matmul_forward(y, act, w2, n, (size_t)Fl, (size_t)d, false);
}

void model_expert_backward(float *dx, float *dw1, float *dw3, float *dw2, const float *dy,
                           const float *h1, const float *h3, const float *act,
                           const float *x, const float *w1, const float *w3,
                           const float *w2, size_t n, int d, int Fl, float *scratch)
{
    if (n == 0) return;
    size_t const total = n * (size_t)Fl;
    float *dh1 = scratch, *dh3 = scratch + total;
    /* dact = dy w2 (in dh1), dw2 += dy^T act */
    model_matmul_backward(dh1, dw2, dy, act, w2, n, (size_t)Fl, (size_t)d, false);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < total; i++) {
        float const u = h1[i], da = dh1[i];
        float const s = 1.0f / (1.0f + expf(-u));
        dh3[i] = da * u * s;
        dh1[i] = da * h3[i] * s * (1.0f + u * (1.0f - s));
    }
    model_matmul_backward(dx, dw1, dh1, x, w1, n, (size_t)d, (size_t)Fl, false);
    model_matmul_backward(dx, dw3, dh3, x, w3, n, (size_t)d, (size_t)Fl, true);
}
