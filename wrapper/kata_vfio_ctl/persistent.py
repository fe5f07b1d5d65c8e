"""`bind --persist`, `vfs --persist`, what `restore` and `vfs` do to persistence, and
`kata-vfio-ctl boot`.

`boot` is what kata-vfio-boot.service runs early at boot, before any container engine:
it drops what earlier boots left in the ledger and the device plugin's allocation
records (no container or pod survives a reboot, and the reboot already gave every
device back to its driver, so nothing is given back), makes the persistent VF counts
again (the reboot removed every VF), then binds the persistent devices to vfio-pci
again, and says exactly that.

The records follow what is on the host: a persistent bind of a VF is refused unless
its PF's VF count is persistent (else the VF would not exist at boot); `vfs` that
removes VFs drops their persistent binds; `vfs PF 0` drops the VF count.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kata_vfio.boundary import step
from kata_vfio.errors import DeviceError, KataVfioError
from kata_vfio.pci import PciAddress

PROG = "kata-vfio-ctl"


def _require_vf_count(host: Any, persisted: Any, vf: PciAddress, pf: PciAddress) -> None:
    """A VF is there at boot only when its PF's VF count is made again first."""
    from kata_vfio.pci import read_device
    from kata_vfio_host.netinfo import vf_index
    from kata_vfio_host.sriov import virtual_functions

    record = persisted.vf_count(pf)
    index = vf_index(host.sysfs, pf, vf)
    dev = read_device(host.sysfs, pf)
    if (
        record is not None
        and (record.vendor, record.device) == (dev.vendor, dev.device)
        and index is not None
        and index < record.count
    ):
        return
    count = len(virtual_functions(host.sysfs, pf))
    raise DeviceError(
        f"{vf} is a VF of {pf}, whose VF count is not persistent: after a "
        f"reboot {vf} does not exist, so it cannot be bound at boot",
        f"persist the VF count first: kata-vfio-ctl vfs {pf} {count} "
        "--persist; nothing was changed",
    )


def check_persistable(host: Any, addresses: list[Any]) -> None:
    """`bind --persist --dry-run`: the refusal the bind would give."""
    from kata_vfio.pci import read_device
    from kata_vfio_host.persist import read_persisted

    persisted = read_persisted()
    for addr in addresses:
        dev = read_device(host.sysfs, addr)
        if dev.physfn is not None:
            _require_vf_count(host, persisted, addr, dev.physfn)


def record_persistent(host: Any, addresses: list[Any]) -> Any:
    """Add the devices to the persistent binds (before the bind: a file we cannot write,
    or a VF whose PF's VF count is not persistent, refuses the bind with nothing moved);
    returns the lists as they were, to put back if the bind fails."""
    from kata_vfio.pci import read_device
    from kata_vfio_host.persist import PersistentBind, editing

    with editing() as persisted:
        before = persisted.copy()
        binds = persisted.binds
        known = {str(b.address): i for i, b in enumerate(binds)}
        for addr in addresses:
            dev = read_device(host.sysfs, addr)
            if dev.physfn is not None:
                _require_vf_count(host, persisted, addr, dev.physfn)
            entry = PersistentBind(addr, dev.vendor, dev.device)
            if str(addr) in known:
                binds[known[str(addr)]] = entry
            else:
                known[str(addr)] = len(binds)
                binds.append(entry)
    return before


def put_back(before: Any) -> None:
    from kata_vfio_host.persist import editing

    with editing() as persisted:
        persisted.binds[:] = before.binds
        persisted.vfs[:] = before.vfs


