"""Planning a bind: which devices of a group move to vfio-pci, which an auto-bind may take.

Nothing here changes the host: it reads sysfs and the admin's allow-list (bindings.py
applies the plan).
"""

from __future__ import annotations

from kata_vfio.pci import (
    IommuGroup,
    PciAddress,
    PciDevice,
    group_members,
    group_of,
    is_vfio_driver,
    read_device,
)

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `kata-vfio create` avoids importing typing
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.types import StrPath
    from kata_vfio_host.ledger import Host


def endpoints(host: Host, addr: PciAddress) -> tuple[IommuGroup, list[PciDevice]]:
    """The device's group and every non-bridge member of it (all must go together)."""
    group = group_of(host.sysfs, addr)
    members = [read_device(host.sysfs, m) for m in group_members(host.sysfs, group)]
    return group, [d for d in members if not d.is_bridge]


if TYPE_CHECKING:
    from kata_vfio.types import GroupPlan, Movable  # noqa: F401  (the plan's shapes)


# --- a container's create: the allow-list, auto-bind, claims -----------------------------


def allowed(patterns: tuple[str, ...], dev: PciDevice) -> bool:
    from kata_vfio_host.allowlist import parse_allow_list

    return any(rule.matches(dev) for rule in parse_allow_list(patterns))


def plan_bind(sysfs: StrPath, addr: Any) -> tuple[Any, list[Any]]:
    """addr's IOMMU group and the members a bind moves: every endpoint not on a vfio
    driver yet (bridges stay where they are)."""
    from kata_vfio.pci import group_members, group_of, read_device

    group = group_of(sysfs, addr)
    members = [read_device(sysfs, m) for m in group_members(sysfs, group)]
    return group, [d for d in members if not d.is_bridge and not is_vfio_driver(d.driver)]
