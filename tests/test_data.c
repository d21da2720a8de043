/* launch/data*.c: token files (llm.c and raw, both widths) read back in model.md's data
 * order, every file error with its message, the synthetic dataset (determinism, id range,
 * its entropy floor against an independent re-simulation), text tokens, `vdist data`. */
#include <CUnit/Basic.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "launch/launch.h"

static char tmp_dir[64];

/* tmp_dir/name in a static buffer (one at a time is enough here). */
static const char *tmp_path(const char *name)
{
    static char buf[2][512];
    static int which;
    which ^= 1;
    snprintf(buf[which], sizeof buf[which], "%s/%s", tmp_dir, name);
    return buf[which];
}

static void write_bytes(const char *path, const unsigned char *bytes, size_t nbytes)
{
    FILE *f = fopen(path, "wb");
    CU_ASSERT_FATAL(f != NULL);
    CU_ASSERT_FATAL(fwrite(bytes, 1, nbytes, f) == nbytes);
    CU_ASSERT_FATAL(fclose(f) == 0);
}

static unsigned char *read_bytes(const char *path, size_t *nbytes)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long const n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)n + 1);
    *nbytes = fread(b, 1, (size_t)n, f);
    fclose(f);
    return b;
}

static void put_le(unsigned char *p, uint32_t v, int nbytes)
{
    for (int b = 0; b < nbytes; b++) p[b] = (unsigned char)(v >> (8 * b));
}

/* An llm.c file (header with magic, version, count_in_header) or, with version 0, a raw
 * file, holding tokens of elem bytes; extra lets a test append or cut bytes. */
static void write_tokens(const char *path, int version, int32_t count_in_header,
                         const uint32_t *tok, size_t n, int elem, long extra)
{
    size_t const header = version ? 1024 : 0;
    size_t nbytes = header + n * (size_t)elem;
    unsigned char *b = calloc(nbytes + 64, 1);
    if (version) {
        put_le(b, 20240520, 4);
        put_le(b + 4, (uint32_t)version, 4);
        put_le(b + 8, (uint32_t)count_in_header, 4);
    }
    for (size_t i = 0; i < n; i++) put_le(b + header + i * (size_t)elem, tok[i], elem);
    nbytes = (size_t)((long)nbytes + extra);
    write_bytes(path, b, nbytes);
    free(b);
}

static uint32_t *pattern(size_t n, uint32_t modulus)
{
    uint32_t *t = malloc(n * sizeof *t);
    /* Ids with both bytes (and all four) non-trivial, so byte order matters. */
    for (size_t i = 0; i < n; i++) t[i] = (uint32_t)((i * 40503u + 0x1234u) % modulus);
    return t;
}

/* Opens path and checks every sequence's inputs and targets against tok. */
static void check_sequences(const char *path, enum launch_dtype raw, const uint32_t *tok,
                            size_t n, int vocab, int T, size_t want_nseq)
{
    launch_tokens *t = NULL;
    int const rc = launch_tokens_open(&t, path, raw, vocab, T);
    if (rc != 0) printf("\n  unexpected error: %s\n", vd_err_msg());
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(launch_tokens_count(t), n);
    CU_ASSERT_EQUAL(launch_tokens_nseq(t), want_nseq);
    int *in = malloc((size_t)T * sizeof *in), *tg = malloc((size_t)T * sizeof *tg);
    size_t wrong = 0;
    for (size_t i = 0; i < launch_tokens_nseq(t); i++) {
        launch_tokens_sequence(t, i, in, tg);
        for (int j = 0; j < T; j++) {
            wrong += (uint32_t)in[j] != tok[i * (size_t)T + (size_t)j];
            wrong += (uint32_t)tg[j] != tok[i * (size_t)T + (size_t)j + 1];
        }
    }
    CU_ASSERT_EQUAL(wrong, 0);
    free(in);
    free(tg);
    launch_tokens_close(t);
}

/* ---------------------------------------------------------------- reading */

