#!/usr/bin/env bash
# The graph served through Kubernetes on a real node: containerd, runc, CNI, kubelet and kube-proxy
# (hack/cluster.sh), the images made by hack/image.sh, the operator installed by `helm install` and
# running as a pod, `manifests/agg.yaml` applied and pinned to the real node, and the official
# `openai` client talking to the frontend's ClusterIP Service while pods come and go.
#
#   e2e/realnode/run.sh                 # all cases; prints "N passed, M failed"
#   e2e/realnode/run.sh serve kill      # only cases whose name contains one of the words
#
# Env: PYTHON (a python with the `openai` package; hack/test.sh passes its venv's), KEEP_CLUSTER=1
#      leaves the cluster up, CLUSTER_STATE / CLUSTER_PORT_BASE as hack/cluster.sh (own defaults
#      here), DYNAMO_CACHE / CARGO_TARGET_DIR as hack/test.sh. Needs root (the real node does).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
export DYNAMO_CACHE="$CACHE"
export CLUSTER_STATE="${CLUSTER_STATE:-$CACHE/cluster-e2e-realnode}"
export CLUSTER_PORT_BASE="${CLUSTER_PORT_BASE:-26800}"
export REAL_NODE=1
PYTHON="${PYTHON:-python3}"
CLIENT="$ROOT/e2e/realnode/client.py"
NS=e2e-real
OP_NS=dynamo-system
GRAPH=agg
WORK="$CLUSTER_STATE/e2e"
FILTER=("$@")
PASSED=0
FAILED=0
FAILED_NAMES=()
SUITE_START=$SECONDS

log() { printf '\033[1m[realnode]\033[0m %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
# Cases run in subshells: figures go to a file, printed at the end.
figure() { echo "$*" >>"$WORK/figures.txt"; log "figure: $*"; }

# wait_for DESCRIPTION TIMEOUT_S COMMAND...: polls COMMAND every 0.5 s until it succeeds.
wait_for() {
  local what="$1" timeout="$2"
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "timed out after ${timeout}s waiting for: $what"
    sleep 0.5
  done
}

k() { kubectl -n "$NS" "$@"; }
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc)"; }
WORKERS="nvidia.com/dynamo-graph=$GRAPH,nvidia.com/dynamo-service=Worker"
FRONTEND="nvidia.com/dynamo-graph=$GRAPH,nvidia.com/dynamo-service=Frontend"

# ready_pods SELECTOR [FIELD]: the name (or another metadata FIELD, e.g. uid) of each Running,
# Ready, not terminating pod.
ready_pods() {
  k get pods -l "$1" -o json | "$PYTHON" -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
    if p["metadata"].get("deletionTimestamp") is None and p["status"].get("phase") == "Running" and conds.get("Ready") == "True":
        print(p["metadata"][sys.argv[1]])' "${2:-name}"
}
all_pods() { k get pods -l "$1" -o name | sed 's|^pod/||'; }
# Pod UIDs: a replaced gang member keeps its name (graph-service-gang-rank).
pod_uids() { k get pods -l "$1" -o 'jsonpath={range .items[*]}{.metadata.uid}{"\n"}{end}' | sort; }
ready_uids() { ready_pods "$1" uid | sort; }
ready_count_is() { [ "$(ready_pods "$1" | wc -l)" -eq "$2" ] && [ "$(all_pods "$1" | wc -l)" -eq "$2" ]; }
pod_ip() { k get pod "$1" -o 'jsonpath={.status.podIP}'; }
# Requests a worker pod has accepted, from its own /metrics (port 9000, beside gRPC).
worker_requests() {
  curl -sf --max-time 2 "http://$(pod_ip "$1"):9000/metrics" |
    awk '/^dynamo_component_requests_total/ { print int($NF); found = 1 } END { if (!found) print 0 }'
}
worker_served() { [ "$(worker_requests "$1")" -gt 0 ]; }

frontend_url() {
  local svc
  svc="$(k get svc -l "nvidia.com/dynamo-graph=$GRAPH" -o name | sed 's|^service/||' | grep frontend | head -n1)"
  [ -n "$svc" ] || return 1
  echo "http://$(k get svc "$svc" -o 'jsonpath={.spec.clusterIP}'):$(k get svc "$svc" -o 'jsonpath={.spec.ports[0].port}')"
}

