#!/usr/bin/env bash
# The reliability suite: the tests behind each limit, hostile input, fault, shutdown and
# secrecy promise (items 1-5), every fuzz target (6), then the load scenarios (7), as one
# table: test, figure measured, target, pass. Exits non-zero when a row fails.
#
#   scripts/reliability.sh [--quick] [--fuzz-seconds 60] [--json FILE]
#
# The test command runs the load part with --quick (items 1-6 are in its `cargo test` and
# fuzz runs already). Not a benchmark: figures depend on this machine's load.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/env.sh
. scripts/env.sh
cargo build --release --locked -q -p proxy -p runtime --bins
cargo build --release --locked -q -p crds --example bench_token
python3 scripts/reliability.py --items --bin-dir "$INFERGATE_TARGET/release" "$@"
