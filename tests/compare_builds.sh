#!/usr/bin/env bash
# Compares two builds of vdist on configs/tiny: every field of metrics.jsonl except the
# timings (step_ms, tokens_per_s, mfu, dispatch_ms) must be identical, byte for byte, in
# each layout below; and a checkpoint the old build writes must resume in the new one to
# the same lines as the old build's uninterrupted run. For refactors that promise to
# change no number.
#
#   tests/compare_builds.sh OLD_REV            # builds OLD_REV in a temporary worktree
#   OLD_VDIST=path/to/vdist tests/compare_builds.sh
#
# The new build is build/vdist of this checkout (make it first). Prints one line per check
# and "compare: N passed, N failed".
set -u
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
MPIRUN="mpirun --oversubscribe --bind-to none"
new=$PWD/build/vdist
work=$(mktemp -d /tmp/vdist_compare_XXXXXX)
trap 'rm -rf "$work"; [ -n "${wt:-}" ] && git worktree remove --force "$wt" >/dev/null 2>&1' EXIT
if [ -z "${OLD_VDIST:-}" ]; then
    rev=${1:?usage: tests/compare_builds.sh OLD_REV (or set OLD_VDIST)}
    wt=$work/old-src
    git worktree add --detach "$wt" "$rev" >/dev/null || exit 1
    make -C "$wt" -j2 build/vdist >"$work/old-build.log" 2>&1 || { tail "$work/old-build.log"; exit 1; }
    OLD_VDIST=$wt/build/vdist
fi
[ -x "$new" ] || { echo "build/vdist missing: run make first"; exit 1; }
mkdir -p runs
passed=0; failed=0

# metrics without the fields that are timings
strip() { sed -E 's/"(step_ms|tokens_per_s|mfu|dispatch_ms)": ?[^,}]*,?//g' "$1"; }

check() { # name, file a, file b
    if [ -s "$2" ] && cmp -s <(strip "$2") <(strip "$3"); then
        echo "  same: $1 ($(wc -l <"$2") steps)"; passed=$((passed + 1))
    else
        echo "  DIFFERENT: $1"; diff <(strip "$2") <(strip "$3") | head -6; failed=$((failed + 1))
    fi
}

run() { # binary, ranks, metrics file, extra args...
    local bin=$1 np=$2 out=$3; shift 3
    (cd "$work" && $MPIRUN -np "$np" "$bin" train --config "$OLDPWD/configs/tiny.ini" \
        --log.metrics="$out" --log.interval=1000 "$@") >"$out.log" 2>&1 \
        || { echo "  run failed: $bin -np $np $*"; tail -3 "$out.log"; }
}

layouts=(
    "1|"
    "2|--parallel.tp=2"
    "8|--parallel.tp=2 --parallel.ep=4 --train.global_batch=8"
    "2|--parallel.distributed_optimizer=false"
    "4|--parallel.ep=4 --train.global_batch=8 --model.moe_token_dispatcher_type=allgather --model.moe_capacity_factor=1.0 --model.moe_drop_policy=probs"
    "4|--parallel.tp=2 --parallel.ep=2 --parallel.etp=1 --model.moe_capacity_factor=0.75 --parallel.dispatch_direct=false"
)
i=0
for l in "${layouts[@]}"; do
    np=${l%%|*}; args=${l#*|}; i=$((i + 1))
    # shellcheck disable=SC2086
    run "$OLD_VDIST" "$np" "$work/old$i.jsonl" $args
    # shellcheck disable=SC2086
    run "$new" "$np" "$work/new$i.jsonl" $args
    check "$np rank(s) $args" "$work/old$i.jsonl" "$work/new$i.jsonl"
done

# A checkpoint of the old build (tp2, step 5 of 10) resumed by both builds, into tp2
# (also the same lines as the uninterrupted run) and into tp2 x dp2 with ep2.
run "$OLD_VDIST" 2 "$work/oldck.jsonl" --parallel.tp=2 --ckpt.dir="$work/ck" --ckpt.interval=5
j=0
for target in "2|--parallel.tp=2" "4|--parallel.tp=2 --parallel.ep=2 --parallel.etp=1"; do
    np=${target%%|*}; args=${target#*|}; j=$((j + 1))
    for b in old new; do
        bin=$OLD_VDIST; [ $b = new ] && bin=$new
        head -5 "$work/oldck.jsonl" >"$work/resume-$b$j.jsonl"
        # shellcheck disable=SC2086
        run "$bin" "$np" "$work/resume-$b$j.jsonl" $args --ckpt.resume="$work/ck/step_00000005"
        grep -q "resumed from" "$work/resume-$b$j.jsonl.log" || echo "  ($b build: no resume line)"
    done
    check "old checkpoint at step 5 resumed, $np rank(s) $args: old build vs new" \
        "$work/resume-old$j.jsonl" "$work/resume-new$j.jsonl"
    [ $j = 1 ] && check "the same resume against the old build's uninterrupted run" \
        "$work/oldck.jsonl" "$work/resume-new$j.jsonl"
done
echo "compare: $passed passed, $failed failed"
[ "$failed" = 0 ]
