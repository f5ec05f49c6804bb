#!/usr/bin/env bash
# deploy/ is rendered from the charts (charts/meshca-management, charts/meshca-cluster) with their
# default values, one file per template, so the plain YAML reviewers read and the tests apply is
# exactly what `helm install` creates. Edit the charts, then run this; the tests
# (crates/meshca/tests/kube_chart.rs) run it with --check and fail when deploy/ is stale.
#
# Usage: scripts/render-deploy.sh [--check]     (helm: $MESHCA_HELM_BIN, else scripts/peers/helm.sh path)
set -euo pipefail
cd "$(dirname "$0")/.."
helm=${MESHCA_HELM_BIN:-$(bash scripts/peers/helm.sh path)}
check=
case "${1:-}" in
    "") ;;
    --check) check=1 ;;
    *) sed -n '7p' "$0" | sed 's/^# //' >&2; exit 2 ;;
esac
out=deploy
if [ -n "$check" ]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
mkdir -p "$out/crds" "$out/management" "$out/workload"

# render CHART NAMESPACE TEMPLATE DEST
render() {
    {
        echo "# Rendered from charts/$1/templates/$3.yaml by scripts/render-deploy.sh (default values); edit the chart, not this file."
        "$helm" template meshca "charts/$1" --namespace "$2" --show-only "templates/$3.yaml" | sed '/^# Source: /d'
    } >"$out/$4"
}
cp charts/meshca-management/crds/roottrustpolicies.meshca.io.yaml "$out/crds/"
for t in rbac server policy; do render meshca-management meshca "$t" "management/$t.yaml"; done
for t in rbac agent workload-ca; do render meshca-cluster meshca-system "$t" "workload/$t.yaml"; done

if [ -n "$check" ]; then
    diff -ru deploy "$out" >&2 || { echo "deploy/ differs from the charts: run scripts/render-deploy.sh" >&2; exit 1; }
    echo "deploy/ matches the charts"
fi
