/* The embedded synthetic dataset: a fixed random probabilistic automaton (the states emit
 * tokens and move on), the exact entropy rate of the token stream it generates (the floor
 * a perfect model reaches) and its unigram entropy, and the token files sampled from it.
 * `vdist data synth` and the training run's default data (data.path empty) come from here. */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "launch/launch_internal.h"

/* splitmix64 (Steele, Lea, Flood 2014): tiny, and the same numbers on every machine. The
 * automaton and the data use only integer arithmetic, so the files are bit-identical
 * everywhere; floating point (and libm's log) enters only the reported entropies. */
static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

/* Uniform in [0, n): rejecting the 2^64 mod n lowest values removes the modulo bias. */
static uint64_t rng_below(uint64_t *state, uint64_t n)
{
    uint64_t const threshold = (0 - n) % n;
    for (;;) {
        uint64_t const x = splitmix64(state);
        if (x >= threshold) return x % n;
    }
}

#define SYNTH_MAX_ENTRIES ((size_t)1 << 24) /* states * branch */
#define SYNTH_GEN_STREAM 0xd1b54a32d192ed03u

void launch_synth_defaults(struct launch_synth *s)
{
    s->states = 64;
    s->vocab = 256;
    s->branch = 4;
    s->seed = 1234;
    s->tokens = 2000000;
}

int launch_synth_validate(const struct launch_synth *s)
{
    RETURN_IF(s->states < 1 || s->states > LAUNCH_SYNTH_MAX_STATES, VD_EINVAL,
              "synthetic data: states = %d is not allowed; use 1 to %d", s->states,
              LAUNCH_SYNTH_MAX_STATES);
    RETURN_IF(s->vocab < 1 || s->vocab > 65536, VD_EINVAL,
              "synthetic data: vocab = %d is not allowed; use 1 to 65536 (the tokens are "
              "written as uint16)",
              s->vocab);
    RETURN_IF(s->branch < 1 || s->branch > s->vocab, VD_EINVAL,
              "synthetic data: branch = %d is not allowed; use 1 to vocab = %d (each state "
              "emits `branch` distinct tokens)",
              s->branch, s->vocab);
    RETURN_IF((size_t)s->states * (size_t)s->branch > SYNTH_MAX_ENTRIES, VD_EINVAL,
              "synthetic data: states * branch = %zu is too large; at most %zu",
              (size_t)s->states * (size_t)s->branch, SYNTH_MAX_ENTRIES);
    RETURN_IF(s->tokens < 1 || s->tokens > LAUNCH_DATA_MAX_TOKENS, VD_EINVAL,
              "synthetic data: tokens = %zu is not allowed; use 1 to %zu (the llm.c header "
              "holds an int32 count)",
              s->tokens, LAUNCH_DATA_MAX_TOKENS);
    return 0;
}

/* Each state draws `branch` distinct tokens (a partial Fisher-Yates shuffle of a running
 * permutation of the vocabulary) with weights u^3, u uniform: skewed, so a state's
 * entropy sits well below log(branch). Its first token always leads to state s + 1 and
 * state 0's second token back to itself: the ring makes the chain irreducible and the
 * self-loop aperiodic; the other transitions are uniform over the states. */
int launch_synth_table_build(struct launch_synth_table *tab, const struct launch_synth *s)
{
    memset(tab, 0, sizeof *tab);
    FORWARD_IF(launch_synth_validate(s));
    int const S = s->states, b = s->branch, V = s->vocab;
    size_t const n = (size_t)S * (size_t)b;
    tab->states = S;
    tab->branch = b;
    tab->token = vd_alloc(n * sizeof *tab->token);
    tab->weight = vd_alloc(n * sizeof *tab->weight);
    tab->next = vd_alloc(n * sizeof *tab->next);
    int *perm = vd_alloc((size_t)V * sizeof *perm);
    for (int v = 0; v < V; v++) perm[v] = v;
    uint64_t rng = s->seed;
    for (int st = 0; st < S; st++) {
        size_t const e0 = (size_t)st * (size_t)b;
        for (int j = 0; j < b; j++) {
            int const r = j + (int)rng_below(&rng, (uint64_t)(V - j));
            int const tmp = perm[j];
            perm[j] = perm[r];
            perm[r] = tmp;
            tab->token[e0 + j] = perm[j];
        }
        for (int j = 0; j < b; j++) {
            uint64_t const u = 1 + (splitmix64(&rng) >> 48); /* 1 .. 2^16 */
            tab->weight[e0 + j] = ((u * u * u) >> 16) + 1;   /* 1 .. 2^32 + 1 */
        }
        for (int j = 0; j < b; j++) {
            int nx;
            if (j == 0) nx = (st + 1) % S;
            else if (j == 1 && st == 0) nx = 0;
            else nx = (int)rng_below(&rng, (uint64_t)S);
            tab->next[e0 + j] = nx;
        }
    }
    free(perm);
    return 0;
}

