#!/usr/bin/env bash
# Runs every test on a fresh Debian or Ubuntu machine, as root: installs
# what the tests need, starts dockerd if none runs (and stops it again),
# then runs every test binary of `cargo test --workspace`, several side by
# side, the longest first. Arguments go to plain `cargo test --workspace
# --no-fail-fast` instead, one binary after another (`contrib/test.sh
# --test cli`). `contrib/test.sh --clean` removes what the tests leave.
# Where those tools are there already, plain `cargo test --workspace` does
# the same, serially; a test whose tool is missing fails at once, naming
# the tool and what installs it.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${NVLIBFS_TEST_CACHE:-/var/cache/nvlibfs-test}
# What the tests leave, for the notice below and for --clean: the image
# and package cache, the docker images built from it, the rootless user,
# and the packages this script (or contrib/release.sh) installed (listed as
# they are installed).
installed=$cache/installed-packages
leftovers() {
    echo "  $cache ($(du -sh "$cache" 2>/dev/null | cut -f1 || echo "not there yet"): Debian roots, NVIDIA's packages, the NVIDIA Container Toolkit's binaries, rootless data roots,"
    echo "    a Python venv with the kubernetes client and pyyaml, Debian 13's containerd and the CRI client's venv,"
    echo "    contrib/release.sh's build root (Debian 13, Rust, zig) and Debian 11 roots)"
    echo "  docker images nvlibfs-test-* in the host's dockerd, podman images nvlibfs-*; users nvlibfs-rootless (with its /run/user/UID)"
    echo "    and (dockerd's) dockremap; podman's image store in /var/lib/containers"
    if [ -s "$installed" ]; then echo "  packages this script installed: $(tr '\n' ' ' <"$installed")"; fi
}

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if [ "${1:-}" = --clean ]; then
    echo "test.sh: removing what the tests left:" >&2
    leftovers >&2
    if docker info >/dev/null 2>&1; then
        docker ps -aq --filter name=nvlibfs-test | xargs -r docker rm -f >/dev/null
        docker images --format '{{.Repository}}:{{.Tag}}' | { grep '^nvlibfs-test' || true; } |
            xargs -r docker rmi -f >/dev/null
    fi
    # podman's images (tests/cdi.rs, tests/toolkit.rs), in podman's own store.
    if command -v podman >/dev/null 2>&1; then
        podman images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null | { grep '^localhost/nvlibfs-' || true; } |
            xargs -r podman rmi -f >/dev/null 2>&1 || true
    fi
    pkill -KILL -u nvlibfs-rootless 2>/dev/null || true
    if uid=$(id -u nvlibfs-rootless 2>/dev/null); then rm -rf "/run/user/$uid"; fi
    for user in nvlibfs-rootless dockremap; do
        if id "$user" >/dev/null 2>&1; then userdel -r "$user" 2>/dev/null || userdel "$user"; fi
    done
    sed -i '/^\(nvlibfs-rootless\|dockremap\):/d' /etc/subuid /etc/subgid 2>/dev/null || true
    # Of the packages this script installed, those still installed.
    packages=()
    if [ -s "$installed" ]; then
        while read -r p; do
            is_installed "$p" && packages+=("$p")
        done <"$installed"
    fi
    rm -rf "$cache"
    # podman's image store (the CDI tests' images), if this script brought podman.
    if [ -s "$installed" ] && grep -qx podman "$installed" && command -v podman >/dev/null; then
        podman system reset --force >/dev/null 2>&1 || true
        rm -rf /var/lib/containers
    fi
    if [ ${#packages[@]} -gt 0 ]; then
        # Purged, so that their configuration and the unit links their
        # maintainer scripts made go too.
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -q --autoremove "${packages[@]}"
    fi
    echo "test.sh: done (Rust's toolchain and target/ are yours to keep)" >&2
    exit 0
fi

# cc + libc headers build the fixture drivers and the test loader; ldconfig
# writes their ld.so.cache; util-linux brings setpriv, unshare and prlimit,
# which run scans and loads as other users, in other mount namespaces and
# under other limits; dpkg-deb checks the .deb that install.sh builds.
# Mounting needs no fusermount: the daemon runs as root and calls mount(2).
# docker.io and debootstrap run the Docker-in-Docker test (its images are
# built from a debootstrapped Debian and cached in /var/cache/nvlibfs-test);
# podman is the CDI consumer for tests/cdi.rs. apt and the archive's keyring
# fetch Debian's real NVIDIA driver packages for tests/debian_packages.rs
# (about 160 MB) and their graphics, video and Vulkan packages for
# tests/catalog_oracle.rs (about 170 MB), once, cached with the images. rootlesskit and uidmap run
# a rootless dockerd (docker.io's dockerd-rootless.sh) for tests/rootless.rs,
# as a user it creates, nvlibfs-rootless. bindfs, squashfuse and
# squashfs-tools are for the benchmarks only (cargo bench), not installed here.
packages=(gcc libc6-dev libc-bin util-linux mount dpkg apt debian-archive-keyring docker.io debootstrap podman
    rootlesskit uidmap)
# pip installs the Kubernetes client below; a python3 with pip of another
# origin (pyenv, a venv) does as well as Debian's.
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3 python3-pip)
# The kubernetes client (below) and tests/cri.rs's CRI client (grpcio,
# generated from the CRI's api.proto) live in venvs in the test cache,
# which need venv and ensurepip.
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
missing=()
for p in "${packages[@]}"; do
    is_installed "$p" || missing+=("$p")
done

{
    echo "test.sh: the tests leave behind (contrib/test.sh --clean removes it):"
    leftovers
    if [ ${#missing[@]} -gt 0 ]; then
        echo "  and now installs ${missing[*]} with apt, which may upgrade packages they depend on"
        echo "  (podman's brought newer login and passwd to Debian 12)"
    fi
} >&2

if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    mkdir -p "$cache"
    printf '%s\n' "${missing[@]}" >>"$installed"
fi
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    . "$HOME/.cargo/env"
fi

# The official Kubernetes client's models check contrib/k8s offline. They
# live in a venv in the test cache (the system's site-packages stay as they
# were; --clean removes it with the cache), first on PATH for the tests.
venv=$cache/venv
if ! "$venv/bin/python3" -c 'import kubernetes, yaml' 2>/dev/null; then
    echo "test.sh: installing Python's kubernetes client and pyyaml into $venv" >&2
    mkdir -p "$cache"
    python3 -m venv --system-site-packages "$venv"
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check kubernetes pyyaml
fi
export PATH="$venv/bin:$PATH"

[ -e /dev/fuse ] || modprobe fuse || echo "test.sh: warning: no /dev/fuse; the mount tests will fail" >&2

# The host's Docker engine: started here only if none runs, and stopped
# again when the tests end.
dockerd_pid=
stop_dockerd() {
    if [ -n "$dockerd_pid" ]; then
        echo "test.sh: stopping the dockerd it started" >&2
        kill "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.2; done
    fi
}
trap stop_dockerd EXIT
if ! docker info >/dev/null 2>&1; then
    log=/var/log/nvlibfs-test-dockerd.log
    echo "test.sh: starting dockerd (log: $log)" >&2
    dockerd >"$log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { echo "test.sh: dockerd did not start:" >&2; tail -20 "$log" >&2; exit 1; }
fi

if [ $# -gt 0 ]; then
    # --no-fail-fast: a failing test binary hides none of the others.
    cargo test --workspace --no-fail-fast "$@"
    exit
fi
# Every test binary, several at once (tests/parallel.py says why and how).
python3 tests/parallel.py
