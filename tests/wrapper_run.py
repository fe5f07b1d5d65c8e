"""Running the wrapper as podman does: a separate process, with a recording inner runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SOURCE_PATH = os.pathsep.join(str(REPO / d) for d in ("common", "wrapper", "hook"))

RECORDER = """#!{python}
import json, os, sys
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
extra = {{}}
for fd in fds:
    if fd > 2:
        try:
            extra[fd] = os.read(fd, 100).decode(errors="replace")
        except OSError:
            pass
with open(os.environ["RECORDER_OUT"], "w") as f:
    json.dump({{"argv": sys.argv, "pid": os.getpid(), "fds": extra,
               "stdin": sys.stdin.read()}}, f)
sys.exit(int(os.environ.get("RECORDER_EXIT", "0")))
"""


def make_recorder(directory: Path) -> Path:
    path = directory / "inner-runtime"
    path.write_text(RECORDER.format(python=sys.executable))
    path.chmod(0o755)
    return path


def write_config(directory: Path, **values: Any) -> Path:
    """A kata-vfio config.toml; the state directory stays inside `directory` unless given
    (tests never touch the host's /var/lib/kata-vfio)."""
    values.setdefault("state_dir", str(directory / "state"))
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    for key, value in values.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wrapper_command() -> list[str]:
    return [sys.executable, "-m", "kata_vfio_runtime.main"]


def run_wrapper(
    args: list[str], config: Path, record: Path, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": SOURCE_PATH,
        "KATA_VFIO_CONFIG": str(config),
        "RECORDER_OUT": str(record),
        **kwargs.pop("env", {}),
    }
    return subprocess.run(
        [*wrapper_command(), *args], env=env, text=True, capture_output=True, timeout=60, **kwargs
    )


def installed(name: str) -> Path:
    """A command `pip install` put beside this interpreter (what users run); the test is
    skipped where the package is not installed (make test installs it)."""
    import pytest

    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"{name} is not installed in this environment (run through make test)")
    return path


def busybox_rootfs(
    root: Path, applets: tuple[str, ...] = ("sh", "cat", "stat", "sleep", "ls", "echo", "true")
) -> Path:
    """A container root filesystem of busybox and some applets."""
    import shutil

    (root / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp"):
        (root / d).mkdir(exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for applet in applets:
        (root / "bin" / applet).symlink_to("busybox")
    return root


def private_containerd_config(top: Path) -> tuple[Path, Path, Path]:
    """A containerd 1.6 configuration of its own (root, state, sockets under `top`, the
    CRI plugin off: `ctr run --rootfs` needs no registry); (config, socket, task root)."""
    sock = top / "containerd.sock"
    task_root = top / "state-containerd"
    cfg = top / "containerd.toml"
    cfg.write_text(
        f'version = 2\nroot = "{top / "root"}"\nstate = "{task_root}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
        f'[debug]\n  address = "{sock}.debug"\n'
    )
    return cfg, sock, task_root / "io.containerd.runtime.v2.task"
