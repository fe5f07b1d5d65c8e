"""Letting the container open its new nodes through the devices cgroup.

cgroup v1: append "c M:m rwm" to the container's devices.allow. cgroup v2 has no
such file (device access is a BPF program the runtime attached from the spec's
linux.resources.devices), so there the spec's rules decide, and we say so.
"""

from __future__ import annotations

import os

from kata_vfio.errors import HookError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import StrPath


def devices_cgroup(proc: StrPath, pid: int) -> str | None:
    """The pid's cgroup v1 devices path ('/a/b'), or None without a v1 devices hierarchy."""
    try:
        with open(os.path.join(proc, str(pid), "cgroup"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)  # "hierarchy-ID:controllers:path"
        if len(parts) != 3:
            raise HookError(f"odd line {line!r} in /proc/{pid}/cgroup", "check the guest")
        _, controllers, path = parts
        if "devices" in controllers.split(","):
            if ".." in path.split("/"):
                raise HookError(f"odd cgroup path {path!r} for pid {pid}", "check the guest")
            return path
    return None


def allow_devices(cgroupfs: StrPath, cgroup_path: str, devnums: list[tuple[int, int]]) -> str:
    allow = os.path.join(cgroupfs, "devices", cgroup_path.lstrip("/"), "devices.allow")
    for major, minor in devnums:
        with open(allow, "w", encoding="ascii") as f:  # one rule per write(2)
            f.write(f"c {major}:{minor} rwm")
    return allow
