"""Giving devices back to the drivers they had, and a container's devices when it is gone.

Giving back never stops at the first failure: each device is tried, each failure reported
(`RestoreReport`). `restore_all` acts on whatever a killed process left in the journal;
`release_container` is what a container's delete calls, whatever engine started it.
"""

from __future__ import annotations

import os

from kata_vfio.errors import KataVfioError
from kata_vfio.pci import IommuGroup, PciAddress, device_dir, is_vfio_driver, read_link
from kata_vfio.rebind import give_back
from kata_vfio.threads import in_threads
from kata_vfio_host.ledger import (
    ContainerId,
    DeviceEntry,
    Host,
    Journal,
    _vf_group,
    earlier_boot,
    editing,
    group_locks,
    marker,
    read_journal_file,
)
from kata_vfio_host.owners import KUBERNETES_ALLOCATION, claim_gone

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `kata-vfio create` avoids importing typing
if TYPE_CHECKING:
    from typing import Any


class RestoreReport:
    def __init__(self) -> None:
        self.restored: list[str] = []
        self.failed: list[str] = []  # one line each: address and why
        self.vf_settings: list[str] = []  # PF values set again, one line each
        self.taken: list[str] = []  # with force: live containers whose claims were dropped
        # records of an earlier boot dropped with nothing done: the reboot ended those binds
        self.forgotten: list[str] = []
        self.forgotten_devices: list[str] = []  # their addresses

    def extend(self, other: RestoreReport) -> None:
        self.restored += other.restored
        self.failed += other.failed
        self.vf_settings += other.vf_settings
        self.taken += other.taken
        self.forgotten += other.forgotten
        self.forgotten_devices += other.forgotten_devices


def live_holders(host: Host, journal: Journal) -> dict[int, str]:
    """IOMMU group number -> the live container that holds it."""
    return {g: c.owner for g, c in journal.claims.items() if not claim_gone(host, c)}


def _held(addr: object, group: int, holder: str) -> str:
    if holder.startswith("container " + KUBERNETES_ALLOCATION):  # no container, no VM yet
        return (
            f"{addr}: IOMMU group {group} is held by Kubernetes allocation "
            f"{holder.split(' ', 1)[1]} (kata-vfio-ctl device-plugin) for a pod whose "
            "container has not taken it: the plugin gives it back once the kubelet no "
            "longer lists the pod; or pass --force to take it (its claim is dropped)"
        )
    return (
        f"{addr}: IOMMU group {group} is held by live {holder}: giving it back would pull "
        "it out of that container's VM; delete the container first, or pass --force to "
        "take it (its claim is dropped)"
    )


def _entry_groups(host: Host, addresses: list[PciAddress]) -> list[IommuGroup]:
    journal = read_journal_file(host)
    return [
        IommuGroup(e.group) for a in addresses if (e := journal.devices.get(str(a))) is not None
    ]


def restore(
    host: Host,
    addresses: list[PciAddress],
    owner: str | None = None,
    *,
    force: bool = False,
    groups: list[IommuGroup] | None = None,
) -> RestoreReport:
    """See `_restore_locked`: under the groups' locks, as a claim is made (a create taking
    over the group waits until the devices are back, and sees them back). `groups`: the
    groups the devices' entries are in, when the caller knows them (only those groups'
    ledger files are read)."""
    if groups is None:
        groups = _entry_groups(host, addresses)
    with group_locks(host, groups):
        return _restore_locked(
            host, addresses, owner, force=force, groups={g.number for g in groups}
        )


