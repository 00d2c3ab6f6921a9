# Source this file (`. scripts/env.sh`) to build and run infergate by hand: it puts the cached
# virtualenv on PATH and points tch at the libtorch inside its torch wheel.
# shellcheck shell=bash

export INFERGATE_CACHE="${INFERGATE_CACHE:-$HOME/.cache/infergate}"
export INFERGATE_VENV="${INFERGATE_VENV:-$INFERGATE_CACHE/venv}"

if [ ! -x "$INFERGATE_VENV/bin/python" ]; then
  echo "infergate: no virtualenv at $INFERGATE_VENV; run scripts/setup.sh first" >&2
  return 1 2>/dev/null || exit 1
fi

export VIRTUAL_ENV="$INFERGATE_VENV"
case ":$PATH:" in
  *":$INFERGATE_VENV/bin:"*) ;;
  *) export PATH="$INFERGATE_VENV/bin:$PATH" ;;
esac

# torch-sys finds libtorch by asking this Python for its torch package.
export LIBTORCH_USE_PYTORCH=1
_infergate_torch_lib="$("$INFERGATE_VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
case ":${LD_LIBRARY_PATH:-}:" in
  *":$_infergate_torch_lib:"*) ;;
  *) export LD_LIBRARY_PATH="$_infergate_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
unset _infergate_torch_lib

# Where cargo puts what it builds, as cargo itself resolves it (CARGO_TARGET_DIR, a cargo config's
# build.target-dir, or the workspace's target/): scripts run the binaries from there.
_infergate_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INFERGATE_TARGET="$(cargo metadata --format-version 1 --no-deps --offline --manifest-path "$_infergate_repo/Cargo.toml" 2>/dev/null \
  | "$INFERGATE_VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null)" \
  || INFERGATE_TARGET="${CARGO_TARGET_DIR:-$_infergate_repo/target}"
export INFERGATE_TARGET
unset _infergate_repo

# Offline by design: tests load models from files they generate or from installed packages.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
