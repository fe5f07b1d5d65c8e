"""Auto-bind on create, restore on delete: devices asked for by address that the host
has not yet handed to vfio-pci are bound for the container, if the admin allows it.

Annotations are untrusted (on CRI-O they come from pod specs), so the default is
deny: config.toml's ``[autobind] allow`` lists address globs (``0000:03:*``) or
``VENDOR:DEVICE`` patterns (``8086:10d3``, ``15b3:*``), and every endpoint of the
device's IOMMU group must match. A marker ``<state_dir>/containers/<id>`` is
written before anything else, so the runtime's `delete` (which podman also calls
after a failed create) knows to give the devices back.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from kata_vfio.errors import DeviceError
from kata_vfio.manifest import DEVICES_ANNOTATION
from kata_vfio.pci import PciAddress, read_device, usable_by_vfio
from kata_vfio_host.bindings import (
    ADMIN,
    Host,
    bind_group,
    endpoints,
    owner_of,
    restore_all,
)


def owner_name(container_id: str) -> str:
    return f"container {container_id}"


def marker(state_dir: Path, container_id: str) -> Path:
    if not container_id or "/" in container_id or container_id.startswith("."):
        raise DeviceError(f"container id {container_id!r} cannot name a state file",
                          "use a plain container id")
    return state_dir / "containers" / container_id


def allowed(patterns: tuple[str, ...], addr: PciAddress, vendor: int, device: int) -> bool:
    for pattern in patterns:
        p = pattern.lower()
        if p.count(":") == 1:  # VENDOR:DEVICE, parts hex or *
            v, d = p.split(":")
            if fnmatch.fnmatch(f"{vendor:04x}", v or "*") and fnmatch.fnmatch(f"{device:04x}",
                                                                               d or "*"):
                return True
        elif fnmatch.fnmatch(str(addr), p):
            return True
    return False


def autobind(spec: dict[str, Any], host: Host, patterns: tuple[str, ...],
             container_id: str, in_use: Any = None) -> list[PciAddress]:
    """Bind what the annotation asks for and the allow-list permits; returns the bound."""
    from kata_vfio_runtime.spec_edit import parse_address_list

    wanted = (spec.get("annotations") or {}).get(DEVICES_ANNOTATION)
    if wanted is None:
        return []
    todo = []
    for addr in parse_address_list(wanted):
        group, members = endpoints(host, addr)
        current = owner_of(host, group)
        if current not in (None, ADMIN, owner_name(container_id)):
            raise DeviceError(f"PCI device {addr} (IOMMU group {group}) is in use by {current}",
                              "wait for that container to be deleted")
        devices = [read_device(host.sysfs, m) for m in members]
        if all(usable_by_vfio(d) for d in devices):
            continue
        for dev in devices:
            if not allowed(patterns, dev.address, dev.vendor, dev.device):
                raise DeviceError(
                    f"PCI device {dev.address} [{dev.ids}] in IOMMU group {group} is bound to "
                    f"{dev.driver} and not in the auto-bind allow-list",
                    f"bind it first (kata-vfio-ctl bind {dev.address}) or allow it in "
                    "[autobind] allow of config.toml")
        todo.append(addr)
    if not todo:
        return []
    mark = marker(host.state_dir, container_id)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(owner_name(container_id) + "\n")
    done = []
    try:
        for addr in todo:
            bind_group(host, addr, owner_name(container_id), in_use=in_use)
            done.append(addr)
    except BaseException:
        release(host, container_id)
        raise
    return done


def release(host: Host, container_id: str) -> list[str]:
    """Give back everything bound for the container and drop its marker."""
    restored = restore_all(host, owner_name(container_id))
    try:
        os.unlink(marker(host.state_dir, container_id))
    except FileNotFoundError:
        pass
    return restored