# Load: 16 streams without pause, from here through the ClusterIP, until stop_load.
start_load() { # name
  rm -f "$WORK/$1.stop" "$WORK/$1.json"
  "$PYTHON" "$CLIENT" load "$(frontend_url)" --concurrency 16 --stop-file "$WORK/$1.stop" \
    --out "$WORK/$1.json" >"$WORK/$1.log" 2>&1 &
  echo $! >"$WORK/$1.pid"
  sleep 2
}
stop_load() { # name -> prints "ok failed"
  local pid deadline=$((SECONDS + 120))
  touch "$WORK/$1.stop"
  pid="$(cat "$WORK/$1.pid")"
  # Polled, not `wait`ed: callers run this in a process substitution, which is not the load's parent.
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  [ -s "$WORK/$1.json" ] || { cat "$WORK/$1.log" >&2; fail "load generator $1 wrote no result"; }
  "$PYTHON" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["ok"], r["failed"]); [print(e, file=sys.stderr) for e in r["errors"]]' "$WORK/$1.json"
}
expect_no_failures() { # name what
  local ok failed
  read -r ok failed < <(stop_load "$1")
  figure "$2: $failed failed of $((ok + failed)) requests (16 concurrent streams)"
  [ "$ok" -gt 0 ] || fail "$2: no request succeeded"
  [ "$failed" -eq 0 ] || fail "$2: $failed requests failed"
}

cleanup() {
  local rc=$?
  for f in "$WORK"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  if [ $rc -ne 0 ] || [ "$FAILED" -gt 0 ]; then
    log "diagnostics"
    kubectl get nodes,pods -A -o wide 2>&1 | tail -n 30 >&2 || true
    kubectl get events -A --sort-by=.lastTimestamp 2>&1 | tail -n 25 >&2 || true
  fi
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then hack/cluster.sh down >/dev/null 2>&1 || true; fi
  exit $rc
}
trap cleanup EXIT

# manifests/agg.yaml (or $1), each service pinned to the real node (nodeSelector + toleration).
pinned_graph() {
  kubectl create --dry-run=client -o json -f "${1:-manifests/agg.yaml}" | "$PYTHON" -c '
import json, sys
g = json.load(sys.stdin)
g["metadata"].pop("namespace", None)
for svc in g["spec"]["services"].values():
    extra = svc.setdefault("extraPodSpec", {})
    extra["nodeSelector"] = {"dynamo.nvidia.com/node": "real"}
    extra["tolerations"] = [{"key": "dynamo.nvidia.com/real-node", "operator": "Exists", "effect": "NoSchedule"}]
json.dump(g, sys.stdout)'
}

# === cases ===

case_operator_runs_as_a_pod_and_leads() {
  local pod holder
  helm upgrade --install dynamo-platform charts/dynamo-platform -n "$OP_NS" --create-namespace \
    -f e2e/realnode/values.yaml >/dev/null
  wait_for "operator pod Ready" 120 kubectl -n "$OP_NS" wait --for=condition=Ready pod \
    -l app.kubernetes.io/name=dynamo-operator --timeout=5s
  pod="$(kubectl -n "$OP_NS" get pod -l app.kubernetes.io/name=dynamo-operator -o 'jsonpath={.items[0].metadata.name}')"
  [ "$(kubectl -n "$OP_NS" get pod "$pod" -o 'jsonpath={.spec.nodeName}')" = real-node ] || fail "operator not on the real node"
  leader_is() { [ "$(kubectl -n "$OP_NS" get lease dynamo-operator -o 'jsonpath={.spec.holderIdentity}' 2>/dev/null)" = "$1" ]; }
  wait_for "operator $pod holds the lease" 60 leader_is "$pod"
  holder="$(kubectl -n "$OP_NS" get lease dynamo-operator -o 'jsonpath={.spec.holderIdentity}')"
  log "operator $pod runs on real-node and leads (lease holder $holder)"
}

