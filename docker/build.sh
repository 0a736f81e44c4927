#!/usr/bin/env bash
# Build the infergate images without any registry:
#   1. infergate-base:bookworm  Debian bookworm (debootstrap minbase + python3) via `docker import`;
#                               built once, reused while it exists (REBUILD_BASE=1 forces it).
#   2. infergate:latest         the project and its dependencies, installed from wheels
#                               made on the host (`pip wheel`), offline inside the image.
# Usage: bash docker/build.sh            (needs root for debootstrap, and a Docker engine)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${INFERGATE_BASE_IMAGE:-infergate-base:bookworm}
IMAGE=${INFERGATE_IMAGE:-infergate:latest}
PYTHON=${PYTHON:-.venv/bin/python}
CTX=docker/.context   # build context: wheels + Dockerfile inputs (git-ignored)

log() { echo "[docker/build.sh] $*" >&2; }

# The Debian mirror apt uses on this machine (deb822 or one-line sources), unless given.
debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' | grep -v security | head -n1 || true)
    if [[ -z "$uri" ]]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
            | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && [[ -z "${REBUILD_BASE:-}" ]]; then
        log "base image $BASE_IMAGE exists; reusing it"
        return
    fi
    command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; exit 1; }
    local root mirror started
    root=$(mktemp -d /tmp/infergate-rootfs.XXXXXX)
    mirror=$(debian_mirror)
    started=$SECONDS
    log "debootstrap bookworm from $mirror into $root"
    debootstrap --variant=minbase --include=python3,python3-venv \
        bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
    # Keep the image small: no apt lists or package cache.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import \
        --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$root" "$root.log"
    log "built $BASE_IMAGE in $((SECONDS - started))s"
}

build_wheels() {
    # Dependencies pinned to what the project's virtualenv has (the versions the tests ran with).
    local started=$SECONDS
    rm -rf "$CTX"
    mkdir -p "$CTX/deps" "$CTX/app"
    "$PYTHON" -m pip freeze --exclude-editable | grep '==' >"$CTX/constraints.txt" || true
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check \
        --constraint "$CTX/constraints.txt" --wheel-dir "$CTX/deps" .
    mv "$CTX"/deps/infergate-*.whl "$CTX/app/"
    cp docker/Dockerfile docker/entrypoint.py "$CTX/"
    log "wheels ready in $((SECONDS - started))s"
}

build_image() {
    local started=$SECONDS
    docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" "$CTX" >&2
    # Earlier builds of ours that lost their tag (and only those).
    docker image prune -f --filter label=org.infergate.image=true >/dev/null
    log "built $IMAGE in $((SECONDS - started))s"
}

build_base
build_wheels
build_image
