#!/usr/bin/env bash
# Proves the peers do what meshca needs, with plain curl + openssl (the sequences in docs/peers.md).
# Starts its own instances on loopback in a temp folder, and stops them at the end.
#
# Usage: smoke.sh [kube|vault|cfssl]...      (default: all three; vault includes Kubernetes auth)
# Env:   MESHCA_PEERS_SMOKE_PORT_BASE (default 27000): uses PORT_BASE .. PORT_BASE+20
#        MESHCA_PEERS_SMOKE_KEEP=1 keeps the temp folder and leaves the servers running
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

# Only the instances this script starts are used, never ones named by the caller's environment.
unset KUBE_URL KUBE_CA KUBE_ADMIN_TOKEN VAULT_ADDR VAULT_TOKEN VAULT_CACERT VT
base=${MESHCA_PEERS_SMOKE_PORT_BASE:-27000}
work=$(mktemp -d /tmp/meshca-peers-smoke.XXXXXX)
passed=0 failed=0

cleanup() {
    if [ -n "${MESHCA_PEERS_SMOKE_KEEP:-}" ]; then peers_log "kept $work"; return; fi
    "$here/vault.sh" stop "$work/vault" >/dev/null 2>&1 || true
    "$here/cfssl.sh" stop "$work/cfssl" >/dev/null 2>&1 || true
    "$here/kube-apiserver.sh" stop "$work/kube" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# check NAME CMD...: runs CMD in a subshell with errexit on (so every step of a multi-step check
# counts; deliberately not in an `if`, where bash would ignore errexit), prints one line.
check() {
    local name=$1 rc; shift
    set +e
    ( set -e; "$@" ) >"$work/check.out" 2>&1
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1)); printf 'ok   %s\n' "$name"
    else
        failed=$((failed + 1)); printf 'FAIL %s\n' "$name"; tail -n 8 "$work/check.out" | sed 's/^/     /'
    fi
}

# expect_json FILE JQ_FILTER: true when the filter yields true for FILE.
expect_json() { jq -e "$2" "$1" >/dev/null || { echo "unexpected response:"; head -c 600 "$1"; return 1; }; }

# ---------------------------------------------------------------- kube
start_kube() { # idempotent: a second call finds it running
    "$here/kube-apiserver.sh" start "$work/kube" "$base" >/dev/null
    # shellcheck disable=SC1091
    . "$work/kube/env"
}
K() { curl -sS --fail-with-body --cacert "$KUBE_CA" -H "Authorization: Bearer $KUBE_ADMIN_TOKEN" \
    -H 'Content-Type: application/json' "$@"; }
