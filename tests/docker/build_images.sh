#!/usr/bin/env bash
# Builds the small local images the container tests use, from Debian packages, because no
# registry is reachable from CI:
#
#   tether-test/busybox:latest   busybox-static with applet links (sh, sleep, cat, echo, ...)
#   tether-test/python:latest    python3.11 from Debian's minimal packages, plus busybox
#
# Usage: tests/docker/build_images.sh [busybox|python]...   (default: both)
# Needs a running engine (DOCKER_HOST or /var/run/docker.sock), the docker CLI, apt-get and
# dpkg-deb. An image that already exists is left alone; set TETHER_REBUILD_IMAGES=1 to rebuild.
set -euo pipefail

BUSYBOX_IMAGE=tether-test/busybox:latest
PYTHON_IMAGE=tether-test/python:latest
# python3.11 and the shared libraries the standard library's compiled modules link to.
PYTHON_PACKAGES=(
  libc6 libgcc-s1 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libssl3 libcrypt1
  libuuid1 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libdb5.3 media-types
  libpython3.11-minimal python3.11-minimal libpython3.11-stdlib
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download drops privileges to _apt, which must be able to write here.
chmod 755 "$work"

have_image() {
  [[ "${TETHER_REBUILD_IMAGES:-}" != 1 ]] && docker image inspect "$1" >/dev/null 2>&1
}

download() {
  # Package lists may be missing on a fresh machine: update once and try again.
  (cd "$work/debs" && apt-get download -q "$@" >/dev/null 2>&1) || {
    apt-get update -q >/dev/null
    (cd "$work/debs" && apt-get download -q "$@" >/dev/null)
  }
}

unpack() {  # unpack every downloaded package matching $2... into rootfs $1
  local root=$1
  shift
  mkdir -p "$root"
  for name in "$@"; do
    for deb in "$work"/debs/"${name}"_*.deb; do
      dpkg-deb -x "$deb" "$root"
    done
  done
}

add_busybox() {  # busybox and a link for each of its applets in $1/bin (existing files win)
  local root=$1
  unpack "$root" busybox-static
  local applet
  for applet in $("$root/bin/busybox" --list); do
    [[ -e "$root/bin/$applet" || -L "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
  done
  mkdir -p "$root/tmp" "$root/etc" "$root/proc" "$root/sys" "$root/dev"
  chmod 1777 "$root/tmp"
  [[ -e "$root/etc/passwd" ]] || printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
  [[ -e "$root/etc/group" ]] || printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
}

import() {  # tar up rootfs $1 and import it as image $2
  tar -C "$1" -c . | docker import -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin' - "$2" >/dev/null
  echo "built $2"
}

build_busybox() {
  have_image "$BUSYBOX_IMAGE" && { echo "$BUSYBOX_IMAGE exists"; return; }
  mkdir -p "$work/debs"
  download busybox-static
  add_busybox "$work/busybox"
  import "$work/busybox" "$BUSYBOX_IMAGE"
}

build_python() {
  have_image "$PYTHON_IMAGE" && { echo "$PYTHON_IMAGE exists"; return; }
  mkdir -p "$work/debs"
  download busybox-static "${PYTHON_PACKAGES[@]}"
  local root="$work/python"
  unpack "$root" "${PYTHON_PACKAGES[@]}"
  add_busybox "$root"
  ln -sf python3.11 "$root/usr/bin/python3"
  # No ld.so.cache without running ldconfig in the image: write one from outside.
  ldconfig -r "$root" 2>/dev/null || true
  import "$root" "$PYTHON_IMAGE"
  docker run --rm "$PYTHON_IMAGE" python3 -c 'import json, statistics, random, os'
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(busybox python)
for target in "${targets[@]}"; do
  case "$target" in
    busybox) build_busybox ;;
    python) build_python ;;
    *) echo "unknown image: $target (busybox or python)" >&2; exit 2 ;;
  esac
done
