"""Reading and writing the root filesystem of an SD card image without mounting it: debugfs
(e2fsprogs) on the ext4 partition, addressed by its byte offset (`image?offset=N`), so it works
without loop devices, in containers and as any user who may write the image file.

Also a cheap refresh of an image's kiosk layer: the current checkout's `kiosk` and `drivers`
packages (with hash-checked byte code, so Python never recompiles them on a read-only /opt)
and its units, tmpfiles, sysusers and udev files, written over an image built earlier:

    python -m tests.powercut.ext4 refresh IMAGE     seconds instead of a 35-minute build

The refresh changes Python files and the layer's plain files only: a change of the wheels
(pyproject's dependencies), of the Debian packages or of the base system needs a real build.
"""

from __future__ import annotations

import argparse
import importlib.util
import py_compile
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROOT_LABEL_PARTITION = 2  # RASPIFIRM is 1, RASPIROOT is 2 (build-debian-image.sh)
BOOT_PARTITION = 1
PROJECT = Path(__file__).resolve().parents[2]
SITE_PACKAGES = "/opt/kiosk/lib/python3.11/site-packages"
# The kiosk layer's plain files (image-build/kiosk-layer.sh, lay_out_files): source, target.
LAYER_FILES = (
    ("systemd/kiosk.service", "/usr/lib/systemd/system/kiosk.service"),
    ("systemd/kiosk-provision.service", "/usr/lib/systemd/system/kiosk-provision.service"),
    ("systemd/sysusers.d/kiosk.conf", "/usr/lib/sysusers.d/kiosk.conf"),
    ("systemd/tmpfiles.d/kiosk.conf", "/usr/lib/tmpfiles.d/kiosk.conf"),
    ("systemd/udev/rules.d/60-kiosk.rules", "/usr/lib/udev/rules.d/60-kiosk.rules"),
    ("image-build/README.md", "/opt/kiosk/share/README.md"),
)


class Ext4Error(RuntimeError):
    pass