static void test_llmc_uint16(void)
{
    /* 3 whole sequences of 7 plus 2 extra tokens: the last target is token 21. */
    size_t const n = 3 * 7 + 3;
    uint32_t *tok = pattern(n, 65536);
    write_tokens(tmp_path("v1.bin"), 1, (int32_t)n, tok, n, 2, 0);
    /* raw_dtype must be ignored for llm.c files. */
    check_sequences(tmp_path("v1.bin"), LAUNCH_DTYPE_UINT32, tok, n, 65536, 7, 3);
    free(tok);
}

static void test_llmc_uint32(void)
{
    size_t const n = 5 * 16 + 1;
    uint32_t *tok = pattern(n, 1u << 24);
    write_tokens(tmp_path("v2.bin"), 2, (int32_t)n, tok, n, 4, 0);
    check_sequences(tmp_path("v2.bin"), LAUNCH_DTYPE_UINT16, tok, n, 1 << 24, 16, 5);
    free(tok);
}

static void test_raw_uint16(void)
{
    size_t const n = 4 * 8 + 5;
    uint32_t *tok = pattern(n, 50000);
    write_tokens(tmp_path("raw16.bin"), 0, 0, tok, n, 2, 0);
    check_sequences(tmp_path("raw16.bin"), LAUNCH_DTYPE_UINT16, tok, n, 50000, 8, 4);
    free(tok);
}

static void test_raw_uint32(void)
{
    size_t const n = 2 * 9 + 1;
    uint32_t *tok = pattern(n, 1u << 30);
    write_tokens(tmp_path("raw32.bin"), 0, 0, tok, n, 4, 0);
    check_sequences(tmp_path("raw32.bin"), LAUNCH_DTYPE_UINT32, tok, n, 1 << 30, 9, 2);
    free(tok);
}

/* n_seq = floor((len - 1) / T), written out by hand for T = 4. */
static void test_nseq(void)
{
    static const size_t lens[] = {5, 6, 8, 9, 10, 12, 13, 100, 101};
    static const size_t want[] = {1, 1, 1, 2, 2, 2, 3, 24, 25};
    uint32_t *tok = pattern(101, 1000);
    for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
        write_tokens(tmp_path("nseq.bin"), 1, (int32_t)lens[k], tok, lens[k], 2, 0);
        check_sequences(tmp_path("nseq.bin"), LAUNCH_DTYPE_UINT16, tok, lens[k], 1000, 4,
                        want[k]);
    }
    free(tok);
}

/* Opening fails with `code` and a message containing every one of the needles. */
static void expect_error(const char *path, enum launch_dtype raw, int vocab, int T, int code,
                         const char *const *needles, int nneedles)
{
    launch_tokens *t = (launch_tokens *)&t; /* must come back NULL */
    vd_err_clear();
    int const rc = launch_tokens_open(&t, path, raw, vocab, T);
    CU_ASSERT_EQUAL(rc, code);
    CU_ASSERT_PTR_NULL(t);
    for (int k = 0; k < nneedles; k++) {
        bool const found = strstr(vd_err_msg(), needles[k]) != NULL;
        if (!found) printf("\n  '%s' missing from: %s\n", needles[k], vd_err_msg());
        CU_ASSERT(found);
    }
    if (rc == 0) launch_tokens_close(t);
}

