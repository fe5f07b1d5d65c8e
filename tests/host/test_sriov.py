"""SR-IOV VFs for VFIO use (`kata-vfio-ctl vfs`), and the device listing's owners."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kata_vfio.pci import PciAddress
from kata_vfio_ctl.main import main as ctl
from kata_vfio_host.ledger import Host
from kata_vfio_host.settings import Settings as _Settings
from kata_vfio_host.sriov import set_vf_count
from kata_vfio_runtime.lifecycle import prepare_bundle
from ledgerfiles import read_ledger

from fakesys import NVME, FakeKernel, FakeSysfs
from test_allocate import NoLog, make_bundle

PF = "0000:00:06.0"


@pytest.fixture
def pf_host(
    tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> Host:
    fakesys.add_device(PF, NVME, group=6, driver="nvme")
    fakesys.add_sriov_pf(PF, total=4, vf_ids=NVME, group_base=20)
    host = Host(fakesys.root, tmp_path / "state", kernel.write, boot_id="b")
    config = tmp_path / "kv.toml"
    config.write_text(
        f'sysfs = "{fakesys.root}"\nstate_dir = "{host.state_dir}"\n'
        '[autobind]\nallow = ["1b36:0010"]\n'
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    # the CLI writes sysfs through the fake kernel too
    monkeypatch.setattr("kata_vfio_ctl.base._host", lambda args: host)
    return host


def vf_drivers(fs: FakeSysfs) -> dict[str, str | None]:
    return {
        str(PciAddress(0, 1, 0, i)): fs.driver(str(PciAddress(0, 1, 0, i)))
        for i in range(4)
        if fs.dev_dir(str(PciAddress(0, 1, 0, i))).exists()
    }


def test_vfs_made_with_autoprobe_off_through_zero(
    pf_host: Host, fakesys: FakeSysfs, kernel: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["vfs", PF, "2"]) == 0
    assert (fakesys.dev_dir(PF) / "sriov_drivers_autoprobe").read_text().strip() == "0"
    assert vf_drivers(fakesys) == {"0000:01:00.0": None, "0000:01:00.1": None}
    out = capsys.readouterr().out
    assert "0000:01:00.0: VF of 0000:00:06.0 [1b36:0010] IOMMU group 20, driver none" in out
    writes = len(kernel.writes)
    assert ctl(["vfs", PF, "2"]) == 0 and len(kernel.writes) == writes  # idempotent
    assert ctl(["vfs", PF, "3"]) == 0  # 2 -> 0 -> 3: the kernel refuses 2 -> 3
    assert [t for p, t in kernel.writes[writes:] if p.endswith("sriov_numvfs")] == ["0", "3"]
    assert len(vf_drivers(fakesys)) == 3
    assert ctl(["vfs", PF, "0"]) == 0 and vf_drivers(fakesys) == {}
    assert "no virtual functions" in capsys.readouterr().out


def test_vfs_bad_requests(pf_host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(["vfs", PF, "5"]) != 0
    assert "supports 0 to 4 virtual functions, not 5" in capsys.readouterr().err
    assert ctl(["vfs", "0000:00:07.0", "1"]) != 0
    assert "no PCI device 0000:00:07.0" in capsys.readouterr().err


def test_owned_vfs_are_not_removed_without_force(
    pf_host: Host, tmp_path: Path, fakesys: FakeSysfs, capsys: pytest.CaptureFixture[str]
) -> None:
    set_vf_count(pf_host, PciAddress.parse(PF), 2)
    settings = _Settings(
        sysfs=str(pf_host.sysfs), state_dir=str(pf_host.state_dir), autobind_allow=("1b36:0010",)
    )
    prepare_bundle(
        "holder", make_bundle(tmp_path, "holder", "1b36:0010"), settings, pf_host, NoLog()
    )
    assert fakesys.driver("0000:01:00.0") == "vfio-pci"
    capsys.readouterr()
    assert ctl(["devices", "--json"]) == 0
    records = {r["address"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["0000:01:00.0"]["owner"] == "holder"
    assert records["0000:01:00.0"]["physfn"] == PF and records[PF]["sriov_totalvfs"] == 4
    assert records[PF]["virtfns"] == ["0000:01:00.0", "0000:01:00.1"]
    assert records[PF]["not_free"] == "provides 2 virtual functions"
    assert ctl(["devices", "--free", "--json"]) == 0
    assert [r["address"] for r in json.loads(capsys.readouterr().out)] == ["0000:01:00.1"]
    assert ctl(["devices"]) == 0
    assert "holder" in next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("0000:01:00.0")
    )
    assert ctl(["vfs", PF, "0"]) != 0
    err = capsys.readouterr().err
    assert "0000:01:00.0 is owned by container holder" in err and "--force" in err
    assert fakesys.driver("0000:01:00.0") == "vfio-pci"
    assert ctl(["vfs", PF, "0", "--force"]) == 0
    assert vf_drivers(fakesys) == {}
    journal = read_ledger(pf_host.state_dir)
    assert journal["devices"] == {} and journal["claims"] == {}
