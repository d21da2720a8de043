/* dist/: communication only. The world, the rank grids and their groups, checked
 * collectives, timed communication, direct writes between the ranks of a node. No model
 * code.
 *
 * Error rule: MPI runs with MPI_ERRORS_RETURN; a failed MPI call inside a collective
 * helper is a fatal error (DIST_CHECK_MPI aborts the job with the rank and the call). A
 * failure that one rank meets on input is agreed on by all ranks with dist_agree. */
#ifndef VDIST_DIST_H
#define VDIST_DIST_H

#include <mpi.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "base/base.h"

struct dist_group {
    MPI_Comm comm;
    int rank, size;
};

/* MPI_Init, MPI_ERRORS_RETURN on the world, the fatal hook of base.h set to print the
 * rank and host and MPI_Abort. */
void dist_init(int *argc, char ***argv);
void dist_finalize(void);
int dist_world_rank(void);
int dist_world_size(void);
/* Declares nodes of ranks_per_node consecutive world ranks (launch.ranks_per_node, a
 * cluster emulated on one machine), or 0 for the real nodes (ranks sharing memory): every
 * decision of dist/ that depends on nodes follows it. */
void dist_declare_nodes(int ranks_per_node);
/* Splits g into the ranks of this rank's node (as declared, and never wider than the
 * ranks that share memory with it); MPI_Comm_free the result. */
void dist_node_split(const struct dist_group *g, MPI_Comm *node);
/* The world as a group (never freed). */
const struct dist_group *dist_world(void);

