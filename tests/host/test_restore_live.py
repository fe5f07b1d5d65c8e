"""A device a live container holds is never taken: `kata-vfio-ctl restore ADDRESS` and
`restore --all` refuse it, naming the owner, unless `--force` (then the claim is dropped and
said so); devices of containers that are gone go back as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kata_vfio.errors import DeviceError
from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import DEVICES_ANNOTATION
from kata_vfio_ctl.main import main as ctl
from kata_vfio_host.ledger import Host, read_journal_file
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.lifecycle import prepare_bundle

from fakesys import FakeKernel, FakeSysfs

NVME_ADDR = "0000:05:00.0"  # group 14, on nvme: auto-bound by the container's create
NVME_GROUP = 14


@pytest.fixture
def live(
    vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeSysfs, Host, Path]:
    """Container c1 is running with the NVMe kata-vfio auto-bound for it."""
    import kata_vfio_ctl.base

    state = tmp_path / "state"
    config = tmp_path / "kv.toml"
    config.write_text(
        f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\n'
        f'state_dir = "{state}"\nlog_file = "{tmp_path / "log"}"\n'
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    host = Host(vfio_host.root, state, FakeKernel(vfio_host).write)
    monkeypatch.setattr(kata_vfio_ctl.base, "_host", lambda args: host)
    bundle = tmp_path / "bundles/c1"
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["true"]},
                "root": {"path": "rootfs"},
                "annotations": {DEVICES_ANNOTATION: NVME_ADDR},
            }
        )
    )
    settings = Settings(
        sysfs=str(vfio_host.root), state_dir=str(state), autobind_allow=(NVME_ADDR,)
    )
    prepare_bundle("c1", str(bundle), settings, host, JsonLog(None))
    assert vfio_host.driver(NVME_ADDR) == "vfio-pci"
    return vfio_host, host, bundle


@pytest.mark.parametrize(
    "argv", [["restore", NVME_ADDR], ["restore", "05:00.0"], ["restore", "--all"]]
)
def test_restore_refuses_a_live_containers_device(
    live: tuple[FakeSysfs, Host, Path], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    fs, host, _ = live
    before = read_journal_file(host)
    assert ctl(argv) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{NVME_ADDR}: IOMMU group {NVME_GROUP} is held by live container c1" in lines[0]
    assert "--force" in lines[0] and "given back" not in out
    assert fs.driver(NVME_ADDR) == "vfio-pci"
    after = read_journal_file(host)
    assert after.claims == before.claims and after.devices == before.devices


def test_restore_force_takes_it_and_says_so(
    live: tuple[FakeSysfs, Host, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, host, _ = live
    assert ctl(["restore", "--force", NVME_ADDR]) == 0
    out = capsys.readouterr().out
    assert f"{NVME_ADDR}: given back to its original driver" in out
    assert (
        f"IOMMU group {NVME_GROUP} taken from live container c1 (--force): its claim dropped" in out
    )
    assert fs.driver(NVME_ADDR) == "nvme"
    journal = read_journal_file(host)
    assert NVME_GROUP not in journal.claims and NVME_ADDR not in journal.devices


def test_restore_all_gives_back_a_gone_containers_device(
    live: tuple[FakeSysfs, Host, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, host, bundle = live
    shutil.rmtree(bundle)  # the engine removed the container: its owner is gone
    assert ctl(["restore", "--all"]) == 0
    assert f"{NVME_ADDR}: given back" in capsys.readouterr().out
    assert fs.driver(NVME_ADDR) == "nvme"
    assert read_journal_file(host).claims == {}


PF, VF = "0000:06:00.0", "0000:06:10.0"  # vfio_host: an igb PF and its VF (group 21)


def vf_owner(fs: FakeSysfs, host: Host, tmp_path: Path) -> None:
    """Container v1 runs with the PF's VF."""
    bundle = tmp_path / "bundles/v1"
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["true"]},
                "root": {"path": "rootfs"},
                "annotations": {DEVICES_ANNOTATION: VF},
            }
        )
    )
    prepare_bundle(
        "v1",
        str(bundle),
        Settings(sysfs=str(fs.root), state_dir=str(host.state_dir)),
        host,
        JsonLog(None),
    )


def test_a_pf_is_not_taken_while_a_container_holds_its_vf(
    live: tuple[FakeSysfs, Host, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fs, host, _ = live
    vf_owner(fs, host, tmp_path)
    assert ctl(["bind", "--timeout", "0", "--force", PF]) == 1
    err = capsys.readouterr().err
    assert f"{PF} is the PF of {VF}, which container v1 holds" in err, err
    assert fs.driver(PF) == "igb"
    # nor by a container whose allow-list covers the PF
    bundle = tmp_path / "bundles/p1"
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["true"]},
                "root": {"path": "rootfs"},
                "annotations": {DEVICES_ANNOTATION: PF},
            }
        )
    )
    settings = Settings(sysfs=str(fs.root), state_dir=str(host.state_dir), autobind_allow=(PF,))
    with pytest.raises(DeviceError, match=f"{PF} is the PF of {VF}, which container v1"):
        prepare_bundle("p1", str(bundle), settings, host, JsonLog(None))
    assert fs.driver(PF) == "igb"
    assert "p1" not in {c.container for c in read_journal_file(host).claims.values()}
