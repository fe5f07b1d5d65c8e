"""Registering kata-vfio with CRI-O: a drop-in of our own,
/etc/crio/crio.conf.d/50-kata-vfio.conf."""

from __future__ import annotations

import os
from pathlib import Path

from kata_vfio.errors import ConfigError, UsageError
from kata_vfio_ctl.engine_shim import RUNTIME_NAME, ShimRuntime, check_shim_path

CRIO_DROPIN = Path("/etc/crio/crio.conf.d/50-kata-vfio.conf")
# CRI-O and annotations (cri-o pkg/config: validateAllowedAndGenerateDisallowedAnnotations,
# FilterDisallowedAnnotations): allowed_annotations may name only annotations CRI-O itself
# knows ("invalid allowed_annotation: X" otherwise: the configuration does not load), and
# CRI-O drops a pod's annotation only when it starts with one of its own known annotations
# that the handler did not allow (a prefix match). Every io.kata-vfio.* key - the user's
# devices/select/vf-config and the device plugin's io.kata-vfio.resource.<name> - reaches the
# spec untouched, so the drop-in has no allowed_annotations at all.
CRIO_FOREIGN_PREFIX = "io.kata-vfio."
# CRI-O makes a vm runtime's stdio FIFOs under <runtime_root>/crio/fifo and hands the shim
# that path; with no runtime_root it is the relative crio/fifo, which the shim opens from
# the bundle directory: every pod fails ("opening file crio/fifo/io/...: no such file")
CRIO_RUNTIME_ROOT = "/run/kata-vfio/crio"
CRIO_FIRST_LINE = "# kata-vfio: VFIO devices in Kata containers. Written by kata-vfio-ctl"


def crio_dropin_text(runtime: ShimRuntime, runtime_root: str = CRIO_RUNTIME_ROOT) -> str:
    """The drop-in CRI-O reads after crio.conf; all of it is ours."""
    import json

    if runtime.shim_path is None:
        raise UsageError("CRI-O needs the shim's absolute path", "pass --shim-path")
    if not os.path.isabs(runtime_root):
        raise UsageError(
            f"runtime root {runtime_root!r} is not absolute",
            f"give a full path, e.g. --runtime-root {CRIO_RUNTIME_ROOT}",
        )
    # JSON strings are valid TOML basic strings (the same escapes)
    lines = [
        CRIO_FIRST_LINE,
        "# crio-register; kata-vfio-ctl crio-unregister removes this file.",
        f"[crio.runtime.runtimes.{RUNTIME_NAME}]",
        'runtime_type = "vm"',
        f"runtime_path = {json.dumps(runtime.shim_path)}",
        f"runtime_root = {json.dumps(runtime_root)}",
    ]
    if runtime.kata_config:
        lines.append(f"runtime_config_path = {json.dumps(runtime.kata_config)}")
    lines += [
        "privileged_without_host_devices = true",
        "# no allowed_annotations: CRI-O passes io.kata-vfio.* (devices, select, vf-config,",
        "# the device plugin's resource.<name>) as it is, and refuses to list keys it does not",
        "# know",
    ]
    return "\n".join(lines) + "\n"


def _crio_dropin_is_ours(dropin: Path) -> bool | None:
    """None: no file; True: a plain file crio-register wrote; False: anything else."""
    from kata_vfio_ctl.textfile import read_found

    if os.path.islink(dropin):
        return False  # ours is a plain file; a link is the admin's arrangement
    try:
        found = read_found(dropin, "CRI-O drop-in")
    except ConfigError:
        return False  # a FIFO, a device, a huge file ...: not what crio-register writes
    if not found.exists:
        return None
    return found.text.startswith(CRIO_FIRST_LINE + "\n")


def register_crio(
    dropin: Path,
    runtime: ShimRuntime,
    *,
    dry_run: bool = False,
    runtime_root: str = CRIO_RUNTIME_ROOT,
) -> bool:
    """Write the drop-in; True when it changed. A file there that crio-register did not
    write (another drop-in, a link) is refused, never replaced."""
    from kata_vfio.files import write_atomically
    from kata_vfio_ctl.textfile import read_found

    if runtime.shim_path is None:
        raise UsageError("CRI-O needs the shim's absolute path", "pass --shim-path")
    check_shim_path(runtime.shim_path, require_prefix=True)
    text = crio_dropin_text(runtime, runtime_root)
    ours = _crio_dropin_is_ours(dropin)
    if ours is False:
        raise ConfigError(
            f"{dropin} exists and was not written by kata-vfio-ctl; nothing was changed",
            f"pass --dropin with a file name of kata-vfio's own, e.g. {CRIO_DROPIN}",
        )
    if ours and read_found(dropin, "CRI-O drop-in").raw == text.encode():
        return False
    if dry_run:
        return True
    dropin.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(dropin, text.encode())
    return True


def unregister_crio(dropin: Path) -> bool:
    """Remove the drop-in crio-register wrote; anything else at that path stays."""
    if not _crio_dropin_is_ours(dropin):
        return False
    dropin.unlink()
    return True
