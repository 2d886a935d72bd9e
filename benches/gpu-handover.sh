#!/usr/bin/env bash
# On a host with the real NVIDIA driver and torch: the view of the real
# driver keeps CUDA working through SIGKILLs of nvlibfs's serving process,
# five upgrades (`nvlibfs restart`) and three takeovers by a daemon of
# another process tree (`nvlibfs mount --take-over`), on both data paths.
#
#   benches/gpu-handover.sh BIN_DIR OUT_DIR
#
# In a mount namespace the host's driver is hidden (tmpfs over
# /usr/local/nvidia, where it lives on the GPU machine) and the view bound
# there; torch computes (matmul, FFT, cuBLAS and cuFFT loading kernels as it
# goes) the whole time, and a loop of fresh processes calls cuInit and
# creates a context. Between events the page cache is dropped, so pages
# must be read again through whichever server runs then.
set -euo pipefail
bin=$(realpath "$1")
out=$(realpath -m "$2")
mnt=/run/nvlibs
work=$(mktemp -d)
mkdir -p "$out"
log=$out/gpu-handover.md

cat > "$work/compute.py" <<'PY'
import sys, time, torch
end = time.time() + float(sys.argv[1])
steps = errors = 0
dev = torch.device("cuda")
print("device", torch.cuda.get_device_name(0), flush=True)
while time.time() < end:
    try:
        a = torch.randn(1024, 1024, device=dev, dtype=torch.float64)
        b = a @ a.T
        f = torch.fft.fft(torch.randn(4096, device=dev))
        torch.cuda.synchronize()
        assert torch.isfinite(b).all() and torch.isfinite(f.abs()).all()
        steps += 1
    except Exception as e:
        errors += 1
        print("error", repr(e), flush=True)
print("steps", steps, "errors", errors, flush=True)
PY
cat > "$work/cuinit.py" <<'PY'
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
ctx = ctypes.c_void_p()
ok = cuda.cuInit(0) == 0 and cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, 0) == 0
sys.exit(0 if ok else 1)
PY

inside() {
    # The host's driver hidden, the view in its place.
    unshare -m --propagation private sh -c "mount -t tmpfs none /usr/local/nvidia && mount --rbind $mnt /usr/local/nvidia && $1"
}

echo "| data path | torch steps | torch errors | cuInit+context processes | failed | handovers (requests waited) |" > "$log"
echo "|---|---|---|---|---|---|" >> "$log"
for mode in passthrough no-passthrough; do
    flags=()
    [ "$mode" = no-passthrough ] && flags=(--no-passthrough)
    "$bin/nvlibfs" mount "${flags[@]}" "$mnt"
    export LD_LIBRARY_PATH=/usr/local/nvidia/lib64
    inside "python3 $work/compute.py 50" > "$work/torch-$mode.log" 2>&1 &
    torch_pid=$!
    inside "n=0; f=0; end=\$((\$(date +%s) + 48)); while [ \$(date +%s) -lt \$end ]; do python3 $work/cuinit.py 2>/dev/null && n=\$((n+1)) || f=\$((f+1)); done; echo cuinit \$n failed \$f" > "$work/cuinit-$mode.log" 2>&1 &
    loop_pid=$!
    sleep 8
    for i in 1 2; do
        kill -9 "$("$bin/nvlibfs" status --json "$mnt" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')"
        sleep 1
        sync; echo 3 > /proc/sys/vm/drop_caches
        sleep 7
    done
    # Upgrades: each restart drains the old server while the new one
    # serves; the page cache is dropped after each.
    for i in 1 2 3 4 5; do
        "$bin/nvlibfs" restart "$mnt" | tee -a "$work/restart-$mode.log"
        sync; echo 3 > /proc/sys/vm/drop_caches
        sleep 2
    done
    # Takeovers: a daemon that is not this one's child takes the mount
    # over, as a DaemonSet's next pod does (the takeover socket checks that
    # it may: CAP_SYS_ADMIN, read through its pidfd).
    for i in 1 2 3; do
        setsid "$bin/nvlibfs" mount "${flags[@]}" --take-over "$mnt" | tee -a "$work/takeover-$mode.log"
        sync; echo 3 > /proc/sys/vm/drop_caches
        sleep 2
    done
    wait "$torch_pid" || echo "torch exited $?" >> "$work/torch-$mode.log"
    wait "$loop_pid" || true
    status=$("$bin/nvlibfs" status --json "$mnt")
    echo "$status" > "$work/status-$mode.json"
    steps=$(awk '/^steps/ {print $2}' "$work/torch-$mode.log")
    errors=$(awk '/^steps/ {print $4}' "$work/torch-$mode.log")
    read -r _ n _ f < <(tail -1 "$work/cuinit-$mode.log")
    waited=$(echo "$status" | python3 -c 'import json,sys; print(", ".join(f"{h["reason"]} {h["waited_ms"]:.1f} ms" for h in json.load(sys.stdin)["handovers"]))')
    echo "| $mode | ${steps:-died} | ${errors:-?} | $n | $f | $waited |" | tee -a "$log"
    "$bin/nvlibfs" umount "$mnt"
done
for f in "$work"/*.log "$work"/*.json; do echo "== $(basename "$f")"; cat "$f"; done > "$out/gpu-handover.log"
cat "$log"
