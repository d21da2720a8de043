/* TEMP naive reference of the flash API */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "model/model.h"
size_t model_flash_scratch_floats(int Tk, int hd) { (void)Tk; (void)hd; return 1; }
static bool sees(const struct model_attn_blocks *g, int t, int u) { return g->mask == MODEL_MASK_FULL || u <= t; }
void model_flash_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                         const struct model_attn_blocks *g, bool merge, float *scratch)
{
    (void)scratch;
    int const qs = g->Hl * g->hd, ks = g->Gl * g->hd, grp = g->Hl / g->Gl;
    float const sc = 1.0f / sqrtf((float)g->hd);
    double *s = malloc((size_t)g->Tk * sizeof *s);
    for (int b = 0; b < g->B; b++)
        for (int i = 0; i < g->Hl; i++)
            for (int t = 0; t < g->Tq; t++) {
                size_t const qr = (size_t)b * g->q_seq + (size_t)t;
                const float *qq = q + qr * qs + (size_t)i * g->hd;
                double mx = -INFINITY;
                for (int u = 0; u < g->Tk; u++) {
                    s[u] = -INFINITY;
                    if (!sees(g, t, u)) continue;
                    const float *kk = k + ((size_t)b * g->k_seq + u) * ks + (size_t)(i / grp) * g->hd;
                    double d = 0; for (int x = 0; x < g->hd; x++) d += (double)qq[x] * kk[x];
                    s[u] = d * sc; if (s[u] > mx) mx = s[u];
                }
                double sum = 0; for (int u = 0; u < g->Tk; u++) if (sees(g, t, u)) sum += exp(s[u] - mx);
                double const l = mx + log(sum);
                float *o = out + qr * qs + (size_t)i * g->hd;
                float *L = lse + qr * g->Hl + i;
                double const lold = merge ? *L : -INFINITY;
                double const lnew = lold > l ? lold + log1p(exp(l - lold)) : l + log1p(exp(lold - l));
                double const wold = merge && isfinite(lold) ? exp(lold - lnew) : 0.0, wnew = exp(l - lnew);
                for (int x = 0; x < g->hd; x++) {
                    double acc = 0;
                    for (int u = 0; u < g->Tk; u++) if (sees(g, t, u)) {
                        const float *vv = v + ((size_t)b * g->k_seq + u) * ks + (size_t)(i / grp) * g->hd;
                        acc += exp(s[u] - l) * vv[x];
                    }
                    o[x] = (float)((merge ? wold * o[x] : 0.0) + wnew * acc);
                }
                *L = (float)lnew;
            }
    free(s);
}
void model_flash_delta(float *delta, const float *dout, const float *out, const struct model_attn_blocks *g)
{
    int const qs = g->Hl * g->hd;
    for (int b = 0; b < g->B; b++) for (int t = 0; t < g->Tq; t++) for (int i = 0; i < g->Hl; i++) {
        size_t const qr = (size_t)b * g->q_seq + t;
        double d = 0; for (int x = 0; x < g->hd; x++) d += (double)dout[qr*qs + i*g->hd + x] * out[qr*qs + i*g->hd + x];
        delta[qr * g->Hl + i] = (float)d;
    }
}
void model_flash_backward(float *dq, float *dk, float *dv, const float *dout, const float *lse,
                          const float *delta, const float *q, const float *k, const float *v,
                          const struct model_attn_blocks *g, float *scratch)
{
    (void)scratch;
    int const qs = g->Hl * g->hd, ks = g->Gl * g->hd, grp = g->Hl / g->Gl;
    float const sc = 1.0f / sqrtf((float)g->hd);
    for (int b = 0; b < g->B; b++) for (int i = 0; i < g->Hl; i++) for (int t = 0; t < g->Tq; t++) {
        size_t const qr = (size_t)b * g->q_seq + t;
        const float *qq = q + qr * qs + (size_t)i * g->hd, *dO = dout + qr * qs + (size_t)i * g->hd;
        for (int u = 0; u < g->Tk; u++) {
            if (!sees(g, t, u)) continue;
            size_t const kr = (size_t)b * g->k_seq + u;
            const float *kk = k + kr * ks + (size_t)(i / grp) * g->hd, *vv = v + kr * ks + (size_t)(i / grp) * g->hd;
            double s = 0, dp = 0;
            for (int x = 0; x < g->hd; x++) { s += (double)qq[x] * kk[x]; dp += (double)dO[x] * vv[x]; }
            double const p = exp(s * sc - lse[qr * g->Hl + i]);
            double const ds = p * (dp - delta[qr * g->Hl + i]) * sc;
            for (int x = 0; x < g->hd; x++) {
                dq[qr * qs + i * g->hd + x] += (float)(ds * kk[x]);
                dk[kr * ks + (i / grp) * g->hd + x] += (float)(ds * qq[x]);
                dv[kr * ks + (i / grp) * g->hd + x] += (float)(p * dO[x]);
            }
        }
    }
}
