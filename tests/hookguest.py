"""The guest hook's test bench: a fake guest (sysfs, /dev, /proc, a bundle) and
manifests for it, shared by the tests/test_hook*.py files."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import MANIFEST_ANNOTATION, Manifest, ManifestDevice, ManifestGroup
from kata_vfio.pci import IommuGroup, PciAddress, PciIdentity
from kata_vfio_hook.main import run
from kata_vfio_hook.roots import GuestRoots

from fakesys import E1000E, NVME, FakeKernel, FakeSysfs


def mdev(addr: str, ids: tuple[int, int, int] = E1000E, mac: str | None = None) -> ManifestDevice:
    vendor, device, cls = ids
    return ManifestDevice(PciAddress.parse(addr), PciIdentity(vendor, device, 0x8086, 0, cls), mac)


def manifest(*groups: tuple[int, list[ManifestDevice]], timeout: float = 0.5) -> str:
    return Manifest(
        tuple(ManifestGroup(IommuGroup(n), tuple(d)) for n, d in groups), timeout
    ).to_json()


class Guest:
    def __init__(self, tmp: Path, fs: FakeSysfs, kernel: FakeKernel) -> None:
        self.fs, self.kernel = fs, kernel
        self.bundle = tmp / "bundle"
        (self.bundle / "rootfs" / "dev").mkdir(parents=True)
        self.proc = tmp / "proc"
        self.start_process(4242)
        (self.proc / "self").mkdir()
        (self.proc / "net").mkdir()
        (self.proc / "self/mounts").write_text("rootfs / rootfs rw 0 0\n")
        self.cgroupfs = tmp / "cgroup"
        (self.cgroupfs / "devices/kata/c1").mkdir(parents=True)
        (self.cgroupfs / "devices/kata/c1/devices.allow").write_text("")
        self.log_path = tmp / "hook.log"
        self.ipv4: dict[str, str] = {}  # interface -> address, as SIOCGIFADDR would say
        self.roots = GuestRoots(
            sysfs=fs.root,
            proc=self.proc,
            cgroupfs=self.cgroupfs,
            libcontainer=tmp / "libcontainer",
            claims=tmp / "claims",
            modprobe=(),
            via_proc_root=False,
            write=kernel.write,
            uevents=False,
            ipv4_address=self.ipv4.get,
        )

    def start_process(self, pid: int, start: int = 1000, cgroup: str = "/kata/c1") -> None:
        """A container init as /proc shows it: stat (start time in field 22), cgroup."""
        pdir = self.proc / str(pid)
        pdir.mkdir(parents=True)
        fields = ["S", "1", *["0"] * 17, str(start), "0"]  # fields 3..23
        (pdir / "stat").write_text(f"{pid} (python3 -I) {' '.join(fields)}\n")
        (pdir / "cgroup").write_text(f"12:pids:{cgroup}\n5:devices:{cgroup}\n0::{cgroup}\n")

    def end_process(self, pid: int) -> None:
        shutil.rmtree(self.proc / str(pid))

    def state(self, annotation: str | None, cid: str = "c1", pid: int = 4242) -> str:
        ann = {MANIFEST_ANNOTATION: annotation} if annotation else {}
        return json.dumps(
            {
                "ociVersion": "1.0.2",
                "id": cid,
                "pid": pid,
                "status": "created",
                "bundle": str(self.bundle),
                "annotations": ann,
            }
        )

    def run(self, annotation: str | None, cid: str = "c1", pid: int = 4242) -> int:
        return run(self.state(annotation, cid, pid), self.roots, JsonLog(self.log_path))

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log_path.read_text().splitlines()]

    def node(self, name: str) -> os.stat_result:
        return os.stat(self.bundle / "rootfs/dev/vfio" / name, follow_symlinks=False)

    def given(self) -> list[str]:
        """The guest devices the last successful run gave its container."""
        done = [e for e in self.log() if e["event"] == "done"][-1]
        return sorted(done["host_to_guest"].values())

    def claims(self) -> dict[str, str]:
        """guest address -> container id, from the claim ledger."""
        path = self.roots.claims / "claims.json"
        ledger = json.loads(path.read_text()) if path.exists() else {}
        return {addr: c["container_id"] for addr, c in ledger.items()}


@pytest.fixture
def guest(tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel) -> Guest:
    # three identical NICs (two behind one bridge-less group each) and an NVMe drive
    fakesys.add_device(
        "0000:00:02.0", group=2, driver="e1000e", net=("eth0",), mac="52:54:00:00:00:01"
    )
    fakesys.add_device(
        "0000:00:03.0", group=3, driver="e1000e", net=("eth1",), mac="52:54:00:00:00:02"
    )
    fakesys.add_device(
        "0000:00:04.0", group=4, driver="e1000e", net=("eth2",), mac="52:54:00:00:00:03"
    )
    fakesys.add_device("0000:00:05.0", NVME, group=5, driver="nvme")
    return Guest(tmp_path, fakesys, kernel)


class FakeClock:
    """time.monotonic and time.sleep, with callbacks run as time passes."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.at: list[tuple[float, Any]] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        for when, action in list(self.at):
            if self.now >= when:
                self.at.remove((when, action))
                action()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "monotonic", fake.monotonic)
    monkeypatch.setattr(time, "sleep", fake.sleep)
    return fake