case_graph_serves_through_its_cluster_ip() {
  local t0 first url
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  t0=$(now)
  pinned_graph | k apply -f - >/dev/null
  wait_for "frontend Service" 60 frontend_url
  url="$(frontend_url)"
  first="$("$PYTHON" "$CLIENT" first-token "$url" --timeout 240)" || fail "no token from $url"
  figure "kubectl apply to first streamed token: $(since "$t0") s (of which ${first} s polling the ClusterIP until a worker answered)"
  wait_for "2 workers and the frontend Ready" 120 ready_count_is "$WORKERS" 2
  ready_count_is "$FRONTEND" 1 || fail "frontend not Ready"
  for p in $(all_pods "nvidia.com/dynamo-graph=$GRAPH"); do
    [ "$(k get pod "$p" -o 'jsonpath={.spec.nodeName}')" = real-node ] || fail "$p is not on the real node"
  done
  wait_for "graph state ready" 60 bash -c "[ \"\$(kubectl -n $NS get dgd $GRAPH -o jsonpath='{.status.state}')\" = ready ]"
  "$PYTHON" "$CLIENT" check "$url" >&2 || fail "openai client checks failed against $url"
}

case_logs_and_exec_work() {
  local fe w
  fe="$(all_pods "$FRONTEND" | head -n1)"
  w="$(ready_pods "$WORKERS" | sed -n 1p)"
  [ -n "$(k logs "$fe" --tail=20)" ] || fail "kubectl logs $fe printed nothing"
  k exec "$w" -- dynamo --version | grep -q dynamo || fail "kubectl exec $w -- dynamo --version failed"
}

case_scaling_workers_up_and_down_under_load() {
  local before new t_ready t_served
  before="$(ready_pods "$WORKERS" | sort)"
  start_load scale
  k scale dgdsa "$GRAPH-worker" --replicas 3 >/dev/null
  wait_for "3 workers Ready" 120 ready_count_is "$WORKERS" 3
  t_ready=$(now)
  new="$(comm -13 <(echo "$before") <(ready_pods "$WORKERS" | sort) | head -n1)"
  [ -n "$new" ] || fail "no new worker pod"
  wait_for "new worker $new gets requests" 10 worker_served "$new"
  t_served="$(since "$t_ready")"
  figure "scale 2->3: the new worker served its first request ${t_served} s after Ready"
  k scale dgdsa "$GRAPH-worker" --replicas 2 >/dev/null
  wait_for "back to 2 workers" 90 ready_count_is "$WORKERS" 2
  sleep 3
  expect_no_failures scale "scale 2->3->2 under load"
}

case_template_change_rolls_under_load() {
  local before updated
  before="$(pod_uids "$WORKERS")"
  start_load rollout
  k patch dgd "$GRAPH" --type=merge -p '{"spec":{"services":{"Worker":{"envs":[{"name":"ROLLOUT","value":"1"}]}}}}' >/dev/null
  rolled() {
    local now_uids
    now_uids="$(ready_uids "$WORKERS")"
    [ "$(echo "$now_uids" | grep -c .)" -eq 2 ] && [ "$(all_pods "$WORKERS" | wc -l)" -eq 2 ] &&
      [ -z "$(comm -12 <(echo "$before") <(echo "$now_uids"))" ]
  }
  wait_for "every worker replaced by the new template" 180 rolled
  updated="$(k get dgd "$GRAPH" -o 'jsonpath={.status.services.Worker.updatedReplicas}')"
  [ "$updated" = 2 ] || log "note: status.services.Worker.updatedReplicas=$updated"
  sleep 3
  expect_no_failures rollout "rolling update of the worker template under load"
}

case_worker_pod_deleted_under_load() {
  local victim uid
  victim="$(ready_pods "$WORKERS" | sed -n 1p)"
  uid="$(k get pod "$victim" -o 'jsonpath={.metadata.uid}')"
  start_load kill
  k delete pod "$victim" --wait=false >/dev/null
  gone_and_replaced() { ! pod_uids "$WORKERS" | grep -qx "$uid" && ready_count_is "$WORKERS" 2; }
  wait_for "$victim replaced" 120 gone_and_replaced
  sleep 3
  expect_no_failures kill "kubectl delete pod of a worker under load"
}

