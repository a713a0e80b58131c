#!/usr/bin/env bash
# The project's test command (README, .ci/run): lint, unit + integration tests, then the official
# `openai` Python client against a real `dynamo serve`. Installs what it needs under .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TERM_COLOR=never

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

step "build dynamo"
cargo build --locked --bin dynamo

step "python client tests"
VENV="$ROOT/.cache/venv"
if ! "$VENV/bin/python" -c 'import openai, pytest, zmq, msgspec' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "openai>=1.50,<3" "pytest>=8,<10" "pyzmq>=25,<28" "msgspec>=0.18,<1"
fi
# The openai client against `dynamo serve`; vLLM's KV event publisher (pyzmq + msgspec) against the
# sidecar's ingest and the router's index.
DYNAMO_BIN="$ROOT/target/debug/dynamo" "$VENV/bin/python" -m pytest -q e2e/openai e2e/vllm

step "control-plane tools (etcd, kube-apiserver/-scheduler/-controller-manager, kubectl, kwok, helm; cached in .cache/tools)"
hack/tools.sh

step "test control plane smoke test"
e2e/cluster/smoke.sh

step "operator e2e (helm install, operator with the chart's ServiceAccount, kwok GPU nodes)"
e2e/operator/run.sh