#define DIST_CHECK_MPI(call)                                                         \
    do {                                                                             \
        int const mpi_rc_ = (call);                                                  \
        if (mpi_rc_ != MPI_SUCCESS) dist_mpi_fatal(mpi_rc_, #call, __FILE__, __LINE__); \
    } while (0)
_Noreturn void dist_mpi_fatal(int rc, const char *call, const char *file, int line);

/* Every rank passes its local result (0 or a negative error code); all get the first
 * rank's error (lowest rank that failed) and, on rank 0's behalf, its message. Returns 0
 * when every rank succeeded. Call it before any collective that follows fallible work. */
int dist_agree(const struct dist_group *g, int local_rc);

/* A group of size one over MPI_COMM_SELF, for the serial parts of the grid. */
void dist_group_self(struct dist_group *g);
/* Splits `parent` by color, ordering by key. */
void dist_group_split(struct dist_group *out, const struct dist_group *parent, int color,
                      int key);
void dist_group_free(struct dist_group *g);

/* Checked collectives, timed per group kind (dist_comm_stats) on the trace clock and, while
 * tracing (base/trace.h), recorded as spans "op kind" (category "collective", or "p2p" for
 * dist_wait_all, dist_send and dist_recv) with their bytes. In place when in == out. */
enum dist_kind { DIST_TP, DIST_CP, DIST_DP, DIST_DPCP, DIST_TPCP, DIST_PP,
                 DIST_EP, DIST_ETP, DIST_EDP, DIST_ETPEP, DIST_WORLD, DIST_NKIND };
void dist_allreduce_sum(const struct dist_group *g, enum dist_kind kind, float *buf,
                        size_t count);
void dist_allreduce_sum_f64(const struct dist_group *g, enum dist_kind kind, double *buf,
                            size_t count);
void dist_allreduce_max(const struct dist_group *g, enum dist_kind kind, float *buf,
                        size_t count);
/* Gathers count floats per rank into out (size * count), rank order. */
void dist_allgather(const struct dist_group *g, enum dist_kind kind, float *out,
                    const float *in, size_t count);
/* The same for nbytes of any data per rank. */
void dist_allgather_bytes(const struct dist_group *g, enum dist_kind kind, void *out,
                          const void *in, size_t nbytes);
/* Sums in (size * count) over the group, rank r keeps block r in out (count), which must
 * not overlap in; the sum runs in rank order, the same on every run. */
void dist_reduce_scatter(const struct dist_group *g, enum dist_kind kind, float *out,
                         const float *in, size_t count);
/* Starts an in-place sum over the group; complete it with dist_wait_all. */
void dist_iallreduce_sum(const struct dist_group *g, float *buf, size_t count,
                         MPI_Request *req);
/* Whether a request started here is complete (then it is released); never blocks. */
bool dist_test(MPI_Request *req);
/* Waits for n requests started above; their time is charged to kind. */
void dist_wait_all(MPI_Request *reqs, int n, enum dist_kind kind, size_t nbytes);
/* Point-to-point pieces of an exchange inside group g, completed with dist_wait_all:
 * count floats to or from group rank `peer`, `tag` (0 to DIST_TAG_MAX; dist's own messages
 * use the tag above) telling apart the pieces one pair of ranks exchanges. Nothing is
 * posted for count 0 (*req = MPI_REQUEST_NULL). */
enum { DIST_TAG_MAX = 32766 }; /* MPI guarantees tags up to 32767 */
void dist_irecv(const struct dist_group *g, float *buf, size_t count, int peer, int tag,
                MPI_Request *req);
void dist_isend(const struct dist_group *g, const float *buf, size_t count, int peer, int tag,
                MPI_Request *req);
/* An empty message from this rank to peer (a notice: "done"), and its receipt. */
void dist_notify(const struct dist_group *g, int peer, int tag, MPI_Request *req);
void dist_expect_notice(const struct dist_group *g, int peer, int tag, MPI_Request *req);
/* Direct writes (dist/direct.c): between two ranks of one node, Linux cross-memory attach
 * (process_vm_writev) copies scattered pieces of this process's memory into a peer's in
 * one step, without the staging copy an MPI message of scattered data takes. The peer's
 * address comes from the caller, and so do the two synchronisations: the peer must not
 * touch the target until told the write is done, and must be done with it before. */
struct dist_direct {
    int size;   /* the group's size */
    pid_t *pid; /* (size) process of each group rank */
    bool *ok;   /* (size) direct writes work to and from that rank (never this rank) */
    int peers;  /* how many ok */
};
/* Collective over g: which ranks share this rank's node and accept a probe write both
 * ways (ptrace rules or a container may forbid it; then MPI carries everything). With
 * enable false no pair writes directly. */
void dist_direct_init(struct dist_direct *dd, const struct dist_group *g, bool enable);
void dist_direct_free(struct dist_direct *dd);
/* Writes the n local pieces (n <= DIST_DIRECT_PIECES) back to back at `remote` in group
 * rank peer's memory (dd->ok[peer]); a failure is fatal. */
enum { DIST_DIRECT_PIECES = 1024 };
void dist_direct_write(const struct dist_direct *dd, int peer, const struct iovec *local, int n,
                       void *remote);
void dist_bcast(const struct dist_group *g, enum dist_kind kind, void *buf, size_t nbytes,
                int root);
/* Gathers on root the size each rank passes: counts (root: g->size entries, rank order;
 * may be NULL elsewhere). The first half of a gather of pieces whose sizes differ. */
void dist_gather_nbytes(const struct dist_group *g, enum dist_kind kind, size_t nbytes,
                        size_t *counts, int root);
/* The second half: every rank's nbytes of in, back to back in rank order, into out on root
 * (the sum of counts bytes), counts as dist_gather_nbytes gave them (root only; out and
 * counts may be NULL elsewhere). */
void dist_gatherv_bytes(const struct dist_group *g, enum dist_kind kind, void *out,
                        const size_t *counts, const void *in, size_t nbytes, int root);
/* Blocking point-to-point inside group g, timed per kind: count floats (nbytes of any data)
 * to group rank peer with tag (0 to DIST_TAG_MAX), which tells apart what one pair of ranks
 * sends. A receive takes from peer, or from any rank with DIST_ANY_SOURCE, a message of
 * exactly the size asked for (another size is a programming error), and returns the
 * sender's group rank. */
enum { DIST_ANY_SOURCE = -1 };
void dist_send(const struct dist_group *g, enum dist_kind kind, const float *buf, size_t count,
               int peer, int tag);
void dist_send_bytes(const struct dist_group *g, enum dist_kind kind, const void *buf,
                     size_t nbytes, int peer, int tag);
int dist_recv(const struct dist_group *g, enum dist_kind kind, float *buf, size_t count,
              int peer, int tag);
int dist_recv_bytes(const struct dist_group *g, enum dist_kind kind, void *buf, size_t nbytes,
                    int peer, int tag);
/* Converts an element count to MPI's int, aborting when it does not fit. */
int dist_count(size_t count);

struct dist_comm_stat {
    double seconds;
    double nbytes;
    long calls;
};
/* Cumulative time and bytes of the collectives of one group kind. */
const struct dist_comm_stat *dist_comm_stats(enum dist_kind kind);
void dist_comm_stats_reset(void);
const char *dist_kind_name(enum dist_kind kind);

/* ---------------------------------------------------------------- grid (pure) */
/* GRID-BEGIN: declarations of dist/grid.c live between these markers. */
/* The two rank grids of MoE parallel folding (shared/docs/parallelism.md), as pure
 * arithmetic on world ranks: no MPI, so layouts are testable without launching any.
 * Attention grid tp x cp x dp x pp, MoE grid etp x ep x edp x pp, both numbered
 * mixed-radix from one order string (default "tp-cp-ep-dp-pp", first name fastest): the
 * attention grid uses the order without ep, the MoE grid the order without cp with tp read
 * as etp and dp as edp. The pipeline groups of both grids must be the same ranks (the
 * folding happens inside each stage), so pp keeps one coordinate shared by both grids.
 *
 * Error rule: dist_grid_init refuses a layout with VD_EINVAL and a sentence naming the
 * sizes (vd_err_msg); the other functions take a valid grid, a rank in [0, world) and a
 * group kind of the grid, and abort (VD_CHECK) otherwise. */

#define DIST_GRID_ORDER_DEFAULT "tp-cp-ep-dp-pp"

/* The sizes of both grids; dp and edp are derived from the world size. */
struct dist_grid_dims {
    int tp, cp, dp, pp;
    int etp, ep, edp;
};

/* A rank's place in both grids: (tp, cp, dp, pp) in the attention grid, (etp, ep, edp, pp)
 * in the MoE grid; pp (the pipeline stage) is the same in both. */
struct dist_grid_coords {
    int tp, cp, dp, pp;
    int etp, ep, edp;
};

enum dist_grid_which { DIST_GRID_ATTN = 0, DIST_GRID_MOE = 1 };

/* Filled by dist_grid_init; read dims, world and order, leave the rest to grid.c. */
struct dist_grid {
    int world;
    struct dist_grid_dims dims;
    char order[16];     /* normalised order, e.g. "tp-cp-ep-dp-pp" */
    /* Per grid (enum dist_grid_which) and axis, in the grid's own axis order (tp, cp, dp,
     * pp) or (etp, ep, edp, pp): the axis size and its rank stride. */
    int size[2][4], stride[2][4];
};

/* Builds both grids over `world` ranks; order NULL means DIST_GRID_ORDER_DEFAULT. dp =
 * world / (tp*cp*pp), edp = world / (etp*ep*pp). Returns 0, or VD_EINVAL with a sentence
 * naming the sizes when a size is below 1, world is not divisible by tp*cp*pp or by
 * etp*ep*pp, the order is not a permutation of tp, cp, ep, dp, pp, or the order makes the
 * two grids' pipeline groups differ. *g is written only on success. */
int dist_grid_init(struct dist_grid *g, int world, int tp, int cp, int ep, int etp, int pp,
                   const char *order);

/* Coordinates of `rank` in both grids. */
void dist_grid_coords(const struct dist_grid *g, int rank, struct dist_grid_coords *c);
/* The inverse of dist_grid_coords for one grid: the rank at the attention fields (tp, cp,
 * dp, pp) of *c, or at its MoE fields (etp, ep, edp, pp); the other fields are ignored. */
int dist_grid_rank_of(const struct dist_grid *g, enum dist_grid_which which,
                      const struct dist_grid_coords *c);

/* Groups by enum dist_kind: DIST_TP, DIST_CP, DIST_DP, DIST_DPCP, DIST_TPCP and DIST_PP
 * from the attention grid (DIST_PP is also the MoE grid's), DIST_EP, DIST_ETP, DIST_EDP and
 * DIST_ETPEP from the MoE grid, DIST_WORLD all ranks. Members are in ascending rank order,
 * which is the grid's mixed radix over the group's axes (the faster axis first, e.g. a
 * DIST_DPCP index is cp + cp_size * dp under the default order). */
int dist_grid_group_size(const struct dist_grid *g, enum dist_kind kind);
/* The group of `rank` for `kind`: its members (an array of at least
 * dist_grid_group_size entries; may be NULL), their count and rank's index among them
 * (count and index may be NULL). */
void dist_grid_group(const struct dist_grid *g, enum dist_kind kind, int rank, int *members,
                     int *count, int *index);
/* Arguments for MPI_Comm_split of the world into `kind` groups: color (>= 0, equal for
 * the ranks of one group and different between groups: the group's lowest rank) and key
 * (rank's index in its group). */
void dist_grid_split_args(const struct dist_grid *g, enum dist_kind kind, int rank,
                          int *color, int *key);
/* GRID-END */

/* The communicator of this rank's `kind` group of grid g (collective over the world). */
void dist_group_create(struct dist_group *out, const struct dist_grid *g, enum dist_kind kind);

#endif
