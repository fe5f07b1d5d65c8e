"""The device plugin on a real kernel: QEMU's NVMe PF makes SR-IOV VFs in a guest that is
the IOMMU host (q35 + intel-iommu, TCG); `kata-vfio-ctl device-plugin` runs there as its
own process beside the test peers of plugin_peers.py in place of the kubelet, and is
called over its socket. One boot; tests/vm/guest-plugin.py reports each step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vmtools
from vmtools import GuestRun

pytestmark = pytest.mark.vm

RESOURCE = "kata-vfio.io/nvme"
HERE = Path(__file__).resolve().parents[1]  # tests/


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    log = tmp_path_factory.mktemp("vmplugin") / "console.log"
    return vmtools.boot_sriov_host(
        "/kvfio/plugin.py",
        log,
        host_packages=vmtools.PLUGIN_PACKAGES,
        files={"/kvfio/plugin_peers.py": HERE / "plugin_peers.py"},
    )


def allocation(addr: str) -> str:
    return "kubernetes-allocation-" + addr.replace(":", "-")


def layout(guest: GuestRun) -> tuple[str, list[str], dict[str, int]]:
    vfs = guest.record("vfs")
    return vfs["pf"], vfs["vfs"], vfs["groups"]


def test_every_step_ran(guest: GuestRun) -> None:
    errors = [r for r in guest.records if r.get("event") == "error"]
    assert not errors, f"{errors}\n{guest.console[-4000:]}"
    guest.record("done")


def test_registers_and_offers_each_vf_not_the_pf(guest: GuestRun) -> None:
    pf, vfs, groups = layout(guest)
    made = guest.record("vfs")
    assert len(vfs) == 3 and all(made["drivers"][v] is None for v in vfs)  # autoprobe off
    assert len({*groups.values(), made["pf_group"]}) == 4  # a group each
    request = guest.record("registered")["request"]
    assert request == {
        "version": "v1beta1",
        "endpoint": "kata-vfio-nvme.sock",
        "resource_name": RESOURCE,
        "preferred": True,
    }
    offered = guest.record("offered")
    assert offered["devices"] == {v: "Healthy" for v in vfs}  # one unit per group, no PF
    assert (
        f"kata-vfio-ctl device-plugin: IOMMU group {made['pf_group']} not offered as "
        f"{RESOURCE}: {pf} provides virtual functions (they would go with it)"
    ) in offered["log"]


def check_allocated(reply: dict[str, Any], ids: list[str], groups: dict[str, int]) -> None:
    assert "error" not in reply, reply["error"]
    numbers = [groups[a] for a in ids]
    assert reply["devices"] == [["/dev/vfio/vfio", "/dev/vfio/vfio", "rw"]] + [
        [f"/dev/vfio/{g}", f"/dev/vfio/{g}", "rw"] for g in numbers
    ]
    both = ",".join(ids)
    assert reply["envs"] == {"PCIDEVICE_KATA_VFIO_IO_NVME": both}
    assert reply["annotations"] == {"io.kata-vfio.resource.nvme": both}
    assert reply["cdi"] == [f"{RESOURCE}={a}" for a in ids]
    for a in ids:  # the kernel's view: on vfio-pci, the group's node opens viable
        assert reply["drivers"][a] == "vfio-pci"
        status = reply["groups"][a]
        assert (status["number"], status["node"], status["viable"]) == (groups[a], True, True)
        assert reply["owners"][a] == allocation(ids[0])  # the ledger's claim


def test_allocate_binds_the_vfs_to_vfio_pci_for_real(guest: GuestRun) -> None:
    pf, vfs, groups = layout(guest)
    a, b = guest.record("allocate-a"), guest.record("allocate-b")
    check_allocated(a, vfs[:2], groups)
    assert a["owners"][vfs[2]] is None and a["owners"][pf] is None
    check_allocated(b, vfs[2:], groups)
    assert b["owners"][vfs[0]] == allocation(vfs[0])
    # the CDI spec names each group's real node numbers (the minor is not the group's)
    nodes = {
        d["name"]: d["containerEdits"]["deviceNodes"]
        for d in guest.record("cdi")["spec"]["devices"]
    }
    for reply, ids in ((a, vfs[:2]), (b, vfs[2:])):
        for vf in ids:
            major, minor = reply["groups"][vf]["dev"]
            assert nodes[vf] == [
                {"path": f"/dev/vfio/{groups[vf]}", "type": "c", "major": major, "minor": minor}
            ]


def test_a_pod_that_never_started_is_released_and_restore_gives_the_rest_back(
    guest: GuestRun,
) -> None:
    _, vfs, groups = layout(guest)
    released = guest.record("released")
    assert released["line"] == (
        f"kata-vfio-ctl device-plugin: released {allocation(vfs[0])} (its pod is gone): "
        f"groups {groups[vfs[0]]}, {groups[vfs[1]]}"
    )
    # no working nvme driver for QEMU's VFs: they go back to what they had, no driver
    assert released["drivers"] == {vfs[0]: None, vfs[1]: None, vfs[2]: "vfio-pci"}
    assert released["nodes"] == {vfs[0]: False, vfs[1]: False, vfs[2]: True}
    assert [released["owners"][v] for v in vfs] == [None, None, allocation(vfs[2])]
    spec = guest.record("cdi-after-release")["spec"]
    assert [d["name"] for d in spec["devices"]] == [vfs[2]]
    # B's pod may still start: restore says whose it is and moves nothing
    refused = guest.record("restore-refused")
    assert refused["rc"] != 0 and refused["stderr"].count("\n") == 1
    assert (
        f"{vfs[2]}: IOMMU group {groups[vfs[2]]} is held by Kubernetes allocation "
        f"{allocation(vfs[2])} (kata-vfio-ctl device-plugin)"
    ) in refused["stderr"]
    assert refused["drivers"][vfs[2]] == "vfio-pci"
    assert refused["owners"][vfs[2]] == allocation(vfs[2])
    restored = guest.record("restore")
    assert restored["rc"] == 0, restored["stderr"]
    assert f"{vfs[2]}: given back to its original driver" in restored["stdout"]
    assert restored["drivers"] == {v: None for v in vfs}
    assert restored["nodes"] == {v: False for v in vfs}
    assert all(restored["owners"][v] is None for v in vfs)


def test_removing_the_vfs_reaches_list_and_watch_by_itself(guest: GuestRun) -> None:
    _, vfs, _ = layout(guest)
    assert guest.record("before-removal")["devices"] == {v: "Healthy" for v in vfs}
    removed = guest.record("removed")
    assert removed["present"] == []  # sriov_numvfs 0: the kernel removed them
    assert removed["seconds"] is not None, removed["devices"]
    # the kernel removes the VFs first, then waits 1 s before the write returns
    # (sriov_disable): within 1 s of the write's start (1.67 s before the plugin reported
    # gone units ahead of its survey)
    assert removed["write_seconds"] >= 1.0
    # the update comes from the plugin's own poll, not from a later request: well under the
    # 5 s bound (0.05-0.17 s measured at load 15); the 1 s target is make bench's figure
    assert removed["seconds"] < 5.0, removed
    assert all(removed["devices"][v] == "Unhealthy" for v in vfs)


def test_the_pf_without_vfs_is_offered_taken_and_given_back_to_nvme(guest: GuestRun) -> None:
    pf, _, _ = layout(guest)
    assert guest.record("vfs")["pf_driver"] == "nvme"
    assert guest.record("pf-offered")["devices"][pf] == "Healthy"
    taken = guest.record("allocate-pf")
    check_allocated(taken, [pf], {pf: guest.record("vfs")["pf_group"]})
    back = guest.record("released-pf")
    assert back["line"] is not None and allocation(pf) in back["line"]
    assert back["driver"] == "nvme" and back["controllers"]  # nvme probed it again
    assert back["owners"][pf] is None
    stopped = guest.record("stopped")
    assert stopped["rc"] == 0 and not stopped["socket"]
    done = guest.record("restore-pf")
    assert (done["rc"], done["pf_driver"]) == (0, "nvme"), done["stderr"]
    assert done["stdout"].startswith("nothing to restore")
