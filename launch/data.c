/* Token files (llm.c format or raw, memory-mapped), the embedded synthetic dataset (a
 * random probabilistic automaton whose entropy rate is known exactly), byte-level text
 * tokens, and the `vdist data` command. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launch/launch.h"

#define DATA_MAGIC 20240520u
#define DATA_HEADER_INTS 256
#define DATA_HEADER_NBYTES ((size_t)DATA_HEADER_INTS * 4)
#define DATA_MAX_TOKENS ((size_t)INT32_MAX) /* header[2] is an int32 */

/* ---------------------------------------------------------------- reading */

struct launch_tokens {
    char path[LAUNCH_PATH_MAX];
    void *map;          /* NULL for an empty file */
    size_t map_nbytes;
    const unsigned char *tok; /* first token */
    size_t count;
    size_t elem_nbytes; /* 2 or 4 */
    int version;        /* llm.c version, 0 for a raw file */
    size_t nseq;
    int seq_len;
};

static uint32_t load_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

/* Byte-wise, so the files read the same on any host; compilers turn this into one load. */
static uint32_t token_at(const launch_tokens *t, size_t i)
{
    const unsigned char *p = t->tok + i * t->elem_nbytes;
    if (t->elem_nbytes == 2) return (uint32_t)p[0] | (uint32_t)p[1] << 8;
    return load_le32(p);
}

static const char *dtype_name(size_t elem_nbytes)
{
    return elem_nbytes == 2 ? "uint16" : "uint32";
}

void launch_tokens_close(launch_tokens *t)
{
    if (!t) return;
    if (t->map) munmap(t->map, t->map_nbytes);
    free(t);
}

/* Maps the file and reads its header; checks only the format, not the content. */
static int tokens_map(launch_tokens **out, const char *path, enum launch_dtype raw_dtype)
{
    *out = NULL;
    RETURN_IF(strlen(path) >= LAUNCH_PATH_MAX, VD_EINVAL,
              "token file path '%s' is too long (at most %d characters)", path,
              LAUNCH_PATH_MAX - 1);
    int const fd = open(path, O_RDONLY | O_CLOEXEC);
    RETURN_IF(fd < 0, VD_EIO, "cannot open token file '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        int const e = errno;
        close(fd);
        RETURN_ERR(VD_EIO, "cannot open token file '%s': %s", path,
                   e ? strerror(e) : "not a regular file");
    }
    launch_tokens *t = vd_calloc(1, sizeof *t);
    snprintf(t->path, sizeof t->path, "%s", path);
    t->map_nbytes = (size_t)st.st_size;
    if (t->map_nbytes > 0) {
        void *const m = mmap(NULL, t->map_nbytes, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int const e = errno;
            close(fd);
            free(t);
            RETURN_ERR(VD_EIO, "cannot map token file '%s' (%zu bytes): %s", path,
                       (size_t)st.st_size, strerror(e));
        }
        t->map = m;
    }
    close(fd);

    const unsigned char *const base = t->map;
    size_t const nbytes = t->map_nbytes;
    int rc = 0;
    if (nbytes >= 4 && load_le32(base) == DATA_MAGIC) {
        if (nbytes < DATA_HEADER_NBYTES) {
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "token file '%s' starts with the llm.c magic %u but is only %zu "
                            "bytes, shorter than the %zu-byte header (length mismatch: "
                            "the file is truncated)",
                            path, DATA_MAGIC, nbytes, DATA_HEADER_NBYTES);
            goto fail;
        }
        int32_t const version = (int32_t)load_le32(base + 4);
        int32_t const ntok = (int32_t)load_le32(base + 8);
        if (version != 1 && version != 2) {
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "token file '%s' has the llm.c magic %u but bad version %d; "
                            "allowed versions are 1 (uint16 tokens) and 2 (uint32 tokens)",
                            path, DATA_MAGIC, (int)version);
            goto fail;
        }
        t->version = version;
        t->elem_nbytes = version == 1 ? 2 : 4;
        if (ntok < 0) {
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "token file '%s' has a negative token count %d in its llm.c "
                            "header; it must be between 0 and %d",
                            path, (int)ntok, INT32_MAX);
            goto fail;
        }
        size_t const want = DATA_HEADER_NBYTES + (size_t)ntok * t->elem_nbytes;
        if (nbytes != want) {
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "token file '%s': length mismatch: its llm.c header promises "
                            "%d %s tokens, i.e. %zu bytes with the %zu-byte header, but "
                            "the file is %zu bytes (truncated or corrupt)",
                            path, (int)ntok, dtype_name(t->elem_nbytes), want,
                            DATA_HEADER_NBYTES, nbytes);
            goto fail;
        }
        t->tok = base + DATA_HEADER_NBYTES;
        t->count = (size_t)ntok;
    } else {
        t->elem_nbytes = raw_dtype == LAUNCH_DTYPE_UINT32 ? 4 : 2;
        if (nbytes % t->elem_nbytes != 0) {
            rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                            "token file '%s' has no llm.c header (magic %u), so it is read "
                            "as raw little-endian %s tokens, but its length %zu bytes is "
                            "not a multiple of %zu; set the data dtype (uint16 or uint32) "
                            "to the file's",
                            path, DATA_MAGIC, dtype_name(t->elem_nbytes), nbytes,
                            t->elem_nbytes);
            goto fail;
        }
        t->tok = base;
        t->count = nbytes / t->elem_nbytes;
    }
    *out = t;
    return 0;
