"""Hot paths stay lean: what a passthrough verb and a hook without work import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from wrapper_run import SOURCE_PATH

HEAVY = {"structlog", "jsonschema", "tomllib", "tomlkit", "pyroute2", "psutil"}

PROBE = """
import os, sys
def no_exec(*args):
    raise SystemExit(0)
os.execv = no_exec
sys.argv = {argv!r}
sys.stdin = __import__("io").StringIO({stdin!r})
try:
    import {module} as m
    m.main()
except SystemExit:
    pass
except OSError:
    pass  # execv of a runtime that is not there: imports are what we look at
print("MODULES " + " ".join(sorted(sys.modules)), file=sys.__stdout__)
"""


def imported(
    module: str, argv: list[str], stdin: str = "", config: str = "/nonexistent.toml"
) -> set[str]:
    code = PROBE.format(module=module, argv=argv, stdin=stdin)
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {SOURCE_PATH.split(':')!r}\n" + code],
        capture_output=True,
        text=True,
        check=True,
        env={"KATA_VFIO_CONFIG": config, "PATH": "/usr/bin:/bin"},
    ).stdout
    return set(out.strip().splitlines()[-1].split()[1:])


def test_passthrough_verb_imports_no_heavy_module(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    # content of its own: the cache is keyed by path and bytes, and a path pytest reuses
    # with the same bytes from an earlier run would make the first load a warm one
    config.write_text(f'runtime = "true"\n# {os.getpid()} {time.time_ns()}\n')
    argv = ["kata-vfio", "state", "x"]
    assert "tomllib" in imported("kata_vfio_runtime.main", argv, config=str(config))
    modules = imported("kata_vfio_runtime.main", argv, config=str(config))  # cache warm
    assert "kata_vfio_runtime.main" in modules
    assert not modules & (HEAVY | {"typing", "dataclasses", "pathlib", "re"})
    # the passthrough path never imports the host tools
    assert not {
        m
        for m in modules
        if m.startswith(
            (
                "kata_vfio_ctl",
                "kata_vfio_host.bindings",
                "kata_vfio_host.bindplan",
                "kata_vfio_host.giveback",
                "kata_vfio_host.ledger",
                "kata_vfio_host.owners",
                "kata_vfio_host.boots",
                "kata_vfio_host.locks",
            )
        )
    }


def test_shim_passthrough_actions_import_no_heavy_module(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('shim = "true"\n')
    for argv in (
        ["containerd-shim-kata-vfio-v2", "-v"],
        [
            "containerd-shim-kata-vfio-v2",
            "-namespace",
            "default",
            "-address",
            "/s",
            "-id",
            "x",
            "delete",
        ],
    ):
        imported("kata_vfio_runtime.shim", argv, config=str(config))  # fills the cache
        modules = imported("kata_vfio_runtime.shim", argv, config=str(config))
        assert "kata_vfio_runtime.shim" in modules
        assert not modules & (HEAVY | {"typing", "dataclasses", "pathlib", "re"})
        assert not {m for m in modules if m.startswith(("kata_vfio_ctl", "kata_vfio_runtime.sp"))}


def test_hook_without_manifest_imports_no_heavy_module() -> None:
    """Every container in a Kata pod runs the hook; most have no manifest. Those pay for
    json and the error boundary only: no pathlib, no typing, none of the device code."""
    state = json.dumps({"id": "c", "pid": 1, "bundle": "/nonexistent"})
    modules = imported("kata_vfio_hook.main", ["kata-vfio-hook", "prestart"], state)
    assert "kata_vfio_hook.main" in modules and "kata_vfio.boundary" in modules
    assert not modules & (
        HEAVY
        | {
            "threading",
            "subprocess",
            "ctypes",
            "socket",
            "fcntl",
            "tempfile",
            "select",
            "typing",
            "pathlib",
            "dataclasses",
        }
    )
    ours = {m for m in modules if m.startswith("kata_vfio")}
    assert ours <= {
        "kata_vfio",
        "kata_vfio.boundary",
        "kata_vfio.defaults",
        "kata_vfio.errors",
        "kata_vfio.jsoncodec",
        "kata_vfio_hook",
        "kata_vfio_hook.main",
        "kata_vfio_hook.state",
    }
    assert "json" not in modules


def test_create_of_a_container_without_devices_stays_lean(tmp_path: Path) -> None:
    """Most containers ask for nothing: their create costs what a passthrough verb costs."""
    config = tmp_path / "config.toml"
    config.write_text('runtime = "true"\n')
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(
        json.dumps({"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "annotations": {"a": "b"}})
    )
    argv = ["kata-vfio", "create", "--bundle", str(bundle), "plain"]
    imported("kata_vfio_runtime.main", argv, config=str(config))  # fills the cache
    modules = imported("kata_vfio_runtime.main", argv, config=str(config))
    assert not modules & (HEAVY | {"typing", "dataclasses", "pathlib", "re", "json"})
    assert not {
        m for m in modules if m.startswith(("kata_vfio_host.ledger", "kata_vfio_runtime.spec_edit"))
    }
    # one escaped character is enough to take the full path (JSON can hide "vfio")
    (bundle / "config.json").write_text('{"annotations": {"io.kata-\\u0076fio.devices": "x"}}')
    assert "kata_vfio_runtime.spec_edit" in imported(
        "kata_vfio_runtime.main", argv, config=str(config)
    )


# What `kata-vfio create` of a VFIO container and the guest hook with a manifest must not
# import: each costs a good part of a bare interpreter start (`re` comes with json,
# pathlib and enum; inspect with dataclasses), and both run once per container.
STARTUP_HEAVY = {
    "typing",
    "dataclasses",
    "pathlib",
    "re",
    "json",
    "enum",
    "inspect",
    "copy",
    "contextlib",
    "collections",
    "functools",
    "tempfile",
}


def test_create_with_eight_devices_imports_only_what_it_uses(tmp_path: Path) -> None:
    """The whole create (or shim start) of a VFIO container (issue 10: ≤ 3× a bare start):
    settings from the cache, the ledger, sysfs, the edit, the log; none of the start-up-heavy
    modules."""
    from fakesys import FakeSysfs

    fs = FakeSysfs(tmp_path / "sys")
    addresses = fs.add_vfio_endpoints(8, 0x40, 100)
    config = tmp_path / "config.toml"
    config.write_text(
        f'runtime = "true"\nshim = "true"\nsysfs = "{fs.root}"\n'
        f'log_file = "{tmp_path}/log"\n'
        f'state_dir = "{tmp_path}/state"\n'
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"]},
        "annotations": {"io.kata-vfio.devices": ",".join(addresses)},
    }
    # the podman wrapper's create, and the shim wrapper's start (containerd, CRI-O)
    for n, (module, argv) in enumerate(
        (
            ("kata_vfio_runtime.main", ["kata-vfio", "create", "--bundle", str(bundle), "c8"]),
            (
                "kata_vfio_runtime.shim",
                [
                    "containerd-shim-kata-vfio-v2",
                    "-namespace",
                    "k8s",
                    "-address",
                    "/s",
                    "-bundle",
                    str(bundle),
                    "-id",
                    "s8",
                    "start",
                ],
            ),
        )
    ):
        (bundle / "config.json").write_text(json.dumps(spec))
        if n == 0:
            imported(module, argv, config=str(config))  # fills the cache
            (bundle / "config.json").write_text(json.dumps(spec))
        modules = imported(module, argv, config=str(config))
        # it did the work: the edit is in config.json, the devices in the ledger
        edited = json.loads((bundle / "config.json").read_text())
        assert len(json.loads(edited["annotations"]["io.kata-vfio.manifest"])["groups"]) == 8
        assert {"kata_vfio_runtime.spec_edit", "kata_vfio_host.ledger"} <= modules
        assert not modules & (HEAVY | STARTUP_HEAVY), sorted(modules & (HEAVY | STARTUP_HEAVY))
        # a create with nothing to give back and nothing to auto-bind loads none of the
        # give-back, the bind planning or the thread pool (issue 18.3 split them out)
        assert not {
            m
            for m in modules
            if m.startswith(
                ("kata_vfio_host.giveback", "kata_vfio_host.bindplan", "kata_vfio.threads")
            )
        }
        shutil.rmtree(tmp_path / "state")  # the next one claims the groups afresh
