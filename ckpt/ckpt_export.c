/* Hugging Face export of a sharded checkpoint: its parameters as F32 safetensors shards
 * with an index, the layout transformers' from_pretrained reads.
 *
 * Each shard file is written as a stream: the header first (offsets follow from the
 * shapes alone), then each tensor, assembled whole from its pieces by ckpt_reader, written
 * and dropped before the next; so memory is one tensor, not one shard (ckpt_st_write would
 * need a whole shard in memory). The header is the one ckpt_st_write makes: __metadata__
 * {"format": "pt"} first, then the tensors in file order, compact, padded with spaces to a
 * multiple of 8 bytes. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/ckpt.h"

#define EXPORT_SHARD_NBYTES_DEFAULT ((size_t)2000000000)
#define EXPORT_INDEX "model.safetensors.index.json"

/* One tensor of the export: its index in the reader, bytes, and shard. */
struct export_tensor {
    int index;
    size_t nbytes;
    int shard;
};

/* The safetensors header of tensors t[0..n) (malloc'd in *text, padded to 8 bytes). */
static int shard_header(const ckpt_reader *r, const struct export_tensor *t, int n,
                        const char *path, char **text, size_t *nbytes)
{
    json_t *root = json_object();
    VD_CHECK(root != NULL, "out of memory building a safetensors header");
    json_object_set_new(root, "__metadata__", json_pack("{s:s}", "format", "pt"));
    size_t offset = 0;
    for (int i = 0; i < n; i++) {
        int ndim;
        size_t shape[2];
        const char *name = ckpt_reader_tensor(r, t[i].index, &ndim, shape);
        json_t *dims = ndim == 1 ? json_pack("[I]", (json_int_t)shape[0])
                                 : json_pack("[II]", (json_int_t)shape[0], (json_int_t)shape[1]);
        json_t *entry = json_pack("{s:s, s:o, s:[II]}", "dtype", "F32", "shape", dims,
                                  "data_offsets", (json_int_t)offset,
                                  (json_int_t)(offset + t[i].nbytes));
        VD_CHECK(entry != NULL, "out of memory building a safetensors header");
        if (json_object_set_new(root, name, entry) != 0) {
            json_decref(root);
            RETURN_ERR(VD_EFORMAT, "%s: tensor name '%s' is not valid UTF-8", path, name);
        }
        offset += t[i].nbytes;
    }
    char *dumped = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    VD_CHECK(dumped != NULL, "out of memory writing a safetensors header");
    size_t const len = strlen(dumped), padded = (len + 7) / 8 * 8;
    *text = vd_alloc(padded);
    memcpy(*text, dumped, len);
    memset(*text + len, ' ', padded - len);
    free(dumped);
    *nbytes = padded;
    return 0;
}

/* fsync and close fd after a write that returned rc; the first error wins. */
static int finish_file(int fd, const char *path, int rc)
{
    if (rc == 0 && fsync(fd) != 0)
        rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "%s: cannot flush to disk: %s", path,
                        strerror(errno));
    if (close(fd) != 0 && rc == 0)
        rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "%s: cannot close: %s", path,
                        strerror(errno));
    return rc;
}

/* Writes tensors t[0..n) to path (new file), fsynced. buf/buf_cap: the tensor buffer, grown
 * as needed and kept for the next shard. */
static int write_shard(ckpt_reader *r, const struct export_tensor *t, int n, const char *path,
                       float **buf, size_t *buf_cap)
{
    char *header = NULL;
    size_t header_nbytes = 0;
    FORWARD_IF(shard_header(r, t, n, path, &header, &header_nbytes));
    int const fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        free(header);
        RETURN_ERR(VD_EIO, "%s: cannot create: %s", path, strerror(errno));
    }
    unsigned char len[8];
    for (int b = 0; b < 8; b++) len[b] = (unsigned char)((uint64_t)header_nbytes >> (8 * b));
    int rc = vd_write_all(fd, path, len, sizeof len);
    if (rc == 0) rc = vd_write_all(fd, path, header, header_nbytes);
    free(header);
    for (int i = 0; rc == 0 && i < n; i++) {
        if (t[i].nbytes > *buf_cap) {
            free(*buf);
            *buf_cap = t[i].nbytes;
            *buf = vd_alloc(*buf_cap);
        }
        rc = ckpt_reader_read(r, t[i].index, CKPT_KIND_PARAM, *buf);
        if (rc == 0) rc = vd_write_all(fd, path, *buf, t[i].nbytes);
    }
    FORWARD_IF(finish_file(fd, path, rc));
    return 0;
}

static int write_text(const char *path, const char *text)
{
    int const fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    RETURN_IF(fd < 0, VD_EIO, "%s: cannot create: %s", path, strerror(errno));
    int rc = vd_write_all(fd, path, text, strlen(text));
    FORWARD_IF(finish_file(fd, path, rc));
    return 0;
}

