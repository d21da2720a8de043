/* libFuzzer harness for the sharded checkpoint's manifest parser (ckpt/shard.c), reached
 * through ckpt_verify and ckpt_latest.
 *
 * Once per process: a temporary ROOT/step_00000001/ holding the shard files of
 * tests/fuzz/shards/ (rank_00000.zst of a real 1-step checkpoint, rank_00001.zst made for
 * the small seeds), so a manifest that parses gets as far as decompressing its pieces.
 * Each input becomes that directory's manifest.json; then ckpt_verify(step dir) and
 * ckpt_latest(ROOT). Oracle: ckpt_latest never fails on a readable root, and names either
 * nothing or this directory. Sanitizers catch the rest: overflows, leaks, and any
 * allocation over -malloc_limit_mb (libFuzzer's "out-of-memory (malloc(N))"), which a
 * manifest must not be able to ask for beyond what its shard files hold.
 *
 * Half the mutations are structure-aware (json_mutate.h), with shard names around the
 * limits of a rank number as the words to try.
 *
 * The shard directory is FUZZ_SHARD_DIR (set by the Makefile), or $VDIST_FUZZ_SHARDS. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt.h"
#include "tests/fuzz/json_mutate.h"

#ifndef FUZZ_SHARD_DIR
#define FUZZ_SHARD_DIR "tests/fuzz/shards"
#endif

static char root_dir[64];
static char step_dir[128];
static char manifest_path[192];
static FILE *devnull;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed);

static _Noreturn void die(const char *what, const char *path)
{
    fprintf(stderr, "fuzz_manifest: %s %s: %s\n", what, path, strerror(errno));
    abort();
}

static void copy_file(const char *from, const char *to)
{
    int const in = open(from, O_RDONLY | O_CLOEXEC);
    if (in < 0) die("cannot open", from);
    int const out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) die("cannot create", to);
    char buf[1 << 16];
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, (size_t)n) != n) die("cannot write", to);
    if (n < 0) die("cannot read", from);
    close(in);
    close(out);
}

/* Copies every rank_*.zst of dir into the step directory; returns how many. */
static int copy_shards(const char *dir)
{
    DIR *const d = opendir(dir);
    if (!d) die("cannot read the shard directory", dir);
    int copied = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t const len = strlen(e->d_name);
        if (strncmp(e->d_name, "rank_", 5) != 0 || len < 4 ||
            strcmp(e->d_name + len - 4, ".zst") != 0)
            continue;
        char from[PATH_MAX], to[PATH_MAX];
        snprintf(from, sizeof from, "%s/%s", dir, e->d_name);
        snprintf(to, sizeof to, "%s/%s", step_dir, e->d_name);
        copy_file(from, to);
        copied++;
    }
    closedir(d);
    return copied;
}

static void remove_root(void)
{
    vd_remove_tree_quiet(root_dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    snprintf(root_dir, sizeof root_dir, "/tmp/vdist-fuzz-manifest.XXXXXX");
    if (!mkdtemp(root_dir)) die("cannot create", root_dir);
    atexit(remove_root);
    snprintf(step_dir, sizeof step_dir, "%s/step_00000001", root_dir);
    if (mkdir(step_dir, 0755) != 0) die("cannot create", step_dir);
    snprintf(manifest_path, sizeof manifest_path, "%s/manifest.json", step_dir);
    const char *const shards = getenv("VDIST_FUZZ_SHARDS");
    int const copied = copy_shards(shards && *shards ? shards : FUZZ_SHARD_DIR);
    if (copied == 0) fprintf(stderr, "fuzz_manifest: no shard files; verify stops early\n");
    devnull = fopen("/dev/null", "w");
    if (!devnull) die("cannot open", "/dev/null");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FILE *const fp = fopen(manifest_path, "wb");
    if (!fp) die("cannot create", manifest_path);
    if (size > 0 && fwrite(data, 1, size, fp) != size) die("cannot write", manifest_path);
    if (fclose(fp) != 0) die("cannot close", manifest_path);

    (void)ckpt_verify(step_dir, devnull);
    vd_err_clear();
    char latest[PATH_MAX];
    int const rc = ckpt_latest(root_dir, latest, sizeof latest);
    if (rc != 0 || (latest[0] && strcmp(latest, step_dir) != 0)) {
        fprintf(stderr, "fuzz_manifest: broken promise: ckpt_latest gave %d, '%s' (%s)\n", rc,
                latest, vd_err_msg());
        abort();
    }
    vd_err_clear();
    return 0;
}

/* ---------------------------------------------------------------- structure-aware mutator */

/* Shard names around the limits of file_rank (5 digits as written; int; 20 characters). */
static const char *const shard_words[] = {
    "rank_00000.zst", "rank_00001.zst", "rank_00002.zst", "rank_99999.zst", "rank_100000.zst",
    "rank_2147483647.zst", "rank_2147483648.zst", "rank_9999999999.zst", "param", "m", "v",
};

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed)
{
    uint64_t state = (uint64_t)seed * 0x9e3779b97f4a7c15ull + 1;
    if (fuzz_rng(&state) % 2) return LLVMFuzzerMutate(data, size, max_size);
    json_t *const root = json_loadb((const char *)data, size, 0, NULL);
    if (!root) return LLVMFuzzerMutate(data, size, max_size);
    fuzz_json_mutate(root, &state, shard_words, sizeof shard_words / sizeof shard_words[0]);
    char *const text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
    json_decref(root);
    size_t const len = text ? strlen(text) : 0;
    if (!text || len > max_size) {
        free(text);
        return LLVMFuzzerMutate(data, size, max_size);
    }
    memcpy(data, text, len);
    free(text);
    return len;
}
