"""Moving a PCI device between drivers the way the kernel wants it done.

driver_override -> unbind -> drivers_probe, then the ``driver`` link is checked,
because drivers_probe reports success even when nothing bound. Never ``new_id``:
it hands every unbound device with the same IDs to the driver.
"""

from __future__ import annotations

import errno
import os

from kata_vfio.errors import BindError
from kata_vfio.pci import (
    VFIO_PCI,
    PciAddress,
    device_dir,
    driver_dir,
    drivers_probe_path,
    is_vfio_driver,
    read_link,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import StrPath, SysfsWrite

MODPROBE = ("/sbin/modprobe", "/usr/sbin/modprobe")
VFIO_MODULES = ("vfio-pci", "vfio_iommu_type1")


def load_vfio_pci(sysfs: StrPath, modprobe: tuple[str, ...] = MODPROBE) -> bool:
    """Make sure the vfio-pci driver is registered, loading its modules if need be
    (absolute paths, empty environment: the guest hook runs without PATH)."""
    if os.path.isdir(driver_dir(sysfs, VFIO_PCI)):
        return True
    from kata_vfio.run import run

    found = next((m for m in modprobe if os.path.exists(m)), None)
    if found is not None:
        for module in VFIO_MODULES:
            # the driver directory below is the verdict; modprobe's own failure is not
            run([found, "-q", module], what=f"loading {module}", env={}, timeout=30, check=False)
    return os.path.isdir(driver_dir(sysfs, VFIO_PCI))


def write_attr(path: StrPath, text: str) -> None:
    """Write a sysfs attribute with one write(2), as the kernel expects."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def current_driver(sysfs: StrPath, addr: PciAddress) -> str | None:
    return read_link(os.path.join(device_dir(sysfs, addr), "driver"))


def bind_to(
    sysfs: StrPath, addr: PciAddress, driver: str, write: SysfsWrite = write_attr
) -> str | None:
    """Bind `addr` to `driver`; returns the driver it had. A no-op when already bound."""
    before = current_driver(sysfs, addr)
    if before == driver or (driver == VFIO_PCI and is_vfio_driver(before)):
        return before
    move_to(sysfs, addr, before, driver, write)
    return before


def move_to(
    sysfs: StrPath,
    addr: PciAddress,
    before: str | None,
    driver: str,
    write: SysfsWrite = write_attr,
) -> None:
    """`bind_to` for a caller that has just read the device's driver (`before`, not
    `driver`) under its own locks: the same writes and check, one sysfs read fewer."""
    base = device_dir(sysfs, addr)
    write(os.path.join(base, "driver_override"), driver)
    if before is not None:
        write(os.path.join(base, "driver", "unbind"), str(addr))
    _probe(sysfs, addr, write)
    after = current_driver(sysfs, addr)
    if after != driver:
        raise BindError(
            f"{driver} did not take PCI device {addr} (driver now: {after or 'none'})",
            f"is the {driver} module loaded? see the kernel log (dmesg) for {addr}",
        )


def give_back(
    sysfs: StrPath,
    addr: PciAddress,
    driver: str | None,
    override: str | None = None,
    write: SysfsWrite = write_attr,
) -> None:
    """Return `addr` to `driver` (None: leave it driver-less) and restore its override."""
    base = device_dir(sysfs, addr)
    write(os.path.join(base, "driver_override"), override or "\n")
    if current_driver(sysfs, addr) == driver:
        return
    if current_driver(sysfs, addr) is not None:
        write(os.path.join(base, "driver", "unbind"), str(addr))
    if driver is None:
        return
    _probe(sysfs, addr, write)
    now = current_driver(sysfs, addr)
    if now != driver:
        raise BindError(
            f"could not give PCI device {addr} back to {driver} (driver now: {now or 'none'})",
            f"bind it by hand: echo {addr} > /sys/bus/pci/drivers/{driver}/bind",
        )


def _probe(sysfs: StrPath, addr: PciAddress, write: SysfsWrite) -> None:
    try:
        write(drivers_probe_path(sysfs), str(addr))
    except OSError as exc:
        # The kernel answers drivers_probe with an error when no driver matched;
        # the driver link, checked by the caller, is what counts.
        if exc.errno not in (errno.EINVAL, errno.ENODEV, errno.ENOENT):
            raise
