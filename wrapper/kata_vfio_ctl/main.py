"""`kata-vfio-ctl`: host tools (a separate command: `list`, `state` ... are OCI verbs)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kata_vfio.errors import KataVfioError

PROG = "kata-vfio-ctl"


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
    print(f"{'removed' if changed else 'not registered'}: kata-vfio in {args.conf}")
    return 0


def _host(args: argparse.Namespace) -> Any:
    from kata_vfio_host.bindings import Host
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    return Host(sysfs=Path(settings.sysfs), state_dir=Path(settings.state_dir))


def _addresses(texts: list[str]) -> list[Any]:
    from kata_vfio.pci import PciAddress

    return [PciAddress.parse(t) for t in texts]


def id_filter(text: str) -> Callable[[Any], bool]:
    """lspci -d style: VENDOR:DEVICE[:CLASS], each part hex, empty or '*' for any."""
    from kata_vfio.errors import UsageError

    parts = text.split(":")
    if not 2 <= len(parts) <= 3:
        raise UsageError(f"bad device filter {text!r}", "write VENDOR:DEVICE[:CLASS], e.g. 8086:*")
    try:
        wanted = [None if p in ("", "*") else int(p, 16) for p in parts]
    except ValueError:
        raise UsageError(f"bad device filter {text!r}: parts are hex numbers or *",
                         "e.g. 8086:10d3 or :*:0200") from None

    def match(dev: Any) -> bool:
        have = (dev.vendor, dev.device, dev.class_code >> 8)
        return all(w is None or w == h for w, h in zip(wanted, have, strict=False))

    return match


def device_records(args: argparse.Namespace, host: Any) -> list[dict[str, Any]]:
    import fnmatch
    import re

    from kata_vfio.pci import group_members, list_addresses, read_device
    from kata_vfio_host.ledger import read_journal
    from kata_vfio_host.pciids import device_name
    from kata_vfio_host.usage import uses

    matchers = [id_filter(f) for f in args.ids or []]
    name_re = re.compile(args.name, re.IGNORECASE) if args.name else None
    journal = read_journal(host)
    records = []
    for addr in list_addresses(host.sysfs):
        if args.addresses and not any(fnmatch.fnmatch(str(addr), g) for g in args.addresses):
            continue
        dev = read_device(host.sysfs, addr)
        name = device_name(dev.vendor, dev.device)
        if any(not m(dev) for m in matchers) or (name_re and not name_re.search(name)):
            continue
        base = host.sysfs / "bus/pci/devices" / str(addr)
        virtfns = sorted(os.path.basename(os.readlink(base / n)) for n in os.listdir(base)
                         if n.startswith("virtfn"))
        others = [str(m) for m in group_members(host.sysfs, dev.iommu_group)
                  if m != addr] if dev.iommu_group is not None else []
        records.append({
            "address": str(addr), "vendor": f"{dev.vendor:04x}", "device": f"{dev.device:04x}",
            "subsystem_vendor": f"{dev.subsystem_vendor:04x}",
            "subsystem_device": f"{dev.subsystem_device:04x}",
            "class": f"{dev.class_code:06x}", "name": name, "driver": dev.driver,
            "iommu_group": dev.iommu_group.number if dev.iommu_group is not None else None,
            "group_members": others, "physfn": str(dev.physfn) if dev.physfn else None,
            "virtfns": virtfns, "interfaces": list(dev.net_interfaces),
            "in_use": [] if dev.is_bridge else uses(host.sysfs, Path("/proc"), addr),
            "bound_by": (journal.get(str(addr)) or {}).get("owner"),
        })
    return records


def cmd_devices(args: argparse.Namespace) -> int:
    import json

    records = device_records(args, _host(args))
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    print(f"{'ADDRESS':13} {'IDS':9} {'CLASS':6} {'DRIVER':12} {'GROUP':>5}  NAME")
    for r in records:
        group = "-" if r["iommu_group"] is None else str(r["iommu_group"])
        print(f"{r['address']:13} {r['vendor']}:{r['device']} {r['class'][:4]:6} "
              f"{r['driver'] or '-':12} {group:>5}  {r['name']}")
        notes = []
        if r["group_members"]:
            notes.append(f"group also: {', '.join(r['group_members'])}")
        if r["physfn"]:
            notes.append(f"VF of {r['physfn']}")
        if r["virtfns"]:
            notes.append(f"VFs: {', '.join(r['virtfns'])}")
        if r["interfaces"]:
            notes.append(f"net: {', '.join(r['interfaces'])}")
        notes += [f"IN USE: {u}" for u in r["in_use"]]
        if r["bound_by"]:
            notes.append(f"bound by {r['bound_by']}")
        for note in notes:
            print(f"{'':14}{note}")
    return 0


def cmd_bind(args: argparse.Namespace) -> int:
    from kata_vfio_host.bindings import ADMIN, bind_group, wait_for_group_node
    from kata_vfio_host.usage import uses

    host = _host(args)
    addresses = _addresses(args.addresses)

    def in_use(addr: Any) -> list[str]:
        return uses(host.sysfs, Path("/proc"), addr)

    for addr in addresses:
        group = bind_group(host, addr, ADMIN, force=args.force, in_use=in_use)
        node = wait_for_group_node(host, group, args.timeout)
        print(f"{addr}: IOMMU group {group} on vfio-pci: {node}  (podman --device {node})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from kata_vfio.errors import UsageError
    from kata_vfio_host.bindings import release_gone, restore, restore_all

    host = _host(args)
    if (args.all + args.stale + bool(args.addresses)) != 1:
        raise UsageError("give addresses, --all or --stale", "e.g. kata-vfio-ctl restore --all")
    if args.stale:
        gone, report = release_gone(host)
        for cid in gone:
            print(f"container {cid} is gone: its devices were released")
    else:
        report = restore_all(host) if args.all else restore(host, _addresses(args.addresses))
    for addr in report.restored:
        print(f"{addr}: given back to its original driver")
    for failure in report.failed:
        print(f"{PROG}: cannot restore {failure}", file=sys.stderr)
    if not report.restored and not report.failed:
        print("nothing to restore")
    return 1 if report.failed else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from kata_vfio_ctl.doctor import FAIL, as_json, render, run_checks
    from kata_vfio_ctl.kata_conf import find_config
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    checks = run_checks(Path(settings.sysfs), Path("/proc"), find_config(args.kata_config),
                        Path(args.conf), settings.guest_hook_path, settings.annotations)
    print(json.dumps(as_json(checks), indent=1) if args.json else render(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    if failed and not args.json:
        print(f"not ready: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_install(args: argparse.Namespace) -> int:
    from kata_vfio.errors import ConfigError
    from kata_vfio_ctl.kata_conf import find_config, install
    from kata_vfio_ctl.podman_conf import register
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    kata = find_config(args.kata_config)
    if kata is None:
        raise ConfigError("no Kata configuration.toml found", "pass --kata-config PATH")
    changed = install(kata, Path(settings.state_dir), settings.guest_hook_path,
                      settings.annotations)
    print(f"{kata}: {'set ' + ', '.join(changed) if changed else 'already configured'}")
    podman = register(Path(args.conf), args.runtime_path)
    print(f"{args.conf}: {'registered kata-vfio' if podman else 'already registered'}")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from kata_vfio_ctl.kata_conf import find_config, uninstall
    from kata_vfio_ctl.podman_conf import unregister
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    kata = find_config(args.kata_config)
    if kata is not None:
        restored = uninstall(kata, Path(settings.state_dir))
        print(f"{kata}: {'restored ' + ', '.join(restored) if restored else 'nothing to undo'}")
    removed = unregister(Path(args.conf))
    print(f"{args.conf}: {'removed kata-vfio' if removed else 'not registered'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kata_vfio_ctl.podman_conf import CONTAINERS_CONF

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("devices", help="list PCI devices with IOMMU groups, drivers, use")
    p.add_argument("addresses", nargs="*", metavar="ADDRESS-GLOB", help="e.g. 0000:03:*")
    p.add_argument("-d", dest="ids", action="append", metavar="VENDOR:DEVICE[:CLASS]",
                   help="lspci -d style filter, parts hex or * (repeatable)")
    p.add_argument("--name", metavar="REGEX", help="match the pci.ids name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("bind", help="hand devices (with their whole IOMMU group) to vfio-pci")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument("--force", action="store_true", help="bind even when the device is in use")
    p.add_argument("--timeout", type=float, default=5.0, help="wait for /dev/vfio/N (s)")
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("restore", help="give devices back to the drivers they had")
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    p.add_argument("--all", action="store_true", help="everything kata-vfio bound")
    p.add_argument("--stale", action="store_true",
                   help="devices of containers that are gone (bundle removed, or an earlier "
                        "boot)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("doctor", help="check this host's readiness, say how to fix")
    p.add_argument("--kata-config", help="Kata configuration.toml (default: Kata's search)")
    p.add_argument("--conf", default=str(CONTAINERS_CONF), help="podman containers.conf")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    for name, func, text in (("install", cmd_install, "configure Kata and podman for kata-vfio"),
                             ("uninstall", cmd_uninstall, "undo install")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--kata-config", help="Kata configuration.toml (default: Kata's search)")
        p.add_argument("--conf", default=str(CONTAINERS_CONF), help="podman containers.conf")
        if name == "install":
            p.add_argument("--runtime-path", default=_default_runtime_path())
        p.set_defaults(func=func)

    p = sub.add_parser("podman-register", help="register kata-vfio as a podman runtime")
    p.add_argument("--conf", default=str(CONTAINERS_CONF))
    p.add_argument("--runtime-path", default=_default_runtime_path())
    p.set_defaults(func=cmd_podman_register)

    p = sub.add_parser("podman-unregister", help="remove the podman registration")
    p.add_argument("--conf", default=str(CONTAINERS_CONF))
    p.set_defaults(func=cmd_podman_unregister)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KataVfioError as err:
        if args.debug or os.environ.get("KATA_VFIO_DEBUG"):
            raise
        print(f"{PROG}: {err.one_line()}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
