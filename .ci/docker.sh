#!/usr/bin/env bash
# A Docker engine for the container tests, and the images they run.
#   bash .ci/docker.sh start   install docker.io + debootstrap if missing, start dockerd if no
#                              engine answers (host networking only: no bridge, no iptables),
#                              then build the images (bash docker/build.sh, cached)
#   bash .ci/docker.sh stop    stop the dockerd that `start` started (never another one)
#   bash .ci/docker.sh status  say whether an engine answers and who started it
# `start` fails when it cannot get an engine. The container tests skip without an engine or
# image (they fail instead when CI=true): `bash .ci/docker.sh start` enables them.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=/run/infergate-dockerd.pid   # written only when this script started dockerd
LOG=/tmp/infergate-dockerd.log
SUDO=""
[[ $EUID -eq 0 ]] || SUDO=sudo

log() { echo "[.ci/docker.sh] $*" >&2; }
engine_answers() { timeout 10 docker info >/dev/null 2>&1; }
is_dockerd() { [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == dockerd ]]; }
# The PID recorded by `start`, if that process is still a dockerd (PIDs get reused).
our_dockerd() {
    [[ -f $STATE ]] && is_dockerd "$(cat "$STATE")" && cat "$STATE"
}
unmount_netns() {
    if mountpoint -q /var/run/docker/netns/default 2>/dev/null; then
        $SUDO umount /var/run/docker/netns/default || true
    fi
}

install_missing() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

start_engine() {
    our_dockerd >/dev/null || $SUDO rm -f "$STATE"   # stale record of a daemon long gone
    if engine_answers; then
        log "a Docker engine already answers; using it"
        return
    fi
    # A daemon that is there but not (yet) answering is not ours to replace: a second
    # `dockerd --bridge=none` would delete the first one's docker0 bridge.
    if [[ -f /var/run/docker.pid ]] && is_dockerd "$(cat /var/run/docker.pid)"; then
        log "dockerd (pid $(cat /var/run/docker.pid)) runs but does not answer; waiting for it"
    else
        unmount_netns  # left over by a daemon that was killed
        log "starting dockerd (log: $LOG)"
        $SUDO setsid dockerd --bridge=none --iptables=false >"$LOG" 2>&1 </dev/null &
        echo starting | $SUDO tee "$STATE" >/dev/null
    fi
    for _ in $(seq 60); do
        if engine_answers; then
            # dockerd's own PID file (not $!, which may be sudo's)
            [[ -f $STATE ]] && $SUDO cp /var/run/docker.pid "$STATE"
            log "engine ready"
            return
        fi
        sleep 0.5
    done
    log "the Docker engine did not answer within 30s; last lines of $LOG:"
    tail -n 20 "$LOG" >&2 || true
    return 1
}

stop_engine() {
    local pid
    if ! pid=$(our_dockerd); then
        log "no dockerd started by this script runs; leaving any engine alone"
        $SUDO rm -f "$STATE"
        return
    fi
    if kill -0 "$pid" 2>/dev/null; then
        # Leftovers of interrupted test runs (testcontainers labels them; no Ryuk here).
        docker ps -aq --filter label=org.testcontainers=true | xargs -r docker rm -f >/dev/null || true
        log "stopping dockerd (pid $pid)"
        $SUDO kill -TERM "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { log "dockerd did not stop; killing it"; $SUDO kill -KILL "$pid"; }
    fi
    unmount_netns
    $SUDO rm -f "$STATE"
}

case "${1:-}" in
    start)
        if ! install_missing || ! start_engine; then
            log "no Docker engine: the container tests cannot run"
            exit 1
        fi
        bash docker/build.sh
        ;;
    stop) stop_engine ;;
    status)
        if engine_answers; then echo "engine: answers"; else echo "engine: none"; fi
        if pid=$(our_dockerd); then echo "dockerd started by .ci/docker.sh: pid $pid"; fi
        ;;
    *)
        echo "usage: bash .ci/docker.sh start|stop|status" >&2
        exit 2
        ;;
esac
