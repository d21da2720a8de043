/* Blockwise causal grouped-query attention with an online softmax, after FlashAttention
 * (Dao et al. 2022) and FlashAttention-2 (Dao 2023). The scores of a block of query rows
 * against a block of key rows live only in a per-thread tile, so the memory is
 * O(T x block) per head where model_attention_* keeps the (T, T) probabilities.
 *
 * Forward, per block of query rows: for each key block, S = Q K^T / sqrt(hd), a running
 * row max m and row sum l of exp(S - m), and O = O exp(m_old - m) + exp(S - m) V; at the
 * end out = O / l and lse = m + log l. Backward, per (query block, key block): the
 * probabilities are recomputed as P = exp(S - lse) from the final lse, and with
 * delta = rowsum(dout * out): dv += P^T dout, dP = dout V^T, dS = P (dP - delta) / sqrt(hd),
 * dq += dS K, dk += dS^T Q. Five block GEMMs where model_attention_backward has four: the
 * price of not storing P.
 *
 * Determinism: each output element is written by one task that adds its terms in a fixed
 * order (key blocks ascending; for dk and dv the group's query heads, then query blocks,
 * ascending), and BLAS runs single-threaded inside the parallel regions, so the results
 * are bit-identical for any number of threads. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "model/model.h"

/* Query rows and key rows of a tile. 64 x 256 was the fastest of 32..128 x 64..512 in
 * `vdist bench attention` (bench.ini heads, T 512 and 2048, 2 threads; 64 x 128 and
 * 128 x 128 within 5%): a tile (64 KiB) and the (64, hd) row blocks of q, out and dout
 * stay in L2, the GEMMs are large enough for OpenBLAS's kernels, and the masked part of
 * the diagonal tiles (half of 64 rows) stays small. Causal tiling needs MODEL_FLASH_BK to
 * be a multiple of MODEL_FLASH_BQ, so that every query row sees a key in each key block
 * its query block meets. */
#define MODEL_FLASH_BQ 64
#define MODEL_FLASH_BK 256
_Static_assert(MODEL_FLASH_BK % MODEL_FLASH_BQ == 0, "key blocks must align to query blocks");

/* ---------------------------------------------------------------- exp on four lanes */

/* Each tile takes one exponential per score, forward and backward. libm's expf is scalar:
 * without -ffast-math GCC vectorises neither calls to it nor (under the default
 * -ftrapping-math) loops with comparisons. The exponentials are computed here with GCC
 * vector extensions (four lanes: an SSE register on x86-64-v2, portable to clang and
 * other targets), about three times as fast as a loop of expf (1.5 against 4.6 ns an
 * element on the development machine), with the same operations in every lane and in the
 * ragged tail, so that an element's value does not depend on where it sits. */
typedef float v4f __attribute__((vector_size(16)));
typedef int v4i __attribute__((vector_size(16)));

static inline v4f v4_load(const float *x)
{
    v4f v;
    memcpy(&v, x, sizeof v);
    return v;
}

static inline void v4_store(float *x, v4f v) { memcpy(x, &v, sizeof v); }

/* The first n (< 4) of x, the other lanes fill. */
static inline v4f v4_load_part(const float *x, int n, float fill)
{
    v4f v = {fill, fill, fill, fill};
    for (int i = 0; i < n; i++) v[i] = x[i];
    return v;
}

static inline void v4_store_part(float *x, int n, v4f v)
{
    for (int i = 0; i < n; i++) x[i] = v[i];
}

/* Lanes of a where mask is set (all ones), of b elsewhere. */
static inline v4f v4_select(v4i mask, v4f a, v4f b)
{
    return (v4f)((mask & (v4i)a) | (~mask & (v4i)b));
}

static inline v4f v4_max(v4f a, v4f b) { return v4_select(a > b, a, b); }

/* exp(x) within 2 ulp for x in [-87, 88]; 0 below -87 (and for -inf), exp(88) above.
 * x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 split in two so n ln2 is
 * exact), exp(r) by its Taylor polynomial of degree 7 (truncation < 6e-9), times 2^n
 * built in the exponent bits. Rounding uses 1.5 * 2^23, which C17 without -ffast-math
 * may not fold away. */
static inline v4f v4_exp(v4f x)
{
    v4f const lo = {-87.0f, -87.0f, -87.0f, -87.0f}, hi = {88.0f, 88.0f, 88.0f, 88.0f};
    v4i const under = x < lo;
    v4f const xc = v4_select(x > hi, hi, v4_select(under, lo, x));
    v4f const n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    v4f const r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
    v4f p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v4i const e = (__builtin_convertvector(n, v4i) + 127) << 23;
    return (v4f)(~under & (v4i)(p * (v4f)e));
}

