/* The world, checked and timed collectives, agreement on errors. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dist/dist.h"

static struct dist_group world;
static struct dist_comm_stat stats[DIST_NKIND];
/* dist_reduce_scatter's receive buffer and requests, grown on demand. */
static float *rs_scratch;
static size_t rs_floats;
static MPI_Request *rs_reqs;

static void abort_job(void) { MPI_Abort(MPI_COMM_WORLD, 1); }

void dist_init(int *argc, char ***argv)
{
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) MPI_Init(argc, argv);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    world.comm = MPI_COMM_WORLD;
    MPI_Comm_rank(MPI_COMM_WORLD, &world.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world.size);
    char host[128] = "?", prefix[200];
    gethostname(host, sizeof host - 1);
    snprintf(prefix, sizeof prefix, "rank %d/%d %s", world.rank, world.size, host);
    vd_set_fatal_hook(prefix, abort_job);
}

void dist_finalize(void)
{
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Finalize();
    free(rs_scratch);
    free(rs_reqs);
    rs_scratch = NULL;
    rs_reqs = NULL;
    rs_floats = 0;
}

int dist_world_rank(void) { return world.rank; }
int dist_world_size(void) { return world.size; }
const struct dist_group *dist_world(void) { return &world; }

/* launch.ranks_per_node: nodes of this many consecutive world ranks; 0: the real ones. */
static int declared_node_size;

void dist_declare_nodes(int ranks_per_node) { declared_node_size = ranks_per_node; }

void dist_node_split(const struct dist_group *g, MPI_Comm *node)
{
    /* A declared node never spans real ones: the ranks of a node share memory as well. */
    MPI_Comm shared;
    DIST_CHECK_MPI(MPI_Comm_split_type(g->comm, MPI_COMM_TYPE_SHARED, g->rank, MPI_INFO_NULL,
                                       &shared));
    if (declared_node_size == 0) {
        *node = shared;
        return;
    }
    DIST_CHECK_MPI(MPI_Comm_split(shared, world.rank / declared_node_size, g->rank, node));
    MPI_Comm_free(&shared);
}

_Noreturn void dist_mpi_fatal(int rc, const char *call, const char *file, int line)
{
    char msg[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    vd_fatal(file, line, "%s failed: %s", call, msg);
}

int dist_agree(const struct dist_group *g, int local_rc)
{
    /* The lowest failing rank's code and message win, so every rank reports one cause. */
    int const mine = local_rc < 0 ? g->rank : g->size;
    int first = g->size;
    DIST_CHECK_MPI(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, g->comm));
    if (first == g->size) return 0;
    int code = local_rc;
    char msg[4096];
    snprintf(msg, sizeof msg, "%s", local_rc < 0 ? vd_err_msg() : "");
    DIST_CHECK_MPI(MPI_Bcast(&code, 1, MPI_INT, first, g->comm));
    DIST_CHECK_MPI(MPI_Bcast(msg, sizeof msg, MPI_CHAR, first, g->comm));
    if (g->rank != first) vd_err_set(code, __FILE__, __LINE__, "rank %d: %s", first, msg);
    return code;
}

void dist_group_self(struct dist_group *g)
{
    g->comm = MPI_COMM_SELF;
    g->rank = 0;
    g->size = 1;
}

void dist_group_split(struct dist_group *out, const struct dist_group *parent, int color,
                      int key)
{
    DIST_CHECK_MPI(MPI_Comm_split(parent->comm, color, key, &out->comm));
    DIST_CHECK_MPI(MPI_Comm_set_errhandler(out->comm, MPI_ERRORS_RETURN));
    MPI_Comm_rank(out->comm, &out->rank);
    MPI_Comm_size(out->comm, &out->size);
}

void dist_group_create(struct dist_group *out, const struct dist_grid *g, enum dist_kind kind)
{
    int color = 0, key = 0;
    dist_grid_split_args(g, kind, world.rank, &color, &key);
    dist_group_split(out, &world, color, key);
}

void dist_group_free(struct dist_group *g)
{
    if (g->comm != MPI_COMM_SELF && g->comm != MPI_COMM_WORLD && g->comm != MPI_COMM_NULL)
        MPI_Comm_free(&g->comm);
    g->comm = MPI_COMM_NULL;
}

int dist_count(size_t count)
{
    VD_CHECK(count <= 0x7fffffff, "element count %zu does not fit MPI's int", count);
    return (int)count;
}

/* Charges a communication that began at t0 (vd_trace_now) to its group kind, and records
 * it as a span "op kind" of category cat when tracing. */