kube_token() { # kube_token NS SA [AUDIENCE] -> JWT on stdout (TokenRequest API)
    local aud=${3:+\"audiences\":[\"$3\"],}
    K -X POST "$KUBE_URL/api/v1/namespaces/$1/serviceaccounts/$2/token" \
        -d "{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenRequest\",\"spec\":{${aud}\"expirationSeconds\":86400}}" |
        jq -r .status.token
}
kube_apply_basics() {
    K -X POST "$KUBE_URL/api/v1/namespaces" -d '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"meshca"}}' >/dev/null
    K -X POST "$KUBE_URL/api/v1/namespaces/meshca/serviceaccounts" \
        -d '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"meshca-agent"}}' >/dev/null
    K -X POST "$KUBE_URL/api/v1/namespaces/meshca/serviceaccounts" \
        -d '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"vault-reviewer"}}' >/dev/null
    # No controller-manager runs: bind the reviewer to system:auth-delegator ourselves.
    K -X POST "$KUBE_URL/apis/rbac.authorization.k8s.io/v1/clusterrolebindings" -d '{
      "apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding",
      "metadata":{"name":"vault-reviewer-auth-delegator"},
      "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"system:auth-delegator"},
      "subjects":[{"kind":"ServiceAccount","name":"vault-reviewer","namespace":"meshca"}]}' >/dev/null
}
smoke_kube() {
    echo "== kube-apiserver"
    check "kube: start etcd + kube-apiserver, /readyz" start_kube
    [ -f "$work/kube/env" ] && . "$work/kube/env"
    check "kube: /version is v1.36.3" bash -c "curl -sS --cacert '$KUBE_CA' -H 'Authorization: Bearer $KUBE_ADMIN_TOKEN' '$KUBE_URL/version' | jq -e '.gitVersion==\"v1.36.3\"'"
    check "kube: namespace, service accounts, auth-delegator binding" kube_apply_basics
    check "kube: TokenRequest + TokenReview" kube_tokenreview
    check "kube: Secret create/get" kube_secret
    check "kube: RBAC denies a service account without a role (403)" kube_rbac_denied
}
kube_tokenreview() {
    local jwt; jwt=$(kube_token meshca meshca-agent istio-ca)
    K -X POST "$KUBE_URL/apis/authentication.k8s.io/v1/tokenreviews" \
        -d "{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenReview\",\"spec\":{\"token\":\"$jwt\",\"audiences\":[\"istio-ca\"]}}" >"$work/tr.json"
    expect_json "$work/tr.json" '.status.authenticated and .status.user.username=="system:serviceaccount:meshca:meshca-agent"'
}
kube_secret() {
    K -X POST "$KUBE_URL/api/v1/namespaces/meshca/secrets" -d '{"apiVersion":"v1","kind":"Secret",
      "metadata":{"name":"cacerts"},"type":"Opaque","data":{"root-cert.pem":"cm9vdA=="}}' >/dev/null
    K "$KUBE_URL/api/v1/namespaces/meshca/secrets/cacerts" >"$work/secret.json"
    expect_json "$work/secret.json" '.data["root-cert.pem"]=="cm9vdA=="'
}
kube_rbac_denied() {
    local jwt code; jwt=$(kube_token meshca meshca-agent)
    code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$KUBE_CA" -H "Authorization: Bearer $jwt" \
        "$KUBE_URL/api/v1/namespaces/meshca/secrets")
    [ "$code" = 403 ] || { echo "got HTTP $code"; return 1; }
}

