/* File-system helpers shared by the checkpoint writers and the program. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt.h"

int ckpt_make_dirs(const char *path)
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

int ckpt_sync_dir(const char *path)
{
    int const fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    RETURN_IF(fd < 0, VD_EIO, "cannot open %s to sync it: %s", path, strerror(errno));
    int const rc = fsync(fd);
    int const err = errno;
    close(fd);
    RETURN_IF(rc != 0, VD_EIO, "cannot sync %s: %s", path, strerror(err));
    return 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int ckpt_remove_tree_quiet(const char *path)
{
    return nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}
