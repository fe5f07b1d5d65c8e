"""`kata-vfio`: the OCI runtime podman runs.

On create/run it edits the bundle's config.json for VFIO, then execs the inner
runtime with the very same arguments; every other verb is handed over at once.
stdout and stderr belong to the runtime protocol: nothing is printed on success.
This module is on every verb's path, so it imports the standard library only;
the create path imports the rest inside `prepare_create`.
"""

from __future__ import annotations

import os
import sys

from kata_vfio.errors import KataVfioError
from kata_vfio_wrapper.args import EDIT_VERBS, Invocation, parse
from kata_vfio_wrapper.fastpath import passthrough_runtime

PROG = "kata-vfio"


def prepare_create(inv: Invocation) -> str:
    """Edit the bundle for VFIO; returns the inner runtime to exec."""
    from pathlib import Path

    from kata_vfio_wrapper.fastpath import config_path, resolve_runtime
    from kata_vfio_wrapper.hostlog import file_logger
    from kata_vfio_wrapper.settings import load_settings
    from kata_vfio_wrapper.spec_edit import edit_bundle

    settings = load_settings()
    runtime = resolve_runtime(settings.runtime, config_path())
    log = file_logger(settings.log_file, container_id=inv.container_id, verb=inv.verb)
    bundle = Path(inv.bundle) if inv.bundle else Path.cwd()
    try:
        result = edit_bundle(bundle, settings)
    except KataVfioError as err:
        log.error("spec edit refused", bundle=str(bundle), error=err.one_line())
        raise
    if result.plan is not None:
        log.info(
            "spec edited" if result.written else "spec already edited",
            bundle=str(bundle),
            groups=[str(g.host_group) for g in result.plan.manifest.groups],
            devices=[str(d.host_address) for d in result.plan.manifest.devices],
            edit_ms=round(result.seconds * 1000, 3),
            runtime=runtime,
        )
    return runtime


def report(message: str, inv: Invocation) -> None:
    """One line on stderr, and the same in the runtime log podman reads back
    (podman puts the runtime's name in front of it itself)."""
    print(f"{PROG}: {message}", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    inv = parse(argv)
    try:
        runtime = prepare_create(inv) if inv.verb in EDIT_VERBS else passthrough_runtime()
    except KataVfioError as err:
        report(err.one_line(), inv)
        return err.exit_code
    except Exception as exc:
        if os.environ.get("KATA_VFIO_DEBUG"):
            raise
        report(f"internal error: {exc!r} (set KATA_VFIO_DEBUG=1 for a traceback)", inv)
        return 1
    os.execv(runtime, [runtime, *argv[1:]])
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
