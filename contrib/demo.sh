#!/usr/bin/env bash
# Build nvlibfs, show what it would serve, mount it and load a library
# through the mount. On a host with the NVIDIA driver loaded that is the
# real driver, mounted at /run/nvlibs. Anywhere else a generated fake
# driver (real ELF libraries, nvidia-smi, firmware, ld.so.cache; a stale
# older version and a stray library beside it) stands in, mounted at
# /tmp/nvlibfs-demo/mnt, so every step still does something real.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --quiet
bin=$PWD/target/release

if [ -e /sys/module/nvidia/version ] || [ -e /proc/driver/nvidia/version ]; then
    echo "== NVIDIA kernel module loaded: serving this host's driver"
    driver=()
    mnt=${NVLIBFS_DEMO_MOUNT:-/run/nvlibs}
else
    dir=${NVLIBFS_DEMO_DIR:-/tmp/nvlibfs-demo}
    mnt=${NVLIBFS_DEMO_MOUNT:-$dir/mnt}
    echo "== No NVIDIA driver here: generating a fake one in $dir/host"
    if [ -e "$mnt/.nvlibfs" ]; then "$bin/nvlibfs" umount "$mnt"; fi
    rm -rf "$dir/host"
    "$bin/nvlibfs-fixture" "$dir/host" --driver-version 580.159.04 --stale 570.86.15 --libcuda-mib 100
    driver=(--driver-root "$dir/host" --module-version-file "$dir/host/sys/module/nvidia/version")
fi

echo; echo "== nvlibfs scan ${driver[*]}"
"$bin/nvlibfs" scan "${driver[@]}"

echo; echo "== nvlibfs mount ${driver[*]} $mnt"
if [ -e "$mnt/.nvlibfs" ]; then "$bin/nvlibfs" umount "$mnt"; fi
"$bin/nvlibfs" mount "${driver[@]}" "$mnt"

echo; echo "== nvidia-smi from the mount, loading libnvidia-ml.so.1 through it"
LD_LIBRARY_PATH=$mnt/lib64 "$mnt/bin/nvidia-smi"

echo; echo "== nvlibfs status $mnt"
"$bin/nvlibfs" status "$mnt"

cat <<MSG

The view stays mounted at $mnt. Give it to containers read-only, e.g.
  docker run -v $mnt:/usr/local/nvidia:ro,rslave ...   (or: docker run \$(nvlibfs docker-flags --mountpoint $mnt) ...)
and unmount it with
  $bin/nvlibfs umount $mnt
MSG