static void account(enum dist_kind kind, const char *cat, const char *op, double t0,
                    size_t nbytes)
{
    double const t1 = vd_trace_now();
    stats[kind].seconds += t1 - t0;
    stats[kind].nbytes += (double)nbytes;
    stats[kind].calls++;
    vd_trace_span_nbytes(cat, t0, t1, nbytes, "%s %s", op, dist_kind_name(kind));
}

static const char COLL[] = "collective", P2P[] = "p2p";

void dist_allreduce_sum(const struct dist_group *g, enum dist_kind kind, float *buf,
                        size_t count)
{
    if (g->size == 1) return;
    double const t0 = vd_trace_now();
    DIST_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, buf, dist_count(count), MPI_FLOAT, MPI_SUM, g->comm));
    account(kind, COLL, "allreduce", t0, count * sizeof *buf);
}

void dist_allreduce_sum_f64(const struct dist_group *g, enum dist_kind kind, double *buf,
                            size_t count)
{
    if (g->size == 1) return;
    double const t0 = vd_trace_now();
    DIST_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, buf, dist_count(count), MPI_DOUBLE, MPI_SUM, g->comm));
    account(kind, COLL, "allreduce", t0, count * sizeof *buf);
}

void dist_allreduce_max(const struct dist_group *g, enum dist_kind kind, float *buf,
                        size_t count)
{
    if (g->size == 1) return;
    double const t0 = vd_trace_now();
    DIST_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, buf, dist_count(count), MPI_FLOAT, MPI_MAX, g->comm));
    account(kind, COLL, "allreduce_max", t0, count * sizeof *buf);
}

void dist_allgather(const struct dist_group *g, enum dist_kind kind, float *out,
                    const float *in, size_t count)
{
    if (g->size == 1) {
        if (out != in) memmove(out, in, count * sizeof *out);
        return;
    }
    double const t0 = vd_trace_now();
    bool const in_place = in == out + (size_t)g->rank * count;
    DIST_CHECK_MPI(MPI_Allgather(in_place ? MPI_IN_PLACE : in, dist_count(count), MPI_FLOAT,
                                 out, dist_count(count), MPI_FLOAT, g->comm));
    account(kind, COLL, "allgather", t0, count * (size_t)g->size * sizeof *out);
}

void dist_allgather_bytes(const struct dist_group *g, enum dist_kind kind, void *out,
                          const void *in, size_t nbytes)
{
    if (g->size == 1) {
        if (out != in) memmove(out, in, nbytes);
        return;
    }
    double const t0 = vd_trace_now();
    /* MPI forbids overlapping buffers: a contribution already in its slot goes in place */
    bool const in_place = (const char *)in == (const char *)out + (size_t)g->rank * nbytes;
    DIST_CHECK_MPI(MPI_Allgather(in_place ? MPI_IN_PLACE : in, dist_count(nbytes), MPI_BYTE,
                                 out, dist_count(nbytes), MPI_BYTE, g->comm));
    account(kind, COLL, "allgather", t0, nbytes * (size_t)g->size);
}

/* Reduce-scatter as pairwise messages and a local sum, in rounds of RS_CHUNK floats per
 * peer: each rank sends every other rank its piece of that rank's block and adds the
 * pieces it receives to its own in rank order, while they are still in cache. Each piece
 * moves once (Open MPI's shared-memory transport copies a large contiguous message once),
 * as in a ring, and the sum is the same on every run. */
enum { RS_CHUNK = 1 << 18, RS_TAG = DIST_TAG_MAX + 1 };

/* Rank r's piece of this rank's block in round c0: its own input, or received. */
static const float *rs_piece(const float *in, size_t count, size_t c0, size_t chunk, int me,
                             int q, int r)
{
    if (r == me) return in + (size_t)me * count + c0;
    return rs_scratch + (size_t)((r - me + q) % q - 1) * chunk;
}

