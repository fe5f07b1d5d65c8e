"""Handing host devices to vfio-pci and back, safely and crash-safely.

Every change is written to the ledger's journal before sysfs is touched (ledger.py);
a process killed at any step leaves a journal that `restore_all` acts on. Giving
back never stops at the first failure: each device is tried, each failure reported.
`acquire` and `release_container` are what a container's create and delete call,
whatever engine started it.
"""

from __future__ import annotations

import os
import time

from kata_vfio.errors import DeviceError, KataVfioError
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
    read_device,
    read_link,
    vfio_group_class_dir,
)
from kata_vfio.rebind import give_back, load_vfio_pci, move_to
from kata_vfio.threads import in_threads
from kata_vfio_host.ledger import (
    ADMIN,
    ContainerId,
    DeviceEntry,
    Host,
    Journal,
    check_free,
    claim_gone,
    earlier_boot,
    editing,
    group_locks,
    marker,
    read_journal_file,
    record_claims,
)

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `kata-vfio create` avoids importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from kata_vfio.pci import StrPath
    from kata_vfio_host.ledger import InUse

__all__ = ["ADMIN", "Host", "RestoreReport", "acquire", "bind_group", "release_container",
           "restore", "restore_all"]


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
    return (f"{addr}: IOMMU group {group} is held by live {holder}: giving it back would pull "
            "it out of that container's VM; delete the container first, or pass --force to "
            "take it (its claim is dropped)")


def endpoints(host: Host, addr: PciAddress) -> tuple[IommuGroup, list[PciDevice]]:
    """The device's group and every non-bridge member of it (all must go together)."""
    group = group_of(host.sysfs, addr)
    members = [read_device(host.sysfs, m) for m in group_members(host.sysfs, group)]
    return group, [d for d in members if not d.is_bridge]


def ensure_vfio_pci(host: Host) -> None:
    if not load_vfio_pci(host.sysfs, host.modprobe):
        raise DeviceError("the vfio-pci driver is not available",
                          "install the kernel's vfio-pci module (modprobe vfio-pci)")


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Protocol

    class Movable(Protocol):
        """A device as a bind needs it: PciDevice (a container's create reads everything,
        for the allow-list) or BindState (kata-vfio-ctl bind reads only this)."""

        @property
        def address(self) -> PciAddress: ...
        @property
        def driver(self) -> str | None: ...
        @property
        def driver_override(self) -> str | None: ...

    GroupPlan = tuple[IommuGroup, Sequence[Movable]]


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


def _bind_locked(host: Host, plans: list[GroupPlan], owner: str, *, force: bool,
                 in_use: InUse | None, refuse_claimed: bool = False,
                 add_claims: Callable[[Journal], object] | None = None,
                 on_claimed: Callable[[], object] | None = None) -> list[PciAddress]:
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
                raise DeviceError(f"PCI device {dev.address} is in use: {'; '.join(uses)}",
                                  "stop using it first, or pass --force")
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
                        "container", "delete that container first")
        for group, members in plans:
            claim = journal.claims.get(group.number) if refuse_claimed else None
            if claim is not None and not claim_gone(host, claim):
                raise DeviceError(f"IOMMU group {group} is in use by {claim.owner}",
                                  "wait for that container to be deleted")
            for d in members:
                known = journal.devices.get(str(d.address))
                if known is not None and not earlier_boot(host, known.boot_id) and (
                        known.owner == owner or is_vfio_driver(d.driver)):
                    continue  # keep the original driver recorded when it was moved
                # (an entry of an earlier boot is history: the reboot gave the device back)
                journal.devices[str(d.address)] = DeviceEntry(
                    d.driver, d.driver_override, group.number, owner, host.boot_id, now)
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
        restore(host, [d.address for d in devices], owner=owner, groups=[g for g, _ in plans])
        raise
    return [d.address for d in to_move]


def bind_all(host: Host, moves: list[tuple[PciAddress, str | None]]) -> None:
    """driver_override -> unbind -> drivers_probe for each (device, its driver as just
    read under the group locks), concurrently; raises the first failure once every
    thread is done."""
    def move(host: Host, item: tuple[PciAddress, str | None]) -> None:
        move_to(host.sysfs, item[0], item[1], VFIO_PCI, host.write)

    in_threads(moves, lambda m: move(host, m), bind_pool_size(len(moves)), stop_on_error=True)