void launch_synth_table_free(struct launch_synth_table *tab)
{
    free(tab->token);
    free(tab->weight);
    free(tab->next);
    memset(tab, 0, sizeof *tab);
}

static uint64_t state_total(const struct launch_synth_table *tab, int st)
{
    uint64_t sum = 0;
    for (int j = 0; j < tab->branch; j++) sum += tab->weight[(size_t)st * tab->branch + j];
    return sum;
}

#define SYNTH_POWER_TOL 1e-12
#define SYNTH_POWER_MAX_ITERS 1000000

int launch_synth_entropy(const struct launch_synth *s, double *floor_nats,
                         double *unigram_nats)
{
    struct launch_synth_table tab;
    FORWARD_IF(launch_synth_table_build(&tab, s));
    int const S = tab.states, b = tab.branch;
    size_t const n = (size_t)S * (size_t)b;
    double *p = vd_alloc(n * sizeof *p);
    double *h = vd_alloc((size_t)S * sizeof *h);
    double *pi = vd_alloc((size_t)S * sizeof *pi);
    double *pn = vd_alloc((size_t)S * sizeof *pn);
    for (int st = 0; st < S; st++) {
        double const total = (double)state_total(&tab, st);
        h[st] = 0;
        for (int j = 0; j < b; j++) {
            size_t const e = (size_t)st * b + j;
            p[e] = (double)tab.weight[e] / total;
            h[st] -= p[e] * log(p[e]);
        }
        pi[st] = 1.0 / S;
    }
    /* Power iteration from uniform; the chain is irreducible and aperiodic by
     * construction, so it converges to the unique stationary distribution. */
    int iter = 0;
    double diff = 1;
    for (; iter < SYNTH_POWER_MAX_ITERS && diff >= SYNTH_POWER_TOL; iter++) {
        for (int st = 0; st < S; st++) pn[st] = 0;
        for (int st = 0; st < S; st++)
            for (int j = 0; j < b; j++) {
                size_t const e = (size_t)st * b + j;
                pn[tab.next[e]] += pi[st] * p[e];
            }
        double sum = 0;
        for (int st = 0; st < S; st++) sum += pn[st];
        diff = 0;
        for (int st = 0; st < S; st++) {
            pn[st] /= sum;
            diff += fabs(pn[st] - pi[st]);
        }
        double *const swap = pi;
        pi = pn;
        pn = swap;
    }
    int rc = 0;
    if (diff >= SYNTH_POWER_TOL) {
        rc = vd_err_set(VD_EINVAL, __FILE__, __LINE__,
                        "synthetic data: the state chain (states %d, branch %d, seed %" PRIu64
                        ") did not reach its stationary distribution within %d power "
                        "iterations (L1 change %g); try another seed",
                        S, b, s->seed, SYNTH_POWER_MAX_ITERS, diff);
    } else {
        double fl = 0;
        for (int st = 0; st < S; st++) fl += pi[st] * h[st];
        double *q = vd_calloc((size_t)s->vocab, sizeof *q);
        for (int st = 0; st < S; st++)
            for (int j = 0; j < b; j++) {
                size_t const e = (size_t)st * b + j;
                q[tab.token[e]] += pi[st] * p[e];
            }
        double uni = 0;
        for (int v = 0; v < s->vocab; v++)
            if (q[v] > 0) uni -= q[v] * log(q[v]);
        free(q);
        if (floor_nats) *floor_nats = fl;
        if (unigram_nats) *unigram_nats = uni;
    }
    free(p);
    free(h);
    free(pi);
    free(pn);
    launch_synth_table_free(&tab);
    return rc;
}

int launch_synth_floor(const struct launch_synth *s, double *floor_nats)
{
    FORWARD_IF(launch_synth_entropy(s, floor_nats, NULL));
    return 0;
}

int launch_synth_write(const struct launch_synth *s, const char *path, double *floor_nats)
{
    if (floor_nats) FORWARD_IF(launch_synth_entropy(s, floor_nats, NULL));
    struct launch_synth_table tab;
    FORWARD_IF(launch_synth_table_build(&tab, s));
    uint64_t *total = vd_alloc((size_t)tab.states * sizeof *total);
    for (int st = 0; st < tab.states; st++) total[st] = state_total(&tab, st);
    struct launch_tok_writer w;
    int rc = launch_tok_writer_open(&w, path);
    if (rc == 0) {
        uint64_t rng = s->seed ^ SYNTH_GEN_STREAM;
        int st = 0;
        for (size_t i = 0; i < s->tokens; i++) {
            size_t e = (size_t)st * tab.branch;
            uint64_t r = rng_below(&rng, total[st]);
            while (r >= tab.weight[e]) r -= tab.weight[e++];
            launch_tok_writer_put(&w, (uint16_t)tab.token[e]);
            st = tab.next[e];
        }
        rc = launch_tok_writer_finish(&w);
    }
    free(total);
    launch_synth_table_free(&tab);
    FORWARD_IF(rc);
    return 0;
}
