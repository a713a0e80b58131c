#!/usr/bin/env bash
# Build the pinned test cluster from Go modules into $DYNAMO_CACHE/tools/bin:
#   control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm;
#   the real node:  kubelet, kube-proxy, containerd (+ shim, ctr), runc, CNI plugins (bridge,
#                   host-local, loopback, portmap), crictl.
# runc is the one cgo build (seccomp): it needs gcc and libseccomp-dev; the node also needs iptables,
# conntrack, socat and ethtool. Missing Debian packages are installed with apt-get when run as root.
#
# Each tool is pinned by the go.mod/go.sum of its wrapper module in hack/tools/<group>/ and is
# rebuilt only when that pin (or the Go toolchain, or the build flags) changes: a stamp file per
# tool in $DYNAMO_CACHE/tools/stamps/ records what the binary was built from.
#
# Usage: hack/tools.sh [TOOL...]      build all (default) or only the named tools
#        hack/tools.sh --list         print tool, pinned version, and path
#        hack/tools.sh --path         print the bin directory (for PATH=...)
#
# Env:   DYNAMO_CACHE  cache root (default: ~/.cache/dynamo-rs, outside the checkout); GOMODCACHE/GOCACHE live under it in go/.
#        TOOLS_FORCE=1 rebuild even when the stamp matches.
# Heavy work runs under `nice -n 19`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
BIN="$CACHE/tools/bin"
STAMPS="$CACHE/tools/stamps"
LOGS="$CACHE/tools/logs"
WRAP="$ROOT/hack/tools"

export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOTOOLCHAIN=local          # never download another toolchain behind our back
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "tools.sh: error: $*" >&2; exit 1; }

# name | wrapper dir | main package | module whose version is the tool's version | extra ldflags (%V = version) | build tags | cgo
TOOLS=(
  "etcd|etcd|go.etcd.io/etcd/server/v3|go.etcd.io/etcd/server/v3|||"
  "kube-apiserver|k8s|k8s.io/kubernetes/cmd/kube-apiserver|k8s.io/kubernetes|KUBE||"
  "kube-controller-manager|k8s|k8s.io/kubernetes/cmd/kube-controller-manager|k8s.io/kubernetes|KUBE||"
  "kube-scheduler|k8s|k8s.io/kubernetes/cmd/kube-scheduler|k8s.io/kubernetes|KUBE||"
  "kubectl|k8s|k8s.io/kubernetes/cmd/kubectl|k8s.io/kubernetes|KUBE||"
  "kwok|kwok|sigs.k8s.io/kwok/cmd/kwok|sigs.k8s.io/kwok|||"
  "helm|helm|helm.sh/helm/v3/cmd/helm|helm.sh/helm/v3|-X helm.sh/helm/v3/internal/version.version=%V||"
  "kubelet|k8s|k8s.io/kubernetes/cmd/kubelet|k8s.io/kubernetes|KUBE||"
  "kube-proxy|k8s|k8s.io/kubernetes/cmd/kube-proxy|k8s.io/kubernetes|KUBE||"
  "containerd|containerd|github.com/containerd/containerd/v2/cmd/containerd|github.com/containerd/containerd/v2|-X github.com/containerd/containerd/v2/version.Version=%V|no_devmapper no_zfs no_btrfs|"
  "containerd-shim-runc-v2|containerd|github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2|github.com/containerd/containerd/v2|-X github.com/containerd/containerd/v2/version.Version=%V|no_devmapper no_zfs no_btrfs|"
  "ctr|containerd|github.com/containerd/containerd/v2/cmd/ctr|github.com/containerd/containerd/v2|-X github.com/containerd/containerd/v2/version.Version=%V|no_devmapper no_zfs no_btrfs|"
  "runc|runc|github.com/opencontainers/runc|github.com/opencontainers/runc|-X main.version=%V|seccomp urfave_cli_no_docs|1"
  "bridge|cni|github.com/containernetworking/plugins/plugins/main/bridge|github.com/containernetworking/plugins|||"
  "host-local|cni|github.com/containernetworking/plugins/plugins/ipam/host-local|github.com/containernetworking/plugins|||"
  "loopback|cni|github.com/containernetworking/plugins/plugins/main/loopback|github.com/containernetworking/plugins|||"
  "portmap|cni|github.com/containernetworking/plugins/plugins/meta/portmap|github.com/containernetworking/plugins|||"
  "crictl|cri-tools|sigs.k8s.io/cri-tools/cmd/crictl|sigs.k8s.io/cri-tools|-X sigs.k8s.io/cri-tools/pkg/version.Version=%V||"
)
# CNI plugins are looked up by containerd in one directory of their own.
CNI_TOOLS=" bridge host-local loopback portmap "
# Debian packages the node needs at run time (and libseccomp-dev to build runc).
DEB_PKGS=(iptables conntrack socat ethtool libseccomp-dev pkg-config)

