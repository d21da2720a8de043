/* base/trace.h: a per-process recorder of Chrome trace events (the JSON that Perfetto and
 * chrome://tracing open), included by base/base.h so every folder has it. Pure files, no
 * MPI: launch/ opens one recorder per rank, starts them all at one moment (right after a
 * collective) and, at the end, has rank 0 merge the ranks' part files into one trace.
 *
 * While open, each span is written at once as one line of a part file next to the trace,
 * PATH.rank<N>.part, through a large stdio buffer: memory stays bounded on any run length
 * and recording a span costs a formatted write into that buffer, no synchronisation.
 * Timestamps are microseconds since the recorder was started, on CLOCK_MONOTONIC (one
 * clock for every process of a node, not stepped by time changes).
 *
 * Error rule: base.h's. vd_trace_open, vd_trace_close and vd_trace_merge return 0 or
 * VD_EIO with a message; vd_trace_span never fails (a failed write is remembered and
 * reported by vd_trace_close). */
#ifndef VDIST_BASE_TRACE_H
#define VDIST_BASE_TRACE_H

#include <stdbool.h>
#include <stddef.h>

/* Whether spans are being recorded; false until vd_trace_start and after vd_trace_close. */
extern bool vd_trace_enabled;
static inline bool vd_trace_on(void) { return vd_trace_enabled; }

/* Seconds on the trace clock (CLOCK_MONOTONIC), for the ends of a span. */
double vd_trace_now(void);

/* A complete span from t0 to t1 (vd_trace_now values) in category cat ("compute", "p2p",
 * "collective", "optimizer", "checkpoint", ...), named printf-style. A no-op when tracing
 * is off. Spans of one process form one track, so they must nest: two spans either are
 * disjoint or one contains the other. */
void vd_trace_span(const char *cat, double t0, double t1, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* The same with the byte count a communication moved, shown as the span's "bytes". */
void vd_trace_span_nbytes(const char *cat, double t0, double t1, size_t nbytes,
                          const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* The part file of `rank` for the trace at path: "PATH.rank<N>.part". */
int vd_trace_part_path(char *out, size_t cap, const char *path, int rank);
/* Opens (truncates) this process's part file; recording starts with vd_trace_start. */
int vd_trace_open(const char *path, int rank);
/* Time zero is now; spans are recorded from here on. Every rank calls it at the same moment
 * (right after a collective), which lines the ranks' tracks up. */
void vd_trace_start(void);
/* Stops recording, writes out and closes the part file (which stays, for the merge);
 * VD_EIO when any write to it failed. Nothing happens when no part file is open. */
int vd_trace_close(void);
/* Writes the trace at path from the closed part files of ranks 0 .. nranks-1, as one JSON
 * object {"traceEvents": [...], "displayTimeUnit": "ms"} with one track per rank named
 * "rank N". The file is replaced atomically: path is the old file or the whole new one. The
 * part files are left for their ranks to remove. */
int vd_trace_merge(const char *path, int nranks);
/* Stops recording, closes the part file if it is still open and removes the part file of
 * `rank`, quietly (for clean-up, also after another error whose message must stay). */
void vd_trace_discard(const char *path, int rank);

/* s as the body of a JSON string (no quotes) into out (cap bytes, NUL-terminated, cut at a
 * whole escape when it does not fit): '"', '\\' and control characters escaped, valid UTF-8
 * kept, any other byte replaced by U+FFFD. Returns the length written. */
size_t vd_trace_json_escape(char *out, size_t cap, const char *s);

#endif
