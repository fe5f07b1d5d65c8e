"""What the device plugin offers: resources from config.toml, one unit per IOMMU group.

A resource (``[[device_plugin.resource]]``) matches PCI functions by ``select``
(VENDOR:DEVICE[:CLASS], io.kata-vfio.select's parser) and/or ``devices`` (address globs,
[autobind] allow's parser); both given, a function must match both. A unit is one IOMMU
group, named by its first endpoint's address (stable across reboots). A group is offered
only when every endpoint matches, it holds no PF whose VFs exist (they would go with it)
and no endpoint is in use by the host (an interface with addresses, a mounted disk, ...:
the `bind` command's checks); otherwise one log line says why.

Health, read on every poll: a unit is Unhealthy when an endpoint is gone, sits on a
host driver while the host uses it, or the group is held by a live owner that is neither
one of our allocations nor the container that took one over.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kata_vfio.errors import ConfigError, DeviceError
from kata_vfio.pci import (
    PCI_STUB,
    IommuGroup,
    PciAddress,
    PciDevice,
    device_dir,
    group_members,
    is_vfio_driver,
    list_addresses,
    read_device,
    read_link,
)
from kata_vfio.value import Value
from kata_vfio_host.allocate import SelectRequest, parse_select
from kata_vfio_host.allowlist import AllowRule, parse_rule
from kata_vfio_host.owners import KUBERNETES_ALLOCATION as ALLOCATION_PREFIX

DOMAIN = "kata-vfio.io"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


class Resource(Value):
    name: str
    select: SelectRequest | None
    globs: tuple[AllowRule, ...]
    cdi: bool = False

    @property
    def resource_name(self) -> str:
        return f"{DOMAIN}/{self.name}"

    @property
    def env_name(self) -> str:
        return "PCIDEVICE_KATA_VFIO_IO_" + re.sub(r"[^A-Z0-9]", "_", self.name.upper())

    @property
    def socket_name(self) -> str:
        return f"kata-vfio-{self.name}.sock"

    def matches(self, dev: PciDevice) -> bool:
        if self.select is not None and not self.select.matches(dev):
            return False
        return not self.globs or any(rule.matches(dev) for rule in self.globs)


def resources_from_settings(tables: tuple[dict[str, Any], ...]) -> list[Resource]:
    """The settings' [[device_plugin.resource]] (checked at load) as Resources."""
    if not tables:
        raise ConfigError(
            "config.toml has no [[device_plugin.resource]]",
            'add one: [[device_plugin.resource]] name = "nvme" select = "1b36:0010"',
        )
    return [
        Resource(
            t["name"],
            parse_select(t["select"])[0] if t.get("select") else None,
            tuple(parse_rule(p) for p in t.get("devices", ())),
            bool(t.get("cdi")),
        )
        for t in tables
    ]


class Unit(Value):
    id: str  # the group's first endpoint address
    group: IommuGroup
    endpoints: tuple[PciAddress, ...]
    numa_node: int | None
    pf: PciAddress | None  # the PF of the first endpoint, for VFs


def numa_node(sysfs: str, addr: PciAddress) -> int | None:
    try:
        with open(os.path.join(device_dir(sysfs, addr), "numa_node")) as f:
            node = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _has_vfs(sysfs: str, addr: PciAddress) -> bool:
    try:
        return any(n.startswith("virtfn") for n in os.listdir(device_dir(sysfs, addr)))
    except OSError:
        return False


def layout_key(sysfs: str) -> tuple[tuple[str, str | None], ...]:
    """What decides the units: each function and its IOMMU group (cheap to read)."""
    root = os.path.join(sysfs, "bus/pci/devices")
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return ()
    return tuple((n, read_link(os.path.join(root, n, "iommu_group"))) for n in names)


