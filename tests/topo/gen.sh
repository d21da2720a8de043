#!/bin/sh
# Regenerates the hwloc XML topologies of tests/test_place.c from hwloc synthetic
# descriptions (run from the repository root: sh tests/topo/gen.sh). The XML files are
# committed; this script only documents where they came from. Needs libhwloc-dev.
#
#   interleaved-2x2x8.xml  2 packages x 2 NUMA domains x 8 cores, 1 PU per core, OS indexes
#                          dealt across packages (even PUs on package 0, odd on package 1),
#                          as many dual-socket BIOSes number them.
#   smt-2x4x2.xml          2 packages (1 NUMA domain, 1 L3 each) x 4 cores x 2 PUs, Linux's
#                          numbering: cores alternate packages, each core's second PU is its
#                          first + 8.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/export.c" <<'PROG'
#include <hwloc.h>
#include <stdio.h>
int main(int argc, char **argv)
{
    hwloc_topology_t t;
    if (argc != 3 || hwloc_topology_init(&t) != 0) return 2;
    if (hwloc_topology_set_synthetic(t, argv[1]) != 0 || hwloc_topology_load(t) != 0) {
        fprintf(stderr, "hwloc refuses \"%s\"\n", argv[1]);
        return 1;
    }
    int const rc = hwloc_topology_export_xml(t, argv[2], 0);
    hwloc_topology_destroy(t);
    return rc != 0;
}
PROG
cc -o "$tmp/export" "$tmp/export.c" $(pkg-config --cflags --libs hwloc)

evens=$(seq -s, 0 2 30)
odds=$(seq -s, 1 2 31)
"$tmp/export" "pack:2 numa:2 core:8 pu:1(indexes=$evens,$odds)" "$dir/interleaved-2x2x8.xml"
"$tmp/export" "pack:2 [numa] l3:1 core:4 pu:2(indexes=0,8,2,10,4,12,6,14,1,9,3,11,5,13,7,15)" \
    "$dir/smt-2x4x2.xml"
