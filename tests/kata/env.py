"""The whole real-Kata set-up, shared by tests/e2e/test_kata_e2e.py and `make bench`.

`environment(top)` takes the user's installed Kata 1.x (tests/kata/installed.py), builds
the guest image, the launchers, the test configuration.toml (after `kata-vfio-ctl install`),
the fake host sysfs, podman's configuration and the two container images, starts a syslog
listener and yields a `Kata` that runs podman against it. Everything lives under `top`;
what is missing raises `Unavailable` with the reason (the test fails on it, the bench
prints it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import harness, installed, rootfs
from .installed import Unavailable
from fakesys import NVME, FakeSysfs

REPO = Path(__file__).resolve().parents[2]
DEVICES = "io.kata-vfio.devices"
BUSYBOX = "localhost/kata-vfio-kata-busybox"
DPDK = "localhost/kata-vfio-kata-dpdk"
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# the host view: e1000e on vfio-pci (one group each) stand for the QEMU e1000e the launcher
# gives the guest (harness.E1000E_ARGS; matched in address order: the first two are the
# pair on one hub); an NVMe drive the guest never gets
HOST_NICS = ("0000:03:00.0", "0000:04:00.0", "0000:06:00.0", "0000:07:00.0")
HOST_ABSENT = "0000:05:00.0"
HOTPLUG_TIMEOUT = 1.0  # devices are there at boot; keeps the failing run short


def guest_kver() -> str:
    kver = os.environ.get("KATA_VFIO_KVER")
    if kver:
        return kver
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Depends}", "linux-image-amd64"], capture_output=True, text=True
    )
    m = re.search(r"linux-image-(\d[^ ,]*)", r.stdout)
    return m.group(1) if m else os.uname().release


def annotation(*addresses: str) -> list[str]:
    # podman splits --annotation at commas unless the whole value is CSV-quoted
    return ["--annotation", f'"{DEVICES}={",".join(addresses)}"'] if addresses else []


@dataclass
class Streamed:
    """A `podman run` read line by line: each line with the seconds since the start."""

    returncode: int
    lines: list[tuple[float, str]]
    cid: str
    seconds: float

    def first(self, pattern: str) -> float | None:
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


@dataclass
class Kata:
    base: list[str]
    env: dict[str, str]
    top: Path
    console_dir: Path
    inner_log: Path
    timings: dict[str, float] = field(default_factory=dict)

    def podman(
        self, *args: str, timeout: float = 240, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.base, *args],
            env=self.env,
            text=True,
            input=stdin,
            capture_output=True,
            timeout=timeout,
        )

    def _cidfile(self) -> Path:
        return self.top / f"cid-{time.monotonic_ns()}"

    def run(
        self, *args: str, timeout: float = 240
    ) -> tuple[subprocess.CompletedProcess[str], str, float]:
        """podman run --rm with a cid file: (result, container id, seconds)."""
        cidfile = self._cidfile()
        started = time.monotonic()
        result = self.podman(
            "run", "--rm", "--cidfile", str(cidfile), *ULIMITS, *args, timeout=timeout
        )
        took = time.monotonic() - started
        cid = cidfile.read_text().strip() if cidfile.exists() else ""
        return result, cid, took

    def run_streamed(self, *args: str, timeout: float = 240) -> Streamed:
        """podman run --rm, stdout and stderr read as they come, each line timed from the
        moment `podman` was started (pass -t for line-buffered output from C programs)."""
        cidfile = self._cidfile()
        started = time.monotonic()
        proc = subprocess.Popen(
            [*self.base, "run", "--rm", "--cidfile", str(cidfile), *ULIMITS, *args],
            env=self.env,
            text=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines = []
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append((time.monotonic() - started, line.rstrip("\r\n")))
                if time.monotonic() - started > timeout:
                    raise subprocess.TimeoutExpired(proc.args, timeout)
            proc.wait(max(1.0, timeout - (time.monotonic() - started)))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cid = cidfile.read_text().strip() if cidfile.exists() else ""
        return Streamed(proc.returncode, lines, cid, time.monotonic() - started)

    def baseline(self) -> float:
        """Seconds a successful `podman run --rm` of a one-device container takes now."""
        result, _, took = self.run(*annotation(HOST_NICS[0]), BUSYBOX, "true")
        assert result.returncode == 0, result.stderr
        self.timings["podman run busybox (1 device, baseline)"] = took
        return took

    def console(self, cid: str) -> str:
        return harness.console_text(self.console_dir, cid)

    def hook_log(self, cid: str) -> list[dict[str, object]]:
        return harness.relayed_hook_log(self.console(cid))

    def inner_records(self) -> list[dict[str, object]]:
        """What the test-only inner runtime saw of each spec kata-runtime got."""
        if not self.inner_log.exists():
            return []
        return [json.loads(x) for x in self.inner_log.read_text().splitlines()]


def _check(ok: bool, reason: str) -> None:
    if not ok:
        raise Unavailable(reason)


@dataclass
class Kata1Host:
    """What every real-Kata set-up starts from: our entry point, the host tools, the guest
    kernel and the user's installed Kata 1.x (tests/kata/installed.py)."""

    wrapper: Path
    ctl: Path
    kver: str
    kernel: Path
    bins: dict[str, Path]
    timings: dict[str, float]


