/* Error values, fatal checks and allocation shared by every folder (see base.h's error
 * rule). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"

static char err_msg[4096];
static char fatal_prefix[256] = "vdist";
static void (*fatal_hook)(void);

int vd_err_set(int code, const char *file, int line, const char *fmt, ...)
{
    int const saved_errno = errno;
    char body[3072];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    snprintf(err_msg, sizeof err_msg, "%s (at %s:%d)", body, file, line);
    errno = saved_errno;
    return code;
}

int vd_err_forward(int code, const char *file, int line)
{
    int const saved_errno = errno;
    size_t const used = strlen(err_msg);
    if (used + 64 < sizeof err_msg)
        snprintf(err_msg + used, sizeof err_msg - used, " (via %s:%d)", file, line);
    errno = saved_errno;
    return code;
}

const char *vd_err_msg(void) { return err_msg[0] ? err_msg : "no error recorded"; }

void vd_err_clear(void) { err_msg[0] = '\0'; }

void vd_set_fatal_hook(const char *prefix, void (*hook)(void))
{
    snprintf(fatal_prefix, sizeof fatal_prefix, "%s", prefix);
    fatal_hook = hook;
}

_Noreturn void vd_fatal(const char *file, int line, const char *fmt, ...)
{
    char body[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    fprintf(stderr, "[%s] %s:%d: %s\n", fatal_prefix, file, line, body);
    fflush(stderr);
    if (fatal_hook) fatal_hook();
    abort();
}

void *vd_alloc(size_t nbytes)
{
    void *p = NULL;
    /* 64-byte alignment keeps BLAS and vectorised loops on whole cache lines. */
    if (posix_memalign(&p, 64, nbytes ? nbytes : 64) != 0)
        vd_fatal(__FILE__, __LINE__, "out of memory allocating %zu bytes", nbytes);
    return p;
}

void *vd_calloc(size_t count, size_t size)
{
    VD_CHECK(size == 0 || count <= SIZE_MAX / size, "allocation size overflows");
    void *p = vd_alloc(count * size);
    memset(p, 0, count * size);
    return p;
}
