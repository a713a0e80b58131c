#!/usr/bin/env bash
# Smoke test of the test cluster (hack/tools.sh + hack/cluster.sh): control plane, kwok nodes and the
# real node (a pod's containers really run; `up` after a crash recovers; `down` leaves nothing
# behind). Exits non-zero on failure.
# Runs its own cluster in $DYNAMO_CACHE/cluster-smoke (CLUSTER_STATE) so it never touches a cluster that
# other tests have up in $DYNAMO_CACHE/cluster; tears it down at the end (KEEP=1 keeps it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
export CLUSTER_STATE="${CLUSTER_STATE:-$CACHE/cluster-smoke}"
export ZONES=2 RACKS=2 HOSTS=4 GPUS=8
CLUSTER="$ROOT/hack/cluster.sh"
K="$CACHE/tools/bin/kubectl"
export KUBECONFIG="$CLUSTER_STATE/kubeconfig"
NS=smoke
T0=$SECONDS

pass() { echo "ok   $*"; }
fail() { echo "FAIL $*" >&2; exit 1; }
step() { echo "---- $* ($((SECONDS - T0))s)"; }
# retry SECONDS command...: until the command succeeds
retry() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "---- failure diagnostics" >&2
    "$K" get nodes,pods -A -o wide 2>&1 | tail -n 40 >&2 || true
    "$K" get events -n $NS 2>&1 | tail -n 20 >&2 || true
  fi
  if [ -z "${KEEP:-}" ]; then "$CLUSTER" down >/dev/null 2>&1 || true; fi
  exit $rc
}

step "build tools"
"$ROOT/hack/tools.sh" >/dev/null || fail "hack/tools.sh"
step "cluster up"
"$CLUSTER" down >/dev/null 2>&1 || true
"$CLUSTER" up >/dev/null || fail "hack/cluster.sh up"
trap cleanup EXIT
second_up="$("$CLUSTER" up 2>&1)" || true
grep -q "already up" <<<"$second_up" || fail "second 'up' is not idempotent; it said: $second_up"
pass "up is idempotent"
"$CLUSTER" status >/dev/null || fail "status says not up"

