#!/usr/bin/env bash
# A minimal OpenStack Swift all-in-one on loopback for stagerd's interop tests: a proxy with
# s3api + tempauth and one account, container and object server, rings built with
# swift-ring-builder, storage in a directory that supports user xattrs.
#
# Usage: build/swift.sh [start|stop|status|env] [current|old|all]     (default: start all)
#   current  swift $STAGERD_SWIFT_VERSION      (default 2.38.3)  -> test server "swift"
#   old      swift $STAGERD_SWIFT_OLD_VERSION  (default 2.30.1)  -> test server "swift-old"
# start  installs swift==VERSION into its own venv when missing (Swift pins its own eventlet
#        etc., so it never shares /work/venv), writes the configs, builds the rings, starts the
#        servers on free loopback ports and prints `export STAGERD_TEST_SWIFT...=` lines for
#        eval. Idempotent: a running instance is only printed. Starts in seconds once installed.
# stop   stops the servers this script started (by pid) and removes their data.
# status exit 0 and print the variables if running, exit 1 otherwise.
# env    print the variables of a running instance (nothing if it is not running).
# S3 credentials (tempauth user test:tester, key testing): access key "test:tester",
# secret "testing"; region us-east-1; path-style addressing.
#
# Variables: STAGERD_SWIFT_DIR (state + <name>.env, default /tmp/stagerd-swift),
#   STAGERD_SWIFT_VENV_DIR (where venv-swift-<version> go, default /work or <repo>/.cache),
#   PYTHON (interpreter for the venvs, default python3), STAGERD_SWIFT_LOG_LEVEL (INFO).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
templates="$here/swift"
state_root="${STAGERD_SWIFT_DIR:-/tmp/stagerd-swift}"
if [ -n "${STAGERD_SWIFT_VENV_DIR:-}" ]; then
    venv_root="$STAGERD_SWIFT_VENV_DIR"
elif [ -d /work ] && [ -w /work ]; then
    venv_root=/work
else
    venv_root="$root/.cache"
fi
python="${PYTHON:-python3}"
# Old Swift releases import eventlet, which warns loudly on every start; keep output readable.
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
# Process names and the app each runs; proxy-tls is the same proxy again, over HTTPS.
servers=(account container object proxy proxy-tls)
apps=(account-server container-server object-server proxy-server proxy-server)

log() { printf 'swift: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

version_of() { # name -> version
    case "$1" in
        swift) echo "${STAGERD_SWIFT_VERSION:-2.38.3}" ;;
        swift-old) echo "${STAGERD_SWIFT_OLD_VERSION:-2.30.1}" ;;
    esac
}

env_prefix() { # name -> variable prefix the tests read (tests/conftest.py)
    case "$1" in
        swift) echo STAGERD_TEST_SWIFT ;;
        swift-old) echo STAGERD_TEST_SWIFT_OLD ;;
    esac
}

apt_install() {
    log "installing Debian packages: $*"
    mkdir -p "$state_root"
    if [ ! -f "$state_root/apt-updated" ]; then
        apt-get update -qq && touch "$state_root/apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_venv() { # version -> venv path on stdout
    local version="$1" venv="$venv_root/venv-swift-$1"
    if [ -x "$venv/bin/swift-ring-builder" ] &&
        "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('swift') != '$version')" 2>/dev/null; then
        echo "$venv"; return 0
    fi
    log "installing swift==$version into $venv (once)"
    mkdir -p "$venv_root"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$venv/bin/python" -m pip install -q "swift==$version" >"$venv/install.log" 2>&1; then
        # pyeclib ships manylinux wheels with liberasurecode inside; where it has to be
        # built from source it needs the Debian headers.
        apt_install liberasurecode-dev build-essential python3-dev
        "$venv/bin/python" -m pip install -q "swift==$version" >"$venv/install.log" 2>&1 ||
            { tail -n 30 "$venv/install.log" >&2; die "pip install swift==$version failed (log: $venv/install.log)"; }
    fi
    echo "$venv"
}