static void test_errors(void)
{
    uint32_t *tok = pattern(64, 1000);

    const char *p = tmp_path("badversion.bin");
    write_tokens(p, 3, 64, tok, 64, 2, 0);
    const char *const version[] = {p, "bad version 3", "1 (uint16", "2 (uint32"};
    expect_error(p, LAUNCH_DTYPE_UINT16, 1000, 8, VD_EFORMAT, version, 4);

    p = tmp_path("truncated.bin");
    write_tokens(p, 1, 64, tok, 64, 2, -10);
    const char *const truncated[] = {p, "length mismatch", "64 uint16 tokens", "1142 bytes"};
    expect_error(p, LAUNCH_DTYPE_UINT16, 1000, 8, VD_EFORMAT, truncated, 4);

    p = tmp_path("longer.bin");
    write_tokens(p, 2, 60, tok, 64, 4, 0);
    const char *const longer[] = {p, "length mismatch", "60 uint32 tokens"};
    expect_error(p, LAUNCH_DTYPE_UINT16, 1000, 8, VD_EFORMAT, longer, 3);

    p = tmp_path("negative.bin");
    write_tokens(p, 1, -3, tok, 64, 2, 0);
    const char *const negative[] = {p, "negative token count -3"};
    expect_error(p, LAUNCH_DTYPE_UINT16, 1000, 8, VD_EFORMAT, negative, 2);

    p = tmp_path("shortheader.bin");
    write_tokens(p, 1, 64, tok, 0, 2, -1000);
    const char *const shortheader[] = {p, "length mismatch", "24 bytes"};
    expect_error(p, LAUNCH_DTYPE_UINT16, 1000, 8, VD_EFORMAT, shortheader, 3);

    p = tmp_path("tooshort.bin");
    write_tokens(p, 1, 8, tok, 8, 2, 0);
    const char *const tooshort[] = {p, "too short", "seq_len + 1 = 9 tokens, has 8"};
    expect_error(p, LAUNCH_DTYPE_UINT16, 1000, 8, VD_EFORMAT, tooshort, 3);

    p = tmp_path("rawshort.bin");
    write_tokens(p, 0, 0, tok, 3, 4, 0);
    const char *const rawshort[] = {p, "too short", "has 3"};
    expect_error(p, LAUNCH_DTYPE_UINT32, 1000, 3, VD_EFORMAT, rawshort, 3);

    p = tmp_path("rawodd.bin");
    write_tokens(p, 0, 0, tok, 11, 2, 0);
    const char *const rawodd[] = {p, "raw", "22 bytes", "not a multiple of 4"};
    expect_error(p, LAUNCH_DTYPE_UINT32, 1000, 3, VD_EFORMAT, rawodd, 4);

    /* Two offenders: the first one is named. */
    uint32_t bad[40];
    for (int i = 0; i < 40; i++) bad[i] = (uint32_t)i;
    bad[17] = 300;
    bad[30] = 999;
    p = tmp_path("vocab.bin");
    write_tokens(p, 1, 40, bad, 40, 2, 0);
    const char *const vocab[] = {p, "position 17", "id 300", "vocabulary size 256"};
    expect_error(p, LAUNCH_DTYPE_UINT16, 256, 8, VD_EFORMAT, vocab, 4);

    p = tmp_path("does_not_exist.bin");
    const char *const missing[] = {p, "cannot open", "No such file"};
    expect_error(p, LAUNCH_DTYPE_UINT16, 256, 8, VD_EIO, missing, 3);

    /* The same vocab file opens when the vocabulary is large enough. */
    launch_tokens *t;
    CU_ASSERT_EQUAL(launch_tokens_open(&t, tmp_path("vocab.bin"), LAUNCH_DTYPE_UINT16, 1000, 8),
                    0);
    launch_tokens_close(t);
    free(tok);
}

/* ---------------------------------------------------------------- synthetic data */