def partition_offset(image: Path, number: int) -> int:
    """The byte offset of partition `number` of an MBR image (parted, as the builder uses)."""
    out = subprocess.run(
        ["parted", "-ms", str(image), "unit", "B", "print"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        fields = line.split(":")
        if fields[0] == str(number):
            return int(fields[1].rstrip("B"))
    raise Ext4Error(f"{image} has no partition {number}")


class Ext4Image:
    """The ext4 filesystem at `offset` in `image`. Writes are batched: `commit()` runs them in
    one debugfs session (each debugfs start reads the bitmaps of the whole filesystem)."""

    def __init__(self, image: Path, offset: int | None = None) -> None:
        self.image = Path(image)
        self.offset = (
            partition_offset(self.image, ROOT_LABEL_PARTITION) if offset is None else offset
        )
        self._spec = f"{self.image}?offset={self.offset}"
        self._commands: list[str] = []
        self._staging = tempfile.TemporaryDirectory(prefix="kiosk-ext4-")
        self._staged = 0
        self._dirs: set[str] = {"/"}  # folders known to exist (or queued)
        self._made: set[str] = set()  # folders queued for mkdir in this batch

    def close(self) -> None:
        self._staging.cleanup()

    def __enter__(self) -> Ext4Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def debugfs(self, request: str, write: bool = False) -> str:
        """One debugfs request; its output. debugfs exits 0 whatever happened, so errors are
        read from its stderr lines that name the request's command."""
        args = ["debugfs", *(["-w"] if write else []), "-R", request, self._spec]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise Ext4Error(f"debugfs {request!r}: {done.stderr.strip()}")
        return done.stdout

    def exists(self, path: str) -> bool:
        out = subprocess.run(
            ["debugfs", "-R", f"stat {path}", self._spec], capture_output=True, text=True
        )
        return out.returncode == 0 and "Inode:" in out.stdout

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        """(name, is_dir) of each entry of directory `path`, without . and .."""
        out = self.debugfs(f"ls -p {path}")
        entries = []
        for line in out.splitlines():
            # /inode/mode/uid/gid/name/size/
            parts = line.strip().split("/")
            if len(parts) < 7 or parts[5] in (".", ".."):
                continue
            entries.append((parts[5], parts[2].startswith("04")))
        return entries

    def read(self, path: str) -> bytes:
        with tempfile.NamedTemporaryFile(dir=self._staging.name) as out:
            self.debugfs(f"dump {path} {out.name}")
            return Path(out.name).read_bytes()

    def dump_tree(self, path: str, dest: Path) -> Path:
        """Copy directory `path` (recursively) to the host folder `dest`; returns its copy."""
        dest.mkdir(parents=True, exist_ok=True)
        self.debugfs(f"rdump {path} {dest}")
        copy = dest / Path(path).name
        if not copy.is_dir():
            raise Ext4Error(f"rdump of {path} gave nothing")
        return copy

    # -- writing (batched) -------------------------------------------------------------------

    def _stage(self, data: bytes, mode: int) -> str:
        self._staged += 1
        path = Path(self._staging.name) / f"f{self._staged}"
        path.write_bytes(data)
        path.chmod(mode)
        return str(path)

    def mkdirs(self, path: str, mode: int = 0o755) -> None:
        """Each missing folder of `path`, root-owned. Folders known to exist, or made in this
        batch, are not asked about again (each question is a debugfs run)."""
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            parent = sub.rsplit("/", 1)[0] or "/"
            if sub in self._dirs:
                continue
            if parent in self._made or not self.exists(sub):
                self._commands += [f"mkdir {sub}", *self._owner(sub, 0o040000 | mode)]
                self._made.add(sub)
            self._dirs.add(sub)

    @staticmethod
    def _owner(path: str, mode: int, uid: int = 0, gid: int = 0) -> list[str]:
        return [
            f"sif {path} mode 0{mode:o}",
            f"sif {path} uid {uid}",
            f"sif {path} gid {gid}",
        ]

    def write(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        """`path` gets `data` (replacing a file there), owned uid:gid with `mode`."""
        parent, name = path.rsplit("/", 1)
        staged = self._stage(data, mode)
        self._commands += [
            f"cd {parent or '/'}",
            f"rm {name}",  # fails harmlessly when absent
            f"write {staged} {name}",
            "cd /",
            *self._owner(path, 0o100000 | mode, uid, gid),
        ]

    def symlink(self, path: str, target: str) -> None:
        self._commands += [f"rm {path}", f"symlink {path} {target}"]

    def remove(self, path: str) -> None:
        self._commands.append(f"rm {path}")

    def remove_tree(self, path: str) -> None:
        """`path` and everything under it (asked now, removed at commit)."""
        if not self.exists(path):
            return
        for name, is_dir in self.listdir(path):
            if is_dir:
                self.remove_tree(f"{path}/{name}")
            else:
                self._commands.append(f"rm {path}/{name}")
        self._commands.append(f"rmdir {path}")
        self._dirs = {d for d in self._dirs if d != path and not d.startswith(path + "/")}

    def commit(self) -> None:
        """Run the queued writes in one debugfs session; fail on any error but the expected
        ones (rm of what is not there, mkdir of what is)."""
        if not self._commands:
            return
        script = Path(self._staging.name) / "commands"
        script.write_text("\n".join(self._commands) + "\n")
        done = subprocess.run(
            ["debugfs", "-w", "-f", str(script), self._spec],
            capture_output=True,
            text=True,
            check=False,
        )
        self._commands.clear()
        self._made.clear()
        errors = [
            line
            for line in done.stderr.splitlines()
            if line.strip()
            and not line.startswith("debugfs ")
            and "File not found by ext2_lookup" not in line
            and "Ext2 directory already exists" not in line
            and "file already exists" not in line.lower()
        ]
        if done.returncode != 0 or errors:
            raise Ext4Error("debugfs: " + "; ".join(errors[:5]) or f"exit {done.returncode}")


# -- the kiosk layer's refresh -------------------------------------------------------------------


def _package_files(package: Path) -> Iterable[Path]:
    for path in sorted(package.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        if path.suffix in (".pyc", ".pyo"):
            continue
        yield path


def _byte_code(source: Path, guest_path: str, optimize: int = -1) -> bytes:
    """Byte code for the guest's CPython 3.11 (the host's must be 3.11 too: one magic number),
    hash-checked, so it stays valid whatever mtime debugfs gives the source; `optimize` 2 for
    the service's `python -OO`."""
    if sys.version_info[:2] != (3, 11):
        raise Ext4Error(f"byte code for the image needs Python 3.11 here, not {sys.version}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pyc"
        py_compile.compile(
            str(source),
            cfile=str(out),
            dfile=guest_path,
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
            optimize=optimize,
        )
        return out.read_bytes()


def refresh_kiosk(image: Path, project: Path = PROJECT, offset: int | None = None) -> list[str]:
    """Write the checkout's kiosk layer over the image's (see the module's doc); what changed.
    `offset`: of the root filesystem in `image` (default: its second partition)."""
    done: list[str] = []
    tag = sys.implementation.cache_tag  # cpython-311
    with Ext4Image(image, offset) as fs:
        if not fs.exists(SITE_PACKAGES):
            raise Ext4Error(f"{image} has no {SITE_PACKAGES}: not a kiosk image")
        for package in ("kiosk", "drivers"):
            target = f"{SITE_PACKAGES}/{package}"
            fs.remove_tree(target)
            fs.commit()
            source_root = project / package
            for source in _package_files(source_root):
                relative = source.relative_to(source_root).as_posix()
                guest = f"{target}/{relative}"
                fs.mkdirs(guest.rsplit("/", 1)[0])
                fs.write(guest, source.read_bytes(), 0o644)
                if source.suffix == ".py":
                    folder, name = guest.rsplit("/", 1)
                    fs.mkdirs(f"{folder}/__pycache__")
                    # Both, as the image has them: pip's, and the service's (kiosk-layer.sh).
                    pyc = f"{folder}/__pycache__/{name[:-3]}.{tag}"
                    fs.write(f"{pyc}.pyc", _byte_code(source, guest), 0o644)
                    fs.write(f"{pyc}.opt-2.pyc", _byte_code(source, guest, optimize=2), 0o644)
            fs.commit()
            done.append(target)
        for source, target in LAYER_FILES:
            fs.write(target, (project / source).read_bytes(), 0o644)
            done.append(target)
        fs.commit()
    return done


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.powercut.ext4", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    refresh = sub.add_parser("refresh", help="write this checkout's kiosk layer over IMAGE")
    refresh.add_argument("image", type=Path)
    args = parser.parse_args(argv)
    if args.command == "refresh":
        if importlib.util.find_spec("kiosk") is None:
            print("the kiosk package is not importable here", file=sys.stderr)
        changed = refresh_kiosk(args.image)
        print(f"refreshed {len(changed)} paths in {args.image}: {', '.join(changed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
