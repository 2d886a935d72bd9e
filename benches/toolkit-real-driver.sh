#!/usr/bin/env bash
# On a host with the real NVIDIA driver (no Docker needed): nvlibfs held
# against the NVIDIA Container Toolkit's own spec for the same host.
#
#   - `nvidia-ctk cdi generate` (driver root /) against `nvlibfs cdi
#     generate` for a view of the same driver: every file the toolkit
#     mounts must be in the view with the same bytes, every link its
#     create-symlinks hook makes must be in the view, every device node in
#     nvlibfs's spec; its variables and hooks are listed beside nvlibfs's;
#   - device names: the toolkit's and nvlibfs's, and nvidia-smi's index and
#     UUID for each GPU;
#   - `nvidia-ctk cdi generate --driver-root <view>`: what it finds there;
#   - the project's CUDA check natively and through the view with the
#     host's driver hidden (tmpfs over /usr/local/nvidia, where the GPU
#     machine keeps it).
#
# Writes OUT_DIR/toolkit-real-driver.md and the three specs.
#
#   benches/toolkit-real-driver.sh BIN_DIR TOOLKIT_DIR OUT_DIR
#       BIN_DIR: nvlibfs, nvlibfs-mountd, nvlibfs-cuda-check
#       TOOLKIT_DIR: nvidia-ctk, nvidia-cdi-hook
# NVLIBFS_DRIVER_ROOT=ROOT tries it on a fixture (built with
# --device-nodes) instead of the host's driver.
set -uo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
bin=$(realpath "$1") toolkit=$(realpath "$2") out=$(realpath -m "$3")
export CUDA_CACHE_DISABLE=1
mkdir -p "$out"
root=${NVLIBFS_DRIVER_ROOT:-/}
mp=/run/nvlibs mount_flags=() ctk_root=() dev=/dev
if [ "$root" != / ]; then
    mp=/run/nvlibfs-toolkit-real-$$ dev=$root/dev
    mount_flags=(--driver-root "$root" --module-version-file "$root/sys/module/nvidia/version" --dev "$dev")
    ctk_root=(--driver-root "$root" --dev-root "$root")
fi
report=$out/toolkit-real-driver.md
ms() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }
"$bin/nvlibfs" mount "${mount_flags[@]}" "$mp" >&2 || exit 1
trap '"$bin/nvlibfs" umount "$mp" >/dev/null 2>&1; [ "$root" = / ] || rmdir "$mp"' EXIT
ctk() { "$toolkit/nvidia-ctk" cdi generate --format json --nvidia-cdi-hook-path "$toolkit/nvidia-cdi-hook" "$@"; }
t=$EPOCHREALTIME
ctk "${ctk_root[@]}" --output "$out/toolkit-spec.json" 2>"$out/toolkit-generate.log"
ctk_rc=$? ctk_ms=$(ms "$t")
t=$EPOCHREALTIME
"$bin/nvlibfs" cdi generate --mountpoint "$mp" --dev "$dev" --spec-dirs "$out/none" >"$out/nvlibfs-spec.json"
nv_ms=$(ms "$t")
ctk --driver-root "$mp" --dev-root "${root%/}/" --output "$out/toolkit-view-spec.json" 2>"$out/toolkit-view-generate.log"
view_rc=$?
nvidia-smi --query-gpu=index,uuid,pci.bus_id --format=csv,noheader >"$out/nvidia-smi.csv" 2>/dev/null ||
    : >"$out/nvidia-smi.csv"
