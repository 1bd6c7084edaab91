"""The guest machine of the power-cut rig: the image under qemu-system-aarch64 (TCG), its SD
card served by nbdkit with a volatile write cache, its serial lines and its agent's port.

The card. qemu's own disk cache modes cannot lose a write: with cache=writeback or none, a write
the guest issued and qemu completed is in the host's page cache or on its disk, and a SIGKILL of
qemu does not take it back, flushed or not. A card (or any disk with a write cache) keeps only
what was flushed. So the card is served by nbdkit's file plugin under its cache filter with
`cache=writeback`: a write stays in nbdkit's cache (a deleted temporary file of nbdkit's) until
the guest sends a flush (ext4's journal commits, SQLite's fsync), and only then reaches the
image file. The guest sees a volatile write cache (`write-cache=on`,
/sys/block/vda/queue/write_cache "write back") and flushes as on a real card. A power cut kills
nbdkit and qemu together (one process group, one SIGKILL): the guest's page cache and every
unflushed write are lost. Flushes are honoured, and nothing else is: no cache=unsafe (which
drops flushes), no writethrough or directsync (which would make every write durable and hide a
missing fsync). image-test.sh's own boots use qemu's default (writeback on the image file):
they cut no power, so nothing there depends on what an unflushed write becomes.

Devices (the `virt` machine has one PL011 UART, kept as the console, ttyAMA0):
  - scanner: USB serial adapter (qemu usb-serial, an FTDI) on xhci, serial number `scanner`:
    /dev/serial/by-id/usb-QEMU_QEMU_USB_SERIAL_scanner-if00-port0 (ttyUSB*), host end a unix
    socket (qemu listens) that the rig's scanner writes codes to;
  - vending controller: the same, serial number `vmc`;
  - agent: virtio serial port org.kiosk.powercut, host end a file per boot;
  - network: user-mode (slirp), the guest reaches the host's loopback as 10.0.2.2.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

SCANNER_PORT = "/dev/serial/by-id/usb-QEMU_QEMU_USB_SERIAL_scanner-if00-port0"
VMC_PORT = "/dev/serial/by-id/usb-QEMU_QEMU_USB_SERIAL_vmc-if00-port0"
HOST_FROM_GUEST = "10.0.2.2"  # slirp's alias for the host's loopback
# Units the rig's guest does without, each tens of seconds of a boot under TCG: no time server
# and no name server is reachable (the clock comes from the RTC, the gateway is an address),
# nobody logs in on a console, and a power cut's e2scrub leftovers are none of the kiosk's.
SKIPPED_UNITS = (
    "e2scrub_reap.service",
    "systemd-timesyncd.service",
    "systemd-time-wait-sync.service",  # else it waits its 90 s bound for timesyncd each boot
    "systemd-resolved.service",
    "serial-getty@ttyAMA0.service",
    "getty@tty1.service",
)


class Line:
    """The host end of one of the guest's serial lines (qemu's unix socket): lines in, lines
    out. Reconnected at each boot; what the rig wrote while the guest was off is gone, as on a
    wire to an unpowered machine."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.sock: socket.socket | None = None
        self._buffer = b""
        self.lines: list[str] = []  # everything read, across boots

    def connect(self, timeout: float = 30.0) -> None:
        self.close()
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                self.sock = sock
                self._buffer = b""
                return
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def write_line(self, text: str, end: str = "\r\n") -> bool:
        """False when the line is down (the guest is off)."""
        if self.sock is None:
            return False
        try:
            self.sock.sendall((text + end).encode())
            return True
        except OSError:
            self.close()
            return False

    def read_line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.sock is None:
                return None
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if ready:
                try:
                    data = self.sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.close()
                    return None
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        text = line.decode(errors="replace").rstrip("\r")
        self.lines.append(text)
        return text

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None