def _restore_locked(
    host: Host,
    addresses: list[PciAddress],
    owner: str | None = None,
    *,
    force: bool = False,
    groups: set[int] | None = None,
) -> RestoreReport:
    """Give journalled devices back to their recorded drivers, each on its own: a device
    that fails is reported and keeps its entry; the others go on. With `owner`, only
    that owner's entries. A device that no longer exists has nothing to give back.
    Without `owner` (the admin's restore) a device whose group a live container holds is
    refused, unless `force`: then it goes back and that container's claim is dropped.

    The kernel work runs concurrently, as a bind's does (vfio-pci wakes each device from
    D3hot on the way out: a 10 ms sleep per device); the entries of the devices given
    back leave the journal in one write at the end. A process killed before it leaves
    entries that the next restore gives back again, which changes nothing for a device
    already on its driver; an entry rewritten meanwhile by another owner stays."""
    report = RestoreReport()
    journal = read_journal_file(host, groups=groups)
    held = live_holders(host, journal) if owner is None else {}
    taken: dict[int, str] = {}
    outcome: list[tuple[PciAddress, DeviceEntry | None]] = []
    forgotten: list[tuple[PciAddress, DeviceEntry]] = []
    for addr in dict.fromkeys(addresses):  # each once: two threads must not race on one
        entry = journal.devices.get(str(addr))
        if entry is not None and earlier_boot(host, entry.boot_id):
            if owner is None or entry.owner == owner:
                forgotten.append((addr, entry))  # the reboot gave it back: nothing to do
            continue
        if entry is not None and entry.group in held:
            if not force:
                report.failed.append(_held(addr, entry.group, held[entry.group]))
                continue
            taken[entry.group] = held[entry.group]
        if entry is None or owner is None or entry.owner == owner:
            outcome.append((addr, entry))
    work = [(addr, entry) for addr, entry in outcome if entry is not None]
    given = in_threads(work, lambda w: _give_back_one(host, w), GIVE_BACK_THREADS)
    reasons = dict(zip([a for a, _ in work], given, strict=True))
    done = []
    for addr, entry in outcome:
        if entry is None:
            report.failed.append(f"{addr}: not bound by kata-vfio (see kata-vfio-ctl devices)")
        elif reasons[addr] is not None:
            report.failed.append(f"{addr}: {reasons[addr]}")
        else:
            report.restored.append(str(addr))
            done.append((addr, entry))
    given_groups = {entry.group for _, entry in done}
    dropped = {g: who for g, who in taken.items() if g in given_groups}
    for addr, entry in forgotten:
        report.forgotten_devices.append(str(addr))
        now = read_link(os.path.join(device_dir(host.sysfs, addr), "driver"))
        report.forgotten.append(
            f"{addr}: bound by {entry.owner} in an earlier boot, a bind the reboot ended "
            f"(now on {now or 'no driver'}): its record dropped, the device not touched"
        )
    if done or forgotten:
        with editing(host) as current:
            for addr, entry in done + forgotten:
                if current.devices.get(str(addr)) == entry:
                    del current.devices[str(addr)]
            for group in dropped:
                current.claims.pop(group, None)
    report.taken += [
        f"IOMMU group {g} taken from live {who} (--force): its claim dropped"
        for g, who in sorted(dropped.items())
    ]
    return report


def _give_back_one(host: Host, item: tuple[PciAddress, DeviceEntry]) -> str | None:
    """Give one device back; None, or why it failed (one line)."""
    addr, entry = item
    try:
        if not os.path.exists(os.path.join(host.sysfs, "bus/pci/devices", str(addr))):
            pass  # hot-unplugged: nothing left to give back
        elif not is_vfio_driver(entry.driver):
            give_back(host.sysfs, addr, entry.driver, entry.override, host.write)
    except (KataVfioError, OSError) as exc:
        return (
            exc.one_line()
            if isinstance(exc, KataVfioError)
            else f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"
        )
    return None


# Giving back sleeps in the kernel (vfio-pci wakes the device from D3hot: 10 ms each), so
# threads beyond the CPUs overlap those sleeps: in the 2-vCPU bench guest 32 VFs went back
# in 290 ms on 8 threads, 400 ms on 4, 700 ms on 2, 1.5 s one by one.
GIVE_BACK_THREADS = 8


def _groups_of(host: Host, journal: Journal, owner: str | None) -> list[IommuGroup]:
    """Every group the owner (None: anyone) has a claim, a device or VF settings in."""
    groups = {g for g, c in journal.claims.items() if owner is None or c.owner == owner}
    groups |= {e.group for e in journal.devices.values() if owner is None or e.owner == owner}
    for addr, original in journal.vf_configs.items():
        if owner is None or original.owner == owner:
            group = _vf_group(host, addr, original.group)
            if group is not None:
                groups.add(group)
    return [IommuGroup(g) for g in groups]


def restore_all(host: Host, owner: str | None = None, *, force: bool = False) -> RestoreReport:
    """Give back everything journalled (of `owner`), under the locks of every group
    involved: nothing is given back under a create deciding about the same group."""
    locked = _groups_of(host, read_journal_file(host), owner)
    with group_locks(host, locked):
        numbers = {g.number for g in locked}
        journal = read_journal_file(host)
        addresses = [
            PciAddress.parse(a)
            for a, e in journal.devices.items()
            if (owner is None or e.owner == owner) and e.group in numbers
        ]
        report = restore_vf_configs(host, owner, force=force)
        report.extend(_restore_locked(host, addresses, owner, force=force))
        report.failed += journal.damaged
        if owner is None and not report.failed:
            # everything is back: drop the claims that held it (of the groups locked: a
            # group claimed since is that create's)
            with editing(host, groups=numbers) as current:
                for group in [g for g, c in current.claims.items() if force or claim_gone(host, c)]:
                    del current.claims[group]
    return report


def _netlink(host: Host) -> Any:
    if host.netlink is not None:
        return host.netlink
    from kata_vfio_host.vfconfig import Netlink

    return Netlink()


def restore_vf_configs(
    host: Host, owner: str | None = None, *, force: bool = False
) -> RestoreReport:
    """Give PFs back the MAC/VLAN their VFs had before containers changed them, under
    the VFs' group locks. Without `owner`, a live container's VF settings stay unless
    `force`. A VF that a live container other than the entry's owner holds now is never
    reset: that container has it, so the entry (the PF's own values) becomes its own, to
    give back when it ends."""
    journal = read_journal_file(host)
    groups = {
        a: _vf_group(host, a, v.group)
        for a, v in journal.vf_configs.items()
        if owner is None or v.owner == owner
    }
    with group_locks(host, [IommuGroup(g) for g in groups.values() if g is not None]):
        return _restore_vf_locked(host, owner, force=force, groups=groups)