xattr_ok() { # dir -> whether it supports user xattrs (Swift's object server needs them)
    "$python" - "$1" <<'EOF' 2>/dev/null
import os, sys, tempfile
with tempfile.NamedTemporaryFile(dir=sys.argv[1]) as f:
    os.setxattr(f.name, "user.stagerd", b"1")
EOF
}

data_dir_for() { # name -> a data dir on a filesystem with user xattrs
    local candidate
    for candidate in "$state_root/$1" "/var/tmp/stagerd-swift/$1" "$root/.cache/swift-data/$1"; do
        mkdir -p "$candidate" 2>/dev/null || continue
        if xattr_ok "$candidate"; then echo "$candidate"; return 0; fi
        log "no user xattr support under $candidate; trying the next place"
    done
    apt_install attr
    die "no directory with user xattr support found (tried $state_root, /var/tmp, $root/.cache)"
}

free_ports() { # count -> that many free loopback ports, one per line
    "$python" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
for s in socks:
    print(s.getsockname()[1])
    s.close()
EOF
}

healthy() { # port [https]
    curl -fsSk -m 2 -o /dev/null "${2:-http}://127.0.0.1:$1/healthcheck" 2>/dev/null
}

pid_alive() { # pidfile -> whether it names a live launch.py of ours
    local pid
    [ -f "$1" ] || return 1
    pid="$(cat "$1")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "launch.py" "/proc/$pid/cmdline" 2>/dev/null
}

running() { # name -> 0 if every server of this instance is alive and the proxy answers
    local envfile="$state_root/$1.env" data port server
    [ -f "$envfile" ] || return 1
    data="$(sed -n 's/^# data=//p' "$envfile")"
    port="$(sed -n 's/^# proxy_port=//p' "$envfile")"
    for server in "${servers[@]}"; do pid_alive "$data/run/$server.pid" || return 1; done
    healthy "$port"
}

render() { # template out [port] [tls]: fill in the @VARS@ of a config template
    local cert="# cert_file: none, plain HTTP" key="# key_file: none"
    if [ -n "${4:-}" ]; then cert="cert_file = $etc/tls.crt"; key="key_file = $etc/tls.key"; fi
    sed -e "s|@ETC@|$etc|g" -e "s|@CERT_FILE@|$cert|" -e "s|@KEY_FILE@|$key|" \
        -e "s|@DEVICES@|$data/srv|g" -e "s|@USER@|$(id -un)|g" \
        -e "s|@MEMCACHE@|${STAGERD_SWIFT_MEMCACHE:-127.0.0.1:1}|g" \
        -e "s|@LOG_LEVEL@|${STAGERD_SWIFT_LOG_LEVEL:-INFO}|g" \
        -e "s|@PROXY_PORT@|${3:-${ports[3]}}|g" -e "s|@ACCOUNT_PORT@|${ports[0]}|g" \
        -e "s|@CONTAINER_PORT@|${ports[1]}|g" -e "s|@OBJECT_PORT@|${ports[2]}|g" "$1" >"$2"
}

build_rings() { # venv
    local i kind
    for i in 0 1 2; do
        kind="${servers[$i]}"
        # 2^8 partitions, 1 replica, min_part_hours 1: one device, nothing to balance.
        "$1/bin/swift-ring-builder" "$etc/$kind.builder" create 8 1 1 >/dev/null
        "$1/bin/swift-ring-builder" "$etc/$kind.builder" add \
            --region 1 --zone 1 --ip 127.0.0.1 --port "${ports[$i]}" --device d1 --weight 100 >/dev/null
        # rebalance exits 1 for warnings (e.g. fewer devices than replicas would like).
        "$1/bin/swift-ring-builder" "$etc/$kind.builder" rebalance >/dev/null || [ $? -eq 1 ]
    done
}

wait_healthy() { # port server seconds
    local i scheme=http
    [ "$2" != proxy-tls ] || scheme=https
    for ((i = 0; i < $3 * 10; i++)); do
        healthy "$1" "$scheme" && return 0
        sleep 0.1
    done
    return 1
}

