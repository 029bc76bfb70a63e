#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io and start dockerd when missing.
# Idempotent; fails with one line on stderr (never hangs: every wait is bounded).
#
#   bash deploy/engine.sh          # as root on a Debian/Ubuntu machine or CI runner
set -euo pipefail

die() { echo "engine: $*" >&2; exit 1; }

if timeout 10 docker info >/dev/null 2>&1; then
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "no Docker engine and not root: cannot install docker.io"
    command -v apt-get >/dev/null 2>&1 || die "no Docker engine and no apt-get to install one"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >/dev/null || die "apt-get update failed"
    timeout 600 apt-get install -y -qq --no-install-recommends docker.io >/dev/null \
        || die "apt-get install docker.io failed"
fi
command -v docker >/dev/null 2>&1 || die "dockerd is installed but there is no docker CLI"

if ! pgrep -x dockerd >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "dockerd is not running and only root can start it here"
    log=/var/log/dockerd.log
    # No systemd in containers/CI sandboxes: start the daemon directly, detached.
    setsid nohup dockerd --storage-driver=overlay2 >"$log" 2>&1 </dev/null &
fi
for _ in $(seq 60); do
    if timeout 5 docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 1
done
die "dockerd did not answer within 60 s (see /var/log/dockerd.log: $(tail -n 1 /var/log/dockerd.log 2>/dev/null))"
