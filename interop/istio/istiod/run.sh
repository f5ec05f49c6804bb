#!/usr/bin/env bash
# Real istiod (pilot-discovery, built from istio.io/istio at the version interop/istio/go.mod pins)
# running in plug-in CA mode on meshca's `cacerts`, against a real kube-apiserver.
#
#   1. builds pilot-discovery (cached by version under $MESHCA_PEERS_CACHE) and the istio-interop harness
#   2. starts a kube-apiserver (scripts/peers/kube-apiserver.sh), applies Istio's CRDs, creates istio-system,
#      namespace demo + ServiceAccount sleep, and mints a TokenRequest JWT (audience istio-ca)
#   3. runs `meshca up --clusters 1`; istiod's ROOT_CA_DIR is that cluster's cacerts folder
#      (meshca's agent writes it like a Kubernetes Secret volume: ..data symlink swap)
#   4. starts istiod, checks it logged plug-in mode, and asks it for a workload cert through the
#      harness (`istio-interop request-cert`, Istio's own CA client): the chain must be
#      leaf <- meshca's current intermediate <- meshca's root
#   5. `meshca rotate`: the agent swaps in a new intermediate (same root); istiod must pick it up
#      without a restart, and the next cert must be signed by the new intermediate
#   5b. `meshca revoke`: the intermediate is revoked; the agent writes a new one and a ca-crl.pem whose
#      root CRL names the old serial; istiod (which loaded meshca's ca-crl.pem from the start) accepts
#      both without a restart, signs with the new intermediate, and replicates the CRL into the
#      istio-ca-crl ConfigMap of namespace demo in the real API server
#   6. `meshca rotate root` (istiod runs with ISTIO_MULTIROOT_MESH=true): root-cert.pem goes
#      {A} -> {A, B} -> {B} and the intermediate moves from A to B; istiod accepts every step
#      without a restart ("Updating new ROOT-CA", never "not supported"), and Istio's CA client
#      gets a leaf chaining to A, then to B, each answer carrying the roots of its phase
#
# `run.sh build` only builds (or finds cached) pilot-discovery and the kube-apiserver and prints
# pilot-discovery's path.
#
# Exit 0: all passed. Non-zero: one `FAIL istiod/run.sh: ...` line on stderr says what failed.
#
# Environment:
#   MESHCA_PEERS_CACHE  cache root (default /var/cache/meshca-peers)
#   MESHCA_BIN          meshca binary (default <repo>/target/release/meshca)
#   ISTIOD_WORK_DIR     scratch folder (default: a fresh mktemp folder, removed on success)
#   ISTIOD_PORT_BASE    first of 9 loopback ports used (default 27400): etcd +0/+1, API server +2, istiod +3..+8
#
# The API server is the one every Kubernetes test uses (scripts/peers/kube-apiserver.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
interop=$(cd "$here/.." && pwd)
repo=$(cd "$here/../../.." && pwd)
CACHE=${MESHCA_PEERS_CACHE:-/var/cache/meshca-peers}
MESHCA=${MESHCA_BIN:-$repo/target/release/meshca}
PORT_BASE=${ISTIOD_PORT_BASE:-27400}
kube_script=$repo/scripts/peers/kube-apiserver.sh

die() { echo "FAIL istiod/run.sh: $*" >&2; exit 1; }
log() { echo "[istiod/run.sh] $*" >&2; }

ISTIO_VERSION=$(awk '$1 == "require" && $2 == "istio.io/istio" { print $3 }' "$interop/go.mod")
[ -n "$ISTIO_VERSION" ] || die "cannot read the istio.io/istio version from $interop/go.mod"
[ "${1:-}" = build ] || [ -x "$MESHCA" ] || die "meshca binary not found at $MESHCA (build it: cargo build --release -p meshca, or set MESHCA_BIN)"
command -v go >/dev/null || die "'go' not on PATH"
command -v python3 >/dev/null || die "'python3' not on PATH"

