#!/usr/bin/env bash
# Text-to-image benchmark: infergate-runtime against diffusers' StableDiffusionPipeline on the
# same random pipeline and torch threads: seconds per denoising step and the ratio. Not a CI
# test. `image.py --size sd15 --device cuda --dtype float16` on a GPU machine.
#
#   runtime/bench/image.sh [--threads 1] [--steps 5]
set -euo pipefail

threads=1 steps=5
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    *) echo "usage: $0 [--threads 1] [--steps 5]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
cargo build --release --locked -q -p runtime --bin infergate-runtime
target="$INFERGATE_TARGET"
python "$repo/runtime/bench/image.py" "$target/release/infergate-runtime" \
  "$repo/runtime/fixtures/stable-diffusion" "$threads" --steps "$steps"