# Version of MODULE as required by the wrapper's go.mod (read from the file: no network, no go call).
mod_version() { # dir module
  local v
  v="$(awk -v m="$2" '($1==m || ($1=="require" && $2==m)) { for (i=1;i<=NF;i++) if ($i ~ /^v[0-9]/) { print $i; exit } }' "$WRAP/$1/go.mod")"
  [ -n "$v" ] || die "cannot find $2 in $WRAP/$1/go.mod"
  echo "$v"
}

ldflags_for() { # kind version
  local kind="$1" v="$2" f="-s -w"
  case "$kind" in
    KUBE)
      local maj min
      maj="${v#v}"; maj="${maj%%.*}"
      min="${v#v*.}"; min="${min%%.*}"
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        f+=" -X $p.gitVersion=$v -X $p.gitMajor=$maj -X $p.gitMinor=$min -X $p.gitTreeState=clean"
      done ;;
    "") ;;
    *) f+=" ${kind//%V/$v}" ;;
  esac
  echo "$f"
}

check_go() {
  command -v go >/dev/null || die "go not found in PATH (Go >= 1.26 is needed to build the tools)"
  local gv; gv="$(go env GOVERSION)"
  case "$gv" in
    go1.2[6-9]*|go1.[3-9][0-9]*|go[2-9]*) ;;
    *) die "Go $gv is too old: the pinned etcd/kwok/helm modules need go >= 1.26.0" ;;
  esac
  echo "$gv"
}

list() {
  local t name dir pkg mod kind
  for t in "${TOOLS[@]}"; do
    IFS='|' read -r name dir pkg mod kind _ <<<"$t"
    local p="$BIN/$name"; case "$CNI_TOOLS" in *" $name "*) p="$BIN/cni/$name" ;; esac
    printf '%-24s %-10s %s\n' "$name" "$(mod_version "$dir" "$mod")" "$p"
  done
}

# Fetch a wrapper's modules once per run, so an unreachable proxy gives one clear error.
FETCHED=" "
fetch() { # dir
  case "$FETCHED" in *" $1 "*) return 0 ;; esac
  if ! ( cd "$WRAP/$1" && nice -n 19 go mod download ) >"$LOGS/download-$1.log" 2>&1; then
    echo "tools.sh: error: 'go mod download' in hack/tools/$1 failed (GOPROXY=$GOPROXY):" >&2
    tail -n 20 "$LOGS/download-$1.log" >&2
    exit 1
  fi
  FETCHED+="$1 "
}

