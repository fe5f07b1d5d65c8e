"""MAC addresses of SR-IOV virtual functions, asked of the PF's driver over netlink.

A VF bound to vfio-pci has no netdev on the host; its MAC is what the PF was told
(`ip link set PF vf N mac ...`). The guest hook uses it to tell identical VFs apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata_vfio.pci import PciAddress, device_dir

if TYPE_CHECKING:
    from kata_vfio.types import StrPath

RTEXT_FILTER_VF = 1
_ZERO_MAC = "00:00:00:00:00:00"


def vf_index(sysfs: StrPath, pf: PciAddress, vf: PciAddress) -> int | None:
    """N such that <pf>/virtfnN points at the VF."""
    pf_dir = Path(device_dir(sysfs, pf))
    for name in os.listdir(pf_dir):
        if (
            name.startswith("virtfn")
            and name[6:].isdigit()
            and os.path.basename(os.readlink(pf_dir / name)) == str(vf)
        ):
            return int(name[6:])
    return None


def vf_attr(link: Any, index: int, name: str) -> Any:
    """VF `index`'s attribute `name` (IFLA_VF_MAC, IFLA_VF_VLAN, …) out of an RTM_NEWLINK
    message with VF info; None when the message has none."""
    vfinfo_list = link.get_attr("IFLA_VFINFO_LIST")
    if vfinfo_list is None:
        return None
    for info in vfinfo_list.get_attrs("IFLA_VF_INFO"):
        attr = info.get_attr(name)
        if attr and attr.get("vf") == index:
            return attr
    return None


def mac_from_link(link: Any, index: int) -> str | None:
    """Pick VF `index`'s MAC out of an RTM_NEWLINK message with VF info."""
    mac = vf_attr(link, index, "IFLA_VF_MAC")
    if mac is None:
        return None
    text = str(mac.get("mac", "")).lower()[:17]
    return text if text and text != _ZERO_MAC else None


def vf_mac(sysfs: StrPath, vf: PciAddress, pf: PciAddress) -> str | None:
    """The VF's administratively set MAC, or None when it cannot be known."""
    index = vf_index(sysfs, pf, vf)
    net = Path(device_dir(sysfs, pf)) / "net"
    if index is None or not net.is_dir():
        return None
    interfaces = sorted(os.listdir(net))
    if not interfaces:
        return None
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            links = ipr.get_links(ifname=interfaces[0], ext_mask=RTEXT_FILTER_VF)
    except Exception:  # an interface that vanished, a netlink error: no MAC to offer
        return None
    return mac_from_link(links[0], index) if links else None
