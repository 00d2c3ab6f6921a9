#!/usr/bin/env bash
# The test command, on a new machine as on a warm one: the (idempotent) set-up, formatting, lints
# as errors, every test of the workspace, a short slice of fuzzing and of the load suite. Prints
# `tests: N passed, N failed` summed over all test binaries, then each phase's time.
#
# One build serves all of it: `cargo test` builds the binaries and examples (debug) that the
# integration tests and the load slice run; only the fuzz targets need their own (instrumented,
# unoptimised) build. The long runs stay apart: scripts/fuzz.sh (60 s per target) and scripts/reliability.sh
# (the full load suite on release binaries).
#
#   INFERGATE_FUZZ_SECONDS (default 10): per fuzz target.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

phases=()
phase_started=$(date +%s)
phase_done() {
  local now
  now=$(date +%s)
  phases+=("$1 $((now - phase_started))")
  phase_started=$now
}
print_phases() {
  local total=0 name seconds
  echo
  echo "phase      seconds"
  for entry in "${phases[@]}"; do
    read -r name seconds <<<"$entry"
    printf '%-10s %7d\n' "$name" "$seconds"
    total=$((total + seconds))
  done
  printf '%-10s %7d\n' total "$total"
}

bash scripts/setup.sh
phase_done set-up
# shellcheck source=scripts/env.sh
. scripts/env.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-run
phase_done build

# The CRD tests start the cluster test bed (e2e/cluster/up.sh) on first use; stop it afterwards
# unless this clone's was already running (up.sh replaces one that another clone or build left).
cluster_run="${INFERGATE_CLUSTER_DIR:-$HOME/.cache/infergate/cluster}/run"
cluster_was_up=false
[ -f "$cluster_run/kube-apiserver.pid" ] && kill -0 "$(cat "$cluster_run/kube-apiserver.pid")" 2>/dev/null \
  && awk -F'\t' -v r="$repo" '$1 == "repo" && $2 == r {f = 1} END {exit !f}' "$cluster_run/identity" 2>/dev/null \
  && cluster_was_up=true
log="$(mktemp)"
cleanup() {
  rm -f "$log"
  [ "$cluster_was_up" = true ] || bash e2e/cluster/down.sh
}
trap cleanup EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
phase_done tests

# Every fuzz target from its seeds and the cached corpus; 0 crashes allowed. The chat-template
# target runs the runtime binary built above.
INFERGATE_RUNTIME_BIN="$INFERGATE_TARGET/debug/infergate-runtime" \
  bash scripts/fuzz.sh --dev --seconds "${INFERGATE_FUZZ_SECONDS:-10}" || status=1
phase_done fuzz

# The load part of the reliability suite, scaled down: a malformed flood, SSE streams and 2x
# overload through the binaries `cargo test` built above.
python3 scripts/reliability.py --quick --bin-dir "$INFERGATE_TARGET/debug" || status=1
phase_done load

passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '; [0-9]+ failed' "$log" | awk '{s += $2} END {print s + 0}')
print_phases
echo
echo "tests: $passed passed, $failed failed"
if [ "$passed" -eq 0 ] && [ "$status" -eq 0 ]; then
  echo "no test ran" >&2
  exit 1
fi
exit "$status"
