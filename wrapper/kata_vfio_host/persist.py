"""Persistent admin binds: `kata-vfio-ctl bind --persist`, bound again at every boot.

A kernel forgets every driver move when it reboots. The devices an admin wants on
vfio-pci for good are listed in a file of ours, `/etc/kata-vfio/persistent-binds`
($KATA_VFIO_PERSIST for tests), one ``DDDD:BB:SS.F VVVV:DDDD`` per line: the address
and the vendor:device IDs it had when bound, so that a different card in the same
slot after a reboot is never taken. `kata-vfio-ctl boot` (kata-vfio-boot.service)
binds them again early at boot; `restore` removes them. Read strictly (a line we did
not write is an error naming it), written atomically, edited under a flock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from kata_vfio import value
from kata_vfio.errors import ConfigError, KataVfioError
from kata_vfio.files import UnsafeFileError, read_regular, write_atomically
from kata_vfio.pci import PciAddress

PERSIST_ENV = "KATA_VFIO_PERSIST"
DEFAULT_PERSIST = "/etc/kata-vfio/persistent-binds"
LIMIT = 1 << 20  # a few lines per device; a bigger file is not ours
HEADER = ("# kata-vfio-ctl bind --persist: bound to vfio-pci again at every boot by\n"
          "# kata-vfio-ctl boot (kata-vfio-boot.service); kata-vfio-ctl restore removes a\n"
          "# line. One 'DDDD:BB:SS.F VVVV:DDDD' (address, IDs when bound) per line.\n")
_FORMAT_HINT = ("fix or delete that line: each line is 'DDDD:BB:SS.F VVVV:DDDD' (e.g. "
                "'0000:03:00.0 8086:10d3'), as kata-vfio-ctl bind --persist writes it")


def persist_path() -> str:
    return os.environ.get(PERSIST_ENV) or DEFAULT_PERSIST


@value
class PersistentBind:
    """One device to bind at every boot: where it is and what it was."""

    address: PciAddress
    vendor: int
    device: int

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    def line(self) -> str:
        return f"{self.address} {self.ids}\n"

    def __repr__(self) -> str:
        return f"PersistentBind({self.line().strip()!r})"


def _hex4(text: str) -> int | None:
    if len(text) != 4 or any(c not in "0123456789abcdef" for c in text):
        return None
    return int(text, 16)


def parse_binds(text: str, path: str) -> list[PersistentBind]:
    """The file's lines, strictly: blank lines and '#' comments aside, each line is one
    canonical address and its IDs, each address once."""
    binds: list[PersistentBind] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"{path} line {number}"
        if len(fields) != 2:
            raise ConfigError(f"{where}: {line!r} is not an address and its IDs", _FORMAT_HINT)
        try:
            addr = PciAddress.parse(fields[0])
        except KataVfioError:
            addr = None
        if addr is None or str(addr) != fields[0]:
            raise ConfigError(f"{where}: {fields[0]!r} is not a PCI address in the form "
                              "DDDD:BB:SS.F (lower-case hex)", _FORMAT_HINT)
        ids = fields[1].split(":")
        vendor, device = (_hex4(ids[0]), _hex4(ids[1])) if len(ids) == 2 else (None, None)
        if vendor is None or device is None:
            raise ConfigError(f"{where}: {fields[1]!r} is not VVVV:DDDD (four lower-case hex "
                              "digits each)", _FORMAT_HINT)
        if fields[0] in seen:
            raise ConfigError(f"{where}: {fields[0]} is listed twice",
                              "delete one of the two lines")
        seen.add(fields[0])
        binds.append(PersistentBind(addr, vendor, device))
    return binds


def read_binds(path: str | None = None) -> list[PersistentBind]:
    """The persistent binds ([] when the file does not exist)."""
    path = path or persist_path()
    try:
        raw = read_regular(path, LIMIT, "persistent binds file")
    except FileNotFoundError:
        return []
    except UnsafeFileError as exc:
        raise ConfigError(exc.message, f"move it away: {path} is kata-vfio-ctl's own list "
                          "of persistent binds, a plain text file") from None
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise ConfigError(f"persistent binds file {path} is a directory",
                              "move it away; kata-vfio-ctl bind --persist writes a plain "
                              "file there") from None
        raise ConfigError(f"cannot read persistent binds file {path}: {exc.strerror}",
                          "run as root") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"persistent binds file {path} holds bytes that are not ASCII",
                          _FORMAT_HINT.replace("that line", "the file")) from None
    return parse_binds(text, path)


def write_binds(path: str, binds: list[PersistentBind]) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomically(path, (HEADER + "".join(b.line() for b in binds)).encode(),
                         mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write persistent binds file {path}: "
                          f"{exc.strerror or exc}",
                          "run as root, on a writable /etc" if exc.errno in
                          (errno.EACCES, errno.EPERM, errno.EROFS) else
                          "check the file system") from None


@contextmanager
def editing_binds(path: str | None = None) -> Iterator[list[PersistentBind]]:
    """The persistent binds to change in place, under a flock beside the file; written
    back (atomically) when the block ends without an exception and they changed."""
    path = path or persist_path()
    lock = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")
    try:
        os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot lock persistent binds file {path}: "
                          f"{exc.strerror or exc}", "run as root, on a writable /etc") \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        binds = read_binds(path)
        before = list(binds)
        yield binds
        if binds != before:
            write_binds(path, binds)
    finally:
        os.close(fd)
