"""Handing host devices to vfio-pci, safely and crash-safely, and a container's create.

Every change is written to the ledger's journal before sysfs is touched (ledger.py);
a process killed at any step leaves a journal that `restore_all` acts on (giveback.py).
`acquire` is what a container's create calls, whatever engine started it; the plan of
a bind (which devices move) is bindplan.py's. A create that needs no give-back (no
failure, no owner gone) and no auto-bind imports none of giveback.py, bindplan.py and
kata_vfio.threads (`kata-vfio create`'s start-up): they are imported in the functions that use them.
"""

from __future__ import annotations

import os
import time

from kata_vfio.errors import DeviceError
from kata_vfio.pci import (
    VFIO_PCI,
    IommuGroup,
    PciAddress,
    PciDevice,
    device_dir,
    group_members,
    group_of,
    is_vfio_driver,
    read_bind_state,
    read_link,
    vfio_group_class_dir,
)
from kata_vfio.rebind import load_vfio_pci, move_to
from kata_vfio_host.ledger import (
    ADMIN,
    ContainerId,
    DeviceEntry,
    Host,
    Journal,
    _vf_group,
    earlier_boot,
    editing,
    group_locks,
    read_journal_file,
)
from kata_vfio_host.owners import check_free, claim_gone, record_claims

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `kata-vfio create` avoids importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

    from kata_vfio.types import GroupPlan, InUse

__all__ = ["acquire", "apply_vf_config", "bind_group", "bind_groups", "wait_for_group_node"]


def ensure_vfio_pci(host: Host) -> None:
    if not load_vfio_pci(host.sysfs, host.modprobe):
        raise DeviceError(
            "the vfio-pci driver is not available",
            "install the kernel's vfio-pci module (modprobe vfio-pci)",
        )


def bind_pool_size(count: int) -> int:
    """Threads for the kernel work of `count` devices: one per CPU (at least two, at most
    eight). What sleeps in a bind (a native driver's remove, D-state delays) overlaps on
    any number of threads; what computes shares the CPUs and vfio's group_lock (held
    while each group's /dev/vfio node is made). In a 2-vCPU guest binding driverless VFs,
    where it all computes, 2 threads bound 32 VFs in 0.7x the time of 4 and 0.25x that of
    16 (bench/bindtrace.py --pools 2,4,8,16)."""
    return max(1, min(count, max(2, os.cpu_count() or 1), 8))


def _vf_groups(host: Host, pf: PciAddress) -> list[tuple[str, int]]:
    """(VF address, its IOMMU group) for each VF of `pf` (none for a device without)."""
    base = device_dir(host.sysfs, pf)
    try:
        names = [n for n in os.listdir(base) if n.startswith("virtfn") and n[6:].isdigit()]
    except OSError:
        return []
    found = []
    for name in names:
        vf = read_link(os.path.join(base, name))
        group = read_link(os.path.join(base, name, "iommu_group")) if vf else None
        if vf and group and group.isdigit():
            found.append((vf, int(group)))
    return sorted(found)