start() { # name
    local name="$1" version venv server i
    if running "$name"; then print_env "$name"; return 0; fi
    stop "$name" quiet
    version="$(version_of "$name")"
    venv="$(ensure_venv "$version")"
    data="$(data_dir_for "$name")"
    etc="$data/etc"
    rm -rf "$data/etc" "$data/srv" "$data/run" "$data/log"
    mkdir -p "$etc" "$data/srv/d1" "$data/run" "$data/log"
    mapfile -t ports < <(free_ports 5)
    cp "$templates/swift.conf.in" "$etc/swift.conf"
    make_cert
    for server in account container object proxy; do
        render "$templates/$server-server.conf.in" "$etc/$server-server.conf"
    done
    render "$templates/proxy-server.conf.in" "$etc/proxy-tls-server.conf" "${ports[4]}" tls
    build_rings "$venv"
    for i in 0 1 2 3 4; do
        server="${servers[$i]}"
        nohup "$venv/bin/python" "$templates/launch.py" "$etc/swift.conf" "${apps[$i]}" \
            "$etc/$server-server.conf" -v >"$data/log/$server.log" 2>&1 &
        echo $! >"$data/run/$server.pid"
    done
    for i in 0 1 2 3 4; do
        server="${servers[$i]}"
        if ! wait_healthy "${ports[$i]}" "$server" 30; then
            tail -n 30 "$data/log/$server.log" >&2 || true
            stop "$name" quiet
            die "$name $server (swift $version) did not answer on port ${ports[$i]} within 30 s"
        fi
    done
    write_env "$name" "$version" "${ports[3]}" "$data" "${ports[4]}"
    log "$name: swift $version up (proxy :${ports[3]}, logs $data/log)"
    print_env "$name"
}

make_cert() { # a self-signed certificate for 127.0.0.1, for proxy-tls
    command -v openssl >/dev/null || apt_install openssl
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=127.0.0.1" \
        -addext "subjectAltName=IP:127.0.0.1" \
        -keyout "$etc/tls.key" -out "$etc/tls.crt" >/dev/null 2>&1
}

write_env() { # name version proxy_port data tls_port
    local prefix
    prefix="$(env_prefix "$1")"
    mkdir -p "$state_root"
    {
        echo "# data=$4"
        echo "# proxy_port=$3"
        echo "export ${prefix}=http://127.0.0.1:$3"
        echo "export ${prefix}_ACCESS_KEY=test:tester"
        echo "export ${prefix}_SECRET_KEY=testing"
        echo "export ${prefix}_VERSION=$2"
        echo "export ${prefix}_TLS=https://127.0.0.1:$5"
        echo "export ${prefix}_CA=$4/etc/tls.crt"
    } >"$state_root/$1.env"
}

print_env() { grep '^export ' "$state_root/$1.env"; }

stop() { # name [quiet]
    local envfile="$state_root/$1.env" data pidfile pid i
    [ -f "$envfile" ] || return 0
    data="$(sed -n 's/^# data=//p' "$envfile")"
    for pidfile in "$data"/run/*.pid; do
        pid_alive "$pidfile" || continue
        pid="$(cat "$pidfile")"
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$data/run" "$data/srv" "$envfile"
    [ "${2:-}" = quiet ] || log "$1 stopped"
}

action="${1:-start}"
target="${2:-all}"
case "$target" in
    current) names=(swift) ;;
    old) names=(swift-old) ;;
    all) names=(swift swift-old) ;;
    *) log "unknown target: $target (current|old|all)"; exit 2 ;;
esac
rc=0
for name in "${names[@]}"; do
    case "$action" in
        start) start "$name" ;;
        stop) stop "$name" ;;
        status) if running "$name"; then print_env "$name"; else log "$name is not running"; rc=1; fi ;;
        env) if running "$name"; then print_env "$name"; fi ;;
        *) log "unknown action: $action (start|stop|status|env)"; exit 2 ;;
    esac
done
exit "$rc"
