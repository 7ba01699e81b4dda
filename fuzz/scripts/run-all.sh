#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 20) on its committed corpus,
# JOBS at a time (default 2), under nice. Fails when any target finds a crash, a hang
# (-timeout) or an out-of-memory (-rss_limit_mb); the input that did it is copied to
# fuzz/artifacts/<target>/ and its libFuzzer log is printed.
#
#   fuzz/scripts/run-all.sh [SECONDS] [TARGET...]     (SECONDS=0: replay the corpus only)
#   fuzz/scripts/run-all.sh NUMx [TARGET...]          (NUM executions each, seed 1)
#   fuzz/scripts/run-all.sh ci [TARGET...]            (each target's NUM from ci-runs.txt)
#
# `NUMx` mutates for a fixed number of executions from a fixed seed instead of a time: the
# same binary on the same corpus tries the same inputs on any machine, fast or loaded, so
# a run that passed here passes in CI and a failure is reproducible (a timed run explores
# as far as the machine's speed takes it, and can find something new on a given day).
#
# New corpus entries go to a scratch directory (FUZZ_WORK, default a temp dir), not to the
# committed seeds. Each target's last libFuzzer status line (execs, cov, ft) goes to
# $FUZZ_WORK/summary.txt and to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
shift || true
jobs=${JOBS:-2}
work=${FUZZ_WORK:-$(mktemp -d /tmp/provider-fuzz.XXXXXX)}
mkdir -p "$work"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: scripts/install-deps.sh installs it" >&2
  exit 1
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

# One build for all: `-s none` because every fuzzed crate is safe Rust (the C in reach is
# the system's OpenSSL, which is not instrumented either way); `-a` turns on debug
# assertions and overflow checks, so an arithmetic overflow is a crash.
nice -n 19 cargo +nightly fuzz build -s none -a

run_one() {
  local t=$1
  mkdir -p "$work/$t" "artifacts/$t"
  local log="$work/$t.log"
  # SECONDS=0: replay the committed corpus once; NUMx or ci: NUM executions from seed 1;
  # else mutate for SECONDS.
  local budget
  local runs=$seconds
  if [[ $seconds == ci ]]; then
    runs=$(awk -v t="$t" '$1 == t { print $2 "x" }' ci-runs.txt)
    if [[ -z $runs ]]; then
      echo "$t: FAILED: no entry in fuzz/ci-runs.txt" | tee -a "$work/summary.txt"
      return 1
    fi
  fi
  if [[ $runs == *x ]]; then
    budget=(-runs="${runs%x}" -seed=1)
  elif ((seconds == 0)); then
    budget=(-runs=0)
  else
    budget=(-max_total_time="$seconds")
  fi
  if nice -n 19 cargo +nightly fuzz run -s none -a "$t" "$work/$t" "corpus/$t" -- \
    "${budget[@]}" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
    local last
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    echo "$t: ok ${runs} ${last}" | tee -a "$work/summary.txt"
  else
    echo "$t: FAILED (log below, input in fuzz/artifacts/$t/)" | tee -a "$work/summary.txt"
    tail -60 "$log"
    return 1
  fi
}

failed=0
running=0
pids=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n || failed=1
    running=$((running - 1))
  fi
done
while ((running > 0)); do
  wait -n || failed=1
  running=$((running - 1))
done
echo "fuzz logs and new corpus entries: $work"
exit $failed
