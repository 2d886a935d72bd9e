#!/usr/bin/env bash
# Builds nvlibfs's release artifacts into dist/, as root, on a Debian or
# Ubuntu machine with network access to the package archives:
#
#   nvlibfs-<version>-<arch>-linux.tar.gz   both binaries (stripped), man page,
#                                           completions, systemd unit, licence;
#                                           unpack with
#                                           tar -C /usr/local --strip-components=1 -xzf FILE
#   nvlibfs_<version>_<deb arch>.deb        Depends: libc6 (>= 2.17)
#   nvlibfs-<version>-1.<arch>.rpm          Requires: glibc >= 2.17
#   SHA256SUMS
#
# for x86_64 and aarch64. The binaries are built by Debian 13's rustc
# (1.85, the project's rust-version, which proves every dependency builds
# with it) in a debootstrapped Debian 13 root, and linked by zig
# (cargo-zigbuild) against glibc 2.17's symbols, so the C library is never
# what stops them: they run wherever the kernel is new enough (5.6+, for
# openat2; Amazon Linux 2 with its 5.10 kernel and glibc 2.26, Debian 11,
# Ubuntu 20.04, RHEL 9; not RHEL 8, whose 4.18 kernel lacks openat2). The
# script fails if a binary asks for a newer glibc symbol.
#
#   contrib/release.sh           # build dist/
#   contrib/release.sh --check   # test what dist/ holds, as users meet it:
#       the x86_64 tarball's binaries, then the installed .deb, in a Debian 11
#       root (glibc 2.31): --version, a scan and a mount of a fake driver
#       (tests/fixture); `rpm -qpl` of each .rpm; the aarch64 tarball's
#       binaries in a Debian 11 arm64 root run by qemu-user (a binfmt_misc
#       of a user namespace of its own, nothing registered on the host):
#       --version, a scan and a mount (--no-passthrough) of an aarch64 fake
#       driver. Slow (minutes); not part of contrib/test.sh.
#
# The build root (with the Python venv holding zig), the Debian 11 roots of
# the check live in /var/cache/nvlibfs-test (NVLIBFS_TEST_CACHE), which
# `contrib/test.sh --clean` removes; host packages this script installs
# (debootstrap, rpm, the aarch64 cross compiler the fixture
# needs) are recorded there for --clean as well.
set -euo pipefail
# A failure inside $(...) ends the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
repo=$PWD

cache=${NVLIBFS_TEST_CACHE:-/var/cache/nvlibfs-test}
installed=$cache/installed-packages
# Bump to rebuild the cached build root.
build_key=release-trixie-1
build_root=$cache/$build_key
# The glibc the binaries are linked against: the oldest any supported
# distribution still has, and the first with aarch64.
glibc=2.17
targets=(x86_64 aarch64)
zig_pins=(ziglang==0.14.1 cargo-zigbuild==0.24.1)

check=false
bullseye_key=release-bullseye-1
case "${1:-}" in
    "") ;;
    --check) check=true ;;
    -h | --help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "release.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "release.sh: run it as root (debootstrap, chroot)" >&2; exit 1; }

log() { echo "release.sh: $*" >&2; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
target_dir=target/release-dist
dist=dist
# The fake driver's version in the check.
fixture_version=580.159.04
deb_arch() { case $1 in x86_64) echo amd64 ;; aarch64) echo arm64 ;; esac; }
machine() { case $1 in x86_64) echo "Advanced Micro Devices X86-64" ;; aarch64) echo AArch64 ;; esac; }
bin_dir() { echo "$target_dir/$1-unknown-linux-gnu/release"; }

# Host tools, installed with apt if missing and recorded for
# `contrib/test.sh --clean`.
need_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]} with apt (contrib/test.sh --clean removes them)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    mkdir -p "$cache"
    printf '%s\n' "${missing[@]}" >>"$installed"
}

# Takes the cache entry lock NAME (the lock files of
# tests/common/images.rs), so two runs never build one entry at once;
# unlock NAME gives it back.
declare -A locks
lock() {
    local fd
    mkdir -p "$cache"
    exec {fd}>"$cache/$1.lock"
    flock "$fd"
    locks[$1]=$fd
}
unlock() { exec {locks[$1]}>&-; }

