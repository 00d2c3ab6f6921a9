#!/usr/bin/env bash
# Packages `kubectl infergate` for krew: the archive a release publishes
# (kubectl-infergate_linux_amd64.tar.gz: the `infergate` binary as `kubectl-infergate`, and the
# LICENSE) and the plugin manifest rendered from .krew.yaml for it, with the archive's URI and
# sha256 filled in. Install it without a release:
#   kubectl krew install --manifest=DIR/infergate.yaml --archive=DIR/kubectl-infergate_linux_amd64.tar.gz
#
#   scripts/krew-package.sh [--version v0.1.0] [--binary PATH] [--out dist/krew]
# Without --binary the binary is built (cargo's `dist` profile).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="v$(awk -F'"' '/^version = / {print $2; exit}' "$repo/Cargo.toml")"
binary="" out="$repo/dist/krew"
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--version v0.1.0] [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  (cd "$repo" && cargo build --profile dist -p operator --bin infergate)
  binary="${CARGO_TARGET_DIR:-$repo/target}/dist/infergate"
fi
[ "$(uname -m)" = x86_64 ] || { echo "krew-package: builds linux/amd64 only" >&2; exit 1; }

mkdir -p "$out"
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
cp "$binary" "$staging/kubectl-infergate"
chmod 0755 "$staging/kubectl-infergate"
cp "$repo/LICENSE" "$staging/LICENSE"
archive="kubectl-infergate_linux_amd64.tar.gz"
# Reproducible: fixed order, owner and times, no gzip timestamp.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$staging" \
  -cf - kubectl-infergate LICENSE | gzip -n > "$out/$archive"
sha="$(sha256sum "$out/$archive" | cut -d' ' -f1)"
uri="https://github.com/infergate/infergate/releases/download/$version/$archive"

# What krew-release-bot does with the template: the tag, then URI and sha256 in place of
# addURIAndSha.
sed -e "1,3{/^#/d}" -e "s|{{addURIAndSha \"[^\"]*\" .TagName }}|uri: $uri\n      sha256: $sha|" \
  -e "s|{{ .TagName }}|$version|g" \
  "$repo/.krew.yaml" > "$out/infergate.yaml"
echo "$out/$archive"
echo "$out/infergate.yaml"
