#!/usr/bin/env bash
# The daemon's memory and CPU on a host with the real NVIDIA driver, on the
# cached path (--no-passthrough) and on passthrough: mount /run/nvlibs, load
# every library of the view and touch every page, read every other file
# whole, then ask the daemon. Then the load_latency bench on the real driver.
#
#   benches/real-driver-memory.sh BIN_DIR OUT_DIR
#
# DRIVER_FLAGS (e.g. "--driver-root DIR --module-version-file FILE") points
# it at another driver; NO_BENCH=1 skips the bench.
# BIN_DIR holds nvlibfs, nvlibfs-mountd and load_latency (the bench binary,
# `cargo bench --bench load_latency --no-run` prints where it is).
set -euo pipefail
bin=$(realpath "$1")
out=$(realpath -m "$2")
mnt=${MOUNTPOINT:-/run/nvlibs}
read -r -a driver <<<"${DRIVER_FLAGS:-}"
mkdir -p "$out"
"$bin/nvlibfs" --version
echo "| data path | driver | view | daemon RSS after | through the daemon | daemon CPU | load + read time |" > "$out/memory.md"
echo "|---|---|---|---|---|---|---|" >> "$out/memory.md"

for mode in --no-passthrough --passthrough; do
    flags=()
    [ "$mode" = --no-passthrough ] && flags=(--no-passthrough)
    name=${mode#--}
    "$bin/nvlibfs" mount "${driver[@]}" "${flags[@]}" "$mnt"
    before=$("$bin/nvlibfs" status --json "$mnt")
    start=$(date +%s.%N)
    for lib in "$mnt"/lib64/*.so.*[0-9]; do
        [ -L "$lib" ] && continue
        "$bin/load_latency" __load --touch "$lib" >/dev/null 2>&1 || echo "  (could not dlopen $(basename "$lib"))"
    done
    find -L "$mnt/bin" "$mnt/firmware" "$mnt/share" -type f -exec cat {} + >/dev/null
    end=$(date +%s.%N)
    after=$("$bin/nvlibfs" status --json "$mnt")
    pid=$(echo "$after" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
    cpu_ticks=$(awk '{print $14+$15}' "/proc/$pid/stat")
    echo "$after" > "$out/status-$name.json"
    STATUS=$after python3 - "$name" "$cpu_ticks" "$(getconf CLK_TCK)" "$start" "$end" <<'PY' | tee -a "$out/memory.md"
import json, os, sys
name, ticks, hz, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
s = json.loads(os.environ["STATUS"])
c = s["counters"]
gib = c["bytes_read"] / 2**30
cpu_ms = ticks * 1000 / hz
per_gib = f"{cpu_ms / gib:.0f} ms/GiB" if gib > 0 else "no bytes read through the daemon"
print(f"| {name} | {s['driver_version']} | {s['files']} files, {s['bytes'] / 2**20:.0f} MiB | "
      f"{s['rss_bytes'] / 2**20:.1f} MiB | {c['reads']} READs, {c['bytes_read'] / 2**20:.0f} MiB | "
      f"{cpu_ms:.0f} ms ({per_gib}) | {end - start:.1f} s |")
PY
    "$bin/nvlibfs" umount "$mnt"
done

[ -n "${NO_BENCH:-}" ] && exit 0
"$bin/load_latency" --driver-root / --out "$out" --nvlibfs "$bin/nvlibfs" > "$out/load-latency.log" 2>&1 || tail -20 "$out/load-latency.log"
