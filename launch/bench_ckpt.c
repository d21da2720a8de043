/* `vdist bench ckpt`: checkpoint save and load speed and compression at a configuration,
 * against the disk's sequential write speed measured the same way (same bytes, same
 * directory, written and fsynced), and the blocking time of an asynchronous save. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launch/launch_internal.h"
#include "parallel/parallel.h"

/* Realistic moments: one optimizer step on small pseudo-random gradients. */
static void fake_step(struct par_model *pm)
{
    uint64_t x = 88172645463325252ULL + (uint64_t)dist_world_rank();
    for (size_t i = 0; i < pm->tab.numel; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pm->grads[i] = ((float)(x >> 40) / 16777216.0f - 0.5f) * 1e-3f;
    }
    struct par_hparams const hp = {.lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
                                   .weight_decay = 0.1f, .clip = 1.0f};
    par_optimizer_step(pm, &hp);
}

/* Bytes of the regular files in dir (the checkpoint's shards and manifest). */
static double dir_bytes(const char *dir)
{
    char cmd[LAUNCH_PATH_MAX + 64];
    snprintf(cmd, sizeof cmd, "du -sb '%s' 2>/dev/null", dir);
    FILE *p = popen(cmd, "r");
    double b = 0.0;
    if (p) {
        if (fscanf(p, "%lf", &b) != 1) b = 0.0;
        pclose(p);
    }
    return b;
}

/* Writes nbytes in 4 MiB chunks and fsyncs: the disk's sequential write speed. */
static double disk_write_gbs(const char *dir, double nbytes)
{
    char path[LAUNCH_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/disk_speed.%d.tmp", dir, dist_world_rank());
    int const fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return 0.0;
    size_t const chunk = 4u << 20;
    char *buf = vd_alloc(chunk);
    for (size_t i = 0; i < chunk; i++) buf[i] = (char)(i * 131);
    double const t0 = MPI_Wtime();
    for (double done = 0; done < nbytes; done += (double)chunk)
        if (write(fd, buf, chunk) != (ssize_t)chunk) break;
    fsync(fd);
    double const dt = MPI_Wtime() - t0;
    close(fd);
    unlink(path);
    free(buf);
    return nbytes / dt / 1e9;
}

int launch_bench_ckpt(const struct launch_config *c)
{
    struct dist_grid grid;
    FORWARD_IF(launch_layout_make(c, dist_world_size(), &grid));
    struct par_groups groups;
    par_groups_create(&groups, &grid);
    struct model_layout lay;
    int rc = launch_layout_rank(c, &grid, &lay);
    if (rc < 0) {
        par_groups_free(&groups);
        return rc;
    }
    struct par_options const opt = {.distributed_optimizer = c->parallel.distributed_optimizer,
                                     .dispatch_direct = c->parallel.dispatch_direct};
    struct par_model pm;
    rc = dist_agree(dist_world(), par_model_init(&pm, &c->model, &lay, &groups, &opt,
                                                     c->train.micro_batch, c->train.seq_len));
    if (rc < 0) {
        par_groups_free(&groups);
        return rc;
    }
    model_init_params(&pm.tab, pm.params, c->train.seed, c->model.num_hidden_layers);
    fake_step(&pm);
    char root[LAUNCH_PATH_MAX];
    snprintf(root, sizeof root, "%s", c->ckpt.dir[0] ? c->ckpt.dir : "runs/bench_ckpt");
    if (dist_world_rank() == 0 && mkdir(root, 0755) != 0 && errno != EEXIST)
        rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot create %s: %s", root, strerror(errno));
    rc = dist_agree(dist_world(), rc);
    struct ckpt_meta const meta = {.step = 1, .adam_step = pm.adam_step, .seed = c->train.seed,
                                   .config = "{}", .layout = "{}"};
    /* raw bytes: every element of the model's parameters and both moments, once */
    size_t total = 0, active = 0;
    model_param_counts(&c->model, &total, &active);
    double const raw = 3.0 * (double)total * sizeof(float);
    double t_save = 0, t_load = 0, t_start = 0, t_finish = 0, disk = 0, stored = 0;
    if (rc == 0) {
        double t0 = MPI_Wtime();
        rc = ckpt_save(&pm, root, &meta, c->ckpt.zstd_level);
        t_save = MPI_Wtime() - t0;
    }
    char dir[LAUNCH_PATH_MAX + 32];
    snprintf(dir, sizeof dir, "%s/step_%08d", root, 1);
    if (rc == 0) {
        stored = dir_bytes(dir);
        long step = 0;
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        rc = ckpt_load(&pm, dir, &step, NULL);
        t_load = MPI_Wtime() - t0;
    }
    /* two asynchronous saves: the first snapshot touches fresh memory, the second shows
     * what every later checkpoint of a run blocks */
    double t_start_first = 0;
    for (int round = 0; rc == 0 && round < 2; round++) {
        ckpt_pending *p = NULL;
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        rc = ckpt_save_start(&pm, root, &meta, c->ckpt.zstd_level, &p);
        t_start = MPI_Wtime() - t0;
        if (round == 0) t_start_first = t_start;
        t0 = MPI_Wtime();
        if (rc == 0) rc = ckpt_save_finish(p);
        t_finish = MPI_Wtime() - t0;
    }
    ckpt_save_release();
    if (rc == 0) {
        MPI_Barrier(MPI_COMM_WORLD);
        /* the same bytes this rank wrote, through plain sequential writes */
        disk = disk_write_gbs(root, stored / dist_world_size());
    }
    if (rc == 0 && dist_world_rank() == 0) {
        printf("bench ckpt: %d ranks, %.1f MB raw (parameters + 2 AdamW moments), %.1f MB on "
               "disk, zstd level %d: ratio %.2fx\n",
               dist_world_size(), raw / 1e6, stored / 1e6, c->ckpt.zstd_level, raw / stored);
        printf("bench ckpt: save %.3f s = %.2f GB/s raw (%.2f GB/s to disk); load %.3f s = "
               "%.2f GB/s raw\n",
               t_save, raw / t_save / 1e9, stored / t_save / 1e9, t_load, raw / t_load / 1e9);
        printf("bench ckpt: disk sequential write (same bytes per rank, fsync) %.2f GB/s per "
               "rank\n", disk);
        printf("bench ckpt: asynchronous save blocks the step for %.3f s (snapshot; %.3f s "
               "the first time, on fresh memory); the background write took %.3f s more\n",
               t_start, t_start_first, t_finish);
    }
    par_model_free(&pm);
    par_groups_free(&groups);
    return rc;
}
