#!/usr/bin/env bash
# Runs every test meshca has, fastest first, so that a lint or unit failure shows in a minute:
#
#   1. the fast lane, no external peer: `cargo fmt --check`, clippy with warnings denied, the docs
#      with warnings denied, `cargo check` of the fuzz crate (fuzz/), the unit, property and
#      in-process tests of every crate and the integration tests of the library crates
#      (OpenSSL interop, the directory and SQLite stores' conformance, crash and migration tests);
#   2. the external peers, built here once and cached outside the checkout (docs/peers.md; root for
#      apt-get; cold ~25 min on 2 cores, seconds afterwards), unless the environment names them:
#        MESHCA_ISTIO_INTEROP       the Istio interop harness (interop/istio/build.sh)
#        MESHCA_VAULT_BIN           Vault (scripts/peers/vault.sh build)
#        MESHCA_KUBE_APISERVER_BIN  kube-apiserver 1.36 (scripts/peers/kube-apiserver.sh build; also
#                                   installs Debian's etcd, which the tests start themselves)
#        MESHCA_PILOT_DISCOVERY_BIN istiod (interop/istio/istiod/run.sh build)
#        MESHCA_HELM_BIN            helm v4 (scripts/peers/helm.sh build), for the charts' tests
#        MESHCA_CHROMIUM_BIN        Debian's Chromium, for the dashboard (scripts/peers/chromium.sh build)
#        MESHCA_SPIRE_BIN           SPIRE's server, for SPIFFE federation (scripts/peers/spire.sh build)
#   3. the tests that run meshca's processes and the peers: the integration tests of the crates
#      in END_TO_END below (Istio's own code, istiod, Vault, Kubernetes, `meshca up`, ...).
#
# `scripts/test.sh --fast` stops after step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export MESHCA_PEERS_CACHE="${MESHCA_PEERS_CACHE:-/var/cache/meshca-peers}"
SECONDS=0
fast_only=
case "${1:-}" in
    "") ;;
    --fast) fast_only=1 ;;
    *) echo "usage: scripts/test.sh [--fast]" >&2; exit 2 ;;
esac
step() { echo "== $* (${SECONDS}s so far)" >&2; }

# The crates whose integration tests (crates/<crate>/tests/*.rs) start meshca's processes or an
# external peer; every other crate's integration tests belong in the fast lane.
END_TO_END=(meshca kube)
# `cargo test --workspace --test NAME` runs every crate's test of that name, so names must be unique.
dup=$(for f in crates/*/tests/*.rs; do basename "$f"; done | sort | uniq -d)
[ -z "$dup" ] || { echo "integration tests with the same name in two crates: $dup" >&2; exit 1; }
fast_tests=() e2e_tests=()
for f in crates/*/tests/*.rs; do
    crate=${f#crates/}; crate=${crate%%/*}
    if [[ " ${END_TO_END[*]} " == *" $crate "* ]]; then e2e_tests+=(--test "$(basename "$f" .rs)"); else fast_tests+=(--test "$(basename "$f" .rs)"); fi
done

# ---- 1. the fast lane ------------------------------------------------------------------------
# Each step selects the whole workspace, so every step reuses one build (a narrower package set
# would resolve features differently and rebuild the dependency tree).
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked
step "cargo check of the fuzz crate"
# In the workspace's target folder: the fuzz crate's lock pins the workspace's versions, so the
# dependencies clippy just checked are reused instead of checked a second time.
CARGO_TARGET_DIR=target cargo check --manifest-path fuzz/Cargo.toml --locked
step "unit, property and in-process tests"
cargo test --workspace --locked --lib --bins "${fast_tests[@]}"
cargo test --workspace --locked --doc
if [ -n "$fast_only" ]; then
    echo "== the fast lane passed in ${SECONDS}s" >&2
    exit 0
fi

# ---- 2. the external peers -------------------------------------------------------------------
peer() { # VAR COMMAND...: run COMMAND (it prints the path last) unless VAR names a file already
    local var=$1; shift
    if [ -z "${!var:-}" ] || [ ! -e "${!var}" ]; then
        step "$var: $*"
        local path; path=$("$@" | tail -n1)
        export "$var=$path"
    fi
    echo "   $var=${!var} (${SECONDS}s so far)" >&2
}
# The harness is keyed by the hash of its sources and build.sh answers in seconds when that build
# is cached, so it always decides: a path exported for an older harness (without a newer
# subcommand) is never reused.
unset MESHCA_ISTIO_INTEROP
peer MESHCA_ISTIO_INTEROP bash interop/istio/build.sh
peer MESHCA_VAULT_BIN bash scripts/peers/vault.sh build
peer MESHCA_KUBE_APISERVER_BIN bash scripts/peers/kube-apiserver.sh build
# Real istiod (pilot-discovery), for tests/istiod.rs, which finds it in the cache
# (interop/istio/istiod/README.md; cold ~3-11 min, seconds afterwards).
peer MESHCA_PILOT_DISCOVERY_BIN bash interop/istio/istiod/run.sh build
# helm v4 from the module proxy, for tests/kube_chart.rs (charts/, deploy/ rendered from them).
peer MESHCA_HELM_BIN bash scripts/peers/helm.sh build
# Headless Chromium for the dashboard's browser tests (crates/meshca/tests/dashboard_browser.rs; an apt package).
peer MESHCA_CHROMIUM_BIN bash scripts/peers/chromium.sh build
# SPIRE's server from the module proxy, for tests/spire.rs (SPIFFE federation both ways; cold ~10 min
# of CPU, seconds afterwards).
peer MESHCA_SPIRE_BIN bash scripts/peers/spire.sh build

# ---- 3. the end-to-end tests -----------------------------------------------------------------
step "end-to-end tests (${END_TO_END[*]})"
cargo test --workspace --locked --no-fail-fast "${e2e_tests[@]}"
echo "== all tests passed in ${SECONDS}s" >&2
