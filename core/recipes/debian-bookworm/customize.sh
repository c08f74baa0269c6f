#!/bin/sh
# mmdebstrap --customize-hook of the debian-bookworm image recipe (banger image
# build, guest/rootfs/build): runs on the host after
# packages are installed, with the new root as $1.
set -eu
root="$1"
# Every VM gets its own SSH host keys, generated at boot.
rm -f "$root"/etc/ssh/ssh_host_*
# An empty machine-id: systemd makes a fresh one per VM.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# The agent writes the real hostname and resolver per VM.
echo localhost > "$root/etc/hostname"
chmod 0644 "$root/etc/hostname"
if [ -f "$root/etc/resolv.conf" ]; then chmod 0644 "$root/etc/resolv.conf"; fi
if [ -d "$root/usr/lib/systemd/system" ]; then
    # Debian's ssh.service runs `sshd -t` first, which fails without host
    # keys: generate missing keys before it.
    mkdir -p "$root/etc/systemd/system/ssh.service.d"
    printf '%s\n' "[Service]" "ExecStartPre=" \
        "ExecStartPre=/usr/bin/ssh-keygen -A" "ExecStartPre=/usr/sbin/sshd -t" \
        > "$root/etc/systemd/system/ssh.service.d/banger-host-keys.conf"
fi
