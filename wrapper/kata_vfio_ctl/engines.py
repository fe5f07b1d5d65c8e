"""The command line for containerd and CRI-O: containerd-register/-unregister,
crio-register/-unregister, and the engine parts of install/uninstall.

What each engine's configuration gets is containerd_conf.py's and crio_conf.py's; the
shim wrapper they start, engine_shim.py's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from kata_vfio_ctl.containerd_conf import (
    CONTAINERD_CONF,
    CRI_PLUGINS,
    SHIM_RUNTIME_TYPE,
    containerd_binary_version,
    register_containerd,
    registered_containerd,
    unregister_containerd,
)
from kata_vfio_ctl.crio_conf import (
    CRIO_DROPIN,
    CRIO_RUNTIME_ROOT,
    register_crio,
    unregister_crio,
)
from kata_vfio_ctl.engine_shim import (
    RUNTIME_NAME,
    SHIM_BINARY,
    ShimRuntime,
    check_shim_path,
    default_shim_path,
)


def _crio_absent(dropin: Path) -> str:
    return "absent" if not os.path.lexists(dropin) else "not written by kata-vfio-ctl: left alone"


def _containerd_absent(conf: Path) -> str:
    if registered_containerd(conf) is not None:
        return f"{RUNTIME_NAME} there was not added by kata-vfio-ctl: left alone"
    return f"not registered: {RUNTIME_NAME}"


def _shim_runtime(args: argparse.Namespace, *, crio: bool) -> ShimRuntime:
    shim = args.shim_path
    if shim is None and (crio or os.path.exists(default_shim_path())):
        shim = default_shim_path()
    if shim is not None:
        check_shim_path(shim, require_prefix=crio)
    kata = str(Path(args.kata_config).absolute()) if args.kata_config else None
    return ShimRuntime(shim_path=shim, kata_config=kata)


def containerd_path_note(runtime: ShimRuntime, containerd: str = "containerd") -> str | None:
    """containerd before 1.7 ignores runtime_path (containerd#8207, against 1.6.19; the key
    came with containerd#6206): it finds the shim by its name on its own PATH. None when
    containerd uses runtime_path, or the shim is on PATH already."""
    import shutil

    from kata_vfio.errors import KataVfioError

    try:
        major, minor = containerd_binary_version(containerd)
    except KataVfioError:
        return None  # no containerd here to ask: nothing to say about its PATH
    if (major, minor) >= (1, 7):
        return None
    found = shutil.which(SHIM_BINARY)
    if found is not None and (
        runtime.shim_path is None or os.path.realpath(found) == os.path.realpath(runtime.shim_path)
    ):
        return None
    where = runtime.shim_path or default_shim_path()
    return (
        f"containerd {major}.{minor} ignores runtime_path: {SHIM_BINARY} must be on "
        f"containerd's PATH (e.g. ln -s {where} /usr/local/bin/{SHIM_BINARY})"
    )


def cmd_containerd_register(args: argparse.Namespace) -> int:
    runtime = _shim_runtime(args, crio=False)
    changed = register_containerd(Path(args.conf), runtime, version=args.config_version)
    print(
        f"{args.conf}: {'registered' if changed else 'already registered'} runtime "
        f"{RUNTIME_NAME} ({SHIM_RUNTIME_TYPE}); restart containerd to use it"
    )
    note = containerd_path_note(runtime)
    if note:
        print(note)
    return 0


def cmd_containerd_unregister(args: argparse.Namespace) -> int:
    conf = Path(args.conf)
    news = f"removed {RUNTIME_NAME}" if unregister_containerd(conf) else _containerd_absent(conf)
    print(f"{conf}: {news}")
    return 0


def cmd_crio_register(args: argparse.Namespace) -> int:
    changed = register_crio(
        Path(args.dropin), _shim_runtime(args, crio=True), runtime_root=args.runtime_root
    )
    print(
        f"{args.dropin}: {'written' if changed else 'already up to date'}; restart CRI-O to use it"
    )
    return 0


def cmd_crio_unregister(args: argparse.Namespace) -> int:
    dropin = Path(args.dropin)
    print(f"{dropin}: {'removed' if unregister_crio(dropin) else _crio_absent(dropin)}")
    return 0


def add_install_options(p: argparse.ArgumentParser, *, install: bool) -> None:
    """`install`/`uninstall --containerd [CONFIG] --crio [DROPIN]`."""
    p.add_argument(
        "--containerd",
        nargs="?",
        const=str(CONTAINERD_CONF),
        metavar="CONFIG",
        help=f"also (un)register with containerd (default: {CONTAINERD_CONF})",
    )
    p.add_argument(
        "--crio",
        nargs="?",
        const=str(CRIO_DROPIN),
        metavar="DROPIN",
        help=f"also (un)register with CRI-O (default: {CRIO_DROPIN})",
    )
    if install:
        p.add_argument(
            "--shim-path",
            metavar="PATH",
            help=f"absolute path of {SHIM_BINARY} (default: beside kata-vfio-ctl)",
        )


def install_engines(
    args: argparse.Namespace, kata_config: str | None, *, dry_run: bool = False
) -> list[str]:
    """Register with the engines `install` was asked for; one line of news each.

    `kata_config` is the Kata configuration the shim should use (ConfigPath /
    runtime_config_path), e.g. the kata-vfio configuration install wrote. `dry_run`
    checks that every registration would take, writing nothing (install runs it before
    it changes any file, so a refusal leaves everything as it was).
    """
    news = []
    if args.containerd:
        runtime = _shim_runtime(
            argparse.Namespace(shim_path=args.shim_path, kata_config=kata_config), crio=False
        )
        changed = register_containerd(Path(args.containerd), runtime, dry_run=dry_run)
        news.append(
            f"{args.containerd}: "
            f"{'registered' if changed else 'already registered'} {RUNTIME_NAME}"
            + ("; restart containerd to use it" if changed else "")
        )
        note = None if dry_run else containerd_path_note(runtime)
        if note:
            news.append(note)
    if args.crio:
        runtime = _shim_runtime(
            argparse.Namespace(shim_path=args.shim_path, kata_config=kata_config), crio=True
        )
        changed = register_crio(Path(args.crio), runtime, dry_run=dry_run)
        news.append(
            f"{args.crio}: "
            + ("written; restart CRI-O to use it" if changed else "already up to date")
        )
    return news


def podman_skip_reason(kata_config: Path, kata_version: str | None) -> str | None:
    """Why install leaves podman alone, or None: podman -> kata-vfio -> kata-runtime is
    Kata 1.x's OCI command line; Kata >= 2 has none (`kata-runtime create` is "Invalid
    command", kata#722), so a registration there could only fail."""
    from kata_vfio_ctl.kata3 import detect_release, read_toml

    release = detect_release(kata_config, read_toml(kata_config), kata_version)
    if release.major < 2:
        return None
    return (
        f"{release} has no OCI command line for podman (only Kata 1.x does); use "
        "--containerd or --crio"
    )


def uninstall_engines(args: argparse.Namespace) -> list[str]:
    news = []
    if args.containerd:
        conf = Path(args.containerd)
        news.append(
            f"{conf}: "
            + (
                f"removed {RUNTIME_NAME}"
                if unregister_containerd(conf)
                else _containerd_absent(conf)
            )
        )
    if args.crio:
        dropin = Path(args.crio)
        news.append(f"{dropin}: {'removed' if unregister_crio(dropin) else _crio_absent(dropin)}")
    return news


def add_shim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shim-path",
        metavar="PATH",
        help=f"absolute path of {SHIM_BINARY} (default: beside kata-vfio-ctl)",
    )
    p.add_argument(
        "--kata-config",
        metavar="PATH",
        help="Kata configuration.toml the shim uses (default: Kata's own search)",
    )


