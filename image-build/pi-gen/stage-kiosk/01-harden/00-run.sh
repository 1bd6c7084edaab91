#!/bin/bash -e
# pi-gen: what Raspberry Pi OS Lite brings that a kiosk in a public place must not have, beyond
# the kiosk layer's own lockdown (no getty, no SysRq, no Ctrl+Alt+Del, the firewall, the clock).

# NetworkManager (Raspberry Pi OS's network stack): no multicast DNS, no LLMNR.
install -D -m 644 files/90-kiosk-no-multicast-dns.conf \
	"${ROOTFS_DIR}/etc/NetworkManager/conf.d/90-kiosk-no-multicast-dns.conf"

# The kernel console stays off the UART pins (the vend controller may be there; pi-gen puts
# console=serial0 there): HDMI only. SysRq is off from the kernel's start.
CMDLINE="${ROOTFS_DIR}/boot/firmware/cmdline.txt"
sed -i -e 's/console=serial0,[0-9]* *//' "${CMDLINE}"
if ! grep -q 'sysctl\.kernel\.sysrq=0' "${CMDLINE}"; then
	sed -i -e '1 s/ *$/ sysctl.kernel.sysrq=0/' "${CMDLINE}"
fi

# Bluetooth is purged below; the firmware leaves the radio off too, and the Pi 3/4/Zero 2 W's
# PL011 UART (/dev/ttyAMA0) goes to GPIO 14/15, where a vend controller can use it.
CONFIG="${ROOTFS_DIR}/boot/firmware/config.txt"
if ! grep -q '^dtoverlay=disable-bt' "${CONFIG}"; then
	printf '\n[all]\n# kiosk: no Bluetooth\ndtoverlay=disable-bt\n' >>"${CONFIG}"
fi

on_chroot <<EOF2
set -e
export DEBIAN_FRONTEND=noninteractive
# mDNS announcements, a Bluetooth stack nobody uses, and a swap file on the card (it wears the
# card and would keep memory, payment codes included, after power-off).
apt-get purge -y avahi-daemon libnss-mdns bluez bluez-firmware pi-bluetooth dphys-swapfile
apt-get autoremove -y --purge
rm -f /var/swap
# userconf-pi's first-boot wizard (pi-gen installs it when it exports the image), the switch
# that turns SSH on when a file named ssh appears on the boot partition, and what is left of
# Bluetooth and swap: masked.
for unit in userconfig.service sshswitch.service bluetooth.service hciuart.service \
	dphys-swapfile.service; do
	ln -sfn /dev/null "/etc/systemd/system/\${unit}"
done
# The first user's password is set at build time and known to whoever built it: locked, no
# shell, no sudo. Nothing on the kiosk logs in.
usermod --lock --expiredate 1 --shell /usr/sbin/nologin "${FIRST_USER_NAME}"
rm -f /etc/sudoers.d/010_pi-nopasswd
EOF2
