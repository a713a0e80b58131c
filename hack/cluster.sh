#!/usr/bin/env bash
# A real Kubernetes cluster for tests, built by hack/tools.sh: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok managing fake GPU nodes, and one real node
# (containerd + runc + CNI bridge, kubelet, kube-proxy; hack/lib/node.sh) whose pods really run.
# The real node needs root; REAL_NODE=0 leaves it out.
#
# Usage:
#   hack/cluster.sh up                          start (idempotent) and register the fake GPU nodes
#   hack/cluster.sh down                        stop everything (SIGTERM, then SIGKILL) and wipe state
#   hack/cluster.sh status                      component PIDs/health and node count; exit 1 if not up
#   hack/cluster.sh kubeconfig                  print the admin kubeconfig path
#   hack/cluster.sh env                         print `export KUBECONFIG=... PATH=<tools>:$PATH`
#   hack/cluster.sh add-node NAME ZONE RACK [GPUS]   register one more fake node (labels = ZONE, RACK)
#   hack/cluster.sh sa-kubeconfig NAMESPACE SA OUTFILE [DURATION]
#                                               kubeconfig that authenticates as a ServiceAccount token
#
# Env: ZONES (2) RACKS per zone (2) HOSTS per rack (4) GPUS per node (8) — nodes registered by `up`;
#      REAL_NODE (1; 0 = kwok nodes only), REAL_NODE_NAME (real-node), REAL_NODE_GPUS (8);
#      CLUSTER_STATE (state dir, default $DYNAMO_CACHE/cluster: a second cluster can run beside the first);
#      CLUSTER_TIMEOUT (120 s, readiness deadline per component); CLUSTER_PORT_BASE (first port tried,
#      default 26100, below the ephemeral port range; on conflict the next block of 10 ports is tried); DYNAMO_CACHE (cache root shared
#      with hack/tools.sh, default ~/.cache/dynamo-rs).
# State (certs, etcd data, logs, pids, kubeconfigs, ports.env) lives in $CLUSTER_STATE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
BIN="$CACHE/tools/bin"
STATE="${CLUSTER_STATE:-$CACHE/cluster}"
PKI="$STATE/pki"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
KUBECONFIG_ADMIN="$STATE/kubeconfig"
KWOK_STAGES="$CACHE/tools/share/kwok/stages.yaml"
TIMEOUT="${CLUSTER_TIMEOUT:-120}"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
SERVICE_CIDR=10.96.0.0/16
POD_CIDR=10.244.0.1/16
# Label/annotation keys the operator and tests rely on.
ZONE_LABEL=topology.kubernetes.io/zone
RACK_LABEL=topology.dynamo.nvidia.com/rack
HOST_LABEL=kubernetes.io/hostname
KWOK_ANNOTATION=kwok.x-k8s.io/node

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }
kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# shellcheck source=hack/lib/node.sh
. "$ROOT/hack/lib/node.sh"
if node_enabled; then COMPONENTS+=("${NODE_COMPONENTS[@]}"); fi

need_tools() {
  local t
  for t in "${COMPONENTS[@]}" kubectl; do
    [ -x "$BIN/$t" ] || die "$BIN/$t missing: run hack/tools.sh first"
  done
  [ -s "$KWOK_STAGES" ] || die "$KWOK_STAGES missing: run hack/tools.sh first"
  command -v openssl >/dev/null || die "openssl not found"
  command -v curl >/dev/null || die "curl not found"
  if node_enabled; then node_need_tools; fi
}

# ---------------------------------------------------------------- processes

# PID of a running component, or nothing. Checks the PID still runs our binary (PIDs get reused).
pid_of() {
  local f="$PIDS/$1.pid" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "^$BIN/$1 " && echo "$pid"
  return 0
}

start() { # name args...
  local name="$1"; shift
  setsid "$BIN/$name" "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  local pid=$! i
  echo "$pid" >"$PIDS/$name.pid"
  # Until the fork has exec'ed, /proc/PID/cmdline is this shell's and pid_of would call the
  # component gone: wait (at most 1 s) until it is recognizable, or has really exited.
  for ((i = 0; i < 50; i++)); do
    [ -n "$(pid_of "$name")" ] || ! kill -0 "$pid" 2>/dev/null && return 0
    sleep 0.02
  done
}

stop_all() {
  local i name pid live=()
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name="${COMPONENTS[$i]}"
    pid="$(pid_of "$name")"
    if [ -n "$pid" ]; then
      kill -TERM "$pid" 2>/dev/null || true
      live+=("$name:$pid")
    fi
  done
  local deadline=$((SECONDS + 15)) entry
  for entry in "${live[@]}"; do
    pid="${entry#*:}"
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "${entry%%:*} ($pid) ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for entry in "${live[@]}"; do
    pid="${entry#*:}"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    log "stopped ${entry%%:*} ($pid)"
  done
}