own_work=0
if [ -z "${ISTIOD_WORK_DIR:-}" ]; then ISTIOD_WORK_DIR=$(mktemp -d /tmp/meshca-istiod.XXXXXX); own_work=1; fi
mkdir -p "$ISTIOD_WORK_DIR"; W=$(cd "$ISTIOD_WORK_DIR" && pwd)

istiod_pid='' meshca_pid='' kube_started=''
cleanup() {
    local rc=$?
    [ -n "$istiod_pid" ] && kill "$istiod_pid" 2>/dev/null && wait "$istiod_pid" 2>/dev/null || true
    [ -n "$meshca_pid" ] && kill "$meshca_pid" 2>/dev/null && wait "$meshca_pid" 2>/dev/null || true
    [ -n "$kube_started" ] && $kube_stop "$W/kube" >/dev/null 2>&1 || true
    if [ $rc -eq 0 ] && [ $own_work = 1 ]; then rm -rf "$W"; else log "logs and files kept in $W"; fi
}
trap cleanup EXIT

# ---- 1. binaries -------------------------------------------------------------------------------
PD_DIR=$CACHE/pilot-discovery-$ISTIO_VERSION
PD=$PD_DIR/pilot-discovery
if [ ! -x "$PD" ]; then
    mkdir -p "$PD_DIR"
    exec 8>"$PD_DIR/.lock"; flock 8
    if [ ! -x "$PD" ]; then
        log "building pilot-discovery $ISTIO_VERSION into $PD_DIR (10-20 min cold on 2 cores) ..."
        start=$(date +%s)
        rm -rf "$PD_DIR/.gobin"
        # istio.io/istio's go.mod has no replace directives, so `go install pkg@version` builds it with
        # exactly Istio's own dependency versions. Tags as in Istio's Makefile (STANDARD_TAGS).
        GOBIN="$PD_DIR/.gobin" nice -n 19 go install -trimpath -buildvcs=false -tags=vtprotobuf,disable_pgv \
            -ldflags='-s -w' "istio.io/istio/pilot/cmd/pilot-discovery@$ISTIO_VERSION" >&2 ||
            die "building pilot-discovery $ISTIO_VERSION failed"
        mv -f "$PD_DIR/.gobin/pilot-discovery" "$PD"
        rm -rf "$PD_DIR/.gobin"
        log "built pilot-discovery in $(($(date +%s) - start))s ($(du -h "$PD" | cut -f1))"
    fi
    exec 8>&-