/* Writes the shards and the index into tmp. */
static int export_into(ckpt_reader *r, struct export_tensor *t, int n, int nshards,
                       const char *tmp, char (*names)[64])
{
    json_t *weight_map = json_object();
    VD_CHECK(weight_map != NULL, "out of memory building the index");
    float *buf = NULL;
    size_t buf_cap = 0, total = 0;
    int rc = 0;
    for (int s = 0, first = 0; rc == 0 && s < nshards; s++) {
        int last = first;
        while (last < n && t[last].shard == s) last++;
        snprintf(names[s], sizeof names[s], "model-%05d-of-%05d.safetensors", s + 1, nshards);
        char path[PATH_MAX];
        rc = vd_path_join(path, sizeof path, tmp, names[s]);
        if (rc == 0) rc = write_shard(r, t + first, last - first, path, &buf, &buf_cap);
        for (int i = first; rc == 0 && i < last; i++) {
            json_object_set_new(weight_map, ckpt_reader_tensor(r, t[i].index, NULL, NULL),
                                json_string(names[s]));
            total += t[i].nbytes;
        }
        first = last;
    }
    free(buf);
    if (rc == 0) {
        json_t *index = json_pack("{s:{s:I}, s:o}", "metadata", "total_size", (json_int_t)total,
                                  "weight_map", weight_map);
        weight_map = NULL;
        char *text = index ? json_dumps(index, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
        json_decref(index);
        VD_CHECK(text != NULL, "out of memory writing the index");
        char path[PATH_MAX];
        size_t const len = strlen(text);
        char *line = vd_alloc(len + 2);
        memcpy(line, text, len);
        memcpy(line + len, "\n", 2);
        free(text);
        rc = vd_path_join(path, sizeof path, tmp, EXPORT_INDEX);
        if (rc == 0) rc = write_text(path, line);
        free(line);
    }
    json_decref(weight_map);
    FORWARD_IF(rc);
    return 0;
}

int ckpt_export_hf_sharded(const char *dir, const char *out_dir, size_t max_shard_bytes)
{
    if (max_shard_bytes == 0) max_shard_bytes = EXPORT_SHARD_NBYTES_DEFAULT;
    ckpt_reader *r;
    FORWARD_IF(ckpt_reader_open(&r, dir));
    int const n = ckpt_reader_count(r);
    struct export_tensor *t = vd_calloc((size_t)n + 1, sizeof *t);
    int nshards = 0;
    size_t in_shard = 0;
    for (int i = 0; i < n; i++) {
        size_t shape[2];
        ckpt_reader_tensor(r, i, NULL, shape);
        /* the reader checked the shape: at most 2^40 elements */
        t[i] = (struct export_tensor){.index = i, .nbytes = shape[0] * shape[1] * sizeof(float)};
        if (nshards == 0 || (in_shard > 0 && t[i].nbytes > max_shard_bytes - in_shard)) {
            nshards++;
            in_shard = 0;
        }
        t[i].shard = nshards - 1;
        in_shard += t[i].nbytes < max_shard_bytes ? t[i].nbytes : max_shard_bytes;
    }
    int rc = n == 0 ? vd_err_set(VD_EFORMAT, __FILE__, __LINE__, "%s: no tensors to export", dir)
                    : 0;
    if (rc == 0 && nshards > 99999)
        rc = vd_err_set(VD_EINVAL, __FILE__, __LINE__,
                        "exporting %s would take %d files of at most %zu bytes; at most 99999 "
                        "are allowed: raise the shard size", dir, nshards, max_shard_bytes);
    char tmp[PATH_MAX];
    if (rc == 0) rc = vd_make_dirs(out_dir);
    if (rc == 0 &&
        snprintf(tmp, sizeof tmp, "%s/.vdist-export.%ld", out_dir, (long)getpid()) >=
            (int)sizeof tmp)
        rc = vd_err_set(VD_EINVAL, __FILE__, __LINE__, "path %s is too long", out_dir);
    bool made = false;
    if (rc == 0) {
        vd_remove_tree_quiet(tmp); /* a leftover of this pid */
        if (mkdir(tmp, 0777) != 0)
            rc = vd_err_set(VD_EIO, __FILE__, __LINE__, "cannot create %s: %s", tmp,
                            strerror(errno));
        made = rc == 0;
    }
    char (*names)[64] = vd_calloc((size_t)nshards + 1, sizeof *names);
    if (rc == 0) rc = export_into(r, t, n, nshards, tmp, names);
    /* into place (the files are synced already), the index last: a reader of the index
     * never sees a shard missing */
    for (int s = 0; rc == 0 && s <= nshards; s++) {
        const char *name = s < nshards ? names[s] : EXPORT_INDEX;
        char from[PATH_MAX], to[PATH_MAX];
        enum vd_replace_step failed;
        rc = vd_path_join(from, sizeof from, tmp, name);
        if (rc == 0) rc = vd_path_join(to, sizeof to, out_dir, name);
        if (rc == 0) rc = vd_replace_fd(-1, from, to, &failed);
    }
    if (made) vd_remove_tree_quiet(tmp);
    free(names);
    free(t);
    ckpt_reader_close(r);
    FORWARD_IF(rc);
    return 0;
}