def record_vfs(
    host: Any,
    pf: PciAddress,
    count: int,
    persist: bool | None,
    old_vfs: list[PciAddress],
    resizing: bool,
) -> tuple[Any, list[str]]:
    """Before `vfs` sets the count: the persistent VF count and binds made to match what
    the command leaves. `persist` None keeps a persistent count persistent (at the new
    count); 0 VFs is never persistent. VFs that go take their persistent binds along
    (their binds go too). Returns the lists as they were (None: unchanged), to put back
    if the count cannot be set, and the lines to say once it is."""
    from kata_vfio.pci import read_device
    from kata_vfio_host.persist import PersistentVfs, editing, persist_path, read_persisted

    current = read_persisted()  # a broken file: refused before anything changes
    record = current.vf_count(pf)
    removed = set(old_vfs) if resizing else set()
    keep = (record is not None) if persist is None else persist
    dev = read_device(host.sysfs, pf)
    want = PersistentVfs(pf, dev.vendor, dev.device, count) if keep and count else None
    path = persist_path()
    if want is None:
        # the VFs stay, but would not be there at boot: their persistent binds say they are
        needing = [str(b.address) for b in current.binds if b.address in set(old_vfs) - removed]
        if needing:
            raise DeviceError(
                f"the persistent binds of {', '.join(needing)} need the VF "
                f"count of {pf} made at boot",
                f"give them back first (kata-vfio-ctl restore "
                f"{' '.join(needing)}); nothing was changed",
            )
    gone = [b for b in current.binds if b.address in removed]
    lines = [
        f"{b.address}: no longer bound at boot (its VF went; removed from {path})" for b in gone
    ]
    if want is not None:
        lines.append(
            f"{pf}: {count} VFs made again at every boot (kata-vfio-boot.service; listed in {path})"
        )
    elif record is not None:
        lines.append(f"{pf}: its VFs are no longer made at boot (removed from {path})")
    if want == record and not gone:
        return None, lines
    with editing() as persisted:
        before = persisted.copy()
        persisted.vfs[:] = [v for v in persisted.vfs if v.address != pf] + (
            [want] if want is not None else []
        )
        persisted.binds[:] = [b for b in persisted.binds if b.address not in removed]
    return before, lines


def forget_absent_pf(host: Any, pf: PciAddress) -> list[str]:
    """`vfs PF 0` for a PF that is gone: its persistent VF count can still be dropped."""
    from kata_vfio.pci import device_dir
    from kata_vfio_host.persist import editing, persist_path, read_persisted

    if os.path.isdir(device_dir(host.sysfs, pf)) or read_persisted().vf_count(pf) is None:
        return []
    with editing() as persisted:
        record = persisted.vf_count(pf)
        if record is None:
            return []
        persisted.vfs.remove(record)
    return [
        f"{pf}: not on this host; its VFs are no longer made at boot (removed from "
        f"{persist_path()})"
    ]


def check_readable() -> None:
    """A persistent binds file that is there but broken stops the command first."""
    from kata_vfio_host.persist import read_binds

    read_binds()


def drop_persistent(host: Any, given_back: list[str], *, everything: bool) -> list[str]:
    """After a restore: the persistent binds of the devices given back (and of any
    device in the same IOMMU group: the group cannot be whole on vfio-pci again) go;
    `everything` (restore --all): all of them. One line each, saying so."""
    from kata_vfio.pci import group_of
    from kata_vfio_host.persist import editing_binds, persist_path

    def group(addr: PciAddress) -> int | None:
        try:
            return group_of(host.sysfs, addr).number
        except (KataVfioError, OSError):
            return None

    back = {PciAddress.parse(a) for a in given_back}
    back_groups = {g for g in map(group, back) if g is not None}
    lines = []
    if not everything and not back:
        return []
    with editing_binds() as binds:
        kept = []
        for b in binds:
            if everything or b.address in back or group(b.address) in back_groups:
                lines.append(
                    f"{b.address}: no longer bound at boot (removed from {persist_path()})"
                )
            else:
                kept.append(b)
        binds[:] = kept
    return lines


