"""`kata-vfio-ctl`: host tools (a separate command: `list`, `state` ... are OCI verbs)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kata_vfio.errors import KataVfioError

PROG = "kata-vfio-ctl"


def _default_runtime_path() -> str:
    return str(Path(sys.argv[0]).resolve().with_name("kata-vfio"))


def cmd_podman_register(args: argparse.Namespace) -> int:
    from kata_vfio_wrapper.podman_conf import register

    changed = register(Path(args.conf), args.runtime_path)
    print(f"{'registered' if changed else 'already registered'}: kata-vfio = "
          f"[{args.runtime_path!r}] in {args.conf}")
    return 0


def cmd_podman_unregister(args: argparse.Namespace) -> int:
    from kata_vfio_wrapper.podman_conf import unregister

    changed = unregister(Path(args.conf))
    print(f"{'removed' if changed else 'not registered'}: kata-vfio in {args.conf}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kata_vfio_wrapper.podman_conf import CONTAINERS_CONF

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

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
