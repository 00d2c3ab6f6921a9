#!/usr/bin/env bash
# Translation benchmark: infergate-runtime /v1/translate against transformers `generate` on the
# same randomly initialised opus-mt-sized MarianMT and torch threads, greedy and 4 beams:
# sentences/s and the ratios. Not a CI test.
#
#   runtime/bench/translate.sh [--threads 1]
set -euo pipefail

threads=1
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    *) echo "usage: $0 [--threads 1]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
cargo build --release --locked -q -p runtime --bin infergate-runtime
target="$INFERGATE_TARGET"
python "$repo/runtime/bench/translate.py" "$target/release/infergate-runtime" "$repo/runtime/fixtures/marian" "$threads"