# ---------------------------------------------------------------- ports

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_ports() {
  local base="${CLUSTER_PORT_BASE:-26100}" try p busy
  for try in $(seq 0 30); do
    busy=
    for p in $(seq "$base" $((base + 9))); do
      if port_busy "$p" || ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then busy=$p; break; fi
    done
    if [ -z "$busy" ]; then
      cat >"$STATE/ports.env" <<EOF
ETCD_PORT=$base
ETCD_PEER_PORT=$((base + 1))
APISERVER_PORT=$((base + 2))
KCM_PORT=$((base + 3))
SCHEDULER_PORT=$((base + 4))
KWOK_PORT=$((base + 5))
KUBELET_PORT=$((base + 6))
KUBELET_HEALTHZ_PORT=$((base + 7))
PROXY_HEALTHZ_PORT=$((base + 8))
PROXY_METRICS_PORT=$((base + 9))
NODE_IP=$(node_ip)
EOF
      return 0
    fi
    log "port $busy in use; trying ports from $((base + 10))"
    base=$((base + 10))
  done
  die "no free block of ports found (set CLUSTER_PORT_BASE)"
}

load_ports() {
  [ -f "$STATE/ports.env" ] || return 1
  # shellcheck disable=SC1091
  . "$STATE/ports.env"
}

# ---------------------------------------------------------------- certificates

