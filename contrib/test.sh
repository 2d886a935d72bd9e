#!/usr/bin/env bash
# Runs every test on a fresh Debian or Ubuntu machine, as root: installs
# what the tests need, starts dockerd if none runs, then runs
# `cargo test --workspace --no-fail-fast` (arguments are passed on to it, e.g.
# `contrib/test.sh --test cli`). Where those tools are there already, plain
# `cargo test --workspace` does the same; a test whose tool is missing fails
# at once, naming the tool and what installs it.
set -euo pipefail
cd "$(dirname "$0")/.."

# cc + libc headers build the fixture drivers and the test loader; ldconfig
# writes their ld.so.cache; util-linux brings setpriv, unshare and prlimit,
# which run scans and loads as other users, in other mount namespaces and
# under other limits; dpkg-deb checks the .deb that install.sh builds.
# Mounting needs no fusermount: the daemon runs as root and calls mount(2).
# docker.io and debootstrap run the Docker-in-Docker test (its images are
# built from a debootstrapped Debian and cached in /var/cache/nvlibfs-test);
# podman is the CDI consumer for tests/cdi.rs. apt and the archive's keyring
# fetch Debian's real NVIDIA driver packages for tests/debian_packages.rs
# (about 160 MB, once, cached with the images). rootlesskit and uidmap run
# a rootless dockerd (docker.io's dockerd-rootless.sh) for tests/rootless.rs,
# as a user it creates, nvlibfs-rootless. bindfs, squashfuse and
# squashfs-tools are for the benchmarks only (cargo bench), not installed here.
packages=(gcc libc6-dev libc-bin util-linux mount dpkg apt debian-archive-keyring docker.io debootstrap podman
    rootlesskit uidmap)
# pip installs the Kubernetes client below; a python3 with pip of another
# origin (pyenv, a venv) does as well as Debian's.
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3 python3-pip)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    . "$HOME/.cargo/env"
fi

# The official Kubernetes client's models check contrib/k8s offline. A
# Debian python3 refuses pip installs outside a venv unless told (PEP 668);
# older pips ignore the variable.
if ! python3 -c 'import kubernetes, yaml' 2>/dev/null; then
    echo "test.sh: installing Python's kubernetes client and pyyaml" >&2
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check kubernetes pyyaml
fi

[ -e /dev/fuse ] || modprobe fuse || echo "test.sh: warning: no /dev/fuse; the mount tests will fail" >&2

# The host's Docker engine, for tests/dind.rs.
if ! docker info >/dev/null 2>&1; then
    log=/var/log/nvlibfs-test-dockerd.log
    echo "test.sh: starting dockerd (log: $log)" >&2
    dockerd >"$log" 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { echo "test.sh: dockerd did not start:" >&2; tail -20 "$log" >&2; exit 1; }
fi

# --no-fail-fast: a failing test binary hides none of the others.
exec cargo test --workspace --no-fail-fast "$@"
