# shellcheck shell=bash
# The test cluster's one real node, sourced by hack/cluster.sh: containerd (with runc and the CNI
# bridge), a kubelet that registers the node, and kube-proxy for ClusterIP Services.
#
# The node is labelled type=real and dynamo.nvidia.com/node=real and tainted
# dynamo.nvidia.com/real-node=true:NoSchedule, so only pods that select it and tolerate the taint
# land there (the kwok GPU nodes keep everything else). Its status advertises REAL_NODE_GPUS
# nvidia.com/gpu (default 8) so GPU-requesting worker pods fit; nothing on it touches a GPU.
#
# Everything it writes lives under $NODE_DIR, except what the kubelet and containerd put in fixed
# places (/var/lib/kubelet/device-plugins, /var/log/containers, /run/containerd): node_cleanup
# removes those when `up` created them, and the bridge, iptables chains, pod cgroups, mounts and
# sysctls it changed. It works with containerd dead too, so `up` after a crash recovers.

NODE_NAME="${REAL_NODE_NAME:-real-node}"
NODE_DIR="$STATE/node"
NODE_GPUS="${REAL_NODE_GPUS:-8}"
NODE_TAINT_KEY=dynamo.nvidia.com/real-node
NODE_POD_CIDR=10.245.0.0/24        # real pods; kwok's fake pod IPs come from $POD_CIDR
NODE_BRIDGE=dynamo0
CTRD_SOCK="$NODE_DIR/containerd/containerd.sock"
PAUSE_IMAGE=registry.k8s.io/pause:3.10.2   # containerd's default sandbox image (pinned in its config)
NODE_COMPONENTS=(containerd kubelet kube-proxy)
# Paths outside $NODE_DIR that the node writes whatever it is told; removed by cleanup if up made them.
NODE_FIXED_PATHS=(/var/lib/kubelet /var/log/containers /var/log/pods /run/containerd /var/lib/cni /etc/cni /opt/cni /run/nri /var/run/nri)
NODE_SYSCTLS=(net.ipv4.ip_forward net.ipv4.conf.all.route_localnet)

node_enabled() { [ "${REAL_NODE:-1}" != 0 ]; }
# The host's address that pods reach it by: the source of its default route, else its first global
# IPv4 address, else loopback (then pods cannot reach the API server; `up` says so).
node_ip() {
  local ip
  ip="$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "src") { print $(i + 1); exit } }')"
  [ -n "$ip" ] || ip="$(ip -4 -o addr show scope global 2>/dev/null | awk '{ sub(/\/.*/, "", $4); print $4; exit }')"
  echo "${ip:-127.0.0.1}"
}
ctr_() { "$BIN/ctr" --address "$CTRD_SOCK" --namespace k8s.io "$@"; }
crictl_() { "$BIN/crictl" --runtime-endpoint "unix://$CTRD_SOCK" --image-endpoint "unix://$CTRD_SOCK" --timeout 10s "$@"; }

node_need_tools() {
  local t
  for t in "${NODE_COMPONENTS[@]}" containerd-shim-runc-v2 ctr runc crictl cni/bridge cni/host-local cni/loopback cni/portmap; do
    [ -x "$BIN/$t" ] || die "$BIN/$t missing: run hack/tools.sh first"
  done
  for t in iptables ip conntrack socat mount gcc; do
    command -v "$t" >/dev/null || die "$t not found (hack/tools.sh installs the node's Debian packages)"
  done
  [ "$(id -u)" = 0 ] || die "the real node needs root (set REAL_NODE=0 for a kwok-only cluster)"
}

# Certificates for the node: kubelet client (Node authorizer identity), kubelet serving (node IP as
# SAN, so `kubectl logs/exec` through the API server verify it), kube-proxy client.
node_pki() {
  issue_certs \
    "kubelet|/O=system:nodes/CN=system:node:$NODE_NAME|extendedKeyUsage=clientAuth" \
    "kubelet-serving|/CN=$NODE_NAME|subjectAltName=IP:$NODE_IP,IP:127.0.0.1,DNS:$NODE_NAME
extendedKeyUsage=serverAuth" \
    "kube-proxy|/CN=system:kube-proxy|extendedKeyUsage=clientAuth"
}

