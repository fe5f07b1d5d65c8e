"""Every call the device plugin makes into the ledger and bindings, in one place.

An allocation is a ledger claim of the container id ``kubernetes-allocation-<id>`` (<id>:
the first device ID of the kubelet's request, ``:`` written ``-``), made by
`bindings.acquire` under the same group locks and journal as every create: a group held
by a live container is refused, never shared. When the pod's container starts, the shim's
create asks for the same groups (the ``io.kata-vfio.devices`` annotation) and takes the
claim over (`owners.check_free`); the devices bound for the allocation stay recorded under
the allocation's owner, so a restarted container finds them still on vfio-pci.

An allocation is released (its devices given back, its claims dropped) by
`release_allocation` when no live container holds any of its groups and the plugin has
decided its pod is gone (devplugin.py says when), or at once when the kubelet hands one of
its devices to a new allocation: the kubelet assigns a device again only when the pod
that had it is no longer active.

Besides the ledger, each allocation has a small record of ours under
``<state_dir>/device-plugin/`` (resource, device IDs, groups, when, the boot id): the
claims say which groups an allocation holds until a container takes them over, the record
says it after. No pod survives a reboot: `kata-vfio-ctl boot` drops the records of earlier
boots (`forget_earlier_boots`) with the ledger's claims.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from kata_vfio.errors import DeviceError
from kata_vfio.files import edited
from kata_vfio.pci import IommuGroup, PciAddress
from kata_vfio.value import Value
from kata_vfio_host.bindings import acquire, wait_for_group_node
from kata_vfio_host.giveback import release_container
from kata_vfio_host.ledger import (
    ContainerId,
    DeviceEntry,
    Host,
    Journal,
    editing,
    group_locks,
    read_journal_file,
)
from kata_vfio_host.owners import KUBERNETES_ALLOCATION, claim_gone

if TYPE_CHECKING:
    from kata_vfio.types import InUse

RECORDS = "device-plugin"


class Allocation(Value):
    id: str  # the ledger's container id: kubernetes-allocation-<id>
    resource: str  # kata-vfio.io/<name>, "" when only the ledger knew it
    device_ids: tuple[str, ...]
    groups: frozenset[int]
    since: float
    boot_id: str | None = None  # None: written before records held one

    @property
    def owner(self) -> str:
        return ContainerId.parse(self.id).owner


def allocation_id(device_ids: list[str]) -> ContainerId:
    return ContainerId.parse(KUBERNETES_ALLOCATION + sorted(device_ids)[0].replace(":", "-"))


def _record_path(host: Host, cid: str) -> str:
    return os.path.join(host.state_dir, RECORDS, f"{ContainerId.parse(cid)}.json")


def _write_record(host: Host, allocation: Allocation) -> None:
    from kata_vfio.files import write_atomically

    path = _record_path(host, allocation.id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = {
        "id": allocation.id,
        "resource": allocation.resource,
        "device_ids": list(allocation.device_ids),
        "groups": sorted(allocation.groups),
        "since": allocation.since,
        "boot_id": allocation.boot_id,
    }
    write_atomically(path, json.dumps(data).encode(), mode=0o600, durable=False)


def _hand_over_stale(host: Host, cid: ContainerId, groups: list[IommuGroup]) -> list[str]:
    """Before a new allocation of these groups: other allocations' claims on them end and
    their device entries become the new allocation's (the kubelet gives a device again
    only when the pod that had it is gone). A group a live container holds stays its own
    (acquire refuses it). Returns the allocations that lost something."""
    wanted = {g.number for g in groups}
    if not _stale_in(host, read_journal_file(host, groups=wanted), cid, wanted):
        return []  # the usual case: no lock, no journal write, only these groups read
    losers: set[str] = set()
    with group_locks(host, groups), editing(host, groups=wanted) as journal:
        live = {g: c for g, c in journal.claims.items() if not claim_gone(host, c)}
        for g in wanted:
            claim = live.get(g)
            if (
                claim is not None
                and claim.container.startswith(KUBERNETES_ALLOCATION)
                and claim.container != cid
            ):
                losers.add(claim.container)
                del journal.claims[g]
        for addr, entry in list(journal.devices.items()):
            holder = live.get(entry.group)
            if (
                entry.group in wanted
                and entry.owner != cid.owner
                and entry.owner.startswith("container " + KUBERNETES_ALLOCATION)
                and (holder is None or holder.container.startswith(KUBERNETES_ALLOCATION))
            ):
                losers.add(entry.owner[len("container ") :])
                journal.devices[addr] = DeviceEntry(
                    entry.driver, entry.override, entry.group, cid.owner, entry.boot_id, entry.since
                )
    for loser in losers:
        _forget_groups(host, loser, wanted)
    return sorted(losers)


def _stale_in(host: Host, journal: Journal, cid: ContainerId, wanted: set[int]) -> bool:
    for g in wanted:
        claim = journal.claims.get(g)
        if (
            claim is not None
            and claim.container.startswith(KUBERNETES_ALLOCATION)
            and claim.container != cid
            and not claim_gone(host, claim)
        ):
            return True
    return any(
        e.group in wanted
        and e.owner != cid.owner
        and e.owner.startswith("container " + KUBERNETES_ALLOCATION)
        for e in journal.devices.values()
    )


def _forget_groups(host: Host, cid: str, groups: set[int]) -> None:
    with editing_records(host) as records:
        record = records.get(cid)
        if record is not None and record.groups - groups:
            records[cid] = Allocation(
                record.id,
                record.resource,
                record.device_ids,
                record.groups - groups,
                record.since,
                record.boot_id,
            )
        elif record is not None:
            del records[cid]


def editing_records(host: Host) -> edited:
    """The allocation records (id -> Allocation) to change in place; when the block ends
    without an exception each changed record is written, each dropped one removed. The
    caller holds the locks of the records' groups."""
    return edited(
        None,
        lambda: read_records(host),
        lambda records: _write_records(host, records),
        snapshot=dict,
    )


