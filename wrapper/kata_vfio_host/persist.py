"""Persistent admin binds and VF counts: `bind --persist`, `vfs --persist`, made
again at every boot.

A kernel forgets every driver move and every SR-IOV VF when it reboots. What an admin
wants for good is listed in a file of ours, `/etc/kata-vfio/persistent-binds`
($KATA_VFIO_PERSIST for tests):

- ``DDDD:BB:SS.F VVVV:DDDD vfs=N``: the PF at that address, with those vendor:device
  IDs, gets N VFs again (`vfs PF N --persist`; `vfs PF 0` or `--no-persist` removes it);
- ``DDDD:BB:SS.F VVVV:DDDD``: that device goes to vfio-pci again (`bind --persist`;
  `restore` removes it). A VF's bind needs its PF's VF count listed.

The IDs are those the device had when listed, so that a different card in the same slot
after a reboot is never taken. `kata-vfio-ctl boot` (kata-vfio-boot.service) makes the
VFs first, then binds. Read strictly (a line we did not write is an error naming it),
written atomically, edited under a flock.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from kata_vfio.errors import ConfigError, KataVfioError
from kata_vfio.files import UnsafeFileError, edited, file_lock, read_regular, write_atomically
from kata_vfio.pci import PciAddress, hex_number
from kata_vfio.value import Value

PERSIST_ENV = "KATA_VFIO_PERSIST"
DEFAULT_PERSIST = "/etc/kata-vfio/persistent-binds"
LIMIT = 1 << 20  # a few lines per device; a bigger file is not ours
HEADER = (
    "# kata-vfio-ctl bind --persist: bound to vfio-pci again at every boot by\n"
    "# kata-vfio-ctl boot (kata-vfio-boot.service); kata-vfio-ctl restore removes a\n"
    "# line. One 'DDDD:BB:SS.F VVVV:DDDD' (address, IDs when bound) per line.\n"
    "# kata-vfio-ctl vfs --persist: 'DDDD:BB:SS.F VVVV:DDDD vfs=N', a PF given N VFs\n"
    "# again at boot, before the binds; kata-vfio-ctl vfs PF 0 removes it.\n"
)
_FORMAT_HINT = (
    "fix or delete that line: each line is 'DDDD:BB:SS.F VVVV:DDDD' (e.g. "
    "'0000:03:00.0 8086:10d3'), as kata-vfio-ctl bind --persist writes it, or "
    "'DDDD:BB:SS.F VVVV:DDDD vfs=N', as vfs --persist writes it"
)


def persist_path() -> str:
    return os.environ.get(PERSIST_ENV) or DEFAULT_PERSIST


class PersistentBind(Value):
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


class PersistentVfs(Value):
    """A PF whose VF count is made again at every boot: where it is, what it was, how
    many VFs."""

    address: PciAddress
    vendor: int
    device: int
    count: int

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    def line(self) -> str:
        return f"{self.address} {self.ids} vfs={self.count}\n"


class Persisted:
    """Everything the file lists: the VF counts (made first at boot) and the binds."""

    __slots__ = ("binds", "vfs")

    def __init__(self, binds: list[PersistentBind], vfs: list[PersistentVfs]) -> None:
        self.binds = binds
        self.vfs = vfs

    def vf_count(self, pf: PciAddress) -> PersistentVfs | None:
        return next((v for v in self.vfs if v.address == pf), None)

    def copy(self) -> Persisted:
        return Persisted(list(self.binds), list(self.vfs))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Persisted) and (self.binds, self.vfs) == (other.binds, other.vfs)

    __hash__ = None  # type: ignore[assignment]  # mutable


def parse_binds(text: str, path: str) -> list[PersistentBind]:
    return parse_persisted(text, path).binds


def parse_persisted(text: str, path: str) -> Persisted:
    """The file's lines, strictly: blank lines and '#' comments aside, each line is one
    canonical address and its IDs, then ``vfs=N`` for a VF count; each address once as a
    bind and once as a VF count."""
    binds: list[PersistentBind] = []
    vfs: list[PersistentVfs] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"{path} line {number}"
        count = None
        if len(fields) == 3:
            value = fields[2].removeprefix("vfs=")
            if (
                not fields[2].startswith("vfs=")
                or not value.isascii()
                or not value.isdigit()
                or len(value) > 5
                or int(value) == 0
                or str(int(value)) != value
            ):
                raise ConfigError(
                    f"{where}: {fields[2]!r} is not vfs=N (a VF count from 1)", _FORMAT_HINT
                )
            count = int(value)
        elif len(fields) != 2:
            raise ConfigError(f"{where}: {line!r} is not an address and its IDs", _FORMAT_HINT)
        try:
            addr = PciAddress.parse(fields[0])
        except KataVfioError:
            addr = None
        if addr is None or str(addr) != fields[0]:
            raise ConfigError(
                f"{where}: {fields[0]!r} is not a PCI address in the form "
                "DDDD:BB:SS.F (lower-case hex)",
                _FORMAT_HINT,
            )
        ids = fields[1].split(":")
        vendor, device = (
            (hex_number(ids[0], 4), hex_number(ids[1], 4)) if len(ids) == 2 else (None, None)
        )
        if vendor is None or device is None:
            raise ConfigError(
                f"{where}: {fields[1]!r} is not VVVV:DDDD (four lower-case hex digits each)",
                _FORMAT_HINT,
            )
        key = fields[0] if count is None else f"{fields[0]} vfs"
        if key in seen:
            raise ConfigError(
                f"{where}: {fields[0]} is listed twice"
                f"{'' if count is None else ' with a VF count'}",
                "delete one of the two lines",
            )
        seen.add(key)
        if count is None:
            binds.append(PersistentBind(addr, vendor, device))
        else:
            vfs.append(PersistentVfs(addr, vendor, device, count))
    return Persisted(binds, vfs)


def read_binds(path: str | None = None) -> list[PersistentBind]:
    """The persistent binds ([] when the file does not exist)."""
    return read_persisted(path).binds


def read_persisted(path: str | None = None) -> Persisted:
    """The persistent binds and VF counts (none when the file does not exist)."""
    path = path or persist_path()
    try:
        raw = read_regular(path, LIMIT, "persistent binds file")
    except FileNotFoundError:
        return Persisted([], [])
    except UnsafeFileError as exc:
        raise ConfigError(
            exc.message,
            f"move it away: {path} is kata-vfio-ctl's own list "
            "of persistent binds, a plain text file",
        ) from None
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise ConfigError(
                f"persistent binds file {path} is a directory",
                "move it away; kata-vfio-ctl bind --persist writes a plain file there",
            ) from None
        raise ConfigError(
            f"cannot read persistent binds file {path}: {exc.strerror}", "run as root"
        ) from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(
            f"persistent binds file {path} holds bytes that are not ASCII",
            _FORMAT_HINT.replace("that line", "the file"),
        ) from None
    return parse_persisted(text, path)


def write_persisted(path: str, persisted: Persisted) -> None:
    lines = [v.line() for v in persisted.vfs] + [b.line() for b in persisted.binds]
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomically(path, (HEADER + "".join(lines)).encode(), mode=0o644)
    except OSError as exc:
        raise ConfigError(
            f"cannot write persistent binds file {path}: {exc.strerror or exc}",
            "run as root, on a writable /etc"
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            else "check the file system",
        ) from None


class _BindsLock(file_lock):
    def __init__(self, path: str) -> None:
        self._binds = path
        super().__init__(
            os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")
        )

    def __enter__(self) -> None:
        try:
            super().__enter__()
        except OSError as exc:
            raise ConfigError(
                f"cannot lock persistent binds file {self._binds}: {exc.strerror or exc}",
                "run as root, on a writable /etc",
            ) from None


@contextmanager
def editing_binds(path: str | None = None) -> Iterator[list[PersistentBind]]:
    """The persistent binds to change in place (see `editing`)."""
    with editing(path) as persisted:
        yield persisted.binds


@contextmanager
def editing(path: str | None = None) -> Iterator[Persisted]:
    """The persistent binds and VF counts to change in place, under a flock beside the
    file; written back (atomically) when the block ends without an exception and they
    changed."""
    where = path or persist_path()
    with edited(
        _BindsLock(where),
        lambda: read_persisted(where),
        lambda persisted: write_persisted(where, persisted),
        snapshot=Persisted.copy,
    ) as persisted:
        yield persisted
