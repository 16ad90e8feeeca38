#!/usr/bin/env bash
# The VM test: the Ansible role and the systemd units on booted Debian guests.
#   build/vmtest.sh [pytest args]        e.g. build/vmtest.sh -x -k power_cut
# From a fresh clone: installs QEMU and mmdebstrap (Debian packages) when missing, creates
# the venv, builds the artifact for each guest's Python (build/shiv.sh), builds or reuses
# the cached base images (build/vm/image.sh; $STAGERD_VMTEST_CACHE, default
# /var/cache/stagerd-vmtest), boots a Debian 12 (Python 3.11.2) and a Debian 13 (Python
# 3.13) guest under QEMU/TCG, each with a blank /dev/vdb, and runs tests/vm (marker vm):
# gpu.yml twice, a batch through stagerd-gpu, the janitor timer and tmpfiles, SIGKILL and
# power cut mid-batch, a foreign disk refused, stop with Redis down, transfer.yml's watcher.
#
# Environment: STAGERD_VMTEST_DISTROS (debian12,debian13), STAGERD_VMTEST_PARALLEL
# (1: both guests at once; 0: one after the other), STAGERD_VMTEST_CACHE,
# STAGERD_VMTEST_RUN (run directory: serial console logs, Ansible logs; default a new
# /tmp/stagerd-vmtest-*), STAGERD_VMTEST_MIRROR (default: this machine's apt sources).
# Needs root (mmdebstrap, /var/cache). KVM is not used: TCG only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
export STAGERD_VENV="${STAGERD_VENV:-$root/.venv}"
cd "$root"
started=$SECONDS
log() { printf 'vmtest: %s\n' "$*" >&2; }

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v ssh >/dev/null || missing+=(openssh-client)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
"$here/venv.sh"

run="${STAGERD_VMTEST_RUN:-$(mktemp -d /tmp/stagerd-vmtest-XXXXXX)}"
mkdir -p "$run"
export STAGERD_VMTEST_RUN="$run"

# Whatever happens to pytest (a failure, ^C, a kill), no guest outlives this script: each
# QEMU wrote its pid to $run/*-qemu.pid; kill exactly those processes.
kill_guests() {
    local pidfile pid
    for pidfile in "$run"/*-qemu.pid; do
        [ -f "$pidfile" ] || continue
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if [ -n "$pid" ] && grep -qa -- "$run" "/proc/$pid/cmdline" 2>/dev/null; then
            log "killing guest QEMU pid $pid ($pidfile)"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}
finish() {
    local rc=$?
    kill_guests
    # The disks are throw-away (overlays on the cached images); the logs stay.
    rm -f "$run"/*.qcow2 "$run"/*.raw
    log "run directory (serial console and Ansible logs): $run"
    log "total $((SECONDS - started)) s, exit $rc"
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "guests: ${STAGERD_VMTEST_DISTROS:-debian12,debian13}, parallel=${STAGERD_VMTEST_PARALLEL:-1}, run $run"
# -p no:cacheprovider: nothing written into the clone; -n 0: one process owns the guests.
set +e
"$STAGERD_VENV/bin/python" -m pytest tests/vm -m vm -n 0 -p no:cacheprovider \
    -o timeout=5400 -s -ra "$@"
rc=$?
set -e
exit "$rc"
