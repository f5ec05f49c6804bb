#!/usr/bin/env bash
# Runs every test meshca has: formatting and lints, unit and property tests, OpenSSL interop, the
# Istio interop harness, and the end-to-end tests with real processes and real peers (Vault,
# kube-apiserver + etcd). Peers not given in the environment are built here first, once, and
# cached outside the checkout (docs/peers.md; needs root for apt-get; cold ~25 min on 2 cores,
# seconds afterwards):
#   MESHCA_ISTIO_INTEROP       the Istio interop harness (interop/istio/build.sh)
#   MESHCA_VAULT_BIN           Vault (scripts/peers/vault.sh build)
#   MESHCA_KUBE_APISERVER_BIN  kube-apiserver 1.36 (scripts/peers/kube-apiserver.sh build; also
#                              installs Debian's etcd, which the tests start themselves)
#   MESHCA_PILOT_DISCOVERY_BIN istiod (interop/istio/istiod/run.sh build)
set -euo pipefail
cd "$(dirname "$0")/.."
export MESHCA_PEERS_CACHE="${MESHCA_PEERS_CACHE:-/var/cache/meshca-peers}"
SECONDS=0

peer() { # VAR COMMAND...: run COMMAND (it prints the path last) unless VAR names a file already
    local var=$1; shift
    if [ -z "${!var:-}" ] || [ ! -e "${!var}" ]; then
        echo "== $var: $*" >&2
        local path; path=$("$@" | tail -n1)
        export "$var=$path"
    fi
    echo "   $var=${!var} (${SECONDS}s so far)" >&2
}
peer MESHCA_ISTIO_INTEROP bash interop/istio/build.sh
peer MESHCA_VAULT_BIN bash scripts/peers/vault.sh build
peer MESHCA_KUBE_APISERVER_BIN bash scripts/peers/kube-apiserver.sh build
# Real istiod (pilot-discovery), for tests/istiod.rs, which finds it in the cache
# (interop/istio/istiod/README.md; cold ~3-11 min, seconds afterwards).
peer MESHCA_PILOT_DISCOVERY_BIN bash interop/istio/istiod/run.sh build

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
echo "== all tests passed in ${SECONDS}s" >&2
