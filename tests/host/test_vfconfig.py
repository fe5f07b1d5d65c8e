"""io.kata-vfio.vf-config: a VF's MAC and VLAN set on its PF before the VF goes to the VM,
the PF's own values recorded first and given back when the container is gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kata_vfio.errors import DeviceError
from kata_vfio.manifest import Manifest
from kata_vfio_host.giveback import release_container, restore_all
from kata_vfio_host.ledger import Host, read_journal_file
from kata_vfio_host.settings import Settings
from kata_vfio_host.vfconfig import Netlink, VfPort, parse_vf_config
from kata_vfio_runtime.lifecycle import prepare_bundle

from fakesys import IGBVF, FakeKernel, FakeSysfs
from test_allocate import NoLog

MAC = "52:54:00:12:34:56"


class FakeNetlink:
    """The PF's VF table, as rtnetlink would report and change it."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, int], tuple[str | None, int | None]] = {
            ("enp59s0", 0): ("02:00:00:00:00:01", 0),
            ("enp59s0", 1): (None, 7),
        }
        self.calls: list[tuple[str, int, str | None, int | None]] = []

    def get(self, port: VfPort) -> tuple[str | None, int | None]:
        return self.table[(port.pf_interface, port.vf_index)]

    def set(self, port: VfPort, mac: str | None, vlan: int | None) -> None:
        self.calls.append((port.pf_interface, port.vf_index, mac, vlan))
        old = self.table[(port.pf_interface, port.vf_index)]
        self.table[(port.pf_interface, port.vf_index)] = (
            mac or old[0],
            old[1] if vlan is None else vlan,
        )


@pytest.fixture
def nic_host(tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel) -> Host:
    fakesys.add_device("0000:3b:00.0", group=1, driver="igb", net=("enp59s0",))
    for i in range(2):
        vf = f"0000:3b:02.{i}"
        fakesys.add_device(vf, IGBVF, group=10 + i, driver="vfio-pci")
        fakesys.add_vfio_group(10 + i)
        fakesys.add_vf("0000:3b:00.0", vf, i)
    return Host(fakesys.root, tmp_path / "state", kernel.write, boot_id="b", netlink=FakeNetlink())


def create(host: Host, tmp_path: Path, name: str, annotations: dict[str, str]) -> Path:
    b = tmp_path / "bundles" / name
    b.mkdir(parents=True)
    (b / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["true"]},
                "root": {"path": "rootfs"},
                "annotations": annotations,
            }
        )
    )
    prepare_bundle(
        name, b, Settings(sysfs=str(host.sysfs), state_dir=str(host.state_dir)), host, NoLog()
    )
    return b


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("0000:3b:02.0", "sets nothing"),
        ("0000:3b:02.0 mac=01:00:00:00:00:01", "not a unicast MAC"),
        ("0000:3b:02.0 vlan=4096", "vlan=0..4095"),
        ("0000:3b:02.0 speed=1", "vlan=0..4095"),
        ("../x mac=52:54:00:12:34:56", "malformed PCI address"),
    ],
)
def test_bad_vf_config_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        parse_vf_config(text)


def test_mac_and_vlan_are_set_recorded_and_given_back(nic_host: Host, tmp_path: Path) -> None:
    netlink = nic_host.netlink
    b = create(
        nic_host,
        tmp_path,
        "c1",
        {
            "io.kata-vfio.devices": "0000:3b:02.0,0000:3b:02.1",
            "io.kata-vfio.vf-config": f"0000:3b:02.0 mac={MAC} vlan=100; 0000:3b:02.1 vlan=5",
        },
    )
    assert netlink.calls == [("enp59s0", 0, MAC, 100), ("enp59s0", 1, None, 5)]
    # the PF's own values were journalled before they were changed
    originals = read_journal_file(nic_host).vf_configs
    assert (originals["0000:3b:02.0"].mac, originals["0000:3b:02.0"].vlan) == (
        "02:00:00:00:00:01",
        0,
    )
    assert originals["0000:3b:02.1"].vlan == 7
    # the manifest carries the MAC, so the guest hook finds the VF by it
    spec = json.loads((b / "config.json").read_text())
    manifest = Manifest.from_json(spec["annotations"]["io.kata-vfio.manifest"])
    assert {str(d.host_address): d.mac for d in manifest.devices}["0000:3b:02.0"] == MAC
    assert release_container(nic_host, "c1").failed == []
    assert netlink.table == {
        ("enp59s0", 0): ("02:00:00:00:00:01", 0),
        ("enp59s0", 1): ("00:00:00:00:00:00", 7),
    }
    assert read_journal_file(nic_host).vf_configs == {}


def test_only_the_containers_own_vfs(nic_host: Host, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="not one of container c2's devices"):
        create(
            nic_host,
            tmp_path,
            "c2",
            {
                "io.kata-vfio.devices": "0000:3b:02.0",
                "io.kata-vfio.vf-config": f"0000:3b:02.1 mac={MAC}",
            },
        )
    with pytest.raises(DeviceError, match="names VFs the container does not ask for"):
        create(nic_host, tmp_path, "c3", {"io.kata-vfio.vf-config": f"0000:3b:02.1 mac={MAC}"})
    assert nic_host.netlink.calls == []
    assert read_journal_file(nic_host).claims == {}  # the refused create kept nothing


