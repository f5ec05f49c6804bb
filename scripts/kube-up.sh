#!/usr/bin/env bash
# `meshca up`, in Kubernetes mode: local kube-apiservers (one management cluster, N workload
# clusters; scripts/peers/kube-apiserver.sh), the deploy/ manifests applied to them as they are,
# and the same topology as `meshca up` with Kubernetes stores — management-plane replicas that
# elect a leader with a Lease and keep their state in Secrets, one agent per cluster writing
# `istio-system/cacerts`, one workload CA per cluster authenticating callers by TokenReview.
# No kubelet runs here, so meshca's processes run on this machine with the service-account
# tokens the manifests define (TokenRequest), exactly the permissions they would have in pods.
#
# Usage: scripts/kube-up.sh [DIR]        (Ctrl-C stops everything)
#   CLUSTERS=2 REPLICAS=2 PORT_BASE=32000 INTERMEDIATE_TTL=720h scripts/kube-up.sh
# Needs the kube-apiserver peer (`bash scripts/peers/kube-apiserver.sh build`, Go, ~4-9 min once).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dir=${1:-$repo/meshca-kube-up-$(date +%s)}
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
clusters=${CLUSTERS:-2}
replicas=${REPLICAS:-2}
base=${PORT_BASE:-32000}
ttl=${INTERMEDIATE_TTL:-720h}
peers=$repo/scripts/peers/kube-apiserver.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}

