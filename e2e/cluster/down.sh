#!/usr/bin/env bash
# Stops every process of the cluster test bed and removes its state (etcd data, certificates,
# the record of what it runs); the built binaries stay cached. A process whose PID file names a
# PID reused since (a run dir left from before a reboot or from another container) is not
# touched. up.sh calls it to replace a test bed it did not start.
set -euo pipefail

state="${INFERGATE_CLUSTER_DIR:-$HOME/.cache/infergate/cluster}"
run="$state/run"
[ -d "$run" ] || exit 0

# shellcheck source=e2e/cluster/proc.sh
. "$(dirname "${BASH_SOURCE[0]}")/proc.sh"

stop() {  # $1: name
  local pid_file="$run/$1.pid" pid
  [ -f "$pid_file" ] || return 0
  pid="$(cat "$pid_file")"
  proc_start "$pid" >/dev/null || return 0
  # up.sh records when it started each process; an older up.sh did not.
  if [ -f "$run/$1.start" ] && [ "$(proc_start "$pid")" != "$(cat "$run/$1.start")" ]; then
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do proc_start "$pid" >/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
}
# The node agent first (its pods go with it), the control plane from the top; then anything
# else a PID file names (a process an up.sh of another version started).
names=(node-agent kube-scheduler kube-controller-manager kube-apiserver etcd)
for name in "${names[@]}"; do stop "$name"; done
for pid_file in "$run"/*.pid; do
  [ -e "$pid_file" ] || continue
  name="$(basename "$pid_file" .pid)"
  case " ${names[*]} " in *" $name "*) ;; *) stop "$name" ;; esac
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
