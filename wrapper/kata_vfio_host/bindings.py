"""Handing host devices to vfio-pci and back, safely and crash-safely.

Every change is journalled before sysfs is touched: `<state_dir>/bindings.json`
records, per device, the driver and driver_override to give back and who asked
(the admin through kata-vfio-ctl, or a container). A process killed at any step
leaves a journal that `restore_all` (kata-vfio-ctl restore --all, and the wrapper's
next create) acts on. One flock per IOMMU group serialises containers racing for
the same devices; the journal lock serialises journal updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_vfio.errors import DeviceError
from kata_vfio.pci import (
    VFIO_PCI,
    IommuGroup,
    PciAddress,
    group_members,
    group_of,
    is_vfio_driver,
    read_device,
    vfio_group_class_dir,
)
from kata_vfio.rebind import MODPROBE, SysfsWrite, bind_to, give_back, load_vfio_pci, write_attr

ADMIN = "kata-vfio-ctl"


@dataclass(frozen=True)
class Host:
    """The host's kernel interfaces and kata-vfio's state directory."""

    sysfs: Path
    state_dir: Path
    write: SysfsWrite = write_attr
    modprobe: tuple[str, ...] = MODPROBE

    @property
    def journal(self) -> Path:
        return self.state_dir / "bindings.json"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def group_lock(host: Host, group: IommuGroup) -> contextlib.AbstractContextManager[None]:
    return _flock(host.state_dir / "locks" / f"group-{group}")


def read_journal(host: Host) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(host.journal.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise DeviceError(f"{host.journal} is damaged",
                          "check it by hand; it records which drivers to give devices back to"
                          ) from None
    return dict(data.get("devices", {}))


def _write_journal(host: Host, devices: dict[str, dict[str, Any]]) -> None:
    from kata_vfio_runtime.spec_edit import write_atomically

    host.state_dir.mkdir(parents=True, exist_ok=True)
    if not host.journal.exists():
        host.journal.write_text("{}")
    write_atomically(host.journal, json.dumps({"version": 1, "devices": devices},
                                              indent=1).encode())


def update_journal(host: Host, change: dict[str, dict[str, Any] | None]) -> None:
    """Set (or with None, drop) journal entries, under the journal lock."""
    with _flock(host.state_dir / "journal.lock"):
        devices = read_journal(host)
        for addr, entry in change.items():
            if entry is None:
                devices.pop(addr, None)
            else:
                devices[addr] = entry
        _write_journal(host, devices)


def endpoints(host: Host, addr: PciAddress) -> tuple[IommuGroup, list[PciAddress]]:
    """The device's group and every non-bridge member of it (all must go together)."""
    group = group_of(host.sysfs, addr)
    members = [m for m in group_members(host.sysfs, group)
               if not read_device(host.sysfs, m).is_bridge]
    return group, members


def ensure_vfio_pci(host: Host) -> None:
    if not load_vfio_pci(host.sysfs, host.modprobe):
        raise DeviceError("the vfio-pci driver is not available",
                          "install the kernel's vfio-pci module (modprobe vfio-pci)")


def owner_of(host: Host, group: IommuGroup) -> str | None:
    for entry in read_journal(host).values():
        if entry.get("group") == group.number:
            return str(entry.get("owner"))
    return None


def bind_group(host: Host, addr: PciAddress, owner: str, *, force: bool = False,
               in_use: Any = None) -> IommuGroup:
    """Bind every endpoint of addr's group to vfio-pci, journalled; returns the group.

    `in_use(PciAddress) -> list[str]` names what uses a device; any use refuses the
    bind unless `force`. Another container's devices are refused even with `force`.
    """
    group, members = endpoints(host, addr)
    with group_lock(host, group):
        current = owner_of(host, group)
        if current is not None and current not in (owner, ADMIN):
            raise DeviceError(f"PCI device {addr} (IOMMU group {group}) is in use by {current}",
                              "wait for that container to be deleted")
        devices = [read_device(host.sysfs, m) for m in members]
        to_move = [d for d in devices if not is_vfio_driver(d.driver)]
        entries: dict[str, dict[str, Any] | None] = {
            str(d.address): {"driver": d.driver, "override": d.driver_override,
                             "group": group.number, "owner": owner, "since": time.time()}
            for d in devices}
        if not force and in_use is not None:
            for dev in to_move:
                uses = in_use(dev.address)
                if uses:
                    raise DeviceError(
                        f"PCI device {dev.address} is in use: {'; '.join(uses)}",
                        "stop using it first, or pass --force")
        if not to_move:
            if current is None:  # already on vfio-pci: record ownership only
                update_journal(host, entries)
            return group
        ensure_vfio_pci(host)
        # the intent first: a crash from here on leaves what to give back
        update_journal(host, entries)
        try:
            for dev in to_move:
                bind_to(host.sysfs, dev.address, VFIO_PCI, host.write)
        except Exception:
            restore(host, [d.address for d in devices], owner=None)
            raise
    return group


def wait_for_group_node(host: Host, group: IommuGroup, timeout: float = 5.0) -> Path:
    """/sys/class/vfio/<N> appears when vfio-pci takes the group; udev then makes /dev/vfio/N."""
    deadline = time.monotonic() + timeout
    node = vfio_group_class_dir(host.sysfs, group) / "dev"
    delay = 0.005
    while not node.exists():
        if time.monotonic() > deadline:
            raise DeviceError(f"/dev/vfio/{group} did not appear after binding",
                              "check the kernel log for vfio errors")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return Path("/dev/vfio") / str(group)


def restore(host: Host, addresses: list[PciAddress], owner: str | None = None) -> list[str]:
    """Give journalled devices back to their recorded drivers; returns what was restored.

    With `owner`, only that owner's entries. Unknown addresses are an error.
    """
    journal = read_journal(host)
    done = []
    for addr in addresses:
        entry = journal.get(str(addr))
        if entry is None:
            raise DeviceError(f"PCI device {addr} was not bound by kata-vfio",
                              "see the journal: kata-vfio-ctl devices --json")
        if owner is not None and entry.get("owner") != owner:
            continue
        driver = entry.get("driver")
        if not is_vfio_driver(driver):
            give_back(host.sysfs, addr, driver, entry.get("override"), host.write)
        update_journal(host, {str(addr): None})
        done.append(str(addr))
    return done


def restore_all(host: Host, owner: str | None = None) -> list[str]:
    entries = read_journal(host)
    addresses = [PciAddress.parse(a) for a, e in entries.items()
                 if owner is None or e.get("owner") == owner]
    return restore(host, addresses, owner)
