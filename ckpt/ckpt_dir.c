/* The checkpoint directory ROOT: which checkpoint to resume from (ckpt_latest_ex,
 * ckpt_previous) and the removal of old checkpoints and of what saves cut short left
 * (ckpt_prune, ckpt_cleanup). Names of the form step_N.<anything> are such leftovers (a
 * save's temporary directory, a checkpoint moved aside or being removed), never a
 * checkpoint. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt_internal.h"

/* ---------------------------------------------------------------- files */

int ckpt_remove_tree(const char *path)
{
    RETURN_IF(vd_remove_tree_quiet(path) != 0, VD_EIO, "cannot remove %s: %s", path, strerror(errno));
    return 0;
}

/* "step_<digits>" (exact: a checkpoint's final name) or "step_<digits>.<anything>" (a save
 * or removal cut short). */
static bool parse_step_name(const char *name, long *step, bool *exact)
{
    if (strncmp(name, "step_", 5) != 0) return false;
    const char *p = name + 5;
    if (*p < '0' || *p > '9') return false;
    errno = 0;
    char *end;
    long const s = strtol(p, &end, 10);
    if (errno != 0 || (*end != '\0' && *end != '.')) return false;
    *step = s;
    *exact = *end == '\0';
    return true;
}

/* ---------------------------------------------------------------- latest, prune, cleanup */

/* Whether root/name is a complete checkpoint of step `step`: a valid manifest, and every
 * shard file it names present and exactly its pieces. */
static bool is_complete(const char *root, const char *name, long step)
{
    char dir[PATH_MAX];
    if (vd_path_join(dir, sizeof dir, root, name) != 0) return false;
    struct manifest m;
    bool const ok = ckpt_manifest_read(&m, dir) == 0 && m.step == step && ckpt_manifest_check_files(&m) == 0;
    ckpt_manifest_free(&m);
    return ok;
}

/* Whether root/name is a directory a save left without a valid manifest (cut short). One
 * whose manifest exists but cannot be opened (permissions, I/O) is not judged: false. */
static bool is_partial(const char *root, const char *name)
{
    char dir[PATH_MAX], path[PATH_MAX];
    if (vd_path_join(dir, sizeof dir, root, name) != 0 ||
        vd_path_join(path, sizeof path, dir, SHARD_MANIFEST) != 0)
        return false;
    int const fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT;
    close(fd);
    struct manifest m;
    bool bad = ckpt_manifest_read(&m, dir) != 0;
    ckpt_manifest_free(&m);
    /* a newer vdist's checkpoint is not this one's to judge */
    json_t *j = bad ? json_load_file(path, 0, NULL) : NULL;
    const char *format = json_string_value(json_object_get(j, "format"));
    const json_t *version = json_object_get(j, "version");
    if (format && strcmp(format, SHARD_FORMAT) == 0 && json_is_integer(version) &&
        json_integer_value(version) > SHARD_VERSION)
        bad = false;
    json_decref(j);
    return bad;
}

struct step_entry {
    char name[256];
    long step;
    bool exact; /* step_N, not step_N.<suffix> */
    bool complete;
};

/* The directories under root named step_N or step_N.<suffix>, with whether each is a
 * complete checkpoint when `judge`; *n = 0 when root does not exist. */
static int list_steps(const char *root, bool judge, struct step_entry **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    DIR *d = opendir(root);
    if (!d && errno == ENOENT) return 0;
    RETURN_IF(!d, VD_EIO, "cannot read checkpoint directory %s: %s", root, strerror(errno));
    size_t cap = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long step;
        bool exact;
        char path[PATH_MAX];
        struct stat st;
        if (!parse_step_name(e->d_name, &step, &exact) ||
            strlen(e->d_name) >= sizeof(*out)->name ||
            vd_path_join(path, sizeof path, root, e->d_name) != 0 || lstat(path, &st) != 0 ||
            !S_ISDIR(st.st_mode))
            continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            struct step_entry *grown = realloc(*out, cap * sizeof **out);
            VD_CHECK(grown != NULL, "out of memory listing %s", root);
            *out = grown;
        }
        struct step_entry *s = &(*out)[(*n)++];
        snprintf(s->name, sizeof s->name, "%s", e->d_name);
        s->step = step;
        s->exact = exact;
        s->complete = judge && exact && is_complete(root, e->d_name, step);
    }
    closedir(d);
    return 0;
}

/* ROOT/latest: 1 with the checkpoint name it holds (step_N) and its step, 0 when there is
 * no such file, -1 when it cannot be read or does not hold such a name. */
static int latest_read(const char *root, char *name, size_t cap, long *step)
{
    char path[PATH_MAX];
    if (vd_path_join(path, sizeof path, root, SHARD_LATEST) != 0) return -1;
    int const fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : -1;
    char buf[64];
    size_t got = 0;
    int const rc = ckpt_read_at(fd, buf, sizeof buf - 1, 0, &got);
    close(fd);
    if (rc != 0) return -1;
    buf[got] = '\0';
    while (got > 0 && (buf[got - 1] == '\n' || buf[got - 1] == ' ' || buf[got - 1] == '\r'))
        buf[--got] = '\0';
    bool exact;
    if (!parse_step_name(buf, step, &exact) || !exact || got >= cap) return -1;
    memcpy(name, buf, got + 1);
    return 1;
}

