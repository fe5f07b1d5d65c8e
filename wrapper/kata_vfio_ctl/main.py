"""`kata-vfio-ctl`: host tools (a separate command: `list`, `state` ... are OCI verbs)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kata_vfio.boundary import describe, guarded, step
from kata_vfio.errors import DeviceError, UsageError

PROG = "kata-vfio-ctl"
IFNAMSIZ = 16  # the kernel's limit, terminating NUL included


def _default_runtime_path() -> str:
    return str(Path(sys.argv[0]).resolve().with_name("kata-vfio"))


def cmd_podman_register(args: argparse.Namespace) -> int:
    from kata_vfio_ctl.podman_conf import register

    changed = register(Path(args.conf), args.runtime_path)
    print(f"{'registered' if changed else 'already registered'}: kata-vfio = "
          f"[{args.runtime_path!r}] in {args.conf}")
    return 0


def cmd_podman_unregister(args: argparse.Namespace) -> int:
    from kata_vfio_ctl.podman_conf import unregister

    changed = unregister(Path(args.conf))
    print(f"{'removed' if changed else podman_absent(Path(args.conf))}: kata-vfio in {args.conf}")
    return 0


def podman_absent(conf: Path) -> str:
    from kata_vfio_ctl.podman_conf import registered

    value, ours = registered(conf)
    return "not registered" if value is None or ours else \
        "not added by kata-vfio-ctl, left alone"


def _event_log(args: argparse.Namespace) -> Any:
    """structlog, JSON lines into config.toml's log_file: what the admin's commands
    changed on the host (the wrappers write the same shape without structlog)."""
    from kata_vfio_host.hostlog import file_logger
    from kata_vfio_host.settings import load_settings

    return file_logger(load_settings().log_file, warn=sys.stderr, journal=sys.stderr,
                       tool=PROG, command=args.command)


def _host(args: argparse.Namespace) -> Any:
    from kata_vfio_host.ledger import Host
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    return Host(sysfs=Path(settings.sysfs), state_dir=Path(settings.state_dir))


def valid_interface_name(text: str) -> bool:
    """The kernel's rule for interface names (dev_valid_name): a safe path component."""
    return (0 < len(text) < IFNAMSIZ and text not in (".", "..") and text.isprintable()
            and not any(c in text for c in "/: \t\n"))


def function_of_interface(sysfs: Path, ifname: str) -> Any:
    """The PCI function an interface lives on: the nearest PCI address above it in sysfs
    (a virtio NIC's interface sits at <function>/virtio2/net/eth0)."""
    from kata_vfio.errors import KataVfioError
    from kata_vfio.pci import PciAddress, device_dir

    link = Path(sysfs) / "class/net" / ifname
    if not os.path.lexists(link):
        raise DeviceError(f"no PCI device or network interface {ifname!r} on this host",
                          "give DDDD:BB:SS.F, BB:SS.F or an interface name; "
                          "list them with: kata-vfio-ctl devices")
    target = Path(os.path.realpath(link))
    root = Path(os.path.realpath(sysfs))
    below = target.relative_to(root).parts if target.is_relative_to(root) else ()
    for part in reversed(below):
        try:
            addr = PciAddress.parse(part)
        except KataVfioError:
            continue
        if os.path.isdir(device_dir(sysfs, addr)):
            return addr
    raise DeviceError(f"interface {ifname} is not on a PCI device ({target})",
                      "only PCI functions can be handed to vfio-pci; "
                      "list them with: kata-vfio-ctl devices")


def device_argument(sysfs: Path, text: str) -> Any:
    """A device as users name it: DDDD:BB:SS.F, BB:SS.F (domain 0000, as lspci prints it)
    or a network interface name. Parsed strictly; never joined to a path unchecked."""
    from kata_vfio.pci import PciAddress

    text = text.strip()
    if text.count(":") == 1:
        return PciAddress.parse("0000:" + text)
    if ":" not in text and valid_interface_name(text):
        return function_of_interface(sysfs, text)
    return PciAddress.parse(text)


