"""Kata 1.x's containerd-shim-kata-v2 under a private containerd 1.6 (test-only).

- The 1.x shim reads its configuration only from /etc/kata-containers/configuration.toml or
  /usr/share/defaults/kata-containers/configuration.toml (LAB.md section 4). containerd (and
  with it every shim and QEMU it starts) runs in a private mount namespace in which one of
  those paths holds the test's file; the host's /etc and /usr stay untouched.
- Between our shim wrapper and the Kata shim sits a test-only inner "shim" that drops the
  /dev/vfio/<N> host-group entries from config.json (this host has no IOMMU: Kata would try
  to hot-plug the fake host groups) and execs the real shim with the same argv — the same
  stand-in as harness.INNER_RUNTIME for the kata-runtime path.
"""

from __future__ import annotations

import shlex
from pathlib import Path

KATA_CONFIG_DIRS = (Path("/etc/kata-containers"), Path("/usr/share/defaults/kata-containers"))

INNER_SHIM = '''#!/usr/bin/python3 -IS
"""Test-only inner shim (written by tests/kata/shim_harness.py): what containerd-shim-kata-vfio-v2
execs. On `start` (cwd = the bundle) the /dev/vfio/<N> host-group entries the wrapper added
for the fake host groups are dropped from config.json (no IOMMU here: no host hot-plug); the
rest of the spec (manifest and guest_hook_path annotations, /dev/vfio/vfio) is untouched.
Prints nothing (containerd reads start's output as the shim's address), then execs the real
containerd-shim-kata-v2 with the same argv.
"""
import json
import os
import re
import sys

SHIM = {shim!r}
LOG = {log!r}

args = sys.argv[1:]
if "start" in args and os.path.exists("config.json"):
    with open("config.json") as f:
        spec = json.load(f)
    devices = spec.get("linux", {{}}).get("devices") or []
    keep = [d for d in devices if not re.fullmatch(r"/dev/vfio/[0-9]+", d.get("path", ""))]
    if len(keep) != len(devices):
        spec["linux"]["devices"] = keep
        with open("config.json.tmp", "w") as f:
            json.dump(spec, f)
        os.replace("config.json.tmp", "config.json")
    with open(LOG, "a") as f:
        f.write(json.dumps({{"argv": args, "cwd": os.getcwd(),
                            "dropped": len(devices) - len(keep)}}) + "\\n")
os.execv(SHIM, [SHIM, *args])
'''


def write_inner_shim(path: Path, real_shim: Path, log: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(INNER_SHIM.format(shim=str(real_shim), log=str(log)))
    path.chmod(0o755)
    return path


def config_dir() -> Path:
    """Where the 1.x shim will find our file: /etc/kata-containers wins over
    /usr/share/defaults/kata-containers, so hide it when the host has one."""
    return KATA_CONFIG_DIRS[0] if KATA_CONFIG_DIRS[0].is_dir() else KATA_CONFIG_DIRS[1]


def namespace_script(kata_config: Path, scratch: Path, sandboxes: Path, argv: list[str]) -> str:
    """sh script run by `unshare -m --propagation private`: puts `kata_config` where the
    1.x shim looks, makes Kata's sandboxes directory a shared mount inside the namespace
    (Kata 1.13 relies on propagation there, LAB.md section 4), then execs `argv`.

    An existing configuration directory gets a tmpfs over it; a missing one is made in an
    overlay (upper layer on a tmpfs) over its deepest existing ancestor."""
    target = config_dir()
    anchor = target
    while not anchor.exists():
        anchor = anchor.parent
    q = shlex.quote
    lines = [
        "set -e",
        f"mkdir -p {q(str(scratch))}",
        f"mount -t tmpfs kata-vfio-test {q(str(scratch))}",
    ]
    if anchor == target:
        lines.append(f"mount -t tmpfs -o mode=0755 kata-vfio-test {q(str(target))}")
    else:
        up, work = scratch / "upper", scratch / "work"
        lines += [
            f"mkdir -p {q(str(up))} {q(str(work))}",
            f"mount -t overlay kata-vfio-test -o lowerdir={anchor},upperdir={up},"
            f"workdir={work} {q(str(anchor))}",
            f"mkdir -p {q(str(target))}",
        ]
    lines += [
        f"cp {q(str(kata_config))} {q(str(target / 'configuration.toml'))}",
        f"mkdir -p {q(str(sandboxes))}",
        f"mountpoint -q {q(str(sandboxes))} || "
        f"mount --bind {q(str(sandboxes))} {q(str(sandboxes))}",
        f"mount --make-shared {q(str(sandboxes))}",
        "exec " + " ".join(q(a) for a in argv),
    ]
    return "\n".join(lines) + "\n"
