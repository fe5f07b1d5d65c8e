"""Is a host device in use? Network (pyroute2), block devices (mounted, swap, under dm/md:
kata_vfio.blockuse), open VFIO groups (psutil).

Interfaces and disks count wherever they sit below the PCI function: virtio puts them
one device further down (``<function>/virtio2/net/eth0``, ``…/virtio3/block/vda``).

A device in use is refused by `kata-vfio-ctl bind` unless --force: unbinding a NIC
that carries addresses or routes cuts the host off, and unbinding a busy driver can
hang. Each reason is one phrase naming what uses the device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kata_vfio.pci import PciAddress, block_devices_below, interfaces_below, read_device

if TYPE_CHECKING:
    from collections.abc import Callable

    from kata_vfio.pci import StrPath

IFF_UP = 0x1


def network_uses(ifname: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        indexes = ipr.link_lookup(ifname=ifname)
        if not indexes:
            return []
        index = indexes[0]
        link = ipr.get_links(index)[0]
        reasons = []
        master = link.get_attr("IFLA_MASTER")
        if master:
            master_name = ipr.get_links(master)[0].get_attr("IFLA_IFNAME")
            reasons.append(f"interface {ifname} is a member of {master_name}")
        if link["flags"] & IFF_UP:
            addresses = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)]
            if addresses:
                reasons.append(f"interface {ifname} is up with addresses {', '.join(addresses)}")
            routes = [r for r in ipr.get_routes(oif=index) if r.get_attr("RTA_TABLE") != 255]
            if routes and not addresses:
                reasons.append(f"interface {ifname} is up and carries routes")
        return reasons


def block_uses(sysfs: StrPath, proc: Path, addr: PciAddress) -> list[str]:
    """The disks and partitions below the function that are mounted, active swap, or
    held by a device-mapper/md device (LVM, dm-crypt, RAID: SPDK's setup.sh refuses
    those too), each one phrase."""
    from kata_vfio.blockuse import BlockUsers

    users = BlockUsers(sysfs, proc)
    reasons = []
    for name in block_devices_below(sysfs, addr):
        user = users.user(name, any_holder=True)
        if user is not None:
            reasons.append(f"block device /dev/{name} is {user}")
    return reasons


def vfio_holders_by_group(proc: Path) -> dict[int, list[str]]:
    """Every process with a /dev/vfio/<N> open, per group N: one walk over every
    process's open files (the costly part of `uses`, a readlink per descriptor)."""
    import psutil

    found: dict[int, list[str]] = {}
    for p in psutil.process_iter(["pid", "name"]):
        fd_dir = proc / str(p.info["pid"]) / "fd"
        try:
            links = {os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}
        except OSError:
            continue
        for link in sorted(links):
            number = link[len("/dev/vfio/"):] if link.startswith("/dev/vfio/") else ""
            if number.isdigit():
                found.setdefault(int(number), []).append(
                    f"{link} is open in process {p.info['pid']} ({p.info['name']})")
    return found


def vfio_holders(proc: Path, group: int) -> list[str]:
    """Processes with /dev/vfio/<group> open."""
    return vfio_holders_by_group(proc).get(group, [])


def use_checker(sysfs: StrPath, proc: Path) -> Callable[[PciAddress], list[str]]:
    """`uses` for the devices of one command (a bind of many, a listing): the walk over
    every process's open files is done once, at the first device in an IOMMU group,
    instead of once per device (and again under the group locks)."""
    holders: dict[int, list[str]] | None = None

    def check(addr: PciAddress) -> list[str]:
        nonlocal holders
        dev = read_device(sysfs, addr)
        reasons = []
        # anywhere below the function: a virtio NIC's interface is <function>/virtio2/net/eth0
        for ifname in interfaces_below(sysfs, addr):
            reasons += network_uses(ifname)
        reasons += block_uses(sysfs, proc, addr)
        if dev.iommu_group is not None:
            if holders is None:
                holders = vfio_holders_by_group(proc)
            reasons += holders.get(dev.iommu_group.number, [])
        return reasons

    return check


def uses(sysfs: StrPath, proc: Path, addr: PciAddress) -> list[str]:
    """Everything that uses the device; empty when it is free to move."""
    return use_checker(sysfs, proc)(addr)
