"""The guest kernel as an IOMMU *host* for kata-vfio-ctl: real driver moves, real groups."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

import vmtools
from vmtools import GuestRun, Scenario

pytestmark = pytest.mark.vm

INITRD = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
KVER = os.environ.get("KATA_VFIO_KVER", "")
SCRIPT = '#!/kvfio/bin/sh\nexec /usr/bin/python3 -I -S /kvfio/hosttest.py "$1"\n'


# What the guest stacks on its disk and NICs, and the tools it does that with (Debian's
# dmsetup, mdadm and iproute2: APT_PACKAGES)
STACK_MODULES = ("ext4", "dm_mod", "raid1", "bridge", "bonding", "8021q")
STACK_TOOLS = ("/usr/sbin/dmsetup", "/usr/sbin/mdadm", "/usr/sbin/ip")
SECTOR = 512
PARTITION_SECTORS = 16384  # 8 MiB each: ext2, swap, RAID members


def partitioned_disk(path: Path, count: int = 4) -> Path:
    """A raw disk image with an MBR of `count` Linux partitions of 8 MiB each."""
    first = 2048
    table = b""
    for i in range(count):
        start = first + i * PARTITION_SECTORS
        # status, CHS start (unused: LBA), type 0x83, CHS end, LBA start, sectors
        table += struct.pack(
            "<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start, PARTITION_SECTORS
        )
    mbr = bytes(446) + table.ljust(64, b"\0") + b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(mbr)
        f.truncate((first + count * PARTITION_SECTORS) * SECTOR)
    return path


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    if not INITRD.exists() or not KVER or not vmtools.kernel_image(KVER).exists():
        pytest.skip("needs `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run `make test`")
    tmp = tmp_path_factory.mktemp("vmhost")
    disk = partitioned_disk(tmp / "disk.img")
    devices = (*vmtools.DEFAULT_DEVICES, vmtools.nvme_with_disk("kvfio-disk", disk, addr="0x6"))
    return vmtools.boot(
        INITRD,
        KVER,
        [Scenario("host", "{}", script=SCRIPT)],
        devices=devices,
        console_log=tmp / "console.log",
        host_tools=True,
        modules=STACK_MODULES,
        files={t: Path(t) for t in STACK_TOOLS},
        timeout=900,
    )


def step(guest: GuestRun, name: str) -> dict[str, Any]:
    for record in guest.records:
        if record.get("event") == "ctl" and record.get("step") == name:
            return record
    raise AssertionError(f"no step {name}; console:\n{guest.console[-4000:]}")


def test_devices_json_matches_sysfs(guest: GuestRun) -> None:
    view = guest.find("sysfs")["view"]
    result = step(guest, "devices")
    assert result["rc"] == 0, result["stderr"]
    listed = {
        r["address"]: {"driver": r["driver"], "iommu_group": r["iommu_group"]}
        for r in json.loads(result["stdout"])
    }
    assert listed == view


def test_bind_moves_an_e1000e_and_restore_gives_it_back(guest: GuestRun) -> None:
    bound = step(guest, "bind-one")
    assert bound["rc"] == 0, bound["stderr"]
    assert bound["drivers"]["0000:00:04.0"] == "vfio-pci"
    assert bound["stdout"].startswith("moving 0000:00:04.0 (8086:10d3, e1000e) -> vfio-pci\n")
    assert "/dev/vfio/2" in bound["stdout"] and "2" in bound["dev_vfio"]
    restored = step(guest, "restore-one")
    assert restored["drivers"]["0000:00:04.0"] == "e1000e"
    assert "2" not in restored["dev_vfio"]


def test_bridged_pair_is_bound_together(guest: GuestRun) -> None:
    bound = step(guest, "bind-bridged")
    assert bound["rc"] == 0, bound["stderr"]
    assert bound["drivers"]["0000:01:01.0"] == bound["drivers"]["0000:01:02.0"] == "vfio-pci"
    assert bound["drivers"]["0000:00:08.0"] is None  # the bridge is left alone
    restored = step(guest, "restore-all")
    assert restored["drivers"]["0000:01:01.0"] == restored["drivers"]["0000:01:02.0"] == "e1000"


def test_nic_with_an_address_is_refused(guest: GuestRun) -> None:
    refused = step(guest, "bind-in-use")
    assert refused["rc"] == 1
    lines = refused["stderr"].strip().splitlines()
    assert len(lines) == 1
    assert "PCI device 0000:00:03.0 is in use: interface" in lines[0]
    assert "up with addresses 192.0.2.1" in lines[0]
    assert refused["drivers"]["0000:00:03.0"] == "e1000e"


def test_dry_run_by_interface_name_changes_nothing(guest: GuestRun) -> None:
    dry = step(guest, "dry-run-ifname")
    assert dry["rc"] == 0, dry["stderr"]
    assert "would move 0000:00:04.0 (8086:10d3, e1000e) -> vfio-pci" in dry["stdout"]
    assert dry["drivers"]["0000:00:04.0"] == "e1000e" and "2" not in dry["dev_vfio"]


def test_bind_by_interface_name_and_restore_by_short_address(guest: GuestRun) -> None:
    nic = guest.find("names")["second_nic"]
    bound = step(guest, "bind-ifname")
    assert bound["args"] == ["bind", nic]
    assert bound["rc"] == 0, bound["stderr"]
    assert bound["drivers"]["0000:00:04.0"] == "vfio-pci"
    restored = step(guest, "restore-short")
    assert restored["rc"] == 0, restored["stderr"]
    assert restored["drivers"]["0000:00:04.0"] == "e1000e"


# --- what the host stands on (issue 15): refused naming the reason, then given back ----


def setups_ok(guest: GuestRun, *names: str) -> None:
    for name in names:
        record = next(
            (r for r in guest.records if r.get("event") == "setup" and r.get("name") == name), None
        )
        assert record is not None, f"no setup {name}; console:\n{guest.console[-4000:]}"
        assert record["rc"] == 0, record


def refused(guest: GuestRun, name: str, function: str, driver: str) -> str:
    """The one line `bind` refused with; the device still on its driver."""
    result = step(guest, name)
    assert result["rc"] == 1, result
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith(f"kata-vfio-ctl: PCI device {function} is in use: "), lines
    assert result["drivers"][function] == driver
    return lines[0]


DISK_FN = "0000:00:06.0"
NIC_FN = "0000:00:04.0"


def disk_name(guest: GuestRun) -> str:
    names = guest.find("disk")["names"]
    assert len(names) == 5, names  # the disk and its four partitions
    return str(names[0])


def test_a_disk_with_a_mounted_partition_is_refused(guest: GuestRun) -> None:
    disk = disk_name(guest)
    setups_ok(guest, "mkfs-p1", "mount-p1")
    line = refused(guest, "bind-mounted", DISK_FN, "nvme")
    assert f"block device /dev/{disk}p1 is mounted on /mnt/kv" in line


def test_a_disk_with_swap_on_a_partition_is_refused(guest: GuestRun) -> None:
    disk = disk_name(guest)
    setups_ok(guest, "umount-p1", "mkswap-p2", "swapon-p2")
    line = refused(guest, "bind-swap", DISK_FN, "nvme")
    assert f"block device /dev/{disk}p2 is active swap" in line


def test_a_disk_under_device_mapper_is_refused_also_mounted_through_its_mapper_node(
    guest: GuestRun,
) -> None:
    """No udev in the guest: dmsetup makes /dev/mapper/kvlin a node of its own; the mount
    through it still counts as dm-0's."""
    disk = disk_name(guest)
    setups_ok(guest, "swapoff-p2", "dm-create", "mkfs-dm", "mount-dm")
    mapper = guest.find("mapper")
    assert mapper["exists"] and not mapper["islink"], mapper
    line = refused(guest, "bind-dm", DISK_FN, "nvme")
    assert f"block device /dev/{disk}p3 is held by dm-0 (device-mapper or md)" in line
    line = refused(guest, "bind-dm-mounted", DISK_FN, "nvme")
    assert f"block device /dev/{disk}p3 is under dm-0, which is mounted on /mnt/kv" in line


