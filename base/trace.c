/* The trace recorder (see trace.h). A part file is a run of lines ",\n{event}", so the merge
 * is a byte copy of each part after the header and the tracks' names, which make the first
 * element of the array. Every span is a complete event ("ph":"X") written when it ends. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/base.h"

/* Every rank is a thread of one process: Perfetto then shows the ranks as rows of one
 * group, and pid and tid start at 1 because it treats 0 as the kernel's idle task. */
enum { TRACE_PID = 1, TRACE_BUF_NBYTES = 1 << 20, TRACE_NAME_MAX = 256 };

bool vd_trace_enabled;

static FILE *part;
static char *part_buf;
static char part_name[4096];
static int part_tid;
static double zero_s;
static int write_err; /* errno of the first failed write, 0 while all is well */

double vd_trace_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The length of the valid UTF-8 sequence at p (2 to 4 bytes), 0 when it is not one:
 * overlong forms, surrogates and code points past U+10FFFF are not. */
static size_t utf8_len(const unsigned char *p)
{
    unsigned char const c = p[0];
    unsigned char lo = 0x80, hi = 0xBF;
    size_t n;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) n = 3;
    else if (c >= 0xF0 && c <= 0xF4) n = 4;
    else return 0;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
    if (p[1] < lo || p[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    return n;
}

size_t vd_trace_json_escape(char *out, size_t cap, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t len = 0;
    while (*p) {
        char piece[8];
        size_t n = 0, take = 1;
        unsigned char const c = *p;
        if (c == '"' || c == '\\') {
            piece[n++] = '\\';
            piece[n++] = (char)c;
        } else if (c == '\n' || c == '\t' || c == '\r') {
            piece[n++] = '\\';
            piece[n++] = c == '\n' ? 'n' : c == '\t' ? 't' : 'r';
        } else if (c < 0x20) {
            memcpy(piece, "\\u00", 4);
            piece[4] = hex[c >> 4];
            piece[5] = hex[c & 15];
            n = 6;
        } else if (c < 0x80) {
            piece[n++] = (char)c;
        } else if ((take = utf8_len(p)) > 0) {
            memcpy(piece, p, take);
            n = take;
        } else {
            memcpy(piece, "\\ufffd", 6);
            n = 6;
            take = 1;
        }
        if (len + n + 1 > cap) break;
        memcpy(out + len, piece, n);
        len += n;
        p += take;
    }
    if (cap > 0) out[len] = '\0';
    return len;
}

/* Nanoseconds from time zero, never negative. */
static long long since_zero_ns(double t)
{
    double const ns = (t - zero_s) * 1e9;
    return ns > 0 ? llround(ns) : 0;
}

static void emit(const char *cat, double t0, double t1, const char *args, const char *fmt,
                 va_list ap)
{
    char name[TRACE_NAME_MAX], ename[6 * TRACE_NAME_MAX], ecat[6 * 32], line[8 * TRACE_NAME_MAX];
    vsnprintf(name, sizeof name, fmt, ap);
    vd_trace_json_escape(ename, sizeof ename, name);
    vd_trace_json_escape(ecat, sizeof ecat, cat);
    long long const a = since_zero_ns(t0), b = since_zero_ns(t1), d = b > a ? b - a : 0;
    int const n = snprintf(line, sizeof line,
                           ",\n{\"name\":\"%s\",\"cat\":\"%s\",\"ph\":\"X\",\"ts\":%lld.%03lld,"
                           "\"dur\":%lld.%03lld,\"pid\":%d,\"tid\":%d%s}",
                           ename, ecat, a / 1000, a % 1000, d / 1000, d % 1000, TRACE_PID,
                           part_tid, args);
    size_t const len = n < (int)sizeof line ? (size_t)n : sizeof line - 1;
    if (fwrite(line, 1, len, part) != len && write_err == 0) write_err = errno ? errno : EIO;
}

void vd_trace_span(const char *cat, double t0, double t1, const char *fmt, ...)
{
    if (!vd_trace_enabled) return;
    va_list ap;
    va_start(ap, fmt);
    emit(cat, t0, t1, "", fmt, ap);
    va_end(ap);
}

void vd_trace_span_nbytes(const char *cat, double t0, double t1, size_t nbytes,
                          const char *fmt, ...)
{
    if (!vd_trace_enabled) return;
    char args[64];
    snprintf(args, sizeof args, ",\"args\":{\"bytes\":%zu}", nbytes);
    va_list ap;
    va_start(ap, fmt);
    emit(cat, t0, t1, args, fmt, ap);
    va_end(ap);
}

int vd_trace_part_path(char *out, size_t cap, const char *path, int rank)
{
    int const n = snprintf(out, cap, "%s.rank%d.part", path, rank);
    RETURN_IF(n < 0 || (size_t)n >= cap, VD_EINVAL, "path %s.rank%d.part is too long", path,
              rank);
    return 0;
}

int vd_trace_open(const char *path, int rank)
{
    VD_CHECK(!part, "vd_trace_open: a trace is open already");
    FORWARD_IF(vd_trace_part_path(part_name, sizeof part_name, path, rank));
    part = fopen(part_name, "w");
    RETURN_IF(!part, VD_EIO, "cannot create trace part file %s: %s", part_name,
              strerror(errno));
    part_buf = vd_alloc(TRACE_BUF_NBYTES);
    setvbuf(part, part_buf, _IOFBF, TRACE_BUF_NBYTES);
    part_tid = rank + 1;
    write_err = 0;
    return 0;
}

void vd_trace_start(void)
{
    VD_CHECK(part, "vd_trace_start: no trace is open");
    zero_s = vd_trace_now();
    vd_trace_enabled = true;
}

int vd_trace_close(void)
{
    vd_trace_enabled = false;
    if (!part) return 0;
    if (fclose(part) != 0 && write_err == 0) write_err = errno;
    part = NULL;
    free(part_buf);
    part_buf = NULL;
    RETURN_IF(write_err != 0, VD_EIO, "cannot write trace part file %s: %s", part_name,
              strerror(write_err));
    return 0;
}

void vd_trace_discard(const char *path, int rank)
{
    vd_trace_enabled = false;
    if (part) fclose(part);
    part = NULL;
    free(part_buf);
    part_buf = NULL;
    char name[sizeof part_name];
    if (vd_trace_part_path(name, sizeof name, path, rank) == 0) unlink(name);
}

/* Appends the part file of `rank` to out through buf (cap bytes). */
static int copy_part(FILE *out, const char *path, int rank, char *buf, size_t cap)
{
    char name[sizeof part_name];
    FORWARD_IF(vd_trace_part_path(name, sizeof name, path, rank));
    FILE *in = fopen(name, "r");
    RETURN_IF(!in, VD_EIO, "cannot read trace part file %s: %s (all ranks must reach the "
              "trace's directory)", name, strerror(errno));
    size_t got;
    while ((got = fread(buf, 1, cap, in)) > 0)
        if (fwrite(buf, 1, got, out) != got) break;
    bool const read_ok = !ferror(in);
    fclose(in);
    RETURN_IF(!read_ok, VD_EIO, "cannot read trace part file %s", name);
    return 0;
}

/* The header, every track's name and sort order, every part, the footer, into out (the
 * temporary file tmp). */
static int write_trace(FILE *out, const char *tmp, const char *path, int nranks)
{
    fprintf(out, "{\"traceEvents\":[\n{\"name\":\"process_name\",\"ph\":\"M\",\"ts\":0,"
                 "\"pid\":%d,\"tid\":%d,\"args\":{\"name\":\"vdist\"}}",
            TRACE_PID, 1);
    for (int r = 0; r < nranks; r++)
        fprintf(out, ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"ts\":0,\"pid\":%d,\"tid\":%d,"
                     "\"args\":{\"name\":\"rank %d\"}}"
                     ",\n{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"ts\":0,\"pid\":%d,"
                     "\"tid\":%d,\"args\":{\"sort_index\":%d}}",
                TRACE_PID, r + 1, r, TRACE_PID, r + 1, r);
    char *buf = vd_alloc(TRACE_BUF_NBYTES);
    int rc = 0;
    for (int r = 0; rc == 0 && r < nranks; r++)
        rc = copy_part(out, path, r, buf, TRACE_BUF_NBYTES);
    free(buf);
    FORWARD_IF(rc);
    fputs("\n],\"displayTimeUnit\":\"ms\"}\n", out);
    /* a write that failed on the way leaves only the stream's error flag */
    RETURN_IF(fflush(out) != 0 || ferror(out), VD_EIO, "cannot write trace file %s: %s", tmp,
              strerror(errno ? errno : EIO));
    return 0;
}

int vd_trace_merge(const char *path, int nranks)
{
    char tmp[sizeof part_name];
    FORWARD_IF(vd_tmp_name(tmp, sizeof tmp, path));
    FILE *out = fopen(tmp, "w");
    RETURN_IF(!out, VD_EIO, "cannot write trace file %s: %s", tmp, strerror(errno));
    int const rc = write_trace(out, tmp, path, nranks);
    if (rc < 0) {
        fclose(out);
        unlink(tmp);
        return vd_err_forward(rc, __FILE__, __LINE__);
    }
    /* a failed sync of the directory after the rename leaves a whole trace: best effort */
    enum vd_replace_step failed;
    RETURN_IF(vd_replace_stream(out, false, tmp, path, &failed) != 0 &&
                  failed < VD_REPLACE_OPEN_DIR,
              VD_EIO, "cannot write trace file %s: %s", path, strerror(errno));
    return 0;
}
