"""io.kata-vfio.vf-config on a real PF driver: the kernel's netdevsim in a TCG guest.

There is no SR-IOV NIC here, and Debian's kernel lacks CONFIG_NETDEVSIM: the test set-up
builds the kernel's own netdevsim from Debian's linux-source for the guest kernel
(tests/vm/build_netdevsim.py, cached under $KATA_VFIO_CACHE). In the guest a netdevsim
PF with 4 VFs takes the settings over rtnetlink as a NIC driver does.

Real: the `kata-vfio` wrapper's create and delete and `kata-vfio-ctl restore --all` as
processes, the ledger on disk, pyroute2's requests, the driver's VF table, and iproute2
(`ip -d -j link show`) reading that table back independently of the product.
Stood in for: netdevsim's VFs are not PCI functions, so the PCI side of the host is a
fake sysfs tree (tests/fakesys.py) in which VF 0000:3b:02.N, on vfio-pci in a group of
its own, is `virtfnN` of a PF whose `net/` holds the netdevsim interface. That is what
`vfconfig.vf_port` reads to turn the annotation's PCI address into (PF interface, VF
index); the claims on those fake groups are made by the same create.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.manifest import Manifest

import build_netdevsim
import vmtools
from vmtools import GuestRun, Scenario

pytestmark = pytest.mark.vm

INITRD = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
KVER = os.environ.get("KATA_VFIO_KVER", "")
SCRIPT = '#!/kvfio/bin/sh\nexec /usr/bin/python3 -I -S /kvfio/netdevsim.py "$1"\n'
ZERO = "00:00:00:00:00:00"
# the VF table before any container: what the guest program's admin step set
BEFORE = {0: ("02:00:00:00:00:01", 0), 1: (ZERO, 7), 2: (ZERO, 0), 3: (ZERO, 0)}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    if not INITRD.exists() or not KVER or not vmtools.kernel_image(KVER).exists():
        pytest.skip("needs `make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run `make test`")
    built = build_netdevsim.build(KVER)  # a failed build is an error here, never a skip
    ip = shutil.which("ip")
    assert ip is not None, "iproute2 is missing: make deps installs it"
    log = tmp_path_factory.mktemp("vmnsim") / "console.log"
    return vmtools.boot(
        INITRD,
        KVER,
        [Scenario("netdevsim", "{}", script=SCRIPT)],
        devices=(),
        console_log=log,
        host_tools=True,
        modules=tuple(built["depends"]),
        files={
            "/kvfio/netdevsim.ko": Path(built["ko"]),
            "/kvfio/fakesys.py": Path(__file__).resolve().parents[1] / "fakesys.py",
            "/usr/sbin/ip": Path(ip),
        },
    )


def record(guest: GuestRun, event: str, **match: Any) -> dict[str, Any]:
    for r in guest.records:
        if r.get("event") == event and all(r.get(k) == v for k, v in match.items()):
            return r
    raise AssertionError(f"no {event} {match}; console:\n{guest.console[-4000:]}")


def vf_table(guest: GuestRun, step: str) -> dict[int, tuple[str, int]]:
    """VF index -> (MAC, VLAN) as `ip -d -j link show` printed it after `step`."""
    shown = record(guest, "ip", step=step)
    assert shown["rc"] == 0, shown["stderr"]
    (link,) = json.loads(shown["stdout"])
    table = {}
    for vf in link["vfinfo_list"]:
        vlans = [v.get("vlan", 0) for v in vf.get("vlan_list", [])]  # iproute2 omits vlan 0
        table[vf["vf"]] = (vf["address"], vlans[0] if vlans else 0)
    return table


def journal(guest: GuestRun, step: str) -> dict[str, Any]:
    vf_configs: dict[str, Any] = record(guest, "journal", step=step)["vf_configs"]
    return vf_configs


def call(guest: GuestRun, step: str) -> dict[str, Any]:
    result = record(guest, "call", step=step)
    assert result["rc"] == 0, result["stderr"]
    return result


def test_netdevsim_pf_with_vfs_in_the_guest(guest: GuestRun) -> None:
    insmod = record(guest, "insmod")
    assert insmod["rc"] == 0, insmod["stderr"]
    assert record(guest, "pf")["numvfs"] == "4"
    assert all(record(guest, "admin", step=s)["rc"] == 0 for s in ("vf0", "vf1"))
    assert vf_table(guest, "before") == BEFORE


def test_one_container_sets_two_vfs_and_delete_gives_both_back(guest: GuestRun) -> None:
    pf = record(guest, "pf")["pf"]
    call(guest, "create-c1")
    assert vf_table(guest, "c1-created") == {
        **BEFORE,
        0: ("52:54:00:12:34:56", 100),
        1: ("52:54:00:12:34:57", 200),
    }
    # the PF's own values are in the ledger while the container runs
    originals = journal(guest, "c1-created")
    assert {
        a: (o["pf_interface"], o["index"], o["mac"], o["vlan"]) for a, o in originals.items()
    } == {"0000:3b:02.0": (pf, 0, "02:00:00:00:00:01", 0), "0000:3b:02.1": (pf, 1, None, 7)}
    # the manifest tells the guest hook each VF's MAC
    manifest = Manifest.from_json(
        record(guest, "spec", name="c1")["annotations"]["io.kata-vfio.manifest"]
    )
    assert {str(d.host_address): d.mac for d in manifest.devices} == {
        "0000:3b:02.0": "52:54:00:12:34:56",
        "0000:3b:02.1": "52:54:00:12:34:57",
    }
    call(guest, "delete-c1")
    assert vf_table(guest, "c1-deleted") == BEFORE
    assert journal(guest, "c1-deleted") == {}


def test_a_vlan_is_cleared_back_to_none_by_restore_all(guest: GuestRun) -> None:
    call(guest, "create-c2")
    assert vf_table(guest, "c2-created") == {**BEFORE, 2: (ZERO, 300)}
    # c2 is live: restore --all keeps its VF settings, naming it, unless forced
    refused = record(guest, "call", step="restore-all-refused")
    assert refused["rc"] == 1
    assert "VF settings of live container c2 kept" in refused["stderr"], refused
    assert vf_table(guest, "refused-all") == {**BEFORE, 2: (ZERO, 300)}
    restored = call(guest, "restore-all")
    pf = record(guest, "pf")["pf"]
    assert restored["stdout"] == (
        f"0000:3b:02.2: {pf} vf 2 mac {ZERO} vlan 0: the PF's VF settings given back\n"
    )
    assert vf_table(guest, "restored-all") == BEFORE
    assert journal(guest, "restored-all") == {}
