#!/usr/bin/env bash
# Builds the istio-interop test harness into a cache folder outside the checkout,
# keyed by a hash of go.mod, go.sum and *.go, and reuses it when present.
# The binary's path is the LAST line on stdout; everything else goes to stderr.
#
#   MESHCA_PEERS_CACHE  cache root (default /var/cache/meshca-peers)
#
# GOFLAGS, GOPROXY, GOCACHE, GOMODCACHE and GOTOOLCHAIN are left as the caller set them.
# go.mod needs Go >= 1.26.0 (istio.io/istio's own minimum).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! command -v go >/dev/null 2>&1; then
	echo "build.sh: 'go' not found on PATH (need Go >= 1.26)" >&2
	exit 1
fi

# Hash of go.mod + go.sum + every *.go (name and content), in a stable order.
hash="$(
	{
		for f in go.mod go.sum; do printf '%s\n' "$f"; cat "$f"; done
		find . -maxdepth 1 -name '*.go' -type f -printf '%P\n' | LC_ALL=C sort | while read -r f; do
			printf '%s\n' "$f"
			cat "$f"
		done
	} | sha256sum | cut -c1-16
)"

cache_root="${MESHCA_PEERS_CACHE:-/var/cache/meshca-peers}"
out_dir="$cache_root/istio-interop-$hash"
bin="$out_dir/istio-interop"

if [ ! -x "$bin" ]; then
	mkdir -p "$out_dir"
	# Serialize concurrent builds of the same hash (parallel test processes).
	exec 9>"$out_dir/.lock"
	flock 9
	if [ ! -x "$bin" ]; then
		echo "build.sh: building istio-interop ($hash) into $out_dir ..." >&2
		start=$(date +%s)
		tmp="$out_dir/.istio-interop.tmp.$$"
		# -buildvcs=false: the module sits in meshca's git checkout; VCS stamping
		# would only make the build depend on the repo state.
		go build -trimpath -buildvcs=false -o "$tmp" . >&2
		mv -f "$tmp" "$bin"
		echo "build.sh: built in $(($(date +%s) - start))s" >&2
	fi
	exec 9>&-
fi

echo "$bin"
