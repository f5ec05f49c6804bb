#!/usr/bin/env bash
# The real SPIRE server (github.com/spiffe/spire, built from the Go module proxy) for the SPIFFE
# federation tests (crates/meshca/tests/spire.rs): SPIRE reads meshca's bundle endpoint, meshca
# reads SPIRE's. See docs/peers.md.
#
# Usage:
#   spire.sh build      build (once) and cache spire-server; prints its path
#   spire.sh path       print the cached binary path (exit 1 if not built)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

SPIRE_VERSION=${MESHCA_SPIRE_VERSION:-1.13.3}
SPIRE_CACHE_DIR=$MESHCA_PEERS_CACHE/spire-$SPIRE_VERSION
SPIRE_BIN=$SPIRE_CACHE_DIR/spire-server

usage() { sed -n '7,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd_build() {
    [ -x "$SPIRE_BIN" ] && { echo "$SPIRE_BIN"; return 0; }
    command -v go >/dev/null || peers_die "the Go toolchain is required (go not on PATH)"
    peers_lock spire
    [ -x "$SPIRE_BIN" ] && { echo "$SPIRE_BIN"; return 0; }
    local build=$MESHCA_PEERS_CACHE/build/spire-$SPIRE_VERSION
    local log=$MESHCA_PEERS_CACHE/build/spire-$SPIRE_VERSION.log start=$SECONDS
    rm -rf "$build"; mkdir -p "$build/mod"
    peers_log "building spire-server v$SPIRE_VERSION from the Go module proxy (log: $log; ~10 min of CPU)"
    (
        # The module proxy serves this SPIRE release only to a module that requires it (`go install
        # module@version` is refused for it), so a throwaway module takes it as a tool (Go 1.24+)
        # and installs it from there. The caller's module and build caches are used (and kept):
        # SPIRE's dependency tree is large and shared with nothing else here.
        cd "$build/mod"
        export GOBIN=$build/bin GOFLAGS="-modcacherw -buildvcs=false" GOTOOLCHAIN=local
        go mod init meshca-spire-build
        go get -tool "github.com/spiffe/spire/cmd/spire-server@v$SPIRE_VERSION"
        nice -n 10 go install -trimpath github.com/spiffe/spire/cmd/spire-server
        "$build/bin/spire-server" --version
    ) >"$log" 2>&1 || { tail -n 30 "$log" >&2; peers_die "spire-server v$SPIRE_VERSION build failed (log: $log)"; }
    mkdir -p "$SPIRE_CACHE_DIR"
    cp "$build/bin/spire-server" "$SPIRE_BIN.tmp" && mv -f "$SPIRE_BIN.tmp" "$SPIRE_BIN"
    rm -rf "$build"
    peers_log "built in $((SECONDS - start))s: spire-server $("$SPIRE_BIN" --version 2>&1) ($(du -h "$SPIRE_BIN" | cut -f1))"
    echo "$SPIRE_BIN"
}

cmd_path() {
    [ -x "$SPIRE_BIN" ] || { peers_log "spire-server not built; run: $0 build"; exit 1; }
    echo "$SPIRE_BIN"
}

case "${1:-}" in
    build) shift; cmd_build "$@" ;;
    path) shift; cmd_path "$@" ;;
    *) usage ;;
esac
