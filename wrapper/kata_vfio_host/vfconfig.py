"""Network VF settings a container asks for: ``io.kata-vfio.vf-config``.

``0000:3b:02.1 mac=52:54:00:12:34:56 vlan=100`` (entries separated by ``;``): the MAC
and VLAN of an SR-IOV network VF are properties of its PF, set over netlink
(``ip link set PF vf N mac … vlan …``) before the VF goes to the VM, so the guest
sees the MAC and the hook can tell identical VFs apart by it. The values the PF had
are written to the ledger first and set again when the container is gone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kata_vfio.defaults import VF_CONFIG_ANNOTATION
from kata_vfio.errors import DeviceError
from kata_vfio.pci import PciAddress, interfaces_below, parse_mac, read_device
from kata_vfio.value import Value


class VfSetting(Value):
    vf: PciAddress
    mac: str | None
    vlan: int | None


class VfPort(Value):
    """Where a VF's settings live: its PF's interface and the VF's index there."""

    pf_interface: str
    vf_index: int


def _mac(text: str, whole: str) -> str:
    mac = parse_mac(text)
    if mac is None or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":  # that clears
        raise DeviceError(
            f"{VF_CONFIG_ANNOTATION}: {text!r} in {whole!r} is not a unicast MAC",
            "write mac=52:54:00:12:34:56",
        )
    return mac


def parse_vf_config(text: str) -> list[VfSetting]:
    settings = []
    for entry in (e.strip() for e in text.replace("\n", ";").split(";")):
        if not entry:
            continue
        fields = entry.split()
        addr = PciAddress.parse(fields[0])
        mac = vlan = None
        for field in fields[1:]:
            key, eq, value = field.partition("=")
            if key == "mac" and eq:
                mac = _mac(value, entry)
            elif (
                key == "vlan"
                and eq
                and value.isascii()
                and value.isdigit()
                and len(value) <= 4
                and int(value) <= 4095
            ):
                vlan = int(value)
            else:
                raise DeviceError(
                    f"{VF_CONFIG_ANNOTATION}: {field!r} in {entry!r} is not "
                    "mac=XX:XX:XX:XX:XX:XX or vlan=0..4095",
                    "e.g. 0000:3b:02.1 mac=52:54:00:12:34:56 vlan=100",
                )
        if mac is None and vlan is None:
            raise DeviceError(
                f"{VF_CONFIG_ANNOTATION}: {entry!r} sets nothing", "give mac=… and/or vlan=…"
            )
        settings.append(VfSetting(addr, mac, vlan))
    if not settings:
        raise DeviceError(
            f"annotation {VF_CONFIG_ANNOTATION} is empty",
            "e.g. 0000:3b:02.1 mac=52:54:00:12:34:56 vlan=100",
        )
    return settings


def vf_port(sysfs: Path, vf: PciAddress) -> VfPort:
    dev = read_device(sysfs, vf)
    if dev.physfn is None:
        raise DeviceError(
            f"{VF_CONFIG_ANNOTATION}: {vf} is not an SR-IOV virtual function",
            "MAC and VLAN can be set for VFs only",
        )
    from kata_vfio_host.netinfo import vf_index

    index = vf_index(sysfs, dev.physfn, vf)
    interfaces = interfaces_below(sysfs, dev.physfn)
    if index is None or not interfaces:
        raise DeviceError(
            f"{VF_CONFIG_ANNOTATION}: the PF {dev.physfn} of {vf} has no network interface",
            "bind the PF to its network driver first",
        )
    return VfPort(interfaces[0], index)


class Netlink:
    """The PF side over rtnetlink (pyroute2, imported only when a container asks)."""

    def get(self, port: VfPort) -> tuple[str | None, int | None]:
        from pyroute2 import IPRoute

        from kata_vfio_host.netinfo import RTEXT_FILTER_VF, mac_from_link

        with IPRoute() as ipr:
            links = ipr.get_links(ifname=port.pf_interface, ext_mask=RTEXT_FILTER_VF)
        if not links:
            raise DeviceError(f"interface {port.pf_interface} is gone", "check the PF")
        return mac_from_link(links[0], port.vf_index), vlan_from_link(links[0], port.vf_index)

    def set(self, port: VfPort, mac: str | None, vlan: int | None) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        spec: dict[str, Any] = {"vf": port.vf_index}
        if mac is not None:
            spec["mac"] = mac
        if vlan is not None:
            spec["vlan"] = vlan
        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=port.pf_interface)
                if not index:
                    raise DeviceError(f"interface {port.pf_interface} is gone", "check the PF")
                ipr.link("set", index=index[0], vf=dict(spec))  # pyroute2 pops keys
        except NetlinkError as exc:
            raise DeviceError(
                f"{port.pf_interface} refused VF {port.vf_index} settings {spec}: "
                f"{os.strerror(exc.code)}",
                "does the PF's driver support VF MAC/VLAN (ip link set … vf N mac …)?",
            ) from None


def vlan_from_link(link: Any, index: int) -> int | None:
    from kata_vfio_host.netinfo import vf_attr

    vlan = vf_attr(link, index, "IFLA_VF_VLAN")
    return None if vlan is None else int(vlan.get("vlan", 0))


NetlinkFactory = Callable[[], Any]