static void test_synth_deterministic(void)
{
    struct launch_synth s;
    launch_synth_defaults(&s);
    s.tokens = 50000;
    double f1 = -1, f2 = -1, f3 = -1;
    CU_ASSERT_EQUAL_FATAL(launch_synth_write(&s, tmp_path("syn_a.bin"), &f1), 0);
    CU_ASSERT_EQUAL_FATAL(launch_synth_write(&s, tmp_path("syn_b.bin"), &f2), 0);
    s.seed++;
    CU_ASSERT_EQUAL_FATAL(launch_synth_write(&s, tmp_path("syn_c.bin"), &f3), 0);
    size_t na = 0, nb = 0, nc = 0;
    unsigned char *a = read_bytes(tmp_path("syn_a.bin"), &na);
    unsigned char *b = read_bytes(tmp_path("syn_b.bin"), &nb);
    unsigned char *c = read_bytes(tmp_path("syn_c.bin"), &nc);
    CU_ASSERT_FATAL(a && b && c);
    CU_ASSERT_EQUAL(na, 1024 + 2 * s.tokens);
    CU_ASSERT(na == nb && memcmp(a, b, na) == 0);
    CU_ASSERT(na == nc && memcmp(a + 1024, c + 1024, na - 1024) != 0);
    CU_ASSERT(f1 == f2);
    CU_ASSERT(f1 != f3);
    /* llm.c header: magic, version 1, count. */
    uint32_t const h0 = a[0] | a[1] << 8 | a[2] << 16 | (uint32_t)a[3] << 24;
    CU_ASSERT_EQUAL(h0, 20240520u);
    CU_ASSERT(a[4] == 1 && a[5] == 0 && a[6] == 0 && a[7] == 0);
    CU_ASSERT_EQUAL((uint32_t)(a[8] | a[9] << 8 | a[10] << 16 | a[11] << 24), s.tokens);
    double fl = -1;
    CU_ASSERT_EQUAL(launch_synth_floor(&s, &fl), 0);
    CU_ASSERT(fl == f3);
    free(a);
    free(b);
    free(c);
}

/* A small vocabulary and a wide branch still keep every id below the vocabulary. */
static void test_synth_ids(void)
{
    struct launch_synth s;
    launch_synth_defaults(&s);
    s.vocab = 37;
    s.branch = 30;
    s.states = 9;
    s.tokens = 100000;
    CU_ASSERT_EQUAL_FATAL(launch_synth_write(&s, tmp_path("syn_ids.bin"), NULL), 0);
    size_t nbytes = 0;
    unsigned char *b = read_bytes(tmp_path("syn_ids.bin"), &nbytes);
    CU_ASSERT_FATAL(b && nbytes == 1024 + 2 * s.tokens);
    size_t over = 0;
    unsigned max_id = 0;
    for (size_t i = 0; i < s.tokens; i++) {
        unsigned const id = b[1024 + 2 * i] | b[1024 + 2 * i + 1] << 8;
        over += id >= (unsigned)s.vocab;
        if (id > max_id) max_id = id;
    }
    CU_ASSERT_EQUAL(over, 0);
    CU_ASSERT(max_id >= 30); /* the branch spans most of the vocabulary */
    launch_tokens *t;
    CU_ASSERT_EQUAL(launch_tokens_open(&t, tmp_path("syn_ids.bin"), LAUNCH_DTYPE_UINT32,
                                       s.vocab, 16), 0);
    launch_tokens_close(t);
    free(b);

    /* Out-of-range parameters are refused with a sentence. */
    s.branch = 38;
    vd_err_clear();
    CU_ASSERT_EQUAL(launch_synth_write(&s, tmp_path("syn_bad.bin"), NULL), VD_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(vd_err_msg(), "branch = 38"));
    CU_ASSERT(access(tmp_path("syn_bad.bin"), F_OK) != 0);
}

/* The floor against an independent estimate: follow the automaton along the written data
 * (every token must be one the current state can emit) and average -log p(token | state);
 * also the empirical unigram entropy, which the floor must be below. */
