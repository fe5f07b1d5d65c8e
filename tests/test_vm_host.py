"""The guest kernel as an IOMMU *host* for kata-vfio-ctl: real driver moves, real groups."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import vmtools
from vmtools import GuestRun, Scenario

pytestmark = pytest.mark.vm

INITRD = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
KVER = os.environ.get("KATA_VFIO_KVER", "")
SCRIPT = '#!/kvfio/bin/sh\nexec /usr/bin/python3 -I -S /kvfio/hosttest.py "$1"\n'


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    if not INITRD.exists() or not KVER or not vmtools.kernel_image(KVER).exists():
        pytest.skip("needs `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run `make test`")
    log = tmp_path_factory.mktemp("vmhost") / "console.log"
    return vmtools.boot(INITRD, KVER, [Scenario("host", "{}", script=SCRIPT)],
                        console_log=log, host_tools=True)


def step(guest: GuestRun, name: str) -> dict[str, Any]:
    for record in guest.records:
        if record.get("event") == "ctl" and record.get("step") == name:
            return record
    raise AssertionError(f"no step {name}; console:\n{guest.console[-4000:]}")


def test_devices_json_matches_sysfs(guest: GuestRun) -> None:
    view = guest.find("sysfs")["view"]
    result = step(guest, "devices")
    assert result["rc"] == 0, result["stderr"]
    listed = {r["address"]: {"driver": r["driver"], "iommu_group": r["iommu_group"]}
              for r in json.loads(result["stdout"])}
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