def bind_groups(host: Host, addresses: list[PciAddress], owner: str, *, force: bool = False,
                in_use: InUse | None = None,
                on_decided: Callable[[], object] | None = None) -> list[IommuGroup]:
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
        _bind_locked(host, plans, owner, force=force, in_use=in_use,
                     refuse_claimed=owner == ADMIN, on_claimed=on_decided)
    return list(groups)


def bind_group(host: Host, addr: PciAddress, owner: str, *, force: bool = False,
               in_use: InUse | None = None) -> IommuGroup:
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
            raise DeviceError(f"/dev/vfio/{group} did not appear after binding",
                              "check the kernel log for vfio errors")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)  # bounded: a late node is seen within 20 ms
    return f"/dev/vfio/{group}"


def _entry_groups(host: Host, addresses: list[PciAddress]) -> list[IommuGroup]:
    journal = read_journal_file(host)
    return [IommuGroup(e.group) for a in addresses
            if (e := journal.devices.get(str(a))) is not None]


def restore(host: Host, addresses: list[PciAddress], owner: str | None = None, *,
            force: bool = False, groups: list[IommuGroup] | None = None) -> RestoreReport:
    """See `_restore_locked`: under the groups' locks, as a claim is made (a create taking
    over the group waits until the devices are back, and sees them back). `groups`: the
    groups the devices' entries are in, when the caller knows them (only those groups'
    ledger files are read)."""
    if groups is None:
        groups = _entry_groups(host, addresses)
    with group_locks(host, groups):
        return _restore_locked(host, addresses, owner, force=force,
                               groups={g.number for g in groups})


def _restore_locked(host: Host, addresses: list[PciAddress], owner: str | None = None, *,
                    force: bool = False, groups: set[int] | None = None) -> RestoreReport:
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
            f"(now on {now or 'no driver'}): its record dropped, the device not touched")
    if done or forgotten:
        with editing(host) as current:
            for addr, entry in done + forgotten:
                if current.devices.get(str(addr)) == entry:
                    del current.devices[str(addr)]
            for group in dropped:
                current.claims.pop(group, None)
    report.taken += [f"IOMMU group {g} taken from live {who} (--force): its claim dropped"
                     for g, who in sorted(dropped.items())]
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
        return exc.one_line() if isinstance(exc, KataVfioError) else \
            f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"
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


def _vf_group(host: Host, addr: str, recorded: int | None) -> int | None:
    if recorded is not None:
        return recorded
    try:
        return group_of(host.sysfs, PciAddress.parse(addr)).number
    except (KataVfioError, OSError, ValueError):
        return None


def restore_all(host: Host, owner: str | None = None, *, force: bool = False
                ) -> RestoreReport:
    """Give back everything journalled (of `owner`), under the locks of every group
    involved: nothing is given back under a create deciding about the same group."""
    locked = _groups_of(host, read_journal_file(host), owner)
    with group_locks(host, locked):
        numbers = {g.number for g in locked}
        journal = read_journal_file(host)
        addresses = [PciAddress.parse(a) for a, e in journal.devices.items()
                     if (owner is None or e.owner == owner) and e.group in numbers]
        report = restore_vf_configs(host, owner, force=force)
        report.extend(_restore_locked(host, addresses, owner, force=force))
        report.failed += journal.damaged
        if owner is None and not report.failed:
            # everything is back: drop the claims that held it (of the groups locked: a
            # group claimed since is that create's)
            with editing(host, groups=numbers) as current:
                for group in [g for g, c in current.claims.items()
                              if force or claim_gone(host, c)]:
                    del current.claims[group]
    return report


def _netlink(host: Host) -> Any:
    if host.netlink is not None:
        return host.netlink
    from kata_vfio_host.vfconfig import Netlink

    return Netlink()


