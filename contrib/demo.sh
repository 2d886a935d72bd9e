#!/usr/bin/env bash
# Build nvlibfs, show what it would serve, mount it and load a library
# through the mount. On a host with the NVIDIA driver loaded that is the
# real driver, mounted at /run/nvlibs. Anywhere else a generated fake
# driver (real ELF libraries, nvidia-smi, firmware, ld.so.cache; a stale
# older version and a stray library beside it) stands in, mounted at
# /tmp/nvlibfs-demo/mnt, so every step still does something real.
#
# NVLIBFS_DEMO_DIR and NVLIBFS_DEMO_MOUNT move the fake driver and the mount
# point; NVLIBFS_DEMO_BIN=DIR uses binaries built already instead of building.
# `contrib/demo.sh --clean` unmounts the demo's view and removes what the
# demo wrote (the fake driver and the daemon's log).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --clean ]; then
    dir=${NVLIBFS_DEMO_DIR:-/tmp/nvlibfs-demo}
    mnt=${NVLIBFS_DEMO_MOUNT:-$dir/mnt}
    nvlibfs=${NVLIBFS_DEMO_BIN:-$PWD/target/debug}/nvlibfs
    if [ -e "$mnt/.nvlibfs" ]; then "$nvlibfs" umount "$mnt"; fi
    # The fake driver and the daemon's log (the demo logs there).
    rm -rf "$dir"
    echo "demo.sh: unmounted $mnt and removed $dir"
    exit 0
fi

if [ -n "${NVLIBFS_DEMO_BIN:-}" ]; then
    bin=$(cd "$NVLIBFS_DEMO_BIN" && pwd)
else
    if [ ! -x target/debug/nvlibfs ]; then
        # The test suite's profile (cargo's dev profile, the whole
        # workspace): either one made first leaves the other little to do.
        echo "== Building nvlibfs. The first build compiles about 85 crates: 35 s on 2 cores,"
        echo "   plus downloading them."
    fi
    cargo build --workspace
    bin=$PWD/target/debug
fi

if [ -e /sys/module/nvidia/version ] || [ -e /proc/driver/nvidia/version ]; then
    echo "== NVIDIA kernel module loaded: serving this host's driver"
    driver=()
    logging=()
    mnt=${NVLIBFS_DEMO_MOUNT:-/run/nvlibs}
else
    dir=${NVLIBFS_DEMO_DIR:-/tmp/nvlibfs-demo}
    mnt=${NVLIBFS_DEMO_MOUNT:-$dir/mnt}
    echo "== No NVIDIA driver here: generating a fake one in $dir/host"
    if [ -e "$mnt/.nvlibfs" ]; then "$bin/nvlibfs" umount "$mnt"; fi
    rm -rf "$dir/host"
    "$bin/nvlibfs-fixture" "$dir/host" --driver-version 580.159.04 --stale 570.86.15 --libcuda-mib 100
    driver=(--driver-root "$dir/host" --module-version-file "$dir/host/sys/module/nvidia/version")
    # The log beside the fake driver, so that --clean takes both.
    logging=(--log-file "$dir/nvlibfs.log")
fi

echo; echo "== nvlibfs scan ${driver[*]}"
"$bin/nvlibfs" scan "${driver[@]}"

echo; echo "== nvlibfs mount ${driver[*]} $mnt"
if [ -e "$mnt/.nvlibfs" ]; then "$bin/nvlibfs" umount "$mnt"; fi
"$bin/nvlibfs" mount "${driver[@]}" "${logging[@]}" "$mnt"

echo; echo "== nvidia-smi from the mount, loading libnvidia-ml.so.1 through it"
LD_LIBRARY_PATH=$mnt/lib64 "$mnt/bin/nvidia-smi"

echo; echo "== nvlibfs status $mnt"
"$bin/nvlibfs" status "$mnt"

# Hints that work when pasted as they are: the binaries by their full path
# (nothing is installed on PATH), paths quoted for the shell.
q() { printf '%q' "$1"; }
cat <<MSG

The view stays mounted at $mnt. Give it to containers read-only, with rslave so
that even a wholly new daemon's mount reaches running containers:
  docker run \$($(q "$bin/nvlibfs") docker-flags --mountpoint $(q "$mnt")) IMAGE nvidia-smi
(docker-flags prints --volume=$(q "$mnt"):/usr/local/nvidia:ro,rslave, the devices and the environment.)
Ask the daemon what it serves, diagnose the host, and unmount it:
  $(q "$bin/nvlibfs") status $(q "$mnt")
  $(q "$bin/nvlibfs") check --mountpoint $(q "$mnt")
  $(q "$bin/nvlibfs") umount $(q "$mnt")
or unmount it and remove everything the demo wrote: $(q "$PWD/contrib/demo.sh") --clean
To have \`nvlibfs\` on PATH, install it: $(q "$PWD/contrib/install.sh")
MSG
