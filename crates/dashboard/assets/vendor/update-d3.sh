#!/usr/bin/env bash
# Rebuilds d3.min.js, the dashboard's one vendored library: the minified UMD builds of the d3
# modules the page uses (time scale, axis, selection/data join) and the modules they need,
# concatenated in dependency order. Each registers itself on the global `d3`. Run it to move to
# new versions (pinned below), then check the page in the browser test (crates/meshca/tests/dashboard_browser.rs).
# Needs npm; reaches only the npm registry.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODULES=(d3-array@3.2.5 d3-color@3.1.1 d3-interpolate@3.0.2 d3-format@3.1.3 d3-time@3.1.1
         d3-time-format@4.1.1 d3-scale@4.0.3 d3-selection@3.0.1 d3-axis@3.0.1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=$work/d3.min.js
echo "// d3 modules for the meshca dashboard (ISC license, LICENSE-d3): ${MODULES[*]}" >"$out"
for m in "${MODULES[@]}"; do
    name=${m%@*}
    (cd "$work" && npm pack --silent "$m" >/dev/null)
    mkdir -p "$work/$name"
    tar xzf "$work/$name-${m#*@}.tgz" -C "$work/$name"
    cat "$work/$name/package/dist/$name.min.js" >>"$out"
    echo >>"$out"
done
cp "$work/d3-scale/package/LICENSE" "$here/LICENSE-d3"
mv "$out" "$here/d3.min.js"
echo "$here/d3.min.js: $(wc -c <"$here/d3.min.js") bytes"
