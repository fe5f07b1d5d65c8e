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
from typing import TYPE_CHECKING, Any

from kata_vfio.pci import PciAddress, block_devices_below, interfaces_below, read_device
from kata_vfio.value import Value

if TYPE_CHECKING:
    from collections.abc import Callable

    from kata_vfio.types import StrPath

IFF_UP = 0x1
RT_TABLE_LOCAL = 255  # the kernel's own local/broadcast/multicast routes of every address
RTPROT_KERNEL = 2  # routes the kernel made for an address (its prefix, fe80::/64)
IPV6_LINK_LOCAL = "fe80:"
# kinds stacked on a lower device by IFLA_LINK (a veth's IFLA_LINK is its peer: not one)
UPPER_KINDS = frozenset({"vlan", "macvlan", "macvtap", "ipvlan", "ipvtap"})
OVS_MASTER = "ovs-system"


class Link(Value):
    """What the in-use rules need of one interface (one RTM_NEWLINK)."""

    index: int
    name: str
    kind: str = ""  # IFLA_INFO_KIND: bridge, bond, team, openvswitch, vlan, veth, ""
    up: bool = False  # IFF_UP, the administrative state
    master: int = 0  # IFLA_MASTER: the bridge/bond/team/OVS datapath it is a port of
    lower: int = 0  # IFLA_LINK within this namespace (0 for another namespace's)


class NetView(Value):
    """One namespace's links, addresses (per index, IPv6 link-local left out) and routes
    (the output interfaces of each route that is neither the local table's nor the
    kernel's own for an address)."""

    links: dict[int, Link]
    addresses: dict[int, list[str]]
    routes: dict[int, list[str]]

    def by_name(self, ifname: str) -> Link | None:
        return next((link for link in self.links.values() if link.name == ifname), None)

    def uses(self, ifname: str) -> list[str]:
        link = self.by_name(ifname)
        return [] if link is None else self._uses(link, 0)

    def _uses(self, link: Link, depth: int) -> list[str]:
        reasons = []
        name = link.name
        master = self.links.get(link.master) if link.master else None
        if link.master:
            # Conservative: a port is in use whatever its master's state. Taking it changes
            # the bridge/bond the admin built (a down bond comes back up without it), and an
            # Open vSwitch port's master ovs-system is always down while it switches.
            if master is not None and (master.name == OVS_MASTER or master.kind == "openvswitch"):
                reasons.append(f"interface {name} is an Open vSwitch port")
            elif master is not None:
                kind = f"{master.kind} " if master.kind else ""
                state = "up" if master.up else f"down (ip link set {name} nomaster frees it)"
                reasons.append(
                    f"interface {name} is a member of {kind}{master.name}, which is {state}"
                )
            else:
                reasons.append(f"interface {name} is a member of interface {link.master}")
        addresses = self.addresses.get(link.index, [])
        if link.up and addresses:
            reasons.append(f"interface {name} is up with addresses {', '.join(addresses)}")
        routes = self.routes.get(link.index, [])
        if routes:
            shown = ", ".join(routes[:3]) + (", …" if len(routes) > 3 else "")
            reasons.append(f"interface {name} carries routes ({shown})")
        if depth < 8:
            for upper in sorted(self.links.values(), key=lambda u: u.name):
                if upper.lower == link.index and upper.kind in UPPER_KINDS:
                    reasons += [
                        f"{reason} ({upper.kind} on {name})"
                        for reason in self._uses(upper, depth + 1)
                    ]
        return reasons


def read_net_view(ipr: Any) -> NetView:
    """One dump each of links, addresses and routes (every table, both families)."""
    links = {}
    for msg in ipr.get_links():
        info = msg.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
        same_ns = msg.get_attr("IFLA_LINK_NETNSID") is None
        links[msg["index"]] = Link(
            index=msg["index"],
            name=msg.get_attr("IFLA_IFNAME") or "",
            kind=kind,
            up=bool(msg["flags"] & IFF_UP),
            master=msg.get_attr("IFLA_MASTER") or 0,
            lower=(msg.get_attr("IFLA_LINK") or 0) if same_ns else 0,
        )
    addresses: dict[int, list[str]] = {}
    for msg in ipr.get_addr():
        address = msg.get_attr("IFA_ADDRESS") or ""
        if address and not address.lower().startswith(IPV6_LINK_LOCAL):
            addresses.setdefault(msg["index"], []).append(address)
    routes: dict[int, list[str]] = {}
    for msg in ipr.get_routes():  # family 255: both families, every table
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if table == RT_TABLE_LOCAL or msg["proto"] == RTPROT_KERNEL:
            continue
        dst = msg.get_attr("RTA_DST")
        text = f"{dst}/{msg['dst_len']}" if dst else "default"
        oifs = {msg.get_attr("RTA_OIF")}
        for hop in msg.get_attr("RTA_MULTIPATH") or []:  # each nexthop of an ECMP route
            oifs.add(hop["oif"])
        for oif in oifs - {None, 0}:
            routes.setdefault(oif, []).append(text)
    return NetView(links, addresses, routes)


def network_uses(ifname: str, ipr: Any = None) -> list[str]:
    """Why interface `ifname` is in use, each one phrase; [] when it is free to move.

    In use: a port of a bridge, bond or team (up or down: conservative, see NetView),
    an Open vSwitch port; up with an address other than IPv6 link-local (every up
    interface has one of those: alone it carries nothing of the host's); a route in any
    table through it, also as one nexthop of several (dpdk-devbind refuses those too),
    the kernel's own routes of its addresses aside (the address rule judges them);
    a VLAN/macvlan/ipvlan on it that is in use by these rules. A down interface with
    addresses carries nothing. `ipr`: an IPRoute of the namespace to look in (default:
    this process's)."""
    if ipr is not None:
        return read_net_view(ipr).uses(ifname)
    from pyroute2 import IPRoute

    with IPRoute() as own:
        return read_net_view(own).uses(ifname)


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
            number = link[len("/dev/vfio/") :] if link.startswith("/dev/vfio/") else ""
            if number.isdigit():
                found.setdefault(int(number), []).append(
                    f"{link} is open in process {p.info['pid']} ({p.info['name']})"
                )
    return found


def vfio_holders(proc: Path, group: int) -> list[str]:
    """Processes with /dev/vfio/<group> open."""
    return vfio_holders_by_group(proc).get(group, [])


def use_checker(sysfs: StrPath, proc: Path) -> Callable[[PciAddress], list[str]]:
    """`uses` for the devices of one command (a bind of many, a listing): the walk over
    every process's open files is done once, at the first device in an IOMMU group,
    instead of once per device (and again under the group locks)."""
    holders: dict[int, list[str]] | None = None
    net: NetView | None = None

    def check(addr: PciAddress) -> list[str]:
        nonlocal holders, net
        dev = read_device(sysfs, addr)
        reasons = []
        # anywhere below the function: a virtio NIC's interface is <function>/virtio2/net/eth0
        for ifname in interfaces_below(sysfs, addr):
            if net is None:
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    net = read_net_view(ipr)
            reasons += net.uses(ifname)
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
