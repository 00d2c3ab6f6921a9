#!/usr/bin/env bash
# Builds infergate's images from docker/Dockerfile without a Docker daemon: buildah (chroot
# isolation, vfs storage, so it needs neither a daemon nor overlay mounts nor user namespaces)
# builds the Dockerfile's own image stages on the base docker/base.sh makes, from binaries a
# cargo build already made (docker/stage.sh gathers them). Buildah's layer cache and storage
# live outside the clone, so an unchanged layer (the base, libtorch) is not built again.
#
#   docker/build-images.sh [options] [IMAGE...]     IMAGE: operator proxy runtime runtime-cuda
#     --bin-dir DIR        cargo profile folder with the binaries (default: $CARGO_TARGET_DIR/release)
#     --proxy-bin-dir DIR  the proxy's profile folder (default: --bin-dir); releases pass
#                          $CARGO_TARGET_DIR/dist (`cargo build --profile dist -p proxy`)
#     --cuda-bin-dir DIR   the CUDA-linked runtime's profile folder (for runtime-cuda)
#     --tag TAG            image tag (default: the commit, with -dirty for a changed tree)
#     --push HOST[:PORT]   push to that registry (TLS and gzip; plain HTTP and uncompressed
#                          layers for one on loopback, such as the test bed's)
#     --refs FILE          with --push: write `IMAGE REFERENCE@DIGEST` lines to FILE
#     --engine docker      build with `docker build` instead (same stages, same base)
#   docker/build-images.sh --buildah ARGS...      buildah ARGS on the images this script keeps
# Prints each image's size. Default images: operator proxy runtime.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${INFERGATE_CACHE:-$HOME/.cache/infergate}/images"
say() { printf 'images: %s\n' "$*" >&2; }

# Overlay storage: a layer is stored as its changes (vfs copies every layer's whole tree: 4.4 GB
# for one build of the three images). The kernel refuses an overlay whose layers sit on
# overlayfs (a cache inside a container's root), so there vfs it is.
mkdir -p "$cache"
driver=overlay
if [ "$(findmnt -n -o FSTYPE --target "$cache" 2>/dev/null)" = overlay ]; then
  driver=vfs
fi
buildah_cmd=(buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver "$driver")
if [ "${1:-}" = --buildah ]; then
  shift
  exec "${buildah_cmd[@]}" "$@"
fi
bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
proxy_bin_dir=""
cuda_bin_dir=""
tag=""
push=""
refs=""
engine=buildah
images=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --proxy-bin-dir) proxy_bin_dir="$2"; shift 2 ;;
    --cuda-bin-dir) cuda_bin_dir="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --push) push="$2"; shift 2 ;;
    --refs) refs="$2"; shift 2 ;;
    --engine) engine="$2"; shift 2 ;;
    operator|proxy|runtime|runtime-cuda) images+=("$1"); shift ;;
    *) echo "build-images: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "${#images[@]}" -gt 0 ] || images=(operator proxy runtime)
[ -n "$proxy_bin_dir" ] || proxy_bin_dir="$bin_dir"

revision="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
dirty=""
[ -z "$(git -C "$repo" status --porcelain 2>/dev/null)" ] || dirty="-dirty"
[ -n "$tag" ] || tag="${revision:0:12}$dirty"
revision="$revision$dirty"
version="$(awk -F'"' '/^version = / {print $2; exit}' "$repo/Cargo.toml")"
source_url="https://github.com/infergate/infergate"

if [ "$engine" = buildah ]; then
  engine_cmd=("${buildah_cmd[@]}")
else
  engine_cmd=(docker)
fi
engine() { "${engine_cmd[@]}" "$@"; }
image_exists() {
  if [ "$engine" = buildah ]; then engine inspect --type image "$1" >/dev/null 2>&1
  else docker image inspect "$1" >/dev/null 2>&1; fi
}
image_size() {  # uncompressed, as the engine counts it
  if [ "$engine" = buildah ]; then engine images --format '{{.Size}}' "$1" | head -n 1
  else docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; fi
}

# The base: a reproducible tarball, so its key (the lock's and script's hash) names its content.
base_tar="$cache/base.tar"
mkdir -p "$cache"
bash "$repo/docker/base.sh" "$base_tar"
base_key="$(cat "$repo/docker/base.lock" "$repo/docker/base.sh" | sha256sum | cut -c1-16)"
base_image="localhost/infergate/base:$base_key"
if ! image_exists "$base_image"; then
  say "importing the base $base_image"
  if [ "$engine" = buildah ]; then
    container="$(engine from scratch)"
    engine add "$container" "$base_tar" / >/dev/null
    engine config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --label org.opencontainers.image.base.name=debian-12-extracted "$container"
    engine commit -q "$container" "$base_image" >/dev/null
    engine rm "$container" >/dev/null
  else
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      "$base_tar" "$base_image" >/dev/null
  fi
fi

# The build context: what docker/stage.sh gathered, nothing of the clone.
context="$cache/context"
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
needs_cpu=false needs_cuda=false
for image in "${images[@]}"; do
  if [ "$image" = runtime-cuda ]; then needs_cuda=true; else needs_cpu=true; fi
done
if [ "$needs_cpu" = true ]; then bash "$repo/docker/stage.sh" cpu "$bin_dir" "$context/out" "$proxy_bin_dir"; fi
if [ "$needs_cuda" = true ]; then
  [ -n "$cuda_bin_dir" ] || { echo "build-images: runtime-cuda needs --cuda-bin-dir" >&2; exit 2; }
  bash "$repo/docker/stage.sh" cuda "$cuda_bin_dir" "$context/out-cuda"
fi

# The image's entrypoint must find every library inside the image, with the image's own
# dynamic linker and LD_LIBRARY_PATH; the CUDA runtime must also load libtorch_cuda (without
# it CUDA stays unavailable). A library missing fails the build, not a pod at deploy time.
check_libraries() {  # $1: image, $2: name, $3: its root filesystem, mounted
  local root="$3" entrypoint library_path listing
  entrypoint="$(engine inspect --type image --format '{{index .OCIv1.Config.Entrypoint 0}}' "$2")"
  library_path="$(engine inspect --type image --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$2" \
    | sed -n 's/^LD_LIBRARY_PATH=//p')"
  listing="$(env -i LD_LIBRARY_PATH="$library_path" "$(command -v chroot)" "$root" /lib64/ld-linux-x86-64.so.2 --list "$entrypoint" 2>&1)" \
    || true
  if grep -q 'not found' <<< "$listing" || ! grep -q '=>' <<< "$listing"; then
    echo "build-images: $1: $entrypoint does not load in its image:"$'\n'"$listing" >&2
    return 1
  fi
  if [ "$1" = runtime-cuda ] && ! grep -q 'libtorch_cuda.so => /opt/libtorch/' <<< "$listing"; then
    echo "build-images: runtime-cuda: $entrypoint does not load libtorch_cuda:"$'\n'"$listing" >&2
    return 1
  fi
  say "$1: $entrypoint loads $(grep -c '=>' <<< "$listing") libraries, all from the image"
}

