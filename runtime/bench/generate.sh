#!/usr/bin/env bash
# Text-generation benchmark: infergate-runtime against Hugging Face transformers `generate` on
# the same randomly initialised Llama (tens of millions of parameters) and torch threads, at 1
# and 16 concurrent streams: tokens/s, time to first token, and the ratios. Not a CI test.
#
#   runtime/bench/generate.sh [--threads 1] [--new-tokens 128]
set -euo pipefail

threads=1 new_tokens=128
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --new-tokens) new_tokens="$2"; shift 2 ;;
    *) echo "usage: $0 [--threads 1] [--new-tokens 128]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
cargo build --release --locked -q -p runtime --bin infergate-runtime
target="$INFERGATE_TARGET"
NEW_TOKENS="$new_tokens" python "$repo/runtime/bench/generate.py" \
  "$target/release/infergate-runtime" "$repo/runtime/fixtures/llama" "$threads"
