"""`kata-vfio-hook`: the OCI prestart hook that gives a Kata container its VFIO devices.

kata-agent runs it as ``[name, "prestart"]`` with an empty environment and the OCI
state on stdin, after the rootfs is ready and before pivot_root, and kills it
after 10 s. Most containers have no VFIO devices: for them it reads stdin, finds
no manifest and exits, having imported the C JSON codec and the error boundary only
(no pathlib, no typing, no json package: see tests/test_lean_paths.py). The work is
in give.py, which keeps to the same rule: the hook's first run in a fresh VM is what
Kata waits for.
"""

from __future__ import annotations

import sys
import time

from kata_vfio.boundary import guarded, step
from kata_vfio.defaults import MANIFEST_ANNOTATION
from kata_vfio.errors import HookError
from kata_vfio.jsoncodec import loads

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `typing` costs ~2 ms on every container
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.jsonlog import JsonLog
    from kata_vfio_hook.roots import GuestRoots

PROG = "kata-vfio-hook"
LOG_PATH = "/tmp/kata-vfio-hook.log"
LIBCONTAINER = "/run/libcontainer"  # Kata 1.x keeps each container's spec below it
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class State:
    """The OCI state the runtime passes on stdin."""

    __slots__ = ("annotations", "bundle", "id", "pid")

    def __init__(self, id: str, pid: int, bundle: str, annotations: dict[str, str]) -> None:
        self.id = id
        self.pid = pid
        self.bundle = bundle
        self.annotations = annotations


def parse_state(text: str) -> State:
    try:
        data = loads(text)
    except ValueError:
        raise HookError("stdin is not the OCI state JSON",
                        "run me as an OCI prestart hook") from None
    if not isinstance(data, dict):
        raise HookError("stdin is not the OCI state JSON", "run me as an OCI prestart hook")
    cid, pid, bundle = data.get("id"), data.get("pid"), data.get("bundle")
    if not isinstance(cid, str) or not cid or not set(cid) <= _ID_CHARS or cid.startswith("."):
        raise HookError(f"OCI state has no usable container id ({cid!r})",
                        "run me as an OCI prestart hook")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise HookError(f"OCI state of {cid} has no container pid",
                        "run me as a prestart hook, when the container's init exists")
    annotations = data.get("annotations") or {}
    return State(cid, pid, bundle if isinstance(bundle, str) else "",
                 annotations if isinstance(annotations, dict) else {})


def _load_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_manifest(state: State, libcontainer: str) -> tuple[str, dict[str, Any]] | None:
    """The manifest's text from the state's annotations, the bundle's config.json, or
    Kata 1.x's copy under /run/libcontainer; with the spec (empty if none could be read)."""
    specs = []
    if state.bundle:
        specs.append(f"{state.bundle}/config.json")
    specs.append(f"{libcontainer}/{state.id}/config.json")
    spec: dict[str, Any] = {}
    for path in specs:
        loaded = _load_json(path)
        if loaded is not None:
            spec = loaded
            break
    text = state.annotations.get(MANIFEST_ANNOTATION)
    if text is None:
        annotations = spec.get("annotations")
        text = annotations.get(MANIFEST_ANNOTATION) if isinstance(annotations, dict) else None
    return (text, spec) if text and isinstance(text, str) else None


def run(stdin_text: str, roots: GuestRoots | None = None, log: JsonLog | None = None,
        started: float | None = None, context: dict[str, Any] | None = None) -> int:
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
    log.info("done", host_to_guest=out.mapping, groups=out.groups, steps_ms=out.steps_ms,
             total_ms=round((time.monotonic() - started) * 1e3, 3))
    return 0


def _open_log(context: dict[str, Any]) -> JsonLog:
    from kata_vfio.jsonlog import JsonLog

    return JsonLog(LOG_PATH, context)


def main(argv: list[str] | None = None, roots: GuestRoots | None = None) -> int:
    started = time.monotonic()
    context: dict[str, Any] = {"hook": (argv or sys.argv)[1:2]}

    def report(line: str) -> None:
        _open_log(context).error("failed", error=line)

    return guarded(PROG, lambda: run(sys.stdin.read(), roots, None, started, context),
                   report=report)


if __name__ == "__main__":
    sys.exit(main())
