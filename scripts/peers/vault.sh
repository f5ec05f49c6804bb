#!/usr/bin/env bash
# A real HashiCorp Vault (built from the Go module proxy's github.com/hashicorp/vault module source)
# for meshca's Vault mode tests. See docs/peers.md.
#
# Usage:
#   vault.sh build                  build (once) and cache the binary
#   vault.sh path                   print the cached binary path (exit 1 if not built)
#   vault.sh start DIR PORT [--tls] `vault server -dev` on 127.0.0.1:PORT (and PORT+1, its cluster
#                                   port); writes DIR/env (VAULT_ADDR, VAULT_TOKEN, VAULT_PID, and
#                                   VAULT_CACERT with --tls)
#   vault.sh stop DIR               stop what `start DIR` started
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

VAULT_VERSION=${MESHCA_VAULT_VERSION:-1.21.4}
VAULT_CACHE_DIR=$MESHCA_PEERS_CACHE/vault-$VAULT_VERSION
VAULT_BIN=$VAULT_CACHE_DIR/vault
# Nested modules that v1.21.4's go.mod `replace`s with in-tree folders. The module zip on the proxy
# does not contain nested modules, so these replaces are dropped and the versions go.mod already
# requires (api v1.22.0, sdk v0.21.0, ...) are taken from the proxy instead.
VAULT_NESTED_MODULES=(api api/auth/approle api/auth/kubernetes api/auth/userpass sdk)

# Vault's release branch carries its own copy of the nested `sdk` module, which drifted from the
# nearest sdk tag on the proxy (v0.21.0, cut from main). Three call sites of v1.21.4 don't compile
# against it; these edits adapt them without changing behaviour:
#  1. framework.Backend.ActivationFunc gained a string argument (unused by the identity store):
#     wrap activateDeduplication, and pass "" where the system backend calls it.
#  2. keysutil.LockManager.RestorePolicy returns only an error in v0.21.0 (the branch's copy also
#     returns the restored key name, used only for an audit "observation"): use the requested name.
# Each edit is applied only where its original text is present, and the build fails loudly if the
# tree still does not compile.
vault_patch_source() {
    local src=$1 f
    f=$src/vault/identity_store.go
    if grep -q 'ActivationFunc: iStore.activateDeduplication,' "$f"; then
        sed -i 's/ActivationFunc: iStore.activateDeduplication,/ActivationFunc: func(ctx context.Context, req *logical.Request, _ string) error { return iStore.activateDeduplication(ctx, req) },/' "$f"
        echo "patched $f"
    fi
    f=$src/vault/logical_system_activation_flags.go
    if grep -q 'b.idStoreBackend.ActivationFunc(ctx, nil)' "$f"; then
        sed -i 's/b\.idStoreBackend\.ActivationFunc(ctx, nil)/b.idStoreBackend.ActivationFunc(ctx, nil, "")/' "$f"
        echo "patched $f"
    fi
    f=$src/builtin/logical/transit/path_restore.go
    if grep -q 'restoredKeyName, err := b.lm.RestorePolicy(' "$f"; then
        sed -i 's/restoredKeyName, err := b\.lm\.RestorePolicy(/restoredKeyName, err := keyName, b.lm.RestorePolicy(/' "$f"
        echo "patched $f"
    fi
}