void dist_reduce_scatter(const struct dist_group *g, enum dist_kind kind, float *out,
                         const float *in, size_t count)
{
    int const q = g->size, me = g->rank;
    if (q == 1) {
        if (out != in) memmove(out, in, count * sizeof *out);
        return;
    }
    VD_CHECK(out + count <= in || in + (size_t)q * count <= out,
             "dist_reduce_scatter: the output overlaps the input");
    double const t0 = vd_trace_now();
    size_t const chunk = count < RS_CHUNK ? count : RS_CHUNK;
    if (rs_floats < (size_t)(q - 1) * chunk) {
        free(rs_scratch);
        free(rs_reqs);
        rs_floats = (size_t)(q - 1) * chunk;
        rs_scratch = vd_alloc(rs_floats * sizeof *rs_scratch);
        rs_reqs = vd_alloc(2 * (size_t)world.size * sizeof *rs_reqs);
    }
    for (size_t c0 = 0; c0 < count; c0 += chunk) {
        size_t const n = count - c0 < chunk ? count - c0 : chunk;
        int nr = 0;
        /* piece of rank r = me + j is received into slot j - 1 */
        for (int j = 1; j < q; j++)
            DIST_CHECK_MPI(MPI_Irecv(rs_scratch + (size_t)(j - 1) * chunk, (int)n, MPI_FLOAT,
                                     (me + j) % q, RS_TAG, g->comm, &rs_reqs[nr++]));
        for (int j = 1; j < q; j++) {
            int const to = (me + q - j) % q;
            DIST_CHECK_MPI(MPI_Isend(in + (size_t)to * count + c0, (int)n, MPI_FLOAT, to,
                                     RS_TAG, g->comm, &rs_reqs[nr++]));
        }
        DIST_CHECK_MPI(MPI_Waitall(nr, rs_reqs, MPI_STATUSES_IGNORE));
        float *restrict o = out + c0;
        const float *restrict p0 = rs_piece(in, count, c0, chunk, me, q, 0);
        const float *restrict p1 = rs_piece(in, count, c0, chunk, me, q, 1);
#pragma omp simd
        for (size_t i = 0; i < n; i++) o[i] = p0[i] + p1[i];
        for (int r = 2; r < q; r++) {
            const float *restrict p = rs_piece(in, count, c0, chunk, me, q, r);
#pragma omp simd
            for (size_t i = 0; i < n; i++) o[i] += p[i];
        }
    }
    account(kind, COLL, "reduce_scatter", t0, count * (size_t)q * sizeof *out);
}

void dist_iallreduce_sum(const struct dist_group *g, float *buf, size_t count,
                         MPI_Request *req)
{
    *req = MPI_REQUEST_NULL;
    if (g->size == 1 || count == 0) return;
    DIST_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, buf, dist_count(count), MPI_FLOAT, MPI_SUM,
                                  g->comm, req));
}

bool dist_test(MPI_Request *req)
{
    int done = 0;
    DIST_CHECK_MPI(MPI_Test(req, &done, MPI_STATUS_IGNORE));
    return done != 0;
}

void dist_wait_all(MPI_Request *reqs, int n, enum dist_kind kind, size_t nbytes)
{
    if (n == 0) return;
    double const t0 = vd_trace_now();
    DIST_CHECK_MPI(MPI_Waitall(n, reqs, MPI_STATUSES_IGNORE));
    account(kind, P2P, "wait", t0, nbytes);
}

static void check_tag(int tag)
{
    VD_CHECK(tag >= 0 && tag <= DIST_TAG_MAX, "tag %d outside [0, %d]", tag, DIST_TAG_MAX);
}

void dist_irecv(const struct dist_group *g, float *buf, size_t count, int peer, int tag,
                MPI_Request *req)
{
    check_tag(tag);
    *req = MPI_REQUEST_NULL;
    if (count > 0)
        DIST_CHECK_MPI(MPI_Irecv(buf, dist_count(count), MPI_FLOAT, peer, tag, g->comm, req));
}

void dist_isend(const struct dist_group *g, const float *buf, size_t count, int peer, int tag,
                MPI_Request *req)
{
    check_tag(tag);
    *req = MPI_REQUEST_NULL;
    if (count > 0)
        DIST_CHECK_MPI(MPI_Isend(buf, dist_count(count), MPI_FLOAT, peer, tag, g->comm, req));
}

void dist_notify(const struct dist_group *g, int peer, int tag, MPI_Request *req)
{
    check_tag(tag);
    DIST_CHECK_MPI(MPI_Isend(NULL, 0, MPI_BYTE, peer, tag, g->comm, req));
}

void dist_expect_notice(const struct dist_group *g, int peer, int tag, MPI_Request *req)
{
    check_tag(tag);
    DIST_CHECK_MPI(MPI_Irecv(NULL, 0, MPI_BYTE, peer, tag, g->comm, req));
}

void dist_bcast(const struct dist_group *g, enum dist_kind kind, void *buf, size_t nbytes,
                int root)
{
    if (g->size == 1) return;
    double const t0 = vd_trace_now();
    DIST_CHECK_MPI(MPI_Bcast(buf, dist_count(nbytes), MPI_BYTE, root, g->comm));
    account(kind, COLL, "bcast", t0, nbytes);
}