class Machine:
    """One image, booted again and again: `boot(n, mode)`, then `cut()` or `wait_off()`."""

    def __init__(self, out: Path, image: Path, kernel: Path, initrd: Path) -> None:
        self.out = out
        self.image = image
        self.kernel = kernel
        self.initrd = initrd
        self.scanner = Line("scanner", out / "scanner.sock")
        self.vmc = Line("vmc", out / "vmc.sock")
        self.nbd_socket = out / "card.nbd"
        self.nbdkit: subprocess.Popen[bytes] | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.boot_number = 0
        self.agent_log: Path | None = None
        self.console_log: Path | None = None
        self.booted_at = 0.0

    def qemu_command(self, append: str) -> list[str]:
        assert self.agent_log is not None and self.console_log is not None
        return [
            "qemu-system-aarch64",
            *("-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "1024", "-accel", "tcg"),
            *("-display", "none", "-no-reboot", "-monitor", "none"),
            *("-serial", f"file:{self.console_log}"),
            "-blockdev",
            f"driver=nbd,node-name=card,server.type=unix,server.path={self.nbd_socket}",
            # The guest sees a volatile write cache and flushes it; nbdkit keeps what is not
            # flushed in its cache only, lost with the power (see the module's doc).
            *("-device", "virtio-blk-pci,drive=card,write-cache=on"),
            *("-device", "virtio-rng-pci"),
            *("-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile="),
            *("-device", "qemu-xhci,id=xhci"),
            *self._usb_serial("scanner", self.scanner.path),
            *self._usb_serial("vmc", self.vmc.path),
            *("-device", "virtio-serial-pci,id=vser"),
            *("-chardev", f"file,id=agent,path={self.agent_log}"),
            *("-device", "virtserialport,bus=vser.0,chardev=agent,name=org.kiosk.powercut"),
            *("-kernel", str(self.kernel), "-initrd", str(self.initrd)),
            *("-append", append),
        ]

    @staticmethod
    def _usb_serial(name: str, path: Path) -> list[str]:
        return [
            "-chardev",
            f"socket,id={name},path={path},server=on,wait=off",
            "-device",
            f"usb-serial,bus=xhci.0,chardev={name},serial={name},always-plugged=on",
        ]

    def boot(self, mode: str) -> None:
        """Power on: nbdkit serves the card, qemu boots, the serial lines are connected."""
        assert self.qemu is None, "already on"
        self.boot_number += 1
        n = self.boot_number
        self.agent_log = self.out / f"agent-boot{n}.log"
        self.console_log = self.out / f"console-boot{n}.log"
        self.agent_log.write_bytes(b"")
        for path in (self.nbd_socket, self.scanner.path, self.vmc.path):
            path.unlink(missing_ok=True)
        append = (
            "root=LABEL=RASPIROOT rw console=ttyAMA0 panic=-1 systemd.show_status=auto "
            + " ".join(f"systemd.mask={unit}" for unit in SKIPPED_UNITS)
            + f" kiosk.powercut={mode}"
        )
        env = {**os.environ, "TMPDIR": str(self.out)}  # where the cache's deleted file lives
        self.nbdkit = subprocess.Popen(
            [
                "nbdkit",
                "--foreground",
                "--unix",
                str(self.nbd_socket),
                "--filter=cache",
                "file",
                f"file={self.image}",
                "cache=writeback",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.out / f"nbdkit-boot{n}.log", "wb"),  # noqa: SIM115
            env=env,
            process_group=0,  # a group of its own, qemu joins it: the cut kills the group
        )
        deadline = time.monotonic() + 30
        while not self.nbd_socket.exists():
            if self.nbdkit.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not start (see nbdkit-boot{n}.log)")
            time.sleep(0.05)
        group = self.nbdkit.pid
        self.qemu = subprocess.Popen(
            self.qemu_command(append),
            stdin=subprocess.DEVNULL,
            stdout=open(self.out / f"qemu-boot{n}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            process_group=group,
        )
        self.booted_at = time.monotonic()
        self.scanner.connect()
        self.vmc.connect()

    def console_shows(self, texts: tuple[str, ...]) -> str | None:
        """The first of `texts` the serial console of this boot shows, if any."""
        if self.console_log is None or not self.console_log.exists():
            return None
        data = self.console_log.read_bytes().decode(errors="replace")
        return next((text for text in texts if text in data), None)

    @property
    def on(self) -> bool:
        return self.qemu is not None and self.qemu.poll() is None

    def cut(self) -> None:
        """Pull the plug: one SIGKILL to qemu and nbdkit together."""
        if self.nbdkit is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nbdkit.pid, signal.SIGKILL)
        self._reap()

    def wait_off(self, timeout: float) -> bool:
        """Wait for the guest to power itself off; then let nbdkit go (everything the guest
        flushed is in the image file). False if it did not within `timeout` (then cut)."""
        assert self.nbdkit is not None and self.qemu is not None
        try:
            self.qemu.wait(timeout)
            clean = True
        except subprocess.TimeoutExpired:
            clean = False
        if clean:
            self.nbdkit.send_signal(signal.SIGTERM)
            try:
                self.nbdkit.wait(30)
            except subprocess.TimeoutExpired:
                clean = False
        if not clean:
            self.cut()
        self._reap()
        return clean

    def _reap(self) -> None:
        for proc in (self.qemu, self.nbdkit):
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    if proc.poll() is None:
                        proc.kill()
                proc.wait(30)
        self.qemu = self.nbdkit = None
        self.scanner.close()
        self.vmc.close()

    def close(self) -> None:
        if self.nbdkit is not None or self.qemu is not None:
            self.cut()
