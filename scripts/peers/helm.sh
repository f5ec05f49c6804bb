#!/usr/bin/env bash
# The real `helm` (v4, built from the Go module proxy's helm.sh/helm/v4 module) for the tests of
# meshca's charts (charts/): `helm lint`, `helm template`, and install / upgrade / uninstall against
# a real kube-apiserver. See docs/peers.md.
#
# Usage:
#   helm.sh build      build (once) and cache the binary; prints its path
#   helm.sh path       print the cached binary path (exit 1 if not built)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

HELM_VERSION=${MESHCA_HELM_VERSION:-4.3.2}
HELM_CACHE_DIR=$MESHCA_PEERS_CACHE/helm-$HELM_VERSION
HELM_BIN=$HELM_CACHE_DIR/helm

usage() { sed -n '6,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd_build() {
    [ -x "$HELM_BIN" ] && { echo "$HELM_BIN"; return 0; }
    command -v go >/dev/null || peers_die "the Go toolchain is required (go not on PATH)"
    peers_lock helm
    [ -x "$HELM_BIN" ] && { echo "$HELM_BIN"; return 0; }
    local build=$MESHCA_PEERS_CACHE/build/helm-$HELM_VERSION
    local log=$MESHCA_PEERS_CACHE/build/helm-$HELM_VERSION.log start=$SECONDS
    rm -rf "$build"; mkdir -p "$build"
    peers_log "building helm v$HELM_VERSION from the Go module proxy (log: $log)"
    (
        # A private module and build cache, removed after the build. helm's go.mod has no
        # `replace`, so `go install module@version` builds it exactly as released; the ldflags
        # set what `helm version` prints (as helm's own Makefile does).
        export GOMODCACHE=$build/gomod GOCACHE=$build/gocache GOBIN=$build/bin
        export GOFLAGS="-modcacherw -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local
        nice -n 10 go install -trimpath -ldflags "-s -w \
            -X helm.sh/helm/v4/internal/version.version=v$HELM_VERSION \
            -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
            "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION"
        "$build/bin/helm" version
    ) >"$log" 2>&1 || { tail -n 30 "$log" >&2; peers_die "helm v$HELM_VERSION build failed (log: $log)"; }
    mkdir -p "$HELM_CACHE_DIR"
    cp "$build/bin/helm" "$HELM_BIN.tmp" && mv -f "$HELM_BIN.tmp" "$HELM_BIN"
    rm -rf "$build"
    peers_log "built in $((SECONDS - start))s: $("$HELM_BIN" version --short) ($(du -h "$HELM_BIN" | cut -f1))"
    echo "$HELM_BIN"
}

cmd_path() {
    [ -x "$HELM_BIN" ] || { peers_log "helm not built; run: $0 build"; exit 1; }
    echo "$HELM_BIN"
}

case "${1:-}" in
    build) shift; cmd_build "$@" ;;
    path) shift; cmd_path "$@" ;;
    *) usage ;;
esac
