/* File-system helpers shared by every writer of files: checkpoints, exports, token files,
 * configs, logs. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/base.h"

int vd_path_join(char *out, size_t cap, const char *dir, const char *name)
{
    int const n = snprintf(out, cap, "%s/%s", dir, name);
    RETURN_IF(n < 0 || (size_t)n >= cap, VD_EINVAL, "path %s/%s is too long", dir, name);
    return 0;
}

int vd_write_all(int fd, const char *path, const void *buf, size_t nbytes)
{
    const char *p = buf;
    while (nbytes > 0) {
        /* Linux writes at most 2^31 - 4096 bytes a call; whole GiB keep pieces aligned */
        size_t const chunk = nbytes < ((size_t)1 << 30) ? nbytes : (size_t)1 << 30;
        ssize_t const w = write(fd, p, chunk);
        if (w < 0 && errno == EINTR) continue;
        if (w == 0) errno = EIO;
        RETURN_IF(w <= 0, VD_EIO, "%s: cannot write: %s", path,
                  w < 0 ? strerror(errno) : "no progress");
        p += w;
        nbytes -= (size_t)w;
    }
    return 0;
}

int vd_make_dirs(const char *path)
{
    char buf[PATH_MAX];
    int const n = snprintf(buf, sizeof buf, "%s", path);
    RETURN_IF(n < 0 || (size_t)n >= sizeof buf, VD_EINVAL, "path %s is too long", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            RETURN_ERR(VD_EIO, "cannot create directory %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0777) != 0 && errno != EEXIST)
        RETURN_ERR(VD_EIO, "cannot create directory %s: %s", buf, strerror(errno));
    struct stat st;
    RETURN_IF(stat(buf, &st) != 0 || !S_ISDIR(st.st_mode), VD_EIO,
              "%s is not a directory", buf);
    return 0;
}

/* vd_sync_dir, telling an open failure from a sync failure in *failed. */
static int sync_dir_step(const char *path, enum vd_replace_step *failed)
{
    int const fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        *failed = VD_REPLACE_OPEN_DIR;
        RETURN_ERR(VD_EIO, "cannot open %s to sync it: %s", path, strerror(errno));
    }
    int const rc = fsync(fd);
    int const err = errno;
    close(fd);
    if (rc != 0) {
        *failed = VD_REPLACE_SYNC_DIR;
        errno = err;
        RETURN_ERR(VD_EIO, "cannot sync %s: %s", path, strerror(err));
    }
    return 0;
}

int vd_sync_dir(const char *path)
{
    enum vd_replace_step failed;
    FORWARD_IF(sync_dir_step(path, &failed));
    return 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int vd_remove_tree_quiet(const char *path)
{
    return nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

int vd_tmp_name(char *tmp, size_t cap, const char *path)
{
    long const pid = (long)getpid();
    int const n = snprintf(tmp, cap, "%s.tmp.%ld", path, pid);
    RETURN_IF(n < 0 || (size_t)n >= cap, VD_EINVAL, "path %s.tmp.%ld is too long", path, pid);
    return 0;
}

/* The rename and the directory's sync of a commit whose file is closed. */
static int replace_closed(const char *tmp, const char *path, enum vd_replace_step *failed)
{
    if (rename(tmp, path) != 0) {
        int const err = errno;
        unlink(tmp);
        *failed = VD_REPLACE_RENAME;
        errno = err;
        RETURN_ERR(VD_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(err));
    }
    /* path's directory: what precedes its last '/' ("/" for a file at the root, "." for a
     * bare name); it fits, since the rename took path */
    char dir[PATH_MAX] = ".";
    const char *const slash = strrchr(path, '/');
    if (slash) snprintf(dir, sizeof dir, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    FORWARD_IF(sync_dir_step(dir, failed));
    return 0;
}

/* A failed step before the rename: the file is closed, the temporary goes. */
static int replace_fail(const char *tmp, enum vd_replace_step step, int err,
                        enum vd_replace_step *failed)
{
    unlink(tmp);
    *failed = step;
    errno = err;
    RETURN_ERR(VD_EIO, "cannot write %s: %s", tmp, strerror(err));
}

int vd_replace_fd(int fd, const char *tmp, const char *path, enum vd_replace_step *failed)
{
    if (fd >= 0) {
        if (fsync(fd) != 0) {
            int const err = errno;
            close(fd);
            return replace_fail(tmp, VD_REPLACE_SYNC, err, failed);
        }
        if (close(fd) != 0) return replace_fail(tmp, VD_REPLACE_CLOSE, errno, failed);
    }
    FORWARD_IF(replace_closed(tmp, path, failed));
    return 0;
}

int vd_replace_stream(FILE *f, bool keep_open, const char *tmp, const char *path,
                      enum vd_replace_step *failed)
{
    bool const flushed = fflush(f) == 0;
    if (!flushed || fsync(fileno(f)) != 0) {
        int const err = errno;
        fclose(f);
        return replace_fail(tmp, flushed ? VD_REPLACE_SYNC : VD_REPLACE_FLUSH, err, failed);
    }
    if (!keep_open && fclose(f) != 0) return replace_fail(tmp, VD_REPLACE_CLOSE, errno, failed);
    int const rc = replace_closed(tmp, path, failed);
    if (rc != 0 && keep_open && *failed == VD_REPLACE_RENAME) {
        int const err = errno;
        fclose(f);
        errno = err;
    }
    FORWARD_IF(rc);
    return 0;
}
