"""Devices chosen by kind (io.kata-vfio.select), allocated under one lock, released on delete."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kata_vfio.errors import DeviceError
from kata_vfio.pci import PciAddress
from kata_vfio_host.allocate import SELECT_ANNOTATION, parse_select
from kata_vfio_host.giveback import release_container, restore_all
from kata_vfio_host.ledger import Host, read_journal, read_journal_file
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.lifecycle import prepare_bundle
from kata_vfio_runtime.spec_edit import ALLOCATED_ANNOTATION

from fakesys import NVME, FakeKernel, FakeSysfs

VF_IDS = (0x8086, 0x10CA, 0x020000)


class NoLog:
    def info(self, *a: object, **k: object) -> None: ...
    def warning(self, *a: object, **k: object) -> None: ...
    def error(self, *a: object, **k: object) -> None: ...


def make_bundle(tmp_path: Path, name: str, select: str) -> Path:
    b = tmp_path / "bundles" / name
    b.mkdir(parents=True)
    (b / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["true"]},
                "root": {"path": "rootfs"},
                "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]}},
                "annotations": {SELECT_ANNOTATION: select},
            }
        )
    )
    return b


def create(host: Host, tmp_path: Path, name: str, select: str, allow: tuple[str, ...]) -> list[str]:
    b = make_bundle(tmp_path, name, select)
    settings = Settings(sysfs=str(host.sysfs), state_dir=str(host.state_dir), autobind_allow=allow)
    prepare_bundle(name, b, settings, host, NoLog())
    spec = json.loads((b / "config.json").read_text())
    return spec["annotations"][ALLOCATED_ANNOTATION].split(",")


@pytest.fixture
def sriov_host(tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel) -> Host:
    """An NVMe PF with four VFs (autoprobe off: driver-less), each VF its own group."""
    fakesys.add_device("0000:00:04.0", NVME, group=4, driver="nvme")
    for i in range(4):
        vf = f"0000:00:04.{i + 1}"
        fakesys.add_device(vf, NVME, group=10 + i, driver=None)
        fakesys.add_vf("0000:00:04.0", vf, i)
    fakesys.add_device("0000:00:05.0", group=5, driver="e1000e")  # another kind
    return Host(fakesys.root, tmp_path / "state", kernel.write, boot_id="b1")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1b36:0010*2", [(0x1B36, 0x0010, None, 2)]),
        ("8086:154c", [(0x8086, 0x154C, None, 1)]),
        ("::0200", [(None, None, 0x0200, 1)]),
        ("*:*:010802*3, 8086:*", [(None, None, 0x010802, 3), (0x8086, None, None, 1)]),
    ],
)
def test_select_syntax(text: str, parsed: list[tuple[object, ...]]) -> None:
    got = [(r.vendor, r.device, r.class_code, r.wanted) for r in parse_select(text)]
    assert got == parsed


@pytest.mark.parametrize(
    "text", ["", "1b36", "1b36:0010*0", "1b36:zzzz", "1b36:0010*x", "1b36:0010:02", "../../x:1"]
)
def test_bad_select_is_one_clear_error(text: str) -> None:
    with pytest.raises(DeviceError, match=r"io\.kata-vfio\.select"):
        parse_select(text)


def test_three_creates_over_four_vfs(sriov_host: Host, tmp_path: Path, fakesys: FakeSysfs) -> None:
    allow = ("1b36:0010",)
    first = create(sriov_host, tmp_path, "a", "1b36:0010*2", allow)
    second = create(sriov_host, tmp_path, "b", "1b36:0010*2", allow)
    assert first == ["0000:00:04.1", "0000:00:04.2"] and second == ["0000:00:04.3", "0000:00:04.4"]
    assert all(fakesys.driver(a) == "vfio-pci" for a in first + second)
    before = (tmp_path / "bundles").exists()
    with pytest.raises(DeviceError) as err:
        create(sriov_host, tmp_path, "c", "1b36:0010*2", allow)
    text = str(err.value)
    assert "1b36:0010*2: 0 of 2 free, 5 devices match" in text
    assert "0000:00:04.1 held by container a" in text and "held by container b" in text
    assert "0000:00:04.0 provides 4 virtual functions" in text
    assert before and fakesys.driver("0000:00:04.0") == "nvme"  # the PF is never taken
    assert "c" not in {c.container for c in read_journal_file(sriov_host).claims.values()}
    # the first container goes: its VFs go back (driver-less) and the next create gets them
    release_container(sriov_host, "a")
    assert fakesys.driver("0000:00:04.1") is None
    assert create(sriov_host, tmp_path, "d", "1b36:0010*2", allow) == first
    for cid in ("b", "d"):
        assert release_container(sriov_host, cid).failed == []
    assert read_journal(sriov_host) == {}
    assert all(fakesys.driver(f"0000:00:04.{i}") is None for i in range(1, 5))


def test_select_adds_devices_beyond_the_named_ones(
    sriov_host: Host, tmp_path: Path, fakesys: FakeSysfs
) -> None:
    """io.kata-vfio.devices and io.kata-vfio.select together: the selection picks among
    the devices not already named (two devices, not the named one twice)."""
    allow = ("1b36:0010",)
    b = make_bundle(tmp_path, "both", "1b36:0010*1")
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"]["io.kata-vfio.devices"] = "0000:00:04.1"
    (b / "config.json").write_text(json.dumps(spec))
    settings = Settings(
        sysfs=str(sriov_host.sysfs), state_dir=str(sriov_host.state_dir), autobind_allow=allow
    )
    prepare_bundle("both", b, settings, sriov_host, NoLog())
    annotations = json.loads((b / "config.json").read_text())["annotations"]
    assert annotations[ALLOCATED_ANNOTATION] == "0000:00:04.2"
    manifest = json.loads(annotations["io.kata-vfio.manifest"])
    assert sorted(d["host_address"] for g in manifest["groups"] for d in g["devices"]) == [
        "0000:00:04.1",
        "0000:00:04.2",
    ]
    claimed = {g for g, c in read_journal_file(sriov_host).claims.items() if c.container == "both"}
    assert claimed == {10, 11}


def test_select_that_only_the_named_device_would_satisfy_is_refused(
    sriov_host: Host, tmp_path: Path
) -> None:
    b = make_bundle(tmp_path, "one", "1b36:0010*4")
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"]["io.kata-vfio.devices"] = "0000:00:04.1"
    (b / "config.json").write_text(json.dumps(spec))
    settings = Settings(
        sysfs=str(sriov_host.sysfs),
        state_dir=str(sriov_host.state_dir),
        autobind_allow=("1b36:0010",),
    )
    with pytest.raises(
        DeviceError,
        match=r"3 of 4 free.*0000:00:04\.1 named by the "
        "container already",
    ):
        prepare_bundle("one", b, settings, sriov_host, NoLog())
    assert read_journal_file(sriov_host).claims == {}


def test_not_allowed_devices_are_not_free(sriov_host: Host, tmp_path: Path) -> None:
    with pytest.raises(
        DeviceError,
        match=r"0000:00:05.0 is in IOMMU group 5 with 0000:00:05.0 "
        r"on e1000e, not in the auto-bind allow-list",
    ):
        create(sriov_host, tmp_path, "n", "8086:10d3", ("1b36:0010",))
    assert read_journal(sriov_host) == {}


def test_a_forged_allocated_annotation_is_replaced(sriov_host: Host, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, "f", "1b36:0010")
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"][ALLOCATED_ANNOTATION] = "0000:00:05.0"
    (b / "config.json").write_text(json.dumps(spec))
    settings = Settings(
        sysfs=str(sriov_host.sysfs),
        state_dir=str(sriov_host.state_dir),
        autobind_allow=("1b36:0010",),
    )
    prepare_bundle("f", b, settings, sriov_host, NoLog())
    annotations = json.loads((b / "config.json").read_text())["annotations"]
    assert annotations[ALLOCATED_ANNOTATION] == "0000:00:04.1"


def test_hundred_concurrent_creates_get_distinct_devices(
    tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel
) -> None:
    """FastIOV scale on a fake host of 128 VFs: 100 creates at once, each `*1`."""
    fakesys.add_device("0000:3b:00.0", group=1, driver="igb")
    for i in range(128):
        vf = PciAddress(0, 0x3C + i // 64, (i % 64) // 8, i % 8)
        fakesys.add_device(str(vf), VF_IDS, group=100 + i, driver="igbvf")
        fakesys.add_vf("0000:3b:00.0", str(vf), i)
    host = Host(fakesys.root, tmp_path / "state", kernel.write, boot_id="b1")
    pids = []
    for n in range(100):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                got = create(host, tmp_path, f"c{n}", "8086:10ca*1", ("8086:10ca",))
                (tmp_path / f"got-{n}").write_text(",".join(got))
            except BaseException as exc:
                (tmp_path / f"got-{n}").write_text(f"ERROR {exc!r}")
                code = 1
            os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    results = [(tmp_path / f"got-{n}").read_text() for n in range(100)]
    assert not failed, [r for r in results if r.startswith("ERROR")][:3]
    assert len(set(results)) == 100  # no device twice
    journal = read_journal_file(host)
    assert len(journal.claims) == 100 and not journal.damaged
    for n, addr in enumerate(results):
        entry = journal.devices[addr]
        assert entry.owner == f"container c{n}" and entry.driver == "igbvf"
        assert journal.claims[entry.group].container == f"c{n}"
        assert fakesys.driver(addr) == "vfio-pci"
    # 100 deletes at once: everything back
    pids = []
    for n in range(100):
        pid = os.fork()
        if pid == 0:
            os._exit(1 if release_container(host, f"c{n}").failed else 0)
        pids.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    assert read_journal(host) == {} and read_journal_file(host).claims == {}
    assert all(fakesys.driver(a) == "igbvf" for a in results)
    assert restore_all(host).failed == []
    subprocess.run(["true"], check=True)
