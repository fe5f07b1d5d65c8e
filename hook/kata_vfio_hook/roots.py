"""Where the guest's kernel interfaces and the hook's own state are (fake trees in tests).

Imported only when a container has a manifest. Paths are strings (os.path), as
everywhere on the hook's path (the lean-import rule, see `kata_vfio`).
"""

from __future__ import annotations

from kata_vfio.defaults import GUEST_CLAIMS_DIR
from kata_vfio.rebind import MODPROBE, write_attr
from kata_vfio.value import Value
from kata_vfio_hook.state import LIBCONTAINER
from kata_vfio_hook.vmdeps import ipv4_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import Ipv4Lookup, StrPath, SysfsWrite


class GuestRoots(Value):
    """sysfs, /proc, the cgroup tree, Kata 1.x's libcontainer directory and the claim
    ledger's directory; plus the seams tests replace (sysfs writes, uevents, addresses)."""

    sysfs: StrPath = "/sys"
    proc: StrPath = "/proc"
    cgroupfs: StrPath = "/sys/fs/cgroup"
    libcontainer: StrPath = LIBCONTAINER
    claims: StrPath = GUEST_CLAIMS_DIR  # the claim ledger (identical devices in one pod)
    modprobe: tuple[str, ...] = MODPROBE
    via_proc_root: bool = True  # reach the rootfs through /proc/<pid>/root
    write: SysfsWrite = write_attr  # the seam tests put a fake kernel behind
    uevents: bool = True  # False: fake trees send no uevents, re-check by polling
    ipv4_address: Ipv4Lookup = ipv4_address  # SIOCGIFADDR; tests name their own addresses
