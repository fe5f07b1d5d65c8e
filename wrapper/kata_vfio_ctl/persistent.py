"""`bind --persist`, what `restore` does to persistence, and `kata-vfio-ctl boot`.

`boot` is what kata-vfio-boot.service runs early at boot, before any container engine:
it drops what earlier boots left in the ledger (no container survives a reboot, and the
reboot already gave every device back to its driver, so nothing is given back), then
binds the persistent devices to vfio-pci again, and says exactly that.
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


def record_persistent(host: Any, addresses: list[Any]) -> list[Any]:
    """Add the devices to the persistent binds (before the bind: a file we cannot write
    refuses the bind with nothing moved); returns the list as it was, to put back if the
    bind fails."""
    from kata_vfio.pci import read_device
    from kata_vfio_host.persist import PersistentBind, editing_binds

    with editing_binds() as binds:
        before = list(binds)
        known = {str(b.address): i for i, b in enumerate(binds)}
        for addr in addresses:
            dev = read_device(host.sysfs, addr)
            entry = PersistentBind(addr, dev.vendor, dev.device)
            if str(addr) in known:
                binds[known[str(addr)]] = entry
            else:
                known[str(addr)] = len(binds)
                binds.append(entry)
    return before


def put_back(before: list[Any]) -> None:
    from kata_vfio_host.persist import editing_binds

    with editing_binds() as binds:
        binds[:] = before


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
                lines.append(f"{b.address}: no longer bound at boot (removed from "
                             f"{persist_path()})")
            else:
                kept.append(b)
        binds[:] = kept
    return lines


def cmd_boot(args: argparse.Namespace, host: Any, log: Any) -> int:
    """`kata-vfio-ctl boot` on `host`, logging to `log` (bind.py passes both: this module
    does not import bind)."""
    from kata_vfio_host.bindings import bind_groups, wait_for_group_node
    from kata_vfio_host.bindplan import plan_bind
    from kata_vfio_host.boots import forget_earlier_boots
    from kata_vfio_host.ledger import ADMIN
    from kata_vfio_host.persist import persist_path, read_binds
    from kata_vfio_host.usage import use_checker

    binds = read_binds()  # a broken file: one line, before anything changes
    with step("dropping what earlier boots left in the ledger"):
        dropped = forget_earlier_boots(host)
    lines: list[str] = []
    failed: list[str] = []
    if dropped.claims:
        lines.append("cleared the claims of containers "
                     f"{', '.join(sorted(dropped.claims))} from the previous boot "
                     "(no container survives a reboot)")
    from kata_vfio.pci import device_dir, read_link

    for addr, entry in dropped.devices.items():
        now = read_link(os.path.join(device_dir(host.sysfs, PciAddress.parse(addr)), "driver"))
        lines.append(f"{addr}: the previous boot's bind by {entry.owner} ended with the "
                     f"reboot (now on {now or 'no driver'}): its record dropped, the device "
                     "not touched")
    for addr, original in dropped.vf_configs.items():
        lines.append(f"{addr}: the previous boot's VF settings of {original.owner}: "
                     "record dropped (the reboot reset them)")
    in_use = use_checker(host.sysfs, Path("/proc"))
    bound: list[str] = []
    for b in binds:
        what = f"{b.address} ({b.ids}, persistent)"
        try:
            with step(f"binding {b.address} again"):
                from kata_vfio.pci import read_device

                if not os.path.isdir(os.path.join(host.sysfs, "bus/pci/devices",
                                                  str(b.address))):
                    raise DeviceError(f"{b.address} is not on this host now",
                                      f"plug it back, or drop it: kata-vfio-ctl restore "
                                      f"{b.address}")
                dev = read_device(host.sysfs, b.address)
                if (dev.vendor, dev.device) != (b.vendor, b.device):
                    raise DeviceError(
                        f"{b.address} is now {dev.vendor:04x}:{dev.device:04x}, not {b.ids} "
                        "as when bound with --persist: not bound",
                        f"kata-vfio-ctl restore {b.address} to forget it, or bind --persist "
                        "it again")
                group, moves = plan_bind(host.sysfs, b.address)
                bind_groups(host, [b.address], ADMIN, in_use=in_use)
                node = wait_for_group_node(host, group, args.timeout)
        except (KataVfioError, OSError) as exc:
            reason = exc.one_line() if isinstance(exc, KataVfioError) else str(exc)
            failed.append(f"{what}: {reason}")
            continue
        bound.append(str(b.address))
        if moves:
            moved = ", ".join(f"{d.address} ({d.driver or 'no driver'})" for d in moves)
            lines.append(f"re-bound {what}: {moved} -> vfio-pci, IOMMU group {group}: {node}")
        else:
            lines.append(f"{what}: already on vfio-pci (IOMMU group {group}: {node}), "
                         "nothing moved")
    log.info("boot", claims_cleared=sorted(dropped.claims),
                          records_dropped=sorted(dropped.devices), bound=bound,
                          failures=failed)
    for line in lines:
        print(line)
    if not lines and not failed:
        print(f"nothing to do: no records of earlier boots, no persistent binds in "
              f"{persist_path()}")
    for failure in failed:
        print(f"{PROG}: cannot bind {failure}", file=sys.stderr)
    return 1 if failed else 0


def add_parsers(sub: Any) -> Any:
    p = sub.add_parser(
        "boot", help="at boot (kata-vfio-boot.service): drop the previous boot's claims and "
                     "records, bind the persistent devices (bind --persist) again")
    p.add_argument("--timeout", type=float, default=5.0, help="wait for /dev/vfio/N (s)")
    return p  # parser.py sets its func: cmd_boot with the command's host and log
