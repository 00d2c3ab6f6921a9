#!/usr/bin/env bash
# Prepares a Debian machine to build and test infergate: system packages, the Rust components
# and a cached virtualenv with torch (whose libtorch tch links) and the Python test tools.
# Idempotent: a second run checks what is there and returns in seconds.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${INFERGATE_CACHE:-$HOME/.cache/infergate}"
venv="${INFERGATE_VENV:-$cache/venv}"
requirements="$repo/scripts/requirements.txt"

say() { printf 'setup: %s\n' "$*" >&2; }

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# buildah, skopeo and umoci build, push and unpack the images without a daemon
# (docker/build-images.sh, the test bed's node agent); binutils strips the binaries they hold;
# redis-server is the shared store of per-token limits the proxy's tests run against; jq is
# what the generated curl snippets decode base64 answers with.
apt_packages=(ca-certificates cmake pkg-config libssl-dev python3-venv openssl curl
  buildah skopeo umoci binutils redis-server jq)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || { say "cargo not found: install Rust (1.95 or newer) with rustup"; exit 1; }
for component in rustfmt clippy; do
  cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done

# Go builds the cluster test bed's control plane. Go 1.21 or newer fetches the toolchain that
# e2e/cluster/components/go.mod names (1.26) through the module proxy by itself; Debian 12's own
# golang-go (1.19) cannot, so it is no substitute.
if ! command -v go >/dev/null; then
  say "Go not found: install Go 1.21 or newer (this machine image ships 1.26)"
  exit 1
fi

# The stamp holds the hash of the requirements the virtualenv was built from, so a changed pin
# reinstalls and an unchanged one costs nothing.
stamp="$venv/.infergate-requirements"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  say "installing Python packages (torch is ~4.7 GB the first time)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  echo "$wanted" > "$stamp"
fi

# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
python -c 'import torch; assert torch.__version__.startswith("2.11."), torch.__version__'
bash "$repo/e2e/cluster/build.sh"
bash "$repo/scripts/setup-clients.sh"
say "ready; for a shell: . scripts/env.sh"