fail:
    launch_tokens_close(t);
    return rc;
}

/* Largest id, and the first position whose id >= limit (count when none). */
static uint32_t tokens_scan(const launch_tokens *t, uint64_t limit, size_t *first_bad)
{
    uint32_t max_id = 0;
    *first_bad = t->count;
    for (size_t i = 0; i < t->count; i++) {
        uint32_t const id = token_at(t, i);
        if (id > max_id) max_id = id;
        if (id >= limit && *first_bad == t->count) *first_bad = i;
    }
    return max_id;
}

int launch_tokens_open(launch_tokens **t, const char *path, enum launch_dtype raw_dtype,
                       int vocab_size, int seq_len)
{
    *t = NULL;
    RETURN_IF(vocab_size < 1, VD_EINVAL,
              "cannot open token file '%s' for vocabulary size %d: it must be >= 1", path,
              vocab_size);
    RETURN_IF(seq_len < 1, VD_EINVAL,
              "cannot open token file '%s' for sequence length %d: it must be >= 1", path,
              seq_len);
    launch_tokens *tk;
    FORWARD_IF(tokens_map(&tk, path, raw_dtype));
    int rc = 0;
    if (tk->count < (size_t)seq_len + 1) {
        rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                        "token file '%s' is too short for one sequence: need seq_len + 1 = "
                        "%zu tokens, has %zu",
                        path, (size_t)seq_len + 1, tk->count);
        goto fail;
    }
    size_t bad;
    tokens_scan(tk, (uint64_t)vocab_size, &bad);
    if (bad < tk->count) {
        rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                        "token file '%s': the token at position %zu has id %" PRIu32
                        ", but ids must be below the vocabulary size %d (model.vocab_size); "
                        "the data was made for a larger vocabulary",
                        path, bad, token_at(tk, bad), vocab_size);
        goto fail;
    }
    tk->seq_len = seq_len;
    tk->nseq = (tk->count - 1) / (size_t)seq_len;
    *t = tk;
    return 0;
fail:
    launch_tokens_close(tk);
    return rc;
}

size_t launch_tokens_count(const launch_tokens *t) { return t->count; }

size_t launch_tokens_nseq(const launch_tokens *t) { return t->nseq; }

void launch_tokens_sequence(const launch_tokens *t, size_t i, int *inputs, int *targets)
{
    VD_CHECK(i < t->nseq, "sequence %zu of token file '%s' asked for; it has %zu", i,
             t->path, t->nseq);
    size_t const T = (size_t)t->seq_len;
    size_t const begin = i * T;
    for (size_t j = 0; j < T; j++) {
        inputs[j] = (int)token_at(t, begin + j);
        targets[j] = (int)token_at(t, begin + j + 1);
    }
}

/* ---------------------------------------------------------------- writing */

#define WRITER_BUF_TOKENS ((size_t)1 << 16)

/* Writes an llm.c uint16 token file to "<path>.tmp.<pid>" and renames it over path only
 * when everything was written and synced, so path never holds a half-written file. */
