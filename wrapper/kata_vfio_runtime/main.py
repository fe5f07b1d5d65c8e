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

from kata_vfio.defaults import DEFAULT_CONFIG, DEFAULT_RUNTIME, DEFAULT_STATE_DIR
from kata_vfio.errors import KataVfioError
from kata_vfio_host.cache import config_path, read_cache, resolve_runtime
from kata_vfio_runtime.args import EDIT_VERBS, Invocation, parse

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `typing` costs ~2 ms on every verb
if TYPE_CHECKING:
    from pathlib import Path

    from kata_vfio.pci import PciAddress
    from kata_vfio_host.settings import Settings

PROG = "kata-vfio"


def passthrough_settings() -> tuple[str, str]:
    """The inner runtime's path and the state directory, as cheaply as possible: the
    settings cache when config.toml has not changed, else a full load (which refills it)."""
    path = config_path()
    cached = read_cache(path)
    if cached is not None:
        runtime, state_dir = cached[0], cached[1]
    elif path == DEFAULT_CONFIG and not os.path.exists(path):
        runtime, state_dir = DEFAULT_RUNTIME, DEFAULT_STATE_DIR
    else:
        from kata_vfio_host.settings import load_settings

        settings = load_settings(path)
        runtime, state_dir = settings.runtime, settings.state_dir
    return resolve_runtime(runtime, path), state_dir


def prepare_create(inv: Invocation) -> str:
    """Edit the bundle for VFIO; returns the inner runtime to exec."""
    from pathlib import Path

    from kata_vfio_host.cache import config_path, resolve_runtime
    from kata_vfio_host.hostlog import file_logger
    from kata_vfio_host.settings import load_settings
    from kata_vfio_runtime.spec_edit import edit_bundle

    settings = load_settings()
    runtime = resolve_runtime(settings.runtime, config_path())
    log = file_logger(settings.log_file, container_id=inv.container_id, verb=inv.verb)
    bundle = Path(inv.bundle) if inv.bundle else Path.cwd()
    bound: list[PciAddress] = []
    try:
        if settings.autobind_allow:
            bound = auto_bind(bundle, settings, inv.container_id or "")
            if bound:
                log.info("auto-bound", devices=[str(a) for a in bound])
        result = edit_bundle(bundle, settings)
    except KataVfioError as err:
        log.error("spec edit refused", bundle=str(bundle), error=err.one_line())
        if bound:
            release_devices(settings.state_dir, settings.sysfs, inv.container_id or "")
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


def auto_bind(bundle: Path, settings: Settings, container_id: str) -> list[PciAddress]:
    from pathlib import Path

    from kata_vfio_host.autobind import autobind
    from kata_vfio_host.bindings import Host
    from kata_vfio_host.usage import uses
    from kata_vfio_runtime.spec_edit import load_spec

    spec, _ = load_spec(bundle)
    host = Host(sysfs=Path(settings.sysfs), state_dir=Path(settings.state_dir))
    return autobind(spec, host, settings.autobind_allow, container_id,
                    in_use=lambda addr: uses(host.sysfs, Path("/proc"), addr))


def release_devices(state_dir: str, sysfs: str, container_id: str) -> list[str]:
    from pathlib import Path

    from kata_vfio_host.autobind import release
    from kata_vfio_host.bindings import Host

    return release(Host(sysfs=Path(sysfs), state_dir=Path(state_dir)), container_id)


def delete_and_release(runtime: str, argv: list[str], inv: Invocation, state_dir: str) -> int:
    """`delete` of a container that has auto-bound devices: the inner runtime first
    (its exit code is ours), then the devices go back to their drivers."""
    import subprocess

    from kata_vfio_host.settings import load_settings

    code = subprocess.run([runtime, *argv[1:]], check=False).returncode
    release_devices(state_dir, load_settings().sysfs, inv.container_id or "")
    return code


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
        if inv.verb in EDIT_VERBS:
            runtime = prepare_create(inv)
        else:
            runtime, state_dir = passthrough_settings()
            if inv.verb == "delete" and inv.container_id and "/" not in inv.container_id \
                    and os.path.exists(f"{state_dir}/containers/{inv.container_id}"):
                return delete_and_release(runtime, argv, inv, state_dir)
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
