"""The shim wrapper as containerd and CRI-O start it: its names, its path, the checks.

Both engines start the shim wrapper `containerd-shim-kata-vfio-v2`, which edits the
spec and execs Kata's shim. containerd maps the runtime type `io.containerd.kata-vfio.v2`
to that binary (or to `runtime_path`); CRI-O runs `runtime_path` for `runtime_type = "vm"`
and requires the `containerd-shim-` prefix in its name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kata_vfio.errors import ConfigError, UsageError
from kata_vfio.value import Value

RUNTIME_NAME = "kata-vfio"
SHIM_BINARY = "containerd-shim-kata-vfio-v2"
SHIM_PREFIX = "containerd-shim-"


class ShimRuntime(Value):
    """What an engine needs to start kata-vfio's shim wrapper."""

    shim_path: str | None = None  # absolute path; None: containerd finds it on its PATH
    kata_config: str | None = None  # the Kata configuration.toml the shim should use


def default_shim_path() -> str:
    """The shim wrapper installed beside this kata-vfio-ctl (a venv's bin, /usr/bin …)."""
    return str(Path(sys.argv[0]).resolve().with_name(SHIM_BINARY))


def check_shim_path(path: str, *, require_prefix: bool) -> None:
    """An engine execs this path itself: absolute, executable, named as it demands."""
    if not os.path.isabs(path):
        raise UsageError(
            f"shim path {path!r} is not absolute", f"give the full path of {SHIM_BINARY}"
        )
    if require_prefix and not os.path.basename(path).startswith(SHIM_PREFIX):
        raise UsageError(
            f"CRI-O only runs shims named {SHIM_PREFIX}*, not {os.path.basename(path)!r}",
            f"point --shim-path at {SHIM_BINARY} (a symlink with that name will do)",
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ConfigError(
            f"{path} is not an executable file",
            f"install kata-vfio so that {SHIM_BINARY} exists, or pass --shim-path",
        )
