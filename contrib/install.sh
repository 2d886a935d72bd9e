#!/usr/bin/env bash
# Install nvlibfs: both binaries, the man page, shell completions, the
# systemd unit (not enabled) and the licence. Builds the release binaries
# first. (Prebuilt ones for any glibc 2.17+: contrib/release.sh.)
#
#   contrib/install.sh                     # into /usr/local (as root)
#   contrib/install.sh --deb               # build nvlibfs_<version>_<arch>.deb (in $DEB_DIR or target/) instead
#   PREFIX=/usr DESTDIR=/tmp/stage contrib/install.sh   # UNIT_DIR sets the unit's directory
#   contrib/install.sh --bin-dir target/debug   # use binaries built already
#   contrib/install.sh --bin-dir DIR --docs-from BIN --arch arm64 --deb
#                                          # another machine's binaries: BIN, an nvlibfs
#                                          # this machine runs, writes the man page and completions
set -euo pipefail
cd "$(dirname "$0")/.."

deb=false
bin_dir=""
docs_from=""
arch=""
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) deb=true ;;
        --bin-dir) bin_dir=$2; shift ;;
        --docs-from) docs_from=$2; shift ;;
        --arch) arch=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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
docs_from=${docs_from:-$bin_dir/nvlibfs}
[ -x "$docs_from" ] || { echo "install.sh: --docs-from $docs_from is not an executable" >&2; exit 1; }

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
unit_dir=${UNIT_DIR:-$DESTDIR/lib/systemd/system}

install -d "$root/bin" "$root/share/man/man1" "$root/share/bash-completion/completions" \
    "$root/share/zsh/vendor-completions" "$root/share/fish/vendor_completions.d" "$root/share/doc/nvlibfs" "$unit_dir"
install -m 755 "$bin_dir/nvlibfs" "$bin_dir/nvlibfs-mountd" "$root/bin/"
"$docs_from" manpage > "$root/share/man/man1/nvlibfs.1"
"$docs_from" completions bash > "$root/share/bash-completion/completions/nvlibfs"
"$docs_from" completions zsh > "$root/share/zsh/vendor-completions/_nvlibfs"
"$docs_from" completions fish > "$root/share/fish/vendor_completions.d/nvlibfs.fish"
install -m 644 LICENSE "$root/share/doc/nvlibfs/LICENSE"
sed "s|/usr/local/bin/nvlibfs|$PREFIX/bin/nvlibfs|" contrib/systemd/nvlibfs.service > "$unit_dir/nvlibfs.service"

if $deb; then
    arch=${arch:-$(dpkg --print-architecture)}
    # The newest glibc symbol version the binaries ask for is the oldest
    # libc6 they run with (a local build needs the build machine's glibc;
    # contrib/release.sh's need 2.17).
    glibc=$(readelf -V --wide "$bin_dir/nvlibfs" "$bin_dir/nvlibfs-mountd" | grep -o 'Name: GLIBC_[0-9.]*' |
        sed 's/.*GLIBC_//' | sort -uV | tail -1)
    [ -n "$glibc" ] || { echo "install.sh: found no GLIBC symbol versions in $bin_dir/nvlibfs*" >&2; exit 1; }
    install -d "$DESTDIR/DEBIAN"
    cat > "$DESTDIR/DEBIAN/control" <<CONTROL
Package: nvlibfs
Version: $version
Architecture: $arch
Maintainer: nvlibfs developers <nvlibfs@localhost>
Depends: libc6 (>= $glibc)
Section: admin
Priority: optional
Description: version-pinned view of the host's NVIDIA driver for containers
 A FUSE daemon that serves the NVIDIA user-space driver files matching the
 loaded kernel module, read-only, for containers and Docker-in-Docker to
 bind-mount at /usr/local/nvidia.
CONTROL
    out_dir=${DEB_DIR:-${CARGO_TARGET_DIR:-target}}
    mkdir -p "$out_dir"
    out=$out_dir/nvlibfs_${version}_${arch}.deb
    dpkg-deb --root-owner-group --build "$DESTDIR" "$out" >/dev/null
    echo "built $out"
else
    echo "installed nvlibfs $version under ${DESTDIR}${PREFIX} (unit: ${DESTDIR}/lib/systemd/system/nvlibfs.service; enable it with: systemctl enable --now nvlibfs)"
fi