static void test_synth_floor(void)
{
    struct launch_synth s;
    launch_synth_defaults(&s);
    double fl = -1, uni = -1, fw = -1;
    CU_ASSERT_EQUAL_FATAL(launch_synth_entropy(&s, &fl, &uni), 0);
    CU_ASSERT_EQUAL_FATAL(launch_synth_write(&s, tmp_path("syn_floor.bin"), &fw), 0);
    CU_ASSERT(fw == fl);
    struct launch_synth_table tab;
    CU_ASSERT_EQUAL_FATAL(launch_synth_table_build(&tab, &s), 0);
    CU_ASSERT_EQUAL(tab.states, s.states);
    CU_ASSERT_EQUAL(tab.branch, s.branch);

    launch_tokens *t;
    CU_ASSERT_EQUAL_FATAL(launch_tokens_open(&t, tmp_path("syn_floor.bin"),
                                             LAUNCH_DTYPE_UINT16, s.vocab, 1), 0);
    size_t const n = launch_tokens_count(t);
    CU_ASSERT_EQUAL(n, s.tokens);
    double *count = calloc((size_t)s.vocab, sizeof *count);
    int state = 0;
    double nll = 0;
    size_t impossible = 0;
    for (size_t i = 0; i < n; i++) {
        int in, tg;
        /* T = 1: sequence i's input is token i; the last token is sequence n-2's target. */
        if (i + 1 < n) launch_tokens_sequence(t, i, &in, &tg);
        else launch_tokens_sequence(t, i - 1, &tg, &in);
        count[in]++;
        int const b = tab.branch;
        uint64_t total = 0;
        int hit = -1;
        for (int j = 0; j < b; j++) {
            total += tab.weight[(size_t)state * b + j];
            if (tab.token[(size_t)state * b + j] == in) hit = j;
        }
        if (hit < 0) {
            impossible++;
            break;
        }
        size_t const e = (size_t)state * b + (size_t)hit;
        nll -= log((double)tab.weight[e] / (double)total);
        state = tab.next[e];
    }
    CU_ASSERT_EQUAL(impossible, 0);
    double const empirical = nll / (double)n;
    double emp_uni = 0;
    for (int v = 0; v < s.vocab; v++)
        if (count[v] > 0) emp_uni -= count[v] / (double)n * log(count[v] / (double)n);
    printf("\n  floor %.5f, empirical %.5f; unigram %.5f, empirical %.5f\n", fl, empirical,
           uni, emp_uni);
    CU_ASSERT(fabs(empirical - fl) < 0.01 * fl);
    CU_ASSERT(fabs(emp_uni - uni) < 0.01 * uni);
    CU_ASSERT(fl < emp_uni);
    CU_ASSERT(fl < 0.8 * log((double)s.branch)); /* skewed, well below uniform branching */
    free(count);
    launch_tokens_close(t);
    launch_synth_table_free(&tab);
}

/* ---------------------------------------------------------------- text and CLI */

static void test_text_round_trip(void)
{
    size_t const n = 70000; /* more than one write buffer */
    unsigned char *src = malloc(n);
    for (size_t i = 0; i < n; i++) src[i] = (unsigned char)((i * 131 + i / 256) & 0xff);
    write_bytes(tmp_path("text.in"), src, n);
    CU_ASSERT_EQUAL_FATAL(launch_data_text(tmp_path("text.in"), tmp_path("text.bin")), 0);
    uint32_t *tok = malloc(n * sizeof *tok);
    for (size_t i = 0; i < n; i++) tok[i] = src[i];
    check_sequences(tmp_path("text.bin"), LAUNCH_DTYPE_UINT32, tok, n, 256, 1, n - 1);
    check_sequences(tmp_path("text.bin"), LAUNCH_DTYPE_UINT16, tok, n, 256, 64,
                    (n - 1) / 64);

    /* A failed write leaves nothing behind, and the message names the problem. */
    vd_err_clear();
    CU_ASSERT(launch_data_text(tmp_path("text.in"), tmp_path("no_dir/out.bin")) < 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(vd_err_msg(), "cannot create"));
    vd_err_clear();
    CU_ASSERT_EQUAL(launch_data_text(tmp_path("missing.in"), tmp_path("out.bin")), VD_EIO);
    CU_ASSERT_PTR_NOT_NULL(strstr(vd_err_msg(), "missing.in"));
    CU_ASSERT(access(tmp_path("out.bin"), F_OK) != 0);
    /* No temporary is left in the directory. */
    DIR *d = opendir(tmp_dir);
    CU_ASSERT_FATAL(d != NULL);
    size_t leftovers = 0;
    for (struct dirent *e; (e = readdir(d));) leftovers += strstr(e->d_name, ".tmp.") != NULL;
    closedir(d);
    CU_ASSERT_EQUAL(leftovers, 0);
    free(src);
    free(tok);
}

static int run_cli(int argc, const char **args)
{
    char *argv[16];
    for (int i = 0; i < argc; i++) argv[i] = (char *)args[i];
    argv[argc] = NULL;
    fflush(stdout);
    return launch_data_main(argc, argv);
}

