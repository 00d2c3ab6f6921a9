#!/usr/bin/env bash
# Download throughput from an S3-compatible store, side by side: `infergate-runtime download`
# against `aws s3 cp --recursive` (awscli, PyPI) and `rclone copy` (Debian's), each with its
# default settings, on the same model directory served by the test bed's S3 gateway (Versity,
# e2e/cluster/build.sh) on loopback. Each client runs --runs times, interleaved; the median
# counts. Prints MB/s and infergate's ratio to each. Not a CI test: run it by hand.
#
#   weights/bench/s3.sh [--shards 4] [--shard-mib 512] [--runs 3] [--binary PATH]
#
# Everything runs on this machine: the gateway, the client, and the disk both write to. The
# figure is what a node gets from a store with no network in between, so the client's own cost
# (requests in flight, hashing, writes) is what differs.
set -euo pipefail

shards=4 shard_mib=512 runs=3 binary=
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) shards="$2"; shift 2 ;;
    --shard-mib) shard_mib="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    *) echo "usage: $0 [--shards 4] [--shard-mib 512] [--runs 3] [--binary PATH]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
bash "$repo/e2e/cluster/build.sh"
gateway="${INFERGATE_CLUSTER_BIN:-$HOME/.cache/infergate/cluster/bin}/versitygw"
command -v rclone >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null
# awscli in a virtualenv of its own: its pins (botocore, urllib3) are not the test tools'.
aws_venv="$INFERGATE_CACHE/bench-awscli"
[ -x "$aws_venv/bin/aws" ] || {
  python3 -m venv "$aws_venv"
  "$aws_venv/bin/pip" install -q --disable-pip-version-check 'awscli==1.40.0'
}
if [ -z "$binary" ]; then
  cargo build --release --locked -q -p runtime --bin infergate-runtime
  binary="$INFERGATE_TARGET/release/infergate-runtime"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/infergate-s3-bench.XXXXXX")"
pid=
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
endpoint="http://127.0.0.1:$port"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_DEFAULT_REGION=us-east-1

# A sharded model: incompressible shards and a config, with its SHA256SUMS.
model="$work/data/bench/model"
mkdir -p "$model"
for i in $(seq 1 "$shards"); do
  name="$(printf 'model-%05d-of-%05d.safetensors' "$i" "$shards")"
  python -c 'import os, sys
with open(sys.argv[1], "wb") as out:
    for _ in range(int(sys.argv[2])):
        out.write(os.urandom(1 << 20))' "$model/$name" "$shard_mib"
done
echo '{"model_type": "llama"}' > "$model/config.json"
(cd "$model" && sha256sum -- * > "$work/SHA256SUMS" && mv "$work/SHA256SUMS" .)
bytes="$(du -cb "$model"/* | tail -1 | cut -f1)"
"$gateway" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" --quiet \
  --port "127.0.0.1:$port" posix "$work/data" > "$work/gateway.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "$endpoint" && break; sleep 0.1; done

mkdir -p "$work/keys"
printf '%s' "$AWS_ACCESS_KEY_ID" > "$work/keys/AWS_ACCESS_KEY_ID"
printf '%s' "$AWS_SECRET_ACCESS_KEY" > "$work/keys/AWS_SECRET_ACCESS_KEY"
run_infergate() {
  "$binary" download --source s3://bench/model --endpoint "$endpoint" --path-style \
    --credentials-dir "$work/keys" --dest "$1" 2>/dev/null
}
run_aws() {
  "$aws_venv/bin/aws" s3 cp --recursive --quiet --endpoint-url "$endpoint" s3://bench/model "$1"
}
run_rclone() {
  # rclone 1.60's S3 client cannot load a CA bundle named in AWS_CA_BUNDLE (plain HTTP here).
  env -u AWS_CA_BUNDLE RCLONE_CONFIG=/dev/null rclone copy --s3-provider Other --s3-endpoint "$endpoint" --s3-access-key-id "$AWS_ACCESS_KEY_ID" \
    --s3-secret-access-key "$AWS_SECRET_ACCESS_KEY" --s3-force-path-style=true :s3:bench/model "$1"
}

declare -A seconds
for run in $(seq 1 "$runs"); do
  for client in infergate aws rclone; do
    dest="$work/dest-$client"
    rm -rf "$dest"
    sync
    started=$(date +%s.%N)
    "run_$client" "$dest"
    ended=$(date +%s.%N)
    # Every client must have written the same bytes.
    (cd "$dest" && sha256sum --quiet -c SHA256SUMS) || { echo "$client wrote wrong bytes" >&2; exit 1; }
    seconds[$client]+="$(echo "$ended - $started" | bc) "
    echo "run $run: $client $(echo "$ended - $started" | bc) s" >&2
  done
done
rm -rf "$work"/dest-*

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
printf '\n%s files, %s bytes, %s runs each (median), gateway and client on this machine (%s cores)\n\n' \
  "$((shards + 2))" "$bytes" "$runs" "$(nproc)"
printf '%-28s %10s %10s\n' client seconds MB/s
ours=$(echo "${seconds[infergate]}" | median)
for client in infergate aws rclone; do
  s=$(echo "${seconds[$client]}" | median)
  printf '%-28s %10.2f %10.1f\n' "$client" "$s" "$(echo "$bytes / $s / 1000000" | bc -l)"
done
echo
for client in aws rclone; do
  s=$(echo "${seconds[$client]}" | median)
  printf 'infergate / %-8s %.2fx\n' "$client" "$(echo "$s / $ours" | bc -l)"
done
printf '\nversions: %s; %s; %s\n' "$("$binary" --version 2>/dev/null || echo infergate-runtime)" \
  "$("$aws_venv/bin/aws" --version 2>&1)" "$(rclone version | head -1)"