# ---------------------------------------------------------------- vault
V() { curl -sS --fail-with-body -H "X-Vault-Token: ${VT:-$VAULT_TOKEN}" -H 'Content-Type: application/json' "$@"; }
start_vault() {
    "$here/vault.sh" start "$work/vault" "$((base + 10))" >/dev/null
    # shellcheck disable=SC1091
    . "$work/vault/env"
    V "$VAULT_ADDR/v1/sys/health" >"$work/health.json"
    expect_json "$work/health.json" '.initialized and (.sealed|not)'
}
vault_pki_root() {
    V -X POST "$VAULT_ADDR/v1/sys/mounts/pki" -d '{"type":"pki"}'
    V -X POST "$VAULT_ADDR/v1/sys/mounts/pki/tune" -d '{"max_lease_ttl":"87600h"}'
    V -X POST "$VAULT_ADDR/v1/pki/root/generate/internal" -d '{"common_name":"meshca test root",
      "organization":"meshca","key_type":"ec","key_bits":256,"ttl":"87600h"}' >"$work/root.json"
    expect_json "$work/root.json" '.data.certificate and (.data.private_key == null)'
    jq -r .data.certificate "$work/root.json" >"$work/root.pem"
    openssl x509 -in "$work/root.pem" -noout -text | grep -q 'NIST CURVE: P-256'
}
vault_sign_intermediate() { # VT may hold a non-root token
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/int.key" 2>/dev/null
    openssl req -new -key "$work/int.key" -subj "/O=meshca/CN=meshca intermediate/L=cluster-1" -out "$work/int.csr"
    jq -n --rawfile csr "$work/int.csr" '{csr:$csr, common_name:"meshca intermediate", ttl:"720h",
        format:"pem", max_path_length:0, uri_sans:"spiffe://cluster.local", organization:"meshca",
        locality:"cluster-1"}' | V -X POST "$VAULT_ADDR/v1/pki/root/sign-intermediate" --data @- >"$work/signed.json"
    expect_json "$work/signed.json" '.data.certificate and .data.issuing_ca and (.data.ca_chain|length>=1) and .data.serial_number'
    jq -r .data.certificate "$work/signed.json" >"$work/int.pem"
    openssl verify -CAfile "$work/root.pem" "$work/int.pem"
    # The signed certificate carries the CSR's key (P-256).
    [ "$(openssl x509 -in "$work/int.pem" -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum)" = \
      "$(openssl pkey -in "$work/int.key" -pubout -outform DER | sha256sum)" ]
    openssl x509 -in "$work/int.pem" -noout -text | grep -q 'URI:spiffe://cluster.local'
}
vault_intermediate_exported() {
    V -X POST "$VAULT_ADDR/v1/sys/mounts/pki_int" -d '{"type":"pki"}'
    V -X POST "$VAULT_ADDR/v1/sys/mounts/pki_int/tune" -d '{"max_lease_ttl":"8760h"}'
    V -X POST "$VAULT_ADDR/v1/pki_int/intermediate/generate/exported" \
        -d '{"common_name":"meshca intermediate 2","key_type":"ec","key_bits":256}' >"$work/gen.json"
    expect_json "$work/gen.json" '.data.csr and .data.private_key'
    jq '{csr:.data.csr, common_name:"meshca intermediate 2", ttl:"720h", format:"pem_bundle"}' "$work/gen.json" |
        V -X POST "$VAULT_ADDR/v1/pki/root/sign-intermediate" --data @- >"$work/signed2.json"
    jq '{certificate:.data.certificate}' "$work/signed2.json" |
        V -X POST "$VAULT_ADDR/v1/pki_int/intermediate/set-signed" --data @- >"$work/setsigned.json"
    expect_json "$work/setsigned.json" '(.data.imported_issuers|length)>=1'
}
vault_policy() {
    jq -n '{policy:"path \"pki/root/sign-intermediate\" { capabilities = [\"update\"] }\npath \"auth/token/renew-self\" { capabilities = [\"update\"] }\npath \"auth/token/lookup-self\" { capabilities = [\"read\"] }"}' |
        V -X PUT "$VAULT_ADDR/v1/sys/policies/acl/meshca-signer" --data @-
}
vault_approle() {
    V -X POST "$VAULT_ADDR/v1/sys/auth/approle" -d '{"type":"approle"}'
    V -X POST "$VAULT_ADDR/v1/auth/approle/role/meshca" -d '{"token_policies":["meshca-signer"],"token_ttl":"1h","token_max_ttl":"4h"}'
    local role_id secret_id
    role_id=$(V "$VAULT_ADDR/v1/auth/approle/role/meshca/role-id" | jq -r .data.role_id)
    secret_id=$(V -X POST "$VAULT_ADDR/v1/auth/approle/role/meshca/secret-id" | jq -r .data.secret_id)
    curl -sS --fail-with-body -X POST "$VAULT_ADDR/v1/auth/approle/login" \
        -d "{\"role_id\":\"$role_id\",\"secret_id\":\"$secret_id\"}" >"$work/approle.json"
    expect_json "$work/approle.json" '.auth.client_token and (.auth.policies|index("meshca-signer")) and .auth.lease_duration==3600 and .auth.renewable'
}
vault_approle_token_use() {
    local VT; VT=$(jq -r .auth.client_token "$work/approle.json")
    vault_sign_intermediate
    V "$VAULT_ADDR/v1/auth/token/lookup-self" | jq -e '.data.policies|index("meshca-signer")' >/dev/null
    V -X POST "$VAULT_ADDR/v1/auth/token/renew-self" -d '{"increment":"1h"}' | jq -e '.auth.client_token' >/dev/null
    # ...and nothing else: generating a root is denied with Vault's error shape.
    local code; code=$(curl -sS -o "$work/denied.json" -w '%{http_code}' -H "X-Vault-Token: $VT" -X POST \
        "$VAULT_ADDR/v1/pki/root/generate/internal" -d '{"common_name":"x"}')
    [ "$code" = 403 ] && expect_json "$work/denied.json" '.errors[0]|test("permission denied")'
}
vault_k8s_auth() {
    kube_apply_basics 2>/dev/null || true   # already there when the kube checks ran
    local reviewer; reviewer=$(kube_token meshca vault-reviewer)
    V -X POST "$VAULT_ADDR/v1/sys/auth/kubernetes" -d '{"type":"kubernetes"}'
    jq -n --arg host "$KUBE_URL" --rawfile ca "$KUBE_CA" --arg jwt "$reviewer" \
        '{kubernetes_host:$host, kubernetes_ca_cert:$ca, token_reviewer_jwt:$jwt}' |
        V -X POST "$VAULT_ADDR/v1/auth/kubernetes/config" --data @-
    V -X POST "$VAULT_ADDR/v1/auth/kubernetes/role/meshca" -d '{"bound_service_account_names":["meshca-agent"],
      "bound_service_account_namespaces":["meshca"],"audience":"vault","token_policies":["meshca-signer"],"token_ttl":"1h"}'
    local jwt; jwt=$(kube_token meshca meshca-agent vault)
    curl -sS --fail-with-body -X POST "$VAULT_ADDR/v1/auth/kubernetes/login" \
        -d "{\"role\":\"meshca\",\"jwt\":\"$jwt\"}" >"$work/k8slogin.json"
    expect_json "$work/k8slogin.json" '.auth.client_token and (.auth.policies|index("meshca-signer")) and .auth.metadata.service_account_name=="meshca-agent"'
    local VT; VT=$(jq -r .auth.client_token "$work/k8slogin.json")
    vault_sign_intermediate
}
vault_k8s_auth_rejects() {
    # A JWT for another service account, and one with the wrong audience, are refused.
    K -X POST "$KUBE_URL/api/v1/namespaces/meshca/serviceaccounts" \
        -d '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"intruder"}}' >/dev/null 2>&1 || true
    local jwt code
    jwt=$(kube_token meshca intruder vault)
    code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$VAULT_ADDR/v1/auth/kubernetes/login" -d "{\"role\":\"meshca\",\"jwt\":\"$jwt\"}")
    [ "$code" = 403 ] || { echo "other SA: HTTP $code"; return 1; }
    jwt=$(kube_token meshca meshca-agent not-vault)
    code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$VAULT_ADDR/v1/auth/kubernetes/login" -d "{\"role\":\"meshca\",\"jwt\":\"$jwt\"}")
    [ "$code" = 403 ] || { echo "wrong audience: HTTP $code"; return 1; }
}
vault_ttl_over_max() {
    # Requesting a TTL above the mount's max is capped or refused, never silently exceeding the max.
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/big.key" 2>/dev/null
    openssl req -new -key "$work/big.key" -subj "/CN=big" -out "$work/big.csr"
    jq -n --rawfile csr "$work/big.csr" '{csr:$csr, common_name:"big", ttl:"200000h"}' |
        curl -sS -H "X-Vault-Token: $VAULT_TOKEN" -X POST "$VAULT_ADDR/v1/pki/root/sign-intermediate" --data @- >"$work/big.json"
    if jq -e '.errors' "$work/big.json" >/dev/null; then return 0; fi
    local na; na=$(jq -r .data.certificate "$work/big.json" | openssl x509 -noout -enddate | cut -d= -f2)
    [ "$(date -d "$na" +%s)" -le "$(( $(date +%s) + 87600 * 3600 + 60 ))" ]
}
vault_tls() {
    "$here/vault.sh" start "$work/vault-tls" "$((base + 12))" --tls >/dev/null
    local addr tok ca; addr=$(peers_env_get "$work/vault-tls/env" VAULT_ADDR)
    tok=$(peers_env_get "$work/vault-tls/env" VAULT_TOKEN); ca=$(peers_env_get "$work/vault-tls/env" VAULT_CACERT)
    curl -sS --fail-with-body --cacert "$ca" -H "X-Vault-Token: $tok" "$addr/v1/auth/token/lookup-self" | jq -e .data.id >/dev/null
    "$here/vault.sh" stop "$work/vault-tls" >/dev/null
}
smoke_vault() {
    echo "== vault"
    check "vault: start -dev, sys/health unsealed" start_vault
    [ -f "$work/vault/env" ] && . "$work/vault/env"
    check "vault: mount pki, tune max_lease_ttl, root/generate/internal (EC P-256)" vault_pki_root
    check "vault: root/sign-intermediate of an openssl P-256 CSR (root token)" vault_sign_intermediate
    check "vault: TTL above the mount max is capped or refused" vault_ttl_over_max
    check "vault: second mount, intermediate/generate/exported, sign, set-signed" vault_intermediate_exported
    check "vault: ACL policy meshca-signer" vault_policy
    check "vault: AppRole enable, role, role-id, secret-id, login" vault_approle
    check "vault: AppRole token signs, lookup-self, renew-self, is denied elsewhere" vault_approle_token_use
    if [ -z "${KUBE_URL:-}" ]; then
        check "kube: start etcd + kube-apiserver, /readyz" start_kube
        [ -f "$work/kube/env" ] && . "$work/kube/env"
    fi
    check "vault: Kubernetes auth against kube-apiserver, login, sign" vault_k8s_auth
    check "vault: Kubernetes auth refuses another SA / wrong audience" vault_k8s_auth_rejects
    check "vault: -dev-tls server answers over https with its CA" vault_tls
}