static void test_cli(void)
{
    char out[256];
    snprintf(out, sizeof out, "%s", tmp_path("cli.bin"));
    const char *synth[] = {"data", "synth", out, "--tokens", "5000", "--states=16",
                           "--seed", "7"};
    CU_ASSERT_EQUAL(run_cli(8, synth), 0);
    launch_tokens *t;
    CU_ASSERT_EQUAL_FATAL(launch_tokens_open(&t, out, LAUNCH_DTYPE_UINT16, 256, 4), 0);
    CU_ASSERT_EQUAL(launch_tokens_count(t), 5000);
    launch_tokens_close(t);
    const char *info[] = {"data", "info", out};
    CU_ASSERT_EQUAL(run_cli(3, info), 0);
    const char *help[] = {"data", "synth", "--help"};
    CU_ASSERT_EQUAL(run_cli(3, help), 0);

    printf("  (the usage errors below are expected)\n");
    const char *none[] = {"data"};
    CU_ASSERT_EQUAL(run_cli(1, none), 2);
    const char *unknown[] = {"data", "frobnicate"};
    CU_ASSERT_EQUAL(run_cli(2, unknown), 2);
    const char *no_out[] = {"data", "synth", "--states", "8"};
    CU_ASSERT_EQUAL(run_cli(4, no_out), 2);
    const char *not_num[] = {"data", "synth", out, "--states", "abc"};
    CU_ASSERT_EQUAL(run_cli(5, not_num), 2);
    const char *neg[] = {"data", "synth", out, "--tokens", "-5"};
    CU_ASSERT_EQUAL(run_cli(5, neg), 2);
    const char *no_value[] = {"data", "synth", out, "--seed"};
    CU_ASSERT_EQUAL(run_cli(4, no_value), 2);
    const char *branch[] = {"data", "synth", out, "--vocab", "8", "--branch", "9"};
    CU_ASSERT_EQUAL(run_cli(7, branch), 2);
    const char *bad_opt[] = {"data", "synth", out, "--colour", "red"};
    CU_ASSERT_EQUAL(run_cli(5, bad_opt), 2);
    const char *text_args[] = {"data", "text", out};
    CU_ASSERT_EQUAL(run_cli(3, text_args), 2);
    const char *dtype[] = {"data", "info", out, "--dtype", "int8"};
    CU_ASSERT_EQUAL(run_cli(5, dtype), 2);
    /* A runtime failure is not a usage error. */
    const char *missing[] = {"data", "info", tmp_path("nope.bin")};
    CU_ASSERT_EQUAL(run_cli(3, missing), 1);
}

/* ---------------------------------------------------------------- main */

static void remove_tmp_dir(void)
{
    DIR *d = opendir(tmp_dir);
    if (!d) return;
    for (struct dirent *e; (e = readdir(d));) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        unlink(tmp_path(e->d_name));
    }
    closedir(d);
    rmdir(tmp_dir);
}

int main(void)
{
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/vdist_test_XXXXXX");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("data", NULL, NULL);
    CU_add_test(s, "llm.c uint16 file, data order", test_llmc_uint16);
    CU_add_test(s, "llm.c uint32 file, data order", test_llmc_uint32);
    CU_add_test(s, "raw uint16 file, data order", test_raw_uint16);
    CU_add_test(s, "raw uint32 file, data order", test_raw_uint32);
    CU_add_test(s, "n_seq = floor((len - 1) / T)", test_nseq);
    CU_add_test(s, "file errors name the problem", test_errors);
    CU_add_test(s, "synth is deterministic per seed", test_synth_deterministic);
    CU_add_test(s, "synth ids below vocab, bad parameters", test_synth_ids);
    CU_add_test(s, "synth floor matches re-simulation", test_synth_floor);
    CU_add_test(s, "text round trip, atomic write", test_text_round_trip);
    CU_add_test(s, "vdist data command line", test_cli);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    int const failed = (int)CU_get_number_of_failures();
    CU_cleanup_registry();
    remove_tmp_dir();
    return failed != 0;
}
