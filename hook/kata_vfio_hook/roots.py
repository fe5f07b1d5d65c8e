"""Where the guest's kernel interfaces and the hook's own state are (fake trees in tests).

Imported only when a container has a manifest: the path of every other container
never needs pathlib or typing.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from kata_vfio.defaults import GUEST_CLAIMS_DIR
from kata_vfio.rebind import MODPROBE, write_attr
from kata_vfio_hook.main import LIBCONTAINER
from kata_vfio_hook.vmdeps import Ipv4Lookup, ipv4_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.rebind import SysfsWrite


class GuestRoots(NamedTuple):
    sysfs: Path = Path("/sys")
    proc: Path = Path("/proc")
    cgroupfs: Path = Path("/sys/fs/cgroup")
    libcontainer: Path = Path(LIBCONTAINER)
    claims: Path = Path(GUEST_CLAIMS_DIR)  # the claim ledger (identical devices in one pod)
    modprobe: tuple[str, ...] = MODPROBE
    via_proc_root: bool = True  # reach the rootfs through /proc/<pid>/root (its mount ns)
    write: SysfsWrite = write_attr  # the seam tests put a fake kernel behind
    uevents: bool = True  # False: fake trees send no uevents, re-check by polling
    ipv4_address: Ipv4Lookup = ipv4_address  # SIOCGIFADDR; tests name their own addresses
