#!/usr/bin/env bash
# On a host with the real NVIDIA driver: the project's CUDA check
# (contrib/cuda-check) natively, then through the view with the host's
# driver hidden (tmpfs over /usr/local/nvidia, where the GPU machine keeps
# it), as root and as uid 1000, and a control with the driver hidden and
# no view; then again through the view after `nvlibfs restart` handed the
# mount to a new server. Writes OUT_DIR/cuda-check.md.
#
#   benches/gpu-cuda-check.sh BIN_DIR OUT_DIR [MOUNT FLAGS...]
#       BIN_DIR: nvlibfs, nvlibfs-mountd, nvlibfs-cuda-check
#       e.g. --no-passthrough for the cached path
set -uo pipefail
# Every run compiles the PTX, so every run loads the JIT compiler.
export CUDA_CACHE_DISABLE=1
bin=$(realpath "$1")
out=$(realpath -m "$2")
shift 2
mkdir -p "$out"
mnt=/run/nvlibs
report=$out/cuda-check.md
hidden() { unshare -m --propagation private sh -c "mount -t tmpfs none /usr/local/nvidia && $1"; }
case_() {
    echo "### $1"; echo '```'
    sh -c "$2" 2>&1; echo "exit $?"
    echo '```'
}
# Where every user may run it.
check=/tmp/nvlibfs-cuda-check
install -m 755 "$bin/nvlibfs-cuda-check" "$check"
"$bin/nvlibfs" mount "$@" "$mnt" >/dev/null
{
    echo "# The project's CUDA check through the view"; echo
    echo "- $(nvidia-smi -L | head -1), kernel $(uname -r), driver $(cat /sys/module/nvidia/version)"
    echo "- \`nvlibfs mount $* $mnt\`"; echo
    case_ "native (the host's driver)" "$check"
    case_ "through the view, host driver hidden, root" "$(declare -f hidden); hidden 'LD_LIBRARY_PATH=$mnt/lib64 $check'"
    case_ "through the view, host driver hidden, uid 1000" "$(declare -f hidden); hidden 'LD_LIBRARY_PATH=$mnt/lib64 setpriv --reuid 1000 --regid 1000 --clear-groups $check'"
    case_ "control: host driver hidden, no view" "$(declare -f hidden); hidden '$check'"
    case_ "nvlibfs restart" "$bin/nvlibfs restart $mnt"
    case_ "through the view after the restart, host driver hidden, root" "$(declare -f hidden); hidden 'LD_LIBRARY_PATH=$mnt/lib64 $check'"
    echo "### daemon"; echo '```'; "$bin/nvlibfs" status "$mnt"; echo '```'
} > "$report"
"$bin/nvlibfs" umount "$mnt" >/dev/null
cat "$report"