fi
HARNESS=$(bash "$interop/build.sh" | tail -n1) || die "building the istio-interop harness failed"
# Istio's CRDs, from the same module version (downloaded by the build above).
ISTIO_SRC=$(cd / && go mod download -json "istio.io/istio@$ISTIO_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') ||
    die "cannot locate istio.io/istio@$ISTIO_VERSION in the module cache"
CRDS=$ISTIO_SRC/manifests/charts/base/files/crd-all.gen.yaml
[ -f "$CRDS" ] || die "Istio CRDs not found at $CRDS"

# `run.sh build`: only build (or find in the cache) both Go binaries this check needs, print
# pilot-discovery's path last, and stop (scripts/test.sh does this before the tests run).
if [ "${1:-}" = build ]; then
    bash "$kube_script" build >/dev/null || die "building kube-apiserver failed"
    echo "$PD"
    exit 0
fi

# ---- 2. kube-apiserver + what istiod needs ------------------------------------------------------
kube_stop="bash $kube_script stop"
bash "$kube_script" start "$W/kube" "$PORT_BASE" >"$W/kube-start.log" 2>&1 ||
    { tail -n 20 "$W/kube-start.log" >&2; die "kube-apiserver did not start (log: $W/kube-start.log)"; }
kube_started=1
# shellcheck disable=SC1091
. "$W/kube/env"
kube() { curl -sS --fail-with-body --cacert "$KUBE_CA" -H "Authorization: Bearer $KUBE_ADMIN_TOKEN" -H 'Content-Type: application/json' "$@"; }
log "kube-apiserver $(kube "$KUBE_URL/version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gitVersion"])') at $KUBE_URL"

# Current istiod watches discovery.k8s.io/v1 EndpointSlices (Kubernetes 1.21+) with a plain informer, and
# opens its CA port (15012) only after every informer has synced: without that API it never serves.
kube -o /dev/null "$KUBE_URL/apis/discovery.k8s.io/v1" 2>/dev/null ||
    log "WARNING: this API server has no discovery.k8s.io/v1 (EndpointSlice); istiod will never open its CA port"

cat >"$W/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "$KUBE_URL", certificate-authority: "$KUBE_CA"}
users:
- name: admin
  user: {token: "$KUBE_ADMIN_TOKEN"}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
EOF

create() { # PATH JSON: POST, 409 (exists) is fine
    local code
    code=$(kube -o "$W/create.out" -w '%{http_code}' -X POST "$KUBE_URL$1" -d "$2" || true)
    case "$code" in 200 | 201 | 409) ;; *) die "POST $1 -> HTTP $code: $(head -c 400 "$W/create.out")" ;; esac
}
create /api/v1/namespaces '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"istio-system"}}'
create /api/v1/namespaces '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"demo"}}'
create /api/v1/namespaces/demo/serviceaccounts '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"sleep"}}'
python3 "$here/apply-crds.py" "$KUBE_URL" "$KUBE_CA" "$KUBE_ADMIN_TOKEN" "$CRDS" >&2 || die "applying Istio's CRDs failed"
kube -X POST "$KUBE_URL/api/v1/namespaces/demo/serviceaccounts/sleep/token" \
    -d '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":["istio-ca"],"expirationSeconds":3600}}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["token"])' >"$W/sleep.token" ||
    die "TokenRequest for demo/sleep failed"

# ---- 3. meshca: one cluster whose agent keeps cacerts fresh ---------------------------------------
# 20 s leaves and 2 s of skew: a root rotation takes well under a minute (10 s + 22 s of waits).
nice -n 10 "$MESHCA" up --clusters 1 --dir "$W/mesh" --duration 1h --call-interval 10s --leaf-ttl 20s \
    --rotation-skew 2s >"$W/meshca-up.log" 2>&1 &
meshca_pid=$!
for _ in $(seq 60); do [ -f "$W/mesh/topology.json" ] && break; kill -0 $meshca_pid 2>/dev/null || break; sleep 1; done
[ -f "$W/mesh/topology.json" ] || { tail -n 20 "$W/meshca-up.log" >&2; die "meshca up wrote no topology.json"; }
CACERTS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["clusters"][0]["cacerts_dir"])' "$W/mesh/topology.json")
OPERATOR=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["management_plane"]["credentials"])' "$W/mesh/topology.json")
for _ in $(seq 30); do [ -s "$CACERTS/ca-key.pem" ] && break; sleep 1; done
[ -s "$CACERTS/ca-key.pem" ] || die "meshca wrote no cacerts in $CACERTS"
# ca-crl.pem comes with the bundle (or right after it, once the root's CRL is published).
for _ in $(seq 30); do [ -s "$CACERTS/ca-crl.pem" ] && break; sleep 1; done
[ -s "$CACERTS/ca-crl.pem" ] || die "meshca wrote no ca-crl.pem in $CACERTS"
"$HARNESS" check-cacerts "$CACERTS" >&2 || die "meshca's cacerts rejected by Istio's own checks"

