"""Binds that survive a reboot, on a real kernel (issue 17): the same VM booted three
times over one state disk holding /etc/kata-vfio and /var/lib/kata-vfio.

Boot 1: `bind --persist` an e1000e, two containers claim (and auto-bind) an NVMe
controller and the bridged e1000 pair, `vfs --persist` gives QEMU's SR-IOV NVMe PF two
VFs and `bind --persist` takes the second, the device plugin allocates the other e1000e.
Boot 2: `kata-vfio-ctl boot` makes the two VFs again, binds the e1000e and the VF again,
and clears the containers' claims and the plugin's allocation, saying so; `vfs PF 0
--force` then drops the VFs' persistence. Boot 3, without the boot command: `restore
--all` says the earlier boot's binds ended with it, and gives nothing back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import vmtools
from vmtools import GuestRun, Scenario

pytestmark = pytest.mark.vm

INITRD = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
KVER = os.environ.get("KATA_VFIO_KVER", "")
SCRIPT = '#!/kvfio/bin/sh\nexec /usr/bin/python3 -I -S /kvfio/persist.py "$1"\n'
NIC = "0000:00:04.0"
NVME = "0000:00:05.0"
PAIR = ("0000:01:01.0", "0000:01:02.0")
SRIOV_PF = "0000:00:07.0"
ALLOCATED = "0000:00:03.0"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    if not INITRD.exists() or not KVER or not vmtools.kernel_image(KVER).exists():
        pytest.skip("needs `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run `make test`")
    tmp = tmp_path_factory.mktemp("vmpersist")
    state = tmp / "state.img"
    with open(state, "wb") as f:
        f.truncate(32 << 20)
    devices = (
        *vmtools.DEFAULT_DEVICES,
        vmtools.nvme_with_disk("kvfio-state", state, addr="0x6"),
        *vmtools.nvme_sriov_pf(2, addr="0x7"),
    )
    return vmtools.boot(
        INITRD,
        KVER,
        [Scenario("persist", "{}", script=SCRIPT)],
        devices=devices,
        console_log=tmp / "console.log",
        host_tools=True,
        modules=("ext4",),
        timeout=1200,
        reboots=True,
    )


def step(guest: GuestRun, boot: int, name: str) -> dict[str, Any]:
    for record in guest.records:
        if (
            record.get("event") == "ctl"
            and record.get("boot") == boot
            and record.get("step") == name
        ):
            return record
    raise AssertionError(f"no step {name} in boot {boot}; console:\n{guest.console[-6000:]}")


def event(guest: GuestRun, name: str, boot: int) -> dict[str, Any]:
    for record in guest.records:
        if record.get("event") == name and record.get("boot") == boot:
            return record
    raise AssertionError(f"no {name} in boot {boot}; console:\n{guest.console[-6000:]}")


def test_three_boots_of_one_vm_with_new_boot_ids(guest: GuestRun) -> None:
    ids = [event(guest, "booted-state", b)["boot_id"] for b in (1, 2, 3)]
    assert len(set(ids)) == 3, ids


def test_boot_one_binds_persistently_and_two_containers_claim(guest: GuestRun) -> None:
    bound = step(guest, 1, "bind-persist")
    assert bound["rc"] == 0, bound["stderr"]
    assert bound["drivers"][NIC] == "vfio-pci"
    assert f"{NIC}: bound again at every boot" in bound["stdout"]
    claims = event(guest, "claims", 1)
    assert sorted(claims["claims"].values()) == ["ctr-a", "ctr-b"]
    assert claims["drivers"][NVME] == "vfio-pci"
    assert all(claims["drivers"][a] == "vfio-pci" for a in PAIR)


def test_the_reboot_gave_every_device_back_to_its_driver(guest: GuestRun) -> None:
    after = event(guest, "booted-state", 2)["drivers"]
    assert after[NIC] == "e1000e" and after[NVME] == "nvme"
    assert all(after[a] == "e1000" for a in PAIR)


def test_the_boot_command_binds_again_and_clears_the_old_claims(guest: GuestRun) -> None:
    ran = step(guest, 2, "boot")
    assert ran["rc"] == 0, ran["stderr"]
    assert ran["drivers"][NIC] == "vfio-pci"  # bound again, the driver link says so
    assert ran["drivers"][NVME] == "nvme"  # the containers' devices stay with their drivers
    assert all(ran["drivers"][a] == "e1000" for a in PAIR)
    out = ran["stdout"]
    assert "cleared the claims of containers ctr-a, ctr-b from the previous boot" in out
    assert f"re-bound {NIC} (8086:10d3, persistent): {NIC} (e1000e) -> vfio-pci" in out
    assert "given back" not in out
    assert (
        f"{NVME}: the previous boot's bind by container ctr-a ended with the reboot "
        "(now on nvme): its record dropped, the device not touched"
    ) in out
    assert event(guest, "claims", 2)["claims"] == {}  # the ledger's own reading
    again = step(guest, 2, "boot-again")
    assert again["rc"] == 0, again["stderr"]
    assert "cleared" not in again["stdout"] and "re-bound" not in again["stdout"]
    assert f"{NIC} (8086:10d3, persistent): already on vfio-pci" in again["stdout"]


def test_restore_all_after_a_reboot_without_the_boot_command_gives_nothing_back(
    guest: GuestRun,
) -> None:
    assert step(guest, 2, "bind-plain")["drivers"][NVME] == "vfio-pci"
    before = event(guest, "booted-state", 3)["drivers"]
    assert before[NIC] == "e1000e" and before[NVME] == "nvme"
    restored = step(guest, 3, "restore-all")
    assert restored["rc"] == 0, restored["stderr"]
    out = restored["stdout"]
    assert "given back" not in out
    for addr, driver in ((NIC, "e1000e"), (NVME, "nvme")):
        assert (
            f"{addr}: bound by kata-vfio-ctl in an earlier boot, a bind the reboot ended "
            f"(now on {driver})"
        ) in out
    assert f"{NIC}: no longer bound at boot" in out
    assert restored["drivers"] == before  # nothing moved
    nothing = step(guest, 3, "boot")
    assert nothing["rc"] == 0 and nothing["stdout"].startswith("nothing to do"), nothing
    assert nothing["drivers"][NIC] == "e1000e"


def test_boot_makes_the_persistent_vfs_again_and_binds_the_persistent_vf(guest: GuestRun) -> None:
    made = step(guest, 1, "vfs-persist")
    assert made["rc"] == 0, made["stderr"]
    assert f"{SRIOV_PF}: 2 VFs made again at every boot" in made["stdout"]
    vfs = event(guest, "allocation", 1)["vfs"]
    assert len(vfs) == 2
    bound = step(guest, 1, "bind-vf-persist")
    assert bound["rc"] == 0, bound["stderr"]
    assert bound["drivers"][vfs[1]] == "vfio-pci"
    after_reboot = event(guest, "booted-state", 2)
    assert after_reboot["numvfs"] == 0 and after_reboot["vfs"] == []  # the reboot took them
    assert not any(v in after_reboot["drivers"] for v in vfs)
    ran = step(guest, 2, "boot")
    assert ran["rc"] == 0, ran["stderr"]
    out = ran["stdout"]
    assert f"made 2 VFs of {SRIOV_PF} (1b36:0010, persistent) again: {', '.join(vfs)}" in out
    assert f"re-bound {vfs[1]} (1b36:0010, persistent): {vfs[1]} (no driver) -> vfio-pci" in out
    state = event(guest, "claims", 2)
    assert state["numvfs"] == 2 and state["vfs"] == vfs  # the same VFs, at the same places
    assert state["drivers"][vfs[1]] == "vfio-pci" and state["drivers"][vfs[0]] is None
    again = step(guest, 2, "boot-again")["stdout"]
    assert f"{SRIOV_PF} (1b36:0010, persistent): already has 2 VFs" in again
    assert f"{vfs[1]} (1b36:0010, persistent): already on vfio-pci" in again


def test_boot_drops_the_device_plugins_allocation_of_the_previous_boot(guest: GuestRun) -> None:
    allocation = event(guest, "allocation", 1)
    assert allocation["drivers"][ALLOCATED] == "vfio-pci"
    assert allocation["plugin_records"] == [f"{allocation['id']}.json"]
    assert event(guest, "booted-state", 2)["plugin_records"] == [f"{allocation['id']}.json"]
    out = step(guest, 2, "boot")["stdout"]
    assert (
        f"cleared the device plugin's allocations {allocation['id']} (kata-vfio.io/nic) "
        "from the previous boot (no pod survives a reboot)"
    ) in out
    assert event(guest, "claims", 2)["plugin_records"] == []  # the record is gone
    assert (
        f"{ALLOCATED}: the previous boot's bind by container {allocation['id']} ended "
        "with the reboot (now on e1000e)" in out
    )


def test_vfs_to_zero_drops_the_persistent_vfs_and_their_binds(guest: GuestRun) -> None:
    refused = step(guest, 2, "vfs-0")
    assert refused["rc"] == 1 and "kata-vfio bound" in refused["stderr"]
    removed = step(guest, 2, "vfs-0-force")
    assert removed["rc"] == 0, removed["stderr"]
    assert f"{SRIOV_PF}: its VFs are no longer made at boot" in removed["stdout"]
    assert "no longer bound at boot (its VF went" in removed["stdout"]
    assert event(guest, "booted-state", 3)["numvfs"] == 0
