#!/usr/bin/env bash
# The egress proxy benchmark: direct vs bare TCP relay vs `provider egress serve` vs squid,
# all on loopback, in one run. Sizes can be lowered for a quick look, e.g.
#   EGRESS_BENCH_CONNECT=268435456 EGRESS_BENCH_GET=268435456 scripts/egress-bench.sh
# Needs squid for its row (Debian: apt-get install squid); without it the row is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v squid >/dev/null; then
  echo "note: squid not installed (apt-get install squid); its row will be missing" >&2
fi
exec cargo bench -p provider --bench egress "$@"
