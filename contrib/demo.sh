#!/usr/bin/env bash
# Build nvlibfs and show what it would serve. On a host with the NVIDIA
# driver loaded that is the real driver; anywhere else a generated fake
# driver (real ELF libraries, firmware, ld.so.cache; a stale older version
# and a stray library beside it) stands in, so the output is still real.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --quiet
bin=target/release

if [ -e /sys/module/nvidia/version ] || [ -e /proc/driver/nvidia/version ]; then
    echo "== NVIDIA kernel module loaded: scanning this host's driver"
    "$bin/nvlibfs" scan
else
    dir=${NVLIBFS_DEMO_DIR:-/tmp/nvlibfs-demo/host}
    echo "== No NVIDIA driver here: generating a fake one in $dir"
    rm -rf "$dir"
    "$bin/nvlibfs-fixture" "$dir" --driver-version 580.159.04 --stale 570.86.15 --libcuda-mib 100
    echo
    "$bin/nvlibfs" scan --driver-root "$dir" --module-version-file "$dir/sys/module/nvidia/version"
fi
