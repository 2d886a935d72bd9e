#!/usr/bin/env bash
# Docker-in-Docker with the view, end to end, with Debian 13's Docker 26
# (dockerd, containerd, runc): the same script runs on the GPU machine
# with the real driver and, in CI, against the fixture driver and
# stand-in device nodes (tests/dind26.rs).
#
#   host:   nvlibfs mount MOUNTPOINT; a dockerd of its own, run from the
#           Debian 13 root file system in a mount namespace (the host needs
#           no Docker installed, and one already running is left alone)
#   outer:  a container of that dockerd running its own dockerd, given the
#           view at the same path, the device nodes, and the one line of
#           contrib/compose/dind-daemon.json that points CDI at the spec
#           the view carries
#   inner:  `docker run --device nvidia.com/gpu=all` as root and uid 1000,
#           the same with plain flags (`nvlibfs docker-flags`), and a
#           control with neither, which must find no CUDA
#
# With NVLIBFS_DIND_FORM=rootless, the same containers are run instead by
# a rootless dockerd on the host, the shape with the least setup:
#
#   host:   nvlibfs mount MOUNTPOINT; `dockerd-rootless.sh` (RootlessKit,
#           newuidmap) run by uid 1000 from the Debian 13 file system, in a
#           mount and PID namespace of its own, its ~/.config/docker/
#           daemon.json that same one line; RootlessKit's host network
#   inner:  the same four containers
#
# Each inner container runs `nvidia-smi -L` and the project's CUDA check
# (contrib/cuda-check) from the view. Writes OUT_DIR/dind26.md (or
# rootless26.md) and the daemon's log there, and exits 1 if any check
# failed.
#
#   tests/dind26/run.sh ROOTFS BIN_DIR OUT_DIR [nvlibfs mount flags...]
#
# ROOTFS: tarball (.tar, .tar.xz, or several parts given as A+B) of
#         `debootstrap --variant=minbase --include=docker.io,docker-cli trixie`
# BIN_DIR: nvlibfs, nvlibfs-mountd and nvlibfs-cuda-check
# tests/dind26.rs caches that tarball in /var/cache/nvlibfs-test; to run
# on a machine with no network (the GPU machine), compress it with xz,
# split it to fit what can be carried, and pass the parts joined by +.
# Environment: NVLIBFS_DIND_MOUNTPOINT (default /run/nvlibs),
#   NVLIBFS_DIND_DEV (where the device nodes are, default /dev),
#   NVLIBFS_DIND_EXPECT=gpu (default: a real GPU and driver) or fixture,
#   NVLIBFS_DIND_FORM=dind (default) or rootless.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
[ "$(id -u)" = 0 ] || { echo "dind26: needs root (it mounts, and runs dockerd)" >&2; exit 2; }
rootfs=$1 bin=$(realpath "$2") out=$(realpath -m "$3") here=$(dirname "$(realpath "$0")")
shift 3
mount_flags=("$@")
mp=${NVLIBFS_DIND_MOUNTPOINT:-/run/nvlibs}
dev=${NVLIBFS_DIND_DEV:-/dev}
expect=${NVLIBFS_DIND_EXPECT:-gpu}
form=${NVLIBFS_DIND_FORM:-dind}
case $form in dind | rootless) ;; *) echo "dind26: NVLIBFS_DIND_FORM is dind or rootless, not '$form'" >&2; exit 2 ;; esac
image=nvlibfs-dind:26
outer=nvlibfs-dind-outer-$$
mkdir -p "$out"
report=$out/dind26.md
[ "$form" = rootless ] && report=$out/rootless26.md
work=$(mktemp -d /var/tmp/nvlibfs-dind.XXXXXX)
root=$work/root
failures=()
say() { echo "dind26: $*" >&2; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

hd() { chroot "$root" docker -H unix:///run/nvlibfs-dind.sock "$@"; }
# The dockerd that runs the inner containers: the outer container's, or
# the rootless one (its socket in its user's runtime directory).
if [ "$form" = dind ]; then
    od() { hd exec "$outer" docker "$@"; }
else
    od() { chroot "$root" docker -H unix:///run/user/1000/docker.sock "$@"; }
fi
rootless_pid=
# The view's CDI spec as the dockerd that reads it sees it: in the outer
# container, or in the rootless dockerd's mount namespace.
spec_seen() {
    if [ "$form" = dind ]; then hd exec "$outer" cat "$mp/etc/cdi/nvlibfs.json"
    else cat "/proc/$(pgrep -P "$rootless_pid")/root$mp/etc/cdi/nvlibfs.json"; fi
}

cleanup() {
    set +e
    # The rootless dockerd's namespaces die with it: killing the PID
    # namespace's first process kills every process in it.
    if [ -n "$rootless_pid" ]; then
        kill -KILL "$(pgrep -P "$rootless_pid")" 2>/dev/null
        wait "$rootless_pid" 2>/dev/null
    fi
    hd rm -f "$outer" >/dev/null 2>&1
    hd volume rm -f "$outer" >/dev/null 2>&1
    [ -f "$root/run/nvlibfs-dind.pid" ] && kill "$(cat "$root/run/nvlibfs-dind.pid")" 2>/dev/null
    for _ in $(seq 50); do [ -e "$root/run/nvlibfs-dind.pid" ] || break; sleep 0.2; done
    "$bin/nvlibfs" umount --state-dir "$work/state" "$mp" >/dev/null 2>&1
    cp "$work"/state/*.log "$out/" 2>/dev/null
    cp "$work"/*dockerd.log "$out/" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# 1. The root file system: the host dockerd's, and the outer and inner
#    image (a Debian 13 with Docker, no NVIDIA file, and the CUDA check).
t0=$EPOCHREALTIME
mkdir -p "$root"
IFS=+ read -ra parts <<< "$rootfs"
case $rootfs in
*.xz) cat "${parts[@]}" | xz -dc | tar -C "$root" -x ;;
*) cat "${parts[@]}" | tar -C "$root" -x ;;
esac
install -m 755 "$bin/nvlibfs-cuda-check" "$root/usr/local/bin/"
mkdir -p "$root/share"
tar -C "$root" --exclude=./share -cf "$work/image.tar" .
mv "$work/image.tar" "$root/share/"
t_rootfs=$(since "$t0")
say "root file system and image ready (${t_rootfs} s)"

# 2. The view, on the host.
# Its own state directory: the daemon's log ends up in OUT_DIR.
"$bin/nvlibfs" mount "${mount_flags[@]}" --state-dir "$work/state" --dev "$dev" "$mp" >&2

nodes=()
while read -r n; do nodes+=("$n"); done < <(find "$dev" -maxdepth 2 -type c \( -name 'nvidia*' -o -path '*/nvidia-caps/*' \) | sort)
# The daemon.json users are given, at this mount point.
sed "s#/run/nvlibs#$mp#" "$here/../../contrib/compose/dind-daemon.json" >"$root/share/daemon.json"

# 3. The host's dockerd: in a mount namespace of its own whose root is the
#    Debian 13 file system, with the host's /proc, /sys, /dev, the device
#    nodes and the view bound at their own paths (as slaves: a new mount
#    of the view reaches it), and in a network namespace of its own: with
#    --bridge=none it deletes any `docker0`, which may be another
#    dockerd's.
start_host_and_outer_dockerds() {
    unshare --mount --net --propagation slave sh -c "
        set -e
        mount --bind '$root' '$root'
        for d in /proc /sys /dev '$dev' '$mp'; do mkdir -p '$root'\$d; mount --rbind \$d '$root'\$d; done
        cd '$root'
        mkdir -p .old-root
        pivot_root . .old-root
        umount -l /.old-root
        rmdir /.old-root
        exec dockerd -H unix:///run/nvlibfs-dind.sock --pidfile /run/nvlibfs-dind.pid \
            --iptables=false --ip-masq=false --bridge=none --storage-driver=vfs
    " >"$work/host-dockerd.log" 2>&1 &
    for _ in $(seq 120); do hd info >/dev/null 2>&1 && break; sleep 0.5; done
    hd info >/dev/null || { tail -20 "$work/host-dockerd.log" >&2; exit 1; }
    hd import /share/image.tar "$image" >/dev/null
    say "host dockerd $(hd version -f '{{.Server.Version}}') up, image imported"

    # 4. The outer container: privileged (Docker 26 grants what the bounding
    #    set has), /sys and the cgroups remounted read-write inside (FACTS §6),
    #    and /var/lib/docker on a volume.
    device_flags=()
    for n in "${nodes[@]}"; do device_flags+=(--device "$n:/dev/${n#"$dev"/}"); done
    entry='mount -o remount,rw /sys
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then mount -o remount,rw /sys/fs/cgroup
    else for d in /sys/fs/cgroup/*; do mount -o remount,bind,rw "$d"; done; fi
    exec dockerd --iptables=false --ip-masq=false --bridge=none --storage-driver=vfs'
    hd run -d --name "$outer" --privileged \
        -v "$outer:/var/lib/docker" -v "$mp:$mp:ro,rslave" -v /share:/share:ro \
        -v /share/daemon.json:/etc/docker/daemon.json:ro \
        "${device_flags[@]}" "$image" sh -c "$entry" >/dev/null
    for _ in $(seq 120); do od info >/dev/null 2>&1 && break; sleep 0.5; done
    od info >/dev/null || { hd logs --tail 20 "$outer" >&2; exit 1; }
    od import /share/image.tar "$image" >/dev/null
    say "outer dockerd $(od version -f '{{.Server.Version}}') up, image imported"
}

# 3. The rootless dockerd: run by uid 1000 from the Debian 13 file system
#    (pivot_root, not chroot: a chrooted process may not make a user
#    namespace), in a mount and PID namespace of its own (everything it
#    starts ends with it), with the host's /sys, the view at its own path,
#    and the host's /dev, or with stand-in nodes a /dev of its own: the
#    daemon's CDI looks for the nodes the spec names at their /dev paths.
rootless_root() { # ROOT MOUNTPOINT DEV: in the new namespaces; execs the daemon
    set -e
    local root=$1 mp=$2 dev=$3 n
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mkdir -p "$root$mp"
    mount --rbind "$mp" "$root$mp"
    if [ "$dev" = /dev ]; then
        mount --rbind /dev "$root/dev"
    else
        mount -t tmpfs -o mode=755 dev "$root/dev"
        for n in /dev/* "$dev"/*; do
            local to=$root/dev/${n##*/}
            if [ -L "$n" ]; then cp -a "$n" "$to"
            elif [ -d "$n" ]; then mkdir -p "$to"; mount --rbind "$n" "$to"
            else touch "$to"; mount --bind "$n" "$to"; fi
        done
    fi
    cd "$root"
    mkdir -p .old-root
    pivot_root . .old-root
    umount -l /.old-root
    rmdir /.old-root
    # RootlessKit makes its child's mounts slaves of this root's.
    mount --make-rshared /
    # Not exec'd: this shell, the PID namespace's first process, reaps
    # what the daemon orphans (containerd's shims).
    setpriv --reuid 1000 --regid 1000 --init-groups env -i HOME=/home/rootless \
        XDG_RUNTIME_DIR=/run/user/1000 PATH=/usr/share/docker.io/contrib:/usr/bin:/bin:/usr/sbin:/sbin \
        DOCKERD_ROOTLESS_ROOTLESSKIT_NET=host DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=none \
        dockerd-rootless.sh --bridge=none --iptables=false --ip-forward=false --storage-driver=vfs &
    wait $!
}
start_rootless_dockerd() {
    chroot "$root" useradd -m -u 1000 rootless
    grep -q '^rootless:' "$root/etc/subuid" || { echo "dind26: useradd gave no subordinate ids" >&2; exit 1; }
    install -d -o 1000 -g 1000 -m 700 "$root/run/user/1000" "$root/home/rootless/.config/docker"
    install -o 1000 -g 1000 -m 644 "$root/share/daemon.json" "$root/home/rootless/.config/docker/daemon.json"
    export -f rootless_root
    unshare --mount --pid --fork --propagation slave \
        bash -c 'rootless_root "$@"' rootless_root "$root" "$mp" "$dev" >"$work/rootless-dockerd.log" 2>&1 &
    rootless_pid=$!
    for _ in $(seq 120); do od info >/dev/null 2>&1 && break; sleep 0.5; done
    od info >/dev/null || { tail -20 "$work/rootless-dockerd.log" >&2; exit 1; }
    grep -q rootless <<<"$(od info -f '{{json .SecurityOptions}}')" || { echo "dind26: that dockerd is not rootless" >&2; exit 1; }
    od import /share/image.tar "$image" >/dev/null
    # Not `docker version`: with RootlessKit's host network this dockerd's
    # /version handler fails (the client reads EOF); `info` has the version.
    say "rootless dockerd $(od info -f '{{.ServerVersion}}') up as uid 1000, image imported"
}

if [ "$form" = dind ]; then start_host_and_outer_dockerds; else start_rootless_dockerd; fi

# 5. The inner containers.
status_before=$("$bin/nvlibfs" status --state-dir "$work/state" "$mp")
# CUDA_CACHE_DISABLE: every run compiles the PTX, so every run loads the
# driver's JIT compiler from the view. One stream inside the container:
# docker copies stdout and stderr apart, so their lines could come in
# another order than they were written (the uid check reads line one).
script='exec 2>&1; id -u; nvidia-smi -L; echo "nvidia-smi exit $?"
nvidia-smi --query-gpu=driver_version --format=csv,noheader
CUDA_CACHE_DISABLE=1 nvlibfs-cuda-check; echo "cuda-check exit $?"'
results=$work/results.md
: >"$results"
inner() { # NAME DOCKER-RUN-FLAGS...: runs $script; its output in $o
    local name=$1 t=$EPOCHREALTIME
    shift
    o=$(od run --rm --network none "$@" "$image" sh -c "$script" 2>&1) || true
    printf '\n### %s (%s s)\n\n```\n$ docker run --rm --network none %s %s sh -c ...\n%s\n```\n' \
        "$name" "$(since "$t")" "$*" "$image" "$o" >>"$results"
}
check() { # WHAT ok|no
    if [ "$2" = ok ]; then say "ok: $1"; else say "FAILED: $1"; failures+=("$1"); fi
}
has() { grep -qF -- "$2" <<<"$1" && echo ok || echo no; }
expect_works() { # NAME UID: checks $o
    check "$1: runs as uid $2" "$([ "$(head -1 <<<"$o")" = "$2" ] && echo ok || echo no)"
    if [ "$expect" = gpu ]; then
        check "$1: nvidia-smi -L lists a GPU" "$(has "$o" "GPU 0: ")"
        check "$1: the CUDA check passes" "$(has "$o" "cuda-check exit 0")"
        check "$1: every element equal" "$(has "$o" "all equal to the CPU's")"
        check "$1: on the host's driver" "$(has "$o" "$(cat /sys/module/nvidia/version)")"
    else
        check "$1: nvidia-smi from the view" "$(has "$o" "nvlibfs fixture driver")"
        check "$1: libcuda.so.1 loaded from the view" \
            "$(has "$o" "libcuda.so.1 (/usr/local/nvidia/lib64/libcuda.so.1)")"
    fi
}

cdi=(--device nvidia.com/gpu=all)
inner "CDI, root" "${cdi[@]}"
expect_works "CDI as root" 0
inner "CDI, uid 1000" "${cdi[@]}" --user 1000:1000
expect_works "CDI as uid 1000" 1000
# docker-flags names the nodes it finds under /dev; stand-ins are added.
mapfile -t plain < <("$bin/nvlibfs" docker-flags --mountpoint "$mp")
for n in "${nodes[@]}"; do
    flag=--device=/dev/${n#"$dev"/}
    printf '%s\n' "${plain[@]}" | grep -qxF -- "$flag" || plain+=("$flag")
done
inner "plain flags (nvlibfs docker-flags and --device), uid 1000" "${plain[@]}" --user 1000:1000
expect_works "plain flags as uid 1000" 1000
inner "control: no view, no devices"
check "control: no nvidia-smi" "$(has "$o" "nvidia-smi: not found")"
check "control: the CUDA check finds no driver" "$(has "$o" "cuda-check exit 2")"

# 6. With stand-in nodes only: a node added on the host reaches the spec
#    the inner containers' dockerd reads, with nothing restarted.
if [ "$expect" = fixture ]; then
    mknod "$dev/nvidia1" c 1 3
    for _ in $(seq 20); do spec_seen | grep -q /dev/nvidia1 && break; sleep 0.25; done
    check "the spec lists a node added on the host" \
        "$(spec_seen | grep -q '"name": "1"' && echo ok || echo no)"
    # The dockerd reads the spec again when its inotify watch on the spec's
    # directory fires; under load that may take a moment after the spec
    # changed: each check below tries for up to 10 s, and says how long.
    if [ "$form" = dind ]; then
        # What the docs warn of: the outer container lacks the new node.
        t=$EPOCHREALTIME
        for _ in $(seq 20); do
            o=$(od run --rm --network none --device nvidia.com/gpu=all "$image" true 2>&1) && o="(ran)"
            [ "$o" != "(ran)" ] && break
            sleep 0.5
        done
        printf '\n### the outer container lacks a node the spec names: --device nvidia.com/gpu=all (%s s)\n\n```\n%s\n```\n' \
            "$(since "$t")" "$o" >>"$results"
        check "gpu=all fails while the outer container lacks a node" "$([ "$o" != "(ran)" ] && echo ok || echo no)"
        hd exec "$outer" mknod /dev/nvidia1 c 1 3
    else
        # The rootless dockerd's /dev of stand-ins gets it too (a host's
        # own /dev would show it by itself).
        mknod "/proc/$(pgrep -P "$rootless_pid")/root/dev/nvidia1" c 1 3
    fi
    t=$EPOCHREALTIME
    for _ in $(seq 20); do
        o=$(od run --rm --network none --device nvidia.com/gpu=1 "$image" sh -c 'ls /dev/nvidia1' 2>&1 || true)
        [ "$o" = /dev/nvidia1 ] && break
        sleep 0.5
    done
    printf '\n### a node added on the host: --device nvidia.com/gpu=1 (%s s)\n\n```\n%s\n```\n' "$(since "$t")" "$o" >>"$results"
    check "the inner containers' dockerd uses the new spec" "$([ "$o" = /dev/nvidia1 ] && echo ok || echo no)"
fi
status_after=$("$bin/nvlibfs" status --state-dir "$work/state" "$mp")

{
    if [ "$form" = dind ]; then
        echo "# Docker-in-Docker with Docker 26 and the view"
        echo
        echo "- $(uname -sr); $(nvidia-smi -L 2>/dev/null | head -1 || echo "no GPU"); driver $(cat /sys/module/nvidia/version 2>/dev/null || echo "(fixture)")"
        echo "- host and outer dockerd $(od version -f '{{.Server.Version}}'), containerd $(chroot "$root" containerd --version | awk '{print $3}'), runc $(chroot "$root" runc --version | awk 'NR==1{print $3}')"
        echo "- outer daemon.json: \`$(cat "$root/share/daemon.json")\`"
    else
        echo "# Rootless Docker 26 and the view"
        echo
        echo "- $(uname -sr); $(nvidia-smi -L 2>/dev/null | head -1 || echo "no GPU"); driver $(cat /sys/module/nvidia/version 2>/dev/null || echo "(fixture)")"
        echo "- dockerd $(od info -f '{{.ServerVersion}}') run by uid 1000 through \`dockerd-rootless.sh\` (RootlessKit $(chroot "$root" rootlesskit --version | awk '{print $3}')), containerd $(chroot "$root" containerd --version | awk '{print $3}'), runc $(chroot "$root" runc --version | awk 'NR==1{print $3}')"
        echo "- its security options: $(od info -f '{{json .SecurityOptions}}')"
        echo "- ~/.config/docker/daemon.json: \`$(cat "$root/share/daemon.json")\`"
    fi
    echo "- device nodes: ${nodes[*]}"
    echo "- root file system and image: ${t_rootfs} s"
    echo
    echo "## Inner containers"
    cat "$results"
    echo "## The view's CDI spec, as the dockerd that reads it sees it"
    echo
    echo '```json'
    spec_seen
    echo '```'
    echo
    echo "## nvlibfs status before and after the inner containers"
    echo
    echo '```'
    echo "$status_before"
    echo
    echo "$status_after"
    echo '```'
    echo
    if [ ${#failures[@]} -eq 0 ]; then echo "All checks passed."; else printf -- '- FAILED: %s\n' "${failures[@]}"; fi
} >"$report"
say "report: $report"
[ ${#failures[@]} -eq 0 ]
