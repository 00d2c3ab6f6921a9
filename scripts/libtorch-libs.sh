#!/usr/bin/env bash
# Copies the shared libraries BINARY loads from the set-up virtualenv's torch wheel into DEST.
# `cpu`: exactly what the dynamic linker resolves for BINARY (libtorch_cpu, libc10, libgomp
# and the two CUDA libraries the PyPI wheel's CPU code is linked against). `cuda`: all of
# torch's libraries and the NVIDIA libraries of the wheel, which CUDA loads on demand.
# Used by docker/stage.sh; run after `. scripts/env.sh`.
#
#   scripts/libtorch-libs.sh cpu|cuda BINARY DEST
set -euo pipefail
variant="$1" binary="$2" dest="$3"
mkdir -p "$dest"
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
site="$(dirname "$torch_dir")"
search_path="$torch_dir/lib:$(find "$site/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | paste -sd:)"
# Hard links where DEST is on the wheel's file system (gigabytes for CUDA), else copies.
place() { cp --link -f "$@" 2>/dev/null || cp -f "$@"; }
if [ "$variant" = cuda ]; then
  place -a "$torch_dir"/lib/*.so* "$dest"/
  for lib in ${search_path//:/ }; do
    if compgen -G "$lib/*.so*" >/dev/null; then place -a "$lib"/*.so* "$dest"/; fi
  done
else
  LD_LIBRARY_PATH="$search_path" ldd "$binary" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    case "$lib" in "$site"/*) place -aL "$lib" "$dest"/ ;; esac
  done
fi
missing="$(LD_LIBRARY_PATH="$dest" ldd "$binary" | grep 'not found' || true)"
[ -z "$missing" ] || { echo "libtorch-libs: still missing for $binary:"$'\n'"$missing" >&2; exit 1; }
echo "libtorch-libs: $(find "$dest" -name '*.so*' | wc -l) libraries in $dest ($(du -sh "$dest" | cut -f1))"