def id_filter(text: str) -> Callable[[Any], bool]:
    """lspci -d style: VENDOR:DEVICE[:CLASS], the parser io.kata-vfio.select uses."""
    from kata_vfio_host.allocate import parse_ids

    return parse_ids(text, "devices -d", error=UsageError,
                     example="8086:*, 8086:10d3 or ::0200").matches


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
        raise UsageError(f"bad --name pattern {args.name!r}: {exc}",
                         "a regular expression, e.g. --name 'I350|X710'") from None
    from kata_vfio_host.allocate import Pool
    from kata_vfio_host.ledger import claim_gone, earlier_boot, read_journal_file
    from kata_vfio_host.pciids import class_name
    from kata_vfio_host.persist import read_binds
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
    journal = {a: e for a, e in read_journal(host).items()
               if not earlier_boot(host, e.get("boot_id"))}
    persistent = {str(b.address) for b in read_binds()}
    claims = {g: c for g, c in read_journal_file(host).claims.items()
              if not claim_gone(host, c)}
    pool = Pool(host, load_settings().autobind_allow)
    records: list[dict[str, Any]] = []
    for addr in list_addresses(host.sysfs):
        if args.addresses and str(addr) not in exact \
                and not any(fnmatch.fnmatch(str(addr), g) for g in globs):
            continue
        dev = read_device(host.sysfs, addr)
        name = device_name(dev.vendor, dev.device)
        if any(not m(dev) for m in matchers) or (name_re and not name_re.search(name)):
            continue
        base = Path(host.sysfs) / "bus/pci/devices" / str(addr)
        virtfns = sorted(os.path.basename(os.readlink(base / n)) for n in os.listdir(base)
                         if n.startswith("virtfn"))
        others = [str(m) for m in group_members(host.sysfs, dev.iommu_group)
                  if m != addr] if dev.iommu_group is not None else []
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
        records.append({
            "address": str(addr), "vendor": f"{dev.vendor:04x}", "device": f"{dev.device:04x}",
            "subsystem_vendor": f"{dev.subsystem_vendor:04x}",
            "subsystem_device": f"{dev.subsystem_device:04x}",
            "class": f"{dev.class_code:06x}", "class_name": class_name(dev.class_code),
            "name": name, "driver": dev.driver,
            "iommu_group": dev.iommu_group.number if dev.iommu_group is not None else None,
            "group_members": others, "physfn": str(dev.physfn) if dev.physfn else None,
            "virtfns": virtfns, "interfaces": interfaces_below(host.sysfs, addr),
            "in_use": [] if dev.is_bridge else uses(addr),
            "bound_by": (journal.get(str(addr)) or {}).get("owner"),
            "owner": claim.container if claim is not None else None,
            "sriov_totalvfs": int(total.read_text()) if total.exists() else None,
            "free": not_free is None, "not_free": not_free,
            "persistent": str(addr) in persistent,
        })
    return records


def cmd_devices(args: argparse.Namespace) -> int:
    import json

    args.not_free = []
    records = device_records(args, _host(args))
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    if args.free and not records:
        # why nothing is free, device by device (bridges are never handed out)
        reasons = [(a, why) for a, why in args.not_free if why != "a bridge"]
        print("nothing is free" + (":" if reasons else
                                   " (no device matches; kata-vfio-ctl devices lists them)"))
        for addr, why in reasons:
            print(f"  {addr}: {why}")
        return 0
    print(f"{'ADDRESS':13} {'IDS':9} {'CLASS':6} {'DRIVER':12} {'GROUP':>5}  "
          f"{'OWNER':14} NAME")
    for r in records:
        group = "-" if r["iommu_group"] is None else str(r["iommu_group"])
        owner = (r["owner"] or "-")[:14]
        print(f"{r['address']:13} {r['vendor']}:{r['device']} {r['class'][:4]:6} "
              f"{r['driver'] or '-':12} {group:>5}  {owner:14} {r['class_name']}: "
              f"{r['name']}")
        notes = []
        if r["group_members"]:
            notes.append(f"group also: {', '.join(r['group_members'])}")
        if r["physfn"]:
            notes.append(f"VF of {r['physfn']}")
        if r["virtfns"] or r["sriov_totalvfs"]:
            notes.append(f"VFs ({len(r['virtfns'])} of {r['sriov_totalvfs']}): "
                         f"{', '.join(r['virtfns']) or 'none'}")
        if r["interfaces"]:
            notes.append(f"net: {', '.join(r['interfaces'])}")
        notes += [f"IN USE: {u}" for u in r["in_use"]]
        if r["bound_by"]:
            notes.append(f"bound by {r['bound_by']}")
        if r["persistent"]:
            notes.append("bound again at every boot (bind --persist)")
        for note in notes:
            print(f"{'':14}{note}")
    return 0