def _bind_locked(
    host: Host,
    plans: list[GroupPlan],
    owner: str,
    *,
    force: bool,
    in_use: InUse | None,
    refuse_claimed: bool = False,
    add_claims: Callable[[Journal], object] | None = None,
    on_claimed: Callable[[], object] | None = None,
) -> list[PciAddress]:
    """Bind the groups' endpoints (caller holds the group locks); returns what moved.

    The journal gets every device first, in one write (with `refuse_claimed`, after
    checking in that same read that no live container holds one of the groups; `add_claims`
    adds a create's claims to that same write, `on_claimed` runs after it); then the
    kernel work runs concurrently (FastIOV's lesson: rebinding VFs one by one dominates
    start time); on any failure everything of these groups goes back."""
    devices = [d for _, members in plans for d in members]
    to_move = [d for d in devices if not is_vfio_driver(d.driver)]
    if not force and in_use is not None:
        for dev in to_move:
            uses = in_use(dev.address)
            if uses:
                raise DeviceError(
                    f"PCI device {dev.address} is in use: {'; '.join(uses)}",
                    "stop using it first, or pass --force",
                )
    now = time.time()
    pf_vfs = [(dev, _vf_groups(host, dev.address)) for dev in to_move]
    decided = {g.number for g, _ in plans} | {g for _, vfs in pf_vfs for _, g in vfs}
    with editing(host, groups=decided) as journal:
        for dev, vfs in pf_vfs:  # a PF leaving its driver takes its VFs with it
            for vf, vf_group in vfs:
                held = journal.claims.get(vf_group)
                if held is not None and held.owner != owner and not claim_gone(host, held):
                    raise DeviceError(
                        f"PCI device {dev.address} is the PF of {vf}, which {held.owner} "
                        "holds: taking the PF from its driver would take the VF from that "
                        "container",
                        "delete that container first",
                    )
        for group, members in plans:
            claim = journal.claims.get(group.number) if refuse_claimed else None
            if claim is not None and not claim_gone(host, claim):
                raise DeviceError(
                    f"IOMMU group {group} is in use by {claim.owner}",
                    "wait for that container to be deleted",
                )
            for d in members:
                known = journal.devices.get(str(d.address))
                if (
                    known is not None
                    and not earlier_boot(host, known.boot_id)
                    and (known.owner == owner or is_vfio_driver(d.driver))
                ):
                    continue  # keep the original driver recorded when it was moved
                # (an entry of an earlier boot is history: the reboot gave the device back)
                journal.devices[str(d.address)] = DeviceEntry(
                    d.driver, d.driver_override, group.number, owner, host.boot_id, now
                )
        if add_claims is not None:
            add_claims(journal)
    if on_claimed is not None:
        on_claimed()
    if not to_move:
        return []
    ensure_vfio_pci(host)
    try:
        bind_all(host, [(d.address, d.driver) for d in to_move])
    except BaseException:
        from kata_vfio_host.giveback import restore

        restore(host, [d.address for d in devices], owner=owner, groups=[g for g, _ in plans])
        raise
    return [d.address for d in to_move]


def bind_all(host: Host, moves: list[tuple[PciAddress, str | None]]) -> None:
    """driver_override -> unbind -> drivers_probe for each (device, its driver as just
    read under the group locks), concurrently; raises the first failure once every
    thread is done."""
    from kata_vfio.threads import in_threads

    def move(host: Host, item: tuple[PciAddress, str | None]) -> None:
        move_to(host.sysfs, item[0], item[1], VFIO_PCI, host.write)

    in_threads(moves, lambda m: move(host, m), bind_pool_size(len(moves)), stop_on_error=True)


def bind_groups(
    host: Host,
    addresses: list[PciAddress],
    owner: str,
    *,
    force: bool = False,
    in_use: InUse | None = None,
    on_decided: Callable[[], object] | None = None,
) -> list[IommuGroup]:
    """Bind the groups of all these devices to vfio-pci at once (concurrent kernel work),
    journalled; returns the groups. A group held by a live container is refused.
    `on_decided` runs once every refusal is past, before the kernel work.

    What each device is bound to now is read under the group locks, once, and is what
    the journal records and the kernel work starts from."""
    groups: dict[IommuGroup, None] = {}
    for addr in addresses:
        groups.setdefault(group_of(host.sysfs, addr))
    with group_locks(host, list(groups)):
        plans: list[GroupPlan] = []
        for group in groups:
            states = [read_bind_state(host.sysfs, m) for m in group_members(host.sysfs, group)]
            plans.append((group, [s for s in states if not s.is_bridge]))
        _bind_locked(
            host,
            plans,
            owner,
            force=force,
            in_use=in_use,
            refuse_claimed=owner == ADMIN,
            on_claimed=on_decided,
        )
    return list(groups)


def bind_group(
    host: Host, addr: PciAddress, owner: str, *, force: bool = False, in_use: InUse | None = None
) -> IommuGroup:
    """Bind every endpoint of addr's group to vfio-pci, journalled; returns the group.

    `in_use(PciAddress) -> list[str]` names what uses a device; any use refuses the
    bind unless `force`. A group held by a live container is refused even with `force`.
    """
    return bind_groups(host, [addr], owner, force=force, in_use=in_use)[0]


