"""Who uses a block device: mounted, active swap, or under a device-mapper/md device
(LVM, dm-crypt, RAID) that is — the one implementation of that rule for the guest hook
(the VM's own disks) and the host tools (a disk the host stands on). Standard library
only: the hook imports it.

The kernel's view: ``/proc/self/mounts`` and ``/proc/swaps`` name sources by path (a
``/dev/mapper/x`` or ``/dev/disk/by-*`` link resolves to the kernel name, dm-0);
``/sys/class/block/<name>/holders/`` lists the dm/md devices stacked on a disk or
partition, which may stack further.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the hook imports no typing (its start-up)
if TYPE_CHECKING:
    from kata_vfio.pci import StrPath


def _unescape(field: str) -> str:
    """The kernel writes blanks in /proc/mounts fields as octal escapes (\\040)."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape")


class BlockUsers:
    """Reads the mount and swap tables once; answers per kernel block device name."""

    def __init__(self, sysfs: StrPath, proc: StrPath) -> None:
        self._sysfs = os.fspath(sysfs)
        self._proc = os.fspath(proc)
        self._tables: dict[str, dict[str, str]] | None = None

    def holders(self, name: str, depth: int = 0) -> list[str]:
        """dm/md devices stacked on `name` (``class/block/<name>/holders``), transitively."""
        try:
            direct = sorted(os.listdir(os.path.join(self._sysfs, "class/block", name,
                                                    "holders")))
        except OSError:
            return []
        found = list(direct)
        if depth < 8:
            for holder in direct:
                found += self.holders(holder, depth + 1)
        return found

    def _used(self) -> dict[str, dict[str, str]]:
        """"mounts": kernel name -> mount point; "swaps": kernel name -> "swap"."""
        if self._tables is None:
            self._tables = {}
            for table in ("self/mounts", "swaps"):
                found: dict[str, str] = {}
                try:
                    with open(os.path.join(self._proc, table), encoding="utf-8",
                              errors="replace") as f:
                        lines = f.read().splitlines()
                except OSError:
                    lines = []
                for line in lines:
                    fields = line.split()
                    if fields and fields[0].startswith("/dev/"):
                        name = os.path.basename(os.path.realpath(_unescape(fields[0])))
                        found.setdefault(name, _unescape(fields[1]) if table != "swaps"
                                         and len(fields) > 1 else "swap")
                self._tables[table.split("/")[-1]] = found
        return self._tables

    def user(self, name: str, *, any_holder: bool = False) -> str | None:
        """How `name` is used ("mounted on /srv", "active swap", "under dm-0, which is
        mounted on /", with `any_holder` also "held by dm-0"), or None."""
        tables = self._used()
        mounts, swaps = tables["mounts"], tables["swaps"]
        holders = self.holders(name)
        for dev in [name, *holders]:
            where = "" if dev == name else f"under {dev}, which is "
            if dev in mounts:
                return f"{where}mounted on {mounts[dev]}"
            if dev in swaps:
                return f"{where}active swap"
        if any_holder and holders:
            return f"held by {', '.join(holders)} (device-mapper or md)"
        return None