static inline float v4_hsum(v4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }

static float row_max(const float *x, int n)
{
    v4f m = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int u = 0;
    for (; u + 4 <= n; u += 4) m = v4_max(m, v4_load(x + u));
    m = v4_max(m, v4_load_part(x + u, n - u, -INFINITY));
    return fmaxf(fmaxf(m[0], m[1]), fmaxf(m[2], m[3]));
}

/* x[u] = exp(x[u] - m) for u < n, then zeros up to cols (the masked keys); returns the
 * sum of the n exponentials. */
static float exp_row(float *x, int n, int cols, float m)
{
    v4f const mv = {m, m, m, m};
    v4f s = {0.0f, 0.0f, 0.0f, 0.0f};
    int u = 0;
    for (; u + 4 <= n; u += 4) {
        v4f const e = v4_exp(v4_load(x + u) - mv);
        v4_store(x + u, e);
        s += e;
    }
    if (u < n) {
        v4f const e = v4_exp(v4_load_part(x + u, n - u, -INFINITY) - mv);
        v4_store_part(x + u, n - u, e);
        s += e;
    }
    for (u = n; u < cols; u++) x[u] = 0.0f;
    return v4_hsum(s);
}

/* x[u] *= a for u < n. (GCC's -O2 cost model leaves loops of unknown length scalar.) */
static void scale_row(float *x, int n, float a)
{
    int u = 0;
    for (; u + 4 <= n; u += 4) v4_store(x + u, v4_load(x + u) * a);
    v4_store_part(x + u, n - u, v4_load_part(x + u, n - u, 0.0f) * a);
}

/* The softmax backward of a row: ds[u] = p[u] (dp[u] - delta) * scale, in place of dp. */
static void dsoftmax_row(float *dp, const float *p, int n, float delta, float scale)
{
    int u = 0;
    for (; u + 4 <= n; u += 4)
        v4_store(dp + u, v4_load(p + u) * (v4_load(dp + u) - delta) * scale);
    v4f const t = v4_load_part(p + u, n - u, 0.0f) * (v4_load_part(dp + u, n - u, 0.0f) - delta);
    v4_store_part(dp + u, n - u, t * scale);
}

/* ---------------------------------------------------------------- geometry */

static void check_blocks(const struct model_attn_blocks *g)
{
    VD_CHECK(g->B >= 0 && g->Tq >= 1 && g->Tk >= 1 && g->hd >= 1,
             "flash attention: B = %d, Tq = %d, Tk = %d, hd = %d", g->B, g->Tq, g->Tk, g->hd);
    VD_CHECK(g->Gl >= 1 && g->Hl >= g->Gl && g->Hl % g->Gl == 0,
             "flash attention: Hl = %d query heads over Gl = %d key/value heads", g->Hl,
             g->Gl);
    VD_CHECK(g->B <= 1 || (g->q_seq >= (size_t)g->Tq && g->k_seq >= (size_t)g->Tk),
             "flash attention: sequences overlap (q_seq %zu < Tq %d or k_seq %zu < Tk %d)",
             g->q_seq, g->Tq, g->k_seq, g->Tk);
    VD_CHECK(g->mask == MODEL_MASK_FULL || (g->mask == MODEL_MASK_CAUSAL && g->Tq == g->Tk),
             "flash attention: a causal block needs Tq = Tk (got %d, %d)", g->Tq, g->Tk);
}

static int key_block(int Tk) { return Tk < MODEL_FLASH_BK ? Tk : MODEL_FLASH_BK; }

static size_t thread_floats(int Tk, int hd)
{
    size_t const tile = (size_t)MODEL_FLASH_BQ * (size_t)key_block(Tk);
    size_t const fwd = tile + (size_t)MODEL_FLASH_BQ * ((size_t)hd + 2);
    size_t const bwd = 2 * tile;
    return fwd > bwd ? fwd : bwd;
}

size_t model_flash_scratch_floats(int Tk, int hd)
{
    return (size_t)omp_get_max_threads() * thread_floats(Tk, hd);
}

/* Keys [0, end) that query rows [r0, r0 + rn) meet. */
static int keys_end(const struct model_attn_blocks *g, int r0, int rn)
{
    return g->mask == MODEL_MASK_CAUSAL ? r0 + rn : g->Tk;
}

/* Keys of key block [c0, c0 + cn) that query row t sees. */
static int keys_seen(const struct model_attn_blocks *g, int t, int c0, int cn)
{
    if (g->mask == MODEL_MASK_FULL) return cn;
    int const n = t - c0 + 1;
    return n < 0 ? 0 : n < cn ? n : cn;
}

