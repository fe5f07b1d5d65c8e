"""`kata-vfio-ctl`'s entry point: parse the command line (parser.py), run the command
inside the one error boundary. Each command lives in its own module (devices.py, vfs.py,
bind.py, hostsetup.py, engines.py, k8s.py, cdi.py, devplugin.py, persistent.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kata_vfio.boundary import guarded
from kata_vfio_ctl.base import PROG
from kata_vfio_ctl.parser import build_parser


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
