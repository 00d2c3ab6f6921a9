#!/usr/bin/env bash
# Starts the cluster test bed on loopback: etcd, kube-apiserver (RBAC, service-account tokens,
# the default admission plugins), kube-controller-manager and kube-scheduler, built from Go
# modules by build.sh; applies infergate's CRDs; prints KUBECONFIG=<path>.
# Idempotent: a running test bed started from this clone and these builds is left as it is.
# e2e/cluster/down.sh stops it.
#
# With INFERGATE_NODE_AGENT_BIN and INFERGATE_RUNTIME_BIN set, also starts the node agent that
# runs pods as local processes (README); with INFERGATE_OPERATOR_BIN and INFERGATE_PROXY_BIN
# too, installs infergate with its Helm chart and prints PROXY_URL=<url>. Pods run images that
# docker/build-images.sh builds from those binaries and pushes to the test bed's own registry
# (127.0.0.1:15000), pinned by digest; INFERGATE_POD_IMAGES=host maps the images to the
# binaries instead (host-binary mode, for quick local runs).
#
# What a test bed runs is recorded in run/identity, one layer at a time as it is started: the
# control plane (this clone's path, this script, the control-plane build stamp, the CRDs, the
# ports), then the node agent (the path and sha256 of each binary it runs), then the chart (a
# hash of charts/infergate). A bed that does not match is stopped with down.sh and started anew,
# saying `cluster: replacing a test bed started from <path> (<why>)` on stderr: one from another
# clone or an earlier up.sh or control-plane build; one whose recorded binaries were rebuilt or
# removed since, or whose chart or CRDs changed; one whose node agent runs other binaries than
# those named now, or lacks one named now; one whose processes are not all running (a run dir
# left behind). A layer not asked for is not compared, only kept current: a call without the
# binaries leaves the node agent and chart that a call with them started.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${INFERGATE_CLUSTER_DIR:-$HOME/.cache/infergate/cluster}"
bin="${INFERGATE_CLUSTER_BIN:-$state/bin}"
run="$state/run"
etcd_port="${INFERGATE_CLUSTER_ETCD_PORT:-12379}"
api_port="${INFERGATE_CLUSTER_API_PORT:-16443}"
registry_port="${INFERGATE_CLUSTER_REGISTRY_PORT:-15000}"
pod_images="${INFERGATE_POD_IMAGES:-registry}"
case "$pod_images" in registry|host) ;; *) echo "INFERGATE_POD_IMAGES: registry or host, not $pod_images" >&2; exit 2 ;; esac
kubeconfig="$run/admin.kubeconfig"
say() { printf 'cluster: %s\n' "$*" >&2; }

mkdir -p "$state"
# One up.sh at a time: test binaries and their threads may all ask for the test bed at once.
exec 9>"$state/up.lock"
flock 9
bash "$here/build.sh"
kubectl=("$bin/kubectl" --kubeconfig "$kubeconfig")

# shellcheck source=e2e/cluster/proc.sh
. "$(dirname "${BASH_SOURCE[0]}")/proc.sh"

alive() {  # $1: name
  local pid
  [ -f "$run/$1.pid" ] && [ -f "$run/$1.start" ] || return 1
  pid="$(cat "$run/$1.pid")"
  [ "$(proc_start "$pid")" = "$(cat "$run/$1.start")" ]
}

start() {  # $1: name, $2...: command
  local name="$1"; shift
  if alive "$name"; then return; fi
  say "starting $name"
  setsid "$@" >"$run/logs/$name.log" 2>&1 < /dev/null 9>&- &
  proc_start $! > "$run/$name.start" || true
  echo $! > "$run/$name.pid"
}

