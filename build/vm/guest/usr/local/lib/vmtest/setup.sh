#!/bin/sh
# Runs inside the new root (chroot) at image build time: build/vm/image.sh.
set -eu
echo stagerd-vm >/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tstagerd-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n' >/etc/hosts
printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >/etc/fstab
# No name service and no way out: the guest talks to its own loopback only.
rm -f /etc/resolv.conf
# PostgreSQL: the build host's 5432 may be taken, which makes pg_createcluster pick 5433.
for conf in /etc/postgresql/*/main/postgresql.conf; do
    sed -i 's/^#\{0,1\}port = .*/port = 5432/' "$conf"
    grep -q '^port = 5432' "$conf"
done
for hba in /etc/postgresql/*/main/pg_hba.conf; do
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
done
# Redis stands in for the orchestrator's durable Redis: a guest power cut must not lose
# the queue (production's Redis does not share the GPU VM's power).
sed -i 's/^appendonly .*/appendonly yes/; s/^appendfsync .*/appendfsync always/' /etc/redis/redis.conf
grep -q '^appendonly yes' /etc/redis/redis.conf
chmod 0755 /usr/local/lib/vmtest/*
systemctl enable vmtest-net.service vmtest-sshkey.service seaweedfs.service \
    redis-server.service postgresql.service ssh.service
# Faster TCG boots: nothing the test does not use, a small initramfs.
systemctl mask e2scrub_reap.service e2scrub_all.timer apt-daily.timer apt-daily-upgrade.timer \
    dpkg-db-backup.timer fstrim.timer getty@tty1.service serial-getty@ttyS0.service \
    systemd-update-utmp-runlevel.service
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' >>/etc/initramfs-tools/modules
echo MODULES=list >/etc/initramfs-tools/conf.d/vmtest.conf
update-initramfs -u -k all
# Bounded boots.
mkdir -p /etc/systemd/system.conf.d
printf '[Manager]\nDefaultTimeoutStartSec=120s\nDefaultTimeoutStopSec=60s\n' \
    >/etc/systemd/system.conf.d/vmtest.conf
