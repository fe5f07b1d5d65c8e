"""The guest hook refuses forged manifests: never a device the VM itself depends on
(virtio, a mounted disk, an interface in use)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from kata_vfio.errors import HookError

from fakesys import IGBVF, NVME, FakeSysfs
from hookguest import Guest, manifest, mdev

# --- forged manifests: never a device the VM itself depends on --------------------------

VIRTIO_NET = (0x1AF4, 0x1041, 0x020000)
VIRTIO_BLK = (0x1AF4, 0x1042, 0x010000)
VIRTIO_VSOCK = (0x1AF4, 0x1053, 0x078000)  # kata-agent's transport


def add_child(
    fs: FakeSysfs, addr: str, child: str, cls: str, name: str, flags: str = "0x1003"
) -> Path:
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
    os.symlink(
        os.path.relpath(disk / "vda1", fs.root / "class/block"), fs.root / "class/block/vda1"
    )
    fs.add_device("0000:00:0c.0", VIRTIO_VSOCK, group=12, driver="virtio-pci")
    (fs.dev_dir("0000:00:0c.0") / "virtio2").mkdir()
    return guest


VM_DEVICES = {"0000:00:0a.0": VIRTIO_NET, "0000:00:0b.0": VIRTIO_BLK, "0000:00:0c.0": VIRTIO_VSOCK}


@pytest.mark.parametrize("target", sorted(VM_DEVICES))
def test_forged_manifest_naming_a_virtio_device_is_refused(vm_guest: Guest, target: str) -> None:
    vendor, device, cls = VM_DEVICES[target]
    m = manifest((7, [mdev("0000:81:00.0", VM_DEVICES[target])]), timeout=0.2)
    with pytest.raises(HookError) as err:
        vm_guest.run(m)
    assert str(err.value).startswith(
        f"refusing guest device {target} [{vendor:04x}:{device:04x} class {cls:06x}]: "
        "the VM depends on it (driver virtio-pci)"
    )
    assert vm_guest.kernel.writes == []
    assert all(vm_guest.fs.driver(a) == "virtio-pci" for a in VM_DEVICES)
    assert not (vm_guest.bundle / "rootfs/dev/vfio").exists()


def test_forged_manifest_among_real_devices_rebinds_nothing(
    vm_guest: Guest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through main(), as the agent runs it: one line on stderr, non-zero, nothing moved."""
    import io

    from kata_vfio_hook import main as hook_main

    m = manifest(
        (7, [mdev("0000:81:00.0", NVME)]),
        (
            8,
            [
                mdev(f"0000:82:00.{i}", ids)
                for i, ids in enumerate((VIRTIO_NET, VIRTIO_BLK, VIRTIO_VSOCK))
            ],
        ),
        timeout=0.2,
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(vm_guest.state(m)))
    monkeypatch.setattr(hook_main, "LOG_PATH", str(tmp_path / "main.log"))
    assert hook_main.main(["kata-vfio-hook", "prestart"], vm_guest.roots) != 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "kata-vfio-hook: refusing guest device 0000:00:0a.0 [1af4:1041 class 020000]: "
        "the VM depends on it (driver virtio-pci)"
    ), err
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
    os.symlink(
        os.path.relpath(disk / "nvme0n1p1", guest.fs.root / "class/block"),
        guest.fs.root / "class/block/nvme0n1p1",
    )
    (guest.proc / "self/mounts").write_text(
        "rootfs / rootfs rw 0 0\n/dev/nvme0n1p1 /run/data ext4 rw 0 0\n"
    )
    with pytest.raises(
        HookError,
        match=r"refusing guest device 0000:00:05\.0 \[1b36:0010 "
        r"class 010802\]: the VM depends on it \(block device "
        r"nvme0n1p1 is mounted on /run/data\)",
    ):
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


@pytest.mark.parametrize(
    ("flags", "ipv4", "inet6", "refused"),
    [
        ("0x1003", "10.0.2.15", "", "interface eth7 is up with address 10.0.2.15"),
        (
            "0x1003",
            None,
            "20010db8000000000000000000000002 07 40 00 80 eth7",
            "interface eth7 is up with address 2001:db8::2",
        ),
        ("0x1003", None, "fe800000000000005054fffe00000001 07 40 20 80 eth7", None),  # link-local
        ("0x1002", "10.0.2.15", "", None),  # down
        ("0x1003", None, "", None),  # up, no address
    ],
)
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
    with pytest.raises(
        HookError,
        match=re.escape(
            f"refusing guest device 0000:00:07.0 [8086:10ca class 020000]: the VM depends on it"
            f" ({refused})"
        ),
    ):
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
