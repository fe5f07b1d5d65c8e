#!/usr/bin/env python3
"""The user's installed Kata Containers, for the tests that run against a real Kata.

Kata is in no package registry this project may use (only Kata 3.x's Go runtime is a Go
module, and the module proxy refuses it), so the project never builds Kata: these tests take
the one a user installed, from paths the user gives. `make test` does not run them;
`make test-kata KATA_...=...` does, and fails with one line naming what is missing.

Kata 1.x (`kata` marker: podman, the shim path, the nested test):
  KATA_VFIO_KATA_RUNTIME   kata-runtime 1.x (default: `kata-runtime` on PATH)
  KATA_VFIO_KATA_CONFIG    its configuration.toml (default: /etc/kata-containers/
                           configuration.toml, else /usr/share/defaults/kata-containers/
                           configuration.toml); kata-shim, kata-proxy and kata-netmon are
                           the paths it names ([shim.kata], [proxy.kata], [netmon])
  KATA_VFIO_KATA_AGENT     kata-agent 1.x, the guest's PID 1 in the image the tests build
                           around `make initrd` (a host has none installed: no default)
  KATA_VFIO_KATA_SHIM_V2   Kata 1.x's containerd-shim-kata-v2 (default: on PATH; only the
                           shim test needs it)
  KATA_VFIO_KATA_KERNEL    the guest kernel (default: Debian's /boot/vmlinuz-$KVER, the
                           kernel whose modules `make initrd` put into the image)
Kata >= 2 (`kata3` marker: Kata's own loader reads the generated configuration):
  KATA_VFIO_KATA3_RUNTIME  kata-runtime 2.x/3.x
  KATA_VFIO_KATA3_CONFIG   its configuration-qemu.toml (default: /opt/kata/share/defaults/
                           kata-containers/configuration-qemu.toml, else /usr/share/
                           defaults/kata-containers/configuration-qemu.toml)

Run as a program: checks what is given, prints the pytest marker expression to run, or one
line saying what is missing (exit 1).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

KATA1_CONFIGS = (
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
)
KATA3_CONFIGS = (
    "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml",
    "/usr/share/defaults/kata-containers/configuration-qemu.toml",
)
HOW = "see README, 'Against your Kata'"


class Unavailable(Exception):
    """A prerequisite of a real-Kata test is missing (the message says which and how)."""


def _given(var: str, default: str | None, what: str) -> Path:
    value = os.environ.get(var)
    if value:
        path = Path(value)
        if not path.is_file():
            raise Unavailable(f"{var}={value}: no such file ({what})")
        return path
    if default:
        found = (
            shutil.which(default)
            if "/" not in default
            else (default if Path(default).is_file() else None)
        )
        if found:
            return Path(found)
    raise Unavailable(f"no {what}: set {var}=PATH ({HOW})")


def _first(var: str, candidates: tuple[str, ...], what: str) -> Path:
    if os.environ.get(var):
        return _given(var, None, what)
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    raise Unavailable(f"no {what} (none of {', '.join(candidates)}): set {var}=PATH ({HOW})")


def runtime_version(runtime: Path) -> tuple[int, int]:
    """(major, minor) from `kata-runtime --version` ("kata-runtime  : 1.13.0")."""
    try:
        out = subprocess.run(
            [str(runtime), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError as exc:
        raise Unavailable(f"{runtime} does not run: {exc}") from exc
    m = re.search(r"kata-runtime\s*:\s*(\d+)\.(\d+)", out)
    if not m:
        first = (out.strip().splitlines() or [""])[0][:120]
        raise Unavailable(f"{runtime} --version names no Kata release (it printed {first!r})")
    return int(m.group(1)), int(m.group(2))


def _config_path(config: Path, table: str, what: str) -> Path:
    try:
        doc = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise Unavailable(f"{config}: not a readable Kata configuration: {exc}") from exc
    node: object = doc
    for part in table.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    value = node.get("path") if isinstance(node, dict) else None
    if not isinstance(value, str) or not Path(value).is_file():
        raise Unavailable(f"{config}: [{table}] path names no file ({what}: {value!r})")
    return Path(value)


def kata1(*, shim_v2: bool = False) -> dict[str, Path]:
    """The installed Kata 1.x: the same names the tests' harness uses. Raises Unavailable
    naming the first thing missing."""
    runtime = _given("KATA_VFIO_KATA_RUNTIME", "kata-runtime", "Kata 1.x kata-runtime")
    major, minor = runtime_version(runtime)
    if major != 1:
        raise Unavailable(
            f"{runtime} is Kata {major}.{minor}: these tests need Kata 1.x's "
            "OCI command line (set KATA_VFIO_KATA_RUNTIME to a 1.x kata-runtime; "
            "a Kata >= 2 goes in KATA_VFIO_KATA3_RUNTIME)"
        )
    config = _first("KATA_VFIO_KATA_CONFIG", KATA1_CONFIGS, "Kata 1.x configuration.toml")
    bins = {
        "kata-runtime": runtime,
        "configuration-qemu.toml": config,
        "kata-shim": _config_path(config, "shim.kata", "kata-shim"),
        "kata-proxy": _config_path(config, "proxy.kata", "kata-proxy"),
        "kata-netmon": _config_path(config, "netmon", "kata-netmon"),
        "kata-agent": _given(
            "KATA_VFIO_KATA_AGENT", None, "Kata 1.x kata-agent for the guest image"
        ),
    }
    if shim_v2:
        bins["containerd-shim-kata-v2"] = _given(
            "KATA_VFIO_KATA_SHIM_V2", "containerd-shim-kata-v2", "Kata 1.x containerd-shim-kata-v2"
        )
    return bins


def guest_kernel(kver: str) -> Path:
    return _given("KATA_VFIO_KATA_KERNEL", f"/boot/vmlinuz-{kver}", "guest kernel")


def kata3() -> dict[str, Path]:
    """The installed Kata >= 2's kata-runtime and its configuration-qemu.toml."""
    runtime = _given("KATA_VFIO_KATA3_RUNTIME", None, "Kata >= 2 kata-runtime")
    major, minor = runtime_version(runtime)
    if major < 2:
        raise Unavailable(
            f"{runtime} is Kata {major}.{minor}: KATA_VFIO_KATA3_RUNTIME names "
            "a Kata >= 2 (a 1.x goes in KATA_VFIO_KATA_RUNTIME)"
        )
    config = _first("KATA_VFIO_KATA3_CONFIG", KATA3_CONFIGS, "Kata >= 2 configuration-qemu.toml")
    return {"kata-runtime": runtime, "configuration-qemu.toml": config}


def main() -> int:
    """Which real-Kata tests the environment allows: the marker expression on stdout."""
    markers, missing = [], []
    if any(
        os.environ.get(v) for v in ("KATA_VFIO_KATA_RUNTIME", "KATA_VFIO_KATA_AGENT")
    ) or not os.environ.get("KATA_VFIO_KATA3_RUNTIME"):
        try:
            kata1()
            markers.append("kata")
        except Unavailable as exc:
            missing.append(str(exc))
    if os.environ.get("KATA_VFIO_KATA3_RUNTIME"):
        try:
            kata3()
            markers.append("kata3")
        except Unavailable as exc:
            missing.append(str(exc))
    if missing or not markers:
        print(f"make test-kata: {missing[0] if missing else 'no Kata given'}", file=sys.stderr)
        return 1
    print(" or ".join(markers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
