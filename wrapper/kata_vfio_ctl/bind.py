"""`kata-vfio-ctl bind`, `restore` and `boot`: the admin's binds to vfio-pci, giving
devices back, and the persistent binds again at boot."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kata_vfio.boundary import describe, step
from kata_vfio.errors import DeviceError, UsageError
from kata_vfio_ctl import base
from kata_vfio_ctl.base import PROG, _event_log, device_argument


def cmd_boot(args: argparse.Namespace) -> int:
    from kata_vfio_ctl import persistent

    return persistent.cmd_boot(args, base._host(args), _event_log(args))


def cmd_bind(args: argparse.Namespace) -> int:
    import json

    from kata_vfio_host.bindings import bind_groups, wait_for_group_node
    from kata_vfio_host.bindplan import plan_bind
    from kata_vfio_host.ledger import ADMIN
    from kata_vfio_host.usage import use_checker

    host = base._host(args)
    addresses = [device_argument(host.sysfs, text) for text in args.addresses]
    in_use = use_checker(host.sysfs, Path("/proc"))  # one walk over /proc for every device

    groups: dict[Any, Any] = {}
    verb = "would move" if args.dry_run else "moving"
    planned: list[Any] = []
    # every device decided before a word of what will happen: a refusal of the last
    # one leaves nothing moved and no "moving" said
    for addr in addresses:
        with step(f"planning the bind of {addr}"):
            group, moves = plan_bind(host.sysfs, addr)
            if group in groups:
                continue
            groups[group] = addr
            if not args.force:
                for dev in moves:
                    reasons = in_use(dev.address)
                    if reasons:
                        raise DeviceError(
                            f"PCI device {dev.address} is in use: {'; '.join(reasons)}",
                            "stop using it first, or pass --force; nothing was moved",
                        )
            planned += moves

    def say_moves() -> None:
        if args.json:
            return  # stdout is the JSON document
        for dev in planned:
            print(
                f"{verb} {dev.address} ({dev.ids}, {dev.driver or 'no driver'}) -> vfio-pci",
                flush=True,
            )

    from kata_vfio_ctl import persistent

    moved = [{"address": str(d.address), "ids": d.ids, "driver": d.driver} for d in planned]
    if args.dry_run:
        if args.persist:
            persistent.check_persistable(host, addresses)
        say_moves()
        return _say_dry_run(args, groups, moved)
    log = _event_log(args)
    # the persistent list first: a file that cannot be written refuses with nothing moved
    before = persistent.record_persistent(host, addresses) if args.persist else None
    with step(f"binding {', '.join(str(a) for a in addresses)}"):
        try:
            # every group at once: the kernel work of all devices runs concurrently
            # "moving" only once the ledger took the bind (no live container holds a group)
            bind_groups(
                host,
                list(groups.values()),
                ADMIN,
                force=args.force,
                in_use=in_use,
                on_decided=say_moves,
            )
            before = None
        except PermissionError as exc:
            raise DeviceError(
                f"cannot write {exc.filename}: permission denied",
                "binding devices needs root: run kata-vfio-ctl as root"
                if os.geteuid()
                else "check the kernel log and the security policy (SELinux, AppArmor)",
            ) from exc
        except Exception as exc:
            log.error("bind failed", devices=[str(a) for a in addresses], error=describe(exc)[0])
            raise
        finally:
            if before is not None:  # the bind failed: not persistent either
                persistent.put_back(before)
    log.info("bound", devices=[str(a) for a in addresses], groups=[g.number for g in groups])
    nodes = []
    for group, addr in groups.items():
        node = wait_for_group_node(host, group, args.timeout)
        nodes.append(
            {
                "address": str(addr),
                "iommu_group": group.number,
                "node": node,
                "persistent": bool(args.persist),
            }
        )
        if not args.json:
            print(f"{addr}: IOMMU group {group} on vfio-pci: {node}  (podman --device {node})")
    if args.json:
        print(json.dumps({"dry_run": False, "moves": moved, "groups": nodes}, indent=1))
    elif args.persist:
        from kata_vfio_host.persist import persist_path

        for addr in addresses:
            print(
                f"{addr}: bound again at every boot (kata-vfio-boot.service; listed in "
                f"{persist_path()})"
            )
    return 0


def _say_dry_run(
    args: argparse.Namespace, groups: dict[Any, Any], moved: list[dict[str, Any]]
) -> int:
    """`bind --dry-run`'s result, once every device was decided."""
    import json

    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": True,
                    "moves": moved,
                    "groups": [
                        {"address": str(a), "iommu_group": g.number, "node": f"/dev/vfio/{g}"}
                        for g, a in groups.items()
                    ],
                },
                indent=1,
            )
        )
        return 0
    for group, addr in groups.items():
        print(
            f"{addr}: IOMMU group {group} would be on vfio-pci: /dev/vfio/{group}"
            f"{', and again at every boot' if args.persist else ''} "
            "(dry run: nothing changed)"
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    import json

    from kata_vfio_ctl import persistent
    from kata_vfio_host.giveback import release_gone, restore, restore_all

    host = base._host(args)
    if (args.all + args.stale + bool(args.addresses)) != 1:
        raise UsageError("give addresses, --all or --stale", "e.g. kata-vfio-ctl restore --all")
    log = _event_log(args)
    gone: list[str] = []
    persistent.check_readable()  # a broken list of persistent binds: refused, nothing changed
    with step("giving devices back"):
        if args.stale:
            gone, report = release_gone(host)
        else:
            named = [device_argument(host.sysfs, t) for t in args.addresses]
            report = (
                restore_all(host, force=args.force)
                if args.all
                else restore(host, named, force=args.force)
            )
    unpersisted: list[str] = []
    if not args.stale:
        # given back, or its bind ended with an earlier boot: the admin wants it off
        # vfio-pci, at the next boot too
        unpersisted = persistent.drop_persistent(
            host,
            [*report.restored, *report.forgotten_devices],
            everything=args.all and not report.failed,
        )
        if args.addresses:  # persistent, but not kata-vfio's in this boot: forget it too
            unbound = {str(a) for a in named} & {
                f.split(": ", 1)[0] for f in report.failed if ": not bound by kata-vfio" in f
            }
            more = persistent.drop_persistent(host, sorted(unbound), everything=False)
            dropped = {line.split(": ", 1)[0] for line in more}
            report.failed = [
                f
                for f in report.failed
                if f.split(": ", 1)[0] not in dropped or ": not bound by kata-vfio" not in f
            ]
            unpersisted += more
    fields = {
        "devices": report.restored,
        "failures": report.failed,
        "vf_settings": report.vf_settings,
        "taken": report.taken,
        "containers_released": gone,
        "earlier_boot": report.forgotten,
        "unpersisted": unpersisted,
    }
    if report.failed:  # a device left on vfio-pci that should have gone back
        log.error("restore failed", **fields)
    else:
        log.info("restored", **fields)
    if args.json:
        print(
            json.dumps(
                {
                    "restored": report.restored,
                    "failed": report.failed,
                    "vf_settings": report.vf_settings,
                    "taken": report.taken,
                    "containers_released": gone,
                    "earlier_boot": report.forgotten,
                    "unpersisted": unpersisted,
                },
                indent=1,
            )
        )
        return 1 if report.failed else 0
    for cid in gone:
        print(f"container {cid} is gone: its claims were dropped")
    for addr in report.restored:
        print(f"{addr}: given back to its original driver")
    for line in report.forgotten:
        print(line)
    for line in unpersisted:
        print(line)
    for line in report.vf_settings:
        print(f"{line}: the PF's VF settings given back")
    for line in report.taken:
        print(line)
    for failure in report.failed:
        print(f"{PROG}: cannot restore {failure}", file=sys.stderr)
    if report.restored or report.failed or report.vf_settings or report.forgotten or unpersisted:
        pass
    elif args.stale and gone:
        print(
            "no device needed giving back: they stay on vfio-pci, free for the next "
            "container (kata-vfio-ctl restore --all gives back what kata-vfio bound)"
        )
    elif args.stale:
        print("no container is gone: nothing to release (kata-vfio-ctl devices shows the owners)")
    else:
        print(
            "nothing to restore: kata-vfio bound none of these (kata-vfio-ctl devices "
            "shows what it bound)"
        )
    return 1 if report.failed else 0
