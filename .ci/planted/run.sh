#!/usr/bin/env bash
# Shows that the race models can fail, so that none of them can go blind unnoticed. Each patch
# under race/ and loom/ plants one bug in the store; with it applied:
#   race/*.patch  race_store is fuzzed from an empty corpus (fixed seed, so the run repeats) for
#                 at most IDEMKV_PLANT_SECONDS (default 240) and must crash;
#   loom/*.patch  the loom models (the lease runner's and tests/loom_lease.rs) must fail.
# The tree is restored after each patch, also on failure or interruption.
#
#   .ci/planted/run.sh                 # every patch
#   .ci/planted/run.sh race/waiter-registered-after-unlock
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${IDEMKV_PLANT_SECONDS:-240}"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for p in .ci/planted/race/*.patch .ci/planted/loom/*.patch; do
        names+=("$(basename "$(dirname "$p")")/$(basename "$p" .patch)")
    done
fi
missed=0
for name in "${names[@]}"; do
    patch=".ci/planted/$name.patch"
    git apply --check "$patch"
    git apply "$patch"
    trap 'git apply -R "$patch"' EXIT
    log="$(mktemp)"
    start=$(date +%s)
    set +e
    case "$name" in
        race/*)
            corpus="$(mktemp -d)"
            artifacts="$(mktemp -d)/"
            (cd fuzz && RUSTFLAGS="--cfg shuttle" cargo +nightly fuzz run -s none race_store \
                --target-dir target/shuttle "$corpus" -- -seed=1 -max_total_time="$seconds" \
                -artifact_prefix="$artifacts") > "$log" 2>&1
            rc=$?
            found=$([ $rc -ne 0 ] && ls "$artifacts"crash-* >/dev/null 2>&1 && echo yes || echo no)
            rm -rf "$corpus" "$artifacts"
            ;;
        loom/*)
            (export RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom
             cargo test --release --lib loom &&
             cargo test --release --test loom_lease) > "$log" 2>&1
            rc=$?
            found=$([ $rc -ne 0 ] && grep -q "^test .* FAILED" "$log" && echo yes || echo no)
            ;;
    esac
    set -e
    git apply -R "$patch"
    trap - EXIT
    took=$(( $(date +%s) - start ))
    if [ "$found" = yes ]; then
        echo "planted $name: caught (${took}s, build included)"
        # (A report line may be missing: a deadlock has no history. Never fatal.)
        { grep -E "^test .* FAILED|no linearization|deadlock!|panicked at" "$log" || true; } | head -4 | cut -c1-200 | sed 's/^/    /'
        { grep -E "^  #" "$log" || true; } | head -12 | cut -c1-200 | sed 's/^/    /'
    else
        echo "planted $name: NOT caught (rc=$rc); log: $log"
        missed=1
    fi
done
exit $missed
