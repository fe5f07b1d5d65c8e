"""Names for the type checker only: Protocols and aliases, no run-time module.

There is no types.py: a module imports these only under ``if TYPE_CHECKING:`` (the
lean-import rule, see `kata_vfio`), and an import at run time fails at once.
"""

from collections.abc import Callable, Sequence
from os import PathLike
from typing import Protocol

from kata_vfio.pci import IommuGroup, PciAddress

# A path as the sysfs/dev/proc functions take it (they work on os.path strings).
StrPath = str | PathLike[str]

# The seam through which every sysfs attribute is written (path, text). Tests pass a
# fake kernel.
SysfsWrite = Callable[[str, str], None]

# What holds a device (its users: interfaces with addresses, mounted disks), [] when free.
InUse = Callable[[PciAddress], list[str]]

# os.execv's shape: how the wrapper hands over to the inner runtime.
ExecFn = Callable[[str, list[str]], object]

# The guest's IPv4 address of an interface, None when it has none.
Ipv4Lookup = Callable[[str], str | None]

# A node under /dev/vfio: name, major, minor.
VfioNode = tuple[str, int, int]

class Movable(Protocol):
    """A device as a bind needs it: PciDevice (a container's create reads everything,
    for the allow-list) or BindState (kata-vfio-ctl bind reads only this)."""

    @property
    def address(self) -> PciAddress: ...
    @property
    def driver(self) -> str | None: ...
    @property
    def driver_override(self) -> str | None: ...

# One IOMMU group of a bind and the devices of it that move.
GroupPlan = tuple[IommuGroup, Sequence[Movable]]

# A device the hook placed: host address, guest address, guest IOMMU group, resource.
Placed = tuple[str, str, int, str | None]

class Wakeups(Protocol):
    """What the hook waits on for hot-plugged devices: uevents, or polling."""

    def wait(self, timeout: float) -> bool:
        """Block until something may have changed (True) or `timeout` passed."""
    def close(self) -> None: ...
