"""Setting this host up for kata-vfio and checking it: `install`, `uninstall`,
`podman-register`, `podman-unregister`, `doctor`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kata_vfio_ctl.base import PROG


def cmd_podman_register(args: argparse.Namespace) -> int:
    from kata_vfio_ctl.podman_conf import register

    changed = register(Path(args.conf), args.runtime_path)
    print(
        f"{'registered' if changed else 'already registered'}: kata-vfio = "
        f"[{args.runtime_path!r}] in {args.conf}"
    )
    return 0


def cmd_podman_unregister(args: argparse.Namespace) -> int:
    from kata_vfio_ctl.podman_conf import unregister

    changed = unregister(Path(args.conf))
    print(f"{'removed' if changed else podman_absent(Path(args.conf))}: kata-vfio in {args.conf}")
    return 0


def podman_absent(conf: Path) -> str:
    from kata_vfio_ctl.podman_conf import registered

    value, ours = registered(conf)
    return "not registered" if value is None or ours else "not added by kata-vfio-ctl, left alone"


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from kata_vfio_ctl.checks import FAIL
    from kata_vfio_ctl.doctor import as_json, render, run_checks
    from kata_vfio_ctl.kata_conf import find_config
    from kata_vfio_host.settings import load_settings

    settings = load_settings()
    checks = run_checks(
        Path(settings.sysfs),
        Path("/proc"),
        find_config(args.kata_config),
        Path(args.conf),
        settings.guest_hook_path,
        settings.annotations,
        settings=settings,
        kata_version=args.kata_version,
    )
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
    result = install_kata(
        kata,
        settings,
        Path(config_path()),
        Path(settings.state_dir),
        initrd=args.guest_initrd,
        kata_version=args.kata_version,
    )
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
    lines = uninstall_kata(
        kata,
        settings,
        Path(config_path()),
        Path(settings.state_dir),
        named=args.kata_config is not None,
    )
    for line in lines or [f"{kata or 'Kata configuration'}: nothing to undo"]:
        print(line)
    removed = unregister(Path(args.conf))
    print(
        f"{args.conf}: "
        + ("removed kata-vfio" if removed else f"kata-vfio {podman_absent(Path(args.conf))}")
    )
    from kata_vfio_ctl.engines import uninstall_engines

    for line in uninstall_engines(args):
        print(line)
    return 0
