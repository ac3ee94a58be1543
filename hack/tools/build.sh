#!/usr/bin/env bash
# Build the third-party clients the tests drive (today: crane, from
# github.com/google/go-containerregistry) from the Go module proxy, once, into a
# per-version cache folder.
#
#   dir=$(hack/tools/build.sh)   # last stdout line: the folder
#   "$dir/crane" version         # v0.22.1
#
# `go install <pkg>@<version>` builds with the module's own go.mod and go.sum, so
# every dependency is the version upstream pins, and the go command checks the
# downloads against the checksum database (GOSUMDB). Needs only the go command
# and the Go module proxy (GOPROXY); nothing else is downloaded.
#
# Environment:
#   CGID_TOOLS_CACHE   cache root (default ~/.cache/chainguard-identity-operator/tools)
#   CGID_CRANE_VERSION go-containerregistry version (default v0.22.1)
#   CGID_TOOLS_FORCE   set to 1 to rebuild even if the binary exists (same as --force)
#
# Progress goes to stderr; stdout carries only the folder path.
set -euo pipefail

force=${CGID_TOOLS_FORCE:-0}
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) echo "hack/tools/build.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "tools: $*" >&2; }
fail() { echo "hack/tools/build.sh: $*" >&2; exit 1; }

crane_version=${CGID_CRANE_VERSION:-v0.22.1}
[[ $crane_version =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "CGID_CRANE_VERSION must look like v0.22.1, not '$crane_version'"
crane_pkg=github.com/google/go-containerregistry/cmd/crane

cache_root=${CGID_TOOLS_CACHE:-${HOME}/.cache/chainguard-identity-operator/tools}
dest="$cache_root/crane-${crane_version}"

# Fast path: nothing to do, no go command run.
if [[ $force != 1 && -x "$dest/crane" ]]; then
  echo "$dest"
  exit 0
fi

command -v go >/dev/null 2>&1 || fail "the go command is not on PATH (crane $crane_version needs Go >= 1.25)"

mkdir -p "$cache_root" || fail "cannot create the cache folder $cache_root"
# Serialise concurrent callers (e.g. parallel test workers) on the same version.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache_root/.lock-crane-${crane_version}"
  flock 9
  if [[ $force != 1 && -x "$dest/crane" ]]; then
    echo "$dest"
    exit 0
  fi
fi

tmp=$(mktemp -d "$cache_root/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Build for this host only, without cgo, outside any module or workspace of ours
# (the version comes from the @version, its dependencies from crane's go.mod).
export CGO_ENABLED=0 GOWORK=off GO111MODULE=on GOBIN="$tmp"
unset GOOS GOARCH GOFLAGS

start=$SECONDS
log "building crane $crane_version ($crane_pkg; the first build downloads modules and compiles for a minute or two)"
(cd "$tmp" && go install -trimpath -buildvcs=false -ldflags="-s -w" "$crane_pkg@$crane_version") >&2 \
  || fail "go install $crane_pkg@$crane_version failed (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))"
log "crane built in $((SECONDS - start))s"

# Sanity check before publishing: it runs, and it is the version asked for
# (crane prints the main module's version from its build info).
[[ -x "$tmp/crane" ]] || fail "go install produced no crane binary in $tmp"
got=$("$tmp/crane" version 2>&1) || fail "'crane version' failed: $got"
[[ $got == "$crane_version" ]] || fail "'crane version' printed '$got', expected '$crane_version'"

# Publish: the rename is atomic, so a half-built binary is never seen in $dest.
mkdir -p "$dest"
mv -f "$tmp/crane" "$dest/crane"
log "ready: $dest"
echo "$dest"
