/* Shared between the files of launch/ only. */
#ifndef VDIST_LAUNCH_INTERNAL_H
#define VDIST_LAUNCH_INTERNAL_H

#include "dist/dist.h"
#include "launch/launch.h"

/* ---------------------------------------------------------------- placement (pure) */
/* launch/place.c: where ranks sit on cores, L3 caches, NUMA domains, packages and nodes,
 * how well each group kind of both grids is kept together, and the rank order that keeps
 * the most traffic inside nodes. A pure function of (topology, world, layout, order): the
 * host is read only by launch_machine_load(""), so everything here is testable on hwloc
 * synthetic topologies and XML files.
 *
 * Error rule: functions that read user input (a topology, a node size) return 0 or
 * VD_EINVAL with a sentence saying what is wrong and what is allowed; the others take
 * valid arguments and abort (VD_CHECK) otherwise. */

/* Levels of locality, the nearest first: ranks that share a level share every one above. */
enum launch_level { LAUNCH_LEVEL_CORE, LAUNCH_LEVEL_L3, LAUNCH_LEVEL_NUMA, LAUNCH_LEVEL_PACKAGE,
                    LAUNCH_LEVEL_NODE, LAUNCH_LEVEL_NETWORK, LAUNCH_LEVEL_COUNT };
/* "core", "l3", "numa", "package", "node", "network". */
const char *launch_level_name(enum launch_level level);
/* The levels inside a node that a rank's cores are located by (core, l3, numa, package). */
enum { LAUNCH_NODE_LEVELS = LAUNCH_LEVEL_NODE };

/* One node's cores in hwloc's logical order, and for each the logical index of the object
 * above it at each level inside the node: [LAUNCH_LEVEL_CORE] its own index, then its L3,
 * NUMA domain and package (-1 when the topology has no such object over it; NUMA domains
 * are memory children in hwloc 2, found by cpuset). */
struct launch_machine {
    int ncores;
    int *obj[LAUNCH_NODE_LEVELS];  /* (ncores) each */
    int *os_index;                 /* (ncores) OS index of each core's first PU */
    int count[LAUNCH_NODE_LEVELS]; /* objects of each level, 0 when absent */
};
/* topology: "" for this host, an hwloc XML file (a path that exists), or an hwloc synthetic
 * description ("pack:2 [numa] l3:1 core:16 pu:1"). 0, or VD_EINVAL naming the text and why
 * hwloc refused it; launch_machine_free it either way. */
int launch_machine_load(struct launch_machine *m, const char *topology);
void launch_machine_free(struct launch_machine *m);
/* "2 package(s), 4 NUMA domain(s), 4 L3 cache(s), 32 cores" into buf. */
void launch_machine_describe(const struct launch_machine *m, char *buf, size_t nbytes);

/* Where one rank runs: its node and, per level inside the node, the object that holds all
 * of its cores (-1 when its cores span several such objects, or the level is absent, or
 * the rank's cores are not known). */
enum { LAUNCH_HOST_MAX = 64, LAUNCH_CORES_TEXT = 48 };
struct launch_slot {
    int node;
    int ncores;                      /* cores the rank may run on */
    int id[LAUNCH_NODE_LEVELS];
    int id_cores[LAUNCH_NODE_LEVELS]; /* cores of the object id (0 where id is -1) */
    char cores[LAUNCH_CORES_TEXT];   /* logical core indexes, e.g. "0-3" or "0,2" */
    char host[LAUNCH_HOST_MAX];
};
/* Fills s for a rank on `node` whose cores are cores[0..n) (logical indexes of m). */
void launch_slot_make(struct launch_slot *s, const struct launch_machine *m, int node,
                      const int *cores, int n, const char *host);

/* The share of a node's cores that rank `index` of `node_ranks` gets: cores_per_rank
 * cores (ncores / node_ranks when 0) of logical indexes written to cores, a contiguous block
 * inside one NUMA domain while the domains hold enough whole blocks, else contiguous in
 * logical order. Returns the count, or 0 when the node has fewer cores than ranks x cores
 * per rank (the share would oversubscribe). */
int launch_place_share(const struct launch_machine *m, int node_ranks, int index,
                       int cores_per_rank, int *cores);

/* How ranks are dealt to nodes when no real job says it: block fills node 0 with ranks
 * 0..K-1, then node 1; cyclic deals rank r to node r % nodes (Slurm's
 * --distribution=cyclic). */
enum launch_distribution { LAUNCH_DIST_BLOCK, LAUNCH_DIST_CYCLIC };
/* The slots of `world` ranks on nodes of m with ranks_per_node ranks each (0: as many as
 * whole shares of cores_per_rank fit), the last node holding the rest, each rank on its
 * launch_place_share of its node. 0, or VD_EINVAL when the sizes are out of range (world
 * < 1, cores_per_rank < 1, or ranks_per_node x cores_per_rank over the node's cores). */
int launch_place_emulate(struct launch_slot *slots, const struct launch_machine *m, int world,
                         int ranks_per_node, int cores_per_rank,
                         enum launch_distribution dist);