def test_a_disk_under_md_is_refused_also_md_over_dm_mounted(guest: GuestRun) -> None:
    disk = disk_name(guest)
    setups_ok(guest, "umount-dm", "md-create", "mkfs-md", "mount-md")
    line = refused(guest, "bind-md-over-dm-mounted", DISK_FN, "nvme")
    assert f"block device /dev/{disk}p3 is under md0, which is mounted on /mnt/kv" in line
    assert f"block device /dev/{disk}p4 is under md0, which is mounted on /mnt/kv" in line
    setups_ok(guest, "umount-md", "md-stop", "dm-remove", "md-create-parts")
    line = refused(guest, "bind-md", DISK_FN, "nvme")
    assert f"block device /dev/{disk}p3 is held by md1 (device-mapper or md)" in line


def test_the_disk_torn_down_is_bound_and_given_back(guest: GuestRun) -> None:
    setups_ok(guest, "md-stop-parts", "md-zero")
    bound = step(guest, "bind-disk-free")
    assert bound["rc"] == 0, bound["stderr"]
    assert bound["drivers"][DISK_FN] == "vfio-pci"
    restored = step(guest, "restore-disk")
    assert restored["rc"] == 0, restored["stderr"]
    assert restored["drivers"][DISK_FN] == "nvme"
    assert len(guest.find("disk-back")["names"]) == 5  # nvme rescanned its partitions


