#!/bin/sh
# One device call: hand the carried part (if any) to the runner; the call that completes the set installs and
# measures the models, a later call with no part measures the stack (docs/gpu.md lists the calls).
# Usage (from the repository root, on the device): sh tools/device/run.sh [PART] [runner options...]
set -e
B=.run/device-bundle
case "$1" in
  swl-device-bundle.tar.part*) part="--part $B/$1"; shift ;;
  *) part="" ;;
esac
exec python3 -m tools.device.runner --manifest "$B/manifest.json" $part --out "${OUT:-/tmp/swl-out}" "$@"