# The Debian 13 build root: rustc 1.85 with the x86_64 and arm64
# standard libraries, and a venv with zig and cargo-zigbuild. Name
# resolution and the certificate authorities (a proxy's included) are the
# host's, at each entry.
make_build_root() {
    [ -e "$build_root/.complete" ] && return
    local tmp=$build_root.tmp
    if [ ! -e "$tmp/.debootstrapped" ]; then
        rm -rf "$tmp"
        log "debootstrapping Debian 13 into $tmp (once; a few minutes)"
        debootstrap --variant=minbase \
            --include=rustc,cargo,libstd-rust-dev,gcc,libc6-dev,python3-venv,ca-certificates \
            trixie "$tmp" >"$cache/$build_key.log" 2>&1 ||
            { tail -20 "$cache/$build_key.log" >&2; exit 1; }
        touch "$tmp/.debootstrapped"
    fi
    in_root "$tmp" sh -euc "
        dpkg --add-architecture arm64
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libstd-rust-dev:arm64
        rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
        python3 -m venv /opt/zig
        /opt/zig/bin/pip install --quiet --disable-pip-version-check ${zig_pins[*]}
    " >>"$cache/$build_key.log" 2>&1 || { tail -20 "$cache/$build_key.log" >&2; exit 1; }
    touch "$tmp/.complete"
    mv "$tmp" "$build_root"
}

# Runs "$@" chrooted into ROOT, in a mount namespace of its own (the
# mounts end with it): /proc, /dev, the host's resolv.conf and CA
# certificates, and this checkout at /src; with a clean environment.
in_root() {
    local root=$1
    shift
    unshare -m --propagation private sh -euc '
        root=$1; src=$2; shift 2
        mount -t proc proc "$root/proc"
        mount --bind /dev "$root/dev"
        for f in /etc/resolv.conf /etc/ssl/certs/ca-certificates.crt; do
            [ -e "$root$f" ] || { mkdir -p "$(dirname "$root$f")"; touch "$root$f"; }
            mount --bind "$f" "$root$f"
        done
        mkdir -p "$root/src"
        mount --bind "$src" "$root/src"
        exec chroot "$root" "$@"' sh "$root" "$repo" \
        env -i PATH=/opt/zig/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$@"
}

# A Debian 11 root for ARCH (amd64: complete; arm64: debootstrap's first
# stage, every essential package unpacked, which is what running
# binaries needs), as a tarball in the cache.
bullseye_tar() {
    local arch=$1 tar=$cache/$bullseye_key-$1.tar
    [ -e "$tar" ] && { echo "$tar"; return; }
    lock "$bullseye_key-$arch"
    if [ ! -e "$tar" ]; then
        local tmp=$cache/$bullseye_key-$arch.tmp foreign=()
        [ "$arch" = amd64 ] || foreign=(--foreign --arch="$arch")
        rm -rf "$tmp"
        log "debootstrapping Debian 11 ($arch) into $tmp (once)"
        debootstrap --variant=minbase "${foreign[@]}" bullseye "$tmp" >"$tmp.log" 2>&1 ||
            { tail -20 "$tmp.log" >&2; exit 1; }
        tar -C "$tmp" -cf "$tar.partial" . && mv "$tar.partial" "$tar"
        rm -rf "$tmp" "$tmp.log"
    fi
    unlock "$bullseye_key-$arch"
    echo "$tar"
}

# What the check runs in each root: the binaries in $1 (a directory, or
# "" for those on PATH) show their version, scan the fake driver at
# /fake-host and serve it at /view with the flags in $2; the view's
# libcuda must be the host's, byte for byte.
try_binaries() {
    cat <<SH
set -eu
bin=\${1:-}; flags=\${2:-}; triplet=\$3
echo "--- nvlibfs --version; nvlibfs-mountd --version"
\${bin}nvlibfs --version
\${bin}nvlibfs-mountd --version
drv="--driver-root /fake-host --module-version-file /fake-host/sys/module/nvidia/version"
echo "--- nvlibfs scan (last lines)"
\${bin}nvlibfs scan \$drv | tail -4
echo "--- nvlibfs mount \$flags"
mkdir -p /view
\${bin}nvlibfs mount \$drv \$flags /view
lib=libcuda.so.$fixture_version
cmp /view/lib64/\$lib /fake-host/usr/lib/\$triplet/\$lib
echo "view: lib64/libcuda.so.1 -> \$(readlink /view/lib64/libcuda.so.1), \$(ls /view/lib64 | wc -l) entries in lib64, libcuda identical to the host's"
\${bin}nvlibfs status /view | head -3
\${bin}nvlibfs umount /view
echo "--- unmounted"
SH
}

# Runs the shell script on stdin with "$@" as its arguments, chrooted
# into ROOT, in a mount namespace of its own (mounts and daemons left there
# end with it), with /proc and /dev (FUSE) of the host.
in_check_root() {
    local root=$1
    shift
    cat >"$root/check.sh"
    # A pid namespace too: a daemon a failed step leaves ends with it.
    unshare --pid --fork -m --propagation private sh -euc '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount --bind /dev "$root/dev"
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/sh /check.sh "$@"' sh "$root" "$@"
}