struct tok_writer {
    FILE *f;
    const char *path;
    char tmp[LAUNCH_PATH_MAX + 32];
    unsigned char *buf;
    size_t fill;  /* tokens in buf */
    size_t count; /* tokens so far */
    int err;      /* first errno of a failed write, 0 while all is well */
};

static int writer_open(struct tok_writer *w, const char *path)
{
    memset(w, 0, sizeof *w);
    w->path = path;
    RETURN_IF(strlen(path) >= LAUNCH_PATH_MAX, VD_EINVAL,
              "output path '%s' is too long (at most %d characters)", path,
              LAUNCH_PATH_MAX - 1);
    snprintf(w->tmp, sizeof w->tmp, "%s.tmp.%ld", path, (long)getpid());
    w->f = fopen(w->tmp, "wb");
    RETURN_IF(!w->f, VD_EIO, "cannot create '%s' (the temporary file for '%s'): %s", w->tmp,
              path, strerror(errno));
    w->buf = vd_alloc(WRITER_BUF_TOKENS * 2);
    /* A zero header until the count is known; finish rewrites it. */
    static const unsigned char zeros[DATA_HEADER_NBYTES];
    if (fwrite(zeros, 1, sizeof zeros, w->f) != sizeof zeros) w->err = errno ? errno : EIO;
    return 0;
}

static void writer_flush(struct tok_writer *w)
{
    if (w->fill > 0 && !w->err && fwrite(w->buf, 2, w->fill, w->f) != w->fill)
        w->err = errno ? errno : EIO;
    w->fill = 0;
}

static void writer_put(struct tok_writer *w, uint16_t id)
{
    w->buf[2 * w->fill] = (unsigned char)(id & 0xff);
    w->buf[2 * w->fill + 1] = (unsigned char)(id >> 8);
    w->count++;
    if (++w->fill == WRITER_BUF_TOKENS) writer_flush(w);
}

static void writer_abort(struct tok_writer *w)
{
    if (w->f) fclose(w->f);
    w->f = NULL;
    unlink(w->tmp);
    free(w->buf);
    w->buf = NULL;
}

static int writer_finish(struct tok_writer *w)
{
    if (w->count > DATA_MAX_TOKENS) {
        size_t const n = w->count;
        writer_abort(w);
        RETURN_ERR(VD_EINVAL,
                   "cannot write '%s': %zu tokens do not fit the llm.c header, which holds "
                   "at most %zu",
                   w->path, n, DATA_MAX_TOKENS);
    }
    writer_flush(w);
    unsigned char header[DATA_HEADER_NBYTES] = {0};
    uint32_t const fields[3] = {DATA_MAGIC, 1, (uint32_t)w->count};
    for (int k = 0; k < 3; k++)
        for (int b = 0; b < 4; b++) header[4 * k + b] = (unsigned char)(fields[k] >> (8 * b));
    if (!w->err && (fseek(w->f, 0, SEEK_SET) != 0 ||
                    fwrite(header, 1, sizeof header, w->f) != sizeof header))
        w->err = errno ? errno : EIO;
    /* syncing the directory is best effort: the file is complete and in place by then */
    enum vd_replace_step failed;
    if (w->err)
        fclose(w->f);
    else if (vd_replace_stream(w->f, false, w->tmp, w->path, &failed) != 0 &&
             failed < VD_REPLACE_OPEN_DIR)
        w->err = errno ? errno : EIO;
    w->f = NULL;
    int const e = w->err;
    free(w->buf);
    w->buf = NULL;
    if (e) {
        unlink(w->tmp);
        RETURN_ERR(VD_EIO, "cannot write token file '%s': %s; nothing was written", w->path,
                   strerror(e));
    }
    return 0;
}

/* ---------------------------------------------------------------- synthetic data */

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

#define SYNTH_MAX_STATES (1 << 20)
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

