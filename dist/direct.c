/* Direct writes between ranks of one node (dist.h): Linux cross-memory attach.
 *
 * Not MPI, yet in dist/: it is how data crosses between ranks, next to MPI, and the
 * dispatcher that uses it only needs to know which peers take it. MPI moves a contiguous
 * message between processes of a node with one copy, but scattered rows need a packing
 * copy first; a process_vm_writev call takes the scattered pieces as they are. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dist/dist.h"

/* What a rank publishes for the probe: its pid and where its probe words are. */
struct direct_card {
    int64_t pid;
    uint64_t probe; /* address of this rank's (size) probe words */
};

/* A pair may write directly when both ranks share a node and each one's probe write
 * into the other arrived: the kernel (ptrace access rules, containers) allows it both
 * ways, and the answer is the same on both ranks of a pair without another exchange. */
void dist_direct_init(struct dist_direct *dd, const struct dist_group *g, bool enable)
{
    int const q = g->size;
    dd->size = q;
    dd->peers = 0;
    dd->pid = vd_calloc((size_t)q, sizeof *dd->pid);
    dd->ok = vd_calloc((size_t)q, sizeof *dd->ok);
    bool *same_node = vd_calloc((size_t)q, sizeof *same_node);
    uint64_t *probe = vd_calloc((size_t)q, sizeof *probe);
    struct direct_card *cards = vd_calloc((size_t)q, sizeof *cards);
    int *node_members = vd_calloc((size_t)q, sizeof *node_members);

    MPI_Comm node;
    dist_node_split(g, &node);
    int node_size = 0;
    MPI_Comm_size(node, &node_size);
    DIST_CHECK_MPI(MPI_Allgather(&g->rank, 1, MPI_INT, node_members, 1, MPI_INT, node));
    MPI_Comm_free(&node);
    for (int i = 0; i < node_size; i++) same_node[node_members[i]] = enable;

    struct direct_card const mine = {(int64_t)getpid(), (uint64_t)(uintptr_t)probe};
    DIST_CHECK_MPI(MPI_Allgather(&mine, sizeof mine, MPI_BYTE, cards, sizeof mine, MPI_BYTE,
                                 g->comm));
    uint64_t const stamp = 0x7664697374000000ULL + (uint64_t)g->rank + 1;
    bool *wrote = vd_calloc((size_t)q, sizeof *wrote);
    for (int i = 0; i < q; i++) {
        dd->pid[i] = (pid_t)cards[i].pid;
        if (i == g->rank || !same_node[i]) continue;
        struct iovec local = {(void *)&stamp, sizeof stamp};
        uint64_t const slot = cards[i].probe + (uint64_t)g->rank * sizeof stamp;
        struct iovec remote = {(void *)(uintptr_t)slot, sizeof stamp};
        wrote[i] = process_vm_writev(dd->pid[i], &local, 1, &remote, 1, 0) == sizeof stamp;
    }
    /* every probe write is done once all ranks passed the barrier */
    DIST_CHECK_MPI(MPI_Barrier(g->comm));
    for (int i = 0; i < q; i++) {
        dd->ok[i] = wrote[i] && probe[i] == 0x7664697374000000ULL + (uint64_t)i + 1;
        dd->peers += dd->ok[i];
    }
    free(wrote);
    free(node_members);
    free(cards);
    free(probe);
    free(same_node);
}

void dist_direct_free(struct dist_direct *dd)
{
    free(dd->pid);
    free(dd->ok);
    memset(dd, 0, sizeof *dd);
}

void dist_direct_write(const struct dist_direct *dd, int peer, const struct iovec *local, int n,
                       void *remote)
{
    size_t nbytes = 0;
    for (int i = 0; i < n; i++) nbytes += local[i].iov_len;
    struct iovec const to = {remote, nbytes};
    ssize_t const done = process_vm_writev(dd->pid[peer], local, (unsigned long)n, &to, 1, 0);
    if (done != (ssize_t)nbytes)
        vd_fatal(__FILE__, __LINE__, "direct write of %zu bytes to group rank %d (pid %d) "
                 "failed after the probe allowed it: %s", nbytes, peer, (int)dd->pid[peer],
                 done < 0 ? strerror(errno) : "short write");
}