# The identity of the test bed: run/identity, a line a thing, its key and values tab-separated.
identity="$run/identity"
sha() { sha256sum | cut -c1-64; }
tree_sha() { (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha; }
# A binary is known by its path and sha256; device, inode, size and mtime spare hashing it again
# while they are unchanged (a rebuild changes them).
file_key() { stat -L -c '%d:%i:%s:%.9Y' "$1"; }
recorded() { [ -f "$identity" ] && awk -F'\t' -v k="$1" '$1 == k {print; exit}' "$identity"; }
record() {  # $1: key, $2...: values; replaces the key's line
  local line tmp="$identity.tmp"
  line="$(IFS=$'\t'; echo "$*")"
  { [ -f "$identity" ] && awk -F'\t' -v k="$1" '$1 != k' "$identity"; echo "$line"; } > "$tmp"
  mv "$tmp" "$identity"
}
record_binary() { record "$1" "$2" "$(file_key "$2")" "$(sha < "$2")"; }
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

# The control plane: started by every call, compared on every call.
plane_keys=(repo up.sh control-plane crds ports)
declare -A plane=(
  [repo]="$repo"
  [up.sh]="$(sha < "$here/up.sh")"
  [control-plane]="$(cat "$bin/.components")"$'\t'"$bin"
  [crds]="$(tree_sha "$repo/crds/manifests")"
  [ports]="$etcd_port"$'\t'"$api_port"$'\t'"$registry_port"
)
declare -A plane_why=(
  [repo]="another clone" [up.sh]="another up.sh" [control-plane]="another control-plane build"
  [crds]="other CRDs" [ports]="other ports"
)
# The node agent's binaries, when asked for: it maps infergate's images to them.
binary_keys=(node-agent runtime operator proxy)
declare -A binary_name=([node-agent]="node agent" [runtime]=runtime [operator]=operator [proxy]=proxy)
declare -A wanted=()
if [ -n "${INFERGATE_NODE_AGENT_BIN:-}" ]; then
  wanted[node-agent]="$(absolute "$INFERGATE_NODE_AGENT_BIN")"
  wanted[runtime]="$(absolute "${INFERGATE_RUNTIME_BIN:?INFERGATE_RUNTIME_BIN names the runtime binary}")"
  [ -z "${INFERGATE_OPERATOR_BIN:-}" ] || wanted[operator]="$(absolute "$INFERGATE_OPERATOR_BIN")"
  [ -z "${INFERGATE_PROXY_BIN:-}" ] || wanted[proxy]="$(absolute "$INFERGATE_PROXY_BIN")"
fi
# How pods get their programs, and the recipe of the images they run.
pod_images_key="$pod_images"$'\t'"$(cat "$repo"/docker/{Dockerfile,base.lock,base.sh,stage.sh,build-images.sh} \
  "$repo/scripts/libtorch-libs.sh" | sha)"

# Why the test bed in run/ is not one this call may use, if it is not; prints nothing and fails
# when it is (or when there is none).
foreign() {
  local key rec path fkey sum name
  [ -d "$run" ] || return 1
  if [ ! -f "$identity" ]; then echo "no record of what it runs"; return 0; fi
  for key in "${plane_keys[@]}"; do
    if [ "$(recorded "$key")" != "$key"$'\t'"${plane[$key]}" ]; then echo "${plane_why[$key]}"; return 0; fi
  done
  for path in "$run"/*.pid; do
    [ -e "$path" ] || continue
    name="$(basename "$path" .pid)"
    alive "$name" || { echo "its $name is not running"; return 0; }
  done
  for key in "${binary_keys[@]}"; do
    name="${binary_name[$key]}"
    rec="$(recorded "$key")"
    if [ -z "$rec" ]; then
      if [ -n "${wanted[$key]:-}" ] && [ -n "$(recorded node-agent)" ]; then
        echo "its node agent runs no $name binary"; return 0
      fi
      continue
    fi
    IFS=$'\t' read -r _ path fkey sum <<< "$rec"
    if [ -n "${wanted[$key]:-}" ] && [ "${wanted[$key]}" != "$path" ]; then
      echo "its $name binary is $path"; return 0
    fi
    [ -f "$path" ] || { echo "its $name binary $path is gone"; return 0; }
    [ "$(file_key "$path")" != "$fkey" ] || continue
    [ "$(sha < "$path")" = "$sum" ] || { echo "its $name binary $path was rebuilt since"; return 0; }
    record "$key" "$path" "$(file_key "$path")" "$sum"  # touched, not changed
  done
  rec="$(recorded pod-images)"
  if [ -n "${wanted[node-agent]:-}" ] && [ -n "$rec" ] && [ "$rec" != "pod-images"$'\t'"$pod_images_key" ]; then
    echo "its pods get their programs another way (${rec#pod-images$'\t'})"; return 0
  fi
  rec="$(recorded chart)"
  if [ -n "$rec" ] && [ "$rec" != "chart"$'\t'"$(tree_sha "$repo/charts/infergate")" ]; then
    echo "another chart"; return 0
  fi
  return 1
}

if why="$(foreign)"; then
  from="$(recorded repo | cut -f2 || true)"
  say "replacing a test bed started from ${from:-an unknown place} ($why)"
  bash "$here/down.sh"
fi
mkdir -p "$run/pki" "$run/logs"
if [ ! -f "$identity" ]; then
  for key in "${plane_keys[@]}"; do record "$key" "${plane[$key]}"; done
fi

wait_for() {  # $1: what, $2...: probe command
  local what="$1"; shift
  for _ in $(seq 600); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  say "$what did not become ready; its log:"
  tail -n 30 "$run/logs/$what.log" >&2 || true
  exit 1
}

# Certificates: one CA for serving and client certs, and the service-account signing key.
pki="$run/pki"
if [ ! -f "$pki/ca.crt" ]; then
  say "generating certificates"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=infergate-test-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  cert() {  # $1: name, $2: subject, $3: extensions file (optional)
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 ${3:+-extfile "$3"} -out "$pki/$1.crt" 2>/dev/null
  }
  printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > "$pki/apiserver.ext"
  printf 'extendedKeyUsage=clientAuth\n' > "$pki/client.ext"
  cert apiserver "/CN=kube-apiserver" "$pki/apiserver.ext"
  cert admin "/O=system:masters/CN=infergate-admin" "$pki/client.ext"
  cert controller-manager "/CN=system:kube-controller-manager" "$pki/client.ext"
  cert scheduler "/CN=system:kube-scheduler" "$pki/client.ext"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
fi

write_kubeconfig() {  # $1: file, $2: client cert name
  cat > "$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
  - name: infergate-test
    cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$pki/ca.crt"}
users:
  - name: $2
    user: {client-certificate: "$pki/$2.crt", client-key: "$pki/$2.key"}
contexts:
  - name: infergate-test
    context: {cluster: infergate-test, user: $2}
current-context: infergate-test
KUBECONFIG
}
write_kubeconfig "$kubeconfig" admin
write_kubeconfig "$run/controller-manager.kubeconfig" controller-manager
write_kubeconfig "$run/scheduler.kubeconfig" scheduler

start etcd "$bin/etcd" --name test --data-dir "$run/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
  --initial-cluster "test=http://127.0.0.1:$((etcd_port + 1))" --unsafe-no-fsync
wait_for etcd curl -sf "http://127.0.0.1:$etcd_port/health"

start kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --authorization-mode RBAC \
  --client-ca-file "$pki/ca.crt" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --allow-privileged=true
wait_for kube-apiserver "${kubectl[@]}" get --raw /readyz

start kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig "$run/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$run/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$run/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
  --controllers '*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle'
start kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig "$run/scheduler.kubeconfig" \
  --authentication-kubeconfig "$run/scheduler.kubeconfig" \
  --authorization-kubeconfig "$run/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false

# The controller manager creates each namespace's default ServiceAccount; its arrival shows
# the controllers are running.
wait_for kube-controller-manager "${kubectl[@]}" get serviceaccount default --namespace default
"${kubectl[@]}" apply --server-side --field-manager infergate-test-bed -f "$repo/crds/manifests/" >/dev/null
wait_for kube-apiserver "${kubectl[@]}" wait --for condition=Established --timeout 1s \
  crd/modeldeployments.infergate.dev crd/accesstokens.infergate.dev
# The node agent (a stand-in kubelet running pods as local processes), when the caller built it
# and names the binaries it maps images to. Pods reach the API server at 10.0.0.1:443, the
# address of the `kubernetes` Service (in the serving certificate), which the agent relays to
# the API server as kube-proxy would; pods reach each other through the host, which routes
# between their networks while the test bed runs.
if [ -n "${INFERGATE_NODE_AGENT_BIN:-}" ]; then
  if ! ip -4 addr show dev lo | grep -q ' 10\.0\.0\.1/'; then
    ip addr add 10.0.0.1/32 dev lo
    touch "$run/api-address-added"
  fi
  if [ ! -f "$run/ip_forward.saved" ]; then
    sysctl -n net.ipv4.ip_forward > "$run/ip_forward.saved"
    sysctl -qw net.ipv4.ip_forward=1
  fi
  if [ "$pod_images" = registry ]; then
    # The images, built from the binaries named (one cargo profile folder), pushed to the
    # test bed's registry; the node agent pulls them by digest.
    if ! alive registry; then
      mkdir -p "$run/registry"
      printf 'version: 0.1\nlog: {level: warn}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: "127.0.0.1:%s"}\n' \
        "$run/registry" "$registry_port" > "$run/registry.yml"
      start registry "$bin/registry" serve "$run/registry.yml"
      wait_for registry curl -sf "http://127.0.0.1:$registry_port/v2/"
    fi
    if [ ! -s "$run/images.refs" ]; then
      bin_dir="$(dirname "${wanted[runtime]}")"
      built=(runtime)
      for key in operator proxy; do
        [ -n "${wanted[$key]:-}" ] || continue
        [ "$(dirname "${wanted[$key]}")" = "$bin_dir" ] || {
          say "images are built from one folder: ${wanted[$key]} is not in $bin_dir"; exit 1
        }
        built+=("$key")
      done
      say "building and pushing the images of ${built[*]}"
      bash "$repo/docker/build-images.sh" --bin-dir "$bin_dir" --tag test-bed \
        --push "127.0.0.1:$registry_port" --refs "$run/images.refs.tmp" "${built[@]}" >&2
      mv "$run/images.refs.tmp" "$run/images.refs"
    fi
    images=(--insecure-registry "127.0.0.1:$registry_port")
  else
    images=(--image "infergate/runtime=${wanted[runtime]}")
    [ -z "${wanted[operator]:-}" ] || images+=(--image "infergate/operator=${wanted[operator]}")
    [ -z "${wanted[proxy]:-}" ] || images+=(--image "infergate/proxy=${wanted[proxy]}")
  fi
  if [ -z "$(recorded node-agent)" ]; then
    for key in "${binary_keys[@]}"; do
      [ -z "${wanted[$key]:-}" ] || record_binary "$key" "${wanted[$key]}"
    done
    record pod-images "$pod_images_key"
  fi
  start node-agent env KUBECONFIG="$kubeconfig" INFERGATE_NODE_AGENT_CA="$pki/ca.crt" \
    "${wanted[node-agent]}" --node infergate-node --state-dir "$run/node" \
    --api-relay "10.0.0.1:443=127.0.0.1:$api_port" "${images[@]}"
  wait_for node-agent "${kubectl[@]}" wait --for condition=Ready --timeout 1s node/infergate-node
fi
# infergate itself, installed with its Helm chart (real Helm v4 from the set-up virtualenv) when
# the caller also names the operator and proxy binaries: the operator watches namespace
# infergate-e2e, the gateway namespace is infergate-system, and PROXY_URL is the proxy pod.
if [ -n "${INFERGATE_NODE_AGENT_BIN:-}" ] && [ -n "${INFERGATE_OPERATOR_BIN:-}" ] && [ -n "${INFERGATE_PROXY_BIN:-}" ]; then
  [ -n "$(recorded chart)" ] || record chart "$(tree_sha "$repo/charts/infergate")"
  if ! "${kubectl[@]}" -n infergate-system get deployment infergate-proxy >/dev/null 2>&1; then
    say "installing infergate with its Helm chart"
    "${kubectl[@]}" create namespace infergate-system >/dev/null 2>&1 || true
    "${INFERGATE_PYTHON:-python}" - "$kubeconfig" "$repo/charts/infergate" "$pod_images" \
      "127.0.0.1:$registry_port" "$run/images.refs" "$run/node-cache" <<'PY' >&2
import sys
import helm_python as helm
kubeconfig, chart, pod_images, registry, refs, model_cache = sys.argv[1:7]
if pod_images == "registry":
    # Pinned by digest: pods run exactly what docker/build-images.sh pushed.
    digests = dict(line.split()[0:2] for line in open(refs))
    images = {"registry": f"{registry}/infergate", "pullPolicy": "IfNotPresent",
              "digests": {name: ref.split("@", 1)[1] for name, ref in digests.items()}}
else:
    images = {"registry": "infergate", "tag": "test-bed", "pullPolicy": "Never"}
values = {"images": images,
          "operator": {"watchNamespace": "infergate-e2e", "logJson": False, "usageIntervalSeconds": 2},
          "proxy": {"replicas": 1, "preStopSleepSeconds": 1, "logJson": False},
          # The node agent refreshes mounted Secrets and ConfigMaps every second.
          "internalKeys": {"rotationHours": 24, "activationSeconds": 3},
          # The node cache of downloaded models inside the test bed's own directory.
          "modelCache": {"hostPath": model_cache, "maxBytes": 10_000_000_000}}
helm.Config(kubeconfig_path=kubeconfig).install(
    helm.Chart.load(chart), "infergate", values, namespace="infergate-system")
PY
  fi
  wait_for node-agent "${kubectl[@]}" -n infergate-system wait --for condition=Available --timeout 1s \
    deployment/infergate-operator deployment/infergate-proxy
  proxy_ip="$("${kubectl[@]}" -n infergate-system get pods -l app.kubernetes.io/name=infergate-proxy \
    -o jsonpath='{.items[?(@.status.phase=="Running")].status.podIP}' | awk '{print $1}')"
  echo "PROXY_URL=http://$proxy_ip:8080"
fi
# Where the node agent keeps each pod's container logs (it serves no `kubectl logs`).
[ -z "${INFERGATE_NODE_AGENT_BIN:-}" ] || echo "POD_LOGS=$run/node/pods"
echo "KUBECONFIG=$kubeconfig"
echo "KUBECTL=$bin/kubectl"