def _restore_vf_locked(
    host: Host,
    owner: str | None,
    *,
    force: bool,
    groups: dict[str, int | None],
    only_groups: set[int] | None = None,
) -> RestoreReport:
    from kata_vfio_host.ledger import VfOriginal
    from kata_vfio_host.vfconfig import VfPort

    report = RestoreReport()
    journal = read_journal_file(host, groups=only_groups)
    held = live_holders(host, journal)
    live = set(held.values())
    mine: dict[str, VfOriginal] = {}
    handed: dict[str, VfOriginal] = {}
    forgotten: dict[str, VfOriginal] = {}
    where: dict[str, int | None] = {}  # each VF's group
    for addr, original in journal.vf_configs.items():
        if owner is not None and original.owner != owner:
            continue
        group = groups[addr] if addr in groups else _vf_group(host, addr, original.group)
        if only_groups is not None and group not in only_groups:
            continue
        where[addr] = group
        holder = held.get(group) if group is not None else None
        if earlier_boot(host, original.boot_id):
            forgotten[addr] = original  # the reboot reset the PF: nothing to set back
        elif holder is not None and holder != original.owner and not (owner is None and force):
            handed[addr] = VfOriginal(
                holder,
                original.pf_interface,
                original.index,
                original.mac,
                original.vlan,
                original.boot_id,
                group,
            )
        elif (
            owner is None
            and not force
            and (holder == original.owner or (group is None and original.owner in live))
        ):
            report.failed.append(
                f"{addr}: VF settings of live {original.owner} kept; "
                "delete the container first, or pass --force"
            )
        else:
            mine[addr] = original
    done: list[str] = []
    netlink: Any = _netlink(host) if mine else None
    for addr, original in mine.items():
        mac, vlan = original.mac or "00:00:00:00:00:00", original.vlan or 0
        try:
            netlink.set(VfPort(original.pf_interface, original.index), mac, vlan)
        except (KataVfioError, OSError) as exc:
            report.failed.append(f"{addr}: VF settings: {exc}")
            continue
        done.append(addr)
        report.vf_settings.append(
            f"{addr}: {original.pf_interface} vf {original.index} mac {mac} vlan {vlan}"
        )
    report.forgotten += [
        f"{addr}: VF settings recorded by {v.owner} in an earlier boot, "
        "which the reboot reset: the record dropped, nothing set"
        for addr, v in forgotten.items()
    ]
    if done or handed or forgotten:
        with editing(host) as current:
            for addr in done:
                if current.vf_configs.get(addr) == mine[addr]:
                    del current.vf_configs[addr]
            for addr, original in forgotten.items():
                if current.vf_configs.get(addr) == original:
                    del current.vf_configs[addr]
            for addr, entry in handed.items():
                if current.vf_configs.get(addr) == journal.vf_configs[addr]:
                    current.vf_configs[addr] = entry
    return report


def release_container(host: Host, container: str, *, only_gone: bool = False) -> RestoreReport:
    """A container is gone: give back what was bound for it and drop its claims. Its
    marker goes only when everything went back, so a failure can be retried.

    All of it under the locks of the container's groups, as its claims were made. With
    `only_gone` (restore --stale) the container must still be gone once those locks are
    held: a new container instance under the same id keeps what it claimed."""
    cid = ContainerId.parse(container)
    locked = _groups_of(host, read_journal_file(host), cid.owner)
    with group_locks(host, locked):
        if only_gone:
            journal = read_journal_file(host)
            if any(c.container == cid and not claim_gone(host, c) for c in journal.claims.values()):
                return RestoreReport()
        report = restore_all(host, cid.owner)
        if not report.failed:
            with editing(host, groups={g.number for g in locked}) as journal:
                for group in [g for g, c in journal.claims.items() if c.container == cid]:
                    del journal.claims[group]
            try:
                os.unlink(marker(host.state_dir, cid))
            except FileNotFoundError:
                pass
    return report


def _release_within(host: Host, cid: ContainerId, numbers: set[int]) -> RestoreReport:
    """What `release_container` does, for these groups only (the caller holds their locks
    and takes no lower one: see locks.Locks); the marker stays (the container may hold
    other groups)."""
    report = _restore_vf_locked(host, cid.owner, force=False, groups={}, only_groups=numbers)
    journal = read_journal_file(host, groups=numbers)
    mine = [PciAddress.parse(a) for a, e in journal.devices.items() if e.owner == cid.owner]
    report.extend(_restore_locked(host, mine, cid.owner, groups=numbers))
    if not report.failed:
        with editing(host, groups=numbers) as current:
            for group in [g for g, c in current.claims.items() if c.container == cid]:
                del current.claims[group]
    return report


def release_gone(host: Host) -> tuple[list[str], RestoreReport]:
    """Release every container whose owner is gone (earlier boot, bundle removed)."""
    from kata_vfio_host.owners import gone_containers

    report = RestoreReport()
    gone = gone_containers(host)
    for cid in gone:
        report.extend(release_container(host, cid, only_gone=True))
    return gone, report