def kata1_host(wrapper_name: str, tools: dict[str, str], *, shim_v2: bool = False) -> Kata1Host:
    """The prerequisites and the installed Kata 1.x (Unavailable names the first one
    missing). `tools`: programs the set-up needs, each with where it comes from."""
    _check(os.geteuid() == 0, "needs root")
    for tool, source in tools.items():
        _check(shutil.which(tool) is not None, f"needs {tool} ({source})")
    _check(Path(harness.QEMU).exists(), "needs qemu-system-x86")
    wrapper = Path(sys.executable).with_name(wrapper_name)
    ctl = Path(sys.executable).with_name("kata-vfio-ctl")
    _check(wrapper.exists() and ctl.exists(), "kata-vfio is not installed here (make venv)")
    bins = installed.kata1(shim_v2=shim_v2)
    kver = guest_kver()
    kernel = installed.guest_kernel(kver)
    return Kata1Host(wrapper, ctl, kver, kernel, bins, {})


@contextlib.contextmanager
def environment(top: Path) -> Iterator[Kata]:
    """The real-Kata set-up under `top` (see the module's doc) around the installed Kata."""
    host = kata1_host("kata-vfio", {"podman": "make venv"})
    wrapper, ctl, kver, kernel = host.wrapper, host.ctl, host.kver, host.kernel
    bins, timings = host.bins, host.timings

    console_dir, kata_config = harness.prepare_kata(top, kver, kernel, bins, timings)
    inner_log = top / "inner-runtime.log"
    inner = harness.write_inner_runtime(
        top / "bin/kata-runtime-test", bins["kata-runtime"], kata_config, inner_log
    )

    fs = FakeSysfs(top / "sys")
    for n, addr in enumerate(HOST_NICS):
        fs.add_device(addr, group=12 + n, driver="vfio-pci")
        fs.add_vfio_group(12 + n, minor=n)
    fs.add_device(HOST_ABSENT, NVME, group=20, driver="vfio-pci", subsystem=(0x1AF4, 0x1100))
    fs.add_vfio_group(20, minor=len(HOST_NICS))
    config, launcher = harness.write_wrapper_launcher(top, wrapper, inner, fs.root, HOTPLUG_TIMEOUT)
    conf = top / "containers.conf"
    conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    # the kata-vfio settings in Kata's file and the podman registration: the product's step
    subprocess.run(
        [
            str(ctl),
            "install",
            "--kata-config",
            str(kata_config),
            "--conf",
            str(conf),
            "--runtime-path",
            str(launcher),
        ],
        env={**os.environ, "KATA_VFIO_CONFIG": str(config)},
        check=True,
        capture_output=True,
        text=True,
    )

    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    base_cmd = [
        "podman",
        "--root",
        str(top / "storage"),
        "--runroot",
        str(top / "run"),
        "--storage-driver",
        "vfs",
        "--runtime",
        "kata-vfio",
    ]
    t = time.monotonic()
    rootfs.import_image(
        base_cmd, env, rootfs.busybox_rootfs(top / "busybox"), top / "busybox.tar", BUSYBOX
    )
    rootfs.import_image(base_cmd, env, rootfs.dpdk_rootfs(top / "dpdk"), top / "dpdk.tar", DPDK)
    timings["images"] = time.monotonic() - t

    with contextlib.ExitStack() as stack:
        stack.enter_context(harness.syslog(top / "syslog.log"))
        harness.shared_sandboxes()
        k = Kata(base_cmd, env, top, console_dir, inner_log, timings)
        try:
            yield k
        finally:
            k.podman("rm", "--all", "--force", timeout=120)
            harness.kill_pids(harness.qemu_pids(str(console_dir)))
