#!/usr/bin/env bash
# Install nvlibfs: both binaries, the man page, shell completions and the
# systemd unit (not enabled). Builds the release binaries first.
#
#   contrib/install.sh                     # into /usr/local (as root)
#   contrib/install.sh --deb               # build nvlibfs_<version>_<arch>.deb (in $DEB_DIR or .) instead
#   PREFIX=/usr DESTDIR=/tmp/stage contrib/install.sh
#   contrib/install.sh --bin-dir target/debug   # use binaries built already
set -euo pipefail
cd "$(dirname "$0")/.."

deb=false
bin_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) deb=true ;;
        --bin-dir) bin_dir=$2; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$bin_dir" ]; then
    cargo build --release --workspace --quiet
    bin_dir=target/release
fi
for b in nvlibfs nvlibfs-mountd; do
    [ -x "$bin_dir/$b" ] || { echo "install.sh: $bin_dir/$b is missing; build it first" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if $deb; then
    PREFIX=/usr
    DESTDIR=$(mktemp -d)
    trap 'rm -rf "$DESTDIR"' EXIT
else
    PREFIX=${PREFIX:-/usr/local}
    DESTDIR=${DESTDIR:-}
fi
root=$DESTDIR$PREFIX

install -d "$root/bin" "$root/share/man/man1" "$root/share/bash-completion/completions" \
    "$root/share/zsh/vendor-completions" "$root/share/fish/vendor_completions.d" "$DESTDIR/lib/systemd/system"
install -m 755 "$bin_dir/nvlibfs" "$bin_dir/nvlibfs-mountd" "$root/bin/"
"$bin_dir/nvlibfs" manpage > "$root/share/man/man1/nvlibfs.1"
"$bin_dir/nvlibfs" completions bash > "$root/share/bash-completion/completions/nvlibfs"
"$bin_dir/nvlibfs" completions zsh > "$root/share/zsh/vendor-completions/_nvlibfs"
"$bin_dir/nvlibfs" completions fish > "$root/share/fish/vendor_completions.d/nvlibfs.fish"
sed "s|/usr/local/bin/nvlibfs|$PREFIX/bin/nvlibfs|" contrib/systemd/nvlibfs.service > "$DESTDIR/lib/systemd/system/nvlibfs.service"

if $deb; then
    arch=$(dpkg --print-architecture)
    install -d "$DESTDIR/DEBIAN"
    cat > "$DESTDIR/DEBIAN/control" <<CONTROL
Package: nvlibfs
Version: $version
Architecture: $arch
Maintainer: nvlibfs developers <nvlibfs@localhost>
Depends: libc6
Section: admin
Priority: optional
Description: version-pinned view of the host's NVIDIA driver for containers
 A FUSE daemon that serves the NVIDIA user-space driver files matching the
 loaded kernel module, read-only, for containers and Docker-in-Docker to
 bind-mount at /usr/local/nvidia.
CONTROL
    out=${DEB_DIR:-.}/nvlibfs_${version}_${arch}.deb
    dpkg-deb --root-owner-group --build "$DESTDIR" "$out" >/dev/null
    echo "built $out"
else
    echo "installed nvlibfs $version under ${DESTDIR}${PREFIX} (unit: ${DESTDIR}/lib/systemd/system/nvlibfs.service; enable it with: systemctl enable --now nvlibfs)"
fi