/* One tile of scaled scores: s (rn, cn) = Q K^T / sqrt(hd), rows of q and k at their
 * strides. */
static void tile_scores(float *s, const float *qr, const float *kc, int rn, int cn,
                        const struct model_attn_blocks *g)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rn, cn, g->hd,
                1.0f / sqrtf((float)g->hd), qr, g->Hl * g->hd, kc, g->Gl * g->hd, 0.0f, s, cn);
}

/* ---------------------------------------------------------------- forward */

/* Writes (or merges) out and lse of one query head's rows [r0, r0 + rn) of sequence b. */
static void forward_rows(float *out, float *lse, const float *q, const float *k,
                         const float *v, const struct model_attn_blocks *g, bool merge, int b,
                         int i, int r0, int rn, float *ws)
{
    int const hd = g->hd, qs = g->Hl * hd, ks = g->Gl * hd, j = i / (g->Hl / g->Gl);
    float *s = ws, *o = s + (size_t)MODEL_FLASH_BQ * key_block(g->Tk);
    float *m = o + (size_t)MODEL_FLASH_BQ * hd, *l = m + MODEL_FLASH_BQ;
    size_t const row0 = (size_t)b * g->q_seq + (size_t)r0;
    const float *qr = q + row0 * qs + (size_t)i * hd;
    const float *kb = k + (size_t)b * g->k_seq * ks + (size_t)j * hd;
    const float *vb = v + (size_t)b * g->k_seq * ks + (size_t)j * hd;
    int const end = keys_end(g, r0, rn);
    for (int c0 = 0; c0 < end; c0 += MODEL_FLASH_BK) {
        int const cn = end - c0 < MODEL_FLASH_BK ? end - c0 : MODEL_FLASH_BK;
        bool const first = c0 == 0;
        tile_scores(s, qr, kb + (size_t)c0 * ks, rn, cn, g);
        for (int t = 0; t < rn; t++) {
            float *st = s + (size_t)t * cn;
            int const seen = keys_seen(g, r0 + t, c0, cn);
            float const m_new = first ? row_max(st, seen) : fmaxf(m[t], row_max(st, seen));
            float const sum = exp_row(st, seen, cn, m_new);
            if (first) {
                l[t] = sum;
            } else {
                float const alpha = expf(m[t] - m_new);
                l[t] = l[t] * alpha + sum;
                scale_row(o + (size_t)t * hd, hd, alpha);
            }
            m[t] = m_new;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rn, hd, cn, 1.0f, s, cn,
                    vb + (size_t)c0 * ks, ks, first ? 0.0f : 1.0f, o, hd);
    }
    for (int t = 0; t < rn; t++) {
        float *ot = out + (row0 + (size_t)t) * qs + (size_t)i * hd;
        float *lt = lse + (row0 + (size_t)t) * g->Hl + i;
        const float *oa = o + (size_t)t * hd;
        float const lse_new = m[t] + logf(l[t]);
        if (!merge || *lt == -INFINITY) {
            float const inv = 1.0f / l[t];
            for (int c = 0; c < hd; c++) ot[c] = oa[c] * inv;
            *lt = lse_new;
            continue;
        }
        /* Both sides are normalised over their own keys: weigh each by its share of the
         * combined sum of exponentials. */
        float const hi = fmaxf(*lt, lse_new), lo = fminf(*lt, lse_new);
        float const lse_all = hi + log1pf(expf(lo - hi));
        float const w_old = expf(*lt - lse_all), w_new = expf(lse_new - lse_all) / l[t];
        for (int c = 0; c < hd; c++) ot[c] = ot[c] * w_old + oa[c] * w_new;
        *lt = lse_all;
    }
}

/* Tasks are (sequence, query head, query block), the costliest causal blocks (the last
 * ones, which meet the most keys) first so that dynamic scheduling ends evenly. */
void model_flash_forward(float *out, float *lse, const float *q, const float *k,
                         const float *v, const struct model_attn_blocks *g, bool merge,
                         float *scratch)
{
    check_blocks(g);
    int const nqb = (g->Tq + MODEL_FLASH_BQ - 1) / MODEL_FLASH_BQ;
    int const ntask = g->B * g->Hl * nqb;
    size_t const per_thread = thread_floats(g->Tk, g->hd);
#pragma omp parallel
    {
        float *ws = scratch + (size_t)omp_get_thread_num() * per_thread;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < ntask; task++) {
            int const qb = nqb - 1 - task / (g->B * g->Hl), bh = task % (g->B * g->Hl);
            int const r0 = qb * MODEL_FLASH_BQ;
            int const rn = g->Tq - r0 < MODEL_FLASH_BQ ? g->Tq - r0 : MODEL_FLASH_BQ;
            forward_rows(out, lse, q, k, v, g, merge, bh / g->Hl, bh % g->Hl, r0, rn, ws);
        }
    }
}

