#!/usr/bin/env bash
# Gathers what the images hold from a cargo profile folder into OUT, for both builds: the
# Dockerfile's compile stages and docker/build-images.sh (daemonless) run this same script.
# `cpu`: OUT/bin/ operator, proxy and runtime, debug info stripped (the release profile keeps
# line tables for backtraces on a developer's machine; an image need not carry 100 MB of them),
# and OUT/libtorch/ the libraries the runtime's `ldd` resolves in the torch wheel. `cuda`: the
# CUDA-linked runtime and all of the wheel's torch and NVIDIA libraries (CUDA dlopens many).
# Run after `. scripts/env.sh`.
#
# The proxy may come from another profile folder (PROXY_DIR): it ships from the `dist` profile,
# whose whole-program optimisation proxy/bench/run.sh measured (the others ship from release).
#
#   docker/stage.sh cpu|cuda PROFILE_DIR OUT [PROXY_DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
variant="$1" from="$2" out="$3" proxy_from="${4:-$2}"
case "$variant" in
  cpu) binaries=(infergate-operator infergate-proxy infergate-runtime) ;;
  cuda) binaries=(infergate-runtime) ;;
  *) echo "stage: cpu or cuda, not $variant" >&2; exit 2 ;;
esac
rm -rf "$out"
mkdir -p "$out/bin"
for binary in "${binaries[@]}"; do
  dir="$from"
  [ "$binary" != infergate-proxy ] || dir="$proxy_from"
  objcopy --strip-debug "$dir/$binary" "$out/bin/$binary"
done
bash "$here/../scripts/libtorch-libs.sh" "$variant" "$out/bin/infergate-runtime" "$out/libtorch"