# ---- 4. istiod ------------------------------------------------------------------------------------
P_HTTP=$((PORT_BASE + 3)) P_GRPC=$((PORT_BASE + 4)) P_SGRPC=$((PORT_BASE + 5)) P_MON=$((PORT_BASE + 6))
P_HTTPS=$((PORT_BASE + 7)) P_CTRLZ=$((PORT_BASE + 8))
mkdir -p "$W/istiod"
(
    cd "$W/istiod" # istiod resolves ./etc/..., ./var/... relative to its working directory
    exec env ROOT_CA_DIR="$CACERTS" POD_NAMESPACE=istio-system POD_NAME=istiod-local ISTIO_MULTIROOT_MESH=true \
        PILOT_CERT_PROVIDER=istiod ISTIOD_CUSTOM_HOST=istiod.istio-system.svc \
        KUBECONFIG="$W/kubeconfig" \
        "$PD" discovery --kubeconfig "$W/kubeconfig" --clusterID Kubernetes \
        --httpAddr "127.0.0.1:$P_HTTP" --grpcAddr "127.0.0.1:$P_GRPC" --secureGRPCAddr "127.0.0.1:$P_SGRPC" \
        --monitoringAddr "127.0.0.1:$P_MON" --httpsAddr "127.0.0.1:$P_HTTPS" \
        --ctrlz_port "$P_CTRLZ" --ctrlz_address 127.0.0.1 --log_output_level default:info
) >"$W/istiod.log" 2>&1 &
istiod_pid=$!
log "istiod pid $istiod_pid, log $W/istiod.log; waiting for the CA port $P_SGRPC"
ready=0
for _ in $(seq 180); do
    kill -0 "$istiod_pid" 2>/dev/null || { tail -n 30 "$W/istiod.log" >&2; die "istiod exited (log: $W/istiod.log)"; }
    if grep -q "starting secure gRPC discovery service" "$W/istiod.log"; then ready=1; break; fi
    sleep 1
done
[ $ready = 1 ] || { grep -E "^[^ ]+\s+(warn|error)|waiting for sync" "$W/istiod.log" | sort -u -k2 | tail -n 10 >&2; die "istiod did not open its CA port within 180s (log: $W/istiod.log)"; }
grep -q "Use local CA certificate" "$W/istiod.log" || die "istiod did not log plug-in CA mode ('Use local CA certificate')"
grep -q "Added cacerts files watcher at $CACERTS" "$W/istiod.log" || die "istiod did not watch $CACERTS"
grep -q "Detected CRL file" "$W/istiod.log" || die "istiod did not load meshca's ca-crl.pem ('Detected CRL file')"

fp() { openssl x509 -noout -fingerprint -sha256 | cut -d= -f2; }
nth_cert() { awk -v n="$2" '/-----BEGIN CERTIFICATE-----/{i++} i==n{print} /-----END CERTIFICATE-----/ && i==n{exit}' "$1"; }
request() { # OUTDIR
    "$HARNESS" request-cert --address "127.0.0.1:$P_SGRPC" --ca-file "$CACERTS/root-cert.pem" \
        --server-name istiod.istio-system.svc --token-file "$W/sleep.token" --trust-domain cluster.local \
        --cluster-id Kubernetes --expect-id spiffe://cluster.local/ns/demo/sa/sleep --out-dir "$1" >&2
}
issuer_is_current() { # OUTDIR LABEL
    local got want
    got=$(nth_cert "$1/chain.pem" 2 | fp)
    want=$(fp <"$CACERTS/ca-cert.pem")
    [ -n "$got" ] && [ "$got" = "$want" ] || die "$2: the issued chain's intermediate ($got) is not meshca's current ca-cert.pem ($want)"
    openssl verify -CAfile "$CACERTS/root-cert.pem" -untrusted "$CACERTS/ca-cert.pem" "$1/leaf.pem" >/dev/null ||
        die "$2: the leaf does not verify against meshca's root through its intermediate"
    log "$2: leaf $(openssl x509 -noout -ext subjectAltName <"$1/leaf.pem" | grep -o 'URI:[^, ]*'), serial $(openssl x509 -noout -serial <"$1/leaf.pem" | cut -d= -f2)"
    log "$2: leaf $(openssl x509 -noout -issuer <"$1/leaf.pem"); that intermediate's sha256 $got, its $(openssl x509 -noout -issuer <"$CACERTS/ca-cert.pem")"
}

