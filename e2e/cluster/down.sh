#!/usr/bin/env bash
# Stops every process of the cluster test bed and removes its state (etcd data, certificates);
# the built binaries stay cached.
set -euo pipefail

state="${INFERGATE_CLUSTER_DIR:-$HOME/.cache/infergate/cluster}"
run="$state/run"
[ -d "$run" ] || exit 0
for name in node-agent kube-scheduler kube-controller-manager kube-apiserver etcd; do
  pid_file="$run/$name.pid"
  [ -f "$pid_file" ] || continue
  pid="$(cat "$pid_file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
done
# Pods of the node agent: their processes went with its process group; their namespaces and
# host-side links stay unless removed.
for ns in $(ip netns list 2>/dev/null | awk '/^igpod-/ {print $1}'); do
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
done
for link in $(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^igp/ {sub(/@.*/, "", $2); print $2}'); do
  ip link del "$link" 2>/dev/null || true
done
# What up.sh changed on the host for the node agent's pods.
if [ -f "$run/api-address-added" ]; then
  ip addr del 10.0.0.1/32 dev lo 2>/dev/null || true
fi
if [ -f "$run/ip_forward.saved" ]; then
  sysctl -qw net.ipv4.ip_forward="$(cat "$run/ip_forward.saved")" || true
fi
rm -rf "$run"