# ---------------------------------------------------------------- cfssl
cfssl_start() {
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/cf-ca.key" 2>/dev/null
    openssl req -x509 -new -key "$work/cf-ca.key" -sha256 -days 30 -subj "/O=meshca/CN=cfssl bench CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
        -out "$work/cf-ca.pem"
    "$here/cfssl.sh" start "$work/cfssl" "$((base + 20))" "$work/cf-ca.pem" "$work/cf-ca.key" >/dev/null
}
cfssl_sign() {
    local url; url=$(peers_env_get "$work/cfssl/env" CFSSL_SIGN_URL)
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/leaf.key" 2>/dev/null
    openssl req -new -key "$work/leaf.key" -subj "/CN=sleep" -addext "subjectAltName=DNS:sleep.default.svc" -out "$work/leaf.csr"
    jq -n --rawfile csr "$work/leaf.csr" '{certificate_request:$csr, profile:"leaf"}' |
        curl -sS --fail-with-body -X POST -H 'Content-Type: application/json' "$url" --data @- >"$work/cf.json"
    expect_json "$work/cf.json" '.success and .result.certificate'
    jq -r .result.certificate "$work/cf.json" >"$work/leaf.pem"
    openssl verify -CAfile "$work/cf-ca.pem" "$work/leaf.pem"
    openssl x509 -in "$work/leaf.pem" -noout -text | grep -q 'TLS Web Server Authentication, TLS Web Client Authentication'
}
smoke_cfssl() {
    echo "== cfssl"
    check "cfssl: serve with a P-256 CA" cfssl_start
    check "cfssl: /api/v1/cfssl/sign of a P-256 CSR, chain verifies" cfssl_sign
}

command -v jq >/dev/null || peers_apt_install jq
[ $# -gt 0 ] || set -- kube vault cfssl
for what in "$@"; do
    case "$what" in
        kube) smoke_kube ;;
        vault) smoke_vault ;;
        cfssl) smoke_cfssl ;;
        *) peers_die "unknown peer: $what (kube|vault|cfssl)" ;;
    esac
done
echo "peers smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
