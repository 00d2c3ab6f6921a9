#!/usr/bin/env bash
# Speech-recognition benchmark: infergate-runtime against transformers `generate` on the same
# Whisper model (whisper-tiny's shape, random weights; `--size fixture` for the parity fixture)
# and torch threads: seconds per 30 s clip, real-time factor, ratios. Not a CI test.
#
#   runtime/bench/speech.sh [--threads 1] [--size tiny|fixture]
set -euo pipefail

threads=1 size=tiny
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    *) echo "usage: $0 [--threads 1] [--size tiny|fixture]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
cargo build --release --locked -q -p runtime --bin infergate-runtime
target="$INFERGATE_TARGET"
python "$repo/runtime/bench/speech.py" "$target/release/infergate-runtime" \
  "$repo/runtime/fixtures/whisper" "$threads" --size "$size"
