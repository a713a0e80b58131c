#!/usr/bin/env bash
# Operator end-to-end tests against a real control plane (hack/cluster.sh: kube-apiserver, etcd,
# scheduler, controller-manager, kwok fake GPU nodes).
#
#   e2e/operator/run.sh             # all cases; prints "N passed, M failed"
#   e2e/operator/run.sh agg scale   # only cases whose name contains one of the words
#   E2E_MEASURE=1 e2e/operator/run.sh measure   # figures: 16 services x 4 gangs, 100 graphs
#
# The chart is installed with `helm install` (CRDs, ServiceAccount, RBAC; the Deployment scaled to
# 0), and the operator runs here as a process with a kubeconfig holding the chart ServiceAccount's
# token, so the chart's RBAC is what it gets. Its own cluster state dir (CLUSTER_STATE) and port block
# keep it apart from other clusters on the machine. KEEP_CLUSTER=1 leaves the cluster up.
# DYNAMO_CACHE is the cache root of hack/tools.sh and hack/cluster.sh (tools, cluster state);
# CARGO_TARGET_DIR is honoured for the operator and the discovery example.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
export CLUSTER_STATE="${CLUSTER_STATE:-$CACHE/cluster-e2e-operator}"
# Below Linux's ephemeral range (32768-60999): a port there can be taken by one of the cluster's own
# outgoing connections between picking it and a component binding it.
export CLUSTER_PORT_BASE="${CLUSTER_PORT_BASE:-26700}"
# kwok nodes only: the real node is e2e/realnode's (one per machine).
export REAL_NODE=0
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OP_BIN="$TARGET/debug/dynamo-operator"
DYNAMO_BIN="$TARGET/debug/dynamo"
# `dynamo_frontend::discovery::kube` as a process: prints each worker candidate set as JSON.
DISCOVER_BIN="$TARGET/debug/examples/discover"
NS=e2e
OP_LOG="$CLUSTER_STATE/operator.log"
OP_PID_FILE="$CLUSTER_STATE/operator.pid"
METRICS_PORT="${E2E_METRICS_PORT:-18181}"
FILTER=("$@")
PASSED=0
FAILED=0
FAILED_NAMES=()
SUITE_START=$(date +%s.%N)

log() { printf '\033[1m[e2e]\033[0m %s\n' "$*" >&2; }
# Cases run in a subshell: `fail` ends the case.
fail() { log "FAIL: $*"; exit 1; }

# wait_for DESCRIPTION TIMEOUT_S COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
  local what="$1" timeout="$2"
  shift 2
  local deadline=$(($(date +%s) + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail "timed out after ${timeout}s waiting for: $what"
      return 1
    fi
    sleep 0.2
  done
}

k() { kubectl -n "$NS" "$@"; }
jp() { k get "$1" "$2" -o "jsonpath=$3" 2>/dev/null; }
state_is() { [ "$(jp dgd "$1" '{.status.state}')" = "$2" ]; }
pod_count() { k get pods -l "$1" --no-headers 2>/dev/null | wc -l; }
running_count() { k get pods -l "$1" --field-selector=status.phase=Running --no-headers 2>/dev/null | wc -l; }
pods_running_eq() { [ "$(running_count "$1")" -eq "$2" ] && [ "$(pod_count "$1")" -eq "$2" ]; }
# Every kind a graph owns (all carry the graph label).
OWNED_KINDS=pods,services,dgdsa,poddisruptionbudgets,serviceaccounts,roles,rolebindings
nothing_left() {
  [ "$(k get "$OWNED_KINDS" -l "nvidia.com/dynamo-graph=$1" --no-headers 2>/dev/null | wc -l)" -eq 0 ]
}
delete_graph() {
  k delete dgd "$1" --ignore-not-found --wait=true >/dev/null
  wait_for "everything of $1 gone" 60 nothing_left "$1"
}

start_operator() {
  KUBECONFIG="$CLUSTER_STATE/operator.kubeconfig" \
    DYN_METRICS_ADDR="127.0.0.1:$METRICS_PORT" DYN_LEASE_NAMESPACE=dynamo-system \
    DYN_LEASE_DURATION="${E2E_LEASE_DURATION:-6s}" DYN_GANG_DEADLINE=30s \
    DYN_LOG="${DYN_LOG:-info,kube=warn}" \
    "$OP_BIN" >>"$OP_LOG" 2>&1 &
  echo $! >"$OP_PID_FILE"
  wait_for "operator /healthz" 30 curl -sf "http://127.0.0.1:$METRICS_PORT/healthz"
}
stop_operator() {
  local sig="${1:-TERM}" pid i
  pid="$(cat "$OP_PID_FILE" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    # One that outlives its signal by 10 s is killed, not left behind (its PID file goes next).
    if kill -0 "$pid" 2>/dev/null; then
      log "operator $pid still running 10 s after SIG$sig; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  fi
  rm -f "$OP_PID_FILE"
}
op_pid() { cat "$OP_PID_FILE"; }
cleanup() {
  stop_operator TERM
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then hack/cluster.sh down >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# A graph of S services x G gangs of one 1-GPU pod each (name, services, gangs).
wide_graph() {
  local name="$1" services="$2" gangs="$3" i
  printf 'apiVersion: nvidia.com/v1alpha1\nkind: DynamoGraphDeployment\nmetadata: {name: %s}\nspec:\n  services:\n' "$name"
  for i in $(seq 1 "$services"); do
    printf '    W%s:\n      componentType: worker\n      replicas: %s\n      resources: {limits: {gpu: "1"}}\n' "$i" "$gangs"
  done
}

# === cases ===

case_invalid_manifest_is_refused() {
  local out
  if out="$(k apply -f - 2>&1 <<'EOF'
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {name: invalid}
spec:
  services:
    Frontend: {componentType: frontend}
    Frontend2: {componentType: frontend}
    Worker:
      componentType: worker
      resources: {limits: {gpu: "0.5"}}
EOF
)"; then
    fail "an invalid graph was accepted"
    return 1
  fi
  log "kubectl apply said: $out"
  grep -q "at most one service may have componentType: frontend" <<<"$out" || fail "no frontend message"
  grep -q "gpu must be a whole number of GPUs" <<<"$out" || fail "no gpu message"
  if out="$(k apply -f - 2>&1 <<'EOF'
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {name: invalid}
spec:
  services:
    Worker: {componentType: wroker, replicas: -1, multinode: {nodeCount: 0}}
EOF
)"; then
    fail "an invalid graph was accepted"
    return 1
  fi
  grep -q 'Unsupported value: "wroker"' <<<"$out" || fail "no componentType message"
  grep -q "replicas in body should be greater than or equal to 0" <<<"$out" || fail "no replicas message"
  grep -q "nodeCount in body should be greater than or equal to 1" <<<"$out" || fail "no nodeCount message"
}

