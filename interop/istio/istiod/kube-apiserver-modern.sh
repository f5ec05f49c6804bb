#!/usr/bin/env bash
# A current kube-apiserver (KUBE_VERSION below), built from the Go module proxy, plus Debian's etcd.
# Modern istiod needs APIs that the 1.20 API server of scripts/peers/kube-apiserver.sh lacks
# (discovery.k8s.io/v1 EndpointSlices, 1.21+); everything else mirrors that script.
#
# Usage:
#   kube-apiserver-modern.sh build                 build (once) and cache the binary
#   kube-apiserver-modern.sh start DIR PORT_BASE   etcd on PORT_BASE / PORT_BASE+1, https on PORT_BASE+2; writes DIR/env
#   kube-apiserver-modern.sh stop DIR
#
# k8s.io/kubernetes replaces its k8s.io/* staging modules with ./staging/... folders that its module
# zip does not hold, so `go install ...@version` cannot build it. The build uses a throwaway wrapper
# module that requires k8s.io/kubernetes and replaces each staging module with its published
# v0.<minor>.<patch> twin (the same code).
set -euo pipefail

KUBE_VERSION=${KUBE_MODERN_VERSION:-1.36.3}
CACHE=${MESHCA_PEERS_CACHE:-/var/cache/meshca-peers}
KDIR=$CACHE/kube-apiserver-$KUBE_VERSION
KBIN=$KDIR/kube-apiserver

die() { echo "kube-apiserver-modern.sh: $*" >&2; exit 1; }
log() { echo "[kube-apiserver-modern] $*" >&2; }

cmd_build() {
    [ -x "$KBIN" ] && { echo "$KBIN"; return 0; }
    command -v go >/dev/null || die "'go' not on PATH"
    mkdir -p "$KDIR"
    exec 7>"$KDIR/.lock"; flock 7
    [ -x "$KBIN" ] && { echo "$KBIN"; return 0; }
    local w=$KDIR/wrapper minor=${KUBE_VERSION#*.}; minor=${minor%%.*}
    rm -rf "$w"; mkdir -p "$w"
    local start; start=$(date +%s)
    log "building kube-apiserver v$KUBE_VERSION from the Go module proxy into $KDIR ..."
    (
        cd "$w"
        curl -fsS "$(go env GOPROXY | cut -d, -f1)/k8s.io/kubernetes/@v/v$KUBE_VERSION.mod" -o k8s.mod ||
            die "cannot fetch k8s.io/kubernetes@v$KUBE_VERSION's go.mod from the module proxy"
        {
            echo "module meshca/kube-apiserver-build"
            echo; echo "go $(awk '$1 == "go" { print $2; exit }' k8s.mod)"; echo
            echo "require k8s.io/kubernetes v$KUBE_VERSION"; echo; echo "replace ("
            awk '$1 ~ /^k8s\.io\// && $2 == "=>" && $3 ~ /^\.\/staging\// { print "\t" $1 " => " $1 " v0.'"${KUBE_VERSION#*.}"'" }' k8s.mod
            echo ")"
        } >go.mod
        go get "k8s.io/kubernetes/cmd/kube-apiserver@v$KUBE_VERSION"
        local v=v$KUBE_VERSION
        nice -n 19 go build -trimpath -buildvcs=false -o "$KBIN.tmp" -ldflags "-s -w \
            -X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1 \
            -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=archive \
            -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1 \
            -X k8s.io/client-go/pkg/version.gitMinor=$minor" k8s.io/kubernetes/cmd/kube-apiserver
    ) >&2 || die "kube-apiserver v$KUBE_VERSION build failed"
    mv -f "$KBIN.tmp" "$KBIN"
    rm -rf "$w"
    log "built in $(($(date +%s) - start))s: $("$KBIN" --version) ($(du -h "$KBIN" | cut -f1))"
    echo "$KBIN"
}

wait_http() { # URL SECONDS [curl args]
    local url=$1 n=$2; shift 2
    for _ in $(seq "$n"); do curl -fsS --max-time 2 "$@" "$url" >/dev/null 2>&1 && return 0; sleep 1; done
    return 1
}

make_certs() {
    local d=$1
    [ -f "$d/certs/apiserver.crt" ] && return 0
    mkdir -p "$d/certs"
    (
        cd "$d/certs"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=meshca-test-kube-ca" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
        openssl ecparam -name prime256v1 -genkey -noout -out apiserver.key
        openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth" \
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1" >apiserver.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 3650 \
            -extfile apiserver.ext -out apiserver.crt
        rm -f apiserver.csr apiserver.ext ca.srl
    ) >"$d/certs.log" 2>&1 || { cat "$d/certs.log" >&2; die "certificate generation failed"; }
}

cmd_start() {
    [ $# -eq 2 ] || die "usage: start DIR PORT_BASE"
    local dir=$1 base=$2 bin
    bin=$(cmd_build)
    command -v etcd >/dev/null || die "etcd not installed (apt-get install etcd-server)"
    mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
    local etcd_port=$base etcd_peer=$((base + 1)) api_port=$((base + 2))
    local url=https://127.0.0.1:$api_port
    [ -f "$dir/env" ] && cmd_stop "$dir"
    make_certs "$dir"
    [ -f "$dir/sa.key" ] || {
        openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
        openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
    }
    printf 'admintoken,admin,1,"system:masters"\n' >"$dir/tokens.csv"
    chmod 600 "$dir/tokens.csv" "$dir/sa.key" "$dir/certs/"*.key

    setsid etcd --name "meshca-$base" --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "meshca-$base=http://127.0.0.1:$etcd_peer" </dev/null >"$dir/etcd.log" 2>&1 &
    local etcd_pid=$!
    wait_http "http://127.0.0.1:$etcd_port/health" 30 || { kill $etcd_pid; tail -n 20 "$dir/etcd.log" >&2; die "etcd not healthy"; }

    setsid "$bin" --etcd-servers="http://127.0.0.1:$etcd_port" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
        --tls-cert-file="$dir/certs/apiserver.crt" --tls-private-key-file="$dir/certs/apiserver.key" \
        --client-ca-file="$dir/certs/ca.crt" --service-cluster-ip-range=10.0.0.0/24 \
        --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$dir/sa.pub" \
        --service-account-signing-key-file="$dir/sa.key" \
        --authorization-mode=RBAC --token-auth-file="$dir/tokens.csv" --endpoint-reconciler-type=none \
        </dev/null >"$dir/kube-apiserver.log" 2>&1 &
    local api_pid=$!
    cat >"$dir/env" <<EOF
KUBE_URL=$url
KUBE_CA=$dir/certs/ca.crt
KUBE_ADMIN_TOKEN=admintoken
KUBE_APISERVER_PID=$api_pid
ETCD_PID=$etcd_pid
EOF
    if ! wait_http "$url/readyz" 120 --cacert "$dir/certs/ca.crt" -H "Authorization: Bearer admintoken"; then
        tail -n 30 "$dir/kube-apiserver.log" >&2
        cmd_stop "$dir"
        die "kube-apiserver did not become ready (log: $dir/kube-apiserver.log)"
    fi
    log "kube-apiserver v$KUBE_VERSION ready at $url"
    cat "$dir/env"
}

cmd_stop() {
    local dir=$1 pid
    [ -f "$dir/env" ] || return 0
    for k in KUBE_APISERVER_PID ETCD_PID; do
        pid=$(sed -n "s/^$k=//p" "$dir/env")
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -f "$dir/env"
}

case "${1:-}" in
    build) cmd_build ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) sed -n '6,9p' "$0" >&2; exit 2 ;;
esac
