#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# etcd) from the Go module proxy, once, into a per-version cache folder.
#
#   dir=$(hack/controlplane/build.sh)   # last stdout line: the folder
#   "$dir/kube-apiserver" --version     # Kubernetes v1.37.2
#
# Versions come from the go.mod files next to this script (k8s.io/kubernetes in
# ./go.mod, go.etcd.io/etcd/server/v3 in ./etcd/go.mod). Needs only the go
# command and the Go module proxy (GOPROXY); nothing else is downloaded.
#
# Environment:
#   CGID_CONTROLPLANE_CACHE  cache root (default ~/.cache/chainguard-identity-operator/controlplane)
#   CGID_CONTROLPLANE_FORCE  set to 1 to rebuild even if the binaries exist (same as --force)
#   KUBE_GIT_COMMIT          optional: gitCommit to stamp into the Kubernetes binaries
#
# Progress goes to stderr; stdout carries only the folder path.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

force=${CGID_CONTROLPLANE_FORCE:-0}
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "controlplane: $*" >&2; }

modver() { # modver GOMOD MODULE -> version required in that go.mod
  awk -v m="$2" '$1 == m && $2 ~ /^v[0-9]/ { print $2; exit }' "$1"
}

kube_version=$(modver "$here/go.mod" k8s.io/kubernetes)
etcd_version=$(modver "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)
if [[ -z $kube_version || -z $etcd_version ]]; then
  echo "build.sh: cannot read k8s.io/kubernetes / go.etcd.io/etcd/server/v3 versions from go.mod" >&2
  exit 1
fi

cache_root=${CGID_CONTROLPLANE_CACHE:-${HOME}/.cache/chainguard-identity-operator/controlplane}
dest="$cache_root/${kube_version}-${etcd_version}"
bins=(kube-apiserver kube-controller-manager etcd)

complete() {
  local b
  for b in "${bins[@]}"; do [[ -x "$dest/$b" ]] || return 1; done
}

# Fast path: nothing to do, no go command run.
if [[ $force != 1 ]] && complete; then
  echo "$dest"
  exit 0
fi

command -v go >/dev/null 2>&1 || { echo "build.sh: the go command is not on PATH (Go >= 1.26 needed)" >&2; exit 1; }

mkdir -p "$cache_root"
# Serialise concurrent callers (e.g. parallel test workers) on the same version.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache_root/.lock-${kube_version}-${etcd_version}"
  flock 9
  if [[ $force != 1 ]] && complete; then
    echo "$dest"
    exit 0
  fi
fi

tmp=$(mktemp -d "$cache_root/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Build for this host only, without cgo, from the committed go.mod/go.sum.
export CGO_ENABLED=0 GOWORK=off
unset GOOS GOARCH
goflags=(-mod=readonly -trimpath -buildvcs=false)

# Kubernetes: same version stamping as upstream hack/lib/version.sh, same tags
# and strip flags as upstream release builds (hack/lib/golang.sh).
major=${kube_version#v}; major=${major%%.*}
minor=${kube_version#v"$major".}; minor=${minor%%.*}
# buildDate: the release's publication time on the module proxy (reproducible).
build_date=$(cd "$here" && go list -mod=readonly -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes 2>/dev/null) || build_date=
[[ $build_date == 20* ]] || build_date=$(date -u ${SOURCE_DATE_EPOCH:+--date=@$SOURCE_DATE_EPOCH} +%Y-%m-%dT%H:%M:%SZ)
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X '$pkg.gitVersion=$kube_version'"
  kube_ldflags+=" -X '$pkg.gitMajor=$major' -X '$pkg.gitMinor=$minor'"
  kube_ldflags+=" -X '$pkg.gitCommit=${KUBE_GIT_COMMIT:-}' -X '$pkg.gitTreeState=clean'"
  kube_ldflags+=" -X '$pkg.buildDate=$build_date'"
done

start=$SECONDS
log "building kube-apiserver, kube-controller-manager $kube_version (first build downloads modules and compiles for several minutes)"
(cd "$here" && go build "${goflags[@]}" -tags=selinux,notest,grpcnotrace -ldflags="$kube_ldflags" \
  -o "$tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) >&2
log "kubernetes binaries built in $((SECONDS - start))s"

start=$SECONDS
log "building etcd $etcd_version"
(cd "$here/etcd" && go build "${goflags[@]}" \
  -ldflags="-s -w -X 'go.etcd.io/etcd/api/v3/version.GitSHA=${etcd_version}-gomodproxy'" \
  -o "$tmp/etcd" go.etcd.io/etcd/server/v3) >&2
log "etcd built in $((SECONDS - start))s"

# Sanity check before publishing: the version stamp must have taken.
got=$("$tmp/kube-apiserver" --version)
if [[ $got != "Kubernetes $kube_version" ]]; then
  echo "build.sh: kube-apiserver --version printed '$got', expected 'Kubernetes $kube_version'" >&2
  exit 1
fi
got=$("$tmp/etcd" --version)
if [[ $got != *"etcd Version: ${etcd_version#v}"$'\n'* ]]; then
  echo "build.sh: etcd --version printed '$got', expected etcd Version: ${etcd_version#v}" >&2
  exit 1
fi

# Publish: each rename is atomic, so a half-built binary is never seen in $dest.
mkdir -p "$dest"
for b in "${bins[@]}"; do mv -f "$tmp/$b" "$dest/$b"; done
log "ready: $dest"
echo "$dest"