static int synth_validate(const struct launch_synth *s)
{
    RETURN_IF(s->states < 1 || s->states > SYNTH_MAX_STATES, VD_EINVAL,
              "synthetic data: states = %d is not allowed; use 1 to %d", s->states,
              SYNTH_MAX_STATES);
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
    RETURN_IF(s->tokens < 1 || s->tokens > DATA_MAX_TOKENS, VD_EINVAL,
              "synthetic data: tokens = %zu is not allowed; use 1 to %zu (the llm.c header "
              "holds an int32 count)",
              s->tokens, DATA_MAX_TOKENS);
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
    FORWARD_IF(synth_validate(s));
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
    struct tok_writer w;
    int rc = writer_open(&w, path);
    if (rc == 0) {
        uint64_t rng = s->seed ^ SYNTH_GEN_STREAM;
        int st = 0;
        for (size_t i = 0; i < s->tokens; i++) {
            size_t e = (size_t)st * tab.branch;
            uint64_t r = rng_below(&rng, total[st]);
            while (r >= tab.weight[e]) r -= tab.weight[e++];
            writer_put(&w, (uint16_t)tab.token[e]);
            st = tab.next[e];
        }
        rc = writer_finish(&w);
    }
    free(total);
    launch_synth_table_free(&tab);
    FORWARD_IF(rc);
    return 0;
}

/* ---------------------------------------------------------------- text */

#define TEXT_CHUNK_NBYTES ((size_t)1 << 16)

int launch_data_text(const char *in_path, const char *out_path)
{
    FILE *in = fopen(in_path, "rb");
    RETURN_IF(!in, VD_EIO, "cannot open input file '%s': %s", in_path, strerror(errno));
    struct tok_writer w;
    int const rc = writer_open(&w, out_path);
    if (rc < 0) {
        fclose(in);
        return vd_err_forward(rc, __FILE__, __LINE__);
    }
    unsigned char *chunk = vd_alloc(TEXT_CHUNK_NBYTES);
    size_t got;
    while ((got = fread(chunk, 1, TEXT_CHUNK_NBYTES, in)) > 0)
        for (size_t i = 0; i < got; i++) writer_put(&w, chunk[i]);
    int const read_err = ferror(in) ? (errno ? errno : EIO) : 0;
    fclose(in);
    free(chunk);
    if (read_err) {
        writer_abort(&w);
        RETURN_ERR(VD_EIO, "cannot read input file '%s': %s; nothing was written to '%s'",
                   in_path, strerror(read_err), out_path);
    }
    FORWARD_IF(writer_finish(&w));
    return 0;
}

/* ---------------------------------------------------------------- command line */

#define DATA_EXIT_FAIL 1
#define DATA_EXIT_USAGE 2

static void usage_main(FILE *out)
{
    fprintf(out,
            "usage: vdist data <command> ...\n"
            "  text IN OUT           byte-level tokens (vocab 256) of any file IN, written\n"
            "                        to OUT in llm.c format (uint16)\n"
            "  synth OUT [options]   the embedded synthetic dataset: a random probabilistic\n"
            "                        automaton with a known entropy floor\n"
            "  info FILE [--dtype uint16|uint32]\n"
            "                        format, token count and largest token id of a token file\n"
            "`vdist data <command> --help` describes a command.\n");
}

static void usage_text(FILE *out)
{
    fprintf(out, "usage: vdist data text IN OUT\n"
                 "Writes every byte of IN as one token (vocab 256) to OUT, llm.c format with\n"
                 "uint16 tokens; OUT appears only once it is complete.\n");
}

static void usage_synth(FILE *out)
{
    struct launch_synth d;
    launch_synth_defaults(&d);
    fprintf(out,
            "usage: vdist data synth OUT [--states N] [--vocab N] [--branch N] [--tokens N]\n"
            "                            [--seed N]\n"
            "Writes tokens of a fixed random probabilistic automaton to OUT (llm.c format,\n"
            "uint16): each state emits one of `branch` tokens with random probabilities and\n"
            "moves to a state given by (state, token). Prints the entropy floor (the best\n"
            "loss any model can reach) and the unigram entropy, in nats per token.\n"
            "  --states N   states of the automaton, 1 to %d (default %d)\n"
            "  --vocab N    vocabulary size, 1 to 65536 (default %d)\n"
            "  --branch N   tokens each state can emit, 1 to vocab (default %d)\n"
            "  --tokens N   tokens to write, 1 to %zu (default %zu)\n"
            "  --seed N     seed of the automaton and the data (default %" PRIu64 ")\n",
            SYNTH_MAX_STATES, d.states, d.vocab, d.branch, DATA_MAX_TOKENS, d.tokens, d.seed);
}

