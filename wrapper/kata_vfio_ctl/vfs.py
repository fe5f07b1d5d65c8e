"""`kata-vfio-ctl vfs`: SR-IOV virtual functions made (or removed) for VFIO use."""

from __future__ import annotations

import argparse
from typing import Any

from kata_vfio.boundary import describe, step
from kata_vfio.errors import DeviceError
from kata_vfio_ctl import base
from kata_vfio_ctl.base import _event_log, device_argument


def cmd_vfs(args: argparse.Namespace) -> int:
    import json

    from kata_vfio.pci import read_device
    from kata_vfio_ctl import persistent
    from kata_vfio_host.ledger import ADMIN, read_journal
    from kata_vfio_host.sriov import set_vf_count, total_vfs, virtual_functions

    host = base._host(args)
    pf = device_argument(host.sysfs, args.pf)
    log = _event_log(args)
    if args.count == 0 and (gone := persistent.forget_absent_pf(host, pf)):
        print("\n".join(gone))  # a persistent VF count of a PF that is not here
        return 0
    try:
        total_vfs(host.sysfs, pf)  # "no PCI device", "no SR-IOV capability" first
        before = virtual_functions(host.sysfs, pf)
        journal = read_journal(host)
        # the admin's binds (containers' own show up as owners in set_vf_count's refusal)
        bound = [str(v) for v in before if (journal.get(str(v)) or {}).get("owner") == ADMIN]
        resizing = bool(before) and len(before) != args.count
        if resizing and bound and not args.force:
            # the kernel only resizes through 0: every existing VF goes, binds included
            raise DeviceError(
                f"{pf} has {len(before)} virtual functions and kata-vfio bound "
                f"{', '.join(bound)}; changing the count to {args.count} removes them all",
                f"give them back first (kata-vfio-ctl restore {' '.join(bound)}), "
                "or pass --force to drop those binds with their VFs",
            )
        # the persistent VF count and binds first: refused, or put back, with nothing set
        kept, persisted = persistent.record_vfs(
            host, pf, args.count, args.persist, before, resizing
        )
        with step(f"setting the virtual functions of {pf} to {args.count}"):
            try:
                vfs = set_vf_count(host, pf, args.count, force=args.force)
            except BaseException:
                if kept is not None:
                    persistent.put_back(kept)
                raise
    except Exception as exc:
        log.error("virtual functions not set", pf=str(pf), count=args.count, error=describe(exc)[0])
        raise
    dropped = bound if resizing else []
    log.info(
        "virtual functions set",
        pf=str(pf),
        count=args.count,
        vfs=[str(v) for v in vfs],
        binds_dropped=dropped,
    )
    records: list[dict[str, Any]] = []
    for vf in vfs:
        dev = read_device(host.sysfs, vf)
        records.append(
            {
                "address": str(vf),
                "ids": dev.ids,
                "driver": dev.driver,
                "iommu_group": dev.iommu_group.number if dev.iommu_group is not None else None,
            }
        )
    unbound = [r["address"] for r in records if r["driver"] is None]
    if args.json:
        print(
            json.dumps(
                {
                    "pf": str(pf),
                    "vfs": records,
                    "binds_dropped": dropped,
                    "unbound": unbound,
                    "persistent": persisted,
                },
                indent=1,
            )
        )
        return 0
    for r in records:
        print(
            f"{r['address']}: VF of {pf} [{r['ids']}] IOMMU group "
            f"{'-' if r['iommu_group'] is None else r['iommu_group']}, driver "
            f"{r['driver'] or 'none'}"
        )
    if dropped:
        print(f"{pf}: the binds of {', '.join(dropped)} went with the old virtual functions")
    for line in persisted:
        print(line)
    if not vfs:
        print(f"{pf}: no virtual functions")
    elif unbound:
        print(
            f"next: kata-vfio-ctl bind {' '.join(unbound)} hands them to vfio-pci "
            "(or let io.kata-vfio.select take them through the auto-bind allow-list)"
        )
    return 0
