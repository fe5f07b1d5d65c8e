"""kata-vfio's own device plugin (`kata-vfio-ctl device-plugin`) as a process beside a
`KubeletNode`: configured from a config.toml `[[device_plugin.resource]]` (the node's
kata-vfio settings, so the same fake sysfs and ledger as the shim wrapper), registering on
the kubelet's device-plugins socket, releasing through the kubelet's PodResources socket.

The DeviceSpecs' host paths are a /dev/vfio of the node's own (`--vfio-dev`): there is no
IOMMU here, so its nodes are made with the major:minor the fake sysfs gives each group
(containerd's CRI stats them to build the container's device entries).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k8s.node import KubeletNode

VFIO_CONTAINER = (10, 196)


@dataclass
class KataPlugin:
    node: KubeletNode
    name: str  # advertised as kata-vfio.io/<name>
    select: str  # VENDOR:DEVICE[:CLASS]
    release_grace: float = 2.0
    cdi_dir: Path | None = None  # with it: cdi = true, the CDI spec written there
    proc: subprocess.Popen[bytes] | None = None
    config: Path = field(init=False)
    vfio_dev: Path = field(init=False)
    log_path: Path = field(init=False)
    _log: Any = None

    def __post_init__(self) -> None:
        top = self.node.top
        self.config = top / "device-plugin.toml"
        self.vfio_dev = top / "dev-vfio"
        self.log_path = top / "device-plugin.log"
        base = (top / "kata-vfio.toml").read_text()
        self.config.write_text(
            base + "\n[[device_plugin.resource]]\n"
            f'name = "{self.name}"\nselect = "{self.select}"\n'
            + ("cdi = true\n" if self.cdi_dir is not None else "")
        )
        self.make_vfio_nodes()

    @property
    def resource(self) -> str:
        return f"kata-vfio.io/{self.name}"

    @property
    def env_name(self) -> str:
        return "PCIDEVICE_KATA_VFIO_IO_" + self.name.upper().replace("-", "_")

    def make_vfio_nodes(self) -> None:
        """/dev/vfio/vfio and one node per group of the fake sysfs (its class/vfio/N/dev)."""
        self.vfio_dev.mkdir(exist_ok=True)
        nodes = {"vfio": VFIO_CONTAINER}
        for group in (self.node.fs.root / "class/vfio").iterdir():
            major, minor = (group / "dev").read_text().strip().split(":")
            nodes[group.name] = (int(major), int(minor))
        for name, (major, minor) in nodes.items():
            path = self.vfio_dev / name
            if not path.exists():
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(self.node.ctl),
                "device-plugin",
                "--config",
                str(self.config),
                "--kubelet-dir",
                str(self.node.device_plugins),
                "--pod-resources",
                str(self.node.pod_resources_sock),
                "--vfio-dev",
                str(self.vfio_dev),
                "--release-grace",
                str(self.release_grace),
                *(["--cdi-dir", str(self.cdi_dir)] if self.cdi_dir is not None else []),
            ],
            env=self.node.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> int:
        """SIGTERM, as a DaemonSet's pod is stopped; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def lines(self, text: str) -> int:
        return sum(text in line for line in self.log().splitlines())

    def wait_line(self, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.lines(text) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("the device plugin exited:\n" + self.log())
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {text!r} x{count} in the "
                    "device plugin's log:\n" + self.log()
                )
            time.sleep(0.1)