static void usage_info(FILE *out)
{
    fprintf(out, "usage: vdist data info FILE [--dtype uint16|uint32]\n"
                 "Prints the format, token count and largest token id of FILE. Files without\n"
                 "an llm.c header are read as raw little-endian tokens of --dtype (default\n"
                 "uint16).\n");
}

static bool is_help(const char *a)
{
    return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0;
}

/* Decimal, no sign, no trailing text, within [lo, hi]. */
static bool parse_u64(const char *text, uint64_t lo, uint64_t hi, uint64_t *v)
{
    if (!text || !*text || text[0] < '0' || text[0] > '9') return false;
    errno = 0;
    char *end;
    unsigned long long const x = strtoull(text, &end, 10);
    if (errno || *end || x < lo || x > hi) return false;
    *v = x;
    return true;
}

/* "--name VALUE" or "--name=VALUE" at argv[*i]; advances *i past the value. Returns
 * the value, or NULL when argv[*i] is not this option; *missing when it lacks one. */
static const char *option_value(int argc, char **argv, int *i, const char *name,
                                bool *missing)
{
    size_t const len = strlen(name);
    const char *const a = argv[*i];
    if (strncmp(a, name, len) != 0) return NULL;
    if (a[len] == '=') return a + len + 1;
    if (a[len] != '\0') return NULL;
    if (*i + 1 >= argc) {
        *missing = true;
        return NULL;
    }
    return argv[++*i];
}

static int cmd_text(int argc, char **argv)
{
    if (argc >= 2 && is_help(argv[1])) {
        usage_text(stdout);
        return 0;
    }
    if (argc != 3) {
        fprintf(stderr, "vdist data text: expected IN and OUT, got %d argument%s\n",
                argc - 1, argc - 1 == 1 ? "" : "s");
        usage_text(stderr);
        return DATA_EXIT_USAGE;
    }
    if (launch_data_text(argv[1], argv[2]) < 0) {
        fprintf(stderr, "vdist data text: %s\n", vd_err_msg());
        return DATA_EXIT_FAIL;
    }
    launch_tokens *t;
    if (tokens_map(&t, argv[2], LAUNCH_DTYPE_UINT16) < 0) {
        fprintf(stderr, "vdist data text: %s\n", vd_err_msg());
        return DATA_EXIT_FAIL;
    }
    printf("wrote %zu tokens to %s\n", t->count, argv[2]);
    launch_tokens_close(t);
    return 0;
}

struct synth_option {
    const char *name;
    uint64_t lo, hi;
    uint64_t *value;
};

static int cmd_synth(int argc, char **argv)
{
    struct launch_synth s;
    launch_synth_defaults(&s);
    uint64_t states = (uint64_t)s.states, vocab = (uint64_t)s.vocab,
             branch = (uint64_t)s.branch, tokens = s.tokens, seed = s.seed;
    struct synth_option const opts[] = {
        {"--states", 1, SYNTH_MAX_STATES, &states},
        {"--vocab", 1, 65536, &vocab},
        {"--branch", 1, 65536, &branch},
        {"--tokens", 1, DATA_MAX_TOKENS, &tokens},
        {"--seed", 0, UINT64_MAX, &seed},
    };
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            usage_synth(stdout);
            return 0;
        }
    }
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] != '-' || argv[i][1] == '\0') {
            if (out) {
                fprintf(stderr, "vdist data synth: one output file expected, got '%s' and "
                                "'%s'\n", out, argv[i]);
                return DATA_EXIT_USAGE;
            }
            out = argv[i];
            continue;
        }
        bool matched = false;
        for (size_t k = 0; k < sizeof opts / sizeof opts[0] && !matched; k++) {
            bool missing = false;
            const char *const v = option_value(argc, argv, &i, opts[k].name, &missing);
            if (missing) {
                fprintf(stderr, "vdist data synth: %s needs a value\n", opts[k].name);
                return DATA_EXIT_USAGE;
            }
            if (!v) continue;
            matched = true;
            if (!parse_u64(v, opts[k].lo, opts[k].hi, opts[k].value)) {
                fprintf(stderr,
                        "vdist data synth: %s must be a whole number from %" PRIu64
                        " to %" PRIu64 ", got '%s'\n",
                        opts[k].name, opts[k].lo, opts[k].hi, v);
                return DATA_EXIT_USAGE;
            }
        }
        if (!matched) {
            fprintf(stderr, "vdist data synth: unknown option '%s'; see `vdist data synth "
                            "--help`\n", argv[i]);
            return DATA_EXIT_USAGE;
        }
    }
    if (!out) {
        fprintf(stderr, "vdist data synth: the output file is missing\n");
        usage_synth(stderr);
        return DATA_EXIT_USAGE;
    }
    s.states = (int)states;
    s.vocab = (int)vocab;
    s.branch = (int)branch;
    s.tokens = (size_t)tokens;
    s.seed = seed;
    if (synth_validate(&s) < 0) {
        fprintf(stderr, "vdist data synth: %s\n", vd_err_msg());
        return DATA_EXIT_USAGE;
    }
    double fl, uni;
    if (launch_synth_entropy(&s, &fl, &uni) < 0 || launch_synth_write(&s, out, NULL) < 0) {
        fprintf(stderr, "vdist data synth: %s\n", vd_err_msg());
        return DATA_EXIT_FAIL;
    }
    printf("wrote %zu tokens to %s; entropy floor %.4f nats/token (unigram %.4f "
           "nats/token)\n",
           s.tokens, out, fl, uni);
    return 0;
}