def _write_records(host: Host, records: dict[str, Allocation]) -> None:
    current = read_records(host)
    for cid in current.keys() - records.keys():
        _remove_record(host, cid)
    for cid, allocation in records.items():
        if current.get(cid) != allocation:
            _write_record(host, allocation)


def _remove_record(host: Host, cid: str) -> None:
    try:
        os.unlink(_record_path(host, cid))
    except FileNotFoundError:
        pass


def stopping_holders(host: Host, groups: list[IommuGroup]) -> dict[int, str]:
    """Groups of a new allocation still held by a live container that took one of our
    allocations over: group -> that container. The kubelet hands a device out again only
    when the pod that had it is no longer active, so such a container is being stopped."""
    wanted = {g.number for g in groups}
    journal = read_journal_file(host, groups=wanted)  # only these groups' claims parsed
    held = {
        g: c.container
        for g, c in journal.claims.items()
        if g in wanted
        and not c.container.startswith(KUBERNETES_ALLOCATION)
        and not claim_gone(host, c)
    }
    if not held:
        return {}
    ours: set[int] = set()
    for record in read_records(host).values():
        ours |= record.groups
    return {g: c for g, c in held.items() if g in ours}


def wait_for_stopping(host: Host, groups: list[IommuGroup], timeout: float) -> dict[int, str]:
    """Wait up to `timeout` s until no container of an old allocation holds these groups
    (see `stopping_holders`); what still holds them then (`allocate` refuses it)."""
    deadline = time.monotonic() + timeout
    while True:
        held = stopping_holders(host, groups)
        if not held or time.monotonic() >= deadline:
            return held
        time.sleep(0.05)


def allocate(
    host: Host,
    resource: str,
    device_ids: list[str],
    groups: list[IommuGroup],
    endpoints: list[PciAddress],
    in_use: InUse | None,
) -> Allocation:
    """Claim the groups for a new allocation and bind their endpoints to vfio-pci (the
    resource's configuration is the admin's permission to bind them); wait for the
    /dev/vfio nodes. Nothing stays claimed or bound on failure."""
    cid = allocation_id(device_ids)
    _hand_over_stale(host, cid, groups)
    allocation = Allocation(
        cid,
        resource,
        tuple(sorted(device_ids)),
        frozenset(g.number for g in groups),
        time.time(),
        host.boot_id,
    )
    acquire(host, cid, groups, endpoints, tuple(str(a) for a in endpoints), None, in_use)
    try:
        for group in groups:
            wait_for_group_node(host, group)
        _write_record(host, allocation)
    except BaseException:
        release_container(host, cid)
        raise
    return allocation


_records_cache: dict[str, tuple[int, dict[str, Allocation]]] = {}


def read_records(host: Host) -> dict[str, Allocation]:
    """Our allocation records; read again only when the directory changed (every record
    is written by rename or removed, which changes the directory's mtime)."""
    directory = os.path.join(host.state_dir, RECORDS)
    try:
        stamp = os.stat(directory).st_mtime_ns
    except FileNotFoundError:
        return {}
    cached = _records_cache.get(directory)
    # a change within the filesystem's timestamp granularity of the last read: read again
    if cached is not None and cached[0] == stamp and time.time_ns() - stamp > 50_000_000:
        return dict(cached[1])
    found = _read_records(directory)
    _records_cache[directory] = (stamp, found)
    return dict(found)