[ -z "$refs" ] || : > "$refs"
for image in "${images[@]}"; do
  name="localhost/infergate/$image:$tag"
  started=$(date +%s)
  # The compile stages' outputs come from the context folder, not from compiling again.
  build_args=(--build-context compiled="$context" --build-context compiled-cuda="$context"
    --build-arg BASE_IMAGE="$base_image" --build-arg SOURCE="$source_url"
    --build-arg VERSION="$version" --build-arg REVISION="$revision")
  if [ "$engine" = buildah ]; then
    # Time 0 for files and the creation date: the same binaries make the same digest.
    engine bud --quiet --layers --force-rm --timestamp 0 --isolation chroot --target "$image" "${build_args[@]}" \
      -f "$repo/docker/Dockerfile" -t "$name" "$context" >/dev/null
    # One working container for two things: the library check reads its files, and the labels
    # that vary are set again on it, because buildah 1.28's layer cache does not key a LABEL
    # step on the build arguments it expands (an image from the cache would keep the revision
    # of the build that first made it; an empty layer is the price of the cache).
    container="$(engine from --pull-never "$name")"
    if ! check_libraries "$image" "$name" "$(engine mount "$container")"; then
      engine rm "$container" >/dev/null
      exit 1
    fi
    engine config --label org.opencontainers.image.source="$source_url" \
      --label org.opencontainers.image.version="$version" \
      --label org.opencontainers.image.revision="$revision" "$container"
    engine commit --quiet --timestamp 0 "$container" "$name" >/dev/null
    engine rm "$container" >/dev/null
  else
    docker buildx build --load --quiet --target "$image" "${build_args[@]}" \
      -f "$repo/docker/Dockerfile" -t "$name" "$context" >/dev/null
  fi
  say "$image: $name, $(image_size "$name"), built in $(($(date +%s) - started)) s"
  if [ -n "$push" ]; then
    remote="$push/infergate/$image"
    if [ "$engine" = buildah ]; then
      digest_file="$(mktemp)"
      # A registry on loopback (the test bed's) speaks plain HTTP and gets uncompressed
      # layers: gzip of libtorch_cpu alone costs 17 s of a core and saves nothing there. Any
      # other registry gets TLS, verified, and gzipped layers.
      push_options=()
      case "$push" in
        127.*|localhost|localhost:*) push_options=(--tls-verify=false --disable-compression) ;;
      esac
      engine push --quiet "${push_options[@]}" --digestfile "$digest_file" \
        "$name" "docker://$remote:$tag"
      digest="$(cat "$digest_file")"
      rm -f "$digest_file"
    else
      docker tag "$name" "$remote:$tag"
      docker push --quiet "$remote:$tag" >/dev/null
      digest="$(docker image inspect --format '{{index .RepoDigests 0}}' "$remote:$tag")"
      digest="${digest#*@}"
    fi
    say "$image: pushed $remote@$digest"
    [ -z "$refs" ] || echo "$image $remote@$digest" >> "$refs"
  fi
done

# Older tags of these images and the layers only they used: vfs storage keeps a full copy of
# each layer's tree, so a cache that kept every commit's images would fill the disk.
if [ "$engine" = buildah ]; then
  for image in "${images[@]}"; do
    engine images --format '{{.Name}}:{{.Tag}}' --filter "reference=localhost/infergate/$image" 2>/dev/null \
      | grep -v ":$tag\$" | xargs -r "${engine_cmd[@]}" rmi -f >/dev/null 2>&1 || true
  done
  engine rmi --prune >/dev/null 2>&1 || true
fi