/* The newest complete checkpoint of s[0..n) with a step below `below`, or NULL. */
static const struct step_entry *newest_complete(const struct step_entry *s, size_t n, long below)
{
    const struct step_entry *best = NULL;
    for (size_t i = 0; i < n; i++)
        if (s[i].complete && s[i].step < below && (!best || s[i].step > best->step)) best = &s[i];
    return best;
}

int ckpt_latest_ex(const char *root, char *out, size_t cap, bool *fell_back)
{
    RETURN_IF(cap == 0, VD_EINVAL, "no room for the checkpoint path");
    out[0] = '\0';
    if (fell_back) *fell_back = false;
    char name[64];
    long step = -1;
    int const pointer = latest_read(root, name, sizeof name, &step);
    int rc = 0;
    if (pointer == 1 && is_complete(root, name, step)) {
        rc = vd_path_join(out, cap, root, name);
    } else {
        struct step_entry *s;
        size_t n;
        FORWARD_IF(list_steps(root, true, &s, &n));
        const struct step_entry *best = newest_complete(s, n, LONG_MAX);
        if (best) rc = vd_path_join(out, cap, root, best->name);
        if (fell_back) *fell_back = pointer != 0 || best != NULL;
        free(s);
    }
    if (rc != 0) out[0] = '\0';
    FORWARD_IF(rc);
    return 0;
}

int ckpt_latest(const char *root, char *out, size_t cap)
{
    FORWARD_IF(ckpt_latest_ex(root, out, cap, NULL));
    return 0;
}

int ckpt_previous(const char *root, long before_step, char *out, size_t cap)
{
    RETURN_IF(cap == 0, VD_EINVAL, "no room for the checkpoint path");
    out[0] = '\0';
    struct step_entry *s;
    size_t n;
    FORWARD_IF(list_steps(root, true, &s, &n));
    const struct step_entry *best = newest_complete(s, n, before_step);
    int const rc = best ? vd_path_join(out, cap, root, best->name) : 0;
    if (rc != 0) out[0] = '\0';
    free(s);
    FORWARD_IF(rc);
    return 0;
}

static int cmp_step_desc(const void *x, const void *y)
{
    long const a = ((const struct step_entry *)x)->step, b = ((const struct step_entry *)y)->step;
    return (a < b) - (a > b);
}

/* Removes the checkpoint root/name, renamed first so a removal cut short never leaves a
 * checkpoint-like name. */
static int remove_checkpoint(const char *root, const char *name, long step)
{
    char path[PATH_MAX], gone[PATH_MAX], gone_name[96];
    FORWARD_IF(vd_path_join(path, sizeof path, root, name));
    snprintf(gone_name, sizeof gone_name, "step_%08ld.del.%ld", step, (long)getpid());
    FORWARD_IF(vd_path_join(gone, sizeof gone, root, gone_name));
    RETURN_IF(rename(path, gone) != 0, VD_EIO, "cannot rename %s to %s: %s", path, gone,
              strerror(errno));
    FORWARD_IF(ckpt_remove_tree(gone));
    return 0;
}

int ckpt_prune(const char *root, int keep)
{
    RETURN_IF(keep < 0, VD_EINVAL, "ckpt.keep = %d; allowed are 0 (keep all) or more", keep);
    struct step_entry *s;
    size_t n;
    FORWARD_IF(list_steps(root, true, &s, &n));
    qsort(s, n, sizeof *s, cmp_step_desc);
    char latest[64] = "";
    long latest_step;
    if (latest_read(root, latest, sizeof latest, &latest_step) != 1) latest[0] = '\0';
    long newest = -1;
    for (size_t i = 0; i < n && newest < 0; i++)
        if (s[i].complete) newest = s[i].step;
    int rc = 0, kept = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char path[PATH_MAX];
        if (s[i].complete) {
            /* the committed checkpoint stays, whatever its age */
            if (keep == 0 || kept++ < keep || strcmp(s[i].name, latest) == 0) continue;
            rc = remove_checkpoint(root, s[i].name, s[i].step);
        } else if (s[i].step < newest) {
            rc = vd_path_join(path, sizeof path, root, s[i].name);
            if (rc == 0) rc = ckpt_remove_tree(path);
        }
    }
    free(s);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_cleanup(const char *root)
{
    struct step_entry *s;
    size_t n;
    FORWARD_IF(list_steps(root, false, &s, &n));
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        char path[PATH_MAX];
        int r = 0;
        if (!s[i].exact) {
            r = vd_path_join(path, sizeof path, root, s[i].name);
            if (r == 0) r = ckpt_remove_tree(path);
        } else if (is_partial(root, s[i].name)) {
            r = remove_checkpoint(root, s[i].name, s[i].step);
        }
        if (rc == 0) rc = r;
    }
    free(s);
    /* latest.tmp.<pid>: a commit cut short */
    DIR *d = opendir(root);
    const struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        char path[PATH_MAX];
        if (strncmp(e->d_name, SHARD_LATEST ".tmp.", strlen(SHARD_LATEST ".tmp.")) != 0 ||
            vd_path_join(path, sizeof path, root, e->d_name) != 0)
            continue;
        if (unlink(path) != 0 && rc == 0)
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot remove %s: %s", path,
                            strerror(errno));
    }
    if (d) closedir(d);
    FORWARD_IF(rc);
    return 0;
}
