#!/bin/sh
# Build a stand-in for the python:3.11-slim base image from Debian packages, for hosts that have a Docker
# engine but cannot pull images (air-gapped machines, this project's CI machines). Needs root, debootstrap
# and a reachable Debian mirror. The image is only for building pocketgpt there:
#
#   sudo docker/standin-base.sh [IMAGE]          # default IMAGE: pocketgpt-standin-base:bookworm
#   docker build --build-arg BASE_IMAGE=pocketgpt-standin-base:bookworm ...
#
# Idempotent: an existing IMAGE is kept. DEBIAN_MIRROR overrides the mirror (default deb.debian.org).
set -eu

image="${1:-pocketgpt-standin-base:bookworm}"
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "standin-base: $image exists"
    exit 0
fi
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null 2>&1 || { echo "standin-base: $tool not found" >&2; exit 2; }
done

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
# minbase has bash, passwd (useradd) and apt; python3-venv brings ensurepip's wheels, python-is-python3 `python`.
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$image"
echo "standin-base: built $image"
