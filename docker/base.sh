#!/usr/bin/env bash
# Makes infergate's base image as a root-filesystem tarball from Debian's packages, pinned in
# docker/base.lock, the way distroless images are made: each package's files extracted with
# dpkg-deb, no package manager, shell or maintainer scripts; users root, nonroot (65532) and
# nobody; the CA bundle that update-ca-certificates would have written; no manuals, locales
# or iconv modules (copyright files stay). File times are SOURCE_DATE_EPOCH (0), so the same
# lock gives the same tarball, byte for byte, and the same layer digest.
#
#   docker/base.sh OUT.tar       (cached: a tarball for this lock and script is reused)
#   docker/base.sh --update-lock (writes the versions Debian's mirror has now into base.lock)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lock="$here/base.lock"
say() { printf 'base: %s\n' "$*" >&2; }
packages() { grep -v '^#' "$lock" | awk 'NF == 2'; }

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

if [ "${1:-}" = --update-lock ]; then
  $sudo apt-get update -qq
  tmp="$lock.tmp"
  grep '^#' "$lock" > "$tmp"
  packages | while read -r name _; do
    echo "$name $(apt-cache policy "$name" | awk '/Candidate:/ {print $2}')"
  done >> "$tmp"
  mv "$tmp" "$lock"
  say "wrote $lock"
  exit 0
fi

out="${1:?usage: docker/base.sh OUT.tar | --update-lock}"
cache="${INFERGATE_CACHE:-$HOME/.cache/infergate}/images/base"
key="$(cat "$lock" "$here/base.sh" | sha256sum | cut -c1-16)"
cached="$cache/base-$key.tar"
if [ ! -f "$cached" ]; then
  mkdir -p "$cache"
  work="$(mktemp -d "$cache/work.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/debs" "$work/rootfs"
  pins=()
  while read -r name version; do pins+=("$name=$version"); done < <(packages)
  # The host's package lists may predate the pins (a new machine's image): refresh once.
  if ! apt-cache show "${pins[@]}" >/dev/null 2>&1; then
    $sudo apt-get update -qq
  fi
  for pin in "${pins[@]}"; do
    apt-cache show "$pin" >/dev/null 2>&1 || {
      say "Debian's mirror no longer has $pin; run docker/base.sh --update-lock and commit base.lock"
      exit 1
    }
  done
  # As root, apt would warn that its sandbox user cannot write the work folder.
  (cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root "${pins[@]}")
  for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/rootfs"
  done
  root="$work/rootfs"
  cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat > "$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nonroot:x:65532:
EOF
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$root/etc/nsswitch.conf"
  install -d -m 0700 "$root/root"
  install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
  install -d -m 1777 "$root/tmp"
  mkdir -p "$root/etc/ssl/certs"
  find "$root/usr/share/ca-certificates" -name '*.crt' -print0 | LC_ALL=C sort -z \
    | xargs -0 cat > "$root/etc/ssl/certs/ca-certificates.crt"
  # update-ca-certificates is a shell script, and the image has no shell to run it.
  rm -rf "$root"/usr/share/{man,info,locale,lintian} "$root"/usr/lib/x86_64-linux-gnu/gconv \
    "$root"/usr/sbin/update-ca-certificates
  find "$root/usr/share/doc" -type f ! -name copyright -delete
  find "$root/usr/share/doc" -depth -type d -empty -delete
  tar --sort=name --mtime=@0 --numeric-owner \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$root" -cf "$cached.tmp" .
  mv "$cached.tmp" "$cached"
  say "made $cached ($(du -h "$cached" | cut -f1), $(packages | wc -l) packages)"
fi
cp "$cached" "$out"