def test_restore_all_gives_pf_values_back(nic_host: Host, tmp_path: Path) -> None:
    bundle = create(
        nic_host,
        tmp_path,
        "c4",
        {"io.kata-vfio.devices": "0000:3b:02.0", "io.kata-vfio.vf-config": "0000:3b:02.0 vlan=42"},
    )
    live = restore_all(nic_host)  # c4 still runs: its VF settings stay
    assert live.vf_settings == [] and len(live.failed) == 1
    assert "VF settings of live container c4 kept" in live.failed[0]
    assert nic_host.netlink.table[("enp59s0", 0)][1] == 42
    shutil.rmtree(bundle)  # the engine removed c4
    report = restore_all(nic_host)
    assert report.failed == []
    assert report.vf_settings == ["0000:3b:02.0: enp59s0 vf 0 mac 02:00:00:00:00:01 vlan 0"]
    assert nic_host.netlink.table[("enp59s0", 0)] == ("02:00:00:00:00:01", 0)


@pytest.mark.host
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a veth pair")
def test_the_netlink_request_reaches_the_kernel() -> None:
    """No SR-IOV NIC here and Debian's kernels lack CONFIG_NETDEVSIM (test_vm_netdevsim.py
    builds it for a guest, where a driver applies the settings): on this host a veth takes the
    real IFLA_VFINFO_LIST request and refuses it, and the refusal becomes one line."""
    subprocess.run(
        ["ip", "link", "add", "kvfio-vf0", "type", "veth", "peer", "name", "kvfio-vf1"], check=True
    )
    try:
        with pytest.raises(DeviceError, match=r"kvfio-vf0 refused VF 0 settings .*mac.*vlan"):
            Netlink().set(VfPort("kvfio-vf0", 0), MAC, 100)
        mac, vlan = Netlink().get(VfPort("kvfio-vf0", 0))
        assert (mac, vlan) == (None, None)  # a veth has no VFs to report
    finally:
        subprocess.run(["ip", "link", "del", "kvfio-vf0"], check=False)


# --- issue 15 defect 2: VF settings never outlive their owner --------------------------

PF_OWN = ("02:00:00:00:00:01", 0)  # what the PF had for VF 0 before any container


def test_the_next_owner_gets_the_pfs_values_not_the_gone_owners(
    nic_host: Host, tmp_path: Path
) -> None:
    """A sets VF 0's MAC and VLAN and ends the containerd way (bundle removed, no delete);
    B gets the same VF and must find the PF's own values, and `restore --stale` must not
    touch the VF under B."""
    from kata_vfio_host.giveback import release_gone

    a = create(
        nic_host,
        tmp_path,
        "a",
        {
            "io.kata-vfio.devices": "0000:3b:02.0",
            "io.kata-vfio.vf-config": f"0000:3b:02.0 mac={MAC} vlan=100",
        },
    )
    shutil.rmtree(a)
    create(nic_host, tmp_path, "b", {"io.kata-vfio.devices": "0000:3b:02.0"})
    assert nic_host.netlink.table[("enp59s0", 0)] == PF_OWN
    calls = list(nic_host.netlink.calls)
    release_gone(nic_host)  # restore --stale with B live
    assert nic_host.netlink.calls == calls  # nothing set under B
    assert nic_host.netlink.table[("enp59s0", 0)] == PF_OWN
    assert read_journal_file(nic_host).claims[10].container == "b"


def test_the_pfs_values_survive_a_second_owners_settings(nic_host: Host, tmp_path: Path) -> None:
    """A and then B set VF 0; after both are gone `restore --all` gives the PF its own
    values, never A's; while B lives, its settings stay."""
    a = create(
        nic_host,
        tmp_path,
        "a",
        {
            "io.kata-vfio.devices": "0000:3b:02.0",
            "io.kata-vfio.vf-config": f"0000:3b:02.0 mac={MAC} vlan=100",
        },
    )
    shutil.rmtree(a)
    b = create(
        nic_host,
        tmp_path,
        "b",
        {
            "io.kata-vfio.devices": "0000:3b:02.0",
            "io.kata-vfio.vf-config": "0000:3b:02.0 mac=52:54:00:00:00:0b",
        },
    )
    assert nic_host.netlink.table[("enp59s0", 0)] == ("52:54:00:00:00:0b", 0)
    assert restore_all(nic_host).vf_settings == []  # B lives: kept
    assert nic_host.netlink.table[("enp59s0", 0)] == ("52:54:00:00:00:0b", 0)
    shutil.rmtree(b)
    report = restore_all(nic_host)
    assert report.failed == []
    assert nic_host.netlink.table[("enp59s0", 0)] == PF_OWN


def test_a_gone_owners_entry_on_a_live_containers_vf_is_never_reset(
    nic_host: Host, tmp_path: Path
) -> None:
    """The class, whatever left the entry there (a journal of an older version, a failed
    give-back): VF settings recorded by a gone owner for a VF a live container holds now
    stay on the VF for that container, and go back to the PF's values when it ends."""
    from kata_vfio_host.giveback import release_gone
    from kata_vfio_host.ledger import VfOriginal, editing

    b = create(nic_host, tmp_path, "b", {"io.kata-vfio.devices": "0000:3b:02.0"})
    nic_host.netlink.table[("enp59s0", 0)] = (MAC, 100)  # what gone "a" set
    with editing(nic_host) as journal:
        journal.vf_configs["0000:3b:02.0"] = VfOriginal(
            "container a", "enp59s0", 0, *PF_OWN, boot_id="b"
        )
    calls = list(nic_host.netlink.calls)
    release_gone(nic_host)
    restore_all(nic_host)
    assert nic_host.netlink.calls == calls  # nothing reset under B
    assert read_journal_file(nic_host).vf_configs["0000:3b:02.0"].owner == "container b"
    shutil.rmtree(b)
    assert release_container(nic_host, "b").failed == []
    assert nic_host.netlink.table[("enp59s0", 0)] == PF_OWN
