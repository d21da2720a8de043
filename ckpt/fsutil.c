/* File-system helpers shared by the checkpoint writers and the program. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

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
