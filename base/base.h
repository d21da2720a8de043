/* base/: the bottom layer every folder may include; it includes nothing of vdist. Error
 * values and fatal checks, allocation, the file-system helpers the writers of files share
 * (ckpt/, launch/), and the trace recorder (base/trace.h, included at the end).
 *
 * Error rule: functions that can fail on input (a file, a config, a checkpoint) return 0
 * or a negative VD_E* code and record a message (vd_err_msg); RETURN_IF / FORWARD_IF add
 * file:line as the error propagates, and launch/ decides to stop. Programming errors are
 * checked with VD_CHECK, which aborts. Helpers named *_quiet record no message: they
 * return -1 with errno, for clean-up after another error whose message must stay. */
#ifndef VDIST_BASE_H
#define VDIST_BASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---------------------------------------------------------------- errors */

enum {
    VD_OK = 0,
    VD_EINVAL = -1,  /* bad value: config, option, layout */
    VD_EIO = -2,     /* a file could not be opened, read or written */
    VD_EFORMAT = -3, /* a file's content is malformed */
    VD_ENOMEM = -4,
    VD_EMPI = -5,
};

/* Records `code` with the message "message (at file:line)" and returns code; the latest
 * error wins. */
int vd_err_set(int code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Appends " (via file:line)" to the recorded message and returns code unchanged. Both
 * leave errno as it was, so a caller may still word its own message from it. */
int vd_err_forward(int code, const char *file, int line);
const char *vd_err_msg(void);
void vd_err_clear(void);

#define RETURN_ERR(code, ...) return vd_err_set((code), __FILE__, __LINE__, __VA_ARGS__)
#define RETURN_IF(cond, code, ...)                                                   \
    do {                                                                             \
        if (cond) RETURN_ERR((code), __VA_ARGS__);                                   \
    } while (0)
#define FORWARD_IF(expr)                                                             \
    do {                                                                             \
        int const fwd_err_ = (expr);                                                 \
        if (fwd_err_ < 0) return vd_err_forward(fwd_err_, __FILE__, __LINE__);       \
    } while (0)

/* Programming errors: always on. Prints "[prefix] file:line: message" and calls the abort
 * hook (abort() by default; dist/ installs one that calls MPI_Abort with the rank). */
_Noreturn void vd_fatal(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void vd_set_fatal_hook(const char *prefix, void (*hook)(void));
#define VD_CHECK(cond, ...)                                                          \
    do {                                                                             \
        if (!(cond)) vd_fatal(__FILE__, __LINE__, __VA_ARGS__);                      \
    } while (0)

/* Allocation that aborts on failure: only used at set-up time, never per step. */
void *vd_alloc(size_t nbytes);
void *vd_calloc(size_t count, size_t size);

/* ---------------------------------------------------------------- files (base/fsutil.c) */

/* dir/name into out (cap bytes); VD_EINVAL "path dir/name is too long" when it does not
 * fit. */
int vd_path_join(char *out, size_t cap, const char *dir, const char *name);
/* Writes all nbytes (in pieces, retrying interrupted writes); VD_EIO with "path: cannot
 * write: why" on failure, errno left as the failed write set it (EIO when a write made no
 * progress), so a caller may word its own message. */
int vd_write_all(int fd, const char *path, const void *buf, size_t nbytes);
/* mkdir -p: creates path and its missing parents; VD_EIO naming the directory that could
 * not be made, or when path exists and is not a directory. */
int vd_make_dirs(const char *path);
/* fsync of a directory (its entries reach the disk); VD_EIO naming it on failure. */
int vd_sync_dir(const char *path);
/* rm -rf with nftw, not following links: 0, or -1 with errno and no message. */
int vd_remove_tree_quiet(const char *path);

/* Replacing a file atomically and durably. The new content is written under a temporary
 * name next to the file (vd_tmp_name: "PATH.tmp.<pid>"), then committed by vd_replace_fd or
 * vd_replace_stream: fsync of the temporary, close, rename over PATH, fsync of PATH's
 * directory. At every moment PATH holds either the old content or the new one whole, and
 * once the commit returns 0 the new one survives a crash.
 *
 * A failed commit returns VD_EIO with a message ("cannot write TMP: why", "cannot rename
 * TMP to PATH: why", or vd_sync_dir's), leaves errno as the failed call set it and says
 * which step failed in *failed, so a caller can word the error its users know instead. A
 * failure up to the rename closes the file and removes the temporary; PATH is untouched. A
 * failure of the directory's sync (VD_REPLACE_OPEN_DIR, VD_REPLACE_SYNC_DIR) comes after
 * the rename: PATH holds the new content, which only may not survive a crash; callers for
 * whom durability is best effort go on. */
enum vd_replace_step {
    VD_REPLACE_FLUSH = 1, /* stdio's buffer into the file */
    VD_REPLACE_SYNC,      /* fsync of the file */
    VD_REPLACE_CLOSE,
    VD_REPLACE_RENAME,
    VD_REPLACE_OPEN_DIR,  /* opening PATH's directory to sync it */
    VD_REPLACE_SYNC_DIR,  /* fsync of PATH's directory */
};
/* PATH.tmp.<pid> into tmp (cap bytes); VD_EINVAL "path ... is too long" when it does not
 * fit. */
int vd_tmp_name(char *tmp, size_t cap, const char *path);
/* Commits the temporary file tmp, written through fd, as path; fd is synced and closed
 * here, either way. fd -1: the caller has synced and closed the file already (only the
 * rename and the directory's sync are left). */
int vd_replace_fd(int fd, const char *tmp, const char *path, enum vd_replace_step *failed);
/* The same for a stdio stream: fflush, fsync, fclose, rename, sync of the directory. With
 * keep_open the stream stays open after a rename that succeeded, now writing to path (a log
 * that goes on); after a failure before the rename it is closed either way. */
int vd_replace_stream(FILE *f, bool keep_open, const char *tmp, const char *path,
                      enum vd_replace_step *failed);

/* ---------------------------------------------------------------- trace (base/trace.c) */

#include "base/trace.h"

#endif