check=/tmp/nvlibfs-cuda-check
install -m 755 "$bin/nvlibfs-cuda-check" "$check"
hidden() { unshare -m --propagation private sh -c "mount -t tmpfs none /usr/local/nvidia && $1"; }
native=$("$check" 2>&1; echo "exit $?")
view=$(hidden "LD_LIBRARY_PATH=$mp/lib64 $check" 2>&1; echo "exit $?")
control=$(hidden "$check" 2>&1; echo "exit $?")
{
    echo "# The NVIDIA Container Toolkit's spec against nvlibfs's, on the real driver"
    echo
    echo "- $(nvidia-smi -L 2>/dev/null | head -1 || echo "driver root $root"), kernel $(uname -r), driver $(cat "${root%/}/sys/module/nvidia/version")"
    echo "- NVIDIA Container Toolkit v1.18.0 built from source: \`nvidia-ctk cdi generate\` exit $ctk_rc in $ctk_ms ms; \`nvlibfs cdi generate\` $nv_ms ms"
    echo
    python3 - "$out" "$mp" "$view_rc" <<'EOF'
import json, os, sys
out, mp, view_rc = sys.argv[1], sys.argv[2], sys.argv[3]
theirs = json.load(open(os.path.join(out, "toolkit-spec.json")))
ours = json.load(open(os.path.join(out, "nvlibfs-spec.json")))
edits = theirs.get("containerEdits", {})

def same(a, b):
    try:
        with open(a, "rb") as x, open(b, "rb") as y:
            while True:
                p, q = x.read(1 << 20), y.read(1 << 20)
                if p != q:
                    return False
                if not p:
                    return True
    except OSError:
        return False

# Every file of the view, by name (the view keeps host-style names).
view = {}
for top in ("lib64", "lib", "bin", "firmware", "share", "etc"):
    for d, _, files in os.walk(os.path.join(mp, top), followlinks=False):
        for f in files:
            view.setdefault(f, []).append(os.path.join(d, f))
missing, files = [], 0
for m in edits.get("mounts", []):
    host = m["hostPath"]
    name = os.path.basename(host)
    if os.path.isdir(host):
        missing.append(f"directory {host} (-> {m['containerPath']})")
        continue
    if any(same(host, v) for v in view.get(name, [])):
        files += 1
    else:
        missing.append(f"file {host} (-> {m['containerPath']})")
links = 0
for h in edits.get("hooks", []):
    args = h.get("args", [])
    if len(args) > 1 and args[1] == "create-symlinks":
        for i, a in enumerate(args):
            if a == "--link":
                target, link = args[i + 1].split("::")
                # Relative to the library directory it is in.
                dirs = ("/usr/lib/x86_64-linux-gnu/", "/usr/local/nvidia/lib64/", "/usr/lib64/", "/usr/lib/")
                name = next((link[len(d):] for d in dirs if link.startswith(d)), os.path.basename(link))
                if os.path.exists(os.path.join(mp, "lib64", name)):
                    links += 1
                else:
                    missing.append(f"link {link} -> {target}")
def nodes(e):
    return {(n["path"], n.get("hostPath", n["path"])) for n in e.get("deviceNodes", [])}
def devs(s):
    return {d["name"]: nodes(d["containerEdits"]) for d in s.get("devices", [])}
td, od = devs(theirs), devs(ours)
ours_nodes = nodes(ours["containerEdits"]) | od.get("all", set())
for n in sorted(nodes(edits) | td.get("all", set())):
    if n not in ours_nodes:
        missing.append(f"device node {n[0]}")
print(f"## Completeness\n")
print(f"- the toolkit mounts {len(edits.get('mounts', []))} host paths; {files} files are in the view with the same bytes")
print(f"- its create-symlinks hook makes {links} links that the view has")
print(f"- env it sets: {', '.join('`'+e+'`' for e in edits.get('env', []))}")
print(f"- hooks: {', '.join(sorted({'`'+h['args'][1]+'`' for h in edits.get('hooks', []) if len(h.get('args', [])) > 1}))}")
print(f"- device nodes it gives: {', '.join(sorted(n[0] for n in nodes(edits) | td.get('all', set())))}")
print()
if missing:
    print("Not in the view or nvlibfs's spec:\n")
    for m in missing:
        print(f"- {m}")
else:
    print("Every file, link and device node of the toolkit's spec is in the view or nvlibfs's spec.")
print("\n## Device names\n")
smi = [l.split(", ") for l in open(os.path.join(out, "nvidia-smi.csv")).read().splitlines() if l]
print("| name | toolkit's nodes | nvlibfs's nodes | same |\n|---|---|---|---|")
for name in sorted(set(td) | set(od)):
    a = sorted(p for p, _ in td.get(name, set()))
    b = sorted(p for p, _ in od.get(name, set()))
    print(f"| `{name}` | {' '.join(a) or '(none)'} | {' '.join(b) or '(none)'} | {'yes' if td.get(name) == od.get(name) else 'NO'} |")
print()
for index, uuid, bus in smi:
    print(f"- nvidia-smi: GPU {index} {uuid} at {bus}: toolkit names both: {index in td and uuid in td}; nvlibfs: {index in od and uuid in od}")
print("\n## The view as the toolkit's driver root\n")
if view_rc != "0":
    print(f"`nvidia-ctk cdi generate --driver-root {mp}` failed (exit {view_rc}); see toolkit-view-generate.log")
else:
    vs = json.load(open(os.path.join(out, "toolkit-view-spec.json")))
    vm = vs.get("containerEdits", {}).get("mounts", [])
    host_names = {os.path.basename(m["hostPath"]) for m in edits.get("mounts", [])}
    view_names = {os.path.basename(m["hostPath"]) for m in vm}
    print(f"- it finds {len(vm)} files in the view ({len(host_names & view_names)} of the {len(host_names)} it finds on the host; not found: {', '.join(sorted(host_names - view_names)) or 'none'})")
    print(f"- container paths, for example: {', '.join(sorted({os.path.dirname(m['containerPath']) for m in vm})[:4])}")
EOF
    echo
    echo "## The project's CUDA check"
    echo
    echo "### native"; echo '```'; echo "$native"; echo '```'
    echo "### through the view, host driver hidden (LD_LIBRARY_PATH=$mp/lib64)"; echo '```'; echo "$view"; echo '```'
    echo "### control: host driver hidden, no view"; echo '```'; echo "$control"; echo '```'
} >"$report"
cat "$report"