def cmd_vfs(args: argparse.Namespace) -> int:
    import json

    from kata_vfio.pci import read_device
    from kata_vfio_host.ledger import ADMIN, read_journal
    from kata_vfio_host.sriov import set_vf_count, total_vfs, virtual_functions

    host = _host(args)
    pf = device_argument(host.sysfs, args.pf)
    log = _event_log(args)
    try:
        total_vfs(host.sysfs, pf)  # "no PCI device", "no SR-IOV capability" first
        before = virtual_functions(host.sysfs, pf)
        journal = read_journal(host)
        # the admin's binds (containers' own show up as owners in set_vf_count's refusal)
        bound = [str(v) for v in before
                 if (journal.get(str(v)) or {}).get("owner") == ADMIN]
        resizing = bool(before) and len(before) != args.count
        if resizing and bound and not args.force:
            # the kernel only resizes through 0: every existing VF goes, binds included
            raise DeviceError(
                f"{pf} has {len(before)} virtual functions and kata-vfio bound "
                f"{', '.join(bound)}; changing the count to {args.count} removes them all",
                f"give them back first (kata-vfio-ctl restore {' '.join(bound)}), "
                "or pass --force to drop those binds with their VFs")
        with step(f"setting the virtual functions of {pf} to {args.count}"):
            vfs = set_vf_count(host, pf, args.count, force=args.force)
    except Exception as exc:
        log.error("virtual functions not set", pf=str(pf), count=args.count,
                  error=describe(exc)[0])
        raise
    dropped = bound if resizing else []
    log.info("virtual functions set", pf=str(pf), count=args.count,
             vfs=[str(v) for v in vfs], binds_dropped=dropped)
    records: list[dict[str, Any]] = []
    for vf in vfs:
        dev = read_device(host.sysfs, vf)
        records.append({"address": str(vf), "ids": dev.ids, "driver": dev.driver,
                        "iommu_group": dev.iommu_group.number
                        if dev.iommu_group is not None else None})
    unbound = [r["address"] for r in records if r["driver"] is None]
    if args.json:
        print(json.dumps({"pf": str(pf), "vfs": records, "binds_dropped": dropped,
                          "unbound": unbound}, indent=1))
        return 0
    for r in records:
        print(f"{r['address']}: VF of {pf} [{r['ids']}] IOMMU group "
              f"{'-' if r['iommu_group'] is None else r['iommu_group']}, driver "
              f"{r['driver'] or 'none'}")
    if dropped:
        print(f"{pf}: the binds of {', '.join(dropped)} went with the old virtual functions")
    if not vfs:
        print(f"{pf}: no virtual functions")
    elif unbound:
        print(f"next: kata-vfio-ctl bind {' '.join(unbound)} hands them to vfio-pci "
              "(or let io.kata-vfio.select take them through the auto-bind allow-list)")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from kata_vfio_ctl import persistent

    return persistent.cmd_boot(args, _host(args), _event_log(args))