static int cmd_info(int argc, char **argv)
{
    enum launch_dtype dtype = LAUNCH_DTYPE_UINT16;
    const char *file = NULL;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            usage_info(stdout);
            return 0;
        }
    }
    for (int i = 1; i < argc; i++) {
        bool missing = false;
        const char *const v = option_value(argc, argv, &i, "--dtype", &missing);
        if (missing) {
            fprintf(stderr, "vdist data info: --dtype needs a value (uint16 or uint32)\n");
            return DATA_EXIT_USAGE;
        }
        if (v) {
            if (strcmp(v, "uint16") == 0) dtype = LAUNCH_DTYPE_UINT16;
            else if (strcmp(v, "uint32") == 0) dtype = LAUNCH_DTYPE_UINT32;
            else {
                fprintf(stderr, "vdist data info: --dtype must be uint16 or uint32, got "
                                "'%s'\n", v);
                return DATA_EXIT_USAGE;
            }
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "vdist data info: unknown option '%s'; see `vdist data info "
                            "--help`\n", argv[i]);
            return DATA_EXIT_USAGE;
        } else if (file) {
            fprintf(stderr, "vdist data info: one file expected, got '%s' and '%s'\n", file,
                    argv[i]);
            return DATA_EXIT_USAGE;
        } else {
            file = argv[i];
        }
    }
    if (!file) {
        fprintf(stderr, "vdist data info: the file is missing\n");
        usage_info(stderr);
        return DATA_EXIT_USAGE;
    }
    launch_tokens *t;
    if (tokens_map(&t, file, dtype) < 0) {
        fprintf(stderr, "vdist data info: %s\n", vd_err_msg());
        return DATA_EXIT_FAIL;
    }
    size_t bad;
    uint32_t const max_id = tokens_scan(t, UINT64_MAX, &bad);
    printf("file: %s\n", file);
    if (t->version)
        printf("format: llm.c version %d (%s tokens)\n", t->version,
               dtype_name(t->elem_nbytes));
    else
        printf("format: raw little-endian %s (no llm.c header)\n",
               dtype_name(t->elem_nbytes));
    printf("tokens: %zu\n", t->count);
    if (t->count)
        printf("max id: %" PRIu32 " (needs vocab_size >= %" PRIu64 ")\n", max_id,
               (uint64_t)max_id + 1);
    else
        printf("max id: none (no tokens)\n");
    launch_tokens_close(t);
    return 0;
}

int launch_data_main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "vdist data: a command is missing\n");
        usage_main(stderr);
        return DATA_EXIT_USAGE;
    }
    const char *const cmd = argv[1];
    if (is_help(cmd)) {
        usage_main(stdout);
        return 0;
    }
    if (strcmp(cmd, "text") == 0) return cmd_text(argc - 1, argv + 1);
    if (strcmp(cmd, "synth") == 0) return cmd_synth(argc - 1, argv + 1);
    if (strcmp(cmd, "info") == 0) return cmd_info(argc - 1, argv + 1);
    fprintf(stderr, "vdist data: unknown command '%s'; use text, synth or info\n", cmd);
    usage_main(stderr);
    return DATA_EXIT_USAGE;
}
