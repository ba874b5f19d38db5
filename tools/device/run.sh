#!/bin/sh
# One device call: hand the carried part(s) to the runner; the call that completes the set installs and measures.
# Usage (from the repository root, on the device): sh tools/device/run.sh PART [runner options...]
set -e
B=.run/device-bundle
part=$1; shift
exec python3 -m tools.device.runner --manifest "$B/manifest.json" --part "$B/$part" --out "${OUT:-/tmp/swl-out}" "$@"
