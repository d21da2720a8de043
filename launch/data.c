/* Token files: reading them (llm.c format or raw, memory-mapped), writing them (llm.c
 * uint16, whole or not at all; data_synth.c writes through the same writer) and byte-level
 * text tokens. The synthetic dataset is in data_synth.c, `vdist data` in data_cmd.c. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launch/launch_internal.h"

#define DATA_MAGIC 20240520u
#define DATA_HEADER_INTS 256
#define DATA_HEADER_NBYTES ((size_t)DATA_HEADER_INTS * 4)

/* ---------------------------------------------------------------- reading */

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

const char *launch_tokens_dtype_name(size_t elem_nbytes)
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
int launch_tokens_map(launch_tokens **out, const char *path, enum launch_dtype raw_dtype)
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
                            path, (int)ntok, launch_tokens_dtype_name(t->elem_nbytes), want,
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
                            path, DATA_MAGIC, launch_tokens_dtype_name(t->elem_nbytes), nbytes,
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
uint32_t launch_tokens_scan(const launch_tokens *t, uint64_t limit, size_t *first_bad)
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
    FORWARD_IF(launch_tokens_map(&tk, path, raw_dtype));
    int rc = 0;
    if (tk->count < (size_t)seq_len + 1) {
        rc = vd_err_set(VD_EFORMAT, __FILE__, __LINE__,
                        "token file '%s' is too short for one sequence: need seq_len + 1 = "
                        "%zu tokens, has %zu",
                        path, (size_t)seq_len + 1, tk->count);
        goto fail;
    }
    size_t bad;
    launch_tokens_scan(tk, (uint64_t)vocab_size, &bad);
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

int launch_tok_writer_open(struct launch_tok_writer *w, const char *path)
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

static void writer_flush(struct launch_tok_writer *w)
{
    if (w->fill > 0 && !w->err && fwrite(w->buf, 2, w->fill, w->f) != w->fill)
        w->err = errno ? errno : EIO;
    w->fill = 0;
}

void launch_tok_writer_put(struct launch_tok_writer *w, uint16_t id)
{
    w->buf[2 * w->fill] = (unsigned char)(id & 0xff);
    w->buf[2 * w->fill + 1] = (unsigned char)(id >> 8);
    w->count++;
    if (++w->fill == WRITER_BUF_TOKENS) writer_flush(w);
}

static void writer_abort(struct launch_tok_writer *w)
{
    if (w->f) fclose(w->f);
    w->f = NULL;
    unlink(w->tmp);
    free(w->buf);
    w->buf = NULL;
}

int launch_tok_writer_finish(struct launch_tok_writer *w)
{
    if (w->count > LAUNCH_DATA_MAX_TOKENS) {
        size_t const n = w->count;
        writer_abort(w);
        RETURN_ERR(VD_EINVAL,
                   "cannot write '%s': %zu tokens do not fit the llm.c header, which holds "
                   "at most %zu",
                   w->path, n, LAUNCH_DATA_MAX_TOKENS);
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

/* ---------------------------------------------------------------- text */

#define TEXT_CHUNK_NBYTES ((size_t)1 << 16)

int launch_data_text(const char *in_path, const char *out_path)
{
    FILE *in = fopen(in_path, "rb");
    RETURN_IF(!in, VD_EIO, "cannot open input file '%s': %s", in_path, strerror(errno));
    struct launch_tok_writer w;
    int const rc = launch_tok_writer_open(&w, out_path);
    if (rc < 0) {
        fclose(in);
        return vd_err_forward(rc, __FILE__, __LINE__);
    }
    unsigned char *chunk = vd_alloc(TEXT_CHUNK_NBYTES);
    size_t got;
    while ((got = fread(chunk, 1, TEXT_CHUNK_NBYTES, in)) > 0)
        for (size_t i = 0; i < got; i++) launch_tok_writer_put(&w, chunk[i]);
    int const read_err = ferror(in) ? (errno ? errno : EIO) : 0;
    fclose(in);
    free(chunk);
    if (read_err) {
        writer_abort(&w);
        RETURN_ERR(VD_EIO, "cannot read input file '%s': %s; nothing was written to '%s'",
                   in_path, strerror(read_err), out_path);
    }
    FORWARD_IF(launch_tok_writer_finish(&w));
    return 0;
}
