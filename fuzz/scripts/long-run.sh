#!/usr/bin/env bash
# The long campaign: each TARGET for SECONDS, JOBS (default 2) at a time, under nice 19, on
# the built binaries (build first: `cargo +nightly fuzz build -s none -a`). Corpus growth
# goes to $FUZZ_WORK/<target>; a crash's input to fuzz/artifacts/<target>/; the log's last
# status line to $FUZZ_WORK/summary.txt.
#
#   FUZZ_WORK=/tmp/fz fuzz/scripts/long-run.sh SECONDS TARGET...
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=$1
shift
jobs=${JOBS:-2}
work=${FUZZ_WORK:-/tmp/provider-fuzz-long}
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p "$work"
one() {
  local t=$1
  mkdir -p "$work/$t" "artifacts/$t"
  local start=$(date +%s)
  nice -n 19 "$bin/$t" "$work/$t" "corpus/$t" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"$work/$t.log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - start))
  local last
  last=$(grep -aE '^#[0-9]+' "$work/$t.log" | tail -1)
  echo "$t rc=$rc ${took}s $last" >>"$work/summary.txt"
}
running=0
for t in "$@"; do
  one "$t" &
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n
    running=$((running - 1))
  fi
done
wait
