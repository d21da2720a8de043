/* The `vdist` program: `vdist train`, `vdist bench`, `vdist data`, `vdist --help`. */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/dist.h"
#include "launch/launch_internal.h"

static void usage(FILE *out)
{
    fprintf(out,
            "vdist: distributed training of Mixture-of-Experts language models over MPI\n\n"
            "usage:\n"
            "  [mpirun -np N] vdist train --config FILE [--section.key=value ...]\n"
            "  [mpirun -np N] vdist bench --config FILE [--section.key=value ...]\n"
            "  mpirun -np N vdist bench comm [--config FILE] [--parallel.tp=N ...] [options]\n"
            "  mpirun -np N vdist bench dispatch --config FILE [--parallel.ep=N ...]\n"
            "  [mpirun -np N] vdist bench ckpt --config FILE [--ckpt.dir=DIR ...]\n"
            "  vdist bench attention --config FILE [--seq-lens T1,T2,...] [--mem-cap GIB]\n"
            "  vdist layout --config FILE --world=N [--topology=T] [--launch.ranks_per_node=K]\n"
            "               [--cores_per_rank=C] [--distribution=block|cyclic] [--json]\n"
            "  [mpirun -np N] vdist layout --config FILE [--json]   (the running job)\n"
            "  vdist data text IN OUT | synth OUT [options] | info FILE\n"
            "  vdist ckpt inspect DIR | verify DIR | latest ROOT | export DIR OUT\n"
            "  vdist train --help          every configuration key, its default and meaning\n"
            "  vdist data --help\n\n"
            "bench trains like train and then reports tokens/s, MFU, the time split of a\n"
            "step and the peak RSS against the memory plan. bench comm sweeps message sizes\n"
            "over the collectives of every group kind of the layout (time, algbw, busbw).\n"
            "bench attention times the attention kernels (stored probabilities, flash).\n"
            "layout prints where every rank and group lands (cores, NUMA, packages, nodes)\n"
            "and the estimated traffic per step across nodes, without training.\n");
}

/* A configuration override is --section.key[=value]; anything else belongs to the mode. */
static bool is_config_key(const char *arg)
{
    if (strncmp(arg, "--", 2) != 0) return false;
    const char *dot = strchr(arg, '.'), *eq = strchr(arg, '=');
    return dot && (!eq || dot < eq);
}

/* train, bench and bench comm: every rank parses the same config and agrees on errors. */
static int run_train(int argc, char **argv, bool bench)
{
    bool const comm = bench && argc > 1 && strcmp(argv[1], "comm") == 0;
    bool const dispatch = bench && argc > 1 && strcmp(argv[1], "dispatch") == 0;
    bool const ckpt = bench && argc > 1 && strcmp(argv[1], "ckpt") == 0;
    bool const attn = bench && argc > 1 && strcmp(argv[1], "attention") == 0;
    bool const has_opts = comm || attn; /* options of their own besides config keys */
    const char *config_path = NULL;
    char **keys = vd_calloc((size_t)argc + 1, sizeof *keys);
    char **opts = vd_calloc((size_t)argc + 1, sizeof *opts);
    int nkeys = 0, nopts = 0;
    bool help = false;
    for (int i = comm || dispatch || ckpt || attn ? 2 : 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) help = true;
        else if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) config_path = argv[++i];
        else if (strncmp(argv[i], "--config=", 9) == 0) config_path = argv[i] + 9;
        else if (!has_opts || is_config_key(argv[i])) keys[nkeys++] = argv[i];
        else opts[nopts++] = argv[i];
        /* a key given as "--section.key value" takes the next word along */
        if (has_opts && is_config_key(argv[i]) && !strchr(argv[i], '=') && i + 1 < argc)
            keys[nkeys++] = argv[++i];
    }
    if (help) {
        if (dist_world_rank() == 0 && attn) {
            launch_bench_attention_help(stdout);
        } else if (dist_world_rank() == 0) {
            printf("usage: vdist %s [--config FILE] [--section.key=value ...]%s\n\n",
                   comm ? "bench comm" : bench ? "bench" : "train", comm ? " [options]" : "");
            if (comm) launch_bench_comm_help(stdout);
            else launch_config_help(stdout);
        }
        free(keys);
        free(opts);
        return 0;
    }
    struct launch_config cfg;
    int rc = launch_config_load(&cfg, config_path, nkeys, keys);
    rc = dist_agree(dist_world(), rc);
    struct launch_train_result res;
    /* train and bench place the job themselves (launch_train_run); the other benchmarks
     * are bound and ordered here */
    struct launch_topo topo;
    memset(&topo, 0, sizeof topo);
    if (rc == 0 && (comm || dispatch || ckpt || attn)) {
        rc = launch_topo_setup(&topo, &cfg);
        if (rc == 0)
            rc = launch_place_resolve_order(&cfg, topo.world, topo.slots,
                                            dist_world_rank() == 0 ? stdout : NULL, NULL, NULL);
    }
    if (rc == 0 && comm) rc = launch_bench_comm(&cfg, nopts, opts);
    else if (rc == 0 && dispatch) rc = launch_bench_dispatch(&cfg);
    else if (rc == 0 && ckpt) rc = launch_bench_ckpt(&cfg);
    else if (rc == 0 && attn) rc = launch_bench_attention(&cfg, nopts, opts);
    else if (rc == 0) rc = launch_train_run(&cfg, bench, &res);
    launch_topo_free(&topo);
    free(keys);
    free(opts);
    if (rc < 0) {
        if (dist_world_rank() == 0) fprintf(stderr, "vdist: error: %s\n", vd_err_msg());
        return 2;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "data") == 0) return launch_data_main(argc - 1, argv + 1);
    if (strcmp(argv[1], "ckpt") == 0) return launch_ckpt_main(argc - 1, argv + 1);
    if (strcmp(argv[1], "layout") == 0) return launch_layout_main(argc - 1, argv + 1);
    bool const train = strcmp(argv[1], "train") == 0, bench = strcmp(argv[1], "bench") == 0;
    if (!train && !bench) {
        fprintf(stderr, "vdist: unknown command '%s'; commands are train, bench, layout, data, ckpt\n",
                argv[1]);
        usage(stderr);
        return 2;
    }
    /* Open MPI's collectives allocate and free large temporaries on every call; keeping
     * them on the heap instead of fresh mmaps avoids page faults that halve the measured
     * reduce-scatter and all-reduce bandwidth. */
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    dist_init(&argc, &argv);
    int const code = run_train(argc - 1, argv + 1, bench);
    dist_finalize();
    return code;
}
