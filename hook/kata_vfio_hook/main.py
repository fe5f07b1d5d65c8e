"""`kata-vfio-hook`: the OCI prestart hook that gives a Kata container its VFIO devices.

kata-agent runs it as ``[name, "prestart"]`` with an empty environment and the OCI
state on stdin, after the rootfs is ready and before pivot_root, and kills it
after 10 s. Most containers have no VFIO devices: for them it reads stdin, finds
no manifest and exits, having imported the C JSON codec and the error boundary only
(no pathlib, no typing, no json package: see tests/project/test_lean_paths.py). The work is
in give.py, which keeps to the same rule: the hook's first run in a fresh VM is what
Kata waits for.
"""

from __future__ import annotations

import sys
import time

from kata_vfio.boundary import guarded, step
from kata_vfio_hook.state import LIBCONTAINER, find_manifest, parse_state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.jsonlog import JsonLog
    from kata_vfio_hook.roots import GuestRoots

PROG = "kata-vfio-hook"
LOG_PATH = "/tmp/kata-vfio-hook.log"


def run(
    stdin_text: str,
    roots: GuestRoots | None = None,
    log: JsonLog | None = None,
    started: float | None = None,
    context: dict[str, Any] | None = None,
) -> int:
    """The hook for one container; raises on failure (main() reports). `context` is
    what the log records carry (main's error report uses it too)."""
    started = time.monotonic() if started is None else started
    context = {} if context is None else context
    with step("reading the OCI state"):
        state = parse_state(stdin_text)
        context["container_id"] = state.id
        found = find_manifest(state, LIBCONTAINER if roots is None else str(roots.libcontainer))
    if found is None:
        return 0
    text, spec = found
    from kata_vfio.manifest import Manifest
    from kata_vfio_hook.events import PollWakeups, open_wakeups
    from kata_vfio_hook.give import give_devices
    from kata_vfio_hook.roots import GuestRoots

    roots = GuestRoots() if roots is None else roots
    log = _open_log(context) if log is None else log.bind(**context)
    with step("reading the manifest"):
        manifest = Manifest.from_json(text)
    log.info("start", devices=[str(d.host_address) for d in manifest.devices], pid=state.pid)
    wakeups = open_wakeups() if roots.uevents else PollWakeups()
    try:
        out = give_devices(state, manifest, spec, roots, log, wakeups, started)
    finally:
        wakeups.close()
    log.info(
        "done",
        host_to_guest=out.mapping,
        groups=out.groups,
        steps_ms=out.steps_ms,
        total_ms=round((time.monotonic() - started) * 1e3, 3),
    )
    return 0


def _open_log(context: dict[str, Any]) -> JsonLog:
    from kata_vfio.jsonlog import JsonLog

    return JsonLog(LOG_PATH, context)


def main(argv: list[str] | None = None, roots: GuestRoots | None = None) -> int:
    started = time.monotonic()
    context: dict[str, Any] = {"hook": (argv or sys.argv)[1:2]}

    def report(line: str) -> None:
        _open_log(context).error("failed", error=line)

    return guarded(
        PROG, lambda: run(sys.stdin.read(), roots, None, started, context), report=report
    )


if __name__ == "__main__":
    sys.exit(main())
