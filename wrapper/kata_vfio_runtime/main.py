"""`kata-vfio`: the OCI runtime podman runs.

On create/run it edits the bundle's config.json for VFIO, then execs the inner
runtime with the very same arguments; every other verb is handed over at once.
stdout and stderr belong to the runtime protocol: nothing is printed on success.
This module is on every verb's path, so it imports the standard library only;
the create path imports the rest inside `prepare_create`.
"""

from __future__ import annotations

import sys

from kata_vfio.defaults import (
    DEFAULT_RUNTIME,
)
from kata_vfio.errors import UsageError
from kata_vfio_host.cache import resolve_runtime
from kata_vfio_runtime.args import EDIT_VERBS, Invocation, parse
from kata_vfio_runtime.handover import hand_over
from kata_vfio_runtime.wrapping import Wrapper, holds_devices, passthrough, prepare

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import ExecFn

PROG = "kata-vfio"


KATA_VFIO = Wrapper(PROG, "runtime", DEFAULT_RUNTIME, 0, resolve_runtime)


def prepare_create(inv: Invocation) -> str:
    """Claim and edit for VFIO (wrapping.prepare); returns the inner runtime."""
    if inv.problem:
        raise UsageError(f"create: {inv.problem}", "podman and conmon always pass --bundle DIR")
    return prepare(KATA_VFIO, inv.container_id, inv.bundle, verb=inv.verb)


def delete_and_release(runtime: str, argv: list[str], inv: Invocation) -> int:
    """`delete` of a container that holds devices: the inner runtime first (its exit code
    is ours). The devices go back only when the container is really gone: the delete
    succeeded, or the inner runtime no longer knows the container."""
    from kata_vfio.jsonlog import wrapper_log
    from kata_vfio.run import run
    from kata_vfio_host.settings import load_settings
    from kata_vfio_runtime import lifecycle

    settings = load_settings()
    code = run(
        [runtime, *argv[1:]],
        what="deleting the container",
        capture=False,
        timeout=None,
        check=False,
    ).returncode
    if code != 0:
        state = run(
            [runtime, *argv[1 : inv.verb_index], "state", inv.container_id or ""],
            what="asking the inner runtime about the container",
            check=False,
            timeout=60,
        )
        if state.returncode == 0:
            wrapper_log(settings.log_file, container_id=inv.container_id, verb="delete").warning(
                "inner delete failed and the container still exists: its devices stay bound "
                "and owned",
                exit_code=code,
            )
            return code
    failed = lifecycle.release_after_delete(
        inv.container_id or "", settings, lifecycle.host_of(settings)
    )
    if failed:
        report_line(f"delete {inv.container_id}: could not give back {'; '.join(failed)}", inv)
        return code or 1
    return code


def report_line(message: str, inv: Invocation) -> None:
    """One line on stderr, and the same in the runtime log podman reads back."""
    print(f"{PROG}: {message}", file=sys.stderr)
    log_record(message, inv)


def log_record(message: str, inv: Invocation) -> None:
    """An error record in the runtime log podman passed with --log, if any (podman puts
    the runtime's name in front of it itself)."""
    if not inv.log_path:
        return
    import json
    import time

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if inv.log_format == "json":
        record = json.dumps({"level": "error", "msg": message, "time": stamp}) + "\n"
    else:
        record = f"time={json.dumps(stamp)} level=error msg={json.dumps(message)}\n"
    try:
        with open(inv.log_path, "a", encoding="utf-8") as f:
            f.write(record)
    except OSError:
        pass


def decide(argv: list[str], inv: Invocation) -> str | int:
    """The inner runtime to exec with argv, or an exit code when we are done ourselves."""
    if inv.verb is None and ("--version" in argv or "-v" in argv):
        # runc's global flag: our line first, then the inner runtime's own answer
        from kata_vfio.version import package_version

        print(f"{PROG} version {package_version()}", flush=True)
    if inv.verb in EDIT_VERBS:
        from kata_vfio_runtime.scan import needs_edit

        if inv.problem or needs_edit(inv.bundle or "."):
            return prepare_create(inv)
    runtime, state_dir = passthrough(KATA_VFIO)
    if inv.verb == "delete" and holds_devices(inv.container_id, state_dir):
        return delete_and_release(runtime, argv, inv)
    return runtime


def main(argv: list[str] | None = None, exec_fn: ExecFn | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    inv = parse(argv)
    return hand_over(
        PROG, argv, lambda: decide(argv, inv), exec_fn, report=lambda line: log_record(line, inv)
    )


if __name__ == "__main__":
    sys.exit(main())
