#!/usr/bin/env bash
# Re-fetches the dashboard's charting library (uPlot, MIT) from the npm registry into
# ui/vendor/uplot/ and checks the package against the recorded hash. The files are committed;
# the build never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.6.32
SHA256=4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$VERSION" >/dev/null)
echo "$SHA256  $tmp/uplot-$VERSION.tgz" | sha256sum -c -
tar xzf "$tmp/uplot-$VERSION.tgz" -C "$tmp"
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$tmp/package/LICENSE" ui/vendor/uplot/
echo "uplot $VERSION (npm, sha256 $SHA256)" > ui/vendor/uplot/VERSION