# Data files that go with a binary. kwok: its default node/pod lifecycle stages (what
# `kwokctl` feeds the controller), in $DYNAMO_CACHE/tools/share/kwok/stages.yaml for hack/cluster.sh.
post_build() { # name dir version
  [ "$1" = kwok ] || return 0
  local out="$CACHE/tools/share/kwok/stages-$3.yaml" src="$GOMODCACHE/sigs.k8s.io/kwok@$3/kustomize/stage"
  [ -s "$out" ] && return 0
  [ -d "$src" ] || fetch "$2"
  mkdir -p "${out%/*}"
  local f first=1
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ -f "$src/$f" ] || die "kwok stage $src/$f not found"
    [ -n "$first" ] || echo "---"
    first=
    cat "$src/$f"
  done >"$out.tmp"
  mv -f "$out.tmp" "$out"
  ln -sfn "stages-$3.yaml" "$CACHE/tools/share/kwok/stages.yaml"
}

build_one() { # spec
  local name dir pkg mod kind tags cgo ver flags stamp want t0 t1 log out
  IFS='|' read -r name dir pkg mod kind tags cgo <<<"$1"
  ver="$(mod_version "$dir" "$mod")"
  flags="$(ldflags_for "$kind" "$ver")"
  want="$name $pkg@$ver go=$GOVER sum=$(cat "$WRAP/$dir/go.mod" "$WRAP/$dir/go.sum" | sha256sum | cut -c1-16) flags=$(echo "-trimpath $flags tags=$tags cgo=${cgo:-0}" | sha256sum | cut -c1-16)"
  stamp="$STAMPS/$name"
  out="$BIN/$name"
  case "$CNI_TOOLS" in *" $name "*) out="$BIN/cni/$name"; mkdir -p "$BIN/cni" ;; esac
  if [ -z "${TOOLS_FORCE:-}" ] && [ -x "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    printf '%-24s %-10s up to date\n' "$name" "$ver"
    post_build "$name" "$dir" "$ver"
    return 0
  fi
  fetch "$dir"
  log="$LOGS/$name.log"
  printf '%-24s %-10s building ... ' "$name" "$ver"
  t0=$(date +%s)
  if ! ( cd "$WRAP/$dir" && CGO_ENABLED="${cgo:-0}" nice -n 19 go build -trimpath -tags "$tags" -ldflags "$flags" -o "$BIN/.$name.tmp" "$pkg" ) >"$log" 2>&1; then
    echo "FAILED"
    echo "tools.sh: error: building $name ($pkg@$ver) failed; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    rm -f "$BIN/.$name.tmp"
    exit 1
  fi
  mv -f "$BIN/.$name.tmp" "$out"
  post_build "$name" "$dir" "$ver"
  echo "$want" >"$stamp"
  t1=$(date +%s)
  echo "done in $((t1 - t0))s"
}

# Install the node's Debian packages when missing (as root); otherwise say what to install.
debs() {
  local p missing=()
  for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "missing Debian packages: ${missing[*]} (install them: apt-get install ${missing[*]})"
  fi
  echo "tools: apt-get install ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$LOGS/apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$LOGS/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$LOGS/apt.log" 2>&1 \
      || { tail -n 20 "$LOGS/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
  fi
}

main() {
  case "${1:-}" in
    --list) list; return ;;
    --path) echo "$BIN"; return ;;
    -h|--help) usage; return ;;
  esac
  GOVER="$(check_go)"
  mkdir -p "$BIN" "$STAMPS" "$LOGS" "$GOMODCACHE" "$GOCACHE"
  debs
  local want=("$@") t name found total0
  for name in "${want[@]}"; do
    found=
    for t in "${TOOLS[@]}"; do [ "${t%%|*}" = "$name" ] && found=1; done
    [ -n "$found" ] || die "unknown tool '$name' (known: $(for t in "${TOOLS[@]}"; do printf '%s ' "${t%%|*}"; done))"
  done
  total0=$(date +%s)
  for t in "${TOOLS[@]}"; do
    name="${t%%|*}"
    if [ ${#want[@]} -gt 0 ]; then
      found=
      for n in "${want[@]}"; do [ "$n" = "$name" ] && found=1; done
      [ -n "$found" ] || continue
    fi
    build_one "$t"
  done
  echo "tools: all up to date in $BIN ($(( $(date +%s) - total0 ))s)"
}

main "$@"