def apply_vf_config(host: Host, container: ContainerId, text: str) -> list[str]:
    """Set the MAC/VLAN a container asked for on its VFs, recording what the PF had
    first; the VFs must be the container's own. Returns what was set, one line each."""
    from pathlib import Path

    from kata_vfio_host.ledger import VfOriginal
    from kata_vfio_host.vfconfig import parse_vf_config, vf_port

    netlink = _netlink(host)
    done = []
    for setting in parse_vf_config(text):
        group = group_of(host.sysfs, setting.vf)
        with group_locks(host, [group]):
            claim = read_journal_file(host).claims.get(group.number)
            if claim is None or claim.container != container:
                raise DeviceError(f"io.kata-vfio.vf-config names {setting.vf}, which is not one "
                                  f"of container {container}'s devices",
                                  "ask for the VF too (io.kata-vfio.devices or select)")
            port = vf_port(Path(host.sysfs), setting.vf)
            mac, vlan = netlink.get(port)
            # the original first: a crash leaves what to undo
            with editing(host, groups={group.number}) as journal:
                known = journal.vf_configs.get(str(setting.vf))
                if known is None:
                    journal.vf_configs[str(setting.vf)] = VfOriginal(
                        container.owner, port.pf_interface, port.vf_index, mac, vlan,
                        host.boot_id, group.number)
                elif known.owner != container.owner:
                    # settings an earlier owner left: the PF's own values are still those
                    # recorded then, never what that owner set
                    journal.vf_configs[str(setting.vf)] = VfOriginal(
                        container.owner, known.pf_interface, known.index, known.mac,
                        known.vlan, host.boot_id, group.number)
            netlink.set(port, setting.mac, setting.vlan)
        done.append(f"{setting.vf}: {port.pf_interface} vf {port.vf_index}"
                    f"{' mac ' + setting.mac if setting.mac else ''}"
                    f"{' vlan ' + str(setting.vlan) if setting.vlan is not None else ''}")
    return done


def restore_vf_configs(host: Host, owner: str | None = None, *, force: bool = False
                       ) -> RestoreReport:
    """Give PFs back the MAC/VLAN their VFs had before containers changed them, under
    the VFs' group locks. Without `owner`, a live container's VF settings stay unless
    `force`. A VF that a live container other than the entry's owner holds now is never
    reset: that container has it, so the entry (the PF's own values) becomes its own, to
    give back when it ends."""
    journal = read_journal_file(host)
    groups = {a: _vf_group(host, a, v.group) for a, v in journal.vf_configs.items()
              if owner is None or v.owner == owner}
    with group_locks(host, [IommuGroup(g) for g in groups.values() if g is not None]):
        return _restore_vf_locked(host, owner, force=force, groups=groups)


