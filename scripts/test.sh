#!/usr/bin/env bash
# The test command: formatting, lints as errors, then every test of the workspace.
# Prints one closing line, `tests: N passed, N failed`, summed over all test binaries.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/env.sh
. scripts/env.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# The CRD tests start the cluster test bed (e2e/cluster/up.sh) on first use; stop it afterwards
# unless it was already running.
cluster_pid="${INFERGATE_CLUSTER_DIR:-$HOME/.cache/infergate/cluster}/run/kube-apiserver.pid"
cluster_was_up=false
[ -f "$cluster_pid" ] && kill -0 "$(cat "$cluster_pid")" 2>/dev/null && cluster_was_up=true
log="$(mktemp)"
cleanup() {
  rm -f "$log"
  [ "$cluster_was_up" = true ] || bash e2e/cluster/down.sh
}
trap cleanup EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# Every fuzz target from its seeds and the cached corpus; 0 crashes allowed.
bash scripts/fuzz.sh --seconds "${INFERGATE_FUZZ_SECONDS:-60}" || status=1
# The load part of the reliability suite, scaled down: a malformed flood, SSE streams and 2x
# overload through the release binaries (scripts/reliability.sh runs the whole suite).
cargo build --release --locked -q -p proxy -p runtime --bins
cargo build --release --locked -q -p crds --example bench_token
python3 scripts/reliability.py --quick || status=1

passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '; [0-9]+ failed' "$log" | awk '{s += $2} END {print s + 0}')
echo
echo "tests: $passed passed, $failed failed"
if [ "$passed" -eq 0 ] && [ "$status" -eq 0 ]; then
  echo "no test ran" >&2
  exit 1
fi
exit "$status"
