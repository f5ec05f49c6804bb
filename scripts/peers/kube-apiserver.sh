#!/usr/bin/env bash
# A real Kubernetes API server (KUBE_VERSION below, built from the Go module proxy's k8s.io/kubernetes
# module) plus Debian's etcd, for every Kubernetes test: meshca's Kubernetes store, policy status,
# RBAC, TokenReview, leader election, the Helm chart, istiod's Deployment, and istiod itself
# (interop/istio/istiod/run.sh). See docs/peers.md and docs/kubernetes.md (the supported range).
#
# Usage:
#   kube-apiserver.sh build                 build (once) and cache the binary; install etcd-server
#   kube-apiserver.sh path                  print the cached binary path (exit 1 if not built)
#   kube-apiserver.sh start DIR PORT_BASE   etcd on PORT_BASE (client) / PORT_BASE+1 (peer),
#                                           kube-apiserver https on PORT_BASE+2; writes DIR/env
#   kube-apiserver.sh stop DIR              stop what `start DIR` started
#
# k8s.io/kubernetes replaces its k8s.io/* staging modules with ./staging/... folders that its module
# zip does not hold, so `go install ...@version` cannot build it. The build uses a throwaway wrapper
# module that requires k8s.io/kubernetes and replaces each staging module with its published
# v0.<minor>.<patch> twin (the same code).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

KUBE_VERSION=${MESHCA_KUBE_VERSION:-1.36.3}
KUBE_CACHE_DIR=$MESHCA_PEERS_CACHE/kube-apiserver-$KUBE_VERSION
KUBE_BIN=$KUBE_CACHE_DIR/kube-apiserver

usage() { sed -n '7,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd_build() {
    # etcd is needed to run the API server; make sure it is there even when the binary is cached.
    command -v etcd >/dev/null || { peers_need_root; peers_apt_install etcd-server; }
    peers_apt_install curl openssl ca-certificates
    [ -x "$KUBE_BIN" ] && { echo "$KUBE_BIN"; return 0; }
    command -v go >/dev/null || peers_die "the Go toolchain is required (go not on PATH)"
    peers_lock kube-apiserver
    [ -x "$KUBE_BIN" ] && { echo "$KUBE_BIN"; return 0; }
    local w=$KUBE_CACHE_DIR/wrapper minor=${KUBE_VERSION#*.} start=$SECONDS
    minor=${minor%%.*}
    local log=$MESHCA_PEERS_CACHE/build/kube-apiserver-$KUBE_VERSION.log
    rm -rf "$w"; mkdir -p "$w" "$(dirname "$log")"
    peers_log "building kube-apiserver v$KUBE_VERSION from the Go module proxy (log: $log)"
    (
        cd "$w"
        curl -fsS "$(go env GOPROXY | cut -d, -f1)/k8s.io/kubernetes/@v/v$KUBE_VERSION.mod" -o k8s.mod ||
            peers_die "cannot fetch k8s.io/kubernetes@v$KUBE_VERSION's go.mod from the module proxy"
        {
            echo "module meshca/kube-apiserver-build"
            echo; echo "go $(awk '$1 == "go" { print $2; exit }' k8s.mod)"; echo
            echo "require k8s.io/kubernetes v$KUBE_VERSION"; echo; echo "replace ("
            awk '$1 ~ /^k8s\.io\// && $2 == "=>" && $3 ~ /^\.\/staging\// { print "\t" $1 " => " $1 " v0.'"${KUBE_VERSION#*.}"'" }' k8s.mod
            echo ")"
        } >go.mod
        go get "k8s.io/kubernetes/cmd/kube-apiserver@v$KUBE_VERSION"
        local v=v$KUBE_VERSION
        nice -n 19 go build -trimpath -buildvcs=false -o "$KUBE_BIN.tmp" -ldflags "-s -w \
            -X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1 \
            -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=archive \
            -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1 \
            -X k8s.io/client-go/pkg/version.gitMinor=$minor" k8s.io/kubernetes/cmd/kube-apiserver
    ) >"$log" 2>&1 || { tail -n 30 "$log" >&2; peers_die "kube-apiserver v$KUBE_VERSION build failed (log: $log)"; }
    "$KUBE_BIN.tmp" --version >>"$log" 2>&1 || peers_die "the built kube-apiserver does not run (log: $log)"
    mv -f "$KUBE_BIN.tmp" "$KUBE_BIN"
    rm -rf "$w"
    peers_log "built in $((SECONDS - start))s: $("$KUBE_BIN" --version) ($(du -h "$KUBE_BIN" | cut -f1))"
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
        --endpoint-reconciler-type=none \
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
