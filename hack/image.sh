#!/usr/bin/env bash
# Build the `dynamo-rs` and `dynamo-rs-operator` images with no container engine and no registry,
# and import them into the test cluster's real node (hack/cluster.sh up):
#   docker.io/library/dynamo-rs:latest           /usr/local/bin/dynamo (frontend, sidecar, serve, ...)
#   docker.io/library/dynamo-rs-operator:latest  /usr/local/bin/dynamo-operator
#
# Each image is one layer: the release binary, the shared libraries it links (dynamic loader, libc,
# libgcc_s, libm as `ldd` resolves them on this machine), /etc/passwd and /etc/group with the
# Dockerfile's user (nonroot, 65532), /tmp, and PATH=/usr/local/bin:/usr/bin:/bin, user 65532:65532.
# The Dockerfile builds the same images for real clusters; the two must describe the same image.
#
# Usage: hack/image.sh             build the binaries if needed, write the archives, import them
# Env:   IMAGE_PROFILE    cargo profile (release)
#        IMAGE_IMPORT=0   only write the archives ($DYNAMO_CACHE/images/*.tar)
#        CLUSTER_STATE    the cluster whose containerd to import into (as hack/cluster.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
BIN="$CACHE/tools/bin"
STATE="${CLUSTER_STATE:-$CACHE/cluster}"
SOCK="$STATE/node/containerd/containerd.sock"
OUT="$CACHE/images"
PROFILE="${IMAGE_PROFILE:-release}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"

die() { echo "image.sh: error: $*" >&2; exit 1; }
log() { echo "image.sh: $*" >&2; }

command -v cargo >/dev/null || die "cargo not found"
command -v python3 >/dev/null || die "python3 not found"

t0=$SECONDS
log "cargo build --profile $PROFILE --bin dynamo --bin dynamo-operator"
(cd "$ROOT" && nice -n 10 cargo build --locked --profile "$PROFILE" --bin dynamo --bin dynamo-operator) ||
  die "cargo build failed"
case "$PROFILE" in dev) dir=debug ;; *) dir="$PROFILE" ;; esac
TARGET="$CARGO_TARGET_DIR/$dir"

# --file arguments for a binary's shared libraries, at the paths ldd resolves (and the loader at
# its ELF interpreter path, which the kernel opens).
lib_args() { # binary
  local line path interp
  ldd "$1" >/dev/null 2>&1 || return 0   # a static binary needs nothing more
  while read -r line; do
    case "$line" in
      *"=> not found"*) die "$1 needs ${line%% *}, which ldd cannot find" ;;
      *"=> /"*) path="${line#*=> }"; path="${path%% (*}"; echo "--file=$path:$path" ;;
      /*) path="${line%% (*}"; echo "--file=$(readlink -f "$path"):$path" ;;
    esac
  done < <(ldd "$1")
  interp="$(readelf -l "$1" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
  [ -z "$interp" ] || echo "--file=$(readlink -f "$interp"):$interp"
}

image() { # name binary
  local name="$1" bin="$TARGET/$2" out="$OUT/$1.tar"
  [ -x "$bin" ] || die "$bin not built"
  mkdir -p "$OUT"
  local args
  mapfile -t args < <(lib_args "$bin" | sort -u)
  python3 "$ROOT/hack/oci.py" --name "docker.io/library/$name:latest" --out "$out" \
    --entrypoint "/usr/local/bin/$2" --user 65532:65532 \
    --env PATH=/usr/local/bin:/usr/bin:/bin --env HOME=/home/nonroot \
    --file "$bin:/usr/local/bin/$2:0755" "${args[@]}" \
    --text "/etc/passwd:root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin" \
    --text "/etc/group:root:x:0:
nonroot:x:65532:" \
    --text "/etc/nsswitch.conf:hosts: files dns" \
    --dir /tmp:1777 --dir /home/nonroot:0755 >&2
  if [ "${IMAGE_IMPORT:-1}" != 0 ]; then
    [ -S "$SOCK" ] || die "no containerd at $SOCK: start the cluster (hack/cluster.sh up) or set IMAGE_IMPORT=0"
    "$BIN/ctr" --address "$SOCK" --namespace k8s.io images import --platform linux/amd64 "$out" >/dev/null ||
      die "ctr images import $out failed"
    log "imported docker.io/library/$name:latest into the real node's containerd (namespace k8s.io)"
  fi
}

image dynamo-rs dynamo
image dynamo-rs-operator dynamo-operator
log "done in $((SECONDS - t0))s"
