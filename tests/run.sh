#!/usr/bin/env bash
# Runs every CUnit suite binary BUILD/tests/test_* (BUILD defaults to build), one after
# the other; run it from the repository root, as `make test` does. Each runs as a plain
# program: a suite that needs several ranks starts mpirun itself (on its own executable
# or on vdist), so the environment set here is what those mpiruns need (Open MPI as root,
# oversubscription, OMP_NUM_THREADS=1 unless set), and VDIST=BUILD/vdist is the program
# the suites run. Shows each suite's output and then "(name: P passed, F failed, Ts)",
# read from CUnit's run summary; a suite that exits non-zero or prints no summary counts
# as failed. Closes with "failed suites: ..." when any failed and "tests: N passed, N
# failed" over all suites, and exits non-zero when any failed.
set -u
build=${1:-build}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VDIST=$PWD/$build/vdist
passed=0; failed=0; bad_suites=""
for bin in "$build"/tests/test_*; do
    [ -x "$bin" ] || continue
    case "$bin" in *.d|*.o) continue;; esac
    name=$(basename "$bin")
    echo "== $name"
    log=$(mktemp)
    start=$(date +%s)
    "$bin" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    # CUnit's run summary: "asserts  N  N  N  F  n/a" and "tests  N  N  P  F  n/a".
    t_line=$(grep -E '^ +tests +[0-9]' "$log" | tail -1)
    if [ -n "$t_line" ]; then
        p=$(echo "$t_line" | awk '{print $4}'); f=$(echo "$t_line" | awk '{print $5}')
    else
        p=0; f=1
    fi
    [ "$rc" = 0 ] || { [ "$f" = 0 ] && f=1; }
    passed=$((passed + p)); failed=$((failed + f))
    [ "$f" = 0 ] || bad_suites="$bad_suites $name"
    echo "   ($name: $p passed, $f failed, $(( $(date +%s) - start ))s)"
    rm -f "$log"
done
[ -z "$bad_suites" ] || echo "failed suites:$bad_suites"
echo "tests: $passed passed, $failed failed"
[ "$failed" = 0 ]
