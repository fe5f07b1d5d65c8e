"""`kata-vfio-ctl device-plugin` on a real kernel: a guest (vIOMMU) that is the SR-IOV
host, QEMU's NVMe PF with VFs made by `kata-vfio-ctl vfs`. The plugin registers with a
Registration server of ours, offers the VFs' groups, binds them to vfio-pci in Allocate
(called over its gRPC socket), gives them back once our pod-resources server no longer
lists them, and reports a VF the kernel removed Unhealthy."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import vmtools
from vmtools import GuestRun

pytestmark = pytest.mark.vm

INITRD = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
KVER = os.environ.get("KATA_VFIO_KVER", "")
TESTS = Path(__file__).resolve().parent
RESOURCE = "kata-vfio.io/nvme"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    if not INITRD.exists() or not KVER or not vmtools.kernel_image(KVER).exists():
        pytest.skip("needs `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run `make test`")
    log = tmp_path_factory.mktemp("vmplugin") / "console.log"
    started = time.monotonic()
    run = vmtools.boot_sriov_host(
        "/kvfio/plugin.py", 3, log, INITRD, KVER, timeout=900, memory_mb=1536,
        host_packages=vmtools.PLUGIN_PACKAGES,
        files={"/kvfio/plugin_peers.py": TESTS / "plugin_peers.py"})
    print(f"device-plugin VM: {time.monotonic() - started:.1f} s")
    return run


def record(guest: GuestRun, event: str, **match: Any) -> dict[str, Any]:
    for r in guest.records:
        if r.get("event") == event and all(r.get(k) == v for k, v in match.items()):
            return r
    raise AssertionError(f"no {event} {match}; console:\n{guest.console[-6000:]}")


def test_registers_and_offers_exactly_the_vfs(guest: GuestRun) -> None:
    assert record(guest, "call", step="vfs-3")["rc"] == 0
    sriov = record(guest, "sriov")
    assert record(guest, "registered")["request"] == ["v1beta1", "kata-vfio-nvme.sock",
                                                      RESOURCE]
    # the PF provides the VFs: not offered while they exist
    assert record(guest, "offered")["devices"] == {v: "Healthy" for v in sriov["vfs"]}


def test_allocate_binds_the_vfs_to_vfio_pci_and_the_ledger_holds_them(
        guest: GuestRun) -> None:
    vfs = record(guest, "sriov")["vfs"]
    groups = record(guest, "sriov")["groups"]
    got = record(guest, "allocate", step="vfs")
    assert "error" not in got, got
    numbers = sorted(groups[v] for v in vfs[:2])
    assert got["devices"] == [["/dev/vfio/vfio", "/dev/vfio/vfio", "rw"],
                              *[[f"/dev/vfio/{n}", f"/dev/vfio/{n}", "rw"] for n in numbers]]
    assert got["envs"] == {"PCIDEVICE_KATA_VFIO_IO_NVME": ",".join(vfs[:2])}
    assert [got["drivers"][v] for v in vfs] == ["vfio-pci", "vfio-pci", None]
    assert set(numbers) <= set(got["dev_vfio"])
    assert got["opened"] == {"vfio": 0, **{n: "viable" for n in numbers}}
    cid = "kubernetes-allocation-" + vfs[0].replace(":", "-")
    assert got["ledger"] == {cid: sorted(int(n) for n in numbers)}
    assert got["owners"][vfs[0]] == got["owners"][vfs[1]] == f"container {cid}"


def test_a_listed_pod_keeps_its_vfs_and_a_gone_one_gives_them_back(guest: GuestRun) -> None:
    vfs = record(guest, "sriov")["vfs"]
    kept = record(guest, "kept")
    assert kept["drivers"][vfs[0]] == "vfio-pci" and kept["ledger"] != {}
    released = record(guest, "released", step="vfs")
    assert released["done"], released
    assert released["ledger"] == {}
    assert released["owners"][vfs[0]] is None and released["owners"][vfs[1]] is None
    restore = record(guest, "call", step="restore-after-vfs")
    assert restore["rc"] == 0 and restore["stdout"] == "nothing to restore\n", restore
    assert [restore["drivers"][v] for v in vfs[:2]] == [None, None]  # as `vfs` left them


def test_a_removed_vf_is_unhealthy_within_a_second(guest: GuestRun) -> None:
    vfs = record(guest, "sriov")["vfs"]
    removed = record(guest, "removed", how="remove")
    assert removed["latency"] is not None and removed["latency"] < 1.0, removed
    assert removed["health"][vfs[0]] == "Healthy"
    lowered = record(guest, "removed", how="sriov_numvfs")
    assert lowered["latency"] is not None and lowered["latency"] < 1.0, lowered


def test_without_vfs_the_pf_is_offered_taken_from_nvme_and_given_back(
        guest: GuestRun) -> None:
    pf = record(guest, "sriov")["pf"]
    assert record(guest, "sriov")["drivers"][pf] == "nvme"
    assert record(guest, "pf-offered")["health"].get(pf) == "Healthy"
    got = record(guest, "allocate", step="pf")
    assert "error" not in got, got
    assert got["drivers"][pf] == "vfio-pci"
    assert set(got["opened"].values()) == {0, "viable"}
    released = record(guest, "released", step="pf")
    assert released["done"] and released["drivers"][pf] == "nvme", released
    assert released["ledger"] == {} and released["owners"][pf] is None
    restore = record(guest, "call", step="restore-after-pf")
    assert restore["rc"] == 0 and restore["drivers"][pf] == "nvme", restore


def test_the_plugin_exits_cleanly_on_sigterm(guest: GuestRun) -> None:
    ended = record(guest, "plugin-exit")
    assert ended["rc"] == 0, ended["log"]
    assert not ended["socket"]
    assert "registered kata-vfio.io/nvme" in ended["log"]