request "$W/cert1" || die "istiod refused the first CSR (log: $W/istiod.log)"
issuer_is_current "$W/cert1" "before rotation"
int1=$(fp <"$CACERTS/ca-cert.pem"); root1=$(fp <"$CACERTS/root-cert.pem")

# ---- 5. rotate the intermediate (same root), no istiod restart -------------------------------------
"$MESHCA" rotate --credentials "$OPERATOR" >"$W/rotate.log" 2>&1 || { cat "$W/rotate.log" >&2; die "meshca rotate failed"; }
for _ in $(seq 60); do [ "$(fp <"$CACERTS/ca-cert.pem" 2>/dev/null)" != "$int1" ] && break; sleep 1; done
int2=$(fp <"$CACERTS/ca-cert.pem")
[ "$int2" != "$int1" ] || die "meshca did not rotate the intermediate in $CACERTS within 60s"
[ "$(fp <"$CACERTS/root-cert.pem")" = "$root1" ] || die "the root changed on rotation (expected the same root)"
log "meshca rotated the intermediate: $int1 -> $int2"
for _ in $(seq 30); do grep -q "Istiod has detected the newly added intermediate CA" "$W/istiod.log" && break; sleep 1; done
grep -q "Istiod has detected the newly added intermediate CA" "$W/istiod.log" ||
    { grep -iE "cacerts|plug-in|intermediate" "$W/istiod.log" | tail -n 10 >&2; die "istiod did not reload the rotated cacerts within 30s"; }
kill -0 "$istiod_pid" 2>/dev/null || die "istiod exited after the rotation"

request "$W/cert2" || die "istiod refused the CSR after rotation (log: $W/istiod.log)"
issuer_is_current "$W/cert2" "after rotation"

# ---- 5b. revoke the intermediate: istiod takes the new one and the CRL naming the old serial -------
count() { grep -c "$1" "$W/istiod.log" || true; }
reloaded() { count "Istiod has detected the newly added intermediate CA"; }
serial_of() { openssl x509 -noout -serial | cut -d= -f2; }
# Whether one of the CRLs in a PEM file lists serial $2 (`openssl crl` reads one CRL at a time).
crl_lists() { # FILE SERIAL
    local i=1 c
    while c=$(awk -v n=$i '/-----BEGIN X509 CRL-----/{k++} k==n{print} /-----END X509 CRL-----/ && k==n{exit}' "$1") && [ -n "$c" ]; do
        echo "$c" | openssl crl -noout -text | grep -q "Serial Number: $2" && return 0
        i=$((i + 1))
    done
    return 1
}
revoked=$(serial_of <"$CACERTS/ca-cert.pem")
crl_reloads=$(count "Istiod has detected the newly added CRL file")
"$MESHCA" revoke --cluster "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["clusters"][0]["name"])' "$W/mesh/topology.json")" \
    --credentials "$OPERATOR" >"$W/revoke.log" 2>&1 || { cat "$W/revoke.log" >&2; die "meshca revoke failed"; }
for _ in $(seq 60); do [ "$(serial_of <"$CACERTS/ca-cert.pem")" != "$revoked" ] && crl_lists "$CACERTS/ca-crl.pem" "$revoked" && break; sleep 1; done
[ "$(serial_of <"$CACERTS/ca-cert.pem")" != "$revoked" ] || die "no new intermediate within 60s of meshca revoke"
crl_lists "$CACERTS/ca-crl.pem" "$revoked" || die "ca-crl.pem does not name the revoked serial $revoked"
for _ in $(seq 30); do [ "$(count "Istiod has detected the newly added CRL file")" -gt "$crl_reloads" ] && break; sleep 1; done
[ "$(count "Istiod has detected the newly added CRL file")" -gt "$crl_reloads" ] || die "istiod did not load the new ca-crl.pem within 30s"
got=''
for _ in $(seq 60); do
    kube "$KUBE_URL/api/v1/namespaces/demo/configmaps/istio-ca-crl" 2>/dev/null |
        python3 -c 'import json,sys; sys.stdout.write(json.load(sys.stdin)["data"]["ca-crl.pem"])' >"$W/configmap-crl.pem" 2>/dev/null &&
        crl_lists "$W/configmap-crl.pem" "$revoked" && { got=1; break; }
    sleep 1
