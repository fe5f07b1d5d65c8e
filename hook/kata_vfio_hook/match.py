"""Finding the manifest's devices among the guest's PCI devices.

Guest addresses differ from host ones, so devices are recognised by what does
not change on the way in: vendor/device, subsystem IDs, class, and for NICs the
MAC. Identical devices are assigned in address order, each guest device once,
MAC matches first, so the same manifest always gives the same assignment.
"""

from __future__ import annotations

import os

from kata_vfio.manifest import ManifestDevice
from kata_vfio.pci import PciAddress, PciDevice, device_dir, list_addresses, read_device

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import StrPath


def guest_mac(sysfs: StrPath, dev: PciDevice) -> str | None:
    for ifname in dev.net_interfaces:
        try:
            with open(
                os.path.join(device_dir(sysfs, dev.address), "net", ifname, "address"), "rb"
            ) as f:
                return f.read().decode("ascii", "replace").strip().lower()
        except OSError:
            continue
    return None


def scan(sysfs: StrPath) -> list[PciDevice]:
    """Every guest endpoint (bridges are not passed through)."""
    devices = []
    for addr in list_addresses(sysfs):
        try:
            dev = read_device(sysfs, addr)
        except (OSError, ValueError):
            continue  # a device going away while we look
        if not dev.is_bridge:
            devices.append(dev)
    return devices


def _same_kind(want: ManifestDevice, have: PciDevice) -> bool:
    return want.identity == have.identity


def assign(
    sysfs: StrPath, wanted: list[ManifestDevice], guest: list[PciDevice]
) -> tuple[dict[int, PciDevice], list[int]]:
    """Map manifest index -> guest device; also the indexes left without one."""
    taken: set[PciAddress] = set()
    found: dict[int, PciDevice] = {}
    macs = {dev.address: guest_mac(sysfs, dev) for dev in guest if dev.net_interfaces}
    # pass 1: MACs tell identical NICs apart
    for i, want in enumerate(wanted):
        if want.mac is None:
            continue
        for dev in guest:
            if (
                dev.address not in taken
                and _same_kind(want, dev)
                and macs.get(dev.address) == want.mac
            ):
                found[i] = dev
                taken.add(dev.address)
                break
    # pass 2: the rest in address order
    for i, want in enumerate(wanted):
        if i in found:
            continue
        for dev in guest:
            if dev.address not in taken and _same_kind(want, dev):
                found[i] = dev
                taken.add(dev.address)
                break
    return found, [i for i in range(len(wanted)) if i not in found]