usage() { sed -n '5,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# Prints 0 when Go version $1 (like 1.26.8) >= $2 (like 1.25.3).
go_at_least() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

cmd_build() {
    peers_need_root
    peers_lock vault
    peers_apt_install curl ca-certificates openssl
    if [ -x "$VAULT_BIN" ]; then
        echo "$VAULT_BIN"
        return 0
    fi
    command -v go >/dev/null || peers_die "the Go toolchain is required (go not on PATH)"

    local build=$MESHCA_PEERS_CACHE/build/vault-$VAULT_VERSION
    local log=$MESHCA_PEERS_CACHE/build/vault-$VAULT_VERSION.log
    rm -rf "$build"
    mkdir -p "$build"
    peers_log "building vault $VAULT_VERSION (log: $log)"

    # A private module and build cache, removed after the build (several GB).
    export GOMODCACHE=$build/gomod GOCACHE=$build/gocache GOPATH=$build/gopath
    export GOFLAGS="-modcacherw -buildvcs=false" CGO_ENABLED=0 GOPROXY=${GOPROXY:-https://proxy.golang.org,direct}
    export GOTOOLCHAIN=local
    local dir need have
    dir=$(go mod download -json "github.com/hashicorp/vault@v$VAULT_VERSION" 2>>"$log" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [ -n "$dir" ] && [ -f "$dir/go.mod" ] || { tail -n 20 "$log" >&2; peers_die "downloading github.com/hashicorp/vault@v$VAULT_VERSION failed"; }
    need=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$dir/go.mod")
    have=$(go env GOVERSION | sed 's/^go//')
    if ! go_at_least "$have" "$need"; then
        # The approved way to get a newer Go here: the toolchain module from the proxy.
        peers_log "local Go $have < $need required by vault; using GOTOOLCHAIN=go1.27.3"
        export GOTOOLCHAIN=go1.27.3
    fi

    cp -r "$dir" "$build/src"
    chmod -R u+w "$build/src"
    (
        cd "$build/src"
        local m args=()
        for m in "${VAULT_NESTED_MODULES[@]}"; do args+=("-dropreplace=github.com/hashicorp/vault/$m"); done
        go mod edit "${args[@]}"
        vault_patch_source "$build/src"
        go version
        # -mod=mod: lets go add the go.sum lines of the nested modules (checked against the checksum DB).
        nice -n 10 go build -mod=mod -trimpath -ldflags "-s -w" -o "$build/vault" .
        "$build/vault" version
    ) >>"$log" 2>&1 || { tail -n 40 "$log" >&2; peers_die "vault build failed (full log: $log)"; }

    mkdir -p "$VAULT_CACHE_DIR"
    cp "$build/vault" "$VAULT_BIN.tmp" && mv "$VAULT_BIN.tmp" "$VAULT_BIN"
    rm -rf "$build"
    peers_log "cached $VAULT_BIN ($("$VAULT_BIN" version))"
    echo "$VAULT_BIN"
}

cmd_path() {
    [ -x "$VAULT_BIN" ] || { peers_log "vault not built; run: $0 build"; exit 1; }
    echo "$VAULT_BIN"
}

cmd_start() {
    [ $# -eq 2 ] || [ $# -eq 3 ] || usage
    local dir=$1 port=$2 tls=${3:-}
    [[ $port =~ ^[0-9]+$ ]] && [ "$port" -gt 1024 ] && [ "$port" -lt 65536 ] || peers_die "bad PORT: $port"
    [ -z "$tls" ] || [ "$tls" = --tls ] || usage
    mkdir -p "$dir"; dir=$(cd "$dir" && pwd)

    if [ -f "$dir/env" ]; then
        local pid; pid=$(peers_env_get "$dir/env" VAULT_PID)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            peers_log "already running ($dir/env)"; cat "$dir/env"; return 0
        fi
        cmd_stop "$dir"
    fi
    local bin; bin=$(cmd_path)
    # The dev server also listens on PORT+1 (its cluster port).
    peers_port_free "$port" || peers_die "port $port on 127.0.0.1 is in use"
    peers_port_free "$((port + 1))" || peers_die "port $((port + 1)) on 127.0.0.1 (vault cluster port) is in use"

    local token=${VAULT_DEV_ROOT_TOKEN:-$(openssl rand -hex 16)}
    local scheme=http tls_args=() curl_tls=()
    if [ -n "$tls" ]; then
        scheme=https
        rm -rf "$dir/tls"; mkdir -p "$dir/tls"
        tls_args=(-dev-tls "-dev-tls-cert-dir=$dir/tls")
    fi
    # -dev: in-memory storage, unsealed, root token given; -dev-no-store-token: leave ~/.vault-token alone.
    HOME=$dir setsid "$bin" server -dev -dev-root-token-id="$token" -dev-listen-address="127.0.0.1:$port" \
        -dev-no-store-token "${tls_args[@]}" </dev/null >"$dir/vault.log" 2>&1 &
    local pid=$!
    {
        echo "VAULT_ADDR=$scheme://127.0.0.1:$port"
        echo "VAULT_TOKEN=$token"
        echo "VAULT_PID=$pid"
        [ -z "$tls" ] || echo "VAULT_CACERT=$dir/tls/vault-ca.pem"
    } >"$dir/env"
    chmod 600 "$dir/env"
    if [ -n "$tls" ]; then
        for _ in $(seq 1 60); do [ -f "$dir/tls/vault-ca.pem" ] && break; sleep 0.5; done
        curl_tls=(--cacert "$dir/tls/vault-ca.pem")
    fi
    if ! peers_wait_http "$scheme://127.0.0.1:$port/v1/sys/health" 60 "${curl_tls[@]}"; then
        tail -n 30 "$dir/vault.log" >&2
        cmd_stop "$dir"
        peers_die "vault did not become healthy (log: $dir/vault.log)"
    fi
    peers_log "vault ready at $scheme://127.0.0.1:$port (env: $dir/env)"
    cat "$dir/env"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir=$1
    [ -f "$dir/env" ] || { peers_log "nothing started in $dir"; return 0; }
    peers_kill_pid "$(peers_env_get "$dir/env" VAULT_PID)"
    rm -f "$dir/env"
    peers_log "stopped ($dir)"
}

case "${1:-}" in
    build) shift; cmd_build "$@" ;;
    path) shift; cmd_path "$@" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) usage ;;
esac
