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
VM_OWN = EmulatedDevice(
    "virtio-net-pci,disable-legacy=on,addr=0x9",
    "virtio_pci",
    PciIdentity(0x1AF4, 0x1041, 0x1AF4, 0x1100, 0x020000),
)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    if not INITRD.exists() or not KVER or not vmtools.kernel_image(KVER).exists():
        pytest.skip("needs `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run `make test`")
    top = tmp_path_factory.mktemp("vm")
    main = host_manifest(top / "host1", [[E1000E_A], [NVME], [E1000_A, E1000_B]])
    missing = host_manifest(top / "host2", [[NVME], [ABSENT]], hotplug_timeout=1.0)
    forged = host_manifest(top / "host3", [[VM_OWN]], hotplug_timeout=1.0)
    # two containers of one pod, as a device plugin allocated them (resource "nic" each, by
    # io.kata-vfio.resource.nic) plus devices by address; a lives while b starts
    pod_a = host_manifest(top / "host4", [[E1000E_A], [NVME]], resources={0: "nic"})
    pod_b = host_manifest(
        top / "host5", [[E1000E_B], [E1000_A, E1000_B]], first_group=40, resources={0: "nic"}
    )
    return vmtools.boot(
        INITRD,
        KVER,
        [
            Scenario("forged", forged),
            Scenario("missing", missing),
            Scenario("main", main),
            Scenario("again", main),
            pod_container("pod-a", pod_a, {"detach": ""}),
            pod_container("pod-b", pod_b, {"after": "pod-a\n"}),
        ],
        devices=(*DEFAULT_DEVICES, VM_OWN),
        console_log=top / "console.log",
    )


def pod_container(name: str, manifest_json: str, files: dict[str, str]) -> Scenario:
    """A container of the pod: its own /run (a tmpfs, as each Kata container has its own
    root); one that is detached stays, reporting again on SIGUSR1."""
    scenario = Scenario(name, manifest_json, files=files)
    if "detach" in files:
        scenario.command = [*scenario.command, "--stay"]
    spec = vmtools.container_spec(name, scenario)
    spec["mounts"].append(
        {
            "destination": "/run",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=755"],
        }
    )
    scenario.spec = spec
    return scenario


def container_reports(stdout: str) -> list[dict[str, Any]]:
    return [
        dict(json.loads(line.split(" ", 1)[1]))
        for line in stdout.splitlines()
        if line.startswith("KVFIO-CONTAINER ")
    ]


def container_report(result: dict[str, Any]) -> dict[str, Any]:
    reports = container_reports(result["stdout"])
    assert reports, f"container printed no report: {result}"
    return reports[0]


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
    for step in (
        "start",
        "found",
        "locate",
        "vfio driver",
        "bind",
        "rebind",
        "groups",
        "group mapping",
        "nodes",
        "devices cgroup",
        "cgroup",
        "done",
    ):
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
    assert (
        "kata-vfio-hook: host device 0000:1f:00.0 [15b3:101e class 020000] not found "
        "in the guest after 1 s" in result["stderr"]
    )
    assert result["seconds"] < 10
    before = guest.find("scenario", "missing")["drivers_before"]
    assert result["drivers_after"] == before  # not even the NVMe that was there


def test_forged_manifest_naming_the_vms_own_virtio_device_is_refused(guest: GuestRun) -> None:
    before = guest.find("scenario", "forged")["drivers_before"]
    assert before["0000:00:09.0"] == "virtio-pci"
    result = guest.find("result", "forged")
    assert result["rc"] != 0
    assert (
        "kata-vfio-hook: refusing guest device 0000:00:09.0 [1af4:1041 class 020000]: "
        "the VM depends on it (driver virtio-pci)" in result["stderr"]
    )
    assert result["drivers_after"] == before
    assert not [e for e in result["hook_log"] if e["event"] == "bind"]


def test_container_reads_its_guest_addresses_in_run_kata_vfio(guest: GuestRun) -> None:
    result = guest.find("result", "main")
    files = container_report(result)["run_files"]
    assert files is not None and sorted(files) == ["devices.json", "env"], files
    listing = json.loads(files["devices.json"]["text"])
    done = [e for e in result["hook_log"] if e["event"] == "done"][-1]
    assert {h: d["guest_address"] for h, d in listing["devices"].items()} == done["host_to_guest"]
    assert (
        files["env"]["text"]
        == f"PCIDEVICE_KATA_VFIO_IO_DEVICES={','.join(done['host_to_guest'].values())}\n"
    )


POD = {  # host address -> guest address: identical e1000e, the one a holds is not b's
    "pod-a": {"0000:1e:00.0": "0000:00:03.0", "0000:1f:00.0": "0000:00:05.0"},
    "pod-b": {
        "0000:28:00.0": "0000:00:04.0",
        "0000:29:00.0": "0000:01:01.0",
        "0000:29:00.1": "0000:01:02.0",
    },
}
POD_NIC = {"0000:1e:00.0": "kata-vfio.io/nic", "0000:28:00.0": "kata-vfio.io/nic"}
POD_ENV = {
    "pod-a": "PCIDEVICE_KATA_VFIO_IO_NIC=0000:00:03.0\n"
    "PCIDEVICE_KATA_VFIO_IO_DEVICES=0000:00:05.0\n",
    "pod-b": "PCIDEVICE_KATA_VFIO_IO_NIC=0000:00:04.0\n"
    "PCIDEVICE_KATA_VFIO_IO_DEVICES=0000:01:01.0,0000:01:02.0\n",
}


@pytest.mark.parametrize("name", sorted(POD))
def test_each_container_of_a_pod_sees_only_its_own_devices(guest: GuestRun, name: str) -> None:
    """Two runc containers in one VM with different manifests, a alive while b starts:
    each one's /run/kata-vfio/devices.json and env name its own devices only, at the
    addresses and groups the guest's sysfs gives them, and its /dev/vfio has their nodes."""
    result = guest.find("result", name)
    assert result["rc"] == 0, result["stderr"]
    report = container_report(result)
    files = report["run_files"]
    assert files is not None and sorted(files) == ["devices.json", "env"], files
    assert {f["mode"] for f in files.values()} == {"0o100644"}
    listing = json.loads(files["devices.json"]["text"])
    assert listing["version"] == 1
    assert {h: d["guest_address"] for h, d in listing["devices"].items()} == POD[name]
    done = [e for e in result["hook_log"] if e["event"] == "done"][-1]
    assert done["container_id"] == name and done["host_to_guest"] == POD[name]
    own_groups = set()
    for host, device in listing["devices"].items():
        group = result["groups"][device["guest_address"]]  # the guest's sysfs says
        own_groups.add(group)
        assert device["guest_group"] == int(group) and device["node"] == f"/dev/vfio/{group}"
        assert device["resource"] == POD_NIC.get(host)
        assert report["groups"][group]["dev"] == result["vfio_devs"][group]
    assert sorted(report["entries"]) == sorted([*own_groups, "vfio"])
    assert files["env"]["text"] == POD_ENV[name]


def test_a_pod_container_still_sees_only_its_own_once_the_other_started(guest: GuestRun) -> None:
    """a, asked again after b's hook ran: the same files, nothing of b's."""
    first = container_report(guest.find("result", "pod-a"))
    assert first["run_files"] is not None
    again = container_reports(guest.find("detached", "pod-a")["stdout"])
    assert len(again) == 2, again
    assert again[1]["run_files"] == first["run_files"]
    assert again[1]["entries"] == first["entries"]
