/* log.trace: the run's trace (base/trace.h) over every rank. Opening and closing are the
 * only collectives; recording a span is local. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "launch/launch_internal.h"

/* Rank 0 refuses a path that names a directory (the trace could never replace it); every
 * rank opens its part file next to path. */
static int open_local(const char *path)
{
    struct stat st;
    RETURN_IF(dist_world_rank() == 0 && stat(path, &st) == 0 && S_ISDIR(st.st_mode), VD_EINVAL,
              "log.trace = %s is a directory: name the trace file to write", path);
    int const rc = vd_trace_open(path, dist_world_rank());
    RETURN_IF(rc == VD_EIO, VD_EIO, "cannot write log.trace file %s (each rank writes a part "
              "next to it until the end of the run): %s", path, strerror(errno));
    FORWARD_IF(rc);
    return 0;
}

int launch_trace_open(const char *path)
{
    if (!path[0]) return 0;
    int const rc = dist_agree(dist_world(), open_local(path));
    if (rc < 0) {
        vd_trace_discard(path, dist_world_rank());
        return rc;
    }
    /* every rank leaves the agreement together: its time zero */
    vd_trace_start();
    return 0;
}

int launch_trace_close(const char *path, int rc)
{
    if (!vd_trace_on()) return rc;
    int const rank = dist_world_rank();
    int trc = 0;
    if (rc == 0) {
        trc = dist_agree(dist_world(), vd_trace_close());
        if (trc == 0 && rank == 0) trc = vd_trace_merge(path, dist_world_size());
        /* rank 0 has read every part before any rank removes its own */
        trc = dist_agree(dist_world(), trc);
    }
    vd_trace_discard(path, rank);
    if (rc == 0 && trc == 0 && rank == 0)
        printf("trace %s written: open it in https://ui.perfetto.dev or chrome://tracing\n",
               path);
    return rc < 0 ? rc : trc;
}