def test_a_nic_with_only_its_link_local_address_is_free(guest: GuestRun) -> None:
    """Up, with the fe80:: address every up interface gets: main refused it."""
    setups_ok(guest, "nic-up")
    assert "fe80::" in guest.find("link-local")["addresses"]
    bound = step(guest, "bind-link-local-only")
    assert bound["rc"] == 0, bound["stderr"]
    assert bound["drivers"][NIC_FN] == "vfio-pci"
    assert step(guest, "restore-link-local-only")["drivers"][NIC_FN] == "e1000e"


def test_a_port_of_a_bridge_that_is_up_is_refused_then_freed(guest: GuestRun) -> None:
    setups_ok(guest, "br-add", "br-port", "br-up")
    line = refused(guest, "bind-bridge-port", NIC_FN, "e1000e")
    assert "is a member of bridge kvbr0, which is up" in line
    setups_ok(guest, "br-release", "br-del")
    bound = step(guest, "bind-after-bridge")
    assert bound["rc"] == 0, bound["stderr"]
    assert bound["drivers"][NIC_FN] == "vfio-pci"
    restored = step(guest, "restore-after-bridge")
    assert restored["rc"] == 0 and restored["drivers"][NIC_FN] == "e1000e"


def test_a_port_of_a_bond_that_is_up_is_refused(guest: GuestRun) -> None:
    setups_ok(guest, "bond-add", "bond-port-down", "bond-port", "bond-up")
    line = refused(guest, "bind-bond-port", NIC_FN, "e1000e")
    assert "is a member of bond kvbond0, which is up" in line


def test_a_nic_whose_vlan_has_an_address_is_refused_then_freed(guest: GuestRun) -> None:
    setups_ok(guest, "bond-del", "vlan-add", "vlan-addr", "vlan-lower-up", "vlan-up")
    line = refused(guest, "bind-vlan-lower", NIC_FN, "e1000e")
    assert "interface kvvlan5 is up with addresses 198.51.100.7 (vlan on " in line
    setups_ok(guest, "vlan-del")
    bound = step(guest, "bind-after-vlan")
    assert bound["rc"] == 0, bound["stderr"]
    assert step(guest, "restore-after-vlan")["drivers"][NIC_FN] == "e1000e"
