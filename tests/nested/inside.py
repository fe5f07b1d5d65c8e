"""Run inside the nested tests' L1 (both: without Kata, tests/nested/l1.py; against an
installed Kata, tests/kata/nested_l1.py): how they report, commands with a bound, what the
container prints, cgroup v1 mounts, a device's driver."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

# the container's view: its /dev/vfio, the guest devices on vfio-pci, each node opened,
# then the static checker's VFIO ioctls (vfio-viable, tests/nested/images.py)
NODES_SCRIPT = """
ls /dev/vfio | sort | tr '\\n' ' '; echo
for d in /sys/bus/pci/drivers/vfio-pci/0000:*; do echo "vfio-pci ${d##*/}"; done
for n in /dev/vfio/*; do if exec 3<>"$n"; then echo "opened $n"; exec 3>&-; fi; done
vfio-viable
"""


CGROUP_V1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")


def cgroup_v1() -> None:
    """Kata 1.x (and so the test launcher standing in for it) places each sandbox in
    cgroup v1 hierarchies ("Could not create cgroup for
    /libpod_parent/kata_...: cgroups: cgroup mountpoint does not exist" on cgroup2); virtme-ng
    mounts cgroup2 on /sys/fs/cgroup with no child groups, so the controllers are free to
    move: L1 gets this host's layout (tmpfs, one v1 hierarchy per controller)."""
    root = Path("/sys/fs/cgroup")
    if (root / "devices").is_dir():
        return
    subprocess.run(["umount", str(root)], check=False)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "cgroup", str(root)], check=True)
    for name, opts in [*((c, c) for c in CGROUP_V1), ("systemd", "none,name=systemd")]:
        (root / name).mkdir()
        subprocess.run(
            ["mount", "-t", "cgroup", "-o", opts, "cgroup", str(root / name)], check=True
        )


def driver_of(addr: str) -> str | None:
    link = Path("/sys/bus/pci/devices") / addr / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


class Results:
    """What an L1 script reports: a "KVFIO {key: value}" line on L1's console per record,
    and everything so far in result.json in the directory shared with the host (`top`)."""

    def __init__(self) -> None:
        self.data: dict[str, object] = {"steps": {}}
        self.top = Path()

    def report(self, key: str, value: object) -> None:
        self.data[key] = value
        print("KVFIO " + json.dumps({key: value}), flush=True)
        (self.top / "result.json").write_text(json.dumps(self.data, indent=1) + "\n")

    def step(self, name: str, seconds: float) -> None:
        steps = self.data["steps"]
        assert isinstance(steps, dict)
        steps[name] = round(seconds, 1)
        self.report("steps", steps)


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """The command's result; one that outlives `timeout` is a result too (exit -1)."""
    try:
        return subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (
            exc.stdout.decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else str(exc.stdout or "")
        )
        return subprocess.CompletedProcess(cmd, -1, out, f"timeout after {timeout:g} s")