def wait_for_group_node(host: Host, group: IommuGroup, timeout: float = 5.0) -> str:
    """/sys/class/vfio/<N> appears when vfio-pci takes the group; udev then makes /dev/vfio/N."""
    deadline = time.monotonic() + timeout
    node = os.path.join(vfio_group_class_dir(host.sysfs, group), "dev")
    delay = 0.002
    while not os.path.exists(node):
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeviceError(
                f"/dev/vfio/{group} did not appear after binding",
                "check the kernel log for vfio errors",
            )
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)  # bounded: a late node is seen within 20 ms
    return f"/dev/vfio/{group}"


def apply_vf_config(host: Host, container: ContainerId, text: str) -> list[str]:
    """Set the MAC/VLAN a container asked for on its VFs, recording what the PF had
    first; the VFs must be the container's own. Returns what was set, one line each."""
    from pathlib import Path

    from kata_vfio_host.giveback import _netlink
    from kata_vfio_host.ledger import VfOriginal
    from kata_vfio_host.vfconfig import parse_vf_config, vf_port

    netlink = _netlink(host)
    done = []
    for setting in parse_vf_config(text):
        group = group_of(host.sysfs, setting.vf)
        with group_locks(host, [group]):
            claim = read_journal_file(host).claims.get(group.number)
            if claim is None or claim.container != container:
                raise DeviceError(
                    f"io.kata-vfio.vf-config names {setting.vf}, which is not one "
                    f"of container {container}'s devices",
                    "ask for the VF too (io.kata-vfio.devices or select)",
                )
            port = vf_port(Path(host.sysfs), setting.vf)
            mac, vlan = netlink.get(port)
            # the original first: a crash leaves what to undo
            with editing(host, groups={group.number}) as journal:
                known = journal.vf_configs.get(str(setting.vf))
                if known is None:
                    journal.vf_configs[str(setting.vf)] = VfOriginal(
                        container.owner,
                        port.pf_interface,
                        port.vf_index,
                        mac,
                        vlan,
                        host.boot_id,
                        group.number,
                    )
                elif known.owner != container.owner:
                    # settings an earlier owner left: the PF's own values are still those
                    # recorded then, never what that owner set
                    journal.vf_configs[str(setting.vf)] = VfOriginal(
                        container.owner,
                        known.pf_interface,
                        known.index,
                        known.mac,
                        known.vlan,
                        host.boot_id,
                        group.number,
                    )
            netlink.set(port, setting.mac, setting.vlan)
        done.append(
            f"{setting.vf}: {port.pf_interface} vf {port.vf_index}"
            f"{' mac ' + setting.mac if setting.mac else ''}"
            f"{' vlan ' + str(setting.vlan) if setting.vlan is not None else ''}"
        )
    return done


def acquire(
    host: Host,
    container: ContainerId,
    groups: list[IommuGroup],
    addresses: list[PciAddress],
    allow: tuple[str, ...],
    bundle: str | None,
    in_use: InUse | None = None,
    *,
    on_claimed: Callable[[], object] | None = None,
) -> list[PciAddress]:
    """Everything a container's create needs from the ledger, under the group locks:
    devices of owners that are gone are handed back, groups held by another live
    container refused, requested devices not yet on vfio-pci auto-bound if the admin's
    allow-list permits every endpoint, and every group claimed. Returns what was bound.
    On failure nothing stays bound or claimed for this container. `on_claimed` runs once
    the claims are in the journal, before any kernel work (an allocation ends its lock
    there: the next one sees these groups held)."""
    by_addr = {addr: group_of(host.sysfs, addr) for addr in addresses}
    wanted = sorted(set(groups) | set(by_addr.values()))
    if not wanted:
        return []
    started: list[bool] = []  # past the checks: a failure from there releases
    try:
        return _acquire_locked(
            host, container, wanted, by_addr, allow, bundle, in_use, on_claimed, started
        )
    except BaseException:
        if started:
            # what this create claimed went back under its locks; the container's other
            # groups (an earlier claim under the same id) only now, their locks taken in
            # order: a lower group's lock is never waited for while a higher one is held
            from kata_vfio_host.giveback import release_container

            release_container(host, container)
        raise