def _make_vfs(host: Any, record: Any, timeout: float) -> str:
    """The persistent VF count of one PF, made again: the PF must be there with the IDs it
    had, its driver bound (the driver makes the VFs), no other count set meanwhile. Waits
    up to `timeout` s for the driver and for the VFs to appear."""
    import time

    from kata_vfio.pci import device_dir, read_attr, read_device
    from kata_vfio_host.sriov import set_vf_count, total_vfs, virtual_functions

    pf = record.address
    what = f"{pf} ({record.ids}, persistent)"
    base = device_dir(host.sysfs, pf)
    if not os.path.isdir(base):
        from kata_vfio_host.persist import persist_path

        raise DeviceError(
            f"{pf} is not on this host now: its {record.count} VFs not made",
            f"plug it back, or drop it: kata-vfio-ctl vfs {pf} 0 removes it from {persist_path()}",
        )
    dev = read_device(host.sysfs, pf)
    if (dev.vendor, dev.device) != (record.vendor, record.device):
        raise DeviceError(
            f"{pf} is now {dev.vendor:04x}:{dev.device:04x}, not {record.ids} "
            "as when its VF count was persisted: no VFs made",
            f"kata-vfio-ctl vfs {pf} 0 to forget it, or vfs {pf} N --persist for this card",
        )
    total = total_vfs(host.sysfs, pf)
    if record.count > total:
        raise DeviceError(
            f"{pf} supports {total} VFs now, not {record.count}: none made",
            f"kata-vfio-ctl vfs {pf} {total} --persist to persist fewer",
        )
    deadline = time.monotonic() + timeout
    while read_device(host.sysfs, pf).driver is None:  # its sriov_configure makes them
        if time.monotonic() >= deadline:
            raise DeviceError(
                f"{pf} has no driver after {timeout:g} s: its driver makes the VFs, none made",
                "load the PF's driver early (modprobe, /etc/modules-load.d)",
            )
        time.sleep(0.05)
    current = int(read_attr(os.path.join(base, "sriov_numvfs")))
    if current == record.count:
        vfs = virtual_functions(host.sysfs, pf)
        return f"{what}: already has {current} VFs ({', '.join(map(str, vfs))}), nothing made"
    if current:
        raise DeviceError(
            f"{pf} has {current} VFs now, not {record.count} as persisted: left alone",
            f"kata-vfio-ctl vfs {pf} {record.count} to set them, or vfs {pf} "
            f"{current} --persist to keep these",
        )
    set_vf_count(host, pf, record.count)
    while True:  # the kernel adds each VF's device as the write returns; udev may lag
        vfs = virtual_functions(host.sysfs, pf)
        if len(vfs) == record.count and all(os.path.isdir(device_dir(host.sysfs, v)) for v in vfs):
            break
        if time.monotonic() >= deadline:
            raise DeviceError(
                f"{pf}: only {len(vfs)} of {record.count} VFs appeared within {timeout:g} s",
                "check the kernel log (dmesg)",
            )
        time.sleep(0.05)
    return f"made {record.count} VFs of {what} again: {', '.join(map(str, vfs))}"