def survey(
    sysfs: str, resources: list[Resource], in_use: Callable[[PciAddress], list[str]]
) -> tuple[dict[str, list[Unit]], list[str]]:
    """The units of each resource, and one line per group left out saying why."""
    devices: dict[PciAddress, PciDevice] = {}
    for addr in list_addresses(sysfs):
        try:
            devices[addr] = read_device(sysfs, addr)
        except DeviceError:
            continue  # gone while listing
    groups: dict[IommuGroup, list[PciDevice]] = {}
    for dev in devices.values():
        if dev.iommu_group is not None:
            groups.setdefault(dev.iommu_group, [])
    for group in groups:
        try:
            members = group_members(sysfs, group)
        except DeviceError:
            continue
        groups[group] = [devices[m] for m in members if m in devices]
    units: dict[str, list[Unit]] = {r.name: [] for r in resources}
    skipped: list[str] = []
    for group in sorted(groups):
        endpoints = [d for d in groups[group] if not d.is_bridge]
        for resource in resources:
            if not endpoints or not any(resource.matches(d) for d in endpoints):
                continue
            why = _why_not_offered(sysfs, resource, endpoints, in_use)
            if why is not None:
                skipped.append(
                    f"IOMMU group {group} not offered as {resource.resource_name}: {why}"
                )
                continue
            first = endpoints[0]
            units[resource.name].append(
                Unit(
                    str(first.address),
                    group,
                    tuple(d.address for d in endpoints),
                    numa_node(sysfs, first.address),
                    first.physfn,
                )
            )
    return units, skipped


def _why_not_offered(
    sysfs: str,
    resource: Resource,
    endpoints: list[PciDevice],
    in_use: Callable[[PciAddress], list[str]],
) -> str | None:
    for dev in endpoints:
        if not resource.matches(dev):
            return f"{dev.address} [{dev.ids}] in the same group does not match"
        if _has_vfs(sysfs, dev.address):
            return f"{dev.address} provides virtual functions (they would go with it)"
    for dev in endpoints:
        if dev.driver is not None and not is_vfio_driver(dev.driver):
            uses = in_use(dev.address)
            if uses:
                return f"the host uses {dev.address}: {'; '.join(uses)}"
    return None


@dataclass
class HealthCheck:
    """Health of units, polled often: sysfs links and the ledger's claims only; the
    costly in-use check runs for a device on a host driver, at most every `recheck` s."""

    sysfs: str
    in_use: Callable[[PciAddress], list[str]]
    recheck: float = 10.0
    _uses: dict[tuple[PciAddress, str], tuple[float, bool]] = field(default_factory=dict)

    def _host_uses(self, addr: PciAddress, driver: str) -> bool:
        now = time.monotonic()
        known = self._uses.get((addr, driver))
        if known is None or now - known[0] > self.recheck:
            known = (now, bool(self.in_use(addr)))
            self._uses[(addr, driver)] = known
        return known[1]

    def health(self, unit: Unit, holder: str | None, ours: bool) -> str:
        """`holder`: the container id with a live claim on the group; `ours`: the group
        belongs to one of our allocations."""
        for addr in unit.endpoints:
            base = device_dir(self.sysfs, addr)
            if not os.path.isdir(base):
                return UNHEALTHY
            link = read_link(os.path.join(base, "driver"))
            driver = os.path.basename(link) if link else None
            if (
                driver is not None
                and not is_vfio_driver(driver)
                and driver != PCI_STUB
                and self._host_uses(addr, driver)
            ):
                return UNHEALTHY
        if holder is not None and not ours and not holder.startswith(ALLOCATION_PREFIX):
            return UNHEALTHY
        return HEALTHY


def preferred(
    units: dict[str, Unit], available: list[str], must_include: list[str], size: int
) -> list[str]:
    """GetPreferredAllocation's rule: every must_include device first; then devices of the
    PFs already chosen, in address order; then of the PF with the most available devices
    (ties: lower PF address), and so on; devices without a PF (each its own) last, in
    address order. So a request fits in as few PFs as the free devices allow."""
    chosen = [d for d in dict.fromkeys(must_include) if d in units][:size]
    left = [d for d in available if d in units and d not in chosen]
    by_pf: dict[str, list[str]] = {}
    loose: list[str] = []
    for dev in sorted(left, key=PciAddress.parse):
        parent = units[dev].pf
        if parent is None:
            loose.append(dev)
        else:
            by_pf.setdefault(str(parent), []).append(dev)
    used_pfs = [str(units[d].pf) for d in chosen if units[d].pf is not None]
    order = list(dict.fromkeys(p for p in used_pfs if p in by_pf))
    order += sorted(
        (p for p in by_pf if p not in order), key=lambda p: (-len(by_pf[p]), PciAddress.parse(p))
    )
    for pf in order:
        chosen += by_pf[pf][: size - len(chosen)]
    chosen += loose[: size - len(chosen)]
    return chosen[:size]
