"""Who holds which IOMMU group, and which owners are gone: the ledger's claims read
against the bundles and markers they point at, and made (with the checks before)."""

from __future__ import annotations

import os
import time

from kata_vfio.errors import DeviceError
from kata_vfio.jsoncodec import loads
from kata_vfio.pci import IommuGroup
from kata_vfio_host.ledger import (
    ADMIN,
    Claim,
    ContainerId,
    Host,
    Journal,
    _join,
    _opt_str,
    editing,
    read_instance,
    read_journal_file,
    write_instance,
    write_marker,
)


def claim_gone(host: Host, claim: Claim) -> bool:
    """Is the container behind a claim gone? Another boot, its bundle removed, or the
    bundle there now made by another container instance (its token differs)."""
    if claim.boot_id != host.boot_id:
        return True
    if claim.bundle is None:
        return False
    if claim.instance is None:  # a claim of an older version: the directory alone
        return not os.path.isdir(claim.bundle)
    return read_instance(claim.bundle) != claim.instance


def owner_of(host: Host, group: IommuGroup, journal: Journal | None = None) -> str | None:
    """Who holds the group now: a live container's claim, else the admin if the admin
    bound it. Devices bound for a container that is gone are restorable, owned by none."""
    journal = journal if journal is not None else read_journal_file(host)
    claim = journal.claims.get(group.number)
    if claim is not None and not claim_gone(host, claim):
        return claim.owner
    if any(e.group == group.number and e.owner == ADMIN for e in journal.devices.values()):
        return ADMIN
    return None


def gone_containers(host: Host, journal: Journal | None = None) -> list[str]:
    """Containers with claims or devices whose owner is gone."""
    journal = journal if journal is not None else read_journal_file(host)
    live = {c.container for c in journal.claims.values() if not claim_gone(host, c)}
    gone = {c.container for c in journal.claims.values() if claim_gone(host, c)}
    for entry in journal.devices.values():
        if entry.owner.startswith("container "):
            cid = entry.owner[len("container ") :]
            if cid not in live:
                gone.add(cid)
    markers = _join(host.state_dir, "containers")
    if os.path.isdir(markers):
        for name in os.listdir(markers):
            if name not in live and ContainerId.maybe(name) is not None:
                try:
                    with open(_join(markers, name), "rb") as f:
                        info = loads(f.read())
                    claim = Claim(
                        name,
                        _opt_str(info.get("boot_id")),
                        _opt_str(info.get("bundle")),
                        instance=_opt_str(info.get("instance")),
                    )
                except (OSError, ValueError, AttributeError):
                    claim = Claim(name, None, None)
                if claim_gone(host, claim):
                    gone.add(name)
    return sorted(gone)


def claim_groups(
    host: Host, container: ContainerId, groups: list[IommuGroup], bundle: str | None
) -> None:
    """Record that the container uses these groups (call under their group locks, after
    `check_free`). The claim belongs to this container instance: the token it writes
    into the bundle."""
    with editing(host, groups={g.number for g in groups}) as journal:
        record_claims(host, journal, container, groups, bundle)


def record_claims(
    host: Host,
    journal: Journal,
    container: ContainerId,
    groups: list[IommuGroup],
    bundle: str | None,
) -> None:
    """`claim_groups` inside an edit of the journal the caller makes anyway (a create
    writes its claims and its devices' entries in one write)."""
    instance = write_instance(bundle)
    write_marker(host, container, bundle, instance)
    now = time.time()
    for group in groups:
        journal.claims[group.number] = Claim(container, host.boot_id, bundle, now, instance)


KUBERNETES_ALLOCATION = "kubernetes-allocation-"


def check_free(
    host: Host, container: ContainerId, groups: list[IommuGroup], *, journal: Journal | None = None
) -> None:
    """Refuse groups held by another live container (call under their group locks;
    `journal`: as read under them).

    The device plugin's allocations (claims of ``kubernetes-allocation-<id>``) are held
    for the container the kubelet made them for: a container that asks for every group
    of such an allocation takes it over (its claim replaces the allocation's); one that
    asks for only some of them is refused like any other."""
    journal = journal if journal is not None else read_journal_file(host)
    wanted = {g.number for g in groups}
    whole: Journal | None = None
    for group in groups:
        current = owner_of(host, group, journal)
        if current in (None, ADMIN, container.owner):
            continue
        claim = journal.claims.get(group.number)
        if claim is not None and claim.container.startswith(KUBERNETES_ALLOCATION):
            # the allocation's other groups may lie outside the part of the journal read
            whole = whole if whole is not None else read_journal_file(host)
            allocation = {
                g
                for g, c in whole.claims.items()
                if c.container == claim.container and not claim_gone(host, c)
            }
            if allocation <= wanted:
                continue
        raise DeviceError(
            f"IOMMU group {group} is in use by {current}", "wait for that container to be deleted"
        )