def cmd_boot(args: argparse.Namespace, host: Any, log: Any) -> int:
    """`kata-vfio-ctl boot` on `host`, logging to `log` (bind.py passes both: this module
    does not import bind)."""
    from kata_vfio_ctl import plugin_ledger
    from kata_vfio_host.bindings import bind_groups, wait_for_group_node
    from kata_vfio_host.bindplan import plan_bind
    from kata_vfio_host.boots import forget_earlier_boots
    from kata_vfio_host.ledger import ADMIN
    from kata_vfio_host.owners import KUBERNETES_ALLOCATION
    from kata_vfio_host.persist import persist_path, read_persisted
    from kata_vfio_host.usage import use_checker

    persisted = read_persisted()  # a broken file: one line, before anything changes
    with step("dropping what earlier boots left in the ledger"):
        dropped = forget_earlier_boots(host)
    with step("dropping the device plugin's allocations of earlier boots"):
        records = {a.id: a for a in plugin_ledger.forget_earlier_boots(host)}
    lines: list[str] = []
    failed: list[str] = []
    containers = sorted(c for c in dropped.claims if not c.startswith(KUBERNETES_ALLOCATION))
    allocations = sorted(
        {*records, *(c for c in dropped.claims if c.startswith(KUBERNETES_ALLOCATION))}
    )
    if containers:
        lines.append(
            f"cleared the claims of containers {', '.join(containers)} from the "
            "previous boot (no container survives a reboot)"
        )
    if allocations:
        named = [
            f"{a} ({records[a].resource})" if a in records and records[a].resource else a
            for a in allocations
        ]
        lines.append(
            f"cleared the device plugin's allocations {', '.join(named)} from the "
            "previous boot (no pod survives a reboot)"
        )
    made: list[str] = []
    vf_failed: list[str] = []
    for v in persisted.vfs:
        try:
            with step(f"making the VFs of {v.address} again"):
                lines.append(_make_vfs(host, v, args.timeout))
        except (KataVfioError, OSError) as exc:
            reason = exc.one_line() if isinstance(exc, KataVfioError) else str(exc)
            failed.append(
                f"make the VFs of {v.address} ({v.ids}, {v.count} VFs, persistent): {reason}"
            )
            vf_failed.append(str(v.address))
            continue
        made.append(str(v.address))
    from kata_vfio.pci import device_dir, read_link

    for addr, entry in dropped.devices.items():
        now = read_link(os.path.join(device_dir(host.sysfs, PciAddress.parse(addr)), "driver"))
        lines.append(
            f"{addr}: the previous boot's bind by {entry.owner} ended with the "
            f"reboot (now on {now or 'no driver'}): its record dropped, the device "
            "not touched"
        )
    for addr, original in dropped.vf_configs.items():
        lines.append(
            f"{addr}: the previous boot's VF settings of {original.owner}: "
            "record dropped (the reboot reset them)"
        )
    in_use = use_checker(host.sysfs, Path("/proc"))
    bound: list[str] = []
    for b in persisted.binds:
        what = f"{b.address} ({b.ids}, persistent)"
        try:
            with step(f"binding {b.address} again"):
                from kata_vfio.pci import read_device

                if not os.path.isdir(os.path.join(host.sysfs, "bus/pci/devices", str(b.address))):
                    raise DeviceError(
                        f"{b.address} is not on this host now",
                        (
                            f"a VF of {', '.join(vf_failed)}, whose VFs were not made? see above; "
                            if vf_failed
                            else ""
                        )
                        + f"plug it back, or drop it: kata-vfio-ctl restore {b.address}",
                    )
                dev = read_device(host.sysfs, b.address)
                if (dev.vendor, dev.device) != (b.vendor, b.device):
                    raise DeviceError(
                        f"{b.address} is now {dev.vendor:04x}:{dev.device:04x}, not {b.ids} "
                        "as when bound with --persist: not bound",
                        f"kata-vfio-ctl restore {b.address} to forget it, or bind --persist "
                        "it again",
                    )
                group, moves = plan_bind(host.sysfs, b.address)
                bind_groups(host, [b.address], ADMIN, in_use=in_use)
                node = wait_for_group_node(host, group, args.timeout)
        except (KataVfioError, OSError) as exc:
            reason = exc.one_line() if isinstance(exc, KataVfioError) else str(exc)
            failed.append(f"bind {what}: {reason}")
            continue
        bound.append(str(b.address))
        if moves:
            moved = ", ".join(f"{d.address} ({d.driver or 'no driver'})" for d in moves)
            lines.append(f"re-bound {what}: {moved} -> vfio-pci, IOMMU group {group}: {node}")
        else:
            lines.append(
                f"{what}: already on vfio-pci (IOMMU group {group}: {node}), nothing moved"
            )
    fields = {
        "claims_cleared": containers,
        "allocations_cleared": allocations,
        "records_dropped": sorted(dropped.devices),
        "vfs_made": made,
        "bound": bound,
        "failures": failed,
    }
    if failed:
        log.error("boot", **fields)
    else:
        log.info("boot", **fields)
    for line in lines:
        print(line)
    if not lines and not failed:
        print(
            f"nothing to do: no records of earlier boots, no persistent binds or VF "
            f"counts in {persist_path()}"
        )
    sys.stdout.flush()
    for failure in failed:
        print(f"{PROG}: cannot {failure}", file=sys.stderr)
    return 1 if failed else 0


def add_parsers(sub: Any) -> Any:
    p = sub.add_parser(
        "boot",
        help="at boot (kata-vfio-boot.service): drop the previous boot's claims and "
        "records, make the persistent VF counts (vfs --persist) and bind the "
        "persistent devices (bind --persist) again",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="wait for a PF's driver, its VFs, /dev/vfio/N (s)",
    )
    return p  # parser.py sets its func: cmd_boot with the command's host and log