step "nodes"
[ "$("$K" version -o json | grep -c '"gitVersion": "v1.35')" -eq 2 ] || fail "kubectl/server version is not v1.35.x"
REAL=real-node
n=$("$K" get nodes -l type=kwok -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -cx True)
[ "$n" -eq 16 ] || fail "expected 16 Ready kwok nodes, got $n"
pass "16 Ready kwok nodes"
for z in a b; do for r in 1 2; do
  c=$("$K" get nodes --no-headers -l "topology.kubernetes.io/zone=zone-$z,topology.dynamo.nvidia.com/rack=zone-$z-rack-$r" | wc -l)
  [ "$c" -eq 4 ] || fail "rack zone-$z-rack-$r has $c nodes, want 4"
done; done
node=zone-b-rack-2-node-4
[ "$("$K" get node $node -o jsonpath='{.metadata.labels.kubernetes\.io/hostname}')" = $node ] || fail "hostname label"
[ "$("$K" get node $node -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')" = 8 ] || fail "allocatable nvidia.com/gpu != 8"
[ "$("$K" get node $node -o jsonpath='{.metadata.annotations.kwok\.x-k8s\.io/node}')" = fake ] || fail "kwok annotation"
[ -z "$("$K" get node $node -o jsonpath='{.spec.taints}')" ] || fail "node has taints"
pass "zone/rack/hostname labels, 8 GPUs allocatable, no taints"

"$K" create namespace $NS >/dev/null
retry 60 "$K" get serviceaccount default -n $NS || fail "default ServiceAccount not created in $NS"

step "real node"
[ "$("$K" get node $REAL -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] || fail "$REAL not Ready"
[ -z "$("$K" get node $REAL -o jsonpath='{.metadata.annotations.kwok\.x-k8s\.io/node}')" ] || fail "$REAL has the kwok annotation"
[ "$("$K" get node $REAL -o jsonpath='{.spec.taints[0].key}={.spec.taints[0].effect}')" = dynamo.nvidia.com/real-node=NoSchedule ] ||
  fail "$REAL is not tainted dynamo.nvidia.com/real-node:NoSchedule"
[ "$("$K" get node $REAL -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')" = 8 ] || fail "$REAL does not advertise 8 GPUs"
pass "$REAL Ready, tainted, 8 GPUs, no kwok annotation"
real_pod() { # name: a pod of the pause image pinned to the real node
  "$K" apply -n $NS -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  nodeSelector: {dynamo.nvidia.com/node: real}
  tolerations: [{key: dynamo.nvidia.com/real-node, operator: Exists, effect: NoSchedule}]
  containers:
  - {name: main, image: registry.k8s.io/pause:3.10.2, imagePullPolicy: Never}
EOF
}
runs_on_real() { [ "$("$K" get pod -n $NS "$1" -o jsonpath='{.status.phase} {.spec.nodeName} {.status.containerStatuses[0].ready}')" = "Running $REAL true" ]; }
real_ready() { [ "$("$K" get node $REAL -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
real_pod real-1
retry 90 runs_on_real real-1 || fail "a pod pinned to $REAL did not run: $("$K" get pod -n $NS real-1 -o wide 2>&1 | tail -n1)"
ip=$("$K" get pod -n $NS real-1 -o jsonpath='{.status.podIP}')
case "$ip" in 10.245.0.*) ;; *) fail "pod IP $ip not from the real node's pod range" ;; esac
"$K" logs -n $NS real-1 >/dev/null || fail "kubectl logs on the real node"
pass "a container runs on $REAL (pod IP $ip) and kubectl logs reaches it"

step "deployment scheduled onto kwok nodes"
"$K" apply -n $NS -f - >/dev/null <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: gpu}
spec:
  replicas: 3
  selector: {matchLabels: {app: gpu}}
  template:
    metadata: {labels: {app: gpu}}
    spec:
      containers:
      - name: main
        image: busybox
        command: ["sleep", "infinity"]
        resources: {limits: {nvidia.com/gpu: 1}}
EOF
"$K" rollout status -n $NS deploy/gpu --timeout=90s >/dev/null || fail "deployment did not become available"
running=$("$K" get pods -n $NS -l app=gpu -o jsonpath='{range .items[*]}{.status.phase} {.spec.nodeName}{"\n"}{end}')
[ "$(echo "$running" | grep -c '^Running zone-')" -eq 3 ] || fail "want 3 Running pods on kwok nodes, got: $running"
pass "3 pods Running on kwok nodes: $(echo "$running" | awk '{print $2}' | tr '\n' ' ')"

step "garbage collection"
"$K" delete -n $NS deploy/gpu --wait=false >/dev/null
gone() { [ -z "$("$K" get rs,pods -n $NS -l app=gpu -o name)" ]; }
retry 60 gone || fail "ReplicaSet/pods not garbage-collected after deleting the Deployment"
pass "ReplicaSet and pods garbage-collected"
"$K" create configmap -n $NS owner >/dev/null
uid=$("$K" get configmap -n $NS owner -o jsonpath='{.metadata.uid}')
"$K" apply -n $NS -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: dependent
  ownerReferences: [{apiVersion: v1, kind: ConfigMap, name: owner, uid: $uid}]
EOF
"$K" delete configmap -n $NS owner >/dev/null
retry 60 bash -c "! '$K' get configmap -n $NS dependent" || fail "dependent of a deleted owner not collected"
pass "ownerReferences GC of a dependent object"

step "scheduling gates"
"$K" apply -n $NS -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: gated}
spec:
  schedulingGates: [{name: nvidia.com/gang}]
  containers:
  - {name: main, image: busybox, resources: {limits: {nvidia.com/gpu: 8}}}
EOF
sleep 3
[ "$("$K" get pod -n $NS gated -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].reason}')" = SchedulingGated ] ||
  fail "gated pod is not SchedulingGated"
[ -z "$("$K" get pod -n $NS gated -o jsonpath='{.spec.nodeName}')" ] || fail "gated pod got bound"
"$K" get pod -n $NS gated | grep -q SchedulingGated || fail "kubectl does not show SchedulingGated"
pass "gated pod stays Pending/SchedulingGated"
"$K" patch pod -n $NS gated --type=json -p '[{"op":"remove","path":"/spec/schedulingGates"}]' >/dev/null
phase() { [ "$("$K" get pod -n $NS gated -o jsonpath='{.status.phase}')" = Running ]; }
retry 60 phase || fail "pod not Running after its gate was removed"
pass "ungated pod scheduled and Running on $("$K" get pod -n $NS gated -o jsonpath='{.spec.nodeName}')"

step "add-node"
"$CLUSTER" add-node extra-node-1 zone-c zone-c-rack-1 4 2>/dev/null || fail "add-node"
[ "$("$K" get node extra-node-1 -o jsonpath='{.metadata.labels.topology\.dynamo\.nvidia\.com/rack} {.status.allocatable.nvidia\.com/gpu}')" = "zone-c-rack-1 4" ] ||
  fail "added node has wrong rack label or GPUs"