def cmd_bind(args: argparse.Namespace) -> int:
    import json

    from kata_vfio_host.bindings import bind_groups, wait_for_group_node
    from kata_vfio_host.bindplan import plan_bind
    from kata_vfio_host.ledger import ADMIN
    from kata_vfio_host.usage import use_checker

    host = _host(args)
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
                            "stop using it first, or pass --force; nothing was moved")
            planned += moves

    def say_moves() -> None:
        if args.json:
            return  # stdout is the JSON document
        for dev in planned:
            print(f"{verb} {dev.address} ({dev.ids}, {dev.driver or 'no driver'}) "
                  "-> vfio-pci", flush=True)

    moved = [{"address": str(d.address), "ids": d.ids, "driver": d.driver} for d in planned]
    if args.dry_run:
        say_moves()
        if args.json:
            print(json.dumps({"dry_run": True, "moves": moved, "groups": [
                {"address": str(a), "iommu_group": g.number, "node": f"/dev/vfio/{g}"}
                for g, a in groups.items()]}, indent=1))
            return 0
        for group, addr in groups.items():
            print(f"{addr}: IOMMU group {group} would be on vfio-pci: /dev/vfio/{group}"
                  f"{', and again at every boot' if args.persist else ''} "
                  "(dry run: nothing changed)")
        return 0
    from kata_vfio_ctl import persistent

    log = _event_log(args)
    # the persistent list first: a file that cannot be written refuses with nothing moved
    before = persistent.record_persistent(host, addresses) if args.persist else None
    with step(f"binding {', '.join(str(a) for a in addresses)}"):
        try:
            # every group at once: the kernel work of all devices runs concurrently
            # "moving" only once the ledger took the bind (no live container holds a group)
            bind_groups(host, list(groups.values()), ADMIN, force=args.force, in_use=in_use,
                        on_decided=say_moves)
            before = None
        except PermissionError as exc:
            raise DeviceError(
                f"cannot write {exc.filename}: permission denied",
                "binding devices needs root: run kata-vfio-ctl as root" if os.geteuid()
                else "check the kernel log and the security policy (SELinux, AppArmor)"
            ) from exc
        except Exception as exc:
            log.error("bind failed", devices=[str(a) for a in addresses],
                      error=describe(exc)[0])
            raise
        finally:
            if before is not None:  # the bind failed: not persistent either
                persistent.put_back(before)
    log.info("bound", devices=[str(a) for a in addresses],
             groups=[g.number for g in groups])
    nodes = []
    for group, addr in groups.items():
        node = wait_for_group_node(host, group, args.timeout)
        nodes.append({"address": str(addr), "iommu_group": group.number, "node": node,
                      "persistent": bool(args.persist)})
        if not args.json:
            print(f"{addr}: IOMMU group {group} on vfio-pci: {node}  (podman --device {node})")
    if args.json:
        print(json.dumps({"dry_run": False, "moves": moved, "groups": nodes}, indent=1))
    elif args.persist:
        from kata_vfio_host.persist import persist_path

        for addr in addresses:
            print(f"{addr}: bound again at every boot (kata-vfio-boot.service; listed in "
                  f"{persist_path()})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    import json

    from kata_vfio_ctl import persistent
    from kata_vfio_host.giveback import release_gone, restore, restore_all

    host = _host(args)
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
            report = (restore_all(host, force=args.force) if args.all else
                      restore(host, named, force=args.force))
    unpersisted: list[str] = []
    if not args.stale:
        # given back, or its bind ended with an earlier boot: the admin wants it off
        # vfio-pci, at the next boot too
        unpersisted = persistent.drop_persistent(
            host, [*report.restored, *report.forgotten_devices],
            everything=args.all and not report.failed)
        if args.addresses:  # persistent, but not kata-vfio's in this boot: forget it too
            unbound = {str(a) for a in named} & {f.split(": ", 1)[0] for f in report.failed
                                                 if ": not bound by kata-vfio" in f}
            more = persistent.drop_persistent(host, sorted(unbound), everything=False)
            dropped = {line.split(": ", 1)[0] for line in more}
            report.failed = [f for f in report.failed if f.split(": ", 1)[0] not in dropped
                             or ": not bound by kata-vfio" not in f]
            unpersisted += more
    fields = {"devices": report.restored, "failures": report.failed,
              "vf_settings": report.vf_settings, "taken": report.taken,
              "containers_released": gone, "earlier_boot": report.forgotten,
              "unpersisted": unpersisted}
    if report.failed:  # a device left on vfio-pci that should have gone back
        log.error("restore failed", **fields)
    else:
        log.info("restored", **fields)
    if args.json:
        print(json.dumps({"restored": report.restored, "failed": report.failed,
                          "vf_settings": report.vf_settings, "taken": report.taken,
                          "containers_released": gone, "earlier_boot": report.forgotten,
                          "unpersisted": unpersisted}, indent=1))
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
    if report.restored or report.failed or report.vf_settings or report.forgotten \
            or unpersisted:
        pass
    elif args.stale and gone:
        print("no device needed giving back: they stay on vfio-pci, free for the next "
              "container (kata-vfio-ctl restore --all gives back what kata-vfio bound)")
    elif args.stale:
        print("no container is gone: nothing to release (kata-vfio-ctl devices shows "
              "the owners)")
    else:
        print("nothing to restore: kata-vfio bound none of these (kata-vfio-ctl devices "
              "shows what it bound)")
    return 1 if report.failed else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from kata_vfio_ctl.checks import FAIL
    from kata_vfio_ctl.doctor import as_json, render, run_checks
    from kata_vfio_ctl.kata_conf import find_config
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    checks = run_checks(Path(settings.sysfs), Path("/proc"), find_config(args.kata_config),
                        Path(args.conf), settings.guest_hook_path, settings.annotations,
                        settings=settings, kata_version=args.kata_version)
    print(json.dumps(as_json(checks), indent=1) if args.json else render(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        sys.stdout.flush()
        print(f"{PROG}: not ready: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_install(args: argparse.Namespace) -> int:
    from kata_vfio.errors import ConfigError
    from kata_vfio_ctl.kata3 import install_kata
    from kata_vfio_ctl.kata_conf import find_config
    from kata_vfio_ctl.podman_conf import register
    from kata_vfio_host.cache import config_path
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    kata = find_config(args.kata_config)
    if kata is None:
        raise ConfigError("no Kata configuration.toml found", "pass --kata-config PATH")
    # every file install will edit, checked first: a refusal (a layout it cannot edit, a
    # FIFO, a runtime of the admin's own) comes before anything is written
    from kata_vfio_ctl.engines import install_engines, podman_skip_reason

    skip_podman = podman_skip_reason(kata, args.kata_version)
    if skip_podman is None:
        register(Path(args.conf), args.runtime_path, dry_run=True)
    install_engines(args, str(kata), dry_run=True)
    # Kata 1.x: kata_conf's in-place edit; Kata >= 2: configuration-kata-vfio.toml beside
    # it, named by kata_config_path in config.toml
    result = install_kata(kata, settings, Path(config_path()), Path(settings.state_dir),
                          initrd=args.guest_initrd, kata_version=args.kata_version)
    for line in result.lines:
        print(line)
    if skip_podman is None:
        podman = register(Path(args.conf), args.runtime_path)
        print(f"{args.conf}: {'registered kata-vfio' if podman else 'already registered'}")
    else:
        print(f"{args.conf}: podman not registered: {skip_podman}")
    for line in install_engines(args, str(result.generated or kata)):
        print(line)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from kata_vfio_ctl.kata3 import uninstall_kata
    from kata_vfio_ctl.kata_conf import find_config
    from kata_vfio_ctl.podman_conf import unregister
    from kata_vfio_host.cache import config_path
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    kata = find_config(args.kata_config)
    lines = uninstall_kata(kata, settings, Path(config_path()), Path(settings.state_dir),
                           named=args.kata_config is not None)
    for line in lines or [f"{kata or 'Kata configuration'}: nothing to undo"]:
        print(line)
    removed = unregister(Path(args.conf))
    print(f"{args.conf}: "
          + ("removed kata-vfio" if removed else f"kata-vfio {podman_absent(Path(args.conf))}"))
    from kata_vfio_ctl.engines import uninstall_engines

    for line in uninstall_engines(args):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kata_vfio.version import package_version
    from kata_vfio_ctl.podman_conf import CONTAINERS_CONF

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("devices", help="list PCI devices with IOMMU groups, drivers, use")
    p.add_argument("addresses", nargs="*", metavar="DEVICE",
                   help="DDDD:BB:SS.F, BB:SS.F, an interface name, or a glob (0000:03:*)")
    p.add_argument("-d", dest="ids", action="append", metavar="VENDOR:DEVICE[:CLASS]",
                   help="lspci -d style filter, parts hex or * (repeatable)")
    p.add_argument("--name", metavar="REGEX", help="match the pci.ids name")
    p.add_argument("--free", action="store_true",
                   help="only what an io.kata-vfio.select allocation could take")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("vfs", help="create (or remove) SR-IOV virtual functions for VFIO use")
    p.add_argument("pf", metavar="PF", help="the physical function: address or interface name")
    p.add_argument("count", type=int, metavar="COUNT", help="how many VFs (0 removes them)")
    p.add_argument("--force", action="store_true",
                   help="remove VFs even when containers own them, processes hold them or "
                        "kata-vfio bound them")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_vfs)

    p = sub.add_parser("bind", help="hand devices (with their whole IOMMU group) to vfio-pci")
    p.add_argument("addresses", nargs="+", metavar="DEVICE",
                   help="DDDD:BB:SS.F, BB:SS.F (domain 0000) or a network interface name")
    p.add_argument("--force", action="store_true", help="bind even when the device is in use")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would move to vfio-pci, change nothing")
    p.add_argument("--persist", action="store_true",
                   help="bind them again at every boot (kata-vfio-boot.service runs "
                        "kata-vfio-ctl boot); restore removes that")
    p.add_argument("--timeout", type=float, default=5.0, help="wait for /dev/vfio/N (s)")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("restore", help="give devices back to the drivers they had")
    p.add_argument("addresses", nargs="*", metavar="ADDRESS",
                   help="DDDD:BB:SS.F or BB:SS.F (domain 0000)")
    p.add_argument("--all", action="store_true", help="everything kata-vfio bound")
    p.add_argument("--stale", action="store_true",
                   help="devices of containers that are gone (bundle removed, or an earlier "
                        "boot)")
    p.add_argument("--force", action="store_true",
                   help="also give back devices a live container holds (its claim is dropped; "
                        "the device leaves that container's VM)")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("doctor", help="check this host's readiness, say how to fix")
    p.add_argument("--kata-config", help="Kata configuration.toml (default: Kata's search)")
    p.add_argument("--conf", default=str(CONTAINERS_CONF), help="podman containers.conf")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kata-version", metavar="MAJOR.MINOR",
                   help="which Kata uses the configuration (default: kata-runtime --version, "
                        "else the configuration's keys)")
    p.set_defaults(func=cmd_doctor)

    for name, func, text in (("install", cmd_install, "configure Kata and podman for kata-vfio"),
                             ("uninstall", cmd_uninstall, "undo install")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--kata-config", help="Kata configuration.toml (default: Kata's search)")
        p.add_argument("--conf", default=str(CONTAINERS_CONF), help="podman containers.conf")
        if name == "install":
            p.add_argument("--runtime-path", default=_default_runtime_path())
            p.add_argument("--kata-version", metavar="MAJOR.MINOR",
                           help="which Kata uses the configuration (default: kata-runtime "
                                "--version, else the configuration's keys)")
            p.add_argument("--guest-initrd", metavar="PATH",
                           help="Kata >= 2: boot this initrd (e.g. build/kata-vfio-initrd.img) "
                                "in the generated configuration instead of the installed image")
        from kata_vfio_ctl.engines import add_install_options

        add_install_options(p, install=name == "install")
        p.set_defaults(func=func)

    p = sub.add_parser("podman-register", help="register kata-vfio as a podman runtime")
    p.add_argument("--conf", default=str(CONTAINERS_CONF))
    p.add_argument("--runtime-path", default=_default_runtime_path())
    p.set_defaults(func=cmd_podman_register)

    p = sub.add_parser("podman-unregister", help="remove the podman registration")
    p.add_argument("--conf", default=str(CONTAINERS_CONF))
    p.set_defaults(func=cmd_podman_unregister)

    from kata_vfio_ctl import cdi, devplugin, engines, k8s

    engines.add_parsers(sub)  # containerd-register/-unregister, crio-register/-unregister
    k8s.add_parsers(sub)  # k8s, runtimeclass
    cdi.add_parsers(sub)  # cdi
    devplugin.add_parsers(sub)  # device-plugin
    from kata_vfio_ctl import persistent

    persistent.add_parsers(sub).set_defaults(func=cmd_boot)  # boot
    for name, sub_parser in sub.choices.items():
        sub_parser.formatter_class = argparse.RawDescriptionHelpFormatter
        sub_parser.epilog = "examples:\n" + "\n".join(
            f"  {PROG} {line}" for line in EXAMPLES.get(name, ()))
    return parser


# shown under each command's --help; tests parse every one of them
EXAMPLES: dict[str, tuple[str, ...]] = {
    "devices": ("devices                      # every PCI function, group, driver, owner",
                "devices --free               # what io.kata-vfio.select could take, or why not",
                "devices -d 8086:* -d ::0200  # lspci -d syntax, as io.kata-vfio.select",
                "devices 03:00.0 eth1 --json  # short addresses and interface names"),
    "vfs": ("vfs eth1 4                   # four VFs on eth1's PF (left unbound)",
            "vfs 0000:06:00.0 0           # remove them again"),
    "bind": ("bind 03:00.0                 # the device and its whole IOMMU group",
             "bind eth1 --dry-run          # say what would move, change nothing",
             "bind 0000:06:10.0 0000:06:10.1 --json",
             "bind 03:00.0 --persist        # and again at every boot (kata-vfio-boot.service)"),
    "boot": ("boot                         # at boot: persistent binds again, old claims cleared",),
    "restore": ("restore 03:00.0              # back to the driver it had",
                "restore --stale              # devices of containers that are gone",
                "restore --all --json"),
    "doctor": ("doctor", "doctor --json --kata-config /etc/kata-containers/configuration.toml"),
    "install": ("install", "install --containerd --crio",
                "install --kata-config /etc/kata-containers/configuration.toml"),
    "uninstall": ("uninstall", "uninstall --containerd --crio"),
    "podman-register": ("podman-register",
                        "podman-register --conf /etc/containers/containers.conf"),
    "podman-unregister": ("podman-unregister",),
    "containerd-register": ("containerd-register",
                            "containerd-register --conf /etc/containerd/config.toml"),
    "containerd-unregister": ("containerd-unregister",),
    "crio-register": ("crio-register",),
    "crio-unregister": ("crio-unregister",),
    "k8s": ("k8s --daemonset | kubectl apply -f -", "k8s --runtimeclass",
            "k8s --pod --resource nvme"),
    "runtimeclass": ("runtimeclass --no-pod | kubectl apply -f -",
                     "runtimeclass --device 0000:03:00.0"),
    "cdi": ("cdi                          # /etc/cdi/kata-vfio.json", "cdi --output -"),
    "device-plugin": ("device-plugin                # as the DaemonSet runs it",
                      "device-plugin --config /etc/kata-vfio/config.toml"),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func

    def body() -> int:
        from kata_vfio_host import lockwait

        lockwait.notice = lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True)
        code = func(args)
        sys.stdout.flush()  # a reader that went away (| head) shows here, inside the boundary
        return code

    return guarded(PROG, body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
