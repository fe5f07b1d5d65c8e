"""`kata-vfio-ctl devices`: the PCI functions, their IOMMU groups, drivers, owners, uses."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kata_vfio.errors import UsageError
from kata_vfio_ctl import base
from kata_vfio_ctl.base import device_argument


def id_filter(text: str) -> Callable[[Any], bool]:
    """lspci -d style: VENDOR:DEVICE[:CLASS], the parser io.kata-vfio.select uses."""
    from kata_vfio_host.allocate import parse_ids

    return parse_ids(
        text, "devices -d", error=UsageError, example="8086:*, 8086:10d3 or ::0200"
    ).matches


def device_records(args: argparse.Namespace, host: Any) -> list[dict[str, Any]]:
    import fnmatch
    import re

    from kata_vfio.pci import group_members, interfaces_below, list_addresses, read_device
    from kata_vfio_host.ledger import read_journal
    from kata_vfio_host.pciids import device_name
    from kata_vfio_host.usage import use_checker

    uses = use_checker(host.sysfs, Path("/proc"))  # one walk over /proc for the listing
    matchers = [id_filter(f) for f in args.ids or []]
    try:
        name_re = re.compile(args.name, re.IGNORECASE) if args.name else None
    except re.error as exc:
        raise UsageError(
            f"bad --name pattern {args.name!r}: {exc}",
            "a regular expression, e.g. --name 'I350|X710'",
        ) from None
    from kata_vfio_host.allocate import Pool
    from kata_vfio_host.ledger import earlier_boot, read_journal_file
    from kata_vfio_host.owners import claim_gone
    from kata_vfio_host.pciids import class_name
    from kata_vfio_host.persist import read_persisted
    from kata_vfio_host.settings import load_settings

    # the forms bind takes (DDDD:BB:SS.F, BB:SS.F, an interface name), or address globs
    exact: set[str] = set()
    globs: list[str] = []
    for text in args.addresses or []:
        if any(c in text for c in "*?["):
            short = text.count(":") == 1 and len(text.partition(":")[0]) <= 2  # BB:SS.F
            globs.append("0000:" + text if short else text)
        else:
            exact.add(str(device_argument(host.sysfs, text)))
    # a bind of an earlier boot ended with it: nobody has bound the device now
    journal = {
        a: e for a, e in read_journal(host).items() if not earlier_boot(host, e.get("boot_id"))
    }
    persisted = read_persisted()
    persistent = {str(b.address) for b in persisted.binds}
    vf_counts = {str(v.address): v.count for v in persisted.vfs}
    claims = {g: c for g, c in read_journal_file(host).claims.items() if not claim_gone(host, c)}
    pool = Pool(host, load_settings().autobind_allow)
    records: list[dict[str, Any]] = []
    for addr in list_addresses(host.sysfs):
        if (
            args.addresses
            and str(addr) not in exact
            and not any(fnmatch.fnmatch(str(addr), g) for g in globs)
        ):
            continue
        dev = read_device(host.sysfs, addr)
        name = device_name(dev.vendor, dev.device)
        if any(not m(dev) for m in matchers) or (name_re and not name_re.search(name)):
            continue
        base = Path(host.sysfs) / "bus/pci/devices" / str(addr)
        virtfns = sorted(
            os.path.basename(os.readlink(base / n))
            for n in os.listdir(base)
            if n.startswith("virtfn")
        )
        others = (
            [str(m) for m in group_members(host.sysfs, dev.iommu_group) if m != addr]
            if dev.iommu_group is not None
            else []
        )
        claim = claims.get(dev.iommu_group.number) if dev.iommu_group is not None else None
        not_free: str | None
        if dev.is_bridge or dev.iommu_group is None:
            not_free = "a bridge" if dev.is_bridge else "no IOMMU group"
        else:
            not_free = pool.why_not_free(dev)
        if args.free and not_free is not None:
            if isinstance(getattr(args, "not_free", None), list):
                args.not_free.append((str(addr), not_free))  # for "nothing is free"
            continue
        total = base / "sriov_totalvfs"
        records.append(
            {
                "address": str(addr),
                "vendor": f"{dev.vendor:04x}",
                "device": f"{dev.device:04x}",
                "subsystem_vendor": f"{dev.subsystem_vendor:04x}",
                "subsystem_device": f"{dev.subsystem_device:04x}",
                "class": f"{dev.class_code:06x}",
                "class_name": class_name(dev.class_code),
                "name": name,
                "driver": dev.driver,
                "iommu_group": dev.iommu_group.number if dev.iommu_group is not None else None,
                "group_members": others,
                "physfn": str(dev.physfn) if dev.physfn else None,
                "virtfns": virtfns,
                "interfaces": interfaces_below(host.sysfs, addr),
                "in_use": [] if dev.is_bridge else uses(addr),
                "bound_by": (journal.get(str(addr)) or {}).get("owner"),
                "owner": claim.container if claim is not None else None,
                "sriov_totalvfs": int(total.read_text()) if total.exists() else None,
                "free": not_free is None,
                "not_free": not_free,
                "persistent": str(addr) in persistent,
                "persistent_vfs": vf_counts.get(str(addr)),
            }
        )
    return records


def cmd_devices(args: argparse.Namespace) -> int:
    import json

    args.not_free = []
    records = device_records(args, base._host(args))
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    if args.free and not records:
        # why nothing is free, device by device (bridges are never handed out)
        reasons = [(a, why) for a, why in args.not_free if why != "a bridge"]
        print(
            "nothing is free"
            + (":" if reasons else " (no device matches; kata-vfio-ctl devices lists them)")
        )
        for addr, why in reasons:
            print(f"  {addr}: {why}")
        return 0
    print(f"{'ADDRESS':13} {'IDS':9} {'CLASS':6} {'DRIVER':12} {'GROUP':>5}  {'OWNER':14} NAME")
    for r in records:
        group = "-" if r["iommu_group"] is None else str(r["iommu_group"])
        owner = (r["owner"] or "-")[:14]
        print(
            f"{r['address']:13} {r['vendor']}:{r['device']} {r['class'][:4]:6} "
            f"{r['driver'] or '-':12} {group:>5}  {owner:14} {r['class_name']}: "
            f"{r['name']}"
        )
        notes = []
        if r["group_members"]:
            notes.append(f"group also: {', '.join(r['group_members'])}")
        if r["physfn"]:
            notes.append(f"VF of {r['physfn']}")
        if r["virtfns"] or r["sriov_totalvfs"]:
            notes.append(
                f"VFs ({len(r['virtfns'])} of {r['sriov_totalvfs']}): "
                f"{', '.join(r['virtfns']) or 'none'}"
            )
        if r["interfaces"]:
            notes.append(f"net: {', '.join(r['interfaces'])}")
        notes += [f"IN USE: {u}" for u in r["in_use"]]
        if r["bound_by"]:
            notes.append(f"bound by {r['bound_by']}")
        if r["persistent"]:
            notes.append("bound again at every boot (bind --persist)")
        if r["persistent_vfs"]:
            notes.append(f"{r['persistent_vfs']} VFs made again at every boot (vfs --persist)")
        for note in notes:
            print(f"{'':14}{note}")
    return 0
