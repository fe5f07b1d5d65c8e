"""Where the guest's kernel interfaces and the hook's own state are (fake trees in tests).

Imported only when a container has a manifest. Paths are strings (os.path), as
everywhere on the hook's path: pathlib and typing cost the hook's first run in a fresh
VM more than a bare interpreter start.
"""

from __future__ import annotations

from kata_vfio.defaults import GUEST_CLAIMS_DIR
from kata_vfio.rebind import MODPROBE, write_attr
from kata_vfio_hook.state import LIBCONTAINER
from kata_vfio_hook.vmdeps import ipv4_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.types import Ipv4Lookup, StrPath, SysfsWrite


class GuestRoots:
    """sysfs, /proc, the cgroup tree, Kata 1.x's libcontainer directory and the claim
    ledger's directory; plus the seams tests replace (sysfs writes, uevents, addresses)."""

    __slots__ = ("cgroupfs", "claims", "ipv4_address", "libcontainer", "modprobe", "proc",
                 "sysfs", "uevents", "via_proc_root", "write")

    def __init__(self, sysfs: StrPath = "/sys", proc: StrPath = "/proc",
                 cgroupfs: StrPath = "/sys/fs/cgroup", libcontainer: StrPath = LIBCONTAINER,
                 claims: StrPath = GUEST_CLAIMS_DIR, modprobe: tuple[str, ...] = MODPROBE,
                 via_proc_root: bool = True, write: SysfsWrite = write_attr,
                 uevents: bool = True, ipv4_address: Ipv4Lookup = ipv4_address) -> None:
        self.sysfs = sysfs
        self.proc = proc
        self.cgroupfs = cgroupfs
        self.libcontainer = libcontainer
        self.claims = claims  # the claim ledger (identical devices in one pod)
        self.modprobe = modprobe
        self.via_proc_root = via_proc_root  # reach the rootfs through /proc/<pid>/root
        self.write = write  # the seam tests put a fake kernel behind
        self.uevents = uevents  # False: fake trees send no uevents, re-check by polling
        self.ipv4_address = ipv4_address  # SIOCGIFADDR; tests name their own addresses

    def _replace(self, **changes: Any) -> GuestRoots:
        """A copy with some fields changed (as NamedTuple's, which this was)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return GuestRoots(**values)
