from __future__ import annotations

import pytest

from kata_vfio.errors import BindError, DeviceError
from kata_vfio.pci import (
    IommuGroup,
    PciAddress,
    group_members,
    group_of,
    read_device,
    usable_by_vfio,
    vfio_group_devnum,
)
from kata_vfio.rebind import bind_to, give_back

from fakesys import BRIDGE, NVME, FakeKernel, FakeSysfs


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("0000:03:00.0", "0000:03:00.0"),
        ("0000:AF:1F.7", "0000:af:1f.7"),
        (" 0001:00:02.1 ", "0001:00:02.1"),
        ("10000:e1:00.0", "10000:e1:00.0"),
    ],
)
def test_address_parses_and_prints_canonically(text: str, canonical: str) -> None:
    assert str(PciAddress.parse(text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "03:00.0",
        "0000:03:00",
        "0000:zz:00.0",
        "0000:03:20.0",
        "0000:03:00.8",
        "../../etc",
        "0000:03:00.0/../x",
        "0000:3:00.0",
        "0000:03:00.0.1",
        "0000:03:00.00",
    ],
)
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(DeviceError, match="malformed PCI address"):
        PciAddress.parse(text)


@pytest.mark.parametrize("text", ["", "-1", "1a", "../1", "٣", "1 2", "99999999999"])
def test_group_numbers_are_plain_decimals(text: str) -> None:
    with pytest.raises(DeviceError):
        IommuGroup.parse(text)


def test_device_facts_come_from_sysfs(fakesys: FakeSysfs) -> None:
    fakesys.add_device("0000:00:03.0", NVME, group=4, driver="nvme", subsystem=(0x1AF4, 0x1100))
    dev = read_device(fakesys.root, PciAddress.parse("0000:00:03.0"))
    assert (dev.vendor, dev.device, dev.class_code) == NVME
    assert (dev.subsystem_vendor, dev.subsystem_device) == (0x1AF4, 0x1100)
    assert dev.driver == "nvme"
    assert dev.iommu_group == IommuGroup(4)
    assert not usable_by_vfio(dev)


def test_group_members_and_usability(fakesys: FakeSysfs) -> None:
    fakesys.add_device("0000:00:1e.0", BRIDGE, group=2, driver="pcieport")
    fakesys.add_device("0000:01:01.0", group=2, driver="vfio-pci")
    fakesys.add_device("0000:01:02.0", group=2, driver=None)
    members = group_members(fakesys.root, IommuGroup(2))
    assert [str(a) for a in members] == ["0000:00:1e.0", "0000:01:01.0", "0000:01:02.0"]
    assert all(usable_by_vfio(read_device(fakesys.root, a)) for a in members)


def test_device_without_group_says_how_to_enable_the_iommu(fakesys: FakeSysfs) -> None:
    fakesys.add_device("0000:00:03.0", driver="e1000e")
    with pytest.raises(DeviceError, match="intel_iommu=on"):
        group_of(fakesys.root, PciAddress.parse("0000:00:03.0"))


def test_vfio_group_devnum(fakesys: FakeSysfs) -> None:
    fakesys.add_vfio_group(7, minor=1)
    assert vfio_group_devnum(fakesys.root, IommuGroup(7)) == (243, 1)
    with pytest.raises(DeviceError, match="not bound to vfio-pci"):
        vfio_group_devnum(fakesys.root, IommuGroup(8))


def test_bind_moves_the_driver_link_and_give_back_restores(
    fakesys: FakeSysfs, kernel: FakeKernel
) -> None:
    fakesys.add_device("0000:00:03.0", group=3, driver="e1000e")
    addr = PciAddress.parse("0000:00:03.0")
    assert bind_to(fakesys.root, addr, "vfio-pci", kernel.write) == "e1000e"
    assert fakesys.driver("0000:00:03.0") == "vfio-pci"
    assert (fakesys.root / "class/vfio/3/dev").exists()
    writes = [w[0].rsplit("/", 1)[1] for w in kernel.writes]
    assert writes == ["driver_override", "unbind", "drivers_probe"]
    # already bound: nothing written
    kernel.writes.clear()
    assert bind_to(fakesys.root, addr, "vfio-pci", kernel.write) == "vfio-pci"
    assert kernel.writes == []
    give_back(fakesys.root, addr, "e1000e", None, kernel.write)
    assert fakesys.driver("0000:00:03.0") == "e1000e"
    assert read_device(fakesys.root, addr).driver_override is None


def test_bind_failure_is_reported_and_device_left_driverless(
    fakesys: FakeSysfs,
) -> None:
    fakesys.add_driver("vfio-pci")
    kernel = FakeKernel(fakesys, refuse=frozenset({"0000:00:03.0"}))
    fakesys.add_device("0000:00:03.0", group=3, driver="e1000e")
    with pytest.raises(BindError, match=r"vfio-pci did not take PCI device 0000:00:03\.0"):
        bind_to(fakesys.root, PciAddress.parse("0000:00:03.0"), "vfio-pci", kernel.write)
    give_back(fakesys.root, PciAddress.parse("0000:00:03.0"), "e1000e", None, kernel.write)
    assert fakesys.driver("0000:00:03.0") == "e1000e"
