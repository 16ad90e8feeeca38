#!/usr/bin/env bash
# Build (or reuse) a bootable Debian base image for the VM test (build/vmtest.sh):
#   build/vm/image.sh SUITE WEED_BINARY   ->  prints the image directory on stdout
# The directory holds rootfs.raw (ext4, root=/dev/vda), vmlinuz and initrd.img. It lives in
# $STAGERD_VMTEST_CACHE (default /var/cache/stagerd-vmtest), outside any clone, under a key
# hashed from the suite, the mirror, the package list, this script and the SeaweedFS
# binary: a rerun with the same inputs skips mmdebstrap (~100 s) and returns at once.
#
# The image is generic: no SSH key (the guest reads it from the kernel command line at
# boot, vmtest-sshkey.service), no network route out (a static 10.0.2.15/24 on eth0 and no
# default route; QEMU's user network only forwards an SSH port in), no resolv.conf. It
# runs its own Redis (AOF, fsync always: it stands in for the orchestrator's durable
# Redis, and the power-cut test cuts it too), PostgreSQL (port 5432, trust on loopback)
# and SeaweedFS (S3 on 127.0.0.1:8333), all on its own loopback.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
suite="${1:?usage: image.sh SUITE WEED_BINARY}"
weed="${2:?usage: image.sh SUITE WEED_BINARY}"
cache="${STAGERD_VMTEST_CACHE:-/var/cache/stagerd-vmtest}"
log() { printf 'vm-image: %s\n' "$*" >&2; }

packages=(systemd systemd-sysv udev dbus kmod iproute2 openssh-server python3 python3-venv
    rsync e2fsprogs cron redis-server postgresql linux-image-amd64 initramfs-tools sudo
    procps curl)

# The mirror of this machine's own apt sources (deb822 or one-line format).
mirror="${STAGERD_VMTEST_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ {print $2}' | grep -v -- '-security' | grep -i debian | head -n 1 || true)"
fi
if [ -z "$mirror" ]; then
    mirror="$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '{for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' |
        grep -v -- '-security' | head -n 1 || true)"
fi
[ -n "$mirror" ] || { log "no Debian mirror in /etc/apt/sources.list*: set STAGERD_VMTEST_MIRROR"; exit 2; }

key="$( {
    echo "$suite $mirror ${packages[*]}"
    cat "${BASH_SOURCE[0]}"
    (cd "$here/guest" && find . -type f | LC_ALL=C sort | xargs sha256sum)
    sha256sum <"$weed"
} | sha256sum | cut -c1-16)"
out="$cache/$suite-$key"
if [ -f "$out/.complete" ]; then
    touch "$out/.complete"  # last use: pruning below keeps images used within a day
    log "$suite: cached image $out"
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock-$suite"
flock -w 900 9 || { log "another build of $suite holds $cache/.lock-$suite"; exit 1; }
if [ -f "$out/.complete" ]; then echo "$out"; exit 0; fi

for tool in mmdebstrap mkfs.ext4; do
    command -v "$tool" >/dev/null || { log "$tool missing (apt-get install mmdebstrap e2fsprogs)"; exit 2; }
done
started=$SECONDS
tmp="$cache/.build-$suite-$key.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
log "$suite: mmdebstrap from $mirror (a cold build takes a few minutes)"
root="$tmp/root"
mkdir "$root"
cp "$weed" "$tmp/weed"
# shellcheck disable=SC2016  # the hooks are expanded by mmdebstrap's shell, $1 = the root
mmdebstrap --variant=minbase --mode=root --format=directory \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --customize-hook='install -m 0755 '"$tmp/weed"' "$1/usr/local/bin/weed"' \
    --customize-hook='cp -r '"$here/guest"'/. "$1/"' \
    --customize-hook='chroot "$1" /bin/sh /usr/local/lib/vmtest/setup.sh' \
    "$suite" "$root" "$mirror" >"$tmp/mmdebstrap.log" 2>&1 ||
    { tail -n 40 "$tmp/mmdebstrap.log" >&2; log "$suite: mmdebstrap failed"; exit 1; }
log "$suite: rootfs in $((SECONDS - started)) s"
cp -L "$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)" "$tmp/vmlinuz"
cp -L "$(ls "$root"/boot/initrd.img-* | sort -V | tail -n 1)" "$tmp/initrd.img"
truncate -s 6G "$tmp/rootfs.raw"
mkfs.ext4 -q -F -L vmtest-root -d "$root" "$tmp/rootfs.raw"
rm -rf "$root"
mkdir -p "$out.new"
mv "$tmp/rootfs.raw" "$tmp/vmlinuz" "$tmp/initrd.img" "$tmp/mmdebstrap.log" "$out.new/"
rm -rf "$out"
mv "$out.new" "$out"
touch "$out/.complete"
# Images of this suite from other inputs: dead weight once unused for a day (a run still
# going may have one open as the backing file of its overlays, and reboots reopen it).
for old in "$cache/$suite"-*; do
    [ "$old" = "$out" ] && continue
    if [ -z "$(find "$old/.complete" -mmin -1440 2>/dev/null)" ]; then rm -rf "$old"; fi
done
log "$suite: built $out in $((SECONDS - started)) s"
echo "$out"
