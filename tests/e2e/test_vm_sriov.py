"""SR-IOV on a real kernel: QEMU's NVMe as PF in a guest that is the IOMMU host; VFs made by
`kata-vfio-ctl vfs`, handed out by `io.kata-vfio.select` through the real wrapper."""

from __future__ import annotations

import json
from typing import Any

import pytest

import vmtools
from vmtools import GuestRun

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    log = tmp_path_factory.mktemp("vmsriov") / "console.log"
    return vmtools.boot_sriov_host("/kvfio/sriov.py", log)


def record(guest: GuestRun, event: str, **match: Any) -> dict[str, Any]:
    return guest.record(event, **match)


def call(guest: GuestRun, step: str) -> dict[str, Any]:
    return record(guest, "call", step=step)


def test_vfs_are_made_for_vfio(guest: GuestRun) -> None:
    pf = record(guest, "pf")["pf"]
    made = call(guest, "vfs-4")
    assert made["rc"] == 0, made["stderr"]
    sriov = record(guest, "sriov")
    assert (sriov["autoprobe"], sriov["numvfs"]) == ("0", "4")
    *lines, next_step = made["stdout"].splitlines()  # one line a VF, then the next step
    vfs = [line.split(": ", 1)[0] for line in lines]
    assert len(vfs) == 4 and all(made["drivers"][v] is None for v in vfs)  # autoprobe off
    assert next_step.startswith("next: kata-vfio-ctl bind ") and all(v in next_step for v in vfs), (
        next_step
    )
    groups = sriov["groups"]
    assert len({groups[v] for v in vfs} | {groups[pf]}) == 5  # a group each
    assert call(guest, "vfs-4-again")["rc"] == 0


def test_devices_json_links_pf_and_vfs(guest: GuestRun) -> None:
    pf = record(guest, "pf")["pf"]
    records = {r["address"]: r for r in json.loads(call(guest, "devices")["stdout"])}
    assert records[pf]["sriov_totalvfs"] == 4 and len(records[pf]["virtfns"]) == 4
    for vf in records[pf]["virtfns"]:
        assert records[vf]["physfn"] == pf
        assert records[vf]["iommu_group"] is not None and records[vf]["owner"] is None


def test_select_allocates_distinct_vfs_and_the_third_is_refused(guest: GuestRun) -> None:
    pf = record(guest, "pf")["pf"]
    c1, c2, c3 = (record(guest, "allocated", name=n) for n in ("c1", "c2", "c3"))
    assert c1["rc"] == 0 and c2["rc"] == 0
    first, second = c1["allocated"].split(","), c2["allocated"].split(",")
    assert len(set(first + second)) == 4
    drivers = call(guest, "create-c2")["drivers"]
    assert all(drivers[a] == "vfio-pci" for a in first + second)
    assert drivers[pf] == "nvme"  # the PF provides the VFs: never taken
    refused = call(guest, "create-c3")
    assert refused["rc"] != 0 and c3["allocated"] is None
    assert "held by container c1" in refused["stderr"]
    assert "held by container c2" in refused["stderr"]
    owners = {r["address"]: r["owner"] for r in json.loads(call(guest, "devices-owned")["stdout"])}
    assert {owners[a] for a in first} == {"c1"} and {owners[a] for a in second} == {"c2"}


def test_delete_frees_and_the_next_create_gets_them(guest: GuestRun) -> None:
    first = record(guest, "allocated", name="c1")["allocated"].split(",")
    deleted = call(guest, "delete-c1")
    assert deleted["rc"] == 0, deleted["stderr"]
    assert all(deleted["drivers"][a] is None for a in first)  # back to driver-less
    c4 = record(guest, "allocated", name="c4")
    assert c4["rc"] == 0 and c4["allocated"].split(",") == first


def test_vfs_removal_refused_while_owned_then_everything_restored(guest: GuestRun) -> None:
    refused = call(guest, "vfs-0-refused")
    assert refused["rc"] != 0 and "is owned by container" in refused["stderr"]
    assert call(guest, "delete-c2")["rc"] == 0 and call(guest, "delete-c4")["rc"] == 0
    removed = call(guest, "vfs-0")
    assert removed["rc"] == 0, removed["stderr"]
    pf = record(guest, "pf")["pf"]
    assert removed["drivers"][pf] == "nvme"
    assert len(removed["drivers"]) == len(call(guest, "devices")["drivers"]) - 4
    assert call(guest, "restore-all")["rc"] == 0