done
[ -n "$got" ] || die "istiod did not write the revoked serial $revoked into ConfigMap demo/istio-ca-crl within 60s"
# istiod reloads the new intermediate within a moment: ask until it signs with it.
for _ in $(seq 30); do
    request "$W/cert2b" 2>/dev/null && [ "$(nth_cert "$W/cert2b/chain.pem" 2 | fp)" = "$(fp <"$CACERTS/ca-cert.pem")" ] && break
    sleep 1
done
issuer_is_current "$W/cert2b" "after revoke"
kill -0 "$istiod_pid" 2>/dev/null || die "istiod exited after the revocation"
log "revoked intermediate $revoked: istiod signs with the new one and wrote the CRL into demo/istio-ca-crl"

# ---- 6. root rotation: {A} -> {A, B} -> {B}, istiod following without a restart ---------------------
roots_in_file() { # PEM: the sha256 fingerprints of its certificates, in order
    local i=1 c
    while c=$(nth_cert "$1" $i) && [ -n "$c" ]; do echo "$c" | fp; i=$((i + 1)); done
}
chain_root() { roots_in_file "$CACERTS/cert-chain.pem" | tail -n1; }
# The roots an answer carries: every self-signed certificate after the leaf and the intermediate.
answer_roots() { # OUTDIR
    local i=3 c
    while c=$(nth_cert "$1/chain.pem" $i) && [ -n "$c" ]; do
        [ "$(echo "$c" | openssl x509 -noout -subject -nameopt RFC2253 | cut -d= -f2-)" = \
            "$(echo "$c" | openssl x509 -noout -issuer -nameopt RFC2253 | cut -d= -f2-)" ] && echo "$c" | fp
        i=$((i + 1))
    done | sort -u | tr '\n' ' '
}
chains_to() { # OUTDIR ROOT_FP LABEL: the leaf verifies against that root alone
    local want=$2 only="$1/only-root.pem" i=1 c
    : >"$only"
    while c=$(nth_cert "$CACERTS/root-cert.pem" $i) && [ -n "$c" ]; do
        [ "$(echo "$c" | fp)" = "$want" ] && echo "$c" >"$only"
        i=$((i + 1))
    done
    [ -s "$only" ] || die "$3: root $want is not in root-cert.pem"
    openssl verify -CAfile "$only" -untrusted "$1/chain.pem" "$1/leaf.pem" >/dev/null ||
        die "$3: the leaf does not chain to root $want"
}
wait_reload() { # COUNT_BEFORE LABEL
    for _ in $(seq 60); do [ "$(reloaded)" -gt "$1" ] && return 0; sleep 1; done
    die "$2: istiod did not reload cacerts within 60s"
}
rootA=$root1
r0=$(reloaded)
"$MESHCA" rotate root --credentials "$OPERATOR" >"$W/rotate-root.log" 2>&1 || { cat "$W/rotate-root.log" >&2; die "meshca rotate root failed"; }
for _ in $(seq 60); do [ "$(roots_in_file "$CACERTS/root-cert.pem" | wc -l)" = 2 ] && break; sleep 1; done
mapfile -t both < <(roots_in_file "$CACERTS/root-cert.pem")
[ "${#both[@]}" = 2 ] || die "root-cert.pem did not become {A, B} within 60s"
[ "${both[0]}" = "$rootA" ] || die "root-cert.pem {A, B} does not start with A"
rootB=${both[1]}
[ "$(chain_root)" = "$rootA" ] || die "Distributing: the intermediate is not under A"
wait_reload "$r0" "Distributing"
request "$W/cert3" || die "istiod refused the CSR in Distributing (log: $W/istiod.log)"
issuer_is_current "$W/cert3" "Distributing"
chains_to "$W/cert3" "$rootA" "Distributing"
[ "$(answer_roots "$W/cert3")" = "$(printf '%s\n' "$rootA" "$rootB" | sort | tr '\n' ' ')" ] ||
    die "Distributing: the answer carries roots $(answer_roots "$W/cert3"), not {A, B}"
