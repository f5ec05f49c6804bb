#!/usr/bin/env bash
# A real Kubernetes API server (1.20.2, built from Debian's `kubernetes` source package with Debian's
# Go 1.19) plus Debian's etcd, for meshca's Kubernetes store / auth tests. See docs/peers.md.
#
# Usage:
#   kube-apiserver.sh build                 build (once) and cache the binary; install etcd-server
#   kube-apiserver.sh path                  print the cached binary path (exit 1 if not built)
#   kube-apiserver.sh start DIR PORT_BASE   etcd on PORT_BASE (client) / PORT_BASE+1 (peer),
#                                           kube-apiserver https on PORT_BASE+2; writes DIR/env
#   kube-apiserver.sh stop DIR              stop what `start DIR` started
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

KUBE_VERSION=1.20.2
KUBE_SRC_PKG_VERSION=1.20.5+really1.20.2
KUBE_CACHE_DIR=$MESHCA_PEERS_CACHE/kube-apiserver-$KUBE_VERSION
KUBE_BIN=$KUBE_CACHE_DIR/kube-apiserver
GO119_BIN=/usr/lib/go-1.19/bin
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2

usage() { sed -n '5,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# Adds a deb-src twin of the machine's Debian apt sources (deb822 or one-line form), once.
ensure_deb_src() {
    if grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    local out=/etc/apt/sources.list.d/meshca-peers-deb-src.sources found=0 f tmp
    tmp=$(mktemp)
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        grep -qE '^URIs:.*/debian(-security)?/?$' "$f" || continue
        # Keep only stanzas whose Types include `deb`, rewritten as deb-src (mawk-compatible regex).
        awk 'BEGIN{RS=""; ORS="\n\n"} /(^|\n)Types:([^\n]* )?deb( [^\n]*)?(\n|$)/ { sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f" >>"$tmp"
    done
    if [ -f /etc/apt/sources.list ] && grep -qE '^deb .*/debian' /etc/apt/sources.list; then
        grep -E '^deb .*/debian' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"${out%.sources}.list"
        found=1
    fi
    if [ -s "$tmp" ]; then install -m 644 "$tmp" "$out"; found=1; fi
    rm -f "$tmp"
    [ "$found" = 1 ] || peers_die "no Debian apt source found to derive a deb-src entry from"
    peers_log "added deb-src entry ($out)"
    PEERS_APT_UPDATED=; peers_apt_update
}

cmd_build() {
    peers_need_root
    peers_lock kube-apiserver
    # etcd is needed to run the API server; make sure it is there even when the binary is cached.
    peers_apt_install etcd-server curl openssl ca-certificates
    if [ -x "$KUBE_BIN" ]; then
        echo "$KUBE_BIN"
        return 0
    fi
    peers_apt_install golang-1.19-go rsync golang-github-modern-go-reflect2-dev make gcc libc6-dev tar gzip
    ensure_deb_src

    local build=$MESHCA_PEERS_CACHE/build/kube-apiserver-$KUBE_VERSION
    local log=$MESHCA_PEERS_CACHE/build/kube-apiserver-$KUBE_VERSION.log
    rm -rf "$build"
    mkdir -p "$build/dl" "$build/src"
    peers_log "building kube-apiserver $KUBE_VERSION (log: $log)"
    (
        cd "$build/dl"
        apt-get source --download-only kubernetes
        tar -xzf "kubernetes_$KUBE_SRC_PKG_VERSION.orig.tar.gz" -C "$build/src" --strip-components=1
    ) >"$log" 2>&1 || { tail -n 30 "$log" >&2; peers_die "fetching the kubernetes source package failed"; }
    rm -rf "$build/dl"

    # Go >= 1.18 breaks the vendored reflect2 1.0.1 (nil pointer in frozenConfig.Type2 when decoding
    # JSON maps); swap in Debian's 1.0.2 copy.
    [ -f "$REFLECT2_SRC/reflect2.go" ] || peers_die "reflect2 source not found at $REFLECT2_SRC"
    rm -rf "$build/src/vendor/github.com/modern-go/reflect2"
    cp -r "$REFLECT2_SRC" "$build/src/vendor/github.com/modern-go/reflect2"
    rm -f "$build/src/vendor/github.com/modern-go/reflect2/go.mod" "$build/src/vendor/github.com/modern-go/reflect2/go.sum"

    # The tarball has no git metadata: pin the version that /version reports.
    cat >"$build/version.env" <<VEOF
KUBE_GIT_COMMIT=''
KUBE_GIT_TREE_STATE='archive'
KUBE_GIT_VERSION='v$KUBE_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
VEOF

    (
        cd "$build/src"
        export PATH="$GO119_BIN:$PATH" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GO111MODULE=
        export KUBE_GIT_VERSION_FILE="$build/version.env" GOCACHE="$build/gocache" GOPATH="$build/gopath"
        go version
        nice -n 10 make generated_files
        nice -n 10 make WHAT=cmd/kube-apiserver
    ) >>"$log" 2>&1 || { tail -n 40 "$log" >&2; peers_die "kube-apiserver build failed (full log: $log)"; }

    local out=$build/src/_output/bin/kube-apiserver
    [ -x "$out" ] || out=$(find "$build/src/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
    [ -n "$out" ] && [ -x "$out" ] || peers_die "build finished but no kube-apiserver binary (log: $log)"
    "$out" --version >>"$log" 2>&1 || peers_die "built kube-apiserver does not run (log: $log)"
    mkdir -p "$KUBE_CACHE_DIR"
    cp "$out" "$KUBE_BIN.tmp" && mv "$KUBE_BIN.tmp" "$KUBE_BIN"
    # The source tree + caches are several GB; only the binary is worth keeping.
    rm -rf "$build"
    peers_log "cached $KUBE_BIN ($("$KUBE_BIN" --version))"
    echo "$KUBE_BIN"
}

cmd_path() {
    [ -x "$KUBE_BIN" ] || { peers_log "kube-apiserver not built; run: $0 build"; exit 1; }
    echo "$KUBE_BIN"
}

# Writes a P-256 CA and a serving certificate for 127.0.0.1 / localhost / the in-cluster names.
make_certs() {
    local d=$1
    [ -f "$d/certs/apiserver.crt" ] && [ -f "$d/certs/ca.crt" ] && return 0
    mkdir -p "$d/certs"
    (
        cd "$d/certs"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=meshca-test-kube-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
        openssl ecparam -name prime256v1 -genkey -noout -out apiserver.key
        openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr
        cat >apiserver.ext <<'XEOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1
XEOF
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 3650 \
            -extfile apiserver.ext -out apiserver.crt
        rm -f apiserver.csr apiserver.ext ca.srl
    ) >"$d/certs.log" 2>&1 || { cat "$d/certs.log" >&2; peers_die "certificate generation failed"; }
}

cmd_start() {
    [ $# -eq 2 ] || usage
    local dir=$1 base=$2
    [[ $base =~ ^[0-9]+$ ]] && [ "$base" -gt 1024 ] && [ "$base" -lt 65533 ] || peers_die "bad PORT_BASE: $base"
    mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
    local etcd_port=$base etcd_peer=$((base + 1)) api_port=$((base + 2))
    local url=https://127.0.0.1:$api_port

    # Already running (same DIR)? Then this is a no-op.
    if [ -f "$dir/env" ]; then
        local apid; apid=$(peers_env_get "$dir/env" KUBE_APISERVER_PID)
        if [ -n "$apid" ] && kill -0 "$apid" 2>/dev/null &&
            curl -fsS --max-time 2 --cacert "$dir/certs/ca.crt" -H "Authorization: Bearer admintoken" \
                "$(peers_env_get "$dir/env" KUBE_URL)/readyz" >/dev/null 2>&1; then
            peers_log "already running ($dir/env)"; cat "$dir/env"; return 0
        fi
        cmd_stop "$dir"
    fi

    local bin; bin=$(cmd_path)
    command -v etcd >/dev/null || peers_die "etcd not installed; run: $0 build"
    for p in "$etcd_port" "$etcd_peer" "$api_port"; do
        peers_port_free "$p" || peers_die "port $p on 127.0.0.1 is in use"
    done

    make_certs "$dir"
    [ -f "$dir/sa.key" ] || {
        openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
        openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
    }
    printf 'admintoken,admin,1,"system:masters"\nagenttoken,agent,2\n' >"$dir/tokens.csv"
    chmod 600 "$dir/tokens.csv" "$dir/sa.key" "$dir/certs/"*.key

    setsid etcd --name "meshca-$base" --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "meshca-$base=http://127.0.0.1:$etcd_peer" \
        </dev/null >"$dir/etcd.log" 2>&1 &
    local etcd_pid=$!
    if ! peers_wait_http "http://127.0.0.1:$etcd_port/health" 30; then
        kill "$etcd_pid" 2>/dev/null || true
        tail -n 20 "$dir/etcd.log" >&2; peers_die "etcd did not become healthy"
    fi

    setsid "$bin" --etcd-servers="http://127.0.0.1:$etcd_port" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
        --tls-cert-file="$dir/certs/apiserver.crt" --tls-private-key-file="$dir/certs/apiserver.key" \
        --client-ca-file="$dir/certs/ca.crt" \
        --service-cluster-ip-range=10.0.0.0/24 \
        --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$dir/sa.pub" \
        --service-account-signing-key-file="$dir/sa.key" \
        --authorization-mode=RBAC --token-auth-file="$dir/tokens.csv" \
        --insecure-port=0 --endpoint-reconciler-type=none \
        </dev/null >"$dir/kube-apiserver.log" 2>&1 &
    local api_pid=$!

    cat >"$dir/env" <<EOF
KUBE_URL=$url
KUBE_CA=$dir/certs/ca.crt
KUBE_SERVING_CERT=$dir/certs/apiserver.crt
KUBE_ADMIN_TOKEN=admintoken
KUBE_APISERVER_PID=$api_pid
ETCD_PID=$etcd_pid
ETCD_URL=http://127.0.0.1:$etcd_port
EOF
    if ! peers_wait_http "$url/readyz" 90 --cacert "$dir/certs/ca.crt" -H "Authorization: Bearer admintoken"; then
        tail -n 30 "$dir/kube-apiserver.log" >&2
        cmd_stop "$dir"
        peers_die "kube-apiserver did not become ready (log: $dir/kube-apiserver.log)"
    fi
    peers_log "kube-apiserver ready at $url (env: $dir/env)"
    cat "$dir/env"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir=$1
    [ -f "$dir/env" ] || { peers_log "nothing started in $dir"; return 0; }
    peers_kill_pid "$(peers_env_get "$dir/env" KUBE_APISERVER_PID)"
    peers_kill_pid "$(peers_env_get "$dir/env" ETCD_PID)"
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