def _restore_vf_locked(host: Host, owner: str | None, *, force: bool,
                       groups: dict[str, int | None], only_groups: set[int] | None = None
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
            handed[addr] = VfOriginal(holder, original.pf_interface, original.index,
                                      original.mac, original.vlan, original.boot_id, group)
        elif owner is None and not force and (holder == original.owner or
                                              (group is None and original.owner in live)):
            report.failed.append(f"{addr}: VF settings of live {original.owner} kept; "
                                 "delete the container first, or pass --force")
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
        report.vf_settings.append(f"{addr}: {original.pf_interface} vf {original.index} "
                                  f"mac {mac} vlan {vlan}")
    report.forgotten += [f"{addr}: VF settings recorded by {v.owner} in an earlier boot, "
                         "which the reboot reset: the record dropped, nothing set"
                         for addr, v in forgotten.items()]
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


def release_container(host: Host, container: str, *, only_gone: bool = False
                      ) -> RestoreReport:
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
            if any(c.container == cid and not claim_gone(host, c)
                   for c in journal.claims.values()):
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
    and takes no lower one: see ledger.Locks); the marker stays (the container may hold
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
    from kata_vfio_host.ledger import gone_containers

    report = RestoreReport()
    gone = gone_containers(host)
    for cid in gone:
        report.extend(release_container(host, cid, only_gone=True))
    return gone, report


# --- a container's create: the allow-list, auto-bind, claims -----------------------------


def allowed(patterns: tuple[str, ...], dev: PciDevice) -> bool:
    from kata_vfio_host.allowlist import parse_allow_list

    return any(rule.matches(dev) for rule in parse_allow_list(patterns))


def acquire(host: Host, container: ContainerId, groups: list[IommuGroup],
            addresses: list[PciAddress], allow: tuple[str, ...], bundle: str | None,
            in_use: InUse | None = None, *, on_claimed: Callable[[], object] | None = None
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
        return _acquire_locked(host, container, wanted, by_addr, allow, bundle, in_use,
                               on_claimed, started)
    except BaseException:
        if started:
            # what this create claimed went back under its locks; the container's other
            # groups (an earlier claim under the same id) only now, their locks taken in
            # order: a lower group's lock is never waited for while a higher one is held
            release_container(host, container)
        raise


def _acquire_locked(host: Host, container: ContainerId, wanted: list[IommuGroup],
                    by_addr: dict[PciAddress, IommuGroup], allow: tuple[str, ...],
                    bundle: str | None, in_use: InUse | None,
                    on_claimed: Callable[[], object] | None, started: list[bool]
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
                _, devices = endpoints(host, addr)
                if all(is_vfio_driver(d.driver) for d in devices):
                    continue  # no auto-bind: the spec edit says how to bind by hand
                for dev in devices:
                    if not allowed(allow, dev):
                        raise DeviceError(
                            f"PCI device {dev.address} [{dev.ids}] in IOMMU group {group} is "
                            f"bound to {dev.driver} and not in the auto-bind allow-list",
                            f"bind it first (kata-vfio-ctl bind {dev.address}) or allow it in "
                            "[autobind] allow of config.toml")
                plans[group] = devices
            # the claims (and marker) with the devices' entries, before any kernel work:
            # a crash from here on is repaired by the delete podman runs after a failed
            # create, or by any later create
            def claim(journal: Journal) -> None:
                record_claims(host, journal, container, wanted, bundle)

            if plans:
                bound = _bind_locked(host, list(plans.items()), container.owner, force=False,
                                     in_use=in_use, add_claims=claim, on_claimed=on_claimed)
            else:
                with editing(host, groups=numbers) as current:
                    claim(current)
                if on_claimed is not None:
                    on_claimed()
        except BaseException:
            _release_within(host, container, numbers)
            raise
    return bound


def _repair_gone(host: Host, groups: list[IommuGroup], journal: Journal | None = None
                 ) -> bool:
    """Hand back what owners that are gone left in these (locked) groups: VF settings
    first (the next owner starts from the PF's own values), then devices. True when it
    changed the journal (`journal`: as read under the locks)."""
    journal = journal if journal is not None else read_journal_file(host)
    changed = False
    for group in groups:
        claim = journal.claims.get(group.number)
        live = claim is not None and not claim_gone(host, claim)
        if not live and any(_vf_group(host, a, v.group) == group.number
                            for a, v in journal.vf_configs.items()):
            # nobody live holds the group: whoever set these is gone
            report = _restore_vf_locked(host, None, force=True, groups={},
                                        only_groups={group.number})
            if report.failed:
                raise DeviceError(f"IOMMU group {group}: the VF settings a container that is "
                                  f"gone left cannot be set back: {report.failed[0]}",
                                  "run kata-vfio-ctl restore --stale and check the PF")
            changed = True
        if claim is None or live:
            continue
        mine = [PciAddress.parse(a) for a, e in journal.devices.items()
                if e.owner == claim.owner and e.group == group.number]
        report = restore(host, mine, claim.owner, groups=[group])
        if report.failed:
            raise DeviceError(f"IOMMU group {group} was left by {claim.owner}, which is gone, "
                              f"and cannot be given back: {report.failed[0]}",
                              "run kata-vfio-ctl restore --stale and check the kernel log")
        with editing(host, groups={group.number}) as current:
            current.claims.pop(group.number, None)
        changed = True
    return changed


def plan_bind(sysfs: StrPath, addr: Any) -> tuple[Any, list[Any]]:
    """addr's IOMMU group and the members a bind moves: every endpoint not on a vfio
    driver yet (bridges stay where they are)."""
    from kata_vfio.pci import group_members, group_of, is_vfio_driver, read_device

    group = group_of(sysfs, addr)
    members = [read_device(sysfs, m) for m in group_members(sysfs, group)]
    return group, [d for d in members if not d.is_bridge and not is_vfio_driver(d.driver)]
