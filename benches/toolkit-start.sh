#!/usr/bin/env bash
# Container start with Docker 26 (Debian 13's dockerd, containerd, runc),
# the same image and the same workload, three ways:
#
#   toolkit:  --device nvidia.com/gpu=all from the NVIDIA Container
#             Toolkit's own spec (nvidia-ctk cdi generate): a bind mount per
#             driver file, and its hooks (nvidia-cdi-hook create-symlinks,
#             update-ldcache, enable-cuda-compat, disable-device-node-
#             modification) run by runc in every container
#   nvlibfs:  --device nvlibfs.io/gpu=all from nvlibfs's spec, in the same
#             spec directory (another kind, so both live side by side): the
#             view mounted once at /usr/local/nvidia, LD_LIBRARY_PATH
#   baked:    the same driver files copied into the image (ldconfig run
#             at build time), the device nodes given with --device
#
# The workload loads libcuda.so.1 and libnvidia-ml.so.1 with dlopen
# (nvlibfs-load) and exits. 20 starts in a row (after 2 to warm up), then
# 16 at once, 4 times, each way, interleaved; p50 and p95 of each `docker
# run`'s wall time. Writes OUT_DIR/toolkit-start.md. NVLIBFS_BENCH_RUNS,
# NVLIBFS_BENCH_TOGETHER and NVLIBFS_BENCH_ROUNDS change the counts.
#
#   benches/toolkit-start.sh DOCKER26_ROOTFS IMAGE_ROOTFS BIN_DIR TOOLKIT_DIR DRIVER_ROOT OUT_DIR [MOUNT FLAGS...]
#
# DOCKER26_ROOTFS: tarball of `debootstrap --variant=minbase --include=docker.io,docker-cli trixie`
# IMAGE_ROOTFS: tarball of the image's root (a Debian with ldconfig)
# BIN_DIR: nvlibfs, nvlibfs-mountd, nvlibfs-load; TOOLKIT_DIR: nvidia-ctk, nvidia-cdi-hook
# DRIVER_ROOT: the driver's root, whose dev/ and proc/driver/nvidia/gpus
#   the specs take (the fixture's with --device-nodes, or /)
# benches/toolkit_start.rs builds all of these and runs it on the fixture.
set -euo pipefail
[ $# -ge 6 ] || { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
[ "$(id -u)" = 0 ] || { echo "toolkit-start: needs root" >&2; exit 2; }
rootfs=$(realpath "$1") image_rootfs=$(realpath "$2") bin=$(realpath "$3") toolkit=$(realpath "$4")
driver_root=$(realpath "$5") out=$(realpath -m "$6")
shift 6
mount_flags=("$@")
runs=${NVLIBFS_BENCH_RUNS:-20}
together=${NVLIBFS_BENCH_TOGETHER:-16}
rounds=${NVLIBFS_BENCH_ROUNDS:-4}
mkdir -p "$out"
work=$(mktemp -d /var/tmp/nvlibfs-toolkit-start.XXXXXX)
root=$work/root
mp=/run/nvlibfs-bench-toolkit-$$
dev=$driver_root/dev
[ "$driver_root" = / ] && dev=/dev
say() { echo "toolkit-start: $*" >&2; }
hd() { chroot "$root" docker -H unix:///run/nvlibfs-bench.sock "$@"; }
outer=
cleanup() {
    set +e
    if [ -n "$outer" ]; then
        hd rm -f "$outer" >/dev/null 2>&1
        hd volume rm -f "$outer" >/dev/null 2>&1
    fi
    [ -f "$root/run/nvlibfs-bench.pid" ] && kill "$(cat "$root/run/nvlibfs-bench.pid")" 2>/dev/null
    for _ in $(seq 100); do [ -e "$root/run/nvlibfs-bench.pid" ] || break; sleep 0.2; done
    "$bin/nvlibfs" umount --state-dir "$work/state" "$mp" >/dev/null 2>&1
    rmdir "$mp" 2>/dev/null
    cp "$work/dockerd.log" "$out/toolkit-start-dockerd.log" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# 1. Docker 26's root, the view, and both specs in one spec directory.
mkdir -p "$root"
tar -C "$root" -xf "$rootfs"
"$bin/nvlibfs" mount "${mount_flags[@]}" --state-dir "$work/state" --dev "$dev" "$mp" >&2
mkdir -p "$root/share/cdi" "$root/etc/docker"
"$toolkit/nvidia-ctk" cdi generate --format json --driver-root "$driver_root" --dev-root "$driver_root" \
    --nvidia-cdi-hook-path "$toolkit/nvidia-cdi-hook" --output "$root/share/cdi/nvidia.json" 2>"$work/ctk.log" ||
    { cat "$work/ctk.log" >&2; exit 1; }
"$bin/nvlibfs" cdi generate --kind nvlibfs.io/gpu --spec-dirs "$root/share/cdi" --mountpoint "$mp" --dev "$dev" \
    --output "$root/share/cdi/nvlibfs.json"
echo '{"features": {"cdi": true}, "cdi-spec-dirs": ["/share/cdi"]}' >"$root/etc/docker/daemon.json"

# 2. The images: the same root, with the loader; one with the driver's
#    files (the view's lib64, links and all) baked in.
make_image() { # NAME BAKE
    local dir=$work/image-$1
    mkdir -p "$dir"
    tar -C "$dir" -xf "$image_rootfs"
    install -m 755 "$bin/nvlibfs-load" "$dir/usr/local/bin/"
    if [ "$2" = bake ]; then
        cp -a "$mp/lib64/." "$dir/usr/lib/x86_64-linux-gnu/"
        ldconfig -r "$dir"
    fi
    tar -C "$dir" -cf "$root/share/$1.tar" .
    rm -rf "$dir"
}
make_image plain no
make_image baked bake

# 3. Docker 26 on this host: in a mount and network namespace of its own
#    whose root is Debian 13's, with the host's /proc, /sys, /dev, the
#    driver root, the view and the toolkit at their own paths (the
#    toolkit's spec names host paths and its hook binary).
unshare --mount --net --propagation slave sh -c "
    set -e
    mount --bind '$root' '$root'
    for d in /proc /sys /dev '$driver_root' '$mp' '$toolkit'; do
        [ \"\$d\" = / ] && continue
        mkdir -p '$root'\$d; mount --rbind \$d '$root'\$d
    done
    cd '$root'
    mkdir -p .old-root
    pivot_root . .old-root
    umount -l /.old-root
    rmdir /.old-root
    exec dockerd -H unix:///run/nvlibfs-bench.sock --pidfile /run/nvlibfs-bench.pid \
        --iptables=false --ip-masq=false --bridge=none --storage-driver=overlay2
" >"$work/dockerd.log" 2>&1 &
for _ in $(seq 120); do hd info >/dev/null 2>&1 && break; sleep 0.5; done
hd info >/dev/null || { tail -20 "$work/dockerd.log" >&2; exit 1; }
for i in plain baked; do hd import "/share/$i.tar" "nvlibfs-bench-28:$i" >/dev/null; done
say "dockerd $(hd version -f '{{.Server.Version}}') up, images imported"

nodes=()
while read -r n; do nodes+=(--device "$n:/dev/${n#"$dev"/}"); done < <(find "$dev" -maxdepth 1 -type c -name 'nvidia*' | sort)
load='nvlibfs-load libcuda.so.1 libnvidia-ml.so.1'
flags() { # WAY: the docker run flags and image
    case $1 in
    toolkit) echo "--device nvidia.com/gpu=all nvlibfs-bench-28:plain" ;;
    nvlibfs) echo "--device nvlibfs.io/gpu=all nvlibfs-bench-28:plain" ;;
    baked) echo "${nodes[*]} nvlibfs-bench-28:baked" ;;
    esac
}
start() { # WAY FILE: one container start, its seconds appended to FILE
    local t0 t1 o
    t0=$EPOCHREALTIME
    # shellcheck disable=SC2046
    o=$(hd run --rm --network none $(flags "$1") sh -c "$load" 2>&1) || { echo "$1: $o" >>"$work/failed"; }
    t1=$EPOCHREALTIME
    grep -q "libcuda.so.1 " <<<"$o" || echo "$1: $o" >>"$work/failed"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f\n", b - a }' >>"$2"
}
ways=(toolkit nvlibfs baked)
for w in "${ways[@]}"; do
    o=$(hd run --rm --network none $(flags "$w") sh -c "$load" 2>&1) || true
    printf '%s: %s\n' "$w" "$(tr '\n' ' ' <<<"$o")" >>"$work/sample"
done
for _ in 1 2; do for w in "${ways[@]}"; do start "$w" /dev/null; done; done
for _ in $(seq "$runs"); do for w in "${ways[@]}"; do start "$w" "$work/row-$w"; done; done
say "$runs in a row done"
for _ in $(seq "$rounds"); do
    for w in "${ways[@]}"; do
        t0=$EPOCHREALTIME
        pids=()
        for _ in $(seq "$together"); do
            start "$w" "$work/together-$w" &
            pids+=($!)
        done
        # Not a bare `wait`: that would wait for the dockerd too.
        wait "${pids[@]}"
        awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f\n", b - a }' >>"$work/batch-$w"
    done
done
say "$together at once ($rounds rounds) done"

# 4. The page cache of the driver for 4 different images: 4 images each
#    with the driver baked in (each its own layer: a marker file makes
#    their contents differ, so docker keeps 4 copies), against the same 4
#    images using the view. Each copy of libcuda (the layers' and the
#    host's, which the view serves with passthrough, or its own cache
#    without) is evicted first (POSIX_FADV_DONTNEED, that file only), then
#    each container loads libcuda and reads every page of it; fincore
#    says how much of each copy is in the page cache.
evict() { python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"; }
resident_mib() { fincore -b -n -o RES "$@" | awk '{ s += $1 } END { printf "%.1f", s / 1048576 }'; }
libcuda=$(basename "$(readlink -f "$mp/lib64/libcuda.so.1")")
copies() { find "$root/var/lib/docker/overlay2" -path "*/diff/usr/lib/x86_64-linux-gnu/$libcuda" -type f | sort; }
baked_copies=()
for i in 1 2 3 4; do
    copies >"$work/copies-before"
    dir=$work/image-$i
    mkdir -p "$dir"
    tar -C "$dir" -xf "$root/share/baked.tar"
    echo "image $i" >"$dir/etc/nvlibfs-bench-image"
    tar -C "$dir" -cf - . | hd import - "nvlibfs-bench-28:baked-$i" >/dev/null
    rm -rf "$dir"
    # This image's own copy of libcuda, in its layer.
    baked_copies+=("$(copies | comm -13 "$work/copies-before" - | head -1)")
done
for i in 1 2 3 4; do
    dir=$work/image-plain-$i
    mkdir -p "$dir"
    tar -C "$dir" -xf "$root/share/plain.tar"
    echo "image $i" >"$dir/etc/nvlibfs-bench-image"
    tar -C "$dir" -cf - . | hd import - "nvlibfs-bench-28:plain-$i" >/dev/null
    rm -rf "$dir"
done
host_libcuda=$(find "$driver_root" -xdev -name "$libcuda" -type f | head -1)
# Each copy is measured right after its container read it (the machine's
# other users may drop caches meanwhile); the view's one copy after the
# last container.
evict "${baked_copies[@]}" "$host_libcuda"
baked_mib=0
for i in 1 2 3 4; do
    # shellcheck disable=SC2086
    hd run --rm --network none ${nodes[*]} "nvlibfs-bench-28:baked-$i" nvlibfs-load --touch libcuda.so.1 >/dev/null
    baked_mib=$(awk -v a="$baked_mib" -v b="$(resident_mib "${baked_copies[$((i - 1))]}")" 'BEGIN { printf "%.1f", a + b }')
done
evict "${baked_copies[@]}" "$host_libcuda"
for i in 1 2 3 4; do
    hd run --rm --network none --device nvlibfs.io/gpu=all "nvlibfs-bench-28:plain-$i" nvlibfs-load --touch libcuda.so.1 >/dev/null
done
view_mib=$(resident_mib "$host_libcuda")
libcuda_mib=$(stat -c %s "$host_libcuda" | awk '{ printf "%.1f", $1 / 1048576 }')
say "page cache: baked ${baked_mib} MiB in ${#baked_copies[@]} copies, view ${view_mib} MiB"

# 5. Docker-in-Docker, nvlibfs alone (the toolkit's spec needs the host's
#    paths and its hook binary, which an outer container lacks): an outer
#    container of this dockerd runs Docker 26's dockerd (overlay2 on a
#    volume), given the view, the device nodes and the one daemon.json
#    line that points CDI at the spec the view carries; inside it, the
#    same starts with --device nvidia.com/gpu=all, and with the driver
#    baked into the image. The loop runs in the outer container and times
#    each `docker run` there.
dind=${NVLIBFS_BENCH_DIND:-1}
if [ "$dind" = 1 ]; then
    outer=nvlibfs-bench-28-outer-$$
    cp "$rootfs" "$root/share/docker26.tar"
    hd import /share/docker26.tar nvlibfs-bench-28:dockerd >/dev/null
    rm "$root/share/docker26.tar"
    echo "{\"features\": {\"cdi\": true}, \"cdi-spec-dirs\": [\"$mp/etc/cdi\"]}" >"$root/share/dind-daemon.json"
    cat >"$root/share/dind-times.sh" <<'TIMES'
#!/bin/bash
# WAY RUNS TOGETHER ROUNDS LOAD WARM: times inner `docker run`s, one per line
way=$1 runs=$2 together=$3 rounds=$4 load=$5 warm=$6
case $way in
nvlibfs) flags=(--device nvidia.com/gpu=all nvlibfs-bench-28:plain) ;;
baked) flags=(); for n in /dev/nvidia*; do [ -c "$n" ] && flags+=(--device "$n"); done; flags+=(nvlibfs-bench-28:baked) ;;
esac
one() {
    local t0=$EPOCHREALTIME o
    o=$(docker run --rm --network none "${flags[@]}" sh -c "$load" 2>&1)
    grep -q "libcuda.so.1 " <<<"$o" || echo "FAILED $way: $o" >&2
    awk -v a="$t0" -v b="$EPOCHREALTIME" -v k="$1" 'BEGIN { printf "%s %.4f\n", k, b - a }'
}
for _ in $(seq "$warm"); do one warm >/dev/null; done
for _ in $(seq "$runs"); do one row; done
for _ in $(seq "$rounds"); do
    pids=()
    for _ in $(seq "$together"); do one together & pids+=($!); done
    wait "${pids[@]}"