def _read_records(directory: str) -> dict[str, Allocation]:
    found: dict[str, Allocation] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data = json.loads(f.read())
            cid = str(ContainerId.parse(data["id"]))
            boot_id = data.get("boot_id")
            found[cid] = Allocation(
                cid,
                str(data["resource"]),
                tuple(str(d) for d in data["device_ids"]),
                frozenset(int(g) for g in data["groups"]),
                float(data["since"]),
                boot_id if isinstance(boot_id, str) else None,
            )
        except (OSError, ValueError, KeyError, TypeError, DeviceError):
            continue  # not ours, or half written by a killed plugin: the ledger still tells
    return found


def allocations(host: Host, journal: Journal | None = None) -> dict[str, Allocation]:
    """Every allocation the ledger or our records know of (a plugin's restart recovers
    them from here)."""
    journal = read_journal_file(host) if journal is None else journal
    found = read_records(host)
    groups: dict[str, set[int]] = {}
    since: dict[str, float] = {}
    for g, claim in journal.claims.items():
        if claim.container.startswith(KUBERNETES_ALLOCATION) and not claim_gone(host, claim):
            groups.setdefault(claim.container, set()).add(g)
            since[claim.container] = claim.since
    for entry in journal.devices.values():
        if entry.owner.startswith("container " + KUBERNETES_ALLOCATION):
            cid = entry.owner[len("container ") :]
            groups.setdefault(cid, set()).add(entry.group)
            since.setdefault(cid, entry.since)
    for cid, numbers in groups.items():
        known = found.get(cid)
        if known is None:
            found[cid] = Allocation(cid, "", (), frozenset(numbers), since.get(cid, 0.0))
        else:
            found[cid] = Allocation(
                cid,
                known.resource,
                known.device_ids,
                known.groups | numbers,
                known.since,
                known.boot_id,
            )
    return found


def live_holders(host: Host, journal: Journal | None = None) -> dict[int, str]:
    """IOMMU group number -> the container id holding it now (live claims only)."""
    journal = read_journal_file(host) if journal is None else journal
    return {g: c.container for g, c in journal.claims.items() if not claim_gone(host, c)}


def snapshot(host: Host) -> tuple[dict[int, str], dict[str, Allocation]]:
    """live_holders and allocations from one read of the journal (the poll loop's)."""
    journal = read_journal_file(host)
    return live_holders(host, journal), allocations(host, journal)


def release_allocation(host: Host, allocation: Allocation) -> bool:
    """Give the allocation's devices back and drop its claims and record, unless a live
    container (one that took it over) still holds one of its groups: then False."""
    # every lock release_container takes too, up front: a lock is never taken below one
    # held (locks.Locks)
    owned = {
        e.group for e in read_journal_file(host).devices.values() if e.owner == allocation.owner
    }
    groups = [IommuGroup(g) for g in sorted(allocation.groups | owned)]
    with group_locks(host, groups):
        holders = live_holders(host)
        if any(holders.get(g, allocation.id) != allocation.id for g in allocation.groups):
            return False
        report = release_container(host, allocation.id)
    if report.failed:
        raise DeviceError(
            f"{allocation.id}: cannot give back: {report.failed[0]}",
            "check the kernel log; kata-vfio-ctl restore --stale retries",
        )
    _remove_record(host, allocation.id)
    return True


def forget_earlier_boots(host: Host) -> list[Allocation]:
    """For `kata-vfio-ctl boot`, after the ledger's `forget_earlier_boots`: the records of
    allocations made in an earlier boot go (no pod survives a reboot; their claims and
    device entries went with the ledger's). A record written before records held a boot
    id goes when the ledger holds nothing of it: no claim of it, no device it bound, no
    live claim on one of its groups. Returns what went, by id."""
    from kata_vfio_host.ledger import earlier_boot

    journal = read_journal_file(host)
    live = {g for g, c in journal.claims.items() if not claim_gone(host, c)}
    dropped = []
    for cid, record in sorted(_read_records(os.path.join(host.state_dir, RECORDS)).items()):
        if record.boot_id is not None:
            stale = earlier_boot(host, record.boot_id)
        else:
            stale = not (
                any(c.container == cid for c in journal.claims.values())
                or any(e.owner == record.owner for e in journal.devices.values())
                or record.groups & live
            )
        if stale:
            _remove_record(host, cid)
            dropped.append(record)
    return dropped
