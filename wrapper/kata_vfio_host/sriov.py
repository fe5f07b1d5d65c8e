"""SR-IOV virtual functions made for VFIO use (`kata-vfio-ctl vfs PF COUNT`).

The kernel's rules: ``sriov_numvfs`` goes through 0 to change (2 -> 3 is refused
with EBUSY); ``sriov_drivers_autoprobe = 0`` first, so no host driver grabs the new
VFs; going to 0 while a process holds a VF's VFIO device blocks until it lets go.
So VFs that a container owns or a process holds open are never removed without
--force, and each is named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kata_vfio.errors import DeviceError
from kata_vfio.pci import PciAddress, device_dir, read_attr, read_device, read_link
from kata_vfio_host.ledger import Host, read_journal_file
from kata_vfio_host.owners import claim_gone

if TYPE_CHECKING:
    from kata_vfio.types import StrPath


def virtual_functions(sysfs: StrPath, pf: PciAddress) -> list[PciAddress]:
    base = Path(device_dir(sysfs, pf))
    found = []
    for name in os.listdir(base):
        if name.startswith("virtfn") and name[6:].isdigit():
            target = read_link(base / name)
            if target:
                found.append((int(name[6:]), PciAddress.parse(target)))
    return [addr for _, addr in sorted(found)]


def total_vfs(sysfs: StrPath, pf: PciAddress) -> int:
    read_device(sysfs, pf)  # "no PCI device ..." first
    path = Path(device_dir(sysfs, pf)) / "sriov_totalvfs"
    if not path.exists():
        raise DeviceError(
            f"PCI device {pf} has no SR-IOV capability (no sriov_totalvfs)",
            "list SR-IOV devices with: kata-vfio-ctl devices (PF lines show VFs)",
        )
    return int(read_attr(path))


def vf_holders(host: Host, vfs: list[PciAddress], in_use: object = None) -> list[str]:
    """Why each VF cannot go: owned by a live container, or its group open somewhere."""
    from kata_vfio_host.usage import vfio_holders_by_group

    journal = read_journal_file(host)
    live = {g: c for g, c in journal.claims.items() if not claim_gone(host, c)}
    reasons = []
    holders: dict[int, list[str]] | None = None
    for vf in vfs:
        dev = read_device(host.sysfs, vf)
        if dev.iommu_group is None:
            continue
        claim = live.get(dev.iommu_group.number)
        if claim is not None:
            reasons.append(f"{vf} is owned by {claim.owner}")
        if holders is None:  # one walk over /proc for all the VFs
            holders = vfio_holders_by_group(Path("/proc"))
        for use in holders.get(dev.iommu_group.number, []):
            reasons.append(f"{vf}: {use}")
    return reasons


def set_vf_count(
    host: Host, pf: PciAddress, count: int, *, force: bool = False
) -> list[PciAddress]:
    """Make `pf` have exactly `count` VFs, driver-less, ready for vfio-pci; returns them."""
    total = total_vfs(host.sysfs, pf)
    if not 0 <= count <= total:
        raise DeviceError(
            f"PCI device {pf} supports 0 to {total} virtual functions, not {count}",
            f"ask for at most {total}",
        )
    base = Path(device_dir(host.sysfs, pf))
    current = int(read_attr(base / "sriov_numvfs"))
    if current == count:
        return virtual_functions(host.sysfs, pf)
    if current:
        old = virtual_functions(host.sysfs, pf)
        reasons = vf_holders(host, old)
        if reasons and not force:
            raise DeviceError(
                f"cannot remove the virtual functions of {pf}: " + "; ".join(reasons),
                "delete those containers or stop those processes, or pass --force",
            )
        host.write(str(base / "sriov_numvfs"), "0")  # the kernel refuses N -> M directly
        _forget(host, old)
    if count:
        autoprobe = base / "sriov_drivers_autoprobe"
        if autoprobe.exists():
            host.write(str(autoprobe), "0")  # no host driver grabs the new VFs
        host.write(str(base / "sriov_numvfs"), str(count))
    return virtual_functions(host.sysfs, pf)


def _forget(host: Host, gone: list[PciAddress]) -> None:
    """VFs that no longer exist have nothing to give back: drop their journal entries
    and claims."""
    from kata_vfio_host.ledger import editing

    names = {str(a) for a in gone}
    with editing(host) as journal:
        groups = {e.group for a, e in journal.devices.items() if a in names}
        for addr in names:
            journal.devices.pop(addr, None)
        for group in groups:
            journal.claims.pop(group, None)