# manifests/planner.yaml made quick: a 10 s interval with the mocker 10x faster than real time (so
# 1 s of wall time), starting from one worker, within 3 GPUs.
planner_graph() {
  pinned_graph manifests/planner.yaml | "$PYTHON" -c '
import json, sys
g = json.load(sys.stdin)
g["spec"]["planner"].update({"interval": "10s", "gpuBudget": 3, "minReplicas": 1, "maxReplicas": 4})
w = g["spec"]["services"]["Worker"]
w["replicas"] = 1
args = w["extraPodSpec"]["mainContainer"]["args"]
args[args.index("--speedup-ratio") + 1] = "10"
json.dump(g, sys.stdout)'
}
PWORKERS="nvidia.com/dynamo-graph=planner,nvidia.com/dynamo-service=Worker"
adapter_replicas() { k get dgdsa planner-worker -o 'jsonpath={.spec.replicas}'; }

case_planner_scales_a_graph_with_an_sla_up_under_load_and_back_down() {
  local url most=0 n ok failed t0 up
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  planner_graph | k apply -f - >/dev/null
  wait_for "planner graph: 1 worker and its frontend Ready" 120 ready_count_is "$PWORKERS" 1
  pfrontend_url() {
    echo "http://$(k get svc planner-frontend -o 'jsonpath={.spec.clusterIP}'):$(k get svc planner-frontend -o 'jsonpath={.spec.ports[0].port}')"
  }
  url="$(pfrontend_url)"
  wait_for "planner graph serves" 120 "$PYTHON" "$CLIENT" first-token "$url" --timeout 5
  rm -f "$WORK/planner.stop"
  "$PYTHON" "$CLIENT" load "$url" --concurrency 24 --stop-file "$WORK/planner.stop" \
    --out "$WORK/planner.json" >"$WORK/planner.log" 2>&1 &
  echo $! >"$WORK/planner.pid"
  t0=$(now)
  # Up to the GPU budget (3 workers of 1 GPU), never past it.
  local deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    n="$(adapter_replicas)"
    [ "$n" -gt "$most" ] && most=$n
    [ "$n" -le 3 ] || fail "the planner scaled to $n workers, past the budget of 3 GPUs"
    [ "$(ready_pods "$PWORKERS" | wc -l)" -ge 3 ] && break
    sleep 0.5
  done
  [ "$most" -eq 3 ] || fail "the planner scaled to $most workers under load, expected the budget's 3"
  up="$(since "$t0")"
  wait_for "3 planner workers Ready" 60 ready_count_is "$PWORKERS" 3
  figure "planner: load to 3 Ready workers (the GPU budget) in $up s"
  k get dgd planner | grep -q "Worker .*->3" || k get dgd planner >&2
  k get dgd planner -o 'jsonpath={.status.planner.algorithm}' | grep -qx sla || fail "status.planner.algorithm"
  sleep 5
  touch "$WORK/planner.stop"
  read -r ok failed < <(stop_load planner)
  figure "planner: $failed failed of $((ok + failed)) requests while it scaled 1->3->1"
  [ "$failed" -eq 0 ] || fail "$failed requests failed while the planner scaled"
  # Without load, back to the floor (1), never below it.
  t0=$(now)
  wait_for "the planner scales back to 1 worker" 120 ready_count_is "$PWORKERS" 1
  figure "planner: load stopped to 1 Ready worker in $(since "$t0") s"
  sleep 3
  [ "$(adapter_replicas)" -eq 1 ] || fail "below or above the floor: $(adapter_replicas)"
  k get dgd planner >&2
  k get dgd planner -o 'jsonpath={.status.planner.reason}' | grep -q "replica" || fail "no reason in status.planner"
  k describe dgd planner | grep -q PlannerScaled || fail "no PlannerScaled event in kubectl describe dgd"
  k describe dgd planner | grep -A3 "Planner:" >&2 || true
  k delete dgd planner --wait=false >/dev/null
}