# issue_certs SPEC...: for each "name|subject|extensions" a key and a certificate signed by the CA
# in $PKI ($PKI/name.key, $PKI/name.crt).
issue_certs() {
  local d="$PKI" s name subj ext
  for s in "$@"; do
    name="${s%%|*}"; s="${s#*|}"; subj="${s%%|*}"; ext="${s#*|}"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n%s\n' "$ext" >"$d/$name.ext"
    openssl req -newkey rsa:2048 -nodes -keyout "$d/$name.key" -out "$d/$name.csr" -subj "$subj" 2>/dev/null
    openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -out "$d/$name.crt" -days 3650 -extfile "$d/$name.ext" 2>/dev/null
    rm -f "$d/$name.csr" "$d/$name.ext"
  done
  chmod 600 "$d"/*.key
}

gen_pki() {
  mkdir -p "$PKI"
  local d="$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/ca.key" -out "$d/ca.crt" -days 3650 \
    -subj "/CN=dynamo-test-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  # name | subject | extensions
  local specs=(
    "apiserver|/CN=kube-apiserver|subjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
    "admin|/O=system:masters/CN=kubernetes-admin|extendedKeyUsage=clientAuth"
    "controller-manager|/CN=system:kube-controller-manager|extendedKeyUsage=clientAuth"
    "scheduler|/CN=system:kube-scheduler|extendedKeyUsage=clientAuth"
    "front-proxy-client|/CN=front-proxy-client|extendedKeyUsage=clientAuth"
    "kwok|/O=system:masters/CN=kwok-controller|subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth"
  )
  issue_certs "${specs[@]}"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  chmod 600 "$d"/*.key
}

b64() { base64 -w0 <"$1"; }

# write_kubeconfig FILE USER CONTEXT CREDENTIALS [NAMESPACE]: a kubeconfig for this cluster whose user
# entry holds CREDENTIALS (YAML lines, indented under `user:`).
write_kubeconfig() {
  local ns=""
  [ -n "${5:-}" ] && ns=", namespace: $5"
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dynamo-test
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $2
  user:
$4
contexts:
- name: $3
  context: {cluster: dynamo-test, user: "$2"$ns}
current-context: $3
EOF
  chmod 600 "$1"
}

cert_kubeconfig() { # file user cert key
  write_kubeconfig "$1" "$2" "$2@dynamo-test" "    client-certificate-data: $(b64 "$3")
    client-key-data: $(b64 "$4")"
}

# ---------------------------------------------------------------- readiness

wait_for() { # what command...
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT)) name
  until "$@" >/dev/null 2>&1; do
    for name in "${COMPONENTS[@]}"; do
      if [ -f "$PIDS/$name.pid" ] && [ -z "$(pid_of "$name")" ]; then
        echo "cluster.sh: error: $name exited while waiting for $what; last lines of $LOGS/$name.log:" >&2
        tail -n 25 "$LOGS/$name.log" >&2
        exit 1
      fi
    done
    if [ $SECONDS -ge $deadline ]; then
      die "timed out after ${TIMEOUT}s waiting for $what (logs in $LOGS/)"
    fi
    sleep 0.5
  done
}

healthz() { # port path
  curl -sf --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$1$2" | grep -qx ok
}
healthz_insecure() { curl -skf --max-time 3 "https://127.0.0.1:$1/healthz" | grep -qx ok; }
etcd_healthy() { curl -sf --max-time 3 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }

# is_up: the control plane runs and its API server is ready. Sets NOT_UP_WHY when it is not.
is_up() {
  local name try
  NOT_UP_WHY=
  load_ports || { NOT_UP_WHY="no ports.env"; return 1; }
  for name in "${COMPONENTS[@]}"; do
    [ -n "$(pid_of "$name")" ] || { NOT_UP_WHY="$name is not running"; return 1; }
  done
  # Every component runs: a slow or briefly unready /readyz on a loaded machine is not a reason
  # to call the cluster down (cmd_up would wipe and rebuild it), so ask a few times.
  for try in 1 2 3 4 5; do
    healthz "$APISERVER_PORT" /readyz && return 0
    sleep 1
  done
  NOT_UP_WHY="the API server's /readyz did not answer ok 5 times"
  return 1
}

# ---------------------------------------------------------------- nodes

node_yaml() { # name zone rack gpus
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $1
  annotations:
    $KWOK_ANNOTATION: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    $HOST_LABEL: $1
    $ZONE_LABEL: $2
    $RACK_LABEL: $3
    nvidia.com/gpu.present: "true"
spec: {}
status:
  capacity: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "$4"}
  allocatable: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "$4"}
EOF
}

wait_nodes_ready() { # selector-or-name...
  local deadline=$((SECONDS + TIMEOUT))
  until kc wait --for=condition=Ready --timeout=5s "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "nodes not Ready after ${TIMEOUT}s: $* (see $LOGS/kwok.log)"
  done
}

register_nodes() {
  local zones="${ZONES:-2}" racks="${RACKS:-2}" hosts="${HOSTS:-4}" gpus="${GPUS:-8}"
  local letters=abcdefghijklmnopqrstuvwxyz z r h zone rack
  {
    for ((z = 0; z < zones; z++)); do
      zone="zone-${letters:$z:1}"
      for ((r = 1; r <= racks; r++)); do
        rack="$zone-rack-$r"
        for ((h = 1; h <= hosts; h++)); do node_yaml "$rack-node-$h" "$zone" "$rack" "$gpus"; done
      done
    done
  } | kc apply -f - >/dev/null
  wait_nodes_ready node -l type=kwok
  log "registered $((zones * racks * hosts)) kwok nodes ($zones zones x $racks racks x $hosts hosts, $gpus GPUs each)"
}

# ---------------------------------------------------------------- commands

cmd_up() {
  need_tools
  if is_up; then
    log "already up (API server https://127.0.0.1:$APISERVER_PORT)"
    echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
    return 0
  fi
  if [ -d "$STATE" ]; then
    log "stale or partial cluster state in $STATE (${NOT_UP_WHY:-unknown}): cleaning up first"
    load_ports || true
    node_cleanup
    stop_all
    wipe_state
  fi
  local t0=$SECONDS
  mkdir -p "$STATE" "$LOGS" "$PIDS"
  pick_ports
  load_ports
  gen_pki
  cert_kubeconfig "$KUBECONFIG_ADMIN" kubernetes-admin "$PKI/admin.crt" "$PKI/admin.key"
  cert_kubeconfig "$STATE/controller-manager.kubeconfig" system:kube-controller-manager "$PKI/controller-manager.crt" "$PKI/controller-manager.key"
  cert_kubeconfig "$STATE/scheduler.kubeconfig" system:kube-scheduler "$PKI/scheduler.crt" "$PKI/scheduler.key"
  cert_kubeconfig "$STATE/kwok.kubeconfig" kwok-controller "$PKI/kwok.crt" "$PKI/kwok.key"

  start etcd --name=dynamo-test --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="dynamo-test=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync=true --quota-backend-bytes=4294967296 --log-level=warn
  wait_for etcd etcd_healthy

  # Bound beyond loopback and advertised at the node IP: pods reach it through the `kubernetes`
  # Service (kube-proxy DNATs 10.96.0.1:443 to $NODE_IP:$APISERVER_PORT).
  start kube-apiserver --bind-address=0.0.0.0 --advertise-address="$NODE_IP" --secure-port="$APISERVER_PORT" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --authorization-mode=Node,RBAC --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true --kubelet-client-certificate="$PKI/admin.crt" --kubelet-client-key="$PKI/admin.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" \
    --requestheader-client-ca-file="$PKI/ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --kubelet-preferred-address-types=InternalIP,Hostname
  wait_for "kube-apiserver /readyz" healthz "$APISERVER_PORT" /readyz

  start kube-controller-manager --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --allocate-node-cidrs=false --leader-elect=false \
    --controllers='*' --flex-volume-plugin-dir="$STATE/flexvolume" --kube-api-qps=200 --kube-api-burst=400 \
    --concurrent-gc-syncs=40
  start kube-scheduler --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" \
    --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/scheduler.kubeconfig" --leader-elect=false
  start kwok --kubeconfig="$STATE/kwok.kubeconfig" --config="$KWOK_STAGES" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector="$KWOK_ANNOTATION=fake" \
    --cidr="$POD_CIDR" --node-ip=127.0.0.1 --node-port="$KWOK_PORT" \
    --server-address="127.0.0.1:$KWOK_PORT" --node-lease-duration-seconds=40 \
    --tls-cert-file="$PKI/kwok.crt" --tls-private-key-file="$PKI/kwok.key"
  wait_for kube-controller-manager healthz_insecure "$KCM_PORT"
  wait_for kube-scheduler healthz_insecure "$SCHEDULER_PORT"
  # The default ServiceAccount appears once the serviceaccount controller runs: pods need it.
  wait_for "default ServiceAccount" kc get serviceaccount default -n default
  register_nodes
  if node_enabled; then node_up; fi
  log "up in $((SECONDS - t0))s: API server https://127.0.0.1:$APISERVER_PORT, logs in $LOGS/"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
}

wipe_state() {
  [ -d "$STATE/pids" ] || [ -f "$STATE/ports.env" ] || [ -z "$(ls -A "$STATE")" ] ||
    die "$STATE does not look like a cluster state dir; not deleting it"
  rm -rf "$STATE"
}

cmd_down() {
  if [ ! -d "$STATE" ]; then log "not running"; return 0; fi
  load_ports || true
  node_cleanup
  stop_all
  wipe_state
  log "down; state wiped"
}

cmd_status() {
  local name pid ok=0
  if ! load_ports; then echo "cluster: down"; return 1; fi
  for name in "${COMPONENTS[@]}"; do
    pid="$(pid_of "$name")"
    if [ -n "$pid" ]; then printf "%-24s running (pid %s)\n" "$name" "$pid"; else printf "%-24s NOT RUNNING\n" "$name"; fi
    [ -n "$pid" ] || ok=1
  done
  if healthz "$APISERVER_PORT" /readyz; then
    echo "api server: https://127.0.0.1:$APISERVER_PORT ready"
    echo "nodes: $(kc get nodes -l type=kwok --no-headers 2>/dev/null | grep -cw Ready) Ready kwok nodes"
  else
    echo "api server: https://127.0.0.1:$APISERVER_PORT NOT ready"; ok=1
  fi
  if node_enabled; then node_status || ok=1; fi
  echo "kubeconfig: $KUBECONFIG_ADMIN"
  return $ok
}

cmd_add_node() {
  [ $# -ge 3 ] || die "usage: add-node NAME ZONE RACK [GPUS]"
  need_tools
  is_up || die "cluster is not up: $NOT_UP_WHY (hack/cluster.sh up)"
  node_yaml "$1" "$2" "$3" "${4:-${GPUS:-8}}" | kc apply -f - >/dev/null
  wait_nodes_ready "node/$1"
  log "node $1 ($ZONE_LABEL=$2, $RACK_LABEL=$3, nvidia.com/gpu=${4:-${GPUS:-8}}) Ready"
}

cmd_sa_kubeconfig() {
  [ $# -ge 3 ] || die "usage: sa-kubeconfig NAMESPACE SA OUTFILE [DURATION, default 24h]"
  is_up || die "cluster is not up: $NOT_UP_WHY (hack/cluster.sh up)"
  local ns="$1" sa="$2" out="$3" token
  token="$(kc create token "$sa" -n "$ns" --duration="${4:-24h}")" || die "cannot create a token for serviceaccount $ns/$sa"
  mkdir -p "$(dirname "$out")"
  write_kubeconfig "$out" "system:serviceaccount:$ns:$sa" "$sa@dynamo-test" "    token: $token" "$ns"
  echo "$out"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kubeconfig) echo "$KUBECONFIG_ADMIN" ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_ADMIN PATH=$BIN:\$PATH" ;;
  add-node) shift; cmd_add_node "$@" ;;
  sa-kubeconfig) shift; cmd_sa_kubeconfig "$@" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