"$K" apply -n $NS -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: pinned}
spec:
  nodeSelector: {topology.dynamo.nvidia.com/rack: zone-c-rack-1}
  containers:
  - {name: main, image: busybox, resources: {limits: {nvidia.com/gpu: 4}}}
EOF
pinned() { [ "$("$K" get pod -n $NS pinned -o jsonpath='{.status.phase} {.spec.nodeName}')" = "Running extra-node-1" ]; }
retry 60 pinned || fail "pod pinned to the new rack did not run there"
pass "new node Ready with its labels; a pod pinned to its rack runs there"

step "ServiceAccount token kubeconfig and RBAC"
"$K" create serviceaccount -n $NS reader >/dev/null
"$K" create role -n $NS pod-reader --verb=get,list,watch --resource=pods >/dev/null
"$K" create rolebinding -n $NS reader --role=pod-reader --serviceaccount=$NS:reader >/dev/null
sakc="$CLUSTER_STATE/reader.kubeconfig"
"$CLUSTER" sa-kubeconfig $NS reader "$sakc" >/dev/null || fail "sa-kubeconfig"
[ "$("$K" --kubeconfig "$sakc" auth whoami -o jsonpath='{.status.userInfo.username}')" = "system:serviceaccount:$NS:reader" ] ||
  fail "token kubeconfig does not authenticate as the ServiceAccount"
"$K" --kubeconfig "$sakc" get pods >/dev/null || fail "ServiceAccount cannot list pods in $NS (allowed by its Role)"
out=$("$K" --kubeconfig "$sakc" get secrets 2>&1) && fail "ServiceAccount could list secrets"
echo "$out" | grep -q Forbidden || fail "unexpected error listing secrets: $out"
out=$("$K" --kubeconfig "$sakc" delete pod gated 2>&1) && fail "ServiceAccount could delete a pod"
echo "$out" | grep -q Forbidden || fail "unexpected error deleting a pod: $out"
out=$("$K" --kubeconfig "$sakc" get nodes 2>&1) && fail "ServiceAccount could list nodes"
pass "token kubeconfig allowed what its Role grants and Forbidden otherwise"

step "up after a crash"
for p in kube-proxy kubelet containerd kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  pkill -KILL -f "^$CACHE/tools/bin/$p .*$CLUSTER_STATE" 2>/dev/null || true
done
"$CLUSTER" up >/dev/null || fail "up after every component was killed"
retry 90 real_ready || fail "$REAL not Ready after recovery"
"$K" create namespace $NS >/dev/null
retry 60 "$K" get serviceaccount default -n $NS || fail "default ServiceAccount not created after recovery"
real_pod real-2
retry 90 runs_on_real real-2 || fail "a pod did not run on $REAL after recovery"
pass "up after a crash cleaned the old state and the real node runs pods again"

step "down"
trap - EXIT
"$CLUSTER" down >/dev/null 2>&1 || fail "down"
[ ! -e "$CLUSTER_STATE" ] || fail "state dir $CLUSTER_STATE left behind"
for p in etcd kube-apiserver kube-controller-manager kube-scheduler kwok containerd kubelet kube-proxy; do
  if pgrep -f "^$CACHE/tools/bin/$p .*$CLUSTER_STATE" >/dev/null; then fail "$p still running"; fi
done
! pgrep -f "^$CACHE/tools/bin/containerd-shim-runc-v2" >/dev/null || fail "a containerd shim still runs"
! ip link show dynamo0 >/dev/null 2>&1 || fail "bridge dynamo0 left behind"
for t in filter nat mangle; do
  ! iptables -t $t -S | grep -qE '^-N (KUBE-|CNI-)' || fail "iptables $t chains left: $(iptables -t $t -S | grep -E '^-N (KUBE-|CNI-)' | head -3 | tr '\n' ' ')"
done
! grep -qE " ($CLUSTER_STATE|/run/containerd|/var/lib/kubelet)" /proc/self/mountinfo || fail "mounts left behind"
! ls -d /sys/fs/cgroup/*/kubepods >/dev/null 2>&1 || fail "pod cgroups left: $(ls -d /sys/fs/cgroup/*/kubepods | head -3)"
pass "down stopped every component, removed the bridge, iptables chains, mounts and pod cgroups, and wiped $CLUSTER_STATE"
echo "smoke: all checks passed in $((SECONDS - T0))s"