# manifests/disagg-planner.yaml made quick: a 10 s interval at speedup 10, within 4 GPUs, small KV
# blocks (moved between pods over TCP: pods share no IPC namespace).
disagg_planner_graph() {
  pinned_graph manifests/disagg-planner.yaml | "$PYTHON" -c '
import json, sys
g = json.load(sys.stdin)
g["spec"]["planner"].update({"interval": "10s", "gpuBudget": 4})
for name in ("Prefill", "Decode"):
    args = g["spec"]["services"][name]["extraPodSpec"]["mainContainer"]["args"]
    args[args.index("--speedup-ratio") + 1] = "10"
    args[args.index("--kv-geometry") + 1] = "tiny"
json.dump(g, sys.stdout)'
}
DP=disagg-planner
dp_ready() { # SERVICE N: N Ready pods of the service
  ready_count_is "nvidia.com/dynamo-graph=$DP,nvidia.com/dynamo-service=$1" "$2"
}
dp_floors() { dp_ready Prefill 1 && dp_ready Decode 1; }
dp_adapter() { k get dgdsa "$DP-$1" -o 'jsonpath={.spec.replicas}'; }

case_planner_sizes_the_prefill_and_decode_pools_of_a_disaggregated_graph() {
  local url most=0 p d ok failed t0
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  disagg_planner_graph | k apply -f - >/dev/null
  wait_for "1 prefill and 1 decode worker Ready" 120 dp_floors
  url="http://$(k get svc $DP-frontend -o 'jsonpath={.spec.clusterIP}'):$(k get svc $DP-frontend -o 'jsonpath={.spec.ports[0].port}')"
  wait_for "$DP serves" 120 "$PYTHON" "$CLIENT" first-token "$url" --timeout 5
  # Prompts of about 3,500 tokens, each new to every worker (--fresh): the frontend sends each to
  # the prefill pool (isl_bounding), which one prefill worker cannot keep at the TTFT target.
  rm -f "$WORK/dp.stop"
  "$PYTHON" "$CLIENT" load "$url" --concurrency 24 --words 1400 --max-tokens 16 --fresh \
    --stop-file "$WORK/dp.stop" --out "$WORK/dp.json" >"$WORK/dp.log" 2>&1 &
  echo $! >"$WORK/dp.pid"
  t0=$(now)
  local deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    p="$(dp_adapter prefill)"; d="$(dp_adapter decode)"
    [ $((p + d)) -le 4 ] || fail "the pools took $p + $d GPUs, past the budget of 4"
    [ "$p" -gt "$most" ] && most=$p
    [ "$most" -ge 2 ] && break
    sleep 0.5
  done
  [ "$most" -ge 2 ] || fail "the prefill pool never grew under long prompts (adapter at $most)"
  figure "disagg planner: long prompts to $most prefill workers wanted in $(since "$t0") s"
  # The pool may settle below what the first burst asked for once the forecast takes over; it
  # does not shrink before the workers it asked for have joined.
  dp_grown() { [ "$(ready_pods "nvidia.com/dynamo-graph=$DP,nvidia.com/dynamo-service=Prefill" | wc -l)" -ge 2 ]; }
  wait_for "2 or more prefill workers Ready" 60 dp_grown
  k get dgd $DP -o 'jsonpath={.status.planner.replicas}' | grep -q '"Prefill":[2-9]' ||
    k get dgd $DP -o 'jsonpath={.status.planner.summary}' | grep -q 'Prefill 1->[2-9]' ||
    k get dgd $DP >&2
  sleep 5
  read -r ok failed < <(stop_load dp)
  figure "disagg planner: $failed failed of $((ok + failed)) requests while the prefill pool grew and shrank"
  [ "$failed" -eq 0 ] || fail "$failed requests failed while the planner scaled the pools"
  [ "$ok" -gt 0 ] || fail "no request completed"
  t0=$(now)
  wait_for "both pools back to 1" 120 dp_floors
  figure "disagg planner: load stopped to 1 + 1 Ready workers in $(since "$t0") s"
  [ "$(dp_adapter prefill),$(dp_adapter decode)" = 1,1 ] || fail "pools at $(dp_adapter prefill),$(dp_adapter decode), not their floors"
  k get dgd $DP >&2
  k describe dgd $DP | grep -q PlannerScaled || fail "no PlannerScaled event"
  # Each change the planner made, from its Events: a handful, not a flapping between pools.
  local changes
  changes="$(k get events --field-selector "involvedObject.name=$DP,reason=PlannerScaled" -o json | "$PYTHON" -c '
import json, sys
print(sum((e.get("series") or {}).get("count") or e.get("count") or 1 for e in json.load(sys.stdin)["items"]))')"
  figure "disagg planner: $changes scaling actions over the case"
  [ "$changes" -le 10 ] || fail "$changes scaling actions: the pools flapped"
  local oplog
  oplog="$(kubectl -n "$OP_NS" logs -l app.kubernetes.io/name=dynamo-operator --tail=-1 2>/dev/null)"
  grep -q "planner sizes the pool with the profile its workers describe" <<<"$oplog" ||
    fail "the operator's planner did not take the workers' own profiles"
  k delete dgd $DP --wait=false >/dev/null
}