case_agg_is_placed_running_and_ready() {
  k apply -f manifests/agg.yaml >/dev/null
  wait_for "agg ready" 60 state_is agg ready
  [ "$(running_count nvidia.com/dynamo-graph=agg)" -eq 3 ] || fail "want 3 Running pods"
  local p
  for p in agg-frontend-0-0 agg-worker-0-0 agg-worker-1-0; do
    [ -n "$(jp pod "$p" '{.spec.nodeName}')" ] || fail "$p is not on a node"
    [ -z "$(jp pod "$p" '{.spec.schedulingGates}')" ] || fail "$p is still gated"
    [ "$(jp pod "$p" '{.metadata.ownerReferences[0].kind}')" = DynamoGraphDeployment ] || fail "$p has no owner"
  done
  [ "$(jp pod agg-worker-1-0 '{.spec.containers[0].resources.limits.nvidia\.com/gpu}')" = 1 ] || fail "no GPU limit"
  [ "$(jp pod agg-worker-1-0 '{.spec.containers[0].env[?(@.name=="DYN_WORLD_SIZE")].value}')" = 1 ] || fail "no DYN_WORLD_SIZE"
  [ "$(jp svc agg-frontend '{.spec.ports[0].port}')" = 8000 ] || fail "no frontend Service on 8000"
  [ "$(jp svc agg-worker-pods '{.spec.clusterIP}')" = None ] || fail "no headless worker Service"
  [ "$(jp dgdsa agg-worker '{.status.replicas}')" = 2 ] || fail "adapter status not 2"
  local row
  row="$(k get dgd agg --no-headers)"
  log "kubectl get dgd: $row"
  grep -Eq '^agg +ready +2/2 ' <<<"$row" || fail "kubectl get dgd does not show ready 2/2"
  check_worker_discovery_service agg worker
  check_pod_lifecycle agg-frontend-0-0 http
  check_pod_lifecycle agg-worker-0-0 grpc
  check_frontend_identity agg frontend
  check_disruption_budgets agg
  # Steady state: nothing drifted, so nothing was re-applied (server defaults are not drift).
  local obj
  for obj in svc/agg-worker svc/agg-frontend svc/agg-worker-pods pdb/agg-worker serviceaccount/agg-frontend \
    role/agg-frontend rolebinding/agg-frontend; do
    [ -z "$(jp "${obj%/*}" "${obj#*/}" '{.metadata.managedFields[?(@.operation=="Apply")].manager}')" ] ||
      fail "$obj was re-applied although nothing changed"
  done
  delete_graph agg
}

# The worker discovery Service GRAPH-SERVICE: headless, endpoints of Ready leaders only, port grpc.
check_worker_discovery_service() {
  local svc="$1-$2"
  [ "$(jp svc "$svc" '{.spec.clusterIP}')" = None ] || fail "$svc is not headless"
  # false is the API's default and omitted from what it returns
  case "$(jp svc "$svc" '{.spec.publishNotReadyAddresses}')" in "" | false) ;; *) fail "$svc publishes not-ready addresses" ;; esac
  [ "$(jp svc "$svc" '{.spec.ports[0].name}/{.spec.ports[0].port}/{.spec.ports[0].targetPort}')" = grpc/9000/9000 ] ||
    fail "$svc has no port grpc 9000"
  [ "$(jp svc "$svc" '{.spec.selector.nvidia\.com/dynamo-rank}')" = 0 ] || fail "$svc selects more than gang leaders"
  [ "$(jp svc "$svc" '{.metadata.labels.nvidia\.com/dynamo-discovery}')" = worker ] || fail "$svc has no discovery label"
  # The EndpointSlice controller copies the labels: that is what the frontend watches.
  wait_for "EndpointSlice of $svc labelled for discovery" 30 bash -c \
    "kubectl -n $NS get endpointslices -l nvidia.com/dynamo-graph=$1,nvidia.com/dynamo-discovery=worker,kubernetes.io/service-name=$svc --no-headers | grep -q ."
}