done
TIMES
    entry='mount -o remount,rw /sys
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then mount -o remount,rw /sys/fs/cgroup
    else for d in /sys/fs/cgroup/*; do mount -o remount,bind,rw "$d"; done; fi
    exec dockerd --iptables=false --ip-masq=false --bridge=none --storage-driver=overlay2'
    # shellcheck disable=SC2086
    hd run -d --name "$outer" --privileged -v "$outer:/var/lib/docker" -v "$mp:$mp:ro,rslave" \
        -v /share:/share:ro -v /share/dind-daemon.json:/etc/docker/daemon.json:ro \
        ${nodes[*]} nvlibfs-bench-28:dockerd sh -c "$entry" >/dev/null
    od() { hd exec "$outer" docker "$@"; }
    for _ in $(seq 120); do od info >/dev/null 2>&1 && break; sleep 0.5; done
    od info >/dev/null || { hd logs --tail 20 "$outer" >&2; exit 1; }
    for i in plain baked; do od import "/share/$i.tar" "nvlibfs-bench-28:$i" >/dev/null; done
    say "outer dockerd $(od version -f '{{.Server.Version}}') ($(od info -f '{{.Driver}}')) up"
    # Interleaved, as on the host: 4 x (a quarter of the starts in a row
    # each way), then the rounds of starts at once, each way in turn.
    times() { # WAY RUNS TOGETHER ROUNDS WARM
        hd exec "$outer" bash /share/dind-times.sh "$1" "$2" "$3" "$4" "$load" "$5" >>"$work/dind-$1" 2>>"$work/failed"
    }
    for w in nvlibfs baked; do times "$w" 0 0 0 2; done
    for _ in 1 2 3 4; do for w in nvlibfs baked; do times "$w" "$(((runs + 3) / 4))" 0 0 0; done; done
    for _ in $(seq "$((rounds / 2 > 0 ? rounds / 2 : 1))"); do for w in nvlibfs baked; do times "$w" 0 "$together" 1 0; done; done
    for w in nvlibfs baked; do
        grep '^row ' "$work/dind-$w" | cut -d' ' -f2 >"$work/dind-row-$w"
        grep '^together ' "$work/dind-$w" | cut -d' ' -f2 >"$work/dind-together-$w"
    done
    dind_driver=$(od info -f '{{.Driver}}')
    hd rm -f "$outer" >/dev/null
    hd volume rm -f "$outer" >/dev/null
    say "Docker-in-Docker done"
fi

pct() { # FILE P: the P-th percentile (nearest rank) in ms
    sort -n "$1" | awk -v p="$2" '{ v[NR] = $1 } END { r = int((p / 100) * NR + 0.999999); if (r < 1) r = 1; printf "%.0f", v[r] * 1000 }'
}
{
    echo "# Container start: the NVIDIA Container Toolkit's spec, nvlibfs's, and the driver baked in"
    echo
    echo "- $(uname -sr), $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1 || echo "no GPU: the fixture driver")"
    echo "- driver root \`$driver_root\`, driver $(cat "${driver_root%/}/sys/module/nvidia/version")"
    echo "- dockerd $(hd version -f '{{.Server.Version}}') (overlay2), containerd $(chroot "$root" containerd --version | awk '{print $3}'), runc $(chroot "$root" runc --version | awk 'NR==1{print $3}'); NVIDIA Container Toolkit v1.18.0 built from source"
    echo "- workload: \`docker run --rm --network none FLAGS IMAGE sh -c '$load'\`; $runs in a row (after 2 each to warm up), then $together at once, $rounds times; the three ways interleaved"
    echo "- the toolkit's spec: $(grep -o '"hostPath"' "$root/share/cdi/nvidia.json" | wc -l) host paths (files and device nodes), hooks: $(grep -o '"nvidia-cdi-hook",[^]]*' "$root/share/cdi/nvidia.json" | cut -d'"' -f4 | sort -u | tr '\n' ' ')"
    echo
    echo "| way | in a row p50 (ms) | p95 | ×toolkit p50 | ×baked p50 | $together at once p50 (ms) | p95 | ×toolkit p50 | ×baked p50 | batch wall (s) |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for w in "${ways[@]}"; do
        r50=$(pct "$work/row-$w" 50) r95=$(pct "$work/row-$w" 95)
        t50=$(pct "$work/together-$w" 50) t95=$(pct "$work/together-$w" 95)
        rt=$(pct "$work/row-toolkit" 50) rb=$(pct "$work/row-baked" 50)
        tt=$(pct "$work/together-toolkit" 50) tb=$(pct "$work/together-baked" 50)
        printf '| %s | %s | %s | ×%s | ×%s | %s | %s | ×%s | ×%s | %s |\n' "$w" "$r50" "$r95" \
            "$(awk -v a="$r50" -v b="$rt" 'BEGIN{printf "%.2f", a/b}')" "$(awk -v a="$r50" -v b="$rb" 'BEGIN{printf "%.2f", a/b}')" \
            "$t50" "$t95" \
            "$(awk -v a="$t50" -v b="$tt" 'BEGIN{printf "%.2f", a/b}')" "$(awk -v a="$t50" -v b="$tb" 'BEGIN{printf "%.2f", a/b}')" \
            "$(tr '\n' ' ' <"$work/batch-$w")"
    done
    if [ "$dind" = 1 ]; then
        echo
        echo "## Docker-in-Docker, nvlibfs alone"
        echo
        echo "An outer container (privileged, the view at its own path, rslave, and the device nodes) runs Docker 26's dockerd ($dind_driver on a volume), whose daemon.json points CDI at the spec the view carries; the loop runs in the outer container, timing each inner \`docker run\` ($runs in a row, then $together at once, $((rounds / 2 > 0 ? rounds / 2 : 1)) times). The toolkit's spec is not run there: it names the host's files and its hook binary by host paths, which the outer container would have to be given one by one."
        echo
        echo "| way | in a row p50 (ms) | p95 | ×baked p50 | $together at once p50 (ms) | p95 | ×baked p50 |"
        echo "|---|---|---|---|---|---|---|"
        for w in nvlibfs baked; do
            r50=$(pct "$work/dind-row-$w" 50) t50=$(pct "$work/dind-together-$w" 50)
            rb=$(pct "$work/dind-row-baked" 50) tb=$(pct "$work/dind-together-baked" 50)
            printf '| %s | %s | %s | ×%s | %s | %s | ×%s |\n' "$w" "$r50" "$(pct "$work/dind-row-$w" 95)" \
                "$(awk -v a="$r50" -v b="$rb" 'BEGIN{printf "%.2f", a/b}')" "$t50" "$(pct "$work/dind-together-$w" 95)" \
                "$(awk -v a="$t50" -v b="$tb" 'BEGIN{printf "%.2f", a/b}')"
        done
    fi
    echo
    echo "## The page cache of 4 images"
    echo
    echo "4 images, each loading libcuda ($libcuda, $libcuda_mib MiB) and reading every page of it (nvlibfs-load --touch), after that file alone was evicted from the page cache:"
    echo
    echo "| | copies of libcuda on disk | libcuda in the page cache (MiB) |"
    echo "|---|---|---|"
    echo "| the driver baked into each image (4 layers) | ${#baked_copies[@]} | $baked_mib |"
    echo "| the same 4 images with the view | 1 (the host's) | $view_mib |"
    echo
    echo "What each container printed (first run):"
    echo
    echo '```'
    cat "$work/sample"
    echo '```'
    if [ -s "$work/failed" ]; then
        echo
        echo "FAILED starts:"
        echo '```'
        head -20 "$work/failed"
        echo '```'
    fi
} >"$out/toolkit-start.md"
cat "$out/toolkit-start.md"
[ ! -s "$work/failed" ]