void model_flash_delta(float *delta, const float *dout, const float *out,
                       const struct model_attn_blocks *g)
{
    check_blocks(g);
    int const Hl = g->Hl, hd = g->hd;
    int const nrows = g->B * g->Tq;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < nrows; row++) {
        size_t const r = (size_t)(row / g->Tq) * g->q_seq + (size_t)(row % g->Tq);
        for (int i = 0; i < Hl; i++) {
            const float *a = dout + (r * Hl + i) * hd, *o = out + (r * Hl + i) * hd;
            float s = 0.0f;
            for (int c = 0; c < hd; c++) s += a[c] * o[c];
            delta[r * Hl + i] = s;
        }
    }
}

/* ---------------------------------------------------------------- backward */

/* dq of rows [r0, r0 + rn) of query head i and dk, dv of its key/value head, sequence b. */
static void backward_rows(float *dq, float *dk, float *dv, const float *dout,
                          const float *lse, const float *delta, const float *q,
                          const float *k, const float *v, const struct model_attn_blocks *g,
                          int b, int i, int r0, int rn, float *ws)
{
    int const hd = g->hd, qs = g->Hl * hd, ks = g->Gl * hd, j = i / (g->Hl / g->Gl);
    float const scale = 1.0f / sqrtf((float)hd);
    float *p = ws, *dp = p + (size_t)MODEL_FLASH_BQ * key_block(g->Tk);
    size_t const row0 = (size_t)b * g->q_seq + (size_t)r0;
    size_t const qoff = row0 * qs + (size_t)i * hd;
    size_t const koff = (size_t)b * g->k_seq * ks + (size_t)j * hd;
    const float *lr = lse + row0 * g->Hl + i, *dr = delta + row0 * g->Hl + i;
    int const end = keys_end(g, r0, rn);
    for (int c0 = 0; c0 < end; c0 += MODEL_FLASH_BK) {
        int const cn = end - c0 < MODEL_FLASH_BK ? end - c0 : MODEL_FLASH_BK;
        size_t const kc = koff + (size_t)c0 * ks;
        tile_scores(p, q + qoff, k + kc, rn, cn, g);
        for (int t = 0; t < rn; t++) {
            int const seen = keys_seen(g, r0 + t, c0, cn);
            exp_row(p + (size_t)t * cn, seen, cn, lr[(size_t)t * g->Hl]);
        }
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cn, hd, rn, 1.0f, p, cn,
                    dout + qoff, qs, 1.0f, dv + kc, ks);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rn, cn, hd, 1.0f, dout + qoff, qs,
                    v + kc, ks, 0.0f, dp, cn);
        for (int t = 0; t < rn; t++) {
            float const d = dr[(size_t)t * g->Hl];
            dsoftmax_row(dp + (size_t)t * cn, p + (size_t)t * cn, cn, d, scale);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rn, hd, cn, 1.0f, dp, cn,
                    k + kc, ks, 1.0f, dq + qoff, qs);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cn, hd, rn, 1.0f, dp, cn,
                    q + qoff, qs, 1.0f, dk + kc, ks);
    }
}

/* Tasks are (sequence, key/value head): a task owns dk and dv of its head and dq of the
 * group's query heads, so nothing is shared between threads and no reduction is needed.
 * The cost: B * Gl tasks, fewer than the forward's. */
void model_flash_backward(float *dq, float *dk, float *dv, const float *dout,
                          const float *lse, const float *delta, const float *q,
                          const float *k, const float *v, const struct model_attn_blocks *g,
                          float *scratch)
{
    check_blocks(g);
    int const group = g->Hl / g->Gl;
    size_t const per_thread = thread_floats(g->Tk, g->hd);
#pragma omp parallel
    {
        float *ws = scratch + (size_t)omp_get_thread_num() * per_thread;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < g->B * g->Gl; task++) {
            int const b = task / g->Gl, j = task % g->Gl;
            for (int i = j * group; i < (j + 1) * group; i++)
                for (int r0 = 0; r0 < g->Tq; r0 += MODEL_FLASH_BQ) {
                    int const rn = g->Tq - r0 < MODEL_FLASH_BQ ? g->Tq - r0 : MODEL_FLASH_BQ;
                    backward_rows(dq, dk, dv, dout, lse, delta, q, k, v, g, b, i, r0, rn, ws);
                }
        }
    }
}