say() { printf '%s\n' "$*"; }
pids=()
cleanup() {
    say "stopping"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for d in "$dir"/kube-*; do [ -d "$d" ] && bash "$peers" stop "$d" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT INT TERM

say "building meshca"
cargo build -q --release -p meshca
cargo build -q --release -p meshca-kube --features testing --example kube-apply
meshca=$CARGO_TARGET_DIR/release/meshca
apply=$CARGO_TARGET_DIR/release/examples/kube-apply
bash "$peers" path >/dev/null || { say "kube-apiserver not built: run bash $peers build"; exit 1; }

# start NAME INDEX: an API server on PORT_BASE + 10*INDEX; loads its env into K_<NAME>_*.
start() {
    local name=$1 i=$2
    bash "$peers" start "$dir/kube-$name" $((base + 10 * i)) >"$dir/kube-$name.start.log"
    say "  kube-apiserver for $name: $(grep '^KUBE_URL=' "$dir/kube-$name/env" | cut -d= -f2)"
}
url() { grep '^KUBE_URL=' "$dir/kube-$1/env" | cut -d= -f2; }
ca() { grep '^KUBE_CA=' "$dir/kube-$1/env" | cut -d= -f2; }
admin_file() { printf admintoken >"$dir/kube-$1/admin-token"; echo "$dir/kube-$1/admin-token"; }
# token CLUSTER NS SA [AUDIENCE] -> a TokenRequest JWT
token() {
    local aud=${4:+\"audiences\":[\"$4\"],}
    curl -fsS --cacert "$(ca "$1")" -H "Authorization: Bearer admintoken" -H 'Content-Type: application/json' \
        -X POST "$(url "$1")/api/v1/namespaces/$2/serviceaccounts/$3/token" \
        -d "{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenRequest\",\"spec\":{$aud\"expirationSeconds\":86400}}" |
        sed -n 's/.*"token": *"\([^"]*\)".*/\1/p' | tr -d '\n'
}
kube_flags() { echo "--kube-url $(url "$1") --kube-ca $(ca "$1") --kube-token-file $2"; }

say "meshca kube-up: $clusters workload clusters, $replicas management replicas, in $dir"
start mgmt 0
for i in $(seq 1 "$clusters"); do start "cluster-$i" "$i"; done

# Management cluster: CRD, RBAC, the policy (its TTL as asked).
sed "s/\"ttl\":\"720h\"/\"ttl\":\"$ttl\"/" deploy/management/policy.yaml >"$dir/policy.yaml"
# namespaces NAME...: a manifest creating them (what helm install --create-namespace and Istio do).
namespaces() { for n in "$@"; do printf -- '---\napiVersion: v1\nkind: Namespace\nmetadata: { name: %s }\n' "$n"; done >"$dir/ns-$1.yaml"; echo "$dir/ns-$1.yaml"; }
"$apply" "$(url mgmt)" "$(ca mgmt)" "$(admin_file mgmt)" "$(namespaces meshca)" deploy/crds/roottrustpolicies.meshca.io.yaml deploy/management/rbac.yaml
sleep 2 # the new CRD is served within a moment
"$apply" "$(url mgmt)" "$(ca mgmt)" "$(admin_file mgmt)" "$dir/policy.yaml"
token mgmt meshca meshca-server >"$dir/meshca-server.token"
first_addr=
for r in $(seq 1 "$replicas"); do
    port=$((base + 100 + r)); addr=127.0.0.1:$port
    # shellcheck disable=SC2046
    "$meshca" server $(kube_flags mgmt "$dir/meshca-server.token") --listen "$addr" --advertise-address "$addr" \
        --replica-id "replica-$r" --data-dir "$dir/mgmt-$r" --report-interval 5s >"$dir/server-$r.log" 2>&1 &
    pids+=($!)
    first_addr=${first_addr:-$addr}
    say "  management replica-$r on $addr (log $dir/server-$r.log)"
done
for _ in $(seq 1 100); do "$meshca" status --credentials "$dir/mgmt-1/operator" >/dev/null 2>&1 && break; sleep 0.3; done

for i in $(seq 1 "$clusters"); do
    c=cluster-$i
    "$apply" "$(url "$c")" "$(ca "$c")" "$(admin_file "$c")" "$(namespaces meshca-system istio-system)" deploy/workload/rbac.yaml
    token "$c" meshca-system meshca-agent >"$dir/$c-agent.token"
    token "$c" istio-system istiod >"$dir/$c-istiod.token"
    "$meshca" cluster add "$c" --credentials "$dir/mgmt-1/operator" --token-out "$dir/$c.bootstrap" --relay-ca-out "$dir/relay-ca.pem" >/dev/null
    # Agents reach the management plane through the last replica: a follower forwards to the leader.
    # shellcheck disable=SC2046
    "$meshca" agent --cluster "$c" --server "127.0.0.1:$((base + 100 + replicas))" --token-file "$dir/$c.bootstrap" \
        --relay-ca "$dir/relay-ca.pem" --max-backoff 5s $(kube_flags "$c" "$dir/$c-agent.token") >"$dir/agent-$c.log" 2>&1 &
    pids+=($!)
    # shellcheck disable=SC2046
    "$meshca" workload-ca --cacerts "$dir/$c-cacerts" --cacerts-secret istio-system/cacerts --tokenreview \
        --cluster-name "$c" --listen "127.0.0.1:$((base + 200 + i))" $(kube_flags "$c" "$dir/$c-istiod.token") \
        >"$dir/workload-ca-$c.log" 2>&1 &
    pids+=($!)
done

for i in $(seq 1 "$clusters"); do
    c=cluster-$i
    for _ in $(seq 1 200); do [ -f "$dir/$c-cacerts/ca-cert.pem" ] && break; sleep 0.3; done
    say ""
    say "== $c: istio-system/cacerts (mirrored to $dir/$c-cacerts)"
    "$meshca" verify --cacerts "$dir/$c-cacerts" || true
    say "   workload CA (TokenReview) on 127.0.0.1:$((base + 200 + i)); a caller's token:"
    say "   curl -sS --cacert $(ca "$c") -H 'Authorization: Bearer admintoken' -H 'Content-Type: application/json' -X POST $(url "$c")/api/v1/namespaces/istio-system/serviceaccounts/istiod/token -d '{\"spec\":{\"audiences\":[\"istio-ca\"]}}'"
done
say ""
say "== RootTrustPolicy meshca/mesh status"
sleep 6
curl -fsS --cacert "$(ca mgmt)" -H "Authorization: Bearer admintoken" \
    "$(url mgmt)/apis/meshca.io/v1alpha1/namespaces/meshca/roottrustpolicies/mesh" |
    { if command -v python3 >/dev/null; then python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["status"], indent=2))'; else cat; fi; }
say ""
say "leader: $(curl -fsS --cacert "$(ca mgmt)" -H "Authorization: Bearer admintoken" \
    "$(url mgmt)/apis/coordination.k8s.io/v1/namespaces/meshca/leases/meshca-leader" | sed -n 's/.*"holderIdentity": *"\([^"]*\)".*/\1/p')"
say "status: $meshca status --credentials $dir/mgmt-1/operator"
say "running; Ctrl-C stops everything"
wait
