#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, venv, iptables, iproute2 and libbpf,
# made from Debian's packages (debootstrap) and imported into the local image
# store, for machines that reach no container registry. Safe to run twice: an
# existing image of that name is kept.
#
#   scripts/base-image.sh [IMAGE]      (default localhost/ambient-mesh-base:bookworm)
set -euo pipefail
image=${1:-localhost/ambient-mesh-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if podman image exists "$image"; then
    echo "base image $image: present"
    exit 0
fi
root=$(mktemp -d /var/tmp/ambient-mesh-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $image: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,iptables,iproute2,libbpf1,ca-certificates \
    bookworm "$root" "$mirror" > "$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
# What a container never needs: caches, documentation, locales but C.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'C*' -exec rm -rf {} +
tar -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$image" > /dev/null
echo "base image $image: imported ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
