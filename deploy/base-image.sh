#!/usr/bin/env bash
# Provide the Dockerfile's base image, python:3.11-slim-bookworm.
#
# Pulls it when a registry is reachable. Otherwise (CI and these machines reach only the
# package registries) builds a drop-in offline: a minbase Debian bookworm root filesystem from
# the Debian mirror apt already uses, Debian's Python 3.11 in a venv at /opt/py linked as
# /usr/local/bin/python and pip, the host's CA bundle, imported as python:3.11-slim-bookworm.
# Skipped when the tag already exists (cached between runs).
#
#   bash deploy/base-image.sh
set -euo pipefail

TAG=python:3.11-slim-bookworm
die() { echo "base-image: $*" >&2; exit 1; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
    exit 0
fi
if timeout 60 docker pull -q "$TAG" >/dev/null 2>&1; then
    exit 0
fi
echo "base-image: $TAG cannot be pulled; building it offline with debootstrap" >&2

[ "$(id -u)" = 0 ] || die "debootstrap needs root"
if ! command -v debootstrap >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
        || die "apt-get install debootstrap failed"
fi

# The mirror apt already uses (deb822 sources or the classic sources.list).
mirror=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list \
    | grep -v security | grep -oE 'https?://[^ ]+/debian/?' | head -n 1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d /tmp/base-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >/tmp/debootstrap.log 2>&1 \
    || die "debootstrap failed (last line: $(tail -n 1 /tmp/debootstrap.log))"

chroot "$rootfs" python3 -m venv /opt/py || die "python3 -m venv failed in the rootfs"

# Wrappers, not symlinks: a symlinked venv python outside the venv's bin/ does not find its
# pyvenv.cfg and would run without the venv's packages. PATH lists /opt/py/bin first anyway.
for tool in python python3 pip pip3; do
    printf '#!/bin/sh\nexec /opt/py/bin/%s "$@"\n' "$tool" >"$rootfs/usr/local/bin/$tool"
    chmod 755 "$rootfs/usr/local/bin/$tool"
done
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
# What the official slim image leaves out: apt lists and caches, docs, man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

tar -C "$rootfs" -c . | timeout 600 docker import \
    --change 'ENV PATH=/opt/py/bin:/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null || die "docker import failed"
docker run --rm "$TAG" sh -c 'python -c "import sys; assert sys.version_info[:2] == (3, 11) and sys.prefix == \"/opt/py\"" && /usr/local/bin/python -c "import sys; assert sys.prefix == \"/opt/py\""' \
    || die "the imported image has no working Python 3.11"