/* The nearest level that the n ranks members[] all share (core for one rank): of the
 * objects inside a node that hold all of them, the one with the fewest cores (the lower
 * level on a tie), so machines whose L3 caches and NUMA domains do not nest in that order
 * (one NUMA domain over several packages, an L3 over several NUMA domains) come out right;
 * node when they share only the node, network when they span nodes. */
enum launch_level launch_place_group_level(const struct launch_slot *slots, const int *members,
                                           int n);
/* Locality of one group kind of grid g over the slots (one per world rank). */
struct launch_locality {
    int size, groups;
    enum launch_level level;  /* the nearest level all ranks of every group share */
    int cross_node;           /* groups spanning more than one node */
    int cross_package;        /* groups spanning more than one package (or node) */
};
void launch_place_locality(struct launch_locality *out, const struct dist_grid *g,
                           const struct launch_slot *slots, enum dist_kind kind);

/* Estimated bytes each rank sends per optimizer step over its group of each kind, from the
 * model and layout of c on grid g (launch/traffic.c; formulas in the README, section
 * "Traffic estimates", shared with the planner). Kinds without traffic get 0. */
void launch_traffic_estimate(double nbytes[DIST_NKIND], const struct launch_config *c,
                             const struct dist_grid *g);
/* How a kind's traffic spreads over its group (members in group order): evenly over the
 * other members (collectives, all-to-all), all to the next member of a ring (cp p2p), or
 * half to each neighbour of a chain (pp), or of a chain closed into a cycle (interleaved pp,
 * whose last stage feeds the first). */
enum launch_pattern { LAUNCH_PATTERN_SPREAD, LAUNCH_PATTERN_RING, LAUNCH_PATTERN_CHAIN,
                      LAUNCH_PATTERN_CYCLE };
enum launch_pattern launch_traffic_pattern(const struct launch_config *c, enum dist_kind kind);

/* The traffic of every rank (launch_traffic_estimate) that crosses node boundaries and
 * package boundaries (nodes included), summed over all ranks, per kind (may be NULL) and
 * in total: bytes per step. */
struct launch_crossing {
    double node_nbytes, package_nbytes;
    double kind_node_nbytes[DIST_NKIND];
};
void launch_place_crossing(struct launch_crossing *out, const struct launch_config *c,
                           const struct dist_grid *g, const struct launch_slot *slots);

/* Every rank order that gives a distinct valid pair of grids for c's layout on `world`
 * ranks, with its crossing traffic, best first (fewest bytes across nodes, then across
 * packages, then the default order, then the order's text): out[0] is what
 * parallel.order = auto picks. Returns the count (at most 120), or VD_EINVAL when no order
 * gives a valid grid (the message of the default order's refusal). */
struct launch_order_estimate {
    char order[16];
    struct launch_crossing crossing;
};
enum { LAUNCH_ORDERS_MAX = 120 };
int launch_place_orders(struct launch_order_estimate *out, const struct launch_config *c,
                        int world, const struct launch_slot *slots);

/* parallel.order = auto: sets c's order to out[0] of launch_place_orders on the slots and,
 * when out is not NULL, prints every order's estimate there. The estimates are also left
 * in est (LAUNCH_ORDERS_MAX entries) and their count in *norders (0 when c names its
 * order), each when not NULL. 0, or VD_EINVAL as launch_place_orders. */
int launch_place_resolve_order(struct launch_config *c, int world,
                               const struct launch_slot *slots, FILE *out,
                               struct launch_order_estimate *est, int *norders);
/* Rank 0's report before training: the locality table of every group kind (size, groups,
 * level shared, groups crossing nodes and packages) and a warning naming the kinds that
 * cross nodes while another order keeps them inside (most frequent communicators first).
 * Writes to out. */
void launch_place_print(FILE *out, const struct launch_config *c, const struct dist_grid *g,
                        const struct launch_slot *slots);

/* ---------------------------------------------------------------- topology (hwloc, MPI) */
/* launch/topo.c: the running job's placement. */
struct launch_topo {
    int world;
    struct launch_slot *slots; /* (world) the same on every rank */
    int threads;               /* OpenMP/BLAS threads of this rank: OMP_NUM_THREADS when set,
                                  else its binding's cores, or its share of its node's
                                  cores when it is not bound */
    char bind_note[256];       /* what launch.bind did, as rank 0 saw it */
};
/* Collective over the world, first thing of a run, before any large allocation (memory
 * is then first touched on the bound cores): binds this rank as launch.bind says, sets the
 * thread count, and gathers every rank's slot (nodes as launch.ranks_per_node declares
 * them, else the hosts that share memory). 0 or an agreed error. */
int launch_topo_setup(struct launch_topo *t, const struct launch_config *c);
void launch_topo_free(struct launch_topo *t);
/* Writes, on rank 0, next to log.metrics: topology-HOST.xml (hwloc XML of each distinct
 * host, by the lowest rank on it) and mapping.tsv (rank, host, node, cores, both grids'
 * coordinates). Collective; nothing when log.metrics is empty. 0 or an agreed VD_EIO. */
