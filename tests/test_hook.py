"""The guest hook on fake guest trees: matching, rebinding, nodes, cgroup, failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.defaults import HOOK_DEADLINE, HOOK_KILL_AFTER, HOTPLUG_TIMEOUT_MAX
from kata_vfio.errors import HookError, KataVfioError
from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import MANIFEST_ANNOTATION, Manifest, ManifestDevice, ManifestGroup
from kata_vfio.pci import IommuGroup, PciAddress, PciIdentity
from kata_vfio_hook.events import PollWakeups
from kata_vfio_hook.main import run
from kata_vfio_hook.nodes import make_nodes, rootfs_view
from kata_vfio_hook.roots import GuestRoots
from kata_vfio_hook.state import parse_state

from fakesys import E1000E, IGBVF, NVME, FakeKernel, FakeSysfs


def mdev(addr: str, ids: tuple[int, int, int] = E1000E, mac: str | None = None
         ) -> ManifestDevice:
    vendor, device, cls = ids
    return ManifestDevice(PciAddress.parse(addr), PciIdentity(vendor, device, 0x8086, 0, cls), mac)


def manifest(*groups: tuple[int, list[ManifestDevice]], timeout: float = 0.5) -> str:
    return Manifest(tuple(ManifestGroup(IommuGroup(n), tuple(d)) for n, d in groups),
                    timeout).to_json()


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
        self.roots = GuestRoots(sysfs=fs.root, proc=self.proc, cgroupfs=self.cgroupfs,
                                libcontainer=tmp / "libcontainer", claims=tmp / "claims",
                                modprobe=(),
                                via_proc_root=False, write=kernel.write,
                                uevents=False, ipv4_address=self.ipv4.get)

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
        return json.dumps({"ociVersion": "1.0.2", "id": cid, "pid": pid, "status": "created",
                           "bundle": str(self.bundle), "annotations": ann})

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
    fakesys.add_device("0000:00:02.0", group=2, driver="e1000e", net=("eth0",),
                       mac="52:54:00:00:00:01")
    fakesys.add_device("0000:00:03.0", group=3, driver="e1000e", net=("eth1",),
                       mac="52:54:00:00:00:02")
    fakesys.add_device("0000:00:04.0", group=4, driver="e1000e", net=("eth2",),
                       mac="52:54:00:00:00:03")
    fakesys.add_device("0000:00:05.0", NVME, group=5, driver="nvme")
    return Guest(tmp_path, fakesys, kernel)


def test_no_manifest_touches_nothing(guest: Guest) -> None:
    assert guest.run(None) == 0
    assert guest.kernel.writes == []
    assert not (guest.bundle / "rootfs/dev/vfio").exists()


def test_devices_rebound_nodes_made_and_cgroup_allowed(guest: Guest) -> None:
    m = manifest((7, [mdev("0000:81:00.0", mac="52:54:00:00:00:03")]),
                 (9, [mdev("0000:82:00.0", NVME)]))
    assert guest.run(m) == 0
    assert guest.fs.driver("0000:00:04.0") == "vfio-pci"  # picked by MAC, not address
    assert guest.fs.driver("0000:00:05.0") == "vfio-pci"
    assert guest.fs.driver("0000:00:02.0") == "e1000e"  # untouched
    for name, minor in (("4", 4), ("5", 5)):
        st = guest.node(name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(243, minor)
        assert st.st_mode & 0o777 == 0o666
    assert guest.node("vfio").st_rdev == os.makedev(10, 196)
    assert not any("new_id" in w for w, _ in guest.kernel.writes)
    log = guest.log()
    events = [e["event"] for e in log]
    for expected in ("start", "found", "bind", "rebind", "group mapping", "nodes", "done"):
        assert expected in events
    done = log[-1]
    assert done["host_to_guest"] == {"0000:81:00.0": "0000:00:04.0",
                                     "0000:82:00.0": "0000:00:05.0"}
    assert done["groups"] == {"7": "4", "9": "5"} and done["container_id"] == "c1"


def test_a_full_guest_tmp_does_not_fail_the_hook(guest: Guest) -> None:
    """The hook's log sits in the guest's /tmp: full (/dev/full: ENOSPC on every write),
    the container still gets its devices; the lines are dropped and counted."""
    before = JsonLog.dropped
    m = manifest((9, [mdev("0000:82:00.0", NVME)]))
    assert run(guest.state(m), guest.roots, JsonLog("/dev/full")) == 0
    assert guest.fs.driver("0000:00:05.0") == "vfio-pci"
    assert stat.S_ISCHR(guest.node("5").st_mode)
    assert JsonLog.dropped > before


def test_identical_devices_assigned_in_address_order_and_rerun_is_harmless(
    guest: Guest, tmp_path: Path
) -> None:
    m = manifest((7, [mdev("0000:81:00.0"), mdev("0000:81:00.1")]))
    assert guest.run(m) == 0
    assert [guest.fs.driver(a) for a in ("0000:00:02.0", "0000:00:03.0", "0000:00:04.0")] == \
        ["vfio-pci", "vfio-pci", "e1000e"]
    guest.kernel.writes.clear()
    assert guest.run(m) == 0
    assert guest.kernel.writes == []


def test_late_hotplug_is_waited_for(guest: Guest) -> None:
    m = manifest((7, [mdev("0000:81:00.0", NVME), mdev("0000:82:00.0", NVME)]), timeout=5)

    def plug() -> None:
        time.sleep(0.3)
        guest.fs.add_device("0000:00:06.0", NVME, group=6, driver="nvme")

    threading.Thread(target=plug).start()
    started = time.monotonic()
    assert guest.run(m) == 0
    assert time.monotonic() - started < 4
    assert guest.fs.driver("0000:00:06.0") == "vfio-pci"


def test_missing_device_fails_within_the_bound_touching_nothing(guest: Guest) -> None:
    m = manifest((7, [mdev("0000:81:00.0", NVME), mdev("0000:82:00.0", (0x15B3, 0x101E,
                                                                      0x020000))]), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(HookError, match=r"host device 0000:82:00\.0 \[15b3:101e class 020000\] "
                                        r"not found in the guest after 0\.3 s"):
        guest.run(m)
    assert time.monotonic() - started < 2
    assert guest.kernel.writes == []
    assert guest.fs.driver("0000:00:05.0") == "nvme"


def test_refused_bind_gives_every_device_back(guest: Guest) -> None:
    guest.kernel.refuse = frozenset({"0000:00:05.0"})
    m = manifest((7, [mdev("0000:81:00.0")]), (9, [mdev("0000:82:00.0", NVME)]))
    with pytest.raises(HookError, match=r"cannot bind guest device 0000:00:05\.0 to vfio-pci"):
        guest.run(m)
    assert guest.fs.driver("0000:00:02.0") == "e1000e"
    assert guest.fs.driver("0000:00:05.0") == "nvme"


def test_symlinked_dev_vfio_in_the_image_is_refused(guest: Guest, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (guest.bundle / "rootfs/dev/vfio").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HookError, match="is not a plain directory"):
        guest.run(manifest((7, [mdev("0000:81:00.0")])))
    assert os.listdir(tmp_path / "elsewhere") == []


def test_manifest_from_kata1_libcontainer_spec(guest: Guest, tmp_path: Path) -> None:
    spec_dir = tmp_path / "libcontainer/c1"
    spec_dir.mkdir(parents=True)
    spec = {"root": {"path": str(guest.bundle / "rootfs")},
            "annotations": {MANIFEST_ANNOTATION: manifest((7, [mdev("0000:81:00.0", NVME)]))}}
    (spec_dir / "config.json").write_text(json.dumps(spec))
    state = json.dumps({"id": "c1", "pid": 4242, "bundle": ""})
    assert run(state, guest.roots, JsonLog(None)) == 0
    assert guest.fs.driver("0000:00:05.0") == "vfio-pci"


@pytest.mark.parametrize(("text", "message"), [
    ("", "stdin is not the OCI state JSON"),
    ('{"id": "../x", "pid": 1}', "no usable container id"),
    ('{"id": "c1", "pid": 0}', "has no container pid"),
])
def test_bad_state(text: str, message: str) -> None:
    with pytest.raises(HookError, match=message):
        parse_state(text)


def test_poll_wakeups_bounded() -> None:
    started = time.monotonic()
    PollWakeups(0.05).wait(10)
    assert time.monotonic() - started < 1


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_nodes_land_in_the_containers_mount_namespace(tmp_path: Path) -> None:
    """A process with its own /dev mount, as a container before pivot_root: the nodes
    made through /proc/<pid>/root appear in its namespace, not in ours."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "dev").mkdir(parents=True)
    ctr = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs ctr-dev {rootfs}/dev && echo ready && exec sleep 60"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert ctr.stdout is not None and ctr.stdout.readline().strip() == "ready"
        make_nodes(rootfs_view(Path("/proc"), ctr.pid, str(rootfs)),
                   [("vfio", 10, 196), ("7", 243, 7)])
        assert not (rootfs / "dev/vfio").exists()  # our view: untouched
        seen = subprocess.run(["nsenter", "-t", str(ctr.pid), "-m", "stat", "-c", "%F %t:%T %a",
                               f"{rootfs}/dev/vfio/vfio", f"{rootfs}/dev/vfio/7"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
        assert seen == ["character special file a:c4 666", "character special file f3:7 666"]
    finally:
        ctr.kill()
        ctr.wait()


# --- forged manifests: never a device the VM itself depends on --------------------------

VIRTIO_NET = (0x1AF4, 0x1041, 0x020000)
VIRTIO_BLK = (0x1AF4, 0x1042, 0x010000)
VIRTIO_VSOCK = (0x1AF4, 0x1053, 0x078000)  # kata-agent's transport


def add_child(fs: FakeSysfs, addr: str, child: str, cls: str, name: str,
              flags: str = "0x1003") -> Path:
    """A class device below a PCI function, as the kernel lays it out: <function>/<child>/
    <cls>/<name> (child "" for directly below), linked from class/<cls>/<name>."""
    parent = fs.dev_dir(addr) / child if child else fs.dev_dir(addr)
    where = parent / cls / name
    where.mkdir(parents=True)
    if cls == "net":
        (where / "flags").write_text(flags + "\n")
        (where / "address").write_text("52:54:00:aa:bb:cc\n")
    (fs.root / "class" / cls).mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(where, fs.root / "class" / cls), fs.root / "class" / cls / name)
    return where


@pytest.fixture
def vm_guest(guest: Guest) -> Guest:
    """The guest's own virtio devices, as a Kata VM has them: net, blk (the rootfs), vsock."""
    fs = guest.fs
    fs.add_device("0000:00:0a.0", VIRTIO_NET, group=10, driver="virtio-pci")
    add_child(fs, "0000:00:0a.0", "virtio0", "net", "eth9")
    fs.add_device("0000:00:0b.0", VIRTIO_BLK, group=11, driver="virtio-pci")
    disk = add_child(fs, "0000:00:0b.0", "virtio1", "block", "vda")
    (disk / "vda1").mkdir()
    os.symlink(os.path.relpath(disk / "vda1", fs.root / "class/block"),
               fs.root / "class/block/vda1")
    fs.add_device("0000:00:0c.0", VIRTIO_VSOCK, group=12, driver="virtio-pci")
    (fs.dev_dir("0000:00:0c.0") / "virtio2").mkdir()
    return guest


VM_DEVICES = {"0000:00:0a.0": VIRTIO_NET, "0000:00:0b.0": VIRTIO_BLK,
              "0000:00:0c.0": VIRTIO_VSOCK}


@pytest.mark.parametrize("target", sorted(VM_DEVICES))
def test_forged_manifest_naming_a_virtio_device_is_refused(vm_guest: Guest, target: str) -> None:
    vendor, device, cls = VM_DEVICES[target]
    m = manifest((7, [mdev("0000:81:00.0", VM_DEVICES[target])]), timeout=0.2)
    with pytest.raises(HookError) as err:
        vm_guest.run(m)
    assert str(err.value).startswith(
        f"refusing guest device {target} [{vendor:04x}:{device:04x} class {cls:06x}]: "
        "the VM depends on it (driver virtio-pci)")
    assert vm_guest.kernel.writes == []
    assert all(vm_guest.fs.driver(a) == "virtio-pci" for a in VM_DEVICES)
    assert not (vm_guest.bundle / "rootfs/dev/vfio").exists()


def test_forged_manifest_among_real_devices_rebinds_nothing(
    vm_guest: Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """Through main(), as the agent runs it: one line on stderr, non-zero, nothing moved."""
    import io

    from kata_vfio_hook import main as hook_main

    m = manifest((7, [mdev("0000:81:00.0", NVME)]),
                 (8, [mdev(f"0000:82:00.{i}", ids) for i, ids in enumerate(
                     (VIRTIO_NET, VIRTIO_BLK, VIRTIO_VSOCK))]), timeout=0.2)
    monkeypatch.setattr(sys, "stdin", io.StringIO(vm_guest.state(m)))
    monkeypatch.setattr(hook_main, "LOG_PATH", str(tmp_path / "main.log"))
    assert hook_main.main(["kata-vfio-hook", "prestart"], vm_guest.roots) != 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "kata-vfio-hook: refusing guest device 0000:00:0a.0 [1af4:1041 class 020000]: "
        "the VM depends on it (driver virtio-pci)"), err
    assert vm_guest.kernel.writes == []
    assert vm_guest.fs.driver("0000:00:05.0") == "nvme"
    assert vm_guest.claims() == {}
    logged = json.loads((tmp_path / "main.log").read_text().splitlines()[-1])
    assert logged["event"] == "failed" and logged["container_id"] == "c1"
    assert logged["error"] == err[0].split(": ", 1)[1]


def test_device_with_a_mounted_block_device_is_refused(guest: Guest) -> None:
    """An NVMe drive the guest mounted: disk nvme0n1 below nvme/nvme0, partition p1."""
    disk = add_child(guest.fs, "0000:00:05.0", "nvme/nvme0", "block", "nvme0n1")
    (disk / "nvme0n1p1").mkdir()
    os.symlink(os.path.relpath(disk / "nvme0n1p1", guest.fs.root / "class/block"),
               guest.fs.root / "class/block/nvme0n1p1")
    (guest.proc / "self/mounts").write_text(
        "rootfs / rootfs rw 0 0\n/dev/nvme0n1p1 /run/data ext4 rw 0 0\n")
    with pytest.raises(HookError, match=r"refusing guest device 0000:00:05\.0 \[1b36:0010 "
                                        r"class 010802\]: the VM depends on it \(block device "
                                        r"nvme0n1p1 is mounted on /run/data\)"):
        guest.run(manifest((9, [mdev("0000:82:00.0", NVME)]), timeout=0.1))
    assert guest.fs.driver("0000:00:05.0") == "nvme" and guest.kernel.writes == []


def test_device_below_a_mounted_device_mapper_volume_is_refused(guest: Guest) -> None:
    disk = add_child(guest.fs, "0000:00:05.0", "nvme/nvme0", "block", "nvme0n1")
    add_child(guest.fs, "0000:00:05.0", "", "virtual-dm", "dm-0")  # dm lives elsewhere
    (disk / "holders").mkdir()
    (disk / "holders/dm-0").mkdir()
    (guest.proc / "self/mounts").write_text("/dev/dm-0 /data xfs rw 0 0\n")
    with pytest.raises(HookError, match=r"block device nvme0n1 is under dm-0, which is mounted"):
        guest.run(manifest((9, [mdev("0000:82:00.0", NVME)]), timeout=0.1))
    assert guest.fs.driver("0000:00:05.0") == "nvme"


@pytest.mark.parametrize(("flags", "ipv4", "inet6", "refused"), [
    ("0x1003", "10.0.2.15", "", "interface eth7 is up with address 10.0.2.15"),
    ("0x1003", None, "20010db8000000000000000000000002 07 40 00 80 eth7",
     "interface eth7 is up with address 2001:db8::2"),
    ("0x1003", None, "fe800000000000005054fffe00000001 07 40 20 80 eth7", None),  # link-local
    ("0x1002", "10.0.2.15", "", None),  # down
    ("0x1003", None, "", None),  # up, no address
])
def test_device_with_an_up_interface_with_addresses_is_refused(
    guest: Guest, flags: str, ipv4: str | None, inet6: str, refused: str | None
) -> None:
    guest.fs.add_device("0000:00:07.0", IGBVF, group=7, driver="igbvf")
    add_child(guest.fs, "0000:00:07.0", "", "net", "eth7", flags)
    if ipv4:
        guest.ipv4["eth7"] = ipv4
    (guest.proc / "net/if_inet6").write_text(inet6 + "\n" if inet6 else "")
    m = manifest((7, [mdev("0000:81:00.0", IGBVF)]), timeout=0.1)
    if refused is None:
        assert guest.run(m) == 0
        assert guest.fs.driver("0000:00:07.0") == "vfio-pci"
        return
    with pytest.raises(HookError, match=re.escape(
            f"refusing guest device 0000:00:07.0 [8086:10ca class 020000]: the VM depends on it"
            f" ({refused})")):
        guest.run(m)
    assert guest.fs.driver("0000:00:07.0") == "igbvf" and guest.kernel.writes == []


def test_an_identical_device_the_vm_does_not_use_is_taken_instead(guest: Guest) -> None:
    (guest.fs.dev_dir("0000:00:02.0") / "net/eth0/flags").write_text("0x1003\n")
    # add_device's net= made /sys/class/net/eth0 already, as the kernel links it
    assert (guest.fs.root / "class/net/eth0").is_symlink()
    guest.ipv4["eth0"] = "10.0.2.15"
    assert guest.run(manifest((7, [mdev("0000:81:00.0")]))) == 0
    assert guest.fs.driver("0000:00:02.0") == "e1000e"
    assert guest.fs.driver("0000:00:03.0") == "vfio-pci"


def test_ipv4_lookup_of_an_interface_without_address() -> None:
    from kata_vfio_hook.vmdeps import ipv4_address

    assert ipv4_address("kvfio-none0") is None  # no such interface: ENODEV, not an error
    assert ipv4_address("lo") in ("127.0.0.1", None)


# --- one deadline for the whole hook ------------------------------------------------------


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


def test_devices_that_never_appear_end_the_hook_before_the_deadline(
    guest: Guest, clock: FakeClock
) -> None:
    """Python's start-up (3 s of a slow TCG guest, from /proc/self/stat) counts too: with
    hotplug_timeout at its maximum the hook still ends inside HOOK_DEADLINE."""
    tck = os.sysconf("SC_CLK_TCK")
    (guest.proc / "uptime").write_text("1000.00 900.00\n")
    (guest.proc / "self/stat").write_text(
        f"77 (python3) R {' '.join(['0'] * 18)} {(1000 - 3) * tck} 0\n")
    process_start = clock.now - 3
    m = manifest((7, [mdev("0000:81:00.0", (0x15B3, 0x101E, 0x020000))]),
                 timeout=HOTPLUG_TIMEOUT_MAX)
    with pytest.raises(HookError, match="not found in the guest after 4 s"):
        guest.run(m)
    assert clock.now - process_start <= HOOK_DEADLINE < HOOK_KILL_AFTER


def test_groups_that_never_appear_end_the_hook_before_the_deadline(
    guest: Guest, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device hot-plugged just inside hotplug_timeout, a slow rebind, and then no
    /dev/vfio/<N>: the group wait gets only what is left."""
    started = clock.now
    plug = ("0000:00:06.0", (0x15B3, 0x101E, 0x020000))
    clock.at.append((started + 5.9, lambda: guest.fs.add_device(plug[0], plug[1], group=6,
                                                                driver="mlx5_core")))
    real_write = guest.kernel.write

    def slow_probe(path: Path, text: str) -> None:
        real_write(path, text)
        if Path(path).name == "drivers_probe" and guest.fs.driver(plug[0]) == "vfio-pci":
            clock.advance(1.5)

    monkeypatch.setattr(guest.fs, "add_vfio_group", lambda *args, **kw: None)
    guest.roots = guest.roots._replace(write=slow_probe)
    with pytest.raises(HookError, match=r"/dev/vfio/\[6\] did not appear"):
        guest.run(manifest((7, [mdev("0000:81:00.0", plug[1])]), timeout=HOTPLUG_TIMEOUT_MAX))
    assert clock.now - started <= HOOK_DEADLINE
    assert guest.fs.driver(plug[0]) == "mlx5_core"  # and given back


def test_manifest_timeout_above_the_maximum_is_refused(guest: Guest) -> None:
    forged = json.loads(manifest((7, [mdev("0000:81:00.0")])))
    forged["hotplug_timeout"] = 60
    started = time.monotonic()
    with pytest.raises(KataVfioError, match=r"hotplug_timeout=60 is not 0\.\.6 seconds"):
        guest.run(json.dumps(forged))
    assert time.monotonic() - started < 1 and guest.kernel.writes == []


# --- every failure after binding gives everything back -------------------------------------


def _fail_in_group_check(guest: Guest) -> None:
    # a second function in the guest group of the wanted device, on a host driver
    guest.fs.add_device("0000:00:06.1", group=6, driver="e1000e")


def _fail_no_vfio_node(guest: Guest) -> None:
    guest.fs.add_vfio_group = lambda *args, **kw: None  # type: ignore[method-assign]


def _fail_pid_exits(guest: Guest) -> None:
    (guest.proc / "4242/root").symlink_to("/")  # the container's mount ns: ours, here
    guest.roots = guest.roots._replace(via_proc_root=True)
    real_write = guest.kernel.write

    def write_then_exit(path: Path, text: str) -> None:
        real_write(path, text)
        if Path(path).name == "drivers_probe" and (guest.proc / "4242").exists():
            guest.end_process(4242)  # the container's init dies while we bind

    guest.roots = guest.roots._replace(write=write_then_exit)


def _fail_dev_vfio_symlink(guest: Guest) -> None:
    (guest.bundle.parent / "elsewhere").mkdir()
    (guest.bundle / "rootfs/dev/vfio").symlink_to(guest.bundle.parent / "elsewhere")


def _fail_cgroup_write(guest: Guest) -> None:
    shutil.rmtree(guest.cgroupfs / "devices/kata/c1")


@pytest.mark.parametrize(("breakage", "error"), [
    (_fail_in_group_check, "guest IOMMU group 6 also holds 0000:00:06.1 on driver e1000e"),
    (_fail_no_vfio_node, r"/dev/vfio/\[3, 6\] did not appear"),
    (_fail_pid_exits, "cannot open the container's rootfs"),
    (_fail_dev_vfio_symlink, "is not a plain directory"),
    (_fail_cgroup_write, "devices.allow"),
])
def test_every_failure_after_binding_gives_the_devices_back(
    guest: Guest, clock: FakeClock, breakage: Any, error: str
) -> None:
    guest.fs.add_device("0000:00:06.0", (0x15B3, 0x101E, 0x020000), group=6,
                        driver="mlx5_core")
    breakage(guest)
    m = manifest((7, [mdev("0000:81:00.0", mac="52:54:00:00:00:02")]),
                 (8, [mdev("0000:82:00.0", (0x15B3, 0x101E, 0x020000))]))
    with pytest.raises((KataVfioError, OSError), match=error):
        guest.run(m)
    assert any(w.endswith("drivers_probe") for w, _ in guest.kernel.writes)  # it did bind
    assert guest.fs.driver("0000:00:03.0") == "e1000e"
    assert guest.fs.driver("0000:00:06.0") == "mlx5_core"
    assert (guest.fs.dev_dir("0000:00:06.0") / "driver_override").read_text() == "(null)\n"
    assert guest.claims() == {}
    given = {e["guest_address"] for e in guest.log() if e["event"] == "given back"}
    assert given == {"0000:00:03.0", "0000:00:06.0"}


def test_a_device_already_on_a_vfio_variant_driver_is_used_as_it_is(guest: Guest) -> None:
    guest.fs.add_device("0000:00:06.0", (0x15B3, 0x101E, 0x020000), group=6,
                        driver="mlx5_vfio_pci")
    guest.fs.add_vfio_group(6)
    assert guest.run(manifest((7, [mdev("0000:81:00.0", (0x15B3, 0x101E, 0x020000))]))) == 0
    assert guest.kernel.writes == []
    assert guest.fs.driver("0000:00:06.0") == "mlx5_vfio_pci"
    assert guest.node("6").st_rdev == os.makedev(243, 6)


# --- identical devices in one pod: the claim ledger --------------------------------------


def test_identical_devices_go_to_different_containers_of_a_pod(guest: Guest) -> None:
    """Three identical NICs; containers a and b each ask for one (different host devices
    with the same IDs): each gets its own guest device, and a freed one is reused."""
    one_nic = manifest((7, [mdev("0000:81:00.0")]))
    given = []
    for cid, pid in (("a", 100), ("b", 200)):
        guest.start_process(pid)
        assert guest.run(one_nic, cid, pid) == 0
        given += guest.given()
    assert given == ["0000:00:02.0", "0000:00:03.0"]
    assert guest.claims() == {"0000:00:02.0": "a", "0000:00:03.0": "b"}
    assert guest.fs.driver("0000:00:04.0") == "e1000e"

    guest.end_process(100)  # a is gone: its claim is stale
    guest.start_process(300)
    assert guest.run(one_nic, "c", 300) == 0
    assert guest.given() == ["0000:00:02.0"]
    assert guest.claims() == {"0000:00:02.0": "c", "0000:00:03.0": "b"}


@pytest.mark.parametrize("damage", [
    b"{not json", b"[]", b'{"0000:00:02.0": "a"}', b'{"0000:00:02.0": {"container_id": "a"}}',
    b'{"0000:00:02.0": {"container_id": "a", "pid": "100", "start": 1000}}',
    b'{"0000:00:02.0": {"container_id": "a", "pid": true, "start": 1000}}', b"\xff\xfe"])
def test_a_damaged_claims_file_fails_closed(guest: Guest, damage: bytes) -> None:
    """Container a holds a device; its claim record is damaged: the next container gets
    nothing (one line naming the file), rather than a device a live container holds."""
    one_nic = manifest((7, [mdev("0000:81:00.0")]))
    guest.start_process(100)
    assert guest.run(one_nic, "a", 100) == 0
    ledger_file = guest.roots.claims / "claims.json"
    ledger_file.write_bytes(damage)
    guest.start_process(200)
    writes = len(guest.kernel.writes)
    with pytest.raises(KataVfioError, match=f"the claims file {ledger_file} is damaged"):
        guest.run(one_nic, "b", 200)
    assert guest.kernel.writes[writes:] == []  # nothing bound for b
    assert ledger_file.read_bytes() == damage  # and the evidence left as it was
    assert not (guest.bundle / "rootfs/dev/vfio/3").exists()


def test_a_held_claims_lock_is_waited_for_within_the_deadline(
        guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another hook stuck holding the claims lock: this one gives up before its deadline,
    with one line saying what it waited for, and binds nothing."""
    import fcntl
    import time

    import kata_vfio_hook.give

    monkeypatch.setattr(kata_vfio_hook.give, "HOOK_DEADLINE", 2.5)  # GROUP_WAIT 1.5 + 1 s
    guest.roots.claims.mkdir(parents=True, exist_ok=True)
    lock = guest.roots.claims / ".lock"
    holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    guest.start_process(100)
    started = time.monotonic()
    try:
        with pytest.raises(KataVfioError, match=f"for the claims lock {lock}, which another "
                                                "hook holds") as err:
            guest.run(manifest((7, [mdev("0000:81:00.0")])), "a", 100)
    finally:
        os.close(holder)
    took = time.monotonic() - started
    assert 0.8 < took < 2.5, took  # waited, and ended before the deadline
    assert str(err.value).startswith("waited "), err.value
    assert guest.kernel.writes == []


def test_a_restarted_container_gets_its_own_device_back(guest: Guest) -> None:
    one_nic = manifest((7, [mdev("0000:81:00.0")]))
    guest.start_process(100)
    guest.start_process(200)
    assert guest.run(one_nic, "b", 200) == 0
    assert guest.run(one_nic, "a", 100) == 0
    assert guest.given() == ["0000:00:03.0"]
    guest.end_process(200)  # b ends: 00:02.0 is free and first by address
    guest.end_process(100)
    guest.start_process(101)  # a restarts (same id, new init)
    assert guest.run(one_nic, "a", 101) == 0
    assert guest.given() == ["0000:00:03.0"]
    assert guest.claims() == {"0000:00:03.0": "a"}


def test_a_reused_pid_does_not_keep_a_claim(guest: Guest) -> None:
    one_nic = manifest((7, [mdev("0000:81:00.0")]))
    guest.start_process(100, start=5000)
    assert guest.run(one_nic, "a", 100) == 0
    guest.end_process(100)
    guest.start_process(100, start=9000)  # another process got pid 100
    guest.start_process(200)
    assert guest.run(one_nic, "b", 200) == 0
    assert guest.given() == ["0000:00:02.0"]
    assert guest.claims() == {"0000:00:02.0": "b"}


def test_a_device_held_by_a_live_container_is_not_given_twice(guest: Guest) -> None:
    two_nics = manifest((7, [mdev("0000:81:00.0"), mdev("0000:81:00.1")]), timeout=0.2)
    guest.start_process(100)
    guest.start_process(200)
    assert guest.run(two_nics, "a", 100) == 0
    assert guest.given() == ["0000:00:02.0", "0000:00:03.0"]
    with pytest.raises(HookError, match=r"host device 0000:81:00\.1 .* not found in the guest "
                                        r"after 0\.2 s; guest device 0000:00:02\.0 is held by "
                                        r"container a; guest device 0000:00:03\.0 is held by "
                                        r"container a"):
        guest.run(two_nics, "b", 200)
    assert guest.claims() == {"0000:00:02.0": "a", "0000:00:03.0": "a"}
    assert guest.fs.driver("0000:00:04.0") == "e1000e"  # b touched nothing


def test_claims_are_written_before_anything_is_bound(guest: Guest) -> None:
    seen: list[dict[str, str]] = []
    real_write = guest.kernel.write

    def write(path: Path, text: str) -> None:
        seen.append(guest.claims())
        real_write(path, text)

    guest.roots = guest.roots._replace(write=write)
    assert guest.run(manifest((7, [mdev("0000:81:00.0")]))) == 0
    assert seen and seen[0] == {"0000:00:02.0": "c1"}


# --- one error boundary --------------------------------------------------------------------


def test_an_unexpected_error_names_its_step_and_place(
    guest: Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from kata_vfio_hook import main as hook_main

    def broken(*args: Any) -> None:
        raise ValueError("boom")

    monkeypatch.setattr("kata_vfio_hook.cgroup.devices_cgroup", broken)
    monkeypatch.setattr(sys, "stdin", io.StringIO(guest.state(manifest(
        (7, [mdev("0000:81:00.0")])))))
    monkeypatch.setattr(hook_main, "LOG_PATH", str(tmp_path / "main.log"))
    assert hook_main.main(["kata-vfio-hook", "prestart"], guest.roots) == 70
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert re.match(r"kata-vfio-hook: internal error while allowing the devices in the "
                    r"container's cgroup: ValueError\('boom'\) at test_hook\.py:\d+ ", err[0])
    assert guest.fs.driver("0000:00:02.0") == "e1000e"  # given back on this failure too
    logged = json.loads((tmp_path / "main.log").read_text().splitlines()[-1])
    assert logged["error"] in err[0] and logged["container_id"] == "c1"


# The hook's first run in a fresh VM is what Kata waits for (issue 8: ≤ 4× a bare
# interpreter start): its code imports the standard library's cheap modules only.
# _operator: built into the interpreter, like _thread (the itemgetter of kata_vfio's value types)
HOOK_STDLIB = {"os", "sys", "time", "errno", "fcntl", "stat", "struct", "select", "_socket",
               "_thread", "_json", "__future__", "_operator"}


def test_a_whole_hook_run_imports_only_cheap_standard_modules(guest: Guest) -> None:
    """Every import statement our modules execute during a full run (devices found,
    rebound concurrently, groups, nodes, cgroup, log), with our modules imported afresh so
    their top-level imports count too: nothing beyond the cheap list (no pathlib, typing,
    json, re, threading, socket, contextlib, dataclasses)."""
    import builtins

    ours = ("kata_vfio", "kata_vfio_hook")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ours}
    seen: set[str] = set()
    real_import = builtins.__import__

    def recording(name: str, globals: Any = None, *args: Any, **kwargs: Any) -> Any:
        importer = (globals or {}).get("__name__", "")
        if importer.split(".")[0] in ours and name.split(".", maxsplit=1)[0] not in ours:
            seen.add(name)
        return real_import(name, globals, *args, **kwargs)

    for name in saved:
        del sys.modules[name]
    builtins.__import__ = recording
    try:
        import kata_vfio_hook.main as fresh_main
        from kata_vfio.jsonlog import JsonLog as FreshLog
        from kata_vfio_hook.roots import GuestRoots as FreshRoots

        r = guest.roots
        roots = FreshRoots(sysfs=r.sysfs, proc=r.proc, cgroupfs=r.cgroupfs,
                           libcontainer=r.libcontainer, claims=r.claims, modprobe=(),
                           via_proc_root=False, write=r.write, uevents=False,
                           ipv4_address=r.ipv4_address)
        m = manifest((7, [mdev("0000:81:00.0", mac="52:54:00:00:00:03")]),
                     (9, [mdev("0000:82:00.0", NVME)]), (2, [mdev("0000:83:00.0")]))
        assert fresh_main.run(guest.state(m), roots, FreshLog(guest.log_path)) == 0
    finally:
        builtins.__import__ = real_import
        for name in [k for k in sys.modules if k.split(".")[0] in ours]:
            del sys.modules[name]
        sys.modules.update(saved)
    assert guest.given() == ["0000:00:02.0", "0000:00:04.0", "0000:00:05.0"]
    assert {"_thread", "_json"} <= seen  # the concurrent bind and the codec did run
    assert seen <= HOOK_STDLIB, sorted(seen - HOOK_STDLIB)