def add_parsers(sub: Any) -> None:
    """containerd-register/-unregister, crio-register/-unregister."""
    p = sub.add_parser(
        "containerd-register", help=f"add the {RUNTIME_NAME} runtime to containerd's config.toml"
    )
    p.add_argument("--conf", default=str(CONTAINERD_CONF))
    p.add_argument(
        "--config-version",
        type=int,
        choices=sorted(CRI_PLUGINS),
        help="config format when the file does not say (default: from "
        "`containerd --version`: 2 for 1.x, 3 for 2.x)",
    )
    add_shim_options(p)
    p.set_defaults(func=cmd_containerd_register)

    p = sub.add_parser("containerd-unregister", help="remove it again, exactly")
    p.add_argument("--conf", default=str(CONTAINERD_CONF))
    p.set_defaults(func=cmd_containerd_unregister)

    p = sub.add_parser("crio-register", help=f"write the CRI-O drop-in {CRIO_DROPIN.name}")
    p.add_argument("--dropin", default=str(CRIO_DROPIN))
    p.add_argument(
        "--runtime-root",
        metavar="DIR",
        default=CRIO_RUNTIME_ROOT,
        help="where CRI-O keeps the shim's stdio FIFOs (runtime_root; default: "
        f"{CRIO_RUNTIME_ROOT})",
    )
    add_shim_options(p)
    p.set_defaults(func=cmd_crio_register)

    p = sub.add_parser("crio-unregister", help="remove the CRI-O drop-in")
    p.add_argument("--dropin", default=str(CRIO_DROPIN))
    p.set_defaults(func=cmd_crio_unregister)
