"""Guest devices the VM itself depends on, which no manifest may take.

The manifest is an annotation: on CRI runtimes it comes from the pod spec, so a tenant
can forge one naming the guest's own devices. Whatever it says, the hook never takes:

- a device on a virtio driver (its own ``driver`` link: virtio-pci). That covers the
  VM's virtio net and block devices and the agent's transport, virtio-vsock or
  virtio-serial, which are virtio devices too;
- a device with a mounted block device anywhere below it (disk, partition, or a
  device-mapper/md device built on them), or one used as swap;
- a device with an interface below it that is a port of a bridge, bond or team (its
  ``master`` link, whatever the master's state), that is up and has an address (IPv4,
  or IPv6 other than link-local: every up interface has one of those), that carries
  IPv4 routes (``/proc/net/route``), or that has a VLAN/macvlan (``upper_*`` link) in
  use by these rules. The host tools judge routes of every table and family over
  netlink; the hook stays with what /proc and /sys give without a library.

Standard library only, and cheap: one read of the mount table, one socket for all
the SIOCGIFADDR ioctls, and only for the devices a manifest matched.
"""

from __future__ import annotations

import errno
import fcntl
import os

from kata_vfio.pci import (
    ClassIndex,
    PciDevice,
    block_devices_below,
    interfaces_below,
    is_vfio_driver,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.blockuse import BlockUsers
    from kata_vfio.types import Ipv4Lookup, StrPath

SIOCGIFADDR = 0x8915  # struct ifreq: char ifr_name[16]; struct sockaddr_in ifr_addr
IFF_UP = 0x1
IPV6_SCOPE_LINK = 0x20
IPV6_SCOPE_HOST = 0x10


def ipv4_address(ifname: str) -> str | None:
    """The interface's IPv4 address by SIOCGIFADDR, None if it has none (or is gone)."""
    # _socket and _struct, the C modules behind `socket` and `struct`: socket.py costs the
    # hook `enum`'s import, struct.py a module of its own; here, not at the top: only a
    # device with a network interface asks
    import _socket
    import _struct

    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        request = _struct.pack("16s16x", ifname.encode()[:15])
        ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENXIO):
            return None
        raise
    finally:
        sock.close()
    return _socket.inet_ntoa(ifreq[20:24])


class VmDependencies:
    """Answers "does the VM depend on this guest device?"; reads the tables it needs once."""

    def __init__(self, sysfs: StrPath, proc: StrPath, ipv4: Ipv4Lookup | None = None) -> None:
        self._sysfs = sysfs
        self._proc = proc
        self._ipv4 = ipv4 or ipv4_address
        self._blocks: BlockUsers | None = None  # made for the first block device
        self._inet6: dict[str, str] | None = None
        self._routes: set[str] | None = None
        self._classes = ClassIndex(sysfs)  # /sys/class/{net,block} resolved once per run

    def reason(self, dev: PciDevice) -> str | None:
        """Why the VM needs `dev` (a few words), or None when a container may have it."""
        if dev.driver is None or is_vfio_driver(dev.driver):
            return None  # no guest driver uses it
        if dev.driver.startswith("virtio"):  # virtio net/blk/vsock/serial/fs: the VM's own
            return f"driver {dev.driver}"
        for name in block_devices_below(self._sysfs, dev.address, self._classes):
            user = self._block_user(name)
            if user is not None:
                return f"block device {name} is {user}"
        for ifname in interfaces_below(self._sysfs, dev.address, self._classes):
            use = self._interface_use(ifname, 0)
            if use is not None:
                return use
        return None

    # -- block devices ------------------------------------------------------------------
    def _block_user(self, name: str) -> str | None:
        if self._blocks is None:  # here, not at the top: a NIC's hook never loads it
            from kata_vfio.blockuse import BlockUsers

            self._blocks = BlockUsers(self._sysfs, self._proc)
        return self._blocks.user(name)

    # -- interfaces ---------------------------------------------------------------------
    def _interface_use(self, ifname: str, depth: int) -> str | None:
        net = os.path.join(self._sysfs, "class/net", ifname)
        if os.path.islink(os.path.join(net, "master")):
            master = os.path.basename(os.readlink(os.path.join(net, "master")))
            return f"interface {ifname} is a member of {master}"
        address = self._address_if_up(ifname)
        if address is not None:
            return f"interface {ifname} is up with address {address}"
        if ifname in self._ipv4_route_interfaces():
            return f"interface {ifname} carries routes"
        try:
            uppers = sorted(e[6:] for e in os.listdir(net) if e.startswith("upper_"))
        except OSError:
            uppers = []
        for upper in uppers if depth < 8 else []:
            use = self._interface_use(upper, depth + 1)
            if use is not None:
                return f"{use} (on {ifname})"
        return None

    def _ipv4_route_interfaces(self) -> set[str]:
        """Interfaces IPv4 routes of the main table go through (``/proc/net/route``:
        "Iface Destination Gateway …", one route a line)."""
        if self._routes is None:
            try:
                with open(os.path.join(self._proc, "net/route"), encoding="ascii") as f:
                    lines = f.read().splitlines()[1:]
            except (OSError, ValueError):
                lines = []
            self._routes = {line.split()[0] for line in lines if line.split()}
        return self._routes

    def _address_if_up(self, ifname: str) -> str | None:
        try:
            with open(
                os.path.join(self._sysfs, "class/net", ifname, "flags"), encoding="ascii"
            ) as f:
                flags = int(f.read().strip(), 16)
        except (OSError, ValueError):
            return None  # not in this network namespace, or gone
        if not flags & IFF_UP:
            return None
        return self._ipv4(ifname) or self._ipv6_addresses().get(ifname)

    def _ipv6_addresses(self) -> dict[str, str]:
        """interface -> an IPv6 address that is not link-local, from /proc/net/if_inet6
        ("address ifindex prefixlen scope flags name", the address as 32 hex digits)."""
        if self._inet6 is None:
            found: dict[str, str] = {}
            try:
                with open(os.path.join(self._proc, "net/if_inet6"), encoding="ascii") as f:
                    lines = f.read().splitlines()
            except OSError:
                lines = []
            for line in lines:
                fields = line.split()
                if len(fields) != 6 or len(fields[0]) != 32:
                    continue
                try:
                    scope = int(fields[3], 16)
                    bytes.fromhex(fields[0])
                except ValueError:
                    continue
                if scope not in (IPV6_SCOPE_LINK, IPV6_SCOPE_HOST):
                    import _socket

                    address = _socket.inet_ntop(_socket.AF_INET6, bytes.fromhex(fields[0]))
                    found.setdefault(fields[5], address)
            self._inet6 = found
        return self._inet6