node_write_configs() {
  mkdir -p "$NODE_DIR"/{containerd,cni/net.d,cni/networks,kubelet,pod-logs,volume-plugins,runc}
  cat >"$NODE_DIR/containerd/config.toml" <<EOF
version = 3
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
[plugins.'io.containerd.server.v1.grpc']
  address = "$CTRD_SOCK"
[plugins.'io.containerd.server.v1.ttrpc']
  address = "$CTRD_SOCK.ttrpc"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.internal.v1.opt']
  path = "$NODE_DIR/containerd/opt"
[plugins.'io.containerd.image-verifier.v1.bindir']
  bin_dir = "$NODE_DIR/containerd/image-verifier"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # This VM lacks CAP_SYS_RESOURCE: runc may not lower a container's oom_score_adj below ours.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$BIN/runc"
        Root = "$NODE_DIR/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$BIN/cni"]
    conf_dir = "$NODE_DIR/cni/net.d"
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
  # No loopback in the chain: containerd brings up lo itself.
  cat >"$NODE_DIR/cni/net.d/10-dynamo.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "dynamo-test",
  "plugins": [
    {
      "type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$NODE_DIR/cni/networks",
        "ranges": [[{"subnet": "$NODE_POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$NODE_DIR/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$CTRD_SOCK
# The VM has a cgroup v1/v2 hybrid and no systemd-managed cgroups for us.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
registerWithTaints:
- {key: $NODE_TAINT_KEY, value: "true", effect: NoSchedule}
podLogsDir: $NODE_DIR/pod-logs
volumePluginDir: $NODE_DIR/volume-plugins
resolvConf: /etc/resolv.conf
serializeImagePulls: false
# Images are imported, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
nodeStatusUpdateFrequency: 5s
syncFrequency: 10s
EOF
  cat >"$NODE_DIR/kube-proxy-config.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $NODE_DIR/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $NODE_POD_CIDR
healthzBindAddress: 127.0.0.1:$PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$PROXY_METRICS_PORT
# Leave the host's conntrack sysctls alone (0 = as is).
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  cert_kubeconfig "$NODE_DIR/kubelet.kubeconfig" "system:node:$NODE_NAME" "$PKI/kubelet.crt" "$PKI/kubelet.key"
  cert_kubeconfig "$NODE_DIR/kube-proxy.kubeconfig" system:kube-proxy "$PKI/kube-proxy.crt" "$PKI/kube-proxy.key"
}

# Record which fixed paths exist before the node starts, and the sysctls it changes.
node_record_host() {
  local p s
  : >"$NODE_DIR/created-paths"
  for p in "${NODE_FIXED_PATHS[@]}"; do [ -e "$p" ] || echo "$p" >>"$NODE_DIR/created-paths"; done
  : >"$NODE_DIR/sysctls"
  for s in "${NODE_SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s" 2>/dev/null)" >>"$NODE_DIR/sysctls"; done
}

# The pause image: built from the pinned Kubernetes module's pause.c (static), cached by version.
node_pause_image() {
  local kver src out
  kver="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$ROOT/hack/tools/k8s/go.mod")"
  src="$CACHE/go/mod/k8s.io/kubernetes@$kver/build/pause/linux/pause.c"
  out="$CACHE/tools/share/pause-$kver.tar"
  if [ ! -s "$out" ]; then
    [ -f "$src" ] || (cd "$ROOT/hack/tools/k8s" && GOMODCACHE="$CACHE/go/mod" GOFLAGS=-mod=readonly go mod download k8s.io/kubernetes) >/dev/null 2>&1 ||
      die "cannot find $src (run hack/tools.sh)"
    mkdir -p "$CACHE/tools/share"
    gcc -Os -static -DVERSION="$kver" -o "$NODE_DIR/pause" "$src" || die "building pause from $src failed (gcc, libc6-dev)"
    strip "$NODE_DIR/pause" 2>/dev/null || true
    python3 "$ROOT/hack/oci.py" --name "$PAUSE_IMAGE" --out "$out.tmp" --entrypoint /pause --user 65535:65535 \
      --file "$NODE_DIR/pause:/pause:0755" >/dev/null || die "writing the pause image failed"
    mv -f "$out.tmp" "$out"
  fi
  ctr_ images import --platform linux/amd64 "$out" >"$LOGS/pause-import.log" 2>&1 ||
    { tail -5 "$LOGS/pause-import.log" >&2; die "importing the pause image failed"; }
}

node_ready() { [ "$(kc get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; }
ctrd_up() { ctr_ version; }
kubelet_healthy() { curl -sf --max-time 3 "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz" | grep -qx ok; }
proxy_healthy() { curl -sf --max-time 3 "http://127.0.0.1:$PROXY_HEALTHZ_PORT/healthz" >/dev/null; }

node_up() {
  node_need_tools
  [ "$NODE_IP" != 127.0.0.1 ] || die "the host has no non-loopback IPv4 address: pods could not reach the API server (REAL_NODE=0 runs without the real node)"
  node_pki
  node_write_configs
  node_record_host
  sysctl -qw net.ipv4.ip_forward=1
  export PATH="$BIN:$PATH"   # containerd finds containerd-shim-runc-v2 on PATH
  start containerd --config "$NODE_DIR/containerd/config.toml" --log-level warn
  wait_for containerd ctrd_up
  node_pause_image
  start kubelet --config="$NODE_DIR/kubelet-config.yaml" --kubeconfig="$NODE_DIR/kubelet.kubeconfig" \
    --root-dir="$NODE_DIR/kubelet" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    --node-labels="type=real,dynamo.nvidia.com/node=real,$ZONE_LABEL=zone-real,$RACK_LABEL=zone-real-rack-1,nvidia.com/gpu.present=true" \
    --v=1
  wait_for kubelet kubelet_healthy
  wait_for "node $NODE_NAME Ready" node_ready
  # GPUs for the scheduler and the operator's placement (no device plugin: nothing allocates them).
  kc patch node "$NODE_NAME" --subresource=status --type=merge \
    -p "{\"status\":{\"capacity\":{\"nvidia.com/gpu\":\"$NODE_GPUS\"},\"allocatable\":{\"nvidia.com/gpu\":\"$NODE_GPUS\"}}}" >/dev/null
  start kube-proxy --config="$NODE_DIR/kube-proxy-config.yaml" --v=1
  wait_for kube-proxy proxy_healthy
  log "real node $NODE_NAME Ready at $NODE_IP (pods $NODE_POD_CIDR on $NODE_BRIDGE, $NODE_GPUS nvidia.com/gpu, taint $NODE_TAINT_KEY)"
}

stop_one() { # name [grace seconds]
  local pid deadline
  pid="$(pid_of "$1")"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + ${2:-15}))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  log "stopped $1 ($pid)"
}

# Remove iptables rules and chains made by kube-proxy, the kubelet and the CNI plugins.
ipt_cleanup() { # iptables|ip6tables
  local ipt="$1" t line c
  command -v "$ipt" >/dev/null || return 0
  for t in filter nat mangle raw; do
    "$ipt" -t "$t" -S >/dev/null 2>&1 || continue
    { "$ipt" -t "$t" -S | grep -E '^-A [A-Z]+ .*-j (KUBE-|CNI-)' | grep -vE '^-A (KUBE-|CNI-)' || true; } |
      while read -r line; do eval "\"$ipt\" -t $t -D ${line#-A }" 2>/dev/null || true; done
    for c in $("$ipt" -t "$t" -S | awk '/^-N (KUBE-|CNI-)/ { print $2 }'); do "$ipt" -t "$t" -F "$c" 2>/dev/null || true; done
    for c in $("$ipt" -t "$t" -S | awk '/^-N (KUBE-|CNI-)/ { print $2 }'); do "$ipt" -t "$t" -X "$c" 2>/dev/null || true; done
  done
}

pod_cgroup_dirs() { ls -d /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/unified/kubepods 2>/dev/null | sort -u; }

# Stop the node and leave nothing behind. Graceful first (the kubelet's pods removed through the
# CRI, so CNI tears down their network), then by force for whatever a crash left.
node_cleanup() {
  [ -d "$NODE_DIR" ] || return 0
  local pid p d exe
  stop_one kube-proxy 10
  stop_one kubelet 10
  if [ -n "$(pid_of containerd)" ] && [ -x "$BIN/crictl" ]; then
    crictl_ stopp $(crictl_ pods -q 2>/dev/null) >/dev/null 2>&1 || true
    crictl_ rmp -af >/dev/null 2>&1 || true
  fi
  stop_one containerd 10
  # Whatever still runs in pod cgroups, and the shims, by force.
  for d in $(pod_cgroup_dirs); do
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  for p in /proc/[0-9]*; do
    exe="$(readlink "$p/exe" 2>/dev/null)" || continue
    case "$exe" in "$BIN/containerd-shim-runc-v2"|"$BIN/runc") kill -KILL "${p#/proc/}" 2>/dev/null || true ;; esac
  done
  sleep 0.3
  # Mounts (container rootfs, volumes, network namespaces), deepest first.
  { awk '{ print $5 }' /proc/self/mountinfo | grep -E "^($NODE_DIR|/run/containerd|/var/lib/kubelet|/run/netns/cni-)" || true; } |
    sort -r | while read -r p; do umount -l "$p" 2>/dev/null || true; done
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  ipt_cleanup iptables
  ipt_cleanup ip6tables
  kube-proxy_cleanup
  for d in $(pod_cgroup_dirs); do
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  if [ -f "$NODE_DIR/created-paths" ]; then
    while read -r p; do [ -n "$p" ] && rm -rf "$p"; done <"$NODE_DIR/created-paths"
  fi
  if [ -f "$NODE_DIR/sysctls" ]; then
    while IFS='=' read -r s v; do [ -n "$v" ] && sysctl -qw "$s=$v" 2>/dev/null || true; done <"$NODE_DIR/sysctls"
  fi
  rm -rf "$NODE_DIR"
}

# kube-proxy's own cleanup of its iptables and nftables state (the chains above may not be all).
kube-proxy_cleanup() {
  [ -x "$BIN/kube-proxy" ] && "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  command -v nft >/dev/null && for fam in ip ip6; do nft delete table "$fam" kube-proxy 2>/dev/null || true; done
  return 0
}

node_status() {
  local name pid ok=0
  for name in "${NODE_COMPONENTS[@]}"; do
    pid="$(pid_of "$name")"
    if [ -n "$pid" ]; then printf "%-24s running (pid %s)\n" "$name" "$pid"; else printf "%-24s NOT RUNNING\n" "$name"; ok=1; fi
  done
  if node_ready; then echo "real node: $NODE_NAME Ready ($NODE_IP)"; else echo "real node: $NODE_NAME NOT Ready"; ok=1; fi
  return $ok
}