# POD's main container: probes on PORT_NAME, grace period, drain deadline, restricted context.
check_pod_lifecycle() {
  local pod="$1" port="$2" c='{.spec.containers[0]'
  [ "$(jp pod "$pod" "$c.ports[?(@.name==\"$port\")].containerPort}")" != "" ] || fail "$pod declares no port $port"
  [ "$(jp pod "$pod" "$c.readinessProbe.httpGet.path} $c.readinessProbe.httpGet.port}")" = "/health $port" ] ||
    fail "$pod has no readiness probe on /health $port"
  [ "$(jp pod "$pod" "$c.livenessProbe.httpGet.path} $c.startupProbe.httpGet.path} $c.startupProbe.failureThreshold}")" = "/live /live 60" ] ||
    fail "$pod has no liveness/startup probes on /live"
  [ "$(jp pod "$pod" '{.spec.terminationGracePeriodSeconds}')" = 30 ] || fail "$pod grace period is not 30 s"
  [ "$(jp pod "$pod" "$c.env[?(@.name==\"DYN_DRAIN_TIMEOUT\")].value}")" = 25s ] || fail "$pod has no DYN_DRAIN_TIMEOUT 25s"
  [ "$(jp pod "$pod" '{.spec.securityContext.runAsNonRoot} {.spec.securityContext.runAsUser} {.spec.securityContext.seccompProfile.type}')" = \
    "true 65532 RuntimeDefault" ] || fail "$pod has no restricted pod securityContext"
  [ "$(jp pod "$pod" "$c.securityContext.allowPrivilegeEscalation} $c.securityContext.readOnlyRootFilesystem} $c.securityContext.capabilities.drop[0]}")" = \
    "false true ALL" ] || fail "$pod has no restricted container securityContext"
  [ "$(jp pod "$pod" "$c.volumeMounts[?(@.name==\"tmp\")].mountPath}")" = /tmp ] || fail "$pod has no writable /tmp"
}

# The frontend runs as GRAPH-frontend with Kubernetes discovery, and that account may read
# EndpointSlices in its namespace and nothing else.
check_frontend_identity() {
  local graph="$1" pod="$1-$2-0-0" sa="$1-frontend" c='{.spec.containers[0]'
  [ "$(jp pod "$pod" '{.spec.serviceAccountName}')" = "$sa" ] || fail "$pod does not run as $sa"
  [ "$(jp pod "$pod" "$c.env[?(@.name==\"DYN_DISCOVERY\")].value}")" = kubernetes ] || fail "$pod has no DYN_DISCOVERY=kubernetes"
  [ "$(jp pod "$pod" "$c.env[?(@.name==\"DYN_K8S_NAMESPACE\")].valueFrom.fieldRef.fieldPath}")" = metadata.namespace ] ||
    fail "$pod has no DYN_K8S_NAMESPACE from the downward API"
  [ "$(jp pod "$pod" "$c.env[?(@.name==\"DYN_GRAPH\")].value}")" = "$graph" ] || fail "$pod has no DYN_GRAPH"
  local kind
  for kind in serviceaccount role rolebinding; do
    [ "$(jp "$kind" "$sa" '{.metadata.ownerReferences[0].kind}')" = DynamoGraphDeployment ] || fail "no owned $kind $sa"
  done
  [ "$(jp role "$sa" '{.rules[*].apiGroups} {.rules[*].resources} {.rules[*].verbs}')" = \
    '["discovery.k8s.io"] ["endpointslices"] ["get","list","watch"]' ] || fail "role $sa grants $(jp role "$sa" '{.rules}')"
  local as="system:serviceaccount:$NS:$sa"
  [ "$(k auth can-i watch endpointslices.discovery.k8s.io --as "$as")" = yes ] || fail "$sa cannot watch EndpointSlices"
  [ "$(k auth can-i list pods --as "$as" || true)" = no ] || fail "$sa may list pods"
  [ "$(kubectl auth can-i list endpointslices.discovery.k8s.io -n default --as "$as" || true)" = no ] ||
    fail "$sa may read EndpointSlices outside its namespace"
}

pdb_allows() { [ "$(jp pdb "$1" '{.status.expectedPods}/{.status.disruptionsAllowed}')" = "$2" ]; }

# A PodDisruptionBudget per service keeps all gangs but one; the disruption controller can
# evaluate it (integer minAvailable: the graph has no scale subresource).
check_disruption_budgets() {
  [ "$(jp pdb "$1-worker" '{.spec.minAvailable}')" = 1 ] || fail "worker PDB minAvailable is not 1"
  [ "$(jp pdb "$1-frontend" '{.spec.minAvailable}')" = 0 ] || fail "frontend PDB minAvailable is not 0"
  wait_for "worker PDB: 2 pods expected, 1 disruption allowed" 30 pdb_allows "$1-worker" 2/1
}

case_multinode_gang_lands_in_one_rack() {
  k apply -f manifests/disagg-multinode.yaml >/dev/null
  wait_for "disagg-multinode ready" 60 state_is disagg-multinode ready
  local svc gang n racks
  for svc in prefill decode; do
    for gang in 0 1; do
      [ "$(pod_count "nvidia.com/dynamo-graph=disagg-multinode,nvidia.com/dynamo-gang=$gang,nvidia.com/dynamo-service=${svc^}")" -gt 0 ] || continue
      racks="$(for n in $(k get pods -l "nvidia.com/dynamo-graph=disagg-multinode,nvidia.com/dynamo-service=${svc^},nvidia.com/dynamo-gang=$gang" -o 'jsonpath={.items[*].spec.nodeName}'); do
        kubectl get node "$n" -o 'jsonpath={.metadata.labels.topology\.dynamo\.nvidia\.com/rack}'; echo; done | sort -u)"
      log "${svc^}/$gang racks: $(echo $racks)"
      [ "$(wc -l <<<"$racks")" -eq 1 ] || fail "gang ${svc^}/$gang spans racks: $racks"
    done
  done
  [ "$(jp pod disagg-multinode-decode-1-1 '{.spec.containers[0].env[?(@.name=="DYN_LEADER_ADDR")].value}')" = \
    "disagg-multinode-decode-1-0.disagg-multinode-decode-pods.$NS.svc" ] || fail "wrong DYN_LEADER_ADDR"
  # Disaggregation: the graph's KV transfer secret exists, is owned by the graph, and the prefill and
  # decode pods take it, their role and their pod IP.
  [ "$(jp secret disagg-multinode-kv-transfer '{.metadata.ownerReferences[0].name}')" = disagg-multinode ] \
    || fail "no KV transfer secret owned by the graph"
  [ -n "$(jp secret disagg-multinode-kv-transfer '{.data.secret}')" ] || fail "the KV transfer secret is empty"
  [ "$(jp pod disagg-multinode-decode-1-1 '{.spec.containers[0].env[?(@.name=="DYN_KV_TRANSFER_SECRET")].valueFrom.secretKeyRef.name}')" = \
    disagg-multinode-kv-transfer ] || fail "decode pod does not take the KV transfer secret"
  [ "$(jp pod disagg-multinode-decode-1-1 '{.spec.containers[0].env[?(@.name=="DYN_ROLE")].value}')" = decode ] \
    || fail "decode pod has no DYN_ROLE=decode"
  [ "$(jp pod disagg-multinode-decode-1-1 '{.spec.containers[0].env[?(@.name=="POD_IP")].valueFrom.fieldRef.fieldPath}')" = status.podIP ] \
    || fail "decode pod has no POD_IP"
  delete_graph disagg-multinode
}

gated_count() {
  k get pods -l "$1" -o 'jsonpath={range .items[*]}{.spec.schedulingGates[0].name}{"\n"}{end}' | grep -c nvidia.com/gang || true
}
placed_false() { [ "$(jp dgd "$1" '{.status.conditions[?(@.type=="GangsPlaced")].status}')" = False ]; }

case_oversized_gang_waits_then_places_when_a_node_joins() {
  local nodes_per_rack
  nodes_per_rack="$(kubectl get nodes -l topology.dynamo.nvidia.com/rack=zone-a-rack-2 --no-headers | wc -l)"
  local want=$((nodes_per_rack + 1))
  k apply -f - >/dev/null <<EOF
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {name: big}
spec:
  topologyConstraint: {packDomain: rack}
  services:
    Worker:
      componentType: worker
      multinode: {nodeCount: $want}
      resources: {limits: {gpu: "8"}}
EOF
  wait_for "GangsPlaced=False" 30 placed_false big
  local msg
  msg="$(jp dgd big '{.status.conditions[?(@.type=="GangsPlaced")].message}')"
  log "condition: $msg"
  grep -q "gang Worker/0 needs $want nodes with 8 free GPUs each" <<<"$msg" || fail "unclear condition"
  grep -q "inside one rack" <<<"$msg" || fail "condition does not name the rack level"
  k get events --field-selector reason=GangUnschedulable,involvedObject.name=big --no-headers | grep -q . || fail "no event"
  sleep 2
  [ "$(gated_count nvidia.com/dynamo-graph=big)" -eq "$want" ] || fail "pods are not all gated"
  [ "$(running_count nvidia.com/dynamo-graph=big)" -eq 0 ] || fail "part of the gang runs"
  # Room in a rack: one more node joins zone-a-rack-2 (it may already have joined in an earlier run).
  local extra="zone-a-rack-2-node-$want"
  hack/cluster.sh add-node "$extra" zone-a zone-a-rack-2 8 >/dev/null
  wait_for "big ready after a node joined" 30 state_is big ready
  [ "$(running_count nvidia.com/dynamo-graph=big)" -eq "$want" ] || fail "gang not fully running"
  delete_graph big
}

ready_endpoints_eq() { # SERVICE N: the Service's EndpointSlices hold N ready endpoints
  [ "$(k get endpointslices -l "kubernetes.io/service-name=$1" \
    -o 'jsonpath={range .items[*].endpoints[*]}{.conditions.ready}{"\n"}{end}' | grep -c true)" -eq "$2" ]
}
adapter_replicas_is() { [ "$(jp dgdsa "$1" '{.status.replicas}')" = "$2" ]; }

case_scaling_the_adapter_adds_and_removes_gangs() {
  k apply -f manifests/agg.yaml >/dev/null
  wait_for "agg ready" 60 state_is agg ready
  k scale dgdsa agg-worker --replicas 4 >/dev/null
  wait_for "4 worker gangs running" 30 pods_running_eq nvidia.com/dynamo-service=Worker 4
  wait_for "adapter reports 4" 30 adapter_replicas_is agg-worker 4
  wait_for "worker PDB keeps 3 of 4 gangs" 30 pdb_allows agg-worker 4/1
  [ "$(jp pdb agg-worker '{.spec.minAvailable}')" = 3 ] || fail "worker PDB minAvailable is not 3"
  wait_for "4 ready worker endpoints" 30 ready_endpoints_eq agg-worker 4
  [ "$(jp dgd agg '{.status.services.Worker.replicas}')" = 4 ] || wait_for "status says 4" 10 \
    bash -c "[ \"\$(kubectl -n $NS get dgd agg -o jsonpath='{.status.services.Worker.replicas}')\" = 4 ]"
  k scale dgdsa agg-worker --replicas 1 >/dev/null
  wait_for "1 worker gang" 30 pods_running_eq nvidia.com/dynamo-service=Worker 1
  [ -n "$(jp pod agg-worker-0-0 '{.metadata.name}')" ] || fail "gang 0 was removed instead of the highest"
  wait_for "adapter reports 1" 30 adapter_replicas_is agg-worker 1
  wait_for "agg ready" 30 state_is agg ready
  [ "$(jp pdb agg-worker '{.spec.minAvailable}')" = 0 ] || fail "worker PDB minAvailable is not 0 at 1 gang"
  delete_graph agg
}

# A disaggregated graph's pools planned apart, each raised to its own floor through its own
# adapter, and a restarted operator that goes on from what the planner had learned (kept in
# status.planner.learned) instead of starting over.
case_planner_plans_prefill_and_decode_apart_and_goes_on_after_a_restart() {
  local g=disagg-planner
  sed -e 's/interval: 60s/interval: 2s/' manifests/disagg-planner.yaml | k apply -f - >/dev/null
  wait_for "$g placed" 60 state_is $g ready
  wait_for "the planner holds both pools without metrics" 30 \
    bash -c "[ \"\$(kubectl -n $NS get dgd $g -o jsonpath='{.status.planner.path}')\" = hold ]"
  [ "$(jp dgd $g '{.status.planner.replicas.Prefill}'),$(jp dgd $g '{.status.planner.replicas.Decode}')" = 1,1 ] ||
    fail "status.planner.replicas is $(jp dgd $g '{.status.planner.replicas}')"
  k get dgd $g | grep -q "Prefill 1->1, Decode 1->1 (hold)" || fail "kubectl get dgd: $(k get dgd $g)"
  k scale dgdsa $g-decode --replicas 0 >/dev/null
  wait_for "the decode pool raised to its floor of 1" 30 adapter_spec_is $g-decode 1
  adapter_spec_is $g-prefill 1 || fail "the prefill pool moved: $(jp dgdsa $g-prefill '{.spec.replicas}')"
  wait_for "1 decode gang" 30 pods_running_eq "nvidia.com/dynamo-graph=$g,nvidia.com/dynamo-service=Decode" 1
  # What the planner learned, as a predecessor would have left it, then a restart.
  stop_operator TERM
  k patch dgd $g --subresource=status --type=merge -p \
    '{"status":{"planner":{"learned":{"headroomTtft":0.3,"headroomItl":0.5,"correctionTtft":1.5,"correctionItl":1.25,"remoteShare":0.8,"remoteIsl":3000}}}}' >/dev/null
  local before
  before="$(jp dgd $g '{.status.planner.time}')"
  start_operator
  wait_for "a decision after the restart" 30 \
    bash -c "[ \"\$(kubectl -n $NS get dgd $g -o jsonpath='{.status.planner.time}')\" != '$before' ]"
  [ "$(jp dgd $g '{.status.planner.learned.headroomTtft}')" = 0.3 ] &&
    [ "$(jp dgd $g '{.status.planner.learned.correctionItl}')" = 1.25 ] &&
    [ "$(jp dgd $g '{.status.planner.learned.remoteShare}')" = 0.8 ] ||
    fail "the restarted planner started over: $(jp dgd $g '{.status.planner.learned}')"
  grep -q "planner goes on from its status" "$OP_LOG" || fail "the operator did not say it restored the planner"
  delete_graph $g
}

# Prometheus from Debian's package (a real Prometheus, not built here): the binary alone,
# unpacked into the cache once per version.
PROM_VERSION=2.42.0+ds-5+deb12u1
prometheus_bin() {
  local dir="$CACHE/tools/prometheus-$PROM_VERSION" tmp
  if [ ! -x "$dir/usr/bin/prometheus" ]; then
    tmp="$(mktemp -d)"
    ( cd "$tmp" && { apt-get download "prometheus=$PROM_VERSION" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get download "prometheus=$PROM_VERSION" >/dev/null 2>&1; } ||
      apt-get download prometheus >/dev/null 2>&1; } ) || { rm -rf "$tmp"; return 1; }
    rm -rf "$dir.part"
    dpkg -x "$tmp"/prometheus_*.deb "$dir.part" && mv "$dir.part" "$dir"
    rm -rf "$tmp"
  fi
  echo "$dir/usr/bin/prometheus"
}

prometheus_case_cleanup() { # DIR: stops the load, serve and Prometheus; shows serve's log on failure
  local dir="$1" pid i
  touch "$dir/stop"
  for pid in $(cat "$dir"/*.pid 2>/dev/null); do
    kill "$pid" 2>/dev/null || continue
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "process $pid still running 20 s after SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  if [ ! -e "$dir/passed" ] || ! grep -q "dynamo serve: stopped" "$dir/serve.log" 2>/dev/null; then
    log "dynamo serve's log (tail):"; tail -25 "$dir/serve.log" >&2 || true
  fi
}

# The planner reading a graph's frontend metrics from Prometheus (spec.planner.prometheus): a
# real frontend with built-in-engine workers runs on this host (`dynamo serve`), a real
# Prometheus scrapes it with the labels a ServiceMonitor on the graph's frontend Service would
# give, and load on that frontend makes the operator's planner scale the graph's adapter up,
# then down once the load stops.
case_planner_reads_prometheus_and_scales_the_adapter_with_the_load() {
  local dir="$CLUSTER_STATE/prometheus-case" prom api pport=$((METRICS_PORT + 7)) i peak
  [ -n "$CLUSTER_STATE" ] || fail "no CLUSTER_STATE"
  rm -rf "$dir" && mkdir -p "$dir/tsdb"
  prom="$(prometheus_bin)" || fail "could not fetch Debian's prometheus package"
  # (expanded now: the trap runs after this function's locals are gone)
  trap "prometheus_case_cleanup '$dir'" EXIT
  "$DYNAMO_BIN" serve manifests/planner.yaml --planner off --workers 1 --speedup-ratio 10 \
    --host 127.0.0.1 --port 0 >/dev/null 2>"$dir/serve.log" &
  echo $! >"$dir/serve.pid"
  wait_for "a local frontend" 60 grep -q "frontend on http" "$dir/serve.log"
  api="$(grep -o 'frontend on http://[0-9.:]*' "$dir/serve.log" | head -1 | sed 's/^frontend on //')"
  printf '%s\n' \
    'global: {scrape_interval: 1s, evaluation_interval: 1s}' \
    'scrape_configs:' \
    '  - job_name: planner-frontend' \
    '    static_configs:' \
    "      - targets: [\"${api#http://}\"]" \
    "        labels: {namespace: \"$NS\", service: \"planner-frontend\"}" >"$dir/prometheus.yml"
  "$prom" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
    --web.listen-address="127.0.0.1:$pport" >"$dir/prometheus.log" 2>&1 &
  echo $! >"$dir/prometheus.pid"
  wait_for "Prometheus ready" 60 curl -sf "http://127.0.0.1:$pport/-/ready"
  # Ours, not one a killed run left on the port (that one would read another frontend).
  sleep 1
  kill -0 "$(cat "$dir/prometheus.pid")" 2>/dev/null ||
    fail "Prometheus exited (is 127.0.0.1:$pport taken?): $(tail -3 "$dir/prometheus.log")"
  # 4,000-token prompts of token ids.
  { printf '{"model": "tiny", "max_tokens": 20, "ignore_eos": true, "prompt": ['
    seq 0 3999 | awk '{printf "%s%d", (NR > 1 ? "," : ""), 300 + ($1 * 31) % 7800}'
    printf ']}'; } >"$dir/request.json"
  sed -e 's/interval: 60s/interval: 2s/' \
    -e "s|^    gpuBudget: 10|    gpuBudget: 10\n    prometheus:\n      url: http://127.0.0.1:$pport|" \
    manifests/planner.yaml | k apply -f - >/dev/null
  [ "$(jp dgd planner '{.spec.planner.prometheus.url}')" = "http://127.0.0.1:$pport" ] ||
    fail "the graph has no spec.planner.prometheus.url"
  wait_for "planner graph placed" 60 state_is planner ready
  # Prometheus has the idle frontend's counters: interval decisions on them (no load: towards
  # the floor), not holds.
  wait_for "the planner decides on what Prometheus holds" 30 planner_is path predictive
  local loops=()
  for i in 1 2 3 4 5 6 7 8; do
    ( while [ ! -e "$dir/stop" ]; do
        curl -s -o /dev/null -H 'content-type: application/json' -d @"$dir/request.json" \
          "$api/v1/completions" || sleep 0.1
      done ) &
    loops+=($!)
  done
  up() { [ "$(jp dgdsa planner-worker '{.spec.replicas}')" -ge 4 ]; }
  wait_for "the planner scales up on the load Prometheus saw" 60 up
  peak="$(jp dgdsa planner-worker '{.spec.replicas}')"
  [ "$peak" -le 8 ] || fail "past maxReplicas: $peak"
  jp dgd planner '{.status.planner.observed.requestsPerSecond}' | grep -Eq '^[0-9.e+-]+$' ||
    fail "no observed load in status.planner"
  log "planner from Prometheus: 2 -> $peak replicas; $(jp dgd planner '{.status.planner.summary}')"
  touch "$dir/stop"
  wait "${loops[@]}" || true
  down() { [ "$(jp dgdsa planner-worker '{.spec.replicas}')" -lt "$peak" ]; }
  wait_for "the planner scales down once the load stops" 60 down
  delete_graph planner
  touch "$dir/passed"
}

planner_is() { # FIELD VALUE: status.planner.FIELD
  [ "$(jp dgd planner "{.status.planner.$1}")" = "$2" ]
}
adapter_spec_is() { [ "$(jp dgdsa "$1" '{.spec.replicas}')" = "$2" ]; }

# The operator's planner with no frontend to read (kwok pods serve nothing): it holds the fleet,
# raises it to the floor, scales through the adapter's scale subresource with the chart's RBAC,
# and steps back while an HPA targets the adapter.
case_planner_holds_without_metrics_keeps_the_floor_and_steps_back_for_an_hpa() {
  sed -e 's/interval: 60s/interval: 2s/' manifests/planner.yaml | k apply -f - >/dev/null
  wait_for "planner graph placed" 60 state_is planner ready
  wait_for "the planner holds without metrics" 30 planner_is path hold
  planner_is mode active || fail "planner mode is $(jp dgd planner '{.status.planner.mode}')"
  adapter_spec_is planner-worker 2 || fail "the planner moved the fleet without data"
  k get dgd planner | grep -q PLANNER || fail "kubectl get dgd has no PLANNER column"
  k scale dgdsa planner-worker --replicas 0 >/dev/null
  wait_for "the planner raises the fleet to its floor of 1" 30 adapter_spec_is planner-worker 1
  wait_for "1 worker gang" 30 pods_running_eq "nvidia.com/dynamo-graph=planner,nvidia.com/dynamo-service=Worker" 1
  kubectl apply -n "$NS" -f - >/dev/null <<'YAML'
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: planner-worker}
spec:
  scaleTargetRef: {apiVersion: nvidia.com/v1alpha1, kind: DynamoGraphDeploymentScalingAdapter, name: planner-worker}
  minReplicas: 1
  maxReplicas: 3
  metrics: [{type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}}]
YAML
  wait_for "the planner steps back for the HPA" 30 planner_is mode stepped-back
  jp dgd planner '{.status.planner.reason}' | grep -q "HorizontalPodAutoscaler planner-worker" ||
    fail "status.planner.reason does not name the HPA: $(jp dgd planner '{.status.planner.reason}')"
  k get events --field-selector involvedObject.name=planner -o 'jsonpath={.items[*].reason}' | grep -q PlannerSteppedBack ||
    fail "no PlannerSteppedBack event"
  k delete hpa planner-worker >/dev/null
  wait_for "the planner acts again" 30 planner_is mode active
  curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -q '^dynamo_operator_planner_decisions_total{' ||
    fail "no dynamo_operator_planner_decisions_total"
  delete_graph planner
}

ready_gangs_with_hash() {
  k get pods -l nvidia.com/dynamo-service=Worker -o \
    "jsonpath={range .items[*]}{.metadata.labels.nvidia\.com/dynamo-template-hash} {.status.conditions[?(@.type==\"Ready\")].status}{\"\n\"}{end}"
}
updated_is() { [ "$(jp dgd agg '{.status.services.Worker.updatedReplicas}')" = "$1" ] && state_is agg ready; }

case_template_change_rolls_without_dropping_below_the_floor() {
  k apply -f manifests/agg.yaml >/dev/null
  wait_for "agg ready" 60 state_is agg ready
  k scale dgdsa agg-worker --replicas 3 >/dev/null
  wait_for "agg ready with 3" 60 updated_is 3
  local old
  old="$(jp pod agg-worker-0-0 '{.metadata.labels.nvidia\.com/dynamo-template-hash}')"
  # A template no node can hold: the roll must stop after one gang, with 2 of 3 gangs still ready.
  k patch dgd agg --type=merge -p '{"spec":{"services":{"Worker":{"resources":{"limits":{"gpu":"64"}}}}}}' >/dev/null
  wait_for "GangsPlaced=False" 30 placed_false agg
  local i ready
  for i in $(seq 1 15); do
    ready="$(ready_gangs_with_hash | grep -c "^$old True" || true)"
    [ "$ready" -ge 2 ] || { fail "only $ready old gangs ready during the roll"; return 1; }
    sleep 0.2
  done
  [ "$(gated_count nvidia.com/dynamo-service=Worker)" -eq 1 ] || fail "want exactly one new (gated) gang"
  # A template that fits: the roll completes.
  k patch dgd agg --type=merge -p '{"spec":{"services":{"Worker":{"resources":{"limits":{"gpu":"2"}}}}}}' >/dev/null
  wait_for "3 updated gangs" 60 updated_is 3
  [ "$(ready_gangs_with_hash | grep -c "^$old " || true)" -eq 0 ] || fail "old pods left"
  [ "$(jp pod agg-worker-2-0 '{.spec.containers[0].resources.limits.nvidia\.com/gpu}')" = 2 ] || fail "new template not applied"
  k get events --field-selector reason=RollingUpdate,involvedObject.name=agg --no-headers | grep -q . || fail "no RollingUpdate event"
}

case_deleting_the_graph_removes_everything() {
  k get dgd agg >/dev/null 2>&1 || { k apply -f manifests/agg.yaml >/dev/null; wait_for "agg ready" 60 state_is agg ready; }
  [ "$(k get "$OWNED_KINDS" -l nvidia.com/dynamo-graph=agg --no-headers | wc -l)" -gt 0 ] || fail "agg owns nothing"
  k delete dgd agg --wait=true >/dev/null
  wait_for "pods, Services, adapters, PDBs, ServiceAccount, Role, RoleBinding of agg gone" 60 nothing_left agg
}

# The last candidate set the discovery process printed, as sorted space-separated URLs.
candidates() {
  tail -n 1 "$1" 2>/dev/null | python3 -c 'import json, sys; print(" ".join(sorted(json.load(sys.stdin)["candidates"])))'
}
candidates_are() { [ "$(candidates "$1")" = "$2" ]; }
# gRPC URLs of the named pods (their current IPs), sorted.
urls_of() {
  local p
  for p in "$@"; do echo "http://$(jp pod "$p" '{.status.podIP}'):9000"; done | sort | xargs
}
set_ready() { # POD True|False: what a kubelet reports after a readiness probe (kwok only readies Pending pods)
  k patch pod "$1" --subresource=status --type=strategic \
    -p "{\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"$2\"}]}}" >/dev/null
}
new_pod_running() { # POD OLD_UID
  [ "$(jp pod "$1" '{.metadata.uid}')" != "$2" ] && [ -n "$(jp pod "$1" '{.status.podIP}')" ] &&
    [ "$(jp pod "$1" '{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

case_kubernetes_discovery_follows_worker_readiness() {
  # What a frontend pod of agg sees: the discovery code of `dynamo frontend --discovery
  # kubernetes`, authenticated as the graph's frontend ServiceAccount.
  k apply -f manifests/agg.yaml >/dev/null
  wait_for "agg ready" 60 state_is agg ready
  local kc="$CLUSTER_STATE/agg-frontend.kubeconfig" out="$CLUSTER_STATE/discover.jsonl" pid all one
  hack/cluster.sh sa-kubeconfig "$NS" agg-frontend "$kc" >/dev/null
  if KUBECONFIG="$kc" kubectl get pods >/dev/null 2>&1; then fail "the frontend account may read pods"; fi
  : >"$out"
  KUBECONFIG="$kc" "$DISCOVER_BIN" --namespace "$NS" --graph agg >"$out" 2>"$out.err" &
  pid=$!
  # shellcheck disable=SC2064
  trap "kill $pid 2>/dev/null || true" EXIT
  all="$(urls_of agg-worker-0-0 agg-worker-1-0)"
  wait_for "both workers as candidates ($all)" 30 candidates_are "$out" "$all" ||
    { log "discover printed: $(cat "$out" "$out.err")"; return 1; }
  [ "$(wc -w <<<"$all")" -eq 2 ] && grep -q ':9000 ' <<<"$all " || fail "want 2 URLs on port 9000, have: $all"
  log "candidates: $all"
  # Readiness drops (a kubelet whose probe got 503): the worker leaves the set; back when Ready.
  set_ready agg-worker-1-0 False
  one="$(urls_of agg-worker-0-0)"
  wait_for "only agg-worker-0-0 after agg-worker-1-0 turned NotReady" 15 candidates_are "$out" "$one"
  log "agg-worker-1-0 NotReady -> candidates: $(candidates "$out")"
  set_ready agg-worker-1-0 True
  wait_for "both workers again" 15 candidates_are "$out" "$all"
  # A worker pod is deleted: the operator recreates its gang; the set follows to the new pod.
  local uid lines
  uid="$(jp pod agg-worker-0-0 '{.metadata.uid}')"
  lines="$(wc -l <"$out")"
  k delete pod agg-worker-0-0 --wait=false >/dev/null
  wait_for "agg-worker-0-0 recreated and Ready" 60 new_pod_running agg-worker-0-0 "$uid"
  all="$(urls_of agg-worker-0-0 agg-worker-1-0)"
  wait_for "candidates follow the new pod ($all)" 30 candidates_are "$out" "$all"
  log "after deleting agg-worker-0-0, sets printed: $(tail -n +"$((lines + 1))" "$out" | paste -sd ' ')"
  kill "$pid" 2>/dev/null || true
  delete_graph agg
}

all_owned_and_unique() {
  # every pod of the graph has exactly one controller owner and names are gang-rank unique
  local n
  n="$(k get pods -l "nvidia.com/dynamo-graph=$1" -o 'jsonpath={range .items[*]}{.metadata.labels.nvidia\.com/dynamo-service}/{.metadata.labels.nvidia\.com/dynamo-gang}/{.metadata.labels.nvidia\.com/dynamo-rank}{"\n"}{end}' | sort | uniq -d | wc -l)"
  [ "$n" -eq 0 ]
}

no_node_overbooked() {
  kubectl get pods -A -o 'jsonpath={range .items[*]}{.spec.nodeName} {.spec.containers[0].resources.limits.nvidia\.com/gpu}{"\n"}{end}' |
    awk 'NF==2 {g[$1]+=$2} END {for (n in g) if (g[n] > 8) {print n, g[n]; bad=1}; exit bad}'
}

case_operator_killed_mid_reconcile_converges_without_duplicates() {
  wide_graph wide 16 4 | k apply -f - >/dev/null
  # Let it get part way (some pods created, some gangs placed), then SIGKILL it.
  wait_for "first pods created" 30 bash -c "[ \$(kubectl -n $NS get pods -l nvidia.com/dynamo-graph=wide --no-headers 2>/dev/null | wc -l) -ge 1 ]"
  stop_operator KILL
  log "killed the operator with $(pod_count nvidia.com/dynamo-graph=wide) pods created"
  start_operator
  wait_for "wide ready after restart" 120 state_is wide ready
  [ "$(pod_count nvidia.com/dynamo-graph=wide)" -eq 64 ] || fail "want 64 pods, have $(pod_count nvidia.com/dynamo-graph=wide)"
  all_owned_and_unique wide || fail "duplicate gang ranks"
  no_node_overbooked || fail "a node got more GPUs than it has"
  [ "$(k get dgdsa -l nvidia.com/dynamo-graph=wide --no-headers | wc -l)" -eq 16 ] || fail "want 16 adapters"
  delete_graph wide
}

case_metrics_and_health_are_served() {
  local m
  m="$(curl -sf "http://127.0.0.1:$METRICS_PORT/metrics")"
  grep -q '^dynamo_operator_reconciles_total [1-9]' <<<"$m" || fail "no reconcile counter"
  grep -q '^dynamo_operator_reconcile_duration_seconds_bucket' <<<"$m" || fail "no duration histogram"
  grep -q '^dynamo_operator_leader 1' <<<"$m" || fail "not leader"
  curl -sf "http://127.0.0.1:$METRICS_PORT/healthz" | grep -q ok || fail "healthz"
}

metric_is() { curl -sf "http://127.0.0.1:$1/metrics" | grep -q "^$2\$"; }

case_standby_takes_over_when_the_leader_stops() {
  # A second operator waits on the Lease and does nothing while the first leads.
  local port2=$((METRICS_PORT + 1)) pid2
  KUBECONFIG="$CLUSTER_STATE/operator.kubeconfig" \
    DYN_METRICS_ADDR="127.0.0.1:$port2" DYN_LEASE_NAMESPACE=dynamo-system \
    DYN_LEASE_DURATION="${E2E_LEASE_DURATION:-6s}" DYN_LOG="${DYN_LOG:-info,kube=warn}" \
    "$OP_BIN" >>"$OP_LOG.standby" 2>&1 &
  pid2=$!
  wait_for "standby serves /healthz" 30 curl -sf "http://127.0.0.1:$port2/healthz"
  sleep 3
  metric_is "$port2" "dynamo_operator_leader 0" || { kill "$pid2"; fail "standby leads next to the leader"; }
  # SIGTERM: the leader releases the Lease on its way out, so the standby takes over at once.
  local t0=$(date +%s.%N)
  stop_operator TERM
  wait_for "standby leads" 15 metric_is "$port2" "dynamo_operator_leader 1" || { kill "$pid2"; exit 1; }
  log "takeover after SIGTERM: $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s"
  echo "$pid2" >"$OP_PID_FILE"
  k apply -f manifests/agg.yaml >/dev/null
  wait_for "agg ready under the new leader" 60 state_is agg ready
  delete_graph agg
  # Back to a leader on the usual port for the cases after this one.
  stop_operator TERM
  start_operator
}

# === measurements (E2E_MEASURE=1) ===

quantiles() {
  # p50 and p99 (ms) of the reconcile histogram, interpolated within buckets.
  curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | python3 -c '
import sys, re
b = []
for l in sys.stdin:
    m = re.match(r"dynamo_operator_reconcile_duration_seconds_bucket\{le=\"([^\"]+)\"\} (\S+)", l)
    if m: b.append((float(m.group(1)), float(m.group(2))))
total = b[-1][1]
def q(p):
    want, prev_le, prev_c = p * total, 0.0, 0.0
    for le, c in b:
        if c >= want:
            if le == float("inf"): return prev_le * 1000
            return (prev_le + (le - prev_le) * (want - prev_c) / max(c - prev_c, 1e-9)) * 1000
        prev_le, prev_c = le, c
print(f"reconciles={int(total)} p50_ms={q(0.5):.2f} p99_ms={q(0.99):.2f}")'
}

case_measure() {
  [ "${E2E_MEASURE:-0}" = 1 ] || { log "skipped (set E2E_MEASURE=1)"; return 0; }
  local t0 t1
  t0=$(date +%s.%N)
  wide_graph wide 16 4 | k apply -f - >/dev/null
  wait_for "64 pods Running" 180 pods_running_eq nvidia.com/dynamo-graph=wide 64
  t1=$(date +%s.%N)
  log "FIGURE apply -> 64 pods Running (16 services x 4 gangs): $(echo "$t1 - $t0" | bc) s"
  wait_for "wide ready" 60 state_is wide ready
  delete_graph wide
  # 100 graphs: frontend + one 1-GPU worker each.
  stop_operator TERM
  start_operator
  local i
  t0=$(date +%s.%N)
  for i in $(seq 1 100); do
    printf 'apiVersion: nvidia.com/v1alpha1\nkind: DynamoGraphDeployment\nmetadata: {name: g%s}\nspec:\n  services:\n    Frontend: {componentType: frontend}\n    Worker: {componentType: worker, resources: {limits: {gpu: "1"}}}\n---\n' "$i"
  done | k apply -f - >/dev/null
  wait_for "100 graphs ready" 300 bash -c "[ \$(kubectl -n $NS get dgd --no-headers | grep -c ' ready ') -ge 100 ]"
  t1=$(date +%s.%N)
  log "FIGURE 100 graphs (200 pods) apply -> all ready: $(echo "$t1 - $t0" | bc) s"
  log "FIGURE operator RSS at 100 graphs: $(awk '/VmRSS/ {print $2/1024 " MiB"}' "/proc/$(op_pid)/status") (peak $(awk '/VmHWM/ {print $2/1024 " MiB"}' "/proc/$(op_pid)/status"))"
  log "FIGURE reconcile latency at 100 graphs: $(quantiles)"
  k delete dgd --all --wait=true >/dev/null
}

# === main ===

selected() {
  [ ${#FILTER[@]} -eq 0 ] && return 0
  local w
  for w in "${FILTER[@]}"; do [[ "$1" == *"$w"* ]] && return 0; done
  return 1
}

run_case() {
  local name="$1" t0 t1
  selected "$name" || return 0
  t0=$(date +%s.%N)
  log "--- $name"
  if ( set -e; "case_$name" ); then
    PASSED=$((PASSED + 1))
    t1=$(date +%s.%N)
    log "ok   $name ($(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s)"
  else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$name")
    log "FAILED $name; operator log tail:"
    tail -n 20 "$OP_LOG" >&2 || true
  fi
}

log "tools and cluster"
hack/tools.sh >/dev/null
# A fresh cluster every run: cases count on the default nodes and free GPUs.
hack/cluster.sh down >/dev/null 2>&1 || true
hack/cluster.sh up >/dev/null
eval "$(hack/cluster.sh env)"
log "building the operator and the discovery example"
nice -n 19 cargo build -q -p dynamo-operator -p dynamo-frontend -p dynamo-dataplane --bin dynamo-operator --bin dynamo --example discover
log "helm install"
helm upgrade --install dynamo-platform charts/dynamo-platform -n dynamo-system --create-namespace \
  --set replicaCount=0 --wait >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
hack/cluster.sh sa-kubeconfig dynamo-system dynamo-platform "$CLUSTER_STATE/operator.kubeconfig" >/dev/null
: >"$OP_LOG"
start_operator

run_case invalid_manifest_is_refused
run_case agg_is_placed_running_and_ready
run_case multinode_gang_lands_in_one_rack
run_case oversized_gang_waits_then_places_when_a_node_joins
run_case scaling_the_adapter_adds_and_removes_gangs
run_case template_change_rolls_without_dropping_below_the_floor
run_case deleting_the_graph_removes_everything
run_case planner_holds_without_metrics_keeps_the_floor_and_steps_back_for_an_hpa
run_case planner_plans_prefill_and_decode_apart_and_goes_on_after_a_restart
run_case planner_reads_prometheus_and_scales_the_adapter_with_the_load
run_case kubernetes_discovery_follows_worker_readiness
run_case operator_killed_mid_reconcile_converges_without_duplicates
run_case metrics_and_health_are_served
run_case standby_takes_over_when_the_leader_stops
run_case measure

SUITE_END=$(date +%s.%N)
log "suite time: $(printf '%.1f' "$(echo "$SUITE_END - $SUITE_START" | bc)") s"
[ "$FAILED" -eq 0 ] || log "failed: ${FAILED_NAMES[*]}"
echo "operator-e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
