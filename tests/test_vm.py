"""End to end in a QEMU guest with a virtual IOMMU: the `make initrd` image, unchanged,
plus a test-only archive (runc, a tiny container). The hook runs as kata-agent runs
guest hooks: an OCI prestart hook, [name, "prestart"], empty environment, 10 s timeout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.pci import PciIdentity

import vmtools
from vmtools import DEFAULT_DEVICES, EmulatedDevice, GuestRun, Scenario, host_manifest

pytestmark = pytest.mark.vm

INITRD = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
KVER = os.environ.get("KATA_VFIO_KVER", "")
E1000E_A, E1000E_B, NVME, E1000_A, E1000_B = DEFAULT_DEVICES
ABSENT = EmulatedDevice("", "mlx5_core", PciIdentity(0x15B3, 0x101E, 0x15B3, 0x0001, 0x020000))
PASSED = ("0000:00:03.0", "0000:00:05.0", "0000:01:01.0", "0000:01:02.0")
# a device of the VM itself, as Kata's virtio net/blk/vsock are (modern virtio: 1af4:1041)
VM_OWN = EmulatedDevice("virtio-net-pci,disable-legacy=on,addr=0x9", "virtio_pci",
                        PciIdentity(0x1AF4, 0x1041, 0x1AF4, 0x1100, 0x020000))


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    if not INITRD.exists() or not KVER or not vmtools.kernel_image(KVER).exists():
        pytest.skip("needs `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run `make test`")
    top = tmp_path_factory.mktemp("vm")
    main = host_manifest(top / "host1", [[E1000E_A], [NVME], [E1000_A, E1000_B]])
    missing = host_manifest(top / "host2", [[NVME], [ABSENT]], hotplug_timeout=1.0)
    forged = host_manifest(top / "host3", [[VM_OWN]], hotplug_timeout=1.0)
    return vmtools.boot(INITRD, KVER, [Scenario("forged", forged), Scenario("missing", missing),
                                       Scenario("main", main), Scenario("again", main)],
                        devices=(*DEFAULT_DEVICES, VM_OWN), console_log=top / "console.log")


def container_report(result: dict[str, Any]) -> dict[str, Any]:
    for line in result["stdout"].splitlines():
        if line.startswith("KVFIO-CONTAINER "):
            return dict(json.loads(line.split(" ", 1)[1]))
    raise AssertionError(f"container printed no report: {result}")


def test_devices_start_on_their_native_drivers(guest: GuestRun) -> None:
    before = guest.find("scenario", "missing")["drivers_before"]
    assert [before[a] for a in PASSED] == ["e1000e", "nvme", "e1000", "e1000"]
    groups = guest.find("scenario", "missing")["groups"]
    # behind the conventional bridge: one group, the bridge (00:08.0) included
    assert groups["0000:01:01.0"] == groups["0000:01:02.0"] == groups["0000:00:08.0"]


def test_container_opens_its_vfio_groups(guest: GuestRun) -> None:
    result = guest.find("result", "main")
    assert result["rc"] == 0, result["stderr"]
    report = container_report(result)
    guest_groups = {result["groups"][a] for a in PASSED}
    assert sorted(report["entries"]) == sorted([*guest_groups, "vfio"])
    assert report["api_version"] == 0  # VFIO_GET_API_VERSION
    for group in guest_groups:
        assert report["groups"][group]["viable"] is True  # VFIO_GROUP_GET_STATUS
        assert report["groups"][group]["dev"] == result["vfio_devs"][group]


def test_devices_rebound_and_others_untouched(guest: GuestRun) -> None:
    result = guest.find("result", "main")
    after = result["drivers_after"]
    assert [after[a] for a in PASSED] == ["vfio-pci"] * 4
    assert after["0000:00:04.0"] == "e1000e"  # the second, unrequested e1000e


def test_hook_log_has_every_step(guest: GuestRun) -> None:
    log = guest.find("result", "main")["hook_log"]
    events = [entry["event"] for entry in log]
    for step in ("start", "found", "locate", "vfio driver", "bind", "rebind", "groups",
                 "group mapping", "nodes", "devices cgroup", "cgroup", "done"):
        assert step in events, events
    done = log[-1]
    assert done["container_id"] == "main" and done["hook"] == ["prestart"]
    assert set(done["host_to_guest"].values()) == set(PASSED)


def test_second_container_with_the_same_devices(guest: GuestRun) -> None:
    result = guest.find("result", "again")
    assert result["rc"] == 0, result["stderr"]
    assert not [e for e in result["hook_log"] if e["event"] == "bind"]  # nothing to rebind
    assert container_report(result)["api_version"] == 0


def test_missing_device_fails_creation_within_the_bound(guest: GuestRun) -> None:
    result = guest.find("result", "missing")
    assert result["rc"] != 0
    assert "kata-vfio-hook: host device 0000:1f:00.0 [15b3:101e class 020000] not found " \
        "in the guest after 1 s" in result["stderr"]
    assert result["seconds"] < 10
    before = guest.find("scenario", "missing")["drivers_before"]
    assert result["drivers_after"] == before  # not even the NVMe that was there


def test_forged_manifest_naming_the_vms_own_virtio_device_is_refused(guest: GuestRun) -> None:
    before = guest.find("scenario", "forged")["drivers_before"]
    assert before["0000:00:09.0"] == "virtio-pci"
    result = guest.find("result", "forged")
    assert result["rc"] != 0
    assert "kata-vfio-hook: refusing guest device 0000:00:09.0 [1af4:1041 class 020000]: " \
        "the VM depends on it (driver virtio-pci)" in result["stderr"]
    assert result["drivers_after"] == before
    assert not [e for e in result["hook_log"] if e["event"] == "bind"]