int launch_topo_record(const struct launch_config *c, const struct launch_topo *t,
                       const struct dist_grid *g);

/* `vdist layout`: argv[0] is "layout". Returns the process exit code. Without --world it
 * initialises MPI and describes the running job. */
int launch_layout_main(int argc, char **argv);

/* The grid of c's parallel sizes over `world` ranks, checked against what this version runs
 * and against the batch and sequence sizes; 0 or VD_EINVAL naming the sizes. */
int launch_layout_make(const struct launch_config *c, int world, struct dist_grid *grid);
/* This rank's share of the model under the grid and the pipeline split of c. */
int launch_layout_rank(const struct launch_config *c, const struct dist_grid *grid,
                       struct model_layout *lay);
/* `vdist bench dispatch`: the MoE dispatcher's exchange against MPI_Alltoall. */
int launch_bench_dispatch(const struct launch_config *c);
/* `vdist bench ckpt`: checkpoint save/load speed, compression, disk speed, async blocking. */
int launch_bench_ckpt(const struct launch_config *c);
/* `vdist bench attention`: the attention kernels (stored probabilities vs flash) on one
 * rank at several sequence lengths; argv[0..argc) are its options (launch/bench_attn.c). */
int launch_bench_attention(const struct launch_config *c, int argc, char **argv);
void launch_bench_attention_help(FILE *out);

/* log.trace (launch/tracing.c). Open: nothing for an empty path; else, collectively, every
 * rank opens its part of the trace and starts recording at one moment; 0, or VD_EINVAL /
 * VD_EIO naming log.trace, agreed by all ranks, with no part file left. Close: collective
 * when a trace is open, a no-op otherwise. With rc (the run's agreed result) 0, stops
 * recording and rank 0 writes the trace from every rank's part (0 or the trace's agreed
 * error); with rc < 0, drops the parts quietly and returns rc. No part file is left either
 * way. */
int launch_trace_open(const char *path);
int launch_trace_close(const char *path, int rc);

/* `vdist ckpt ...`: argv[0] is "ckpt". Returns the process exit code. */
int launch_ckpt_main(int argc, char **argv);

/* ---------------------------------------------------------------- config*.c */

/* A message for the user, written where a problem is found; the public entry points record
 * it (vd_err_set), prefixed with where the text came from. */
struct launch_cfg_err {
    char msg[2048];
};
/* Writes the printf-style message into e and returns code. */
__attribute__((format(printf, 3, 4))) int launch_cfg_fail(struct launch_cfg_err *e, int code,
                                                          const char *fmt, ...);
/* launch_config_read_hf that leaves its message in e instead of recording it, and gives the
 * file's sliding window (-1 when absent or null) for the loader, which knows seq_len. */
int launch_config_read_hf_ex(struct model_config *m, const char *path,
                             long long *sliding_window, struct launch_cfg_err *e);

/* ---------------------------------------------------------------- data*.c */

/* The llm.c header holds the token count as an int32. */
#define LAUNCH_DATA_MAX_TOKENS ((size_t)INT32_MAX)
#define LAUNCH_SYNTH_MAX_STATES (1 << 20)

struct launch_tokens {
    char path[LAUNCH_PATH_MAX];
    void *map;          /* NULL for an empty file */
    size_t map_nbytes;
    const unsigned char *tok; /* first token */
    size_t count;
    size_t elem_nbytes; /* 2 or 4 */
    int version;        /* llm.c version, 0 for a raw file */
    size_t nseq;
    int seq_len;
};
/* Maps the file and reads its header (launch_tokens_close it); checks only the format, not
 * the ids, and sets neither seq_len nor nseq. */
int launch_tokens_map(launch_tokens **out, const char *path, enum launch_dtype raw_dtype);
/* Largest id, and the first position whose id >= limit (count when none). */
uint32_t launch_tokens_scan(const launch_tokens *t, uint64_t limit, size_t *first_bad);
/* "uint16" or "uint32" for 2 or 4 bytes a token. */
const char *launch_tokens_dtype_name(size_t elem_nbytes);

/* Writes an llm.c uint16 token file to "<path>.tmp.<pid>" and renames it over path only
 * when everything was written and synced, so path never holds a half-written file. Open
 * (which refuses a path too long or a temporary it cannot create), put every token, then
 * finish, which reports any write that failed on the way. */
struct launch_tok_writer {
    FILE *f;
    const char *path;
    char tmp[LAUNCH_PATH_MAX + 32];
    unsigned char *buf;
    size_t fill;  /* tokens in buf */
    size_t count; /* tokens so far */
    int err;      /* first errno of a failed write, 0 while all is well */
};
int launch_tok_writer_open(struct launch_tok_writer *w, const char *path);
void launch_tok_writer_put(struct launch_tok_writer *w, uint16_t id);
int launch_tok_writer_finish(struct launch_tok_writer *w);

/* 0, or VD_EINVAL with a sentence naming the parameter of s that is out of range. */
int launch_synth_validate(const struct launch_synth *s);

#endif