void dist_gather_nbytes(const struct dist_group *g, enum dist_kind kind, size_t nbytes,
                        size_t *counts, int root)
{
    if (g->size == 1) {
        counts[0] = nbytes;
        return;
    }
    double const t0 = vd_trace_now();
    int const mine = dist_count(nbytes);
    int *all = g->rank == root ? vd_calloc((size_t)g->size, sizeof *all) : NULL;
    DIST_CHECK_MPI(MPI_Gather(&mine, 1, MPI_INT, all, 1, MPI_INT, root, g->comm));
    for (int r = 0; all && r < g->size; r++) counts[r] = (size_t)all[r];
    free(all);
    account(kind, COLL, "gather", t0, sizeof mine * (g->rank == root ? (size_t)g->size : 1));
}

void dist_gatherv_bytes(const struct dist_group *g, enum dist_kind kind, void *out,
                        const size_t *counts, const void *in, size_t nbytes, int root)
{
    if (g->size == 1) {
        if (out != in && nbytes > 0) memmove(out, in, nbytes);
        return;
    }
    double const t0 = vd_trace_now();
    bool const is_root = g->rank == root;
    /* MPI's counts and displacements are ints: each must fit, the last displacement too */
    int *icounts = is_root ? vd_calloc((size_t)g->size, sizeof *icounts) : NULL;
    int *displs = is_root ? vd_calloc((size_t)g->size, sizeof *displs) : NULL;
    size_t total = 0;
    for (int r = 0; is_root && r < g->size; r++) {
        icounts[r] = dist_count(counts[r]);
        displs[r] = dist_count(total);
        total += counts[r];
    }
    DIST_CHECK_MPI(MPI_Gatherv(in, dist_count(nbytes), MPI_BYTE, out, icounts, displs,
                               MPI_BYTE, root, g->comm));
    free(icounts);
    free(displs);
    account(kind, COLL, "gatherv", t0, is_root ? total : nbytes);
}

/* dist_send and dist_send_bytes: count elements of type. */
static void send_typed(const struct dist_group *g, enum dist_kind kind, const void *buf,
                       size_t count, MPI_Datatype type, size_t elem_nbytes, int peer, int tag)
{
    check_tag(tag);
    double const t0 = vd_trace_now();
    DIST_CHECK_MPI(MPI_Send(buf, dist_count(count), type, peer, tag, g->comm));
    account(kind, P2P, "send", t0, count * elem_nbytes);
}

/* dist_recv and dist_recv_bytes: count elements of type, exactly. */
static int recv_typed(const struct dist_group *g, enum dist_kind kind, void *buf, size_t count,
                      MPI_Datatype type, size_t elem_nbytes, int peer, int tag)
{
    check_tag(tag);
    double const t0 = vd_trace_now();
    MPI_Status st;
    int got = 0;
    DIST_CHECK_MPI(MPI_Recv(buf, dist_count(count), type,
                            peer == DIST_ANY_SOURCE ? MPI_ANY_SOURCE : peer, tag, g->comm, &st));
    DIST_CHECK_MPI(MPI_Get_count(&st, type, &got));
    VD_CHECK((size_t)got == count, "received %d elements from group rank %d (tag %d), expected "
             "%zu", got, st.MPI_SOURCE, tag, count);
    account(kind, P2P, "recv", t0, count * elem_nbytes);
    return st.MPI_SOURCE;
}

void dist_send(const struct dist_group *g, enum dist_kind kind, const float *buf, size_t count,
               int peer, int tag)
{
    send_typed(g, kind, buf, count, MPI_FLOAT, sizeof *buf, peer, tag);
}

void dist_send_bytes(const struct dist_group *g, enum dist_kind kind, const void *buf,
                     size_t nbytes, int peer, int tag)
{
    send_typed(g, kind, buf, nbytes, MPI_BYTE, 1, peer, tag);
}

int dist_recv(const struct dist_group *g, enum dist_kind kind, float *buf, size_t count,
              int peer, int tag)
{
    return recv_typed(g, kind, buf, count, MPI_FLOAT, sizeof *buf, peer, tag);
}

int dist_recv_bytes(const struct dist_group *g, enum dist_kind kind, void *buf, size_t nbytes,
                    int peer, int tag)
{
    return recv_typed(g, kind, buf, nbytes, MPI_BYTE, 1, peer, tag);
}

const struct dist_comm_stat *dist_comm_stats(enum dist_kind kind) { return &stats[kind]; }

void dist_comm_stats_reset(void) { memset(stats, 0, sizeof stats); }

const char *dist_kind_name(enum dist_kind kind)
{
    static const char *const names[DIST_NKIND] = {"tp", "cp", "dp", "dp x cp", "tp x cp",
                                                  "pp", "ep", "etp", "edp", "etp x ep",
                                                  "world"};
    return kind < DIST_NKIND ? names[kind] : "?";
}
