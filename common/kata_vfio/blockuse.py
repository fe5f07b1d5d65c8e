"""Who uses a block device: mounted, active swap, or under a device-mapper/md device
(LVM, dm-crypt, RAID) that is — the one implementation of that rule for the guest hook
(the VM's own disks) and the host tools (a disk the host stands on). Standard library
only: the hook imports it.

Matched by device number, not by name: ``/proc/self/mountinfo`` gives each mount's
``major:minor`` whatever its source is called (``/dev/mapper/x`` as a node of its own
where no udev made it a link, ``/dev/disk/by-uuid/…``, ``/dev/root``), and a swap
device's path in ``/proc/swaps`` is looked up with stat (its ``st_rdev``);
``/sys/class/block/<name>/dev`` gives each kernel name its number. The source's name
(a ``/dev/…`` link resolved to the kernel name) still counts where no number is known:
a filesystem like btrfs reports an anonymous number, and an older or partial /proc
has only ``mounts``. ``/sys/class/block/<name>/holders/`` lists the dm/md devices
stacked on a disk or partition, which may stack further (md over dm over a partition).
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import StrPath

MAX_STACK = 8  # holders of holders: LVM on dm-crypt on md on a partition is four


def _unescape(field: str) -> str:
    """The kernel writes blanks in /proc/mounts, mountinfo and swaps fields as octal
    escapes (\\040)."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape")


class BlockUsers:
    """Reads the mount and swap tables once; answers per kernel block device name.
    `root`: where the paths those tables name are looked up (a test's fake /dev)."""

    def __init__(self, sysfs: StrPath, proc: StrPath, root: StrPath = "/") -> None:
        self._sysfs = os.fspath(sysfs)
        self._proc = os.fspath(proc)
        self._root = os.fspath(root)
        # "mounts"/"swaps": key (a kernel name, or "major:minor") -> mount point or "swap"
        self._tables: dict[str, dict[str, str]] | None = None

    def holders(self, name: str, depth: int = 0) -> list[str]:
        """dm/md devices stacked on `name` (``class/block/<name>/holders``), transitively."""
        try:
            direct = sorted(os.listdir(os.path.join(self._sysfs, "class/block", name, "holders")))
        except OSError:
            return []
        found = list(direct)
        if depth < MAX_STACK:
            for holder in direct:
                found += [h for h in self.holders(holder, depth + 1) if h not in found]
        return found

    def number(self, name: str) -> str | None:
        """The kernel's ``major:minor`` of block device `name`, None if sysfs has none."""
        try:
            with open(os.path.join(self._sysfs, "class/block", name, "dev"), encoding="ascii") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            return None
        major, _, minor = text.partition(":")
        return f"{int(major)}:{int(minor)}" if major.isdigit() and minor.isdigit() else None

    def _path_keys(self, path: str) -> list[str]:
        """Keys for a device path a table names: its device number when it is a block
        node here, and the kernel name a /dev link resolves to."""
        local = os.path.join(self._root, path.lstrip("/"))
        keys = []
        try:
            st = os.stat(local)
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            keys.append(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        keys.append(os.path.basename(os.path.realpath(local)))
        return keys

    def _read(self, table: str) -> list[str]:
        try:
            with open(os.path.join(self._proc, table), encoding="utf-8", errors="replace") as f:
                return f.read().splitlines()
        except OSError:
            return []

    def _used(self) -> dict[str, dict[str, str]]:
        if self._tables is None:
            mounts: dict[str, str] = {}
            info = self._read("self/mountinfo")
            # "id parent major:minor root mount-point options [optional…] - type source …"
            for line in info:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                after = line.split(" - ", 1)[1].split()
                where = _unescape(fields[4])
                mounts.setdefault(fields[2], where)
                if after[1:] and after[1].startswith("/"):
                    for key in self._path_keys(_unescape(after[1])):
                        mounts.setdefault(key, where)
            if not info:  # no mountinfo: the sources' names alone
                for line in self._read("self/mounts"):
                    fields = line.split()
                    if len(fields) > 1 and fields[0].startswith("/dev/"):
                        for key in self._path_keys(_unescape(fields[0])):
                            mounts.setdefault(key, _unescape(fields[1]))
            swaps: dict[str, str] = {}
            for line in self._read("swaps")[1:]:  # "Filename Type Size Used Priority"
                fields = line.split()
                if len(fields) > 1 and fields[1] == "partition":  # a swap *file* sits on a
                    for key in self._path_keys(_unescape(fields[0])):  # mounted filesystem
                        swaps.setdefault(key, "swap")
            self._tables = {"mounts": mounts, "swaps": swaps}
        return self._tables

    def user(self, name: str, *, any_holder: bool = False) -> str | None:
        """How `name` is used ("mounted on /srv", "active swap", "under dm-0, which is
        mounted on /", with `any_holder` also "held by dm-0"), or None."""
        tables = self._used()
        mounts, swaps = tables["mounts"], tables["swaps"]
        holders = self.holders(name)
        for dev in [name, *holders]:
            where = "" if dev == name else f"under {dev}, which is "
            keys = [dev, self.number(dev) or dev]
            mounted = next((mounts[k] for k in keys if k in mounts), None)
            if mounted is not None:
                return f"{where}mounted on {mounted}"
            if any(k in swaps for k in keys):
                return f"{where}active swap"
        if any_holder and holders:
            return f"held by {', '.join(holders)} (device-mapper or md)"
        return None