# Debian 13's qemu-aarch64 (10.0, static): Debian 12's (7.2) lacks
# openat2, which nvlibfs resolves every driver file with. Taken from the
# build root's archive, cached on its own.
qemu_aarch64() {
    local dir=$cache/release-qemu-1
    if [ ! -x "$dir/qemu-aarch64" ]; then
        lock release-qemu-1
        if [ ! -x "$dir/qemu-aarch64" ]; then
            rm -rf "$dir.tmp" "$build_root"/tmp/qemu-user_*.deb
            in_root "$build_root" sh -euc 'apt-get update -q && cd /tmp && apt-get download qemu-user
                rm -rf /var/lib/apt/lists/*' >/dev/null
            mkdir -p "$dir.tmp"
            dpkg -x "$build_root"/tmp/qemu-user_*.deb "$dir.tmp/deb"
            mv "$dir.tmp/deb/usr/bin/qemu-aarch64" "$dir.tmp/"
            rm -rf "$dir.tmp/deb" "$build_root"/tmp/qemu-user_*.deb
            mv "$dir.tmp" "$dir"
        fi
        unlock release-qemu-1
    fi
    echo "$dir/qemu-aarch64"
}

run_check() {
    [ -e "$dist/SHA256SUMS" ] || { log "no $dist/SHA256SUMS: run contrib/release.sh first"; exit 1; }
    need_packages debootstrap rpm gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    echo "=== sha256sum -c SHA256SUMS"
    (cd "$dist" && sha256sum -c SHA256SUMS)
    cargo build --quiet -p nvlibfs-fixture
    local fixture=${CARGO_TARGET_DIR:-target}/debug/nvlibfs-fixture amd64 arm64
    amd64=$(bullseye_tar amd64)
    arm64=$(bullseye_tar arm64)
    local qemu
    qemu=$(qemu_aarch64)
    check_work=$(mktemp -d /tmp/nvlibfs-release-check.XXXXXX)
    trap 'rm -rf "$check_work"' EXIT

    echo "=== x86_64: the tarball's binaries, then the installed .deb, in Debian 11 (amd64)"
    local root=$check_work/bullseye-amd64 name=nvlibfs-$version-x86_64-linux
    mkdir "$root" && tar -C "$root" -xf "$amd64"
    "$fixture" --libcuda-mib 8 "$root/fake-host" >/dev/null
    mkdir -p "$root/opt" && tar -C "$root/opt" -xzf "$dist/$name.tar.gz"
    cp "$dist/nvlibfs_${version}_amd64.deb" "$root/tmp/"
    {
        echo 'echo "--- $(ldd --version | head -1)"'
        echo 'echo "=== from the tarball"'
        try_binaries
        echo 'echo "=== dpkg -i the .deb"'
        echo "dpkg -i /tmp/nvlibfs_${version}_amd64.deb && dpkg-query -W -f='\${Package} \${Version} Depends: \${Depends}\n' nvlibfs"
        echo 'command -v nvlibfs; command -v nvlibfs-mountd'
    } | in_check_root "$root" "/opt/$name/bin/" "" x86_64-linux-gnu
    try_binaries | in_check_root "$root" "" "" x86_64-linux-gnu

    echo "=== rpm -qpl, rpm -qp --requires"
    for t in "${targets[@]}"; do
        rpm -qp --qf '%{NAME}-%{VERSION}-%{RELEASE} %{ARCH}\n' "$dist/nvlibfs-$version-1.$t.rpm"
        rpm -qpl "$dist/nvlibfs-$version-1.$t.rpm"
        rpm -qp --requires "$dist/nvlibfs-$version-1.$t.rpm" | grep -i glibc
    done
    echo "=== the .debs' Depends"
    for t in "${targets[@]}"; do
        dpkg-deb -f "$dist/nvlibfs_${version}_$(deb_arch "$t").deb" Package Architecture Depends | tr '\n' ' '
        echo
    done

    echo "=== aarch64: the tarball's binaries in Debian 11 (arm64) under qemu-user"
    root=$check_work/bullseye-arm64 name=nvlibfs-$version-aarch64-linux
    mkdir "$root" && tar -C "$root" -xf "$arm64"
    # debootstrap's first stage leaves /proc a link to the host's.
    rm "$root/proc" && mkdir "$root/proc"
    "$fixture" --arch aarch64 --libcuda-mib 8 "$root/fake-host" >/dev/null
    mkdir -p "$root/opt" && tar -C "$root/opt" -xzf "$dist/$name.tar.gz"
    # binfmt_misc in a user namespace of its own (Linux 6.7+): aarch64
    # programs started in it, and those they start, run under qemu (the
    # static one, opened at registration: F; handed the program as an open
    # file: O, else the supervisor's fexecve of its own binary, a
    # close-on-exec /proc/self/fd path, fails); the host's binfmt_misc
    # stays as it was. Its root is this root (uid 0).
    echo "--- $("$qemu" --version | head -1)"
    try_binaries | sed '1a echo "--- $(ls /lib/aarch64-linux-gnu/libc-*.so), uname -m: $(uname -m)"' >"$root/check.sh"
    unshare --user --map-root-user --pid --fork -m --propagation private sh -euc '
        root=$1 qemu=$2; shift 2
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        printf "%b" ":nvlibfs-aarch64:M::\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:$qemu:FO" \
            >/proc/sys/fs/binfmt_misc/register
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/sh /check.sh "$@"' \
        sh "$root" "$qemu" "/opt/$name/bin/" --no-passthrough aarch64-linux-gnu

    echo "=== the image: contrib/Dockerfile on a Debian 11 base (made from the root above)"
    if ! docker info >/dev/null 2>&1; then log "no dockerd answers: start one for the image's check"; exit 1; fi
    local base=nvlibfs-test-release-base:bullseye image=nvlibfs-test-release:$version
    docker image inspect "$base" >/dev/null 2>&1 || docker import "$amd64" "$base" >/dev/null
    docker build -q -f contrib/Dockerfile --build-arg BASE="$base" --build-arg VERSION="$version" -t "$image" "$dist"
    docker image inspect -f 'image {{.RepoTags}}: {{.Size}} bytes, Cmd {{.Config.Cmd}}' "$image"
    docker run --rm "$image" nvlibfs-mountd --version
    "$fixture" --libcuda-mib 8 "$check_work/image-host" >/dev/null
    docker run --rm -v "$check_work/image-host:/host:ro" "$image" \
        nvlibfs scan --driver-root /host --module-version-file /host/sys/module/nvidia/version | head -4
    # The mount in a container: FUSE, CAP_SYS_ADMIN and the
    # CAP_DAC_READ_SEARCH the daemon keeps (it refuses to serve without
    # being able to drop to exactly those), no more.
    docker run --rm --device /dev/fuse --cap-add SYS_ADMIN --cap-add DAC_READ_SEARCH \
        --security-opt apparmor=unconfined \
        -v "$check_work/image-host:/host:ro" "$image" sh -euc '
            mkdir /view
            nvlibfs mount --driver-root /host --module-version-file /host/sys/module/nvidia/version /view
            echo "in the container: $(ls /view/lib64 | wc -l) entries in lib64, libcuda.so.1 -> $(readlink /view/lib64/libcuda.so.1)"
            nvlibfs umount /view'
    echo "=== release check passed"
}

if $check; then
    run_check
    exit
fi

need_packages debootstrap rpm binutils gzip
lock "$build_key"
make_build_root
unlock "$build_key"

rev=$(git rev-parse --short=12 HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo -dirty || true)
# Timestamps in the archives: the commit's, so a rebuild of one commit
# gives the same tarballs.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
work=$target_dir/stage

# Both binaries for both machines, by Debian 13's rustc 1.85 with the
# exact versions of Cargo.lock, linked by zig against glibc $glibc's
# symbols, stripped.
log "building nvlibfs $version ($rev) for ${targets[*]} with Debian 13's rustc and zig (glibc $glibc)"
zig_targets=()
for t in "${targets[@]}"; do zig_targets+=(--target "$t-unknown-linux-gnu.$glibc"); done
in_root "$build_root" env CARGO_HOME=/root/.cargo CARGO_TARGET_DIR="/src/$target_dir" NVLIBFS_GIT_REV="$rev" \
    CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_DEBUG=0 \
    sh -euc 'cd /src && rustc --version && cargo zigbuild --locked --release -p nvlibfs -p nvlibfs-mountd --bins "$@"' \
    sh "${zig_targets[@]}"

# The binaries' own check: the right machine, stripped, and no glibc
# symbol newer than $glibc.
for t in "${targets[@]}"; do
    for b in nvlibfs nvlibfs-mountd; do
        f=$(bin_dir "$t")/$b
        readelf -h "$f" | grep -q "Machine: *$(machine "$t")" || { log "$f is not an $t ELF file"; exit 1; }
        if readelf -S --wide "$f" | grep -qE '\.(symtab|debug_info) '; then log "$f is not stripped"; exit 1; fi
        newest=$(readelf -V --wide "$f" | grep -o 'Name: GLIBC_[0-9.]*' | sed 's/.*GLIBC_//' | sort -uV | tail -1)
        if [ "$(printf '%s\n%s\n' "$newest" "$glibc" | sort -V | tail -1)" != "$glibc" ]; then
            log "$f needs GLIBC_$newest, newer than $glibc, for:"
            readelf --dyn-syms --wide "$f" | grep -oE '[^ ]+@GLIBC_[0-9.]+' | sort -u |
                awk -F@GLIBC_ -v max="$glibc" '{ print $2 " " $0 }' | sort -V | awk -v max="$glibc" '$1 != max' >&2
            exit 1
        fi
        log "$f: $(du -h "$f" | cut -f1), needs GLIBC_$newest"
    done
done

rm -rf "$work" "$dist"
mkdir -p "$work" "$dist"
docs_from=$(bin_dir x86_64)/nvlibfs
for t in "${targets[@]}"; do
    bins=$(bin_dir "$t")
    # The tarball: the /usr/local tree (the unit in /usr/local/lib/systemd/system,
    # where systemd looks too) under nvlibfs-<version>-<arch>-linux/.
    name=nvlibfs-$version-$t-linux
    DESTDIR=$work/tar-$t PREFIX=/usr/local UNIT_DIR=$work/tar-$t/usr/local/lib/systemd/system \
        contrib/install.sh --bin-dir "$bins" --docs-from "$docs_from" >/dev/null
    mv "$work/tar-$t/usr/local" "$work/$name"
    tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" -cf - "$name" |
        gzip -9n >"$dist/$name.tar.gz"
    # The .deb, by the same script.
    DEB_DIR=$dist contrib/install.sh --deb --bin-dir "$bins" --docs-from "$docs_from" --arch "$(deb_arch "$t")" >/dev/null
    # The .rpm: the same files under /usr, the unit in /usr/lib/systemd/system.
    rpm_root=$work/rpm-$t/root
    DESTDIR=$rpm_root PREFIX=/usr UNIT_DIR=$rpm_root/usr/lib/systemd/system \
        contrib/install.sh --bin-dir "$bins" --docs-from "$docs_from" >/dev/null
    cat >"$work/rpm-$t/nvlibfs.spec" <<SPEC
Name: nvlibfs
Version: $version
Release: 1
Summary: Version-pinned view of the host's NVIDIA driver for containers
License: Apache-2.0
Requires: glibc >= $glibc
# Built and stripped already, for another machine perhaps: no debuginfo
# package, no build-id links, no strip by this machine's tools.
%define debug_package %{nil}
%define _build_id_links none
%define __strip /bin/true
%define __os_install_post %{nil}
# The same package from the same commit: its time and host are the commit's.
%define use_source_date_epoch_as_buildtime 1
%define clamp_mtime_to_source_date_epoch 1
%define _buildhost reproducible

%description
A FUSE daemon that serves the NVIDIA user-space driver files matching the
loaded kernel module, read-only, for containers and Docker-in-Docker to
bind-mount at /usr/local/nvidia.

%install
cp -a $PWD/$rpm_root/. %{buildroot}/

%files
/usr/bin/nvlibfs
/usr/bin/nvlibfs-mountd
/usr/share/man/man1/nvlibfs.1*
/usr/share/bash-completion/completions/nvlibfs
/usr/share/zsh/vendor-completions/_nvlibfs
/usr/share/fish/vendor_completions.d/nvlibfs.fish
/usr/lib/systemd/system/nvlibfs.service
%license /usr/share/doc/nvlibfs/LICENSE
SPEC
    rpmbuild -bb --quiet --target "$t-linux" --define "_topdir $PWD/$work/rpm-$t/top" \
        --define "_rpmdir $PWD/$work/rpm-$t/out" "$work/rpm-$t/nvlibfs.spec" >"$work/rpm-$t/rpmbuild.log" 2>&1 ||
        { tail -20 "$work/rpm-$t/rpmbuild.log" >&2; exit 1; }
    mv "$work/rpm-$t/out/$t/nvlibfs-$version-1.$t.rpm" "$dist/"
done
(cd "$dist" && sha256sum -- *.tar.gz *.deb *.rpm >SHA256SUMS)
log "wrote $dist/:"
(cd "$dist" && ls -l --time-style=+ -- * | awk '{ print "  " $5 "\t" $NF }') >&2