def _acquire_locked(
    host: Host,
    container: ContainerId,
    wanted: list[IommuGroup],
    by_addr: dict[PciAddress, IommuGroup],
    allow: tuple[str, ...],
    bundle: str | None,
    in_use: InUse | None,
    on_claimed: Callable[[], object] | None,
    started: list[bool],
) -> list[PciAddress]:
    bound: list[PciAddress] = []
    with group_locks(host, wanted):
        numbers = {g.number for g in wanted}
        journal = read_journal_file(host, groups=numbers)
        if _repair_gone(host, wanted, journal):
            journal = read_journal_file(host, groups=numbers)
        check_free(host, container, wanted, journal=journal)
        started.append(True)
        try:
            plans: dict[IommuGroup, list[PciDevice]] = {}
            for addr, group in by_addr.items() if allow else ():
                from kata_vfio_host.bindplan import allowed, endpoints

                _, devices = endpoints(host, addr)
                if all(is_vfio_driver(d.driver) for d in devices):
                    continue  # no auto-bind: the spec edit says how to bind by hand
                for dev in devices:
                    if not allowed(allow, dev):
                        raise DeviceError(
                            f"PCI device {dev.address} [{dev.ids}] in IOMMU group {group} is "
                            f"bound to {dev.driver} and not in the auto-bind allow-list",
                            f"bind it first (kata-vfio-ctl bind {dev.address}) or allow it in "
                            "[autobind] allow of config.toml",
                        )
                plans[group] = devices

            # the claims (and marker) with the devices' entries, before any kernel work:
            # a crash from here on is repaired by the delete podman runs after a failed
            # create, or by any later create
            def claim(journal: Journal) -> None:
                record_claims(host, journal, container, wanted, bundle)

            if plans:
                bound = _bind_locked(
                    host,
                    list(plans.items()),
                    container.owner,
                    force=False,
                    in_use=in_use,
                    add_claims=claim,
                    on_claimed=on_claimed,
                )
            else:
                with editing(host, groups=numbers) as current:
                    claim(current)
                if on_claimed is not None:
                    on_claimed()
        except BaseException:
            from kata_vfio_host.giveback import _release_within

            _release_within(host, container, numbers)
            raise
    return bound


def _repair_gone(host: Host, groups: list[IommuGroup], journal: Journal | None = None) -> bool:
    """Hand back what owners that are gone left in these (locked) groups: VF settings
    first (the next owner starts from the PF's own values), then devices. True when it
    changed the journal (`journal`: as read under the locks)."""
    journal = journal if journal is not None else read_journal_file(host)
    changed = False
    for group in groups:
        claim = journal.claims.get(group.number)
        live = claim is not None and not claim_gone(host, claim)
        if not live and any(
            _vf_group(host, a, v.group) == group.number for a, v in journal.vf_configs.items()
        ):
            # nobody live holds the group: whoever set these is gone
            from kata_vfio_host.giveback import _restore_vf_locked

            report = _restore_vf_locked(
                host, None, force=True, groups={}, only_groups={group.number}
            )
            if report.failed:
                raise DeviceError(
                    f"IOMMU group {group}: the VF settings a container that is "
                    f"gone left cannot be set back: {report.failed[0]}",
                    "run kata-vfio-ctl restore --stale and check the PF",
                )
            changed = True
        if claim is None or live:
            continue
        mine = [
            PciAddress.parse(a)
            for a, e in journal.devices.items()
            if e.owner == claim.owner and e.group == group.number
        ]
        from kata_vfio_host.giveback import restore

        report = restore(host, mine, claim.owner, groups=[group])
        if report.failed:
            raise DeviceError(
                f"IOMMU group {group} was left by {claim.owner}, which is gone, "
                f"and cannot be given back: {report.failed[0]}",
                "run kata-vfio-ctl restore --stale and check the kernel log",
            )
        with editing(host, groups={group.number}) as current:
            current.claims.pop(group.number, None)
        changed = True
    return changed
