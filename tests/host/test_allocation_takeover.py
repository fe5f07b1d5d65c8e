"""A device plugin's allocation (claim of kubernetes-allocation-<id>) is taken over by the
container that asks for all of its groups, and by no other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kata_vfio.errors import DeviceError
from kata_vfio.pci import IommuGroup
from kata_vfio_host.bindings import acquire
from kata_vfio_host.ledger import ContainerId, Host, read_journal_file
from kata_vfio_host.owners import owner_of

from fakesys import FakeKernel, FakeSysfs


@pytest.fixture
def host(tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel) -> Host:
    fakesys.add_vfio_endpoints(3, first_bus=3, first_group=12)  # groups 12, 13, 14
    return Host(fakesys.root, tmp_path / "state", kernel.write, boot_id="b1")


def claim(host: Host, who: str, groups: list[int]) -> None:
    acquire(host, ContainerId.parse(who), [IommuGroup(g) for g in groups], [], (), None)


def test_the_container_asking_for_the_whole_allocation_takes_it_over(host: Host) -> None:
    claim(host, "kubernetes-allocation-0000-03-00.0", [12, 13])
    claim(host, "app", [12, 13])  # what the shim's create does for the pod's container
    assert owner_of(host, IommuGroup(12)) == "container app"
    assert owner_of(host, IommuGroup(13)) == "container app"
    assert {c.container for c in read_journal_file(host).claims.values()} == {"app"}


def test_a_container_asking_for_part_of_an_allocation_is_refused(host: Host) -> None:
    claim(host, "kubernetes-allocation-0000-03-00.0", [12, 13])
    with pytest.raises(
        DeviceError,
        match=re.escape("IOMMU group 12 is in use by container kubernetes-allocation-0000-03-00.0"),
    ):
        claim(host, "other", [12, 14])
    assert owner_of(host, IommuGroup(12)) == "container kubernetes-allocation-0000-03-00.0"
    assert owner_of(host, IommuGroup(14)) is None  # nothing claimed for the refused one


def test_a_container_holds_its_groups_against_an_allocation(host: Host) -> None:
    """The take-over goes one way: an allocation never takes a container's group."""
    claim(host, "app", [12])
    with pytest.raises(DeviceError, match="in use by container app"):
        claim(host, "kubernetes-allocation-0000-03-00.0", [12])
    assert owner_of(host, IommuGroup(12)) == "container app"
