#!/usr/bin/env bash
# Stops every process of the cluster test bed and removes its state (etcd data, certificates);
# the built binaries stay cached.
set -euo pipefail

state="${INFERGATE_CLUSTER_DIR:-$HOME/.cache/infergate/cluster}"
run="$state/run"
[ -d "$run" ] || exit 0
for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
  pid_file="$run/$name.pid"
  [ -f "$pid_file" ] || continue
  pid="$(cat "$pid_file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
done
rm -rf "$run"