case_deleting_the_graph_stops_every_container() {
  k get dgd "$GRAPH" >/dev/null || fail "graph $GRAPH is not there to delete"
  k delete dgd "$GRAPH" --wait=true >/dev/null
  nothing_left() { [ "$(k get pods,services,dgdsa -l "nvidia.com/dynamo-graph=$GRAPH" --no-headers 2>/dev/null | wc -l)" -eq 0 ]; }
  wait_for "every object of the graph gone" 90 nothing_left
  no_containers() {
    [ "$("$CACHE/tools/bin/crictl" --runtime-endpoint "unix://$CLUSTER_STATE/node/containerd/containerd.sock" \
      ps -a --label "io.kubernetes.pod.namespace=$NS" -q | wc -l)" -eq 0 ]
  }
  wait_for "no container of namespace $NS left (crictl ps -a)" 90 no_containers
}

# === main ===

selected() {
  [ ${#FILTER[@]} -eq 0 ] && return 0
  local w
  for w in "${FILTER[@]}"; do [[ "$1" == *"$w"* ]] && return 0; done
  return 1
}

SKIP_REST=
run_case() { # name [required: a failure skips every later case]
  local name="$1" t0=$SECONDS
  selected "$name" || return 0
  if [ -n "$SKIP_REST" ]; then
    log "skip $name ($SKIP_REST failed)"; FAILED=$((FAILED + 1)); FAILED_NAMES+=("$name"); return 0
  fi
  log "--- $name"
  if ( set -e; "case_$name" ); then
    PASSED=$((PASSED + 1))
    log "ok   $name ($((SECONDS - t0)) s)"
  else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$name")
    [ "${2:-}" != required ] || SKIP_REST=$name
    log "FAILED $name; operator log tail:"
    kubectl -n "$OP_NS" logs -l app.kubernetes.io/name=dynamo-operator --tail=20 >&2 2>/dev/null || true
  fi
}

[ "$(id -u)" = 0 ] || { echo "e2e/realnode: needs root (the real node runs containerd and a kubelet)" >&2; exit 1; }
"$PYTHON" -c 'import openai' 2>/dev/null || { echo "e2e/realnode: $PYTHON lacks the openai package (set PYTHON)" >&2; exit 1; }
log "tools and cluster"
hack/tools.sh >/dev/null
hack/cluster.sh down >/dev/null 2>&1 || true
t_up=$SECONDS
hack/cluster.sh up >/dev/null
eval "$(hack/cluster.sh env)"
mkdir -p "$WORK"
: >"$WORK/figures.txt"
figure "cluster up (control plane, kwok nodes, real node): $((SECONDS - t_up)) s"
log "images"
t_img=$SECONDS
hack/image.sh
figure "hack/image.sh (release build if needed, images written and imported): $((SECONDS - t_img)) s"

run_case operator_runs_as_a_pod_and_leads required
run_case graph_serves_through_its_cluster_ip required
run_case logs_and_exec_work
run_case scaling_workers_up_and_down_under_load
run_case template_change_rolls_under_load
run_case worker_pod_deleted_under_load
run_case planner_scales_a_graph_with_an_sla_up_under_load_and_back_down
run_case planner_sizes_the_prefill_and_decode_pools_of_a_disaggregated_graph
run_case deleting_the_graph_stops_every_container

log "suite time: $((SECONDS - SUITE_START)) s"
sed 's/^/  /' "$WORK/figures.txt" >&2
[ "$FAILED" -eq 0 ] || log "failed: ${FAILED_NAMES[*]}"
echo "realnode-e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