log "Distributing: istiod accepted {A, B} and signs under A; its answer carries A and B"

r1=$(reloaded)
for _ in $(seq 120); do [ "$(chain_root)" = "$rootB" ] && break; sleep 1; done
[ "$(chain_root)" = "$rootB" ] || die "the intermediate did not move under B within 120s"
wait_reload "$r1" "Switching"
request "$W/cert4" || die "istiod refused the CSR in Switching (log: $W/istiod.log)"
issuer_is_current "$W/cert4" "Switching"
chains_to "$W/cert4" "$rootB" "Switching"
[ "$(answer_roots "$W/cert4")" = "$(printf '%s\n' "$rootA" "$rootB" | sort | tr '\n' ' ')" ] ||
    die "Switching: the answer carries roots $(answer_roots "$W/cert4"), not {A, B}"
log "Switching: istiod signs under B; its answer still carries A and B"

r2=$(reloaded)
for _ in $(seq 120); do [ "$(roots_in_file "$CACERTS/root-cert.pem")" = "$rootB" ] && break; sleep 1; done
[ "$(roots_in_file "$CACERTS/root-cert.pem")" = "$rootB" ] || die "root-cert.pem did not become {B} within 120s"
wait_reload "$r2" "Retiring"
request "$W/cert5" || die "istiod refused the CSR after the rotation (log: $W/istiod.log)"
issuer_is_current "$W/cert5" "after the root rotation"
chains_to "$W/cert5" "$rootB" "after the root rotation"
[ "$(answer_roots "$W/cert5")" = "$rootB " ] || die "after the rotation: the answer carries roots $(answer_roots "$W/cert5"), not {B}"
kill -0 "$istiod_pid" 2>/dev/null || die "istiod exited during the root rotation"
[ "$(count 'Updating new ROOT-CA not supported')" = 0 ] || die "istiod refused a root-set step (log: $W/istiod.log)"
[ "$(count 'Multi root is disabled')" = 0 ] || die "istiod ran without ISTIO_MULTIROOT_MESH"
[ "$(count 'Failed to update new Plug-in CA certs')" = 0 ] || die "istiod refused a cacerts update (log: $W/istiod.log)"
[ $(($(count 'Updating new ROOT-CA') - $(count 'Updating new ROOT-CA not supported'))) -ge 2 ] ||
    die "istiod did not log both root-set steps ('Updating new ROOT-CA')"
log "Retiring: istiod accepted {B} and its answers carry B alone"

log "istiod log lines:"
grep -E "Use local CA certificate|Added cacerts files watcher|Update Istiod cacerts|Updating new ROOT-CA|newly added intermediate CA|Detected CRL file|newly added CRL file" "$W/istiod.log" >&2
echo "OK istiod $ISTIO_VERSION (kube-apiserver $(kube "$KUBE_URL/version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gitVersion"])')): plug-in CA on meshca cacerts; signed with intermediate $int1, then $int2 after rotation without restart; revoked $revoked with ca-crl.pem and ConfigMap istio-ca-crl; root rotation {A} -> {A,B} -> {B} followed without restart (A $rootA, B $rootB)"
